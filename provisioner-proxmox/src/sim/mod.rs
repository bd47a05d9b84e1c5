//! A PVE simulator: the API subset GRS uses, over real HTTP(S), with PVE's
//! envelopes, status codes and wording.
//!
//! What it models: API-token auth (401 `authentication failure`), nodes with
//! memory and an online flag, templates and VMs with config, `lock: clone`
//! while cloning, `nextid` (which reserves nothing), UPID tasks that take
//! configurable time and keep logs, the guest agent (ping, file-write,
//! exec), and PVE's errors (`VM N is running - destroy failed`, `Configuration
//! file ... does not exist`, `can't lock file ... got timeout`, ...). Every
//! request is validated against the official schema ([`crate::schema`]) and
//! refused with PVE's 400 when it does not fit; violations are also kept for
//! tests to assert on.
//!
//! Modelled on the real sources (each handler cites its file and function):
//! a clone copies every option of its source but qemu-server's skip list
//! (`protection`, `tags`, ...); the source's lock and the storage's cluster
//! lock are taken inside the clone task; a config lock (`backup`) refuses a
//! clone synchronously; clones to another node need shared storage; destroy
//! checks `protection` and, with `destroy-unreferenced-disks`, every
//! storage; error text is in the status line's reason phrase, and in the
//! body's `message` only on releases that have it ([`PveVersion`]: 7.4, 8.3,
//! 8.4, 9.1).
//!
//! Faults ([`Fault`]) can be injected: lock timeouts and lock contention
//! inside clone tasks, storage cluster-lock timeouts, failing and slow
//! tasks, HTTP errors, dropped connections, tasks not yet visible; and state
//! behind GRS's back: config locks ([`PveSim::set_lock`]), storages on and
//! off line ([`PveSim::set_storage_online`]), option changes
//! ([`PveSim::set_vm_config`]).
//!
//! Start one with [`PveSim::start`] (binds `127.0.0.1:0`), fill it with
//! [`PveSim::add_node`] and [`PveSim::add_template`], point a client at
//! [`PveSim::url`], stop it with [`PveSim::shutdown`].
//!
//! Layout: this module holds the simulator's handle and options;
//! `state` the simulated cluster, `faults` what can be injected, `api`
//! the HTTP server and the synchronous handlers, `tasks` the handlers that
//! run as PVE tasks (UPIDs).

mod access;
mod api;
mod faults;
mod state;
mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::schema::ApiSchema;

pub use access::AclEntry;
pub use faults::Fault;
use faults::Faults;
use state::{Shared, SimState};
pub use state::{SimNode, SimStorage, SimVm};

pub(crate) const MIB: u64 = 1024 * 1024;
pub(crate) const GIB: u64 = 1024 * MIB;

/// How long simulated tasks take.
#[derive(Debug, Clone, Copy)]
pub struct TaskDurations {
    /// A linked clone of a template.
    pub linked_clone: Duration,
    /// A full clone.
    pub full_clone: Duration,
    /// Starting a VM.
    pub start: Duration,
    /// Stopping a VM (hard).
    pub stop: Duration,
    /// Destroying a VM.
    pub destroy: Duration,
    /// From start until the guest agent answers (when the VM has one).
    pub agent_ready: Duration,
}

impl Default for TaskDurations {
    /// Plausible durations for a small cluster on local thin storage.
    fn default() -> Self {
        Self {
            linked_clone: Duration::from_millis(1000),
            full_clone: Duration::from_millis(3000),
            start: Duration::from_millis(500),
            stop: Duration::from_millis(200),
            destroy: Duration::from_millis(300),
            agent_ready: Duration::from_millis(1000),
        }
    }
}

impl TaskDurations {
    /// Short durations for tests.
    pub fn fast() -> Self {
        Self {
            linked_clone: Duration::from_millis(40),
            full_clone: Duration::from_millis(80),
            start: Duration::from_millis(20),
            stop: Duration::from_millis(10),
            destroy: Duration::from_millis(10),
            agent_ready: Duration::from_millis(30),
        }
    }
}

/// One task of [`PveSim::task_log`].
#[derive(Debug, Clone)]
pub struct TaskRecord {
    /// `qmclone`, `qmstart`, `qmstop`, `qmdestroy`, ...
    pub kind: String,
    /// The node it ran on.
    pub node: String,
    /// The VM it is about; for a clone, the new VM (not the source, which
    /// the UPID names).
    pub vmid: u32,
    /// When it was created: its UPID was handed out.
    pub created: Instant,
    /// When it ended (`None`: still running). Waiting for a storage lock is
    /// part of the task.
    pub ended: Option<Instant>,
    /// It ended with `OK`.
    pub ok: bool,
}

impl TaskRecord {
    /// How long it ran (so far, when still running).
    pub fn duration(&self) -> Duration {
        self.ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.created)
    }
}

/// How to run the simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Serve HTTPS with a fresh self-signed certificate (see
    /// [`PveSim::fingerprint`] and [`PveSim::ca_pem`]).
    pub tls: bool,
    /// The accepted API token id (`user@realm!name`).
    pub token_id: String,
    /// Its secret.
    pub token_secret: String,
    /// Task durations.
    pub durations: TaskDurations,
    /// The part of a linked clone's time spent holding its storage's lock
    /// (and of a destroy's: `vdisk_free` runs the plugin's `free_image`
    /// inside the same lock):
    /// pve-storage `PVE/Storage.pm` `vdisk_clone` (and `vdisk_alloc` for a
    /// full clone) runs the plugin's `clone_image` (`alloc_image`) inside
    /// `cluster_lock_storage`, a file lock on the node
    /// (`/var/lock/pve-manager/pve-storage-<id>`) for local storage, the
    /// cluster-wide `cfs_lock_storage` for shared storage. Clones in one
    /// such lock domain serialize on that part; the rest (activating
    /// volumes, writing the config, a full clone's data copy) runs in
    /// parallel. The template's own config lock does not serialize clones
    /// of a stopped template: qemu-server `PVE/API2/Qemu.pm` `clone_vm`
    /// takes it shared (`lock_config_shared`), exclusive only when the
    /// source is running (`lock_config_full`).
    pub storage_lock_share: f64,
    /// How long a clone waits for its storage lock before its task fails
    /// (`clone failed: can't lock file '...' - got timeout`, or
    /// `cfs-lock 'storage-<id>' error: got lock request timeout`): 10 s,
    /// pve-common `PVE/Tools.pm` `lock_file_full` and pve-cluster
    /// `PVE/Cluster.pm` `$cfs_lock` when no timeout is given.
    pub storage_lock_timeout: Duration,
    /// Refuse requests that do not fit the official schema (as PVE does).
    pub validate_requests: bool,
    /// PVE delays a 401 by 3 s; the simulator by this.
    pub auth_failure_delay: Duration,
    /// Which PVE release to answer as (see [`PveVersion`]).
    pub version: PveVersion,
}

/// The PVE releases the simulator can answer as. They differ, for the calls
/// GRS makes, in:
/// - where an error's text is: every release puts its first line in the
///   HTTP status line's reason phrase (pve-http-server
///   `src/PVE/APIServer/AnyEvent.pm`, `response()`: `$msg =~ m/^(.*)$/m`);
///   only libpve-http-server-perl 5.2.0 (January 2025, commit 9a2112e
///   "fix #6503: return api handler errors in the json body", first in PVE
///   8.4) also writes it to the body's `message` field
///   (`Formatter/Standard.pm`, `prepare_response_data`). 7.4 and 8.0 to 8.3
///   answer `{"data":null}` (plus `errors` for parameter errors);
/// - the `/version` answer (`7.4-3`, `8.3.0`, ...).
///
/// `/cluster/resources` has carried `tags` since 7.3 (pve-manager d18b6982)
/// and `lock` since 6.0 (f79372c0), storages' `shared` flag since 2018
/// (1ce3fa3b), so 7.4 is the oldest release whose answers GRS can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PveVersion {
    /// 7.4 (Debian 11, libpve-http-server-perl 4.2).
    V7_4,
    /// 8.0 to 8.3 (Debian 12, libpve-http-server-perl 5.0/5.1).
    V8_3,
    /// 8.4 (libpve-http-server-perl 5.2: `message` in error bodies).
    V8_4,
    /// 9.x (Debian 13).
    V9_1,
}

impl PveVersion {
    /// Every version, oldest first (for tests that run against each).
    pub const ALL: [PveVersion; 4] = [Self::V7_4, Self::V8_3, Self::V8_4, Self::V9_1];

    /// Whether error bodies carry `message` (libpve-http-server-perl >= 5.2).
    pub fn message_in_body(self) -> bool {
        matches!(self, Self::V8_4 | Self::V9_1)
    }

    /// The `/version` answer.
    pub(super) fn version_json(self) -> Value {
        let (version, release) = match self {
            Self::V7_4 => ("7.4-3", "7.4"),
            Self::V8_3 => ("8.3.0", "8.3"),
            Self::V8_4 => ("8.4.1", "8.4"),
            Self::V9_1 => ("9.1.1", "9.1"),
        };
        json!({"version": version, "release": release, "repoid": "0123abcd"})
    }
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            tls: false,
            token_id: "root@pam!grs".into(),
            token_secret: "00000000-0000-4000-8000-000000000000".into(),
            durations: TaskDurations::default(),
            storage_lock_share: 0.25,
            storage_lock_timeout: Duration::from_secs(10),
            validate_requests: true,
            auth_failure_delay: Duration::ZERO,
            version: PveVersion::V9_1,
        }
    }
}

/// A running simulator. Dropping it stops it too; [`PveSim::shutdown`]
/// waits for the listener to close.
pub struct PveSim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cert_der: Option<Vec<u8>>,
    cert_pem: Option<String>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PveSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PveSim")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl PveSim {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(opts: SimOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, opts).await
    }

    /// Starts on a listener of the caller's.
    pub async fn start_on(listener: TcpListener, opts: SimOptions) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (acceptor, cert_der, cert_pem) = if opts.tls {
            let ck = rcgen::generate_simple_self_signed(vec![
                "localhost".to_owned(),
                addr.ip().to_string(),
            ])
            .map_err(std::io::Error::other)?;
            let der = ck.cert.der().to_vec();
            let pem = ck.cert.pem();
            let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
                rustls_pki_types::PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()),
            );
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls_pki_types::CertificateDer::from(der.clone())],
                key,
            )
            .map_err(std::io::Error::other)?;
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))),
                Some(der),
                Some(pem),
            )
        } else {
            (None, None, None)
        };
        let mut state = SimState::default();
        // Every PVE node has the local LVM-thin storage of the installer.
        state.storages.insert(
            "local-lvm".into(),
            SimStorage {
                id: "local-lvm".into(),
                shared: false,
                online: true,
                plugintype: "lvmthin".into(),
            },
        );
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(state),
            storage_locks: Mutex::new(HashMap::new()),
            schema: ApiSchema::bundled(),
        });
        let (stop, stopped) = watch::channel(false);
        let app = axum::Router::new()
            .fallback(api::handle)
            .with_state(shared.clone());
        let task = tokio::spawn(api::serve(listener, acceptor, app, shared.clone(), stopped));
        Ok(Self {
            shared,
            addr,
            cert_der,
            cert_pem,
            stop,
            task: Some(task),
        })
    }

    /// `http(s)://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.cert_der.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SHA-256 fingerprint of the certificate (TLS only), `AA:BB:...`.
    pub fn fingerprint(&self) -> Option<String> {
        self.cert_der.as_deref().map(crate::tls::fingerprint_of)
    }

    /// The certificate as PEM, usable as a CA file (TLS only).
    pub fn ca_pem(&self) -> Option<String> {
        self.cert_pem.clone()
    }

    /// The accepted token id.
    pub fn token_id(&self) -> &str {
        &self.shared.opts.token_id
    }

    /// The accepted token secret.
    pub fn token_secret(&self) -> &str {
        &self.shared.opts.token_secret
    }

    /// Adds a node with `maxmem_gib` of memory.
    pub fn add_node(&self, name: &str, maxmem_gib: u64) {
        self.lock().nodes.insert(
            name.to_owned(),
            SimNode {
                name: name.to_owned(),
                maxmem: maxmem_gib * GIB,
                base_mem: GIB,
                maxcpu: 16,
                online: true,
            },
        );
    }

    /// Adds a PVE resource pool (clones may be put into it).
    pub fn add_resource_pool(&self, poolid: &str) {
        self.lock().resource_pools.insert(poolid.to_owned());
    }

    /// Takes a node off or on line (its API answers 595 while off).
    pub fn set_node_online(&self, name: &str, online: bool) {
        if let Some(n) = self.lock().nodes.get_mut(name) {
            n.online = online;
        }
    }

    /// Adds a template with a disk on the node-local `local-lvm`, 2 GiB of
    /// memory, 2 cores, `net0` and the guest agent enabled.
    pub fn add_template(&self, node: &str, vmid: u32, name: &str) {
        self.add_vm(node, vmid, name, true);
    }

    /// Adds a template whose disk is on `storage` (see [`Self::add_storage`]).
    pub fn add_template_on(&self, node: &str, vmid: u32, name: &str, storage: &str) {
        self.add_vm_on(node, vmid, name, true, storage);
    }

    /// Adds a storage (content `images`), on every node.
    pub fn add_storage(&self, id: &str, shared: bool, plugintype: &str) {
        self.lock().storages.insert(
            id.to_owned(),
            SimStorage {
                id: id.to_owned(),
                shared,
                online: true,
                plugintype: plugintype.to_owned(),
            },
        );
    }

    /// Takes a storage off or on line.
    pub fn set_storage_online(&self, id: &str, online: bool) {
        if let Some(st) = self.lock().storages.get_mut(id) {
            st.online = online;
        }
    }

    /// Sets or clears a VM's config lock behind GRS's back (`backup` while
    /// vzdump runs for the whole backup).
    pub fn set_lock(&self, vmid: u32, lock: Option<&str>) {
        if let Some(vm) = self.lock().vms.get_mut(&vmid) {
            vm.lock = lock.map(str::to_owned);
        }
    }

    /// Adds a VM (or template) behind GRS's back, e.g. a foreign one, with
    /// its disk on `local-lvm`.
    pub fn add_vm(&self, node: &str, vmid: u32, name: &str, template: bool) {
        self.add_vm_on(node, vmid, name, template, "local-lvm");
    }

    /// Adds a VM (or template) with its disk on `storage`.
    pub fn add_vm_on(&self, node: &str, vmid: u32, name: &str, template: bool, storage: &str) {
        let mut config = BTreeMap::new();
        config.insert("name".into(), name.to_owned());
        config.insert("memory".into(), "2048".into());
        config.insert("cores".into(), "2".into());
        config.insert(
            "net0".into(),
            "virtio=BC:24:11:00:00:01,bridge=vmbr0".into(),
        );
        config.insert("agent".into(), "enabled=1".into());
        let disk = if template {
            format!("{storage}:base-{vmid}-disk-0,size=8G")
        } else {
            format!("{storage}:vm-{vmid}-disk-0,size=8G")
        };
        config.insert("scsi0".into(), disk);
        if template {
            config.insert("template".into(), "1".into());
        }
        let mut s = self.lock();
        s.nodes.entry(node.to_owned()).or_insert_with(|| SimNode {
            name: node.to_owned(),
            maxmem: 64 * GIB,
            base_mem: GIB,
            maxcpu: 16,
            online: true,
        });
        s.vms.insert(
            vmid,
            SimVm {
                vmid,
                node: node.to_owned(),
                template,
                running: false,
                config,
                lock: None,
                agent_ready_at: None,
                agent_files: Vec::new(),
                agent_execs: Vec::new(),
                disks_freed: false,
            },
        );
    }

    /// Changes one config key of a VM behind GRS's back.
    pub fn set_vm_config(&self, vmid: u32, key: &str, value: &str) {
        if let Some(vm) = self.lock().vms.get_mut(&vmid) {
            vm.config.insert(key.to_owned(), value.to_owned());
        }
    }

    /// Injects a fault.
    pub fn inject(&self, fault: Fault) {
        let mut s = self.lock();
        let f = &mut s.faults;
        match fault {
            Fault::CloneLockTimeout { times } => f.clone_lock_timeouts += times,
            Fault::CloneLockContention { probability } => f.clone_contention = probability,
            Fault::CloneStorageLockTimeout { times } => f.clone_storage_lock_timeouts += times,
            Fault::FailTask {
                kind,
                times,
                message,
            } => f.fail_tasks.push((kind, times, message)),
            Fault::SlowTasks { extra } => f.slow = extra,
            Fault::HttpError {
                path_contains,
                method,
                status,
                message,
                times,
            } => f.http.push((path_contains, method, status, message, times)),
            Fault::DropConnections { times } => f.drops += times,
            Fault::TaskNotYetVisible { times } => f.invisible = times,
            Fault::Latency { extra } => f.latency = extra,
            Fault::DropRequests {
                path_contains,
                times,
            } => f.dropped_requests.push((path_contains, times)),
            Fault::LoseAnswers {
                path_contains,
                times,
            } => f.lost_answers.push((path_contains, times)),
        }
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.lock().faults = Faults::default();
    }

    /// Every VM and template.
    pub fn vms(&self) -> Vec<SimVm> {
        self.lock().vms.values().cloned().collect()
    }

    /// The VM with this id.
    pub fn vm(&self, vmid: u32) -> Option<SimVm> {
        self.lock().vms.get(&vmid).cloned()
    }

    /// VMs named `name`.
    pub fn vms_named(&self, name: &str) -> Vec<SimVm> {
        self.lock()
            .vms
            .values()
            .filter(|v| v.name() == name)
            .cloned()
            .collect()
    }

    /// API requests answered so far (every attempt and poll counts).
    pub fn request_count(&self) -> u64 {
        self.lock().requests
    }

    /// Requests so far by `METHOD /path/template`.
    pub fn requests_by_endpoint(&self) -> BTreeMap<String, u64> {
        self.lock().by_endpoint.clone()
    }

    /// Sets the request counters to zero.
    pub fn reset_request_count(&self) {
        let mut s = self.lock();
        s.requests = 0;
        s.by_endpoint.clear();
    }

    /// Requests that did not fit the official schema.
    pub fn schema_violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Most non-template VMs seen on each node at once.
    pub fn peak_vms_per_node(&self) -> BTreeMap<String, usize> {
        self.lock().peak_per_node.clone()
    }

    /// Tasks started so far of a type.
    pub fn task_count(&self, kind: &str) -> usize {
        self.lock()
            .tasks
            .values()
            .filter(|t| t.kind == kind)
            .count()
    }

    /// Every task started so far, oldest first: what the simulated
    /// hypervisor spent its time on, for benchmarks that subtract it from
    /// a wall time.
    pub fn task_log(&self) -> Vec<TaskRecord> {
        let mut log: Vec<TaskRecord> = self
            .lock()
            .tasks
            .values()
            .map(|t| TaskRecord {
                kind: t.kind.clone(),
                node: t.node.clone(),
                vmid: t.vmid,
                created: t.created,
                ended: t.ended,
                ok: t.exitstatus.as_deref() == Some("OK"),
            })
            .collect();
        log.sort_by_key(|t| t.created);
        log
    }

    /// How long a linked clone holds its storage's lock (see
    /// [`SimOptions::storage_lock_share`]).
    pub fn storage_lock_hold(&self) -> Duration {
        tasks::lock_hold(&self.shared, self.shared.opts.durations.linked_clone)
    }

    /// How long a destroy holds its storage's lock to free the VM's volume
    /// (the same share of its duration as a clone's).
    pub fn destroy_storage_lock_hold(&self) -> Duration {
        tasks::lock_hold(&self.shared, self.shared.opts.durations.destroy)
    }

    /// The shortest wall time `n` concurrent linked clone-and-start cycles
    /// in ONE storage lock domain can take here: the clones hold the lock
    /// one after the other, the last one then finishes its unlocked part,
    /// and its VM still has to start.
    pub fn lower_bound_for_creates(&self, n: usize) -> Duration {
        self.lower_bound_for_creates_in(&[n])
    }

    /// The same for creates spread over several lock domains (`per_domain`:
    /// how many clones each gets, e.g. one template replica per node on
    /// local storage): the busiest domain sets the bound.
    pub fn lower_bound_for_creates_in(&self, per_domain: &[usize]) -> Duration {
        let o = &self.shared.opts;
        let hold = self.storage_lock_hold();
        let n = per_domain.iter().copied().max().unwrap_or(0) as u32;
        if n == 0 {
            return Duration::ZERO;
        }
        hold * n + (o.durations.linked_clone - hold) + o.durations.start
    }

    /// Stops listening and closes every connection.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.shared.state.lock().unwrap()
    }
}

impl Drop for PveSim {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
