//! The latency benchmark (`grs-latency`) in its CI-sized smoke mode: the
//! whole system in one process on the simulators' fast durations, a few
//! jobs per phase. Timings on a shared CI machine mean nothing, so only
//! what must hold at any speed is asserted: every job started (on the
//! runner it should), every burst's VMs ran with no clone failing, the
//! create+delete cycles stay within their PVE call budget (with the slack a
//! loaded machine needs, below).

use grs_e2e::latency::{LatencyOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latency_benchmark_runs_every_phase_within_the_call_budget() {
    let o = LatencyOptions::smoke();
    let report = run(&o).await.expect("the benchmark runs");
    println!("{}", report.markdown());

    assert_eq!(report.cold.len(), o.cold_jobs, "every cold job measured");
    assert_eq!(report.warm.len(), o.warm_jobs, "every warm job measured");
    assert!(
        report.warm.iter().all(|w| w.on_warm_runner),
        "every warm job was taken by a warm runner"
    );
    assert!(
        report.boot_failures.is_empty(),
        "{:?}",
        report.boot_failures
    );
    // The call budget: a cycle is 9 calls plus a status poll per task when
    // the estimates hold. On a loaded machine a simulated task ends late
    // (one poll more): CI saw 16 in a first cycle, twice, while two CI runs
    // shared the machine (then with reconciler passes counted too; the
    // cold phase keeps them out now). So each cycle within 17, the median
    // within 15; `grs-latency` in release on a calm machine is the measure
    // of the target itself.
    let mut calls: Vec<u64> = report.cold.iter().map(|c| c.pve_calls).collect();
    calls.sort_unstable();
    assert!(
        calls[calls.len() / 2] <= 15,
        "median create+delete cycle over 15 PVE calls: {calls:?}"
    );
    for c in &report.cold {
        assert!(
            c.pve_calls <= 17,
            "job {}: {} PVE calls in one create+delete cycle: {:?}",
            c.job_id,
            c.pve_calls,
            c.pve_calls_by_endpoint
        );
        assert!(
            c.queued_to_vm_running < c.queued_to_started,
            "job {}: started before its VM ran",
            c.job_id
        );
        assert!(!c.create_tasks.is_zero() && !c.delete_tasks.is_zero());
    }
    let (burst, burst_all) = (
        report.burst.as_ref().expect("the first burst ran"),
        report.burst_all.as_ref().expect("the second burst ran"),
    );
    for b in [burst, burst_all] {
        assert_eq!(b.failed_clones, 0, "{b:?}");
        assert!(b.clones >= b.capacity, "{b:?}");
        assert!(b.first_wave >= b.first_wave_bound, "{b:?}");
    }
    assert!(
        burst_all.clones >= burst_all.jobs,
        "every job of the second burst got its own VM: {burst_all:?}"
    );
    // Template replicas: the first wave is cloned on every node, each from
    // its own copy.
    let replicas = report
        .burst_replicas
        .as_ref()
        .expect("the template-replica burst ran");
    assert_eq!(replicas.failed_clones, 0, "{replicas:?}");
    assert_eq!(
        replicas.first_wave_per_node.len(),
        o.replica_nodes as usize,
        "the first wave ran on every node: {replicas:?}"
    );
    assert!(
        replicas.first_wave_per_node.values().all(|n| *n > 0),
        "{replicas:?}"
    );
}
