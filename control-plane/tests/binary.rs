//! The `grs-control-plane` binary as an operator runs it: bad configuration
//! exits 64 naming the key; SIGTERM shuts it down gracefully.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_grs-control-plane");

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grs.toml")).unwrap()
}

#[test]
fn the_example_configuration_checks_out() {
    let out = Command::new(BIN)
        .args([
            "--check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grs.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_configuration_exits_64_with_one_message_naming_the_key() {
    let f = config_file(&example().replace("max_instances = 4", "max_instances = \"four\""));
    let out = Command::new(BIN)
        .arg("--config")
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pools.linux.max_instances"), "{err}");

    // The environment fixes what the file got wrong (checked only: without
    // --check-config the binary would start serving).
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg("--config")
        .arg(f.path())
        .env("GRS_POOLS_LINUX_MAX_INSTANCES", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(BIN)
        .arg("--config")
        .arg("/nonexistent/grs.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/grs.toml"));

    let out = Command::new(BIN)
        .arg("--check-config")
        .arg("--config")
        .arg(f.path())
        .env("GRS_CONTROL_PLANE_LISTEN", "not-an-address")
        .env("GRS_POOLS_LINUX_MAX_INSTANCES", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("control_plane.listen") && err.contains("GRS_CONTROL_PLANE_LISTEN"),
        "{err}"
    );
}

#[test]
fn sigterm_shuts_the_control_plane_down_gracefully() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = config_file(&example());
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(f.path())
        .env("GRS_CONTROL_PLANE_STORE", "memory")
        .env("GRS_CONTROL_PLANE_LISTEN", format!("127.0.0.1:{port}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the control plane never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(exit.success(), "exit {exit:?}: {err}");
    assert!(err.contains("control plane stopped"), "{err}");
}
