//! File access inside a container's root directory that cannot escape it.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` against
//! a descriptor of the root: a symlink inside the guest (`/etc/resolv.conf ->
//! /run/resolv.conf`, or a hostile `/etc -> /host/etc`) is resolved as if the root were `/`,
//! so nothing outside the root is ever read or written. Writes go to a temporary file in the
//! same directory that is renamed over the target (the rename replaces a symlink itself,
//! never its target), owned by the container's root user.
//!
//! [`GuestRoot::modify_file`] is PVE's `ct_modify_file`: the data sits between
//! `# --- BEGIN PVE ---` and `# --- END PVE ---`, an existing section is replaced in place,
//! otherwise the section is appended (or prepended, or replaces the file). A file with a
//! `.pve-ignore.<name>` beside it is never touched.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::{Result, RuntimeError};
use crate::mount::RootOwner;

/// The first line of a PVE section.
pub const SECTION_HEAD: &str = "# --- BEGIN PVE ---";
/// The last line of a PVE section.
pub const SECTION_TAIL: &str = "# --- END PVE ---";

/// Where to put a new section in a file that has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// After the existing content.
    Append,
    /// Before the existing content.
    Prepend,
    /// Instead of the existing content.
    Replace,
}

/// A container root directory opened for confined file access.
#[derive(Debug)]
pub struct GuestRoot {
    root: PathBuf,
    fd: OwnedFd,
    owner: RootOwner,
}

fn resolve() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

fn rel(path: &str) -> &str {
    let r = path.trim_start_matches('/');
    if r.is_empty() { "." } else { r }
}

impl GuestRoot {
    /// Opens `root`; files written get `owner` (the container's root user on the host).
    ///
    /// # Errors
    /// When `root` is not a directory that can be opened.
    pub fn open(root: &Path, owner: RootOwner) -> Result<Self> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| RuntimeError::io("open", root, e.into()))?;
        Ok(Self {
            root: root.to_path_buf(),
            fd,
            owner,
        })
    }

    /// The host path of the root.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(rel(path))
    }

    fn open_at(&self, path: &str, flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
        rustix::fs::openat2(
            &self.fd,
            rel(path),
            flags | OFlags::CLOEXEC,
            mode,
            resolve(),
        )
        .map_err(Into::into)
    }

    /// Whether `path` is a regular file (PVE's `-f`).
    #[must_use]
    pub fn is_file(&self, path: &str) -> bool {
        self.open_at(path, OFlags::PATH, Mode::empty())
            .and_then(|fd| Ok(rustix::fs::fstat(&fd)?))
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())
    }

    /// Whether `path` is a directory.
    #[must_use]
    pub fn is_dir(&self, path: &str) -> bool {
        self.open_at(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
            .is_ok()
    }

    /// Reads `path`; `None` when it does not exist.
    ///
    /// # Errors
    /// Other read errors.
    pub fn read(&self, path: &str) -> Result<Option<String>> {
        match self.open_at(path, OFlags::RDONLY, Mode::empty()) {
            Ok(fd) => {
                let mut text = String::new();
                std::fs::File::from(fd)
                    .read_to_string(&mut text)
                    .map_err(|e| RuntimeError::io("read", self.host_path(path), e))?;
                Ok(Some(text))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RuntimeError::io("open", self.host_path(path), e)),
        }
    }

    /// The names of the regular files in directory `path` (sorted); empty when it does not
    /// exist.
    ///
    /// # Errors
    /// Other errors opening or reading the directory.
    pub fn list_files(&self, path: &str) -> Result<Vec<String>> {
        let fd = match self.open_at(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io("open", self.host_path(path), e)),
        };
        let dir = rustix::fs::Dir::new(fd)
            .map_err(|e| RuntimeError::io("read", self.host_path(path), e.into()))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry =
                entry.map_err(|e| RuntimeError::io("read", self.host_path(path), e.into()))?;
            if entry.file_type() == rustix::fs::FileType::RegularFile {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Whether `path` has a `.pve-ignore.<name>` file beside it.
    #[must_use]
    pub fn is_ignored(&self, path: &str) -> bool {
        let p = Path::new(path);
        let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
            return false;
        };
        let ignore = dir.join(format!(".pve-ignore.{}", name.to_string_lossy()));
        self.is_file(&ignore.to_string_lossy())
    }

    /// Creates the directory `path` and its parents (owned by the container's root).
    ///
    /// # Errors
    /// I/O errors, or a component that exists and is not a directory.
    pub fn make_path(&self, path: &str) -> Result<()> {
        let mut cur = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            cur.push('/');
            cur.push_str(comp);
            if self.is_dir(&cur) {
                continue;
            }
            let (parent, name) = split_parent(&cur);
            let dir = self
                .open_at(parent, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| RuntimeError::io("open", self.host_path(parent), e))?;
            rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755))
                .map_err(|e| RuntimeError::io("mkdir", self.host_path(&cur), e.into()))?;
            let made = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| RuntimeError::io("open", self.host_path(&cur), e.into()))?;
            self.chown(&made, &cur)?;
        }
        Ok(())
    }

    fn chown(&self, fd: &OwnedFd, path: &str) -> Result<()> {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(self.owner.uid)),
            Some(rustix::fs::Gid::from_raw(self.owner.gid)),
        )
        .map_err(|e| RuntimeError::io("chown", self.host_path(path), e.into()))
    }

    /// Writes `data` to `path` atomically (PVE's `ct_file_set_contents`); keeps the mode of
    /// an existing file (else `perms`, default 0644). Skipped for ignored files.
    ///
    /// # Errors
    /// I/O errors; the old file is untouched then.
    pub fn write(&self, path: &str, data: &str, perms: Option<u32>) -> Result<()> {
        self.write_inner(path, data, perms, false)
    }

    /// Writes `data` to `path` atomically with exactly `mode` (for private keys).
    ///
    /// # Errors
    /// As [`GuestRoot::write`].
    pub fn write_with_mode(&self, path: &str, data: &str, mode: u32) -> Result<()> {
        self.write_inner(path, data, Some(mode), true)
    }

    fn write_inner(&self, path: &str, data: &str, perms: Option<u32>, force: bool) -> Result<()> {
        if self.is_ignored(path) {
            return Ok(());
        }
        let (parent, name) = split_parent(path);
        let dir = self
            .open_at(parent, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .map_err(|e| RuntimeError::io("open", self.host_path(parent), e))?;
        let mode = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .filter(|_| !force)
            .filter(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())
            .map_or(perms.unwrap_or(0o644), |st| st.st_mode & 0o7777);
        let tmp = format!(".{name}.vzkit-tmp.{}", std::process::id());
        let fd = rustix::fs::openat(
            &dir,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| RuntimeError::io("create", self.host_path(path), e.into()))?;
        let res = (|| -> std::io::Result<()> {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(self.owner.uid)),
                Some(rustix::fs::Gid::from_raw(self.owner.gid)),
            )?;
            let mut f = std::fs::File::from(fd);
            f.write_all(data.as_bytes())?;
            f.sync_all()?;
            rustix::fs::renameat(&dir, &tmp, &dir, name)?;
            Ok(())
        })();
        if let Err(e) = res {
            // Best effort: the temporary file is ours; a failure to remove it changes nothing
            // the caller can act on beyond the original error.
            let _ = rustix::fs::unlinkat(&dir, &tmp, rustix::fs::AtFlags::empty());
            return Err(RuntimeError::io("write", self.host_path(path), e));
        }
        Ok(())
    }

    /// PVE's `ct_modify_file`: puts `data` into the file's PVE section.
    ///
    /// # Errors
    /// As [`GuestRoot::write`].
    pub fn modify_file(&self, path: &str, data: &str, placement: Placement) -> Result<()> {
        self.modify_file_perms(path, data, placement, None)
    }

    /// [`GuestRoot::modify_file`] with the mode of a file it creates (default 0644).
    ///
    /// # Errors
    /// As [`GuestRoot::write`].
    pub fn modify_file_perms(
        &self,
        path: &str,
        data: &str,
        placement: Placement,
        perms: Option<u32>,
    ) -> Result<()> {
        if self.is_ignored(path) {
            return Ok(());
        }
        let old = if self.is_file(path) {
            self.read(path)?
        } else {
            None
        };
        if let Some(new) = modify_text(old.as_deref(), data, placement) {
            self.write(path, &new, perms)?;
        }
        Ok(())
    }
}

fn split_parent(path: &str) -> (&str, &str) {
    let path = path.trim_end_matches('/');
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

fn is_head(line: &str) -> bool {
    let l = line.strip_prefix('#').map(str::trim_start);
    l.and_then(|l| l.strip_prefix("---"))
        .map(str::trim_start)
        .is_some_and(|l| l.starts_with("BEGIN") && l[5..].trim_start().starts_with("PVE"))
}

fn is_tail(line: &str) -> bool {
    let l = line.strip_prefix('#').map(str::trim_start);
    l.and_then(|l| l.strip_prefix("---"))
        .map(str::trim_start)
        .is_some_and(|l| {
            l.len() >= 3
                && l[..3].eq_ignore_ascii_case("END")
                && l[3..].trim_start().to_ascii_uppercase().starts_with("PVE")
        })
}

/// The new text of a file after putting `data` into its PVE section (`None`: leave the
/// file as it is). Pure; the heart of [`GuestRoot::modify_file`].
#[must_use]
pub fn modify_text(old: Option<&str>, data: &str, placement: Placement) -> Option<String> {
    let mut data = data.to_string();
    if !data.is_empty() && !data.ends_with('\n') {
        data.push('\n');
    }
    let section = format!("{SECTION_HEAD}\n{data}{SECTION_TAIL}\n");
    let Some(old) = old else {
        return (!data.is_empty()).then_some(section);
    };
    let mut lines: Vec<String> = old.split('\n').map(str::to_string).collect();
    // Perl's split drops trailing empty fields.
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    let beg = lines.iter().position(|l| is_head(l));
    let end = beg.and_then(|b| lines[b..].iter().position(|l| is_tail(l)).map(|i| b + i));
    if let (Some(b), Some(e)) = (beg, end) {
        let replacement = section.trim_end_matches('\n').to_string();
        lines.splice(b..=e, [replacement]);
        return Some(lines.join("\n") + "\n");
    }
    if data.is_empty() {
        return None;
    }
    let content = lines.join("\n") + "\n";
    Some(match placement {
        Placement::Replace => section,
        Placement::Prepend => section + &content,
        Placement::Append => content + &section,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        assert_eq!(
            modify_text(None, "a", Placement::Append).unwrap(),
            "# --- BEGIN PVE ---\na\n# --- END PVE ---\n"
        );
        assert_eq!(modify_text(None, "", Placement::Append), None);
        let old = "x\n# --- BEGIN PVE ---\nold\n# --- END PVE ---\ny\n";
        assert_eq!(
            modify_text(Some(old), "new1\nnew2\n", Placement::Append).unwrap(),
            "x\n# --- BEGIN PVE ---\nnew1\nnew2\n# --- END PVE ---\ny\n"
        );
        assert_eq!(
            modify_text(Some("x\ny\n"), "n", Placement::Append).unwrap(),
            "x\ny\n# --- BEGIN PVE ---\nn\n# --- END PVE ---\n"
        );
        assert_eq!(
            modify_text(Some("x\n"), "n", Placement::Prepend).unwrap(),
            "# --- BEGIN PVE ---\nn\n# --- END PVE ---\nx\n"
        );
        assert_eq!(
            modify_text(Some("nameserver 1.1.1.1\n"), "n", Placement::Replace).unwrap(),
            "# --- BEGIN PVE ---\nn\n# --- END PVE ---\n"
        );
        // Loose marker spelling is recognised, as PVE's regexes do.
        assert_eq!(
            modify_text(
                Some("#---BEGIN PVE\nq\n# --- end pve ---\n"),
                "n",
                Placement::Append
            )
            .unwrap(),
            "# --- BEGIN PVE ---\nn\n# --- END PVE ---\n"
        );
    }

    #[test]
    fn writes_stay_inside_the_root_and_respect_ignore_files() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        // An absolute symlink pointing at a host directory resolves inside the root.
        std::os::unix::fs::symlink(outside.path(), root.join("etc/evil")).unwrap();
        let g = GuestRoot::open(root, RootOwner::default()).unwrap();
        g.make_path(&format!("{}", outside.path().display()))
            .unwrap();
        g.write("/etc/evil/x", "data\n", None).unwrap();
        assert!(!outside.path().join("x").exists());
        let inside = root
            .join(outside.path().strip_prefix("/").unwrap())
            .join("x");
        assert_eq!(std::fs::read_to_string(inside).unwrap(), "data\n");
        // `..` cannot climb out either.
        g.write("/../../etc/hostname", "h\n", None).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "h\n"
        );
        // Ignored files are left alone.
        std::fs::write(root.join("etc/.pve-ignore.hosts"), "").unwrap();
        std::fs::write(root.join("etc/hosts"), "mine\n").unwrap();
        g.modify_file("/etc/hosts", "127.0.0.1 x", Placement::Append)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "mine\n"
        );
        // A symlinked target file is replaced, its target is not written.
        std::fs::write(outside.path().join("resolv"), "host\n").unwrap();
        std::os::unix::fs::symlink(outside.path().join("resolv"), root.join("etc/resolv.conf"))
            .unwrap();
        g.write("/etc/resolv.conf", "nameserver 1.2.3.4\n", None)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("resolv")).unwrap(),
            "host\n"
        );
    }
}
