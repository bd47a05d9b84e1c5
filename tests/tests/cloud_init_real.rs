//! The bootstrap, judged by the real cloud-init: a job's VM is made through
//! the `ProxmoxProvisioner` (PVE simulator, real control plane, real webhook
//! gateway, GitHub simulator), and its SMBIOS serial is handed to cloud-init's
//! own NoCloud code (`cloud_init_oracle.py`, Debian's `cloud-init` package,
//! 22.4 on Debian 12: the version whose parser reads `ds=nocloud` as local
//! mode). cloud-init must take the serial as network mode with the gateway as
//! its seed, fetch meta-data and user-data through the running gateway with
//! its own fetch code, and accept the user-data with `cloud-init schema`.
//!
//! `scripts/test.sh` installs the package when it is missing. Without it
//! this test FAILS when `CI` is set and is skipped loudly otherwise. Set
//! `GRS_CLOUD_INIT_PYTHON` to choose the interpreter (default
//! `/usr/bin/python3`, the one Debian's package is installed for).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use grs_control_plane::config::ProvisionerConfig;
use grs_control_plane::pools::{Pools, ProvisionerRegistry};
use grs_control_plane::store::MemoryStore;
use grs_control_plane::testing::{RunningControlPlane, eventually, test_config};
use grs_github::GitHubConfig;
use grs_github::sim::{GitHubSim, NewJob, SimConfig};
use grs_webhook_gateway::config::{GatewayConfig, ResolvedSecrets};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

const ORACLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cloud_init_oracle.py");

/// What the oracle said, or `None` when cloud-init is not there (and the
/// test may skip).
async fn ask_cloud_init(
    smbios1: &str,
    seed_prefix: &str,
    instance: &str,
) -> Option<(bool, serde_json::Value)> {
    let python =
        std::env::var("GRS_CLOUD_INIT_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let out = match tokio::process::Command::new(&python)
        .arg(ORACLE)
        .args([smbios1, seed_prefix, instance])
        .output()
        .await
    {
        Ok(o) => o,
        Err(e) => return unavailable(&format!("cannot run {python}: {e}")),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) {
        return unavailable(&format!(
            "{python} cannot import cloud-init: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the oracle printed no JSON ({e}); status {:?}\nstdout: {}\nstderr: {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )
    });
    Some((out.status.success(), v))
}

fn unavailable<T>(why: &str) -> Option<T> {
    let msg = format!(
        "the real cloud-init is not available: {why}\n  install it with: apt-get install --no-install-recommends cloud-init (scripts/test.sh does)"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// `major.minor` of a cloud-init version string.
fn version(v: &serde_json::Value) -> (u32, u32) {
    let s = v["cloud_init_version"].as_str().unwrap_or("0.0");
    let mut it = s.split('.').map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cloud_init_reads_the_seed_as_network_mode_and_accepts_the_user_data() {
    // RUST_LOG=warn (say) shows what the components log.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // GitHub, Proxmox, the gateway's listener (its URL goes into the seed).
    let github = GitHubSim::start(SimConfig::default()).await.unwrap();
    let pve = grs_provisioner_proxmox::testing::SimFixture::single_node().await;
    let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_url = format!("http://{}", gw_listener.local_addr().unwrap());

    let mut config = test_config();
    config.control_plane.installation_id = "grs-ci".into();
    config.control_plane.gateway_url = Some(gw_url.clone());
    config.github = Some(GitHubConfig {
        api_url: github.url(),
        organization: Some("grs-sim".into()),
        token: Some(SecretString::from(
            "ghp_simulated_personal_access_token".to_owned(),
        )),
        ..GitHubConfig::default()
    });
    config.pools.get_mut("linux").unwrap().provisioner =
        Some(ProvisionerConfig::with_settings("proxmox", &pve.pool).unwrap());
    config.validate().unwrap();
    // The in-process Proxmox backend, as the grs-control-plane binary
    // registers it.
    let (conn, installation) = (
        pve.conn.clone(),
        config.control_plane.installation_id.clone(),
    );
    let prefix = config.control_plane.instance_prefix.clone();
    let registry = ProvisionerRegistry::new().with(
        "proxmox",
        Arc::new(move || {
            let b = grs_provisioner_proxmox::ProxmoxBackend::new(&conn, &installation, &prefix)
                .map_err(|e| grs_config::ConfigError::key("proxmox", e.to_string()))?;
            Ok(Arc::new(b) as Arc<dyn grs_provisioner::Provisioner>)
        }),
    );
    let pools = Pools::from_config(&config, &registry).unwrap();
    let registrar = grs_control_plane::github::GitHubRegistrar::new(
        grs_github::GitHubClient::new(config.github.as_ref().unwrap()).unwrap(),
    );
    let cp = RunningControlPlane::start(grs_control_plane::server::ControlPlane {
        config,
        store: Arc::new(MemoryStore::new()),
        pools,
        registrar: Some(Arc::new(registrar)),
    })
    .await;
    let gw_stop = CancellationToken::new();
    let gw = tokio::spawn(grs_webhook_gateway::run_with(
        GatewayConfig {
            control_plane_url: cp.url(),
            ..GatewayConfig::default()
        },
        ResolvedSecrets {
            webhook_secret: SecretString::from(github.webhook_secret()),
            auth_token: None,
            tls_ca_pem: None,
        },
        gw_listener,
        gw_stop.clone().cancelled_owned(),
    ));
    github.set_webhook_url(format!("{gw_url}/webhook"));

    // A job is queued; its VM runs on Proxmox with the seed in smbios1.
    let job = github
        .queue_job(NewJob::labels(["self-hosted", "linux"]))
        .await;
    let name = format!("grs-{}", job.id);
    let vm = eventually("the VM to run", Duration::from_secs(30), || {
        let vms = pve.sim.vms_named(&name);
        async move { vms.into_iter().find(|v| v.running) }
    })
    .await;
    let smbios1 = vm.config.get("smbios1").expect("smbios1 is set").clone();

    // cloud-init, as the VM runs it.
    let seed_prefix = format!("{gw_url}/cloud-init/");
    let Some((ok, verdict)) = ask_cloud_init(&smbios1, &seed_prefix, &name).await else {
        gw_stop.cancel();
        return;
    };
    assert!(
        ok,
        "cloud-init {} does not bootstrap this VM: {verdict:#}",
        verdict["cloud_init_version"]
    );
    assert_eq!(verdict["dsmode"], "net", "{verdict:#}");
    assert!(
        verdict["seedfrom"]
            .as_str()
            .is_some_and(|s| s.starts_with(&seed_prefix) && s.ends_with('/')),
        "{verdict:#}"
    );
    assert_eq!(verdict["instance_id"], name.as_str());
    assert_eq!(
        verdict["user_data_parts"],
        serde_json::json!(["text/cloud-config"])
    );

    // The oracle tells the forms apart: on cloud-init before 23.2 the old
    // `ds=nocloud;s=` serial is local mode, the defect this test guards.
    if version(&verdict) < (23, 2) {
        let serial = smbios1
            .split(',')
            .find_map(|kv| kv.strip_prefix("serial="))
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let text = String::from_utf8(b64.decode(serial).unwrap()).unwrap();
        let old = text.replacen("ds=nocloud-net;", "ds=nocloud;", 1);
        assert_ne!(old, text);
        let old_smbios = smbios1.replace(serial, &b64.encode(old));
        let (old_ok, old_verdict) = ask_cloud_init(&old_smbios, &seed_prefix, &name)
            .await
            .expect("cloud-init was there a moment ago");
        assert!(!old_ok, "{old_verdict:#}");
        assert_eq!(old_verdict["dsmode"], "local", "{old_verdict:#}");
        assert_eq!(
            old_verdict["checks"]["network_stage_proceeds"], false,
            "{old_verdict:#}"
        );
    }

    gw_stop.cancel();
    gw.await.unwrap().unwrap();
    cp.shutdown().await.unwrap();
}
