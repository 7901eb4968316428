//! Validation against `configs/defaults.yaml`, which is the schema: a key is
//! known when defaults declare it, and its type is the type of its default.
//! The exact rule is written at the top of defaults.yaml; in short:
//!   - below a default that is `{}`, a list or null, anything goes (per-loss
//!     kwargs, HEAD.PARAMS, TRANSFORMS, ...), as are maps named in the
//!     top-level `tessera_open_keys:` list of defaults.yaml;
//!   - every other key must exist in defaults;
//!   - bool, integer, string, list, map must match; a float default accepts
//!     integers too ("number"); null is accepted where the default is a
//!     string, list, `{}` or null (VISSL files write `EXPERIMENT_LOG_DIR:`).
//!
//! VISSL itself checks nothing (its AttrDict takes any key), which is how a
//! typo silently falls back to a default there.

use std::sync::OnceLock;

use serde_json::Value;

use super::error::{ConfigError, Origin};
use super::load;

pub(crate) struct Schema {
    /// The `config` subtree of defaults.yaml: the defaults and the schema.
    pub tree: Value,
    /// Dotted paths of maps whose sub-keys are free although not empty.
    open: Vec<String>,
}

pub(crate) enum Lookup<'a> {
    /// Declared in defaults; the value is the default.
    Known(&'a Value),
    /// Below an open node: not checked.
    Open,
    /// `path[..=i]` is not declared (i is the first unknown segment).
    Unknown(usize),
}

static SCHEMA: OnceLock<Result<Schema, ConfigError>> = OnceLock::new();

pub(crate) const DEFAULTS_FILE: &str = "defaults.yaml";

pub(crate) fn schema() -> Result<&'static Schema, ConfigError> {
    SCHEMA.get_or_init(build).as_ref().map_err(Clone::clone)
}

fn build() -> Result<Schema, ConfigError> {
    let label = format!("{}/{DEFAULTS_FILE}", load::EMBEDDED_PREFIX);
    let layout = |message: &str| ConfigError::Layout { file: label.clone(), message: message.to_string() };
    let text = load::embedded_text(DEFAULTS_FILE).ok_or_else(|| layout("missing from the build"))?;
    let mut top: Value = load::parse_yaml_value(&label, text)?;
    let open = match top.as_object_mut().and_then(|m| m.remove("tessera_open_keys")) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(layout("`tessera_open_keys` must be a list of dotted keys")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(layout("`tessera_open_keys` must be a list of dotted keys")),
    };
    match top.get("config") {
        Some(tree @ Value::Object(_)) => Ok(Schema { tree: tree.clone(), open }),
        _ => Err(layout("must have a top-level `config:` mapping")),
    }
}

impl Schema {
    fn is_open(&self, path: &[String], node: &Value) -> bool {
        match node {
            Value::Null | Value::Array(_) => true,
            Value::Object(map) => map.is_empty() || self.open.iter().any(|p| *p == path.join(".")),
            _ => false,
        }
    }

    pub fn lookup(&self, path: &[String]) -> Lookup<'_> {
        let mut node = &self.tree;
        for (i, segment) in path.iter().enumerate() {
            if self.is_open(&path[..i], node) {
                return Lookup::Open;
            }
            match node.as_object().and_then(|m| m.get(segment)) {
                Some(child) => node = child,
                None => return Lookup::Unknown(i),
            }
        }
        Lookup::Known(node)
    }

    /// Checks `value`, placed at `path`, and everything below it; errors are
    /// pushed, so a file reports all its problems at once.
    pub fn check(
        &self,
        path: &mut Vec<String>,
        value: &Value,
        origin: &dyn Fn(&[String]) -> Origin,
        errors: &mut Vec<ConfigError>,
    ) {
        let default = match self.lookup(path) {
            Lookup::Open => return,
            Lookup::Unknown(i) => {
                errors.push(self.unknown(path, i, origin(&path[..=i])));
                return;
            }
            Lookup::Known(default) => default,
        };
        if !accepts(default, value) {
            errors.push(ConfigError::WrongType {
                key: path.join("."),
                expected: expected(default).to_string(),
                found: describe(value),
                origin: origin(path),
            });
            return;
        }
        if let (Value::Object(_), Value::Object(children)) = (default, value) {
            if self.is_open(path, default) {
                return;
            }
            for (key, child) in children {
                path.push(key.clone());
                self.check(path, child, origin, errors);
                path.pop();
            }
        }
    }

    /// The unknown-key error for `path[..=i]`, with the closest known key.
    pub fn unknown(&self, path: &[String], i: usize, origin: Origin) -> ConfigError {
        ConfigError::UnknownKey { key: path.join("."), origin, suggestion: self.suggest(path, i) }
    }

    /// The closest declared key to `path`, whose segment `i` is unknown:
    /// 1. a sibling of that segment with a similar name (typos, case), keeping
    ///    the rest of the path when it exists there;
    /// 2. a declared key ending in the same segments (a key put at the wrong
    ///    level, e.g. `MODEL.HIDDEN_DIM`);
    /// 3. a declared key whose full dotted path is similar.
    fn suggest(&self, path: &[String], i: usize) -> Option<String> {
        let parent = &path[..i];
        let rest = &path[i + 1..];
        if let Some(Value::Object(siblings)) = super::merge::get(&self.tree, parent) {
            let best = siblings
                .keys()
                .map(|k| (similarity(&path[i], k), k))
                .filter(|(score, _)| *score >= 0.6)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((_, key)) = best {
                let mut fixed: Vec<String> = parent.to_vec();
                fixed.push(key.clone());
                let with_rest: Vec<String> = fixed.iter().chain(rest).cloned().collect();
                if rest.is_empty() || !matches!(self.lookup(&with_rest), Lookup::Unknown(_)) {
                    return Some(with_rest.join("."));
                }
                return Some(fixed.join("."));
            }
        }
        let wanted = path.join(".");
        let all = self.all_keys();
        let tail: Vec<String> = path[i..].iter().map(|s| s.to_lowercase()).collect();
        let by_tail = all
            .iter()
            .filter(|k| {
                k.len() >= tail.len()
                    && k[k.len() - tail.len()..].iter().zip(&tail).all(|(a, b)| a.to_lowercase() == *b)
            })
            .map(|k| k.join("."))
            .max_by(|a, b| {
                strsim::normalized_levenshtein(&wanted, a).total_cmp(&strsim::normalized_levenshtein(&wanted, b))
            });
        if by_tail.is_some() {
            return by_tail;
        }
        all.iter()
            .map(|k| k.join("."))
            .map(|k| (strsim::normalized_levenshtein(&wanted.to_lowercase(), &k.to_lowercase()), k))
            .filter(|(score, _)| *score >= 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, k)| k)
    }

    /// Every declared key as a path (keys below open nodes are not declared).
    fn all_keys(&self) -> Vec<Vec<String>> {
        fn walk(schema: &Schema, node: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            if let Value::Object(map) = node {
                if !path.is_empty() && schema.is_open(path, node) {
                    return;
                }
                for (key, child) in map {
                    path.push(key.clone());
                    out.push(path.clone());
                    walk(schema, child, path, out);
                    path.pop();
                }
            }
        }
        let mut out = Vec::new();
        walk(self, &self.tree, &mut Vec::new(), &mut out);
        out
    }
}

/// Case-insensitive name similarity in [0, 1]; transpositions count as one edit.
fn similarity(a: &str, b: &str) -> f64 {
    strsim::normalized_damerau_levenshtein(&a.to_lowercase(), &b.to_lowercase())
}

/// Whether `value` may replace `default` (see the module comment).
pub(crate) fn accepts(default: &Value, value: &Value) -> bool {
    match default {
        Value::Null => true,
        Value::Bool(_) => value.is_boolean(),
        Value::Number(n) if n.is_f64() => value.is_number(),
        Value::Number(_) => value.is_i64() || value.is_u64(),
        Value::String(_) => value.is_string() || value.is_null(),
        Value::Array(_) => value.is_array() || value.is_null(),
        Value::Object(map) => value.is_object() || (map.is_empty() && value.is_null()),
    }
}

/// The type a default asks for, as said in errors.
pub(crate) fn expected(default: &Value) -> &'static str {
    match default {
        Value::Null => "any value",
        Value::Bool(_) => "a bool (True/False)",
        Value::Number(n) if n.is_f64() => "a number (integer or float)",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// A value as shown in errors: its type and a short rendering.
pub(crate) fn describe(value: &Value) -> String {
    let short = |v: &Value| {
        let text = v.to_string();
        if text.chars().count() > 60 {
            format!("{}...", text.chars().take(57).collect::<String>())
        } else {
            text
        }
    };
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("bool {b}"),
        Value::Number(n) if n.is_f64() => format!("float {n}"),
        Value::Number(n) => format!("integer {n}"),
        Value::String(_) => format!("string {}", short(value)),
        Value::Array(_) => format!("list {}", short(value)),
        Value::Object(_) => format!("map {}", short(value)),
    }
}
