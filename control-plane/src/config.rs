//! The control plane's configuration: its sections of the shared TOML file.
//!
//! Loaded by [`grs_config::load`] (file, then `GRS_*` overrides) and checked
//! by [`Config::validate`], whose errors name the key to fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use grs_config::ConfigError;
use grs_github::GitHubConfig;
use grs_provisioner::PoolDocument;
use grs_provisioner_grpc::Address;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the control plane library reads. Sections of other binaries in
/// the same file are ignored, and so are the sections of in-process backends
/// (`[proxmox]`): the binary that registers a backend reads its section.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `[control_plane]`
    pub control_plane: ControlPlaneConfig,
    /// `[redis]`
    pub redis: RedisConfig,
    /// `[pools.<name>]`
    pub pools: BTreeMap<String, PoolConfig>,
    /// `[github]`: where runners are registered. Without it, instances get
    /// no runner registration from GRS (their template must bring one) and
    /// `user-data` cannot be served.
    pub github: Option<GitHubConfig>,
}

/// Where the durable state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// Redis (production; survives restarts with AOF persistence on).
    #[default]
    Redis,
    /// Process memory (demo and tests; nothing survives the process).
    Memory,
}

/// `[control_plane]`
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Where Prometheus metrics are served (`GET /metrics`, plain HTTP, no
    /// auth: keep it on a private network). Unset: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Names this GRS installation in the ownership marker of every VM it
    /// makes. Two installations sharing a hypervisor must differ.
    pub installation_id: String,
    /// Instance names are `<instance_prefix>-<job id>`; also the runner name
    /// prefix on GitHub. A DNS label of at most 42 characters.
    pub instance_prefix: String,
    /// `redis` or `memory`.
    pub store: StoreKind,
    /// Bearer token every RPC but health and reflection must carry
    /// (`authorization: Bearer <token>`). Unset: no auth (loopback only!).
    #[serde(skip_serializing)]
    pub auth_token: Option<SecretString>,
    /// File holding the bearer token.
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate chain for TLS; with `tls_key_file`. Unset: plaintext.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key_file: Option<PathBuf>,
    /// Dispatcher workers per pool in this replica (concurrent creates).
    /// 0 (the default): one per instance the pool may have
    /// (`max_instances`, at most 64), so creates are limited by what the
    /// backend can take (the Proxmox provisioner sizes its own clone
    /// concurrency), not by a constant here.
    pub dispatchers_per_pool: usize,
    /// Teardown workers in this replica (concurrent deletes).
    pub teardown_workers: usize,
    /// A queue entry held this long without a heartbeat is given to another
    /// worker (its worker is presumed dead).
    #[serde(with = "humantime_serde")]
    pub claim_timeout: Duration,
    /// Cap on create attempts per job (lost workers and transient errors
    /// alike); 0, the default: no cap, `retry_deadline` decides.
    pub max_attempts: u32,
    /// How long after a job's instance was first recorded its create
    /// failures (a template under backup, a node rebooting, a storage
    /// hiccup, a template or token an operator has to mend) are still
    /// retried, with capped backoff, while the job still wants a runner
    /// (with `[github]`: while GitHub still has it queued). Only a foreign
    /// VM holding the instance's name fails the job at once. The default,
    /// 2h, outlasts a long backup window.
    #[serde(with = "humantime_serde")]
    pub retry_deadline: Duration,
    /// First retry delay after a transient provisioner error; doubles.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// On SIGTERM, work in flight gets this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Public base URL of the webhook gateway, as VMs reach it; the seed URL
    /// `<gateway_url>/cloud-init/<token>/` is built from it. Unset: no
    /// bootstrap (the template registers its runner itself).
    pub gateway_url: Option<String>,
    /// How long a bootstrap token stays valid.
    #[serde(with = "humantime_serde")]
    pub bootstrap_ttl: Duration,
    /// How long a deleted instance's record is kept for inspection.
    #[serde(with = "humantime_serde")]
    pub instance_retention: Duration,
    /// Time between two passes of the reconciler. The elected replica
    /// holds its lease for three intervals, so a crashed leader is replaced
    /// within about that long.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// An instance whose runner has not taken a job this long after it was
    /// recorded is torn down (the VM did not boot, its runner did not
    /// register, or GitHub gave its job to another runner).
    #[serde(with = "humantime_serde")]
    pub bootstrap_timeout: Duration,
    /// Any instance this old is torn down, busy or not. The default, 8h, is
    /// GitHub's default job timeout (`timeout-minutes`: 360) plus room for
    /// boot, queueing and clean-up; workflows that raise `timeout-minutes`
    /// (self-hosted jobs may run up to 5 days) need a larger value.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// A VM carrying this installation's marker that the store does not
    /// know (or knows as deleted) is deleted once it is this old (orphan).
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,

    // GitHub-side recovery (used only with `[github]`).
    /// GitHub API calls an hour this replica may spend on optional work:
    /// the job-status check before a VM is spent, and the lost-webhook scan
    /// (a token bucket refilled evenly). Spent: jobs are provisioned
    /// unchecked and the scan waits. Runner registration and teardown are
    /// never held back by it. GitHub allows 5,000 calls an hour to a PAT
    /// and at least 5,000 to an App installation.
    pub github_api_budget: u32,
    /// How often the reconciler's leader looks for lost webhooks: queued
    /// jobs GitHub never told GRS about (scanned and submitted like a
    /// webhook) and failed `workflow_job` deliveries (redelivered). Checked
    /// at each reconciler pass, so the effective period is the larger of
    /// this and `reconcile_interval`.
    #[serde(with = "humantime_serde")]
    pub recovery_interval: Duration,
    /// Failed deliveries older than this are not redelivered (GitHub keeps
    /// them three days; the scan of queued jobs covers older losses).
    #[serde(with = "humantime_serde")]
    pub recovery_lookback: Duration,
    /// Repositories (`owner/name`) the lost-webhook scan looks at when
    /// `github.organization` is set, besides those of the jobs GRS recorded
    /// recently. With `github.repository`, that repository is scanned.
    pub recovery_repositories: Vec<String>,
    /// A job GRS has had in progress on one of its instances (or bound to a
    /// created instance whose runner has not taken it) this long is asked
    /// about with GitHub by the reconciler's leader, and again every this
    /// long: a `completed` GitHub reports is applied as its lost webhook
    /// would have been (the runner's VM goes). One API call per such job
    /// per period, from `github_api_budget`.
    #[serde(with = "humantime_serde")]
    pub recovery_running_age: Duration,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50051).into(),
            metrics_listen: None,
            installation_id: "grs".into(),
            instance_prefix: "grs".into(),
            store: StoreKind::Redis,
            auth_token: None,
            auth_token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            dispatchers_per_pool: 0,
            teardown_workers: 4,
            claim_timeout: Duration::from_secs(60),
            max_attempts: 0,
            retry_deadline: Duration::from_secs(2 * 3600),
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            gateway_url: None,
            bootstrap_ttl: Duration::from_secs(30 * 60),
            instance_retention: Duration::from_secs(24 * 3600),
            reconcile_interval: Duration::from_secs(30),
            bootstrap_timeout: Duration::from_secs(15 * 60),
            max_lifetime: Duration::from_secs(8 * 3600),
            orphan_grace: Duration::from_secs(10 * 60),
            github_api_budget: 1000,
            recovery_interval: Duration::from_secs(60),
            recovery_lookback: Duration::from_secs(3600),
            recovery_repositories: Vec::new(),
            recovery_running_age: Duration::from_secs(10 * 60),
        }
    }
}

/// `[redis]`
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` or `rediss://` for TLS.
    /// Production Redis must persist (AOF) or accepted jobs die with it.
    pub url: String,
    /// Every key GRS writes starts with `<key_prefix>:`.
    pub key_prefix: String,
    /// How long a webhook delivery id is remembered for de-duplication.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// How long an ended job's record is kept.
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
    /// Approximate number of events kept for `WatchEvents`.
    pub events_max: u64,
    /// The Redis password (`AUTH`), kept out of `url`; wins over a password
    /// in `url`. Secret: from `GRS_REDIS_PASSWORD` or `password_file`.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    /// File holding the Redis password.
    pub password_file: Option<PathBuf>,
    /// After every write, wait until this many replicas acknowledged it
    /// (Redis `WAIT`) before answering; a write not replicated within
    /// `wait_timeout` is answered UNAVAILABLE (the caller retries; the
    /// replay is de-duplicated). 0, the default: answer once the primary has
    /// it. With Sentinel, 1 keeps an accepted event through a failover.
    pub wait_replicas: u32,
    /// How long a write waits for `wait_replicas` acknowledgements.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// `[redis.sentinel]`: find the primary through Redis Sentinel instead
    /// of `url`'s host and port.
    pub sentinel: RedisSentinelConfig,
}

/// `[redis.sentinel]`: Redis Sentinel. On when `master_name` is set; `url`
/// then supplies only the user name, password and database number of the
/// data nodes, its host and port being unused (the sentinels name the
/// primary, and a new one after a failover).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSentinelConfig {
    /// The name the sentinels monitor the primary under (`sentinel monitor
    /// <master_name> ...`). Empty: Sentinel is off.
    pub master_name: String,
    /// The sentinels, `host:port` each (26379 is Sentinel's usual port).
    pub addresses: Vec<String>,
    /// The sentinels' own password (their `requirepass`), if they have one.
    /// Secret: from `GRS_REDIS_SENTINEL_PASSWORD` or `password_file`.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    /// File holding the sentinels' password.
    pub password_file: Option<PathBuf>,
}

impl RedisSentinelConfig {
    /// Whether the primary is found through Sentinel.
    pub fn enabled(&self) -> bool {
        !self.master_name.is_empty()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "grs".into(),
            dedup_ttl: Duration::from_secs(4 * 24 * 3600),
            job_retention: Duration::from_secs(7 * 24 * 3600),
            events_max: 10_000,
            password: None,
            password_file: None,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(2),
            sentinel: RedisSentinelConfig::default(),
        }
    }
}

/// `[pools.<name>]`: a set of labels served by one provisioner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// The labels its runners register with. A job goes to a pool that has
    /// all its labels (case-insensitive); of several, the one with the fewest
    /// labels (the least specialised), then by name.
    pub labels: Vec<String>,
    /// Most live instances at once.
    pub max_instances: u32,
    /// Warm pool: instances to keep booted with an idle runner of the pool's
    /// labels, so a matching job starts without waiting for a clone. A job
    /// takes one of them when one is idle (GitHub hands it to any idle
    /// runner with its labels), and the pool is refilled. Counted within
    /// `max_instances`. Live-adjustable (`UpdatePool`).
    pub min_idle: u32,
    /// An idle warm instance this old is replaced by a fresh one, so
    /// template and runner updates reach the warm pool (and a runner whose
    /// registration went stale does not linger). Default 1h.
    #[serde(with = "humantime_serde")]
    pub idle_max_age: Duration,
    /// Start paused: jobs queue, no instance starts until resumed.
    pub paused: bool,
    /// GitHub runner group id the runners join.
    pub runner_group_id: u64,
    /// The unprivileged user the runner runs as inside the VM.
    pub runner_user: String,
    /// Where the template has the runner unpacked.
    pub runner_dir: String,
    /// A cloud-config template for the instances' user-data (placeholders:
    /// `{{ instance_name }}`, `{{ runner_user }}`, `{{ runner_dir }}`,
    /// `{{ jit_config }}`, `{{ jit_config_path }}`). Default: GRS's own,
    /// which writes the JIT config readable only by the runner user and
    /// starts `run.sh --jitconfig` as that user.
    pub user_data_template_file: Option<PathBuf>,
    /// The template's text, read from `user_data_template_file` at start-up.
    #[serde(skip)]
    pub user_data_template: Option<String>,
    /// The backend making its instances (`[pools.<name>.provisioner]`).
    /// Required: a pool without one is a configuration error.
    pub provisioner: Option<ProvisionerConfig>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            labels: Vec::new(),
            max_instances: 4,
            min_idle: 0,
            idle_max_age: Duration::from_secs(3600),
            paused: false,
            runner_group_id: 1,
            runner_user: "runner".into(),
            runner_dir: "/home/runner/actions-runner".into(),
            user_data_template_file: None,
            user_data_template: None,
            provisioner: None,
        }
    }
}

/// `[pools.<name>.provisioner]`: which backend makes the pool's instances
/// (`type`), and the pool's settings for it.
///
/// Every key but the ones below is the pool's [`PoolDocument`], handed to
/// the backend as it is: GRS needs no code for a backend it does not know.
/// - `type`: an in-process backend registered by the binary (`fake`,
///   `proxmox`), `grpc` (a plugin GRS reaches at `endpoint`), or `plugin` (a
///   plugin executable GRS starts itself: `command`).
/// - `endpoint` (`grpc` only): `http://HOST:PORT` or `unix:/PATH`.
/// - `command` (`plugin` only): program and arguments.
/// - `call_timeout`, `create_timeout` (`grpc`, `plugin`): deadlines of the
///   calls to the plugin (default 30s; 15m for create and delete).
///
/// Pools with the same `endpoint` (or `command`) share one connection (and
/// one process).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionerConfig {
    /// The backend: `fake`, `proxmox`, `grpc`, `plugin`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// `type = "grpc"`: where the plugin listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `type = "plugin"`: the executable and its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Deadline of a plugin call (`grpc`, `plugin`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    pub call_timeout: Option<Duration>,
    /// Deadline of a plugin's create, delete and remove-all (`grpc`, `plugin`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    pub create_timeout: Option<Duration>,
    /// The rest: the pool's settings for the backend.
    #[serde(flatten)]
    pub document: PoolDocument,
}

impl ProvisionerConfig {
    /// A section of `type = kind` with no settings.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            endpoint: None,
            command: None,
            call_timeout: None,
            create_timeout: None,
            document: PoolDocument::new(),
        }
    }

    /// `type = "fake"`, the in-memory backend (demo, tests).
    pub fn fake() -> Self {
        Self::new("fake")
    }

    /// A section of `type = kind` whose document is `settings` serialized
    /// (e.g. a backend's typed pool settings).
    pub fn with_settings<T: Serialize>(
        kind: impl Into<String>,
        settings: &T,
    ) -> Result<Self, serde_json::Error> {
        let mut c = Self::new(kind);
        match serde_json::to_value(settings)? {
            serde_json::Value::Object(m) => c.document = m,
            other => {
                return Err(serde::ser::Error::custom(format!(
                    "pool settings must serialize to a table, not {other}"
                )));
            }
        }
        Ok(c)
    }

    /// Whether GRS reaches this backend over gRPC.
    pub fn is_remote(&self) -> bool {
        matches!(self.kind.as_str(), "grpc" | "plugin")
    }

    /// Checks the keys GRS reads itself; errors name the key.
    fn validate(&self, pool: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("pools.{pool}.provisioner.{k}");
        if self.kind.trim().is_empty() {
            return Err(ConfigError::key(key("type"), "must name a backend"));
        }
        match self.kind.as_str() {
            "grpc" => {
                let e = self.endpoint.as_deref().ok_or_else(|| {
                    ConfigError::key(
                        key("endpoint"),
                        "type = \"grpc\" needs the plugin's endpoint (http://HOST:PORT or unix:/PATH)",
                    )
                })?;
                Address::parse(e).map_err(|e| ConfigError::key(key("endpoint"), e.to_string()))?;
                if self.command.is_some() {
                    return Err(ConfigError::key(
                        key("command"),
                        "is for type = \"plugin\"; a grpc pool's plugin is started by someone else",
                    ));
                }
            }
            "plugin" => {
                if self
                    .command
                    .as_ref()
                    .is_none_or(|c| c.is_empty() || c[0].is_empty())
                {
                    return Err(ConfigError::key(
                        key("command"),
                        "type = \"plugin\" needs the plugin's command (program and arguments)",
                    ));
                }
                if self.endpoint.is_some() {
                    return Err(ConfigError::key(
                        key("endpoint"),
                        "is for type = \"grpc\"; GRS gives a plugin it starts its own socket",
                    ));
                }
            }
            other => {
                for (k, set) in [
                    ("endpoint", self.endpoint.is_some()),
                    ("command", self.command.is_some()),
                    ("call_timeout", self.call_timeout.is_some()),
                    ("create_timeout", self.create_timeout.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::key(
                            key(k),
                            format!(
                                "is for type = \"grpc\" or \"plugin\", not for the in-process backend {other:?}"
                            ),
                        ));
                    }
                }
            }
        }
        for (k, v) in [
            ("call_timeout", self.call_timeout),
            ("create_timeout", self.create_timeout),
        ] {
            if v.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::key(key(k), "must be greater than zero"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The GitHub-side recovery keys of `[control_plane]`.
    fn validate_recovery(&self) -> Result<(), ConfigError> {
        let cp = &self.control_plane;
        for (key, value) in [
            ("recovery_interval", cp.recovery_interval),
            ("recovery_lookback", cp.recovery_lookback),
            ("recovery_running_age", cp.recovery_running_age),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(
                    format!("control_plane.{key}"),
                    "must be greater than zero",
                ));
            }
        }
        if !cp.recovery_repositories.is_empty() {
            let key = "control_plane.recovery_repositories";
            match &self.github {
                Some(gh) if gh.organization.is_some() => {}
                Some(_) => {
                    return Err(ConfigError::key(
                        key,
                        "is for github.organization; with github.repository that repository is scanned",
                    ));
                }
                None => return Err(ConfigError::key(key, "needs a [github] section")),
            }
            if let Some(bad) = cp.recovery_repositories.iter().find(|r| {
                r.split_once('/')
                    .is_none_or(|(o, n)| o.is_empty() || n.is_empty() || n.contains('/'))
            }) {
                return Err(ConfigError::key(key, format!("{bad:?} is not owner/name")));
            }
        }
        Ok(())
    }

    /// Resolves secrets from files and checks every value; errors name the
    /// key.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let cp = &mut self.control_plane;
        cp.auth_token = grs_config::secret(
            "control_plane.auth_token",
            cp.auth_token.as_ref(),
            cp.auth_token_file.as_deref(),
        )?;
        if cp.tls_cert_file.is_some() != cp.tls_key_file.is_some() {
            return Err(ConfigError::key(
                "control_plane.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        if cp.installation_id.is_empty()
            || cp.installation_id.len() > 64
            || !cp
                .installation_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::key(
                "control_plane.installation_id",
                format!(
                    "{:?} must be 1 to 64 letters, digits, '-' or '_'",
                    cp.installation_id
                ),
            ));
        }
        // 42 + '-' + 20 digits of a u64 = 63, a DNS label's limit.
        if cp.instance_prefix.len() > 42 {
            return Err(ConfigError::key(
                "control_plane.instance_prefix",
                "must be at most 42 characters (names are <prefix>-<job id>, at most 63)",
            ));
        }
        grs_provisioner::validate_instance_name(&cp.instance_prefix)
            .map_err(|e| ConfigError::key("control_plane.instance_prefix", e.to_string()))?;
        if cp.teardown_workers == 0 {
            return Err(ConfigError::key(
                "control_plane.teardown_workers",
                "must be at least 1",
            ));
        }
        if cp.retry_deadline.is_zero() {
            return Err(ConfigError::key(
                "control_plane.retry_deadline",
                "must be more than 0s",
            ));
        }
        if cp.claim_timeout < Duration::from_secs(1) {
            return Err(ConfigError::key(
                "control_plane.claim_timeout",
                "must be at least 1s",
            ));
        }
        for (key, value) in [
            ("reconcile_interval", cp.reconcile_interval),
            ("bootstrap_timeout", cp.bootstrap_timeout),
            ("max_lifetime", cp.max_lifetime),
            ("orphan_grace", cp.orphan_grace),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(
                    format!("control_plane.{key}"),
                    "must be greater than zero",
                ));
            }
        }
        if cp.bootstrap_timeout >= cp.max_lifetime {
            return Err(ConfigError::key(
                "control_plane.bootstrap_timeout",
                format!(
                    "{} must be shorter than max_lifetime ({})",
                    humantime::format_duration(cp.bootstrap_timeout),
                    humantime::format_duration(cp.max_lifetime)
                ),
            ));
        }
        if let Some(url) = &cp.gateway_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::key(
                "control_plane.gateway_url",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        if !(self.redis.url.starts_with("redis://")
            || self.redis.url.starts_with("rediss://")
            || self.redis.url.starts_with("unix://"))
        {
            return Err(ConfigError::key(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        self.redis.validate_connection()?;
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::key(
                "redis.key_prefix",
                "must be non-empty without spaces",
            ));
        }
        if self.pools.is_empty() {
            return Err(ConfigError::key(
                "pools",
                "at least one pool must be configured ([pools.<name>])",
            ));
        }
        if let Some(gh) = &self.github {
            // Builds the client once to check scope, auth and key (no request).
            grs_github::GitHubClient::new(gh)
                .map_err(|e| ConfigError::key("github", e.to_string()))?;
        }
        self.validate_recovery()?;
        for (name, pool) in &mut self.pools {
            if let Some(path) = &pool.user_data_template_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::key(
                        format!("pools.{name}.user_data_template_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                pool.user_data_template = Some(text);
            }
            let sample = grs_github::cloud_init::RunnerBootstrap {
                instance_name: format!("{}-1", self.control_plane.instance_prefix),
                encoded_jit_config: SecretString::from("c2FtcGxl".to_owned()),
                runner_user: pool.runner_user.clone(),
                runner_dir: pool.runner_dir.clone(),
                jit_config_path: None,
            };
            let template = pool
                .user_data_template
                .as_deref()
                .unwrap_or(grs_github::cloud_init::DEFAULT_USER_DATA_TEMPLATE);
            grs_github::cloud_init::render_user_data(template, &sample).map_err(|e| {
                let key = if pool.user_data_template_file.is_some() {
                    "user_data_template_file"
                } else {
                    "runner_user"
                };
                ConfigError::key(format!("pools.{name}.{key}"), e.to_string())
            })?;
        }
        for (name, pool) in &self.pools {
            let key = |k: &str| format!("pools.{name}.{k}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::key(
                    format!("pools.{name}"),
                    "pool names are letters, digits, '-' and '_'",
                ));
            }
            if pool.labels.is_empty() {
                return Err(ConfigError::key(
                    key("labels"),
                    "a pool needs at least one label",
                ));
            }
            if pool.labels.iter().any(|l| l.trim().is_empty()) {
                return Err(ConfigError::key(key("labels"), "labels must not be empty"));
            }
            match &pool.provisioner {
                None => {
                    return Err(ConfigError::key(
                        key("provisioner"),
                        "every pool needs a [pools.<name>.provisioner] section with its type (e.g. type = \"fake\", \"proxmox\", \"grpc\" or \"plugin\")",
                    ));
                }
                Some(p) => p.validate(name)?,
            }
            if pool.idle_max_age.is_zero() {
                return Err(ConfigError::key(
                    key("idle_max_age"),
                    "must be longer than 0s (e.g. \"1h\")",
                ));
            }
            if pool.min_idle > pool.max_instances {
                return Err(ConfigError::key(
                    key("min_idle"),
                    format!(
                        "{} exceeds max_instances ({})",
                        pool.min_idle, pool.max_instances
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let t = grs_config::parse_file(std::path::Path::new("grs.toml"), text)?;
        let mut c: Config = grs_config::load_from(Some(t), Vec::<(String, String)>::new())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grs.toml"))
                .unwrap();
        let c = load(&text).unwrap();
        assert_eq!(c.control_plane.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.pools["linux"].labels, vec!["self-hosted", "linux", "x64"]);
    }

    #[test]
    fn bad_values_name_their_key() {
        let fake = "[pools.l.provisioner]\ntype='fake'\n";
        let e = load(&format!(
            "[pools.l]\nlabels=['a']\nmin_idle=5\nmax_instances=2\n{fake}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("pools.l.min_idle"), "{e}");
        let e = load(&format!(
            "[pools.l]\nlabels=['a']\nidle_max_age='0s'\n{fake}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("pools.l.idle_max_age"), "{e}");
        let c = load(&format!(
            "[pools.l]\nlabels=['a']\nmin_idle=1\nidle_max_age='20m'\n{fake}"
        ))
        .unwrap();
        assert_eq!(c.pools["l"].idle_max_age, Duration::from_secs(20 * 60));
        let c = load(&format!("[pools.l]\nlabels=['a']\n{fake}")).unwrap();
        assert_eq!(c.pools["l"].idle_max_age, Duration::from_secs(3600));
        let e = load(&format!(
            "[control_plane]\ninstance_prefix='Bad_Prefix'\n[pools.l]\nlabels=['a']\n{fake}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("control_plane.instance_prefix"), "{e}");
        let e = load(&format!(
            "[control_plane]\nclaim_timeout='soon'\n[pools.l]\nlabels=['a']\n{fake}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("control_plane.claim_timeout"), "{e}");
        let e = load("").unwrap_err().to_string();
        assert!(e.contains("pools"), "{e}");
    }

    #[test]
    fn a_pool_without_a_provisioner_is_an_error_not_a_fake() {
        let e = load("[pools.l]\nlabels=['a']\n").unwrap_err().to_string();
        assert!(
            e.contains("pools.l.provisioner") && e.contains("type"),
            "{e}"
        );
    }

    #[test]
    fn the_provisioner_section_is_type_keys_for_grs_and_a_document_for_the_backend() {
        let c = load(
            "[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='proxmox'\nnode='pve1'\ntemplate_vmid=9000\n",
        )
        .unwrap();
        let p = c.pools["l"].provisioner.as_ref().unwrap();
        assert_eq!(p.kind, "proxmox");
        assert_eq!(
            serde_json::Value::Object(p.document.clone()),
            serde_json::json!({"node": "pve1", "template_vmid": 9000})
        );
        let c = load(
            "[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='grpc'\nendpoint='unix:/run/grs/p.sock'\ncall_timeout='5s'\nzone='eu'\n",
        )
        .unwrap();
        let p = c.pools["l"].provisioner.as_ref().unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("unix:/run/grs/p.sock"));
        assert_eq!(p.call_timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            serde_json::Value::Object(p.document.clone()),
            serde_json::json!({"zone": "eu"})
        );
        for (section, key) in [
            ("type='grpc'", "pools.l.provisioner.endpoint"),
            (
                "type='grpc'\nendpoint='localhost:7000'",
                "pools.l.provisioner.endpoint",
            ),
            ("type='plugin'", "pools.l.provisioner.command"),
            ("type='plugin'\ncommand=[]", "pools.l.provisioner.command"),
            (
                "type='plugin'\ncommand=['p']\nendpoint='unix:/x'",
                "pools.l.provisioner.endpoint",
            ),
            ("type='fake'\ncommand=['p']", "pools.l.provisioner.command"),
            (
                "type='plugin'\ncommand=['p']\ncreate_timeout='0s'",
                "pools.l.provisioner.create_timeout",
            ),
            ("type=''", "pools.l.provisioner.type"),
        ] {
            let e = load(&format!(
                "[pools.l]\nlabels=['a']\n[pools.l.provisioner]\n{section}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(key), "{section}: {e}");
        }
    }

    #[test]
    fn reconciler_durations_default_and_are_checked() {
        let c = load("[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='fake'\n").unwrap();
        let cp = &c.control_plane;
        assert_eq!(cp.reconcile_interval, Duration::from_secs(30));
        assert_eq!(cp.bootstrap_timeout, Duration::from_secs(15 * 60));
        assert_eq!(cp.max_lifetime, Duration::from_secs(8 * 3600));
        assert_eq!(cp.orphan_grace, Duration::from_secs(10 * 60));
        let c = load(
            "[control_plane]\nreconcile_interval='5s'\nbootstrap_timeout='20m'\nmax_lifetime='2d'\norphan_grace='1h'\n[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='fake'\n",
        )
        .unwrap();
        assert_eq!(c.control_plane.max_lifetime, Duration::from_secs(2 * 86400));
        for key in [
            "reconcile_interval",
            "bootstrap_timeout",
            "max_lifetime",
            "orphan_grace",
        ] {
            let e = load(&format!(
                "[control_plane]\n{key}='0s'\n[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='fake'\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("control_plane.{key}")) && e.contains("zero"),
                "{e}"
            );
            let e = load(&format!(
                "[control_plane]\n{key}='often'\n[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='fake'\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("control_plane.{key}")), "{e}");
        }
        let e = load(
            "[control_plane]\nbootstrap_timeout='2h'\nmax_lifetime='2h'\n[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='fake'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("control_plane.bootstrap_timeout") && e.contains("max_lifetime"),
            "{e}"
        );
    }
}
