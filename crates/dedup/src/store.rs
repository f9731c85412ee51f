//! The store directory: chunk files, snapshot directories, locks and the
//! registry of running backups.
//!
//! ```text
//! <store>/.chunks/<2 hex>/<64 hex>           zstd-compressed chunk, named by the
//!                                             blake3 of its uncompressed data (one level
//!                                             of 256 directories: two levels cost a 4 KiB
//!                                             directory block per ~1.3 chunks at 34,000
//!                                             chunks, 108 MB for a 1 GB tree)
//! <store>/.chunks/…/<64 hex>.bad             a chunk verify found corrupt
//! <store>/.writers/<id>                      one per running backup (flock'd),
//!                                             content: start time (ns)
//! <store>/.gc.lock                           held by a garbage collection
//! <store>/.bad-chunks                         digests verify found damaged or missing
//! <store>/ct/<vmid>/.lock                    backup group lock
//! <store>/ct/<vmid>/.tmp-<id>/               a snapshot being written
//! <store>/ct/<vmid>/<RFC3339 UTC time>/      a complete snapshot (flock'd shared by a
//!                                             backup using it as its base)
//! ```

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, Timespec, Timestamps};

use crate::catalog::{ChunkRef, check_of};
use crate::error::{Error, Result};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Lower-case hex of a digest.
#[must_use]
pub fn hex(d: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parse a 64-digit hex digest.
#[must_use]
pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

/// Nanoseconds since the epoch.
#[must_use]
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// An exclusive `flock` held until dropped.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Take the lock on `path` (created if missing), failing at once if
    /// another process holds it.
    ///
    /// # Errors
    /// `Locked` if held elsewhere; I/O errors.
    pub fn try_lock(path: &Path, what: &str) -> Result<LockFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(LockFile {
                file,
                path: path.to_path_buf(),
            }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Locked(format!(
                "{what} is locked by another process ('{}')",
                path.display()
            ))),
            Err(e) => Err(Error::io("lock", path, e.into())),
        }
    }

    /// The locked file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    #[must_use]
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// A shared `flock` on a complete snapshot's directory, held by a backup
/// using it as its base for the whole backup: [`crate::snapshot::remove`]
/// (and so prune) needs the exclusive lock, so the base and the chunks it
/// references stay while the backup reuses them unseen by the garbage
/// collection (see [`crate::gc`]).
#[derive(Debug)]
pub struct SnapshotLock {
    _dir: File,
}

impl SnapshotLock {
    /// Lock the snapshot directory `dir`, shared (`exclusive`: false) or
    /// exclusive, failing at once if it is held the other way.
    ///
    /// # Errors
    /// `Locked` naming `what` if held elsewhere; I/O errors.
    pub fn try_lock(dir: &Path, exclusive: bool, what: &str) -> Result<SnapshotLock> {
        let f = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        match rustix::fs::flock(&f, op) {
            Ok(()) => Ok(SnapshotLock { _dir: f }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Locked(what.to_string())),
            Err(e) => Err(Error::io("lock", dir, e.into())),
        }
    }
}

/// Is the flock on `path` held by someone (without taking it for long)?
#[must_use]
pub fn lock_is_held(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    match rustix::fs::flock(&f, FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(_) => true,
    }
}

/// A backup store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Open (creating the top-level layout if missing) the store at `root`.
    ///
    /// # Errors
    /// `root` is not a directory or cannot be written.
    pub fn open(root: &Path) -> Result<Store> {
        if !root.is_dir() {
            return Err(Error::Invalid(format!(
                "store directory '{}' does not exist",
                root.display()
            )));
        }
        for d in [".chunks", ".writers", "ct"] {
            let p = root.join(d);
            match std::fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("mkdir", p, e)),
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The store directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of chunk files.
    #[must_use]
    pub fn chunk_dir(&self) -> PathBuf {
        self.root.join(".chunks")
    }

    /// The file of a chunk.
    #[must_use]
    pub fn chunk_path(&self, d: &[u8; 32]) -> PathBuf {
        let h = hex(d);
        self.root.join(".chunks").join(&h[0..2]).join(h)
    }

    /// The directory of a backup group.
    #[must_use]
    pub fn group_dir(&self, vmid: u32) -> PathBuf {
        self.root.join("ct").join(vmid.to_string())
    }

    /// If the chunk exists, set its mtime to now (so a concurrent garbage
    /// collection keeps it) and return true.
    ///
    /// # Errors
    /// Errors other than the chunk not existing.
    pub fn touch_chunk(&self, d: &[u8; 32]) -> Result<bool> {
        let p = self.chunk_path(d);
        touch(&p)
    }

    /// Store a chunk (compressing it) unless present; returns the
    /// compressed size written, 0 if it was present (then touched).
    ///
    /// # Errors
    /// Writing the chunk.
    pub fn insert_chunk(&self, d: &[u8; 32], data: &[u8], level: i32, tag: &str) -> Result<u64> {
        if self.touch_chunk(d)? {
            return Ok(0);
        }
        let comp = compress(data, level)
            .map_err(|e| Error::io("compress chunk", self.chunk_path(d), e))?;
        self.write_chunk_file(d, &comp, tag)?;
        Ok(comp.len() as u64)
    }

    fn write_chunk_file(&self, d: &[u8; 32], comp: &[u8], tag: &str) -> Result<()> {
        let path = self.chunk_path(d);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let tmp = dir.join(format!(
            ".tmp-{}-{tag}-{}",
            &hex(d)[..16],
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = match File::create(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", &dir, e))?;
                File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?
            }
            Err(e) => return Err(Error::io("create", &tmp, e)),
        };
        if let Err(e) = f.write_all(comp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("write", &tmp, e));
        }
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("rename", &path, e)
        })
    }

    /// Read, decompress and check a chunk.
    ///
    /// # Errors
    /// `BadChunk` if it is missing, cannot be decompressed or does not
    /// match its digest or length.
    pub fn read_chunk(&self, d: &[u8; 32], len: u32) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.read_chunk_into(d, len, &mut Vec::new(), &mut data)?;
        Ok(data)
    }

    /// [`Store::read_chunk`] into `data`, with `comp` for the compressed
    /// bytes: buffers reused from chunk to chunk save allocating and
    /// faulting in fresh memory for each.
    ///
    /// # Errors
    /// As [`Store::read_chunk`].
    pub fn read_chunk_into(
        &self,
        d: &[u8; 32],
        len: u32,
        comp: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> Result<()> {
        self.read_chunk_for(&ChunkRef::whole(*d, len), comp, data)
    }

    /// [`Store::read_chunk_into`] for reference `r`: data that matches the
    /// reference's check (see [`crate::catalog::check_of`]) is taken; else
    /// (no check, or another) it must match its digest.
    ///
    /// # Errors
    /// `BadChunk` if it is missing, cannot be decompressed or matches
    /// neither its check nor its digest, or has another length.
    pub fn read_chunk_for(
        &self,
        r: &ChunkRef,
        comp: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> Result<()> {
        let (d, len) = (&r.digest, r.len);
        let bad = |m: String| Error::BadChunk {
            digest: hex(d),
            message: m,
        };
        let p = self.chunk_path(d);
        let mut f = match File::open(&p) {
            Ok(f) => f,
            // Being checked by a garbage collection right now.
            Err(e) if e.kind() == ErrorKind::NotFound => File::open(p.with_extension("sweep"))
                .map_err(|_| bad(format!("cannot read '{}': {e}", p.display())))?,
            Err(e) => return Err(bad(format!("cannot read '{}': {e}", p.display()))),
        };
        comp.clear();
        f.read_to_end(comp)
            .map_err(|e| bad(format!("cannot read '{}': {e}", p.display())))?;
        decompress_into(comp, len as usize, data)
            .map_err(|e| bad(format!("cannot decompress: {e}")))?;
        if data.len() != len as usize {
            return Err(bad(format!("length {} instead of {len}", data.len())));
        }
        // Without a check, or with one the data does not match, the digest
        // decides: a wrong check in a catalog (verify reports it) costs a
        // blake3, it does not fail an intact chunk.
        if (r.check == 0 || check_of(data) != r.check) && blake3::hash(data).as_bytes() != d {
            return Err(bad("content does not match its digest".into()));
        }
        Ok(())
    }

    /// The list of chunks verification found damaged or missing
    /// (`<store>/.bad-chunks`, hex digests, one per line): a backup checks
    /// these before reusing them from its base, so that it writes them
    /// again.
    #[must_use]
    pub fn bad_list_path(&self) -> PathBuf {
        self.root.join(".bad-chunks")
    }

    /// Read [`Store::bad_list_path`] (empty if missing).
    ///
    /// # Errors
    /// Read errors other than the file not existing.
    pub fn bad_chunks(&self) -> Result<std::collections::HashSet<[u8; 32]>> {
        let p = self.bad_list_path();
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(Error::io("open", p, e)),
        };
        // Shared against `prune_bad_chunks` rewriting the list in place.
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| Error::io("lock", &p, e.into()))?;
        let mut s = String::new();
        f.read_to_string(&mut s)
            .map_err(|e| Error::io("read", &p, e))?;
        Ok(s.lines().filter_map(|l| parse_hex(l.trim())).collect())
    }

    /// Whether chunk `d` is present and intact (decompresses to data whose
    /// blake3 is its name).
    #[must_use]
    pub fn chunk_is_intact(&self, d: &[u8; 32]) -> bool {
        let Ok(comp) = std::fs::read(self.chunk_path(d)) else {
            return false;
        };
        // Larger than any chunk the chunker cuts (4 × the largest average).
        decompress(&comp, 64 << 20).is_ok_and(|data| blake3::hash(&data).as_bytes() == d)
    }

    /// Append digests to [`Store::bad_list_path`] (synced).
    ///
    /// # Errors
    /// Write errors.
    pub fn add_bad_chunks(&self, digests: &[[u8; 32]]) -> Result<()> {
        if digests.is_empty() {
            return Ok(());
        }
        let p = self.bad_list_path();
        let mut text = String::new();
        for d in digests {
            text.push_str(&hex(d));
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io("open", &p, e))?;
        // Exclusive against `prune_bad_chunks` rewriting the list.
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io("lock", &p, e.into()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("write", &p, e))
    }

    /// Drop from [`Store::bad_list_path`] the chunks that are intact again
    /// (a backup that read their data wrote them again) and those `unused`
    /// says no complete snapshot refers to any more; returns how many were
    /// dropped. The list is rewritten in place under the lock
    /// [`Store::add_bad_chunks`] and [`Store::bad_chunks`] take.
    ///
    /// # Errors
    /// I/O errors.
    pub fn prune_bad_chunks(&self, unused: &dyn Fn(&[u8; 32]) -> bool) -> Result<usize> {
        use std::io::{Seek, SeekFrom};
        let p = self.bad_list_path();
        let mut f = match std::fs::OpenOptions::new().read(true).write(true).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("open", &p, e)),
        };
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io("lock", &p, e.into()))?;
        let mut text = String::new();
        f.read_to_string(&mut text)
            .map_err(|e| Error::io("read", &p, e))?;
        let mut kept = String::new();
        let mut dropped = 0;
        for l in text.lines() {
            match parse_hex(l.trim()) {
                Some(d) if unused(&d) || self.chunk_is_intact(&d) => dropped += 1,
                Some(_) => {
                    kept.push_str(l.trim());
                    kept.push('\n');
                }
                None => {}
            }
        }
        if dropped > 0 {
            f.set_len(0)
                .and_then(|()| f.seek(SeekFrom::Start(0)).map(|_| ()))
                .and_then(|()| f.write_all(kept.as_bytes()))
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io("write", &p, e))?;
        }
        Ok(dropped)
    }

    /// Register a running backup: a flock'd file under `.writers/` holding
    /// its start time. Garbage collection keeps every chunk touched since
    /// the oldest registered start.
    ///
    /// # Errors
    /// Creating the file.
    pub fn register_writer(&self) -> Result<Writer> {
        let start_ns = now_ns();
        let id = format!("{}-{start_ns}", std::process::id());
        // Locked before it gets its name, so that a garbage collection
        // never sees it unlocked.
        let tmp = self.root.join(".writers").join(format!(".tmp-{id}"));
        let path = self.root.join(".writers").join(&id);
        let mut lock = LockFile::try_lock(&tmp, "backup writer")?;
        let res = (|| {
            let mut f = lock.file();
            f.write_all(start_ns.to_string().as_bytes())
                .map_err(|e| Error::io("write", &tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &path, e))
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        lock.path = path;
        Ok(Writer {
            lock: Some(lock),
            id,
            start_ns,
        })
    }

    /// Flush the file system of the store (one `syncfs`).
    ///
    /// # Errors
    /// The sync failing.
    pub fn sync(&self) -> Result<()> {
        let f = File::open(&self.root).map_err(|e| Error::io("open", &self.root, e))?;
        rustix::fs::syncfs(f.as_fd()).map_err(|e| Error::io("syncfs", &self.root, e.into()))
    }
}

/// A registered running backup; unregistered on drop.
#[derive(Debug)]
pub struct Writer {
    lock: Option<LockFile>,
    /// Its id (also the name of the temp snapshot directory).
    pub id: String,
    /// Start time in ns.
    pub start_ns: i64,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(l) = self.lock.take() {
            let _ = std::fs::remove_file(l.path());
        }
    }
}

thread_local! {
    /// This thread's compression context and its level.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// This thread's decompression context.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compress `data` with this thread's context (created once per thread
/// and level: setting up a context costs more than compressing a small chunk).
///
/// # Errors
/// zstd errors.
pub fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match c.as_mut() {
            Some((_, z)) => z.compress(data),
            None => Err(std::io::Error::other("no compression context")),
        }
    })
}

/// zstd-decompress `comp` (at most `capacity` bytes) with this thread's context.
///
/// # Errors
/// zstd errors, output larger than `capacity`.
pub fn decompress(comp: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    decompress_into(comp, capacity, &mut out)?;
    Ok(out)
}

/// [`decompress`] into `out`, replacing what it held (its capacity, at
/// least `capacity`, bounds the output).
///
/// # Errors
/// zstd errors, output larger than `out`'s capacity.
pub fn decompress_into(comp: &[u8], capacity: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        let Some(z) = d.as_mut() else {
            return Err(std::io::Error::other("no decompression context"));
        };
        out.clear();
        out.reserve(capacity);
        z.decompress_to_buffer(comp, out).map(|_| ())
    })
}

/// Set the mtime (and atime) of `p` to now; false if it does not exist.
///
/// # Errors
/// Errors other than ENOENT.
pub fn touch(p: &Path) -> Result<bool> {
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_NOW,
    };
    match rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &Timestamps {
            last_access: now,
            last_modification: now,
        },
        rustix::fs::AtFlags::empty(),
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(Error::io("touch", p, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let data = b"hello chunk".repeat(100);
        let d = *blake3::hash(&data).as_bytes();
        assert!(s.insert_chunk(&d, &data, 3, "t").unwrap() > 0);
        assert_eq!(s.insert_chunk(&d, &data, 3, "t").unwrap(), 0);
        assert_eq!(s.read_chunk(&d, data.len() as u32).unwrap(), data);
        assert_eq!(parse_hex(&hex(&d)), Some(d));
        // Read for a reference with a check: compared with the check.
        let r = ChunkRef::whole(d, data.len() as u32).with_check(check_of(&data));
        let (mut comp, mut got) = (Vec::new(), Vec::new());
        s.read_chunk_for(&r, &mut comp, &mut got).unwrap();
        assert_eq!(got, data);
        // A wrong check in the reference: the digest decides.
        got.clear();
        s.read_chunk_for(&r.with_check(r.check ^ 1), &mut comp, &mut got)
            .unwrap();
        assert_eq!(got, data);
        // Store another chunk's bytes (of the same length) under this name:
        // they match neither the check nor the digest.
        let other = b"other chunk".repeat(100);
        let z = zstd::bulk::compress(&other, 3).unwrap();
        std::fs::write(s.chunk_path(&d), z).unwrap();
        let e = s
            .read_chunk_for(&r, &mut comp, &mut got)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match its digest"), "{e}");
        let e = s.read_chunk(&d, data.len() as u32).unwrap_err().to_string();
        assert!(e.contains("does not match its digest"), "{e}");
        // A reference recording the check of these bytes takes them: a
        // matching check decides without the digest.
        s.read_chunk_for(&r.with_check(check_of(&other)), &mut comp, &mut got)
            .unwrap();
        assert_eq!(got, other);
    }

    #[test]
    fn bad_chunks_leave_the_list_when_intact_again_or_unused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let data = b"bad chunk".repeat(50);
        let bad = *blake3::hash(&data).as_bytes();
        let unused = [0x11; 32];
        let missing = [0x22; 32];
        s.add_bad_chunks(&[bad, unused, missing]).unwrap();
        // Still damaged (say, verification has not moved it away yet): kept.
        std::fs::create_dir_all(s.chunk_path(&bad).parent().unwrap()).unwrap();
        std::fs::write(s.chunk_path(&bad), b"garbage").unwrap();
        assert!(!s.chunk_is_intact(&bad));
        assert_eq!(s.prune_bad_chunks(&|d| *d == unused).unwrap(), 1);
        let left = s.bad_chunks().unwrap();
        assert!(left.contains(&bad) && left.contains(&missing) && !left.contains(&unused));
        // Written again by a backup: dropped.
        std::fs::remove_file(s.chunk_path(&bad)).unwrap();
        s.insert_chunk(&bad, &data, 3, "t").unwrap();
        assert!(s.chunk_is_intact(&bad));
        assert_eq!(s.prune_bad_chunks(&|_| false).unwrap(), 1);
        assert_eq!(
            s.bad_chunks().unwrap().into_iter().collect::<Vec<_>>(),
            [missing]
        );
        assert_eq!(s.prune_bad_chunks(&|_| false).unwrap(), 0);
    }
}
