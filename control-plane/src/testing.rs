//! Helpers for tests that need a real Redis (this crate's and others').

use std::time::Duration;

use crate::store::{RedisStore, RedisStoreOptions, Store};

/// The Redis URL tests use: `GRS_REDIS_URL`, else `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("GRS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A Redis store under a key prefix of its own, or `None` when no Redis
/// answers and `CI` is unset (the caller then skips, loudly). Under `CI` a
/// missing Redis is a failure: CI must never report a skipped check as passed.
pub async fn redis_store(test: &str) -> Option<RedisStore> {
    let prefix = format!("grs-test:{test}:{:x}", rand::random::<u64>());
    let store = RedisStore::new(
        &redis_url(),
        RedisStoreOptions {
            prefix,
            ..Default::default()
        },
    )
    .expect("valid GRS_REDIS_URL");
    match tokio::time::timeout(Duration::from_secs(3), store.ping()).await {
        Ok(Ok(())) => Some(store),
        other => {
            let why = format!("no Redis at {} ({other:?})", redis_url());
            if std::env::var_os("CI").is_some() {
                panic!("{why}: CI is set, so this test fails instead of skipping");
            }
            eprintln!("SKIPPED {test}: {why}; set GRS_REDIS_URL or run scripts/test.sh");
            None
        }
    }
}
