//! The dispatcher: turns a queued job into a running instance.
//!
//! # Expected flow
//! 1. Take the next entry of the pool's provision queue (or one a dead worker
//!    left behind), then the instance's create fence (a lease named
//!    `create:<instance>`); while another worker holds it, wait.
//! 2. With `[github]` configured, ask GitHub whether the job still waits for
//!    a runner ([`GitHubJobs::check`](crate::github::GitHubJobs::check),
//!    budgeted): if a runner took it or it completed, that is recorded as
//!    an event (the rules then decide; a completed job gets no instance)
//!    and step 3 skips it. Asked again before a retry or after a wait
//!    longer than [`STATUS_RECHECK`](crate::github::STATUS_RECHECK).
//! 3. [`begin_provision`](crate::store::Store::begin_provision): the job must
//!    still want an instance. An idle warm instance of the pool, if there is
//!    one, is bound to the job and nothing is made (its runner takes the
//!    job; the [warm keepers](crate::warm) refill the warm pool). Otherwise
//!    the pool must be neither paused nor full; the capacity slot and the
//!    instance record `<prefix>-<job id>` are taken in the same atomic step.
//!    A paused or full pool keeps the entry (and its place) and the worker
//!    waits.
//! 4. Issue a bootstrap token, ask the provisioner to create the instance,
//!    heartbeat the entry while it works.
//! 5. [`finish_provision`](crate::store::Store::finish_provision), then
//!    acknowledge the entry.
//!
//! # Guarantees
//! - **At least once, idempotent.** A worker that dies anywhere leaves its
//!   entry pending; another claims it after the claim timeout and repeats
//!   from step 2, which takes no second slot, and the provisioner's create is
//!   idempotent by name.
//! - **One worker per entry, one create per instance.** A worker taken for
//!   dead while it was only slow (heartbeats later than the claim timeout)
//!   learns of it at its next heartbeat, which no longer takes the entry
//!   back, and stops: it creates nothing more and acknowledges nothing (the
//!   store's [`touch`](crate::store::Store::touch) and
//!   [`ack`](crate::store::Store::ack) act only for the entry's holder). It
//!   also asks right before calling the provisioner. The create fence,
//!   renewed with the entry, keeps two workers holding the same job (that
//!   one, or a job queued twice) from making the instance at once.
//! - **Bounded.** Capacity is only ever taken in step 3, atomically.
//! - **A failure is not the end of a job GitHub still has queued.** Every
//!   failed create ([`retried`]: all but a foreign VM holding the
//!   instance's name) and every lost worker is retried, with capped
//!   backoff, for as long as the job still wants an instance, up to
//!   `retry_deadline` after the instance was first recorded (and, when
//!   set, `max_attempts` attempts); then the job fails with the reason (and
//!   the instance's cleanup is queued, which frees its slot). A PVE
//!   template under backup or a node rebooting takes minutes, not the
//!   seconds a few attempts would wait; a template deleted by mistake or a
//!   revoked API token ("permanent" errors) are mended by an operator
//!   while the job waits on GitHub, so they are retried too. While it retries, the job's
//!   `reason` says why it waits (the last error, the next attempt, the
//!   deadline), and each retry first asks GitHub (step 2): a job GitHub no
//!   longer has queued stops being retried.
//! - **Cancellation.** Every `.await` is a cancellation point. Shutdown stops
//!   the wait for capacity at once (the entry stays pending); a create in
//!   flight gets the shutdown grace period, then is dropped: its entry is
//!   redone elsewhere.

use grs_provisioner::{
    Bootstrap, BootstrapKind, Instance, InstanceSpec, InstanceState, ProvisionerError,
};

use crate::bootstrap;
use crate::guest_agent;
use crate::model::now_ms;
use crate::pools::Pool;
use crate::store::{BeginProvision, Delivery, Queue, QueueItem, StoreResult};
use crate::worker::{
    Handled, Hold, WorkError, WorkerContext, heartbeat, run_queue_worker, wait_holding,
    with_heartbeat,
};

/// How long a worker waits before asking again for room in a full or paused
/// pool.
const CAPACITY_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Most dispatcher workers one pool gets when their number is automatic.
const MAX_AUTO_WORKERS: usize = 64;

/// How many dispatcher workers `pool` gets: `configured`, or, when that is
/// 0 (automatic, the default), one per instance the pool may have (at most
/// [`MAX_AUTO_WORKERS`]). Creates then run as concurrently as the pool's
/// capacity allows, and the backend limits what it sends on to the
/// hypervisor by what that can take (the Proxmox provisioner sizes its own
/// clone concurrency from how long clones take); a constant here would cap
/// a burst below what the cluster could do.
pub fn workers_for(configured: usize, pool: &crate::pools::Pool) -> usize {
    if configured > 0 {
        return configured;
    }
    (pool.config.max_instances as usize).clamp(1, MAX_AUTO_WORKERS)
}

/// Runs one dispatcher worker for `pool` until shutdown.
pub async fn run(ctx: WorkerContext, pool: String, consumer: String) {
    run_queue_worker(
        ctx,
        Queue::Provision(pool.clone()),
        consumer.clone(),
        move |ctx, d| {
            let (pool, consumer) = (pool.clone(), consumer.clone());
            async move { handle(&ctx, &pool, &consumer, d).await }
        },
    )
    .await
}

/// The lease that fences the create of instance `name`: a dispatcher
/// holds it from before [`begin_provision`](crate::store::Store::begin_provision)
/// until it is done with the entry, renewed with every heartbeat, so two
/// workers that both think they hold the job (one was taken for dead, or
/// the job was queued twice) never make the instance at the same time.
fn create_fence(name: &str) -> String {
    format!("create:{name}")
}

async fn handle(
    ctx: &WorkerContext,
    pool_name: &str,
    consumer: &str,
    d: Delivery,
) -> Result<Handled, WorkError> {
    let queue = Queue::Provision(pool_name.to_owned());
    let QueueItem::Provision { job_id } = d.item else {
        tracing::error!(%queue, entry = %d.id, item = ?d.item, "not a provision entry; dropped");
        return Ok(Handled::Done);
    };
    let Some(pool) = ctx.pools.get(pool_name) else {
        // The pool was removed from the configuration: its jobs cannot run.
        let reason = format!("pool {pool_name} is no longer configured");
        ctx.store
            .fail_provision(
                job_id,
                &grs_provisioner::instance_name(&ctx.settings.instance_prefix, job_id),
                &reason,
                now_ms(),
            )
            .await?;
        return Ok(Handled::Done);
    };
    let name = grs_provisioner::instance_name(&ctx.settings.instance_prefix, job_id);
    let hold = Hold {
        queue: &queue,
        consumer,
        id: &d.id,
        lease: None,
    };
    let fence = create_fence(&name);
    let mut noted = false;
    while !ctx
        .store
        .acquire_lease(&fence, consumer, ctx.settings.claim_timeout)
        .await?
    {
        // Another worker is on this instance: wait for it to finish (the
        // job is then provisioned and there is nothing left to do) or to
        // stop (it lost its entry, or died and its lease ran out).
        if !noted {
            noted = true;
            tracing::info!(job_id, instance = %name, "another worker is making this instance; waiting");
        }
        if !wait_holding(ctx, hold, CAPACITY_POLL).await? {
            return Ok(Handled::Released);
        }
    }
    let fenced = Hold {
        lease: Some(&fence),
        ..hold
    };
    let handled = provision(ctx, pool, job_id, &name, fenced).await;
    // Given up however the work ended (after a loss nothing more is done
    // here); if this fails, the lease runs out after the claim timeout.
    if let Err(e) = ctx.store.release_lease(&fence, consumer).await {
        tracing::warn!(job_id, instance = %name, error = %e, "cannot release the create fence; it runs out after the claim timeout");
    }
    handled
}

/// Steps 2 to 5 for `job_id` in `pool` (instance `name`), holding `hold`
/// and its create fence.
async fn provision(
    ctx: &WorkerContext,
    pool: &Pool,
    job_id: u64,
    name: &str,
    hold: Hold<'_>,
) -> Result<Handled, WorkError> {
    let pool_name = pool.name.as_str();
    let mut last_error = String::from("worker lost while creating (crash or restart)");
    let mut checked_at: Option<tokio::time::Instant> = None;
    let mut noted_waiting = false;
    loop {
        if let Some(gh) = &ctx.github
            && checked_at.is_none_or(|t| t.elapsed() >= crate::github::STATUS_RECHECK)
        {
            checked_at = Some(tokio::time::Instant::now());
            check_github(ctx, gh, job_id, pool_name).await?;
        }
        let attempts = match ctx
            .store
            .begin_provision(job_id, name, &pool.limits(), now_ms())
            .await?
        {
            BeginProvision::Skip(reason) => {
                tracing::info!(job_id, pool = pool_name, reason, "nothing to provision");
                return Ok(Handled::Done);
            }
            BeginProvision::Paused | BeginProvision::NoCapacity if !noted_waiting => {
                noted_waiting = true;
                let why = format!("waiting for room in pool {pool_name} (full or paused)");
                ctx.store.note_job_waiting(job_id, &why, now_ms()).await?;
                continue;
            }
            BeginProvision::Paused | BeginProvision::NoCapacity => {
                if !wait_holding(ctx, hold, CAPACITY_POLL).await? {
                    return Ok(Handled::Released);
                }
                continue;
            }
            BeginProvision::Warm { instance } => {
                tracing::info!(job_id, pool = pool_name, instance = %instance.name, "job given an idle warm instance");
                if noted_waiting {
                    ctx.store.note_job_waiting(job_id, "", now_ms()).await?;
                }
                if let Ok(Some(job)) = ctx.store.get_job(job_id).await {
                    ctx.metrics.stage(
                        pool_name,
                        crate::metrics::STAGE_QUEUED_TO_RUNNING,
                        job.recorded_at,
                        now_ms(),
                    );
                }
                return Ok(Handled::Done);
            }
            BeginProvision::Proceed { attempts, instance } => (attempts, instance.created_at),
        };
        let (attempts, recorded_at) = attempts;
        let deadline = recorded_at.saturating_add(
            i64::try_from(ctx.settings.retry_deadline.as_millis()).unwrap_or(i64::MAX),
        );
        let capped = ctx.settings.max_attempts > 0 && attempts > ctx.settings.max_attempts;
        if capped || (attempts > 1 && now_ms() >= deadline) {
            let reason = if capped {
                format!(
                    "gave up after {} attempts: {last_error}",
                    ctx.settings.max_attempts
                )
            } else {
                format!(
                    "gave up after {} attempts in {}: {last_error}",
                    attempts - 1,
                    humantime::format_duration(ctx.settings.retry_deadline)
                )
            };
            tracing::warn!(job_id, instance = %name, reason, "provisioning failed");
            ctx.store
                .fail_provision(job_id, name, &reason, now_ms())
                .await?;
            return Ok(Handled::Done);
        }
        tracing::info!(job_id, instance = %name, pool = pool_name, attempt = attempts, "creating instance");
        let started = std::time::Instant::now();
        let created = create(ctx, pool, name, job_id, Some(hold)).await?;
        match created {
            Ok(made) => {
                if noted_waiting {
                    ctx.store.note_job_waiting(job_id, "", now_ms()).await?;
                }
                let torn = ctx
                    .store
                    .finish_provision(
                        job_id,
                        name,
                        &made.provider_id,
                        made.location.as_deref().unwrap_or(""),
                        now_ms(),
                    )
                    .await?;
                tracing::info!(job_id, instance = %name, provider_id = %made.provider_id, took_ms = started.elapsed().as_millis() as u64, "instance running");
                if torn {
                    tracing::info!(job_id, instance = %name, "job completed meanwhile; instance queued for teardown");
                }
                // queued → running, from when GRS recorded the job.
                if let Ok(Some(job)) = ctx.store.get_job(job_id).await {
                    ctx.metrics.stage(
                        pool_name,
                        crate::metrics::STAGE_QUEUED_TO_RUNNING,
                        job.recorded_at,
                        now_ms(),
                    );
                }
                return Ok(Handled::Done);
            }
            Err(e)
                if retried(&e)
                    && (ctx.settings.max_attempts == 0 || attempts < ctx.settings.max_attempts)
                    && now_ms() < deadline =>
            {
                let left = std::time::Duration::from_millis(
                    u64::try_from(deadline.saturating_sub(now_ms())).unwrap_or(0),
                );
                let delay = ctx.settings.backoff(attempts - 1).min(left);
                tracing::warn!(job_id, instance = %name, attempt = attempts, error = %e, retry_in_ms = delay.as_millis() as u64, "create failed; retrying");
                last_error = e.to_string();
                let why = format!(
                    "attempt {attempts} failed: {e}; retrying in {}, until {} after it was first tried{}",
                    humantime::format_duration(std::time::Duration::from_secs(
                        delay.as_secs().max(1)
                    )),
                    humantime::format_duration(ctx.settings.retry_deadline),
                    if ctx.github.is_some() {
                        " or GitHub no longer has it queued"
                    } else {
                        ""
                    }
                );
                ctx.store.note_job_waiting(job_id, &why, now_ms()).await?;
                noted_waiting = true;
                // Ask GitHub again before the retry.
                checked_at = None;
                if !wait_holding(ctx, hold, delay).await? {
                    return Ok(Handled::Released);
                }
            }
            Err(e) => {
                let reason = if retried(&e) {
                    format!(
                        "gave up after {attempts} attempts in {}: {e}",
                        humantime::format_duration(std::time::Duration::from_millis(
                            u64::try_from(now_ms().saturating_sub(recorded_at)).unwrap_or(0) / 1000
                                * 1000
                        ))
                    )
                } else {
                    e.to_string()
                };
                tracing::warn!(job_id, instance = %name, reason, "provisioning failed");
                ctx.store
                    .fail_provision(job_id, name, &reason, now_ms())
                    .await?;
                return Ok(Handled::Done);
            }
        }
    }
}

/// Whether a create that failed with `e` is tried again (within the
/// deadline, while the job still wants an instance): every failure but a
/// VM of someone else's holding the instance's name, which GRS never
/// touches and no retry gets past. A "permanent" error (a missing
/// template, bad credentials) passes once an operator mends it, and the
/// job waits on GitHub meanwhile: failing it at the first error left it
/// waiting there with no instance coming.
fn retried(e: &ProvisionerError) -> bool {
    !matches!(e, ProvisionerError::NotOwned { .. })
}

/// Asks GitHub about `job_id` before a VM is spent on it; records what
/// GitHub says if the job moved on (the caller's `begin_provision` then
/// decides). Store errors are the caller's; GitHub's are logged and the job
/// is provisioned unchecked.
async fn check_github(
    ctx: &WorkerContext,
    gh: &crate::github::GitHubJobs,
    job_id: u64,
    pool_name: &str,
) -> StoreResult<()> {
    use crate::github::JobCheck;
    use crate::model::JobState;
    let Some(job) = ctx.store.get_job(job_id).await? else {
        return Ok(());
    };
    // Only a job still waiting for its instance is worth a call.
    if !matches!(job.state, JobState::Queued | JobState::Provisioning) {
        return Ok(());
    }
    match gh.check(&job).await {
        JobCheck::Queued => {
            ctx.metrics.github_status_check("queued");
        }
        JobCheck::Unchecked(why) => {
            ctx.metrics.github_status_check("unchecked");
            tracing::debug!(
                job_id,
                why,
                "job status not checked with GitHub; provisioning"
            );
        }
        JobCheck::Moved(ev) => {
            ctx.metrics.github_status_check("moved");
            let r = ctx
                .store
                .submit_event(&ev, Some(pool_name), now_ms())
                .await?;
            tracing::info!(
                job_id,
                action = ev.action.as_str(),
                runner = %ev.runner_name,
                outcome = ?r.outcome,
                "GitHub no longer has the job queued; recorded"
            );
        }
    }
    Ok(())
}

/// The cloud-init bootstrap of a new instance: a bootstrap token and, with
/// `[github]`, the runner's JIT config minted now and stored sealed under
/// the token (see [`bootstrap`]), so the VM gets it even if GitHub is
/// unreachable when it boots. A failure to mint is a failed create,
/// transient or permanent by [`RegistrarError::is_transient`] (retried
/// like any, see [`retried`]). Store errors are the caller's.
///
/// [`RegistrarError::is_transient`]: crate::worker::RegistrarError::is_transient
async fn cloud_init_bootstrap(
    ctx: &WorkerContext,
    name: &str,
    pool: &crate::pools::Pool,
) -> StoreResult<Result<Bootstrap, ProvisionerError>> {
    let Some(url) = &ctx.settings.gateway_url else {
        return Ok(Ok(Bootstrap::None));
    };
    let jit = match &ctx.registrar {
        Some(r) => match r
            .jit_config(name, &pool.config.labels, pool.config.runner_group_id)
            .await
        {
            Ok(jit) => Some(jit),
            Err(e) => return Ok(Err(e.into())),
        },
        None => None,
    };
    let seed_url = bootstrap::issue_with_secret(
        &*ctx.store,
        url,
        name,
        ctx.settings.bootstrap_ttl,
        jit.as_ref(),
    )
    .await?;
    Ok(Ok(Bootstrap::CloudInit { seed_url }))
}

/// Makes instance `name` of `pool` for job `job_id` (0: a warm instance):
/// moves it to creating, gives it its bootstrap (its runner config is
/// minted here: handed over by the guest agent, see [`guest_agent`], or
/// sealed under the bootstrap token for cloud-init, see
/// [`cloud_init_bootstrap`]; a failure to mint it is a failed create), and
/// asks the pool's provisioner for it. With `hold` (a queue entry), the
/// store is told every heartbeat, all along, that the worker still holds
/// it, and asked once more right before the provisioner is: a worker that
/// lost the entry stops with [`WorkError::Lost`] and makes nothing more.
/// The outer error is the store's (or the loss); the inner one the
/// backend's.
pub(crate) async fn create(
    ctx: &WorkerContext,
    pool: &Pool,
    name: &str,
    job_id: u64,
    hold: Option<Hold<'_>>,
) -> Result<Result<Instance, ProvisionerError>, WorkError> {
    match hold {
        Some(hold) => with_heartbeat(ctx, hold, make(ctx, pool, name, job_id, Some(hold))).await?,
        None => make(ctx, pool, name, job_id, None).await,
    }
}

/// [`create`]'s steps. `hold` is checked first and again right before the
/// provisioner call: the heartbeat around this may not have run for a
/// while (a starved runtime fires no tick), and a worker that lost its
/// entry must neither mint a runner config (minting removes the
/// registration of that name, the new holder's) nor issue a bootstrap token
/// (that revokes the new holder's VM's) nor ask for a VM. Found by the CI
/// soak on a loaded machine: a worker woke from a capacity wait after its
/// entry and fence had gone to another and re-minted under the other's VM.
async fn make(
    ctx: &WorkerContext,
    pool: &Pool,
    name: &str,
    job_id: u64,
    hold: Option<Hold<'_>>,
) -> Result<Result<Instance, ProvisionerError>, WorkError> {
    if let Some(hold) = hold {
        heartbeat(ctx, hold).await?;
    }
    // A redone create (the worker that began it died, or its entry was
    // reclaimed) may find the VM already running on the first attempt's
    // seed and runner registration. Minting new ones would revoke the token
    // that VM holds (one per instance) and replace the registration its
    // runner starts from, so the runner would never start and the job would
    // wait for ever: a running VM is kept as it is. A stopped or half-made
    // one gets the new bootstrap (the backend writes it again, or starts
    // over). Found by the end-to-end soak (control-plane kills).
    if let Some(prior) = ctx.store.get_instance(name).await?
        && prior.state == InstanceState::Creating
    {
        match pool.provisioner.get(&pool.name, name).await {
            Ok(Some(vm)) if vm.state == InstanceState::Running => {
                tracing::info!(instance = %name, "redone create: the instance already runs; kept with its first bootstrap");
                return Ok(Ok(vm));
            }
            Ok(_) => {}
            Err(e) => return Ok(Err(e)),
        }
    }
    ctx.store.mark_creating(name, now_ms()).await?;
    // The backend says how the pool's VMs take their runner registration;
    // a plugin that has not answered ValidatePool yet is asked now.
    let kind = match pool.provisioner.pool_bootstrap(&pool.name) {
        Some(kind) => kind,
        None => {
            if let Err(e) = pool.provisioner.validate_pool(&pool.name).await {
                return Ok(Err(e));
            }
            pool.provisioner
                .pool_bootstrap(&pool.name)
                .unwrap_or_default()
        }
    };
    let bootstrap = match kind {
        BootstrapKind::GuestAgent => {
            guest_agent::bootstrap(ctx.registrar.as_deref(), name, pool).await
        }
        BootstrapKind::CloudInit => cloud_init_bootstrap(ctx, name, pool).await?,
        BootstrapKind::None => Ok(Bootstrap::None),
    };
    let bootstrap = match bootstrap {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let spec = InstanceSpec {
        name: name.to_owned(),
        pool: pool.name.clone(),
        job_id,
        labels: pool.config.labels.clone(),
        bootstrap,
    };
    // Minting may have taken long: still this worker's?
    if let Some(hold) = hold {
        heartbeat(ctx, hold).await?;
    }
    let started = std::time::Instant::now();
    let r = pool.provisioner.create(&spec).await;
    ctx.metrics
        .provisioner_call(pool.provisioner.kind(), "create", started.elapsed(), &r);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::PoolConfig;
    use crate::pools::Pool;

    fn pool(max_instances: u32) -> Pool {
        Pool::new(
            "p",
            PoolConfig {
                max_instances,
                ..PoolConfig::default()
            },
            Arc::new(grs_provisioner::FakeProvisioner::new()),
        )
    }

    /// A worker's context over a memory store and the fake provisioner
    /// (the test configuration's pool `linux`), bootstrap on, runner
    /// configs from `registrar`.
    fn worker_context(
        registrar: Arc<dyn crate::worker::RunnerRegistrar>,
    ) -> (
        WorkerContext,
        Arc<dyn crate::store::Store>,
        Arc<grs_provisioner::FakeProvisioner>,
    ) {
        let config = crate::testing::test_config();
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::MemoryStore::new());
        let fake = Arc::new(grs_provisioner::FakeProvisioner::new());
        let mut settings = crate::worker::WorkerSettings::from_config(&config.control_plane);
        settings.gateway_url = Some("http://gw:8080".into());
        let ctx = WorkerContext {
            store: store.clone(),
            pools: crate::testing::fake_pools(&config, &fake),
            settings,
            registrar: Some(registrar),
            shutdown: tokio_util::sync::CancellationToken::new(),
            metrics: Default::default(),
            github: None,
        };
        (ctx, store, fake)
    }

    /// Job 7 queued for pool `linux`, its provision entry read by worker
    /// `a`.
    async fn job_7_read_by_a(store: &dyn crate::store::Store) -> (Queue, Delivery) {
        use crate::model::JobAction;
        use crate::store::conformance::event;
        store
            .submit_event(&event("q-7", JobAction::Queued, 7), Some("linux"), now_ms())
            .await
            .unwrap();
        let queue = Queue::Provision("linux".into());
        let d = store
            .read(&queue, "a", std::time::Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        (queue, d)
    }

    #[tokio::test]
    async fn a_redone_create_keeps_the_running_vms_first_bootstrap() {
        use crate::model::JobAction;
        use crate::store::conformance::event;

        let registrar = Arc::new(crate::testing::FakeRegistrar::default());
        let (ctx, store, fake) = worker_context(registrar.clone());
        let pool = ctx.pools.get("linux").unwrap();
        let t = now_ms();
        store
            .submit_event(&event("q-7", JobAction::Queued, 7), Some("linux"), t)
            .await
            .unwrap();
        store
            .begin_provision(7, "grs-7", &pool.limits(), t)
            .await
            .unwrap();

        // The first attempt makes the VM; its worker dies before recording
        // it, so the instance stays creating and the entry is redone.
        let first = create(&ctx, pool, "grs-7", 7, None).await.unwrap().unwrap();
        assert_eq!(first.state, InstanceState::Running);
        assert_eq!(registrar.minted(), 1);

        let again = create(&ctx, pool, "grs-7", 7, None).await.unwrap().unwrap();
        assert_eq!(again.state, InstanceState::Running);
        assert_eq!(again.provider_id, first.provider_id, "the same VM");
        assert_eq!(
            registrar.minted(),
            1,
            "the redo minted a second runner config (and token): the running VM's would be revoked"
        );
        assert_eq!(fake.creates(), 1);
    }

    /// How a minting failure is sorted: a JIT config GitHub refuses (403)
    /// is a permanent create error, one it may give later (502) a
    /// transient one; both name the runner. (The dispatcher retries both
    /// until retry_deadline, see [`retried`]; the kind says what to expect.)
    #[tokio::test]
    async fn a_jit_config_github_refuses_is_a_permanent_create_error_and_one_it_may_give_later_transient()
     {
        let registrar = Arc::new(crate::testing::FakeRegistrar::default());
        let (ctx, _store, fake) = worker_context(registrar.clone());
        let pool = ctx.pools.get("linux").unwrap();
        registrar.fail_jit(Some(403));
        let e = cloud_init_bootstrap(&ctx, "grs-1", pool)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ProvisionerError::Permanent(_)), "{e:?}");
        assert!(
            e.to_string().contains("mint a JIT runner config for grs-1"),
            "{e}"
        );
        registrar.fail_jit(Some(502));
        let e = cloud_init_bootstrap(&ctx, "grs-1", pool)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ProvisionerError::Transient(_)), "{e:?}");
        registrar.fail_jit(None);
        cloud_init_bootstrap(&ctx, "grs-1", pool)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fake.creates(), 0, "no VM is made without a runner config");
    }

    /// Mints runner configs; the first mint waits until `release` is
    /// notified (a worker stalled while making its instance) and tells
    /// `entered` when it starts.
    #[derive(Debug, Default)]
    struct StallingRegistrar {
        mints: std::sync::atomic::AtomicU32,
        entered: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl crate::worker::RunnerRegistrar for StallingRegistrar {
        async fn jit_config(
            &self,
            name: &str,
            _labels: &[String],
            _runner_group_id: u64,
        ) -> Result<secrecy::SecretString, crate::worker::RegistrarError> {
            if self.mints.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                self.entered.notify_one();
                self.release.notified().await;
            }
            Ok(format!("jit-{name}").into())
        }

        async fn remove_runner(&self, _name: &str) -> Result<(), crate::worker::RegistrarError> {
            Ok(())
        }
    }

    /// One entry, two workers: worker `a` stalls while making the instance
    /// and is taken for dead (its entry claimed by `b`, as after heartbeats
    /// that came too late on a loaded machine). `b` makes the instance;
    /// `a` must find out it lost the entry and make nothing.
    #[tokio::test]
    async fn a_worker_that_lost_its_entry_to_another_creates_nothing() {
        let registrar = Arc::new(StallingRegistrar::default());
        let (ctx, store, fake) = worker_context(registrar.clone());
        let (queue, d) = job_7_read_by_a(&*store).await;
        let a = tokio::spawn({
            let (ctx, d) = (ctx.clone(), d.clone());
            async move { handle(&ctx, "linux", "a", d).await }
        });
        registrar.entered.notified().await;
        // `a` is taken for dead: its entry goes to `b`.
        let claimed = store
            .claim_stale(&queue, "b", std::time::Duration::ZERO, 1)
            .await
            .unwrap();
        assert_eq!(claimed, vec![d.clone()]);
        let wait = std::time::Duration::from_secs(10);
        let b = tokio::time::timeout(wait, handle(&ctx, "linux", "b", d))
            .await
            .expect("b finished");
        assert_eq!(b.unwrap(), Handled::Done);
        assert_eq!(fake.create_calls(), 1);
        // `a` wakes up.
        registrar.release.notify_one();
        let a = tokio::time::timeout(wait, a)
            .await
            .expect("a finished")
            .unwrap();
        assert_eq!(
            fake.create_calls(),
            1,
            "the worker that lost the entry created grs-7 again (a: {a:?})"
        );
        assert!(matches!(a, Err(WorkError::Lost)), "a: {a:?}");
    }

    /// A worker that wakes (a starved runtime, a long wait) after its
    /// entry went to another worker: it must neither mint a runner config
    /// nor issue a token nor create, all of which would undo the new
    /// holder's instance. The CI soak met it on a loaded machine.
    #[tokio::test]
    async fn a_create_by_a_worker_that_lost_its_entry_mints_and_makes_nothing() {
        let registrar = Arc::new(crate::testing::FakeRegistrar::default());
        let (ctx, store, fake) = worker_context(registrar.clone());
        let pool = ctx.pools.get("linux").unwrap();
        let (queue, d) = job_7_read_by_a(&*store).await;
        store
            .begin_provision(7, "grs-7", &pool.limits(), now_ms())
            .await
            .unwrap();
        let claimed = store
            .claim_stale(&queue, "b", std::time::Duration::ZERO, 1)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        let hold = Hold {
            queue: &queue,
            consumer: "a",
            id: &d.id,
            lease: None,
        };
        let r = create(&ctx, pool, "grs-7", 7, Some(hold)).await;
        assert!(matches!(r, Err(WorkError::Lost)), "{r:?}");
        assert_eq!(
            registrar.minted(),
            0,
            "a runner config was minted by a worker that had lost its entry"
        );
        assert_eq!(fake.create_calls(), 0);
    }

    #[test]
    fn automatic_dispatchers_follow_the_pools_capacity_and_a_configured_count_wins() {
        assert_eq!(workers_for(0, &pool(50)), 50);
        assert_eq!(workers_for(0, &pool(0)), 1);
        assert_eq!(workers_for(0, &pool(500)), MAX_AUTO_WORKERS);
        assert_eq!(workers_for(4, &pool(50)), 4);
    }
}
