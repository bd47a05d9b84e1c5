//! Plugin processes, as HashiCorp's go-plugin runs them.
//!
//! # The contract between GRS and a plugin executable
//! 1. GRS starts the command with `GRS_PLUGIN_PROTOCOL=1` and
//!    `GRS_PLUGIN_SOCKET=<path>` (a unix socket path in a directory only
//!    this GRS process uses) in its environment, stdin and stdout piped.
//! 2. The plugin listens (on that socket, or any address it likes) and then
//!    prints ONE line on stdout, its handshake line:
//!    `grs-plugin|<protocol version>|<network>|<address>`, e.g.
//!    `grs-plugin|1|unix|/tmp/grs-plugins-123/p0.sock` or
//!    `grs-plugin|1|tcp|127.0.0.1:7301`. GRS connects there.
//! 3. Everything the plugin writes on stderr (and on stdout after the
//!    handshake line) becomes a GRS log line naming the plugin.
//! 4. The plugin exits when its stdin reaches end-of-file: GRS closes it
//!    to stop the plugin (then waits `stop_grace`, then kills it), and a
//!    plugin never outlives a GRS that died.
//! 5. A plugin that exits on its own (crash) is started again after a
//!    backoff (1 s doubling to 30 s, back to 1 s after a minute of uptime).
//!    It forgets its pools; GRS sends their documents again when it answers
//!    NOT_FOUND.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grs_provisioner::Provisioner;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::PROTOCOL_VERSION;
use crate::client::{Address, Target};

/// The environment variable naming the socket GRS wants the plugin on.
pub const SOCKET_ENV: &str = "GRS_PLUGIN_SOCKET";
/// The environment variable carrying the protocol version GRS speaks.
pub const PROTOCOL_ENV: &str = "GRS_PLUGIN_PROTOCOL";
/// The first field of the handshake line.
pub const HANDSHAKE_TAG: &str = "grs-plugin";

/// Why a plugin could not be started or served.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin did not come up (bad command, bad handshake line, exit).
    #[error("plugin {name}: {source}")]
    Start {
        /// The plugin's name (its command).
        name: String,
        /// What went wrong.
        #[source]
        source: PluginDown,
    },
    /// Plugin side: no address to listen on (neither `--listen` nor
    /// [`SOCKET_ENV`] from GRS).
    #[error(
        "plugin: this is a GRS provisioner plugin: give --listen ADDR, or let GRS start it (it sets {SOCKET_ENV})"
    )]
    NoListenAddress,
    /// Plugin side: serving failed.
    #[error("plugin: {0}")]
    Serve(#[from] crate::ServeError),
    /// An I/O error (plugin side).
    #[error("plugin: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a supervised plugin is not running: its last start failed, or its
/// process exited. (I/O errors are shared: a state is cloned to every
/// watcher.)
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginDown {
    /// The configured command is empty.
    #[error("the command is empty")]
    EmptyCommand,
    /// The program could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Its stdout could not be read.
    #[error("no stdout")]
    NoStdout,
    /// It exited before printing its handshake line.
    #[error("exited before printing its handshake line{}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    ExitedBeforeHandshake {
        /// How it exited, when known.
        status: Option<std::process::ExitStatus>,
    },
    /// Its stdout failed while GRS read the handshake line.
    #[error("reading its handshake line: {0}")]
    ReadHandshake(#[source] Arc<std::io::Error>),
    /// No handshake line within the start timeout.
    #[error("printed no handshake line within {0:?}")]
    NoHandshake(Duration),
    /// A handshake line GRS cannot use.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Waiting for the process failed.
    #[error("waiting for the process: {0}")]
    Wait(#[source] Arc<std::io::Error>),
    /// The process exited.
    #[error("exited ({0})")]
    Exited(std::process::ExitStatus),
    /// Stopped on request (shutdown).
    #[error("stopped")]
    Stopped,
    /// The supervisor is gone.
    #[error("the supervisor ended")]
    SupervisorEnded,
    /// Not running when the caller's wait ran out.
    #[error("not running after {0:?}")]
    NotRunningAfter(Duration),
}

/// A handshake line GRS cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not `grs-plugin|<version>|<network>|<address>`.
    #[error(
        "expected the handshake line `{HANDSHAKE_TAG}|{PROTOCOL_VERSION}|unix|/path`, got {line:?}"
    )]
    Malformed {
        /// The line as printed (trimmed).
        line: String,
    },
    /// Another protocol version.
    #[error(
        "the plugin speaks protocol version {version}; this GRS speaks version {PROTOCOL_VERSION}"
    )]
    Version {
        /// The version the plugin printed.
        version: String,
    },
    /// A network or address GRS does not connect to.
    #[error(
        "unsupported network {network:?} or address {address:?} in the handshake line (unix:/absolute/path or tcp:host:port)"
    )]
    Address {
        /// The network field.
        network: String,
        /// The address field.
        address: String,
    },
}

/// Parses a handshake line into the address to connect to.
pub fn parse_handshake(line: &str) -> Result<Address, HandshakeError> {
    let line = line.trim();
    let parts: Vec<&str> = line.splitn(4, '|').collect();
    let malformed = || HandshakeError::Malformed {
        line: line.to_owned(),
    };
    let [tag, version, network, address] = parts[..] else {
        return Err(malformed());
    };
    if tag != HANDSHAKE_TAG {
        return Err(malformed());
    }
    if version != PROTOCOL_VERSION.to_string() {
        return Err(HandshakeError::Version {
            version: version.to_owned(),
        });
    }
    match network {
        "unix" if address.starts_with('/') => Ok(Address::Unix(PathBuf::from(address))),
        "tcp" if !address.is_empty() => Ok(Address::Uri(format!("http://{address}"))),
        _ => Err(HandshakeError::Address {
            network: network.to_owned(),
            address: address.to_owned(),
        }),
    }
}

/// The command line of a plugin and its environment.
#[derive(Debug, Clone)]
pub struct PluginCommand {
    /// Program and arguments (at least the program).
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// Timings of the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// How long a started plugin has to print its handshake line.
    pub start_timeout: Duration,
    /// First delay before a restart; doubles up to `backoff_max`.
    pub backoff: Duration,
    /// Longest delay before a restart.
    pub backoff_max: Duration,
    /// A plugin that ran this long resets the backoff when it exits.
    pub stable_after: Duration,
    /// How long a plugin gets to exit after its stdin is closed.
    pub stop_grace: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        Self {
            start_timeout: Duration::from_secs(30),
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Where a supervised plugin stands.
#[derive(Debug, Clone)]
pub enum PluginState {
    /// Being started (first time or after a crash).
    Starting,
    /// Serving; the pid of its process.
    Running(u32),
    /// The last start failed or the process exited; a restart is pending.
    Failed(PluginDown),
    /// Stopped for good (shutdown).
    Stopped,
}

/// A supervised plugin process.
#[derive(Debug)]
pub struct Plugin {
    name: String,
    address: Arc<Mutex<Option<Address>>>,
    state: watch::Receiver<PluginState>,
    starts: Arc<AtomicU64>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Plugin {
    /// Starts supervising `cmd`, asking it to listen on `socket`. Returns at
    /// once; see [`wait_running`](Self::wait_running).
    pub fn spawn(cmd: PluginCommand, socket: PathBuf, opts: SupervisorOptions) -> Self {
        Self::spawn_into(cmd, socket, opts, Arc::new(Mutex::new(None)))
    }

    /// [`spawn`](Self::spawn), publishing the plugin's address in `address`
    /// (a cell a [`Target::Plugin`] client already reads).
    pub fn spawn_into(
        cmd: PluginCommand,
        socket: PathBuf,
        opts: SupervisorOptions,
        address: Arc<Mutex<Option<Address>>>,
    ) -> Self {
        let name = cmd
            .command
            .first()
            .map(|p| {
                Path::new(p)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| p.clone())
            })
            .unwrap_or_default();
        let (tx, rx) = watch::channel(PluginState::Starting);
        let starts = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let sup = Supervisor {
            name: name.clone(),
            cmd,
            socket,
            opts,
            address: address.clone(),
            state: tx,
            starts: starts.clone(),
            stop: stop.clone(),
        };
        let task = tokio::spawn(sup.run());
        Self {
            name,
            address,
            state: rx,
            starts,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// The plugin's name (its program's file name), for logs and errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where a client connects: the plugin's current address.
    pub fn target(&self) -> Target {
        Target::Plugin(self.address.clone())
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// The current state.
    pub fn state(&self) -> PluginState {
        self.state.borrow().clone()
    }

    /// A receiver of the plugin's state changes.
    pub fn state_watch(&self) -> watch::Receiver<PluginState> {
        self.state.clone()
    }

    /// Waits until the plugin runs; fails on its first failed start (or
    /// after `timeout`), with the reason.
    pub async fn wait_running(&self, timeout: Duration) -> Result<u32, PluginError> {
        let mut rx = self.state.clone();
        Self::wait_running_on(&mut rx, timeout)
            .await
            .map_err(|source| PluginError::Start {
                name: self.name.clone(),
                source,
            })
    }

    /// [`wait_running`](Self::wait_running) on a state receiver; the error
    /// is the reason alone.
    pub async fn wait_running_on(
        rx: &mut watch::Receiver<PluginState>,
        timeout: Duration,
    ) -> Result<u32, PluginDown> {
        let wait = async {
            loop {
                match rx.borrow_and_update().clone() {
                    PluginState::Running(pid) => return Ok(pid),
                    PluginState::Failed(why) => return Err(why),
                    PluginState::Stopped => return Err(PluginDown::Stopped),
                    PluginState::Starting => {}
                }
                if rx.changed().await.is_err() {
                    return Err(PluginDown::SupervisorEnded);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(PluginDown::NotRunningAfter(timeout)))
    }

    /// Waits until the plugin has been started `n` times and runs (tests:
    /// a restart after a crash).
    pub async fn wait_started(&self, n: u64) {
        let mut rx = self.state.clone();
        loop {
            if self.starts() >= n && matches!(*rx.borrow_and_update(), PluginState::Running(_)) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops the plugin (stdin closed, then killed after the grace period)
    /// and the supervisor. Idempotent.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

struct Supervisor {
    name: String,
    cmd: PluginCommand,
    socket: PathBuf,
    opts: SupervisorOptions,
    address: Arc<Mutex<Option<Address>>>,
    state: watch::Sender<PluginState>,
    starts: Arc<AtomicU64>,
    stop: CancellationToken,
}

/// Forwards each line of `r` to the log, naming the plugin.
fn forward_lines<R: AsyncRead + Unpin + Send + 'static>(
    name: String,
    stream: &'static str,
    r: BufReader<R>,
) {
    tokio::spawn(async move {
        let mut lines = r.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "grs::plugin", plugin = %name, stream, "{line}");
        }
    });
}

impl Supervisor {
    fn set(&self, s: PluginState) {
        self.state.send_replace(s);
    }

    async fn run(self) {
        let mut backoff = self.opts.backoff;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            self.set(PluginState::Starting);
            let started = Instant::now();
            let outcome = self.run_once().await;
            *self.address.lock().unwrap() = None;
            let why = match outcome {
                Ok(None) => break,
                Ok(Some(status)) => PluginDown::Exited(status),
                Err(why) => why,
            };
            if started.elapsed() >= self.opts.stable_after {
                backoff = self.opts.backoff;
            }
            tracing::warn!(plugin = %self.name, reason = %why, restart_in_ms = backoff.as_millis() as u64, "provisioner plugin is down; restarting it");
            self.set(PluginState::Failed(why));
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.opts.backoff_max);
        }
        let _ = std::fs::remove_file(&self.socket);
        self.set(PluginState::Stopped);
    }

    /// One life of the process. `Ok(None)`: stopped on request;
    /// `Ok(Some(status))`: it exited; `Err`: it did not come up.
    async fn run_once(&self) -> Result<Option<std::process::ExitStatus>, PluginDown> {
        let Some((program, args)) = self.cmd.command.split_first() else {
            return Err(PluginDown::EmptyCommand);
        };
        let _ = std::fs::remove_file(&self.socket);
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .envs(self.cmd.env.iter().cloned())
            .env(SOCKET_ENV, &self.socket)
            .env(PROTOCOL_ENV, PROTOCOL_VERSION.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| PluginDown::Spawn {
                program: program.clone(),
                source: Arc::new(e),
            })?;
        self.starts.fetch_add(1, Ordering::Relaxed);
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take();
        if let Some(err) = child.stderr.take() {
            forward_lines(self.name.clone(), "stderr", BufReader::new(err));
        }
        let Some(out) = child.stdout.take() else {
            return Err(PluginDown::NoStdout);
        };
        let mut out = BufReader::new(out);
        let mut line = String::new();
        let read = tokio::select! {
            _ = self.stop.cancelled() => {
                self.stop_child(child, stdin).await;
                return Ok(None);
            }
            r = tokio::time::timeout(self.opts.start_timeout, out.read_line(&mut line)) => r,
        };
        let address = match read {
            Ok(Ok(n)) if n > 0 => parse_handshake(&line).map_err(PluginDown::from),
            Ok(Ok(_)) => Err(PluginDown::ExitedBeforeHandshake { status: None }),
            Ok(Err(e)) => Err(PluginDown::ReadHandshake(Arc::new(e))),
            Err(_) => Err(PluginDown::NoHandshake(self.opts.start_timeout)),
        };
        let address = match address {
            Ok(a) => a,
            Err(why) => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                return Err(match why {
                    PluginDown::ExitedBeforeHandshake { .. } => PluginDown::ExitedBeforeHandshake {
                        status: status.filter(|s| !s.success()),
                    },
                    why => why,
                });
            }
        };
        forward_lines(self.name.clone(), "stdout", out);
        tracing::info!(plugin = %self.name, pid, %address, "provisioner plugin running");
        *self.address.lock().unwrap() = Some(address);
        self.set(PluginState::Running(pid));
        tokio::select! {
            _ = self.stop.cancelled() => {
                self.stop_child(child, stdin).await;
                Ok(None)
            }
            status = child.wait() => match status {
                Ok(s) => Ok(Some(s)),
                Err(e) => Err(PluginDown::Wait(Arc::new(e))),
            },
        }
    }

    /// Closes stdin, waits the grace period, kills.
    async fn stop_child(
        &self,
        mut child: tokio::process::Child,
        stdin: Option<tokio::process::ChildStdin>,
    ) {
        drop(stdin);
        match tokio::time::timeout(self.opts.stop_grace, child.wait()).await {
            Ok(_) => tracing::info!(plugin = %self.name, "provisioner plugin stopped"),
            Err(_) => {
                tracing::warn!(plugin = %self.name, grace = ?self.opts.stop_grace, "provisioner plugin did not exit when asked; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// Serves `provisioner` as a plugin process (the plugin side of the
/// contract above, for plugins written in Rust).
///
/// Listens on `listen` (`unix:/path` or `host:port`) when given, else on
/// the socket GRS names in `GRS_PLUGIN_SOCKET`; prints the handshake line;
/// serves until SIGINT/SIGTERM or, when started by GRS, until stdin closes.
pub async fn run_plugin(
    provisioner: Arc<dyn Provisioner>,
    version: &str,
    listen: Option<&str>,
) -> Result<(), PluginError> {
    let from_grs = std::env::var_os(SOCKET_ENV).is_some();
    let listen = match listen {
        Some(l) => l.to_owned(),
        None => match std::env::var(SOCKET_ENV) {
            Ok(p) => format!("unix:{p}"),
            Err(_) => {
                return Err(PluginError::NoListenAddress);
            }
        },
    };
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            grs_wait_for_signal().await;
            stop.cancel();
        });
    }
    if from_grs {
        let stop = stop.clone();
        tokio::spawn(async move {
            // EOF (or an error) on stdin: GRS is gone or wants us to stop.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
            stop.cancel();
        });
    }
    let shutdown = {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    };
    if let Some(path) = listen.strip_prefix("unix:") {
        let path = path.trim_start_matches("//");
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        announce(&format!("unix|{path}"));
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        crate::serve(provisioner, version, incoming, shutdown).await?;
        let _ = std::fs::remove_file(path);
    } else {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        announce(&format!("tcp|{}", listener.local_addr()?));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        crate::serve(provisioner, version, incoming, shutdown).await?;
    }
    Ok(())
}

fn announce(rest: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{HANDSHAKE_TAG}|{PROTOCOL_VERSION}|{rest}");
    let _ = out.flush();
}

async fn grs_wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_handshake("grs-plugin|1|unix|/tmp/p.sock\n").unwrap(),
            Address::Unix("/tmp/p.sock".into())
        );
        assert_eq!(
            parse_handshake("grs-plugin|1|tcp|127.0.0.1:7000").unwrap(),
            Address::Uri("http://127.0.0.1:7000".into())
        );
        let e = parse_handshake("grs-plugin|2|unix|/tmp/p.sock")
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 2") && e.contains("version 1"), "{e}");
        assert!(
            parse_handshake("hello world")
                .unwrap_err()
                .to_string()
                .contains("handshake line")
        );
        assert!(matches!(
            parse_handshake("grs-plugin|1|udp|x"),
            Err(HandshakeError::Address { .. })
        ));
        assert!(parse_handshake("grs-plugin|1|unix|relative").is_err());
    }
}
