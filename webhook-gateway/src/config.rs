//! `[gateway]`: the webhook gateway's section of the shared config file.
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:8080"
//! control_plane_url = "http://127.0.0.1:50051"
//! # webhook_secret_file = "/etc/grs/webhook-secret"   # or GRS_WEBHOOK_SECRET
//! # auth_token_file = "/etc/grs/control-plane-token"  # bearer token for the control plane
//! # tls_ca_file = "/etc/grs/ca.pem"                   # control plane over TLS
//! max_body_bytes = 1048576
//! control_plane_connections = 4
//! control_plane_timeout = "5s"
//! request_timeout = "9s"
//! shutdown_grace = "10s"
//! ```
//!
//! The webhook secret is looked up in this order: `gateway.webhook_secret`
//! (`GRS_GATEWAY_WEBHOOK_SECRET`), `gateway.webhook_secret_file`, then
//! `GRS_WEBHOOK_SECRET` (the name the example config documents).

use std::path::PathBuf;
use std::time::Duration;

use grs_config::ConfigError;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The variable the webhook secret is read from when the config names none.
pub const WEBHOOK_SECRET_ENV: &str = "GRS_WEBHOOK_SECRET";

/// The file the gateway binary reads: `[gateway]`, plus the control
/// plane's bearer token from `[control_plane]` (the same file configures
/// both ends, so the token is written once). Every other key is ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigFile {
    /// `[gateway]`.
    pub gateway: GatewayConfig,
    /// The token keys of `[control_plane]`.
    pub control_plane: ControlPlaneSection,
}

impl ConfigFile {
    /// The gateway's section, with the control plane's bearer token
    /// (`control_plane.auth_token`, `GRS_CONTROL_PLANE_AUTH_TOKEN`, or
    /// `control_plane.auth_token_file`) filled in when `[gateway]` names
    /// none of its own.
    pub fn into_gateway(self) -> GatewayConfig {
        let mut g = self.gateway;
        if g.auth_token.is_none() && g.auth_token_file.is_none() {
            g.auth_token = self.control_plane.auth_token;
            g.auth_token_file = self.control_plane.auth_token_file;
        }
        g
    }
}

/// What the gateway reads of `[control_plane]` (other keys are the control
/// plane's business and are ignored here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlPlaneSection {
    /// The bearer token the control plane requires.
    #[serde(default, skip_serializing)]
    pub auth_token: Option<SecretString>,
    /// File holding it.
    pub auth_token_file: Option<PathBuf>,
}

/// The `[gateway]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to serve HTTP on.
    pub listen: String,
    /// The control plane's gRPC endpoint (`http://` or `https://`).
    pub control_plane_url: String,
    /// Bearer token sent to the control plane (if it requires one);
    /// default: the `[control_plane]` token of the same file.
    #[serde(default, skip_serializing)]
    pub auth_token: Option<SecretString>,
    /// File holding that token.
    pub auth_token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the control plane's TLS certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS server name to expect, if not the URL's host.
    pub tls_domain: Option<String>,
    /// The secret GitHub signs deliveries with.
    #[serde(default, skip_serializing)]
    pub webhook_secret: Option<SecretString>,
    /// File holding the webhook secret.
    pub webhook_secret_file: Option<PathBuf>,
    /// Larger request bodies are refused with 413 (workflow_job payloads
    /// are about 10 KB; GitHub caps payloads at 25 MB).
    pub max_body_bytes: usize,
    /// HTTP/2 connections to the control plane, used in turn.
    pub control_plane_connections: usize,
    /// Deadline of each control-plane call; keeps every answer well inside
    /// GitHub's 10 s.
    #[serde(with = "humantime_serde")]
    pub control_plane_timeout: Duration,
    /// The URL VMs reach this gateway at (`https://grs.example.com`), for
    /// the operator's reference and logs; the control plane builds the
    /// cloud-init seed URL from its own copy.
    pub public_url: Option<String>,
    /// Longest any request may take, body upload included (408 after):
    /// a slow or stalled client cannot hold an answer past GitHub's 10 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            control_plane_url: "http://127.0.0.1:50051".into(),
            auth_token: None,
            auth_token_file: None,
            tls_ca_file: None,
            tls_domain: None,
            webhook_secret: None,
            webhook_secret_file: None,
            max_body_bytes: 1024 * 1024,
            control_plane_connections: 4,
            control_plane_timeout: Duration::from_secs(5),
            public_url: None,
            request_timeout: Duration::from_secs(9),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl GatewayConfig {
    /// Checks the section and resolves its secrets, reading secret files.
    /// `env` looks up [`WEBHOOK_SECRET_ENV`] (the process environment in the
    /// binary, a map in tests). Errors name the key to fix.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ResolvedSecrets, ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(ConfigError::key(
                "gateway.max_body_bytes",
                "must be above 0",
            ));
        }
        if self.control_plane_timeout.is_zero()
            || self.control_plane_timeout > Duration::from_secs(9)
        {
            return Err(ConfigError::key(
                "gateway.control_plane_timeout",
                "must be between 1ms and 9s (GitHub waits 10s for an answer)",
            ));
        }
        if !(1..=64).contains(&self.control_plane_connections) {
            return Err(ConfigError::key(
                "gateway.control_plane_connections",
                "must be between 1 and 64",
            ));
        }
        if self.request_timeout <= self.control_plane_timeout
            || self.request_timeout > Duration::from_secs(10)
        {
            return Err(ConfigError::key(
                "gateway.request_timeout",
                "must be above gateway.control_plane_timeout and at most 10s",
            ));
        }
        if !(self.control_plane_url.starts_with("http://")
            || self.control_plane_url.starts_with("https://"))
        {
            return Err(ConfigError::key(
                "gateway.control_plane_url",
                format!(
                    "must be an http:// or https:// URL, not {:?}",
                    self.control_plane_url
                ),
            ));
        }
        let webhook_secret = match grs_config::secret(
            "gateway.webhook_secret",
            self.webhook_secret.as_ref(),
            self.webhook_secret_file.as_deref(),
        )? {
            Some(s) => s,
            None => env(WEBHOOK_SECRET_ENV)
                .map(SecretString::from)
                .ok_or_else(|| {
                    ConfigError::key(
                        "gateway.webhook_secret",
                        format!(
                            "not set: set {WEBHOOK_SECRET_ENV} or `gateway.webhook_secret_file`"
                        ),
                    )
                })?,
        };
        if webhook_secret.expose_secret().is_empty() {
            return Err(ConfigError::key("gateway.webhook_secret", "is empty"));
        }
        let auth_token = grs_config::secret(
            "gateway.auth_token",
            self.auth_token.as_ref(),
            self.auth_token_file.as_deref(),
        )?;
        let tls_ca_pem = match &self.tls_ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                ConfigError::key(
                    "gateway.tls_ca_file",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?),
            None => None,
        };
        Ok(ResolvedSecrets {
            webhook_secret,
            auth_token,
            tls_ca_pem,
        })
    }
}

/// What [`GatewayConfig::resolve`] read.
#[derive(Debug, Clone)]
pub struct ResolvedSecrets {
    /// The webhook secret.
    pub webhook_secret: SecretString,
    /// The control plane's bearer token, if any.
    pub auth_token: Option<SecretString>,
    /// The control plane's CA, if any.
    pub tls_ca_pem: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<GatewayConfig, ConfigError> {
        let file = grs_config::parse_file(std::path::Path::new("grs.toml"), text)?;
        let c: ConfigFile = grs_config::load_from(
            Some(file),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )?;
        Ok(c.gateway)
    }

    #[test]
    fn defaults_match_the_example_config() {
        let c = GatewayConfig::default();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.control_plane_url, "http://127.0.0.1:50051");
        assert_eq!(c.max_body_bytes, 1 << 20);
    }

    #[test]
    fn other_sections_of_the_shared_file_are_ignored_and_env_overrides_apply() {
        let c = load(
            "[redis]\nurl = 'redis://x'\n[pools.linux]\nlabels = ['a']\n[gateway]\nlisten = '0.0.0.0:80'\n",
            &[("GRS_GATEWAY_LISTEN", "127.0.0.1:9999"), ("GRS_GATEWAY_CONTROL_PLANE_TIMEOUT", "2s")],
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999");
        assert_eq!(c.control_plane_timeout, Duration::from_secs(2));
    }

    #[test]
    fn the_control_plane_token_of_the_shared_file_is_used_unless_the_gateway_has_its_own() {
        let text = "[control_plane]\nlisten = '127.0.0.1:50051'\ninstallation_id = 'x'\nauth_token_file = '/etc/grs/cp.token'\n";
        let file = grs_config::parse_file(std::path::Path::new("grs.toml"), text).unwrap();
        let c: ConfigFile = grs_config::load_from(Some(file), Vec::new()).unwrap();
        assert_eq!(
            c.into_gateway().auth_token_file,
            Some(PathBuf::from("/etc/grs/cp.token"))
        );

        let file = grs_config::parse_file(std::path::Path::new("grs.toml"), "").unwrap();
        let c: ConfigFile = grs_config::load_from(
            Some(file),
            [(
                "GRS_CONTROL_PLANE_AUTH_TOKEN".to_string(),
                "t0k".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(c.into_gateway().auth_token.unwrap().expose_secret(), "t0k");

        let file = grs_config::parse_file(std::path::Path::new("grs.toml"), text).unwrap();
        let c: ConfigFile = grs_config::load_from(
            Some(file),
            [("GRS_GATEWAY_AUTH_TOKEN".to_string(), "own".to_string())],
        )
        .unwrap();
        let g = c.into_gateway();
        assert_eq!(g.auth_token.unwrap().expose_secret(), "own");
        assert_eq!(g.auth_token_file, None);
    }

    #[test]
    fn the_webhook_secret_comes_from_config_then_file_then_grs_webhook_secret() {
        let c = load("", &[("GRS_GATEWAY_WEBHOOK_SECRET", "inline")]).unwrap();
        let s = c.resolve(|_| Some("env".into())).unwrap();
        assert_eq!(s.webhook_secret.expose_secret(), "inline");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "from-file\n").unwrap();
        let c = GatewayConfig {
            webhook_secret_file: Some(f),
            ..GatewayConfig::default()
        };
        assert_eq!(
            c.resolve(|_| Some("env".into()))
                .unwrap()
                .webhook_secret
                .expose_secret(),
            "from-file"
        );

        let c = GatewayConfig::default();
        let s = c
            .resolve(|k| (k == WEBHOOK_SECRET_ENV).then(|| "env".to_string()))
            .unwrap();
        assert_eq!(s.webhook_secret.expose_secret(), "env");
        let e = c.resolve(|_| None).unwrap_err().to_string();
        assert!(e.contains("gateway.webhook_secret"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let with_secret =
            |c: GatewayConfig| c.resolve(|_| Some("s".into())).unwrap_err().to_string();
        let e = with_secret(GatewayConfig {
            control_plane_timeout: Duration::from_secs(30),
            ..Default::default()
        });
        assert!(e.contains("gateway.control_plane_timeout"), "{e}");
        let e = with_secret(GatewayConfig {
            control_plane_url: "127.0.0.1:50051".into(),
            ..Default::default()
        });
        assert!(e.contains("gateway.control_plane_url"), "{e}");
        let e = with_secret(GatewayConfig {
            control_plane_connections: 0,
            ..Default::default()
        });
        assert!(e.contains("gateway.control_plane_connections"), "{e}");
        let e = with_secret(GatewayConfig {
            request_timeout: Duration::from_secs(3),
            ..Default::default()
        });
        assert!(e.contains("gateway.request_timeout"), "{e}");
        let e = with_secret(GatewayConfig {
            max_body_bytes: 0,
            ..Default::default()
        });
        assert!(e.contains("gateway.max_body_bytes"), "{e}");
        let e = with_secret(GatewayConfig {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        });
        assert!(e.contains("gateway.tls_ca_file"), "{e}");
        let e = load("[gateway]\nmax_body_bytes = 'big'\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.max_body_bytes"), "{e}");
    }

    #[test]
    fn secrets_do_not_serialize_or_debug() {
        let c = GatewayConfig {
            webhook_secret: Some(SecretString::from("hunter2".to_owned())),
            auth_token: Some(SecretString::from("tok3n".to_owned())),
            ..Default::default()
        };
        let dump = format!("{c:?} {}", toml::to_string(&c).unwrap());
        assert!(
            !dump.contains("hunter2") && !dump.contains("tok3n"),
            "{dump}"
        );
    }
}
