//! The `grs-webhook-gateway` binary: config errors exit 64 naming the key;
//! it serves, logs why it refuses, never logs secrets or bootstrap tokens,
//! and stops cleanly on SIGTERM.

#[path = "support/fake_control_plane.rs"]
mod fake;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_grs-webhook-gateway");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("GRS_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

#[test]
fn a_missing_webhook_secret_exits_64_naming_the_key() {
    let out = clean_env(&mut Command::new(BIN)).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.webhook_secret") && err.contains("GRS_WEBHOOK_SECRET"),
        "{err}"
    );
}

#[test]
fn a_bad_value_exits_64_naming_the_key_and_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("grs.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nlisten = '127.0.0.1:0'\n[redis]\nurl = 'redis://x'\n",
    )
    .unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .arg("--config")
        .arg(&cfg)
        .env("GRS_WEBHOOK_SECRET", "s")
        .env("GRS_GATEWAY_MAX_BODY_BYTES", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.max_body_bytes") && err.contains("GRS_GATEWAY_MAX_BODY_BYTES"),
        "{err}"
    );

    std::fs::write(&cfg, "[gateway]\nlisten_on = '127.0.0.1:0'\n").unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .arg("--config")
        .arg(&cfg)
        .env("GRS_WEBHOOK_SECRET", "s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_on"));
}

#[tokio::test]
async fn it_serves_logs_reasons_not_secrets_and_stops_on_sigterm() {
    let cp = fake::FakeControlPlane::default().serve().await;
    let token = "c2VjcmV0LWJvb3RzdHJhcC10b2tlbi0xMjM0NQ";
    cp.fake.add_bootstrap(
        token,
        grs_proto::v1::BootstrapDocument::UserData,
        "#cloud-config\n",
        "text/cloud-config",
    );
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, "file-secret-value\n").unwrap();
    let mut child = clean_env(&mut Command::new(BIN))
        .env("GRS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("GRS_GATEWAY_CONTROL_PLANE_URL", cp.url())
        .env("GRS_GATEWAY_WEBHOOK_SECRET_FILE", &secret_file)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = br#"{"action":"queued","workflow_job":{"id":42,"labels":["x"]},"repository":{"full_name":"o/r"}}"#.to_vec();
    let sig = grs_github::signature::sign(b"file-secret-value", &body);
    let send = |sig: String, id: &'static str| {
        http.post(format!("{base}/webhook"))
            .header("content-type", "application/json")
            .header("x-github-event", "workflow_job")
            .header("x-github-delivery", id)
            .header("x-hub-signature-256", sig)
            .body(body.clone())
            .send()
    };
    assert_eq!(send(sig, "ok-1").await.unwrap().status(), 202);
    assert_eq!(
        send("sha256=00".into(), "bad-1").await.unwrap().status(),
        401
    );
    assert_eq!(
        http.get(format!("{base}/cloud-init/{token}/user-data"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/cloud-init/{token}x/user-data"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("job event accepted"), "{logs}");
    assert!(
        logs.contains("bad-1") && logs.contains("malformed X-Hub-Signature-256"),
        "{logs}"
    );
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(
        !logs.contains("file-secret-value"),
        "secret in logs:\n{logs}"
    );
    assert!(!logs.contains(token), "bootstrap token in logs:\n{logs}");
    cp.stop().await;
}
