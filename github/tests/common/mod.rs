//! What the client tests and the OpenAPI oracle share: the simulator with
//! the test App's key, and client configurations for an App at organisation
//! scope and a PAT at repository scope.

use std::time::Duration;

use grs_github::sim::{GitHubSim, SimConfig};
use grs_github::{GitHubAppConfig, GitHubConfig};
use secrecy::SecretString;

/// The test App's private key (and its public half, which the simulator
/// checks JWTs with).
const KEY: &str = include_str!("../data/test-app.key.pem");
const PUB: &str = include_str!("../data/test-app.pub.pem");

/// The simulator with `cfg`, verifying JWTs with the test App's key.
pub async fn sim(cfg: SimConfig) -> GitHubSim {
    GitHubSim::start(SimConfig {
        app_public_key_pem: Some(PUB.into()),
        ..cfg
    })
    .await
    .unwrap()
}

/// The test App (id 4242, installation 77) at organisation `grs-sim`,
/// runner group 3.
pub fn app_config(sim: &GitHubSim) -> GitHubConfig {
    GitHubConfig {
        api_url: sim.url(),
        organization: Some("grs-sim".into()),
        runner_group_id: 3,
        app: Some(GitHubAppConfig {
            app_id: "4242".into(),
            installation_id: 77,
            private_key: Some(SecretString::from(KEY.to_owned())),
            private_key_file: None,
        }),
        max_rate_limit_wait: Duration::from_secs(5),
        ..GitHubConfig::default()
    }
}

/// The simulator's PAT at repository `grs-sim/app`.
pub fn pat_config(sim: &GitHubSim) -> GitHubConfig {
    GitHubConfig {
        api_url: sim.url(),
        repository: Some("grs-sim/app".into()),
        token: Some(SecretString::from(
            "ghp_simulated_personal_access_token".to_owned(),
        )),
        max_rate_limit_wait: Duration::from_secs(5),
        ..GitHubConfig::default()
    }
}
