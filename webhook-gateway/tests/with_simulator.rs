//! The GitHub simulator drives the gateway like GitHub would: signed
//! deliveries in, the fake control plane records them; a "VM" fetches its
//! user-data through the gateway and boots a runner from the JIT config in it.

#[path = "support/fake_control_plane.rs"]
mod fake;

use std::time::Duration;

use grs_github::cloud_init::{self, RunnerBootstrap};
use grs_github::sim::{GitHubSim, NewJob, SimConfig, SimJobStatus};
use grs_github::{GitHubClient, GitHubConfig};
use grs_proto::v1 as pb;
use grs_webhook_gateway::{GatewayConfig, ResolvedSecrets};
use secrecy::SecretString;

#[tokio::test]
async fn a_job_runs_end_to_end_through_the_gateway() {
    let cp = fake::FakeControlPlane::default().serve().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = format!("http://{}", l.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(grs_webhook_gateway::run_with(
        GatewayConfig {
            control_plane_url: cp.url(),
            ..GatewayConfig::default()
        },
        ResolvedSecrets {
            webhook_secret: SecretString::from("sim-secret".to_owned()),
            auth_token: None,
            tls_ca_pem: None,
        },
        l,
        async {
            let _ = stopped.await;
        },
    ));
    let sim = GitHubSim::start(SimConfig {
        webhook_url: Some(format!("{gw}/webhook")),
        webhook_secret: "sim-secret".into(),
        job_duration: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await
    .unwrap();

    // GitHub queues a job: the control plane hears of it through the gateway.
    let job = sim
        .queue_job(NewJob::labels(["self-hosted", "linux"]))
        .await;
    assert_eq!(sim.deliveries()[0].status, Some(202));
    let got = cp.fake.accepted();
    assert_eq!(
        (got[0].job_id, got[0].action),
        (job.id, pb::JobAction::Queued as i32)
    );
    assert_eq!(got[0].organization, "grs-sim");

    // The control plane mints a JIT config and renders the user-data for
    // the instance; the VM fetches it through the gateway.
    let gh = GitHubClient::new(&GitHubConfig {
        api_url: sim.url(),
        organization: Some("grs-sim".into()),
        token: Some(SecretString::from(
            "ghp_simulated_personal_access_token".to_owned(),
        )),
        ..GitHubConfig::default()
    })
    .unwrap();
    let name = format!("grs-{}", job.id);
    let jit = gh
        .generate_jit_config(&name, &["self-hosted".into(), "linux".into()], None)
        .await
        .unwrap();
    let user_data = cloud_init::render_user_data(
        cloud_init::DEFAULT_USER_DATA_TEMPLATE,
        &RunnerBootstrap {
            instance_name: name.clone(),
            encoded_jit_config: jit.encoded_jit_config,
            runner_user: "runner".into(),
            runner_dir: "/home/runner/actions-runner".into(),
            jit_config_path: None,
        },
    )
    .unwrap();
    let token = "dG9rZW4tZm9yLXRoaXMtaW5zdGFuY2UtMTIz";
    cp.fake.add_bootstrap(
        token,
        pb::BootstrapDocument::UserData,
        &user_data,
        "text/cloud-config",
    );
    let fetched = reqwest::get(format!("{gw}/cloud-init/{token}/user-data"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let encoded = cloud_init::jit_config_from_user_data(&fetched).unwrap();
    sim.boot_runner(&encoded).await.unwrap();

    // The runner takes the job; in_progress and completed reach the control
    // plane naming the instance.
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| s.job(job.id).unwrap().status
            == SimJobStatus::Completed)
            .await
    );
    assert!(
        sim.wait_until(Duration::from_secs(5), |_| cp.fake.accepted().len() == 3)
            .await
    );
    let got = cp.fake.accepted();
    assert_eq!(got[1].action, pb::JobAction::InProgress as i32);
    assert_eq!(got[2].action, pb::JobAction::Completed as i32);
    assert_eq!(
        (got[2].runner_name.as_str(), got[2].conclusion.as_str()),
        (name.as_str(), "success")
    );
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| s
            .deliveries()
            .iter()
            .all(|d| d.status == Some(202)))
            .await
    );

    sim.shutdown().await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    cp.stop().await;
}
