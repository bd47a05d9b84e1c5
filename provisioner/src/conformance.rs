//! The behaviour every [`Provisioner`] must show, as a suite.
//!
//! A backend's own tests implement [`Harness`] over a live backend (the
//! Proxmox provisioner against its simulator and against `fakepve`; the fake
//! in-memory) and call [`run_all`]. Each check returns `Err` with its name and
//! what went wrong, so a failure reads as a broken promise:
//!
//! ```text
//! conformance check `delete_of_absent_instance_succeeds` failed: ...
//! ```
//!
//! Instance names are unique per run (a random suffix), so the suite can run
//! against a backend that already holds other VMs.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{Bootstrap, InstanceSpec, InstanceState, Provisioner, ProvisionerError};

/// Why a [`Harness`] could not look or act behind the provisioner's back
/// (the backend's API failed, a file could not be written): whatever error
/// the harness's own client has.
pub type HarnessError = Box<dyn std::error::Error + Send + Sync>;

/// Access to a live backend for the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The provisioner under test.
    fn provisioner(&self) -> Arc<dyn Provisioner>;
    /// The pool the provisioner serves.
    fn pool(&self) -> String;
    /// Makes a VM named `name` that the provisioner does NOT own (no marker),
    /// behind its back. An error fails the foreign checks: a backend's tests
    /// must be able to prove them.
    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError>;
    /// Whether any VM named `name` exists, owned or not. An error (the
    /// backend could not be asked) fails the check that asked, whichever
    /// answer it wanted: "a foreign VM survives" must not pass unseen.
    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError>;
}

/// [`Harness::exists_at_all`], its error a check failure naming the VM.
async fn exists_at_all(h: &dyn Harness, name: &str) -> Result<bool, String> {
    h.exists_at_all(name)
        .await
        .map_err(|e| format!("cannot tell whether a VM named {name} exists: {e}"))
}

/// [`Harness::create_foreign`], its error a check failure naming the VM.
async fn create_foreign(h: &dyn Harness, name: &str) -> CheckResult {
    h.create_foreign(name).await.map_err(|e| {
        format!("the harness cannot make foreign VM {name} (this check must run): {e}")
    })
}

/// A spec with no bootstrap, for tests.
pub fn spec(pool: &str, name: &str, job_id: u64) -> InstanceSpec {
    InstanceSpec {
        name: name.to_owned(),
        pool: pool.to_owned(),
        job_id,
        labels: vec!["self-hosted".into(), "linux".into()],
        bootstrap: Bootstrap::None,
    }
}

type CheckResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn err(e: ProvisionerError) -> String {
    e.to_string()
}

/// A broken promise: the check that failed and what it saw.
#[derive(Debug, thiserror::Error)]
#[error("conformance check `{check}` failed: {saw}")]
pub struct ConformanceFailure {
    /// The check's name (its function's).
    pub check: &'static str,
    /// What went wrong.
    pub saw: String,
}

/// Runs every check; stops at the first failure and names it.
pub async fn run_all(h: &dyn Harness) -> Result<(), ConformanceFailure> {
    let run = unique_run_id();
    macro_rules! check {
        ($f:ident) => {
            $f(h, &run).await.map_err(|saw| ConformanceFailure {
                check: stringify!($f),
                saw,
            })?;
        };
    }
    check!(create_returns_a_running_instance_that_get_and_list_show);
    check!(create_is_idempotent_by_name);
    check!(delete_removes_the_instance);
    check!(delete_of_absent_instance_succeeds);
    check!(stop_and_start_change_the_state);
    check!(foreign_vms_are_invisible_and_untouchable);
    check!(concurrent_creates_all_succeed);
    check!(invalid_names_are_refused);
    check!(instances_belong_to_their_pool);
    check!(remove_all_deletes_the_pools_instances_and_nothing_else);
    Ok(())
}

fn unique_run_id() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos ^ std::process::id())
}

fn name(run: &str, n: u32) -> String {
    format!("grs-conf-{run}-{n}")
}

/// `create` returns a running instance with the requested name, pool and job;
/// `get` and `list` show it.
pub async fn create_returns_a_running_instance_that_get_and_list_show(
    h: &dyn Harness,
    run: &str,
) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let n = name(run, 1);
    let inst = p
        .create(&spec(&pool, &n, 4_000_000_001))
        .await
        .map_err(err)?;
    ensure!(
        inst.name == n,
        "create returned name {:?}, want {n:?}",
        inst.name
    );
    ensure!(
        inst.state == InstanceState::Running,
        "create returned state {}, want running",
        inst.state
    );
    ensure!(
        inst.pool == pool,
        "create returned pool {:?}, want {pool:?}",
        inst.pool
    );
    ensure!(
        !inst.provider_id.is_empty(),
        "create returned an empty provider_id"
    );
    let got = p.get(&pool, &n).await.map_err(err)?;
    ensure!(
        got.as_ref().map(|i| i.provider_id.as_str()) == Some(inst.provider_id.as_str()),
        "get({n}) returned {got:?}"
    );
    let got = got.unwrap_or_else(|| unreachable!());
    ensure!(
        got.job_id == Some(4_000_000_001),
        "get({n}).job_id = {:?}, want the 64-bit job id",
        got.job_id
    );
    let listed = p.list(&pool).await.map_err(err)?;
    ensure!(listed.iter().any(|i| i.name == n), "list does not show {n}");
    p.delete(&pool, &n).await.map_err(err)?;
    Ok(())
}

/// A repeated `create` of the same name returns the same instance and makes
/// no second one.
pub async fn create_is_idempotent_by_name(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let n = name(run, 2);
    let a = p.create(&spec(&pool, &n, 2)).await.map_err(err)?;
    let b = p.create(&spec(&pool, &n, 2)).await.map_err(err)?;
    ensure!(
        a.provider_id == b.provider_id,
        "second create made {} besides {}",
        b.provider_id,
        a.provider_id
    );
    let count = p
        .list(&pool)
        .await
        .map_err(err)?
        .iter()
        .filter(|i| i.name == n)
        .count();
    ensure!(count == 1, "list shows {count} instances named {n}, want 1");
    p.delete(&pool, &n).await.map_err(err)?;
    Ok(())
}

/// After `delete`, the instance is gone from `get`, `list` and the backend.
pub async fn delete_removes_the_instance(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let n = name(run, 3);
    p.create(&spec(&pool, &n, 3)).await.map_err(err)?;
    p.delete(&pool, &n).await.map_err(err)?;
    ensure!(
        p.get(&pool, &n).await.map_err(err)?.is_none(),
        "get({n}) still finds it after delete"
    );
    ensure!(
        !p.list(&pool)
            .await
            .map_err(err)?
            .iter()
            .any(|i| i.name == n),
        "list still shows {n} after delete"
    );
    ensure!(
        !exists_at_all(h, &n).await?,
        "the backend still holds a VM named {n} after delete"
    );
    Ok(())
}

/// Deleting what is absent (never made, or deleted already) succeeds.
pub async fn delete_of_absent_instance_succeeds(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let n = name(run, 4);
    p.delete(&pool, &n)
        .await
        .map_err(|e| format!("delete of a never-made instance: {e}"))?;
    p.create(&spec(&pool, &n, 4)).await.map_err(err)?;
    p.delete(&pool, &n).await.map_err(err)?;
    p.delete(&pool, &n)
        .await
        .map_err(|e| format!("second delete: {e}"))?;
    ensure!(
        p.get(&pool, &n).await.map_err(err)?.is_none(),
        "unknown instance {n} found by get"
    );
    Ok(())
}

/// `stop` and `start` move the instance between stopped and running, and
/// both are idempotent. A backend without the `start_stop` capability
/// refuses both with `Unsupported` and leaves the instance running.
pub async fn stop_and_start_change_the_state(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let n = name(run, 5);
    p.create(&spec(&pool, &n, 5)).await.map_err(err)?;
    if !p.capabilities().start_stop {
        for (verb, r) in [
            ("stop", p.stop(&pool, &n).await),
            ("start", p.start(&pool, &n).await),
        ] {
            ensure!(
                matches!(r, Err(ProvisionerError::Unsupported(_))),
                "{verb} without the start_stop capability returned {r:?}, want Unsupported"
            );
        }
        let s = p.get(&pool, &n).await.map_err(err)?.map(|i| i.state);
        ensure!(
            s == Some(InstanceState::Running),
            "after a refused stop, state is {s:?}"
        );
        p.delete(&pool, &n).await.map_err(err)?;
        return Ok(());
    }
    p.stop(&pool, &n).await.map_err(err)?;
    p.stop(&pool, &n)
        .await
        .map_err(|e| format!("stop of a stopped instance: {e}"))?;
    let s = p.get(&pool, &n).await.map_err(err)?.map(|i| i.state);
    ensure!(
        s == Some(InstanceState::Stopped),
        "after stop, state is {s:?}"
    );
    p.start(&pool, &n).await.map_err(err)?;
    p.start(&pool, &n)
        .await
        .map_err(|e| format!("start of a running instance: {e}"))?;
    let s = p.get(&pool, &n).await.map_err(err)?.map(|i| i.state);
    ensure!(
        s == Some(InstanceState::Running),
        "after start, state is {s:?}"
    );
    // Deleting a running instance stops it first.
    p.delete(&pool, &n).await.map_err(err)?;
    ensure!(
        !exists_at_all(h, &n).await?,
        "running instance {n} survived delete"
    );
    Ok(())
}

/// A VM with an instance's name but without our marker is neither listed,
/// nor got, nor deleted, nor stopped; creating over it fails.
pub async fn foreign_vms_are_invisible_and_untouchable(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let n = name(run, 6);
    create_foreign(h, &n).await?;
    ensure!(
        p.get(&pool, &n).await.map_err(err)?.is_none(),
        "get returned foreign VM {n}"
    );
    ensure!(
        !p.list(&pool)
            .await
            .map_err(err)?
            .iter()
            .any(|i| i.name == n),
        "list returned foreign VM {n}"
    );
    match p.delete(&pool, &n).await {
        Err(ProvisionerError::NotOwned { name }) => {
            ensure!(name == n, "NotOwned names {name:?}, want {n:?}")
        }
        other => {
            return Err(format!(
                "delete of foreign VM {n} returned {other:?}, want NotOwned"
            ));
        }
    }
    ensure!(
        exists_at_all(h, &n).await?,
        "foreign VM {n} is gone after a refused delete"
    );
    if p.capabilities().start_stop {
        match p.stop(&pool, &n).await {
            Err(ProvisionerError::NotOwned { .. }) => {}
            other => {
                return Err(format!(
                    "stop of foreign VM {n} returned {other:?}, want NotOwned"
                ));
            }
        }
    }
    match p.create(&spec(&pool, &n, 6)).await {
        Err(ProvisionerError::NotOwned { .. }) => {}
        other => {
            return Err(format!(
                "create over foreign VM {n} returned {other:?}, want NotOwned"
            ));
        }
    }
    ensure!(
        exists_at_all(h, &n).await?,
        "foreign VM {n} is gone after a refused create"
    );
    Ok(())
}

/// Several creates at once all succeed, each with its own instance.
pub async fn concurrent_creates_all_succeed(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let names: Vec<String> = (10..14).map(|i| name(run, i)).collect();
    let results = futures::future::join_all(names.iter().enumerate().map(|(i, n)| {
        let p = p.clone();
        let s = spec(&pool, n, 100 + i as u64);
        async move { p.create(&s).await }
    }))
    .await;
    let mut ids = HashSet::new();
    for (n, r) in names.iter().zip(results) {
        let inst = r.map_err(|e| format!("concurrent create of {n}: {e}"))?;
        ensure!(
            ids.insert(inst.provider_id.clone()),
            "two instances share provider_id {}",
            inst.provider_id
        );
    }
    for n in &names {
        p.delete(&pool, n).await.map_err(err)?;
    }
    Ok(())
}

/// A name that is not a DNS label is refused before anything is made.
pub async fn invalid_names_are_refused(h: &dyn Harness, _run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    match p.create(&spec(&pool, "Not_A_DNS_Name", 7)).await {
        Err(ProvisionerError::InvalidSpec(msg)) => {
            ensure!(
                msg.contains("Not_A_DNS_Name"),
                "the error does not name the bad name: {msg}"
            )
        }
        other => {
            return Err(format!(
                "create with an invalid name returned {other:?}, want InvalidSpec"
            ));
        }
    }
    ensure!(
        !exists_at_all(h, "Not_A_DNS_Name").await?,
        "a VM was made with an invalid name"
    );
    Ok(())
}

/// An instance is its pool's: seen from another pool (one never configured,
/// as a pool removed from the configuration) it is neither got nor listed,
/// and deleting it there is refused with `NotOwned`.
pub async fn instances_belong_to_their_pool(h: &dyn Harness, run: &str) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let other = format!("{pool}-other");
    let n = name(run, 20);
    p.create(&spec(&pool, &n, 20)).await.map_err(err)?;
    ensure!(
        p.get(&other, &n).await.map_err(err)?.is_none(),
        "get({other}, {n}) found pool {pool}'s instance"
    );
    ensure!(
        !p.list(&other)
            .await
            .map_err(err)?
            .iter()
            .any(|i| i.name == n),
        "list({other}) shows pool {pool}'s instance {n}"
    );
    let r = p.delete(&other, &n).await;
    ensure!(
        matches!(&r, Err(ProvisionerError::NotOwned { name }) if *name == n),
        "delete({other}, {n}) of pool {pool}'s instance returned {r:?}, want NotOwned"
    );
    ensure!(
        p.get(&pool, &n).await.map_err(err)?.is_some(),
        "{n} is gone after another pool's refused delete"
    );
    p.delete(&pool, &n).await.map_err(err)?;
    Ok(())
}

/// `remove_all` deletes every instance of the pool, reports their names,
/// and leaves foreign VMs alone; repeated, it finds nothing.
pub async fn remove_all_deletes_the_pools_instances_and_nothing_else(
    h: &dyn Harness,
    run: &str,
) -> CheckResult {
    let p = h.provisioner();
    let pool = h.pool();
    let mine = [name(run, 30), name(run, 31)];
    for (i, n) in mine.iter().enumerate() {
        p.create(&spec(&pool, n, 30 + i as u64))
            .await
            .map_err(err)?;
    }
    let foreign = name(run, 32);
    create_foreign(h, &foreign).await?;
    let mut removed = p.remove_all(&pool).await.map_err(err)?;
    removed.sort();
    for n in &mine {
        ensure!(
            removed.contains(n),
            "remove_all({pool}) returned {removed:?}, without {n}"
        );
        ensure!(
            !exists_at_all(h, n).await?,
            "{n} survived remove_all({pool})"
        );
    }
    ensure!(
        !removed.contains(&foreign),
        "remove_all({pool}) claims to have removed foreign VM {foreign}"
    );
    ensure!(
        exists_at_all(h, &foreign).await?,
        "foreign VM {foreign} is gone after remove_all({pool})"
    );
    let left = p.list(&pool).await.map_err(err)?;
    ensure!(
        left.is_empty(),
        "list({pool}) after remove_all shows {left:?}"
    );
    let again = p.remove_all(&pool).await.map_err(err)?;
    ensure!(
        again.is_empty(),
        "a second remove_all({pool}) removed {again:?}"
    );
    Ok(())
}
