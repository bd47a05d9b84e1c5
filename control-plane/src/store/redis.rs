//! [`Store`] on Redis: production state shared by every control-plane replica.
//!
//! # Keys (all under the configured prefix `P`, default `grs`)
//! | key | type | holds |
//! |---|---|---|
//! | `P:delivery:<delivery id>` | string, TTL | de-duplication of webhook deliveries |
//! | `P:job:<job id>` | hash | a [`Job`], and `rev` (bumped on every write); expires `job_retention` after it ends |
//! | `P:jobs`, `P:pool:<pool>:jobs` | sorted set | job ids by recording time (listing) |
//! | `P:instance:<name>` | hash | an [`InstanceRecord`], `bootstrap` (its token's hash, or empty) and `rev`; expires after deletion |
//! | `P:instances` | set | instance names (listing) |
//! | `P:pool:<pool>:live` | set | live instance names: the pool's capacity in use |
//! | `P:pool:<pool>:warm` | set | the pool's idle warm instances (its warm pool, `min_idle`) |
//! | `P:node:<node>:places` | set | instances holding a place on a hypervisor node (per-node maximums across replicas) |
//! | `P:pool:<pool>:settings` | hash | operator overrides (`paused`, `min_idle`, `max_instances`) and `rev` |
//! | `P:queue:provision:<pool>` | stream, group `dispatchers` | jobs waiting for an instance (field `job_id`) |
//! | `P:queue:teardown` | stream, group `teardown` | instances to destroy (field `instance`) |
//! | `P:events` | stream, capped | transitions, for `WatchEvents` (`kind`, `at`, `id`, `pool`, `from`, `to`, `reason`) |
//! | `P:bootstrap:<sha256 of token>` | string, TTL | the instance a bootstrap token is bound to |
//! | `P:lease:<name>` | string, TTL | a lease's holder (leader election; `create:<instance>`, the dispatcher's create fence) |
//!
//! # Atomicity, and where the rules are
//! No rule lives here. Every change to jobs, instances, capacity, tokens and
//! overrides is decided in Rust by [`rules`](super::rules) on records read
//! from Redis, then written by one generic script (`redis/apply.lua`) that
//! first checks that every record the decision read is unchanged (its
//! `rev`, a key's existence, the live set's size) and writes nothing of a
//! group whose check fails; the decision is then redone on fresh records
//! (see [`tx`]). A `queued` event's delivery and job are assumed new rather
//! than read (checked all the same), so a batch of new jobs is one round
//! trip. So a crash of a control plane never leaves half a
//! transition, and two replicas never both take the last capacity slot.
//! Every replica must run this version: an older one writes without
//! bumping `rev`, which the checks cannot see.
//!
//! The script names keys it derives from the prefix rather than receiving
//! them in `KEYS`: fine for a standalone or Sentinel-managed Redis, not for
//! Redis Cluster.
//!
//! # Durability
//! Redis must persist (AOF; `appendfsync everysec` loses at most a second of
//! writes on a power cut, `always` none): an accepted job lives only here.
//!
//! # Connections
//! One multiplexed connection (auto-reconnecting) carries every
//! non-blocking command. Blocking reads (`XREADGROUP BLOCK`, `XREAD BLOCK`)
//! would stall it, so they use connections of their own, pooled.
//!
//! # Modules
//! - this file: the [`Store`] methods, listing, watching, leases;
//! - [`tx`], read, decide ([`rules`](super::rules)), write with revision
//!   checks (`redis/apply.lua`), redo on conflict;
//! - [`queues`], the work queues on streams and consumer groups;
//! - [`encoding`], records as hash fields and back, reply values;
//! - [`conn`], connections;
//! - `redis/*.lua`, the scripts, included at build time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::MultiplexedConnection;
use redis::{Script, Value};

use super::rules::{self, Key};
use super::{
    BeginProvision, BeginWarm, Delivery, PoolLimits, Queue, QueueDepth, Store, StoreResult,
    SubmitResult,
};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobAction, JobEvent, JobState, Millis,
    PoolOverrides, now_ms,
};

mod conn;
mod encoding;
mod inspect;
mod queues;
mod tx;

use self::tx::Snapshot;

use self::conn::unavailable;
use self::encoding::{
    as_string, corrupt, event_from_fields, first_stream_entries, instance_from_hash, items,
    job_from_hash, overrides_from_hash, pairs,
};

/// Tunables of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisStoreOptions {
    /// Key prefix (no trailing `:`).
    pub prefix: String,
    /// How long a delivery id is remembered (GitHub redelivers up to 3 days).
    pub dedup_ttl: Duration,
    /// How long an ended job's record is kept.
    pub job_retention: Duration,
    /// Approximate cap of the events stream.
    pub events_max: u64,
    /// Timeout of each command (not of blocking reads).
    pub response_timeout: Duration,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        Self {
            prefix: "grs".into(),
            dedup_ttl: Duration::from_secs(4 * 24 * 3600),
            job_retention: Duration::from_secs(7 * 24 * 3600),
            events_max: 10_000,
            response_timeout: Duration::from_secs(5),
        }
    }
}

/// A Redis URL [`RedisStore::new`] cannot use.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL: {source}")]
pub struct InvalidRedisUrl {
    /// Why (the URL itself is not repeated: it may hold a password).
    #[source]
    source: redis::RedisError,
}

/// Redis-backed [`Store`].
pub struct RedisStore {
    /// Where the primary is (`redis.url` or Sentinel); see [`conn`].
    link: conn::Link,
    opts: RedisStoreOptions,
    /// Connections for blocking reads.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info may hold a password: not printed.
        f.debug_struct("RedisStore")
            .field("prefix", &self.opts.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://[:password@]host:port[/db]`,
    /// `rediss://` for TLS). Checks the URL only; connects on first use.
    pub fn new(url: &str, opts: RedisStoreOptions) -> Result<Self, InvalidRedisUrl> {
        Ok(Self::with_link(conn::Link::direct(url)?, opts))
    }

    fn with_link(link: conn::Link, opts: RedisStoreOptions) -> Self {
        Self {
            link,
            opts,
            blocking: Mutex::new(Vec::new()),
            scripts: Scripts::new(),
        }
    }

    /// The key prefix (another replica's store on the same prefix shares
    /// everything with this one).
    pub fn prefix(&self) -> &str {
        &self.opts.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.opts.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// The members of set `key`, sorted.
    async fn members(&self, key: &str) -> StoreResult<Vec<String>> {
        let mut conn = self.conn().await?;
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        names.sort();
        Ok(names)
    }

    /// Deletes every key under this store's prefix (tests and benchmarks
    /// clean up after themselves with it; never used by the control plane).
    pub async fn flush_prefix(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let pattern = format!("{}:*", self.opts.prefix);
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut keys = Vec::new();
            while let Some(k) = iter.next_item().await {
                keys.push(k.map_err(unavailable)?);
            }
            keys
        };
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

struct Scripts {
    /// `redis/apply.lua`: every change to jobs, instances, capacity,
    /// tokens and overrides.
    apply: Script,
    // Leases stand alone: they name their key in KEYS.
    acquire_lease: Script,
    release_lease: Script,
    /// `redis/queue_touch.lua`: a heartbeat that takes nothing from
    /// another consumer.
    queue_touch: Script,
    /// `redis/queue_ack.lua`: acknowledges only the consumer's own entry.
    queue_ack: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            apply: Script::new(include_str!("redis/apply.lua")),
            acquire_lease: Script::new(include_str!("redis/acquire_lease.lua")),
            release_lease: Script::new(include_str!("redis/release_lease.lua")),
            queue_touch: Script::new(include_str!("redis/queue_touch.lua")),
            queue_ack: Script::new(include_str!("redis/queue_ack.lua")),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn submit_event(
        &self,
        ev: &JobEvent,
        routed_pool: Option<&str>,
        now: Millis,
    ) -> StoreResult<SubmitResult> {
        let mut r = self.submit_events(&[(ev, routed_pool)], now).await?;
        r.pop()
            .ok_or_else(|| corrupt("submit script", "no result for the event"))
    }

    async fn submit_events(
        &self,
        batch: &[(&JobEvent, Option<&str>)],
        now: Millis,
    ) -> StoreResult<Vec<SubmitResult>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // A queued (or waiting) event is nearly always a job's first and its
        // delivery's first: assumed so rather than read, which makes a batch
        // of them one round trip (the script's checks confirm the
        // assumption; see `Snapshot::assume_new`). Later events of a job
        // usually find it recorded: read first.
        let mut snap = Snapshot::default();
        let mut prefetch = Vec::new();
        for (ev, _) in batch {
            match ev.action {
                JobAction::Queued | JobAction::Waiting => {
                    snap.assume_new(&ev.delivery_id, ev.job_id);
                }
                JobAction::InProgress | JobAction::Completed => {
                    prefetch.push(Key::Delivery(ev.delivery_id.clone()));
                    prefetch.push(Key::Job(ev.job_id));
                    if !ev.runner_name.is_empty() {
                        prefetch.push(Key::Instance(ev.runner_name.clone()));
                    }
                }
            }
        }
        self.transact_from(snap, batch.len(), prefetch, now, |tx, i| {
            let (ev, routed_pool) = batch[i];
            rules::submit(tx, ev, routed_pool, now)
        })
        .await
    }

    async fn get_job(&self, job_id: u64) -> StoreResult<Option<Job>> {
        let key = self.key(&["job", &job_id.to_string()]);
        job_from_hash(&self.hgetall(&key).await?, &key)
    }

    async fn list_jobs(
        &self,
        pool: Option<&str>,
        state: Option<JobState>,
        cursor: u64,
        limit: usize,
    ) -> StoreResult<(Vec<Job>, Option<u64>)> {
        let index = match pool {
            Some(p) => self.key(&["pool", p, "jobs"]),
            None => self.key(&["jobs"]),
        };
        let mut conn = self.conn().await?;
        let mut page = Vec::new();
        let mut pos = cursor;
        const BATCH: u64 = 200;
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(&index)
                .arg(pos)
                .arg(pos + BATCH - 1)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if ids.is_empty() {
                return Ok((page, None));
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGETALL").arg(self.key(&["job", id]));
            }
            let hashes: Vec<HashMap<String, String>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            let mut expired = Vec::new();
            for (id, h) in ids.iter().zip(hashes) {
                pos += 1;
                let key = self.key(&["job", id]);
                match job_from_hash(&h, &key)? {
                    None => expired.push(id.clone()),
                    Some(j) if state.is_none_or(|s| j.state == s) => page.push(j),
                    Some(_) => {}
                }
                if page.len() >= limit {
                    break;
                }
            }
            if !expired.is_empty() {
                // Jobs past their retention: drop them from the index. The
                // cursor already counted them, so step back.
                let _: () = redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&expired)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                pos -= expired.len() as u64;
            }
            if page.len() >= limit {
                let total: u64 = redis::cmd("ZCARD")
                    .arg(&index)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                return Ok((page, (pos < total).then_some(pos)));
            }
        }
    }

    async fn get_instance(&self, name: &str) -> StoreResult<Option<InstanceRecord>> {
        let key = self.key(&["instance", name]);
        instance_from_hash(&self.hgetall(&key).await?, &key)
    }

    async fn list_instances(
        &self,
        pool: Option<&str>,
        include_deleted: bool,
    ) -> StoreResult<Vec<InstanceRecord>> {
        let mut conn = self.conn().await?;
        let index = self.key(&["instances"]);
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&index)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if names.is_empty() {
            // Redis refuses an empty pipeline ("empty command").
            return Ok(Vec::new());
        }
        names.sort();
        let mut pipe = redis::pipe();
        for n in &names {
            pipe.cmd("HGETALL").arg(self.key(&["instance", n]));
        }
        let hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (n, h) in names.iter().zip(hashes) {
            match instance_from_hash(&h, &self.key(&["instance", n]))? {
                None => gone.push(n.clone()),
                Some(i)
                    if pool.is_none_or(|p| i.pool == p)
                        && (include_deleted || i.state != InstanceState::Deleted) =>
                {
                    out.push(i)
                }
                Some(_) => {}
            }
        }
        if !gone.is_empty() {
            let _: () = redis::cmd("SREM")
                .arg(&index)
                .arg(&gone)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(out)
    }

    async fn begin_provision(
        &self,
        job_id: u64,
        name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginProvision> {
        self.transact_one(
            vec![Key::Job(job_id), Key::Instance(name.to_owned())],
            now,
            |tx| rules::begin_provision(tx, job_id, name, limits, now),
        )
        .await
    }

    async fn mark_creating(&self, name: &str, now: Millis) -> StoreResult<()> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::mark_creating(tx, name, now)
        })
        .await
    }

    async fn finish_provision(
        &self,
        job_id: u64,
        name: &str,
        provider_id: &str,
        location: &str,
        now: Millis,
    ) -> StoreResult<bool> {
        self.transact_one(
            vec![Key::Job(job_id), Key::Instance(name.to_owned())],
            now,
            |tx| rules::finish_provision(tx, job_id, name, provider_id, location, now),
        )
        .await
    }

    async fn fail_provision(
        &self,
        job_id: u64,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<()> {
        self.transact_one(
            vec![Key::Job(job_id), Key::Instance(name.to_owned())],
            now,
            |tx| rules::fail_provision(tx, job_id, name, reason, now),
        )
        .await
    }

    async fn enqueue_teardown(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::teardown(tx, name, reason, now)
        })
        .await
    }

    async fn begin_teardown(&self, name: &str, now: Millis) -> StoreResult<Option<InstanceRecord>> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::begin_teardown(tx, name, now)
        })
        .await
    }

    async fn finish_teardown(
        &self,
        name: &str,
        reason: &str,
        retention: Duration,
        now: Millis,
    ) -> StoreResult<()> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::finish_teardown(tx, name, reason, retention, now)
        })
        .await
    }

    async fn note_instance_error(&self, name: &str, reason: &str, now: Millis) -> StoreResult<()> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::note_instance_error(tx, name, reason, now)
        })
        .await
    }

    async fn note_job_waiting(&self, job_id: u64, reason: &str, now: Millis) -> StoreResult<()> {
        self.transact_one(vec![Key::Job(job_id)], now, |tx| {
            rules::note_job_waiting(tx, job_id, reason, now)
        })
        .await
    }

    async fn read(
        &self,
        queue: &Queue,
        consumer: &str,
        block: Duration,
    ) -> StoreResult<Option<Delivery>> {
        self.queue_read(queue, consumer, block).await
    }

    async fn claim_stale(
        &self,
        queue: &Queue,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<Delivery>> {
        self.queue_claim_stale(queue, consumer, min_idle, count)
            .await
    }

    async fn touch(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<bool> {
        self.queue_touch(queue, consumer, id).await
    }

    async fn ack(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<bool> {
        self.queue_ack(queue, consumer, id).await
    }

    async fn queue_depth(&self, queue: &Queue) -> StoreResult<QueueDepth> {
        self.queue_depth_of(queue).await
    }

    async fn retire_warm(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::retire_warm(tx, name, reason, now)
        })
        .await
    }

    async fn call_off_teardown(&self, name: &str, reason: &str, now: Millis) -> StoreResult<bool> {
        self.transact_one(vec![Key::Instance(name.to_owned())], now, |tx| {
            rules::call_off_teardown(tx, name, reason, now)
        })
        .await
    }

    async fn begin_warm(
        &self,
        pool: &str,
        name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginWarm> {
        self.transact_one(
            vec![Key::Pool(pool.to_owned()), Key::Instance(name.to_owned())],
            now,
            |tx| rules::begin_warm(tx, pool, name, limits, now),
        )
        .await
    }

    async fn pool_warm(&self, pool: &str) -> StoreResult<Vec<String>> {
        self.members(&self.key(&["pool", pool, "warm"])).await
    }

    async fn reserve_node(
        &self,
        node: &str,
        instance: &str,
        max: u32,
        visible: &[String],
    ) -> StoreResult<bool> {
        self.transact_one(vec![Key::Node(node.to_owned())], now_ms(), |tx| {
            rules::reserve_node(tx, node, instance, max, visible)
        })
        .await
    }

    async fn release_node(&self, node: &str, instance: &str) -> StoreResult<()> {
        self.transact_one(vec![], now_ms(), |tx| {
            rules::release_node(tx, node, instance)
        })
        .await
    }

    async fn node_places(&self, node: &str) -> StoreResult<Vec<String>> {
        self.members(&self.key(&["node", node, "places"])).await
    }

    async fn pool_in_use(&self, pool: &str) -> StoreResult<u32> {
        let mut conn = self.conn().await?;
        redis::cmd("SCARD")
            .arg(self.key(&["pool", pool, "live"]))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn pool_overrides(&self, pool: &str) -> StoreResult<PoolOverrides> {
        let h = self.hgetall(&self.key(&["pool", pool, "settings"])).await?;
        Ok(overrides_from_hash(&h))
    }

    async fn update_pool_overrides(
        &self,
        pool: &str,
        update: &PoolOverrides,
    ) -> StoreResult<PoolOverrides> {
        self.transact_one(vec![Key::Pool(pool.to_owned())], now_ms(), |tx| {
            rules::update_pool_overrides(tx, pool, update)
        })
        .await
    }

    async fn put_bootstrap_token(
        &self,
        token_hash: &str,
        instance: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.transact_one(vec![Key::Instance(instance.to_owned())], now_ms(), |tx| {
            rules::put_bootstrap_token(tx, token_hash, instance, ttl)
        })
        .await
    }

    async fn put_bootstrap_secret(
        &self,
        token_hash: &str,
        sealed: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(self.key(&["bootstrap-secret", token_hash]))
            .arg(sealed)
            .arg("PX")
            .arg(ttl_ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn bootstrap_secret(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.key(&["bootstrap-secret", token_hash]))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn lookup_bootstrap_token(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.key(&["bootstrap", token_hash]))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn revoke_bootstrap_token(&self, instance: &str) -> StoreResult<()> {
        self.transact_one(vec![Key::Instance(instance.to_owned())], now_ms(), |tx| {
            rules::revoke_bootstrap_token(tx, instance)
        })
        .await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: i64 = self
            .scripts
            .acquire_lease
            .key(self.key(&["lease", name]))
            .arg(holder)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let released: i64 = self
            .scripts
            .release_lease
            .key(self.key(&["lease", name]))
            .arg(holder)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(released == 1)
    }

    async fn watch(
        &self,
        pool: Option<String>,
    ) -> StoreResult<BoxStream<'static, StoreResult<Event>>> {
        let key = self.key(&["events"]);
        let block = Duration::from_secs(5);
        let mut conn = self.blocking_conn(block).await?;
        // Start after the newest event now: a watcher sees what happens from
        // here on.
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let start = items(last)
            .first()
            .and_then(|e| items(e.clone()).first().and_then(as_string))
            .unwrap_or_else(|| "0-0".into());
        let (tx, rx) = tokio::sync::mpsc::channel::<StoreResult<Event>>(256);
        tokio::spawn(async move {
            let mut last_id = start;
            loop {
                let r: redis::RedisResult<Value> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last_id)
                    .query_async(&mut conn)
                    .await;
                let v = match r {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                let entries = first_stream_entries(v);
                for e in entries {
                    let parts = items(e);
                    let Some(id) = parts.first().and_then(as_string) else {
                        continue;
                    };
                    last_id = id;
                    let fields = parts.get(1).cloned().map(items).unwrap_or_default();
                    if let Some(ev) = event_from_fields(&pairs(&fields))
                        && pool.as_deref().is_none_or(|p| ev.pool() == p)
                        && tx.send(Ok(ev)).await.is_err()
                    {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_hashes_with_bad_numbers_are_reported_as_corrupt_naming_the_key() {
        let mut h = HashMap::new();
        h.insert("state".to_owned(), "queued".to_owned());
        h.insert("job_id".to_owned(), "x".to_owned());
        let e = job_from_hash(&h, "grs:job:1").unwrap_err().to_string();
        assert!(e.contains("grs:job:1") && e.contains("job_id"), "{e}");
    }

    #[test]
    fn the_debug_form_hides_the_redis_url() {
        let s = RedisStore::new(
            "redis://:hunter2@127.0.0.1:6379",
            RedisStoreOptions::default(),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_bad_redis_url_is_refused_with_the_reason() {
        let e = RedisStore::new("http://nope", RedisStoreOptions::default()).unwrap_err();
        assert!(e.to_string().contains("invalid Redis URL"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    }
}
