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
//! - [`NodeLedger`]: per-node reservations shared by every process of an
//!   installation (the control plane keeps them in its store), so per-node
//!   maximums hold across control-plane replicas.
//!
//! Start reading at [`Provisioner`]. Backends in other processes (or
//! languages) plug in over gRPC: see the `grs-provisioner-grpc` crate and
//! `docs/provisioner-plugins.md`.

pub mod conformance;
pub mod error;
pub mod fake;
pub mod types;

use std::sync::Arc;

use async_trait::async_trait;

pub use error::ProvisionerError;
pub use fake::FakeProvisioner;
pub use types::{
    Bootstrap, Instance, InstanceSpec, InstanceState, InvalidInstanceName, instance_name,
    validate_instance_name,
};

/// What a backend supports beyond the verbs every backend has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `start` and `stop` work. Without it they fail with
    /// [`ProvisionerError::Unsupported`].
    pub start_stop: bool,
}

/// A pool's backend settings as GRS hands them over: the pool's
/// `[pools.<name>.provisioner]` table without the keys GRS itself reads
/// (`type`, and for plugins `endpoint`, `command`, ...), as JSON. GRS does
/// not look inside; the backend parses and checks it.
pub type PoolDocument = serde_json::Map<String, serde_json::Value>;

/// A hypervisor backend serving one or more pools.
///
/// One backend object serves every pool of its kind (so a connection, its
/// placement and its limits are shared between them); each call names the
/// pool it is about. A pool becomes known to the backend through
/// [`configure_pool`](Self::configure_pool).
///
/// # Guarantees every implementation gives
/// - **Ownership.** Every VM a provisioner creates carries a marker of this GRS
///   installation and its pool. `list` and `get` only ever return VMs marked
///   with the pool asked about; `delete`, `stop` and `start` refuse, with
///   [`ProvisionerError::NotOwned`], a VM that has an instance's name but
///   not the marker of this installation and pool. Templates are never
///   touched.
/// - **Idempotence.** `create` of a name that already exists (and is ours)
///   returns that instance instead of making a second one; `delete` of an
///   absent instance succeeds. The control plane relies on both: its queues
///   deliver at least once, so every call may be repeated after a crash.
/// - **Clean failure.** A `create` that fails removes what it made before
///   returning the error.
/// - **Retired pools.** `list`, `get`, `delete` and `remove_all` work for a
///   pool that was never configured (the marker says which pool a VM
///   belongs to), so the instances of a pool removed from the configuration
///   can still be found and deleted. `create`, `start` and `stop` of such a
///   pool may fail with [`ProvisionerError::UnknownPool`].
/// - **Cancellation.** Every `.await` is a cancellation point. A `create`
///   future dropped half-way may leave a partly made instance behind under the
///   requested name; it is found by `get`/`list` (it carries the marker) and
///   removed by `delete`, which the control plane always calls for an instance
///   whose creation did not finish.
#[async_trait]
pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// The backend's kind (`fake`, `proxmox`; for a plugin, the name it
    /// gives in its handshake).
    fn kind(&self) -> &str;

    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Checks `config`, the pool's [`PoolDocument`], and adopts it for pool
    /// `pool` (replacing an earlier one). Makes no request to the
    /// hypervisor: errors ([`ProvisionerError::Config`]) are about the
    /// document itself. Idempotent.
    fn configure_pool(&self, pool: &str, config: &PoolDocument) -> Result<(), ProvisionerError>;

    /// Checks a configured pool against the real thing (template exists,
    /// credentials work). Called once at start-up; a
    /// [`ProvisionerError::Config`] here is a configuration error the
    /// operator must fix, anything else (hypervisor unreachable) is not fatal.
    async fn validate_pool(&self, pool: &str) -> Result<(), ProvisionerError>;

    /// Creates, bootstraps and starts the instance `spec.name` of pool
    /// `spec.pool`; returns it once running.
    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError>;

    /// Stops (hard) and destroys the instance. Absent is success.
    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProvisionerError>;

    /// The instance named `name`, if it exists and is ours (this pool's).
    async fn get(&self, pool: &str, name: &str) -> Result<Option<Instance>, ProvisionerError>;

    /// Every instance of pool `pool` that carries our marker.
    async fn list(&self, pool: &str) -> Result<Vec<Instance>, ProvisionerError>;

    /// Starts a stopped instance. Starting a running one is success.
    async fn start(&self, pool: &str, name: &str) -> Result<(), ProvisionerError>;

    /// Stops an instance (hard). Stopping a stopped one is success.
    async fn stop(&self, pool: &str, name: &str) -> Result<(), ProvisionerError>;

    /// Deletes every instance of pool `pool` that carries our marker;
    /// returns the names deleted. Stops at the first failure (a repeated
    /// call finishes the job). The default lists, then deletes one by one.
    async fn remove_all(&self, pool: &str) -> Result<Vec<String>, ProvisionerError> {
        let mut removed = Vec::new();
        for inst in self.list(pool).await? {
            self.delete(pool, &inst.name).await?;
            removed.push(inst.name);
        }
        Ok(removed)
    }

    /// Hands the backend the installation's shared node reservations: a
    /// backend that places VMs on nodes with per-node maximums reserves a
    /// place there before it creates a VM, so several processes (control
    /// plane replicas) never exceed a node's maximum together. The default
    /// ignores it (the backend's own limits then hold per process only).
    fn use_node_ledger(&self, ledger: Arc<dyn NodeLedger>) {
        let _ = ledger;
    }
}

/// Why a [`NodeLedger`] call failed: the shared places could not be read or
/// written (the control plane's store did not answer). Nothing was held or
/// released; the call may be repeated.
#[derive(Debug, thiserror::Error)]
#[error("node places unavailable: {source}")]
pub struct LedgerError {
    /// The ledger's own error (the store's).
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Places on nodes, held for instances by every process of an
/// installation (implemented by the control plane over its store).
///
/// A place is held from before a VM is made until the control plane records
/// the instance deleted (it releases the place of the node the instance ran
/// on, its `location`), so a node's count covers VMs being made by any
/// process and VMs made, whoever made them.
#[async_trait]
pub trait NodeLedger: Send + Sync + std::fmt::Debug {
    /// Holds a place on `node` for `instance` if fewer than `max` instances
    /// hold or occupy one there. `visible` are the instances the caller
    /// sees on the node (VMs of this installation, made by anyone): counted
    /// whether or not they hold a place. True when `instance` holds a place
    /// afterwards (also when it already held one). Atomic across processes.
    async fn reserve(
        &self,
        node: &str,
        instance: &str,
        max: u32,
        visible: &[String],
    ) -> Result<bool, LedgerError>;

    /// Releases `instance`'s place on `node` (a create that failed or was
    /// placed elsewhere). Idempotent.
    async fn release(&self, node: &str, instance: &str) -> Result<(), LedgerError>;
}
