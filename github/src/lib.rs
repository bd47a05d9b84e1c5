//! Everything GRS knows about GitHub. Nothing outside this crate speaks
//! GitHub's HTTP API or parses its payloads.
//!
//! Module map:
//! - [`signature`]: `X-Hub-Signature-256` signing and constant-time
//!   verification.
//! - [`webhook`]: typed, lenient parsing of `workflow_job` and `ping`
//!   deliveries (JSON or form-encoded) and their mapping to the control
//!   plane's `JobEvent`. Start here for the inbound path.
//! - [`config`]: the `[github]` config section ([`GitHubConfig`]).
//! - [`client`]: the REST client ([`GitHubClient`]): GitHub App or PAT auth,
//!   JIT runner configs, registration tokens, runners, job status, rate
//!   limits. Start here for the outbound path.
//! - [`cloud_init`]: renders the cloud-config user-data that starts a
//!   one-job runner in a VM.
//! - `sim` (feature `sim`): an in-process GitHub (REST API, signed
//!   webhook sender, simulated runners) for the demo and the tests.

pub mod client;
pub mod cloud_init;
pub mod config;
pub mod signature;
pub mod webhook;

#[cfg(feature = "sim")]
pub mod sim;

pub use client::{
    ApiObserver, GitHubClient, GitHubError, Hook, HookDelivery, JitConfig, Job, RateLimit, Runner,
    Scope, WorkflowRun,
};
pub use config::{GitHubAppConfig, GitHubConfig};
