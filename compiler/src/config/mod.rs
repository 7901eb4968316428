//! Experiment configs in VISSL's schema.
//!
//! A config is resolved the way VISSL's Hydra setup does it
//! (`tools/run_distributed_engines.py config=NAME overrides...`):
//!   1. `configs/defaults.yaml` (embedded), the `config:` tree of every key;
//!   2. the named file deep-merged over it (OmegaConf: maps merge, scalars and
//!      lists are replaced);
//!   3. `+config/<group>=<name>` files, merged the same way (Hydra composes
//!      config groups before it applies value overrides, whatever the order
//!      on the command line);
//!   4. value overrides (`A.B=v`, `config.A.B=v`, `+`, `++`, `~`), in order.
//!
//! Unlike VISSL, every layer is validated against defaults.yaml (see
//! `schema.rs` and the top of defaults.yaml): unknown keys and wrong types are
//! errors that name the key, where it came from and the closest known key.
//! VISSL's derived values (LR auto-scaling, inferred loss sizes) are not
//! computed here; they belong to the consumers of the tree.

mod emit;
mod error;
mod load;
mod merge;
mod overrides;
mod schema;
pub mod support;

use std::path::PathBuf;

use serde_json::Value;

pub use error::{ConfigError, Origin};
pub use load::embedded_file;
pub(crate) use load::read_text;

/// A resolved experiment config: the tree under VISSL's top-level `config:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    name: String,
    source: String,
    tree: Value,
}

impl Config {
    /// The name given to [`load`] (a config name or a file path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the file was read from: a path, or `<embedded>/configs/...`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The resolved tree, without the `config:` wrapper.
    pub fn tree(&self) -> &Value {
        &self.tree
    }

    /// The value at a dotted key (`MODEL.TRUNK.NAME`); numeric segments index
    /// lists (`MODEL.HEAD.PARAMS.0.1`); VISSL's `config.` prefix is accepted.
    /// The empty key is the whole tree.
    pub fn get(&self, dotted: &str) -> Option<&Value> {
        if dotted.is_empty() {
            return Some(&self.tree);
        }
        let dotted = dotted.strip_prefix("config.").unwrap_or(dotted);
        let path: Vec<&str> = dotted.split('.').collect();
        merge::get(&self.tree, &path)
    }

    /// The resolved config as YAML under a top-level `config:` key, in VISSL's
    /// file layout (loading it back gives the same tree). Deterministic: keys
    /// keep the order of defaults.yaml, then the order they were added in.
    pub fn to_yaml(&self) -> String {
        emit::to_yaml(&self.tree)
    }
}

/// Loads `name` with the default search dirs (`./configs`), then the copy
/// embedded in the binary.
pub fn load(name: &str, overrides: &[String]) -> Result<Config, ConfigError> {
    load_with(name, overrides, &[PathBuf::from("configs")])
}

/// Loads `name`: a file path (with or without `.yaml`), else
/// `<dir>/<name>.yaml` for each of `search_dirs`, else the embedded config.
pub fn load_with(name: &str, overrides: &[String], search_dirs: &[PathBuf]) -> Result<Config, ConfigError> {
    let schema = schema::schema()?;
    let (source, text) = load::resolve(name, search_dirs)?;
    let doc = load::parse_document(&source, &text)?;

    let mut errors = Vec::new();
    if let Value::Object(map) = &doc.tree {
        for (key, value) in map {
            schema.check(&mut vec![key.clone()], value, &|p| doc.origin(p), &mut errors);
        }
    }
    if let Some(err) = ConfigError::collect(errors) {
        return Err(err);
    }
    let mut tree = schema.tree.clone();
    merge::deep_merge(&mut tree, doc.tree.clone());

    let parsed = overrides.iter().map(|o| overrides::parse(o)).collect::<Result<Vec<_>, _>>()?;
    for ov in &parsed {
        if let overrides::Override::Fragment { text, file } = ov {
            overrides::apply_fragment(&mut tree, schema, text, file, search_dirs)?;
        }
    }
    for ov in &parsed {
        overrides::apply_value(&mut tree, schema, ov)?;
    }
    // No key is accepted and then ignored (support.rs).
    let refused: Vec<ConfigError> = support::refused_settings(&tree, &schema.tree)
        .into_iter()
        .map(|(key, value, default, why)| {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            let set_by = parsed.iter().rev().find_map(|ov| match ov {
                overrides::Override::Value { text, path: p, .. } if path.starts_with(p) || p.starts_with(&path) => {
                    Some(Origin::Override(text.to_string()))
                }
                _ => None,
            });
            ConfigError::Unsupported {
                key,
                value: schema::describe(&value),
                default: default.to_string(),
                why: why.to_string(),
                origin: set_by.unwrap_or_else(|| doc.origin(&path)),
            }
        })
        .collect();
    if let Some(err) = ConfigError::collect(refused) {
        return Err(err);
    }
    Ok(Config { name: name.to_string(), source, tree })
}

/// Every embedded config except defaults.yaml, sorted, without `.yaml`
/// (e.g. `pretrain/vision_transformer/supervised/1gpu_vit_example`).
pub fn embedded_config_names() -> Vec<String> {
    load::embedded_names().into_iter().filter(|n| n != "defaults").collect()
}

/// The embedded defaults (the `config` subtree of configs/defaults.yaml).
/// An empty map if that file were broken; [`load`] reports why.
pub fn defaults() -> &'static Value {
    static EMPTY: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    match schema::schema() {
        Ok(schema) => &schema.tree,
        Err(_) => EMPTY.get_or_init(|| Value::Object(serde_json::Map::new())),
    }
}
