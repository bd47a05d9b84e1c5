//! The REST client against the simulator, over real HTTP.

use std::time::{Duration, Instant};

use grs_github::client::GitHubError;
use grs_github::sim::{Fault, NewJob, SimConfig};
use grs_github::{GitHubAppConfig, GitHubClient, GitHubConfig, Scope};
use secrecy::{ExposeSecret, SecretString};

mod common;
use common::{app_config, pat_config, sim};

fn labels(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn an_app_mints_a_jit_config_with_the_pool_labels_and_runner_group() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&app_config(&sim)).unwrap();
    let jit = gh
        .generate_jit_config("grs-10000000001", &labels(&["self-hosted", "linux"]), None)
        .await
        .unwrap();
    assert_eq!(jit.runner.name, "grs-10000000001");
    assert_eq!(jit.runner.label_names(), ["self-hosted", "linux"]);
    assert!(!jit.encoded_jit_config.expose_secret().is_empty());
    let runners = sim.runners();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].runner_group_id, 3);
    // A pool may name its own group.
    gh.generate_jit_config_in_group("grs-2", &labels(&["gpu"]), Some(9), None)
        .await
        .unwrap();
    let g: Vec<u64> = sim.runners().iter().map(|r| r.runner_group_id).collect();
    assert_eq!(g, [3, 9]);
    sim.shutdown().await;
}

#[tokio::test]
async fn installation_tokens_are_cached_until_close_to_expiry() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&app_config(&sim)).unwrap();
    for _ in 0..3 {
        gh.list_runners(None).await.unwrap();
    }
    assert_eq!(sim.token_mints(), 1);
    sim.shutdown().await;

    // Tokens that live less than the refresh margin are minted every call.
    let sim = self::sim(SimConfig {
        token_ttl: Duration::from_secs(240),
        ..SimConfig::default()
    })
    .await;
    let gh = GitHubClient::new(&app_config(&sim)).unwrap();
    gh.list_runners(None).await.unwrap();
    gh.list_runners(None).await.unwrap();
    assert_eq!(sim.token_mints(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_jwt_signed_by_another_key_is_refused() {
    let sim = sim(SimConfig::default()).await;
    let mut cfg = app_config(&sim);
    cfg.app.as_mut().unwrap().app_id = "9999".into();
    let gh = GitHubClient::new(&cfg).unwrap();
    let e = gh.list_runners(None).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_pat_works_at_repository_scope_and_ghes_style_base_urls() {
    let sim = sim(SimConfig::default()).await;
    let mut cfg = pat_config(&sim);
    cfg.api_url = format!("{}/api/v3/", sim.url());
    let gh = GitHubClient::new(&cfg).unwrap();
    assert_eq!(
        gh.scope(),
        &Scope::Repository {
            owner: "grs-sim".into(),
            name: "app".into()
        }
    );
    let t = gh.registration_token().await.unwrap();
    assert!(t.token.expose_secret().starts_with("AREG"));
    assert!(!format!("{t:?}").contains(t.token.expose_secret()));
    gh.generate_jit_config("grs-1", &labels(&["x"]), Some("_w"))
        .await
        .unwrap();
    assert_eq!(gh.list_runners(Some("grs-1")).await.unwrap().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn runners_are_listed_across_pages_and_deleted_idempotently() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    for i in 0..205 {
        gh.generate_jit_config(&format!("grs-{i}"), &labels(&["l"]), None)
            .await
            .unwrap();
    }
    let all = gh.list_runners(None).await.unwrap();
    assert_eq!(all.len(), 205);
    let one = gh.list_runners(Some("grs-7")).await.unwrap();
    assert_eq!(one.len(), 1);
    gh.delete_runner(one[0].id).await.unwrap();
    gh.delete_runner(one[0].id).await.unwrap(); // absent: still success
    assert_eq!(gh.list_runners(None).await.unwrap().len(), 204);
    assert_eq!(gh.remove_runner_by_name("grs-8").await.unwrap(), 1);
    assert_eq!(gh.remove_runner_by_name("grs-8").await.unwrap(), 0);
    assert_eq!(gh.list_runners(None).await.unwrap().len(), 203);
    sim.shutdown().await;
}

#[tokio::test]
async fn minting_again_for_the_same_name_replaces_a_stale_registration() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    let a = gh
        .generate_jit_config("grs-5", &labels(&["l"]), None)
        .await
        .unwrap();
    let b = gh
        .generate_jit_config("grs-5", &labels(&["l"]), None)
        .await
        .unwrap();
    assert_ne!(a.runner.id, b.runner.id);
    assert_eq!(sim.runners().len(), 1);
    // The first config is now useless; the second boots.
    assert!(
        sim.boot_runner(a.encoded_jit_config.expose_secret())
            .await
            .is_err()
    );
    sim.boot_runner(b.encoded_jit_config.expose_secret())
        .await
        .unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn a_job_status_tells_queued_from_taken() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    let job = sim.queue_job(NewJob::labels(["self-hosted"])).await;
    let j = gh.get_job("grs-sim/app", job.id).await.unwrap();
    assert!(j.is_queued());
    assert_eq!(j.id, job.id);
    assert!(job.id > u64::from(u32::MAX));
    sim.cancel_job(job.id).await;
    let j = gh.get_job("grs-sim/app", job.id).await.unwrap();
    assert_eq!(
        (j.status.as_str(), j.conclusion.as_deref()),
        ("completed", Some("cancelled"))
    );
    let e = gh.get_job("grs-sim/app", 1).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    sim.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured_then_the_call_succeeds() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    sim.inject(Fault::RateLimit {
        status: 429,
        retry_after: Some(1),
        reset_in: None,
    });
    let t = Instant::now();
    gh.list_runners(None).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    sim.shutdown().await;
}

#[tokio::test]
async fn an_exhausted_primary_limit_waits_for_the_reset() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    sim.inject(Fault::RateLimit {
        status: 403,
        retry_after: None,
        reset_in: Some(0),
    });
    let t = Instant::now();
    gh.list_runners(None).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wait_longer_than_allowed_fails_fast_with_rate_limited() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    sim.inject(Fault::RateLimit {
        status: 403,
        retry_after: Some(120),
        reset_in: None,
    });
    let t = Instant::now();
    let e = gh.list_runners(None).await.unwrap_err();
    assert!(
        matches!(e, GitHubError::RateLimited { retry_after } if retry_after == Duration::from_secs(120)),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    // A secondary limit with no headers backs off a minute: too long here.
    sim.inject(Fault::RateLimit {
        status: 403,
        retry_after: None,
        reset_in: None,
    });
    let e = gh.list_runners(None).await.unwrap_err();
    assert!(
        matches!(e, GitHubError::RateLimited { retry_after } if retry_after == Duration::from_secs(60)),
        "{e}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried() {
    let sim = sim(SimConfig::default()).await;
    let gh = GitHubClient::new(&pat_config(&sim)).unwrap();
    sim.inject(Fault::Status(502));
    sim.inject(Fault::Status(500));
    gh.list_runners(None).await.unwrap();
    sim.inject(Fault::Status(500));
    sim.inject(Fault::Status(500));
    sim.inject(Fault::Status(500));
    let e = gh.list_runners(None).await.unwrap_err();
    assert_eq!(e.status(), Some(500));
    sim.shutdown().await;
}

#[tokio::test]
async fn credentials_never_show_in_debug_or_errors() {
    let sim = sim(SimConfig::default()).await;
    let mut cfg = pat_config(&sim);
    cfg.token = Some(SecretString::from("ghp_wrong_token_value".to_owned()));
    assert!(!format!("{cfg:?}").contains("ghp_wrong_token_value"));
    let gh = GitHubClient::new(&cfg).unwrap();
    assert!(!format!("{gh:?}").contains("ghp_wrong"));
    let e = gh.list_runners(None).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(!e.to_string().contains("ghp_wrong"), "{e}");

    let app = app_config(&sim);
    assert!(!format!("{app:?}").contains("PRIVATE KEY"));
    let gh = GitHubClient::new(&app).unwrap();
    let jit = gh
        .generate_jit_config("grs-9", &labels(&["l"]), None)
        .await
        .unwrap();
    assert!(!format!("{jit:?}").contains(jit.encoded_jit_config.expose_secret()));
    sim.shutdown().await;
}

#[test]
fn bad_configuration_is_named() {
    let e = GitHubClient::new(&GitHubConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("github.organization"), "{e}");
    let e = GitHubClient::new(&GitHubConfig {
        repository: Some("no-slash".into()),
        ..GitHubConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("owner/name"), "{e}");
    let e = GitHubClient::new(&GitHubConfig {
        organization: Some("o".into()),
        ..GitHubConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("GRS_GITHUB_TOKEN"), "{e}");
    let e = GitHubClient::new(&GitHubConfig {
        organization: Some("o".into()),
        app: Some(GitHubAppConfig {
            app_id: "1".into(),
            installation_id: 2,
            private_key: Some(SecretString::from("not a key".to_owned())),
            private_key_file: None,
        }),
        ..GitHubConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("private_key") && !e.contains("not a key"), "{e}");
}

#[test]
fn the_github_section_loads_from_toml_and_env() {
    #[derive(serde::Deserialize, serde::Serialize, Default)]
    #[serde(default)]
    struct Top {
        github: GitHubConfig,
    }
    let file = grs_config::parse_file(
        std::path::Path::new("grs.toml"),
        "[github]\norganization = 'acme'\nmax_rate_limit_wait = '30s'\n[github.app]\napp_id = 'Iv1.abc'\ninstallation_id = 5\nprivate_key_file = '/etc/grs/app.pem'\n",
    )
    .unwrap();
    let c: Top = grs_config::load_from(
        Some(file),
        [
            (
                "GRS_GITHUB_API_URL".to_string(),
                "https://ghe.example/api/v3".to_string(),
            ),
            // Works because the file has a [github.app] table to land in.
            (
                "GRS_GITHUB_APP_PRIVATE_KEY".to_string(),
                "-----BEGIN RSA PRIVATE KEY-----".to_string(),
            ),
        ],
    )
    .unwrap();
    assert_eq!(c.github.api_url, "https://ghe.example/api/v3");
    assert_eq!(c.github.max_rate_limit_wait, Duration::from_secs(30));
    let app = c.github.app.unwrap();
    assert_eq!(app.installation_id, 5);
    assert!(app.private_key.is_some());
}

#[tokio::test]
async fn every_answer_reports_the_rate_limit_and_an_exhausted_limit_is_a_403() {
    let sim = sim(SimConfig {
        rate_limit: 3,
        rate_limit_window: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(String, u16, Option<u64>)>>);
    impl grs_github::ApiObserver for Seen {
        fn response(&self, endpoint: &str, status: u16, remaining: Option<u64>) {
            self.0
                .lock()
                .unwrap()
                .push((endpoint.into(), status, remaining));
        }
    }
    let seen = std::sync::Arc::new(Seen::default());
    let gh = GitHubClient::new(&GitHubConfig {
        max_rate_limit_wait: Duration::from_millis(1),
        ..pat_config(&sim)
    })
    .unwrap();
    assert!(gh.set_observer(seen.clone()));
    assert_eq!(gh.rate_limit(), None);
    gh.list_runners(None).await.unwrap();
    let rl = gh.rate_limit().unwrap();
    assert_eq!((rl.limit, rl.remaining), (3, 2));
    gh.list_runners(None).await.unwrap();
    gh.list_runners(None).await.unwrap();
    assert_eq!(sim.rate_limit_remaining(), 0);
    // The fourth waits for the reset, longer than allowed: RateLimited.
    let e = gh.list_runners(None).await.unwrap_err();
    assert!(matches!(e, GitHubError::RateLimited { .. }), "{e}");
    let calls = seen.0.lock().unwrap().clone();
    assert_eq!(calls.len(), 4);
    assert!(
        calls
            .iter()
            .all(|(e, ..)| e == "GET /repos/{owner}/{repo}/actions/runners"),
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        [
            (200, Some(2)),
            (200, Some(1)),
            (200, Some(0)),
            (403, Some(0))
        ]
    );
    // Once the window resets, calls go through again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    gh.list_runners(None).await.unwrap();
    sim.shutdown().await;
}
