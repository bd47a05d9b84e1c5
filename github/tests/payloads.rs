//! Every real payload in the shared fixtures parses and maps to the right
//! `JobEvent`; bad input is refused with a reason.

use std::path::{Path, PathBuf};

use grs_github::webhook::{self, BodyEncoding, Delivery, JobAction, PayloadError};

fn fixtures() -> PathBuf {
    std::env::var_os("GRS_GITHUB_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/github/payloads")
        })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "schemas") {
                walk(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

/// (file, event name, body as sent, encoding)
fn deliveries() -> Vec<(PathBuf, &'static str, Vec<u8>, BodyEncoding)> {
    let mut files = Vec::new();
    walk(&fixtures(), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read(&f).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
            let name = f.to_string_lossy().to_string();
            if name.contains("rest-api-description") {
                // `{"value": ...}` wrappers of GitHub's OpenAPI examples.
                if name.contains("form-encoded") {
                    let payload = v["value"]["payload"].as_str().unwrap();
                    (
                        f,
                        "ping",
                        format!("payload={payload}").into_bytes(),
                        BodyEncoding::Form,
                    )
                } else {
                    (
                        f,
                        "ping",
                        serde_json::to_vec(&v["value"]).unwrap(),
                        BodyEncoding::Json,
                    )
                }
            } else if v.get("workflow_job").is_some() {
                (f, "workflow_job", text, BodyEncoding::Json)
            } else {
                (f, "ping", text, BodyEncoding::Json)
            }
        })
        .collect()
}

#[test]
fn every_fixture_payload_parses() {
    let all = deliveries();
    assert!(
        all.len() >= 15,
        "fixtures folder looks incomplete: {} files",
        all.len()
    );
    let (mut jobs, mut pings) = (0, 0);
    for (f, event, body, enc) in &all {
        match webhook::parse(event, *enc, body) {
            Ok(Delivery::WorkflowJob(j)) => {
                jobs += 1;
                assert_ne!(j.job_id, 0, "{}", f.display());
                assert!(!j.repository.is_empty(), "{}", f.display());
                assert!(j.action.is_some(), "{}", f.display());
            }
            Ok(Delivery::Ping(_)) => pings += 1,
            other => panic!("{}: {other:?}", f.display()),
        }
    }
    assert_eq!((jobs, pings), (11, 5));
}

fn secs(t: Option<std::time::SystemTime>) -> u64 {
    t.unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn event_of(file: &str) -> webhook::WorkflowJobEvent {
    let (_, event, body, enc) = deliveries()
        .into_iter()
        .find(|(f, ..)| f.ends_with(file))
        .unwrap_or_else(|| panic!("no fixture {file}"));
    match webhook::parse(event, enc, &body).unwrap() {
        Delivery::WorkflowJob(j) => *j,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_self_hosted_waiting_job_maps_with_its_64_bit_id_and_no_runner() {
    let e = event_of("octokit-webhooks/workflow_job/waiting.payload.json");
    assert_eq!(e.job_action(), JobAction::Waiting);
    assert_eq!(e.job_id, 12_877_621_891);
    assert_eq!(e.run_id, 4_747_967_848);
    assert_eq!(e.run_attempt, 1);
    assert_eq!(e.labels, ["self-hosted", "k8s"]);
    assert_eq!((e.runner_id, e.runner_name.as_deref()), (None, None));
    assert_eq!(e.repository, "lineville/elastic-machines-testing");
    assert_eq!(e.organization, None);
    assert_eq!(e.installation_id, Some(23_154_469));
    assert_eq!(secs(e.created_at), 1_681_938_732); // 2023-04-19T21:12:12Z
    assert!(e.completed_at.is_none());
    assert_eq!(
        (e.job_name.as_str(), e.workflow_name.as_str()),
        ("test", "Env Test")
    );
}

#[test]
fn queued_with_deployment_maps_by_action_not_status() {
    let e = event_of("queued.with-deployment.payload.json");
    assert_eq!(e.job_action(), JobAction::Queued);
    assert_eq!(e.job_id, 12_877_621_891);
}

#[test]
fn a_completed_job_carries_its_runner_conclusion_and_organization() {
    let e = event_of("completed.failure.with-organization.payload.json");
    assert_eq!(e.job_action(), JobAction::Completed);
    assert_eq!(e.job_id, 289_782_451);
    assert_eq!(
        (e.runner_id, e.runner_name.as_deref()),
        (Some(5), Some("GitHub Actions 5"))
    );
    assert_eq!(e.conclusion.as_deref(), Some("failure"));
    assert_eq!(e.organization.as_deref(), Some("Octocoders"));
    assert_eq!(e.installation_id, None);
    assert_eq!(secs(e.completed_at), 1_628_159_896); // 2021-08-05T10:38:16Z
}

#[test]
fn in_progress_names_the_runner_and_installation() {
    let e = event_of("in_progress.with-queued-steps.payload.json");
    assert_eq!(e.job_action(), JobAction::InProgress);
    assert_eq!(e.job_id, 14_541_957_942);
    assert_eq!(e.runner_name.as_deref(), Some("GitHub Actions 6"));
    assert_eq!(e.installation_id, Some(3_456_996));
}

#[test]
fn a_check_run_completion_with_no_labels_and_null_runner_is_no_runner() {
    let e = event_of("arc__webhook_workflow_job_with_completed_failure_check_run.json");
    assert_eq!(e.job_action(), JobAction::Completed);
    assert_eq!(e.job_id, 10_472_913_772);
    assert!(e.labels.is_empty());
    assert_eq!((e.runner_id, e.runner_name.as_deref()), (None, None));
    assert_eq!(e.organization.as_deref(), Some("MYORG"));
}

#[test]
fn a_2021_payload_without_run_attempt_or_runner_keys_parses() {
    let e = event_of("terraform-aws-github-runner__github_workflowjob_event.json");
    assert_eq!(e.job_action(), JobAction::Queued);
    assert_eq!(e.job_id, 3_169_272_040);
    assert_eq!(e.run_attempt, 0);
    assert_eq!(e.labels, ["self-hosted"]);
    assert_eq!((e.runner_id, e.runner_name.as_deref()), (None, None));
    assert_eq!(e.workflow_name, "");
    let e = event_of("arc__org_webhook_workflow_job_with_self_hosted_label_payload.json");
    assert_eq!(e.labels, ["self-hosted", "label1"]);
    assert_eq!(e.organization.as_deref(), Some("MYORG"));
}

#[test]
fn the_form_encoded_ping_parses() {
    let (_, event, body, enc) = deliveries()
        .into_iter()
        .find(|(f, ..)| f.ends_with("ping-form-encoded.example.json"))
        .unwrap();
    assert_eq!(enc, BodyEncoding::Form);
    assert!(body.starts_with(b"payload=%7B"));
    match webhook::parse(event, enc, &body).unwrap() {
        Delivery::Ping(p) => assert_eq!(p.hook_id, 1234),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_form_encoded_workflow_job_maps_like_its_json() {
    let json = br#"{"action":"queued","workflow_job":{"id":"9007199254740993","labels":["a b","c&d"]},"repository":{"full_name":"o/r"}}"#;
    let form = format!(
        "payload={}",
        url::form_urlencoded::byte_serialize(json).collect::<String>()
    );
    let a = webhook::parse("workflow_job", BodyEncoding::Json, json).unwrap();
    let b = webhook::parse("workflow_job", BodyEncoding::Form, form.as_bytes()).unwrap();
    assert_eq!(a, b);
    let Delivery::WorkflowJob(j) = a else {
        panic!()
    };
    assert_eq!(j.job_id, 9_007_199_254_740_993); // > 2^53: no float on the way
    assert_eq!(j.labels, ["a b", "c&d"]);
}

fn job(json: &str) -> Result<Delivery, PayloadError> {
    webhook::parse("workflow_job", BodyEncoding::Json, json.as_bytes())
}

#[test]
fn null_zero_empty_and_missing_all_mean_no_runner() {
    for runner in [
        r#""runner_id":null,"runner_name":null"#,
        r#""runner_id":0,"runner_name":"""#,
        r#""runner_id":"","runner_name":"""#,
        r#""labels":[]"#,
    ] {
        let d = job(&format!(
            r#"{{"action":"completed","workflow_job":{{"id":1,{runner}}},"repository":{{"full_name":"o/r"}}}}"#
        ))
        .unwrap();
        let Delivery::WorkflowJob(j) = d else {
            panic!()
        };
        assert_eq!(
            (j.runner_id, j.runner_name.as_deref()),
            (None, None),
            "{runner}"
        );
    }
}

#[test]
fn a_payload_missing_the_job_id_or_action_is_refused() {
    assert_eq!(
        job(r#"{"action":"queued","workflow_job":{"labels":[]}}"#),
        Err(PayloadError::Missing("workflow_job.id"))
    );
    assert_eq!(
        job(r#"{"action":"queued","workflow_job":{"id":null}}"#),
        Err(PayloadError::Missing("workflow_job.id"))
    );
    assert_eq!(
        job(r#"{"action":"queued","workflow_job":{"id":0}}"#),
        Err(PayloadError::Missing("workflow_job.id"))
    );
    assert_eq!(
        job(r#"{"action":"queued"}"#),
        Err(PayloadError::Missing("workflow_job"))
    );
    assert_eq!(
        job(r#"{"workflow_job":{"id":1}}"#),
        Err(PayloadError::Missing("action"))
    );
}

#[test]
fn invalid_and_truncated_json_is_refused() {
    let full = std::fs::read(fixtures().join("octokit-webhooks/workflow_job/queued.payload.json"))
        .unwrap();
    for bad in [
        &full[..full.len() / 2],
        b"not json",
        b"",
        b"[1,2]",
        br#"{"action":"queued","workflow_job":{"id":-5}}"#,
    ] {
        assert!(
            matches!(
                webhook::parse("workflow_job", BodyEncoding::Json, bad),
                Err(PayloadError::Invalid(_))
            ),
            "{}",
            String::from_utf8_lossy(&bad[..bad.len().min(40)])
        );
    }
    assert_eq!(
        webhook::parse("ping", BodyEncoding::Form, b"other=1"),
        Err(PayloadError::MissingFormPayload)
    );
}

#[test]
fn labels_parse_as_sent_and_the_wire_limits_are_the_gateways() {
    // No GRS limit here: the gateway checks grs-proto's when it converts.
    let labels: Vec<String> = (0..150).map(|i| format!("l{i}")).collect();
    let body =
        serde_json::json!({"action":"queued","workflow_job":{"id":1,"labels":labels}}).to_string();
    match job(&body) {
        Ok(Delivery::WorkflowJob(j)) => assert_eq!(j.labels, labels),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_events_and_actions_are_ignored_not_errors() {
    assert!(matches!(
        webhook::parse("push", BodyEncoding::Json, b"garbage"),
        Ok(Delivery::Ignored { .. })
    ));
    assert!(matches!(
        job(r#"{"action":"requested","workflow_job":{"id":1}}"#),
        Ok(Delivery::Ignored { reason }) if reason == "workflow_job.requested"
    ));
}

#[test]
fn content_types_are_recognised() {
    assert_eq!(
        BodyEncoding::from_content_type(Some("application/json; charset=utf-8")),
        Ok(BodyEncoding::Json)
    );
    assert_eq!(
        BodyEncoding::from_content_type(Some("Application/X-WWW-Form-Urlencoded")),
        Ok(BodyEncoding::Form)
    );
    assert_eq!(
        BodyEncoding::from_content_type(None),
        Ok(BodyEncoding::Json)
    );
    assert!(matches!(
        BodyEncoding::from_content_type(Some("text/xml")),
        Err(PayloadError::ContentType(_))
    ));
}

#[test]
fn action_names_round_trip() {
    for a in [
        JobAction::Queued,
        JobAction::Waiting,
        JobAction::InProgress,
        JobAction::Completed,
    ] {
        let body = format!(r#"{{"action":"{}","workflow_job":{{"id":7}}}}"#, a.as_str());
        let Ok(Delivery::WorkflowJob(j)) = job(&body) else {
            panic!()
        };
        assert_eq!(j.job_action(), a);
    }
}
