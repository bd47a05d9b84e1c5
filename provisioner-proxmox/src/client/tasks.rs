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

/// What the client knows of how long a class of task takes (see
/// [`task_class`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Estimate {
    /// When to poll first, counted from the wait's start: the latest end
    /// recently seen, so one poll usually finds the task done.
    first_poll: Duration,
    /// First polls in a row that found the task done.
    hits: u32,
    /// Probes downwards since the last miss: each one twice as deep, so an
    /// estimate far too long (a `task_expected` above this cluster's
    /// durations) comes down in a few dozen tasks.
    probes: u32,
    /// When this class's estimate was last shortened, while no task of the
    /// class has ended since to say whether the probe hit: a probe in
    /// flight.
    probing_since: Option<Instant>,
}

/// A probe in flight older than this no longer holds the other classes
/// back (its class may not run again: a template no longer used).
const PROBE_STALE: Duration = Duration::from_secs(60);

/// First polls in a row that must find the task done before the estimate
/// is probed downwards (by [`SHRINK`]). Fewer: a late estimate is corrected
/// sooner (less latency) at the price of more misses (more calls).
const HITS_BEFORE_SHRINK: u32 = 6;
/// How much the first probe shortens the estimate (then 4 %, 8 %, 15 %,
/// 28 % while they keep hitting).
const SHRINK: f64 = 0.98;

/// The class a task's duration is learned under: its type, and for clones
/// the source too (clones of different templates and storages take
/// different times). `UPID:node:pid:pstart:start:qmclone:<source>:user:`.
fn task_class(upid: &Upid) -> String {
    match upid.kind.as_str() {
        "qmclone" => {
            let source = upid.raw.split(':').nth(6).unwrap_or("");
            format!("qmclone:{source}")
        }
        k => k.to_owned(),
    }
}

impl PveClient {
    /// Waits for a task to end; `Ok` for `OK` and `WARNINGS: N`, otherwise
    /// [`PveError::Task`] with the end of the task log.
    ///
    /// # Latency against calls
    /// A status poll (`GET /nodes/{node}/tasks/{upid}/status`) is cheap, but
    /// PVE has no long-poll, so every poll is a call. The first poll comes
    /// when tasks of this class recently ended (learned, see `learn`; before
    /// the first one, `task_expected`, else 1 s): one call per task when the
    /// estimate holds. A task still running then is polled every
    /// `task_poll_min`, growing by x1.5 up to `task_poll_max`: a task just
    /// over its estimate is seen within `task_poll_min`, a task far over it
    /// costs a poll per doubling of the overrun. The estimate follows the
    /// upper edge of recent durations (a miss raises it to when the task was
    /// seen done; six hits in a row lower it by 2 %, the next six by 4 %, ...), so GRS's latency is at
    /// most the spread of a class's durations plus `task_poll_min`, at
    /// about one call per task.
    ///
    /// A UPID PVE does not know yet is polled again.
    pub async fn wait_task(&self, upid: &Upid) -> Result<(), PveError> {
        let started = Instant::now();
        let deadline = started + self.task_timeout;
        let class = task_class(upid);
        let known = self.estimates.lock().unwrap().get(&class).copied();
        let first = match known {
            Some(e) => e.first_poll,
            None => self
                .task_expected
                .get(&upid.kind)
                .copied()
                .unwrap_or(Duration::from_secs(1).min(self.poll_max)),
        };
        let mut delay = first.min(self.task_timeout);
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
            self.learn(&class, known, polls, last_running, started.elapsed());
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

    /// Updates the estimate of a task class after a task ended.
    ///
    /// - Missed (still running at the first poll, done by `done_by`): the
    ///   estimate becomes `done_by`, a time by which such a task certainly
    ///   ends (at most `task_poll_min` after it did), so the next one is
    ///   caught by its first poll.
    /// - Hit (done by the first poll): the estimate was long enough, maybe
    ///   too long. After [`HITS_BEFORE_SHRINK`] hits in a row it is probed
    ///   shorter (2 %, then 4 %, ... while probes keep hitting); a probe too
    ///   short costs one miss. Only one class probes at a time (until a
    ///   task of it ends, or [`PROBE_STALE`]): a class due meanwhile waits
    ///   for its turn, so the classes of one create+delete cycle do not all
    ///   miss in the same cycle.
    /// - The first task of a class, done by the first poll: it took at most
    ///   that long; keep it.
    fn learn(
        &self,
        class: &str,
        known: Option<Estimate>,
        polls: u32,
        last_running: Duration,
        done_by: Duration,
    ) {
        let mut estimates = self.estimates.lock().unwrap();
        // One class probes at a time. The classes of a create+delete cycle
        // (clone, start, stop, destroy) learn in step, so without this they
        // reach their sixth hit in the same cycle, all probe shorter at
        // once, and the misses pile up in one cycle (16 calls where 13 is
        // the norm, measured by grs-latency); staggered, a cycle carries at
        // most one probe and so at most one miss of it.
        let now = Instant::now();
        let other_probing = estimates.iter().any(|(k, e)| {
            k != class
                && e.probing_since
                    .is_some_and(|t| now.saturating_duration_since(t) < PROBE_STALE)
        });
        let next = match known {
            Some(e) if polls == 1 => {
                let hits = (e.hits + 1).min(HITS_BEFORE_SHRINK);
                if hits >= HITS_BEFORE_SHRINK && !other_probing {
                    Estimate {
                        first_poll: e.first_poll.mul_f64(SHRINK.powi(1 << e.probes.min(4))),
                        hits: 0,
                        probes: e.probes + 1,
                        probing_since: Some(now),
                    }
                } else {
                    // Waiting for its turn to probe, or not yet due.
                    Estimate {
                        hits,
                        probing_since: None,
                        ..e
                    }
                }
            }
            None if polls == 1 => Estimate {
                first_poll: done_by,
                hits: 0,
                probes: 0,
                probing_since: None,
            },
            _ => Estimate {
                first_poll: done_by.max(last_running),
                hits: 0,
                probes: 0,
                probing_since: None,
            },
        };
        estimates.insert(class.to_owned(), next);
    }

    /// The first poll of the next task of this class, when one was learned
    /// (for tools and tests).
    pub fn task_estimate(&self, class: &str) -> Option<Duration> {
        self.estimates
            .lock()
            .unwrap()
            .get(class)
            .map(|e| e.first_poll)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxmoxConfig;

    fn client() -> PveClient {
        let mut conn = ProxmoxConfig::new("https://pve.invalid:8006", "root@pam!grs");
        conn.token_secret = Some(secrecy::SecretString::from("unused"));
        PveClient::new(&conn).unwrap()
    }

    /// Drives `cycles` create+delete cycles of four task classes through
    /// `learn`, every first poll a hit; returns how many classes probed
    /// shorter in each cycle.
    fn probes_per_cycle(c: &PveClient, cycles: usize) -> Vec<usize> {
        let classes = ["qmclone:9000", "qmstart", "qmstop", "qmdestroy"];
        (0..cycles)
            .map(|_| {
                classes
                    .iter()
                    .filter(|class| {
                        let known = c.estimates.lock().unwrap().get(**class).copied();
                        let took = known.map_or(Duration::from_secs(1), |e| e.first_poll);
                        c.learn(class, known, 1, Duration::ZERO, took);
                        let after = c.estimates.lock().unwrap()[**class];
                        known.is_some_and(|k| after.first_poll < k.first_poll)
                    })
                    .count()
            })
            .collect()
    }

    #[test]
    fn task_classes_that_learn_in_step_probe_in_different_cycles() {
        // Before: all four classes probed in the 7th cycle (4 probes, up to
        // 4 misses in one cycle).
        let c = client();
        let per_cycle = probes_per_cycle(&c, 60);
        assert!(
            per_cycle.iter().all(|&n| n <= 1),
            "at most one probe a cycle: {per_cycle:?}"
        );
        // Every class still comes down: probes keep happening, in turn.
        let probes: usize = per_cycle.iter().sum();
        assert!(
            probes >= 4 * 3,
            "{probes} probes in 60 cycles: {per_cycle:?}"
        );
        for class in ["qmclone:9000", "qmstart", "qmstop", "qmdestroy"] {
            assert!(
                c.task_estimate(class).unwrap() < Duration::from_secs(1),
                "{class}"
            );
        }
    }

    #[test]
    fn a_miss_raises_the_estimate_to_when_the_task_was_seen_done() {
        let c = client();
        c.learn(
            "qmstart",
            None,
            1,
            Duration::ZERO,
            Duration::from_millis(500),
        );
        let known = c.estimates.lock().unwrap().get("qmstart").copied();
        c.learn(
            "qmstart",
            known,
            3,
            Duration::from_millis(520),
            Duration::from_millis(560),
        );
        assert_eq!(c.task_estimate("qmstart"), Some(Duration::from_millis(560)));
    }
}
