//! Reconciler leader election on a real Redis: replicas sharing one store
//! take turns, never reconcile together, and hand over on shutdown or crash.
//!
//! Each replica gets a fake hypervisor of its own holding one orphan VM (of
//! this installation, unknown to the store, long past its grace period).
//! A replica's orphan disappears exactly when that replica reconciles, which
//! makes leadership visible from outside.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use grs_control_plane::reconciler::{self, LEASE, Reconciler, ReconcilerSettings};
use grs_control_plane::store::Store;
use grs_control_plane::testing::{
    eventually, fake_pools, redis_store, redis_store_at, redis_url, test_config,
};
use grs_provisioner::{Bootstrap, FakeProvisioner, InstanceSpec, Provisioner};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_millis(50);

struct Replica {
    fake: Arc<FakeProvisioner>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A replica named `holder` on `store`, whose hypervisor holds the orphan
/// `orphan`.
async fn replica(store: Arc<dyn Store>, holder: &str, orphan: &str) -> Replica {
    let fake = Arc::new(FakeProvisioner::new());
    fake.create(&InstanceSpec {
        name: orphan.to_owned(),
        pool: "linux".into(),
        job_id: 1,
        labels: vec!["self-hosted".into()],
        bootstrap: Bootstrap::None,
    })
    .await
    .unwrap();
    fake.set_created_at(orphan, Some(SystemTime::now() - Duration::from_secs(3600)));
    let settings = ReconcilerSettings {
        interval: INTERVAL,
        bootstrap_timeout: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(600),
        orphan_grace: Duration::from_secs(1),
        instance_prefix: "grs".into(),
    };
    let r = Reconciler::new(store, fake_pools(&test_config(), &fake), settings);
    let stop = CancellationToken::new();
    let task = tokio::spawn(reconciler::run(r, holder.to_owned(), stop.clone()));
    Replica { fake, stop, task }
}

async fn wait_gone(fake: &FakeProvisioner, name: &str) {
    eventually(
        &format!("{name} deleted by its replica"),
        Duration::from_secs(3),
        || async { (!fake.exists(name)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_reconciles_at_a_time_and_another_takes_over_when_it_stops() {
    let Some(first) = redis_store("reconciler_leader").await else {
        return;
    };
    let prefix = first.prefix().to_owned();
    let store = |s| Arc::new(s) as Arc<dyn Store>;
    let a = replica(store(redis_store_at(&redis_url(), &prefix)), "a", "grs-101").await;
    wait_gone(&a.fake, "grs-101").await;

    // B starts while A leads: for many intervals B does nothing, and nobody
    // else can take the lease.
    let b = replica(store(redis_store_at(&redis_url(), &prefix)), "b", "grs-102").await;
    tokio::time::sleep(INTERVAL * 10).await;
    assert!(b.fake.exists("grs-102"), "B reconciled while A led");
    let probe = store(redis_store_at(&redis_url(), &prefix));
    assert!(
        !probe
            .acquire_lease(LEASE, "probe", Duration::from_secs(1))
            .await
            .unwrap()
    );

    // A shuts down (releasing the lease): B takes over.
    a.stop.cancel();
    a.task.await.unwrap();
    wait_gone(&b.fake, "grs-102").await;

    // B crashes (no release): its lease outlives it, then C takes over.
    b.task.abort();
    let _ = b.task.await;
    assert!(
        !probe
            .acquire_lease(LEASE, "probe", Duration::from_secs(1))
            .await
            .unwrap(),
        "a crashed leader's lease lasts until it expires"
    );
    let c = replica(store(redis_store_at(&redis_url(), &prefix)), "c", "grs-103").await;
    wait_gone(&c.fake, "grs-103").await;
    c.stop.cancel();
    c.task.await.unwrap();
    first.flush_prefix().await.unwrap();
}
