//! Connecting to the control plane: URL, TLS, the bearer token, timeouts,
//! and turning failed calls into [`CliError`]s.

use std::future::Future;
use std::time::Duration;

use grs_proto::v1::control_plane_client::ControlPlaneClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::args::GlobalArgs;
use crate::error::{CallContext, CliError, Subject, from_status, transport_detail};

/// The generated client with the bearer token attached to every call.
pub(crate) type Api = ControlPlaneClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every request, when a token was
/// given. The value is marked sensitive, so HTTP/2 never indexes it and
/// debug logs of the headers do not show it.
#[derive(Clone)]
pub(crate) struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to one control plane, with what error messages need.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    api: Api,
    /// The URL as the operator gave it, for messages.
    server: String,
    /// Whether a token is sent (changes the advice on UNAUTHENTICATED).
    token_given: bool,
    /// Limit on each unary call.
    timeout: Duration,
}

impl Connection {
    /// Connects now, so that an unreachable server is reported as such
    /// (exit 69) before any call is made.
    pub(crate) async fn connect(global: &GlobalArgs) -> Result<Self, CliError> {
        let server = global.server.clone();
        let token = match &global.token {
            Some(t) if !t.0.trim().is_empty() => {
                let mut v: MetadataValue<Ascii> =
                    format!("Bearer {}", t.0.trim()).parse().map_err(|_| {
                        CliError::Usage(
                            "the bearer token (--token or GRS_TOKEN) must be printable ASCII"
                                .into(),
                        )
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => None,
        };
        let mut endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| CliError::Usage(format!("--server {server}: {e}")))?
            .connect_timeout(global.timeout)
            .user_agent(concat!("grs/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| CliError::Usage(format!("user agent: {e}")))?;
        let https = server.starts_with("https://");
        match (&global.ca_file, https) {
            (Some(_), false) => {
                return Err(CliError::Usage(format!(
                    "--ca-file applies to https:// servers only, and {server} is not one"
                )));
            }
            (ca_file, true) => {
                let mut tls = ClientTlsConfig::new();
                tls = match ca_file {
                    Some(path) => {
                        let pem = std::fs::read(path).map_err(|e| {
                            CliError::Usage(format!(
                                "cannot read --ca-file {}: {e}",
                                path.display()
                            ))
                        })?;
                        tls.ca_certificate(Certificate::from_pem(pem))
                    }
                    None => tls.with_native_roots(),
                };
                endpoint = endpoint.tls_config(tls).map_err(|e| {
                    CliError::Usage(format!("TLS setup for {server}: {}", transport_detail(&e)))
                })?;
            }
            (None, false) => {}
        }
        let unreachable = |detail: String| {
            CliError::Unavailable(format!(
                "cannot reach the control plane at {server}: {detail}"
            ))
        };
        let channel = match tokio::time::timeout(global.timeout, endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unreachable(transport_detail(&e))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {}",
                    humantime::format_duration(global.timeout)
                )));
            }
        };
        let token_given = token.is_some();
        Ok(Self {
            api: ControlPlaneClient::with_interceptor(channel, BearerToken(token)),
            server,
            token_given,
            timeout: global.timeout,
        })
    }

    /// The server URL, for messages.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// Runs one call under the timeout; failures become [`CliError`]s
    /// naming the server, and `subject` on NOT_FOUND.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        subject: Option<Subject>,
        f: F,
    ) -> Result<T, CliError>
    where
        F: FnOnce(Api) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        match tokio::time::timeout(self.timeout, f(self.api.clone())).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(self.error(&status, subject.as_ref())),
            Err(_) => Err(CliError::Unavailable(format!(
                "deadline exceeded: no answer from the control plane at {} within {}",
                self.server,
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// A failed call's status as a [`CliError`].
    pub(crate) fn error(&self, status: &Status, subject: Option<&Subject>) -> CliError {
        from_status(
            status,
            &CallContext {
                server: &self.server,
                token_given: self.token_given,
            },
            subject,
        )
    }
}
