//! Teardown workers: destroy instances whose job is done (or that an
//! operator deleted, or whose creation failed) and free their capacity.
//!
//! # Expected flow
//! 1. Take the next entry of the teardown queue.
//! 2. **No runner killed mid-job.** Unless the instance's runner ran a job
//!    that has completed (the usual teardown), ask GitHub whether the runner
//!    is busy: a job cancelled before pickup, a bootstrap timeout, an idle
//!    warm instance scaled down or recycled, a maximum lifetime, or an
//!    operator's delete may meet a runner that has just taken a job whose
//!    `in_progress` has not arrived; so may a failed create (or start
//!    poll) that left a VM behind. A busy runner's teardown is called off
//!    ([`call_off_teardown`](crate::store::Store::call_off_teardown), the
//!    reason recorded): the instance goes when that job completes, or when
//!    the reconciler next finds it due and GitHub says it is idle. When
//!    GitHub cannot be asked the teardown waits and asks again; without a
//!    `[github]` section nothing is asked.
//! 3. [`begin_teardown`](crate::store::Store::begin_teardown) moves the
//!    instance to deleting (nothing to do if it is already deleted, or its
//!    teardown was called off).
//! 4. The pool's provisioner stops and deletes the VM (absent is success).
//!    An instance of a pool no longer configured is only recorded deleted:
//!    the reconciler removes that pool's VMs
//!    ([`remove_all`](grs_provisioner::Provisioner::remove_all)).
//! 5. Any runner registration left behind on GitHub is removed (best effort:
//!    GitHub drops ephemeral runners itself once they ran their job).
//! 6. [`finish_teardown`](crate::store::Store::finish_teardown) records the
//!    instance deleted and frees its slot in the same atomic step; then the
//!    entry is acknowledged.
//!
//! # Guarantees
//! - **Nothing leaked.** The entry is acknowledged only once the backend
//!   says the VM is gone; failures are retried with backoff for as long as it
//!   takes, and recorded on the instance for operators to see.
//! - **Nothing foreign touched.** The provisioner refuses VMs without this
//!   installation's marker; such a refusal ends the teardown (the slot is
//!   freed, the VM left alone, the reason recorded).
//! - **Idempotent.** Redoing any step after a crash is harmless.

use grs_provisioner::ProvisionerError;

use crate::model::{InstanceRecord, InstanceState, JobState, now_ms};
use crate::store::{Delivery, Queue, QueueItem, StoreResult};
use crate::worker::{
    Handled, Hold, WorkError, WorkerContext, run_queue_worker, wait_holding, with_heartbeat,
};

/// Runs one teardown worker until shutdown.
pub async fn run(ctx: WorkerContext, consumer: String) {
    run_queue_worker(ctx, Queue::Teardown, consumer.clone(), move |ctx, d| {
        let consumer = consumer.clone();
        async move { handle(&ctx, &consumer, d).await }
    })
    .await
}

async fn handle(ctx: &WorkerContext, consumer: &str, d: Delivery) -> Result<Handled, WorkError> {
    let queue = Queue::Teardown;
    let QueueItem::Teardown { instance: name } = d.item else {
        tracing::error!(entry = %d.id, item = ?d.item, "not a teardown entry; dropped");
        return Ok(Handled::Done);
    };
    // Two workers deleting one instance is harmless (every step is
    // idempotent): no lease. The heartbeat still stops one that lost the
    // entry.
    let hold = Hold {
        queue: &queue,
        consumer,
        id: &d.id,
        lease: None,
    };
    let mut attempt = 0u32;
    loop {
        match runner_check(ctx, &name).await? {
            RunnerCheck::Clear => {}
            RunnerCheck::Busy => {
                let why = "teardown called off: GitHub says its runner is busy with a job \
                           (it goes once that job completes)";
                if ctx.store.call_off_teardown(&name, why, now_ms()).await? {
                    tracing::warn!(instance = %name, "runner busy; teardown called off");
                }
                return Ok(Handled::Done);
            }
            RunnerCheck::Unknown(e) => {
                let delay = ctx.settings.backoff(attempt);
                attempt += 1;
                let reason = format!(
                    "teardown waits: cannot ask GitHub whether its runner is busy (attempt {attempt}): {e}"
                );
                tracing::warn!(instance = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot ask whether the runner is busy; retrying");
                ctx.store
                    .note_instance_error(&name, &reason, now_ms())
                    .await?;
                if !wait_holding(ctx, hold, delay).await? {
                    return Ok(Handled::Released);
                }
                continue;
            }
        }
        let Some(instance) = ctx.store.begin_teardown(&name, now_ms()).await? else {
            tracing::debug!(instance = %name, "already deleted");
            return Ok(Handled::Done);
        };
        let outcome = match ctx.pools.get(&instance.pool) {
            Some(pool) => {
                let started = std::time::Instant::now();
                let r = with_heartbeat(ctx, hold, pool.provisioner.delete(&instance.pool, &name))
                    .await?;
                let backend = pool.provisioner.kind();
                ctx.metrics
                    .provisioner_call(backend, "delete", started.elapsed(), &r);
                r
            }
            None => {
                let reason = format!(
                    "pool {} is no longer configured; its VMs are removed by the reconciler",
                    instance.pool
                );
                tracing::warn!(instance = %name, reason, "instance of a removed pool");
                ctx.store
                    .finish_teardown(&name, &reason, ctx.settings.instance_retention, now_ms())
                    .await?;
                return Ok(Handled::Done);
            }
        };
        match outcome {
            Ok(()) => {
                if let Some(registrar) = &ctx.registrar
                    && let Err(e) = registrar.remove_runner(&name).await
                {
                    tracing::warn!(instance = %name, error = %e, "could not remove the runner registration; it stays listed as an offline runner until removed on GitHub (nothing retries this yet)");
                }
                ctx.store
                    .finish_teardown(&name, "", ctx.settings.instance_retention, now_ms())
                    .await?;
                tracing::info!(instance = %name, pool = %instance.pool, "instance deleted");
                // completed → deleted: the job its runner ran ended when
                // that job's record last changed (completed is final).
                if instance.assigned_job_id != 0
                    && let Ok(Some(job)) = ctx.store.get_job(instance.assigned_job_id).await
                    && job.state == crate::model::JobState::Completed
                {
                    ctx.metrics.stage(
                        &instance.pool,
                        crate::metrics::STAGE_COMPLETED_TO_DELETED,
                        job.updated_at,
                        now_ms(),
                    );
                }
                return Ok(Handled::Done);
            }
            Err(e @ ProvisionerError::NotOwned { .. }) => {
                // Ours by name only: someone else's VM. Leave it; free the slot.
                let reason = format!("not deleted: {e}");
                tracing::error!(instance = %name, reason, "refusing to delete a foreign VM");
                ctx.store
                    .finish_teardown(&name, &reason, ctx.settings.instance_retention, now_ms())
                    .await?;
                return Ok(Handled::Done);
            }
            Err(e) => {
                let delay = ctx.settings.backoff(attempt);
                attempt += 1;
                let reason = format!("delete failed (attempt {attempt}): {e}");
                tracing::warn!(instance = %name, error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "delete failed; retrying");
                ctx.store
                    .note_instance_error(&name, &reason, now_ms())
                    .await?;
                if !wait_holding(ctx, hold, delay).await? {
                    return Ok(Handled::Released);
                }
            }
        }
    }
}

/// What GitHub says of the runner of an instance queued for teardown.
enum RunnerCheck {
    /// Tear it down: its job completed, GitHub says it is not busy, or
    /// there is no GitHub to ask.
    Clear,
    /// GitHub says it runs a job.
    Busy,
    /// GitHub could not be asked.
    Unknown(crate::worker::RegistrarError),
}

/// Asks GitHub whether the runner of `name` is busy, unless the teardown
/// is the completion of the job the runner ran (or there is nothing left
/// to decide: the instance is gone, being deleted, or not queued).
async fn runner_check(ctx: &WorkerContext, name: &str) -> StoreResult<RunnerCheck> {
    let Some(registrar) = &ctx.registrar else {
        return Ok(RunnerCheck::Clear);
    };
    let Some(inst) = ctx.store.get_instance(name).await? else {
        return Ok(RunnerCheck::Clear);
    };
    // An instance with no VM recorded made (its create failed, or its
    // start poll did) is asked about too: the VM may exist all the same,
    // and its runner, registered when the create began, may have taken a
    // job.
    if inst.state != InstanceState::PendingDelete || ran_its_job(ctx, &inst).await? {
        return Ok(RunnerCheck::Clear);
    }
    Ok(match registrar.runner_busy(name).await {
        Ok(Some(true)) => RunnerCheck::Busy,
        Ok(_) => RunnerCheck::Clear,
        Err(e) => RunnerCheck::Unknown(e),
    })
}

/// Whether the runner of `inst` took a job that has completed: a JIT
/// runner runs one job, so it has nothing left to run.
async fn ran_its_job(ctx: &WorkerContext, inst: &InstanceRecord) -> StoreResult<bool> {
    if inst.assigned_job_id == 0 {
        return Ok(false);
    }
    Ok(ctx
        .store
        .get_job(inst.assigned_job_id)
        .await?
        .is_some_and(|j| j.state == JobState::Completed))
}
