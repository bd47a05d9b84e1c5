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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use super::{BeginProvision, BeginWarm, PoolLimits, Queue, QueueItem, SubmitResult};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobAction, JobEvent, JobState, Millis, NamedRunner,
    PoolOverrides, SubmitOutcome, apply_event, instance_is_created, instance_is_live, reason,
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
    /// The places held on a hypervisor node.
    Node(String),
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
    /// The pool's idle warm instances: its warm pool (see
    /// [`is_warm_idle`]).
    pub warm: BTreeSet<String>,
}

/// Whether `i` is in its pool's warm pool: made for it, bound to no job,
/// its runner idle, not on its way out. Every write of an instance keeps
/// the pool's warm set equal to the instances this holds for
/// ([`Tx`]'s `put_instance`), so no rule maintains the set by hand.
pub fn is_warm_idle(i: &InstanceRecord) -> bool {
    i.warm && i.job_id == 0 && i.assigned_job_id == 0 && instance_is_live(i.state)
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
    /// The instances holding a place on hypervisor node `node`.
    fn node(&self, node: &str) -> Read<BTreeSet<String>>;
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
    /// Add `instance` to `pool`'s warm set.
    WarmAdd {
        /// The pool.
        pool: String,
        /// The instance.
        instance: String,
    },
    /// Remove `instance` from `pool`'s warm set.
    WarmRemove {
        /// The pool.
        pool: String,
        /// The instance.
        instance: String,
    },
    /// Hold a place on hypervisor node `node` for `instance`.
    NodeTake {
        /// The node.
        node: String,
        /// The instance.
        instance: String,
    },
    /// Release `instance`'s place on hypervisor node `node`.
    NodeRelease {
        /// The node.
        node: String,
        /// The instance.
        instance: String,
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
    /// The size of a pool's warm set as the group saw it (as for
    /// [`InUse`](Self::InUse)).
    Warm {
        /// The pool.
        pool: String,
        /// The count.
        count: u32,
    },
    /// The number of places held on a node as the group saw it.
    Node {
        /// The node.
        node: String,
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
    /// Instances added to (true) or removed from (false) each pool's warm
    /// set.
    warm: HashMap<String, BTreeMap<String, bool>>,
    /// The same for the places held on each node.
    nodes: HashMap<String, BTreeMap<String, bool>>,
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

    /// Pool `pool`'s warm set (its idle warm instances, by name). Read it
    /// before writing any instance of the pool in the same group: the
    /// store checks the count seen against the set before the group's
    /// writes.
    pub fn warm(&mut self, pool: &str) -> Read<BTreeSet<String>> {
        let mut set = self.base.pool(pool)?.warm;
        for (name, present) in self.overlay.warm.get(pool).into_iter().flatten() {
            if *present {
                set.insert(name.clone());
            } else {
                set.remove(name);
            }
        }
        self.current.seen.push(Seen::Warm {
            pool: pool.to_owned(),
            count: u32::try_from(set.len()).unwrap_or(u32::MAX),
        });
        Ok(set)
    }

    /// The instances holding a place on node `node`; read before writing
    /// the node's places in the same group (as [`warm`](Self::warm)).
    pub fn node(&mut self, node: &str) -> Read<BTreeSet<String>> {
        let mut set = self.base.node(node)?;
        for (name, present) in self.overlay.nodes.get(node).into_iter().flatten() {
            if *present {
                set.insert(name.clone());
            } else {
                set.remove(name);
            }
        }
        self.current.seen.push(Seen::Node {
            node: node.to_owned(),
            count: u32::try_from(set.len()).unwrap_or(u32::MAX),
        });
        Ok(set)
    }

    fn node_place(&mut self, node: &str, instance: &str, held: bool) {
        self.overlay
            .nodes
            .entry(node.to_owned())
            .or_default()
            .insert(instance.to_owned(), held);
        let (node, instance) = (node.to_owned(), instance.to_owned());
        self.change(if held {
            Change::NodeTake { node, instance }
        } else {
            Change::NodeRelease { node, instance }
        });
    }

    fn record_delivery(&mut self, id: &str) {
        self.overlay.deliveries.insert(id.to_owned());
        self.change(Change::Delivery(id.to_owned()));
    }

    fn put_job(&mut self, before: Option<Job>, after: Job) {
        self.overlay.jobs.insert(after.job_id, after.clone());
        self.change(Change::Job { before, after });
    }

    /// Writes an instance, and keeps its pool's warm set in step with
    /// [`is_warm_idle`].
    fn put_instance(&mut self, before: Option<InstanceRecord>, after: InstanceRecord) {
        let was = before.as_ref().is_some_and(is_warm_idle);
        let is = is_warm_idle(&after);
        let warm_change = (was != is).then(|| (after.pool.clone(), after.name.clone()));
        self.overlay
            .instances
            .insert(after.name.clone(), after.clone());
        self.change(Change::Instance { before, after });
        if let Some((pool, instance)) = warm_change {
            self.overlay
                .warm
                .entry(pool.clone())
                .or_default()
                .insert(instance.clone(), is);
            self.change(if is {
                Change::WarmAdd { pool, instance }
            } else {
                Change::WarmRemove { pool, instance }
            });
        }
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
    // Only in_progress and completed name a runner (read by the rest of
    // this decision anyway, so the Redis store prefetches it).
    let runner = match ev.action {
        JobAction::InProgress | JobAction::Completed if !ev.runner_name.is_empty() => {
            NamedRunner::of(tx.instance(&ev.runner_name)?.as_ref())
        }
        _ => NamedRunner::NotOurs,
    };
    let applied = apply_event(existing.as_ref(), ev, routed_pool, runner, now);
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
    let mut job = job;
    match ev.action {
        JobAction::InProgress if !ev.runner_name.is_empty() => {
            // The runner took a job: its instance is busy, its bootstrap
            // token used up.
            runner_took(tx, &mut job, &ev.runner_name, now)?;
            tx.drop_token(&ev.runner_name)?;
        }
        JobAction::Completed => {
            // The runner that ran it goes (bound to the job first if it was
            // a warm runner whose `in_progress` never came); with no runner
            // named, the job's own instance goes if no runner took it, or
            // goes back to the warm pool if it came from there (a job
            // cancelled before pickup does not cost the pool a runner).
            let target = if !ev.runner_name.is_empty() {
                match tx.instance(&ev.runner_name)? {
                    Some(i) if is_warm_idle(&i) => {
                        runner_took(tx, &mut job, &ev.runner_name, now)?;
                    }
                    // Its `in_progress` never came (or comes late): the
                    // runner ran this job, so a late `in_progress` of
                    // another job naming it calls nothing off.
                    Some(i) if i.assigned_job_id == 0 => {
                        let mut after = i.clone();
                        after.assigned_job_id = job.job_id;
                        after.updated_at = now;
                        tx.put_instance(Some(i), after);
                    }
                    _ => {}
                }
                Some(ev.runner_name.clone())
            } else if !job.instance_name.is_empty() {
                match tx.instance(&job.instance_name)? {
                    Some(i) if i.assigned_job_id == 0 && i.warm && i.job_id == job.job_id => {
                        back_to_warm_pool(tx, i, job.job_id, now);
                        None
                    }
                    i => i.filter(|i| i.assigned_job_id == 0).map(|i| i.name),
                }
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

/// Runner `runner` took `job` (an `in_progress` or `completed` naming it).
/// On an instance of ours: the job is recorded on it, a queued teardown of
/// an idle one is called off (the teardown was decided before its runner
/// took a job, e.g. for a job cancelled before pickup: deleting it now
/// would kill this job), and an idle warm instance is bound to the job.
/// The job's own instance, when the runner was such a warm one, is owed to
/// no other job: it goes to the warm pool in the runner's place, and the
/// job is recorded on the runner's instance.
fn runner_took(tx: &mut Tx<'_>, job: &mut Job, runner: &str, now: Millis) -> Read<()> {
    let Some(inst) = tx.instance(runner)? else {
        return Ok(());
    };
    if inst.assigned_job_id == job.job_id {
        return Ok(());
    }
    let was_warm_idle = is_warm_idle(&inst);
    let mut after = inst.clone();
    after.assigned_job_id = job.job_id;
    after.updated_at = now;
    if was_warm_idle {
        after.job_id = job.job_id;
        after.bound_at = now;
    }
    if inst.state == InstanceState::PendingDelete && inst.assigned_job_id == 0 {
        tx.move_instance(
            inst,
            InstanceState::Running,
            &reason::teardown_called_off(job.job_id),
            now,
            |i| *i = after,
        );
    } else {
        tx.put_instance(Some(inst), after);
    }
    if !was_warm_idle {
        return Ok(());
    }
    let own = std::mem::replace(&mut job.instance_name, runner.to_owned());
    if let Some(i) = (!own.is_empty() && own != runner)
        .then(|| tx.instance(&own))
        .transpose()?
        .flatten()
        && i.job_id == job.job_id
        && i.assigned_job_id == 0
        && instance_is_live(i.state)
    {
        back_to_warm_pool(tx, i, job.job_id, now);
    }
    let before = tx.job(job.job_id)?;
    tx.put_job(before, job.clone());
    Ok(())
}

/// Hands instance `i`, bound to job `job_id` and idle, to its pool's warm
/// pool.
fn back_to_warm_pool(tx: &mut Tx<'_>, i: InstanceRecord, job_id: u64, now: Millis) {
    let mut after = i.clone();
    after.job_id = 0;
    after.warm = true;
    after.bound_at = 0;
    after.reason = reason::back_to_warm_pool(job_id);
    after.updated_at = now;
    tx.put_instance(Some(i), after);
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
        // unless the job ended meanwhile; then remove what may exist. An
        // instance the job no longer holds (it went to the warm pool) is
        // finished all the same: the pool counts on it.
        let owed = (job.state == JobState::Completed && ran_on_another_runner(&job, name))
            || inst.job_id != job_id;
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
    // An idle warm runner of the pool takes the job instead of a new
    // instance (GitHub hands the job to any idle runner with its labels,
    // paused pool or not); the job is bound to it, which takes it out of
    // the warm pool (refilled by the warm keepers).
    for candidate in tx.warm(&job.pool)? {
        let Some(w) = tx.instance(&candidate)? else {
            continue;
        };
        if w.state != InstanceState::Running || !is_warm_idle(&w) {
            continue;
        }
        let mut bound = w.clone();
        bound.job_id = job_id;
        bound.bound_at = now;
        bound.updated_at = now;
        tx.put_instance(Some(w), bound.clone());
        let why = reason::warm_instance(&candidate);
        let edit = |j: &mut Job| j.instance_name = candidate.clone();
        if job.state == JobState::Queued {
            tx.move_job(job, JobState::Provisioned, &why, now, edit);
        } else {
            let mut after = job.clone();
            edit(&mut after);
            tx.put_job(Some(job), after);
        }
        return Ok(BeginProvision::Warm { instance: bound });
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
        warm: false,
        bound_at: now,
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
        && inst.job_id == job_id
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
    // A job that no longer holds the instance (its runner was a warm one
    // and the instance went to the warm pool) does not fail with it.
    if let Some(job) = tx.job(job_id)?
        && !job.state.is_terminal()
        && (job.instance_name.is_empty() || job.instance_name == name)
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
        InstanceState::Deleting => Some(inst),
        InstanceState::PendingDelete => {
            Some(tx.move_instance(inst, InstanceState::Deleting, "", now, |_| {}))
        }
        // Deleted, or the teardown was called off (its runner took a job):
        // nothing to delete.
        _ => None,
    })
}

/// [`Store::retire_warm`](super::Store::retire_warm): a teardown only
/// while the instance is idle in its warm pool (a job may have been bound
/// to it since the caller looked).
pub fn retire_warm(tx: &mut Tx<'_>, name: &str, why: &str, now: Millis) -> Read<Option<bool>> {
    match tx.instance(name)? {
        None => Ok(None),
        Some(i) if !is_warm_idle(&i) => Ok(Some(false)),
        Some(_) => teardown(tx, name, why, now),
    }
}

/// [`Store::call_off_teardown`](super::Store::call_off_teardown).
pub fn call_off_teardown(tx: &mut Tx<'_>, name: &str, why: &str, now: Millis) -> Read<bool> {
    let Some(inst) = tx.instance(name)? else {
        return Ok(false);
    };
    if inst.state != InstanceState::PendingDelete {
        return Ok(false);
    }
    tx.move_instance(inst, InstanceState::Running, why, now, |_| {});
    Ok(true)
}

/// [`Store::begin_warm`](super::Store::begin_warm).
pub fn begin_warm(
    tx: &mut Tx<'_>,
    pool: &str,
    name: &str,
    limits: &PoolLimits,
    now: Millis,
) -> Read<BeginWarm> {
    if let Some(inst) = tx.instance(name)? {
        return Ok(BeginWarm::Skip(reason::instance_is(name, inst.state)));
    }
    let p = tx.pool(pool)?;
    let warm = tx.warm(pool)?;
    if p.overrides.paused.unwrap_or(limits.paused) {
        return Ok(BeginWarm::Paused);
    }
    let want = p.overrides.min_idle.unwrap_or(limits.min_idle);
    if warm.len() >= want as usize {
        return Ok(BeginWarm::Enough);
    }
    if p.in_use >= p.overrides.max_instances.unwrap_or(limits.max_instances) {
        return Ok(BeginWarm::NoCapacity);
    }
    tx.take_slot(pool, name);
    let inst = InstanceRecord {
        name: name.to_owned(),
        pool: pool.to_owned(),
        job_id: 0,
        assigned_job_id: 0,
        warm: true,
        bound_at: 0,
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
        pool: pool.to_owned(),
        from: None,
        to: InstanceState::PendingCreate,
        reason: String::new(),
    });
    tx.put_instance(None, inst.clone());
    Ok(BeginWarm::Proceed { instance: inst })
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
    let inst = tx.move_instance(inst, InstanceState::Deleted, why, now, |_| {});
    // Every instance not deleted holds its slot (taken when it was
    // recorded), so this releases exactly one.
    tx.release_slot(&pool, name);
    // And the place it held on its node, if its backend keeps node places
    // (released whether or not it holds one: no read needed).
    if !inst.location.is_empty() {
        tx.node_place(&inst.location, name, false);
    }
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

/// [`Store::note_job_waiting`](super::Store::note_job_waiting): the reason
/// of a job that has not ended; an ended job keeps why it ended.
pub fn note_job_waiting(tx: &mut Tx<'_>, job_id: u64, why: &str, now: Millis) -> Read<()> {
    if let Some(job) = tx.job(job_id)?
        && !job.state.is_terminal()
        && job.reason != why
    {
        let mut after = job.clone();
        after.reason = why.to_owned();
        after.updated_at = now;
        tx.put_job(Some(job), after);
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

/// [`Store::reserve_node`](super::Store::reserve_node). A place whose
/// instance is gone or deleted (its release was lost: a create cut short by
/// a crash) no longer counts and is released here.
pub fn reserve_node(
    tx: &mut Tx<'_>,
    node: &str,
    instance: &str,
    max: u32,
    visible: &[String],
) -> Read<bool> {
    let held = tx.node(node)?;
    if held.contains(instance) {
        return Ok(true);
    }
    let mut count = visible
        .iter()
        .filter(|v| !held.contains(*v) && v.as_str() != instance)
        .collect::<BTreeSet<_>>()
        .len();
    for name in &held {
        if visible.contains(name) {
            count += 1;
            continue;
        }
        match tx.instance(name)? {
            Some(i) if i.state != InstanceState::Deleted => count += 1,
            _ => tx.node_place(node, name, false),
        }
    }
    if count >= max as usize {
        return Ok(false);
    }
    tx.node_place(node, instance, true);
    Ok(true)
}

/// [`Store::release_node`](super::Store::release_node).
pub fn release_node(tx: &mut Tx<'_>, node: &str, instance: &str) -> Read<()> {
    tx.node_place(node, instance, false);
    Ok(())
}
