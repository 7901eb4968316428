//! Command-line overrides, in Hydra's grammar as VISSL uses it:
//!   `A.B=v` / `config.A.B=v`  set an existing key
//!   `+A.B=v`                  add a key that does not exist yet
//!   `++A.B=v`                 set or add
//!   `~A.B` / `~A.B=v`         delete (with `=v`: only if the value is v)
//!   `+config/group/dir=name`  merge the file `configs/group/dir/name.yaml`
//! Values are YAML (`1e-3` a float, `[1,2]` a list, `null` null); numeric
//! segments index lists (`MODEL.HEAD.PARAMS.0.1.dims=[64,10]`).

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::error::{ConfigError, Origin};
use super::load;
use super::merge::{self, deep_merge};
use super::schema::{self, Lookup, Schema};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Set,
    Add,
    Upsert,
    Delete,
}

pub(crate) enum Override<'a> {
    Value {
        text: &'a str,
        op: Op,
        path: Vec<String>,
        raw: Option<&'a str>,
    },
    /// `+config/<group>=<name>`: a config-group file merged at the root.
    Fragment {
        text: &'a str,
        file: String,
    },
}

pub(crate) fn parse(text: &str) -> Result<Override<'_>, ConfigError> {
    let bad = |reason: &str| ConfigError::BadOverride { text: text.to_string(), reason: reason.to_string() };
    let trimmed = text.trim();
    let (op, rest) = if let Some(r) = trimmed.strip_prefix("++") {
        (Op::Upsert, r)
    } else if let Some(r) = trimmed.strip_prefix('+') {
        (Op::Add, r)
    } else if let Some(r) = trimmed.strip_prefix('~') {
        (Op::Delete, r)
    } else {
        (Op::Set, trimmed)
    };
    let (key, raw) = match rest.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v)),
        None => (rest.trim(), None),
    };
    if key.is_empty() {
        return Err(bad("expected KEY=VALUE (e.g. `config.OPTIMIZER.num_epochs=1`)"));
    }
    if raw.is_none() && op != Op::Delete {
        return Err(bad("expected KEY=VALUE; to delete a key write `~KEY`"));
    }
    if key.contains('/') {
        // Hydra config groups: VISSL's `+config/benchmark/.../models=vit_b16`.
        let group = key.strip_prefix("config/").unwrap_or("");
        let name = raw.unwrap_or("").trim();
        if group.is_empty() || name.is_empty() || op == Op::Delete {
            return Err(bad("config groups are written `+config/<group dir>=<file name>`"));
        }
        return Ok(Override::Fragment { text, file: format!("{group}/{name}") });
    }
    if key == "config" {
        return Err(bad("`config=NAME` chooses the experiment config; give it as the config name, not as an override"));
    }
    let mut path: Vec<String> = key.split('.').map(str::to_string).collect();
    // VISSL spells keys `config.A.B`; the tree we hold is already `config`.
    if path.len() > 1 && path[0] == "config" {
        path.remove(0);
    }
    if path.iter().any(|s| s.is_empty()) {
        return Err(bad("empty segment in the key"));
    }
    Ok(Override::Value { text, op, path, raw })
}

/// Merges a config-group file (searched like a config name) into `tree`.
pub(crate) fn apply_fragment(
    tree: &mut Value,
    schema: &Schema,
    text: &str,
    file: &str,
    search_dirs: &[PathBuf],
) -> Result<(), ConfigError> {
    let (label, contents) = load::resolve(file, search_dirs).map_err(|e| match e {
        ConfigError::NotFound { searched, suggestion, .. } => {
            ConfigError::NotFound { name: format!("{file} (from override `{text}`)"), searched, suggestion }
        }
        other => other,
    })?;
    let doc = load::parse_document(&label, &contents)?;
    let mut errors = Vec::new();
    if let Value::Object(map) = &doc.tree {
        for (key, value) in map {
            schema.check(&mut vec![key.clone()], value, &|p| doc.origin(p), &mut errors);
        }
    }
    if let Some(err) = ConfigError::collect(errors) {
        return Err(err);
    }
    deep_merge(tree, doc.tree);
    Ok(())
}

pub(crate) fn apply_value(tree: &mut Value, schema: &Schema, ov: &Override<'_>) -> Result<(), ConfigError> {
    let Override::Value { text, op, path, raw } = ov else {
        return Ok(());
    };
    let (text, op) = (*text, *op);
    let key = path.join(".");
    let origin = Origin::Override(text.to_string());
    let bad = |reason: String| ConfigError::BadOverride { text: text.to_string(), reason };

    let default = match schema.lookup(path) {
        Lookup::Unknown(i) => return Err(schema.unknown(path, i, origin)),
        Lookup::Known(default) => Some(default),
        Lookup::Open => None,
    };
    let exists = merge::get(tree, path).is_some();

    if op == Op::Delete {
        let Some(current) = merge::get(tree, path) else {
            return Err(bad(format!("cannot delete `{key}`: it is not in the config")));
        };
        if let Some(raw) = raw {
            let expected = parse_value(text, raw, default)?;
            if *current != expected {
                return Err(bad(format!(
                    "`{key}` is {}, not {}",
                    schema::describe(current),
                    schema::describe(&expected)
                )));
            }
        }
        return remove(tree, path).map_err(bad);
    }

    match (op, exists) {
        (Op::Set, false) => return Err(bad(missing(tree, path))),
        (Op::Add, true) => return Err(ConfigError::KeyExists { key, origin }),
        _ => {}
    }
    let raw = raw.unwrap_or("");
    let value = parse_value(text, raw, default)?;
    let mut errors = Vec::new();
    schema.check(&mut path.clone(), &value, &|_| origin.clone(), &mut errors);
    if let Some(err) = ConfigError::collect(errors) {
        // VISSL expands `a=1,2` into a sweep of runs; say so rather than only
        // "expects a number, got string".
        if raw.contains(',') && !raw.trim_start().starts_with(['[', '{', '"', '\'']) {
            return Err(bad(
                "comma-separated values are a VISSL sweep, which tessera does not expand; run once per value"
                    .to_string(),
            ));
        }
        return Err(err);
    }
    match merge::get_mut(tree, path) {
        // A map given for a map merges into it, like a file does, so that the
        // keys it does not mention keep their values.
        Some(slot @ Value::Object(_)) if value.is_object() => deep_merge(slot, value),
        Some(slot) => *slot = value,
        None => insert(tree, path, value).map_err(bad)?,
    }
    Ok(())
}

/// The override's value as YAML. For a key whose default is a string, a bare
/// `60215` or `true` stays the text typed (Hydra would make it an int, which
/// then fails the type check for e.g. DISTRIBUTED.RUN_ID); a bare string keeps
/// its exact text (YAML would drop a ` #...` tail as a comment).
fn parse_value(text: &str, raw: &str, default: Option<&Value>) -> Result<Value, ConfigError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(Value::String(String::new()));
    }
    let value = load::parse_yaml_value(&format!("override `{text}`"), trimmed).map_err(|e| match e {
        ConfigError::Yaml { message, .. } => ConfigError::BadOverride {
            text: text.to_string(),
            reason: format!("the value is not valid YAML: {}", message.lines().next().unwrap_or("")),
        },
        other => other,
    })?;
    let quoted = trimmed.starts_with(['"', '\'', '[', '{']);
    let wants_string = matches!(default, Some(Value::String(_)));
    Ok(match value {
        Value::String(_) | Value::Object(_) if !quoted => Value::String(trimmed.to_string()),
        Value::Number(_) | Value::Bool(_) if wants_string => Value::String(trimmed.to_string()),
        other => other,
    })
}

/// Why `path` cannot be set: the first segment that is not there.
fn missing(tree: &Value, path: &[String]) -> String {
    let key = path.join(".");
    for i in 0..path.len() {
        let here = path[..i].join(".");
        match merge::get(tree, &path[..i]) {
            Some(Value::Array(items)) if merge::get(tree, &path[..=i]).is_none() => {
                return format!("`{here}` has {} element(s), so `{key}` does not exist", items.len())
            }
            Some(Value::Object(_)) | Some(Value::Array(_)) => {}
            Some(other) => return format!("`{here}` is {}, which has no keys", schema::describe(other)),
            None => break,
        }
    }
    format!("`{key}` is not in the config; to add it write `+{key}=...`")
}

/// Adds `value` at `path`, creating missing maps on the way (Hydra's `+a.b.c`).
/// A list index equal to the list's length appends.
fn insert(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".to_string());
    };
    let mut node = tree;
    for (i, segment) in parents.iter().enumerate() {
        node = match node {
            Value::Object(map) => map.entry(segment.clone()).or_insert_with(|| Value::Object(Map::new())),
            Value::Array(items) => {
                let len = items.len();
                merge::index(segment)
                    .and_then(|j| items.get_mut(j))
                    .ok_or_else(|| format!("`{}` has no element {segment} (length {len})", path[..i].join(".")))?
            }
            other => {
                return Err(format!("`{}` is {}, which has no keys", path[..i].join("."), schema::describe(other)))
            }
        };
    }
    match node {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) if merge::index(last) == Some(items.len()) => {
            items.push(value);
            Ok(())
        }
        Value::Array(items) => Err(format!(
            "`{}` has {} element(s); `+` can only append at index {}",
            parents.join("."),
            items.len(),
            items.len()
        )),
        other => Err(format!("`{}` is {}, which has no keys", parents.join("."), schema::describe(other))),
    }
}

fn remove(tree: &mut Value, path: &[String]) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".to_string());
    };
    match merge::get_mut(tree, parents) {
        Some(Value::Object(map)) => {
            map.shift_remove(last);
            Ok(())
        }
        Some(Value::Array(items)) => match merge::index(last) {
            Some(i) if i < items.len() => {
                items.remove(i);
                Ok(())
            }
            _ => Err(format!("`{}` has no element {last}", parents.join("."))),
        },
        _ => Err(format!("cannot delete `{}`: it is not in the config", path.join("."))),
    }
}
