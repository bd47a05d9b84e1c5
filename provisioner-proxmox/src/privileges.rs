//! The least privileges of GRS's PVE API token, as data.
//!
//! Each [`Grant`] is one ACL path (a template: `{newid}` is any VM GRS
//! makes) and the privileges GRS needs there, with the calls that need them.
//! The list is not guessed: `tests/privileges.rs` records every call the
//! provisioner makes against the simulator (validate, create, get, list,
//! start, stop, delete, cloud-init and guest-agent bootstrap, every pool
//! option on), evaluates the `permissions` of each call in the official
//! schema (`schema/endpoints.json`, extracted from PVE 9.1's `apidoc.js`,
//! cross-checked against it when `shared/` is there), refines the checks
//! the schema leaves coarse with qemu-server's own rules (PUT config is
//! checked per option, `$check_vm_modify_config_perm` in
//! `PVE/API2/Qemu.pm`), and asserts the result equals [`REQUIRED_PRIVILEGES`].
//! A new call without a matching grant fails that test.
//!
//! [`pveum_commands`] renders the role and ACLs for `docs/proxmox.md`.

use std::collections::BTreeSet;

/// When a grant is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Always.
    Always,
    /// Pools with `resource_pool` set.
    ResourcePool,
    /// Pools with `cores` set.
    Cores,
    /// Pools with `memory_mib` set.
    Memory,
    /// Pools with `bridge` (and `vlan`) set.
    Bridge,
    /// Pools with `bootstrap = "guest-agent"`.
    GuestAgent,
    /// PVE 8.0 and later (`SDN.Use` on plain bridges; qemu-server
    /// `check_bridge_access`, added for 8.0).
    Pve8,
}

/// Privileges GRS needs on one ACL path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The ACL path, with placeholders: `{template_vmid}`, `{newid}` (every
    /// VM GRS makes), `{node}` (every node VMs may go to), `{storage}`
    /// (every storage of the template's disks, or `storage` for full
    /// clones), `{bridge}`, `{vlan}`, `{resource_pool}`.
    pub path: &'static str,
    /// The privileges (PVE 9.x names).
    pub privileges: &'static [&'static str],
    /// When they are needed.
    pub need: Need,
    /// The calls that need them.
    pub needed_by: &'static str,
}

/// Every privilege GRS needs, by ACL path (PVE 9.x privilege names).
pub const REQUIRED_PRIVILEGES: &[Grant] = &[
    Grant {
        path: "/vms/{template_vmid}",
        privileges: &["VM.Audit"],
        need: Need::Always,
        needed_by: "GET /cluster/resources (validate finds the template; VMs without VM.Audit are not listed)",
    },
    Grant {
        path: "/vms/{template_vmid}",
        privileges: &["VM.Clone"],
        need: Need::Always,
        needed_by: "POST /nodes/{node}/qemu/{vmid}/clone",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Allocate"],
        need: Need::Always,
        needed_by: "POST .../clone (the new VM), DELETE /nodes/{node}/qemu/{vmid}",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Audit"],
        need: Need::Always,
        needed_by: "GET /cluster/resources (list, get), GET .../qemu/{vmid}/config (ownership marker)",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Config.Options"],
        need: Need::Always,
        needed_by: "PUT .../config: tags (assert_tag_permissions), agent",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Config.HWType"],
        need: Need::Always,
        needed_by: "PUT .../config: smbios1 (the cloud-init seed)",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.PowerMgmt"],
        need: Need::Always,
        needed_by: "POST .../status/start, POST .../status/stop",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Config.CPU"],
        need: Need::Cores,
        needed_by: "PUT .../config: cores",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Config.Memory"],
        need: Need::Memory,
        needed_by: "PUT .../config: memory",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.Config.Network"],
        need: Need::Bridge,
        needed_by: "PUT .../config: net0",
    },
    Grant {
        path: "/vms/{newid}",
        privileges: &["VM.GuestAgent.Unrestricted"],
        need: Need::GuestAgent,
        needed_by: "POST .../agent/exec (also covers agent/ping and agent/file-write); PVE 7.4 and 8.x: VM.Monitor instead",
    },
    Grant {
        path: "/nodes/{node}",
        privileges: &["Sys.Audit"],
        need: Need::Always,
        needed_by: "GET /cluster/resources: node memory for placement (hidden without it)",
    },
    Grant {
        path: "/storage/{storage}",
        privileges: &["Datastore.AllocateSpace", "Datastore.Audit"],
        need: Need::Always,
        needed_by: "POST .../clone (every storage the clone's disks go to); GET /cluster/resources: the storage's `shared` flag, checked at start-up (hidden without Datastore.Audit)",
    },
    Grant {
        path: "/sdn/zones/localnetwork/{bridge}",
        privileges: &["SDN.Use"],
        need: Need::Pve8,
        needed_by: "POST .../clone (the template's bridges), PUT .../config: net0 without vlan",
    },
    Grant {
        path: "/sdn/zones/localnetwork/{bridge}/{vlan}",
        privileges: &["SDN.Use"],
        need: Need::Bridge,
        needed_by: "PUT .../config: net0 with vlan (PVE 8.0 and later)",
    },
    Grant {
        path: "/pool/{resource_pool}",
        privileges: &["Pool.Audit"],
        need: Need::ResourcePool,
        needed_by: "GET /pools?poolid= (validate: the pool exists; invisible without it)",
    },
];

/// The privileges of the `GRS` role: every privilege of
/// [`REQUIRED_PRIVILEGES`], sorted.
pub fn role_privileges() -> BTreeSet<&'static str> {
    REQUIRED_PRIVILEGES
        .iter()
        .flat_map(|g| g.privileges.iter().copied())
        .collect()
}

/// The role's privileges on PVE major version `major`: the names changed.
/// PVE 9.0 split `VM.Monitor` into `VM.GuestAgent.*` (pve-access-control
/// "add VM.GuestAgent privileges" and "privileges: drop VM.Monitor";
/// qemu-server b92a40ce), so 7.4 and 8.x need `VM.Monitor` for the agent
/// calls; `SDN.Use` exists since 8.0 (pve-access-control a62d78d), and 7.4
/// does not check bridges.
pub fn role_privileges_for(major: u32) -> BTreeSet<&'static str> {
    let mut privs = role_privileges();
    if major < 9 && privs.remove("VM.GuestAgent.Unrestricted") {
        privs.insert("VM.Monitor");
    }
    if major < 8 {
        privs.remove("SDN.Use");
    }
    privs
}

/// `pveum` commands creating the role, a user with a token, and the ACLs,
/// for a setup where GRS's VMs and the template live in PVE resource pool
/// `grs` (`resource_pool = "grs"`): ACLs on a pool apply to its members, so
/// the token can touch no VM outside it. Storage `local-lvm` and bridge
/// `vmbr0` stand for the template's storages and bridges.
pub fn pveum_commands() -> String {
    let privs: Vec<&str> = role_privileges_for(9).into_iter().collect();
    format!(
        "pveum role add GRS -privs \"{}\"\n\
         pveum user add grs@pve -comment \"GitHub Runner Scaler\"\n\
         pveum user token add grs@pve scaler -privsep 0\n\
         pveum pool add grs -comment \"GRS runner VMs\"\n\
         pveum pool modify grs -vms 9000\n\
         pveum acl modify /pool/grs -user grs@pve -role GRS\n\
         pveum acl modify /nodes -user grs@pve -role GRS\n\
         pveum acl modify /storage/local-lvm -user grs@pve -role GRS\n\
         pveum acl modify /sdn/zones/localnetwork/vmbr0 -user grs@pve -role GRS\n",
        privs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_lists_each_privilege_once_and_only_real_names() {
        let all: Vec<&str> = REQUIRED_PRIVILEGES
            .iter()
            .flat_map(|g| g.privileges.iter().copied())
            .collect();
        let role = role_privileges();
        assert!(role.len() <= all.len());
        for p in &role {
            assert!(
                p.split('.').count() >= 2
                    && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'),
                "{p}"
            );
        }
        assert!(pveum_commands().contains("VM.Clone,VM.Config.CPU"));
    }

    #[test]
    fn older_pve_versions_get_their_own_privilege_names() {
        let v9 = role_privileges_for(9);
        assert!(v9.contains("VM.GuestAgent.Unrestricted") && v9.contains("SDN.Use"));
        assert!(!v9.contains("VM.Monitor"));
        let v8 = role_privileges_for(8);
        assert!(v8.contains("VM.Monitor") && v8.contains("SDN.Use"));
        assert!(!v8.contains("VM.GuestAgent.Unrestricted"));
        let v7 = role_privileges_for(7);
        assert!(v7.contains("VM.Monitor") && !v7.contains("SDN.Use"));
        assert_eq!(v9.len(), v8.len());
        assert_eq!(v7.len() + 1, v8.len());
    }
}
