//! Lost webhooks and unrouted jobs: the part of the reconciler's pass that
//! asks GitHub what GRS was never told (DESIGN.md, job flow step 7).
//!
//! GitHub does not retry a failed delivery, and an incident on its side can
//! lose deliveries outright; either way a queued job would wait for a
//! runner until GitHub gives up on it (24 hours). [`Recovery::run_if_due`]
//! is called by the reconciler's leader after each pass and, every
//! `recovery_interval`, runs [`Recovery::run_once`]:
//! 1. **Unrouted jobs** recorded in the last [`REROUTE_MAX_AGE`] whose labels
//!    a pool now serves (a pool added since, by a restart with a new
//!    configuration) are submitted again as `queued`, routed to that pool.
//!    No GitHub call: the dispatcher's status check (with `[github]`) makes
//!    sure GitHub still has the job queued before a VM is spent.
//! 2. **Failed deliveries** (with `[github]` and a hook: `github.hook_id`,
//!    or the App's own): the hook's deliveries of the last
//!    `recovery_lookback` are listed, newest first; a `workflow_job`
//!    delivery whose every attempt failed is redelivered (the same guid,
//!    so the control plane de-duplicates it like any delivery). A guid is
//!    asked for at most once per [`REDELIVERY_REASK`].
//! 3. **Queued jobs never seen** (with `[github]`): the queued and
//!    in-progress workflow runs of the repository (`github.repository`;
//!    for an organisation, `recovery_repositories` and the repositories of
//!    recently recorded jobs) are listed, then their jobs; a queued job the
//!    store does not know and a pool serves is submitted as a `queued` event
//!    with the delivery id `grs-recovered:<job id>:queued`. It takes the
//!    normal path (routing, queue, status check, capacity): a later
//!    webhook for the same job is a stale event, a second scan a duplicate.
//! 4. **Lost completions** (with `[github]`; run before step 3, whose
//!    scan of many runs could otherwise spend the pass): a job in progress on a
//!    created instance of GRS's (the instance's `assigned_job_id`), or
//!    bound to one whose runner has not taken it (its `job_id`), that has
//!    not changed for `recovery_running_age` is asked about
//!    (`GET /repos/{owner}/{repo}/actions/jobs/{job_id}`), oldest first, at
//!    most once per `recovery_running_age` each. What GitHub reports is
//!    submitted through the same path as a webhook (the event
//!    [`status_event`] builds, delivery id `grs-status:<job>:<status>`):
//!    `completed` tears down the runner that ran the job, wherever it was
//!    made, exactly as the lost delivery would have; `in_progress` of a
//!    job GRS has as provisioned records its runner. Without this a lost
//!    `completed` kept its runner's VM until `max_lifetime`. A job in
//!    progress on a runner GRS did not make (a static runner with the
//!    pool's labels took it) is asked about the same way: no instance
//!    tells of it, and without the check it stayed in progress for good.
//!
//! # Guarantees
//! - **Within the budget, honouring rate limits.** Every GitHub call of a
//!   pass is taken from the [`ApiBudget`](crate::github::ApiBudget) it
//!   shares with the status checks, and no call is made while GitHub's
//!   primary limit is low ([`GitHubJobs::may_call`]); the client itself
//!   waits out 403/429 answers (`retry-after`, `x-ratelimit-reset`) or gives
//!   up on a long wait. A pass that runs out stops where it is; the next
//!   one starts over.
//! - **Nothing new is invented.** A recovered job is recorded only from
//!   what GitHub reports (its id, run, labels, repository); a redelivery is
//!   GitHub's own payload.
//! - **Bounded latency.** A queued job whose every delivery was lost is
//!   recorded at the first pass after it was queued: within
//!   `recovery_interval` (rounded up to the reconciler's interval) plus one
//!   scan. A job whose `completed` was lost is recorded completed within
//!   `recovery_running_age` after its last recorded change (its
//!   `in_progress`) plus that interval, or, when it ran longer, within
//!   `recovery_running_age` plus the interval after it completed. README
//!   gives the measured numbers.
//! - **Leader only.** Passes run on the reconciler's lease holder, which
//!   keeps renewing the lease while they run; every event submitted and
//!   every redelivery asked for first checks the reconciler's
//!   [`Fence`], so a replica that lost the lease stops before its next
//!   change. A new leader starts with nothing asked (it may ask about a job
//!   once more).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use grs_github::Scope;

use crate::config::ControlPlaneConfig;
use crate::github::{GitHubJobs, status_event};
use crate::model::{Job, JobAction, JobEvent, JobState, Millis, instance_is_created, now_ms};
use crate::pools::Pools;
use crate::reconciler::{Fence, LeaseLost, PassError};
use crate::store::{Store, StoreResult};

/// Unrouted jobs older than this are not rerouted: GitHub cancels a job no
/// runner took within 24 hours.
pub const REROUTE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A guid whose redelivery was asked for is not asked for again sooner.
pub const REDELIVERY_REASK: Duration = Duration::from_secs(10 * 60);

/// Most unrouted jobs looked at per pass.
const REROUTE_MAX_JOBS: usize = 1000;
/// Most pages of hook deliveries read per pass.
const DELIVERY_MAX_PAGES: usize = 10;
/// Recently recorded jobs whose repositories an organisation's scan covers.
const RECENT_JOBS: usize = 200;

/// Recovery settings, from `[control_plane]`.
#[derive(Debug, Clone)]
pub struct RecoverySettings {
    /// Time between two recovery passes.
    pub interval: Duration,
    /// Failed deliveries older than this are left alone.
    pub lookback: Duration,
    /// Repositories an organisation's scan covers besides recent ones.
    pub repositories: Vec<String>,
    /// Jobs running (or bound to a created instance) this long unchanged
    /// are asked about with GitHub, each at most once per this long.
    pub running_age: Duration,
}

impl RecoverySettings {
    /// From the configuration.
    pub fn from_config(c: &ControlPlaneConfig) -> Self {
        Self {
            interval: c.recovery_interval,
            lookback: c.recovery_lookback,
            repositories: c.recovery_repositories.clone(),
            running_age: c.recovery_running_age,
        }
    }
}

/// What one recovery pass did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Unrouted jobs submitted again to a pool that now serves them.
    pub rerouted: Vec<u64>,
    /// Delivery guids GitHub was asked to redeliver.
    pub redelivery_requested: Vec<String>,
    /// Queued jobs GRS never saw, submitted as `queued`.
    pub submitted: Vec<u64>,
    /// Jobs GitHub says completed whose `completed` GRS never got,
    /// recorded completed.
    pub completed: Vec<u64>,
    /// Jobs GRS had as provisioned that GitHub says a runner took (their
    /// `in_progress` lost), recorded in progress.
    pub started: Vec<u64>,
    /// Why GitHub was not (fully) asked, if it was not.
    pub skipped: Option<String>,
    /// GitHub failures the pass went past (the next pass retries).
    pub failures: Vec<String>,
}

impl RecoveryReport {
    /// Whether the pass found nothing and nothing failed.
    pub fn is_quiet(&self) -> bool {
        *self == Self::default()
    }
}

/// The leader's recovery state: when it last ran, and which redeliveries
/// it asked for.
#[derive(Debug)]
pub struct Recovery {
    store: Arc<dyn Store>,
    pools: Pools,
    github: Option<GitHubJobs>,
    settings: RecoverySettings,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    last_run: Option<tokio::time::Instant>,
    asked: HashMap<String, tokio::time::Instant>,
    /// Job id → when its status was last asked for (step 4).
    status_asked: HashMap<u64, Millis>,
    /// The reconciler's fence, checked before every change.
    fence: Fence,
}

/// Why a pass stopped asking GitHub.
struct OutOfBudget(&'static str);

impl Recovery {
    /// Recovery over `store` and `pools`; GitHub through `github` (`None`:
    /// only unrouted jobs are rerouted).
    pub fn new(
        store: Arc<dyn Store>,
        pools: Pools,
        github: Option<GitHubJobs>,
        settings: RecoverySettings,
    ) -> Self {
        Self {
            store,
            pools,
            github,
            settings,
            metrics: None,
            last_run: None,
            asked: HashMap::new(),
            status_asked: HashMap::new(),
            fence: Fence::default(),
        }
    }

    /// Counts what passes do in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Checks `fence` before every change (the reconciler's, set by
    /// [`Reconciler::with_recovery`](crate::reconciler::Reconciler::with_recovery)).
    pub(crate) fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Runs a pass if none ran in the last `interval` (the first call always
    /// runs one: a new leader looks at once). Store errors are logged; a
    /// lost lease is returned.
    pub async fn run_if_due(&mut self) -> Result<Option<RecoveryReport>, LeaseLost> {
        if self
            .last_run
            .is_some_and(|t| t.elapsed() < self.settings.interval)
        {
            return Ok(None);
        }
        self.last_run = Some(tokio::time::Instant::now());
        match self.run_once(now_ms()).await {
            Ok(report) => {
                if report.is_quiet() {
                    tracing::debug!("recovery pass: nothing lost");
                } else {
                    tracing::info!(?report, "recovery pass done");
                }
                Ok(Some(report))
            }
            Err(PassError::LeaseLost(lost)) => Err(lost),
            Err(e) => {
                tracing::warn!(error = %e, "recovery pass failed; retrying next interval");
                Ok(None)
            }
        }
    }

    /// Forgets the redeliveries and job statuses asked for (on losing
    /// leadership).
    pub fn forget(&mut self) {
        self.asked.clear();
        self.status_asked.clear();
        self.last_run = None;
    }

    /// One pass at `now` (see the module docs). Store errors and a lost
    /// lease end it.
    pub async fn run_once(&mut self, now: Millis) -> Result<RecoveryReport, PassError> {
        let mut report = RecoveryReport::default();
        self.reroute_unrouted(now, &mut report).await?;
        if let Some(gh) = self.github.clone() {
            // Lost completions before the scan: their checks are bounded
            // (one per running job per age) and each frees a VM, while the
            // scan may spend the whole pass on many runs.
            let mut out = match self.redeliver_failed(&gh, &mut report).await? {
                Ok(()) => self.check_running(&gh, now, &mut report).await?,
                Err(o) => Err(o),
            };
            if out.is_ok() {
                out = self.scan_queued(&gh, now, &mut report).await?;
            }
            if let Err(OutOfBudget(why)) = out {
                tracing::info!(why, "recovery pass stopped asking GitHub");
                report.skipped = Some(why.to_owned());
            }
        }
        if let Some(m) = &self.metrics {
            m.github_recovered("rerouted", report.rerouted.len());
            m.github_recovered("redelivery_requested", report.redelivery_requested.len());
            m.github_recovered("job_submitted", report.submitted.len());
            m.github_recovered("completed_recorded", report.completed.len());
            m.github_recovered("started_recorded", report.started.len());
            m.github_recovered("skipped_pass", usize::from(report.skipped.is_some()));
        }
        Ok(report)
    }

    /// Step 1: unrouted jobs a pool now serves go to it.
    async fn reroute_unrouted(
        &self,
        now: Millis,
        report: &mut RecoveryReport,
    ) -> Result<(), PassError> {
        let oldest = now.saturating_sub(millis(REROUTE_MAX_AGE));
        let mut cursor = 0;
        let mut seen = 0;
        loop {
            let (page, next) = self
                .store
                .list_jobs(None, Some(JobState::Unrouted), cursor, 200)
                .await?;
            seen += page.len();
            for job in page.iter().filter(|j| j.recorded_at >= oldest) {
                let Some(pool) = self.pools.route(&job.labels) else {
                    continue;
                };
                let ev = job_event(
                    job,
                    format!("grs-reroute:{}:{}", job.job_id, pool.name),
                    JobAction::Queued,
                );
                let r = self.submit(&ev, Some(&pool.name), now).await?;
                if r.job.as_ref().is_some_and(|j| j.state == JobState::Queued) {
                    tracing::info!(job_id = job.job_id, pool = %pool.name, "an unrouted job's labels are now served; queued");
                    report.rerouted.push(job.job_id);
                }
            }
            // Newest first: once a page ends before the cut-off, so does
            // everything after it.
            let older = page.last().is_none_or(|j| j.recorded_at < oldest);
            match next {
                Some(n) if !older && seen < REROUTE_MAX_JOBS => cursor = n,
                _ => return Ok(()),
            }
        }
    }

    /// Step 2: failed `workflow_job` deliveries are redelivered.
    async fn redeliver_failed(
        &mut self,
        gh: &GitHubJobs,
        report: &mut RecoveryReport,
    ) -> Result<Result<(), OutOfBudget>, LeaseLost> {
        let Some(hook) = gh.client().hook().cloned() else {
            return Ok(Ok(()));
        };
        let now = tokio::time::Instant::now();
        // A guid asked for longer ago whose attempts all failed since (the
        // receiver was still down) is asked for again.
        self.asked
            .retain(|_, at| now.duration_since(*at) < REDELIVERY_REASK);
        let since = SystemTime::now() - self.settings.lookback;
        // guid → the newest attempt id, for guids with no successful attempt.
        let mut failed: HashMap<String, u64> = HashMap::new();
        let mut succeeded: HashSet<String> = HashSet::new();
        let mut cursor: Option<String> = None;
        for _ in 0..DELIVERY_MAX_PAGES {
            if let Err(o) = gh.may_call() {
                return Ok(Err(OutOfBudget(o)));
            }
            let (page, next) = match gh
                .client()
                .list_deliveries(&hook, false, 100, cursor.as_deref())
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the webhook's deliveries");
                    report.failures.push(format!("listing deliveries: {e}"));
                    return Ok(Ok(()));
                }
            };
            let mut done = next.is_none();
            for d in page {
                if d.delivered_at().is_some_and(|t| t < since) {
                    done = true;
                    break;
                }
                if d.event != "workflow_job" {
                    continue;
                }
                if d.succeeded() {
                    succeeded.insert(d.guid);
                } else {
                    // Newest first: the first attempt seen is the newest.
                    failed.entry(d.guid).or_insert(d.id);
                }
            }
            if done {
                break;
            }
            cursor = next;
        }
        let mut todo: Vec<(String, u64)> = failed
            .into_iter()
            .filter(|(guid, _)| !succeeded.contains(guid) && !self.asked.contains_key(guid))
            .collect();
        // Oldest first: events of a job in the order GitHub sent them.
        todo.sort_by_key(|(_, id)| *id);
        for (guid, id) in todo {
            if let Err(o) = gh.may_call() {
                return Ok(Err(OutOfBudget(o)));
            }
            self.fence.check()?;
            match gh.client().redeliver(&hook, id).await {
                Ok(()) => {
                    tracing::info!(delivery = %guid, "asked GitHub to redeliver a failed workflow_job delivery");
                    self.asked.insert(guid.clone(), tokio::time::Instant::now());
                    report.redelivery_requested.push(guid);
                }
                Err(e) => {
                    tracing::warn!(delivery = %guid, error = %e, "cannot ask for a redelivery");
                    report.failures.push(format!("redelivering {guid}: {e}"));
                }
            }
        }
        Ok(Ok(()))
    }

    /// Step 3: queued jobs of the scanned repositories the store does not
    /// know are submitted.
    async fn scan_queued(
        &self,
        gh: &GitHubJobs,
        now: Millis,
        report: &mut RecoveryReport,
    ) -> Result<Result<(), OutOfBudget>, PassError> {
        let (repos, organization) = self.repositories(gh).await?;
        for repo in repos {
            let mut runs = BTreeSet::new();
            for status in ["queued", "in_progress"] {
                if let Err(o) = gh.may_call() {
                    return Ok(Err(OutOfBudget(o)));
                }
                match gh.client().list_workflow_runs(&repo, status, 100).await {
                    Ok(found) => runs.extend(found.into_iter().map(|r| r.id)),
                    Err(e) => {
                        tracing::warn!(repository = %repo, error = %e, "cannot list workflow runs");
                        report.failures.push(format!("listing runs of {repo}: {e}"));
                    }
                }
            }
            for run_id in runs {
                if let Err(o) = gh.may_call() {
                    return Ok(Err(OutOfBudget(o)));
                }
                let jobs = match gh.client().list_run_jobs(&repo, run_id).await {
                    Ok(j) => j,
                    Err(e) => {
                        report
                            .failures
                            .push(format!("listing jobs of {repo} run {run_id}: {e}"));
                        continue;
                    }
                };
                for j in jobs.into_iter().filter(|j| j.status == "queued") {
                    let Some(pool) = self.pools.route(&j.labels) else {
                        continue;
                    };
                    if self.store.get_job(j.id).await?.is_some() {
                        continue;
                    }
                    let ev = JobEvent {
                        delivery_id: format!("grs-recovered:{}:queued", j.id),
                        action: JobAction::Queued,
                        job_id: j.id,
                        run_id: if j.run_id == 0 { run_id } else { j.run_id },
                        run_attempt: 0,
                        labels: j.labels.clone(),
                        runner_id: 0,
                        runner_name: String::new(),
                        repository: repo.clone(),
                        organization: organization.clone(),
                        installation_id: 0,
                        conclusion: String::new(),
                        job_name: j.name.clone(),
                        workflow_name: String::new(),
                    };
                    let r = self.submit(&ev, Some(&pool.name), now).await?;
                    if r.outcome == crate::model::SubmitOutcome::Accepted {
                        tracing::warn!(job_id = j.id, repository = %repo, pool = %pool.name,
                            "found a queued job GitHub never told GRS about (lost webhook); queued");
                        report.submitted.push(j.id);
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    /// Step 4: jobs running (or bound) on created instances, or in
    /// progress on runners GRS did not make, unchanged for `running_age`
    /// are asked about; what GitHub says they did is submitted as the lost
    /// webhook would have been.
    async fn check_running(
        &mut self,
        gh: &GitHubJobs,
        now: Millis,
        report: &mut RecoveryReport,
    ) -> Result<Result<(), OutOfBudget>, PassError> {
        let age = millis(self.settings.running_age);
        // The job each created instance serves: the one its runner took,
        // else the one bound to it. A job on another job's runner is found
        // through that runner's instance; a job on a runner GRS did not
        // make, through the jobs in progress (below).
        let mut ids: BTreeSet<u64> = self
            .store
            .list_instances(None, false)
            .await?
            .iter()
            .filter(|i| instance_is_created(i.state))
            .map(|i| {
                if i.assigned_job_id != 0 {
                    i.assigned_job_id
                } else {
                    i.job_id
                }
            })
            .filter(|&id| id != 0)
            .collect();
        // Jobs in progress come whole from the listing; only the others
        // (bound to an instance, not started) are read one by one.
        let mut listed: HashMap<u64, Job> = HashMap::new();
        let mut cursor = 0;
        loop {
            let (page, next) = self
                .store
                .list_jobs(None, Some(JobState::InProgress), cursor, 500)
                .await?;
            listed.extend(page.into_iter().map(|j| (j.job_id, j)));
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
        ids.extend(listed.keys().copied());
        self.status_asked.retain(|id, _| ids.contains(id));
        let mut due = Vec::new();
        for &id in &ids {
            let job = match listed.remove(&id) {
                Some(job) => job,
                None => match self.store.get_job(id).await? {
                    Some(job) => job,
                    None => continue,
                },
            };
            let unchanged_long = now.saturating_sub(job.updated_at) >= age;
            let asked_lately = self
                .status_asked
                .get(&id)
                .is_some_and(|&t| now.saturating_sub(t) < age);
            if matches!(job.state, JobState::InProgress | JobState::Provisioned)
                && !job.repository.is_empty()
                && unchanged_long
                && !asked_lately
            {
                due.push(job);
            }
        }
        due.sort_by_key(|j| (j.updated_at, j.job_id));
        for job in due {
            if let Err(o) = gh.may_call() {
                return Ok(Err(OutOfBudget(o)));
            }
            self.status_asked.insert(job.job_id, now);
            let seen = match gh.client().get_job(&job.repository, job.job_id).await {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(job_id = job.job_id, error = %e, "cannot ask GitHub about a running job");
                    report
                        .failures
                        .push(format!("asking about job {}: {e}", job.job_id));
                    continue;
                }
            };
            let Some(ev) = status_event(&job, &seen) else {
                continue;
            };
            let list = match ev.action {
                JobAction::Completed => &mut report.completed,
                JobAction::InProgress if job.state == JobState::Provisioned => &mut report.started,
                _ => continue,
            };
            let pool = (!job.pool.is_empty()).then_some(job.pool.as_str());
            let r = self.submit(&ev, pool, now).await?;
            if r.outcome == crate::model::SubmitOutcome::Accepted {
                tracing::warn!(
                    job_id = job.job_id,
                    status = %seen.status,
                    runner = %ev.runner_name,
                    was = %job.state,
                    "GitHub reports what GRS was never told of a running job (lost webhook); recorded"
                );
                list.push(job.job_id);
            }
        }
        Ok(Ok(()))
    }

    /// Submits `ev` (to `pool`) at `now` if this replica still holds the
    /// lease.
    async fn submit(
        &self,
        ev: &JobEvent,
        pool: Option<&str>,
        now: Millis,
    ) -> Result<crate::store::SubmitResult, PassError> {
        self.fence.check()?;
        Ok(self.store.submit_event(ev, pool, now).await?)
    }

    /// The repositories to scan, and the organisation recorded on jobs
    /// found there ("" for a repository scope).
    async fn repositories(&self, gh: &GitHubJobs) -> StoreResult<(Vec<String>, String)> {
        Ok(match gh.client().scope() {
            Scope::Repository { owner, name } => (vec![format!("{owner}/{name}")], String::new()),
            Scope::Organization(org) => {
                let mut repos: BTreeSet<String> =
                    self.settings.repositories.iter().cloned().collect();
                let (recent, _) = self.store.list_jobs(None, None, 0, RECENT_JOBS).await?;
                let prefix = format!("{}/", org.to_ascii_lowercase());
                repos.extend(
                    recent
                        .into_iter()
                        .map(|j| j.repository)
                        .filter(|r| r.to_ascii_lowercase().starts_with(&prefix)),
                );
                (repos.into_iter().collect(), org.clone())
            }
        })
    }
}

/// A job event about recorded `job`, GRS's own (`delivery_id`).
fn job_event(job: &Job, delivery_id: String, action: JobAction) -> JobEvent {
    JobEvent {
        delivery_id,
        action,
        job_id: job.job_id,
        run_id: job.run_id,
        run_attempt: job.run_attempt,
        labels: job.labels.clone(),
        runner_id: 0,
        runner_name: String::new(),
        repository: job.repository.clone(),
        organization: job.organization.clone(),
        installation_id: job.installation_id,
        conclusion: String::new(),
        job_name: job.job_name.clone(),
        workflow_name: job.workflow_name.clone(),
    }
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}
