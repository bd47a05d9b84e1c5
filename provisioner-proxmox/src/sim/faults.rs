//! Faults the simulator can inject, and the bookkeeping of those pending.

use std::time::Duration;

use super::state::Shared;

/// A fault to inject. As JSON (`grs-pve-sim --control-listen`'s
/// `POST /faults`): `{"fault": "clone_lock_contention", "probability": 0.2}`,
/// durations as `extra_ms` in milliseconds.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The next `times` clone TASKS fail with PVE's lock timeout on the
    /// source (`can't lock file '/var/lock/qemu-server/lock-N.conf' - got
    /// timeout`): the HTTP call answers a UPID, the lock is taken in the
    /// worker (qemu-server `clone_vm`, `lock_config_shared`).
    CloneLockTimeout {
        /// How many.
        times: u32,
    },
    /// Every clone task fails with that lock timeout with this probability.
    CloneLockContention {
        /// 0.0 to 1.0.
        probability: f64,
    },
    /// The next `times` clone tasks fail on the storage's cluster lock
    /// (`clone failed: cfs-lock 'storage-X' error: got lock request
    /// timeout`, pve-storage `cluster_lock_storage` on shared storage) after
    /// the new VM was made; the worker removes it.
    CloneStorageLockTimeout {
        /// How many.
        times: u32,
    },
    /// The next `times` tasks of type `kind` (`qmclone`, `qmstart`, ...) end
    /// with `message` as exit status.
    FailTask {
        /// Task type.
        kind: String,
        /// How many.
        times: u32,
        /// The exit status text.
        message: String,
    },
    /// Every task takes `extra` longer.
    SlowTasks {
        /// Added duration.
        #[serde(rename = "extra_ms", deserialize_with = "millis")]
        extra: Duration,
    },
    /// The next `times` requests whose path contains `path_contains` (and
    /// method, when given) are answered with `status` and `message`.
    HttpError {
        /// Substring of the path.
        path_contains: String,
        /// Only this method, when given.
        #[serde(default)]
        method: Option<String>,
        /// HTTP status.
        status: u16,
        /// PVE message.
        message: String,
        /// How many.
        times: u32,
    },
    /// The next `times` requests are answered by closing the connection.
    DropConnections {
        /// How many.
        times: u32,
    },
    /// The first `times` status polls of every new task answer
    /// `no such task` (PVE has not registered it yet).
    TaskNotYetVisible {
        /// How many per task.
        times: u32,
    },
    /// The next `times` requests whose path contains `path_contains` are
    /// answered by closing the connection before anything is done.
    DropRequests {
        /// Substring of the path.
        path_contains: String,
        /// How many.
        times: u32,
    },
    /// The next `times` requests whose path contains `path_contains` are
    /// carried out, but their answer is lost (the connection closes): the
    /// client cannot know whether PVE acted.
    LoseAnswers {
        /// Substring of the path.
        path_contains: String,
        /// How many.
        times: u32,
    },
    /// Every answer comes this much later (a slow or hung API).
    Latency {
        /// Added delay.
        #[serde(rename = "extra_ms", deserialize_with = "millis")]
        extra: Duration,
    },
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_millis)
}

#[derive(Debug, Default)]
pub(super) struct Faults {
    pub(super) clone_lock_timeouts: u32,
    pub(super) clone_storage_lock_timeouts: u32,
    pub(super) clone_contention: f64,
    pub(super) fail_tasks: Vec<(String, u32, String)>,
    pub(super) slow: Duration,
    pub(super) http: Vec<(String, Option<String>, u16, String, u32)>,
    pub(super) drops: u32,
    pub(super) invisible: u32,
    pub(super) latency: Duration,
    pub(super) lost_answers: Vec<(String, u32)>,
    pub(super) dropped_requests: Vec<(String, u32)>,
}

pub(super) fn take_drop(shared: &Shared) -> bool {
    let mut s = shared.state.lock().unwrap();
    if s.faults.drops > 0 {
        s.faults.drops -= 1;
        s.requests += 1;
        true
    } else {
        false
    }
}

/// Uses up one of the `(path fragment, times left)` faults matching `path`.
pub(super) fn take_matching(faults: &mut [(String, u32)], path: &str) -> bool {
    match faults.iter_mut().find(|f| f.1 > 0 && path.contains(&f.0)) {
        Some(f) => {
            f.1 -= 1;
            true
        }
        None => false,
    }
}

pub(super) fn take_dropped_request(shared: &Shared, path: &str) -> bool {
    let mut s = shared.state.lock().unwrap();
    let hit = take_matching(&mut s.faults.dropped_requests, path);
    if hit {
        s.requests += 1;
    }
    hit
}

pub(super) fn take_lost_answer(shared: &Shared, path: &str) -> bool {
    take_matching(&mut shared.state.lock().unwrap().faults.lost_answers, path)
}
