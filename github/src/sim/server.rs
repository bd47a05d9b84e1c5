//! The simulator's REST endpoints. Paths may carry a GHES-style prefix
//! (`/api/v3`); both organisation and repository scopes are served.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Exchange, Fault, GitHubSim, SimJobStatus, SimRunner};

pub(super) fn router(sim: GitHubSim) -> Router {
    Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let sim = sim.clone();
            async move {
                let scopes = super::installation::pat_scopes(&sim, &headers);
                let recording = sim.lock().exchanges.is_some() && !uri.path().starts_with("/_sim/");
                let request = recording.then(|| (method.clone(), uri.clone(), body.clone()));
                let mut resp = handle(&sim, method, uri, headers, body).await;
                // GitHub names a classic PAT's scopes on every answer.
                if let Some(v) = scopes.and_then(|s| s.parse().ok()) {
                    resp.headers_mut().insert("x-oauth-scopes", v);
                }
                match request {
                    Some(request) => record(&sim, request, resp).await,
                    None => resp,
                }
            }
        },
    )
}

/// Keeps `request` and its answer in the exchange log; the answer's body
/// is read whole (the simulator's answers are small JSON documents) and put
/// back.
async fn record(
    sim: &GitHubSim,
    (method, uri, body): (Method, Uri, Bytes),
    resp: Response,
) -> Response {
    let (parts, answer) = resp.into_parts();
    let answer = axum::body::to_bytes(answer, usize::MAX)
        .await
        .unwrap_or_default();
    let exchange = Exchange {
        method: method.to_string(),
        path: uri
            .path()
            .strip_prefix("/api/v3")
            .unwrap_or(uri.path())
            .to_owned(),
        query: uri.query().map(str::to_owned),
        request: body.to_vec(),
        status: parts.status.as_u16(),
        response: answer.to_vec(),
    };
    if let Some(log) = sim.lock().exchanges.as_mut() {
        log.push(exchange);
    }
    Response::from_parts(parts, axum::body::Body::from(answer))
}

pub(super) fn err(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(
            json!({ "message": message, "documentation_url": "https://docs.github.com/rest" }),
        ),
    )
        .into_response()
}

async fn handle(
    sim: &GitHubSim,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().strip_prefix("/api/v3").unwrap_or(uri.path());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();

    // A VM's runner process, out of process: `POST /_sim/boot` with the
    // encoded JIT config as the body.
    if method == Method::POST && segs == ["_sim", "boot"] {
        let jit = String::from_utf8_lossy(&body).into_owned();
        return match sim.boot_runner(&jit).await {
            Ok(r) => (StatusCode::OK, axum::Json(runner_json(&r))).into_response(),
            Err(e) => err(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        };
    }

    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("token "))
        })
        .unwrap_or("")
        .to_owned();

    if method == Method::POST
        && segs.len() == 4
        && segs[0] == "app"
        && segs[1] == "installations"
        && segs[3] == "access_tokens"
    {
        return access_token(sim, &bearer, segs[2]);
    }
    // The app's own endpoints (app JWT): its installation and webhook.
    if let Some(resp) = super::installation::app_endpoint(sim, &method, &segs, &bearer) {
        return resp;
    }

    // `/app/hook/...` takes the App's JWT; every other endpoint an
    // installation token or the PAT.
    let app_endpoint = segs.first() == Some(&"app");
    {
        let st = sim.lock();
        let ok = if app_endpoint {
            check_app_jwt(&st, &bearer)
        } else {
            let now = SystemTime::now();
            let ok = st.tokens.get(&bearer).is_some_and(|exp| *exp > now)
                || st.cfg.pat.as_deref().is_some_and(|p| p == bearer);
            if ok { Ok(()) } else { Err("Bad credentials") }
        };
        if let Err(why) = ok {
            return err(StatusCode::UNAUTHORIZED, why);
        }
    }
    // The primary rate limit: every authenticated call spends one, and every
    // answer says how many are left.
    let spent = sim.lock().spend_rate_limit();
    let mut resp = if !spent {
        err(
            StatusCode::FORBIDDEN,
            "API rate limit exceeded for installation. If you reach out to GitHub Support for help, please include the request ID.",
        )
    } else if let Some(fault) = sim.lock().faults.pop_front() {
        fault_response(fault)
    } else {
        route(sim, &method, &segs, &query, &body)
    };
    rate_limit_headers(sim, &mut resp);
    resp
}

/// `x-ratelimit-*` on an answer, as GitHub sends them on every REST answer
/// (an injected fault's own values win).
fn rate_limit_headers(sim: &GitHubSim, resp: &mut Response) {
    let st = sim.lock();
    let reset = st
        .rate_reset
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let h = resp.headers_mut();
    if h.contains_key("x-ratelimit-remaining") {
        return;
    }
    h.insert("x-ratelimit-limit", st.cfg.rate_limit.into());
    h.insert("x-ratelimit-remaining", st.rate_remaining.into());
    h.insert(
        "x-ratelimit-used",
        (st.cfg.rate_limit - st.rate_remaining).into(),
    );
    h.insert("x-ratelimit-reset", reset.into());
    h.insert(
        "x-ratelimit-resource",
        axum::http::HeaderValue::from_static("core"),
    );
}

fn route(
    sim: &GitHubSim,
    method: &Method,
    segs: &[&str],
    query: &[(String, String)],
    body: &[u8],
) -> Response {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (hook_cfg, org_cfg, repo_cfg) = {
        let st = sim.lock();
        (
            st.cfg.hook_id,
            st.cfg.organization.clone(),
            st.cfg.repository.clone(),
        )
    };
    // The hook deliveries API, of the App's hook or the organisation's.
    let hook_rest = match segs {
        ["app", "hook", "deliveries", rest @ ..] => Some(rest),
        ["orgs", org, "hooks", hook, "deliveries", rest @ ..]
            if *org == org_cfg && hook.parse::<u64>().ok() == Some(hook_cfg) =>
        {
            Some(rest)
        }
        ["repos", o, r, "hooks", hook, "deliveries", rest @ ..]
            if format!("{o}/{r}") == repo_cfg && hook.parse::<u64>().ok() == Some(hook_cfg) =>
        {
            Some(rest)
        }
        _ => None,
    };
    if let Some(rest) = hook_rest {
        return match (method.clone(), rest) {
            (Method::GET, []) => list_deliveries(sim, q("per_page"), q("cursor"), q("status")),
            (Method::POST, [id, "attempts"]) => {
                // https://docs.github.com/rest/apps/webhooks#redeliver-a-delivery-for-an-app-webhook
                match id.parse::<u64>().ok().map(|id| sim.redeliver_attempt(id)) {
                    Some(true) => (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response(),
                    _ => err(StatusCode::NOT_FOUND, "Not Found"),
                }
            }
            _ => err(StatusCode::NOT_FOUND, "Not Found"),
        };
    }

    // Scope prefix: orgs/{org}/actions/runners... or repos/{o}/{r}/actions/...
    let (rest, repo) = match segs {
        ["orgs", _org, rest @ ..] => (rest, None),
        ["repos", o, r, rest @ ..] => (rest, Some(format!("{o}/{r}"))),
        _ => return err(StatusCode::NOT_FOUND, "Not Found"),
    };
    match (method.clone(), rest) {
        (Method::GET, ["hooks"]) => super::installation::hooks(sim),
        (Method::POST, ["actions", "runners", "generate-jitconfig"]) => generate_jit(sim, body),
        (Method::POST, ["actions", "runners", "registration-token"]) => {
            let expires = SystemTime::now() + Duration::from_secs(3600);
            (
                StatusCode::CREATED,
                axum::Json(json!({
                    "token": format!("AREG{:028X}", rand::random::<u128>()),
                    "expires_at": super::rfc3339(expires),
                })),
            )
                .into_response()
        }
        (Method::GET, ["actions", "runners"]) => list_runners(sim, query),
        (Method::DELETE, ["actions", "runners", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return err(StatusCode::NOT_FOUND, "Not Found");
            };
            let mut st = sim.lock();
            match st.runners.get(&id) {
                None => err(StatusCode::NOT_FOUND, "Not Found"),
                Some(r) if r.busy => err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Bad request - Runner is still running a job",
                ),
                Some(_) => {
                    st.runners.remove(&id);
                    st.jit_nonces.remove(&id);
                    StatusCode::NO_CONTENT.into_response()
                }
            }
        }
        // https://docs.github.com/rest/actions/workflow-jobs#get-a-job-for-a-workflow-run
        (Method::GET, ["actions", "jobs", id]) => {
            match id
                .parse::<u64>()
                .ok()
                .and_then(|id| sim.job(id))
                .filter(|j| Some(&j.repository) == repo.as_ref())
            {
                Some(job) => axum::Json(job_json(&job)).into_response(),
                None => err(StatusCode::NOT_FOUND, "Not Found"),
            }
        }
        // https://docs.github.com/rest/actions/workflow-runs#list-workflow-runs-for-a-repository
        (Method::GET, ["actions", "runs"]) => {
            let Some(repo) = repo else {
                return err(StatusCode::NOT_FOUND, "Not Found");
            };
            let runs: Vec<serde_json::Value> = runs_of(sim, &repo)
                .into_iter()
                .filter(|(_, status)| q("status").is_none_or(|s| s == *status))
                .map(|(id, status)| {
                    json!({
                        "id": id,
                        "status": status,
                        "name": "CI",
                        "run_attempt": 1,
                        "repository": { "full_name": repo },
                    })
                })
                .collect();
            let (page, total) = paged(runs, q("per_page"), q("page"));
            axum::Json(json!({ "total_count": total, "workflow_runs": page })).into_response()
        }
        // https://docs.github.com/rest/actions/workflow-jobs#list-jobs-for-a-workflow-run
        (Method::GET, ["actions", "runs", run_id, "jobs"]) => {
            let run_id = run_id.parse::<u64>().ok();
            let jobs: Vec<serde_json::Value> = sim
                .jobs()
                .iter()
                .filter(|j| Some(j.run_id) == run_id && Some(&j.repository) == repo.as_ref())
                .map(job_json)
                .collect();
            if jobs.is_empty() {
                return err(StatusCode::NOT_FOUND, "Not Found");
            }
            let (page, total) = paged(jobs, q("per_page"), q("page"));
            axum::Json(json!({ "total_count": total, "jobs": page })).into_response()
        }
        _ => err(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// A job as the REST API shows it (`components/schemas/job`, the keys GRS
/// and the tests read).
fn job_json(job: &super::SimJob) -> serde_json::Value {
    let status = match job.status {
        SimJobStatus::Queued => "queued",
        SimJobStatus::InProgress => "in_progress",
        SimJobStatus::Completed => "completed",
    };
    super::job_json(job, status)
}

/// The runs of `repo` with their status, derived from their jobs: queued
/// while every job is, completed once every job is, else in progress.
fn runs_of(sim: &GitHubSim, repo: &str) -> Vec<(u64, &'static str)> {
    use std::collections::BTreeMap;
    let mut runs: BTreeMap<u64, Vec<SimJobStatus>> = BTreeMap::new();
    for j in sim.jobs().iter().filter(|j| j.repository == repo) {
        runs.entry(j.run_id).or_default().push(j.status);
    }
    // Newest first, as GitHub lists them.
    runs.into_iter()
        .rev()
        .map(|(id, statuses)| {
            let status = if statuses.iter().all(|s| *s == SimJobStatus::Queued) {
                "queued"
            } else if statuses.iter().all(|s| *s == SimJobStatus::Completed) {
                "completed"
            } else {
                "in_progress"
            };
            (id, status)
        })
        .collect()
}

/// One page (`per_page` at most 100, default 30; `page` from 1) and the
/// total count.
fn paged<T>(all: Vec<T>, per_page: Option<&str>, page: Option<&str>) -> (Vec<T>, usize) {
    let per_page = per_page
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let page = page
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let total = all.len();
    (
        all.into_iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .collect(),
        total,
    )
}

/// The hook's delivery attempts, newest first, from `cursor` (an attempt
/// id) on, filtered by `status` (`success`: 200-399, `failure`: 400-599),
/// with GitHub's `link` header naming the next page's cursor.
fn list_deliveries(
    sim: &GitHubSim,
    per_page: Option<&str>,
    cursor: Option<&str>,
    status: Option<&str>,
) -> Response {
    let per_page = per_page
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let from = cursor
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let st = sim.lock();
    let mut matching =
        st.deliveries
            .iter()
            .rev()
            .filter(|d| d.id <= from)
            .filter(|d| match status {
                Some("success") => d.succeeded(),
                Some("failure") => !d.succeeded(),
                _ => true,
            });
    let page: Vec<&super::DeliveryRecord> = matching.by_ref().take(per_page).collect();
    let next = matching.next().map(|d| d.id);
    let items: Vec<serde_json::Value> = page
        .iter()
        .map(|d| {
            json!({
                "id": d.id,
                "guid": d.delivery_id,
                "delivered_at": super::rfc3339(d.delivered_at),
                "redelivery": d.redelivery,
                "duration": 0.01,
                "status": if d.succeeded() { "OK".to_owned() } else if d.status.is_none() { "failed to connect".to_owned() } else { format!("Invalid HTTP Response: {}", d.status_code()) },
                "status_code": d.status_code(),
                "event": d.event,
                "action": d.action,
                "installation_id": st.cfg.installation_id,
                "repository_id": 1,
                "throttled_at": null,
            })
        })
        .collect();
    let mut resp = axum::Json(items).into_response();
    if let Some(next) = next {
        let link =
            format!("</app/hook/deliveries?per_page={per_page}&cursor={next}>; rel=\"next\"");
        if let Ok(v) = link.parse() {
            resp.headers_mut().insert("link", v);
        }
    }
    resp
}

fn access_token(sim: &GitHubSim, jwt: &str, installation: &str) -> Response {
    let mut st = sim.lock();
    if installation.parse::<u64>().ok() != Some(st.cfg.installation_id) {
        return err(StatusCode::NOT_FOUND, "Not Found");
    }
    if let Err(message) = check_app_jwt(&st, jwt) {
        return err(StatusCode::UNAUTHORIZED, message);
    }
    let token = format!("ghs_{:036x}", rand::random::<u128>());
    let expires = SystemTime::now() + st.cfg.token_ttl;
    st.tokens.insert(token.clone(), expires);
    st.token_mints += 1;
    let expires_at = super::rfc3339(expires);
    (
        StatusCode::CREATED,
        axum::Json(json!({ "token": token, "expires_at": expires_at })),
    )
        .into_response()
}

/// Checks an app JWT as GitHub does (the signature when the simulator has
/// the public key; the issuer; issued in the past with at most ten minutes
/// of life); GitHub's 401 message when it fails.
pub(super) fn check_app_jwt(st: &super::State, jwt: &str) -> Result<(), &'static str> {
    #[derive(Deserialize)]
    struct Claims {
        iss: serde_json::Value,
        exp: u64,
        iat: u64,
    }
    let claims: Option<Claims> = match &st.cfg.app_public_key_pem {
        Some(pem) => jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes())
            .ok()
            .and_then(|key| {
                let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
                v.validate_exp = true;
                v.required_spec_claims = ["exp", "iat", "iss"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                jsonwebtoken::decode::<Claims>(jwt, &key, &v)
                    .ok()
                    .map(|d| d.claims)
            }),
        None => {
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            v.insecure_disable_signature_validation();
            v.validate_exp = false;
            jsonwebtoken::decode::<Claims>(jwt, &jsonwebtoken::DecodingKey::from_secret(&[]), &v)
                .ok()
                .map(|d| d.claims)
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let Some(c) = claims else {
        return Err("A JSON web token could not be decoded");
    };
    let iss = match &c.iss {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // GitHub's rules: issued in the past, at most ten minutes of life.
    if iss != st.cfg.app_id || c.iat > now + 5 || c.exp > c.iat + 600 + 60 || c.exp <= now {
        return Err("'Expiration time' claim ('exp') is too far in the future");
    }
    Ok(())
}

fn generate_jit(sim: &GitHubSim, body: &[u8]) -> Response {
    #[derive(Deserialize)]
    struct Req {
        name: String,
        runner_group_id: u64,
        labels: Vec<String>,
        #[serde(default)]
        #[allow(dead_code)]
        work_folder: Option<String>,
    }
    let Ok(req) = serde_json::from_slice::<Req>(body) else {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request");
    };
    if req.labels.is_empty() || req.labels.len() > 100 || req.name.is_empty() {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed");
    }
    match sim.register_jit(&req.name, req.labels, req.runner_group_id) {
        Ok((runner, encoded)) => (
            StatusCode::CREATED,
            axum::Json(json!({ "runner": runner_json(&runner), "encoded_jit_config": encoded })),
        )
            .into_response(),
        Err(()) => err(
            StatusCode::CONFLICT,
            "Already exists - A runner with the same name already exists",
        ),
    }
}

fn list_runners(sim: &GitHubSim, query: &[(String, String)]) -> Response {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let per_page = q("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let page = q("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let all: Vec<SimRunner> = sim
        .runners()
        .into_iter()
        .filter(|r| q("name").is_none_or(|n| r.name == n))
        .collect();
    let items: Vec<_> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(runner_json)
        .collect();
    axum::Json(json!({ "total_count": all.len(), "runners": items })).into_response()
}

fn runner_json(r: &SimRunner) -> serde_json::Value {
    json!({
        "id": r.id,
        "name": r.name,
        "os": "Linux",
        "status": if r.online { "online" } else { "offline" },
        "busy": r.busy,
        "ephemeral": true,
        "runner_group_id": r.runner_group_id,
        "labels": r.labels.iter().map(|l| json!({ "name": l, "type": "custom" })).collect::<Vec<_>>(),
    })
}

fn fault_response(f: Fault) -> Response {
    match f {
        Fault::RateLimit {
            status,
            retry_after,
            reset_in,
        } => {
            let mut resp = err(
                StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
            );
            let h = resp.headers_mut();
            if let Some(s) = retry_after {
                h.insert("retry-after", s.into());
            }
            if let Some(s) = reset_in {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                h.insert("x-ratelimit-remaining", 0u64.into());
                h.insert("x-ratelimit-reset", (now + s).into());
            }
            resp
        }
        Fault::Status(s) => err(
            StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "Server Error",
        ),
    }
}
