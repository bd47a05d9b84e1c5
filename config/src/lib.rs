//! How every GRS binary reads its configuration.
//!
//! One TOML file (`--config FILE`) serves all binaries; each binary
//! deserializes the sections it needs and ignores the others. On top of the
//! file, every key can be overridden by an environment variable named after
//! its path, upper-cased, with `_` between segments and the `GRS_` prefix:
//! `redis.url` ← `GRS_REDIS_URL`, `pools.linux.max_instances` ←
//! `GRS_POOLS_LINUX_MAX_INSTANCES`. Secrets come from the environment or a
//! file (`token_secret_file`), never have to be written in the TOML, and
//! never serialize (mark them `#[serde(default, skip_serializing)]`).
//!
//! Layering, lowest first: the type's `Default`, the file, the environment.
//! The result is deserialized with the path of any error kept, so a bad value
//! is reported as the key (and the variable that set it) the operator has to
//! fix. Binaries exit with [`EX_USAGE`] (64) on any [`ConfigError`].
//!
//! [`process`] holds the other conventions every binary follows: logging
//! setup and the shutdown signal.
//!
//! Start at [`load`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

pub mod keys;
pub mod process;

/// The exit code for bad configuration (`EX_USAGE` of sysexits.h).
pub const EX_USAGE: i32 = 64;

/// The environment variable prefix of overrides.
pub const ENV_PREFIX: &str = "GRS_";

/// A configuration problem, phrased for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file named by `--config`.
        path: PathBuf,
        /// The TOML parser's message, with line and column.
        message: String,
    },
    /// A key has a wrong type or value, or is unknown.
    #[error("config key `{key}`{origin}: {message}")]
    Key {
        /// Dotted path of the key (`pools.linux.max_instances`).
        key: String,
        /// ` (set by GRS_...)` when an environment variable set it.
        origin: String,
        /// What is wrong with it.
        message: String,
    },
    /// A secret's file cannot be read.
    #[error("config key `{key}`: cannot read secret file {path}: {source}")]
    SecretFile {
        /// The `*_file` key naming the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
}

impl ConfigError {
    /// An error about one key, for validation done after loading.
    pub fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Key {
            key: key.into(),
            origin: String::new(),
            message: message.into(),
        }
    }
}

/// Loads `T` from the defaults, the file at `path` (if any) and the process
/// environment.
pub fn load<T>(path: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let file = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?;
            Some(parse_file(p, &text)?)
        }
        None => None,
    };
    load_from(file, std::env::vars())
}

/// Parses config file text; errors name the file, line and column.
pub fn parse_file(path: &Path, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim().to_owned(),
    })
}

/// [`load`] with the file already parsed and the environment given: the
/// testable core.
pub fn load_from<T, I>(file: Option<Table>, env: I) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
    I: IntoIterator<Item = (String, String)>,
{
    let mut tree = match Value::try_from(T::default()) {
        Ok(Value::Table(t)) => t,
        // A config type that does not serialize to a table is a programming
        // error, but not worth a panic: start from an empty tree.
        _ => Table::new(),
    };
    if let Some(file) = file {
        merge(&mut tree, file);
    }
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    // An environment value is typed after the key it replaces (so `8080`
    // stays an integer where one is expected). When that guess is wrong (a
    // key whose file value has the wrong type, or a key with no default),
    // the value is retried with the other reading before giving up.
    let mut flipped = std::collections::HashSet::new();
    loop {
        let mut tree = tree.clone();
        let mut origins = BTreeMap::new();
        for (var, value) in &vars {
            if let Some(key) = apply_env(
                &mut tree,
                &var[ENV_PREFIX.len()..],
                value,
                flipped.contains(var),
            ) {
                origins.insert(key, var.clone());
            }
        }
        match serde_path_to_error::deserialize(Value::Table(tree)) {
            Ok(config) => return Ok(config),
            Err(e) => {
                let key = e.path().to_string();
                if let Some(var) = origins.get(&key)
                    && flipped.insert(var.clone())
                {
                    continue;
                }
                let origin = origins
                    .get(&key)
                    .map(|v| format!(" (set by {v})"))
                    .unwrap_or_default();
                return Err(ConfigError::Key {
                    key,
                    origin,
                    message: e.into_inner().to_string(),
                });
            }
        }
    }
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else is
/// replaced.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Applies one override (`name` without the prefix) and returns the dotted
/// key it set, or `None` when it names no table this binary has (a variable
/// meant for another binary).
///
/// Resolution walks the tree: at each table, the longest key whose
/// upper-cased name is a prefix of what is left (followed by `_` or the end)
/// is taken. When no key matches, what is left, lower-cased, becomes a new
/// key of the deepest table reached (optional keys and secrets have no
/// default to match), except at the top level, where it would be a section
/// no one asked for.
fn apply_env(tree: &mut Table, name: &str, raw: &str, flip: bool) -> Option<String> {
    let mut path: Vec<String> = Vec::new();
    let mut table = tree;
    let mut rest = name;
    loop {
        let found = table
            .keys()
            .filter(|k| {
                let up = k.to_ascii_uppercase().replace('-', "_");
                rest == up || rest.strip_prefix(&up).is_some_and(|r| r.starts_with('_'))
            })
            .max_by_key(|k| k.len())
            .cloned();
        match found {
            Some(k) if rest.len() == k.len() => {
                let v = typed(table.get(&k), raw, flip);
                table.insert(k.clone(), v);
                path.push(k);
                return Some(path.join("."));
            }
            Some(k) => {
                rest = &rest[k.len() + 1..];
                path.push(k.clone());
                match table.get_mut(&k) {
                    Some(Value::Table(t)) => table = t,
                    // A scalar followed by more name: not ours.
                    _ => return None,
                }
            }
            None if path.is_empty() => return None,
            None => {
                let k = rest.to_ascii_lowercase();
                table.insert(k.clone(), typed(None, raw, flip));
                path.push(k);
                return Some(path.join("."));
            }
        }
    }
}

/// [`typed_like`], or with `flip` the other reading (string ↔ literal).
fn typed(old: Option<&Value>, raw: &str, flip: bool) -> Value {
    match (typed_like(old, raw), flip) {
        (v, false) => v,
        (Value::String(_), true) => typed_like(Some(&Value::Integer(0)), raw),
        (_, true) => Value::String(raw.to_owned()),
    }
}

/// Reads an environment value as the type the key already has (so
/// `GRS_X_PORT=8080` stays an integer), else as a TOML literal (bool, number,
/// array), else as a string.
fn typed_like(old: Option<&Value>, raw: &str) -> Value {
    let parsed = || {
        raw.parse::<Value>().ok().or_else(|| {
            format!("v = {raw}")
                .parse::<Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
        })
    };
    match old {
        Some(Value::String(_)) | None if !looks_literal(raw) => Value::String(raw.to_owned()),
        Some(Value::String(_)) => Value::String(raw.to_owned()),
        Some(Value::Array(_)) if !raw.trim_start().starts_with('[') => Value::Array(
            raw.split(',')
                .map(|s| Value::String(s.trim().to_owned()))
                .filter(|v| v.as_str() != Some(""))
                .collect(),
        ),
        _ => parsed().unwrap_or_else(|| Value::String(raw.to_owned())),
    }
}

fn looks_literal(raw: &str) -> bool {
    let t = raw.trim();
    t == "true"
        || t == "false"
        || t.parse::<i64>().is_ok()
        || t.parse::<f64>().is_ok()
        || t.starts_with('[')
}

/// Resolves a secret given either inline (usually from the environment) or
/// as a file (`<key>_file`); the file's content is trimmed of its trailing
/// newline. `Ok(None)` when neither is set.
pub fn secret(
    key: &str,
    inline: Option<&SecretString>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, ConfigError> {
    if let Some(s) = inline {
        return Ok(Some(s.clone()));
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key: format!("{key}_file"),
        path: path.to_owned(),
        source,
    })?;
    Ok(Some(SecretString::from(
        text.trim_end_matches(['\n', '\r']).to_owned(),
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use secrecy::ExposeSecret;
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Top {
        redis: Redis,
        pools: BTreeMap<String, Pool>,
        grpc: Grpc,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Redis {
        url: String,
        key_prefix: String,
    }
    impl Default for Redis {
        fn default() -> Self {
            Self {
                url: "redis://127.0.0.1:6379".into(),
                key_prefix: "grs".into(),
            }
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Pool {
        labels: Vec<String>,
        max_instances: u32,
        paused: bool,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Grpc {
        port: u16,
        #[serde(skip_serializing)]
        auth_token: Option<SecretString>,
        auth_token_file: Option<PathBuf>,
    }
    impl PartialEq for Grpc {
        fn eq(&self, o: &Self) -> bool {
            self.port == o.port
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> Table {
        parse_file(Path::new("grs.toml"), text).unwrap()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c: Top = load_from(None, env(&[])).unwrap();
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
    }

    #[test]
    fn environment_overrides_the_file_including_nested_pool_keys() {
        let f = file(
            "[redis]\nurl = 'redis://file'\n[pools.linux-x64]\nlabels = ['a']\nmax_instances = 2\n",
        );
        let c: Top = load_from(
            Some(f),
            env(&[
                ("GRS_REDIS_URL", "redis://env:6380"),
                ("GRS_REDIS_KEY_PREFIX", "ci"),
                ("GRS_POOLS_LINUX_X64_MAX_INSTANCES", "7"),
                ("GRS_POOLS_LINUX_X64_PAUSED", "true"),
                ("GRS_POOLS_LINUX_X64_LABELS", "self-hosted, linux"),
                ("OTHER_VAR", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.redis.url, "redis://env:6380");
        assert_eq!(c.redis.key_prefix, "ci");
        let p = &c.pools["linux-x64"];
        assert_eq!(p.max_instances, 7);
        assert!(p.paused);
        assert_eq!(p.labels, vec!["self-hosted", "linux"]);
    }

    #[test]
    fn secrets_come_from_the_environment_though_they_never_serialize() {
        let c: Top = load_from(None, env(&[("GRS_GRPC_AUTH_TOKEN", "s3cret")])).unwrap();
        assert_eq!(c.grpc.auth_token.unwrap().expose_secret(), "s3cret");
    }

    #[test]
    fn variables_for_other_binaries_are_ignored() {
        let c: Top = load_from(
            None,
            env(&[("GRS_WEBHOOK_SECRET", "x"), ("GRS_GATEWAY_LISTEN", "y")]),
        )
        .unwrap();
        assert_eq!(c, Top::default());
    }

    #[test]
    fn a_bad_value_names_the_key_and_the_variable_that_set_it() {
        let e = load_from::<Top, _>(None, env(&[("GRS_GRPC_PORT", "eighty")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`grpc.port`"), "{e}");
        assert!(e.contains("GRS_GRPC_PORT"), "{e}");
    }

    #[test]
    fn the_environment_fixes_a_file_value_of_the_wrong_type() {
        let f = file("[pools.linux]\nmax_instances = 'four'\n");
        let c: Top = load_from(
            Some(f.clone()),
            env(&[("GRS_POOLS_LINUX_MAX_INSTANCES", "4")]),
        )
        .unwrap();
        assert_eq!(c.pools["linux"].max_instances, 4);
        // A string key set to digits stays a string.
        let c: Top = load_from(None, env(&[("GRS_REDIS_KEY_PREFIX", "2024")])).unwrap();
        assert_eq!(c.redis.key_prefix, "2024");
        let e = load_from::<Top, _>(Some(f), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pools.linux.max_instances") && !e.contains("set by"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_in_a_section_names_the_key() {
        let e = load_from::<Top, _>(Some(file("[pools.linux]\nmax_instance = 3\n")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pools.linux"), "{e}");
        assert!(e.contains("max_instance"), "{e}");
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let e = parse_file(Path::new("/etc/grs.toml"), "[redis\nurl=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/grs.toml"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn secret_files_are_read_and_trimmed_and_missing_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "abc\n").unwrap();
        let s = secret("grpc.auth_token", None, Some(&p)).unwrap().unwrap();
        assert_eq!(s.expose_secret(), "abc");
        let e = secret("grpc.auth_token", None, Some(&dir.path().join("nope")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("grpc.auth_token_file") && e.contains("nope"),
            "{e}"
        );
        assert!(secret("k", None, None).unwrap().is_none());
    }
}
