//! The control plane's records: jobs, instances, pools, events, and the rule
//! by which a GitHub event moves a job forward ([`apply_event`]).
//!
//! [`apply_event`] is the only copy of that rule: both stores decide through
//! [`store::rules`](crate::store::rules), which calls it, and apply the
//! changes it returns (the Redis store's Lua only writes them). The reasons
//! recorded on jobs and instances are in [`reason`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use grs_provisioner::InstanceState;

/// Milliseconds since the Unix epoch: how the stores keep time.
pub type Millis = i64;

/// Now, in [`Millis`].
pub fn now_ms() -> Millis {
    to_ms(SystemTime::now())
}

/// A time in [`Millis`] (0 for times before the epoch).
pub fn to_ms(t: SystemTime) -> Millis {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A [`Millis`] as a protobuf timestamp; `None` for 0 (unknown).
pub fn to_timestamp(ms: Millis) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// Where a job is in its life (same names as `grs.v1.JobState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting on deployment protection.
    Waiting,
    /// In its pool's provision queue.
    Queued,
    /// No pool serves its labels.
    Unrouted,
    /// A dispatcher is creating its instance.
    Provisioning,
    /// Its instance exists; waiting for a runner to take it.
    Provisioned,
    /// A runner runs it.
    InProgress,
    /// GitHub says it ended.
    Completed,
    /// Provisioning failed for good.
    Failed,
}

impl JobState {
    /// The snake_case name used in Redis, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Queued => "queued",
            Self::Unrouted => "unrouted",
            Self::Provisioning => "provisioning",
            Self::Provisioned => "provisioned",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => Self::Waiting,
            "queued" => Self::Queued,
            "unrouted" => Self::Unrouted,
            "provisioning" => Self::Provisioning,
            "provisioned" => Self::Provisioned,
            "in_progress" => Self::InProgress,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// No event moves a job out of a terminal state (but `completed` moves a
    /// failed job to completed, to record GitHub's conclusion).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// The proto enum value.
    pub fn to_proto(self) -> grs_proto::v1::JobState {
        use grs_proto::v1::JobState as P;
        match self {
            Self::Waiting => P::Waiting,
            Self::Queued => P::Queued,
            Self::Unrouted => P::Unrouted,
            Self::Provisioning => P::Provisioning,
            Self::Provisioned => P::Provisioned,
            Self::InProgress => P::InProgress,
            Self::Completed => P::Completed,
            Self::Failed => P::Failed,
        }
    }

    /// From the proto enum; `None` for UNSPECIFIED.
    pub fn from_proto(p: grs_proto::v1::JobState) -> Option<Self> {
        use grs_proto::v1::JobState as P;
        Some(match p {
            P::Unspecified => return None,
            P::Waiting => Self::Waiting,
            P::Queued => Self::Queued,
            P::Unrouted => Self::Unrouted,
            P::Provisioning => Self::Provisioning,
            P::Provisioned => Self::Provisioned,
            P::InProgress => Self::InProgress,
            P::Completed => Self::Completed,
            P::Failed => Self::Failed,
        })
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The proto enum value of an instance state.
pub fn instance_state_to_proto(s: InstanceState) -> grs_proto::v1::InstanceState {
    use grs_proto::v1::InstanceState as P;
    match s {
        InstanceState::PendingCreate => P::PendingCreate,
        InstanceState::Creating => P::Creating,
        InstanceState::Running => P::Running,
        InstanceState::Stopped => P::Stopped,
        InstanceState::Error => P::Error,
        InstanceState::PendingDelete => P::PendingDelete,
        InstanceState::Deleting => P::Deleting,
        InstanceState::Deleted => P::Deleted,
    }
}

/// Whether an instance in state `s` may still serve a job: not queued for
/// teardown, being deleted or deleted.
pub fn instance_is_live(s: InstanceState) -> bool {
    !matches!(
        s,
        InstanceState::PendingDelete | InstanceState::Deleting | InstanceState::Deleted
    )
}

/// Whether the VM of an instance in state `s` has been made (so a teardown
/// can be queued without racing its creation).
pub fn instance_is_created(s: InstanceState) -> bool {
    matches!(
        s,
        InstanceState::Running | InstanceState::Stopped | InstanceState::Error
    )
}

/// The action of a `workflow_job` event: the one type the webhook parser
/// (`grs-github`) produces, so the two crates cannot disagree on it.
pub use grs_github::webhook::JobAction;

/// A validated `workflow_job` event, as the store takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// `X-GitHub-Delivery`.
    pub delivery_id: String,
    /// What happened.
    pub action: JobAction,
    /// `workflow_job.id`; never 0.
    pub job_id: u64,
    /// `workflow_job.run_id`.
    pub run_id: u64,
    /// `workflow_job.run_attempt`.
    pub run_attempt: u32,
    /// `workflow_job.labels`.
    pub labels: Vec<String>,
    /// 0: no runner.
    pub runner_id: u64,
    /// Empty: no runner.
    pub runner_name: String,
    /// `repository.full_name`.
    pub repository: String,
    /// `organization.login`.
    pub organization: String,
    /// `installation.id`.
    pub installation_id: u64,
    /// `workflow_job.conclusion`.
    pub conclusion: String,
    /// `workflow_job.name`.
    pub job_name: String,
    /// `workflow_job.workflow_name`.
    pub workflow_name: String,
}

/// A job as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// GitHub's id.
    pub job_id: u64,
    /// GitHub's run id.
    pub run_id: u64,
    /// GitHub's run attempt.
    pub run_attempt: u32,
    /// `owner/name`.
    pub repository: String,
    /// Organization login, or empty.
    pub organization: String,
    /// GitHub App installation, or 0.
    pub installation_id: u64,
    /// The job's labels, as GitHub sent them.
    pub labels: Vec<String>,
    /// Where it stands.
    pub state: JobState,
    /// The pool serving it; empty when unrouted.
    pub pool: String,
    /// The instance made for it, once provisioning started.
    pub instance_name: String,
    /// The runner that took it.
    pub runner_name: String,
    /// The runner's GitHub id.
    pub runner_id: u64,
    /// GitHub's conclusion once completed.
    pub conclusion: String,
    /// Why it is unrouted, failed, or completed without an instance.
    pub reason: String,
    /// Provisioning attempts made.
    pub attempts: u32,
    /// For display.
    pub job_name: String,
    /// For display.
    pub workflow_name: String,
    /// When first recorded.
    pub recorded_at: Millis,
    /// When last changed.
    pub updated_at: Millis,
}

impl Job {
    /// The proto message.
    pub fn to_proto(&self) -> grs_proto::v1::Job {
        grs_proto::v1::Job {
            job_id: self.job_id,
            run_id: self.run_id,
            run_attempt: self.run_attempt,
            repository: self.repository.clone(),
            organization: self.organization.clone(),
            installation_id: self.installation_id,
            labels: self.labels.clone(),
            state: self.state.to_proto() as i32,
            pool: self.pool.clone(),
            instance_name: self.instance_name.clone(),
            runner_name: self.runner_name.clone(),
            runner_id: self.runner_id,
            conclusion: self.conclusion.clone(),
            reason: self.reason.clone(),
            attempts: self.attempts,
            job_name: self.job_name.clone(),
            workflow_name: self.workflow_name.clone(),
            recorded_at: to_timestamp(self.recorded_at),
            updated_at: to_timestamp(self.updated_at),
        }
    }
}

/// An instance as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    /// `<prefix>-<job id>`.
    pub name: String,
    /// Its pool.
    pub pool: String,
    /// The job it serves: the job it was made for, or, for a warm
    /// instance, the job bound to it since; 0 for a warm instance no job
    /// is bound to (idle in its pool's warm pool).
    pub job_id: u64,
    /// The job its runner took; 0 while idle.
    pub assigned_job_id: u64,
    /// Made for the pool's warm pool (`min_idle`) rather than for a job.
    pub warm: bool,
    /// When `job_id` was bound to it (its creation for an instance made for
    /// a job); 0 while no job is bound. The bootstrap timeout counts from
    /// here, so a warm instance bound long after it booted gets the whole
    /// timeout for its runner to take the job.
    pub bound_at: Millis,
    /// Where it stands.
    pub state: InstanceState,
    /// The backend's id.
    pub provider_id: String,
    /// Where it runs.
    pub location: String,
    /// Why it is in error or deleted.
    pub reason: String,
    /// When recorded.
    pub created_at: Millis,
    /// When last changed.
    pub updated_at: Millis,
}

impl InstanceRecord {
    /// The proto message.
    pub fn to_proto(&self) -> grs_proto::v1::Instance {
        grs_proto::v1::Instance {
            name: self.name.clone(),
            pool: self.pool.clone(),
            job_id: self.job_id,
            assigned_job_id: self.assigned_job_id,
            state: instance_state_to_proto(self.state) as i32,
            provider_id: self.provider_id.clone(),
            location: self.location.clone(),
            reason: self.reason.clone(),
            created_at: to_timestamp(self.created_at),
            updated_at: to_timestamp(self.updated_at),
            warm: self.warm,
        }
    }
}

/// Live settings of a pool an operator may change (`UpdatePool`), layered
/// over the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolOverrides {
    /// Pause (true) or resume (false) provisioning.
    pub paused: Option<bool>,
    /// Idle instances to keep.
    pub min_idle: Option<u32>,
    /// Capacity.
    pub max_instances: Option<u32>,
}

/// What `SubmitJobEvent` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Recorded; the job moved.
    Accepted,
    /// The delivery id was seen before.
    DuplicateDelivery,
    /// New delivery, but the job is already there or further.
    Stale,
}

/// One transition, for `WatchEvents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A job changed state.
    Job {
        /// When.
        at: Millis,
        /// Which job.
        job_id: u64,
        /// Its pool (may be empty).
        pool: String,
        /// Before (None when first recorded).
        from: Option<JobState>,
        /// After.
        to: JobState,
        /// Why, when there is something to say.
        reason: String,
    },
    /// An instance changed state.
    Instance {
        /// When.
        at: Millis,
        /// Which instance.
        name: String,
        /// Its pool.
        pool: String,
        /// Before (None when first recorded).
        from: Option<InstanceState>,
        /// After.
        to: InstanceState,
        /// Why, when there is something to say.
        reason: String,
    },
}

impl Event {
    /// The pool the event concerns.
    pub fn pool(&self) -> &str {
        match self {
            Self::Job { pool, .. } | Self::Instance { pool, .. } => pool,
        }
    }

    /// The proto message.
    pub fn to_proto(&self) -> grs_proto::v1::Event {
        use grs_proto::v1::{self as p, event::Kind};
        match self {
            Self::Job {
                at,
                job_id,
                pool,
                from,
                to,
                reason,
            } => p::Event {
                at: to_timestamp(*at),
                kind: Some(Kind::Job(p::JobTransition {
                    job_id: *job_id,
                    pool: pool.clone(),
                    from: from.map(|s| s.to_proto() as i32).unwrap_or(0),
                    to: to.to_proto() as i32,
                    reason: reason.clone(),
                })),
            },
            Self::Instance {
                at,
                name,
                pool,
                from,
                to,
                reason,
            } => p::Event {
                at: to_timestamp(*at),
                kind: Some(Kind::Instance(p::InstanceTransition {
                    name: name.clone(),
                    pool: pool.clone(),
                    from: from.map(|s| instance_state_to_proto(s) as i32).unwrap_or(0),
                    to: instance_state_to_proto(*to) as i32,
                    reason: reason.clone(),
                })),
            },
        }
    }
}

/// What the store holds of the runner an `in_progress` or `completed`
/// event names, as [`apply_event`] needs it: its instance record, if GRS
/// made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedRunner {
    /// No runner named (or the event is `queued` or `waiting`, which name
    /// none), or a runner GRS did not make: it took nothing from GRS.
    NotOurs,
    /// One of a pool's warm instances: its pool's warm keeper replaces it.
    Warm,
    /// An instance GRS made for job `job_id` (a job's own instance).
    MadeFor {
        /// The job it was made for.
        job_id: u64,
    },
}

impl NamedRunner {
    /// The runner whose instance record is `instance` (`None`: no instance
    /// of that name).
    pub fn of(instance: Option<&InstanceRecord>) -> Self {
        match instance {
            None => Self::NotOurs,
            Some(i) if i.warm => Self::Warm,
            Some(i) => Self::MadeFor { job_id: i.job_id },
        }
    }
}

/// What [`apply_event`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Accepted or stale (duplicates are caught before).
    pub outcome: SubmitOutcome,
    /// The job after the event.
    pub job: Job,
    /// The state before, if the job existed.
    pub from: Option<JobState>,
    /// Append the job to its pool's provision queue.
    pub enqueue_provision: bool,
}

/// Every reason GRS records on a job or instance, or sends with an event,
/// of its own accord (reasons from outside, a provisioner's error or an
/// operator's, are passed through as they come).
pub mod reason {
    use super::{InstanceState, JobState};

    /// On a job GitHub completed before GRS saw it queued.
    pub const COMPLETED_UNSEEN: &str = "completed before GRS saw it queued; no instance made";

    /// On a job GitHub completed while it was `from`, before its instance
    /// was made.
    pub fn completed_while(from: JobState) -> String {
        format!("completed while {from}; no instance made")
    }

    /// On an unrouted job.
    pub fn unrouted(labels: &[String]) -> String {
        format!("no pool serves all of the labels [{}]", labels.join(", "))
    }

    /// On an instance queued for teardown because its job completed.
    pub fn job_completed(job_id: u64) -> String {
        format!("job {job_id} completed")
    }

    /// On an instance queued for teardown once made, its job having
    /// completed while it was created.
    pub fn completed_during_creation(job_id: u64) -> String {
        format!("job {job_id} completed while its instance was created")
    }

    /// Why a provision entry needs no work: its job is `state`.
    pub fn job_is(job_id: u64, state: JobState) -> String {
        format!("job {job_id} is {state}")
    }

    /// Why a provision entry needs no work: its job is gone.
    pub fn job_not_recorded(job_id: u64) -> String {
        format!("job {job_id} is not recorded")
    }

    /// Why a provision entry needs no work: its instance is `state`.
    pub fn instance_is(name: &str, state: InstanceState) -> String {
        format!("instance {name} is {state}")
    }

    /// On a job bound to an idle warm instance instead of a new one.
    pub fn warm_instance(name: &str) -> String {
        format!("given the idle warm instance {name}")
    }

    /// On a warm instance a job's cancellation (or its runner's taking
    /// another job) handed back to the warm pool.
    pub fn back_to_warm_pool(job_id: u64) -> String {
        format!("back in the warm pool (job {job_id} no longer needs it)")
    }

    /// On an instance whose teardown was called off: its runner took job
    /// `job_id` (an `in_progress` that came after the teardown was queued).
    pub fn teardown_called_off(job_id: u64) -> String {
        format!("teardown called off: its runner took job {job_id}")
    }
}

/// Applies one event to a job record (`None`: not recorded yet), given the
/// pool routing chose for the job's labels (`None`: no pool serves them).
///
/// The rules:
/// - `queued` records a new job as queued (and queues it) or unrouted,
///   moves a waiting job to queued, and moves an unrouted job to queued
///   when a pool now serves its labels (a pool added since: the recovery
///   pass resubmits it); anything further along ignores it.
/// - `waiting` records a new job; otherwise it is stale.
/// - `in_progress` records the runner and moves any non-terminal job to
///   in_progress.
/// - `completed` moves any job but a completed one to completed and records
///   the conclusion and runner. Which instance to tear down is decided by
///   [`store::rules::submit`](crate::store::rules::submit) (it needs the
///   instance records).
/// - Only `in_progress` and `completed` record a runner: GitHub names none
///   while a job waits, so a runner on a `queued` or `waiting` event is
///   ignored, for a new record as for an existing one.
/// - A routed job first heard of through an `in_progress` or `completed`
///   naming `runner`, an instance GRS made for another job (its `queued`
///   delivery late or lost), owes that other job an instance, as it would
///   have, had its `queued` come first: it is queued for provisioning
///   ([`store::rules::begin_provision`](crate::store::rules::begin_provision)
///   proceeds for a job in progress with no instance, or completed on
///   another's runner). A warm runner is replaced by its pool's keeper
///   instead; a runner not ours took nothing from GRS. (Found by the e2e
///   soak: reordered `queued` deliveries left the last jobs waiting for
///   ever.)
pub fn apply_event(
    existing: Option<&Job>,
    ev: &JobEvent,
    routed_pool: Option<&str>,
    runner: NamedRunner,
    now: Millis,
) -> Applied {
    let stale = |job: &Job| Applied {
        outcome: SubmitOutcome::Stale,
        job: job.clone(),
        from: Some(job.state),
        enqueue_provision: false,
    };
    let fresh = |state: JobState| -> Job {
        Job {
            job_id: ev.job_id,
            run_id: ev.run_id,
            run_attempt: ev.run_attempt,
            repository: ev.repository.clone(),
            organization: ev.organization.clone(),
            installation_id: ev.installation_id,
            labels: ev.labels.clone(),
            state,
            pool: routed_pool.unwrap_or_default().to_owned(),
            instance_name: String::new(),
            runner_name: String::new(),
            runner_id: 0,
            conclusion: String::new(),
            reason: if routed_pool.is_none() {
                reason::unrouted(&ev.labels)
            } else {
                String::new()
            },
            attempts: 0,
            job_name: ev.job_name.clone(),
            workflow_name: ev.workflow_name.clone(),
            recorded_at: now,
            updated_at: now,
        }
    };
    let moved = |job: Job, from: Option<JobState>, enqueue: bool| Applied {
        outcome: SubmitOutcome::Accepted,
        job,
        from,
        enqueue_provision: enqueue,
    };
    let with_runner = |mut job: Job| {
        if !ev.runner_name.is_empty() {
            job.runner_name = ev.runner_name.clone();
        }
        if ev.runner_id != 0 {
            job.runner_id = ev.runner_id;
        }
        job
    };
    // Only a first-heard in_progress or completed asks (see the rule above).
    let owed_to_another_job = |job: &Job| {
        !job.pool.is_empty()
            && !ev.runner_name.is_empty()
            && matches!(runner, NamedRunner::MadeFor { job_id } if job_id != job.job_id)
    };
    match (ev.action, existing) {
        (JobAction::Queued, None) => {
            let state = if routed_pool.is_some() {
                JobState::Queued
            } else {
                JobState::Unrouted
            };
            moved(fresh(state), None, state == JobState::Queued)
        }
        (JobAction::Queued, Some(job)) if job.state == JobState::Waiting => {
            let mut job = job.clone();
            job.state = if job.pool.is_empty() {
                JobState::Unrouted
            } else {
                JobState::Queued
            };
            job.updated_at = now;
            let enqueue = job.state == JobState::Queued;
            moved(job, Some(JobState::Waiting), enqueue)
        }
        (JobAction::Queued, Some(job)) if job.state == JobState::Unrouted => match routed_pool {
            Some(pool) => {
                let mut job = job.clone();
                job.state = JobState::Queued;
                job.pool = pool.to_owned();
                job.reason = String::new();
                job.updated_at = now;
                moved(job, Some(JobState::Unrouted), true)
            }
            None => stale(job),
        },
        (JobAction::Waiting, None) => {
            let mut job = fresh(JobState::Waiting);
            if routed_pool.is_none() {
                job.state = JobState::Unrouted;
            }
            moved(job, None, false)
        }
        (JobAction::InProgress, None) => {
            let job = with_runner(fresh(JobState::InProgress));
            let owed = owed_to_another_job(&job);
            moved(job, None, owed)
        }
        (JobAction::InProgress, Some(job))
            if !job.state.is_terminal() && job.state != JobState::InProgress =>
        {
            let mut job = with_runner(job.clone());
            let from = job.state;
            job.state = JobState::InProgress;
            job.updated_at = now;
            moved(job, Some(from), false)
        }
        (JobAction::Completed, None) => {
            let mut job = with_runner(fresh(JobState::Completed));
            job.conclusion = ev.conclusion.clone();
            job.reason = reason::COMPLETED_UNSEEN.to_owned();
            let owed = owed_to_another_job(&job);
            moved(job, None, owed)
        }
        (JobAction::Completed, Some(job)) if job.state != JobState::Completed => {
            let mut job = with_runner(job.clone());
            let from = job.state;
            job.state = JobState::Completed;
            job.conclusion = ev.conclusion.clone();
            if job.instance_name.is_empty() && job.reason.is_empty() {
                job.reason = reason::completed_while(from);
            }
            job.updated_at = now;
            moved(job, Some(from), false)
        }
        (_, Some(job)) => stale(job),
    }
}

/// Jitter-free exponential backoff: `base * 2^attempt`, capped.
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(action: JobAction) -> JobEvent {
        JobEvent {
            delivery_id: "d".into(),
            action,
            job_id: 5_000_000_000,
            run_id: 1,
            run_attempt: 1,
            labels: vec!["self-hosted".into()],
            runner_id: 0,
            runner_name: String::new(),
            repository: "o/r".into(),
            organization: "o".into(),
            installation_id: 0,
            conclusion: String::new(),
            job_name: "build".into(),
            workflow_name: "ci".into(),
        }
    }

    #[test]
    fn a_routed_queued_job_is_queued_and_an_unrouted_one_is_recorded_with_its_labels() {
        let a = apply_event(
            None,
            &ev(JobAction::Queued),
            Some("linux"),
            NamedRunner::NotOurs,
            1,
        );
        assert_eq!(a.job.state, JobState::Queued);
        assert!(a.enqueue_provision);
        let a = apply_event(None, &ev(JobAction::Queued), None, NamedRunner::NotOurs, 1);
        assert_eq!(a.job.state, JobState::Unrouted);
        assert!(!a.enqueue_provision);
        assert!(a.job.reason.contains("self-hosted"));
    }

    #[test]
    fn queued_twice_is_stale_and_completed_before_queued_makes_no_instance() {
        let q = apply_event(
            None,
            &ev(JobAction::Queued),
            Some("linux"),
            NamedRunner::NotOurs,
            1,
        )
        .job;
        assert_eq!(
            apply_event(
                Some(&q),
                &ev(JobAction::Queued),
                Some("linux"),
                NamedRunner::NotOurs,
                2
            )
            .outcome,
            SubmitOutcome::Stale
        );
        let c = apply_event(
            None,
            &ev(JobAction::Completed),
            Some("linux"),
            NamedRunner::NotOurs,
            1,
        );
        assert_eq!(c.job.state, JobState::Completed);
        let late = apply_event(
            Some(&c.job),
            &ev(JobAction::Queued),
            Some("linux"),
            NamedRunner::NotOurs,
            2,
        );
        assert_eq!(late.outcome, SubmitOutcome::Stale);
        assert!(!late.enqueue_provision);
    }

    #[test]
    fn an_unrouted_job_is_queued_once_a_pool_serves_it() {
        let u = apply_event(None, &ev(JobAction::Queued), None, NamedRunner::NotOurs, 1).job;
        assert_eq!(u.state, JobState::Unrouted);
        let still = apply_event(
            Some(&u),
            &ev(JobAction::Queued),
            None,
            NamedRunner::NotOurs,
            2,
        );
        assert_eq!(still.outcome, SubmitOutcome::Stale);
        let q = apply_event(
            Some(&u),
            &ev(JobAction::Queued),
            Some("linux"),
            NamedRunner::NotOurs,
            3,
        );
        assert_eq!(q.outcome, SubmitOutcome::Accepted);
        assert!(q.enqueue_provision);
        assert_eq!(
            (q.job.state, q.job.pool.as_str()),
            (JobState::Queued, "linux")
        );
        assert_eq!(q.job.reason, "", "no longer unrouted");
        assert_eq!(q.from, Some(JobState::Unrouted));
    }

    #[test]
    fn waiting_then_queued_queues_once() {
        let w = apply_event(
            None,
            &ev(JobAction::Waiting),
            Some("linux"),
            NamedRunner::NotOurs,
            1,
        );
        assert_eq!(w.job.state, JobState::Waiting);
        assert!(!w.enqueue_provision);
        let q = apply_event(
            Some(&w.job),
            &ev(JobAction::Queued),
            Some("linux"),
            NamedRunner::NotOurs,
            2,
        );
        assert!(q.enqueue_provision);
        assert_eq!(q.from, Some(JobState::Waiting));
    }

    #[test]
    fn in_progress_records_the_runner_and_never_reopens_a_completed_job() {
        let q = apply_event(
            None,
            &ev(JobAction::Queued),
            Some("linux"),
            NamedRunner::NotOurs,
            1,
        )
        .job;
        let mut e = ev(JobAction::InProgress);
        e.runner_name = "grs-linux-7".into();
        e.runner_id = 9;
        let p = apply_event(Some(&q), &e, Some("linux"), NamedRunner::NotOurs, 2).job;
        assert_eq!(
            (p.state, p.runner_name.as_str(), p.runner_id),
            (JobState::InProgress, "grs-linux-7", 9)
        );
        let mut c = ev(JobAction::Completed);
        c.conclusion = "success".into();
        let done = apply_event(Some(&p), &c, Some("linux"), NamedRunner::NotOurs, 3).job;
        assert_eq!(
            done.runner_name, "grs-linux-7",
            "an empty runner_name on completed keeps the known runner"
        );
        assert_eq!(
            apply_event(Some(&done), &e, Some("linux"), NamedRunner::NotOurs, 4).outcome,
            SubmitOutcome::Stale
        );
        assert_eq!(
            apply_event(Some(&done), &c, Some("linux"), NamedRunner::NotOurs, 4).outcome,
            SubmitOutcome::Stale
        );
    }

    #[test]
    fn a_job_first_heard_on_another_jobs_runner_is_owed_an_instance() {
        let other = NamedRunner::MadeFor { job_id: 7 };
        for action in [JobAction::InProgress, JobAction::Completed] {
            let mut e = ev(action);
            e.runner_name = "grs-7".into();
            let owed = |existing: Option<&Job>, pool: Option<&str>, runner| {
                apply_event(existing, &e, pool, runner, 1).enqueue_provision
            };
            assert!(owed(None, Some("linux"), other), "{action:?}: owed");
            // Its own instance, a warm one, one not ours, no pool, or a job
            // already recorded (its queued came first): nothing owed.
            let own = NamedRunner::MadeFor { job_id: e.job_id };
            for runner in [own, NamedRunner::Warm, NamedRunner::NotOurs] {
                assert!(!owed(None, Some("linux"), runner), "{action:?} {runner:?}");
            }
            assert!(!owed(None, None, other), "{action:?}: unrouted");
            let q = apply_event(
                None,
                &ev(JobAction::Queued),
                Some("linux"),
                NamedRunner::NotOurs,
                0,
            );
            assert!(
                !owed(Some(&q.job), Some("linux"), other),
                "{action:?}: known job"
            );
            // No runner named: nothing to owe, whatever the caller says.
            e.runner_name.clear();
            assert!(!apply_event(None, &e, Some("linux"), other, 1).enqueue_provision);
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        assert_eq!(backoff(b, Duration::from_secs(1), 0), b);
        assert_eq!(
            backoff(b, Duration::from_secs(1), 2),
            Duration::from_millis(400)
        );
        assert_eq!(
            backoff(b, Duration::from_secs(1), 40),
            Duration::from_secs(1)
        );
    }
}
