//! [`ProxmoxProvisioner`]: the `Provisioner` trait over the PVE API.
//!
//! # The ownership marker
//! Every VM GRS makes carries, from the clone request on, a description
//! with a machine-readable line
//!
//! ```text
//! grs-owner: {"installation":"<id>","pool":"<pool>","job":<job id>,"created":<unix s>}
//! ```
//!
//! and, once configured, the tags `grs;grs-i-<installation>;grs-p-<pool>;
//! grs-j-<job>;grs-t-<created>;grs-v-<vmid>`. Tags make `list`/`get` one
//! call (`/cluster/resources` shows tags, not descriptions); destructive
//! calls (`delete`, `stop`, `start`) also read the description and act only
//! when its installation and pool match exactly. A VM GRS did not mark is
//! never stopped or deleted, whatever its name; a template never.
//!
//! # What a clone inherits
//! PVE's clone copies every option of the template but a short skip list
//! (qemu-server `PVE/API2/Qemu.pm`, `clone_vm`): `tags`, `protection`,
//! `description` (unless the request names one), `onboot`, ... So tags prove
//! nothing by themselves: a clone whose configuration never happened (crash,
//! cancel, a clone request that timed out) carries whatever tags the
//! template has, GRS's own ones included when the template was made from a
//! GRS VM. The tag `grs-v-<vmid>` names the VM's OWN id, which no template
//! can have handed down: only a VM carrying it was configured by GRS (the
//! tags, the seed and `protection=0` go in one `PUT config`). Ownership
//! comes from the description GRS wrote in the clone request, readiness
//! from that tag; a VM without it is never started, only replaced. An
//! inherited `protection=1` is cleared in the same `PUT`, and by `delete`
//! on an owned VM that still has it.
//!
//! # Create, step by step
//! 1. One `/cluster/resources` call: is the name taken (ours: return it;
//!    foreign: `NotOwned`), and which node has room ([`crate::placement`]).
//! 2. A VM id: `nextid`, skipping ids other creates of this process hold
//!    (nextid reserves nothing); an id taken meanwhile by someone else makes
//!    PVE refuse the clone, and GRS picks again.
//! 3. Clone (linked by default) with name and marker description; wait.
//! 4. One `PUT config`: tags, SMBIOS serial (cloud-init), cores, memory,
//!    `net0`, agent.
//! 5. Start; wait. Guest-agent mode: wait for the agent, write the runner
//!    config, run the runner.
//!
//! # Guarantees
//! - **Idempotent:** a second create of a running instance returns it; a
//!   delete of an absent one succeeds.
//! - **Clean failure:** a create that fails after the clone destroys the VM
//!   before returning.
//! - **Cancellation:** every `.await` is a cancellation point. A create
//!   dropped half-way can leave a VM, but that VM carries the marker from its
//!   first moment (the clone request sets the description), so `get`, `list`
//!   and `delete` see it: `list` also reads the description of unmarked VMs
//!   named with our prefix.
//! - **No secret in logs or errors:** the seed URL and the runner config are
//!   sent as sensitive parameters (scrubbed from errors, never logged).

//!
//! Layout: this module holds the provisioner, its connection and
//! validation; `ownership` the marker, tags and finding our VMs; `create`
//! clone, configure and start; `delete` stop and destroy.

mod create;
mod delete;
mod gate;
mod ownership;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use grs_provisioner::{ProvisionerError, validate_instance_name};

use crate::client::{PveClient, Upid};
use crate::config::{BootstrapMode, NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
use crate::error::PveError;
use crate::placement::Placement;

use ownership::tag_safe;
pub use ownership::{MARKER_PREFIX, Marker};

/// What the SMBIOS serial says before the seed URL: cloud-init's NoCloud
/// datasource in network mode, seed from (`s=`) the URL that follows.
pub const SEED_PREFIX: &str = "ds=nocloud-net;s=";

/// What one PVE connection shares between the pools using it: the client,
/// the placement reservations and the VM ids in flight. One per
/// [`ProxmoxBackend`](crate::ProxmoxBackend) (so per-node limits hold across
/// its pools); nothing is shared between backends, and there is no
/// process-wide registry.
#[derive(Debug)]
pub(crate) struct Backend {
    client: PveClient,
    placement: Placement,
    vmids: Mutex<BTreeSet<u32>>,
    /// Clones in flight per template (see [`gate`]).
    gates: gate::CloneGates,
    /// The installation's node reservations, when the control plane gave
    /// them ([`grs_provisioner::Provisioner::use_node_ledger`]).
    pub(crate) ledger: Mutex<Option<Arc<dyn grs_provisioner::NodeLedger>>>,
}

impl Backend {
    /// A client for `conn` (validated by the caller), reading its token
    /// secret; makes no request.
    pub(crate) fn connect(conn: &ProxmoxConfig) -> Result<Arc<Self>, ProvisionerError> {
        let client = PveClient::new(conn).map_err(|e| ProvisionerError::Config(e.to_string()))?;
        Ok(Arc::new(Self {
            client,
            placement: Placement::default(),
            vmids: Mutex::new(BTreeSet::new()),
            gates: gate::CloneGates::default(),
            ledger: Mutex::new(None),
        }))
    }
}

/// A VM id held by a create in flight; released when dropped.
struct VmidLease<'a> {
    backend: &'a Backend,
    vmid: u32,
}

impl Drop for VmidLease<'_> {
    fn drop(&mut self) {
        self.backend.vmids.lock().unwrap().remove(&self.vmid);
    }
}

impl Backend {
    /// `nextid`, then the first id at or above it that no create of this
    /// process holds and that is not in `taken` (ids the caller found taken:
    /// `nextid` is the LOWEST free id, the ones above it may be in use, and
    /// an id held here may not exist in PVE, e.g. while its clone task fails
    /// on a lock).
    async fn lease_vmid(&self, taken: &BTreeSet<u32>) -> Result<VmidLease<'_>, PveError> {
        let next = self.client.nextid().await?;
        let mut held = self.vmids.lock().unwrap();
        let mut id = next.max(100);
        while held.contains(&id) || taken.contains(&id) {
            id += 1;
        }
        held.insert(id);
        Ok(VmidLease {
            backend: self,
            vmid: id,
        })
    }
}

/// The Proxmox VE backend for one pool.
pub struct ProxmoxProvisioner {
    backend: Arc<Backend>,
    nodes: Vec<NodeConfig>,
    pool_name: String,
    pool: ProxmoxPoolConfig,
    installation_id: String,
    prefix: String,
    tag_installation: String,
    tag_pool: String,
    /// The nodes the template can be cloned to, once its storages were
    /// checked (see [`ProxmoxProvisioner::check_storage`]); `None` before.
    cloneable: Mutex<Option<Vec<String>>>,
}

impl std::fmt::Debug for ProxmoxProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxmoxProvisioner")
            .field("url", &self.backend.client.url())
            .field("pool", &self.pool_name)
            .field("node", &self.pool.node)
            .field("template_vmid", &self.pool.template_vmid)
            .finish_non_exhaustive()
    }
}

impl ProxmoxProvisioner {
    /// A provisioner for pool `pool_name` with a connection of its own.
    /// Validates both configurations and reads the token secret; makes no
    /// request (see [`validate`](Self::validate)). Pools that share a PVE
    /// connection (and its per-node limits) are served by one
    /// [`ProxmoxBackend`](crate::ProxmoxBackend) instead, or made with
    /// [`sibling`](Self::sibling).
    pub fn new(
        conn: &ProxmoxConfig,
        pool_name: &str,
        pool: &ProxmoxPoolConfig,
        installation_id: &str,
        prefix: &str,
    ) -> Result<Self, ProvisionerError> {
        conn.validate()
            .map_err(|e| ProvisionerError::Config(e.to_string()))?;
        pool.validate(pool_name)
            .map_err(|e| ProvisionerError::Config(e.to_string()))?;
        if installation_id.trim().is_empty() {
            return Err(ProvisionerError::Config(
                "installation id must not be empty".into(),
            ));
        }
        validate_instance_name(prefix).map_err(|m| {
            ProvisionerError::Config(format!("instance prefix {prefix:?} is not usable: {m}"))
        })?;
        let backend = Backend::connect(conn)?;
        if conn.insecure_skip_verify {
            tracing::warn!(
                pool = pool_name,
                "PVE TLS verification is OFF for this pool"
            );
        }
        Ok(Self::with_backend(
            backend,
            conn.nodes.clone(),
            pool_name,
            pool,
            installation_id,
            prefix,
        ))
    }

    /// A provisioner over an existing connection. The caller has validated
    /// every argument.
    pub(crate) fn with_backend(
        backend: Arc<Backend>,
        nodes: Vec<NodeConfig>,
        pool_name: &str,
        pool: &ProxmoxPoolConfig,
        installation_id: &str,
        prefix: &str,
    ) -> Self {
        Self {
            backend,
            nodes,
            pool_name: pool_name.to_owned(),
            pool: pool.clone(),
            installation_id: installation_id.to_owned(),
            prefix: prefix.to_owned(),
            tag_installation: format!("grs-i-{}", tag_safe(installation_id)),
            tag_pool: format!("grs-p-{}", tag_safe(pool_name)),
            cloneable: Mutex::new(None),
        }
    }

    /// A provisioner for another pool over this one's connection (client,
    /// placement and VM ids in flight are shared). Validates `pool`.
    pub fn sibling(
        &self,
        pool_name: &str,
        pool: &ProxmoxPoolConfig,
    ) -> Result<Self, ProvisionerError> {
        pool.validate(pool_name)
            .map_err(|e| ProvisionerError::Config(e.to_string()))?;
        Ok(Self::with_backend(
            self.backend.clone(),
            self.nodes.clone(),
            pool_name,
            pool,
            &self.installation_id,
            &self.prefix,
        ))
    }

    /// How many clones of this pool's template GRS runs at once now (learned,
    /// see the `gate` module).
    pub fn clone_concurrency(&self) -> usize {
        self.backend
            .gates
            .of(&self.pool.node, self.pool.template_vmid)
            .limit()
    }

    /// How the pool's VMs take their runner registration (its `bootstrap`).
    pub fn bootstrap(&self) -> BootstrapMode {
        self.pool.bootstrap
    }

    /// The pool this provisioner serves.
    pub fn pool_name(&self) -> &str {
        &self.pool_name
    }

    /// The API client (for tests and tools: request counting, recording).
    pub fn client(&self) -> &PveClient {
        &self.backend.client
    }

    fn client_ref(&self) -> &PveClient {
        &self.backend.client
    }

    /// Where a VM placed on `target` is cloned from: the template's copy on
    /// that node (`template_replicas`), else the template.
    pub(crate) fn source_for<'a>(&'a self, target: &str) -> (&'a str, u32) {
        match self.pool.template_replicas.get_key_value(target) {
            Some((node, vmid)) => (node, *vmid),
            None => (&self.pool.node, self.pool.template_vmid),
        }
    }

    /// The nodes a new VM may go to: the configured ones, narrowed to those
    /// the template can be cloned to once its storage was checked.
    pub(crate) fn candidates(&self) -> Vec<String> {
        if let Some(t) = &self.pool.target_node {
            return vec![t.clone()];
        }
        if self.nodes.is_empty() {
            return vec![self.pool.node.clone()];
        }
        if let Some(c) = self.cloneable.lock().unwrap().as_ref() {
            return c.clone();
        }
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Checks that every node this pool may place on can receive clones of
    /// the template, and remembers which can. PVE clones to another node
    /// only when every disk of the template is on shared storage (qemu-server
    /// `PVE/API2/Qemu.pm` `clone_vm`: `can't clone VM to node 'X' (VM uses
    /// local storage)`), and a full clone's `storage` must be shared too
    /// (`can't clone to non-shared storage 'X'`). A config that names only
    /// nodes the template cannot reach is refused, naming the storage; one
    /// that also lists the template's node places there only (with a
    /// warning). Two calls: the template's config, the storages.
    async fn check_storage(&self) -> Result<(), ProvisionerError> {
        let client = self.client_ref();
        let (node, vmid) = (&self.pool.node, self.pool.template_vmid);
        let cfg = client.vm_config(node, vmid).await?;
        let storages = client.resources(Some("storage")).await?;
        // `/cluster/resources` lists a storage only to a token with
        // `Datastore.Audit` on it (pve-manager `PVE/API2/Cluster.pm`,
        // `resources`): one it does not list cannot be judged, and is not
        // held against the config (PVE will say at clone time).
        let visible = |sid: &str| storages.iter().any(|r| r.storage.as_deref() == Some(sid));
        let local_storage = |sid: &str| {
            if !visible(sid) {
                tracing::warn!(pool = %self.pool_name, storage = sid, "cannot tell whether storage {sid} is shared: the API token does not see it (Datastore.Audit on /storage/{sid}); clones to other nodes fail if it is not");
                return false;
            }
            !storages
                .iter()
                .any(|r| r.storage.as_deref() == Some(sid) && r.shared)
        };
        let mut local: Vec<(String, String)> = template_disks(&cfg)
            .into_iter()
            .filter(|(_, sid)| local_storage(sid))
            .collect();
        if self.pool.full_clone
            && let Some(sid) = &self.pool.storage
            && local_storage(sid)
        {
            local.push(("storage".into(), sid.clone()));
        }
        let wanted = match &self.pool.target_node {
            Some(t) => vec![t.clone()],
            None if self.nodes.is_empty() => vec![node.clone()],
            None => self.nodes.iter().map(|n| n.name.clone()).collect(),
        };
        let Some((key, sid)) = local.first() else {
            *self.cloneable.lock().unwrap() = Some(wanted);
            return Ok(());
        };
        // A node with its own copy of the template clones locally.
        let others: Vec<&String> = wanted
            .iter()
            .filter(|n| *n != node && !self.pool.template_replicas.contains_key(*n))
            .collect();
        let (what, pve_says) = if key == "storage" {
            (
                format!(
                    "the full clone's target storage '{sid}' (pools.{}.proxmox.storage)",
                    self.pool_name
                ),
                format!("can't clone to non-shared storage '{sid}'"),
            )
        } else {
            (
                format!("its disk {key} is on storage '{sid}'"),
                format!(
                    "can't clone VM to node '{}' (VM uses local storage)",
                    others.first().map(|s| s.as_str()).unwrap_or("")
                ),
            )
        };
        if others.is_empty() {
            *self.cloneable.lock().unwrap() = Some(wanted);
            return Ok(());
        }
        if !wanted.contains(node) {
            let key_name = if self.pool.target_node.is_some() {
                format!("pools.{}.proxmox.target_node", self.pool_name)
            } else {
                "proxmox.nodes".to_owned()
            };
            return Err(ProvisionerError::Config(format!(
                "{key_name}: template {vmid} on node {node} cannot be cloned to node {}: {what}, which is not shared, and PVE clones to another node only with shared storage (PVE: {pve_says:?}); put the template's disks (qm disk move {vmid} <disk> <shared storage>) and clones on shared storage, or place on node {node}",
                others[0]
            )));
        }
        tracing::warn!(
            pool = %self.pool_name,
            template = vmid,
            storage = %sid,
            "the template is on storage that is not shared: new VMs go to node {node} (and nodes with a copy of the template) only, not to {}",
            others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
        let reachable = wanted
            .iter()
            .filter(|n| *n == node || self.pool.template_replicas.contains_key(*n))
            .cloned()
            .collect();
        *self.cloneable.lock().unwrap() = Some(reachable);
        Ok(())
    }

    pub(super) async fn run_task(&self, upid: Upid) -> Result<(), PveError> {
        self.client_ref().wait_task(&upid).await
    }

    /// Token works, nodes exist, the template exists and fits the clone mode.
    pub async fn validate(&self) -> Result<(), ProvisionerError> {
        let client = self.client_ref();
        client.version().await?;
        let nodes = client.nodes().await?;
        let known: HashSet<&str> = nodes.iter().filter_map(|n| n.node.as_deref()).collect();
        let mut wanted: Vec<(&str, String)> = vec![("node", self.pool.node.clone())];
        if let Some(t) = &self.pool.target_node {
            wanted.push(("target_node", t.clone()));
        }
        for (key, n) in wanted {
            if !known.contains(n.as_str()) {
                return Err(ProvisionerError::Config(format!(
                    "pools.{}.proxmox.{key}: node {n:?} is not in the cluster at {} (nodes: {})",
                    self.pool_name,
                    client.url(),
                    known.iter().copied().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        for n in &self.nodes {
            if !known.contains(n.name.as_str()) {
                return Err(ProvisionerError::Config(format!(
                    "proxmox.nodes: node {:?} is not in the cluster at {}",
                    n.name,
                    client.url()
                )));
            }
        }
        if let Some(rp) = &self.pool.resource_pool
            && !client.resource_pool_exists(rp).await?
        {
            return Err(ProvisionerError::Config(format!(
                "pools.{}.proxmox.resource_pool: PVE resource pool {rp:?} does not exist at {}",
                self.pool_name,
                client.url()
            )));
        }
        let (node, vmid) = (&self.pool.node, self.pool.template_vmid);
        // `/cluster/resources` knows every guest of the cluster and whether
        // it is a template, wherever it lives.
        let guests = client.resources(Some("vm")).await?;
        let key = format!("pools.{}.proxmox.template_vmid", self.pool_name);
        let Some(t) = guests.iter().find(|r| r.vmid == Some(vmid)) else {
            return Err(ProvisionerError::Config(format!(
                "{key}: template VM {vmid} does not exist on node {node} (nor anywhere in the cluster at {})",
                client.url()
            )));
        };
        if t.node.as_deref() != Some(node.as_str()) {
            return Err(ProvisionerError::Config(format!(
                "{key}: VM {vmid} is on node {}, not on node {node}",
                t.node.as_deref().unwrap_or("?")
            )));
        }
        if !t.is_vm() {
            return Err(ProvisionerError::Config(format!(
                "{key}: guest {vmid} on node {node} is a container, not a QEMU VM"
            )));
        }
        if !t.template && !self.pool.full_clone {
            return Err(ProvisionerError::Config(format!(
                "{key}: VM {vmid} on node {node} is not a template, and a linked clone needs one; convert it (qm template {vmid}) or set full_clone = true"
            )));
        }
        for (rnode, rvmid) in &self.pool.template_replicas {
            let key = format!("pools.{}.proxmox.template_replicas.{rnode}", self.pool_name);
            let Some(r) = guests.iter().find(|r| r.vmid == Some(*rvmid)) else {
                return Err(ProvisionerError::Config(format!(
                    "{key}: VM {rvmid} does not exist in the cluster at {}",
                    client.url()
                )));
            };
            if r.node.as_deref() != Some(rnode.as_str()) || !r.is_vm() {
                return Err(ProvisionerError::Config(format!(
                    "{key}: guest {rvmid} is not a QEMU VM on node {rnode} (it is a {} on node {})",
                    r.kind,
                    r.node.as_deref().unwrap_or("?")
                )));
            }
            if !r.template && !self.pool.full_clone {
                return Err(ProvisionerError::Config(format!(
                    "{key}: VM {rvmid} on node {rnode} is not a template, and a linked clone needs one (qm template {rvmid})"
                )));
            }
        }
        self.check_storage().await?;
        tracing::info!(pool = %self.pool_name, node = %node, template = vmid, url = client.url(), "Proxmox pool validated");
        Ok(())
    }
}

/// The disks of a VM config as (key, storage id), as qemu-server's
/// `clone_vm` sees them: drives except CD-ROMs (a cloud-init drive counts),
/// not `unusedN`.
pub(crate) fn template_disks(
    cfg: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(String, String)> {
    cfg.iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?)))
        .filter(|(k, v)| {
            let bus = k.trim_end_matches(|c: char| c.is_ascii_digit());
            let drive = matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus.len() < k.len()
                || matches!(k.as_str(), "efidisk0" | "tpmstate0");
            drive
                && (!v.contains("media=cdrom") || v.contains("cloudinit"))
                && !v.starts_with("none")
        })
        .filter_map(|(k, v)| {
            v.split_once(':')
                .map(|(sid, _)| (k.clone(), sid.to_owned()))
        })
        .collect()
}
