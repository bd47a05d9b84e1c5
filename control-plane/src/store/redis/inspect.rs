//! Read-only questions about the Redis server itself, for `grs doctor`:
//! does it persist (whether it answers is `Store::ping`). Asked over the store's own connection
//! (so a password and `[redis.sentinel]` are honoured: with Sentinel, the
//! primary the sentinels name is asked).

use super::RedisStore;
use super::conn::unavailable;
use crate::store::StoreResult;

impl RedisStore {
    /// `CONFIG GET <parameter>`: its value, `None` when the server has no
    /// such parameter. An error when the server refuses `CONFIG` (managed
    /// services often rename or disable it).
    pub async fn config_get(&self, parameter: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        let pairs: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(parameter)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(pairs
            .chunks(2)
            .find(|kv| kv[0].eq_ignore_ascii_case(parameter))
            .and_then(|kv| kv.get(1).cloned()))
    }
}
