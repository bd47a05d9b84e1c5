//! docs/operations.md, section 3, run as written: every `grpcurl` command
//! in its `sh` blocks, in document order, against a real control plane
//! (memory store, the test pool `linux`, fake provisioner) with the real
//! grpcurl binary. A command must succeed unless the line before it says
//! `# expect: CODE`, in which case it must fail with that gRPC status. And
//! every RPC of `grs.v1.ControlPlane` (read from the compiled descriptor
//! set, not a list kept here) must have at least one example.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use grs_control_plane::store::MemoryStore;
use grs_control_plane::testing::{RunningControlPlane, control_plane, fake_pools, test_config};
use grs_provisioner::FakeProvisioner;
use prost::Message;

const DOC: &str = include_str!("../../docs/operations.md");
/// The address the doc's commands name; replaced by the test server's.
const DOC_ADDR: &str = "127.0.0.1:50051";

/// One command of the doc.
#[derive(Debug)]
struct Example {
    line: usize,
    command: String,
    /// `Some(code)`: must fail with this status (grpcurl's `Code: X`).
    expect: Option<String>,
}

/// The `grpcurl` commands of `## 3.` in `doc`, continuation lines joined.
fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut in_sh = false;
    let mut expect = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in doc.lines().enumerate() {
        if line.starts_with("## ") {
            in_section = line.starts_with("## 3.");
            continue;
        }
        if !in_section {
            continue;
        }
        if line.trim_start().starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        if let Some((start, mut cmd)) = pending.take() {
            cmd.push(' ');
            cmd.push_str(line.trim().trim_end_matches('\\').trim_end());
            if line.trim_end().ends_with('\\') {
                pending = Some((start, cmd));
            } else {
                out.push(Example {
                    line: start,
                    command: cmd,
                    expect: expect.take(),
                });
            }
            continue;
        }
        let t = line.trim();
        if let Some(code) = t.strip_prefix("# expect:") {
            expect = Some(code.trim().to_owned());
        } else if t.starts_with("grpcurl ") {
            let cmd = t.trim_end_matches('\\').trim_end().to_owned();
            if t.ends_with('\\') {
                pending = Some((i + 1, cmd));
            } else {
                out.push(Example {
                    line: i + 1,
                    command: cmd,
                    expect: expect.take(),
                });
            }
        }
    }
    out
}

/// The methods of `grs.v1.ControlPlane`, from the descriptor set the
/// server registers for reflection.
fn rpcs() -> BTreeSet<String> {
    let fds = prost_types::FileDescriptorSet::decode(grs_proto::FILE_DESCRIPTOR_SET).unwrap();
    fds.file
        .iter()
        .filter(|f| f.package() == "grs.v1")
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == "ControlPlane")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
        .collect()
}

fn grpcurl_available() -> bool {
    match Command::new("grpcurl").arg("-version").output() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "grpcurl cannot run ({e}): CI is set, so this test fails instead of skipping"
                );
            }
            eprintln!("SKIPPED: grpcurl not found ({e}); run scripts/test.sh");
            false
        }
    }
}

#[test]
fn the_doc_has_an_example_for_every_rpc() {
    let all = rpcs();
    assert!(
        all.len() >= 13,
        "the descriptor set lists the RPCs: {all:?}"
    );
    let shown: BTreeSet<String> = examples(DOC)
        .iter()
        .filter_map(|e| {
            e.command
                .split("grs.v1.ControlPlane/")
                .nth(1)
                .map(|m| m.split_whitespace().next().unwrap_or("").to_owned())
        })
        .collect();
    let missing: Vec<_> = all.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md section 3 has no grpcurl example for {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_command_in_the_operations_doc_does_what_it_says() {
    if !grpcurl_available() {
        return;
    }
    let config = test_config();
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, Arc::new(MemoryStore::new()), pools))
        .await;
    let addr = cp.addr.to_string();
    let examples = examples(DOC);
    assert!(examples.len() >= 20, "found {} examples", examples.len());
    for ex in examples {
        let cmd = ex.command.replace(DOC_ADDR, &addr);
        // A command that needs the one before to have had its effect (an
        // instance the dispatcher is still creating) gets a few seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = cmd.clone();
            let out = tokio::task::spawn_blocking(move || {
                Command::new("bash").arg("-c").arg(&c).output().unwrap()
            })
            .await
            .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let verdict = match &ex.expect {
                None if out.status.success() => Ok(()),
                None => Err(format!("failed: {stderr}")),
                Some(code) if out.status.success() => {
                    Err(format!("succeeded, expected {code}: {stdout}"))
                }
                Some(code) if stderr.contains(&format!("Code: {code}")) => Ok(()),
                Some(code) => Err(format!("expected {code}, got: {stderr}")),
            };
            match verdict {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("docs/operations.md line {}: `{}` {e}", ex.line, ex.command)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    cp.shutdown().await.unwrap();
}

#[test]
fn the_parser_finds_continued_commands_and_expectations() {
    let doc = "## 3. x\n```sh\n# expect: NotFound\ngrpcurl -d '{}' \\\n  h:1 a/B\ngrpcurl h:1 list\n```\n## 4. y\n```sh\ngrpcurl h:1 not/This\n```\n";
    let e = examples(doc);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(e[0].command, "grpcurl -d '{}' h:1 a/B");
    assert_eq!(e[0].expect.as_deref(), Some("NotFound"));
    assert_eq!(e[1].expect, None);
}
