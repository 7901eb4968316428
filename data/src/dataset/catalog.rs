//! `configs/dataset_catalog.json`: `{name: {"train": [data path, label path],
//! "val": [...]}}`, as VISSL's `VisslDatasetCatalog` reads it. The TRAIN
//! split looks up "train", every other split "val"
//! (`vissl/data/dataset_catalog.py::get_data_files`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The parsed catalog file.
pub(crate) struct Catalog {
    path: PathBuf,
    root: serde_json::Map<String, Value>,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Catalog> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, format!("cannot read the dataset catalog: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::io(path, format!("the dataset catalog is not valid JSON: {e}")))?;
        match value {
            Value::Object(root) => Ok(Catalog { path: path.to_path_buf(), root }),
            _ => Err(Error::io(path, "the dataset catalog must be a JSON map of dataset names")),
        }
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.root.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The data path of `name` for `split` (entry 0 of its list); `key` names
    /// the config key that asked, for the error messages.
    pub fn data_path(&self, name: &str, split: &str, key: &str) -> Result<PathBuf> {
        let catalog = self.path.display();
        let entry = self.root.get(name).ok_or_else(|| {
            let hint = crate::config::did_you_mean(name, self.root.keys().map(String::as_str))
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            Error::key(
                key,
                format!(
                    "dataset `{name}` is not in the catalog {catalog}{hint}; known datasets: {}",
                    self.names().join(", ")
                ),
            )
        })?;
        let part = if split == "TRAIN" { "train" } else { "val" };
        let paths = entry.get(part).and_then(Value::as_array).ok_or_else(|| {
            Error::key(
                key,
                format!("catalog entry `{name}` in {catalog} has no \"{part}\" list of [data path, label path]"),
            )
        })?;
        match paths.first().and_then(Value::as_str) {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err(Error::key(key, format!("catalog entry `{name}`.{part} in {catalog} has no data path"))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
