//! Warm keepers: keep each pool's warm pool at its `min_idle`.
//!
//! A warm instance is made for no job: it boots, its runner registers with
//! the pool's labels (a just-in-time runner like any other, bound to no
//! job), and it waits. GitHub hands a queued job to any idle runner whose
//! labels match, so a warm runner starts the job at once, without waiting
//! for a clone. The store keeps the pool's idle warm instances as its warm
//! set ([`rules::is_warm_idle`](crate::store::rules::is_warm_idle)).
//!
//! # Expected flow
//! 1. Every replica runs one keeper per pool. It asks the store to
//!    [`begin_warm`](crate::store::Store::begin_warm) a new instance
//!    `<prefix>-w<random>`: granted only while the warm set is smaller than
//!    `min_idle` (the live override, else the configuration), the pool is
//!    not paused and has a free slot; the slot is taken and the instance
//!    counted in the same atomic step.
//! 2. It makes the instance like a dispatcher does
//!    ([`dispatcher::create`](crate::dispatcher::create)), then records it
//!    running ([`finish_provision`](crate::store::Store::finish_provision),
//!    job 0), or failed and queued for teardown
//!    ([`fail_provision`](crate::store::Store::fail_provision)).
//! 3. When the warm pool is full (or the pool full or paused), it looks
//!    again after [`WARM_POLL`]: a job taking a warm runner, a recycled or
//!    failed one, or an `UpdatePool` raising `min_idle` (on any replica) is
//!    seen within that.
//!
//! Where warm instances go: a queued job is bound to an idle one instead of
//! a new clone ([`begin_provision`](crate::store::Store::begin_provision));
//! a job whose `in_progress` (or `completed`) names one is bound to it, and
//! the job's own instance, if any, takes its place in the warm pool; the
//! [reconciler](crate::reconciler) recycles idle ones older than the pool's
//! `idle_max_age` and tears down the surplus above `min_idle`.
//!
//! # Guarantees
//! - **Bounded.** Never more than `max_instances` per pool (the slot is
//!   taken in step 1), never more than `min_idle` idle warm instances made
//!   by keepers, whatever the number of replicas.
//! - **Not retried in place.** A failed create is cleaned up like a job's
//!   (teardown queue) and the keeper tries again with a new instance after
//!   a capped backoff. A keeper that dies mid-create leaves a warm instance
//!   being created with no one working on it: the reconciler tears it down
//!   once it is `bootstrap_timeout` old.
//! - **Cancellation.** Every `.await` is a cancellation point; at shutdown
//!   a create in flight is dropped (see above).

use std::time::Duration;

use crate::model::now_ms;
use crate::store::BeginWarm;
use crate::worker::{WorkerContext, pause};

/// How often a keeper whose warm pool is full looks again.
pub const WARM_POLL: Duration = Duration::from_secs(1);

/// The name of a new warm instance: `<prefix>-w<12 hex digits>` (random; a
/// job's instance is `<prefix>-<digits>`, so the two never meet).
pub fn warm_instance_name(prefix: &str) -> String {
    format!(
        "{prefix}-w{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

/// Runs the warm keeper of `pool` until shutdown.
pub async fn run(ctx: WorkerContext, pool_name: String) {
    let Some(pool) = ctx.pools.get(&pool_name).cloned() else {
        return;
    };
    let mut failures = 0u32;
    tracing::debug!(pool = %pool_name, "warm keeper started");
    while !ctx.shutdown.is_cancelled() {
        let name = warm_instance_name(&ctx.settings.instance_prefix);
        let begun = ctx
            .store
            .begin_warm(&pool_name, &name, &pool.limits(), now_ms())
            .await;
        let instance = match begun {
            Ok(BeginWarm::Proceed { instance }) => instance,
            Ok(_) => {
                if !pause(&ctx, WARM_POLL).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(pool = %pool_name, error = %e, "cannot reach the store; warm keeper retrying");
                if !pause(&ctx, ctx.settings.backoff(failures.min(6))).await {
                    break;
                }
                continue;
            }
        };
        tracing::info!(pool = %pool_name, instance = %instance.name, "creating a warm instance");
        let started = std::time::Instant::now();
        // No queue entry is held here (the name is this keeper's alone), so
        // the only error is the store's.
        let outcome = match crate::dispatcher::create(&ctx, &pool, &name, 0, None).await {
            Ok(Ok(made)) => ctx
                .store
                .finish_provision(
                    0,
                    &name,
                    &made.provider_id,
                    made.location.as_deref().unwrap_or(""),
                    now_ms(),
                )
                .await
                .map(|_| None)
                .map_err(Into::into),
            Ok(Err(e)) => {
                let why = format!("warm instance not made: {e}");
                ctx.store
                    .fail_provision(0, &name, &why, now_ms())
                    .await
                    .map(|()| Some(why))
                    .map_err(Into::into)
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => {
                failures = 0;
                tracing::info!(pool = %pool_name, instance = %name, took_ms = started.elapsed().as_millis() as u64, "warm instance running");
            }
            Ok(Some(why)) => {
                failures += 1;
                let delay = ctx.settings.backoff(failures.min(6));
                tracing::warn!(pool = %pool_name, instance = %name, reason = why, retry_in_ms = delay.as_millis() as u64, "warm instance failed; queued for teardown");
                if !pause(&ctx, delay).await {
                    break;
                }
            }
            Err(e) => {
                // The instance stays recorded as being created; the
                // reconciler removes it after the bootstrap timeout.
                failures += 1;
                tracing::warn!(pool = %pool_name, instance = %name, error = %e, "store error while making a warm instance");
                if !pause(&ctx, ctx.settings.backoff(failures.min(6))).await {
                    break;
                }
            }
        }
    }
    tracing::debug!(pool = %pool_name, "warm keeper stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_names_are_instance_names_that_no_job_id_makes() {
        let n = warm_instance_name("grs");
        grs_provisioner::validate_instance_name(&n).unwrap();
        assert!(
            n.starts_with("grs-w") && n.len() == "grs-w".len() + 12,
            "{n}"
        );
        assert_ne!(n, warm_instance_name("grs"));
    }
}
