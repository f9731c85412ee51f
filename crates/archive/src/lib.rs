//! Tar streams and compression formats of PVE container backups
//! (`vzdump-lxc-*.tar[.gz|.lzo|.zst]`), without any container logic.
//!
//! Compatibility target: GNU tar 1.34 as PVE runs it, with
//! `@COMMON_TAR_FLAGS` (pve-storage `PVE/Storage/Plugin.pm`):
//! `--one-file-system -p --sparse --numeric-owner --acls --xattrs
//! --xattrs-include=user.* --xattrs-include=security.capability
//! --warning=no-file-ignored --warning=no-xattr-write`.
//! Archives we write extract with GNU tar to the same tree (types, modes,
//! owners, mtimes, ACLs, xattrs, holes, hard links, devices), and we extract
//! what GNU tar writes; the integration tests use GNU tar as the oracle.
//!
//! | module | what |
//! |---|---|
//! | [`compress`] | gzip / lzop / zstd encoders and decoders, detection |
//! | [`lzop`] | the lzop file format over LZO1X |
//! | [`header`] | tar header and PAX record encoding (format notes) |
//! | [`writer`] | [`ArchiveWriter`]: stream a directory tree into tar |
//! | [`direct`] | file data read straight from a loop-mounted volume image |
//! | [`reader`] | [`ArchiveReader`], [`find_member`]: stream members |
//! | [`mod@extract`] | [`extract()`]: safe extraction with id mapping |
//! | [`exclude`] | GNU tar exclude pattern semantics |
//! | [`acl`] | POSIX ACL text ↔ xattr, file capability mapping |
//! | [`idmap`] | container ↔ host id ranges |
//!
//! No `unsafe` code: system calls go through rustix (and the extent map through the
//! `fiemap` crate).

pub mod acl;
pub mod compress;
pub mod direct;
pub mod error;
pub mod exclude;
pub mod extract;
mod fsutil;
pub mod header;
pub mod idmap;
pub mod lzop;
pub mod prefetch;
pub mod reader;
pub mod writer;

pub use compress::{
    Compression, Compressor, Decompressor, compressor, decompressor, decompressor_auto,
};
pub use error::{ArchiveError, Result};
pub use exclude::ExcludeSet;
pub use extract::{ExtractOptions, ExtractReport, extract, extract_buffered};
pub use header::{MemberHeader, MemberKind, SparseRegion};
pub use idmap::{IdKind, IdMap, IdMapEntry};
pub use reader::{ArchiveReader, Entry, Sparse, find_member};
pub use writer::{ArchiveWriter, FileData, Reused, StatKey, Stats, TreeSink, Walker};
