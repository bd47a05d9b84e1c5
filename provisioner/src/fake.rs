//! An in-memory [`Provisioner`] for tests and the demo.
//!
//! It keeps its "VMs" in a map and can be told to fail or slow down, so tests
//! can prove what the control plane does when a backend misbehaves. It also
//! records what matters for invariants: how many instances lived at once and
//! how often each verb was called.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::{
    BootstrapKind, Capabilities, Instance, InstanceSpec, InstanceState, PoolDocument, Provisioner,
    ProvisionerError, validate_instance_name,
};

/// The fake's pool document: `create_delay = "2s"` (simulated boot time),
/// `bootstrap = "guest-agent"` (the kind it reports for the pool; default
/// `"cloud-init"`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakePoolConfig {
    /// Every `create` in the pool sleeps this long before the instance runs.
    #[serde(with = "humantime_serde")]
    pub create_delay: Duration,
    /// The bootstrap the pool's instances take.
    pub bootstrap: FakeBootstrap,
}

/// `bootstrap` in the fake's pool document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FakeBootstrap {
    /// [`BootstrapKind::CloudInit`].
    #[default]
    CloudInit,
    /// [`BootstrapKind::GuestAgent`].
    GuestAgent,
    /// [`BootstrapKind::None`].
    None,
}

/// A failure the fake injects into its next `create` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFailure {
    /// [`ProvisionerError::Transient`]: the caller should retry.
    Transient,
    /// [`ProvisionerError::NoCapacity`].
    NoCapacity,
    /// [`ProvisionerError::Permanent`]: retrying won't help.
    Permanent,
}

impl InjectedFailure {
    fn to_error(self, name: &str) -> ProvisionerError {
        match self {
            Self::Transient => {
                ProvisionerError::Transient(format!("injected transient failure creating {name}"))
            }
            Self::NoCapacity => {
                ProvisionerError::NoCapacity(format!("injected: no room for {name}"))
            }
            Self::Permanent => {
                ProvisionerError::Permanent(format!("injected permanent failure creating {name}"))
            }
        }
    }
}

#[derive(Debug)]
struct FakeVm {
    instance: Instance,
    /// False for VMs "someone else" made: GRS must never touch them.
    owned: bool,
}

#[derive(Debug, Default)]
struct State {
    vms: BTreeMap<String, FakeVm>,
    create_failures: VecDeque<InjectedFailure>,
    delete_failures: u32,
    next_id: u64,
    creates: u64,
    create_calls: u64,
    deletes: u64,
    peak_live: usize,
}

/// In-memory backend serving any pool (configured or not: it needs no
/// settings). Cheap to clone behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct FakeProvisioner {
    create_delay: Mutex<Duration>,
    /// Per-pool boot times from [`Provisioner::configure_pool`].
    pool_delays: Mutex<HashMap<String, Duration>>,
    pool_bootstraps: Mutex<HashMap<String, BootstrapKind>>,
    state: Mutex<State>,
}

impl Default for FakeProvisioner {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeProvisioner {
    /// A fake with no delay and no failures.
    pub fn new() -> Self {
        Self {
            create_delay: Mutex::new(Duration::ZERO),
            pool_delays: Mutex::new(HashMap::new()),
            pool_bootstraps: Mutex::new(HashMap::new()),
            state: Mutex::new(State {
                next_id: 100,
                ..State::default()
            }),
        }
    }

    /// Every `create` sleeps this long before the instance runs (boot time),
    /// unless its pool's document sets `create_delay`.
    pub fn set_create_delay(&self, delay: Duration) {
        *self.create_delay.lock().unwrap() = delay;
    }

    /// The next `n` creates fail with `failure` (after any queued before).
    pub fn fail_next_creates(&self, n: usize, failure: InjectedFailure) {
        let mut s = self.state.lock().unwrap();
        s.create_failures.extend(std::iter::repeat_n(failure, n));
    }

    /// The next `n` deletes fail with a transient error.
    pub fn fail_next_deletes(&self, n: u32) {
        self.state.lock().unwrap().delete_failures += n;
    }

    /// Adds a VM named `name` that this installation does not own.
    pub fn add_foreign(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let instance = Instance {
            name: name.to_owned(),
            provider_id: format!("fake/{}", s.next_id),
            pool: String::new(),
            job_id: None,
            state: InstanceState::Running,
            location: Some("fake".into()),
            created_at: Some(SystemTime::now()),
        };
        s.vms.insert(
            name.to_owned(),
            FakeVm {
                instance,
                owned: false,
            },
        );
    }

    /// Sets the creation time the fake reports for `name` (`None`: unknown,
    /// as a backend that cannot tell), so tests can age instances or hide
    /// their age. Nothing happens if `name` does not exist.
    pub fn set_created_at(&self, name: &str, at: Option<SystemTime>) {
        if let Some(vm) = self.state.lock().unwrap().vms.get_mut(name) {
            vm.instance.created_at = at;
        }
    }

    /// Whether a VM named `name` exists, ours or not.
    pub fn exists(&self, name: &str) -> bool {
        self.state.lock().unwrap().vms.contains_key(name)
    }

    /// Number of our instances alive now.
    pub fn live(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .vms
            .values()
            .filter(|v| v.owned)
            .count()
    }

    /// Most of our instances ever alive at once.
    pub fn peak_live(&self) -> usize {
        self.state.lock().unwrap().peak_live
    }

    /// `create` calls that made a new instance.
    pub fn creates(&self) -> u64 {
        self.state.lock().unwrap().creates
    }

    /// Every `create` call, repeated ones (the instance existed) included.
    pub fn create_calls(&self) -> u64 {
        self.state.lock().unwrap().create_calls
    }

    /// `delete` calls that removed an instance.
    pub fn deletes(&self) -> u64 {
        self.state.lock().unwrap().deletes
    }

    /// The VM `name` of `pool`, if any; `NotOwned` when a VM has the name
    /// but is foreign or another pool's (its marker does not match).
    fn owned_mut<'a>(
        s: &'a mut State,
        pool: &str,
        name: &str,
    ) -> Result<Option<&'a mut FakeVm>, ProvisionerError> {
        match s.vms.get_mut(name) {
            Some(vm) if !vm.owned || vm.instance.pool != pool => Err(ProvisionerError::NotOwned {
                name: name.to_owned(),
            }),
            other => Ok(other),
        }
    }
}

#[async_trait]
impl Provisioner for FakeProvisioner {
    fn kind(&self) -> &str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { start_stop: true }
    }

    fn configure_pool(&self, pool: &str, config: &PoolDocument) -> Result<(), ProvisionerError> {
        let parsed: FakePoolConfig =
            serde_json::from_value(serde_json::Value::Object(config.clone()))
                .map_err(|e| ProvisionerError::Config(format!("pools.{pool}.provisioner: {e}")))?;
        self.pool_delays
            .lock()
            .unwrap()
            .insert(pool.to_owned(), parsed.create_delay);
        let kind = match parsed.bootstrap {
            FakeBootstrap::CloudInit => BootstrapKind::CloudInit,
            FakeBootstrap::GuestAgent => BootstrapKind::GuestAgent,
            FakeBootstrap::None => BootstrapKind::None,
        };
        self.pool_bootstraps
            .lock()
            .unwrap()
            .insert(pool.to_owned(), kind);
        Ok(())
    }

    async fn validate_pool(&self, _pool: &str) -> Result<(), ProvisionerError> {
        Ok(())
    }

    /// The document's `bootstrap`; cloud-init for a pool never configured.
    fn pool_bootstrap(&self, pool: &str) -> Option<BootstrapKind> {
        Some(
            self.pool_bootstraps
                .lock()
                .unwrap()
                .get(pool)
                .copied()
                .unwrap_or_default(),
        )
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProvisionerError> {
        validate_instance_name(&spec.name)
            .map_err(|e| ProvisionerError::InvalidSpec(e.to_string()))?;
        {
            let mut s = self.state.lock().unwrap();
            s.create_calls += 1;
            match Self::owned_mut(&mut s, &spec.pool, &spec.name)? {
                // Idempotent: the instance exists already (a repeated call).
                Some(vm) if vm.instance.state != InstanceState::Creating => {
                    return Ok(vm.instance.clone());
                }
                // A creation that was interrupted: finish booting it below.
                Some(_) => {}
                None => {
                    if let Some(f) = s.create_failures.pop_front() {
                        return Err(f.to_error(&spec.name));
                    }
                    // Reserve the name at once, as a real hypervisor's clone
                    // would: a crash or cancellation during "boot" leaves it
                    // findable.
                    s.next_id += 1;
                    let instance = Instance {
                        name: spec.name.clone(),
                        provider_id: format!("fake/{}", s.next_id),
                        pool: spec.pool.clone(),
                        job_id: Some(spec.job_id),
                        state: InstanceState::Creating,
                        location: Some("fake".into()),
                        created_at: Some(SystemTime::now()),
                    };
                    s.vms.insert(
                        spec.name.clone(),
                        FakeVm {
                            instance,
                            owned: true,
                        },
                    );
                    s.creates += 1;
                    let live = s.vms.values().filter(|v| v.owned).count();
                    s.peak_live = s.peak_live.max(live);
                }
            }
        }
        let pool_delay = self.pool_delays.lock().unwrap().get(&spec.pool).copied();
        let delay = pool_delay.unwrap_or(*self.create_delay.lock().unwrap());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state.lock().unwrap();
        match s.vms.get_mut(&spec.name) {
            Some(vm) => {
                vm.instance.state = InstanceState::Running;
                Ok(vm.instance.clone())
            }
            // Deleted while booting: report it, the caller decides.
            None => Err(ProvisionerError::Transient(format!(
                "instance {} vanished while starting",
                spec.name
            ))),
        }
    }

    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        let mut s = self.state.lock().unwrap();
        if Self::owned_mut(&mut s, pool, name)?.is_none() {
            return Ok(());
        }
        if s.delete_failures > 0 {
            s.delete_failures -= 1;
            return Err(ProvisionerError::Transient(format!(
                "injected transient failure deleting {name}"
            )));
        }
        s.vms.remove(name);
        s.deletes += 1;
        Ok(())
    }

    async fn get(&self, pool: &str, name: &str) -> Result<Option<Instance>, ProvisionerError> {
        let s = self.state.lock().unwrap();
        Ok(s.vms
            .get(name)
            .filter(|v| v.owned && v.instance.pool == pool)
            .map(|v| v.instance.clone()))
    }

    async fn list(&self, pool: &str) -> Result<Vec<Instance>, ProvisionerError> {
        let s = self.state.lock().unwrap();
        Ok(s.vms
            .values()
            .filter(|v| v.owned && v.instance.pool == pool)
            .map(|v| v.instance.clone())
            .collect())
    }

    async fn start(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        let mut s = self.state.lock().unwrap();
        match Self::owned_mut(&mut s, pool, name)? {
            Some(vm) => {
                vm.instance.state = InstanceState::Running;
                Ok(())
            }
            None => Err(ProvisionerError::Permanent(format!(
                "instance {name} does not exist"
            ))),
        }
    }

    async fn stop(&self, pool: &str, name: &str) -> Result<(), ProvisionerError> {
        let mut s = self.state.lock().unwrap();
        match Self::owned_mut(&mut s, pool, name)? {
            Some(vm) => {
                vm.instance.state = InstanceState::Stopped;
                Ok(())
            }
            None => Err(ProvisionerError::Permanent(format!(
                "instance {name} does not exist"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::conformance::{self, Harness, HarnessError};

    /// The suite's access to the fake; `blind`: its backend's API fails
    /// whenever the harness looks for a VM (it can still make foreign ones).
    #[derive(Debug)]
    struct FakeHarness {
        fake: Arc<FakeProvisioner>,
        blind: bool,
    }

    impl FakeHarness {
        fn new(blind: bool) -> Self {
            Self {
                fake: Arc::new(FakeProvisioner::new()),
                blind,
            }
        }
    }

    #[async_trait]
    impl Harness for FakeHarness {
        fn provisioner(&self) -> Arc<dyn Provisioner> {
            self.fake.clone()
        }
        fn pool(&self) -> String {
            "conformance".into()
        }
        async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
            self.fake.add_foreign(name);
            Ok(())
        }
        async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
            if self.blind {
                return Err("the backend's API answered 503".into());
            }
            Ok(self.fake.exists(name))
        }
    }

    #[tokio::test]
    async fn fake_passes_the_conformance_suite() {
        let h = FakeHarness::new(false);
        conformance::run_all(&h).await.unwrap();
    }

    #[tokio::test]
    async fn a_foreign_vm_check_fails_when_the_backend_cannot_be_asked() {
        let h = FakeHarness::new(true);
        for check in [
            conformance::foreign_vms_are_invisible_and_untouchable(&h, "blind").await,
            conformance::remove_all_deletes_the_pools_instances_and_nothing_else(&h, "blind").await,
        ] {
            let e = check.expect_err("a check that cannot look must fail");
            assert!(
                e.contains("cannot tell whether a VM named") && e.contains("answered 503"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn injected_failures_come_in_order_then_stop() {
        let p = FakeProvisioner::new();
        p.fail_next_creates(1, InjectedFailure::Transient);
        p.fail_next_creates(1, InjectedFailure::Permanent);
        let spec = conformance::spec("p", "inj-1", 1);
        assert!(p.create(&spec).await.unwrap_err().is_retryable());
        assert!(!p.create(&spec).await.unwrap_err().is_retryable());
        assert_eq!(p.create(&spec).await.unwrap().state, InstanceState::Running);
        assert_eq!(p.creates(), 1);
    }

    #[tokio::test]
    async fn the_pool_document_is_checked_and_sets_the_boot_time() {
        let p = FakeProvisioner::new();
        let doc = |v: serde_json::Value| v.as_object().unwrap().clone();
        let e = p
            .configure_pool("slow", &doc(serde_json::json!({"create_dalay": "1s"})))
            .unwrap_err();
        assert!(
            matches!(&e, ProvisionerError::Config(m) if m.contains("pools.slow.provisioner") && m.contains("create_dalay")),
            "{e}"
        );
        p.configure_pool("slow", &doc(serde_json::json!({"create_delay": "1h"})))
            .unwrap();
        // The fast pool is not held up by the slow one's boot time.
        let fast = conformance::spec("fast", "fast-1", 1);
        tokio::time::timeout(Duration::from_secs(5), p.create(&fast))
            .await
            .expect("no delay outside the slow pool")
            .unwrap();
        let slow = conformance::spec("slow", "slow-1", 2);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), p.create(&slow))
                .await
                .is_err(),
            "the slow pool's create waits its create_delay"
        );
    }
}
