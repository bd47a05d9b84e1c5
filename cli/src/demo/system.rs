//! The whole of GRS in one process, every part on its own loopback socket:
//! the PVE simulator (HTTPS, pinned certificate) driven by the real
//! `ProxmoxProvisioner`, the GitHub simulator (REST API and signed
//! webhooks), the real control plane (gRPC) and the real webhook gateway
//! (HTTP). The parts talk to each other only over those sockets, exactly as
//! separate processes would.
//!
//! [`System::start`] is shared by `grs demo` and the end-to-end tests, so the
//! wiring (which URL goes where, which secret is whose) exists once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use grs_control_plane::config::{Config, PoolConfig, ProvisionerConfig, StoreKind};
use grs_control_plane::github::GitHubRegistrar;
use grs_control_plane::pools::{Pools, ProvisionerRegistry};
use grs_control_plane::server::{self, ControlPlane, ServerError};
use grs_control_plane::store::{MemoryStore, RedisStore, RedisStoreOptions, Store};
use grs_github::GitHubConfig;
use grs_github::sim::{GitHubSim, SimConfig};
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use grs_provisioner_proxmox::sim::{PveSim, SimOptions, TaskDurations};
use grs_provisioner_proxmox::{NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
use grs_webhook_gateway::config::{GatewayConfig, ResolvedSecrets};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::DemoError;

/// The simulated hypervisor node every template and clone lives on.
pub const NODE: &str = "pve1";
/// The personal access token the GitHub simulator accepts and the control
/// plane uses.
const GITHUB_TOKEN: &str = "ghp_simulated_personal_access_token";

/// One pool of the assembled system.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Pool name (`[pools.<name>]`).
    pub name: String,
    /// The labels its runners register with; a job asking for all of them
    /// (and nothing else) lands here.
    pub labels: Vec<String>,
    /// Most live instances at once.
    pub max_instances: u32,
    /// The template its VMs are linked clones of (made in the simulator).
    pub template_vmid: u32,
    /// Cores of each VM (the template's when `None`).
    pub cores: Option<u32>,
    /// Memory of each VM, MiB (the template's when `None`).
    pub memory_mib: Option<u64>,
    /// Booted instances with an idle runner kept ready (`min_idle`).
    pub min_idle: u32,
}

impl PoolSpec {
    /// The two pools of the demo: `linux` (32 VMs, the template's size) and
    /// `linux-large` (16 VMs of 8 cores and 16 GiB). Their label sets are
    /// disjoint in the label that matters (`linux` vs `linux-large`), so a
    /// runner of one pool never takes the other pool's jobs.
    pub fn demo_pools() -> Vec<PoolSpec> {
        vec![
            PoolSpec {
                name: "linux".into(),
                labels: vec!["self-hosted".into(), "linux".into(), "x64".into()],
                max_instances: 32,
                template_vmid: 9000,
                cores: None,
                memory_mib: None,
                min_idle: 0,
            },
            PoolSpec {
                name: "linux-large".into(),
                labels: vec!["self-hosted".into(), "linux-large".into(), "x64".into()],
                max_instances: 16,
                template_vmid: 9001,
                cores: Some(8),
                memory_mib: Some(16 * 1024),
                min_idle: 0,
            },
        ]
    }
}

/// Where the durable state lives.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// Process memory (nothing survives the process).
    Memory,
    /// A Redis server; every key under `prefix`.
    Redis {
        /// `redis://host:port[/db]`.
        url: String,
        /// Key prefix, private to this run.
        prefix: String,
    },
}

/// How to assemble the system.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// The pools (and their templates).
    pub pools: Vec<PoolSpec>,
    /// How long the simulated Proxmox tasks take.
    pub pve_durations: TaskDurations,
    /// How long a simulated job runs once a runner took it, unless the job
    /// says otherwise.
    pub job_duration: Duration,
    /// The store.
    pub store: StoreChoice,
    /// Multiplies the Proxmox client's task polling and retry delays (their
    /// production defaults), so a fast simulation is not polled at a
    /// realistic pace.
    pub time_scale: f64,
    /// `control_plane.installation_id`.
    pub installation_id: String,
    /// `control_plane.instance_prefix`.
    pub instance_prefix: String,
    /// `control_plane.reconcile_interval`; `None`: the control plane's
    /// default. A benchmark that counts PVE calls per VM sets it longer
    /// than its run, so no reconciler pass is counted as a VM's.
    pub reconcile_interval: Option<Duration>,
    /// Proxmox nodes (`pve1`, `pve2`, …; at least one). The templates are on
    /// node-local storage on `pve1`; with more nodes, each other node has a
    /// copy of every pool's template (`template_replicas`, vmid
    /// `template_vmid + 10000 × (n - 1)` on `pve<n>`), as a cluster on local
    /// storage needs to clone on every node.
    pub nodes: u32,
}

impl Default for SystemOptions {
    fn default() -> Self {
        Self {
            pools: PoolSpec::demo_pools(),
            pve_durations: TaskDurations::default(),
            job_duration: Duration::from_secs(30),
            store: StoreChoice::Memory,
            time_scale: 1.0,
            installation_id: "grs-demo".into(),
            instance_prefix: "grs".into(),
            reconcile_interval: None,
            nodes: 1,
        }
    }
}

/// The running system. Stop it with [`System::shutdown`]; dropping it
/// leaves its tasks running until the runtime ends.
#[derive(Debug)]
pub struct System {
    /// The GitHub simulator (REST API at [`GitHubSim::url`]).
    pub github: GitHubSim,
    /// The PVE simulator (API at [`PveSim::url`], HTTPS).
    pub pve: PveSim,
    /// The pools, as configured.
    pub pools: Vec<PoolSpec>,
    /// `control_plane.instance_prefix`: VMs are `<prefix>-<job id>`.
    pub instance_prefix: String,
    /// Where the control plane serves gRPC.
    pub control_plane_addr: SocketAddr,
    /// Where the gateway serves HTTP (`/webhook`, `/cloud-init/…`,
    /// `/metrics`, `/healthz`).
    pub gateway_addr: SocketAddr,
    /// Where the control plane serves its Prometheus metrics (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// What the store is, in words (`memory`, `redis://… prefix …`).
    pub store_description: String,
    api: Option<ControlPlaneClient<Channel>>,
    cp_stop: CancellationToken,
    cp_task: JoinHandle<Result<(), ServerError>>,
    gw_stop: CancellationToken,
    gw_task: JoinHandle<Result<(), grs_webhook_gateway::GatewayError>>,
}

/// Scales `d` by `f`, never below `floor`.
pub(crate) fn scaled(d: Duration, f: f64, floor: Duration) -> Duration {
    d.mul_f64(f).max(floor)
}

impl System {
    /// Starts every part, wires them together and waits until the control
    /// plane answers. Nothing is left running when it fails.
    pub async fn start(opts: SystemOptions) -> Result<Self, DemoError> {
        // Proxmox: a node with room for every pool's maximum, a template
        // per pool.
        let pve = PveSim::start(SimOptions {
            tls: true,
            durations: opts.pve_durations,
            ..SimOptions::default()
        })
        .await
        .map_err(|e| DemoError::Start("the PVE simulator", e.to_string()))?;
        let need_gib: u64 = opts
            .pools
            .iter()
            .map(|p| u64::from(p.max_instances) * p.memory_mib.unwrap_or(2048).div_ceil(1024))
            .sum();
        for (i, node) in node_names(opts.nodes).iter().enumerate() {
            pve.add_node(node, need_gib + 16);
            for p in &opts.pools {
                pve.add_template(node, replica_vmid(p, i), &format!("runner-{}", p.name));
            }
        }

        // GitHub: deliveries go to the gateway, whose port is known once
        // its listener is bound (below).
        let github = GitHubSim::start(SimConfig {
            job_duration: opts.job_duration,
            pat: Some(GITHUB_TOKEN.into()),
            ..SimConfig::default()
        })
        .await
        .map_err(|e| DemoError::Start("the GitHub simulator", e.to_string()))?;

        let bind = |what: &'static str| async move {
            TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| DemoError::Start(what, e.to_string()))
        };
        let gw_listener = bind("the webhook gateway").await?;
        let gw_addr = local_addr(&gw_listener, "the webhook gateway")?;
        let cp_listener = bind("the control plane").await?;
        let cp_addr = local_addr(&cp_listener, "the control plane")?;
        let gw_url = format!("http://{gw_addr}");
        // The control plane binds its metrics port itself: take a free one
        // (released just before; another process could take it meanwhile,
        // which start-up would report).
        let metrics_addr = {
            let probe = bind("the control plane's metrics").await?;
            local_addr(&probe, "the control plane's metrics")?
        };

        let (mut config, pools) = control_plane_config(&opts, &pve, &github, &gw_url)?;
        config.control_plane.metrics_listen = Some(metrics_addr);
        let (store, store_description): (Arc<dyn Store>, String) = match &opts.store {
            StoreChoice::Memory => (Arc::new(MemoryStore::new()), "memory".into()),
            StoreChoice::Redis { url, prefix } => {
                let store = RedisStore::new(
                    url,
                    RedisStoreOptions {
                        prefix: prefix.clone(),
                        dedup_ttl: config.redis.dedup_ttl,
                        job_retention: config.redis.job_retention,
                        events_max: config.redis.events_max,
                        ..RedisStoreOptions::default()
                    },
                )
                .map_err(|e| DemoError::Start("the Redis store", e.to_string()))?;
                tokio::time::timeout(Duration::from_secs(5), store.ping())
                    .await
                    .map_err(|_| {
                        DemoError::Start("the Redis store", format!("{url} does not answer"))
                    })?
                    .map_err(|e| DemoError::Start("the Redis store", format!("{url}: {e}")))?;
                (Arc::new(store), format!("redis {url}, key prefix {prefix}"))
            }
        };
        let registrar = GitHubRegistrar::new(
            grs_github::GitHubClient::new(config.github.as_ref().expect("set above"))
                .map_err(|e| DemoError::Start("the GitHub client", e.to_string()))?,
        );
        let cp_stop = CancellationToken::new();
        let cp_task = tokio::spawn(server::run(
            ControlPlane {
                config,
                store,
                pools,
                registrar: Some(Arc::new(registrar)),
            },
            cp_listener,
            cp_stop.clone().cancelled_owned(),
        ));

        let gw_config = GatewayConfig {
            listen: gw_addr.to_string(),
            control_plane_url: format!("http://{cp_addr}"),
            public_url: Some(gw_url.clone()),
            shutdown_grace: Duration::from_secs(5),
            ..GatewayConfig::default()
        };
        let secrets = ResolvedSecrets {
            webhook_secret: SecretString::from(github.webhook_secret()),
            auth_token: None,
            tls_ca_pem: None,
        };
        let gw_stop = CancellationToken::new();
        let gw_task = tokio::spawn(grs_webhook_gateway::run_with(
            gw_config,
            secrets,
            gw_listener,
            gw_stop.clone().cancelled_owned(),
        ));
        github.set_webhook_url(format!("{gw_url}/webhook"));

        let mut system = Self {
            github,
            pve,
            pools: opts.pools,
            instance_prefix: opts.instance_prefix,
            control_plane_addr: cp_addr,
            gateway_addr: gw_addr,
            metrics_addr,
            store_description,
            api: None,
            cp_stop,
            cp_task,
            gw_stop,
            gw_task,
        };
        // The control plane listens already (its listener is bound); wait
        // until it serves, so the first job is not refused.
        match system.client().await {
            Ok(api) => system.api = Some(api),
            Err(e) => {
                system.shutdown().await.ok();
                return Err(e);
            }
        }
        Ok(system)
    }

    /// `http://127.0.0.1:PORT`, the control plane's gRPC URL.
    pub fn control_plane_url(&self) -> String {
        format!("http://{}", self.control_plane_addr)
    }

    /// `http://127.0.0.1:PORT`, the gateway's base URL.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway_addr)
    }

    /// A gRPC client of the control plane (one shared connection once the
    /// system is up; while it starts, connecting is retried for up to 5 s).
    pub async fn client(&self) -> Result<ControlPlaneClient<Channel>, DemoError> {
        if let Some(api) = &self.api {
            return Ok(api.clone());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match ControlPlaneClient::connect(self.control_plane_url()).await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(DemoError::Start("the control plane", e.to_string()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The instance name GRS gives the VM it makes for `job_id`.
    pub fn instance_name(&self, job_id: u64) -> String {
        format!("{}-{job_id}", self.instance_prefix)
    }

    /// Stops the gateway, then the control plane (it drains its workers
    /// within its grace period), then the simulators.
    pub async fn shutdown(self) -> Result<(), DemoError> {
        self.gw_stop.cancel();
        let gw = self.gw_task.await;
        self.cp_stop.cancel();
        let cp = self.cp_task.await;
        self.github.shutdown().await;
        self.pve.shutdown().await;
        match gw {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(DemoError::Stopped("the webhook gateway", e.to_string())),
            Err(e) => return Err(DemoError::Stopped("the webhook gateway", e.to_string())),
        }
        match cp {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DemoError::Stopped("the control plane", e.to_string())),
            Err(e) => Err(DemoError::Stopped("the control plane", e.to_string())),
        }
    }
}

fn local_addr(l: &TcpListener, what: &'static str) -> Result<SocketAddr, DemoError> {
    l.local_addr()
        .map_err(|e| DemoError::Start(what, e.to_string()))
}

/// The control plane's configuration for the system: the PVE simulator as
/// `[proxmox]` (pinned fingerprint, production client defaults with delays
/// scaled), the GitHub simulator as `[github]`, the gateway as
/// `gateway_url`, one `type = "proxmox"` pool per spec.
/// `pve1` … `pve<n>` (at least `pve1`).
fn node_names(n: u32) -> Vec<String> {
    (1..=n.max(1)).map(|i| format!("pve{i}")).collect()
}

/// The vmid of `pool`'s template on the `i`-th node (0: the template).
fn replica_vmid(pool: &PoolSpec, i: usize) -> u32 {
    pool.template_vmid + 10_000 * i as u32
}

fn control_plane_config(
    opts: &SystemOptions,
    pve: &PveSim,
    github: &GitHubSim,
    gw_url: &str,
) -> Result<(Config, Pools), DemoError> {
    let f = opts.time_scale;
    let mut conn = ProxmoxConfig::new(pve.url(), pve.token_id());
    conn.token_secret = Some(SecretString::from(pve.token_secret().to_owned()));
    conn.fingerprint = pve.fingerprint();
    conn.task_poll_min = scaled(conn.task_poll_min, f, Duration::from_millis(5));
    conn.task_poll_max = scaled(conn.task_poll_max, f, Duration::from_millis(20));
    for d in conn.task_expected.values_mut() {
        *d = scaled(*d, f, Duration::from_millis(5));
    }
    conn.retry_base_delay = scaled(conn.retry_base_delay, f, Duration::from_millis(10));
    conn.retry_max_delay = scaled(conn.retry_max_delay, f, Duration::from_millis(100));
    let nodes = node_names(opts.nodes);
    conn.nodes = nodes
        .iter()
        .map(|name| NodeConfig {
            name: name.clone(),
            max_instances: None,
            reserved_memory_mib: 1024,
        })
        .collect();

    let mut config = Config::default();
    let cp = &mut config.control_plane;
    cp.listen = ([127, 0, 0, 1], 0).into();
    cp.store = match opts.store {
        StoreChoice::Memory => StoreKind::Memory,
        StoreChoice::Redis { .. } => StoreKind::Redis,
    };
    cp.installation_id = opts.installation_id.clone();
    cp.instance_prefix = opts.instance_prefix.clone();
    cp.gateway_url = Some(gw_url.to_owned());
    cp.shutdown_grace = Duration::from_secs(5);
    if let Some(interval) = opts.reconcile_interval {
        cp.reconcile_interval = interval;
    }
    cp.retry_backoff = scaled(cp.retry_backoff, f, Duration::from_millis(20));
    cp.retry_backoff_max = scaled(cp.retry_backoff_max, f, Duration::from_millis(200));
    // Ended jobs of a demo need not outlive it by a week in someone's Redis.
    config.redis.job_retention = Duration::from_secs(3600);
    config.github = Some(GitHubConfig {
        api_url: github.url(),
        organization: Some(SimConfig::default().organization),
        token: Some(SecretString::from(GITHUB_TOKEN.to_owned())),
        ..GitHubConfig::default()
    });
    config.pools = opts
        .pools
        .iter()
        .map(|p| {
            let mut prov = ProxmoxPoolConfig::new(NODE, p.template_vmid);
            prov.cores = p.cores;
            prov.memory_mib = p.memory_mib;
            prov.template_replicas = nodes
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, node)| (node.clone(), replica_vmid(p, i)))
                .collect();
            (
                p.name.clone(),
                PoolConfig {
                    labels: p.labels.clone(),
                    max_instances: p.max_instances,
                    min_idle: p.min_idle,
                    provisioner: ProvisionerConfig::with_settings("proxmox", &prov).ok(),
                    ..PoolConfig::default()
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    config
        .validate()
        .map_err(|e| DemoError::Start("the control plane's configuration", e.to_string()))?;
    // The in-process Proxmox backend over the simulator's connection, as
    // the grs-control-plane binary registers it.
    let registry = ProvisionerRegistry::new().with(
        "proxmox",
        Arc::new(grs_provisioner_proxmox::factory(
            Some(conn),
            config.control_plane.installation_id.clone(),
            config.control_plane.instance_prefix.clone(),
        )),
    );
    let pools = Pools::from_config(&config, &registry)
        .map_err(|e| DemoError::Start("the control plane's pools", e.to_string()))?;
    Ok((config, pools))
}
