//! What a provisioner is asked to make and what it reports back.

use std::time::SystemTime;

use secrecy::SecretString;

/// Longest instance name: a DNS label (RFC 1123) is at most 63 characters.
pub const MAX_INSTANCE_NAME_LEN: usize = 63;

/// The instance name GRS uses for `job_id`: `<prefix>-<job id>`.
///
/// The prefix is validated once at configuration time with
/// [`validate_instance_name`]-compatible rules; the job id is digits, so the
/// result is a DNS label whenever the prefix is one and leaves 21 characters
/// free (the longest `u64` plus the dash).
pub fn instance_name(prefix: &str, job_id: u64) -> String {
    format!("{prefix}-{job_id}")
}

/// Why a name is not an instance name (see [`validate_instance_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInstanceName {
    /// Empty, or longer than [`MAX_INSTANCE_NAME_LEN`].
    #[error("instance name {name:?} must be 1 to {MAX_INSTANCE_NAME_LEN} characters long")]
    Length {
        /// The name refused.
        name: String,
    },
    /// A character other than a lowercase letter, a digit or `-`.
    #[error(
        "instance name {name:?} contains {found:?}; only lowercase letters, digits and '-' are allowed"
    )]
    Character {
        /// The name refused.
        name: String,
        /// Its first character not allowed.
        found: char,
    },
    /// Starts or ends with `-`.
    #[error("instance name {name:?} must not start or end with '-'")]
    Dash {
        /// The name refused.
        name: String,
    },
}

/// Checks that `name` is a DNS label: 1..=63 characters of lowercase ASCII
/// letters, digits and `-`, not starting or ending with `-`.
///
/// Hypervisors and GitHub both accept such names, so every backend can use
/// the instance name as the VM's name and the runner's name.
pub fn validate_instance_name(name: &str) -> Result<(), InvalidInstanceName> {
    let name_owned = || name.to_owned();
    if name.is_empty() || name.len() > MAX_INSTANCE_NAME_LEN {
        return Err(InvalidInstanceName::Length { name: name_owned() });
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(InvalidInstanceName::Character {
            name: name_owned(),
            found,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(InvalidInstanceName::Dash { name: name_owned() });
    }
    Ok(())
}

/// How the runner registration reaches the VM.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// Nothing: the template brings its own runner setup (tests, warm pools
    /// configured out of band).
    None,
    /// cloud-init NoCloud: the VM fetches its documents from `seed_url`
    /// (`<gateway>/cloud-init/<token>/`). The URL embeds a bootstrap token,
    /// hence a secret.
    CloudInit {
        /// NoCloud seed URL, ending in `/`.
        seed_url: SecretString,
    },
    /// QEMU guest agent: once the agent answers, write `content` to `path` and
    /// run `command`.
    GuestAgent {
        /// Where in the guest to write the runner config.
        path: String,
        /// The file's content (the JIT runner config: a secret).
        content: SecretString,
        /// The command that starts the runner (program and arguments).
        command: Vec<String>,
    },
}

/// What to make: one instance for one job of one pool.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// `<prefix>-<job id>`; also the runner's name. A DNS label.
    pub name: String,
    /// The pool the instance belongs to (carried in the ownership marker).
    pub pool: String,
    /// The job the instance is made for (carried in the ownership marker).
    pub job_id: u64,
    /// The pool's labels, for backends that tag VMs with them.
    pub labels: Vec<String>,
    /// How the runner registration gets into the VM.
    pub bootstrap: Bootstrap,
}

/// Lifecycle of an instance, after garm's provider states. Same names as
/// `grs.v1.InstanceState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Capacity taken; the backend has not been asked yet.
    PendingCreate,
    /// The backend is creating and starting the VM.
    Creating,
    /// The VM runs.
    Running,
    /// The VM exists but is stopped.
    Stopped,
    /// The backend reported an error.
    Error,
    /// Queued for teardown.
    PendingDelete,
    /// The backend is stopping and deleting the VM.
    Deleting,
    /// Gone.
    Deleted,
}

impl InstanceState {
    /// The snake_case name used in Redis, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingCreate => "pending_create",
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Error => "error",
            Self::PendingDelete => "pending_delete",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending_create" => Self::PendingCreate,
            "creating" => Self::Creating,
            "running" => Self::Running,
            "stopped" => Self::Stopped,
            "error" => Self::Error,
            "pending_delete" => Self::PendingDelete,
            "deleting" => Self::Deleting,
            "deleted" => Self::Deleted,
            _ => return None,
        })
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The instance name (`<prefix>-<job id>`).
    pub name: String,
    /// The backend's own id (Proxmox: `node/vmid`).
    pub provider_id: String,
    /// The pool recorded in the ownership marker.
    pub pool: String,
    /// The job recorded in the ownership marker, when known.
    pub job_id: Option<u64>,
    /// Where it stands.
    pub state: InstanceState,
    /// Where it runs (Proxmox: the node), when known.
    pub location: Option<String>,
    /// When the backend made it, when known.
    pub created_at: Option<SystemTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_dns_labels() {
        let name = instance_name("grs-linux", u64::MAX);
        assert_eq!(name, "grs-linux-18446744073709551615");
        validate_instance_name(&name).unwrap();
    }

    #[test]
    fn bad_instance_names_are_refused_with_the_reason() {
        let refused = |n: &str| validate_instance_name(n).unwrap_err();
        assert_eq!(refused(""), InvalidInstanceName::Length { name: "".into() });
        assert!(refused(&"a".repeat(64)).to_string().contains("63"));
        assert_eq!(
            refused("Grs-1"),
            InvalidInstanceName::Character {
                name: "Grs-1".into(),
                found: 'G'
            }
        );
        assert!(refused("grs_1").to_string().contains("'_'"));
        assert_eq!(
            refused("-grs"),
            InvalidInstanceName::Dash {
                name: "-grs".into()
            }
        );
        assert_eq!(
            refused("grs-"),
            InvalidInstanceName::Dash {
                name: "grs-".into()
            }
        );
        validate_instance_name("a").unwrap();
    }

    #[test]
    fn instance_states_round_trip_through_their_names() {
        use InstanceState::*;
        for s in [
            PendingCreate,
            Creating,
            Running,
            Stopped,
            Error,
            PendingDelete,
            Deleting,
            Deleted,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
        }
        assert_eq!(InstanceState::parse("Running"), None);
    }
}
