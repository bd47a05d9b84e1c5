//! Configuration: the PVE connection (`[proxmox]`) and per-pool settings
//! (`[pools.<name>.proxmox]`).
//!
//! Both structs are self-contained serde types with `deny_unknown_fields`,
//! so a typo is an error at start-up, and each has a `validate` whose errors
//! name the offending key. Secrets are never part of the serialized form: the
//! token secret comes from `token_secret_file` or `GRS_PROXMOX_TOKEN_SECRET`
//! (or, in code only, [`ProxmoxConfig::token_secret`]).
//!
//! ```toml
//! [proxmox]
//! url = "https://pve1.example.org:8006"
//! token_id = "grs@pve!scaler"
//! token_secret_file = "/etc/grs/pve-token"   # or GRS_PROXMOX_TOKEN_SECRET
//! fingerprint = "AA:BB:...:FF"               # or ca_file = "/etc/grs/pve-root-ca.pem"
//! request_timeout = "30s"
//! nodes = [
//!   { name = "pve1", max_instances = 8 },
//!   { name = "pve2", max_instances = 8, reserved_memory_mib = 4096 },
//! ]
//!
//! [pools.linux.provisioner]
//! type = "proxmox"
//! node = "pve1"            # where the template lives
//! template_vmid = 9000
//! cores = 4
//! memory_mib = 8192
//! bridge = "vmbr0"
//! vlan = 20
//! bootstrap = "cloud-init" # or "guest-agent", "none"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Environment variable read for the token secret when no file is given.
pub const TOKEN_SECRET_ENV: &str = "GRS_PROXMOX_TOKEN_SECRET";

/// A configuration value that is wrong, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key at fault, e.g. `proxmox.url` or `pools.linux.proxmox.vlan`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// How to reach and authenticate to the PVE API (`[proxmox]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// API address, `https://host:8006` (a trailing `/api2/json` is accepted).
    pub url: String,
    /// API token id, `USER@REALM!TOKENID`.
    pub token_id: String,
    /// File holding the token secret (first line). When absent, the secret
    /// comes from `GRS_PROXMOX_TOKEN_SECRET`.
    #[serde(default)]
    pub token_secret_file: Option<PathBuf>,
    /// The secret itself: set by `GRS_PROXMOX_TOKEN_SECRET` through the
    /// shared config loader, or by code (tests, the demo). Never serialized,
    /// so never written anywhere.
    #[serde(default, skip_serializing)]
    pub token_secret: Option<SecretString>,
    /// PEM file of the CA that signed PVE's certificate (e.g. the cluster's
    /// `/etc/pve/pve-root-ca.pem`). Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of PVE's certificate (`AA:BB:...`, as the web UI
    /// shows it): that certificate and no other is accepted, whoever signed
    /// it. Takes precedence over `ca_file`.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Accept any certificate. For throw-away labs only; logged as a warning
    /// at every start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Time to set up a connection.
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time for one API call, answer included.
    #[serde(default = "d_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait for one task (clone, start, stop, destroy).
    #[serde(default = "d_task_timeout", with = "humantime_serde")]
    pub task_timeout: Duration,
    /// Attempts for a call that fails transiently (1 = no retry).
    #[serde(default = "d_retry_attempts")]
    pub retry_attempts: u32,
    /// First backoff between attempts; doubles each time, with jitter.
    #[serde(default = "d_retry_base_delay", with = "humantime_serde")]
    pub retry_base_delay: Duration,
    /// Longest backoff between attempts.
    #[serde(default = "d_retry_max_delay", with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Shortest interval between two polls of a task's status.
    #[serde(default = "d_task_poll_min", with = "humantime_serde")]
    pub task_poll_min: Duration,
    /// Longest interval between two polls of a task's status.
    #[serde(default = "d_task_poll_max", with = "humantime_serde")]
    pub task_poll_max: Duration,
    /// How long each type of task (`qmclone`, `qmstart`, `qmstop`,
    /// `qmdestroy`, ...) is expected to take before GRS has seen one on this
    /// cluster: the first status poll of such a task comes then. From the
    /// first task on GRS learns the real durations (per type, per template
    /// for clones); a type not listed is first polled after 1 s. Keys given
    /// here replace the default of that type only.
    #[serde(
        default = "d_task_expected",
        deserialize_with = "expected_tasks::deserialize",
        serialize_with = "expected_tasks::serialize"
    )]
    pub task_expected: BTreeMap<String, Duration>,
    /// Nodes GRS may place VMs on, with their limits. Empty: only the
    /// pool's template node (or its `target_node`).
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

/// One node VMs may be placed on (`[[proxmox.nodes]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The PVE node name.
    pub name: String,
    /// Most GRS instances (all pools of this installation) on the node at once.
    #[serde(default)]
    pub max_instances: Option<u32>,
    /// Memory to leave free on the node for the host itself, in MiB.
    #[serde(default = "d_reserve_mib")]
    pub reserved_memory_mib: u64,
}

fn d_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_task_timeout() -> Duration {
    Duration::from_secs(600)
}
fn d_retry_attempts() -> u32 {
    6
}
fn d_retry_base_delay() -> Duration {
    Duration::from_millis(250)
}
fn d_retry_max_delay() -> Duration {
    Duration::from_secs(8)
}
fn d_task_poll_min() -> Duration {
    Duration::from_millis(20)
}
/// Typical durations on a small cluster with local LVM-thin storage: a
/// linked clone of a template about a second, a start half a second, a hard
/// stop and a destroy a few hundred milliseconds.
fn d_task_expected() -> BTreeMap<String, Duration> {
    [
        ("qmclone", 1000),
        ("qmstart", 500),
        ("qmstop", 200),
        ("qmshutdown", 200),
        ("qmdestroy", 300),
    ]
    .into_iter()
    .map(|(k, ms)| (k.to_owned(), Duration::from_millis(ms)))
    .collect()
}

/// `task_expected`: a table of humantime durations; the keys given are
/// laid over the defaults.
mod expected_tasks {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let given = BTreeMap::<String, humantime_serde::Serde<Duration>>::deserialize(d)?;
        let mut all = super::d_task_expected();
        all.extend(given.into_iter().map(|(k, v)| (k, v.into_inner())));
        Ok(all)
    }

    pub(super) fn serialize<S: Serializer>(
        m: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        m.iter()
            .map(|(k, v)| (k, humantime_serde::Serde::from(*v)))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }
}
fn d_task_poll_max() -> Duration {
    Duration::from_secs(2)
}
fn d_reserve_mib() -> u64 {
    1024
}

impl ProxmoxConfig {
    /// A configuration with defaults for everything but the address and token.
    pub fn new(url: impl Into<String>, token_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token_id: token_id.into(),
            token_secret_file: None,
            token_secret: None,
            ca_file: None,
            fingerprint: None,
            insecure_skip_verify: false,
            connect_timeout: d_connect_timeout(),
            request_timeout: d_request_timeout(),
            task_timeout: d_task_timeout(),
            retry_attempts: d_retry_attempts(),
            retry_base_delay: d_retry_base_delay(),
            retry_max_delay: d_retry_max_delay(),
            task_poll_min: d_task_poll_min(),
            task_poll_max: d_task_poll_max(),
            task_expected: d_task_expected(),
            nodes: Vec::new(),
        }
    }

    /// Checks every key; the error names the first bad one
    /// (`proxmox.<key>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = url::Url::parse(&self.url).map_err(|e| {
            ConfigError::new("proxmox.url", format!("{:?} is not a URL: {e}", self.url))
        })?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err(ConfigError::new(
                "proxmox.url",
                format!("{:?} must be https://HOST[:PORT]", self.url),
            ));
        }
        validate_token_id(&self.token_id).map_err(|m| ConfigError::new("proxmox.token_id", m))?;
        if self.token_secret.is_none()
            && self.token_secret_file.is_none()
            && std::env::var_os(TOKEN_SECRET_ENV).is_none()
        {
            return Err(ConfigError::new(
                "proxmox.token_secret_file",
                format!("no token secret: set token_secret_file or {TOKEN_SECRET_ENV}"),
            ));
        }
        if let Some(fp) = &self.fingerprint {
            crate::tls::parse_fingerprint(fp)
                .map_err(|e| ConfigError::new("proxmox.fingerprint", e.to_string()))?;
        }
        if self.insecure_skip_verify && (self.fingerprint.is_some() || self.ca_file.is_some()) {
            return Err(ConfigError::new(
                "proxmox.insecure_skip_verify",
                "cannot be combined with fingerprint or ca_file",
            ));
        }
        for (key, d) in [
            ("proxmox.connect_timeout", self.connect_timeout),
            ("proxmox.request_timeout", self.request_timeout),
            ("proxmox.task_timeout", self.task_timeout),
            ("proxmox.task_poll_min", self.task_poll_min),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if self.task_poll_max < self.task_poll_min {
            return Err(ConfigError::new(
                "proxmox.task_poll_max",
                "must not be shorter than task_poll_min",
            ));
        }
        for (kind, d) in &self.task_expected {
            if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(ConfigError::new(
                    format!("proxmox.task_expected.{kind}"),
                    "not a PVE task type (lower-case letters, e.g. qmclone)",
                ));
            }
            if d.is_zero() || *d > self.task_timeout {
                return Err(ConfigError::new(
                    format!("proxmox.task_expected.{kind}"),
                    format!(
                        "must be greater than zero and at most task_timeout ({})",
                        humantime_serde::re::humantime::format_duration(self.task_timeout)
                    ),
                ));
            }
        }
        if self.retry_attempts == 0 {
            return Err(ConfigError::new(
                "proxmox.retry_attempts",
                "must be at least 1",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let key = format!("proxmox.nodes[{i}].name");
            validate_node_name(&n.name).map_err(|m| ConfigError::new(&key, m))?;
            if !seen.insert(n.name.as_str()) {
                return Err(ConfigError::new(
                    key,
                    format!("node {:?} is listed twice", n.name),
                ));
            }
            if n.max_instances == Some(0) {
                return Err(ConfigError::new(
                    format!("proxmox.nodes[{i}].max_instances"),
                    "must be at least 1 (remove the node to stop using it)",
                ));
            }
        }
        Ok(())
    }

    /// The token secret: the inline value, the file's first line, or the
    /// environment variable, in that order.
    pub fn resolve_token_secret(&self) -> Result<SecretString, ConfigError> {
        if let Some(s) = &self.token_secret {
            return Ok(s.clone());
        }
        if let Some(path) = &self.token_secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "proxmox.token_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let line = text.lines().next().unwrap_or("").trim().to_owned();
            if line.is_empty() {
                return Err(ConfigError::new(
                    "proxmox.token_secret_file",
                    format!("{} is empty", path.display()),
                ));
            }
            return Ok(SecretString::from(line));
        }
        match std::env::var(TOKEN_SECRET_ENV) {
            Ok(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_owned())),
            _ => Err(ConfigError::new(
                "proxmox.token_secret_file",
                format!("no token secret: set token_secret_file or {TOKEN_SECRET_ENV}"),
            )),
        }
    }

    /// The configured limits of `node`, if it is listed.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

fn validate_token_id(id: &str) -> Result<(), String> {
    // USER@REALM!TOKENID, as PVE's pve-tokenid format.
    let (user, token) = id
        .split_once('!')
        .ok_or_else(|| format!("{id:?} must look like USER@REALM!TOKENID"))?;
    let (u, realm) = user
        .split_once('@')
        .ok_or_else(|| format!("{id:?} must look like USER@REALM!TOKENID"))?;
    let ok_token = !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if u.is_empty() || realm.is_empty() || !ok_token {
        return Err(format!("{id:?} must look like USER@REALM!TOKENID"));
    }
    Ok(())
}

/// A PVE node name: a DNS label (letters, digits, `-`).
pub(crate) fn validate_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid node name"))
    }
}

/// How the runner registration reaches a VM of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootstrapMode {
    /// SMBIOS serial `ds=nocloud-net;s=<seed URL>` pointing cloud-init's
    /// NoCloud datasource (network mode) at the gateway.
    #[default]
    CloudInit,
    /// QEMU guest agent writes the runner config and starts the runner.
    GuestAgent,
    /// Nothing: the template brings its own setup.
    None,
}

/// Per-pool Proxmox settings (`[pools.<name>.provisioner]`, `type = "proxmox"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxPoolConfig {
    /// The node that holds the template.
    pub node: String,
    /// The template's VM id.
    pub template_vmid: u32,
    /// Full clone instead of a linked clone (slower, independent of the
    /// template; needed when the source is not a template).
    #[serde(default)]
    pub full_clone: bool,
    /// Clone onto this node (needs shared storage). When unset, placement
    /// picks among `[proxmox].nodes` (or uses the template's node).
    #[serde(default)]
    pub target_node: Option<String>,
    /// Copies of the template on other nodes, by node (`pve2 = 9001`): a VM
    /// placed on such a node is cloned from the copy there, on that node.
    /// Clones then neither cross nodes (no shared storage needed) nor wait
    /// for one template's storage lock: each node's local storage has its
    /// own, so a burst clones on every node at once. The copies must be
    /// kept in step with the template by the operator (same image, same
    /// options); GRS checks that each exists and is a template.
    #[serde(default)]
    pub template_replicas: BTreeMap<String, u32>,
    /// Target storage for full clones (not allowed for linked clones).
    #[serde(default)]
    pub storage: Option<String>,
    /// PVE resource pool to put the VMs in.
    #[serde(default)]
    pub resource_pool: Option<String>,
    /// CPU cores (default: the template's).
    #[serde(default)]
    pub cores: Option<u32>,
    /// Memory in MiB (default: the template's).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Bridge for `net0` (default: the template's network, untouched).
    #[serde(default)]
    pub bridge: Option<String>,
    /// VLAN tag for `net0` (needs `bridge`).
    #[serde(default)]
    pub vlan: Option<u16>,
    /// NIC model for `net0` when `bridge` is set.
    #[serde(default = "d_net_model")]
    pub net_model: String,
    /// How the runner registration gets into the VM.
    #[serde(default)]
    pub bootstrap: BootstrapMode,
    /// Longest wait for the guest agent to answer after start.
    #[serde(default = "d_agent_timeout", with = "humantime_serde")]
    pub agent_timeout: Duration,
}

fn d_net_model() -> String {
    "virtio".into()
}
fn d_agent_timeout() -> Duration {
    Duration::from_secs(300)
}

impl ProxmoxPoolConfig {
    /// Settings with defaults for everything but the template.
    pub fn new(node: impl Into<String>, template_vmid: u32) -> Self {
        Self {
            node: node.into(),
            template_vmid,
            full_clone: false,
            target_node: None,
            template_replicas: BTreeMap::new(),
            storage: None,
            resource_pool: None,
            cores: None,
            memory_mib: None,
            bridge: None,
            vlan: None,
            net_model: d_net_model(),
            bootstrap: BootstrapMode::default(),
            agent_timeout: d_agent_timeout(),
        }
    }

    /// Checks every key; errors name `pools.<pool>.proxmox.<key>`.
    pub fn validate(&self, pool: &str) -> Result<(), ConfigError> {
        let k = |key: &str| format!("pools.{pool}.proxmox.{key}");
        validate_node_name(&self.node).map_err(|m| ConfigError::new(k("node"), m))?;
        if !(100..=999_999_999).contains(&self.template_vmid) {
            return Err(ConfigError::new(
                k("template_vmid"),
                format!("{} is not a VM id (100 to 999999999)", self.template_vmid),
            ));
        }
        if let Some(t) = &self.target_node {
            validate_node_name(t).map_err(|m| ConfigError::new(k("target_node"), m))?;
            if !self.template_replicas.is_empty() {
                return Err(ConfigError::new(
                    k("template_replicas"),
                    "cannot be combined with target_node (every VM goes to that one node)",
                ));
            }
        }
        for (node, vmid) in &self.template_replicas {
            let key = k(&format!("template_replicas.{node}"));
            validate_node_name(node).map_err(|m| ConfigError::new(key.clone(), m))?;
            if !(100..=999_999_999).contains(vmid) {
                return Err(ConfigError::new(
                    key,
                    format!("{vmid} is not a VM id (100 to 999999999)"),
                ));
            }
            if *node == self.node && *vmid != self.template_vmid {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "node {node} holds the template itself ({}); a second template there would never be used",
                        self.template_vmid
                    ),
                ));
            }
        }
        if let Some(s) = &self.storage {
            if !self.full_clone {
                return Err(ConfigError::new(
                    k("storage"),
                    "only allowed with full_clone = true (PVE: parameter 'storage' not allowed for linked clones)",
                ));
            }
            let ok = s.len() >= 2
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
                })
                && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !ok {
                return Err(ConfigError::new(
                    k("storage"),
                    format!("{s:?} is not a storage id"),
                ));
            }
        }
        if let Some(p) = &self.resource_pool {
            let ok = !p.is_empty()
                && p.split('/').all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                });
            if !ok {
                return Err(ConfigError::new(
                    k("resource_pool"),
                    format!("{p:?} is not a pool id"),
                ));
            }
        }
        if self.cores == Some(0) {
            return Err(ConfigError::new(k("cores"), "must be at least 1"));
        }
        if let Some(m) = self.memory_mib
            && m < 16
        {
            return Err(ConfigError::new(
                k("memory_mib"),
                "must be at least 16 (MiB)",
            ));
        }
        if let Some(b) = &self.bridge {
            let ok = !b.is_empty()
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(ConfigError::new(
                    k("bridge"),
                    format!("{b:?} is not a bridge name"),
                ));
            }
        }
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(ConfigError::new(
                    k("vlan"),
                    format!("{v} is not a VLAN tag (1 to 4094)"),
                ));
            }
            if self.bridge.is_none() {
                return Err(ConfigError::new(k("vlan"), "needs bridge to be set"));
            }
        }
        const MODELS: &[&str] = &[
            "virtio",
            "e1000",
            "e1000e",
            "rtl8139",
            "vmxnet3",
            "i82551",
            "i82557b",
            "i82559er",
            "ne2k_isa",
            "ne2k_pci",
            "pcnet",
            "e1000-82540em",
            "e1000-82544gc",
            "e1000-82545em",
        ];
        if !MODELS.contains(&self.net_model.as_str()) {
            return Err(ConfigError::new(
                k("net_model"),
                format!("{:?} is not a PVE NIC model", self.net_model),
            ));
        }
        if self.agent_timeout.is_zero() {
            return Err(ConfigError::new(
                k("agent_timeout"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ProxmoxConfig {
        let mut c = ProxmoxConfig::new("https://pve.example:8006", "root@pam!grs");
        c.token_secret = Some(SecretString::from("s3cr3t-token-value"));
        c
    }

    #[test]
    fn toml_shaped_config_parses_with_defaults() {
        let c: ProxmoxConfig = serde_json::from_value(serde_json::json!({
            "url": "https://pve:8006",
            "token_id": "grs@pve!scaler",
            "fingerprint": "AA:BB",
            "request_timeout": "10s",
            "nodes": [{"name": "pve1", "max_instances": 4}]
        }))
        .unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.nodes[0].max_instances, Some(4));
        assert_eq!(c.nodes[0].reserved_memory_mib, 1024);
    }

    #[test]
    fn the_documented_toml_example_parses_and_validates() {
        // The example in this module's docs, as the lead embeds it.
        let doc = include_str!("config.rs");
        let toml_text: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| {
                l.trim_start_matches("//!")
                    .strip_prefix(' ')
                    .unwrap_or("")
                    .to_owned()
                    + "\n"
            })
            .collect();
        #[derive(Deserialize)]
        struct Pools {
            linux: PoolWrap,
        }
        #[derive(Deserialize)]
        struct PoolWrap {
            provisioner: ProxmoxPoolConfig,
        }
        #[derive(Deserialize)]
        struct Root {
            proxmox: ProxmoxConfig,
            pools: Pools,
        }
        // The `type` tag selects the backend; the control plane's config
        // consumes it before these settings are read.
        let text = toml_text
            .replace("AA:BB:...:FF", &["AB"; 32].join(":"))
            .replace("type = \"proxmox\"\n", "");
        let root: Root = toml::from_str(&text).unwrap();
        let mut c = root.proxmox;
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[1].reserved_memory_mib, 4096);
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        c.token_secret = Some(SecretString::from("x"));
        c.validate().unwrap();
        let p = root.pools.linux.provisioner;
        assert_eq!(p.bootstrap, BootstrapMode::CloudInit);
        assert_eq!(p.vlan, Some(20));
        p.validate("linux").unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_json::from_value::<ProxmoxConfig>(serde_json::json!({
            "url": "https://pve:8006", "token_id": "a@b!c", "tokn_secret": "x"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("tokn_secret"), "{e}");
        let e = serde_json::from_value::<ProxmoxPoolConfig>(serde_json::json!({
            "node": "pve1", "template_vmid": 9000, "vlna": 3
        }))
        .unwrap_err();
        assert!(e.to_string().contains("vlna"), "{e}");
    }

    #[test]
    fn task_expected_lays_the_given_types_over_the_defaults_and_is_checked() {
        let c: ProxmoxConfig = serde_json::from_value(serde_json::json!({
            "url": "https://pve:8006", "token_id": "a@b!c",
            "task_expected": {"qmclone": "3s", "vzdump": "1m"}
        }))
        .unwrap();
        assert_eq!(c.task_expected["qmclone"], Duration::from_secs(3));
        assert_eq!(c.task_expected["vzdump"], Duration::from_secs(60));
        assert_eq!(c.task_expected["qmstart"], Duration::from_millis(500));
        let mut c = conn();
        c.task_expected.insert("qmstart".into(), Duration::ZERO);
        assert_eq!(
            c.validate().unwrap_err().key,
            "proxmox.task_expected.qmstart"
        );
        let mut c = conn();
        c.task_expected
            .insert("QM start".into(), Duration::from_secs(1));
        assert_eq!(
            c.validate().unwrap_err().key,
            "proxmox.task_expected.QM start"
        );
    }

    #[test]
    fn template_replicas_are_checked() {
        let mut p = ProxmoxPoolConfig::new("pve1", 9000);
        p.template_replicas.insert("pve2".into(), 9001);
        p.validate("linux").unwrap();
        p.template_replicas.insert("pve1".into(), 9005);
        assert_eq!(
            p.validate("linux").unwrap_err().key,
            "pools.linux.proxmox.template_replicas.pve1"
        );
        p.template_replicas.remove("pve1");
        p.template_replicas.insert("pve3".into(), 5);
        assert_eq!(
            p.validate("linux").unwrap_err().key,
            "pools.linux.proxmox.template_replicas.pve3"
        );
        p.template_replicas.remove("pve3");
        p.target_node = Some("pve2".into());
        assert_eq!(
            p.validate("linux").unwrap_err().key,
            "pools.linux.proxmox.template_replicas"
        );
    }

    #[test]
    fn the_token_secret_is_never_serialized() {
        let text = serde_json::to_string(&conn()).unwrap();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(!format!("{:?}", conn()).contains("s3cr3t"));
    }

    #[test]
    fn validation_errors_name_the_key() {
        let mut c = conn();
        c.url = "pve:8006".into();
        assert_eq!(c.validate().unwrap_err().key, "proxmox.url");
        let mut c = conn();
        c.token_id = "root@pam".into();
        assert_eq!(c.validate().unwrap_err().key, "proxmox.token_id");
        let mut c = conn();
        c.fingerprint = Some("zz".into());
        assert_eq!(c.validate().unwrap_err().key, "proxmox.fingerprint");
        let mut c = conn();
        c.nodes = vec![NodeConfig {
            name: "pve1".into(),
            max_instances: Some(0),
            reserved_memory_mib: 0,
        }];
        assert_eq!(
            c.validate().unwrap_err().key,
            "proxmox.nodes[0].max_instances"
        );
        conn().validate().unwrap();

        let mut p = ProxmoxPoolConfig::new("pve1", 9000);
        p.storage = Some("local-lvm".into());
        assert_eq!(
            p.validate("linux").unwrap_err().key,
            "pools.linux.proxmox.storage"
        );
        let mut p = ProxmoxPoolConfig::new("pve1", 9000);
        p.vlan = Some(10);
        assert_eq!(
            p.validate("linux").unwrap_err().key,
            "pools.linux.proxmox.vlan"
        );
        p.bridge = Some("vmbr0".into());
        p.validate("linux").unwrap();
        p.vlan = Some(4095);
        assert!(p.validate("linux").unwrap_err().message.contains("4095"));
        let p = ProxmoxPoolConfig::new("pve1", 42);
        assert_eq!(
            p.validate("x").unwrap_err().key,
            "pools.x.proxmox.template_vmid"
        );
    }

    #[test]
    fn token_secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "abc-123\n").unwrap();
        let mut c = ProxmoxConfig::new("https://pve:8006", "root@pam!grs");
        c.token_secret_file = Some(path);
        use secrecy::ExposeSecret;
        assert_eq!(c.resolve_token_secret().unwrap().expose_secret(), "abc-123");
        c.token_secret_file = Some(dir.path().join("missing"));
        let e = c.resolve_token_secret().unwrap_err();
        assert_eq!(e.key, "proxmox.token_secret_file");
    }
}
