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
#[command(
    name = "grs",
    version,
    propagate_version = true,
    after_help = "Examples:
  grs stats                                 # queue depths and capacity in use
  grs top                                   # live view until q or Ctrl-C
  grs --server https://cp.example:50051 --ca-file ca.pem jobs list
  GRS_TOKEN=... grs pools pause linux
  grs doctor --config /etc/grs/grs.toml     # is this installation set up right?
  grs completions bash > /etc/bash_completion.d/grs"
)]
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
    #[command(
        subcommand,
        after_help = "Examples:
  grs jobs list --state queued
  grs jobs get 4711"
    )]
    Jobs(JobsCommand),
    /// The short-lived VMs GRS made for jobs.
    #[command(
        subcommand,
        after_help = "Examples:
  grs instances list --pool linux
  grs instances delete grs-4711"
    )]
    Instances(InstancesCommand),
    /// Pools: labels served by a provisioner, with a capacity.
    #[command(
        subcommand,
        after_help = "Examples:
  grs pools list
  grs pools set linux --max-instances 8"
    )]
    Pools(PoolsCommand),
    /// Queue depths, and capacity in use per pool.
    #[command(after_help = "Examples:
  grs stats
  grs stats -o json")]
    Stats,
    /// Stream job and instance transitions as they happen, until Ctrl-C.
    #[command(after_help = "Examples:
  grs events                                # every pool, until Ctrl-C
  grs events --pool linux -o json           # one JSON object per line")]
    Events(EventsArgs),
    /// A live view of pools, queues and instances, redrawn on every event
    /// (WatchEvents) and every --interval (GetStats); q, Ctrl-C or SIGTERM
    /// end it. When stdout is not a terminal, prints a snapshot each time
    /// instead (or one with --once).
    #[command(after_help = "Examples:
  grs top
  grs top --pool linux --interval 5s
  grs top --once                            # one snapshot, then exit")]
    Top(crate::top::TopArgs),
    /// Check a real installation against its configuration file: Redis
    /// (reachable, persistent), the PVE API (TLS pin, token privileges,
    /// templates), GitHub (credentials, permissions, webhook) and the
    /// gateway. One line per check, with the fix for each failure; exit
    /// code 1 when any check fails. Talks to no control plane.
    #[command(after_help = "Examples:
  grs doctor --config /etc/grs/grs.toml
  GRS_PROXMOX_TOKEN_SECRET=... grs doctor --config grs.toml --timeout 5s")]
    Doctor(crate::doctor::DoctorArgs),
    /// Print a shell completion script for grs to stdout.
    #[command(after_help = "Examples:
  grs completions bash > /etc/bash_completion.d/grs
  grs completions zsh > \"${fpath[1]}/_grs\"
  grs completions fish > ~/.config/fish/completions/grs.fish")]
    Completions {
        /// The shell to write the script for.
        shell: clap_complete::Shell,
    },
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
    #[command(after_help = "Examples:
  grs jobs list --state queued --pool linux
  grs jobs list --all -o json")]
    List(ListJobsArgs),
    /// Show one job.
    #[command(after_help = "Examples:
  grs jobs get 4711
  grs jobs get 4711 -o json")]
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
    #[command(after_help = "Examples:
  grs instances list
  grs instances list --pool linux --include-deleted")]
    List {
        /// Only instances of this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Also show deleted instances the control plane still remembers.
        #[arg(long)]
        include_deleted: bool,
    },
    /// Show one instance.
    #[command(after_help = "Examples:
  grs instances get grs-4711")]
    Get {
        /// The instance name (`<prefix>-<job id>`, also its runner's name).
        name: String,
    },
    /// Queue an instance for teardown: stop and delete its VM, free its slot.
    #[command(after_help = "Examples:
  grs instances delete grs-4711")]
    Delete {
        /// The instance name.
        name: String,
    },
}

/// `grs pools ...`
#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// List pools with their live settings and usage.
    #[command(after_help = "Examples:
  grs pools list
  grs pools list -o json")]
    List,
    /// Show one pool.
    #[command(after_help = "Examples:
  grs pools get linux")]
    Get {
        /// The pool name (`[pools.<name>]` in the configuration).
        name: String,
    },
    /// Stop starting instances for a pool (jobs still queue).
    #[command(after_help = "Examples:
  grs pools pause linux")]
    Pause {
        /// The pool name.
        name: String,
    },
    /// Start instances for a paused pool again.
    #[command(after_help = "Examples:
  grs pools resume linux")]
    Resume {
        /// The pool name.
        name: String,
    },
    /// Change a pool's live capacity settings.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)),
              after_help = "Examples:
  grs pools set linux --max-instances 8
  grs pools set linux --min-idle 2 --max-instances 16")]
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

    /// Every command, subcommands of subcommands included, with its path
    /// (`grs pools set`).
    fn every_command() -> Vec<(String, clap::Command)> {
        fn walk(prefix: &str, c: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
            let path = format!("{prefix} {}", c.get_name()).trim().to_owned();
            out.push((path.clone(), c.clone()));
            for sub in c.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(&path, sub, out);
            }
        }
        let mut out = Vec::new();
        walk("", &Cli::command(), &mut out);
        out
    }

    #[test]
    fn every_command_has_an_examples_section_in_its_help() {
        let all = every_command();
        assert!(all.len() > 15, "{} commands", all.len());
        for (path, mut c) in all {
            let help = c.render_long_help().to_string();
            let examples = help
                .split_once("Examples:\n")
                .map(|(_, e)| e)
                .unwrap_or_else(|| panic!("`{path} --help` has no Examples section:\n{help}"));
            // Each example is a `grs ...` command line (after any
            // environment assignments) of this very command.
            let first = examples.lines().next().unwrap_or_default().trim();
            let command = first
                .split_whitespace()
                .skip_while(|w| w.contains('='))
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                command.starts_with("grs"),
                "`{path}`: first example {first:?}"
            );
        }
    }

    #[test]
    fn the_examples_parse_as_command_lines() {
        for (path, mut c) in every_command() {
            let help = c.render_long_help().to_string();
            let Some((_, examples)) = help.split_once("Examples:\n") else {
                continue;
            };
            for line in examples.lines().filter(|l| !l.trim().is_empty()) {
                // Drop the comment, the redirection and env assignments.
                let line = line.split(" # ").next().unwrap_or_default();
                let line = line.split(" > ").next().unwrap_or_default();
                let words: Vec<&str> = line
                    .split_whitespace()
                    .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                    .collect();
                if words.first() != Some(&"grs") {
                    continue;
                }
                if let Err(e) = Cli::try_parse_from(&words) {
                    panic!("`{path}` example {line:?} does not parse: {e}");
                }
            }
        }
    }

    #[test]
    fn pools_set_needs_something_to_change() {
        assert!(Cli::try_parse_from(["grs", "pools", "set", "linux"]).is_err());
        assert!(Cli::try_parse_from(["grs", "pools", "set", "linux", "--min-idle", "1"]).is_ok());
    }
}
