//! The GRS webhook gateway: the HTTP edge between GitHub (and booting VMs)
//! and the control plane. Stateless: it keeps nothing between requests, so
//! any number of replicas can run behind a load balancer.
//!
//! Module map:
//! - [`config`]: the `[gateway]` config section ([`GatewayConfig`]) and how
//!   its secrets are found.
//! - [`http`]: the routes and the status each outcome gets. Start here.
//! - [`control_plane`]: the gRPC client (deadline, bearer token, TLS).
//! - [`convert`]: a parsed delivery to the wire `JobEvent` (wire limits).
//! - [`metrics`]: the Prometheus metrics behind `/metrics`.
//!
//! [`run`] serves until its shutdown future completes (mini-redis style),
//! so tests run the gateway on `127.0.0.1:0` and stop it at will. The
//! binary (`src/main.rs`) only parses arguments, loads the config, sets up
//! logging and waits for SIGINT/SIGTERM.

pub mod config;
pub mod control_plane;
pub mod convert;
pub mod http;
pub mod metrics;

use std::future::Future;
use std::sync::Arc;

pub use config::{ConfigFile, GatewayConfig, ResolvedSecrets};

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Bad configuration (exit code 64 in the binary).
    #[error(transparent)]
    Config(#[from] grs_config::ConfigError),
    /// The control-plane endpoint cannot be set up.
    #[error(transparent)]
    Endpoint(#[from] control_plane::EndpointError),
    /// Serving failed.
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the shared state from `config` (secrets resolved already).
pub fn state(
    config: &GatewayConfig,
    secrets: &ResolvedSecrets,
) -> Result<Arc<http::AppState>, GatewayError> {
    let metrics = metrics::Metrics::new();
    Ok(Arc::new(http::AppState {
        webhook_secret: secrets.webhook_secret.clone(),
        control_plane: control_plane::ControlPlane::new(
            config,
            secrets,
            metrics.submit_batch_size.clone(),
        )?,
        metrics,
    }))
}

/// Serves the gateway on `listener` until `shutdown` completes, then stops
/// taking connections and returns once the requests in flight are answered
/// (the caller bounds that wait; see `shutdown_grace`). The webhook secret
/// is resolved from `config` and the process environment.
pub async fn run(
    config: GatewayConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let secrets = config.resolve(|k| std::env::var(k).ok())?;
    run_with(config, secrets, listener, shutdown).await
}

/// [`run`] with the secrets given (tests, and the demo).
pub async fn run_with(
    config: GatewayConfig,
    secrets: ResolvedSecrets,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let st = state(&config, &secrets)?;
    let app = http::router(st, &config);
    tracing::info!(
        listen = %listener.local_addr()?,
        control_plane = %config.control_plane_url,
        public_url = config.public_url.as_deref().unwrap_or("-"),
        "webhook gateway serving"
    );
    // No Nagle: answers are small and latency is what GitHub measures.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("webhook gateway stopped");
    Ok(())
}
