//! What dispatcher and teardown workers share: their context, how they take
//! an entry from a queue, and how they keep it while they work on it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::config::ControlPlaneConfig;
use crate::model::backoff;
use crate::pools::Pools;
use crate::store::{Delivery, Queue, Store, StoreError, StoreResult};

/// Why a [`RunnerRegistrar`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    /// GitHub failed the call: it answered with an error, or not at all.
    #[error("cannot {action}: {source}")]
    GitHub {
        /// What was asked, naming the runner or registration
        /// ("mint a JIT runner config for grs-7").
        action: String,
        /// GitHub's error.
        #[source]
        source: grs_github::GitHubError,
    },
    /// This registrar cannot do that at all (say, remove a registration by
    /// id); asking again will not help.
    #[error("this registrar cannot {0}")]
    Unsupported(String),
}

impl RegistrarError {
    /// Whether the same call may succeed later: GitHub did not answer, was
    /// rate limited beyond what the client waits, answered 5xx, 408, 409
    /// (a runner of that name still busy) or 429, or gave an answer that
    /// could not be read. Any other answer is permanent (401/403 after the
    /// client's token refresh and rate-limit waits: the credentials lack a
    /// permission; 404/422: no such runner group, labels refused), and so
    /// are a bad `[github]` and a call this registrar cannot make.
    pub fn is_transient(&self) -> bool {
        use grs_github::GitHubError as E;
        match self {
            Self::GitHub { source, .. } => match source {
                E::Api { status, .. } => *status >= 500 || matches!(*status, 408 | 409 | 429),
                E::RateLimited { .. } | E::Transport { .. } | E::Decode { .. } => true,
                E::Config(_) => false,
            },
            Self::Unsupported(_) => false,
        }
    }
}

/// A registrar failure met while making an instance fails the create, as
/// [`ProvisionerError::Transient`](grs_provisioner::ProvisionerError::Transient)
/// or `Permanent` by [`RegistrarError::is_transient`]. (The dispatcher
/// retries both until `retry_deadline`: an operator may mend a permission
/// while the job waits; the kind says what to expect.)
impl From<RegistrarError> for grs_provisioner::ProvisionerError {
    fn from(e: RegistrarError) -> Self {
        if e.is_transient() {
            Self::Transient(e.to_string())
        } else {
            Self::Permanent(e.to_string())
        }
    }
}

/// The control plane's view of GitHub's runner registrations. Implemented
/// over `grs-github`'s REST client (or its simulator) by the binaries.
#[async_trait]
pub trait RunnerRegistrar: Send + Sync + std::fmt::Debug {
    /// Mints a just-in-time runner config for a runner named `name` (the
    /// instance name) with `labels`, in `runner_group_id`. The config is a
    /// secret.
    async fn jit_config(
        &self,
        name: &str,
        labels: &[String],
        runner_group_id: u64,
    ) -> Result<SecretString, RegistrarError>;

    /// Removes the runner registration named `name`, if any is left behind
    /// (a runner that never ran its job). Absent is success.
    async fn remove_runner(&self, name: &str) -> Result<(), RegistrarError>;

    /// Whether the runner named `name` is running a job right now:
    /// `Some(true)` busy, `Some(false)` registered and idle or not
    /// registered, `None` when this registrar cannot tell. The reconciler
    /// asks before it tears down an instance whose `in_progress` webhook
    /// never came: a lost delivery must not kill a running job.
    async fn runner_busy(&self, name: &str) -> Result<Option<bool>, RegistrarError> {
        let _ = name;
        Ok(None)
    }

    /// The REST client behind this registrar, if it is GitHub's: the
    /// control plane then checks job status and recovers lost webhooks
    /// through the same client (one token cache, one set of metrics).
    fn github_client(&self) -> Option<grs_github::GitHubClient> {
        None
    }
    /// The offline runner registrations whose name starts with `prefix`;
    /// `None` when this registrar cannot list them. The reconciler removes
    /// those of no live instance (left behind by a VM that died before its
    /// runner ran a job, or a removal that failed).
    async fn offline_runners(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<RunnerRegistration>>, RegistrarError> {
        let _ = prefix;
        Ok(None)
    }

    /// Removes the runner registration with GitHub id `id`. Absent is
    /// success.
    async fn remove_runner_id(&self, id: u64) -> Result<(), RegistrarError> {
        Err(RegistrarError::Unsupported(format!(
            "remove runner registration {id} by id"
        )))
    }
}

/// A runner registration on GitHub, as the reconciler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRegistration {
    /// GitHub's id.
    pub id: u64,
    /// The runner's name (an instance name when GRS made it).
    pub name: String,
    /// Running a job right now.
    pub busy: bool,
}

/// Worker settings, taken from `[control_plane]`.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Instance names are `<instance_prefix>-<job id>`.
    pub instance_prefix: String,
    /// Held entries without a heartbeat for this long go to other workers.
    pub claim_timeout: Duration,
    /// Cap on create attempts per job; 0: none.
    pub max_attempts: u32,
    /// Transient create failures are retried until this long after the
    /// instance was first recorded.
    pub retry_deadline: Duration,
    /// First retry delay.
    pub retry_backoff: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
    /// Gateway base URL for seed URLs; `None`: no bootstrap.
    pub gateway_url: Option<String>,
    /// Bootstrap token lifetime.
    pub bootstrap_ttl: Duration,
    /// Deleted instance records are kept this long.
    pub instance_retention: Duration,
    /// Longest wait of one blocking queue read.
    pub read_block: Duration,
}

impl WorkerSettings {
    /// From the configuration.
    pub fn from_config(c: &ControlPlaneConfig) -> Self {
        Self {
            instance_prefix: c.instance_prefix.clone(),
            claim_timeout: c.claim_timeout,
            max_attempts: c.max_attempts,
            retry_deadline: c.retry_deadline,
            retry_backoff: c.retry_backoff,
            retry_backoff_max: c.retry_backoff_max,
            gateway_url: c.gateway_url.clone(),
            bootstrap_ttl: c.bootstrap_ttl,
            instance_retention: c.instance_retention,
            read_block: Duration::from_secs(2),
        }
    }

    /// How often a worker tells the store it still holds its entry: well
    /// within the claim timeout.
    pub fn heartbeat(&self) -> Duration {
        (self.claim_timeout / 3).max(Duration::from_millis(100))
    }

    /// Delay before retry number `attempt` (0-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        backoff(self.retry_backoff, self.retry_backoff_max, attempt)
    }
}

/// Everything a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// Durable state and queues.
    pub store: Arc<dyn Store>,
    /// Pools and their backends.
    pub pools: Pools,
    /// Tunables.
    pub settings: WorkerSettings,
    /// GitHub runner registrations, when GitHub is configured.
    pub registrar: Option<Arc<dyn RunnerRegistrar>>,
    /// Cancelled on shutdown: stop taking work.
    pub shutdown: CancellationToken,
    /// This replica's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Job status from GitHub before a VM is spent, when `[github]` is
    /// configured (`None`: not checked).
    pub github: Option<crate::github::GitHubJobs>,
}

/// How a worker left an entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handled {
    /// Work done (or nothing to do): acknowledge.
    Done,
    /// Shutting down before the work could be done: leave it pending; another
    /// worker claims it after the claim timeout.
    Released,
}

/// Why a worker stopped working on an entry before it was handled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkError {
    /// The store failed; the entry will be redone.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another worker holds the entry now: this one was taken for dead (its
    /// heartbeats came later than the claim timeout) and its entry claimed.
    /// It stops without acknowledging; the new holder does the work.
    #[error("another worker took the entry over")]
    Lost,
}

/// A queue entry a worker holds while it works on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hold<'a> {
    /// The entry's queue.
    pub queue: &'a Queue,
    /// The worker, as the queue knows it.
    pub consumer: &'a str,
    /// The entry.
    pub id: &'a str,
    /// A lease the worker holds as long as the entry (held by `consumer`,
    /// renewed with every heartbeat for the claim timeout), if any: the
    /// dispatcher's create fence.
    pub lease: Option<&'a str>,
}

/// The next entry for `consumer`: first any entry a dead worker left behind
/// (looked for at most once per heartbeat, not before every read: the
/// reclaim delay stays within the claim timeout plus one heartbeat, and the
/// busy path costs one store call per entry), else a new one (waiting up to
/// the read block).
pub(crate) async fn next_delivery(
    ctx: &WorkerContext,
    queue: &Queue,
    consumer: &str,
    last_claim: &mut Option<tokio::time::Instant>,
) -> StoreResult<Option<Delivery>> {
    if last_claim.is_none_or(|t| t.elapsed() >= ctx.settings.heartbeat()) {
        let mut stale = ctx
            .store
            .claim_stale(queue, consumer, ctx.settings.claim_timeout, 1)
            .await?;
        if let Some(d) = stale.pop() {
            // More may be waiting: look again next time.
            tracing::info!(%queue, entry = %d.id, "reclaimed an entry a worker left unfinished");
            return Ok(Some(d));
        }
        *last_claim = Some(tokio::time::Instant::now());
    }
    ctx.store
        .read(
            queue,
            consumer,
            ctx.settings.read_block.min(ctx.settings.heartbeat()),
        )
        .await
}

/// One heartbeat: tells the store `hold`'s worker still works on its entry
/// and renews its lease. [`WorkError::Lost`] when the worker holds either
/// no longer. Store failures are logged, not fatal: at worst the entry goes
/// to another worker, which every step tolerates, and the next heartbeat
/// then reports the loss.
pub(crate) async fn heartbeat(ctx: &WorkerContext, hold: Hold<'_>) -> Result<(), WorkError> {
    let queue = hold.queue;
    match ctx.store.touch(queue, hold.consumer, hold.id).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(%queue, entry = hold.id, consumer = hold.consumer, "another worker took the entry over (this one was taken for dead); stopping work on it");
            return Err(WorkError::Lost);
        }
        Err(e) => tracing::warn!(%queue, entry = hold.id, error = %e, "heartbeat failed"),
    }
    if let Some(lease) = hold.lease {
        match ctx
            .store
            .acquire_lease(lease, hold.consumer, ctx.settings.claim_timeout)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%queue, entry = hold.id, lease, "another worker took the lease over; stopping work on the entry");
                return Err(WorkError::Lost);
            }
            Err(e) => {
                tracing::warn!(%queue, entry = hold.id, lease, error = %e, "lease renewal failed")
            }
        }
    }
    Ok(())
}

/// Runs `work` while telling the store, every heartbeat, that the worker
/// still holds `hold`, so a long create or delete is not mistaken for a
/// dead worker. Should a heartbeat find the entry (or the lease) taken
/// over, `work` is dropped where it is and [`WorkError::Lost`] returned.
pub(crate) async fn with_heartbeat<T>(
    ctx: &WorkerContext,
    hold: Hold<'_>,
    work: impl Future<Output = T>,
) -> Result<T, WorkError> {
    let mut tick = tokio::time::interval(ctx.settings.heartbeat());
    tick.tick().await;
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return Ok(r),
            _ = tick.tick() => heartbeat(ctx, hold).await?,
        }
    }
}

/// Waits `delay` holding `hold`; false if shutdown came first. A wait that
/// ran its course ends with a heartbeat: a worker stalled during the wait
/// (a starved runtime fires no tick) learns of a loss before it goes on.
pub(crate) async fn wait_holding(
    ctx: &WorkerContext,
    hold: Hold<'_>,
    delay: Duration,
) -> Result<bool, WorkError> {
    let shutdown = ctx.shutdown.clone();
    let waited = with_heartbeat(ctx, hold, async move {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    })
    .await?;
    if waited {
        heartbeat(ctx, hold).await?;
    }
    Ok(waited)
}

/// Sleeps `delay` unless shutdown comes first; false then.
pub(crate) async fn pause(ctx: &WorkerContext, delay: Duration) -> bool {
    tokio::select! {
        _ = ctx.shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The shared loop of a queue worker: take an entry, hand it to `handle`,
/// acknowledge it when handled. Store failures (Redis down) back off and
/// retry; nothing is acknowledged that was not done, nor an entry another
/// worker took over.
pub(crate) async fn run_queue_worker<F, Fut>(
    ctx: WorkerContext,
    queue: Queue,
    consumer: String,
    handle: F,
) where
    F: Fn(WorkerContext, Delivery) -> Fut,
    Fut: Future<Output = Result<Handled, WorkError>>,
{
    let mut failures = 0u32;
    let mut last_claim = None;
    tracing::debug!(%queue, consumer, "worker started");
    while !ctx.shutdown.is_cancelled() {
        let next = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            r = next_delivery(&ctx, &queue, &consumer, &mut last_claim) => r,
        };
        let delivery = match next {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                failures += 1;
                tracing::warn!(%queue, error = %e, "cannot read the queue; retrying");
                if !pause(&ctx, ctx.settings.backoff(failures.min(6))).await {
                    break;
                }
                continue;
            }
        };
        let id = delivery.id.clone();
        match handle(ctx.clone(), delivery).await {
            Ok(Handled::Done) => {
                failures = 0;
                match ctx.store.ack(&queue, &consumer, &id).await {
                    Ok(true) => {}
                    // Claimed by another worker meanwhile: it finds the
                    // work done and acknowledges it itself.
                    Ok(false) => {
                        tracing::info!(%queue, entry = %id, "entry no longer held (another worker took it over); left to it")
                    }
                    // The work is done; redoing it is harmless.
                    Err(e) => {
                        tracing::warn!(%queue, entry = %id, error = %e, "cannot acknowledge; the entry will be redone")
                    }
                }
            }
            Ok(Handled::Released) => {
                tracing::info!(%queue, entry = %id, "released an entry at shutdown")
            }
            Err(WorkError::Lost) => {
                failures = 0;
                tracing::info!(%queue, entry = %id, "stopped work on an entry another worker took over");
            }
            Err(WorkError::Store(e)) => {
                failures += 1;
                tracing::warn!(%queue, entry = %id, error = %e, "store error while working; the entry will be redone");
                if !pause(&ctx, ctx.settings.backoff(failures.min(6))).await {
                    break;
                }
            }
        }
    }
    tracing::debug!(%queue, consumer, "worker stopped");
}
