//! The simulator behaves like GitHub where GRS depends on it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use grs_github::sim::{GitHubSim, NewJob, SimConfig, SimJobStatus};
use grs_github::webhook::{self, BodyEncoding, Delivery};
use grs_github::{GitHubClient, GitHubConfig, signature};
use secrecy::{ExposeSecret, SecretString};

type Seen = Arc<Mutex<Vec<(String, String, u64, Option<String>)>>>;

/// A webhook receiver that checks signatures like the gateway does and
/// records (delivery id, action, job id, runner name).
async fn receiver(secret: &'static str) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            async move {
                let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
                if signature::verify(secret.as_bytes(), &body, sig).is_err() {
                    return StatusCode::UNAUTHORIZED;
                }
                let event = headers["x-github-event"].to_str().unwrap();
                let id = headers["x-github-delivery"].to_str().unwrap().to_owned();
                if let Ok(Delivery::WorkflowJob(j)) =
                    webhook::parse(event, BodyEncoding::Json, &body)
                {
                    s.lock().unwrap().push((
                        id,
                        j.job_action().as_str().into(),
                        j.job_id,
                        j.runner_name,
                    ));
                }
                StatusCode::ACCEPTED
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

async fn setup() -> (GitHubSim, GitHubClient, Seen) {
    let (url, seen) = receiver("shh").await;
    let sim = GitHubSim::start(SimConfig {
        webhook_url: Some(url),
        webhook_secret: "shh".into(),
        job_duration: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let gh = GitHubClient::new(&GitHubConfig {
        api_url: sim.url(),
        organization: Some("grs-sim".into()),
        token: Some(SecretString::from(
            "ghp_simulated_personal_access_token".to_owned(),
        )),
        ..GitHubConfig::default()
    })
    .unwrap();
    (sim, gh, seen)
}

#[tokio::test]
async fn queueing_a_job_sends_a_signed_queued_delivery() {
    let (sim, _gh, seen) = setup().await;
    let job = sim
        .queue_job(NewJob::labels(["self-hosted", "linux"]))
        .await;
    let d = sim.deliveries();
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].status,
        Some(202),
        "the receiver verified the signature"
    );
    assert_eq!(seen.lock().unwrap()[0].1, "queued");
    assert_eq!(seen.lock().unwrap()[0].2, job.id);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_booted_jit_runner_takes_a_matching_job_runs_it_and_goes_away() {
    let (sim, gh, seen) = setup().await;
    let job = sim
        .queue_job(NewJob::labels(["self-hosted", "Linux"]))
        .await;
    let jit = gh
        .generate_jit_config(
            "grs-a",
            &["self-hosted".into(), "linux".into(), "x64".into()],
            None,
        )
        .await
        .unwrap();
    assert_eq!(sim.job(job.id).unwrap().status, SimJobStatus::Queued);
    sim.boot_runner(jit.encoded_jit_config.expose_secret())
        .await
        .unwrap();
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| s.job(job.id).unwrap().status
            == SimJobStatus::Completed)
            .await
    );
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| s
            .deliveries()
            .iter()
            .all(|d| d.status.is_some()))
            .await
    );
    let seen = seen.lock().unwrap().clone();
    let actions: Vec<_> = seen
        .iter()
        .map(|(_, a, id, r)| (a.as_str(), *id, r.clone()))
        .collect();
    assert_eq!(
        actions,
        [
            ("queued", job.id, None),
            ("in_progress", job.id, Some("grs-a".to_string())),
            ("completed", job.id, Some("grs-a".to_string())),
        ]
    );
    assert!(sim.runners().is_empty(), "JIT runners are ephemeral");
    // A JIT config boots once.
    assert!(
        sim.boot_runner(jit.encoded_jit_config.expose_secret())
            .await
            .is_err()
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_runner_made_for_one_job_may_take_another_with_the_same_labels() {
    let (sim, gh, _seen) = setup().await;
    let a = sim.queue_job(NewJob::labels(["l"])).await;
    let b = sim.queue_job(NewJob::labels(["l"])).await;
    // The runner was made "for" b, but a is older and matches.
    let jit = gh
        .generate_jit_config(&format!("grs-{}", b.id), &["l".into()], None)
        .await
        .unwrap();
    sim.boot_runner(jit.encoded_jit_config.expose_secret())
        .await
        .unwrap();
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| s.job(a.id).unwrap().status
            != SimJobStatus::Queued)
            .await
    );
    assert_eq!(
        sim.job(a.id).unwrap().runner_name.as_deref(),
        Some(format!("grs-{}", b.id).as_str())
    );
    assert_eq!(sim.job(b.id).unwrap().status, SimJobStatus::Queued);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_idle_runner_without_the_labels_takes_nothing_until_a_match_is_queued() {
    let (sim, gh, _seen) = setup().await;
    let jit = gh
        .generate_jit_config("grs-gpu", &["gpu".into()], None)
        .await
        .unwrap();
    sim.boot_runner(jit.encoded_jit_config.expose_secret())
        .await
        .unwrap();
    let cpu = sim.queue_job(NewJob::labels(["cpu"])).await;
    let gpu = sim.queue_job(NewJob::labels(["GPU"])).await;
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| s.job(gpu.id).unwrap().status
            == SimJobStatus::Completed)
            .await
    );
    assert_eq!(sim.job(cpu.id).unwrap().status, SimJobStatus::Queued);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_queued_job_completes_with_no_runner_and_redelivery_keeps_the_id() {
    let (sim, _gh, seen) = setup().await;
    let job = sim.queue_job(NewJob::labels(["l"])).await;
    sim.cancel_job(job.id).await;
    let seen_now = seen.lock().unwrap().clone();
    assert_eq!(seen_now[1].1, "completed");
    assert_eq!(seen_now[1].3, None);
    let first = sim.deliveries()[0].delivery_id.clone();
    assert_eq!(sim.redeliver(&first).await, Some(202));
    assert_eq!(seen.lock().unwrap()[2].0, first);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_secret_shows_as_a_failed_delivery() {
    let (url, _seen) = receiver("right").await;
    let sim = GitHubSim::start(SimConfig {
        webhook_url: Some(url),
        webhook_secret: "wrong".into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    sim.queue_job(NewJob::labels(["l"])).await;
    assert_eq!(sim.deliveries()[0].status, Some(401));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_runner_can_boot_over_http_from_another_process() {
    let (sim, gh, _seen) = setup().await;
    let jit = gh
        .generate_jit_config("grs-http", &["l".into()], None)
        .await
        .unwrap();
    let url = format!("{}/_sim/boot", sim.url());
    let http = reqwest::Client::new();
    let r = http
        .post(&url)
        .body(jit.encoded_jit_config.expose_secret().to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(sim.runners()[0].online);
    let again = http
        .post(&url)
        .body(jit.encoded_jit_config.expose_secret().to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 422);
    sim.shutdown().await;
}
