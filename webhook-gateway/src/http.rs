//! The HTTP routes: `POST /webhook`, `GET /cloud-init/{token}/{document}`,
//! `GET /healthz`, `GET /metrics`.
//!
//! `/webhook` answers, in this order of checks:
//! 413 body above `max_body_bytes` · 401 missing or wrong signature ·
//! 400 no `X-GitHub-Event` / `X-GitHub-Delivery` · 415 content type neither
//! JSON nor form · 400 body that does not parse (invalid or truncated JSON,
//! no `workflow_job.id`, too many labels) · 204 event or action GRS ignores ·
//! 200 ping · 202 the control plane durably recorded the event (also when it
//! was stale) · 202 an event from outside the configured organisation,
//! repository or App installation (answered, not recorded) · 200 a replayed delivery id the control plane already had ·
//! 400 the control plane refused it as invalid · 503 the control plane is
//! unreachable or timed out. Every non-2xx answer is logged with its
//! reason and the delivery id; bodies and secrets never are. Accepted
//! events are logged at debug only (the `grs_gateway_deliveries_total`
//! metric counts them): an info line per delivery costs a third of the
//! gateway's throughput (see BENCH.md).
//!
//! The signature is checked before anything else is read, so unsigned
//! traffic costs one HMAC and nothing reaches the control plane without a
//! valid signature. De-duplication is the control plane's (by delivery id):
//! the gateway keeps no state, so any number of replicas can run.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use grs_github::signature;
use grs_github::webhook::{self, BodyEncoding, Delivery};
use grs_proto::v1 as pb;
use secrecy::{ExposeSecret, SecretString};

use crate::control_plane::ControlPlane;
use crate::metrics::{BootstrapLabels, DeliveryLabels, Metrics};

/// The longest `X-GitHub-Delivery` accepted (GitHub sends 36-byte GUIDs).
pub const MAX_DELIVERY_ID_LEN: usize = 128;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The secret deliveries are signed with.
    pub webhook_secret: SecretString,
    /// The control plane.
    pub control_plane: ControlPlane,
    /// The metrics.
    pub metrics: Metrics,
}

/// The gateway's routes over `state`: bodies above `max_body_bytes` are
/// refused (413), requests running past `request_timeout` answered 408.
pub fn router(state: Arc<AppState>, config: &crate::GatewayConfig) -> Router {
    Router::new()
        .route("/webhook", post(webhook))
        .route("/cloud-init/{token}/{document}", get(cloud_init))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .with_state(state)
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

/// What became of a webhook delivery: its HTTP answer and its
/// `grs_gateway_deliveries_total` `outcome` label, one variant each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// 413: the body is above `gateway.max_body_bytes`.
    TooLarge,
    /// 400: the body could not be read.
    Unreadable,
    /// 401: missing or wrong signature.
    Unauthorized,
    /// 400: no `X-GitHub-Event`.
    MissingEvent,
    /// 400: no `X-GitHub-Delivery`.
    MissingDelivery,
    /// 400: an `X-GitHub-Delivery` above [`MAX_DELIVERY_ID_LEN`].
    BadDelivery,
    /// 415: neither JSON nor form encoded.
    UnsupportedMediaType,
    /// 400: the payload does not parse.
    Malformed,
    /// 200: GitHub's ping.
    Ping,
    /// 204: an event or action GRS does not act on.
    Ignored,
    /// 202: the control plane durably recorded the event.
    Accepted,
    /// 200: a replayed delivery the control plane already had.
    Duplicate,
    /// 202: recorded; the job was already past it.
    Stale,
    /// 202: from outside the configured organisation, repository or
    /// installation; not recorded.
    Foreign,
    /// 400: the control plane refused the event as invalid.
    Refused,
    /// 503: the control plane is unreachable, timed out or overloaded
    /// (GitHub shows a failed, redeliverable delivery).
    Unavailable,
    /// 500: the control plane failed otherwise.
    Error,
}

impl WebhookOutcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Unreadable
            | Self::MissingEvent
            | Self::MissingDelivery
            | Self::BadDelivery
            | Self::Malformed
            | Self::Refused => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Ping => "ping",
            Self::Ignored => "ignored",
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Foreign => "foreign",
            Self::Unavailable => "unavailable",
            Self::Error => "error",
        }
    }

    /// The HTTP status GitHub gets.
    pub fn status(self) -> StatusCode {
        match self {
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unreadable
            | Self::MissingEvent
            | Self::MissingDelivery
            | Self::BadDelivery
            | Self::Malformed
            | Self::Refused => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Ping | Self::Duplicate => StatusCode::OK,
            Self::Ignored => StatusCode::NO_CONTENT,
            Self::Accepted | Self::Stale | Self::Foreign => StatusCode::ACCEPTED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Error => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The answer's body (none for 204).
    fn body(self) -> &'static str {
        match self {
            Self::TooLarge => "payload too large\n",
            Self::Unreadable => "cannot read body\n",
            Self::Unauthorized => "bad signature\n",
            Self::MissingEvent => "missing X-GitHub-Event\n",
            Self::MissingDelivery => "missing X-GitHub-Delivery\n",
            Self::BadDelivery => "bad X-GitHub-Delivery\n",
            Self::UnsupportedMediaType => "unsupported content type\n",
            Self::Malformed => "malformed payload\n",
            Self::Ping => "pong\n",
            Self::Ignored => "",
            Self::Accepted => "accepted\n",
            Self::Duplicate => "duplicate delivery\n",
            Self::Stale => "stale\n",
            Self::Foreign => "not this installation's\n",
            Self::Refused => "refused\n",
            Self::Unavailable | Self::Error => "control plane unavailable\n",
        }
    }

    /// The HTTP answer.
    pub fn response(self) -> Response {
        match self {
            Self::Ignored => self.status().into_response(),
            _ => text(self.status(), self.body()),
        }
    }
}

async fn webhook(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (event, outcome) = handle_webhook(&st, &headers, body).await;
    st.metrics
        .deliveries
        .get_or_create(&DeliveryLabels {
            event,
            outcome: outcome.label(),
        })
        .inc();
    st.metrics
        .delivery_seconds
        .observe(started.elapsed().as_secs_f64());
    outcome.response()
}

/// Returns (event label, outcome).
async fn handle_webhook(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (&'static str, WebhookOutcome) {
    let delivery = header_str(headers, "x-github-delivery").unwrap_or("-");
    // Bounded, so a hostile header cannot flood the log. Slicing by bytes is
    // safe: `to_str` only succeeds on visible ASCII.
    let delivery = &delivery[..delivery.len().min(64)];
    let event_name = header_str(headers, "x-github-event").unwrap_or("");
    let event_label = match event_name {
        "workflow_job" => "workflow_job",
        "ping" => "ping",
        _ => "other",
    };
    let body = match body {
        Ok(b) => b,
        Err(rej) => {
            let status = rej.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                tracing::warn!(
                    delivery,
                    "webhook refused: body larger than gateway.max_body_bytes"
                );
                return (event_label, WebhookOutcome::TooLarge);
            }
            tracing::warn!(delivery, %status, "webhook refused: cannot read body: {}", rej.body_text());
            return (event_label, WebhookOutcome::Unreadable);
        }
    };
    let sig = headers
        .get(signature::SIGNATURE_HEADER)
        .map(HeaderValue::as_bytes);
    if let Err(e) = signature::verify(st.webhook_secret.expose_secret().as_bytes(), &body, sig) {
        tracing::warn!(delivery, event = event_label, "webhook refused: {e}");
        return (event_label, WebhookOutcome::Unauthorized);
    }
    if event_name.is_empty() {
        tracing::warn!(delivery, "webhook refused: no X-GitHub-Event header");
        return (event_label, WebhookOutcome::MissingEvent);
    }
    let Some(delivery_id) = header_str(headers, "x-github-delivery") else {
        tracing::warn!(
            event = event_label,
            "webhook refused: no X-GitHub-Delivery header"
        );
        return (event_label, WebhookOutcome::MissingDelivery);
    };
    // GitHub's delivery ids are GUIDs; the control plane keys its
    // de-duplication on them, so an outsized one is refused here.
    if delivery_id.len() > MAX_DELIVERY_ID_LEN {
        tracing::warn!(
            delivery,
            event = event_label,
            "webhook refused: X-GitHub-Delivery longer than {MAX_DELIVERY_ID_LEN} bytes"
        );
        return (event_label, WebhookOutcome::BadDelivery);
    }
    let encoding = match BodyEncoding::from_content_type(header_str(headers, "content-type")) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(delivery, event = event_label, "webhook refused: {e}");
            return (event_label, WebhookOutcome::UnsupportedMediaType);
        }
    };
    let job = match webhook::parse(event_name, encoding, &body) {
        Ok(Delivery::WorkflowJob(job)) => job,
        Ok(Delivery::Ping(p)) => {
            tracing::info!(delivery, hook_id = p.hook_id, "ping from GitHub: {}", p.zen);
            return (event_label, WebhookOutcome::Ping);
        }
        Ok(Delivery::Ignored { reason }) => {
            tracing::debug!(delivery, "ignoring delivery: {reason}");
            return (event_label, WebhookOutcome::Ignored);
        }
        Err(e) => {
            tracing::warn!(delivery, event = event_label, "webhook refused: {e}");
            return (event_label, WebhookOutcome::Malformed);
        }
    };
    let action = job.job_action().as_str();
    let job_id = job.job_id;
    let event = match crate::convert::job_event(&job, delivery_id) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(delivery, event = event_label, "webhook refused: {e}");
            return (event_label, WebhookOutcome::Malformed);
        }
    };
    match st.control_plane.submit(event).await {
        Ok(r) => {
            match pb::SubmitOutcome::try_from(r.outcome).unwrap_or(pb::SubmitOutcome::Unspecified) {
                pb::SubmitOutcome::DuplicateDelivery => {
                    tracing::debug!(
                        delivery,
                        job_id,
                        action,
                        "replayed delivery: already recorded"
                    );
                    (event_label, WebhookOutcome::Duplicate)
                }
                pb::SubmitOutcome::Foreign => {
                    tracing::info!(
                        delivery,
                        job_id,
                        action,
                        "event from outside the configured organisation/repository/installation: not recorded"
                    );
                    (event_label, WebhookOutcome::Foreign)
                }
                pb::SubmitOutcome::Stale => {
                    tracing::debug!(
                        delivery,
                        job_id,
                        action,
                        "stale event recorded: the job is already past it"
                    );
                    (event_label, WebhookOutcome::Stale)
                }
                _ => {
                    tracing::debug!(delivery, job_id, action, "job event accepted");
                    (event_label, WebhookOutcome::Accepted)
                }
            }
        }
        Err(status) => {
            st.metrics
                .count_control_plane_error("SubmitJobEvents", &status);
            let outcome = outcome_of(&status);
            if outcome == WebhookOutcome::Refused {
                tracing::warn!(
                    delivery,
                    job_id,
                    action,
                    "webhook refused by the control plane: {}",
                    status.message()
                );
            } else {
                tracing::error!(delivery, job_id, action, code = ?status.code(), "control plane did not take the event, GitHub will see a failed delivery: {}", status.message());
            }
            (event_label, outcome)
        }
    }
}

/// What a control-plane error means for a delivery (and, mapped to a
/// status, for a cloud-init request).
fn outcome_of(s: &tonic::Status) -> WebhookOutcome {
    use tonic::Code;
    match s.code() {
        Code::InvalidArgument => WebhookOutcome::Refused,
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unknown => WebhookOutcome::Unavailable,
        _ => WebhookOutcome::Error,
    }
}

async fn cloud_init(
    State(st): State<Arc<AppState>>,
    Path((token, document)): Path<(String, String)>,
) -> Response {
    let (doc, name) = match document.as_str() {
        "meta-data" => (pb::BootstrapDocument::MetaData, "meta-data"),
        "user-data" => (pb::BootstrapDocument::UserData, "user-data"),
        "vendor-data" => (pb::BootstrapDocument::VendorData, "vendor-data"),
        "network-config" => (pb::BootstrapDocument::NetworkConfig, "network-config"),
        _ => return not_found(),
    };
    let count = |outcome| {
        st.metrics
            .bootstrap
            .get_or_create(&BootstrapLabels {
                document: name,
                outcome,
            })
            .inc()
    };
    // Tokens are URL-safe and short; anything else cannot be one, and is
    // refused without a round trip. The token itself is never logged.
    if token.is_empty()
        || token.len() > 256
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        count("not_found");
        tracing::info!(document = name, "cloud-init request with a malformed token");
        return not_found();
    }
    match st.control_plane.bootstrap_document(token, doc).await {
        Ok(r) => {
            count("served");
            tracing::info!(document = name, instance = %r.instance_name, "served cloud-init document");
            let ct = if r.content_type.is_empty() {
                "text/plain".to_string()
            } else {
                r.content_type
            };
            let mut resp = (StatusCode::OK, r.content).into_response();
            if let Ok(v) = HeaderValue::from_str(&ct) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(s) if s.code() == tonic::Code::NotFound => {
            count("not_found");
            tracing::info!(
                document = name,
                "cloud-init request with an unknown, expired or used-up token"
            );
            not_found()
        }
        Err(s) => {
            st.metrics
                .count_control_plane_error("GetBootstrapDocument", &s);
            let outcome = outcome_of(&s);
            count(if outcome == WebhookOutcome::Unavailable {
                "unavailable"
            } else {
                "error"
            });
            tracing::error!(document = name, code = ?s.code(), "cannot serve cloud-init document: {}", s.message());
            let http = match outcome {
                WebhookOutcome::Refused => StatusCode::NOT_FOUND,
                o => o.status(),
            };
            text(http, "unavailable\n")
        }
    }
}

/// The same bare 404 for every token problem: no hint which it was.
fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n")
}
