//! The gateway: its public URL answers `GET /healthz`.

use std::time::Duration;

use super::{Check, Loaded, bounded};
use crate::error::transport_detail;

const NAME: &str = "gateway reachable";

pub(super) async fn checks(loaded: &Loaded, timeout: Duration) -> Vec<Check> {
    let Some((key, base)) = loaded.gateway_url() else {
        return vec![Check::warn(
            NAME,
            "neither gateway.public_url nor control_plane.gateway_url is set: VMs get no cloud-init seed and the gateway cannot be checked",
            "set control_plane.gateway_url to the URL VMs and GitHub reach the gateway at",
        )];
    };
    let url = format!("{base}/healthz");
    let answer = bounded(timeout, &url, async {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| transport_detail(&e))?;
        let resp = client
            .get(&url)
            .send()
            .await
            .map_err(|e| transport_detail(&e))?;
        Ok::<_, String>(resp.status())
    })
    .await;
    vec![match answer {
        Ok(s) if s.is_success() => Check::pass(NAME, format!("GET {url}: {s}")),
        Ok(s) => Check::fail(
            NAME,
            format!("GET {url}: {s} ({key})"),
            format!(
                "{key} must point at the webhook gateway (grs-webhook-gateway serves /healthz)"
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("GET {url}: {e} ({key})"),
            format!(
                "start grs-webhook-gateway, or correct {key}; GitHub and the VMs must reach it there"
            ),
        ),
    }]
}
