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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::schema::ApiSchema;

mod access;
pub use access::AclEntry;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

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
    /// Clones of one source that run at once (storage lock); more wait.
    pub clone_parallelism: usize,
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
    fn version_json(self) -> Value {
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
            clone_parallelism: 4,
            validate_requests: true,
            auth_failure_delay: Duration::ZERO,
            version: PveVersion::V9_1,
        }
    }
}

/// A fault to inject.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next `times` clone TASKS fail with PVE's lock timeout on the
    /// source (`can't lock file '/var/lock/qemu-server/lock-N.conf' - got
    /// timeout`): the HTTP call answers a UPID, the lock is taken in the
    /// worker (qemu-server `clone_vm`, `lock_config_shared`).
    CloneLockTimeout {
        /// How many.
        times: u32,
    },
    /// Every clone task fails with that lock timeout with this probability.
    CloneLockContention {
        /// 0.0 to 1.0.
        probability: f64,
    },
    /// The next `times` clone tasks fail on the storage's cluster lock
    /// (`clone failed: cfs-lock 'storage-X' error: got lock request
    /// timeout`, pve-storage `cluster_lock_storage` on shared storage) after
    /// the new VM was made; the worker removes it.
    CloneStorageLockTimeout {
        /// How many.
        times: u32,
    },
    /// The next `times` tasks of type `kind` (`qmclone`, `qmstart`, ...) end
    /// with `message` as exit status.
    FailTask {
        /// Task type.
        kind: String,
        /// How many.
        times: u32,
        /// The exit status text.
        message: String,
    },
    /// Every task takes `extra` longer.
    SlowTasks {
        /// Added duration.
        extra: Duration,
    },
    /// The next `times` requests whose path contains `path_contains` (and
    /// method, when given) are answered with `status` and `message`.
    HttpError {
        /// Substring of the path.
        path_contains: String,
        /// Only this method, when given.
        method: Option<String>,
        /// HTTP status.
        status: u16,
        /// PVE message.
        message: String,
        /// How many.
        times: u32,
    },
    /// The next `times` requests are answered by closing the connection.
    DropConnections {
        /// How many.
        times: u32,
    },
    /// The first `times` status polls of every new task answer
    /// `no such task` (PVE has not registered it yet).
    TaskNotYetVisible {
        /// How many per task.
        times: u32,
    },
    /// The next `times` requests whose path contains `path_contains` are
    /// answered by closing the connection before anything is done.
    DropRequests {
        /// Substring of the path.
        path_contains: String,
        /// How many.
        times: u32,
    },
    /// The next `times` requests whose path contains `path_contains` are
    /// carried out, but their answer is lost (the connection closes): the
    /// client cannot know whether PVE acted.
    LoseAnswers {
        /// Substring of the path.
        path_contains: String,
        /// How many.
        times: u32,
    },
    /// Every answer comes this much later (a slow or hung API).
    Latency {
        /// Added delay.
        extra: Duration,
    },
}

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
    fn memory_bytes(&self) -> u64 {
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
    fn cores(&self) -> u32 {
        self.config
            .get("cores")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
    }
    fn agent_enabled(&self) -> bool {
        self.config.get("agent").is_some_and(|a| {
            let first = a.split(',').next().unwrap_or("");
            matches!(first, "1" | "enabled=1")
        })
    }
}

#[derive(Debug)]
struct SimTask {
    node: String,
    kind: String,
    id: String,
    user: String,
    starttime: u64,
    pid: u32,
    exitstatus: Option<String>,
    log: Vec<String>,
    invisible_polls: u32,
}

#[derive(Debug, Default)]
struct Faults {
    clone_lock_timeouts: u32,
    clone_storage_lock_timeouts: u32,
    clone_contention: f64,
    fail_tasks: Vec<(String, u32, String)>,
    slow: Duration,
    http: Vec<(String, Option<String>, u16, String, u32)>,
    drops: u32,
    invisible: u32,
    latency: Duration,
    lost_answers: Vec<(String, u32)>,
    dropped_requests: Vec<(String, u32)>,
}

#[derive(Debug, Default)]
struct SimState {
    nodes: BTreeMap<String, SimNode>,
    vms: BTreeMap<u32, SimVm>,
    storages: BTreeMap<String, SimStorage>,
    tasks: HashMap<String, SimTask>,
    faults: Faults,
    requests: u64,
    by_endpoint: BTreeMap<String, u64>,
    violations: Vec<String>,
    pid: u32,
    peak_per_node: BTreeMap<String, usize>,
    resource_pools: std::collections::BTreeSet<String>,
    /// The token's ACL (`GET /access/permissions`); `None`: GRS's role on `/`.
    token_acl: Option<Vec<AclEntry>>,
}

impl SimState {
    fn note_peaks(&mut self) {
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

struct Shared {
    opts: SimOptions,
    state: Mutex<SimState>,
    /// Per clone source: the storage lock that serialises clones beyond
    /// `clone_parallelism`.
    clone_slots: Mutex<HashMap<u32, Arc<Semaphore>>>,
    schema: &'static ApiSchema,
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
            clone_slots: Mutex::new(HashMap::new()),
            schema: ApiSchema::bundled(),
        });
        let (stop, stopped) = watch::channel(false);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = tokio::spawn(serve(listener, acceptor, app, shared.clone(), stopped));
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

    /// The shortest wall time `n` concurrent linked clone-and-start cycles
    /// can take here: clones of one template run `clone_parallelism` at a
    /// time, then the last VM still has to start.
    pub fn lower_bound_for_creates(&self, n: usize) -> Duration {
        let o = &self.shared.opts;
        let waves = n.div_ceil(o.clone_parallelism.max(1)) as u32;
        o.durations.linked_clone * waves + o.durations.start
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

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let app = app.clone();
                let shared = shared.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        let shared = shared.clone();
                        async move {
                            if take_drop(&shared) || take_dropped_request(&shared, req.uri().path()) {
                                // An error from the service makes hyper close
                                // the connection without an answer.
                                return Err(std::io::Error::other("fault: dropped connection"));
                            }
                            let path = req.uri().path().to_owned();
                            let resp = app.oneshot(req.map(Body::new)).await;
                            if take_lost_answer(&shared, &path) {
                                return Err(std::io::Error::other("fault: answer lost"));
                            }
                            match resp {
                                Ok(r) => Ok(r),
                                Err(e) => match e {},
                            }
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acc) => {
                            if let Ok(stream) = acc.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
            _ = stop.changed() => break,
        }
        // Reap finished connections.
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

fn take_drop(shared: &Shared) -> bool {
    let mut s = shared.state.lock().unwrap();
    if s.faults.drops > 0 {
        s.faults.drops -= 1;
        s.requests += 1;
        true
    } else {
        false
    }
}

/// Uses up one of the `(path fragment, times left)` faults matching `path`.
fn take_matching(faults: &mut [(String, u32)], path: &str) -> bool {
    match faults.iter_mut().find(|f| f.1 > 0 && path.contains(&f.0)) {
        Some(f) => {
            f.1 -= 1;
            true
        }
        None => false,
    }
}

fn take_dropped_request(shared: &Shared, path: &str) -> bool {
    let mut s = shared.state.lock().unwrap();
    let hit = take_matching(&mut s.faults.dropped_requests, path);
    if hit {
        s.requests += 1;
    }
    hit
}

fn take_lost_answer(shared: &Shared, path: &str) -> bool {
    take_matching(&mut shared.state.lock().unwrap().faults.lost_answers, path)
}

/// PVE's error answer: the status line carries the first line of the
/// message as reason phrase (pve-http-server `AnyEvent.pm`, `response()`;
/// every release), the body is `{"data":null}`, plus `"message":"...\n"` on
/// releases with libpve-http-server-perl >= 5.2 ([`PveVersion`]), plus
/// `errors` for parameter errors (`Formatter/Standard.pm`,
/// `prepare_response_data`).
fn pve_error(v: PveVersion, status: u16, message: &str) -> Response {
    pve_error_with(v, status, message, None)
}

fn pve_error_with(v: PveVersion, status: u16, message: &str, errors: Option<Value>) -> Response {
    let mut body = json!({"data": null});
    if v.message_in_body() {
        body["message"] = json!(format!("{message}\n"));
    }
    if let Some(e) = errors {
        body["errors"] = e;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (code, axum::Json(body)).into_response();
    let first = message.lines().next().unwrap_or("").trim();
    if !first.is_empty()
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(first.as_bytes().to_vec())
    {
        resp.extensions_mut().insert(reason);
    }
    resp
}

fn ok(data: Value) -> Response {
    axum::Json(json!({ "data": data })).into_response()
}

/// An error raised by a handler: status and PVE message.
struct Fail(u16, String);

impl Fail {
    fn e500(m: impl Into<String>) -> Self {
        Self(500, m.into())
    }
}

type HResult = Result<Value, Fail>;

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path_full = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let ctype = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let v = sh.opts.version;
    let Some(path) = path_full.strip_prefix("/api2/json") else {
        return pve_error(
            v,
            501,
            &format!("Method '{method} {path_full}' not implemented"),
        );
    };
    let path = path.to_owned();
    let mut params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    if !body.is_empty() {
        if ctype.starts_with("application/json") {
            if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&body) {
                for (k, v) in m {
                    match v {
                        Value::Array(a) => params.extend(a.iter().map(|x| (k.clone(), plain(x)))),
                        other => params.push((k, plain(&other))),
                    }
                }
            }
        } else {
            params.extend(url::form_urlencoded::parse(&body).into_owned());
        }
    }

    // Auth first, as PVE.
    let user = match auth.strip_prefix("PVEAPIToken=") {
        Some(rest) => match rest.split_once('=') {
            Some((id, secret)) if id == sh.opts.token_id && secret == sh.opts.token_secret => {
                id.to_owned()
            }
            _ => {
                sh.state.lock().unwrap().requests += 1;
                tokio::time::sleep(sh.opts.auth_failure_delay).await;
                return pve_error(v, 401, "authentication failure");
            }
        },
        None => {
            sh.state.lock().unwrap().requests += 1;
            return pve_error(v, 401, "No ticket");
        }
    };

    let latency = sh.state.lock().unwrap().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Outside the bundled schema extract: checks its parameters itself.
    if method == Method::GET && path == "/access/permissions" {
        sh.state.lock().unwrap().requests += 1;
        let mut p: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in params {
            p.entry(k).or_default().push(v);
        }
        return match access::permissions(&sh, &p, &user) {
            Ok(data) => ok(data),
            Err(Fail(status, m)) => pve_error(v, status, &m),
        };
    }
    let found = sh.schema.find(method.as_str(), &path);
    let template = found.as_ref().map(|(e, _)| e.path.clone());
    {
        let mut s = sh.state.lock().unwrap();
        s.requests += 1;
        *s.by_endpoint
            .entry(format!("{method} {}", template.as_deref().unwrap_or(&path)))
            .or_default() += 1;
        // Injected HTTP errors.
        let mut hit = None;
        for f in s.faults.http.iter_mut() {
            if f.4 > 0
                && path.contains(&f.0)
                && f.1
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method.as_str()))
            {
                f.4 -= 1;
                hit = Some((f.2, f.3.clone()));
                break;
            }
        }
        if let Some((status, message)) = hit {
            return pve_error(v, status, &message);
        }
    }
    if sh.opts.validate_requests
        && let Err(violation) = sh.schema.check(method.as_str(), &path, &params)
    {
        sh.state
            .lock()
            .unwrap()
            .violations
            .push(violation.to_string());
        if violation.unknown_endpoint {
            return pve_error(v, 501, &format!("Method '{method} {path}' not implemented"));
        }
        let errs: serde_json::Map<String, Value> = violation
            .errors
            .iter()
            .map(|(k, m)| (k.clone(), Value::String(format!("{m}\n"))))
            .collect();
        return pve_error_with(
            v,
            400,
            "Parameter verification failed.",
            Some(Value::Object(errs)),
        );
    }
    let (Some(template), Some((_, vars))) = (template, found) else {
        return pve_error(v, 501, &format!("Method '{method} {path}' not implemented"));
    };
    let mut p: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in vars.into_iter().chain(params) {
        p.entry(k).or_default().push(v);
    }
    let r = dispatch(&sh, &method, &template, &p, &user).await;
    match r {
        Ok(v) => ok(v),
        Err(Fail(status, m)) => pve_error(v, status, &m),
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => (if *b { "1" } else { "0" }).to_owned(),
        other => other.to_string(),
    }
}

fn one<'a>(p: &'a HashMap<String, Vec<String>>, k: &str) -> Option<&'a str> {
    p.get(k).and_then(|v| v.first()).map(String::as_str)
}

fn flag(p: &HashMap<String, Vec<String>>, k: &str) -> Option<bool> {
    one(p, k).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn vmid_of(p: &HashMap<String, Vec<String>>) -> u32 {
    one(p, "vmid").and_then(|v| v.parse().ok()).unwrap_or(0)
}

async fn dispatch(
    sh: &Arc<Shared>,
    method: &Method,
    template: &str,
    p: &HashMap<String, Vec<String>>,
    user: &str,
) -> HResult {
    let node = one(p, "node").unwrap_or("").to_owned();
    if !node.is_empty() {
        let s = sh.state.lock().unwrap();
        match s.nodes.get(&node) {
            None => {
                return Err(Fail::e500(format!(
                    "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
                )));
            }
            Some(n) if !n.online => return Err(Fail(595, "No route to host".into())),
            _ => {}
        }
    }
    match (method.as_str(), template) {
        ("GET", "/version") => Ok(sh.opts.version.version_json()),
        ("GET", "/nodes") => Ok(nodes_list(sh)),
        ("GET", "/cluster/resources") => Ok(resources(sh, one(p, "type"))),
        ("GET", "/cluster/nextid") => nextid(sh, p),
        ("GET", "/pools") => resource_pools(sh, one(p, "poolid")),
        ("GET", "/nodes/{node}/status") => node_status(sh, &node),
        ("GET", "/nodes/{node}/qemu") => Ok(qemu_list(sh, &node)),
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => vm_config(sh, &node, vmid_of(p)),
        ("PUT", "/nodes/{node}/qemu/{vmid}/config")
        | ("POST", "/nodes/{node}/qemu/{vmid}/config") => set_config(sh, &node, vmid_of(p), p),
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            status_current(sh, &node, vmid_of(p))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone_vm(sh, &node, p, user),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => start_vm(sh, &node, vmid_of(p), user),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
        | ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown") => {
            stop_vm(sh, &node, vmid_of(p), user)
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => destroy_vm(sh, &node, vmid_of(p), user, p),
        ("GET", "/nodes/{node}/tasks/{upid}/status") => {
            task_status(sh, &node, one(p, "upid").unwrap_or(""))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/log") => task_log(sh, &node, p),
        ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping")
        | ("POST", "/nodes/{node}/qemu/{vmid}/agent/file-write")
        | ("POST", "/nodes/{node}/qemu/{vmid}/agent/exec")
        | ("GET", "/nodes/{node}/qemu/{vmid}/agent/exec-status") => {
            agent(sh, &node, vmid_of(p), template, p)
        }
        _ => Err(Fail(
            501,
            format!("Method '{method} {template}' not implemented by the GRS PVE simulator"),
        )),
    }
}

fn node_stats(s: &SimState, n: &SimNode) -> Value {
    let used: u64 = s
        .vms
        .values()
        .filter(|v| v.node == n.name && v.running)
        .map(SimVm::memory_bytes)
        .sum();
    if !n.online {
        return json!({"node": n.name, "id": format!("node/{}", n.name), "type": "node", "status": "offline"});
    }
    json!({
        "node": n.name, "id": format!("node/{}", n.name), "type": "node", "status": "online",
        "maxmem": n.maxmem, "mem": n.base_mem + used, "maxcpu": n.maxcpu, "cpu": 0.05, "level": "",
        "uptime": 3600,
    })
}

fn nodes_list(sh: &Shared) -> Value {
    let s = sh.state.lock().unwrap();
    Value::Array(s.nodes.values().map(|n| node_stats(&s, n)).collect())
}

fn vm_entry(s: &SimState, vm: &SimVm) -> Value {
    let online = s.nodes.get(&vm.node).is_some_and(|n| n.online);
    let mut e = json!({
        "id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid, "node": vm.node,
        "name": vm.name(),
        "status": if !online { "unknown" } else if vm.running { "running" } else { "stopped" },
        "template": u8::from(vm.template), "maxmem": vm.memory_bytes(),
        "mem": if vm.running { vm.memory_bytes() / 2 } else { 0 }, "maxcpu": vm.cores(),
    });
    if let Some(t) = vm.config.get("tags") {
        e["tags"] = json!(t);
    }
    if let Some(l) = &vm.lock {
        e["lock"] = json!(l);
    }
    if let Some(pool) = vm.config.get("pool") {
        e["pool"] = json!(pool);
    }
    e
}

fn resources(sh: &Shared, kind: Option<&str>) -> Value {
    let s = sh.state.lock().unwrap();
    let mut out = Vec::new();
    if kind.is_none_or(|k| k == "vm") {
        out.extend(s.vms.values().map(|vm| vm_entry(&s, vm)));
    }
    if kind.is_none_or(|k| k == "node") {
        out.extend(s.nodes.values().map(|n| node_stats(&s, n)));
    }
    // One entry per node and storage, `shared` since pve-manager 1ce3fa3b
    // (PVE/API2Tools.pm `extract_storage_stats`).
    if kind.is_none_or(|k| k == "storage") {
        for n in s.nodes.values() {
            for st in s.storages.values() {
                out.push(json!({
                    "id": format!("storage/{}/{}", n.name, st.id), "type": "storage",
                    "node": n.name, "storage": st.id, "shared": u8::from(st.shared),
                    "plugintype": st.plugintype, "content": "images,rootdir",
                    "status": if n.online && st.online { "available" } else { "unknown" },
                }));
            }
        }
    }
    Value::Array(out)
}

fn qemu_list(sh: &Shared, node: &str) -> Value {
    let s = sh.state.lock().unwrap();
    Value::Array(
        s.vms
            .values()
            .filter(|v| v.node == node)
            .map(|vm| vm_entry(&s, vm))
            .collect(),
    )
}

fn node_status(sh: &Shared, node: &str) -> HResult {
    let s = sh.state.lock().unwrap();
    let n = s
        .nodes
        .get(node)
        .ok_or_else(|| Fail::e500("no such node"))?;
    let st = node_stats(&s, n);
    Ok(json!({"memory": {"total": st["maxmem"], "used": st["mem"]}, "cpu": 0.05, "uptime": 3600}))
}

fn resource_pools(sh: &Shared, poolid: Option<&str>) -> HResult {
    let s = sh.state.lock().unwrap();
    let entry = |id: &String| {
        let members: Vec<Value> = s
            .vms
            .values()
            .filter(|v| v.config.get("pool") == Some(id))
            .map(|v| json!({"id": format!("qemu/{}", v.vmid), "node": v.node, "type": "qemu", "vmid": v.vmid}))
            .collect();
        json!({"poolid": id, "members": members})
    };
    match poolid {
        Some(id) if !s.resource_pools.contains(id) => {
            Err(Fail::e500(format!("pool '{id}' does not exist")))
        }
        Some(id) => Ok(json!([entry(&id.to_owned())])),
        None => Ok(Value::Array(s.resource_pools.iter().map(entry).collect())),
    }
}

fn nextid(sh: &Shared, p: &HashMap<String, Vec<String>>) -> HResult {
    let s = sh.state.lock().unwrap();
    if let Some(v) = one(p, "vmid") {
        let id: u32 = v.parse().unwrap_or(0);
        if s.vms.contains_key(&id) {
            return Err(Fail(400, format!("VM {id} already exists")));
        }
        return Ok(json!(id));
    }
    let mut id = 100;
    while s.vms.contains_key(&id) {
        id += 1;
    }
    // PVE answers a string here.
    Ok(json!(id.to_string()))
}

fn missing(node: &str, vmid: u32) -> Fail {
    Fail::e500(format!(
        "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
    ))
}

fn find<'a>(s: &'a mut SimState, node: &str, vmid: u32) -> Result<&'a mut SimVm, Fail> {
    match s.vms.get_mut(&vmid) {
        Some(vm) if vm.node == node => Ok(vm),
        _ => Err(missing(node, vmid)),
    }
}

fn vm_config(sh: &Shared, node: &str, vmid: u32) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    let mut m = serde_json::Map::new();
    for (k, v) in &vm.config {
        let val = match v.parse::<i64>() {
            Ok(n) if matches!(k.as_str(), "cores" | "template" | "sockets") => json!(n),
            _ => json!(v),
        };
        m.insert(k.clone(), val);
    }
    if let Some(l) = &vm.lock {
        m.insert("lock".into(), json!(l));
    }
    m.insert(
        "digest".into(),
        json!(format!(
            "{:040x}",
            vm.config.len() as u64 * 7919 + vmid as u64
        )),
    );
    Ok(Value::Object(m))
}

fn locked(vm: &SimVm) -> Result<(), Fail> {
    match &vm.lock {
        Some(l) => Err(Fail::e500(format!("VM is locked ({l})"))),
        None => Ok(()),
    }
}

fn set_config(sh: &Shared, node: &str, vmid: u32, p: &HashMap<String, Vec<String>>) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    locked(vm)?;
    for (k, v) in p {
        if matches!(
            k.as_str(),
            "node" | "vmid" | "digest" | "delete" | "skiplock"
        ) {
            continue;
        }
        if let Some(v) = v.first() {
            vm.config.insert(k.clone(), v.clone());
        }
    }
    if let Some(d) = one(p, "delete") {
        for k in crate::client::split_tags(d) {
            vm.config.remove(k);
        }
    }
    Ok(Value::Null)
}

fn status_current(sh: &Shared, node: &str, vmid: u32) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    let st = if vm.running { "running" } else { "stopped" };
    let mut v = json!({"vmid": vmid, "name": vm.name(), "status": st, "qmpstatus": st,
        "maxmem": vm.memory_bytes(), "agent": u8::from(vm.agent_enabled())});
    if let Some(l) = &vm.lock {
        v["lock"] = json!(l);
    }
    Ok(v)
}

/// Registers a task and runs `body` after `dur` (plus injected slowness);
/// `body` returns the exit status (`Ok` for OK). The arguments are the
/// UPID's fields plus timing; a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
fn spawn_task<F>(
    sh: &Arc<Shared>,
    node: &str,
    kind: &str,
    id: u32,
    user: &str,
    dur: Duration,
    wait_for: Option<Arc<Semaphore>>,
    body: F,
) -> String
where
    F: FnOnce(&mut SimState, Option<String>) -> Result<(), String> + Send + 'static,
{
    let (upid, injected, slow) = {
        let mut s = sh.state.lock().unwrap();
        s.pid += 1;
        let pid = s.pid + 100_000;
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let upid = format!(
            "UPID:{node}:{pid:08X}:{:08X}:{start:08X}:{kind}:{id}:{user}:",
            pid * 7
        );
        let injected = {
            let mut hit = None;
            for f in s.faults.fail_tasks.iter_mut() {
                if f.0 == kind && f.1 > 0 {
                    f.1 -= 1;
                    hit = Some(f.2.clone());
                    break;
                }
            }
            hit
        };
        let invisible = s.faults.invisible;
        s.tasks.insert(
            upid.clone(),
            SimTask {
                node: node.to_owned(),
                kind: kind.to_owned(),
                id: id.to_string(),
                user: user.to_owned(),
                starttime: start,
                pid,
                exitstatus: None,
                log: Vec::new(),
                invisible_polls: invisible,
            },
        );
        (upid, injected, s.faults.slow)
    };
    let sh2 = sh.clone();
    let u2 = upid.clone();
    tokio::spawn(async move {
        let _permit = match &wait_for {
            Some(sem) => sem.clone().acquire_owned().await.ok(),
            None => None,
        };
        tokio::time::sleep(dur + slow).await;
        let mut s = sh2.state.lock().unwrap();
        let r = body(&mut s, injected);
        s.note_peaks();
        if let Some(t) = s.tasks.get_mut(&u2) {
            match r {
                Ok(()) => {
                    t.log.push("TASK OK".into());
                    t.exitstatus = Some("OK".into());
                }
                Err(m) => {
                    t.log.push(m.clone());
                    t.log.push(format!("TASK ERROR: {m}"));
                    t.exitstatus = Some(m);
                }
            }
        }
    });
    upid
}

/// Options `clone_vm` does not copy from the source (qemu-server
/// `src/PVE/API2/Qemu.pm`, `clone_vm`, `$load_and_check`: "do not copy
/// snapshot related info", `unusedN`; `template` is deleted in `$clonefn`).
/// EVERYTHING else is copied: `protection`, `tags`, `description` (unless the
/// request names one), `smbios1` (with a new uuid), `onboot`, `hookscript`, ...
const CLONE_SKIPPED: [&str; 9] = [
    "snapshots",
    "parent",
    "snaptime",
    "vmstate",
    "snapstate",
    "runningcpu",
    "runningmachine",
    "running-nets-host-mtu",
    "template",
];

/// The disks of a config: (key, storage id). CD-ROMs and `none` are not
/// disks (`drive_is_cdrom`).
fn disks(config: &BTreeMap<String, String>) -> Vec<(String, String)> {
    config
        .iter()
        .filter(|(k, v)| {
            let bus = k.trim_end_matches(|c: char| c.is_ascii_digit());
            (matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus.len() < k.len()
                || matches!(k.as_str(), "efidisk0" | "tpmstate0"))
                // `drive_is_cdrom($drive, 1)`: a cloud-init drive is cloned.
                && (!v.contains("media=cdrom") || v.contains("cloudinit"))
                && !v.starts_with("none")
        })
        .filter_map(|(k, v)| {
            v.split_once(':')
                .map(|(sid, _)| (k.clone(), sid.to_owned()))
        })
        .collect()
}

/// Replaces the `uuid=` of an `smbios1` value (`$clonefn`: "auto generate a
/// new uuid"), keeping the rest (a template's `serial` survives).
fn new_smbios_uuid(old: Option<&String>, vmid: u32) -> String {
    let mut parts: Vec<String> = old
        .map(|o| {
            o.split(',')
                .filter(|p| !p.starts_with("uuid="))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    parts.insert(0, format!("uuid=00000000-0000-4000-8000-{vmid:012}"));
    parts.join(",")
}

/// `POST .../clone`, after qemu-server `PVE/API2/Qemu.pm` `clone_vm`:
/// - synchronously (`$load_and_check` runs before `fork_worker`): the pool,
///   the target node, `storage` (shared when there is a target: `can't clone
///   to non-shared storage`), the source's config lock (`check_lock`: `VM is
///   locked (backup)` during a backup), linked vs full, local storage with a
///   target (`can't clone VM to node 'X' (VM uses local storage)`), the new
///   id;
/// - in the worker: the source's config lock (`lock_config_shared`, 1 s:
///   `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`,
///   a FAILED TASK, nothing made), then the new VM (`lock: clone`) and its
///   disks; a storage lock failing there (`cfs-lock 'storage-X' error: got
///   lock request timeout`, pve-storage `cluster_lock_storage`) ends the task
///   with `clone failed: ...` after removing the new VM.
fn clone_vm(sh: &Arc<Shared>, node: &str, p: &HashMap<String, Vec<String>>, user: &str) -> HResult {
    let src = vmid_of(p);
    let newid: u32 = one(p, "newid").and_then(|v| v.parse().ok()).unwrap_or(0);
    let target = one(p, "target").filter(|t| *t != node).map(str::to_owned);
    let (full, dur, in_task) = {
        let mut s = sh.state.lock().unwrap();
        if let Some(pool) = one(p, "pool")
            && !s.resource_pools.contains(pool)
        {
            return Err(Fail::e500(format!("pool '{pool}' does not exist")));
        }
        if let Some(t) = &target {
            match s.nodes.get(t) {
                None => return Err(Fail::e500(format!("no such cluster node '{t}'"))),
                Some(n) if !n.online => {
                    return Err(Fail::e500(format!("target node '{t}' is not online")));
                }
                _ => {}
            }
        }
        if let Some(sid) = one(p, "storage") {
            let Some(st) = s.storages.get(sid) else {
                return Err(Fail::e500(format!("storage '{sid}' does not exist")));
            };
            if target.is_some() && !st.shared {
                return Err(Fail::e500(format!(
                    "can't clone to non-shared storage '{sid}'"
                )));
            }
        }
        let source = find(&mut s, node, src)?.clone();
        locked(&source)?;
        let full = flag(p, "full").unwrap_or(!source.template);
        if one(p, "storage").is_some() && !full {
            return Err(Fail::e500(
                "parameter 'storage' not allowed for linked clones",
            ));
        }
        if !full && !source.template {
            return Err(Fail::e500(
                "Linked clone feature is not supported for drive 'scsi0'",
            ));
        }
        let source_disks = disks(&source.config);
        let shared_vm = source_disks
            .iter()
            .all(|(_, sid)| s.storages.get(sid).is_some_and(|st| st.shared));
        if let Some(t) = &target
            && !shared_vm
        {
            return Err(Fail::e500(format!(
                "can't clone VM to node '{t}' (VM uses local storage)"
            )));
        }
        if s.vms.contains_key(&newid) {
            return Err(Fail::e500(format!(
                "unable to create VM {newid}: config file already exists"
            )));
        }
        let d = &sh.opts.durations;
        let dur = if full { d.full_clone } else { d.linked_clone };
        // The source's lock is taken in the worker: its timeout fails the
        // task, and no VM is made.
        let contention = s.faults.clone_contention;
        if s.faults.clone_lock_timeouts > 0
            || (contention > 0.0 && rand::rng().random_bool(contention.min(1.0)))
        {
            s.faults.clone_lock_timeouts = s.faults.clone_lock_timeouts.saturating_sub(1);
            let msg =
                format!("can't lock file '/var/lock/qemu-server/lock-{src}.conf' - got timeout");
            drop(s);
            let upid = spawn_task(
                sh,
                node,
                "qmclone",
                src,
                user,
                dur / 4,
                None,
                move |_, _| Err(msg),
            );
            return Ok(json!(upid));
        }
        let storage_lock = if s.faults.clone_storage_lock_timeouts > 0 {
            s.faults.clone_storage_lock_timeouts -= 1;
            let sid = one(p, "storage")
                .map(str::to_owned)
                .or_else(|| source_disks.first().map(|(_, sid)| sid.clone()))
                .unwrap_or_else(|| "local-lvm".into());
            Some(format!(
                "clone failed: cfs-lock 'storage-{sid}' error: got lock request timeout"
            ))
        } else {
            None
        };
        let mut config: BTreeMap<String, String> = source
            .config
            .iter()
            .filter(|(k, _)| !CLONE_SKIPPED.contains(&k.as_str()) && !k.starts_with("unused"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        config.insert(
            "name".into(),
            one(p, "name")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("Copy-of-VM-{}", source.name())),
        );
        // `if ($param->{description})`: an empty one keeps the source's.
        if let Some(d) = one(p, "description").filter(|d| !d.is_empty()) {
            config.insert("description".into(), d.to_owned());
        }
        if let Some(pool) = one(p, "pool") {
            config.insert("pool".into(), pool.to_owned());
        }
        let smbios = new_smbios_uuid(config.get("smbios1"), newid);
        config.insert("smbios1".into(), smbios);
        for (i, (key, sid)) in source_disks.iter().enumerate() {
            let sid = if full {
                one(p, "storage").unwrap_or(sid)
            } else {
                sid
            };
            config.insert(key.clone(), format!("{sid}:vm-{newid}-disk-{i},size=8G"));
        }
        let vm = SimVm {
            vmid: newid,
            node: target.clone().unwrap_or_else(|| node.to_owned()),
            template: false,
            running: false,
            config,
            lock: Some("clone".into()),
            agent_ready_at: None,
            agent_files: Vec::new(),
            agent_execs: Vec::new(),
            disks_freed: false,
        };
        s.vms.insert(newid, vm);
        s.note_peaks();
        (full, dur, storage_lock)
    };
    let slot = {
        let mut slots = sh.clone_slots.lock().unwrap();
        slots
            .entry(src)
            .or_insert_with(|| Arc::new(Semaphore::new(sh.opts.clone_parallelism.max(1))))
            .clone()
    };
    let upid = spawn_task(
        sh,
        node,
        "qmclone",
        src,
        user,
        dur,
        Some(slot),
        move |s, injected| {
            if let Some(m) = injected.map(|m| format!("clone failed: {m}")).or(in_task) {
                // `$clonefn` frees the new volumes and unlinks the config.
                s.vms.remove(&newid);
                return Err(m);
            }
            match s.vms.get_mut(&newid) {
                Some(vm) => {
                    vm.lock = None;
                    Ok(())
                }
                None => Err(format!("clone failed: VM {newid} vanished")),
            }
        },
    );
    let mut s = sh.state.lock().unwrap();
    if let Some(t) = s.tasks.get_mut(&upid) {
        t.log.push(format!(
            "create {} clone of drive scsi0",
            if full { "full" } else { "linked" }
        ));
    }
    Ok(json!(upid))
}

fn start_vm(sh: &Arc<Shared>, node: &str, vmid: u32, user: &str) -> HResult {
    {
        let mut s = sh.state.lock().unwrap();
        let vm = find(&mut s, node, vmid)?;
        if vm.template {
            return Err(Fail::e500("you can't start a vm if it's a template"));
        }
        locked(vm)?;
    }
    let dur = sh.opts.durations.start;
    let agent_after = sh.opts.durations.agent_ready;
    let node2 = node.to_owned();
    Ok(json!(spawn_task(
        sh,
        node,
        "qmstart",
        vmid,
        user,
        dur,
        None,
        move |s, injected| {
            if let Some(m) = injected {
                return Err(m);
            }
            let vm = find(s, &node2, vmid).map_err(|Fail(_, m)| m)?;
            if vm.running {
                return Err(format!("VM {vmid} already running"));
            }
            vm.running = true;
            vm.agent_ready_at = vm.agent_enabled().then(|| Instant::now() + agent_after);
            Ok(())
        }
    )))
}

fn stop_vm(sh: &Arc<Shared>, node: &str, vmid: u32, user: &str) -> HResult {
    {
        let mut s = sh.state.lock().unwrap();
        let vm = find(&mut s, node, vmid)?;
        if vm.lock.as_deref() == Some("clone") {
            locked(vm)?;
        }
    }
    let dur = sh.opts.durations.stop;
    Ok(json!(spawn_task(
        sh,
        node,
        "qmstop",
        vmid,
        user,
        dur,
        None,
        move |s, injected| {
            if let Some(m) = injected {
                return Err(m);
            }
            if let Some(vm) = s.vms.get_mut(&vmid) {
                vm.running = false;
                vm.agent_ready_at = None;
            }
            Ok(())
        }
    )))
}

/// `DELETE .../qemu/{vmid}`, after qemu-server `PVE/API2/Qemu.pm`
/// `destroy_vm` and `PVE/QemuServer.pm` `destroy_vm`: `$early_checks`
/// (config exists, `check_protection`: `can't remove VM N - protection mode
/// enabled`, running: `VM N is running - destroy failed`) run before the
/// worker and again inside it; the worker then checks the config lock, frees
/// the VM's own disks and, with `destroy-unreferenced-disks=1`, lists every
/// storage (pve-storage `vdisk_list` -> `activate_storage_list`), which dies
/// on one that is offline (`storage 'X' is not online`) AFTER the own disks
/// are freed and BEFORE the config is removed: the VM stays, disks gone.
fn destroy_vm(
    sh: &Arc<Shared>,
    node: &str,
    vmid: u32,
    user: &str,
    p: &HashMap<String, Vec<String>>,
) -> HResult {
    fn early_checks(s: &mut SimState, node: &str, vmid: u32) -> Result<(), Fail> {
        let vm = find(s, node, vmid)?;
        if vm.config.get("protection").is_some_and(|v| v == "1") {
            return Err(Fail::e500(format!(
                "can't remove VM {vmid} - protection mode enabled"
            )));
        }
        if vm.running {
            return Err(Fail::e500(format!("VM {vmid} is running - destroy failed")));
        }
        Ok(())
    }
    early_checks(&mut sh.state.lock().unwrap(), node, vmid)?;
    let unreferenced = flag(p, "destroy-unreferenced-disks").unwrap_or(false);
    let dur = sh.opts.durations.destroy;
    let node2 = node.to_owned();
    Ok(json!(spawn_task(
        sh,
        node,
        "qmdestroy",
        vmid,
        user,
        dur,
        None,
        move |s, injected| {
            if let Some(m) = injected {
                return Err(m);
            }
            early_checks(s, &node2, vmid).map_err(|Fail(_, m)| m)?;
            let vm = find(s, &node2, vmid).map_err(|Fail(_, m)| m)?;
            locked(vm).map_err(|Fail(_, m)| m)?;
            vm.disks_freed = true;
            if unreferenced && let Some(off) = s.storages.values().find(|st| !st.online) {
                return Err(format!("storage '{}' is not online", off.id));
            }
            s.vms.remove(&vmid);
            Ok(())
        }
    )))
}

fn task_status(sh: &Shared, node: &str, upid: &str) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let t = match s.tasks.get_mut(upid) {
        Some(t) if t.node == node => t,
        _ => return Err(Fail::e500(format!("unable to parse worker upid '{upid}'"))),
    };
    if t.invisible_polls > 0 {
        t.invisible_polls -= 1;
        return Err(Fail(400, "no such task".into()));
    }
    let mut v = json!({
        "upid": upid, "node": t.node, "pid": t.pid, "pstart": t.pid * 7, "starttime": t.starttime,
        "type": t.kind, "id": t.id, "user": t.user,
        "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
    });
    if let Some(e) = &t.exitstatus {
        v["exitstatus"] = json!(e);
    }
    Ok(v)
}

fn task_log(sh: &Shared, node: &str, p: &HashMap<String, Vec<String>>) -> HResult {
    let upid = one(p, "upid").unwrap_or("");
    let start: usize = one(p, "start").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit: usize = one(p, "limit").and_then(|v| v.parse().ok()).unwrap_or(50);
    let s = sh.state.lock().unwrap();
    let t = match s.tasks.get(upid) {
        Some(t) if t.node == node => t,
        _ => return Err(Fail::e500(format!("unable to parse worker upid '{upid}'"))),
    };
    Ok(Value::Array(
        t.log
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, l)| json!({"n": i + 1, "t": l}))
            .collect(),
    ))
}

fn agent(
    sh: &Shared,
    node: &str,
    vmid: u32,
    template: &str,
    p: &HashMap<String, Vec<String>>,
) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    if !vm.running {
        return Err(Fail::e500(format!("VM {vmid} is not running")));
    }
    if !vm.agent_enabled() {
        return Err(Fail::e500("No QEMU guest agent configured"));
    }
    if vm.agent_ready_at.is_none_or(|t| Instant::now() < t) {
        return Err(Fail::e500("QEMU guest agent is not running"));
    }
    match template.rsplit('/').next().unwrap_or("") {
        "ping" => Ok(json!({"result": {}})),
        "file-write" => {
            let file = one(p, "file").unwrap_or("").to_owned();
            let content = one(p, "content").unwrap_or("").to_owned();
            vm.agent_files.push((file, content));
            Ok(Value::Null)
        }
        "exec" => {
            vm.agent_execs
                .push(p.get("command").cloned().unwrap_or_default());
            Ok(json!({"pid": 1000 + vm.agent_execs.len()}))
        }
        _ => Ok(json!({"exited": 0})),
    }
}
