//! [`serve`]: exposes any [`Provisioner`] as `grs.provisioner.v1.Provisioner`.
//!
//! The service is a thin adapter: each RPC calls the trait method of the
//! same name and maps errors with [`crate::convert`]. Reflection is served
//! too (grpcurl works against a plugin with no `.proto` at hand).

use std::future::Future;
use std::sync::Arc;

use grs_proto::provisioner::v1 as pb;
use grs_proto::provisioner::v1::provisioner_server::{
    Provisioner as ProvisionerService, ProvisionerServer,
};
use grs_provisioner::{PoolDocument, Provisioner};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::PROTOCOL_VERSION;
use crate::convert::{bootstrap_kind_to_pb, error_to_status, instance_to_pb, spec_from_pb};

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built.
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The adapter from the generated service to the trait.
#[derive(Debug)]
struct Service {
    inner: Arc<dyn Provisioner>,
    version: String,
}

fn status(e: grs_provisioner::ProvisionerError) -> Status {
    error_to_status(&e)
}

#[tonic::async_trait]
impl ProvisionerService for Service {
    async fn handshake(
        &self,
        req: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeResponse>, Status> {
        let want = req.into_inner().protocol_version;
        if want != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "this plugin speaks protocol version {PROTOCOL_VERSION}, GRS asked for {want}"
            )));
        }
        Ok(Response::new(pb::HandshakeResponse {
            protocol_version: PROTOCOL_VERSION,
            backend: self.inner.kind().to_owned(),
            version: self.version.clone(),
            capabilities: Some(pb::Capabilities {
                start_stop: self.inner.capabilities().start_stop,
            }),
        }))
    }

    async fn validate_pool(
        &self,
        req: Request<pb::ValidatePoolRequest>,
    ) -> Result<Response<pb::ValidatePoolResponse>, Status> {
        let r = req.into_inner();
        let doc: PoolDocument = serde_json::from_str(&r.config_json).map_err(|e| {
            Status::invalid_argument(format!(
                "pools.{}.provisioner: config_json is not a JSON object: {e}",
                r.pool
            ))
        })?;
        self.inner.configure_pool(&r.pool, &doc).map_err(status)?;
        self.inner.validate_pool(&r.pool).await.map_err(status)?;
        let bootstrap = self
            .inner
            .pool_bootstrap(&r.pool)
            .map_or(pb::BootstrapKind::Unspecified, bootstrap_kind_to_pb);
        Ok(Response::new(pb::ValidatePoolResponse {
            bootstrap: bootstrap.into(),
        }))
    }

    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let spec = spec_from_pb(req.into_inner());
        let inst = self.inner.create(&spec).await.map_err(status)?;
        Ok(Response::new(pb::CreateResponse {
            instance: Some(instance_to_pb(&inst)),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = req.into_inner();
        self.inner.delete(&r.pool, &r.name).await.map_err(status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let got = self.inner.get(&r.pool, &r.name).await.map_err(status)?;
        Ok(Response::new(pb::GetResponse {
            found: got.is_some(),
            instance: got.as_ref().map(instance_to_pb),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.into_inner();
        let all = self.inner.list(&r.pool).await.map_err(status)?;
        Ok(Response::new(pb::ListResponse {
            instances: all.iter().map(instance_to_pb).collect(),
        }))
    }

    async fn start(
        &self,
        req: Request<pb::StartRequest>,
    ) -> Result<Response<pb::StartResponse>, Status> {
        let r = req.into_inner();
        self.inner.start(&r.pool, &r.name).await.map_err(status)?;
        Ok(Response::new(pb::StartResponse {}))
    }

    async fn stop(
        &self,
        req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        let r = req.into_inner();
        self.inner.stop(&r.pool, &r.name).await.map_err(status)?;
        Ok(Response::new(pb::StopResponse {}))
    }

    async fn remove_all(
        &self,
        req: Request<pb::RemoveAllRequest>,
    ) -> Result<Response<pb::RemoveAllResponse>, Status> {
        let r = req.into_inner();
        let removed = self.inner.remove_all(&r.pool).await.map_err(status)?;
        Ok(Response::new(pb::RemoveAllResponse { removed }))
    }
}

/// Serves `provisioner` on the connections of `incoming` (a TCP or unix
/// listener stream) until `shutdown` completes; calls in flight then finish.
/// `version` is the plugin's own version, reported in the handshake.
pub async fn serve<I, IO, IE, F>(
    provisioner: Arc<dyn Provisioner>,
    version: &str,
    incoming: I,
    shutdown: F,
) -> Result<(), ServeError>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()>,
{
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(grs_proto::PROVISIONER_FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = Service {
        inner: provisioner,
        version: version.to_owned(),
    };
    tonic::transport::Server::builder()
        .add_service(ProvisionerServer::new(service))
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
