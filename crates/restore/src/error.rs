//! Restore errors: PVE's wording where users will search for it; wrapped lower-layer errors
//! keep their own messages.

use vzkit_runtime::conf::ConfError;
use vzkit_runtime::error::RuntimeError;
use vzkit_storage::error::StorageError;

/// A restore, create, extractconfig or pveam operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Bad parameters; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// The container exists and `--force` was not given.
    #[error("{0}")]
    Exists(String),
    /// Something missing (archive, storage, template).
    #[error("{0}")]
    NotFound(String),
    /// A config format error.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// A runtime (config store, disks, mounts) error.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A storage error.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An archive (tar, compression) error.
    #[error(transparent)]
    Archive(#[from] vzkit_archive::ArchiveError),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// Result alias.
pub type Result<T, E = RestoreError> = std::result::Result<T, E>;
