//! Typed, lenient parsing of the webhook deliveries GRS acts on.
//!
//! GitHub sends `application/json` bodies or `application/x-www-form-urlencoded`
//! ones (`payload=<urlencoded JSON>`); both parse here. Only `workflow_job`
//! (actions `queued`, `waiting`, `in_progress`, `completed`) and `ping` mean
//! anything to GRS; every other event, and unknown `workflow_job` actions,
//! parse to [`Delivery::Ignored`] so the gateway can answer 204.
//!
//! Leniency, on purpose (payloads from 2021 lack `run_attempt` and every
//! `runner_*` key; check-run completions carry `labels: []`): only
//! `action` and `workflow_job.id` are required. For the runner, `null`, `0`,
//! `""` and a missing key all mean "no runner". Ids are 64-bit and accepted
//! as JSON numbers or decimal strings. Timestamps that do not parse are
//! dropped rather than failing the delivery: they are for display only.
//!
//! Limits: none here beyond what the JSON parser needs. The wire limits
//! (labels per job, field lengths) are the control plane's and are checked
//! where a delivery becomes a wire event, in the gateway; this crate only
//! parses GitHub and knows nothing of GRS's wire types.

use std::time::SystemTime;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// One parsed webhook delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// `ping`: GitHub checking the hook after it was created.
    Ping(Ping),
    /// `workflow_job` with an action GRS acts on.
    WorkflowJob(Box<WorkflowJobEvent>),
    /// Any other event or action; `reason` says which, for the log.
    Ignored {
        /// `event` or `event.action`.
        reason: String,
    },
}

/// The parts of a `ping` worth logging.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ping {
    /// `hook_id`.
    pub hook_id: u64,
    /// `zen`: GitHub's zen line of the day.
    pub zen: String,
}

/// The `action` of a `workflow_job` delivery GRS acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Waiting for a runner.
    Queued,
    /// Waiting on a deployment protection rule.
    Waiting,
    /// A runner took the job.
    InProgress,
    /// The job ended, whatever the conclusion.
    Completed,
}

impl JobAction {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "waiting" => Self::Waiting,
            "in_progress" => Self::InProgress,
            "completed" => Self::Completed,
            _ => return None,
        })
    }

    /// The wire name (`in_progress`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Waiting => "waiting",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
        }
    }
}

/// A `workflow_job` delivery, reduced to what GRS uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkflowJobEvent {
    /// What happened to the job.
    pub action: Option<JobAction>,
    /// `workflow_job.id`: non-zero, above 2^31 in practice.
    pub job_id: u64,
    /// `workflow_job.run_id`, 0 if absent.
    pub run_id: u64,
    /// `workflow_job.run_attempt`, 0 if absent (older payloads).
    pub run_attempt: u32,
    /// `workflow_job.labels`, as sent.
    pub labels: Vec<String>,
    /// The runner that took the job; `None` for null, 0 or missing.
    pub runner_id: Option<u64>,
    /// The runner's name; `None` for null, "" or missing.
    pub runner_name: Option<String>,
    /// `repository.full_name`.
    pub repository: String,
    /// `organization.login`, `None` for user repositories.
    pub organization: Option<String>,
    /// `installation.id` (GitHub App deliveries only).
    pub installation_id: Option<u64>,
    /// `workflow_job.created_at`.
    pub created_at: Option<SystemTime>,
    /// `workflow_job.started_at`.
    pub started_at: Option<SystemTime>,
    /// `workflow_job.completed_at`.
    pub completed_at: Option<SystemTime>,
    /// `workflow_job.conclusion`, once completed.
    pub conclusion: Option<String>,
    /// `workflow_job.name`.
    pub job_name: String,
    /// `workflow_job.workflow_name` (absent in older payloads).
    pub workflow_name: String,
}

impl WorkflowJobEvent {
    /// The action (always set for an event [`parse`] returned).
    pub fn job_action(&self) -> JobAction {
        self.action.unwrap_or(JobAction::Queued)
    }
}

/// Why a delivery body could not be used. Safe to log: never contains the
/// body itself, only what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The content type is neither JSON nor form-encoded.
    #[error(
        "unsupported content type {0:?} (want application/json or application/x-www-form-urlencoded)"
    )]
    ContentType(String),
    /// A form-encoded body without a `payload` field.
    #[error("form-encoded body has no `payload` field")]
    MissingFormPayload,
    /// Not JSON, truncated, or the wrong shape.
    #[error("invalid payload: {0}")]
    Invalid(String),
    /// A required key is missing or null.
    #[error("payload has no `{0}`")]
    Missing(&'static str),
}

/// How the body is encoded, from the `Content-Type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    /// `application/json` (GitHub's default).
    Json,
    /// `application/x-www-form-urlencoded`: `payload=<urlencoded JSON>`.
    Form,
}

impl BodyEncoding {
    /// The encoding a `Content-Type` value names. A missing header is taken
    /// as JSON (GitHub always sends one; curl users often do not).
    pub fn from_content_type(ct: Option<&str>) -> Result<Self, PayloadError> {
        let Some(ct) = ct else { return Ok(Self::Json) };
        let mime = ct.split(';').next().unwrap_or("").trim();
        if mime.eq_ignore_ascii_case("application/json") {
            Ok(Self::Json)
        } else if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            Ok(Self::Form)
        } else {
            Err(PayloadError::ContentType(truncate(ct, 64)))
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Parses one delivery: `event` is the `X-GitHub-Event` header.
pub fn parse(event: &str, encoding: BodyEncoding, body: &[u8]) -> Result<Delivery, PayloadError> {
    if event != "workflow_job" && event != "ping" {
        // Not parsed at all: GRS has no use for it, and a malformed body of
        // an event we ignore is not our problem.
        return Ok(Delivery::Ignored {
            reason: format!("event {}", truncate(event, 64)),
        });
    }
    let json: std::borrow::Cow<'_, [u8]> = match encoding {
        BodyEncoding::Json => body.into(),
        BodyEncoding::Form => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
                .map_err(|e| PayloadError::Invalid(format!("form body: {e}")))?;
            let payload = pairs
                .into_iter()
                .find(|(k, _)| k == "payload")
                .ok_or(PayloadError::MissingFormPayload)?
                .1;
            payload.into_bytes().into()
        }
    };
    if event == "ping" {
        let p: RawPing = serde_json::from_slice(&json).map_err(invalid)?;
        return Ok(Delivery::Ping(Ping {
            hook_id: p.hook_id.unwrap_or(0),
            zen: p.zen.unwrap_or_default(),
        }));
    }
    let raw: RawWorkflowJobDelivery = serde_json::from_slice(&json).map_err(invalid)?;
    let action_str = raw.action.ok_or(PayloadError::Missing("action"))?;
    let Some(action) = JobAction::parse(&action_str) else {
        return Ok(Delivery::Ignored {
            reason: format!("workflow_job.{}", truncate(&action_str, 64)),
        });
    };
    let job = raw
        .workflow_job
        .ok_or(PayloadError::Missing("workflow_job"))?;
    let job_id = job
        .id
        .filter(|id| *id != 0)
        .ok_or(PayloadError::Missing("workflow_job.id"))?;
    let labels = job.labels.unwrap_or_default();
    Ok(Delivery::WorkflowJob(Box::new(WorkflowJobEvent {
        action: Some(action),
        job_id,
        run_id: job.run_id.unwrap_or(0),
        run_attempt: job
            .run_attempt
            .map(|a| u32::try_from(a).unwrap_or(u32::MAX))
            .unwrap_or(0),
        labels,
        runner_id: job.runner_id.filter(|id| *id != 0),
        runner_name: job.runner_name.filter(|n| !n.is_empty()),
        repository: raw.repository.and_then(|r| r.full_name).unwrap_or_default(),
        organization: raw
            .organization
            .and_then(|o| o.login)
            .filter(|l| !l.is_empty()),
        installation_id: raw.installation.and_then(|i| i.id).filter(|id| *id != 0),
        created_at: job.created_at.as_deref().and_then(parse_timestamp),
        started_at: job.started_at.as_deref().and_then(parse_timestamp),
        completed_at: job.completed_at.as_deref().and_then(parse_timestamp),
        conclusion: job.conclusion.filter(|c| !c.is_empty()),
        job_name: job.name.unwrap_or_default(),
        workflow_name: job.workflow_name.unwrap_or_default(),
    })))
}

fn invalid(e: serde_json::Error) -> PayloadError {
    // serde_json's message names the line and column and what was expected,
    // never the content.
    PayloadError::Invalid(e.to_string())
}

/// RFC 3339 (`2023-04-19T21:12:12Z`, `2023-04-19T23:12:12+02:00`,
/// fractional seconds allowed) to a time.
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

// The raw shapes: every field optional, unknown keys ignored.

#[derive(Deserialize)]
struct RawPing {
    #[serde(default, deserialize_with = "lenient_u64")]
    hook_id: Option<u64>,
    #[serde(default)]
    zen: Option<String>,
}

#[derive(Deserialize)]
struct RawWorkflowJobDelivery {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    workflow_job: Option<RawWorkflowJob>,
    #[serde(default)]
    repository: Option<RawRepository>,
    #[serde(default)]
    organization: Option<RawOrganization>,
    #[serde(default)]
    installation: Option<RawInstallation>,
}

#[derive(Deserialize)]
struct RawWorkflowJob {
    #[serde(default, deserialize_with = "lenient_u64")]
    id: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    run_id: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    run_attempt: Option<u64>,
    #[serde(default, deserialize_with = "lenient_labels")]
    labels: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_u64")]
    runner_id: Option<u64>,
    #[serde(default)]
    runner_name: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    started_at: Option<String>,
    #[serde(default)]
    completed_at: Option<String>,
    #[serde(default)]
    conclusion: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    workflow_name: Option<String>,
}

#[derive(Deserialize)]
struct RawRepository {
    #[serde(default)]
    full_name: Option<String>,
}

#[derive(Deserialize)]
struct RawOrganization {
    #[serde(default)]
    login: Option<String>,
}

#[derive(Deserialize)]
struct RawInstallation {
    #[serde(default, deserialize_with = "lenient_u64")]
    id: Option<u64>,
}

/// A 64-bit id as a JSON number, a decimal string, or null. Negative and
/// fractional numbers are errors: no GitHub id is either.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        U(u64),
        S(String),
    }
    match Option::<N>::deserialize(d)? {
        None => Ok(None),
        Some(N::U(n)) => Ok(Some(n)),
        Some(N::S(s)) if s.is_empty() => Ok(None),
        Some(N::S(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| de::Error::custom("expected a non-negative integer id")),
    }
}

/// Labels as an array of strings; null means none.
fn lenient_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Option::<Vec<String>>::deserialize(d)
}
