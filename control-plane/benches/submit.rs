//! `cargo bench -p grs-control-plane --bench submit`
//!
//! `SubmitJobEvent` over loopback gRPC into a real Redis, measured against
//! the release `grs-control-plane` binary running as its own process:
//!
//! 1. throughput: concurrent clients submit distinct queued jobs as fast as
//!    they are answered, for `GRS_BENCH_SECONDS` (default 10);
//! 2. latency: an open-loop 1,000 events/s for the same time, p50/p99/max;
//! 3. memory: the control plane's resident set with every accepted job
//!    queued (the pool is paused, so nothing leaves the queue).
//!
//! Needs Redis at `GRS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); keys go
//! under a fresh prefix, deleted at the end.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use grs_control_plane::store::Store;
use grs_control_plane::testing::{job_event, redis_store_at, redis_url};
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use grs_proto::v1::{self as pb, JobAction};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

const CHANNELS: usize = 4;
const IN_FLIGHT: usize = 64;

/// User + system CPU seconds of a process, from /proc (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Redis's own CPU seconds (`INFO cpu`).
async fn redis_cpu_seconds(url: &str) -> f64 {
    let Ok(client) = redis::Client::open(url) else {
        return 0.0;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return 0.0;
    };
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("GRS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let prefix = format!("grs-bench-{:x}", rand::random::<u32>());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = tempfile::NamedTempFile::new().unwrap();
    write!(
        config,
        "[control_plane]\nlisten = \"127.0.0.1:{port}\"\nstore = \"redis\"\n\
         [redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n\
         [pools.linux]\nlabels = [\"self-hosted\", \"linux\", \"x64\"]\nmax_instances = 4\npaused = true\n\
         [pools.linux.provisioner]\ntype = \"fake\"\n",
        redis_url()
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grs-control-plane"))
        .arg("--config")
        .arg(config.path())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start grs-control-plane");
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let channels: Vec<Channel> = loop {
        let mut chans = Vec::new();
        for _ in 0..CHANNELS {
            match Channel::from_shared(url.clone()).unwrap().connect().await {
                Ok(c) => chans.push(c),
                Err(_) => break,
            }
        }
        if chans.len() == CHANNELS {
            break chans;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "control plane did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss_idle = rss_kib(child.id());
    let next_id = Arc::new(AtomicU64::new(10_000_000_000));

    // Warm-up (connections, script cache).
    let mut c = ControlPlaneClient::new(channels[0].clone());
    for _ in 0..200 {
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        c.submit_job_event(pb::SubmitJobEventRequest {
            event: Some(job_event(&format!("w{id}"), JobAction::Queued, id)),
        })
        .await
        .unwrap();
    }

    // 1. Throughput, closed loop.
    let accepted = Arc::new(AtomicU64::new(0));
    let (cp_cpu0, redis_cpu0) = (
        cpu_seconds(child.id()),
        redis_cpu_seconds(&redis_url()).await,
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..IN_FLIGHT {
        let mut c = ControlPlaneClient::new(channels[i % CHANNELS].clone());
        let (next_id, accepted) = (next_id.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let r = c
                    .submit_job_event(pb::SubmitJobEventRequest {
                        event: Some(job_event(&format!("t{id}"), JobAction::Queued, id)),
                    })
                    .await;
                if matches!(r, Ok(ref r) if r.get_ref().outcome() == pb::SubmitOutcome::Accepted) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let n = accepted.load(Ordering::Relaxed) as f64;
    let rate = n / elapsed;
    // CPU per event: steadier than the rate on a machine shared with the
    // load generator (and anything else).
    let cp_us = (cpu_seconds(child.id()) - cp_cpu0) * 1e6 / n;
    let redis_us = (redis_cpu_seconds(&redis_url()).await - redis_cpu0) * 1e6 / n;

    // 2. Latency at a fixed 1,000 events/s, open loop: requests are sent on
    // schedule whether or not earlier ones were answered.
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut pending = Vec::new();
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        let mut c = ControlPlaneClient::new(channels[(sent as usize) % CHANNELS].clone());
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let (hist, errors) = (hist.clone(), errors.clone());
        pending.push(tokio::spawn(async move {
            let at = Instant::now();
            let r = c
                .submit_job_event(pb::SubmitJobEventRequest {
                    event: Some(job_event(&format!("l{id}"), JobAction::Queued, id)),
                })
                .await;
            let us = at.elapsed().as_micros() as u64;
            match r {
                Ok(_) => hist.lock().unwrap().record(us.max(1)).unwrap(),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        sent += 1;
    }
    for p in pending {
        p.await.unwrap();
    }
    let achieved = sent as f64 / t1.elapsed().as_secs_f64();
    let h = hist.lock().unwrap().clone();

    // 3. Memory with everything queued.
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let rss_loaded = rss_kib(child.id());

    println!(
        "## SubmitJobEvent into Redis (loopback gRPC, {} concurrent requests over {} HTTP/2 connections)",
        IN_FLIGHT, CHANNELS
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| accepted events/s, sustained {seconds} s | {rate:.0} |");
    println!("| CPU per accepted event: control plane / Redis | {cp_us:.0} / {redis_us:.0} µs |");
    println!("| open-loop rate offered / achieved | 1000 / {achieved:.0} events/s |");
    println!(
        "| latency at 1000/s: p50 / p99 / max | {:.2} / {:.2} / {:.2} ms |",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    println!("| errors at 1000/s | {} |", errors.load(Ordering::Relaxed));
    println!(
        "| jobs queued at the end | {} |",
        stats.provision_queue_depth
    );
    println!(
        "| control-plane RSS idle / with all jobs queued | {:.1} / {:.1} MiB |",
        rss_idle as f64 / 1024.0,
        rss_loaded as f64 / 1024.0
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let store = redis_store_at(&redis_url(), &prefix);
    store.flush_prefix().await.unwrap();
    let _ = store.ping().await;
}
