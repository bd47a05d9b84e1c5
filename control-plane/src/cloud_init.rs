//! The cloud-init NoCloud documents served to a booting instance (through the
//! gateway's `/cloud-init/{token}/...` routes and `GetBootstrapDocument`).

use std::sync::Arc;

use grs_github::cloud_init::{
    DEFAULT_USER_DATA_TEMPLATE, RunnerBootstrap, TemplateError, render_user_data,
};
use grs_proto::v1::BootstrapDocument;
use secrecy::SecretString;

use crate::model::InstanceRecord;
use crate::pools::Pool;
use crate::worker::{RegistrarError, RunnerRegistrar};

/// Why a bootstrap document could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// `user-data` needs a runner config minted now, and there is no
    /// `[github]` to mint it.
    #[error("GitHub is not configured ([github]): no runner registration can be minted")]
    NoGitHub,
    /// Minting the runner config failed.
    #[error(transparent)]
    Registrar(#[from] RegistrarError),
    /// The pool's `user_data_template` cannot be rendered with these values.
    #[error("pool user_data_template: {0}")]
    Template(#[from] TemplateError),
    /// The request named no document.
    #[error("no document requested")]
    Unspecified,
}

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

    /// The document's body and content type. `user-data` carries `jit`, the
    /// runner config minted when the instance was provisioned; without one
    /// (an instance provisioned before GRS minted at provision time) a
    /// config is minted now.
    pub async fn render(
        &self,
        doc: BootstrapDocument,
        instance: &InstanceRecord,
        pool: &Pool,
        jit: Option<SecretString>,
    ) -> Result<(Vec<u8>, &'static str), DocumentError> {
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
                let jit = match jit {
                    Some(jit) => jit,
                    None => {
                        let registrar = self.registrar.as_ref().ok_or(DocumentError::NoGitHub)?;
                        registrar
                            .jit_config(
                                &instance.name,
                                &pool.config.labels,
                                pool.config.runner_group_id,
                            )
                            .await?
                    }
                };
                let bootstrap = RunnerBootstrap {
                    instance_name: instance.name.clone(),
                    encoded_jit_config: jit,
                    runner_user: pool.config.runner_user.clone(),
                    runner_dir: pool.config.runner_dir.clone(),
                    jit_config_path: None,
                };
                let template = pool
                    .config
                    .user_data_template
                    .as_deref()
                    .unwrap_or(DEFAULT_USER_DATA_TEMPLATE);
                let text = render_user_data(template, &bootstrap)?;
                Ok((text.into_bytes(), "text/cloud-config"))
            }
            BootstrapDocument::Unspecified => Err(DocumentError::Unspecified),
        }
    }
}
