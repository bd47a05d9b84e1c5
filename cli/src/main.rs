//! `grs`: parses the command line, runs the command on a small runtime, and
//! prints any error as one line with its exit code. The work is in the
//! library (`grs::run`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    // Usage errors: clap prints them and exits with 2.
    let cli = grs::Cli::parse();
    grs_config::process::init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("grs: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    let result = runtime.block_on(grs::run(
        cli,
        &mut stdout,
        grs_config::process::shutdown_signal(),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of a pipe stopped reading (`grs jobs list | head`).
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grs: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
