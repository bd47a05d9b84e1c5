//! The job lifecycle under faults, end to end: the real binaries as
//! separate processes (a private Redis with AOF, `grs-pve-sim`,
//! `grs-github-sim`, `grs-control-plane`, `grs-webhook-gateway`), signed
//! webhooks, simulated VMs booting from the cloud-init documents GRS
//! serves. Every scenario ends with the invariants
//! ([`World::check_invariants`]): every job GitHub queued ran exactly once
//! (or was cancelled before any runner took it), no VM or runner
//! registration left, the foreign VM untouched, no secret in any log, and
//! every GRS process stops cleanly on SIGTERM.

use std::time::Duration;

use grs_e2e::world::{LABELS, World, WorldOptions};
use grs_proto::v1 as pb;
use serde_json::json;

/// The scenarios run one at a time: each runs six processes, and the
/// machine has few cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SETTLE: Duration = Duration::from_secs(45);

async fn world(opts: WorldOptions) -> Option<World> {
    World::start(opts).await.expect("the world starts")
}

/// Checks the invariants and stops every process with SIGTERM; on a
/// failure, keeps the logs and names them.
async fn finish(mut w: World) -> grs_e2e::world::InvariantReport {
    let checked = w.check_invariants(SETTLE).await;
    let report = match checked {
        Ok(r) => r,
        Err(e) => {
            let dir = w.keep_logs();
            panic!("{e:#}\n(logs kept in {})", dir.display());
        }
    };
    if let Err(e) = w.shutdown() {
        panic!("{e:#}");
    }
    eprintln!("{report}");
    report
}

async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    grs_control_plane::testing::eventually(what, Duration::from_secs(30), check).await
}

/// Waits until the VM named `name` runs; returns its vmid.
async fn vm_running(w: &World, name: &str) -> u32 {
    until(&format!("{name} running"), || async {
        w.grs_vms()
            .await
            .ok()?
            .into_iter()
            .find(|v| v.name == name && v.running)
            .map(|v| v.vmid)
    })
    .await
}

async fn grs_state(w: &World, job: u64) -> Option<pb::JobState> {
    w.grs_job(job).await.ok().map(|j| j.state())
}

/// Queues jobs A and B so that each runs on the VM made for the other:
/// A's VM is held back, B's boots first, and GitHub gives its runner the
/// oldest queued job, A; once A is done, A's VM boots and its runner takes
/// B. Returns (A, B) with A completed on GitHub and B taken or queued.
async fn on_each_others_runners(w: &World) -> (u64, u64) {
    w.fleet.pause();
    let a = w.github.queue(LABELS, None).await.unwrap();
    vm_running(w, &w.instance_name(a)).await;
    w.fleet.hold(&w.instance_name(a));
    let b = w.github.queue(LABELS, None).await.unwrap();
    vm_running(w, &w.instance_name(b)).await;
    w.fleet.resume();
    until("A done on B's runner", || async {
        let j = w.github.job(a).await.ok()??;
        (j.status == "completed").then_some(j)
    })
    .await;
    w.fleet.release(&w.instance_name(a));
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_before_pickup_has_its_vm_and_registration_removed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "cancelled".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    // The VM is made but does not boot: the job waits on GitHub.
    w.fleet.pause();
    let job = w.github.queue(LABELS, None).await.unwrap();
    let name = w.instance_name(job);
    vm_running(&w, &name).await;
    w.github.cancel(job).await.unwrap();
    until("the cancelled job's VM destroyed", || async {
        let vms = w.grs_vms().await.ok()?;
        vms.iter().all(|v| v.name != name).then_some(())
    })
    .await;
    assert_eq!(grs_state(&w, job).await, Some(pb::JobState::Completed));
    w.fleet.resume();
    let report = finish(w).await;
    assert_eq!((report.jobs, report.cancelled), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_by_another_jobs_runner_and_that_job_both_run_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "stolen".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    let (a, b) = on_each_others_runners(&w).await;
    let jobs = w.wait_all_completed(SETTLE).await.unwrap();
    let runner = |id| {
        jobs.iter()
            .find(|j| j.id == id)
            .and_then(|j| j.runner_name.clone())
    };
    assert_eq!(runner(a), Some(w.instance_name(b)));
    assert_eq!(runner(b), Some(w.instance_name(a)));
    let report = finish(w).await;
    assert_eq!((report.ran_once, report.on_another_jobs_vm), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_completed_before_its_queued_delivery_arrives_gets_no_vm_left() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "completed-first".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    // `queued` is held in transit; the job is cancelled; `completed`
    // arrives first, then `queued`.
    w.github.hold_next("queued").await.unwrap();
    let job = w.github.queue(LABELS, None).await.unwrap();
    w.github.cancel(job).await.unwrap();
    until("GRS records the completion", || async {
        (grs_state(&w, job).await? == pb::JobState::Completed).then_some(())
    })
    .await;
    w.github.release().await.unwrap();
    // The late `queued` changes nothing: still completed, no VM made.
    until("the late queued delivery answered", || async {
        let s = w.github.relay_stats().await.ok()?;
        (s.forwarded >= 2).then_some(())
    })
    .await;
    assert_eq!(grs_state(&w, job).await, Some(pb::JobState::Completed));
    let stats = w.pve.stats().await.unwrap();
    assert_eq!(stats["clone_tasks"], 0, "no VM made for a completed job");
    let report = finish(w).await;
    assert_eq!(report.cancelled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_deliveries_run_every_job_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "disorder".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    w.github
        .set_faults(&grs_e2e::github::DeliveryFaults {
            duplicate: 1.0,
            reorder: 0.5,
            reorder_max_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..8 {
        w.github.queue(LABELS, None).await.unwrap();
    }
    w.wait_all_completed(SETTLE).await.unwrap();
    let relay = w.github.relay_stats().await.unwrap();
    assert_eq!(
        relay.duplicated, relay.received,
        "every delivery sent twice"
    );
    assert!(relay.reordered > 0);
    let stats = w.pve.stats().await.unwrap();
    assert_eq!(stats["clone_tasks"], 8, "one VM per job");
    let report = finish(w).await;
    assert_eq!(report.ran_once, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pve_outage_is_outlasted() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "pve-outage".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    // Every PVE API call fails as a proxy in front of a dead cluster
    // answers (595 is what pveproxy answers when it cannot reach a node).
    w.pve
        .inject(json!({"fault": "http_error", "path_contains": "/",
            "status": 503, "message": "Service Unavailable", "times": 1_000_000}))
        .await
        .unwrap();
    let jobs = [
        w.github.queue(LABELS, None).await.unwrap(),
        w.github.queue(LABELS, None).await.unwrap(),
    ];
    // The outage lasts until each job's create has failed several times
    // (each attempt itself retried by the PVE client).
    for &j in &jobs {
        until("create attempts failing", || async {
            let job = w.grs_job(j).await.ok()?;
            (job.attempts >= 3).then_some(())
        })
        .await;
    }
    for &j in &jobs {
        assert_ne!(grs_state(&w, j).await, Some(pb::JobState::Failed));
    }
    w.pve.clear_faults().await.unwrap();
    let report = finish(w).await;
    assert_eq!(report.ran_once, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_provision_is_restarted_and_makes_one_vm() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut w) = world(WorldOptions {
        name: "killed-mid-provision".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    // Slow clones: the control plane dies while one is under way.
    w.pve
        .inject(json!({"fault": "slow_tasks", "extra_ms": 1500}))
        .await
        .unwrap();
    let job = w.github.queue(LABELS, None).await.unwrap();
    let name = w.instance_name(job);
    until("the clone under way", || async {
        let vms = w.grs_vms().await.ok()?;
        vms.iter()
            .any(|v| v.name == name && v.lock.as_deref() == Some("clone"))
            .then_some(())
    })
    .await;
    w.kill_control_plane(0);
    w.pve.clear_faults().await.unwrap();
    w.restart_control_plane(0).await.unwrap();
    let stats = w.pve.stats().await.unwrap();
    let report = finish(w).await;
    assert_eq!(report.ran_once, 1);
    assert_eq!(stats["clone_tasks"], 1, "the redo found the VM, made none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_one_killed_serve_every_job() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut w) = world(WorldOptions {
        name: "replicas".into(),
        replicas: 2,
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    w.pve
        .inject(json!({"fault": "slow_tasks", "extra_ms": 300}))
        .await
        .unwrap();
    for _ in 0..6 {
        w.github.queue(LABELS, None).await.unwrap();
    }
    until("clones under way", || async {
        let vms = w.grs_vms().await.ok()?;
        (vms.len() >= 2).then_some(())
    })
    .await;
    // Replica 1 dies for good; its gateway answers 503 and GitHub's
    // deliveries fail over to gateway 0; its claimed work is redone by
    // replica 0 after claim_timeout.
    w.kill_control_plane(1);
    for _ in 0..4 {
        w.github.queue(LABELS, None).await.unwrap();
    }
    w.pve.clear_faults().await.unwrap();
    let report = finish(w).await;
    assert_eq!(report.ran_once, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_flow_loses_no_job() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut w) = world(WorldOptions {
        name: "redis-restart".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    w.github
        .set_faults(&grs_e2e::github::DeliveryFaults {
            // What GitHub offers for deliveries that failed while Redis was
            // away: "Redeliver" (here: automatic).
            redeliver_failed: true,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..6 {
        w.github.queue(LABELS, None).await.unwrap();
    }
    until("VMs made", || async {
        let vms = w.grs_vms().await.ok()?;
        (vms.len() >= 2).then_some(())
    })
    .await;
    w.restart_redis(Duration::from_millis(700)).await.unwrap();
    for _ in 0..4 {
        w.github.queue(LABELS, None).await.unwrap();
    }
    let report = finish(w).await;
    assert_eq!(report.ran_once, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_runner_takes_a_job_at_once_and_the_pool_is_replenished() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "warm".into(),
        min_idle: 2,
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    let idle_warm = || async {
        let runners = w.github.runners().await.ok()?;
        let idle = runners
            .iter()
            .filter(|r| r.online && !r.busy && r.name.starts_with("grs-w"))
            .count();
        Some(idle)
    };
    until("two warm runners idle", || async {
        (idle_warm().await? == 2).then_some(())
    })
    .await;
    let clones_before = w.pve.stats().await.unwrap()["clone_tasks"].as_u64();
    // The warm runner takes the job: no VM is made for it first.
    let job = w.github.queue(LABELS, None).await.unwrap();
    let taken = until("the job taken", || async {
        let j = w.github.job(job).await.ok()??;
        j.runner_name.clone()
    })
    .await;
    assert!(taken.starts_with("grs-w"), "taken by {taken}");
    assert_eq!(
        w.pve.stats().await.unwrap()["clone_tasks"].as_u64(),
        clones_before,
        "no clone before the pickup"
    );
    assert!(
        w.grs_vms()
            .await
            .unwrap()
            .iter()
            .all(|v| v.name != w.instance_name(job)),
        "no VM made for the job"
    );
    w.wait_all_completed(SETTLE).await.unwrap();
    // Replenished: two idle warm runners again.
    until("the pool replenished", || async {
        (idle_warm().await? == 2).then_some(())
    })
    .await;
    // Scaled down to zero live: every warm VM and registration goes.
    w.client(0)
        .await
        .unwrap()
        .update_pool(pb::UpdatePoolRequest {
            name: "linux".into(),
            min_idle: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    let report = finish(w).await;
    assert_eq!(report.ran_once, 1);
    eprintln!("warm pickup: queued -> started {} ms", report.pickup_ms[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_queued_webhook_is_recovered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "lost-webhook".into(),
        extra_control_plane:
            "recovery_interval = \"1s\"\nrecovery_repositories = [\"grs-sim/app\"]".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    // The `queued` delivery never reaches a gateway (GitHub records it
    // failed); GRS has to find the job on its own.
    w.github
        .set_faults(&grs_e2e::github::DeliveryFaults {
            lose: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let job = w.github.queue(LABELS, None).await.unwrap();
    assert_eq!(w.github.relay_stats().await.unwrap().lost, 1);
    w.github
        .set_faults(&grs_e2e::github::DeliveryFaults::default())
        .await
        .unwrap();
    let report = finish(w).await;
    assert_eq!(report.ran_once, 1);
    eprintln!(
        "lost queued webhook of job {job}: queued -> started {} ms",
        report.pickup_ms[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_completed_webhook_is_recovered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(w) = world(WorldOptions {
        name: "lost-completed".into(),
        extra_control_plane: "recovery_interval = \"1s\"\nrecovery_running_age = \"1s\"".into(),
        ..WorldOptions::default()
    })
    .await
    else {
        return;
    };
    // Every `completed` delivery, and every redelivery of one, is lost:
    // GRS learns that a job ended only by asking GitHub. Without that, each
    // job's runner VM stays until max_lifetime (1h here) and the
    // invariants find the VMs left.
    w.github
        .set_faults(&grs_e2e::github::DeliveryFaults {
            lose_actions: vec!["completed".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // Each on the other's runner: the recovered completion must tear down
    // the runner that ran the job, not the VM made for it.
    let (a, b) = on_each_others_runners(&w).await;
    // From the first poll that sees a job completed on GitHub to the first
    // that sees GRS record it (polled every 20 ms).
    let deadline = std::time::Instant::now() + SETTLE;
    let mut on_github = std::collections::HashMap::new();
    let mut in_grs = std::collections::HashMap::new();
    while in_grs.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "GRS did not record both completions within {SETTLE:?}"
        );
        for job in [a, b] {
            let now = std::time::Instant::now();
            if let Ok(Some(j)) = w.github.job(job).await
                && j.status == "completed"
            {
                on_github.entry(job).or_insert(now);
            }
            if grs_state(&w, job).await == Some(pb::JobState::Completed) {
                in_grs.entry(job).or_insert(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took: Vec<u128> = [a, b]
        .iter()
        .map(|j| {
            in_grs[j]
                .saturating_duration_since(on_github[j])
                .as_millis()
        })
        .collect();
    assert!(w.github.relay_stats().await.unwrap().lost >= 2);
    for job in [a, b] {
        let j = w.grs_job(job).await.unwrap();
        assert_eq!(j.conclusion, "success", "GitHub's conclusion recorded");
    }
    let report = finish(w).await;
    assert_eq!((report.ran_once, report.on_another_jobs_vm), (2, 2));
    eprintln!("lost completed webhooks recovered: GitHub completed -> GRS completed {took:?} ms");
}
