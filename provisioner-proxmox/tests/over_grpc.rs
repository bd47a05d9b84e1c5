//! The Proxmox backend as a plugin: the conformance suite over gRPC (a unix
//! socket), against the PVE simulator.

use std::sync::Arc;

use async_trait::async_trait;
use grs_provisioner::conformance::{self, Harness, HarnessError};
use grs_provisioner::{PoolDocument, Provisioner};
use grs_provisioner_grpc::{Address, ClientOptions, GrpcProvisioner, Target, serve};
use grs_provisioner_proxmox::ProxmoxBackend;
use grs_provisioner_proxmox::testing::{INSTALLATION, POOL, PREFIX, SimFixture};

struct WireHarness {
    fixture: SimFixture,
    client: Arc<GrpcProvisioner>,
}

#[async_trait]
impl Harness for WireHarness {
    fn provisioner(&self) -> Arc<dyn Provisioner> {
        self.client.clone()
    }
    fn pool(&self) -> String {
        POOL.into()
    }
    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
        self.fixture.create_foreign(name).await
    }
    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
        self.fixture.exists_at_all(name).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxmox_backend_passes_the_conformance_suite_over_grpc() {
    let fixture = SimFixture::single_node().await;
    // The plugin side: a backend knowing no pool, served on a socket; the
    // pool's document comes from the client, as from GRS.
    let backend = Arc::new(ProxmoxBackend::new(&fixture.conn, INSTALLATION, PREFIX).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pve.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(serve(
        backend,
        "test",
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        std::future::pending(),
    ));
    let client = Arc::new(GrpcProvisioner::new(
        Target::Fixed(Address::Unix(path)),
        ClientOptions::default(),
    ));
    let doc = match serde_json::to_value(&fixture.pool).unwrap() {
        serde_json::Value::Object(m) => m,
        other => panic!("{other}"),
    };
    client.configure_pool(POOL, &doc).unwrap();
    client.validate_pool(POOL).await.unwrap();
    assert_eq!(client.kind(), "proxmox");
    // A wrong document is refused by the plugin, naming the key.
    let mut bad: PoolDocument = doc.clone();
    bad.insert("vlna".into(), 20.into());
    client.configure_pool("bad", &bad).unwrap();
    let e = client.validate_pool("bad").await.unwrap_err().to_string();
    assert!(
        e.contains("pools.bad.provisioner") && e.contains("vlna"),
        "{e}"
    );

    conformance::run_all(&WireHarness { fixture, client })
        .await
        .unwrap();
}
