//! Which node gets the next VM.
//!
//! A node is eligible when it is online, below its `max_instances` (counting
//! every instance of this installation on it, all pools, plus creates still
//! in flight in this process) and has the VM's memory free after its
//! reserve. Among eligible nodes the one with the most free memory wins, so
//! VMs spread out. A node that is down or full is skipped, never waited for.
//!
//! # Guarantees
//! - Within one process, concurrent creates never place more VMs on a node
//!   than its maximum: a [`Reservation`] is taken under a lock and counted
//!   until it is dropped (dropped on success, failure or cancellation).
//! - Across processes (control-plane replicas), when the control plane hands
//!   the backend its [`NodeLedger`](grs_provisioner::NodeLedger): the
//!   creating code then also holds a place in the ledger for a node with a
//!   maximum before cloning onto it (see `provisioner/create.rs`), counting
//!   the VMs [`visible_on`] the node.
//! - Counts come from a `/cluster/resources` snapshot taken by the caller,
//!   unioned by instance name with the reservations, so a VM that is both
//!   in flight and already visible is counted once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::client::Resource;
use crate::config::NodeConfig;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
struct Held {
    node: String,
    mem: u64,
}

/// Reservations of creates in flight, shared by every pool of one PVE
/// connection.
#[derive(Debug, Default)]
pub struct Placement {
    held: Arc<Mutex<HashMap<String, Held>>>,
}

/// A place on a node, held until dropped.
#[derive(Debug)]
pub struct Reservation {
    held: Arc<Mutex<HashMap<String, Held>>>,
    name: String,
    /// The chosen node.
    pub node: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.lock().unwrap().remove(&self.name);
    }
}

/// What placement needs to know about the request.
#[derive(Debug)]
pub struct Request<'a> {
    /// Instance name (unique).
    pub name: &'a str,
    /// Nodes the pool may use, in preference order.
    pub candidates: &'a [String],
    /// Memory the VM needs, bytes.
    pub mem: u64,
    /// The tag every instance of this installation carries.
    pub installation_tag: &'a str,
    /// Nodes not to use this time (just failed).
    pub exclude: &'a HashSet<String>,
}

/// The names of the VMs of this installation (`installation_tag`) on
/// `node` in `snapshot`.
pub fn visible_on<'a>(
    snapshot: &'a [Resource],
    node: &str,
    installation_tag: &str,
) -> Vec<&'a str> {
    snapshot
        .iter()
        .filter(|r| {
            r.is_vm() && r.node.as_deref() == Some(node) && r.tag_list().contains(&installation_tag)
        })
        .filter_map(|r| r.name.as_deref())
        .collect()
}

/// Why a candidate node cannot take a VM now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeRefusal {
    /// A create failed there a moment ago (the request excludes it).
    #[error("{node}: failed just now")]
    FailedJustNow {
        /// The node.
        node: String,
    },
    /// The cluster does not list it.
    #[error("{node}: not in the cluster")]
    NotInCluster {
        /// The node.
        node: String,
    },
    /// Listed, not online.
    #[error("{node}: {status}")]
    NotOnline {
        /// The node.
        node: String,
        /// Its status (`offline`, or `status unknown`).
        status: String,
    },
    /// At its `max_instances`.
    #[error("{node}: {count}/{max} instances")]
    Full {
        /// The node.
        node: String,
        /// This installation's VMs there, made or in flight.
        count: usize,
        /// Its maximum.
        max: u32,
    },
    /// Not enough memory left.
    #[error("{node}: {free_mib} MiB free, {needed_mib} MiB needed")]
    Memory {
        /// The node.
        node: String,
        /// Free memory after the node's reserve and VMs in flight.
        free_mib: u64,
        /// The VM's memory.
        needed_mib: u64,
    },
}

/// No candidate node has room: why, node by node (`a: offline; b: 2/2
/// instances`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .refusals.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct NoRoom {
    /// One per candidate node, in the candidates' order.
    pub refusals: Vec<NodeRefusal>,
}

impl Placement {
    /// Reserves room for `req` on the best node of `snapshot`, or says why
    /// there is none (one reason per node).
    pub fn reserve(
        &self,
        req: &Request<'_>,
        snapshot: &[Resource],
        limits: &[NodeConfig],
    ) -> Result<Reservation, NoRoom> {
        let mut held = self.held.lock().unwrap();
        let mut best: Option<(u64, usize, &String)> = None;
        let mut reasons = Vec::new();
        for node in req.candidates {
            if req.exclude.contains(node) {
                reasons.push(NodeRefusal::FailedJustNow { node: node.clone() });
                continue;
            }
            let Some(n) = snapshot
                .iter()
                .find(|r| r.kind == "node" && r.node.as_deref() == Some(node))
            else {
                reasons.push(NodeRefusal::NotInCluster { node: node.clone() });
                continue;
            };
            if n.status.as_deref() != Some("online") {
                reasons.push(NodeRefusal::NotOnline {
                    node: node.clone(),
                    status: n.status.as_deref().unwrap_or("status unknown").to_owned(),
                });
                continue;
            }
            let limit = limits.iter().find(|l| &l.name == node);
            let mut names: HashSet<&str> = visible_on(snapshot, node, req.installation_tag)
                .into_iter()
                .collect();
            let mut inflight_mem = 0;
            for (name, h) in held.iter().filter(|(_, h)| &h.node == node) {
                names.insert(name.as_str());
                inflight_mem += h.mem;
            }
            let count = names.len();
            if let Some(max) = limit.and_then(|l| l.max_instances)
                && count >= max as usize
            {
                reasons.push(NodeRefusal::Full {
                    node: node.clone(),
                    count,
                    max,
                });
                continue;
            }
            let reserve = limit.map(|l| l.reserved_memory_mib).unwrap_or(1024) * MIB;
            let free = n
                .maxmem
                .unwrap_or(0)
                .saturating_sub(n.mem.unwrap_or(0))
                .saturating_sub(reserve)
                .saturating_sub(inflight_mem);
            if free < req.mem {
                reasons.push(NodeRefusal::Memory {
                    node: node.clone(),
                    free_mib: free / MIB,
                    needed_mib: req.mem / MIB,
                });
                continue;
            }
            if best.is_none_or(|(f, c, _)| free > f || (free == f && count < c)) {
                best = Some((free, count, node));
            }
        }
        let Some((_, _, node)) = best else {
            return Err(NoRoom { refusals: reasons });
        };
        held.insert(
            req.name.to_owned(),
            Held {
                node: node.clone(),
                mem: req.mem,
            },
        );
        Ok(Reservation {
            held: self.held.clone(),
            name: req.name.to_owned(),
            node: node.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, status: &str, maxmem_gib: u64, mem_gib: u64) -> Resource {
        Resource {
            id: format!("node/{name}"),
            kind: "node".into(),
            node: Some(name.into()),
            status: Some(status.into()),
            maxmem: Some(maxmem_gib << 30),
            mem: Some(mem_gib << 30),
            ..Default::default()
        }
    }

    fn vm(name: &str, node: &str) -> Resource {
        Resource {
            kind: "qemu".into(),
            node: Some(node.into()),
            name: Some(name.into()),
            tags: Some("grs;grs-i-test".into()),
            ..Default::default()
        }
    }

    fn limit(name: &str, max: u32) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            max_instances: Some(max),
            reserved_memory_mib: 0,
        }
    }

    fn req<'a>(name: &'a str, cands: &'a [String], ex: &'a HashSet<String>) -> Request<'a> {
        Request {
            name,
            candidates: cands,
            mem: 2 << 30,
            installation_tag: "grs-i-test",
            exclude: ex,
        }
    }

    #[test]
    fn the_node_with_most_free_memory_wins_and_down_or_full_nodes_are_skipped() {
        let p = Placement::default();
        let cands: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let ex = HashSet::new();
        let snap = vec![
            node("a", "offline", 64, 0),
            node("b", "online", 64, 60),
            node("c", "online", 64, 10),
        ];
        let r = p.reserve(&req("x-1", &cands, &ex), &snap, &[]).unwrap();
        assert_eq!(r.node, "c");
        let snap = vec![node("a", "offline", 64, 0), node("b", "online", 64, 63)];
        let why = p.reserve(&req("x-2", &cands, &ex), &snap, &[]).unwrap_err();
        assert!(
            matches!(
                &why.refusals[..],
                [
                    NodeRefusal::NotOnline { node: a, status },
                    NodeRefusal::Memory { node: b, .. },
                    NodeRefusal::NotInCluster { node: c },
                ] if a == "a" && status == "offline" && b == "b" && c == "c"
            ),
            "{why:?}"
        );
        assert!(why.to_string().starts_with("a: offline; b: "), "{why}");
    }

    #[test]
    fn reservations_in_flight_count_against_the_node_maximum_until_dropped() {
        let p = Placement::default();
        let cands = vec!["a".to_string()];
        let ex = HashSet::new();
        let snap = vec![node("a", "online", 64, 0), vm("x-0", "a")];
        let limits = [limit("a", 2)];
        let r1 = p.reserve(&req("x-1", &cands, &ex), &snap, &limits).unwrap();
        let full = p
            .reserve(&req("x-2", &cands, &ex), &snap, &limits)
            .unwrap_err();
        assert!(
            matches!(
                &full.refusals[..],
                [NodeRefusal::Full {
                    count: 2,
                    max: 2,
                    ..
                }]
            ),
            "{full:?}"
        );
        drop(r1);
        p.reserve(&req("x-2", &cands, &ex), &snap, &limits).unwrap();
    }

    #[test]
    fn a_vm_both_visible_and_in_flight_is_counted_once() {
        let p = Placement::default();
        let cands = vec!["a".to_string()];
        let ex = HashSet::new();
        let limits = [limit("a", 2)];
        let _r = p
            .reserve(
                &req("x-1", &cands, &ex),
                &[node("a", "online", 64, 0)],
                &limits,
            )
            .unwrap();
        // x-1 now shows up in the cluster too.
        let snap = vec![node("a", "online", 64, 0), vm("x-1", "a")];
        p.reserve(&req("x-2", &cands, &ex), &snap, &limits).unwrap();
    }
}
