//! The command line: global flags and subcommands (clap derive).
//!
//! Parsing does no I/O; flag values that need it (`--ca-file`, the token's
//! format) are checked when connecting, so that `grs demo` — which needs no
//! server — can be added as one more subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use grs_proto::v1 as pb;

/// Where the CLI looks for the control plane unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Operate GRS (GitHub Runner Scaler): inspect jobs, instances and pools,
/// change pools, and watch transitions, over the control plane's gRPC API.
#[derive(Debug, Parser)]
#[command(name = "grs", version, propagate_version = true)]
pub struct Cli {
    /// Flags every subcommand takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes (before or after the subcommand).
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// The control plane's gRPC URL: http://HOST:PORT, or https://HOST:PORT
    /// for TLS (checked against the system's roots, or --ca-file).
    #[arg(long, env = "GRS_SERVER", default_value = DEFAULT_SERVER,
          value_parser = parse_server, global = true)]
    pub server: String,

    /// PEM file with the CA certificate(s) to trust for an https:// server,
    /// instead of the system's roots.
    #[arg(long, env = "GRS_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Bearer token for a control plane that requires one (sent as
    /// `authorization: Bearer <token>`, never printed). Prefer GRS_TOKEN:
    /// command lines are visible to other users.
    #[arg(long, env = "GRS_TOKEN", hide_env_values = true, global = true,
          value_parser = |s: &str| Ok::<_, std::convert::Infallible>(Token(s.to_owned())))]
    pub token: Option<Token>,

    /// Output format: aligned tables for people, or JSON for programs (one
    /// document; `grs events` writes one object per line).
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,

    /// How long to wait for the connection and for each answer (e.g. 10s,
    /// 1m). `grs events` waits for events without limit.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub timeout: Duration,
}

/// A bearer token. Its `Debug` does not show it, so neither can logs nor
/// error messages.
#[derive(Clone)]
pub struct Token(pub(crate) String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns and human times.
    Table,
    /// JSON with the proto's field names; states as lower snake_case names
    /// without prefix; times as RFC 3339 UTC.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// GitHub Actions jobs GRS recorded.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// The short-lived VMs GRS made for jobs.
    #[command(subcommand)]
    Instances(InstancesCommand),
    /// Pools: labels served by a provisioner, with a capacity.
    #[command(subcommand)]
    Pools(PoolsCommand),
    /// Queue depths, and capacity in use per pool.
    Stats,
    /// Stream job and instance transitions as they happen, until Ctrl-C.
    Events(EventsArgs),
    /// Run the whole of GRS in this process against a simulated Proxmox VE
    /// and GitHub, fire jobs through it, show progress and a summary. Talks
    /// to no server: the connection options do not apply (--output json
    /// prints the summary as JSON).
    Demo(crate::demo::DemoArgs),
}

/// `grs jobs ...`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List(ListJobsArgs),
    /// Show one job.
    Get {
        /// The GitHub job id (`workflow_job.id`).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
}

/// `grs jobs list`
#[derive(Debug, Args)]
pub struct ListJobsArgs {
    /// Only jobs of this pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub state: Option<JobStateArg>,
    /// Jobs per page (the server's default is 100; at most 1000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Follow every page instead of showing the first.
    #[arg(long)]
    pub all: bool,
    /// Start at this page (the `next_page_token` of an earlier answer).
    #[arg(long)]
    pub page_token: Option<String>,
}

/// `--state`: the proto's `JobState` names, lower snake_case, no prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum JobStateArg {
    /// Waiting on deployment protection.
    Waiting,
    /// In the provision queue.
    Queued,
    /// No pool serves its labels.
    Unrouted,
    /// Its instance is being created.
    Provisioning,
    /// Its instance exists; no runner took it yet.
    Provisioned,
    /// A runner runs it.
    #[value(alias = "in-progress")]
    InProgress,
    /// GitHub says it ended.
    Completed,
    /// Provisioning failed for good.
    Failed,
}

impl JobStateArg {
    /// The proto value.
    pub fn to_proto(self) -> pb::JobState {
        match self {
            Self::Waiting => pb::JobState::Waiting,
            Self::Queued => pb::JobState::Queued,
            Self::Unrouted => pb::JobState::Unrouted,
            Self::Provisioning => pb::JobState::Provisioning,
            Self::Provisioned => pb::JobState::Provisioned,
            Self::InProgress => pb::JobState::InProgress,
            Self::Completed => pb::JobState::Completed,
            Self::Failed => pb::JobState::Failed,
        }
    }
}

/// `grs instances ...`
#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// List instances (live ones unless --include-deleted).
    List {
        /// Only instances of this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Also show deleted instances the control plane still remembers.
        #[arg(long)]
        include_deleted: bool,
    },
    /// Show one instance.
    Get {
        /// The instance name (`<prefix>-<job id>`, also its runner's name).
        name: String,
    },
    /// Queue an instance for teardown: stop and delete its VM, free its slot.
    Delete {
        /// The instance name.
        name: String,
    },
}

/// `grs pools ...`
#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// List pools with their live settings and usage.
    List,
    /// Show one pool.
    Get {
        /// The pool name (`[pools.<name>]` in the configuration).
        name: String,
    },
    /// Stop starting instances for a pool (jobs still queue).
    Pause {
        /// The pool name.
        name: String,
    },
    /// Start instances for a paused pool again.
    Resume {
        /// The pool name.
        name: String,
    },
    /// Change a pool's live capacity settings.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
    Set {
        /// The pool name.
        name: String,
        /// Idle instances to keep ready.
        #[arg(long, group = "change")]
        min_idle: Option<u32>,
        /// Most live instances at once.
        #[arg(long, group = "change")]
        max_instances: Option<u32>,
    },
}

/// `grs events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events of this pool.
    #[arg(long)]
    pub pool: Option<String>,
}

/// Checks `--server`: an http:// or https:// URL with a host.
fn parse_server(s: &str) -> Result<String, String> {
    let hint = "use http://HOST:PORT, or https://HOST:PORT for TLS";
    let uri: tonic::codegen::http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}); {hint}"))?;
    let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some(scheme @ ("http" | "https")) => scheme.to_owned(),
        Some(other) => return Err(format!("scheme {other}:// is not supported; {hint}")),
        None => return Err(format!("{s:?} has no scheme; {hint}")),
    };
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(format!("{s:?} has no host; {hint}"));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{s:?} has a path; the gRPC API is served at the root; {hint}"
        ));
    }
    // Normalized (lower-case scheme, no trailing slash): connecting decides
    // on TLS by the `https://` prefix, and messages show this form.
    Ok(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_urls_need_an_http_scheme_and_a_host() {
        assert_eq!(
            parse_server("http://127.0.0.1:50051/").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            parse_server("HTTPS://cp.example:443").unwrap(),
            "https://cp.example:443"
        );
        assert!(parse_server("127.0.0.1:50051").is_err());
        assert!(parse_server("ftp://cp:21").is_err());
        assert!(parse_server("http://cp:1/api").is_err());
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let a = Cli::try_parse_from(["grs", "-o", "json", "stats"]).unwrap();
        let b = Cli::try_parse_from(["grs", "stats", "--output", "json"]).unwrap();
        assert_eq!(a.global.output, OutputFormat::Json);
        assert_eq!(b.global.output, OutputFormat::Json);
    }

    #[test]
    fn states_are_the_proto_names_in_snake_case() {
        let c = Cli::try_parse_from(["grs", "jobs", "list", "--state", "in_progress"]).unwrap();
        let Command::Jobs(JobsCommand::List(args)) = c.command else {
            panic!("parsed {c:?}");
        };
        assert_eq!(args.state, Some(JobStateArg::InProgress));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let c = Cli::try_parse_from(["grs", "--token", "s3cr3t", "stats"]).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn pools_set_needs_something_to_change() {
        assert!(Cli::try_parse_from(["grs", "pools", "set", "linux"]).is_err());
        assert!(Cli::try_parse_from(["grs", "pools", "set", "linux", "--min-idle", "1"]).is_ok());
    }
}
