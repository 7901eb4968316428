//! Errors of the data crate: values with context, never panics on user input.

use std::path::PathBuf;

/// Everything that can go wrong while decoding an image or building a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes of an image file could not be decoded.
    #[error("cannot decode image {path}: {reason}")]
    Decode { path: PathBuf, reason: String },

    /// A TRANSFORMS list entry is malformed (unknown name, unknown or mistyped key,
    /// value out of range).
    #[error("TRANSFORMS[{index}] ({name}): {message}")]
    Config { index: usize, name: String, message: String },

    /// A transform was given an image it cannot work on (e.g. an empty image).
    #[error("{0}")]
    Transform(String),

    /// A DATA config key has a bad value or names something that is not
    /// there (a missing directory, an unknown dataset name); `key` is the full
    /// config path, e.g. `DATA.TRAIN.DATA_PATHS[0]`.
    #[error("{key}: {message}")]
    Key { key: String, message: String },

    /// Samples that cannot form a batch (odd batch for MixUp, views of
    /// different sizes, a label outside `num_classes`).
    #[error("batch {batch}: {message}")]
    Batch { batch: usize, message: String },

    /// A file or directory could not be read or written.
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },

    /// The wait for a batch was cut short by the caller's stop flag (a signal).
    #[error("stopped while waiting for batch {batch} to load")]
    Interrupted { batch: usize },

    /// A data-loader worker thread died (a bug: workers return errors as values).
    #[error("data-loader worker {worker} stopped unexpectedly: {reason}")]
    Worker { worker: usize, reason: String },
}

impl Error {
    pub(crate) fn key(key: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Key { key: key.into(), message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Error {
        Error::Io { path: path.into(), reason: err.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
