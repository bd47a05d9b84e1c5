//! The gateway over real sockets: GitHub-shaped deliveries in, a scripted
//! fake control plane behind.

#[path = "support/fake_control_plane.rs"]
mod fake;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fake::{FakeControlPlane, Running};
use grs_github::signature::sign;
use grs_proto::v1 as pb;
use grs_webhook_gateway::{GatewayConfig, ResolvedSecrets};
use secrecy::SecretString;

const SECRET: &str = "It's a Secret to Everybody";

struct Gateway {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), grs_webhook_gateway::GatewayError>>,
}

impl Gateway {
    async fn start(
        cp_url: &str,
        tweak: impl FnOnce(&mut GatewayConfig, &mut ResolvedSecrets),
    ) -> Self {
        let mut cfg = GatewayConfig {
            control_plane_url: cp_url.into(),
            ..GatewayConfig::default()
        };
        let mut secrets = ResolvedSecrets {
            webhook_secret: SecretString::from(SECRET.to_owned()),
            auth_token: None,
            tls_ca_pem: None,
        };
        tweak(&mut cfg, &mut secrets);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(grs_webhook_gateway::run_with(cfg, secrets, l, async {
            let _ = rx.await;
        }));
        Self {
            url,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/github/payloads")
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap()
}

struct Delivery<'a> {
    event: &'a str,
    id: &'a str,
    body: Vec<u8>,
    content_type: &'a str,
    signature: Option<String>,
}

impl<'a> Delivery<'a> {
    fn signed(event: &'a str, id: &'a str, body: Vec<u8>) -> Self {
        let signature = Some(sign(SECRET.as_bytes(), &body));
        Self {
            event,
            id,
            body,
            content_type: "application/json",
            signature,
        }
    }
}

async fn post(gw: &Gateway, d: Delivery<'_>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/webhook", gw.url))
        .header("content-type", d.content_type)
        .header("user-agent", "GitHub-Hookshot/test")
        .body(d.body);
    if !d.event.is_empty() {
        req = req.header("x-github-event", d.event);
    }
    if !d.id.is_empty() {
        req = req.header("x-github-delivery", d.id);
    }
    if let Some(s) = d.signature {
        req = req.header("x-hub-signature-256", s);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The gateway's `/metrics` page.
async fn metrics_text(gw: &Gateway) -> String {
    reqwest::get(format!("{}/metrics", gw.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn setup() -> (Running, Gateway) {
    let cp = FakeControlPlane::default().serve().await;
    let gw = Gateway::start(&cp.url(), |_, _| {}).await;
    (cp, gw)
}

#[tokio::test]
async fn a_signed_queued_job_is_submitted_and_answered_202() {
    let (cp, gw) = setup().await;
    let body = fixture("octokit-webhooks/workflow_job/queued.with-deployment.payload.json");
    let (status, _) = post(&gw, Delivery::signed("workflow_job", "d-1", body)).await;
    assert_eq!(status, 202);
    let got = cp.fake.accepted();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery_id, "d-1");
    assert_eq!(got[0].job_id, 12_877_621_891);
    assert_eq!(got[0].action, pb::JobAction::Queued as i32);
    assert_eq!(got[0].labels, ["self-hosted", "k8s"]);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn every_fixture_job_goes_through_with_its_job_id() {
    let (cp, gw) = setup().await;
    let mut expected = Vec::new();
    for dir in ["octokit-webhooks/workflow_job", "third_party"] {
        let mut files: Vec<_> = std::fs::read_dir(fixtures().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for (i, f) in files.iter().enumerate() {
            if f.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let body = std::fs::read(f).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let id = format!("{dir}-{i}");
            let (status, _) = post(&gw, Delivery::signed("workflow_job", &id, body)).await;
            assert_eq!(status, 202, "{}", f.display());
            expected.push(v["workflow_job"]["id"].as_u64().unwrap());
        }
    }
    let got: Vec<u64> = cp.fake.accepted().iter().map(|e| e.job_id).collect();
    assert_eq!(got, expected);
    assert_eq!(got.len(), 11);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_signatures_are_401_and_reach_nothing() {
    let (cp, gw) = setup().await;
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    let mut d = Delivery::signed("workflow_job", "d-1", body.clone());
    d.signature = None;
    assert_eq!(post(&gw, d).await.0, 401);
    let mut d = Delivery::signed("workflow_job", "d-2", body.clone());
    d.signature = Some(sign(b"another secret", &body));
    assert_eq!(post(&gw, d).await.0, 401);
    let mut d = Delivery::signed("workflow_job", "d-3", body.clone());
    d.signature = Some("sha1=0123".into());
    assert_eq!(post(&gw, d).await.0, 401);
    assert_eq!(cp.fake.state.lock().unwrap().calls, 0);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn bad_input_gets_its_status_and_never_reaches_the_control_plane() {
    let (cp, gw) = setup().await;
    let full = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    let long_id = "x".repeat(200);
    let labels: Vec<String> = (0..10_000).map(|i| format!("label-{i}")).collect();
    let cases: Vec<(&str, Delivery, u16)> =
        vec![
        (
            "invalid JSON",
            Delivery::signed("workflow_job", "b1", b"{not json".to_vec()),
            400,
        ),
        (
            "truncated body",
            Delivery::signed("workflow_job", "b2", full[..full.len() - 100].to_vec()),
            400,
        ),
        (
            "no workflow_job.id",
            Delivery::signed(
                "workflow_job",
                "b3",
                br#"{"action":"queued","workflow_job":{"labels":["x"]}}"#.to_vec(),
            ),
            400,
        ),
        (
            "enormous label list",
            Delivery::signed(
                "workflow_job",
                "b4",
                serde_json::to_vec(
                    &serde_json::json!({"action":"queued","workflow_job":{"id":5,"labels":labels}}),
                )
                .unwrap(),
            ),
            400,
        ),
        (
            "no delivery id",
            Delivery::signed("workflow_job", "", full.clone()),
            400,
        ),
        ("no event", Delivery::signed("", "b6", full.clone()), 400),
        ("delivery id too long", Delivery::signed("workflow_job", &long_id, full.clone()), 400),
        (
            "wrong content type",
            Delivery {
                content_type: "text/xml",
                ..Delivery::signed("workflow_job", "b7", full.clone())
            },
            415,
        ),
        (
            "unknown event",
            Delivery::signed("push", "b8", br#"{"ref":"x"}"#.to_vec()),
            204,
        ),
        (
            "unknown action",
            Delivery::signed(
                "workflow_job",
                "b9",
                br#"{"action":"requested","workflow_job":{"id":5}}"#.to_vec(),
            ),
            204,
        ),
    ];
    for (what, d, want) in cases {
        assert_eq!(post(&gw, d).await.0, want, "{what}");
    }
    assert_eq!(cp.fake.state.lock().unwrap().calls, 0);
    let metrics = metrics_text(&gw).await;
    assert!(
        metrics.contains(
            r#"grs_gateway_deliveries_total{event="workflow_job",outcome="bad_request"} 6"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="unsupported_media_type"} 1"#),
        "{metrics}"
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn bodies_above_the_limit_are_413() {
    let cp = FakeControlPlane::default().serve().await;
    let gw = Gateway::start(&cp.url(), |_, _| {}).await;
    let big = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "big", big))
            .await
            .0,
        413
    );
    gw.stop().await;
    let gw = Gateway::start(&cp.url(), |c, _| c.max_body_bytes = 4096).await;
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    assert!(body.len() > 4096);
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "big2", body))
            .await
            .0,
        413
    );
    assert_eq!(cp.fake.state.lock().unwrap().calls, 0);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn pings_are_200_as_json_and_form_encoded() {
    let (cp, gw) = setup().await;
    let (status, body) = post(
        &gw,
        Delivery::signed("ping", "p1", fixture("octokit-webhooks/ping/payload.json")),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "pong\n"));
    let v: serde_json::Value = serde_json::from_slice(&fixture(
        "rest-api-description/ping-form-encoded.example.json",
    ))
    .unwrap();
    let form = format!("payload={}", v["value"]["payload"].as_str().unwrap()).into_bytes();
    let d = Delivery {
        content_type: "application/x-www-form-urlencoded",
        ..Delivery::signed("ping", "p2", form)
    };
    assert_eq!(post(&gw, d).await.0, 200);
    assert_eq!(cp.fake.state.lock().unwrap().calls, 0);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_replayed_delivery_is_200_and_recorded_once() {
    let (cp, gw) = setup().await;
    let body = fixture("octokit-webhooks/workflow_job/waiting.payload.json");
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "same", body.clone()))
            .await
            .0,
        202
    );
    let (status, text) = post(&gw, Delivery::signed("workflow_job", "same", body)).await;
    assert_eq!((status, text.as_str()), (200, "duplicate delivery\n"));
    assert_eq!(cp.fake.accepted().len(), 1);
    assert_eq!(cp.fake.state.lock().unwrap().calls, 2);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn an_unreachable_control_plane_is_503_well_inside_ten_seconds() {
    // A port bound but not listening, held for the whole test: connecting
    // is refused. (A port bound and released before could be taken by a
    // server of another test running alongside, which answered; CI saw
    // 500 instead of 503 once.)
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = held.local_addr().unwrap().port();
    let gw = Gateway::start(&format!("http://127.0.0.1:{port}"), |_, _| {}).await;
    let t = Instant::now();
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "u1", body))
            .await
            .0,
        503
    );
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let metrics = metrics_text(&gw).await;
    assert!(
        metrics.contains(
            r#"grs_gateway_control_plane_errors_total{rpc="SubmitJobEvents",code="Unavailable"} 1"#
        ),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn control_plane_errors_map_to_503_400_and_a_slow_one_times_out() {
    let cp = FakeControlPlane::default().serve().await;
    let gw = Gateway::start(&cp.url(), |c, _| {
        c.control_plane_timeout = Duration::from_millis(300)
    })
    .await;
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    cp.fake.fail_next(tonic::Status::unavailable("redis down"));
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "e1", body.clone()))
            .await
            .0,
        503
    );
    cp.fake.fail_next(tonic::Status::invalid_argument("job_id"));
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "e2", body.clone()))
            .await
            .0,
        400
    );
    cp.fake.fail_next(tonic::Status::internal("bug"));
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "e3", body.clone()))
            .await
            .0,
        500
    );
    cp.fake.set_delay(Some(Duration::from_secs(2)));
    let t = Instant::now();
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "e4", body.clone()))
            .await
            .0,
        503
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    cp.fake.set_delay(None);
    // Once it recovers, GitHub's redelivery of a failed delivery goes through.
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "e1", body))
            .await
            .0,
        202
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn the_bearer_token_is_sent_to_the_control_plane() {
    let cp = FakeControlPlane {
        require_token: Some("cp-token".into()),
        ..Default::default()
    }
    .serve()
    .await;
    let gw = Gateway::start(&cp.url(), |_, s| {
        s.auth_token = Some(SecretString::from("cp-token".to_owned()))
    })
    .await;
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "t1", body.clone()))
            .await
            .0,
        202
    );
    gw.stop().await;
    // Without it the control plane refuses; GitHub sees a failure.
    let gw = Gateway::start(&cp.url(), |_, _| {}).await;
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "t2", body))
            .await
            .0,
        500
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn healthz_and_metrics_answer() {
    let (cp, gw) = setup().await;
    let r = reqwest::get(format!("{}/healthz", gw.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    post(
        &gw,
        Delivery::signed(
            "workflow_job",
            "m1",
            fixture("octokit-webhooks/workflow_job/queued.payload.json"),
        ),
    )
    .await;
    let m = metrics_text(&gw).await;
    assert!(
        m.contains(r#"grs_gateway_deliveries_total{event="workflow_job",outcome="accepted"} 1"#),
        "{m}"
    );
    assert!(
        m.contains("grs_gateway_delivery_duration_seconds_count 1"),
        "{m}"
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn cloud_init_documents_are_served_for_a_known_token_and_404_otherwise() {
    let (cp, gw) = setup().await;
    let token = "Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4OTA";
    cp.fake.add_bootstrap(
        token,
        pb::BootstrapDocument::UserData,
        "#cloud-config\n",
        "text/cloud-config",
    );
    cp.fake.add_bootstrap(
        token,
        pb::BootstrapDocument::MetaData,
        "instance-id: grs-1\n",
        "text/plain",
    );
    let get = |path: String| async move { reqwest::get(path).await.unwrap() };
    let r = get(format!("{}/cloud-init/{token}/user-data", gw.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/cloud-config");
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.text().await.unwrap(), "#cloud-config\n");
    assert_eq!(
        get(format!("{}/cloud-init/{token}/meta-data", gw.url))
            .await
            .status(),
        200
    );

    let unknown = get(format!(
        "{}/cloud-init/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/user-data",
        gw.url
    ))
    .await;
    assert_eq!(unknown.status(), 404);
    let unknown_body = unknown.text().await.unwrap();
    // Same answer for a document the token lacks: no hint which part failed.
    let missing_doc = get(format!("{}/cloud-init/{token}/vendor-data", gw.url)).await;
    assert_eq!(missing_doc.status(), 404);
    assert_eq!(missing_doc.text().await.unwrap(), unknown_body);
    assert_eq!(
        get(format!("{}/cloud-init/{token}/passwd", gw.url))
            .await
            .status(),
        404
    );
    let asked = cp.fake.state.lock().unwrap().tokens_asked.len();
    // A malformed token never reaches the control plane.
    assert_eq!(
        get(format!("{}/cloud-init/..%2F..%2Fetc/user-data", gw.url))
            .await
            .status(),
        404
    );
    assert_eq!(cp.fake.state.lock().unwrap().tokens_asked.len(), asked);

    cp.fake.fail_next(tonic::Status::unavailable("redis down"));
    assert_eq!(
        get(format!("{}/cloud-init/{token}/user-data", gw.url))
            .await
            .status(),
        503
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn shutdown_answers_requests_in_flight_first() {
    let (cp, gw) = setup().await;
    cp.fake.set_delay(Some(Duration::from_millis(400)));
    let url = gw.url.clone();
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");
    let sig = sign(SECRET.as_bytes(), &body);
    let inflight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/webhook"))
            .header("content-type", "application/json")
            .header("x-github-event", "workflow_job")
            .header("x-github-delivery", "s1")
            .header("x-hub-signature-256", sig)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.stop().await;
    assert_eq!(inflight.await.unwrap(), 202);
    assert_eq!(cp.fake.accepted().len(), 1);
    cp.stop().await;
}

#[tokio::test]
async fn a_stalled_upload_is_cut_off_at_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cp, _) = (FakeControlPlane::default().serve().await, ());
    let gw = Gateway::start(&cp.url(), |c, _| {
        c.control_plane_timeout = Duration::from_millis(200);
        c.request_timeout = Duration::from_millis(500);
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    // Promise 1000 bytes, send 10, then stall.
    s.write_all(b"POST /webhook HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-github-event: workflow_job\r\nx-github-delivery: slow\r\ncontent-length: 1000\r\n\r\n{\"action\":").await.unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(cp.fake.state.lock().unwrap().calls, 0);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn the_control_plane_can_be_reached_over_tls_with_a_ca_file() {
    let cert = rcgen::generate_simple_self_signed(vec!["grs-control-plane".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let cp = FakeControlPlane::default()
        .serve_tls(&cert_pem, &key_pem)
        .await;
    let url = format!("https://{}", cp.addr);
    let body = fixture("octokit-webhooks/workflow_job/queued.payload.json");

    let ca = cert_pem.clone().into_bytes();
    let gw = Gateway::start(&url, |c, s| {
        c.tls_domain = Some("grs-control-plane".into());
        s.tls_ca_pem = Some(ca);
    })
    .await;
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "tls-1", body.clone()))
            .await
            .0,
        202
    );
    gw.stop().await;

    // A certificate for another name is refused: the gateway answers 503.
    let ca = cert_pem.into_bytes();
    let gw = Gateway::start(&url, |c, s| {
        c.tls_domain = Some("someone-else".into());
        s.tls_ca_pem = Some(ca);
    })
    .await;
    assert_eq!(
        post(&gw, Delivery::signed("workflow_job", "tls-2", body))
            .await
            .0,
        503
    );
    gw.stop().await;
    assert_eq!(cp.fake.accepted().len(), 1);
    cp.stop().await;
}

/// The queued fixture with `workflow_job.id` set to `id`.
fn queued_job(id: u64) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&fixture(
        "octokit-webhooks/workflow_job/queued.payload.json",
    ))
    .unwrap();
    v["workflow_job"]["id"] = id.into();
    serde_json::to_vec(&v).unwrap()
}

/// Posts deliveries `first..first + n` (job ids and delivery ids alike) at
/// once; their statuses by job id.
async fn post_many(gw: &Gateway, first: u64, n: u64) -> Vec<(u64, u16)> {
    let posts = (first..first + n).map(|id| async move {
        let d = id.to_string();
        (
            id,
            post(gw, Delivery::signed("workflow_job", &d, queued_job(id)))
                .await
                .0,
        )
    });
    futures::future::join_all(posts).await
}

#[tokio::test]
async fn deliveries_arriving_while_a_call_is_in_flight_share_the_next_call() {
    let cp = FakeControlPlane::default().serve().await;
    // One sender, and a slow control plane: the first delivery's call is
    // in flight while the others arrive.
    cp.fake.set_delay(Some(Duration::from_millis(300)));
    let gw = Gateway::start(&cp.url(), |c, _| c.control_plane_connections = 1).await;
    let first = tokio::spawn({
        let url = gw.url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/webhook"))
                .header("content-type", "application/json")
                .header("x-github-event", "workflow_job")
                .header("x-github-delivery", "1")
                .header(
                    "x-hub-signature-256",
                    sign(SECRET.as_bytes(), &queued_job(1)),
                )
                .body(queued_job(1))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rest = post_many(&gw, 2, 30).await;
    assert_eq!(first.await.unwrap(), 202);
    assert!(rest.iter().all(|(_, s)| *s == 202), "{rest:?}");
    let mut ids: Vec<u64> = cp.fake.accepted().iter().map(|e| e.job_id).collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=31).collect::<Vec<_>>(),
        "each event recorded once"
    );
    let batches = cp.fake.state.lock().unwrap().batches.clone();
    assert_eq!(batches.iter().sum::<usize>(), 31, "{batches:?}");
    assert_eq!(batches[0], 1, "the first delivery went out alone, at once");
    assert!(
        batches.len() <= 3,
        "30 deliveries arriving during one call take at most two more calls: {batches:?}"
    );
    let metrics = metrics_text(&gw).await;
    assert!(
        metrics.contains(&format!(
            "grs_gateway_submit_batch_size_count {}",
            batches.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("grs_gateway_submit_batch_size_sum 31.0"),
        "{metrics}"
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn an_event_refused_inside_a_batch_fails_only_its_own_delivery() {
    let hook: fake::SubmitHook = std::sync::Arc::new(|ev: pb::JobEvent| {
        Box::pin(async move {
            match ev.job_id {
                13 => Err(tonic::Status::invalid_argument("event.labels is bad")),
                14 => Err(tonic::Status::unavailable("store unavailable")),
                _ => Ok(()),
            }
        })
    });
    let fake = FakeControlPlane {
        hook: Some(hook),
        ..FakeControlPlane::default()
    };
    let cp = fake.serve().await;
    cp.fake.set_delay(Some(Duration::from_millis(200)));
    let gw = Gateway::start(&cp.url(), |c, _| c.control_plane_connections = 1).await;
    let statuses = post_many(&gw, 10, 8).await;
    for (id, status) in &statuses {
        let want = match id {
            13 => 400,
            14 => 503,
            _ => 202,
        };
        assert_eq!(*status, want, "job {id}: {statuses:?}");
    }
    let mut ids: Vec<u64> = cp.fake.accepted().iter().map(|e| e.job_id).collect();
    ids.sort();
    assert_eq!(ids, vec![10, 11, 12, 15, 16, 17]);
    assert!(
        cp.fake.state.lock().unwrap().batches.iter().any(|&n| n > 1),
        "the refused events shared a call with accepted ones"
    );
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_control_plane_without_submit_job_events_is_sent_single_calls() {
    let fake = FakeControlPlane {
        batch_unimplemented: true,
        ..FakeControlPlane::default()
    };
    let cp = fake.serve().await;
    let gw = Gateway::start(&cp.url(), |_, _| {}).await;
    let statuses = post_many(&gw, 100, 12).await;
    assert!(statuses.iter().all(|(_, s)| *s == 202), "{statuses:?}");
    let (ids, single_calls) = {
        let st = cp.fake.state.lock().unwrap();
        let mut ids: Vec<u64> = st.accepted.iter().map(|e| e.job_id).collect();
        ids.sort();
        (ids, st.single_calls)
    };
    assert_eq!(
        ids,
        (100..112).collect::<Vec<_>>(),
        "nothing lost in the switch"
    );
    assert_eq!(single_calls, 12);
    gw.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn a_batch_stops_growing_at_about_a_mebibyte() {
    let cp = FakeControlPlane::default().serve().await;
    cp.fake.set_delay(Some(Duration::from_millis(300)));
    let gw = Gateway::start(&cp.url(), |c, _| c.control_plane_connections = 1).await;
    // Jobs with the most labels GitHub allows, each label as long as the
    // gateway accepts: ~25 KB per event, so 60 of them (~1.5 MB) cannot go
    // in one call.
    let big_job = |id: u64| {
        let mut v: serde_json::Value = serde_json::from_slice(&queued_job(id)).unwrap();
        v["workflow_job"]["labels"] = (0..grs_proto::MAX_LABELS)
            .map(|i| format!("{i:03}{}", "x".repeat(grs_proto::MAX_FIELD_LEN - 3)))
            .collect::<Vec<_>>()
            .into();
        serde_json::to_vec(&v).unwrap()
    };
    let posts = (1..=60u64).map(|id| {
        let body = big_job(id);
        let gw = &gw;
        async move {
            if id > 1 {
                // The first goes out alone; the rest queue behind it.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let d = id.to_string();
            post(gw, Delivery::signed("workflow_job", &d, body)).await.0
        }
    });
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    assert_eq!(cp.fake.accepted().len(), 60);
    let batches = cp.fake.state.lock().unwrap().batches.clone();
    assert_eq!(batches.iter().sum::<usize>(), 60, "{batches:?}");
    let largest = batches.iter().max().copied().unwrap_or(0);
    assert!(
        (2..=43).contains(&largest),
        "59 queued events of ~25 KB split by size, not sent as one: {batches:?}"
    );
    gw.stop().await;
    cp.stop().await;
}
