//! `grs-github-sim`: the GitHub simulator as a process, for the end-to-end
//! harness (see `grs_e2e::github`). Secrets come from the environment:
//! `GRS_WEBHOOK_SECRET` (deliveries are signed with it) and
//! `GRS_GITHUB_TOKEN` (the personal access token the API accepts).
//!
//! ```text
//! grs-github-sim --gateway http://127.0.0.1:8080/webhook --job-duration 300ms
//! ```
//! Prints `api: URL` and `control: URL`, then serves until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "The GitHub simulator, with a delivery relay and a control API")]
struct Args {
    /// A gateway's webhook URL (repeatable; deliveries fail over in order).
    #[arg(long = "gateway")]
    gateways: Vec<String>,
    /// How long a job runs once a runner took it.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    job_duration: std::time::Duration,
    /// API calls an hour the primary rate limit allows (GitHub: 5,000 for
    /// a PAT, up to 15,000 for an App installation on Enterprise Cloud).
    #[arg(long, default_value_t = 5000)]
    rate_limit: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let webhook_secret =
        std::env::var("GRS_WEBHOOK_SECRET").context("GRS_WEBHOOK_SECRET is not set")?;
    let pat = std::env::var("GRS_GITHUB_TOKEN").context("GRS_GITHUB_TOKEN is not set")?;
    grs_e2e::github::serve(
        grs_e2e::github::ServeOptions {
            webhook_secret,
            pat,
            job_duration: args.job_duration,
            targets: args.gateways,
            rate_limit: args.rate_limit,
        },
        grs_config::process::shutdown_signal(),
    )
    .await
}
