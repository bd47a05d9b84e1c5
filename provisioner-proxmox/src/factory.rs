//! How a binary builds the backend of `type = "proxmox"` pools: one
//! function, used by the `grs-control-plane` binary's registry, the demo and
//! the tests that assemble a control plane as the binary does.

use std::sync::Arc;

use grs_config::ConfigError;
use grs_provisioner::Provisioner;

use crate::{ProxmoxBackend, ProxmoxConfig};

/// The factory of the Proxmox backend: called (once) when the first
/// `type = "proxmox"` pool is configured, it builds one [`ProxmoxBackend`]
/// over `conn`, the `[proxmox]` section, for every such pool, marking VMs
/// with `installation_id` and naming them `<prefix>-<job>`. Errors name the
/// key to fix: a missing `[proxmox]` section, or the setting at fault in it.
pub fn factory(
    conn: Option<ProxmoxConfig>,
    installation_id: String,
    prefix: String,
) -> impl Fn() -> Result<Arc<dyn Provisioner>, ConfigError> + Send + Sync + 'static {
    move || {
        let conn = conn.as_ref().ok_or_else(|| {
            ConfigError::key(
                "proxmox",
                "pools of type = \"proxmox\" need a [proxmox] section (the PVE connection)",
            )
        })?;
        conn.validate()
            .map_err(|e| ConfigError::key(e.key, e.message))?;
        let b = ProxmoxBackend::new(conn, &installation_id, &prefix)
            .map_err(|e| ConfigError::key("proxmox", e.to_string()))?;
        Ok(Arc::new(b) as Arc<dyn Provisioner>)
    }
}
