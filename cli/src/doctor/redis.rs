//! Redis: reachable, and persistent (`appendonly yes`), since every
//! accepted job lives only there until it is done.

use std::time::Duration;

use grs_control_plane::config::{Config, StoreKind};

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
    let url = redacted(&config.redis.url);
    let conn = bounded(timeout, "connecting", async {
        let client = redis::Client::open(config.redis.url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| conn)
    })
    .await;
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            return vec![
                Check::fail(
                    REACHABLE,
                    format!("{url}: {e}"),
                    "start Redis, or correct redis.url (GRS_REDIS_URL); a password goes in the URL (redis://:PASSWORD@HOST:PORT)",
                ),
                Check::skip(PERSISTENT, "Redis is not reachable"),
            ];
        }
    };
    let mut out = vec![Check::pass(REACHABLE, format!("{url} answered PING"))];
    let get = |key: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(key)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .map(|kv| kv.get(1).cloned().unwrap_or_default())
        }
    };
    let appendonly = bounded(timeout, "CONFIG GET appendonly", get("appendonly")).await;
    let save = bounded(timeout, "CONFIG GET save", get("save")).await;
    out.push(match (appendonly, save) {
        (Ok(a), _) if a == "yes" => Check::pass(PERSISTENT, "appendonly yes (AOF)"),
        (Ok(a), save) => {
            let snapshots = match save {
                Ok(s) if !s.trim().is_empty() => format!(
                    "; RDB snapshots only (save {s}): jobs accepted since the last snapshot are lost when Redis restarts"
                ),
                _ => "; no RDB snapshots either: every accepted job is lost when Redis restarts".into(),
            };
            Check::fail(
                PERSISTENT,
                format!("WARNING: persistence is off: appendonly is {a:?}{snapshots}"),
                "set `appendonly yes` in redis.conf, or now: redis-cli CONFIG SET appendonly yes && redis-cli CONFIG REWRITE",
            )
        }
        (Err(e), _) => Check::warn(
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
