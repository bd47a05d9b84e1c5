//! The cloud-init NoCloud documents served to a booting instance (through the
//! gateway's `/cloud-init/{token}/...` routes and `GetBootstrapDocument`).

use std::sync::Arc;

use grs_proto::v1::BootstrapDocument;

use crate::model::InstanceRecord;
use crate::pools::Pool;
use crate::worker::RunnerRegistrar;

/// Renders the documents of an instance.
#[derive(Debug)]
pub struct Documents {
    registrar: Option<Arc<dyn RunnerRegistrar>>,
}

/// Network configuration v2: DHCP on the first Ethernet device, whatever its
/// name. Templates that need more configure it themselves.
const NETWORK_CONFIG: &str =
    "version: 2\nethernets:\n  primary:\n    match:\n      name: \"e*\"\n    dhcp4: true\n";

impl Documents {
    /// Documents minting runner configs through `registrar`.
    pub fn new(registrar: Option<Arc<dyn RunnerRegistrar>>) -> Self {
        Self { registrar }
    }

    /// The document's body and content type.
    pub async fn render(
        &self,
        doc: BootstrapDocument,
        instance: &InstanceRecord,
        pool: &Pool,
    ) -> Result<(Vec<u8>, &'static str), String> {
        match doc {
            BootstrapDocument::MetaData => Ok((
                format!(
                    "instance-id: {name}\nlocal-hostname: {name}\n",
                    name = instance.name
                )
                .into_bytes(),
                "text/yaml",
            )),
            BootstrapDocument::VendorData => {
                Ok((b"#cloud-config\n{}\n".to_vec(), "text/cloud-config"))
            }
            BootstrapDocument::NetworkConfig => {
                Ok((NETWORK_CONFIG.as_bytes().to_vec(), "text/yaml"))
            }
            BootstrapDocument::UserData => {
                let registrar = self
                    .registrar
                    .as_ref()
                    .ok_or("GitHub is not configured: no runner registration can be minted")?;
                let _jit = registrar
                    .jit_config(
                        &instance.name,
                        &pool.config.labels,
                        pool.config.runner_group_id,
                    )
                    .await?;
                Err("user-data rendering is not available yet".into())
            }
            BootstrapDocument::Unspecified => Err("no document requested".into()),
        }
    }
}
