//! Storage errors.
//!
//! Rules: variants exist where callers branch (`NotFound`, `AlreadyExists`, `Unsupported`);
//! everything else is `Failed` with a message a user can act on. Messages follow PVE's
//! wording where users will search for it.

use std::path::PathBuf;

use vzkit_host::command::CommandError;

/// A storage operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No such storage, volume or snapshot.
    #[error("{0}")]
    NotFound(String),
    /// The volume or name exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The backend cannot do this (a capability, not a fault).
    #[error("{0}")]
    Unsupported(String),
    /// Invalid input or configuration.
    #[error("{0}")]
    Invalid(String),
    /// An external command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A filesystem operation failed.
    #[error("{what} '{}' failed - {source}", path.display())]
    Io {
        /// What was attempted (`unable to create directory`).
        what: String,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl StorageError {
    /// An I/O error on `path` while doing `what`.
    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}

/// Result alias for storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
