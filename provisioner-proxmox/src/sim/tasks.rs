//! The handlers that run as PVE tasks: clone, start, stop, destroy; and the
//! task status and log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::api::{Fail, HResult, find, flag, locked, one, vmid_of};
use super::state::{Shared, SimState, SimTask, SimVm};

/// A storage lock a task takes for part of its run (pve-storage
/// `cluster_lock_storage`, see [`SimOptions::storage_lock_share`]).
pub(super) struct StorageLock {
    lock: Arc<Semaphore>,
    /// How long the task holds it (from the start of its run).
    hold: Duration,
    /// Longest wait for it; then `timeout_error` is the task's failure.
    timeout: Duration,
    timeout_error: String,
}

/// The storage lock a task run by a worker on `node` takes to create or
/// free a volume on `storage`: per node for local storage, cluster-wide for
/// shared; held `hold` (see [`SimOptions::storage_lock_share`]).
fn storage_lock(
    sh: &Shared,
    node: &str,
    storage: &str,
    shared: bool,
    hold: Duration,
) -> StorageLock {
    let (name, timeout_error) = if shared {
        (
            format!("cfs:storage-{storage}"),
            format!("cfs-lock 'storage-{storage}' error: got lock request timeout"),
        )
    } else {
        let file = format!("/var/lock/pve-manager/pve-storage-{storage}");
        (
            format!("{node}:{file}"),
            format!("can't lock file '{file}' - got timeout"),
        )
    };
    let lock = sh
        .storage_locks
        .lock()
        .unwrap()
        .entry(name)
        .or_insert_with(|| Arc::new(Semaphore::new(1)))
        .clone();
    StorageLock {
        lock,
        hold,
        timeout: sh.opts.storage_lock_timeout,
        timeout_error,
    }
}

/// How long a task of duration `task` holds its storage's lock.
pub(super) fn lock_hold(sh: &Shared, task: Duration) -> Duration {
    task.mul_f64(sh.opts.storage_lock_share.clamp(0.0, 1.0))
}

/// Registers a task and runs `body` after `dur` (plus injected slowness);
/// `body` returns the exit status (`Ok` for OK), and gets the injected
/// failure, if any. With a storage lock, the first `hold` of `dur` is spent
/// holding it (after waiting for it); not had within its timeout, the task
/// fails with the lock's error after the 1 s `$clonefn`'s error path sleeps.
/// The arguments are the UPID's fields plus timing; a struct for them would
/// only rename them.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_task<F>(
    sh: &Arc<Shared>,
    node: &str,
    kind: &str,
    id: u32,
    user: &str,
    dur: Duration,
    storage_lock: Option<StorageLock>,
    body: F,
) -> String
where
    F: FnOnce(&mut SimState, Option<String>) -> Result<(), String> + Send + 'static,
{
    let (upid, injected, slow) = {
        let mut s = sh.state.lock().unwrap();
        s.pid += 1;
        let pid = s.pid + 100_000;
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let upid = format!(
            "UPID:{node}:{pid:08X}:{:08X}:{start:08X}:{kind}:{id}:{user}:",
            pid * 7
        );
        let injected = {
            let mut hit = None;
            for f in s.faults.fail_tasks.iter_mut() {
                if f.0 == kind && f.1 > 0 {
                    f.1 -= 1;
                    hit = Some(f.2.clone());
                    break;
                }
            }
            hit
        };
        let invisible = s.faults.invisible;
        s.tasks.insert(
            upid.clone(),
            SimTask {
                node: node.to_owned(),
                kind: kind.to_owned(),
                id: id.to_string(),
                user: user.to_owned(),
                starttime: start,
                pid,
                exitstatus: None,
                log: Vec::new(),
                invisible_polls: invisible,
                vmid: id,
                created: Instant::now(),
                ended: None,
            },
        );
        (upid, injected, s.faults.slow)
    };
    let sh2 = sh.clone();
    let u2 = upid.clone();
    tokio::spawn(async move {
        let mut injected = injected;
        let mut rest = dur + slow;
        if let Some(l) = storage_lock {
            match tokio::time::timeout(l.timeout, l.lock.acquire_owned()).await {
                Ok(Ok(_permit)) => {
                    tokio::time::sleep(l.hold).await;
                    rest = rest.saturating_sub(l.hold);
                }
                _ => {
                    injected = injected.or(Some(l.timeout_error));
                    rest = Duration::from_secs(1);
                }
            }
        }
        tokio::time::sleep(rest).await;
        let mut s = sh2.state.lock().unwrap();
        let r = body(&mut s, injected);
        s.note_peaks();
        if let Some(t) = s.tasks.get_mut(&u2) {
            t.ended = Some(Instant::now());
            match r {
                Ok(()) => {
                    t.log.push("TASK OK".into());
                    t.exitstatus = Some("OK".into());
                }
                Err(m) => {
                    t.log.push(m.clone());
                    t.log.push(format!("TASK ERROR: {m}"));
                    t.exitstatus = Some(m);
                }
            }
        }
    });
    upid
}

/// Options `clone_vm` does not copy from the source (qemu-server
/// `src/PVE/API2/Qemu.pm`, `clone_vm`, `$load_and_check`: "do not copy
/// snapshot related info", `unusedN`; `template` is deleted in `$clonefn`).
/// EVERYTHING else is copied: `protection`, `tags`, `description` (unless the
/// request names one), `smbios1` (with a new uuid), `onboot`, `hookscript`, ...
pub(super) const CLONE_SKIPPED: [&str; 9] = [
    "snapshots",
    "parent",
    "snaptime",
    "vmstate",
    "snapstate",
    "runningcpu",
    "runningmachine",
    "running-nets-host-mtu",
    "template",
];

/// The disks of a config: (key, storage id). CD-ROMs and `none` are not
/// disks (`drive_is_cdrom`).
pub(super) fn disks(config: &BTreeMap<String, String>) -> Vec<(String, String)> {
    config
        .iter()
        .filter(|(k, v)| {
            let bus = k.trim_end_matches(|c: char| c.is_ascii_digit());
            (matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus.len() < k.len()
                || matches!(k.as_str(), "efidisk0" | "tpmstate0"))
                // `drive_is_cdrom($drive, 1)`: a cloud-init drive is cloned.
                && (!v.contains("media=cdrom") || v.contains("cloudinit"))
                && !v.starts_with("none")
        })
        .filter_map(|(k, v)| {
            v.split_once(':')
                .map(|(sid, _)| (k.clone(), sid.to_owned()))
        })
        .collect()
}

/// Replaces the `uuid=` of an `smbios1` value (`$clonefn`: "auto generate a
/// new uuid"), keeping the rest (a template's `serial` survives).
pub(super) fn new_smbios_uuid(old: Option<&String>, vmid: u32) -> String {
    let mut parts: Vec<String> = old
        .map(|o| {
            o.split(',')
                .filter(|p| !p.starts_with("uuid="))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    parts.insert(0, format!("uuid=00000000-0000-4000-8000-{vmid:012}"));
    parts.join(",")
}

/// `POST .../clone`, after qemu-server `PVE/API2/Qemu.pm` `clone_vm`:
/// - synchronously (`$load_and_check` runs before `fork_worker`): the pool,
///   the target node, `storage` (shared when there is a target: `can't clone
///   to non-shared storage`), the source's config lock (`check_lock`: `VM is
///   locked (backup)` during a backup), linked vs full, local storage with a
///   target (`can't clone VM to node 'X' (VM uses local storage)`), the new
///   id;
/// - in the worker: the source's config lock (`lock_config_shared`, 1 s:
///   `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`,
///   a FAILED TASK, nothing made), then the new VM (`lock: clone`) and its
///   disks; a storage lock failing there (`cfs-lock 'storage-X' error: got
///   lock request timeout`, pve-storage `cluster_lock_storage`) ends the task
///   with `clone failed: ...` after removing the new VM.
pub(super) fn clone_vm(
    sh: &Arc<Shared>,
    node: &str,
    p: &HashMap<String, Vec<String>>,
    user: &str,
) -> HResult {
    let src = vmid_of(p);
    let newid: u32 = one(p, "newid").and_then(|v| v.parse().ok()).unwrap_or(0);
    let target = one(p, "target").filter(|t| *t != node).map(str::to_owned);
    let (full, dur, in_task, lock_storage) = {
        let mut s = sh.state.lock().unwrap();
        if let Some(pool) = one(p, "pool")
            && !s.resource_pools.contains(pool)
        {
            return Err(Fail::e500(format!("pool '{pool}' does not exist")));
        }
        if let Some(t) = &target {
            match s.nodes.get(t) {
                None => return Err(Fail::e500(format!("no such cluster node '{t}'"))),
                Some(n) if !n.online => {
                    return Err(Fail::e500(format!("target node '{t}' is not online")));
                }
                _ => {}
            }
        }
        if let Some(sid) = one(p, "storage") {
            let Some(st) = s.storages.get(sid) else {
                return Err(Fail::e500(format!("storage '{sid}' does not exist")));
            };
            if target.is_some() && !st.shared {
                return Err(Fail::e500(format!(
                    "can't clone to non-shared storage '{sid}'"
                )));
            }
        }
        let source = find(&mut s, node, src)?.clone();
        locked(&source)?;
        let full = flag(p, "full").unwrap_or(!source.template);
        if one(p, "storage").is_some() && !full {
            return Err(Fail::e500(
                "parameter 'storage' not allowed for linked clones",
            ));
        }
        if !full && !source.template {
            return Err(Fail::e500(
                "Linked clone feature is not supported for drive 'scsi0'",
            ));
        }
        let source_disks = disks(&source.config);
        let shared_vm = source_disks
            .iter()
            .all(|(_, sid)| s.storages.get(sid).is_some_and(|st| st.shared));
        if let Some(t) = &target
            && !shared_vm
        {
            return Err(Fail::e500(format!(
                "can't clone VM to node '{t}' (VM uses local storage)"
            )));
        }
        if s.vms.contains_key(&newid) {
            return Err(Fail::e500(format!(
                "unable to create VM {newid}: config file already exists"
            )));
        }
        let d = &sh.opts.durations;
        let dur = if full { d.full_clone } else { d.linked_clone };
        // The source's lock is taken in the worker: its timeout fails the
        // task, and no VM is made.
        let contention = s.faults.clone_contention;
        if s.faults.clone_lock_timeouts > 0
            || (contention > 0.0 && rand::rng().random_bool(contention.min(1.0)))
        {
            s.faults.clone_lock_timeouts = s.faults.clone_lock_timeouts.saturating_sub(1);
            let msg =
                format!("can't lock file '/var/lock/qemu-server/lock-{src}.conf' - got timeout");
            drop(s);
            let upid = spawn_task(
                sh,
                node,
                "qmclone",
                src,
                user,
                dur / 4,
                None,
                move |_, _| Err(msg),
            );
            return Ok(json!(upid));
        }
        let storage_lock = if s.faults.clone_storage_lock_timeouts > 0 {
            s.faults.clone_storage_lock_timeouts -= 1;
            let sid = one(p, "storage")
                .map(str::to_owned)
                .or_else(|| source_disks.first().map(|(_, sid)| sid.clone()))
                .unwrap_or_else(|| "local-lvm".into());
            Some(format!(
                "clone failed: cfs-lock 'storage-{sid}' error: got lock request timeout"
            ))
        } else {
            None
        };
        let mut config: BTreeMap<String, String> = source
            .config
            .iter()
            .filter(|(k, _)| !CLONE_SKIPPED.contains(&k.as_str()) && !k.starts_with("unused"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        config.insert(
            "name".into(),
            one(p, "name")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("Copy-of-VM-{}", source.name())),
        );
        // `if ($param->{description})`: an empty one keeps the source's.
        if let Some(d) = one(p, "description").filter(|d| !d.is_empty()) {
            config.insert("description".into(), d.to_owned());
        }
        if let Some(pool) = one(p, "pool") {
            config.insert("pool".into(), pool.to_owned());
        }
        let smbios = new_smbios_uuid(config.get("smbios1"), newid);
        config.insert("smbios1".into(), smbios);
        for (i, (key, sid)) in source_disks.iter().enumerate() {
            let sid = if full {
                one(p, "storage").unwrap_or(sid)
            } else {
                sid
            };
            config.insert(key.clone(), format!("{sid}:vm-{newid}-disk-{i},size=8G"));
        }
        let vm = SimVm {
            vmid: newid,
            node: target.clone().unwrap_or_else(|| node.to_owned()),
            template: false,
            running: false,
            config,
            lock: Some("clone".into()),
            agent_ready_at: None,
            agent_files: Vec::new(),
            agent_execs: Vec::new(),
            disks_freed: false,
        };
        s.vms.insert(newid, vm);
        s.note_peaks();
        // `vdisk_clone` locks the source volume's storage; `vdisk_alloc`
        // (full clone) the target's.
        let sid = if full { one(p, "storage") } else { None }
            .map(str::to_owned)
            .or_else(|| source_disks.first().map(|(_, sid)| sid.clone()))
            .unwrap_or_else(|| "local-lvm".into());
        let shared = s.storages.get(&sid).is_some_and(|st| st.shared);
        (full, dur, storage_lock, (sid, shared))
    };
    let hold = lock_hold(sh, sh.opts.durations.linked_clone);
    let lock = storage_lock(sh, node, &lock_storage.0, lock_storage.1, hold);
    let upid = spawn_task(
        sh,
        node,
        "qmclone",
        src,
        user,
        dur,
        Some(lock),
        move |s, injected| {
            if let Some(m) = injected.map(|m| format!("clone failed: {m}")).or(in_task) {
                // `$clonefn` frees the new volumes and unlinks the config.
                s.vms.remove(&newid);
                return Err(m);
            }
            match s.vms.get_mut(&newid) {
                Some(vm) => {
                    vm.lock = None;
                    Ok(())
                }
                None => Err(format!("clone failed: VM {newid} vanished")),
            }
        },
    );
    let mut s = sh.state.lock().unwrap();
    if let Some(t) = s.tasks.get_mut(&upid) {
        t.vmid = newid;
        t.log.push(format!(
            "create {} clone of drive scsi0",
            if full { "full" } else { "linked" }
        ));
    }
    Ok(json!(upid))
}

pub(super) fn start_vm(sh: &Arc<Shared>, node: &str, vmid: u32, user: &str) -> HResult {
    {
        let mut s = sh.state.lock().unwrap();
        let vm = find(&mut s, node, vmid)?;
        if vm.template {
            return Err(Fail::e500("you can't start a vm if it's a template"));
        }
        locked(vm)?;
    }
    let dur = sh.opts.durations.start;
    let agent_after = sh.opts.durations.agent_ready;
    let node2 = node.to_owned();
    Ok(json!(spawn_task(
        sh,
        node,
        "qmstart",
        vmid,
        user,
        dur,
        None,
        move |s, injected| {
            if let Some(m) = injected {
                return Err(m);
            }
            let vm = find(s, &node2, vmid).map_err(|Fail(_, m)| m)?;
            if vm.running {
                return Err(format!("VM {vmid} already running"));
            }
            vm.running = true;
            vm.agent_ready_at = vm.agent_enabled().then(|| Instant::now() + agent_after);
            Ok(())
        }
    )))
}

pub(super) fn stop_vm(sh: &Arc<Shared>, node: &str, vmid: u32, user: &str) -> HResult {
    {
        let mut s = sh.state.lock().unwrap();
        let vm = find(&mut s, node, vmid)?;
        if vm.lock.as_deref() == Some("clone") {
            locked(vm)?;
        }
    }
    let dur = sh.opts.durations.stop;
    Ok(json!(spawn_task(
        sh,
        node,
        "qmstop",
        vmid,
        user,
        dur,
        None,
        move |s, injected| {
            if let Some(m) = injected {
                return Err(m);
            }
            if let Some(vm) = s.vms.get_mut(&vmid) {
                vm.running = false;
                vm.agent_ready_at = None;
            }
            Ok(())
        }
    )))
}

/// `DELETE .../qemu/{vmid}`, after qemu-server `PVE/API2/Qemu.pm`
/// `destroy_vm` and `PVE/QemuServer.pm` `destroy_vm`: `$early_checks`
/// (config exists, `check_protection`: `can't remove VM N - protection mode
/// enabled`, running: `VM N is running - destroy failed`) run before the
/// worker and again inside it; the worker then checks the config lock, frees
/// the VM's own disks and, with `destroy-unreferenced-disks=1`, lists every
/// storage (pve-storage `vdisk_list` -> `activate_storage_list`), which dies
/// on one that is offline (`storage 'X' is not online`) AFTER the own disks
/// are freed and BEFORE the config is removed: the VM stays, disks gone.
pub(super) fn destroy_vm(
    sh: &Arc<Shared>,
    node: &str,
    vmid: u32,
    user: &str,
    p: &HashMap<String, Vec<String>>,
) -> HResult {
    fn early_checks(s: &mut SimState, node: &str, vmid: u32) -> Result<(), Fail> {
        let vm = find(s, node, vmid)?;
        if vm.config.get("protection").is_some_and(|v| v == "1") {
            return Err(Fail::e500(format!(
                "can't remove VM {vmid} - protection mode enabled"
            )));
        }
        if vm.running {
            return Err(Fail::e500(format!("VM {vmid} is running - destroy failed")));
        }
        Ok(())
    }
    // `vdisk_free` frees each volume inside the storage's lock (pve-storage
    // `PVE/Storage.pm` `vdisk_free`: `cluster_lock_storage` around the
    // plugin's `free_image`), the lock clones take to create theirs: a
    // destroy and a clone on one storage wait for each other there.
    let lock = {
        let mut s = sh.state.lock().unwrap();
        early_checks(&mut s, node, vmid)?;
        let vm_disks = disks(&find(&mut s, node, vmid)?.config);
        vm_disks.into_iter().next().map(|(_, sid)| {
            let shared = s.storages.get(&sid).is_some_and(|st| st.shared);
            (sid, shared)
        })
    }
    .map(|(sid, shared)| {
        let hold = lock_hold(sh, sh.opts.durations.destroy);
        storage_lock(sh, node, &sid, shared, hold)
    });
    let unreferenced = flag(p, "destroy-unreferenced-disks").unwrap_or(false);
    let dur = sh.opts.durations.destroy;
    let node2 = node.to_owned();
    Ok(json!(spawn_task(
        sh,
        node,
        "qmdestroy",
        vmid,
        user,
        dur,
        lock,
        move |s, injected| {
            if let Some(m) = injected {
                return Err(m);
            }
            early_checks(s, &node2, vmid).map_err(|Fail(_, m)| m)?;
            let vm = find(s, &node2, vmid).map_err(|Fail(_, m)| m)?;
            locked(vm).map_err(|Fail(_, m)| m)?;
            vm.disks_freed = true;
            if unreferenced && let Some(off) = s.storages.values().find(|st| !st.online) {
                return Err(format!("storage '{}' is not online", off.id));
            }
            s.vms.remove(&vmid);
            Ok(())
        }
    )))
}

pub(super) fn task_status(sh: &Shared, node: &str, upid: &str) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let t = match s.tasks.get_mut(upid) {
        Some(t) if t.node == node => t,
        _ => return Err(Fail::e500(format!("unable to parse worker upid '{upid}'"))),
    };
    if t.invisible_polls > 0 {
        t.invisible_polls -= 1;
        return Err(Fail(400, "no such task".into()));
    }
    let mut v = json!({
        "upid": upid, "node": t.node, "pid": t.pid, "pstart": t.pid * 7, "starttime": t.starttime,
        "type": t.kind, "id": t.id, "user": t.user,
        "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
    });
    if let Some(e) = &t.exitstatus {
        v["exitstatus"] = json!(e);
    }
    Ok(v)
}

pub(super) fn task_log(sh: &Shared, node: &str, p: &HashMap<String, Vec<String>>) -> HResult {
    let upid = one(p, "upid").unwrap_or("");
    let start: usize = one(p, "start").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit: usize = one(p, "limit").and_then(|v| v.parse().ok()).unwrap_or(50);
    let s = sh.state.lock().unwrap();
    let t = match s.tasks.get(upid) {
        Some(t) if t.node == node => t,
        _ => return Err(Fail::e500(format!("unable to parse worker upid '{upid}'"))),
    };
    Ok(Value::Array(
        t.log
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, l)| json!({"n": i + 1, "t": l}))
            .collect(),
    ))
}
