//! Per-node maximums across replicas: two control planes on one Redis,
//! each with its own Proxmox backend (as two processes have), against one
//! PVE simulator whose node takes at most two VMs of this installation.
//! Each backend's placement only knows its own creates in flight; the node
//! places in the store make the two agree.

use std::sync::Arc;
use std::time::Duration;

use grs_control_plane::config::{Config, ProvisionerConfig, StoreKind};
use grs_control_plane::model::{InstanceState, JobState};
use grs_control_plane::pools::{Pools, ProvisionerRegistry};
use grs_control_plane::store::Store;
use grs_control_plane::testing::{
    RunningControlPlane, control_plane, eventually, job_event, redis_store, redis_store_at,
    redis_url, submit, test_config,
};
use grs_proto::v1::JobAction;
use grs_provisioner::Provisioner;
use grs_provisioner_proxmox::ProxmoxBackend;
use grs_provisioner_proxmox::sim::{SimOptions, TaskDurations};
use grs_provisioner_proxmox::testing::{NodeSpec, SimFixture};

const NODE_MAX: usize = 2;
const JOBS: u64 = 6;

fn config(fx: &SimFixture) -> Config {
    let mut config = test_config();
    config.control_plane.store = StoreKind::Redis;
    config.control_plane.installation_id = "grs-places".into();
    let linux = config.pools.get_mut("linux").unwrap();
    linux.max_instances = 10;
    linux.provisioner = Some(ProvisionerConfig::with_settings("proxmox", &fx.pool).unwrap());
    config.validate().unwrap();
    config
}

/// A replica: its own backend for the `[proxmox]` connection.
async fn replica(fx: &SimFixture, config: Config, prefix: &str) -> RunningControlPlane {
    let (conn, installation, instance_prefix) = (
        fx.conn.clone(),
        config.control_plane.installation_id.clone(),
        config.control_plane.instance_prefix.clone(),
    );
    let registry = ProvisionerRegistry::new().with(
        "proxmox",
        Arc::new(move || {
            let b = ProxmoxBackend::new(&conn, &installation, &instance_prefix)
                .map_err(|e| grs_config::ConfigError::key("proxmox", e.to_string()))?;
            Ok(Arc::new(b) as Arc<dyn Provisioner>)
        }),
    );
    let pools = Pools::from_config(&config, &registry).unwrap();
    let store: Arc<dyn Store> = Arc::new(redis_store_at(&redis_url(), prefix));
    RunningControlPlane::start(control_plane(config, store, pools)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_exceed_a_nodes_maximum_together() {
    // Under CI a missing Redis fails the test (testing::redis_store).
    let Some(store) = redis_store("node-places").await else {
        return;
    };
    let prefix = store.prefix().to_owned();
    // Clones slow enough that both replicas place while the other's
    // clones are still in flight.
    let opts = SimOptions {
        tls: true,
        durations: TaskDurations {
            linked_clone: Duration::from_millis(300),
            ..TaskDurations::fast()
        },
        ..SimOptions::default()
    };
    let fx = SimFixture::start(opts, &[NodeSpec::new("pve1", 64, Some(NODE_MAX as u32))]).await;
    let a = replica(&fx, config(&fx), &prefix).await;
    let b = replica(&fx, config(&fx), &prefix).await;
    let mut client = a.client().await;
    for job in 1..=JOBS {
        submit(
            &mut client,
            job_event(&format!("q-{job}"), JobAction::Queued, job),
        )
        .await;
    }
    // Every job tried at least twice: the placement races are behind us.
    let running = eventually("every job tried twice", Duration::from_secs(30), || async {
        let mut running = Vec::new();
        for job in 1..=JOBS {
            let j = store.get_job(job).await.ok()??;
            if j.state == JobState::Provisioned {
                running.push(j.instance_name);
            } else if j.attempts < 2 {
                return None;
            }
        }
        (running.len() >= NODE_MAX).then_some(running)
    })
    .await;
    let peak = fx.sim.peak_vms_per_node();
    assert_eq!(
        running.len(),
        NODE_MAX,
        "{running:?} on a node of {NODE_MAX} ({peak:?})"
    );
    assert!(
        peak.get("pve1").copied().unwrap_or(0) <= NODE_MAX,
        "node pve1 held {peak:?} VMs, maximum {NODE_MAX}"
    );
    let mut places = store.node_places("pve1").await.unwrap();
    places.sort();
    let mut want = running.clone();
    want.sort();
    assert_eq!(places, want);
    // Their jobs complete: the places go with the VMs, two more are made.
    for (i, name) in running.iter().enumerate() {
        let job = name.trim_start_matches("grs-").parse::<u64>().unwrap();
        let mut done = job_event(&format!("c-{i}"), JobAction::Completed, job);
        done.runner_name = name.clone();
        submit(&mut client, done).await;
    }
    eventually(
        "two more instances running",
        Duration::from_secs(30),
        || async {
            let mut n = 0;
            for inst in store.list_instances(Some("linux"), false).await.ok()? {
                if inst.state == InstanceState::Running && !running.contains(&inst.name) {
                    n += 1;
                }
            }
            (n == NODE_MAX).then_some(())
        },
    )
    .await;
    let peak = fx.sim.peak_vms_per_node();
    assert!(
        peak.get("pve1").copied().unwrap_or(0) <= NODE_MAX,
        "{peak:?}"
    );
    assert_eq!(store.node_places("pve1").await.unwrap().len(), NODE_MAX);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    store.flush_prefix().await.unwrap();
}
