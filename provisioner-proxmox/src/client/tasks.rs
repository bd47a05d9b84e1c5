//! Waiting for PVE tasks (UPIDs).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;

use super::{Idempotency, Param, PveClient, Upid};
use crate::error::PveError;

/// Status of a task.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskStatus {
    /// `running` or `stopped`.
    pub status: String,
    /// Once stopped: `OK`, `WARNINGS: N`, or the error text.
    #[serde(default)]
    pub exitstatus: Option<String>,
}

/// The learned duration of a task type.
#[derive(Debug, Clone, Copy)]
pub(super) struct Estimate {
    /// When to poll first.
    duration: Duration,
    /// First polls in a row that found the task done.
    hits: u32,
}

impl PveClient {
    /// Waits for a task to end; `Ok` for `OK` and `WARNINGS: N`, otherwise
    /// [`PveError::Task`] with the end of the task log.
    ///
    /// Polling adapts: the first poll comes when tasks of this type usually
    /// end (learned per type, see `learn`; 1 s for a type not seen yet),
    /// later ones back off from `task_poll_min` by x1.5 to `task_poll_max`.
    /// A UPID PVE does not know yet is polled again.
    pub async fn wait_task(&self, upid: &Upid) -> Result<(), PveError> {
        let started = Instant::now();
        let deadline = started + self.task_timeout;
        let estimate = self
            .estimates
            .lock()
            .unwrap()
            .get(&upid.kind)
            .map(|e| e.duration);
        // A task type never seen: first look after the 1 s most PVE clients
        // poll at (or `task_poll_max`, if shorter); then learn.
        let mut delay = estimate
            .unwrap_or(Duration::from_secs(1).min(self.poll_max))
            .clamp(self.poll_min, Duration::from_secs(30));
        let mut step = self.poll_min;
        let mut last_running = Duration::ZERO;
        let mut polls = 0u32;
        let path = format!("/nodes/{}/tasks/{}/status", upid.node, upid.raw);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(PveError::TaskTimeout {
                    upid: upid.raw.clone(),
                    after: self.task_timeout,
                });
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            polls += 1;
            let st = match self
                .call(Method::GET, &path, &[], Idempotency::Idempotent)
                .await
            {
                Ok(v) => serde_json::from_value::<TaskStatus>(v).map_err(|e| PveError::Decode {
                    path: path.clone(),
                    detail: e.to_string(),
                })?,
                // PVE may not know a UPID for a moment after handing it out.
                Err(e) if polls <= 5 && task_not_visible(&e) => {
                    delay = step;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if st.status != "stopped" {
                last_running = started.elapsed();
                delay = step;
                step = (step.mul_f32(1.5)).min(self.poll_max);
                continue;
            }
            self.learn(&upid.kind, polls, last_running, started.elapsed());
            let exit = st.exitstatus.unwrap_or_default();
            if exit == "OK" || exit.starts_with("WARNINGS") {
                return Ok(());
            }
            let log = self.task_log_tail(upid, 20).await.unwrap_or_default();
            return Err(PveError::Task {
                upid: upid.raw.clone(),
                exitstatus: exit,
                log,
            });
        }
    }

    /// Updates the duration estimate of a task type.
    ///
    /// A task seen running and then done brackets its duration: the
    /// estimate becomes the middle of that bracket (plus `task_poll_min`, to err
    /// late rather than early). A task done by the first poll only proves
    /// the estimate was long enough: it shrinks, the faster the more first
    /// polls in a row hit (0.98, 0.96, 0.92, ... down to x0.27), so an
    /// estimate far too long converges in a few tasks while a good one
    /// costs a miss only now and then.
    fn learn(&self, kind: &str, polls: u32, last_running: Duration, done_by: Duration) {
        let mut all = self.estimates.lock().unwrap();
        let bracket = (last_running + done_by) / 2 + self.poll_min;
        let next = match all.get(kind) {
            Some(e) if polls == 1 => Estimate {
                duration: e.duration.mul_f64(0.98f64.powi(1 << e.hits.min(3))),
                hits: e.hits + 1,
            },
            // First of its kind and done by the first poll: it took at most
            // that long.
            None if polls == 1 => Estimate {
                duration: done_by.mul_f64(0.9),
                hits: 1,
            },
            _ => Estimate {
                duration: bracket,
                hits: 0,
            },
        };
        all.insert(kind.to_owned(), next);
    }

    /// The last `n` lines of a task's log.
    pub async fn task_log_tail(&self, upid: &Upid, n: usize) -> Result<Vec<String>, PveError> {
        let path = format!("/nodes/{}/tasks/{}/log", upid.node, upid.raw);
        let v = self
            .call(
                Method::GET,
                &path,
                &[Param::new("start", 0), Param::new("limit", 1000)],
                Idempotency::Idempotent,
            )
            .await?;
        let mut lines: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.get("t").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if lines.len() > n {
            lines.drain(..lines.len() - n);
        }
        Ok(lines)
    }

    pub(super) fn upid_from(path: &str, v: Value) -> Result<Upid, PveError> {
        v.as_str()
            .and_then(Upid::parse)
            .ok_or_else(|| PveError::Decode {
                path: path.into(),
                detail: format!("expected a UPID, got {v}"),
            })
    }
}

fn task_not_visible(e: &PveError) -> bool {
    matches!(
        e,
        PveError::Api {
            status: 400 | 500,
            ..
        }
    ) && (e.pve_text().contains("unable to parse worker upid")
        || e.pve_text().contains("no such task"))
}
