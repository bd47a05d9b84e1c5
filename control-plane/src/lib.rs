//! The GRS control plane: it accepts GitHub job events, keeps jobs and
//! instances in a durable store, and drives provisioners to give every job
//! its own short-lived VM.
//!
//! Modules, in the order a job meets them:
//! - [`service`]: the `grs.v1.ControlPlane` gRPC API (validation, error codes).
//! - [`pools`]: configured pools, their provisioners, label routing.
//! - [`model`]: jobs, instances, events, and the rules events follow.
//! - [`store`]: the [`Store`](store::Store) trait, on Redis (production) and
//!   in memory (demo, tests), with its conformance suite.
//! - [`dispatcher`]: provision queue → instance (capacity, retries, failure).
//! - [`teardown`]: teardown queue → instance gone, capacity freed (after
//!   asking GitHub that the runner is not busy, unless its job completed).
//! - [`warm`]: warm keepers, filling each pool's warm pool (`min_idle`).
//! - [`reconciler`]: the leader-elected pass that tears down what events
//!   leave behind (runners that took no job, instances past their maximum
//!   lifetime, orphan VMs, idle warm instances too old or too many, offline
//!   runner registrations, VMs of pools removed from the configuration).
//! - [`recovery`]: run by the reconciler's leader: lost webhooks (queued
//!   jobs GitHub never told GRS about, failed deliveries redelivered) and
//!   unrouted jobs a pool now serves.
//! - [`worker`]: what the dispatcher and teardown share (claiming,
//!   heartbeats, the [`RunnerRegistrar`](worker::RunnerRegistrar) view of
//!   GitHub).
//! - [`bootstrap`], [`cloud_init`]: tokens and documents a booting VM uses;
//!   [`guest_agent`]: the runner config handed over by the QEMU guest agent.
//! - [`github`]: the [`RunnerRegistrar`](worker::RunnerRegistrar) over
//!   GitHub's REST API, job-status checks within a budget, and which
//!   events are this installation's ([`github::EventScope`]).
//! - [`config`]: the `[control_plane]`, `[redis]` and `[pools.*]` sections.
//! - [`metrics`]: Prometheus metrics on `control_plane.metrics_listen`.
//! - [`server`]: assembles it all: [`server::run`] is the entry point.
//! - [`testing`]: helpers for tests that need a real Redis (feature
//!   `testing`: not in the release binary).
//!
//! Start reading at [`server::run`], then [`store`]'s docs.

pub mod bootstrap;
pub mod cloud_init;
pub mod config;
pub mod dispatcher;
pub mod github;
pub mod guest_agent;
pub mod metrics;
pub mod model;
pub mod pools;
pub mod reconciler;
pub mod recovery;
pub mod server;
pub mod service;
pub mod store;
pub mod teardown;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod warm;
pub mod worker;
