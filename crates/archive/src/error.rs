//! Errors of the archive crate.
//!
//! Rules:
//! * Stream-level problems (I/O on the archive stream, corrupt or truncated
//!   input) are always fatal: after them the position in the stream is lost.
//! * Member-level problems while extracting (unsafe names, unmappable ids,
//!   devices in an unprivileged restore, failed `chown`) are fatal unless
//!   `ExtractOptions::ignore_unpack_errors` is set, in which case they are
//!   recorded in the `ExtractReport` — like GNU tar, which goes on and exits
//!   non-zero, and PVE's `--ignore-unpack-errors`, which ignores that status.
//! * Problems GNU tar only *warns* about under PVE's flags
//!   (`--warning=no-xattr-write`: xattr/ACL writes, file changed while read)
//!   are never errors; they are recorded as warnings.
//! * Every message names the member or file it is about.

use std::io;
use std::path::PathBuf;

/// Errors of reading, writing or extracting tar streams.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// I/O error on the archive stream itself.
    #[error("archive stream: {0}")]
    Stream(#[source] io::Error),
    /// I/O error on a file of the source or target tree.
    #[error("{context} '{}': {source}", path.display())]
    Fs {
        /// What was being done (`"open"`, `"mknod"`, …).
        context: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The tar stream is malformed (bad checksum, bad header field, bad PAX
    /// record, inconsistent sparse map, …).
    #[error("corrupt archive at byte {offset}: {message}")]
    Corrupt {
        /// Offset in the (decompressed) tar stream where parsing failed.
        offset: u64,
        /// What is wrong.
        message: String,
    },
    /// The stream ended before the end-of-archive marker.
    #[error("unexpected end of archive at byte {offset} ({what})")]
    Truncated {
        /// Offset in the (decompressed) tar stream.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A member name or link target would leave the target root or pass
    /// through a symbolic link.
    #[error("refusing member '{member}': {reason}")]
    UnsafePath {
        /// The member name as stored (lossy UTF-8).
        member: String,
        /// Why it is refused.
        reason: String,
    },
    /// An owner id has no mapping in the id map.
    #[error("member '{member}': {kind} {id} is not mapped")]
    UnmappedId {
        /// The member name (lossy UTF-8).
        member: String,
        /// `"uid"` or `"gid"`.
        kind: &'static str,
        /// The unmapped id.
        id: u64,
    },
    /// A device node in a restore that does not allow them.
    #[error("member '{member}': device nodes are not allowed in this restore")]
    DeviceNotAllowed {
        /// The member name (lossy UTF-8).
        member: String,
    },
    /// A member that cannot be written (type, name or field out of range).
    #[error("member '{member}': {message}")]
    Unsupported {
        /// The member name (lossy UTF-8).
        member: String,
        /// What is not supported.
        message: String,
    },
    /// A POSIX ACL in text or binary form that cannot be parsed.
    #[error("invalid ACL: {0}")]
    Acl(String),
}

impl ArchiveError {
    pub(crate) fn fs(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ArchiveError::Fs {
            context,
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
