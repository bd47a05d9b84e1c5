//! Differential property test of the two stores.
//!
//! Generated sequences of operations (job events of every action, with and
//! without runners, redelivered and out of order, alone and in batches;
//! provisioning that succeeds or fails; teardowns; queue reads, acks,
//! touches and reclaims; reconciler-like teardowns; pool updates; bootstrap
//! tokens; warm instances made, bound to jobs, handed back and torn down;
//! teardowns called off) are driven through a [`MemoryStore`] and a [`RedisStore`] (a real
//! Redis, a fresh key prefix per case). After every step, the answer of the
//! step and every observable (each job, every instance, queue depths,
//! capacity in use, pool overrides, tokens, the listing, and the events
//! `watch` streams) must be the same in both.
//!
//! Cases: `PROPTEST_CASES` (default 64, a few seconds). A failure prints the
//! shrunk, minimal sequence.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use grs_control_plane::model::{Event, JobAction, JobEvent, PoolOverrides};
use grs_control_plane::store::{
    MemoryStore, PoolLimits, Queue, QueueItem, RedisStore, Store, StoreResult,
};
use grs_control_plane::testing::redis_store;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Job ids events use; instance `grs-<id>` belongs to job `<id>`. Job 4
/// never gets an event, so `grs-4` stays unknown.
const JOBS: u64 = 3;

fn instance(job: u64) -> String {
    format!("grs-{job}")
}

/// Warm instances: `grs-w1`, `grs-w2`.
const WARM: u8 = 2;

fn warm(n: u8) -> String {
    format!("grs-w{n}")
}

/// One generated `workflow_job` event.
#[derive(Debug, Clone)]
struct Ev {
    /// Few ids: the same id twice is a redelivery (whatever it says).
    delivery: u8,
    action: JobAction,
    job: u64,
    /// "" (no runner), one of our instances, or a stranger's runner.
    runner: &'static str,
    runner_id: u64,
    routed: Option<&'static str>,
}

impl Ev {
    fn event(&self) -> JobEvent {
        JobEvent {
            delivery_id: format!("d{}", self.delivery),
            action: self.action,
            job_id: self.job,
            run_id: 700 + self.job,
            run_attempt: 1,
            labels: vec!["self-hosted".into(), "linux".into()],
            runner_id: self.runner_id,
            runner_name: self.runner.to_owned(),
            repository: "octo-org/app".into(),
            organization: "octo-org".into(),
            installation_id: 5,
            conclusion: if self.action == JobAction::Completed {
                "success".into()
            } else {
                String::new()
            },
            job_name: format!("build-{}", self.job),
            workflow_name: "CI".into(),
        }
    }
}

/// A queue, by index into [`queues`].
#[derive(Debug, Clone, Copy)]
struct Q(u8);

fn queues() -> [Queue; 3] {
    [
        Queue::Provision("linux".into()),
        Queue::Provision("other".into()),
        Queue::Teardown,
    ]
}

impl Q {
    fn queue(self) -> Queue {
        queues()[self.0 as usize % 3].clone()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Submit(Ev),
    Batch(Vec<Ev>),
    BeginProvision {
        job: u64,
        max: u32,
        paused: bool,
    },
    MarkCreating(u64),
    FinishProvision(u64),
    FailProvision(u64),
    EnqueueTeardown(u64),
    BeginTeardown(u64),
    FinishTeardown(u64),
    NoteError(u64),
    Read(Q, u8),
    /// Consumer `c` acknowledges the n-th entry held (modulo how many are
    /// held); only its holder's acknowledgement takes it.
    Ack(u8, u8),
    Touch(u8, u8),
    /// Reclaim every held entry (idle for at least 0 ms) of a queue.
    ClaimStale(Q, u8, u8),
    UpdatePool {
        pool: &'static str,
        paused: Option<bool>,
        min_idle: Option<u32>,
        max_instances: Option<u32>,
    },
    PutToken(u64, u8),
    RevokeToken(u64),
    /// A warm keeper of pool `linux` asks for warm instance n.
    BeginWarm {
        n: u8,
        min_idle: u32,
        max: u32,
    },
    /// Warm instance n is made (or its making failed).
    FinishWarm(u8, bool),
    /// Warm instance n queued for teardown (recycled or surplus).
    TeardownWarm(u8),
    /// A teardown called off (GitHub said the runner is busy): job
    /// instances 1..=4, then warm ones.
    CallOff(u8),
    /// A backend holds a place on node1 for job instance n (seeing
    /// `visible` other VMs there).
    ReserveNode {
        job: u64,
        max: u32,
        visible: u8,
    },
    ReleaseNode(u64),
    /// What the reconciler does to runners that took no job: every created
    /// instance with no job assigned is queued for teardown.
    ReconcileIdle,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0u8..6,
        prop_oneof![
            Just(JobAction::Queued),
            Just(JobAction::Waiting),
            Just(JobAction::InProgress),
            Just(JobAction::Completed),
        ],
        1..=JOBS,
        prop_oneof![
            3 => Just(""),
            1 => Just("grs-1"),
            1 => Just("grs-2"),
            1 => Just("grs-3"),
            1 => Just("grs-w1"),
            1 => Just("grs-w2"),
            1 => Just("someone-elses-runner"),
        ],
        prop_oneof![Just(0u64), Just(42u64)],
        prop_oneof![
            3 => Just(Some("linux")),
            1 => Just(Some("other")),
            1 => Just(None),
        ],
    )
        .prop_map(|(delivery, action, job, runner, runner_id, routed)| Ev {
            delivery,
            action,
            job,
            runner,
            runner_id,
            routed,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let job = || 1..=JOBS + 1;
    let q = || (0u8..3).prop_map(Q);
    prop_oneof![
        6 => ev().prop_map(Op::Submit),
        2 => proptest::collection::vec(ev(), 1..5).prop_map(Op::Batch),
        4 => (job(), 1u32..3, proptest::bool::weighted(0.2))
            .prop_map(|(job, max, paused)| Op::BeginProvision { job, max, paused }),
        2 => job().prop_map(Op::MarkCreating),
        3 => job().prop_map(Op::FinishProvision),
        1 => job().prop_map(Op::FailProvision),
        1 => job().prop_map(Op::EnqueueTeardown),
        2 => job().prop_map(Op::BeginTeardown),
        2 => job().prop_map(Op::FinishTeardown),
        1 => job().prop_map(Op::NoteError),
        3 => (q(), 0u8..2).prop_map(|(q, c)| Op::Read(q, c)),
        2 => (any::<u8>(), 0u8..2).prop_map(|(n, c)| Op::Ack(n, c)),
        1 => (any::<u8>(), 0u8..2).prop_map(|(n, c)| Op::Touch(n, c)),
        1 => (q(), 0u8..2, 1u8..3).prop_map(|(q, c, n)| Op::ClaimStale(q, c, n)),
        1 => (
            prop_oneof![Just("linux"), Just("other")],
            proptest::option::of(any::<bool>()),
            proptest::option::of(0u32..3),
            proptest::option::of(0u32..3),
        )
            .prop_map(|(pool, paused, min_idle, max_instances)| Op::UpdatePool {
                pool,
                paused,
                min_idle,
                max_instances,
            }),
        1 => (job(), 0u8..3).prop_map(|(j, t)| Op::PutToken(j, t)),
        1 => job().prop_map(Op::RevokeToken),
        3 => (1..=WARM, 0u32..3, 1u32..4)
            .prop_map(|(n, min_idle, max)| Op::BeginWarm { n, min_idle, max }),
        2 => (1..=WARM, proptest::bool::weighted(0.8)).prop_map(|(n, ok)| Op::FinishWarm(n, ok)),
        1 => (1..=WARM).prop_map(Op::TeardownWarm),
        1 => (1..=JOBS as u8 + 1 + WARM).prop_map(Op::CallOff),
        2 => (job(), 1u32..3, 0u8..2)
            .prop_map(|(job, max, visible)| Op::ReserveNode { job, max, visible }),
        1 => job().prop_map(Op::ReleaseNode),
        1 => Just(Op::ReconcileIdle),
    ]
}

/// One store under test, with the queue entries it handed out (their ids
/// differ between stores; tests refer to them by position).
struct Side {
    store: Box<dyn Store>,
    held: Vec<(Queue, String)>,
    watch: BoxStream<'static, StoreResult<Event>>,
}

impl Side {
    async fn new(store: Box<dyn Store>) -> Self {
        let watch = store.watch(None).await.unwrap();
        Self {
            store,
            held: Vec::new(),
            watch,
        }
    }

    fn hold(&mut self, q: &Queue, id: String) {
        if !self.held.iter().any(|(hq, hid)| hq == q && *hid == id) {
            self.held.push((q.clone(), id));
        }
    }

    /// Applies `op` at `now`; the answer, with queue entry ids left out.
    async fn apply(&mut self, op: &Op, now: i64) -> String {
        let s = &*self.store;
        let limits = |max, paused| PoolLimits {
            max_instances: max,
            paused,
            min_idle: 0,
        };
        match op {
            Op::Submit(e) => {
                let r = s.submit_event(&e.event(), e.routed, now).await.unwrap();
                format!("{r:?}")
            }
            Op::Batch(evs) => {
                let events: Vec<JobEvent> = evs.iter().map(Ev::event).collect();
                let batch: Vec<(&JobEvent, Option<&str>)> = events
                    .iter()
                    .zip(evs)
                    .map(|(e, spec)| (e, spec.routed))
                    .collect();
                format!("{:?}", s.submit_events(&batch, now).await.unwrap())
            }
            Op::BeginProvision { job, max, paused } => format!(
                "{:?}",
                s.begin_provision(*job, &instance(*job), &limits(*max, *paused), now)
                    .await
                    .unwrap()
            ),
            Op::MarkCreating(j) => format!("{:?}", s.mark_creating(&instance(*j), now).await),
            Op::FinishProvision(j) => format!(
                "{:?}",
                s.finish_provision(*j, &instance(*j), &format!("vm/{j}"), "node1", now)
                    .await
                    .unwrap()
            ),
            Op::FailProvision(j) => format!(
                "{:?}",
                s.fail_provision(*j, &instance(*j), "clone failed: no space", now)
                    .await
                    .unwrap()
            ),
            Op::EnqueueTeardown(j) => format!(
                "{:?}",
                s.enqueue_teardown(&instance(*j), "operator", now)
                    .await
                    .unwrap()
            ),
            Op::BeginTeardown(j) => {
                format!("{:?}", s.begin_teardown(&instance(*j), now).await.unwrap())
            }
            Op::FinishTeardown(j) => format!(
                "{:?}",
                s.finish_teardown(&instance(*j), "", Duration::from_secs(3600), now)
                    .await
                    .unwrap()
            ),
            Op::NoteError(j) => format!(
                "{:?}",
                s.note_instance_error(&instance(*j), "delete failed (attempt 1)", now)
                    .await
                    .unwrap()
            ),
            Op::Read(q, c) => {
                let queue = q.queue();
                let d = s
                    .read(&queue, &format!("c{c}"), Duration::from_millis(1))
                    .await
                    .unwrap();
                let item = d.as_ref().map(|d| d.item.clone());
                if let Some(d) = d {
                    self.hold(&queue, d.id);
                }
                format!("{item:?}")
            }
            Op::Ack(n, c) => {
                if self.held.is_empty() {
                    return "nothing held".into();
                }
                let at = *n as usize % self.held.len();
                let (q, id) = self.held[at].clone();
                let acked = s.ack(&q, &format!("c{c}"), &id).await.unwrap();
                if acked {
                    self.held.remove(at);
                }
                format!("ack of an entry of {q} by c{c}: {acked}")
            }
            Op::Touch(n, c) => {
                if self.held.is_empty() {
                    return "nothing held".into();
                }
                let (q, id) = self.held[*n as usize % self.held.len()].clone();
                let held = s.touch(&q, &format!("c{c}"), &id).await.unwrap();
                format!("touch of an entry of {q} by c{c}: {held}")
            }
            Op::ClaimStale(q, c, n) => {
                let queue = q.queue();
                let claimed = s
                    .claim_stale(&queue, &format!("c{c}"), Duration::ZERO, *n as usize)
                    .await
                    .unwrap();
                let items: Vec<QueueItem> = claimed.iter().map(|d| d.item.clone()).collect();
                for d in claimed {
                    self.hold(&queue, d.id);
                }
                format!("{items:?}")
            }
            Op::UpdatePool {
                pool,
                paused,
                min_idle,
                max_instances,
            } => format!(
                "{:?}",
                s.update_pool_overrides(
                    pool,
                    &PoolOverrides {
                        paused: *paused,
                        min_idle: *min_idle,
                        max_instances: *max_instances,
                    },
                )
                .await
                .unwrap()
            ),
            Op::PutToken(j, t) => format!(
                "{:?}",
                s.put_bootstrap_token(&format!("tok{t}"), &instance(*j), Duration::from_secs(600))
                    .await
                    .unwrap()
            ),
            Op::RevokeToken(j) => {
                format!("{:?}", s.revoke_bootstrap_token(&instance(*j)).await)
            }
            Op::BeginWarm { n, min_idle, max } => format!(
                "{:?}",
                s.begin_warm(
                    "linux",
                    &warm(*n),
                    &PoolLimits {
                        max_instances: *max,
                        paused: false,
                        min_idle: *min_idle,
                    },
                    now,
                )
                .await
                .unwrap()
            ),
            Op::FinishWarm(n, true) => format!(
                "{:?}",
                s.finish_provision(0, &warm(*n), &format!("vm/w{n}"), "node1", now)
                    .await
                    .unwrap()
            ),
            Op::FinishWarm(n, false) => format!(
                "{:?}",
                s.fail_provision(0, &warm(*n), "warm instance not made: clone failed", now)
                    .await
                    .unwrap()
            ),
            Op::TeardownWarm(n) => format!(
                "{:?}",
                s.retire_warm(&warm(*n), "idle warm instance recycled", now)
                    .await
                    .unwrap()
            ),
            Op::CallOff(i) => {
                let name = if u64::from(*i) <= JOBS + 1 {
                    instance(u64::from(*i))
                } else {
                    warm(*i - JOBS as u8 - 1)
                };
                format!(
                    "{:?}",
                    s.call_off_teardown(&name, "runner busy", now)
                        .await
                        .unwrap()
                )
            }
            Op::ReserveNode { job, max, visible } => {
                let visible: Vec<String> = (0..*visible).map(|v| format!("grs-seen{v}")).collect();
                format!(
                    "{:?}",
                    s.reserve_node("node1", &instance(*job), *max, &visible)
                        .await
                        .unwrap()
                )
            }
            Op::ReleaseNode(j) => format!(
                "{:?}",
                s.release_node("node1", &instance(*j)).await.unwrap()
            ),
            Op::ReconcileIdle => {
                let mut out = Vec::new();
                for i in s.list_instances(None, false).await.unwrap() {
                    if grs_control_plane::model::instance_is_created(i.state)
                        && i.assigned_job_id == 0
                    {
                        let r = s
                            .enqueue_teardown(&i.name, "runner did not take a job within 5m", now)
                            .await
                            .unwrap();
                        out.push((i.name, r));
                    }
                }
                format!("{out:?}")
            }
        }
    }

    /// Everything a client can observe, as one comparable text per item.
    async fn observe(&self) -> Vec<(String, String)> {
        let s = &*self.store;
        let mut o = Vec::new();
        let mut put = |what: String, v: String| o.push((what, v));
        for j in 1..=JOBS + 1 {
            put(
                format!("job {j}"),
                format!("{:?}", s.get_job(j).await.unwrap()),
            );
            put(
                format!("instance grs-{j}"),
                format!("{:?}", s.get_instance(&instance(j)).await.unwrap()),
            );
        }
        for n in 1..=WARM {
            put(
                format!("instance {}", warm(n)),
                format!("{:?}", s.get_instance(&warm(n)).await.unwrap()),
            );
        }
        put(
            "instances".into(),
            format!("{:?}", s.list_instances(None, true).await.unwrap()),
        );
        for pool in [None, Some("linux")] {
            // Jobs recorded in the same millisecond (one batch) list in
            // either order: compared as a set.
            let (jobs, next) = s.list_jobs(pool, None, 0, 100).await.unwrap();
            let ids: BTreeSet<u64> = jobs.iter().map(|j| j.job_id).collect();
            put(format!("list_jobs {pool:?}"), format!("{ids:?} {next:?}"));
            put(
                format!("live instances {pool:?}"),
                format!("{:?}", s.list_instances(pool, false).await.unwrap()),
            );
        }
        for pool in ["linux", "other"] {
            put(
                format!("in use {pool}"),
                format!("{:?}", s.pool_in_use(pool).await.unwrap()),
            );
            put(
                format!("warm {pool}"),
                format!("{:?}", s.pool_warm(pool).await.unwrap()),
            );
            put(
                format!("overrides {pool}"),
                format!("{:?}", s.pool_overrides(pool).await.unwrap()),
            );
        }
        put(
            "node1 places".into(),
            format!("{:?}", s.node_places("node1").await.unwrap()),
        );
        for q in queues() {
            put(
                format!("depth {q}"),
                format!("{:?}", s.queue_depth(&q).await.unwrap()),
            );
        }
        for t in 0..3 {
            put(
                format!("token tok{t}"),
                format!(
                    "{:?}",
                    s.lookup_bootstrap_token(&format!("tok{t}")).await.unwrap()
                ),
            );
        }
        o
    }

    /// The next `n` events (waiting up to 5 s for each; fewer if they do
    /// not come).
    async fn events(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(5), self.watch.next()).await {
                Ok(Some(Ok(e))) => out.push(e),
                _ => break,
            }
        }
        out
    }

    /// The events already delivered to the watcher.
    fn ready_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(Some(Ok(e))) = self.watch.next().now_or_never() {
            out.push(e);
        }
        out
    }
}

use futures::FutureExt;

/// The job id of the sentinel event ending every case.
const SENTINEL: u64 = 999;

async fn run_case(ops: &[Op], redis: RedisStore) -> Result<(), TestCaseError> {
    let mut mem = Side::new(Box::new(MemoryStore::new())).await;
    let mut red = Side::new(Box::new(redis)).await;
    for (step, op) in ops.iter().enumerate() {
        let now = 10_000 + 10 * step as i64;
        let a = mem.apply(op, now).await;
        let b = red.apply(op, now).await;
        prop_assert_eq!(&a, &b, "step {} {:?}: the answers differ", step, op);
        let (om, or) = (mem.observe().await, red.observe().await);
        for ((what, m), (_, r)) in om.iter().zip(&or) {
            prop_assert_eq!(m, r, "step {} {:?}: {} differs", step, op, what);
        }
        // The memory store's events are delivered by the time it answers;
        // the Redis watcher gets as many, or the comparison shows the gap.
        let em = mem.ready_events();
        let er = red.events(em.len()).await;
        prop_assert_eq!(&em, &er, "step {} {:?}: the events differ", step, op);
    }
    // A last event both emit: whatever Redis emitted beyond the memory
    // store shows up before it.
    let sentinel = Ev {
        delivery: 200,
        action: JobAction::Queued,
        job: SENTINEL,
        runner: "",
        runner_id: 0,
        routed: Some("other"),
    }
    .event();
    let mut tail = Vec::new();
    for side in [&mut mem, &mut red] {
        side.store
            .submit_event(&sentinel, Some("other"), 1)
            .await
            .unwrap();
        let mut seen = Vec::new();
        loop {
            match side.events(1).await.pop() {
                Some(
                    e @ Event::Job {
                        job_id: SENTINEL, ..
                    },
                ) => {
                    seen.push(e);
                    break;
                }
                Some(e) => seen.push(e),
                None => break,
            }
        }
        tail.push(seen);
    }
    prop_assert_eq!(&tail[0], &tail[1], "events after the last step differ");
    Ok(())
}

#[test]
fn memory_and_redis_stores_agree_on_every_observable_after_every_step() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if rt.block_on(redis_store("differential")).is_none() {
        return;
    }
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        // The minimal case is printed; regressions worth keeping become
        // named tests below rather than files next to the source.
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..24), |ops| {
        rt.block_on(async {
            let store = redis_store("differential")
                .await
                .expect("Redis answered before");
            let flush = redis_store_handle(&store);
            let r = run_case(&ops, store).await;
            flush.flush_prefix().await.unwrap();
            r
        })
    });
    if let Err(e) = result {
        panic!("the stores disagree: {e}");
    }
}

/// A second handle on `store`'s key prefix, to delete its keys once the
/// case is over.
fn redis_store_handle(store: &RedisStore) -> RedisStore {
    grs_control_plane::testing::redis_store_at(
        &grs_control_plane::testing::redis_url(),
        store.prefix(),
    )
}
