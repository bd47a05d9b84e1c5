//! `grs-soak`: many jobs through the real binaries with every fault mixed
//! (see `grs_e2e::soak`); prints the faults done, the invariants and the
//! latencies; exits 1 when an invariant fails (the logs are kept and
//! named).
//!
//! ```text
//! cargo run --release -p grs-e2e --bin grs-soak              # 1,000 jobs
//! cargo run --release -p grs-e2e --bin grs-soak -- --jobs 60 --kills 2 --redis-restarts 1
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grs_e2e::soak::{SoakOptions, run};

#[derive(Debug, Parser)]
#[command(
    about = "Soak GRS: jobs with control-plane kills, Redis restarts, PVE and delivery faults"
)]
struct Args {
    /// Jobs GitHub queues.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Jobs queued per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Control-plane replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// The pool's max_instances.
    #[arg(long, default_value_t = 24)]
    max_instances: u32,
    /// Control-plane SIGKILLs (each followed by a restart).
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Redis SIGKILLs (each followed by a restart on its AOF).
    #[arg(long, default_value_t = 3)]
    redis_restarts: usize,
    /// Probability of a clone lock timeout per clone task.
    #[arg(long, default_value_t = 0.2)]
    lock_timeouts: f64,
    /// Share of jobs with a failing clone or start task.
    #[arg(long, default_value_t = 0.05)]
    failing_tasks: f64,
    /// Probability of a duplicated delivery.
    #[arg(long, default_value_t = 0.1)]
    duplicated: f64,
    /// Probability of a reordered delivery.
    #[arg(long, default_value_t = 0.1)]
    reordered: f64,
    /// Probability of a lost delivery (recovered only by GRS's lost-webhook
    /// recovery; 0 by default).
    #[arg(long, default_value_t = 0.0)]
    lost: f64,
    /// How long each job runs.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    job_duration: Duration,
    /// PVE task durations: the realistic defaults times this.
    #[arg(long, default_value_t = 0.1)]
    pve_time_scale: f64,
    /// From a VM's start to its cloud-init fetch.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    boot_delay: Duration,
    /// How long the system gets to settle after the last job.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let opts = SoakOptions {
        jobs: a.jobs,
        rate: a.rate,
        replicas: a.replicas.max(1),
        max_instances: a.max_instances,
        control_plane_kills: a.kills,
        redis_restarts: a.redis_restarts,
        lock_timeouts: a.lock_timeouts,
        failing_tasks: a.failing_tasks,
        duplicated: a.duplicated,
        reordered: a.reordered,
        lost: a.lost,
        job_duration: a.job_duration,
        pve_time_scale: a.pve_time_scale,
        boot_delay: a.boot_delay,
        settle: a.settle,
    };
    println!("{opts:?}");
    match run(&opts).await {
        Ok(Some(result)) => {
            println!("{result}");
            if result.ok() {
                println!("result: OK");
                ExitCode::SUCCESS
            } else {
                println!("result: FAILED");
                ExitCode::FAILURE
            }
        }
        Ok(None) => {
            eprintln!("grs-soak: redis-server is not installed");
            ExitCode::from(69)
        }
        Err(e) => {
            eprintln!("grs-soak: {e:#}");
            println!("result: FAILED");
            ExitCode::FAILURE
        }
    }
}
