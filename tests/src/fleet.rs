//! Simulated VMs for the process-based harness: every VM the PVE simulator
//! runs with this installation's name prefix "boots" after a delay: its
//! cloud-init reads the NoCloud seed from the SMBIOS serial GRS set, fetches
//! its documents from the gateway (as `grs demo`'s VMs do, with
//! `grs::demo::fleet`'s reader), and its runner starts from the JIT
//! configuration in `user-data` (`POST /_sim/boot` on the GitHub
//! simulator), where it takes a matching queued job.
//!
//! Scenarios can hold VMs back (by name, or all of them) to order events.
//! Every bootstrap token and JIT configuration seen is kept: the secrets
//! check looks for them in every log.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grs::demo::fleet::{fetch_documents, seed_url};
use tokio::task::JoinHandle;

use crate::github::GitHubSimClient;
use crate::pve::PveSimClient;

#[derive(Debug, Default)]
struct FleetState {
    paused: bool,
    held: BTreeSet<String>,
    /// (vmid, name) of every VM a boot was started for.
    started: BTreeSet<(u32, String)>,
    /// Runners started, by instance name.
    booted: HashMap<String, u32>,
    /// Bootstrap tokens and JIT configurations seen.
    secrets: BTreeSet<String>,
    /// VMs that never started their runner, and why.
    failures: Vec<(String, String)>,
}

/// The running fleet; stops when dropped.
#[derive(Debug)]
pub struct Fleet {
    state: Arc<Mutex<FleetState>>,
    task: JoinHandle<()>,
}

impl Fleet {
    /// Watches `pve` every 20 ms and boots each new running VM named
    /// `<prefix>-...` after `boot_delay`.
    pub fn start(
        pve: PveSimClient,
        github: GitHubSimClient,
        prefix: String,
        boot_delay: Duration,
    ) -> Self {
        let state = Arc::new(Mutex::new(FleetState::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default();
            let name_prefix = format!("{prefix}-");
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let Ok(vms) = pve.guests().await else {
                    continue;
                };
                for vm in vms {
                    if !vm.running || !vm.name.starts_with(&name_prefix) {
                        continue;
                    }
                    {
                        let mut s = lock(&st);
                        if s.paused || s.held.contains(&vm.name) {
                            continue;
                        }
                        if !s.started.insert((vm.vmid, vm.name.clone())) {
                            continue;
                        }
                    }
                    let (st, http, github) = (st.clone(), http.clone(), github.clone());
                    let smbios1 = vm.config.get("smbios1").cloned();
                    tokio::spawn(async move {
                        tokio::time::sleep(boot_delay).await;
                        let outcome = boot(&http, &github, smbios1.as_deref(), &st).await;
                        let mut s = lock(&st);
                        match outcome {
                            Ok(()) => *s.booted.entry(vm.name).or_default() += 1,
                            Err(e) => s.failures.push((vm.name, format!("{e:#}"))),
                        }
                    });
                }
            }
        });
        Self { state, task }
    }

    /// Stops booting VMs (those booting finish).
    pub fn pause(&self) {
        lock(&self.state).paused = true;
    }

    /// Boots VMs again.
    pub fn resume(&self) {
        lock(&self.state).paused = false;
    }

    /// The VM named `name` does not boot until [`Self::release`].
    pub fn hold(&self, name: &str) {
        lock(&self.state).held.insert(name.to_owned());
    }

    /// Lets a held VM boot.
    pub fn release(&self, name: &str) {
        lock(&self.state).held.remove(name);
    }

    /// Runners started, by instance name.
    pub fn booted(&self) -> HashMap<String, u32> {
        lock(&self.state).booted.clone()
    }

    /// Bootstrap tokens and JIT configurations seen.
    pub fn secrets(&self) -> Vec<String> {
        lock(&self.state).secrets.iter().cloned().collect()
    }

    /// VMs that did not start their runner, and why.
    pub fn failures(&self) -> Vec<(String, String)> {
        lock(&self.state).failures.clone()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(s: &Mutex<FleetState>) -> std::sync::MutexGuard<'_, FleetState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// One VM's boot: cloud-init fetches its documents (retrying for up to a
/// minute while the gateway or the control plane is away, as cloud-init's
/// url_helper retries), then the runner starts.
async fn boot(
    http: &reqwest::Client,
    github: &GitHubSimClient,
    smbios1: Option<&str>,
    st: &Mutex<FleetState>,
) -> anyhow::Result<()> {
    let seed = smbios1
        .and_then(seed_url)
        .ok_or_else(|| anyhow::anyhow!("no NoCloud seed in the SMBIOS serial"))?;
    if let Some(token) = seed.trim_end_matches('/').rsplit('/').next() {
        lock(st).secrets.insert(token.to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let docs = loop {
        match fetch_documents(http, &seed).await {
            Ok(d) => break d,
            Err(e) if Instant::now() < deadline => {
                // A 404 is final: the token is unknown, used up or
                // revoked (the instance is gone or its runner took a job).
                if e.to_string().contains("404") {
                    anyhow::bail!("{e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    };
    let jit = grs_github::cloud_init::jit_config_from_user_data(&docs.user_data)
        .ok_or_else(|| anyhow::anyhow!("user-data has no JIT runner configuration"))?;
    lock(st).secrets.insert(jit.clone());
    github.boot(&jit).await
}
