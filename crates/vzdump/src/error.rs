//! Errors of the backup job.
//!
//! Rules: a task error is shown to the user as `Backup of VM <vmid> failed - <message>`, so
//! every message is a complete sentence in PVE's wording where PVE has one. The only variant
//! callers branch on is [`Error::Interrupted`]: a signal aborts the whole job after the current
//! guest was cleaned up, as PVE's `die "interrupted by signal"` does.

use vzkit_archive::ArchiveError;
use vzkit_host::command::CommandError;
use vzkit_runtime::conf::ConfError;
use vzkit_runtime::error::RuntimeError;
use vzkit_storage::error::StorageError;

/// A failed job or task step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT arrived.
    #[error("interrupted by signal")]
    Interrupted,
    /// Anything else, with the message to log.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// A failure with this message.
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Failed(m.into())
    }
}

macro_rules! from_display {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Failed(e.to_string())
            }
        }
    )*};
}
from_display!(
    RuntimeError,
    StorageError,
    ConfError,
    CommandError,
    ArchiveError,
    crate::options::OptionsError
);

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
