//! A Proxmox pool with `bootstrap = "guest-agent"`, end to end through the
//! control plane, against the PVE simulator's agent endpoints: the job's VM
//! is cloned and started, and once its agent answers the runner config
//! minted for it is written (`agent/file-write`) and the runner started
//! (`agent/exec`); completion destroys the VM. A VM whose runner may have
//! started when its create failed stays while GitHub says the runner is
//! busy.

use std::sync::Arc;
use std::time::Duration;

use grs_control_plane::config::{Config, ProvisionerConfig};
use grs_control_plane::guest_agent::{STAGING_PATH, start_command};
use grs_control_plane::pools::{Pools, ProvisionerRegistry};
use grs_control_plane::server::ControlPlane;
use grs_control_plane::store::MemoryStore;
use grs_control_plane::testing::{
    FakeRegistrar, RunningControlPlane, eventually, job_event, submit, test_config,
    wait_for_instance, wait_for_no_instances_in_use,
};
use grs_proto::v1::{self as pb, JobAction};
use grs_provisioner_proxmox::BootstrapMode;
use grs_provisioner_proxmox::sim::Fault;
use grs_provisioner_proxmox::testing::SimFixture;
use secrecy::SecretString;

/// A control plane whose pool `linux` is a guest-agent pool of `fx`'s
/// simulator, asking `registrar` about runners; `tune` adjusts the
/// configuration last.
async fn guest_agent_control_plane(
    fx: &SimFixture,
    gateway_url: Option<&str>,
    registrar: Arc<FakeRegistrar>,
    tune: impl FnOnce(&mut Config),
) -> RunningControlPlane {
    let mut pool = fx.pool.clone();
    pool.bootstrap = BootstrapMode::GuestAgent;
    let mut config = test_config();
    config.control_plane.installation_id = "grs-ga".into();
    config.control_plane.gateway_url = gateway_url.map(Into::into);
    config.pools.get_mut("linux").unwrap().provisioner =
        Some(ProvisionerConfig::with_settings("proxmox", &pool).unwrap());
    config.validate().unwrap();
    // As the binary registers it: one backend for the [proxmox] connection.
    let (installation, prefix) = (
        config.control_plane.installation_id.clone(),
        config.control_plane.instance_prefix.clone(),
    );
    let registry = || {
        ProvisionerRegistry::new().with(
            "proxmox",
            Arc::new(grs_provisioner_proxmox::factory(
                Some(fx.conn.clone()),
                installation.clone(),
                prefix.clone(),
            )),
        )
    };
    // The backend says the pool bootstraps through the guest agent, which
    // needs [github] (checked at start-up); the registrar below stands in
    // for the client built from it.
    let e = Pools::from_config(&config, &registry()).unwrap_err();
    assert!(
        e.to_string().contains("`pools.linux.provisioner`")
            && e.to_string().contains("guest agent")
            && e.to_string().contains("needs [github]"),
        "{e}"
    );
    config.github = Some(grs_github::GitHubConfig {
        // The organisation of `job_event`'s jobs: others are foreign.
        organization: Some("octo-org".into()),
        token: Some(SecretString::from("ghp_unused".to_owned())),
        ..grs_github::GitHubConfig::default()
    });
    // No GitHub here: no optional calls (job-status checks, recovery).
    config.control_plane.github_api_budget = 0;
    tune(&mut config);
    config.validate().unwrap();
    let pools = Pools::from_config(&config, &registry()).unwrap();
    RunningControlPlane::start(ControlPlane {
        config,
        store: Arc::new(MemoryStore::new()),
        pools,
        registrar: Some(registrar),
    })
    .await
}

async fn job_runs_with_its_config_written_by_the_agent(gateway_url: Option<&str>) {
    let fx = SimFixture::single_node().await;
    let registrar = Arc::new(FakeRegistrar::default());
    let cp = guest_agent_control_plane(&fx, gateway_url, registrar, |_| {}).await;
    let mut c = cp.client().await;
    submit(&mut c, job_event("g1", JobAction::Queued, 8_100_000_001)).await;
    let name = "grs-8100000001";
    let vm = eventually(
        "the runner started by the agent",
        Duration::from_secs(20),
        || {
            let vms = fx.sim.vms_named(name);
            async move {
                vms.into_iter()
                    .find(|v| v.running && !v.agent_execs.is_empty())
            }
        },
    )
    .await;
    assert_eq!(
        vm.config.get("agent").map(String::as_str),
        Some("enabled=1")
    );
    assert_eq!(
        vm.agent_files,
        vec![(STAGING_PATH.to_owned(), format!("JIT-{name}"))],
        "the minted config, at the root-only staging path"
    );
    assert_eq!(
        vm.agent_execs,
        vec![start_command("runner", "/home/runner/actions-runner").unwrap()]
    );
    // A clone gets a fresh smbios1 uuid from PVE (clone_vm), but no serial:
    // no cloud-init seed for a guest-agent pool.
    assert_eq!(vm.smbios_serial(), None);
    assert!(
        fx.sim.schema_violations().is_empty(),
        "{:?}",
        fx.sim.schema_violations()
    );
    // The create returns after the exec; the store records it then.
    wait_for_instance(
        &c,
        name,
        pb::InstanceState::Running,
        Duration::from_secs(20),
    )
    .await;

    let mut done = job_event("g2", JobAction::Completed, 8_100_000_001);
    done.runner_name = name.into();
    submit(&mut c, done).await;
    eventually("the VM destroyed", Duration::from_secs(20), || {
        let gone = fx.sim.vms_named(name).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    wait_for_no_instances_in_use(&c, Duration::from_secs(5)).await;
    cp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_agent_pool_gets_its_runner_config_through_the_agent() {
    // With a gateway configured (cloud-init pools of the same installation
    // use it), the guest-agent pool must still not get a cloud-init spec.
    job_runs_with_its_config_written_by_the_agent(Some("http://gw.example:8080")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_agent_pool_without_a_gateway_gets_its_runner_config_through_the_agent() {
    job_runs_with_its_config_written_by_the_agent(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_runner_may_run_after_a_failed_create_stays_while_github_says_it_is_busy() {
    let fx = SimFixture::single_node().await;
    // The agent runs the runner's command, but its answer is lost: the
    // create fails with the runner running.
    fx.sim.inject(Fault::LoseAnswers {
        path_contains: "/agent/exec".into(),
        times: 1,
    });
    let name = "grs-8100000003";
    let registrar = Arc::new(FakeRegistrar::default());
    registrar.set_busy(name, true);
    let cp = guest_agent_control_plane(&fx, None, registrar.clone(), |c| {
        // The dispatcher gives up at the first failure: the job fails and
        // the instance's teardown is queued at once.
        c.control_plane.max_attempts = 1;
        // The reconciler looks again soon after the teardown is called off.
        c.control_plane.reconcile_interval = Duration::from_millis(200);
        c.control_plane.bootstrap_timeout = Duration::from_secs(1);
    })
    .await;
    let mut c = cp.client().await;
    submit(&mut c, job_event("g3", JobAction::Queued, 8_100_000_003)).await;
    // GitHub says the runner is busy: the teardown is called off (the
    // instance is running again), and the VM stays.
    wait_for_instance(
        &c,
        name,
        pb::InstanceState::Running,
        Duration::from_secs(20),
    )
    .await;
    assert!(registrar.asked().iter().any(|n| n == name));
    let vms = fx.sim.vms_named(name);
    assert_eq!(
        vms.len(),
        1,
        "the VM of a runner GitHub says is busy was destroyed"
    );
    assert_eq!(vms[0].agent_execs.len(), 1);
    // GitHub says it is idle: the reconciler's next look tears it down.
    registrar.set_busy(name, false);
    eventually("the VM destroyed", Duration::from_secs(20), || {
        let gone = fx.sim.vms_named(name).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    wait_for_no_instances_in_use(&c, Duration::from_secs(5)).await;
    cp.shutdown().await.unwrap();
}
