//! `grs-control-plane`: loads the configuration, builds the store and the
//! pools, and serves until SIGINT/SIGTERM. All the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use grs_config::{ConfigError, EX_USAGE};
use grs_control_plane::config::{Config, StoreKind};
use grs_control_plane::github::GitHubRegistrar;
use grs_control_plane::pools::Pools;
use grs_control_plane::server::{self, ControlPlane};
use grs_control_plane::store::{MemoryStore, RedisStore, RedisStoreOptions, Store};
use grs_control_plane::worker::RunnerRegistrar;
use grs_github::GitHubClient;
use grs_provisioner::ProvisionerError;

/// The GRS control plane: gRPC API, durable job queues, dispatcher and
/// teardown workers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The GRS configuration file (TOML). Every key can be overridden by a
    /// GRS_* environment variable, e.g. GRS_REDIS_URL for redis.url.
    #[arg(long, short, env = "GRS_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration and exit (0 when valid, 64 when not).
    #[arg(long)]
    check_config: bool,
}

fn load(args: &Args) -> Result<(Config, Pools), ConfigError> {
    let mut config: Config = grs_config::load(args.config.as_deref())?;
    config.validate()?;
    let pools = Pools::from_config(&config)?;
    Ok((config, pools))
}

fn main() -> ExitCode {
    let args = Args::parse();
    grs_config::process::init_logging();
    let (config, pools) = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("grs-control-plane: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    if args.check_config {
        eprintln!("grs-control-plane: configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("grs-control-plane: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, pools)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<ProvisionerError>()
                .is_some_and(|e| matches!(e, ProvisionerError::Config(_))) =>
        {
            eprintln!("grs-control-plane: invalid configuration: {e:#}");
            ExitCode::from(EX_USAGE as u8)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "control plane failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, pools: Pools) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = match config.control_plane.store {
        StoreKind::Memory => {
            tracing::warn!("using the in-memory store: nothing survives this process");
            Arc::new(MemoryStore::new())
        }
        StoreKind::Redis => {
            let opts = RedisStoreOptions {
                prefix: config.redis.key_prefix.clone(),
                dedup_ttl: config.redis.dedup_ttl,
                job_retention: config.redis.job_retention,
                events_max: config.redis.events_max,
                ..RedisStoreOptions::default()
            };
            let store = RedisStore::new(&config.redis.url, opts)
                .map_err(anyhow::Error::msg)
                .context("redis.url")?;
            if let Err(e) = store.ping().await {
                tracing::warn!(error = %e, "Redis does not answer yet; serving NOT_SERVING until it does");
            }
            Arc::new(store)
        }
    };
    // Check every backend against reality: a missing template or a bad
    // token is the operator's to fix (exit 64); a hypervisor that does not
    // answer yet is not fatal (creates retry until it does).
    for pool in pools.iter() {
        match pool.provisioner.validate_pool(&pool.name).await {
            Ok(()) => {}
            Err(e @ ProvisionerError::Config(_)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("pools.{}.provisioner", pool.name))
                );
            }
            Err(e) => {
                tracing::warn!(pool = %pool.name, error = %e, "provisioner not reachable yet; continuing")
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(config.control_plane.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (control_plane.listen)",
                config.control_plane.listen
            )
        })?;
    let registrar: Option<Arc<dyn RunnerRegistrar>> = match &config.github {
        Some(gh) => {
            let client = GitHubClient::new(gh).context("[github]")?;
            tracing::info!(client = ?client, "runner registrations through GitHub");
            Some(Arc::new(GitHubRegistrar::new(client)))
        }
        None => {
            tracing::warn!("no [github] section: instances get no runner registration from GRS");
            None
        }
    };
    let cp = ControlPlane {
        config,
        store,
        pools,
        registrar,
    };
    server::run(cp, listener, grs_config::process::shutdown_signal()).await?;
    Ok(())
}
