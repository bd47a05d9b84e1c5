//! `grs-provisioner-fake`: the in-memory fake provisioner as a plugin
//! process, for tests and demos of the plugin machinery (no hypervisor).
//!
//! ```text
//! grs-provisioner-fake [--listen unix:/path | --listen 127.0.0.1:7000]
//! ```
//! Started by GRS (`type = "plugin"`, `command = ["grs-provisioner-fake"]`)
//! it needs no argument. VMs live in its memory: they die with the process.

use std::process::ExitCode;
use std::sync::Arc;

use grs_provisioner::FakeProvisioner;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = match args.as_slice() {
        [] => None,
        [flag, addr] if flag == "--listen" => Some(addr.clone()),
        _ => {
            eprintln!("usage: grs-provisioner-fake [--listen unix:/PATH | HOST:PORT]");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("grs-provisioner-fake: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fake = Arc::new(FakeProvisioner::new());
    match runtime.block_on(grs_provisioner_grpc::plugin::run_plugin(
        fake,
        env!("CARGO_PKG_VERSION"),
        listen.as_deref(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grs-provisioner-fake: {e}");
            ExitCode::FAILURE
        }
    }
}
