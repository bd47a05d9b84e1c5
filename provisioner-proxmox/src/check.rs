//! Installation checks (`grs doctor`): does the PVE side of a pool hold
//! what GRS will ask of it? Asked of PVE itself, read-only.
//!
//! - [`api_version`]: the API answers (address, TLS pin, token).
//! - [`required_privileges`]: [`REQUIRED_PRIVILEGES`] resolved to the ACL
//!   paths of one pool's configuration (its template, nodes, storages,
//!   bridges, resource pool) and PVE release.
//! - [`missing_privileges`]: which of those the token does not hold,
//!   from `GET /access/permissions?path=` (pve-access-control
//!   `API2/AccessControl.pm`, `permissions`: the token's effective
//!   privileges on that path, each with whether it propagates below it).
//!
//! The template itself (exists, is a template, storage reachable from where
//! placement puts clones) is checked by [`ProxmoxProvisioner::validate`],
//! the same check the control plane runs at start-up.
//!
//! [`ProxmoxProvisioner::validate`]: crate::ProxmoxProvisioner::validate

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::Value;

use crate::client::{Idempotency, Param, PveClient};
use crate::config::{BootstrapMode, NodeConfig, ProxmoxPoolConfig};
use crate::error::PveError;
use crate::privileges::{Need, REQUIRED_PRIVILEGES};

/// `GET /version`: the release (`9.1.1`) and its major number.
pub async fn api_version(client: &PveClient) -> Result<(String, u32), PveError> {
    let v = client.version().await?;
    let version = v
        .get("version")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let major = version
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| PveError::Decode {
            path: "/version".into(),
            detail: format!("no release number in {v}"),
        })?;
    Ok((version, major))
}

/// The nodes clones of `pool` go to: the configured ones, narrowed (after
/// [`ProxmoxProvisioner::validate`]) to those the template's storage
/// reaches.
///
/// [`ProxmoxProvisioner::validate`]: crate::ProxmoxProvisioner::validate
pub fn clone_nodes(pool: &crate::ProxmoxProvisioner) -> Vec<String> {
    pool.candidates()
}

/// One privilege GRS needs on one concrete ACL path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequiredPrivilege {
    /// The ACL path (`/vms/9000`, `/pool/grs`, `/storage/local-lvm`).
    pub path: String,
    /// The privilege (this release's name).
    pub privilege: String,
    /// It must propagate below `path`: it is for VMs not made yet
    /// (`/vms` when no resource pool holds them).
    pub propagate: bool,
    /// The calls that need it.
    pub needed_by: &'static str,
}

/// What pool `pool` needs on PVE release `major`, by concrete path.
/// `template_config` is the template's configuration
/// (`GET .../qemu/{template_vmid}/config`): its disks' storages and its
/// bridges are paths too; `nodes` are `[proxmox].nodes`.
pub fn required_privileges(
    pool: &ProxmoxPoolConfig,
    nodes: &[NodeConfig],
    major: u32,
    template_config: &serde_json::Map<String, Value>,
) -> Vec<RequiredPrivilege> {
    let needed = |need: Need| match need {
        Need::Always => true,
        Need::ResourcePool => pool.resource_pool.is_some(),
        Need::Cores => pool.cores.is_some(),
        Need::Memory => pool.memory_mib.is_some(),
        Need::Bridge => pool.bridge.is_some(),
        Need::GuestAgent => pool.bootstrap == BootstrapMode::GuestAgent,
        Need::Pve8 => major >= 8,
    };
    // VMs GRS makes: through their resource pool when they go into one
    // (qemu-server checks `/pool/<pool>` first, `check_vm_perm`), else
    // `/vms`, propagating to ids that do not exist yet.
    let new_vms = match &pool.resource_pool {
        Some(rp) => (format!("/pool/{rp}"), false),
        None => ("/vms".to_owned(), true),
    };
    let placement: Vec<String> = if nodes.is_empty() {
        vec![
            pool.target_node
                .clone()
                .unwrap_or_else(|| pool.node.clone()),
        ]
    } else {
        nodes.iter().map(|n| n.name.clone()).collect()
    };
    let mut storages: BTreeSet<String> = crate::provisioner::template_disks(template_config)
        .into_iter()
        .map(|(_, sid)| sid)
        .collect();
    if pool.full_clone
        && let Some(s) = &pool.storage
    {
        storages.insert(s.clone());
    }
    let mut bridges: BTreeSet<String> = template_bridges(template_config);
    if let Some(b) = &pool.bridge {
        bridges.insert(b.clone());
    }
    let mut out = BTreeSet::new();
    for grant in REQUIRED_PRIVILEGES.iter().filter(|g| needed(g.need)) {
        let paths: Vec<(String, bool)> = match grant.path {
            "/vms/{template_vmid}" => vec![(format!("/vms/{}", pool.template_vmid), false)],
            "/vms/{newid}" => vec![new_vms.clone()],
            "/nodes/{node}" => placement
                .iter()
                .map(|n| (format!("/nodes/{n}"), false))
                .collect(),
            "/storage/{storage}" => storages
                .iter()
                .map(|s| (format!("/storage/{s}"), false))
                .collect(),
            "/sdn/zones/localnetwork/{bridge}" => bridges
                .iter()
                .map(|b| (format!("/sdn/zones/localnetwork/{b}"), false))
                .collect(),
            "/sdn/zones/localnetwork/{bridge}/{vlan}" => match (&pool.bridge, pool.vlan) {
                (Some(b), Some(v)) if major >= 8 => {
                    vec![(format!("/sdn/zones/localnetwork/{b}/{v}"), false)]
                }
                _ => Vec::new(),
            },
            "/pool/{resource_pool}" => pool
                .resource_pool
                .iter()
                .map(|rp| (format!("/pool/{rp}"), false))
                .collect(),
            // A grant on a path this function does not know: shown as is,
            // so it is noticed rather than silently dropped.
            other => vec![(other.to_owned(), false)],
        };
        for (path, propagate) in paths {
            for p in grant.privileges {
                out.insert(RequiredPrivilege {
                    path: path.clone(),
                    privilege: release_name(p, major).to_owned(),
                    propagate,
                    needed_by: grant.needed_by,
                });
            }
        }
    }
    out.into_iter().collect()
}

/// A PVE 9 privilege's name on release `major` (see
/// [`role_privileges_for`](crate::privileges::role_privileges_for)).
fn release_name(privilege: &str, major: u32) -> &str {
    if major < 9 && privilege.starts_with("VM.GuestAgent.") {
        "VM.Monitor"
    } else {
        privilege
    }
}

/// The bridges of the template's network devices (`net0: virtio=...,bridge=vmbr0`).
fn template_bridges(cfg: &serde_json::Map<String, Value>) -> BTreeSet<String> {
    cfg.iter()
        .filter(|(k, _)| {
            k.strip_prefix("net")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
        .filter_map(|(_, v)| v.as_str())
        .flat_map(|v| v.split(','))
        .filter_map(|kv| kv.strip_prefix("bridge="))
        .map(str::to_owned)
        .collect()
}

/// The token's effective privileges on `path`: privilege → whether it
/// propagates below `path`.
pub async fn effective_privileges(
    client: &PveClient,
    path: &str,
) -> Result<BTreeMap<String, bool>, PveError> {
    let v = client
        .call(
            Method::GET,
            "/access/permissions",
            &[Param::new("path", path)],
            Idempotency::Idempotent,
        )
        .await?;
    let Some(perms) = v.get(path) else {
        return Ok(BTreeMap::new());
    };
    let Some(perms) = perms.as_object() else {
        return Err(PveError::Decode {
            path: "/access/permissions".into(),
            detail: format!("expected privileges of {path}, got {perms}"),
        });
    };
    Ok(perms
        .iter()
        .map(|(p, prop)| {
            let prop = prop.as_u64().map(|n| n != 0).or(prop.as_bool());
            (p.clone(), prop.unwrap_or(false))
        })
        .collect())
}

/// The privileges of `required` the token does not hold (or holds without
/// propagation where it must propagate); one request per distinct path.
pub async fn missing_privileges(
    client: &PveClient,
    required: &[RequiredPrivilege],
) -> Result<Vec<RequiredPrivilege>, PveError> {
    let mut held: BTreeMap<&str, BTreeMap<String, bool>> = BTreeMap::new();
    for r in required {
        if !held.contains_key(r.path.as_str()) {
            held.insert(&r.path, effective_privileges(client, &r.path).await?);
        }
    }
    Ok(required
        .iter()
        .filter(|r| match held[r.path.as_str()].get(&r.privilege) {
            None => true,
            Some(propagates) => r.propagate && !propagates,
        })
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect()
    }

    #[test]
    fn privileges_resolve_to_the_paths_of_the_pool() {
        let mut pool = ProxmoxPoolConfig::new("pve1", 9000);
        pool.resource_pool = Some("grs".into());
        pool.bridge = Some("vmbr1".into());
        pool.vlan = Some(20);
        let tpl = config(&[
            ("scsi0", "local-lvm:base-9000-disk-0,size=8G"),
            ("ide2", "local-lvm:cloudinit,media=cdrom"),
            ("net0", "virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0"),
        ]);
        let r = required_privileges(&pool, &[], 9, &tpl);
        let has = |path: &str, p: &str| r.iter().any(|x| x.path == path && x.privilege == p);
        assert!(has("/vms/9000", "VM.Clone"));
        assert!(has("/pool/grs", "VM.Allocate"));
        assert!(has("/pool/grs", "Pool.Audit"));
        assert!(has("/nodes/pve1", "Sys.Audit"));
        assert!(has("/storage/local-lvm", "Datastore.AllocateSpace"));
        assert!(has("/sdn/zones/localnetwork/vmbr0", "SDN.Use"));
        assert!(has("/sdn/zones/localnetwork/vmbr1/20", "SDN.Use"));
        assert!(!r.iter().any(|x| x.path == "/vms"));
        // Without a resource pool, new VMs need a propagating grant on /vms.
        let r = required_privileges(&ProxmoxPoolConfig::new("pve1", 9000), &[], 7, &tpl);
        assert!(r.iter().any(|x| x.path == "/vms" && x.propagate));
        assert!(!r.iter().any(|x| x.privilege == "SDN.Use"));
    }
}
