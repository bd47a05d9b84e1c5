//! `grs-webhook-gateway --config grs.toml`: wiring only (see the library).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use grs_webhook_gateway::{ConfigFile, GatewayError};

/// The GRS webhook gateway: GitHub webhooks in, cloud-init documents out.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The GRS config file (TOML); every key can be overridden by GRS_*
    /// environment variables (gateway.listen ← GRS_GATEWAY_LISTEN).
    #[arg(long, short = 'c', env = "GRS_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let file: ConfigFile = match grs_config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let config = file.into_gateway();
    // Validate (and read secret files) before anything starts, so a bad
    // config exits 64 naming the key.
    let secrets = match config.resolve(|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("grs-webhook-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config, secrets)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(GatewayError::Config(c)) = e.downcast_ref::<GatewayError>() {
                eprintln!("grs-webhook-gateway: {c}");
                return ExitCode::from(grs_config::EX_USAGE as u8);
            }
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(e: grs_config::ConfigError) -> ExitCode {
    eprintln!("grs-webhook-gateway: {e}");
    ExitCode::from(grs_config::EX_USAGE as u8)
}

async fn serve(
    config: grs_webhook_gateway::GatewayConfig,
    secrets: grs_webhook_gateway::ResolvedSecrets,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (gateway.listen)", config.listen))?;
    let grace = config.shutdown_grace;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let mut stop = rx.clone();
    let server = grs_webhook_gateway::run_with(config, secrets, listener, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    tokio::pin!(server);
    let mut rx2 = rx;
    tokio::select! {
        r = &mut server => return r.map_err(Into::into),
        _ = rx2.wait_for(|s| *s) => {}
    }
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: draining requests in flight"
    );
    match tokio::time::timeout(grace, server).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => {
            tracing::warn!("shutdown grace elapsed with requests still in flight; exiting");
            Ok(())
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
