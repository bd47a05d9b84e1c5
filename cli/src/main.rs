//! `grs`: parses the command line, runs the command on a small runtime, and
//! prints any error as one line with its exit code. The work is in the
//! library (`grs::run`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use grs::Command;

fn main() -> ExitCode {
    // Usage errors: clap prints them and exits with 2.
    let cli = grs::Cli::parse();
    // `grs demo` runs the whole system: its logs go to a file (or stderr
    // with --verbose) so the progress display stays readable, and it gets
    // a runtime with a worker per core. Every other command is one client.
    let runtime = if let Command::Demo(args) = &cli.command {
        if let Err(e) = grs::demo::init_logging(args) {
            eprintln!("grs: {e}");
            return ExitCode::FAILURE;
        }
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        grs_config::process::init_logging();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime.context("cannot start the async runtime") {
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
