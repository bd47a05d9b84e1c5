//! Assembles a running control plane: the gRPC server (API, health,
//! reflection, auth, TLS), the dispatcher and teardown workers, the
//! reconciler, and the health watch on the store.
//!
//! [`run`] takes its listener and its shutdown signal as arguments (as
//! mini-redis does), so tests start a control plane on `127.0.0.1:0` and stop
//! it at will; the binary passes a real port and SIGTERM.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use grs_proto::v1::control_plane_server::ControlPlaneServer;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::pools::Pools;
use crate::reconciler::{self, Reconciler, ReconcilerSettings};
use crate::service::ControlPlaneService;
use crate::store::Store;
use crate::worker::{RunnerRegistrar, WorkerContext, WorkerSettings};
use crate::{dispatcher, teardown};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS files could not be read or used.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The reflection service could not be built (a bad descriptor set).
    #[error("reflection setup failed: {0}")]
    Reflection(String),
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The GitHub client cannot be built from `[github]`.
    #[error("[github]: {0}")]
    GitHub(String),
    /// The metrics port (`control_plane.metrics_listen`) cannot be served.
    #[error("cannot serve metrics on {addr} (control_plane.metrics_listen): {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The service name health reports on, besides the server-wide "".
pub const SERVICE_NAME: &str = "grs.v1.ControlPlane";

/// Everything [`run`] needs besides the listener and the shutdown signal.
#[derive(Debug)]
pub struct ControlPlane {
    /// Validated configuration.
    pub config: Config,
    /// The store (Redis or memory).
    pub store: Arc<dyn Store>,
    /// Pools with their backends.
    pub pools: Pools,
    /// GitHub runner registrations, when configured.
    pub registrar: Option<Arc<dyn RunnerRegistrar>>,
}

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
struct BearerAuth {
    token: Option<SecretString>,
}

impl BearerAuth {
    fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match got {
            Some(got) if bool::from(got.as_bytes().ct_eq(want.expose_secret().as_bytes())) => {
                Ok(req)
            }
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token (authorization: Bearer <token>)",
            )),
        }
    }
}

/// Serves until `shutdown` completes, then stops taking work, lets work in
/// flight finish within the grace period, and returns.
///
/// Health reports NOT_SERVING whenever the store does not answer, and during
/// shutdown.
pub async fn run(
    cp: ControlPlane,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let ControlPlane {
        config,
        store,
        pools,
        registrar,
    } = cp;
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }

    // Metrics, on their own port when configured.
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let metrics_task = match config.control_plane.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Metrics { addr, source })?;
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                store.clone(),
                pools.clone(),
                stop.clone().cancelled_owned(),
            )))
        }
        None => None,
    };

    // GitHub: the registrar's client (else one from `[github]`), counted
    // in the metrics; job-status checks and recovery spend one budget.
    let github_client = match (
        registrar.as_ref().and_then(|r| r.github_client()),
        &config.github,
    ) {
        (Some(c), _) => Some(c),
        (None, Some(gh)) => Some(
            grs_github::GitHubClient::new(gh).map_err(|e| ServerError::GitHub(e.to_string()))?,
        ),
        (None, None) => None,
    };
    let github = github_client.map(|client| {
        client.set_observer(metrics.clone());
        crate::github::GitHubJobs::new(
            client,
            Arc::new(crate::github::ApiBudget::new(
                config.control_plane.github_api_budget,
            )),
        )
    });

    // Per-node maximums hold across replicas: backends hold node places in
    // the store.
    let ledger = Arc::new(crate::pools::StoreNodeLedger::new(store.clone()));
    for (backend, _) in pools.backends() {
        backend.use_node_ledger(ledger.clone());
    }

    // Workers.
    let replica = format!("{:08x}", rand::random::<u32>());
    let ctx = WorkerContext {
        store: store.clone(),
        pools: pools.clone(),
        settings: WorkerSettings::from_config(&config.control_plane),
        registrar: registrar.clone(),
        shutdown: stop.child_token(),
        metrics: metrics.clone(),
        github: github.clone(),
    };
    let mut workers = JoinSet::new();
    for pool in pools.iter() {
        for i in 0..dispatcher::workers_for(config.control_plane.dispatchers_per_pool, pool) {
            let consumer = format!("{replica}-dispatcher-{}-{i}", pool.name);
            workers.spawn(dispatcher::run(ctx.clone(), pool.name.clone(), consumer));
        }
    }
    // Every replica keeps every pool's warm pool; the store keeps them
    // from overshooting it together.
    for pool in pools.iter() {
        workers.spawn(crate::warm::run(ctx.clone(), pool.name.clone()));
    }
    for i in 0..config.control_plane.teardown_workers {
        workers.spawn(teardown::run(
            ctx.clone(),
            format!("{replica}-teardown-{i}"),
        ));
    }

    // Every replica runs a reconciler; the store's lease lets one work at a
    // time.
    workers.spawn(reconciler::run(
        Reconciler::new(
            store.clone(),
            pools.clone(),
            ReconcilerSettings::from_config(&config.control_plane),
        )
        .with_registrar(ctx.registrar.clone())
        .with_metrics(metrics.clone())
        .with_recovery(
            crate::recovery::Recovery::new(
                store.clone(),
                pools.clone(),
                github,
                crate::recovery::RecoverySettings::from_config(&config.control_plane),
            )
            .with_metrics(metrics.clone()),
        ),
        replica.clone(),
        ctx.shutdown.clone(),
    ));

    // Health follows the store.
    let (reporter, health) = tonic_health::server::health_reporter();
    let health_task = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), store.ping()).await,
                    Ok(Ok(()))
                );
                let status = if ok && !stop.is_cancelled() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                if last != Some(status) {
                    if last.is_some() || !ok {
                        tracing::warn!(status = ?status, store_answers = ok, "health changed");
                    }
                    reporter.set_service_status("", status).await;
                    reporter.set_service_status(SERVICE_NAME, status).await;
                    last = Some(status);
                }
                if stop.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    };

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grs_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    // grpcurl 1.8 speaks only v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let auth = BearerAuth {
        token: config.control_plane.auth_token.clone(),
    };
    let api = ControlPlaneServer::with_interceptor(
        ControlPlaneService::new(store.clone(), pools.clone(), registrar, stop.clone())
            .with_event_scope(
                crate::github::EventScope::from_config(config.github.as_ref()),
                metrics.clone(),
            ),
        move |req| auth.check(req),
    );

    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (
        &config.control_plane.tls_cert_file,
        &config.control_plane.tls_key_file,
    ) {
        let cert = std::fs::read(cert)
            .map_err(|e| ServerError::Tls(format!("cannot read {}: {e}", cert.display())))?;
        let key = std::fs::read(key)
            .map_err(|e| ServerError::Tls(format!("cannot read {}: {e}", key.display())))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        tls = config.control_plane.tls_cert_file.is_some(),
        auth = config.control_plane.auth_token.is_some(),
        pools = pools.iter().count(),
        "control plane serving"
    );
    // No Nagle: answers are small, and Nagle with delayed ACKs stalls some
    // of them by ~40 ms (seen as the gateway's p99.9 in its benchmark).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
            })
        },
    );
    let served = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned())
        .await;

    // Drain: workers stop taking entries at once; work in flight gets the
    // grace period, then is dropped (its entries are redone elsewhere).
    stop.cancel();
    let grace = config.control_plane.shutdown_grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "draining workers");
    let drained = tokio::time::timeout(grace, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = workers.len(),
            "grace period over; abandoning work in flight (it will be redone)"
        );
        workers.abort_all();
    }
    let _ = health_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    tracing::info!("control plane stopped");
    served.map_err(ServerError::from)
}
