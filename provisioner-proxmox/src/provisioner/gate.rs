//! How many clones of one template GRS runs at once: as many as make PVE
//! clone faster, found by watching how long clones take.
//!
//! What real PVE serializes (see [`crate::sim::SimOptions::storage_lock_share`]):
//! clones of a stopped template take its config lock SHARED (qemu-server
//! `PVE/API2/Qemu.pm` `clone_vm`, `lock_config_shared`), so they do not wait
//! for each other there; but each creates its volume inside the storage's
//! lock (pve-storage `vdisk_clone` / `vdisk_alloc` under
//! `cluster_lock_storage`: per node for local storage, cluster-wide for
//! shared storage). Past the point where that lock is always busy, another
//! clone in flight only waits in PVE: it makes no clone finish sooner, it
//! costs status polls while it waits, and after 10 s of waiting its task
//! fails (`can't lock file ... got timeout`).
//!
//! So the gate keeps the number of clones in flight where PVE's lock is just
//! kept busy, the way TCP Vegas sizes a window: the shortest clone seen is
//! the uncontended duration `base`; a clone admitted with `c` clones in
//! flight that took `d` implies about `c * (1 - base / d)` clones queued in
//! PVE behind the lock. Fewer than [`ALPHA`] queued: the limit grows by
//! one (so it doubles per round of clones while nothing queues, and the
//! first burst reaches the lock's pace within a few clone durations); more
//! than [`BETA`]: it shrinks by one. A clone that failed on a lock halves it.
//! Creates beyond the limit wait in GRS, without calls to PVE, and are
//! admitted in the order they came: a place freed by a clone goes to the
//! create that has waited longest, not to whichever waiter runs first
//! (with every waiter woken, a replacement create queued after a burst's
//! first wave could overtake it).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Clones queued in PVE below which the limit grows. A few clones waiting
/// in PVE keep its lock busy while GRS notices a clone ended and sends the
/// next one (a poll and two calls later); they wait far less than the
/// lock's 10 s timeout.
const ALPHA: f64 = 3.0;
/// Clones queued in PVE above which the limit shrinks.
const BETA: f64 = 6.0;
/// The limit before anything was learned: four. A linked clone holds its
/// storage's lock well under a second on the usual storages (a thin
/// snapshot, a ZFS clone, a qcow2 file with a backing file), so the fourth
/// clone in flight waits far less than the lock's 10 s timeout, and a
/// burst's first round already keeps the lock busy (with two, the lock
/// idled half of the first clone's time: the `grs-latency` burst of 100 on
/// 50 took 1.07x its lower bound, 1.16x over three nodes; with four 1.03x
/// and 1.09x). Should the lock be much slower, a clone failing on it halves
/// the limit ([`Gate::hit_lock`]) and is retried.
const INITIAL_LIMIT: usize = 4;
/// Most clones of one template in flight, whatever the measurements say.
const MAX_LIMIT: usize = 64;

/// The gates of one PVE connection, one per template (`node/vmid`).
#[derive(Debug, Default)]
pub(crate) struct CloneGates {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl CloneGates {
    /// The gate of the template `vmid` on `node`.
    pub(crate) fn of(&self, node: &str, vmid: u32) -> Arc<Gate> {
        self.gates
            .lock()
            .unwrap()
            .entry(format!("{node}/{vmid}"))
            .or_insert_with(|| Arc::new(Gate::new()))
            .clone()
    }
}

/// The clone gate of one template.
#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Notify,
}

#[derive(Debug)]
struct GateState {
    limit: usize,
    in_flight: usize,
    /// The shortest clone seen: the uncontended duration.
    base: Option<Duration>,
    /// The tickets of the creates waiting, oldest first; only the oldest
    /// may take a free place.
    waiting: VecDeque<u64>,
    next_ticket: u64,
}

impl Gate {
    fn new() -> Self {
        Self {
            state: Mutex::new(GateState {
                limit: INITIAL_LIMIT,
                in_flight: 0,
                base: None,
                waiting: VecDeque::new(),
                next_ticket: 0,
            }),
            changed: Notify::new(),
        }
    }

    /// How many clones may be in flight now.
    pub(crate) fn limit(&self) -> usize {
        self.state.lock().unwrap().limit
    }

    /// Waits until one more clone may start, after every create that
    /// began waiting before this one. Cancel-safe: dropping the future
    /// takes nothing and gives its turn to the next in line.
    pub(crate) async fn admit(self: &Arc<Self>) -> Permit {
        let mut turn = {
            let mut s = self.state.lock().unwrap();
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.waiting.push_back(ticket);
            Turn {
                gate: self,
                ticket: Some(ticket),
            }
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().unwrap();
                if s.in_flight < s.limit && s.waiting.front() == turn.ticket.as_ref() {
                    s.waiting.pop_front();
                    turn.ticket = None;
                    s.in_flight += 1;
                    let admitted_with = s.in_flight;
                    // The next in line may fit too (the limit grew, or
                    // several places freed at once).
                    if s.in_flight < s.limit && !s.waiting.is_empty() {
                        self.changed.notify_waiters();
                    }
                    return Permit {
                        gate: self.clone(),
                        admitted_with,
                    };
                }
            }
            notified.await;
        }
    }

    fn learn(&self, admitted_with: usize, took: Duration) {
        let mut s = self.state.lock().unwrap();
        let base = *s.base.get_or_insert(took);
        let base = base.min(took);
        s.base = Some(base);
        let queued = admitted_with as f64 * (1.0 - base.as_secs_f64() / took.as_secs_f64());
        if queued < ALPHA && admitted_with >= s.limit.saturating_sub(1) {
            // Only a clone that ran with (nearly) the full limit in flight
            // says the limit could be higher.
            s.limit = (s.limit + 1).min(MAX_LIMIT);
        } else if queued > BETA {
            s.limit = s.limit.saturating_sub(1).max(1);
        }
    }

    /// A clone task failed on a lock: fewer at once.
    pub(crate) fn hit_lock(&self) {
        let mut s = self.state.lock().unwrap();
        s.limit = (s.limit / 2).max(1);
    }

    fn release(&self) {
        self.state.lock().unwrap().in_flight -= 1;
        self.changed.notify_waiters();
    }
}

/// A create's place in the gate's line while it waits; dropping it (the
/// `admit` future was cancelled) leaves the line.
struct Turn<'a> {
    gate: &'a Gate,
    ticket: Option<u64>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            let mut s = self.gate.state.lock().unwrap();
            s.waiting.retain(|t| *t != ticket);
            drop(s);
            // It may have been first in line: the next one may go now.
            self.gate.changed.notify_waiters();
        }
    }
}

/// One clone in flight; dropping it frees its place.
#[derive(Debug)]
pub(crate) struct Permit {
    gate: Arc<Gate>,
    admitted_with: usize,
}

impl Permit {
    /// The clone task ended well after `took` (request to seen done):
    /// learn from it.
    pub(crate) fn succeeded(self, took: Duration) {
        self.gate.learn(self.admitted_with, took);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(gate: &Arc<Gate>, with: usize, took_ms: u64) {
        gate.state.lock().unwrap().in_flight += 1;
        Permit {
            gate: gate.clone(),
            admitted_with: with,
        }
        .succeeded(Duration::from_millis(took_ms));
    }

    #[test]
    fn the_limit_grows_while_clones_take_their_base_time_and_shrinks_when_they_queue() {
        let g = Arc::new(Gate::new());
        assert_eq!(g.limit(), 4);
        // Clones at full limit that take their uncontended time: grow.
        for _ in 0..6 {
            let l = g.limit();
            run(&g, l, 1000);
        }
        assert_eq!(g.limit(), 10);
        // 10 in flight and each took 5 s: about 8 queued behind PVE's lock.
        run(&g, 10, 5000);
        assert_eq!(g.limit(), 9);
        // A clone run well below the limit says nothing about raising it.
        run(&g, 2, 1000);
        assert_eq!(g.limit(), 9);
        g.hit_lock();
        assert_eq!(g.limit(), 4);
    }

    #[tokio::test]
    async fn creates_beyond_the_limit_wait_and_go_when_a_place_frees() {
        let g = Arc::new(Gate::new());
        g.state.lock().unwrap().limit = 2;
        let a = g.admit().await;
        let _b = g.admit().await;
        let third = tokio::spawn({
            let g = g.clone();
            async move {
                g.admit().await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("admitted once a place freed")
            .unwrap();
    }

    /// Polls `f` once (no runtime needed: the gate wakes through `Notify`).
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn a_freed_place_goes_to_the_create_that_waited_longest() {
        let g = Arc::new(Gate::new());
        g.state.lock().unwrap().limit = 1;
        let held = poll_once(std::pin::pin!(g.admit())).expect("a free place");
        let mut first = std::pin::pin!(g.admit());
        let mut second = std::pin::pin!(g.admit());
        assert!(poll_once(first.as_mut()).is_none());
        assert!(poll_once(second.as_mut()).is_none());
        drop(held);
        // The later create runs first here (as a woken task may): it must
        // still wait for the earlier one.
        assert!(
            poll_once(second.as_mut()).is_none(),
            "the later create overtook the earlier"
        );
        let p = poll_once(first.as_mut()).expect("the earlier create is admitted");
        assert!(poll_once(second.as_mut()).is_none(), "one place only");
        drop(p);
        assert!(poll_once(second.as_mut()).is_some());
    }

    #[test]
    fn a_create_that_stops_waiting_gives_its_turn_to_the_next() {
        let g = Arc::new(Gate::new());
        g.state.lock().unwrap().limit = 1;
        let held = poll_once(std::pin::pin!(g.admit())).expect("a free place");
        let mut second = std::pin::pin!(g.admit());
        {
            let mut first = Box::pin(g.admit());
            assert!(poll_once(first.as_mut()).is_none());
            assert!(poll_once(second.as_mut()).is_none());
            // `first` is dropped here: cancelled while waiting.
        }
        drop(held);
        assert!(poll_once(second.as_mut()).is_some());
        assert!(g.state.lock().unwrap().waiting.is_empty());
    }
}
