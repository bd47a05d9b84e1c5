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

use std::collections::{BTreeSet, HashMap, HashSet};

use redis::Value;

use super::RedisStore;
use super::conn::unavailable;
use super::encoding::{
    as_string, changed, corrupt, event_fields, hash_of, instance_fields, instance_from_hash, items,
    job_fields, job_from_hash, overrides_from_hash,
};
use crate::model::{InstanceRecord, Job, JobState, Millis};
use crate::store::rules::{Change, Group, Key, PoolState, Read, Records, Seen, Tx};
use crate::store::{QueueItem, StoreError, StoreResult};

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
}

impl Snapshot {
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

/// The arguments of one `apply.lua` call.
#[derive(Debug, Default)]
struct Args(Vec<String>);

impl Args {
    fn push(&mut self, a: impl ToString) {
        self.0.push(a.to_string());
    }
}

/// A group's writes, counted as `apply.lua` wants them.
#[derive(Debug, Default)]
struct Writes {
    count: usize,
    args: Vec<String>,
}

impl Writes {
    fn op<const N: usize>(&mut self, parts: [String; N]) {
        self.count += 1;
        self.args.extend(parts);
    }

    /// `HSET` of `fields` (and a new `rev`).
    fn hset(&mut self, key: String, fields: Vec<(&'static str, String)>) {
        self.count += 1;
        self.args.push("h".into());
        self.args.push(key);
        self.args.push(fields.len().to_string());
        for (f, v) in fields {
            self.args.push(f.into());
            self.args.push(v);
        }
    }

    /// `XADD` of `fields`, capped at `maxlen` entries (`None`: uncapped).
    fn xadd(&mut self, key: String, maxlen: Option<u64>, fields: &[(&str, String)]) {
        self.count += 1;
        self.args.push("q".into());
        self.args.push(key);
        self.args
            .push(maxlen.map(|m| m.to_string()).unwrap_or_default());
        self.args.push(fields.len().to_string());
        for (f, v) in fields {
            self.args.push((*f).into());
            self.args.push(v.clone());
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

    /// The checks and writes of `group`, appended to `args`.
    fn encode(&self, args: &mut Args, snap: &Snapshot, group: &Group, now: Millis) {
        args.push(group.seen.len());
        for s in &group.seen {
            let (kind, key, want) = match s {
                Seen::Stored(Key::Delivery(id)) => (
                    "e",
                    self.key(&["delivery", id]),
                    if snap.deliveries.get(id).copied().unwrap_or(false) {
                        "1".to_owned()
                    } else {
                        "0".to_owned()
                    },
                ),
                Seen::Stored(Key::Job(id)) => (
                    "r",
                    self.job_key(*id),
                    snap.jobs
                        .get(id)
                        .map(|(_, r)| r.clone())
                        .unwrap_or_default(),
                ),
                Seen::Stored(Key::Instance(name)) => (
                    "r",
                    self.instance_key(name),
                    snap.instances
                        .get(name)
                        .map(|(_, _, r)| r.clone())
                        .unwrap_or_default(),
                ),
                Seen::Stored(Key::Pool(pool)) => (
                    "r",
                    self.key(&["pool", pool, "settings"]),
                    snap.pools
                        .get(pool)
                        .map(|(_, r)| r.clone())
                        .unwrap_or_default(),
                ),
                Seen::InUse { pool, count } => {
                    ("c", self.key(&["pool", pool, "live"]), count.to_string())
                }
                Seen::Warm { pool, count } => {
                    ("c", self.key(&["pool", pool, "warm"]), count.to_string())
                }
                // Node places are read as counts (Seen::Node), never as a
                // stored record; this compares the snapshot's count all the
                // same.
                Seen::Stored(Key::Node(node)) => (
                    "c",
                    self.node_key(node),
                    snap.nodes.get(node).map_or(0, |n| n.len()).to_string(),
                ),
                Seen::Node { node, count } => ("c", self.node_key(node), count.to_string()),
            };
            args.push(kind);
            args.push(key);
            args.push(want);
        }
        let mut w = Writes::default();
        for c in &group.changes {
            self.encode_change(&mut w, c, now);
        }
        args.push(w.count);
        args.0.extend(w.args);
    }

    fn encode_change(&self, w: &mut Writes, change: &Change, now: Millis) {
        let secs = |d: std::time::Duration| d.as_secs().max(1).to_string();
        match change {
            Change::Delivery(id) => w.op([
                "s".into(),
                self.key(&["delivery", id]),
                now.to_string(),
                secs(self.opts.dedup_ttl),
            ]),
            Change::Job { before, after } => {
                let jk = self.job_key(after.job_id);
                w.hset(
                    jk.clone(),
                    changed(before.as_ref().map(job_fields), job_fields(after)),
                );
                if before.is_none() {
                    let id = after.job_id.to_string();
                    w.op([
                        "z".into(),
                        self.key(&["jobs"]),
                        after.recorded_at.to_string(),
                        id.clone(),
                    ]);
                    if !after.pool.is_empty() {
                        w.op([
                            "z".into(),
                            self.key(&["pool", &after.pool, "jobs"]),
                            after.recorded_at.to_string(),
                            id,
                        ]);
                    }
                }
                // An ended (or unroutable) job is kept for the retention
                // period from when it got there.
                let ends = matches!(
                    after.state,
                    JobState::Completed | JobState::Failed | JobState::Unrouted
                );
                if ends && before.as_ref().is_none_or(|b| b.state != after.state) {
                    w.op(["x".into(), jk, secs(self.opts.job_retention)]);
                }
            }
            Change::Instance { before, after } => {
                w.hset(
                    self.instance_key(&after.name),
                    changed(before.as_ref().map(instance_fields), instance_fields(after)),
                );
                if before.is_none() {
                    w.op(["a".into(), self.key(&["instances"]), after.name.clone()]);
                }
            }
            Change::Retain { name, retention } => {
                w.op(["x".into(), self.instance_key(name), secs(*retention)]);
            }
            Change::TakeSlot { pool, instance } => {
                w.op([
                    "a".into(),
                    self.key(&["pool", pool, "live"]),
                    instance.clone(),
                ]);
            }
            Change::ReleaseSlot { pool, instance } => {
                w.op([
                    "m".into(),
                    self.key(&["pool", pool, "live"]),
                    instance.clone(),
                ]);
            }
            Change::WarmAdd { pool, instance } => {
                w.op([
                    "a".into(),
                    self.key(&["pool", pool, "warm"]),
                    instance.clone(),
                ]);
            }
            Change::WarmRemove { pool, instance } => {
                w.op([
                    "m".into(),
                    self.key(&["pool", pool, "warm"]),
                    instance.clone(),
                ]);
            }
            Change::NodeTake { node, instance } => {
                w.op(["a".into(), self.node_key(node), instance.clone()]);
            }
            Change::NodeRelease { node, instance } => {
                w.op(["m".into(), self.node_key(node), instance.clone()]);
            }
            Change::Push(q, item) => {
                let (key, _) = self.queue_key(q);
                let field = match item {
                    QueueItem::Provision { job_id } => ("job_id", job_id.to_string()),
                    QueueItem::Teardown { instance } => ("instance", instance.clone()),
                };
                w.xadd(key, None, &[field]);
            }
            Change::Emit(e) => {
                w.xadd(
                    self.key(&["events"]),
                    Some(self.opts.events_max),
                    &event_fields(e),
                );
            }
            Change::BindToken {
                instance,
                token_hash,
                ttl,
            } => {
                w.op([
                    "s".into(),
                    self.key(&["bootstrap", token_hash]),
                    instance.clone(),
                    secs(*ttl),
                ]);
                w.hset(
                    self.instance_key(instance),
                    vec![("bootstrap", token_hash.clone())],
                );
            }
            Change::DropToken {
                instance,
                token_hash,
            } => {
                w.op(["d".into(), self.key(&["bootstrap", token_hash])]);
                w.hset(
                    self.instance_key(instance),
                    vec![("bootstrap", String::new())],
                );
            }
            Change::Overrides { pool, overrides } => {
                let mut fields = Vec::new();
                if let Some(p) = overrides.paused {
                    fields.push(("paused", if p { "1" } else { "0" }.to_owned()));
                }
                if let Some(m) = overrides.min_idle {
                    fields.push(("min_idle", m.to_string()));
                }
                if let Some(m) = overrides.max_instances {
                    fields.push(("max_instances", m.to_string()));
                }
                w.hset(self.key(&["pool", pool, "settings"]), fields);
            }
        }
    }

    /// Writes `groups` with `apply.lua`; how many applied (the rest found a
    /// record changed since `snap` was read).
    async fn apply(&self, snap: &Snapshot, groups: &[Group], now: Millis) -> StoreResult<usize> {
        let mut args = Args::default();
        args.push(groups.len());
        for g in groups {
            self.encode(&mut args, snap, g, now);
        }
        let mut conn = self.conn().await?;
        let mut inv = self.scripts.apply.prepare_invoke();
        for a in &args.0 {
            inv.arg(a);
        }
        let applied: i64 = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
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
        let mut out = Vec::with_capacity(n);
        let mut snap = Snapshot::default();
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
            // Nothing to write, decided on one atomic read: done.
            if snap.rounds == 1 && groups.iter().all(|g| g.changes.is_empty()) {
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
            Err(StoreError::Unavailable(format!(
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
