//! One function per subcommand: call the API, print the answer as a table or
//! as JSON (see [`view`](crate::view) for the JSON contract).

use std::future::Future;
use std::io::Write;
use std::time::SystemTime;

use futures::StreamExt;
use grs_proto::v1 as pb;
use serde::Serialize;

use crate::args::{
    EventsArgs, InstancesCommand, JobsCommand, ListJobsArgs, OutputFormat, PoolsCommand,
};
use crate::client::Connection;
use crate::error::{CliError, Subject};
use crate::table::{Table, ago, details, id_or_dash, or_dash, when};
use crate::view::{self, instance_state, job_state};

/// Writes one JSON document (pretty, newline-terminated).
fn json(out: &mut impl Write, value: &impl Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn pool_subject(pool: &str) -> Option<Subject> {
    (!pool.is_empty()).then(|| Subject::Pool(pool.to_owned()))
}

/// `grs jobs ...`
pub(crate) async fn jobs(
    conn: &Connection,
    cmd: JobsCommand,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match cmd {
        JobsCommand::List(args) => list_jobs(conn, args, format, out).await,
        JobsCommand::Get { id } => {
            let job = conn
                .call(Some(Subject::Job(id)), |mut api| async move {
                    api.get_job(pb::GetJobRequest { job_id: id }).await
                })
                .await?;
            match format {
                OutputFormat::Json => json(out, &view::Job::from(&job)),
                OutputFormat::Table => Ok(job_details(&job, out)?),
            }
        }
    }
}

async fn list_jobs(
    conn: &Connection,
    args: ListJobsArgs,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let pool = args.pool.unwrap_or_default();
    let mut req = pb::ListJobsRequest {
        pool: pool.clone(),
        state: args
            .state
            .map_or(pb::JobState::Unspecified, |s| s.to_proto()) as i32,
        page_size: args.limit.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
    };
    let mut jobs = Vec::new();
    let next = loop {
        let r = req.clone();
        let page = conn
            .call(pool_subject(&pool), |mut api| async move {
                api.list_jobs(r).await
            })
            .await?;
        jobs.extend(page.jobs);
        if !args.all || page.next_page_token.is_empty() {
            break page.next_page_token;
        }
        req.page_token = page.next_page_token;
    };
    match format {
        OutputFormat::Json => json(out, &view::ListJobs::new(&jobs, &next)),
        OutputFormat::Table => {
            let now = SystemTime::now();
            let mut t = Table::new(&[
                "ID",
                "STATE",
                "POOL",
                "REPOSITORY",
                "NAME",
                "INSTANCE",
                "RECORDED",
                "UPDATED",
                "REASON",
            ]);
            for j in &jobs {
                t.row(vec![
                    j.job_id.to_string(),
                    job_state(j.state),
                    or_dash(&j.pool),
                    or_dash(&j.repository),
                    or_dash(&job_title(j)),
                    or_dash(&j.instance_name),
                    ago(j.recorded_at.as_ref(), now),
                    ago(j.updated_at.as_ref(), now),
                    or_dash(&j.reason),
                ]);
            }
            t.write(out)?;
            if !next.is_empty() {
                // On stderr, so the table stays parseable by line.
                eprintln!("grs: more jobs: pass --all, or --page-token {next} for the next page");
            }
            Ok(())
        }
    }
}

/// "workflow / job" as far as known.
fn job_title(j: &pb::Job) -> String {
    match (j.workflow_name.is_empty(), j.job_name.is_empty()) {
        (false, false) => format!("{} / {}", j.workflow_name, j.job_name),
        (true, false) => j.job_name.clone(),
        (false, true) => j.workflow_name.clone(),
        (true, true) => String::new(),
    }
}

fn job_details(j: &pb::Job, out: &mut impl Write) -> std::io::Result<()> {
    let now = SystemTime::now();
    let run = if j.run_attempt > 1 {
        format!("{} (attempt {})", id_or_dash(j.run_id), j.run_attempt)
    } else {
        id_or_dash(j.run_id)
    };
    details(
        out,
        &[
            ("Job", j.job_id.to_string()),
            ("State", job_state(j.state)),
            ("Pool", or_dash(&j.pool)),
            ("Repository", or_dash(&j.repository)),
            ("Organization", or_dash(&j.organization)),
            ("Workflow", or_dash(&j.workflow_name)),
            ("Name", or_dash(&j.job_name)),
            ("Run", run),
            ("Labels", or_dash(&j.labels.join(", "))),
            ("Instance", or_dash(&j.instance_name)),
            ("Runner", or_dash(&j.runner_name)),
            ("Runner id", id_or_dash(j.runner_id)),
            ("Conclusion", or_dash(&j.conclusion)),
            ("Attempts", j.attempts.to_string()),
            ("Reason", or_dash(&j.reason)),
            ("Installation", id_or_dash(j.installation_id)),
            ("Recorded", when(j.recorded_at.as_ref(), now)),
            ("Updated", when(j.updated_at.as_ref(), now)),
        ],
    )
}

/// `grs instances ...`
pub(crate) async fn instances(
    conn: &Connection,
    cmd: InstancesCommand,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match cmd {
        InstancesCommand::List {
            pool,
            include_deleted,
        } => {
            let pool = pool.unwrap_or_default();
            let req = pb::ListInstancesRequest {
                pool: pool.clone(),
                include_deleted,
            };
            let r = conn
                .call(pool_subject(&pool), |mut api| async move {
                    api.list_instances(req).await
                })
                .await?;
            match format {
                OutputFormat::Json => json(out, &view::ListInstances::from(&r)),
                OutputFormat::Table => {
                    let now = SystemTime::now();
                    let mut t = Table::new(&[
                        "NAME",
                        "STATE",
                        "POOL",
                        "JOB",
                        "RUNNING JOB",
                        "LOCATION",
                        "CREATED",
                        "UPDATED",
                        "REASON",
                    ]);
                    for i in &r.instances {
                        t.row(vec![
                            i.name.clone(),
                            instance_state(i.state),
                            or_dash(&i.pool),
                            id_or_dash(i.job_id),
                            id_or_dash(i.assigned_job_id),
                            or_dash(&i.location),
                            ago(i.created_at.as_ref(), now),
                            ago(i.updated_at.as_ref(), now),
                            or_dash(&i.reason),
                        ]);
                    }
                    Ok(t.write(out)?)
                }
            }
        }
        InstancesCommand::Get { name } => {
            let subject = Subject::Instance(name.clone());
            let i = conn
                .call(Some(subject), |mut api| async move {
                    api.get_instance(pb::GetInstanceRequest { name }).await
                })
                .await?;
            match format {
                OutputFormat::Json => json(out, &view::Instance::from(&i)),
                OutputFormat::Table => Ok(instance_details(&i, out)?),
            }
        }
        InstancesCommand::Delete { name } => {
            let subject = Subject::Instance(name.clone());
            let req = pb::DeleteInstanceRequest { name: name.clone() };
            let r = conn
                .call(Some(subject), |mut api| async move {
                    api.delete_instance(req).await
                })
                .await?;
            match format {
                OutputFormat::Json => json(out, &view::DeleteInstance::from(&r)),
                OutputFormat::Table => {
                    let state = r.instance.as_ref().map(|i| i.state);
                    if state == Some(pb::InstanceState::Deleted as i32) {
                        writeln!(out, "instance {name:?} is already deleted")?;
                    } else {
                        let state = state.map_or_else(|| "unknown".into(), instance_state);
                        writeln!(
                            out,
                            "instance {name:?} queued for teardown (state: {state})"
                        )?;
                    }
                    Ok(())
                }
            }
        }
    }
}

fn instance_details(i: &pb::Instance, out: &mut impl Write) -> std::io::Result<()> {
    let now = SystemTime::now();
    details(
        out,
        &[
            ("Instance", i.name.clone()),
            ("State", instance_state(i.state)),
            ("Pool", or_dash(&i.pool)),
            ("Job", id_or_dash(i.job_id)),
            ("Running job", id_or_dash(i.assigned_job_id)),
            ("Provider id", or_dash(&i.provider_id)),
            ("Location", or_dash(&i.location)),
            ("Reason", or_dash(&i.reason)),
            ("Created", when(i.created_at.as_ref(), now)),
            ("Updated", when(i.updated_at.as_ref(), now)),
        ],
    )
}

/// `grs pools ...`
pub(crate) async fn pools(
    conn: &Connection,
    cmd: PoolsCommand,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let (name, update, done) = match cmd {
        PoolsCommand::List => {
            let r = conn
                .call(None, |mut api| async move {
                    api.list_pools(pb::ListPoolsRequest {}).await
                })
                .await?;
            return match format {
                OutputFormat::Json => json(out, &view::ListPools::from(&r)),
                OutputFormat::Table => {
                    let mut t = Table::new(&[
                        "NAME",
                        "STATUS",
                        "IN USE",
                        "MIN IDLE",
                        "QUEUED",
                        "PROVISIONER",
                        "LABELS",
                    ]);
                    for p in &r.pools {
                        t.row(vec![
                            p.name.clone(),
                            pool_status(p).into(),
                            format!("{}/{}", p.instances_in_use, p.max_instances),
                            p.min_idle.to_string(),
                            p.jobs_queued.to_string(),
                            or_dash(&p.provisioner),
                            or_dash(&p.labels.join(",")),
                        ]);
                    }
                    Ok(t.write(out)?)
                }
            };
        }
        PoolsCommand::Get { name } => {
            let subject = Subject::Pool(name.clone());
            let p = conn
                .call(Some(subject), |mut api| async move {
                    api.get_pool(pb::GetPoolRequest { name }).await
                })
                .await?;
            return match format {
                OutputFormat::Json => json(out, &view::Pool::from(&p)),
                OutputFormat::Table => Ok(pool_details(&p, out)?),
            };
        }
        PoolsCommand::Pause { name } => (
            name.clone(),
            pb::UpdatePoolRequest {
                name,
                paused: Some(true),
                ..Default::default()
            },
            "paused: jobs still queue, no instance starts until it is resumed",
        ),
        PoolsCommand::Resume { name } => (
            name.clone(),
            pb::UpdatePoolRequest {
                name,
                paused: Some(false),
                ..Default::default()
            },
            "resumed",
        ),
        PoolsCommand::Set {
            name,
            min_idle,
            max_instances,
        } => (
            name.clone(),
            pb::UpdatePoolRequest {
                name,
                min_idle,
                max_instances,
                ..Default::default()
            },
            "updated",
        ),
    };
    let p = conn
        .call(Some(Subject::Pool(name.clone())), |mut api| async move {
            api.update_pool(update).await
        })
        .await?;
    match format {
        OutputFormat::Json => json(out, &view::Pool::from(&p)),
        OutputFormat::Table => {
            writeln!(out, "pool {name:?} {done}")?;
            Ok(pool_details(&p, out)?)
        }
    }
}

fn pool_status(p: &pb::Pool) -> &'static str {
    if p.paused { "paused" } else { "active" }
}

fn pool_details(p: &pb::Pool, out: &mut impl Write) -> std::io::Result<()> {
    details(
        out,
        &[
            ("Pool", p.name.clone()),
            ("Status", pool_status(p).into()),
            ("Labels", or_dash(&p.labels.join(", "))),
            ("Provisioner", or_dash(&p.provisioner)),
            (
                "In use",
                format!("{} of {}", p.instances_in_use, p.max_instances),
            ),
            ("Min idle", p.min_idle.to_string()),
            ("Jobs queued", p.jobs_queued.to_string()),
        ],
    )
}

/// `grs stats`
pub(crate) async fn stats(
    conn: &Connection,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let s = conn
        .call(None, |mut api| async move {
            api.get_stats(pb::GetStatsRequest {}).await
        })
        .await?;
    match format {
        OutputFormat::Json => json(out, &view::Stats::from(&s)),
        OutputFormat::Table => {
            let mut q = Table::new(&["QUEUE", "DEPTH", "IN WORK"]);
            q.row(vec![
                "provision".into(),
                s.provision_queue_depth.to_string(),
                s.provision_queue_pending.to_string(),
            ]);
            q.row(vec![
                "teardown".into(),
                s.teardown_queue_depth.to_string(),
                s.teardown_queue_pending.to_string(),
            ]);
            q.write(out)?;
            writeln!(out)?;
            let mut p = Table::new(&["POOL", "IN USE", "MAX", "QUEUED"]);
            for u in &s.pools {
                p.row(vec![
                    u.pool.clone(),
                    u.instances_in_use.to_string(),
                    u.max_instances.to_string(),
                    u.jobs_queued.to_string(),
                ]);
            }
            Ok(p.write(out)?)
        }
    }
}

/// `grs events`: prints transitions as they arrive, one line each, flushed
/// at once, until `shutdown` completes (Ctrl-C: success) or the server ends
/// the stream (exit 69: watch again to resume; events meanwhile are missed).
pub(crate) async fn events(
    conn: &Connection,
    args: EventsArgs,
    format: OutputFormat,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let pool = args.pool.unwrap_or_default();
    let req = pb::WatchEventsRequest { pool: pool.clone() };
    // The timeout covers the start of the stream, not its length.
    let mut stream = conn
        .call(pool_subject(&pool), |mut api| async move {
            api.watch_events(req).await
        })
        .await?;
    tokio::pin!(shutdown);
    loop {
        let next = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(e)) => e,
            Some(Err(status)) => return Err(conn.error(&status, None)),
            None => {
                return Err(CliError::Unavailable(format!(
                    "the control plane at {} ended the event stream",
                    conn.server()
                )));
            }
        };
        match format {
            OutputFormat::Json => {
                serde_json::to_writer(&mut *out, &view::Event::from(&event))
                    .map_err(std::io::Error::from)?;
                writeln!(out)?;
            }
            OutputFormat::Table => writeln!(out, "{}", event_line(&event))?,
        }
        out.flush()?;
    }
}

/// One event as a line:
/// `2026-11-27T21:09:38Z job 4711 (linux): queued → provisioning`.
pub(crate) fn event_line(e: &pb::Event) -> String {
    use pb::event::Kind;
    let at = view::system_time(e.at.as_ref())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into());
    let from = |s: String| if s == "unspecified" { "new".into() } else { s };
    let (what, pool, from, to, reason) = match &e.kind {
        Some(Kind::Job(j)) => (
            format!("job {}", j.job_id),
            &j.pool,
            from(job_state(j.from)),
            job_state(j.to),
            &j.reason,
        ),
        Some(Kind::Instance(i)) => (
            format!("instance {}", i.name),
            &i.pool,
            from(instance_state(i.from)),
            instance_state(i.to),
            &i.reason,
        ),
        None => return format!("{at} (an event of a kind this grs does not know)"),
    };
    let pool = if pool.is_empty() { "no pool" } else { pool };
    let mut line = format!("{at} {what} ({pool}): {from} → {to}");
    if !reason.is_empty() {
        line.push_str(" — ");
        line.push_str(reason);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_line_says_what_moved_from_where_to_where_and_why() {
        let e = pb::Event {
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            kind: Some(pb::event::Kind::Instance(pb::InstanceTransition {
                name: "grs-7".into(),
                pool: "linux".into(),
                from: pb::InstanceState::Running as i32,
                to: pb::InstanceState::PendingDelete as i32,
                reason: "deleted by an operator".into(),
            })),
        };
        assert_eq!(
            event_line(&e),
            "2023-11-14T22:13:20Z instance grs-7 (linux): running → pending_delete — deleted by an operator"
        );
        let e = pb::Event {
            at: None,
            kind: Some(pb::event::Kind::Job(pb::JobTransition {
                job_id: 9,
                pool: String::new(),
                from: 0,
                to: pb::JobState::Unrouted as i32,
                reason: String::new(),
            })),
        };
        assert_eq!(event_line(&e), "- job 9 (no pool): new → unrouted");
    }
}
