//! What the demo saw happen, from outside GRS: when each job was queued on
//! GitHub, started and completed, and when each VM appeared on Proxmox,
//! started and went away. From that: the live counts of the progress
//! display and the latency percentiles of the summary.
//!
//! Everything here is observed on the simulators (the "world"), not asked
//! of GRS, so the numbers are what a user of GitHub and an operator of
//! Proxmox would see.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use grs_github::sim::SimJobStatus;
use serde::Serialize;

/// A job as one look at GitHub showed it.
#[derive(Debug, Clone)]
pub struct JobSeen {
    /// `workflow_job.id`.
    pub id: u64,
    /// Its status.
    pub status: SimJobStatus,
    /// The runner that took it, if one did.
    pub runner_name: Option<String>,
}

/// A VM (not a template) as one look at Proxmox showed it.
#[derive(Debug, Clone)]
pub struct VmSeen {
    /// Its name (GRS names it `<prefix>-<job id>`).
    pub name: String,
    /// Whether it runs.
    pub running: bool,
}

/// One job, as GitHub shows it.
#[derive(Debug, Clone, Default)]
struct JobTimes {
    queued: Option<Instant>,
    started: Option<Instant>,
    completed: Option<Instant>,
    status: Option<SimJobStatus>,
    runner_name: Option<String>,
}

/// One VM, as Proxmox shows it.
#[derive(Debug, Clone)]
struct VmTimes {
    running: Option<Instant>,
    gone: Option<Instant>,
}

/// Jobs by where they are, each job counted once. A job whose VM is made
/// but whose runner has not taken it yet is `cloning` or `booting` by its
/// own VM's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Queued on GitHub, no VM for it yet.
    pub queued: usize,
    /// Its VM exists but is not running yet (clone, configure, start).
    pub cloning: usize,
    /// Its VM runs; no runner has taken the job yet.
    pub booting: usize,
    /// A runner runs it.
    pub running: usize,
    /// Completed; the VM that ran it still exists.
    pub deleting: usize,
    /// Completed and the VM that ran it is gone.
    pub done: usize,
}

/// p50, p90 and max of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageLatency {
    /// The stage, e.g. `queued → VM running`.
    pub stage: &'static str,
    /// How many jobs were measured.
    pub count: usize,
    /// Median, milliseconds.
    pub p50_ms: u64,
    /// 90th percentile, milliseconds.
    pub p90_ms: u64,
    /// Largest, milliseconds.
    pub max_ms: u64,
}

/// The stages of the summary, in order.
pub const STAGES: [&str; 3] = [
    "queued → VM running",
    "queued → job started",
    "completed → VM deleted",
];

/// The demo's record of the world.
#[derive(Debug)]
pub struct Tracker {
    prefix: String,
    jobs: BTreeMap<u64, JobTimes>,
    vms: HashMap<String, VmTimes>,
}

impl Tracker {
    /// A tracker for VMs named `<prefix>-<job id>`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            jobs: BTreeMap::new(),
            vms: HashMap::new(),
        }
    }

    /// Job `id` was queued at `at` (the moment before GitHub was asked).
    pub fn queued(&mut self, id: u64, at: Instant) {
        self.jobs.entry(id).or_default().queued = Some(at);
    }

    /// Takes in one look at GitHub's jobs and Proxmox's VMs, made at `now`.
    /// Idempotent for an unchanged world. Returns the names of the VMs seen
    /// running for the first time.
    pub fn observe(&mut self, now: Instant, jobs: &[JobSeen], vms: &[VmSeen]) -> Vec<String> {
        for j in jobs {
            let t = self.jobs.entry(j.id).or_default();
            if t.status != Some(j.status) {
                match j.status {
                    SimJobStatus::Queued => {}
                    SimJobStatus::InProgress => {
                        t.started.get_or_insert(now);
                    }
                    SimJobStatus::Completed => {
                        // A job completed between two looks started then too.
                        t.started.get_or_insert(now);
                        t.completed.get_or_insert(now);
                    }
                }
                t.status = Some(j.status);
            }
            if t.runner_name.is_none() {
                t.runner_name.clone_from(&j.runner_name);
            }
        }
        let mut started = Vec::new();
        let mut present = std::collections::HashSet::with_capacity(vms.len());
        for vm in vms {
            let name = vm.name.clone();
            let t = self.vms.entry(name.clone()).or_insert(VmTimes {
                running: None,
                gone: None,
            });
            if vm.running && t.running.is_none() {
                t.running = Some(now);
                started.push(name.clone());
            }
            present.insert(name);
        }
        for (name, t) in &mut self.vms {
            if t.gone.is_none() && !present.contains(name) {
                t.gone = Some(now);
            }
        }
        started
    }

    /// The live counts.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for (id, j) in &self.jobs {
            match j.status {
                None | Some(SimJobStatus::Queued) => {
                    match self.vms.get(&format!("{}-{id}", self.prefix)) {
                        Some(v) if v.gone.is_none() && v.running.is_some() => c.booting += 1,
                        Some(v) if v.gone.is_none() => c.cloning += 1,
                        _ => c.queued += 1,
                    }
                }
                Some(SimJobStatus::InProgress) => c.running += 1,
                Some(SimJobStatus::Completed) => {
                    let vm_left = j
                        .runner_name
                        .as_ref()
                        .and_then(|r| self.vms.get(r))
                        .is_some_and(|v| v.gone.is_none());
                    if vm_left {
                        c.deleting += 1;
                    } else {
                        c.done += 1;
                    }
                }
            }
        }
        c
    }

    /// Jobs completed on GitHub.
    pub fn completed(&self) -> usize {
        self.jobs.values().filter(|j| j.completed.is_some()).count()
    }

    /// VMs seen that are not gone.
    pub fn vms_alive(&self) -> usize {
        self.vms.values().filter(|v| v.gone.is_none()).count()
    }

    /// p50/p90/max of each of [`STAGES`], over the jobs that reached it.
    pub fn latencies(&self) -> Vec<StageLatency> {
        let mut to_vm = Vec::new();
        let mut to_start = Vec::new();
        let mut to_delete = Vec::new();
        for (id, j) in &self.jobs {
            let Some(queued) = j.queued else { continue };
            if let Some(running) = self
                .vms
                .get(&format!("{}-{id}", self.prefix))
                .and_then(|v| v.running)
            {
                to_vm.push(running.saturating_duration_since(queued));
            }
            if let Some(started) = j.started {
                to_start.push(started.saturating_duration_since(queued));
            }
            if let (Some(done), Some(gone)) = (
                j.completed,
                j.runner_name
                    .as_ref()
                    .and_then(|r| self.vms.get(r))
                    .and_then(|v| v.gone),
            ) {
                to_delete.push(gone.saturating_duration_since(done));
            }
        }
        [to_vm, to_start, to_delete]
            .into_iter()
            .zip(STAGES)
            .map(|(samples, stage)| StageLatency::of(stage, samples))
            .collect()
    }
}

impl StageLatency {
    /// Nearest-rank percentiles of `samples` (all zero when empty).
    fn of(stage: &'static str, mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let rank = |p: f64| -> u64 {
            if samples.is_empty() {
                return 0;
            }
            let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_millis() as u64
        };
        Self {
            stage,
            count: samples.len(),
            p50_ms: rank(0.5),
            p90_ms: rank(0.9),
            max_ms: samples.last().map_or(0, |d| d.as_millis() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, status: SimJobStatus, runner: Option<&str>) -> JobSeen {
        JobSeen {
            id,
            status,
            runner_name: runner.map(str::to_owned),
        }
    }

    fn vm(name: &str, running: bool) -> VmSeen {
        VmSeen {
            name: name.into(),
            running,
        }
    }

    #[test]
    fn a_job_moves_through_every_bucket_and_its_latencies_are_measured() {
        let mut t = Tracker::new("grs");
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        t.queued(7, t0);
        t.observe(at(0), &[job(7, SimJobStatus::Queued, None)], &[]);
        assert_eq!(t.counts().queued, 1);
        t.observe(
            at(10),
            &[job(7, SimJobStatus::Queued, None)],
            &[vm("grs-7", false)],
        );
        assert_eq!(t.counts().cloning, 1);
        let started = t.observe(
            at(100),
            &[job(7, SimJobStatus::Queued, None)],
            &[vm("grs-7", true)],
        );
        assert_eq!(started.len(), 1, "first seen running");
        assert_eq!(t.counts().booting, 1);
        let again = t.observe(
            at(110),
            &[job(7, SimJobStatus::Queued, None)],
            &[vm("grs-7", true)],
        );
        assert!(again.is_empty(), "a VM starts once");
        t.observe(
            at(300),
            &[job(7, SimJobStatus::InProgress, Some("grs-7"))],
            &[vm("grs-7", true)],
        );
        assert_eq!(t.counts().running, 1);
        t.observe(
            at(1000),
            &[job(7, SimJobStatus::Completed, Some("grs-7"))],
            &[vm("grs-7", true)],
        );
        assert_eq!(t.counts().deleting, 1);
        assert_eq!(t.vms_alive(), 1);
        t.observe(
            at(1250),
            &[job(7, SimJobStatus::Completed, Some("grs-7"))],
            &[],
        );
        assert_eq!(
            t.counts(),
            Counts {
                done: 1,
                ..Counts::default()
            }
        );
        assert_eq!(t.completed(), 1);
        assert_eq!(t.vms_alive(), 0);
        let l = t.latencies();
        assert_eq!((l[0].count, l[0].p50_ms), (1, 100));
        assert_eq!((l[1].count, l[1].p50_ms), (1, 300));
        assert_eq!((l[2].count, l[2].max_ms), (1, 250));
    }

    #[test]
    fn a_job_run_by_another_jobs_vm_is_deleted_with_that_vm() {
        let mut t = Tracker::new("grs");
        let t0 = Instant::now();
        t.queued(1, t0);
        t.queued(2, t0);
        // Job 2 ran on the VM made for job 1; job 1 still waits.
        t.observe(
            t0,
            &[
                job(1, SimJobStatus::Queued, None),
                job(2, SimJobStatus::Completed, Some("grs-1")),
            ],
            &[vm("grs-1", true), vm("grs-2", true)],
        );
        let c = t.counts();
        assert_eq!((c.booting, c.deleting), (1, 1), "{c:?}");
        t.observe(
            t0 + Duration::from_millis(40),
            &[
                job(1, SimJobStatus::Queued, None),
                job(2, SimJobStatus::Completed, Some("grs-1")),
            ],
            &[vm("grs-2", true)],
        );
        let c = t.counts();
        assert_eq!((c.queued, c.done), (1, 1), "job 1's VM is gone: {c:?}");
        assert_eq!(t.latencies()[2].max_ms, 40);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples = (1..=10).map(Duration::from_millis).collect();
        let s = StageLatency::of("x", samples);
        assert_eq!((s.p50_ms, s.p90_ms, s.max_ms, s.count), (5, 9, 10, 10));
        let empty = StageLatency::of("x", vec![]);
        assert_eq!((empty.p50_ms, empty.max_ms, empty.count), (0, 0, 0));
    }
}
