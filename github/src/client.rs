//! The GitHub REST client GRS uses: just-in-time runner configs, the
//! registration-token fallback, runners, and job status.
//!
//! Guarantees:
//! - Credentials (PAT, app key, JWT, installation tokens, JIT configs,
//!   registration tokens) never appear in logs, errors or `Debug` output.
//! - GitHub App installation tokens are cached and refreshed
//!   [`TOKEN_REFRESH_MARGIN`] before they expire, and once more after a 401.
//! - Rate limits are honoured: on 403/429 the client waits for
//!   `retry-after`, else until `x-ratelimit-reset` when
//!   `x-ratelimit-remaining` is 0, else backs off exponentially from one
//!   minute (GitHub's advice for secondary limits). A wait longer than
//!   `max_rate_limit_wait` is not slept: the call fails with
//!   [`GitHubError::RateLimited`] so the caller can requeue its work.
//! - 5xx answers and connection errors are retried with a short backoff,
//!   up to `max_attempts`.
//! - `delete_runner` of an absent runner succeeds; `generate_jit_config` is
//!   idempotent by runner name (a stale offline registration of the same
//!   name is removed and the config minted again).
//! - Every answer (and every call that got none) is reported to the
//!   [`ApiObserver`], if one is set, with its endpoint as a template
//!   (`GET /repos/{owner}/{repo}/actions/jobs/{id}`: bounded cardinality,
//!   no names or ids) and the `x-ratelimit-remaining` it carried; the last
//!   seen primary limit is kept ([`GitHubClient::rate_limit`]) so callers
//!   with optional work (the lost-webhook scan) can leave room for the
//!   calls that matter.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::GitHubConfig;

/// Installation tokens are refreshed this long before they expire.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

const API_VERSION: &str = "2022-11-28";

pub mod inspect;

/// What went wrong talking to GitHub. Never carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    /// The `[github]` configuration cannot work.
    #[error("github config: {0}")]
    Config(String),
    /// GitHub answered with an error status.
    #[error("GitHub {method} {path}: {status}: {message}")]
    Api {
        /// `GET`, `POST`, ...
        method: String,
        /// The API path (no query string, no credential).
        path: String,
        /// The HTTP status.
        status: u16,
        /// GitHub's `message`, if any.
        message: String,
    },
    /// A rate limit asks for a longer wait than we may sleep.
    #[error("GitHub rate limit: retry after {}s", retry_after.as_secs())]
    RateLimited {
        /// How long GitHub wants us to wait.
        retry_after: Duration,
    },
    /// No answer (connection refused, timeout, TLS, ...).
    #[error("GitHub {path}: {message}")]
    Transport {
        /// The API path.
        path: String,
        /// What failed.
        message: String,
    },
    /// An answer we could not read.
    #[error("GitHub {path}: unexpected response: {message}")]
    Decode {
        /// The API path.
        path: String,
        /// What was wrong with it.
        message: String,
    },
}

impl GitHubError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// An organisation (`login`).
    Organization(String),
    /// One repository.
    Repository {
        /// The owner's login.
        owner: String,
        /// The repository's name.
        name: String,
    },
}

impl Scope {
    fn runners_path(&self) -> String {
        match self {
            Self::Organization(org) => format!("/orgs/{org}/actions/runners"),
            Self::Repository { owner, name } => format!("/repos/{owner}/{name}/actions/runners"),
        }
    }
}

/// A self-hosted runner registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runner {
    /// GitHub's runner id.
    pub id: u64,
    /// The runner's name (for GRS runners: the instance name).
    pub name: String,
    /// `online` or `offline`.
    #[serde(default)]
    pub status: String,
    /// Whether it runs a job now.
    #[serde(default)]
    pub busy: bool,
    /// Whether it takes only one job.
    #[serde(default)]
    pub ephemeral: bool,
    /// Its labels.
    #[serde(default)]
    pub labels: Vec<RunnerLabel>,
    /// Operating system.
    #[serde(default)]
    pub os: String,
}

impl Runner {
    /// The label names.
    pub fn label_names(&self) -> Vec<String> {
        self.labels.iter().map(|l| l.name.clone()).collect()
    }
}

/// One label of a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerLabel {
    /// The label.
    pub name: String,
    /// `read-only` (default labels) or `custom`.
    #[serde(default, rename = "type")]
    pub kind: String,
}

/// A just-in-time runner config: the runner registered for it, and the
/// opaque blob for `run.sh --jitconfig`.
#[derive(Debug, Clone)]
pub struct JitConfig {
    /// The runner GitHub registered.
    pub runner: Runner,
    /// The encoded config; a credential.
    pub encoded_jit_config: SecretString,
}

/// A registration token for `config.sh --token` (valid one hour).
#[derive(Debug, Clone)]
pub struct RegistrationToken {
    /// The token; a credential.
    pub token: SecretString,
    /// When it expires (RFC 3339).
    pub expires_at: String,
}

/// A workflow job as the REST API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The job id.
    pub id: u64,
    /// Its run.
    #[serde(default)]
    pub run_id: u64,
    /// `queued`, `in_progress`, `completed`, `waiting`, ...
    pub status: String,
    /// Once completed.
    #[serde(default)]
    pub conclusion: Option<String>,
    /// The labels it asks for.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The runner that took it.
    #[serde(default)]
    pub runner_id: Option<u64>,
    /// That runner's name.
    #[serde(default)]
    pub runner_name: Option<String>,
    /// Display name.
    #[serde(default)]
    pub name: String,
}

impl Job {
    /// Still waiting for a runner (worth spending a VM on).
    pub fn is_queued(&self) -> bool {
        self.status == "queued" || self.status == "waiting" || self.status == "pending"
    }
}

/// Told about every API call the client makes (metrics).
pub trait ApiObserver: Send + Sync {
    /// One answer: `endpoint` as a template (see [`endpoint_template`]),
    /// its HTTP status (0: no answer), and the primary rate limit's
    /// `x-ratelimit-remaining`, when the answer carried it.
    fn response(&self, endpoint: &str, status: u16, rate_limit_remaining: Option<u64>);
}

/// The primary rate limit as the last answer reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// `x-ratelimit-limit`.
    pub limit: u64,
    /// `x-ratelimit-remaining`.
    pub remaining: u64,
    /// `x-ratelimit-reset`, as a time.
    pub reset: SystemTime,
}

/// A workflow run, as `GET /repos/{owner}/{repo}/actions/runs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowRun {
    /// The run id.
    pub id: u64,
    /// `queued`, `in_progress`, `completed`, ...
    #[serde(default)]
    pub status: String,
}

/// A webhook whose deliveries GRS may list and redeliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// The GitHub App's webhook (`/app/hook/...`, App JWT auth).
    App,
    /// An organisation webhook.
    Organization {
        /// The organisation's login.
        org: String,
        /// The hook's id.
        hook_id: u64,
    },
    /// A repository webhook.
    Repository {
        /// `owner/name`.
        repository: String,
        /// The hook's id.
        hook_id: u64,
    },
}

impl Hook {
    fn deliveries_path(&self) -> String {
        match self {
            Self::App => "/app/hook/deliveries".into(),
            Self::Organization { org, hook_id } => {
                format!("/orgs/{org}/hooks/{hook_id}/deliveries")
            }
            Self::Repository {
                repository,
                hook_id,
            } => format!("/repos/{repository}/hooks/{hook_id}/deliveries"),
        }
    }

    fn auth(&self) -> AuthAs {
        match self {
            Self::App => AuthAs::App,
            _ => AuthAs::Installation,
        }
    }
}

/// One delivery attempt of a webhook (`components/schemas/hook-delivery-item`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookDelivery {
    /// The attempt's id (what redelivery takes).
    pub id: u64,
    /// `X-GitHub-Delivery`, shared by an event's attempts and redeliveries.
    pub guid: String,
    /// When it was attempted (RFC 3339).
    #[serde(default)]
    pub delivered_at: String,
    /// Whether it was a redelivery.
    #[serde(default)]
    pub redelivery: bool,
    /// The receiver's status (GitHub: 200-399 is success).
    #[serde(default)]
    pub status_code: u16,
    /// `workflow_job`, `ping`, ...
    #[serde(default)]
    pub event: String,
    /// The event's action, if any.
    #[serde(default)]
    pub action: Option<String>,
}

impl HookDelivery {
    /// GitHub's own classification of a successful delivery.
    pub fn succeeded(&self) -> bool {
        (200..400).contains(&self.status_code)
    }

    /// `delivered_at` as a time, if it parses.
    pub fn delivered_at(&self) -> Option<SystemTime> {
        time::OffsetDateTime::parse(
            &self.delivered_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
        .map(SystemTime::from)
    }
}

/// Which credential a call is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthAs {
    /// The installation token (or the PAT).
    Installation,
    /// The App's JWT (`/app/...` endpoints).
    App,
}

enum Auth {
    Token(SecretString),
    App(AppAuth),
}

struct AppAuth {
    app_id: String,
    installation_id: u64,
    key: jsonwebtoken::EncodingKey,
    cached: Mutex<Option<CachedToken>>,
}

struct CachedToken {
    token: SecretString,
    expires_at: SystemTime,
}

/// The REST client. Cheap to clone; clones share the token cache.
#[derive(Clone)]
pub struct GitHubClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    api_url: String,
    scope: Scope,
    runner_group_id: u64,
    auth: Auth,
    max_rate_limit_wait: Duration,
    max_attempts: u32,
    observer: std::sync::OnceLock<Arc<dyn ApiObserver>>,
    rate_limit: std::sync::Mutex<Option<RateLimit>>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for GitHubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubClient")
            .field("api_url", &self.inner.api_url)
            .field("scope", &self.inner.scope)
            .field(
                "auth",
                &match self.inner.auth {
                    Auth::Token(_) => "token",
                    Auth::App(_) => "app",
                },
            )
            .finish()
    }
}

impl GitHubClient {
    /// A client for `config`, reading secrets from their files if needed.
    pub fn new(config: &GitHubConfig) -> Result<Self, GitHubError> {
        let scope = match (&config.organization, &config.repository) {
            (Some(org), None) if !org.is_empty() => Scope::Organization(org.clone()),
            (None, Some(repo)) => {
                let (owner, name) = repo
                    .split_once('/')
                    .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
                    .ok_or_else(|| {
                        GitHubError::Config(format!(
                            "`github.repository` must be `owner/name`, not {repo:?}"
                        ))
                    })?;
                Scope::Repository {
                    owner: owner.into(),
                    name: name.into(),
                }
            }
            _ => {
                return Err(GitHubError::Config(
                    "set exactly one of `github.organization` and `github.repository`".into(),
                ));
            }
        };
        let secret = |key: &str, inline, file: &Option<std::path::PathBuf>| {
            grs_secret(key, inline, file.as_deref())
        };
        let auth = if let Some(app) = &config.app {
            let pem = secret(
                "github.app.private_key",
                app.private_key.as_ref(),
                &app.private_key_file,
            )?
            .ok_or_else(|| {
                GitHubError::Config(
                    "`github.app.private_key_file` or GRS_GITHUB_APP_PRIVATE_KEY is required"
                        .into(),
                )
            })?;
            if app.app_id.is_empty() || app.installation_id == 0 {
                return Err(GitHubError::Config(
                    "`github.app.app_id` and `github.app.installation_id` are required".into(),
                ));
            }
            let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes())
                .map_err(|_| {
                    GitHubError::Config(
                        "`github.app.private_key` is not an RSA private key in PEM".into(),
                    )
                })?;
            Auth::App(AppAuth {
                app_id: app.app_id.clone(),
                installation_id: app.installation_id,
                key,
                cached: Mutex::new(None),
            })
        } else {
            let token = secret("github.token", config.token.as_ref(), &config.token_file)?
                .ok_or_else(|| {
                    GitHubError::Config(
                        "configure `[github.app]`, or a token (`github.token_file` or GRS_GITHUB_TOKEN)"
                            .into(),
                    )
                })?;
            Auth::Token(token)
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("grs/", env!("CARGO_PKG_VERSION")))
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| GitHubError::Config(format!("HTTP client: {e}")))?;
        let hook = match (config.hook_id, &scope, &auth) {
            (Some(hook_id), Scope::Organization(org), _) => Some(Hook::Organization {
                org: org.clone(),
                hook_id,
            }),
            (Some(hook_id), Scope::Repository { owner, name }, _) => Some(Hook::Repository {
                repository: format!("{owner}/{name}"),
                hook_id,
            }),
            (None, _, Auth::App(_)) => Some(Hook::App),
            (None, _, Auth::Token(_)) => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                api_url: config.api_url.trim_end_matches('/').to_owned(),
                scope,
                runner_group_id: config.runner_group_id,
                auth,
                max_rate_limit_wait: config.max_rate_limit_wait,
                max_attempts: config.max_attempts.max(1),
                observer: std::sync::OnceLock::new(),
                rate_limit: std::sync::Mutex::new(None),
                hook,
            }),
        })
    }

    /// Where this client registers runners.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// Reports every call to `observer` from now on (all clones share it).
    /// Only the first observer set is kept; false if one was set already.
    pub fn set_observer(&self, observer: Arc<dyn ApiObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// The primary rate limit as the last answer that carried it reported
    /// it; `None` before any.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        *self
            .inner
            .rate_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The webhook whose failed deliveries may be redelivered
    /// (`github.hook_id`, else the App's), if any.
    pub fn hook(&self) -> Option<&Hook> {
        self.inner.hook.as_ref()
    }

    /// Mints a just-in-time config for a runner called `name` (the instance
    /// name) with `labels` (the pool's), in the configured runner group.
    pub async fn generate_jit_config(
        &self,
        name: &str,
        labels: &[String],
        work_folder: Option<&str>,
    ) -> Result<JitConfig, GitHubError> {
        self.generate_jit_config_in_group(name, labels, None, work_folder)
            .await
    }

    /// [`generate_jit_config`](Self::generate_jit_config) in a pool's own
    /// runner group (`None`: `github.runner_group_id`).
    pub async fn generate_jit_config_in_group(
        &self,
        name: &str,
        labels: &[String],
        runner_group_id: Option<u64>,
        work_folder: Option<&str>,
    ) -> Result<JitConfig, GitHubError> {
        #[derive(Serialize)]
        struct Req<'a> {
            name: &'a str,
            runner_group_id: u64,
            labels: &'a [String],
            work_folder: &'a str,
        }
        #[derive(Deserialize)]
        struct Resp {
            runner: Runner,
            encoded_jit_config: String,
        }
        if labels.is_empty() || labels.len() > 100 {
            return Err(GitHubError::Config(format!(
                "a JIT runner needs 1 to 100 labels, not {}",
                labels.len()
            )));
        }
        let path = format!("{}/generate-jitconfig", self.inner.scope.runners_path());
        let req = Req {
            name,
            runner_group_id: runner_group_id.unwrap_or(self.inner.runner_group_id),
            labels,
            work_folder: work_folder.unwrap_or("_work"),
        };
        let first = self.call::<Resp>(Method::POST, &path, Some(&req)).await;
        let resp = match first {
            Err(GitHubError::Api { status: 409, .. }) => {
                // A runner of this name exists: a retry after a crash, or a
                // leftover. Remove it unless it is working, then mint again.
                let stale = self.list_runners(Some(name)).await?;
                for r in stale.iter().filter(|r| r.name == name) {
                    if r.busy {
                        return Err(GitHubError::Api {
                            method: "POST".into(),
                            path,
                            status: 409,
                            message: format!("runner {name} exists and is busy"),
                        });
                    }
                    tracing::info!(runner = %name, id = r.id, "removing stale runner registration before minting its JIT config again");
                    self.delete_runner(r.id).await?;
                }
                self.call::<Resp>(Method::POST, &path, Some(&req)).await?
            }
            other => other?,
        };
        Ok(JitConfig {
            runner: resp.runner,
            encoded_jit_config: SecretString::from(resp.encoded_jit_config),
        })
    }

    /// A registration token for `config.sh --ephemeral` (the fallback when
    /// JIT configs are not available, e.g. older GHES).
    pub async fn registration_token(&self) -> Result<RegistrationToken, GitHubError> {
        #[derive(Deserialize)]
        struct Resp {
            token: String,
            expires_at: String,
        }
        let path = format!("{}/registration-token", self.inner.scope.runners_path());
        let r: Resp = self.call(Method::POST, &path, None::<&()>).await?;
        Ok(RegistrationToken {
            token: SecretString::from(r.token),
            expires_at: r.expires_at,
        })
    }

    /// All runners of the scope (every page), or only those named `name`.
    pub async fn list_runners(&self, name: Option<&str>) -> Result<Vec<Runner>, GitHubError> {
        #[derive(Deserialize)]
        struct Resp {
            total_count: u64,
            runners: Vec<Runner>,
        }
        let mut out = Vec::new();
        for page in 1.. {
            let mut path = format!(
                "{}?per_page=100&page={page}",
                self.inner.scope.runners_path()
            );
            if let Some(n) = name {
                path.push_str("&name=");
                path.push_str(
                    &url::form_urlencoded::byte_serialize(n.as_bytes()).collect::<String>(),
                );
            }
            let r: Resp = self.call(Method::GET, &path, None::<&()>).await?;
            let got = r.runners.len();
            out.extend(r.runners);
            if got < 100 || out.len() as u64 >= r.total_count {
                break;
            }
        }
        Ok(out)
    }

    /// Removes a runner registration. Absent already is success.
    pub async fn delete_runner(&self, runner_id: u64) -> Result<(), GitHubError> {
        let path = format!("{}/{runner_id}", self.inner.scope.runners_path());
        match self.send(Method::DELETE, &path, None::<&()>).await {
            Ok(_) => Ok(()),
            Err(GitHubError::Api { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every registration named `name` (a runner that never ran its
    /// job, left behind by a deleted instance). Absent is success; returns
    /// how many were removed.
    pub async fn remove_runner_by_name(&self, name: &str) -> Result<usize, GitHubError> {
        let found = self.list_runners(Some(name)).await?;
        let mut removed = 0;
        for r in found.iter().filter(|r| r.name == name) {
            self.delete_runner(r.id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// One workflow job of `repository` (`owner/name`).
    /// <https://docs.github.com/rest/actions/workflow-jobs#get-a-job-for-a-workflow-run>
    pub async fn get_job(&self, repository: &str, job_id: u64) -> Result<Job, GitHubError> {
        let path = format!("/repos/{repository}/actions/jobs/{job_id}");
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// The newest workflow runs of `repository` with `status` (`queued`,
    /// `in_progress`, ...), one page of at most `per_page` (1 to 100).
    /// <https://docs.github.com/rest/actions/workflow-runs#list-workflow-runs-for-a-repository>
    pub async fn list_workflow_runs(
        &self,
        repository: &str,
        status: &str,
        per_page: u32,
    ) -> Result<Vec<WorkflowRun>, GitHubError> {
        #[derive(Deserialize)]
        struct Resp {
            workflow_runs: Vec<WorkflowRun>,
        }
        let path = format!(
            "/repos/{repository}/actions/runs?status={}&per_page={}",
            url::form_urlencoded::byte_serialize(status.as_bytes()).collect::<String>(),
            per_page.clamp(1, 100)
        );
        let r: Resp = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(r.workflow_runs)
    }

    /// The jobs of a run's latest attempt (first page, up to 100: a run with
    /// more jobs than that is rare, and the rest are found next pass once
    /// these have started).
    /// <https://docs.github.com/rest/actions/workflow-jobs#list-jobs-for-a-workflow-run>
    pub async fn list_run_jobs(
        &self,
        repository: &str,
        run_id: u64,
    ) -> Result<Vec<Job>, GitHubError> {
        #[derive(Deserialize)]
        struct Resp {
            jobs: Vec<Job>,
        }
        let path =
            format!("/repos/{repository}/actions/runs/{run_id}/jobs?filter=latest&per_page=100");
        let r: Resp = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(r.jobs)
    }

    /// One page (newest first) of `hook`'s delivery attempts (only the
    /// failed ones, 400 to 599 or no answer, when `failed_only`), from
    /// `cursor` (`None`: the newest); returns the page and the next page's
    /// cursor, if any.
    /// <https://docs.github.com/rest/apps/webhooks#list-deliveries-for-an-app-webhook>,
    /// <https://docs.github.com/rest/orgs/webhooks#list-deliveries-for-an-organization-webhook>
    pub async fn list_deliveries(
        &self,
        hook: &Hook,
        failed_only: bool,
        per_page: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<HookDelivery>, Option<String>), GitHubError> {
        let mut path = format!(
            "{}?per_page={}",
            hook.deliveries_path(),
            per_page.clamp(1, 100)
        );
        if failed_only {
            path.push_str("&status=failure");
        }
        if let Some(c) = cursor {
            path.push_str("&cursor=");
            path.push_str(&url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>());
        }
        let resp = self
            .send_as(hook.auth(), Method::GET, &path, None::<&()>)
            .await?;
        let next = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_cursor);
        let page: Vec<HookDelivery> = decode(&path, resp).await?;
        Ok((page, next))
    }

    /// Asks GitHub to redeliver delivery attempt `id` of `hook` (GitHub
    /// answers 202 and sends it shortly after, with the same guid).
    /// <https://docs.github.com/rest/apps/webhooks#redeliver-a-delivery-for-an-app-webhook>
    pub async fn redeliver(&self, hook: &Hook, id: u64) -> Result<(), GitHubError> {
        let path = format!("{}/{id}/attempts", hook.deliveries_path());
        self.send_as(hook.auth(), Method::POST, &path, None::<&()>)
            .await
            .map(|_| ())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, GitHubError> {
        let resp = self.send(method, path, body).await?;
        decode(path, resp).await
    }

    /// One call with retries and rate-limit handling; returns a 2xx answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<reqwest::Response, GitHubError> {
        self.send_as(AuthAs::Installation, method, path, body).await
    }

    /// Records what an answer says of the rate limit, and tells the
    /// observer.
    fn observe(
        &self,
        method: &Method,
        path: &str,
        status: u16,
        headers: Option<&header::HeaderMap>,
    ) {
        let num = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let remaining = num("x-ratelimit-remaining");
        if let (Some(remaining), Some(reset)) = (remaining, num("x-ratelimit-reset")) {
            *self
                .inner
                .rate_limit
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(RateLimit {
                limit: num("x-ratelimit-limit").unwrap_or(0),
                remaining,
                reset: UNIX_EPOCH + Duration::from_secs(reset),
            });
        }
        if let Some(o) = self.inner.observer.get() {
            o.response(&endpoint_template(method, path), status, remaining);
        }
    }

    /// [`send`](Self::send) with the credential `auth_as`.
    async fn send_as(
        &self,
        auth_as: AuthAs,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<reqwest::Response, GitHubError> {
        let inner = &self.inner;
        let url = format!("{}{}", inner.api_url, path);
        let mut attempt = 0u32;
        let mut rate_limited = 0u32;
        let mut reauthed = false;
        loop {
            attempt += 1;
            let auth = match (auth_as, &inner.auth) {
                (AuthAs::Installation, _) => self.authorization().await?,
                (AuthAs::App, Auth::App(app)) => bearer(&app_jwt(&app.app_id, &app.key)?)?,
                (AuthAs::App, Auth::Token(_)) => {
                    return Err(GitHubError::Config(format!(
                        "{} needs a GitHub App ([github.app]); a token cannot call it",
                        strip_query(path)
                    )));
                }
            };
            let mut req = inner
                .http
                .request(method.clone(), &url)
                .header(header::AUTHORIZATION, auth)
                .header(header::ACCEPT, "application/vnd.github+json")
                .header("x-github-api-version", API_VERSION);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    self.observe(&method, path, 0, None);
                    if attempt < inner.max_attempts {
                        tokio::time::sleep(short_backoff(attempt)).await;
                        continue;
                    }
                    return Err(GitHubError::Transport {
                        path: strip_query(path),
                        message: e.without_url().to_string(),
                    });
                }
            };
            let status = resp.status();
            self.observe(&method, path, status.as_u16(), Some(resp.headers()));
            if status.is_success() {
                return Ok(resp);
            }
            let headers = resp.headers().clone();
            let message = error_message(resp).await;
            if let Some(wait) = rate_limit_wait(status, &headers, &message, rate_limited) {
                rate_limited += 1;
                if wait > inner.max_rate_limit_wait {
                    tracing::warn!(path = %strip_query(path), wait_s = wait.as_secs(), "GitHub rate limit: giving up for now");
                    return Err(GitHubError::RateLimited { retry_after: wait });
                }
                tracing::info!(path = %strip_query(path), wait_ms = wait.as_millis() as u64, "GitHub rate limit: waiting");
                tokio::time::sleep(wait).await;
                attempt -= 1;
                continue;
            }
            if let (StatusCode::UNAUTHORIZED, false, Auth::App(app), AuthAs::Installation) =
                (status, reauthed, &inner.auth, auth_as)
            {
                // The cached installation token may have been revoked.
                *app.cached.lock().await = None;
                reauthed = true;
                attempt -= 1;
                continue;
            }
            if status.is_server_error() && attempt < inner.max_attempts {
                tokio::time::sleep(short_backoff(attempt)).await;
                continue;
            }
            return Err(GitHubError::Api {
                method: method.to_string(),
                path: strip_query(path),
                status: status.as_u16(),
                message,
            });
        }
    }

    /// The `Authorization` header value, minting an installation token when
    /// the cached one is missing or close to expiry.
    async fn authorization(&self) -> Result<header::HeaderValue, GitHubError> {
        let token = match &self.inner.auth {
            Auth::Token(t) => t.clone(),
            Auth::App(app) => {
                let mut cached = app.cached.lock().await;
                let fresh = cached.as_ref().is_some_and(|c| {
                    c.expires_at
                        .duration_since(SystemTime::now())
                        .is_ok_and(|left| left > TOKEN_REFRESH_MARGIN)
                });
                if !fresh {
                    *cached = Some(self.installation_token(app).await?);
                }
                cached
                    .as_ref()
                    .map(|c| c.token.clone())
                    .unwrap_or_else(|| SecretString::from(""))
            }
        };
        bearer(&token)
    }

    async fn installation_token(&self, app: &AppAuth) -> Result<CachedToken, GitHubError> {
        #[derive(Deserialize)]
        struct Resp {
            token: String,
            expires_at: String,
        }
        let jwt = app_jwt(&app.app_id, &app.key)?;
        let path = format!("/app/installations/{}/access_tokens", app.installation_id);
        let url = format!("{}{}", self.inner.api_url, path);
        let mut rate_limited = 0;
        loop {
            let resp = self
                .inner
                .http
                .post(&url)
                .header(header::AUTHORIZATION, bearer(&jwt)?)
                .header(header::ACCEPT, "application/vnd.github+json")
                .header("x-github-api-version", API_VERSION)
                .send()
                .await
                .map_err(|e| GitHubError::Transport {
                    path: path.clone(),
                    message: e.without_url().to_string(),
                })?;
            let status = resp.status();
            if status.is_success() {
                let r: Resp = resp.json().await.map_err(|e| GitHubError::Decode {
                    path: path.clone(),
                    message: e.without_url().to_string(),
                })?;
                let expires_at = time::OffsetDateTime::parse(
                    &r.expires_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .map(SystemTime::from)
                // An unreadable expiry: assume GitHub's documented hour.
                .unwrap_or_else(|_| SystemTime::now() + Duration::from_secs(3600));
                tracing::debug!(
                    installation = app.installation_id,
                    "minted a GitHub installation token"
                );
                return Ok(CachedToken {
                    token: SecretString::from(r.token),
                    expires_at,
                });
            }
            let headers = resp.headers().clone();
            let message = error_message(resp).await;
            if let Some(wait) = rate_limit_wait(status, &headers, &message, rate_limited) {
                rate_limited += 1;
                if wait > self.inner.max_rate_limit_wait {
                    return Err(GitHubError::RateLimited { retry_after: wait });
                }
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(GitHubError::Api {
                method: "POST".into(),
                path,
                status: status.as_u16(),
                message,
            });
        }
    }
}

/// A GitHub App JWT: RS256, `iat` 60 s in the past (clock drift), `exp`
/// nine minutes ahead (GitHub allows at most ten).
pub fn app_jwt(app_id: &str, key: &jsonwebtoken::EncodingKey) -> Result<SecretString, GitHubError> {
    #[derive(Serialize)]
    struct Claims<'a> {
        iat: u64,
        exp: u64,
        iss: &'a str,
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        iat: now.saturating_sub(60),
        exp: now + 9 * 60,
        iss: app_id,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        key,
    )
    .map(SecretString::from)
    .map_err(|e| GitHubError::Config(format!("cannot sign the GitHub App JWT: {e}")))
}

fn bearer(token: &SecretString) -> Result<header::HeaderValue, GitHubError> {
    let mut v = header::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
        .map_err(|_| {
            GitHubError::Config("a GitHub token has characters not allowed in a header".into())
        })?;
    v.set_sensitive(true);
    Ok(v)
}

fn grs_secret(
    key: &str,
    inline: Option<&SecretString>,
    file: Option<&std::path::Path>,
) -> Result<Option<SecretString>, GitHubError> {
    if let Some(s) = inline {
        return Ok(Some(s.clone()));
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| {
        GitHubError::Config(format!("`{key}_file`: cannot read {}: {e}", path.display()))
    })?;
    Ok(Some(SecretString::from(
        text.trim_end_matches(['\n', '\r']).to_owned(),
    )))
}

/// Reads a JSON answer.
async fn decode<T: DeserializeOwned>(
    path: &str,
    resp: reqwest::Response,
) -> Result<T, GitHubError> {
    let bytes = resp.bytes().await.map_err(|e| GitHubError::Transport {
        path: strip_query(path),
        message: e.without_url().to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| GitHubError::Decode {
        path: strip_query(path),
        message: e.to_string(),
    })
}

/// The `cursor` of the `rel="next"` link of a `link` header.
fn next_cursor(link: &str) -> Option<String> {
    link.split(',')
        .find(|part| part.contains("rel=\"next\""))
        .and_then(|part| {
            let url = part
                .split(';')
                .next()?
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>');
            let query = url.split_once('?')?.1;
            url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "cursor")
                .map(|(_, v)| v.into_owned())
        })
}

/// A call's endpoint as a template, for metrics: the method, then the path
/// without query and without the names and ids in it
/// (`GET /repos/{owner}/{repo}/actions/jobs/{id}`), so the number of
/// distinct values stays small.
pub fn endpoint_template(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut out = String::with_capacity(path.len() + 16);
    out.push_str(method.as_str());
    out.push(' ');
    for (i, seg) in segs.iter().enumerate() {
        out.push('/');
        let templ = match (segs.first().copied(), i) {
            (Some("orgs"), 1) => "{org}",
            (Some("repos"), 1) => "{owner}",
            (Some("repos"), 2) => "{repo}",
            _ if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) => "{id}",
            _ => seg,
        };
        out.push_str(templ);
    }
    out
}

fn strip_query(path: &str) -> String {
    path.split('?').next().unwrap_or(path).to_owned()
}

fn short_backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64 << attempt.min(5))
}

async fn error_message(resp: reqwest::Response) -> String {
    #[derive(Deserialize)]
    struct E {
        message: Option<String>,
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    serde_json::from_slice::<E>(&bytes)
        .ok()
        .and_then(|e| e.message)
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

/// How long to wait when `status`/`headers` say we were rate limited;
/// `None` when this is not a rate limit. `previous` counts the rate limits
/// already met by this call (exponential backoff for secondary limits).
pub fn rate_limit_wait(
    status: StatusCode,
    headers: &header::HeaderMap,
    message: &str,
    previous: u32,
) -> Option<Duration> {
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(secs) = num("retry-after") {
        return Some(Duration::from_secs(secs));
    }
    if let (Some(0), Some(reset)) = (num("x-ratelimit-remaining"), num("x-ratelimit-reset")) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // One second of slack: the reset is rounded to seconds.
        return Some(Duration::from_secs(reset.saturating_sub(now) + 1));
    }
    let secondary = status == StatusCode::TOO_MANY_REQUESTS
        || message.to_ascii_lowercase().contains("rate limit")
        || num("x-ratelimit-remaining") == Some(0);
    secondary.then(|| Duration::from_secs(60u64 << previous.min(4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> header::HeaderMap {
        let mut m = header::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn endpoints_are_templates_without_names_ids_or_queries() {
        assert_eq!(
            endpoint_template(&Method::GET, "/repos/octo/app/actions/jobs/12877621891"),
            "GET /repos/{owner}/{repo}/actions/jobs/{id}"
        );
        assert_eq!(
            endpoint_template(
                &Method::GET,
                "/orgs/acme/actions/runners?per_page=100&name=grs-1"
            ),
            "GET /orgs/{org}/actions/runners"
        );
        assert_eq!(
            endpoint_template(&Method::POST, "/app/hook/deliveries/20000000001/attempts"),
            "POST /app/hook/deliveries/{id}/attempts"
        );
    }

    #[test]
    fn the_next_cursor_comes_from_the_link_header() {
        let link = r#"</app/hook/deliveries?per_page=2&cursor=v1_123>; rel="next", </app/hook/deliveries?per_page=2>; rel="prev""#;
        assert_eq!(next_cursor(link).as_deref(), Some("v1_123"));
        assert_eq!(next_cursor(r#"</x?cursor=1>; rel="prev""#), None);
    }

    #[test]
    fn retry_after_wins_over_everything_else() {
        let w = rate_limit_wait(StatusCode::FORBIDDEN, &h(&[("retry-after", "7")]), "", 0);
        assert_eq!(w, Some(Duration::from_secs(7)));
    }

    #[test]
    fn an_exhausted_primary_limit_waits_until_the_reset() {
        let reset = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 30;
        let w = rate_limit_wait(
            StatusCode::FORBIDDEN,
            &h(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", &reset.to_string()),
            ]),
            "API rate limit exceeded",
            0,
        )
        .unwrap();
        assert!(
            w >= Duration::from_secs(29) && w <= Duration::from_secs(32),
            "{w:?}"
        );
    }

    #[test]
    fn secondary_limits_back_off_exponentially_from_a_minute() {
        let m = "You have exceeded a secondary rate limit";
        assert_eq!(
            rate_limit_wait(StatusCode::FORBIDDEN, &h(&[]), m, 0),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            rate_limit_wait(StatusCode::FORBIDDEN, &h(&[]), m, 2),
            Some(Duration::from_secs(240))
        );
        assert_eq!(
            rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &h(&[]), "", 0),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_plain_forbidden_is_not_a_rate_limit() {
        assert_eq!(
            rate_limit_wait(
                StatusCode::FORBIDDEN,
                &h(&[]),
                "Resource not accessible by integration",
                0
            ),
            None
        );
        assert_eq!(
            rate_limit_wait(StatusCode::NOT_FOUND, &h(&[("retry-after", "1")]), "", 0),
            None
        );
    }
}
