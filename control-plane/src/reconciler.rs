//! The reconciler: closes the gaps job events leave (DESIGN.md, job flow
//! step 7). Events alone tear down an instance only when its job completes;
//! an instance whose runner never takes a job, or a VM the store lost track
//! of, would otherwise live forever.
//!
//! # Expected flow
//! Every `reconcile_interval`, each replica asks the store for the lease
//! [`LEASE`] (held for three intervals). The replica holding it runs one
//! pass, [`Reconciler::reconcile_once`], then recovery ([`crate::recovery`]),
//! renewing the lease every interval while they run (see *Guarantees*):
//! 1. The provisioner of every configured pool
//!    [`list`](grs_provisioner::Provisioner::list)s the pool's VMs carrying
//!    this installation's marker.
//! 2. The store's live instances are read — after the listing, see
//!    *Guarantees*.
//! 3. **Maximum lifetime**: a created instance (running, stopped or error)
//!    older than `max_lifetime` is queued for teardown (the teardown worker
//!    still asks GitHub first whether its runner is busy).
//! 4. **Bootstrap timeout**: a created instance bound to a job whose runner
//!    has taken no job (`assigned_job_id == 0`) `bootstrap_timeout` after
//!    the job was bound to it (its creation, or the moment a warm instance
//!    was given the job) is queued for teardown. So is a warm instance
//!    still being made `bootstrap_timeout` after it was recorded (its
//!    keeper died: nobody else finishes it).
//! 5. **Warm pools**: an idle warm instance older than its pool's
//!    `idle_max_age` is recycled (queued for teardown; the warm keepers make
//!    a fresh one, so template and runner updates reach the warm pool), and
//!    idle warm instances above the pool's `min_idle` (an `UpdatePool`
//!    lowered it, or jobs handed their instances back) are torn down, oldest
//!    first.
//! 6. **Orphans**: a listed VM with no live record (the store never knew
//!    it, forgot it, or records it as deleted) is deleted through its
//!    provisioner once it is `orphan_grace` old, unless GitHub says (or
//!    cannot rule out) that its runner is busy: a record lost by the store
//!    does not make the job on it any less real. A VM whose backend cannot
//!    tell its age must be seen as an orphan on consecutive passes spanning
//!    `orphan_grace` instead.
//! 7. **Offline runner registrations** named with this installation's
//!    instance prefix and matching no live instance are removed from
//!    GitHub (listed before the records are read, like the VMs; at most
//!    [`OFFLINE_RUNNER_BUDGET`] removals per pass; skipped without a
//!    `[github]` section).
//! 8. **Removed pools**: for every pool that instance records name (deleted
//!    ones too, while they are kept) but the configuration no longer has,
//!    live instances are queued for teardown and, unless GitHub says one
//!    of their runners is busy (then the pool waits for a later pass),
//!    every backend is asked to
//!    [`remove_all`](grs_provisioner::Provisioner::remove_all) of that
//!    pool's VMs (each only removes VMs carrying this installation's
//!    marker).
//!
//! Teardowns go through the teardown queue like any other, so the VM, its
//! capacity slot and its record are handled by the teardown workers.
//!
//! # Guarantees
//! - **No pass outlives the lease.** The leader renews the lease every
//!   interval while a pass runs, so a pass longer than the lease keeps it.
//!   Each confirmed renewal moves the leader's [`Fence`] to one interval
//!   before the lease could expire; every change a pass makes (a teardown
//!   queued, a warm instance retired, an orphan, runner registration or
//!   removed pool's VMs deleted, an event submitted or a redelivery asked
//!   for by recovery) checks the fence first. A renewal that finds another
//!   holder, or no renewal confirmed before the fence closes (an
//!   unreachable store, a stalled runtime), stops the pass where it is:
//!   a replica that lost the lease makes no further change.
//! - **Idempotent; safe on two replicas by mistake.** A change already
//!   sent when the fence closes may still land, and clocks can drift, so
//!   two passes' last steps may overlap. Nothing breaks: queueing a
//!   teardown twice queues it once
//!   ([`enqueue_teardown`](crate::store::Store::enqueue_teardown)), and
//!   deleting an absent VM succeeds.
//! - **Nothing foreign touched.** Only VMs the provisioner lists are ever
//!   deleted, and a provisioner lists only VMs with this installation's
//!   marker (and prefix); its `delete` checks the marker again.
//! - **No create is raced.** A dispatcher records an instance (as
//!   pending_create) before it asks the provisioner for the VM, and the
//!   reconciler reads the records after listing the VMs: a VM it lists has
//!   a record it sees, unless that record is deleted or gone. Instances
//!   still being created (pending_create, creating) are never timed out
//!   here: their dispatcher holds a queue entry and finishes or fails them.
//!   The grace period covers what remains (a record expired or wiped).
//! - **Cancellation.** Every `.await` is a cancellation point; a pass
//!   dropped half-way is simply redone by the next leader. On shutdown the
//!   lease is released so another replica takes over at its next interval
//!   (after a crash: once the lease expires, within three intervals).
//!
//! Lost webhooks (queued jobs GRS never heard of, completions it never
//! got) are looked for after each pass by [`crate::recovery`].
//!
//! # Not yet
//! Re-queueing teardowns whose queue entry was lost (pending_delete or
//! deleting with no entry; only a Redis that lost writes does that) is
//! still to come. Warm pools are filled by the [warm keepers](crate::warm),
//! not here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use grs_provisioner::{Instance, Provisioner};
use tokio_util::sync::CancellationToken;

use crate::config::ControlPlaneConfig;
use crate::model::{InstanceRecord, InstanceState, Millis, instance_is_created, now_ms, to_ms};
use crate::pools::Pools;
use crate::store::rules::is_warm_idle;
use crate::store::{Store, StoreError};
use crate::worker::{RunnerRegistrar, RunnerRegistration};

/// Most offline runner registrations removed per pass: each removal is one
/// GitHub API call, and the rate limit is shared with provisioning.
pub const OFFLINE_RUNNER_BUDGET: usize = 10;

/// The store lease whose holder runs the reconciler.
pub const LEASE: &str = "reconciler";

/// How long releasing the lease may take at shutdown before it is left to
/// expire.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a pass (of the reconciler or of [`crate::recovery`]) stopped.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The store failed; the next pass redoes the work.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This replica can no longer be sure it holds the lease: it stopped
    /// before its next change.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
}

/// This replica no longer holds (or cannot confirm it still holds) the
/// reconciler lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this replica no longer holds the reconciler lease")]
pub struct LeaseLost;

/// The leader's fence: until when this replica is sure it holds the
/// reconciler lease. Every step of a pass that changes something (a
/// teardown queued, a VM or runner registration removed, an event
/// submitted) checks it first, so a replica that lost the lease, or whose
/// renewals stalled (a starved runtime, an unreachable store), stops before
/// its next change instead of working alongside the new leader.
///
/// [`run`] moves the deadline forward with every confirmed renewal; it lies
/// [`LEASE_MARGIN_INTERVALS`] intervals before the lease itself can expire
/// (the store counts the lease from when it got the renewal, which is after
/// it was sent), so a change let through just before the deadline has that
/// margin to reach the store. A fence nobody armed (a pass run directly, as
/// tests do) always holds.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<std::sync::Mutex<Option<tokio::time::Instant>>>);

/// How many intervals before the lease's expiry the fence closes: one of
/// the lease's three.
const LEASE_MARGIN_INTERVALS: u32 = 1;

impl Fence {
    /// `Ok` while the lease is known to be held (or the fence was never
    /// armed).
    pub fn check(&self) -> Result<(), LeaseLost> {
        match *lock(&self.0) {
            Some(until) if tokio::time::Instant::now() >= until => Err(LeaseLost),
            _ => Ok(()),
        }
    }

    /// The lease is held until `until` (the fence's deadline, margin
    /// already taken off).
    fn hold_until(&self, until: tokio::time::Instant) {
        *lock(&self.0) = Some(until);
    }

    /// The lease is lost: every check fails until the next
    /// [`hold_until`](Self::hold_until).
    fn revoke(&self) {
        *lock(&self.0) = Some(tokio::time::Instant::now());
    }

    /// When the fence closes, if armed.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        *lock(&self.0)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reconciler settings, taken from `[control_plane]`.
#[derive(Debug, Clone)]
pub struct ReconcilerSettings {
    /// Time between passes.
    pub interval: Duration,
    /// Idle instances older than this are torn down.
    pub bootstrap_timeout: Duration,
    /// Every instance older than this is torn down.
    pub max_lifetime: Duration,
    /// Orphan VMs younger than this are left alone.
    pub orphan_grace: Duration,
    /// Instance (and runner) names start with `<instance_prefix>-`.
    pub instance_prefix: String,
}

impl ReconcilerSettings {
    /// From the configuration.
    pub fn from_config(c: &ControlPlaneConfig) -> Self {
        Self {
            interval: c.reconcile_interval,
            bootstrap_timeout: c.bootstrap_timeout,
            max_lifetime: c.max_lifetime,
            orphan_grace: c.orphan_grace,
            instance_prefix: c.instance_prefix.clone(),
        }
    }

    /// How long the leader's lease lasts: three intervals, so one slow or
    /// failed renewal does not hand leadership over.
    pub fn lease_ttl(&self) -> Duration {
        self.interval.saturating_mul(3)
    }

    /// How long after a renewal was sent the fence stays open: the lease's
    /// TTL less the margin ([`Fence`]).
    fn fence_span(&self) -> Duration {
        self.lease_ttl()
            .saturating_sub(self.interval.saturating_mul(LEASE_MARGIN_INTERVALS))
    }
}

/// What one pass did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Instances queued for teardown because their runner took no job in
    /// time.
    pub bootstrap_timed_out: Vec<String>,
    /// Instances queued for teardown because they reached the maximum
    /// lifetime.
    pub lifetime_ended: Vec<String>,
    /// Orphan VMs deleted.
    pub orphans_deleted: Vec<String>,
    /// Orphan VMs seen but still within the grace period.
    pub orphans_waiting: Vec<String>,
    /// Instances past the bootstrap timeout, and orphan VMs, kept because
    /// GitHub says their runner is busy (its `in_progress` webhook was
    /// lost, or the store lost the record).
    pub busy_kept: Vec<String>,
    /// Idle warm instances queued for teardown because they reached their
    /// pool's `idle_max_age`.
    pub warm_recycled: Vec<String>,
    /// Idle warm instances queued for teardown because their pool had more
    /// than `min_idle`.
    pub warm_surplus: Vec<String>,
    /// Offline runner registrations of this installation removed.
    pub offline_runners_removed: Vec<String>,
    /// VMs of pools no longer configured, removed.
    pub removed_pool_vms: Vec<String>,
    /// Provisioner failures the pass went past (the next pass retries).
    pub failures: Vec<String>,
}

impl PassReport {
    /// Whether the pass found nothing to do and nothing failed.
    pub fn is_quiet(&self) -> bool {
        *self == Self::default()
    }
}

/// One replica's reconciler. Holds only what the leader remembers between
/// passes (undated orphans); everything else is read afresh each pass.
#[derive(Debug)]
pub struct Reconciler {
    store: Arc<dyn Store>,
    pools: Pools,
    settings: ReconcilerSettings,
    /// Orphans whose backend gives no creation time → when this replica
    /// first saw them as orphans. Kept only across consecutive passes that
    /// see them, so a VM that stops looking orphaned starts over.
    undated_orphans: HashMap<String, Millis>,
    /// Asked whether a runner is busy before its instance is torn down for
    /// the bootstrap timeout.
    registrar: Option<Arc<dyn RunnerRegistrar>>,
    /// Where [`run`] counts actions and leadership.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Lost webhooks and unrouted jobs, looked for by the leader after its
    /// passes ([`crate::recovery`]).
    recovery: Option<crate::recovery::Recovery>,
    /// Checked before every change a pass makes (also by `recovery`).
    fence: Fence,
}

/// `d` in milliseconds, saturating.
fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// Whether `since` lies at least `limit` before `now`.
fn at_least(now: Millis, since: Millis, limit: Duration) -> bool {
    now.saturating_sub(since) >= millis(limit)
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

impl Reconciler {
    /// A reconciler over `store` and the backends of `pools`.
    pub fn new(store: Arc<dyn Store>, pools: Pools, settings: ReconcilerSettings) -> Self {
        Self {
            store,
            pools,
            settings,
            undated_orphans: HashMap::new(),
            registrar: None,
            metrics: None,
            recovery: None,
            fence: Fence::default(),
        }
    }

    /// Runs `recovery` after each pass while leading ([`run`]).
    pub fn with_recovery(mut self, recovery: crate::recovery::Recovery) -> Self {
        self.recovery = Some(recovery.with_fence(self.fence.clone()));
        self
    }

    /// Counts every pass's actions and this replica's leadership in
    /// `metrics` (done by [`run`]).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Asks `registrar` (GitHub) whether an instance's runner is busy before
    /// tearing the instance down for the bootstrap timeout: when the
    /// `in_progress` webhook was lost, the store thinks the runner idle
    /// while it runs a job. Without one, the store's word is taken.
    pub fn with_registrar(mut self, registrar: Option<Arc<dyn RunnerRegistrar>>) -> Self {
        self.registrar = registrar;
        self
    }

    /// Runs one pass at time `now` (see the module docs), whether or not
    /// this replica holds the lease: [`run`] checks that (and arms the
    /// [`Fence`] every change checks). Store errors and a lost lease end
    /// the pass (the next one redoes it); provisioner errors are logged,
    /// reported and passed over.
    pub async fn reconcile_once(&mut self, now: Millis) -> Result<PassReport, PassError> {
        let mut report = PassReport::default();
        // 1. VMs (and runner registrations) first, records second: see "No
        // create is raced".
        let vms = self.list_vms(&mut report).await;
        let runners = self.offline_runners(&mut report).await;
        let records = self.store.list_instances(None, false).await?;
        // 3, 4, 5. Timeouts, recycling.
        for inst in &records {
            self.expire(inst, now, &mut report).await?;
        }
        // 5. Surplus.
        self.scale_down_warm(&records, now, &mut report).await?;
        // 7. Runner registrations.
        let live_names: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        self.remove_offline_runners(runners, &live_names, &mut report)
            .await?;
        // 8. Removed pools.
        self.remove_dropped_pools(now, &mut report).await?;
        // 6. Orphans.
        let live: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        let mut undated = HashMap::new();
        for (provisioner, pool, vm) in vms {
            if live.contains(vm.name.as_str()) {
                continue;
            }
            let old_enough = match vm.created_at {
                Some(t) => at_least(now, to_ms(t), self.settings.orphan_grace),
                None => {
                    let first = self.undated_orphans.get(&vm.name).copied();
                    undated.insert(vm.name.clone(), first.unwrap_or(now));
                    first.is_some_and(|f| at_least(now, f, self.settings.orphan_grace))
                }
            };
            if !old_enough {
                tracing::debug!(instance = %vm.name, pool, "possible orphan within its grace period");
                report.orphans_waiting.push(vm.name);
                continue;
            }
            if self.runner_may_be_busy(&vm.name, &pool, &mut report).await {
                continue;
            }
            tracing::warn!(
                instance = %vm.name,
                pool,
                provider_id = %vm.provider_id,
                grace = %human(self.settings.orphan_grace),
                "deleting an orphan: a VM of this installation with no live instance record"
            );
            self.fence.check()?;
            match provisioner.delete(&pool, &vm.name).await {
                Ok(()) => {
                    undated.remove(&vm.name);
                    report.orphans_deleted.push(vm.name);
                }
                Err(e) => {
                    tracing::warn!(instance = %vm.name, pool, error = %e, "cannot delete an orphan; retrying next pass");
                    report
                        .failures
                        .push(format!("deleting orphan {}: {e}", vm.name));
                }
            }
        }
        self.undated_orphans = undated;
        Ok(report)
    }

    /// Every marked VM of every pool, with the backend that lists it and its
    /// pool's name.
    async fn list_vms(
        &self,
        report: &mut PassReport,
    ) -> Vec<(Arc<dyn Provisioner>, String, Instance)> {
        let mut out = Vec::new();
        for pool in self.pools.iter() {
            match pool.provisioner.list(&pool.name).await {
                Ok(vms) => out.extend(
                    vms.into_iter()
                        .map(|vm| (pool.provisioner.clone(), pool.name.clone(), vm)),
                ),
                Err(e) => {
                    tracing::warn!(pool = %pool.name, error = %e, "cannot list the pool's VMs; orphans are looked for next pass");
                    report
                        .failures
                        .push(format!("listing pool {}: {e}", pool.name));
                }
            }
        }
        out
    }

    /// Queues `inst` for teardown if it is past its maximum lifetime, idle
    /// past the bootstrap timeout, a warm instance nobody finishes making,
    /// or an idle warm instance past its pool's `idle_max_age`.
    async fn expire(
        &self,
        inst: &InstanceRecord,
        now: Millis,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let s = &self.settings;
        let warm_unbound = inst.warm && inst.job_id == 0;
        if warm_unbound
            && matches!(
                inst.state,
                InstanceState::PendingCreate | InstanceState::Creating
            )
            && at_least(now, inst.created_at, s.bootstrap_timeout)
        {
            let reason = format!(
                "warm instance not made within {} (its keeper stopped)",
                human(s.bootstrap_timeout)
            );
            return self
                .queue_teardown(inst, &reason, now, &mut report.bootstrap_timed_out)
                .await;
        }
        if !instance_is_created(inst.state) {
            return Ok(());
        }
        let bound_at = if inst.bound_at > 0 {
            inst.bound_at
        } else {
            inst.created_at
        };
        let (reason, list) = if at_least(now, inst.created_at, s.max_lifetime) {
            (
                format!(
                    "instance reached its maximum lifetime of {}",
                    human(s.max_lifetime)
                ),
                &mut report.lifetime_ended,
            )
        } else if is_warm_idle(inst) {
            let Some(pool) = self.pools.get(&inst.pool) else {
                return Ok(());
            };
            let max_age = pool.config.idle_max_age;
            if !at_least(now, inst.created_at, max_age) {
                return Ok(());
            }
            (
                format!(
                    "idle warm instance recycled at its pool's idle_max_age of {}",
                    human(max_age)
                ),
                &mut report.warm_recycled,
            )
        } else if inst.assigned_job_id == 0
            && !warm_unbound
            && at_least(now, bound_at, s.bootstrap_timeout)
        {
            if self
                .runner_may_be_busy(&inst.name, &inst.pool, report)
                .await
            {
                return Ok(());
            }
            (
                format!(
                    "runner did not take a job within {}",
                    human(s.bootstrap_timeout)
                ),
                &mut report.bootstrap_timed_out,
            )
        } else {
            return Ok(());
        };
        if is_warm_idle(inst) {
            // Only while still idle: a job may be bound to it meanwhile.
            self.fence.check()?;
            if self.store.retire_warm(&inst.name, &reason, now).await? == Some(true) {
                tracing::info!(instance = %inst.name, pool = %inst.pool, reason, "idle warm instance queued for teardown");
                list.push(inst.name.clone());
            }
            return Ok(());
        }
        self.queue_teardown(inst, &reason, now, list).await
    }

    /// Queues `inst` for teardown with `reason`, noting it in `list` if
    /// this call queued it.
    async fn queue_teardown(
        &self,
        inst: &InstanceRecord,
        reason: &str,
        now: Millis,
        list: &mut Vec<String>,
    ) -> Result<(), PassError> {
        // false: already on its way out (another pass or an event was
        // first); None: gone meanwhile. Either way nothing to do.
        self.fence.check()?;
        if self.store.enqueue_teardown(&inst.name, reason, now).await? == Some(true) {
            tracing::info!(instance = %inst.name, pool = %inst.pool, reason, "instance queued for teardown");
            list.push(inst.name.clone());
        }
        Ok(())
    }

    /// Tears down idle warm instances above each pool's `min_idle`, oldest
    /// first (those still being made are left to finish: they are counted,
    /// and the next pass finds them idle).
    async fn scale_down_warm(
        &self,
        records: &[InstanceRecord],
        now: Millis,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let gone: HashSet<String> = report
            .lifetime_ended
            .iter()
            .chain(&report.bootstrap_timed_out)
            .chain(&report.warm_recycled)
            .cloned()
            .collect();
        for pool in self.pools.iter() {
            let mut idle: Vec<&InstanceRecord> = records
                .iter()
                .filter(|i| i.pool == pool.name && is_warm_idle(i) && !gone.contains(&i.name))
                .collect();
            let min_idle = self
                .store
                .pool_overrides(&pool.name)
                .await?
                .min_idle
                .unwrap_or(pool.config.min_idle) as usize;
            let surplus = idle.len().saturating_sub(min_idle);
            if surplus == 0 {
                continue;
            }
            idle.retain(|i| i.state == InstanceState::Running);
            idle.sort_by_key(|i| (i.created_at, i.name.clone()));
            let reason = format!("idle warm instance above the pool's min_idle of {min_idle}");
            for inst in idle.into_iter().take(surplus) {
                self.fence.check()?;
                if self.store.retire_warm(&inst.name, &reason, now).await? == Some(true) {
                    tracing::info!(instance = %inst.name, pool = %pool.name, reason, "idle warm instance queued for teardown");
                    report.warm_surplus.push(inst.name.clone());
                }
            }
        }
        Ok(())
    }

    /// The offline runner registrations named with this installation's
    /// prefix (none without a registrar, or when it cannot tell).
    async fn offline_runners(&self, report: &mut PassReport) -> Vec<RunnerRegistration> {
        let Some(registrar) = &self.registrar else {
            return Vec::new();
        };
        let prefix = format!("{}-", self.settings.instance_prefix);
        match registrar.offline_runners(&prefix).await {
            Ok(list) => list.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list runner registrations; retrying next pass");
                report
                    .failures
                    .push(format!("listing runner registrations: {e}"));
                Vec::new()
            }
        }
    }

    /// Removes offline registrations (`runners`) matching no live instance,
    /// at most [`OFFLINE_RUNNER_BUDGET`] of them.
    async fn remove_offline_runners(
        &self,
        runners: Vec<RunnerRegistration>,
        live: &HashSet<&str>,
        report: &mut PassReport,
    ) -> Result<(), LeaseLost> {
        let Some(registrar) = &self.registrar else {
            return Ok(());
        };
        let stale = runners
            .into_iter()
            .filter(|r| !r.busy && !live.contains(r.name.as_str()))
            .take(OFFLINE_RUNNER_BUDGET);
        for r in stale {
            self.fence.check()?;
            match registrar.remove_runner_id(r.id).await {
                Ok(()) => {
                    tracing::info!(runner = %r.name, id = r.id, "removed an offline runner registration of this installation");
                    report.offline_runners_removed.push(r.name);
                }
                Err(e) => {
                    tracing::warn!(runner = %r.name, error = %e, "cannot remove an offline runner registration; retrying next pass");
                    report
                        .failures
                        .push(format!("removing runner {}: {e}", r.name));
                }
            }
        }
        Ok(())
    }

    /// Queues the live instances of pools no longer configured for
    /// teardown, and has every backend remove those pools' VMs; a pool
    /// with a runner GitHub says is busy (or cannot say is idle) keeps its
    /// VMs until a later pass finds them all idle.
    async fn remove_dropped_pools(
        &self,
        now: Millis,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let all = self.store.list_instances(None, true).await?;
        let dropped: BTreeSet<&str> = all
            .iter()
            .filter(|i| self.pools.get(&i.pool).is_none())
            .map(|i| i.pool.as_str())
            .collect();
        if dropped.is_empty() {
            return Ok(());
        }
        let mut queued = Vec::new();
        let mut busy = BTreeSet::new();
        for inst in all
            .iter()
            .filter(|i| dropped.contains(i.pool.as_str()) && i.state != InstanceState::Deleted)
        {
            if self
                .runner_may_be_busy(&inst.name, &inst.pool, report)
                .await
            {
                busy.insert(inst.pool.as_str());
                continue;
            }
            let reason = format!("pool {} is no longer configured", inst.pool);
            self.queue_teardown(inst, &reason, now, &mut queued).await?;
        }
        for pool in dropped.difference(&busy) {
            for (backend, _) in self.pools.backends() {
                self.fence.check()?;
                match backend.remove_all(pool).await {
                    Ok(removed) => {
                        for name in &removed {
                            tracing::warn!(instance = %name, pool, "removed a VM of a pool no longer configured");
                        }
                        report.removed_pool_vms.extend(removed);
                    }
                    Err(e) => {
                        tracing::warn!(pool, error = %e, "cannot remove the VMs of a pool no longer configured; retrying next pass");
                        report
                            .failures
                            .push(format!("removing the VMs of pool {pool}: {e}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the registrar says (or cannot rule out) that the runner of
    /// instance `name` of `pool`, idle (or unknown) by the store's records,
    /// is running a job: then its VM stays, and the next pass asks again (a
    /// recorded instance goes at its maximum lifetime at the latest).
    async fn runner_may_be_busy(&self, name: &str, pool: &str, report: &mut PassReport) -> bool {
        let Some(registrar) = &self.registrar else {
            return false;
        };
        match registrar.runner_busy(name).await {
            Ok(Some(true)) => {
                tracing::warn!(
                    instance = %name,
                    pool,
                    "runner is busy though no in_progress webhook named it (a lost delivery?); \
                     keeping its VM until its job completes"
                );
                report.busy_kept.push(name.to_owned());
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(instance = %name, pool, error = %e,
                    "cannot tell whether the runner is busy; its teardown waits for the next pass");
                report
                    .failures
                    .push(format!("asking whether {name} is busy: {e}"));
                true
            }
        }
    }

    /// Forgets what the leader remembered (on losing the lease: the next
    /// leader starts from the store and the backends anyway).
    fn forget(&mut self) {
        self.undated_orphans.clear();
        if let Some(r) = &mut self.recovery {
            r.forget();
        }
    }
}

impl Reconciler {
    /// One leader's turn: a pass, its metrics, then recovery if due
    /// (bounded, so a slow GitHub cannot hold the turn up for long; a
    /// recovery pass cut short is redone by the next one). A lost lease
    /// ends the turn at the next change it would have made.
    async fn lead_once(&mut self) -> Result<(), LeaseLost> {
        let pass = self.reconcile_once(now_ms()).await;
        if let (Some(m), Ok(r)) = (&self.metrics, &pass) {
            m.reconciler_actions("bootstrap_timeout", r.bootstrap_timed_out.len());
            m.reconciler_actions("lifetime_ended", r.lifetime_ended.len());
            m.reconciler_actions("orphan_deleted", r.orphans_deleted.len());
            m.reconciler_actions("busy_kept", r.busy_kept.len());
            m.reconciler_actions("warm_recycled", r.warm_recycled.len());
            m.reconciler_actions("warm_surplus", r.warm_surplus.len());
            m.reconciler_actions("offline_runner_removed", r.offline_runners_removed.len());
            m.reconciler_actions("removed_pool_vm", r.removed_pool_vms.len());
            m.reconciler_actions("failure", r.failures.len());
        }
        match pass {
            Ok(report) if report.is_quiet() => tracing::debug!("reconcile pass: nothing to do"),
            Ok(report) => tracing::info!(?report, "reconcile pass done"),
            Err(PassError::LeaseLost(lost)) => return Err(lost),
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed; retrying next interval"),
        }
        if let Some(recovery) = &mut self.recovery {
            let limit = self.settings.interval.max(Duration::from_secs(2));
            match tokio::time::timeout(limit, recovery.run_if_due()).await {
                Ok(Err(lost)) => return Err(lost),
                Ok(Ok(_)) => {}
                Err(_) => {
                    tracing::warn!(
                        limit_ms = limit.as_millis() as u64,
                        "recovery pass cut short; the next one starts over"
                    )
                }
            }
        }
        Ok(())
    }
}

/// Runs `work` (a leader's turn) while keeping the reconciler lease:
/// renews it every interval and moves `fence`'s deadline forward with each
/// confirmed renewal, so a turn longer than the lease keeps it. When a
/// renewal finds another holder, or no renewal is confirmed before the
/// fence closes (the store is unreachable or slow), the fence is revoked
/// and `work` dropped where it is: [`LeaseLost`]. Work that reached a
/// change after the deadline already stopped itself at its fence check.
async fn keeping_lease<T>(
    store: &dyn Store,
    holder: &str,
    settings: &ReconcilerSettings,
    fence: &Fence,
    work: impl Future<Output = Result<T, LeaseLost>>,
) -> Result<T, LeaseLost> {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    tokio::pin!(work);
    loop {
        let Some(deadline) = fence.deadline() else {
            // Never armed: run() arms it before any turn.
            return work.await;
        };
        tokio::select! {
            r = &mut work => return r,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(holder, "could not renew the reconciler lease in time; stopping the pass");
                fence.revoke();
                return Err(LeaseLost);
            }
            _ = tick.tick() => {
                let sent = tokio::time::Instant::now();
                let renewal = tokio::time::timeout_at(
                    deadline,
                    store.acquire_lease(LEASE, holder, settings.lease_ttl()),
                );
                match renewal.await {
                    Ok(Ok(true)) => fence.hold_until(sent + settings.fence_span()),
                    Ok(Ok(false)) => {
                        tracing::warn!(holder, "another replica took the reconciler lease; stopping the pass");
                        fence.revoke();
                        return Err(LeaseLost);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(holder, error = %e, "cannot renew the reconciler lease; the pass stops unless a renewal gets through in time")
                    }
                    // The deadline passed: the sleep branch stops the pass.
                    Err(_) => {}
                }
            }
        }
    }
}

/// Runs `reconciler` as replica `holder` until `shutdown`: every interval,
/// take or renew the lease and, holding it, run a turn (a pass, then
/// recovery), renewing the lease while it runs ([`keeping_lease`]).
/// Releases the lease on the way out.
pub async fn run(mut reconciler: Reconciler, holder: String, shutdown: CancellationToken) {
    let store = reconciler.store.clone();
    let settings = reconciler.settings.clone();
    let fence = reconciler.fence.clone();
    let interval = settings.interval;
    let ttl = settings.lease_ttl();
    let mut leading = false;
    tracing::debug!(holder, "reconciler started");
    loop {
        let sent = tokio::time::Instant::now();
        let lease = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = store.acquire_lease(LEASE, &holder, ttl) => r,
        };
        let lost = match lease {
            Ok(true) => {
                fence.hold_until(sent + settings.fence_span());
                if !leading {
                    tracing::info!(holder, "this replica now runs the reconciler");
                    leading = true;
                }
                if let Some(m) = &reconciler.metrics {
                    m.set_reconciler_leader(true);
                }
                let turn = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = keeping_lease(store.as_ref(), &holder, &settings, &fence, reconciler.lead_once()) => r,
                };
                turn.is_err()
            }
            Ok(false) => {
                fence.revoke();
                true
            }
            Err(e) => {
                // Without the store the pass could not work anyway; the
                // lease lapses unless a renewal gets through in time.
                tracing::warn!(error = %e, "cannot reach the store for the reconciler lease");
                false
            }
        };
        if lost {
            if let Some(m) = &reconciler.metrics {
                m.set_reconciler_leader(false);
            }
            if leading {
                tracing::warn!(holder, "this replica lost the reconciler lease");
                leading = false;
                reconciler.forget();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    if let Some(m) = &reconciler.metrics {
        m.set_reconciler_leader(false);
    }
    if leading {
        match tokio::time::timeout(RELEASE_TIMEOUT, store.release_lease(LEASE, &holder)).await {
            Ok(Ok(_)) => tracing::info!(holder, "released the reconciler lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot release the reconciler lease; it expires by itself")
            }
            Err(_) => {
                tracing::warn!("releasing the reconciler lease timed out; it expires by itself")
            }
        }
    }
    tracing::debug!(holder, "reconciler stopped");
}

#[cfg(test)]
mod tests {
    use grs_provisioner::{Bootstrap, FakeProvisioner, InstanceSpec, InstanceState};

    use super::*;
    use crate::model::{JobAction, SubmitOutcome};
    use crate::store::conformance::event;
    use crate::store::{BeginProvision, MemoryStore};
    use crate::testing::{FakeRegistrar, eventually, fake_pools, test_config};
    use crate::worker::{WorkerContext, WorkerSettings};

    const BOOTSTRAP: Duration = Duration::from_millis(1_000);
    const LIFETIME: Duration = Duration::from_millis(5_000);
    const GRACE: Duration = Duration::from_millis(2_000);

    struct Setup {
        store: Arc<dyn Store>,
        fake: Arc<FakeProvisioner>,
        pools: Pools,
        reconciler: Reconciler,
    }

    fn setup() -> Setup {
        setup_with(test_config())
    }

    /// [`setup`], its reconciler asking a [`FakeRegistrar`] about runners.
    fn setup_with_registrar() -> (Setup, Arc<FakeRegistrar>) {
        let mut s = setup();
        let runners = Arc::new(FakeRegistrar::default());
        s.reconciler = Reconciler::new(
            s.store.clone(),
            s.pools.clone(),
            s.reconciler.settings.clone(),
        )
        .with_registrar(Some(runners.clone()));
        (s, runners)
    }

    fn setup_with(config: crate::config::Config) -> Setup {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let fake = Arc::new(FakeProvisioner::new());
        let pools = fake_pools(&config, &fake);
        let settings = ReconcilerSettings {
            interval: Duration::from_millis(50),
            bootstrap_timeout: BOOTSTRAP,
            max_lifetime: LIFETIME,
            orphan_grace: GRACE,
            instance_prefix: "grs".into(),
        };
        let reconciler = Reconciler::new(store.clone(), pools.clone(), settings);
        Setup {
            store,
            fake,
            pools,
            reconciler,
        }
    }

    fn spec(job: u64) -> InstanceSpec {
        InstanceSpec {
            name: format!("grs-{job}"),
            pool: "linux".into(),
            job_id: job,
            labels: vec!["self-hosted".into()],
            bootstrap: Bootstrap::None,
        }
    }

    /// Job `job` queued, and its instance recorded and running, at `now`
    /// (as the dispatcher does it).
    async fn provisioned(s: &Setup, job: u64, now: Millis) -> String {
        let r = s
            .store
            .submit_event(
                &event(&format!("q-{job}"), JobAction::Queued, job),
                Some("linux"),
                now,
            )
            .await
            .unwrap();
        assert_eq!(r.outcome, SubmitOutcome::Accepted);
        let name = format!("grs-{job}");
        let limits = s.pools.get("linux").unwrap().limits();
        let begun = s
            .store
            .begin_provision(job, &name, &limits, now)
            .await
            .unwrap();
        assert!(matches!(begun, BeginProvision::Proceed { .. }), "{begun:?}");
        s.store.mark_creating(&name, now).await.unwrap();
        let made = s.fake.create(&spec(job)).await.unwrap();
        s.store
            .finish_provision(job, &name, &made.provider_id, "fake", now)
            .await
            .unwrap();
        name
    }

    /// The runner of `name` took job `job` (an `in_progress` event).
    async fn taken(s: &Setup, name: &str, job: u64, now: Millis) {
        let mut ev = event(&format!("p-{job}"), JobAction::InProgress, job);
        ev.runner_name = name.to_owned();
        ev.runner_id = 7;
        s.store.submit_event(&ev, Some("linux"), now).await.unwrap();
        let inst = s.store.get_instance(name).await.unwrap().unwrap();
        assert_eq!(inst.assigned_job_id, job);
    }

    async fn state(s: &Setup, name: &str) -> (InstanceState, String) {
        let i = s.store.get_instance(name).await.unwrap().unwrap();
        (i.state, i.reason)
    }

    #[tokio::test]
    async fn an_instance_whose_runner_takes_no_job_is_torn_down_after_the_bootstrap_timeout() {
        let mut s = setup();
        let t = 1_000_000;
        let name = provisioned(&s, 1, t).await;
        let r = s.reconciler.reconcile_once(t + 999).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        assert_eq!(state(&s, &name).await.0, InstanceState::Running);

        let r = s.reconciler.reconcile_once(t + 1_000).await.unwrap();
        assert_eq!(r.bootstrap_timed_out, vec![name.clone()]);
        let (st, reason) = state(&s, &name).await;
        assert_eq!(st, InstanceState::PendingDelete);
        assert_eq!(reason, "runner did not take a job within 1s");
        // A second pass (or a second replica) queues nothing more.
        let r = s.reconciler.reconcile_once(t + 1_500).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");

        // The teardown workers take it from there: the VM goes.
        let stop = CancellationToken::new();
        let ctx = WorkerContext {
            store: s.store.clone(),
            pools: s.pools.clone(),
            settings: WorkerSettings::from_config(&test_config().control_plane),
            registrar: None,
            shutdown: stop.clone(),
            metrics: Default::default(),
            github: None,
        };
        let worker = tokio::spawn(crate::teardown::run(ctx, "t-0".into()));
        eventually("the VM deleted", Duration::from_secs(3), || async {
            (!s.fake.exists(&name)).then_some(())
        })
        .await;
        eventually("the instance deleted", Duration::from_secs(3), || async {
            let (st, reason) = state(&s, &name).await;
            (st == InstanceState::Deleted).then_some(reason)
        })
        .await;
        assert_eq!(s.store.pool_in_use("linux").await.unwrap(), 0);
        stop.cancel();
        worker.await.unwrap();
    }

    /// `s`'s reconciler [`run`] as leader "a", its pass held up asking
    /// GitHub (`runners`) about the runner of an instance past its
    /// bootstrap timeout for ten lease TTLs (paused time).
    /// Returns once the pass asks: the instance's name, the lease TTL, how
    /// long the answer takes, the stop token and the task.
    async fn leader_in_a_slow_pass(
        s: &mut Setup,
        runners: &Arc<FakeRegistrar>,
    ) -> (
        String,
        Duration,
        Duration,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let settings = s.reconciler.settings.clone();
        let fresh = Reconciler::new(s.store.clone(), s.pools.clone(), settings);
        let reconciler = std::mem::replace(&mut s.reconciler, fresh);
        let ttl = reconciler.settings.lease_ttl();
        let slow = ttl * 10;
        // Past the bootstrap timeout, not yet at the maximum lifetime.
        let name = provisioned(s, 1, now_ms() - 2 * millis(BOOTSTRAP)).await;
        runners.set_busy_delay(slow);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(reconciler, "a".into(), stop.clone()));
        eventually("the pass asks GitHub", Duration::from_secs(1), || async {
            runners.asked().contains(&name).then_some(())
        })
        .await;
        (name, ttl, slow, stop, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_keeps_its_lease_through_a_pass_longer_than_the_lease() {
        let (mut s, runners) = setup_with_registrar();
        let (name, ttl, slow, stop, task) = leader_in_a_slow_pass(&mut s, &runners).await;
        // Well past the lease's TTL, the pass still running: the leader
        // renewed, so no other replica can take the lease.
        tokio::time::sleep(ttl * 4).await;
        assert!(
            !s.store.acquire_lease(LEASE, "b", ttl).await.unwrap(),
            "the lease lapsed during the pass"
        );
        // The pass ends holding the lease, so it makes its change.
        eventually("the teardown queued", slow * 2, || async {
            (state(&s, &name).await.0 == InstanceState::PendingDelete).then_some(())
        })
        .await;
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_lost_its_lease_mid_pass_makes_no_more_changes() {
        let (mut s, runners) = setup_with_registrar();
        let (name, _, slow, stop, task) = leader_in_a_slow_pass(&mut s, &runners).await;
        // Another replica takes the lease over mid-pass (as after a stall
        // of "a" longer than the TTL).
        assert!(s.store.release_lease(LEASE, "a").await.unwrap());
        assert!(s.store.acquire_lease(LEASE, "b", slow * 10).await.unwrap());
        // Paused time only moves on when every task waits: once it is past
        // the slow answer, "a" has done all it was going to do with it.
        tokio::time::sleep(slow * 2).await;
        assert_eq!(
            state(&s, &name).await.0,
            InstanceState::Running,
            "the replica that lost the lease still queued a teardown"
        );
        stop.cancel();
        task.await.unwrap();
    }

    /// The store cannot be reached while a pass runs (Redis down, a
    /// partition): the renewals fail, and the pass is stopped when the
    /// fence closes: not at the first failed renewal (one may yet get
    /// through), and not never (another replica may take the lease once it
    /// expires).
    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_reach_the_store_stops_its_pass_when_the_fence_closes() {
        // Nothing listens on port 1: every lease renewal fails.
        let store = crate::store::RedisStore::new(
            "redis://127.0.0.1:1",
            crate::store::RedisStoreOptions::default(),
        )
        .unwrap();
        let settings = ReconcilerSettings::from_config(&test_config().control_plane);
        let fence = Fence::default();
        let start = tokio::time::Instant::now();
        fence.hold_until(start + settings.fence_span());
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let work = {
            let finished = finished.clone();
            let long = settings.lease_ttl() * 10;
            async move {
                tokio::time::sleep(long).await;
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, LeaseLost>(())
            }
        };
        let r = keeping_lease(&store, "a", &settings, &fence, work).await;
        let stopped = start.elapsed();
        assert_eq!(r, Err(LeaseLost));
        assert!(!finished.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(fence.check(), Err(LeaseLost), "the fence stays closed");
        assert!(
            stopped >= settings.fence_span(),
            "stopped after {stopped:?}, before the fence closed ({:?}): a failed renewal is not a lost lease",
            settings.fence_span()
        );
        assert!(
            stopped < settings.lease_ttl(),
            "stopped after {stopped:?}, not before the lease could expire ({:?})",
            settings.lease_ttl()
        );
    }

    #[test]
    fn a_fence_closes_at_its_deadline_and_when_revoked() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let fence = Fence::default();
            assert_eq!(fence.check(), Ok(()), "an unarmed fence holds");
            fence.hold_until(tokio::time::Instant::now() + Duration::from_millis(100));
            assert_eq!(fence.check(), Ok(()));
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!(fence.check(), Err(LeaseLost));
            fence.hold_until(tokio::time::Instant::now() + Duration::from_millis(100));
            fence.revoke();
            assert_eq!(fence.check(), Err(LeaseLost));
        });
    }

    #[tokio::test]
    async fn a_busy_runner_whose_in_progress_webhook_was_lost_is_not_torn_down() {
        let (mut s, runners) = setup_with_registrar();
        let t = 1_000_000;
        let busy = provisioned(&s, 11, t).await;
        let unsure = provisioned(&s, 12, t).await;
        let idle = provisioned(&s, 13, t).await;
        runners.set_busy(&busy, true);
        runners.fail_busy(&unsure, "GitHub answered 502");
        let r = s.reconciler.reconcile_once(t + 1_000).await.unwrap();
        assert_eq!(r.bootstrap_timed_out, vec![idle.clone()], "{r:?}");
        assert_eq!(r.busy_kept, vec![busy.clone()], "{r:?}");
        assert_eq!(r.failures.len(), 1, "{r:?}");
        assert_eq!(state(&s, &busy).await.0, InstanceState::Running);
        assert_eq!(state(&s, &unsure).await.0, InstanceState::Running);
        assert_eq!(state(&s, &idle).await.0, InstanceState::PendingDelete);
        // The maximum lifetime ends even a busy runner's instance.
        let r = s.reconciler.reconcile_once(t + 5_000).await.unwrap();
        let mut ended = r.lifetime_ended.clone();
        ended.sort();
        assert_eq!(ended, vec![busy.clone(), unsure.clone()], "{r:?}");
    }

    /// Seen failing before orphans were asked about: grs-14 was deleted
    /// with a job on it.
    #[tokio::test]
    async fn an_orphan_whose_runner_is_busy_is_kept_until_github_says_it_is_idle() {
        let (mut s, runners) = setup_with_registrar();
        let t = now_ms();
        // A VM of ours the store has no record of (a wiped Redis, say)
        // whose runner runs a job.
        s.fake.create(&spec(14)).await.unwrap();
        runners.set_busy("grs-14", true);
        let r = s.reconciler.reconcile_once(t + 2_500).await.unwrap();
        assert_eq!(r.busy_kept, vec!["grs-14".to_owned()], "{r:?}");
        assert!(r.orphans_deleted.is_empty(), "{r:?}");
        assert!(s.fake.exists("grs-14"));
        runners.clear_busy("grs-14");
        let r = s.reconciler.reconcile_once(t + 3_000).await.unwrap();
        assert_eq!(r.orphans_deleted, vec!["grs-14".to_owned()], "{r:?}");
        assert!(!s.fake.exists("grs-14"));
    }

    #[tokio::test]
    async fn an_instance_whose_runner_took_a_job_lives_until_its_maximum_lifetime() {
        let mut s = setup();
        let t = 1_000_000;
        let name = provisioned(&s, 2, t).await;
        taken(&s, &name, 2, t + 10).await;
        let r = s.reconciler.reconcile_once(t + 4_999).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        assert_eq!(state(&s, &name).await.0, InstanceState::Running);

        let r = s.reconciler.reconcile_once(t + 5_000).await.unwrap();
        assert_eq!(r.lifetime_ended, vec![name.clone()]);
        assert!(r.bootstrap_timed_out.is_empty(), "{r:?}");
        let (st, reason) = state(&s, &name).await;
        assert_eq!(st, InstanceState::PendingDelete);
        assert_eq!(reason, "instance reached its maximum lifetime of 5s");
    }

    #[tokio::test]
    async fn instances_still_being_created_are_never_timed_out() {
        let mut s = setup();
        let t = 1_000_000;
        s.store
            .submit_event(&event("q-3", JobAction::Queued, 3), Some("linux"), t)
            .await
            .unwrap();
        let limits = s.pools.get("linux").unwrap().limits();
        s.store
            .begin_provision(3, "grs-3", &limits, t)
            .await
            .unwrap();
        s.store.mark_creating("grs-3", t).await.unwrap();
        let r = s.reconciler.reconcile_once(t + 60_000).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        assert_eq!(state(&s, "grs-3").await.0, InstanceState::Creating);
    }

    #[tokio::test]
    async fn an_orphan_vm_is_deleted_after_the_grace_period_and_a_recorded_one_is_not() {
        let mut s = setup();
        let t = now_ms();
        let recorded = provisioned(&s, 4, t).await;
        taken(&s, &recorded, 4, t).await;
        // Made behind GRS's back (or its record was lost): ours by marker,
        // unknown to the store.
        s.fake.create(&spec(5)).await.unwrap();
        // Someone else's VM with a name of ours: never listed, never touched.
        s.fake.add_foreign("grs-6");

        let r = s.reconciler.reconcile_once(t + 1_000).await.unwrap();
        assert_eq!(r.orphans_waiting, vec!["grs-5".to_owned()]);
        assert!(r.orphans_deleted.is_empty(), "{r:?}");
        assert!(s.fake.exists("grs-5"));

        // Slack for the fake's own clock, read a moment after `t`.
        let r = s.reconciler.reconcile_once(t + 2_500).await.unwrap();
        assert_eq!(r.orphans_deleted, vec!["grs-5".to_owned()]);
        assert!(!s.fake.exists("grs-5"));
        assert!(s.fake.exists(&recorded), "a recorded VM was deleted");
        assert_eq!(state(&s, &recorded).await.0, InstanceState::Running);
        assert!(s.fake.exists("grs-6"), "a foreign VM was deleted");
    }

    #[tokio::test]
    async fn a_vm_whose_record_says_deleted_is_an_orphan() {
        let mut s = setup();
        let t = now_ms();
        let name = provisioned(&s, 7, t).await;
        // The record says deleted but the VM is still there (a create that
        // finished after its teardown, say).
        s.store.begin_teardown(&name, t).await.unwrap();
        s.store
            .finish_teardown(&name, "", Duration::from_secs(60), t)
            .await
            .unwrap();
        let r = s.reconciler.reconcile_once(t + 2_500).await.unwrap();
        assert_eq!(r.orphans_deleted, vec![name.clone()]);
        assert!(!s.fake.exists(&name));
    }

    #[tokio::test]
    async fn an_orphan_of_unknown_age_is_deleted_only_once_seen_for_the_grace_period() {
        let mut s = setup();
        s.fake.create(&spec(8)).await.unwrap();
        s.fake.set_created_at("grs-8", None);
        let t = 1_000_000;
        // However late the first sighting, it is only the first.
        let r = s.reconciler.reconcile_once(t).await.unwrap();
        assert_eq!(r.orphans_waiting, vec!["grs-8".to_owned()]);
        let r = s.reconciler.reconcile_once(t + 1_999).await.unwrap();
        assert_eq!(r.orphans_waiting, vec!["grs-8".to_owned()]);
        assert!(s.fake.exists("grs-8"));
        let r = s.reconciler.reconcile_once(t + 2_000).await.unwrap();
        assert_eq!(r.orphans_deleted, vec!["grs-8".to_owned()]);
        assert!(!s.fake.exists("grs-8"));
    }

    #[tokio::test]
    async fn a_failing_orphan_delete_is_reported_and_retried_next_pass() {
        let mut s = setup();
        let t = now_ms();
        s.fake.create(&spec(9)).await.unwrap();
        s.fake.fail_next_deletes(1);
        let r = s.reconciler.reconcile_once(t + 2_500).await.unwrap();
        assert_eq!(r.failures.len(), 1, "{r:?}");
        assert!(s.fake.exists("grs-9"));
        let r = s.reconciler.reconcile_once(t + 3_000).await.unwrap();
        assert_eq!(r.orphans_deleted, vec!["grs-9".to_owned()]);
    }

    #[tokio::test]
    async fn the_control_plane_runs_the_reconciler_and_its_teardowns() {
        use crate::testing::{RunningControlPlane, control_plane, job_event, submit};
        use grs_proto::v1 as pb;

        let mut config = test_config();
        config.control_plane.reconcile_interval = Duration::from_millis(50);
        config.control_plane.bootstrap_timeout = Duration::from_millis(300);
        let fake = Arc::new(FakeProvisioner::new());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let pools = fake_pools(&config, &fake);
        let cp = RunningControlPlane::start(control_plane(config, store.clone(), pools)).await;
        let mut client = cp.client().await;
        submit(&mut client, job_event("d-1", pb::JobAction::Queued, 11)).await;
        // Created, then (no runner ever takes the job) torn down.
        eventually("the instance made", Duration::from_secs(3), || async {
            (fake.creates() == 1).then_some(())
        })
        .await;
        let inst = eventually("the instance deleted", Duration::from_secs(5), || async {
            let i = store.get_instance("grs-11").await.ok()??;
            (i.state == InstanceState::Deleted).then_some(i)
        })
        .await;
        assert_eq!(inst.reason, "runner did not take a job within 300ms");
        assert_eq!(fake.live(), 0);
        cp.shutdown().await.unwrap();
        // Shutdown released the lease: another replica may take it at once.
        assert!(
            store
                .acquire_lease(LEASE, "next", Duration::from_secs(1))
                .await
                .unwrap()
        );
    }

    /// Warm instance `name` of pool `linux` recorded and running at `now`
    /// (as a warm keeper does it).
    async fn warm(s: &Setup, name: &str, now: Millis) {
        let mut limits = s.pools.get("linux").unwrap().limits();
        limits.min_idle = 3;
        let begun = s
            .store
            .begin_warm("linux", name, &limits, now)
            .await
            .unwrap();
        assert!(
            matches!(begun, crate::store::BeginWarm::Proceed { .. }),
            "{begun:?}"
        );
        s.store
            .finish_provision(0, name, "fake/w", "fake", now)
            .await
            .unwrap();
    }

    fn warm_config(min_idle: u32, idle_max_age: Duration) -> crate::config::Config {
        let mut config = test_config();
        let linux = config.pools.get_mut("linux").unwrap();
        linux.min_idle = min_idle;
        linux.idle_max_age = idle_max_age;
        config
    }

    #[tokio::test]
    async fn an_idle_warm_instance_is_recycled_at_idle_max_age_not_at_the_bootstrap_timeout() {
        let mut s = setup_with(warm_config(1, Duration::from_millis(3_000)));
        let t = 1_000_000;
        warm(&s, "grs-wa", t).await;
        let r = s.reconciler.reconcile_once(t + 2_999).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        let r = s.reconciler.reconcile_once(t + 3_000).await.unwrap();
        assert_eq!(r.warm_recycled, vec!["grs-wa".to_owned()], "{r:?}");
        let (st, reason) = state(&s, "grs-wa").await;
        assert_eq!(st, InstanceState::PendingDelete);
        assert_eq!(
            reason,
            "idle warm instance recycled at its pool's idle_max_age of 3s"
        );
    }

    #[tokio::test]
    async fn idle_warm_instances_above_min_idle_are_torn_down_oldest_first() {
        let mut s = setup_with(warm_config(3, Duration::from_secs(3600)));
        let t = 1_000_000;
        warm(&s, "grs-wa", t).await;
        warm(&s, "grs-wb", t + 1).await;
        warm(&s, "grs-wc", t + 2).await;
        let r = s.reconciler.reconcile_once(t + 10).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        // An operator lowers min_idle on any replica: the store says so.
        s.store
            .update_pool_overrides(
                "linux",
                &crate::model::PoolOverrides {
                    min_idle: Some(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let r = s.reconciler.reconcile_once(t + 20).await.unwrap();
        assert_eq!(
            r.warm_surplus,
            vec!["grs-wa".to_owned(), "grs-wb".to_owned()]
        );
        assert_eq!(s.store.pool_warm("linux").await.unwrap(), ["grs-wc"]);
        let r = s.reconciler.reconcile_once(t + 30).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
    }

    #[tokio::test]
    async fn a_warm_instance_nobody_finishes_making_is_torn_down_after_the_bootstrap_timeout() {
        let mut s = setup_with(warm_config(1, Duration::from_secs(3600)));
        let t = 1_000_000;
        let limits = s.pools.get("linux").unwrap().limits();
        s.store
            .begin_warm("linux", "grs-wa", &limits, t)
            .await
            .unwrap();
        s.store.mark_creating("grs-wa", t).await.unwrap();
        let r = s.reconciler.reconcile_once(t + 999).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        let r = s.reconciler.reconcile_once(t + 1_000).await.unwrap();
        assert_eq!(r.bootstrap_timed_out, vec!["grs-wa".to_owned()], "{r:?}");
        assert!(s.store.pool_warm("linux").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_warm_instance_given_a_job_gets_the_whole_bootstrap_timeout_from_then() {
        let mut s = setup_with(warm_config(1, Duration::from_secs(3600)));
        let t = 1_000_000;
        warm(&s, "grs-wa", t).await;
        s.store
            .submit_event(&event("q-20", JobAction::Queued, 20), Some("linux"), t)
            .await
            .unwrap();
        let limits = s.pools.get("linux").unwrap().limits();
        let bound = t + 2_000;
        let r = s
            .store
            .begin_provision(20, "grs-20", &limits, bound)
            .await
            .unwrap();
        assert!(matches!(r, BeginProvision::Warm { .. }), "{r:?}");
        let r = s.reconciler.reconcile_once(bound + 999).await.unwrap();
        assert!(r.is_quiet(), "{r:?}");
        let r = s.reconciler.reconcile_once(bound + 1_000).await.unwrap();
        assert_eq!(r.bootstrap_timed_out, vec!["grs-wa".to_owned()], "{r:?}");
    }

    #[tokio::test]
    async fn offline_runner_registrations_of_no_live_instance_are_removed_within_budget() {
        let (mut s, runners) = setup_with_registrar();
        let t = 1_000_000;
        let live = provisioned(&s, 30, t).await;
        runners.add_offline(RunnerRegistration {
            id: 1,
            name: live.clone(),
            busy: false,
        });
        for i in 0..OFFLINE_RUNNER_BUDGET as u64 + 2 {
            runners.add_offline(RunnerRegistration {
                id: 100 + i,
                name: format!("grs-{}", 100 + i),
                busy: false,
            });
        }
        let r = s.reconciler.reconcile_once(t + 10).await.unwrap();
        assert_eq!(
            r.offline_runners_removed.len(),
            OFFLINE_RUNNER_BUDGET,
            "{r:?}"
        );
        assert!(!r.offline_runners_removed.contains(&live), "{r:?}");
        let r = s.reconciler.reconcile_once(t + 20).await.unwrap();
        assert_eq!(r.offline_runners_removed.len(), 2, "{r:?}");
        assert_eq!(runners.removed_ids().len(), OFFLINE_RUNNER_BUDGET + 2);
        assert_eq!(
            runners.prefixes().last().unwrap(),
            "grs-",
            "only this installation's names are listed"
        );
    }

    #[tokio::test]
    async fn instances_and_vms_of_a_pool_removed_from_the_configuration_are_removed() {
        let old = setup();
        let t = now_ms();
        let name = provisioned(&old, 40, t).await;
        // The configuration no longer has pool linux; another pool uses
        // the same backend.
        let mut config = test_config();
        let linux = config.pools.remove("linux").unwrap();
        config.pools.insert("arm".into(), linux);
        let pools = fake_pools(&config, &old.fake);
        let mut r = Reconciler::new(
            old.store.clone(),
            pools.clone(),
            old.reconciler.settings.clone(),
        );
        let report = r.reconcile_once(t + 10).await.unwrap();
        assert_eq!(report.removed_pool_vms, vec![name.clone()], "{report:?}");
        assert!(!old.fake.exists(&name));
        assert_eq!(state(&old, &name).await.0, InstanceState::PendingDelete);
        // Its teardown records it deleted without a provisioner.
        let stop = CancellationToken::new();
        let ctx = WorkerContext {
            store: old.store.clone(),
            pools,
            settings: WorkerSettings::from_config(&test_config().control_plane),
            registrar: None,
            shutdown: stop.clone(),
            metrics: Default::default(),
            github: None,
        };
        let worker = tokio::spawn(crate::teardown::run(ctx, "t-0".into()));
        eventually("the record deleted", Duration::from_secs(3), || async {
            let (st, reason) = state(&old, &name).await;
            (st == InstanceState::Deleted).then_some(reason)
        })
        .await;
        stop.cancel();
        worker.await.unwrap();
    }

    /// Seen failing before removed pools were asked about: grs-41's VM was
    /// removed with a job on it.
    #[tokio::test]
    async fn a_removed_pools_vms_stay_while_a_runner_of_it_is_busy() {
        let old = setup();
        let t = now_ms();
        let name = provisioned(&old, 41, t).await;
        let mut config = test_config();
        let linux = config.pools.remove("linux").unwrap();
        config.pools.insert("arm".into(), linux);
        let runners = Arc::new(FakeRegistrar::default());
        runners.set_busy(&name, true);
        let mut r = Reconciler::new(
            old.store.clone(),
            fake_pools(&config, &old.fake),
            old.reconciler.settings.clone(),
        )
        .with_registrar(Some(runners.clone()));
        let report = r.reconcile_once(t + 10).await.unwrap();
        assert_eq!(report.busy_kept, vec![name.clone()], "{report:?}");
        assert!(report.removed_pool_vms.is_empty(), "{report:?}");
        assert!(old.fake.exists(&name));
        assert_eq!(state(&old, &name).await.0, InstanceState::Running);
        runners.clear_busy(&name);
        let report = r.reconcile_once(t + 20).await.unwrap();
        assert_eq!(report.removed_pool_vms, vec![name.clone()], "{report:?}");
        assert!(!old.fake.exists(&name));
    }

    #[test]
    fn the_lease_lasts_three_intervals() {
        let s = ReconcilerSettings::from_config(&test_config().control_plane);
        assert_eq!(s.lease_ttl(), Duration::from_secs(90));
    }
}
