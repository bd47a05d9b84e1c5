//! `grs-latency`: the latency benchmark of issues 10 and 12 (see
//! `grs_e2e::latency`): cold and warm queued → job started, GRS's own
//! share of the cold path, completed → deleted, PVE API calls per
//! create+delete cycle and two bursts, in one run; prints Markdown; exits 1
//! when a run fails or, with `--check`, when a target is missed.
//!
//! ```text
//! cargo run --release -p grs-e2e --bin grs-latency            # about 5 minutes
//! cargo run --release -p grs-e2e --bin grs-latency -- --smoke # seconds
//! cargo run --release -p grs-e2e --bin grs-latency -- --cold-jobs 0 --warm-jobs 0 --burst-all-jobs 0 --replica-nodes 0  # the first burst only
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grs_e2e::latency::{LatencyOptions, run};

#[derive(Debug, Parser)]
#[command(about = "Measure GRS's latencies on the simulators at realistic task durations")]
struct Args {
    /// The CI-sized run: fast simulated durations, a few jobs.
    #[arg(long)]
    smoke: bool,
    /// Jobs of the cold phase.
    #[arg(long)]
    cold_jobs: Option<usize>,
    /// Jobs of the warm phase.
    #[arg(long)]
    warm_jobs: Option<usize>,
    /// Jobs of the first burst (0: skip it).
    #[arg(long)]
    burst_jobs: Option<usize>,
    /// Jobs of the second burst (0: skip it).
    #[arg(long)]
    burst_all_jobs: Option<usize>,
    /// Nodes of the third burst (the first burst's jobs over that many
    /// nodes, a template copy on each); below 2 skips it.
    #[arg(long)]
    replica_nodes: Option<u32>,
    /// How long each burst job runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    burst_job_duration: Option<Duration>,
    /// From a VM's start to its cloud-init fetch.
    #[arg(long, value_parser = humantime::parse_duration)]
    boot: Option<Duration>,
    /// Exit 1 when a target is missed.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,grs_e2e=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut o = if args.smoke {
        LatencyOptions::smoke()
    } else {
        LatencyOptions::full()
    };
    o.cold_jobs = args.cold_jobs.unwrap_or(o.cold_jobs);
    o.warm_jobs = args.warm_jobs.unwrap_or(o.warm_jobs);
    o.burst_jobs = args.burst_jobs.unwrap_or(o.burst_jobs);
    o.burst_all_jobs = args.burst_all_jobs.unwrap_or(o.burst_all_jobs);
    o.replica_nodes = args.replica_nodes.unwrap_or(o.replica_nodes);
    o.burst_job_duration = args.burst_job_duration.unwrap_or(o.burst_job_duration);
    o.boot = args.boot.unwrap_or(o.boot);
    match run(&o).await {
        Ok(report) => {
            print!("{}", report.markdown());
            if args.check && !report.missed_targets().is_empty() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("grs-latency: {e:#}");
            ExitCode::FAILURE
        }
    }
}
