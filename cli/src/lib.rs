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
//!
//! Start reading at [`run`]. `main.rs` only parses the command line, calls
//! [`run`] with stdout and Ctrl-C, and turns its error into an exit code;
//! tests call [`run`] directly with a buffer, against a real control plane.

pub mod args;
mod client;
mod commands;
pub mod error;
pub mod table;
pub mod view;

use std::future::Future;
use std::io::Write;

pub use args::{Cli, Command};
pub use error::CliError;

/// Runs one command, writing its output to `out`. `shutdown` ends
/// `grs events` (main passes Ctrl-C/SIGTERM); other commands ignore it.
pub async fn run(
    cli: Cli,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let format = cli.global.output;
    // Every command so far talks to the control plane; `grs demo` will not.
    let conn = client::Connection::connect(&cli.global).await?;
    match cli.command {
        Command::Jobs(cmd) => commands::jobs(&conn, cmd, format, out).await?,
        Command::Instances(cmd) => commands::instances(&conn, cmd, format, out).await?,
        Command::Pools(cmd) => commands::pools(&conn, cmd, format, out).await?,
        Command::Stats => commands::stats(&conn, format, out).await?,
        Command::Events(args) => commands::events(&conn, args, format, out, shutdown).await?,
    }
    out.flush()?;
    Ok(())
}
