//! The PVE API client: token auth, TLS, timeouts, retries, task waiting and
//! typed calls for the endpoints GRS uses.
//!
//! # Guarantees
//! - Every call has a connect and a total timeout ([`ProxmoxConfig`]).
//! - An error's text is read from the body's `message` (PVE >= 8.4), else
//!   from the status line's reason phrase (every release), and parameter
//!   errors from `errors`.
//! - Transient failures (connection trouble, timeouts, lock timeouts,
//!   gateway 5xx) are retried with capped exponential backoff and full
//!   jitter; permanent ones (400, 401, 403, 501, other 500s) never are.
//!   A call that is not idempotent is repeated only when PVE cannot have
//!   acted on it (the connection was never made, or PVE answered a lock
//!   timeout).
//! - The token secret travels only in a header marked sensitive; values the
//!   caller marks secret are scrubbed from every error text.
//! - Every `.await` is a cancellation point; dropping a call drops the
//!   request (PVE may still have acted on it).

//!
//! Layout: this module holds the client and the request types;
//! [`transport`](self) sends one call with retries, `tasks` waits for UPIDs,
//! `endpoints` has the typed calls and the answers' types.

mod endpoints;
mod tasks;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, ProxmoxConfig};

pub use endpoints::{Resource, split_tags};
use tasks::Estimate;
pub use tasks::TaskStatus;

/// One parameter of a request.
#[derive(Clone)]
pub struct Param {
    /// The parameter name as PVE spells it.
    pub key: String,
    /// Its value, as sent (booleans as `0`/`1`).
    pub value: String,
    /// A secret (seed URL, runner config): scrubbed from errors, never logged.
    pub sensitive: bool,
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = if self.sensitive {
            "[REDACTED]"
        } else {
            &self.value
        };
        write!(f, "{}={}", self.key, v)
    }
}

impl Param {
    /// A plain parameter.
    pub fn new(key: &str, value: impl ToString) -> Self {
        Self {
            key: key.to_owned(),
            value: value.to_string(),
            sensitive: false,
        }
    }
    /// A parameter whose value must never be shown.
    pub fn secret(key: &str, value: impl ToString) -> Self {
        Self {
            sensitive: true,
            ..Self::new(key, value)
        }
    }
    /// A PVE boolean (`0`/`1`).
    pub fn flag(key: &str, value: bool) -> Self {
        Self::new(key, if value { "1" } else { "0" })
    }
}

/// Whether a call may be repeated after an unclear failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating has the same effect (reads, PUT config, stop, delete).
    Idempotent,
    /// Repeating could act twice (agent exec): repeat only when PVE
    /// certainly did not act.
    NotIdempotent,
}

/// A request as sent, for the schema check in tests (see
/// [`PveClient::record_requests`]). Holds secret values: test use only.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path below `/api2/json`.
    pub path: String,
    /// Query or form parameters, in order.
    pub params: Vec<(String, String)>,
}

/// A task id, `UPID:node:pid:pstart:starttime:type:id:user:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    /// The whole UPID string.
    pub raw: String,
    /// The node the task runs on (where to ask about it).
    pub node: String,
    /// The task type (`qmclone`, `qmstart`, ...).
    pub kind: String,
}

impl Upid {
    /// Parses a UPID; `None` when it does not look like one.
    pub fn parse(raw: &str) -> Option<Self> {
        let parts: Vec<&str> = raw.split(':').collect();
        if parts.len() < 8 || parts[0] != "UPID" || parts[1].is_empty() {
            return None;
        }
        Some(Self {
            raw: raw.to_owned(),
            node: parts[1].to_owned(),
            kind: parts[5].to_owned(),
        })
    }
}

impl std::fmt::Display for Upid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

/// What a request-counting hook sees.
type Recorder = Arc<Mutex<Vec<RecordedRequest>>>;

/// The PVE API client. Cheap to share behind an `Arc`; one per PVE cluster.
pub struct PveClient {
    http: reqwest::Client,
    /// `https://host:port/api2/json`.
    base: url::Url,
    /// The address as configured, for error messages.
    origin: String,
    token_id: String,
    /// `PVEAPIToken=ID=SECRET`.
    auth: SecretString,
    request_timeout: Duration,
    task_timeout: Duration,
    attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    poll_min: Duration,
    poll_max: Duration,
    /// `task_expected`: the first poll of a task class never seen.
    task_expected: BTreeMap<String, Duration>,
    /// Learned task durations by task type, for adaptive polling.
    estimates: Mutex<HashMap<String, Estimate>>,
    /// Requests sent (attempts, retries included).
    sent: AtomicU64,
    recorder: Mutex<Option<Recorder>>,
}

impl std::fmt::Debug for PveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PveClient")
            .field("url", &self.origin)
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

impl PveClient {
    /// A client for `conn`. Reads the token secret and the CA file; makes no
    /// request yet.
    pub fn new(conn: &ProxmoxConfig) -> Result<Self, ConfigError> {
        conn.validate()?;
        let secret = conn.resolve_token_secret()?;
        let mut base =
            url::Url::parse(conn.url.trim_end_matches('/')).map_err(|e| ConfigError {
                key: "proxmox.url".into(),
                message: e.to_string(),
            })?;
        if !base.path().ends_with("/api2/json") {
            let p = format!("{}/api2/json", base.path().trim_end_matches('/'));
            base.set_path(&p);
        }
        let tls = crate::tls::client_config(conn)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(conn.connect_timeout)
            .timeout(conn.request_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!(
                "grs-provisioner-proxmox/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| ConfigError {
                key: "proxmox".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(Self {
            http,
            base,
            origin: conn.url.clone(),
            token_id: conn.token_id.clone(),
            auth: SecretString::from(format!(
                "PVEAPIToken={}={}",
                conn.token_id,
                secret.expose_secret()
            )),
            request_timeout: conn.request_timeout,
            task_timeout: conn.task_timeout,
            attempts: conn.retry_attempts.max(1),
            backoff_base: conn.retry_base_delay,
            backoff_max: conn.retry_max_delay,
            poll_min: conn.task_poll_min,
            poll_max: conn.task_poll_max,
            task_expected: conn.task_expected.clone(),
            estimates: Mutex::new(HashMap::new()),
            sent: AtomicU64::new(0),
            recorder: Mutex::new(None),
        })
    }

    /// The address as configured.
    pub fn url(&self) -> &str {
        &self.origin
    }

    /// Requests sent so far, retries included.
    pub fn requests_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Test hook: from now on, every request is also appended to the
    /// returned log (secrets included; never enable in production).
    pub fn record_requests(&self) -> Arc<Mutex<Vec<RecordedRequest>>> {
        let log = Arc::new(Mutex::new(Vec::new()));
        *self.recorder.lock().unwrap() = Some(log.clone());
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upids_name_their_node_and_type() {
        let u =
            Upid::parse("UPID:pve1:0000ABCD:00112233:65A0B0C0:qmclone:9000:root@pam!grs:").unwrap();
        assert_eq!(u.node, "pve1");
        assert_eq!(u.kind, "qmclone");
        assert!(Upid::parse("not-a-upid").is_none());
        assert!(Upid::parse("UPID::1:2:3:qmstart:100:root@pam:").is_none());
    }
}
