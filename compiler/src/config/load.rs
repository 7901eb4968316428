//! Finding a config by name, reading it, and parsing it into a JSON tree plus
//! the line of every key (for error messages).
//!
//! Search order for a name (VISSL passes `config=pretrain/...` relative to
//! `configs/config/`; tessera's `configs/` plays that role):
//!   1. the name as a file path, then the name + `.yaml`;
//!   2. `<dir>/<name>.yaml` for each search dir (default `./configs`);
//!   3. the copy of `configs/` embedded in the binary.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::error::{ConfigError, Origin};

/// `configs/` at build time. Edited files are picked up on rebuild (the macro
/// expands to `include_bytes!`); a newly added file needs any change to this
/// crate to be seen.
static EMBEDDED: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/../configs");

/// A file of `configs/` as built into the binary (`dataset_catalog.json`).
pub fn embedded_file(path: &str) -> Option<&'static [u8]> {
    EMBEDDED.get_file(path).map(|f| f.contents())
}

pub(crate) const EMBEDDED_PREFIX: &str = "<embedded>/configs";

/// Top-level keys of a Hydra/VISSL file other than `config:`; they are not
/// part of the config tree and are ignored.
const HYDRA_TOP_LEVEL_KEYS: &[&str] = &["defaults", "hydra", "VERSION", "node_id", "engine_name", "tessera_open_keys"];

/// Hydra's own top-level keys that would change what runs: a `defaults:`
/// list composes other files, `hydra:` configures Hydra's runtime, and
/// `engine_name` picks VISSL's engine. tessera has none of these, so a
/// setting that asks for something is refused rather than ignored.
fn unsupported_top_level(top: &Map<String, Value>) -> Option<String> {
    match top.get("defaults") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.iter().all(|i| i.as_str() == Some("_self_")) => {}
        Some(_) => {
            return Some(
                "a Hydra `defaults:` list is not supported (tessera composes no config from it); \
                 copy those settings into this file, or add them with `+config/<group>=<name>`"
                    .to_string(),
            )
        }
    }
    match top.get("hydra") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => {
            return Some("`hydra:` settings are not supported (tessera runs without Hydra's runtime)".to_string())
        }
    }
    match top.get("engine_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "train" => None,
        Some(other) => Some(format!(
            "`engine_name: {}` is not supported; tessera's engine is `train` (evaluation: TEST_ONLY)",
            super::schema::describe(other)
        )),
    }
}

/// One parsed config file: the `config` tree and where each key sits.
pub(crate) struct Document {
    /// How the file is named in messages: a path, or `<embedded>/configs/...`.
    pub label: String,
    /// The config tree (the value of `config:`, or the whole file), a map.
    pub tree: Value,
    /// Line of each key, by dotted path from the top of the file.
    lines: HashMap<String, u64>,
    /// `"config."` when the file nests its tree under `config:`.
    prefix: &'static str,
}

impl Document {
    /// Where the key at `path` (relative to the config tree) was written; falls
    /// back to its closest ancestor with a known line.
    pub fn origin(&self, path: &[String]) -> Origin {
        let mut len = path.len();
        loop {
            let key = format!("{}{}", self.prefix, path[..len].join("."));
            if let Some(&line) = self.lines.get(key.trim_end_matches('.')) {
                return Origin::File { path: self.label.clone(), line: Some(line) };
            }
            if len == 0 {
                return Origin::File { path: self.label.clone(), line: None };
            }
            len -= 1;
        }
    }
}

/// The text of the embedded file at `rel` (relative to `configs/`).
pub(crate) fn embedded_text(rel: &str) -> Option<&'static str> {
    EMBEDDED.get_file(rel).and_then(|f| f.contents_utf8())
}

/// Every embedded `.yaml` file, relative to `configs/`, without `.yaml`.
pub(crate) fn embedded_names() -> Vec<String> {
    fn walk(dir: &Dir<'static>, out: &mut Vec<String>) {
        for file in dir.files() {
            let path = file.path().to_string_lossy().replace('\\', "/");
            if let Some(stem) = path.strip_suffix(".yaml") {
                out.push(stem.to_string());
            }
        }
        for sub in dir.dirs() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&EMBEDDED, &mut out);
    out.sort();
    out
}

/// Finds `name` (see the module comment) and returns (label, text).
pub(crate) fn resolve(name: &str, search_dirs: &[PathBuf]) -> Result<(String, String), ConfigError> {
    let mut searched = Vec::new();
    if name.trim().is_empty() {
        return Err(ConfigError::NotFound { name: name.to_string(), searched, suggestion: None });
    }
    let mut candidates = vec![PathBuf::from(name)];
    if !name.ends_with(".yaml") {
        candidates.push(PathBuf::from(format!("{name}.yaml")));
    }
    if let Some(found) = first_file(&candidates, &mut searched)? {
        return Ok(found);
    }
    let rel = relative_name(name);
    let in_dirs: Vec<PathBuf> = search_dirs.iter().map(|d| d.join(&rel)).collect();
    if let Some(found) = first_file(&in_dirs, &mut searched)? {
        return Ok(found);
    }
    searched.push(format!("{EMBEDDED_PREFIX}/{rel}"));
    if let Some(text) = embedded_text(&rel) {
        return Ok((format!("{EMBEDDED_PREFIX}/{rel}"), text.to_string()));
    }
    if let Some(err) = directory_error(name, search_dirs) {
        return Err(err);
    }
    Err(ConfigError::NotFound { name: name.to_string(), searched, suggestion: closest_embedded(&rel) })
}

/// When `name` names a directory (as given, under a search dir, or in the
/// embedded configs) rather than a file: the error listing its configs.
fn directory_error(name: &str, search_dirs: &[PathBuf]) -> Option<ConfigError> {
    let dir = name.replace('\\', "/");
    let dir = dir.trim_start_matches("./").trim_end_matches('/');
    let found = |path: &Path, prefix: &str| {
        let mut configs = Vec::new();
        // `config=/` must not walk the whole disk.
        let mut budget = 10_000;
        yaml_files(path, prefix, &mut budget, &mut configs);
        configs.sort();
        ConfigError::IsDirectory { name: name.to_string(), path: path.display().to_string(), configs }
    };
    if Path::new(name).is_dir() {
        return Some(found(Path::new(name), name.trim_end_matches('/')));
    }
    for d in search_dirs {
        if d.join(dir).is_dir() {
            return Some(found(&d.join(dir), dir));
        }
    }
    let embedded = EMBEDDED.get_dir(dir)?;
    let configs = embedded_names().into_iter().filter(|n| n.starts_with(&format!("{dir}/"))).collect();
    Some(ConfigError::IsDirectory {
        name: name.to_string(),
        path: format!("{EMBEDDED_PREFIX}/{}", embedded.path().display()),
        configs,
    })
}

/// The `.yaml` files below `dir`, as config names `prefix/…` without `.yaml`.
fn yaml_files(dir: &Path, prefix: &str, budget: &mut usize, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().to_string();
        let named = format!("{prefix}/{file_name}");
        match entry.file_type() {
            // A link or special file is not followed: only what a config can be.
            Ok(t) if t.is_dir() => yaml_files(&path, &named, budget, out),
            Ok(t) if t.is_file() => {
                if let Some(stem) = named.strip_suffix(".yaml") {
                    out.push(stem.to_string());
                }
            }
            _ => {}
        }
    }
}

/// `pretrain/x`, `./pretrain/x.yaml` -> `pretrain/x.yaml`.
fn relative_name(name: &str) -> String {
    let name = name.replace('\\', "/");
    let name = name.trim_start_matches("./");
    if name.ends_with(".yaml") {
        name.to_string()
    } else {
        format!("{name}.yaml")
    }
}

fn first_file(candidates: &[PathBuf], searched: &mut Vec<String>) -> Result<Option<(String, String)>, ConfigError> {
    for path in candidates {
        let label = path.display().to_string();
        if searched.contains(&label) {
            continue;
        }
        searched.push(label.clone());
        if path.is_file() {
            return read(path).map(|text| Some((label, text)));
        }
    }
    Ok(None)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    read_text(path).map_err(|e| ConfigError::Io { path: path.display().to_string(), message: e.to_string() })
}

/// The most a config or model file may hold: far above any real one, and
/// read with a bound, so a huge or endless file is an error, not an
/// allocation that exhausts memory.
pub(crate) const MAX_TEXT_FILE: u64 = 16 << 20;

/// A text file of at most [`MAX_TEXT_FILE`] bytes.
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_TEXT_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TEXT_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB; not a config or model file",
            MAX_TEXT_FILE >> 20
        )));
    }
    Ok(text)
}

fn closest_embedded(rel: &str) -> Option<String> {
    let wanted = rel.trim_end_matches(".yaml");
    let wanted_last = wanted.rsplit('/').next().unwrap_or(wanted);
    embedded_names()
        .into_iter()
        .filter(|n| n != "defaults")
        .map(|n| {
            let last = n.rsplit('/').next().unwrap_or(&n).to_string();
            let score = strsim::normalized_levenshtein(wanted, &n)
                .max(strsim::normalized_levenshtein(wanted_last, &last) - 0.05);
            (score, n)
        })
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

/// Parses a VISSL-layout file (`# @package _global_`, top-level `config:`) or a
/// bare tree. An empty file is an empty tree.
pub(crate) fn parse_document(label: &str, text: &str) -> Result<Document, ConfigError> {
    let value: Value = serde_saphyr::from_str(text).map_err(|e| yaml_error(label, text, &e))?;
    // A second, best-effort pass for key lines; the tree above is authoritative.
    let lines = match serde_saphyr::from_str::<LineIndex>(text) {
        Ok(index) => index.0,
        Err(_) => HashMap::new(),
    };
    let layout = |message: String| ConfigError::Layout { file: label.to_string(), message };
    let (tree, prefix) = match value {
        Value::Null => (Value::Object(Map::new()), ""),
        Value::Object(mut top) => match top.remove("config") {
            Some(config) => {
                if let Some(extra) = top.keys().find(|k| !HYDRA_TOP_LEVEL_KEYS.contains(&k.as_str())) {
                    return Err(layout(format!(
                        "unexpected top-level key `{extra}` next to `config:`; VISSL-layout \
                         files keep every setting under `config:`"
                    )));
                }
                if let Some(why) = unsupported_top_level(&top) {
                    return Err(layout(why));
                }
                match config {
                    Value::Null => (Value::Object(Map::new()), "config."),
                    Value::Object(m) => (Value::Object(m), "config."),
                    other => {
                        return Err(layout(format!(
                            "`config:` must be a mapping of settings, not {}",
                            super::schema::describe(&other)
                        )))
                    }
                }
            }
            None => (Value::Object(top), ""),
        },
        other => {
            return Err(layout(format!(
                "a config file must be a mapping (with a top-level `config:` key), not {}",
                super::schema::describe(&other)
            )))
        }
    };
    Ok(Document { label: label.to_string(), tree, lines, prefix })
}

/// Parses one override value, or an inline YAML snippet, reporting errors
/// against `label`.
pub(crate) fn parse_yaml_value(label: &str, text: &str) -> Result<Value, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| yaml_error(label, text, &e))
}

fn yaml_error(label: &str, text: &str, err: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = err.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
    let rendered = err.render_with_options(serde_saphyr::render_options! {
        source_name: Some(label),
    });
    // serde-saphyr renders "error: line L column C: msg" then a snippet; the
    // position is already in our prefix, so keep only "msg" and the snippet.
    let (first, rest) = rendered.split_once('\n').unwrap_or((rendered.as_str(), ""));
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = match first.strip_prefix("line ").and_then(|s| s.split_once(": ")) {
        Some((_, msg)) => msg,
        None => first,
    };
    // The library's text may advise on its own API ("set DuplicateKeyPolicy
    // in Options"), which means nothing to whoever wrote the file.
    let (first, rest) = match plain_yaml_message(err, text) {
        // The snippet repeats the message under its caret.
        Some(plain) => (plain.clone(), rest.replace(first, &plain)),
        None => (first.to_string(), rest.to_string()),
    };
    let message = if rest.is_empty() { first } else { format!("{first}\n{rest}") };
    ConfigError::Yaml { file: label.to_string(), line, column, message }
}

/// The error a wrapper (snippet, alias use site) carries.
fn innermost(mut err: &serde_saphyr::Error) -> &serde_saphyr::Error {
    use serde_saphyr::Error as E;
    loop {
        match err {
            E::WithSnippet { error, .. } | E::AliasError { error, .. } => err = error,
            other => return other,
        }
    }
}

/// Plain words for the errors whose library text names library options or
/// Rust types; `None` keeps the library's text (syntax errors read well).
fn plain_yaml_message(err: &serde_saphyr::Error, text: &str) -> Option<String> {
    use serde_saphyr::budget::BudgetBreach as B;
    use serde_saphyr::Error as E;
    Some(match innermost(err) {
        E::DuplicateMappingKey { key, location } => {
            let line = location.line();
            let key = key.as_deref().unwrap_or("");
            let first = first_line_of_key(text, key, line).map(|m| format!(" (first at line {m})")).unwrap_or_default();
            format!("duplicate key `{key}` at line {line}{first}: a key may appear once in a mapping; keep one of them")
        }
        E::Budget { breach, .. } => match breach {
            B::Depth { depth } => format!("the YAML nests {depth} levels deep, deeper than a config can be"),
            B::Aliases { .. } | B::Anchors { .. } | B::AliasAnchorRatio { .. } => {
                "the YAML uses more aliases (`*name`) than a config may".to_string()
            }
            _ => "the YAML is larger than a config may be (too many values or too much text)".to_string(),
        },
        E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. }
        | E::AliasReplayCounterOverflow { .. } => {
            "aliases (`*name`) expand to more values than a config may hold; write the values out".to_string()
        }
        E::RecursiveReferencesRequireWeakTypes { .. } => "an alias (`*name`) refers to a value that contains it".into(),
        E::NonFiniteFloat { value, .. } => format!("`{value}` is not a finite number"),
        E::MultipleDocuments { .. } => {
            "the file holds several YAML documents (a `---` line after settings); a config is one document".into()
        }
        E::BinaryNotUtf8 { .. } | E::BytesNotSupportedMissingBinaryTag { .. } => {
            "a binary value; a config holds text, numbers, booleans, lists and mappings".into()
        }
        E::MergeKeyNotAllowed { .. } => "YAML merge keys (`<<:`) are not allowed here".into(),
        E::NullIntoString { .. } | E::InvalidCharNull { .. } => "expected text, found an empty value (null)".into(),
        _ => return None,
    })
}

/// The line of the earlier `key:` in the block mapping whose duplicate is at
/// `line` (same indentation, nothing less indented between); `None` for
/// flow mappings (`{a: 1, a: 2}`) or when it cannot be told.
fn first_line_of_key(text: &str, key: &str, line: u64) -> Option<u64> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let here = *lines.get(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let depth = indent(here);
    let key_of = |t: &str| t.split_once(':').map(|(k, _)| k.trim().trim_matches(|c| c == '"' || c == '\'').to_string());
    for i in (0..line as usize - 1).rev() {
        let t = lines[i].trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match indent(lines[i]) {
            d if d < depth => return None,
            d if d == depth && key_of(t).as_deref() == Some(key) => return Some(i as u64 + 1),
            _ => {}
        }
    }
    None
}

/// Dotted path -> line of the key, built by a serde visitor that asks
/// serde-saphyr for the span of every mapping key.
struct LineIndex(HashMap<String, u64>);

impl<'de> Deserialize<'de> for LineIndex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let node = Node::deserialize(d)?;
        let mut out = HashMap::new();
        node.flatten("", &mut out);
        Ok(LineIndex(out))
    }
}

enum Node {
    Leaf,
    Seq(Vec<Node>),
    Map(Vec<(String, u64, Node)>),
}

impl Node {
    fn flatten(self, prefix: &str, out: &mut HashMap<String, u64>) {
        let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        match self {
            Node::Leaf => {}
            Node::Seq(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    item.flatten(&join(&i.to_string()), out);
                }
            }
            Node::Map(entries) => {
                for (key, line, value) in entries {
                    let path = join(&key);
                    out.entry(path.clone()).or_insert(line);
                    value.flatten(&path, out);
                }
            }
        }
    }
}

/// A mapping key of any scalar type, as the string serde_json would use.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(KeyText(match Value::deserialize(d)? {
            Value::String(s) => s,
            other => other.to_string(),
        }))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Node, D2::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<serde_saphyr::Spanned<KeyText>>()? {
                    let value = map.next_value::<Node>()?;
                    entries.push((key.value.0, key.referenced.line(), value));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}
