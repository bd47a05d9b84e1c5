//! The official PVE API schema (the endpoints GRS uses, PVE 9.1) and a
//! validator for requests against it.
//!
//! `schema/endpoints.json` is a copy of `shared/fixtures/proxmox/endpoints.json`
//! (a test keeps them identical). [`ApiSchema::check`] answers the question
//! PVE's own parameter verification answers: is this method and path known,
//! is every parameter defined, of the right type, format, enum and limits,
//! and is every required one present? The client's tests, the simulator (on
//! every request it receives) and the fakepve tests all use it, so GRS never
//! relies on a request real PVE would refuse.
//!
//! Error texts follow PVE's wording (`property is not defined in schema ...`,
//! `type check ('integer') failed - got 'x'`, ...).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

/// The bundled endpoints extract.
pub const ENDPOINTS_JSON: &str = include_str!("../schema/endpoints.json");

/// One method and path of the API.
#[derive(Debug)]
pub struct Endpoint {
    /// `GET`, `POST`, `PUT`, `DELETE`.
    pub method: String,
    /// The path template, e.g. `/nodes/{node}/qemu/{vmid}/clone`.
    pub path: String,
    segments: Vec<String>,
    /// Parameter schemas by name (`net[n]` for indexed ones).
    pub params: BTreeMap<String, Value>,
}

/// A request the schema refuses, with PVE-style per-parameter errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method} {path}: {}", fmt_errs(.errors))]
pub struct Violation {
    /// HTTP method.
    pub method: String,
    /// Concrete path.
    pub path: String,
    /// No such endpoint (PVE answers 501) rather than bad parameters (400).
    pub unknown_endpoint: bool,
    /// Parameter name to what is wrong with it.
    pub errors: BTreeMap<String, String>,
}

fn fmt_errs(e: &BTreeMap<String, String>) -> String {
    e.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The parsed schema.
#[derive(Debug)]
pub struct ApiSchema {
    endpoints: Vec<Endpoint>,
}

/// Why an `endpoints.json` extract cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaFileError {
    /// Not JSON.
    #[error("endpoints.json is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an extract: what is missing.
    #[error("endpoints.json: {0}")]
    Shape(&'static str),
}

impl ApiSchema {
    /// The bundled schema, parsed once.
    pub fn bundled() -> &'static ApiSchema {
        static S: OnceLock<ApiSchema> = OnceLock::new();
        S.get_or_init(|| {
            ApiSchema::from_json(ENDPOINTS_JSON).expect("bundled endpoints.json parses")
        })
    }

    /// Parses an `endpoints.json` extract.
    pub fn from_json(text: &str) -> Result<Self, SchemaFileError> {
        let v: Value = serde_json::from_str(text)?;
        let list = v
            .get("endpoints")
            .and_then(Value::as_array)
            .ok_or(SchemaFileError::Shape("no endpoints array"))?;
        let mut endpoints = Vec::new();
        for e in list {
            let method = e["method"]
                .as_str()
                .ok_or(SchemaFileError::Shape("endpoint without method"))?
                .to_owned();
            let path = e["path"]
                .as_str()
                .ok_or(SchemaFileError::Shape("endpoint without path"))?
                .to_owned();
            let mut params = BTreeMap::new();
            for p in e["parameters"].as_array().into_iter().flatten() {
                if let Some(n) = p["name"].as_str() {
                    params.insert(n.to_owned(), p.clone());
                }
            }
            endpoints.push(Endpoint {
                segments: split(&path),
                method,
                path,
                params,
            });
        }
        Ok(Self { endpoints })
    }

    /// Every endpoint.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The endpoint serving `method path`, with the path's parameters.
    pub fn find(&self, method: &str, path: &str) -> Option<(&Endpoint, Vec<(String, String)>)> {
        let segs = split(path);
        self.endpoints.iter().find_map(|e| {
            if !e.method.eq_ignore_ascii_case(method) || e.segments.len() != segs.len() {
                return None;
            }
            let mut vars = Vec::new();
            for (t, s) in e.segments.iter().zip(&segs) {
                if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                    vars.push((name.to_owned(), s.clone()));
                } else if t != s {
                    return None;
                }
            }
            Some((e, vars))
        })
    }

    /// Checks one request: `params` are the query or body pairs (repeated
    /// names for arrays), the path's own parameters are taken from `path`.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        params: &[(String, String)],
    ) -> Result<&Endpoint, Violation> {
        let violation = |unknown, errors| Violation {
            method: method.to_owned(),
            path: path.to_owned(),
            unknown_endpoint: unknown,
            errors,
        };
        let Some((ep, vars)) = self.find(method, path) else {
            let mut errors = BTreeMap::new();
            errors.insert(
                "path".to_owned(),
                format!("Method '{method} {path}' not implemented"),
            );
            return Err(violation(true, errors));
        };
        let mut values: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (k, v) in vars.iter().chain(params) {
            values.entry(k.as_str()).or_default().push(v.as_str());
        }
        let mut errors = BTreeMap::new();
        for (name, vals) in &values {
            let Some(schema) = ep.param(name) else {
                errors.insert(
                    (*name).to_owned(),
                    "property is not defined in schema and the schema does not allow additional properties"
                        .to_owned(),
                );
                continue;
            };
            let is_array = schema["type"] == "array";
            if vals.len() > 1 && !is_array {
                errors.insert(
                    (*name).to_owned(),
                    "duplicate parameter (not an array)".to_owned(),
                );
                continue;
            }
            let item_schema = if is_array { &schema["items"] } else { schema };
            for v in vals {
                if let Err(m) = check_value(item_schema, v) {
                    errors.insert((*name).to_owned(), m);
                    break;
                }
            }
        }
        for (name, p) in &ep.params {
            let optional =
                p["optional"].as_i64().unwrap_or(0) == 1 || p["optional"].as_bool() == Some(true);
            if !optional && !name.contains("[n]") && !values.contains_key(name.as_str()) {
                errors.insert(
                    name.clone(),
                    "property is missing and it is not optional".to_owned(),
                );
            }
        }
        if errors.is_empty() {
            Ok(ep)
        } else {
            Err(violation(false, errors))
        }
    }
}

impl Endpoint {
    /// The schema of parameter `name` (`net0` finds `net[n]`).
    pub fn param(&self, name: &str) -> Option<&Value> {
        if let Some(p) = self.params.get(name) {
            return Some(p);
        }
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
        if stem.len() < name.len() {
            return self.params.get(&format!("{stem}[n]"));
        }
        None
    }
}

fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Checks one value against a parameter (or property-string key) schema.
fn check_value(schema: &Value, v: &str) -> Result<(), String> {
    match schema["type"].as_str().unwrap_or("string") {
        "integer" => {
            let n: i64 = v
                .parse()
                .map_err(|_| format!("type check ('integer') failed - got '{v}'"))?;
            check_limits(schema, n as f64)?;
        }
        "number" => {
            let n: f64 = v
                .parse()
                .map_err(|_| format!("type check ('number') failed - got '{v}'"))?;
            check_limits(schema, n)?;
        }
        "boolean" => {
            if !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "1" | "true" | "false" | "yes" | "no" | "on" | "off"
            ) {
                return Err(format!("type check ('boolean') failed - got '{v}'"));
            }
        }
        "array" => {}
        _ => {
            let len = v.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64()
                && len > max
            {
                return Err(format!("value may only be {max} characters long"));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && len < min
            {
                return Err(format!("value must be at least {min} characters long"));
            }
        }
    }
    if let Some(en) = schema["enum"].as_array()
        && !en.iter().any(|e| e.as_str() == Some(v))
    {
        let list: Vec<&str> = en.iter().filter_map(Value::as_str).collect();
        return Err(format!(
            "value '{v}' does not have a value in the enumeration '{}'",
            list.join(", ")
        ));
    }
    if let Some(p) = schema["pattern"].as_str() {
        let re = Regex::new(&format!("^(?:{p})$")).map_err(|e| format!("bad pattern {p}: {e}"))?;
        if !re.is_match(v) {
            return Err("value does not match the regex pattern".to_owned());
        }
    }
    match &schema["format"] {
        Value::Null => Ok(()),
        Value::Object(sub) => check_property_string(sub, v),
        Value::String(f) => check_format(f, v),
        other => Err(format!("unknown format {other}")),
    }
}

fn check_limits(schema: &Value, n: f64) -> Result<(), String> {
    if let Some(min) = schema["minimum"].as_f64()
        && n < min
    {
        return Err(format!("value must have a minimum value of {min}"));
    }
    if let Some(max) = schema["maximum"].as_f64()
        && n > max
    {
        return Err(format!("value must have a maximum value of {max}"));
    }
    Ok(())
}

/// A property string (`key=value,...`) against its sub-schema.
fn check_property_string(sub: &serde_json::Map<String, Value>, v: &str) -> Result<(), String> {
    let default_key = sub
        .iter()
        .find(|(_, s)| s["default_key"].as_i64() == Some(1) || s["default_key"] == true)
        .map(|(k, _)| k.as_str());
    let mut seen = std::collections::HashSet::new();
    for part in v.split(',').filter(|p| !p.is_empty()) {
        let (key, val) = match part.split_once('=') {
            Some((k, val)) => (k, Some(val)),
            None => match sub.get(part) {
                // A bare key alias such as `virtio` (model without MAC).
                Some(s) if s.get("keyAlias").is_some() => (part, None),
                _ => match default_key {
                    Some(k) => (k, Some(part)),
                    None => {
                        return Err(format!(
                            "invalid format - value without key, but schema does not define a default key ('{part}')"
                        ));
                    }
                },
            },
        };
        let Some(ks) = sub.get(key) else {
            return Err(format!(
                "invalid format - property '{key}' is not defined in schema"
            ));
        };
        let target = ks.get("alias").and_then(Value::as_str).unwrap_or(key);
        if !seen.insert(
            ks.get("keyAlias")
                .and_then(Value::as_str)
                .unwrap_or(target)
                .to_owned(),
        ) {
            return Err(format!(
                "invalid format - duplicate key in comma-separated list property: {key}"
            ));
        }
        let Some(ts) = sub.get(target) else {
            return Err(format!(
                "invalid format - property '{target}' is not defined in schema"
            ));
        };
        if let Some(val) = val {
            check_value(ts, val).map_err(|m| format!("invalid format - {key}: {m}"))?;
        }
    }
    Ok(())
}

fn re(p: &str) -> Regex {
    Regex::new(p).expect("static regex")
}

/// Named formats of pve-common's JSONSchema that GRS's requests use. A
/// format not listed is a violation: the check must never pass silently.
fn check_format(f: &str, v: &str) -> Result<(), String> {
    static LABEL: OnceLock<Regex> = OnceLock::new();
    static DNS: OnceLock<Regex> = OnceLock::new();
    static STORAGE: OnceLock<Regex> = OnceLock::new();
    static POOL: OnceLock<Regex> = OnceLock::new();
    static TAG: OnceLock<Regex> = OnceLock::new();
    static BRIDGE: OnceLock<Regex> = OnceLock::new();
    static MAC: OnceLock<Regex> = OnceLock::new();
    let label = || LABEL.get_or_init(|| re(r"^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$"));
    let ok = match f {
        "pve-vmid" => v.parse::<u64>().is_ok(),
        "pve-node" => label().is_match(v),
        "dns-name" => DNS
            .get_or_init(|| re(r"^([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$"))
            .is_match(v),
        "pve-storage-id" => STORAGE
            .get_or_init(|| re(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$"))
            .is_match(v),
        "pve-poolid" => POOL
            .get_or_init(|| re(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+){0,2}$"))
            .is_match(v),
        "pve-tag-list" => {
            let t = TAG.get_or_init(|| re(r"^[a-z0-9_][a-z0-9_\-+.]*$"));
            let tags = crate::client::split_tags(v);
            !tags.is_empty() && tags.iter().all(|x| t.is_match(&x.to_ascii_lowercase()))
        }
        "pve-bridge-id" => BRIDGE.get_or_init(|| re(r"^[-_.\w\d]+$")).is_match(v),
        "mac-addr" => MAC
            .get_or_init(|| re(r"^[a-fA-F0-9]{2}(:[a-fA-F0-9]{2}){5}$"))
            .is_match(v),
        "pve-qm-smbios1" => return check_smbios1(v),
        other => return Err(format!("format '{other}' is not checked by GRS's validator")),
    };
    if ok {
        Ok(())
    } else {
        let what = match f {
            "dns-name" => "value does not look like a valid DNS name".to_owned(),
            "pve-tag-list" => "invalid tag list".to_owned(),
            other => format!("value does not look like a valid {other}"),
        };
        Err(format!("invalid format - {what}"))
    }
}

/// `pve-qm-smbios1` (qemu-server's SMBIOS type 1 fields). With `base64=1`
/// every value must be base64.
fn check_smbios1(v: &str) -> Result<(), String> {
    use base64::Engine;
    const KEYS: &[&str] = &[
        "uuid",
        "version",
        "serial",
        "manufacturer",
        "product",
        "sku",
        "family",
        "base64",
    ];
    let mut b64 = false;
    let mut fields = Vec::new();
    for part in v.split(',').filter(|p| !p.is_empty()) {
        let (k, val) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid format - smbios1 value without key ('{part}')"))?;
        if !KEYS.contains(&k) {
            return Err(format!(
                "invalid format - property '{k}' is not defined in schema"
            ));
        }
        if k == "base64" {
            b64 = matches!(val, "1" | "true" | "yes" | "on");
        } else if k == "uuid" {
            let uuid = re(r"^[a-fA-F0-9]{8}(-[a-fA-F0-9]{4}){3}-[a-fA-F0-9]{12}$");
            if !uuid.is_match(val) {
                return Err("invalid format - smbios1 uuid is not a UUID".to_owned());
            }
        } else {
            fields.push(val);
        }
    }
    if b64 {
        for f in fields {
            base64::engine::general_purpose::STANDARD
                .decode(f)
                .map_err(|_| "invalid format - smbios1 value is not valid base64".to_owned())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn the_bundled_schema_has_every_endpoint_grs_uses() {
        let s = ApiSchema::bundled();
        assert_eq!(s.endpoints().len(), 44);
        assert!(s.find("POST", "/nodes/pve1/qemu/9000/clone").is_some());
        assert!(s.find("PATCH", "/nodes/pve1/qemu/9000/clone").is_none());
    }

    #[test]
    fn unknown_parameters_wrong_types_limits_and_formats_are_refused_with_pve_wording() {
        let s = ApiSchema::bundled();
        let path = "/nodes/pve1/qemu/9000/clone";
        s.check(
            "POST",
            path,
            &p(&[("newid", "101"), ("name", "grs-1"), ("full", "0")]),
        )
        .unwrap();
        let e = s.check("POST", path, &p(&[("newid", "x")])).unwrap_err();
        assert_eq!(e.errors["newid"], "type check ('integer') failed - got 'x'");
        let e = s.check("POST", path, &p(&[("newid", "99")])).unwrap_err();
        assert!(e.errors["newid"].contains("minimum value of 100"), "{e}");
        let e = s
            .check("POST", path, &p(&[("newid", "101"), ("nme", "a")]))
            .unwrap_err();
        assert!(e.errors["nme"].contains("not defined in schema"));
        let e = s
            .check("POST", path, &p(&[("newid", "101"), ("name", "a_b")]))
            .unwrap_err();
        assert!(e.errors["name"].contains("valid DNS name"));
        let e = s.check("POST", path, &p(&[])).unwrap_err();
        assert!(e.errors["newid"].contains("not optional"));
        let e = s
            .check("GET", "/cluster/resources", &p(&[("type", "vms")]))
            .unwrap_err();
        assert!(e.errors["type"].contains("enumeration"));
        let e = s.check("GET", "/nodes/pve1/florp", &[]).unwrap_err();
        assert!(e.unknown_endpoint);
    }

    #[test]
    fn property_strings_are_checked_key_by_key() {
        let s = ApiSchema::bundled();
        let path = "/nodes/pve1/qemu/101/config";
        s.check(
            "PUT",
            path,
            &p(&[
                ("net0", "virtio,bridge=vmbr0,tag=10"),
                ("agent", "enabled=1"),
                ("memory", "2048"),
                ("tags", "grs;grs-p-linux"),
                (
                    "smbios1",
                    "uuid=6f1f2a4e-1b2c-4d3e-8f90-a1b2c3d4e5f6,serial=ZHM9bm9jbG91ZA==,base64=1",
                ),
            ]),
        )
        .unwrap();
        let e = s
            .check("PUT", path, &p(&[("net0", "virtio,bridge=vmbr0,tag=5000")]))
            .unwrap_err();
        assert!(e.errors["net0"].contains("tag"), "{e}");
        let e = s
            .check("PUT", path, &p(&[("net0", "virtio,brdge=vmbr0")]))
            .unwrap_err();
        assert!(e.errors["net0"].contains("brdge"), "{e}");
        let e = s
            .check("PUT", path, &p(&[("smbios1", "serial=???,base64=1")]))
            .unwrap_err();
        assert!(e.errors["smbios1"].contains("base64"), "{e}");
        let e = s
            .check("PUT", path, &p(&[("smbios1", &"a".repeat(600))]))
            .unwrap_err();
        assert!(e.errors["smbios1"].contains("512"), "{e}");
        let e = s
            .check("PUT", path, &p(&[("tags", "Not Ok!")]))
            .unwrap_err();
        assert!(e.errors["tags"].contains("tag"), "{e}");
    }

    #[test]
    fn arrays_take_repeated_parameters() {
        let s = ApiSchema::bundled();
        s.check(
            "POST",
            "/nodes/pve1/qemu/101/agent/exec",
            &p(&[
                ("command", "/opt/runner/run.sh"),
                ("command", "--jitconfig"),
            ]),
        )
        .unwrap();
        let e = s
            .check(
                "POST",
                "/nodes/pve1/qemu/101/agent/file-write",
                &p(&[("file", "a"), ("file", "b"), ("content", "x")]),
            )
            .unwrap_err();
        assert!(e.errors["file"].contains("duplicate"));
    }
}
