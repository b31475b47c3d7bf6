//! One error type for the library: every variant names the file, key, shape or value at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DuoError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A file was read but its content is malformed (bad JSON, bad safetensors header, ...).
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A config file holds a value we refuse: unknown block type, inconsistent sizes, ...
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A weight file disagrees with the module: missing or unexpected key, wrong shape.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    /// A bad argument or tensor given by the caller (no file involved).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DuoError> = std::result::Result<T, E>;

impl DuoError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn parse(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Parse { path: path.as_ref().to_path_buf(), message: message.into() }
    }
    pub fn config(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Config { path: path.as_ref().to_path_buf(), message: message.into() }
    }
    pub fn weights(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Weights { path: path.as_ref().to_path_buf(), message: message.into() }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| DuoError::io(path, e))
}

/// Reads and deserialises a JSON file, naming it in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| DuoError::parse(path, e.to_string()))
}
