//! The resolved config as YAML, in the layout of VISSL's files: block maps,
//! block lists of maps (TRANSFORMS), flow lists for everything else
//! (`[0.485, 0.456, 0.406]`, HEAD.PARAMS). Strings are quoted only when a
//! YAML reader would not read them back as the same string, and floats are
//! written so that PyYAML also reads them as floats (`1.0e-06`, not `1e-6`).

use serde_json::{Map, Number, Value};

pub(crate) fn to_yaml(tree: &Value) -> String {
    let mut out = String::from("# @package _global_\n");
    match tree {
        Value::Object(map) if !map.is_empty() => {
            out.push_str("config:\n");
            block_map(&mut out, map, 2);
        }
        other => {
            out.push_str("config: ");
            out.push_str(&flow(other));
            out.push('\n');
        }
    }
    out
}

fn block_map(out: &mut String, map: &Map<String, Value>, indent: usize) {
    for (key, value) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(&string(key));
        out.push(':');
        match value {
            Value::Object(child) if !child.is_empty() => {
                out.push('\n');
                block_map(out, child, indent + 2);
            }
            Value::Array(items) if items.iter().any(is_nonempty_map) => {
                out.push('\n');
                for item in items {
                    list_item(out, item, indent + 2);
                }
            }
            other => {
                out.push(' ');
                out.push_str(&flow(other));
                out.push('\n');
            }
        }
    }
}

/// `- name: X` followed by the map's other keys aligned under `name`.
fn list_item(out: &mut String, item: &Value, indent: usize) {
    match item {
        Value::Object(map) if !map.is_empty() => {
            let mut body = String::new();
            block_map(&mut body, map, indent + 2);
            out.push_str(&" ".repeat(indent));
            out.push_str("- ");
            out.push_str(&body[indent + 2..]);
        }
        other => {
            out.push_str(&" ".repeat(indent));
            out.push_str("- ");
            out.push_str(&flow(other));
            out.push('\n');
        }
    }
}

fn is_nonempty_map(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty())
}

fn flow(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => string(s),
        Value::Array(items) => format!("[{}]", items.iter().map(flow).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("{}: {}", string(k), flow(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// serde_json prints floats as `0.0005`, `5.0`, `1e-6`, `1e20`; PyYAML (VISSL)
/// needs a dot and a signed exponent to see a float: `1.0e-6`, `1.0e+20`.
fn number(n: &Number) -> String {
    let text = n.to_string();
    if !n.is_f64() {
        return text;
    }
    match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let dot = if mantissa.contains('.') { "" } else { ".0" };
            let sign = if exponent.starts_with(['-', '+']) { "" } else { "+" };
            format!("{mantissa}{dot}e{sign}{exponent}")
        }
        None if text.contains('.') => text,
        None => format!("{text}.0"),
    }
}

/// Plain when made of safe characters and read back as the same string
/// (so `True`, `null`, `1e5`, `yes`, `007` and `` get quotes); otherwise a
/// JSON string, which is a valid YAML double-quoted scalar.
fn string(s: &str) -> String {
    let safe_chars = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !s.starts_with(['-', '.']);
    let reads_back = safe_chars && matches!(serde_saphyr::from_str::<Value>(s), Ok(Value::String(ref t)) if t == s);
    if reads_back {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_are_pyyaml_floats() {
        assert_eq!(number(&Number::from_f64(1e-6).unwrap()), "1.0e-6");
        assert_eq!(number(&Number::from_f64(1e20).unwrap()), "1.0e+20");
        assert_eq!(number(&Number::from_f64(5.0).unwrap()), "5.0");
        assert_eq!(number(&Number::from_f64(0.0005).unwrap()), "0.0005");
        assert_eq!(number(&Number::from(7)), "7");
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        for s in ["True", "yes", "null", "1e5", "007", "", "a b", "x: y", "[a]", "-x", ".inf"] {
            assert!(string(s).starts_with('"'), "{s:?} -> {}", string(s));
        }
        for s in ["disk_folder", "imagenet1k_folder", "/tmp/imagenet1k/", "module.heads.0.prototypes0.weight", "O1"] {
            assert_eq!(string(s), s);
        }
    }

    #[test]
    fn layout() {
        let tree =
            json!({"A": {"L": [1, 2], "T": [{"name": "x", "p": 0.5}], "E": {}}, "H": [["mlp", {"dims": [8, 2]}]]});
        let yaml = to_yaml(&tree);
        let expected = "# @package _global_\nconfig:\n  A:\n    L: [1, 2]\n    T:\n      - name: x\n        p: 0.5\n    E: {}\n  H: [[mlp, {dims: [8, 2]}]]\n";
        assert_eq!(yaml, expected);
    }
}
