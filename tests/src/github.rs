//! The GitHub side as a process: `grs-github-sim` runs the GitHub simulator
//! of `grs-github` (REST API, signed `workflow_job` webhooks, runners that
//! take any matching queued job) behind a delivery relay, and serves a
//! control API for the harness. [`GitHubSimClient`] drives it.
//!
//! The relay sits where the internet and a load balancer sit in
//! production: the simulator signs and sends every delivery to it, it
//! forwards the bytes unchanged (signature intact) to one of the gateways,
//! failing over to the next on a connection error or a 5xx (as a load
//! balancer with health checks does), and it injects the delivery faults
//! the scenarios and the soak need: duplicated, reordered (held for a
//! random time, then sent), lost (answered with an error and never sent:
//! GitHub shows it as a failed delivery) and held until released (to make
//! `completed` arrive before `queued`). It also timestamps, per job, when
//! GitHub sent `queued`, `in_progress` and `completed`: the latencies the
//! soak reports are measured on GitHub's clock.
//!
//! With `redeliver_failed`, a delivery the gateways answered with an error
//! (or did not answer) is sent again until accepted, as an operator or a
//! script pressing "Redeliver" would; such redeliveries are counted
//! separately. Lost deliveries are never redelivered by the relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use grs_github::sim::{GitHubSim, NewJob, SimConfig};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Delivery faults, each a probability per delivery (0.0 to 1.0).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeliveryFaults {
    /// Sent twice (the copy a random time later, same delivery id).
    pub duplicate: f64,
    /// Held for a random time up to `reorder_max_ms`, then sent: later
    /// deliveries overtake it.
    pub reorder: f64,
    /// Never sent; GitHub sees an error answer.
    pub lose: f64,
    /// Deliveries with these actions (`completed`, ...) are all lost, as
    /// `lose` loses them, redeliveries included: no copy ever gets
    /// through, so only GRS asking GitHub finds out.
    pub lose_actions: Vec<String>,
    /// The longest hold of a reordered delivery or a duplicate.
    pub reorder_max_ms: u64,
    /// Failed deliveries are sent again until accepted (see the module
    /// doc).
    pub redeliver_failed: bool,
}

/// What the relay did, counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayStats {
    /// Deliveries the simulator sent.
    pub received: u64,
    /// Sends to a gateway (copies and redeliveries included).
    pub forwarded: u64,
    /// Deliveries sent a second time.
    pub duplicated: u64,
    /// Deliveries held back.
    pub reordered: u64,
    /// Deliveries lost.
    pub lost: u64,
    /// Sends a gateway answered with an error or not at all.
    pub failed: u64,
    /// Failed deliveries sent again (`redeliver_failed`).
    pub redelivered: u64,
    /// Sends that went to a second gateway after the first failed.
    pub failovers: u64,
    /// Deliveries held until released.
    pub held: u64,
}

/// A job as the harness sees it on GitHub, with GitHub's timestamps (ms
/// since the simulator started).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobView {
    /// `workflow_job.id`.
    pub id: u64,
    /// The labels it asked for.
    pub labels: Vec<String>,
    /// `queued`, `in_progress`, `completed`.
    pub status: String,
    /// `success`, `cancelled`, ...
    pub conclusion: Option<String>,
    /// The runner that took it.
    pub runner_name: Option<String>,
    /// When GitHub sent `queued`.
    pub queued_ms: Option<u64>,
    /// When GitHub sent `in_progress` (a runner took it).
    pub started_ms: Option<u64>,
    /// When GitHub sent `completed`.
    pub completed_ms: Option<u64>,
    /// Distinct `in_progress` deliveries GitHub sent for it (a job runs
    /// once: 1; a redelivery repeats a delivery id and does not count).
    pub starts: u32,
}

/// A runner registration on GitHub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunnerView {
    /// GitHub's id.
    pub id: u64,
    /// Its name (the instance's).
    pub name: String,
    /// A VM booted with its configuration.
    pub online: bool,
    /// Running a job.
    pub busy: bool,
}

#[derive(Debug, Default)]
struct JobTimes {
    queued: Option<u64>,
    started: Option<u64>,
    completed: Option<u64>,
    starts: u32,
    /// `in_progress` delivery ids seen (a redelivery repeats one).
    start_deliveries: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Delivery {
    headers: Vec<(String, String)>,
    body: Bytes,
}

#[derive(Debug, Default)]
struct Relay {
    targets: Vec<String>,
    next_target: usize,
    faults: DeliveryFaults,
    hold_next: Vec<String>,
    held: Vec<Delivery>,
    stats: RelayStats,
    times: HashMap<u64, JobTimes>,
}

#[derive(Clone)]
struct Ctx {
    sim: GitHubSim,
    relay: Arc<Mutex<Relay>>,
    http: reqwest::Client,
    epoch: Instant,
}

impl Ctx {
    fn relay(&self) -> std::sync::MutexGuard<'_, Relay> {
        self.relay.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// How `grs-github-sim` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The webhook secret deliveries are signed with.
    pub webhook_secret: String,
    /// The personal access token the API accepts.
    pub pat: String,
    /// How long a job runs once taken, unless it says.
    pub job_duration: Duration,
    /// Gateways' `/webhook` URLs.
    pub targets: Vec<String>,
    /// API calls an hour the primary rate limit allows.
    pub rate_limit: u64,
}

/// Runs the simulator, the relay and the control API; prints `api: URL`
/// and `control: URL`; serves until `shutdown` completes.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sim = GitHubSim::start(SimConfig {
        webhook_secret: opts.webhook_secret,
        pat: Some(opts.pat),
        job_duration: opts.job_duration,
        rate_limit: opts.rate_limit,
        ..SimConfig::default()
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let control = format!("http://{}", listener.local_addr()?);
    sim.set_webhook_url(format!("{control}/relay"));
    let ctx = Ctx {
        sim: sim.clone(),
        relay: Arc::new(Mutex::new(Relay {
            targets: opts.targets,
            ..Relay::default()
        })),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        epoch: Instant::now(),
    };
    let app = axum::Router::new()
        .route("/relay", post(relay))
        .route("/_ctl/jobs", get(jobs).post(queue))
        .route("/_ctl/jobs/{id}/cancel", post(cancel))
        .route("/_ctl/runners", get(runners))
        .route("/_ctl/relay", get(relay_stats).put(set_relay))
        .route("/_ctl/relay/hold", post(hold))
        .route("/_ctl/relay/release", post(release))
        .with_state(ctx);
    println!("api: {}", sim.url());
    println!("control: {control}");
    use std::io::Write;
    std::io::stdout().flush().ok();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    sim.shutdown().await;
    Ok(())
}

/// What a delivery is about: (action, job id).
fn about(body: &[u8]) -> (String, u64) {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    (
        v["action"].as_str().unwrap_or("").to_owned(),
        v["workflow_job"]["id"].as_u64().unwrap_or(0),
    )
}

async fn relay(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let (action, job_id) = about(&body);
    let delivery_id = headers
        .get("x-github-delivery")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let delivery = Delivery {
        headers: headers
            .iter()
            .filter(|(k, _)| {
                k.as_str().starts_with("x-") || *k == "content-type" || *k == "user-agent"
            })
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body,
    };
    let now = ctx.now_ms();
    let (faults, held) = {
        let mut r = ctx.relay();
        r.stats.received += 1;
        let t = r.times.entry(job_id).or_default();
        match action.as_str() {
            "queued" => {
                t.queued.get_or_insert(now);
            }
            "in_progress" => {
                t.started.get_or_insert(now);
                if t.start_deliveries.insert(delivery_id) {
                    t.starts += 1;
                }
            }
            "completed" => {
                t.completed.get_or_insert(now);
            }
            _ => {}
        }
        let held = if let Some(i) = r.hold_next.iter().position(|a| *a == action) {
            r.hold_next.remove(i);
            r.held.push(delivery.clone());
            r.stats.held += 1;
            true
        } else {
            false
        };
        (r.faults.clone(), held)
    };
    if held {
        return StatusCode::ACCEPTED;
    }
    let (lose, reorder, duplicate, delay, dup_delay) = {
        let mut rng = rand::rng();
        let max = faults.reorder_max_ms.max(1);
        (
            faults.lose_actions.contains(&action) || rng.random_bool(faults.lose.clamp(0.0, 1.0)),
            rng.random_bool(faults.reorder.clamp(0.0, 1.0)),
            rng.random_bool(faults.duplicate.clamp(0.0, 1.0)),
            Duration::from_millis(rng.random_range(0..max)),
            Duration::from_millis(rng.random_range(0..max)),
        )
    };
    if lose {
        ctx.relay().stats.lost += 1;
        tracing::info!(%action, job_id, "delivery lost (injected)");
        return StatusCode::BAD_GATEWAY;
    }
    if duplicate {
        ctx.relay().stats.duplicated += 1;
        let (ctx, d) = (ctx.clone(), delivery.clone());
        tokio::spawn(async move {
            tokio::time::sleep(dup_delay).await;
            send(&ctx, &d, faults.redeliver_failed).await;
        });
    }
    if reorder {
        ctx.relay().stats.reordered += 1;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send(&ctx, &delivery, faults.redeliver_failed).await;
        });
        return StatusCode::ACCEPTED;
    }
    send(&ctx, &delivery, faults.redeliver_failed).await
}

/// Sends `d` to the gateways (failing over from one to the next); with
/// `redeliver`, keeps sending a failed delivery in the background until
/// one accepts it (for up to 5 minutes). Returns the first answer.
async fn send(ctx: &Ctx, d: &Delivery, redeliver: bool) -> StatusCode {
    let status = send_once(ctx, d).await;
    if failed(status) && redeliver {
        let (ctx, d) = (ctx.clone(), d.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                ctx.relay().stats.redelivered += 1;
                if !failed(send_once(&ctx, &d).await) {
                    return;
                }
            }
        });
    }
    status
}

fn failed(s: StatusCode) -> bool {
    s.is_server_error()
}

async fn send_once(ctx: &Ctx, d: &Delivery) -> StatusCode {
    let targets = {
        let mut r = ctx.relay();
        let n = r.targets.len();
        if n == 0 {
            return StatusCode::BAD_GATEWAY;
        }
        let start = r.next_target % n;
        r.next_target = r.next_target.wrapping_add(1);
        (0..n)
            .map(|i| r.targets[(start + i) % n].clone())
            .collect::<Vec<_>>()
    };
    let mut status = StatusCode::BAD_GATEWAY;
    for (i, url) in targets.iter().enumerate() {
        if i > 0 {
            ctx.relay().stats.failovers += 1;
        }
        let mut req = ctx.http.post(url).body(d.body.clone());
        for (k, v) in &d.headers {
            req = req.header(k, v);
        }
        ctx.relay().stats.forwarded += 1;
        status = match req.send().await {
            Ok(r) => StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            Err(_) => StatusCode::BAD_GATEWAY,
        };
        if !failed(status) {
            return status;
        }
        ctx.relay().stats.failed += 1;
    }
    status
}

#[derive(Debug, Deserialize)]
struct QueueRequest {
    labels: Vec<String>,
    #[serde(default)]
    duration_ms: Option<u64>,
}

async fn queue(State(ctx): State<Ctx>, Json(q): Json<QueueRequest>) -> Json<Value> {
    let job = ctx
        .sim
        .queue_job(NewJob {
            labels: q.labels,
            duration: q.duration_ms.map(Duration::from_millis),
            ..NewJob::default()
        })
        .await;
    Json(json!({ "id": job.id }))
}

async fn cancel(State(ctx): State<Ctx>, Path(id): Path<u64>) -> StatusCode {
    match ctx.sim.cancel_job(id).await {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    }
}

async fn jobs(State(ctx): State<Ctx>) -> Json<Vec<JobView>> {
    let jobs = ctx.sim.jobs();
    let r = ctx.relay();
    Json(
        jobs.into_iter()
            .map(|j| {
                let t = r.times.get(&j.id);
                JobView {
                    id: j.id,
                    labels: j.labels,
                    status: serde_json::to_value(j.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    conclusion: j.conclusion,
                    runner_name: j.runner_name,
                    queued_ms: t.and_then(|t| t.queued),
                    started_ms: t.and_then(|t| t.started),
                    completed_ms: t.and_then(|t| t.completed),
                    starts: t.map_or(0, |t| t.starts),
                }
            })
            .collect(),
    )
}

async fn runners(State(ctx): State<Ctx>) -> Json<Vec<RunnerView>> {
    Json(
        ctx.sim
            .runners()
            .into_iter()
            .map(|r| RunnerView {
                id: r.id,
                name: r.name,
                online: r.online,
                busy: r.busy,
            })
            .collect(),
    )
}

#[derive(Debug, Deserialize)]
struct RelaySettings {
    #[serde(default)]
    targets: Option<Vec<String>>,
    #[serde(default)]
    faults: Option<DeliveryFaults>,
}

async fn set_relay(State(ctx): State<Ctx>, Json(s): Json<RelaySettings>) -> StatusCode {
    let mut r = ctx.relay();
    if let Some(t) = s.targets {
        r.targets = t;
    }
    if let Some(f) = s.faults {
        r.faults = f;
    }
    StatusCode::NO_CONTENT
}

async fn relay_stats(State(ctx): State<Ctx>) -> Json<RelayStats> {
    Json(ctx.relay().stats.clone())
}

#[derive(Debug, Deserialize)]
struct HoldRequest {
    action: String,
}

async fn hold(State(ctx): State<Ctx>, Json(h): Json<HoldRequest>) -> StatusCode {
    ctx.relay().hold_next.push(h.action);
    StatusCode::NO_CONTENT
}

async fn release(State(ctx): State<Ctx>) -> StatusCode {
    let held = std::mem::take(&mut ctx.relay().held);
    for d in held {
        send(&ctx, &d, false).await;
    }
    StatusCode::NO_CONTENT
}

/// The harness's handle on a running `grs-github-sim`.
#[derive(Debug, Clone)]
pub struct GitHubSimClient {
    /// The REST API (`github.api_url`).
    pub api: String,
    /// The control API.
    pub control: String,
    http: reqwest::Client,
}

impl GitHubSimClient {
    /// A client of the simulator at `api` with its control API at `control`.
    pub fn new(api: String, control: String) -> Self {
        Self {
            api,
            control,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = req.send().await?.error_for_status()?;
        Ok(resp.json().await?)
    }

    async fn ok(&self, req: reqwest::RequestBuilder) -> anyhow::Result<()> {
        req.send().await?.error_for_status()?;
        Ok(())
    }

    /// Queues a job (GitHub sends `queued`); returns its id.
    pub async fn queue(&self, labels: &[&str], duration: Option<Duration>) -> anyhow::Result<u64> {
        let v: Value = self
            .json(
                self.http
                    .post(format!("{}/_ctl/jobs", self.control))
                    .json(&json!({
                        "labels": labels,
                        "duration_ms": duration.map(|d| d.as_millis() as u64),
                    })),
            )
            .await?;
        v["id"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no job id in {v}"))
    }

    /// Cancels a job (a queued one completes `cancelled`, without runner).
    pub async fn cancel(&self, id: u64) -> anyhow::Result<()> {
        self.ok(self
            .http
            .post(format!("{}/_ctl/jobs/{id}/cancel", self.control)))
            .await
    }

    /// Every job.
    pub async fn jobs(&self) -> anyhow::Result<Vec<JobView>> {
        self.json(self.http.get(format!("{}/_ctl/jobs", self.control)))
            .await
    }

    /// One job.
    pub async fn job(&self, id: u64) -> anyhow::Result<Option<JobView>> {
        Ok(self.jobs().await?.into_iter().find(|j| j.id == id))
    }

    /// Every runner registration.
    pub async fn runners(&self) -> anyhow::Result<Vec<RunnerView>> {
        self.json(self.http.get(format!("{}/_ctl/runners", self.control)))
            .await
    }

    /// Sets the gateways deliveries go to.
    pub async fn set_targets(&self, targets: &[String]) -> anyhow::Result<()> {
        self.ok(self
            .http
            .put(format!("{}/_ctl/relay", self.control))
            .json(&json!({ "targets": targets })))
            .await
    }

    /// Sets the delivery faults.
    pub async fn set_faults(&self, faults: &DeliveryFaults) -> anyhow::Result<()> {
        self.ok(self
            .http
            .put(format!("{}/_ctl/relay", self.control))
            .json(&json!({ "faults": faults })))
            .await
    }

    /// The next delivery with this action is held until [`Self::release`].
    pub async fn hold_next(&self, action: &str) -> anyhow::Result<()> {
        self.ok(self
            .http
            .post(format!("{}/_ctl/relay/hold", self.control))
            .json(&json!({ "action": action })))
            .await
    }

    /// Sends every held delivery.
    pub async fn release(&self) -> anyhow::Result<()> {
        self.ok(self
            .http
            .post(format!("{}/_ctl/relay/release", self.control)))
            .await
    }

    /// What the relay did.
    pub async fn relay_stats(&self) -> anyhow::Result<RelayStats> {
        self.json(self.http.get(format!("{}/_ctl/relay", self.control)))
            .await
    }

    /// A VM's runner starts from its JIT configuration (`POST /_sim/boot`).
    pub async fn boot(&self, jit: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}/_sim/boot", self.api))
            .body(jit.to_owned())
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "the runner did not start: HTTP {}",
            resp.status()
        );
        Ok(())
    }
}
