//! The simulator speaks PVE: envelopes, status codes, wording, tasks,
//! locks, nextid. These tests pin the behaviour the provisioner relies on
//! (each fact is from `shared/docs/proxmox-api.md`).

use std::time::Duration;

use grs_provisioner_proxmox::client::{Idempotency, Param, Upid};
use grs_provisioner_proxmox::sim::{PveSim, SimOptions, TaskDurations};
use grs_provisioner_proxmox::testing::conn_config;
use grs_provisioner_proxmox::{PveClient, PveError};
use reqwest::Method;

async fn sim(clone: Duration) -> (PveSim, PveClient) {
    let sim = PveSim::start(SimOptions {
        durations: TaskDurations {
            linked_clone: clone,
            ..TaskDurations::fast()
        },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_node("pve1", 16);
    sim.add_template("pve1", 9000, "tpl");
    let mut conn = conn_config(&sim);
    conn.retry_attempts = 1;
    let c = PveClient::new(&conn).unwrap();
    (sim, c)
}

fn clone_params(newid: u32, name: &str) -> Vec<Param> {
    vec![
        Param::new("newid", newid),
        Param::new("name", name),
        Param::flag("full", false),
    ]
}

/// Clones the template into `vmid` and waits for the clone task to succeed.
async fn clone_and_wait(c: &PveClient, vmid: u32, name: &str) {
    let u = c
        .clone_vm("pve1", 9000, &clone_params(vmid, name))
        .await
        .unwrap();
    c.wait_task(&u).await.unwrap();
}

/// Runs `action` (`start` or `stop`) on `vmid` and waits for its task to succeed.
async fn act_and_wait(c: &PveClient, vmid: u32, action: &str) {
    let u = c.vm_action("pve1", vmid, action).await.unwrap();
    c.wait_task(&u).await.unwrap();
}

#[tokio::test]
async fn errors_come_in_pves_envelope_with_message_and_parameter_errors() {
    let (sim, _) = sim(Duration::from_millis(10)).await;
    let http = reqwest::Client::new();
    let auth = format!("PVEAPIToken={}={}", sim.token_id(), sim.token_secret());
    let r = http
        .get(format!(
            "{}/api2/json/nodes/pve1/qemu/123/config",
            sim.url()
        ))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["data"], serde_json::Value::Null);
    assert_eq!(
        body["message"],
        "Configuration file 'nodes/pve1/qemu-server/123.conf' does not exist\n"
    );
    let r = http
        .post(format!(
            "{}/api2/json/nodes/pve1/qemu/9000/clone",
            sim.url()
        ))
        .header("Authorization", &auth)
        .form(&[("newid", "x"), ("name", "a_b")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["message"], "Parameter verification failed.\n");
    assert!(
        body["errors"]["newid"]
            .as_str()
            .unwrap()
            .contains("type check ('integer') failed")
    );
    assert!(
        body["errors"]["name"]
            .as_str()
            .unwrap()
            .contains("valid DNS name")
    );
    let r = http
        .get(format!("{}/api2/json/version", sim.url()))
        .header("Authorization", "PVEAPIToken=root@pam!grs=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn nextid_reserves_nothing_and_a_taken_id_fails_the_clone() {
    let (_sim, c) = sim(Duration::from_millis(10)).await;
    let a = c.nextid().await.unwrap();
    let b = c.nextid().await.unwrap();
    assert_eq!(a, b, "nextid must not reserve");
    let upid = c
        .clone_vm("pve1", 9000, &clone_params(a, "one"))
        .await
        .unwrap();
    let e = c
        .clone_vm("pve1", 9000, &clone_params(a, "two"))
        .await
        .unwrap_err();
    assert!(e.is_vmid_taken(), "{e}");
    assert_eq!(e.status(), Some(500));
    c.wait_task(&upid).await.unwrap();
    assert_eq!(c.nextid().await.unwrap(), a + 1);
}

#[tokio::test]
async fn a_clone_holds_lock_clone_until_its_task_ends_and_refuses_config_meanwhile() {
    let (_sim, c) = sim(Duration::from_millis(300)).await;
    let upid = c
        .clone_vm("pve1", 9000, &clone_params(100, "cloning"))
        .await
        .unwrap();
    assert_eq!(Upid::parse(&upid.raw).unwrap().kind, "qmclone");
    let r = c.resources(Some("vm")).await.unwrap();
    let vm = r.iter().find(|r| r.vmid == Some(100)).unwrap();
    assert_eq!(vm.lock.as_deref(), Some("clone"));
    let e = c
        .set_config("pve1", 100, &[Param::new("cores", 2)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("VM is locked (clone)"), "{e}");
    c.wait_task(&upid).await.unwrap();
    c.set_config("pve1", 100, &[Param::new("cores", 2)])
        .await
        .unwrap();
    let r = c.resources(Some("vm")).await.unwrap();
    assert!(
        r.iter()
            .find(|r| r.vmid == Some(100))
            .unwrap()
            .lock
            .is_none()
    );
}

#[tokio::test]
async fn a_running_vm_cannot_be_destroyed_and_starting_it_twice_fails_the_task() {
    let (_sim, c) = sim(Duration::from_millis(10)).await;
    clone_and_wait(&c, 100, "vm").await;
    act_and_wait(&c, 100, "start").await;
    let e = c.destroy("pve1", 100).await.unwrap_err();
    assert_eq!(e.pve_text(), "VM 100 is running - destroy failed");
    let u = c.vm_action("pve1", 100, "start").await.unwrap();
    match c.wait_task(&u).await.unwrap_err() {
        PveError::Task {
            exitstatus, log, ..
        } => {
            assert_eq!(exitstatus, "VM 100 already running");
            assert!(
                log.iter()
                    .any(|l| l == "TASK ERROR: VM 100 already running"),
                "{log:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Stopping twice is fine; then destroy works and the VM is gone.
    for _ in 0..2 {
        act_and_wait(&c, 100, "stop").await;
    }
    let u = c.destroy("pve1", 100).await.unwrap();
    c.wait_task(&u).await.unwrap();
    assert!(c.vm_config("pve1", 100).await.unwrap_err().is_vm_missing());
}

#[tokio::test]
async fn templates_cannot_be_started_and_linked_clones_need_a_template() {
    let (sim, c) = sim(Duration::from_millis(10)).await;
    assert!(c.vm_action("pve1", 9000, "start").await.is_err());
    sim.add_vm("pve1", 500, "plain", false);
    let e = c
        .clone_vm("pve1", 500, &clone_params(101, "x"))
        .await
        .unwrap_err();
    assert!(
        e.pve_text()
            .contains("Linked clone feature is not supported"),
        "{e}"
    );
    let e = c
        .clone_vm(
            "pve1",
            9000,
            &[
                Param::new("newid", 102),
                Param::flag("full", false),
                Param::new("storage", "local-lvm"),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        e.pve_text()
            .contains("parameter 'storage' not allowed for linked clones"),
        "{e}"
    );
}

#[tokio::test]
async fn the_guest_agent_answers_only_once_the_vm_runs_and_its_agent_is_up() {
    let (_sim, c) = sim(Duration::from_millis(10)).await;
    clone_and_wait(&c, 100, "vm").await;
    let e = c.agent_ping("pve1", 100).await.unwrap_err();
    assert!(e.pve_text().contains("VM 100 is not running"), "{e}");
    act_and_wait(&c, 100, "start").await;
    let mut up = false;
    for _ in 0..50 {
        match c.agent_ping("pve1", 100).await {
            Ok(()) => {
                up = true;
                break;
            }
            Err(e) => assert!(
                e.pve_text().contains("QEMU guest agent is not running"),
                "{e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up);
    let pid = c
        .agent_exec("pve1", 100, &["/bin/true".to_string()])
        .await
        .unwrap();
    assert!(pid > 0);
}

#[tokio::test]
async fn an_offline_node_answers_595() {
    let (sim, c) = sim(Duration::from_millis(10)).await;
    sim.set_node_online("pve1", false);
    let e = c
        .call(
            Method::GET,
            "/nodes/pve1/qemu/9000/config",
            &[],
            Idempotency::Idempotent,
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(595));
    assert!(e.is_transient());
    let nodes = c.resources(Some("node")).await.unwrap();
    assert_eq!(nodes[0].status.as_deref(), Some("offline"));
}
