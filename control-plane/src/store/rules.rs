//! The job and instance state machine, written once.
//!
//! Every change a [`Store`](super::Store) makes to jobs, instances,
//! capacity, queues, bootstrap tokens and pool overrides is decided here, by
//! pure functions over a [`Tx`]: they read the current records through it
//! and record the [`Change`]s to make. Neither store has rules of its own:
//!
//! - [`MemoryStore`](super::MemoryStore) decides under its lock and applies
//!   the changes to its maps.
//! - [`RedisStore`](super::RedisStore) reads the records the decision needs
//!   (one pipelined, atomic read; a record found missing mid-decision
//!   ([`Read`]'s `Err`) is read and the decision redone), then writes the
//!   changes with one generic script that first checks every record read is
//!   unchanged (a per-record revision) and otherwise reports a conflict; the
//!   decision is then redone on fresh records. Its Lua knows no rule: it
//!   compares, writes hashes, sets, streams and keys, nothing else.
//!
//! A [`Tx`] is split in groups, one per event of a batch: later groups see
//! the earlier ones' changes, and each group lists the records it read from
//! the store (for the revision checks).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{BeginProvision, PoolLimits, Queue, QueueItem, SubmitResult};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobAction, JobEvent, JobState, Millis,
    PoolOverrides, SubmitOutcome, apply_event, instance_is_created, reason,
};

/// A record a decision reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// Whether a delivery id was seen.
    Delivery(String),
    /// A job record.
    Job(u64),
    /// An instance record and the bootstrap token bound to it.
    Instance(String),
    /// A pool's overrides and capacity in use.
    Pool(String),
}

/// A read: `Err(key)` when the store has not loaded `key` (the Redis store
/// then loads it and decides again; the memory store never answers it).
pub type Read<T> = Result<T, Key>;

/// What a decision knows of a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Operator overrides.
    pub overrides: PoolOverrides,
    /// Live instances (capacity slots taken).
    pub in_use: u32,
}

/// The records as a store holds them before a [`Tx`].
pub trait Records {
    /// Whether delivery `id` was recorded.
    fn delivery_seen(&self, id: &str) -> Read<bool>;
    /// Job `id`.
    fn job(&self, id: u64) -> Read<Option<Job>>;
    /// Instance `name`.
    fn instance(&self, name: &str) -> Read<Option<InstanceRecord>>;
    /// The hash of the bootstrap token bound to instance `name`, if any.
    fn token(&self, name: &str) -> Read<Option<String>>;
    /// Pool `pool`.
    fn pool(&self, pool: &str) -> Read<PoolState>;
}

/// One change to make. Applied in order; each store knows how.
// A decision makes a handful of these and drops them once applied: boxing
// the two records of `Job` would cost an allocation each for no saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Remember delivery id.
    Delivery(String),
    /// Write a job (`before`: as read, `None` when new).
    Job {
        /// The record before.
        before: Option<Job>,
        /// The record after.
        after: Job,
    },
    /// Write an instance.
    Instance {
        /// The record before.
        before: Option<InstanceRecord>,
        /// The record after.
        after: InstanceRecord,
    },
    /// Keep a deleted instance's record for this long, then forget it.
    Retain {
        /// The instance.
        name: String,
        /// How long.
        retention: Duration,
    },
    /// Take a capacity slot of `pool` for `instance`.
    TakeSlot {
        /// The pool.
        pool: String,
        /// The instance.
        instance: String,
    },
    /// Release `instance`'s capacity slot in `pool`.
    ReleaseSlot {
        /// The pool.
        pool: String,
        /// The instance.
        instance: String,
    },
    /// Append to a queue.
    Push(Queue, QueueItem),
    /// Tell watchers.
    Emit(Event),
    /// Bind a bootstrap token (by hash) to `instance`, valid for `ttl`.
    BindToken {
        /// The instance.
        instance: String,
        /// The token's hash.
        token_hash: String,
        /// Validity.
        ttl: Duration,
    },
    /// Revoke `instance`'s bootstrap token.
    DropToken {
        /// The instance.
        instance: String,
        /// The token's hash.
        token_hash: String,
    },
    /// Set a pool's overrides (the whole merged value).
    Overrides {
        /// The pool.
        pool: String,
        /// The overrides after.
        overrides: PoolOverrides,
    },
}

/// How a group read a record: what the Redis store's revision check
/// compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Read from the store as it was before the [`Tx`]: must be unchanged.
    Stored(Key),
    /// A pool's capacity in use as the group saw it (the store's count plus
    /// earlier groups' slots): must be that count when the group applies.
    InUse {
        /// The pool.
        pool: String,
        /// The count.
        count: u32,
    },
}

/// The reads and changes of one group (one event of a batch, or one call).
#[derive(Debug, Default, Clone)]
pub struct Group {
    /// What the group's decision read.
    pub seen: Vec<Seen>,
    /// What to do, in order.
    pub changes: Vec<Change>,
}

/// Changes made so far, as later reads of the same [`Tx`] see them.
#[derive(Debug, Default)]
struct Overlay {
    deliveries: HashSet<String>,
    jobs: HashMap<u64, Job>,
    instances: HashMap<String, InstanceRecord>,
    tokens: HashMap<String, Option<String>>,
    overrides: HashMap<String, PoolOverrides>,
    /// Slots taken (+) and released (-) per pool.
    slots: HashMap<String, i64>,
}

/// A decision in progress over a store's [`Records`].
pub struct Tx<'a> {
    base: &'a dyn Records,
    overlay: Overlay,
    groups: Vec<Group>,
    current: Group,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("groups", &self.groups)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl<'a> Tx<'a> {
    /// A decision over `base`.
    pub fn new(base: &'a dyn Records) -> Self {
        Self {
            base,
            overlay: Overlay::default(),
            groups: Vec::new(),
            current: Group::default(),
        }
    }

    /// Ends the current group (an event of a batch): what follows is the
    /// next one.
    pub fn end_group(&mut self) {
        let g = std::mem::take(&mut self.current);
        self.groups.push(g);
    }

    /// The groups, the current one ended.
    pub fn into_groups(mut self) -> Vec<Group> {
        if !self.current.seen.is_empty() || !self.current.changes.is_empty() {
            self.end_group();
        }
        self.groups
    }

    fn saw(&mut self, key: Key) {
        let s = Seen::Stored(key);
        if !self.current.seen.contains(&s) {
            self.current.seen.push(s);
        }
    }

    fn change(&mut self, c: Change) {
        self.current.changes.push(c);
    }

    /// Whether delivery `id` was recorded.
    pub fn delivery_seen(&mut self, id: &str) -> Read<bool> {
        if self.overlay.deliveries.contains(id) {
            return Ok(true);
        }
        let seen = self.base.delivery_seen(id)?;
        self.saw(Key::Delivery(id.to_owned()));
        Ok(seen)
    }

    /// Job `id`.
    pub fn job(&mut self, id: u64) -> Read<Option<Job>> {
        if let Some(j) = self.overlay.jobs.get(&id) {
            return Ok(Some(j.clone()));
        }
        let j = self.base.job(id)?;
        self.saw(Key::Job(id));
        Ok(j)
    }

    /// Instance `name`.
    pub fn instance(&mut self, name: &str) -> Read<Option<InstanceRecord>> {
        if let Some(i) = self.overlay.instances.get(name) {
            return Ok(Some(i.clone()));
        }
        let i = self.base.instance(name)?;
        self.saw(Key::Instance(name.to_owned()));
        Ok(i)
    }

    /// The bootstrap token bound to instance `name`.
    pub fn token(&mut self, name: &str) -> Read<Option<String>> {
        if let Some(t) = self.overlay.tokens.get(name) {
            return Ok(t.clone());
        }
        let t = self.base.token(name)?;
        self.saw(Key::Instance(name.to_owned()));
        Ok(t)
    }

    /// Pool `pool`'s overrides.
    pub fn overrides(&mut self, pool: &str) -> Read<PoolOverrides> {
        if let Some(o) = self.overlay.overrides.get(pool) {
            return Ok(o.clone());
        }
        let p = self.base.pool(pool)?;
        self.saw(Key::Pool(pool.to_owned()));
        Ok(p.overrides)
    }

    /// Pool `pool`: overrides and capacity in use.
    pub fn pool(&mut self, pool: &str) -> Read<PoolState> {
        let mut p = self.base.pool(pool)?;
        p.overrides = self.overrides(pool)?;
        let delta = self.overlay.slots.get(pool).copied().unwrap_or(0);
        p.in_use = (i64::from(p.in_use) + delta).max(0) as u32;
        self.current.seen.push(Seen::InUse {
            pool: pool.to_owned(),
            count: p.in_use,
        });
        Ok(p)
    }

    fn record_delivery(&mut self, id: &str) {
        self.overlay.deliveries.insert(id.to_owned());
        self.change(Change::Delivery(id.to_owned()));
    }

    fn put_job(&mut self, before: Option<Job>, after: Job) {
        self.overlay.jobs.insert(after.job_id, after.clone());
        self.change(Change::Job { before, after });
    }

    fn put_instance(&mut self, before: Option<InstanceRecord>, after: InstanceRecord) {
        self.overlay
            .instances
            .insert(after.name.clone(), after.clone());
        self.change(Change::Instance { before, after });
    }

    fn emit(&mut self, e: Event) {
        self.change(Change::Emit(e));
    }

    fn push(&mut self, q: Queue, item: QueueItem) {
        self.change(Change::Push(q, item));
    }

    fn take_slot(&mut self, pool: &str, instance: &str) {
        *self.overlay.slots.entry(pool.to_owned()).or_default() += 1;
        self.change(Change::TakeSlot {
            pool: pool.to_owned(),
            instance: instance.to_owned(),
        });
    }

    fn release_slot(&mut self, pool: &str, instance: &str) {
        *self.overlay.slots.entry(pool.to_owned()).or_default() -= 1;
        self.change(Change::ReleaseSlot {
            pool: pool.to_owned(),
            instance: instance.to_owned(),
        });
    }

    /// Revokes `instance`'s bootstrap token, if it has one.
    fn drop_token(&mut self, instance: &str) -> Read<()> {
        if let Some(h) = self.token(instance)? {
            self.overlay.tokens.insert(instance.to_owned(), None);
            self.change(Change::DropToken {
                instance: instance.to_owned(),
                token_hash: h,
            });
        }
        Ok(())
    }

    /// Moves job `before` to `to`, recording `reason` if not empty, after
    /// `edit`; tells watchers.
    fn move_job(
        &mut self,
        before: Job,
        to: JobState,
        reason: &str,
        now: Millis,
        edit: impl FnOnce(&mut Job),
    ) {
        let mut after = before.clone();
        edit(&mut after);
        after.state = to;
        after.updated_at = now;
        if !reason.is_empty() {
            after.reason = reason.to_owned();
        }
        self.emit(Event::Job {
            at: now,
            job_id: after.job_id,
            pool: after.pool.clone(),
            from: Some(before.state),
            to,
            reason: reason.to_owned(),
        });
        self.put_job(Some(before), after);
    }

    /// Moves instance `before` to `to`, as [`move_job`](Self::move_job).
    fn move_instance(
        &mut self,
        before: InstanceRecord,
        to: InstanceState,
        reason: &str,
        now: Millis,
        edit: impl FnOnce(&mut InstanceRecord),
    ) -> InstanceRecord {
        let mut after = before.clone();
        edit(&mut after);
        after.state = to;
        after.updated_at = now;
        if !reason.is_empty() {
            after.reason = reason.to_owned();
        }
        self.emit(Event::Instance {
            at: now,
            name: after.name.clone(),
            pool: after.pool.clone(),
            from: Some(before.state),
            to,
            reason: reason.to_owned(),
        });
        self.put_instance(Some(before), after.clone());
        after
    }
}

/// [`Store::submit_event`](super::Store::submit_event).
pub fn submit(
    tx: &mut Tx<'_>,
    ev: &JobEvent,
    routed_pool: Option<&str>,
    now: Millis,
) -> Read<SubmitResult> {
    if tx.delivery_seen(&ev.delivery_id)? {
        return Ok(SubmitResult {
            outcome: SubmitOutcome::DuplicateDelivery,
            job: tx.job(ev.job_id)?,
            teardown: None,
        });
    }
    let existing = tx.job(ev.job_id)?;
    tx.record_delivery(&ev.delivery_id);
    let applied = apply_event(existing.as_ref(), ev, routed_pool, now);
    if applied.outcome != SubmitOutcome::Accepted {
        return Ok(SubmitResult {
            outcome: applied.outcome,
            job: Some(applied.job),
            teardown: None,
        });
    }
    let job = applied.job;
    // The event says why when this transition recorded a reason.
    let why = match &existing {
        Some(old) if old.reason == job.reason => String::new(),
        _ => job.reason.clone(),
    };
    tx.emit(Event::Job {
        at: now,
        job_id: job.job_id,
        pool: job.pool.clone(),
        from: applied.from,
        to: job.state,
        reason: why,
    });
    tx.put_job(existing, job.clone());
    if applied.enqueue_provision {
        tx.push(
            Queue::Provision(job.pool.clone()),
            QueueItem::Provision { job_id: job.job_id },
        );
    }
    let mut teardown_of = None;
    match ev.action {
        JobAction::InProgress if !ev.runner_name.is_empty() => {
            // The runner took a job: its instance is busy, its bootstrap
            // token used up.
            if let Some(inst) = tx.instance(&ev.runner_name)? {
                let mut after = inst.clone();
                after.assigned_job_id = job.job_id;
                after.updated_at = now;
                tx.put_instance(Some(inst), after);
            }
            tx.drop_token(&ev.runner_name)?;
        }
        JobAction::Completed => {
            // The runner that ran it goes; with no runner named, the job's
            // own instance goes if no runner took it.
            let target = if !ev.runner_name.is_empty() {
                Some(ev.runner_name.clone())
            } else if !job.instance_name.is_empty() {
                tx.instance(&job.instance_name)?
                    .filter(|i| i.assigned_job_id == 0)
                    .map(|i| i.name)
            } else {
                None
            };
            if let Some(name) = target {
                // Not before it is made: that would race its creation
                // (finish_provision queues it then).
                let created = tx
                    .instance(&name)?
                    .is_some_and(|i| instance_is_created(i.state));
                if created
                    && teardown(tx, &name, &reason::job_completed(job.job_id), now)? == Some(true)
                {
                    teardown_of = Some(name);
                }
            }
        }
        _ => {}
    }
    Ok(SubmitResult {
        outcome: SubmitOutcome::Accepted,
        job: Some(job),
        teardown: teardown_of,
    })
}

/// Queues `name` for teardown if it exists and is not on its way out
/// ([`Store::enqueue_teardown`](super::Store::enqueue_teardown)).
pub fn teardown(tx: &mut Tx<'_>, name: &str, why: &str, now: Millis) -> Read<Option<bool>> {
    let Some(inst) = tx.instance(name)? else {
        return Ok(None);
    };
    if matches!(
        inst.state,
        InstanceState::PendingDelete | InstanceState::Deleting | InstanceState::Deleted
    ) {
        return Ok(Some(false));
    }
    tx.move_instance(inst, InstanceState::PendingDelete, why, now, |_| {});
    tx.push(
        Queue::Teardown,
        QueueItem::Teardown {
            instance: name.to_owned(),
        },
    );
    Ok(Some(true))
}

/// Whether `job` ran on a runner other than `own_instance` (its own
/// instance's name, or "" when it has none): that runner was made for
/// another job, so an instance made for `job` is owed to that other job.
fn ran_on_another_runner(job: &Job, own_instance: &str) -> bool {
    !job.runner_name.is_empty() && job.runner_name != own_instance
}

/// Why a provision entry for `job` needs no work, if it needs none.
fn provision_skip_reason(job: &Job) -> Option<String> {
    match job.state {
        JobState::Queued | JobState::Provisioning => None,
        // A runner of the pool took the job before its own instance was
        // made: that runner was made for another job, which now needs one.
        JobState::InProgress if job.instance_name.is_empty() => None,
        // The same, when the job has already completed on that runner: the
        // runner is torn down with the completion, and the job it was made
        // for would otherwise wait for ever (found by `grs demo` under a
        // full pool: the entry was skipped as "job is completed").
        JobState::Completed if job.instance_name.is_empty() && ran_on_another_runner(job, "") => {
            None
        }
        s => Some(reason::job_is(job.job_id, s)),
    }
}

/// [`Store::begin_provision`](super::Store::begin_provision).
pub fn begin_provision(
    tx: &mut Tx<'_>,
    job_id: u64,
    name: &str,
    limits: &PoolLimits,
    now: Millis,
) -> Read<BeginProvision> {
    let Some(job) = tx.job(job_id)? else {
        return Ok(BeginProvision::Skip(reason::job_not_recorded(job_id)));
    };
    if let Some(inst) = tx.instance(name)? {
        if !matches!(
            inst.state,
            InstanceState::PendingCreate | InstanceState::Creating
        ) {
            return Ok(BeginProvision::Skip(reason::instance_is(name, inst.state)));
        }
        // A creation that did not finish (its worker died): finish it,
        // unless the job ended meanwhile; then remove what may exist.
        let owed = job.state == JobState::Completed && ran_on_another_runner(&job, name);
        if job.state.is_terminal() && !owed {
            let why = reason::job_is(job_id, job.state);
            teardown(tx, name, &why, now)?;
            return Ok(BeginProvision::Skip(why));
        }
        let mut after = job.clone();
        after.attempts += 1;
        let attempts = after.attempts;
        tx.put_job(Some(job), after);
        return Ok(BeginProvision::Proceed {
            instance: inst,
            attempts,
        });
    }
    if let Some(skip) = provision_skip_reason(&job) {
        return Ok(BeginProvision::Skip(skip));
    }
    let pool = tx.pool(&job.pool)?;
    if pool.overrides.paused.unwrap_or(limits.paused) {
        return Ok(BeginProvision::Paused);
    }
    if pool.in_use >= pool.overrides.max_instances.unwrap_or(limits.max_instances) {
        return Ok(BeginProvision::NoCapacity);
    }
    tx.take_slot(&job.pool, name);
    let inst = InstanceRecord {
        name: name.to_owned(),
        pool: job.pool.clone(),
        job_id,
        assigned_job_id: 0,
        state: InstanceState::PendingCreate,
        provider_id: String::new(),
        location: String::new(),
        reason: String::new(),
        created_at: now,
        updated_at: now,
    };
    tx.emit(Event::Instance {
        at: now,
        name: name.to_owned(),
        pool: job.pool.clone(),
        from: None,
        to: InstanceState::PendingCreate,
        reason: String::new(),
    });
    tx.put_instance(None, inst.clone());
    let attempts = job.attempts + 1;
    let edit = |j: &mut Job| {
        j.instance_name = name.to_owned();
        j.attempts = attempts;
    };
    if job.state == JobState::Queued {
        tx.move_job(job, JobState::Provisioning, "", now, edit);
    } else {
        let mut after = job.clone();
        edit(&mut after);
        tx.put_job(Some(job), after);
    }
    Ok(BeginProvision::Proceed {
        instance: inst,
        attempts,
    })
}

/// [`Store::mark_creating`](super::Store::mark_creating).
pub fn mark_creating(tx: &mut Tx<'_>, name: &str, now: Millis) -> Read<()> {
    if let Some(inst) = tx.instance(name)?
        && inst.state == InstanceState::PendingCreate
    {
        tx.move_instance(inst, InstanceState::Creating, "", now, |_| {});
    }
    Ok(())
}

/// [`Store::finish_provision`](super::Store::finish_provision).
pub fn finish_provision(
    tx: &mut Tx<'_>,
    job_id: u64,
    name: &str,
    provider_id: &str,
    location: &str,
    now: Millis,
) -> Read<bool> {
    let Some(inst) = tx.instance(name)? else {
        return Ok(false);
    };
    if !matches!(
        inst.state,
        InstanceState::PendingCreate | InstanceState::Creating
    ) {
        return Ok(false);
    }
    let inst = tx.move_instance(inst, InstanceState::Running, "", now, |i| {
        i.provider_id = provider_id.to_owned();
        i.location = location.to_owned();
    });
    // Its runner already ran a job that has completed: that completion
    // left the teardown to here (it came while this instance was being
    // created, e.g. while a store write of the create was redone after a
    // Redis restart). Without this the instance ran as idle until its
    // maximum lifetime (found by the end-to-end Redis restart scenario).
    if inst.assigned_job_id != 0
        && tx
            .job(inst.assigned_job_id)?
            .is_some_and(|j| j.state == JobState::Completed)
    {
        if let Some(job) = tx.job(job_id)?
            && job.state == JobState::Provisioning
        {
            tx.move_job(job, JobState::Provisioned, "", now, |_| {});
        }
        let why = reason::job_completed(inst.assigned_job_id);
        return Ok(teardown(tx, name, &why, now)? == Some(true));
    }
    let Some(job) = tx.job(job_id)? else {
        return Ok(false);
    };
    if job.state == JobState::Provisioning {
        tx.move_job(job, JobState::Provisioned, "", now, |_| {});
    } else if job.state == JobState::Completed
        && inst.assigned_job_id == 0
        && !ran_on_another_runner(&job, name)
    {
        return Ok(
            teardown(tx, name, &reason::completed_during_creation(job_id), now)? == Some(true),
        );
    }
    Ok(false)
}

/// [`Store::fail_provision`](super::Store::fail_provision).
pub fn fail_provision(
    tx: &mut Tx<'_>,
    job_id: u64,
    name: &str,
    why: &str,
    now: Millis,
) -> Read<()> {
    if let Some(job) = tx.job(job_id)?
        && !job.state.is_terminal()
    {
        tx.move_job(job, JobState::Failed, why, now, |_| {});
    }
    teardown(tx, name, why, now)?;
    Ok(())
}

/// [`Store::begin_teardown`](super::Store::begin_teardown).
pub fn begin_teardown(tx: &mut Tx<'_>, name: &str, now: Millis) -> Read<Option<InstanceRecord>> {
    let Some(inst) = tx.instance(name)? else {
        return Ok(None);
    };
    Ok(match inst.state {
        InstanceState::Deleted => None,
        InstanceState::Deleting => Some(inst),
        _ => Some(tx.move_instance(inst, InstanceState::Deleting, "", now, |_| {})),
    })
}

/// [`Store::finish_teardown`](super::Store::finish_teardown).
pub fn finish_teardown(
    tx: &mut Tx<'_>,
    name: &str,
    why: &str,
    retention: Duration,
    now: Millis,
) -> Read<()> {
    let Some(inst) = tx.instance(name)? else {
        return Ok(());
    };
    if inst.state == InstanceState::Deleted {
        return Ok(());
    }
    let pool = inst.pool.clone();
    tx.move_instance(inst, InstanceState::Deleted, why, now, |_| {});
    // Every instance not deleted holds its slot (taken when it was
    // recorded), so this releases exactly one.
    tx.release_slot(&pool, name);
    tx.drop_token(name)?;
    tx.change(Change::Retain {
        name: name.to_owned(),
        retention,
    });
    Ok(())
}

/// [`Store::note_instance_error`](super::Store::note_instance_error).
pub fn note_instance_error(tx: &mut Tx<'_>, name: &str, why: &str, now: Millis) -> Read<()> {
    if let Some(inst) = tx.instance(name)? {
        let mut after = inst.clone();
        after.reason = why.to_owned();
        after.updated_at = now;
        tx.put_instance(Some(inst), after);
    }
    Ok(())
}

/// [`Store::put_bootstrap_token`](super::Store::put_bootstrap_token): one
/// token per instance, so the previous one is revoked.
pub fn put_bootstrap_token(
    tx: &mut Tx<'_>,
    token_hash: &str,
    instance: &str,
    ttl: Duration,
) -> Read<()> {
    tx.drop_token(instance)?;
    tx.overlay
        .tokens
        .insert(instance.to_owned(), Some(token_hash.to_owned()));
    tx.change(Change::BindToken {
        instance: instance.to_owned(),
        token_hash: token_hash.to_owned(),
        ttl,
    });
    Ok(())
}

/// [`Store::revoke_bootstrap_token`](super::Store::revoke_bootstrap_token).
pub fn revoke_bootstrap_token(tx: &mut Tx<'_>, instance: &str) -> Read<()> {
    tx.drop_token(instance)
}

/// [`Store::update_pool_overrides`](super::Store::update_pool_overrides):
/// fields given replace, fields left `None` keep their value.
pub fn update_pool_overrides(
    tx: &mut Tx<'_>,
    pool: &str,
    update: &PoolOverrides,
) -> Read<PoolOverrides> {
    let old = tx.overrides(pool)?;
    let new = PoolOverrides {
        paused: update.paused.or(old.paused),
        min_idle: update.min_idle.or(old.min_idle),
        max_instances: update.max_instances.or(old.max_instances),
    };
    tx.overlay.overrides.insert(pool.to_owned(), new.clone());
    tx.change(Change::Overrides {
        pool: pool.to_owned(),
        overrides: new.clone(),
    });
    Ok(new)
}
