//! Connections: one multiplexed connection (auto-reconnecting) for every
//! non-blocking command, and a pool of connections for blocking reads
//! (`XREADGROUP BLOCK`, `XREAD BLOCK`), which would stall the shared one.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

use super::RedisStore;
use crate::store::{StoreError, StoreResult};

pub(super) fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable {
        message: e.to_string(),
        source: Some(Box::new(e)),
    }
}

impl RedisStore {
    pub(super) async fn conn(&self) -> StoreResult<ConnectionManager> {
        self.conn
            .get_or_try_init(|| async {
                let cfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(self.opts.response_timeout))
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                self.client.get_connection_manager_with_config(cfg).await
            })
            .await
            .cloned()
            .map_err(unavailable)
    }

    pub(super) async fn blocking_conn(
        &self,
        block: Duration,
    ) -> StoreResult<MultiplexedConnection> {
        let pooled = self.blocking.lock().unwrap().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)));
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(unavailable)?
            }
        };
        conn.set_response_timeout(block + self.opts.response_timeout);
        Ok(conn)
    }

    pub(super) fn give_back(&self, conn: MultiplexedConnection) {
        let mut pool = self.blocking.lock().unwrap();
        if pool.len() < 64 {
            pool.push(conn);
        }
    }

    /// A hash's fields (empty when the key does not exist).
    pub(super) async fn hgetall(&self, key: &str) -> StoreResult<HashMap<String, String>> {
        let mut conn = self.conn().await?;
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }
}
