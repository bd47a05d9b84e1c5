//! The harness's handle on a running `grs-pve-sim` (started with
//! `--control-listen`): its VMs read through the control API (not the PVE
//! API, so injected API faults do not hide them), VMs made behind GRS's
//! back, faults switched on and off.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A VM (or template) on the simulator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    /// VM id.
    pub vmid: u32,
    /// Its node.
    pub node: String,
    /// Its name.
    pub name: String,
    /// A template?
    pub template: bool,
    /// Running?
    pub running: bool,
    /// Config lock (`clone` while cloning).
    pub lock: Option<String>,
    /// Its configuration (`smbios1`, `tags`, `description`, ...).
    pub config: BTreeMap<String, String>,
}

/// A client of the simulator's control API.
#[derive(Debug, Clone)]
pub struct PveSimClient {
    /// The PVE API (`proxmox.url`).
    pub url: String,
    /// The control API.
    pub control: String,
    /// The pinned certificate fingerprint (`proxmox.fingerprint`).
    pub fingerprint: String,
    http: reqwest::Client,
}

impl PveSimClient {
    /// A client of the simulator serving the PVE API at `url`.
    pub fn new(url: String, control: String, fingerprint: String) -> Self {
        Self {
            url,
            control,
            fingerprint,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Every VM and template.
    pub async fn vms(&self) -> anyhow::Result<Vec<VmView>> {
        Ok(self
            .http
            .get(format!("{}/vms", self.control))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Every VM that is not a template.
    pub async fn guests(&self) -> anyhow::Result<Vec<VmView>> {
        Ok(self
            .vms()
            .await?
            .into_iter()
            .filter(|v| !v.template)
            .collect())
    }

    /// Makes a (stopped) VM behind GRS's back.
    pub async fn add_vm(&self, node: &str, vmid: u32, name: &str) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/vms", self.control))
            .json(&serde_json::json!({ "node": node, "vmid": vmid, "name": name }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Injects a fault, as `grs-pve-sim`'s control API takes it:
    /// `{"fault": "clone_lock_contention", "probability": 0.2}`.
    pub async fn inject(&self, fault: Value) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/faults", self.control))
            .json(&fault)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Removes every fault.
    pub async fn clear_faults(&self) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/faults", self.control))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Request count, schema violations, peaks, clone tasks.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/stats", self.control))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}
