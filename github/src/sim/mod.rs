//! An in-process GitHub for the demo and the tests: the REST endpoints GRS
//! uses, over real HTTP on `127.0.0.1:0`, a webhook sender that signs its
//! deliveries, and simulated runners.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use grs_github::sim::{GitHubSim, NewJob, SimConfig};
//! let sim = GitHubSim::start(SimConfig {
//!     webhook_url: Some("http://127.0.0.1:8080/webhook".into()),
//!     ..SimConfig::default()
//! })
//! .await?;
//! // Point a GitHubClient at sim.url(); queue a job: a signed `queued`
//! // webhook goes to the gateway.
//! let job = sim.queue_job(NewJob::labels(["self-hosted", "linux"])).await;
//! // Later, a VM "boots" with the JIT config GRS minted for it:
//! // sim.boot_runner(&encoded_jit_config).await
//! # Ok(()) }
//! ```
//!
//! Behaviour, like GitHub's:
//! - A runner booted from a JIT config registers (online), then takes the
//!   oldest queued job whose labels are all among its own
//!   (case-insensitively), which need not be the job it was made for. It
//!   sends `in_progress`, runs for the job's duration, sends `completed`,
//!   and is removed (JIT runners are ephemeral). A JIT config boots once.
//! - A job cancelled before a runner took it completes with `runner_id` and
//!   `runner_name` null.
//! - Deliveries carry `X-GitHub-Event`, `X-GitHub-Delivery`,
//!   `X-Hub-Signature-256`; their answers are recorded and
//!   [`GitHubSim::redeliver`] resends one with the same delivery id.
//! - Job ids start above 2^32, so 64-bit handling is always exercised.
//!
//! - Every delivery attempt is logged like GitHub's hook deliveries API
//!   shows it (`id`, `guid` = `X-GitHub-Delivery`, `status_code`,
//!   `redelivery`); `GET /app/hook/deliveries` (App JWT) and
//!   `GET /orgs/{org}/hooks/{hook_id}/deliveries` list them newest first
//!   with cursor paging, and `POST .../deliveries/{id}/attempts` redelivers
//!   one (202, sent asynchronously, same guid, `redelivery: true`).
//!   <https://docs.github.com/rest/apps/webhooks#list-deliveries-for-an-app-webhook>,
//!   <https://docs.github.com/rest/orgs/webhooks#list-deliveries-for-an-organization-webhook>.
//!   The simulator has one hook; both paths show its deliveries.
//! - Jobs and runs: `GET /repos/{o}/{r}/actions/jobs/{job_id}`,
//!   `GET /repos/{o}/{r}/actions/runs?status=` and
//!   `GET /repos/{o}/{r}/actions/runs/{run_id}/jobs`
//!   (<https://docs.github.com/rest/actions/workflow-runs#list-workflow-runs-for-a-repository>,
//!   <https://docs.github.com/rest/actions/workflow-jobs#list-jobs-for-a-workflow-run>).
//!   A run is `queued` while all its jobs are, `completed` once all are,
//!   else `in_progress` (a run with a job running and one still waiting for
//!   a runner is in progress: a scan for lost jobs must look at both).
//! - Every API answer carries `x-ratelimit-limit`, `-remaining`, `-used`,
//!   `-reset` and `-resource: core`
//!   (<https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api>);
//!   once [`SimConfig::rate_limit`] calls are spent in a window the API
//!   answers 403 "API rate limit exceeded" with `x-ratelimit-remaining: 0`
//!   until the window resets.
//!
//! Faults for tests: [`GitHubSim::inject`] makes the next API calls answer
//! with a (secondary) rate limit or a server error;
//! [`GitHubSim::set_delivery_fault`] makes deliveries fail (logged as
//! failed, redeliverable) or get lost (never attempted, as in a GitHub
//! incident: only a scan of queued jobs finds them).

mod installation;
mod server;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::signature;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where deliveries go (the gateway's `/webhook`); `None`: recorded only.
    pub webhook_url: Option<String>,
    /// The secret deliveries are signed with.
    pub webhook_secret: String,
    /// The organisation jobs belong to (and runners register at).
    pub organization: String,
    /// The repository (`owner/name`) jobs run in.
    pub repository: String,
    /// The GitHub App's id (JWT issuer accepted).
    pub app_id: String,
    /// The installation tokens are minted for.
    pub installation_id: u64,
    /// PEM public key JWTs are verified with; `None`: any well-formed JWT
    /// with the right issuer is accepted.
    pub app_public_key_pem: Option<String>,
    /// A personal access token accepted besides installation tokens.
    pub pat: Option<String>,
    /// How long minted installation tokens live.
    pub token_ttl: Duration,
    /// How long a job runs once a runner took it (unless the job says).
    pub job_duration: Duration,
    /// The organisation webhook's id (`X-GitHub-Hook-ID`,
    /// `/orgs/{org}/hooks/{hook_id}/deliveries`).
    pub hook_id: u64,
    /// Primary rate limit: API calls per [`rate_limit_window`](Self::rate_limit_window).
    pub rate_limit: u64,
    /// The primary rate limit's window (GitHub: one hour).
    pub rate_limit_window: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_secret: "sim-webhook-secret".into(),
            organization: "grs-sim".into(),
            repository: "grs-sim/app".into(),
            app_id: "4242".into(),
            installation_id: 77,
            app_public_key_pem: None,
            pat: Some("ghp_simulated_personal_access_token".into()),
            token_ttl: Duration::from_secs(3600),
            job_duration: Duration::from_millis(200),
            hook_id: 1,
            rate_limit: 5000,
            rate_limit_window: Duration::from_secs(3600),
        }
    }
}

/// A job to queue.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    /// The labels it asks for.
    pub labels: Vec<String>,
    /// Display name (`build` if empty).
    pub name: String,
    /// Run time once taken; `None`: the simulator's default.
    pub duration: Option<Duration>,
    /// Repository; `None`: the simulator's default.
    pub repository: Option<String>,
}

impl NewJob {
    /// A job asking for `labels`.
    pub fn labels<I, S>(labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            labels: labels.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// A job's status, as GitHub reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimJobStatus {
    /// Waiting for a runner.
    Queued,
    /// A runner has it.
    InProgress,
    /// Done (see `conclusion`).
    Completed,
}

/// A job the simulator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimJob {
    /// `workflow_job.id`.
    pub id: u64,
    /// `workflow_job.run_id`.
    pub run_id: u64,
    /// Where it runs.
    pub repository: String,
    /// What it asks for.
    pub labels: Vec<String>,
    /// Display name.
    pub name: String,
    /// Where it is.
    pub status: SimJobStatus,
    /// `success`, `cancelled`, ... once completed.
    pub conclusion: Option<String>,
    /// The runner that took it.
    pub runner_id: Option<u64>,
    /// That runner's name.
    pub runner_name: Option<String>,
    /// Run time once taken.
    pub duration: Duration,
    /// When it was queued (`created_at`).
    pub created_at: SystemTime,
    /// When a runner took it.
    pub started_at: Option<SystemTime>,
    /// When it completed.
    pub completed_at: Option<SystemTime>,
}

/// A runner registration the simulator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRunner {
    /// GitHub's runner id.
    pub id: u64,
    /// Its name (GRS: the instance name).
    pub name: String,
    /// Its labels.
    pub labels: Vec<String>,
    /// Whether a VM booted with its config (`online`) or not yet.
    pub online: bool,
    /// Running a job.
    pub busy: bool,
    /// The job it took, if any.
    pub job_id: Option<u64>,
    /// How it was registered (`jit` or `token`).
    pub jit: bool,
    /// Runner group.
    pub runner_group_id: u64,
}

/// One webhook delivery attempt the simulator made (or failed to make), as
/// the hook deliveries API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The attempt's id in the hook deliveries API (`id`; redeliveries get
    /// their own).
    pub id: u64,
    /// `X-GitHub-Delivery` (`guid` in the deliveries API; the same on
    /// redelivery).
    pub delivery_id: String,
    /// Whether this attempt was a redelivery.
    pub redelivery: bool,
    /// When it was attempted.
    pub delivered_at: SystemTime,
    /// `X-GitHub-Event`.
    pub event: String,
    /// `action`.
    pub action: String,
    /// The job it was about.
    pub job_id: u64,
    /// The receiver's HTTP status; `None` when not sent or no answer.
    pub status: Option<u16>,
}

impl DeliveryRecord {
    /// GitHub's `status_code`: the receiver's status, 502 when it could not
    /// be reached, 0 while the attempt is in flight.
    pub fn status_code(&self) -> u16 {
        self.status.unwrap_or(502)
    }

    /// GitHub's classification (`?status=success`: 200 to 399).
    pub fn succeeded(&self) -> bool {
        (200..400).contains(&self.status_code())
    }
}

/// One REST call the simulator answered, kept while
/// [`GitHubSim::record_exchanges`] is on: what an oracle (GitHub's OpenAPI
/// description, in `tests/openapi_oracle.rs`) checks requests and answers
/// against. The simulator's own `/_sim/...` control calls are not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The HTTP method.
    pub method: String,
    /// The path as GitHub.com spells it (a GHES `/api/v3` prefix removed).
    pub path: String,
    /// The query string, if any (without `?`).
    pub query: Option<String>,
    /// The request body (empty when none was sent).
    pub request: Vec<u8>,
    /// The answer's status.
    pub status: u16,
    /// The answer's body.
    pub response: Vec<u8>,
}

/// What happens to webhook deliveries while the switch is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFault {
    /// The receiver is never reached: each attempt is logged as failed
    /// ("failed to connect", `status_code` 502) and can be redelivered.
    Fail,
    /// GitHub never attempts the delivery (an incident on its side): nothing
    /// is logged, nothing can be redelivered.
    Lose,
}

/// A fault to answer the next API calls with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 403 or 429 with optional `retry-after` (seconds) and, when
    /// `reset_in` is set, `x-ratelimit-remaining: 0` and
    /// `x-ratelimit-reset` that many seconds ahead.
    RateLimit {
        /// 403 or 429.
        status: u16,
        /// `retry-after` seconds.
        retry_after: Option<u64>,
        /// `x-ratelimit-reset` in this many seconds.
        reset_in: Option<u64>,
    },
    /// Any status (500, 502, ...), with a message.
    Status(u16),
}

/// Why booting a runner failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// Not a config this simulator minted.
    #[error("not a JIT config of this simulator")]
    InvalidJitConfig,
    /// The config was used already or its runner was removed.
    #[error("the JIT config's runner is gone or already booted")]
    RunnerGone,
}

#[derive(Serialize, Deserialize)]
struct JitBlob {
    sim_runner_id: u64,
    name: String,
    nonce: String,
}

impl State {
    fn next_delivery_attempt(&mut self) -> u64 {
        // Attempt ids grow like GitHub's (and above 2^32, as theirs are).
        20_000_000_000 + self.deliveries.len() as u64
    }

    /// Spends one API call of the primary rate limit; false when the window
    /// has none left. A new window starts once the reset time passes.
    pub(crate) fn spend_rate_limit(&mut self) -> bool {
        let now = SystemTime::now();
        if now >= self.rate_reset {
            self.rate_remaining = self.cfg.rate_limit;
            self.rate_reset = now + self.cfg.rate_limit_window;
        }
        if self.rate_remaining == 0 {
            return false;
        }
        self.rate_remaining -= 1;
        true
    }
}

pub(crate) struct State {
    pub(crate) cfg: SimConfig,
    next_job_id: u64,
    pub(crate) next_runner_id: u64,
    jobs: BTreeMap<u64, SimJob>,
    pub(crate) runners: BTreeMap<u64, SimRunner>,
    /// runner id → nonce of its JIT config (cleared once booted).
    pub(crate) jit_nonces: HashMap<u64, String>,
    pub(crate) tokens: HashMap<String, SystemTime>,
    pub(crate) token_mints: u64,
    pub(crate) faults: VecDeque<Fault>,
    /// The app's grants and the webhooks, for `grs doctor`.
    pub(crate) setup: installation::Setup,
    pub(crate) deliveries: Vec<DeliveryRecord>,
    bodies: HashMap<String, (String, Vec<u8>)>,
    next_delivery: u64,
    pub(crate) delivery_fault: Option<DeliveryFault>,
    /// Primary rate limit: calls left and when the window resets.
    pub(crate) rate_remaining: u64,
    pub(crate) rate_reset: SystemTime,
    tasks: Vec<JoinHandle<()>>,
    /// REST calls answered, while recording is on (`None`: off).
    pub(crate) exchanges: Option<Vec<Exchange>>,
}

/// The running simulator. Dropping it without [`GitHubSim::shutdown`]
/// leaves the server running until the runtime ends.
#[derive(Clone)]
pub struct GitHubSim {
    inner: Arc<SimInner>,
}

pub(crate) struct SimInner {
    pub(crate) state: Mutex<State>,
    addr: SocketAddr,
    http: reqwest::Client,
    server: Mutex<Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for GitHubSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubSim")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl GitHubSim {
    /// Starts the simulator's HTTP server on `127.0.0.1:0`.
    pub async fn start(cfg: SimConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(SimInner {
            state: Mutex::new(State {
                rate_remaining: cfg.rate_limit,
                rate_reset: SystemTime::now() + cfg.rate_limit_window,
                delivery_fault: None,
                cfg,
                next_job_id: 10_000_000_000,
                next_runner_id: 1000,
                jobs: BTreeMap::new(),
                runners: BTreeMap::new(),
                jit_nonces: HashMap::new(),
                tokens: HashMap::new(),
                token_mints: 0,
                faults: VecDeque::new(),
                setup: installation::Setup::default(),
                deliveries: Vec::new(),
                bodies: HashMap::new(),
                next_delivery: 1,
                tasks: Vec::new(),
                exchanges: None,
            }),
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(std::io::Error::other)?,
            server: Mutex::new(None),
        });
        let sim = Self { inner };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let app = server::router(sim.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        *sim.inner.server.lock().unwrap() = Some((tx, handle));
        Ok(sim)
    }

    /// The REST API base URL (`http://127.0.0.1:PORT`), for `github.api_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Where deliveries go from now on.
    pub fn set_webhook_url(&self, url: impl Into<String>) {
        self.lock().cfg.webhook_url = Some(url.into());
    }

    /// The webhook secret deliveries are signed with.
    pub fn webhook_secret(&self) -> String {
        self.lock().cfg.webhook_secret.clone()
    }

    /// Queues a job: records it, sends a signed `queued` delivery (awaited),
    /// and hands it to an idle matching runner if there is one.
    pub async fn queue_job(&self, new: NewJob) -> SimJob {
        let job = {
            let mut st = self.lock();
            let id = st.next_job_id;
            st.next_job_id += 1;
            let job = SimJob {
                id,
                run_id: id / 2,
                repository: new.repository.unwrap_or_else(|| st.cfg.repository.clone()),
                labels: new.labels,
                name: if new.name.is_empty() {
                    "build".into()
                } else {
                    new.name
                },
                status: SimJobStatus::Queued,
                conclusion: None,
                runner_id: None,
                runner_name: None,
                duration: new.duration.unwrap_or(st.cfg.job_duration),
                created_at: SystemTime::now(),
                started_at: None,
                completed_at: None,
            };
            st.jobs.insert(id, job.clone());
            job
        };
        self.deliver(&job, "queued").await;
        self.assign();
        job
    }

    /// Cancels a job. One still queued completes at once with conclusion
    /// `cancelled` and no runner; one in progress is left to finish.
    pub async fn cancel_job(&self, job_id: u64) -> Option<SimJob> {
        let job = {
            let mut st = self.lock();
            let job = st.jobs.get_mut(&job_id)?;
            if job.status != SimJobStatus::Queued {
                return Some(job.clone());
            }
            job.status = SimJobStatus::Completed;
            job.conclusion = Some("cancelled".into());
            job.completed_at = Some(SystemTime::now());
            job.clone()
        };
        self.deliver(&job, "completed").await;
        Some(job)
    }

    /// A VM booted with `encoded_jit_config`: its runner comes online and
    /// may take a job. A config boots once.
    pub async fn boot_runner(&self, encoded_jit_config: &str) -> Result<SimRunner, SimError> {
        let blob: JitBlob = base64::engine::general_purpose::STANDARD
            .decode(encoded_jit_config.trim())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(SimError::InvalidJitConfig)?;
        let runner = {
            let mut st = self.lock();
            match st.jit_nonces.get(&blob.sim_runner_id) {
                Some(n) if *n == blob.nonce => {}
                Some(_) => return Err(SimError::InvalidJitConfig),
                None => return Err(SimError::RunnerGone),
            }
            st.jit_nonces.remove(&blob.sim_runner_id);
            let r = st
                .runners
                .get_mut(&blob.sim_runner_id)
                .ok_or(SimError::RunnerGone)?;
            r.online = true;
            r.clone()
        };
        self.assign();
        Ok(runner)
    }

    /// Every runner registration.
    pub fn runners(&self) -> Vec<SimRunner> {
        self.lock().runners.values().cloned().collect()
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Vec<SimJob> {
        self.lock().jobs.values().cloned().collect()
    }

    /// One job.
    pub fn job(&self, id: u64) -> Option<SimJob> {
        self.lock().jobs.get(&id).cloned()
    }

    /// Every delivery made, in order.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.lock().deliveries.clone()
    }

    /// Starts keeping every REST call answered from now on (off by default:
    /// a long run would keep them all), dropping any kept so far.
    pub fn record_exchanges(&self) {
        self.lock().exchanges = Some(Vec::new());
    }

    /// The REST calls answered since [`record_exchanges`](Self::record_exchanges),
    /// in order; empty when recording is off.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.lock().exchanges.clone().unwrap_or_default()
    }

    /// The body of delivery `delivery_id` (`X-GitHub-Delivery`) as it was
    /// sent, signed bytes and all.
    pub fn delivery_body(&self, delivery_id: &str) -> Option<Vec<u8>> {
        self.lock().bodies.get(delivery_id).map(|(_, b)| b.clone())
    }

    /// Installation tokens minted so far.
    pub fn token_mints(&self) -> u64 {
        self.lock().token_mints
    }

    /// The next API call (not token minting) answers with `fault`.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Resends a delivery with the same id and body (like GitHub's
    /// "Redeliver"), logged as a redelivery attempt; returns the receiver's
    /// status. `None` for an unknown delivery or when no receiver is set.
    pub async fn redeliver(&self, delivery_id: &str) -> Option<u16> {
        let (event, action, job_id) = {
            let st = self.lock();
            let d = st
                .deliveries
                .iter()
                .find(|d| d.delivery_id == delivery_id)?;
            (d.event.clone(), d.action.clone(), d.job_id)
        };
        self.attempt(delivery_id, &event, &action, job_id, true)
            .await
            .flatten()
    }

    /// Makes (or, under [`DeliveryFault`], fails or loses) one delivery
    /// attempt of a recorded body; `None` when it was not made at all.
    async fn attempt(
        &self,
        delivery_id: &str,
        event: &str,
        action: &str,
        job_id: u64,
        redelivery: bool,
    ) -> Option<Option<u16>> {
        let (body, url, secret, fault) = {
            let st = self.lock();
            let fault = st.delivery_fault;
            if fault == Some(DeliveryFault::Lose) {
                return None;
            }
            let (_, body) = st.bodies.get(delivery_id)?.clone();
            (
                body,
                st.cfg.webhook_url.clone(),
                st.cfg.webhook_secret.clone(),
                fault,
            )
        };
        let delivered_at = SystemTime::now();
        let status = match (url, fault) {
            (Some(url), None) => self.post(&url, &secret, event, delivery_id, body).await,
            _ => None,
        };
        // Logged once made, as GitHub lists an attempt once it has its
        // answer.
        let mut st = self.lock();
        let id = st.next_delivery_attempt();
        st.deliveries.push(DeliveryRecord {
            id,
            delivery_id: delivery_id.to_owned(),
            redelivery,
            delivered_at,
            event: event.to_owned(),
            action: action.to_owned(),
            job_id,
            status,
        });
        Some(status)
    }

    /// Sets (or, with `None`, clears) the fault every delivery meets from
    /// now on.
    pub fn set_delivery_fault(&self, fault: Option<DeliveryFault>) {
        self.lock().delivery_fault = fault;
    }

    /// API calls left in the current primary rate-limit window.
    pub fn rate_limit_remaining(&self) -> u64 {
        self.lock().rate_remaining
    }

    /// Polls `check` every 10 ms until it holds or `timeout` passes.
    pub async fn wait_until(&self, timeout: Duration, check: impl Fn(&GitHubSim) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if check(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server and every running job.
    pub async fn shutdown(self) {
        let tasks = std::mem::take(&mut self.lock().tasks);
        for t in tasks {
            t.abort();
        }
        let server = self.inner.server.lock().unwrap().take();
        if let Some((tx, handle)) = server {
            let _ = tx.send(());
            let _ = handle.await;
        }
    }

    /// Hands a delivery attempt to the API's redelivery endpoint: resent in
    /// the background, as GitHub does after answering 202.
    pub(crate) fn redeliver_attempt(&self, attempt_id: u64) -> bool {
        let Some(guid) = self
            .lock()
            .deliveries
            .iter()
            .find(|d| d.id == attempt_id)
            .map(|d| d.delivery_id.clone())
        else {
            return false;
        };
        let sim = self.clone();
        let handle = tokio::spawn(async move {
            sim.redeliver(&guid).await;
        });
        let mut st = self.lock();
        st.tasks.retain(|t| !t.is_finished());
        st.tasks.push(handle);
        true
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic in a test thread must not wedge every later call.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a JIT runner; returns it and its encoded config.
    pub(crate) fn register_jit(
        &self,
        name: &str,
        labels: Vec<String>,
        runner_group_id: u64,
    ) -> Result<(SimRunner, String), ()> {
        let mut st = self.lock();
        if st.runners.values().any(|r| r.name == name) {
            return Err(());
        }
        let id = st.next_runner_id;
        st.next_runner_id += 1;
        let runner = SimRunner {
            id,
            name: name.into(),
            labels,
            online: false,
            busy: false,
            job_id: None,
            jit: true,
            runner_group_id,
        };
        let nonce = format!("{:032x}", rand::random::<u128>());
        let blob = JitBlob {
            sim_runner_id: id,
            name: name.into(),
            nonce: nonce.clone(),
        };
        st.jit_nonces.insert(id, nonce);
        st.runners.insert(id, runner.clone());
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&blob).unwrap_or_default());
        Ok((runner, encoded))
    }

    /// Hands queued jobs to idle online runners with all their labels.
    fn assign(&self) {
        let mut started = Vec::new();
        {
            let mut st = self.lock();
            let queued: Vec<u64> = st
                .jobs
                .values()
                .filter(|j| j.status == SimJobStatus::Queued)
                .map(|j| j.id)
                .collect();
            for job_id in queued {
                let labels = st.jobs[&job_id].labels.clone();
                let Some(runner) = st.runners.values_mut().find(|r| {
                    r.online
                        && !r.busy
                        && r.job_id.is_none()
                        && labels
                            .iter()
                            .all(|l| r.labels.iter().any(|rl| rl.eq_ignore_ascii_case(l)))
                }) else {
                    continue;
                };
                runner.busy = true;
                runner.job_id = Some(job_id);
                let (rid, rname) = (runner.id, runner.name.clone());
                let job = st.jobs.get_mut(&job_id).expect("listed above");
                job.status = SimJobStatus::InProgress;
                job.started_at = Some(SystemTime::now());
                job.runner_id = Some(rid);
                job.runner_name = Some(rname);
                started.push(job.clone());
            }
        }
        for job in started {
            let sim = self.clone();
            let handle = tokio::spawn(async move {
                sim.deliver(&job, "in_progress").await;
                tokio::time::sleep(job.duration).await;
                let done = {
                    let mut st = sim.lock();
                    let Some(j) = st.jobs.get_mut(&job.id) else {
                        return;
                    };
                    j.status = SimJobStatus::Completed;
                    j.conclusion = Some("success".into());
                    j.completed_at = Some(SystemTime::now());
                    let done = j.clone();
                    if let Some(rid) = done.runner_id {
                        // Ephemeral: the registration goes with its job.
                        st.runners.remove(&rid);
                    }
                    done
                };
                sim.deliver(&done, "completed").await;
            });
            let mut st = self.lock();
            st.tasks.retain(|t| !t.is_finished());
            st.tasks.push(handle);
        }
    }

    /// Builds, records and sends one `workflow_job` delivery.
    async fn deliver(&self, job: &SimJob, action: &str) {
        let delivery_id = {
            let mut st = self.lock();
            let n = st.next_delivery;
            st.next_delivery += 1;
            let delivery_id = format!("{:08x}-5171-4000-8000-{:012x}", rand::random::<u32>(), n);
            let body =
                serde_json::to_vec(&workflow_job_payload(&st.cfg, job, action)).unwrap_or_default();
            st.bodies
                .insert(delivery_id.clone(), ("workflow_job".into(), body));
            delivery_id
        };
        self.attempt(&delivery_id, "workflow_job", action, job.id, false)
            .await;
    }

    async fn post(
        &self,
        url: &str,
        secret: &str,
        event: &str,
        delivery_id: &str,
        body: Vec<u8>,
    ) -> Option<u16> {
        let hook_id = self.lock().cfg.hook_id.to_string();
        let sig = signature::sign(secret.as_bytes(), &body);
        let resp = self
            .inner
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "GitHub-Hookshot/sim")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery_id)
            .header("x-github-hook-id", hook_id)
            .header("x-hub-signature-256", sig)
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) => Some(r.status().as_u16()),
            Err(e) => {
                tracing::debug!(error = %e.without_url(), "simulated delivery got no answer");
                None
            }
        }
    }
}

/// RFC 3339, as GitHub writes times.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A job as GitHub describes it (the `job` schema of its REST description,
/// every required field; the same object is a webhook's `workflow_job`),
/// with `status` as given: a delivery says what its action says, even when
/// the job has moved on since. Checked against GitHub's OpenAPI description
/// by `tests/openapi_oracle.rs`.
pub(crate) fn job_json(job: &SimJob, status: &str) -> serde_json::Value {
    let repo = &job.repository;
    serde_json::json!({
        "id": job.id,
        "run_id": job.run_id,
        "run_attempt": 1,
        "workflow_name": "CI",
        "head_branch": "main",
        "run_url": format!("https://api.github.com/repos/{repo}/actions/runs/{}", job.run_id),
        "node_id": format!("CR_sim{}", job.id),
        "head_sha": "0000000000000000000000000000000000000000",
        "url": format!("https://api.github.com/repos/{repo}/actions/jobs/{}", job.id),
        "html_url": format!("https://github.com/{repo}/actions/runs/{}/job/{}", job.run_id, job.id),
        "status": status,
        "conclusion": if status == "completed" { job.conclusion.as_deref() } else { None },
        "created_at": rfc3339(job.created_at),
        // GitHub gives a job not yet taken its creation time here.
        "started_at": rfc3339(job.started_at.unwrap_or(job.created_at)),
        "completed_at": job.completed_at.filter(|_| status == "completed").map(rfc3339),
        "name": job.name,
        "steps": [],
        "check_run_url": format!("https://api.github.com/repos/{repo}/check-runs/{}", job.id),
        "labels": job.labels,
        "runner_id": job.runner_id,
        "runner_name": job.runner_name,
        "runner_group_id": job.runner_id.map(|_| 1),
        "runner_group_name": job.runner_id.map(|_| "Default"),
    })
}

/// GitHub's own example of a `workflow_job` delivery (octokit/webhooks,
/// `completed.success.with-organization`, a verbatim fixture): every
/// delivery the simulator sends is this document with the job, the
/// repository, the organisation and the installation made its own, so the
/// parts GRS does not read are shaped as GitHub shapes them.
static EXAMPLE_DELIVERY: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(|| {
    serde_json::from_str(include_str!(
        "../../../fixtures/github/payloads/octokit-webhooks/workflow_job/completed.success.with-organization.payload.json"
    ))
    .expect("the bundled example delivery is JSON")
});

/// Replaces `from` by `to` in every string of `v`.
fn rename(v: &mut serde_json::Value, from: &str, to: &str) {
    match v {
        serde_json::Value::String(s) if s.contains(from) => *s = s.replace(from, to),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|v| rename(v, from, to)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|v| rename(v, from, to)),
        _ => {}
    }
}

/// A `workflow_job` delivery for `job`: GitHub's example
/// ([`EXAMPLE_DELIVERY`]) with this job, its repository, the organisation
/// and the App installation (checked against GitHub's webhook schemas by
/// `tests/openapi_oracle.rs`).
fn workflow_job_payload(cfg: &SimConfig, job: &SimJob, action: &str) -> serde_json::Value {
    let status = match (action, job.status) {
        ("queued", _) => "queued",
        ("in_progress", _) => "in_progress",
        _ => "completed",
    };
    let (owner, name) = job
        .repository
        .split_once('/')
        .unwrap_or((&job.repository, ""));
    let mut payload = EXAMPLE_DELIVERY.clone();
    let example_repo = payload["repository"]["full_name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let example_owner = payload["repository"]["owner"]["login"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let example_org = payload["organization"]["login"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    rename(&mut payload["repository"], &example_repo, &job.repository);
    rename(&mut payload["repository"], &example_owner, owner);
    payload["repository"]["name"] = name.into();
    payload["repository"]["private"] = true.into();
    rename(
        &mut payload["organization"],
        &example_org,
        &cfg.organization,
    );
    payload["action"] = action.into();
    payload["workflow_job"] = job_json(job, status);
    payload["installation"] = serde_json::json!({
        "id": cfg.installation_id,
        "node_id": format!("MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9u{}", cfg.installation_id),
    });
    payload
}
