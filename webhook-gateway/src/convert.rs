//! A parsed GitHub delivery (`grs-github`) to the control plane's wire type
//! (`grs-proto`): the one place the two meet, so `grs-github` stays a leaf
//! that only parses GitHub.
//!
//! The wire limits (`grs_proto::MAX_LABELS`, `grs_proto::MAX_FIELD_LEN`) are
//! checked here, before anything is sent: a job asking for more labels than
//! any runner can carry could never be served, and the control plane would
//! refuse it anyway (one round trip saved, and a clearer 400 for GitHub).

use std::time::{SystemTime, UNIX_EPOCH};

use grs_github::webhook::{JobAction, WorkflowJobEvent};
use grs_proto::v1 as pb;
use grs_proto::{MAX_FIELD_LEN, MAX_LABELS};

/// Why a delivery cannot become a wire event. Safe to log: names the field
/// and the limit, never the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireLimit {
    /// More labels than a job event may carry.
    #[error("workflow_job.labels: {0} labels, at most {MAX_LABELS} accepted")]
    TooManyLabels(usize),
    /// A label longer than a field may be.
    #[error("workflow_job.labels: a label of {0} bytes, at most {MAX_FIELD_LEN} accepted")]
    LabelTooLong(usize),
}

/// The wire action of a parsed action.
pub fn action(a: JobAction) -> pb::JobAction {
    match a {
        JobAction::Queued => pb::JobAction::Queued,
        JobAction::Waiting => pb::JobAction::Waiting,
        JobAction::InProgress => pb::JobAction::InProgress,
        JobAction::Completed => pb::JobAction::Completed,
    }
}

/// A protobuf timestamp (`None` for times before the epoch).
pub fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    Some(prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).ok()?,
        nanos: d.subsec_nanos() as i32,
    })
}

/// The control plane's `JobEvent` for `job`, delivered as `delivery_id`.
pub fn job_event(job: &WorkflowJobEvent, delivery_id: &str) -> Result<pb::JobEvent, WireLimit> {
    if job.labels.len() > MAX_LABELS {
        return Err(WireLimit::TooManyLabels(job.labels.len()));
    }
    if let Some(l) = job.labels.iter().find(|l| l.len() > MAX_FIELD_LEN) {
        return Err(WireLimit::LabelTooLong(l.len()));
    }
    Ok(pb::JobEvent {
        delivery_id: delivery_id.to_owned(),
        action: action(job.job_action()) as i32,
        job_id: job.job_id,
        run_id: job.run_id,
        run_attempt: job.run_attempt,
        labels: job.labels.clone(),
        runner_id: job.runner_id.unwrap_or(0),
        runner_name: job.runner_name.clone().unwrap_or_default(),
        repository: job.repository.clone(),
        organization: job.organization.clone().unwrap_or_default(),
        installation_id: job.installation_id.unwrap_or(0),
        created_at: job.created_at.and_then(timestamp),
        started_at: job.started_at.and_then(timestamp),
        completed_at: job.completed_at.and_then(timestamp),
        conclusion: job.conclusion.clone().unwrap_or_default(),
        job_name: job.job_name.clone(),
        workflow_name: job.workflow_name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use grs_github::webhook::{self, BodyEncoding, Delivery};

    fn parsed(body: &str) -> WorkflowJobEvent {
        match webhook::parse("workflow_job", BodyEncoding::Json, body.as_bytes()).unwrap() {
            Delivery::WorkflowJob(j) => *j,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_field_maps_and_absent_runners_are_zero_and_empty() {
        let j = parsed(
            r#"{"action":"waiting","workflow_job":{"id":"12877621891","run_id":4747967848,
            "run_attempt":1,"labels":["self-hosted","k8s"],"runner_id":null,"runner_name":"",
            "created_at":"2023-04-19T21:12:12Z","name":"build","workflow_name":"CI"},
            "repository":{"full_name":"o/r"},"installation":{"id":23154469}}"#,
        );
        let e = job_event(&j, "d-1").unwrap();
        assert_eq!(e.delivery_id, "d-1");
        assert_eq!(e.action, pb::JobAction::Waiting as i32);
        assert_eq!(
            (e.job_id, e.run_id, e.run_attempt),
            (12_877_621_891, 4_747_967_848, 1)
        );
        assert_eq!(e.labels, ["self-hosted", "k8s"]);
        assert_eq!((e.runner_id, e.runner_name.as_str()), (0, ""));
        assert_eq!(
            (e.repository.as_str(), e.organization.as_str()),
            ("o/r", "")
        );
        assert_eq!(e.installation_id, 23_154_469);
        assert_eq!(e.created_at.unwrap().seconds, 1_681_938_732);
        assert!(e.completed_at.is_none());
        assert_eq!(
            (e.job_name.as_str(), e.workflow_name.as_str()),
            ("build", "CI")
        );
    }

    #[test]
    fn the_wire_limits_are_checked_before_sending() {
        let labels =
            |n: usize, len: usize| serde_json::to_string(&vec!["x".repeat(len); n]).unwrap();
        let job = |l: String| {
            parsed(&format!(
                r#"{{"action":"queued","workflow_job":{{"id":1,"labels":{l}}}}}"#
            ))
        };
        assert!(job_event(&job(labels(MAX_LABELS, MAX_FIELD_LEN)), "d").is_ok());
        assert_eq!(
            job_event(&job(labels(MAX_LABELS + 1, 1)), "d"),
            Err(WireLimit::TooManyLabels(MAX_LABELS + 1))
        );
        assert_eq!(
            job_event(&job(labels(1, MAX_FIELD_LEN + 1)), "d"),
            Err(WireLimit::LabelTooLong(MAX_FIELD_LEN + 1))
        );
    }
}
