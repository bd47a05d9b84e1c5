//! The store conformance suite against a real Redis server.

use std::sync::Arc;

use grs_control_plane::store::{Store, conformance};
use grs_control_plane::testing::redis_store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_store_conformance_suite() {
    for name in conformance::ALL {
        let Some(store) = redis_store(name).await else {
            return;
        };
        let store = Arc::new(store);
        eprintln!("check {name}");
        conformance::run(name, store.clone() as Arc<dyn Store>).await;
        store.flush_prefix().await.unwrap();
    }
}
