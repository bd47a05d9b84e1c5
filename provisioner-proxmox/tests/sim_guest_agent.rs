//! The guest-agent bootstrap (`bootstrap = "guest-agent"`) against the
//! simulator's agent endpoints, faults included: an agent that never
//! answers, a file-write or exec the agent refuses, an exec whose answer is
//! lost. Every failure is a clear error and never shows the runner config.
//! A failure before the runner's command may have run leaves no VM behind;
//! one after (the exec's answer lost) leaves the VM for the control plane,
//! whose teardown asks GitHub whether the runner is busy first.

use std::time::Duration;

use grs_provisioner::conformance::spec;
use grs_provisioner::{Bootstrap, InstanceSpec, ProvisionerError};
use grs_provisioner_proxmox::BootstrapMode;
use grs_provisioner_proxmox::sim::{Fault, SimOptions, TaskDurations};
use grs_provisioner_proxmox::testing::{NodeSpec, POOL, SimFixture};
use secrecy::SecretString;

const SECRET: &str = "JIT-CONFIG-VERY-SECRET";

fn agent_spec(name: &str, job: u64) -> InstanceSpec {
    let mut s = spec(POOL, name, job);
    s.bootstrap = Bootstrap::GuestAgent {
        path: "/root/.grs-jitconfig".into(),
        content: SecretString::from(SECRET.to_owned()),
        command: vec!["/bin/sh".into(), "-c".into(), "true".into()],
    };
    s
}

/// A fixture whose VMs' agents come up after `agent_ready`, and a
/// guest-agent provisioner that waits `agent_timeout` for them.
async fn fixture(
    agent_ready: Duration,
    agent_timeout: Duration,
) -> (
    SimFixture,
    std::sync::Arc<grs_provisioner_proxmox::ProxmoxProvisioner>,
) {
    let opts = SimOptions {
        tls: true,
        durations: TaskDurations {
            agent_ready,
            ..TaskDurations::fast()
        },
        ..SimOptions::default()
    };
    let f = SimFixture::start(opts, &[NodeSpec::new("pve1", 64, None)]).await;
    let mut pool = f.pool.clone();
    pool.bootstrap = BootstrapMode::GuestAgent;
    pool.agent_timeout = agent_timeout;
    let p = f.provisioner_with(&pool);
    (f, p)
}

fn assert_clean(f: &SimFixture, name: &str, e: &ProvisionerError) {
    assert!(
        f.sim.vms_named(name).is_empty(),
        "the failed create left its VM"
    );
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains(SECRET), "{text}");
    }
    let v = f.sim.schema_violations();
    assert!(v.is_empty(), "{v:?}");
}

#[tokio::test]
async fn an_agent_that_answers_late_but_in_time_gets_the_config_and_the_command() {
    let (f, p) = fixture(Duration::from_millis(300), Duration::from_secs(10)).await;
    p.create(&agent_spec("grs-conf-ga1", 1)).await.unwrap();
    let vm = &f.sim.vms_named("grs-conf-ga1")[0];
    assert_eq!(
        vm.agent_files,
        vec![("/root/.grs-jitconfig".to_owned(), SECRET.to_owned())]
    );
    assert_eq!(vm.agent_execs, vec![vec!["/bin/sh", "-c", "true"]]);
    // Pings while the agent was not up were answered with PVE's 500 and
    // retried; each is one request.
    let pings = f
        .sim
        .requests_by_endpoint()
        .get("POST /nodes/{node}/qemu/{vmid}/agent/ping")
        .copied()
        .unwrap_or(0);
    assert!(pings >= 2, "{pings} pings");
    p.delete("grs-conf-ga1").await.unwrap();
}

#[tokio::test]
async fn an_agent_that_never_answers_fails_the_create_with_a_clear_error_and_removes_the_vm() {
    let (f, p) = fixture(Duration::from_secs(3600), Duration::from_millis(400)).await;
    let e = p.create(&agent_spec("grs-conf-ga2", 2)).await.unwrap_err();
    assert!(matches!(e, ProvisionerError::Transient(_)), "{e:?}");
    let text = e.to_string();
    for part in [
        "guest agent",
        "did not answer within",
        "qemu-guest-agent",
        "QEMU guest agent is not running",
    ] {
        assert!(text.contains(part), "{part:?} missing in: {text}");
    }
    assert_clean(&f, "grs-conf-ga2", &e);
    let vm_writes = f
        .sim
        .requests_by_endpoint()
        .get("POST /nodes/{node}/qemu/{vmid}/agent/file-write")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        vm_writes, 0,
        "nothing is written to an agent that never answered"
    );
}

#[tokio::test]
async fn a_file_write_the_agent_refuses_fails_the_create_and_removes_the_vm() {
    let (f, p) = fixture(Duration::from_millis(20), Duration::from_secs(10)).await;
    // What PVE answers when qemu-ga cannot open the file (check_agent_error
    // in qemu-server PVE/QemuServer/Agent.pm).
    f.sim.inject(Fault::HttpError {
        path_contains: "/agent/file-write".into(),
        method: Some("POST".into()),
        status: 500,
        message: "Agent error: can't open file: Read-only file system".into(),
        times: 1,
    });
    let e = p.create(&agent_spec("grs-conf-ga3", 3)).await.unwrap_err();
    assert!(e.to_string().contains("Read-only file system"), "{e}");
    assert!(!e.is_retryable(), "{e:?}");
    assert_clean(&f, "grs-conf-ga3", &e);
}

#[tokio::test]
async fn an_exec_the_agent_refuses_fails_the_create_and_removes_the_vm() {
    let (f, p) = fixture(Duration::from_millis(20), Duration::from_secs(10)).await;
    f.sim.inject(Fault::HttpError {
        path_contains: "/agent/exec".into(),
        method: Some("POST".into()),
        status: 500,
        message: "Agent error: Failed to execute child process \u{201c}/bin/sh\u{201d}".into(),
        times: 1,
    });
    let e = p.create(&agent_spec("grs-conf-ga4", 4)).await.unwrap_err();
    assert!(e.to_string().contains("Failed to execute"), "{e}");
    assert_clean(&f, "grs-conf-ga4", &e);
    // The config was written before the exec failed; the VM is gone with it.
    assert_eq!(
        f.sim
            .requests_by_endpoint()
            .get("POST /nodes/{node}/qemu/{vmid}/agent/exec")
            .copied(),
        Some(1),
        "an exec is never repeated (it could run twice)"
    );
}

#[tokio::test]
async fn an_exec_whose_answer_is_lost_leaves_the_vm_and_a_retried_create_keeps_its_runner() {
    let (f, p) = fixture(Duration::from_millis(20), Duration::from_secs(10)).await;
    // PVE runs the command (the runner starts) but the answer never comes.
    f.sim.inject(Fault::LoseAnswers {
        path_contains: "/agent/exec".into(),
        times: 1,
    });
    let name = "grs-conf-ga5";
    let e = p.create(&agent_spec(name, 5)).await.unwrap_err();
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains(SECRET), "{text}");
    }
    let vms = f.sim.vms_named(name);
    assert_eq!(
        vms.len(),
        1,
        "the create destroyed a VM whose runner may be running a job"
    );
    assert_eq!(vms[0].agent_execs.len(), 1);
    // The control plane retries the create: it finds the VM by name,
    // running, and keeps it without starting the runner a second time.
    let inst = p.create(&agent_spec(name, 5)).await.unwrap();
    assert_eq!(inst.state, grs_provisioner::InstanceState::Running);
    let vms = f.sim.vms_named(name);
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].agent_execs.len(), 1, "the runner was started twice");
    // Its teardown (after GitHub says the runner is idle) removes it.
    p.delete(name).await.unwrap();
    assert!(f.sim.vms_named(name).is_empty());
    let v = f.sim.schema_violations();
    assert!(v.is_empty(), "{v:?}");
}
