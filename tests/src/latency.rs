//! The latency benchmark of issues 10 and 12: what a user waits for, and
//! how much of it is GRS's, measured in one run through the whole system
//! `grs demo` assembles ([`grs::demo::System`]: the real control plane with
//! the memory store, the real webhook gateway, the real Proxmox provisioner
//! against the PVE simulator at its realistic task durations, the GitHub
//! simulator) and simulated VMs that boot from the cloud-init documents GRS
//! serves.
//!
//! Phases, each on a fresh system (so one phase's VMs, warm pool or
//! learned task estimates do not help or hinder another):
//! 1. **cold**: one job at a time on a pool without a warm pool: queued →
//!    job started; GRS's own share of queued → runner online (minus the
//!    simulated tasks, the VM's boot and GitHub's registration call);
//!    completed → VM deleted minus its stop and destroy tasks; the PVE API
//!    calls of each create+delete cycle, counted by the simulator.
//! 2. **warm**: one job at a time on a pool with `min_idle`, each queued
//!    when an idle warm runner is online: queued → job started.
//! 3. **burst**: jobs queued all at once on a pool of a given capacity:
//!    when the first `capacity` VMs run, against the simulator's lower bound
//!    (its storage lock serializes part of each clone), and when every job
//!    has started, against the schedule of an ideal dispatcher under the
//!    same lock, pool cap and durations.
//!
//! Every time comes from the simulators' own records ([`SimJob`]'s
//! `started_at`/`completed_at`, [`PveSim::task_log`]), not from polling, so
//! the harness's watching adds nothing to a measure. The VMs here are this
//! module's, not `grs::demo::Fleet`: a boot starts exactly the boot delay
//! after the start task ended in the simulator's log, and its cloud-init
//! fetch and runner registration are timed separately.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use grs::demo::fleet::{fetch_documents, seed_url};
use grs::demo::{PoolSpec, StoreChoice, System, SystemOptions, instances_in_use};
use grs_github::sim::{GitHubSim, NewJob, SimJob};
use grs_provisioner_proxmox::sim::{PveSim, TaskDurations, TaskRecord};
use tokio::task::{JoinHandle, JoinSet};

use crate::soak::percentiles;
use crate::world::poll_until;

/// GitHub's job times (wall clock, as GitHub reports them) on the
/// monotonic clock the PVE simulator's task log and this benchmark use:
/// one pair of readings taken once anchors the two clocks (a wall clock
/// stepped during a run would shift the GitHub-side figures by the step).
fn at(t: std::time::SystemTime) -> Instant {
    static ANCHOR: std::sync::LazyLock<(Instant, std::time::SystemTime)> =
        std::sync::LazyLock::new(|| (Instant::now(), std::time::SystemTime::now()));
    let (mono, wall) = *ANCHOR;
    match t.duration_since(wall) {
        Ok(after) => mono + after,
        Err(before) => mono.checked_sub(before.duration()).unwrap_or(mono),
    }
}

/// The labels of the benchmark's pool; its jobs ask for the first two.
const POOL_LABELS: [&str; 3] = ["self-hosted", "linux", "x64"];

/// What to run.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    /// Jobs of the cold phase (one at a time).
    pub cold_jobs: usize,
    /// Jobs of the warm phase (one at a time).
    pub warm_jobs: usize,
    /// The warm phase's `min_idle`.
    pub min_idle: u32,
    /// Jobs of the first burst; its first `burst_capacity` VMs are timed.
    pub burst_jobs: usize,
    /// Jobs of the second burst; it is timed until every job has started.
    pub burst_all_jobs: usize,
    /// The bursts' pool capacity (`max_instances`).
    pub burst_capacity: u32,
    /// Nodes of the third burst (the first burst's jobs on that many nodes,
    /// each with a copy of the template: `template_replicas`); below 2: no
    /// third burst.
    pub replica_nodes: u32,
    /// How long the simulated Proxmox tasks take.
    pub pve: TaskDurations,
    /// Multiplies the Proxmox client's polling and retry delays (1.0: the
    /// production defaults; see [`SystemOptions::time_scale`]).
    pub client_time_scale: f64,
    /// From a VM's start task ending to its cloud-init fetch.
    pub boot: Duration,
    /// How long a job of the cold and warm phases runs.
    pub job_duration: Duration,
    /// How long a job of either burst runs: longer than the burst, so no
    /// VM of the first wave is replaced while it is timed.
    pub burst_job_duration: Duration,
    /// The longest any one wait may take before the run fails.
    pub timeout: Duration,
}

impl LatencyOptions {
    /// The full benchmark at the simulator's realistic durations (linked
    /// clone 1 s, start 0.5 s, stop 0.2 s + destroy 0.3 s) and the
    /// production client settings: 50 cold and 50 warm jobs, bursts of 100
    /// and 200 jobs on a pool of 50.
    pub fn full() -> Self {
        Self {
            cold_jobs: 50,
            warm_jobs: 50,
            min_idle: 4,
            burst_jobs: 100,
            burst_all_jobs: 200,
            burst_capacity: 50,
            replica_nodes: 3,
            pve: TaskDurations::default(),
            client_time_scale: 1.0,
            boot: Duration::from_secs(1),
            job_duration: Duration::from_millis(200),
            burst_job_duration: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
        }
    }

    /// A CI-sized run (a few seconds): the simulator's fast durations,
    /// client delays scaled to them, a handful of jobs. Its timings mean
    /// nothing; its structure (every job started, calls per cycle) does.
    pub fn smoke() -> Self {
        Self {
            cold_jobs: 3,
            warm_jobs: 3,
            min_idle: 2,
            burst_jobs: 8,
            burst_all_jobs: 12,
            burst_capacity: 4,
            replica_nodes: 2,
            pve: TaskDurations::fast(),
            client_time_scale: 0.04,
            boot: Duration::from_millis(50),
            job_duration: Duration::from_millis(50),
            burst_job_duration: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
        }
    }
}

/// One cold job's cycle.
#[derive(Debug, Clone)]
pub struct ColdCycle {
    /// GitHub's job id.
    pub job_id: u64,
    /// Queued → the job started on GitHub.
    pub queued_to_started: Duration,
    /// Queued → its VM's start task ended.
    pub queued_to_vm_running: Duration,
    /// Queued → runner online, minus the simulated tasks, the boot and
    /// GitHub's registration call: GRS's own share.
    pub grs_share: Duration,
    /// The simulated tasks of the create (clone, start, and any other of
    /// its VM before its runner came online).
    pub create_tasks: Duration,
    /// The cloud-init fetch through the gateway (part of the share).
    pub cloud_init_fetch: Duration,
    /// Queued → its clone task created: webhook, queue pickup, GitHub
    /// check, bootstrap, placement, clone call (part of the share).
    pub to_clone: Duration,
    /// Between its create tasks: noticing one ended (task polling) and
    /// sending the next (part of the share).
    pub between_tasks: Duration,
    /// Completed on GitHub → the VM destroyed (its destroy task ended).
    pub completed_to_deleted: Duration,
    /// The simulated tasks after completion (stop, destroy).
    pub delete_tasks: Duration,
    /// PVE API requests from queueing the job until GRS had nothing left
    /// in use.
    pub pve_calls: u64,
    /// Those requests by endpoint.
    pub pve_calls_by_endpoint: BTreeMap<String, u64>,
}

impl ColdCycle {
    /// Completed → deleted beyond the stop and destroy tasks.
    pub fn delete_overhead(&self) -> Duration {
        self.completed_to_deleted.saturating_sub(self.delete_tasks)
    }
}

/// One warm job.
#[derive(Debug, Clone)]
pub struct WarmJob {
    /// Queued → started on GitHub.
    pub queued_to_started: Duration,
    /// A warm runner took it (not one made for it).
    pub on_warm_runner: bool,
}

/// One burst.
#[derive(Debug, Clone)]
pub struct Burst {
    /// Jobs queued.
    pub jobs: usize,
    /// The pool's capacity.
    pub capacity: usize,
    /// Queued → the `capacity`-th VM running.
    pub first_wave: Duration,
    /// The simulator's lower bound for `capacity` clone-and-starts.
    pub first_wave_bound: Duration,
    /// Queued → the last job started.
    pub all_started: Duration,
    /// The same for an ideal dispatcher: no time of its own, the
    /// simulator's storage lock, the pool's cap, every duration as
    /// configured.
    pub all_started_limit: Duration,
    /// Clone tasks that failed.
    pub failed_clones: usize,
    /// PVE API requests until every job had started.
    pub pve_calls: u64,
    /// Clone tasks started.
    pub clones: usize,
    /// Destroy tasks created before the first wave ran: each holds its
    /// storage's lock for a while (the volume's free), which the first
    /// wave's lower bound does not count. None with jobs outlasting the
    /// wave.
    pub first_wave_destroys: usize,
    /// How long a destroy holds the lock.
    pub destroy_hold: Duration,
    /// The nodes the pool spans (one, or one per template replica).
    pub nodes: u32,
    /// The first wave's VMs per node.
    pub first_wave_per_node: BTreeMap<String, usize>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// The options it ran with.
    pub options: LatencyOptions,
    /// The cold phase, in order.
    pub cold: Vec<ColdCycle>,
    /// The warm phase, in order.
    pub warm: Vec<WarmJob>,
    /// The first burst (timed to its first wave); `None` when skipped.
    pub burst: Option<Burst>,
    /// The second burst (timed until every job started); `None` when
    /// skipped.
    pub burst_all: Option<Burst>,
    /// The first burst's jobs on several nodes with template replicas
    /// (timed to its first wave); `None` when skipped.
    pub burst_replicas: Option<Burst>,
    /// The cold phase's PVE calls before its first job, by endpoint: pool
    /// validation and the reconciler's first pass (not any cycle's).
    pub startup_calls: BTreeMap<String, u64>,
    /// Simulated VMs that did not start their runner, and why.
    pub boot_failures: Vec<String>,
    /// Most a boot started after its due time (the harness's own delay,
    /// which every share excludes; it should be about 0).
    pub max_boot_lag: Duration,
}

/// Runs the benchmark. A phase with no jobs is skipped.
pub async fn run(o: &LatencyOptions) -> anyhow::Result<LatencyReport> {
    let mut boots = BootSummary::default();
    let (mut cold, mut startup_calls) = (Vec::new(), BTreeMap::new());
    if o.cold_jobs > 0 {
        tracing::info!(jobs = o.cold_jobs, "cold phase");
        let (c, startup, b) = cold_phase(o).await.context("the cold phase")?;
        cold = c;
        startup_calls = startup;
        boots.add(b);
    }
    let mut warm = Vec::new();
    if o.warm_jobs > 0 {
        tracing::info!(jobs = o.warm_jobs, "warm phase");
        let (w, b) = warm_phase(o).await.context("the warm phase")?;
        warm = w;
        boots.add(b);
    }
    // Both bursts' jobs outlast the burst, so the first wave's VMs are not
    // replaced (and their slots refilled) while it is being timed.
    let mut burst = None;
    if o.burst_jobs > 0 {
        tracing::info!(jobs = o.burst_jobs, "first burst");
        let (r, b) = burst_phase(o, o.burst_jobs, o.burst_job_duration, false, 1)
            .await
            .context("the first burst")?;
        burst = Some(r);
        boots.add(b);
    }
    let mut burst_all = None;
    if o.burst_all_jobs > 0 {
        tracing::info!(jobs = o.burst_all_jobs, "second burst");
        let (r, b) = burst_phase(o, o.burst_all_jobs, o.burst_job_duration, true, 1)
            .await
            .context("the second burst")?;
        burst_all = Some(r);
        boots.add(b);
    }
    let mut burst_replicas = None;
    if o.burst_jobs > 0 && o.replica_nodes > 1 {
        tracing::info!(jobs = o.burst_jobs, nodes = o.replica_nodes, "third burst");
        let (r, b) = burst_phase(
            o,
            o.burst_jobs,
            o.burst_job_duration,
            false,
            o.replica_nodes,
        )
        .await
        .context("the third burst (template replicas)")?;
        burst_replicas = Some(r);
        boots.add(b);
    }
    Ok(LatencyReport {
        options: o.clone(),
        cold,
        warm,
        burst,
        burst_all,
        burst_replicas,
        startup_calls,
        boot_failures: boots.failures,
        max_boot_lag: boots.max_lag,
    })
}

/// A fresh system with one pool of `max_instances` and `min_idle` over
/// `nodes` nodes (a template copy on each), its reconciler passing every
/// `reconcile_interval` (`None`: the default).
async fn system(
    o: &LatencyOptions,
    max_instances: u32,
    min_idle: u32,
    nodes: u32,
    reconcile_interval: Option<Duration>,
) -> anyhow::Result<Arc<System>> {
    System::start(SystemOptions {
        pools: vec![PoolSpec {
            name: "linux".into(),
            labels: POOL_LABELS.iter().map(|l| (*l).to_owned()).collect(),
            max_instances,
            template_vmid: 9000,
            cores: None,
            memory_mib: None,
            min_idle,
        }],
        pve_durations: o.pve,
        job_duration: o.job_duration,
        store: StoreChoice::Memory,
        time_scale: o.client_time_scale,
        installation_id: "grs-latency".into(),
        nodes,
        reconcile_interval,
        ..SystemOptions::default()
    })
    .await
    .map(Arc::new)
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn new_job(name: String, duration: Duration) -> NewJob {
    NewJob {
        labels: POOL_LABELS[..2].iter().map(|l| (*l).to_owned()).collect(),
        name,
        duration: Some(duration),
        repository: None,
    }
}

/// Polls `check` until it gives a value; an error naming `what` after
/// `timeout`.
async fn wait<T, F, Fut>(what: &str, timeout: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match poll_until(Instant::now() + timeout, check).await {
        Some(v) => Ok(v),
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Total duration of the tasks of `vmid` created in `[from, until)`.
fn tasks_of(log: &[TaskRecord], vmid: u32, from: Instant, until: Instant) -> Duration {
    log.iter()
        .filter(|t| t.vmid == vmid && t.created >= from && t.created < until)
        .map(TaskRecord::duration)
        .sum()
}

/// Waits until the system's start-up calls to PVE are over (the pools'
/// validation, the reconciler's first pass: it lists the cluster's VMs)
/// and returns them: the reconciler has listed the cluster and no request
/// came for `quiet`. Bounded by `timeout`.
async fn startup_calls(
    pve: &PveSim,
    quiet: Duration,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, u64>> {
    wait("the reconciler's first pass", timeout, || {
        let listed = pve
            .requests_by_endpoint()
            .contains_key("GET /cluster/resources");
        async move { listed.then_some(()) }
    })
    .await?;
    let deadline = Instant::now() + timeout;
    let mut seen = pve.request_count();
    loop {
        tokio::time::sleep(quiet).await;
        let now = pve.request_count();
        if now == seen {
            return Ok(pve.requests_by_endpoint());
        }
        if Instant::now() > deadline {
            bail!("PVE requests did not stop after start-up within {timeout:?}");
        }
        seen = now;
    }
}

async fn cold_phase(
    o: &LatencyOptions,
) -> anyhow::Result<(Vec<ColdCycle>, BTreeMap<String, u64>, BootSummary)> {
    // The reconciler's passes (every 30 s by default: the installation's
    // VMs listed, each one's config read) are a cost per interval, not per
    // VM; the simulator cannot tell who asked, so in this phase they are
    // kept out of the cycles being counted.
    let system = system(o, 4, 0, 1, Some(QUIET_RECONCILER)).await?;
    // Nor are the start-up's calls the first cycle's.
    let quiet = o.pve.linked_clone.max(Duration::from_millis(50));
    let startup = startup_calls(&system.pve, quiet, o.timeout).await?;
    let vms = Vms::start(&system, o.boot);
    let mut cycles = Vec::with_capacity(o.cold_jobs);
    for i in 0..o.cold_jobs {
        let (github, pve) = (&system.github, &system.pve);
        pve.reset_request_count();
        let t0 = Instant::now();
        let job = github
            .queue_job(new_job(format!("cold-{i}"), o.job_duration))
            .await;
        let name = system.instance_name(job.id);
        let done = wait("the cold job to complete", o.timeout, || {
            let j = github.job(job.id).filter(|j| j.completed_at.is_some());
            async move { j }
        })
        .await?;
        wait("its VM to be deleted", o.timeout, || {
            let gone = pve.vms_named(&name).is_empty();
            async move { gone.then_some(()) }
        })
        .await?;
        wait("GRS to have nothing in use", o.timeout, || async {
            (instances_in_use(&system).await == Some(0)).then_some(())
        })
        .await?;
        let pve_calls = pve.request_count();
        let pve_calls_by_endpoint = pve.requests_by_endpoint();
        let boot = vms
            .record(&name)
            .with_context(|| format!("{name} never booted its runner"))?;
        if done.runner_name.as_deref() != Some(name.as_str()) {
            bail!(
                "cold job {} ran on {:?}, not on its own VM {name}",
                job.id,
                done.runner_name
            );
        }
        let log = pve.task_log();
        let (Some(started), Some(completed)) = (done.started_at.map(at), done.completed_at.map(at))
        else {
            bail!("job {} completed without starting", job.id);
        };
        let create_tasks = tasks_of(&log, boot.vmid, t0, boot.online_at);
        let create_log: Vec<&TaskRecord> = log
            .iter()
            .filter(|t| t.vmid == boot.vmid && t.created >= t0 && t.created < boot.online_at)
            .collect();
        let first_created = create_log.iter().map(|t| t.created).min().unwrap_or(t0);
        let last_ended = create_log
            .iter()
            .filter_map(|t| t.ended)
            .max()
            .unwrap_or(first_created);
        let delete_tasks = tasks_of(&log, boot.vmid, completed, Instant::now());
        let destroyed = log
            .iter()
            .filter(|t| t.vmid == boot.vmid && t.kind == "qmdestroy" && t.ok)
            .filter_map(|t| t.ended)
            .max()
            .with_context(|| format!("{name} has no destroy task"))?;
        let online = boot.online_at.saturating_duration_since(t0);
        cycles.push(ColdCycle {
            job_id: job.id,
            queued_to_started: started.saturating_duration_since(t0),
            queued_to_vm_running: boot.running_at.saturating_duration_since(t0),
            grs_share: online
                .saturating_sub(create_tasks)
                .saturating_sub(o.boot)
                .saturating_sub(boot.lag)
                .saturating_sub(boot.registration),
            create_tasks,
            cloud_init_fetch: boot.fetch,
            to_clone: first_created.saturating_duration_since(t0),
            between_tasks: last_ended
                .saturating_duration_since(first_created)
                .saturating_sub(create_tasks),
            completed_to_deleted: destroyed.saturating_duration_since(completed),
            delete_tasks,
            pve_calls,
            pve_calls_by_endpoint,
        });
    }
    let summary = shutdown(system, vms).await?;
    Ok((cycles, startup, summary))
}

/// Idle online runners on GitHub.
fn idle_runners(github: &GitHubSim) -> usize {
    github
        .runners()
        .iter()
        .filter(|r| r.online && !r.busy && r.job_id.is_none())
        .count()
}

async fn warm_phase(o: &LatencyOptions) -> anyhow::Result<(Vec<WarmJob>, BootSummary)> {
    let system = system(o, o.min_idle * 2, o.min_idle, 1, None).await?;
    let vms = Vms::start(&system, o.boot);
    let github = &system.github;
    let warm = o.min_idle as usize;
    wait("the warm pool to fill", o.timeout, || {
        let n = idle_runners(github);
        async move { (n >= warm).then_some(()) }
    })
    .await?;
    let mut jobs = Vec::with_capacity(o.warm_jobs);
    let mut ids = Vec::with_capacity(o.warm_jobs);
    for i in 0..o.warm_jobs {
        wait("an idle warm runner", o.timeout, || {
            let n = idle_runners(github);
            async move { (n > 0).then_some(()) }
        })
        .await?;
        let t0 = Instant::now();
        let job = github
            .queue_job(new_job(format!("warm-{i}"), o.job_duration))
            .await;
        let started: SimJob = wait("the warm job to start", o.timeout, || {
            let j = github.job(job.id).filter(|j| j.started_at.is_some());
            async move { j }
        })
        .await?;
        jobs.push(WarmJob {
            queued_to_started: started
                .started_at
                .map_or(Duration::MAX, |s| at(s).saturating_duration_since(t0)),
            on_warm_runner: started.runner_name.as_deref()
                != Some(system.instance_name(job.id).as_str()),
        });
        ids.push(job.id);
    }
    wait("the warm jobs to complete", o.timeout, || {
        let all = ids
            .iter()
            .all(|id| github.job(*id).is_some_and(|j| j.completed_at.is_some()));
        async move { all.then_some(()) }
    })
    .await?;
    let summary = shutdown(system, vms).await?;
    Ok((jobs, summary))
}

/// The cold phase's reconcile interval: longer than any run, so only the
/// pass at start-up runs, before the first cycle.
const QUIET_RECONCILER: Duration = Duration::from_secs(24 * 3600);

/// Queues `n` jobs at once on a fresh pool of the burst capacity spread
/// over `nodes` nodes (a template copy on each); returns when the first
/// wave runs (and, with `until_all`, when every job has started).
async fn burst_phase(
    o: &LatencyOptions,
    n: usize,
    job_duration: Duration,
    until_all: bool,
    nodes: u32,
) -> anyhow::Result<(Burst, BootSummary)> {
    let capacity = o.burst_capacity as usize;
    let system = system(o, o.burst_capacity, 0, nodes, None).await?;
    let vms = Vms::start(&system, o.boot);
    let (github, pve) = (&system.github, &system.pve);
    pve.reset_request_count();
    let t0 = Instant::now();
    let mut queueing = JoinSet::new();
    for i in 0..n {
        let github = github.clone();
        queueing.spawn(async move {
            github
                .queue_job(new_job(format!("burst-{i}"), job_duration))
                .await
                .id
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(id) = queueing.join_next().await {
        ids.push(id?);
    }
    // A burst takes longer than one job: its timeout grows with the waves.
    let timeout = o.timeout * (n.div_ceil(capacity) as u32 + 1);
    let running_starts = || {
        let mut ends: Vec<Instant> = pve
            .task_log()
            .into_iter()
            .filter(|t| t.kind == "qmstart" && t.ok)
            .filter_map(|t| t.ended)
            .collect();
        ends.sort();
        ends
    };
    let first_wave_at = wait("the first wave of VMs to run", timeout, || {
        let ends = running_starts();
        async move { ends.get(capacity - 1).copied() }
    })
    .await?;
    let all_started_at = if until_all {
        wait("every burst job to start", timeout, || {
            let mut last = Some(t0);
            for id in &ids {
                last = match (last, github.job(*id).and_then(|j| j.started_at.map(at))) {
                    (Some(l), Some(s)) => Some(l.max(s)),
                    _ => None,
                };
            }
            async move { last }
        })
        .await?
    } else {
        first_wave_at
    };
    let log = pve.task_log();
    let hold = pve.storage_lock_hold();
    let mut first_wave_per_node = BTreeMap::new();
    for t in log
        .iter()
        .filter(|t| t.kind == "qmstart" && t.ok && t.ended.is_some_and(|e| e <= first_wave_at))
    {
        *first_wave_per_node.entry(t.node.clone()).or_insert(0) += 1;
    }
    // Each node clones from its own template on its own storage: one lock
    // domain per node. The bound spreads the wave evenly, the best any
    // placement can do.
    let even: Vec<usize> = (0..nodes as usize)
        .map(|i| capacity / nodes as usize + usize::from(i < capacity % nodes as usize))
        .collect();
    let burst = Burst {
        jobs: n,
        capacity,
        first_wave: first_wave_at.saturating_duration_since(t0),
        first_wave_bound: pve.lower_bound_for_creates_in(&even),
        all_started: all_started_at.saturating_duration_since(t0),
        all_started_limit: ideal_all_started(
            n,
            capacity,
            &o.pve,
            hold,
            pve.destroy_storage_lock_hold(),
            o.boot,
            job_duration,
        ),
        failed_clones: log
            .iter()
            .filter(|t| t.kind == "qmclone" && t.ended.is_some() && !t.ok)
            .count(),
        pve_calls: pve.request_count(),
        clones: log.iter().filter(|t| t.kind == "qmclone").count(),
        first_wave_destroys: log
            .iter()
            .filter(|t| t.kind == "qmdestroy" && t.created < first_wave_at)
            .count(),
        destroy_hold: pve.destroy_storage_lock_hold(),
        nodes,
        first_wave_per_node,
    };
    let summary = shutdown(system, vms).await?;
    Ok((burst, summary))
}

/// When the last of `n` jobs could start at the earliest on a pool of
/// `capacity`: an ideal dispatcher with no time of its own hands each job
/// to the slot free first; its clone waits for the slot and for the
/// storage lock, holds the lock `clone_hold`, then finishes; the VM starts
/// and boots; once its job ran and its VM stopped, the destroy waits for
/// the same lock, holds it `destroy_hold` (the volume's free), and the
/// slot is free when the destroy ends. The lock serves clones and destroys
/// in the order they ask. (For identical jobs this first-free order is
/// optimal.)
pub fn ideal_all_started(
    n: usize,
    capacity: usize,
    d: &TaskDurations,
    clone_hold: Duration,
    destroy_hold: Duration,
    boot: Duration,
    job: Duration,
) -> Duration {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Ask {
        Clone,
        Destroy,
    }
    // Lock requests by the time they are made (then by order of making).
    let mut asks = BinaryHeap::new();
    let mut made = 0u64;
    let first = n.min(capacity.max(1));
    for _ in 0..first {
        asks.push(Reverse((Duration::ZERO, made, Ask::Clone)));
        made += 1;
    }
    let mut waiting = n - first;
    let (mut lock_free, mut last) = (Duration::ZERO, Duration::ZERO);
    while let Some(Reverse((at, _, ask))) = asks.pop() {
        let acquired = at.max(lock_free);
        match ask {
            Ask::Clone => {
                lock_free = acquired + clone_hold;
                let started = acquired + d.linked_clone + d.start + boot;
                last = last.max(started);
                asks.push(Reverse((started + job + d.stop, made, Ask::Destroy)));
            }
            Ask::Destroy => {
                lock_free = acquired + destroy_hold;
                if waiting > 0 {
                    waiting -= 1;
                    asks.push(Reverse((acquired + d.destroy, made, Ask::Clone)));
                }
            }
        }
        made += 1;
    }
    last
}

/// Stops the phase's VMs, then its system.
async fn shutdown(system: Arc<System>, vms: Vms) -> anyhow::Result<BootSummary> {
    tracing::info!("phase measured; stopping its system");
    let summary = vms.stop().await;
    let system = Arc::into_inner(system).context("the system is still shared")?;
    system
        .shutdown()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(summary)
}

/// One simulated VM's boot, timed.
#[derive(Debug, Clone)]
struct Boot {
    vmid: u32,
    /// Its start task ended.
    running_at: Instant,
    /// Its boot began later than due by this (the harness's delay).
    lag: Duration,
    /// Fetching its cloud-init documents from the gateway.
    fetch: Duration,
    /// GitHub's registration call (`boot_runner`).
    registration: Duration,
    /// Its runner came online (and took a job, if one waited).
    online_at: Instant,
}

/// What the VMs of a phase left: boot failures and the worst lag.
#[derive(Debug, Default)]
struct BootSummary {
    failures: Vec<String>,
    max_lag: Duration,
}

impl BootSummary {
    fn add(&mut self, other: BootSummary) {
        self.failures.extend(other.failures);
        self.max_lag = self.max_lag.max(other.max_lag);
    }
}

#[derive(Debug, Default)]
struct VmsState {
    /// (vmid, name) of every VM a boot was started for (PVE reuses ids).
    seen: HashSet<(u32, String)>,
    booted: HashMap<String, Boot>,
    failures: Vec<String>,
}

/// The simulated VMs of a phase: each VM whose start task succeeded boots
/// exactly `boot` after that task ended, fetches its cloud-init documents
/// through the gateway and starts its runner on GitHub.
struct Vms {
    state: Arc<Mutex<VmsState>>,
    task: JoinHandle<()>,
}

impl Vms {
    fn start(system: &Arc<System>, boot: Duration) -> Self {
        let state = Arc::new(Mutex::new(VmsState::default()));
        let (system, st) = (system.clone(), state.clone());
        let task = tokio::spawn(async move {
            let pve = &system.pve;
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default();
            let mut booting = JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(_) = booting.join_next(), if !booting.is_empty() => continue,
                }
                for (vmid, running_at) in new_running(pve, &st) {
                    let Some(vm) = pve.vm(vmid) else { continue };
                    let (http, github, st) = (http.clone(), system.github.clone(), st.clone());
                    let smbios1 = vm.config.get("smbios1").cloned();
                    let name = vm.name().to_owned();
                    booting.spawn(async move {
                        let due = running_at + boot;
                        tokio::time::sleep_until(due.into()).await;
                        let r = boot_one(&http, &github, smbios1.as_deref(), vmid, running_at, due)
                            .await;
                        let mut s = st.lock().unwrap();
                        match r {
                            Ok(b) => {
                                s.booted.insert(name, b);
                            }
                            Err(e) => s.failures.push(format!("{name}: {e:#}")),
                        }
                    });
                }
            }
        });
        Self { state, task }
    }

    /// The boot of the VM named `name`, once its runner is online.
    fn record(&self, name: &str) -> Option<Boot> {
        self.state.lock().unwrap().booted.get(name).cloned()
    }

    /// Stops booting (and drops its handle on the system).
    async fn stop(self) -> BootSummary {
        self.task.abort();
        let _ = self.task.await;
        let s = self.state.lock().unwrap();
        BootSummary {
            failures: s.failures.clone(),
            max_lag: s.booted.values().map(|b| b.lag).max().unwrap_or_default(),
        }
    }
}

/// VMs whose start task succeeded since the last look, with when it ended.
fn new_running(pve: &PveSim, st: &Mutex<VmsState>) -> Vec<(u32, Instant)> {
    let running: Vec<(u32, String)> = {
        let seen = &st.lock().unwrap().seen;
        pve.vms()
            .into_iter()
            .map(|v| (v.vmid, v.name().to_owned(), v.running && !v.template))
            .filter(|(vmid, name, running)| *running && !seen.contains(&(*vmid, name.clone())))
            .map(|(vmid, name, _)| (vmid, name))
            .collect()
    };
    if running.is_empty() {
        return Vec::new();
    }
    let log = pve.task_log();
    let mut s = st.lock().unwrap();
    running
        .into_iter()
        .filter_map(|(vmid, name)| {
            // The latest start of this id: PVE reuses the ids of
            // destroyed VMs.
            let ended = log
                .iter()
                .filter(|t| t.vmid == vmid && t.kind == "qmstart" && t.ok)
                .filter_map(|t| t.ended)
                .max()?;
            s.seen.insert((vmid, name));
            Some((vmid, ended))
        })
        .collect()
}

async fn boot_one(
    http: &reqwest::Client,
    github: &GitHubSim,
    smbios1: Option<&str>,
    vmid: u32,
    running_at: Instant,
    due: Instant,
) -> anyhow::Result<Boot> {
    let fetch_start = Instant::now();
    let seed = smbios1
        .and_then(seed_url)
        .context("no NoCloud seed in the SMBIOS serial")?;
    let docs = fetch_documents(http, &seed).await?;
    let jit = grs_github::cloud_init::jit_config_from_user_data(&docs.user_data)
        .context("user-data has no JIT runner configuration")?;
    let registration_start = Instant::now();
    github
        .boot_runner(&jit)
        .await
        .map_err(|e| anyhow::anyhow!("the runner did not start: {e}"))?;
    let online_at = Instant::now();
    Ok(Boot {
        vmid,
        running_at,
        lag: fetch_start.saturating_duration_since(due),
        fetch: registration_start - fetch_start,
        registration: online_at - registration_start,
        online_at,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// p50 and p99 (and max) of `v`, in ms.
fn p50_p99(v: impl IntoIterator<Item = Duration>) -> String {
    let us: Vec<u64> = v.into_iter().map(|d| d.as_micros() as u64).collect();
    let [p50, _, p99, max] = percentiles(&us);
    let f = |x: u64| ms(Duration::from_micros(x));
    format!("{} / {} (max {})", f(p50), f(p99), f(max))
}

fn p99(v: impl IntoIterator<Item = Duration>) -> Duration {
    let us: Vec<u64> = v.into_iter().map(|d| d.as_micros() as u64).collect();
    Duration::from_micros(percentiles(&us)[2])
}

impl LatencyReport {
    /// The most PVE API calls any create+delete cycle took.
    pub fn max_calls_per_cycle(&self) -> u64 {
        self.cold.iter().map(|c| c.pve_calls).max().unwrap_or(0)
    }

    /// p99 of GRS's share of the cold path.
    pub fn share_p99(&self) -> Duration {
        p99(self.cold.iter().map(|c| c.grs_share))
    }

    /// p99 of completed → deleted beyond its tasks.
    pub fn delete_overhead_p99(&self) -> Duration {
        p99(self.cold.iter().map(ColdCycle::delete_overhead))
    }

    /// The targets of issues 10 and 12 this run missed (empty: all met).
    pub fn missed_targets(&self) -> Vec<String> {
        let mut missed = Vec::new();
        if self.share_p99() >= Duration::from_millis(100) {
            missed.push(format!(
                "GRS's share of the cold path p99 {} (target < 100 ms)",
                ms(self.share_p99())
            ));
        }
        if self.delete_overhead_p99() > Duration::from_millis(100) {
            missed.push(format!(
                "completed → deleted beyond its tasks p99 {} (target ≤ 100 ms)",
                ms(self.delete_overhead_p99())
            ));
        }
        if self.max_calls_per_cycle() > 15 {
            missed.push(format!(
                "{} PVE calls in a create+delete cycle (target ≤ 15)",
                self.max_calls_per_cycle()
            ));
        }
        if let Some(b) = &self.burst {
            let ratio = ratio(b.first_wave, b.first_wave_bound);
            if ratio > 1.1 {
                missed.push(format!(
                    "burst first wave {ratio:.2}x the lower bound (target ≤ 1.1x)"
                ));
            }
        }
        missed
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let o = &self.options;
        let mut s = String::new();
        let d = &o.pve;
        let _ = writeln!(
            s,
            "GRS latency benchmark: PVE tasks clone {} + start {}, stop {} + destroy {}; \
             VM boot {}; client delays ×{}\n",
            ms(d.linked_clone),
            ms(d.start),
            ms(d.stop),
            ms(d.destroy),
            ms(o.boot),
            o.client_time_scale
        );
        let _ = writeln!(s, "| measure | value | target |");
        let _ = writeln!(s, "|---|---|---|");
        let row = |s: &mut String, m: &str, v: String, t: &str| {
            let _ = writeln!(s, "| {m} | {v} | {t} |");
        };
        row(
            &mut s,
            &format!(
                "cold: queued → job started, p50 / p99 ({} jobs)",
                self.cold.len()
            ),
            p50_p99(self.cold.iter().map(|c| c.queued_to_started)),
            "—",
        );
        row(
            &mut s,
            "cold: queued → VM running, p50 / p99",
            p50_p99(self.cold.iter().map(|c| c.queued_to_vm_running)),
            "—",
        );
        row(
            &mut s,
            &format!(
                "warm (min_idle {}): queued → job started, p50 / p99 ({} jobs, {} on a warm runner)",
                o.min_idle,
                self.warm.len(),
                self.warm.iter().filter(|w| w.on_warm_runner).count()
            ),
            p50_p99(self.warm.iter().map(|w| w.queued_to_started)),
            "—",
        );
        row(
            &mut s,
            "GRS's share of queued → runner online (minus PVE tasks, boot, GitHub), p50 / p99",
            p50_p99(self.cold.iter().map(|c| c.grs_share)),
            "p99 < 100 ms",
        );
        row(
            &mut s,
            "  of which the cloud-init fetch through the gateway, p50 / p99",
            p50_p99(self.cold.iter().map(|c| c.cloud_init_fetch)),
            "—",
        );
        row(
            &mut s,
            "  of which queued → clone task created (webhook, pickup, GitHub check, placement), p50 / p99",
            p50_p99(self.cold.iter().map(|c| c.to_clone)),
            "—",
        );
        row(
            &mut s,
            "  of which between the create tasks (task polling, next call), p50 / p99",
            p50_p99(self.cold.iter().map(|c| c.between_tasks)),
            "—",
        );
        row(
            &mut s,
            "completed → VM deleted, p50 / p99",
            p50_p99(self.cold.iter().map(|c| c.completed_to_deleted)),
            "—",
        );
        row(
            &mut s,
            "completed → VM deleted minus stop + destroy tasks, p50 / p99",
            p50_p99(self.cold.iter().map(ColdCycle::delete_overhead)),
            "≤ 100 ms",
        );
        let calls: Vec<u64> = self.cold.iter().map(|c| c.pve_calls).collect();
        row(
            &mut s,
            "PVE API calls per create+delete cycle: first / mean / max",
            format!(
                "{} / {:.1} / {}",
                calls.first().copied().unwrap_or(0),
                calls.iter().sum::<u64>() as f64 / calls.len().max(1) as f64,
                self.max_calls_per_cycle()
            ),
            "≤ 15",
        );
        if let Some(b) = &self.burst {
            let destroys = match b.first_wave_destroys {
                0 => String::new(),
                n => format!(
                    "; {n} destroys held the storage lock meanwhile ({} in all)",
                    secs(b.destroy_hold * n as u32)
                ),
            };
            row(
                &mut s,
                &format!(
                    "burst {} jobs ({} each) on a pool of {}: first {} VMs running",
                    b.jobs,
                    secs(o.burst_job_duration),
                    b.capacity,
                    b.capacity
                ),
                format!(
                    "{} vs lower bound {} ({:.2}x); {} clones, {} failed; {:.1} calls per clone{destroys}",
                    secs(b.first_wave),
                    secs(b.first_wave_bound),
                    ratio(b.first_wave, b.first_wave_bound),
                    b.clones,
                    b.failed_clones,
                    b.pve_calls as f64 / b.clones.max(1) as f64
                ),
                "≤ 1.1x",
            );
        }
        if let Some(b) = &self.burst_all {
            row(
                &mut s,
                &format!(
                    "burst {} jobs ({} each) on a pool of {}: all started (limit: an ideal dispatcher)",
                    b.jobs,
                    secs(o.burst_job_duration),
                    b.capacity
                ),
                format!(
                    "{} vs limit {} ({:.2}x); {} clones, {} failed",
                    secs(b.all_started),
                    secs(b.all_started_limit),
                    ratio(b.all_started, b.all_started_limit),
                    b.clones,
                    b.failed_clones
                ),
                "—",
            );
        }
        if let Some(b) = &self.burst_replicas {
            let gain = self
                .burst
                .as_ref()
                .map(|one| {
                    format!(
                        "; {:.2}x sooner than on one node",
                        ratio(one.first_wave, b.first_wave)
                    )
                })
                .unwrap_or_default();
            let spread: Vec<String> = b
                .first_wave_per_node
                .iter()
                .map(|(node, n)| format!("{node} {n}"))
                .collect();
            row(
                &mut s,
                &format!(
                    "burst {} jobs on a pool of {} over {} nodes, a template copy on each (`template_replicas`): first {} VMs running",
                    b.jobs, b.capacity, b.nodes, b.capacity
                ),
                format!(
                    "{} vs lower bound {} ({:.2}x){gain}; per node {}; {} clones, {} failed",
                    secs(b.first_wave),
                    secs(b.first_wave_bound),
                    ratio(b.first_wave, b.first_wave_bound),
                    spread.join(", "),
                    b.clones,
                    b.failed_clones
                ),
                "—",
            );
        }
        if !self.startup_calls.is_empty() {
            let _ = writeln!(
                s,
                "\nPVE calls at start-up, before the first cold job (pool validation, the reconciler's first pass; in no cycle): {}",
                self.startup_calls
                    .iter()
                    .map(|(e, n)| format!("{n} {e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(worst) = self.cold.iter().max_by_key(|c| c.pve_calls) {
            let _ = writeln!(
                s,
                "\nPVE calls of the costliest cycle (job {}, {} calls):",
                worst.job_id, worst.pve_calls
            );
            for (endpoint, n) in &worst.pve_calls_by_endpoint {
                let _ = writeln!(s, "  {n:>3}  {endpoint}");
            }
        }
        let _ = writeln!(
            s,
            "\nharness: latest boot start {} after due; {} boot failures",
            ms(self.max_boot_lag),
            self.boot_failures.len()
        );
        for f in &self.boot_failures {
            let _ = writeln!(s, "  boot failure: {f}");
        }
        match self.missed_targets().as_slice() {
            [] => s.push_str("targets: all met\n"),
            missed => {
                for m in missed {
                    let _ = writeln!(s, "target MISSED: {m}");
                }
            }
        }
        s
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ideal_schedule_is_bound_by_the_lock_or_by_the_slots() {
        let d = TaskDurations::default();
        let hold = Duration::from_millis(250);
        let boot = Duration::from_secs(1);
        // One wave: the lock serializes the clones: the last acquires it
        // after 49 holds, then clones, starts and boots.
        let destroy_hold = Duration::from_millis(75);
        let job = Duration::from_secs(10);
        let one_wave = ideal_all_started(50, 50, &d, hold, destroy_hold, boot, job);
        assert_eq!(one_wave, hold * 49 + Duration::from_millis(2500));
        // One slot: each job waits for the previous one's whole cycle.
        let one_slot = ideal_all_started(3, 1, &d, hold, destroy_hold, boot, job);
        let cycle = Duration::from_millis(1000 + 500 + 1000 + 10_000 + 200 + 300);
        assert_eq!(one_slot, cycle * 2 + Duration::from_millis(2500));
    }

    #[test]
    fn a_destroy_holding_the_lock_delays_the_next_clone() {
        let d = TaskDurations::default();
        let (hold, boot, job) = (
            Duration::from_millis(250),
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        // Two slots, three jobs. A's clone gets the lock at 0, B's at
        // 0.25 s; A's destroy runs 12.7–13.0 s, so C asks for the lock at
        // 13.0 s. Destroys holding the lock for their whole 0.3 s: A's
        // holds it to 13.0 s, B's (asked at 12.95 s) then to 13.3 s, and
        // C's clone gets it only then.
        let free = ideal_all_started(3, 2, &d, hold, Duration::ZERO, boot, job);
        assert_eq!(free, Duration::from_millis(13_000 + 2500));
        let held = ideal_all_started(3, 2, &d, hold, d.destroy, boot, job);
        assert_eq!(held, Duration::from_millis(13_300 + 2500));
    }
}
