//! Simulated VMs that boot the way a real GRS VM does: when Proxmox starts
//! one, its "firmware" carries the SMBIOS serial GRS set; after a boot
//! delay, its "cloud-init" reads the NoCloud seed URL from that serial and
//! fetches its documents from the webhook gateway; the runner starts from
//! the JIT configuration in `user-data`, which registers it on GitHub (the
//! simulator), where it takes a matching queued job.
//!
//! The fetch follows cloud-init's NoCloud network datasource
//! (canonical/cloud-init `cloudinit/sources/DataSourceNoCloud.py`,
//! `_get_data`: with `s=`/`seedfrom=` an `http(s)://` base, it reads
//! `<seed>meta-data`, `<seed>user-data` and `<seed>vendor-data` through
//! `util.read_seeded`). Nothing of GRS is called directly: only the
//! gateway's HTTP and the simulators.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use grs_github::sim::GitHubSim;
use grs_provisioner_proxmox::sim::PveSim;
use tokio::task::JoinSet;

use super::tracker::{JobSeen, Tracker, VmSeen};

/// Why a simulated VM did not start its runner.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The VM has no SMBIOS serial with a NoCloud seed.
    #[error("no NoCloud seed in the SMBIOS serial")]
    NoSeed,
    /// A document could not be fetched.
    #[error("fetching {document}: {reason}")]
    Fetch {
        /// `meta-data`, `user-data`, …
        document: &'static str,
        /// The HTTP status or the transport error.
        reason: String,
    },
    /// `user-data` carries no JIT runner configuration.
    #[error("user-data has no JIT runner configuration")]
    NoJitConfig,
    /// GitHub refused the JIT configuration.
    #[error("the runner did not start: {0}")]
    Runner(String),
}

/// The NoCloud seed URL in an SMBIOS1 setting (`uuid=…,serial=<base64>`,
/// the serial decoding to `ds=nocloud[-net];s=<url>` or with `seedfrom=`).
/// `None` when there is none.
pub fn seed_url(smbios1: &str) -> Option<String> {
    let serial = smbios1
        .split(',')
        .find_map(|kv| kv.strip_prefix("serial="))?;
    // PVE stores base64 values when `base64=1` is set; GRS always sets it.
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(serial)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| serial.to_owned());
    let mut parts = decoded.split(';');
    if !parts.next()?.starts_with("ds=nocloud") {
        return None;
    }
    parts.find_map(|kv| {
        kv.strip_prefix("s=")
            .or_else(|| kv.strip_prefix("seedfrom="))
            .map(str::to_owned)
    })
}

/// The documents cloud-init read.
#[derive(Debug, Clone)]
pub struct CloudInitDocuments {
    /// `meta-data`.
    pub meta_data: String,
    /// `user-data`.
    pub user_data: String,
}

/// Fetches `meta-data`, `user-data` and `vendor-data` from `seed` (a URL
/// ending in `/`) as cloud-init's NoCloud datasource does; `vendor-data`
/// may be missing.
pub async fn fetch_documents(
    http: &reqwest::Client,
    seed: &str,
) -> Result<CloudInitDocuments, BootError> {
    async fn get(
        http: &reqwest::Client,
        seed: &str,
        document: &'static str,
    ) -> Result<Option<String>, BootError> {
        let fail = |reason: String| BootError::Fetch { document, reason };
        let resp = http
            .get(format!("{seed}{document}"))
            .send()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        resp.text()
            .await
            .map(Some)
            .map_err(|e| fail(e.without_url().to_string()))
    }
    let missing = |document| BootError::Fetch {
        document,
        reason: "HTTP 404 Not Found".into(),
    };
    let meta_data = get(http, seed, "meta-data")
        .await?
        .ok_or_else(|| missing("meta-data"))?;
    let user_data = get(http, seed, "user-data")
        .await?
        .ok_or_else(|| missing("user-data"))?;
    get(http, seed, "vendor-data").await?;
    Ok(CloudInitDocuments {
        meta_data,
        user_data,
    })
}

/// Boots one simulated VM: waits `boot_delay`, fetches its documents from
/// the seed in `smbios1`, and returns the JIT runner configuration.
async fn boot(
    http: reqwest::Client,
    smbios1: Option<String>,
    boot_delay: Duration,
) -> Result<String, BootError> {
    tokio::time::sleep(boot_delay).await;
    let seed = smbios1
        .as_deref()
        .and_then(seed_url)
        .ok_or(BootError::NoSeed)?;
    let docs = fetch_documents(&http, &seed).await?;
    grs_github::cloud_init::jit_config_from_user_data(&docs.user_data).ok_or(BootError::NoJitConfig)
}

/// Boot failures seen so far, by instance name.
pub type BootFailures = Vec<(String, BootError)>;

/// The simulated fleet: watches both simulators every `tick`, records what
/// it sees in a [`Tracker`], and boots every VM Proxmox starts.
#[derive(Debug)]
pub struct Fleet {
    http: reqwest::Client,
    boot_delay: Duration,
    booting: JoinSet<(String, Result<String, BootError>)>,
    /// VMs that failed to start their runner.
    pub failures: BootFailures,
    /// Runners started.
    pub runners_started: usize,
}

impl Fleet {
    /// A fleet whose VMs take `boot_delay` from power-on to cloud-init.
    pub fn new(boot_delay: Duration) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            boot_delay,
            booting: JoinSet::new(),
            failures: Vec::new(),
            runners_started: 0,
        }
    }

    /// One look at the world: records it in `tracker` and starts booting
    /// every VM seen running for the first time. Call it often (every 10 ms
    /// or so); it does not block on boots.
    pub fn observe(&mut self, tracker: &mut Tracker, github: &GitHubSim, pve: &PveSim) {
        let now = Instant::now();
        let jobs: Vec<JobSeen> = github
            .jobs()
            .into_iter()
            .map(|j| JobSeen {
                id: j.id,
                status: j.status,
                runner_name: j.runner_name,
            })
            .collect();
        let vms: Vec<_> = pve.vms().into_iter().filter(|v| !v.template).collect();
        let seen: Vec<VmSeen> = vms
            .iter()
            .map(|v| VmSeen {
                name: v.name().to_owned(),
                running: v.running,
            })
            .collect();
        let started = tracker.observe(now, &jobs, &seen);
        if started.is_empty() {
            return;
        }
        let smbios: HashMap<&str, Option<String>> = vms
            .iter()
            .map(|v| (v.name(), v.config.get("smbios1").cloned()))
            .collect();
        for name in started {
            let smbios1 = smbios.get(name.as_str()).cloned().flatten();
            let (http, delay) = (self.http.clone(), self.boot_delay);
            self.booting
                .spawn(async move { (name, boot(http, smbios1, delay).await) });
        }
    }

    /// Waits for the next VM to finish booting and starts its runner on
    /// GitHub. Pending forever when nothing boots (use in `select!`).
    pub async fn next_boot(&mut self, github: &GitHubSim) {
        let Some(joined) = self.booting.join_next().await else {
            return std::future::pending().await;
        };
        let (name, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a simulated boot task failed");
                return;
            }
        };
        let outcome = match result {
            Ok(jit) => github
                .boot_runner(&jit)
                .await
                .map(drop)
                .map_err(|e| BootError::Runner(e.to_string())),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                self.runners_started += 1;
                tracing::debug!(instance = %name, "simulated VM booted its runner");
            }
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "simulated VM did not start its runner");
                self.failures.push((name, e));
            }
        }
    }

    /// Stops every boot in progress.
    pub fn stop(&mut self) {
        self.booting.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smbios(serial: &str) -> String {
        format!(
            "uuid=5c4a7c7e-0000-4000-8000-000000000001,base64=1,serial={}",
            base64::engine::general_purpose::STANDARD.encode(serial)
        )
    }

    #[test]
    fn the_seed_is_read_from_either_nocloud_form() {
        for serial in [
            "ds=nocloud;s=http://gw/cloud-init/t/",
            "ds=nocloud-net;s=http://gw/cloud-init/t/",
            "ds=nocloud;h=x;seedfrom=http://gw/cloud-init/t/",
        ] {
            assert_eq!(
                seed_url(&smbios(serial)).as_deref(),
                Some("http://gw/cloud-init/t/"),
                "{serial}"
            );
        }
        assert_eq!(seed_url(&smbios("ds=configdrive")), None);
        assert_eq!(seed_url("uuid=5c4a7c7e-0000-4000-8000-000000000001"), None);
    }
}
