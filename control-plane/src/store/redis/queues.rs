//! Work queues on Redis streams: one stream per queue, read through a
//! consumer group (created on first use, from id 0, so entries added before
//! it are work too); an entry is acknowledged and deleted in one
//! transaction once done, so a stream's length is its backlog; entries a
//! dead worker held are reclaimed with `XAUTOCLAIM`. Heartbeats and
//! acknowledgements act only on the caller's own entries (checked with
//! `XPENDING` in the same script), so a worker taken for dead neither takes
//! its entry back nor acknowledges it under its new holder.

use std::time::Duration;

use redis::Value;

use super::RedisStore;
use super::conn::unavailable;
use super::encoding::{as_string, first_stream_entries, items, pairs};
use crate::store::{Delivery, Queue, QueueDepth, QueueItem, StoreResult};

/// The consumer group of provision queues.
const PROVISION_GROUP: &str = "dispatchers";
/// The consumer group of the teardown queue.
const TEARDOWN_GROUP: &str = "teardown";

impl RedisStore {
    pub(super) fn queue_key(&self, q: &Queue) -> (String, &'static str) {
        match q {
            Queue::Provision(pool) => (self.key(&["queue", "provision", pool]), PROVISION_GROUP),
            Queue::Teardown => (self.key(&["queue", "teardown"]), TEARDOWN_GROUP),
        }
    }

    pub(super) async fn ensure_group(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        key: &str,
        group: &str,
    ) -> StoreResult<()> {
        // From id 0: entries added before the group existed are work too.
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    pub(super) async fn queue_read(
        &self,
        queue: &Queue,
        consumer: &str,
        block: Duration,
    ) -> StoreResult<Option<Delivery>> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.blocking_conn(block).await?;
        let result = async {
            for _ in 0..2 {
                let r: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut conn)
                    .await;
                match r {
                    Ok(Value::Nil) => return Ok(None),
                    Ok(v) => {
                        let entries = first_stream_entries(v);
                        return Ok(self.parse_deliveries(queue, &entries).into_iter().next());
                    }
                    Err(e) if e.code() == Some("NOGROUP") => {
                        self.ensure_group(&mut conn, &key, group).await?
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
            Ok(None)
        }
        .await;
        if result.is_ok() {
            self.give_back(conn);
        }
        result
    }

    pub(super) async fn queue_claim_stale(
        &self,
        queue: &Queue,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<Delivery>> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        let r: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
            .arg(&key)
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await;
        let v = match r {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group(&mut conn, &key, group).await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(unavailable(e)),
        };
        let mut parts = items(v).into_iter();
        let _next = parts.next();
        let entries = parts.next().map(items).unwrap_or_default();
        // Entries whose data is gone (deleted while pending) come back as
        // nil; the third element lists their ids: acknowledge them away.
        let deleted: Vec<String> = parts
            .next()
            .map(items)
            .unwrap_or_default()
            .iter()
            .filter_map(as_string)
            .collect();
        if !deleted.is_empty() {
            let _: () = redis::cmd("XACK")
                .arg(&key)
                .arg(group)
                .arg(&deleted)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(self.parse_deliveries(queue, &entries))
    }

    /// See [`Store::touch`](crate::store::Store::touch): the ownership
    /// check and the reset are one script (`queue_touch.lua`).
    pub(super) async fn queue_touch(
        &self,
        queue: &Queue,
        consumer: &str,
        id: &str,
    ) -> StoreResult<bool> {
        self.held_entry_script(&self.scripts.queue_touch, queue, consumer, id)
            .await
    }

    /// See [`Store::ack`](crate::store::Store::ack): the ownership check,
    /// `XACK` and `XDEL` are one script (`queue_ack.lua`).
    pub(super) async fn queue_ack(
        &self,
        queue: &Queue,
        consumer: &str,
        id: &str,
    ) -> StoreResult<bool> {
        self.held_entry_script(&self.scripts.queue_ack, queue, consumer, id)
            .await
    }

    /// Runs a script over entry `id` of `queue` that acts only if
    /// `consumer` holds the entry; true if it did.
    async fn held_entry_script(
        &self,
        script: &redis::Script,
        queue: &Queue,
        consumer: &str,
        id: &str,
    ) -> StoreResult<bool> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        let done: i64 = script
            .key(key)
            .arg(group)
            .arg(consumer)
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    pub(super) async fn queue_depth_of(&self, queue: &Queue) -> StoreResult<QueueDepth> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        let depth: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let pending: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(&key)
            .arg(group)
            .query_async(&mut conn)
            .await;
        let pending = match pending {
            Ok(v) => items(v)
                .first()
                .and_then(as_string)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            Err(e) if e.code() == Some("NOGROUP") => 0,
            Err(e) => return Err(unavailable(e)),
        };
        Ok(QueueDepth { depth, pending })
    }

    pub(super) fn parse_deliveries(&self, q: &Queue, entries: &[Value]) -> Vec<Delivery> {
        entries
            .iter()
            .filter_map(|e| {
                let Value::Array(parts) = e else { return None };
                let id = as_string(parts.first()?)?;
                let fields = match parts.get(1)? {
                    Value::Array(f) => f,
                    _ => return None,
                };
                let map = pairs(fields);
                let item = match q {
                    Queue::Provision(_) => QueueItem::Provision {
                        job_id: map.get("job_id")?.parse().ok()?,
                    },
                    Queue::Teardown => QueueItem::Teardown {
                        instance: map.get("instance")?.clone(),
                    },
                };
                Some(Delivery { id, item })
            })
            .collect()
    }
}
