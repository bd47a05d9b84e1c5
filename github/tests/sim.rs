//! The simulator behaves like GitHub where GRS depends on it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use grs_github::sim::{DeliveryFault, GitHubSim, NewJob, SimConfig, SimJobStatus};
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
    // Attempts are logged once answered: three of them, all answered.
    assert!(
        sim.wait_until(Duration::from_secs(5), |s| {
            let d = s.deliveries();
            d.len() == 3 && d.iter().all(|d| d.status.is_some())
        })
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

/// An App client (JWT for `/app/...`) at organisation scope.
fn app_client(sim: &GitHubSim) -> GitHubClient {
    GitHubClient::new(&GitHubConfig {
        api_url: sim.url(),
        organization: Some("grs-sim".into()),
        app: Some(grs_github::GitHubAppConfig {
            app_id: "4242".into(),
            installation_id: 77,
            private_key: Some(SecretString::from(
                include_str!("data/test-app.key.pem").to_owned(),
            )),
            private_key_file: None,
        }),
        ..GitHubConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn a_failed_delivery_is_listed_by_the_apps_hook_and_redelivered_with_its_guid() {
    let (sim, _pat, seen) = setup().await;
    let gh = app_client(&sim);
    assert_eq!(gh.hook(), Some(&grs_github::Hook::App));
    sim.set_delivery_fault(Some(DeliveryFault::Fail));
    let job = sim.queue_job(NewJob::labels(["self-hosted"])).await;
    assert!(seen.lock().unwrap().is_empty(), "the receiver got nothing");
    sim.set_delivery_fault(None);

    let (failed, next) = gh
        .list_deliveries(&grs_github::Hook::App, true, 100, None)
        .await
        .unwrap();
    assert_eq!(next, None);
    assert_eq!(failed.len(), 1, "{failed:?}");
    let d = &failed[0];
    assert_eq!(
        (d.event.as_str(), d.action.as_deref()),
        ("workflow_job", Some("queued"))
    );
    assert!(
        !d.succeeded() && !d.redelivery && d.status_code == 502,
        "{d:?}"
    );
    assert!(d.delivered_at().is_some());

    gh.redeliver(&grs_github::Hook::App, d.id).await.unwrap();
    assert!(
        sim.wait_until(Duration::from_secs(5), |_| !seen.lock().unwrap().is_empty())
            .await,
        "the redelivery reached the receiver"
    );
    let got = seen.lock().unwrap()[0].clone();
    assert_eq!(
        (got.0.as_str(), got.2),
        (d.guid.as_str(), job.id),
        "same guid"
    );
    // The log now has the redelivery, successful; nothing failed is newer.
    let (all, _) = gh
        .list_deliveries(&grs_github::Hook::App, false, 100, None)
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert!(
        all[0].redelivery && all[0].succeeded() && all[0].guid == d.guid,
        "{all:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_org_hooks_deliveries_page_by_cursor_and_a_lost_delivery_is_not_logged() {
    let (sim, _pat, _seen) = setup().await;
    let gh = GitHubClient::new(&GitHubConfig {
        api_url: sim.url(),
        organization: Some("grs-sim".into()),
        token: Some(SecretString::from(
            "ghp_simulated_personal_access_token".to_owned(),
        )),
        hook_id: Some(1),
        ..GitHubConfig::default()
    })
    .unwrap();
    let hook = gh
        .hook()
        .cloned()
        .expect("github.hook_id names the org hook");
    assert!(matches!(
        hook,
        grs_github::Hook::Organization { hook_id: 1, .. }
    ));
    for _ in 0..3 {
        sim.queue_job(NewJob::labels(["self-hosted"])).await;
    }
    sim.set_delivery_fault(Some(DeliveryFault::Lose));
    sim.queue_job(NewJob::labels(["self-hosted"])).await;
    let (p1, next) = gh.list_deliveries(&hook, false, 2, None).await.unwrap();
    let (p2, last) = gh
        .list_deliveries(&hook, false, 2, next.as_deref())
        .await
        .unwrap();
    assert_eq!((p1.len(), p2.len(), last), (2, 1, None));
    assert!(p1[0].id > p1[1].id && p1[1].id > p2[0].id, "newest first");
    assert!(p1.iter().chain(&p2).all(|d| d.succeeded()));
    // A PAT cannot use the App's endpoints.
    let e = gh
        .list_deliveries(&grs_github::Hook::App, false, 2, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("GitHub App"), "{e}");
    sim.shutdown().await;
}

#[tokio::test]
async fn queued_runs_and_their_jobs_are_listed_as_github_lists_them() {
    let (sim, gh, _seen) = setup().await;
    // Job ids are consecutive and a run holds two of them.
    let a = sim
        .queue_job(NewJob::labels(["self-hosted", "linux"]))
        .await;
    let b = sim.queue_job(NewJob::labels(["self-hosted", "gpu"])).await;
    let repo = "grs-sim/app";
    let queued = gh.list_workflow_runs(repo, "queued", 100).await.unwrap();
    let runs: std::collections::BTreeSet<u64> = [a.run_id, b.run_id].into();
    assert_eq!(
        queued
            .iter()
            .map(|r| r.id)
            .collect::<std::collections::BTreeSet<_>>(),
        runs
    );
    let mut jobs = Vec::new();
    for r in &runs {
        jobs.extend(gh.list_run_jobs(repo, *r).await.unwrap());
    }
    let a_listed = jobs.iter().find(|j| j.id == a.id).expect("job a listed");
    assert_eq!(
        (a_listed.status.as_str(), a_listed.labels.clone()),
        ("queued", vec!["self-hosted".to_owned(), "linux".to_owned()])
    );
    // Taken by a runner: its run is in progress, no longer queued.
    let jit = gh
        .generate_jit_config("grs-x", &["self-hosted".into(), "linux".into()], None)
        .await
        .unwrap();
    sim.boot_runner(jit.encoded_jit_config.expose_secret())
        .await
        .unwrap();
    let in_progress = gh
        .list_workflow_runs(repo, "in_progress", 100)
        .await
        .unwrap();
    assert!(
        in_progress.iter().any(|r| r.id == a.run_id),
        "{in_progress:?}"
    );
    assert_eq!(gh.get_job(repo, a.id).await.unwrap().status, "in_progress");
    // Another repository's jobs are not this one's.
    assert!(gh.get_job("grs-sim/other", a.id).await.is_err());
    sim.shutdown().await;
}
