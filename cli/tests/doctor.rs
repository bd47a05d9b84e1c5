//! `grs doctor` against real components: a private redis-server (unix
//! socket, AOF on or off), the PVE simulator over HTTPS with a pinned
//! fingerprint, the GitHub simulator (app or PAT), and the real webhook
//! gateway. A healthy installation passes every check; each test then
//! breaks one thing and asserts the line that names it, its fix, and the
//! exit code.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use grs::{Cli, CliError};
use grs_github::sim::{GitHubSim, SimConfig};
use grs_provisioner_proxmox::sim::{AclEntry, PveSim, SimOptions};
use tokio_util::sync::CancellationToken;

const APP_KEY: &str = include_str!("../../github/tests/data/test-app.key.pem");
const APP_PUB: &str = include_str!("../../github/tests/data/test-app.pub.pem");

/// A redis-server of this test's own on a unix socket (no port to race
/// for), with AOF on or off; killed when dropped.
struct PrivateRedis {
    dir: tempfile::TempDir,
    child: Child,
}

impl PrivateRedis {
    fn start(appendonly: bool) -> Self {
        Self::start_with(appendonly, None)
    }

    fn start_with(appendonly: bool, password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("redis.sock");
        let mut cmd = Command::new("redis-server");
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args(["--port", "0", "--save", ""])
            .args(["--appendonly", if appendonly { "yes" } else { "no" }])
            .arg("--unixsocket")
            .arg(&sock)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install redis-server to run these tests)");
        // Owned at once, so it is killed even if it never comes up.
        let redis = Self { dir, child };
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not open {}", sock.display());
    }

    fn url(&self) -> String {
        format!("unix://{}", self.dir.path().join("redis.sock").display())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How GRS authenticates to GitHub in a test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    App,
    Pat,
}

/// A healthy installation: every check passes until a test breaks it.
struct Install {
    dir: tempfile::TempDir,
    /// Kept alive for the test (killed on drop).
    _redis: PrivateRedis,
    pve: PveSim,
    github: GitHubSim,
    gateway_url: String,
    gateway_stop: CancellationToken,
    auth: Auth,
    fingerprint: String,
    redis_url: String,
    template_vmid: u32,
}

impl Drop for Install {
    fn drop(&mut self) {
        self.gateway_stop.cancel();
    }
}

impl Install {
    async fn start(auth: Auth) -> Self {
        let redis = PrivateRedis::start(true);
        let pve = PveSim::start(SimOptions {
            tls: true,
            ..SimOptions::default()
        })
        .await
        .unwrap();
        pve.add_node("pve1", 64);
        pve.add_template("pve1", 9000, "runner-template");
        // The real gateway (its control plane need not run for /healthz).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_url = format!("http://{}", listener.local_addr().unwrap());
        let gateway_stop = CancellationToken::new();
        let gw = grs_webhook_gateway::config::GatewayConfig {
            control_plane_url: "http://127.0.0.1:9".into(),
            ..Default::default()
        };
        let secrets = grs_webhook_gateway::config::ResolvedSecrets {
            webhook_secret: "sim-webhook-secret".to_owned().into(),
            auth_token: None,
            tls_ca_pem: None,
        };
        tokio::spawn(grs_webhook_gateway::run_with(
            gw,
            secrets,
            listener,
            gateway_stop.clone().cancelled_owned(),
        ));
        let github = GitHubSim::start(SimConfig {
            webhook_url: Some(format!("{gateway_url}/webhook")),
            app_public_key_pem: Some(APP_PUB.into()),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let fingerprint = pve.fingerprint().unwrap();
        let redis_url = redis.url();
        Self {
            dir: tempfile::tempdir().unwrap(),
            _redis: redis,
            pve,
            github,
            gateway_url,
            gateway_stop,
            auth,
            fingerprint,
            redis_url,
            template_vmid: 9000,
        }
    }

    /// Writes the configuration file the services would run with.
    fn config(&self) -> PathBuf {
        let d = self.dir.path();
        std::fs::write(d.join("pve-token"), self.pve.token_secret()).unwrap();
        std::fs::write(d.join("app.pem"), APP_KEY).unwrap();
        std::fs::write(d.join("gh-token"), "ghp_simulated_personal_access_token").unwrap();
        let github_auth = match self.auth {
            Auth::App => format!(
                "[github.app]\napp_id = \"4242\"\ninstallation_id = 77\nprivate_key_file = \"{}\"\n",
                d.join("app.pem").display()
            ),
            Auth::Pat => format!("token_file = \"{}\"\n", d.join("gh-token").display()),
        };
        let text = format!(
            r#"[control_plane]
installation_id = "doctor-test"
gateway_url = "{gateway}"

[redis]
url = "{redis}"

[proxmox]
url = "{pve}"
token_id = "{token_id}"
token_secret_file = "{secret}"
fingerprint = "{fingerprint}"

[pools.linux]
labels = ["self-hosted", "linux"]

[pools.linux.provisioner]
type = "proxmox"
node = "pve1"
template_vmid = {vmid}

[github]
api_url = "{gh}"
organization = "grs-sim"
{github_auth}"#,
            gateway = self.gateway_url,
            redis = self.redis_url,
            pve = self.pve.url(),
            token_id = self.pve.token_id(),
            secret = d.join("pve-token").display(),
            fingerprint = self.fingerprint,
            vmid = self.template_vmid,
            gh = self.github.url(),
        );
        let path = d.join("grs.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `grs doctor --config FILE` in process: the report and the exit code.
    async fn doctor(&self) -> (String, u8) {
        let path = self.config();
        doctor_at(&path).await
    }
}

async fn doctor_at(path: &Path) -> (String, u8) {
    let cli = Cli::try_parse_from([
        "grs",
        "--timeout",
        "3s",
        "doctor",
        "--config",
        path.to_str().unwrap(),
    ])
    .unwrap();
    let mut out = Vec::new();
    let code = match grs::run(cli, &mut out, std::future::pending()).await {
        Ok(()) => 0,
        Err(e @ CliError::Checks(_)) => e.exit_code(),
        Err(e) => panic!("grs doctor failed outside its checks: {e}"),
    };
    (String::from_utf8(out).unwrap(), code)
}

/// The one line starting with `mark name`.
fn line<'a>(report: &'a str, mark: &str, name: &str) -> &'a str {
    let prefix = format!("{mark} {name}: ");
    report
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{report}"))
}

/// Asserts the run failed (exit 1) and only on lines whose names start
/// with one of `broken`.
fn assert_fails_only(report: &str, code: u8, broken: &[&str]) {
    assert_eq!(code, 1, "{report}");
    for l in report.lines().filter(|l| l.starts_with('✗')) {
        assert!(
            broken.iter().any(|b| l.starts_with(&format!("✗ {b}"))),
            "unexpected failure {l:?} in:\n{report}"
        );
    }
}

#[tokio::test]
async fn a_healthy_installation_passes_every_check() {
    for auth in [Auth::App, Auth::Pat] {
        let i = Install::start(auth).await;
        let (report, code) = i.doctor().await;
        assert_eq!(code, 0, "{report}");
        assert!(report.lines().count() >= 10, "{report}");
        for l in report.lines() {
            assert!(l.starts_with('✓'), "not passed: {l:?} in:\n{report}");
        }
        line(&report, "✓", "Redis persistence");
        assert!(line(&report, "✓", "PVE API").contains("pinned certificate fingerprint matches"));
        line(&report, "✓", "PVE privileges (pool linux)");
        line(&report, "✓", "PVE template (pool linux)");
        line(&report, "✓", "GitHub permissions");
        assert!(line(&report, "✓", "GitHub webhook").contains(&i.gateway_url));
        line(&report, "✓", "gateway reachable");
    }
}

#[tokio::test]
async fn json_output_lists_every_check_with_its_status_and_fix() {
    let i = Install::start(Auth::App).await;
    i.github.set_app_events(&[]);
    let cli = Cli::try_parse_from([
        "grs",
        "-o",
        "json",
        "doctor",
        "--config",
        i.config().to_str().unwrap(),
    ])
    .unwrap();
    let mut out = Vec::new();
    let err = grs::run(cli, &mut out, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 1);
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let checks = doc["checks"].as_array().unwrap();
    assert!(checks.len() >= 10, "{doc}");
    let webhook = checks
        .iter()
        .find(|c| c["name"] == "GitHub webhook")
        .unwrap();
    assert_eq!(webhook["status"], "fail", "{webhook}");
    assert!(
        webhook["fix"].as_str().unwrap().contains("Workflow job"),
        "{webhook}"
    );
    let redis = checks
        .iter()
        .find(|c| c["name"] == "Redis persistence")
        .unwrap();
    assert_eq!(redis["status"], "pass", "{redis}");
    assert!(redis["fix"].is_null(), "{redis}");
}

#[tokio::test]
async fn an_unreadable_configuration_is_the_only_check() {
    let i = Install::start(Auth::App).await;
    let path = i.dir.path().join("bad.toml");
    std::fs::write(&path, "[pools.linux]\nlabels = []\n").unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_eq!(code, 1);
    assert_eq!(report.lines().count(), 1, "{report}");
    assert!(
        line(&report, "✗", "configuration").contains("pools.linux"),
        "{report}"
    );
}

#[tokio::test]
async fn redis_unreachable_is_a_failure_and_persistence_is_skipped() {
    let mut i = Install::start(Auth::App).await;
    i.redis_url = format!("unix://{}/nothing-here.sock", i.dir.path().display());
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["Redis reachable"]);
    assert!(
        line(&report, "✗", "Redis reachable").contains("fix: start Redis, or correct redis.url")
    );
    assert!(line(&report, "-", "Redis persistence").contains("not reachable"));
}

#[tokio::test]
async fn redis_without_persistence_says_so_and_how_to_turn_it_on() {
    let mut i = Install::start(Auth::App).await;
    let volatile = PrivateRedis::start(false);
    i.redis_url = volatile.url();
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["Redis persistence"]);
    let l = line(&report, "✗", "Redis persistence");
    assert!(
        l.contains("WARNING: persistence is off: appendonly is \"no\""),
        "{l}"
    );
    assert!(l.contains("CONFIG SET appendonly yes"), "{l}");
}

#[tokio::test]
async fn the_redis_password_is_sent_and_a_wrong_one_is_named_not_shown() {
    let mut i = Install::start(Auth::App).await;
    let locked = PrivateRedis::start_with(true, Some("redis-s3cret"));
    i.redis_url = locked.url();
    let path = i.config();
    let pw = i.dir.path().join("redis-password");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[redis]\n",
        &format!("[redis]\npassword_file = \"{}\"\n", pw.display()),
    );
    std::fs::write(&path, text).unwrap();
    std::fs::write(&pw, "redis-s3cret").unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_eq!(code, 0, "{report}");
    line(&report, "✓", "Redis persistence");

    std::fs::write(&pw, "not-the-password").unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_fails_only(&report, code, &["Redis reachable"]);
    let l = line(&report, "✗", "Redis reachable");
    assert!(
        l.contains("Password authentication failed") && l.contains("redis.password"),
        "{l}"
    );
    assert!(
        !report.contains("not-the-password") && !report.contains("redis-s3cret"),
        "{report}"
    );
}

#[tokio::test]
async fn a_pinned_fingerprint_that_does_not_match_names_the_key() {
    let mut i = Install::start(Auth::App).await;
    i.fingerprint = ["AB"; 32].join(":");
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["PVE API"]);
    let l = line(&report, "✗", "PVE API");
    assert!(
        l.contains("TLS verification") && l.contains("fix: the certificate is not the pinned one"),
        "{l}"
    );
    assert!(line(&report, "-", "PVE template (pool linux)").contains("not reachable"));
    line(&report, "-", "PVE privileges (pool linux)");
}

#[tokio::test]
async fn a_wrong_token_secret_is_an_authentication_failure() {
    let i = Install::start(Auth::App).await;
    let path = i.config();
    std::fs::write(i.dir.path().join("pve-token"), "wrong-secret").unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_fails_only(&report, code, &["PVE API"]);
    let l = line(&report, "✗", "PVE API");
    assert!(
        l.contains("authentication failed") && l.contains("fix: check proxmox.token_id"),
        "{l}"
    );
}

#[tokio::test]
async fn a_token_without_a_needed_privilege_gets_the_pveum_command() {
    let i = Install::start(Auth::App).await;
    // The GRS role on / but for VM.Clone, which only /vms/1 (not the
    // template) has.
    let role: Vec<&str> = grs_provisioner_proxmox::privileges::role_privileges_for(9)
        .into_iter()
        .filter(|p| *p != "VM.Clone")
        .collect();
    i.pve.set_token_acl(vec![
        AclEntry::new("/", &role),
        AclEntry::new("/vms/1", &["VM.Clone"]),
    ]);
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["PVE privileges"]);
    let l = line(&report, "✗", "PVE privileges (pool linux)");
    assert!(l.contains("lacks VM.Clone on /vms/9000"), "{l}");
    assert!(
        l.contains("pveum acl modify /vms/9000 -token 'root@pam!grs' -role GRS"),
        "{l}"
    );
}

#[tokio::test]
async fn a_privilege_that_does_not_propagate_to_new_vms_is_missing() {
    let i = Install::start(Auth::App).await;
    let role: Vec<String> = grs_provisioner_proxmox::privileges::role_privileges_for(9)
        .into_iter()
        .map(str::to_owned)
        .collect();
    i.pve.set_token_acl(vec![AclEntry {
        path: "/".into(),
        privileges: role,
        propagate: false,
    }]);
    let (report, code) = i.doctor().await;
    assert_eq!(code, 1, "{report}");
    let l = line(&report, "✗", "PVE privileges (pool linux)");
    assert!(l.contains("VM.Allocate on /vms (propagating)"), "{l}");
}

#[tokio::test]
async fn a_missing_template_names_the_key() {
    let mut i = Install::start(Auth::App).await;
    i.template_vmid = 9999;
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["PVE template"]);
    let l = line(&report, "✗", "PVE template (pool linux)");
    assert!(
        l.contains("template_vmid") && l.contains("9999 does not exist"),
        "{l}"
    );
    // Its config cannot be read, so privileges cannot be resolved.
    line(&report, "-", "PVE privileges (pool linux)");
}

#[tokio::test]
async fn a_vm_that_is_not_a_template_says_how_to_convert_it() {
    let mut i = Install::start(Auth::App).await;
    i.pve.add_vm("pve1", 9100, "not-a-template", false);
    i.template_vmid = 9100;
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["PVE template"]);
    let l = line(&report, "✗", "PVE template (pool linux)");
    assert!(
        l.contains("is not a template") && l.contains("qm template 9100"),
        "{l}"
    );
}

#[tokio::test]
async fn clones_placed_on_another_node_need_shared_storage() {
    let i = Install::start(Auth::App).await;
    i.pve.add_node("pve2", 64);
    let path = i.config();
    // Placement puts clones on pve2 only; the template's disk is on
    // pve1's local-lvm. (With pve1 listed too, GRS places on pve1 only and
    // says so in its log: not a failure.)
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "fingerprint = ",
        "nodes = [{ name = \"pve2\" }]\nfingerprint = ",
    );
    std::fs::write(&path, text).unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_fails_only(&report, code, &["PVE template"]);
    let l = line(&report, "✗", "PVE template (pool linux)");
    assert!(l.contains("local-lvm"), "{l}");
}

#[tokio::test]
async fn clones_narrowed_to_the_template_node_are_a_warning_not_a_failure() {
    let i = Install::start(Auth::App).await;
    i.pve.add_node("pve2", 64);
    let path = i.config();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "fingerprint = ",
        "nodes = [{ name = \"pve1\" }, { name = \"pve2\" }]\nfingerprint = ",
    );
    std::fs::write(&path, text).unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_eq!(code, 0, "{report}");
    let l = line(&report, "!", "PVE template (pool linux)");
    assert!(l.contains("clones go to pve1 only, never to pve2"), "{l}");
    assert!(
        l.contains("fix: move the template's disks to shared storage"),
        "{l}"
    );
}

#[tokio::test]
async fn an_app_without_runner_permission_is_told_which() {
    let i = Install::start(Auth::App).await;
    i.github.set_app_permissions(&[
        ("actions", "read"),
        ("organization_self_hosted_runners", "read"),
    ]);
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["GitHub permissions"]);
    let l = line(&report, "✗", "GitHub permissions");
    assert!(
        l.contains("organization_self_hosted_runners: write (has read; for runners, JIT configs)"),
        "{l}"
    );
}

#[tokio::test]
async fn an_app_with_the_wrong_installation_fails_its_credentials() {
    let i = Install::start(Auth::App).await;
    let path = i.config();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("installation_id = 77", "installation_id = 78");
    std::fs::write(&path, text).unwrap();
    let (report, code) = doctor_at(&path).await;
    assert_fails_only(
        &report,
        code,
        &["GitHub credentials", "GitHub runners API", "GitHub webhook"],
    );
    let l = line(&report, "✗", "GitHub credentials");
    assert!(
        l.contains("404") && l.contains("github.app.installation_id"),
        "{l}"
    );
    line(&report, "-", "GitHub permissions");
}

#[tokio::test]
async fn an_app_not_subscribed_to_workflow_job_is_told_to_tick_it() {
    let i = Install::start(Auth::App).await;
    i.github.set_app_events(&["push"]);
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["GitHub webhook"]);
    let l = line(&report, "✗", "GitHub webhook");
    assert!(
        l.contains("does not subscribe to workflow_job") && l.contains("Workflow job"),
        "{l}"
    );
}

#[tokio::test]
async fn an_app_webhook_pointing_elsewhere_names_both_urls() {
    let i = Install::start(Auth::App).await;
    i.github
        .set_webhook_url("https://old-gateway.example/webhook");
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["GitHub webhook"]);
    let l = line(&report, "✗", "GitHub webhook");
    assert!(l.contains("https://old-gateway.example/webhook"), "{l}");
    assert!(
        l.contains(&format!(
            "{}/webhook (from control_plane.gateway_url)",
            i.gateway_url
        )),
        "{l}"
    );
}

#[tokio::test]
async fn a_token_without_the_runner_scope_is_told_which() {
    let i = Install::start(Auth::Pat).await;
    i.github.set_pat_scopes(Some("repo, workflow"));
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["GitHub permissions"]);
    let l = line(&report, "✗", "GitHub permissions");
    assert!(l.contains("lack admin:org or manage_runners:org"), "{l}");
}

#[tokio::test]
async fn an_organisation_webhook_without_workflow_job_is_told_to_tick_it() {
    let i = Install::start(Auth::Pat).await;
    i.github.set_hook_events(&["push", "pull_request"]);
    let (report, code) = i.doctor().await;
    assert_fails_only(&report, code, &["GitHub webhook"]);
    let l = line(&report, "✗", "GitHub webhook");
    assert!(
        l.contains("does not send workflow_job") && l.contains("Workflow jobs"),
        "{l}"
    );
}

#[tokio::test]
async fn an_unreachable_gateway_fails_with_its_key() {
    let i = Install::start(Auth::Pat).await;
    i.gateway_stop.cancel();
    // Wait for the listener to close.
    for _ in 0..100 {
        if reqwest::get(format!("{}/healthz", i.gateway_url))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (report, code) = i.doctor().await;
    // The webhook still points at the (configured) gateway URL: only the
    // reachability check fails.
    assert_fails_only(&report, code, &["gateway reachable"]);
    let l = line(&report, "✗", "gateway reachable");
    assert!(
        l.contains("/healthz: connection refused") && l.contains("control_plane.gateway_url"),
        "{l}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_1_on_a_failure_and_0_when_healthy() {
    let i = Install::start(Auth::App).await;
    let path = i.config();
    let run = |path: PathBuf| {
        std::process::Command::new(env!("CARGO_BIN_EXE_grs"))
            .args(["--timeout", "3s", "doctor", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let ok = tokio::task::spawn_blocking({
        let path = path.clone();
        move || run(path)
    })
    .await
    .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    i.github.set_app_events(&[]);
    let bad = tokio::task::spawn_blocking(move || run(path))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    line(&stdout, "✗", "GitHub webhook");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("grs: doctor: 1 of"), "{stderr}");
}
