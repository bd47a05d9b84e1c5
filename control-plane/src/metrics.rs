//! Prometheus metrics of the control plane, served in the text exposition
//! format on their own HTTP port (`control_plane.metrics_listen`,
//! `GET /metrics`), apart from the gRPC API.
//!
//! Two kinds:
//! - **Read from the store at each scrape** ([`Metrics::refresh`]): live jobs
//!   by pool and state, queue depths, instances by pool and state, capacity
//!   in use and maximum per pool, whether the store answers. Every replica
//!   reports the same (shared) values: aggregate with `max`, not `sum`.
//! - **Counted by this replica as it works**: provisioner calls, errors and
//!   durations by backend and kind, stage latencies, reconciler actions by
//!   kind, whether this replica leads the reconciler. Aggregate with `sum`.
//!
//! All names start with `grs_`; `deploy/grafana/grs.json` and
//! `deploy/prometheus/alerts.yml` use them (a test checks that each exists).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::model::{InstanceState, JobState, Millis};
use crate::pools::Pools;
use crate::store::{Queue, Store};

/// `{pool, state}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    /// Pool name.
    pub pool: String,
    /// State name as the API spells it (`queued`, `running`, …).
    pub state: String,
}

/// `{pool}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub pool: String,
}

/// `{queue}`: `provision:<pool>` or `teardown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// The queue.
    pub queue: String,
}

/// `{backend, kind}` of a provisioner call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The provisioner's backend (`proxmox`, `fake`, …).
    pub backend: String,
    /// `create` or `delete`.
    pub kind: &'static str,
}

/// `{backend, kind, outcome}` of a provisioner call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallOutcomeLabels {
    /// The provisioner's backend.
    pub backend: String,
    /// `create` or `delete`.
    pub kind: &'static str,
    /// `ok`, `retryable_error` or `error`.
    pub outcome: &'static str,
}

/// `{pool, stage}` of a latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// Pool name.
    pub pool: String,
    /// One of [`STAGE_QUEUED_TO_RUNNING`], [`STAGE_COMPLETED_TO_DELETED`].
    pub stage: &'static str,
}

/// `{kind}` of a reconciler action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `bootstrap_timeout`, `lifetime_ended`, `orphan_deleted`,
    /// `busy_kept`, `failure`.
    pub kind: &'static str,
}

/// `{endpoint, status}` of a GitHub API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GitHubCallLabels {
    /// The endpoint as a template (`GET /repos/{owner}/{repo}/actions/jobs/{id}`).
    pub endpoint: String,
    /// The HTTP status; `0` when no answer came.
    pub status: u16,
}

/// `{outcome}` or `{kind}` of a GitHub-side action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened.
    pub outcome: &'static str,
}

/// The kinds of [`ActionLabels`].
const ACTION_KINDS: [&str; 5] = [
    "bootstrap_timeout",
    "lifetime_ended",
    "orphan_deleted",
    "busy_kept",
    "failure",
];

/// What the lost-webhook recovery counts (`grs_github_recovered{outcome}`).
pub const RECOVERY_OUTCOMES: [&str; 6] = [
    "completed_recorded",
    "job_submitted",
    "redelivery_requested",
    "rerouted",
    "skipped_pass",
    "started_recorded",
];

/// Stage: GRS recorded the job queued → its instance is running.
pub const STAGE_QUEUED_TO_RUNNING: &str = "queued_to_running";
/// Stage: the job its instance ran completed → the instance is deleted.
pub const STAGE_COMPLETED_TO_DELETED: &str = "completed_to_deleted";

/// Live (non-terminal) job states reported by `grs_jobs`. Ended jobs are
/// kept for days and would make every scrape read them all.
const LIVE_JOB_STATES: [JobState; 5] = [
    JobState::Waiting,
    JobState::Queued,
    JobState::Provisioning,
    JobState::Provisioned,
    JobState::InProgress,
];
/// Most live jobs counted per pool and state in one scrape.
const JOB_COUNT_CAP: usize = 100_000;

/// Every metric of the control plane.
#[derive(Debug)]
pub struct Metrics {
    jobs: Family<PoolStateLabels, Gauge>,
    queue_depth: Family<QueueLabels, Gauge>,
    queue_pending: Family<QueueLabels, Gauge>,
    instances: Family<PoolStateLabels, Gauge>,
    pool_in_use: Family<PoolLabels, Gauge>,
    pool_max: Family<PoolLabels, Gauge>,
    store_up: Gauge,
    provisioner_calls: Family<CallOutcomeLabels, Counter>,
    provisioner_seconds: Family<CallLabels, Histogram>,
    stage_seconds: Family<StageLabels, Histogram>,
    reconciler_actions: Family<ActionLabels, Counter>,
    reconciler_leader: Gauge,
    github_calls: Family<GitHubCallLabels, Counter>,
    github_rate_limit_remaining: Gauge,
    github_status_checks: Family<OutcomeLabels, Counter>,
    github_recovered: Family<OutcomeLabels, Counter>,
    foreign_events: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Self {
        // 10 ms .. ~5.7 min: VM creates take seconds, deletes less; a job
        // waiting for capacity may wait minutes.
        let seconds = || Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let m = Self {
            jobs: Family::default(),
            queue_depth: Family::default(),
            queue_pending: Family::default(),
            instances: Family::default(),
            pool_in_use: Family::default(),
            pool_max: Family::default(),
            store_up: Gauge::default(),
            provisioner_calls: Family::default(),
            provisioner_seconds: Family::new_with_constructor(seconds),
            stage_seconds: Family::new_with_constructor(seconds),
            reconciler_actions: Family::default(),
            reconciler_leader: Gauge::default(),
            github_calls: Family::default(),
            github_rate_limit_remaining: Gauge::default(),
            github_status_checks: Family::default(),
            github_recovered: Family::default(),
            foreign_events: Counter::default(),
            registry: Registry::with_prefix("grs"),
        };
        let mut r = Registry::with_prefix("grs");
        r.register(
            "jobs",
            "Live jobs by pool and state (read from the store)",
            m.jobs.clone(),
        );
        r.register(
            "queue_depth",
            "Queue entries not yet acknowledged (read from the store)",
            m.queue_depth.clone(),
        );
        r.register(
            "queue_pending",
            "Queue entries held by a worker (read from the store)",
            m.queue_pending.clone(),
        );
        r.register(
            "instances",
            "Live instances by pool and state (read from the store)",
            m.instances.clone(),
        );
        r.register(
            "pool_instances_in_use",
            "Capacity slots taken per pool (read from the store)",
            m.pool_in_use.clone(),
        );
        r.register(
            "pool_max_instances",
            "Most live instances per pool (configured or overridden)",
            m.pool_max.clone(),
        );
        r.register(
            "store_up",
            "1 when the store answered this scrape",
            m.store_up.clone(),
        );
        r.register(
            "provisioner_calls",
            "Provisioner calls by backend, kind and outcome (this replica)",
            m.provisioner_calls.clone(),
        );
        r.register(
            "provisioner_call_duration_seconds",
            "Provisioner call durations by backend and kind (this replica)",
            m.provisioner_seconds.clone(),
        );
        r.register(
            "stage_duration_seconds",
            "Latency of a job's stages by pool (this replica)",
            m.stage_seconds.clone(),
        );
        r.register(
            "reconciler_actions",
            "Reconciler actions by kind (this replica)",
            m.reconciler_actions.clone(),
        );
        r.register(
            "reconciler_leader",
            "1 while this replica holds the reconciler lease",
            m.reconciler_leader.clone(),
        );
        r.register(
            "github_api_calls",
            "GitHub REST API calls by endpoint template and HTTP status, 0 for no answer (this replica)",
            m.github_calls.clone(),
        );
        r.register(
            "github_rate_limit_remaining",
            "GitHub's x-ratelimit-remaining as last answered (-1 before any answer)",
            m.github_rate_limit_remaining.clone(),
        );
        r.register(
            "github_job_status_checks",
            "Job-status checks before provisioning by outcome: queued, moved (no longer queued), unchecked (this replica)",
            m.github_status_checks.clone(),
        );
        r.register(
            "github_recovered",
            "Lost-webhook recovery by outcome: completed_recorded, job_submitted, redelivery_requested, rerouted, skipped_pass, started_recorded (this replica)",
            m.github_recovered.clone(),
        );
        r.register(
            "foreign_events",
            "Job events from outside the configured organisation, repository or App installation, answered and not recorded (this replica)",
            m.foreign_events.clone(),
        );
        m.github_rate_limit_remaining.set(-1);
        m.foreign_events.inc_by(0);
        for outcome in ["queued", "moved", "unchecked"] {
            m.github_status_checks
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(0);
        }
        for outcome in RECOVERY_OUTCOMES {
            m.github_recovered
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(0);
        }
        // Every action kind reads 0 from the start, so `increase()` sees the
        // first one.
        for kind in ACTION_KINDS {
            m.reconciler_actions
                .get_or_create(&ActionLabels { kind })
                .inc_by(0);
        }
        Self { registry: r, ..m }
    }

    /// Records one provisioner call of `kind` (`create`, `delete`) on
    /// `backend`.
    pub fn provisioner_call<T>(
        &self,
        backend: &str,
        kind: &'static str,
        took: Duration,
        result: &Result<T, grs_provisioner::ProvisionerError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) if e.is_retryable() => "retryable_error",
            Err(_) => "error",
        };
        self.provisioner_calls
            .get_or_create(&CallOutcomeLabels {
                backend: backend.to_owned(),
                kind,
                outcome,
            })
            .inc();
        self.provisioner_seconds
            .get_or_create(&CallLabels {
                backend: backend.to_owned(),
                kind,
            })
            .observe(took.as_secs_f64());
    }

    /// Records a stage latency of `pool`: from `from_ms` to `to_ms` (Unix
    /// milliseconds; nothing when the clock went backwards).
    pub fn stage(&self, pool: &str, stage: &'static str, from_ms: Millis, to_ms: Millis) {
        if from_ms <= 0 || to_ms < from_ms {
            return;
        }
        self.stage_seconds
            .get_or_create(&StageLabels {
                pool: pool.to_owned(),
                stage,
            })
            .observe((to_ms - from_ms) as f64 / 1000.0);
    }

    /// Counts `n` reconciler actions of `kind`.
    pub fn reconciler_actions(&self, kind: &'static str, n: usize) {
        if n > 0 {
            self.reconciler_actions
                .get_or_create(&ActionLabels { kind })
                .inc_by(n as u64);
        }
    }

    /// Counts one job-status check (`queued`, `moved`, `unchecked`).
    pub fn github_status_check(&self, outcome: &'static str) {
        self.github_status_checks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts `n` recovery actions of `outcome` (one of [`RECOVERY_OUTCOMES`]).
    pub fn github_recovered(&self, outcome: &'static str, n: usize) {
        self.github_recovered
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n as u64);
    }

    /// Counts a job event from outside the configured scope.
    pub fn foreign_event(&self) {
        self.foreign_events.inc();
    }

    /// Whether this replica leads the reconciler now.
    pub fn set_reconciler_leader(&self, leading: bool) {
        self.reconciler_leader.set(i64::from(leading));
    }

    /// Reads the store-backed gauges afresh. A store error sets
    /// `grs_store_up` to 0 and leaves the rest as last read.
    pub async fn refresh(&self, store: &dyn Store, pools: &Pools) {
        match self.read_store(store, pools).await {
            Ok(()) => {
                self.store_up.set(1);
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics: the store does not answer");
                self.store_up.set(0);
            }
        }
    }

    async fn read_store(
        &self,
        store: &dyn Store,
        pools: &Pools,
    ) -> Result<(), crate::store::StoreError> {
        let mut queues = vec![Queue::Teardown];
        for pool in pools.iter() {
            queues.push(Queue::Provision(pool.name.clone()));
            let labels = PoolLabels {
                pool: pool.name.clone(),
            };
            // (Values first: a family's guard must not be held across an
            // await, or the scrape future is not Send.)
            let in_use = store.pool_in_use(&pool.name).await?;
            self.pool_in_use
                .get_or_create(&labels)
                .set(i64::from(in_use));
            let max = store
                .pool_overrides(&pool.name)
                .await?
                .max_instances
                .unwrap_or(pool.config.max_instances);
            self.pool_max.get_or_create(&labels).set(i64::from(max));
            for state in LIVE_JOB_STATES {
                let n = count_jobs(store, &pool.name, state).await?;
                self.jobs
                    .get_or_create(&PoolStateLabels {
                        pool: pool.name.clone(),
                        state: state.to_string(),
                    })
                    .set(n as i64);
            }
        }
        for q in &queues {
            let d = store.queue_depth(q).await?;
            let labels = QueueLabels {
                queue: q.to_string(),
            };
            self.queue_depth.get_or_create(&labels).set(d.depth as i64);
            self.queue_pending
                .get_or_create(&labels)
                .set(d.pending as i64);
        }
        // Every live state of every pool, 0 unless an instance is in it; a
        // pool or state nobody is in any more reads 0, not its last value.
        let mut counts: std::collections::HashMap<PoolStateLabels, i64> = pools
            .iter()
            .flat_map(|p| {
                INSTANCE_STATES.iter().map(|s| PoolStateLabels {
                    pool: p.name.clone(),
                    state: s.as_str().to_owned(),
                })
            })
            .map(|l| (l, 0))
            .collect();
        for i in store.list_instances(None, false).await? {
            *counts
                .entry(PoolStateLabels {
                    pool: i.pool,
                    state: i.state.as_str().to_owned(),
                })
                .or_default() += 1;
        }
        self.instances.clear();
        for (labels, n) in counts {
            self.instances.get_or_create(&labels).set(n);
        }
        Ok(())
    }

    /// The Prometheus text exposition of what was last recorded or read.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Live instance states, each reported (as 0 when empty).
const INSTANCE_STATES: [InstanceState; 7] = [
    InstanceState::PendingCreate,
    InstanceState::Creating,
    InstanceState::Running,
    InstanceState::Stopped,
    InstanceState::Error,
    InstanceState::PendingDelete,
    InstanceState::Deleting,
];

async fn count_jobs(
    store: &dyn Store,
    pool: &str,
    state: JobState,
) -> Result<usize, crate::store::StoreError> {
    let (mut n, mut cursor) = (0, 0);
    loop {
        let (page, next) = store
            .list_jobs(Some(pool), Some(state), cursor, 1000)
            .await?;
        n += page.len();
        match next {
            Some(c) if n < JOB_COUNT_CAP => cursor = c,
            _ => return Ok(n),
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; each
/// scrape reads the store-backed gauges afresh.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    pools: Pools,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, store, pools) = (metrics.clone(), store.clone(), pools.clone());
            async move {
                metrics.refresh(&*store, &pools).await;
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    tracing::info!(listen = ?listener.local_addr().ok(), "metrics serving at /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Counts every GitHub API call of a [`grs_github::GitHubClient`] it is set
/// on (`GitHubClient::set_observer`).
impl grs_github::ApiObserver for Metrics {
    fn response(&self, endpoint: &str, status: u16, rate_limit_remaining: Option<u64>) {
        self.github_calls
            .get_or_create(&GitHubCallLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
        if let Some(r) = rate_limit_remaining {
            self.github_rate_limit_remaining
                .set(i64::try_from(r).unwrap_or(i64::MAX));
        }
    }
}
