//! The API token's least privileges, computed from the calls GRS makes and
//! the official schema's `permissions`, must equal the documented list
//! ([`REQUIRED_PRIVILEGES`]): a new call, or a call whose permissions
//! change, without a matching grant fails here.
//!
//! Sources of each rule:
//! - `permissions.check` of each endpoint in `schema/endpoints.json` (the
//!   PVE 9.1 `apidoc.js` extract; compared with `apidoc.js` itself when
//!   `shared/fixtures/proxmox/` is beside the repository).
//! - What the schema only says in words (`permissions.description`), for the
//!   endpoints open to every user; the test asserts the words are still
//!   there.
//! - qemu-server's per-option check of `PUT config`
//!   (`$check_vm_modify_config_perm` and its option tables in
//!   `PVE/API2/Qemu.pm`; tags: `assert_tag_permissions` in
//!   pve-guest-common `PVE/GuestHelpers.pm`; bridges: `check_vnet_access`,
//!   same file), and pve-manager's filtering of `/cluster/resources`
//!   (`PVE/API2/Cluster.pm`, `resources`: guests need `VM.Audit`, node
//!   memory needs `Sys.Audit`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use grs_provisioner::Bootstrap;
use grs_provisioner::conformance::spec;
use grs_provisioner_proxmox::BootstrapMode;
use grs_provisioner_proxmox::privileges::{
    REQUIRED_PRIVILEGES, pveum_commands, role_privileges_for,
};
use grs_provisioner_proxmox::schema::{ApiSchema, ENDPOINTS_JSON};
use grs_provisioner_proxmox::sim::SimOptions;
use grs_provisioner_proxmox::testing::{POOL, SimFixture, TEMPLATE_VMID};
use secrecy::SecretString;
use serde_json::Value;

/// (ACL path template, privilege).
type Need = (String, String);

/// One `perm` clause: privileges on a path, all of them or any one.
#[derive(Debug)]
struct Clause {
    path: String,
    privs: Vec<String>,
    any: bool,
}

/// The ACL path template of a schema permission path for one request.
fn acl_path(template: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = template.to_owned();
    if let Some(v) = vars.get("vmid") {
        let who = if v == &TEMPLATE_VMID.to_string() {
            "{template_vmid}"
        } else {
            "{newid}"
        };
        out = out.replace("{vmid}", who);
    }
    out.replace("{pool}", "{resource_pool}")
        .replace("{poolid}", "{resource_pool}")
}

/// Evaluates a schema `check` for one request (`vars`: path variables and
/// parameters). `None`: the clause does not apply (`require_param` absent).
fn eval(check: &Value, vars: &BTreeMap<String, String>) -> Option<Vec<Clause>> {
    let a = check.as_array().expect("a check is an array");
    match a[0].as_str().unwrap() {
        "perm" => {
            let opts: Vec<&Value> = a[3..].iter().collect();
            let mut any = false;
            let mut i = 0;
            while i < opts.len() {
                match opts[i].as_str() {
                    Some("any") => any = true,
                    Some("require_param") => {
                        let p = opts[i + 1].as_str().unwrap();
                        if !vars.contains_key(p) {
                            return None;
                        }
                    }
                    other => panic!("unknown perm option {other:?} in {check}"),
                }
                i += 2;
            }
            Some(vec![Clause {
                path: acl_path(a[1].as_str().unwrap(), vars),
                privs: a[2]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().to_owned())
                    .collect(),
                any,
            }])
        }
        "and" => {
            let mut all = Vec::new();
            for c in &a[1..] {
                all.extend(eval(c, vars)?);
            }
            Some(all)
        }
        // The first alternative that applies (the documented ACLs grant it).
        "or" => a[1..].iter().find_map(|c| eval(c, vars)),
        other => panic!("check {other:?} is not understood by this test: {check}"),
    }
}

/// qemu-server's privilege for one `PUT config` option
/// (`$check_vm_modify_config_perm`, PVE/API2/Qemu.pm: `$cpuoptions`,
/// `$memoryoptions`, `$hwtypeoptions`, `$generaloptions`, `net\d+`; `tags`
/// through `assert_tag_permissions`).
fn config_option_privilege(opt: &str) -> &'static str {
    match opt {
        "cores" | "sockets" | "cpu" => "VM.Config.CPU",
        "memory" | "balloon" => "VM.Config.Memory",
        "smbios1" => "VM.Config.HWType",
        // `protection` is in `$generaloptions` too (GRS clears a protection
        // the clone inherited from its template).
        "agent" | "description" | "name" | "tags" | "onboot" | "protection" => "VM.Config.Options",
        o if o.starts_with("net") => "VM.Config.Network",
        other => {
            panic!("PUT config option {other} has no rule here; read $check_vm_modify_config_perm")
        }
    }
}

fn shared_apidoc() -> Option<PathBuf> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/proxmox/apidoc.js");
    p.exists().then_some(p)
}

/// `permissions` by `METHOD path`, from the bundled extract.
fn permissions() -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(ENDPOINTS_JSON).unwrap();
    v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                format!(
                    "{} {}",
                    e["method"].as_str().unwrap(),
                    e["path"].as_str().unwrap()
                ),
                e["permissions"].clone(),
            )
        })
        .collect()
}

/// `permissions` of `METHOD path` in the full `apidoc.js` tree.
fn apidoc_permissions(tree: &Value, method: &str, path: &str) -> Option<Value> {
    let mut stack: Vec<&Value> = tree.as_array()?.iter().collect();
    while let Some(n) = stack.pop() {
        if n["path"].as_str() == Some(path) {
            return n["info"][method].get("permissions").cloned();
        }
        if let Some(c) = n["children"].as_array() {
            stack.extend(c.iter());
        }
    }
    None
}

#[tokio::test]
async fn the_documented_privileges_are_exactly_what_the_calls_grs_makes_need() {
    let f = SimFixture::two_nodes(SimOptions::default()).await;
    let log = f.provisioner.client().record_requests();

    // Every pool option on, cloud-init bootstrap: the whole life cycle.
    let mut full = f.pool.clone();
    full.resource_pool = Some("grs".into());
    full.cores = Some(4);
    full.memory_mib = Some(4096);
    full.bridge = Some("vmbr0".into());
    full.vlan = Some(20);
    f.sim.add_resource_pool("grs");
    let p = f.provisioner_with(&full);
    p.validate().await.unwrap();
    let mut s = spec(POOL, "grs-conf-1", 1);
    s.bootstrap = Bootstrap::CloudInit {
        seed_url: SecretString::from("https://gw.example/cloud-init/tok/".to_owned()),
    };
    p.create(&s).await.unwrap();
    p.get("grs-conf-1").await.unwrap().unwrap();
    p.list().await.unwrap();
    p.stop("grs-conf-1").await.unwrap();
    p.start("grs-conf-1").await.unwrap();
    p.delete("grs-conf-1").await.unwrap();
    // Guest-agent bootstrap.
    let mut ga = f.pool.clone();
    ga.bootstrap = BootstrapMode::GuestAgent;
    let p = f.provisioner_with(&ga);
    let mut s = spec(POOL, "grs-conf-2", 2);
    s.bootstrap = Bootstrap::GuestAgent {
        path: "/root/.grs-jitconfig".into(),
        content: SecretString::from("jit".to_owned()),
        command: vec!["/bin/true".into()],
    };
    p.create(&s).await.unwrap();
    p.delete("grs-conf-2").await.unwrap();

    let requests = log.lock().unwrap().clone();
    let schema = ApiSchema::bundled();
    let perms = permissions();
    let apidoc: Option<Value> = shared_apidoc().map(|p| {
        let text = std::fs::read_to_string(p).unwrap();
        let (a, b) = (text.find('[').unwrap(), text.rfind(']').unwrap());
        serde_json::from_str(&text[a..=b]).unwrap()
    });
    let template = f.sim.vm(TEMPLATE_VMID).unwrap();

    let mut need: BTreeSet<Need> = BTreeSet::new();
    let mut any_of: Vec<(Clause, String)> = Vec::new();
    let mut add = |path: &str, privilege: &str| {
        need.insert((path.to_owned(), privilege.to_owned()));
    };
    let mut calls = BTreeSet::new();
    for r in &requests {
        let (ep, path_vars) = schema
            .find(&r.method, &r.path)
            .unwrap_or_else(|| panic!("{} {} is not in the schema", r.method, r.path));
        let key = format!("{} {}", ep.method, ep.path);
        calls.insert(key.clone());
        let p = &perms[&key];
        if let Some(tree) = &apidoc {
            assert_eq!(
                apidoc_permissions(tree, &ep.method, &ep.path).as_ref(),
                Some(p),
                "{key}: endpoints.json and apidoc.js disagree"
            );
        }
        let vars: BTreeMap<String, String> = path_vars
            .into_iter()
            .chain(r.params.iter().cloned())
            .collect();
        let words = p["description"].as_str().unwrap_or("");
        if let Some(check) = p.get("check") {
            for c in eval(check, &vars).unwrap_or_else(|| panic!("{key}: no alternative applies")) {
                if c.any && c.privs.len() > 1 {
                    any_of.push((c, key.clone()));
                } else {
                    for pr in &c.privs {
                        add(&c.path, pr);
                    }
                }
            }
        } else {
            assert_eq!(p["user"], "all", "{key}: {p}");
            match key.as_str() {
                "GET /version" | "GET /cluster/nextid" | "GET /nodes" => {}
                // pve-manager PVE/API2/Cluster.pm `resources`: a guest is
                // listed only with VM.Audit on it, a node's memory only
                // with Sys.Audit (placement needs it).
                "GET /cluster/resources" => {
                    add("/vms/{template_vmid}", "VM.Audit");
                    add("/vms/{newid}", "VM.Audit");
                    add("/nodes/{node}", "Sys.Audit");
                    // ... and a storage only with Datastore.Audit on it
                    // (`next if !$rpcenv->check($authuser,
                    // "/storage/$storeid", ['Datastore.Audit'], 1)`): the
                    // start-up check that the template's disks are on
                    // shared storage reads them there.
                    add("/storage/{storage}", "Datastore.Audit");
                }
                "GET /pools" => {
                    assert!(
                        words.contains("Pool.Audit permissions on /pool/<pool>"),
                        "{words}"
                    );
                    add("/pool/{resource_pool}", "Pool.Audit");
                }
                // GRS reads only the tasks it started itself.
                "GET /nodes/{node}/tasks/{upid}/status" | "GET /nodes/{node}/tasks/{upid}/log" => {
                    assert!(words.contains("owner of the task"), "{words}");
                }
                other => panic!("{other} is open to all users; decide what it needs: {words}"),
            }
        }
        match key.as_str() {
            "POST /nodes/{node}/qemu/{vmid}/clone" => {
                assert!(
                    words.contains("'Datastore.AllocateSpace' on any used storage")
                        && words.contains("'SDN.Use' on any used bridge/vnet"),
                    "{words}"
                );
                add("/storage/{storage}", "Datastore.AllocateSpace");
                // qemu-server clone_vm: check_bridge_access on the source's
                // config (its bridges, here vmbr0 without a VLAN tag).
                assert!(!template.config["net0"].contains("tag="));
                add("/sdn/zones/localnetwork/{bridge}", "SDN.Use");
            }
            "PUT /nodes/{node}/qemu/{vmid}/config" => {
                let allowed = &any_of.last().expect("PUT config has an any-check").0.privs;
                for (k, v) in &r.params {
                    let pr = config_option_privilege(k);
                    assert!(allowed.iter().any(|a| a == pr), "{pr} not in {allowed:?}");
                    add("/vms/{newid}", pr);
                    if k.starts_with("net") && v.contains("bridge=") {
                        // check_vnet_access: with a VLAN tag, the tag's path.
                        let path = if v.contains("tag=") {
                            "/sdn/zones/localnetwork/{bridge}/{vlan}"
                        } else {
                            "/sdn/zones/localnetwork/{bridge}"
                        };
                        add(path, "SDN.Use");
                    }
                }
            }
            _ => {}
        }
    }
    // An any-of clause is met when one of its privileges is needed anyway
    // on the same path; otherwise this test must say which one GRS takes.
    for (c, key) in &any_of {
        assert!(
            c.privs
                .iter()
                .any(|p| need.contains(&(c.path.clone(), p.clone()))),
            "{key}: needs one of {:?} on {}; none is in the computed set",
            c.privs,
            c.path
        );
    }

    let documented: BTreeSet<Need> = REQUIRED_PRIVILEGES
        .iter()
        .flat_map(|g| {
            g.privileges
                .iter()
                .map(|p| (g.path.to_owned(), (*p).to_owned()))
        })
        .collect();
    let missing: Vec<_> = need.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&need).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "REQUIRED_PRIVILEGES is out of date.\n  needed but not documented: {missing:?}\n  documented but not needed: {extra:?}\n  calls: {calls:#?}"
    );

    // docs/proxmox.md shows the role as pveum_commands renders it.
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/proxmox.md"),
    )
    .expect("docs/proxmox.md exists");
    assert!(pveum_commands().lines().all(|l| doc.contains(l)));
    for major in [9, 8, 7] {
        let privs: Vec<&str> = role_privileges_for(major).into_iter().collect();
        let role = format!("pveum role add GRS -privs \"{}\"", privs.join(","));
        assert!(
            doc.contains(&role),
            "docs/proxmox.md lacks the PVE {major} role: {role}"
        );
    }
}
