//! The gateway's gRPC client to the control plane: a few lazily connected
//! HTTP/2 connections (each reconnects by itself), an optional bearer token
//! on every call, optional TLS, and a deadline per call so no webhook answer
//! can take longer than GitHub waits.
//!
//! Why several connections: a server handles one HTTP/2 connection's frames
//! on one task, so a single connection caps what a multi-core control plane
//! can take from one gateway.
//!
//! # Batching (group commit)
//! Job events go to the control plane in `SubmitJobEvents` batches: each
//! connection has one sender task with at most one call in flight; a sender
//! that is free takes every event waiting (up to [`MAX_BATCH`] events and
//! about [`MAX_BATCH_BYTES`]) and sends
//! them in one call. Nothing ever waits for a batch to fill: when the
//! gateway is idle a delivery goes out alone at once, and under load the
//! deliveries that arrive while the senders are busy share the next call,
//! so the per-call cost (HTTP/2 frames, a Redis round trip and script run)
//! is paid once per batch instead of once per delivery. Every delivery is
//! still answered only with its own event's result, once that event is
//! durably recorded; a failed call fails only the deliveries in it.
//! A control plane that predates `SubmitJobEvents` (UNIMPLEMENTED) is sent
//! single `SubmitJobEvent` calls from then on.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use prometheus_client::metrics::histogram::Histogram;
use prost::Message as _;
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{GatewayConfig, ResolvedSecrets};

/// Most events in one `SubmitJobEvents` call (the wire limit).
pub use grs_proto::MAX_BATCH;
/// A batch stops growing once its events' encoded size reaches this: well
/// under the 4 MiB a gRPC server accepts by default, even though one event
/// may carry up to ~30 KB of labels and names.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Events waiting for a sender; beyond this, deliveries wait for room (and
/// answer 503 if none comes within the deadline).
const QUEUE_CAPACITY: usize = 8 * MAX_BATCH;

/// A cheap-to-clone handle on the control plane.
#[derive(Clone)]
pub struct ControlPlane {
    clients: Arc<[ControlPlaneClient<Channel>]>,
    next: Arc<AtomicUsize>,
    settings: CallSettings,
    batcher: Arc<Batcher>,
    /// Observes the size of every `SubmitJobEvents` call.
    batch_sizes: Histogram,
}

/// One delivery's event waiting for a sender, and where its answer goes.
struct Pending {
    event: pb::JobEvent,
    reply: Reply,
}

/// Where one delivery's answer goes.
type Reply = oneshot::Sender<Result<pb::SubmitJobEventResponse, tonic::Status>>;

/// The queue between webhook handlers and the sender tasks.
struct Batcher {
    tx: mpsc::Sender<Pending>,
    /// Taken by the sender tasks when they start (on first use, inside the
    /// runtime; `ControlPlane::new` may run outside one).
    rx: std::sync::Mutex<Option<mpsc::Receiver<Pending>>>,
    start: Once,
    /// [`MODE_UNKNOWN`] until the first batch call answers, then
    /// [`MODE_BATCHES`], or [`MODE_SINGLES`] for a control plane without
    /// `SubmitJobEvents`.
    mode: AtomicU8,
}

const MODE_UNKNOWN: u8 = 0;
const MODE_BATCHES: u8 = 1;
const MODE_SINGLES: u8 = 2;

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("auth", &self.settings.auth.is_some())
            .field("timeout", &self.settings.timeout)
            .finish()
    }
}

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("control plane endpoint: {0}")]
pub struct EndpointError(String);

impl ControlPlane {
    /// A handle for `config`; does not connect until the first call, so the
    /// gateway starts (and answers 503) while the control plane is down.
    /// `batch_sizes` observes the events of every `SubmitJobEvents` call.
    pub fn new(
        config: &GatewayConfig,
        secrets: &ResolvedSecrets,
        batch_sizes: Histogram,
    ) -> Result<Self, EndpointError> {
        let mut ep = Endpoint::from_shared(config.control_plane_url.clone())
            .map_err(|e| EndpointError(e.to_string()))?
            .connect_timeout(config.control_plane_timeout.min(Duration::from_secs(2)))
            .timeout(config.control_plane_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if config.control_plane_url.starts_with("https://") || secrets.tls_ca_pem.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &secrets.tls_ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some(d) = &config.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| EndpointError(e.to_string()))?;
        }
        let auth = match &secrets.auth_token {
            Some(t) => {
                let mut v: MetadataValue<_> = format!("Bearer {}", t.expose_secret())
                    .parse()
                    .map_err(|_| {
                        EndpointError(
                            "`gateway.auth_token` has characters not allowed in a header".into(),
                        )
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        Ok(Self {
            clients: (0..config.control_plane_connections.max(1))
                .map(|_| ControlPlaneClient::new(ep.connect_lazy()))
                .collect(),
            next: Arc::new(AtomicUsize::new(0)),
            settings: CallSettings {
                auth,
                timeout: config.control_plane_timeout,
            },
            batcher: Arc::new(Batcher {
                tx,
                rx: std::sync::Mutex::new(Some(rx)),
                start: Once::new(),
                mode: AtomicU8::new(MODE_UNKNOWN),
            }),
            batch_sizes,
        })
    }

    fn client(&self) -> ControlPlaneClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// Records one job event; answers once the control plane has durably
    /// recorded it (or refused it), within the configured deadline. The
    /// event shares a `SubmitJobEvents` call with the others waiting (see
    /// the module docs).
    pub async fn submit(
        &self,
        event: pb::JobEvent,
    ) -> Result<pb::SubmitJobEventResponse, tonic::Status> {
        self.start_senders();
        let (reply, answer) = oneshot::channel();
        let queued_and_answered = async {
            self.batcher
                .tx
                .send(Pending { event, reply })
                .await
                .map_err(|_| tonic::Status::unavailable("the gateway is shutting down"))?;
            answer.await.unwrap_or_else(|_| {
                Err(tonic::Status::unavailable(
                    "the gateway stopped before the control plane answered",
                ))
            })
        };
        tokio::time::timeout(self.settings.timeout, queued_and_answered)
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "control plane did not answer in time",
                ))
            })
    }

    /// Starts one sender task per connection, once.
    fn start_senders(&self) {
        self.batcher.start.call_once(|| {
            let Some(rx) = self.batcher.rx.lock().ok().and_then(|mut r| r.take()) else {
                return;
            };
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for client in self.clients.iter() {
                let sender = Sender {
                    client: client.clone(),
                    settings: self.settings.clone(),
                    batch_sizes: self.batch_sizes.clone(),
                };
                // A weak handle: the senders must not keep the queue open.
                tokio::spawn(sender.run(rx.clone(), Arc::downgrade(&self.batcher)));
            }
        });
    }

    /// `GetBootstrapDocument`.
    pub async fn bootstrap_document(
        &self,
        token: String,
        document: pb::BootstrapDocument,
    ) -> Result<pb::GetBootstrapDocumentResponse, tonic::Status> {
        let req = self.settings.request(pb::GetBootstrapDocumentRequest {
            token,
            document: document as i32,
        });
        let mut client = self.client();
        with_deadline(self.settings.timeout, client.get_bootstrap_document(req)).await
    }
}

/// The deadline and bearer token every call carries.
#[derive(Clone)]
struct CallSettings {
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
}

impl CallSettings {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.timeout);
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        req
    }
}

/// One connection's sender task: at most one call in flight.
struct Sender {
    client: ControlPlaneClient<Channel>,
    settings: CallSettings,
    batch_sizes: Histogram,
}

impl Sender {
    /// Takes whatever is waiting and sends it, until every `ControlPlane`
    /// handle is gone (the queue then closes and `recv` ends). Every
    /// delivery taken from the queue gets an answer.
    async fn run(
        mut self,
        rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
        batcher: std::sync::Weak<Batcher>,
    ) {
        loop {
            let mut batch = {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { return };
                let mut bytes = first.event.encoded_len();
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(p) => {
                            bytes += p.event.encoded_len();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                batch
            };
            // A delivery whose deadline passed was answered 503 already
            // (GitHub shows it failed; it can be redelivered): not sent.
            batch.retain(|p| !p.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            let Some(mode) = batcher.upgrade().map(|b| b.mode.load(Ordering::Relaxed)) else {
                return;
            };
            if mode == MODE_SINGLES {
                self.send_singly(batch).await;
                continue;
            }
            self.batch_sizes.observe(batch.len() as f64);
            // Until a batch call has worked, the events are kept so that a
            // control plane without `SubmitJobEvents` can be sent them one
            // by one instead.
            let (events, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.event, p.reply)).unzip();
            let kept = (mode == MODE_UNKNOWN).then(|| events.clone());
            let req = self.settings.request(pb::SubmitJobEventsRequest {
                events,
                outcomes_only: true,
            });
            let answer = with_deadline(self.settings.timeout, self.client.submit_job_events(req))
                .await
                .map(|r| r.results);
            match answer {
                Ok(results) if results.len() == replies.len() => {
                    if mode == MODE_UNKNOWN
                        && let Some(b) = batcher.upgrade()
                    {
                        b.mode.store(MODE_BATCHES, Ordering::Relaxed);
                    }
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(event_result(result));
                    }
                }
                Ok(results) => {
                    let n = replies.len();
                    fail_all(
                        replies,
                        tonic::Status::internal(format!(
                            "control plane answered {} results for {n} events",
                            results.len()
                        )),
                    );
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(
                        "the control plane does not know SubmitJobEvents (an older version?): \
                         sending one SubmitJobEvent per delivery from now on"
                    );
                    if let Some(b) = batcher.upgrade() {
                        b.mode.store(MODE_SINGLES, Ordering::Relaxed);
                    }
                    match kept {
                        // Nothing of the batch was recorded: each event goes again.
                        Some(events) => {
                            let batch = events
                                .into_iter()
                                .zip(replies)
                                .map(|(event, reply)| Pending { event, reply })
                                .collect();
                            self.send_singly(batch).await;
                        }
                        // The control plane changed under us after batches
                        // worked: the events were not recorded, so the
                        // deliveries fail as "unavailable" (503) for GitHub
                        // to redeliver, not as a hard error.
                        None => fail_all(
                            replies,
                            tonic::Status::unavailable(format!(
                                "control plane stopped accepting SubmitJobEvents: {}",
                                status.message()
                            )),
                        ),
                    }
                }
                Err(status) => fail_all(replies, status),
            }
        }
    }

    /// One `SubmitJobEvent` call per event, all at once.
    async fn send_singly(&self, batch: Vec<Pending>) {
        let calls = batch.into_iter().map(|p| {
            let mut client = self.client.clone();
            let req = self.settings.request(pb::SubmitJobEventRequest {
                event: Some(p.event),
            });
            async move {
                let r = with_deadline(self.settings.timeout, client.submit_job_event(req)).await;
                let _ = p.reply.send(r);
            }
        });
        futures::future::join_all(calls).await;
    }
}

/// `call`'s answer, or DEADLINE_EXCEEDED after `timeout`.
async fn with_deadline<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(
                "control plane did not answer in time",
            ))
        })
        .map(tonic::Response::into_inner)
}

/// Answers every delivery of a failed call with `status`.
fn fail_all(replies: Vec<Reply>, status: tonic::Status) {
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}

/// One event's result of a batch, as a single call would have answered.
fn event_result(r: pb::SubmitJobEventResult) -> Result<pb::SubmitJobEventResponse, tonic::Status> {
    match r.result {
        Some(pb::submit_job_event_result::Result::Response(r)) => Ok(r),
        Some(pb::submit_job_event_result::Result::Error(e)) => Err(e.into()),
        None => Err(tonic::Status::internal(
            "control plane answered an empty result for an event",
        )),
    }
}
