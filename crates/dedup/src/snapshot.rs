//! Complete snapshots: listing, manifest, notes, protection, the tar
//! stream a snapshot stands for (restore, export, single files) and
//! removal.

use std::collections::HashSet;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};
use vzkit_archive::header::padding;
use vzkit_archive::writer::trailer;
use vzkit_archive::{ExtractOptions, ExtractReport, MemberKind, extract_buffered};

use crate::backup::BackupStats;
use crate::catalog::{CatalogReader, Member};
use crate::error::{Error, Result};
use crate::store::{LockFile, SnapshotLock, Store};

/// Catalog file name.
pub const CATALOG: &str = "catalog.zst";
/// Container config file name.
pub const CONFIG: &str = "pct.conf";
/// Firewall config file name.
pub const FIREWALL: &str = "pct.fw";
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// Verify state file name.
pub const VERIFY_STATE: &str = "verify-state";
/// Notes file name.
pub const NOTES: &str = "notes";
/// Protection marker file name.
pub const PROTECTED: &str = "protected";

/// A snapshot: group and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotRef {
    /// Container id.
    pub vmid: u32,
    /// Backup time, seconds since the epoch.
    pub time: i64,
}

impl SnapshotRef {
    /// The RFC 3339 UTC time (`2026-11-28T15:14:09Z`), the directory name.
    #[must_use]
    pub fn time_name(&self) -> String {
        jiff::Timestamp::from_second(self.time)
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|_| self.time.to_string())
    }

    /// `ct/<vmid>/<time>`.
    #[must_use]
    pub fn name(&self) -> String {
        format!("ct/{}/{}", self.vmid, self.time_name())
    }

    /// Parse `ct/<vmid>/<time>` (also with a `backup/` prefix).
    ///
    /// # Errors
    /// Anything else.
    pub fn parse(s: &str) -> Result<SnapshotRef> {
        let bad = || {
            Error::Invalid(format!(
                "invalid snapshot name '{s}' (expected ct/<vmid>/<RFC 3339 UTC time>)"
            ))
        };
        let t = s.strip_prefix("backup/").unwrap_or(s);
        let mut it = t.split('/');
        let (Some("ct"), Some(id), Some(time), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        let vmid: u32 = id.parse().map_err(|_| bad())?;
        let time = parse_time(time).ok_or_else(bad)?;
        Ok(SnapshotRef { vmid, time })
    }

    /// The snapshot's directory.
    #[must_use]
    pub fn path(&self, store: &Store) -> PathBuf {
        store.group_dir(self.vmid).join(self.time_name())
    }
}

fn parse_time(s: &str) -> Option<i64> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    let r = SnapshotRef {
        vmid: 0,
        time: ts.as_second(),
    };
    (r.time_name() == s).then_some(ts.as_second())
}

/// One part listed in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    /// File name in the snapshot directory.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 (hex).
    pub blake3: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// `ct`.
    pub backup_type: String,
    /// The container id.
    pub backup_id: String,
    /// Seconds since the epoch.
    pub backup_time: i64,
    /// The parts.
    pub files: Vec<ManifestFile>,
    /// Size of the tar stream the snapshot stands for.
    pub size: u64,
    /// Counters of the backup.
    pub stats: serde_json::Value,
    /// The id map the tree was walked with ([`id_map_name`]); missing in
    /// snapshots of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_map: Option<String>,
    /// The source trees in order (missing in snapshots of older versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trees: Vec<TreeSource>,
    /// How file data was cut ([`crate::chunker::ChunkSizes::name`]; missing
    /// in snapshots of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunking: Option<String>,
    // The last verification, `verify-state`, is read on its own (see
    // [`verify_state`]): a value this version cannot read must not make the
    // manifest unreadable.
}

/// A source tree of a snapshot, as the next backup compares it to reuse
/// the whole tree (see the crate docs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct TreeSource {
    /// Member prefix (`./`, `./mnt/data`).
    pub prefix: String,
    /// blake3 (hex) of everything else that decides the tree's members:
    /// prefix, excludes, one-file-system rule, id map.
    pub fingerprint: String,
    /// The identity of the image file the tree was mounted from, if it
    /// proves the tree unchanged while it stays the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<crate::backup::VolumeKey>,
    /// blake3 (hex) of the walk's parameters and the layout of the trees
    /// (their prefixes, without volume keys): a later walk with the same
    /// value may take unchanged directories from this snapshot (see
    /// [`crate::backup::VolumeInfo`]). Empty: unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub walk: String,
}

/// How a snapshot records the id map its trees were walked with: whole
/// catalog entries are only reused by a backup with the same map.
#[must_use]
pub fn id_map_name(m: Option<&vzkit_archive::IdMap>) -> String {
    match m {
        Some(m) => format!("{m:?}"),
        None => "none".into(),
    }
}

/// The last verification of a snapshot: `verify-state` in its manifest
/// (in a file of that name beside it in snapshots verified by older
/// versions).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyState {
    /// `ok` or `failed`.
    pub state: String,
    /// Seconds since the epoch.
    pub time: i64,
    /// Corrupt or missing chunks found.
    #[serde(default, rename = "bad-chunks")]
    pub bad_chunks: Vec<String>,
}

fn file_hash(p: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(p).map_err(|e| Error::io("open", p, e))?;
    let mut h = blake3::Hasher::new();
    let n = io::copy(&mut f, &mut h).map_err(|e| Error::io("read", p, e))?;
    Ok((n, h.finalize().to_hex().to_string()))
}

/// Write `manifest.json` of a snapshot directory.
pub(crate) fn write_manifest(
    dir: &Path,
    snap: &SnapshotRef,
    parts: &[&str],
    stats: &BackupStats,
    id_map: String,
    trees: Vec<TreeSource>,
    chunking: String,
) -> Result<()> {
    let mut files = Vec::new();
    for p in parts {
        let (size, blake3) = file_hash(&dir.join(p))?;
        files.push(ManifestFile {
            filename: (*p).to_string(),
            size,
            blake3,
        });
    }
    let m = Manifest {
        backup_type: "ct".into(),
        backup_id: snap.vmid.to_string(),
        backup_time: snap.time,
        files,
        size: stats.logical_size,
        stats: serde_json::to_value(stats).unwrap_or_default(),
        id_map: Some(id_map),
        trees,
        chunking: Some(chunking),
    };
    let p = dir.join(MANIFEST);
    let text = serde_json::to_vec_pretty(&m).unwrap_or_default();
    std::fs::write(&p, text).map_err(|e| Error::io("write", &p, e))
}

/// Read a snapshot's manifest.
///
/// # Errors
/// Missing or malformed manifest.
pub fn manifest(store: &Store, snap: &SnapshotRef) -> Result<Manifest> {
    let p = snap.path(store).join(MANIFEST);
    let b = std::fs::read(&p).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            Error::Invalid(format!("snapshot {} does not exist", snap.name()))
        }
        _ => Error::io("read", &p, e),
    })?;
    serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
        what: "manifest",
        path: p,
        message: e.to_string(),
    })
}

/// Check the blake3 of every part against the manifest.
///
/// # Errors
/// `Corrupt` naming the first mismatching part.
pub fn check_manifest(store: &Store, snap: &SnapshotRef) -> Result<Manifest> {
    let m = manifest(store, snap)?;
    let dir = snap.path(store);
    for f in &m.files {
        let p = dir.join(&f.filename);
        let (size, h) = file_hash(&p)?;
        if size != f.size || h != f.blake3 {
            return Err(Error::Corrupt {
                what: "snapshot part",
                path: p,
                message: "size or blake3 differs from the manifest".into(),
            });
        }
    }
    Ok(m)
}

/// A listed snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Which.
    pub snapshot: SnapshotRef,
    /// Size of its tar stream.
    pub size: u64,
    /// Notes.
    pub notes: String,
    /// Protected from pruning and removal.
    pub protected: bool,
    /// Last verification.
    pub verify: Option<VerifyState>,
}

/// Complete snapshots (of one group or all), oldest first.
///
/// # Errors
/// Unreadable directories.
pub fn list(store: &Store, vmid: Option<u32>) -> Result<Vec<SnapshotInfo>> {
    let mut groups = Vec::new();
    match vmid {
        Some(v) => groups.push(v),
        None => {
            let ct = store.root().join("ct");
            for e in std::fs::read_dir(&ct).map_err(|e| Error::io("read directory", &ct, e))? {
                let e = e.map_err(|e| Error::io("read directory", &ct, e))?;
                if let Some(v) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                    groups.push(v);
                }
            }
        }
    }
    let mut out = Vec::new();
    for vmid in groups {
        let g = store.group_dir(vmid);
        let rd = match std::fs::read_dir(&g) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read directory", &g, e)),
        };
        for e in rd {
            let e = e.map_err(|e| Error::io("read directory", &g, e))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some(time) = parse_time(&name) else {
                continue;
            };
            let snap = SnapshotRef { vmid, time };
            let Ok(m) = manifest(store, &snap) else {
                continue;
            };
            out.push(SnapshotInfo {
                snapshot: snap,
                size: m.size,
                notes: notes(store, &snap)?,
                protected: e.path().join(PROTECTED).exists(),
                verify: verify_state(store, &snap),
            });
        }
    }
    out.sort_by_key(|s| s.snapshot);
    Ok(out)
}

/// The directories of all complete snapshots (named by their time, not hidden), whether or
/// not their manifest is readable.
///
/// # Errors
/// Unreadable directories.
pub fn snapshot_dirs(store: &Store) -> Result<Vec<PathBuf>> {
    let ct = store.root().join("ct");
    let mut out = Vec::new();
    for g in std::fs::read_dir(&ct).map_err(|e| Error::io("read directory", &ct, e))? {
        let g = g.map_err(|e| Error::io("read directory", &ct, e))?.path();
        if !g.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&g).map_err(|e| Error::io("read directory", &g, e))? {
            let e = e.map_err(|e| Error::io("read directory", &g, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if parse_time(&name).is_some() && e.path().join(CATALOG).exists() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn require(store: &Store, snap: &SnapshotRef) -> Result<PathBuf> {
    let d = snap.path(store);
    if !d.join(MANIFEST).exists() {
        return Err(Error::Invalid(format!(
            "snapshot {} does not exist",
            snap.name()
        )));
    }
    Ok(d)
}

/// Names of temporary files, unique within the process.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Replace `p` with `data`: written to a new file beside it, synced and
/// renamed over it, so that readers and a crash see the old or the new
/// content, never a part.
fn write_atomic(p: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = p.with_file_name(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = std::fs::File::create_new(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        std::fs::rename(&tmp, p).map_err(|e| Error::io("rename", p, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Remove `p` if it exists.
fn remove_if_exists(p: PathBuf) -> Result<()> {
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

/// The notes of a snapshot (empty if none).
///
/// # Errors
/// Read errors.
pub fn notes(store: &Store, snap: &SnapshotRef) -> Result<String> {
    let p = snap.path(store).join(NOTES);
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::io("read", p, e)),
    }
}

/// Set (or with an empty string remove) the notes.
///
/// # Errors
/// Missing snapshot, write errors.
pub fn set_notes(store: &Store, snap: &SnapshotRef, text: &str) -> Result<()> {
    let p = require(store, snap)?.join(NOTES);
    if text.is_empty() {
        return remove_if_exists(p);
    }
    write_atomic(&p, text.as_bytes())
}

/// Is the snapshot protected?
#[must_use]
pub fn is_protected(store: &Store, snap: &SnapshotRef) -> bool {
    snap.path(store).join(PROTECTED).exists()
}

/// Set or clear protection.
///
/// # Errors
/// Missing snapshot, write errors.
pub fn set_protected(store: &Store, snap: &SnapshotRef, on: bool) -> Result<()> {
    let p = require(store, snap)?.join(PROTECTED);
    if on {
        std::fs::write(&p, b"").map_err(|e| Error::io("write", &p, e))
    } else {
        remove_if_exists(p)
    }
}

/// The last verification of a snapshot: `verify-state` in its manifest,
/// or in a file of that name beside it (older versions, or a manifest that
/// could not be rewritten); the later of the two.
#[must_use]
pub fn verify_state(store: &Store, snap: &SnapshotRef) -> Option<VerifyState> {
    let dir = snap.path(store);
    let in_manifest: Option<VerifyState> = std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|mut m| serde_json::from_value(m.get_mut("verify-state")?.take()).ok());
    let in_file = std::fs::read(dir.join(VERIFY_STATE))
        .ok()
        .and_then(|b| serde_json::from_slice::<VerifyState>(&b).ok());
    match (in_manifest, in_file) {
        (Some(m), Some(f)) => Some(if f.time > m.time { f } else { m }),
        (m, f) => m.or(f),
    }
}

/// Record `v` in the snapshot's manifest, every other field as it was
/// ([`write_atomic`]); a `verify-state` file of an older version goes. A
/// manifest that is not a JSON object (verify reports it damaged) is left
/// alone and the state written to a `verify-state` file beside it.
pub(crate) fn write_verify_state(store: &Store, snap: &SnapshotRef, v: &VerifyState) -> Result<()> {
    let dir = require(store, snap)?;
    let p = dir.join(MANIFEST);
    let old = dir.join(VERIFY_STATE);
    let b = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
    let state = serde_json::to_value(v).unwrap_or_default();
    match serde_json::from_slice::<serde_json::Value>(&b) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("verify-state".into(), state);
            let text = serde_json::to_vec_pretty(&m).unwrap_or_default();
            write_atomic(&p, &text)?;
            remove_if_exists(old)
        }
        _ => write_atomic(&old, &serde_json::to_vec_pretty(&state).unwrap_or_default()),
    }
}

/// Remove a snapshot (not if protected). Its chunks go with the next
/// garbage collection.
///
/// # Errors
/// Protected or missing snapshot, the group is locked, I/O errors.
pub fn remove(store: &Store, snap: &SnapshotRef) -> Result<()> {
    let d = require(store, snap)?;
    if is_protected(store, snap) {
        return Err(Error::Invalid(format!(
            "snapshot {} is protected",
            snap.name()
        )));
    }
    let _lock = LockFile::try_lock(
        &store.group_dir(snap.vmid).join(".lock"),
        &format!("backup group ct/{}", snap.vmid),
    )?;
    // A running backup holds a shared lock on its base snapshot.
    let _in_use = SnapshotLock::try_lock(
        &d,
        true,
        &format!(
            "snapshot {} is the base of a running backup; not removed",
            snap.name()
        ),
    )?;
    // Hide it first, so that a partial removal is never listed.
    let hidden = store
        .group_dir(snap.vmid)
        .join(format!(".del-{}", snap.time_name()));
    std::fs::rename(&d, &hidden).map_err(|e| Error::io("rename", &d, e))?;
    std::fs::remove_dir_all(&hidden).map_err(|e| Error::io("remove", &hidden, e))
}

/// The container config stored with a snapshot.
///
/// # Errors
/// Missing snapshot or config.
pub fn config(store: &Store, snap: &SnapshotRef) -> Result<Vec<u8>> {
    let p = require(store, snap)?.join(CONFIG);
    std::fs::read(&p).map_err(|e| Error::io("read", p, e))
}

/// Open the catalog of a snapshot.
///
/// # Errors
/// Missing snapshot.
pub fn catalog(store: &Store, snap: &SnapshotRef) -> Result<CatalogReader> {
    CatalogReader::open(&require(store, snap)?.join(CATALOG))
}

/// A file whose data could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFailure {
    /// The member name.
    pub member: String,
    /// Why.
    pub error: String,
    /// Size and mtime the restored file has (to recognize it).
    written: (u64, i64),
}

/// A member filter of [`TarStream`] and [`restore`].
pub type Filter = Box<dyn FnMut(&Member) -> bool + Send>;

/// Batches in flight ahead of the reader.
const READ_AHEAD: usize = 4;
/// A batch is closed at this many distinct chunks, bytes of them or stream
/// pieces: small files go to the reading threads many at a time, and each
/// hand-over costs thread switches (on a virtual machine an idle CPU halts
/// and loses its caches: with batches of 1 MiB the stream took a fifth
/// more CPU than with 4 MiB, measured on the benchmark snapshot);
/// consecutive slices of one packed chunk are read once per batch. A batch
/// holds less than 4 MiB of chunks before its last one, so with the batches
/// in flight (4 handed on, one more waiting to be, one being read) chunk
/// data stays below about 30 MiB with chunks of at most 1 MiB; the buffers
/// kept for reuse add at most [`FREE_BYTES`], the packed chunks kept for
/// members further on at most [`CACHE_BYTES`], the reading threads one
/// compressed chunk each.
const BATCH_CHUNKS: usize = 256;
const BATCH_BYTES: u64 = 1 << 22;
const BATCH_SEGS: usize = 1024;

/// A piece of the stream in a batch.
enum Seg {
    /// Header blocks (and the padding of a member without chunks).
    Bytes(Vec<u8>),
    /// One chunk of a member (its data is the batch's next result).
    Chunk {
        member: std::sync::Arc<str>,
        /// Real size and mtime of the member (to recognize the restored file).
        written: (u64, i64),
        /// The member's bytes in the chunk.
        used: u32,
        /// Padding after this chunk (the member's last chunk only).
        pad: usize,
    },
}

type Batch = Vec<Result<Piece>>;

/// A piece of the stream: the reader copies from it without
/// re-allocating the bytes.
enum Piece {
    /// Header blocks or a whole chunk.
    Owned(Vec<u8>),
    /// A member's slice (`start..end`) of a chunk shared with the members
    /// packed next to it.
    Shared(std::sync::Arc<Vec<u8>>, usize, usize),
    /// Zeros: padding, or the bytes of a damaged chunk when not strict.
    Zeros(usize),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Owned(b) => b.len(),
            Piece::Shared(_, s, e) => e - s,
            Piece::Zeros(n) => *n,
        }
    }
}

/// What the catalog thread hands to the reader, in stream order.
enum Item {
    /// Stream pieces; the data of their chunks, in order, comes from `rx`
    /// (a worker reading the batch), if there are chunks.
    Batch {
        segs: Vec<Seg>,
        rx: Option<std::sync::mpsc::Receiver<Batch>>,
    },
    /// The catalog could not be read.
    Failed(String),
    End,
}

type ChunkJob = (
    Vec<crate::catalog::ChunkRef>,
    std::sync::mpsc::SyncSender<Batch>,
);

/// The batch being collected by the catalog thread.
#[derive(Default)]
struct Collect {
    segs: Vec<Seg>,
    refs: Vec<crate::catalog::ChunkRef>,
    /// Distinct chunks in `refs` (consecutive equal digests count once).
    chunks: usize,
    bytes: u64,
}

impl Collect {
    /// Take reference `c` into the batch; true when the batch is full. A
    /// chunk is held whole until its last member is read: its whole length
    /// counts (a filtered stream may use little of a packed one). Repeating
    /// the chunk before (a run of zeros) adds its used bytes, so that such a
    /// run closes batches too.
    fn add(&mut self, c: &crate::catalog::ChunkRef) -> bool {
        if self.refs.last().is_none_or(|l| l.digest != c.digest) {
            self.chunks += 1;
            self.bytes += u64::from(c.len);
        } else {
            self.bytes += u64::from(c.used);
        }
        self.refs.push(*c);
        self.chunks >= BATCH_CHUNKS || self.bytes >= BATCH_BYTES
    }

    fn flush(
        &mut self,
        out: &std::sync::mpsc::SyncSender<Item>,
        jobs: &std::sync::mpsc::SyncSender<ChunkJob>,
    ) -> std::result::Result<(), ()> {
        if self.segs.is_empty() {
            return Ok(());
        }
        let rx = if self.refs.is_empty() {
            None
        } else {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            jobs.send((std::mem::take(&mut self.refs), tx))
                .map_err(|_| ())?;
            Some(rx)
        };
        self.bytes = 0;
        self.chunks = 0;
        out.send(Item::Batch {
            segs: std::mem::take(&mut self.segs),
            rx,
        })
        .map_err(|_| ())
    }
}

/// The tar stream a snapshot stands for, reconstructed from its catalog
/// and chunks: byte for byte what `ArchiveWriter` wrote for the same tree.
/// A thread reads the catalog and a pool (one thread per CPU) reads,
/// decompresses and checks chunks ahead of the reader, in batches of up
/// to 256 chunks or 4 MiB, up to 4 batches ahead (each thread reuses one
/// decompression context); packed chunks read lately are kept for the
/// members further on that use them.
pub struct TarStream {
    rx: std::sync::mpsc::Receiver<Item>,
    /// The piece being read, from `pos`.
    cur: Piece,
    /// Pieces of the current batch after `cur`.
    queue: std::collections::VecDeque<Piece>,
    pos: usize,
    written: u64,
    done: bool,
    strict: bool,
    free: FreeBuffers,
    /// Files whose data could not be read (only when not strict: their
    /// content is replaced by zeros in the stream).
    pub failures: Vec<FileFailure>,
}

impl std::fmt::Debug for TarStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarStream")
            .field("written", &self.written)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

/// Chunk buffers the reader is done with, for the chunk reading threads to
/// reuse: fresh buffers for every chunk cost allocating and faulting in
/// memory. At most [`FREE_BYTES`] are kept.
#[derive(Clone, Default)]
struct FreeBuffers(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// Capacity of the buffers kept for reuse: enough for the chunks of the
/// batches in flight (chunks of 256 KiB on average, at most 1 MiB by default).
const FREE_BYTES: usize = 32 << 20;

impl FreeBuffers {
    /// A buffer for `len` bytes: the smallest kept one large enough
    /// (growing a smaller one would fault in fresh memory all the same), or
    /// a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        let Ok(mut f) = self.0.lock() else {
            return Vec::new();
        };
        let fit = f
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        fit.map(|i| f.swap_remove(i)).unwrap_or_default()
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() >= 64 << 10
            && let Ok(mut f) = self.0.lock()
            && f.iter().map(Vec::capacity).sum::<usize>() + b.capacity() <= FREE_BYTES
        {
            f.push(b);
        }
    }
}

/// Packed chunks read lately, kept for the members further on that use
/// them again: small files are packed in the order a backup read them, so a
/// restore meets a pack chunk again after the large files the walk met
/// between its small ones, and after files changed in later versions, which
/// are packed into chunks of their own backups (in the benchmark's tenth
/// version the chunks read without this came to 1.8 times the distinct
/// chunks). Bounded by the buffers' capacity; the least recently used go
/// first, back to the free buffers once no piece holds them.
#[derive(Clone, Default)]
struct ChunkCache(std::sync::Arc<std::sync::Mutex<CacheInner>>);

/// A chunk's digest and the check it was read under.
type CacheKey = ([u8; 32], u64);

#[derive(Default)]
struct CacheInner {
    /// Least recently used first, by digest and the check they were read
    /// under (a reference recording another check reads the chunk itself).
    items: std::collections::VecDeque<(CacheKey, std::sync::Arc<Vec<u8>>)>,
    bytes: usize,
}

/// Capacity of the packed chunks kept in the [`ChunkCache`].
const CACHE_BYTES: usize = 16 << 20;

impl ChunkCache {
    fn get(&self, key: CacheKey) -> Option<std::sync::Arc<Vec<u8>>> {
        let mut c = self.0.lock().ok()?;
        let i = c.items.iter().rposition(|(k, _)| *k == key)?;
        let e = c.items.remove(i)?;
        let data = std::sync::Arc::clone(&e.1);
        c.items.push_back(e);
        Some(data)
    }

    fn put(&self, key: CacheKey, data: &std::sync::Arc<Vec<u8>>, free: &FreeBuffers) {
        let Ok(mut c) = self.0.lock() else {
            return;
        };
        if c.items.iter().any(|(k, _)| *k == key) {
            return;
        }
        c.bytes += data.capacity();
        c.items.push_back((key, std::sync::Arc::clone(data)));
        while c.bytes > CACHE_BYTES {
            let Some((_, old)) = c.items.pop_front() else {
                break;
            };
            c.bytes -= old.capacity();
            if let Ok(b) = std::sync::Arc::try_unwrap(old) {
                free.give(b);
            }
        }
    }
}

/// The pieces of `refs` (all of one chunk) out of its data.
fn slices(refs: &[crate::catalog::ChunkRef], data: &std::sync::Arc<Vec<u8>>) -> Vec<Result<Piece>> {
    refs.iter()
        .map(|r| {
            // As `ChunkRef::slice`: bounded by the chunk.
            let start = (r.offset as usize).min(data.len());
            let end = (start + r.used as usize).min(data.len());
            Ok(Piece::Shared(std::sync::Arc::clone(data), start, end))
        })
        .collect()
}

/// The data of each reference, in order; a chunk referred to by
/// consecutive references (small files packed into it) is read once, and
/// a packed chunk read lately is taken from `cache`.
fn read_slices(
    store: &Store,
    refs: &[crate::catalog::ChunkRef],
    comp: &mut Vec<u8>,
    free: &FreeBuffers,
    cache: &ChunkCache,
) -> Batch {
    let mut out = Vec::with_capacity(refs.len());
    let mut i = 0;
    while i < refs.len() {
        let d = refs[i].digest;
        let j = i + refs[i..].iter().take_while(|r| r.digest == d).count();
        let packed = j > i + 1 || !refs[i].is_whole();
        let key = (d, refs[i].check);
        if packed && let Some(data) = cache.get(key) {
            out.extend(slices(&refs[i..j], &data));
            i = j;
            continue;
        }
        let mut data = free.take(refs[i].len as usize);
        match store.read_chunk_for(&refs[i], comp, &mut data) {
            Ok(()) if !packed => out.push(Ok(Piece::Owned(data))),
            Ok(()) => {
                let data = std::sync::Arc::new(data);
                cache.put(key, &data, free);
                out.extend(slices(&refs[i..j], &data));
            }
            Err(e) => {
                free.give(data);
                let message = match e {
                    Error::BadChunk { message, .. } => message,
                    e => e.to_string(),
                };
                out.extend((i..j).map(|_| {
                    Err(Error::BadChunk {
                        digest: crate::store::hex(&d),
                        message: message.clone(),
                    })
                }));
            }
        }
        i = j;
    }
    out
}

fn produce(
    mut cat: CatalogReader,
    mut filter: Option<Filter>,
    out: &std::sync::mpsc::SyncSender<Item>,
    jobs: &std::sync::mpsc::SyncSender<ChunkJob>,
) -> std::result::Result<(), ()> {
    let mut b = Collect::default();
    loop {
        let m = match cat.next_member() {
            Ok(Some(m)) => m,
            Ok(None) => {
                b.flush(out, jobs)?;
                return out.send(Item::End).map_err(|_| ());
            }
            Err(e) => {
                b.flush(out, jobs)?;
                return out.send(Item::Failed(e.to_string())).map_err(|_| ());
            }
        };
        if let Some(f) = &mut filter
            && !f(&m)
        {
            continue;
        }
        let mut head = match m.encode_header() {
            Ok(h) => h,
            Err(e) => {
                b.flush(out, jobs)?;
                return out.send(Item::Failed(e.to_string())).map_err(|_| ());
            }
        };
        if m.chunks.is_empty() {
            head.resize(head.len() + padding(m.size), 0);
        }
        b.segs.push(Seg::Bytes(head));
        let member: std::sync::Arc<str> = m.name_lossy().into();
        let written = (m.sparse.as_ref().map_or(m.size, |(s, _)| *s), m.mtime);
        let n = m.chunks.len();
        for (i, c) in m.chunks.iter().enumerate() {
            let full = b.add(c);
            b.segs.push(Seg::Chunk {
                member: std::sync::Arc::clone(&member),
                written,
                used: c.used,
                pad: if i + 1 == n { padding(m.size) } else { 0 },
            });
            if full {
                b.flush(out, jobs)?;
            }
        }
        if b.segs.len() >= BATCH_SEGS {
            b.flush(out, jobs)?;
        }
    }
}

impl TarStream {
    /// The stream of `snap`. `strict`: a bad chunk is a read error naming
    /// the file; otherwise its bytes are zeros and the file is listed in
    /// [`TarStream::failures`].
    ///
    /// # Errors
    /// Missing snapshot.
    pub fn open(store: &Store, snap: &SnapshotRef, strict: bool) -> Result<TarStream> {
        Self::open_filtered(store, snap, strict, None)
    }

    /// As [`TarStream::open`], emitting only members for which `filter` is true.
    ///
    /// # Errors
    /// Missing snapshot.
    pub fn open_filtered(
        store: &Store,
        snap: &SnapshotRef,
        strict: bool,
        filter: Option<Filter>,
    ) -> Result<TarStream> {
        let cat = catalog(store, snap)?;
        let (out_tx, rx) = std::sync::mpsc::sync_channel::<Item>(READ_AHEAD);
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<ChunkJob>(READ_AHEAD);
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let workers = std::thread::available_parallelism().map_or(2, usize::from);
        let free = FreeBuffers::default();
        let cache = ChunkCache::default();
        for _ in 0..workers {
            let job_rx = std::sync::Arc::clone(&job_rx);
            let store = store.clone();
            let free = free.clone();
            let cache = cache.clone();
            std::thread::spawn(move || {
                let mut comp = Vec::new();
                loop {
                    let job = match job_rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok((refs, tx)) = job else { return };
                    let _ = tx.send(read_slices(&store, &refs, &mut comp, &free, &cache));
                }
            });
        }
        std::thread::spawn(move || {
            let _ = produce(cat, filter, &out_tx, &job_tx);
        });
        Ok(TarStream {
            rx,
            cur: Piece::Zeros(0),
            queue: std::collections::VecDeque::new(),
            pos: 0,
            written: 0,
            done: false,
            strict,
            free,
            failures: Vec::new(),
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        let item = self
            .rx
            .recv()
            .unwrap_or_else(|_| Item::Failed("catalog reader stopped".into()));
        match item {
            Item::Batch { segs, rx } => {
                let mut data = match rx {
                    Some(rx) => rx.recv().unwrap_or_default(),
                    None => Vec::new(),
                }
                .into_iter();
                for seg in segs {
                    match seg {
                        Seg::Bytes(b) => self.queue.push_back(Piece::Owned(b)),
                        Seg::Chunk {
                            member,
                            written,
                            used,
                            pad,
                        } => {
                            let res = data.next().unwrap_or_else(|| {
                                Err(Error::Invalid("chunk reader stopped".into()))
                            });
                            match res {
                                Ok(d) => {
                                    self.queue.push_back(d);
                                    if pad > 0 {
                                        self.queue.push_back(Piece::Zeros(pad));
                                    }
                                }
                                Err(e) => {
                                    if self.strict {
                                        return Err(io::Error::other(format!(
                                            "file '{member}': {e}"
                                        )));
                                    }
                                    if self.failures.last().is_none_or(|f| *f.member != *member) {
                                        self.failures.push(FileFailure {
                                            member: member.to_string(),
                                            error: e.to_string(),
                                            written,
                                        });
                                    }
                                    self.queue.push_back(Piece::Zeros(used as usize + pad));
                                }
                            }
                        }
                    }
                }
            }
            Item::Failed(e) => return Err(io::Error::other(e)),
            Item::End => {
                self.queue.push_back(Piece::Owned(trailer(self.written)));
                self.done = true;
            }
        }
        Ok(())
    }
}

/// Zeros handed out for [`Piece::Zeros`], at most this many at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl io::BufRead for TarStream {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.cur.len() {
            if let Some(p) = self.queue.pop_front() {
                match std::mem::replace(&mut self.cur, p) {
                    Piece::Owned(b) => self.free.give(b),
                    // The chunk's last member hands it back.
                    Piece::Shared(a, ..) => {
                        if let Ok(b) = std::sync::Arc::try_unwrap(a) {
                            self.free.give(b);
                        }
                    }
                    Piece::Zeros(_) => {}
                }
                self.pos = 0;
                continue;
            }
            if self.done {
                return Ok(&[]);
            }
            self.fill()?;
        }
        Ok(match &self.cur {
            Piece::Owned(b) => &b[self.pos..],
            Piece::Shared(a, start, end) => &a[start + self.pos..*end],
            Piece::Zeros(n) => &ZEROS[..(n - self.pos).min(ZEROS.len())],
        })
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.written += n as u64;
    }
}

impl Read for TarStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        vzkit_archive::reader::read_buffered(self, out)
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// The extraction.
    pub extract: ExtractReport,
    /// Files not restored because their data is damaged (removed again
    /// from the target).
    pub failed: Vec<FileFailure>,
}

/// Restore a snapshot (or, with `filter`, part of it) below `target` with
/// [`vzkit_archive::extract_buffered`]. Files whose chunks are damaged are not
/// left behind; they are listed in the report and the rest is restored.
///
/// # Errors
/// Missing snapshot, extraction errors.
pub fn restore(
    store: &Store,
    snap: &SnapshotRef,
    target: &Path,
    opts: &ExtractOptions,
    filter: Option<Filter>,
) -> Result<RestoreReport> {
    let mut s = TarStream::open_filtered(store, snap, false, filter)?;
    let report = extract_buffered(&mut s, target, opts)?;
    let failed = std::mem::take(&mut s.failures);
    for f in &failed {
        remove_member(target, f.member.as_bytes(), f.written)?;
    }
    Ok(RestoreReport {
        extract: report,
        failed,
    })
}

/// Remove the regular file `member` below `root` without following
/// symbolic links, if it is the one the restore wrote (size and mtime as
/// in the snapshot; a file that existed before and was kept is left alone).
fn remove_member(root: &Path, member: &[u8], written: (u64, i64)) -> Result<()> {
    let comps: Vec<&[u8]> = member
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    let Some((leaf, dirs)) = comps.split_last() else {
        return Ok(());
    };
    if comps.contains(&&b".."[..]) {
        return Ok(());
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir: OwnedFd = rustix::fs::open(root, flags, Mode::empty())
        .map_err(|e| Error::io("open", root, e.into()))?;
    for c in dirs {
        dir = match rustix::fs::openat(&dir, *c, flags, Mode::empty()) {
            Ok(d) => d,
            Err(_) => return Ok(()),
        };
    }
    let Ok(st) = rustix::fs::statat(&dir, *leaf, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else {
        return Ok(());
    };
    #[allow(clippy::unnecessary_cast)]
    let ours = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
        && u64::try_from(st.st_size).ok() == Some(written.0)
        && st.st_mtime as i64 == written.1;
    if !ours {
        return Ok(());
    }
    match rustix::fs::unlinkat(&dir, *leaf, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::io(
            "remove",
            root.join(String::from_utf8_lossy(member).as_ref()),
            e.into(),
        )),
    }
}

/// Write the snapshot as a `.tar.zst` archive (as vzdump writes it).
/// `out` may be a pipe or a character device (`/dev/stdout`): it is then
/// written to, but not synced.
///
/// # Errors
/// Damaged chunks (naming the file), write errors. A partial output is
/// removed if it is a regular file named by `out` itself (links and what
/// they point to are left).
pub fn export(store: &Store, snap: &SnapshotRef, out: &Path, level: i32) -> Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let mut s = TarStream::open(store, snap, true)?;
    let sync = std::fs::metadata(out)
        .map(|m| m.file_type())
        .map_or(true, |t| {
            !(t.is_fifo() || t.is_socket() || t.is_char_device())
        });
    let regular = std::fs::symlink_metadata(out).map_or(true, |m| m.is_file());
    // Only once it is opened (truncated) by this export.
    let mut remove = false;
    let res = (|| {
        let f = std::fs::File::create(out).map_err(|e| Error::io("create", out, e))?;
        remove = regular;
        let mut enc = zstd::stream::write::Encoder::new(f, level)
            .map_err(|e| Error::io("compress", out, e))?;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let _ = enc.multithread(u32::try_from(threads).unwrap_or(1));
        let n = io::copy(&mut s, &mut enc).map_err(|e| Error::io("export to", out, e))?;
        let f = enc.finish().map_err(|e| Error::io("write", out, e))?;
        if sync {
            f.sync_all().map_err(|e| Error::io("fsync", out, e))?;
        }
        Ok(n)
    })();
    if res.is_err() && remove {
        let _ = std::fs::remove_file(out);
    }
    res
}

/// The members at or below `path` (a member name like `./etc` or `etc`;
/// empty: all), in stream order.
///
/// # Errors
/// Missing snapshot, corrupt catalog.
pub fn files(
    store: &Store,
    snap: &SnapshotRef,
    path: &str,
    out: &mut dyn FnMut(&Member) -> Result<()>,
) -> Result<()> {
    let want = normalize(path);
    for m in catalog(store, snap)? {
        let m = m?;
        if under(&m.name, &want) {
            out(&m)?;
        }
    }
    Ok(())
}

fn normalize(path: &str) -> Vec<u8> {
    let p = path
        .trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/');
    if p.is_empty() || p == "." {
        Vec::new()
    } else {
        format!("./{p}").into_bytes()
    }
}

fn under(name: &[u8], want: &[u8]) -> bool {
    if want.is_empty() {
        return true;
    }
    let n = name.strip_suffix(b"/").unwrap_or(name);
    n == want || (n.starts_with(want) && n.get(want.len()) == Some(&b'/'))
}

/// Extract the member `path` (a file or a whole directory) of a snapshot
/// into the directory `dest`, keeping the member's path below it.
///
/// # Errors
/// No such member, extraction errors.
pub fn extract_path(
    store: &Store,
    snap: &SnapshotRef,
    path: &str,
    dest: &Path,
) -> Result<RestoreReport> {
    let want = normalize(path);
    let mut found = false;
    files(store, snap, path, &mut |_| {
        found = true;
        Ok(())
    })?;
    if !found {
        return Err(Error::Invalid(format!(
            "'{path}' not found in snapshot {}",
            snap.name()
        )));
    }
    let opts = ExtractOptions {
        allow_devices: true,
        ..ExtractOptions::default()
    };
    // Hard links to members outside the selection cannot be made; their
    // data is in the first name only.
    let mut names: HashSet<Vec<u8>> = HashSet::new();
    let filter = move |m: &Member| {
        if !under(&m.name, &want) {
            return false;
        }
        if m.kind == MemberKind::HardLink && !m.link.as_ref().is_some_and(|l| names.contains(l)) {
            return false;
        }
        names.insert(m.name.clone());
        true
    };
    restore(store, snap, dest, &opts, Some(Box::new(filter)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ChunkRef;

    /// How many references go into each batch, for `refs` in order.
    fn batch_sizes(refs: &[ChunkRef]) -> Vec<usize> {
        let mut b = Collect::default();
        let mut sizes = Vec::new();
        for c in refs {
            if b.add(c) {
                sizes.push(b.refs.len());
                b = Collect::default();
            }
        }
        sizes.push(b.refs.len());
        sizes
    }

    /// The bytes of a batch's pieces, or its first error.
    fn batch_bytes(b: Batch) -> std::result::Result<Vec<Vec<u8>>, String> {
        b.into_iter()
            .map(|p| match p.map_err(|e| e.to_string())? {
                Piece::Owned(v) => Ok(v),
                Piece::Shared(a, s, e) => Ok(a[s..e].to_vec()),
                Piece::Zeros(n) => Ok(vec![0; n]),
            })
            .collect()
    }

    #[test]
    fn packed_chunks_read_lately_come_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let put = |data: &[u8]| {
            let d = *blake3::hash(data).as_bytes();
            store.insert_chunk(&d, data, 3, "t").unwrap();
            ChunkRef::whole(d, data.len() as u32).with_check(crate::catalog::check_of(data))
        };
        let pack = b"first member|second member".to_vec();
        let p = put(&pack);
        let first = ChunkRef { used: 12, ..p };
        let second = ChunkRef {
            offset: 13,
            used: 13,
            ..p
        };
        let big = put(&[7; 3000]);
        let (free, cache) = (FreeBuffers::default(), ChunkCache::default());
        let mut comp = Vec::new();
        // A large file between the members packed together: the pack chunk is read once.
        let b = read_slices(&store, &[first, big], &mut comp, &free, &cache);
        assert_eq!(batch_bytes(b).unwrap(), [&pack[..12], &[7; 3000][..]]);
        std::fs::remove_file(store.chunk_path(&p.digest)).unwrap();
        let b = read_slices(&store, &[big, second], &mut comp, &free, &cache);
        assert_eq!(batch_bytes(b).unwrap(), [&[7; 3000][..], &pack[13..]]);
        // Not for a reference recording another check: it reads the chunk itself.
        let other = second.with_check(second.check ^ 1);
        let b = read_slices(&store, &[other], &mut comp, &free, &cache);
        assert!(batch_bytes(b).unwrap_err().contains("cannot read"));
        // Whole chunks of large files are not kept: read again (and missing now).
        std::fs::remove_file(store.chunk_path(&big.digest)).unwrap();
        let b = read_slices(&store, &[big], &mut comp, &free, &cache);
        assert!(batch_bytes(b).unwrap_err().contains("cannot read"));
        // Packed chunks beyond the cache's capacity push out the least recently used.
        let chunk = |n: u16| n.to_le_bytes().repeat(32 << 10);
        let others: Vec<ChunkRef> = (0..(CACHE_BYTES >> 16) as u16)
            .map(|n| ChunkRef {
                used: 2,
                ..put(&chunk(n))
            })
            .collect();
        for o in &others {
            assert!(batch_bytes(read_slices(&store, &[*o], &mut comp, &free, &cache)).is_ok());
        }
        let b = read_slices(&store, &[second], &mut comp, &free, &cache);
        assert!(batch_bytes(b).unwrap_err().contains("cannot read"));
        let last = others[others.len() - 1];
        std::fs::remove_file(store.chunk_path(&last.digest)).unwrap();
        let b = read_slices(&store, &[last], &mut comp, &free, &cache);
        assert_eq!(
            batch_bytes(b).unwrap(),
            [&chunk(others.len() as u16 - 1)[..2]]
        );
    }

    #[test]
    fn batches_close_by_chunks_and_bytes_of_whole_chunks() {
        let d = |n: u8| [n; 32];
        // A run of one repeated 1 MiB chunk (a file of zeros): four references a batch.
        let zeros = vec![ChunkRef::whole(d(0), 1 << 20); 1000];
        assert_eq!(batch_sizes(&zeros), [vec![4; 250], vec![0]].concat());
        // A repeated small chunk: closed by the bytes used.
        let small = vec![ChunkRef::whole(d(0), 4096); 5000];
        assert_eq!(batch_sizes(&small), [1024, 1024, 1024, 1024, 904]);
        // Distinct small chunks: 256 a batch.
        let distinct: Vec<_> = (0..1024)
            .map(|n: u32| {
                let mut x = [0; 32];
                x[..4].copy_from_slice(&n.to_le_bytes());
                ChunkRef::whole(x, 4096)
            })
            .collect();
        assert_eq!(batch_sizes(&distinct), [256, 256, 256, 256, 0]);
        // Members using 100 bytes each of distinct 2 MiB packed chunks: the whole chunk
        // counts, two a batch.
        let packed: Vec<_> = (0..6)
            .map(|n| ChunkRef {
                digest: d(n),
                len: 2 << 20,
                offset: 0,
                used: 100,
                check: 0,
            })
            .collect();
        assert_eq!(batch_sizes(&packed), [2, 2, 2, 0]);
    }
}
