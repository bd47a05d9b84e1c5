//! Proxmox VE backend for GRS. All Proxmox knowledge of GRS lives here.
//!
//! Modules:
//! - [`config`]: [`ProxmoxConfig`] (`[proxmox]`: address, token, TLS,
//!   timeouts, nodes) and [`ProxmoxPoolConfig`] (`[pools.<name>.provisioner]`, `type = "proxmox"`).
//! - [`client`]: [`PveClient`], the async API client: token auth, timeouts,
//!   retries with backoff, task (UPID) waiting with adaptive polling.
//! - [`tls`]: system roots, CA file, pinned SHA-256 fingerprint, insecure.
//! - [`error`]: [`PveError`], PVE's status and text, transient or not.
//! - [`schema`]: the official PVE 9.1 schema of the endpoints GRS uses and a
//!   validator for requests against it.
//! - [`placement`]: which node gets the next VM (room, per-node caps).
//! - [`check`]: read-only installation checks for `grs doctor` (the token's
//!   privileges against [`privileges`], resolved to a pool's paths).
//! - [`privileges`]: the least privileges of the API token, as data
//!   (checked against the schema by `tests/privileges.rs`).
//! - [`provisioner`]: [`ProxmoxProvisioner`], one pool over PVE: clone,
//!   mark, configure, bootstrap, start; stop and destroy.
//! - [`backend`]: [`ProxmoxBackend`], the `Provisioner` trait over one PVE
//!   connection and all its pools (shared client and placement);
//!   [`factory()`]: how a binary registers it for `type = "proxmox"`.
//! - [`sim`]: [`sim::PveSim`], a PVE simulator over real HTTP(S) for tests,
//!   the demo and the benchmark (binary `grs-pve-sim`). Feature `sim`, as
//!   are [`schema`] and [`testing`]: production binaries do not link them.
//! - [`testing`]: [`testing::SimFixture`], a simulator with nodes, a template
//!   and a provisioner, implementing the conformance `Harness`.
//!
//! Start reading at [`ProxmoxBackend`] and [`ProxmoxProvisioner`]; the PVE facts it honours are in
//! `shared/docs/proxmox-api.md`.

pub mod backend;
pub mod check;
pub mod client;
pub mod config;
pub mod error;
pub mod factory;
pub mod placement;
pub mod privileges;
pub mod provisioner;
#[cfg(feature = "sim")]
pub mod schema;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "sim")]
pub mod testing;
pub mod tls;

pub use backend::ProxmoxBackend;
pub use client::PveClient;
pub use config::{BootstrapMode, ConfigError, NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
pub use error::PveError;
pub use factory::factory;
pub use provisioner::ProxmoxProvisioner;
