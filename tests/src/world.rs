//! The system under test, every part its own process: a private Redis
//! (AOF, `appendfsync always`), `grs-pve-sim`, `grs-github-sim`, one or
//! more `grs-control-plane` replicas, each with its own
//! `grs-webhook-gateway`, and the simulated VMs ([`Fleet`]). Start it with
//! [`World::start`]; end every scenario with [`World::check_invariants`].
//!
//! Wiring: GitHub's deliveries go through the simulator's relay to the
//! gateways (failing over between them); every gateway calls its own
//! replica; VMs fetch their cloud-init documents from gateway 0 (the
//! `gateway_url` every replica gives them). Secrets reach the processes
//! through the environment only; the configuration file has none.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use tonic::transport::Channel;

use crate::fleet::Fleet;
use crate::github::{GitHubSimClient, JobView};
use crate::process::{Proc, binary, free_port};
use crate::pve::{PveSimClient, VmView};

/// The labels of the one pool.
pub const LABELS: &[&str] = &["self-hosted", "linux", "x64"];
/// The node of the PVE simulator.
pub const NODE: &str = "pve1";
/// The template the pool clones.
pub const TEMPLATE: u32 = 9000;
/// The VM made behind GRS's back before each scenario: its name has GRS's
/// prefix, it carries no ownership marker, GRS must never touch it.
pub const FOREIGN_VMID: u32 = 4242;

/// How to assemble the world.
#[derive(Debug, Clone)]
pub struct WorldOptions {
    /// A name for the log directory.
    pub name: String,
    /// Control-plane replicas (each with its own gateway).
    pub replicas: usize,
    /// The pool's `max_instances`.
    pub max_instances: u32,
    /// Every PVE task's duration is the simulator's realistic default
    /// times this.
    pub pve_time_scale: f64,
    /// How long a job runs once taken.
    pub job_duration: Duration,
    /// From a VM's start to its cloud-init fetch.
    pub boot_delay: Duration,
    /// `control_plane.claim_timeout`: how soon a dead replica's work is
    /// taken over.
    pub claim_timeout: Duration,
    /// `control_plane.reconcile_interval`.
    pub reconcile_interval: Duration,
    /// The pool's `min_idle` (warm instances).
    pub min_idle: u32,
    /// Extra `[control_plane]` lines (TOML), for a scenario's settings.
    pub extra_control_plane: String,
    /// The GitHub simulator's primary rate limit, calls an hour.
    pub github_rate_limit: u64,
}

impl Default for WorldOptions {
    fn default() -> Self {
        Self {
            name: "e2e".into(),
            replicas: 1,
            max_instances: 8,
            pve_time_scale: 0.05,
            job_duration: Duration::from_millis(300),
            boot_delay: Duration::from_millis(100),
            claim_timeout: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(1),
            min_idle: 0,
            extra_control_plane: String::new(),
            github_rate_limit: 5000,
        }
    }
}

/// Secrets the processes get, and the log check looks for.
#[derive(Debug, Clone)]
struct Secrets {
    webhook: String,
    pve_token: String,
    github_token: String,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The running world. Dropping it kills every process.
#[derive(Debug)]
pub struct World {
    /// Options it was started with.
    pub opts: WorldOptions,
    /// The PVE simulator.
    pub pve: PveSimClient,
    /// The GitHub simulator.
    pub github: GitHubSimClient,
    /// The simulated VMs.
    pub fleet: Fleet,
    /// `control_plane.instance_prefix`.
    pub prefix: String,
    redis: Proc,
    redis_port: u16,
    pve_proc: Proc,
    github_proc: Proc,
    control_planes: Vec<Proc>,
    cp_ports: Vec<u16>,
    gateways: Vec<Proc>,
    gw_ports: Vec<u16>,
    secrets: Secrets,
    foreign: VmView,
    /// Taken by [`World::keep_logs`].
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
}

/// What [`World::check_invariants`] found (all of it holds when it
/// returns `Ok`).
#[derive(Debug, Clone, Default)]
pub struct InvariantReport {
    /// Jobs GitHub queued.
    pub jobs: usize,
    /// Of those, completed after running once.
    pub ran_once: usize,
    /// Of those, cancelled before a runner took them.
    pub cancelled: usize,
    /// Jobs that ran on a VM made for another job.
    pub on_another_jobs_vm: usize,
    /// Runners the fleet started.
    pub runners_started: usize,
    /// Log files searched for secrets, and the secrets searched for.
    pub logs_checked: usize,
    /// Distinct secrets looked for.
    pub secrets_checked: usize,
    /// Jobs still waiting on GitHub at the end (a violation).
    pub left_waiting: usize,
    /// Queued → `in_progress` (GitHub's clock), ms, per job that ran.
    pub pickup_ms: Vec<u64>,
    /// Every invariant violated (empty: all held).
    pub problems: Vec<String>,
}

impl std::fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  jobs queued on GitHub        {}", self.jobs)?;
        writeln!(f, "  ran exactly once             {}", self.ran_once)?;
        writeln!(f, "  left waiting on GitHub       {}", self.left_waiting)?;
        writeln!(f, "  cancelled before pickup      {}", self.cancelled)?;
        writeln!(
            f,
            "  ran on another job's VM      {}",
            self.on_another_jobs_vm
        )?;
        writeln!(f, "  runners started              {}", self.runners_started)?;
        writeln!(
            f,
            "  secrets looked for           {} in {} logs",
            self.secrets_checked, self.logs_checked
        )?;
        if self.problems.is_empty() {
            write!(
                f,
                "  every invariant held: no VM or registration left, foreign VM untouched, no secret in a log"
            )
        } else {
            write!(f, "  VIOLATED:\n  - {}", self.problems.join("\n  - "))
        }
    }
}

impl World {
    /// Starts every process and waits until each serves. `None` (the test
    /// then skips, loudly) when `redis-server` is not installed and `CI` is
    /// unset; under `CI` that is an error.
    ///
    /// Ports are picked free ([`free_port`]) and handed to the processes,
    /// so another process can take one in between (CI saw a control plane
    /// fail with "Address already in use" while other tests ran): a start
    /// that failed that way is redone, up to three times, on new ports
    /// (the failed attempt's processes are stopped when it is dropped).
    pub async fn start(opts: WorldOptions) -> anyhow::Result<Option<Self>> {
        let mut attempt = 1;
        loop {
            match Self::start_once(opts.clone()).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("[e2e harness] a port was taken meanwhile; starting again: {e:#}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(opts: WorldOptions) -> anyhow::Result<Option<Self>> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var_os("CI").is_some() {
                bail!(
                    "redis-server is not installed: CI is set, so this fails instead of skipping"
                );
            }
            eprintln!("SKIPPED {}: no redis-server binary", opts.name);
            return Ok(None);
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("grs-e2e-{}-", opts.name))
            .tempdir()?;
        let secrets = Secrets {
            webhook: format!("whsec-{}", random_hex(16)),
            pve_token: format!(
                "{}-{}-4{}-8{}-{}",
                random_hex(4),
                random_hex(2),
                &random_hex(2)[1..],
                &random_hex(2)[1..],
                random_hex(6)
            ),
            github_token: format!("ghp_{}", random_hex(18)),
        };

        // Redis, with persistence, on a port of its own (kept across
        // restarts).
        let redis_port = free_port();
        std::fs::create_dir_all(dir.path().join("redis"))?;
        let redis = Proc::start(
            "redis",
            PathBuf::from("redis-server"),
            [
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
            ]
            .iter()
            .map(OsString::from)
            .chain([dir.path().join("redis").into_os_string()])
            .collect(),
            vec![],
            dir.path(),
        )?;
        wait_for_port(redis_port, Duration::from_secs(10)).await?;

        // Proxmox.
        let mut pve_proc = Proc::start(
            "pve-sim",
            binary("grs-pve-sim")?,
            [
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "--control-listen",
                "127.0.0.1:0",
                "--node",
                &format!("{NODE}:512"),
                "--template",
                &format!("{NODE}:{TEMPLATE}"),
                "--time-scale",
                &opts.pve_time_scale.to_string(),
            ]
            .iter()
            .map(OsString::from)
            .collect(),
            vec![("GRS_PROXMOX_TOKEN_SECRET".into(), secrets.pve_token.clone())],
            dir.path(),
        )?;
        let t = Duration::from_secs(20);
        let pve = PveSimClient::new(
            pve_proc.wait_for_line("url:", t).await?,
            pve_proc.wait_for_line("control:", t).await?,
            pve_proc.wait_for_line("fingerprint:", t).await?,
        );

        // Ports of the replicas and their gateways, known to all before
        // any starts.
        let cp_ports: Vec<u16> = (0..opts.replicas).map(|_| free_port()).collect();
        let gw_ports: Vec<u16> = (0..opts.replicas).map(|_| free_port()).collect();

        // GitHub.
        let mut gh_args: Vec<OsString> = vec![
            "--job-duration".into(),
            format!("{}ms", opts.job_duration.as_millis()).into(),
            "--rate-limit".into(),
            opts.github_rate_limit.to_string().into(),
        ];
        for p in &gw_ports {
            gh_args.push("--gateway".into());
            gh_args.push(format!("http://127.0.0.1:{p}/webhook").into());
        }
        let mut github_proc = Proc::start(
            "github-sim",
            binary("grs-github-sim")?,
            gh_args,
            vec![
                ("GRS_WEBHOOK_SECRET".into(), secrets.webhook.clone()),
                ("GRS_GITHUB_TOKEN".into(), secrets.github_token.clone()),
            ],
            dir.path(),
        )?;
        let github = GitHubSimClient::new(
            github_proc.wait_for_line("api:", t).await?,
            github_proc.wait_for_line("control:", t).await?,
        );

        // The foreign VM, before GRS starts.
        pve.add_vm(NODE, FOREIGN_VMID, &format!("grs-{FOREIGN_VMID}"))
            .await?;
        let foreign = pve
            .vms()
            .await?
            .into_iter()
            .find(|v| v.vmid == FOREIGN_VMID)
            .context("the foreign VM")?;

        let prefix = "grs".to_owned();
        let mut world = Self {
            fleet: Fleet::start(pve.clone(), github.clone(), prefix.clone(), opts.boot_delay),
            opts,
            pve,
            github,
            prefix,
            redis,
            redis_port,
            pve_proc,
            github_proc,
            control_planes: Vec::new(),
            cp_ports,
            gateways: Vec::new(),
            gw_ports,
            secrets,
            foreign,
            dir_path: dir.path().to_owned(),
            dir: Some(dir),
        };
        for i in 0..world.opts.replicas {
            let config = world.write_config(i)?;
            let cp = Proc::start(
                &format!("control-plane-{i}"),
                binary("grs-control-plane")?,
                vec!["--config".into(), config.clone().into_os_string()],
                world.env(),
                world.dir_path.as_path(),
            )?;
            world.control_planes.push(cp);
            let gw = Proc::start(
                &format!("gateway-{i}"),
                binary("grs-webhook-gateway")?,
                vec!["--config".into(), config.into_os_string()],
                world.env(),
                world.dir_path.as_path(),
            )?;
            world.gateways.push(gw);
        }
        for i in 0..world.opts.replicas {
            world.wait_control_plane(i).await?;
            world.wait_gateway(i).await?;
        }
        Ok(Some(world))
    }

    /// Every process's environment: the secrets, and logs at debug level
    /// for GRS's crates (more log lines, more chances to catch a secret).
    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "RUST_LOG".into(),
                "info,grs_control_plane=debug,grs_webhook_gateway=debug,grs_provisioner_proxmox=debug,grs_github=debug"
                    .into(),
            ),
            ("GRS_WEBHOOK_SECRET".into(), self.secrets.webhook.clone()),
            (
                "GRS_PROXMOX_TOKEN_SECRET".into(),
                self.secrets.pve_token.clone(),
            ),
            ("GRS_GITHUB_TOKEN".into(), self.secrets.github_token.clone()),
        ]
    }

    /// Replica `i`'s configuration file (no secrets in it).
    fn write_config(&self, i: usize) -> anyhow::Result<PathBuf> {
        let o = &self.opts;
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        let poll = |d: f64| format!("\"{}ms\"", (d * o.pve_time_scale * 1000.0).max(5.0) as u64);
        let text = format!(
            r#"
[control_plane]
listen = "127.0.0.1:{cp}"
installation_id = "grs-e2e-{name}"
instance_prefix = "{prefix}"
store = "redis"
dispatchers_per_pool = 4
teardown_workers = 4
claim_timeout = {claim}
retry_deadline = "30m"
retry_backoff = "100ms"
retry_backoff_max = "1s"
shutdown_grace = "5s"
gateway_url = "http://127.0.0.1:{gw0}"
bootstrap_ttl = "10m"
reconcile_interval = {reconcile}
bootstrap_timeout = "15s"
max_lifetime = "1h"
orphan_grace = "30s"
{extra}

[redis]
url = "redis://127.0.0.1:{redis}"
key_prefix = "grs"

[gateway]
listen = "127.0.0.1:{gw}"
control_plane_url = "http://127.0.0.1:{cp}"
control_plane_timeout = "5s"
request_timeout = "9s"
shutdown_grace = "2s"

[github]
api_url = "{github}"
organization = "grs-sim"
# The simulator's organisation hook: GRS lists its failed deliveries and
# asks for them again (lost-webhook recovery).
hook_id = 1

[proxmox]
url = "{pve}"
token_id = "root@pam!grs"
fingerprint = "{fp}"
task_poll_min = {poll_min}
task_poll_max = {poll_max}
task_expected = {{ qmclone = {te_clone}, qmstart = {te_start}, qmstop = {te_stop}, qmdestroy = {te_destroy} }}
retry_base_delay = "20ms"
retry_max_delay = "200ms"
nodes = [{{ name = "{node}" }}]

[pools.linux]
labels = [{labels}]
max_instances = {max}
min_idle = {min_idle}

[pools.linux.provisioner]
type = "proxmox"
node = "{node}"
template_vmid = {template}
"#,
            cp = self.cp_ports[i],
            gw = self.gw_ports[i],
            gw0 = self.gw_ports[0],
            name = o.name,
            prefix = self.prefix,
            claim = ms(o.claim_timeout),
            reconcile = ms(o.reconcile_interval),
            extra = o.extra_control_plane,
            redis = self.redis_port,
            github = self.github.api,
            pve = self.pve.url,
            fp = self.pve.fingerprint,
            poll_min = poll(0.2),
            poll_max = poll(1.0),
            // The simulator's task durations at this scale (the defaults
            // assume realistic ones).
            te_clone = poll(1.0),
            te_start = poll(0.5),
            te_stop = poll(0.2),
            te_destroy = poll(0.3),
            node = NODE,
            labels = LABELS
                .iter()
                .map(|l| format!("\"{l}\""))
                .collect::<Vec<_>>()
                .join(", "),
            max = o.max_instances,
            min_idle = o.min_idle,
            template = TEMPLATE,
        );
        let path = self.dir_path.as_path().join(format!("grs-{i}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Where the logs and configuration files are.
    pub fn dir(&self) -> &Path {
        self.dir_path.as_path()
    }

    /// Keeps the log directory after the world is dropped (call on
    /// failure); returns its path.
    pub fn keep_logs(mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
        self.dir_path.clone()
    }

    /// A gRPC client of replica `i`.
    pub async fn client(&self, i: usize) -> anyhow::Result<ControlPlaneClient<Channel>> {
        Ok(ControlPlaneClient::connect(format!("http://127.0.0.1:{}", self.cp_ports[i])).await?)
    }

    async fn wait_control_plane(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = self.client(i).await
                && c.get_stats(pb::GetStatsRequest {}).await.is_ok()
            {
                return Ok(());
            }
            if !self.control_planes[i].running() {
                bail!(
                    "control-plane-{i} exited:\n{}",
                    self.control_planes[i].tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "control-plane-{i} does not serve:\n{}",
                    self.control_planes[i].tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_gateway(&mut self, i: usize) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.gw_ports[i]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if !self.gateways[i].running() || Instant::now() > deadline {
                bail!("gateway-{i} does not serve:\n{}", self.gateways[i].tail(30));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Replica `i`'s process.
    pub fn control_plane(&mut self, i: usize) -> &mut Proc {
        &mut self.control_planes[i]
    }

    /// Kills replica `i` with SIGKILL.
    pub fn kill_control_plane(&mut self, i: usize) {
        self.control_planes[i].kill9();
    }

    /// Starts replica `i` again (after a kill) and waits until it serves.
    pub async fn restart_control_plane(&mut self, i: usize) -> anyhow::Result<()> {
        self.control_planes[i].kill9();
        self.control_planes[i].spawn()?;
        self.wait_control_plane(i).await
    }

    /// Kills Redis with SIGKILL and starts it again on the same port and
    /// data directory (its AOF replays everything acknowledged).
    pub async fn restart_redis(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.redis.kill9();
        tokio::time::sleep(down_for).await;
        self.redis.spawn()?;
        wait_for_port(self.redis_port, Duration::from_secs(10)).await
    }

    /// The `in_progress` runner of every job GitHub has, by job id.
    pub async fn jobs(&self) -> anyhow::Result<Vec<JobView>> {
        self.github.jobs().await
    }

    /// Waits until GitHub has `n` jobs completed, for up to `timeout`.
    pub async fn wait_all_completed(&self, timeout: Duration) -> anyhow::Result<Vec<JobView>> {
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.github.jobs().await?;
            if jobs.iter().all(|j| j.status == "completed") {
                return Ok(jobs);
            }
            if Instant::now() > deadline {
                let open: Vec<String> = jobs
                    .iter()
                    .filter(|j| j.status != "completed")
                    .map(|j| format!("{} {}", j.id, j.status))
                    .collect();
                let failures: Vec<String> = self
                    .fleet
                    .failures()
                    .into_iter()
                    .map(|(vm, why)| format!("{vm}: {why}"))
                    .collect();
                bail!(
                    "{} of {} jobs not completed after {timeout:?}: {}\nVMs that did not start their runner: {}",
                    open.len(),
                    jobs.len(),
                    open.iter().take(20).cloned().collect::<Vec<_>>().join(", "),
                    if failures.is_empty() {
                        "none".to_owned()
                    } else {
                        failures.join("; ")
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The invariants, checked at the end of every scenario (waiting up to
    /// `timeout` for the system to settle):
    /// - every job GitHub queued completed, and ran exactly once (one
    ///   `in_progress`, on a runner), unless cancelled before any runner
    ///   took it; GRS recorded each as completed;
    /// - no VM of GRS's left on Proxmox, no runner registration left on
    ///   GitHub, no capacity held, no queue entry left;
    /// - the foreign VM is exactly as it was;
    /// - no secret (webhook secret, PVE token secret, GitHub token, any
    ///   bootstrap token or JIT configuration) in any process's log;
    /// - every process still running (none crashed), and the PVE
    ///   simulator saw no request outside the official schema.
    pub async fn check_invariants(&mut self, timeout: Duration) -> anyhow::Result<InvariantReport> {
        let report = self.invariants(timeout).await?;
        if report.problems.is_empty() {
            Ok(report)
        } else {
            bail!(
                "invariants violated (logs in {}):\n- {}",
                self.dir_path.as_path().display(),
                report.problems.join("\n- ")
            )
        }
    }

    /// What [`Self::check_invariants`] checks, every violation listed in
    /// [`InvariantReport::problems`] (an `Err` only when a simulator or
    /// GRS cannot be asked).
    pub async fn invariants(&mut self, timeout: Duration) -> anyhow::Result<InvariantReport> {
        let mut problems: Vec<String> = Vec::new();
        let jobs = match self.wait_all_completed(timeout).await {
            Ok(jobs) => jobs,
            Err(e) => {
                problems.push(format!("{e:#}"));
                self.github.jobs().await?
            }
        };
        let deadline = Instant::now() + timeout;
        // Teardown follows completion: wait for VMs and registrations to go.
        let (vms, runners) = loop {
            let vms: Vec<VmView> = self
                .pve
                .guests()
                .await?
                .into_iter()
                .filter(|v| v.vmid != FOREIGN_VMID)
                .collect();
            let runners = self.github.runners().await?;
            if (vms.is_empty() && runners.is_empty()) || Instant::now() > deadline {
                break (vms, runners);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if !vms.is_empty() {
            problems.push(format!(
                "{} VMs left on Proxmox: {:?}",
                vms.len(),
                vms.iter()
                    .map(|v| format!("{} {} running={}", v.vmid, v.name, v.running))
                    .collect::<Vec<_>>()
            ));
        }
        if !runners.is_empty() {
            problems.push(format!(
                "{} runner registrations left on GitHub: {:?}",
                runners.len(),
                runners.iter().map(|r| &r.name).collect::<Vec<_>>()
            ));
        }

        let mut report = InvariantReport {
            jobs: jobs.len(),
            ..InvariantReport::default()
        };
        for j in &jobs {
            match j.conclusion.as_deref() {
                Some("cancelled") if j.runner_name.is_none() && j.starts == 0 => {
                    report.cancelled += 1
                }
                Some("success") if j.starts == 1 && j.runner_name.is_some() => {
                    report.ran_once += 1;
                    let own = format!("{}-{}", self.prefix, j.id);
                    if j.runner_name.as_deref() != Some(own.as_str()) {
                        report.on_another_jobs_vm += 1;
                    }
                    if let (Some(q), Some(s)) = (j.queued_ms, j.started_ms) {
                        report.pickup_ms.push(s.saturating_sub(q));
                    }
                }
                _ if j.status != "completed" => report.left_waiting += 1,
                _ => problems.push(format!(
                    "job {}: conclusion {:?}, runner {:?}, started {} times",
                    j.id, j.conclusion, j.runner_name, j.starts
                )),
            }
        }

        // GRS's own view: every job completed, nothing held or queued.
        let live = self.live_replica();
        match live {
            Some(i) => {
                let mut c = self.client(i).await?;
                for j in &jobs {
                    match c.get_job(pb::GetJobRequest { job_id: j.id }).await {
                        Ok(r) if r.get_ref().state() == pb::JobState::Completed => {}
                        Ok(r) => problems.push(format!(
                            "GRS has job {} as {:?} ({})",
                            j.id,
                            r.get_ref().state(),
                            r.get_ref().reason
                        )),
                        Err(e) => {
                            problems.push(format!("GRS has no job {}: {}", j.id, e.message()))
                        }
                    }
                }
                let settled = poll_until(deadline, || {
                    let mut c = c.clone();
                    async move {
                        let s = c.get_stats(pb::GetStatsRequest {}).await.ok()?.into_inner();
                        let held: u32 = s.pools.iter().map(|p| p.instances_in_use).sum();
                        (held == 0 && s.provision_queue_depth == 0 && s.teardown_queue_depth == 0)
                            .then_some(())
                    }
                })
                .await;
                if settled.is_none() {
                    let s = c.get_stats(pb::GetStatsRequest {}).await?.into_inner();
                    problems.push(format!("capacity or queue entries left: {s:?}"));
                }
            }
            None => problems.push("no control-plane replica is running".into()),
        }

        // The foreign VM.
        match self
            .pve
            .vms()
            .await?
            .into_iter()
            .find(|v| v.vmid == FOREIGN_VMID)
        {
            Some(v) if v == self.foreign => {}
            Some(v) => problems.push(format!(
                "the foreign VM changed: {:?} -> {v:?}",
                self.foreign
            )),
            None => problems.push("the foreign VM was deleted".into()),
        }

        // No process crashed.
        for p in self
            .control_planes
            .iter_mut()
            .chain(self.gateways.iter_mut())
            .chain([&mut self.pve_proc, &mut self.github_proc, &mut self.redis])
        {
            if p.pid().is_some() && !p.running() {
                problems.push(format!("{} exited by itself:\n{}", p.name, p.tail(20)));
            }
        }
        let stats = self.pve.stats().await?;
        if stats["schema_violations"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
        {
            problems.push(format!(
                "requests outside the PVE schema: {}",
                stats["schema_violations"]
            ));
        }

        // No secret in any log.
        let mut secrets: BTreeSet<String> = self.fleet.secrets().into_iter().collect();
        secrets.extend([
            self.secrets.webhook.clone(),
            self.secrets.pve_token.clone(),
            self.secrets.github_token.clone(),
        ]);
        let logs = self.log_files();
        for path in &logs {
            let text =
                String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
            for s in &secrets {
                if s.len() >= 8 && text.contains(s.as_str()) {
                    problems.push(format!("a secret ({}…) is in {}", &s[..4], path.display()));
                }
            }
        }
        report.logs_checked = logs.len();
        report.secrets_checked = secrets.len();
        report.runners_started = self.fleet.booted().values().map(|n| *n as usize).sum();

        report.problems = problems;
        Ok(report)
    }

    fn live_replica(&mut self) -> Option<usize> {
        (0..self.control_planes.len()).find(|&i| self.control_planes[i].running())
    }

    /// Every process's log file.
    pub fn log_files(&self) -> Vec<PathBuf> {
        self.control_planes
            .iter()
            .chain(&self.gateways)
            .chain([&self.pve_proc, &self.github_proc, &self.redis])
            .map(|p| p.log_path().to_owned())
            .collect()
    }

    /// Stops every GRS process with SIGTERM and checks each exits cleanly
    /// within its grace.
    pub fn shutdown(&mut self) -> anyhow::Result<()> {
        let mut unclean = Vec::new();
        for p in self
            .gateways
            .iter_mut()
            .chain(self.control_planes.iter_mut())
        {
            if p.pid().is_some() && !p.terminate(Duration::from_secs(10)) {
                unclean.push(format!("{}:\n{}", p.name, p.tail(10)));
            }
        }
        self.github_proc.terminate(Duration::from_secs(5));
        self.pve_proc.terminate(Duration::from_secs(5));
        self.redis.kill9();
        anyhow::ensure!(
            unclean.is_empty(),
            "did not stop cleanly on SIGTERM: {}",
            unclean.join("\n")
        );
        Ok(())
    }

    /// GRS's record of a job.
    pub async fn grs_job(&self, id: u64) -> anyhow::Result<pb::Job> {
        let i = (0..self.control_planes.len())
            .find(|&i| self.control_planes[i].pid().is_some())
            .unwrap_or(0);
        Ok(self
            .client(i)
            .await?
            .get_job(pb::GetJobRequest { job_id: id })
            .await?
            .into_inner())
    }

    /// The VMs of GRS's (prefix, not the foreign one) on Proxmox.
    pub async fn grs_vms(&self) -> anyhow::Result<Vec<VmView>> {
        Ok(self
            .pve
            .guests()
            .await?
            .into_iter()
            .filter(|v| v.vmid != FOREIGN_VMID && v.name.starts_with(&format!("{}-", self.prefix)))
            .collect())
    }

    /// Instance name of the VM made for `job`.
    pub fn instance_name(&self, job: u64) -> String {
        format!("{}-{job}", self.prefix)
    }

    /// Counts by job of VMs seen so far (for "made once" checks).
    pub fn booted(&self) -> BTreeMap<String, u32> {
        self.fleet.booted().into_iter().collect()
    }
}

impl Drop for World {
    /// A scenario that panics keeps its logs (named on stderr).
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.dir.take()
        {
            eprintln!("logs kept in {}", d.keep().display());
        }
    }
}

/// Polls `check` every 20 ms until it gives a value or `deadline` passes.
pub async fn poll_until<T, F, Fut>(deadline: Instant, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
