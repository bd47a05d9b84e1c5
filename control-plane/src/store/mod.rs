//! Durable state and work queues: the [`Store`] trait and its two
//! implementations.
//!
//! - [`rules`]: the job and instance state machine, written once: pure
//!   decisions over the records that return the changes to make. Both stores
//!   decide through it and hold no rule of their own.
//! - [`RedisStore`]: production. Jobs and instances are hashes, queues are
//!   Redis streams read through consumer groups; a decision's changes are
//!   written by one generic Lua script that checks first that the records
//!   it was made on are unchanged (atomic per call, and per event of a
//!   batch). Needs persistence (AOF, `appendfsync everysec` or `always`) to
//!   keep accepted jobs across a Redis restart.
//! - [`MemoryStore`]: the same behaviour in process memory, for `grs demo` and
//!   fast tests. Nothing survives the process.
//! - [`conformance`]: the suite both must pass, one test per check; the
//!   Redis run uses a real Redis server. `tests/store_differential.rs`
//!   drives generated operation sequences through both stores and compares
//!   everything they show after every step.
//!
//! # Queues
//! Two kinds: one provision queue per pool (so a full pool does not hold up
//! the others) and one teardown queue. Workers [`read`](Store::read) an entry,
//! do its work, and [`ack`](Store::ack) it only then; the entry is deleted on
//! acknowledgement, so a queue's length is its backlog. An entry a worker
//! holds for longer than the claim timeout without [`touch`](Store::touch)ing
//! it is handed to another worker by [`claim_stale`](Store::claim_stale): a
//! worker that died mid-job has its job redone. Delivery is therefore at
//! least once, and every step a worker takes is idempotent.
//!
//! An entry has one holder at a time. A worker that was only slow (its
//! heartbeats came later than the claim timeout, on a loaded machine) is
//! taken for dead like a crashed one; its next `touch` reports the loss
//! instead of taking the entry back, and its `ack` does not remove the
//! entry its new holder works on. The [dispatcher](crate::dispatcher) then
//! stops, and fences the create of an instance with a lease besides, so
//! two workers never make one instance at once.
//!
//! # Warm pools
//! Each pool's idle warm instances (made for no job, runner idle, not on
//! their way out) form its warm set, kept in step with the instance
//! records by every write of an instance ([`rules::is_warm_idle`]). Warm
//! keepers add to it only while it is below `min_idle`
//! ([`Store::begin_warm`], atomic like capacity), and a queued job is bound
//! to a running member instead of a new instance
//! ([`Store::begin_provision`]).
//!
//! # Node places
//! Backends that cap instances per hypervisor node hold a place on the
//! node in the store before creating a VM there
//! ([`Store::reserve_node`], through the provisioner's
//! [`NodeLedger`](grs_provisioner::NodeLedger)), so replicas never exceed a
//! node's maximum together; the place is released when the instance is
//! recorded deleted.
//!
//! # Capacity
//! A pool's capacity is the set of its live instance names: a slot is taken
//! by adding the name (only while the set is smaller than the pool's
//! maximum) and released by removing it, in the same atomic step as the
//! instance's state change. Set semantics make both idempotent, and atomicity
//! means any number of control-plane replicas never exceed a pool's maximum.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
mod memory;
mod redis;
pub mod rules;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use self::memory::MemoryStore;
pub use self::redis::{InvalidRedisUrl, RedisStore, RedisStoreOptions};
use crate::model::{
    Event, InstanceRecord, Job, JobEvent, JobState, Millis, PoolOverrides, SubmitOutcome,
};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing store cannot be reached or answered with an error; the
    /// call may be retried. Maps to gRPC UNAVAILABLE.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What failed (the underlying error's text, when there is one).
        message: String,
        /// The underlying error (Redis's), if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Stored data could not be understood (a bug or a foreign writer under
    /// our key prefix).
    #[error("corrupt record {key}: {message}")]
    Corrupt {
        /// The Redis key (or memory record) at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A work queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Queue {
    /// Jobs of one pool waiting for an instance.
    Provision(String),
    /// Instances to destroy.
    Teardown,
}

impl std::fmt::Display for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Provision(pool) => write!(f, "provision:{pool}"),
            Self::Teardown => f.write_str("teardown"),
        }
    }
}

/// One queue entry handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The entry's id in its queue (a Redis stream id).
    pub id: String,
    /// What to do.
    pub item: QueueItem,
}

/// The work a queue entry stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueItem {
    /// Make an instance for this job.
    Provision {
        /// The job.
        job_id: u64,
    },
    /// Destroy this instance.
    Teardown {
        /// The instance.
        instance: String,
    },
}

/// What [`Store::submit_event`] did.
#[derive(Debug, Clone)]
pub struct SubmitResult {
    /// Accepted, duplicate or stale.
    pub outcome: SubmitOutcome,
    /// The job as recorded afterwards (for a duplicate: as recorded now, if
    /// at all).
    pub job: Option<Job>,
    /// The instance queued for teardown by this event, if any.
    pub teardown: Option<String>,
}

/// What [`Store::begin_provision`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginProvision {
    /// Go ahead: make (or finish making) this instance. The capacity slot is
    /// taken; the job is provisioning; `attempts` counts this one.
    Proceed {
        /// The instance record (pending_create or creating).
        instance: InstanceRecord,
        /// Creation attempts so far, this one included.
        attempts: u32,
    },
    /// Nothing to do (job unknown, finished, or already provisioned); ack.
    Skip(String),
    /// The pool is full: keep the entry and try again later.
    NoCapacity,
    /// The pool is paused: keep the entry and try again later.
    Paused,
    /// An idle warm instance of the pool was bound to the job (the job is
    /// provisioned): no instance to make; ack.
    Warm {
        /// The warm instance, now bound to the job.
        instance: InstanceRecord,
    },
}

/// What [`Store::begin_warm`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginWarm {
    /// Make this warm instance: recorded (pending_create), its capacity
    /// slot taken, counted in the warm pool.
    Proceed {
        /// The instance record.
        instance: InstanceRecord,
    },
    /// The warm pool holds `min_idle` instances (made or being made).
    Enough,
    /// The pool is full.
    NoCapacity,
    /// The pool is paused.
    Paused,
    /// The name is taken (a retry of a call that went through).
    Skip(String),
}

/// Configured facts about a pool the store needs to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLimits {
    /// Configured capacity (before overrides).
    pub max_instances: u32,
    /// Whether configuration starts it paused.
    pub paused: bool,
    /// Configured warm pool size (before overrides).
    pub min_idle: u32,
}

/// Queue depths for `GetStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Entries not yet acknowledged.
    pub depth: u64,
    /// Of those, held by a worker.
    pub pending: u64,
}

impl StoreError {
    /// [`StoreError::Unavailable`] without an underlying error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: None,
        }
    }
}

/// The durable state of GRS. All methods are safe to call concurrently from
/// any number of tasks and replicas.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Whether the store answers (health checks).
    async fn ping(&self) -> StoreResult<()>;

    /// Records a job event atomically ([`rules::submit`]): de-duplicates by
    /// delivery id, applies
    /// [`apply_event`](crate::model::apply_event), appends a routed queued
    /// job to its pool's provision queue, queues the teardown a completion
    /// calls for (the named runner's instance, or the job's own idle
    /// instance when no runner took it), and emits the events.
    ///
    /// `routed_pool` is the pool routing picked for the event's labels; a
    /// job keeps the pool it was first recorded with. Idempotent: repeating a
    /// call with the same delivery id changes nothing.
    async fn submit_event(
        &self,
        event: &JobEvent,
        routed_pool: Option<&str>,
        now: Millis,
    ) -> StoreResult<SubmitResult>;

    /// Records a batch of job events (each with its routed pool), in order,
    /// exactly as consecutive [`submit_event`](Store::submit_event) calls
    /// would: a later event sees what earlier ones did. One result per event,
    /// in the batch's order. [`RedisStore`] reads what the batch needs in one
    /// pipelined read and records it with one script call (each event
    /// atomic; should another writer have changed a record one of them read,
    /// that event and the rest are decided again and recorded by a later
    /// call); the default calls `submit_event` in turn. An error may leave
    /// the batch partly recorded (Redis does not roll back a script that
    /// fails midway, e.g. out of memory); a retry is safe, as delivery ids
    /// de-duplicate. Jobs of one batch share a recording time, so listing
    /// orders them among themselves arbitrarily (as for any jobs recorded
    /// in the same millisecond).
    async fn submit_events(
        &self,
        batch: &[(&JobEvent, Option<&str>)],
        now: Millis,
    ) -> StoreResult<Vec<SubmitResult>> {
        let mut out = Vec::with_capacity(batch.len());
        for (event, routed_pool) in batch {
            out.push(self.submit_event(event, *routed_pool, now).await?);
        }
        Ok(out)
    }

    /// One job.
    async fn get_job(&self, job_id: u64) -> StoreResult<Option<Job>>;

    /// Jobs newest first, filtered, at most `limit` from `cursor` (0: the
    /// newest). Returns the page and the cursor of the next page, if any.
    /// Cursors are positions in the store's job index: opaque to callers,
    /// stable while paging except that new jobs shift them (a page may then
    /// repeat a job, never skip one).
    async fn list_jobs(
        &self,
        pool: Option<&str>,
        state: Option<JobState>,
        cursor: u64,
        limit: usize,
    ) -> StoreResult<(Vec<Job>, Option<u64>)>;

    /// One instance.
    async fn get_instance(&self, name: &str) -> StoreResult<Option<InstanceRecord>>;

    /// Instances (of a pool, or all), live ones unless `include_deleted`.
    async fn list_instances(
        &self,
        pool: Option<&str>,
        include_deleted: bool,
    ) -> StoreResult<Vec<InstanceRecord>>;

    /// Takes a provision entry's job into work: checks it is still wanted and
    /// the pool is neither paused nor full, takes the capacity slot, records
    /// the instance `instance_name` and moves the job to provisioning.
    /// Idempotent for a redelivered entry (no second slot is taken).
    async fn begin_provision(
        &self,
        job_id: u64,
        instance_name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginProvision>;

    /// Moves an instance to creating (the provisioner was called).
    async fn mark_creating(&self, name: &str, now: Millis) -> StoreResult<()>;

    /// The instance runs: records it, moves its job to provisioned, and, if
    /// the job completed meanwhile and no runner took the instance, queues it
    /// for teardown (returns true then).
    async fn finish_provision(
        &self,
        job_id: u64,
        name: &str,
        provider_id: &str,
        location: &str,
        now: Millis,
    ) -> StoreResult<bool>;

    /// Provisioning failed for good: the job fails with `reason` and the
    /// instance is queued for teardown (which releases its slot once any
    /// leftover is gone).
    async fn fail_provision(
        &self,
        job_id: u64,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<()>;

    /// Queues an instance for teardown. Idempotent: false if it was already
    /// queued, being deleted or deleted; `None` if unknown.
    async fn enqueue_teardown(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>>;

    /// Takes a teardown entry's instance into work (state deleting). `None`
    /// if there is nothing to delete (unknown or already deleted).
    async fn begin_teardown(&self, name: &str, now: Millis) -> StoreResult<Option<InstanceRecord>>;

    /// The instance is gone: state deleted, capacity slot released, record
    /// kept for `retention`. Idempotent.
    async fn finish_teardown(
        &self,
        name: &str,
        reason: &str,
        retention: Duration,
        now: Millis,
    ) -> StoreResult<()>;

    /// [`enqueue_teardown`](Store::enqueue_teardown), but only while `name`
    /// is an idle warm instance (recycling, scale-down): a job bound to it
    /// since the caller looked keeps it. `Some(false)` when it is not (or
    /// already on its way out), `None` if unknown.
    async fn retire_warm(&self, name: &str, reason: &str, now: Millis)
    -> StoreResult<Option<bool>>;

    /// Calls off the queued teardown of `name` (pending_delete → running,
    /// `reason` recorded): GitHub says its runner is busy with a job, which
    /// the teardown would kill. Its queue entry then finds nothing to do.
    /// False if it was not pending deletion.
    async fn call_off_teardown(&self, name: &str, reason: &str, now: Millis) -> StoreResult<bool>;

    /// Records a new warm instance `name` of `pool` if the pool's warm pool
    /// is short of its `min_idle` (override, else `limits`), the pool is
    /// not paused and has a free slot: the slot is taken and the instance
    /// counted in the warm pool in one atomic step, so replicas filling the
    /// same pool never overshoot. The caller makes it, then calls
    /// [`finish_provision`](Store::finish_provision) (job id 0) or
    /// [`fail_provision`](Store::fail_provision).
    async fn begin_warm(
        &self,
        pool: &str,
        name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginWarm>;

    /// The pool's idle warm instances (its warm pool), by name.
    async fn pool_warm(&self, pool: &str) -> StoreResult<Vec<String>>;

    /// Holds a place on hypervisor node `node` for `instance` if fewer than
    /// `max` instances hold one or are `visible` there (see
    /// [`NodeLedger::reserve`](grs_provisioner::NodeLedger::reserve)).
    /// Atomic across replicas; a place whose instance is deleted or gone is
    /// released on the way. [`finish_teardown`](Store::finish_teardown)
    /// releases the place of the node an instance ran on (its `location`).
    async fn reserve_node(
        &self,
        node: &str,
        instance: &str,
        max: u32,
        visible: &[String],
    ) -> StoreResult<bool>;

    /// Releases `instance`'s place on `node`. Idempotent.
    async fn release_node(&self, node: &str, instance: &str) -> StoreResult<()>;

    /// The instances holding a place on `node`, by name.
    async fn node_places(&self, node: &str) -> StoreResult<Vec<String>>;

    /// Records a teardown problem on the instance (it stays queued).
    async fn note_instance_error(&self, name: &str, reason: &str, now: Millis) -> StoreResult<()>;

    /// Records why a job that has not ended still waits (a create that
    /// failed and is retried, ...), shown by `GetJob`; "" clears it. An
    /// ended job keeps its reason. Idempotent.
    async fn note_job_waiting(&self, job_id: u64, reason: &str, now: Millis) -> StoreResult<()>;

    /// Next entry of `queue` for `consumer`, waiting up to `block`.
    async fn read(
        &self,
        queue: &Queue,
        consumer: &str,
        block: Duration,
    ) -> StoreResult<Option<Delivery>>;

    /// Entries of `queue` held longer than `min_idle` by any consumer,
    /// reassigned to `consumer` (at most `count`).
    async fn claim_stale(
        &self,
        queue: &Queue,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<Delivery>>;

    /// Tells the store `consumer` still works on `id`: resets its idle time
    /// (so [`claim_stale`](Store::claim_stale) leaves it alone) and returns
    /// true, if `consumer` holds it. Returns false, changing nothing, when
    /// it does not: another consumer claimed it (this one was taken for
    /// dead) or it was acknowledged. The caller has then lost the entry
    /// and must stop working on it. Never takes an entry from its holder.
    async fn touch(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<bool>;

    /// Acknowledges and removes entry `id` if `consumer` holds it (then
    /// true), in one atomic step. An entry another consumer holds stays
    /// with it, and one already acknowledged changes nothing: false. So a
    /// worker taken for dead cannot drop the entry its new holder works on,
    /// and a repeated acknowledgement is harmless.
    async fn ack(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<bool>;

    /// Backlog of a queue.
    async fn queue_depth(&self, queue: &Queue) -> StoreResult<QueueDepth>;

    /// Live instances of a pool (capacity in use).
    async fn pool_in_use(&self, pool: &str) -> StoreResult<u32>;

    /// Operator overrides of a pool's settings.
    async fn pool_overrides(&self, pool: &str) -> StoreResult<PoolOverrides>;

    /// Sets the given overrides (fields left `None` are kept).
    async fn update_pool_overrides(
        &self,
        pool: &str,
        update: &PoolOverrides,
    ) -> StoreResult<PoolOverrides>;

    /// Stores a bootstrap token's hash, bound to `instance`, for `ttl`.
    async fn put_bootstrap_token(
        &self,
        token_hash: &str,
        instance: &str,
        ttl: Duration,
    ) -> StoreResult<()>;

    /// Stores `sealed` (a secret sealed under a bootstrap token, see
    /// [`bootstrap::issue_with_secret`](crate::bootstrap::issue_with_secret))
    /// under the token's hash for `ttl`.
    async fn put_bootstrap_secret(
        &self,
        token_hash: &str,
        sealed: &str,
        ttl: Duration,
    ) -> StoreResult<()>;

    /// What [`put_bootstrap_secret`](Store::put_bootstrap_secret) stored
    /// under a token's hash, if it has not expired.
    async fn bootstrap_secret(&self, token_hash: &str) -> StoreResult<Option<String>>;

    /// The instance a bootstrap token's hash is bound to, if still valid.
    async fn lookup_bootstrap_token(&self, token_hash: &str) -> StoreResult<Option<String>>;

    /// Revokes an instance's bootstrap token (the runner registered, or the
    /// instance is gone). Idempotent.
    async fn revoke_bootstrap_token(&self, instance: &str) -> StoreResult<()>;

    /// Takes, or renews, the lease `name` for `holder` for `ttl`; true when
    /// `holder` holds it afterwards. A lease is free when nobody holds it or
    /// its holder let it expire; renewing one's own lease extends it to
    /// `ttl` from now. Atomic: of any number of callers on any number of
    /// replicas, at most one holds a lease at any time (as the store's clock
    /// sees it: Redis server time, so replicas' clocks need not agree).
    /// Leader election of the [reconciler](crate::reconciler) uses it, and
    /// the [dispatcher](crate::dispatcher)'s create fence (one worker makes
    /// an instance at a time).
    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool>;

    /// Gives the lease `name` up if `holder` holds it (then true); a caller
    /// that does not hold it changes nothing. Idempotent.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool>;

    /// Events from now on (pool-filtered), as they are emitted by any
    /// replica. The stream ends when the store goes away; errors end it too.
    async fn watch(
        &self,
        pool: Option<String>,
    ) -> StoreResult<BoxStream<'static, StoreResult<Event>>>;
}
