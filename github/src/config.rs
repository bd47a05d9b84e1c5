//! `[github]`: how GRS reaches GitHub's REST API.
//!
//! ```toml
//! [github]
//! api_url = "https://api.github.com"      # GHES: "https://HOST/api/v3"
//! organization = "my-org"                 # or: repository = "owner/name"
//! runner_group_id = 1                     # 1 = Default
//!
//! [github.app]                            # preferred; or `token` (a PAT)
//! app_id = "123456"                       # or the app's client id
//! installation_id = 7890
//! private_key_file = "/etc/grs/github-app.pem"   # or GRS_GITHUB_APP_PRIVATE_KEY
//! ```
//!
//! Secrets (`token`, `app.private_key`) are never serialized and never
//! appear in `Debug` output (secrecy redacts them).

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The `[github]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitHubConfig {
    /// REST API base: `https://api.github.com`, or `https://HOST/api/v3` for
    /// GitHub Enterprise Server, or the simulator's URL in tests.
    pub api_url: String,
    /// Runners are registered at the organisation (set this) ...
    pub organization: Option<String>,
    /// ... or at one repository (`owner/name`). Exactly one of the two.
    pub repository: Option<String>,
    /// The runner group JIT runners join (organisation scope; 1 = Default).
    pub runner_group_id: u64,
    /// GitHub App credentials (preferred over `token`).
    pub app: Option<GitHubAppConfig>,
    /// A personal access token, when no app is configured.
    #[serde(default, skip_serializing)]
    pub token: Option<SecretString>,
    /// File holding the personal access token.
    pub token_file: Option<PathBuf>,
    /// Longest a call waits on a rate limit before giving up with
    /// `GitHubError::RateLimited` (the caller requeues).
    #[serde(with = "humantime_serde")]
    pub max_rate_limit_wait: Duration,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Attempts per call on 5xx and connection errors (1 = no retry).
    pub max_attempts: u32,
    /// The organisation (or, with `repository`, repository) webhook whose
    /// failed `workflow_job` deliveries GRS asks GitHub to redeliver. Unset
    /// with `[github.app]`: the App's own webhook; unset with a token: no
    /// redelivery (the scan of queued jobs still recovers lost webhooks).
    pub hook_id: Option<u64>,
}

impl Default for GitHubConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.github.com".into(),
            organization: None,
            repository: None,
            runner_group_id: 1,
            app: None,
            token: None,
            token_file: None,
            max_rate_limit_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(15),
            max_attempts: 3,
            hook_id: None,
        }
    }
}

/// `[github.app]`: a GitHub App installed on the organisation or repository.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitHubAppConfig {
    /// The JWT issuer: the app id or (preferred by GitHub) its client id.
    pub app_id: String,
    /// The installation whose tokens GRS uses.
    pub installation_id: u64,
    /// The app's private key (PEM), usually from `GRS_GITHUB_APP_PRIVATE_KEY`.
    #[serde(default, skip_serializing)]
    pub private_key: Option<SecretString>,
    /// File holding the app's private key (PEM).
    pub private_key_file: Option<PathBuf>,
}
