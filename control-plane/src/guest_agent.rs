//! The guest-agent bootstrap: for a Proxmox pool with
//! `bootstrap = "guest-agent"`, the runner registration reaches the VM
//! through the QEMU guest agent instead of a cloud-init seed.
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

use grs_provisioner::{Bootstrap, ProvisionerError};
use grs_provisioner_proxmox::BootstrapMode;

use crate::config::ProvisionerConfig;
use crate::pools::Pool;
use crate::worker::RunnerRegistrar;

/// Where the agent writes the JIT config (root-only directory, see the
/// module docs).
pub const STAGING_PATH: &str = "/root/.grs-jitconfig";

/// Whether `pool` wants its runner config through the guest agent.
pub fn wanted(pool: &Pool) -> bool {
    matches!(&pool.config.provisioner,
        ProvisionerConfig::Proxmox(p) if p.bootstrap == BootstrapMode::GuestAgent)
}

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

/// The bootstrap of instance `name` of `pool`: a fresh JIT config minted
/// through `registrar`. A GitHub failure is transient (the create is
/// retried); no `[github]` or unsafe runner names are configuration errors.
pub async fn bootstrap(
    registrar: Option<&dyn RunnerRegistrar>,
    name: &str,
    pool: &Pool,
) -> Result<Bootstrap, ProvisionerError> {
    let registrar = registrar.ok_or_else(|| {
        ProvisionerError::Config(format!(
            "pool {} uses bootstrap = \"guest-agent\", which needs [github] to mint runner registrations",
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
        .map_err(ProvisionerError::Transient)?;
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

    #[test]
    fn names_that_could_break_the_shell_line_are_refused() {
        assert!(start_command("runner; rm -rf /", "/home/runner").is_none());
        assert!(start_command("runner", "/home/runner'$(id)").is_none());
        assert!(start_command("runner", "relative/dir").is_none());
        assert!(start_command("-o", "/home/runner").is_none());
        assert!(start_command("", "/home/runner").is_none());
    }
}
