//! Reading the keys of one `DATA.TRAIN` / `DATA.TEST` node with typed getters
//! whose errors name the full key (`DATA.TRAIN.DATA_LIMIT`). A key that is
//! absent (or null) takes VISSL's default from `configs/defaults.yaml`, so a
//! partial node (tests, hand-written callers) works like a resolved one.

use serde_json::Value;

use crate::error::{Error, Result};

/// One split's config node and the split's name ("TRAIN", "TEST").
#[derive(Clone, Copy)]
pub(crate) struct SplitConfig<'a> {
    pub split: &'a str,
    node: &'a Value,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

impl<'a> SplitConfig<'a> {
    pub fn new(node: &'a Value, split: &'a str) -> Result<SplitConfig<'a>> {
        if !node.is_object() {
            return Err(Error::key(format!("DATA.{split}"), format!("expected a map, got {}", type_name(node))));
        }
        Ok(SplitConfig { split, node })
    }

    /// The full name of a key of this split, e.g. `DATA.TRAIN.DROP_LAST`.
    pub fn key(&self, key: &str) -> String {
        format!("DATA.{}.{key}", self.split)
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::key(self.key(key), message)
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.node.get(key).filter(|v| !v.is_null())
    }

    fn mistyped(&self, key: &str, expected: &str, got: &Value) -> Error {
        self.error(key, format!("expected {expected}, got {} ({got})", type_name(got)))
    }

    pub fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.mistyped(key, "a string", v)),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.mistyped(key, "True or False", v)),
        }
    }

    pub fn int_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_int(v).ok_or_else(|| self.mistyped(key, "an integer", v)),
        }
    }

    /// A positive integer (sizes, batch sizes).
    pub fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.int_or(key, default as i64)?;
        usize::try_from(v).ok().filter(|&n| n > 0).ok_or_else(|| self.error(key, format!("must be positive, got {v}")))
    }

    /// A list of strings; absent means empty.
    pub fn str_list(&self, key: &str) -> Result<Vec<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        let items = v.as_array().ok_or_else(|| self.mistyped(key, "a list of strings", v))?;
        items
            .iter()
            .enumerate()
            .map(|(i, x)| x.as_str().ok_or_else(|| self.mistyped(&format!("{key}[{i}]"), "a string", x)))
            .collect()
    }

    /// A nested map such as `DATA_LIMIT_SAMPLING`, as its own reader.
    pub fn sub(&self, key: &str) -> Result<Option<SubConfig<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(SubConfig { prefix: self.key(key), node: v })),
            Some(v) => Err(self.mistyped(key, "a map", v)),
        }
    }
}

/// A map below a split key (`DATA.TRAIN.DATA_LIMIT_SAMPLING`).
pub(crate) struct SubConfig<'a> {
    prefix: String,
    node: &'a Value,
}

impl SubConfig<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.node.get(key).filter(|v| !v.is_null())
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::key(format!("{}.{key}", self.prefix), message)
    }

    pub fn int_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_int(v).ok_or_else(|| self.error(key, format!("expected an integer, got {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.error(key, format!("expected True or False, got {v}"))),
        }
    }
}

/// An integer, also accepting floats with no fractional part (YAML `2.0`).
pub(crate) fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64))
}
