//! `grs doctor --config FILE`: checks a real installation against its
//! configuration and says what to fix, one line per check.
//!
//! Expected flow: the file is loaded and validated as the services load it
//! (a bad file is the first failed check, and the only one: every other
//! check needs it); then, in order, Redis ([`redis`]), each Proxmox VE
//! connection and pool ([`pve`]), GitHub ([`github`]) and the gateway
//! ([`gateway`]).
//!
//! Guarantees:
//! - Read-only: nothing is created, changed or deleted anywhere (Redis gets
//!   `PING` and `CONFIG GET`, PVE and GitHub only GETs).
//! - A check whose prerequisite failed is reported as skipped (`-`), never
//!   as passed; the prerequisite's failure already fails the run.
//! - Every network step is bounded by `--timeout`.
//! - No secret is printed: messages name keys, files and URLs.
//!
//! Exit code: 0 when no check failed (warnings, `!`, do not fail), 1 when
//! any did.

mod gateway;
mod github;
mod pve;
mod redis;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use grs_control_plane::config::Config;
use serde::Serialize;

use crate::args::OutputFormat;
use crate::error::CliError;

/// `grs doctor`
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The configuration file the GRS services run with (secrets from their
    /// files or GRS_* variables, as the services read them).
    #[arg(long, short, env = "GRS_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Set up right.
    Pass,
    /// Works, but deserves attention (does not fail the run).
    Warn,
    /// Broken: GRS will not work as configured.
    Fail,
    /// Not checked, because what it depends on failed or is not configured.
    Skip,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Self::Pass => "✓",
            Self::Warn => "!",
            Self::Fail => "✗",
            Self::Skip => "-",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked (`Redis persistence`, `PVE privileges (pool linux)`).
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it, for failures and warnings.
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Pass, detail, None)
    }

    pub(crate) fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(name, Status::Fail, detail, Some(fix.into()))
    }

    pub(crate) fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(name, Status::Warn, detail, Some(fix.into()))
    }

    pub(crate) fn skip(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Skip, detail, None)
    }

    fn new(
        name: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            fix,
        }
    }

    /// `✗ Redis persistence: appendonly is no — fix: ...`
    pub fn line(&self) -> String {
        let mut l = format!("{} {}: {}", self.status.mark(), self.name, self.detail);
        if let Some(fix) = &self.fix {
            l.push_str(" — fix: ");
            l.push_str(fix);
        }
        l
    }
}

/// Bounds one network step by the `--timeout`; a step that takes longer
/// is an error naming what it was waiting for.
pub(crate) async fn bounded<T, E: std::fmt::Display>(
    timeout: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{what}: no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// What the doctor reads of the file besides the control plane's
/// sections: the PVE connection and the gateway.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
struct OtherSections {
    proxmox: Option<grs_provisioner_proxmox::ProxmoxConfig>,
    gateway: grs_webhook_gateway::config::GatewayConfig,
}

/// The loaded configuration.
pub(crate) struct Loaded {
    pub config: Config,
    pub proxmox: Option<grs_provisioner_proxmox::ProxmoxConfig>,
    pub gateway: grs_webhook_gateway::config::GatewayConfig,
}

impl Loaded {
    /// The gateway's public base URL: `gateway.public_url`, else
    /// `control_plane.gateway_url` (what VMs are told), without a trailing
    /// slash; with the key it came from.
    pub fn gateway_url(&self) -> Option<(&'static str, String)> {
        let url = |u: &str| u.trim_end_matches('/').to_owned();
        self.gateway
            .public_url
            .as_deref()
            .map(|u| ("gateway.public_url", url(u)))
            .or_else(|| {
                self.config
                    .control_plane
                    .gateway_url
                    .as_deref()
                    .map(|u| ("control_plane.gateway_url", url(u)))
            })
    }
}

fn load(path: &std::path::Path) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = grs_config::parse_file(path, &text).map_err(|e| e.to_string())?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut config: Config =
        grs_config::load_from(Some(file.clone()), env.clone()).map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    let other: OtherSections = grs_config::load_from(Some(file), env).map_err(|e| e.to_string())?;
    Ok(Loaded {
        config,
        proxmox: other.proxmox,
        gateway: other.gateway,
    })
}

/// Runs every check, prints the report, and fails when a check failed.
pub(crate) async fn run(
    args: DoctorArgs,
    timeout: Duration,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let checks = checks(&args, timeout).await;
    match format {
        OutputFormat::Table => {
            for c in &checks {
                writeln!(out, "{}", c.line())?;
            }
        }
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "checks": checks }))
                .map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 {
        return Err(CliError::Checks(format!(
            "{failed} of {} checks failed (see the lines marked ✗)",
            checks.len()
        )));
    }
    Ok(())
}

/// Every check, in report order.
pub async fn checks(args: &DoctorArgs, timeout: Duration) -> Vec<Check> {
    let path = args.config.display().to_string();
    let loaded = match load(&args.config) {
        Ok(l) => l,
        Err(e) => {
            return vec![Check::fail(
                "configuration",
                e,
                format!("correct {path} (the key named above), then run grs doctor again"),
            )];
        }
    };
    let pools: Vec<&str> = loaded.config.pools.keys().map(String::as_str).collect();
    let mut out = vec![Check::pass(
        "configuration",
        format!(
            "{path} is valid ({} pools: {})",
            pools.len(),
            pools.join(", ")
        ),
    )];
    out.extend(redis::checks(&loaded.config, timeout).await);
    out.extend(pve::checks(&loaded, timeout).await);
    out.extend(github::checks(&loaded, timeout).await);
    out.extend(gateway::checks(&loaded, timeout).await);
    out
}
