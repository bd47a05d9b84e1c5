//! The typed calls for the endpoints GRS uses, and their answers' types.

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use super::{Idempotency, Param, PveClient, Upid};
use crate::error::PveError;

/// One entry of `/cluster/resources`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Resource {
    /// `qemu/100`, `node/pve1`, ...
    #[serde(default)]
    pub id: String,
    /// `qemu`, `lxc`, `node`, `storage`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The node it is on (or is).
    #[serde(default)]
    pub node: Option<String>,
    /// VM id (guests).
    #[serde(default, deserialize_with = "de_opt_u32")]
    pub vmid: Option<u32>,
    /// Guest name.
    #[serde(default)]
    pub name: Option<String>,
    /// `running`, `stopped`, `online`, `offline`, `unknown`.
    #[serde(default)]
    pub status: Option<String>,
    /// Tags, `;`-separated.
    #[serde(default)]
    pub tags: Option<String>,
    /// Whether the guest is a template.
    #[serde(default, deserialize_with = "de_bool")]
    pub template: bool,
    /// Config lock (`clone`, `backup`, ...).
    #[serde(default)]
    pub lock: Option<String>,
    /// Memory in use, bytes.
    #[serde(default, deserialize_with = "de_opt_u64")]
    pub mem: Option<u64>,
    /// Memory size (guest) or total memory (node), bytes.
    #[serde(default, deserialize_with = "de_opt_u64")]
    pub maxmem: Option<u64>,
    /// Resource pool.
    #[serde(default)]
    pub pool: Option<String>,
    /// Storage id (storages).
    #[serde(default)]
    pub storage: Option<String>,
    /// Whether a storage is shared between nodes.
    #[serde(default, deserialize_with = "de_bool")]
    pub shared: bool,
}

impl Resource {
    /// A QEMU guest?
    pub fn is_vm(&self) -> bool {
        self.kind == "qemu"
    }
    /// The tags as a list (PVE accepts `;`, `,` and spaces as separators).
    pub fn tag_list(&self) -> Vec<&str> {
        split_tags(self.tags.as_deref().unwrap_or(""))
    }
}

/// Splits a PVE tag list.
pub fn split_tags(s: &str) -> Vec<&str> {
    s.split([';', ',', ' ']).filter(|t| !t.is_empty()).collect()
}

fn de_opt_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    })
}

fn de_opt_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(de_opt_u64(d)?.and_then(|v| u32::try_from(v).ok()))
}

fn de_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Bool(b)) => b,
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::String(s)) => matches!(s.as_str(), "1" | "true" | "yes" | "on"),
        _ => false,
    })
}

impl PveClient {
    /// `GET /version`: proves the address and token work.
    pub async fn version(&self) -> Result<Value, PveError> {
        self.call(Method::GET, "/version", &[], Idempotency::Idempotent)
            .await
    }

    /// `GET /nodes`: node names and whether they are online.
    pub async fn nodes(&self) -> Result<Vec<Resource>, PveError> {
        let v = self
            .call(Method::GET, "/nodes", &[], Idempotency::Idempotent)
            .await?;
        decode("/nodes", v)
    }

    /// `GET /cluster/resources` (all types, or one).
    pub async fn resources(&self, kind: Option<&str>) -> Result<Vec<Resource>, PveError> {
        let params: Vec<Param> = kind.map(|k| Param::new("type", k)).into_iter().collect();
        let v = self
            .call(
                Method::GET,
                "/cluster/resources",
                &params,
                Idempotency::Idempotent,
            )
            .await?;
        decode("/cluster/resources", v)
    }

    /// `GET /cluster/nextid`: the lowest free id. Reserves nothing.
    pub async fn nextid(&self) -> Result<u32, PveError> {
        let v = self
            .call(Method::GET, "/cluster/nextid", &[], Idempotency::Idempotent)
            .await?;
        match &v {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        }
        .ok_or_else(|| PveError::Decode {
            path: "/cluster/nextid".into(),
            detail: format!("expected a VM id, got {v}"),
        })
    }

    /// Whether PVE resource pool `poolid` exists (`GET /pools?poolid=`,
    /// which, unlike `/pools/{poolid}`, also takes nested pool ids).
    pub async fn resource_pool_exists(&self, poolid: &str) -> Result<bool, PveError> {
        match self
            .call(
                Method::GET,
                "/pools",
                &[Param::new("poolid", poolid)],
                Idempotency::Idempotent,
            )
            .await
        {
            Ok(v) => Ok(v.as_array().is_some_and(|a| !a.is_empty())),
            Err(e) if e.pve_text().contains("does not exist") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET .../qemu/{vmid}/config`.
    pub async fn vm_config(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<serde_json::Map<String, Value>, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        let v = self
            .call(Method::GET, &path, &[], Idempotency::Idempotent)
            .await?;
        decode(&path, v)
    }

    /// `POST .../qemu/{vmid}/clone`; returns the clone task.
    ///
    /// Not repeated after an unclear transport failure (the clone may have
    /// started); lock timeouts are repeated (PVE did nothing).
    pub async fn clone_vm(
        &self,
        node: &str,
        vmid: u32,
        params: &[Param],
    ) -> Result<Upid, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/clone");
        let v = self
            .call(Method::POST, &path, params, Idempotency::NotIdempotent)
            .await?;
        PveClient::upid_from(&path, v)
    }

    /// `PUT .../qemu/{vmid}/config` (synchronous).
    pub async fn set_config(
        &self,
        node: &str,
        vmid: u32,
        params: &[Param],
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        self.call(Method::PUT, &path, params, Idempotency::Idempotent)
            .await
            .map(|_| ())
    }

    /// `POST .../status/{start|stop}`; returns the task.
    pub async fn vm_action(&self, node: &str, vmid: u32, action: &str) -> Result<Upid, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/status/{action}");
        let v = self
            .call(Method::POST, &path, &[], Idempotency::Idempotent)
            .await?;
        PveClient::upid_from(&path, v)
    }

    /// `DELETE .../qemu/{vmid}` with `purge=1` (backup and replication jobs,
    /// HA). Without `destroy-unreferenced-disks`: with it, PVE lists every
    /// storage of the cluster after freeing the VM's own disks
    /// (qemu-server `PVE/QemuServer.pm` `destroy_vm` -> pve-storage
    /// `vdisk_list` -> `activate_storage_list`) and one offline share fails
    /// the task with the config left behind, making teardown hostage to
    /// storages that have nothing to do with the VM. A GRS clone's disks are
    /// all in its config (PVE frees a failed clone's new volumes itself).
    pub async fn destroy(&self, node: &str, vmid: u32) -> Result<Upid, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}");
        let v = self
            .call(
                Method::DELETE,
                &path,
                &[Param::flag("purge", true)],
                Idempotency::Idempotent,
            )
            .await?;
        PveClient::upid_from(&path, v)
    }

    /// `POST .../agent/ping`.
    pub async fn agent_ping(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/agent/ping");
        self.send_once(&Method::POST, &path, &[]).await.map(|_| ())
    }

    /// `POST .../agent/file-write` (PVE base64-encodes `content` for QEMU).
    pub async fn agent_file_write(
        &self,
        node: &str,
        vmid: u32,
        file: &str,
        content: &SecretString,
    ) -> Result<(), PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/agent/file-write");
        self.call(
            Method::POST,
            &path,
            &[
                Param::new("file", file),
                Param::secret("content", content.expose_secret()),
            ],
            Idempotency::Idempotent,
        )
        .await
        .map(|_| ())
    }

    /// `POST .../agent/exec`; returns the guest pid. Not repeated after an
    /// unclear failure (it could run twice).
    pub async fn agent_exec(
        &self,
        node: &str,
        vmid: u32,
        command: &[String],
    ) -> Result<u64, PveError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/agent/exec");
        let params: Vec<Param> = command.iter().map(|c| Param::new("command", c)).collect();
        let v = self
            .call(Method::POST, &path, &params, Idempotency::NotIdempotent)
            .await?;
        v.get("pid")
            .and_then(Value::as_u64)
            .ok_or_else(|| PveError::Decode {
                path,
                detail: format!("expected {{pid}}, got {v}"),
            })
    }
}

fn decode<T: serde::de::DeserializeOwned>(path: &str, v: Value) -> Result<T, PveError> {
    serde_json::from_value(v).map_err(|e| PveError::Decode {
        path: path.into(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_read_pve_numbers_and_booleans_leniently() {
        let r: Resource = serde_json::from_value(serde_json::json!({
            "id": "qemu/100", "type": "qemu", "vmid": 100, "template": 1,
            "maxmem": 2147483648u64, "tags": "grs;grs-p-linux"
        }))
        .unwrap();
        assert!(r.template);
        assert_eq!(r.vmid, Some(100));
        assert_eq!(r.tag_list(), vec!["grs", "grs-p-linux"]);
    }
}
