//! [`Store`] in process memory: for `grs demo` and fast tests.
//!
//! One mutex guards everything, which makes every method atomic like the
//! Redis store's scripts. Every change to jobs, instances, capacity, tokens
//! and overrides is decided by [`rules`](super::rules) and applied here as
//! the [`Change`]s it returns: this file holds no rule of its own. Queues
//! mimic Redis streams with a consumer group: entries wait in order, are
//! held by a consumer until acknowledged, and can be claimed once idle.
//!
//! Time (idle entries, token expiry, leases) is tokio's clock, so tests of
//! timeouts run with paused time instead of sleeping. Deleted instances and
//! ended jobs are kept until the process ends (no retention).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::rules::{self, Change, PoolState, Read, Records, Tx};
use super::{
    BeginProvision, BeginWarm, Delivery, PoolLimits, Queue, QueueDepth, QueueItem, Store,
    StoreError, StoreResult, SubmitResult,
};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobEvent, JobState, Millis, PoolOverrides,
};

#[derive(Debug, Default)]
struct MemQueue {
    next_seq: u64,
    waiting: VecDeque<(u64, QueueItem)>,
    /// seq → (item, consumer, last delivered or touched); ordered by seq as
    /// a stream's pending entries are by id.
    pending: BTreeMap<u64, (QueueItem, String, Instant)>,
}

/// Entry ids look like Redis stream ids.
fn entry_id(seq: u64) -> String {
    format!("{seq}-0")
}

fn entry_seq(id: &str) -> Option<u64> {
    id.strip_suffix("-0")?.parse().ok()
}

#[derive(Debug, Default)]
struct State {
    deliveries: HashSet<String>,
    jobs: HashMap<u64, Job>,
    /// Jobs in recording order, for newest-first listing.
    job_order: Vec<u64>,
    instances: BTreeMap<String, InstanceRecord>,
    live: HashMap<String, BTreeSet<String>>,
    /// Each pool's warm set.
    warm: HashMap<String, BTreeSet<String>>,
    /// The places held on each hypervisor node.
    nodes: HashMap<String, BTreeSet<String>>,
    overrides: HashMap<String, PoolOverrides>,
    /// token hash → (instance, expiry)
    bootstrap: HashMap<String, (String, Instant)>,
    bootstrap_by_instance: HashMap<String, String>,
    /// token hash → (sealed secret, expiry)
    bootstrap_secrets: HashMap<String, (String, Instant)>,
    queues: BTreeMap<Queue, MemQueue>,
    /// lease name → (holder, expiry)
    leases: HashMap<String, (String, Instant)>,
}

impl Records for State {
    fn delivery_seen(&self, id: &str) -> Read<bool> {
        Ok(self.deliveries.contains(id))
    }

    fn job(&self, id: u64) -> Read<Option<Job>> {
        Ok(self.jobs.get(&id).cloned())
    }

    fn instance(&self, name: &str) -> Read<Option<InstanceRecord>> {
        Ok(self.instances.get(name).cloned())
    }

    fn token(&self, name: &str) -> Read<Option<String>> {
        Ok(self.bootstrap_by_instance.get(name).cloned())
    }

    fn pool(&self, pool: &str) -> Read<PoolState> {
        Ok(PoolState {
            overrides: self.overrides.get(pool).cloned().unwrap_or_default(),
            in_use: self.live.get(pool).map_or(0, |l| l.len() as u32),
            warm: self.warm.get(pool).cloned().unwrap_or_default(),
        })
    }

    fn node(&self, node: &str) -> Read<BTreeSet<String>> {
        Ok(self.nodes.get(node).cloned().unwrap_or_default())
    }
}

/// In-memory [`Store`].
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    notify: Notify,
    events: broadcast::Sender<Event>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            events: broadcast::channel(4096).0,
        }
    }

    /// Decides with `decide` (one group per call of it, `n` calls) under
    /// the lock and applies what it decided: atomic, like the Redis store's
    /// one script.
    fn transact<T>(
        &self,
        n: usize,
        decide: impl Fn(&mut Tx<'_>, usize) -> Read<T>,
    ) -> StoreResult<Vec<T>> {
        let mut s = self.state.lock().unwrap();
        let (results, groups) = {
            let mut tx = Tx::new(&*s);
            let mut results = Vec::with_capacity(n);
            for i in 0..n {
                results.push(decide(&mut tx, i).map_err(|key| StoreError::Corrupt {
                    key: format!("{key:?}"),
                    message: "the memory store holds every record, yet this one was missing".into(),
                })?);
                tx.end_group();
            }
            (results, tx.into_groups())
        };
        for change in groups.into_iter().flat_map(|g| g.changes) {
            self.apply(&mut s, change);
        }
        Ok(results)
    }

    /// [`transact`](Self::transact) for one decision.
    fn transact_one<T>(&self, decide: impl Fn(&mut Tx<'_>) -> Read<T>) -> StoreResult<T> {
        self.transact(1, |tx, _| decide(tx))?
            .pop()
            .ok_or_else(|| StoreError::Corrupt {
                key: "transact".into(),
                message: "no result".into(),
            })
    }

    fn apply(&self, s: &mut State, change: Change) {
        match change {
            Change::Delivery(id) => {
                s.deliveries.insert(id);
            }
            Change::Job { before, after } => {
                if before.is_none() {
                    s.job_order.push(after.job_id);
                }
                s.jobs.insert(after.job_id, after);
            }
            Change::Instance { after, .. } => {
                s.instances.insert(after.name.clone(), after);
            }
            // Kept until the process ends.
            Change::Retain { .. } => {}
            Change::TakeSlot { pool, instance } => {
                s.live.entry(pool).or_default().insert(instance);
            }
            Change::ReleaseSlot { pool, instance } => {
                if let Some(live) = s.live.get_mut(&pool) {
                    live.remove(&instance);
                }
            }
            Change::WarmAdd { pool, instance } => {
                s.warm.entry(pool).or_default().insert(instance);
                self.notify.notify_waiters();
            }
            Change::WarmRemove { pool, instance } => {
                if let Some(warm) = s.warm.get_mut(&pool) {
                    warm.remove(&instance);
                }
                self.notify.notify_waiters();
            }
            Change::NodeTake { node, instance } => {
                s.nodes.entry(node).or_default().insert(instance);
            }
            Change::NodeRelease { node, instance } => {
                if let Some(held) = s.nodes.get_mut(&node) {
                    held.remove(&instance);
                }
            }
            Change::Push(q, item) => {
                let mq = s.queues.entry(q).or_default();
                mq.next_seq += 1;
                mq.waiting.push_back((mq.next_seq, item));
                self.notify.notify_waiters();
            }
            Change::Emit(e) => {
                // No watcher is fine.
                let _ = self.events.send(e);
            }
            Change::BindToken {
                instance,
                token_hash,
                ttl,
            } => {
                s.bootstrap
                    .insert(token_hash.clone(), (instance.clone(), Instant::now() + ttl));
                s.bootstrap_by_instance.insert(instance, token_hash);
            }
            Change::DropToken {
                instance,
                token_hash,
            } => {
                s.bootstrap.remove(&token_hash);
                s.bootstrap_by_instance.remove(&instance);
            }
            Change::Overrides { pool, overrides } => {
                s.overrides.insert(pool, overrides);
                // Capacity or pause changed: wake workers waiting on it.
                self.notify.notify_waiters();
            }
        }
    }

    /// Entry `id` of `queue` if `consumer` holds it: its sequence number
    /// and when it was last delivered or touched.
    fn held<'a>(
        s: &'a mut State,
        queue: &Queue,
        consumer: &str,
        id: &str,
    ) -> Option<(u64, &'a mut Instant)> {
        let seq = entry_seq(id)?;
        let (_, owner, at) = s.queues.get_mut(queue)?.pending.get_mut(&seq)?;
        (owner == consumer).then_some((seq, at))
    }

    fn deliver(mq: &mut MemQueue, consumer: &str) -> Option<Delivery> {
        let (seq, item) = mq.waiting.pop_front()?;
        mq.pending
            .insert(seq, (item.clone(), consumer.to_owned(), Instant::now()));
        Some(Delivery {
            id: entry_id(seq),
            item,
        })
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn submit_event(
        &self,
        ev: &JobEvent,
        routed_pool: Option<&str>,
        now: Millis,
    ) -> StoreResult<SubmitResult> {
        self.transact_one(|tx| rules::submit(tx, ev, routed_pool, now))
    }

    async fn submit_events(
        &self,
        batch: &[(&JobEvent, Option<&str>)],
        now: Millis,
    ) -> StoreResult<Vec<SubmitResult>> {
        self.transact(batch.len(), |tx, i| {
            let (ev, routed_pool) = batch[i];
            rules::submit(tx, ev, routed_pool, now)
        })
    }

    async fn get_job(&self, job_id: u64) -> StoreResult<Option<Job>> {
        Ok(self.state.lock().unwrap().jobs.get(&job_id).cloned())
    }

    async fn list_jobs(
        &self,
        pool: Option<&str>,
        state: Option<JobState>,
        cursor: u64,
        limit: usize,
    ) -> StoreResult<(Vec<Job>, Option<u64>)> {
        let s = self.state.lock().unwrap();
        // The index of a pool's jobs, as the Redis store keeps one per pool.
        let index: Vec<&Job> = s
            .job_order
            .iter()
            .rev()
            .filter_map(|id| s.jobs.get(id))
            .filter(|j| pool.is_none_or(|p| j.pool == p))
            .collect();
        let mut page = Vec::new();
        let mut pos = cursor as usize;
        while pos < index.len() && page.len() < limit {
            if state.is_none_or(|st| index[pos].state == st) {
                page.push(index[pos].clone());
            }
            pos += 1;
        }
        Ok((page, (pos < index.len()).then_some(pos as u64)))
    }

    async fn get_instance(&self, name: &str) -> StoreResult<Option<InstanceRecord>> {
        Ok(self.state.lock().unwrap().instances.get(name).cloned())
    }

    async fn list_instances(
        &self,
        pool: Option<&str>,
        include_deleted: bool,
    ) -> StoreResult<Vec<InstanceRecord>> {
        let s = self.state.lock().unwrap();
        Ok(s.instances
            .values()
            .filter(|i| {
                pool.is_none_or(|p| i.pool == p)
                    && (include_deleted || i.state != InstanceState::Deleted)
            })
            .cloned()
            .collect())
    }

    async fn begin_provision(
        &self,
        job_id: u64,
        name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginProvision> {
        self.transact_one(|tx| rules::begin_provision(tx, job_id, name, limits, now))
    }

    async fn mark_creating(&self, name: &str, now: Millis) -> StoreResult<()> {
        self.transact_one(|tx| rules::mark_creating(tx, name, now))
    }

    async fn finish_provision(
        &self,
        job_id: u64,
        name: &str,
        provider_id: &str,
        location: &str,
        now: Millis,
    ) -> StoreResult<bool> {
        self.transact_one(|tx| {
            rules::finish_provision(tx, job_id, name, provider_id, location, now)
        })
    }

    async fn fail_provision(
        &self,
        job_id: u64,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<()> {
        self.transact_one(|tx| rules::fail_provision(tx, job_id, name, reason, now))
    }

    async fn enqueue_teardown(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>> {
        self.transact_one(|tx| rules::teardown(tx, name, reason, now))
    }

    async fn begin_teardown(&self, name: &str, now: Millis) -> StoreResult<Option<InstanceRecord>> {
        self.transact_one(|tx| rules::begin_teardown(tx, name, now))
    }

    async fn finish_teardown(
        &self,
        name: &str,
        reason: &str,
        retention: Duration,
        now: Millis,
    ) -> StoreResult<()> {
        self.transact_one(|tx| rules::finish_teardown(tx, name, reason, retention, now))
    }

    async fn note_instance_error(&self, name: &str, reason: &str, now: Millis) -> StoreResult<()> {
        self.transact_one(|tx| rules::note_instance_error(tx, name, reason, now))
    }

    async fn note_job_waiting(&self, job_id: u64, reason: &str, now: Millis) -> StoreResult<()> {
        self.transact_one(|tx| rules::note_job_waiting(tx, job_id, reason, now))
    }

    async fn retire_warm(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>> {
        self.transact_one(|tx| rules::retire_warm(tx, name, reason, now))
    }

    async fn call_off_teardown(&self, name: &str, reason: &str, now: Millis) -> StoreResult<bool> {
        self.transact_one(|tx| rules::call_off_teardown(tx, name, reason, now))
    }

    async fn begin_warm(
        &self,
        pool: &str,
        name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginWarm> {
        self.transact_one(|tx| rules::begin_warm(tx, pool, name, limits, now))
    }

    async fn reserve_node(
        &self,
        node: &str,
        instance: &str,
        max: u32,
        visible: &[String],
    ) -> StoreResult<bool> {
        self.transact_one(|tx| rules::reserve_node(tx, node, instance, max, visible))
    }

    async fn release_node(&self, node: &str, instance: &str) -> StoreResult<()> {
        self.transact_one(|tx| rules::release_node(tx, node, instance))
    }

    async fn node_places(&self, node: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .nodes
            .get(node)
            .map(|w| w.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn pool_warm(&self, pool: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .warm
            .get(pool)
            .map(|w| w.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn read(
        &self,
        queue: &Queue,
        consumer: &str,
        block: Duration,
    ) -> StoreResult<Option<Delivery>> {
        let deadline = Instant::now() + block;
        loop {
            // Register interest before checking, so a push between the check
            // and the wait is not missed.
            let notified = self.notify.notified();
            {
                let mut s = self.state.lock().unwrap();
                if let Some(d) = Self::deliver(s.queues.entry(queue.clone()).or_default(), consumer)
                {
                    return Ok(Some(d));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn claim_stale(
        &self,
        queue: &Queue,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<Delivery>> {
        let mut s = self.state.lock().unwrap();
        let mq = s.queues.entry(queue.clone()).or_default();
        let now = Instant::now();
        let mut out = Vec::new();
        for (seq, (item, owner, at)) in mq.pending.iter_mut() {
            if out.len() >= count {
                break;
            }
            if now.duration_since(*at) >= min_idle {
                *owner = consumer.to_owned();
                *at = now;
                out.push(Delivery {
                    id: entry_id(*seq),
                    item: item.clone(),
                });
            }
        }
        Ok(out)
    }

    async fn touch(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        match Self::held(&mut s, queue, consumer, id) {
            Some((_, at)) => {
                *at = Instant::now();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn ack(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        let Some((seq, _)) = Self::held(&mut s, queue, consumer, id) else {
            return Ok(false);
        };
        s.queues
            .entry(queue.clone())
            .or_default()
            .pending
            .remove(&seq);
        Ok(true)
    }

    async fn queue_depth(&self, queue: &Queue) -> StoreResult<QueueDepth> {
        let s = self.state.lock().unwrap();
        Ok(s.queues
            .get(queue)
            .map(|q| QueueDepth {
                depth: (q.waiting.len() + q.pending.len()) as u64,
                pending: q.pending.len() as u64,
            })
            .unwrap_or_default())
    }

    async fn pool_in_use(&self, pool: &str) -> StoreResult<u32> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .live
            .get(pool)
            .map(|l| l.len() as u32)
            .unwrap_or(0))
    }

    async fn pool_overrides(&self, pool: &str) -> StoreResult<PoolOverrides> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .overrides
            .get(pool)
            .cloned()
            .unwrap_or_default())
    }

    async fn update_pool_overrides(
        &self,
        pool: &str,
        update: &PoolOverrides,
    ) -> StoreResult<PoolOverrides> {
        self.transact_one(|tx| rules::update_pool_overrides(tx, pool, update))
    }

    async fn put_bootstrap_token(
        &self,
        token_hash: &str,
        instance: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.transact_one(|tx| rules::put_bootstrap_token(tx, token_hash, instance, ttl))
    }

    async fn put_bootstrap_secret(
        &self,
        token_hash: &str,
        sealed: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        s.bootstrap_secrets.retain(|_, (_, exp)| *exp > now);
        s.bootstrap_secrets
            .insert(token_hash.to_owned(), (sealed.to_owned(), now + ttl));
        Ok(())
    }

    async fn bootstrap_secret(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let s = self.state.lock().unwrap();
        Ok(s.bootstrap_secrets
            .get(token_hash)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(v, _)| v.clone()))
    }

    async fn lookup_bootstrap_token(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let s = self.state.lock().unwrap();
        Ok(s.bootstrap
            .get(token_hash)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(i, _)| i.clone()))
    }

    async fn revoke_bootstrap_token(&self, instance: &str) -> StoreResult<()> {
        self.transact_one(|tx| rules::revoke_bootstrap_token(tx, instance))
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        match s.leases.get(name) {
            Some((h, until)) if h != holder && *until > now => Ok(false),
            _ => {
                s.leases
                    .insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        match s.leases.get(name) {
            Some((h, until)) if h == holder && *until > now => {
                s.leases.remove(name);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn watch(
        &self,
        pool: Option<String>,
    ) -> StoreResult<BoxStream<'static, StoreResult<Event>>> {
        let rx = self.events.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx)
            // A watcher too slow to keep up misses events rather than
            // holding memory; it is told by the gap, not by an error.
            .filter_map(|r| async move { r.ok() })
            .filter(move |e| {
                let keep = pool.as_deref().is_none_or(|p| e.pool() == p);
                async move { keep }
            })
            .map(Ok);
        Ok(stream.boxed())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MemoryStore;
    use crate::store::conformance;

    /// One test per conformance check, on tokio's paused clock: sleeps in
    /// the checks advance it at once, and the store's timeouts follow it.
    macro_rules! memory_store_conformance {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test(start_paused = true)]
            async fn $name() {
                conformance::run(stringify!($name), Arc::new(MemoryStore::new())).await;
            }
        )*};
    }

    crate::store_conformance_checks!(memory_store_conformance);
}
