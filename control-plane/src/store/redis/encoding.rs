//! How records are written in Redis and read back: hash fields of jobs,
//! instances and overrides, event stream fields, reply values.
//!
//! Reading is lenient about what it does not know (extra fields such as
//! `rev` are ignored) and strict about what it does (a field that must be a
//! number and is not makes the record [`StoreError::Corrupt`], naming the
//! key).

use std::collections::HashMap;

use redis::{RedisWrite, ToRedisArgs, Value};

use crate::model::{Event, InstanceRecord, InstanceState, Job, JobState, PoolOverrides};
use crate::store::{StoreError, StoreResult};

pub(super) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// The entries of the first stream in an `XREAD`/`XREADGROUP` reply:
/// `[[key, [[id, [f, v, ...]], ...]]]` (RESP2) or a map (RESP3).
pub(super) fn first_stream_entries(reply: Value) -> Vec<Value> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .next()
            .map(|s| items(s).into_iter().nth(1).map(items).unwrap_or_default()),
        Value::Map(m) => m.into_iter().next().map(|(_, e)| items(e)),
        _ => None,
    }
    .unwrap_or_default()
}

pub(super) fn pairs(fields: &[Value]) -> HashMap<String, String> {
    fields
        .chunks(2)
        .filter_map(|c| Some((as_string(c.first()?)?, as_string(c.get(1)?)?)))
        .collect()
}

pub(super) fn hash_of(v: &Value) -> HashMap<String, String> {
    match v {
        Value::Array(a) => pairs(a),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((as_string(k)?, as_string(v)?)))
            .collect(),
        _ => HashMap::new(),
    }
}

pub(super) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Nil => Vec::new(),
        other => vec![other],
    }
}

pub(super) fn corrupt(key: &str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        message: message.into(),
    }
}

pub(super) fn num<T: std::str::FromStr + Default>(
    h: &HashMap<String, String>,
    field: &str,
    key: &str,
) -> StoreResult<T> {
    match h.get(field) {
        None => Ok(T::default()),
        Some(s) if s.is_empty() => Ok(T::default()),
        Some(s) => s
            .parse()
            .map_err(|_| corrupt(key, format!("field {field} is {s:?}, not a number"))),
    }
}

pub(super) fn text(h: &HashMap<String, String>, field: &str) -> String {
    h.get(field).cloned().unwrap_or_default()
}

pub(super) fn job_from_hash(h: &HashMap<String, String>, key: &str) -> StoreResult<Option<Job>> {
    let Some(state) = h.get("state") else {
        return Ok(None);
    };
    let state = JobState::parse(state)
        .ok_or_else(|| corrupt(key, format!("unknown job state {state:?}")))?;
    let labels: Vec<String> = match h.get("labels") {
        Some(l) if !l.is_empty() => {
            serde_json::from_str(l).map_err(|e| corrupt(key, format!("labels: {e}")))?
        }
        _ => Vec::new(),
    };
    Ok(Some(Job {
        job_id: num(h, "job_id", key)?,
        run_id: num(h, "run_id", key)?,
        run_attempt: num(h, "run_attempt", key)?,
        repository: text(h, "repository"),
        organization: text(h, "organization"),
        installation_id: num(h, "installation_id", key)?,
        labels,
        state,
        pool: text(h, "pool"),
        instance_name: text(h, "instance_name"),
        runner_name: text(h, "runner_name"),
        runner_id: num(h, "runner_id", key)?,
        conclusion: text(h, "conclusion"),
        reason: text(h, "reason"),
        attempts: num(h, "attempts", key)?,
        job_name: text(h, "job_name"),
        workflow_name: text(h, "workflow_name"),
        recorded_at: num(h, "recorded_at", key)?,
        updated_at: num(h, "updated_at", key)?,
    }))
}

pub(super) fn instance_from_hash(
    h: &HashMap<String, String>,
    key: &str,
) -> StoreResult<Option<InstanceRecord>> {
    let Some(state) = h.get("state") else {
        return Ok(None);
    };
    let state = InstanceState::parse(state)
        .ok_or_else(|| corrupt(key, format!("unknown instance state {state:?}")))?;
    Ok(Some(InstanceRecord {
        name: text(h, "name"),
        pool: text(h, "pool"),
        job_id: num(h, "job_id", key)?,
        assigned_job_id: num(h, "assigned_job_id", key)?,
        warm: text(h, "warm") == "1",
        bound_at: num(h, "bound_at", key)?,
        state,
        provider_id: text(h, "provider_id"),
        location: text(h, "location"),
        reason: text(h, "reason"),
        created_at: num(h, "created_at", key)?,
        updated_at: num(h, "updated_at", key)?,
    }))
}

pub(super) fn event_from_fields(f: &HashMap<String, String>) -> Option<Event> {
    let at = f.get("at")?.parse().ok()?;
    let pool = f.get("pool").cloned().unwrap_or_default();
    let reason = f.get("reason").cloned().unwrap_or_default();
    match f.get("kind")?.as_str() {
        "job" => Some(Event::Job {
            at,
            job_id: f.get("id")?.parse().ok()?,
            pool,
            from: f.get("from").and_then(|s| JobState::parse(s)),
            to: JobState::parse(f.get("to")?)?,
            reason,
        }),
        "instance" => Some(Event::Instance {
            at,
            name: f.get("id")?.clone(),
            pool,
            from: f.get("from").and_then(|s| InstanceState::parse(s)),
            to: InstanceState::parse(f.get("to")?)?,
            reason,
        }),
        _ => None,
    }
}

pub(super) fn overrides_from_hash(h: &HashMap<String, String>) -> PoolOverrides {
    PoolOverrides {
        paused: h.get("paused").map(|v| v == "1"),
        min_idle: h.get("min_idle").and_then(|v| v.parse().ok()),
        max_instances: h.get("max_instances").and_then(|v| v.parse().ok()),
    }
}

/// A field value as written, borrowed from its record where it can be (a
/// job is written on every event: no string per field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Val<'a> {
    Str(&'a str),
    Uint(u64),
    Int(i64),
    Owned(String),
}

impl ToRedisArgs for Val<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        match self {
            Val::Str(s) => s.write_redis_args(out),
            Val::Uint(n) => n.write_redis_args(out),
            Val::Int(n) => n.write_redis_args(out),
            Val::Owned(s) => s.write_redis_args(out),
        }
    }
}

/// The hash fields of a job.
pub(super) fn job_fields(j: &Job) -> Vec<(&'static str, Val<'_>)> {
    use Val::{Int, Owned, Str, Uint};
    vec![
        ("job_id", Uint(j.job_id)),
        ("run_id", Uint(j.run_id)),
        ("run_attempt", Uint(j.run_attempt.into())),
        ("repository", Str(&j.repository)),
        ("organization", Str(&j.organization)),
        ("installation_id", Uint(j.installation_id)),
        (
            "labels",
            Owned(serde_json::to_string(&j.labels).unwrap_or_else(|_| "[]".into())),
        ),
        ("state", Str(j.state.as_str())),
        ("pool", Str(&j.pool)),
        ("instance_name", Str(&j.instance_name)),
        ("runner_name", Str(&j.runner_name)),
        ("runner_id", Uint(j.runner_id)),
        ("conclusion", Str(&j.conclusion)),
        ("reason", Str(&j.reason)),
        ("attempts", Uint(j.attempts.into())),
        ("job_name", Str(&j.job_name)),
        ("workflow_name", Str(&j.workflow_name)),
        ("recorded_at", Int(j.recorded_at)),
        ("updated_at", Int(j.updated_at)),
    ]
}

/// The hash fields of an instance (its token is written apart).
pub(super) fn instance_fields(i: &InstanceRecord) -> Vec<(&'static str, String)> {
    vec![
        ("name", i.name.clone()),
        ("pool", i.pool.clone()),
        ("job_id", i.job_id.to_string()),
        ("assigned_job_id", i.assigned_job_id.to_string()),
        ("warm", if i.warm { "1" } else { "0" }.into()),
        ("bound_at", i.bound_at.to_string()),
        ("state", i.state.as_str().into()),
        ("provider_id", i.provider_id.clone()),
        ("location", i.location.clone()),
        ("reason", i.reason.clone()),
        ("created_at", i.created_at.to_string()),
        ("updated_at", i.updated_at.to_string()),
    ]
}

/// The fields of `after` that differ from `before`.
pub(super) fn changed<V: PartialEq>(
    before: Vec<(&'static str, V)>,
    after: Vec<(&'static str, V)>,
) -> Vec<(&'static str, V)> {
    after
        .into_iter()
        .zip(before)
        .filter(|((_, a), (_, b))| a != b)
        .map(|(a, _)| a)
        .collect()
}

pub(super) fn event_fields(e: &Event) -> Vec<(&'static str, Val<'_>)> {
    use Val::{Int, Str, Uint};
    match e {
        Event::Job {
            at,
            job_id,
            pool,
            from,
            to,
            reason,
        } => vec![
            ("kind", Str("job")),
            ("at", Int(*at)),
            ("id", Uint(*job_id)),
            ("pool", Str(pool)),
            ("from", Str(from.map(|s| s.as_str()).unwrap_or_default())),
            ("to", Str(to.as_str())),
            ("reason", Str(reason)),
        ],
        Event::Instance {
            at,
            name,
            pool,
            from,
            to,
            reason,
        } => vec![
            ("kind", Str("instance")),
            ("at", Int(*at)),
            ("id", Str(name)),
            ("pool", Str(pool)),
            ("from", Str(from.map(|s| s.as_str()).unwrap_or_default())),
            ("to", Str(to.as_str())),
            ("reason", Str(reason)),
        ],
    }
}
