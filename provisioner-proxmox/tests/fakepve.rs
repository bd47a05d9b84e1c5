//! `ProxmoxProvisioner` against fakepve, an independent fake of the PVE 9
//! API (PyPI `fakepve[crypto]`), so GRS is not only tested against its own
//! idea of Proxmox.
//!
//! The tests start `tests/fakepve_server.py` (an API token, nodes `pve1` and
//! `pve2`, template 9000 on `pve1`, HTTPS on a loopback address). When
//! python3 or fakepve is missing they FAIL if `CI` is set and are skipped
//! loudly otherwise. Set `GRS_PYTHON` to choose the interpreter.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use grs_provisioner::conformance::{self, Harness, HarnessError, spec};
use grs_provisioner::{Bootstrap, Provisioner, ProvisionerError};
use grs_provisioner_proxmox::client::{Param, Upid};
use grs_provisioner_proxmox::schema::ApiSchema;
use grs_provisioner_proxmox::{
    ProxmoxBackend, ProxmoxConfig, ProxmoxPoolConfig, ProxmoxProvisioner, PveClient,
};
use secrecy::SecretString;
use tokio::io::AsyncBufReadExt;

struct FakePve {
    _child: tokio::process::Child,
    conn: ProxmoxConfig,
    fingerprint: String,
}

/// Starts fakepve, or says why it cannot (and whether that fails the test).
async fn start_fakepve(faults: &str) -> Option<FakePve> {
    start_fakepve_with(faults, &[]).await
}

/// Starts fakepve with extra environment (`FAKEPVE_TEMPLATE_CONFIG`,
/// `FAKEPVE_VMS`, see `fakepve_server.py`).
async fn start_fakepve_with(faults: &str, env: &[(&str, String)]) -> Option<FakePve> {
    let python = std::env::var("GRS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fakepve_server.py");
    let spawned = tokio::process::Command::new(&python)
        .arg(script)
        .arg("0.02")
        .env("FAKEPVE_FAULTS", faults)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return unavailable(&format!("cannot run {python}: {e}")),
    };
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    let line = match first {
        Ok(Ok(Some(l))) => l,
        other => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            return unavailable(&format!("fakepve did not start ({other:?}): {err}"));
        }
    };
    let v: serde_json::Value = serde_json::from_str(&line).expect("fakepve_server.py prints JSON");
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    let mut conn = ProxmoxConfig::new(s("url"), s("token_id"));
    conn.token_secret = Some(SecretString::from(s("token_secret")));
    conn.fingerprint = Some(s("fingerprint"));
    conn.retry_base_delay = Duration::from_millis(50);
    conn.retry_max_delay = Duration::from_millis(500);
    conn.task_poll_min = Duration::from_millis(20);
    conn.task_poll_max = Duration::from_millis(100);
    for d in conn.task_expected.values_mut() {
        *d = Duration::from_millis(20);
    }
    conn.task_timeout = Duration::from_secs(60);
    Some(FakePve {
        _child: child,
        fingerprint: s("fingerprint"),
        conn,
    })
}

fn unavailable(why: &str) -> Option<FakePve> {
    let msg = format!(
        "fakepve is not available: {why}\n  install it with: pip install 'fakepve[crypto]'"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}\n  (CI is set, so the fakepve tests fail instead of skipping)");
    }
    eprintln!("SKIPPED (not in CI): {msg}");
    None
}

fn pool() -> ProxmoxPoolConfig {
    let mut p = ProxmoxPoolConfig::new("pve1", 9000);
    // fakepve's nodes have 8 GiB, 2 GiB of it used: small VMs, so that the
    // suite's concurrent creates fit (placement checks free memory).
    p.memory_mib = Some(512);
    p.agent_timeout = Duration::from_secs(20);
    p
}

struct FakeHarness {
    provisioner: Arc<ProxmoxBackend>,
    /// A separate client for going behind the provisioner's back.
    admin: PveClient,
}

#[async_trait]
impl Harness for FakeHarness {
    fn provisioner(&self) -> Arc<dyn Provisioner> {
        self.provisioner.clone()
    }
    fn pool(&self) -> String {
        "linux".into()
    }
    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
        let id = self.admin.nextid().await?;
        let params = [Param::new("newid", id), Param::new("name", name)];
        let upid = self.admin.clone_vm("pve1", 9000, &params).await?;
        self.admin.wait_task(&upid).await?;
        Ok(())
    }
    /// An API failure is an error, which fails the check that asked: it
    /// must not count as "it exists" (that made "a foreign VM survives"
    /// pass without looking).
    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
        let vms = self.admin.resources(Some("vm")).await?;
        Ok(vms.iter().any(|r| r.name.as_deref() == Some(name)))
    }
}

fn assert_schema_clean(requests: &[grs_provisioner_proxmox::client::RecordedRequest]) {
    let schema = ApiSchema::bundled();
    let bad: Vec<String> = requests
        .iter()
        .filter_map(|r| schema.check(&r.method, &r.path, &r.params).err())
        .map(|v| v.to_string())
        .collect();
    assert!(
        bad.is_empty(),
        "requests outside the PVE schema:\n{}",
        bad.join("\n")
    );
}

#[tokio::test]
async fn conformance_suite_passes_on_fakepve() {
    let Some(fake) = start_fakepve("").await else {
        return;
    };
    let backend = Arc::new(ProxmoxBackend::new(&fake.conn, "grs-fakepve", "grs-conf").unwrap());
    let p = backend.add_pool("linux", &pool()).unwrap();
    let log = p.client().record_requests();
    p.validate().await.unwrap();
    let h = FakeHarness {
        provisioner: backend.clone(),
        admin: PveClient::new(&fake.conn).unwrap(),
    };
    conformance::run_all(&h).await.unwrap();

    // cloud-init bootstrap: fakepve validates smbios1 and tags itself.
    let mut s = spec("linux", "grs-conf-ci", 77);
    s.bootstrap = Bootstrap::CloudInit {
        seed_url: SecretString::from("https://gw.example/cloud-init/abcdef0123456789/".to_owned()),
    };
    p.create(&s).await.unwrap();
    let inst = p.get("grs-conf-ci").await.unwrap().unwrap();
    assert_eq!(inst.job_id, Some(77));
    p.delete("grs-conf-ci").await.unwrap();
    assert!(!h.exists_at_all("grs-conf-ci").await.unwrap());

    let requests = log.lock().unwrap().clone();
    assert!(
        requests.len() > 20,
        "only {} requests recorded",
        requests.len()
    );
    assert_schema_clean(&requests);
}

/// Makes foreign VMs through `maker`, looks for VMs through `looker`.
struct SplitHarness {
    maker: FakeHarness,
    looker: FakeHarness,
}

#[async_trait]
impl Harness for SplitHarness {
    fn provisioner(&self) -> Arc<dyn Provisioner> {
        self.maker.provisioner()
    }
    fn pool(&self) -> String {
        self.maker.pool()
    }
    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
        self.maker.create_foreign(name).await
    }
    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
        self.looker.exists_at_all(name).await
    }
}

#[tokio::test]
async fn the_foreign_vm_checks_fail_when_fakepve_refuses_the_lookup() {
    let Some(fake) = start_fakepve("").await else {
        return;
    };
    let backend = Arc::new(ProxmoxBackend::new(&fake.conn, "grs-fakepve", "grs-conf").unwrap());
    backend.add_pool("linux", &pool()).unwrap();
    let mut wrong = fake.conn.clone();
    wrong.token_secret = Some(SecretString::from("not-the-secret".to_owned()));
    let h = SplitHarness {
        maker: FakeHarness {
            provisioner: backend.clone(),
            admin: PveClient::new(&fake.conn).unwrap(),
        },
        looker: FakeHarness {
            provisioner: backend,
            admin: PveClient::new(&wrong).unwrap(),
        },
    };
    let e = conformance::foreign_vms_are_invisible_and_untouchable(&h, "refused")
        .await
        .expect_err("the check could not look, so it must fail");
    assert!(e.contains("cannot tell whether a VM named"), "{e}");
}

#[tokio::test]
async fn lock_timeouts_on_clone_are_retried_on_fakepve() {
    let Some(fake) = start_fakepve("clone-lock:2").await else {
        return;
    };
    let p =
        ProxmoxProvisioner::new(&fake.conn, "linux", &pool(), "grs-fakepve", "grs-conf").unwrap();
    let log = p.client().record_requests();
    p.create(&spec("linux", "grs-conf-lock", 5)).await.unwrap();
    p.delete("grs-conf-lock").await.unwrap();
    let clones = log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.ends_with("/clone"))
        .count();
    assert_eq!(clones, 3, "two lock timeouts, then the clone");
}

#[tokio::test]
async fn bad_token_missing_template_and_wrong_fingerprint_are_clear_errors_on_fakepve() {
    let Some(fake) = start_fakepve("").await else {
        return;
    };
    let mut conn = fake.conn.clone();
    conn.token_secret = Some(SecretString::from("not-the-secret".to_owned()));
    let e = ProxmoxProvisioner::new(&conn, "linux", &pool(), "i", "grs")
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProvisionerError::Config(ref m) if m.contains("authentication failed")),
        "{e:?}"
    );
    assert!(!e.to_string().contains("not-the-secret"));

    let mut missing = pool();
    missing.template_vmid = 9876;
    let e = ProxmoxProvisioner::new(&fake.conn, "linux", &missing, "i", "grs")
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    let t = e.to_string();
    assert!(t.contains("9876") && t.contains("pve1"), "{t}");

    let mut no_pool = pool();
    no_pool.resource_pool = Some("nope".into());
    let e = ProxmoxProvisioner::new(&fake.conn, "linux", &no_pool, "i", "grs")
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    let t = e.to_string();
    assert!(t.contains("resource_pool") && t.contains("nope"), "{t}");

    let mut conn = fake.conn.clone();
    conn.fingerprint = Some(["00"; 32].join(":"));
    let e = ProxmoxProvisioner::new(&conn, "linux", &pool(), "i", "grs")
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    let t = e.to_string();
    assert!(
        t.contains(&fake.fingerprint) && t.contains(&["00"; 32].join(":")),
        "{t}"
    );
}

#[tokio::test]
async fn task_failures_on_fakepve_carry_the_task_log() {
    let Some(fake) = start_fakepve("").await else {
        return;
    };
    let c = PveClient::new(&fake.conn).unwrap();
    // Starting a template fails on fakepve as on PVE; whichever way it
    // fails, the error must carry PVE's text.
    match c.vm_action("pve1", 9000, "start").await {
        Ok(upid) => {
            let e = c.wait_task(&upid).await.unwrap_err();
            assert!(!e.to_string().is_empty());
        }
        Err(e) => assert!(e.status().is_some(), "{e:?}"),
    }
    let u = Upid::parse("UPID:pve1:00000001:00000007:00000000:qmstart:9000:root@pam:").unwrap();
    let e = c.wait_task(&u).await.unwrap_err();
    assert!(
        e.to_string().contains("UPID") || e.status().is_some(),
        "{e}"
    );
}

/// fakepve's clone copies the template's options as qemu-server does
/// (`CLONE_SKIP`), protection and tags included, and its destroy checks
/// protection: a protected, tagged template must not make GRS's VMs
/// undeletable, nor make a never-configured clone look ready.
#[tokio::test]
async fn a_protected_tagged_template_and_a_never_configured_clone_on_fakepve() {
    let marker = grs_provisioner_proxmox::provisioner::Marker {
        installation: "grs-fakepve".into(),
        pool: "linux".into(),
        job: 61,
        created: 1_700_000_000,
    };
    let vms = serde_json::json!([{
        "vmid": 4100, "name": "grs-conf-61",
        "config": {
            "memory": "512", "tags": "debian;runner", "protection": "1",
            "description": marker.description(),
            "scsi0": "local-lvm:vm-4100-disk-0,size=8G",
        },
    }]);
    let env = [
        (
            "FAKEPVE_TEMPLATE_CONFIG",
            r#"{"protection": "1", "tags": "debian;runner"}"#.to_owned(),
        ),
        ("FAKEPVE_VMS", vms.to_string()),
    ];
    let Some(fake) = start_fakepve_with("", &env).await else {
        return;
    };
    let p =
        ProxmoxProvisioner::new(&fake.conn, "linux", &pool(), "grs-fakepve", "grs-conf").unwrap();
    let admin = PveClient::new(&fake.conn).unwrap();
    let seeded = |name: &str, job| {
        let mut s = spec("linux", name, job);
        s.bootstrap = Bootstrap::CloudInit {
            seed_url: SecretString::from(format!("https://gw.example/cloud-init/tok{job}/")),
        };
        s
    };
    p.create(&seeded("grs-conf-60", 60)).await.unwrap();
    p.delete("grs-conf-60").await.unwrap();

    // The half-made clone is replaced: the VM that runs has its seed.
    p.create(&seeded("grs-conf-61", 61)).await.unwrap();
    let found: Vec<_> = admin
        .resources(Some("vm"))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.name.as_deref() == Some("grs-conf-61"))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    let cfg = admin
        .vm_config("pve1", found[0].vmid.unwrap())
        .await
        .unwrap();
    let smbios = cfg.get("smbios1").and_then(|v| v.as_str()).unwrap_or("");
    assert!(
        smbios.contains("serial="),
        "started without its seed: {smbios}"
    );
    p.delete("grs-conf-61").await.unwrap();
    let names: Vec<String> = admin
        .resources(Some("vm"))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.name)
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n == "grs-conf-60" || n == "grs-conf-61"),
        "{names:?}"
    );
}

/// A template under backup (`VM is locked (backup)`, fakepve's catalogue)
/// is a transient failure, never a permanent one.
#[tokio::test]
async fn a_template_under_backup_is_transient_on_fakepve() {
    let Some(fake) = start_fakepve("template-locked:1000").await else {
        return;
    };
    let p =
        ProxmoxProvisioner::new(&fake.conn, "linux", &pool(), "grs-fakepve", "grs-conf").unwrap();
    let e = p
        .create(&spec("linux", "grs-conf-62", 62))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ProvisionerError::Transient(m) if m.contains("VM is locked (backup)")),
        "{e:?}"
    );
}
