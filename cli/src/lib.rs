//! `grs`: the operator CLI of GRS (GitHub Runner Scaler), over the control
//! plane's gRPC API (`grs.v1.ControlPlane`).
//!
//! Modules:
//! - [`args`]: the command line (clap): global flags and subcommands.
//! - `client`: connecting (URL, TLS, bearer token, timeouts) and calling
//!   the API.
//! - `commands`: one function per subcommand.
//! - [`error`]: [`CliError`], the one-line messages and the exit codes
//!   (1 server error, 2 usage, 69 control plane unreachable).
//! - [`view`]: the JSON form of the API's messages (`--output json`).
//! - [`table`]: tables, details and human times (`--output table`).
//! - [`demo`]: `grs demo`, the whole system in one process on simulators
//!   ([`demo::System`] is also how the end-to-end tests assemble it).
//! - [`top`]: `grs top`, a live view from `WatchEvents` and `GetStats`.
//! - [`doctor`]: `grs doctor`, checks of a real installation (Redis, PVE,
//!   GitHub, gateway), one line each.
//!
//! Start reading at [`run`]. `main.rs` only parses the command line, calls
//! [`run`] with stdout and Ctrl-C, and turns its error into an exit code;
//! tests call [`run`] directly with a buffer, against a real control plane.

pub mod args;
mod client;
mod commands;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod table;
pub mod top;
pub mod view;

use std::future::Future;
use std::io::{IsTerminal, Write};

use clap::CommandFactory;

pub use args::{Cli, Command};
pub use error::CliError;

/// Runs one command, writing its output to `out`. `shutdown` ends
/// `grs events` and `grs demo` (main passes Ctrl-C/SIGTERM); other commands
/// ignore it.
pub async fn run(
    cli: Cli,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let format = cli.global.output;
    // `grs demo` runs its own control plane; every other command talks to
    // one. Its log file is set up by `main` (before the runtime).
    let global = &cli.global;
    let connect = || client::Connection::connect(global);
    match cli.command {
        Command::Jobs(cmd) => commands::jobs(&connect().await?, cmd, format, out).await?,
        Command::Instances(cmd) => commands::instances(&connect().await?, cmd, format, out).await?,
        Command::Pools(cmd) => commands::pools(&connect().await?, cmd, format, out).await?,
        Command::Stats => commands::stats(&connect().await?, format, out).await?,
        Command::Events(args) => {
            commands::events(&connect().await?, args, format, out, shutdown).await?
        }
        Command::Top(args) => {
            // Interactive only on a terminal (both ends: keys come in on
            // stdin); `out` is then left alone and the screen drawn.
            let terminal =
                !args.once && std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
            top::run(&connect().await?, args, format, out, shutdown, terminal).await?
        }
        Command::Doctor(args) => doctor::run(args, global.timeout, format, out).await?,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "grs", out);
        }
        Command::Demo(args) => {
            let log_file = (!args.verbose).then(|| args.log_path());
            demo::run(args, format, log_file, out, shutdown).await?
        }
    }
    out.flush()?;
    Ok(())
}
