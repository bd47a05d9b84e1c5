//! [`GrpcProvisioner`]: the [`Provisioner`] trait over the wire.
//!
//! # Guarantees
//! - **Deadlines.** Every call has one (`call_timeout`; `create_timeout` for
//!   `create`, `delete` and `remove_all`, which wait for the hypervisor),
//!   sent to the plugin as `grpc-timeout` and enforced here as well.
//! - **Retries.** `UNAVAILABLE` and `ABORTED` (plugin restarting, connection
//!   refused, a transient backend error) are retried with exponential backoff
//!   up to `attempts` times; every verb is idempotent by contract, so a retry
//!   is safe. Other errors are mapped to the trait's kinds
//!   ([`crate::convert`]) and returned.
//! - **Handshake first.** The first call on a client runs `Handshake` and
//!   refuses a plugin of another protocol version with a
//!   [`ProvisionerError::Config`] naming both versions and the endpoint.
//! - **Pools survive plugin restarts.** Documents given to
//!   [`configure_pool`](Provisioner::configure_pool) are kept; when the
//!   plugin answers `NOT_FOUND` (it forgot the pool), the document is sent
//!   again with `ValidatePool` and the call repeated once.
//! - **Cancellation.** Dropping a call's future cancels the RPC; the plugin
//!   sees the cancellation (the trait's cancellation rules then apply on its
//!   side).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use grs_proto::provisioner::v1 as pb;
use grs_proto::provisioner::v1::provisioner_client::ProvisionerClient;
use grs_provisioner::{
    BootstrapKind, Capabilities, Instance, InstanceSpec, PoolDocument, Provisioner,
    ProvisionerError,
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Response, Status};

use crate::PROTOCOL_VERSION;
use crate::convert::{bootstrap_kind_from_pb, instance_from_pb, spec_to_pb, status_to_error};

/// Where a plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `http://host:port` (plaintext HTTP/2) or `https://...`.
    Uri(String),
    /// A unix socket.
    Unix(PathBuf),
}

impl Address {
    /// Parses `unix:/path`, `unix:///path`, `http://host:port` or
    /// `https://host:port`.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() || !path.starts_with('/') {
                return Err(AddressError(format!(
                    "{s:?}: a unix socket address is unix:/absolute/path"
                )));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if (s.starts_with("http://") || s.starts_with("https://")) && s.parse::<Uri>().is_ok() {
            return Ok(Self::Uri(s.to_owned()));
        }
        Err(AddressError(format!(
            "{s:?} is not an endpoint: use http://HOST:PORT, https://HOST:PORT or unix:/PATH"
        )))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uri(u) => f.write_str(u),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An endpoint that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bad provisioner endpoint {0}")]
pub struct AddressError(String);

/// Where the client connects: a fixed address, or whatever address a
/// supervised plugin last announced (it may change when the plugin restarts).
#[derive(Debug, Clone)]
pub enum Target {
    /// A fixed address.
    Fixed(Address),
    /// The current address of a supervised plugin; `None` while it is down.
    Plugin(Arc<Mutex<Option<Address>>>),
}

/// Deadlines and retries of a [`GrpcProvisioner`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of every call but the long ones.
    pub call_timeout: Duration,
    /// Deadline of `create`, `delete` and `remove_all`.
    pub create_timeout: Duration,
    /// Tries per call for retryable codes (at least 1).
    pub attempts: u32,
    /// First retry delay; doubles up to `backoff_max`.
    pub backoff: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(30),
            create_timeout: Duration::from_secs(15 * 60),
            attempts: 4,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// What the plugin said in its handshake.
#[derive(Debug, Clone)]
struct Hello {
    backend: String,
    capabilities: Capabilities,
}

/// A provisioner in another process, reached over gRPC.
#[derive(Debug)]
pub struct GrpcProvisioner {
    describe: String,
    client: ProvisionerClient<Channel>,
    opts: ClientOptions,
    hello: tokio::sync::OnceCell<Hello>,
    docs: Mutex<HashMap<String, PoolDocument>>,
    /// Each pool's bootstrap kind, from the plugin's last `ValidatePool`
    /// answer for its current document.
    bootstraps: Mutex<HashMap<String, BootstrapKind>>,
}

fn fixed_endpoint() -> Endpoint {
    // The URI is a placeholder: the connector decides where to connect.
    Endpoint::from_static("http://plugin.invalid")
}

async fn connect(addr: Address) -> std::io::Result<ConnIo> {
    match addr {
        Address::Unix(path) => Ok(ConnIo::Unix(TokioIo::new(
            tokio::net::UnixStream::connect(path).await?,
        ))),
        Address::Uri(u) => {
            let uri: Uri = u
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(80);
            let s = tokio::net::TcpStream::connect((host, port)).await?;
            s.set_nodelay(true)?;
            Ok(ConnIo::Tcp(TokioIo::new(s)))
        }
    }
}

/// A connection to a plugin, unix or TCP.
enum ConnIo {
    Unix(TokioIo<tokio::net::UnixStream>),
    Tcp(TokioIo<tokio::net::TcpStream>),
}

impl hyper::rt::Read for ConnIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ConnIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl GrpcProvisioner {
    /// A client for `target`. Connects lazily (the plugin may not be up
    /// yet); must be called within a tokio runtime.
    pub fn new(target: Target, opts: ClientOptions) -> Self {
        let describe = match &target {
            Target::Fixed(a) => a.to_string(),
            Target::Plugin(cell) => match &*cell.lock().unwrap() {
                Some(a) => format!("plugin at {a}"),
                None => "plugin".to_owned(),
            },
        };
        let channel =
            match target {
                Target::Fixed(Address::Uri(u)) if u.starts_with("https://") => {
                    // TLS: tonic's own connector (system roots).
                    match Endpoint::from_shared(u.clone()).and_then(|e| {
                        e.tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
                    }) {
                        Ok(e) => e.connect_lazy(),
                        Err(_) => fixed_endpoint().connect_lazy(),
                    }
                }
                Target::Fixed(addr) => fixed_endpoint().connect_with_connector_lazy(
                    tower::service_fn(move |_: Uri| connect(addr.clone())),
                ),
                Target::Plugin(cell) => fixed_endpoint().connect_with_connector_lazy(
                    tower::service_fn(move |_: Uri| {
                        let addr = cell.lock().unwrap().clone();
                        async move {
                            match addr {
                                Some(a) => connect(a).await,
                                None => Err(std::io::Error::new(
                                    std::io::ErrorKind::NotConnected,
                                    "the plugin is not running",
                                )),
                            }
                        }
                    }),
                ),
            };
        Self {
            describe,
            client: ProvisionerClient::new(channel),
            opts,
            hello: tokio::sync::OnceCell::new(),
            docs: Mutex::new(HashMap::new()),
            bootstraps: Mutex::new(HashMap::new()),
        }
    }

    /// Runs the handshake (once per client) and returns what it said.
    async fn hello(&self) -> Result<&Hello, ProvisionerError> {
        self.hello
            .get_or_try_init(|| async {
                let req = pb::HandshakeRequest {
                    protocol_version: PROTOCOL_VERSION,
                    grs_version: env!("CARGO_PKG_VERSION").to_owned(),
                };
                let r = self
                    .retrying("handshake", "", self.opts.call_timeout, |mut c, t| {
                        let mut req = Request::new(req.clone());
                        req.set_timeout(t);
                        async move { c.handshake(req).await }
                    })
                    .await
                    .map_err(|s| self.error(&s, "", "handshake"))?;
                if r.protocol_version != PROTOCOL_VERSION {
                    return Err(ProvisionerError::Config(format!(
                        "the provisioner at {} speaks plugin protocol version {}; this GRS speaks version {PROTOCOL_VERSION}",
                        self.describe, r.protocol_version
                    )));
                }
                let hello = Hello {
                    backend: r.backend,
                    capabilities: Capabilities {
                        start_stop: r.capabilities.is_some_and(|c| c.start_stop),
                    },
                };
                tracing::info!(endpoint = %self.describe, backend = %hello.backend, version = %r.version, start_stop = hello.capabilities.start_stop, "provisioner plugin handshake done");
                Ok(hello)
            })
            .await
    }

    fn error(&self, s: &Status, name: &str, what: &str) -> ProvisionerError {
        status_to_error(s, name, &format!("{what} at {}", self.describe))
    }

    /// Calls `f` until it succeeds, fails with a code not worth retrying,
    /// or runs out of attempts. Each try gets `timeout`.
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        name: &str,
        timeout: Duration,
        f: F,
    ) -> Result<T, Status>
    where
        F: Fn(ProvisionerClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut delay = self.opts.backoff;
        let attempts = self.opts.attempts.max(1);
        for attempt in 1.. {
            let status = match tokio::time::timeout(timeout, f(self.client.clone(), timeout)).await
            {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => s,
                Err(_) => {
                    Status::deadline_exceeded(format!("no answer within {}", humanize(timeout)))
                }
            };
            let retry = matches!(status.code(), Code::Unavailable | Code::Aborted);
            if !retry || attempt >= attempts {
                return Err(status);
            }
            tracing::debug!(endpoint = %self.describe, call = what, instance = name, attempt, error = %status.message(), "retrying a provisioner call");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.opts.backoff_max);
        }
        unreachable!("the loop returns")
    }

    /// One call about `pool`: handshake first, retries, and one
    /// `ValidatePool` + repeat when the plugin forgot the pool.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        pool: &str,
        name: &str,
        timeout: Duration,
        f: F,
    ) -> Result<T, ProvisionerError>
    where
        F: Fn(ProvisionerClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.hello().await?;
        match self.retrying(what, name, timeout, &f).await {
            Err(s) if s.code() == Code::NotFound && self.doc(pool).is_some() => {
                tracing::info!(endpoint = %self.describe, pool, "the plugin does not know the pool (restarted?); sending its configuration again");
                self.send_pool(pool).await?;
                self.retrying(what, name, timeout, &f)
                    .await
                    .map_err(|s| self.error(&s, name, what))
            }
            other => other.map_err(|s| self.error(&s, name, what)),
        }
    }

    fn doc(&self, pool: &str) -> Option<PoolDocument> {
        self.docs.lock().unwrap().get(pool).cloned()
    }

    async fn send_pool(&self, pool: &str) -> Result<(), ProvisionerError> {
        let doc = self.doc(pool).ok_or_else(|| {
            ProvisionerError::UnknownPool(format!("pool {pool} has no configuration in GRS"))
        })?;
        let req = pb::ValidatePoolRequest {
            pool: pool.to_owned(),
            config_json: serde_json::Value::Object(doc).to_string(),
        };
        let answer = self
            .retrying("validate_pool", "", self.opts.call_timeout, |mut c, t| {
                let mut r = Request::new(req.clone());
                r.set_timeout(t);
                async move { c.validate_pool(r).await }
            })
            .await
            .map_err(|s| self.error(&s, "", &format!("validating pool {pool}")))?;
        self.bootstraps
            .lock()
            .unwrap()
            .insert(pool.to_owned(), bootstrap_kind_from_pb(answer.bootstrap));
        Ok(())
    }
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

macro_rules! req {
    ($msg:expr, $method:ident) => {{
        let msg = $msg;
        move |mut c: ProvisionerClient<Channel>, t: Duration| {
            let mut r = Request::new(msg.clone());
            r.set_timeout(t);
            async move { c.$method(r).await }
        }
    }};
}

#[async_trait]
impl Provisioner for GrpcProvisioner {
    /// The backend name from the handshake; `grpc` before it.
    fn kind(&self) -> &str {
        self.hello
            .get()
            .map(|h| h.backend.as_str())
            .unwrap_or("grpc")
    }

    /// From the handshake; nothing before it.
    fn capabilities(&self) -> Capabilities {
        self.hello.get().map(|h| h.capabilities).unwrap_or_default()
    }

    /// Keeps the document; the plugin checks it in
    /// [`validate_pool`](Provisioner::validate_pool).
    fn configure_pool(&self, pool: &str, config: &PoolDocument) -> Result<(), ProvisionerError> {
        self.docs
            .lock()
            .unwrap()
            .insert(pool.to_owned(), config.clone());
        // What the plugin said of the old document no longer holds.
        self.bootstraps.lock().unwrap().remove(pool);
        Ok(())
    }

    /// From the plugin's `ValidatePool` answer; `None` before one.
    fn pool_bootstrap(&self, pool: &str) -> Option<BootstrapKind> {
        self.bootstraps.lock().unwrap().get(pool).copied()
    }

    /// Handshake, then `ValidatePool` with the pool's document.
    async fn validate_pool(&self, pool: &str) -> Result<(), ProvisionerError> {
        self.hello().await?;
        self.send_pool(pool).await
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError> {
        let r = self
            .call(
                "create",
                &spec.pool,
                &spec.name,
                self.opts.create_timeout,
                req!(spec_to_pb(spec), create),
            )
            .await?;
        r.instance.map(instance_from_pb).ok_or_else(|| {
            ProvisionerError::Permanent(format!(
                "create at {} answered without an instance for {}",
                self.describe, spec.name
            ))
        })
    }

    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        let msg = pb::DeleteRequest {
            pool: pool.to_owned(),
            name: name.to_owned(),
        };
        self.call(
            "delete",
            pool,
            name,
            self.opts.create_timeout,
            req!(msg, delete),
        )
        .await?;
        Ok(())
    }

    async fn get(&self, pool: &str, name: &str) -> Result<Option<Instance>, ProvisionerError> {
        let msg = pb::GetRequest {
            pool: pool.to_owned(),
            name: name.to_owned(),
        };
        let r = self
            .call("get", pool, name, self.opts.call_timeout, req!(msg, get))
            .await?;
        Ok(r.instance.filter(|_| r.found).map(instance_from_pb))
    }

    async fn list(&self, pool: &str) -> Result<Vec<Instance>, ProvisionerError> {
        let msg = pb::ListRequest {
            pool: pool.to_owned(),
        };
        let r = self
            .call("list", pool, "", self.opts.call_timeout, req!(msg, list))
            .await?;
        Ok(r.instances.into_iter().map(instance_from_pb).collect())
    }

    async fn start(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        let msg = pb::StartRequest {
            pool: pool.to_owned(),
            name: name.to_owned(),
        };
        self.call(
            "start",
            pool,
            name,
            self.opts.create_timeout,
            req!(msg, start),
        )
        .await?;
        Ok(())
    }

    async fn stop(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        let msg = pb::StopRequest {
            pool: pool.to_owned(),
            name: name.to_owned(),
        };
        self.call(
            "stop",
            pool,
            name,
            self.opts.create_timeout,
            req!(msg, stop),
        )
        .await?;
        Ok(())
    }

    async fn remove_all(&self, pool: &str) -> Result<Vec<String>, ProvisionerError> {
        let msg = pb::RemoveAllRequest {
            pool: pool.to_owned(),
        };
        let r = self
            .call(
                "remove_all",
                pool,
                "",
                self.opts.create_timeout,
                req!(msg, remove_all),
            )
            .await?;
        Ok(r.removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_expected() {
        assert_eq!(
            Address::parse("unix:/run/grs/p.sock").unwrap(),
            Address::Unix("/run/grs/p.sock".into())
        );
        assert_eq!(
            Address::parse("unix:///run/grs/p.sock").unwrap(),
            Address::Unix("/run/grs/p.sock".into())
        );
        assert_eq!(
            Address::parse("http://127.0.0.1:7000").unwrap(),
            Address::Uri("http://127.0.0.1:7000".into())
        );
        for bad in ["127.0.0.1:7000", "unix:relative.sock", "ftp://x", ""] {
            let e = Address::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unix:") || e.contains("http://"), "{bad}: {e}");
        }
    }
}
