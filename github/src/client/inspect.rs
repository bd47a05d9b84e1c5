//! Read-only questions about the installation itself, for `grs doctor`:
//! what the credentials may do, and where the webhook points.
//!
//! - [`GitHubClient::app_installation`]: `GET /app/installations/{id}`
//!   (app JWT): the installation's granted permissions and events.
//! - [`GitHubClient::app_hook_config`]: `GET /app/hook/config` (app JWT):
//!   the app's webhook URL and content type.
//! - [`GitHubClient::webhooks`]: `GET /orgs/{org}/hooks` or
//!   `GET /repos/{owner}/{repo}/hooks` (installation token or PAT).
//! - [`GitHubClient::token_scopes`]: the `X-OAuth-Scopes` of a classic PAT
//!   (`None` for a fine-grained PAT, which does not send it).
//! - [`required_app_permissions`] and [`missing_pat_scopes`]: what GRS
//!   needs for the scope it registers runners at.

use std::collections::BTreeMap;

use reqwest::{Method, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{API_VERSION, Auth, GitHubClient, GitHubError, Scope, app_jwt, bearer, error_message};

/// `GET /app/installations/{id}`: what the installation was granted.
#[derive(Debug, Clone, Deserialize)]
pub struct Installation {
    /// The installation id.
    pub id: u64,
    /// Permission name → `read`, `write` or `admin`.
    #[serde(default)]
    pub permissions: BTreeMap<String, String>,
    /// The webhook events the app subscribes to (`workflow_job`, ...).
    #[serde(default)]
    pub events: Vec<String>,
}

/// `GET /app/hook/config`.
#[derive(Debug, Clone, Deserialize)]
pub struct HookConfig {
    /// Where deliveries go.
    #[serde(default)]
    pub url: Option<String>,
    /// `json` or `form`.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// One organisation or repository webhook.
#[derive(Debug, Clone, Deserialize)]
pub struct Webhook {
    /// The hook id.
    pub id: u64,
    /// Whether deliveries are sent.
    #[serde(default)]
    pub active: bool,
    /// The events it sends (`*` is every event).
    #[serde(default)]
    pub events: Vec<String>,
    /// Its URL and content type.
    #[serde(default)]
    pub config: Option<HookConfig>,
}

/// The app permissions GRS needs at `scope`, with why: permission name,
/// least level, what needs it. Runners at an organisation need
/// `organization_self_hosted_runners`, at a repository `administration`
/// (GitHub's "Self-hosted runners" REST pages); job status needs `actions`
/// (`GET /repos/{owner}/{repo}/actions/jobs/{job_id}`).
pub fn required_app_permissions(scope: &Scope) -> Vec<(&'static str, &'static str, &'static str)> {
    let runners = match scope {
        Scope::Organization(_) => "organization_self_hosted_runners",
        Scope::Repository { .. } => "administration",
    };
    vec![
        (runners, "write", "runners, JIT configs"),
        ("actions", "read", "job status"),
    ]
}

/// Whether `granted` (`read`, `write`, `admin`) is at least `needed`.
pub fn level_at_least(granted: &str, needed: &str) -> bool {
    let rank = |l: &str| match l {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    };
    rank(granted) >= rank(needed) && rank(needed) > 0
}

/// The classic-PAT scopes GRS needs at `scope` that `granted` lacks, each
/// as the alternatives that would do (`admin:org` or `manage_runners:org`).
pub fn missing_pat_scopes(scope: &Scope, granted: &[String]) -> Vec<Vec<&'static str>> {
    let needs: Vec<Vec<&'static str>> = match scope {
        // Runners of an organisation, and job status in its (private)
        // repositories.
        Scope::Organization(_) => vec![vec!["admin:org", "manage_runners:org"], vec!["repo"]],
        Scope::Repository { .. } => vec![vec!["repo"]],
    };
    needs
        .into_iter()
        .filter(|any| !any.iter().any(|s| granted.iter().any(|g| g == s)))
        .collect()
}

impl GitHubClient {
    /// Whether this client authenticates as a GitHub App.
    pub fn is_app(&self) -> bool {
        matches!(self.inner.auth, Auth::App(_))
    }

    /// The app installation (`None` with a PAT).
    pub async fn app_installation(&self) -> Result<Option<Installation>, GitHubError> {
        let Auth::App(app) = &self.inner.auth else {
            return Ok(None);
        };
        let path = format!("/app/installations/{}", app.installation_id);
        self.app_get(&path).await.map(Some)
    }

    /// The app's webhook configuration (`None` with a PAT).
    pub async fn app_hook_config(&self) -> Result<Option<HookConfig>, GitHubError> {
        if !self.is_app() {
            return Ok(None);
        }
        self.app_get("/app/hook/config").await.map(Some)
    }

    /// The webhooks of the organisation or repository runners are
    /// registered at.
    pub async fn webhooks(&self) -> Result<Vec<Webhook>, GitHubError> {
        let path = match &self.inner.scope {
            Scope::Organization(org) => format!("/orgs/{org}/hooks?per_page=100"),
            Scope::Repository { owner, name } => {
                format!("/repos/{owner}/{name}/hooks?per_page=100")
            }
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// A classic PAT's scopes (`X-OAuth-Scopes` of an answer to the
    /// runners endpoint); `None` for an app or a fine-grained PAT.
    pub async fn token_scopes(&self) -> Result<Option<Vec<String>>, GitHubError> {
        if self.is_app() {
            return Ok(None);
        }
        let path = format!("{}?per_page=1", self.inner.scope.runners_path());
        let resp = self.send(Method::GET, &path, None::<&()>).await?;
        Ok(resp
            .headers()
            .get("x-oauth-scopes")
            .and_then(|v| v.to_str().ok())
            .map(|s| {
                s.split(',')
                    .map(|x| x.trim().to_owned())
                    .filter(|x| !x.is_empty())
                    .collect()
            }))
    }

    /// A GET authenticated as the app itself (JWT), not as an installation.
    async fn app_get<T: DeserializeOwned>(&self, path: &str) -> Result<T, GitHubError> {
        let Auth::App(app) = &self.inner.auth else {
            return Err(GitHubError::Config(format!(
                "{path} needs GitHub App credentials"
            )));
        };
        let jwt = app_jwt(&app.app_id, &app.key)?;
        let url = format!("{}{}", self.inner.api_url, path);
        let resp = self
            .inner
            .http
            .get(&url)
            .header(header::AUTHORIZATION, bearer(&jwt)?)
            .header(header::ACCEPT, "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION)
            .send()
            .await
            .map_err(|e| GitHubError::Transport {
                path: path.to_owned(),
                message: e.without_url().to_string(),
            })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(GitHubError::Api {
                method: "GET".into(),
                path: path.to_owned(),
                status: status.as_u16(),
                message: error_message(resp).await,
            });
        }
        resp.json().await.map_err(|e| GitHubError::Decode {
            path: path.to_owned(),
            message: e.without_url().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_covers_read_and_admin_covers_write() {
        assert!(level_at_least("write", "read"));
        assert!(level_at_least("admin", "write"));
        assert!(!level_at_least("read", "write"));
        assert!(!level_at_least("none", "read"));
    }

    #[test]
    fn an_organisation_needs_a_runner_scope_and_repo() {
        let org = Scope::Organization("o".into());
        let m = missing_pat_scopes(&org, &["repo".into()]);
        assert_eq!(m, vec![vec!["admin:org", "manage_runners:org"]]);
        assert!(missing_pat_scopes(&org, &["manage_runners:org".into(), "repo".into()]).is_empty());
    }
}
