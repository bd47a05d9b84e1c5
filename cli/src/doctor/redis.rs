//! Redis: reachable, and persistent (`appendonly yes`), since every
//! accepted job lives only there until it is done. Asked through the
//! control plane's own store connection (password, `[redis.sentinel]`).

use std::time::Duration;

use grs_control_plane::config::{Config, StoreKind};
use grs_control_plane::store::{RedisStore, RedisStoreOptions, Store};

use super::{Check, bounded};

const REACHABLE: &str = "Redis reachable";
const PERSISTENT: &str = "Redis persistence";

pub(super) async fn checks(config: &Config, timeout: Duration) -> Vec<Check> {
    if config.control_plane.store == StoreKind::Memory {
        return vec![Check::warn(
            "Redis",
            "control_plane.store = \"memory\": jobs, instances and queues live in the control plane's memory and are lost when it stops",
            "set control_plane.store = \"redis\" for production",
        )];
    }
    let r = &config.redis;
    let target = if r.sentinel.enabled() {
        format!(
            "primary {:?} of the sentinels {}",
            r.sentinel.master_name,
            r.sentinel.addresses.join(", ")
        )
    } else {
        redacted(&r.url)
    };
    let opts = RedisStoreOptions {
        prefix: r.key_prefix.clone(),
        response_timeout: timeout,
        ..RedisStoreOptions::default()
    };
    // Validated with the configuration already: cannot fail here.
    let store = match RedisStore::from_config(r, opts) {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                REACHABLE,
                e.to_string(),
                "correct the key named above",
            )];
        }
    };
    if let Err(e) = bounded(timeout, "PING", store.ping()).await {
        return vec![
            Check::fail(
                REACHABLE,
                format!("{target}: {e}"),
                "start Redis, or correct redis.url (GRS_REDIS_URL), redis.password (GRS_REDIS_PASSWORD) or [redis.sentinel]",
            ),
            Check::skip(PERSISTENT, "Redis is not reachable"),
        ];
    }
    let mut out = vec![Check::pass(REACHABLE, format!("{target} answered PING"))];
    let appendonly = bounded(
        timeout,
        "CONFIG GET appendonly",
        store.config_get("appendonly"),
    )
    .await;
    out.push(match appendonly {
        Ok(Some(a)) if a == "yes" => Check::pass(PERSISTENT, "appendonly yes (AOF)"),
        Ok(a) => {
            let a = a.unwrap_or_else(|| "unknown".into());
            let save = bounded(timeout, "CONFIG GET save", store.config_get("save")).await;
            let snapshots = match save {
                Ok(Some(s)) if !s.trim().is_empty() => format!(
                    "; RDB snapshots only (save {s}): jobs accepted since the last snapshot are lost when Redis restarts"
                ),
                _ => "; no RDB snapshots either: every accepted job is lost when Redis restarts"
                    .into(),
            };
            Check::fail(
                PERSISTENT,
                format!("WARNING: persistence is off: appendonly is {a:?}{snapshots}"),
                "set `appendonly yes` in redis.conf, or now: redis-cli CONFIG SET appendonly yes && redis-cli CONFIG REWRITE",
            )
        }
        Err(e) => Check::warn(
            PERSISTENT,
            format!("cannot read appendonly ({e}); managed Redis services often disable CONFIG"),
            "make sure the service persists with AOF (appendonly yes): GRS keeps accepted jobs only in Redis",
        ),
    });
    out
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redis_password_never_shows() {
        assert_eq!(
            super::redacted("redis://:s3cret@cache:6379/2"),
            "redis://:***@cache:6379/2"
        );
        assert_eq!(super::redacted("redis://cache:6379"), "redis://cache:6379");
    }
}
