//! What can go wrong, phrased for the operator, and the exit code each case
//! gets.
//!
//! Exit codes: 0 success, 1 the control plane answered with an error,
//! 2 a usage error (clap's own, and flag values the CLI rejects later, such
//! as an unreadable `--ca-file`), 69 (`EX_UNAVAILABLE`) the control plane
//! cannot be reached, did not answer in time, or says it cannot serve now:
//! trying again later may help.
//!
//! Every message names the server URL and, for errors the server sent, the
//! gRPC code in words. No message ever contains the bearer token.

use std::error::Error as _;

use tonic::{Code, Status};

/// `EX_UNAVAILABLE` of sysexits.h: the service cannot be reached now.
pub const EX_UNAVAILABLE: u8 = 69;
/// Usage errors, as clap reports its own.
pub const EX_USAGE: u8 = 2;

/// A failed command. Its `Display` is the one line printed after `grs: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag's value cannot be used (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The control plane cannot be reached or cannot serve now (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// The control plane answered with an error (exit 1).
    #[error("{0}")]
    Server(String),
    /// Output could not be written (exit 1; a closed pipe is not reported).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// `grs doctor` found failures (exit 1); the report says which.
    #[error("doctor: {0}")]
    Checks(String),
    /// `grs demo` failed or was interrupted (exit 1, or 130 when
    /// interrupted).
    #[error("demo: {0}")]
    Demo(#[from] crate::demo::DemoError),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EX_USAGE,
            Self::Unavailable(_) => EX_UNAVAILABLE,
            Self::Server(_) | Self::Output(_) | Self::Checks(_) => 1,
            Self::Demo(e) => e.exit_code(),
        }
    }

    /// Whether this is a write to a closed pipe (`grs jobs list | head`),
    /// which is how a reader says it has seen enough: not an error.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// What a call was about, for NOT_FOUND messages (`pool "gpu" not found`).
#[derive(Debug, Clone)]
pub(crate) enum Subject {
    Job(u64),
    Instance(String),
    Pool(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Job(id) => write!(f, "job {id}"),
            Self::Instance(name) => write!(f, "instance {name:?}"),
            Self::Pool(name) => write!(f, "pool {name:?}"),
        }
    }
}

/// A gRPC code in words (`NOT_FOUND` → "not found").
pub(crate) fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The most useful words of a transport error's cause chain: the operating
/// system's reason for a failed connection ("connection refused"), else the
/// innermost cause.
pub(crate) fn transport_detail(err: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = err;
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_words(io);
        }
        innermost = e;
        cur = e.source();
    }
    innermost.to_string()
}

fn io_words(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "connection reset".into(),
        K::ConnectionAborted => "connection aborted".into(),
        K::TimedOut => "connection timed out".into(),
        K::AddrNotAvailable => "address not available".into(),
        _ => {
            // "… (os error 113)" helps nobody at a terminal.
            let s = e.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_owned(),
                None => s,
            }
        }
    }
}

/// Context the error mapping needs besides the status.
#[derive(Debug, Clone)]
pub(crate) struct CallContext<'a> {
    /// The server URL, as the operator gave it.
    pub server: &'a str,
    /// Whether a bearer token was sent (changes the UNAUTHENTICATED advice).
    pub token_given: bool,
}

/// Turns a failed call into the operator's message and exit code.
///
/// A status carrying a source error was made on this side from a transport
/// failure (no connection, reset, TLS): the server could not be reached.
/// A status without one is what the server answered.
pub(crate) fn from_status(
    status: &Status,
    ctx: &CallContext<'_>,
    subject: Option<&Subject>,
) -> CliError {
    let server = ctx.server;
    if let Some(source) = status.source() {
        return CliError::Unavailable(format!(
            "cannot reach the control plane at {server}: {}",
            transport_detail(source)
        ));
    }
    let msg = status.message();
    let words = code_words(status.code());
    match status.code() {
        Code::NotFound if subject.is_some() => {
            let subject = subject.expect("checked");
            CliError::Server(format!(
                "{subject} not found on the control plane at {server}"
            ))
        }
        Code::Unauthenticated if !ctx.token_given => CliError::Server(format!(
            "unauthenticated: missing bearer token — pass --token or set GRS_TOKEN \
             (the control plane at {server} requires one)"
        )),
        Code::Unauthenticated => CliError::Server(format!(
            "unauthenticated: the control plane at {server} rejected the bearer token \
             — check --token or GRS_TOKEN"
        )),
        Code::Unavailable | Code::DeadlineExceeded => CliError::Unavailable(format!(
            "{words}: the control plane at {server} cannot serve now: {msg}"
        )),
        _ => CliError::Server(format!("{words} from the control plane at {server}: {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: CallContext<'static> = CallContext {
        server: "http://cp:50051",
        token_given: false,
    };

    #[test]
    fn not_found_names_what_was_asked_for_and_exits_1() {
        let e = from_status(
            &Status::not_found("pool \"gpu\" is not configured"),
            &CTX,
            Some(&Subject::Pool("gpu".into())),
        );
        assert_eq!(
            e.to_string(),
            "pool \"gpu\" not found on the control plane at http://cp:50051"
        );
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn server_errors_name_the_code_in_words_and_the_server() {
        let e = from_status(&Status::invalid_argument("min_idle too big"), &CTX, None);
        assert_eq!(
            e.to_string(),
            "invalid argument from the control plane at http://cp:50051: min_idle too big"
        );
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn a_server_that_cannot_serve_now_exits_69() {
        let e = from_status(&Status::unavailable("store unavailable: x"), &CTX, None);
        assert_eq!(e.exit_code(), EX_UNAVAILABLE);
        assert!(e.to_string().contains("http://cp:50051"), "{e}");
    }

    #[test]
    fn unauthenticated_says_how_to_pass_a_token() {
        let e = from_status(&Status::unauthenticated("missing"), &CTX, None);
        assert!(
            e.to_string().starts_with(
                "unauthenticated: missing bearer token — pass --token or set GRS_TOKEN"
            ),
            "{e}"
        );
        let ctx = CallContext {
            token_given: true,
            ..CTX
        };
        let e = from_status(&Status::unauthenticated("invalid"), &ctx, None);
        assert!(e.to_string().contains("rejected the bearer token"), "{e}");
    }

    #[test]
    fn os_errors_lose_their_os_error_number() {
        let e = std::io::Error::from_raw_os_error(113); // EHOSTUNREACH
        let words = transport_detail(&e);
        assert!(!words.contains("os error"), "{words}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(transport_detail(&refused), "connection refused");
    }
}
