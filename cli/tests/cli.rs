//! The `grs` CLI against a real control plane: memory store, one fake pool
//! `linux` (labels self-hosted/linux/x64), served on 127.0.0.1:0 over a real
//! socket. Commands run in process through `grs::run` (output captured), and
//! as the built binary where the exit code and stderr are the point.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grs::{Cli, CliError};
use grs_control_plane::config::{Config, PoolConfig, ProvisionerConfig, StoreKind};
use grs_control_plane::pools::{Pools, ProvisionerRegistry, fake_factory};
use grs_control_plane::server::{self, ControlPlane};
use grs_control_plane::store::MemoryStore;
use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use serde_json::Value;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const LABELS: [&str; 3] = ["self-hosted", "linux", "x64"];

/// How a test's control plane is set up.
#[derive(Default)]
struct Setup {
    /// The server requires this bearer token.
    token: Option<&'static str>,
    /// Pool `linux` starts paused: jobs stay queued, no instance starts.
    paused: bool,
    /// Serve TLS with this certificate and key (PEM files).
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A running control plane; stopped when dropped.
struct Server {
    url: String,
    addr: SocketAddr,
    token: Option<&'static str>,
    api: Option<ControlPlaneClient<Channel>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(setup: Setup) -> Server {
    let mut config = Config::default();
    config.control_plane.store = StoreKind::Memory;
    config.control_plane.auth_token = setup.token.map(|t| t.to_owned().into());
    config.control_plane.shutdown_grace = Duration::from_millis(200);
    config.control_plane.dispatchers_per_pool = 1;
    config.control_plane.teardown_workers = 1;
    config.control_plane.gateway_url = None;
    if let Some((cert, key)) = &setup.tls {
        config.control_plane.tls_cert_file = Some(cert.clone());
        config.control_plane.tls_key_file = Some(key.clone());
    }
    config.pools.insert(
        "linux".into(),
        PoolConfig {
            labels: LABELS.iter().map(|l| l.to_string()).collect(),
            max_instances: 4,
            paused: setup.paused,
            provisioner: Some(ProvisionerConfig::fake()),
            ..PoolConfig::default()
        },
    );
    config.validate().expect("valid test configuration");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = ProvisionerRegistry::new().with("fake", fake_factory());
    let pools = Pools::from_config(&config, &registry).expect("test pools are valid");
    let tls = config.control_plane.tls_cert_file.is_some();
    let cp = ControlPlane {
        config,
        store: Arc::new(MemoryStore::new()),
        pools,
        registrar: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server::run(cp, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("control plane runs");
    });
    let (url, api) = if tls {
        (format!("https://127.0.0.1:{}", addr.port()), None)
    } else {
        let url = format!("http://127.0.0.1:{}", addr.port());
        let api = ControlPlaneClient::connect(url.clone()).await.unwrap();
        (url, Some(api))
    };
    Server {
        url,
        addr,
        token: setup.token,
        api,
        stop: Some(stop),
    }
}

impl Server {
    /// A gRPC request carrying the server's token, as the gateway sends it.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = self.token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    }

    /// Submits one `workflow_job` event, as the webhook gateway would.
    async fn submit(&self, action: pb::JobAction, job_id: u64, labels: &[&str]) -> pb::Job {
        let event = pb::JobEvent {
            delivery_id: format!("delivery-{job_id}-{}", action.as_str_name()),
            action: action as i32,
            job_id,
            run_id: job_id * 10,
            run_attempt: 1,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            repository: "octo/widgets".into(),
            organization: "octo".into(),
            job_name: "build".into(),
            workflow_name: "CI".into(),
            ..Default::default()
        };
        let req = self.request(pb::SubmitJobEventRequest { event: Some(event) });
        let mut api = self.api.clone().expect("plaintext server");
        api.submit_job_event(req)
            .await
            .expect("event accepted")
            .into_inner()
            .job
            .expect("job recorded")
    }

    async fn queue(&self, job_id: u64) -> pb::Job {
        self.submit(pb::JobAction::Queued, job_id, &LABELS).await
    }

    async fn pool(&self, name: &str) -> pb::Pool {
        let req = self.request(pb::GetPoolRequest { name: name.into() });
        let mut api = self.api.clone().expect("plaintext server");
        api.get_pool(req).await.unwrap().into_inner()
    }

    async fn instances(&self, include_deleted: bool) -> Vec<pb::Instance> {
        let req = self.request(pb::ListInstancesRequest {
            pool: String::new(),
            include_deleted,
        });
        let mut api = self.api.clone().expect("plaintext server");
        api.list_instances(req)
            .await
            .unwrap()
            .into_inner()
            .instances
    }

    /// Waits until instance `name` is in `state`.
    async fn wait_instance(&self, name: &str, state: pb::InstanceState) {
        for _ in 0..200 {
            let found = self.instances(true).await;
            if found
                .iter()
                .any(|i| i.name == name && i.state == state as i32)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "instance {name} never reached {state:?}: {:?}",
            self.instances(true).await
        );
    }

    /// `grs --server <url> <args>` in process; its stdout.
    async fn grs(&self, args: &[&str]) -> Result<String, CliError> {
        let mut out = Vec::new();
        grs::run(self.cli(args), &mut out, std::future::pending()).await?;
        Ok(String::from_utf8(out).expect("UTF-8 output"))
    }

    fn cli(&self, args: &[&str]) -> Cli {
        use clap::Parser;
        let argv = ["grs", "--server", self.url.as_str()]
            .into_iter()
            .chain(args.iter().copied());
        Cli::try_parse_from(argv).expect("valid command line")
    }

    /// `grs ... -o json`, parsed.
    async fn grs_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let out = self.grs(&args).await.expect("command succeeds");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON document ({e}): {out}"))
    }
}

/// What the built binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the built `grs` binary with `args` and extra environment.
async fn grs_bin(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_grs"));
    cmd.args(args)
        .env_remove("GRS_SERVER")
        .env_remove("GRS_TOKEN")
        .env_remove("GRS_CA_FILE")
        .env("RUST_LOG", "off");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("grs finishes")
        .expect("grs runs");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn job_of(doc: &Value, id: u64) -> &Value {
    doc["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .find(|j| j["job_id"] == id)
        .unwrap_or_else(|| panic!("job {id} missing from {doc}"))
}

/// The line of a table whose first column is `key`.
fn row<'a>(table: &'a str, key: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no row {key} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_shows_every_job_with_its_state_in_aligned_columns() {
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    s.queue(4_000_000_101).await;
    s.queue(4_000_000_102).await;
    s.submit(
        pb::JobAction::Queued,
        4_000_000_103,
        &["self-hosted", "gpu"],
    )
    .await;

    let out = s.grs(&["jobs", "list"]).await.unwrap();
    let header = out.lines().next().unwrap();
    assert!(header.starts_with("ID "), "{out}");
    for col in ["STATE", "POOL", "REPOSITORY", "UPDATED", "REASON"] {
        assert!(header.contains(col), "{col} missing: {out}");
    }
    let state_col = header.find("STATE").unwrap();
    let r101 = row(&out, "4000000101");
    assert_eq!(&r101[state_col..state_col + 6], "queued", "{out}");
    assert!(
        r101.contains("linux") && r101.contains("octo/widgets"),
        "{out}"
    );
    assert!(r101.contains("CI / build"), "{out}");
    assert!(r101.contains("ago") || r101.contains("just now"), "{out}");
    let r103 = row(&out, "4000000103");
    assert_eq!(&r103[state_col..state_col + 8], "unrouted", "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");

    let only_unrouted = s
        .grs(&["jobs", "list", "--state", "unrouted"])
        .await
        .unwrap();
    assert_eq!(only_unrouted.lines().count(), 2, "{only_unrouted}");
    row(&only_unrouted, "4000000103");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_json_is_one_document_with_the_protos_field_names() {
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    s.queue(4_000_000_201).await;
    s.submit(pb::JobAction::Queued, 4_000_000_202, &["windows"])
        .await;

    let doc = s.grs_json(&["jobs", "list"]).await;
    assert_eq!(doc["next_page_token"], "");
    assert_eq!(doc["jobs"].as_array().unwrap().len(), 2);
    let j = job_of(&doc, 4_000_000_201);
    assert_eq!(j["state"], "queued");
    assert_eq!(j["pool"], "linux");
    assert_eq!(j["repository"], "octo/widgets");
    assert_eq!(j["run_id"], 40_000_002_010u64);
    assert_eq!(j["labels"], serde_json::json!(LABELS));
    assert!(j["recorded_at"].as_str().unwrap().ends_with('Z'), "{j}");
    assert_eq!(job_of(&doc, 4_000_000_202)["state"], "unrouted");
    assert_eq!(job_of(&doc, 4_000_000_202)["pool"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_shows_one_page_unless_all_pages_are_asked_for() {
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    for id in 1..=5 {
        s.queue(4_000_000_300 + id).await;
    }
    let first = s.grs_json(&["jobs", "list", "--limit", "2"]).await;
    assert_eq!(first["jobs"].as_array().unwrap().len(), 2, "{first}");
    let token = first["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty(), "{first}");

    let second = s
        .grs_json(&["jobs", "list", "--limit", "2", "--page-token", token])
        .await;
    assert_eq!(second["jobs"].as_array().unwrap().len(), 2, "{second}");
    assert_ne!(first["jobs"][0]["job_id"], second["jobs"][0]["job_id"]);

    let all = s.grs_json(&["jobs", "list", "--limit", "2", "--all"]).await;
    assert_eq!(all["jobs"].as_array().unwrap().len(), 5, "{all}");
    assert_eq!(all["next_page_token"], "");
    let table = s
        .grs(&["jobs", "list", "--limit", "2", "--all"])
        .await
        .unwrap();
    assert_eq!(table.lines().count(), 6, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_shows_one_job_and_names_a_missing_one() {
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    s.queue(4_000_000_401).await;

    let out = s.grs(&["jobs", "get", "4000000401"]).await.unwrap();
    assert!(out.contains("Job:") && out.contains("4000000401"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("State:") && l.ends_with("queued")),
        "{out}"
    );
    assert!(out.contains("self-hosted, linux, x64"), "{out}");

    let doc = s.grs_json(&["jobs", "get", "4000000401"]).await;
    assert_eq!(doc["job_id"], 4_000_000_401u64);
    assert_eq!(doc["state"], "queued");
    assert_eq!(doc["workflow_name"], "CI");

    let err = s.grs(&["jobs", "get", "999"]).await.unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert_eq!(
        err.to_string(),
        format!("job 999 not found on the control plane at {}", s.url)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_change_the_pool() {
    let s = start(Setup::default()).await;
    assert!(!s.pool("linux").await.paused);

    let out = s.grs(&["pools", "pause", "linux"]).await.unwrap();
    assert!(out.starts_with("pool \"linux\" paused"), "{out}");
    assert!(s.pool("linux").await.paused, "the server's pool is paused");
    let list = s.grs(&["pools", "list"]).await.unwrap();
    let r = row(&list, "linux");
    assert!(r.contains("paused") && r.contains("0/4"), "{list}");
    assert!(r.contains("self-hosted,linux,x64"), "{list}");

    let doc = s.grs_json(&["pools", "resume", "linux"]).await;
    assert_eq!(doc["paused"], false);
    assert!(
        !s.pool("linux").await.paused,
        "the server's pool is resumed"
    );
    let doc = s.grs_json(&["pools", "get", "linux"]).await;
    assert_eq!(doc["name"], "linux");
    assert_eq!(doc["provisioner"], "fake");
    assert_eq!(doc["paused"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_set_changes_capacity_and_reports_invalid_values() {
    let s = start(Setup::default()).await;
    let doc = s
        .grs_json(&[
            "pools",
            "set",
            "linux",
            "--max-instances",
            "8",
            "--min-idle",
            "2",
        ])
        .await;
    assert_eq!(doc["max_instances"], 8);
    assert_eq!(doc["min_idle"], 2);
    let p = s.pool("linux").await;
    assert_eq!((p.max_instances, p.min_idle), (8, 2));

    let err = s
        .grs(&["pools", "set", "linux", "--min-idle", "99"])
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 1);
    let msg = err.to_string();
    assert!(
        msg.starts_with("invalid argument from the control plane at http://127.0.0.1:"),
        "{msg}"
    );
    assert!(msg.contains("min_idle"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_pool_is_an_error_naming_it_with_exit_code_1() {
    let s = start(Setup::default()).await;
    for args in [
        &["pools", "get", "gpu"][..],
        &["pools", "pause", "gpu"],
        &["jobs", "list", "--pool", "gpu"],
        &["instances", "list", "--pool", "gpu"],
    ] {
        let err = s.grs(args).await.unwrap_err();
        assert_eq!(err.exit_code(), 1, "{args:?}");
        assert!(
            err.to_string().starts_with("pool \"gpu\" not found"),
            "{args:?}: {err}"
        );
    }

    let run = grs_bin(&["--server", &s.url, "pools", "get", "gpu"], &[]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "grs: pool \"gpu\" not found on the control plane at {}",
            s.url
        )
    );
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_delete_queues_teardown() {
    let s = start(Setup::default()).await;
    s.queue(4_000_000_501).await;
    let name = "grs-4000000501";
    s.wait_instance(name, pb::InstanceState::Running).await;

    let list = s.grs(&["instances", "list"]).await.unwrap();
    let r = row(&list, name);
    assert!(r.contains("running") && r.contains("4000000501"), "{list}");
    let doc = s.grs_json(&["instances", "get", name]).await;
    assert_eq!(doc["state"], "running");
    assert_eq!(doc["pool"], "linux");
    assert_eq!(doc["job_id"], 4_000_000_501u64);

    let out = s.grs(&["instances", "delete", name]).await.unwrap();
    assert!(
        out.starts_with(&format!("instance \"{name}\" queued for teardown")),
        "{out}"
    );
    s.wait_instance(name, pb::InstanceState::Deleted).await;
    let live = s.grs_json(&["instances", "list"]).await;
    assert_eq!(live["instances"], serde_json::json!([]), "{live}");
    let all = s
        .grs_json(&["instances", "list", "--include-deleted"])
        .await;
    assert_eq!(all["instances"][0]["state"], "deleted", "{all}");

    let again = s.grs(&["instances", "delete", name]).await.unwrap();
    assert_eq!(again, format!("instance \"{name}\" is already deleted\n"));
    let err = s.grs(&["instances", "delete", "grs-1"]).await.unwrap_err();
    assert!(
        err.to_string().starts_with("instance \"grs-1\" not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_shows_queue_depths_and_capacity_per_pool() {
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    s.queue(4_000_000_601).await;
    s.queue(4_000_000_602).await;

    let doc = s.grs_json(&["stats"]).await;
    assert_eq!(doc["provision_queue_depth"], 2, "{doc}");
    assert_eq!(doc["teardown_queue_depth"], 0, "{doc}");
    assert_eq!(doc["pools"][0]["pool"], "linux");
    assert_eq!(doc["pools"][0]["jobs_queued"], 2);
    assert_eq!(doc["pools"][0]["max_instances"], 4);

    let out = s.grs(&["stats"]).await.unwrap();
    let provision: Vec<&str> = row(&out, "provision").split_whitespace().collect();
    assert_eq!(provision[1], "2", "{out}");
    let linux: Vec<&str> = row(&out, "linux").split_whitespace().collect();
    assert_eq!(linux, ["linux", "0", "4", "2"], "{out}");
}

/// A writer the test reads while `grs events` writes to it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Runs `grs events <args>` until it has printed a line about a job this
/// test submits (submitting until one shows: the watch starts at an unknown
/// moment), then stops it as Ctrl-C would. Returns the output.
async fn watch_until_a_job_shows(s: &Server, args: &[&str]) -> String {
    let out = Shared::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut writer = out.clone();
    let cli = s.cli(args);
    let watch = grs::run(cli, &mut writer, async {
        let _ = stopped.await;
    });
    let drive = async {
        for id in 1..=100u64 {
            s.queue(4_000_000_700 + id).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if out.text().contains("40000007") {
                break;
            }
        }
        let _ = stop.send(());
    };
    let (result, ()) = tokio::join!(watch, drive);
    result.expect("events ends cleanly on shutdown");
    out.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_prints_one_line_per_transition_until_stopped() {
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    let out = watch_until_a_job_shows(&s, &["events", "--pool", "linux"]).await;
    let line = out
        .lines()
        .find(|l| l.contains("job 40000007"))
        .unwrap_or_else(|| panic!("no job line in {out:?}"));
    assert!(line.ends_with("(linux): new → queued"), "{line}");
    assert!(line.starts_with("20"), "starts with the time: {line}");

    let out = watch_until_a_job_shows(&s, &["events", "--output", "json"]).await;
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["job"]["pool"], "linux", "{first}");
    assert_eq!(first["job"]["from"], "unspecified", "{first}");
    assert_eq!(first["job"]["to"], "queued", "{first}");
    assert!(first["at"].is_string(), "{first}");
    for l in out.lines() {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_binary_streams_until_ctrl_c_and_then_exits_0() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_grs"))
        .args(["--server", &s.url, "events"])
        .env_remove("GRS_TOKEN")
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut first = None;
    for id in 1..=50u64 {
        s.queue(4_000_000_800 + id).await;
        // `next_line` is cancel-safe: a line cut short here is read whole later.
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
        {
            first = line.unwrap();
            break;
        }
    }
    let first = first.expect("grs events printed a line");
    assert!(
        first.contains("job 40000008") && first.ends_with("new → queued"),
        "{first}"
    );

    let pid = child.id().expect("still running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("grs events stops on SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_69_naming_the_url() {
    // A port nobody listens on: bound, then released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let run = grs_bin(&["--server", &url, "jobs", "list"], &[]).await;
    assert_eq!(run.code, 69, "{run:?}");
    assert_eq!(
        run.stderr.trim_end(),
        format!("grs: cannot reach the control plane at {url}: connection refused")
    );

    // The same through GRS_SERVER, for every kind of command.
    let run = grs_bin(&["events"], &[("GRS_SERVER", &url)]).await;
    assert_eq!(run.code, 69, "{run:?}");
    assert!(run.stderr.contains(&url), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_token_requires_it_and_the_token_is_never_printed() {
    let s = start(Setup {
        token: Some("t0ken-right"),
        ..Setup::default()
    })
    .await;

    let err = s.grs(&["pools", "list"]).await.unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert!(
        err.to_string()
            .starts_with("unauthenticated: missing bearer token — pass --token or set GRS_TOKEN"),
        "{err}"
    );
    assert!(err.to_string().contains(&s.url), "{err}");

    let out = s
        .grs(&["--token", "t0ken-right", "pools", "list"])
        .await
        .unwrap();
    row(&out, "linux");

    let run = grs_bin(
        &["--server", &s.url, "--token", "t0ken-wrong", "stats"],
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("rejected the bearer token"), "{run:?}");
    assert!(!run.stderr.contains("t0ken"), "the token leaked: {run:?}");

    let run = grs_bin(
        &["--server", &s.url, "-o", "json", "stats"],
        &[("GRS_TOKEN", "t0ken-right")],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["pools"][0]["pool"], "linux");

    let help = grs_bin(&["--help"], &[("GRS_TOKEN", "t0ken-right")]).await;
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("GRS_TOKEN"), "{help:?}");
    assert!(
        !help.stdout.contains("t0ken"),
        "--help shows the token: {help:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    for args in [
        &["jobs", "list", "--state", "running"][..],
        &["jobs", "list", "--limit", "5000"],
        &["jobs", "get", "not-a-number"],
        &["pools", "set", "linux"],
        &["--server", "127.0.0.1:50051", "stats"],
        &["--timeout", "soon", "stats"],
        &["--output", "yaml", "stats"],
        &["--ca-file", "/nonexistent", "stats"],
        &[],
    ] {
        let run = grs_bin(args, &[]).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
    }
}

fn write_file(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_are_checked_against_the_ca_file() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_file = write_file(dir.path(), "tls.crt", &cert.pem());
    let key_file = write_file(dir.path(), "tls.key", &key.serialize_pem());
    let ca_file = write_file(dir.path(), "ca.crt", &ca.pem());
    let s = start(Setup {
        tls: Some((cert_file, key_file)),
        ..Setup::default()
    })
    .await;
    let ca = ca_file.to_str().unwrap();

    let out = s.grs(&["--ca-file", ca, "pools", "list"]).await.unwrap();
    row(&out, "linux");

    // The system's roots do not know this CA: the connection fails as
    // unreachable, saying why.
    let err = s.grs(&["pools", "list"]).await.unwrap_err();
    assert_eq!(err.exit_code(), 69, "{err}");
    assert!(err.to_string().contains(&s.url), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    // A CA file is for https:// only.
    let plain = format!("http://{}", s.addr);
    let run = grs_bin(&["--server", &plain, "--ca-file", ca, "stats"], &[]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--ca-file"), "{run:?}");
}

/// Waits until the control plane lists `n` live instances.
async fn wait_instances(s: &Server, n: usize) {
    for _ in 0..200 {
        if s.instances(false).await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never {n} instances: {:?}", s.instances(false).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_shows_queues_pools_and_instances() {
    let s = start(Setup::default()).await;
    s.queue(4_000_000_901).await;
    s.queue(4_000_000_902).await;
    wait_instances(&s, 2).await;

    let out = s.grs(&["top", "--once"]).await.unwrap();
    assert!(
        out.starts_with(&format!("grs top — {} — 20", s.url)),
        "{out}"
    );
    let q = row(&out, "provision");
    assert_eq!(q.split_whitespace().count(), 3, "{out}");
    let pool = row(&out, "linux");
    assert!(pool.contains("active") && pool.contains("2/4"), "{out}");
    for id in ["4000000901", "4000000902"] {
        let r = row(&out, &format!("grs-{id}"));
        assert!(r.contains("linux") && r.contains(id), "{out}");
    }
    assert!(out.contains("RECENT EVENTS"), "{out}");

    let doc = s.grs_json(&["top", "--once"]).await;
    assert_eq!(doc["pools"]["pools"][0]["name"], "linux", "{doc}");
    assert_eq!(
        doc["instances"]["instances"].as_array().unwrap().len(),
        2,
        "{doc}"
    );
    assert!(doc["stats"]["provision_queue_depth"].is_number(), "{doc}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_top_binary_redraws_on_events_when_piped_and_exits_0_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let s = start(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    // A long interval: a second snapshot this soon can only be an event's.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_grs"))
        .args(["--server", &s.url, "top", "--interval", "1h"])
        .env_remove("GRS_TOKEN")
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut wait_for = async |want: &str| loop {
        let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line {want:?} within 10s"))
            .unwrap()
            .expect("grs top still prints");
        if l.contains(want) {
            break;
        }
    };
    // The first snapshot: no events yet.
    wait_for("(none since grs top started)").await;
    s.queue(4_000_000_911).await;
    wait_for("job 4000000911 (linux): new → queued").await;
    let pid = child.id().expect("still running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("grs top stops on SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// `grs top` on a terminal (a pseudo-terminal from `script`): the screen is
/// drawn, `q` (and, in another run, Ctrl-C, which raw mode delivers as a
/// key) ends it with exit 0, and the terminal is restored (the alternate
/// screen left, the cursor shown again).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_on_a_terminal_quits_on_q_and_restores_the_terminal() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED top_on_a_terminal_quits_on_q_and_restores_the_terminal: no `script` (util-linux)"
        );
        return;
    }
    let s = start(Setup::default()).await;
    s.queue(4_000_000_921).await;
    wait_instances(&s, 1).await;
    for quit in [&b"q"[..], &b"\x03"[..]] {
        top_on_a_pty_until(&s, quit).await;
    }
}

#[cfg(target_os = "linux")]
async fn top_on_a_pty_until(s: &Server, quit: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cmd = format!(
        "{} --server {} top --interval 100ms",
        env!("CARGO_BIN_EXE_grs"),
        s.url
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("RUST_LOG", "off")
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Until a whole screen, instance row and footer, has arrived: one read
    // can end mid-screen (CI saw the instance row without the footer).
    let drawn = |seen: &[u8]| {
        let s = String::from_utf8_lossy(seen);
        s.contains("grs-4000000921") && s.contains("q: quit")
    };
    while !drawn(&seen) {
        let n = tokio::time::timeout(Duration::from_secs(10), stdout.read(&mut buf))
            .await
            .expect("the screen is drawn")
            .unwrap();
        assert!(n > 0, "ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let screen = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        screen.contains("\x1b[?1049h"),
        "alternate screen entered: {screen:?}"
    );
    assert!(screen.contains("q: quit"), "{screen:?}");
    stdin.write_all(quit).await.unwrap();
    stdin.flush().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap_or_else(|_| panic!("grs top ends on {quit:?}"))
        .unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        rest.contains("\x1b[?1049l"),
        "alternate screen left: {rest:?}"
    );
    assert!(rest.contains("\x1b[?25h"), "cursor shown: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_written_for_every_shell_and_bash_parses_them() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let r = grs_bin(&["completions", shell], &[]).await;
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        for word in ["doctor", "top", "completions", "instances"] {
            assert!(r.stdout.contains(word), "{shell} script lacks {word}");
        }
    }
    let r = grs_bin(&["completions", "bash"], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let script = write_file(dir.path(), "grs.bash", &r.stdout);
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Loaded, it completes subcommands.
    let probe = format!(
        "source {}; COMP_WORDS=(grs do); COMP_CWORD=1; COMP_LINE='grs do'; COMP_POINT=6; _grs grs do grs; echo \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &probe])
        .output()
        .unwrap();
    let words = String::from_utf8_lossy(&out.stdout);
    assert!(
        words.split_whitespace().any(|w| w == "doctor"),
        "{words:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(grs_bin(&["completions", "tcsh"], &[]).await.code == 2);
}
