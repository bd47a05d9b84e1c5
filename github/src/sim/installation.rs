//! What `grs doctor` reads of the app and the webhook: the app's
//! installation (`GET /app/installations/{id}`), its webhook
//! (`GET /app/hook/config`), organisation and repository webhooks
//! (`GET /orgs/{org}/hooks`, `GET /repos/{owner}/{repo}/hooks`), and the
//! `X-OAuth-Scopes` header GitHub sends to a classic PAT.
//!
//! Shapes as GitHub's REST reference ("Get an installation for the
//! authenticated app", "Get a webhook configuration for an app", "List
//! organization webhooks"): the app endpoints take the app's JWT, the hook
//! lists a token. The webhook URL is where the simulator sends its
//! deliveries (`SimConfig::webhook_url`), so a simulator wired to a gateway
//! is "configured" as a real installation would be. By default the
//! installation holds what GRS needs; the setters break it for tests.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::GitHubSim;
use super::server::{check_app_jwt, err};

/// The installation's grants and the webhooks' events.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    permissions: BTreeMap<String, String>,
    events: Vec<String>,
    hook_events: Vec<String>,
    pat_scopes: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        let permissions = [
            ("actions", "read"),
            ("administration", "write"),
            ("metadata", "read"),
            ("organization_self_hosted_runners", "write"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        Self {
            permissions,
            events: vec!["workflow_job".into()],
            hook_events: vec!["workflow_job".into()],
            pat_scopes: Some("admin:org, repo".into()),
        }
    }
}

impl GitHubSim {
    /// The installation's permissions from now on (name → `read`,
    /// `write`, `admin`).
    pub fn set_app_permissions(&self, permissions: &[(&str, &str)]) {
        self.lock().setup.permissions = permissions
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// The events the app subscribes to from now on.
    pub fn set_app_events(&self, events: &[&str]) {
        self.lock().setup.events = events.iter().map(|e| (*e).to_owned()).collect();
    }

    /// The events the organisation/repository webhook sends from now on.
    pub fn set_hook_events(&self, events: &[&str]) {
        self.lock().setup.hook_events = events.iter().map(|e| (*e).to_owned()).collect();
    }

    /// The PAT's `X-OAuth-Scopes` (`None`: a fine-grained PAT, no header).
    pub fn set_pat_scopes(&self, scopes: Option<&str>) {
        self.lock().setup.pat_scopes = scopes.map(str::to_owned);
    }
}

/// The `X-OAuth-Scopes` value for a request carrying these headers: set
/// when it authenticates with the PAT.
pub(super) fn pat_scopes(sim: &GitHubSim, headers: &HeaderMap) -> Option<String> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("token "))
        })?;
    let st = sim.lock();
    if st.cfg.pat.as_deref() == Some(token) {
        st.setup.pat_scopes.clone()
    } else {
        None
    }
}

/// `GET /app/installations/{id}` and `GET /app/hook/config`; `None` for
/// any other request.
pub(super) fn app_endpoint(
    sim: &GitHubSim,
    method: &Method,
    segs: &[&str],
    jwt: &str,
) -> Option<Response> {
    if method != Method::GET {
        return None;
    }
    let st = sim.lock();
    match segs {
        ["app", "installations", id] => Some(match check_app_jwt(&st, jwt) {
            Err(message) => err(StatusCode::UNAUTHORIZED, message),
            Ok(()) if id.parse::<u64>().ok() != Some(st.cfg.installation_id) => {
                err(StatusCode::NOT_FOUND, "Not Found")
            }
            Ok(()) => axum::Json(json!({
                "id": st.cfg.installation_id,
                "account": { "login": st.cfg.organization, "type": "Organization" },
                "app_id": st.cfg.app_id.parse::<u64>().unwrap_or_default(),
                "target_type": "Organization",
                "permissions": st.setup.permissions,
                "events": st.setup.events,
            }))
            .into_response(),
        }),
        ["app", "hook", "config"] => Some(match check_app_jwt(&st, jwt) {
            Err(message) => err(StatusCode::UNAUTHORIZED, message),
            Ok(()) => axum::Json(json!({
                "url": st.cfg.webhook_url.clone().unwrap_or_default(),
                "content_type": "json",
                "insecure_ssl": "0",
                "secret": "********",
            }))
            .into_response(),
        }),
        _ => None,
    }
}

/// `GET .../hooks`: one webhook to where deliveries go, if they go
/// anywhere.
pub(super) fn hooks(sim: &GitHubSim) -> Response {
    let st = sim.lock();
    let hooks: Vec<serde_json::Value> = st
        .cfg
        .webhook_url
        .iter()
        .map(|url| {
            json!({
                "id": st.cfg.hook_id,
                "name": "web",
                "active": true,
                "events": st.setup.hook_events,
                "config": { "url": url, "content_type": "json", "insecure_ssl": "0" },
            })
        })
        .collect();
    axum::Json(hooks).into_response()
}
