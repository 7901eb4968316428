//! Errors of the experiment-config system. Every message is meant for the
//! person who wrote the YAML or typed the override, so each one says which key,
//! where it came from, and what would have been accepted.

use std::fmt;

/// Where a value came from: a config file (and the line of its key when it
/// could be found) or one command-line override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File { path: String, line: Option<u64> },
    Override(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line: Some(line) } => write!(f, "in {path}:{line}"),
            Origin::File { path, line: None } => write!(f, "in {path}"),
            Origin::Override(text) => write!(f, "in override `{text}`"),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// The config name matched no file on disk and no embedded config.
    #[error("config `{name}` not found; searched:\n{}{}", bullet_list(searched), hint(suggestion))]
    NotFound { name: String, searched: Vec<String>, suggestion: Option<String> },

    /// The config name is a directory: the configs in it, as names to pass.
    #[error("config `{name}` is a directory ({path}), not a config file; {}", configs_in(name, configs))]
    IsDirectory { name: String, path: String, configs: Vec<String> },

    #[error("cannot read config file {path}: {message}")]
    Io { path: String, message: String },

    /// `message` is serde-saphyr's text, which already shows the offending line.
    #[error("{file}:{line}:{column}: YAML syntax error: {message}")]
    Yaml { file: String, line: u64, column: u64, message: String },

    /// The document (or its `config:` entry) is not a mapping, or has a
    /// top-level key other than `config:` and Hydra's own keys.
    #[error("{file}: {message}")]
    Layout { file: String, message: String },

    /// A key that `configs/defaults.yaml` does not declare.
    #[error("unknown config key `{key}` ({origin}){}", did_you_mean(suggestion))]
    UnknownKey { key: String, origin: Origin, suggestion: Option<String> },

    /// A value whose type differs from the type of the default.
    #[error("config key `{key}` expects {expected}, but got {found} ({origin})")]
    WrongType { key: String, expected: String, found: String, origin: Origin },

    /// A key tessera does not implement, set to something other than its
    /// default (`support.rs`).
    #[error(
        "config key `{key}` is set to {value} ({origin}), which tessera does not support: {why}; \
         leave it at its default {default}"
    )]
    Unsupported { key: String, value: String, default: String, why: String, origin: Origin },

    /// `+KEY=VALUE` where KEY already exists (Hydra's rule for `+`).
    #[error(
        "config key `{key}` already exists ({origin}); `+` only adds new keys: \
         use `{key}=...` to change it, or `++{key}=...` to set it either way"
    )]
    KeyExists { key: String, origin: Origin },

    /// An override that cannot be parsed or applied.
    #[error("bad override `{text}`: {reason}")]
    BadOverride { text: String, reason: String },

    /// Several independent errors (all unknown keys of one file, for example).
    #[error("{} config errors:\n{}", .0.len(), numbered(.0))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// One error as is, several as `Many`; `None` when there are none.
    pub(crate) fn collect(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Many(errors)),
        }
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

fn hint(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("\ndid you mean `{s}`?"),
        None => String::new(),
    }
}

/// How to name one of the configs of a directory: all of them when few.
fn configs_in(name: &str, configs: &[String]) -> String {
    const SHOWN: usize = 10;
    let dir = name.trim_end_matches('/');
    match configs.len() {
        0 => format!("it holds no .yaml config; name a file, e.g. `config={dir}/NAME` for {dir}/NAME.yaml"),
        n if n <= SHOWN => {
            format!("name one of its {n} configs:\n{}", bullet_list(&configs.iter().map(|c| format!("config={c}")).collect::<Vec<_>>()))
        }
        n => format!(
            "it holds {n} .yaml configs (e.g. `config={}`); name one as `config={dir}/NAME` (`tessera config list` lists the embedded ones)",
            configs[0]
        ),
    }
}

fn bullet_list(items: &[String]) -> String {
    items.iter().map(|s| format!("  - {s}")).collect::<Vec<_>>().join("\n")
}

fn numbered(errors: &[ConfigError]) -> String {
    errors.iter().enumerate().map(|(i, e)| format!("  {}. {e}", i + 1)).collect::<Vec<_>>().join("\n")
}
