//! [`ProxmoxBackend`]: the `Provisioner` trait over one PVE connection,
//! serving every pool configured on it.
//!
//! The pools of one backend share its client, its placement reservations
//! and its VM ids in flight, so per-node limits hold across pools. Each pool
//! is a [`ProxmoxProvisioner`] over the shared connection; a call for a pool
//! that was never configured (a pool removed from the configuration) is
//! served by a provisioner that only knows the pool's name, which is all
//! `get`, `list`, `delete` and `remove_all` need (the ownership marker and
//! tags carry the pool name).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use grs_provisioner::{
    BootstrapKind, Capabilities, Instance, InstanceSpec, PoolDocument, Provisioner,
    ProvisionerError, validate_instance_name,
};

use crate::config::{BootstrapMode, NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
use crate::provisioner::{Backend, ProxmoxProvisioner};

/// The Proxmox VE backend: one connection (`[proxmox]`), any number of pools.
pub struct ProxmoxBackend {
    backend: Arc<Backend>,
    nodes: Vec<NodeConfig>,
    installation_id: String,
    prefix: String,
    url: String,
    pools: Mutex<HashMap<String, Arc<ProxmoxProvisioner>>>,
}

impl std::fmt::Debug for ProxmoxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pools: Vec<String> = self.pools.lock().unwrap().keys().cloned().collect();
        f.debug_struct("ProxmoxBackend")
            .field("url", &self.url)
            .field("pools", &pools)
            .finish_non_exhaustive()
    }
}

impl ProxmoxBackend {
    /// A backend for the connection `conn`, marking VMs with
    /// `installation_id` and naming them `<prefix>-<job>`. Validates the
    /// settings and reads the token secret; makes no request.
    pub fn new(
        conn: &ProxmoxConfig,
        installation_id: &str,
        prefix: &str,
    ) -> Result<Self, ProvisionerError> {
        conn.validate()
            .map_err(|e| ProvisionerError::Config(e.to_string()))?;
        if installation_id.trim().is_empty() {
            return Err(ProvisionerError::Config(
                "installation id must not be empty".into(),
            ));
        }
        validate_instance_name(prefix).map_err(|m| {
            ProvisionerError::Config(format!("instance prefix {prefix:?} is not usable: {m}"))
        })?;
        if conn.insecure_skip_verify {
            tracing::warn!(url = %conn.url, "PVE TLS verification is OFF for this connection");
        }
        Ok(Self {
            backend: Backend::connect(conn)?,
            nodes: conn.nodes.clone(),
            installation_id: installation_id.to_owned(),
            prefix: prefix.to_owned(),
            url: conn.url.clone(),
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// Adopts `pool` (validated; errors name `pools.<name>.provisioner.<key>`)
    /// for pool `name`, replacing an earlier configuration; returns its
    /// provisioner.
    pub fn add_pool(
        &self,
        name: &str,
        pool: &ProxmoxPoolConfig,
    ) -> Result<Arc<ProxmoxProvisioner>, ProvisionerError> {
        pool.validate(name).map_err(|e| {
            ProvisionerError::Config(format!(
                "{}: {}",
                e.key.replace(".proxmox.", ".provisioner."),
                e.message
            ))
        })?;
        let p = Arc::new(self.make(name, pool));
        self.pools
            .lock()
            .unwrap()
            .insert(name.to_owned(), p.clone());
        Ok(p)
    }

    /// The provisioner of configured pool `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<ProxmoxProvisioner>> {
        self.pools.lock().unwrap().get(name).cloned()
    }

    fn make(&self, name: &str, pool: &ProxmoxPoolConfig) -> ProxmoxProvisioner {
        ProxmoxProvisioner::with_backend(
            self.backend.clone(),
            self.nodes.clone(),
            name,
            pool,
            &self.installation_id,
            &self.prefix,
        )
    }

    /// The configured pool `name`, or `UnknownPool`.
    fn configured(&self, name: &str) -> Result<Arc<ProxmoxProvisioner>, ProvisionerError> {
        self.pool(name).ok_or_else(|| {
            ProvisionerError::UnknownPool(format!(
                "pool {name} is not configured in the Proxmox backend at {}",
                self.url
            ))
        })
    }

    /// The configured pool `name`, or, for a pool without configuration, a
    /// provisioner that knows only its name: enough for `get`, `list` and
    /// `delete`, which never read the pool's settings (node, template, ...).
    fn any(&self, name: &str) -> Arc<ProxmoxProvisioner> {
        self.pool(name).unwrap_or_else(|| {
            // Placeholder settings: never used by the verbs `any` serves.
            Arc::new(self.make(name, &ProxmoxPoolConfig::new("retired", 0)))
        })
    }
}

#[async_trait]
impl Provisioner for ProxmoxBackend {
    fn kind(&self) -> &str {
        "proxmox"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { start_stop: true }
    }

    fn configure_pool(&self, pool: &str, config: &PoolDocument) -> Result<(), ProvisionerError> {
        let doc = serde_json::Value::Object(config.clone());
        let parsed: ProxmoxPoolConfig = serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                format!("pools.{pool}.provisioner")
            } else {
                format!("pools.{pool}.provisioner.{path}")
            };
            ProvisionerError::Config(format!("{key}: {}", e.inner()))
        })?;
        self.add_pool(pool, &parsed).map(|_| ())
    }

    async fn validate_pool(&self, pool: &str) -> Result<(), ProvisionerError> {
        self.configured(pool)?.validate().await
    }

    /// The pool's `bootstrap` setting; `None` for a pool not configured.
    fn pool_bootstrap(&self, pool: &str) -> Option<BootstrapKind> {
        self.pool(pool).map(|p| match p.bootstrap() {
            BootstrapMode::CloudInit => BootstrapKind::CloudInit,
            BootstrapMode::GuestAgent => BootstrapKind::GuestAgent,
            BootstrapMode::None => BootstrapKind::None,
        })
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError> {
        self.configured(&spec.pool)?.create(spec).await
    }

    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        self.any(pool).delete(name).await
    }

    async fn get(&self, pool: &str, name: &str) -> Result<Option<Instance>, ProvisionerError> {
        self.any(pool).get(name).await
    }

    async fn list(&self, pool: &str) -> Result<Vec<Instance>, ProvisionerError> {
        self.any(pool).list().await
    }

    async fn start(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        self.configured(pool)?.start(name).await
    }

    async fn stop(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        self.configured(pool)?.stop(name).await
    }

    async fn remove_all(&self, pool: &str) -> Result<Vec<String>, ProvisionerError> {
        self.any(pool).remove_all().await
    }

    fn use_node_ledger(&self, ledger: Arc<dyn grs_provisioner::NodeLedger>) {
        *self.backend.ledger.lock().unwrap() = Some(ledger);
    }
}
