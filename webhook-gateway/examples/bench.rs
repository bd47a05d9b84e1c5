//! The gateway benchmark's pieces, in one example binary (see BENCH.md and
//! `bench/run.sh`):
//!
//! - `bare`: the least a receiver can do: one axum handler that checks the
//!   HMAC, parses the JSON, and sends one pipelined `SET NX` + `XADD` to
//!   Redis. The yardstick.
//! - `fake-cp`: the scripted fake control plane of the tests, doing that
//!   same pipelined `SET NX` + `XADD` per new event, so gateway + fake
//!   control plane costs what GRS's edge costs minus the real control
//!   plane's own logic.
//! - `load`: the load generator: signed, real-size (the 8.6 KB `waiting`
//!   fixture, action set to `queued`) `workflow_job` deliveries, each with a
//!   distinct job id and delivery id, over keep-alive HTTP/1.1 connections;
//!   closed loop (as fast as it goes) or open loop at a fixed rate, with
//!   latency measured from each request's scheduled start (no coordinated
//!   omission).

#[path = "../tests/support/fake_control_plane.rs"]
#[allow(unreachable_pub)]
mod fake;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use clap::{Parser, Subcommand};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use sha2::Sha256;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The bare receiver.
    Bare {
        #[arg(long, default_value = "127.0.0.1:18081")]
        listen: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
        #[arg(long, env = "GRS_WEBHOOK_SECRET")]
        secret: String,
    },
    /// The fake control plane, writing to Redis.
    FakeCp {
        #[arg(long, default_value = "127.0.0.1:50151")]
        listen: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
    },
    /// The load generator.
    Load {
        /// The receiver's webhook URL.
        #[arg(long)]
        url: String,
        #[arg(long, env = "GRS_WEBHOOK_SECRET")]
        secret: String,
        /// Requests per second (open loop); 0: as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// The payload template (a workflow_job JSON).
        #[arg(long)]
        body: std::path::PathBuf,
        /// Job ids start here (distinct per run).
        #[arg(long, default_value_t = 20_000_000_000)]
        first_job_id: u64,
        /// A label printed with the results.
        #[arg(long, default_value = "")]
        name: String,
    },
}

const KEY_PREFIX: &str = "grsbench";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = match &args.cmd {
        Cmd::Load { .. } => 1,
        _ => 2,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.cmd {
            Cmd::Bare {
                listen,
                redis,
                secret,
            } => bare(listen, redis, secret).await,
            Cmd::FakeCp { listen, redis } => fake_cp(listen, redis).await,
            Cmd::Load {
                url,
                secret,
                rate,
                duration,
                warmup,
                connections,
                body,
                first_job_id,
                name,
            } => {
                load(LoadArgs {
                    url,
                    secret,
                    rate,
                    duration,
                    warmup,
                    connections,
                    body,
                    first_job_id,
                    name,
                })
                .await
            }
        }
    })
}

/// `SET <prefix>:delivery:<id> 1 NX EX 3d` + `XADD <prefix>:events`, pipelined.
async fn record(
    redis: &mut redis::aio::ConnectionManager,
    delivery: &str,
    job_id: u64,
    action: &str,
) -> redis::RedisResult<()> {
    let mut p = redis::pipe();
    p.cmd("SET")
        .arg(format!("{KEY_PREFIX}:delivery:{delivery}"))
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(259_200)
        .ignore()
        .cmd("XADD")
        .arg(format!("{KEY_PREFIX}:events"))
        .arg("MAXLEN")
        .arg("~")
        .arg(2_000_000)
        .arg("*")
        .arg("job_id")
        .arg(job_id)
        .arg("action")
        .arg(action)
        .ignore();
    p.query_async(redis).await
}

async fn bare(listen: String, redis_url: String, secret: String) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Job {
        id: u64,
    }
    #[derive(serde::Deserialize)]
    struct Payload<'a> {
        action: &'a str,
        workflow_job: Job,
    }
    let redis = redis::aio::ConnectionManager::new(redis::Client::open(redis_url)?).await?;
    let secret = Arc::new(secret);
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let mut redis = redis.clone();
            let secret = secret.clone();
            async move {
                let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
                if grs_github::signature::verify(secret.as_bytes(), &body, sig).is_err() {
                    return StatusCode::UNAUTHORIZED;
                }
                let Some(delivery) = headers
                    .get("x-github-delivery")
                    .and_then(|v| v.to_str().ok())
                else {
                    return StatusCode::BAD_REQUEST;
                };
                let Ok(p) = serde_json::from_slice::<Payload>(&body) else {
                    return StatusCode::BAD_REQUEST;
                };
                match record(&mut redis, delivery, p.workflow_job.id, p.action).await {
                    Ok(()) => StatusCode::ACCEPTED,
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("bare receiver on {listen}");
    axum::serve(l, app).await?;
    Ok(())
}

async fn fake_cp(listen: String, redis_url: String) -> anyhow::Result<()> {
    let redis = redis::aio::ConnectionManager::new(redis::Client::open(redis_url)?).await?;
    let hook: fake::SubmitHook = Arc::new(move |ev: grs_proto::v1::JobEvent| {
        let mut redis = redis.clone();
        Box::pin(async move {
            let action = grs_proto::v1::JobAction::try_from(ev.action)
                .map(|a| a.as_str_name())
                .unwrap_or("?");
            record(&mut redis, &ev.delivery_id, ev.job_id, action)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))
        })
    });
    let fake = fake::FakeControlPlane {
        hook: Some(hook),
        record: false,
        ..Default::default()
    };
    let l = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("fake control plane on {listen}");
    let running = fake.serve_on(l).await;
    tokio::signal::ctrl_c().await?;
    running.stop().await;
    Ok(())
}

struct LoadArgs {
    url: String,
    secret: String,
    rate: u64,
    duration: Duration,
    warmup: Duration,
    connections: usize,
    body: std::path::PathBuf,
    first_job_id: u64,
    name: String,
}

/// The template split around the job id, so each body is built by
/// concatenation.
struct Template {
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Template {
    fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        v["action"] = "queued".into();
        v["workflow_job"]["status"] = "queued".into();
        v["workflow_job"]["id"] = 1_234_567_890_123u64.into();
        let text = serde_json::to_string_pretty(&v)?;
        let (before, after) = text
            .split_once("1234567890123")
            .ok_or_else(|| anyhow::anyhow!("no job id in template"))?;
        Ok(Self {
            before: before.into(),
            after: after.into(),
        })
    }

    fn body(&self, job_id: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.before.len() + self.after.len() + 20);
        b.extend_from_slice(&self.before);
        b.extend_from_slice(job_id.to_string().as_bytes());
        b.extend_from_slice(&self.after);
        b
    }
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    let url: hyper::Uri = a.url.parse()?;
    let authority = url
        .authority()
        .ok_or_else(|| anyhow::anyhow!("no host in --url"))?
        .clone();
    let tpl = Arc::new(Template::load(&a.body)?);
    let key = Arc::new(Hmac::<Sha256>::new_from_slice(a.secret.as_bytes())?);
    let next_id = Arc::new(AtomicU64::new(a.first_job_id));
    let run_tag = format!("{:08x}", rand::random::<u32>());
    let start = Instant::now();
    let measure_from = start + a.warmup;
    let end = measure_from + a.duration;
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let (authority, url, tpl, key, next_id, run_tag) = (
            authority.clone(),
            url.clone(),
            tpl.clone(),
            key.clone(),
            next_id.clone(),
            run_tag.clone(),
        );
        let (rate, conns) = (a.rate, a.connections as u64);
        tasks.push(tokio::spawn(async move {
            let mut hist =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut ok, mut failed) = (0u64, 0u64);
            let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            // Open loop: connection c sends at start + (c + k*conns) / rate.
            let interval = (rate > 0).then(|| Duration::from_secs_f64(conns as f64 / rate as f64));
            let mut scheduled = start
                + interval
                    .map(|i| i.mul_f64(c as f64 / conns as f64))
                    .unwrap_or_default();
            loop {
                let this = match interval {
                    Some(i) => {
                        tokio::time::sleep_until(scheduled.into()).await;
                        let this = scheduled;
                        scheduled += i;
                        this
                    }
                    None => Instant::now(),
                };
                if this >= end {
                    break;
                }
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let body = tpl.body(id);
                let mut mac = (*key).clone();
                mac.update(&body);
                let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                let req = hyper::Request::post(url.clone())
                    .header("host", authority.as_str())
                    .header("content-type", "application/json")
                    .header("user-agent", "GitHub-Hookshot/bench")
                    .header("x-github-event", "workflow_job")
                    .header("x-github-delivery", format!("{run_tag}-{id}"))
                    .header("x-hub-signature-256", sig)
                    .body(Full::new(Bytes::from(body)))?;
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let _ = resp.into_body().collect().await?;
                let done = Instant::now();
                if this >= measure_from {
                    if status.is_success() {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                    hist.record((done - this).as_micros().max(1) as u64).ok();
                }
            }
            anyhow::Ok((hist, ok, failed))
        }));
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (h, o, f) = t.await??;
        hist.add(h)?;
        ok += o;
        failed += f;
    }
    let secs = a.duration.as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}\tmode={mode}\tconns={c}\tok={ok}\tfailed={failed}\trate={r:.0}/s\tp50={p50:.2}ms\tp99={p99:.2}ms\tp999={p999:.2}ms\tmax={max:.2}ms",
        name = a.name,
        mode = if a.rate > 0 {
            format!("open@{}/s", a.rate)
        } else {
            "closed".into()
        },
        c = a.connections,
        r = ok as f64 / secs,
        p50 = ms(0.5),
        p99 = ms(0.99),
        p999 = ms(0.999),
        max = hist.max() as f64 / 1000.0,
    );
    Ok(())
}
