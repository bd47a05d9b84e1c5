//! Errors of the PVE API client, sorted by what a caller should do about them.
//!
//! Every message names the URL or resource at fault and carries PVE's own
//! status and text (`message`, per-parameter `errors`), never a secret: the
//! token secret lives only in the `Authorization` header, which no error
//! formats.

use std::collections::BTreeMap;
use std::time::Duration;

use grs_provisioner::ProvisionerError;

/// Why a PVE API call failed.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    /// No TCP/TLS connection could be made, or it broke before an answer.
    #[error("cannot reach PVE at {url}: {detail}")]
    Connect {
        /// The URL that was asked.
        url: String,
        /// The transport error and its causes.
        detail: String,
        /// Whether the request may have reached PVE (the connection broke
        /// after it was sent): a non-idempotent call must not be repeated
        /// blindly then.
        maybe_sent: bool,
    },

    /// The server's certificate was refused (untrusted CA, or a pinned
    /// fingerprint that does not match). GRS refuses to talk to it.
    #[error("TLS verification of {url} failed: {detail}")]
    Tls {
        /// The URL that was asked.
        url: String,
        /// What did not match (both fingerprints for a pin mismatch).
        detail: String,
    },

    /// No answer within the configured timeout.
    #[error("PVE did not answer {method} {url} within {after:?}")]
    Timeout {
        /// The HTTP method.
        method: String,
        /// The URL that was asked.
        url: String,
        /// The timeout that passed.
        after: Duration,
    },

    /// 401: the API token is wrong, expired or lacks the realm.
    #[error(
        "authentication failed at {url} for API token {token_id} (HTTP 401: {message}); check token id and secret"
    )]
    Auth {
        /// The URL that was asked.
        url: String,
        /// The token id (`user@realm!name`), never its secret.
        token_id: String,
        /// PVE's text.
        message: String,
    },

    /// Any other non-2xx answer, with PVE's status and text.
    #[error("PVE {method} {path} failed: HTTP {status}: {message}{}", fmt_errors(.errors))]
    Api {
        /// The HTTP method.
        method: String,
        /// The API path (below `/api2/json`).
        path: String,
        /// HTTP status.
        status: u16,
        /// PVE's `message` (first line of its error text), trimmed.
        message: String,
        /// Per-parameter errors of a 400 `Parameter verification failed.`
        errors: BTreeMap<String, String>,
    },

    /// A task (UPID) ended with an error exit status.
    #[error("PVE task {upid} failed: {exitstatus}{}", fmt_log(.log))]
    Task {
        /// The task's UPID.
        upid: String,
        /// PVE's exit status text.
        exitstatus: String,
        /// The last lines of the task log.
        log: Vec<String>,
    },

    /// A task still ran when its deadline passed (it may still finish).
    #[error("PVE task {upid} still running after {after:?}")]
    TaskTimeout {
        /// The task's UPID.
        upid: String,
        /// How long GRS waited.
        after: Duration,
    },

    /// PVE answered something GRS cannot read.
    #[error("unexpected answer from PVE {path}: {detail}")]
    Decode {
        /// The API path.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

fn fmt_errors(errors: &BTreeMap<String, String>) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.trim()))
        .collect();
    format!(" ({})", parts.join("; "))
}

fn fmt_log(log: &[String]) -> String {
    if log.is_empty() {
        return String::new();
    }
    format!(" (task log: {})", log.join(" | "))
}

impl PveError {
    /// The PVE text of the error (message, exit status), for matching.
    pub fn pve_text(&self) -> &str {
        match self {
            Self::Api { message, .. } => message,
            Self::Task { exitstatus, .. } => exitstatus,
            Self::Auth { message, .. } => message,
            _ => "",
        }
    }

    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Auth { .. } => Some(401),
            _ => None,
        }
    }

    /// A lock PVE could not take in time (`can't lock file ... got timeout`,
    /// pve-common `lock_file_full`; `cfs-lock 'storage-X' error: got lock
    /// request timeout`, pve-cluster `cfs_lock` as pve-storage's
    /// `cluster_lock_storage` takes it for shared storage) or a VM locked by
    /// another operation (`VM is locked (backup)`, pve-guest-common
    /// `check_lock`): passes by itself.
    pub fn is_lock_conflict(&self) -> bool {
        let t = self.pve_text();
        t.contains("got timeout")
            || t.contains("got lock request timeout")
            || t.contains("can't lock file")
            || t.contains("is locked")
            || (t.contains("cfs-lock") && t.contains("timeout"))
    }

    /// A lock PVE waited for and did not get (`... got timeout`, `got lock
    /// request timeout`): contention that passes within seconds, unlike a
    /// config lock held by a long operation (`VM is locked (backup)`).
    pub fn is_lock_timeout(&self) -> bool {
        let t = self.pve_text();
        t.contains("got timeout") || t.contains("got lock request timeout")
    }

    /// `Configuration file ... does not exist`: the VM is gone.
    pub fn is_vm_missing(&self) -> bool {
        let t = self.pve_text();
        t.contains("does not exist") && (t.contains("Configuration file") || t.contains(".conf"))
    }

    /// The VM id is taken already (nextid race).
    pub fn is_vmid_taken(&self) -> bool {
        let t = self.pve_text();
        t.contains("already exists") || t.contains("EEXIST") || t.contains("File exists")
    }

    /// A condition of the cluster that passes by itself, in PVE's words:
    /// a storage offline (pve-storage `activate_storage`: `storage 'X' is
    /// not online`), no quorum (pve-cluster `check_cfs_quorum`: `cluster not
    /// ready - no quorum?`), a node unreachable (the proxy's `No route to
    /// host`, HTTP 595).
    fn is_cluster_hiccup(&self) -> bool {
        let t = self.pve_text();
        t.contains("is not online")
            || t.contains("no quorum")
            || t.contains("No route to host")
            || t.contains("Connection refused")
            || t.contains("Connection timed out")
    }

    /// Whether the same call may succeed when repeated after a backoff:
    /// transport trouble, timeouts, locks, a storage or node that is down
    /// for a while, 5xx that are not a verdict on the request. Never 400,
    /// 401, 403, 501, nor a task that failed on the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } => true,
            Self::Api { status, .. } => match status {
                // PVE answers "everything else" with 500: only the kinds that
                // pass are worth repeating.
                500 => {
                    self.is_lock_conflict()
                        || self.is_cluster_hiccup()
                        || self.pve_text().contains("timeout")
                }
                502..=504 | 595..=599 => true,
                _ => false,
            },
            Self::Task { .. } => self.is_lock_conflict() || self.is_cluster_hiccup(),
            Self::TaskTimeout { .. } => true,
            Self::Tls { .. } | Self::Auth { .. } | Self::Decode { .. } => false,
        }
    }

    /// For an error that is a verdict on GRS's configuration: what to
    /// change, naming the config key.
    fn config_fix(&self) -> Option<&'static str> {
        let t = self.pve_text();
        if t.contains("Linked clone feature is not supported") {
            Some(
                "the template's disk cannot be linked-cloned: make the source a template on storage that supports linked clones, or set full_clone = true in the pool's proxmox config",
            )
        } else if t.contains("uses local storage") || t.contains("non-shared storage") {
            Some(
                "clones to another node need shared storage: move the template's disks (and the pool's storage) to shared storage, or place on the template's node",
            )
        } else if t.starts_with("storage '") && t.contains("does not exist") {
            Some(
                "check the pool's proxmox.storage and the template's disks against the cluster's storages",
            )
        } else if t.starts_with("pool '") && t.contains("does not exist") {
            Some("create the PVE resource pool or fix the pool's proxmox.resource_pool")
        } else {
            None
        }
    }
}

impl From<PveError> for ProvisionerError {
    fn from(e: PveError) -> Self {
        match &e {
            PveError::Auth { .. } | PveError::Tls { .. } => ProvisionerError::Config(e.to_string()),
            PveError::Api { status: 403, .. } => ProvisionerError::Config(format!(
                "{e}; the API token lacks this privilege (privilege separation: grant it to the token as well as its user)"
            )),
            _ if e.is_transient() => ProvisionerError::Transient(e.to_string()),
            _ => match e.config_fix() {
                Some(fix) => ProvisionerError::Config(format!("{e}; {fix}")),
                None => ProvisionerError::Permanent(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, message: &str) -> PveError {
        PveError::Api {
            method: "POST".into(),
            path: "/nodes/pve1/qemu/9000/clone".into(),
            status,
            message: message.into(),
            errors: BTreeMap::new(),
        }
    }

    #[test]
    fn lock_timeouts_and_5xx_gateways_are_transient() {
        assert!(
            api(
                500,
                "can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout"
            )
            .is_transient()
        );
        assert!(api(500, "VM is locked (clone)").is_transient());
        assert!(api(503, "service unavailable").is_transient());
        assert!(api(595, "No route to host").is_transient());
    }

    #[test]
    fn parameter_permission_and_auth_errors_are_permanent() {
        assert!(!api(400, "Parameter verification failed.").is_transient());
        assert!(!api(403, "Permission check failed (/vms/100, VM.Allocate)").is_transient());
        assert!(!api(501, "Method 'GET /nodes/x/foo' not implemented").is_transient());
        assert!(!api(500, "VM 100 is running - destroy failed").is_transient());
        let auth = PveError::Auth {
            url: "https://pve:8006".into(),
            token_id: "root@pam!grs".into(),
            message: "authentication failure".into(),
        };
        assert!(!auth.is_transient());
        assert!(matches!(
            ProvisionerError::from(auth),
            ProvisionerError::Config(m) if m.contains("authentication failed") && m.contains("root@pam!grs")
        ));
    }

    fn task(exitstatus: &str) -> PveError {
        PveError::Task {
            upid: "UPID:pve1:00000001:00000002:00000003:qmclone:9000:root@pam!grs:".into(),
            exitstatus: exitstatus.into(),
            log: Vec::new(),
        }
    }

    /// Windows that pass by themselves (issue 8, item 5): a backup's config
    /// lock, a node down, a storage or the cluster filesystem hiccuping,
    /// whether PVE says so synchronously or in a task's exit status.
    #[test]
    fn backup_locks_node_and_storage_hiccups_are_transient_in_calls_and_tasks() {
        for text in [
            "VM is locked (backup)",
            "storage 'nfs-images' is not online",
            "cluster not ready - no quorum?",
            "clone failed: cfs-lock 'storage-ceph' error: got lock request timeout",
            "can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout",
        ] {
            assert!(api(500, text).is_transient(), "HTTP 500 {text}");
            assert!(task(text).is_transient(), "task {text}");
            assert!(matches!(
                ProvisionerError::from(task(text)),
                ProvisionerError::Transient(_)
            ));
        }
        assert!(api(595, "No route to host").is_transient());
        assert!(task("clone failed: No route to host").is_transient());
    }

    /// Permanent failures say what to change.
    #[test]
    fn permanent_clone_failures_are_config_errors_naming_the_fix() {
        for (text, fix) in [
            (
                "Linked clone feature is not supported for drive 'scsi0'",
                "full_clone",
            ),
            ("storage 'fast' does not exist", "storage"),
            ("pool 'ci' does not exist", "resource_pool"),
        ] {
            match ProvisionerError::from(api(500, text)) {
                ProvisionerError::Config(m) => assert!(m.contains(fix), "{text}: {m}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            ProvisionerError::from(task("storage 'local-lvm' is full")),
            ProvisionerError::Permanent(_)
        ));
    }

    #[test]
    fn api_errors_show_status_message_and_parameter_errors() {
        let mut errors = BTreeMap::new();
        errors.insert(
            "name".to_string(),
            "invalid format - value does not look like a valid DNS name\n".to_string(),
        );
        let e = PveError::Api {
            method: "POST".into(),
            path: "/nodes/pve1/qemu/9000/clone".into(),
            status: 400,
            message: "Parameter verification failed.".into(),
            errors,
        };
        let s = e.to_string();
        assert!(s.contains("HTTP 400"), "{s}");
        assert!(s.contains("Parameter verification failed."), "{s}");
        assert!(s.contains("name: invalid format"), "{s}");
    }

    #[test]
    fn missing_vm_and_taken_id_are_recognised_by_pve_wording() {
        assert!(
            api(
                500,
                "Configuration file 'nodes/pve1/qemu-server/123.conf' does not exist"
            )
            .is_vm_missing()
        );
        assert!(api(500, "unable to create VM 123: config file already exists").is_vmid_taken());
        assert!(!api(500, "VM 123 is running - destroy failed").is_vm_missing());
    }
}
