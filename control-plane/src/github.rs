//! [`RunnerRegistrar`] over GitHub's REST API (`grs-github`): JIT runner
//! configs for booting instances, and removal of registrations left behind.

use async_trait::async_trait;
use grs_github::GitHubClient;
use secrecy::SecretString;

use crate::worker::RunnerRegistrar;

/// Runner registrations through a [`GitHubClient`] (a GitHub App or a PAT, an
/// organisation or a repository, github.com or Enterprise Server).
#[derive(Debug, Clone)]
pub struct GitHubRegistrar {
    client: GitHubClient,
}

impl GitHubRegistrar {
    /// Registrations through `client`.
    pub fn new(client: GitHubClient) -> Self {
        Self { client }
    }
}

#[async_trait]
impl RunnerRegistrar for GitHubRegistrar {
    async fn jit_config(
        &self,
        name: &str,
        labels: &[String],
        runner_group_id: u64,
    ) -> Result<SecretString, String> {
        let jit = self
            .client
            .generate_jit_config_in_group(name, labels, Some(runner_group_id), None)
            .await
            .map_err(|e| format!("cannot mint a JIT runner config for {name}: {e}"))?;
        Ok(jit.encoded_jit_config)
    }

    async fn remove_runner(&self, name: &str) -> Result<(), String> {
        let removed = self
            .client
            .remove_runner_by_name(name)
            .await
            .map_err(|e| format!("cannot remove the runner registration {name}: {e}"))?;
        if removed > 0 {
            tracing::info!(runner = %name, removed, "removed a runner registration left behind");
        }
        Ok(())
    }
}
