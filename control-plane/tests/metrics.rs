//! The control plane's Prometheus metrics over a real socket: a job goes
//! through (fake provisioner), then `GET /metrics` shows its provisioner
//! calls, stage latencies, the pools, the queues, the reconciler's
//! leadership; and every metric the Grafana dashboard and the alert rules
//! in `deploy/` use is among them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use grs_control_plane::pools::{Pools, ProvisionerRegistry};
use grs_control_plane::store::MemoryStore;
use grs_control_plane::testing::{
    RunningControlPlane, control_plane, eventually, job_event, submit, test_config, wait_for_job,
    wait_for_no_instances_in_use,
};
use grs_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over plain HTTP/1.0; the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: grs\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_owned()
}

/// The value of the sample `series` (name and labels as printed).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn a_job_shows_in_the_metrics() {
    let mut config = test_config();
    let metrics_addr = free_port();
    config.control_plane.metrics_listen = Some(metrics_addr);
    config.control_plane.reconcile_interval = Duration::from_millis(200);
    // GitHub (the simulator) for the GitHub API metrics: the job below is
    // not one the simulator knows, so its status check answers 404 and the
    // job is provisioned unchecked.
    let github = grs_github::sim::GitHubSim::start(Default::default())
        .await
        .unwrap();
    config.github = Some(grs_github::GitHubConfig {
        api_url: github.url(),
        organization: Some("octo-org".into()),
        token: Some(secrecy::SecretString::from(
            "ghp_simulated_personal_access_token".to_owned(),
        )),
        ..Default::default()
    });
    config.validate().unwrap();
    let registry =
        ProvisionerRegistry::new().with("fake", grs_control_plane::pools::fake_factory());
    let pools = Pools::from_config(&config, &registry).unwrap();
    let cp = RunningControlPlane::start(control_plane(config, Arc::new(MemoryStore::new()), pools))
        .await;
    let mut api = cp.client().await;

    let before = scrape(metrics_addr).await;
    assert_eq!(value(&before, "grs_store_up"), Some(1.0), "{before}");
    assert_eq!(
        value(&before, r#"grs_pool_max_instances{pool="linux"}"#),
        Some(3.0)
    );

    // One job, queued then completed on its instance.
    submit(&mut api, job_event("d1", pb::JobAction::Queued, 7)).await;
    let job = wait_for_job(&api, 7, pb::JobState::Provisioned, Duration::from_secs(10)).await;
    let during = scrape(metrics_addr).await;
    assert_eq!(
        value(&during, r#"grs_jobs{pool="linux",state="provisioned"}"#),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        value(&during, r#"grs_instances{pool="linux",state="running"}"#),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        value(&during, r#"grs_pool_instances_in_use{pool="linux"}"#),
        Some(1.0)
    );
    // Its runner takes it, runs it, completes it.
    let mut started = job_event("d2", pb::JobAction::InProgress, 7);
    started.runner_name = job.instance_name.clone();
    submit(&mut api, started).await;
    let mut done = job_event("d3", pb::JobAction::Completed, 7);
    done.runner_name = job.instance_name.clone();
    submit(&mut api, done).await;
    wait_for_no_instances_in_use(&api, Duration::from_secs(10)).await;

    let after = eventually("the leader and the stages counted", Duration::from_secs(10), || async {
        let body = scrape(metrics_addr).await;
        let ready = value(&body, "grs_reconciler_leader") == Some(1.0)
            && value(
                &body,
                r#"grs_stage_duration_seconds_count{pool="linux",stage="completed_to_deleted"}"#,
            ) == Some(1.0);
        ready.then_some(body)
    })
    .await;
    for (series, want) in [
        (
            r#"grs_provisioner_calls_total{backend="fake",kind="create",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"grs_provisioner_calls_total{backend="fake",kind="delete",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"grs_provisioner_call_duration_seconds_count{backend="fake",kind="create"}"#,
            1.0,
        ),
        (
            r#"grs_stage_duration_seconds_count{pool="linux",stage="queued_to_running"}"#,
            1.0,
        ),
        (r#"grs_jobs{pool="linux",state="provisioned"}"#, 0.0),
        (r#"grs_instances{pool="linux",state="running"}"#, 0.0),
        (r#"grs_pool_instances_in_use{pool="linux"}"#, 0.0),
        (r#"grs_queue_depth{queue="teardown"}"#, 0.0),
        (
            r#"grs_reconciler_actions_total{kind="orphan_deleted"}"#,
            0.0,
        ),
        (
            r#"grs_github_api_calls_total{endpoint="GET /repos/{owner}/{repo}/actions/jobs/{id}",status="404"}"#,
            1.0,
        ),
        (
            r#"grs_github_job_status_checks_total{outcome="unchecked"}"#,
            1.0,
        ),
        (r#"grs_foreign_events_total"#, 0.0),
    ] {
        assert_eq!(value(&after, series), Some(want), "{series} in\n{after}");
    }
    let remaining = value(&after, "grs_github_rate_limit_remaining").unwrap_or(-1.0);
    assert!(
        remaining > 0.0 && remaining < 5000.0,
        "the simulator's x-ratelimit-remaining: {remaining}"
    );
    cp.shutdown().await.unwrap();
    github.shutdown().await;
    dashboard_and_alerts_use_only(&after);
}

/// Metric names used by a dashboard or rules file: every `grs_…` word.
fn names_used(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("grs_") {
        let word: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // Preceded by a letter: part of another word.
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(word.clone());
        }
        rest = &rest[i + word.len()..];
    }
    names
}

/// Every metric `deploy/grafana/grs.json` and `deploy/prometheus/alerts.yml`
/// use is declared in `body` (a scrape after a job went through, so every
/// family has samples).
fn dashboard_and_alerts_use_only(body: &str) {
    // Declared families (a histogram or counter without samples yet still
    // has its `# TYPE` line).
    let families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for file in ["deploy/grafana/grs.json", "deploy/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let used = names_used(&text);
        assert!(!used.is_empty(), "{file} uses no grs_ metric");
        for name in used {
            let family = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                families.contains(&family),
                "{file} uses {name}, which the control plane does not export"
            );
        }
    }
}
