//! docs/configuration.md against the configuration types themselves.
//!
//! The keys come from walking the real types' `Deserialize` implementations
//! ([`grs_config::keys::keys`]): the control plane's `Config`, the gateway's
//! `ConfigFile`, and the Proxmox backend's `[proxmox]` and pool sections.
//! The defaults come from serializing the types' own defaults. So a key
//! added to a config struct fails here until the reference documents it,
//! with its default and its environment variable; a key removed fails here
//! until the reference drops it; a default changed fails until the
//! reference says the new one.

use std::collections::{BTreeMap, BTreeSet};

use grs_config::keys::{NAME, env_var, keys};
use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

const DOC: &str = include_str!("../../docs/configuration.md");

/// The documented keys: the rows (`| `key` | default | `ENV` | meaning |`)
/// of the tables headed `| key | default | environment variable | meaning |`.
fn documented() -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    let mut in_table = false;
    for line in DOC.lines() {
        if line == "| key | default | environment variable | meaning |" {
            in_table = true;
            continue;
        }
        in_table &= line.starts_with('|');
        let Some(rest) = line.strip_prefix("| `").filter(|_| in_table) else {
            continue;
        };
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = rest.split('`').next().unwrap_or_default().to_owned();
        if cells.len() < 4 {
            panic!("docs/configuration.md: row of {key} has fewer than 4 columns: {line}");
        }
        let prev = out.insert(
            key.clone(),
            (cells[1].trim().to_owned(), cells[2].trim().to_owned()),
        );
        assert!(
            prev.is_none(),
            "docs/configuration.md documents {key} twice"
        );
    }
    out
}

fn ser<T: Serialize>(v: &T) -> Table {
    match Value::try_from(v).unwrap() {
        Value::Table(t) => t,
        other => panic!("not a table: {other}"),
    }
}

/// A section's defaults, from a minimal table of its required keys: the
/// defaults (serialized), and the required keys (those the minimal table
/// had to give).
fn defaults_from_minimal<T: DeserializeOwned + Serialize>(minimal: &str) -> (Table, Vec<String>) {
    let min: Table = minimal.parse().unwrap();
    let t: T = Value::Table(min.clone()).try_into().unwrap();
    let mut d = ser(&t);
    let required: Vec<String> = min.keys().cloned().collect();
    for k in &required {
        d.remove(k);
    }
    (d, required)
}

fn prefixed(prefix: &str, keys: Vec<String>) -> Vec<String> {
    keys.into_iter().map(|k| format!("{prefix}{k}")).collect()
}

/// Every key, with its default (`None`: unset by default) and whether it is
/// required.
fn reference() -> BTreeMap<String, (Option<Value>, bool)> {
    use grs_control_plane::config::{Config, PoolConfig};
    use grs_github::{GitHubAppConfig, GitHubConfig};
    use grs_provisioner_proxmox::{NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
    use grs_webhook_gateway::ConfigFile;

    let mut all: BTreeSet<String> = BTreeSet::new();
    all.extend(keys::<Config>().unwrap());
    all.extend(keys::<ConfigFile>().unwrap());
    all.extend(prefixed("proxmox.", keys::<ProxmoxConfig>().unwrap()));
    // The Proxmox pool settings are the document of a `type = "proxmox"`
    // pool's provisioner section.
    all.extend(prefixed(
        &format!("pools.{NAME}.provisioner."),
        keys::<ProxmoxPoolConfig>().unwrap(),
    ));

    // Defaults, laid out as the keys are.
    let mut tree = ser(&Config::default());
    let mut pool = ser(&PoolConfig::default());
    let (mut pve_pool, pve_pool_required) =
        defaults_from_minimal::<ProxmoxPoolConfig>("node = 'pve1'\ntemplate_vmid = 9000");
    pve_pool.insert("type".into(), Value::String(String::new()));
    pool.insert("provisioner".into(), Value::Table(pve_pool));
    tree.insert(
        "pools".into(),
        Value::Table(Table::from_iter([(NAME.to_owned(), Value::Table(pool))])),
    );
    let mut github = ser(&GitHubConfig::default());
    github.insert("app".into(), Value::Table(ser(&GitHubAppConfig::default())));
    tree.insert("github".into(), Value::Table(github));
    for (k, v) in ser(&ConfigFile::default()) {
        match (tree.get_mut(&k), v) {
            (Some(Value::Table(t)), Value::Table(o)) => t.extend(o),
            (_, v) => {
                tree.insert(k, v);
            }
        }
    }
    let (mut pve, pve_required) = defaults_from_minimal::<ProxmoxConfig>(
        "url = 'https://pve1:8006'\ntoken_id = 'grs@pve!scaler'",
    );
    let (node, node_required) = defaults_from_minimal::<NodeConfig>("name = 'pve1'");
    pve.insert("nodes[]".into(), Value::Table(node));
    tree.insert("proxmox".into(), Value::Table(pve));

    let mut required: BTreeSet<String> = BTreeSet::new();
    required.insert(format!("pools.{NAME}.provisioner.type"));
    required.extend(prefixed("proxmox.", pve_required));
    required.extend(prefixed("proxmox.nodes[].", node_required));
    required.extend(prefixed(
        &format!("pools.{NAME}.provisioner."),
        pve_pool_required,
    ));

    all.into_iter()
        .map(|k| {
            let mut v = Some(&tree);
            let parts: Vec<&str> = k.split('.').collect();
            let mut found = None;
            for (i, p) in parts.iter().enumerate() {
                let Some(t) = v else { break };
                match t.get(*p) {
                    Some(Value::Table(inner)) if i + 1 < parts.len() => v = Some(inner),
                    Some(leaf) if i + 1 == parts.len() => found = Some(leaf.clone()),
                    _ => v = None,
                }
            }
            let is_required = required.contains(&k);
            (k, (found.filter(|_| !is_required), is_required))
        })
        .collect()
}

/// Whether `[pools.<name>.provisioner]` key `k` is one GRS reads itself
/// (it does not reach the backend's document).
fn consumed_by_grs(k: &str) -> bool {
    let text = format!("type = 'grpc'\n{k} = '1s'\n");
    let t: Table = text.parse().unwrap();
    // Any value error (a wrong sample type) also proves GRS reads the key.
    match Value::Table(t).try_into::<grs_control_plane::config::ProvisionerConfig>() {
        Ok(p) => !p.document.contains_key(k),
        Err(_) => true,
    }
}

/// The backend's own keys of a pool's provisioner section, one row.
fn doc_key(k: &str) -> String {
    k.replace(&format!("provisioner.{NAME}"), "provisioner.<key>")
}

#[test]
fn every_key_of_the_config_types_is_documented_with_its_default_and_variable() {
    let reference = reference();
    let doc = documented();
    assert!(
        reference.len() > 60,
        "the walk found {} keys",
        reference.len()
    );
    let mut problems = Vec::new();
    for (key, (default, required)) in &reference {
        let shown = doc_key(key);
        let Some((doc_default, doc_env)) = doc.get(&shown) else {
            problems.push(format!("{shown}: not documented"));
            continue;
        };
        let want_env = if shown.contains("[]") || shown.ends_with("<key>") {
            "—".to_owned()
        } else {
            format!("`{}`", env_var(&shown))
        };
        if *doc_env != want_env {
            problems.push(format!(
                "{shown}: environment variable {doc_env}, should be {want_env}"
            ));
        }
        match (default, required) {
            (_, true) if doc_default != "(required)" => problems.push(format!(
                "{shown}: default {doc_default}, should be (required)"
            )),
            (Some(v), false) => {
                let want = format!("`{v}`");
                if *doc_default != want {
                    problems.push(format!("{shown}: default {doc_default}, should be {want}"));
                }
            }
            (None, false) if !(doc_default.starts_with("unset") || doc_default == "—") => {
                problems.push(format!(
                    "{shown}: default {doc_default}, but it is unset by default"
                ))
            }
            _ => {}
        }
    }
    let known: BTreeSet<String> = reference.keys().map(|k| doc_key(k)).collect();
    for key in doc.keys() {
        if known.contains(key) {
            continue;
        }
        // A pool's provisioner section flattens the backend's keys into
        // GRS's own, so the walk finds only GRS's required `type`: a
        // documented GRS key there must at least be one GRS takes out of
        // the backend's document.
        let flat = format!("pools.{NAME}.provisioner.");
        if let Some(k) = key.strip_prefix(&flat)
            && consumed_by_grs(k)
        {
            continue;
        }
        problems.push(format!("{key}: documented, but no config type reads it"));
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_walk_sees_secrets_sections_and_pools() {
    let k = keys::<grs_control_plane::config::Config>().unwrap();
    for want in [
        "control_plane.auth_token",
        "redis.sentinel.master_name",
        "redis.sentinel.password",
        "pools.<name>.labels",
        "pools.<name>.provisioner.type",
        "github.app.private_key",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} not in {k:?}");
    }
}

/// The ```toml blocks of a doc.
fn toml_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, line) in doc.lines().enumerate() {
        match (&mut cur, line.trim()) {
            (None, "```toml") => cur = Some((i + 2, String::new())),
            (Some(_), "```") => out.extend(cur.take()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn every_toml_example_in_the_docs_is_read_by_the_config_types() {
    use grs_control_plane::config::Config;
    use grs_webhook_gateway::ConfigFile;
    let docs = [
        (
            "docs/operations.md",
            include_str!("../../docs/operations.md"),
        ),
        ("docs/github.md", include_str!("../../docs/github.md")),
    ];
    let mut n = 0;
    for (name, doc) in docs {
        for (line, text) in toml_blocks(doc) {
            n += 1;
            let table: toml::Table = text
                .parse()
                .unwrap_or_else(|e| panic!("{name}:{line}: not TOML: {e}"));
            // Unknown keys are errors in every section (deny_unknown_fields),
            // so a misspelt key fails here.
            grs_config::load_from::<Config, _>(Some(table.clone()), Vec::new())
                .unwrap_or_else(|e| panic!("{name}:{line}: {e}"));
            grs_config::load_from::<ConfigFile, _>(Some(table), Vec::new())
                .unwrap_or_else(|e| panic!("{name}:{line}: {e}"));
        }
    }
    assert!(n >= 3, "found {n} TOML examples");
}
