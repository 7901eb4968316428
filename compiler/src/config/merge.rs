//! Tree operations shared by loading and overrides.

use serde_json::Value;

/// OmegaConf's merge, which Hydra uses to lay a config file over VISSL's
/// defaults: maps merge key by key, recursively; everything else (scalars,
/// lists, null) is replaced by the overlay's value.
pub(crate) fn deep_merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) => deep_merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// A list index segment ("0", "12"); maps never use these as lookups.
pub(crate) fn index(segment: &str) -> Option<usize> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    segment.parse().ok()
}

/// The node at `path`; numeric segments index into lists.
pub(crate) fn get<'a, S: AsRef<str>>(mut node: &'a Value, path: &[S]) -> Option<&'a Value> {
    for segment in path {
        let segment = segment.as_ref();
        node = match node {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(index(segment)?)?,
            _ => return None,
        };
    }
    Some(node)
}

pub(crate) fn get_mut<'a, S: AsRef<str>>(mut node: &'a mut Value, path: &[S]) -> Option<&'a mut Value> {
    for segment in path {
        let segment = segment.as_ref();
        node = match node {
            Value::Object(map) => map.get_mut(segment)?,
            Value::Array(items) => items.get_mut(index(segment)?)?,
            _ => return None,
        };
    }
    Some(node)
}
