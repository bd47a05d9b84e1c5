//! The production binaries link no simulator and no test helper (issue 9):
//! `grs-control-plane`, `grs-webhook-gateway` and the Proxmox plugin
//! (`grs-provisioner-proxmox`), each resolved as `cargo build --release -p
//! <package>` resolves it (normal dependencies, default features), must not
//! pull in the PVE simulator (`grs-provisioner-proxmox`'s `sim` feature), the
//! GitHub simulator (`grs-github`'s `sim`), this crate's `testing` helpers,
//! or `rcgen` (the simulators' certificates).
//!
//! `grs` (the CLI) does: its demo runs on the simulators.

use std::process::Command;

/// What no production binary may link: (package, its feature or `None` for
/// the package itself, what it is).
const FORBIDDEN: &[(&str, Option<&str>, &str)] = &[
    ("grs-provisioner-proxmox", Some("sim"), "the PVE simulator"),
    ("grs-github", Some("sim"), "the GitHub simulator"),
    (
        "grs-control-plane",
        Some("testing"),
        "the control plane's test helpers",
    ),
    ("rcgen", None, "rcgen (test certificates)"),
];

/// `package`'s normal dependencies (itself included) with the features
/// each is built with, as `cargo tree` resolves them for `cargo build -p
/// <package>`: (name, features).
fn tree(package: &str) -> Vec<(String, Vec<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "-f",
            "{p}|{f}",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|l| {
            let (p, f) = l.split_once('|')?;
            let name = p.split_whitespace().next()?.to_owned();
            let features = f
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|f| !f.is_empty() && *f != "(*)")
                .map(str::to_owned)
                .collect();
            Some((name, features))
        })
        .collect()
}

/// The forbidden dependencies found in `tree` (empty when clean).
fn forbidden_in(tree: &[(String, Vec<String>)]) -> Vec<&'static str> {
    FORBIDDEN
        .iter()
        .filter(|(package, feature, _)| {
            tree.iter().any(|(name, features)| {
                name == package && feature.is_none_or(|f| features.iter().any(|g| g == f))
            })
        })
        .map(|(_, _, why)| *why)
        .collect()
}

#[test]
fn the_check_finds_a_simulator_when_one_is_linked() {
    // What `cargo tree` prints for a package that enables the simulators
    // (as the CLI does): the check must see it.
    let cli = tree("grs");
    let found = forbidden_in(&cli);
    assert!(
        found.contains(&"the PVE simulator") && found.contains(&"the GitHub simulator"),
        "the demo CLI links the simulators, yet the check found only {found:?}"
    );
}

#[test]
fn production_binaries_link_no_simulator_or_test_helper() {
    for package in [
        "grs-control-plane",
        "grs-webhook-gateway",
        "grs-provisioner-proxmox",
    ] {
        let found = forbidden_in(&tree(package));
        assert!(
            found.is_empty(),
            "cargo build --release -p {package} would link {found:?}: put it behind a feature the binary does not enable"
        );
    }
}
