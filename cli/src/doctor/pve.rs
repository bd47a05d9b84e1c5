//! Proxmox VE: the API reachable with the configured TLS trust (pinned
//! fingerprint or CA), the token's privileges against what each pool needs,
//! and each pool's template (the control plane's own start-up validation).
//! The Proxmox knowledge is in `grs_provisioner_proxmox::check`.

use std::time::Duration;

use grs_provisioner::Provisioner;
use grs_provisioner_proxmox::check::{self, RequiredPrivilege};
use grs_provisioner_proxmox::{ProxmoxBackend, ProxmoxConfig, ProxmoxPoolConfig};

use super::{Check, Loaded, bounded};

const API: &str = "PVE API";

pub(super) async fn checks(loaded: &Loaded, timeout: Duration) -> Vec<Check> {
    let pools: Vec<(&String, &grs_control_plane::config::ProvisionerConfig)> = loaded
        .config
        .pools
        .iter()
        .filter_map(|(n, p)| p.provisioner.as_ref().map(|pr| (n, pr)))
        .filter(|(_, p)| p.kind == "proxmox")
        .collect();
    if pools.is_empty() {
        return Vec::new();
    }
    let Some(conn) = &loaded.proxmox else {
        return vec![Check::fail(
            API,
            "pools of type = \"proxmox\" but no [proxmox] section",
            "add [proxmox] with url, token_id and the token secret (token_secret_file or GRS_PROXMOX_TOKEN_SECRET)",
        )];
    };
    // One attempt per call, bounded by --timeout: the doctor reports, it
    // does not ride out outages.
    let mut conn: ProxmoxConfig = conn.clone();
    conn.retry_attempts = 1;
    conn.connect_timeout = conn.connect_timeout.min(timeout);
    conn.request_timeout = conn.request_timeout.min(timeout);
    let cp = &loaded.config.control_plane;
    let backend = match ProxmoxBackend::new(&conn, &cp.installation_id, &cp.instance_prefix) {
        Ok(b) => b,
        Err(e) => {
            return vec![Check::fail(
                API,
                e.to_string(),
                "correct the [proxmox] key named above",
            )];
        }
    };
    let mut out = Vec::new();
    let mut configured = Vec::new();
    for (name, p) in &pools {
        match backend.configure_pool(name, &p.document) {
            Ok(()) => configured.push(name.as_str()),
            Err(e) => out.push(Check::fail(
                format!("PVE pool {name}"),
                e.to_string(),
                "correct the key named above",
            )),
        }
    }
    let Some(first) = configured.first().and_then(|n| backend.pool(n)) else {
        return out;
    };
    let client = first.client();
    let major = match bounded(timeout, &conn.url, check::api_version(client)).await {
        Ok((version, major)) => {
            let trust = if conn.fingerprint.is_some() {
                "pinned certificate fingerprint matches"
            } else if conn.ca_file.is_some() {
                "certificate signed by proxmox.ca_file"
            } else if conn.insecure_skip_verify {
                "certificate NOT verified (insecure_skip_verify)"
            } else if conn.url.starts_with("https://") {
                "certificate trusted by the system's roots"
            } else {
                "plain http"
            };
            out.push(if conn.insecure_skip_verify {
                Check::warn(
                    API,
                    format!("{} answers as PVE {version}; {trust}", conn.url),
                    "pin the certificate: proxmox.fingerprint = the SHA-256 fingerprint the web UI shows (Node > Certificates)",
                )
            } else {
                Check::pass(
                    API,
                    format!("{} answers as PVE {version} to token {}; {trust}", conn.url, conn.token_id),
                )
            });
            major
        }
        Err(e) => {
            out.push(Check::fail(API, e.clone(), api_fix(&e, &conn)));
            for n in &configured {
                out.push(Check::skip(
                    format!("PVE template (pool {n})"),
                    "the PVE API is not reachable",
                ));
                out.push(Check::skip(
                    format!("PVE privileges (pool {n})"),
                    "the PVE API is not reachable",
                ));
            }
            return out;
        }
    };
    for name in configured {
        let Some(p) = backend.pool(name) else {
            continue;
        };
        let pool_cfg: ProxmoxPoolConfig = match serde_json::from_value(serde_json::Value::Object(
            pools
                .iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, p)| p.document.clone())
                .unwrap_or_default(),
        )) {
            Ok(c) => c,
            Err(_) => continue, // configure_pool accepted it: cannot happen
        };
        let template = format!("PVE template (pool {name})");
        match bounded(timeout, "validating the template", p.validate()).await {
            Ok(()) => {
                let what = format!(
                    "VM {} on node {} is a {}",
                    pool_cfg.template_vmid,
                    pool_cfg.node,
                    if pool_cfg.full_clone {
                        "VM (full clones)"
                    } else {
                        "template"
                    }
                );
                // Placement narrowed to the nodes the template's storage
                // reaches: GRS works, with fewer nodes than configured.
                let reach = check::clone_nodes(&p);
                let unused: Vec<&str> = conn
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .filter(|n| pool_cfg.target_node.is_none() && !reach.iter().any(|r| r == n))
                    .collect();
                out.push(if unused.is_empty() {
                    Check::pass(
                        &template,
                        format!("{what}, clonable on {}", reach.join(", ")),
                    )
                } else {
                    Check::warn(
                        &template,
                        format!(
                            "{what}; its disks are on storage local to {}: clones go to {} only, never to {}",
                            pool_cfg.node,
                            reach.join(", "),
                            unused.join(", ")
                        ),
                        "move the template's disks to shared storage, or list only the nodes it reaches in proxmox.nodes",
                    )
                });
            }
            Err(e) => out.push(Check::fail(
                &template,
                e,
                "correct the key named above, or the template on PVE",
            )),
        }
        out.push(privileges(name, &pool_cfg, &conn, major, p.client(), timeout).await);
    }
    out
}

/// The fix for a failed first call.
fn api_fix(err: &str, conn: &ProxmoxConfig) -> String {
    if err.contains("TLS verification") {
        if conn.fingerprint.is_some() {
            "the certificate is not the pinned one: if PVE's certificate was renewed, set proxmox.fingerprint to the new SHA-256 fingerprint (web UI: Node > System > Certificates), after checking it there".into()
        } else {
            "trust PVE's certificate: proxmox.fingerprint (pin it) or proxmox.ca_file (/etc/pve/pve-root-ca.pem)".into()
        }
    } else if err.contains("authentication failed") {
        format!(
            "check proxmox.token_id ({}) and its secret (token_secret_file or GRS_PROXMOX_TOKEN_SECRET); the token must exist (pveum user token list)",
            conn.token_id
        )
    } else {
        format!(
            "make {} reachable from here (proxmox.url; port 8006)",
            conn.url
        )
    }
}

async fn privileges(
    pool: &str,
    cfg: &ProxmoxPoolConfig,
    conn: &ProxmoxConfig,
    major: u32,
    client: &grs_provisioner_proxmox::PveClient,
    timeout: Duration,
) -> Check {
    let name = format!("PVE privileges (pool {pool})");
    let template = match bounded(
        timeout,
        "reading the template's config",
        client.vm_config(&cfg.node, cfg.template_vmid),
    )
    .await
    {
        Ok(t) => t,
        Err(e) => return Check::skip(name, format!("the template's config cannot be read: {e}")),
    };
    let required = check::required_privileges(cfg, &conn.nodes, major, &template);
    let missing = match bounded(
        timeout,
        "GET /access/permissions",
        check::missing_privileges(client, &required),
    )
    .await
    {
        Ok(m) => m,
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot read the token's permissions: {e}"),
                "let the token read its own permissions (any valid token may: GET /access/permissions)",
            );
        }
    };
    if missing.is_empty() {
        return Check::pass(
            name,
            format!(
                "token {} holds all {} privileges GRS needs on {} paths",
                conn.token_id,
                required.len(),
                required
                    .iter()
                    .map(|r| r.path.as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            ),
        );
    }
    Check::fail(
        name,
        missing_words(&conn.token_id, &missing),
        fix_words(conn, &missing),
    )
}

/// `token lacks VM.Clone on /vms/9000 (POST .../clone); ...`
fn missing_words(token: &str, missing: &[RequiredPrivilege]) -> String {
    let each: Vec<String> = missing
        .iter()
        .map(|m| {
            let prop = if m.propagate { " (propagating)" } else { "" };
            format!("{} on {}{prop}", m.privilege, m.path)
        })
        .collect();
    format!("token {token} lacks {}", each.join(", "))
}

/// `pveum acl modify PATH -token TOKEN -role GRS` per path.
fn fix_words(conn: &ProxmoxConfig, missing: &[RequiredPrivilege]) -> String {
    let paths: std::collections::BTreeSet<&str> = missing.iter().map(|m| m.path.as_str()).collect();
    let cmds: Vec<String> = paths
        .iter()
        .map(|p| format!("pveum acl modify {p} -token '{}' -role GRS", conn.token_id))
        .collect();
    format!(
        "grant the GRS role (docs/proxmox.md lists its privileges) there: {} (a token without privilege separation takes its user's ACLs: -user instead)",
        cmds.join("; ")
    )
}
