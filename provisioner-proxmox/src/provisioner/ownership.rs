//! Ownership: the marker in the description, the tags, and finding this
//! installation's VMs (see the parent module's docs).

use std::time::{Duration, UNIX_EPOCH};

use grs_provisioner::{Instance, InstanceState, ProvisionerError};
use serde::{Deserialize, Serialize};

use super::ProxmoxProvisioner;
use crate::client::Resource;
use crate::error::PveError;

/// Prefix of the machine-readable marker line in a VM's description.
pub const MARKER_PREFIX: &str = "grs-owner: ";

/// The ownership marker, as written in the description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The GRS installation that made the VM.
    pub installation: String,
    /// Its pool.
    pub pool: String,
    /// The job it was made for.
    pub job: u64,
    /// Unix seconds of creation.
    pub created: u64,
}

impl Marker {
    /// The description text carrying this marker.
    pub fn description(&self) -> String {
        format!(
            "Made by GRS (GitHub Runner Scaler) for a single job; deleted when the job ends.\n\
             Do not edit the next line: GRS only touches VMs that carry it.\n\
             {MARKER_PREFIX}{}\n",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// The marker of a description, if it has one.
    pub fn parse(description: &str) -> Option<Self> {
        description
            .lines()
            .find_map(|l| l.trim().strip_prefix(MARKER_PREFIX))
            .and_then(|j| serde_json::from_str(j.trim()).ok())
    }
}

/// Makes `s` usable inside a PVE tag (`[a-z0-9_][a-z0-9_\-+.]*`). When that
/// changes `s` (case, other characters), a short digest of the original is
/// appended, so `Prod` and `prod` get different tags.
pub(super) fn tag_safe(s: &str) -> String {
    use sha2::Digest;
    let safe: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe == s {
        safe
    } else {
        let digest = hex::encode(sha2::Sha256::digest(s.as_bytes()));
        format!("{safe}-{}", &digest[..8])
    }
}

/// One of our VMs as found in the cluster.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) node: String,
    pub(super) vmid: u32,
    pub(super) res: Resource,
    /// From the description, when it was read.
    pub(super) marker: Option<Marker>,
}

impl ProxmoxProvisioner {
    /// Ours and configured, by tags alone: installation, pool and the
    /// VM's own id (which no template hands down, see the module docs).
    pub(super) fn owns_by_tags(&self, r: &Resource) -> bool {
        let tags = r.tag_list();
        tags.contains(&self.tag_installation.as_str())
            && tags.contains(&self.tag_pool.as_str())
            && configured(r)
    }

    pub(super) fn owns_marker(&self, m: &Marker) -> bool {
        m.installation == self.installation_id && m.pool == self.pool_name
    }

    /// A VM named with our prefix that GRS has not configured (no tag with
    /// its own id; tags a template handed down do not count): possibly one
    /// of ours whose create stopped before its configuration. Its
    /// description tells.
    pub(super) fn maybe_partial(&self, r: &Resource) -> bool {
        r.name
            .as_deref()
            .is_some_and(|n| n.starts_with(&format!("{}-", self.prefix)))
            && !configured(r)
    }

    pub(super) fn instance(&self, f: &Found) -> Instance {
        // Tags GRS did not write (inherited from the template) say nothing
        // about this VM: the marker it got in the clone request does.
        let tag_num = |p: &str| {
            configured(&f.res)
                .then(|| {
                    f.res
                        .tag_list()
                        .iter()
                        .find_map(|t| t.strip_prefix(p).and_then(|v| v.parse::<u64>().ok()))
                })
                .flatten()
        };
        let job_id = tag_num("grs-j-").or(f.marker.as_ref().map(|m| m.job));
        let created = tag_num("grs-t-").or(f.marker.as_ref().map(|m| m.created));
        let state = if f.res.lock.as_deref() == Some("clone") || !configured(&f.res) {
            InstanceState::Creating
        } else {
            match f.res.status.as_deref() {
                Some("running") => InstanceState::Running,
                Some("stopped") => InstanceState::Stopped,
                _ => InstanceState::Error,
            }
        };
        Instance {
            name: f.res.name.clone().unwrap_or_default(),
            provider_id: format!("{}/{}", f.node, f.vmid),
            pool: self.pool_name.clone(),
            job_id,
            state,
            location: Some(f.node.clone()),
            created_at: created.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    /// Reads the marker of a VM; `None` when it has none or is gone.
    pub(super) async fn read_marker(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<Option<(Marker, bool)>, PveError> {
        match self.client_ref().vm_config(node, vmid).await {
            Ok(cfg) => {
                let template = cfg
                    .get("template")
                    .is_some_and(|v| v.as_i64() == Some(1) || v.as_str() == Some("1"));
                Ok(cfg
                    .get("description")
                    .and_then(|d| d.as_str())
                    .and_then(Marker::parse)
                    .map(|m| (m, template)))
            }
            Err(e) if e.is_vm_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `name` has this installation's instance prefix. GRS touches
    /// a VM only if its name has the prefix AND it carries the marker.
    pub(super) fn has_prefix(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with('-') && rest.len() > 1)
    }

    /// Splits the VMs named `name` in `snapshot` into ours and foreign ones.
    /// Ours by tags, or (unmarked, prefixed) by description; a name without
    /// our prefix is never ours.
    pub(super) async fn classify(
        &self,
        name: &str,
        snapshot: &[Resource],
    ) -> Result<(Vec<Found>, usize), PveError> {
        let mut ours = Vec::new();
        let mut foreign = 0;
        if !self.has_prefix(name) {
            let n = snapshot
                .iter()
                .filter(|r| r.is_vm() && r.name.as_deref() == Some(name))
                .count();
            return Ok((ours, n));
        }
        for r in snapshot
            .iter()
            .filter(|r| r.is_vm() && r.name.as_deref() == Some(name))
        {
            let (Some(node), Some(vmid)) = (r.node.clone(), r.vmid) else {
                continue;
            };
            if r.template {
                foreign += 1;
                continue;
            }
            if self.owns_by_tags(r) {
                ours.push(Found {
                    node,
                    vmid,
                    res: r.clone(),
                    marker: None,
                });
            } else if self.maybe_partial(r) {
                match self.read_marker(&node, vmid).await? {
                    Some((m, false)) if self.owns_marker(&m) => ours.push(Found {
                        node,
                        vmid,
                        res: r.clone(),
                        marker: Some(m),
                    }),
                    _ => foreign += 1,
                }
            } else {
                foreign += 1;
            }
        }
        Ok((ours, foreign))
    }

    /// Our VM named `name` for a destructive call, its marker verified from
    /// the description. `Ok(None)`: nothing of that name exists.
    pub(super) async fn find_owned_verified(
        &self,
        name: &str,
    ) -> Result<Option<Vec<Found>>, ProvisionerError> {
        let snapshot = self.client_ref().resources(Some("vm")).await?;
        let (ours, foreign) = self.classify(name, &snapshot).await?;
        if ours.is_empty() {
            if foreign > 0 {
                return Err(ProvisionerError::NotOwned { name: name.into() });
            }
            return Ok(None);
        }
        let mut verified = Vec::new();
        for mut f in ours {
            if f.marker.is_none() {
                match self.read_marker(&f.node, f.vmid).await? {
                    Some((m, false)) if self.owns_marker(&m) => f.marker = Some(m),
                    // Vanished since the snapshot: nothing to do.
                    None if !self.vm_exists(&f).await? => continue,
                    // Our tags, but not our description (copied tags, a
                    // template): refuse.
                    _ => return Err(ProvisionerError::NotOwned { name: name.into() }),
                }
            }
            verified.push(f);
        }
        Ok(Some(verified))
    }

    pub(super) async fn vm_exists(&self, f: &Found) -> Result<bool, PveError> {
        match self.client_ref().vm_config(&f.node, f.vmid).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_vm_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Option<Instance>, ProvisionerError> {
        let snapshot = self.client_ref().resources(Some("vm")).await?;
        let (ours, _) = self.classify(name, &snapshot).await?;
        Ok(ours.first().map(|f| self.instance(f)))
    }

    pub async fn list(&self) -> Result<Vec<Instance>, ProvisionerError> {
        let snapshot = self.client_ref().resources(Some("vm")).await?;
        let mut out = Vec::new();
        for r in snapshot.iter().filter(|r| {
            r.is_vm() && !r.template && r.name.as_deref().is_some_and(|n| self.has_prefix(n))
        }) {
            let (Some(node), Some(vmid)) = (r.node.clone(), r.vmid) else {
                continue;
            };
            if self.owns_by_tags(r) {
                out.push(self.instance(&Found {
                    node,
                    vmid,
                    res: r.clone(),
                    marker: None,
                }));
            } else if self.maybe_partial(r)
                && let Some((m, false)) = self.read_marker(&node, vmid).await?
                && self.owns_marker(&m)
            {
                out.push(self.instance(&Found {
                    node,
                    vmid,
                    res: r.clone(),
                    marker: Some(m),
                }));
            }
        }
        Ok(out)
    }
}

/// The tag that says GRS configured VM `vmid` (see the module docs).
pub(super) fn configured_tag(vmid: u32) -> String {
    format!("grs-v-{vmid}")
}

/// Whether GRS configured this VM: it carries the tag with its own id.
pub(super) fn configured(r: &Resource) -> bool {
    r.vmid
        .is_some_and(|id| r.tag_list().contains(&configured_tag(id).as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_through_the_description() {
        let m = Marker {
            installation: "prod-1".into(),
            pool: "linux".into(),
            job: u64::MAX,
            created: 1_700_000_000,
        };
        let d = m.description();
        assert!(d.len() <= 8192);
        assert_eq!(Marker::parse(&d), Some(m));
        assert_eq!(Marker::parse("some operator's notes"), None);
    }

    #[test]
    fn tags_are_made_safe_for_pve() {
        assert_eq!(tag_safe("prod-eu-1"), "prod-eu-1");
        assert!(tag_safe("Prod/EU 1").starts_with("prod_eu_1-"));
        assert_ne!(tag_safe("Prod"), tag_safe("prod"));
        assert_ne!(tag_safe("a/b"), tag_safe("a_b"));
    }
}
