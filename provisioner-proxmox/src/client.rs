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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{ConfigError, ProxmoxConfig};
use crate::error::PveError;

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

/// One entry of `/cluster/resources`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Resource {
    /// `qemu/100`, `node/pve1`, ...
    #[serde(default)]
    pub id: String,
    /// `qemu`, `lxc`, `node`, `storage`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The node it is on (or is).
    #[serde(default)]
    pub node: Option<String>,
    /// VM id (guests).
    #[serde(default, deserialize_with = "de_opt_u32")]
    pub vmid: Option<u32>,
    /// Guest name.
    #[serde(default)]
    pub name: Option<String>,
    /// `running`, `stopped`, `online`, `offline`, `unknown`.
    #[serde(default)]
    pub status: Option<String>,
    /// Tags, `;`-separated.
    #[serde(default)]
    pub tags: Option<String>,
    /// Whether the guest is a template.
    #[serde(default, deserialize_with = "de_bool")]
    pub template: bool,
    /// Config lock (`clone`, `backup`, ...).
    #[serde(default)]
    pub lock: Option<String>,
    /// Memory in use, bytes.
    #[serde(default, deserialize_with = "de_opt_u64")]
    pub mem: Option<u64>,
    /// Memory size (guest) or total memory (node), bytes.
    #[serde(default, deserialize_with = "de_opt_u64")]
    pub maxmem: Option<u64>,
    /// Resource pool.
    #[serde(default)]
    pub pool: Option<String>,
    /// Storage id (storages).
    #[serde(default)]
    pub storage: Option<String>,
    /// Whether a storage is shared between nodes.
    #[serde(default, deserialize_with = "de_bool")]
    pub shared: bool,
}

impl Resource {
    /// A QEMU guest?
    pub fn is_vm(&self) -> bool {
        self.kind == "qemu"
    }
    /// The tags as a list (PVE accepts `;`, `,` and spaces as separators).
    pub fn tag_list(&self) -> Vec<&str> {
        split_tags(self.tags.as_deref().unwrap_or(""))
    }
}

/// Splits a PVE tag list.
pub fn split_tags(s: &str) -> Vec<&str> {
    s.split([';', ',', ' ']).filter(|t| !t.is_empty()).collect()
}

fn de_opt_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    })
}

fn de_opt_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(de_opt_u64(d)?.and_then(|v| u32::try_from(v).ok()))
}

fn de_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Bool(b)) => b,
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::String(s)) => matches!(s.as_str(), "1" | "true" | "yes" | "on"),
        _ => false,
    })
}

/// Status of a task.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskStatus {
    /// `running` or `stopped`.
    pub status: String,
    /// Once stopped: `OK`, `WARNINGS: N`, or the error text.
    #[serde(default)]
    pub exitstatus: Option<String>,
}

/// The learned duration of a task type.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// When to poll first.
    duration: Duration,
    /// First polls in a row that found the task done.
    hits: u32,
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

    /// One API call with retries; returns the `data` of the answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        params: &[Param],
        idem: Idempotency,
    ) -> Result<Value, PveError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send_once(&method, path, params).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let repeatable = e.is_transient()
                        && match idem {
                            Idempotency::Idempotent => true,
                            Idempotency::NotIdempotent => match &e {
                                PveError::Connect { maybe_sent, .. } => !maybe_sent,
                                PveError::Api { .. } => e.is_lock_conflict(),
                                _ => false,
                            },
                        };
                    if !repeatable || attempt >= self.attempts {
                        return Err(e);
                    }
                    let delay = self.backoff(attempt);
                    tracing::debug!(%method, path, attempt, ?delay, error = %e, "PVE call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Capped exponential backoff with full jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(self.backoff_max);
        let ms = exp.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    fn url_for(&self, path: &str) -> url::Url {
        let mut u = self.base.clone();
        {
            let mut segs = u.path_segments_mut().expect("https URL has a path");
            for s in path.split('/').filter(|s| !s.is_empty()) {
                segs.push(s);
            }
        }
        u
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        params: &[Param],
    ) -> Result<Value, PveError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let pairs: Vec<(String, String)> = params
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        if let Some(rec) = self.recorder.lock().unwrap().as_ref() {
            rec.lock().unwrap().push(RecordedRequest {
                method: method.to_string(),
                path: path.to_owned(),
                params: pairs.clone(),
            });
        }
        let url = self.url_for(path);
        let mut auth = http::HeaderValue::from_str(self.auth.expose_secret()).map_err(|_| {
            PveError::Decode {
                path: path.into(),
                detail: "the API token contains characters not allowed in a header".into(),
            }
        })?;
        auth.set_sensitive(true);
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .header(http::header::AUTHORIZATION, auth);
        if *method == Method::GET || *method == Method::DELETE {
            if !pairs.is_empty() {
                req = req.query(&pairs);
            }
        } else {
            req = req.form(&pairs);
        }
        let started = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(self.transport_error(method, &url, e)),
        };
        let status = resp.status();
        // PVE's error text is in the status line's reason phrase on every
        // release, and in the body's `message` only since
        // libpve-http-server-perl 5.2 (PVE 8.4): hyper keeps a reason that
        // is not the canonical one as an extension.
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .and_then(|r| std::str::from_utf8(r.as_bytes()).ok())
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Err(self.transport_error(method, &url, e)),
        };
        tracing::debug!(%method, path, status = status.as_u16(), elapsed = ?started.elapsed(), "PVE call");
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return match json {
                Value::Object(mut m) => Ok(m.remove("data").unwrap_or(Value::Null)),
                _ => Err(PveError::Decode {
                    path: path.into(),
                    detail: format!("HTTP {status} without a JSON body"),
                }),
            };
        }
        let scrub = |s: &str| scrub(s, params);
        let message = json
            .get("message")
            .and_then(Value::as_str)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or(reason)
            .unwrap_or_else(|| {
                status
                    .canonical_reason()
                    .unwrap_or("error without message")
                    .to_owned()
            });
        let errors: BTreeMap<String, String> = json
            .get("errors")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let text = v
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string());
                        (k.clone(), scrub(text.trim()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if status.as_u16() == 401 {
            return Err(PveError::Auth {
                url: self.origin.clone(),
                token_id: self.token_id.clone(),
                message: scrub(&message),
            });
        }
        Err(PveError::Api {
            method: method.to_string(),
            path: path.to_owned(),
            status: status.as_u16(),
            message: scrub(&message),
            errors,
        })
    }

    fn transport_error(&self, method: &Method, url: &url::Url, e: reqwest::Error) -> PveError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            let text = s.to_string();
            if !detail.contains(&text) {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            src = s.source();
        }
        let shown = self.origin.clone();
        if e.is_timeout() {
            return PveError::Timeout {
                method: method.to_string(),
                url: url.to_string(),
                after: self.request_timeout,
            };
        }
        let lower = detail.to_lowercase();
        if lower.contains("certificate") || lower.contains("fingerprint") {
            return PveError::Tls { url: shown, detail };
        }
        PveError::Connect {
            url: shown,
            detail,
            maybe_sent: !e.is_connect(),
        }
    }

    // ------------------------------------------------------------ tasks

    /// Waits for a task to end; `Ok` for `OK` and `WARNINGS: N`, otherwise
    /// [`PveError::Task`] with the end of the task log.
    ///
    /// Polling adapts: the first poll comes when tasks of this type usually
    /// end (learned per type, see `learn`; 1 s for a type not seen yet),
    /// later ones back off from `task_poll_min` by x1.5 to `task_poll_max`.
    /// A UPID PVE does not know yet is polled again.
    pub async fn wait_task(&self, upid: &Upid) -> Result<(), PveError> {
        let started = Instant::now();
        let deadline = started + self.task_timeout;
        let estimate = self
            .estimates
            .lock()
            .unwrap()
            .get(&upid.kind)
            .map(|e| e.duration);
        // A task type never seen: first look after the 1 s most PVE clients
        // poll at (or `task_poll_max`, if shorter); then learn.
        let mut delay = estimate
            .unwrap_or(Duration::from_secs(1).min(self.poll_max))
            .clamp(self.poll_min, Duration::from_secs(30));
        let mut step = self.poll_min;
        let mut last_running = Duration::ZERO;
        let mut polls = 0u32;
        let path = format!("/nodes/{}/tasks/{}/status", upid.node, upid.raw);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(PveError::TaskTimeout {
                    upid: upid.raw.clone(),
                    after: self.task_timeout,
                });
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            polls += 1;
            let st = match self
                .call(Method::GET, &path, &[], Idempotency::Idempotent)
                .await
            {
                Ok(v) => serde_json::from_value::<TaskStatus>(v).map_err(|e| PveError::Decode {
                    path: path.clone(),
                    detail: e.to_string(),
                })?,
                // PVE may not know a UPID for a moment after handing it out.
                Err(e) if polls <= 5 && task_not_visible(&e) => {
                    delay = step;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if st.status != "stopped" {
                last_running = started.elapsed();
                delay = step;
                step = (step.mul_f32(1.5)).min(self.poll_max);
                continue;
            }
            self.learn(&upid.kind, polls, last_running, started.elapsed());
            let exit = st.exitstatus.unwrap_or_default();
            if exit == "OK" || exit.starts_with("WARNINGS") {
                return Ok(());
            }
            let log = self.task_log_tail(upid, 20).await.unwrap_or_default();
            return Err(PveError::Task {
                upid: upid.raw.clone(),
                exitstatus: exit,
                log,
            });
        }
    }

    /// Updates the duration estimate of a task type.
    ///
    /// A task seen running and then done brackets its duration: the
    /// estimate becomes the middle of that bracket (plus `task_poll_min`, to err
    /// late rather than early). A task done by the first poll only proves
    /// the estimate was long enough: it shrinks, the faster the more first
    /// polls in a row hit (0.98, 0.96, 0.92, ... down to x0.27), so an
    /// estimate far too long converges in a few tasks while a good one
    /// costs a miss only now and then.
    fn learn(&self, kind: &str, polls: u32, last_running: Duration, done_by: Duration) {
        let mut all = self.estimates.lock().unwrap();
        let bracket = (last_running + done_by) / 2 + self.poll_min;
        let next = match all.get(kind) {
            Some(e) if polls == 1 => Estimate {
                duration: e.duration.mul_f64(0.98f64.powi(1 << e.hits.min(3))),
                hits: e.hits + 1,
            },
            // First of its kind and done by the first poll: it took at most
            // that long.
            None if polls == 1 => Estimate {
                duration: done_by.mul_f64(0.9),
                hits: 1,
            },
            _ => Estimate {
                duration: bracket,
                hits: 0,
            },
        };
        all.insert(kind.to_owned(), next);
    }

    /// The last `n` lines of a task's log.
    pub async fn task_log_tail(&self, upid: &Upid, n: usize) -> Result<Vec<String>, PveError> {
        let path = format!("/nodes/{}/tasks/{}/log", upid.node, upid.raw);
        let v = self
            .call(
                Method::GET,
                &path,
                &[Param::new("start", 0), Param::new("limit", 1000)],
                Idempotency::Idempotent,
            )
            .await?;
        let mut lines: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.get("t").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if lines.len() > n {
            lines.drain(..lines.len() - n);
        }
        Ok(lines)
    }

    fn upid_from(path: &str, v: Value) -> Result<Upid, PveError> {
        v.as_str()
            .and_then(Upid::parse)
            .ok_or_else(|| PveError::Decode {
                path: path.into(),
                detail: format!("expected a UPID, got {v}"),
            })
    }

    // ------------------------------------------------------ typed calls

    /// `GET /version`: proves the address and token work.
    pub async fn version(&self) -> Result<Value, PveError> {
        self.call(Method::GET, "/version", &[], Idempotency::Idempotent)
            .await
    }

    /// `GET /nodes`: node names and whether they are online.
    pub async fn nodes(&self) -> Result<Vec<Resource>, PveError> {
        let v = self
            .call(Method::GET, "/nodes", &[], Idempotency::Idempotent)
            .await?;
        decode("/nodes", v)
    }

    /// `GET /cluster/resources` (all types, or one).
    pub async fn resources(&self, kind: Option<&str>) -> Result<Vec<Resource>, PveError> {
        let params: Vec<Param> = kind.map(|k| Param::new("type", k)).into_iter().collect();
        let v = self
            .call(
                Method::GET,
                "/cluster/resources",
                &params,
                Idempotency::Idempotent,
            )
            .await?;
        decode("/cluster/resources", v)
    }

    /// `GET /cluster/nextid`: the lowest free id. Reserves nothing.
    pub async fn nextid(&self) -> Result<u32, PveError> {
        let v = self
            .call(Method::GET, "/cluster/nextid", &[], Idempotency::Idempotent)
            .await?;
        match &v {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        }
        .ok_or_else(|| PveError::Decode {
            path: "/cluster/nextid".into(),
            detail: format!("expected a VM id, got {v}"),
        })
    }

    /// Whether PVE resource pool `poolid` exists (`GET /pools?poolid=`,
    /// which, unlike `/pools/{poolid}`, also takes nested pool ids).
    pub async fn resource_pool_exists(&self, poolid: &str) -> Result<bool, PveError> {
        match self
            .call(
                Method::GET,
                "/pools",
                &[Param::new("poolid", poolid)],
                Idempotency::Idempotent,
            )
            .await
        {
            Ok(v) => Ok(v.as_array().is_some_and(|a| !a.is_empty())),
            Err(e) if e.pve_text().contains("does not exist") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET .../qemu/{vmid}/config`.
    pub async fn vm_config(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<serde_json::Map<String, Value>, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        let v = self
            .call(Method::GET, &path, &[], Idempotency::Idempotent)
            .await?;
        decode(&path, v)
    }

    /// `POST .../qemu/{vmid}/clone`; returns the clone task.
    ///
    /// Not repeated after an unclear transport failure (the clone may have
    /// started); lock timeouts are repeated (PVE did nothing).
    pub async fn clone_vm(
        &self,
        node: &str,
        vmid: u32,
        params: &[Param],
    ) -> Result<Upid, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/clone");
        let v = self
            .call(Method::POST, &path, params, Idempotency::NotIdempotent)
            .await?;
        Self::upid_from(&path, v)
    }

    /// `PUT .../qemu/{vmid}/config` (synchronous).
    pub async fn set_config(
        &self,
        node: &str,
        vmid: u32,
        params: &[Param],
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        self.call(Method::PUT, &path, params, Idempotency::Idempotent)
            .await
            .map(|_| ())
    }

    /// `POST .../status/{start|stop}`; returns the task.
    pub async fn vm_action(&self, node: &str, vmid: u32, action: &str) -> Result<Upid, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/status/{action}");
        let v = self
            .call(Method::POST, &path, &[], Idempotency::Idempotent)
            .await?;
        Self::upid_from(&path, v)
    }

    /// `DELETE .../qemu/{vmid}` with `purge=1` (backup and replication jobs,
    /// HA). Without `destroy-unreferenced-disks`: with it, PVE lists every
    /// storage of the cluster after freeing the VM's own disks
    /// (qemu-server `PVE/QemuServer.pm` `destroy_vm` -> pve-storage
    /// `vdisk_list` -> `activate_storage_list`) and one offline share fails
    /// the task with the config left behind, making teardown hostage to
    /// storages that have nothing to do with the VM. A GRS clone's disks are
    /// all in its config (PVE frees a failed clone's new volumes itself).
    pub async fn destroy(&self, node: &str, vmid: u32) -> Result<Upid, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}");
        let v = self
            .call(
                Method::DELETE,
                &path,
                &[Param::flag("purge", true)],
                Idempotency::Idempotent,
            )
            .await?;
        Self::upid_from(&path, v)
    }

    /// `POST .../agent/ping`.
    pub async fn agent_ping(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/agent/ping");
        self.send_once(&Method::POST, &path, &[]).await.map(|_| ())
    }

    /// `POST .../agent/file-write` (PVE base64-encodes `content` for QEMU).
    pub async fn agent_file_write(
        &self,
        node: &str,
        vmid: u32,
        file: &str,
        content: &SecretString,
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/agent/file-write");
        self.call(
            Method::POST,
            &path,
            &[
                Param::new("file", file),
                Param::secret("content", content.expose_secret()),
            ],
            Idempotency::Idempotent,
        )
        .await
        .map(|_| ())
    }

    /// `POST .../agent/exec`; returns the guest pid. Not repeated after an
    /// unclear failure (it could run twice).
    pub async fn agent_exec(
        &self,
        node: &str,
        vmid: u32,
        command: &[String],
    ) -> Result<u64, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/agent/exec");
        let params: Vec<Param> = command.iter().map(|c| Param::new("command", c)).collect();
        let v = self
            .call(Method::POST, &path, &params, Idempotency::NotIdempotent)
            .await?;
        v.get("pid")
            .and_then(Value::as_u64)
            .ok_or_else(|| PveError::Decode {
                path,
                detail: format!("expected {{pid}}, got {v}"),
            })
    }
}

fn task_not_visible(e: &PveError) -> bool {
    matches!(
        e,
        PveError::Api {
            status: 400 | 500,
            ..
        }
    ) && (e.pve_text().contains("unable to parse worker upid")
        || e.pve_text().contains("no such task"))
}

fn decode<T: serde::de::DeserializeOwned>(path: &str, v: Value) -> Result<T, PveError> {
    serde_json::from_value(v).map_err(|e| PveError::Decode {
        path: path.into(),
        detail: e.to_string(),
    })
}

/// Replaces every sensitive parameter value in `text` by `[REDACTED]`.
fn scrub(text: &str, params: &[Param]) -> String {
    let mut out = text.to_owned();
    for p in params.iter().filter(|p| p.sensitive && p.value.len() >= 4) {
        out = out.replace(&p.value, "[REDACTED]");
    }
    out
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

    #[test]
    fn sensitive_values_are_scrubbed_and_not_debug_printed() {
        let p = [Param::secret("smbios1", "serial=c2VjcmV0LXVybA==,base64=1")];
        assert_eq!(
            scrub("value 'serial=c2VjcmV0LXVybA==,base64=1' is bad", &p),
            "value '[REDACTED]' is bad"
        );
        assert!(!format!("{:?}", p[0]).contains("c2VjcmV0"));
    }

    #[test]
    fn resources_read_pve_numbers_and_booleans_leniently() {
        let r: Resource = serde_json::from_value(serde_json::json!({
            "id": "qemu/100", "type": "qemu", "vmid": 100, "template": 1,
            "maxmem": 2147483648u64, "tags": "grs;grs-p-linux"
        }))
        .unwrap();
        assert!(r.template);
        assert_eq!(r.vmid, Some(100));
        assert_eq!(r.tag_list(), vec!["grs", "grs-p-linux"]);
    }
}
