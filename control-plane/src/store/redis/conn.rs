//! Connections: one multiplexed connection (auto-reconnecting) for every
//! non-blocking command, and a pool of connections for blocking reads
//! (`XREADGROUP BLOCK`, `XREAD BLOCK`), which would stall the shared one.
//!
//! # Where the primary is
//! Either `redis.url` names it ([`Link`] `Direct`), or Redis Sentinel does
//! (`[redis.sentinel]`): the sentinels are asked for the primary of
//! `master_name` (the redis crate's `SentinelClient`, which also checks that
//! the node it names says it is a primary), and asked again at most every
//! [`RECHECK`] while the store is in use. When they name another node (a
//! failover), the shared connection is replaced and the pooled blocking
//! connections are dropped, so within about [`RECHECK`] plus Sentinel's own
//! failover time every command goes to the new primary. Commands sent to the
//! old one in between fail with UNAVAILABLE; callers retry.
//!
//! # What an accepted write survives
//! By default a write is answered once the primary has it. Redis replicates
//! asynchronously, so a failover can lose the last writes the old primary
//! acknowledged. With `redis.wait_replicas = N`, every write is followed by
//! `WAIT N wait_timeout` on the same connection, and answered UNAVAILABLE
//! unless N replicas have it: an accepted event is then on at least N+1
//! nodes, and survives the loss of the primary as long as Sentinel promotes
//! a replica that has it (with one replica, always; with several, Sentinel
//! prefers the most up-to-date replica, but a replica cut off from the
//! others is not excluded: see docs/operations.md). `WAIT` does not make a
//! write durable on disk: that is `appendonly`/`appendfsync`.
//!
//! Passwords (the data nodes' and the sentinels') are held by the redis
//! crate's connection info, never printed: [`Link`]'s `Debug` shows the
//! master name and addresses only.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo};
use tokio::sync::OnceCell;

use super::{InvalidRedisUrl, RedisStore, RedisStoreOptions};
use crate::config::RedisConfig;
use crate::store::{StoreError, StoreResult};
use grs_config::ConfigError;

/// How often, at most, the sentinels are asked which node is the primary
/// while the store is in use.
pub const RECHECK: Duration = Duration::from_millis(500);

/// How long one question to the sentinels may take before the store keeps
/// the primary it knows (or, knowing none, answers UNAVAILABLE).
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable {
        message: e.to_string(),
        source: Some(Box::new(e)),
    }
}

/// How the store reaches its primary, and what it waits for after a write.
pub(super) struct Link {
    target: Target,
    /// `redis.wait_replicas` and `redis.wait_timeout`; `None`: no `WAIT`.
    wait: Option<(u32, Duration)>,
}

// One per store, made once: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Target {
    /// `redis.url`.
    Direct {
        client: Client,
        /// Connected on first use, so the control plane starts (and reports
        /// NOT_SERVING) while Redis is down.
        conn: OnceCell<ConnectionManager>,
    },
    /// `[redis.sentinel]`.
    Sentinel(SentinelLink),
}

struct SentinelLink {
    master_name: String,
    addresses: Vec<String>,
    /// Asks the sentinels; one question at a time (it caches its
    /// connections to them), which also makes concurrent callers share one
    /// refresh.
    resolver: tokio::sync::Mutex<SentinelClient>,
    /// The primary last named, and when that was checked.
    current: RwLock<Option<Primary>>,
}

#[derive(Clone)]
struct Primary {
    client: Client,
    conn: ConnectionManager,
    checked: Instant,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Direct { .. } => f.write_str("Link::Direct"),
            Target::Sentinel(s) => f
                .debug_struct("Link::Sentinel")
                .field("master_name", &s.master_name)
                .field("addresses", &s.addresses)
                .finish_non_exhaustive(),
        }
    }
}

impl Link {
    /// The Redis at `url`, nothing waited for after writes.
    pub(super) fn direct(url: &str) -> Result<Self, InvalidRedisUrl> {
        let client = Client::open(url).map_err(|source| InvalidRedisUrl { source })?;
        Ok(Self::direct_client(client))
    }

    fn direct_client(client: Client) -> Self {
        Self {
            target: Target::Direct {
                client,
                conn: OnceCell::new(),
            },
            wait: None,
        }
    }

    /// From `[redis]`, secrets already resolved by [`RedisConfig::validate_connection`].
    fn from_config(c: &RedisConfig) -> Result<Self, ConfigError> {
        use secrecy::ExposeSecret;
        let info = c
            .url
            .as_str()
            .into_connection_info()
            // The crate's message does not repeat the URL (it may hold a
            // password).
            .map_err(|e| ConfigError::key("redis.url", format!("invalid Redis URL: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(p) = &c.password {
            settings = settings.set_password(p.expose_secret());
        }
        let wait = (c.wait_replicas > 0).then_some((c.wait_replicas, c.wait_timeout));
        if !c.sentinel.enabled() {
            let client = Client::open(info.set_redis_settings(settings))
                .map_err(|e| ConfigError::key("redis.url", e.to_string()))?;
            return Ok(Self {
                wait,
                ..Self::direct_client(client)
            });
        }
        let s = &c.sentinel;
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        if tls {
            return Err(ConfigError::key(
                "redis.url",
                "rediss:// (TLS) with [redis.sentinel] is not supported yet: use redis://",
            ));
        }
        let mut sentinels = Vec::new();
        for (i, a) in s.addresses.iter().enumerate() {
            let (host, port) = parse_host_port(a)
                .map_err(|m| ConfigError::key(format!("redis.sentinel.addresses[{i}]"), m))?;
            sentinels.push(ConnectionAddr::Tcp(host, port));
        }
        let mut b =
            SentinelClientBuilder::new(sentinels, &s.master_name, SentinelServerType::Master)
                .map_err(|e| ConfigError::key("redis.sentinel", e.to_string()))?
                .set_client_to_redis_db(settings.db());
        if let Some(u) = settings.username() {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = settings.password() {
            b = b.set_client_to_redis_password(p);
        }
        if let Some(p) = &s.password {
            b = b.set_client_to_sentinel_password(p.expose_secret());
        }
        let resolver = b
            .build()
            .map_err(|e| ConfigError::key("redis.sentinel", e.to_string()))?;
        Ok(Self {
            target: Target::Sentinel(SentinelLink {
                master_name: s.master_name.clone(),
                addresses: s.addresses.clone(),
                resolver: tokio::sync::Mutex::new(resolver),
                current: RwLock::new(None),
            }),
            wait,
        })
    }
}

/// `host:port`, the host a name, an IPv4 address or a bracketed IPv6 one.
fn parse_host_port(a: &str) -> Result<(String, u16), String> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("{a:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{a:?}: {port:?} is not a port number"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("{a:?} is not host:port"));
    }
    Ok((host.to_owned(), port))
}

impl RedisConfig {
    /// Resolves the passwords from their files and checks the connection
    /// settings (`url`, `[redis.sentinel]`, `wait_*`); errors name the key.
    pub fn validate_connection(&mut self) -> Result<(), ConfigError> {
        self.password = grs_config::secret(
            "redis.password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        let s = &mut self.sentinel;
        s.password = grs_config::secret(
            "redis.sentinel.password",
            s.password.as_ref(),
            s.password_file.as_deref(),
        )?;
        if s.enabled() && s.addresses.is_empty() {
            return Err(ConfigError::key(
                "redis.sentinel.addresses",
                "master_name is set: list the sentinels (host:port each)",
            ));
        }
        if !s.enabled()
            && (!s.addresses.is_empty() || s.password.is_some() || s.password_file.is_some())
        {
            return Err(ConfigError::key(
                "redis.sentinel.master_name",
                "[redis.sentinel] needs the name the sentinels monitor the primary under",
            ));
        }
        if self.wait_replicas > 0 && self.wait_timeout.is_zero() {
            return Err(ConfigError::key(
                "redis.wait_timeout",
                "must be more than 0s when wait_replicas is set (0 would wait for ever)",
            ));
        }
        Link::from_config(self).map(drop)
    }
}

impl RedisStore {
    /// A store on the Redis `[redis]` describes (`url`, or `[redis.sentinel]`;
    /// passwords; `wait_replicas`), secrets already resolved by
    /// [`RedisConfig::validate_connection`]. Connects on first use.
    pub fn from_config(c: &RedisConfig, opts: RedisStoreOptions) -> Result<Self, ConfigError> {
        Ok(Self::with_link(Link::from_config(c)?, opts))
    }

    pub(super) async fn conn(&self) -> StoreResult<ConnectionManager> {
        match &self.link.target {
            Target::Direct { client, conn } => conn
                .get_or_try_init(|| connection_manager(client, self.opts.response_timeout))
                .await
                .cloned()
                .map_err(unavailable),
            Target::Sentinel(s) => Ok(self.primary(s).await?.conn),
        }
    }

    /// The primary the sentinels name, asked again when the last answer is
    /// older than [`RECHECK`].
    async fn primary(&self, s: &SentinelLink) -> StoreResult<Primary> {
        let fresh = |p: &Option<Primary>| {
            p.as_ref()
                .filter(|p| p.checked.elapsed() < RECHECK)
                .cloned()
        };
        if let Some(p) = fresh(&s.current.read().unwrap()) {
            return Ok(p);
        }
        // Held until `current` is updated, so concurrent callers share one
        // question to the sentinels and one new connection.
        let mut resolver = s.resolver.lock().await;
        // Another caller may have refreshed while this one waited.
        if let Some(p) = fresh(&s.current.read().unwrap()) {
            return Ok(p);
        }
        let known = s.current.read().unwrap().clone();
        let named = tokio::time::timeout(SENTINEL_TIMEOUT, resolver.async_get_client()).await;
        let client = match (named, known) {
            (Ok(Ok(c)), _) => c,
            // The sentinels name no usable primary (a failover under way) or
            // do not answer: keep the primary known (its commands fail by
            // themselves if it is gone).
            (Ok(Err(e)), Some(p)) => {
                tracing::warn!(master = %s.master_name, error = %e, "Redis Sentinel names no usable primary yet; keeping the one known");
                return Ok(self.mark_checked(s, p));
            }
            (Err(_), Some(p)) => {
                tracing::warn!(master = %s.master_name, "Redis Sentinel: no answer within {SENTINEL_TIMEOUT:?}; keeping the primary known");
                return Ok(self.mark_checked(s, p));
            }
            (Ok(Err(e)), None) => {
                return Err(StoreError::Unavailable {
                    message: format!(
                        "Redis Sentinel ({}) names no primary for {:?}: {e}",
                        s.addresses.join(", "),
                        s.master_name
                    ),
                    source: Some(Box::new(e)),
                });
            }
            (Err(_), None) => {
                return Err(StoreError::unavailable(format!(
                    "Redis Sentinel ({}) did not answer within {SENTINEL_TIMEOUT:?}",
                    s.addresses.join(", ")
                )));
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        let same = s
            .current
            .read()
            .unwrap()
            .as_ref()
            .filter(|p| p.client.get_connection_info().addr().to_string() == addr)
            .cloned();
        if let Some(p) = same {
            return Ok(self.mark_checked(s, p));
        }
        let conn = connection_manager(&client, self.opts.response_timeout)
            .await
            .map_err(unavailable)?;
        let p = Primary {
            client,
            conn,
            checked: Instant::now(),
        };
        let old = s.current.write().unwrap().replace(p.clone());
        if let Some(old) = old {
            tracing::warn!(
                master = %s.master_name,
                from = %old.client.get_connection_info().addr(),
                to = %addr,
                "Redis Sentinel named a new primary; reconnected"
            );
        } else {
            tracing::info!(master = %s.master_name, primary = %addr, "Redis Sentinel: connected to the primary");
        }
        // Blocking connections to the old primary would read a stale queue.
        self.blocking.lock().unwrap().clear();
        Ok(p)
    }

    fn mark_checked(&self, s: &SentinelLink, mut p: Primary) -> Primary {
        p.checked = Instant::now();
        let mut cur = s.current.write().unwrap();
        if let Some(c) = cur.as_mut() {
            c.checked = p.checked;
        }
        p
    }

    /// After a write on `conn`: `WAIT` for `redis.wait_replicas` replicas
    /// (nothing when it is 0). UNAVAILABLE when fewer acknowledged in time:
    /// the write may or may not survive a failover, so the caller must not
    /// be told it was accepted.
    pub(super) async fn replicated(&self, conn: &mut ConnectionManager) -> StoreResult<()> {
        let Some((n, timeout)) = self.link.wait else {
            return Ok(());
        };
        let acked: i64 = redis::cmd("WAIT")
            .arg(n)
            .arg(
                u64::try_from(timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .query_async(conn)
            .await
            .map_err(unavailable)?;
        if acked < i64::from(n) {
            return Err(StoreError::unavailable(format!(
                "the write reached {acked} of the {n} replicas redis.wait_replicas asks for within {timeout:?}"
            )));
        }
        Ok(())
    }

    pub(super) async fn blocking_conn(
        &self,
        block: Duration,
    ) -> StoreResult<MultiplexedConnection> {
        let pooled = self.blocking.lock().unwrap().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let client = match &self.link.target {
                    Target::Direct { client, .. } => client.clone(),
                    Target::Sentinel(s) => self.primary(s).await?.client,
                };
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)));
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(unavailable)?
            }
        };
        conn.set_response_timeout(block + self.opts.response_timeout);
        Ok(conn)
    }

    pub(super) fn give_back(&self, conn: MultiplexedConnection) {
        let mut pool = self.blocking.lock().unwrap();
        if pool.len() < 64 {
            pool.push(conn);
        }
    }

    /// A hash's fields (empty when the key does not exist).
    pub(super) async fn hgetall(&self, key: &str) -> StoreResult<HashMap<String, String>> {
        let mut conn = self.conn().await?;
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }
}

async fn connection_manager(
    client: &Client,
    response_timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    client.get_connection_manager_with_config(cfg).await
}
