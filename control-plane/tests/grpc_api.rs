//! The gRPC API over real sockets: validation, error codes, auth, health,
//! the job flow end to end on the fake provisioner, events, pools.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use grs_control_plane::store::{MemoryStore, Store};
use grs_control_plane::testing::{
    RunningControlPlane, control_plane, eventually, fake_pools, job_event, submit, test_config,
    wait_for_instance,
};
use grs_proto::v1::{self as pb, JobAction};
use grs_provisioner::FakeProvisioner;
use secrecy::SecretString;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn start() -> (RunningControlPlane, Arc<FakeProvisioner>) {
    let config = test_config();
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    (
        RunningControlPlane::start(control_plane(config, Arc::new(MemoryStore::new()), pools))
            .await,
        fake,
    )
}

#[tokio::test]
async fn bad_events_are_refused_with_invalid_argument_naming_the_field() {
    let (cp, _) = start().await;
    let mut c = cp.client().await;
    let cases = [
        (
            pb::SubmitJobEventRequest { event: None },
            "event is required",
        ),
        (
            pb::SubmitJobEventRequest {
                event: Some(job_event("d", JobAction::Queued, 0)),
            },
            "event.job_id",
        ),
        (
            pb::SubmitJobEventRequest {
                event: Some(job_event("", JobAction::Queued, 1)),
            },
            "event.delivery_id",
        ),
        (
            pb::SubmitJobEventRequest {
                event: Some(job_event("d", JobAction::Unspecified, 1)),
            },
            "event.action",
        ),
        (
            pb::SubmitJobEventRequest {
                event: Some(pb::JobEvent {
                    action: 42,
                    ..job_event("d", JobAction::Queued, 1)
                }),
            },
            "event.action 42",
        ),
        (
            pb::SubmitJobEventRequest {
                event: Some(pb::JobEvent {
                    labels: vec!["x".into(); 101],
                    ..job_event("d", JobAction::Queued, 1)
                }),
            },
            "event.labels",
        ),
    ];
    for (req, field) in cases {
        let e = c.submit_job_event(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field),
            "{:?} does not name {field}",
            e.message()
        );
    }
    // Nothing was recorded.
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty());
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_jobs_instances_and_pools_are_not_found_by_name() {
    let (cp, _) = start().await;
    let mut c = cp.client().await;
    let e = c
        .get_job(pb::GetJobRequest { job_id: 123 })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("123")),
        (Code::NotFound, true),
        "{e:?}"
    );
    let e = c
        .get_instance(pb::GetInstanceRequest {
            name: "grs-9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("grs-9")),
        (Code::NotFound, true),
        "{e:?}"
    );
    let e = c
        .delete_instance(pb::DeleteInstanceRequest {
            name: "grs-9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_pool(pb::GetPoolRequest { name: "gpu".into() })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("gpu")),
        (Code::NotFound, true),
        "{e:?}"
    );
    let e = c
        .update_pool(pb::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .list_jobs(pb::ListJobsRequest {
            pool: "gpu".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .list_jobs(pb::ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("page_token")),
        (Code::InvalidArgument, true)
    );
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_job_gets_an_instance_which_is_deleted_when_the_job_completes() {
    let (cp, fake) = start().await;
    let mut c = cp.client().await;
    let r = submit(&mut c, job_event("d1", JobAction::Queued, 7_000_000_001)).await;
    assert_eq!(r.outcome(), pb::SubmitOutcome::Accepted);
    assert_eq!(r.job.as_ref().unwrap().pool, "linux");
    let inst = eventually("the instance to run", Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            c.get_instance(pb::GetInstanceRequest {
                name: "grs-7000000001".into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
            .filter(|i| i.state() == pb::InstanceState::Running)
        }
    })
    .await;
    assert_eq!(inst.job_id, 7_000_000_001);
    assert_eq!(
        c.get_job(pb::GetJobRequest {
            job_id: 7_000_000_001
        })
        .await
        .unwrap()
        .into_inner()
        .state(),
        pb::JobState::Provisioned
    );
    let mut started = job_event("d2", JobAction::InProgress, 7_000_000_001);
    started.runner_name = "grs-7000000001".into();
    started.runner_id = 55;
    submit(&mut c, started).await;
    let mut done = job_event("d3", JobAction::Completed, 7_000_000_001);
    done.runner_name = "grs-7000000001".into();
    done.conclusion = "success".into();
    submit(&mut c, done).await;
    wait_for_instance(
        &c,
        "grs-7000000001",
        pb::InstanceState::Deleted,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!((fake.creates(), fake.deletes(), fake.live()), (1, 1, 0));
    let job = c
        .get_job(pb::GetJobRequest {
            job_id: 7_000_000_001,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            job.state(),
            job.conclusion.as_str(),
            job.runner_name.as_str()
        ),
        (pb::JobState::Completed, "success", "grs-7000000001")
    );
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.pools[0].instances_in_use, 0);
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_paused_pool_queues_jobs_and_resuming_provisions_them() {
    let (cp, fake) = start().await;
    let mut c = cp.client().await;
    let pool = c
        .update_pool(pb::UpdatePoolRequest {
            name: "linux".into(),
            paused: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pool.paused);
    for j in 1..=2 {
        submit(&mut c, job_event(&format!("d{j}"), JobAction::Queued, j)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(fake.creates(), 0, "a paused pool starts nothing");
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.provision_queue_depth, 2);
    assert_eq!(stats.pools[0].jobs_queued, 2);
    let e = c
        .update_pool(pb::UpdatePoolRequest {
            name: "linux".into(),
            min_idle: Some(9),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "min_idle above max_instances"
    );
    c.update_pool(pb::UpdatePoolRequest {
        name: "linux".into(),
        paused: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    eventually("both jobs provisioned", Duration::from_secs(5), || {
        let fake = fake.clone();
        async move { (fake.live() == 2).then_some(()) }
    })
    .await;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_events_streams_transitions_over_the_wire() {
    let (cp, _) = start().await;
    let mut c = cp.client().await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            pool: "linux".into(),
        })
        .await
        .unwrap()
        .into_inner();
    submit(&mut c, job_event("d1", JobAction::Queued, 42)).await;
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("events in time")
            .expect("stream open")
            .unwrap();
        seen.push(e.kind.expect("a kind"));
    }
    use pb::event::Kind;
    assert!(
        matches!(&seen[0], Kind::Job(t) if t.job_id == 42 && t.to() == pb::JobState::Queued),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|k| matches!(k, Kind::Instance(t) if t.name == "grs-42" && t.to() == pb::InstanceState::Running)),
        "{seen:?}"
    );
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_a_token_every_rpc_but_health_and_reflection_needs_it() {
    let mut config = test_config();
    config.control_plane.auth_token = Some(SecretString::from("s3cret-token".to_owned()));
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, Arc::new(MemoryStore::new()), pools))
        .await;
    let mut c = cp.client().await;
    let e = c.list_pools(pb::ListPoolsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("missing bearer token"), "{e:?}");
    let mut req = tonic::Request::new(pb::ListPoolsRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    let e = c.list_pools(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        !e.message().contains("s3cret"),
        "the error must not echo the token"
    );
    let mut req = tonic::Request::new(pb::ListPoolsRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret-token".parse().unwrap());
    assert_eq!(c.list_pools(req).await.unwrap().into_inner().pools.len(), 1);
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let h = health
        .check(HealthCheckRequest {
            service: "grs.v1.ControlPlane".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status(), ServingStatus::Serving);
    let names = reflection_v1_services(cp.url()).await;
    assert!(
        names.iter().any(|n| n == "grs.v1.ControlPlane"),
        "reflection without a token: {names:?}"
    );
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_answers_unavailable_and_health_not_serving() {
    // Nothing listens on port 1.
    let store = grs_control_plane::testing::redis_store_at("redis://127.0.0.1:1", "grs-test:down");
    let config = test_config();
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(
        config,
        Arc::new(store) as Arc<dyn Store>,
        pools,
    ))
    .await;
    let mut c = cp.client().await;
    let e = c
        .submit_job_event(pb::SubmitJobEventRequest {
            event: Some(job_event("d", JobAction::Queued, 1)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = c
        .get_job(pb::GetJobRequest { job_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = eventually("health to settle", Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()
                .map(|r| r.into_inner().status())
        }
    })
    .await;
    assert_eq!(status, ServingStatus::NotServing);
    let _ = &mut health;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_event_streams_instead_of_hanging() {
    let (cp, _) = start().await;
    let mut c = cp.client().await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let stopped = tokio::time::timeout(Duration::from_secs(10), cp.shutdown()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "graceful shutdown with a watcher open: {stopped:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the stream ends");
    assert!(end.as_ref().is_none_or(|r| r.is_err()), "{end:?}");
}

/// The services grpc.reflection.v1 lists at `url` (no credentials sent).
async fn reflection_v1_services(url: String) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.expect("an answer").unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}")
    };
    list.service.into_iter().map(|s| s.name).collect()
}

#[tokio::test]
async fn reflection_v1_lists_the_api_too() {
    let (cp, _) = start().await;
    let names = reflection_v1_services(cp.url()).await;
    assert!(
        names.iter().any(|n| n == "grs.v1.ControlPlane")
            && names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
    cp.shutdown().await.unwrap();
}

/// `SubmitJobEvents` of `events`, panicking on an RPC error.
async fn submit_batch(
    c: &mut grs_proto::v1::control_plane_client::ControlPlaneClient<tonic::transport::Channel>,
    events: Vec<pb::JobEvent>,
) -> Vec<pb::submit_job_event_result::Result> {
    c.submit_job_events(pb::SubmitJobEventsRequest {
        events,
        ..Default::default()
    })
    .await
    .expect("SubmitJobEvents")
    .into_inner()
    .results
    .into_iter()
    .map(|r| r.result.expect("a result"))
    .collect()
}

/// The response to a recorded event, or a panic naming what came instead.
fn recorded(r: &pb::submit_job_event_result::Result) -> &pb::SubmitJobEventResponse {
    match r {
        pb::submit_job_event_result::Result::Response(r) => r,
        other => panic!("expected a response, got {other:?}"),
    }
}

/// A batch mixing good and bad events, with a redelivery inside it: every
/// event answered in request order, bad ones alone refused (naming the
/// field) and recorded nowhere, good ones recorded.
async fn a_mixed_batch_is_answered_event_by_event(cp: RunningControlPlane) {
    use pb::submit_job_event_result::Result as R;
    let mut c = cp.client().await;
    let unknown_action = pb::JobEvent {
        action: 42,
        ..job_event("b-reused", JobAction::Queued, 12)
    };
    let mut done = job_event("b-c11", JobAction::Completed, 11);
    done.conclusion = "cancelled".into();
    let results = submit_batch(
        &mut c,
        vec![
            job_event("b-q11", JobAction::Queued, 11),
            job_event("b-no-job", JobAction::Queued, 0),
            unknown_action,
            // The refused event's delivery id was not used up.
            job_event("b-reused", JobAction::Queued, 13),
            done,
            // A redelivery of the first event, in the same batch.
            job_event("b-q11", JobAction::Queued, 11),
            job_event("", JobAction::Queued, 14),
        ],
    )
    .await;
    assert_eq!(results.len(), 7, "{results:?}");
    let r = recorded(&results[0]);
    assert_eq!(r.outcome(), pb::SubmitOutcome::Accepted);
    assert_eq!(
        r.job.as_ref().map(|j| (j.job_id, j.state())),
        Some((11, pb::JobState::Queued))
    );
    for (i, field) in [
        (1, "event.job_id"),
        (2, "event.action 42"),
        (6, "event.delivery_id"),
    ] {
        match &results[i] {
            R::Error(e) => {
                assert_eq!(e.code, Code::InvalidArgument as i32, "result {i}: {e:?}");
                assert!(
                    e.message.contains(field),
                    "result {i}: {:?} does not name {field}",
                    e.message
                );
            }
            other => panic!("result {i} should be refused: {other:?}"),
        }
    }
    let r = recorded(&results[3]);
    assert_eq!(
        (r.outcome(), r.job.as_ref().map(|j| j.job_id)),
        (pb::SubmitOutcome::Accepted, Some(13))
    );
    let r = recorded(&results[4]);
    assert_eq!(
        (r.outcome(), r.job.as_ref().map(|j| j.state())),
        (pb::SubmitOutcome::Accepted, Some(pb::JobState::Completed))
    );
    let r = recorded(&results[5]);
    assert_eq!(
        (r.outcome(), r.job.as_ref().map(|j| j.state())),
        (
            pb::SubmitOutcome::DuplicateDelivery,
            Some(pb::JobState::Completed)
        ),
        "the redelivery sees the completion before it"
    );
    let job = c
        .get_job(pb::GetJobRequest { job_id: 11 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (job.state(), job.conclusion.as_str()),
        (pb::JobState::Completed, "cancelled")
    );
    let job = c
        .get_job(pb::GetJobRequest { job_id: 13 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.pool, "linux");
    for refused in [12, 14] {
        let e = c
            .get_job(pb::GetJobRequest { job_id: refused })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "job {refused} was refused");
    }

    // The same delivery id twice in one batch: accepted once.
    let results = submit_batch(
        &mut c,
        vec![
            job_event("b-twice", JobAction::Queued, 21),
            job_event("b-twice", JobAction::Completed, 21),
        ],
    )
    .await;
    assert_eq!(
        results
            .iter()
            .map(|r| recorded(r).outcome())
            .collect::<Vec<_>>(),
        vec![
            pb::SubmitOutcome::Accepted,
            pb::SubmitOutcome::DuplicateDelivery
        ]
    );
    let job = c
        .get_job(pb::GetJobRequest { job_id: 21 })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(job.state(), pb::JobState::Completed, "{job:?}");
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_mixed_batch_is_answered_event_by_event_on_the_memory_store() {
    let (cp, _) = start().await;
    a_mixed_batch_is_answered_event_by_event(cp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_is_answered_event_by_event_on_redis() {
    let Some(store) = grs_control_plane::testing::redis_store("grpc_batch").await else {
        return;
    };
    let cleanup = grs_control_plane::testing::redis_store_at(
        &grs_control_plane::testing::redis_url(),
        store.prefix(),
    );
    let config = test_config();
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, Arc::new(store), pools)).await;
    a_mixed_batch_is_answered_event_by_event(cp).await;
    cleanup.flush_prefix().await.unwrap();
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_whole_and_an_empty_one_answers_nothing() {
    let (cp, _) = start().await;
    let mut c = cp.client().await;
    // Labels no pool serves: recorded as unrouted, nothing provisions.
    let unrouted = |j: u64| pb::JobEvent {
        labels: vec!["gpu".into()],
        ..job_event(&format!("lim-{j}"), JobAction::Queued, j)
    };
    let e = c
        .submit_job_events(pb::SubmitJobEventsRequest {
            events: (1..=257).map(unrouted).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("events") && e.message().contains("256"),
        "{:?} names the field and the limit",
        e.message()
    );
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        jobs.jobs.is_empty(),
        "nothing of a refused batch is recorded"
    );

    // The limit itself is allowed.
    let results = submit_batch(&mut c, (1..=256).map(unrouted).collect()).await;
    assert_eq!(results.len(), 256);
    for (i, r) in results.iter().enumerate() {
        let r = recorded(r);
        assert_eq!(
            (r.outcome(), r.job.as_ref().map(|j| j.job_id)),
            (pb::SubmitOutcome::Accepted, Some(i as u64 + 1)),
            "in request order"
        );
    }
    let job = c
        .get_job(pb::GetJobRequest { job_id: 256 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), pb::JobState::Unrouted);

    let empty = c
        .submit_job_events(pb::SubmitJobEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty(), "{empty:?}");
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_asking_for_outcomes_only_gets_no_jobs_back() {
    let (cp, _fake) = start().await;
    let c = cp.client().await;
    let ev = |d: &str, job: u64| pb::JobEvent {
        delivery_id: d.into(),
        action: pb::JobAction::Queued as i32,
        job_id: job,
        labels: vec!["self-hosted".into(), "linux".into()],
        ..Default::default()
    };
    let answer = |outcomes_only: bool, events: Vec<pb::JobEvent>| {
        let mut c = c.clone();
        async move {
            c.submit_job_events(pb::SubmitJobEventsRequest {
                events,
                outcomes_only,
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(pb::submit_job_event_result::Result::Response(r)) => r,
                other => panic!("expected a response, got {other:?}"),
            })
            .collect::<Vec<_>>()
        }
    };
    let lean = answer(true, vec![ev("o-1", 9101), ev("o-1", 9101)]).await;
    let outcomes: Vec<i32> = lean.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::SubmitOutcome::Accepted as i32,
            pb::SubmitOutcome::DuplicateDelivery as i32
        ]
    );
    assert!(lean.iter().all(|r| r.job.is_none()), "{lean:?}");
    // Recorded all the same.
    let job = cp
        .client()
        .await
        .get_job(pb::GetJobRequest { job_id: 9101 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.job_id, 9101);
    let full = answer(false, vec![ev("o-2", 9102)]).await;
    assert_eq!(full[0].job.as_ref().map(|j| j.job_id), Some(9102));
    cp.shutdown().await.unwrap();
}
