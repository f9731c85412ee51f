//! Garbage collection: mark and sweep with a grace period.
//!
//! 1. Take `.gc.lock`; note the start time and the start of the oldest
//!    running backup (`.writers/`, entries whose flock is not held are
//!    stale and removed).
//! 2. Mark: set the mtime of every chunk referenced by every complete
//!    snapshot to now (`utimensat`).
//! 3. Sweep: remove chunk files whose mtime is older than
//!    `min(gc start, oldest writer start) - grace - 1 s`; also temporary
//!    chunk files that old, and temporary snapshot directories whose
//!    writer is gone.
//!
//! A chunk is removed by renaming it to `<digest>.sweep`, checking its
//! mtime again and only then unlinking it (or renaming it back): a backup
//! that touched the chunk before the rename is seen by the second check,
//! one that touches it after gets ENOENT and writes the chunk again.
//! `.sweep` files left by a killed collection are put back by the next.
//!
//! A running backup writes new chunks after its start and touches every
//! chunk it finds present in the store, so those are never older than the
//! cutoff. Chunks of entries it reuses from its *base* (the newest earlier
//! complete snapshot of its group) are not touched; instead it holds a
//! shared `flock` on the base's directory for its whole run, and
//! [`crate::snapshot::remove`] (so also prune) needs that lock
//! exclusively (besides the group lock) and refuses while a backup holds
//! it. Why the base's chunks survive: let the collection list the
//! snapshots at time L (after its start S ≥ cutoff). If the base existed
//! throughout the listing it is listed (it cannot vanish while locked) and
//! its chunks are marked after L. Otherwise it was completed after L by a
//! backup that was either registered when the collection started (cutoff
//! ≤ its start) or started after S; either way every chunk that backup
//! wrote or touched is newer than the cutoff, and those it reused untouched
//! come from its own base, to which the same holds — the chain ends at a
//! snapshot the listing saw. Chunks verification found damaged or missing
//! are listed in `.bad-chunks` and checked by a backup before it reuses
//! them, so the next backup writes them again.
//!
//! Killing the collection at any point loses nothing a
//! complete snapshot references: only chunks not marked since the cutoff
//! are removed, and marking ends before sweeping starts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::snapshot;
use crate::store::{LockFile, Store, hex, lock_is_held, now_ns};

/// What a collection did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Complete snapshots marked.
    pub snapshots: u64,
    /// Distinct chunks referenced (up to [`crate::MEMO_MAX`] of them; beyond,
    /// some are counted again).
    pub chunks_marked: u64,
    /// Referenced chunks that are missing (hex).
    pub missing: Vec<String>,
    /// Chunk files removed.
    pub chunks_removed: u64,
    /// Their bytes (compressed).
    pub bytes_removed: u64,
    /// Chunk files kept.
    pub chunks_kept: u64,
    /// Temporary chunk files of killed backups removed.
    pub tmp_removed: u64,
    /// Temporary snapshot directories of killed backups removed.
    pub stale_snapshots_removed: u64,
    /// Chunks dropped from the list of bad chunks: intact again (written
    /// again by a backup) or no longer used by any snapshot.
    pub bad_chunks_cleared: u64,
}

/// Run a garbage collection with the given grace period.
///
/// # Errors
/// Another collection is running; I/O errors.
pub fn garbage_collect(store: &Store, grace: Duration) -> Result<GcReport> {
    let _lock = LockFile::try_lock(&store.root().join(".gc.lock"), "garbage collection")?;
    let mut r = GcReport::default();
    let start = now_ns();
    let mut oldest = start;
    let wdir = store.root().join(".writers");
    let mut live = HashSet::new();
    for e in std::fs::read_dir(&wdir).map_err(|e| Error::io("read directory", &wdir, e))? {
        let e = e.map_err(|e| Error::io("read directory", &wdir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if lock_is_held(&p) {
            if let Some(t) = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
            {
                oldest = oldest.min(t);
            }
            // A writer registering right now: its name has no start yet.
            oldest = oldest.min(start);
            live.insert(name.trim_start_matches(".tmp-").to_string());
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    let grace_ns = i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX);
    let cutoff = oldest
        .saturating_sub(grace_ns)
        .saturating_sub(1_000_000_000);

    // Mark. The set only saves touching a chunk again (bounded memory: beyond
    // `MEMO_MAX` chunks it starts over, and `chunks_marked` counts touches).
    let mut marked: HashSet<[u8; 32]> = HashSet::new();
    // Chunks listed as bad now, and which of them a complete snapshot uses.
    let listed_bad = store.bad_chunks()?;
    let mut bad_used: HashSet<[u8; 32]> = HashSet::new();
    // Every snapshot directory with a catalog counts, even one whose manifest is damaged:
    // an unreadable catalog stops the collection before anything is swept.
    for dir in snapshot::snapshot_dirs(store)? {
        r.snapshots += 1;
        for m in crate::catalog::CatalogReader::open(&dir.join(snapshot::CATALOG))? {
            for c in m?.chunks {
                if listed_bad.contains(&c.digest) {
                    bad_used.insert(c.digest);
                }
                if marked.len() >= crate::MEMO_MAX {
                    marked.clear();
                }
                if marked.insert(c.digest) {
                    r.chunks_marked += 1;
                    if !store.touch_chunk(&c.digest)? {
                        r.missing.push(hex(&c.digest));
                    }
                }
            }
        }
    }
    drop(marked);
    r.missing.sort();
    r.missing.dedup();

    // Stale snapshot directories.
    for s in std::fs::read_dir(store.root().join("ct"))
        .map_err(|e| Error::io("read directory", store.root(), e))?
    {
        let g = s
            .map_err(|e| Error::io("read directory", store.root(), e))?
            .path();
        let Ok(rd) = std::fs::read_dir(&g) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = if let Some(id) = name.strip_prefix(".tmp-") {
                !live.contains(id) && !lock_is_held(&wdir.join(id))
            } else {
                name.starts_with(".del-")
            };
            if stale && std::fs::remove_dir_all(e.path()).is_ok() {
                r.stale_snapshots_removed += 1;
            }
        }
    }

    // Sweep.
    let cdir = store.chunk_dir();
    let old = |md: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        md.mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(md.mtime_nsec())
            < cutoff
    };
    for a in std::fs::read_dir(&cdir)
        .map_err(|e| Error::io("read directory", &cdir, e))?
        .flatten()
    {
        let Ok(ra) = std::fs::read_dir(a.path()) else {
            continue;
        };
        for c in ra.flatten() {
            let name = c.file_name().to_string_lossy().into_owned();
            let Ok(md) = c.metadata() else { continue };
            if name.ends_with(".bad") || !md.is_file() {
                continue;
            }
            if let Some(base) = name.strip_suffix(".sweep") {
                // Left by a killed collection: put it back.
                restore_swept(&c.path(), &c.path().with_file_name(base));
                continue;
            }
            if !old(&md) {
                r.chunks_kept += u64::from(!name.starts_with(".tmp-"));
                continue;
            }
            if name.starts_with(".tmp-") {
                if std::fs::remove_file(c.path()).is_ok() {
                    r.tmp_removed += 1;
                }
                continue;
            }
            if sweep_chunk(&c.path(), &old)? {
                r.chunks_removed += 1;
                r.bytes_removed += md.len();
            } else {
                r.chunks_kept += 1;
            }
        }
    }
    // Chunks reported bad that are intact again, or that no snapshot uses any
    // more (listed before the marking and not met by it), need no more
    // checking by backups.
    let unused = |d: &[u8; 32]| listed_bad.contains(d) && !bad_used.contains(d);
    r.bad_chunks_cleared = store.prune_bad_chunks(&unused)? as u64;
    Ok(r)
}

/// Put a `.sweep` file back under its chunk name (unless the chunk was
/// written again meanwhile) and remove it.
fn restore_swept(swept: &Path, chunk: &Path) {
    let _ = std::fs::hard_link(swept, chunk);
    let _ = std::fs::remove_file(swept);
}

/// Remove `chunk` if it is (still) older than the cutoff; see the module docs.
fn sweep_chunk(chunk: &Path, old: &dyn Fn(&std::fs::Metadata) -> bool) -> Result<bool> {
    let mut swept = chunk.as_os_str().to_owned();
    swept.push(".sweep");
    let swept = PathBuf::from(swept);
    match std::fs::rename(chunk, &swept) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("rename", chunk, e)),
    }
    let md = std::fs::metadata(&swept).map_err(|e| Error::io("stat", &swept, e))?;
    if old(&md) {
        std::fs::remove_file(&swept).map_err(|e| Error::io("remove", &swept, e))?;
        Ok(true)
    } else {
        restore_swept(&swept, chunk);
        Ok(false)
    }
}
