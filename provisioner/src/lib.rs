//! The contract between GRS and the hypervisors it runs jobs on.
//!
//! A [`Provisioner`] makes, lists and destroys the short-lived VMs ("instances")
//! of one pool. The control plane drives it; it knows nothing of GitHub, Redis
//! or any particular hypervisor. Backends (Proxmox first) live in their own
//! crates and are chosen at run time from configuration as
//! `Arc<dyn Provisioner>`.
//!
//! Modules:
//! - [`types`]: [`InstanceSpec`] (what to make), [`Instance`] and
//!   [`InstanceState`] (what exists), [`Bootstrap`] (how the runner config gets
//!   into the VM), instance naming.
//! - [`error`]: [`ProvisionerError`], and which errors are worth retrying.
//! - [`fake`]: [`FakeProvisioner`], an in-memory backend with injectable
//!   failures and delays, for tests and the demo.
//! - [`conformance`]: the behaviour every backend must show, as a suite a
//!   backend's tests run against a live instance of it.
//!
//! Start reading at [`Provisioner`].

pub mod conformance;
pub mod error;
pub mod fake;
pub mod types;

use async_trait::async_trait;

pub use error::ProvisionerError;
pub use fake::FakeProvisioner;
pub use types::{
    Bootstrap, Instance, InstanceSpec, InstanceState, instance_name, validate_instance_name,
};

/// A hypervisor backend for one pool.
///
/// # Guarantees every implementation gives
/// - **Ownership.** Every VM a provisioner creates carries a marker of this GRS
///   installation (and pool). `list` and `get` only ever return marked VMs;
///   `delete` and `stop` refuse, with [`ProvisionerError::NotOwned`], a VM
///   that has an instance's name but not the marker. Templates are never
///   touched.
/// - **Idempotence.** `create` of a name that already exists (and is ours)
///   returns that instance instead of making a second one; `delete` of an
///   absent instance succeeds. The control plane relies on both: its queues
///   deliver at least once, so every call may be repeated after a crash.
/// - **Clean failure.** A `create` that fails removes what it made before
///   returning the error.
/// - **Cancellation.** Every `.await` is a cancellation point. A `create`
///   future dropped half-way may leave a partly made instance behind under the
///   requested name; it is found by `get`/`list` (it carries the marker) and
///   removed by `delete`, which the control plane always calls for an instance
///   whose creation did not finish.
#[async_trait]
pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// The backend's kind, as written in configuration (`fake`, `proxmox`).
    fn kind(&self) -> &'static str;

    /// Checks the backend's configuration against the real thing (template
    /// exists, credentials work). Called once at start-up; an error here is a
    /// configuration error the operator must fix.
    async fn validate(&self) -> Result<(), ProvisionerError>;

    /// Creates, bootstraps and starts the instance; returns it once running.
    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError>;

    /// Stops (hard) and destroys the instance. Absent is success.
    async fn delete(&self, name: &str) -> Result<(), ProvisionerError>;

    /// The instance named `name`, if it exists and is ours.
    async fn get(&self, name: &str) -> Result<Option<Instance>, ProvisionerError>;

    /// Every instance of this pool that carries our marker.
    async fn list(&self) -> Result<Vec<Instance>, ProvisionerError>;

    /// Starts a stopped instance. Starting a running one is success.
    async fn start(&self, name: &str) -> Result<(), ProvisionerError>;

    /// Stops an instance (hard). Stopping a stopped one is success.
    async fn stop(&self, name: &str) -> Result<(), ProvisionerError>;
}
