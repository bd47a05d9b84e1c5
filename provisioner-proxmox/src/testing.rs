//! Ready-made set-ups over the simulator, for this crate's tests, the
//! end-to-end suite and the demo: a running [`PveSim`] with nodes and a
//! template, a matching [`ProxmoxConfig`], a [`ProxmoxBackend`] and the
//! [`ProxmoxProvisioner`] of its pool; the fixture also implements the
//! conformance [`Harness`] (over the backend).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use grs_provisioner::Provisioner;
use grs_provisioner::conformance::{Harness, HarnessError};
use secrecy::SecretString;

use crate::backend::ProxmoxBackend;
use crate::config::{NodeConfig, ProxmoxConfig, ProxmoxPoolConfig};
use crate::provisioner::ProxmoxProvisioner;
use crate::sim::{PveSim, SimOptions};

/// The template every fixture has.
pub const TEMPLATE_VMID: u32 = 9000;
/// The shared storage the template of a multi-node fixture is on.
pub const SHARED_STORAGE: &str = "ceph-rbd";
/// The pool name of the fixture's provisioner.
pub const POOL: &str = "linux";
/// The installation id of the fixture's provisioner.
pub const INSTALLATION: &str = "grs-test";
/// The instance prefix.
pub const PREFIX: &str = "grs-conf";

/// One node of a fixture.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// Memory, GiB.
    pub mem_gib: u64,
    /// Per-node instance maximum.
    pub max_instances: Option<u32>,
}

impl NodeSpec {
    /// A node with `mem_gib` GiB and an optional maximum.
    pub fn new(name: &str, mem_gib: u64, max_instances: Option<u32>) -> Self {
        Self {
            name: name.into(),
            mem_gib,
            max_instances,
        }
    }
}

/// A simulator with nodes and a template, and a provisioner for it.
#[derive(Debug)]
pub struct SimFixture {
    /// The simulator.
    pub sim: PveSim,
    /// The connection config pointing at it (TLS pinned when the sim uses TLS).
    pub conn: ProxmoxConfig,
    /// The pool config (template on the first node).
    pub pool: ProxmoxPoolConfig,
    /// The backend (the `Provisioner` trait), with pool [`POOL`] configured.
    pub backend: Arc<ProxmoxBackend>,
    /// Pool [`POOL`]'s provisioner (the backend's).
    pub provisioner: Arc<ProxmoxProvisioner>,
}

/// A connection config for `sim` with test-friendly timings.
pub fn conn_config(sim: &PveSim) -> ProxmoxConfig {
    let mut c = ProxmoxConfig::new(sim.url(), sim.token_id());
    c.token_secret = Some(SecretString::from(sim.token_secret().to_owned()));
    c.fingerprint = sim.fingerprint();
    c.connect_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(10);
    c.task_timeout = Duration::from_secs(60);
    c.retry_base_delay = Duration::from_millis(20);
    c.retry_max_delay = Duration::from_millis(400);
    c.task_poll_min = Duration::from_millis(10);
    c.task_poll_max = Duration::from_millis(50);
    for d in c.task_expected.values_mut() {
        *d = Duration::from_millis(20);
    }
    c
}

impl SimFixture {
    /// Starts a simulator with `nodes` (the template lives on the first)
    /// and makes a provisioner with its defaults.
    pub async fn start(opts: SimOptions, nodes: &[NodeSpec]) -> Self {
        let sim = PveSim::start(opts).await.expect("simulator starts");
        for n in nodes {
            sim.add_node(&n.name, n.mem_gib);
        }
        // Clones to other nodes need the template on shared storage (PVE
        // refuses them otherwise), as a real multi-node set-up has it.
        if nodes.len() > 1 {
            sim.add_storage(SHARED_STORAGE, true, "rbd");
            sim.add_template_on(
                &nodes[0].name,
                TEMPLATE_VMID,
                "runner-template",
                SHARED_STORAGE,
            );
        } else {
            sim.add_template(&nodes[0].name, TEMPLATE_VMID, "runner-template");
        }
        let mut conn = conn_config(&sim);
        if nodes.len() > 1 || nodes.iter().any(|n| n.max_instances.is_some()) {
            conn.nodes = nodes
                .iter()
                .map(|n| NodeConfig {
                    name: n.name.clone(),
                    max_instances: n.max_instances,
                    reserved_memory_mib: 1024,
                })
                .collect();
        }
        let mut pool = ProxmoxPoolConfig::new(&nodes[0].name, TEMPLATE_VMID);
        pool.agent_timeout = Duration::from_secs(20);
        let backend = Arc::new(
            ProxmoxBackend::new(&conn, INSTALLATION, PREFIX).expect("fixture config is valid"),
        );
        let provisioner = backend
            .add_pool(POOL, &pool)
            .expect("fixture pool config is valid");
        Self {
            sim,
            conn,
            pool,
            backend,
            provisioner,
        }
    }

    /// A one-node fixture (`pve1`, 64 GiB) with fast tasks over TLS.
    pub async fn single_node() -> Self {
        let opts = SimOptions {
            tls: true,
            durations: crate::sim::TaskDurations::fast(),
            ..SimOptions::default()
        };
        Self::start(opts, &[NodeSpec::new("pve1", 64, None)]).await
    }

    /// A two-node fixture (`pve1`, `pve2`: 64 GiB, at most 10 VMs each)
    /// with fast tasks over TLS and `opts`' other settings: what the
    /// whole-life-cycle request checks (schema, privileges) run on.
    pub async fn two_nodes(opts: SimOptions) -> Self {
        let opts = SimOptions {
            tls: true,
            durations: crate::sim::TaskDurations::fast(),
            ..opts
        };
        Self::start(
            opts,
            &[
                NodeSpec::new("pve1", 64, Some(10)),
                NodeSpec::new("pve2", 64, Some(10)),
            ],
        )
        .await
    }

    /// Another provisioner on the same simulator with a different pool
    /// config (the connection, hence client and placement, is shared).
    pub fn provisioner_with(&self, pool: &ProxmoxPoolConfig) -> Arc<ProxmoxProvisioner> {
        Arc::new(
            self.provisioner
                .sibling(POOL, pool)
                .expect("pool config is valid"),
        )
    }
}

#[async_trait]
impl Harness for SimFixture {
    fn provisioner(&self) -> Arc<dyn Provisioner> {
        self.backend.clone()
    }

    fn pool(&self) -> String {
        POOL.into()
    }

    async fn create_foreign(&self, name: &str) -> Result<(), HarnessError> {
        let vmid = 5000 + self.sim.vms().len() as u32;
        self.sim.add_vm(&self.pool.node, vmid, name, false);
        Ok(())
    }

    async fn exists_at_all(&self, name: &str) -> Result<bool, HarnessError> {
        Ok(!self.sim.vms_named(name).is_empty())
    }
}
