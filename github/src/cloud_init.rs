//! The cloud-config user-data that turns a booted template VM into a
//! one-job GitHub runner.
//!
//! The control plane calls [`render_user_data`] when the gateway redeems a
//! bootstrap token for `user-data`. The default template
//! ([`DEFAULT_USER_DATA_TEMPLATE`]) writes the JIT config into the runner
//! directory, mode `0600`, owned by the runner user (deferred to cloud-init's
//! final stage, so the user exists by then), and starts
//! `run.sh --jitconfig` as that unprivileged user through `systemd-run`; the
//! runner's shell reads the file and deletes it before `exec`, so the
//! credential does not outlive the runner's start on disk.
//!
//! Templates are per pool. Placeholders are `{{ name }}` with:
//! `instance_name`, `runner_user`, `runner_dir`, `jit_config`,
//! `jit_config_path`. Every value is checked against a strict character set
//! before it is substituted, so a value can never break out of the YAML or
//! shell context it lands in (an injected newline or quote is an error, not
//! a new cloud-config key). An unknown placeholder is an error too, so a
//! typo in a pool's template fails loudly instead of rendering `{{ tpyo }}`.

use secrecy::{ExposeSecret, SecretString};

/// The default user-data template.
pub const DEFAULT_USER_DATA_TEMPLATE: &str = r#"#cloud-config
# Written by GRS for instance {{ instance_name }}: one job, then the VM is deleted.
write_files:
  - path: {{ jit_config_path }}
    owner: "{{ runner_user }}:{{ runner_user }}"
    permissions: "0600"
    defer: true
    content: "{{ jit_config }}"
runcmd:
  - [systemd-run, --unit=grs-runner, --uid={{ runner_user }}, --working-directory={{ runner_dir }}, /bin/sh, -c, 'c=$(cat {{ jit_config_path }}) && rm -f {{ jit_config_path }} && exec ./run.sh --jitconfig "$c"']
"#;

/// What one instance's user-data is made of.
#[derive(Debug, Clone)]
pub struct RunnerBootstrap {
    /// The instance (and runner) name; DNS-safe.
    pub instance_name: String,
    /// The encoded JIT config from `generate-jitconfig`.
    pub encoded_jit_config: SecretString,
    /// The unprivileged user the runner runs as (`runner`).
    pub runner_user: String,
    /// Where the runner is unpacked (`/home/runner/actions-runner`).
    pub runner_dir: String,
    /// Where the JIT config is written; `None`: `<runner_dir>/.jitconfig`.
    pub jit_config_path: Option<String>,
}

/// A template or value that cannot be rendered safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not start with `#cloud-config`.
    #[error("a user-data template must start with `#cloud-config`")]
    NotCloudConfig,
    /// `{{ name }}` is not a known placeholder.
    #[error("unknown placeholder `{{{{ {0} }}}}` in the user-data template")]
    UnknownPlaceholder(String),
    /// `{{` without a closing `}}`.
    #[error("unclosed `{{{{` in the user-data template")]
    Unclosed,
    /// A value has characters that are unsafe where it is substituted.
    /// Names the field, never the value (it may be the JIT config).
    #[error("`{0}` has characters not allowed in user-data")]
    UnsafeValue(&'static str),
}

/// Renders `template` for `b`. See the module docs for the placeholders.
pub fn render_user_data(template: &str, b: &RunnerBootstrap) -> Result<String, TemplateError> {
    if !template.starts_with("#cloud-config") {
        return Err(TemplateError::NotCloudConfig);
    }
    let jit_path = b
        .jit_config_path
        .clone()
        .unwrap_or_else(|| format!("{}/.jitconfig", b.runner_dir.trim_end_matches('/')));
    check("instance_name", &b.instance_name, |c| {
        c.is_ascii_alphanumeric() || c == '-' || c == '.'
    })?;
    check("runner_user", &b.runner_user, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
    })?;
    let path_char = |c: char| c.is_ascii_alphanumeric() || "/._-".contains(c);
    check("runner_dir", &b.runner_dir, path_char)?;
    check("jit_config_path", &jit_path, path_char)?;
    if !b.runner_dir.starts_with('/') {
        return Err(TemplateError::UnsafeValue("runner_dir"));
    }
    if !jit_path.starts_with('/') {
        return Err(TemplateError::UnsafeValue("jit_config_path"));
    }
    // GitHub's encoded JIT config is base64.
    let jit = b.encoded_jit_config.expose_secret();
    check("jit_config", jit, |c| {
        c.is_ascii_alphanumeric() || "+/=-_".contains(c)
    })?;

    let mut out = String::with_capacity(template.len() + jit.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError::Unclosed)?;
        let name = after[..end].trim();
        out.push_str(match name {
            "instance_name" => &b.instance_name,
            "runner_user" => &b.runner_user,
            "runner_dir" => &b.runner_dir,
            "jit_config_path" => &jit_path,
            "jit_config" => jit,
            other => {
                return Err(TemplateError::UnknownPlaceholder(
                    other.chars().take(40).collect(),
                ));
            }
        });
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn check(field: &'static str, v: &str, ok: impl Fn(char) -> bool) -> Result<(), TemplateError> {
    if v.is_empty() || !v.chars().all(ok) {
        Err(TemplateError::UnsafeValue(field))
    } else {
        Ok(())
    }
}

/// The encoded JIT config a rendered [`DEFAULT_USER_DATA_TEMPLATE`] carries,
/// for simulated VMs (the demo and tests "boot" a runner from it). `None`
/// when the document has no `write_files` entry ending in `.jitconfig`.
pub fn jit_config_from_user_data(user_data: &str) -> Option<String> {
    let mut in_jit_entry = false;
    for line in user_data.lines() {
        let t = line.trim_start().trim_start_matches("- ");
        if let Some(p) = t.strip_prefix("path:") {
            in_jit_entry = p.trim().trim_matches('"').ends_with("jitconfig");
        } else if let (true, Some(c)) = (in_jit_entry, t.strip_prefix("content:")) {
            return Some(c.trim().trim_matches('"').to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap() -> RunnerBootstrap {
        RunnerBootstrap {
            instance_name: "grs-12877621891".into(),
            encoded_jit_config: SecretString::from("eyJhIjoiYiJ9+/=".to_owned()),
            runner_user: "runner".into(),
            runner_dir: "/home/runner/actions-runner".into(),
            jit_config_path: None,
        }
    }

    fn parse(doc: &str) -> serde_yaml::Value {
        serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("not YAML: {e}\n{doc}"))
    }

    #[test]
    fn the_default_template_renders_valid_cloud_config() {
        let doc = render_user_data(DEFAULT_USER_DATA_TEMPLATE, &bootstrap()).unwrap();
        assert!(doc.starts_with("#cloud-config\n"));
        let y = parse(&doc);
        assert!(
            y["write_files"].is_sequence() && y["runcmd"].is_sequence(),
            "{doc}"
        );
    }

    #[test]
    fn the_jit_config_is_written_0600_owned_by_the_runner_user_after_users_exist() {
        let doc = render_user_data(DEFAULT_USER_DATA_TEMPLATE, &bootstrap()).unwrap();
        let y = parse(&doc);
        let f = &y["write_files"][0];
        assert_eq!(
            f["path"].as_str(),
            Some("/home/runner/actions-runner/.jitconfig")
        );
        assert_eq!(f["permissions"].as_str(), Some("0600"));
        assert_eq!(f["owner"].as_str(), Some("runner:runner"));
        assert_eq!(f["content"].as_str(), Some("eyJhIjoiYiJ9+/="));
        assert_eq!(f["defer"].as_bool(), Some(true));
    }

    #[test]
    fn the_runner_starts_unprivileged_with_run_sh_jitconfig() {
        let doc = render_user_data(DEFAULT_USER_DATA_TEMPLATE, &bootstrap()).unwrap();
        let y = parse(&doc);
        let cmd: Vec<&str> = y["runcmd"][0]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(cmd[0], "systemd-run");
        assert!(cmd.contains(&"--uid=runner"), "{cmd:?}");
        assert!(cmd.contains(&"--working-directory=/home/runner/actions-runner"));
        let script = cmd.last().unwrap();
        assert!(
            script.contains("exec ./run.sh --jitconfig \"$c\""),
            "{script}"
        );
        assert!(script.contains("rm -f /home/runner/actions-runner/.jitconfig"));
    }

    #[test]
    fn values_that_could_break_out_of_yaml_or_shell_are_refused_without_echoing_them() {
        for (field, mutate) in [
            (
                "runner_user",
                Box::new(|b: &mut RunnerBootstrap| b.runner_user = "root\nruncmd: [reboot]".into())
                    as Box<dyn Fn(&mut RunnerBootstrap)>,
            ),
            (
                "runner_dir",
                Box::new(|b: &mut RunnerBootstrap| b.runner_dir = "/tmp; rm -rf /".into()),
            ),
            (
                "runner_dir",
                Box::new(|b: &mut RunnerBootstrap| b.runner_dir = "relative/dir".into()),
            ),
            (
                "instance_name",
                Box::new(|b: &mut RunnerBootstrap| b.instance_name = "a\"b".into()),
            ),
            (
                "jit_config",
                Box::new(|b: &mut RunnerBootstrap| {
                    b.encoded_jit_config = SecretString::from("abc\" && reboot".to_owned())
                }),
            ),
        ] {
            let mut b = bootstrap();
            mutate(&mut b);
            let e = render_user_data(DEFAULT_USER_DATA_TEMPLATE, &b).unwrap_err();
            assert_eq!(e, TemplateError::UnsafeValue(field));
            assert!(!e.to_string().contains("reboot"));
        }
    }

    #[test]
    fn custom_templates_are_checked() {
        let b = bootstrap();
        assert_eq!(
            render_user_data("runcmd: []", &b),
            Err(TemplateError::NotCloudConfig)
        );
        assert_eq!(
            render_user_data("#cloud-config\n{{ runner_usr }}", &b),
            Err(TemplateError::UnknownPlaceholder("runner_usr".into()))
        );
        assert_eq!(
            render_user_data("#cloud-config\n{{ runner_user", &b),
            Err(TemplateError::Unclosed)
        );
        let doc = render_user_data("#cloud-config\nhostname: {{instance_name}}\n", &b).unwrap();
        assert_eq!(parse(&doc)["hostname"].as_str(), Some("grs-12877621891"));
    }

    #[test]
    fn the_jit_config_can_be_read_back_from_rendered_user_data() {
        let doc = render_user_data(DEFAULT_USER_DATA_TEMPLATE, &bootstrap()).unwrap();
        assert_eq!(
            jit_config_from_user_data(&doc).as_deref(),
            Some("eyJhIjoiYiJ9+/=")
        );
        assert_eq!(jit_config_from_user_data("#cloud-config\n"), None);
    }
}
