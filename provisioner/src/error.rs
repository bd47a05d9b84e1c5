//! Errors a [`Provisioner`](crate::Provisioner) returns, sorted by what the
//! caller should do about them.

/// Why a provisioner call failed.
///
/// Messages must name the thing at fault (instance, node, URL, setting) and
/// never carry a secret (tokens, runner configs).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionerError {
    /// A passing condition (lock timeout, connection reset, 5xx): the same call
    /// may succeed if retried after a backoff.
    #[error("transient provisioner error: {0}")]
    Transient(String),

    /// No room right now (every node full or down). Retry later; the job keeps
    /// its place.
    #[error("no capacity: {0}")]
    NoCapacity(String),

    /// A VM has the instance's name but not this installation's ownership
    /// marker. GRS never touches it.
    #[error(
        "instance {name} exists but is not owned by this GRS installation; refusing to touch it"
    )]
    NotOwned {
        /// The instance name that matched a foreign VM.
        name: String,
    },

    /// The request itself is wrong (bad name, bad size). Retrying won't help.
    #[error("invalid instance spec: {0}")]
    InvalidSpec(String),

    /// The backend's configuration is wrong or does not match reality
    /// (missing template, bad credentials). Retrying won't help.
    #[error("provisioner configuration error: {0}")]
    Config(String),

    /// The call names a pool the backend has no configuration for (never
    /// configured, or forgotten by a restarted plugin). GRS answers by
    /// configuring the pool again.
    #[error("unknown pool: {0}")]
    UnknownPool(String),

    /// The backend does not support this call (`start`/`stop` of a backend
    /// without the `start_stop` capability).
    #[error("not supported by this provisioner: {0}")]
    Unsupported(String),

    /// Anything else that will not pass by retrying.
    #[error("provisioner error: {0}")]
    Permanent(String),
}

impl ProvisionerError {
    /// Whether retrying the same call after a short backoff may succeed.
    /// (The control plane retries the others too, with capped backoff until
    /// `retry_deadline`: an operator may mend a template or a token while
    /// the job waits on GitHub.)
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient(_) | Self::NoCapacity(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passing_conditions_are_retryable() {
        assert!(ProvisionerError::Transient("lock".into()).is_retryable());
        assert!(ProvisionerError::NoCapacity("full".into()).is_retryable());
        assert!(!ProvisionerError::NotOwned { name: "x".into() }.is_retryable());
        assert!(!ProvisionerError::InvalidSpec("x".into()).is_retryable());
        assert!(!ProvisionerError::Config("x".into()).is_retryable());
        assert!(!ProvisionerError::Permanent("x".into()).is_retryable());
        assert!(!ProvisionerError::UnknownPool("x".into()).is_retryable());
        assert!(!ProvisionerError::Unsupported("x".into()).is_retryable());
    }
}
