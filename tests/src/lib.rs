//! End-to-end tests of the assembled GRS, and the harness they run on.
//!
//! Two levels:
//! - `tests/job_lifecycle.rs`: one job step by step through
//!   `grs::demo::System` (every part in one process, on loopback sockets);
//! - the scenarios (`tests/scenarios.rs`) and the soak (`grs-soak`,
//!   `tests/soak.rs`): the real binaries as separate processes, killed and
//!   restarted at will: a private `redis-server` with AOF, `grs-pve-sim`,
//!   `grs-github-sim` (this crate), `grs-control-plane` replicas, each with
//!   a `grs-webhook-gateway`, and simulated VMs that boot from the
//!   cloud-init documents GRS serves. Every scenario ends with
//!   [`world::World::check_invariants`].
//!
//! Module map:
//! - [`process`]: spawning, killing (SIGKILL, SIGTERM) and restarting a
//!   process; its log file; locating (and building) the binaries.
//! - [`github`]: `grs-github-sim`: the GitHub simulator behind a delivery
//!   relay with faults (duplicate, reorder, lose, hold), and its client.
//! - [`pve`]: the client of `grs-pve-sim`'s control API (VMs, faults).
//! - [`fleet`]: the simulated VMs.
//! - [`world`]: the whole system, its wiring and the invariants check.
//! - [`soak`]: many jobs with every fault mixed; invariants and latencies.
//! - [`latency`]: the latency benchmark (`grs-latency`): cold and warm
//!   pickup, GRS's own share, PVE calls per VM, bursts; in one process.

pub mod fleet;
pub mod github;
pub mod latency;
pub mod process;
pub mod pve;
pub mod soak;
pub mod world;
