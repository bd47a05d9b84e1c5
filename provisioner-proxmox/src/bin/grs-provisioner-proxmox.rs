//! `grs-provisioner-proxmox`: the Proxmox VE backend as a provisioner plugin
//! process (`grs.provisioner.v1.Provisioner`, docs/provisioner-plugins.md).
//!
//! ```text
//! grs-provisioner-proxmox serve --config /etc/grs/grs.toml [--listen unix:/PATH | HOST:PORT]
//! ```
//! It reads `[proxmox]` (the connection) and `[control_plane]`
//! `installation_id` / `instance_prefix` (the ownership marker: they must be
//! the control plane's) from the shared GRS configuration file, with the
//! usual `GRS_*` overrides. Pools arrive from GRS as documents
//! (`ValidatePool`). Started by GRS (`type = "plugin"`), it needs no
//! `--listen`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use grs_provisioner_proxmox::{ProxmoxBackend, ProxmoxConfig};

#[derive(Debug, Parser)]
#[command(version)]
enum Cli {
    /// Serve the Proxmox backend as a plugin.
    Serve {
        /// The GRS configuration file (TOML).
        #[arg(long, short, env = "GRS_CONFIG")]
        config: Option<PathBuf>,
        /// `unix:/PATH` or `HOST:PORT`; default: the socket GRS names.
        #[arg(long)]
        listen: Option<String>,
    },
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Sections {
    proxmox: Option<ProxmoxConfig>,
    control_plane: Identity,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Identity {
    installation_id: String,
    instance_prefix: String,
}

impl Default for Identity {
    fn default() -> Self {
        // The control plane's defaults.
        Self {
            installation_id: "grs".into(),
            instance_prefix: "grs".into(),
        }
    }
}

fn main() -> ExitCode {
    let Cli::Serve { config, listen } = Cli::parse();
    grs_config::process::init_logging();
    let sections: Sections = match grs_config::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("grs-provisioner-proxmox: invalid configuration: {e}");
            return ExitCode::from(grs_config::EX_USAGE as u8);
        }
    };
    let Some(conn) = sections.proxmox else {
        eprintln!("grs-provisioner-proxmox: invalid configuration: no [proxmox] section");
        return ExitCode::from(grs_config::EX_USAGE as u8);
    };
    let id = &sections.control_plane;
    let backend = match ProxmoxBackend::new(&conn, &id.installation_id, &id.instance_prefix) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("grs-provisioner-proxmox: invalid configuration: {e}");
            return ExitCode::from(grs_config::EX_USAGE as u8);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("grs-provisioner-proxmox: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(grs_provisioner_grpc::plugin::run_plugin(
        Arc::new(backend),
        env!("CARGO_PKG_VERSION"),
        listen.as_deref(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grs-provisioner-proxmox: {e}");
            ExitCode::FAILURE
        }
    }
}
