//! Errors of the backup store.

use std::io;
use std::path::PathBuf;

/// Errors of the backup store. Every message names the file, chunk or
/// snapshot it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// I/O error on a file of the store.
    #[error("{context} '{}': {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Walking the source tree or extracting failed.
    #[error(transparent)]
    Archive(#[from] vzkit_archive::ArchiveError),
    /// A chunk is missing or does not match its digest.
    #[error("chunk {digest}: {message}")]
    BadChunk {
        /// The chunk's name.
        digest: String,
        /// What is wrong.
        message: String,
    },
    /// A catalog, manifest or other store file is malformed.
    #[error("corrupt {what} '{}': {message}", path.display())]
    Corrupt {
        /// Which kind of file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Another process holds a lock.
    #[error("{0}")]
    Locked(String),
    /// Bad input (names, options, snapshot references).
    #[error("{0}")]
    Invalid(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }
}
