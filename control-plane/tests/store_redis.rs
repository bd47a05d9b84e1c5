//! The store conformance suite against a real Redis server: one test per
//! check, each under a key prefix of its own.

use std::sync::Arc;

use grs_control_plane::store::{Store, conformance};
use grs_control_plane::testing::redis_store;

macro_rules! redis_store_conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(store) = redis_store(stringify!($name)).await else {
                return;
            };
            let store = Arc::new(store);
            conformance::run(stringify!($name), store.clone() as Arc<dyn Store>).await;
            store.flush_prefix().await.unwrap();
        }
    )*};
}

grs_control_plane::store_conformance_checks!(redis_store_conformance);
