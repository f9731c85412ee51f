//! Runtime errors.
//!
//! Rules: variants where callers branch (`Locked`, `NotFound`, `Exists`); messages follow PVE's
//! wording (`CT is locked (backup)`, `Configuration file '…' does not exist`).

use std::path::PathBuf;

use vzkit_host::command::CommandError;
use vzkit_storage::error::StorageError;

use crate::conf::error::ConfError;

/// A container operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container carries a `lock:` that forbids the operation.
    #[error("CT is locked ({0})")]
    Locked(String),
    /// No such container.
    #[error("{0}")]
    NotFound(String),
    /// The container exists already.
    #[error("{0}")]
    Exists(String),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// A config format error.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// A storage error.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An external command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A file operation failed.
    #[error("{what} '{}' failed - {source}", path.display())]
    Io {
        /// What was attempted.
        what: String,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl RuntimeError {
    /// An I/O error on `path` while doing `what`.
    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}

/// Result alias for runtime operations.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
