//! `GET /access/permissions`: the token's effective privileges, as
//! `grs doctor` asks for them.
//!
//! Not in the bundled endpoint extract (`schema/endpoints.json` is kept
//! identical to the shared fixture), so this handler checks its two
//! parameters itself, as the official schema (PVE 9.1 `apidoc.js`,
//! `/access/permissions` GET) defines them: `path` and `userid`, both
//! optional, nothing else (`additionalProperties: 0`).
//!
//! What it models (pve-access-control `src/PVE/API2/AccessControl.pm`,
//! `permissions`; `src/PVE/RPCEnvironment.pm`, `permissions` and
//! `get_effective_permissions`): with `path`, the answer is
//! `{ path: { privilege: propagate } }` (`{}` when the token has nothing
//! there); without it, the same for the top-level paths
//! (`/`, `/access`, `/nodes`, `/pool`, `/sdn`, `/storage`, `/vms`) and every
//! path an ACL names, leaving out paths without privileges. An ACL entry
//! applies to its own path, and to every path below it when it propagates.
//! Not modelled: resource-pool membership (a VM in pool `P` also gets the
//! ACLs of `/pool/P`), groups, roles by name, and asking for another
//! user's permissions (`userid` of someone else needs `Sys.Audit`).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::PveSim;
use super::api::{Fail, HResult};
use super::state::Shared;

/// One ACL entry of the simulated token: privileges on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    /// The ACL path (`/`, `/vms/9000`, `/pool/grs`, ...).
    pub path: String,
    /// The privileges granted there (the role's privileges).
    pub privileges: Vec<String>,
    /// Whether they apply to paths below too (`pveum acl modify
    /// -propagate`, the default).
    pub propagate: bool,
}

impl AclEntry {
    /// Privileges on `path`, propagating.
    pub fn new(path: &str, privileges: &[&str]) -> Self {
        Self {
            path: path.to_owned(),
            privileges: privileges.iter().map(|p| (*p).to_owned()).collect(),
            propagate: true,
        }
    }
}

impl PveSim {
    /// Replaces the token's ACL. Until this is called, the token holds
    /// GRS's role (for the simulated release) on `/`, propagating.
    pub fn set_token_acl(&self, acl: Vec<AclEntry>) {
        self.lock().token_acl = Some(acl);
    }
}

fn acl(sh: &Shared) -> Vec<AclEntry> {
    if let Some(acl) = &sh.state.lock().unwrap().token_acl {
        return acl.clone();
    }
    let major = match sh.opts.version {
        super::PveVersion::V7_4 => 7,
        super::PveVersion::V8_3 | super::PveVersion::V8_4 => 8,
        super::PveVersion::V9_1 => 9,
    };
    let privs: Vec<&str> = crate::privileges::role_privileges_for(major)
        .into_iter()
        .collect();
    vec![AclEntry::new("/", &privs)]
}

/// Whether an entry on `acl_path` reaches `path`.
fn covers(acl_path: &str, propagate: bool, path: &str) -> bool {
    acl_path == path
        || propagate
            && (acl_path == "/"
                || path.starts_with(&format!("{}/", acl_path.trim_end_matches('/'))))
}

/// Privilege → propagate at `path`.
fn effective(acl: &[AclEntry], path: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for e in acl.iter().filter(|e| covers(&e.path, e.propagate, path)) {
        for p in &e.privileges {
            let v = out.entry(p.clone()).or_insert(false);
            *v |= e.propagate;
        }
    }
    out
}

fn as_json(perms: BTreeMap<String, bool>) -> Value {
    Value::Object(
        perms
            .into_iter()
            .map(|(p, prop)| (p, json!(u8::from(prop))))
            .collect(),
    )
}

/// The handler; `user` is the authenticated token id.
pub(super) fn permissions(sh: &Shared, p: &HashMap<String, Vec<String>>, user: &str) -> HResult {
    if let Some(k) = p.keys().find(|k| !matches!(k.as_str(), "path" | "userid")) {
        return Err(Fail(
            400,
            format!(
                "Parameter verification failed. ({k}: property is not defined in schema and the schema does not allow additional properties)"
            ),
        ));
    }
    let one = |k: &str| p.get(k).and_then(|v| v.first()).map(String::as_str);
    if one("userid").is_some_and(|u| u != user) {
        return Err(Fail(
            403,
            "Permission check failed (/access, Sys.Audit)".into(),
        ));
    }
    let acl = acl(sh);
    if let Some(path) = one("path").filter(|p| !p.is_empty()) {
        let perms = effective(&acl, path);
        return Ok(if perms.is_empty() {
            json!({})
        } else {
            json!({ path: as_json(perms) })
        });
    }
    let mut paths: Vec<String> = [
        "/",
        "/access",
        "/access/groups",
        "/nodes",
        "/pool",
        "/sdn",
        "/storage",
        "/vms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    paths.extend(acl.iter().map(|e| e.path.clone()));
    let mut out = serde_json::Map::new();
    for path in paths {
        let perms = effective(&acl, &path);
        if !perms.is_empty() {
            out.insert(path, as_json(perms));
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reaches_below_its_path_only_when_it_propagates() {
        let acl = vec![
            AclEntry::new("/vms", &["VM.Audit"]),
            AclEntry {
                path: "/nodes".into(),
                privileges: vec!["Sys.Audit".into()],
                propagate: false,
            },
        ];
        assert_eq!(effective(&acl, "/vms/100").get("VM.Audit"), Some(&true));
        assert!(effective(&acl, "/vmsx").is_empty());
        assert_eq!(effective(&acl, "/nodes").get("Sys.Audit"), Some(&false));
        assert!(effective(&acl, "/nodes/pve1").is_empty());
    }
}
