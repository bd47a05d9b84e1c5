//! Processes of the system under test: spawned from the workspace's own
//! binaries, their stdout and stderr appended to one log file each (kept
//! across restarts, read by the secrets check), killed with SIGKILL or
//! stopped with SIGTERM, restarted with the same command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The binaries the harness runs, by package.
const BINARIES: &[(&str, &str)] = &[
    ("grs-control-plane", "grs-control-plane"),
    ("grs-webhook-gateway", "grs-webhook-gateway"),
    ("grs-provisioner-proxmox", "grs-pve-sim"),
    ("grs-e2e", "grs-github-sim"),
];

/// The directory the running executable's sibling binaries are in
/// (`target/<profile>`): a test runs from `target/<profile>/deps`, the
/// soak binary from `target/<profile>`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(&dir).to_owned()
    } else {
        dir
    }
}

/// Builds the binaries the harness runs (once per process), in the
/// profile of the running executable, so a test never runs a stale
/// control plane: `cargo test -p grs-e2e` alone does not build other
/// packages' binaries. `GRS_E2E_NO_BUILD=1` skips it (CI builds the
/// workspace first).
fn ensure_built() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if std::env::var_os("GRS_E2E_NO_BUILD").is_some() {
                return Ok(());
            }
            let release = bin_dir().file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            // Not the variables cargo set for this test process: build
            // scripts watch some (ring: CARGO_MANIFEST_DIR), and a changed
            // value would rebuild half the tree here and again in the next
            // `cargo test`.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy();
                if k.starts_with("CARGO_PKG_")
                    || k.starts_with("CARGO_BIN_")
                    || k.starts_with("CARGO_MANIFEST_")
                    || k.starts_with("CARGO_CRATE_")
                    || k.starts_with("CARGO_TARGET_TMPDIR")
                    || k.starts_with("CARGO_PRIMARY_PACKAGE")
                    || k == "OUT_DIR"
                {
                    cmd.env_remove(k.as_ref());
                }
            }
            cmd.arg("build")
                .arg("--quiet")
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
            if release {
                cmd.arg("--release");
            }
            for (package, bin) in BINARIES {
                cmd.args(["-p", package, "--bin", bin]);
            }
            // grs-pve-sim is built only with the simulator feature (the
            // production binaries are built without it).
            cmd.args(["--features", "grs-provisioner-proxmox/sim"]);
            let out = cmd
                .output()
                .map_err(|e| format!("cannot run cargo build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build of the e2e binaries failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The path of a workspace binary (built first, see [`ensure_built`]).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    ensure_built()?;
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} does not exist: build it (cargo build -p <its package> --bin {name})",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port: bound to port 0, then released for the process
/// that will listen on it (a restart must find the same port again, and
/// the other processes are told it before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One process of the system under test.
#[derive(Debug)]
pub struct Proc {
    /// Its name in logs and messages (`control-plane-0`, ...).
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Proc {
    /// Starts `program` with `args` and `envs` (on top of a cleared
    /// `RUST_LOG`); output goes to `<log_dir>/<name>.log`.
    pub fn start(
        name: &str,
        program: PathBuf,
        args: Vec<OsString>,
        envs: Vec<(String, String)>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            name: name.to_owned(),
            program,
            args,
            envs,
            log: log_dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        };
        p.spawn()?;
        Ok(p)
    }

    /// (Re)starts the process with its command line; output is appended.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is running already", self.name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let err = file.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env_remove("RUST_LOG")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Whether it is still running (an exit is noted in its log).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                self.note(&format!("exited: {status}"));
                self.child = None;
                false
            }
            _ => false,
        }
    }

    /// SIGKILL: no shutdown, no flush, no lease released.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.note("killed with SIGKILL by the harness");
        }
    }

    /// SIGTERM, then waits up to `grace` for the exit (SIGKILL after it);
    /// returns whether it exited by itself, successfully.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    self.note("did not stop within its grace after SIGTERM: killed");
                    return false;
                }
            }
        }
    }

    /// Everything it wrote so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until its output has a line starting with `key`, and returns
    /// the rest of that line, trimmed (`url: https://...` → the URL).
    pub async fn wait_for_line(&mut self, key: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self
                .log_text()
                .lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
            {
                return Ok(v);
            }
            if !self.running() {
                bail!(
                    "{} exited before printing {key:?}:\n{}",
                    self.name,
                    self.tail(20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} printed no {key:?} within {timeout:?}:\n{}",
                    self.name,
                    self.tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last `n` lines of its output.
    pub fn tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn note(&self, what: &str) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "[e2e harness] {} {what}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
