//! The provisioner conformance suite and the client's promises (retries,
//! deadlines, handshake, pools re-sent), over a real socket.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use grs_proto::provisioner::v1 as pb;
use grs_proto::provisioner::v1::provisioner_client::ProvisionerClient;
use grs_provisioner::conformance::{self, Harness, HarnessError};
use grs_provisioner::fake::InjectedFailure;
use grs_provisioner::{
    Capabilities, FakeProvisioner, Instance, InstanceSpec, PoolDocument, Provisioner,
    ProvisionerError,
};
use grs_provisioner_grpc::plugin::{Plugin, PluginCommand, PluginState, SupervisorOptions};
use grs_provisioner_grpc::{Address, ClientOptions, GrpcProvisioner, Target, serve};
use tokio_util::sync::CancellationToken;

/// A backend served on a fresh unix socket, with a client for it.
struct Served {
    client: Arc<GrpcProvisioner>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn fast() -> ClientOptions {
    ClientOptions {
        backoff: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

async fn serve_unix(backend: Arc<dyn Provisioner>, opts: ClientOptions) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        serve(
            backend,
            "test",
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move { s.cancelled().await },
        )
        .await
        .unwrap();
    });
    let client = Arc::new(GrpcProvisioner::new(
        Target::Fixed(Address::Unix(path)),
        opts,
    ));
    Served {
        client,
        stop,
        _dir: dir,
    }
}

struct WireHarness {
    fake: Arc<FakeProvisioner>,
    client: Arc<GrpcProvisioner>,
}

#[async_trait]
impl Harness for WireHarness {
    fn provisioner(&self) -> Arc<dyn Provisioner> {
        self.client.clone()
    }
    fn pool(&self) -> String {
        "conformance".into()
    }
    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
        self.fake.add_foreign(name);
        Ok(())
    }
    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
        Ok(self.fake.exists(name))
    }
}

#[tokio::test]
async fn the_fake_passes_the_conformance_suite_over_a_unix_socket() {
    let fake = Arc::new(FakeProvisioner::new());
    let s = serve_unix(fake.clone(), fast()).await;
    s.client
        .configure_pool("conformance", &PoolDocument::new())
        .unwrap();
    s.client.validate_pool("conformance").await.unwrap();
    assert_eq!(s.client.kind(), "fake", "the handshake names the backend");
    assert!(s.client.capabilities().start_stop);
    let h = WireHarness {
        fake,
        client: s.client.clone(),
    };
    conformance::run_all(&h).await.unwrap();
}

#[tokio::test]
async fn the_fake_passes_the_conformance_suite_over_tcp() {
    let fake = Arc::new(FakeProvisioner::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend: Arc<dyn Provisioner> = fake.clone();
    tokio::spawn(serve(
        backend,
        "test",
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        std::future::pending(),
    ));
    let client = Arc::new(GrpcProvisioner::new(
        Target::Fixed(Address::parse(&format!("http://{addr}")).unwrap()),
        fast(),
    ));
    conformance::run_all(&WireHarness { fake, client })
        .await
        .unwrap();
}

#[tokio::test]
async fn transient_codes_are_retried_until_the_attempts_run_out() {
    let fake = Arc::new(FakeProvisioner::new());
    let s = serve_unix(fake.clone(), fast()).await;
    let p = &s.client;
    p.create(&conformance::spec("p", "grs-1", 1)).await.unwrap();
    // Two transient failures: the third try deletes.
    fake.fail_next_deletes(2);
    p.delete("p", "grs-1").await.unwrap();
    assert_eq!(fake.deletes(), 1);
    // More failures than attempts (4): the error comes back, transient.
    p.create(&conformance::spec("p", "grs-2", 2)).await.unwrap();
    fake.fail_next_deletes(6);
    let e = p.delete("p", "grs-2").await.unwrap_err();
    assert!(
        matches!(&e, ProvisionerError::Transient(m) if m.contains("injected")),
        "{e:?}"
    );
    assert!(fake.exists("grs-2"));
    // 4 of the 6 failures were used: the next call meets 2, then works.
    p.delete("p", "grs-2").await.unwrap();
    assert!(!fake.exists("grs-2"));
    assert_eq!(fake.deletes(), 2);
    // Permanent errors are not retried.
    fake.fail_next_creates(1, InjectedFailure::Permanent);
    let e = p
        .create(&conformance::spec("p", "grs-3", 3))
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionerError::Permanent(_)), "{e:?}");
    p.create(&conformance::spec("p", "grs-3", 3)).await.unwrap();
    fake.fail_next_creates(1, InjectedFailure::NoCapacity);
    let e = p
        .create(&conformance::spec("p", "grs-4", 4))
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionerError::NoCapacity(_)), "{e:?}");
}

#[tokio::test]
async fn a_call_past_its_deadline_is_a_transient_error() {
    let fake = Arc::new(FakeProvisioner::new());
    fake.set_create_delay(Duration::from_secs(30));
    let s = serve_unix(
        fake.clone(),
        ClientOptions {
            create_timeout: Duration::from_millis(300),
            attempts: 1,
            ..fast()
        },
    )
    .await;
    let started = std::time::Instant::now();
    let e = s
        .client
        .create(&conformance::spec("p", "grs-slow", 1))
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn an_unreachable_plugin_is_a_transient_error_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    let p = GrpcProvisioner::new(Target::Fixed(Address::Unix(path.clone())), fast());
    let e = p.list("p").await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("nobody.sock"), "{e}");
}

/// A backend that knows only configured pools and can forget them, as a
/// restarted plugin does.
#[derive(Debug, Default)]
struct Forgetful {
    fake: FakeProvisioner,
    pools: Mutex<HashSet<String>>,
    configured: Mutex<u32>,
}

impl Forgetful {
    fn known(&self, pool: &str) -> Result<(), ProvisionerError> {
        if self.pools.lock().unwrap().contains(pool) {
            Ok(())
        } else {
            Err(ProvisionerError::UnknownPool(format!("pool {pool}")))
        }
    }
}

#[async_trait]
impl Provisioner for Forgetful {
    fn kind(&self) -> &str {
        "forgetful"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { start_stop: false }
    }
    fn configure_pool(&self, pool: &str, config: &PoolDocument) -> Result<(), ProvisionerError> {
        self.fake.configure_pool(pool, config)?;
        self.pools.lock().unwrap().insert(pool.to_owned());
        *self.configured.lock().unwrap() += 1;
        Ok(())
    }
    async fn validate_pool(&self, pool: &str) -> Result<(), ProvisionerError> {
        self.known(pool)
    }
    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError> {
        self.known(&spec.pool)?;
        self.fake.create(spec).await
    }
    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        self.fake.delete(pool, name).await
    }
    async fn get(&self, pool: &str, name: &str) -> Result<Option<Instance>, ProvisionerError> {
        self.fake.get(pool, name).await
    }
    async fn list(&self, pool: &str) -> Result<Vec<Instance>, ProvisionerError> {
        self.fake.list(pool).await
    }
    async fn start(&self, _pool: &str, name: &str) -> Result<(), ProvisionerError> {
        Err(ProvisionerError::Unsupported(format!("start {name}")))
    }
    async fn stop(&self, _pool: &str, name: &str) -> Result<(), ProvisionerError> {
        Err(ProvisionerError::Unsupported(format!("stop {name}")))
    }
}

#[tokio::test]
async fn a_plugin_that_forgot_a_pool_gets_its_document_again() {
    let backend = Arc::new(Forgetful::default());
    let s = serve_unix(backend.clone(), fast()).await;
    let doc: PoolDocument = serde_json::from_str(r#"{"create_delay":"1ms"}"#).unwrap();
    s.client.configure_pool("linux", &doc).unwrap();
    s.client.validate_pool("linux").await.unwrap();
    assert_eq!(*backend.configured.lock().unwrap(), 1);
    backend.pools.lock().unwrap().clear();
    s.client
        .create(&conformance::spec("linux", "grs-9", 9))
        .await
        .unwrap();
    assert_eq!(
        *backend.configured.lock().unwrap(),
        2,
        "the document was sent again"
    );
    // A pool GRS has no document for stays unknown.
    let e = s
        .client
        .create(&conformance::spec("nope", "grs-10", 10))
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionerError::UnknownPool(_)), "{e:?}");
    // Without the capability, start/stop are Unsupported (the suite checks
    // the rest over the wire too).
    assert!(!s.client.capabilities().start_stop);
    let h = ForgetfulHarness(backend.clone(), s.client.clone());
    s.client
        .configure_pool("conformance", &PoolDocument::new())
        .unwrap();
    s.client.validate_pool("conformance").await.unwrap();
    conformance::run_all(&h).await.unwrap();
}

struct ForgetfulHarness(Arc<Forgetful>, Arc<GrpcProvisioner>);

#[async_trait]
impl Harness for ForgetfulHarness {
    fn provisioner(&self) -> Arc<dyn Provisioner> {
        self.1.clone()
    }
    fn pool(&self) -> String {
        "conformance".into()
    }
    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
        self.0.fake.add_foreign(name);
        Ok(())
    }
    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
        Ok(self.0.fake.exists(name))
    }
}

#[tokio::test]
async fn a_bad_pool_document_is_refused_naming_the_pool_key() {
    let fake = Arc::new(FakeProvisioner::new());
    let s = serve_unix(fake, fast()).await;
    let doc: PoolDocument = serde_json::from_str(r#"{"create_dleay":"1s"}"#).unwrap();
    s.client.configure_pool("linux", &doc).unwrap();
    let e = s.client.validate_pool("linux").await.unwrap_err();
    assert!(
        matches!(&e, ProvisionerError::Config(m) if m.contains("pools.linux.provisioner") && m.contains("create_dleay")),
        "{e:?}"
    );
}

#[tokio::test]
async fn the_server_refuses_another_protocol_version() {
    let fake = Arc::new(FakeProvisioner::new());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(serve(
        fake,
        "test",
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        std::future::pending(),
    ));
    let channel = tonic::transport::Endpoint::from_static("http://x")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut c = ProvisionerClient::new(channel);
    let e = c
        .handshake(pb::HandshakeRequest {
            protocol_version: 2,
            grs_version: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains('2') && e.message().contains('1'));
    let ok = c
        .handshake(pb::HandshakeRequest {
            protocol_version: 1,
            grs_version: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ok.protocol_version, ok.backend.as_str()), (1, "fake"));
}

fn fake_plugin() -> PluginCommand {
    PluginCommand {
        command: vec![env!("CARGO_BIN_EXE_grs-provisioner-fake").to_owned()],
        env: Vec::new(),
    }
}

fn quick() -> SupervisorOptions {
    SupervisorOptions {
        start_timeout: Duration::from_secs(20),
        backoff: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        stable_after: Duration::from_secs(60),
        stop_grace: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn a_supervised_plugin_is_restarted_after_a_crash_and_gets_its_pools_again() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::spawn(fake_plugin(), dir.path().join("fake.sock"), quick());
    let pid = plugin.wait_running(Duration::from_secs(20)).await.unwrap();
    let client = GrpcProvisioner::new(plugin.target(), fast());
    client
        .configure_pool("linux", &PoolDocument::new())
        .unwrap();
    client.validate_pool("linux").await.unwrap();
    client
        .create(&conformance::spec("linux", "grs-1", 1))
        .await
        .unwrap();
    assert_eq!(client.list("linux").await.unwrap().len(), 1);

    // Crash it.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::timeout(Duration::from_secs(20), plugin.wait_started(2))
        .await
        .expect("restarted");
    assert!(
        !matches!(plugin.state(), PluginState::Running(p) if p == pid),
        "{:?}",
        plugin.state()
    );
    // The new process knows nothing (the fake keeps VMs in memory), but it
    // serves, and the client's calls reach it.
    assert!(client.list("linux").await.unwrap().is_empty());
    client
        .create(&conformance::spec("linux", "grs-2", 2))
        .await
        .unwrap();

    plugin.shutdown().await;
    assert!(
        matches!(plugin.state(), PluginState::Stopped),
        "{:?}",
        plugin.state()
    );
    let e = client.list("linux").await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    // The process is gone: its pid no longer answers to signal 0.
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!alive.success());
}

#[tokio::test]
async fn a_plugin_that_does_not_come_up_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Plugin::spawn(
        PluginCommand {
            command: vec!["/nonexistent/grs-plugin".into()],
            env: Vec::new(),
        },
        dir.path().join("a.sock"),
        quick(),
    );
    let e = missing
        .wait_running(Duration::from_secs(20))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/grs-plugin"), "{e}");
    missing.shutdown().await;

    let chatty = Plugin::spawn(
        PluginCommand {
            command: vec!["sh".into(), "-c".into(), "echo hello; sleep 30".into()],
            env: Vec::new(),
        },
        dir.path().join("b.sock"),
        quick(),
    );
    let e = chatty
        .wait_running(Duration::from_secs(20))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("handshake line") && e.contains("hello"), "{e}");
    chatty.shutdown().await;

    let old = Plugin::spawn(
        PluginCommand {
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo 'grs-plugin|7|unix|/tmp/x.sock'; sleep 30".into(),
            ],
            env: Vec::new(),
        },
        dir.path().join("c.sock"),
        quick(),
    );
    let e = old
        .wait_running(Duration::from_secs(20))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("version 7") && e.contains("version 1"), "{e}");
    old.shutdown().await;
}
