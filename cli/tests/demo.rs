//! `grs demo` as a user runs it: the built binary as its own process, with
//! the whole system inside (PVE and GitHub simulators, control plane,
//! gateway, simulated VMs booting from cloud-init) on loopback sockets.

use std::process::Stdio;
use std::time::Duration;

use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn grs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_grs"));
    c.env_remove("RUST_LOG").kill_on_drop(true);
    c
}

#[tokio::test]
async fn twenty_jobs_complete_with_nothing_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        grs()
            // Time scale 0.2: jobs of 2–8 s. At faster scales on a loaded
            // machine, a job another job's VM took can complete before GRS
            // dispatches its own queue entry, which GRS does not handle yet:
            // the job whose VM was taken then never gets one (the summary's
            // `unfinished` names it).
            .args(["demo", "--jobs", "20", "--time-scale", "0.2", "-o", "json"])
            .arg("--log-file")
            .arg(&log)
            .output(),
    )
    .await
    .expect("the demo ends within 2 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let s: Value = serde_json::from_str(&stdout).expect("one JSON summary");
    for (key, want) in [
        ("jobs_requested", 20),
        ("jobs_queued", 20),
        ("jobs_completed", 20),
        ("vms_created", 20),
        ("vms_deleted", 20),
        ("runners_started", 20),
        ("leaked_vms", 0),
        ("leaked_runner_registrations", 0),
    ] {
        assert_eq!(s[key], want, "{key} in {s:#}");
    }
    assert_eq!(s["boot_failures"], Value::Array(vec![]), "{s:#}");
    assert_eq!(s["unfinished"], Value::Array(vec![]), "{s:#}");
    let stages = s["latencies"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    for stage in stages {
        assert_eq!(stage["count"], 20, "every job measured at {stage}");
        let (p50, p90, max) = (
            stage["p50_ms"].as_u64().unwrap(),
            stage["p90_ms"].as_u64().unwrap(),
            stage["max_ms"].as_u64().unwrap(),
        );
        assert!(p50 <= p90 && p90 <= max, "{stage}");
    }
    // The logs went to the file, not over the output.
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("control plane serving"), "{logs}");
    assert!(!stderr.contains("INFO"), "{stderr}");
}

/// `--nodes 3`: a template copy on each node, and every node clones.
#[tokio::test]
async fn with_three_nodes_every_node_clones_from_its_own_template_copy() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        grs()
            .args([
                "demo",
                "--jobs",
                "12",
                "--time-scale",
                "0.2",
                "--nodes",
                "3",
            ])
            .args(["-o", "json", "--log-file"])
            .arg(dir.path().join("demo.log"))
            .output(),
    )
    .await
    .expect("the demo ends within 2 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_str(&stdout).expect("one JSON summary");
    assert_eq!(s["jobs_completed"], 12, "{s:#}");
    assert_eq!(s["leaked_vms"], 0, "{s:#}");
    let per_node = s["vms_created_per_node"].as_object().expect("a map");
    assert_eq!(
        per_node.keys().collect::<Vec<_>>(),
        ["pve1", "pve2", "pve3"],
        "{s:#}"
    );
    let total: u64 = per_node.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(s["vms_created"], total, "{s:#}");
}

#[tokio::test]
async fn keep_running_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = grs()
        .args([
            "demo",
            "--jobs",
            "3",
            "--time-scale",
            "0.05",
            "--keep-running",
        ])
        .arg("--log-file")
        .arg(dir.path().join("demo.log"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut grpc, mut metrics, mut cp_metrics, mut printed) = (None, None, None, Vec::new());
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.trim().strip_prefix("control plane (gRPC)") {
                grpc = Some(url.trim().to_owned());
            }
            if let Some(url) = line.trim().strip_prefix("gateway metrics") {
                metrics = Some(url.trim().to_owned());
            }
            if let Some(url) = line.trim().strip_prefix("control-plane metrics") {
                cp_metrics = Some(url.trim().to_owned());
            }
            let up = line.contains("everything stays up");
            printed.push(line);
            if up {
                return;
            }
        }
        panic!("the demo ended early:\n{}", printed.join("\n"));
    })
    .await
    .unwrap_or_else(|_| panic!("no 'stays up' line within 60 s:\n{}", printed.join("\n")));
    let text = printed.join("\n");
    assert!(text.contains("result: OK"), "{text}");
    assert!(text.contains("grpcurl -plaintext"), "{text}");
    let grpc = grpc.unwrap_or_else(|| panic!("no gRPC address printed:\n{text}"));
    let metrics = metrics.unwrap_or_else(|| panic!("no metrics address printed:\n{text}"));

    // The live control plane answers over gRPC: the demo's jobs are there.
    let mut api = ControlPlaneClient::connect(grpc.clone()).await.unwrap();
    let jobs = api
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    assert!(
        jobs.iter().all(|j| j.state() == pb::JobState::Completed),
        "{jobs:?}"
    );
    let stats = api
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.pools.iter().all(|p| p.instances_in_use == 0),
        "{stats:?}"
    );
    // So does the CLI, as printed.
    let cli = grs()
        .args(["--server", &grpc, "-o", "json", "jobs", "list"])
        .output()
        .await
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let listed: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(3), "{listed}");
    // And the gateway's metrics counted the deliveries.
    let body = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    assert!(body.contains("grs_gateway_deliveries_total"), "{body}");
    // And the control plane's, the three VMs it made.
    let cp_metrics = cp_metrics.unwrap_or_else(|| panic!("no control-plane metrics:\n{text}"));
    let body = reqwest::get(&cp_metrics)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let creates: f64 = body
        .lines()
        .filter(|l| {
            l.starts_with("grs_provisioner_calls_total{")
                && l.contains(r#"kind="create""#)
                && l.contains(r#"outcome="ok""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(creates, 3.0, "{body}");

    // SIGTERM: a clean exit.
    let pid = child.id().expect("still running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
