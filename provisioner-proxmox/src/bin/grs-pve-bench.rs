//! `grs-pve-bench`: the numbers in `provisioner-proxmox/BENCH.md`.
//!
//! 1. PVE API calls per create+delete cycle with the simulator's default
//!    task durations and production polling settings, counted by the
//!    simulator (every request, retries and task polls included).
//! 2. N concurrent creates (default 50) on three nodes whose maximums add
//!    up to N, with lock contention on clone injected INSIDE the clone task
//!    (as real PVE takes the template's lock in the worker): all must succeed,
//!    never above a node's maximum; wall time against the simulator's own
//!    lower bound.
//!
//! Prints Markdown. `cargo run -p grs-provisioner-proxmox --release --bin grs-pve-bench`

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use grs_provisioner::conformance::spec;
use grs_provisioner_proxmox::sim::{Fault, SimOptions};
use grs_provisioner_proxmox::testing::{NodeSpec, POOL, SimFixture};
use grs_provisioner_proxmox::{ProxmoxConfig, ProxmoxProvisioner};

#[derive(Debug, Parser)]
struct Args {
    /// Create+delete cycles for the call count.
    #[arg(long, default_value_t = 10)]
    cycles: u64,
    /// Concurrent creates.
    #[arg(long, default_value_t = 50)]
    concurrent: usize,
    /// Probability that a clone task fails on the template's lock.
    #[arg(long, default_value_t = 0.3)]
    contention: f64,
}

/// The fixture's provisioner, but with production timings (polling,
/// backoff) instead of the test-friendly ones.
fn production_provisioner(f: &SimFixture) -> Arc<ProxmoxProvisioner> {
    let defaults = ProxmoxConfig::new("https://x", "a@b!c");
    let mut conn = f.conn.clone();
    conn.task_poll_min = defaults.task_poll_min;
    conn.task_poll_max = defaults.task_poll_max;
    conn.retry_base_delay = defaults.retry_base_delay;
    conn.retry_max_delay = defaults.retry_max_delay;
    conn.retry_attempts = defaults.retry_attempts;
    Arc::new(
        ProxmoxProvisioner::new(
            &conn,
            POOL,
            &f.pool,
            grs_provisioner_proxmox::testing::INSTALLATION,
            grs_provisioner_proxmox::testing::PREFIX,
        )
        .expect("valid"),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();

    // 1. Calls per cycle.
    let f = SimFixture::start(
        SimOptions {
            tls: true,
            ..SimOptions::default()
        },
        &[NodeSpec::new("pve1", 64, None)],
    )
    .await;
    let p = production_provisioner(&f);
    let d = grs_provisioner_proxmox::sim::TaskDurations::default();
    println!("## PVE API calls per create+delete cycle\n");
    println!(
        "Simulator defaults: linked clone {:?}, start {:?}, stop {:?}, destroy {:?}; HTTPS with a pinned fingerprint; production polling (first poll at the learned task duration, 1 s for a task type not seen yet, then {:?} growing x1.5 to {:?}).\n",
        d.linked_clone,
        d.start,
        d.stop,
        d.destroy,
        p_conn_poll().0,
        p_conn_poll().1
    );
    println!("| cycle | calls | of which task polls | create | delete |");
    println!("|---|---|---|---|---|");
    let mut warm = Vec::new();
    let mut all = Vec::new();
    let mut breakdown = Default::default();
    for i in 0..args.cycles {
        f.sim.reset_request_count();
        let name = format!("grs-conf-b{i}");
        let t = Instant::now();
        p.create(&spec(POOL, &name, i)).await?;
        let tc = t.elapsed();
        let t = Instant::now();
        p.delete(&name).await?;
        let td = t.elapsed();
        let n = f.sim.request_count();
        let by = f.sim.requests_by_endpoint();
        let polls = by
            .get("GET /nodes/{node}/tasks/{upid}/status")
            .copied()
            .unwrap_or(0);
        println!("| {} | {n} | {polls} | {tc:.2?} | {td:.2?} |", i + 1);
        if i > 0 {
            warm.push(n);
        }
        all.push(n);
        breakdown = by;
    }
    let max = warm.iter().max().copied().unwrap_or(0);
    let mean = warm.iter().sum::<u64>() as f64 / warm.len().max(1) as f64;
    println!(
        "\nAll {} cycles: max {} calls. Warm cycles (2..={}): mean {mean:.1}, max {max} calls (goal: at most 15).\n",
        args.cycles,
        all.iter().max().copied().unwrap_or(0),
        args.cycles
    );
    println!("Last cycle by endpoint:\n");
    println!("| endpoint | calls |\n|---|---|");
    for (k, v) in &breakdown {
        println!("| `{k}` | {v} |");
    }
    f.sim.shutdown().await;

    // 2. Concurrent creates under lock contention.
    let n = args.concurrent;
    let per = n.div_ceil(3);
    let maxes = [per, per, n - 2 * per];
    let nodes: Vec<NodeSpec> = ["pve1", "pve2", "pve3"]
        .iter()
        .zip(maxes)
        .map(|(name, m)| NodeSpec::new(name, 128, Some(m as u32)))
        .collect();
    let f = SimFixture::start(SimOptions::default(), &nodes).await;
    let p = production_provisioner(&f);
    f.sim.inject(Fault::CloneLockContention {
        probability: args.contention,
    });
    f.sim.reset_request_count();
    let t = Instant::now();
    let results = futures::future::join_all((0..n).map(|i| {
        let p = p.clone();
        async move {
            let t = Instant::now();
            let r = p
                .create(&spec(POOL, &format!("grs-conf-c{i}"), i as u64))
                .await;
            (r, t.elapsed())
        }
    }))
    .await;
    let wall = t.elapsed();
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    let mut lat: Vec<_> = results.iter().map(|(_, d)| *d).collect();
    lat.sort();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    let bound = f.sim.lower_bound_for_creates(n);
    let peak = f.sim.peak_vms_per_node();
    let requests = f.sim.request_count();
    let clone_calls = f
        .sim
        .requests_by_endpoint()
        .get("POST /nodes/{node}/qemu/{vmid}/clone")
        .copied()
        .unwrap_or(0);
    println!("## {n} concurrent creates with lock contention\n");
    println!(
        "Three nodes with maximums {maxes:?} (sum {n}), the template on shared storage; every clone TASK fails with PVE's `can't lock file ... got timeout` with probability {} (the HTTP call answers a UPID: qemu-server takes the template's lock in the clone worker); clones of the template run 4 at a time (storage lock); default task durations.\n",
        args.contention
    );
    println!("| measure | value |\n|---|---|");
    println!("| creates succeeded | {ok} / {n} |");
    println!("| clone requests (incl. lock-timeout retries) | {clone_calls} |");
    println!(
        "| clone tasks failed on the lock | {} |",
        f.sim.task_count("qmclone").saturating_sub(n)
    );
    println!("| API requests in total | {requests} |");
    for (i, node) in ["pve1", "pve2", "pve3"].iter().enumerate() {
        println!(
            "| peak VMs on {node} (max {}) | {} |",
            maxes[i],
            peak.get(*node).copied().unwrap_or(0)
        );
    }
    println!("| wall time | {wall:.2?} |");
    println!(
        "| simulator lower bound (ceil({n}/4) clone waves x {:?} + start {:?}) | {bound:.2?} |",
        d.linked_clone, d.start
    );
    println!(
        "| wall / lower bound | {:.2} |",
        wall.as_secs_f64() / bound.as_secs_f64()
    );
    println!(
        "| create latency p50 / p95 / max | {:.2?} / {:.2?} / {:.2?} |",
        lat[lat.len() / 2],
        lat[lat.len() * 95 / 100],
        lat[lat.len() - 1]
    );
    for e in errors.iter().take(5) {
        println!("\nerror: {e}");
    }
    let over = ["pve1", "pve2", "pve3"]
        .iter()
        .enumerate()
        .any(|(i, node)| peak.get(*node).copied().unwrap_or(0) > maxes[i]);
    f.sim.clear_faults();
    let t = Instant::now();
    futures::future::join_all((0..n).map(|i| {
        let p = p.clone();
        async move { p.delete(&format!("grs-conf-c{i}")).await }
    }))
    .await;
    println!(
        "\nDeleting all {n} concurrently took {:.2?}; VMs left: {}.",
        t.elapsed(),
        f.sim.vms().len() - 1
    );
    anyhow::ensure!(ok == n, "{} creates failed", n - ok);
    anyhow::ensure!(!over, "a node went above its maximum: {peak:?}");
    Ok(())
}

fn p_conn_poll() -> (std::time::Duration, std::time::Duration) {
    let d = ProxmoxConfig::new("https://x", "a@b!c");
    (d.task_poll_min, d.task_poll_max)
}
