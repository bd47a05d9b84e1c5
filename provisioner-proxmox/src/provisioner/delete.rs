//! Stop and destroy: teardown of owned VMs only.

use std::time::Duration;

use grs_provisioner::ProvisionerError;

use super::ProxmoxProvisioner;
use crate::client::Param;
use crate::error::PveError;

impl ProxmoxProvisioner {
    /// Hard stop; a stopped or absent VM is fine.
    pub(super) async fn stop_vm(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        match self.client_ref().vm_action(node, vmid, "stop").await {
            Ok(upid) => self.run_task(upid).await,
            Err(e) if e.is_vm_missing() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stop if needed, then destroy with purge; absent is success. Only
    /// for VMs whose marker was verified: an inherited `protection=1` (see
    /// the module docs) is cleared on the way.
    pub(super) async fn destroy_vm(
        &self,
        node: &str,
        vmid: u32,
        running: bool,
    ) -> Result<(), PveError> {
        if running {
            self.stop_vm(node, vmid).await?;
        }
        let mut unprotected = false;
        let mut lock_waits = 0u32;
        let mut restops = 0u32;
        loop {
            match self.client_ref().destroy(node, vmid).await {
                Ok(upid) => match self.run_task(upid).await {
                    Err(e) if e.is_vm_missing() => return Ok(()),
                    // The config lock is checked inside the destroy worker
                    // (qemu-server `PVE/QemuServer.pm` `destroy_vm`:
                    // `check_lock`): a clone or backup still holding it.
                    Err(e) if e.is_lock_conflict() && lock_waits < 20 => {
                        lock_waits += 1;
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(lock_waits)))
                            .await;
                    }
                    other => return other,
                },
                Err(e) if e.is_vm_missing() => return Ok(()),
                // Started meanwhile (or our snapshot was stale): stop again.
                Err(e) if e.pve_text().contains("is running") && restops < 2 => {
                    restops += 1;
                    self.stop_vm(node, vmid).await?;
                }
                // `check_protection` (qemu-server `destroy_vm`): a
                // protection the clone inherited from its template.
                Err(e) if e.pve_text().contains("protection mode enabled") && !unprotected => {
                    tracing::info!(
                        node,
                        vmid,
                        "clearing the protection flag a clone inherited from its template"
                    );
                    self.client_ref()
                        .set_config(node, vmid, &[Param::flag("protection", false)])
                        .await?;
                    unprotected = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes what a failed create made. Errors are logged, not returned:
    /// the create's own error is what the caller needs; a VM left behind
    /// carries the marker and the reconciler removes it.
    pub(super) async fn cleanup(&self, name: &str, node: &str, vmid: u32) {
        if let Err(e) = self.destroy_vm(node, vmid, true).await {
            tracing::warn!(instance = name, node, vmid, error = %e, "could not remove the VM of a failed create; it carries the GRS marker and will be removed later");
        } else {
            tracing::info!(
                instance = name,
                node,
                vmid,
                "removed the VM of a failed create"
            );
        }
    }

    pub async fn delete(&self, name: &str) -> Result<(), ProvisionerError> {
        let Some(found) = self.find_owned_verified(name).await? else {
            return Ok(());
        };
        for f in found {
            let running = f.res.status.as_deref() != Some("stopped");
            self.destroy_vm(&f.node, f.vmid, running).await?;
            tracing::info!(instance = name, node = %f.node, vmid = f.vmid, "instance deleted");
        }
        Ok(())
    }

    pub async fn stop(&self, name: &str) -> Result<(), ProvisionerError> {
        let found = self.find_owned_verified(name).await?.ok_or_else(|| {
            ProvisionerError::Permanent(format!("instance {name} does not exist"))
        })?;
        for f in found {
            self.stop_vm(&f.node, f.vmid).await?;
        }
        Ok(())
    }

    /// Deletes every instance [`list`](Self::list) shows; returns their
    /// names. Stops at the first failure.
    pub async fn remove_all(&self) -> Result<Vec<String>, ProvisionerError> {
        let mut removed = Vec::new();
        for inst in self.list().await? {
            self.delete(&inst.name).await?;
            removed.push(inst.name);
        }
        Ok(removed)
    }
}
