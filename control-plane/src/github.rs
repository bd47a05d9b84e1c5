//! The control plane's use of GitHub's REST API (`grs-github`):
//! - [`GitHubRegistrar`]: the [`RunnerRegistrar`] (JIT runner configs,
//!   removal of registrations left behind, whether a runner is busy).
//! - [`GitHubJobs`]: what GitHub says of a job GRS is about to spend a VM
//!   on ([`GitHubJobs::check`]), within an [`ApiBudget`] of optional calls
//!   per hour that the lost-webhook scan ([`crate::recovery`]) shares.
//! - [`EventScope`]: only events of the configured organisation or
//!   repository (and App installation) get instances.
//!
//! Guarantees: a job-status check never blocks provisioning on GitHub. When
//! the budget is spent, the primary rate limit is low, or GitHub does not
//! answer, the job is provisioned unchecked (the VM may be wasted, the job
//! is never left waiting). What GitHub reports goes through the same path as
//! a webhook (`submit_event`, with a delivery id of its own), so the rules
//! decide, and a late webhook saying the same is stale.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use grs_github::{GitHubClient, GitHubConfig};
use secrecy::SecretString;

use crate::model::{Job, JobAction, JobEvent};
use crate::worker::{RegistrarError, RunnerRegistrar, RunnerRegistration};

/// Below this fraction (1/N) of the primary rate limit left, optional calls
/// (status checks, the lost-webhook scan) are not made: runner registration
/// and teardown need the rest.
pub const LOW_RATE_LIMIT_DIVISOR: u64 = 10;

/// A budget of optional GitHub API calls: a token bucket holding at most
/// `per_hour` calls, refilled evenly over the hour. Per replica (each
/// replica has its own; the scan runs on the reconciler's leader only).
#[derive(Debug)]
pub struct ApiBudget {
    per_hour: u32,
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl ApiBudget {
    /// A full budget of `per_hour` calls an hour (0: no optional calls).
    pub fn new(per_hour: u32) -> Self {
        Self {
            per_hour,
            state: std::sync::Mutex::new((f64::from(per_hour), tokio::time::Instant::now())),
        }
    }

    /// Takes one call from the budget; false when none is left.
    pub fn try_spend(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * f64::from(self.per_hour) / 3600.0;
        st.0 = (st.0 + refill).min(f64::from(self.per_hour));
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What GitHub says of a job, for the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobCheck {
    /// Still waiting for a runner: spend the VM.
    Queued,
    /// GitHub says the job moved on (a runner took it, or it completed): the
    /// event to record, through the same rules as a webhook.
    Moved(Box<JobEvent>),
    /// Not checked (why: budget spent, rate limit low, no answer, no
    /// repository recorded): go ahead as if queued.
    Unchecked(String),
}

/// Job status from GitHub, within a budget.
#[derive(Debug, Clone)]
pub struct GitHubJobs {
    client: GitHubClient,
    budget: Arc<ApiBudget>,
}

impl GitHubJobs {
    /// Checks through `client`, spending from `budget`.
    pub fn new(client: GitHubClient, budget: Arc<ApiBudget>) -> Self {
        Self { client, budget }
    }

    /// The REST client.
    pub fn client(&self) -> &GitHubClient {
        &self.client
    }

    /// Takes one optional call from the budget, unless the budget is spent
    /// or GitHub's primary rate limit is low; why not, otherwise.
    pub fn may_call(&self) -> Result<(), &'static str> {
        if let Some(rl) = self.client.rate_limit()
            && rl.limit > 0
            && rl.remaining.saturating_mul(LOW_RATE_LIMIT_DIVISOR) < rl.limit
            && rl.reset > std::time::SystemTime::now()
        {
            return Err("GitHub's rate limit is low");
        }
        if !self.budget.try_spend() {
            return Err("the GitHub API budget (control_plane.github_api_budget) is spent");
        }
        Ok(())
    }

    /// What GitHub says of `job` (see [`JobCheck`]).
    pub async fn check(&self, job: &Job) -> JobCheck {
        if job.repository.is_empty() {
            return JobCheck::Unchecked("the job has no repository recorded".into());
        }
        if let Err(why) = self.may_call() {
            return JobCheck::Unchecked(why.into());
        }
        match self.client.get_job(&job.repository, job.job_id).await {
            Ok(gh) => match status_event(job, &gh) {
                Some(ev) => JobCheck::Moved(Box::new(ev)),
                None => JobCheck::Queued,
            },
            Err(e) => JobCheck::Unchecked(e.to_string()),
        }
    }
}

/// The event GitHub's view `gh` of `job` implies, if the job is no longer
/// waiting for a runner: `in_progress` with its runner, or `completed` with
/// its conclusion. Its delivery id (`grs-status:<job>:<status>`) is GRS's
/// own: a second check finding the same is a duplicate, and a webhook
/// saying the same later is stale.
pub fn status_event(job: &Job, gh: &grs_github::Job) -> Option<JobEvent> {
    let action = match gh.status.as_str() {
        "in_progress" => JobAction::InProgress,
        "completed" => JobAction::Completed,
        // queued, waiting, pending, requested: still wants a runner (or
        // will); an unknown status is taken the same way.
        _ => return None,
    };
    Some(JobEvent {
        delivery_id: format!("grs-status:{}:{}", job.job_id, gh.status),
        action,
        job_id: job.job_id,
        run_id: job.run_id,
        run_attempt: job.run_attempt,
        labels: job.labels.clone(),
        runner_id: gh.runner_id.unwrap_or(0),
        runner_name: gh.runner_name.clone().unwrap_or_default(),
        repository: job.repository.clone(),
        organization: job.organization.clone(),
        installation_id: job.installation_id,
        conclusion: gh.conclusion.clone().unwrap_or_default(),
        job_name: job.job_name.clone(),
        workflow_name: job.workflow_name.clone(),
    })
}

/// Which job events may get instances: those of the configured
/// organisation or repository, and, with a GitHub App, of its installation
/// (an event carrying another installation's id). Without `[github]`,
/// every event. Others are answered, counted and never recorded: a webhook
/// secret shared by mistake, or a repository moved out of the organisation,
/// must not spend VMs.
#[derive(Debug, Clone, Default)]
pub struct EventScope {
    organization: Option<String>,
    repository: Option<String>,
    installation_id: Option<u64>,
}

impl EventScope {
    /// The scope `[github]` sets (`None`: everything).
    pub fn from_config(github: Option<&GitHubConfig>) -> Self {
        let Some(gh) = github else {
            return Self::default();
        };
        Self {
            organization: gh.organization.clone(),
            repository: gh.repository.clone(),
            installation_id: gh.app.as_ref().map(|a| a.installation_id),
        }
    }

    /// Why `ev` is not this installation's to serve, if it is not.
    pub fn foreign(&self, ev: &JobEvent) -> Option<String> {
        if let Some(repo) = &self.repository
            && !ev.repository.eq_ignore_ascii_case(repo)
        {
            return Some(format!(
                "repository {:?} is not github.repository {repo:?}",
                ev.repository
            ));
        }
        if let Some(org) = &self.organization {
            let owner = ev.repository.split('/').next().unwrap_or("");
            let from_org =
                owner.eq_ignore_ascii_case(org) || ev.organization.eq_ignore_ascii_case(org);
            if !from_org {
                return Some(format!(
                    "repository {:?} is not in github.organization {org:?}",
                    ev.repository
                ));
            }
        }
        if let Some(id) = self.installation_id
            && ev.installation_id != 0
            && ev.installation_id != id
        {
            return Some(format!(
                "installation {} is not github.app.installation_id {id}",
                ev.installation_id
            ));
        }
        None
    }
}

/// How long a status answer is trusted before a job that waited (for
/// capacity, or for a retry) is checked again.
pub const STATUS_RECHECK: Duration = Duration::from_secs(30);

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
    ) -> Result<SecretString, RegistrarError> {
        let jit = self
            .client
            .generate_jit_config_in_group(name, labels, Some(runner_group_id), None)
            .await
            .map_err(|source| RegistrarError::GitHub {
                action: format!("mint a JIT runner config for {name}"),
                source,
            })?;
        Ok(jit.encoded_jit_config)
    }

    async fn remove_runner(&self, name: &str) -> Result<(), RegistrarError> {
        let removed = self
            .client
            .remove_runner_by_name(name)
            .await
            .map_err(|source| RegistrarError::GitHub {
                action: format!("remove the runner registration {name}"),
                source,
            })?;
        if removed > 0 {
            tracing::info!(runner = %name, removed, "removed a runner registration left behind");
        }
        Ok(())
    }

    async fn runner_busy(&self, name: &str) -> Result<Option<bool>, RegistrarError> {
        let runners = self
            .client
            .list_runners(Some(name))
            .await
            .map_err(|source| RegistrarError::GitHub {
                action: format!("look up the runner {name}"),
                source,
            })?;
        Ok(Some(runners.iter().any(|r| r.name == name && r.busy)))
    }

    fn github_client(&self) -> Option<GitHubClient> {
        Some(self.client.clone())
    }

    async fn offline_runners(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<RunnerRegistration>>, RegistrarError> {
        let runners =
            self.client
                .list_runners(None)
                .await
                .map_err(|source| RegistrarError::GitHub {
                    action: "list the runner registrations".into(),
                    source,
                })?;
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

    async fn remove_runner_id(&self, id: u64) -> Result<(), RegistrarError> {
        self.client
            .delete_runner(id)
            .await
            .map_err(|source| RegistrarError::GitHub {
                action: format!("remove the runner registration {id}"),
                source,
            })
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
        assert_eq!(registrar.runner_busy(name).await.unwrap(), Some(false));
        let labels = vec!["self-hosted".to_owned(), "linux".to_owned()];
        let jit = registrar.jit_config(name, &labels, 1).await.unwrap();
        sim.boot_runner(jit.expose_secret()).await.unwrap();
        // Registered, online, no job yet.
        assert_eq!(registrar.runner_busy(name).await.unwrap(), Some(false));
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
        assert_eq!(registrar.runner_busy(name).await.unwrap(), Some(true));
        // Another runner's name is not this one's.
        assert_eq!(
            registrar.runner_busy("grs-4243").await.unwrap(),
            Some(false)
        );
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
