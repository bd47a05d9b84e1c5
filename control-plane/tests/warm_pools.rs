//! Warm pools and the busy check before a teardown, through a running
//! control plane (gRPC, workers, the fake provisioner; the memory store, and
//! a real Redis shared by two replicas).

use std::sync::Arc;
use std::time::Duration;

use grs_control_plane::config::Config;
use grs_control_plane::model::InstanceState;
use grs_control_plane::store::{MemoryStore, Store};
use grs_control_plane::testing::{
    FakeRegistrar, RunningControlPlane, control_plane, eventually, fake_pools, job_event,
    redis_store, redis_store_at, redis_url, submit, test_config,
};
use grs_proto::v1 as pb;
use grs_provisioner::FakeProvisioner;

const WAIT: Duration = Duration::from_secs(10);

fn config(min_idle: u32, max_instances: u32) -> Config {
    let mut config = test_config();
    let linux = config.pools.get_mut("linux").unwrap();
    linux.min_idle = min_idle;
    linux.max_instances = max_instances;
    config
}

async fn warm(store: &dyn Store) -> Vec<String> {
    store.pool_warm("linux").await.unwrap()
}

/// Waits until pool `linux` holds `n` idle warm instances, all running.
async fn warm_running(store: &dyn Store, n: usize) -> Vec<String> {
    eventually(&format!("{n} warm instances running"), WAIT, || async {
        let names = warm(store).await;
        let mut running = 0;
        for name in &names {
            if store.get_instance(name).await.ok()??.state == InstanceState::Running {
                running += 1;
            }
        }
        (names.len() == n && running == n).then_some(names)
    })
    .await
}

fn started(delivery: &str, job: u64, runner: &str) -> pb::JobEvent {
    let mut e = job_event(delivery, pb::JobAction::InProgress, job);
    e.runner_name = runner.to_owned();
    e.runner_id = 7;
    e
}

fn completed(delivery: &str, job: u64, runner: &str, conclusion: &str) -> pb::JobEvent {
    let mut e = job_event(delivery, pb::JobAction::Completed, job);
    e.runner_name = runner.to_owned();
    e.conclusion = conclusion.to_owned();
    e
}

#[tokio::test]
async fn a_warm_pool_is_kept_full_and_a_job_takes_a_warm_runner_instead_of_a_clone() {
    let fake = Arc::new(FakeProvisioner::new());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = config(2, 4);
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, store.clone(), pools)).await;
    let mut client = cp.client().await;

    let before = warm_running(&*store, 2).await;
    assert_eq!(fake.creates(), 2);
    let pool = client
        .get_pool(pb::GetPoolRequest {
            name: "linux".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((pool.min_idle, pool.instances_warm), (2, 2));

    // A job: bound to a warm instance, no clone made for it.
    submit(&mut client, job_event("q-1", pb::JobAction::Queued, 1)).await;
    let job =
        grs_control_plane::testing::wait_for_job(&client, 1, pb::JobState::Provisioned, WAIT).await;
    assert!(
        before.contains(&job.instance_name),
        "{} not one of {before:?}",
        job.instance_name
    );
    assert!(
        !fake.exists("grs-1"),
        "a clone was made for a job a warm runner serves"
    );
    // The warm pool is refilled.
    let after = warm_running(&*store, 2).await;
    assert!(!after.contains(&job.instance_name));
    assert_eq!(fake.creates(), 3);
    let runner = job.instance_name.clone();
    let inst = store.get_instance(&runner).await.unwrap().unwrap();
    assert_eq!((inst.job_id, inst.warm), (1, true));

    // GitHub starts it there; it completes; the runner's VM goes.
    submit(&mut client, started("p-1", 1, &runner)).await;
    submit(&mut client, completed("c-1", 1, &runner, "success")).await;
    eventually("the warm runner's VM deleted", WAIT, || async {
        (!fake.exists(&runner)).then_some(())
    })
    .await;
    assert_eq!(warm(&*store).await.len(), 2);
    assert!(fake.live() <= 4, "above the pool's maximum");
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn update_pool_changes_the_warm_pool_live() {
    let fake = Arc::new(FakeProvisioner::new());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut config = config(0, 3);
    config.control_plane.reconcile_interval = Duration::from_millis(50);
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, store.clone(), pools)).await;
    let mut client = cp.client().await;
    let update = |min_idle| pb::UpdatePoolRequest {
        name: "linux".into(),
        min_idle: Some(min_idle),
        ..Default::default()
    };
    client.update_pool(update(3)).await.unwrap();
    warm_running(&*store, 3).await;
    // Never above max_instances: refused.
    let e = client.update_pool(update(4)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Lowered: the reconciler tears the surplus down.
    client.update_pool(update(1)).await.unwrap();
    warm_running(&*store, 1).await;
    eventually("the surplus VMs deleted", WAIT, || async {
        (fake.live() == 1).then_some(())
    })
    .await;
    assert!(fake.peak_live() <= 3);
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_replicas_on_one_redis_keep_one_warm_pool_between_them() {
    // Under CI a missing Redis fails the test (testing::redis_store).
    let Some(probe) = redis_store("warm-replicas").await else {
        return;
    };
    let prefix = probe.prefix().to_owned();
    let fake = Arc::new(FakeProvisioner::new());
    let config = || {
        let mut c = config(3, 4);
        c.control_plane.store = grs_control_plane::config::StoreKind::Redis;
        c
    };
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store: Arc<dyn Store> = Arc::new(redis_store_at(&redis_url(), &prefix));
        let c = config();
        let pools = fake_pools(&c, &fake);
        replicas.push(RunningControlPlane::start(control_plane(c, store, pools)).await);
    }
    let store: Arc<dyn Store> = Arc::new(probe);
    warm_running(&*store, 3).await;
    // Jobs take warm runners on whichever replica dispatches them; each
    // replica's keeper refills, together never beyond min_idle nor the
    // pool's maximum.
    let mut client = replicas[0].client().await;
    for job in 1..=2u64 {
        submit(
            &mut client,
            job_event(&format!("q-{job}"), pb::JobAction::Queued, job),
        )
        .await;
        grs_control_plane::testing::wait_for_job(&client, job, pb::JobState::Provisioned, WAIT)
            .await;
    }
    // Two bound, at most two more slots: the warm pool refills to what
    // the maximum leaves. Waits for the refill's VM to run, not only for
    // its slot: a warm instance counts in the warm set and the pool's use
    // from `begin_warm` on, before its create reaches the provisioner, so
    // counts alone let the check below run while the fourth VM does not
    // exist yet (every failing run seen had `peak_live` 3, none 5).
    warm_running(&*store, 2).await;
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 4);
    assert!(
        fake.peak_live() <= 4,
        "two replicas overshot the pool: {} VMs at once",
        fake.peak_live()
    );
    assert_eq!(
        fake.live(),
        4,
        "the warm pool was not refilled to the maximum"
    );
    assert_eq!(fake.creates(), 4);
    for r in replicas {
        r.shutdown().await.unwrap();
    }
    grs_control_plane::testing::redis_store_at(&redis_url(), &prefix)
        .flush_prefix()
        .await
        .unwrap();
}

#[tokio::test]
async fn no_runner_is_torn_down_while_github_says_it_is_busy() {
    let fake = Arc::new(FakeProvisioner::new());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let github = Arc::new(FakeRegistrar::default());
    let config = config(0, 4);
    let pools = fake_pools(&config, &fake);
    let mut cp = control_plane(config, store.clone(), pools);
    cp.registrar = Some(github.clone());
    let cp = RunningControlPlane::start(cp).await;
    let mut client = cp.client().await;
    for job in [1, 2, 3] {
        submit(
            &mut client,
            job_event(&format!("q-{job}"), pb::JobAction::Queued, job),
        )
        .await;
        grs_control_plane::testing::wait_for_job(&client, job, pb::JobState::Provisioned, WAIT)
            .await;
    }
    // grs-1's runner took another job whose in_progress has not come yet;
    // GitHub cannot be asked about grs-2 for a while.
    github.set_busy("grs-1", true);
    github.fail_busy("grs-2", "GitHub answered 502");
    for job in [1, 2, 3] {
        submit(
            &mut client,
            completed(&format!("c-{job}"), job, "", "cancelled"),
        )
        .await;
    }
    // grs-3: idle, gone.
    eventually("grs-3 deleted", WAIT, || async {
        (!fake.exists("grs-3")).then_some(())
    })
    .await;
    // grs-1: busy, kept, and the record says why.
    let kept = eventually("grs-1's teardown called off", WAIT, || async {
        let i = store.get_instance("grs-1").await.ok()??;
        (i.state == InstanceState::Running).then_some(i)
    })
    .await;
    assert!(kept.reason.contains("busy"), "{}", kept.reason);
    assert!(fake.exists("grs-1"));
    // grs-2: waits while GitHub cannot answer, then goes.
    eventually("grs-2's wait recorded", WAIT, || async {
        let i = store.get_instance("grs-2").await.ok()??;
        i.reason.contains("cannot ask GitHub").then_some(())
    })
    .await;
    assert!(fake.exists("grs-2"));
    github.clear_busy("grs-2");
    eventually("grs-2 deleted", WAIT, || async {
        (!fake.exists("grs-2")).then_some(())
    })
    .await;
    // grs-1's job completes there: that teardown asks nothing.
    let asked = github.asked().len();
    submit(&mut client, started("p-9", 9, "grs-1")).await;
    submit(&mut client, completed("c-9", 9, "grs-1", "success")).await;
    eventually("grs-1 deleted", WAIT, || async {
        (!fake.exists("grs-1")).then_some(())
    })
    .await;
    assert_eq!(github.asked().len(), asked);
    cp.shutdown().await.unwrap();
}

/// A create that failed may still have left a VM whose runner (registered
/// when the create began) took a job: its clean-up asks GitHub first, like
/// every teardown that is not its job's completion. It was skipped for an
/// instance with no VM recorded (seen failing: grs-4 was deleted).
#[tokio::test]
async fn a_failed_creates_cleanup_asks_github_whether_its_runner_is_busy() {
    let fake = Arc::new(FakeProvisioner::new());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let github = Arc::new(FakeRegistrar::default());
    let mut config = config(0, 4);
    // One attempt: the first failure ends the job and queues the clean-up.
    config.control_plane.max_attempts = 1;
    let pools = fake_pools(&config, &fake);
    let mut cp = control_plane(config, store.clone(), pools);
    cp.registrar = Some(github.clone());
    let cp = RunningControlPlane::start(cp).await;
    let mut client = cp.client().await;
    github.set_busy("grs-4", true);
    fake.fail_next_creates(1, grs_provisioner::fake::InjectedFailure::Transient);
    submit(&mut client, job_event("q-4", pb::JobAction::Queued, 4)).await;
    grs_control_plane::testing::wait_for_job(&client, 4, pb::JobState::Failed, WAIT).await;
    let kept = eventually("grs-4's clean-up called off", WAIT, || async {
        let i = store.get_instance("grs-4").await.ok()??;
        (i.state == InstanceState::Running).then_some(i)
    })
    .await;
    assert!(kept.reason.contains("busy"), "{}", kept.reason);
    assert!(github.asked().contains(&"grs-4".to_owned()));
    cp.shutdown().await.unwrap();
}
