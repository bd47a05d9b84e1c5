//! `grs.v1.ControlPlane`: the gRPC API over the store and pools.
//!
//! Every handler validates its input first (INVALID_ARGUMENT naming the
//! field), then talks to the store; a store that cannot be reached answers
//! UNAVAILABLE, which clients may retry.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_server::ControlPlane;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::bootstrap;
use crate::model::{JobAction, JobEvent, JobState, PoolOverrides, SubmitOutcome, now_ms};
use crate::pools::Pools;
use crate::store::{Queue, Store, StoreError, SubmitResult};
use crate::worker::RunnerRegistrar;

/// The wire limits, defined once in `grs-proto`.
pub use grs_proto::{MAX_BATCH, MAX_FIELD_LEN, MAX_LABELS};

/// The `grs.v1.ControlPlane` implementation.
#[derive(Debug, Clone)]
pub struct ControlPlaneService {
    store: Arc<dyn Store>,
    pools: Pools,
    bootstrap_docs: Arc<crate::cloud_init::Documents>,
    /// Cancelled at shutdown: ends open `WatchEvents` streams, which would
    /// otherwise hold the server's graceful shutdown open forever.
    shutdown: CancellationToken,
    /// Events outside it are answered FOREIGN and counted, never recorded.
    scope: crate::github::EventScope,
    /// Where foreign events are counted.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl ControlPlaneService {
    /// The service over `store` and `pools`; `registrar` mints runner configs
    /// for bootstrap documents (absent: user-data cannot be served).
    pub fn new(
        store: Arc<dyn Store>,
        pools: Pools,
        registrar: Option<Arc<dyn RunnerRegistrar>>,
        shutdown: CancellationToken,
    ) -> Self {
        let bootstrap_docs = Arc::new(crate::cloud_init::Documents::new(registrar));
        Self {
            store,
            pools,
            bootstrap_docs,
            shutdown,
            scope: crate::github::EventScope::default(),
            metrics: None,
        }
    }

    /// Answers events outside `scope` FOREIGN (counted in `metrics`)
    /// instead of recording them.
    pub fn with_event_scope(
        mut self,
        scope: crate::github::EventScope,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        self.scope = scope;
        self.metrics = Some(metrics);
        self
    }

    /// The answer to a foreign event, if `ev` is one (logged and counted).
    fn foreign(&self, ev: &JobEvent) -> Option<pb::SubmitJobEventResponse> {
        let why = self.scope.foreign(ev)?;
        tracing::warn!(delivery = %ev.delivery_id, job_id = ev.job_id, "job event from outside this installation's scope; not recorded: {why}");
        if let Some(m) = &self.metrics {
            m.foreign_event();
        }
        Some(pb::SubmitJobEventResponse {
            outcome: pb::SubmitOutcome::Foreign as i32,
            job: None,
        })
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        e @ StoreError::Unavailable { .. } => Status::unavailable(e.to_string()),
        e @ StoreError::Corrupt { .. } => Status::internal(e.to_string()),
    }
}

fn check_len(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_FIELD_LEN {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {MAX_FIELD_LEN} bytes"
        )));
    }
    Ok(())
}

/// The answer to one recorded event, with the job unless `outcome_only`
/// (and its log line).
fn submit_response(
    ev: &JobEvent,
    r: SubmitResult,
    outcome_only: bool,
) -> pb::SubmitJobEventResponse {
    let outcome = match r.outcome {
        SubmitOutcome::Accepted => pb::SubmitOutcome::Accepted,
        SubmitOutcome::DuplicateDelivery => pb::SubmitOutcome::DuplicateDelivery,
        SubmitOutcome::Stale => pb::SubmitOutcome::Stale,
    };
    if let Some(job) = &r.job {
        tracing::info!(
            delivery = %ev.delivery_id, job_id = ev.job_id, action = ev.action.as_str(),
            outcome = ?r.outcome, state = %job.state, pool = %job.pool, teardown = ?r.teardown,
            "job event"
        );
    }
    pb::SubmitJobEventResponse {
        outcome: outcome as i32,
        job: r.job.filter(|_| !outcome_only).map(|j| j.to_proto()),
    }
}

/// Validates a submitted event; errors name the field.
pub fn validate_event(ev: Option<pb::JobEvent>) -> Result<JobEvent, Status> {
    let ev = ev.ok_or_else(|| Status::invalid_argument("event is required"))?;
    if ev.delivery_id.is_empty() {
        return Err(Status::invalid_argument(
            "event.delivery_id is required (the X-GitHub-Delivery header)",
        ));
    }
    if ev.job_id == 0 {
        return Err(Status::invalid_argument(
            "event.job_id is required (workflow_job.id)",
        ));
    }
    let action = match pb::JobAction::try_from(ev.action) {
        Ok(pb::JobAction::Queued) => JobAction::Queued,
        Ok(pb::JobAction::Waiting) => JobAction::Waiting,
        Ok(pb::JobAction::InProgress) => JobAction::InProgress,
        Ok(pb::JobAction::Completed) => JobAction::Completed,
        Ok(pb::JobAction::Unspecified) => {
            return Err(Status::invalid_argument("event.action is required"));
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "event.action {} is not a known JobAction",
                ev.action
            )));
        }
    };
    if ev.labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "event.labels has {} labels; at most {MAX_LABELS} are allowed",
            ev.labels.len()
        )));
    }
    // The field name is only formatted for the error (hot path).
    if let Some(i) = ev.labels.iter().position(|l| l.len() > MAX_FIELD_LEN) {
        check_len(&format!("event.labels[{i}]"), &ev.labels[i])?;
    }
    for (field, v) in [
        ("event.delivery_id", &ev.delivery_id),
        ("event.runner_name", &ev.runner_name),
        ("event.repository", &ev.repository),
        ("event.organization", &ev.organization),
        ("event.conclusion", &ev.conclusion),
        ("event.job_name", &ev.job_name),
        ("event.workflow_name", &ev.workflow_name),
    ] {
        check_len(field, v)?;
    }
    Ok(JobEvent {
        delivery_id: ev.delivery_id,
        action,
        job_id: ev.job_id,
        run_id: ev.run_id,
        run_attempt: ev.run_attempt,
        labels: ev.labels,
        runner_id: ev.runner_id,
        runner_name: ev.runner_name,
        repository: ev.repository,
        organization: ev.organization,
        installation_id: ev.installation_id,
        conclusion: ev.conclusion,
        job_name: ev.job_name,
        workflow_name: ev.workflow_name,
    })
}

impl ControlPlaneService {
    async fn pool_message(&self, pool: &crate::pools::Pool) -> Result<pb::Pool, Status> {
        let ov = self
            .store
            .pool_overrides(&pool.name)
            .await
            .map_err(store_status)?;
        let in_use = self
            .store
            .pool_in_use(&pool.name)
            .await
            .map_err(store_status)?;
        let queued = self
            .store
            .queue_depth(&Queue::Provision(pool.name.clone()))
            .await
            .map_err(store_status)?;
        let warm = self
            .store
            .pool_warm(&pool.name)
            .await
            .map_err(store_status)?;
        Ok(pb::Pool {
            name: pool.name.clone(),
            labels: pool.config.labels.clone(),
            provisioner: pool.provisioner.kind().to_owned(),
            max_instances: ov.max_instances.unwrap_or(pool.config.max_instances),
            min_idle: ov.min_idle.unwrap_or(pool.config.min_idle),
            paused: ov.paused.unwrap_or(pool.config.paused),
            instances_in_use: in_use,
            jobs_queued: queued.depth,
            instances_warm: u32::try_from(warm.len()).unwrap_or(u32::MAX),
        })
    }

    fn pool(&self, name: &str) -> Result<&crate::pools::Pool, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        self.pools
            .get(name)
            .ok_or_else(|| Status::not_found(format!("pool {name:?} is not configured")))
    }
}

#[tonic::async_trait]
impl ControlPlane for ControlPlaneService {
    async fn submit_job_event(
        &self,
        req: Request<pb::SubmitJobEventRequest>,
    ) -> Result<Response<pb::SubmitJobEventResponse>, Status> {
        let ev = validate_event(req.into_inner().event)?;
        if let Some(answer) = self.foreign(&ev) {
            return Ok(Response::new(answer));
        }
        let routed = self.pools.route(&ev.labels).map(|p| p.name.as_str());
        let r = self
            .store
            .submit_event(&ev, routed, now_ms())
            .await
            .map_err(store_status)?;
        Ok(Response::new(submit_response(&ev, r, false)))
    }

    async fn submit_job_events(
        &self,
        req: Request<pb::SubmitJobEventsRequest>,
    ) -> Result<Response<pb::SubmitJobEventsResponse>, Status> {
        let pb::SubmitJobEventsRequest {
            events,
            outcomes_only,
        } = req.into_inner();
        if events.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "events has {} events; at most {MAX_BATCH} are allowed per call",
                events.len()
            )));
        }
        // Invalid and foreign events are answered on their own; the others
        // go to the store as one batch.
        type Foreign = Box<pb::SubmitJobEventResponse>;
        let checked: Vec<Result<Result<JobEvent, Foreign>, Status>> = events
            .into_iter()
            .map(|e| {
                validate_event(Some(e)).map(|ev| match self.foreign(&ev) {
                    Some(answer) => Err(Box::new(answer)),
                    None => Ok(ev),
                })
            })
            .collect();
        let batch: Vec<(&JobEvent, Option<&str>)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok()?.as_ref().ok())
            .map(|ev| (ev, self.pools.route(&ev.labels).map(|p| p.name.as_str())))
            .collect();
        let mut recorded = self
            .store
            .submit_events(&batch, now_ms())
            .await
            .map_err(store_status)?
            .into_iter();
        let mut results = Vec::with_capacity(checked.len());
        for c in checked {
            let result = match c {
                Ok(Err(foreign)) => pb::submit_job_event_result::Result::Response(*foreign),
                Ok(Ok(ev)) => {
                    let r = recorded.next().ok_or_else(|| {
                        Status::internal("the store answered fewer results than events")
                    })?;
                    pb::submit_job_event_result::Result::Response(submit_response(
                        &ev,
                        r,
                        outcomes_only,
                    ))
                }
                Err(status) => pb::submit_job_event_result::Result::Error((&status).into()),
            };
            results.push(pb::SubmitJobEventResult {
                result: Some(result),
            });
        }
        Ok(Response::new(pb::SubmitJobEventsResponse { results }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = req.into_inner().job_id;
        if id == 0 {
            return Err(Status::invalid_argument("job_id is required"));
        }
        match self.store.get_job(id).await.map_err(store_status)? {
            Some(j) => Ok(Response::new(j.to_proto())),
            None => Err(Status::not_found(format!("job {id} is not recorded"))),
        }
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = req.into_inner();
        let pool = if r.pool.is_empty() {
            None
        } else {
            Some(self.pool(&r.pool)?.name.as_str())
        };
        let state = match pb::JobState::try_from(r.state) {
            Ok(s) => JobState::from_proto(s),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "state {} is not a known JobState",
                    r.state
                )));
            }
        };
        let limit = match r.page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(Status::invalid_argument("page_size must be at most 1000"));
            }
            n => n as usize,
        };
        let cursor = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse::<u64>().map_err(|_| {
                Status::invalid_argument("page_token is not a token this server issued")
            })?
        };
        let (jobs, next) = self
            .store
            .list_jobs(pool, state, cursor, limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|j| j.to_proto()).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let r = req.into_inner();
        let pool = if r.pool.is_empty() {
            None
        } else {
            Some(self.pool(&r.pool)?.name.as_str())
        };
        let list = self
            .store
            .list_instances(pool, r.include_deleted)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: list.iter().map(|i| i.to_proto()).collect(),
        }))
    }

    async fn get_instance(
        &self,
        req: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let name = req.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        match self.store.get_instance(&name).await.map_err(store_status)? {
            Some(i) => Ok(Response::new(i.to_proto())),
            None => Err(Status::not_found(format!(
                "instance {name:?} is not managed by GRS"
            ))),
        }
    }

    async fn delete_instance(
        &self,
        req: Request<pb::DeleteInstanceRequest>,
    ) -> Result<Response<pb::DeleteInstanceResponse>, Status> {
        let name = req.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        match self
            .store
            .enqueue_teardown(&name, "deleted by an operator", now_ms())
            .await
            .map_err(store_status)?
        {
            None => Err(Status::not_found(format!(
                "instance {name:?} is not managed by GRS"
            ))),
            Some(queued) => {
                tracing::info!(instance = %name, queued, "operator deleted instance");
                let inst = self.store.get_instance(&name).await.map_err(store_status)?;
                Ok(Response::new(pb::DeleteInstanceResponse {
                    instance: inst.map(|i| i.to_proto()),
                }))
            }
        }
    }

    async fn list_pools(
        &self,
        _req: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let mut pools = Vec::new();
        for p in self.pools.iter() {
            pools.push(self.pool_message(p).await?);
        }
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let name = req.into_inner().name;
        let pool = self.pool(&name)?;
        Ok(Response::new(self.pool_message(pool).await?))
    }

    async fn update_pool(
        &self,
        req: Request<pb::UpdatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let r = req.into_inner();
        let pool = self.pool(&r.name)?;
        let current = self
            .store
            .pool_overrides(&pool.name)
            .await
            .map_err(store_status)?;
        let max = r
            .max_instances
            .or(current.max_instances)
            .unwrap_or(pool.config.max_instances);
        let min_idle = r
            .min_idle
            .or(current.min_idle)
            .unwrap_or(pool.config.min_idle);
        if min_idle > max {
            return Err(Status::invalid_argument(format!(
                "min_idle ({min_idle}) must not exceed max_instances ({max})"
            )));
        }
        let update = PoolOverrides {
            paused: r.paused,
            min_idle: r.min_idle,
            max_instances: r.max_instances,
        };
        self.store
            .update_pool_overrides(&pool.name, &update)
            .await
            .map_err(store_status)?;
        tracing::info!(pool = %pool.name, ?update, "pool updated");
        Ok(Response::new(self.pool_message(pool).await?))
    }

    async fn get_stats(
        &self,
        _req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        let mut stats = pb::Stats::default();
        for p in self.pools.iter() {
            let q = self
                .store
                .queue_depth(&Queue::Provision(p.name.clone()))
                .await
                .map_err(store_status)?;
            stats.provision_queue_depth += q.depth;
            stats.provision_queue_pending += q.pending;
            let msg = self.pool_message(p).await?;
            stats.pools.push(pb::PoolUsage {
                pool: p.name.clone(),
                instances_in_use: msg.instances_in_use,
                max_instances: msg.max_instances,
                jobs_queued: q.depth,
            });
        }
        let t = self
            .store
            .queue_depth(&Queue::Teardown)
            .await
            .map_err(store_status)?;
        stats.teardown_queue_depth = t.depth;
        stats.teardown_queue_pending = t.pending;
        Ok(Response::new(stats))
    }

    type WatchEventsStream = BoxStream<'static, Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let pool = req.into_inner().pool;
        let pool = if pool.is_empty() {
            None
        } else {
            Some(self.pool(&pool)?.name.clone())
        };
        let stream = self.store.watch(pool).await.map_err(store_status)?;
        let stream = stream
            .map(|r| r.map(|e| e.to_proto()).map_err(store_status))
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(stream.boxed()))
    }

    async fn get_bootstrap_document(
        &self,
        req: Request<pb::GetBootstrapDocumentRequest>,
    ) -> Result<Response<pb::GetBootstrapDocumentResponse>, Status> {
        let r = req.into_inner();
        let doc = pb::BootstrapDocument::try_from(r.document)
            .ok()
            .filter(|d| *d != pb::BootstrapDocument::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument(
                    "document is required (META_DATA, USER_DATA, VENDOR_DATA or NETWORK_CONFIG)",
                )
            })?;
        // One answer for unknown, expired and used-up tokens: no hint.
        let not_found = || Status::not_found("no such bootstrap document");
        let name = bootstrap::redeem(&*self.store, &r.token)
            .await
            .map_err(store_status)?
            .ok_or_else(not_found)?;
        let instance = self
            .store
            .get_instance(&name)
            .await
            .map_err(store_status)?
            .ok_or_else(not_found)?;
        let pool = self.pools.get(&instance.pool).ok_or_else(not_found)?;
        let jit = if doc == pb::BootstrapDocument::UserData {
            bootstrap::sealed_secret(&*self.store, &r.token, &name)
                .await
                .map_err(store_status)?
        } else {
            None
        };
        let (content, content_type) = self.bootstrap_docs.render(doc, &instance, pool, jit).await.map_err(|e| {
            tracing::warn!(instance = %name, document = ?doc, error = %e, "cannot render bootstrap document");
            Status::unavailable(format!("cannot render {doc:?} for {name}: {e}"))
        })?;
        tracing::info!(instance = %name, document = ?doc, "served bootstrap document");
        Ok(Response::new(pb::GetBootstrapDocumentResponse {
            content,
            content_type: content_type.to_owned(),
            instance_name: name,
        }))
    }
}
