//! Read-ahead for a tree walk: a second thread walks the same tree in the
//! [`Walker`](crate::Walker)'s order (byte order of names, the same
//! excludes and one-file-system rule), `stat`s every entry and asks the
//! kernel to read file data ahead (`POSIX_FADV_WILLNEED`), at most a
//! window of allocated bytes ahead of what the reader has consumed.
//! Reading from cold storage (a freshly mounted volume) then overlaps with
//! hashing, encoding and compression instead of stalling the reader on
//! every file, and the `stat`s warm the inode and dentry caches the walk
//! needs. Purely advisory: every error just ends the walk (or skips the
//! entry).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::ExcludeSet;

/// Read-ahead requests are issued in pieces of this size.
const PIECE: u64 = 4 << 20;

/// Decides per regular file (member name, its `lstat`) whether its data
/// will be read and so should be read ahead.
pub type WantData<'a> = dyn FnMut(&[u8], &rustix::fs::Stat) -> bool + 'a;

/// Decides per entry (member name, inode number from the directory
/// listing), before it is `lstat`ed, whether the reader will skip it (a
/// reader that takes it, and for a directory its contents, from elsewhere:
/// [`crate::TreeSink::unstatted`]).
pub type SkipEntry<'a> = dyn FnMut(&[u8], u64) -> bool + 'a;

/// Sets a prefetcher's stop flag when dropped: the reader holds one while
/// it reads, so that the prefetcher ends also when the reader fails or
/// panics (instead of waiting for room forever).
#[derive(Debug)]
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The read-ahead walker (see the module docs).
pub struct Prefetcher<'a> {
    excludes: &'a ExcludeSet,
    consumed: &'a AtomicU64,
    stop: &'a AtomicBool,
    window: u64,
    advised: u64,
    want: Option<&'a mut WantData<'a>>,
    skip: Option<&'a mut SkipEntry<'a>>,
    direct: Option<&'a crate::direct::DirectImage>,
}

impl std::fmt::Debug for Prefetcher<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("window", &self.window)
            .field("advised", &self.advised)
            .finish_non_exhaustive()
    }
}

impl<'a> Prefetcher<'a> {
    /// A prefetcher staying at most `window` allocated bytes of advised
    /// data ahead of `consumed` (bytes the reader has read from now on; the
    /// reader counts the same files the prefetcher advises), until `stop`
    /// is set (see [`StopOnDrop`]).
    #[must_use]
    pub fn new(
        excludes: &'a ExcludeSet,
        consumed: &'a AtomicU64,
        stop: &'a AtomicBool,
        window: u64,
    ) -> Self {
        Prefetcher {
            excludes,
            consumed,
            stop,
            window,
            advised: consumed.load(Ordering::Relaxed),
            want: None,
            skip: None,
            direct: None,
        }
    }

    /// Only read ahead the regular files for which `want` is true (files
    /// the reader will not read are only `stat`ed).
    #[must_use]
    pub fn with_filter(mut self, want: &'a mut WantData<'a>) -> Self {
        self.want = Some(want);
        self
    }

    /// Leave out (neither `stat` nor enter) the entries for which `skip`
    /// is true.
    #[must_use]
    pub fn with_skip(mut self, skip: &'a mut SkipEntry<'a>) -> Self {
        self.skip = Some(skip);
        self
    }

    /// Read ahead from the image the walker reads the files of its file system from
    /// ([`crate::Walker::set_direct`]), not through the mount.
    #[must_use]
    pub fn with_direct(mut self, direct: Option<&'a crate::direct::DirectImage>) -> Self {
        self.direct = direct;
        self
    }

    /// As [`Prefetcher::with_direct`], for the next trees.
    pub fn set_direct(&mut self, direct: Option<&'a crate::direct::DirectImage>) {
        self.direct = direct;
    }

    /// Walk the tree at `dir` whose members are named under `prefix` (as
    /// given to [`crate::Walker::walk`]); false once `stop` is set.
    pub fn run_tree(&mut self, dir: &Path, prefix: &str) -> bool {
        let Ok(root) = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return true;
        };
        let Ok(st) = rustix::fs::fstat(&root) else {
            return true;
        };
        let base = prefix.trim_end_matches('/');
        let base = if base.is_empty() { "." } else { base };
        self.walk(&root, base.as_bytes(), st.st_dev)
    }

    /// Wait until the reader is close enough; false when it is done.
    fn wait_for_room(&self) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            if self.advised < self.consumed.load(Ordering::Relaxed) + self.window {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn walk(&mut self, dir: &OwnedFd, member: &[u8], dev: u64) -> bool {
        let mut names = Vec::new();
        {
            let Ok(mut d) = rustix::fs::Dir::read_from(dir) else {
                return true;
            };
            while let Some(Ok(ent)) = d.read() {
                let n = ent.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push((n.to_vec(), ent.ino()));
                }
            }
        }
        names.sort();
        for (name, ino) in names {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let mut m = member.to_vec();
            m.push(b'/');
            m.extend_from_slice(&name);
            if self.excludes.is_excluded(&m) {
                continue;
            }
            if let Some(skip) = self.skip.as_mut()
                && skip(&m, ino)
            {
                continue;
            }
            let Ok(st) = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory if st.st_dev == dev => {
                    let Ok(sub) = rustix::fs::openat(
                        dir,
                        name.as_slice(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) else {
                        continue;
                    };
                    if !self.walk(&sub, &m, dev) {
                        return false;
                    }
                }
                FileType::RegularFile if st.st_blocks > 0 => {
                    if let Some(want) = self.want.as_mut()
                        && !want(&m, &st)
                    {
                        continue;
                    }
                    if !self.advise(dir, &name, &st) {
                        return false;
                    }
                }
                _ => {}
            }
        }
        true
    }

    fn advise(&mut self, dir: &OwnedFd, name: &[u8], st: &rustix::fs::Stat) -> bool {
        let Ok(fd) = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return true;
        };
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let allocated = u64::try_from(st.st_blocks).unwrap_or(0) * 512;
        let file = std::fs::File::from(fd);
        let direct = self.direct.and_then(|d| Some((d, d.map(&file, size)?)));
        let mut off = 0;
        while off < size {
            if !self.wait_for_room() {
                return false;
            }
            let piece = PIECE.min(size - off);
            match &direct {
                Some((d, map)) => d.advise(map, off, piece),
                None => {
                    let _ = rustix::fs::fadvise(
                        &file,
                        off,
                        std::num::NonZeroU64::new(piece),
                        rustix::fs::Advice::WillNeed,
                    );
                }
            }
            // Account allocated bytes, so that holes do not count as work ahead.
            self.advised += piece.min(allocated.saturating_sub(off));
            off += piece;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn visits_files_in_walk_order_and_skips_excluded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        std::fs::create_dir_all(root.join("y/x")).unwrap();
        for f in ["a", "b/c/d", "b/e", "skip", "y/x/w", "z"] {
            std::fs::write(root.join(f), b"data").unwrap();
        }
        std::fs::write(root.join("empty"), b"").unwrap();
        let (ex, bad) = ExcludeSet::from_vzdump_patterns(&["/skip".to_string()]);
        assert!(bad.is_empty());
        let consumed = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let mut seen: Vec<(String, u64)> = Vec::new();
        let mut want = |m: &[u8], st: &rustix::fs::Stat| {
            seen.push((
                String::from_utf8_lossy(m).into_owned(),
                u64::try_from(st.st_size).unwrap_or(0),
            ));
            m != b"./b/e"
        };
        let y_ino = std::fs::symlink_metadata(root.join("y")).unwrap().ino();
        let mut skipped = Vec::new();
        let mut skip = |m: &[u8], ino: u64| {
            let s = m == b"./y";
            if s {
                skipped.push(ino);
            }
            s
        };
        let advised = {
            let mut p = Prefetcher::new(&ex, &consumed, &stop, 1 << 30)
                .with_filter(&mut want)
                .with_skip(&mut skip);
            assert!(p.run_tree(root, "./"));
            p.advised
        };
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        // Empty files have no blocks to read: not offered; a skipped directory is
        // not entered.
        assert_eq!(names, ["./a", "./b/c/d", "./b/e", "./z"]);
        assert_eq!(skipped, [y_ino], "skipped with the listing's inode number");
        // Three files of one block each were advised.
        assert!(advised > 0 && advised <= 3 * 8192, "{advised}");

        // A prefetcher waiting for room ends when the reader's guard is dropped
        // (here by a panicking reader).
        let fresh = AtomicBool::new(false);
        let ended = std::thread::scope(|sc| {
            let h = sc.spawn(|| Prefetcher::new(&ex, &consumed, &fresh, 0).run_tree(root, "./"));
            let reader = std::panic::catch_unwind(|| {
                let _stop = StopOnDrop(&fresh);
                std::thread::sleep(Duration::from_millis(50));
                panic!("reader failed");
            });
            assert!(reader.is_err());
            h.join().unwrap()
        });
        assert!(!ended);

        // A stopped prefetcher ends its walk.
        stop.store(true, Ordering::Relaxed);
        let mut p = Prefetcher::new(&ex, &consumed, &stop, 1 << 30);
        assert!(!p.run_tree(root, "./"));
    }
}
