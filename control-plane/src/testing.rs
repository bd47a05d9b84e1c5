//! Helpers for tests of this crate and of the crates above it (CLI, gateway,
//! end-to-end): a real control plane on a loopback port, Redis stores under
//! private key prefixes, event builders.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use grs_provisioner::FakeProvisioner;
use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Config, PoolConfig, ProvisionerConfig, StoreKind};
use crate::pools::{Pool, Pools};
use crate::server::{self, ControlPlane, ServerError};
use crate::store::{RedisStore, RedisStoreOptions, Store};
use crate::worker::{RegistrarError, RunnerRegistrar, RunnerRegistration};

/// The Redis URL tests use: `GRS_TEST_REDIS_URL`, else `redis://127.0.0.1:6379`.
/// (Not `GRS_REDIS_URL`: that overrides `redis.url` in every config the
/// tests load, `grs doctor`'s included.)
pub fn redis_url() -> String {
    std::env::var("GRS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh key prefix for one test, so tests share a Redis without meeting.
pub fn unique_prefix(test: &str) -> String {
    format!("grs-test:{test}:{:x}", rand::random::<u64>())
}

/// A Redis store on `url` under `prefix`.
pub fn redis_store_at(url: &str, prefix: &str) -> RedisStore {
    RedisStore::new(
        url,
        RedisStoreOptions {
            prefix: prefix.to_owned(),
            ..Default::default()
        },
    )
    .expect("valid Redis URL")
}

/// A Redis store under a key prefix of its own, or `None` when no Redis
/// answers and `CI` is unset (the caller then skips, loudly). Under `CI` a
/// missing Redis is a failure: CI must never report a skipped check as passed.
pub async fn redis_store(test: &str) -> Option<RedisStore> {
    let store = redis_store_at(&redis_url(), &unique_prefix(test));
    match tokio::time::timeout(Duration::from_secs(3), store.ping()).await {
        Ok(Ok(())) => Some(store),
        other => {
            let why = format!("no Redis at {} ({other:?})", redis_url());
            if std::env::var_os("CI").is_some() {
                panic!("{why}: CI is set, so this test fails instead of skipping");
            }
            eprintln!("SKIPPED {test}: {why}; set GRS_TEST_REDIS_URL or run scripts/test.sh");
            None
        }
    }
}

/// A configuration for tests: memory store, one pool `linux` (labels
/// `self-hosted`, `linux`, `x64`, at most 3 instances, fake provisioner), and
/// short timeouts so recovery paths run in seconds.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.control_plane.listen = ([127, 0, 0, 1], 0).into();
    config.control_plane.store = StoreKind::Memory;
    config.control_plane.claim_timeout = Duration::from_secs(1);
    config.control_plane.retry_backoff = Duration::from_millis(20);
    config.control_plane.retry_backoff_max = Duration::from_millis(200);
    config.control_plane.shutdown_grace = Duration::from_secs(2);
    config.control_plane.dispatchers_per_pool = 4;
    config.control_plane.teardown_workers = 2;
    config.pools = BTreeMap::from([(
        "linux".to_owned(),
        PoolConfig {
            labels: vec!["self-hosted".into(), "linux".into(), "x64".into()],
            max_instances: 3,
            provisioner: Some(ProvisionerConfig::fake()),
            ..PoolConfig::default()
        },
    )]);
    config
}

/// Pools of `config` all served by `fake` (shared, so tests can inspect it
/// and several replicas can share one "hypervisor").
pub fn fake_pools(config: &Config, fake: &Arc<FakeProvisioner>) -> Pools {
    Pools::new(
        config
            .pools
            .iter()
            .map(|(name, cfg)| Pool::new(name.clone(), cfg.clone(), fake.clone())),
    )
}

/// A control plane serving on a loopback port.
#[derive(Debug)]
pub struct RunningControlPlane {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl RunningControlPlane {
    /// Starts `cp` on `127.0.0.1:0`.
    pub async fn start(cp: ControlPlane) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(server::run(cp, listener, stop.clone().cancelled_owned()));
        Self { addr, stop, handle }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC client connected to it.
    pub async fn client(&self) -> ControlPlaneClient<Channel> {
        for _ in 0..50 {
            if let Ok(c) = ControlPlaneClient::connect(self.url()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "control plane at {} does not accept connections",
            self.url()
        )
    }

    /// Graceful shutdown (as on SIGTERM); returns how `run` ended.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.stop.cancel();
        self.handle.await.expect("control plane task")
    }

    /// A crash: every task is dropped mid-flight, nothing is acknowledged or
    /// released (as `kill -9`).
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// A `JobEvent` with the labels of the test pool.
pub fn job_event(delivery: &str, action: pb::JobAction, job_id: u64) -> pb::JobEvent {
    pb::JobEvent {
        delivery_id: delivery.to_owned(),
        action: action as i32,
        job_id,
        run_id: 900,
        run_attempt: 1,
        labels: vec!["self-hosted".into(), "linux".into()],
        repository: "octo-org/app".into(),
        organization: "octo-org".into(),
        job_name: "build".into(),
        workflow_name: "CI".into(),
        ..Default::default()
    }
}

/// Submits an event, panicking on an RPC error.
pub async fn submit(
    client: &mut ControlPlaneClient<Channel>,
    event: pb::JobEvent,
) -> pb::SubmitJobEventResponse {
    client
        .submit_job_event(pb::SubmitJobEventRequest { event: Some(event) })
        .await
        .expect("SubmitJobEvent")
        .into_inner()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A [`ControlPlane`] of `config`, `store` and `pools` with no GitHub
/// registrar.
pub fn control_plane(config: Config, store: Arc<dyn Store>, pools: Pools) -> ControlPlane {
    ControlPlane {
        config,
        store,
        pools,
        registrar: None,
    }
}

/// Waits until job `job_id` is in `state` and returns it, or panics after
/// `timeout`.
pub async fn wait_for_job(
    client: &ControlPlaneClient<Channel>,
    job_id: u64,
    state: pb::JobState,
    timeout: Duration,
) -> pb::Job {
    eventually(&format!("job {job_id} to be {state:?}"), timeout, || {
        let mut c = client.clone();
        async move {
            let job = c
                .get_job(pb::GetJobRequest { job_id })
                .await
                .ok()?
                .into_inner();
            (job.state() == state).then_some(job)
        }
    })
    .await
}

/// Waits until instance `name` is in `state` and returns it, or panics
/// after `timeout`.
pub async fn wait_for_instance(
    client: &ControlPlaneClient<Channel>,
    name: &str,
    state: pb::InstanceState,
    timeout: Duration,
) -> pb::Instance {
    eventually(&format!("{name} to be {state:?}"), timeout, || {
        let mut c = client.clone();
        async move {
            let i = c
                .get_instance(pb::GetInstanceRequest { name: name.into() })
                .await
                .ok()?
                .into_inner();
            (i.state() == state).then_some(i)
        }
    })
    .await
}

/// Waits until no pool has an instance (every capacity slot released), or
/// panics after `timeout`.
pub async fn wait_for_no_instances_in_use(client: &ControlPlaneClient<Channel>, timeout: Duration) {
    eventually("every capacity slot released", timeout, || {
        let mut c = client.clone();
        async move {
            let stats = c.get_stats(pb::GetStatsRequest {}).await.ok()?.into_inner();
            stats
                .pools
                .iter()
                .all(|p| p.instances_in_use == 0)
                .then_some(())
        }
    })
    .await
}

/// GitHub's runner registrations as a test scripts them: the one
/// [`RunnerRegistrar`] fake of this crate's tests and the crates above.
///
/// - `jit_config` mints `JIT-<name>` and counts ([`minted`](Self::minted)),
///   or answers an HTTP status ([`fail_jit`](Self::fail_jit)).
/// - `runner_busy` answers what [`set_busy`](Self::set_busy) /
///   [`fail_busy`](Self::fail_busy) said of the runner (default: not busy)
///   and records who was asked ([`asked`](Self::asked)), answering
///   [`set_busy_delay`](Self::set_busy_delay) later (tokio time).
/// - `offline_runners` lists [`add_offline`](Self::add_offline)'s
///   registrations (recording the prefix asked for); `remove_runner_id`
///   removes one and records its id ([`removed_ids`](Self::removed_ids)).
#[derive(Debug, Default)]
pub struct FakeRegistrar {
    minted: AtomicU32,
    jit_status: Mutex<Option<u16>>,
    busy: Mutex<HashMap<String, Result<bool, String>>>,
    asked: Mutex<Vec<String>>,
    offline: Mutex<Vec<RunnerRegistration>>,
    removed_ids: Mutex<Vec<u64>>,
    prefixes: Mutex<Vec<String>>,
    busy_delay: Mutex<Duration>,
}

impl FakeRegistrar {
    /// GitHub answers every JIT config request with HTTP `status` (`None`:
    /// mints again).
    pub fn fail_jit(&self, status: Option<u16>) {
        *lock(&self.jit_status) = status;
    }

    /// GitHub says runner `name` is (or is not) running a job.
    pub fn set_busy(&self, name: &str, busy: bool) {
        lock(&self.busy).insert(name.to_owned(), Ok(busy));
    }

    /// GitHub cannot be asked about runner `name` (`message` says why)
    /// until [`clear_busy`](Self::clear_busy).
    pub fn fail_busy(&self, name: &str, message: &str) {
        lock(&self.busy).insert(name.to_owned(), Err(message.to_owned()));
    }

    /// Forgets what was said of runner `name`: not busy.
    pub fn clear_busy(&self, name: &str) {
        lock(&self.busy).remove(name);
    }

    /// `runner_busy` answers `delay` after it was asked (a slow GitHub).
    pub fn set_busy_delay(&self, delay: Duration) {
        *lock(&self.busy_delay) = delay;
    }

    /// An offline registration GitHub lists.
    pub fn add_offline(&self, registration: RunnerRegistration) {
        lock(&self.offline).push(registration);
    }

    /// How many JIT configs were minted.
    pub fn minted(&self) -> u32 {
        self.minted.load(Ordering::SeqCst)
    }

    /// The runners `runner_busy` was asked about, in order.
    pub fn asked(&self) -> Vec<String> {
        lock(&self.asked).clone()
    }

    /// The registration ids removed, in order.
    pub fn removed_ids(&self) -> Vec<u64> {
        lock(&self.removed_ids).clone()
    }

    /// The prefixes `offline_runners` was asked for, in order.
    pub fn prefixes(&self) -> Vec<String> {
        lock(&self.prefixes).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait::async_trait]
impl RunnerRegistrar for FakeRegistrar {
    async fn jit_config(
        &self,
        name: &str,
        _labels: &[String],
        _runner_group_id: u64,
    ) -> Result<SecretString, RegistrarError> {
        if let Some(status) = *lock(&self.jit_status) {
            return Err(RegistrarError::GitHub {
                action: format!("mint a JIT runner config for {name}"),
                source: grs_github::GitHubError::Api {
                    method: "POST".into(),
                    path: "/orgs/o/actions/runners/generate-jitconfig".into(),
                    status,
                    message: format!("simulated {status}"),
                },
            });
        }
        self.minted.fetch_add(1, Ordering::SeqCst);
        Ok(SecretString::from(format!("JIT-{name}")))
    }

    async fn remove_runner(&self, _name: &str) -> Result<(), RegistrarError> {
        Ok(())
    }

    async fn runner_busy(&self, name: &str) -> Result<Option<bool>, RegistrarError> {
        lock(&self.asked).push(name.to_owned());
        let delay = *lock(&self.busy_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match lock(&self.busy).get(name) {
            Some(Ok(busy)) => Ok(Some(*busy)),
            Some(Err(message)) => Err(github_failure(
                &format!("look up the runner {name}"),
                message,
            )),
            None => Ok(Some(false)),
        }
    }

    async fn offline_runners(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<RunnerRegistration>>, RegistrarError> {
        lock(&self.prefixes).push(prefix.to_owned());
        Ok(Some(lock(&self.offline).clone()))
    }

    async fn remove_runner_id(&self, id: u64) -> Result<(), RegistrarError> {
        lock(&self.removed_ids).push(id);
        lock(&self.offline).retain(|r| r.id != id);
        Ok(())
    }
}

/// A GitHub failure as a registrar reports it: `action` failed because
/// GitHub did not answer (`message` says how).
pub fn github_failure(action: &str, message: &str) -> RegistrarError {
    RegistrarError::GitHub {
        action: action.to_owned(),
        source: grs_github::GitHubError::Transport {
            path: "/runners".into(),
            message: message.to_owned(),
        },
    }
}
