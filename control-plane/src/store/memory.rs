//! [`Store`] in process memory: for `grs demo` and fast tests.
//!
//! One mutex guards everything, which makes every method atomic like the
//! Redis store's scripts. Queues mimic Redis streams with a consumer group:
//! entries wait in order, are held by a consumer until acknowledged, and can
//! be claimed once idle.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Notify, broadcast};

use super::{
    BeginProvision, Delivery, PoolLimits, Queue, QueueDepth, QueueItem, Store, StoreResult,
    SubmitResult,
};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobAction, JobEvent, JobState, Millis,
    PoolOverrides, SubmitOutcome, apply_event, instance_is_created,
};

#[derive(Debug, Default)]
struct MemQueue {
    next_seq: u64,
    waiting: VecDeque<(String, QueueItem)>,
    /// id → (item, consumer, last delivered or touched)
    pending: BTreeMap<String, (QueueItem, String, Instant)>,
}

#[derive(Debug, Default)]
struct State {
    deliveries: HashMap<String, Millis>,
    jobs: HashMap<u64, Job>,
    /// Jobs in recording order, for newest-first listing.
    job_order: Vec<u64>,
    instances: BTreeMap<String, InstanceRecord>,
    live: HashMap<String, BTreeSet<String>>,
    overrides: HashMap<String, PoolOverrides>,
    bootstrap: HashMap<String, (String, Instant)>,
    bootstrap_by_instance: HashMap<String, String>,
    queues: BTreeMap<Queue, MemQueue>,
    /// lease name → (holder, expiry)
    leases: HashMap<String, (String, Instant)>,
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

    fn emit(&self, e: Event) {
        // No watcher is fine.
        let _ = self.events.send(e);
    }

    fn push(&self, s: &mut State, q: Queue, item: QueueItem) {
        let mq = s.queues.entry(q).or_default();
        mq.next_seq += 1;
        mq.waiting.push_back((format!("{}-0", mq.next_seq), item));
        self.notify.notify_waiters();
    }

    fn set_instance_state(
        &self,
        inst: &mut InstanceRecord,
        to: InstanceState,
        reason: &str,
        now: Millis,
    ) {
        let from = inst.state;
        inst.state = to;
        inst.updated_at = now;
        if !reason.is_empty() {
            inst.reason = reason.to_owned();
        }
        self.emit(Event::Instance {
            at: now,
            name: inst.name.clone(),
            pool: inst.pool.clone(),
            from: Some(from),
            to,
            reason: reason.to_owned(),
        });
    }

    fn set_job_state(&self, job: &mut Job, to: JobState, reason: &str, now: Millis) {
        let from = job.state;
        job.state = to;
        job.updated_at = now;
        if !reason.is_empty() {
            job.reason = reason.to_owned();
        }
        self.emit(Event::Job {
            at: now,
            job_id: job.job_id,
            pool: job.pool.clone(),
            from: Some(from),
            to,
            reason: reason.to_owned(),
        });
    }

    /// Queues `name` for teardown if it exists and is not on its way out.
    fn teardown_locked(
        &self,
        s: &mut State,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> Option<bool> {
        let inst = s.instances.get_mut(name)?;
        if matches!(
            inst.state,
            InstanceState::PendingDelete | InstanceState::Deleting | InstanceState::Deleted
        ) {
            return Some(false);
        }
        self.set_instance_state(inst, InstanceState::PendingDelete, reason, now);
        self.push(
            s,
            Queue::Teardown,
            QueueItem::Teardown {
                instance: name.to_owned(),
            },
        );
        Some(true)
    }

    fn deliver(mq: &mut MemQueue, consumer: &str) -> Option<Delivery> {
        let (id, item) = mq.waiting.pop_front()?;
        mq.pending.insert(
            id.clone(),
            (item.clone(), consumer.to_owned(), Instant::now()),
        );
        Some(Delivery { id, item })
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
        let mut s = self.state.lock().unwrap();
        if s.deliveries.contains_key(&ev.delivery_id) {
            return Ok(SubmitResult {
                outcome: SubmitOutcome::DuplicateDelivery,
                job: s.jobs.get(&ev.job_id).cloned(),
                teardown: None,
            });
        }
        s.deliveries.insert(ev.delivery_id.clone(), now);
        let existing = s.jobs.get(&ev.job_id);
        let applied = apply_event(existing, ev, routed_pool, now);
        if applied.outcome != SubmitOutcome::Accepted {
            return Ok(SubmitResult {
                outcome: applied.outcome,
                job: Some(applied.job),
                teardown: None,
            });
        }
        let job = applied.job;
        if applied.from.is_none() {
            s.job_order.push(job.job_id);
        }
        self.emit(Event::Job {
            at: now,
            job_id: job.job_id,
            pool: job.pool.clone(),
            from: applied.from,
            to: job.state,
            reason: job.reason.clone(),
        });
        if applied.enqueue_provision {
            self.push(
                &mut s,
                Queue::Provision(job.pool.clone()),
                QueueItem::Provision { job_id: job.job_id },
            );
        }
        let mut teardown = None;
        match ev.action {
            JobAction::InProgress if !ev.runner_name.is_empty() => {
                if let Some(inst) = s.instances.get_mut(&ev.runner_name) {
                    inst.assigned_job_id = job.job_id;
                    inst.updated_at = now;
                }
                if let Some(h) = s.bootstrap_by_instance.remove(&ev.runner_name) {
                    s.bootstrap.remove(&h);
                }
            }
            JobAction::Completed => {
                let target = if !ev.runner_name.is_empty() {
                    Some(ev.runner_name.clone())
                } else {
                    s.instances
                        .get(&job.instance_name)
                        .filter(|i| i.assigned_job_id == 0)
                        .map(|i| i.name.clone())
                };
                if let Some(name) = target {
                    let created = s
                        .instances
                        .get(&name)
                        .is_some_and(|i| instance_is_created(i.state));
                    if created
                        && self.teardown_locked(
                            &mut s,
                            &name,
                            &format!("job {} completed", job.job_id),
                            now,
                        ) == Some(true)
                    {
                        teardown = Some(name);
                    }
                }
            }
            _ => {}
        }
        s.jobs.insert(job.job_id, job.clone());
        Ok(SubmitResult {
            outcome: SubmitOutcome::Accepted,
            job: Some(job),
            teardown,
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
        let mut s = self.state.lock().unwrap();
        let Some(job) = s.jobs.get(&job_id).cloned() else {
            return Ok(BeginProvision::Skip(format!(
                "job {job_id} is not recorded"
            )));
        };
        let (job_state, pool) = (job.state, job.pool.clone());
        if let Some(inst) = s.instances.get(name) {
            if !matches!(
                inst.state,
                InstanceState::PendingCreate | InstanceState::Creating
            ) {
                return Ok(BeginProvision::Skip(format!(
                    "instance {name} is {}",
                    inst.state
                )));
            }
            // A creation that did not finish (its worker died): finish it,
            // unless the job ended meanwhile; then remove what may exist.
            if job_state.is_terminal() {
                let reason = format!("job {job_id} is {job_state}");
                self.teardown_locked(&mut s, name, &reason, now);
                return Ok(BeginProvision::Skip(reason));
            }
            let inst = inst.clone();
            let job = s.jobs.get_mut(&job_id).unwrap_or_else(|| unreachable!());
            job.attempts += 1;
            return Ok(BeginProvision::Proceed {
                instance: inst,
                attempts: job.attempts,
            });
        }
        if let Some(skip) = provision_skip_reason(&job) {
            return Ok(BeginProvision::Skip(skip));
        }
        let ov = s.overrides.get(&pool).cloned().unwrap_or_default();
        if ov.paused.unwrap_or(limits.paused) {
            return Ok(BeginProvision::Paused);
        }
        let max = ov.max_instances.unwrap_or(limits.max_instances) as usize;
        let live = s.live.entry(pool.clone()).or_default();
        if live.len() >= max {
            return Ok(BeginProvision::NoCapacity);
        }
        live.insert(name.to_owned());
        let inst = InstanceRecord {
            name: name.to_owned(),
            pool: pool.clone(),
            job_id,
            assigned_job_id: 0,
            state: InstanceState::PendingCreate,
            provider_id: String::new(),
            location: String::new(),
            reason: String::new(),
            created_at: now,
            updated_at: now,
        };
        s.instances.insert(name.to_owned(), inst.clone());
        self.emit(Event::Instance {
            at: now,
            name: name.to_owned(),
            pool,
            from: None,
            to: InstanceState::PendingCreate,
            reason: String::new(),
        });
        let job = s.jobs.get_mut(&job_id).unwrap_or_else(|| unreachable!());
        job.instance_name = name.to_owned();
        job.attempts += 1;
        let attempts = job.attempts;
        if job.state == JobState::Queued {
            let mut j = job.clone();
            self.set_job_state(&mut j, JobState::Provisioning, "", now);
            s.jobs.insert(job_id, j);
        }
        Ok(BeginProvision::Proceed {
            instance: inst,
            attempts,
        })
    }

    async fn mark_creating(&self, name: &str, now: Millis) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(inst) = s
            .instances
            .get_mut(name)
            .filter(|i| i.state == InstanceState::PendingCreate)
        {
            let mut i = inst.clone();
            self.set_instance_state(&mut i, InstanceState::Creating, "", now);
            *inst = i;
        }
        Ok(())
    }

    async fn finish_provision(
        &self,
        job_id: u64,
        name: &str,
        provider_id: &str,
        location: &str,
        now: Millis,
    ) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        let Some(inst) = s.instances.get_mut(name) else {
            return Ok(false);
        };
        if !matches!(
            inst.state,
            InstanceState::PendingCreate | InstanceState::Creating
        ) {
            return Ok(false);
        }
        inst.provider_id = provider_id.to_owned();
        inst.location = location.to_owned();
        let mut i = inst.clone();
        self.set_instance_state(&mut i, InstanceState::Running, "", now);
        let assigned = i.assigned_job_id;
        s.instances.insert(name.to_owned(), i);
        let Some(job) = s.jobs.get(&job_id).cloned() else {
            return Ok(false);
        };
        if job.state == JobState::Provisioning {
            let mut j = job;
            self.set_job_state(&mut j, JobState::Provisioned, "", now);
            s.jobs.insert(job_id, j);
        } else if job.state == JobState::Completed && assigned == 0 {
            return Ok(self.teardown_locked(
                &mut s,
                name,
                &format!("job {job_id} completed while its instance was created"),
                now,
            ) == Some(true));
        }
        Ok(false)
    }

    async fn fail_provision(
        &self,
        job_id: u64,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(job) = s
            .jobs
            .get(&job_id)
            .cloned()
            .filter(|j| !j.state.is_terminal())
        {
            let mut j = job;
            self.set_job_state(&mut j, JobState::Failed, reason, now);
            s.jobs.insert(job_id, j);
        }
        self.teardown_locked(&mut s, name, reason, now);
        Ok(())
    }

    async fn enqueue_teardown(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>> {
        let mut s = self.state.lock().unwrap();
        Ok(self.teardown_locked(&mut s, name, reason, now))
    }

    async fn begin_teardown(&self, name: &str, now: Millis) -> StoreResult<Option<InstanceRecord>> {
        let mut s = self.state.lock().unwrap();
        let Some(inst) = s.instances.get_mut(name) else {
            return Ok(None);
        };
        match inst.state {
            InstanceState::Deleted => Ok(None),
            InstanceState::Deleting => Ok(Some(inst.clone())),
            _ => {
                let mut i = inst.clone();
                self.set_instance_state(&mut i, InstanceState::Deleting, "", now);
                *inst = i.clone();
                Ok(Some(i))
            }
        }
    }

    async fn finish_teardown(
        &self,
        name: &str,
        reason: &str,
        _retention: Duration,
        now: Millis,
    ) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        let Some(inst) = s.instances.get(name).cloned() else {
            return Ok(());
        };
        if inst.state == InstanceState::Deleted {
            return Ok(());
        }
        let mut i = inst;
        self.set_instance_state(&mut i, InstanceState::Deleted, reason, now);
        if let Some(live) = s.live.get_mut(&i.pool) {
            live.remove(name);
        }
        if let Some(h) = s.bootstrap_by_instance.remove(name) {
            s.bootstrap.remove(&h);
        }
        s.instances.insert(name.to_owned(), i);
        Ok(())
    }

    async fn note_instance_error(&self, name: &str, reason: &str, now: Millis) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(inst) = s.instances.get_mut(name) {
            inst.reason = reason.to_owned();
            inst.updated_at = now;
        }
        Ok(())
    }

    async fn read(
        &self,
        queue: &Queue,
        consumer: &str,
        block: Duration,
    ) -> StoreResult<Option<Delivery>> {
        let deadline = tokio::time::Instant::now() + block;
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
        for (id, (item, owner, at)) in mq.pending.iter_mut() {
            if out.len() >= count {
                break;
            }
            if now.duration_since(*at) >= min_idle {
                *owner = consumer.to_owned();
                *at = now;
                out.push(Delivery {
                    id: id.clone(),
                    item: item.clone(),
                });
            }
        }
        Ok(out)
    }

    async fn touch(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some((_, owner, at)) = s
            .queues
            .entry(queue.clone())
            .or_default()
            .pending
            .get_mut(id)
        {
            *owner = consumer.to_owned();
            *at = Instant::now();
        }
        Ok(())
    }

    async fn ack(&self, queue: &Queue, id: &str) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        s.queues
            .entry(queue.clone())
            .or_default()
            .pending
            .remove(id);
        Ok(())
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
        let mut s = self.state.lock().unwrap();
        let o = s.overrides.entry(pool.to_owned()).or_default();
        o.paused = update.paused.or(o.paused);
        o.min_idle = update.min_idle.or(o.min_idle);
        o.max_instances = update.max_instances.or(o.max_instances);
        let o = o.clone();
        // Capacity or pause changed: wake workers waiting on it.
        self.notify.notify_waiters();
        Ok(o)
    }

    async fn put_bootstrap_token(
        &self,
        token_hash: &str,
        instance: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(old) = s
            .bootstrap_by_instance
            .insert(instance.to_owned(), token_hash.to_owned())
        {
            s.bootstrap.remove(&old);
        }
        s.bootstrap.insert(
            token_hash.to_owned(),
            (instance.to_owned(), Instant::now() + ttl),
        );
        Ok(())
    }

    async fn lookup_bootstrap_token(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let s = self.state.lock().unwrap();
        Ok(s.bootstrap
            .get(token_hash)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(i, _)| i.clone()))
    }

    async fn revoke_bootstrap_token(&self, instance: &str) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(h) = s.bootstrap_by_instance.remove(instance) {
            s.bootstrap.remove(&h);
        }
        Ok(())
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

/// Why a provision entry for `job` needs no work, if it needs none.
fn provision_skip_reason(job: &Job) -> Option<String> {
    match job.state {
        JobState::Queued | JobState::Provisioning => None,
        // A runner of the pool took the job before its own instance was
        // made: that runner was made for another job, which now needs one.
        JobState::InProgress if job.instance_name.is_empty() => None,
        s => Some(format!("job {} is {s}", job.job_id)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MemoryStore;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store_passes_the_store_conformance_suite() {
        for name in conformance::ALL {
            conformance::run(name, Arc::new(MemoryStore::new())).await;
        }
    }
}
