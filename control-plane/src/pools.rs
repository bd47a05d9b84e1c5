//! Configured pools, their provisioners, and label routing.
//!
//! Backends come from three places, by the pool's `provisioner.type`:
//! - in-process backends, built by a [`ProvisionerRegistry`] the binary
//!   fills (this library knows none but the ones it is given: the
//!   `grs-control-plane` binary registers `fake` and `proxmox`);
//! - `grpc`: a plugin GRS reaches at an endpoint ([`GrpcProvisioner`]);
//! - `plugin`: a plugin executable GRS starts, supervises and stops itself
//!   ([`Plugin`]), reached over a unix socket.
//!
//! One backend object serves every pool of its kind (same `type`, or same
//! `endpoint`/`command`); each pool's section is its
//! [`PoolDocument`](grs_provisioner::PoolDocument),
//! checked by the backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use grs_config::ConfigError;
use grs_provisioner::{FakeProvisioner, LedgerError, NodeLedger, Provisioner, ProvisionerError};
use grs_provisioner_grpc::plugin::{Plugin, PluginCommand, SupervisorOptions};
use grs_provisioner_grpc::{Address, ClientOptions, GrpcProvisioner, Target};

use crate::config::{Config, PoolConfig, ProvisionerConfig};
use crate::store::{PoolLimits, Store};

/// The installation's node places, kept in the store (Redis: shared by
/// every replica) and handed to every backend
/// ([`Provisioner::use_node_ledger`]) by [`server::run`](crate::server::run).
#[derive(Debug, Clone)]
pub struct StoreNodeLedger {
    store: Arc<dyn Store>,
}

impl StoreNodeLedger {
    /// Places in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl NodeLedger for StoreNodeLedger {
    async fn reserve(
        &self,
        node: &str,
        instance: &str,
        max: u32,
        visible: &[String],
    ) -> Result<bool, LedgerError> {
        self.store
            .reserve_node(node, instance, max, visible)
            .await
            .map_err(|e| LedgerError { source: e.into() })
    }

    async fn release(&self, node: &str, instance: &str) -> Result<(), LedgerError> {
        self.store
            .release_node(node, instance)
            .await
            .map_err(|e| LedgerError { source: e.into() })
    }
}

/// Builds an in-process backend. Called once per `type`, when the first
/// pool of that type is configured; errors name the key to fix.
pub type ProvisionerFactory =
    Arc<dyn Fn() -> Result<Arc<dyn Provisioner>, ConfigError> + Send + Sync>;

/// In-process backends by `type`, filled by the binary.
#[derive(Clone, Default)]
pub struct ProvisionerRegistry {
    factories: BTreeMap<String, ProvisionerFactory>,
}

impl std::fmt::Debug for ProvisionerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl ProvisionerRegistry {
    /// An empty registry (only `grpc` and `plugin` pools work).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `factory` for `type = kind` (replacing an earlier one).
    pub fn register(&mut self, kind: impl Into<String>, factory: ProvisionerFactory) {
        self.factories.insert(kind.into(), factory);
    }

    /// [`register`](Self::register), by value.
    pub fn with(mut self, kind: impl Into<String>, factory: ProvisionerFactory) -> Self {
        self.register(kind, factory);
        self
    }

    /// The registered types.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }
}

/// The factory of the in-memory fake (`type = "fake"`): one
/// [`FakeProvisioner`] for all fake pools.
pub fn fake_factory() -> ProvisionerFactory {
    Arc::new(|| Ok(Arc::new(FakeProvisioner::new()) as Arc<dyn Provisioner>))
}

/// A plugin to start, and where its client looks for it.
#[derive(Debug)]
struct PluginSlot {
    /// The first pool using it, for error messages.
    pool: String,
    command: Vec<String>,
    address: Arc<Mutex<Option<Address>>>,
    running: Option<Plugin>,
}

/// One configured pool with its backend.
#[derive(Debug, Clone)]
pub struct Pool {
    /// The pool's name (`[pools.<name>]`).
    pub name: String,
    /// Its configuration.
    pub config: PoolConfig,
    /// Labels lower-cased, for matching.
    labels_lower: Vec<String>,
    /// The backend that makes its instances.
    pub provisioner: Arc<dyn Provisioner>,
}

impl Pool {
    /// A pool served by `provisioner`.
    pub fn new(
        name: impl Into<String>,
        config: PoolConfig,
        provisioner: Arc<dyn Provisioner>,
    ) -> Self {
        let labels_lower = config
            .labels
            .iter()
            .map(|l| l.trim().to_lowercase())
            .collect();
        Self {
            name: name.into(),
            config,
            labels_lower,
            provisioner,
        }
    }

    /// Whether the pool has every one of `labels` (case-insensitive).
    pub fn serves(&self, labels: &[String]) -> bool {
        labels
            .iter()
            .all(|l| self.labels_lower.contains(&l.trim().to_lowercase()))
    }

    /// The configured limits the store checks (operator overrides win).
    pub fn limits(&self) -> PoolLimits {
        PoolLimits {
            max_instances: self.config.max_instances,
            paused: self.config.paused,
            min_idle: self.config.min_idle,
        }
    }
}

/// All pools of this control plane, by name, and the plugin processes
/// serving them.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pools: BTreeMap<String, Pool>,
    plugins: Arc<Mutex<Vec<PluginSlot>>>,
}

/// `pools.<name>.provisioner[.<key>]` and the message of a backend's
/// configuration error (backends name the key themselves when they can).
fn backend_config_error(pool: &str, e: ProvisionerError) -> ConfigError {
    let key = format!("pools.{pool}.provisioner");
    let message = match e {
        ProvisionerError::Config(m) | ProvisionerError::InvalidSpec(m) => m,
        other => other.to_string(),
    };
    match message.split_once(": ") {
        Some((k, rest)) if k.starts_with(&key) && !k.contains(' ') => ConfigError::key(k, rest),
        _ => ConfigError::key(key, message),
    }
}

impl Pools {
    /// The given pools.
    pub fn new(pools: impl IntoIterator<Item = Pool>) -> Self {
        Self {
            pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
            plugins: Arc::default(),
        }
    }

    /// Builds each configured pool's backend from its `type` and gives it
    /// the pool's document ([`Provisioner::configure_pool`]). Errors name
    /// the pool's key. Makes no request and starts no process (see
    /// [`start_plugins`](Self::start_plugins) and
    /// [`Provisioner::validate_pool`]); must run within a tokio runtime
    /// (gRPC clients are made here, connecting lazily).
    pub fn from_config(
        config: &Config,
        registry: &ProvisionerRegistry,
    ) -> Result<Self, ConfigError> {
        let mut backends: BTreeMap<String, Arc<dyn Provisioner>> = BTreeMap::new();
        let mut plugins = Vec::new();
        let mut pools = Vec::new();
        for (name, cfg) in &config.pools {
            let key = format!("pools.{name}.provisioner");
            let pc = cfg.provisioner.as_ref().ok_or_else(|| {
                ConfigError::key(&key, "every pool needs a provisioner section with its type")
            })?;
            let id = match pc.kind.as_str() {
                "grpc" => format!("grpc {}", pc.endpoint.as_deref().unwrap_or_default()),
                "plugin" => format!("plugin {:?}", pc.command),
                kind => kind.to_owned(),
            };
            let provisioner = match backends.get(&id) {
                Some(p) => p.clone(),
                None => {
                    let made = Self::build(name, pc, registry, &mut plugins)?;
                    backends.insert(id, made.clone());
                    made
                }
            };
            provisioner
                .configure_pool(name, &pc.document)
                .map_err(|e| backend_config_error(name, e))?;
            pools.push(Pool::new(name.clone(), cfg.clone(), provisioner));
        }
        let mut made = Self::new(pools);
        made.plugins = Arc::new(Mutex::new(plugins));
        Ok(made)
    }

    fn build(
        pool: &str,
        pc: &ProvisionerConfig,
        registry: &ProvisionerRegistry,
        plugins: &mut Vec<PluginSlot>,
    ) -> Result<Arc<dyn Provisioner>, ConfigError> {
        let key = |k: &str| format!("pools.{pool}.provisioner.{k}");
        let defaults = ClientOptions::default();
        let opts = ClientOptions {
            call_timeout: pc.call_timeout.unwrap_or(defaults.call_timeout),
            create_timeout: pc.create_timeout.unwrap_or(defaults.create_timeout),
            ..defaults
        };
        Ok(match pc.kind.as_str() {
            "grpc" => {
                let endpoint = pc.endpoint.as_deref().unwrap_or_default();
                let addr = Address::parse(endpoint)
                    .map_err(|e| ConfigError::key(key("endpoint"), e.to_string()))?;
                Arc::new(GrpcProvisioner::new(Target::Fixed(addr), opts))
            }
            "plugin" => {
                let command = pc.command.clone().unwrap_or_default();
                if command.first().is_none_or(|p| p.is_empty()) {
                    return Err(ConfigError::key(
                        key("command"),
                        "must name the plugin's program",
                    ));
                }
                let address = Arc::new(Mutex::new(None));
                plugins.push(PluginSlot {
                    pool: pool.to_owned(),
                    command,
                    address: address.clone(),
                    running: None,
                });
                Arc::new(GrpcProvisioner::new(Target::Plugin(address), opts))
            }
            kind => {
                let factory = registry.factories.get(kind).ok_or_else(|| {
                    let known: Vec<&str> = registry.kinds().chain(["grpc", "plugin"]).collect();
                    ConfigError::key(
                        key("type"),
                        format!(
                            "unknown provisioner type {kind:?}; this binary knows: {}",
                            known.join(", ")
                        ),
                    )
                })?;
                factory()?
            }
        })
    }

    /// Starts the plugin processes of `type = "plugin"` pools, each with a
    /// unix socket in `socket_dir`, and waits until each has printed its
    /// handshake line. An error names the first pool using the plugin.
    /// Crashed plugins are restarted by their supervisors until
    /// [`stop_plugins`](Self::stop_plugins).
    pub async fn start_plugins(
        &self,
        socket_dir: &std::path::Path,
        opts: &SupervisorOptions,
    ) -> Result<(), ConfigError> {
        let mut waits = Vec::new();
        {
            let mut slots = self.plugins.lock().unwrap();
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.running.is_some() {
                    continue;
                }
                let socket: PathBuf = socket_dir.join(format!("plugin-{i}.sock"));
                let plugin = Plugin::spawn_into(
                    PluginCommand {
                        command: slot.command.clone(),
                        env: Vec::new(),
                    },
                    socket,
                    opts.clone(),
                    slot.address.clone(),
                );
                waits.push((slot.pool.clone(), plugin.state_watch()));
                slot.running = Some(plugin);
            }
        }
        for (pool, mut state) in waits {
            Plugin::wait_running_on(&mut state, opts.start_timeout + Duration::from_secs(1))
                .await
                .map_err(|m| {
                    ConfigError::key(
                        format!("pools.{pool}.provisioner.command"),
                        format!("the plugin did not start: {m}"),
                    )
                })?;
        }
        Ok(())
    }

    /// Stops every plugin process (stdin closed, killed after the grace
    /// period) and waits for them.
    pub async fn stop_plugins(&self) {
        let running: Vec<Plugin> = self
            .plugins
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(|s| s.running.take())
            .collect();
        for p in running {
            p.shutdown().await;
        }
    }

    /// Every distinct backend, with the pools it serves.
    pub fn backends(&self) -> Vec<(Arc<dyn Provisioner>, Vec<String>)> {
        let mut out: Vec<(Arc<dyn Provisioner>, Vec<String>)> = Vec::new();
        for pool in self.pools.values() {
            match out
                .iter_mut()
                .find(|(b, _)| Arc::ptr_eq(b, &pool.provisioner))
            {
                Some((_, names)) => names.push(pool.name.clone()),
                None => out.push((pool.provisioner.clone(), vec![pool.name.clone()])),
            }
        }
        out
    }

    /// The pool for a job's labels: every label of the job among the pool's
    /// (case-insensitive); of several, the one with the fewest labels, then
    /// by name. `None` when no pool serves them, or when the job has no
    /// labels at all (GitHub's check-run completions): GRS never provisions
    /// for a job that did not ask for self-hosted runners.
    pub fn route(&self, labels: &[String]) -> Option<&Pool> {
        if labels.is_empty() {
            return None;
        }
        self.pools
            .values()
            .filter(|p| p.serves(labels))
            .min_by_key(|p| (p.labels_lower.len(), p.name.clone()))
    }

    /// A pool by name.
    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// All pools, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, labels: &[&str]) -> Pool {
        let cfg = PoolConfig {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            ..PoolConfig::default()
        };
        Pool::new(name, cfg, Arc::new(FakeProvisioner::new()))
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_job_label_must_be_among_the_pools_case_insensitively() {
        let pools = Pools::new([pool("linux", &["self-hosted", "linux", "x64"])]);
        assert_eq!(
            pools
                .route(&labels(&["Self-Hosted", "LINUX"]))
                .map(|p| p.name.as_str()),
            Some("linux")
        );
        assert!(
            pools
                .route(&labels(&["self-hosted", "linux", "arm64"]))
                .is_none()
        );
        assert!(pools.route(&labels(&["ubuntu-latest"])).is_none());
    }

    #[test]
    fn jobs_without_labels_are_not_routed() {
        let pools = Pools::new([pool("linux", &["self-hosted"])]);
        assert!(pools.route(&[]).is_none());
    }

    #[test]
    fn the_least_specialised_matching_pool_wins() {
        let pools = Pools::new([
            pool("gpu", &["self-hosted", "linux", "gpu"]),
            pool("linux", &["self-hosted", "linux"]),
        ]);
        assert_eq!(
            pools
                .route(&labels(&["self-hosted", "linux"]))
                .unwrap()
                .name,
            "linux"
        );
        assert_eq!(
            pools.route(&labels(&["self-hosted", "gpu"])).unwrap().name,
            "gpu"
        );
    }
}
