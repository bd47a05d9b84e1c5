//! GitHub: the credentials work, may do what GRS needs (runners, JIT
//! configs, job status), and the webhook sends `workflow_job` to the
//! gateway. What GRS needs of GitHub is in `grs_github::client::inspect`.

use std::time::Duration;

use grs_github::client::inspect::{self, Webhook};
use grs_github::{GitHubClient, Scope};

use super::{Check, Loaded, bounded};

const CREDENTIALS: &str = "GitHub credentials";
const PERMISSIONS: &str = "GitHub permissions";
const RUNNERS: &str = "GitHub runners API";
const WEBHOOK: &str = "GitHub webhook";

pub(super) async fn checks(loaded: &Loaded, timeout: Duration) -> Vec<Check> {
    let Some(gh) = &loaded.config.github else {
        return vec![Check::warn(
            "GitHub",
            "no [github] section: GRS registers no runners; templates must bring their own",
            "add [github] with organization or repository and an app ([github.app]) or a token",
        )];
    };
    let client = match GitHubClient::new(gh) {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::fail(
                CREDENTIALS,
                e.to_string(),
                "correct the [github] key named above",
            )];
        }
    };
    let at = match client.scope() {
        Scope::Organization(o) => format!("organisation {o}"),
        Scope::Repository { owner, name } => format!("repository {owner}/{name}"),
    };
    let mut out = Vec::new();
    // Credentials and what they grant.
    let mut events: Option<Vec<String>> = None;
    if client.is_app() {
        match bounded(
            timeout,
            "GET /app/installations/{id}",
            client.app_installation(),
        )
        .await
        {
            Ok(Some(inst)) => {
                out.push(Check::pass(
                    CREDENTIALS,
                    format!("GitHub App installation {} at {}", inst.id, gh.api_url),
                ));
                let lacking: Vec<String> = inspect::required_app_permissions(client.scope())
                    .into_iter()
                    .filter(|(p, level, _)| {
                        !inst
                            .permissions
                            .get(*p)
                            .is_some_and(|g| inspect::level_at_least(g, level))
                    })
                    .map(|(p, level, why)| {
                        let has = inst.permissions.get(p).map_or("none", String::as_str);
                        format!("{p}: {level} (has {has}; for {why})")
                    })
                    .collect();
                out.push(if lacking.is_empty() {
                    Check::pass(PERMISSIONS, format!("the installation may manage runners at {at} and read job status"))
                } else {
                    Check::fail(
                        PERMISSIONS,
                        format!("the installation lacks {}", lacking.join(", ")),
                        "raise the app's permissions (app settings > Permissions & events), then accept them in the installation",
                    )
                });
                events = Some(inst.events);
            }
            Ok(None) => {}
            Err(e) => {
                out.push(Check::fail(
                    CREDENTIALS,
                    e,
                    "check github.app.app_id, github.app.installation_id and the private key (github.app.private_key_file or GRS_GITHUB_APP_PRIVATE_KEY)",
                ));
                out.push(Check::skip(
                    PERMISSIONS,
                    "the app's installation cannot be read",
                ));
            }
        }
    } else {
        match bounded(timeout, "the runners endpoint", client.token_scopes()).await {
            Ok(Some(scopes)) => {
                out.push(Check::pass(
                    CREDENTIALS,
                    format!("personal access token at {}", gh.api_url),
                ));
                let missing = inspect::missing_pat_scopes(client.scope(), &scopes);
                out.push(if missing.is_empty() {
                    Check::pass(PERMISSIONS, format!("token scopes {}", scopes.join(", ")))
                } else {
                    let words: Vec<String> = missing.iter().map(|any| any.join(" or ")).collect();
                    Check::fail(
                        PERMISSIONS,
                        format!("the token's scopes ({}) lack {}", scopes.join(", "), words.join(", ")),
                        "make a token with those scopes, or better, use a GitHub App ([github.app])",
                    )
                });
            }
            Ok(None) => {
                out.push(Check::pass(CREDENTIALS, format!("token at {}", gh.api_url)));
                out.push(Check::warn(
                    PERMISSIONS,
                    "a fine-grained token names no scopes; only the runners call below shows what it may do",
                    format!("give it read/write on self-hosted runners ({at}) and read on Actions"),
                ));
            }
            Err(e) => {
                out.push(Check::fail(
                    CREDENTIALS,
                    e,
                    "check the token (github.token_file or GRS_GITHUB_TOKEN) and github.api_url",
                ));
                out.push(Check::skip(PERMISSIONS, "the token was refused"));
            }
        }
    }
    // The runners endpoint, as the reconciler and teardown call it.
    out.push(
        match bounded(timeout, "list runners", client.list_runners(None)).await {
            Ok(r) => Check::pass(RUNNERS, format!("{} runners registered at {at}", r.len())),
            Err(e) => Check::fail(
                RUNNERS,
                e,
                format!("the credentials must manage self-hosted runners at {at}"),
            ),
        },
    );
    out.push(webhook(loaded, &client, events, timeout).await);
    out
}

/// The webhook: `workflow_job` to `<gateway>/webhook`.
async fn webhook(
    loaded: &Loaded,
    client: &GitHubClient,
    app_events: Option<Vec<String>>,
    timeout: Duration,
) -> Check {
    let expected = loaded
        .gateway_url()
        .map(|(key, base)| (key, format!("{base}/webhook")));
    let matches = |url: Option<&str>| match (&expected, url) {
        (Some((_, want)), Some(got)) => got.trim_end_matches('/') == want,
        (None, _) => true,
        _ => false,
    };
    let want_words = expected
        .as_ref()
        .map(|(key, u)| format!("{u} (from {key})"))
        .unwrap_or_else(|| "the gateway's /webhook".into());
    if client.is_app() {
        let config = match bounded(timeout, "GET /app/hook/config", client.app_hook_config()).await
        {
            Ok(Some(c)) => c,
            Ok(None) => return Check::skip(WEBHOOK, "not an app"),
            Err(e) => {
                return Check::fail(
                    WEBHOOK,
                    e,
                    "the app's webhook must be readable with its JWT (check app_id and key)",
                );
            }
        };
        let url = config.url.as_deref().filter(|u| !u.is_empty());
        let has_event = app_events
            .as_ref()
            .is_some_and(|e| e.iter().any(|e| e == "workflow_job"));
        return match (matches(url), has_event) {
            (true, true) => Check::pass(
                WEBHOOK,
                format!("the app sends workflow_job to {}", url.unwrap_or("-")),
            ),
            (false, _) => Check::fail(
                WEBHOOK,
                format!(
                    "the app's webhook URL is {}, not {want_words}",
                    url.unwrap_or("unset")
                ),
                format!(
                    "set the app's Webhook URL to {want_words} (app settings > General), content type JSON, with the webhook secret"
                ),
            ),
            (true, false) => Check::fail(
                WEBHOOK,
                "the app does not subscribe to workflow_job",
                "tick \"Workflow job\" under Subscribe to events (app settings > Permissions & events)",
            ),
        };
    }
    let hooks = match bounded(timeout, "list webhooks", client.webhooks()).await {
        Ok(h) => h,
        Err(e) => {
            return Check::fail(
                WEBHOOK,
                format!("cannot list webhooks: {e}"),
                "the token needs admin:org_hook (organisation) or admin:repo_hook (repository) to read them; or check the webhook by hand",
            );
        }
    };
    let to_gateway: Vec<&Webhook> = hooks
        .iter()
        .filter(|h| matches(h.config.as_ref().and_then(|c| c.url.as_deref())))
        .collect();
    let sends = |h: &&Webhook| h.active && h.events.iter().any(|e| e == "workflow_job" || e == "*");
    match (to_gateway.is_empty(), to_gateway.iter().find(|h| sends(h))) {
        (_, Some(h)) => Check::pass(
            WEBHOOK,
            format!("webhook {} sends workflow_job to {want_words}", h.id),
        ),
        (true, None) => Check::fail(
            WEBHOOK,
            format!(
                "no webhook points at {want_words} ({} webhooks found)",
                hooks.len()
            ),
            format!(
                "add a webhook: payload URL {want_words}, content type application/json, the webhook secret, event \"Workflow jobs\""
            ),
        ),
        (false, None) => Check::fail(
            WEBHOOK,
            format!("the webhook to {want_words} is inactive or does not send workflow_job"),
            "edit it: tick \"Workflow jobs\" and \"Active\"",
        ),
    }
}
