//! Every key a configuration type reads, found from the type itself.
//!
//! [`keys`] walks a type's `Deserialize` implementation with a deserializer
//! that answers every question with a sample value: each struct it meets
//! hands over its field names (`deserialize_struct` receives them), an
//! `Option` is always `Some`, a map has one entry, written `<name>`
//! (`pools.<name>.labels`). What comes out is the dotted path of every leaf
//! key, secrets included (they deserialize, though they never serialize).
//! The configuration reference (`docs/configuration.md`) is checked against
//! it, so a key added to a config struct without being documented fails a
//! test.
//!
//! Limits: a struct with a `#[serde(flatten)]` field is read by serde as a
//! map whose keys the walker cannot know; such a struct's required keys are
//! still found (from serde's "missing field" errors), its optional ones are
//! not. A sample that a field refuses (a duration, an address) is replaced by
//! the next of [`SAMPLES`] until the walk succeeds.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::rc::Rc;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};

/// A map entry's name in paths (`pools.<name>.labels`).
pub const NAME: &str = "<name>";

/// Strings offered to a string field, in turn, until it takes one.
pub const SAMPLES: &[&str] = &["1s", "127.0.0.1:1", "http://127.0.0.1:1", "x"];

/// Why the keys of a type could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// The type asks for the same field twice, or fails in a way the walk
    /// cannot answer.
    #[error("cannot walk the type: {message}")]
    Walk {
        /// The deserializer's message.
        message: String,
    },
    /// No sample value is accepted by the leaf at `key`.
    #[error("no sample fits `{key}`: {message}")]
    NoSample {
        /// The leaf's dotted path.
        key: String,
        /// The deserializer's message for the last sample.
        message: String,
    },
    /// The walk kept finding new fields.
    #[error("the walk did not settle")]
    Unsettled,
}

/// The dotted paths of every leaf key `T` reads, sorted.
pub fn keys<T: DeserializeOwned>() -> Result<Vec<String>, KeysError> {
    let state = Rc::new(RefCell::new(State::default()));
    for _ in 0..500 {
        {
            let mut s = state.borrow_mut();
            s.leaves.clear();
            s.at = String::new();
        }
        let walker = Walker {
            path: Vec::new(),
            state: state.clone(),
            record: true,
        };
        match T::deserialize(walker) {
            Ok(_) => {
                let s = state.borrow();
                return Ok(s.leaves.iter().cloned().collect());
            }
            Err(e) => {
                let mut s = state.borrow_mut();
                let msg = e.to_string();
                if let Some(field) = missing_field(&msg) {
                    let at = s.map_at.clone();
                    let extra = s.extra.entry(at).or_default();
                    if !extra.insert(field.to_owned()) {
                        return Err(KeysError::Walk { message: msg });
                    }
                } else {
                    let at = s.at.clone();
                    let n = s.sample.entry(at.clone()).or_default();
                    *n += 1;
                    if *n >= SAMPLES.len() {
                        return Err(KeysError::NoSample {
                            key: at,
                            message: msg,
                        });
                    }
                }
            }
        }
    }
    Err(KeysError::Unsettled)
}

fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

#[derive(Default)]
struct State {
    /// Leaf keys found in this walk.
    leaves: BTreeSet<String>,
    /// The leaf being read (where a refused sample came from).
    at: String,
    /// The map being read (where a missing field belongs).
    map_at: String,
    /// Per leaf, the index of the sample to offer.
    sample: BTreeMap<String, usize>,
    /// Per map (a struct with a flattened field), the keys it requires.
    extra: BTreeMap<String, BTreeSet<String>>,
}

struct Walker {
    path: Vec<String>,
    state: Rc<RefCell<State>>,
    /// False for a list's element: the list is the leaf, not its element
    /// (a list of tables still has its tables' keys, `nodes[].name`).
    record: bool,
}

type Error = de::value::Error;

impl Walker {
    fn child(&self, key: &str) -> Self {
        let mut path = self.path.clone();
        path.push(key.to_owned());
        Self {
            path,
            state: self.state.clone(),
            record: true,
        }
    }

    fn dotted(&self) -> String {
        self.path.join(".")
    }

    /// Records this path as a leaf key and returns the sample string for it.
    fn leaf(&self) -> &'static str {
        let p = self.dotted();
        let mut s = self.state.borrow_mut();
        let i = s.sample.get(&p).copied().unwrap_or(0);
        if self.record {
            s.leaves.insert(p.clone());
        }
        s.at = p;
        SAMPLES[i.min(SAMPLES.len() - 1)]
    }
}

macro_rules! leaf_number {
    ($($m:ident => $visit:ident($v:expr)),* $(,)?) => {$(
        fn $m<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.leaf();
            visitor.$visit($v)
        }
    )*};
}

impl<'de> Deserializer<'de> for Walker {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let s = self.leaf();
        visitor.visit_str(s)
    }

    leaf_number! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(1),
        deserialize_i16 => visit_i64(1),
        deserialize_i32 => visit_i64(1),
        deserialize_i64 => visit_i64(1),
        deserialize_u8 => visit_u64(1),
        deserialize_u16 => visit_u64(1),
        deserialize_u32 => visit_u64(1),
        deserialize_u64 => visit_u64(1),
        deserialize_f32 => visit_f64(1.0),
        deserialize_f64 => visit_f64(1.0),
        deserialize_char => visit_char('x'),
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let s = self.leaf();
        visitor.visit_str(s)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_bytes(b"x")
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // The elements of a list are not keys: a list is one leaf (its
        // elements' structs, if any, are walked under the same path).
        self.leaf();
        visitor.visit_seq(Seq {
            walker: Some(self),
            left: 1,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_seq(Seq {
            walker: Some(self),
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let here = self.dotted();
        let keys: Vec<String> = {
            let mut s = self.state.borrow_mut();
            s.map_at = here.clone();
            let mut k: Vec<String> = s
                .extra
                .get(&here)
                .map(|e| e.iter().cloned().collect())
                .unwrap_or_default();
            k.push(NAME.to_owned());
            k
        };
        visitor.visit_map(Map {
            walker: self,
            keys: keys.into_iter(),
            current: None,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_map(Map {
            walker: self,
            keys: fields
                .iter()
                .map(|f| (*f).to_owned())
                .collect::<Vec<_>>()
                .into_iter(),
            current: None,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.leaf();
        let first: &'static str = variants.first().copied().unwrap_or("");
        visitor.visit_enum(IntoDeserializer::<Error>::into_deserializer(first))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

struct Seq {
    walker: Option<Walker>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Seq {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let w = self.walker.as_ref().map(|w| {
            let mut path = w.path.clone();
            if let Some(last) = path.last_mut() {
                last.push_str("[]");
            }
            Walker {
                path,
                state: w.state.clone(),
                record: false,
            }
        });
        match w {
            Some(w) => seed.deserialize(w).map(Some),
            None => Ok(None),
        }
    }
}

struct Map {
    walker: Walker,
    keys: std::vec::IntoIter<String>,
    current: Option<String>,
}

impl<'de> MapAccess<'de> for Map {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.keys.next() {
            Some(k) => {
                let v = seed.deserialize(k.as_str().into_deserializer())?;
                self.current = Some(k);
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let key = self.current.take().unwrap_or_default();
        seed.deserialize(self.walker.child(&key))
    }
}

impl fmt::Debug for Walker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Walker").field("path", &self.path).finish()
    }
}

/// The environment variable that overrides `path` (`pools.<name>.labels` →
/// `GRS_POOLS_<NAME>_LABELS`), as [`crate::load`] resolves them.
pub fn env_var(path: &str) -> String {
    let mut v = crate::ENV_PREFIX.to_owned();
    v.push_str(
        &path
            .split('.')
            .map(|p| p.to_ascii_uppercase().replace('-', "_"))
            .collect::<Vec<_>>()
            .join("_"),
    );
    v
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use secrecy::SecretString;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    #[serde(default, deny_unknown_fields)]
    #[allow(dead_code)]
    struct Top {
        listen: SocketAddr,
        #[serde(deserialize_with = "humantime_serde_like::deserialize")]
        grace: Duration,
        token: Option<SecretString>,
        token_file: Option<PathBuf>,
        kind: Kind,
        pools: BTreeMap<String, Pool>,
        inner: Option<Inner>,
        nodes: Vec<Inner>,
        #[serde(skip)]
        derived: String,
    }
    impl Default for Top {
        fn default() -> Self {
            Self {
                listen: ([127, 0, 0, 1], 1).into(),
                grace: Duration::ZERO,
                token: None,
                token_file: None,
                kind: Kind::A,
                pools: BTreeMap::new(),
                inner: None,
                nodes: Vec::new(),
                derived: String::new(),
            }
        }
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        A,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    #[allow(dead_code)]
    struct Pool {
        labels: Vec<String>,
        max: u32,
        backend: Option<Flat>,
    }
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Flat {
        #[serde(rename = "type")]
        kind: String,
        #[serde(flatten)]
        rest: BTreeMap<String, String>,
    }
    #[derive(Deserialize, Default)]
    #[allow(dead_code)]
    struct Inner {
        flag: bool,
    }

    /// A duration from a string, as humantime_serde does (refuses samples
    /// that are not durations).
    mod humantime_serde_like {
        use std::time::Duration;

        use serde::Deserialize;

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            let s = String::deserialize(d)?;
            s.strip_suffix('s')
                .and_then(|n| n.parse().ok())
                .map(Duration::from_secs)
                .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a duration")))
        }
    }

    #[test]
    fn every_leaf_key_is_found_secrets_optionals_maps_and_required_flattened_keys_included() {
        let k = keys::<Top>().unwrap();
        assert_eq!(
            k,
            [
                "grace",
                "inner.flag",
                "kind",
                "listen",
                "nodes",
                "nodes[].flag",
                "pools.<name>.backend.<name>",
                "pools.<name>.backend.type",
                "pools.<name>.labels",
                "pools.<name>.max",
                "token",
                "token_file",
            ]
        );
    }

    #[test]
    fn environment_variables_follow_the_loaders_naming() {
        assert_eq!(env_var("redis.url"), "GRS_REDIS_URL");
        assert_eq!(
            env_var("pools.<name>.max_instances"),
            "GRS_POOLS_<NAME>_MAX_INSTANCES"
        );
    }
}
