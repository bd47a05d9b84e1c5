//! Create: clone, configure, start, bootstrap.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use grs_provisioner::{
    Bootstrap, Instance, InstanceSpec, InstanceState, ProvisionerError, validate_instance_name,
};
use secrecy::ExposeSecret;

use super::ownership::configured_tag;
use super::{Marker, ProxmoxProvisioner, SEED_PREFIX};
use crate::client::Param;
use crate::config::BootstrapMode;
use crate::error::PveError;
use crate::placement;

impl ProxmoxProvisioner {
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
        if target != self.source_for(target).0 {
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

    pub(super) fn check_spec(&self, spec: &InstanceSpec) -> Result<(), ProvisionerError> {
        validate_instance_name(&spec.name)
            .map_err(|e| ProvisionerError::InvalidSpec(e.to_string()))?;
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
        let (src_node, src) = self.source_for(target);
        let mut lock_waits = 0u32;
        let mut taken = BTreeSet::new();
        // At most as many clones of this template at once as make PVE
        // faster (see `gate`); the others wait here, without calls.
        let gate = self.backend.gates.of(src_node, src);
        let permit = gate.admit().await;
        for _ in 0..20 {
            let lease = self
                .backend
                .lease_vmid(&taken)
                .await
                .map_err(CloneFailure::from)?;
            let vmid = lease.vmid;
            let params = self.clone_params(vmid, &spec.name, target, marker);
            let sent = Instant::now();
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
                Ok(()) => {
                    permit.succeeded(sent.elapsed());
                    return Ok(vmid);
                }
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
                        gate.hit_lock();
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
    pub(super) async fn adopt_clone(&self, vmid: u32) -> Result<Option<()>, ProvisionerError> {
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

    /// Hands the runner its config through the guest agent and runs its
    /// command; [`FinishFailure::runner_may_run`] when the command may have
    /// run all the same (its answer was lost).
    pub(super) async fn guest_agent_bootstrap(
        &self,
        node: &str,
        vmid: u32,
        path: &str,
        content: &secrecy::SecretString,
        command: &[String],
    ) -> Result<(), FinishFailure> {
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
                    ))
                    .into());
                }
            }
        }
        client.agent_file_write(node, vmid, path, content).await?;
        client
            .agent_exec(node, vmid, command)
            .await
            .map_err(|e| FinishFailure::maybe_done(e, true))?;
        Ok(())
    }

    /// Everything after the clone. On error the caller cleans up, unless
    /// [`FinishFailure::runner_may_run`].
    pub(super) async fn finish_create(
        &self,
        spec: &InstanceSpec,
        node: &str,
        vmid: u32,
        marker: &Marker,
    ) -> Result<(), FinishFailure> {
        let params = self.config_params(spec, vmid, marker)?;
        self.client_ref().set_config(node, vmid, &params).await?;
        self.start_and_bootstrap(spec, node, vmid).await
    }

    /// Starts the VM (already running is fine) and, in guest-agent mode,
    /// hands the runner its config.
    pub(super) async fn start_and_bootstrap(
        &self,
        spec: &InstanceSpec,
        node: &str,
        vmid: u32,
    ) -> Result<(), FinishFailure> {
        // Booted, a cloud-init VM starts its runner by itself; a
        // guest-agent one only once its command runs.
        let boot_starts_runner = !matches!(spec.bootstrap, Bootstrap::GuestAgent { .. });
        let upid = self
            .client_ref()
            .vm_action(node, vmid, "start")
            .await
            .map_err(|e| FinishFailure::maybe_done(e, boot_starts_runner))?;
        match self.run_task(upid).await {
            Err(e) if e.pve_text().contains("already running") => {}
            other => other.map_err(|e| FinishFailure::maybe_done(e, boot_starts_runner))?,
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
                    self.start_and_bootstrap(spec, &f.node, f.vmid)
                        .await
                        .map_err(|f| f.error)?;
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
        // Nodes the installation's ledger says are full (other processes'
        // VMs), for the error when no node is left.
        let mut full = Vec::new();
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
                    let full = if full.is_empty() {
                        String::new()
                    } else {
                        format!(" (full with other replicas' VMs: {})", full.join(", "))
                    };
                    ProvisionerError::NoCapacity(format!(
                        "no node has room for {}: {why}{full}",
                        spec.name
                    ))
                })?;
            let node = reservation.node.clone();
            let ledger = match self.hold_in_ledger(spec, &node, &snapshot).await? {
                Held::Refused => {
                    tracing::info!(instance = %spec.name, node = %node, "node full across replicas; placing elsewhere");
                    full.push(node.clone());
                    exclude.insert(node);
                    continue;
                }
                Held::Yes(ledger) => Some(ledger),
                Held::NotNeeded => None,
            };
            let release = async |ledger: Option<
                std::sync::Arc<dyn grs_provisioner::NodeLedger>,
            >| {
                if let Some(l) = ledger
                    && let Err(e) = l.release(&node, &spec.name).await
                {
                    tracing::warn!(instance = %spec.name, node = %node, error = %e, "cannot release the node reservation; it lapses once the instance is recorded deleted");
                }
            };
            match self.clone_fresh(spec, &node, &marker).await {
                Ok(vmid) => {
                    if let Err(f) = self.finish_create(spec, &node, vmid, &marker).await {
                        if f.runner_may_run {
                            // Issue 10 item 3: its runner may have taken a
                            // job; only the control plane's teardown, after
                            // asking GitHub, removes it (a retried create
                            // finds it by name). It keeps its node place.
                            tracing::warn!(instance = %spec.name, node = %node, vmid, error = %f.error, "create failed after the runner may have started; VM left for the control plane");
                            return Err(f.error);
                        }
                        self.cleanup(&spec.name, &node, vmid).await;
                        release(ledger).await;
                        return Err(f.error);
                    }
                    break (node, vmid);
                }
                // A target node that went down since the snapshot: try the
                // others (the template's node itself cannot be replaced).
                Err(CloneFailure::NodeDown(e)) if node != self.pool.node => {
                    tracing::warn!(instance = %spec.name, node = %node, error = %e, "target node unreachable; placing elsewhere");
                    release(ledger).await;
                    exclude.insert(node);
                }
                Err(CloneFailure::NodeDown(e)) => {
                    release(ledger).await;
                    return Err(e.into());
                }
                Err(CloneFailure::Other(e)) => {
                    release(ledger).await;
                    return Err(e);
                }
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
}

/// Why the steps after a clone failed, and whether the VM may already run
/// its runner: then the VM must not be destroyed without asking GitHub
/// whether the runner is busy, which only the control plane does.
#[derive(Debug)]
pub(super) struct FinishFailure {
    pub error: ProvisionerError,
    /// The runner may have started: a request that starts it (the VM's
    /// start in cloud-init mode, the guest agent's exec) went out and its
    /// answer was lost, so PVE may have carried it out.
    pub runner_may_run: bool,
}

impl FinishFailure {
    /// `e` failed a request that starts the runner when `starts_runner`:
    /// the runner may run if PVE may have carried it out (no answer came
    /// back), not if PVE refused it.
    fn maybe_done(e: PveError, starts_runner: bool) -> Self {
        let maybe_done = matches!(
            e,
            PveError::Connect {
                maybe_sent: true,
                ..
            } | PveError::Timeout { .. }
        );
        Self {
            runner_may_run: starts_runner && maybe_done,
            error: e.into(),
        }
    }
}

impl<E: Into<ProvisionerError>> From<E> for FinishFailure {
    fn from(e: E) -> Self {
        Self {
            error: e.into(),
            runner_may_run: false,
        }
    }
}

/// Whether a create holds a place in the installation's node ledger.
enum Held {
    /// It does (release it if the VM is not made there).
    Yes(std::sync::Arc<dyn grs_provisioner::NodeLedger>),
    /// The node is full with VMs other processes made or are making.
    Refused,
    /// No ledger, or the node has no maximum.
    NotNeeded,
}

impl ProxmoxProvisioner {
    /// Holds a place for `spec` on `node` (which has a configured maximum)
    /// in the installation's node ledger, counting the VMs of this
    /// installation visible there in `snapshot`. A ledger that cannot be
    /// reached is a transient failure: retried like an unreachable PVE.
    async fn hold_in_ledger(
        &self,
        spec: &InstanceSpec,
        node: &str,
        snapshot: &[crate::client::Resource],
    ) -> Result<Held, ProvisionerError> {
        let Some(max) = self
            .nodes
            .iter()
            .find(|l| l.name == node)
            .and_then(|l| l.max_instances)
        else {
            return Ok(Held::NotNeeded);
        };
        let Some(ledger) = self.backend.ledger.lock().unwrap().clone() else {
            return Ok(Held::NotNeeded);
        };
        let visible: Vec<String> = placement::visible_on(snapshot, node, &self.tag_installation)
            .into_iter()
            .map(str::to_owned)
            .collect();
        match ledger.reserve(node, &spec.name, max, &visible).await {
            Ok(true) => Ok(Held::Yes(ledger)),
            Ok(false) => Ok(Held::Refused),
            Err(e) => Err(ProvisionerError::Transient(format!(
                "cannot reserve a place for {} on node {node}: {e}",
                spec.name
            ))),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
