//! One API call: the request, PVE's answer or error, retries with backoff.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::Value;

use super::{Idempotency, Param, PveClient, RecordedRequest};
use crate::error::PveError;

impl PveClient {
    /// One API call with retries; returns the `data` of the answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        params: &[Param],
        idem: Idempotency,
    ) -> Result<Value, PveError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send_once(&method, path, params).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let repeatable = e.is_transient()
                        && match idem {
                            Idempotency::Idempotent => true,
                            Idempotency::NotIdempotent => match &e {
                                PveError::Connect { maybe_sent, .. } => !maybe_sent,
                                PveError::Api { .. } => e.is_lock_conflict(),
                                _ => false,
                            },
                        };
                    if !repeatable || attempt >= self.attempts {
                        return Err(e);
                    }
                    let delay = self.backoff(attempt);
                    tracing::debug!(%method, path, attempt, ?delay, error = %e, "PVE call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Capped exponential backoff with full jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(self.backoff_max);
        let ms = exp.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    fn url_for(&self, path: &str) -> url::Url {
        let mut u = self.base.clone();
        {
            let mut segs = u.path_segments_mut().expect("https URL has a path");
            for s in path.split('/').filter(|s| !s.is_empty()) {
                segs.push(s);
            }
        }
        u
    }

    pub(super) async fn send_once(
        &self,
        method: &Method,
        path: &str,
        params: &[Param],
    ) -> Result<Value, PveError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let pairs: Vec<(String, String)> = params
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        if let Some(rec) = self.recorder.lock().unwrap().as_ref() {
            rec.lock().unwrap().push(RecordedRequest {
                method: method.to_string(),
                path: path.to_owned(),
                params: pairs.clone(),
            });
        }
        let url = self.url_for(path);
        let mut auth = http::HeaderValue::from_str(self.auth.expose_secret()).map_err(|_| {
            PveError::Decode {
                path: path.into(),
                detail: "the API token contains characters not allowed in a header".into(),
            }
        })?;
        auth.set_sensitive(true);
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .header(http::header::AUTHORIZATION, auth);
        if *method == Method::GET || *method == Method::DELETE {
            if !pairs.is_empty() {
                req = req.query(&pairs);
            }
        } else {
            req = req.form(&pairs);
        }
        let started = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(self.transport_error(method, &url, e)),
        };
        let status = resp.status();
        // PVE's error text is in the status line's reason phrase on every
        // release, and in the body's `message` only since
        // libpve-http-server-perl 5.2 (PVE 8.4): hyper keeps a reason that
        // is not the canonical one as an extension.
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .and_then(|r| std::str::from_utf8(r.as_bytes()).ok())
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Err(self.transport_error(method, &url, e)),
        };
        tracing::debug!(%method, path, status = status.as_u16(), elapsed = ?started.elapsed(), "PVE call");
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return match json {
                Value::Object(mut m) => Ok(m.remove("data").unwrap_or(Value::Null)),
                _ => Err(PveError::Decode {
                    path: path.into(),
                    detail: format!("HTTP {status} without a JSON body"),
                }),
            };
        }
        let scrub = |s: &str| scrub(s, params);
        let message = json
            .get("message")
            .and_then(Value::as_str)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or(reason)
            .unwrap_or_else(|| {
                status
                    .canonical_reason()
                    .unwrap_or("error without message")
                    .to_owned()
            });
        let errors: BTreeMap<String, String> = json
            .get("errors")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let text = v
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string());
                        (k.clone(), scrub(text.trim()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if status.as_u16() == 401 {
            return Err(PveError::Auth {
                url: self.origin.clone(),
                token_id: self.token_id.clone(),
                message: scrub(&message),
            });
        }
        Err(PveError::Api {
            method: method.to_string(),
            path: path.to_owned(),
            status: status.as_u16(),
            message: scrub(&message),
            errors,
        })
    }

    fn transport_error(&self, method: &Method, url: &url::Url, e: reqwest::Error) -> PveError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            let text = s.to_string();
            if !detail.contains(&text) {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            src = s.source();
        }
        let shown = self.origin.clone();
        if e.is_timeout() {
            return PveError::Timeout {
                method: method.to_string(),
                url: url.to_string(),
                after: self.request_timeout,
            };
        }
        let lower = detail.to_lowercase();
        if lower.contains("certificate") || lower.contains("fingerprint") {
            return PveError::Tls { url: shown, detail };
        }
        PveError::Connect {
            url: shown,
            detail,
            maybe_sent: !e.is_connect(),
        }
    }
}

/// Replaces every sensitive parameter value in `text` by `[REDACTED]`.
fn scrub(text: &str, params: &[Param]) -> String {
    let mut out = text.to_owned();
    for p in params.iter().filter(|p| p.sensitive && p.value.len() >= 4) {
        out = out.replace(&p.value, "[REDACTED]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_values_are_scrubbed_and_not_debug_printed() {
        let p = [Param::secret("smbios1", "serial=c2VjcmV0LXVybA==,base64=1")];
        assert_eq!(
            scrub("value 'serial=c2VjcmV0LXVybA==,base64=1' is bad", &p),
            "value '[REDACTED]' is bad"
        );
        assert!(!format!("{:?}", p[0]).contains("c2VjcmV0"));
    }
}
