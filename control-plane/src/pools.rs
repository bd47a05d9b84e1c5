//! Configured pools, their provisioners, and label routing.

use std::collections::BTreeMap;
use std::sync::Arc;

use grs_provisioner::{FakeProvisioner, Provisioner};

use grs_config::ConfigError;
use grs_provisioner_proxmox::ProxmoxBackend;

use crate::config::{Config, PoolConfig, ProvisionerConfig};
use crate::store::PoolLimits;

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
        }
    }
}

/// All pools of this control plane, by name.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pools: BTreeMap<String, Pool>,
}

impl Pools {
    /// The given pools.
    pub fn new(pools: impl IntoIterator<Item = Pool>) -> Self {
        Self {
            pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
        }
    }

    /// Builds each configured pool's backend from its `type`: one backend
    /// per kind, shared by the pools of that kind. Errors name the pool's
    /// key; no request is made (see `Provisioner::validate_pool`).
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let cp = &config.control_plane;
        let mut pools = Vec::new();
        let mut proxmox: Option<Arc<ProxmoxBackend>> = None;
        for (name, cfg) in &config.pools {
            let provisioner: Arc<dyn Provisioner> = match &cfg.provisioner {
                ProvisionerConfig::Fake(f) => {
                    let p = FakeProvisioner::new();
                    p.set_create_delay(f.create_delay);
                    Arc::new(p)
                }
                ProvisionerConfig::Proxmox(p) => {
                    let key = format!("pools.{name}.provisioner");
                    let backend = match &proxmox {
                        Some(b) => b.clone(),
                        None => {
                            let conn = config.proxmox.as_ref().ok_or_else(|| {
                                ConfigError::key(
                                    "proxmox",
                                    format!("pool {name} needs a [proxmox] section"),
                                )
                            })?;
                            let b =
                                ProxmoxBackend::new(conn, &cp.installation_id, &cp.instance_prefix)
                                    .map_err(|e| ConfigError::key(&key, e.to_string()))?;
                            proxmox.insert(Arc::new(b)).clone()
                        }
                    };
                    backend
                        .add_pool(name, p)
                        .map_err(|e| ConfigError::key(&key, e.to_string()))?;
                    backend
                }
            };
            pools.push(Pool::new(name.clone(), cfg.clone(), provisioner));
        }
        Ok(Self::new(pools))
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
