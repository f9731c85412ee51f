//! Streaming tar writer that archives directory trees like PVE's vzdump
//! invocation of GNU tar:
//!
//! ```text
//! tar cpf - --totals --one-file-system -p --sparse --numeric-owner --acls --xattrs
//!     --xattrs-include=user.* --xattrs-include=security.capability
//!     --warning=no-file-ignored --warning=no-xattr-write … ./
//! ```
//!
//! Format: see [`crate::header`] (POSIX pax, as GNU tar writes with `--xattrs`).
//! Semantics:
//! * member names start with the given prefix (`./`, `./mnt/data`), directories
//!   end in `/`; entries of a directory are written in byte order of their
//!   names right after the directory (GNU tar uses readdir order), so output
//!   is deterministic;
//! * types: regular, directory, symlink (never followed), hard link (second and
//!   later names of an inode with `st_nlink > 1`, by dev+ino), char/block
//!   devices (`st_rdev`), FIFOs; sockets are skipped like GNU tar does;
//! * numeric uid/gid, mode incl. setuid/setgid/sticky, mtime with nanoseconds;
//! * POSIX ACLs and `user.*`/`security.capability` xattrs as PAX records;
//! * sparse files (`st_blocks*512 < st_size`) are scanned with
//!   `SEEK_DATA`/`SEEK_HOLE` and written in PAX sparse 1.0 form;
//! * `one_file_system`: a directory on another device is archived itself,
//!   but not its contents (GNU tar's `--one-file-system`);
//! * excluded names (see [`crate::exclude`]) are skipped, directories
//!   without descending.
//!
//! With an [`IdMap`] (host → container direction) owners, ACL qualifiers
//! and the root id of v3 file capabilities are shown as a tar running in the
//! container's user namespace would see them: unmapped owners become 65534.
//!
//! Memory: one directory's names at a time per level, a 256 KiB copy
//! buffer, and the names of hard-linked inodes until their last link.
//!
//! # One walker, several sinks
//!
//! The tree walk ([`Walker`]) is separate from what is made of it: it hands
//! every member to a [`TreeSink`] as a [`MemberHeader`] (owners and ACLs
//! already id-mapped). Regular files come with their [`StatKey`] and a
//! [`FileData`] handle; their content is read only if the sink asks for it,
//! so a sink may reuse data it already has (incremental backups). Before a
//! regular file is opened, the sink is offered it with its `lstat` key
//! ([`TreeSink::file_unopened`]) and may emit a whole member it has from an
//! earlier walk instead; then the file is not opened at all.
//! [`ArchiveWriter`] is the sink that writes the tar stream; it takes no
//! such shortcut, so its output does not depend on it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom};

use crate::acl::{self, Acl};
use crate::direct::{DirectImage, ExtentMap};
use crate::error::{ArchiveError, Result};
use crate::exclude::ExcludeSet;
use crate::fsutil::{Meta, XattrTarget, proc_path};
use crate::header::{self, BLOCK, MemberHeader, MemberKind, RECORD, SparseRegion};
use crate::idmap::{Direction, IdKind, IdMap, OVERFLOW_ID};

const COPY_BUF: usize = 256 * 1024;

/// Access ACL text, default ACL text, archived xattrs.
type Attrs = (Option<String>, Option<String>, Vec<(Vec<u8>, Vec<u8>)>);
/// Maps with more regions are coalesced (holes between merged regions are
/// stored as zeros) so that readers need not buffer huge maps.
pub const MAX_SPARSE_REGIONS: usize = 65_536;
const MAX_WARNINGS: usize = 1000;

/// Counters of a tree walk ([`ArchiveWriter::append_tree`], [`Walker::walk`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Regular files (incl. sparse ones).
    pub files: u64,
    /// Of which written as sparse.
    pub sparse_files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hard-link members.
    pub hardlinks: u64,
    /// Character and block devices.
    pub devices: u64,
    /// FIFOs.
    pub fifos: u64,
    /// Sockets skipped.
    pub sockets_skipped: u64,
    /// Names skipped by exclude patterns.
    pub excluded: u64,
    /// Directories on other file systems whose contents were skipped.
    pub other_fs_dirs: u64,
    /// Entries the sink emitted from an earlier walk unstatted
    /// ([`TreeSink::unstatted`]; a directory counts once).
    pub taken_over: u64,
    /// File content bytes archived (sparse: data regions only).
    pub data_bytes: u64,
    /// Regular files whose content was read (a sink may skip reading).
    pub files_read: u64,
    /// File content bytes read from the tree.
    pub bytes_read: u64,
    /// Of which read straight from the volume image ([`Walker::set_direct`]).
    pub bytes_direct: u64,
    /// What GNU tar would warn about (file changed or vanished while read,
    /// unrepresentable capability); at most 1000 are kept.
    pub warnings: Vec<String>,
}

impl Stats {
    /// Add the counters of `o` to these.
    pub fn add(&mut self, o: &Stats) {
        self.files += o.files;
        self.sparse_files += o.sparse_files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.hardlinks += o.hardlinks;
        self.devices += o.devices;
        self.fifos += o.fifos;
        self.sockets_skipped += o.sockets_skipped;
        self.excluded += o.excluded;
        self.other_fs_dirs += o.other_fs_dirs;
        self.taken_over += o.taken_over;
        self.data_bytes += o.data_bytes;
        self.files_read += o.files_read;
        self.bytes_read += o.bytes_read;
        self.bytes_direct += o.bytes_direct;
        for w in &o.warnings {
            self.warn(w.clone());
        }
    }

    fn warn(&mut self, msg: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(msg);
        }
    }
}

/// The stat fields of a regular file that decide whether its content may
/// have changed since an earlier walk (taken with `fstat` on the opened
/// file, before any data is read; for [`TreeSink::file_unopened`] from the
/// walker's `lstat`). Owners and mode are the host's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatKey {
    /// Device of the file system.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode change time in nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner (host id).
    pub uid: u32,
    /// Group (host id).
    pub gid: u32,
}

impl StatKey {
    /// The key of an `lstat` result (as the walker takes it).
    #[must_use]
    pub fn from_stat(st: &rustix::fs::Stat) -> StatKey {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        StatKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: ns(st.st_mtime, i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
            ctime_ns: ns(st.st_ctime, i64::try_from(st.st_ctime_nsec).unwrap_or(0)),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }

    fn of(st: &Meta) -> StatKey {
        let ns = |s: i64, n: u32| s.saturating_mul(1_000_000_000).saturating_add(i64::from(n));
        StatKey {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime_ns: ns(st.mtime, st.mtime_nsec),
            ctime_ns: ns(st.ctime, st.ctime_nsec),
            mode: st.mode,
            uid: st.uid,
            gid: st.gid,
        }
    }
}

/// Receives the members of a tree walk, in archive order.
pub trait TreeSink {
    /// A member without content: directory, symlink, hard link, device, FIFO.
    ///
    /// # Errors
    /// Whatever the sink fails with; the walk stops.
    fn entry(&mut self, h: &MemberHeader<'_>) -> Result<()>;

    /// As [`TreeSink::entry`], with the `lstat` key of the member's inode
    /// (the walker calls this one; the default forwards to `entry`).
    ///
    /// # Errors
    /// Whatever the sink fails with; the walk stops.
    fn keyed_entry(&mut self, h: &MemberHeader<'_>, key: &StatKey) -> Result<()> {
        let _ = key;
        self.entry(h)
    }

    /// Asked for every entry below the walk's root before it is `lstat`ed,
    /// with its member name (no trailing slash) and the inode number the
    /// directory listing gives for it. A sink that knows that inode (and
    /// for a directory everything below it) unchanged since an earlier walk
    /// may emit those members itself and return true; the walker then
    /// neither `lstat`s nor opens the entry. The default (and
    /// [`ArchiveWriter`]) returns false.
    ///
    /// # Errors
    /// Whatever the sink fails with; the walk stops.
    fn unstatted(&mut self, member: &[u8], ino: u64) -> Result<bool> {
        let _ = (member, ino);
        Ok(false)
    }

    /// A regular file; `h.size` content bytes (its data regions, in
    /// order) are available from `data`. The sink may read them with
    /// [`FileData::read`] or not at all.
    ///
    /// # Errors
    /// Whatever the sink fails with; the walk stops.
    fn file(&mut self, h: &MemberHeader<'_>, key: &StatKey, data: &mut FileData<'_>) -> Result<()>;

    /// Asked for a regular file before it is opened, with its `lstat`
    /// key (`may_be_sparse`: it has fewer blocks than its size). A sink
    /// that already has the whole member (header incl. ACLs and xattrs,
    /// and data) from an earlier walk may emit it itself and return what
    /// it emitted; the file is then neither opened nor passed to
    /// [`TreeSink::file`]. The default (and [`ArchiveWriter`]) returns
    /// `None`: every file is opened and read.
    ///
    /// # Errors
    /// Whatever the sink fails with; the walk stops.
    fn file_unopened(
        &mut self,
        member: &[u8],
        key: &StatKey,
        may_be_sparse: bool,
    ) -> Result<Option<Reused>> {
        let _ = (member, key, may_be_sparse);
        Ok(None)
    }
}

/// A regular file a sink emitted from an earlier walk without it being
/// opened ([`TreeSink::file_unopened`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reused {
    /// Bytes of its data regions (the member's size).
    pub data_size: u64,
    /// Written as a sparse member.
    pub sparse: bool,
}

/// The content of a regular file during a walk.
#[derive(Debug)]
pub struct FileData<'a> {
    file: &'a File,
    /// Read from this volume image if the file's extent map allows (see
    /// [`crate::direct`]; mapped when the data is read).
    direct: Option<&'a DirectImage>,
    /// The file's size.
    size: u64,
    /// Its data was read from the image.
    read_direct: bool,
    regions: &'a [SparseRegion],
    path: &'a Path,
    buf: &'a mut Vec<u8>,
    short: bool,
    read_bytes: u64,
    was_read: bool,
}

impl FileData<'_> {
    /// The file on the host.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.path
    }

    /// Read the data regions in order, handing pieces of at most 256 KiB to
    /// `f`. Exactly the member's `size` bytes are produced: a file that
    /// shrank while read is padded with zeros (and a warning recorded).
    ///
    /// # Errors
    /// Read errors on the file, or what `f` returns.
    pub fn read(&mut self, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.was_read = true;
        let map: Option<ExtentMap> = self.direct.and_then(|d| d.map(self.file, self.size));
        self.read_direct = map.is_some();
        let mut buf = std::mem::take(self.buf);
        buf.resize(COPY_BUF, 0);
        let res = (|| {
            for r in self.regions {
                let mut off = r.offset;
                let end = r.offset + r.length;
                while off < end {
                    let want = usize::try_from(end - off)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    let n = if self.short {
                        0
                    } else {
                        let got = match (self.direct, &map) {
                            (Some(image), Some(map)) => image.read_at(map, &mut buf[..want], off),
                            _ => self.file.read_at(&mut buf[..want], off),
                        };
                        match got {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(ArchiveError::fs("read", self.path, e)),
                        }
                    };
                    let n = if n == 0 {
                        self.short = true;
                        buf[..want].fill(0);
                        want
                    } else {
                        self.read_bytes += n as u64;
                        n
                    };
                    f(&buf[..n])?;
                    off += n as u64;
                }
            }
            Ok(())
        })();
        *self.buf = buf;
        res
    }
}

/// Walks directory trees like GNU tar (see the module docs) and hands the
/// members to a [`TreeSink`]. Hard-link state is kept across walks.
pub struct Walker {
    id_map: Option<IdMap>,
    /// File data of this file system is read from its image.
    direct: Option<DirectImage>,
    /// (dev, ino) → (first member name, links still to come)
    links: HashMap<(u64, u64), (Vec<u8>, u64)>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Walker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walker")
            .field("id_map", &self.id_map)
            .finish_non_exhaustive()
    }
}

/// An opened tree entry, with what we need to emit it.
struct Source<'a> {
    dirfd: BorrowedFd<'a>,
    name: &'a [u8],
    path: PathBuf,
}

impl Walker {
    /// A walker storing host ids as they are, or (with `id_map`) ids as
    /// seen inside a container with this id map.
    #[must_use]
    pub fn new(id_map: Option<IdMap>) -> Self {
        Walker {
            id_map,
            direct: None,
            links: HashMap::new(),
            buf: Vec::new(),
        }
    }

    /// Read the data of files on the file system of `direct` from its image file
    /// (see [`crate::direct`]) until set again; `None` reads through the mount.
    pub fn set_direct(&mut self, direct: Option<DirectImage>) {
        self.direct = direct;
    }

    /// Walk the tree at `src` under `member_prefix` (`"./"` for a rootfs,
    /// `"./mnt/data"` for a mount point). `src` itself becomes the member
    /// `<prefix>/`; exclude patterns are matched against member names.
    ///
    /// # Errors
    /// I/O errors on the source tree (other than files vanishing while the
    /// tree is read, which are warnings) or the sink's errors.
    pub fn walk(
        &mut self,
        src: &Path,
        member_prefix: &str,
        excludes: &ExcludeSet,
        one_file_system: bool,
        sink: &mut dyn TreeSink,
    ) -> Result<Stats> {
        let mut stats = Stats::default();
        let root = rustix::fs::open(
            src,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ArchiveError::fs("open directory", src, e.into()))?;
        let meta = Meta::from_stat(
            &rustix::fs::fstat(&root).map_err(|e| ArchiveError::fs("stat", src, e.into()))?,
        );
        let base = member_prefix.trim_end_matches('/');
        let base = if base.is_empty() { "." } else { base };
        let mut root_name = base.as_bytes().to_vec();
        root_name.push(b'/');
        self.emit_dir(&root, &root_name, &meta, src, &mut stats, sink)?;
        let ctx = WalkCtx {
            root_dev: meta.dev,
            excludes,
            one_file_system,
        };
        self.walk_dir(&root, base.as_bytes(), src, &ctx, &mut stats, sink)?;
        Ok(stats)
    }

    fn walk_dir(
        &mut self,
        dir: &OwnedFd,
        dir_member: &[u8],
        dir_path: &Path,
        ctx: &WalkCtx<'_>,
        stats: &mut Stats,
        sink: &mut dyn TreeSink,
    ) -> Result<()> {
        let mut names = Vec::new();
        {
            let mut d = rustix::fs::Dir::read_from(dir)
                .map_err(|e| ArchiveError::fs("read directory", dir_path, e.into()))?;
            while let Some(ent) = d.read() {
                let ent =
                    ent.map_err(|e| ArchiveError::fs("read directory", dir_path, e.into()))?;
                let n = ent.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push((n.to_vec(), ent.ino()));
                }
            }
        }
        names.sort();
        for (name, ino) in names {
            let mut member = dir_member.to_vec();
            member.push(b'/');
            member.extend_from_slice(&name);
            if ctx.excludes.is_excluded(&member) {
                stats.excluded += 1;
                continue;
            }
            if sink.unstatted(&member, ino)? {
                stats.taken_over += 1;
                continue;
            }
            let path = dir_path.join(std::ffi::OsStr::from_bytes(&name));
            let st = match rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Meta::from_stat(&st),
                Err(rustix::io::Errno::NOENT) => {
                    stats.warn(format!(
                        "{}: File removed before we read it",
                        path.display()
                    ));
                    continue;
                }
                Err(e) => return Err(ArchiveError::fs("stat", &path, e.into())),
            };
            let src = Source {
                dirfd: dir.as_fd(),
                name: &name,
                path,
            };
            match st.file_type() {
                FileType::Directory => {
                    let sub = match rustix::fs::openat(
                        dir,
                        name.as_slice(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(fd) => fd,
                        Err(rustix::io::Errno::NOENT) => {
                            stats.warn(format!(
                                "{}: File removed before we read it",
                                src.path.display()
                            ));
                            continue;
                        }
                        Err(e) => {
                            return Err(ArchiveError::fs("open directory", &src.path, e.into()));
                        }
                    };
                    let meta = Meta::from_stat(
                        &rustix::fs::fstat(&sub)
                            .map_err(|e| ArchiveError::fs("stat", &src.path, e.into()))?,
                    );
                    let mut dname = member.clone();
                    dname.push(b'/');
                    self.emit_dir(&sub, &dname, &meta, &src.path, stats, sink)?;
                    if ctx.one_file_system && meta.dev != ctx.root_dev {
                        stats.other_fs_dirs += 1;
                        continue;
                    }
                    self.walk_dir(&sub, &member, &src.path, ctx, stats, sink)?;
                }
                FileType::RegularFile => self.emit_file(&src, &member, &st, stats, sink)?,
                FileType::Symlink => {
                    let target = match rustix::fs::readlinkat(dir, name.as_slice(), Vec::new()) {
                        Ok(t) => t.into_bytes(),
                        Err(rustix::io::Errno::NOENT) => {
                            stats.warn(format!(
                                "{}: File removed before we read it",
                                src.path.display()
                            ));
                            continue;
                        }
                        Err(e) => return Err(ArchiveError::fs("readlink", &src.path, e.into())),
                    };
                    stats.symlinks += 1;
                    self.emit_simple(
                        &member,
                        MemberKind::Symlink,
                        &st,
                        Some(&target),
                        None,
                        stats,
                        sink,
                    )?;
                }
                FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                    if st.nlink > 1 && self.emit_hardlink_if_seen(&member, &st, stats, sink)? {
                        continue;
                    }
                    let kind = match st.file_type() {
                        FileType::CharacterDevice => MemberKind::CharDevice,
                        FileType::BlockDevice => MemberKind::BlockDevice,
                        _ => MemberKind::Fifo,
                    };
                    if kind == MemberKind::Fifo {
                        stats.fifos += 1;
                    } else {
                        stats.devices += 1;
                    }
                    let ppath = proc_path(src.dirfd, src.name);
                    self.emit_simple(
                        &member,
                        kind,
                        &st,
                        None,
                        Some((XattrTarget::Path(&ppath), &src.path)),
                        stats,
                        sink,
                    )?;
                }
                FileType::Socket => {
                    stats.sockets_skipped += 1;
                    stats.warn(format!("{}: socket ignored", src.path.display()));
                }
                FileType::Unknown => {
                    return Err(ArchiveError::Unsupported {
                        member: String::from_utf8_lossy(&member).into_owned(),
                        message: "unknown file type".into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn map_owner(&self, kind: IdKind, id: u32) -> u64 {
        match &self.id_map {
            Some(m) => u64::from(m.to_container(kind, id.into()).unwrap_or(OVERFLOW_ID)),
            None => u64::from(id),
        }
    }

    /// ACL and xattr PAX values of a file.
    fn collect_attrs(
        &self,
        target: XattrTarget<'_>,
        path: &Path,
        is_dir: bool,
        stats: &mut Stats,
    ) -> Result<Attrs> {
        let acl_of = |name: &str, keep_trivial: bool| -> Result<Option<String>> {
            let Some(raw) = target
                .get(name.as_bytes())
                .map_err(|e| ArchiveError::fs("read ACL", path, e))?
            else {
                return Ok(None);
            };
            let acl = Acl::from_xattr(&raw).map_err(|e| ArchiveError::Unsupported {
                member: path.display().to_string(),
                message: e.to_string(),
            })?;
            if acl.entries().is_empty() || (!keep_trivial && acl.is_trivial()) {
                return Ok(None);
            }
            let acl = match &self.id_map {
                Some(m) => acl.map_ids_munged(m, Direction::ToContainer),
                None => acl,
            };
            Ok(Some(acl.to_text()))
        };
        let access = acl_of(acl::XATTR_ACL_ACCESS, false)?;
        let default = if is_dir {
            acl_of(acl::XATTR_ACL_DEFAULT, true)?
        } else {
            None
        };
        let mut xattrs = Vec::new();
        let mut names = target
            .list()
            .map_err(|e| ArchiveError::fs("list xattrs", path, e))?;
        names.sort();
        for name in names {
            let is_cap = name == acl::XATTR_CAPABILITY.as_bytes();
            if !(name.starts_with(b"user.") || is_cap) {
                continue;
            }
            let Some(mut value) = target
                .get(&name)
                .map_err(|e| ArchiveError::fs("read xattr", path, e))?
            else {
                continue;
            };
            if is_cap && let Some(m) = &self.id_map {
                match acl::map_capability(&value, m, Direction::ToContainer) {
                    Some(v) => value = v,
                    None => {
                        stats.warn(format!(
                            "{}: security.capability root id is not mapped; not archived",
                            path.display()
                        ));
                        continue;
                    }
                }
            }
            xattrs.push((name, value));
        }
        Ok((access, default, xattrs))
    }

    fn emit_dir(
        &mut self,
        fd: &OwnedFd,
        name: &[u8],
        st: &Meta,
        path: &Path,
        stats: &mut Stats,
        sink: &mut dyn TreeSink,
    ) -> Result<()> {
        let (acl_access, acl_default, xattrs) =
            self.collect_attrs(XattrTarget::Fd(fd.as_fd()), path, true, stats)?;
        stats.dirs += 1;
        let h = MemberHeader {
            name,
            kind: MemberKind::Directory,
            mode: st.mode,
            uid: self.map_owner(IdKind::Uid, st.uid),
            gid: self.map_owner(IdKind::Gid, st.gid),
            mtime: st.mtime,
            mtime_nsec: st.mtime_nsec,
            size: 0,
            link: None,
            device: (0, 0),
            sparse: None,
            acl_access,
            acl_default,
            xattrs: &xattrs,
        };
        sink.keyed_entry(&h, &StatKey::of(st))
    }

    /// Members without content: symlinks, devices, FIFOs.
    #[allow(clippy::too_many_arguments)]
    fn emit_simple(
        &mut self,
        name: &[u8],
        kind: MemberKind,
        st: &Meta,
        link: Option<&[u8]>,
        attrs: Option<(XattrTarget<'_>, &Path)>,
        stats: &mut Stats,
        sink: &mut dyn TreeSink,
    ) -> Result<()> {
        let (acl_access, acl_default, xattrs) = match attrs {
            Some((t, p)) => self.collect_attrs(t, p, false, stats)?,
            None => (None, None, Vec::new()),
        };
        let h = MemberHeader {
            name,
            kind,
            mode: st.mode,
            uid: self.map_owner(IdKind::Uid, st.uid),
            gid: self.map_owner(IdKind::Gid, st.gid),
            mtime: st.mtime,
            mtime_nsec: st.mtime_nsec,
            size: 0,
            link,
            device: (rustix::fs::major(st.rdev), rustix::fs::minor(st.rdev)),
            sparse: None,
            acl_access,
            acl_default,
            xattrs: &xattrs,
        };
        sink.keyed_entry(&h, &StatKey::of(st))
    }

    /// Emit a hard-link member if this inode was archived before; otherwise
    /// remember it and return false.
    fn emit_hardlink_if_seen(
        &mut self,
        member: &[u8],
        st: &Meta,
        stats: &mut Stats,
        sink: &mut dyn TreeSink,
    ) -> Result<bool> {
        let key = (st.dev, st.ino);
        if let Some((first, left)) = self.links.get_mut(&key) {
            let target = first.clone();
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.links.remove(&key);
            }
            stats.hardlinks += 1;
            self.emit_simple(
                member,
                MemberKind::HardLink,
                st,
                Some(&target),
                None,
                stats,
                sink,
            )?;
            return Ok(true);
        }
        self.links.insert(key, (member.to_vec(), st.nlink - 1));
        Ok(false)
    }

    fn emit_file(
        &mut self,
        src: &Source<'_>,
        member: &[u8],
        lst: &Meta,
        stats: &mut Stats,
        sink: &mut dyn TreeSink,
    ) -> Result<()> {
        // Second and later names of a hard-linked inode are opened as
        // before (they become hard-link members); any other file is first
        // offered to the sink unopened.
        let link_key = (lst.dev, lst.ino);
        if (lst.nlink <= 1 || !self.links.contains_key(&link_key))
            && let Some(r) = sink.file_unopened(
                member,
                &StatKey::of(lst),
                lst.blocks.saturating_mul(512) < lst.size,
            )?
        {
            if lst.nlink > 1 {
                self.links
                    .insert(link_key, (member.to_vec(), lst.nlink - 1));
            }
            stats.files += 1;
            stats.sparse_files += u64::from(r.sparse);
            stats.data_bytes += r.data_size;
            return Ok(());
        }
        let fd = match rustix::fs::openat(
            src.dirfd,
            src.name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                stats.warn(format!(
                    "{}: File removed before we read it",
                    src.path.display()
                ));
                return Ok(());
            }
            Err(e) => return Err(ArchiveError::fs("open", &src.path, e.into())),
        };
        let st = Meta::from_stat(
            &rustix::fs::fstat(&fd).map_err(|e| ArchiveError::fs("stat", &src.path, e.into()))?,
        );
        if st.file_type() != FileType::RegularFile {
            stats.warn(format!(
                "{}: file changed type while read; not archived",
                src.path.display()
            ));
            return Ok(());
        }
        if (st.dev, st.ino) != (lst.dev, lst.ino) {
            stats.warn(format!("{}: file replaced while read", src.path.display()));
        }
        if st.nlink > 1 && self.emit_hardlink_if_seen(member, &st, stats, sink)? {
            return Ok(());
        }
        let (acl_access, acl_default, xattrs) =
            self.collect_attrs(XattrTarget::Fd(fd.as_fd()), &src.path, false, stats)?;
        let regions = if st.blocks * 512 < st.size {
            sparse_map(&fd, st.size).map_err(|e| ArchiveError::fs("scan holes", &src.path, e))?
        } else {
            None
        };
        let data_size = match &regions {
            Some(r) => r.iter().map(|r| r.length).sum(),
            None => st.size,
        };
        stats.files += 1;
        if regions.is_some() {
            stats.sparse_files += 1;
        }
        let h = MemberHeader {
            name: member,
            kind: MemberKind::Regular,
            mode: st.mode,
            uid: self.map_owner(IdKind::Uid, st.uid),
            gid: self.map_owner(IdKind::Gid, st.gid),
            mtime: st.mtime,
            mtime_nsec: st.mtime_nsec,
            size: data_size,
            link: None,
            device: (0, 0),
            sparse: regions.as_deref().map(|r| (st.size, r)),
            acl_access,
            acl_default,
            xattrs: &xattrs,
        };
        let file = File::from(fd);
        let whole = [SparseRegion {
            offset: 0,
            length: st.size,
        }];
        let mut data = FileData {
            file: &file,
            direct: self.direct.as_ref(),
            size: st.size,
            read_direct: false,
            regions: regions.as_deref().unwrap_or(&whole),
            path: &src.path,
            buf: &mut self.buf,
            short: false,
            read_bytes: 0,
            was_read: false,
        };
        sink.file(&h, &StatKey::of(&st), &mut data)?;
        if data.short {
            stats.warn(format!(
                "{}: file shrank by some bytes; padding with zeros",
                src.path.display()
            ));
        }
        if data.was_read {
            stats.files_read += 1;
        }
        stats.bytes_read += data.read_bytes;
        if data.read_direct {
            stats.bytes_direct += data.read_bytes;
        }
        stats.data_bytes += data_size;
        Ok(())
    }
}

struct WalkCtx<'a> {
    root_dev: u64,
    excludes: &'a ExcludeSet,
    one_file_system: bool,
}

/// The tar-encoding half of [`ArchiveWriter`].
struct TarOut<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> TarOut<W> {
    fn put(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data).map_err(ArchiveError::Stream)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<()> {
        let n = header::padding(len);
        self.put(&[0u8; BLOCK][..n])
    }
}

impl<W: Write> TreeSink for TarOut<W> {
    fn entry(&mut self, h: &MemberHeader<'_>) -> Result<()> {
        let bytes = header::encode(h)?;
        self.put(&bytes)
    }

    fn file(
        &mut self,
        h: &MemberHeader<'_>,
        _key: &StatKey,
        data: &mut FileData<'_>,
    ) -> Result<()> {
        let bytes = header::encode(h)?;
        self.put(&bytes)?;
        data.read(&mut |b| self.put(b))?;
        self.pad(h.size)
    }
}

/// Streaming tar writer; see the module docs.
pub struct ArchiveWriter<W: Write> {
    tar: TarOut<W>,
    walker: Walker,
}

impl<W: Write> std::fmt::Debug for ArchiveWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("written", &self.tar.written)
            .field("walker", &self.walker)
            .finish_non_exhaustive()
    }
}

/// The end-of-archive marker (two zero blocks) plus GNU tar's padding to
/// 10 KiB records, for a stream of `written` bytes so far.
#[must_use]
pub fn trailer(written: u64) -> Vec<u8> {
    let mut t = vec![0u8; 2 * BLOCK];
    let rem = ((written + t.len() as u64) % RECORD as u64) as usize;
    if rem != 0 {
        t.resize(t.len() + RECORD - rem, 0);
    }
    t
}

/// The header blocks of a regular file member written by
/// [`ArchiveWriter::append_data`] (owned by 0:0, no attributes).
///
/// # Errors
/// Invalid name.
pub fn data_member_header(name: &[u8], size: u64, mode: u32, mtime: i64) -> Result<Vec<u8>> {
    let h = MemberHeader {
        name,
        kind: MemberKind::Regular,
        mode,
        uid: 0,
        gid: 0,
        mtime,
        mtime_nsec: 0,
        size,
        link: None,
        device: (0, 0),
        sparse: None,
        acl_access: None,
        acl_default: None,
        xattrs: &[],
    };
    header::encode(&h)
}

impl<W: Write> ArchiveWriter<W> {
    /// A writer storing host ids as they are.
    pub fn new(out: W) -> Self {
        ArchiveWriter {
            tar: TarOut { out, written: 0 },
            walker: Walker::new(None),
        }
    }

    /// A writer storing ids as seen inside a container with this id map.
    pub fn with_id_map(out: W, map: IdMap) -> Self {
        ArchiveWriter {
            tar: TarOut { out, written: 0 },
            walker: Walker::new(Some(map)),
        }
    }

    /// Bytes written to the stream so far.
    #[must_use]
    pub fn bytes_written(&self) -> u64 {
        self.tar.written
    }

    /// Read file data of the next trees from a volume image ([`Walker::set_direct`]).
    pub fn set_direct(&mut self, direct: Option<DirectImage>) {
        self.walker.set_direct(direct);
    }

    /// Append a regular file member with the given content, owned by 0:0
    /// (e.g. `./etc/vzdump/pct.conf`). No parent directory members are
    /// written, as with tar's explicitly listed files.
    ///
    /// # Errors
    /// Invalid name, or a write error.
    pub fn append_data(
        &mut self,
        name: impl AsRef<[u8]>,
        data: &[u8],
        mode: u32,
        mtime: i64,
    ) -> Result<()> {
        let bytes = data_member_header(name.as_ref(), data.len() as u64, mode, mtime)?;
        self.tar.put(&bytes)?;
        self.tar.put(data)?;
        self.tar.pad(data.len() as u64)
    }

    /// Archive the tree at `src` under `member_prefix` (`"./"` for a rootfs,
    /// `"./mnt/data"` for a mount point). `src` itself becomes the member
    /// `<prefix>/`; exclude patterns are matched against member names.
    ///
    /// # Errors
    /// I/O errors on the source tree (other than files vanishing while the
    /// tree is read, which are warnings) or on the output stream.
    pub fn append_tree(
        &mut self,
        src: &Path,
        member_prefix: &str,
        excludes: &ExcludeSet,
        one_file_system: bool,
    ) -> Result<Stats> {
        self.walker
            .walk(src, member_prefix, excludes, one_file_system, &mut self.tar)
    }

    /// Write the end-of-archive marker (two zero blocks), pad to GNU tar's
    /// 10 KiB record size, and return the output.
    ///
    /// # Errors
    /// A write or flush error.
    pub fn finish(mut self) -> Result<W> {
        let t = trailer(self.tar.written);
        self.tar.put(&t)?;
        self.tar.out.flush().map_err(ArchiveError::Stream)?;
        Ok(self.tar.out)
    }
}

/// The data regions of a file with holes, or `None` if it has none (or
/// the file system cannot tell). A file ending in a hole gets the final
/// `(size, 0)` region GNU tar writes.
fn sparse_map(fd: &OwnedFd, size: u64) -> std::io::Result<Option<Vec<SparseRegion>>> {
    let mut regions: Vec<SparseRegion> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(fd, SeekFrom::Hole(data))?.min(size);
        regions.push(SparseRegion {
            offset: data,
            length: hole - data,
        });
        pos = hole;
    }
    if regions.len() == 1 && regions[0].offset == 0 && regions[0].length == size {
        return Ok(None);
    }
    coalesce(&mut regions, MAX_SPARSE_REGIONS);
    if regions.last().is_none_or(|r| r.offset + r.length < size) {
        regions.push(SparseRegion {
            offset: size,
            length: 0,
        });
    }
    Ok(Some(regions))
}

/// Merge neighbouring regions until at most `max` remain; merged gaps are
/// read back as zeros, so content is unchanged.
fn coalesce(regions: &mut Vec<SparseRegion>, max: usize) {
    while regions.len() > max {
        let mut merged = Vec::with_capacity(regions.len() / 2 + 1);
        for pair in regions.chunks(2) {
            match pair {
                [a, b] => merged.push(SparseRegion {
                    offset: a.offset,
                    length: b.offset + b.length - a.offset,
                }),
                [a] => merged.push(*a),
                _ => unreachable!("chunks(2)"),
            }
        }
        *regions = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_keeps_coverage() {
        let mut r: Vec<SparseRegion> = (0..10)
            .map(|i| SparseRegion {
                offset: i * 100,
                length: 10,
            })
            .collect();
        coalesce(&mut r, 3);
        assert!(r.len() <= 3);
        assert_eq!(r[0].offset, 0);
        let last = r.last().unwrap();
        assert_eq!(last.offset + last.length, 910);
    }
}
