//! A scripted fake of `grs.v1.ControlPlane`, served over a real socket on
//! `127.0.0.1:0` (linkerd2-proxy style: the real generated service, not a
//! mock of our own functions). Shared by the gateway's tests and its
//! benchmark (`#[path]`-included).
//!
//! Behaviour: de-duplicates submitted events by delivery id like the real
//! control plane (DUPLICATE_DELIVERY), records what it accepted, answers
//! scripted errors or delays first when told to, checks a bearer token when
//! given one, and serves bootstrap documents for the tokens it was given.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use tonic::{Request, Response, Status};

/// An extra step on every new (non-duplicate) event, e.g. writing to Redis
/// in the benchmark. Its error is the RPC's error.
pub type SubmitHook =
    Arc<dyn Fn(pb::JobEvent) -> BoxFuture<'static, Result<(), Status>> + Send + Sync>;

#[derive(Default)]
pub struct Script {
    /// Answered (in order) before normal handling.
    pub errors: VecDeque<Status>,
    /// Slept before answering every call.
    pub delay: Option<Duration>,
}

#[derive(Default)]
pub struct FakeState {
    pub seen_deliveries: HashSet<String>,
    /// Accepted events, in order.
    pub accepted: Vec<pb::JobEvent>,
    /// Every event submitted, duplicates included.
    pub calls: usize,
    /// `SubmitJobEvent` calls.
    pub single_calls: usize,
    /// The size of every `SubmitJobEvents` call, in order.
    pub batches: Vec<usize>,
    /// The `authorization` metadata of the last call.
    pub last_authorization: Option<String>,
    /// token → (document → (content, content type)).
    pub bootstrap: HashMap<String, HashMap<i32, (Vec<u8>, String)>>,
    /// Tokens asked for, to prove the gateway passed them through.
    pub tokens_asked: Vec<String>,
}

#[derive(Clone)]
pub struct FakeControlPlane {
    pub state: Arc<Mutex<FakeState>>,
    pub script: Arc<Mutex<Script>>,
    /// When set, calls without `authorization: Bearer <this>` fail.
    pub require_token: Option<String>,
    pub hook: Option<SubmitHook>,
    /// Keep accepted events in memory (off in the benchmark).
    pub record: bool,
    /// Answer UNIMPLEMENTED to `SubmitJobEvents`, like a control plane
    /// from before it existed.
    pub batch_unimplemented: bool,
}

pub struct Running {
    pub addr: SocketAddr,
    pub fake: FakeControlPlane,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

impl Default for FakeControlPlane {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            script: Arc::default(),
            require_token: None,
            hook: None,
            record: true,
            batch_unimplemented: false,
        }
    }
}

impl FakeControlPlane {
    pub async fn serve(self) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.serve_on(listener).await
    }

    /// Serves over TLS with the given certificate and key (PEM).
    pub async fn serve_tls(self, cert_pem: &str, key_pem: &str) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
        self.serve_with(listener, Some(tls)).await
    }

    pub async fn serve_on(self, listener: tokio::net::TcpListener) -> Running {
        self.serve_with(listener, None).await
    }

    async fn serve_with(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Running {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = ControlPlaneServer::new(self.clone());
        // No Nagle, like a real gRPC server should (else 40 ms stalls).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            },
        );
        let task = tokio::spawn(async move {
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls).unwrap();
            }
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Running {
            addr,
            fake: self,
            stop: Some(tx),
            task,
        }
    }

    pub fn accepted(&self) -> Vec<pb::JobEvent> {
        self.state.lock().unwrap().accepted.clone()
    }

    pub fn fail_next(&self, s: Status) {
        self.script.lock().unwrap().errors.push_back(s);
    }

    pub fn set_delay(&self, d: Option<Duration>) {
        self.script.lock().unwrap().delay = d;
    }

    pub fn add_bootstrap(&self, token: &str, doc: pb::BootstrapDocument, content: &str, ct: &str) {
        self.state
            .lock()
            .unwrap()
            .bootstrap
            .entry(token.into())
            .or_default()
            .insert(doc as i32, (content.as_bytes().to_vec(), ct.into()));
    }

    async fn prelude<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.state.lock().unwrap().last_authorization = auth.clone();
        let want = self.require_token.as_ref().map(|t| format!("Bearer {t}"));
        if want.is_some() && auth != want {
            return Err(Status::unauthenticated("missing or wrong bearer token"));
        }
        let (err, delay) = {
            let mut s = self.script.lock().unwrap();
            (s.errors.pop_front(), s.delay)
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl FakeControlPlane {
    /// One event, as `SubmitJobEvent` answers it.
    async fn submit_one(&self, ev: pb::JobEvent) -> Result<pb::SubmitJobEventResponse, Status> {
        if ev.delivery_id.is_empty() || ev.job_id == 0 {
            return Err(Status::invalid_argument(
                "delivery_id and job_id are required",
            ));
        }
        let fresh = {
            let mut st = self.state.lock().unwrap();
            st.calls += 1;
            st.seen_deliveries.insert(ev.delivery_id.clone())
        };
        if !fresh {
            return Ok(pb::SubmitJobEventResponse {
                outcome: pb::SubmitOutcome::DuplicateDelivery as i32,
                job: None,
            });
        }
        let hooked = match &self.hook {
            Some(h) => h(ev.clone()).await,
            None => Ok(()),
        };
        if let Err(e) = hooked {
            // Not recorded: a redelivery must be able to succeed.
            self.state
                .lock()
                .unwrap()
                .seen_deliveries
                .remove(&ev.delivery_id);
            return Err(e);
        }
        let job = pb::Job {
            job_id: ev.job_id,
            labels: ev.labels.clone(),
            ..Default::default()
        };
        if self.record {
            self.state.lock().unwrap().accepted.push(ev);
        }
        Ok(pb::SubmitJobEventResponse {
            outcome: pb::SubmitOutcome::Accepted as i32,
            job: Some(job),
        })
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl ControlPlane for FakeControlPlane {
    async fn submit_job_event(
        &self,
        req: Request<pb::SubmitJobEventRequest>,
    ) -> Result<Response<pb::SubmitJobEventResponse>, Status> {
        self.prelude(&req).await?;
        self.state.lock().unwrap().single_calls += 1;
        let ev = req
            .into_inner()
            .event
            .ok_or_else(|| Status::invalid_argument("event is required"))?;
        self.submit_one(ev).await.map(Response::new)
    }

    async fn submit_job_events(
        &self,
        req: Request<pb::SubmitJobEventsRequest>,
    ) -> Result<Response<pb::SubmitJobEventsResponse>, Status> {
        if self.batch_unimplemented {
            return Err(Status::unimplemented("SubmitJobEvents"));
        }
        self.prelude(&req).await?;
        let events = req.into_inner().events;
        self.state.lock().unwrap().batches.push(events.len());
        // The events' hooks run together; a failed hook fails its event only
        // (with the hook's code, which the gateway maps like a failed call).
        let results = futures::future::join_all(events.into_iter().map(|ev| self.submit_one(ev)))
            .await
            .into_iter()
            .map(|r| pb::SubmitJobEventResult {
                result: Some(match r {
                    Ok(r) => pb::submit_job_event_result::Result::Response(r),
                    Err(s) => pb::submit_job_event_result::Result::Error((&s).into()),
                }),
            })
            .collect();
        Ok(Response::new(pb::SubmitJobEventsResponse { results }))
    }

    async fn get_bootstrap_document(
        &self,
        req: Request<pb::GetBootstrapDocumentRequest>,
    ) -> Result<Response<pb::GetBootstrapDocumentResponse>, Status> {
        self.prelude(&req).await?;
        let r = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.tokens_asked.push(r.token.clone());
        let (content, content_type) = st
            .bootstrap
            .get(&r.token)
            .and_then(|docs| docs.get(&r.document))
            .cloned()
            .ok_or_else(|| Status::not_found("bootstrap token not found"))?;
        Ok(Response::new(pb::GetBootstrapDocumentResponse {
            content,
            content_type,
            instance_name: "grs-12877621891".into(),
        }))
    }

    async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_instances(
        &self,
        _: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_instance(
        &self,
        _: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_instance(
        &self,
        _: Request<pb::DeleteInstanceRequest>,
    ) -> Result<Response<pb::DeleteInstanceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_pool(&self, _: Request<pb::GetPoolRequest>) -> Result<Response<pb::Pool>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn update_pool(
        &self,
        _: Request<pb::UpdatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WatchEventsStream = EventStream;
    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
