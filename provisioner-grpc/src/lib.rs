//! Provisioner backends over gRPC (`grs.provisioner.v1.Provisioner`).
//!
//! A backend in another process, in any language, plugs into GRS by
//! serving the protocol in `proto/grs/provisioner/v1/provisioner.proto`
//! (guide: `docs/provisioner-plugins.md`). This crate holds both ends:
//!
//! - [`client`]: [`GrpcProvisioner`], the `Provisioner` trait over the wire
//!   (deadlines, retries of transient codes, handshake version check, pool
//!   documents re-sent to a restarted plugin).
//! - [`server`]: [`serve`], which exposes any `Arc<dyn Provisioner>`.
//! - [`plugin`]: the process side, go-plugin style: [`plugin::Plugin`]
//!   starts a plugin executable, reads its handshake line, restarts it on
//!   crash with backoff, forwards its logs and stops it on shutdown;
//!   [`plugin::run_plugin`] is the other end, for plugins written in Rust.
//! - [`convert`]: the one mapping each way between the trait's types and
//!   errors and the wire's messages and status codes.
//!
//! Start at [`GrpcProvisioner`] and [`serve`].

pub mod client;
pub mod convert;
pub mod plugin;
pub mod server;

pub use client::{Address, ClientOptions, GrpcProvisioner, Target};
pub use server::{ServeError, serve};

/// The plugin protocol version this crate speaks, in the handshake RPC and
/// the handshake line a plugin prints.
pub const PROTOCOL_VERSION: u32 = 1;
