//! The mission, end to end: GitHub queues a job; the signed webhook reaches
//! the gateway; the control plane clones a VM on Proxmox with a cloud-init
//! seed; the "VM" fetches its user-data through the gateway and boots a
//! one-job runner from the JIT config in it; GitHub runs the job on it and
//! says so; the VM is destroyed. Everything over real sockets: GitHub and
//! Proxmox are the simulators GRS ships, assembled by `grs::demo::System`
//! (as `grs demo` runs them).

use std::sync::Arc;
use std::time::Duration;

use grs::demo::fleet::seed_url;
use grs::demo::{PoolSpec, System, SystemOptions};
use grs_control_plane::testing::{eventually, wait_for_no_instances_in_use};
use grs_github::sim::{NewJob, SimJobStatus};
use grs_proto::v1 as pb;
use grs_provisioner_proxmox::sim::TaskDurations;

/// Everything every component logs, at every level, kept for inspection.
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn install() -> Self {
        let capture = Self::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "trace,h2=info,hyper=info,hyper_util=info,tower=info,reqwest=info,rustls=info",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        capture
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_runs_on_its_own_vm_which_is_destroyed_afterwards() {
    let logs = LogCapture::install();
    // GitHub and Proxmox (the simulators), the control plane and the
    // gateway, wired as `grs demo` wires them; no simulated VMs boot by
    // themselves here: this test boots the one VM step by step.
    let system = System::start(SystemOptions {
        pools: PoolSpec::demo_pools()[..1].to_vec(),
        pve_durations: TaskDurations::fast(),
        job_duration: Duration::from_millis(300),
        time_scale: 0.02,
        installation_id: "grs-e2e".into(),
        ..SystemOptions::default()
    })
    .await
    .expect("the system starts");
    let (github, pve) = (&system.github, &system.pve);
    let gw_url = system.gateway_url();
    let template = system.pools[0].template_vmid;

    // GitHub queues a job: its webhook flows to a clone on Proxmox.
    let job = github
        .queue_job(NewJob::labels(["self-hosted", "linux"]))
        .await;
    let name = system.instance_name(job.id);
    let vm = eventually("the VM to run on Proxmox", Duration::from_secs(20), || {
        let vms = pve.vms_named(&name);
        async move { vms.into_iter().find(|v| v.running) }
    })
    .await;
    assert_ne!(vm.vmid, template);

    // The VM boots: cloud-init fetches its documents from the seed URL.
    let seed = seed_url(vm.config.get("smbios1").expect("smbios1")).expect("a NoCloud seed");
    assert!(seed.starts_with(&format!("{gw_url}/cloud-init/")), "{seed}");
    let http = reqwest::Client::new();
    let meta = http.get(format!("{seed}meta-data")).send().await.unwrap();
    assert_eq!(meta.status(), 200);
    assert!(
        meta.text()
            .await
            .unwrap()
            .contains(&format!("instance-id: {name}"))
    );
    let user_data = http.get(format!("{seed}user-data")).send().await.unwrap();
    assert_eq!(user_data.status(), 200);
    let user_data = user_data.text().await.unwrap();
    assert!(user_data.starts_with("#cloud-config"), "{user_data}");
    assert!(
        user_data.contains("permissions: \"0600\"") && user_data.contains("--jitconfig"),
        "{user_data}"
    );
    let jit = grs_github::cloud_init::jit_config_from_user_data(&user_data)
        .expect("a JIT config in the user-data");

    // The runner starts; GitHub gives it the job, runs it, completes it.
    let runner = github
        .boot_runner(&jit)
        .await
        .expect("the JIT config boots a runner");
    assert_eq!(runner.name, name, "the runner is named after the instance");
    assert!(
        github
            .wait_until(Duration::from_secs(10), |g| g
                .job(job.id)
                .is_some_and(|j| j.status == SimJobStatus::Completed))
            .await,
        "job completed on GitHub"
    );

    // Completed → the VM is destroyed, the slot freed, the template untouched.
    eventually("the VM destroyed", Duration::from_secs(20), || {
        let gone = pve.vms_named(&name).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    assert!(pve.vm(template).is_some());
    let mut c = system.client().await.unwrap();
    let recorded = c
        .get_job(pb::GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.state(), pb::JobState::Completed);
    assert_eq!(recorded.runner_name, name);
    wait_for_no_instances_in_use(&c, Duration::from_secs(5)).await;
    // The bootstrap token is used up: the seed URL answers 404 now.
    assert_eq!(
        http.get(format!("{seed}user-data"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert!(
        pve.schema_violations().is_empty(),
        "{:?}",
        pve.schema_violations()
    );
    let (webhook_secret, pve_secret) = (github.webhook_secret(), pve.token_secret().to_owned());
    system.shutdown().await.unwrap();

    // No secret in any log line, at any level, of any component.
    let logs = logs.text();
    assert!(
        logs.contains(&name),
        "the capture works (the instance is logged)"
    );
    let token = seed
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    for (what, secret) in [
        ("webhook secret", webhook_secret),
        (
            "GitHub token",
            "ghp_simulated_personal_access_token".to_owned(),
        ),
        ("PVE token secret", pve_secret),
        ("bootstrap token", token),
        ("JIT runner config", jit.clone()),
    ] {
        assert!(!logs.contains(&secret), "the {what} appears in the logs");
    }
}
