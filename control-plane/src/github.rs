//! [`RunnerRegistrar`] over GitHub's REST API (`grs-github`): JIT runner
//! configs for booting instances, and removal of registrations left behind.

use async_trait::async_trait;
use grs_github::GitHubClient;
use secrecy::SecretString;

use crate::worker::{RunnerRegistrar, RunnerRegistration};

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

    async fn runner_busy(&self, name: &str) -> Result<Option<bool>, String> {
        let runners = self
            .client
            .list_runners(Some(name))
            .await
            .map_err(|e| format!("cannot look up the runner {name}: {e}"))?;
        Ok(Some(runners.iter().any(|r| r.name == name && r.busy)))
    }

    async fn offline_runners(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<RunnerRegistration>>, String> {
        let runners = self
            .client
            .list_runners(None)
            .await
            .map_err(|e| format!("cannot list the runner registrations: {e}"))?;
        Ok(Some(
            runners
                .into_iter()
                .filter(|r| r.name.starts_with(prefix) && r.status == "offline")
                .map(|r| RunnerRegistration {
                    id: r.id,
                    name: r.name,
                    busy: r.busy,
                })
                .collect(),
        ))
    }

    async fn remove_runner_id(&self, id: u64) -> Result<(), String> {
        self.client
            .delete_runner(id)
            .await
            .map_err(|e| format!("cannot remove the runner registration {id}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use grs_github::sim::{GitHubSim, NewJob, SimConfig};
    use secrecy::{ExposeSecret, SecretString};

    use super::*;

    #[tokio::test]
    async fn runner_busy_is_what_github_says_of_the_runner() {
        let sim = GitHubSim::start(SimConfig {
            job_duration: Duration::from_secs(30),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let client = GitHubClient::new(&grs_github::GitHubConfig {
            api_url: sim.url(),
            organization: Some("grs-sim".into()),
            token: Some(SecretString::from(
                "ghp_simulated_personal_access_token".to_owned(),
            )),
            ..grs_github::GitHubConfig::default()
        })
        .unwrap();
        let registrar = GitHubRegistrar::new(client);
        let name = "grs-4242";
        // Not registered: not busy.
        assert_eq!(registrar.runner_busy(name).await, Ok(Some(false)));
        let labels = vec!["self-hosted".to_owned(), "linux".to_owned()];
        let jit = registrar.jit_config(name, &labels, 1).await.unwrap();
        sim.boot_runner(jit.expose_secret()).await.unwrap();
        // Registered, online, no job yet.
        assert_eq!(registrar.runner_busy(name).await, Ok(Some(false)));
        sim.queue_job(NewJob::labels(["self-hosted", "linux"]))
            .await;
        assert!(
            sim.wait_until(Duration::from_secs(5), |s| s
                .runners()
                .iter()
                .any(|r| r.name == name && r.busy))
                .await,
            "the simulator gave the runner the job"
        );
        assert_eq!(registrar.runner_busy(name).await, Ok(Some(true)));
        // Another runner's name is not this one's.
        assert_eq!(registrar.runner_busy("grs-4243").await, Ok(Some(false)));
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn offline_registrations_with_the_prefix_are_listed_and_removed_by_id() {
        let sim = GitHubSim::start(SimConfig::default()).await.unwrap();
        let client = GitHubClient::new(&grs_github::GitHubConfig {
            api_url: sim.url(),
            organization: Some("grs-sim".into()),
            token: Some(SecretString::from(
                "ghp_simulated_personal_access_token".to_owned(),
            )),
            ..grs_github::GitHubConfig::default()
        })
        .unwrap();
        let registrar = GitHubRegistrar::new(client);
        let labels = vec!["self-hosted".to_owned()];
        // Registered, never booted: offline. One booted: online.
        registrar.jit_config("grs-1", &labels, 1).await.unwrap();
        registrar.jit_config("other-1", &labels, 1).await.unwrap();
        let jit = registrar.jit_config("grs-2", &labels, 1).await.unwrap();
        sim.boot_runner(jit.expose_secret()).await.unwrap();
        let offline = registrar.offline_runners("grs-").await.unwrap().unwrap();
        let names: Vec<&str> = offline.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["grs-1"]);
        registrar.remove_runner_id(offline[0].id).await.unwrap();
        assert!(
            registrar
                .offline_runners("grs-")
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );
        assert!(sim.runners().iter().any(|r| r.name == "other-1"));
        sim.shutdown().await;
    }
}
