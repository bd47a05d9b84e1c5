//! The payload parser never panics, and what it accepts keeps the
//! invariants the gateway relies on.
#![no_main]

use grs_github::webhook::{self, BodyEncoding, Delivery};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let event = if selector & 1 == 0 { "workflow_job" } else { "ping" };
    let encoding = if selector & 2 == 0 { BodyEncoding::Json } else { BodyEncoding::Form };
    if let Ok(Delivery::WorkflowJob(job)) = webhook::parse(event, encoding, body) {
        assert_ne!(job.job_id, 0);
        assert!(job.runner_id != Some(0));
        assert!(job.runner_name.as_deref() != Some(""));
        assert!(job.action.is_some());
    }
    // Content types too.
    if let Ok(ct) = std::str::from_utf8(body) {
        let _ = BodyEncoding::from_content_type(Some(ct));
    }
});
