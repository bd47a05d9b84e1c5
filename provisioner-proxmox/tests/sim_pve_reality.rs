//! Proxmox VE as it really behaves, where GRS's first idea of it was wrong:
//! clones inherit the template's options, locks fail inside tasks, error
//! text lives in the status line on older releases, cross-node clones need
//! shared storage, destroy lists every storage. Each test names the real
//! source the simulator follows (see `sim.rs`) and went red against the
//! provisioner before its fix.

use grs_provisioner::conformance::spec;
use grs_provisioner::{Bootstrap, InstanceState, ProvisionerError};
use grs_provisioner_proxmox::provisioner::Marker;
use grs_provisioner_proxmox::sim::{Fault, PveVersion, SimOptions, TaskDurations};
use grs_provisioner_proxmox::testing::{self, NodeSpec, POOL, SimFixture, TEMPLATE_VMID};
use secrecy::SecretString;

/// A one-node fixture over plain HTTP with fast tasks, answering as `v`.
async fn fixture(v: PveVersion) -> SimFixture {
    let opts = SimOptions {
        durations: TaskDurations::fast(),
        version: v,
        ..SimOptions::default()
    };
    SimFixture::start(opts, &[NodeSpec::new("pve1", 64, None)]).await
}

/// A spec with a cloud-init seed (the conformance `spec` has none).
fn seeded(name: &str, job: u64) -> grs_provisioner::InstanceSpec {
    let mut s = spec(POOL, name, job);
    s.bootstrap = Bootstrap::CloudInit {
        seed_url: SecretString::from(format!("http://gw.example/cloud-init/tok-{job}/")),
    };
    s
}

fn has_tag(tags: &str, t: &str) -> bool {
    tags.split(';').any(|x| x == t)
}

/// The SMBIOS serial of a VM's config, if any.
fn serial(f: &SimFixture, vmid: u32) -> Option<String> {
    f.sim.vm(vmid)?.smbios_serial().map(str::to_owned)
}

// ---------------------------------------------------------------- item 2

/// qemu-server `clone_vm` copies `protection` and `tags`; `destroy_vm`
/// refuses a protected VM (`check_protection`). A protected template is
/// common advice: its clones must still be deletable.
#[tokio::test]
async fn a_protected_tagged_template_does_not_make_its_clones_undeletable() {
    let f = fixture(PveVersion::V9_1).await;
    f.sim.set_vm_config(TEMPLATE_VMID, "protection", "1");
    f.sim.set_vm_config(TEMPLATE_VMID, "tags", "debian;runner");
    let inst = f
        .provisioner
        .create(&seeded("grs-conf-40", 40))
        .await
        .unwrap();
    let vm = f.sim.vms_named("grs-conf-40")[0].clone();
    assert_eq!(inst.state, InstanceState::Running);
    f.provisioner.delete("grs-conf-40").await.unwrap();
    assert!(
        f.sim.vms_named("grs-conf-40").is_empty(),
        "the clone is gone"
    );
    let tags = &vm.config["tags"];
    assert!(!has_tag(tags, "debian"), "inherited tags replaced: {tags}");
    assert!(has_tag(tags, &format!("grs-v-{}", vm.vmid)), "{tags}");
    assert_eq!(
        f.sim.vm(TEMPLATE_VMID).unwrap().config["protection"],
        "1",
        "the template keeps its protection"
    );
}

/// A clone that finished but was never configured (crash, cancel, a clone
/// request that timed out), made from a template that carries tags (here
/// even GRS's own ones: a template made from a GRS VM), and a protection.
/// It must not be taken as "ours, configured, stopped" and started without
/// its seed; it is replaced, and the new VM starts only configured.
#[tokio::test]
async fn a_clone_never_configured_is_replaced_not_started_whatever_tags_it_inherited() {
    for inherited in [
        "debian;runner",
        "grs;grs-i-grs-test;grs-p-linux;grs-j-1;grs-t-1",
    ] {
        let f = fixture(PveVersion::V9_1).await;
        let marker = Marker {
            installation: testing::INSTALLATION.into(),
            pool: POOL.into(),
            job: 41,
            created: 1_700_000_000,
        };
        f.sim.add_vm("pve1", 4100, "grs-conf-41", false);
        f.sim.set_vm_config(4100, "tags", inherited);
        f.sim.set_vm_config(4100, "protection", "1");
        f.sim
            .set_vm_config(4100, "description", &marker.description());
        let seen = f.provisioner.get("grs-conf-41").await.unwrap().unwrap();
        assert_eq!(seen.state, InstanceState::Creating, "{inherited}: {seen:?}");
        assert_eq!(
            seen.job_id,
            Some(41),
            "{inherited}: the marker's job, not a tag's"
        );
        f.provisioner
            .create(&seeded("grs-conf-41", 41))
            .await
            .unwrap();
        let vms = f.sim.vms_named("grs-conf-41");
        assert_eq!(vms.len(), 1, "{inherited}");
        assert!(vms[0].running, "{inherited}");
        assert!(
            serial(&f, vms[0].vmid).is_some(),
            "{inherited}: VM {} runs without its cloud-init seed",
            vms[0].vmid
        );
        f.provisioner.delete("grs-conf-41").await.unwrap();
        assert!(f.sim.vms_named("grs-conf-41").is_empty());
    }
}

// ---------------------------------------------------------------- item 3

/// qemu-server `clone_vm` takes the template's lock in the worker
/// (`lock_config_shared`, 1 s) and pve-storage the storage's cluster lock
/// (`cluster_lock_storage`): both fail the TASK, not the HTTP call.
#[tokio::test]
async fn lock_timeouts_inside_the_clone_task_are_retried() {
    let f = fixture(PveVersion::V9_1).await;
    f.sim.inject(Fault::CloneLockTimeout { times: 2 });
    f.sim.inject(Fault::CloneStorageLockTimeout { times: 1 });
    f.provisioner
        .create(&spec(POOL, "grs-conf-42", 42))
        .await
        .unwrap();
    assert_eq!(
        f.sim.task_count("qmclone"),
        4,
        "three failed tasks, one good"
    );
    assert_eq!(f.sim.vms_named("grs-conf-42").len(), 1);
    assert!(f.sim.vms_named("grs-conf-42")[0].running);
}

/// A backup of the template holds `lock: backup` for its whole run;
/// `clone_vm`'s `$load_and_check` refuses synchronously (`VM is locked
/// (backup)`, pve-guest-common `check_lock`): transient, never permanent.
#[tokio::test]
async fn a_template_under_backup_is_a_transient_failure() {
    for v in PveVersion::ALL {
        let f = fixture(v).await;
        f.sim.set_lock(TEMPLATE_VMID, Some("backup"));
        let e = f
            .provisioner
            .create(&spec(POOL, "grs-conf-43", 43))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProvisionerError::Transient(m) if m.contains("VM is locked (backup)")),
            "{v:?}: {e:?}"
        );
        f.sim.set_lock(TEMPLATE_VMID, None);
        f.provisioner
            .create(&spec(POOL, "grs-conf-43", 43))
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------- item 4

/// PVE 7.4 and 8.0-8.3 put the error text only in the status line's reason
/// phrase (`{"data":null}` body); 8.4+ also in `message`. Either way a
/// missing VM, a taken id and a running VM are told apart.
#[tokio::test]
async fn error_text_is_read_from_the_reason_phrase_on_every_version() {
    for v in PveVersion::ALL {
        let f = fixture(v).await;
        let c = f.provisioner.client();
        let e = c.vm_config("pve1", 777).await.unwrap_err();
        assert!(e.is_vm_missing(), "{v:?}: {e}");
        assert!(
            e.to_string().contains("777.conf' does not exist"),
            "{v:?}: {e}"
        );
        // A parameter error keeps its per-parameter text too.
        let e = c
            .set_config(
                "pve1",
                TEMPLATE_VMID,
                &[grs_provisioner_proxmox::client::Param::new("cores", "many")],
            )
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("Parameter verification failed."),
            "{v:?}: {text}"
        );
        assert!(text.contains("cores:"), "{v:?}: {text}");
    }
}

/// Key scenarios against each release: a create/delete cycle, a VM that
/// vanished between listing and deleting, and a running VM's destroy
/// refusal read from the error text.
#[tokio::test]
async fn key_scenarios_pass_against_every_version() {
    for v in PveVersion::ALL {
        let f = fixture(v).await;
        f.provisioner.validate().await.unwrap();
        let inst = f
            .provisioner
            .create(&spec(POOL, "grs-conf-44", 44))
            .await
            .unwrap();
        assert_eq!(inst.state, InstanceState::Running, "{v:?}");
        f.provisioner.delete("grs-conf-44").await.unwrap();
        assert!(f.sim.vms_named("grs-conf-44").is_empty(), "{v:?}");
        f.sim.inject(Fault::CloneLockTimeout { times: 1 });
        f.provisioner
            .create(&spec(POOL, "grs-conf-45", 45))
            .await
            .unwrap();
        // The VM goes away behind GRS's back between listing and destroy:
        // PVE's "does not exist" must read as "already gone".
        let vmid = f.sim.vms_named("grs-conf-45")[0].vmid;
        f.sim.inject(Fault::HttpError {
            path_contains: format!("/qemu/{vmid}"),
            method: Some("DELETE".into()),
            status: 500,
            message: format!(
                "Configuration file 'nodes/pve1/qemu-server/{vmid}.conf' does not exist"
            ),
            times: 1,
        });
        f.provisioner.delete("grs-conf-45").await.unwrap();
    }
}

// ---------------------------------------------------------------- item 6

/// Three nodes, the template on the node-local `local-lvm`.
async fn local_storage_cluster(target: Option<&str>, nodes: &[&str]) -> SimFixture {
    let opts = SimOptions {
        durations: TaskDurations::fast(),
        ..SimOptions::default()
    };
    let specs: Vec<NodeSpec> = ["pve1", "pve2", "pve3"]
        .iter()
        .map(|n| NodeSpec::new(n, 64, None))
        .collect();
    let mut f = SimFixture::start(opts, &specs).await;
    // Replace the fixture's shared-storage template by a local one.
    f.sim.add_template("pve1", TEMPLATE_VMID, "runner-template");
    f.conn.nodes.retain(|n| nodes.contains(&n.name.as_str()));
    f.pool.target_node = target.map(Into::into);
    f.provisioner = std::sync::Arc::new(
        grs_provisioner_proxmox::ProxmoxProvisioner::new(
            &f.conn,
            POOL,
            &f.pool,
            testing::INSTALLATION,
            testing::PREFIX,
        )
        .unwrap(),
    );
    f
}

/// qemu-server `clone_vm`: `can't clone VM to node 'X' (VM uses local
/// storage)`. Placement must only pick nodes the template can reach.
#[tokio::test]
async fn a_template_on_local_storage_is_only_cloned_on_its_own_node() {
    let f = local_storage_cluster(None, &["pve1", "pve2", "pve3"]).await;
    f.provisioner.validate().await.unwrap();
    for i in 0..6 {
        f.provisioner
            .create(&spec(POOL, &format!("grs-conf-l{i}"), i))
            .await
            .unwrap();
    }
    for vm in f.sim.vms().iter().filter(|v| !v.template) {
        assert_eq!(vm.node, "pve1", "VM {} placed on {}", vm.vmid, vm.node);
    }
}

/// A config that cannot work (only other nodes than the template's, its
/// disk on local storage) is refused at start-up, naming the storage.
#[tokio::test]
async fn a_config_that_needs_cross_node_clones_from_local_storage_is_refused() {
    for (target, nodes) in [
        (Some("pve2"), vec!["pve1", "pve2", "pve3"]),
        (None, vec!["pve2", "pve3"]),
    ] {
        let f = local_storage_cluster(target, &nodes).await;
        match f.provisioner.validate().await {
            Err(ProvisionerError::Config(m)) => {
                assert!(m.contains("'local-lvm'"), "{m}");
                assert!(m.contains("not shared"), "{m}");
                assert!(m.contains("pve2"), "{m}");
            }
            other => panic!("{target:?} {nodes:?}: validate returned {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- item 7

/// `destroy-unreferenced-disks=1` makes PVE list every storage after the
/// VM's own disks are freed (qemu-server `destroy_vm` -> pve-storage
/// `vdisk_list`); one offline share fails the task and leaves the config.
/// GRS's teardown must not depend on unrelated storages.
#[tokio::test]
async fn delete_does_not_depend_on_an_unrelated_offline_storage() {
    let f = fixture(PveVersion::V9_1).await;
    f.sim.add_storage("nfs-isos", true, "nfs");
    f.provisioner
        .create(&spec(POOL, "grs-conf-46", 46))
        .await
        .unwrap();
    f.sim.set_storage_online("nfs-isos", false);
    f.provisioner.delete("grs-conf-46").await.unwrap();
    assert!(f.sim.vms_named("grs-conf-46").is_empty());
}

/// A destroy that died half-way (disks freed, config left: what the
/// offline storage did to earlier GRS) is finished by the next delete.
#[tokio::test]
async fn a_half_done_destroy_is_finished_by_the_next_delete() {
    let f = fixture(PveVersion::V9_1).await;
    f.provisioner
        .create(&spec(POOL, "grs-conf-47", 47))
        .await
        .unwrap();
    let vmid = f.sim.vms_named("grs-conf-47")[0].vmid;
    f.sim.inject(Fault::FailTask {
        kind: "qmdestroy".into(),
        times: 1,
        message: "storage 'nfs-isos' is not online".into(),
    });
    assert!(f.provisioner.delete("grs-conf-47").await.is_err());
    assert!(f.sim.vm(vmid).is_some(), "the config is left behind");
    f.provisioner.delete("grs-conf-47").await.unwrap();
    assert!(f.sim.vm(vmid).is_none());
}

// ------------------------------------------------- issue 12: what serializes

/// pve-storage `vdisk_clone` creates a linked clone's volume inside
/// `cluster_lock_storage` (a node-local file lock for local storage, 10 s
/// timeout: pve-common `lock_file_full`); qemu-server `clone_vm` takes the
/// stopped template's config lock only shared. So clones of one template on
/// local storage serialize for that part of their run, and a clone that
/// waits too long for the lock fails its task and leaves nothing.
#[tokio::test]
async fn clones_serialize_on_their_storage_lock_and_time_out_on_it() {
    let opts = SimOptions {
        durations: TaskDurations::fast(),
        storage_lock_timeout: std::time::Duration::from_millis(60),
        ..SimOptions::default()
    };
    let f = SimFixture::start(opts, &[NodeSpec::new("pve1", 64, None)]).await;
    let hold = f.sim.storage_lock_hold();
    assert_eq!(hold, TaskDurations::fast().linked_clone / 4);
    let c = f.provisioner.client();
    let t = std::time::Instant::now();
    let tasks = futures::future::join_all((0..12u32).map(|i| async move {
        let upid = c
            .clone_vm(
                "pve1",
                TEMPLATE_VMID,
                &[
                    grs_provisioner_proxmox::client::Param::new("newid", 200 + i),
                    grs_provisioner_proxmox::client::Param::new("name", format!("c{i}")),
                ],
            )
            .await
            .unwrap();
        c.wait_task(&upid).await
    }))
    .await;
    let failed: Vec<String> = tasks
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    // 12 clones hold the lock one after the other for `hold` each: those
    // that would wait longer than the 60 ms timeout fail.
    assert!(!failed.is_empty(), "no clone timed out on the lock");
    for e in &failed {
        assert!(
            e.contains("clone failed: can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"),
            "{e}"
        );
    }
    let ok = tasks.len() - failed.len();
    assert!(ok >= 3, "only {ok} clones got the lock");
    assert!(
        t.elapsed() >= hold * ok as u32,
        "{ok} clones done in {:?}, faster than their locked parts ({hold:?} each) allow",
        t.elapsed()
    );
    // A failed clone leaves no VM behind.
    assert_eq!(f.sim.vms().len(), 1 + ok);
}

/// pve-storage `vdisk_free` frees a volume inside the same
/// `cluster_lock_storage` a clone creates its volume in: a destroy waits
/// for a clone holding its storage's lock, and fails its task when the
/// wait outlasts the lock's timeout, leaving the VM whole.
#[tokio::test]
async fn a_destroy_frees_its_volume_inside_the_storage_lock_clones_take() {
    let opts = SimOptions {
        durations: TaskDurations {
            // The clone holds the lock for a quarter: 100 ms, well past the
            // destroy's 60 ms wait.
            linked_clone: std::time::Duration::from_millis(400),
            ..TaskDurations::fast()
        },
        storage_lock_timeout: std::time::Duration::from_millis(60),
        ..SimOptions::default()
    };
    let f = SimFixture::start(opts, &[NodeSpec::new("pve1", 64, None)]).await;
    assert!(f.sim.destroy_storage_lock_hold() > std::time::Duration::ZERO);
    let c = f.provisioner.client();
    let clone = |newid: u32| async move {
        c.clone_vm(
            "pve1",
            TEMPLATE_VMID,
            &[
                grs_provisioner_proxmox::client::Param::new("newid", newid),
                grs_provisioner_proxmox::client::Param::new("name", format!("c{newid}")),
            ],
        )
        .await
        .unwrap()
    };
    let first = clone(300).await;
    c.wait_task(&first).await.unwrap();
    // A clone takes the lock; the destroy sent just after waits for it.
    let holding = clone(301).await;
    let destroy = c.destroy("pve1", 300).await.unwrap();
    let e = c
        .wait_task(&destroy)
        .await
        .expect_err("the destroy waited 60 ms for a lock held 100 ms")
        .to_string();
    assert!(
        e.contains("can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"),
        "{e}"
    );
    assert!(
        f.sim.vm(300).is_some(),
        "a destroy that never got the lock freed nothing"
    );
    c.wait_task(&holding).await.unwrap();
    // With the lock free, the same destroy goes through.
    let destroy = c.destroy("pve1", 300).await.unwrap();
    c.wait_task(&destroy).await.unwrap();
    assert!(f.sim.vm(300).is_none());
}

/// With a storage lock that times out quickly, a burst of creates on one
/// template still succeeds without clone tasks failing on the lock: the
/// provisioner keeps only as many clones in flight as keep the lock busy
/// (before it, all 24 clones were sent at once and most timed out).
#[tokio::test]
async fn a_burst_sends_only_as_many_clones_as_the_storage_lock_can_take() {
    let opts = SimOptions {
        durations: TaskDurations::fast(),
        storage_lock_timeout: std::time::Duration::from_millis(100),
        ..SimOptions::default()
    };
    let f = SimFixture::start(opts, &[NodeSpec::new("pve1", 128, None)]).await;
    let results = futures::future::join_all((0..24u64).map(|i| {
        let p = f.provisioner.clone();
        async move { p.create(&spec(POOL, &format!("grs-conf-u{i}"), i)).await }
    }))
    .await;
    for r in results {
        r.unwrap();
    }
    let failed = f.sim.task_count("qmclone") - 24;
    assert!(
        failed <= 2,
        "{failed} clone tasks failed on the storage lock"
    );
    let limit = f.provisioner.clone_concurrency();
    assert!(
        (2..=12).contains(&limit),
        "learned clone concurrency {limit}"
    );
}

/// `template_replicas`: a node with its own copy of the template clones
/// from it locally, so a template on local storage serves every node (PVE
/// refuses cross-node clones from local storage) and each node's clones
/// take their own node's storage lock.
#[tokio::test]
async fn template_replicas_clone_on_each_node_from_its_own_copy() {
    let mut f = local_storage_cluster(None, &["pve1", "pve2", "pve3"]).await;
    f.sim.add_template("pve2", 9001, "runner-template");
    f.sim.add_template("pve3", 9002, "runner-template");
    for n in f.conn.nodes.iter_mut() {
        n.max_instances = Some(2);
    }
    let mut pool = f.pool.clone();
    pool.template_replicas = [("pve2".to_owned(), 9001), ("pve3".to_owned(), 9002)].into();
    let p = grs_provisioner_proxmox::ProxmoxProvisioner::new(
        &f.conn,
        POOL,
        &pool,
        testing::INSTALLATION,
        testing::PREFIX,
    )
    .unwrap();
    p.validate().await.unwrap();
    let log = p.client().record_requests();
    for i in 0..6 {
        p.create(&spec(POOL, &format!("grs-conf-r{i}"), i))
            .await
            .unwrap();
    }
    let peak = f.sim.peak_vms_per_node();
    for n in ["pve1", "pve2", "pve3"] {
        assert_eq!(peak.get(n), Some(&2), "{peak:?}");
    }
    let clones: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.ends_with("/clone"))
        .cloned()
        .collect();
    assert_eq!(clones.len(), 6);
    for r in &clones {
        assert!(
            !r.params.iter().any(|(k, _)| k == "target"),
            "a clone crossed nodes: {r:?}"
        );
        let from_copy = r.path == "/nodes/pve2/qemu/9001/clone"
            || r.path == "/nodes/pve3/qemu/9002/clone"
            || r.path == "/nodes/pve1/qemu/9000/clone";
        assert!(from_copy, "{}", r.path);
    }
    // A copy that is not a template is refused by validate, naming the key.
    f.sim.add_vm("pve3", 9003, "plain", false);
    pool.template_replicas.insert("pve3".into(), 9003);
    let e = f.provisioner_with(&pool).validate().await.unwrap_err();
    assert!(
        e.to_string()
            .contains("pools.linux.proxmox.template_replicas.pve3"),
        "{e}"
    );
}
