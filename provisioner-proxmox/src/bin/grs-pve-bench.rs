//! `grs-pve-bench`: the numbers in `provisioner-proxmox/BENCH.md` and the
//! README's Proxmox benchmarks, in one run.
//!
//! 1. **Cold path, one job at a time**, from a fresh client (nothing
//!    learned yet) at the simulator's realistic durations, production
//!    settings, HTTPS with a pinned certificate: GRS's own share of each
//!    create (create time minus the simulated clone and start) and of each
//!    delete (minus the simulated stop and destroy), as percentiles, and the
//!    PVE API calls of every create+delete cycle, counted by the simulator.
//! 2. **Burst**: 100 jobs on a pool of 50 (one node, the template on local
//!    storage), worked the way the control plane does with its default
//!    settings (one dispatcher per instance of capacity: 50 creates at once,
//!    the rest waiting for room): when the first 50 VMs are running,
//!    against the simulator's lower bound (its storage lock serializes the
//!    clones' volume creation; see `SimOptions::storage_lock_share`).
//! 3. **Template replicas**: the same 50 creates over three nodes, each
//!    cloning from its own copy of the template: wall time against the
//!    lower bound, and the gain over 2.
//!
//! Prints Markdown; exits non-zero when a create fails or a node goes above
//! its maximum. `cargo run --release -p grs-provisioner-proxmox --bin grs-pve-bench`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use grs_provisioner::conformance::spec;
use grs_provisioner_proxmox::sim::{SimOptions, TaskDurations};
use grs_provisioner_proxmox::testing::{INSTALLATION, NodeSpec, POOL, PREFIX, SimFixture};
use grs_provisioner_proxmox::{ProxmoxConfig, ProxmoxPoolConfig, ProxmoxProvisioner};
use tokio::sync::{Mutex, Semaphore};

#[derive(Debug, Parser)]
struct Args {
    /// Create+delete cycles, one job at a time.
    #[arg(long, default_value_t = 30)]
    cycles: u64,
    /// Jobs in the burst.
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// The pool's capacity (the burst's first wave).
    #[arg(long, default_value_t = 50)]
    pool: usize,
}

/// A provisioner for `pool` on the fixture's simulator with production
/// timings (polling, task estimates, backoff) instead of the test-friendly
/// ones. A fresh client: nothing learned.
fn production_provisioner(f: &SimFixture, pool: &ProxmoxPoolConfig) -> Arc<ProxmoxProvisioner> {
    let defaults = ProxmoxConfig::new("https://x", "a@b!c");
    let mut conn = f.conn.clone();
    conn.task_poll_min = defaults.task_poll_min;
    conn.task_poll_max = defaults.task_poll_max;
    conn.task_expected = defaults.task_expected.clone();
    conn.retry_base_delay = defaults.retry_base_delay;
    conn.retry_max_delay = defaults.retry_max_delay;
    conn.retry_attempts = defaults.retry_attempts;
    Arc::new(ProxmoxProvisioner::new(&conn, POOL, pool, INSTALLATION, PREFIX).expect("valid"))
}

/// The `p`-th percentile (nearest rank) of sorted `v`.
fn pct(v: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn percentiles(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{} | {} | {} | {}",
        ms(pct(v, 50.0)),
        ms(pct(v, 90.0)),
        ms(pct(v, 99.0)),
        ms(v[v.len() - 1])
    )
}

/// Outcome of a burst.
struct Burst {
    /// Until the first `wave` VMs were running.
    wall: Duration,
    bound: Duration,
    requests: u64,
    clone_tasks: usize,
    limit: usize,
    /// When 10 %, 25 %, 50 % and 75 % of the wave were running.
    ramp: Vec<Duration>,
}

/// `jobs` jobs on a pool of `capacity`, as the control plane works them by
/// default: one dispatcher per unit of capacity, each taking the next job
/// and a place (the other jobs wait for room). Returns when `capacity` VMs
/// are running; then deletes everything.
async fn burst(
    f: &SimFixture,
    p: &Arc<ProxmoxProvisioner>,
    jobs: usize,
    capacity: usize,
    bound: Duration,
) -> anyhow::Result<Burst> {
    f.sim.reset_request_count();
    let queue = Arc::new(Mutex::new(0..jobs));
    let room = Arc::new(Semaphore::new(capacity));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..capacity {
        let (queue, room, p, done) = (queue.clone(), room.clone(), p.clone(), done_tx.clone());
        workers.spawn(async move {
            loop {
                let Some(i) = queue.lock().await.next() else {
                    return;
                };
                // Capacity is taken and kept (nothing completes here).
                let Ok(place) = room.clone().acquire_owned().await else {
                    return;
                };
                place.forget();
                let r = p
                    .create(&spec(POOL, &format!("{PREFIX}-b{i}"), i as u64))
                    .await;
                let _ = done.send((i, r.map(|_| ()).map_err(|e| e.to_string())));
            }
        });
    }
    drop(done_tx);
    let mut running = Vec::new();
    let mut ramp = Vec::new();
    while running.len() < capacity {
        let Some((i, r)) = done_rx.recv().await else {
            break;
        };
        if let Err(e) = r {
            anyhow::bail!("create {i} failed: {e}");
        }
        running.push(i);
        ramp.push(t.elapsed());
    }
    let wall = t.elapsed();
    anyhow::ensure!(
        running.len() == capacity,
        "only {} VMs running",
        running.len()
    );
    let out = Burst {
        wall,
        bound,
        requests: f.sim.request_count(),
        clone_tasks: f.sim.task_count("qmclone"),
        limit: p.clone_concurrency(),
        ramp: [capacity / 10, capacity / 4, capacity / 2, capacity * 3 / 4]
            .iter()
            .map(|k| ramp[k.saturating_sub(1)])
            .collect(),
    };
    workers.abort_all();
    futures::future::join_all(
        running
            .iter()
            .map(|i| async move { p.delete(&format!("{PREFIX}-b{i}")).await }),
    )
    .await;
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let d = TaskDurations::default();
    let defaults = ProxmoxConfig::new("https://x", "a@b!c");

    // 1. Cold path, one job at a time.
    let f = SimFixture::start(
        SimOptions {
            tls: true,
            ..SimOptions::default()
        },
        &[NodeSpec::new("pve1", 64, None)],
    )
    .await;
    let p = production_provisioner(&f, &f.pool);
    let create_tasks = d.linked_clone + d.start;
    let delete_tasks = d.stop + d.destroy;
    let mut create_share = Vec::new();
    let mut delete_share = Vec::new();
    let mut calls = Vec::new();
    let mut rows = Vec::new();
    for i in 0..args.cycles {
        f.sim.reset_request_count();
        let name = format!("{PREFIX}-c{i}");
        let t = Instant::now();
        p.create(&spec(POOL, &name, i)).await?;
        let tc = t.elapsed();
        let t = Instant::now();
        p.delete(&name).await?;
        let td = t.elapsed();
        let n = f.sim.request_count();
        let polls = f
            .sim
            .requests_by_endpoint()
            .get("GET /nodes/{node}/tasks/{upid}/status")
            .copied()
            .unwrap_or(0);
        let (cs, ds) = (
            tc.saturating_sub(create_tasks),
            td.saturating_sub(delete_tasks),
        );
        rows.push(format!(
            "| {} | {n} | {polls} | {} | {} |",
            i + 1,
            ms(cs),
            ms(ds)
        ));
        create_share.push(cs);
        delete_share.push(ds);
        calls.push(n);
    }
    let breakdown = f.sim.requests_by_endpoint();
    f.sim.shutdown().await;
    println!("## Cold path, one job at a time\n");
    println!(
        "{} create+delete cycles from a fresh client (nothing learned) against the simulator at its realistic durations (linked clone {:?}, start {:?}, stop {:?}, destroy {:?}), HTTPS with a pinned fingerprint, production settings (first poll at the task's expected end: `task_expected`, then learned; after a miss every {:?}, growing x1.5 to {:?}). GRS's share = the call's time minus the simulated task time.\n",
        args.cycles,
        d.linked_clone,
        d.start,
        d.stop,
        d.destroy,
        defaults.task_poll_min,
        defaults.task_poll_max
    );
    println!("| measure | p50 | p90 | p99 | max |\n|---|---|---|---|---|");
    println!(
        "| create: GRS's share (create − {create_tasks:?} of clone + start) | {} |",
        percentiles(&mut create_share)
    );
    println!(
        "| delete: beyond the task times (delete − {delete_tasks:?} of stop + destroy) | {} |",
        percentiles(&mut delete_share)
    );
    let max_calls = calls.iter().max().copied().unwrap_or(0);
    let mean_calls = calls.iter().sum::<u64>() as f64 / calls.len().max(1) as f64;
    println!(
        "\nPVE API calls per create+delete cycle: first cycle {}, mean {mean_calls:.1}, max {max_calls} (goal: at most 15).\n",
        calls.first().copied().unwrap_or(0)
    );
    println!("| cycle | calls | of which task polls | create share | delete beyond tasks |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!("\nLast cycle by endpoint:\n\n| endpoint | calls |\n|---|---|");
    for (k, v) in &breakdown {
        println!("| `{k}` | {v} |");
    }

    // 2. Burst on one template.
    let cap = args.pool;
    let f = SimFixture::start(
        SimOptions::default(),
        &[NodeSpec::new("pve1", 8 + 2 * cap as u64, Some(cap as u32))],
    )
    .await;
    let p = production_provisioner(&f, &f.pool);
    let bound = f.sim.lower_bound_for_creates(cap);
    let hold = f.sim.storage_lock_hold();
    let one = burst(&f, &p, args.burst, cap, bound).await?;
    let peak_one = f.sim.peak_vms_per_node();
    f.sim.shutdown().await;

    // 3. The same over three nodes, each with a copy of the template.
    let per = cap.div_ceil(3);
    let maxes = [per, per, cap - 2 * per];
    let names = ["pve1", "pve2", "pve3"];
    let nodes: Vec<NodeSpec> = names
        .iter()
        .zip(maxes)
        .map(|(n, m)| NodeSpec::new(n, 8 + 2 * m as u64, Some(m as u32)))
        .collect();
    let f = SimFixture::start(SimOptions::default(), &nodes).await;
    f.sim.add_template("pve2", 9001, "runner-template");
    f.sim.add_template("pve3", 9002, "runner-template");
    let mut pool = f.pool.clone();
    pool.template_replicas = [("pve2".to_owned(), 9001), ("pve3".to_owned(), 9002)].into();
    let p = production_provisioner(&f, &pool);
    p.validate().await?;
    let bound3 = f.sim.lower_bound_for_creates_in(&maxes);
    let three = burst(&f, &p, args.burst, cap, bound3).await?;
    let peak_three = f.sim.peak_vms_per_node();
    f.sim.shutdown().await;

    println!(
        "\n## Burst: {} jobs on a pool of {cap}\n\nWorked as the control plane does by default (one dispatcher per unit of the pool's capacity, `dispatchers_per_pool = 0`): {cap} creates at once, the other jobs waiting for room; timed until {cap} VMs run. The simulator serializes clones on their storage's lock for {hold:?} of each {:?} linked clone (pve-storage `cluster_lock_storage`); its lower bound is {cap} x {hold:?} + the rest of the last clone + its start.\n",
        args.burst, d.linked_clone
    );
    println!(
        "| set-up | first {cap} running | lower bound | ratio | API calls | clone tasks | clone concurrency learned | 10/25/50/75 % running at |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (what, b) in [
        ("one template, one node (local storage)", &one),
        (
            "three nodes, a template copy on each (`template_replicas`)",
            &three,
        ),
    ] {
        println!(
            "| {what} | {:.2?} | {:.2?} | {:.2}x | {} ({:.1} per VM) | {} | {} | {} |",
            b.wall,
            b.bound,
            b.wall.as_secs_f64() / b.bound.as_secs_f64(),
            b.requests,
            b.requests as f64 / cap as f64,
            b.clone_tasks,
            b.limit,
            b.ramp
                .iter()
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    println!(
        "\nTemplate replicas: the first {cap} run {:.2}x sooner ({:.2?} against {:.2?}). Peak VMs per node: {peak_one:?}; with replicas {peak_three:?} (maximums {maxes:?}).",
        one.wall.as_secs_f64() / three.wall.as_secs_f64(),
        three.wall,
        one.wall
    );
    let over = names
        .iter()
        .enumerate()
        .any(|(i, n)| peak_three.get(*n).copied().unwrap_or(0) > maxes[i])
        || peak_one.get("pve1").copied().unwrap_or(0) > cap;
    anyhow::ensure!(!over, "a node went above its maximum");
    Ok(())
}
