//! The control plane with a Proxmox pool, against the PVE simulator over
//! HTTPS: a queued job becomes a linked clone that boots with its cloud-init
//! seed; completion destroys it. Configured as an operator would: a
//! `[proxmox]` section and `type = "proxmox"`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use grs_control_plane::config::ProvisionerConfig;
use grs_control_plane::pools::{Pools, ProvisionerRegistry};
use grs_control_plane::store::MemoryStore;
use grs_control_plane::testing::{
    RunningControlPlane, control_plane, eventually, job_event, submit, test_config,
    wait_for_instance, wait_for_no_instances_in_use,
};
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use grs_proto::v1::{self as pb, JobAction};
use grs_provisioner_proxmox::testing::{SimFixture, TEMPLATE_VMID};
use grs_provisioner_proxmox::{BootstrapMode, ProxmoxPoolConfig};
use tonic::transport::Channel;

/// A control plane (gateway `http://gw.example:8080`) whose pool `linux`
/// is `pool` on the simulator, as an operator configures it: a `[proxmox]`
/// section and `type = "proxmox"`.
async fn start(fx: &SimFixture, pool: &ProxmoxPoolConfig) -> RunningControlPlane {
    let mut config = test_config();
    config.control_plane.installation_id = "grs-it".into();
    config.control_plane.gateway_url = Some("http://gw.example:8080".into());
    config.pools.get_mut("linux").unwrap().provisioner =
        Some(ProvisionerConfig::with_settings("proxmox", pool).unwrap());
    config.validate().unwrap();
    // As the binary registers it: one backend for the [proxmox] connection.
    let registry = ProvisionerRegistry::new().with(
        "proxmox",
        Arc::new(grs_provisioner_proxmox::factory(
            Some(fx.conn.clone()),
            config.control_plane.installation_id.clone(),
            config.control_plane.instance_prefix.clone(),
        )),
    );
    let pools = Pools::from_config(&config, &registry).unwrap();
    for p in pools.iter() {
        p.provisioner.validate_pool(&p.name).await.unwrap();
    }
    RunningControlPlane::start(control_plane(config, Arc::new(MemoryStore::new()), pools)).await
}

/// Instance `name` once it runs.
async fn running(c: &ControlPlaneClient<Channel>, name: &str) -> pb::Instance {
    wait_for_instance(c, name, pb::InstanceState::Running, Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_gets_a_proxmox_clone_that_is_destroyed_when_the_job_completes() {
    let fx = SimFixture::single_node().await;
    let cp = start(&fx, &fx.pool).await;
    let mut c = cp.client().await;
    submit(&mut c, job_event("d1", JobAction::Queued, 8_000_000_001)).await;
    let inst = running(&c, "grs-8000000001").await;
    assert_eq!(inst.location, "pve1");
    let vms = fx.sim.vms_named("grs-8000000001");
    assert_eq!(vms.len(), 1, "one VM");
    let vm = &vms[0];
    assert!(vm.running);
    assert_ne!(vm.vmid, TEMPLATE_VMID);
    // The seed URL is in the SMBIOS serial, base64-encoded; the token in it
    // redeems to this instance (checked through the store in other tests).
    let serial = vm.smbios_serial().expect("a serial in smbios1");
    let serial = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(serial)
            .unwrap(),
    )
    .unwrap();
    assert!(
        serial.starts_with("ds=nocloud-net;s=http://gw.example:8080/cloud-init/"),
        "{serial}"
    );
    assert!(
        vm.config
            .get("tags")
            .is_some_and(|t| t.contains("grs-i-grs-it")),
        "{:?}",
        vm.config.get("tags")
    );
    assert!(
        fx.sim.schema_violations().is_empty(),
        "{:?}",
        fx.sim.schema_violations()
    );

    let mut done = job_event("d2", JobAction::Completed, 8_000_000_001);
    done.runner_name = "grs-8000000001".into();
    submit(&mut c, done).await;
    eventually("the clone destroyed", Duration::from_secs(20), || {
        let sim = fx.sim.vms_named("grs-8000000001");
        async move { sim.is_empty().then_some(()) }
    })
    .await;
    assert!(
        fx.sim.vm(TEMPLATE_VMID).is_some(),
        "the template is never touched"
    );
    wait_for_no_instances_in_use(&c, Duration::from_secs(5)).await;
    cp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_backend_says_no_bootstrap_gets_no_seed_even_with_a_gateway() {
    let fx = SimFixture::single_node().await;
    let mut pool = fx.pool.clone();
    pool.bootstrap = BootstrapMode::None;
    let cp = start(&fx, &pool).await;
    let mut c = cp.client().await;
    submit(&mut c, job_event("n1", JobAction::Queued, 8_000_000_002)).await;
    running(&c, "grs-8000000002").await;
    let vm = fx.sim.vms_named("grs-8000000002").remove(0);
    assert_eq!(vm.smbios_serial(), None, "no cloud-init seed");
    cp.shutdown().await.unwrap();
}
