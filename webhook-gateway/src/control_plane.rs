//! The gateway's gRPC client to the control plane: a few lazily connected
//! HTTP/2 connections (each reconnects by itself) used in turn, an optional
//! bearer token on every call, optional TLS, and a deadline per call so no
//! webhook answer can take longer than GitHub waits.
//!
//! Why several connections: a server handles one HTTP/2 connection's frames
//! on one task, so a single connection caps what a multi-core control plane
//! can take from one gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use grs_proto::v1 as pb;
use grs_proto::v1::control_plane_client::ControlPlaneClient;
use secrecy::ExposeSecret;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{GatewayConfig, ResolvedSecrets};

/// A cheap-to-clone handle on the control plane.
#[derive(Clone)]
pub struct ControlPlane {
    clients: Arc<[ControlPlaneClient<Channel>]>,
    next: Arc<AtomicUsize>,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("auth", &self.auth.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("control plane endpoint: {0}")]
pub struct EndpointError(String);

impl ControlPlane {
    /// A handle for `config`; does not connect until the first call, so the
    /// gateway starts (and answers 503) while the control plane is down.
    pub fn new(config: &GatewayConfig, secrets: &ResolvedSecrets) -> Result<Self, EndpointError> {
        let mut ep = Endpoint::from_shared(config.control_plane_url.clone())
            .map_err(|e| EndpointError(e.to_string()))?
            .connect_timeout(config.control_plane_timeout.min(Duration::from_secs(2)))
            .timeout(config.control_plane_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if config.control_plane_url.starts_with("https://") || secrets.tls_ca_pem.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &secrets.tls_ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some(d) = &config.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| EndpointError(e.to_string()))?;
        }
        let auth = match &secrets.auth_token {
            Some(t) => {
                let mut v: MetadataValue<_> = format!("Bearer {}", t.expose_secret())
                    .parse()
                    .map_err(|_| {
                        EndpointError(
                            "`gateway.auth_token` has characters not allowed in a header".into(),
                        )
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Self {
            clients: (0..config.control_plane_connections.max(1))
                .map(|_| ControlPlaneClient::new(ep.connect_lazy()))
                .collect(),
            next: Arc::new(AtomicUsize::new(0)),
            auth,
            timeout: config.control_plane_timeout,
        })
    }

    fn client(&self) -> ControlPlaneClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.timeout);
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        req
    }

    /// `SubmitJobEvent`; the deadline is the configured timeout.
    pub async fn submit(
        &self,
        event: pb::JobEvent,
    ) -> Result<pb::SubmitJobEventResponse, tonic::Status> {
        let req = self.request(pb::SubmitJobEventRequest { event: Some(event) });
        let mut client = self.client();
        tokio::time::timeout(self.timeout, client.submit_job_event(req))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "control plane did not answer in time",
                ))
            })
            .map(tonic::Response::into_inner)
    }

    /// `GetBootstrapDocument`.
    pub async fn bootstrap_document(
        &self,
        token: String,
        document: pb::BootstrapDocument,
    ) -> Result<pb::GetBootstrapDocumentResponse, tonic::Status> {
        let req = self.request(pb::GetBootstrapDocumentRequest {
            token,
            document: document as i32,
        });
        let mut client = self.client();
        tokio::time::timeout(self.timeout, client.get_bootstrap_document(req))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "control plane did not answer in time",
                ))
            })
            .map(tonic::Response::into_inner)
    }
}
