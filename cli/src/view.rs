//! The JSON form of the API's messages: what `--output json` prints.
//!
//! A stable contract for scripts: field names are the proto's (snake_case),
//! every field is always present (empty string, 0, `[]` or `null` rather
//! than left out), enum values are the proto's names in lower snake_case
//! without their prefix (`in_progress`, `pending_delete`; the same words
//! `--state` takes and tables show), times are RFC 3339 UTC strings with
//! milliseconds, or `null` when unknown. 64-bit ids are JSON numbers (GitHub
//! ids stay far below 2^53).
//!
//! Each command prints its response message: `jobs list` a
//! `ListJobsResponse` (`{"jobs": [...], "next_page_token": ""}`), `jobs get`
//! a `Job`, `instances delete` a `DeleteInstanceResponse`, and so on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grs_proto::v1 as pb;
use serde::Serialize;

/// A proto enum's value name without its prefix, lower-cased
/// (`JOB_STATE_IN_PROGRESS` → `in_progress`); `unknown_<n>` for a value
/// this CLI does not know (a newer server).
fn enum_name(name: Option<&str>, prefix: &str, value: i32) -> String {
    match name {
        Some(n) => n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase(),
        None => format!("unknown_{value}"),
    }
}

/// A `JobState` value's name (`queued`, `in_progress`, ...).
pub fn job_state(value: i32) -> String {
    let name = pb::JobState::try_from(value).ok().map(|s| s.as_str_name());
    enum_name(name, "JOB_STATE_", value)
}

/// An `InstanceState` value's name (`running`, `pending_delete`, ...).
pub fn instance_state(value: i32) -> String {
    let name = pb::InstanceState::try_from(value)
        .ok()
        .map(|s| s.as_str_name());
    enum_name(name, "INSTANCE_STATE_", value)
}

/// A protobuf timestamp as a `SystemTime`; `None` when unset or before the
/// epoch.
pub fn system_time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t?;
    if t.seconds < 0 || t.nanos < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32))
}

/// RFC 3339 UTC with milliseconds; `None` when unset.
pub fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    system_time(t).map(|t| humantime::format_rfc3339_millis(t).to_string())
}

/// `Job`.
#[derive(Debug, Serialize)]
pub struct Job<'a> {
    job_id: u64,
    run_id: u64,
    run_attempt: u32,
    repository: &'a str,
    organization: &'a str,
    installation_id: u64,
    labels: &'a [String],
    state: String,
    pool: &'a str,
    instance_name: &'a str,
    runner_name: &'a str,
    runner_id: u64,
    conclusion: &'a str,
    reason: &'a str,
    attempts: u32,
    job_name: &'a str,
    workflow_name: &'a str,
    recorded_at: Option<String>,
    updated_at: Option<String>,
}

impl<'a> From<&'a pb::Job> for Job<'a> {
    fn from(j: &'a pb::Job) -> Self {
        Self {
            job_id: j.job_id,
            run_id: j.run_id,
            run_attempt: j.run_attempt,
            repository: &j.repository,
            organization: &j.organization,
            installation_id: j.installation_id,
            labels: &j.labels,
            state: job_state(j.state),
            pool: &j.pool,
            instance_name: &j.instance_name,
            runner_name: &j.runner_name,
            runner_id: j.runner_id,
            conclusion: &j.conclusion,
            reason: &j.reason,
            attempts: j.attempts,
            job_name: &j.job_name,
            workflow_name: &j.workflow_name,
            recorded_at: rfc3339(j.recorded_at.as_ref()),
            updated_at: rfc3339(j.updated_at.as_ref()),
        }
    }
}

/// `ListJobsResponse`.
#[derive(Debug, Serialize)]
pub struct ListJobs<'a> {
    jobs: Vec<Job<'a>>,
    next_page_token: &'a str,
}

impl<'a> ListJobs<'a> {
    /// Jobs (of one or several pages) and the token of the page after them.
    pub fn new(jobs: &'a [pb::Job], next_page_token: &'a str) -> Self {
        Self {
            jobs: jobs.iter().map(Job::from).collect(),
            next_page_token,
        }
    }
}

/// `Instance`.
#[derive(Debug, Serialize)]
pub struct Instance<'a> {
    name: &'a str,
    pool: &'a str,
    job_id: u64,
    assigned_job_id: u64,
    state: String,
    provider_id: &'a str,
    location: &'a str,
    reason: &'a str,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl<'a> From<&'a pb::Instance> for Instance<'a> {
    fn from(i: &'a pb::Instance) -> Self {
        Self {
            name: &i.name,
            pool: &i.pool,
            job_id: i.job_id,
            assigned_job_id: i.assigned_job_id,
            state: instance_state(i.state),
            provider_id: &i.provider_id,
            location: &i.location,
            reason: &i.reason,
            created_at: rfc3339(i.created_at.as_ref()),
            updated_at: rfc3339(i.updated_at.as_ref()),
        }
    }
}

/// `ListInstancesResponse`.
#[derive(Debug, Serialize)]
pub struct ListInstances<'a> {
    instances: Vec<Instance<'a>>,
}

impl<'a> From<&'a pb::ListInstancesResponse> for ListInstances<'a> {
    fn from(r: &'a pb::ListInstancesResponse) -> Self {
        Self {
            instances: r.instances.iter().map(Instance::from).collect(),
        }
    }
}

/// `DeleteInstanceResponse`.
#[derive(Debug, Serialize)]
pub struct DeleteInstance<'a> {
    instance: Option<Instance<'a>>,
}

impl<'a> From<&'a pb::DeleteInstanceResponse> for DeleteInstance<'a> {
    fn from(r: &'a pb::DeleteInstanceResponse) -> Self {
        Self {
            instance: r.instance.as_ref().map(Instance::from),
        }
    }
}

/// `Pool`.
#[derive(Debug, Serialize)]
pub struct Pool<'a> {
    name: &'a str,
    labels: &'a [String],
    provisioner: &'a str,
    max_instances: u32,
    min_idle: u32,
    paused: bool,
    instances_in_use: u32,
    jobs_queued: u64,
}

impl<'a> From<&'a pb::Pool> for Pool<'a> {
    fn from(p: &'a pb::Pool) -> Self {
        Self {
            name: &p.name,
            labels: &p.labels,
            provisioner: &p.provisioner,
            max_instances: p.max_instances,
            min_idle: p.min_idle,
            paused: p.paused,
            instances_in_use: p.instances_in_use,
            jobs_queued: p.jobs_queued,
        }
    }
}

/// `ListPoolsResponse`.
#[derive(Debug, Serialize)]
pub struct ListPools<'a> {
    pools: Vec<Pool<'a>>,
}

impl<'a> From<&'a pb::ListPoolsResponse> for ListPools<'a> {
    fn from(r: &'a pb::ListPoolsResponse) -> Self {
        Self {
            pools: r.pools.iter().map(Pool::from).collect(),
        }
    }
}

/// `PoolUsage`.
#[derive(Debug, Serialize)]
pub struct PoolUsage<'a> {
    pool: &'a str,
    instances_in_use: u32,
    max_instances: u32,
    jobs_queued: u64,
}

/// `Stats`.
#[derive(Debug, Serialize)]
pub struct Stats<'a> {
    provision_queue_depth: u64,
    provision_queue_pending: u64,
    teardown_queue_depth: u64,
    teardown_queue_pending: u64,
    pools: Vec<PoolUsage<'a>>,
}

impl<'a> From<&'a pb::Stats> for Stats<'a> {
    fn from(s: &'a pb::Stats) -> Self {
        Self {
            provision_queue_depth: s.provision_queue_depth,
            provision_queue_pending: s.provision_queue_pending,
            teardown_queue_depth: s.teardown_queue_depth,
            teardown_queue_pending: s.teardown_queue_pending,
            pools: s
                .pools
                .iter()
                .map(|p| PoolUsage {
                    pool: &p.pool,
                    instances_in_use: p.instances_in_use,
                    max_instances: p.max_instances,
                    jobs_queued: p.jobs_queued,
                })
                .collect(),
        }
    }
}

/// `JobTransition`. `from` is `unspecified` when the job was first recorded.
#[derive(Debug, Serialize)]
pub struct JobTransition<'a> {
    job_id: u64,
    pool: &'a str,
    from: String,
    to: String,
    reason: &'a str,
}

/// `InstanceTransition`. `from` is `unspecified` when first recorded.
#[derive(Debug, Serialize)]
pub struct InstanceTransition<'a> {
    name: &'a str,
    pool: &'a str,
    from: String,
    to: String,
    reason: &'a str,
}

/// `Event`: the `oneof kind` appears as the one key `job` or `instance`
/// (an event of a kind this CLI does not know has neither).
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<JobTransition<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<InstanceTransition<'a>>,
}

impl<'a> From<&'a pb::Event> for Event<'a> {
    fn from(e: &'a pb::Event) -> Self {
        use pb::event::Kind;
        let (job, instance) = match &e.kind {
            Some(Kind::Job(j)) => (
                Some(JobTransition {
                    job_id: j.job_id,
                    pool: &j.pool,
                    from: job_state(j.from),
                    to: job_state(j.to),
                    reason: &j.reason,
                }),
                None,
            ),
            Some(Kind::Instance(i)) => (
                None,
                Some(InstanceTransition {
                    name: &i.name,
                    pool: &i.pool,
                    from: instance_state(i.from),
                    to: instance_state(i.to),
                    reason: &i.reason,
                }),
            ),
            None => (None, None),
        };
        Self {
            at: rfc3339(e.at.as_ref()),
            job,
            instance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_drop_the_prefix_and_are_lower_snake_case() {
        assert_eq!(job_state(pb::JobState::InProgress as i32), "in_progress");
        assert_eq!(
            instance_state(pb::InstanceState::PendingDelete as i32),
            "pending_delete"
        );
        assert_eq!(job_state(99), "unknown_99");
    }

    #[test]
    fn every_job_field_is_present_under_its_proto_name() {
        let j = pb::Job {
            job_id: 42,
            state: pb::JobState::Queued as i32,
            recorded_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(Job::from(&j)).unwrap();
        assert_eq!(v["job_id"], 42);
        assert_eq!(v["state"], "queued");
        assert_eq!(v["recorded_at"], "2023-11-14T22:13:20.005Z");
        assert!(v["updated_at"].is_null());
        assert_eq!(v["labels"], serde_json::json!([]));
        assert_eq!(v.as_object().unwrap().len(), 19, "{v}");
    }
}
