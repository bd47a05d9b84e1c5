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

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use grs_provisioner::{
    Bootstrap, Instance, InstanceSpec, InstanceState, ProvisionerError, validate_instance_name,
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::client::{Param, PveClient, Resource, Upid};
use crate::config::{BootstrapMode, NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
use crate::error::PveError;
use crate::placement::{self, Placement};

/// What the SMBIOS serial says before the seed URL: cloud-init's NoCloud
/// datasource in network mode, seed from (`s=`) the URL that follows.
pub const SEED_PREFIX: &str = "ds=nocloud-net;s=";

/// Prefix of the machine-readable marker line in a VM's description.
pub const MARKER_PREFIX: &str = "grs-owner: ";

/// The ownership marker, as written in the description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The GRS installation that made the VM.
    pub installation: String,
    /// Its pool.
    pub pool: String,
    /// The job it was made for.
    pub job: u64,
    /// Unix seconds of creation.
    pub created: u64,
}

impl Marker {
    /// The description text carrying this marker.
    pub fn description(&self) -> String {
        format!(
            "Made by GRS (GitHub Runner Scaler) for a single job; deleted when the job ends.\n\
             Do not edit the next line: GRS only touches VMs that carry it.\n\
             {MARKER_PREFIX}{}\n",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// The marker of a description, if it has one.
    pub fn parse(description: &str) -> Option<Self> {
        description
            .lines()
            .find_map(|l| l.trim().strip_prefix(MARKER_PREFIX))
            .and_then(|j| serde_json::from_str(j.trim()).ok())
    }
}

/// Makes `s` usable inside a PVE tag (`[a-z0-9_][a-z0-9_\-+.]*`). When that
/// changes `s` (case, other characters), a short digest of the original is
/// appended, so `Prod` and `prod` get different tags.
fn tag_safe(s: &str) -> String {
    use sha2::Digest;
    let safe: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe == s {
        safe
    } else {
        let digest = hex::encode(sha2::Sha256::digest(s.as_bytes()));
        format!("{safe}-{}", &digest[..8])
    }
}

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

/// One of our VMs as found in the cluster.
#[derive(Debug, Clone)]
struct Found {
    node: String,
    vmid: u32,
    res: Resource,
    /// From the description, when it was read.
    marker: Option<Marker>,
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

    /// The nodes a new VM may go to: the configured ones, narrowed to those
    /// the template can be cloned to once its storage was checked.
    fn candidates(&self) -> Vec<String> {
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
        let others: Vec<&String> = wanted.iter().filter(|n| *n != node).collect();
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
            "the template is on storage that is not shared: new VMs go to node {node} only, not to {}",
            others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
        *self.cloneable.lock().unwrap() = Some(vec![node.clone()]);
        Ok(())
    }

    /// Ours and configured, by tags alone: installation, pool and the
    /// VM's own id (which no template hands down, see the module docs).
    fn owns_by_tags(&self, r: &Resource) -> bool {
        let tags = r.tag_list();
        tags.contains(&self.tag_installation.as_str())
            && tags.contains(&self.tag_pool.as_str())
            && configured(r)
    }

    fn owns_marker(&self, m: &Marker) -> bool {
        m.installation == self.installation_id && m.pool == self.pool_name
    }

    /// A VM named with our prefix that GRS has not configured (no tag with
    /// its own id; tags a template handed down do not count): possibly one
    /// of ours whose create stopped before its configuration. Its
    /// description tells.
    fn maybe_partial(&self, r: &Resource) -> bool {
        r.name
            .as_deref()
            .is_some_and(|n| n.starts_with(&format!("{}-", self.prefix)))
            && !configured(r)
    }

    fn instance(&self, f: &Found) -> Instance {
        // Tags GRS did not write (inherited from the template) say nothing
        // about this VM: the marker it got in the clone request does.
        let tag_num = |p: &str| {
            configured(&f.res)
                .then(|| {
                    f.res
                        .tag_list()
                        .iter()
                        .find_map(|t| t.strip_prefix(p).and_then(|v| v.parse::<u64>().ok()))
                })
                .flatten()
        };
        let job_id = tag_num("grs-j-").or(f.marker.as_ref().map(|m| m.job));
        let created = tag_num("grs-t-").or(f.marker.as_ref().map(|m| m.created));
        let state = if f.res.lock.as_deref() == Some("clone") || !configured(&f.res) {
            InstanceState::Creating
        } else {
            match f.res.status.as_deref() {
                Some("running") => InstanceState::Running,
                Some("stopped") => InstanceState::Stopped,
                _ => InstanceState::Error,
            }
        };
        Instance {
            name: f.res.name.clone().unwrap_or_default(),
            provider_id: format!("{}/{}", f.node, f.vmid),
            pool: self.pool_name.clone(),
            job_id,
            state,
            location: Some(f.node.clone()),
            created_at: created.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    /// Reads the marker of a VM; `None` when it has none or is gone.
    async fn read_marker(&self, node: &str, vmid: u32) -> Result<Option<(Marker, bool)>, PveError> {
        match self.client_ref().vm_config(node, vmid).await {
            Ok(cfg) => {
                let template = cfg
                    .get("template")
                    .is_some_and(|v| v.as_i64() == Some(1) || v.as_str() == Some("1"));
                Ok(cfg
                    .get("description")
                    .and_then(|d| d.as_str())
                    .and_then(Marker::parse)
                    .map(|m| (m, template)))
            }
            Err(e) if e.is_vm_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `name` has this installation's instance prefix. GRS touches
    /// a VM only if its name has the prefix AND it carries the marker.
    fn has_prefix(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with('-') && rest.len() > 1)
    }

    /// Splits the VMs named `name` in `snapshot` into ours and foreign ones.
    /// Ours by tags, or (unmarked, prefixed) by description; a name without
    /// our prefix is never ours.
    async fn classify(
        &self,
        name: &str,
        snapshot: &[Resource],
    ) -> Result<(Vec<Found>, usize), PveError> {
        let mut ours = Vec::new();
        let mut foreign = 0;
        if !self.has_prefix(name) {
            let n = snapshot
                .iter()
                .filter(|r| r.is_vm() && r.name.as_deref() == Some(name))
                .count();
            return Ok((ours, n));
        }
        for r in snapshot
            .iter()
            .filter(|r| r.is_vm() && r.name.as_deref() == Some(name))
        {
            let (Some(node), Some(vmid)) = (r.node.clone(), r.vmid) else {
                continue;
            };
            if r.template {
                foreign += 1;
                continue;
            }
            if self.owns_by_tags(r) {
                ours.push(Found {
                    node,
                    vmid,
                    res: r.clone(),
                    marker: None,
                });
            } else if self.maybe_partial(r) {
                match self.read_marker(&node, vmid).await? {
                    Some((m, false)) if self.owns_marker(&m) => ours.push(Found {
                        node,
                        vmid,
                        res: r.clone(),
                        marker: Some(m),
                    }),
                    _ => foreign += 1,
                }
            } else {
                foreign += 1;
            }
        }
        Ok((ours, foreign))
    }

    /// Our VM named `name` for a destructive call, its marker verified from
    /// the description. `Ok(None)`: nothing of that name exists.
    async fn find_owned_verified(
        &self,
        name: &str,
    ) -> Result<Option<Vec<Found>>, ProvisionerError> {
        let snapshot = self.client_ref().resources(Some("vm")).await?;
        let (ours, foreign) = self.classify(name, &snapshot).await?;
        if ours.is_empty() {
            if foreign > 0 {
                return Err(ProvisionerError::NotOwned { name: name.into() });
            }
            return Ok(None);
        }
        let mut verified = Vec::new();
        for mut f in ours {
            if f.marker.is_none() {
                match self.read_marker(&f.node, f.vmid).await? {
                    Some((m, false)) if self.owns_marker(&m) => f.marker = Some(m),
                    // Vanished since the snapshot: nothing to do.
                    None if !self.vm_exists(&f).await? => continue,
                    // Our tags, but not our description (copied tags, a
                    // template): refuse.
                    _ => return Err(ProvisionerError::NotOwned { name: name.into() }),
                }
            }
            verified.push(f);
        }
        Ok(Some(verified))
    }

    async fn vm_exists(&self, f: &Found) -> Result<bool, PveError> {
        match self.client_ref().vm_config(&f.node, f.vmid).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_vm_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn run_task(&self, upid: Upid) -> Result<(), PveError> {
        self.client_ref().wait_task(&upid).await
    }

    /// Hard stop; a stopped or absent VM is fine.
    async fn stop_vm(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        match self.client_ref().vm_action(node, vmid, "stop").await {
            Ok(upid) => self.run_task(upid).await,
            Err(e) if e.is_vm_missing() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stop if needed, then destroy with purge; absent is success. Only
    /// for VMs whose marker was verified: an inherited `protection=1` (see
    /// the module docs) is cleared on the way.
    async fn destroy_vm(&self, node: &str, vmid: u32, running: bool) -> Result<(), PveError> {
        if running {
            self.stop_vm(node, vmid).await?;
        }
        let mut unprotected = false;
        let mut lock_waits = 0u32;
        let mut restops = 0u32;
        loop {
            match self.client_ref().destroy(node, vmid).await {
                Ok(upid) => match self.run_task(upid).await {
                    Err(e) if e.is_vm_missing() => return Ok(()),
                    // The config lock is checked inside the destroy worker
                    // (qemu-server `PVE/QemuServer.pm` `destroy_vm`:
                    // `check_lock`): a clone or backup still holding it.
                    Err(e) if e.is_lock_conflict() && lock_waits < 20 => {
                        lock_waits += 1;
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(lock_waits)))
                            .await;
                    }
                    other => return other,
                },
                Err(e) if e.is_vm_missing() => return Ok(()),
                // Started meanwhile (or our snapshot was stale): stop again.
                Err(e) if e.pve_text().contains("is running") && restops < 2 => {
                    restops += 1;
                    self.stop_vm(node, vmid).await?;
                }
                // `check_protection` (qemu-server `destroy_vm`): a
                // protection the clone inherited from its template.
                Err(e) if e.pve_text().contains("protection mode enabled") && !unprotected => {
                    tracing::info!(
                        node,
                        vmid,
                        "clearing the protection flag a clone inherited from its template"
                    );
                    self.client_ref()
                        .set_config(node, vmid, &[Param::flag("protection", false)])
                        .await?;
                    unprotected = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes what a failed create made. Errors are logged, not returned:
    /// the create's own error is what the caller needs; a VM left behind
    /// carries the marker and the reconciler removes it.
    async fn cleanup(&self, name: &str, node: &str, vmid: u32) {
        if let Err(e) = self.destroy_vm(node, vmid, true).await {
            tracing::warn!(instance = name, node, vmid, error = %e, "could not remove the VM of a failed create; it carries the GRS marker and will be removed later");
        } else {
            tracing::info!(
                instance = name,
                node,
                vmid,
                "removed the VM of a failed create"
            );
        }
    }

    /// Parameters of the clone request. Public for the schema check.
    pub fn clone_params(
        &self,
        newid: u32,
        name: &str,
        target: &str,
        marker: &Marker,
    ) -> Vec<Param> {
        let mut p = vec![
            Param::new("newid", newid),
            Param::new("name", name),
            Param::flag("full", self.pool.full_clone),
            Param::new("description", marker.description()),
        ];
        if target != self.pool.node {
            p.push(Param::new("target", target));
        }
        if let Some(pool) = &self.pool.resource_pool {
            p.push(Param::new("pool", pool));
        }
        if let (true, Some(s)) = (self.pool.full_clone, &self.pool.storage) {
            p.push(Param::new("storage", s));
        }
        p
    }

    /// Parameters of the config request after the clone. Public for the
    /// schema check.
    ///
    /// The tags replace whatever the clone inherited and end with
    /// `grs-v-<vmid>`, the proof of configuration; `protection=0` clears an
    /// inherited protection (which would make the VM undeletable).
    pub fn config_params(
        &self,
        spec: &InstanceSpec,
        vmid: u32,
        marker: &Marker,
    ) -> Result<Vec<Param>, ProvisionerError> {
        let tags = [
            "grs".to_owned(),
            self.tag_installation.clone(),
            self.tag_pool.clone(),
            format!("grs-j-{}", marker.job),
            format!("grs-t-{}", marker.created),
            configured_tag(vmid),
        ];
        let mut p = vec![
            Param::new("tags", tags.join(";")),
            Param::flag("protection", false),
        ];
        match &spec.bootstrap {
            Bootstrap::CloudInit { seed_url } => {
                // `nocloud-net`, not `nocloud`: cloud-init before 23.2 (Debian
                // 12 ships 22.4) maps `ds=nocloud` to dsmode local whatever
                // the seed (DataSourceNoCloud.py load_cmdline_data at tag
                // 22.4.2), and its network stage then exits ("[net] Exiting.
                // datasource ... in local mode", cmd/main.py main_init), so the
                // http seed is never applied. `ds=nocloud-net` is network mode
                // in every version (23.2+ also infers it from an http `s=`,
                // commit f146fe717). Proven with the real 22.4 package by
                // tests/tests/cloud_init_real.rs.
                let seed = format!("{SEED_PREFIX}{}", seed_url.expose_secret());
                let b64 = base64::engine::general_purpose::STANDARD.encode(seed);
                let value = format!("uuid={},serial={b64},base64=1", random_uuid());
                if value.len() > 512 {
                    return Err(ProvisionerError::InvalidSpec(format!(
                        "the cloud-init seed URL of {} is too long for the SMBIOS serial ({} of 512 characters)",
                        spec.name,
                        value.len()
                    )));
                }
                p.push(Param::secret("smbios1", value));
            }
            Bootstrap::GuestAgent { .. } => p.push(Param::new("agent", "enabled=1")),
            Bootstrap::None => {}
        }
        if let Some(c) = self.pool.cores {
            p.push(Param::new("cores", c));
        }
        if let Some(m) = self.pool.memory_mib {
            p.push(Param::new("memory", m));
        }
        if let Some(b) = &self.pool.bridge {
            let mut net = format!("{},bridge={b}", self.pool.net_model);
            if let Some(v) = self.pool.vlan {
                net.push_str(&format!(",tag={v}"));
            }
            p.push(Param::new("net0", net));
        }
        Ok(p)
    }

    fn check_spec(&self, spec: &InstanceSpec) -> Result<(), ProvisionerError> {
        validate_instance_name(&spec.name).map_err(ProvisionerError::InvalidSpec)?;
        if !self.has_prefix(&spec.name) {
            return Err(ProvisionerError::InvalidSpec(format!(
                "instance name {} does not start with this installation's prefix {:?}",
                spec.name,
                format!("{}-", self.prefix)
            )));
        }
        if spec.pool != self.pool_name {
            return Err(ProvisionerError::InvalidSpec(format!(
                "instance {} is for pool {:?}, this provisioner serves {:?}",
                spec.name, spec.pool, self.pool_name
            )));
        }
        match (&spec.bootstrap, self.pool.bootstrap) {
            (Bootstrap::None, _)
            | (Bootstrap::CloudInit { .. }, BootstrapMode::CloudInit)
            | (Bootstrap::GuestAgent { .. }, BootstrapMode::GuestAgent) => {}
            (b, mode) => {
                let kind = match b {
                    Bootstrap::CloudInit { .. } => "cloud-init",
                    _ => "guest-agent",
                };
                return Err(ProvisionerError::InvalidSpec(format!(
                    "instance {} asks for {kind} bootstrap but pool {} is configured for {mode:?}",
                    spec.name, self.pool_name
                )));
            }
        }
        if let Bootstrap::GuestAgent {
            content,
            command,
            path,
        } = &spec.bootstrap
        {
            if content.expose_secret().len() > 61440 {
                return Err(ProvisionerError::InvalidSpec(format!(
                    "the runner config for {} is larger than the guest agent's 61440 bytes",
                    spec.name
                )));
            }
            if command.is_empty() || path.is_empty() {
                return Err(ProvisionerError::InvalidSpec(format!(
                    "guest-agent bootstrap of {} needs a path and a command",
                    spec.name
                )));
            }
        }
        Ok(())
    }

    /// Clones into a fresh VM id; returns (node, vmid) of the new VM once the
    /// clone task is done. Nothing is left behind on error.
    async fn clone_fresh(
        &self,
        spec: &InstanceSpec,
        target: &str,
        marker: &Marker,
    ) -> Result<u32, CloneFailure> {
        let client = self.client_ref();
        let src_node = &self.pool.node;
        let src = self.pool.template_vmid;
        let mut lock_waits = 0u32;
        let mut taken = BTreeSet::new();
        for _ in 0..20 {
            let lease = self
                .backend
                .lease_vmid(&taken)
                .await
                .map_err(CloneFailure::from)?;
            let vmid = lease.vmid;
            let params = self.clone_params(vmid, &spec.name, target, marker);
            let upid = match client.clone_vm(src_node, src, &params).await {
                Ok(u) => u,
                Err(e) if e.is_vmid_taken() => {
                    tracing::debug!(instance = %spec.name, vmid, "VM id taken meanwhile; picking another");
                    taken.insert(vmid);
                    continue;
                }
                Err(e) if e.is_lock_timeout() && lock_waits < 10 => {
                    // The client retried already; keep trying a while longer
                    // with a slower pace: parallel clones of one template
                    // contend on its lock. (A config lock such as `backup`
                    // lasts minutes: that goes back to the caller as
                    // transient, to be retried with its longer backoff.)
                    lock_waits += 1;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(lock_waits))).await;
                    continue;
                }
                Err(PveError::Connect {
                    maybe_sent: true, ..
                }) => {
                    // The clone may have started. Adopt it if it is ours.
                    match self.adopt_clone(vmid).await.map_err(CloneFailure::Other)? {
                        Some(()) => return Ok(vmid),
                        None => continue,
                    }
                }
                Err(e) => return Err(e.into()),
            };
            match client.wait_task(&upid).await {
                Ok(()) => return Ok(vmid),
                Err(e) if e.is_vmid_taken() => {
                    taken.insert(vmid);
                    continue;
                }
                Err(e) => {
                    // PVE removes a failed clone's VM itself; make sure.
                    if let Ok(Some((m, false))) = self.read_marker(target, vmid).await
                        && m == *marker
                    {
                        self.cleanup(&spec.name, target, vmid).await;
                    }
                    // Real PVE takes the template's lock and the storage's
                    // cluster lock INSIDE the clone worker (qemu-server
                    // `clone_vm`: `lock_config_shared`; pve-storage
                    // `cluster_lock_storage`): contention is a failed task,
                    // and passes like the synchronous kind.
                    if e.is_lock_timeout() && lock_waits < 10 {
                        lock_waits += 1;
                        tracing::debug!(instance = %spec.name, vmid, error = %e, "clone task hit a lock; trying again");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(lock_waits)))
                            .await;
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
        Err(CloneFailure::Other(ProvisionerError::Transient(format!(
            "could not clone template {src} on node {src_node} for {}: VM ids or locks kept being taken",
            spec.name
        ))))
    }

    /// After an unclear clone request: if VM `vmid` is ours, wait for its
    /// clone lock to go and keep it (`Some`); if it does not exist or is not
    /// ours, `None`. The VM is looked up cluster-wide: with a target node,
    /// PVE keeps it on the source node until the clone ends.
    async fn adopt_clone(&self, vmid: u32) -> Result<Option<()>, ProvisionerError> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let all = self.client_ref().resources(Some("vm")).await?;
            let Some(node) = all
                .iter()
                .find(|r| r.vmid == Some(vmid))
                .and_then(|r| r.node.clone())
            else {
                return Ok(None);
            };
            match self.client_ref().vm_config(&node, vmid).await {
                Err(e) if e.is_vm_missing() => {}
                Err(e) => return Err(e.into()),
                Ok(cfg) => {
                    let marker = cfg
                        .get("description")
                        .and_then(|d| d.as_str())
                        .and_then(Marker::parse);
                    if !marker.is_some_and(|m| self.owns_marker(&m)) {
                        return Ok(None);
                    }
                    if cfg.get("lock").is_none() {
                        return Ok(Some(()));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(ProvisionerError::Transient(format!(
                    "VM {vmid} on {node} stays locked after an interrupted clone"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn guest_agent_bootstrap(
        &self,
        node: &str,
        vmid: u32,
        path: &str,
        content: &secrecy::SecretString,
        command: &[String],
    ) -> Result<(), ProvisionerError> {
        let client = self.client_ref();
        let deadline = Instant::now() + self.pool.agent_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            match client.agent_ping(node, vmid).await {
                Ok(()) => break,
                Err(e)
                    if Instant::now() < deadline
                        && (e.is_transient()
                            || e.pve_text().contains("not running")
                            || e.pve_text().contains("guest agent")) =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(ProvisionerError::Transient(format!(
                        "the guest agent of VM {vmid} on {node} did not answer within {:?} (is qemu-guest-agent installed and enabled in the template?): {e}",
                        self.pool.agent_timeout
                    )));
                }
            }
        }
        client.agent_file_write(node, vmid, path, content).await?;
        client.agent_exec(node, vmid, command).await?;
        Ok(())
    }

    /// Everything after the clone; on error the caller cleans up.
    async fn finish_create(
        &self,
        spec: &InstanceSpec,
        node: &str,
        vmid: u32,
        marker: &Marker,
    ) -> Result<(), ProvisionerError> {
        let params = self.config_params(spec, vmid, marker)?;
        self.client_ref().set_config(node, vmid, &params).await?;
        self.start_and_bootstrap(spec, node, vmid).await
    }

    /// Starts the VM (already running is fine) and, in guest-agent mode,
    /// hands the runner its config.
    async fn start_and_bootstrap(
        &self,
        spec: &InstanceSpec,
        node: &str,
        vmid: u32,
    ) -> Result<(), ProvisionerError> {
        let upid = self.client_ref().vm_action(node, vmid, "start").await?;
        match self.run_task(upid).await {
            Err(e) if e.pve_text().contains("already running") => {}
            other => other?,
        }
        if let Bootstrap::GuestAgent {
            path,
            content,
            command,
        } = &spec.bootstrap
        {
            self.guest_agent_bootstrap(node, vmid, path, content, command)
                .await?;
        }
        Ok(())
    }
}

/// Why a clone did not happen.
enum CloneFailure {
    /// The target node cannot be reached (HTTP 595, not online).
    NodeDown(PveError),
    /// Anything else.
    Other(ProvisionerError),
}

impl From<PveError> for CloneFailure {
    fn from(e: PveError) -> Self {
        let t = e.pve_text();
        if e.status() == Some(595)
            || (t.contains("not online") && !t.starts_with("storage"))
            || t.contains("No route to host")
        {
            CloneFailure::NodeDown(e)
        } else if t.contains("uses local storage") || t.contains("non-shared storage") {
            // The storage changed since `validate` checked it.
            CloneFailure::Other(ProvisionerError::Config(format!(
                "{e}; clones to another node need the template's disks on shared storage (see `validate`)"
            )))
        } else {
            CloneFailure::Other(e.into())
        }
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

/// The tag that says GRS configured VM `vmid` (see the module docs).
fn configured_tag(vmid: u32) -> String {
    format!("grs-v-{vmid}")
}

/// Whether GRS configured this VM: it carries the tag with its own id.
fn configured(r: &Resource) -> bool {
    r.vmid
        .is_some_and(|id| r.tag_list().contains(&configured_tag(id).as_str()))
}

fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The verbs of the `Provisioner` trait for this one pool;
/// [`ProxmoxBackend`](crate::ProxmoxBackend) implements the trait over them.
impl ProxmoxProvisioner {
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
        self.check_storage().await?;
        tracing::info!(pool = %self.pool_name, node = %node, template = vmid, url = client.url(), "Proxmox pool validated");
        Ok(())
    }

    pub async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError> {
        self.check_spec(spec)?;
        let client = self.client_ref();
        let snapshot = client.resources(None).await?;
        let (ours, foreign) = self.classify(&spec.name, &snapshot).await?;
        if let Some(f) = ours.first() {
            let inst = self.instance(f);
            match inst.state {
                InstanceState::Running => return Ok(inst),
                InstanceState::Creating if f.res.lock.is_some() => {
                    return Err(ProvisionerError::Transient(format!(
                        "instance {} is still being cloned (VM {} on {})",
                        spec.name, f.vmid, f.node
                    )));
                }
                // Configured (tags and bootstrap are set in one call) but
                // stopped: start it rather than make a second VM, after
                // checking the marker (tags can be copied) and writing this
                // spec's configuration again (its seed may be newer).
                InstanceState::Stopped => {
                    let marker = match self.read_marker(&f.node, f.vmid).await? {
                        Some((m, false)) if self.owns_marker(&m) => m,
                        _ => {
                            return Err(ProvisionerError::NotOwned {
                                name: spec.name.clone(),
                            });
                        }
                    };
                    self.client_ref()
                        .set_config(&f.node, f.vmid, &self.config_params(spec, f.vmid, &marker)?)
                        .await?;
                    self.start_and_bootstrap(spec, &f.node, f.vmid).await?;
                    return Ok(Instance {
                        state: InstanceState::Running,
                        ..inst
                    });
                }
                // A create that stopped before its configuration: start over.
                _ => {
                    tracing::info!(instance = %spec.name, vmid = f.vmid, "replacing a half-made instance");
                    let running = f.res.status.as_deref() != Some("stopped");
                    self.destroy_vm(&f.node, f.vmid, running).await?;
                }
            }
        } else if foreign > 0 {
            return Err(ProvisionerError::NotOwned {
                name: spec.name.clone(),
            });
        }

        let template_mem = snapshot
            .iter()
            .find(|r| r.is_vm() && r.vmid == Some(self.pool.template_vmid))
            .and_then(|r| r.maxmem)
            .unwrap_or(2 << 30);
        let mem = self
            .pool
            .memory_mib
            .map(|m| m << 20)
            .unwrap_or(template_mem);
        // A pool that may place on other nodes than the template's needs
        // its storage checked (done by `validate`, else here, once).
        if self.cloneable.lock().unwrap().is_none()
            && self.candidates().iter().any(|n| *n != self.pool.node)
        {
            self.check_storage().await?;
        }
        let candidates = self.candidates();
        let mut exclude = HashSet::new();
        let marker = Marker {
            installation: self.installation_id.clone(),
            pool: self.pool_name.clone(),
            job: spec.job_id,
            created: now_secs(),
        };
        let started = Instant::now();
        let (node, vmid) = loop {
            let reservation = self
                .backend
                .placement
                .reserve(
                    &placement::Request {
                        name: &spec.name,
                        candidates: &candidates,
                        mem,
                        installation_tag: &self.tag_installation,
                        exclude: &exclude,
                    },
                    &snapshot,
                    &self.nodes,
                )
                .map_err(|why| {
                    ProvisionerError::NoCapacity(format!(
                        "no node has room for {}: {why}",
                        spec.name
                    ))
                })?;
            let node = reservation.node.clone();
            match self.clone_fresh(spec, &node, &marker).await {
                Ok(vmid) => {
                    if let Err(e) = self.finish_create(spec, &node, vmid, &marker).await {
                        self.cleanup(&spec.name, &node, vmid).await;
                        return Err(e);
                    }
                    break (node, vmid);
                }
                // A target node that went down since the snapshot: try the
                // others (the template's node itself cannot be replaced).
                Err(CloneFailure::NodeDown(e)) if node != self.pool.node => {
                    tracing::warn!(instance = %spec.name, node = %node, error = %e, "target node unreachable; placing elsewhere");
                    exclude.insert(node);
                }
                Err(CloneFailure::NodeDown(e)) => return Err(e.into()),
                Err(CloneFailure::Other(e)) => return Err(e),
            }
        };
        tracing::info!(instance = %spec.name, pool = %self.pool_name, node = %node, vmid, elapsed = ?started.elapsed(), "instance created");
        Ok(Instance {
            name: spec.name.clone(),
            provider_id: format!("{node}/{vmid}"),
            pool: self.pool_name.clone(),
            job_id: Some(spec.job_id),
            state: InstanceState::Running,
            location: Some(node),
            created_at: Some(UNIX_EPOCH + Duration::from_secs(marker.created)),
        })
    }

    pub async fn delete(&self, name: &str) -> Result<(), ProvisionerError> {
        let Some(found) = self.find_owned_verified(name).await? else {
            return Ok(());
        };
        for f in found {
            let running = f.res.status.as_deref() != Some("stopped");
            self.destroy_vm(&f.node, f.vmid, running).await?;
            tracing::info!(instance = name, node = %f.node, vmid = f.vmid, "instance deleted");
        }
        Ok(())
    }

    pub async fn get(&self, name: &str) -> Result<Option<Instance>, ProvisionerError> {
        let snapshot = self.client_ref().resources(Some("vm")).await?;
        let (ours, _) = self.classify(name, &snapshot).await?;
        Ok(ours.first().map(|f| self.instance(f)))
    }

    pub async fn list(&self) -> Result<Vec<Instance>, ProvisionerError> {
        let snapshot = self.client_ref().resources(Some("vm")).await?;
        let mut out = Vec::new();
        for r in snapshot.iter().filter(|r| {
            r.is_vm() && !r.template && r.name.as_deref().is_some_and(|n| self.has_prefix(n))
        }) {
            let (Some(node), Some(vmid)) = (r.node.clone(), r.vmid) else {
                continue;
            };
            if self.owns_by_tags(r) {
                out.push(self.instance(&Found {
                    node,
                    vmid,
                    res: r.clone(),
                    marker: None,
                }));
            } else if self.maybe_partial(r)
                && let Some((m, false)) = self.read_marker(&node, vmid).await?
                && self.owns_marker(&m)
            {
                out.push(self.instance(&Found {
                    node,
                    vmid,
                    res: r.clone(),
                    marker: Some(m),
                }));
            }
        }
        Ok(out)
    }

    pub async fn start(&self, name: &str) -> Result<(), ProvisionerError> {
        let found = self.find_owned_verified(name).await?.ok_or_else(|| {
            ProvisionerError::Permanent(format!("instance {name} does not exist"))
        })?;
        for f in found {
            if f.res.status.as_deref() == Some("running") {
                continue;
            }
            let upid = self
                .client_ref()
                .vm_action(&f.node, f.vmid, "start")
                .await?;
            match self.run_task(upid).await {
                Err(e) if e.pve_text().contains("already running") => {}
                other => other?,
            }
        }
        Ok(())
    }

    pub async fn stop(&self, name: &str) -> Result<(), ProvisionerError> {
        let found = self.find_owned_verified(name).await?.ok_or_else(|| {
            ProvisionerError::Permanent(format!("instance {name} does not exist"))
        })?;
        for f in found {
            self.stop_vm(&f.node, f.vmid).await?;
        }
        Ok(())
    }

    /// Deletes every instance [`list`](Self::list) shows; returns their
    /// names. Stops at the first failure.
    pub async fn remove_all(&self) -> Result<Vec<String>, ProvisionerError> {
        let mut removed = Vec::new();
        for inst in self.list().await? {
            self.delete(&inst.name).await?;
            removed.push(inst.name);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_through_the_description() {
        let m = Marker {
            installation: "prod-1".into(),
            pool: "linux".into(),
            job: u64::MAX,
            created: 1_700_000_000,
        };
        let d = m.description();
        assert!(d.len() <= 8192);
        assert_eq!(Marker::parse(&d), Some(m));
        assert_eq!(Marker::parse("some operator's notes"), None);
    }

    #[test]
    fn tags_are_made_safe_for_pve() {
        assert_eq!(tag_safe("prod-eu-1"), "prod-eu-1");
        assert!(tag_safe("Prod/EU 1").starts_with("prod_eu_1-"));
        assert_ne!(tag_safe("Prod"), tag_safe("prod"));
        assert_ne!(tag_safe("a/b"), tag_safe("a_b"));
    }

    #[test]
    fn uuids_are_version_4() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
