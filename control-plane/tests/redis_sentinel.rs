//! The control plane on a Redis managed by real Redis Sentinel processes:
//! a primary, two replicas and three sentinels, each a `redis-server` on a
//! free loopback port of its own (this test kills one; the shared Redis is
//! never touched). The primary is killed with SIGKILL while clients submit
//! job events over gRPC; every `SubmitJobEvent` that returned OK must be in
//! the store afterwards (read through the control plane, from the replica
//! Sentinel promoted), and events submitted after the failover must be
//! accepted again without restarting anything.
//!
//! Its positive control, `without_wait_replicas_...`, replicates through a
//! proxy it holds back: with `wait_replicas = 0` an event accepted by the
//! primary alone is lost when it dies, and the same read-back finds it
//! missing.
//!
//! Why two replicas: the control plane runs with `redis.wait_replicas = 1`
//! (an event is accepted only once a replica has it, see
//! `control-plane/src/store/redis/conn.rs`); after the primary is lost, the
//! new primary still needs one replica to accept writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grs_control_plane::config::Config;
use grs_control_plane::config::{RedisConfig, RedisSentinelConfig};
use grs_control_plane::store::{RedisStore, RedisStoreOptions, Store};
use grs_control_plane::testing::{
    RunningControlPlane, control_plane, eventually, fake_pools, job_event, redis_store, redis_url,
    test_config,
};
use grs_proto::v1 as pb;
use grs_provisioner::FakeProvisioner;

const MASTER: &str = "grs-test-primary";

/// A `redis-server` this test started; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    name: &'static str,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port no one listens on now. Redis cannot be told to bind
/// port 0 (it means "no TCP"), so the port is picked here, then handed over.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn start(dir: &Path, name: &'static str, args: Vec<String>) -> Server {
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args(&args)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--dir", dir.to_str().unwrap()])
        .args(["--logfile", &format!("{name}.log")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd
        .spawn()
        .expect("redis-server must be installed (scripts/test.sh installs it)");
    let server = Server { child, port, name };
    eventually(
        &format!("{name} to answer on port {port}"),
        Duration::from_secs(10),
        || async move { redis_cli(port, &["PING"]).filter(|r| r.contains("PONG")) },
    )
    .await;
    server
}

async fn data_node(dir: &Path, name: &'static str, primary: Option<u16>) -> Server {
    let mut args: Vec<String> = ["--save", "", "--appendonly", "no"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(p) = primary {
        args.extend(["--replicaof".into(), "127.0.0.1".into(), p.to_string()]);
    }
    start(dir, name, args).await
}

async fn sentinel(dir: &Path, name: &'static str, primary: u16) -> Server {
    // Sentinel rewrites its file: one per sentinel.
    let conf: PathBuf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 10000\n\
             sentinel parallel-syncs {MASTER} 1\n"
        ),
    )
    .unwrap();
    start(
        dir,
        name,
        vec![conf.to_str().unwrap().to_owned(), "--sentinel".into()],
    )
    .await
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// `SENTINEL MASTER` as field/value pairs.
fn sentinel_view(port: u16, field: &str) -> Option<String> {
    let out = redis_cli(port, &["SENTINEL", "MASTER", MASTER])?;
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .find(|kv| kv[0] == field)
        .and_then(|kv| kv.get(1).map(|v| v.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_mid_load_loses_no_accepted_event() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            panic!("redis-server is not installed: CI is set, so this test fails");
        }
        eprintln!("SKIPPED: redis-server is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Some(data_node(dir.path(), "primary", None).await);
    let p = primary.as_ref().unwrap().port;
    let replicas = [
        data_node(dir.path(), "replica-1", Some(p)).await,
        data_node(dir.path(), "replica-2", Some(p)).await,
    ];
    for r in &replicas {
        let port = r.port;
        eventually(
            &format!("{} in sync with the primary", r.name),
            Duration::from_secs(15),
            || async move {
                let info = redis_cli(port, &["INFO", "replication"])?;
                (info_field(&info, "master_link_status")? == "up").then_some(())
            },
        )
        .await;
    }
    let sentinels = [
        sentinel(dir.path(), "sentinel-1", p).await,
        sentinel(dir.path(), "sentinel-2", p).await,
        sentinel(dir.path(), "sentinel-3", p).await,
    ];
    for s in &sentinels {
        let port = s.port;
        eventually(
            &format!("{} to see both replicas and the other sentinels", s.name),
            Duration::from_secs(30),
            || async move {
                let ok = sentinel_view(port, "num-slaves")? == "2"
                    && sentinel_view(port, "num-other-sentinels")? == "2";
                ok.then_some(())
            },
        )
        .await;
    }

    // The control plane, its store found through the sentinels. The pool is
    // paused: accepted jobs stay queued, nothing else writes.
    let mut config = test_config();
    config.pools.get_mut("linux").unwrap().paused = true;
    let redis = RedisConfig {
        // Host and port unused with Sentinel; the database number is.
        url: "redis://ignored-with-sentinel:1/0".into(),
        key_prefix: "grs-sentinel-test".into(),
        wait_replicas: 1,
        wait_timeout: Duration::from_secs(1),
        sentinel: RedisSentinelConfig {
            master_name: MASTER.into(),
            addresses: sentinels
                .iter()
                .map(|s| format!("127.0.0.1:{}", s.port))
                .collect(),
            ..Default::default()
        },
        ..RedisConfig::default()
    };
    let store = RedisStore::from_config(
        &redis,
        RedisStoreOptions {
            prefix: redis.key_prefix.clone(),
            response_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .unwrap();
    store.ping().await.expect("the primary the sentinels name");
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    let cp = RunningControlPlane::start(control_plane(config, Arc::new(store), pools)).await;
    let client = cp.client().await;

    // Eight clients submit queued events for distinct jobs until told to
    // stop; each remembers the jobs whose SubmitJobEvent returned OK.
    let accepted = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    let failed = Arc::new(Mutex::new(0u64));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let (mut client, accepted, failed, stop) = (
            client.clone(),
            accepted.clone(),
            failed.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let job = 7_000_000_000 + worker * 1_000_000 + n;
                let ev = job_event(&format!("d-{job}"), pb::JobAction::Queued, job);
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.submit_job_event(pb::SubmitJobEventRequest { event: Some(ev) }),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {
                        accepted.lock().unwrap().insert(job);
                    }
                    _ => {
                        *failed.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }

    let count = |a: &Arc<Mutex<BTreeSet<u64>>>| a.lock().unwrap().len();
    eventually(
        "300 events accepted before the kill",
        Duration::from_secs(30),
        || {
            let n = count(&accepted);
            async move { (n >= 300).then_some(()) }
        },
    )
    .await;
    let before_kill = count(&accepted);
    drop(primary.take()); // SIGKILL: no shutdown, no last replication.
    let sentinel_port = sentinels[0].port;
    let new_primary = eventually(
        "the sentinels to promote a replica",
        Duration::from_secs(60),
        || async move {
            let out = redis_cli(
                sentinel_port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER],
            )?;
            let port: u16 = out.lines().nth(1)?.trim().parse().ok()?;
            (port != p).then_some(port)
        },
    )
    .await;
    assert!(
        replicas.iter().any(|r| r.port == new_primary),
        "the new primary {new_primary} is one of the replicas"
    );
    // Writes go through again, on the new primary, with nothing restarted.
    let at_failover = count(&accepted);
    eventually(
        "200 more events accepted after the failover",
        Duration::from_secs(60),
        || {
            let n = count(&accepted);
            async move { (n >= at_failover + 200).then_some(()) }
        },
    )
    .await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }

    // The guarantee was in force: the new primary ran WAIT after writes.
    let stats = redis_cli(new_primary, &["INFO", "commandstats"]).unwrap_or_default();
    assert!(
        stats.contains("cmdstat_wait:calls="),
        "no WAIT ran on the new primary: {stats}"
    );

    let accepted: Vec<u64> = accepted.lock().unwrap().iter().copied().collect();
    let failed = *failed.lock().unwrap();
    let mut missing = Vec::new();
    let mut unavailable_reads = 0;
    let mut c = client.clone();
    for &job_id in &accepted {
        // A read the store answers `Unavailable` says nothing about the
        // event; it is asked again (CI saw 3 of 524 reads time out some
        // seconds after a failover). Not found, or found in another
        // state, is a lost event at once.
        let mut tries = 0;
        let got = loop {
            let r = c.get_job(pb::GetJobRequest { job_id }).await;
            match r {
                Err(e) if e.code() == tonic::Code::Unavailable && tries < 10 => {
                    tries += 1;
                    unavailable_reads += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other,
            }
        };
        match got {
            Ok(j) if j.get_ref().state() == pb::JobState::Queued => {}
            other => missing.push((job_id, format!("{other:?}"))),
        }
    }
    eprintln!(
        "accepted {} events ({before_kill} before the kill, {} after the failover), {failed} refused; primary {p} -> {new_primary}; {unavailable_reads} reads answered Unavailable and were asked again",
        accepted.len(),
        accepted.len() - at_failover
    );
    assert!(
        missing.is_empty(),
        "{} of {} accepted events are not in the store after the failover: {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
    cp.shutdown().await.unwrap();
}

/// The control plane's store on `redis`, with a paused pool.
async fn control_plane_on(redis: &RedisConfig) -> RunningControlPlane {
    let mut config = test_config();
    config.pools.get_mut("linux").unwrap().paused = true;
    let store = RedisStore::from_config(
        redis,
        RedisStoreOptions {
            prefix: redis.key_prefix.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let fake = Arc::new(FakeProvisioner::new());
    let pools = fake_pools(&config, &fake);
    RunningControlPlane::start(control_plane(config, Arc::new(store), pools)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_replica_acknowledged_is_refused_not_accepted() {
    // The shared test Redis has no replica: WAIT 1 can only time out.
    let Some(probe) = redis_store("wait-replicas").await else {
        return;
    };
    let info = redis_cli_url(&redis_url(), &["INFO", "replication"]);
    assert!(
        info.contains("connected_slaves:0"),
        "this test needs a Redis without replicas at {}: {info}",
        redis_url()
    );
    let redis = RedisConfig {
        url: redis_url(),
        key_prefix: probe.prefix().to_owned(),
        wait_replicas: 1,
        wait_timeout: Duration::from_millis(100),
        ..RedisConfig::default()
    };
    let cp = control_plane_on(&redis).await;
    let mut client = cp.client().await;
    let ev = job_event("d-wait", pb::JobAction::Queued, 6_100_000_001);
    let e = client
        .submit_job_event(pb::SubmitJobEventRequest { event: Some(ev) })
        .await
        .expect_err("no replica has it, so it is not accepted");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("redis.wait_replicas"), "{e:?}");
    cp.shutdown().await.unwrap();
    probe.flush_prefix().await.unwrap();
}

fn redis_cli_url(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", url])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let t = grs_config::parse_file(Path::new("grs.toml"), text).map_err(|e| e.to_string())?;
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let mut c: Config = grs_config::load_from(Some(t), env).map_err(|e| e.to_string())?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

const POOL: &str = "[pools.l]\nlabels=['a']\n[pools.l.provisioner]\ntype='fake'\n";

#[test]
fn sentinel_settings_are_checked_and_errors_name_the_key() {
    for (section, key) in [
        (
            "[redis.sentinel]\nmaster_name='m'\n",
            "redis.sentinel.addresses",
        ),
        (
            "[redis.sentinel]\naddresses=['10.0.0.1:26379']\n",
            "redis.sentinel.master_name",
        ),
        (
            "[redis.sentinel]\nmaster_name='m'\naddresses=['10.0.0.1']\n",
            "redis.sentinel.addresses[0]",
        ),
        (
            "[redis.sentinel]\nmaster_name='m'\naddresses=['h:0']\n",
            "redis.sentinel.addresses[0]",
        ),
        (
            "[redis]\nwait_replicas=1\nwait_timeout='0s'\n",
            "redis.wait_timeout",
        ),
        (
            "[redis]\nurl='rediss://h/0'\n[redis.sentinel]\nmaster_name='m'\naddresses=['h:26379']\n",
            "redis.url",
        ),
        (
            "[redis]\npassword_file='/nonexistent/grs-redis-password'\n",
            "redis.password_file",
        ),
    ] {
        let e = load(&format!("{section}{POOL}"), &[]).unwrap_err();
        assert!(e.contains(key), "{section}: {e}");
    }
    let c = load(
        &format!(
            "[redis.sentinel]\nmaster_name='m'\naddresses=['10.0.0.1:26379', '[::1]:26380']\n{POOL}"
        ),
        &[
            ("GRS_REDIS_SENTINEL_PASSWORD", "pw"),
            ("GRS_REDIS_WAIT_REPLICAS", "1"),
        ],
    )
    .unwrap();
    assert!(c.redis.sentinel.password.is_some());
    assert_eq!(c.redis.wait_replicas, 1);
}

#[tokio::test]
async fn passwords_appear_in_no_error_and_no_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sentinel-password");
    std::fs::write(&file, "sentinel-secret-4711\n").unwrap();
    let mut c = load(
        &format!(
            "[redis]\nurl='redis://:url-secret-4711@h/0'\n[redis.sentinel]\nmaster_name='m'\naddresses=['127.0.0.1:{}']\npassword_file='{}'\n{POOL}",
            free_port(),
            file.display()
        ),
        &[("GRS_REDIS_PASSWORD", "data-secret-4711")],
    )
    .unwrap();
    let store = RedisStore::from_config(&c.redis, RedisStoreOptions::default()).unwrap();
    let e = store.ping().await.expect_err("no sentinel listens there");
    let shown = format!("{e} {e:?} {store:?}");
    assert!(
        shown.contains("127.0.0.1"),
        "the error names the sentinels: {shown}"
    );
    for secret in [
        "sentinel-secret-4711",
        "data-secret-4711",
        "url-secret-4711",
    ] {
        assert!(!shown.contains(secret), "{secret} shown: {shown}");
    }
    // The file's password was read (and trimmed).
    use secrecy::ExposeSecret;
    let pw = c.redis.sentinel.password.take().unwrap();
    assert_eq!(pw.expose_secret(), "sentinel-secret-4711");
}

/// A TCP proxy a replica replicates through. `hold` stops the primary →
/// replica direction (the replica lags, alive and answering the sentinels);
/// dropping the proxy closes every connection through it.
struct ReplicationProxy {
    port: u16,
    hold: Arc<std::sync::atomic::AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for ReplicationProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn replication_proxy(primary: u16) -> ReplicationProxy {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = Arc::new(AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let (h, s) = (hold.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (replica, _) = tokio::select! {
                _ = s.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
            };
            let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", primary)).await else {
                continue;
            };
            let (mut rr, mut rw) = replica.into_split();
            let (mut ur, mut uw) = up.into_split();
            let (h, s1, s2) = (h.clone(), s.clone(), s.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = s1.cancelled() => {}
                    _ = tokio::io::copy(&mut rr, &mut uw) => {}
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = tokio::select! {
                        _ = s2.cancelled() => return,
                        n = ur.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                    };
                    while h.load(Ordering::SeqCst) {
                        tokio::select! {
                            _ = s2.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        }
                    }
                    if rw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    ReplicationProxy { port, hold, stop }
}

fn repl_offset(port: u16, field: &str) -> Option<u64> {
    info_field(&redis_cli(port, &["INFO", "replication"])?, field)?
        .parse()
        .ok()
}

/// The positive control of the test above: with `wait_replicas = 0`, an
/// event the primary accepted but had not replicated when it died is lost
/// in the failover, and reading every accepted job back finds it missing.
/// (This is why `redis.wait_replicas` exists.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_wait_replicas_an_accepted_event_the_replica_lacked_is_lost_in_a_failover() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            panic!("redis-server is not installed: CI is set, so this test fails");
        }
        eprintln!("SKIPPED: redis-server is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Some(data_node(dir.path(), "primary", None).await);
    let p = primary.as_ref().unwrap().port;
    let proxy = replication_proxy(p).await;
    let replica = data_node(dir.path(), "replica", Some(proxy.port)).await;
    let r = replica.port;
    eventually(
        "the replica in sync",
        Duration::from_secs(15),
        || async move {
            let info = redis_cli(r, &["INFO", "replication"])?;
            (info_field(&info, "master_link_status")? == "up").then_some(())
        },
    )
    .await;
    let sentinels = [
        sentinel(dir.path(), "sentinel-1", p).await,
        sentinel(dir.path(), "sentinel-2", p).await,
        sentinel(dir.path(), "sentinel-3", p).await,
    ];
    for s in &sentinels {
        let port = s.port;
        eventually(
            &format!("{} to see the replica and the other sentinels", s.name),
            Duration::from_secs(30),
            || async move {
                let ok = sentinel_view(port, "num-slaves")? == "1"
                    && sentinel_view(port, "num-other-sentinels")? == "2";
                ok.then_some(())
            },
        )
        .await;
    }
    let redis = RedisConfig {
        key_prefix: "grs-sentinel-loss".into(),
        sentinel: RedisSentinelConfig {
            master_name: MASTER.into(),
            addresses: sentinels
                .iter()
                .map(|s| format!("127.0.0.1:{}", s.port))
                .collect(),
            ..Default::default()
        },
        ..RedisConfig::default()
    };
    let cp = control_plane_on(&redis).await;
    let mut client = cp.client().await;
    let submit = |job: u64| pb::SubmitJobEventRequest {
        event: Some(job_event(&format!("d-{job}"), pb::JobAction::Queued, job)),
    };
    client
        .submit_job_event(submit(6_200_000_001))
        .await
        .unwrap();
    // Replicated before the replica is held back.
    eventually(
        "the replica to catch up",
        Duration::from_secs(10),
        || async move {
            let want = repl_offset(p, "master_repl_offset")?;
            (repl_offset(r, "slave_repl_offset")? >= want).then_some(())
        },
    )
    .await;
    proxy.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    client
        .submit_job_event(submit(6_200_000_002))
        .await
        .expect("accepted by the primary alone");
    drop(primary.take());
    drop(proxy);
    let sentinel_port = sentinels[0].port;
    eventually(
        "the sentinels to promote the replica",
        Duration::from_secs(60),
        || async move {
            let out = redis_cli(
                sentinel_port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER],
            )?;
            let port: u16 = out.lines().nth(1)?.trim().parse().ok()?;
            (port == r).then_some(())
        },
    )
    .await;
    let found = |job_id: u64| {
        let c = client.clone();
        async move {
            eventually(
                "the control plane on the new primary",
                Duration::from_secs(30),
                || {
                    let mut c = c.clone();
                    async move {
                        match c.get_job(pb::GetJobRequest { job_id }).await {
                            Ok(_) => Some(true),
                            Err(s) if s.code() == tonic::Code::NotFound => Some(false),
                            Err(_) => None,
                        }
                    }
                },
            )
            .await
        }
    };
    assert!(found(6_200_000_001).await, "the replicated event survives");
    assert!(
        !found(6_200_000_002).await,
        "the event only the dead primary had is lost: the check of the test above can fail"
    );
    cp.shutdown().await.unwrap();
}
