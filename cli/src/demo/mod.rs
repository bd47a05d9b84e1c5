//! `grs demo`: the whole of GRS in one process, on simulators, with nothing
//! but this binary.
//!
//! - [`system`]: [`System`] assembles the PVE simulator with the real
//!   Proxmox provisioner, the GitHub simulator, the real control plane and
//!   the real webhook gateway, each on its own loopback socket (also used by
//!   the end-to-end tests).
//! - [`fleet`]: simulated VMs that boot from their cloud-init seed: read the
//!   SMBIOS serial, fetch `user-data` through the gateway, start the runner
//!   from its JIT configuration on GitHub.
//! - [`tracker`]: what happened when, seen on the simulators: the live
//!   counts and the latency percentiles.
//! - this module: the command: the job load, the progress display, the
//!   summary, `--keep-running`, shutdown on Ctrl-C/SIGTERM.
//!
//! The simulators live in this (CLI) crate's dependency tree only: the
//! `grs-control-plane` and `grs-webhook-gateway` binaries do not link them
//! through this module.

pub mod fleet;
pub mod system;
pub mod tracker;

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use grs_github::sim::NewJob;
use grs_provisioner_proxmox::sim::TaskDurations;
use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::args::OutputFormat;
pub use fleet::Fleet;
use system::scaled;
pub use system::{PoolSpec, StoreChoice, System, SystemOptions};
pub use tracker::{Counts, StageLatency, Tracker};

/// Exit code of a demo stopped by Ctrl-C or SIGTERM before its jobs were
/// done (128 + SIGINT, as shells report it).
pub const EX_INTERRUPTED: u8 = 130;

/// What went wrong in the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A part of the system could not be started.
    #[error("cannot start {0}: {1}")]
    Start(&'static str, String),
    /// A part of the system stopped with an error.
    #[error("{0} stopped with an error: {1}")]
    Stopped(&'static str, String),
    /// The log file cannot be written.
    #[error("cannot write the log file {path}: {source}")]
    LogFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The run ended, but not every job completed or something leaked.
    #[error("{0}")]
    Failed(String),
    /// Ctrl-C or SIGTERM before the jobs were done.
    #[error("interrupted before every job was done")]
    Interrupted,
}

impl DemoError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Interrupted => EX_INTERRUPTED,
            _ => 1,
        }
    }
}

/// `grs demo`
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  grs demo                                  # 20 jobs at realistic speed (about a minute)
  grs demo --jobs 200 --time-scale 0.05     # 200 jobs, every duration ×0.05
  grs demo --keep-running                   # then try grpcurl, grs and /metrics against it
  grs demo --redis redis://127.0.0.1:6379   # the Redis store (keys under a fresh prefix)")]
pub struct DemoArgs {
    /// Jobs to queue on the simulated GitHub (0 with --keep-running: just
    /// start the system).
    #[arg(long, default_value_t = 20)]
    pub jobs: usize,

    /// Pools, each with a runner label of its own: linux (32 VMs),
    /// linux-large (16 VMs of 8 cores, 16 GiB), then linux-2, linux-3, …
    /// (16 VMs each). Two jobs in three go to linux, the rest are spread
    /// evenly.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub pools: u32,

    /// Every pool's maximum of live VMs, instead of the defaults above (a
    /// small value makes jobs wait for capacity).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_instances: Option<u32>,

    /// Simulated Proxmox nodes (pve1, pve2, …). The templates live on
    /// node-local storage on pve1; each other node gets a copy of every
    /// template (`template_replicas`), so each node clones from its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub nodes: u32,

    /// Multiplies every simulated duration: Proxmox tasks (linked clone
    /// 1 s, start 0.5 s, stop 0.2 s, destroy 0.3 s), boot to runner 3 s,
    /// jobs 10–40 s, one new job a second on average. 0.05 runs 20× faster.
    #[arg(long, default_value_t = 1.0, value_parser = parse_time_scale)]
    pub time_scale: f64,

    /// Keep the state in this Redis instead of in memory (keys under a
    /// fresh prefix `grs-demo-<random>`, kept an hour after the run).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,

    /// When the jobs are done, leave everything running and print the
    /// addresses (gRPC, gateway, /metrics, simulators) until Ctrl-C/SIGTERM.
    #[arg(long)]
    pub keep_running: bool,

    /// Write the logs of every part to stderr (no progress display).
    #[arg(short, long)]
    pub verbose: bool,

    /// Where the logs go without --verbose (default: grs-demo.log in the
    /// temporary directory).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Give up (exit 1) when the jobs are not all done after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
}

fn parse_time_scale(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if f.is_finite() && (0.001..=100.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{s} is out of range (0.001 to 100)"))
    }
}

impl DemoArgs {
    /// Where the logs go without `--verbose`.
    pub fn log_path(&self) -> PathBuf {
        self.log_file
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("grs-demo.log"))
    }
}

/// Sets up logging for the demo: every part's logs to stderr with
/// `--verbose` (`RUST_LOG` filters, default `info`), else to the log file
/// (truncated). Returns the file, if any. Call once, before the runtime.
pub fn init_logging(args: &DemoArgs) -> Result<Option<PathBuf>, DemoError> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.verbose {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        return Ok(None);
    }
    let path = args.log_path();
    let file = std::fs::File::create(&path).map_err(|source| DemoError::LogFile {
        path: path.clone(),
        source,
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
    Ok(Some(path))
}

/// The realistic durations of the demo at time scale 1.
#[derive(Debug, Clone, Copy)]
struct Timings {
    pve: TaskDurations,
    boot: Duration,
    job_min: Duration,
    job_max: Duration,
    mean_interarrival: Duration,
}

impl Timings {
    fn scaled(f: f64) -> Self {
        let d = TaskDurations::default();
        let s = |x: Duration| scaled(x, f, Duration::from_millis(1));
        Self {
            pve: TaskDurations {
                linked_clone: s(d.linked_clone),
                full_clone: s(d.full_clone),
                start: s(d.start),
                stop: s(d.stop),
                destroy: s(d.destroy),
                agent_ready: s(d.agent_ready),
            },
            boot: s(Duration::from_secs(3)),
            job_min: s(Duration::from_secs(10)),
            job_max: s(Duration::from_secs(40)),
            mean_interarrival: s(Duration::from_secs(1)),
        }
    }
}

/// The pools of `--pools n`, with `--max-instances` applied.
fn pools(n: u32, max_instances: Option<u32>) -> Vec<PoolSpec> {
    let mut pools = PoolSpec::demo_pools();
    pools.truncate(n as usize);
    for i in pools.len() as u32..n {
        let name = format!("linux-{i}");
        pools.push(PoolSpec {
            labels: vec!["self-hosted".into(), name.clone(), "x64".into()],
            name,
            max_instances: 16,
            template_vmid: 9000 + i,
            cores: None,
            memory_mib: None,
            min_idle: 0,
        });
    }
    if let Some(max) = max_instances {
        for p in &mut pools {
            p.max_instances = max;
        }
    }
    pools
}

/// One job of the load: when it is queued (from the start), what it asks
/// for, how long it runs.
#[derive(Debug, Clone)]
struct PlannedJob {
    at: Duration,
    labels: Vec<String>,
    duration: Duration,
}

/// `n` jobs arriving as a Poisson process; two in three for the first
/// pool, the rest spread evenly over the others.
fn plan(n: usize, pools: &[PoolSpec], t: &Timings) -> Vec<PlannedJob> {
    let mut rng = rand::rng();
    let mut at = Duration::ZERO;
    (0..n)
        .map(|_| {
            let pool = if pools.len() == 1 || rng.random_bool(2.0 / 3.0) {
                &pools[0]
            } else {
                &pools[rng.random_range(1..pools.len())]
            };
            let job = PlannedJob {
                at,
                labels: pool.labels.clone(),
                duration: rng.random_range(t.job_min..=t.job_max),
            };
            // Exponential inter-arrival times: -ln(U) × mean.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            at += t.mean_interarrival.mul_f64(-u.ln());
            job
        })
        .collect()
}

/// The end of a demo run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Jobs queued on GitHub.
    pub jobs_queued: usize,
    /// Jobs the demo was asked for.
    pub jobs_requested: usize,
    /// Jobs completed on GitHub.
    pub jobs_completed: usize,
    /// Clones Proxmox made.
    pub vms_created: usize,
    /// Those clones by the node that made them (with `--nodes`, each node
    /// clones from its own template copy).
    pub vms_created_per_node: std::collections::BTreeMap<String, usize>,
    /// VMs Proxmox destroyed.
    pub vms_deleted: usize,
    /// Runners started from cloud-init documents.
    pub runners_started: usize,
    /// Simulated VMs that failed to start their runner, with the reason.
    pub boot_failures: Vec<String>,
    /// Latency percentiles per stage.
    pub latencies: Vec<StageLatency>,
    /// Jobs not completed on GitHub at the end (at most 10), with what GRS
    /// says about them.
    pub unfinished: Vec<String>,
    /// Instances GRS still counts against its pools' capacity at the end,
    /// or teardowns it still has queued (`None`: it did not answer).
    pub instances_in_use: Option<u64>,
    /// VMs left on Proxmox at the end.
    pub leaked_vms: usize,
    /// Runner registrations left on GitHub at the end.
    pub leaked_runner_registrations: usize,
    /// Wall time from the first job to the end, seconds.
    pub seconds: f64,
    /// Ctrl-C/SIGTERM ended it early.
    pub interrupted: bool,
    /// `--deadline` ended it early.
    pub timed_out: bool,
    /// It ended early because nothing changed for a while (the longest job
    /// plus 30 s) with work left.
    pub stalled: bool,
}

impl Summary {
    /// Why this run failed, if it did.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.timed_out {
            why.push("the deadline passed".to_owned());
        }
        if self.stalled {
            why.push("stalled (nothing changed for the longest job's time plus 30 s)".to_owned());
        }
        if self.jobs_completed < self.jobs_requested {
            why.push(format!(
                "{} of {} jobs completed",
                self.jobs_completed, self.jobs_requested
            ));
        }
        match self.instances_in_use {
            Some(0) => {}
            Some(n) => why.push(format!("GRS still counts {n} instances in use")),
            None => why.push("GRS did not answer GetStats".to_owned()),
        }
        if self.leaked_vms > 0 {
            why.push(format!("{} VMs leaked", self.leaked_vms));
        }
        if self.leaked_runner_registrations > 0 {
            why.push(format!(
                "{} runner registrations leaked",
                self.leaked_runner_registrations
            ));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }

    fn write_table(&self, setup: &str, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "GRS demo: {setup}")?;
        writeln!(out, "  finished in               {:.1} s", self.seconds)?;
        writeln!(
            out,
            "  jobs completed            {} of {}",
            self.jobs_completed, self.jobs_requested
        )?;
        writeln!(
            out,
            "  VMs created / deleted     {} / {}",
            self.vms_created, self.vms_deleted
        )?;
        if self.vms_created_per_node.len() > 1 {
            writeln!(
                out,
                "  VMs created per node      {}",
                self.vms_created_per_node
                    .iter()
                    .map(|(node, n)| format!("{node} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        writeln!(out, "  runners started           {}", self.runners_started)?;
        writeln!(
            out,
            "  latency                   {:>9} {:>9} {:>9}",
            "p50", "p90", "max"
        )?;
        for l in &self.latencies {
            writeln!(
                out,
                "    {:<24}{:>9} {:>9} {:>9}   ({} jobs)",
                l.stage,
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.max_ms),
                l.count
            )?;
        }
        writeln!(
            out,
            "  instances in use (GRS)    {}",
            self.instances_in_use
                .map_or_else(|| "no answer".to_owned(), |n| n.to_string())
        )?;
        writeln!(out, "  leaked VMs                {}", self.leaked_vms)?;
        writeln!(
            out,
            "  leaked registrations      {}",
            self.leaked_runner_registrations
        )?;
        for f in &self.boot_failures {
            writeln!(out, "  boot failure: {f}")?;
        }
        for u in &self.unfinished {
            writeln!(out, "  not completed: {u}")?;
        }
        let verdict = match (self.interrupted, self.failure()) {
            (true, _) => "INTERRUPTED".to_owned(),
            (false, Some(why)) => format!("FAILED: {why}"),
            (false, None) => "OK".to_owned(),
        };
        writeln!(out, "result: {verdict}")
    }
}

fn ms(v: u64) -> String {
    if v < 1000 {
        format!("{v} ms")
    } else {
        format!("{:.2} s", v as f64 / 1000.0)
    }
}

/// The live display: an indicatif bar on a terminal, else a plain line
/// every few seconds (unless `quiet`).
struct Progress {
    bar: indicatif::ProgressBar,
    plain: bool,
    last_plain: Instant,
}

impl Progress {
    fn new(jobs: usize, quiet: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if quiet || !terminal {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(jobs as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed:>4} [{bar:30}] {pos}/{len} done  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        };
        Self {
            bar,
            plain: !quiet && !terminal,
            last_plain: Instant::now(),
        }
    }

    fn update(&mut self, c: Counts) {
        let msg = format!(
            "queued {} · cloning {} · booting {} · running {} · deleting {}",
            c.queued, c.cloning, c.booting, c.running, c.deleting
        );
        self.bar.set_position(c.done as u64);
        if self.plain && self.last_plain.elapsed() >= Duration::from_secs(5) {
            self.last_plain = Instant::now();
            eprintln!("grs demo: {} done · {msg}", c.done);
        }
        self.bar.set_message(msg);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// How often the demo looks at the simulators.
const TICK: Duration = Duration::from_millis(10);
/// After the last job completed, how long its VMs get to go before they
/// count as leaked.
const SETTLE: Duration = Duration::from_secs(30);

/// Runs `grs demo`: starts the system, queues the jobs, shows progress,
/// writes the summary (and with `--keep-running` the addresses) to `out`,
/// and stops everything. `shutdown` (Ctrl-C/SIGTERM) ends it early.
pub async fn run(
    args: DemoArgs,
    format: OutputFormat,
    log_file: Option<PathBuf>,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::CliError> {
    let timings = Timings::scaled(args.time_scale);
    let pools = pools(args.pools, args.max_instances);
    let store = match &args.redis {
        None => StoreChoice::Memory,
        Some(url) => StoreChoice::Redis {
            url: url.clone(),
            prefix: format!("grs-demo-{:08x}", rand::random::<u32>()),
        },
    };
    let opts = SystemOptions {
        pools: pools.clone(),
        pve_durations: timings.pve,
        store,
        time_scale: args.time_scale,
        job_duration: timings.job_max,
        nodes: args.nodes,
        ..SystemOptions::default()
    };
    let quiet = args.verbose || format == OutputFormat::Json;
    if let (Some(path), false) = (&log_file, format == OutputFormat::Json) {
        eprintln!("grs demo: logs go to {}", path.display());
    }
    let system = System::start(opts).await?;
    let setup = format!(
        "{} jobs over {} ({}) on {}, time scale {}, store: {}",
        args.jobs,
        if pools.len() == 1 { "1 pool" } else { "pools" },
        pools
            .iter()
            .map(|p| format!("{} ≤{} VMs", p.name, p.max_instances))
            .collect::<Vec<_>>()
            .join(", "),
        match args.nodes {
            1 => "1 node".to_owned(),
            n => format!("{n} nodes with template replicas"),
        },
        args.time_scale,
        system.store_description,
    );
    if args.keep_running && format == OutputFormat::Table {
        write_addresses(&system, out)?;
    }

    let mut shutdown = std::pin::pin!(shutdown);
    let result = drive(&system, &args, &timings, &pools, quiet, &mut shutdown).await;
    let summary = result.summary;
    match format {
        OutputFormat::Table => summary.write_table(&setup, out)?,
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &summary).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
    }
    out.flush()?;

    let mut fleet = result.fleet;
    if args.keep_running && !summary.interrupted {
        if format == OutputFormat::Table {
            writeln!(
                out,
                "GRS demo: everything stays up at the addresses above; Ctrl-C or SIGTERM stops it."
            )?;
            out.flush()?;
        }
        // VMs GRS starts from now on (a pool's min_idle, DeleteInstance
        // followed by a new job…) still boot.
        let mut tracker = result.tracker;
        let mut tick = tokio::time::interval(TICK * 10);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => fleet.observe(&mut tracker, &system.github, &system.pve),
                () = fleet.next_boot(&system.github) => {}
            }
        }
    }
    fleet.stop();
    system.shutdown().await?;
    if summary.interrupted {
        return Err(DemoError::Interrupted.into());
    }
    match summary.failure() {
        Some(why) => Err(DemoError::Failed(why).into()),
        None => Ok(()),
    }
}

/// Prints where everything listens, and commands to try.
fn write_addresses(system: &System, out: &mut impl Write) -> std::io::Result<()> {
    let grpc = system.control_plane_addr;
    let gw = system.gateway_url();
    writeln!(out, "GRS demo addresses:")?;
    writeln!(out, "  control plane (gRPC)  http://{grpc}")?;
    writeln!(
        out,
        "  webhook gateway       {gw}  (POST /webhook, GET /cloud-init/<token>/user-data)"
    )?;
    writeln!(out, "  gateway metrics       {gw}/metrics")?;
    writeln!(
        out,
        "  control-plane metrics http://{}/metrics",
        system.metrics_addr
    )?;
    writeln!(
        out,
        "  PVE simulator         {}  (API token {})",
        system.pve.url(),
        system.pve.token_id()
    )?;
    writeln!(out, "  GitHub simulator      {}", system.github.url())?;
    writeln!(out, "  store                 {}", system.store_description)?;
    writeln!(out, "Try:")?;
    writeln!(out, "  grpcurl -plaintext {grpc} list")?;
    writeln!(
        out,
        "  grpcurl -plaintext {grpc} grs.v1.ControlPlane/GetStats"
    )?;
    writeln!(
        out,
        "  grpcurl -plaintext {grpc} grs.v1.ControlPlane/ListInstances"
    )?;
    writeln!(out, "  grs --server http://{grpc} jobs list")?;
    writeln!(out, "  grs --server http://{grpc} events")?;
    writeln!(out, "  curl -s http://{}/metrics", system.metrics_addr)?;
    out.flush()
}

/// What [`drive`] leaves: the summary, and the fleet and tracker for
/// `--keep-running`.
struct Driven {
    summary: Summary,
    fleet: Fleet,
    tracker: Tracker,
}

/// Queues the jobs and watches the world until every job is done and every
/// VM gone, the deadline passes, or `shutdown` completes.
async fn drive(
    system: &System,
    args: &DemoArgs,
    timings: &Timings,
    pools: &[PoolSpec],
    quiet: bool,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Driven {
    let started = Instant::now();
    let stop = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let generator = tokio::spawn(generate(
        system.github.clone(),
        plan(args.jobs, pools, timings),
        tx,
        stop.clone(),
    ));
    let mut tracker = Tracker::new(&system.instance_prefix);
    let mut fleet = Fleet::new(timings.boot);
    let mut progress = Progress::new(args.jobs, quiet);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut queued, mut all_queued) = (0usize, false);
    let mut settle_until: Option<Instant> = None;
    let (mut interrupted, mut timed_out, mut stalled) = (false, false, false);
    // Nothing changed for this long once every job is queued: something is
    // stuck (a job waits with no VM, a VM never takes a job); no job runs
    // longer than `job_max`, and the margin covers retries.
    let stall_after = timings.job_max + Duration::from_secs(30);
    let mut last_change = (Counts::default(), Instant::now());
    loop {
        tokio::select! {
            () = shutdown.as_mut() => {
                interrupted = true;
                break;
            }
            msg = rx.recv(), if !all_queued => match msg {
                Some((id, at)) => {
                    tracker.queued(id, at);
                    queued += 1;
                }
                None => all_queued = true,
            },
            _ = tick.tick() => {
                fleet.observe(&mut tracker, &system.github, &system.pve);
                let counts = tracker.counts();
                progress.update(counts);
                if counts != last_change.0 {
                    last_change = (counts, Instant::now());
                } else if all_queued && last_change.1.elapsed() >= stall_after {
                    stalled = true;
                    break;
                }
                if !all_queued {
                    // Still queueing.
                } else if tracker.completed() >= queued {
                    if tracker.vms_alive() == 0 && instances_in_use(system).await == Some(0) {
                        break;
                    }
                    let until = *settle_until.get_or_insert_with(|| Instant::now() + SETTLE);
                    if Instant::now() >= until {
                        break;
                    }
                }
                if started.elapsed() >= args.deadline {
                    timed_out = true;
                    break;
                }
            }
            () = fleet.next_boot(&system.github) => {}
        }
    }
    stop.cancel();
    let _ = generator.await;
    // Jobs queued while stopping still count.
    while let Ok((id, at)) = rx.try_recv() {
        tracker.queued(id, at);
        queued += 1;
    }
    fleet.observe(&mut tracker, &system.github, &system.pve);
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let leaked_vms = system.pve.vms().iter().filter(|v| !v.template).count();
    let unfinished = unfinished(system).await;
    let instances_in_use = instances_in_use(system).await;
    let summary = Summary {
        jobs_queued: queued,
        jobs_requested: args.jobs,
        jobs_completed: tracker.completed(),
        vms_created: system.pve.task_count("qmclone"),
        vms_created_per_node: system
            .pve
            .task_log()
            .into_iter()
            .filter(|t| t.kind == "qmclone")
            .fold(Default::default(), |mut per, t| {
                *per.entry(t.node).or_insert(0) += 1;
                per
            }),
        vms_deleted: system.pve.task_count("qmdestroy"),
        runners_started: fleet.runners_started,
        boot_failures: fleet
            .failures
            .iter()
            .map(|(name, e)| format!("{name}: {e}"))
            .collect(),
        latencies: tracker.latencies(),
        unfinished,
        instances_in_use,
        leaked_vms,
        leaked_runner_registrations: system.github.runners().len(),
        seconds,
        interrupted,
        timed_out,
        stalled,
    };
    Driven {
        summary,
        fleet,
        tracker,
    }
}

/// Instances GRS counts in use over every pool plus teardowns it still has
/// queued, as `GetStats` says; `None` when it does not answer.
pub async fn instances_in_use(system: &System) -> Option<u64> {
    let mut api = system.client().await.ok()?;
    let stats = api
        .get_stats(grs_proto::v1::GetStatsRequest {})
        .await
        .ok()?
        .into_inner();
    let in_use: u64 = stats
        .pools
        .iter()
        .map(|p| u64::from(p.instances_in_use))
        .sum();
    Some(in_use + stats.teardown_queue_depth)
}

/// Up to 10 jobs GitHub has not completed, each with GRS's view of it and
/// of the instance made for it (which may have run another job).
async fn unfinished(system: &System) -> Vec<String> {
    use grs_proto::v1 as pb;
    let jobs: Vec<_> = system
        .github
        .jobs()
        .into_iter()
        .filter(|j| j.status != grs_github::sim::SimJobStatus::Completed)
        .take(10)
        .collect();
    if jobs.is_empty() {
        return Vec::new();
    }
    let Ok(mut api) = system.client().await else {
        return jobs.iter().map(|j| format!("job {}", j.id)).collect();
    };
    let mut lines = Vec::new();
    for j in jobs {
        let mut line = format!("job {} ({:?} on GitHub)", j.id, j.status);
        match api.get_job(pb::GetJobRequest { job_id: j.id }).await {
            Ok(r) => {
                let g = r.into_inner();
                line += &format!(": GRS has it {}", crate::view::job_state(g.state));
                if !g.reason.is_empty() {
                    line += &format!(" ({})", g.reason);
                }
                if !g.instance_name.is_empty() {
                    let name = g.instance_name.clone();
                    if let Ok(i) = api.get_instance(pb::GetInstanceRequest { name }).await {
                        let i = i.into_inner();
                        line += &format!(
                            "; instance {} is {}",
                            i.name,
                            crate::view::instance_state(i.state)
                        );
                        if i.assigned_job_id != 0 && i.assigned_job_id != j.id {
                            line += &format!(" and ran job {} instead", i.assigned_job_id);
                        }
                    }
                }
            }
            Err(e) => line += &format!(": GRS answers {}", e.message()),
        }
        lines.push(line);
    }
    lines
}

/// Queues the planned jobs on GitHub at their times; sends each job's id
/// and the moment it was queued. Stops queueing when `stop` is cancelled;
/// jobs being queued then are finished.
async fn generate(
    github: grs_github::sim::GitHubSim,
    plan: Vec<PlannedJob>,
    tx: mpsc::UnboundedSender<(u64, Instant)>,
    stop: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    let mut queueing = tokio::task::JoinSet::new();
    for (i, job) in plan.into_iter().enumerate() {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(start + job.at) => {}
        }
        let (github, tx) = (github.clone(), tx.clone());
        queueing.spawn(async move {
            let at = Instant::now();
            // Returns once the `queued` delivery was answered.
            let queued = github
                .queue_job(NewJob {
                    labels: job.labels,
                    name: format!("build-{i}"),
                    duration: Some(job.duration),
                    repository: None,
                })
                .await;
            let _ = tx.send((queued.id, at));
        });
    }
    while queueing.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_spreads_jobs_over_the_pools_at_the_scaled_pace() {
        let t = Timings::scaled(0.5);
        assert_eq!(t.pve.linked_clone, Duration::from_millis(500));
        assert_eq!(t.boot, Duration::from_millis(1500));
        let pools = pools(3, None);
        assert_eq!(pools[2].max_instances, 16);
        assert!(
            super::pools(2, Some(3))
                .iter()
                .all(|p| p.max_instances == 3)
        );
        assert_eq!(
            pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["linux", "linux-large", "linux-2"]
        );
        let plan = plan(400, &pools, &t);
        assert_eq!(plan.len(), 400);
        for pool in &pools {
            let n = plan.iter().filter(|j| j.labels == pool.labels).count();
            assert!(n > 30, "{}: {n} jobs", pool.name);
        }
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(
            plan.iter()
                .all(|j| (t.job_min..=t.job_max).contains(&j.duration))
        );
        // 399 gaps of mean 0.5 s: about 200 s; far outside [100 s, 300 s]
        // only if the pace is wrong.
        let last = plan.last().unwrap().at.as_secs_f64();
        assert!((100.0..300.0).contains(&last), "{last}");
    }

    #[test]
    fn time_scales_outside_the_range_are_refused() {
        assert!(parse_time_scale("0.05").is_ok());
        assert!(parse_time_scale("0").is_err());
        assert!(parse_time_scale("-1").is_err());
        assert!(parse_time_scale("NaN").is_err());
        assert!(parse_time_scale("fast").is_err());
    }
}
