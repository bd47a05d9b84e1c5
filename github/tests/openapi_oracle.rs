//! GitHub's own OpenAPI description as the oracle of the REST client and of
//! the simulator: neither was written from it, so where they agree with each
//! other but not with GitHub, this test says so.
//!
//! The client drives the simulator through every REST operation GRS uses
//! (at organisation and repository scope, with an App and with a PAT, and
//! through error answers); the simulator keeps each exchange
//! ([`GitHubSim::record_exchanges`]), and every one is checked against
//! `fixtures/github/openapi-runners.json` (GitHub's description, verbatim,
//! from `@octokit/openapi`; see `fixtures/github/README.md`):
//! - the operation exists (method and path template);
//! - path parameters match their schemas, and every query parameter sent is
//!   one the operation declares, with a value its schema accepts;
//! - the request body is what `requestBody` describes (or absent when the
//!   operation takes none);
//! - the answer's status is one the operation documents, and its body
//!   validates against the documented schema (or is empty when none is).
//!
//! Schemas are OpenAPI 3.0 (`nullable`), turned into JSON Schema draft 4 for
//! the `jsonschema` crate by one rewrite ([`json_schema`]). Operations GRS
//! calls that the excerpt does not hold are named in [`OUTSIDE_EXCERPT`]:
//! a call to any other undocumented path fails the test.

use std::collections::BTreeSet;
use std::time::Duration;

use grs_github::GitHubClient;
use grs_github::client::Hook;
use grs_github::sim::{Exchange, GitHubSim, NewJob, SimConfig};
use serde_json::{Value, json};

mod common;
use common::{app_config, pat_config};
const OPENAPI: &str = include_str!("../../fixtures/github/openapi-runners.json");
const WEBHOOKS: &str = include_str!("../../fixtures/github/openapi-webhooks-workflow_job.json");

/// Operations the client calls that `openapi-runners.json` does not hold
/// (the excerpt was cut to the runner, job, installation and delivery
/// operations): `grs doctor`'s set-up checks and the lost-webhook
/// recovery's run listing. Their shapes are checked by the client's own
/// tests only.
const OUTSIDE_EXCERPT: &[&str] = &[
    "GET /app/hook/config",
    "GET /app/installations/{installation_id}",
    "GET /orgs/{org}/hooks",
    "GET /repos/{owner}/{repo}/actions/runs",
    "GET /repos/{owner}/{repo}/hooks",
];

/// GitHub's description: operations by method and path template.
struct OpenApi {
    doc: Value,
}

/// What one exchange was checked as.
enum Checked {
    /// Matched `METHOD template`; the problems found (none: conforms).
    Operation(String, Vec<String>),
    /// No operation of the description has this method and path.
    Unknown(String),
}

impl OpenApi {
    fn load() -> Self {
        Self::parse(OPENAPI)
    }

    fn parse(text: &str) -> Self {
        let mut doc: Value = serde_json::from_str(text).expect("the fixture is JSON");
        json_schema(&mut doc);
        Self { doc }
    }

    /// The path template of the description that `path` instantiates, with
    /// the values of its parameters.
    fn template<'a>(
        &'a self,
        method: &str,
        path: &str,
    ) -> Option<(&'a str, Vec<(String, String)>)> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let paths = self.doc["paths"].as_object()?;
        // A literal segment beats a parameter (`/runners/generate-jitconfig`
        // against `/runners/{runner_id}`): fewest parameters wins.
        let mut best: Option<(&str, Vec<(String, String)>)> = None;
        for (template, item) in paths {
            if item.get(method.to_lowercase()).is_none() {
                continue;
            }
            let tsegs: Vec<&str> = template.trim_matches('/').split('/').collect();
            if tsegs.len() != segs.len() {
                continue;
            }
            let mut params = Vec::new();
            let matched = tsegs.iter().zip(&segs).all(|(t, s)| {
                if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                    params.push((name.to_owned(), (*s).to_owned()));
                    true
                } else {
                    t == s
                }
            });
            if matched && best.as_ref().is_none_or(|(_, p)| params.len() < p.len()) {
                best = Some((template.as_str(), params));
            }
        }
        best
    }

    /// Follows a local `$ref` (`#/components/...`) until a non-reference.
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            match r.strip_prefix('#').and_then(|p| self.doc.pointer(p)) {
                Some(target) => v = target,
                None => break,
            }
        }
        v
    }

    /// Problems of `instance` against `schema` (a schema of the description,
    /// its references resolved against the whole document).
    fn problems(&self, schema: &Value, instance: &Value, what: &str) -> Vec<String> {
        let mut root = json!({ "components": self.doc["components"] });
        match schema.get("$ref") {
            Some(r) => root["$ref"] = r.clone(),
            None => {
                root["allOf"] = json!([schema]);
            }
        }
        let validator = match jsonschema::draft4::options().build(&root) {
            Ok(v) => v,
            Err(e) => {
                return vec![format!(
                    "{what}: the description's schema does not compile: {e}"
                )];
            }
        };
        validator
            .iter_errors(instance)
            .map(|e| format!("{what}: {e} (at {})", e.instance_path()))
            .collect()
    }

    fn check(&self, x: &Exchange) -> Checked {
        let Some((template, path_params)) = self.template(&x.method, &x.path) else {
            return Checked::Unknown(format!("{} {}", x.method, x.path));
        };
        let name = format!("{} {template}", x.method);
        let op = &self.doc["paths"][template][x.method.to_lowercase()];
        let mut problems = Vec::new();
        let declared: Vec<&Value> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                self.doc["paths"][template]["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            )
            .map(|p| self.resolve(p))
            .collect();
        let param = |place: &str, n: &str| {
            declared
                .iter()
                .find(|p| p["in"] == place && p["name"] == n)
                .copied()
        };
        // A parameter's value is a string on the wire; the schema types it.
        let typed = |schema: &Value, raw: &str| -> Value {
            match self.resolve(schema)["type"].as_str() {
                Some("integer") => raw.parse::<i64>().map_or(json!(raw), |n| json!(n)),
                Some("boolean") => raw.parse::<bool>().map_or(json!(raw), |b| json!(b)),
                _ => json!(raw),
            }
        };
        for (n, raw) in &path_params {
            match param("path", n) {
                Some(p) => problems.extend(self.problems(
                    &p["schema"],
                    &typed(&p["schema"], raw),
                    &format!("path parameter {n}={raw}"),
                )),
                None => problems.push(format!("path parameter {n} is not declared")),
            }
        }
        let query: Vec<(String, String)> = x
            .query
            .as_deref()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        for (n, raw) in &query {
            match param("query", n) {
                Some(p) => problems.extend(self.problems(
                    &p["schema"],
                    &typed(&p["schema"], raw),
                    &format!("query parameter {n}={raw}"),
                )),
                None => problems.push(format!(
                    "query parameter {n} is not one the operation takes"
                )),
            }
        }
        let body = self.resolve(&op["requestBody"]);
        let schema = &body["content"]["application/json"]["schema"];
        if x.request.is_empty() {
            if body["required"] == true {
                problems.push("the request has no body; the operation requires one".into());
            }
        } else if schema.is_null() {
            problems.push("the request has a body; the operation takes none".into());
        } else {
            match serde_json::from_slice::<Value>(&x.request) {
                Ok(v) => problems.extend(self.problems(schema, &v, "request body")),
                Err(e) => problems.push(format!("request body is not JSON: {e}")),
            }
        }
        let responses = &op["responses"];
        // GitHub answers 404 (`basic-error`) for any absent resource, also
        // where an operation's description lists no 404 (deleting a runner
        // already gone, a job id that does not exist): checked as the
        // description's shared `not_found` answer.
        let not_found =
            (x.status == 404).then(|| &self.doc["components"]["responses"]["not_found"]);
        let Some(resp) = responses
            .get(x.status.to_string())
            .or_else(|| responses.get("default"))
            .or(not_found)
            .map(|r| self.resolve(r))
        else {
            problems.push(format!(
                "status {} is not documented (documented: {})",
                x.status,
                responses
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            ));
            return Checked::Operation(name, problems);
        };
        match resp["content"]["application/json"].get("schema") {
            Some(schema) => match serde_json::from_slice::<Value>(&x.response) {
                Ok(v) => {
                    problems.extend(self.problems(schema, &v, &format!("{} answer", x.status)))
                }
                Err(e) => problems.push(format!("{} answer is not JSON: {e}", x.status)),
            },
            None if !x.response.is_empty() => problems.push(format!(
                "{} answer has a body; the description has none",
                x.status
            )),
            None => {}
        }
        Checked::Operation(name, problems)
    }
}

/// OpenAPI 3.0 schemas as JSON Schema draft 4: `nullable: true` becomes a
/// type that also admits `null` (including on an `enum`, which GitHub's
/// description combines with `nullable` for fields such as `conclusion`).
fn json_schema(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(t) = map.get("type").cloned() {
                    map.insert("type".into(), json!([t, "null"]));
                }
                if let Some(Value::Array(e)) = map.get_mut("enum") {
                    e.push(Value::Null);
                }
                if let Some(r) = map.remove("$ref") {
                    // A nullable reference: the referenced schema or null.
                    map.insert("anyOf".into(), json!([{ "$ref": r }, { "type": "null" }]));
                }
            }
            for child in map.values_mut() {
                json_schema(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json_schema),
        _ => {}
    }
}

/// Checks every exchange: panics naming each non-conforming one; returns
/// the operations covered.
fn assert_conforms(api: &OpenApi, exchanges: &[Exchange]) -> BTreeSet<String> {
    let mut covered = BTreeSet::new();
    let mut failures = Vec::new();
    for x in exchanges {
        match api.check(x) {
            Checked::Operation(name, problems) => {
                for p in &problems {
                    failures.push(format!("{name} ({} {}): {p}", x.method, x.path));
                }
                covered.insert(name);
            }
            Checked::Unknown(call) => {
                let template = OUTSIDE_EXCERPT.iter().find(|t| {
                    let (tm, tp) = t.split_once(' ').unwrap();
                    let ts: Vec<&str> = tp.trim_matches('/').split('/').collect();
                    let (m, p) = call.split_once(' ').unwrap();
                    let ps: Vec<&str> = p.trim_matches('/').split('/').collect();
                    tm == m
                        && ts.len() == ps.len()
                        && ts
                            .iter()
                            .zip(&ps)
                            .all(|(t, s)| t.starts_with('{') || t == s)
                });
                match template {
                    Some(t) => {
                        covered.insert((*t).to_owned());
                    }
                    None => failures.push(format!(
                        "{call}: no operation of GitHub's description has this method and path"
                    )),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} exchange(s) disagree with GitHub's OpenAPI description:\n{}",
        failures.len(),
        failures.join("\n")
    );
    covered
}

/// The simulator, keeping every exchange from the start.
async fn sim() -> GitHubSim {
    let sim = common::sim(SimConfig::default()).await;
    sim.record_exchanges();
    sim
}

/// Every call the control plane, the recovery pass and `grs doctor` make,
/// once through each scope, plus the error answers they meet.
async fn drive(gh: &GitHubClient, sim: &GitHubSim, hook: &Hook) {
    let labels = vec!["self-hosted".to_owned(), "linux".to_owned()];
    let jit = gh
        .generate_jit_config("grs-10000000001", &labels, None)
        .await
        .unwrap();
    gh.registration_token().await.unwrap();
    gh.list_runners(None).await.unwrap();
    gh.list_runners(Some("grs-10000000001")).await.unwrap();
    gh.delete_runner(jit.runner.id).await.unwrap();
    // Absent: GitHub answers 404, which the client takes as success.
    gh.delete_runner(jit.runner.id).await.unwrap();
    gh.remove_runner_by_name("grs-absent").await.unwrap();
    let job = sim
        .queue_job(NewJob::labels(["self-hosted", "linux"]))
        .await;
    gh.get_job("grs-sim/app", job.id).await.unwrap();
    gh.get_job("grs-sim/app", 1).await.unwrap_err();
    gh.list_workflow_runs("grs-sim/app", "queued", 50)
        .await
        .unwrap();
    gh.list_run_jobs("grs-sim/app", job.run_id).await.unwrap();
    let (page, _) = gh.list_deliveries(hook, false, 100, None).await.unwrap();
    gh.list_deliveries(hook, true, 10, None).await.unwrap();
    if let Some(d) = page.first() {
        gh.redeliver(hook, d.id).await.unwrap();
    }
    gh.app_installation().await.unwrap();
    gh.app_hook_config().await.unwrap();
    gh.webhooks().await.unwrap();
    gh.token_scopes().await.unwrap();
    sim.cancel_job(job.id).await;
}

#[tokio::test]
async fn the_client_and_the_simulator_agree_with_githubs_openapi_description() {
    let api = OpenApi::load();
    let mut covered = BTreeSet::new();

    // An App at organisation scope, its deliveries through the App hook.
    let s = sim().await;
    let gh = GitHubClient::new(&app_config(&s)).unwrap();
    drive(&gh, &s, &Hook::App).await;
    let x = s.exchanges();
    assert!(x.len() > 15, "the exchanges were recorded: {}", x.len());
    covered.extend(assert_conforms(&api, &x));
    s.shutdown().await;

    // A PAT at repository scope, the organisation hook's deliveries.
    let s = sim().await;
    let gh = GitHubClient::new(&pat_config(&s)).unwrap();
    drive(
        &gh,
        &s,
        &Hook::Organization {
            org: "grs-sim".into(),
            hook_id: 1,
        },
    )
    .await;
    covered.extend(assert_conforms(&api, &s.exchanges()));
    s.shutdown().await;

    // The operations GRS needs were all exercised (a client change that
    // stops calling one, or the drive above losing one, shows here).
    for op in [
        "POST /orgs/{org}/actions/runners/generate-jitconfig",
        "POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig",
        "GET /orgs/{org}/actions/runners",
        "GET /repos/{owner}/{repo}/actions/runners",
        "DELETE /orgs/{org}/actions/runners/{runner_id}",
        "DELETE /repos/{owner}/{repo}/actions/runners/{runner_id}",
        "GET /repos/{owner}/{repo}/actions/jobs/{job_id}",
        "GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs",
        "POST /app/installations/{installation_id}/access_tokens",
        "GET /app/hook/deliveries",
        "GET /orgs/{org}/hooks/{hook_id}/deliveries",
    ] {
        assert!(
            covered.contains(op),
            "{op} was not exercised; covered: {covered:#?}"
        );
    }
}

#[test]
fn the_oracle_rejects_what_github_would() {
    // The oracle itself: a body GitHub documents differently, an unknown
    // query parameter and an undocumented status are each found.
    let api = OpenApi::load();
    let x = |method: &str,
             path: &str,
             query: Option<&str>,
             request: Value,
             status: u16,
             response: Value| Exchange {
        method: method.into(),
        path: path.into(),
        query: query.map(str::to_owned),
        request: if request.is_null() {
            Vec::new()
        } else {
            request.to_string().into_bytes()
        },
        status,
        response: if response.is_null() {
            Vec::new()
        } else {
            response.to_string().into_bytes()
        },
    };
    let problems = |e: &Exchange| match api.check(e) {
        Checked::Operation(_, p) => p,
        Checked::Unknown(c) => vec![format!("unknown {c}")],
    };
    // runner_group_id must be an integer; labels is required.
    let bad_jit = x(
        "POST",
        "/orgs/o/actions/runners/generate-jitconfig",
        None,
        json!({"name": "r", "runner_group_id": "3"}),
        201,
        json!({"runner": {}, "encoded_jit_config": "x"}),
    );
    let p = problems(&bad_jit);
    assert!(p.iter().any(|p| p.contains("request body")), "{p:?}");
    assert!(p.iter().any(|p| p.contains("201 answer")), "{p:?}");
    let unknown_query = x(
        "GET",
        "/orgs/o/actions/runners",
        Some("names=x"),
        Value::Null,
        200,
        json!({"total_count": 0, "runners": []}),
    );
    assert!(
        problems(&unknown_query)
            .iter()
            .any(|p| p.contains("query parameter names"))
    );
    let teapot = x(
        "GET",
        "/repos/o/r/actions/jobs/12",
        None,
        Value::Null,
        418,
        Value::Null,
    );
    assert!(problems(&teapot).iter().any(|p| p.contains("status 418")));
    let bad_id = x(
        "GET",
        "/repos/o/r/actions/jobs/twelve",
        None,
        Value::Null,
        404,
        json!({"message": "Not Found"}),
    );
    assert!(
        problems(&bad_id)
            .iter()
            .any(|p| p.contains("path parameter job_id"))
    );
    // And a conforming exchange has none.
    let ok = x(
        "GET",
        "/orgs/o/actions/runners",
        Some("per_page=100&name=grs-1"),
        Value::Null,
        200,
        json!({"total_count": 0, "runners": []}),
    );
    assert_eq!(problems(&ok), Vec::<String>::new());
}

#[tokio::test]
async fn the_simulators_deliveries_match_githubs_workflow_job_webhook_schemas() {
    // Every `workflow_job` the simulator sends (queued, in_progress,
    // completed with a runner, completed as cancelled before any runner)
    // against the webhook schemas of GitHub's description.
    let hooks = OpenApi::parse(WEBHOOKS);
    let s = sim().await;
    let gh = GitHubClient::new(&app_config(&s)).unwrap();
    let ran = s.queue_job(NewJob::labels(["self-hosted", "linux"])).await;
    let cancelled = s.queue_job(NewJob::labels(["gpu"])).await;
    let jit = gh
        .generate_jit_config("grs-1", &["self-hosted".into(), "linux".into()], None)
        .await
        .unwrap();
    s.boot_runner(secrecy::ExposeSecret::expose_secret(
        &jit.encoded_jit_config,
    ))
    .await
    .unwrap();
    s.cancel_job(cancelled.id).await;
    assert!(
        s.wait_until(Duration::from_secs(5), |s| s.deliveries().len() == 5)
            .await,
        "five deliveries: {:?}",
        s.deliveries()
    );
    let mut failures = Vec::new();
    for d in s.deliveries() {
        let body: Value =
            serde_json::from_slice(&s.delivery_body(&d.delivery_id).unwrap()).unwrap();
        let event = format!("workflow-job-{}", d.action.replace('_', "-"));
        let schema = &hooks.doc["x-webhooks"][&event]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert!(!schema.is_null(), "{event} is in the description");
        failures.extend(hooks.problems(schema, &body, &format!("{event} of job {}", d.job_id)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        s.job(ran.id).unwrap().conclusion.as_deref(),
        Some("success")
    );
    s.shutdown().await;
}
