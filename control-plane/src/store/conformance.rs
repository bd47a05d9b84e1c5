//! The behaviour every [`Store`] must show.
//!
//! Each check takes a fresh, empty store and is its own test (declared with
//! [`store_conformance_checks!`](crate::store_conformance_checks)), so a run
//! reports every failing check, not the first. The memory store runs them in
//! its unit tests, with tokio's clock paused (its time is tokio's: checks of
//! claim timeouts, leases and token expiry take no real time); the Redis
//! store runs them against a real Redis server (each check under a key
//! prefix of its own, in real time: Redis keeps its own clock), in
//! `tests/store_redis.rs`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{BeginProvision, BeginWarm, PoolLimits, Queue, QueueItem, Store, SubmitResult};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobAction, JobEvent, JobState, PoolOverrides,
    SubmitOutcome,
};

/// A `workflow_job` event for tests.
pub fn event(delivery: &str, action: JobAction, job_id: u64) -> JobEvent {
    JobEvent {
        delivery_id: delivery.to_owned(),
        action,
        job_id,
        run_id: 77,
        run_attempt: 1,
        labels: vec!["self-hosted".into(), "Linux".into()],
        runner_id: 0,
        runner_name: String::new(),
        repository: "octo-org/app".into(),
        organization: "octo-org".into(),
        installation_id: 0,
        conclusion: String::new(),
        job_name: "build".into(),
        workflow_name: "CI".into(),
    }
}

const LIMITS: PoolLimits = PoolLimits {
    max_instances: 2,
    paused: false,
    min_idle: 0,
};
const BLOCK: Duration = Duration::from_millis(200);
const KEEP: Duration = Duration::from_secs(3600);

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        /// Every check's name.
        pub const ALL: &[&str] = &[$(stringify!($name)),*];

        /// Runs the check called `name` on `store`.
        pub async fn run(name: &str, store: Arc<dyn Store>) {
            match name {
                $(stringify!($name) => $name(store).await,)*
                other => panic!("no store conformance check {other}"),
            }
        }
    };
}

/// Calls macro `$callback` with the names of every store conformance check
/// (`a_routed_queued_job_is_recorded_and_queued_once, ...`): a harness
/// declares one test per check with it, so each failure is reported on
/// its own. This is the one list of the checks.
///
/// ```ignore
/// macro_rules! my_store_tests {
///     ($($name:ident),* $(,)?) => {$(
///         #[tokio::test]
///         async fn $name() {
///             conformance::run(stringify!($name), make_store()).await
///         }
///     )*};
/// }
/// grs_control_plane::store_conformance_checks!(my_store_tests);
/// ```
#[macro_export]
macro_rules! store_conformance_checks {
    ($callback:ident) => {
        $callback! {
            a_routed_queued_job_is_recorded_and_queued_once,
            redelivery_is_a_duplicate_and_changes_nothing,
            unrouted_jobs_are_recorded_and_not_queued,
            completed_before_queued_never_provisions,
            provision_then_completion_tears_down_exactly_once,
            capacity_is_never_exceeded_and_released_on_teardown,
            concurrent_begin_provision_never_exceeds_capacity,
            a_redelivered_provision_entry_takes_no_second_slot,
            a_job_completed_during_creation_is_torn_down_after_it,
            a_job_taken_by_another_runner_is_recorded_on_that_instance,
            a_job_that_completed_on_another_jobs_runner_still_gets_its_instance,
            a_job_first_heard_of_on_another_jobs_runner_still_gets_its_instance,
            failure_fails_the_job_and_queues_cleanup,
            unacked_entries_are_claimed_by_another_worker,
            touched_entries_are_not_claimed,
            acked_entries_leave_the_queue,
            a_touch_by_a_worker_that_lost_its_entry_reports_it_and_takes_nothing,
            an_ack_by_a_worker_that_lost_its_entry_leaves_it_to_its_holder,
            paused_pools_hold_their_jobs,
            pool_overrides_persist_and_merge,
            bootstrap_tokens_resolve_until_revoked,
            list_jobs_filters_and_pages_newest_first,
            watch_streams_transitions,
            the_job_returned_is_the_job_recorded,
            a_batch_does_exactly_what_the_same_events_one_by_one_do,
            a_batch_is_applied_in_order,
            an_empty_batch_does_nothing,
            a_batch_queues_each_routed_job_once_in_its_pool,
            a_lease_has_one_holder_at_a_time,
            an_expired_lease_goes_to_the_next_caller,
            renewing_a_lease_extends_it,
            only_the_holder_releases_a_lease,
            an_empty_store_lists_no_instances,
            a_runner_named_by_a_queued_or_waiting_event_is_not_recorded,
            a_transition_tells_the_reason_it_recorded,
            concurrent_events_for_one_job_apply_one_at_a_time,
            warm_instances_are_made_up_to_min_idle_within_capacity,
            concurrent_warm_keepers_never_overshoot_min_idle,
            a_queued_job_is_bound_to_an_idle_warm_instance_instead_of_a_clone,
            a_job_a_warm_runner_took_hands_its_own_instance_to_the_warm_pool,
            a_job_cancelled_before_pickup_hands_its_warm_instance_back,
            a_late_in_progress_calls_off_the_teardown_of_the_runner_that_took_it,
            a_busy_runners_teardown_is_called_off,
            a_failed_or_torn_down_warm_instance_leaves_the_warm_pool,
            a_job_that_ran_elsewhere_does_not_fail_with_the_instance_it_gave_up,
            node_places_hold_a_nodes_maximum_and_go_with_their_instance,
            concurrent_node_reservations_never_exceed_the_maximum,
        }
    };
}

store_conformance_checks!(checks);

async fn queue_one(store: &dyn Store, job: u64) {
    let r = store
        .submit_event(
            &event(&format!("d-q-{job}"), JobAction::Queued, job),
            Some("linux"),
            1000,
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, SubmitOutcome::Accepted);
}

/// Takes the next provision entry of pool `linux`, or panics.
async fn take(store: &dyn Store, consumer: &str) -> (String, u64) {
    let d = store
        .read(&Queue::Provision("linux".into()), consumer, BLOCK)
        .await
        .unwrap()
        .expect("a provision entry");
    match d.item {
        QueueItem::Provision { job_id } => (d.id, job_id),
        other => panic!("provision queue held {other:?}"),
    }
}

async fn provision(store: &dyn Store, job: u64) -> String {
    let name = format!("grs-{job}");
    match store
        .begin_provision(job, &name, &LIMITS, 2000)
        .await
        .unwrap()
    {
        BeginProvision::Proceed { .. } => {}
        other => panic!("begin_provision({job}) = {other:?}"),
    }
    store.mark_creating(&name, 2001).await.unwrap();
    assert!(
        !store
            .finish_provision(job, &name, "fake/1", "node1", 2002)
            .await
            .unwrap()
    );
    name
}

async fn a_routed_queued_job_is_recorded_and_queued_once(store: Arc<dyn Store>) {
    let ev = event("d1", JobAction::Queued, 5_000_000_001);
    let r = store.submit_event(&ev, Some("linux"), 1000).await.unwrap();
    assert_eq!(r.outcome, SubmitOutcome::Accepted);
    let job = store
        .get_job(5_000_000_001)
        .await
        .unwrap()
        .expect("job recorded");
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.pool, "linux");
    assert_eq!(job.labels, vec!["self-hosted", "Linux"]);
    assert_eq!(
        (job.run_id, job.repository.as_str(), job.recorded_at),
        (77, "octo-org/app", 1000)
    );
    let (_, id) = take(&*store, "w1").await;
    assert_eq!(id, 5_000_000_001);
    assert!(
        store
            .read(&Queue::Provision("linux".into()), "w1", BLOCK)
            .await
            .unwrap()
            .is_none(),
        "queued once"
    );
    // Queued twice under a new delivery id: stale, not queued again.
    let r = store
        .submit_event(
            &event("d2", JobAction::Queued, 5_000_000_001),
            Some("linux"),
            1001,
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, SubmitOutcome::Stale);
    assert!(
        store
            .read(&Queue::Provision("linux".into()), "w1", BLOCK)
            .await
            .unwrap()
            .is_none()
    );
}

async fn redelivery_is_a_duplicate_and_changes_nothing(store: Arc<dyn Store>) {
    let ev = event("same", JobAction::Queued, 1);
    store.submit_event(&ev, Some("linux"), 1000).await.unwrap();
    let mut done = event("same", JobAction::Completed, 1);
    done.conclusion = "success".into();
    let r = store
        .submit_event(&done, Some("linux"), 1001)
        .await
        .unwrap();
    assert_eq!(r.outcome, SubmitOutcome::DuplicateDelivery);
    assert_eq!(r.job.map(|j| j.state), Some(JobState::Queued));
    assert_eq!(depth(&*store, &Queue::Provision("linux".into())).await, 1);
}

async fn unrouted_jobs_are_recorded_and_not_queued(store: Arc<dyn Store>) {
    let r = store
        .submit_event(&event("d", JobAction::Queued, 2), None, 1000)
        .await
        .unwrap();
    let job = r.job.unwrap();
    assert_eq!(job.state, JobState::Unrouted);
    assert!(
        job.reason.contains("self-hosted") && job.reason.contains("Linux"),
        "{}",
        job.reason
    );
    assert_eq!(
        store.get_job(2).await.unwrap().unwrap().state,
        JobState::Unrouted
    );
    assert_eq!(depth(&*store, &Queue::Provision("linux".into())).await, 0);
    assert_eq!(depth(&*store, &Queue::Provision(String::new())).await, 0);
}

async fn completed_before_queued_never_provisions(store: Arc<dyn Store>) {
    let mut done = event("c", JobAction::Completed, 3);
    done.conclusion = "cancelled".into();
    store
        .submit_event(&done, Some("linux"), 1000)
        .await
        .unwrap();
    let r = store
        .submit_event(&event("q", JobAction::Queued, 3), Some("linux"), 1001)
        .await
        .unwrap();
    assert_eq!(r.outcome, SubmitOutcome::Stale);
    let job = store.get_job(3).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.conclusion.as_str()),
        (JobState::Completed, "cancelled")
    );
    assert!(!job.reason.is_empty());
    assert_eq!(depth(&*store, &Queue::Provision("linux".into())).await, 0);
    // Queued, then completed before any dispatcher took it: the entry is
    // skipped when it is taken.
    queue_one(&*store, 4).await;
    store
        .submit_event(&event("c4", JobAction::Completed, 4), Some("linux"), 1002)
        .await
        .unwrap();
    let (_, id) = take(&*store, "w").await;
    assert!(matches!(
        store
            .begin_provision(id, "grs-4", &LIMITS, 1003)
            .await
            .unwrap(),
        BeginProvision::Skip(_)
    ));
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 0);
}

async fn provision_then_completion_tears_down_exactly_once(store: Arc<dyn Store>) {
    queue_one(&*store, 10).await;
    take(&*store, "w").await;
    let name = provision(&*store, 10).await;
    assert_eq!(
        store.get_job(10).await.unwrap().unwrap().state,
        JobState::Provisioned
    );
    let inst = store.get_instance(&name).await.unwrap().unwrap();
    assert_eq!(
        (
            inst.state,
            inst.provider_id.as_str(),
            inst.location.as_str()
        ),
        (InstanceState::Running, "fake/1", "node1")
    );
    let mut started = event("p", JobAction::InProgress, 10);
    started.runner_name = name.clone();
    started.runner_id = 31;
    store
        .submit_event(&started, Some("linux"), 3000)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_instance(&name)
            .await
            .unwrap()
            .unwrap()
            .assigned_job_id,
        10
    );
    let mut done = event("c", JobAction::Completed, 10);
    done.runner_name = name.clone();
    done.conclusion = "success".into();
    let r = store
        .submit_event(&done, Some("linux"), 4000)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some(name.as_str()));
    let mut again = done.clone();
    again.delivery_id = "c-again".into();
    let r = store
        .submit_event(&again, Some("linux"), 4001)
        .await
        .unwrap();
    assert_eq!((r.outcome, r.teardown), (SubmitOutcome::Stale, None));
    assert_eq!(
        store
            .enqueue_teardown(&name, "operator", 4002)
            .await
            .unwrap(),
        Some(false),
        "already queued"
    );
    let d = store
        .read(&Queue::Teardown, "t", BLOCK)
        .await
        .unwrap()
        .expect("one teardown");
    assert_eq!(
        d.item,
        QueueItem::Teardown {
            instance: name.clone()
        }
    );
    assert!(
        store
            .read(&Queue::Teardown, "t", BLOCK)
            .await
            .unwrap()
            .is_none(),
        "exactly one teardown"
    );
    assert_eq!(
        store
            .begin_teardown(&name, 4003)
            .await
            .unwrap()
            .unwrap()
            .state,
        InstanceState::Deleting
    );
    store
        .finish_teardown(&name, "job done", KEEP, 4004)
        .await
        .unwrap();
    assert!(store.ack(&Queue::Teardown, "t", &d.id).await.unwrap());
    assert_eq!(
        store.get_instance(&name).await.unwrap().unwrap().state,
        InstanceState::Deleted
    );
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 0);
    assert!(
        store.begin_teardown(&name, 4005).await.unwrap().is_none(),
        "a deleted instance needs no teardown"
    );
    assert!(
        store
            .list_instances(Some("linux"), false)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .list_instances(Some("linux"), true)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store.enqueue_teardown("grs-unknown", "x", 1).await.unwrap(),
        None
    );
}

async fn capacity_is_never_exceeded_and_released_on_teardown(store: Arc<dyn Store>) {
    for job in [20, 21, 22] {
        queue_one(&*store, job).await;
    }
    provision(&*store, 20).await;
    provision(&*store, 21).await;
    assert_eq!(
        store
            .begin_provision(22, "grs-22", &LIMITS, 2000)
            .await
            .unwrap(),
        BeginProvision::NoCapacity
    );
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 2);
    // The operator raises the maximum: room at once.
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                max_instances: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .begin_provision(22, "grs-22", &LIMITS, 2000)
            .await
            .unwrap(),
        BeginProvision::Proceed { .. }
    ));
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                max_instances: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    queue_one(&*store, 23).await;
    assert_eq!(
        store
            .begin_provision(23, "grs-23", &LIMITS, 2000)
            .await
            .unwrap(),
        BeginProvision::NoCapacity
    );
    store
        .enqueue_teardown("grs-20", "test", 2100)
        .await
        .unwrap();
    store
        .enqueue_teardown("grs-21", "test", 2100)
        .await
        .unwrap();
    store.begin_teardown("grs-20", 2101).await.unwrap();
    store
        .finish_teardown("grs-20", "test", KEEP, 2102)
        .await
        .unwrap();
    store
        .finish_teardown("grs-20", "test", KEEP, 2103)
        .await
        .unwrap();
    assert_eq!(
        store.pool_in_use("linux").await.unwrap(),
        2,
        "a repeated finish releases nothing twice"
    );
    store
        .finish_teardown("grs-21", "test", KEEP, 2104)
        .await
        .unwrap();
    assert!(matches!(
        store
            .begin_provision(23, "grs-23", &LIMITS, 2200)
            .await
            .unwrap(),
        BeginProvision::Proceed { .. }
    ));
}

async fn concurrent_begin_provision_never_exceeds_capacity(store: Arc<dyn Store>) {
    let jobs: Vec<u64> = (100..140).collect();
    for &j in &jobs {
        queue_one(&*store, j).await;
    }
    let tasks = jobs.iter().map(|&j| {
        let s = store.clone();
        tokio::spawn(async move {
            s.begin_provision(j, &format!("grs-{j}"), &LIMITS, 2000)
                .await
                .unwrap()
        })
    });
    let results = futures::future::join_all(tasks).await;
    let proceeded = results
        .iter()
        .filter(|r| matches!(r.as_ref().unwrap(), BeginProvision::Proceed { .. }))
        .count();
    assert_eq!(proceeded, 2, "exactly the pool's maximum proceeds");
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 2);
}

async fn a_redelivered_provision_entry_takes_no_second_slot(store: Arc<dyn Store>) {
    queue_one(&*store, 30).await;
    let first = store
        .begin_provision(30, "grs-30", &LIMITS, 2000)
        .await
        .unwrap();
    let again = store
        .begin_provision(30, "grs-30", &LIMITS, 2001)
        .await
        .unwrap();
    match (first, again) {
        (
            BeginProvision::Proceed { attempts: 1, .. },
            BeginProvision::Proceed {
                attempts: 2,
                instance,
            },
        ) => {
            assert_eq!(instance.name, "grs-30")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 1);
    store
        .finish_provision(30, "grs-30", "fake/9", "n", 2002)
        .await
        .unwrap();
    assert!(
        matches!(
            store
                .begin_provision(30, "grs-30", &LIMITS, 2003)
                .await
                .unwrap(),
            BeginProvision::Skip(_)
        ),
        "done once is done"
    );
}

async fn a_job_completed_during_creation_is_torn_down_after_it(store: Arc<dyn Store>) {
    queue_one(&*store, 40).await;
    store
        .begin_provision(40, "grs-40", &LIMITS, 2000)
        .await
        .unwrap();
    store.mark_creating("grs-40", 2001).await.unwrap();
    let r = store
        .submit_event(&event("c40", JobAction::Completed, 40), Some("linux"), 2002)
        .await
        .unwrap();
    assert_eq!(r.teardown, None, "no teardown races the creation");
    assert!(
        store
            .finish_provision(40, "grs-40", "fake/40", "n", 2003)
            .await
            .unwrap(),
        "teardown once created"
    );
    assert_eq!(
        store.get_instance("grs-40").await.unwrap().unwrap().state,
        InstanceState::PendingDelete
    );
    // And a creation whose worker died, for a job completed meanwhile: the
    // redelivered entry queues the cleanup.
    queue_one(&*store, 41).await;
    store
        .begin_provision(41, "grs-41", &LIMITS, 2000)
        .await
        .unwrap();
    store
        .submit_event(&event("c41", JobAction::Completed, 41), Some("linux"), 2002)
        .await
        .unwrap();
    assert!(matches!(
        store
            .begin_provision(41, "grs-41", &LIMITS, 2004)
            .await
            .unwrap(),
        BeginProvision::Skip(_)
    ));
    assert_eq!(
        store.get_instance("grs-41").await.unwrap().unwrap().state,
        InstanceState::PendingDelete
    );
}

async fn a_job_taken_by_another_runner_is_recorded_on_that_instance(store: Arc<dyn Store>) {
    queue_one(&*store, 50).await;
    queue_one(&*store, 51).await;
    let a = provision(&*store, 50).await;
    let b = provision(&*store, 51).await;
    // GitHub gives job 51 to the runner made for job 50.
    let mut started = event("p51", JobAction::InProgress, 51);
    started.runner_name = a.clone();
    store
        .submit_event(&started, Some("linux"), 3000)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_instance(&a)
            .await
            .unwrap()
            .unwrap()
            .assigned_job_id,
        51
    );
    // Job 50 is cancelled with no runner: its own instance is now busy with
    // job 51, so nothing is torn down.
    let r = store
        .submit_event(&event("c50", JobAction::Completed, 50), Some("linux"), 3001)
        .await
        .unwrap();
    assert_eq!(r.teardown, None);
    // Job 51 completes on instance a: a goes; b stays for another job.
    let mut done = event("c51", JobAction::Completed, 51);
    done.runner_name = a.clone();
    let r = store
        .submit_event(&done, Some("linux"), 3002)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some(a.as_str()));
    assert_eq!(
        store.get_instance(&b).await.unwrap().unwrap().state,
        InstanceState::Running
    );
}

/// GitHub gives job 70 to the runner made for job 71 before 70's own
/// provision entry is reached (its pool was full), and 70 completes there:
/// that runner goes, so job 71, still queued on GitHub, has no runner
/// unless 70's entry still makes an instance (which GitHub then hands to
/// 71). Before this check the entry was skipped as "job is completed" and
/// job 71 waited for ever (seen in `grs demo` with a small pool).
async fn a_job_that_completed_on_another_jobs_runner_still_gets_its_instance(
    store: Arc<dyn Store>,
) {
    queue_one(&*store, 70).await;
    queue_one(&*store, 71).await;
    let b = provision(&*store, 71).await;
    let mut started = event("p70", JobAction::InProgress, 70);
    started.runner_name = b.clone();
    store
        .submit_event(&started, Some("linux"), 3000)
        .await
        .unwrap();
    let mut done = event("c70", JobAction::Completed, 70);
    done.runner_name = b.clone();
    let r = store
        .submit_event(&done, Some("linux"), 3001)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some(b.as_str()));
    // Job 70's own entry now makes an instance, and keeps it once made.
    let a = provision(&*store, 70).await;
    assert_eq!(
        store.get_instance(&a).await.unwrap().unwrap().state,
        InstanceState::Running,
        "the instance owed to job 71 stays up for it"
    );
    // A job that completed without ever running (cancelled) still makes
    // nothing.
    queue_one(&*store, 72).await;
    store
        .submit_event(&event("c72", JobAction::Completed, 72), Some("linux"), 3002)
        .await
        .unwrap();
    assert!(matches!(
        store
            .begin_provision(72, "grs-72", &LIMITS, 3003)
            .await
            .unwrap(),
        BeginProvision::Skip(_)
    ));
}

/// The same when the job's `queued` delivery comes late (or never): its
/// first event says a runner made for another job took it. That job now
/// needs an instance, so this one is owed one, exactly as in order.
async fn a_job_first_heard_of_on_another_jobs_runner_still_gets_its_instance(
    store: Arc<dyn Store>,
) {
    let provision_queue = Queue::Provision("linux".into());
    queue_one(&*store, 75).await;
    let b = provision(&*store, 75).await;
    let queued = store.queue_depth(&provision_queue).await.unwrap().depth;
    let mut started = event("p76", JobAction::InProgress, 76);
    started.runner_name = b.clone();
    store
        .submit_event(&started, Some("linux"), 3000)
        .await
        .unwrap();
    let mut done = event("c76", JobAction::Completed, 76);
    done.runner_name = b.clone();
    let r = store
        .submit_event(&done, Some("linux"), 3001)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some(b.as_str()));
    let late = store
        .submit_event(&event("q76", JobAction::Queued, 76), Some("linux"), 3002)
        .await
        .unwrap();
    assert_eq!(late.outcome, SubmitOutcome::Stale);
    assert_eq!(
        store.queue_depth(&provision_queue).await.unwrap().depth,
        queued + 1,
        "job 76 took job 75's runner: one provision entry owed, no more"
    );
    let a = provision(&*store, 76).await;
    assert_eq!(
        store.get_instance(&a).await.unwrap().unwrap().state,
        InstanceState::Running,
        "the instance owed to job 75 stays up for it"
    );
    // A runner not ours took nothing from GRS: nothing is owed.
    let mut foreign = event("p77", JobAction::InProgress, 77);
    foreign.runner_name = "someone-elses-runner".into();
    store
        .submit_event(&foreign, Some("linux"), 3003)
        .await
        .unwrap();
    assert_eq!(
        store.queue_depth(&provision_queue).await.unwrap().depth,
        queued + 1
    );
}

async fn failure_fails_the_job_and_queues_cleanup(store: Arc<dyn Store>) {
    queue_one(&*store, 60).await;
    store
        .begin_provision(60, "grs-60", &LIMITS, 2000)
        .await
        .unwrap();
    store
        .fail_provision(60, "grs-60", "clone failed 3 times: no space", 2001)
        .await
        .unwrap();
    let job = store.get_job(60).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.reason.as_str()),
        (JobState::Failed, "clone failed 3 times: no space")
    );
    assert_eq!(
        store.get_instance("grs-60").await.unwrap().unwrap().state,
        InstanceState::PendingDelete
    );
    assert_eq!(
        store.pool_in_use("linux").await.unwrap(),
        1,
        "the slot is held until the leftover is gone"
    );
    let d = store
        .read(&Queue::Teardown, "t", BLOCK)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        d.item,
        QueueItem::Teardown {
            instance: "grs-60".into()
        }
    );
}

async fn unacked_entries_are_claimed_by_another_worker(store: Arc<dyn Store>) {
    queue_one(&*store, 70).await;
    let (id, _) = take(&*store, "dead-worker").await;
    assert!(
        store
            .claim_stale(
                &Queue::Provision("linux".into()),
                "w2",
                Duration::from_secs(60),
                10
            )
            .await
            .unwrap()
            .is_empty(),
        "not idle long enough yet"
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    let claimed = store
        .claim_stale(
            &Queue::Provision("linux".into()),
            "w2",
            Duration::from_millis(50),
            10,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].id.as_str(), &claimed[0].item),
        (id.as_str(), &QueueItem::Provision { job_id: 70 })
    );
    let depth = store
        .queue_depth(&Queue::Provision("linux".into()))
        .await
        .unwrap();
    assert_eq!((depth.depth, depth.pending), (1, 1));
}

async fn touched_entries_are_not_claimed(store: Arc<dyn Store>) {
    queue_one(&*store, 71).await;
    let (id, _) = take(&*store, "busy").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(
        store
            .touch(&Queue::Provision("linux".into()), "busy", &id)
            .await
            .unwrap(),
        "its holder's touch keeps the entry"
    );
    let claimed = store
        .claim_stale(
            &Queue::Provision("linux".into()),
            "w2",
            Duration::from_millis(50),
            10,
        )
        .await
        .unwrap();
    assert!(claimed.is_empty(), "a touched entry stays with its worker");
}

async fn acked_entries_leave_the_queue(store: Arc<dyn Store>) {
    queue_one(&*store, 72).await;
    queue_one(&*store, 73).await;
    let (id, job) = take(&*store, "w").await;
    assert_eq!(job, 72, "in order");
    assert!(
        store
            .ack(&Queue::Provision("linux".into()), "w", &id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .ack(&Queue::Provision("linux".into()), "w", &id)
            .await
            .unwrap(),
        "acknowledged twice"
    );
    let depth = store
        .queue_depth(&Queue::Provision("linux".into()))
        .await
        .unwrap();
    assert_eq!((depth.depth, depth.pending), (1, 0));
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        store
            .claim_stale(
                &Queue::Provision("linux".into()),
                "w2",
                Duration::from_millis(1),
                10
            )
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(take(&*store, "w").await.1, 73);
}

/// Takes `consumer`'s provision entry of pool `linux` over for `to`, as
/// a worker does once `consumer` is taken for dead.
async fn take_over(store: &dyn Store, consumer: &str, to: &str) -> String {
    let (id, _) = take(store, consumer).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let claimed = store
        .claim_stale(
            &Queue::Provision("linux".into()),
            to,
            Duration::from_millis(50),
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|d| &d.id).collect::<Vec<_>>(),
        [&id],
        "claimed"
    );
    id
}

async fn a_touch_by_a_worker_that_lost_its_entry_reports_it_and_takes_nothing(
    store: Arc<dyn Store>,
) {
    let q = Queue::Provision("linux".into());
    queue_one(&*store, 74).await;
    let id = take_over(&*store, "slow", "w2").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(
        !store.touch(&q, "slow", &id).await.unwrap(),
        "the touch of a worker that lost its entry reported it held"
    );
    // Nothing was reset or taken: the entry is still w2's and idle since
    // w2 claimed it, so a third worker may claim it now.
    let claimed = store
        .claim_stale(&q, "w3", Duration::from_millis(50), 10)
        .await
        .unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "the lost worker's touch reset the entry's idle time"
    );
    assert!(
        !store.touch(&q, "w2", &id).await.unwrap(),
        "w3 holds it now"
    );
    assert!(store.touch(&q, "w3", &id).await.unwrap());
    assert!(
        !store.touch(&q, "w3", "999999-0").await.unwrap(),
        "an unknown entry is held by nobody"
    );
}

async fn an_ack_by_a_worker_that_lost_its_entry_leaves_it_to_its_holder(store: Arc<dyn Store>) {
    let q = Queue::Provision("linux".into());
    queue_one(&*store, 75).await;
    let id = take_over(&*store, "slow", "w2").await;
    assert!(!store.ack(&q, "slow", &id).await.unwrap());
    let depth = store.queue_depth(&q).await.unwrap();
    assert_eq!(
        (depth.depth, depth.pending),
        (1, 1),
        "the lost worker's ack removed the entry its new holder works on"
    );
    assert!(store.ack(&q, "w2", &id).await.unwrap());
    let depth = store.queue_depth(&q).await.unwrap();
    assert_eq!((depth.depth, depth.pending), (0, 0));
}

async fn paused_pools_hold_their_jobs(store: Arc<dyn Store>) {
    queue_one(&*store, 80).await;
    let paused = PoolLimits {
        paused: true,
        ..LIMITS
    };
    assert_eq!(
        store
            .begin_provision(80, "grs-80", &paused, 2000)
            .await
            .unwrap(),
        BeginProvision::Paused
    );
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                paused: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        matches!(
            store
                .begin_provision(80, "grs-80", &paused, 2001)
                .await
                .unwrap(),
            BeginProvision::Proceed { .. }
        ),
        "the operator's resume wins over the config"
    );
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                paused: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    queue_one(&*store, 81).await;
    assert_eq!(
        store
            .begin_provision(81, "grs-81", &LIMITS, 2002)
            .await
            .unwrap(),
        BeginProvision::Paused
    );
    assert_eq!(
        store.get_job(81).await.unwrap().unwrap().state,
        JobState::Queued,
        "still queued"
    );
}

async fn pool_overrides_persist_and_merge(store: Arc<dyn Store>) {
    assert_eq!(
        store.pool_overrides("linux").await.unwrap(),
        PoolOverrides::default()
    );
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                paused: Some(true),
                min_idle: Some(2),
                max_instances: None,
            },
        )
        .await
        .unwrap();
    let o = store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                max_instances: Some(9),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        o,
        PoolOverrides {
            paused: Some(true),
            min_idle: Some(2),
            max_instances: Some(9)
        }
    );
    assert_eq!(store.pool_overrides("linux").await.unwrap(), o);
    assert_eq!(
        store.pool_overrides("other").await.unwrap(),
        PoolOverrides::default()
    );
}

async fn bootstrap_tokens_resolve_until_revoked(store: Arc<dyn Store>) {
    queue_one(&*store, 90).await;
    let name = provision(&*store, 90).await;
    store
        .put_bootstrap_token("h1", &name, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.lookup_bootstrap_token("h1").await.unwrap().as_deref(),
        Some(name.as_str())
    );
    assert_eq!(store.lookup_bootstrap_token("h2").await.unwrap(), None);
    // A new token replaces the old one.
    store
        .put_bootstrap_token("h2", &name, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.lookup_bootstrap_token("h1").await.unwrap(), None);
    // The runner took a job: the token is used up.
    let mut started = event("p90", JobAction::InProgress, 90);
    started.runner_name = name.clone();
    store
        .submit_event(&started, Some("linux"), 3000)
        .await
        .unwrap();
    assert_eq!(store.lookup_bootstrap_token("h2").await.unwrap(), None);
    store
        .put_bootstrap_token("h3", &name, Duration::from_secs(60))
        .await
        .unwrap();
    store.revoke_bootstrap_token(&name).await.unwrap();
    assert_eq!(store.lookup_bootstrap_token("h3").await.unwrap(), None);
    // Expiry.
    store
        .put_bootstrap_token("h4", &name, Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        store.lookup_bootstrap_token("h4").await.unwrap(),
        None,
        "expired"
    );
}

async fn list_jobs_filters_and_pages_newest_first(store: Arc<dyn Store>) {
    for j in 1..=5u64 {
        store
            .submit_event(
                &event(&format!("l{j}"), JobAction::Queued, 200 + j),
                Some("linux"),
                1000 + j as i64,
            )
            .await
            .unwrap();
    }
    store
        .submit_event(&event("lo", JobAction::Queued, 300), Some("other"), 2000)
        .await
        .unwrap();
    store
        .submit_event(&event("lc", JobAction::Completed, 203), Some("linux"), 3000)
        .await
        .unwrap();
    let (all, next) = store.list_jobs(None, None, 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|j| j.job_id).collect::<Vec<_>>(),
        vec![300, 205, 204, 203, 202, 201]
    );
    assert_eq!(next, None);
    let (p1, next) = store.list_jobs(Some("linux"), None, 0, 2).await.unwrap();
    assert_eq!(
        p1.iter().map(|j| j.job_id).collect::<Vec<_>>(),
        vec![205, 204]
    );
    let (p2, next) = store
        .list_jobs(Some("linux"), None, next.expect("more pages"), 2)
        .await
        .unwrap();
    assert_eq!(
        p2.iter().map(|j| j.job_id).collect::<Vec<_>>(),
        vec![203, 202]
    );
    let (p3, next) = store
        .list_jobs(Some("linux"), None, next.expect("more pages"), 2)
        .await
        .unwrap();
    assert_eq!(p3.iter().map(|j| j.job_id).collect::<Vec<_>>(), vec![201]);
    assert_eq!(next, None);
    let (done, _) = store
        .list_jobs(None, Some(JobState::Completed), 0, 100)
        .await
        .unwrap();
    assert_eq!(done.iter().map(|j| j.job_id).collect::<Vec<_>>(), vec![203]);
}

async fn watch_streams_transitions(store: Arc<dyn Store>) {
    let mut all = store.watch(None).await.unwrap();
    let mut other = store.watch(Some("other".into())).await.unwrap();
    queue_one(&*store, 400).await;
    store
        .submit_event(&event("o", JobAction::Queued, 401), Some("other"), 1000)
        .await
        .unwrap();
    store
        .begin_provision(400, "grs-400", &LIMITS, 2000)
        .await
        .unwrap();
    async fn next(s: &mut futures::stream::BoxStream<'static, super::StoreResult<Event>>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .unwrap()
    }
    match next(&mut all).await {
        Event::Job {
            job_id: 400,
            from: None,
            to: JobState::Queued,
            ..
        } => {}
        e => panic!("first event {e:?}"),
    }
    match next(&mut all).await {
        Event::Job { job_id: 401, .. } => {}
        e => panic!("second event {e:?}"),
    }
    let mut rest = vec![next(&mut all).await, next(&mut all).await];
    rest.sort_by_key(|e| matches!(e, Event::Job { .. }));
    assert!(
        matches!(&rest[0], Event::Instance { name, to: InstanceState::PendingCreate, .. } if name == "grs-400"),
        "{rest:?}"
    );
    assert!(
        matches!(
            &rest[1],
            Event::Job {
                job_id: 400,
                from: Some(JobState::Queued),
                to: JobState::Provisioning,
                ..
            }
        ),
        "{rest:?}"
    );
    match next(&mut other).await {
        Event::Job {
            job_id: 401, pool, ..
        } => assert_eq!(pool, "other"),
        e => panic!("filtered watcher saw {e:?}"),
    }
}

async fn the_job_returned_is_the_job_recorded(store: Arc<dyn Store>) {
    let mut started = event("s", JobAction::InProgress, 501);
    started.runner_name = "someone-elses-runner".into();
    started.runner_id = 9;
    let mut done = event("c", JobAction::Completed, 502);
    done.conclusion = "cancelled".into();
    let cases = [
        (event("q", JobAction::Queued, 500), Some("linux")),
        (started, Some("linux")),
        (done, None),
        (event("w", JobAction::Waiting, 503), None),
        (event("w2", JobAction::Waiting, 504), Some("linux")),
    ];
    for (ev, routed) in cases {
        let r = store.submit_event(&ev, routed, 1234).await.unwrap();
        let recorded = store.get_job(ev.job_id).await.unwrap();
        assert_eq!(r.job, recorded, "a new record of {:?}", ev.action);
    }
    // And after a change to an existing record.
    let r = store
        .submit_event(&event("q2", JobAction::Queued, 504), Some("linux"), 2000)
        .await
        .unwrap();
    assert_eq!(r.job, store.get_job(504).await.unwrap());
    assert_eq!(r.job.map(|j| j.state), Some(JobState::Queued));
}

/// Submits `batch` with [`Store::submit_events`] at `now`.
async fn submit_batch(
    store: &dyn Store,
    batch: &[(JobEvent, Option<&str>)],
    now: i64,
) -> Vec<SubmitResult> {
    let refs: Vec<(&JobEvent, Option<&str>)> = batch.iter().map(|(e, p)| (e, *p)).collect();
    let r = store.submit_events(&refs, now).await.unwrap();
    assert_eq!(r.len(), batch.len(), "one result per event");
    r
}

/// Every entry of `queue` still to be read, in order, acknowledged.
/// How many entries `queue` holds.
async fn depth(store: &dyn Store, queue: &Queue) -> u64 {
    store.queue_depth(queue).await.unwrap().depth
}

async fn drain(store: &dyn Store, queue: &Queue) -> Vec<QueueItem> {
    let mut items = Vec::new();
    while let Some(d) = store
        .read(queue, "drain", Duration::from_millis(50))
        .await
        .unwrap()
    {
        assert!(store.ack(queue, "drain", &d.id).await.unwrap());
        items.push(d.item);
    }
    items
}

/// Events of `watch` until none come for a while.
async fn collect_events(
    watch: &mut futures::stream::BoxStream<'static, super::StoreResult<Event>>,
) -> Vec<Event> {
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
        seen.push(e.unwrap());
    }
    seen
}

/// Job ids of the one-by-one run of [`scenario`] are `ONE + i`, of the batch
/// run `BATCH + i`; [`Twin`] maps the second onto the first to compare them.
const ONE: u64 = 1_000_000;
const BATCH: u64 = 2_000_000;
const SCENARIO_JOBS: u64 = 9;

/// Rewrites the batch run's job ids (numbers, instance names, reasons) as
/// the one-by-one run's, so both runs' records can be compared.
trait Twin {
    fn twin(self) -> Self;
}

fn twin_id(id: u64) -> u64 {
    if of_run(id, BATCH) {
        id - BATCH + ONE
    } else {
        id
    }
}

impl Twin for String {
    fn twin(self) -> Self {
        (1..=SCENARIO_JOBS).fold(self, |s, i| {
            s.replace(&(BATCH + i).to_string(), &(ONE + i).to_string())
        })
    }
}

impl Twin for Job {
    fn twin(self) -> Self {
        Job {
            job_id: twin_id(self.job_id),
            instance_name: self.instance_name.twin(),
            runner_name: self.runner_name.twin(),
            reason: self.reason.twin(),
            ..self
        }
    }
}

impl Twin for InstanceRecord {
    fn twin(self) -> Self {
        InstanceRecord {
            name: self.name.twin(),
            job_id: twin_id(self.job_id),
            assigned_job_id: twin_id(self.assigned_job_id),
            reason: self.reason.twin(),
            ..self
        }
    }
}

impl Twin for Event {
    fn twin(self) -> Self {
        match self {
            Event::Job {
                at,
                job_id,
                pool,
                from,
                to,
                reason,
            } => Event::Job {
                at,
                job_id: twin_id(job_id),
                pool,
                from,
                to,
                reason: reason.twin(),
            },
            Event::Instance {
                at,
                name,
                pool,
                from,
                to,
                reason,
            } => Event::Instance {
                at,
                name: name.twin(),
                pool,
                from,
                to,
                reason: reason.twin(),
            },
        }
    }
}

impl Twin for QueueItem {
    fn twin(self) -> Self {
        match self {
            QueueItem::Provision { job_id } => QueueItem::Provision {
                job_id: twin_id(job_id),
            },
            QueueItem::Teardown { instance } => QueueItem::Teardown {
                instance: instance.twin(),
            },
        }
    }
}

/// Whether job `id` belongs to the run at `base`.
fn of_run(id: u64, base: u64) -> bool {
    (base + 1..=base + SCENARIO_JOBS).contains(&id)
}

/// Whether instance `name` (`grs-<job id>`) belongs to the run at `base`.
fn instance_of_run(name: &str, base: u64) -> bool {
    name.strip_prefix("grs-")
        .and_then(|n| n.parse().ok())
        .is_some_and(|id| of_run(id, base))
}

/// Whether an event concerns a job (or its instance) of the run at `base`.
fn event_of_run(e: &Event, base: u64) -> bool {
    match e {
        Event::Job { job_id, .. } => of_run(*job_id, base),
        Event::Instance { name, .. } => instance_of_run(name, base),
    }
}

/// Runs jobs `base + 5` and `base + 8` on instances `grs-<job>` (the latter
/// with a bootstrap token), leaving the provision queue empty.
async fn scenario_setup(store: &dyn Store, base: u64) {
    let roomy = PoolLimits {
        max_instances: 10,
        ..LIMITS
    };
    for job in [base + 5, base + 8] {
        queue_one(store, job).await;
        let name = format!("grs-{job}");
        assert!(matches!(
            store
                .begin_provision(job, &name, &roomy, 2000)
                .await
                .unwrap(),
            BeginProvision::Proceed { .. }
        ));
        store.mark_creating(&name, 2001).await.unwrap();
        store
            .finish_provision(job, &name, "fake/1", "node1", 2002)
            .await
            .unwrap();
    }
    store
        .put_bootstrap_token(&format!("tok-{base}"), &format!("grs-{}", base + 8), KEEP)
        .await
        .unwrap();
}

/// Events touching every rule: new jobs routed, unrouted and waiting, a
/// waiting job queued, a runner taking a job on a known instance, a
/// redelivery, stale repeats, a completion before queued, completions that
/// tear down the job's own idle instance and the runner's instance.
fn scenario(base: u64, tag: &str) -> Vec<(JobEvent, Option<&'static str>)> {
    let d = |n: &str| format!("{tag}-{n}");
    let mut taken = event(&d("p1"), JobAction::InProgress, base + 1);
    taken.runner_name = format!("grs-{}", base + 8);
    taken.runner_id = 8;
    let mut redelivered = event(&d("q1"), JobAction::Completed, base + 1);
    redelivered.conclusion = "success".into();
    let mut cancelled = event(&d("c4"), JobAction::Completed, base + 4);
    cancelled.conclusion = "cancelled".into();
    let mut done5 = event(&d("c5"), JobAction::Completed, base + 5);
    done5.conclusion = "cancelled".into();
    let mut done1 = event(&d("c1"), JobAction::Completed, base + 1);
    done1.runner_name = format!("grs-{}", base + 8);
    done1.conclusion = "success".into();
    let mut done1_again = done1.clone();
    done1_again.delivery_id = d("c1-again");
    vec![
        (event(&d("q1"), JobAction::Queued, base + 1), Some("linux")),
        (event(&d("w2"), JobAction::Waiting, base + 2), Some("linux")),
        (event(&d("q2"), JobAction::Queued, base + 2), Some("linux")),
        (event(&d("q3"), JobAction::Queued, base + 3), None),
        (taken, Some("linux")),
        (redelivered, Some("linux")),
        (
            event(&d("q1-again"), JobAction::Queued, base + 1),
            Some("linux"),
        ),
        (cancelled, Some("linux")),
        (event(&d("q4"), JobAction::Queued, base + 4), Some("linux")),
        (done5, Some("linux")),
        (done1, Some("linux")),
        (done1_again, Some("linux")),
        (event(&d("q6"), JobAction::Queued, base + 6), Some("other")),
        (event(&d("p7"), JobAction::InProgress, base + 7), None),
        (event(&d("w9"), JobAction::Waiting, base + 9), None),
        (event(&d("q9"), JobAction::Queued, base + 9), None),
    ]
}

/// Everything a run of [`scenario`] left behind, in the one-by-one run's
/// terms.
#[derive(Debug, PartialEq)]
struct Footprint {
    results: Vec<(SubmitOutcome, Option<Job>, Option<String>)>,
    jobs: Vec<Option<Job>>,
    instances: Vec<Option<InstanceRecord>>,
    token: Option<String>,
    provision_linux: Vec<QueueItem>,
    provision_other: Vec<QueueItem>,
    teardown: Vec<QueueItem>,
    events: Vec<Event>,
}

async fn footprint(
    store: &dyn Store,
    base: u64,
    results: Vec<SubmitResult>,
    queues: &[(Queue, Vec<QueueItem>)],
    events: &[Event],
) -> Footprint {
    let mut jobs = Vec::new();
    for i in 1..=SCENARIO_JOBS {
        jobs.push(store.get_job(base + i).await.unwrap().map(Twin::twin));
    }
    let mut instances = Vec::new();
    for i in [5, 8] {
        instances.push(
            store
                .get_instance(&format!("grs-{}", base + i))
                .await
                .unwrap()
                .map(Twin::twin),
        );
    }
    let items_of_run = |q: &Queue| -> Vec<QueueItem> {
        queues
            .iter()
            .find(|(queue, _)| queue == q)
            .unwrap()
            .1
            .iter()
            .filter(|i| match i {
                QueueItem::Provision { job_id } => of_run(*job_id, base),
                QueueItem::Teardown { instance } => instance_of_run(instance, base),
            })
            .cloned()
            .map(Twin::twin)
            .collect()
    };
    Footprint {
        results: results
            .into_iter()
            .map(|r| (r.outcome, r.job.map(Twin::twin), r.teardown.map(Twin::twin)))
            .collect(),
        jobs,
        instances,
        token: store
            .lookup_bootstrap_token(&format!("tok-{base}"))
            .await
            .unwrap()
            .map(Twin::twin),
        provision_linux: items_of_run(&Queue::Provision("linux".into())),
        provision_other: items_of_run(&Queue::Provision("other".into())),
        teardown: items_of_run(&Queue::Teardown),
        events: events
            .iter()
            .filter(|e| event_of_run(e, base))
            .cloned()
            .map(Twin::twin)
            .collect(),
    }
}

async fn a_batch_does_exactly_what_the_same_events_one_by_one_do(store: Arc<dyn Store>) {
    scenario_setup(&*store, ONE).await;
    scenario_setup(&*store, BATCH).await;
    let linux = Queue::Provision("linux".into());
    assert_eq!(drain(&*store, &linux).await.len(), 4, "the setup's entries");
    let mut watch = store.watch(None).await.unwrap();
    const NOW: i64 = 5000;
    let mut one_by_one = Vec::new();
    for (ev, routed) in scenario(ONE, "one") {
        one_by_one.push(store.submit_event(&ev, routed, NOW).await.unwrap());
    }
    let batched = submit_batch(&*store, &scenario(BATCH, "batch"), NOW).await;
    let events = collect_events(&mut watch).await;
    let mut queues = Vec::new();
    for q in [linux, Queue::Provision("other".into()), Queue::Teardown] {
        let items = drain(&*store, &q).await;
        queues.push((q, items));
    }
    let expected = footprint(&*store, ONE, one_by_one, &queues, &events).await;
    let got = footprint(&*store, BATCH, batched, &queues, &events).await;

    // The scenario does what it is meant to (so equal is not equally wrong).
    use SubmitOutcome::{Accepted as A, DuplicateDelivery as D, Stale as S};
    assert_eq!(
        expected.results.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![A, A, A, A, A, D, S, A, S, A, A, S, A, A, A, S]
    );
    assert_eq!(
        expected
            .jobs
            .iter()
            .map(|j| j.as_ref().map(|j| j.state))
            .collect::<Vec<_>>(),
        [
            JobState::Completed,
            JobState::Queued,
            JobState::Unrouted,
            JobState::Completed,
            JobState::Completed,
            JobState::Queued,
            JobState::InProgress,
            JobState::Provisioned,
            JobState::Unrouted,
        ]
        .map(Some)
    );
    assert_eq!(
        (
            expected.provision_linux.clone(),
            expected.provision_other.clone(),
            expected.teardown.clone(),
            expected.token.clone()
        ),
        (
            vec![
                QueueItem::Provision { job_id: ONE + 1 },
                QueueItem::Provision { job_id: ONE + 2 }
            ],
            vec![QueueItem::Provision { job_id: ONE + 6 }],
            vec![
                QueueItem::Teardown {
                    instance: format!("grs-{}", ONE + 5)
                },
                QueueItem::Teardown {
                    instance: format!("grs-{}", ONE + 8)
                },
            ],
            None
        )
    );
    assert!(expected.events.len() >= 12, "{:?}", expected.events);

    assert_eq!(got.results, expected.results, "results");
    assert_eq!(got.jobs, expected.jobs, "jobs");
    assert_eq!(got.instances, expected.instances, "instances");
    assert_eq!(got.token, expected.token, "bootstrap token");
    assert_eq!(got.provision_linux, expected.provision_linux, "linux queue");
    assert_eq!(got.provision_other, expected.provision_other, "other queue");
    assert_eq!(got.teardown, expected.teardown, "teardown queue");
    assert_eq!(got.events, expected.events, "events");
    // The batch's delivery ids are remembered as the single calls' are.
    let again = store
        .submit_event(
            &event("batch-q2", JobAction::Completed, BATCH + 2),
            Some("linux"),
            NOW + 1,
        )
        .await
        .unwrap();
    assert_eq!(again.outcome, SubmitOutcome::DuplicateDelivery);
}

async fn a_batch_is_applied_in_order(store: Arc<dyn Store>) {
    use SubmitOutcome::{Accepted as A, DuplicateDelivery as D, Stale as S};
    let linux = Queue::Provision("linux".into());
    // The same delivery id twice: the second is the redelivery, whatever it
    // says.
    let mut done = event("dup", JobAction::Completed, 600);
    done.conclusion = "success".into();
    let r = submit_batch(
        &*store,
        &[
            (event("dup", JobAction::Queued, 600), Some("linux")),
            (done, Some("linux")),
        ],
        1000,
    )
    .await;
    assert_eq!((r[0].outcome, r[1].outcome), (A, D));
    assert_eq!(r[1].job.as_ref().map(|j| j.state), Some(JobState::Queued));
    assert_eq!(
        store.get_job(600).await.unwrap().map(|j| j.state),
        Some(JobState::Queued)
    );
    // A job's whole life in one batch: each event sees the one before, and
    // each result is the job as that event left it.
    let mut started = event("p601", JobAction::InProgress, 601);
    started.runner_name = "someone-elses-runner".into();
    started.runner_id = 4;
    let mut done = event("c601", JobAction::Completed, 601);
    done.conclusion = "success".into();
    let r = submit_batch(
        &*store,
        &[
            (event("q601", JobAction::Queued, 601), Some("linux")),
            (started, Some("linux")),
            (done, Some("linux")),
        ],
        1001,
    )
    .await;
    assert_eq!(
        r.iter()
            .map(|r| (r.outcome, r.job.as_ref().map(|j| j.state)))
            .collect::<Vec<_>>(),
        vec![
            (A, Some(JobState::Queued)),
            (A, Some(JobState::InProgress)),
            (A, Some(JobState::Completed)),
        ]
    );
    let job = store.get_job(601).await.unwrap().unwrap();
    assert_eq!(
        (
            job.state,
            job.conclusion.as_str(),
            job.runner_name.as_str(),
            job.runner_id
        ),
        (JobState::Completed, "success", "someone-elses-runner", 4)
    );
    assert_eq!(r[2].job.as_ref(), Some(&job));
    // Completed, then queued: the queued event is stale and nothing is
    // queued for the job. The other way round both count.
    let r = submit_batch(
        &*store,
        &[
            (event("c602", JobAction::Completed, 602), Some("linux")),
            (event("q602", JobAction::Queued, 602), Some("linux")),
            (event("q603", JobAction::Queued, 603), Some("linux")),
            (event("c603", JobAction::Completed, 603), Some("linux")),
            (event("q603-again", JobAction::Queued, 603), Some("linux")),
        ],
        1002,
    )
    .await;
    assert_eq!(
        r.iter().map(|r| r.outcome).collect::<Vec<_>>(),
        vec![A, S, A, A, S]
    );
    assert_eq!(
        r[1].job.as_ref().map(|j| j.state),
        Some(JobState::Completed)
    );
    for job in [602, 603] {
        assert_eq!(
            store.get_job(job).await.unwrap().map(|j| j.state),
            Some(JobState::Completed)
        );
    }
    // Queued entries: 600, 601 and 603 were queued when their queued event
    // came (the dispatcher skips finished ones); 602 never.
    let queued: Vec<QueueItem> = drain(&*store, &linux).await;
    assert_eq!(
        queued,
        [600, 601, 603].map(|job_id| QueueItem::Provision { job_id })
    );
}

async fn an_empty_batch_does_nothing(store: Arc<dyn Store>) {
    let mut watch = store.watch(None).await.unwrap();
    assert!(store.submit_events(&[], 1000).await.unwrap().is_empty());
    assert!(
        store
            .list_jobs(None, None, 0, 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert_eq!(depth(&*store, &Queue::Provision("linux".into())).await, 0);
    // The store still works after it.
    queue_one(&*store, 610).await;
    match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        Ok(Some(Ok(Event::Job { job_id: 610, .. }))) => {}
        e => panic!("the first event is job 610's: {e:?}"),
    }
}

async fn a_batch_queues_each_routed_job_once_in_its_pool(store: Arc<dyn Store>) {
    let linux = Queue::Provision("linux".into());
    let other = Queue::Provision("other".into());
    // One routed queued job, with its redelivery and a repeat in the same
    // batch: queued once.
    let r = submit_batch(
        &*store,
        &[
            (event("q620", JobAction::Queued, 620), Some("linux")),
            (event("q620", JobAction::Queued, 620), Some("linux")),
            (event("q620-again", JobAction::Queued, 620), Some("linux")),
        ],
        1000,
    )
    .await;
    assert_eq!(
        r.iter().map(|r| r.outcome).collect::<Vec<_>>(),
        vec![
            SubmitOutcome::Accepted,
            SubmitOutcome::DuplicateDelivery,
            SubmitOutcome::Stale
        ]
    );
    assert_eq!(depth(&*store, &linux).await, 1);
    assert_eq!(
        drain(&*store, &linux).await,
        vec![QueueItem::Provision { job_id: 620 }]
    );
    // Routed and unrouted mixed: each routed job in its own pool's queue, in
    // batch order; unrouted ones recorded with their reason and queued
    // nowhere.
    let r = submit_batch(
        &*store,
        &[
            (event("u1", JobAction::Queued, 631), None),
            (event("r1", JobAction::Queued, 632), Some("linux")),
            (event("u2", JobAction::Queued, 633), None),
            (event("r2", JobAction::Queued, 634), Some("other")),
            (event("r3", JobAction::Queued, 635), Some("linux")),
            (event("u3", JobAction::Waiting, 636), None),
        ],
        1001,
    )
    .await;
    assert!(r.iter().all(|r| r.outcome == SubmitOutcome::Accepted));
    for (job, state, pool) in [
        (631, JobState::Unrouted, ""),
        (632, JobState::Queued, "linux"),
        (633, JobState::Unrouted, ""),
        (634, JobState::Queued, "other"),
        (635, JobState::Queued, "linux"),
        (636, JobState::Unrouted, ""),
    ] {
        let j = store.get_job(job).await.unwrap().expect("recorded");
        assert_eq!((j.state, j.pool.as_str()), (state, pool), "job {job}");
        assert_eq!(
            j.reason.contains("self-hosted"),
            state == JobState::Unrouted,
            "job {job}: {}",
            j.reason
        );
    }
    assert_eq!(
        drain(&*store, &linux).await,
        [632, 635].map(|job_id| QueueItem::Provision { job_id })
    );
    assert_eq!(
        drain(&*store, &other).await,
        vec![QueueItem::Provision { job_id: 634 }]
    );
    assert_eq!(depth(&*store, &Queue::Provision(String::new())).await, 0);
}

async fn a_lease_has_one_holder_at_a_time(store: Arc<dyn Store>) {
    let ttl = Duration::from_secs(30);
    assert!(store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    assert!(!store.acquire_lease("reconciler", "b", ttl).await.unwrap());
    // The holder renews.
    assert!(store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    assert!(!store.acquire_lease("reconciler", "b", ttl).await.unwrap());
    // Leases of other names are independent.
    assert!(store.acquire_lease("other", "b", ttl).await.unwrap());
    // Many callers at once: exactly one wins a free lease.
    let wins = futures::future::join_all((0..8).map(|i| {
        let store = store.clone();
        async move {
            store
                .acquire_lease("contended", &format!("c{i}"), ttl)
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
}

async fn an_expired_lease_goes_to_the_next_caller(store: Arc<dyn Store>) {
    let ttl = Duration::from_millis(100);
    assert!(store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    assert!(!store.acquire_lease("reconciler", "b", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(store.acquire_lease("reconciler", "b", ttl).await.unwrap());
    // The old holder lost it: it neither renews nor releases it.
    assert!(!store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    assert!(!store.release_lease("reconciler", "a").await.unwrap());
    assert!(!store.acquire_lease("reconciler", "c", ttl).await.unwrap());
}

async fn renewing_a_lease_extends_it(store: Arc<dyn Store>) {
    let ttl = Duration::from_millis(400);
    assert!(store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    // 500 ms after it was first taken: past the first ttl, within the renewed one.
    assert!(!store.acquire_lease("reconciler", "b", ttl).await.unwrap());
}

async fn only_the_holder_releases_a_lease(store: Arc<dyn Store>) {
    let ttl = Duration::from_secs(30);
    // Releasing a lease nobody holds does nothing.
    assert!(!store.release_lease("reconciler", "a").await.unwrap());
    assert!(store.acquire_lease("reconciler", "a", ttl).await.unwrap());
    assert!(!store.release_lease("reconciler", "b").await.unwrap());
    assert!(!store.acquire_lease("reconciler", "b", ttl).await.unwrap());
    assert!(store.release_lease("reconciler", "a").await.unwrap());
    // Released: free for the next caller at once, and releasing again is a no-op.
    assert!(!store.release_lease("reconciler", "a").await.unwrap());
    assert!(store.acquire_lease("reconciler", "b", ttl).await.unwrap());
}

async fn an_empty_store_lists_no_instances(store: Arc<dyn Store>) {
    assert!(store.list_instances(None, false).await.unwrap().is_empty());
    assert!(
        store
            .list_instances(Some("linux"), true)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Found by the differential test (tests/store_differential.rs): the Redis
/// store recorded the runner of a new job's `queued` event, the memory store
/// did not, and SubmitJobEvent answered the latter while GetJob read the
/// former.
async fn a_runner_named_by_a_queued_or_waiting_event_is_not_recorded(store: Arc<dyn Store>) {
    for (i, action) in [JobAction::Queued, JobAction::Waiting]
        .into_iter()
        .enumerate()
    {
        let job = 700 + i as u64;
        let mut ev = event(&format!("d{job}"), action, job);
        ev.runner_id = 42;
        ev.runner_name = "grs-999".into();
        let r = store.submit_event(&ev, Some("linux"), 1000).await.unwrap();
        let recorded = store.get_job(job).await.unwrap();
        assert_eq!(r.job, recorded, "{action:?}: the answer is the record");
        let recorded = recorded.unwrap();
        assert_eq!(
            (recorded.runner_name.as_str(), recorded.runner_id),
            ("", 0),
            "{action:?}"
        );
    }
}

/// Found by the differential test: the memory store sent a job's standing
/// reason with every transition (e.g. an unrouted job's with its
/// `in_progress`), the Redis store none for transitions of recorded jobs,
/// even when the transition recorded one.
async fn a_transition_tells_the_reason_it_recorded(store: Arc<dyn Store>) {
    let mut watch = store.watch(None).await.unwrap();
    queue_one(&*store, 710).await;
    store
        .submit_event(
            &event("c710", JobAction::Completed, 710),
            Some("linux"),
            1001,
        )
        .await
        .unwrap();
    store
        .submit_event(&event("q711", JobAction::Queued, 711), None, 1002)
        .await
        .unwrap();
    store
        .submit_event(&event("p711", JobAction::InProgress, 711), None, 1003)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(Ok(Event::Job {
                job_id, to, reason, ..
            }))) => seen.push((job_id, to, reason)),
            other => panic!("{other:?} after {seen:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            (710, JobState::Queued, String::new()),
            (
                710,
                JobState::Completed,
                "completed while queued; no instance made".to_owned()
            ),
            (
                711,
                JobState::Unrouted,
                "no pool serves all of the labels [self-hosted, Linux]".to_owned()
            ),
            (711, JobState::InProgress, String::new()),
        ]
    );
}

/// Events for one job arriving at once (several gateway replicas, several
/// control-plane replicas) apply one after another: the first `queued`
/// counts, the others are stale, and the job is queued once. On Redis this
/// is the revision check of the job record at work (a decision made on a
/// record another writer changed meanwhile is redone).
async fn concurrent_events_for_one_job_apply_one_at_a_time(store: Arc<dyn Store>) {
    let tasks = (0..12).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .submit_event(
                    &event(&format!("race-{i}"), JobAction::Queued, 720),
                    Some("linux"),
                    1000 + i,
                )
                .await
                .unwrap()
                .outcome
        })
    });
    let outcomes: Vec<SubmitOutcome> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == SubmitOutcome::Accepted)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(depth(&*store, &Queue::Provision("linux".into())).await, 1);
    // And two writers of different records touching one instance: a
    // runner taking job 721 while job 720's instance is provisioned.
    let name = provision(&*store, 720).await;
    let mut started = event("p721", JobAction::InProgress, 721);
    started.runner_name = name.clone();
    let mut done = event("c720", JobAction::Completed, 720);
    done.runner_name = name.clone();
    let (a, b) = tokio::join!(
        store.submit_event(&started, Some("linux"), 3000),
        store.submit_event(&done, Some("linux"), 3000),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let inst = store.get_instance(&name).await.unwrap().unwrap();
    // Whichever came first, both took effect on the one record.
    assert_eq!(inst.assigned_job_id, 721, "{a:?} {b:?}");
    assert_eq!(inst.state, InstanceState::PendingDelete);
}

/// Limits of pool `linux` with a warm pool of `min_idle`.
fn warm_limits(min_idle: u32, max_instances: u32) -> PoolLimits {
    PoolLimits {
        max_instances,
        paused: false,
        min_idle,
    }
}

/// Makes warm instance `name` of pool `linux` (keeping `min_idle` 2, at
/// most 4 instances), running.
async fn make_warm(store: &dyn Store, name: &str) {
    match store
        .begin_warm("linux", name, &warm_limits(2, 4), 1500)
        .await
        .unwrap()
    {
        BeginWarm::Proceed { instance } => {
            assert!(instance.warm && instance.job_id == 0, "{instance:?}");
            assert_eq!(instance.state, InstanceState::PendingCreate);
        }
        other => panic!("begin_warm({name}) = {other:?}"),
    }
    store.mark_creating(name, 1501).await.unwrap();
    assert!(
        !store
            .finish_provision(0, name, "fake/w", "node1", 1502)
            .await
            .unwrap()
    );
}

async fn warm(store: &dyn Store) -> Vec<String> {
    store.pool_warm("linux").await.unwrap()
}

async fn warm_instances_are_made_up_to_min_idle_within_capacity(store: Arc<dyn Store>) {
    make_warm(&*store, "grs-wa").await;
    make_warm(&*store, "grs-wb").await;
    assert_eq!(warm(&*store).await, ["grs-wa", "grs-wb"]);
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 2);
    // The warm pool is full.
    assert_eq!(
        store
            .begin_warm("linux", "grs-wc", &warm_limits(2, 4), 1600)
            .await
            .unwrap(),
        BeginWarm::Enough
    );
    // A live min_idle override wins over the configuration.
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                min_idle: Some(3),
                ..PoolOverrides::default()
            },
        )
        .await
        .unwrap();
    // ... within the pool's capacity.
    assert_eq!(
        store
            .begin_warm("linux", "grs-wc", &warm_limits(2, 2), 1600)
            .await
            .unwrap(),
        BeginWarm::NoCapacity
    );
    assert!(matches!(
        store
            .begin_warm("linux", "grs-wc", &warm_limits(2, 4), 1600)
            .await
            .unwrap(),
        BeginWarm::Proceed { .. }
    ));
    // A retried call finds its name taken.
    assert!(matches!(
        store
            .begin_warm("linux", "grs-wc", &warm_limits(2, 4), 1601)
            .await
            .unwrap(),
        BeginWarm::Skip(_)
    ));
    assert_eq!(warm(&*store).await.len(), 3);
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 3);
    // Paused: nothing new.
    store
        .update_pool_overrides(
            "linux",
            &PoolOverrides {
                paused: Some(true),
                min_idle: Some(4),
                ..PoolOverrides::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_warm("linux", "grs-wd", &warm_limits(2, 4), 1700)
            .await
            .unwrap(),
        BeginWarm::Paused
    );
    // Another pool's warm pool is its own.
    assert!(store.pool_warm("other").await.unwrap().is_empty());
}

/// Replicas' keepers asking at once make exactly `min_idle` instances.
async fn concurrent_warm_keepers_never_overshoot_min_idle(store: Arc<dyn Store>) {
    let tasks = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .begin_warm("linux", &format!("grs-w{i}"), &warm_limits(3, 10), 1000)
                .await
                .unwrap()
        })
    });
    let made = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter(|r| matches!(r.as_ref().unwrap(), BeginWarm::Proceed { .. }))
        .count();
    assert_eq!(made, 3);
    assert_eq!(warm(&*store).await.len(), 3);
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 3);
}

async fn a_queued_job_is_bound_to_an_idle_warm_instance_instead_of_a_clone(store: Arc<dyn Store>) {
    // Still being made: not yet given to a job.
    assert!(matches!(
        store
            .begin_warm("linux", "grs-wa", &warm_limits(1, 4), 1000)
            .await
            .unwrap(),
        BeginWarm::Proceed { .. }
    ));
    queue_one(&*store, 800).await;
    let (_, job) = take(&*store, "c").await;
    assert!(matches!(
        store
            .begin_provision(job, "grs-800", &LIMITS, 2000)
            .await
            .unwrap(),
        BeginProvision::Proceed { .. }
    ));
    // Made: the next job takes it instead of a clone, even with the pool
    // full.
    store
        .finish_provision(0, "grs-wa", "fake/w", "node1", 2001)
        .await
        .unwrap();
    queue_one(&*store, 801).await;
    let full = PoolLimits {
        max_instances: 2,
        ..LIMITS
    };
    let r = store
        .begin_provision(801, "grs-801", &full, 2100)
        .await
        .unwrap();
    let BeginProvision::Warm { instance } = r else {
        panic!("begin_provision(801) = {r:?}");
    };
    assert_eq!(
        (instance.name.as_str(), instance.job_id, instance.bound_at),
        ("grs-wa", 801, 2100)
    );
    assert!(store.get_instance("grs-801").await.unwrap().is_none());
    let job = store.get_job(801).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Provisioned);
    assert_eq!(job.instance_name, "grs-wa");
    assert!(job.reason.contains("grs-wa"), "{}", job.reason);
    assert!(warm(&*store).await.is_empty());
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 2);
    // A redelivered entry finds the job provisioned.
    assert!(matches!(
        store
            .begin_provision(801, "grs-801", &LIMITS, 2101)
            .await
            .unwrap(),
        BeginProvision::Skip(_)
    ));
    // GitHub hands it the job; it completes; the warm instance goes.
    let mut started = event("p801", JobAction::InProgress, 801);
    started.runner_name = "grs-wa".into();
    store
        .submit_event(&started, Some("linux"), 2200)
        .await
        .unwrap();
    let mut done = event("c801", JobAction::Completed, 801);
    done.runner_name = "grs-wa".into();
    let r = store
        .submit_event(&done, Some("linux"), 2300)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some("grs-wa"));
}

async fn a_job_a_warm_runner_took_hands_its_own_instance_to_the_warm_pool(store: Arc<dyn Store>) {
    // The warm runner takes job 812 at once (GitHub's pick), so job 810,
    // queued next, gets an instance of its own.
    make_warm(&*store, "grs-wa").await;
    let mut busy = event("p812", JobAction::InProgress, 812);
    busy.runner_name = "grs-wa".into();
    store
        .submit_event(&busy, Some("linux"), 1950)
        .await
        .unwrap();
    queue_one(&*store, 810).await;
    let own = provision(&*store, 810).await;
    let wa = store.get_instance("grs-wa").await.unwrap().unwrap();
    assert_eq!((wa.job_id, wa.assigned_job_id), (812, 812));
    assert!(warm(&*store).await.is_empty());
    // A second warm runner takes 810.
    make_warm(&*store, "grs-wb").await;
    let mut started = event("p810", JobAction::InProgress, 810);
    started.runner_name = "grs-wb".into();
    let r = store
        .submit_event(&started, Some("linux"), 3000)
        .await
        .unwrap();
    assert_eq!(r.job.as_ref().unwrap().instance_name, "grs-wb");
    let wb = store.get_instance("grs-wb").await.unwrap().unwrap();
    assert_eq!(
        (wb.job_id, wb.assigned_job_id, wb.bound_at),
        (810, 810, 3000)
    );
    // 810's own instance is owed to no other job: it joins the warm pool.
    let mine = store.get_instance(&own).await.unwrap().unwrap();
    assert!(mine.warm && mine.job_id == 0, "{mine:?}");
    assert_eq!(mine.state, InstanceState::Running);
    assert_eq!(warm(&*store).await, std::slice::from_ref(&own));
    // 810 completes on grs-wb: grs-wb goes, its former own instance stays.
    let mut done = event("c810", JobAction::Completed, 810);
    done.runner_name = "grs-wb".into();
    let r = store
        .submit_event(&done, Some("linux"), 3100)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some("grs-wb"));
    assert_eq!(warm(&*store).await, [own]);
}

async fn a_job_cancelled_before_pickup_hands_its_warm_instance_back(store: Arc<dyn Store>) {
    make_warm(&*store, "grs-wa").await;
    queue_one(&*store, 820).await;
    assert!(matches!(
        store
            .begin_provision(820, "grs-820", &LIMITS, 2000)
            .await
            .unwrap(),
        BeginProvision::Warm { .. }
    ));
    assert!(warm(&*store).await.is_empty());
    let mut cancelled = event("c820", JobAction::Completed, 820);
    cancelled.conclusion = "cancelled".into();
    let r = store
        .submit_event(&cancelled, Some("linux"), 2100)
        .await
        .unwrap();
    assert_eq!(r.teardown, None);
    let wa = store.get_instance("grs-wa").await.unwrap().unwrap();
    assert_eq!(
        (wa.job_id, wa.bound_at, wa.state),
        (0, 0, InstanceState::Running)
    );
    assert!(wa.reason.contains("820"), "{}", wa.reason);
    assert_eq!(warm(&*store).await, ["grs-wa"]);
    assert_eq!(depth(&*store, &Queue::Teardown).await, 0);
}

/// Job 830 is cancelled while its idle runner is queued for teardown,
/// but GitHub had given that runner job 831, whose `in_progress` comes
/// after the cancellation: the runner keeps running 831.
async fn a_late_in_progress_calls_off_the_teardown_of_the_runner_that_took_it(
    store: Arc<dyn Store>,
) {
    queue_one(&*store, 830).await;
    let a = provision(&*store, 830).await;
    let mut cancelled = event("c830", JobAction::Completed, 830);
    cancelled.conclusion = "cancelled".into();
    let r = store
        .submit_event(&cancelled, Some("linux"), 3000)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some(a.as_str()));
    let mut started = event("p831", JobAction::InProgress, 831);
    started.runner_name = a.clone();
    store
        .submit_event(&started, Some("linux"), 3001)
        .await
        .unwrap();
    let inst = store.get_instance(&a).await.unwrap().unwrap();
    assert_eq!(
        (inst.state, inst.assigned_job_id),
        (InstanceState::Running, 831)
    );
    assert!(inst.reason.contains("831"), "{}", inst.reason);
    // The teardown entry finds nothing to delete.
    assert_eq!(store.begin_teardown(&a, 3002).await.unwrap(), None);
    assert_eq!(
        store.get_instance(&a).await.unwrap().unwrap().state,
        InstanceState::Running
    );
    // 831 completes there: now it goes.
    let mut done = event("c831", JobAction::Completed, 831);
    done.runner_name = a.clone();
    let r = store
        .submit_event(&done, Some("linux"), 3003)
        .await
        .unwrap();
    assert_eq!(r.teardown.as_deref(), Some(a.as_str()));
    assert!(store.begin_teardown(&a, 3004).await.unwrap().is_some());
}

async fn a_busy_runners_teardown_is_called_off(store: Arc<dyn Store>) {
    queue_one(&*store, 840).await;
    let a = provision(&*store, 840).await;
    assert!(!store.call_off_teardown(&a, "busy", 3000).await.unwrap());
    store
        .enqueue_teardown(&a, "runner did not take a job within 15m", 3001)
        .await
        .unwrap();
    assert!(
        store
            .call_off_teardown(&a, "teardown called off: runner busy", 3002)
            .await
            .unwrap()
    );
    let inst = store.get_instance(&a).await.unwrap().unwrap();
    assert_eq!(inst.state, InstanceState::Running);
    assert_eq!(inst.reason, "teardown called off: runner busy");
    assert_eq!(store.begin_teardown(&a, 3003).await.unwrap(), None);
    // Once it is being deleted, nothing calls it off.
    store.enqueue_teardown(&a, "again", 3004).await.unwrap();
    store.begin_teardown(&a, 3005).await.unwrap().unwrap();
    assert!(!store.call_off_teardown(&a, "busy", 3006).await.unwrap());
    assert!(
        !store
            .call_off_teardown("grs-none", "busy", 3006)
            .await
            .unwrap()
    );
}

async fn a_failed_or_torn_down_warm_instance_leaves_the_warm_pool(store: Arc<dyn Store>) {
    assert!(matches!(
        store
            .begin_warm("linux", "grs-wa", &warm_limits(1, 4), 1000)
            .await
            .unwrap(),
        BeginWarm::Proceed { .. }
    ));
    store
        .fail_provision(0, "grs-wa", "warm instance not made: clone failed", 1001)
        .await
        .unwrap();
    assert_eq!(
        store.get_instance("grs-wa").await.unwrap().unwrap().state,
        InstanceState::PendingDelete
    );
    assert!(warm(&*store).await.is_empty());
    // Its slot is held until the VM is gone; the keeper may make another.
    assert!(matches!(
        store
            .begin_warm("linux", "grs-wb", &warm_limits(1, 4), 1002)
            .await
            .unwrap(),
        BeginWarm::Proceed { .. }
    ));
    store.begin_teardown("grs-wa", 1003).await.unwrap().unwrap();
    store
        .finish_teardown("grs-wa", "", KEEP, 1004)
        .await
        .unwrap();
    assert_eq!(store.pool_in_use("linux").await.unwrap(), 1);
    store
        .finish_provision(0, "grs-wb", "fake/w", "node1", 1005)
        .await
        .unwrap();
    assert_eq!(warm(&*store).await, ["grs-wb"]);
    store
        .retire_warm("grs-wb", "idle warm instance recycled", 1006)
        .await
        .unwrap();
    assert!(warm(&*store).await.is_empty());
    // A warm instance a job was bound to is not retired.
    make_warm(&*store, "grs-wc").await;
    queue_one(&*store, 890).await;
    store
        .begin_provision(890, "grs-890", &LIMITS, 1100)
        .await
        .unwrap();
    assert_eq!(
        store
            .retire_warm("grs-wc", "idle warm instance recycled", 1101)
            .await
            .unwrap(),
        Some(false)
    );
    assert_eq!(
        store.get_instance("grs-wc").await.unwrap().unwrap().state,
        InstanceState::Running
    );
    assert_eq!(
        store.retire_warm("grs-none", "x", 1102).await.unwrap(),
        None
    );
}

/// Job 850's own instance went to the warm pool while being made (a warm
/// runner took 850); its making then fails: job 850, running elsewhere,
/// does not fail.
async fn a_job_that_ran_elsewhere_does_not_fail_with_the_instance_it_gave_up(
    store: Arc<dyn Store>,
) {
    queue_one(&*store, 850).await;
    assert!(matches!(
        store
            .begin_provision(850, "grs-850", &LIMITS, 2000)
            .await
            .unwrap(),
        BeginProvision::Proceed { .. }
    ));
    make_warm(&*store, "grs-wa").await;
    let mut started = event("p850", JobAction::InProgress, 850);
    started.runner_name = "grs-wa".into();
    store
        .submit_event(&started, Some("linux"), 2100)
        .await
        .unwrap();
    assert_eq!(warm(&*store).await, ["grs-850"]);
    store
        .fail_provision(850, "grs-850", "clone failed", 2200)
        .await
        .unwrap();
    let job = store.get_job(850).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::InProgress);
    assert_eq!(job.instance_name, "grs-wa");
    assert!(warm(&*store).await.is_empty());
}

async fn node_places_hold_a_nodes_maximum_and_go_with_their_instance(store: Arc<dyn Store>) {
    // Places are held for recorded instances (the dispatcher records one
    // before its provisioner reserves).
    queue_one(&*store, 860).await;
    queue_one(&*store, 861).await;
    for job in [860, 861] {
        store
            .begin_provision(job, &format!("grs-{job}"), &LIMITS, 2000)
            .await
            .unwrap();
    }
    assert!(store.reserve_node("pve1", "grs-860", 2, &[]).await.unwrap());
    // Again: still held, nothing more taken.
    assert!(store.reserve_node("pve1", "grs-860", 2, &[]).await.unwrap());
    // A VM of this installation seen on the node counts, held or not.
    let seen = ["grs-old".to_owned()];
    assert!(
        !store
            .reserve_node("pve1", "grs-861", 2, &seen)
            .await
            .unwrap()
    );
    assert!(store.reserve_node("pve1", "grs-861", 2, &[]).await.unwrap());
    assert_eq!(
        store.node_places("pve1").await.unwrap(),
        ["grs-860", "grs-861"]
    );
    // Other nodes are their own.
    assert!(store.reserve_node("pve2", "grs-861", 1, &[]).await.unwrap());
    store.release_node("pve2", "grs-861").await.unwrap();
    assert!(store.node_places("pve2").await.unwrap().is_empty());
    // Full.
    assert!(!store.reserve_node("pve1", "grs-862", 2, &[]).await.unwrap());
    // Made on pve1, torn down: its place goes with it.
    store
        .finish_provision(860, "grs-860", "pve1/101", "pve1", 2001)
        .await
        .unwrap();
    store
        .enqueue_teardown("grs-860", "test", 2002)
        .await
        .unwrap();
    store
        .begin_teardown("grs-860", 2003)
        .await
        .unwrap()
        .unwrap();
    store
        .finish_teardown("grs-860", "", KEEP, 2004)
        .await
        .unwrap();
    assert_eq!(store.node_places("pve1").await.unwrap(), ["grs-861"]);
    // A place whose instance was never recorded (or is gone) counts for
    // nothing and is dropped.
    assert!(
        store
            .reserve_node("pve1", "grs-ghost", 3, &[])
            .await
            .unwrap()
    );
    assert!(store.reserve_node("pve1", "grs-862", 2, &[]).await.unwrap());
    assert_eq!(
        store.node_places("pve1").await.unwrap(),
        ["grs-861", "grs-862"]
    );
}

async fn concurrent_node_reservations_never_exceed_the_maximum(store: Arc<dyn Store>) {
    for job in 870..878 {
        queue_one(&*store, job).await;
        store
            .begin_provision(job, &format!("grs-{job}"), &warm_limits(0, 10), 2000)
            .await
            .unwrap();
    }
    let tasks = (870..878).map(|job| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .reserve_node("pve1", &format!("grs-{job}"), 3, &[])
                .await
                .unwrap()
        })
    });
    let held = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(held, 3);
    assert_eq!(store.node_places("pve1").await.unwrap().len(), 3);
}
