//! The simulated cluster: nodes, VMs, storages, tasks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;

use super::faults::Faults;
use super::{MIB, SimOptions};
use crate::schema::ApiSchema;

/// A simulated node.
#[derive(Debug, Clone)]
pub struct SimNode {
    /// Node name.
    pub name: String,
    /// Total memory, bytes.
    pub maxmem: u64,
    /// Memory the host itself uses, bytes.
    pub base_mem: u64,
    /// CPUs.
    pub maxcpu: u32,
    /// Reachable?
    pub online: bool,
}

/// A simulated VM.
#[derive(Debug, Clone)]
pub struct SimVm {
    /// VM id.
    pub vmid: u32,
    /// The node it is on.
    pub node: String,
    /// A template?
    pub template: bool,
    /// Running?
    pub running: bool,
    /// Its configuration (`name`, `tags`, `description`, `smbios1`, ...).
    pub config: BTreeMap<String, String>,
    /// Config lock (`clone`).
    pub lock: Option<String>,
    /// When the guest agent answers (running VMs with `agent: enabled=1`).
    pub agent_ready_at: Option<Instant>,
    /// Files written through the agent: (path, content).
    pub agent_files: Vec<(String, String)>,
    /// Commands run through the agent.
    pub agent_execs: Vec<Vec<String>>,
    /// A destroy freed its disks but died before removing its config.
    pub disks_freed: bool,
}

/// A simulated storage (one entry of `storage.cfg`, content `images`).
#[derive(Debug, Clone)]
pub struct SimStorage {
    /// Storage id.
    pub id: String,
    /// Shared between nodes (RBD, NFS, ...): needed for clones to another
    /// node.
    pub shared: bool,
    /// Reachable? (An NFS share that is down: `storage 'X' is not online`.)
    pub online: bool,
    /// The plugin (`lvmthin`, `rbd`, `nfs`, ...).
    pub plugintype: String,
}

impl SimVm {
    /// The VM's name.
    pub fn name(&self) -> &str {
        self.config.get("name").map(String::as_str).unwrap_or("")
    }

    /// The `serial=` of its `smbios1` (base64, as PVE keeps it), if any:
    /// where a cloud-init seed URL goes.
    pub fn smbios_serial(&self) -> Option<&str> {
        self.config
            .get("smbios1")?
            .split(',')
            .find_map(|kv| kv.strip_prefix("serial="))
    }
    pub(super) fn memory_bytes(&self) -> u64 {
        let m = self
            .config
            .get("memory")
            .map(String::as_str)
            .unwrap_or("512");
        let m = m.strip_prefix("current=").unwrap_or(m);
        m.split(',')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(512)
            * MIB
    }
    pub(super) fn cores(&self) -> u32 {
        self.config
            .get("cores")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
    }
    pub(super) fn agent_enabled(&self) -> bool {
        self.config.get("agent").is_some_and(|a| {
            let first = a.split(',').next().unwrap_or("");
            matches!(first, "1" | "enabled=1")
        })
    }
}

#[derive(Debug)]
pub(super) struct SimTask {
    pub(super) node: String,
    pub(super) kind: String,
    pub(super) id: String,
    pub(super) user: String,
    pub(super) starttime: u64,
    pub(super) pid: u32,
    pub(super) exitstatus: Option<String>,
    pub(super) log: Vec<String>,
    pub(super) invisible_polls: u32,
    /// The VM the task is about: its `id`, except for a clone, whose `id`
    /// is the source and whose VM is the new one.
    pub(super) vmid: u32,
    /// When the task was created (its UPID returned).
    pub(super) created: Instant,
    /// When it ended, either way.
    pub(super) ended: Option<Instant>,
}

#[derive(Debug, Default)]
pub(super) struct SimState {
    pub(super) nodes: BTreeMap<String, SimNode>,
    pub(super) vms: BTreeMap<u32, SimVm>,
    pub(super) storages: BTreeMap<String, SimStorage>,
    pub(super) tasks: HashMap<String, SimTask>,
    pub(super) faults: Faults,
    pub(super) requests: u64,
    pub(super) by_endpoint: BTreeMap<String, u64>,
    pub(super) violations: Vec<String>,
    pub(super) pid: u32,
    pub(super) peak_per_node: BTreeMap<String, usize>,
    pub(super) resource_pools: std::collections::BTreeSet<String>,
    /// The token's ACL (`GET /access/permissions`); `None`: GRS's role on `/`.
    pub(super) token_acl: Option<Vec<super::AclEntry>>,
}

impl SimState {
    pub(super) fn note_peaks(&mut self) {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for vm in self.vms.values().filter(|v| !v.template) {
            *counts.entry(vm.node.clone()).or_default() += 1;
        }
        for (n, c) in counts {
            let p = self.peak_per_node.entry(n).or_default();
            *p = (*p).max(c);
        }
    }
}

pub(super) struct Shared {
    pub(super) opts: SimOptions,
    pub(super) state: Mutex<SimState>,
    /// The storage locks by lock name (`<node>:/var/lock/pve-manager/pve-storage-<id>`
    /// for local storage, `cfs:storage-<id>` for shared storage), see
    /// [`SimOptions::storage_lock_share`].
    pub(super) storage_locks: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub(super) schema: &'static ApiSchema,
}
