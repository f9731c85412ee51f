//! Safe extraction of tar streams, with the semantics of PVE's restore
//! command (`tar xpf - --totals --one-file-system -p --sparse --numeric-owner
//! --acls --xattrs --xattrs-include=user.* --xattrs-include=security.capability
//! --warning=no-file-ignored --warning=no-xattr-write -C ROOT --skip-old-files
//! --anchored --exclude ./dev/*`, see [`ExtractOptions::pve_restore`]).
//!
//! Safety: names are resolved component by component from an fd of the
//! target root with `openat(O_NOFOLLOW|O_DIRECTORY)`; nothing is ever
//! resolved through a symbolic link, so neither a symlink already in the
//! target nor one created earlier by the archive (or replaced mid-archive)
//! can redirect a write outside the root. Names with `..` components or a
//! leading `/`, and hard links whose target is not inside the root, are
//! refused. Files are created with `O_CREAT|O_EXCL|O_NOFOLLOW` after removing
//! what was there (or skipped, with `skip_old_files`), so data is never
//! written through an existing hard link or symlink. Existing directories
//! are never removed.
//!
//! Metadata order per member (as GNU tar): owner, mode, xattrs
//! (`security.capability` after chown, which clears it), ACLs, mtime.
//! Directories get theirs after all members, deepest last-created first, so
//! their mtimes survive; they are re-opened by name and checked to be the
//! same inode. Intermediate directories missing from the archive are created
//! with mode 0755, owned by the (mapped) root.
//!
//! Id mapping ([`ExtractOptions::id_map`], container → host): owners,
//! ACL qualifiers and `security.capability` root ids are mapped as if tar
//! ran in the container's user namespace. An unmapped owner is an error
//! (chown would fail with EINVAL); an unmapped ACL entry or capability root
//! is a warning and that attribute is skipped (tar only warns).
//!
//! ACL qualifiers given as names (GNU tar writes names it can resolve) are
//! resolved with this host's `/etc/passwd` and `/etc/group`, as GNU tar's
//! `acl_from_text` does on restore.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;

use crate::acl::{self, Acl, NameDb};
use crate::error::{ArchiveError, Result};
use crate::exclude::ExcludeSet;
use crate::fsutil::{Meta, XattrTarget, proc_path};
use crate::header::MemberKind;
use crate::idmap::{Direction, IdKind, IdMap};
use crate::reader::{ArchiveReader, Entry};

const COPY_BUF: usize = 256 * 1024;
const MAX_MESSAGES: usize = 1000;

/// How to extract; see the module docs.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Members whose names match are skipped (with their contents).
    pub exclude: ExcludeSet,
    /// Leave existing files alone (GNU tar `--skip-old-files`); existing
    /// directories then also keep their metadata. Otherwise existing
    /// non-directories are replaced and directories get the archived metadata.
    pub skip_old_files: bool,
    /// Create device nodes (false for unprivileged restores; a device member
    /// is then an unpack error, as `mknod` is in a user namespace).
    pub allow_devices: bool,
    /// Map container ids in the archive to host ids.
    pub id_map: Option<IdMap>,
    /// Record member-level errors in the report instead of failing.
    pub ignore_unpack_errors: bool,
}

impl Default for ExtractOptions {
    /// Plain `tar xpf` as root: no excludes, existing files replaced,
    /// devices allowed, no id map, errors fatal.
    fn default() -> Self {
        ExtractOptions {
            exclude: ExcludeSet::new(),
            skip_old_files: false,
            allow_devices: true,
            id_map: None,
            ignore_unpack_errors: false,
        }
    }
}

impl ExtractOptions {
    /// Options equivalent to PVE's `restore_tar_archive`: `--skip-old-files`,
    /// `--exclude ./dev/*`, devices only without an id map.
    #[must_use]
    pub fn pve_restore(id_map: Option<IdMap>, ignore_unpack_errors: bool) -> Self {
        ExtractOptions {
            exclude: ExcludeSet::pve_restore(),
            skip_old_files: true,
            allow_devices: id_map.is_none(),
            id_map,
            ignore_unpack_errors,
        }
    }
}

/// What an extraction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExtractReport {
    /// Members created (incl. directories' metadata applications).
    pub entries: u64,
    /// File content bytes written (sparse: data regions only).
    pub bytes: u64,
    /// Members skipped by exclude patterns.
    pub excluded: u64,
    /// Members skipped because the name existed (`skip_old_files`).
    pub skipped_existing: u64,
    /// Member-level errors ignored because of `ignore_unpack_errors` (at most 1000 kept).
    pub errors: Vec<String>,
    /// Problems GNU tar only warns about (xattr/ACL writes, unmapped ACL
    /// ids); at most 1000 kept.
    pub warnings: Vec<String>,
}

/// Owned per-member metadata to apply.
#[derive(Debug, Clone)]
struct Attrs {
    name: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    mtime_nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    acl_access: Option<String>,
    acl_default: Option<String>,
}

impl Attrs {
    fn of(e: &Entry) -> Attrs {
        Attrs {
            name: e.name.clone(),
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            xattrs: e.xattrs.clone(),
            acl_access: e.acl_access.clone(),
            acl_default: e.acl_default.clone(),
        }
    }

    fn member(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

#[derive(Debug)]
struct DelayedDir {
    comps: Vec<Vec<u8>>,
    dev: u64,
    ino: u64,
    attrs: Attrs,
}

/// Where metadata goes.
enum Target<'a> {
    /// An open regular file or directory.
    Fd(BorrowedFd<'a>),
    /// `name` in `dir`, not followed; `symlink` says whether it is one.
    At(BorrowedFd<'a>, &'a [u8], bool),
}

/// Extract the tar stream `r` (already decompressed) below `target_root`.
///
/// # Errors
/// Stream errors (corrupt, truncated, read errors) always; member errors
/// (unsafe names, unmapped owners, devices not allowed, file system errors)
/// unless `ignore_unpack_errors`. Nothing outside `target_root` is touched
/// in any case.
pub fn extract<R: Read>(r: R, target_root: &Path, opts: &ExtractOptions) -> Result<ExtractReport> {
    run(ArchiveReader::new(r), target_root, opts)
}

/// [`extract()`] of a stream that holds its bytes in its own buffer
/// already: file content is written from there without being copied out
/// first ([`ArchiveReader::new_buffered`]).
///
/// # Errors
/// As [`extract()`].
pub fn extract_buffered<R: std::io::BufRead>(
    r: R,
    target_root: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    run(ArchiveReader::new_buffered(r), target_root, opts)
}

fn run<R: Read>(
    mut rd: ArchiveReader<R>,
    target_root: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    let root = rustix::fs::open(
        target_root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ArchiveError::fs("open target directory", target_root, e.into()))?;
    let names = NameDb::load_system()
        .map_err(|e| ArchiveError::fs("read", "/etc/passwd or /etc/group", e))?;
    let mut x = Extractor {
        names,
        root: Rc::new(root),
        root_path: target_root.to_path_buf(),
        opts,
        stack: Vec::new(),
        delayed: Vec::new(),
        report: ExtractReport::default(),
        buf: vec![0; COPY_BUF],
    };
    while let Some(e) = rd.next_entry()? {
        let res = x.entry(&mut rd, &e);
        x.settle(res)?;
    }
    let delayed = std::mem::take(&mut x.delayed);
    for d in delayed.iter().rev() {
        let res = x.finish_dir(d);
        x.settle(res)?;
    }
    Ok(x.report)
}

fn is_stream_error(e: &ArchiveError) -> bool {
    matches!(
        e,
        ArchiveError::Stream(_) | ArchiveError::Corrupt { .. } | ArchiveError::Truncated { .. }
    )
}

/// Creates `leaf` in `dir` as a new regular file (mode 0600 until metadata is applied),
/// never opening an existing file and never following a symbolic link.
fn create_exclusive(dir: &OwnedFd, leaf: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        leaf,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
}

/// Split a member name into safe components; empty for the root itself.
fn components(name: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if name.starts_with(b"/") {
        return Err("absolute name");
    }
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("name contains '..'"),
            c => out.push(c),
        }
    }
    Ok(out)
}

struct Extractor<'o> {
    names: NameDb,
    root: Rc<OwnedFd>,
    root_path: PathBuf,
    opts: &'o ExtractOptions,
    /// Open directories of the last resolved parent path, from the root down.
    stack: Vec<(Vec<u8>, Rc<OwnedFd>)>,
    delayed: Vec<DelayedDir>,
    report: ExtractReport,
    buf: Vec<u8>,
}

impl Extractor<'_> {
    fn settle(&mut self, res: Result<()>) -> Result<()> {
        match res {
            Ok(()) => Ok(()),
            Err(e) if is_stream_error(&e) || !self.opts.ignore_unpack_errors => Err(e),
            Err(e) => {
                if self.report.errors.len() < MAX_MESSAGES {
                    self.report.errors.push(e.to_string());
                }
                Ok(())
            }
        }
    }

    fn warn(&mut self, msg: String) {
        if self.report.warnings.len() < MAX_MESSAGES {
            self.report.warnings.push(msg);
        }
    }

    fn path_of(&self, comps: &[&[u8]]) -> PathBuf {
        let mut p = self.root_path.clone();
        for c in comps {
            p.push(std::ffi::OsStr::new(&*String::from_utf8_lossy(c)));
        }
        p
    }

    fn unsafe_path(member: &[u8], reason: impl Into<String>) -> ArchiveError {
        ArchiveError::UnsafePath {
            member: String::from_utf8_lossy(member).into_owned(),
            reason: reason.into(),
        }
    }

    /// Open the directory `comps` below the root without following
    /// symlinks, creating missing ones if `create`. Returns a dup of its fd.
    fn open_dir(&mut self, comps: &[&[u8]], create: bool, member: &[u8]) -> Result<Rc<OwnedFd>> {
        let common = self
            .stack
            .iter()
            .zip(comps)
            .take_while(|((name, _), c)| name.as_slice() == **c)
            .count();
        self.stack.truncate(common);
        for (i, comp) in comps.iter().enumerate().skip(common) {
            let parent = match self.stack.last() {
                Some((_, fd)) => fd.as_fd(),
                None => self.root.as_fd(),
            };
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = match rustix::fs::openat(parent, *comp, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(parent, *comp, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(ArchiveError::fs(
                                "mkdir",
                                self.path_of(&comps[..=i]),
                                e.into(),
                            ));
                        }
                    }
                    let fd =
                        rustix::fs::openat(parent, *comp, flags, Mode::empty()).map_err(|e| {
                            ArchiveError::fs("open", self.path_of(&comps[..=i]), e.into())
                        })?;
                    if let Some(m) = &self.opts.id_map {
                        let uid = m.to_host(IdKind::Uid, 0);
                        let gid = m.to_host(IdKind::Gid, 0);
                        rustix::fs::fchown(
                            &fd,
                            uid.map(rustix::fs::Uid::from_raw),
                            gid.map(rustix::fs::Gid::from_raw),
                        )
                        .map_err(|e| {
                            ArchiveError::fs("chown", self.path_of(&comps[..=i]), e.into())
                        })?;
                    }
                    fd
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let is_link = rustix::fs::statat(parent, *comp, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| Meta::from_stat(&st).file_type() == FileType::Symlink);
                    let what = if is_link {
                        "leads through a symbolic link"
                    } else {
                        "leads through a non-directory"
                    };
                    return Err(Self::unsafe_path(
                        member,
                        format!("{what} ('{}')", self.path_of(&comps[..=i]).display()),
                    ));
                }
                Err(e) => {
                    return Err(ArchiveError::fs(
                        "open",
                        self.path_of(&comps[..=i]),
                        e.into(),
                    ));
                }
            };
            self.stack.push((comp.to_vec(), Rc::new(fd)));
        }
        // A shared handle, not a dup: no system call per member.
        Ok(match self.stack.last() {
            Some((_, fd)) => Rc::clone(fd),
            None => Rc::clone(&self.root),
        })
    }

    fn entry<R: Read>(&mut self, rd: &mut ArchiveReader<R>, e: &Entry) -> Result<()> {
        let trimmed = e.name.strip_suffix(b"/").unwrap_or(&e.name);
        if self.opts.exclude.is_excluded(trimmed) {
            self.report.excluded += 1;
            return Ok(());
        }
        let comps = components(&e.name).map_err(|r| Self::unsafe_path(&e.name, r))?;
        let Some(kind) = e.kind else {
            return Err(ArchiveError::Unsupported {
                member: e.name_lossy(),
                message: format!("unsupported member type '{}'", e.typeflag.escape_ascii()),
            });
        };
        let Some((leaf, parents)) = comps.split_last() else {
            // The root itself ("./").
            if kind != MemberKind::Directory {
                return Err(Self::unsafe_path(
                    &e.name,
                    "non-directory member for the target root",
                ));
            }
            if !self.opts.skip_old_files {
                let st = Meta::from_stat(
                    &rustix::fs::fstat(&self.root)
                        .map_err(|err| ArchiveError::fs("stat", &self.root_path, err.into()))?,
                );
                self.delayed.push(DelayedDir {
                    comps: Vec::new(),
                    dev: st.dev,
                    ino: st.ino,
                    attrs: Attrs::of(e),
                });
            }
            return Ok(());
        };
        let leaf: &[u8] = leaf;
        let dir = self.open_dir(parents, true, &e.name)?;
        let path = self.path_of(&comps);
        // Regular files (most members) are created first and looked at only if the name
        // exists: one system call less per file. O_EXCL|O_NOFOLLOW never opens an existing
        // file or follows a link.
        let mut created = None;
        if kind == MemberKind::Regular {
            match create_exclusive(&dir, leaf) {
                Ok(fd) => created = Some(fd),
                Err(Errno::EXIST) => {}
                Err(err) => return Err(ArchiveError::fs("create", &path, err.into())),
            }
        }
        let existing = if created.is_some() {
            None
        } else {
            match rustix::fs::statat(&dir, leaf, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(Meta::from_stat(&st)),
                Err(Errno::NOENT) => None,
                Err(err) => return Err(ArchiveError::fs("stat", &path, err.into())),
            }
        };

        if let Some(ex) = existing {
            let ex_dir = ex.file_type() == FileType::Directory;
            if kind == MemberKind::Directory && ex_dir {
                if !self.opts.skip_old_files {
                    self.delayed.push(DelayedDir {
                        comps: comps.iter().map(|c| c.to_vec()).collect(),
                        dev: ex.dev,
                        ino: ex.ino,
                        attrs: Attrs::of(e),
                    });
                }
                return Ok(());
            }
            if self.opts.skip_old_files {
                self.report.skipped_existing += 1;
                return Ok(());
            }
            if ex_dir {
                return Err(ArchiveError::Unsupported {
                    member: e.name_lossy(),
                    message: "refusing to replace an existing directory".into(),
                });
            }
            rustix::fs::unlinkat(&dir, leaf, AtFlags::empty())
                .map_err(|err| ArchiveError::fs("unlink", &path, err.into()))?;
        }
        let attrs = Attrs::of(e);
        match kind {
            MemberKind::Directory => {
                rustix::fs::mkdirat(&dir, leaf, Mode::from_raw_mode(0o700))
                    .map_err(|err| ArchiveError::fs("mkdir", &path, err.into()))?;
                let st = Meta::from_stat(
                    &rustix::fs::statat(&dir, leaf, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|err| ArchiveError::fs("stat", &path, err.into()))?,
                );
                self.delayed.push(DelayedDir {
                    comps: comps.iter().map(|c| c.to_vec()).collect(),
                    dev: st.dev,
                    ino: st.ino,
                    attrs,
                });
            }
            MemberKind::Regular => {
                let fd = match created {
                    Some(fd) => fd,
                    None => create_exclusive(&dir, leaf)
                        .map_err(|err| ArchiveError::fs("create", &path, err.into()))?,
                };
                let file = File::from(fd);
                self.write_content(rd, e, &file, &path)?;
                self.apply(Target::Fd(file.as_fd()), &attrs, &path, false)?;
            }
            MemberKind::Symlink => {
                let target = e.link_target.as_deref().unwrap_or(b"");
                rustix::fs::symlinkat(target, &dir, leaf)
                    .map_err(|err| ArchiveError::fs("symlink", &path, err.into()))?;
                self.apply(Target::At(dir.as_fd(), leaf, true), &attrs, &path, false)?;
            }
            MemberKind::HardLink => {
                let target = e.link_target.as_deref().unwrap_or(b"");
                let tcomps = components(target)
                    .map_err(|r| Self::unsafe_path(&e.name, format!("hard link target: {r}")))?;
                let Some((tleaf, tparents)) = tcomps.split_last() else {
                    return Err(Self::unsafe_path(&e.name, "hard link to the target root"));
                };
                let tdir = self.open_dir(tparents, false, &e.name)?;
                rustix::fs::linkat(&tdir, *tleaf, &dir, leaf, AtFlags::empty())
                    .map_err(|err| ArchiveError::fs("link", &path, err.into()))?;
            }
            MemberKind::CharDevice | MemberKind::BlockDevice | MemberKind::Fifo => {
                let ft = match kind {
                    MemberKind::CharDevice => FileType::CharacterDevice,
                    MemberKind::BlockDevice => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if ft != FileType::Fifo && !self.opts.allow_devices {
                    return Err(ArchiveError::DeviceNotAllowed {
                        member: e.name_lossy(),
                    });
                }
                let dev = rustix::fs::makedev(e.device.0, e.device.1);
                rustix::fs::mknodat(&dir, leaf, ft, Mode::from_raw_mode(0o600), dev)
                    .map_err(|err| ArchiveError::fs("mknod", &path, err.into()))?;
                self.apply(Target::At(dir.as_fd(), leaf, false), &attrs, &path, false)?;
            }
        }
        self.report.entries += 1;
        Ok(())
    }

    fn write_content<R: Read>(
        &mut self,
        rd: &mut ArchiveReader<R>,
        e: &Entry,
        file: &File,
        path: &Path,
    ) -> Result<()> {
        let whole = [crate::header::SparseRegion {
            offset: 0,
            length: e.size,
        }];
        let regions = e.sparse.as_ref().map_or(&whole[..], |s| &s.regions[..]);
        for r in regions {
            let mut off = r.offset;
            let end = r.offset + r.length;
            while off < end {
                let want = usize::try_from(end - off)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                let n = rd.with_data(want, &mut self.buf, |b| {
                    file.write_all_at(b, off)
                        .map_err(|err| ArchiveError::fs("write", path, err))
                })?;
                if n == 0 {
                    return Err(ArchiveError::Truncated {
                        offset: rd.position(),
                        what: "member content",
                    });
                }
                off += n as u64;
                self.report.bytes += n as u64;
            }
        }
        if let Some(s) = &e.sparse {
            file.set_len(s.real_size)
                .map_err(|err| ArchiveError::fs("truncate", path, err))?;
        }
        Ok(())
    }

    fn map_owner(&self, a: &Attrs) -> Result<(u32, u32)> {
        let map1 = |kind: IdKind, id: u64| -> Result<u32> {
            let mapped = match &self.opts.id_map {
                Some(m) => m.to_host(kind, id),
                None => u32::try_from(id).ok(),
            };
            mapped.ok_or(ArchiveError::UnmappedId {
                member: a.member(),
                kind: if kind == IdKind::Uid { "uid" } else { "gid" },
                id,
            })
        };
        Ok((map1(IdKind::Uid, a.uid)?, map1(IdKind::Gid, a.gid)?))
    }

    fn apply(&mut self, t: Target<'_>, a: &Attrs, path: &Path, is_dir: bool) -> Result<()> {
        let (uid, gid) = match self.map_owner(a) {
            Ok(ids) => ids,
            Err(e) => {
                // As tar in the container's user namespace: the entry stays owned by the
                // container's root, never by host root.
                self.own_by_mapped_root(t);
                return Err(e);
            }
        };
        let (uid, gid) = (
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        );
        let mode = Mode::from_raw_mode(a.mode & 0o7777);
        let ppath;
        let xt = match t {
            Target::Fd(fd) => {
                rustix::fs::fchown(fd, uid, gid)
                    .map_err(|e| ArchiveError::fs("chown", path, e.into()))?;
                rustix::fs::fchmod(fd, mode)
                    .map_err(|e| ArchiveError::fs("chmod", path, e.into()))?;
                Some(XattrTarget::Fd(fd))
            }
            Target::At(dir, name, symlink) => {
                rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ArchiveError::fs("chown", path, e.into()))?;
                if symlink {
                    None
                } else {
                    rustix::fs::chmodat(dir, name, mode, AtFlags::empty())
                        .map_err(|e| ArchiveError::fs("chmod", path, e.into()))?;
                    ppath = proc_path(dir, name);
                    Some(XattrTarget::Path(&ppath))
                }
            }
        };
        if let Some(xt) = xt {
            self.apply_xattrs(xt, a, path, is_dir);
        }
        let times = Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: a.mtime,
                tv_nsec: a.mtime_nsec.into(),
            },
        };
        match t {
            Target::Fd(fd) => rustix::fs::futimens(fd, &times),
            Target::At(dir, name, _) => {
                rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            }
        }
        .map_err(|e| ArchiveError::fs("set mtime", path, e.into()))
    }

    /// Best effort: chown `t` to the mapped container root (after an owner that cannot be
    /// mapped). The caller reports the original error.
    fn own_by_mapped_root(&self, t: Target<'_>) {
        let Some(m) = &self.opts.id_map else { return };
        let uid = m.to_host(IdKind::Uid, 0).map(rustix::fs::Uid::from_raw);
        let gid = m.to_host(IdKind::Gid, 0).map(rustix::fs::Gid::from_raw);
        // Failure leaves the entry as created; the member error is reported either way.
        let _ = match t {
            Target::Fd(fd) => rustix::fs::fchown(fd, uid, gid),
            Target::At(dir, name, _) => {
                rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            }
        };
    }

    /// xattrs and ACLs: failures are warnings (`--warning=no-xattr-write`).
    fn apply_xattrs(&mut self, xt: XattrTarget<'_>, a: &Attrs, path: &Path, is_dir: bool) {
        for (name, value) in &a.xattrs {
            let mut value = std::borrow::Cow::Borrowed(value.as_slice());
            if name == acl::XATTR_CAPABILITY.as_bytes()
                && let Some(m) = &self.opts.id_map
            {
                match acl::map_capability(&value, m, Direction::ToHost) {
                    Some(v) => value = v.into(),
                    None => {
                        self.warn(format!(
                            "{}: security.capability root id not mapped; skipped",
                            path.display()
                        ));
                        continue;
                    }
                }
            }
            if let Err(e) = xt.set(name, &value) {
                self.warn(format!(
                    "{}: cannot set xattr {}: {e}",
                    path.display(),
                    String::from_utf8_lossy(name)
                ));
            }
        }
        let acls = [
            (acl::XATTR_ACL_ACCESS, a.acl_access.as_deref()),
            (
                acl::XATTR_ACL_DEFAULT,
                if is_dir {
                    a.acl_default.as_deref()
                } else {
                    None
                },
            ),
        ];
        for (xname, text) in acls {
            let Some(text) = text else { continue };
            let acl = match Acl::from_text_with(text, &self.names) {
                Ok(acl) => acl,
                Err(e) => {
                    self.warn(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let acl = match &self.opts.id_map {
                Some(m) => match acl.map_ids(m, Direction::ToHost) {
                    Ok(acl) => acl,
                    Err((kind, id)) => {
                        self.warn(format!(
                            "{}: ACL {} {id} is not mapped; ACL skipped",
                            path.display(),
                            if kind == IdKind::Uid { "uid" } else { "gid" }
                        ));
                        continue;
                    }
                },
                None => acl,
            };
            if let Err(e) = xt.set(xname.as_bytes(), &acl.to_xattr()) {
                self.warn(format!("{}: cannot set {xname}: {e}", path.display()));
            }
        }
    }

    fn finish_dir(&mut self, d: &DelayedDir) -> Result<()> {
        let comps: Vec<&[u8]> = d.comps.iter().map(Vec::as_slice).collect();
        let path = self.path_of(&comps);
        let fd = self.open_dir(&comps, false, &d.attrs.name)?;
        let st = Meta::from_stat(
            &rustix::fs::fstat(&fd).map_err(|e| ArchiveError::fs("stat", &path, e.into()))?,
        );
        if (st.dev, st.ino) != (d.dev, d.ino) {
            return Err(Self::unsafe_path(
                &d.attrs.name,
                "directory was replaced during extraction",
            ));
        }
        self.apply(Target::Fd(fd.as_fd()), &d.attrs, &path, true)?;
        self.report.entries += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_table() {
        let ok: &[(&[u8], &[&[u8]])] = &[
            (b"./", &[]),
            (b".", &[]),
            (b"./a/b/", &[b"a", b"b"]),
            (b"a//b/./c", &[b"a", b"b", b"c"]),
            (b"./\xff\xfe", &[b"\xff\xfe"]),
        ];
        for &(name, want) in ok {
            assert_eq!(components(name).unwrap(), want);
        }
        for bad in [&b"/etc/passwd"[..], b"../x", b"./a/../../x", b"a/.."] {
            assert!(
                components(bad).is_err(),
                "{:?}",
                bad.escape_ascii().to_string()
            );
        }
    }
}
