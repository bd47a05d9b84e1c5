//! `grs-control-plane`: loads the configuration, builds the store and the
//! pools, and serves until SIGINT/SIGTERM. All the work is in the library;
//! this binary decides which in-process backends exist ([`registry`]:
//! `fake`, and `proxmox` with the `proxmox` feature), and reads their
//! sections (`[proxmox]`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use grs_config::{ConfigError, EX_USAGE};
use grs_control_plane::config::{Config, StoreKind};
use grs_control_plane::github::GitHubRegistrar;
use grs_control_plane::pools::{Pools, ProvisionerRegistry, fake_factory};
use grs_control_plane::server::{self, ControlPlane};
use grs_control_plane::store::{MemoryStore, RedisStore, RedisStoreOptions, Store};
use grs_control_plane::worker::RunnerRegistrar;
use grs_github::GitHubClient;
use grs_provisioner::ProvisionerError;
use grs_provisioner_grpc::plugin::SupervisorOptions;

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

/// The sections of the in-process backends this binary registers.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct BackendSections {
    /// `[proxmox]`: the PVE connection of `type = "proxmox"` pools.
    #[cfg(feature = "proxmox")]
    proxmox: Option<grs_provisioner_proxmox::ProxmoxConfig>,
}

/// The in-process backends, by `type`.
fn registry(config: &Config, sections: BackendSections) -> ProvisionerRegistry {
    #[allow(unused_mut)]
    let mut registry = ProvisionerRegistry::new().with("fake", fake_factory());
    #[cfg(feature = "proxmox")]
    registry.register(
        "proxmox",
        Arc::new(grs_provisioner_proxmox::factory(
            sections.proxmox,
            config.control_plane.installation_id.clone(),
            config.control_plane.instance_prefix.clone(),
        )),
    );
    #[cfg(not(feature = "proxmox"))]
    let _ = (config, sections);
    registry
}

fn load_from(
    file: Option<toml::Table>,
    env: Vec<(String, String)>,
) -> Result<(Config, Pools), ConfigError> {
    let mut config: Config = grs_config::load_from(file.clone(), env.clone())?;
    config.validate()?;
    let sections: BackendSections = grs_config::load_from(file, env)?;
    let pools = Pools::from_config(&config, &registry(&config, sections))?;
    Ok((config, pools))
}

fn load(args: &Args) -> Result<(Config, Pools), ConfigError> {
    let file = match args.config.as_deref() {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?;
            Some(grs_config::parse_file(p, &text)?)
        }
        None => None,
    };
    load_from(file, std::env::vars().collect())
}

fn main() -> ExitCode {
    let args = Args::parse();
    grs_config::process::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("grs-control-plane: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // gRPC clients of plugin pools are made (lazily connecting) in `load`.
    let entered = runtime.enter();
    let (config, pools) = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("grs-control-plane: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    drop(entered);
    if args.check_config {
        if config
            .pools
            .values()
            .any(|p| p.provisioner.as_ref().is_some_and(|p| p.is_remote()))
        {
            eprintln!(
                "grs-control-plane: note: the documents of grpc/plugin pools are checked by their plugin at start-up, not here"
            );
        }
        eprintln!("grs-control-plane: configuration is valid");
        return ExitCode::SUCCESS;
    }
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
            let store = RedisStore::from_config(&config.redis, opts)?;
            if let Err(e) = store.ping().await {
                tracing::warn!(error = %e, "Redis does not answer yet; serving NOT_SERVING until it does");
            }
            Arc::new(store)
        }
    };
    // Plugin processes first: their pools are validated through them.
    let socket_dir = plugin_socket_dir().context("a directory for plugin sockets")?;
    if let Err(e) = pools
        .start_plugins(&socket_dir, &SupervisorOptions::default())
        .await
    {
        pools.stop_plugins().await;
        return Err(anyhow::Error::new(ProvisionerError::Config(e.to_string())));
    }
    let served = serve_pools(config, store, &pools).await;
    pools.stop_plugins().await;
    let _ = std::fs::remove_dir_all(&socket_dir);
    served
}

/// A directory only this process uses (mode 0700) for its plugins' sockets.
fn plugin_socket_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "grs-plugins-{}-{:x}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn serve_pools(config: Config, store: Arc<dyn Store>, pools: &Pools) -> anyhow::Result<()> {
    let pools = pools.clone();
    // Check every backend against reality: a missing template or a bad
    // token is the operator's to fix (exit 64); a hypervisor that does not
    // answer yet is not fatal (creates retry until it does).
    for pool in pools.iter() {
        match pool.provisioner.validate_pool(&pool.name).await {
            // A plugin has now said how the pool bootstraps.
            Ok(()) => grs_control_plane::guest_agent::check_pool(config.github.is_some(), pool)?,
            Err(e @ (ProvisionerError::Config(_) | ProvisionerError::InvalidSpec(_))) => {
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

#[cfg(all(test, feature = "proxmox"))]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<(Config, Pools), ConfigError> {
        let t = grs_config::parse_file(std::path::Path::new("grs.toml"), text)?;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in = rt.enter();
        load_from(Some(t), Vec::new())
    }

    const CONN: &str = "[proxmox]\nurl='https://pve1:8006'\ntoken_id='grs@pve!scaler'\ntoken_secret_file='/etc/hostname'\n";

    #[test]
    fn a_proxmox_pool_reads_its_settings_and_the_connection() {
        // No token secret anywhere: the error says where to put one.
        let e = load(
            "[proxmox]\nurl='https://pve1:8006'\ntoken_id='grs@pve!scaler'\n\
             [pools.linux]\nlabels=['self-hosted']\n[pools.linux.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid=9000\nvlan=20\nbridge='vmbr0'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("proxmox.token") || e.contains("token secret"),
            "{e}"
        );
        let e = load(&format!(
            "{CONN}[pools.linux]\nlabels=['self-hosted']\n[pools.linux.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid=9000\nvlna=20\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pools.linux.provisioner") && e.contains("vlna"),
            "{e}"
        );
        let e = load(&format!(
            "{CONN}[pools.linux]\nlabels=['self-hosted']\n[pools.linux.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid='many'\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("pools.linux.provisioner.template_vmid"), "{e}");
        let (_, pools) = load(&format!(
            "{CONN}[pools.linux]\nlabels=['self-hosted']\n[pools.linux.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid=9000\nvlan=20\nbridge='vmbr0'\n\
             [pools.big]\nlabels=['big']\n[pools.big.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid=9001\n"
        ))
        .unwrap();
        assert_eq!(pools.get("linux").unwrap().provisioner.kind(), "proxmox");
        // One backend (one connection, one placement) for both pools.
        assert_eq!(pools.backends().len(), 1);
        let e = load(
            "[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid=9000\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[proxmox]"), "{e}");
        let e = load("[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='vmware'\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pools.l.provisioner.type") && e.contains("vmware") && e.contains("proxmox"),
            "{e}"
        );
    }

    #[test]
    fn the_examples_commented_proxmox_pool_is_valid_once_uncommented() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grs.toml"))
                .unwrap();
        let tail = &text[text
            .find("# [proxmox]")
            .expect("a commented [proxmox] section")..];
        let tail = &tail[..tail
            .find("# end of the Proxmox example")
            .unwrap_or(tail.len())];
        let uncommented: String = tail
            .lines()
            .filter(|l| !l.starts_with("# #"))
            .map(|l| {
                l.strip_prefix("# ")
                    .or_else(|| l.strip_prefix('#'))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("AA:BB:...:FF", &["AB"; 32].join(":"))
            .replace(
                "token_id = \"grs@pve!scaler\"",
                "token_id = \"grs@pve!scaler\"\ntoken_secret_file = \"/etc/hostname\"",
            );
        let (c, _) = load(&uncommented).unwrap();
        assert_eq!(
            c.pools["proxmox-linux"].provisioner.as_ref().unwrap().kind,
            "proxmox"
        );
    }
}
