//! The guest-agent bootstrap: for a pool whose backend says its instances
//! take [`BootstrapKind::GuestAgent`] (a Proxmox pool with
//! `bootstrap = "guest-agent"`: the backend reads its own setting, see
//! [`Provisioner::pool_bootstrap`](grs_provisioner::Provisioner::pool_bootstrap)),
//! the runner registration reaches the VM through the QEMU guest agent
//! instead of a cloud-init seed.
//!
//! The dispatcher mints the JIT runner config at create time (there is no
//! gateway round trip) and hands the provisioner a
//! [`Bootstrap::GuestAgent`]: once the agent answers, the provisioner writes
//! the config to [`STAGING_PATH`] (`agent/file-write`) and runs
//! [`start_command`] (`agent/exec`, as root).
//!
//! # Why `/root/`
//! qemu-ga creates a new file with mode 0666 whatever its umask
//! (qga/commands-posix.c, `safe_open_or_create`: `fchmod(fd,
//! DEFAULT_NEW_FILE_MODE)`, read/write for everyone). The staging file is
//! therefore put inside root's home (0700 on Debian and Ubuntu), where no
//! other user can reach it; the start command moves it, as root, to the
//! runner directory with owner `runner_user` and mode 0600, and the runner's
//! shell reads and deletes it before `exec`, as the cloud-init template does.

use grs_provisioner::{Bootstrap, BootstrapKind, ProvisionerError};

use crate::pools::Pool;
use crate::worker::RunnerRegistrar;
use grs_config::ConfigError;

/// Where the agent writes the JIT config (root-only directory, see the
/// module docs).
pub const STAGING_PATH: &str = "/root/.grs-jitconfig";

/// The command the agent runs (as root) to start the runner: move the
/// staged config into the runner directory, owned by the runner user, mode
/// 0600, and start `run.sh --jitconfig` as that user in a transient systemd
/// unit. `None` when a value has characters that are not safe in the shell
/// line (the names are from the configuration; refuse rather than quote).
pub fn start_command(runner_user: &str, runner_dir: &str) -> Option<Vec<String>> {
    let user_ok = !runner_user.is_empty()
        && runner_user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !runner_user.starts_with('-');
    let dir_ok = runner_dir.starts_with('/')
        && runner_dir
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'));
    if !user_ok || !dir_ok {
        return None;
    }
    let jit = format!("{runner_dir}/.jitconfig");
    let script = format!(
        "install -o {runner_user} -g {runner_user} -m 0600 {STAGING_PATH} {jit} && rm -f {STAGING_PATH} && \
         exec systemd-run --unit=grs-runner --uid={runner_user} --working-directory={runner_dir} \
         /bin/sh -c 'c=$(cat {jit}) && rm -f {jit} && exec ./run.sh --jitconfig \"$c\"'"
    );
    Some(vec!["/bin/sh".into(), "-c".into(), script])
}

/// Start-up check of a pool whose backend says it bootstraps through the
/// guest agent (any other pool passes; so does a plugin's pool before the
/// plugin has said, checked again once it has): `[github]` is configured
/// (the dispatcher mints the runner config itself) and the runner names
/// fit the start command. Errors name the pool's key.
pub fn check_pool(github_configured: bool, pool: &Pool) -> Result<(), ConfigError> {
    if pool.provisioner.pool_bootstrap(&pool.name) != Some(BootstrapKind::GuestAgent) {
        return Ok(());
    }
    if !github_configured {
        return Err(ConfigError::key(
            format!("pools.{}.provisioner", pool.name),
            "its backend bootstraps VMs through the guest agent (Proxmox: bootstrap = \"guest-agent\"), which needs [github]: GRS mints each runner's registration and hands it over through the agent",
        ));
    }
    if start_command(&pool.config.runner_user, &pool.config.runner_dir).is_none() {
        return Err(ConfigError::key(
            format!("pools.{}.runner_user", pool.name),
            "runner_user (letters, digits, '_', '-') or runner_dir (an absolute path of letters, digits, '/', '.', '_', '-') is not usable in the guest-agent start command",
        ));
    }
    Ok(())
}

/// The bootstrap of instance `name` of `pool`: a fresh JIT config minted
/// through `registrar`. A GitHub failure fails the create (transient or
/// permanent by [`RegistrarError::is_transient`](crate::worker::RegistrarError::is_transient));
/// no `[github]` or unsafe runner names are configuration errors.
pub async fn bootstrap(
    registrar: Option<&dyn RunnerRegistrar>,
    name: &str,
    pool: &Pool,
) -> Result<Bootstrap, ProvisionerError> {
    let registrar = registrar.ok_or_else(|| {
        ProvisionerError::Config(format!(
            "pool {} bootstraps through the guest agent, which needs [github] to mint runner registrations",
            pool.name
        ))
    })?;
    let command = start_command(&pool.config.runner_user, &pool.config.runner_dir).ok_or_else(
        || {
            ProvisionerError::Config(format!(
                "pools.{}: runner_user or runner_dir has characters not allowed in the guest-agent start command",
                pool.name
            ))
        },
    )?;
    let content = registrar
        .jit_config(name, &pool.config.labels, pool.config.runner_group_id)
        .await
        .map_err(ProvisionerError::from)?;
    Ok(Bootstrap::GuestAgent {
        path: STAGING_PATH.into(),
        content,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_command_moves_the_staged_config_and_runs_the_runner_as_its_user() {
        let c = start_command("runner", "/home/runner/actions-runner").unwrap();
        assert_eq!(&c[..2], ["/bin/sh", "-c"]);
        assert!(c[2].starts_with(
            "install -o runner -g runner -m 0600 /root/.grs-jitconfig /home/runner/actions-runner/.jitconfig && rm -f /root/.grs-jitconfig"
        ), "{}", c[2]);
        assert!(c[2].contains("--uid=runner"), "{}", c[2]);
        assert!(
            c[2].contains("exec ./run.sh --jitconfig \"$c\""),
            "{}",
            c[2]
        );
    }

    /// Pool `p` of a fake backend whose document says `bootstrap`.
    fn pool(bootstrap: &str, config: crate::config::PoolConfig) -> Pool {
        let fake = grs_provisioner::FakeProvisioner::new();
        let doc = serde_json::json!({ "bootstrap": bootstrap });
        grs_provisioner::Provisioner::configure_pool(&fake, "p", doc.as_object().unwrap()).unwrap();
        Pool::new("p", config, std::sync::Arc::new(fake))
    }

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Key { key, .. } => key,
            other => panic!("not a key error: {other}"),
        }
    }

    #[test]
    fn a_pool_its_backend_bootstraps_through_the_agent_needs_github_and_usable_runner_names() {
        let ga = pool("guest-agent", Default::default());
        assert_eq!(
            key_of(check_pool(false, &ga).unwrap_err()),
            "pools.p.provisioner"
        );
        check_pool(true, &ga).unwrap();
        let bad = crate::config::PoolConfig {
            runner_dir: "/home/runner/$(reboot)".into(),
            ..Default::default()
        };
        let ga = pool("guest-agent", bad.clone());
        assert_eq!(
            key_of(check_pool(true, &ga).unwrap_err()),
            "pools.p.runner_user"
        );
        // What the backend says decides, not a key of the document: a
        // cloud-init pool needs neither.
        check_pool(false, &pool("cloud-init", bad)).unwrap();
    }

    #[test]
    fn names_that_could_break_the_shell_line_are_refused() {
        assert!(start_command("runner; rm -rf /", "/home/runner").is_none());
        assert!(start_command("runner", "/home/runner'$(id)").is_none());
        assert!(start_command("runner", "relative/dir").is_none());
        assert!(start_command("-o", "/home/runner").is_none());
        assert!(start_command("", "/home/runner").is_none());
    }
}
