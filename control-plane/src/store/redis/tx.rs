//! How the Redis store runs a [`rules`] decision: read, decide, write with
//! revision checks, redo on conflict.
//!
//! 1. [`RedisStore::load`] reads the records a decision needs in one
//!    pipelined `MULTI`/`EXEC` (an atomic snapshot). A record the decision
//!    finds missing ([`Read`]'s `Err`) is read the same way and the decision
//!    redone.
//! 2. The decision runs in Rust ([`rules`]): one group of changes per event
//!    of a batch.
//! 3. [`RedisStore::apply`] sends every group to `apply.lua` in one call.
//!    Each group checks that what it read is unchanged (the `rev` a hash
//!    gets on every write, a key's existence, a set's size) and writes only
//!    then; the first group whose check fails stops the script.
//! 4. Groups not applied are decided again on a fresh read.
//!
//! A batch of events therefore costs two round trips when nobody else
//! writes the same records meanwhile (three when a completion without a
//! runner needs its job's instance, which only the job record names), and
//! one when it writes nothing (redeliveries) on a snapshot read at once.
//! A batch of new jobs (`queued` events, nearly always a job's first) costs
//! one: its records are assumed absent instead of read
//! ([`Snapshot::assume_new`]), and `apply.lua` checks the assumption as it
//! checks any read; a wrong one (a redelivery, a job seen before) is a
//! conflict, redone on records read from Redis.
//!
//! The script's arguments are written straight into the `EVALSHA` command
//! ([`Call`]): records' fields are borrowed, not turned into strings first,
//! and only the fields that changed are sent.

use std::collections::{BTreeSet, HashMap, HashSet};

use redis::{ErrorKind, RedisWrite, ServerErrorKind, ToRedisArgs, Value};

use super::RedisStore;
use super::conn::unavailable;
use super::encoding::{
    as_string, changed, corrupt, event_fields, hash_of, instance_fields, instance_from_hash, items,
    job_fields, job_from_hash, overrides_from_hash,
};
use crate::model::{InstanceRecord, Job, JobState, Millis};
use crate::store::rules::{Change, Group, Key, PoolState, Read, Records, Seen, Tx};
use crate::store::{Queue, QueueItem, StoreError, StoreResult};

/// How many times a decision is redone on conflicting writes before the
/// call fails (as `Unavailable`, so the caller may retry). Each conflict
/// means another writer's change went through, so this bounds starvation,
/// not progress.
const MAX_ATTEMPTS: usize = 100;

/// Records read from Redis, as [`Records`], with what the revision checks
/// compare.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    deliveries: HashMap<String, bool>,
    /// job → (record, `rev`)
    jobs: HashMap<u64, (Option<Job>, String)>,
    /// instance → (record, bound token hash, `rev`)
    instances: HashMap<String, (Option<InstanceRecord>, Option<String>, String)>,
    /// pool → (overrides and capacity in use, settings `rev`)
    pools: HashMap<String, (PoolState, String)>,
    /// node → instances holding a place there
    nodes: HashMap<String, BTreeSet<String>>,
    /// Reads it took; 1 means one atomic snapshot.
    rounds: u32,
    /// Whether some records were assumed ([`Snapshot::assume_new`]) rather
    /// than read: then nothing is known until the checks of `apply.lua`
    /// have confirmed the assumptions.
    assumed: bool,
}

impl Snapshot {
    /// Assumes, without reading, that delivery `delivery` was never seen and
    /// that job `job` is not recorded: true of nearly every `queued` event,
    /// so such a batch is decided with no read and written in one round
    /// trip. The assumption is checked like any read (`apply.lua` compares
    /// the delivery's existence and the job's `rev` before writing), so a
    /// wrong one costs a conflict and a redo on records read from Redis,
    /// never a wrong write.
    pub(super) fn assume_new(&mut self, delivery: &str, job: u64) {
        self.assumed = true;
        self.deliveries.entry(delivery.to_owned()).or_insert(false);
        self.jobs.entry(job).or_insert((None, String::new()));
    }

    fn has(&self, key: &Key) -> bool {
        match key {
            Key::Delivery(id) => self.deliveries.contains_key(id),
            Key::Job(id) => self.jobs.contains_key(id),
            Key::Instance(name) => self.instances.contains_key(name),
            Key::Pool(pool) => self.pools.contains_key(pool),
            Key::Node(node) => self.nodes.contains_key(node),
        }
    }

    fn keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = Vec::new();
        keys.extend(self.deliveries.keys().cloned().map(Key::Delivery));
        keys.extend(self.jobs.keys().copied().map(Key::Job));
        keys.extend(self.instances.keys().cloned().map(Key::Instance));
        keys.extend(self.pools.keys().cloned().map(Key::Pool));
        keys.extend(self.nodes.keys().cloned().map(Key::Node));
        keys
    }
}

impl Records for Snapshot {
    fn delivery_seen(&self, id: &str) -> Read<bool> {
        self.deliveries
            .get(id)
            .copied()
            .ok_or_else(|| Key::Delivery(id.to_owned()))
    }

    fn job(&self, id: u64) -> Read<Option<Job>> {
        self.jobs
            .get(&id)
            .map(|(j, _)| j.clone())
            .ok_or(Key::Job(id))
    }

    fn instance(&self, name: &str) -> Read<Option<InstanceRecord>> {
        self.instances
            .get(name)
            .map(|(i, _, _)| i.clone())
            .ok_or_else(|| Key::Instance(name.to_owned()))
    }

    fn token(&self, name: &str) -> Read<Option<String>> {
        self.instances
            .get(name)
            .map(|(_, t, _)| t.clone())
            .ok_or_else(|| Key::Instance(name.to_owned()))
    }

    fn pool(&self, pool: &str) -> Read<PoolState> {
        self.pools
            .get(pool)
            .map(|(p, _)| p.clone())
            .ok_or_else(|| Key::Pool(pool.to_owned()))
    }

    fn node(&self, node: &str) -> Read<BTreeSet<String>> {
        self.nodes
            .get(node)
            .cloned()
            .ok_or_else(|| Key::Node(node.to_owned()))
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => as_string(other).and_then(|s| s.parse().ok()).unwrap_or(0),
    }
}

/// One `apply.lua` call being written: every argument goes straight into
/// the `EVALSHA` command's buffer (no string per argument, no copy).
struct Call {
    cmd: redis::Cmd,
}

impl Call {
    fn new(sha: &str) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(0);
        Self { cmd }
    }

    fn arg(&mut self, a: impl ToRedisArgs) -> &mut Self {
        self.cmd.arg(a);
        self
    }

    /// The key `<prefix>:<parts joined by ':'>`, written in place.
    fn key(&mut self, prefix: &str, parts: &[&dyn std::fmt::Display]) -> &mut Self {
        struct KeyArg<'a>(&'a str, &'a [&'a dyn std::fmt::Display]);
        impl ToRedisArgs for KeyArg<'_> {
            fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
                use std::io::Write as _;
                let mut w = out.writer_for_next_arg();
                // Writing to the command's own buffer cannot fail.
                let _ = w.write_all(self.0.as_bytes());
                for p in self.1 {
                    let _ = write!(w, ":{p}");
                }
            }
        }
        self.arg(KeyArg(prefix, parts))
    }

    /// `HSET` of `fields` (and a new `rev`).
    fn hset<V: ToRedisArgs>(
        &mut self,
        prefix: &str,
        key: &[&dyn std::fmt::Display],
        fields: &[(&'static str, V)],
    ) {
        self.hset_op("h", prefix, key, fields);
    }

    /// `HSET` of `fields` and `rev` 1, for a record the group checked has
    /// no `rev` (a new record): one command less than [`hset`](Self::hset).
    fn hset_new<V: ToRedisArgs>(
        &mut self,
        prefix: &str,
        key: &[&dyn std::fmt::Display],
        fields: &[(&'static str, V)],
    ) {
        self.hset_op("n", prefix, key, fields);
    }

    fn hset_op<V: ToRedisArgs>(
        &mut self,
        op: &str,
        prefix: &str,
        key: &[&dyn std::fmt::Display],
        fields: &[(&'static str, V)],
    ) {
        self.arg(op).key(prefix, key).arg(fields.len());
        for (f, v) in fields {
            self.arg(*f).arg(v);
        }
    }

    /// `XADD` of `fields`, capped at `maxlen` entries (`None`: uncapped).
    fn xadd<V: ToRedisArgs>(
        &mut self,
        prefix: &str,
        key: &[&dyn std::fmt::Display],
        maxlen: Option<u64>,
        fields: &[(&'static str, V)],
    ) {
        self.arg("q").key(prefix, key);
        match maxlen {
            Some(m) => self.arg(m),
            None => self.arg(""),
        };
        self.arg(fields.len());
        for (f, v) in fields {
            self.arg(*f).arg(v);
        }
    }
}

impl RedisStore {
    fn job_key(&self, id: u64) -> String {
        self.key(&["job", &id.to_string()])
    }

    fn instance_key(&self, name: &str) -> String {
        self.key(&["instance", name])
    }

    fn node_key(&self, node: &str) -> String {
        self.key(&["node", node, "places"])
    }

    /// Reads `keys` not yet in `snap` in one atomic pipeline.
    pub(super) async fn load(&self, snap: &mut Snapshot, keys: &[Key]) -> StoreResult<()> {
        let mut todo: Vec<&Key> = Vec::new();
        let mut seen = HashSet::new();
        for k in keys {
            if !snap.has(k) && seen.insert(k) {
                todo.push(k);
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for k in &todo {
            match k {
                Key::Delivery(id) => {
                    pipe.cmd("EXISTS").arg(self.key(&["delivery", id]));
                }
                Key::Job(id) => {
                    pipe.cmd("HGETALL").arg(self.job_key(*id));
                }
                Key::Instance(name) => {
                    pipe.cmd("HGETALL").arg(self.instance_key(name));
                }
                Key::Pool(pool) => {
                    pipe.cmd("HGETALL")
                        .arg(self.key(&["pool", pool, "settings"]))
                        .cmd("SCARD")
                        .arg(self.key(&["pool", pool, "live"]))
                        .cmd("SMEMBERS")
                        .arg(self.key(&["pool", pool, "warm"]));
                }
                Key::Node(node) => {
                    pipe.cmd("SMEMBERS").arg(self.node_key(node));
                }
            }
        }
        let mut conn = self.conn().await?;
        let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut it = replies.into_iter();
        let mut next = || it.next().unwrap_or(Value::Nil);
        for k in todo {
            match k {
                Key::Delivery(id) => {
                    snap.deliveries.insert(id.clone(), int(&next()) == 1);
                }
                Key::Job(id) => {
                    let key = self.job_key(*id);
                    let h = hash_of(&next());
                    let rev = h.get("rev").cloned().unwrap_or_default();
                    snap.jobs.insert(*id, (job_from_hash(&h, &key)?, rev));
                }
                Key::Instance(name) => {
                    let key = self.instance_key(name);
                    let h = hash_of(&next());
                    let rev = h.get("rev").cloned().unwrap_or_default();
                    let token = h.get("bootstrap").filter(|t| !t.is_empty()).cloned();
                    snap.instances
                        .insert(name.clone(), (instance_from_hash(&h, &key)?, token, rev));
                }
                Key::Node(node) => {
                    let held = items(next()).iter().filter_map(as_string).collect();
                    snap.nodes.insert(node.clone(), held);
                }
                Key::Pool(pool) => {
                    let h = hash_of(&next());
                    let rev = h.get("rev").cloned().unwrap_or_default();
                    let in_use = u32::try_from(int(&next())).unwrap_or(u32::MAX);
                    let warm = items(next()).iter().filter_map(as_string).collect();
                    snap.pools.insert(
                        pool.clone(),
                        (
                            PoolState {
                                overrides: overrides_from_hash(&h),
                                in_use,
                                warm,
                            },
                            rev,
                        ),
                    );
                }
            }
        }
        snap.rounds += 1;
        Ok(())
    }

    /// The checks and writes of `group`, appended to `call`.
    fn encode(&self, call: &mut Call, snap: &Snapshot, group: &Group, now: Millis) {
        let p = self.opts.prefix.as_str();
        call.arg(group.seen.len());
        for s in &group.seen {
            match s {
                Seen::Stored(Key::Delivery(id)) => {
                    let seen = snap.deliveries.get(id).copied().unwrap_or(false);
                    call.arg("e")
                        .key(p, &[&"delivery", id])
                        .arg(if seen { "1" } else { "0" });
                }
                Seen::Stored(Key::Job(id)) => {
                    let rev = snap.jobs.get(id).map(|(_, r)| r.as_str());
                    call.arg("r")
                        .key(p, &[&"job", id])
                        .arg(rev.unwrap_or_default());
                }
                Seen::Stored(Key::Instance(name)) => {
                    let rev = snap.instances.get(name).map(|(_, _, r)| r.as_str());
                    call.arg("r")
                        .key(p, &[&"instance", name])
                        .arg(rev.unwrap_or_default());
                }
                Seen::Stored(Key::Pool(pool)) => {
                    let rev = snap.pools.get(pool).map(|(_, r)| r.as_str());
                    call.arg("r")
                        .key(p, &[&"pool", pool, &"settings"])
                        .arg(rev.unwrap_or_default());
                }
                Seen::InUse { pool, count } => {
                    call.arg("c").key(p, &[&"pool", pool, &"live"]).arg(*count);
                }
                Seen::Warm { pool, count } => {
                    call.arg("c").key(p, &[&"pool", pool, &"warm"]).arg(*count);
                }
                // Node places are read as counts (Seen::Node), never as a
                // stored record; this compares the snapshot's count all the
                // same.
                Seen::Stored(Key::Node(node)) => {
                    let count = snap.nodes.get(node).map_or(0, |n| n.len());
                    call.arg("c").key(p, &[&"node", node, &"places"]).arg(count);
                }
                Seen::Node { node, count } => {
                    call.arg("c")
                        .key(p, &[&"node", node, &"places"])
                        .arg(*count);
                }
            }
        }
        for c in &group.changes {
            self.encode_change(call, c, now);
        }
        call.arg(".");
    }

    fn encode_change(&self, call: &mut Call, change: &Change, now: Millis) {
        let p = self.opts.prefix.as_str();
        let secs = |d: std::time::Duration| d.as_secs().max(1);
        match change {
            Change::Delivery(id) => {
                call.arg("s")
                    .key(p, &[&"delivery", id])
                    .arg(now)
                    .arg(secs(self.opts.dedup_ttl));
            }
            Change::Job { before, after } => {
                let id = &after.job_id;
                if let Some(b) = before {
                    call.hset(p, &[&"job", id], &changed(job_fields(b), job_fields(after)));
                } else {
                    // Read as absent by this group's decision, so its
                    // check (no `rev`) is in this group.
                    call.hset_new(p, &[&"job", id], &job_fields(after));
                    call.arg("z")
                        .key(p, &[&"jobs"])
                        .arg(after.recorded_at)
                        .arg(id);
                    if !after.pool.is_empty() {
                        call.arg("z")
                            .key(p, &[&"pool", &after.pool, &"jobs"])
                            .arg(after.recorded_at)
                            .arg(id);
                    }
                }
                // An unrouted job a pool now serves (rules::submit) joins
                // that pool's index, and lives on.
                if let Some(b) = before
                    && b.pool.is_empty()
                    && !after.pool.is_empty()
                {
                    call.arg("z")
                        .key(p, &[&"pool", &after.pool, &"jobs"])
                        .arg(after.recorded_at)
                        .arg(id);
                }
                // An ended (or unroutable) job is kept for the retention
                // period from when it got there.
                let ends = matches!(
                    after.state,
                    JobState::Completed | JobState::Failed | JobState::Unrouted
                );
                if ends && before.as_ref().is_none_or(|b| b.state != after.state) {
                    call.arg("x")
                        .key(p, &[&"job", id])
                        .arg(secs(self.opts.job_retention));
                } else if !ends
                    && before
                        .as_ref()
                        .is_some_and(|b| b.state == JobState::Unrouted)
                {
                    call.arg("p").key(p, &[&"job", id]);
                }
            }
            Change::Instance { before, after } => {
                let fields = match before {
                    Some(b) => changed(instance_fields(b), instance_fields(after)),
                    None => instance_fields(after),
                };
                call.hset(p, &[&"instance", &after.name], &fields);
                if before.is_none() {
                    call.arg("a").key(p, &[&"instances"]).arg(&after.name);
                }
            }
            Change::Retain { name, retention } => {
                call.arg("x")
                    .key(p, &[&"instance", name])
                    .arg(secs(*retention));
            }
            Change::TakeSlot { pool, instance } => {
                call.arg("a")
                    .key(p, &[&"pool", pool, &"live"])
                    .arg(instance);
            }
            Change::ReleaseSlot { pool, instance } => {
                call.arg("m")
                    .key(p, &[&"pool", pool, &"live"])
                    .arg(instance);
            }
            Change::Push(Queue::Provision(pool), QueueItem::Provision { job_id }) => {
                call.xadd(
                    p,
                    &[&"queue", &"provision", pool],
                    None,
                    &[("job_id", *job_id)],
                );
            }
            Change::WarmAdd { pool, instance } => {
                call.arg("a")
                    .key(p, &[&"pool", pool, &"warm"])
                    .arg(instance);
            }
            Change::WarmRemove { pool, instance } => {
                call.arg("m")
                    .key(p, &[&"pool", pool, &"warm"])
                    .arg(instance);
            }
            Change::NodeTake { node, instance } => {
                call.arg("a")
                    .key(p, &[&"node", node, &"places"])
                    .arg(instance);
            }
            Change::NodeRelease { node, instance } => {
                call.arg("m")
                    .key(p, &[&"node", node, &"places"])
                    .arg(instance);
            }
            Change::Push(q, item) => {
                let (key, _) = self.queue_key(q);
                let field = match item {
                    QueueItem::Provision { job_id } => ("job_id", job_id.to_string()),
                    QueueItem::Teardown { instance } => ("instance", instance.clone()),
                };
                call.xadd(&key, &[], None, &[field]);
            }
            Change::Emit(e) => {
                call.xadd(
                    p,
                    &[&"events"],
                    Some(self.opts.events_max),
                    &event_fields(e),
                );
            }
            Change::BindToken {
                instance,
                token_hash,
                ttl,
            } => {
                call.arg("s")
                    .key(p, &[&"bootstrap", token_hash])
                    .arg(instance)
                    .arg(secs(*ttl));
                call.hset(p, &[&"instance", instance], &[("bootstrap", token_hash)]);
            }
            Change::DropToken {
                instance,
                token_hash,
            } => {
                call.arg("d").key(p, &[&"bootstrap", token_hash]);
                call.hset(p, &[&"instance", instance], &[("bootstrap", "")]);
            }
            Change::Overrides { pool, overrides } => {
                let mut fields = Vec::new();
                if let Some(paused) = overrides.paused {
                    fields.push(("paused", u32::from(paused)));
                }
                if let Some(m) = overrides.min_idle {
                    fields.push(("min_idle", m));
                }
                if let Some(m) = overrides.max_instances {
                    fields.push(("max_instances", m));
                }
                call.hset(p, &[&"pool", pool, &"settings"], &fields);
            }
        }
    }

    /// Writes `groups` with `apply.lua`; how many applied (the rest found a
    /// record changed since `snap` was read).
    async fn apply(&self, snap: &Snapshot, groups: &[Group], now: Millis) -> StoreResult<usize> {
        let script = &self.scripts.apply;
        let mut call = Call::new(script.get_hash());
        for g in groups {
            self.encode(&mut call, snap, g, now);
        }
        let mut conn = self.conn().await?;
        let applied: i64 = match call.cmd.query_async(&mut conn).await {
            // Redis restarted, or the script cache was flushed: load it.
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(&mut conn).await.map_err(unavailable)?;
                call.cmd.query_async(&mut conn).await
            }
            r => r,
        }
        .map_err(unavailable)?;
        self.replicated(&mut conn).await?;
        usize::try_from(applied)
            .ok()
            .filter(|a| *a <= groups.len())
            .ok_or_else(|| corrupt("apply script", format!("applied {applied} groups")))
    }

    /// Runs `n` decisions (`decide(tx, i)`, one group each, in order, each
    /// seeing the ones before) reading `prefetch` first, and writes what
    /// they decided atomically per group; their results in order.
    pub(super) async fn transact<T>(
        &self,
        n: usize,
        prefetch: Vec<Key>,
        now: Millis,
        decide: impl Fn(&mut Tx<'_>, usize) -> Read<T>,
    ) -> StoreResult<Vec<T>> {
        self.transact_from(Snapshot::default(), n, prefetch, now, decide)
            .await
    }

    /// [`transact`](Self::transact) starting from `snap` (records assumed
    /// with [`Snapshot::assume_new`]; `prefetch` read on top of them).
    pub(super) async fn transact_from<T>(
        &self,
        snap: Snapshot,
        n: usize,
        prefetch: Vec<Key>,
        now: Millis,
        decide: impl Fn(&mut Tx<'_>, usize) -> Read<T>,
    ) -> StoreResult<Vec<T>> {
        let mut out = Vec::with_capacity(n);
        let mut snap = snap;
        let mut keys = prefetch;
        for _ in 0..MAX_ATTEMPTS {
            if out.len() == n {
                break;
            }
            self.load(&mut snap, &keys).await?;
            let (results, groups, missing) = {
                let mut tx = Tx::new(&snap);
                let mut results = Vec::with_capacity(n - out.len());
                let mut missing = Vec::new();
                for i in out.len()..n {
                    match decide(&mut tx, i) {
                        Ok(r) => results.push(r),
                        // Decide the rest anyway, to find what else is
                        // missing; the pass is redone once it is read.
                        Err(k) => missing.push(k),
                    }
                    tx.end_group();
                }
                (results, tx.into_groups(), missing)
            };
            if !missing.is_empty() {
                keys = missing;
                continue;
            }
            // Nothing to write, decided on one atomic read (and no
            // assumption): done.
            if snap.rounds == 1 && !snap.assumed && groups.iter().all(|g| g.changes.is_empty()) {
                out.extend(results);
                break;
            }
            let applied = self.apply(&snap, &groups, now).await?;
            out.extend(results.into_iter().take(applied));
            // Another writer changed a record a decision read: decide the
            // rest again on fresh records.
            keys = snap.keys();
            snap = Snapshot::default();
        }
        if out.len() == n {
            Ok(out)
        } else {
            Err(StoreError::unavailable(format!(
                "gave up after {MAX_ATTEMPTS} attempts: other writers kept changing the records"
            )))
        }
    }

    /// [`transact`](Self::transact) for one decision.
    pub(super) async fn transact_one<T>(
        &self,
        prefetch: Vec<Key>,
        now: Millis,
        decide: impl Fn(&mut Tx<'_>) -> Read<T>,
    ) -> StoreResult<T> {
        self.transact(1, prefetch, now, |tx, _| decide(tx))
            .await?
            .pop()
            .ok_or_else(|| corrupt("transact", "no result"))
    }
}
