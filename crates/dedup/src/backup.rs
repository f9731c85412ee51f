//! Writing a snapshot: the tree walker of `vzkit-archive` feeds a
//! [`TreeSink`] that chunks file data, hashes each chunk (blake3) on the
//! walking thread (files of 8 MiB or more on a second thread, while the
//! walking thread reads them) and hands new chunks to a bounded pool of
//! threads that compress (zstd) and write them. Unchanged files (see the crate docs)
//! reuse the previous snapshot's entry and chunk list without being
//! opened.
//!
//! Files of at least [`BackupOptions::pack_below`] bytes (and sparse files)
//! are chunked on their own, so that a copied or renamed large file
//! deduplicates from its first byte. Smaller files are packed: their data
//! is appended to one pack stream per backup, which is cut by the same
//! content-defined chunker, and each of them refers to its slice of one
//! or two pack chunks. One chunk file per small file would make creating
//! chunk files (inodes) the largest cost of a first backup of a container
//! tree, most of whose files are small. Catalog records wait in a bounded
//! queue until the pack chunk holding the end of their data is cut (a cut
//! is forced when the queue is full), so the catalog stays in stream
//! order. Unchanged small files keep referring to the chunks they were
//! packed into; changed ones are packed anew.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vzkit_archive::direct::DirectImage;
use vzkit_archive::header::{self, MemberHeader};
use vzkit_archive::prefetch::{Prefetcher, StopOnDrop};
use vzkit_archive::writer::trailer;
use vzkit_archive::{
    ArchiveError, ExcludeSet, FileData, IdMap, MemberKind, StatKey, TreeSink, Walker,
};

use crate::catalog::{
    CatalogReader, CatalogWriter, ChunkRef, DATA_TREE, Member, check_of, walk_order,
};
use crate::chunker::{ChunkSizes, Chunker, Hint};
use crate::error::{Error, Result};
use crate::ext4scan::InodeTable;
use crate::snapshot::{self, SnapshotRef, TreeSource};
use crate::store::{LockFile, SnapshotLock, Store, Writer};

/// zstd level of chunks: 1, as Proxmox Backup Server uses. Measured on the
/// 1.23 GB benchmark tree (31,086 files, store on a journaled ext4, three
/// rounds each): a first backup took 2.95–3.10 s and 3.05–3.25 s of user
/// CPU at level 1 against 3.53–4.76 s and 4.14–4.31 s at level 3, for
/// 554.3 MB of chunk files instead of 537.8 MB (3.1% more).
pub const CHUNK_LEVEL: i32 = 1;

/// How unchanged files are recognized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChangeDetection {
    /// Reuse a file's chunk list if its stat key matches (crate docs).
    #[default]
    Metadata,
    /// Read and chunk every file.
    Data,
}

impl std::str::FromStr for ChangeDetection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "metadata" => Ok(ChangeDetection::Metadata),
            "data" => Ok(ChangeDetection::Data),
            _ => Err(Error::Invalid(format!(
                "invalid change detection mode '{s}' (expected 'metadata' or 'data')"
            ))),
        }
    }
}

/// Options of a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The backup group (container id).
    pub vmid: u32,
    /// Snapshot time (seconds since the epoch); now if `None`.
    pub time: Option<i64>,
    /// Change detection mode.
    pub change_detection: ChangeDetection,
    /// Chunk size limits.
    pub chunk_sizes: ChunkSizes,
    /// zstd level of chunks (default [`CHUNK_LEVEL`]).
    pub level: i32,
    /// Compressing threads (0: one per CPU).
    pub threads: usize,
    /// Host → container id map (unprivileged containers).
    pub id_map: Option<IdMap>,
    /// Regular files smaller than this are packed into shared chunks (see
    /// the module docs); 0 gives every file chunks of its own.
    pub pack_below: u64,
    /// Limit of file data read, bytes per second (0: none).
    pub bwlimit: u64,
    /// When set, the backup stops at the next file or read with an error
    /// (a signal was received).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl BackupOptions {
    /// Defaults for container `vmid`.
    #[must_use]
    pub fn new(vmid: u32) -> Self {
        BackupOptions {
            vmid,
            time: None,
            change_detection: ChangeDetection::Metadata,
            chunk_sizes: ChunkSizes::default(),
            level: CHUNK_LEVEL,
            threads: 0,
            id_map: None,
            pack_below: ChunkSizes::default().min as u64,
            bwlimit: 0,
            cancel: None,
        }
    }
}

/// Counters of a backup.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BackupStats {
    /// Members in the catalog.
    pub members: u64,
    /// Regular files.
    pub files: u64,
    /// Regular files whose content was read.
    pub files_read: u64,
    /// Regular files whose chunk list was reused unread.
    pub files_reused: u64,
    /// Trees taken over whole from the base: their volume image is
    /// unchanged, so they were not walked.
    pub trees_reused: u64,
    /// Directories taken over with everything below them, unopened: the
    /// volume's inode table shows none of their inodes changed.
    pub dirs_reused: u64,
    /// Members taken over unstatted by the inode table (those directories
    /// and everything below them, and unchanged entries of the walked
    /// directories).
    pub entries_reused: u64,
    /// File content bytes read.
    pub bytes_read: u64,
    /// Of the bytes read, those read straight from the volume image
    /// ([`VolumeInfo::image`]).
    pub bytes_direct: u64,
    /// Bytes of changed files found still in their base chunks: hashed,
    /// not cut (see [`crate::chunker::Hint`]).
    pub bytes_matched: u64,
    /// Chunk references.
    pub chunks: u64,
    /// Chunks newly written.
    pub chunks_new: u64,
    /// Uncompressed bytes of new chunks.
    pub bytes_new: u64,
    /// Compressed bytes of new chunks.
    pub bytes_new_compressed: u64,
    /// Size of the tar stream the snapshot stands for.
    pub logical_size: u64,
    /// Warnings of the walk (files vanished, changed while read, …).
    pub warnings: Vec<String>,
}

type Job = ([u8; 32], Vec<u8>);

struct Pool {
    tx: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    error: Arc<Mutex<Option<Error>>>,
    new_chunks: Arc<AtomicU64>,
    new_bytes: Arc<AtomicU64>,
    new_comp: Arc<AtomicU64>,
}

impl Pool {
    fn new(store: &Store, n: usize, level: i32, tag: &str) -> Pool {
        let (tx, rx) = sync_channel::<Job>(2 * n);
        let rx = Arc::new(Mutex::new(rx));
        let error = Arc::new(Mutex::new(None));
        let new_chunks = Arc::new(AtomicU64::new(0));
        let new_bytes = Arc::new(AtomicU64::new(0));
        let new_comp = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let error = Arc::clone(&error);
                let (nc, nb, ncomp) = (
                    Arc::clone(&new_chunks),
                    Arc::clone(&new_bytes),
                    Arc::clone(&new_comp),
                );
                let store = store.clone();
                let tag = tag.to_string();
                std::thread::spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok((d, data)) = job else { return };
                        match store.insert_chunk(&d, &data, level, &tag) {
                            Ok(0) => {}
                            Ok(c) => {
                                nc.fetch_add(1, Ordering::Relaxed);
                                nb.fetch_add(data.len() as u64, Ordering::Relaxed);
                                ncomp.fetch_add(c, Ordering::Relaxed);
                            }
                            Err(e) => {
                                if let Ok(mut slot) = error.lock() {
                                    slot.get_or_insert(e);
                                }
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        Pool {
            tx: Some(tx),
            threads,
            error,
            new_chunks,
            new_bytes,
            new_comp,
        }
    }

    fn take_error(&self) -> Option<Error> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    fn send(&self, job: Job) -> Result<()> {
        if let Some(e) = self.take_error() {
            return Err(e);
        }
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if sent {
            Ok(())
        } else {
            Err(self
                .take_error()
                .unwrap_or_else(|| Error::Invalid("chunk writer threads stopped".into())))
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match self.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The previous snapshot's catalog, read along with the walk.
struct PrevCursor {
    cat: CatalogReader,
    peeked: Option<Member>,
    /// The previous snapshot was walked with the same id map: its whole
    /// entries (owners, ACLs, capabilities as mapped) may be reused.
    same_id_map: bool,
    /// The previous snapshot's file data was cut with the same sizes: its
    /// chunk lists may guide the chunking of changed files.
    same_chunking: bool,
    /// The entry last looked up for a file offered unopened and not
    /// reused (looked up again when the file is read).
    held: Option<Member>,
    /// Chunks verification found bad or missing: checked (and written
    /// again if missing) before an entry using them is reused.
    suspect: HashSet<[u8; 32]>,
}

impl PrevCursor {
    /// The entry of `name` in `tree`, if any.
    fn find(&mut self, tree: u32, name: &[u8]) -> Result<Option<Member>> {
        if let Some(h) = self.held.take()
            && h.tree == tree
            && h.name == name
        {
            return Ok(Some(h));
        }
        self.lookup(tree, name)
    }

    fn lookup(&mut self, tree: u32, name: &[u8]) -> Result<Option<Member>> {
        loop {
            if self.peeked.is_none() {
                self.peeked = self.cat.next_member()?;
            }
            let Some(p) = &self.peeked else {
                return Ok(None);
            };
            if p.tree != tree {
                if p.tree == DATA_TREE || p.tree < tree {
                    self.peeked = None;
                    continue;
                }
                return Ok(None);
            }
            match walk_order(&p.name, name) {
                std::cmp::Ordering::Less => self.peeked = None,
                std::cmp::Ordering::Equal => return Ok(self.peeked.take()),
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
    }
}

/// A small file's data in the pack stream; `end` is `None` while the
/// file is being read.
struct Span {
    seq: u64,
    start: u64,
    end: Option<u64>,
}

/// The pack stream of small files' data.
struct Pack {
    chunker: Chunker,
    /// Bytes pushed so far.
    pos: u64,
    /// Stream offset of the chunk being filled.
    cut: u64,
    /// Files with data in the chunk being filled, in stream order.
    spans: VecDeque<Span>,
}

/// Catalog records waiting for the pack chunk that ends their data; a
/// record is written once it and all before it are complete.
#[derive(Default)]
struct Queue {
    members: VecDeque<(Member, bool)>,
    /// Sequence number of the first queued record.
    base: u64,
}

/// The identity of a volume's image file: while it stays the same, the
/// file system in it is unchanged (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeKey {
    /// Device of the file system holding the image.
    pub dev: u64,
    /// Inode number of the image.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
}

/// Local file systems on which every write to a file, through any path
/// (`write`, loop devices with or without direct I/O, `mmap`), updates its
/// ctime: ext2/3/4, xfs, btrfs, tmpfs, zfs. Network and FUSE file systems
/// (where another client or a daemon may write) are not trusted.
const TRUSTED_FS: [u64; 5] = {
    use vzkit_host::mount::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC, ZFS_SUPER_MAGIC,
    };
    [
        EXT4_SUPER_MAGIC,
        XFS_SUPER_MAGIC,
        BTRFS_SUPER_MAGIC,
        TMPFS_MAGIC,
        ZFS_SUPER_MAGIC,
    ]
};

impl VolumeKey {
    /// The key of the image file at `path`: `None` unless it is a regular
    /// file on a trusted local file system.
    #[must_use]
    pub fn of_image(path: &Path) -> Option<VolumeKey> {
        let magic = vzkit_host::mount::fs_magic(path).ok()?;
        if !TRUSTED_FS.contains(&magic) {
            return None;
        }
        let st = rustix::fs::lstat(path).ok()?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return None;
        }
        let k = StatKey::from_stat(&st);
        Some(VolumeKey {
            dev: k.dev,
            ino: k.ino,
            size: k.size,
            mtime_ns: k.mtime_ns,
            ctime_ns: k.ctime_ns,
        })
    }
}

/// The fingerprint of a tree's walk parameters ([`TreeSource::fingerprint`]).
fn tree_fingerprint(
    prefix: &str,
    excludes: &ExcludeSet,
    one_file_system: bool,
    id_map: Option<&IdMap>,
    context: &str,
) -> String {
    let text = format!(
        "{prefix}\0{excludes:?}\0{one_file_system}\0{}\0{context}",
        snapshot::id_map_name(id_map)
    );
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// What is known of the volume a tree is mounted from
/// ([`Backup::add_volume_tree`]).
#[derive(Debug, Default)]
pub struct VolumeInfo {
    /// The image key ([`VolumeKey::of_image`]), taken before the volume
    /// was mounted read-only.
    pub key: Option<VolumeKey>,
    /// The inode table of the file system in the image
    /// ([`crate::ext4scan::scan`]), read before it was mounted (the
    /// container stopped): directories whose inodes and all inodes below
    /// them match the base snapshot's records are taken over unwalked. The
    /// caller vouches that the image stays as scanned until the walk ends:
    /// not mounted or written anywhere else (vzdump holds the container's
    /// lock) and on a local file system where no other client can write it
    /// (vzdump scans only images with a [`VolumeKey`]).
    pub inodes: Option<InodeTable>,
    /// Everything else the walk's result depends on: for a container,
    /// every source tree with its volume key, since a tree's walk stops
    /// at the mount points nested in it and records their roots.
    pub context: String,
    /// The layout of the trees: every source tree's member prefix
    /// (without volume keys).
    pub layout: String,
    /// The image file the tree's file system is mounted from (read-only,
    /// through a loop device), which held a cleanly unmounted file system
    /// when it was mounted: the caller vouches for that (vzdump checks
    /// [`crate::ext4scan::is_clean`]; [`VolumeInfo::inodes`] implies it).
    /// File data is read straight from the image ([`vzkit_archive::direct`],
    /// which checks the mount itself): one copy less than through the loop
    /// device.
    pub image: Option<PathBuf>,
}

/// Which entries of a tree a walk may take over from the base snapshot
/// unstatted, from the base's records and the volume's inode table (see the
/// crate docs).
#[derive(Debug)]
struct Guide {
    table: InodeTable,
    /// Device of the mounted tree: records taken over get it, so that the
    /// next backup sees them on the tree's own file system.
    dev: u64,
    /// Device the base's records of the tree's own file system show.
    base_dev: u64,
    /// Directories (member names without the trailing slash) that are
    /// changed themselves or have a changed inode below them.
    dirty: HashSet<Vec<u8>>,
}

/// The stat key the inode table shows for the inode of `key` (device and
/// inode number from `key`).
fn scanned_key(i: &crate::ext4scan::InodeInfo, key: &StatKey) -> StatKey {
    StatKey {
        size: i.size,
        mtime_ns: i.mtime_ns,
        ctime_ns: i.ctime_ns,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        ..*key
    }
}

/// Directories beyond which a tree is walked without a guide (memory).
const DIRTY_MAX: usize = 1 << 20;

/// The parent of a member name (`./a/b` → `./a`); `None` for the root.
fn parent(name: &[u8]) -> Option<&[u8]> {
    let i = name.iter().rposition(|&c| c == b'/')?;
    Some(&name[..i])
}

impl Guide {
    /// Read the base catalog's records of `tree` against `table`: every
    /// record that is not [`Guide::clean`] makes its parent directories
    /// dirty, and itself if it is a directory. `None` if the base cannot
    /// guide this walk (a record without key: written before keys were
    /// kept for all members), or if the mounted tree's root (`root`, its
    /// `stat`) is not the inode the table shows.
    fn build(cat: &Path, tree: u32, table: InodeTable, root: &StatKey) -> Result<Option<Guide>> {
        let mounted = table
            .get(root.ino)
            .is_some_and(|i| same_key(root, &scanned_key(&i, root)));
        if !mounted {
            return Ok(None);
        }
        let mut r = CatalogReader::open(cat)?;
        let mut g = Guide {
            table,
            dev: root.dev,
            base_dev: 0,
            dirty: HashSet::new(),
        };
        let mut root: Option<Vec<u8>> = None;
        while let Some(m) = r.next_member()? {
            if m.tree != tree {
                if m.tree != DATA_TREE && m.tree > tree {
                    break;
                }
                continue;
            }
            let Some(k) = m.key else {
                return Ok(None);
            };
            let name = m.name.strip_suffix(b"/").unwrap_or(&m.name);
            let Some(root_name) = &root else {
                // The tree's root comes first; it is always walked.
                root = Some(name.to_vec());
                g.base_dev = k.dev;
                continue;
            };
            if g.clean(&m) {
                continue;
            }
            let mut at = if m.kind == MemberKind::Directory {
                Some(name)
            } else {
                parent(name)
            };
            while let Some(d) = at {
                if !g.dirty.insert(d.to_vec()) || d == root_name.as_slice() {
                    break;
                }
                at = parent(d);
            }
            if g.dirty.len() > DIRTY_MAX {
                return Ok(None);
            }
        }
        Ok(root.map(|_| g))
    }

    /// The base record `p` describes its inode as the table shows it now:
    /// not racy, on the tree's own file system, same mode, owners, size,
    /// mtime and ctime; for anything but a directory, one link (the walk
    /// must see every name of an inode with several).
    fn clean(&self, p: &Member) -> bool {
        let Some(k) = p.key else {
            return false;
        };
        !p.racy
            && k.dev == self.base_dev
            && self.table.get(k.ino).is_some_and(|i| {
                same_key(&k, &scanned_key(&i, &k))
                    && (p.kind == MemberKind::Directory
                        || (i.nlink == 1 && p.kind != MemberKind::HardLink))
            })
    }

    /// Whether the entry `member` with inode `ino` (from the directory
    /// listing) may be taken over from its base record `p` unstatted (with
    /// everything below it, for a directory). Files stored sparse are
    /// left to the walk (which checks they still have holes).
    fn takes(&self, member: &[u8], ino: u64, p: &Member) -> bool {
        p.key.is_some_and(|k| k.ino == ino)
            && p.sparse.is_none()
            && !self.dirty.contains(member)
            && self.clean(p)
    }
}

/// How far (allocated bytes) the read-ahead thread may run ahead of the reads.
const PREFETCH_WINDOW: u64 = 64 << 20;

/// Two stat keys of the same unchanged inode: all fields but the device
/// (snapshot mounts get a new one each time) equal.
fn same_key(a: &StatKey, b: &StatKey) -> bool {
    a.ino == b.ino
        && a.size == b.size
        && a.mtime_ns == b.mtime_ns
        && a.ctime_ns == b.ctime_ns
        && a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
}

/// The reuse rule (see the crate docs): the earlier entry `p` is a regular
/// file that was not racy, with the same stat key.
fn unchanged(p: &Member, key: &StatKey) -> bool {
    p.kind == MemberKind::Regular && !p.racy && p.key.is_some_and(|pk| same_key(&pk, key))
}

/// Whether the walk will read file `member` of `tree` with this key: false
/// if the base shows it unchanged (read-ahead skips such files).
fn will_read(base: &mut PrevCursor, tree: u32, member: &[u8], key: &StatKey) -> bool {
    !matches!(base.find(tree, member), Ok(Some(p)) if unchanged(&p, key))
}

/// Paces reads to a rate: sleeps until the time the bytes so far are due.
struct RateLimit {
    rate: u64,
    start: Instant,
    read: u64,
}

/// Chunks a backup remembers as present or queued, so that it touches or
/// checks each only once (see [`crate::MEMO_MAX`]).
const SEEN_MAX: usize = crate::MEMO_MAX;

/// Queued records beyond which the pack chunk being filled is cut early.
const QUEUE_MAX: usize = 16_384;

/// Everything of a running backup except the walker.
struct State {
    store: Store,
    opts: BackupOptions,
    catalog: CatalogWriter,
    prev: Option<PrevCursor>,
    tree: u32,
    seen: HashSet<[u8; 32]>,
    pool: Pool,
    chunker: Chunker,
    pack: Pack,
    queue: Queue,
    /// [`QUEUE_MAX`] (smaller in tests).
    queue_max: usize,
    /// [`SEEN_MAX`] (smaller in tests).
    seen_max: usize,
    limit: Option<RateLimit>,
    /// File bytes read so far (the read-ahead thread stays near it).
    consumed: Arc<AtomicU64>,
    /// The catalog of the base snapshot (metadata change detection).
    base_catalog: Option<PathBuf>,
    /// The base snapshot's source trees (metadata change detection).
    base_trees: Vec<TreeSource>,
    /// This backup's source trees.
    trees: Vec<TreeSource>,
    /// The guide of the tree being walked, if any.
    guide: Option<Arc<Guide>>,
    stats: BackupStats,
    start_ns: i64,
}

/// Files changed within this time before the backup started may change
/// again without a visible ctime change (timestamp granularity); they are
/// not trusted by the next backup.
const RACY_NS: i64 = 1_000_000_000;

impl State {
    /// An error if the backup was cancelled.
    fn check_cancel(&self) -> Result<()> {
        if self
            .opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(Error::Invalid("interrupted by signal".into()));
        }
        Ok(())
    }

    /// Account `n` bytes read: wait as the rate limit asks (checking for
    /// cancellation meanwhile).
    fn throttle(&mut self, n: usize) -> Result<()> {
        self.consumed.fetch_add(n as u64, Ordering::Relaxed);
        self.check_cancel()?;
        let Some(l) = self.limit.as_mut() else {
            return Ok(());
        };
        l.read += n as u64;
        let due = l.start + Duration::from_secs_f64(l.read as f64 / l.rate as f64);
        loop {
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
            self.check_cancel()?;
        }
    }

    /// Take over every record of `tree` from the base (the tree is
    /// unchanged, see [`Backup::add_volume_tree`]).
    fn copy_tree(&mut self, tree: u32) -> Result<()> {
        loop {
            let Some(mut m) = self.next_base_if(|p| p.tree == DATA_TREE || p.tree <= tree)? else {
                return Ok(());
            };
            if m.tree != tree {
                continue;
            }
            m.tree = self.tree;
            if m.kind == MemberKind::Regular {
                self.stats.files += 1;
                self.stats.files_reused += 1;
            }
            self.stats.chunks += m.chunks.len() as u64;
            self.emit(m)?;
        }
    }

    /// Take over the base record of `member` (inode `ino`) unstatted, and
    /// for a directory every record below it, if the guide allows (see
    /// [`Guide`]).
    fn take_unstatted(&mut self, member: &[u8], ino: u64) -> Result<bool> {
        let Some(g) = self.guide.clone() else {
            return Ok(false);
        };
        let tree = self.tree;
        let Some(prev) = self.prev.as_mut() else {
            return Ok(false);
        };
        let Some(p) = prev.find(tree, member)? else {
            return Ok(false);
        };
        if !g.takes(member, ino, &p) {
            // Looked up again when the walk offers the entry.
            prev.held = Some(p);
            return Ok(false);
        }
        let dir = p.kind == MemberKind::Directory;
        self.take_record(p, g.dev)?;
        if !dir {
            return Ok(true);
        }
        let mut below = member.to_vec();
        below.push(b'/');
        while let Some(m) = self.next_base_if(|p| p.tree == tree && p.name.starts_with(&below))? {
            self.take_record(m, g.dev)?;
        }
        Ok(true)
    }

    /// The base's next record if `take` accepts it; else it stays next.
    fn next_base_if(&mut self, take: impl Fn(&Member) -> bool) -> Result<Option<Member>> {
        let Some(prev) = self.prev.as_mut() else {
            return Ok(None);
        };
        if prev.peeked.is_none() {
            prev.peeked = prev.cat.next_member()?;
        }
        Ok(if prev.peeked.as_ref().is_some_and(take) {
            prev.peeked.take()
        } else {
            None
        })
    }

    /// Write a record taken over from the base, counting it; its key gets
    /// the device of the tree's file system as mounted now.
    fn take_record(&mut self, mut m: Member, dev: u64) -> Result<()> {
        if let Some(k) = m.key.as_mut() {
            k.dev = dev;
        }
        match m.kind {
            MemberKind::Regular => {
                self.stats.files += 1;
                self.stats.files_reused += 1;
            }
            MemberKind::Directory => self.stats.dirs_reused += 1,
            _ => {}
        }
        self.stats.entries_reused += 1;
        self.stats.chunks += m.chunks.len() as u64;
        self.emit(m)
    }

    /// Count a record of the snapshot and its share of the tar stream.
    fn count(&mut self, m: &Member) -> Result<()> {
        self.stats.members += 1;
        self.stats.logical_size += m.stream_len()?;
        Ok(())
    }

    /// Write a complete record, after the queued ones.
    fn emit(&mut self, m: Member) -> Result<()> {
        self.count(&m)?;
        if self.queue.members.is_empty() {
            self.catalog.push(&m)
        } else {
            self.queue.members.push_back((m, true));
            self.drain_queue()
        }
    }

    /// Write the complete records at the head of the queue.
    fn drain_queue(&mut self) -> Result<()> {
        self.write_done()?;
        if self.queue.members.len() >= self.queue_max {
            self.cut_pack()?;
        }
        Ok(())
    }

    /// Write the queued records up to the first incomplete one.
    fn write_done(&mut self) -> Result<()> {
        while self.queue.members.front().is_some_and(|(_, done)| *done) {
            if let Some((m, _)) = self.queue.members.pop_front() {
                self.catalog.push(&m)?;
                self.queue.base += 1;
            }
        }
        Ok(())
    }

    /// Remember a chunk as present or queued (see [`SEEN_MAX`]); false if
    /// it was known.
    fn see(&mut self, d: [u8; 32]) -> bool {
        if self.seen.len() >= self.seen_max {
            self.seen.clear();
        }
        self.seen.insert(d)
    }

    /// Queue a chunk (with its digest `d`) for writing unless known.
    fn store_chunk(&mut self, data: &[u8], d: &[u8; 32]) -> Result<()> {
        if self.see(*d) && !self.store.touch_chunk(d)? {
            self.pool.send((*d, data.to_vec()))?;
        }
        Ok(())
    }

    fn add_chunk(&mut self, data: &[u8], d: &[u8; 32], out: &mut Vec<ChunkRef>) -> Result<()> {
        self.store_chunk(data, d)?;
        out.push(
            ChunkRef::whole(*d, u32::try_from(data.len()).unwrap_or(u32::MAX))
                .with_check(check_of(data)),
        );
        self.stats.chunks += 1;
        Ok(())
    }

    /// A chunk of the pack stream: the slices of it go to the records of
    /// the files whose data it holds.
    fn pack_chunk(&mut self, data: &[u8], d: &[u8; 32]) -> Result<()> {
        self.store_chunk(data, d)?;
        let d = *d;
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let check = check_of(data);
        let (cs, ce) = (self.pack.cut, self.pack.cut + data.len() as u64);
        self.pack.cut = ce;
        while let Some(sp) = self.pack.spans.front() {
            let (seq, start, end) = (sp.seq, sp.start.max(cs), sp.end);
            let stop = end.map_or(ce, |e| e.min(ce));
            if stop > start {
                let Some((m, _)) = self.queued(seq) else {
                    return Err(Error::Invalid("pack stream out of order".into()));
                };
                m.chunks.push(ChunkRef {
                    digest: d,
                    len,
                    offset: u32::try_from(start - cs).unwrap_or(u32::MAX),
                    used: u32::try_from(stop - start).unwrap_or(u32::MAX),
                    check,
                });
                self.stats.chunks += 1;
            }
            if end.is_some_and(|e| e <= ce) {
                self.pack.spans.pop_front();
                self.complete(seq);
            } else {
                break;
            }
        }
        Ok(())
    }

    /// The queued record with sequence number `seq`.
    fn queued(&mut self, seq: u64) -> Option<&mut (Member, bool)> {
        let i = usize::try_from(seq.checked_sub(self.queue.base)?).ok()?;
        self.queue.members.get_mut(i)
    }

    fn complete(&mut self, seq: u64) {
        if let Some((_, done)) = self.queued(seq) {
            *done = true;
        }
    }

    /// Cut the pack stream here (end of the backup, or a full queue).
    fn cut_pack(&mut self) -> Result<()> {
        let mut ch = std::mem::replace(&mut self.pack.chunker, Chunker::new(self.opts.chunk_sizes));
        let r = ch.finish(&mut |c, d| self.pack_chunk(c, d));
        self.pack.chunker = ch;
        r?;
        // Only spans of files still being read can remain.
        if self.pack.spans.iter().any(|s| s.end.is_some()) {
            return Err(Error::Invalid("pack stream left a file unfinished".into()));
        }
        self.write_done()
    }

    /// Read a small file into the pack stream; its record waits in the
    /// queue until its last byte is in a cut chunk.
    fn pack_file(&mut self, m: Member, data: &mut FileData<'_>) -> Result<()> {
        self.count(&m)?;
        let seq = self.queue.base + self.queue.members.len() as u64;
        self.queue.members.push_back((m, false));
        self.pack.spans.push_back(Span {
            seq,
            start: self.pack.pos,
            end: None,
        });
        let mut ch = std::mem::replace(&mut self.pack.chunker, Chunker::new(self.opts.chunk_sizes));
        let mut err: Option<Error> = None;
        let r = data.read(&mut |b| {
            self.pack.pos += b.len() as u64;
            self.throttle(b.len())
                .and_then(|()| ch.push(b, &mut |c, d| self.pack_chunk(c, d)))
                .map_err(|e| {
                    let msg = e.to_string();
                    err = Some(e);
                    ArchiveError::Stream(std::io::Error::other(msg))
                })
        });
        self.pack.chunker = ch;
        if let Err(e) = r {
            return Err(err.unwrap_or(Error::Archive(e)));
        }
        let end = self.pack.pos;
        if end <= self.pack.cut {
            self.pack.spans.pop_back();
            self.complete(seq);
        } else if let Some(sp) = self.pack.spans.back_mut() {
            sp.end = Some(end);
        }
        self.drain_queue()
    }

    fn add_bytes(&mut self, data: &[u8]) -> Result<Vec<ChunkRef>> {
        let mut chunks = Vec::new();
        let mut ch = std::mem::replace(&mut self.chunker, Chunker::new(self.opts.chunk_sizes));
        let r = ch
            .push(data, &mut |c, d| self.add_chunk(c, d, &mut chunks))
            .and_then(|()| ch.finish(&mut |c, d| self.add_chunk(c, d, &mut chunks)));
        self.chunker = ch;
        r.map(|()| chunks)
    }

    /// The previous chunk list of an unchanged file, with every chunk
    /// touched; `None` if the file must be read (then the chunk list of a
    /// file chunked on its own guides its chunking, see [`Hint`]).
    fn reusable(&mut self, h: &MemberHeader<'_>, key: &StatKey) -> Result<Option<Vec<ChunkRef>>> {
        if self.opts.change_detection == ChangeDetection::Data {
            return Ok(None);
        }
        let tree = self.tree;
        let Some(prev) = self.prev.as_mut() else {
            return Ok(None);
        };
        let Some(p) = prev.find(tree, h.name)? else {
            return Ok(None);
        };
        let same = unchanged(&p, key)
            && p.size == h.size
            && p.sparse.as_ref().map(|(s, r)| (*s, r.as_slice())) == h.sparse;
        if same && self.keep_chunks(&p.chunks)? {
            return Ok(Some(p.chunks));
        }
        // A changed file chunked on its own: its base chunks guide the
        // chunker to what is still the same (see [`Hint`]).
        let same_chunking = self.prev.as_ref().is_some_and(|b| b.same_chunking);
        if same_chunking
            && h.size >= self.opts.pack_below
            && h.sparse.is_none()
            && p.sparse.is_none()
            && p.chunks.len() > 1
            && p.chunks.iter().all(ChunkRef::is_whole)
        {
            self.chunker
                .set_hint(Hint::new(p.chunks.iter().map(|c| (c.digest, c.len))));
        }
        Ok(None)
    }

    /// The whole previous entry of an unchanged file, offered before it
    /// is opened (see the crate docs); `None` if the file must be opened.
    fn unopened(
        &mut self,
        member: &[u8],
        key: &StatKey,
        may_be_sparse: bool,
    ) -> Result<Option<vzkit_archive::Reused>> {
        if self.opts.change_detection == ChangeDetection::Data {
            return Ok(None);
        }
        let tree = self.tree;
        let Some(prev) = self.prev.as_mut() else {
            return Ok(None);
        };
        if !prev.same_id_map {
            return Ok(None);
        }
        let Some(p) = prev.find(tree, member)? else {
            return Ok(None);
        };
        let same = unchanged(&p, key)
            // A file written sparse has fewer blocks than its size.
            && (p.sparse.is_none() || may_be_sparse);
        if !same || !self.keep_chunks(&p.chunks)? {
            if let Some(prev) = self.prev.as_mut() {
                prev.held = Some(p);
            }
            return Ok(None);
        }
        let mut m = p;
        m.key = Some(*key);
        m.racy = self.is_racy(key);
        self.stats.files += 1;
        self.stats.files_reused += 1;
        self.stats.chunks += m.chunks.len() as u64;
        let r = vzkit_archive::Reused {
            data_size: m.size,
            sparse: m.sparse.is_some(),
        };
        self.emit(m)?;
        Ok(Some(r))
    }

    fn is_racy(&self, key: &StatKey) -> bool {
        key.ctime_ns >= self.start_ns - RACY_NS || key.mtime_ns >= self.start_ns - RACY_NS
    }

    /// Chunks of a list reused from the base snapshot need no touch: the
    /// base is locked against removal for the whole backup, so every
    /// garbage collection marks them (see [`crate::gc`]). Only chunks
    /// verification reported bad or missing are checked; false if one is
    /// missing (the file is then read and the chunk written again).
    fn keep_chunks(&mut self, chunks: &[ChunkRef]) -> Result<bool> {
        let Some(prev) = self.prev.as_ref() else {
            return Ok(false);
        };
        for c in chunks {
            if prev.suspect.contains(&c.digest)
                && !self.seen.contains(&c.digest)
                && !self.store.touch_chunk(&c.digest)?
            {
                return Ok(false);
            }
        }
        for c in chunks {
            self.see(c.digest);
        }
        Ok(true)
    }

    fn file_inner(
        &mut self,
        h: &MemberHeader<'_>,
        key: &StatKey,
        data: &mut FileData<'_>,
    ) -> Result<()> {
        let mut m = Member::from_header(h, self.tree);
        m.key = Some(*key);
        m.racy = self.is_racy(key);
        self.stats.files += 1;
        if let Some(chunks) = self.reusable(h, key)? {
            self.stats.files_reused += 1;
            self.stats.chunks += chunks.len() as u64;
            m.chunks = chunks;
        } else if h.size > 0 && h.size < self.opts.pack_below && h.sparse.is_none() {
            self.stats.files_read += 1;
            return self.pack_file(m, data);
        } else if h.size >= PIPELINE_MIN {
            self.stats.files_read += 1;
            m.chunks = self.chunk_pipelined(data)?;
        } else {
            self.stats.files_read += 1;
            let mut chunks = Vec::new();
            let mut err: Option<Error> = None;
            let r = data.read(&mut |b| {
                self.chunk_piece(b, &mut chunks).map_err(|e| {
                    let msg = e.to_string();
                    err = Some(e);
                    ArchiveError::Stream(std::io::Error::other(msg))
                })
            });
            if let Err(e) = r {
                self.chunker = Chunker::new(self.opts.chunk_sizes);
                return Err(err.unwrap_or(Error::Archive(e)));
            }
            m.chunks = self.finish_chunks(chunks)?;
        }
        self.emit(m)
    }

    /// Account, pace and chunk a piece of a large file's data.
    fn chunk_piece(&mut self, b: &[u8], chunks: &mut Vec<ChunkRef>) -> Result<()> {
        self.throttle(b.len())?;
        let mut ch = std::mem::replace(&mut self.chunker, Chunker::new(self.opts.chunk_sizes));
        let r = ch.push(b, &mut |c, d| self.add_chunk(c, d, chunks));
        self.chunker = ch;
        r
    }

    /// Cut the rest of a large file's data.
    fn finish_chunks(&mut self, mut chunks: Vec<ChunkRef>) -> Result<Vec<ChunkRef>> {
        let mut ch = std::mem::replace(&mut self.chunker, Chunker::new(self.opts.chunk_sizes));
        let r = ch.finish(&mut |c, d| self.add_chunk(c, d, &mut chunks));
        self.stats.bytes_matched += ch.take_matched();
        // After an error the fresh chunker stays: nothing of this file is left.
        if r.is_ok() {
            self.chunker = ch;
        }
        r.map(|()| chunks)
    }

    /// Chunk a file of at least [`PIPELINE_MIN`] bytes on a second thread
    /// while this one reads it: reading (copying from the page cache) and
    /// cutting and hashing then overlap. A chunker error stops the reads;
    /// after a read error the chunker drops what it has (an empty piece
    /// marks the clean end of the data: the reader never sends one else).
    fn chunk_pipelined(&mut self, data: &mut FileData<'_>) -> Result<Vec<ChunkRef>> {
        let (tx, rx) = sync_channel::<Vec<u8>>(PIPELINE_DEPTH);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::scope(|sc| {
            let chunker = std::thread::Builder::new()
                .name("dedup-chunk".into())
                .spawn_scoped(sc, move || -> Result<Option<Vec<ChunkRef>>> {
                    let mut chunks = Vec::new();
                    for b in rx {
                        if b.is_empty() {
                            return self.finish_chunks(chunks).map(Some);
                        }
                        if let Err(e) = self.chunk_piece(&b, &mut chunks) {
                            self.chunker = Chunker::new(self.opts.chunk_sizes);
                            return Err(e);
                        }
                        let _ = free_tx.send(b);
                    }
                    self.chunker = Chunker::new(self.opts.chunk_sizes);
                    Ok(None)
                })
                .map_err(|e| Error::io("start a chunking thread for", data.path(), e))?;
            let stopped = || ArchiveError::Stream(std::io::Error::other("chunking stopped"));
            let read = data
                .read(&mut |b| {
                    let mut v = free_rx.try_recv().unwrap_or_default();
                    v.clear();
                    v.extend_from_slice(b);
                    tx.send(v).map_err(|_| stopped())
                })
                .and_then(|()| tx.send(Vec::new()).map_err(|_| stopped()));
            drop(tx);
            let chunked = chunker
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid("chunking thread panicked".into())));
            match (chunked, read) {
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(Error::Archive(e)),
                (Ok(Some(chunks)), Ok(())) => Ok(chunks),
                (Ok(None), Ok(())) => Err(Error::Invalid("file data ended early".into())),
            }
        })
    }
}

/// Files from this size on are chunked on a second thread while being read
/// ([`State::chunk_pipelined`]); smaller ones are not worth a thread.
const PIPELINE_MIN: u64 = 8 << 20;

/// Pieces of file data (up to 256 KiB each) in flight to the chunking thread.
const PIPELINE_DEPTH: usize = 8;

fn to_archive(e: Error) -> ArchiveError {
    match e {
        Error::Archive(a) => a,
        e => ArchiveError::Stream(std::io::Error::other(e.to_string())),
    }
}

impl TreeSink for State {
    fn entry(&mut self, h: &MemberHeader<'_>) -> vzkit_archive::Result<()> {
        let m = Member::from_header(h, self.tree);
        self.check_cancel()
            .and_then(|()| self.emit(m))
            .map_err(to_archive)
    }

    fn keyed_entry(&mut self, h: &MemberHeader<'_>, key: &StatKey) -> vzkit_archive::Result<()> {
        let mut m = Member::from_header(h, self.tree);
        m.key = Some(*key);
        m.racy = self.is_racy(key);
        self.check_cancel()
            .and_then(|()| self.emit(m))
            .map_err(to_archive)
    }

    fn unstatted(&mut self, member: &[u8], ino: u64) -> vzkit_archive::Result<bool> {
        self.check_cancel()
            .and_then(|()| self.take_unstatted(member, ino))
            .map_err(to_archive)
    }

    fn file(
        &mut self,
        h: &MemberHeader<'_>,
        key: &StatKey,
        data: &mut FileData<'_>,
    ) -> vzkit_archive::Result<()> {
        self.file_inner(h, key, data).map_err(to_archive)
    }

    fn file_unopened(
        &mut self,
        member: &[u8],
        key: &StatKey,
        may_be_sparse: bool,
    ) -> vzkit_archive::Result<Option<vzkit_archive::Reused>> {
        self.check_cancel()
            .and_then(|()| self.unopened(member, key, may_be_sparse))
            .map_err(to_archive)
    }
}

/// A backup being written; dropped without [`Backup::finish`], its
/// temporary snapshot directory is removed.
pub struct Backup {
    state: State,
    walker: Walker,
    tmp_dir: PathBuf,
    snap: SnapshotRef,
    config: Option<Vec<u8>>,
    firewall: Option<Vec<u8>>,
    started: Instant,
    _writer: Writer,
    _group_lock: LockFile,
    _base_lock: Option<SnapshotLock>,
    done: bool,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("snapshot", &self.snap)
            .field("tmp_dir", &self.tmp_dir)
            .finish_non_exhaustive()
    }
}

/// The result of a finished backup.
#[derive(Debug, Clone)]
pub struct BackupResult {
    /// The new snapshot.
    pub snapshot: SnapshotRef,
    /// Counters.
    pub stats: BackupStats,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl Backup {
    /// Start a backup of group `opts.vmid`: takes the group lock, registers
    /// the writer and opens the newest complete snapshot of the group as
    /// the reference for change detection.
    ///
    /// # Errors
    /// The group is locked (another backup or prune), the snapshot time
    /// exists already, I/O errors.
    pub fn start(store: &Store, opts: BackupOptions) -> Result<Backup> {
        let gdir = store.group_dir(opts.vmid);
        std::fs::create_dir_all(&gdir).map_err(|e| Error::io("mkdir", &gdir, e))?;
        let group_lock = LockFile::try_lock(
            &gdir.join(".lock"),
            &format!("backup group ct/{}", opts.vmid),
        )?;
        let writer = store.register_writer()?;
        let time = opts.time.unwrap_or(writer.start_ns / 1_000_000_000);
        let snap = SnapshotRef {
            vmid: opts.vmid,
            time,
        };
        let final_dir = snap.path(store);
        if final_dir.exists() {
            return Err(Error::Invalid(format!(
                "snapshot {} already exists",
                snap.name()
            )));
        }
        let prev = snapshot::list(store, Some(opts.vmid))?
            .into_iter()
            .rev()
            .find(|s| s.snapshot.time < time);
        let base_lock = match &prev {
            Some(p) => Some(SnapshotLock::try_lock(
                &p.snapshot.path(store),
                false,
                &format!("snapshot {} is being removed", p.snapshot.name()),
            )?),
            None => None,
        };
        let base_catalog = prev
            .as_ref()
            .filter(|_| opts.change_detection == ChangeDetection::Metadata)
            .map(|p| p.snapshot.path(store).join(snapshot::CATALOG));
        let mut base_trees = Vec::new();
        let prev = match prev {
            Some(p) => {
                let man = snapshot::manifest(store, &p.snapshot)?;
                if opts.change_detection == ChangeDetection::Metadata {
                    base_trees = man.trees;
                }
                Some(PrevCursor {
                    cat: CatalogReader::open(&p.snapshot.path(store).join(snapshot::CATALOG))?,
                    peeked: None,
                    same_id_map: man.id_map == Some(snapshot::id_map_name(opts.id_map.as_ref())),
                    same_chunking: man.chunking == Some(opts.chunk_sizes.name()),
                    held: None,
                    suspect: store.bad_chunks()?,
                })
            }
            None => None,
        };
        let tmp_dir = gdir.join(format!(".tmp-{}", writer.id));
        std::fs::create_dir(&tmp_dir).map_err(|e| Error::io("mkdir", &tmp_dir, e))?;
        let catalog = match CatalogWriter::create(&tmp_dir.join(snapshot::CATALOG)) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp_dir);
                return Err(e);
            }
        };
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            opts.threads
        };
        let pool = Pool::new(store, threads, opts.level, &writer.id);
        let start_ns = writer.start_ns;
        Ok(Backup {
            walker: Walker::new(opts.id_map.clone()),
            state: State {
                store: store.clone(),
                chunker: Chunker::new(opts.chunk_sizes),
                pack: Pack {
                    chunker: Chunker::new(opts.chunk_sizes),
                    pos: 0,
                    cut: 0,
                    spans: VecDeque::new(),
                },
                queue: Queue::default(),
                queue_max: QUEUE_MAX,
                seen_max: SEEN_MAX,
                consumed: Arc::new(AtomicU64::new(0)),
                base_catalog,
                base_trees,
                trees: Vec::new(),
                guide: None,
                limit: (opts.bwlimit > 0).then(|| RateLimit {
                    rate: opts.bwlimit,
                    start: Instant::now(),
                    read: 0,
                }),
                opts,
                catalog,
                prev,
                tree: 0,
                seen: HashSet::new(),
                pool,
                stats: BackupStats::default(),
                start_ns,
            },
            tmp_dir,
            snap,
            config: None,
            firewall: None,
            started: Instant::now(),
            _writer: writer,
            _group_lock: group_lock,
            _base_lock: base_lock,
            done: false,
        })
    }

    /// The snapshot this backup will create.
    #[must_use]
    pub fn snapshot(&self) -> SnapshotRef {
        self.snap
    }

    /// Add a regular file member owned by 0:0 (`./etc/vzdump/pct.conf`), as
    /// [`vzkit_archive::ArchiveWriter::append_data`] does. The members named
    /// `./etc/vzdump/pct.conf` and `./etc/vzdump/pct.fw` are also kept as
    /// the snapshot's `pct.conf` / `pct.fw`.
    ///
    /// # Errors
    /// Invalid names, store errors.
    pub fn add_data(&mut self, name: &str, data: &[u8], mode: u32, mtime: i64) -> Result<()> {
        let h = MemberHeader {
            name: name.as_bytes(),
            kind: MemberKind::Regular,
            mode,
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec: 0,
            size: data.len() as u64,
            link: None,
            device: (0, 0),
            sparse: None,
            acl_access: None,
            acl_default: None,
            xattrs: &[],
        };
        header::encode(&h)?;
        let mut m = Member::from_header(&h, DATA_TREE);
        m.chunks = self.state.add_bytes(data)?;
        match name {
            "./etc/vzdump/pct.conf" => self.config = Some(data.to_vec()),
            "./etc/vzdump/pct.fw" => self.firewall = Some(data.to_vec()),
            _ => {}
        }
        self.state.emit(m)
    }

    /// Add the tree at `src` under `member_prefix` (as
    /// [`vzkit_archive::ArchiveWriter::append_tree`]).
    ///
    /// # Errors
    /// Walk errors, store errors.
    pub fn add_tree(
        &mut self,
        src: &Path,
        member_prefix: &str,
        excludes: &ExcludeSet,
        one_file_system: bool,
    ) -> Result<vzkit_archive::Stats> {
        self.add_volume_tree(
            src,
            member_prefix,
            excludes,
            one_file_system,
            VolumeInfo::default(),
        )
        .map(|(st, _)| st)
    }

    /// As [`Backup::add_tree`], for a tree mounted from a volume image
    /// (see [`VolumeInfo`]). If the base snapshot recorded the same tree
    /// (prefix, excludes, one-file-system rule, id map, context) with the
    /// same image key, the tree is not walked: its records are taken over
    /// whole. The key is recorded for the next backup unless it changed
    /// within 1 s before this backup started, or
    /// [`Backup::forget_volumes`] is called. Otherwise, with the volume's
    /// inode table and a base walked with the same parameters and layout,
    /// only directories with changed inodes in or below them are walked
    /// (see the crate docs). Returns the walk's statistics (empty for a
    /// tree taken over) and whether the tree was taken over.
    ///
    /// # Errors
    /// Walk errors, store errors.
    pub fn add_volume_tree(
        &mut self,
        src: &Path,
        member_prefix: &str,
        excludes: &ExcludeSet,
        one_file_system: bool,
        volume: VolumeInfo,
    ) -> Result<(vzkit_archive::Stats, bool)> {
        let tree = self.state.tree;
        let id_map = self.state.opts.id_map.as_ref();
        let source = TreeSource {
            prefix: member_prefix.to_string(),
            fingerprint: tree_fingerprint(
                member_prefix,
                excludes,
                one_file_system,
                id_map,
                &volume.context,
            ),
            volume: volume.key.filter(|v| {
                let racy = self.state.start_ns - RACY_NS;
                v.ctime_ns < racy && v.mtime_ns < racy
            }),
            // Only trees walked from a cleanly unmounted image with its inode
            // table guide later walks: their records are a consistent view.
            walk: match &volume.inodes {
                Some(t) if !volume.layout.is_empty() => tree_fingerprint(
                    member_prefix,
                    excludes,
                    one_file_system,
                    id_map,
                    &format!("{}\0{}", volume.layout, t.stamp()),
                ),
                _ => String::new(),
            },
        };
        // Chunks verification reported bad must have been written again
        // (by a backup that read their data) before records are taken over
        // unchecked; the base itself is locked, so its chunks stay.
        let metadata = self.state.opts.change_detection == ChangeDetection::Metadata;
        let base_tree = self.state.base_trees.get(tree as usize);
        let intact = || {
            self.state.prev.as_ref().is_some_and(|p| {
                p.suspect
                    .iter()
                    .all(|d| self.state.store.chunk_is_intact(d))
            })
        };
        // Whole trees are taken over by image key and fingerprint; whether the
        // base was walked with a table (`walk`) does not matter here.
        let reuse = source.volume.is_some()
            && metadata
            && base_tree.is_some_and(|b| {
                b.prefix == source.prefix
                    && b.fingerprint == source.fingerprint
                    && b.volume == source.volume
            })
            && intact();
        let guided = !reuse
            && metadata
            && volume.inodes.is_some()
            && !source.walk.is_empty()
            && base_tree.is_some_and(|b| b.walk == source.walk)
            && self.state.prev.as_ref().is_some_and(|p| p.same_id_map)
            && intact();
        self.state.trees.push(source);
        if reuse {
            self.state.check_cancel()?;
            self.state.copy_tree(tree)?;
            self.state.stats.trees_reused += 1;
            self.state.tree += 1;
            return Ok((vzkit_archive::Stats::default(), true));
        }
        // The read-ahead thread offers only files the walk will read: with a
        // base, those whose key does not show them unchanged.
        let base = match &self.state.base_catalog {
            Some(p) => Some(PrevCursor {
                cat: CatalogReader::open(p)?,
                peeked: None,
                same_id_map: false,
                same_chunking: false,
                held: None,
                suspect: HashSet::new(),
            }),
            None => None,
        };
        self.state.guide = None;
        if guided && let (Some(cat), Some(table)) = (&self.state.base_catalog, volume.inodes) {
            let root = rustix::fs::stat(src).map_err(|e| Error::io("stat", src, e.into()))?;
            self.state.guide =
                Guide::build(cat, tree, table, &StatKey::from_stat(&root))?.map(Arc::new);
        }
        let guide = self.state.guide.clone();
        let consumed = Arc::clone(&self.state.consumed);
        let done = AtomicBool::new(false);
        let direct = volume
            .image
            .and_then(|p| std::fs::File::open(p).ok())
            .and_then(|f| DirectImage::new(f, src));
        self.walker.set_direct(direct.clone());
        let (walker, state) = (&mut self.walker, &mut self.state);
        let st = std::thread::scope(|scope| {
            let _ = std::thread::Builder::new()
                .name("dedup-prefetch".into())
                .spawn_scoped(scope, || {
                    let base = std::cell::RefCell::new(base);
                    let mut want = |m: &[u8], st: &rustix::fs::Stat| {
                        base.borrow_mut()
                            .as_mut()
                            .is_none_or(|b| will_read(b, tree, m, &StatKey::from_stat(st)))
                    };
                    // Entries the walk takes over unstatted are left out.
                    let mut skip = |m: &[u8], ino: u64| {
                        let mut base = base.borrow_mut();
                        let (Some(g), Some(b)) = (guide.as_ref(), base.as_mut()) else {
                            return false;
                        };
                        match b.find(tree, m) {
                            Ok(Some(p)) if g.takes(m, ino, &p) => true,
                            Ok(Some(p)) => {
                                b.held = Some(p);
                                false
                            }
                            _ => false,
                        }
                    };
                    Prefetcher::new(excludes, &consumed, &done, PREFETCH_WINDOW)
                        .with_filter(&mut want)
                        .with_skip(&mut skip)
                        .with_direct(direct.as_ref())
                        .run_tree(src, member_prefix);
                });
            let _stop = StopOnDrop(&done);
            walker.walk(src, member_prefix, excludes, one_file_system, state)
        });
        self.state.guide = None;
        self.walker.set_direct(None);
        let st = st?;
        self.state.tree += 1;
        self.state.stats.bytes_read += st.bytes_read;
        self.state.stats.bytes_direct += st.bytes_direct;
        for w in &st.warnings {
            self.state.stats.warnings.push(w.clone());
        }
        Ok((st, false))
    }

    /// Record no volume key for the next backup (a volume image changed
    /// while this backup read it: the next backup walks every tree).
    pub fn forget_volumes(&mut self) {
        for t in &mut self.state.trees {
            t.volume = None;
        }
    }

    /// Wait for all chunks, write the catalog, config and manifest, sync
    /// the file system and make the snapshot visible.
    ///
    /// # Errors
    /// Store errors; the temporary directory is then removed.
    pub fn finish(mut self) -> Result<BackupResult> {
        self.state.cut_pack()?;
        if !self.state.queue.members.is_empty() {
            return Err(Error::Invalid("catalog records left unwritten".into()));
        }
        self.state.pool.finish()?;
        let st = &mut self.state;
        st.stats.chunks_new = st.pool.new_chunks.load(Ordering::Relaxed);
        st.stats.bytes_new = st.pool.new_bytes.load(Ordering::Relaxed);
        st.stats.bytes_new_compressed = st.pool.new_comp.load(Ordering::Relaxed);
        st.stats.logical_size += trailer(st.stats.logical_size).len() as u64;
        let catalog = std::mem::replace(
            &mut st.catalog,
            CatalogWriter::create(Path::new("/dev/null"))?,
        );
        catalog.finish()?;
        let mut parts = vec![snapshot::CATALOG];
        if let Some(c) = &self.config {
            let p = self.tmp_dir.join(snapshot::CONFIG);
            std::fs::write(&p, c).map_err(|e| Error::io("write", &p, e))?;
            parts.push(snapshot::CONFIG);
        }
        if let Some(c) = self.firewall.as_ref().filter(|c| !c.is_empty()) {
            let p = self.tmp_dir.join(snapshot::FIREWALL);
            std::fs::write(&p, c).map_err(|e| Error::io("write", &p, e))?;
            parts.push(snapshot::FIREWALL);
        }
        snapshot::write_manifest(
            &self.tmp_dir,
            &self.snap,
            &parts,
            &self.state.stats,
            snapshot::id_map_name(self.state.opts.id_map.as_ref()),
            std::mem::take(&mut self.state.trees),
            self.state.opts.chunk_sizes.name(),
        )?;
        self.state.store.sync()?;
        let final_dir = self.snap.path(&self.state.store);
        std::fs::rename(&self.tmp_dir, &final_dir)
            .map_err(|e| Error::io("rename", &final_dir, e))?;
        if let Some(g) = final_dir.parent()
            && let Ok(f) = std::fs::File::open(g)
        {
            let _ = f.sync_all();
        }
        self.done = true;
        Ok(BackupResult {
            snapshot: self.snap,
            stats: self.state.stats.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.state.pool.finish();
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use vzkit_archive::ArchiveWriter;

    use super::*;
    use crate::snapshot::TarStream;

    /// An empty store in `dir`/store.
    fn new_store(dir: &Path) -> Store {
        let p = dir.join("store");
        std::fs::create_dir(&p).unwrap();
        Store::open(&p).unwrap()
    }

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/small"), b"hello\n").unwrap();
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(root.join("big"), &big).unwrap();
        std::fs::write(root.join("a/copy"), &big).unwrap();
        std::os::unix::fs::symlink("b/small", root.join("a/link")).unwrap();
        std::fs::hard_link(root.join("a/b/small"), root.join("hard")).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
    }

    #[test]
    fn snapshot_stream_is_the_archive_writer_stream() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        tree(&src);
        let store = new_store(dir.path());
        let mut o = BackupOptions::new(100);
        o.time = Some(1_700_000_000);
        let mut b = Backup::start(&store, o).unwrap();
        b.add_data(
            "./etc/vzdump/pct.conf",
            b"arch: amd64\n",
            0o644,
            1_700_000_000,
        )
        .unwrap();
        b.add_data("./etc/vzdump/pct.fw", b"", 0o644, 1_700_000_000)
            .unwrap();
        b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let r = b.finish().unwrap();
        // The copy of `big` deduplicates: only one set of its chunks is new.
        assert!(r.stats.bytes_new < 3_500_000, "{:?}", r.stats);

        let mut w = ArchiveWriter::new(Vec::new());
        w.append_data(
            "./etc/vzdump/pct.conf",
            b"arch: amd64\n",
            0o644,
            1_700_000_000,
        )
        .unwrap();
        w.append_data("./etc/vzdump/pct.fw", b"", 0o644, 1_700_000_000)
            .unwrap();
        w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let want = w.finish().unwrap();

        let mut got = Vec::new();
        TarStream::open(&store, &r.snapshot, true)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "reconstructed stream differs");
        assert_eq!(r.stats.logical_size, want.len() as u64);

        // A second backup in the same second is refused and leaves nothing behind.
        let mut o = BackupOptions::new(100);
        o.time = Some(1_700_000_000);
        let e = Backup::start(&store, o).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let names: Vec<_> = std::fs::read_dir(store.group_dir(100))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        assert_eq!(names, vec![r.snapshot.time_name()]);
    }

    fn stream(store: &Store, snap: &SnapshotRef) -> Vec<u8> {
        let mut got = Vec::new();
        TarStream::open(store, snap, true)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        got
    }

    /// Many small files of varied sizes, some larger than the pack limit.
    fn small_tree(root: &Path, seed: u32) {
        for i in 0..300u32 {
            let d = root.join(format!("d{}", i % 7));
            std::fs::create_dir_all(&d).unwrap();
            let len = ((i * 7919 + seed) % 9000) as usize;
            let data: Vec<u8> = (0..len as u32)
                .map(|j| (j.wrapping_mul(2_654_435_761) ^ (i * 31 + seed)) as u8)
                .collect();
            std::fs::write(d.join(format!("f{i}")), data).unwrap();
            if i % 50 == 0 {
                std::os::unix::fs::symlink(format!("f{i}"), d.join(format!("l{i}"))).unwrap();
            }
        }
    }

    fn small_opts(time: i64) -> BackupOptions {
        let mut o = BackupOptions::new(100);
        o.time = Some(time);
        o.chunk_sizes = ChunkSizes {
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
        };
        o.pack_below = 8000;
        o
    }

    #[test]
    fn small_files_share_chunks_and_restore_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        small_tree(&src, 1);
        let store = new_store(dir.path());
        let want = {
            let mut w = ArchiveWriter::new(Vec::new());
            w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
            w.finish().unwrap()
        };
        let backup = |o: BackupOptions, queue_max: usize| {
            let mut b = Backup::start(&store, o).unwrap();
            b.state.start_ns = i64::MAX / 2;
            b.state.queue_max = queue_max;
            b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
            b.finish().unwrap()
        };
        let first = backup(small_opts(1_700_000_000), QUEUE_MAX);
        assert_eq!(first.stats.files, 300);
        // ~1.3 MB in 300 files: a few dozen chunks, most of them shared.
        assert!(first.stats.chunks_new < 120, "{:?}", first.stats);
        assert!(
            first.stats.chunks > first.stats.chunks_new,
            "{:?}",
            first.stats
        );
        assert!(stream(&store, &first.snapshot) == want, "stream differs");

        // Reading everything again cuts the pack stream at the same places.
        let mut o = small_opts(1_700_000_010);
        o.change_detection = ChangeDetection::Data;
        let again = backup(o, QUEUE_MAX);
        assert_eq!(again.stats.files_read, 300);
        assert_eq!(again.stats.chunks_new, 0, "{:?}", again.stats);

        // A tiny queue forces early cuts; the stream is still exact.
        let mut o = small_opts(1_700_000_020);
        o.change_detection = ChangeDetection::Data;
        let cut = backup(o, 3);
        assert!(stream(&store, &cut.snapshot) == want, "stream differs");

        // A backup that forgets the chunks it has seen touches them again and
        // writes nothing twice.
        let mut o = small_opts(1_700_000_025);
        o.change_detection = ChangeDetection::Data;
        let mut b = Backup::start(&store, o).unwrap();
        b.state.start_ns = i64::MAX / 2;
        b.state.seen_max = 2;
        b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let forgetful = b.finish().unwrap();
        assert_eq!(forgetful.stats.chunks_new, 0, "{:?}", forgetful.stats);
        assert!(
            stream(&store, &forgetful.snapshot) == want,
            "stream differs"
        );

        // A changed small file is packed anew; the others keep their slices.
        std::fs::write(src.join("d3/f3"), b"changed").unwrap();
        let changed = backup(small_opts(1_700_000_030), QUEUE_MAX);
        assert_eq!(changed.stats.files_read, 1, "{:?}", changed.stats);
        assert_eq!(changed.stats.chunks_new, 1, "{:?}", changed.stats);
        let mut w = ArchiveWriter::new(Vec::new());
        w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        assert!(stream(&store, &changed.snapshot) == w.finish().unwrap());
        assert!(stream(&store, &first.snapshot) == want);
    }

    #[test]
    fn a_tree_on_an_unchanged_volume_image_is_taken_over_unwalked() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        small_tree(&src, 3);
        let image = dir.path().join("image.raw");
        std::fs::write(&image, b"image").unwrap();
        assert_eq!(
            VolumeKey::of_image(&src),
            None,
            "a directory has no image key"
        );
        let key = VolumeKey::of_image(&image).expect("a file on a local file system");
        let store = new_store(dir.path());
        let want = {
            let mut w = ArchiveWriter::new(Vec::new());
            w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
            w.finish().unwrap()
        };
        let backup = |time: i64,
                      o: Option<BackupOptions>,
                      excludes: &ExcludeSet,
                      key: Option<VolumeKey>,
                      start_ns: i64| {
            let mut o = o.unwrap_or_else(|| small_opts(time));
            o.time = Some(time);
            let mut b = Backup::start(&store, o).unwrap();
            b.state.start_ns = start_ns;
            let (_, whole) = b
                .add_volume_tree(
                    &src,
                    "./",
                    excludes,
                    true,
                    VolumeInfo {
                        key,
                        ..VolumeInfo::default()
                    },
                )
                .unwrap();
            let r = b.finish().unwrap();
            assert_eq!(r.stats.trees_reused, u64::from(whole));
            r
        };
        let none = ExcludeSet::new();
        let old = i64::MAX / 2;
        let first = backup(1_700_000_000, None, &none, Some(key), old);
        assert_eq!(first.stats.files_read, 300);
        // Same image, same walk: taken over, exactly the same stream.
        let same = backup(1_700_000_010, None, &none, Some(key), old);
        assert_eq!(same.stats.trees_reused, 1, "{:?}", same.stats);
        assert_eq!(same.stats.files_read, 0);
        assert_eq!(same.stats.files_reused, 300);
        assert_eq!(same.stats.logical_size, first.stats.logical_size);
        assert!(stream(&store, &same.snapshot) == want, "stream differs");
        // A taken-over tree records the key again for the next backup.
        let again = backup(1_700_000_020, None, &none, Some(key), old);
        assert_eq!(again.stats.trees_reused, 1, "{:?}", again.stats);

        // Anything else different: walked (files unchanged by their keys).
        let mut changed = key;
        changed.ctime_ns += 1;
        let r = backup(1_700_000_030, None, &none, Some(changed), old);
        assert_eq!(r.stats.trees_reused, 0);
        assert_eq!(r.stats.files_reused, 300);
        let (ex, _) = ExcludeSet::from_vzdump_patterns(&["/d1".to_string()]);
        let r = backup(1_700_000_040, None, &ex, Some(changed), old);
        assert_eq!(r.stats.trees_reused, 0);
        assert!(r.stats.files < 300);
        let r = backup(1_700_000_050, None, &none, None, old);
        assert_eq!(r.stats.trees_reused, 0);
        let r = backup(1_700_000_060, None, &none, Some(changed), old);
        assert_eq!(r.stats.trees_reused, 0, "the base had no key");
        let mut data = small_opts(0);
        data.change_detection = ChangeDetection::Data;
        let r = backup(1_700_000_070, Some(data), &none, Some(changed), old);
        assert_eq!(r.stats.trees_reused, 0);
        assert_eq!(r.stats.files_read, 300);
        // A key that changed within a second before the backup is not recorded.
        let mut fresh = changed;
        fresh.ctime_ns += 1;
        let racy = backup(1_700_000_080, None, &none, Some(fresh), fresh.ctime_ns);
        assert_eq!(racy.stats.trees_reused, 0);
        let after = backup(1_700_000_090, None, &none, Some(fresh), old);
        assert_eq!(after.stats.trees_reused, 0, "{:?}", after.stats);
        let last = backup(1_700_000_100, None, &none, Some(fresh), old);
        assert_eq!(last.stats.trees_reused, 1, "{:?}", last.stats);
        assert!(stream(&store, &last.snapshot) == want, "stream differs");

        // A chunk reported bad and still missing: walked; once it is there again
        // (written by a backup that read its data), taken over again.
        let missing = [0xab; 32];
        store.add_bad_chunks(&[missing]).unwrap();
        let r = backup(1_700_000_110, None, &none, Some(fresh), old);
        assert_eq!(r.stats.trees_reused, 0, "{:?}", r.stats);
        let present = *blake3::hash(b"present").as_bytes();
        store.insert_chunk(&present, b"present", 3, "t").unwrap();
        std::fs::remove_file(store.bad_list_path()).unwrap();
        store.add_bad_chunks(&[present]).unwrap();
        let r = backup(1_700_000_120, None, &none, Some(fresh), old);
        assert_eq!(r.stats.trees_reused, 1, "{:?}", r.stats);

        // Another context (say, a mount point nested in the tree): walked; then taken
        // over, unless the backup forgets its volume keys.
        let with_context = |time: i64, forget: bool| {
            let mut b = Backup::start(&store, small_opts(time)).unwrap();
            b.state.start_ns = old;
            let (_, whole) = b
                .add_volume_tree(
                    &src,
                    "./",
                    &none,
                    true,
                    VolumeInfo {
                        key: Some(fresh),
                        context: "./mnt/x=key".into(),
                        ..VolumeInfo::default()
                    },
                )
                .unwrap();
            if forget {
                b.forget_volumes();
            }
            b.finish().unwrap();
            whole
        };
        assert!(!with_context(1_700_000_130, false));
        assert!(with_context(1_700_000_140, true));
        assert!(!with_context(1_700_000_150, false));
        assert!(with_context(1_700_000_160, false));
    }

    #[test]
    fn read_ahead_offers_only_files_the_walk_will_read() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        small_tree(&src, 9);
        let store = new_store(dir.path());
        let mut b = Backup::start(&store, small_opts(1_700_000_000)).unwrap();
        b.state.start_ns = i64::MAX / 2;
        b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let first = b.finish().unwrap();
        std::fs::write(src.join("d4/f4"), b"changed").unwrap();
        let cat = first.snapshot.path(&store).join(snapshot::CATALOG);
        let mut base = PrevCursor {
            cat: CatalogReader::open(&cat).unwrap(),
            peeked: None,
            same_id_map: false,
            same_chunking: false,
            held: None,
            suspect: HashSet::new(),
        };
        // In walk order, as the read-ahead thread asks.
        let mut read = Vec::new();
        for d in 0..7 {
            let mut names: Vec<String> = (0..300)
                .filter(|i| i % 7 == d)
                .map(|i| format!("f{i}"))
                .collect();
            names.sort();
            for n in names {
                let p = src.join(format!("d{d}/{n}"));
                let st = rustix::fs::lstat(&p).unwrap();
                let member = format!("./d{d}/{n}");
                if will_read(&mut base, 0, member.as_bytes(), &StatKey::from_stat(&st)) {
                    read.push(member);
                }
            }
        }
        assert_eq!(read, ["./d4/f4"]);
    }

    #[test]
    fn large_files_chunked_while_read_give_the_same_stream_and_stop_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let big: Vec<u8> = (0..(12u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        std::fs::write(src.join("big"), &big).unwrap();
        std::fs::write(src.join("exact"), &big[..PIPELINE_MIN as usize]).unwrap();
        std::fs::write(src.join("under"), &big[..PIPELINE_MIN as usize - 1]).unwrap();
        small_tree(&src, 6);
        let store = new_store(dir.path());
        let want = {
            let mut w = ArchiveWriter::new(Vec::new());
            w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
            w.finish().unwrap()
        };
        let mut b = Backup::start(&store, BackupOptions::new(100)).unwrap();
        b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let r = b.finish().unwrap();
        assert!(stream(&store, &r.snapshot) == want, "stream differs");
        // The chunks of the pipelined files are those of the same data chunked in
        // one piece: "exact" shares its chunks but the last with "big".
        let mut c = Chunker::new(ChunkSizes::default());
        let mut one = Vec::new();
        c.push::<()>(&big, &mut |_, d| {
            one.push(*d);
            Ok(())
        })
        .unwrap();
        c.finish::<()>(&mut |_, d| {
            one.push(*d);
            Ok(())
        })
        .unwrap();
        let mut cat = snapshot::catalog(&store, &r.snapshot).unwrap();
        let mut got = None;
        while let Some(m) = cat.next_member().unwrap() {
            if m.name == b"./big" {
                got = Some(m.chunks.iter().map(|c| c.digest).collect::<Vec<_>>());
            }
        }
        assert_eq!(got.unwrap(), one);
        let (files, packed) = checked_refs(&store, &r.snapshot);
        assert!(files >= 300 && packed, "{files} {packed}");

        // A cancel while a large file is being chunked stops the backup, well
        // before the 14 s the paced reads would take.
        let (e, took) = cancelled_backup(&store, &src, 2 << 20, Duration::from_millis(500));
        assert!(e.contains("interrupted by signal"), "{e}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    /// A backup of `src` as group 101, paced to `bwlimit` bytes/s and
    /// cancelled after `after`: its error and how long it ran.
    fn cancelled_backup(
        store: &Store,
        src: &Path,
        bwlimit: u64,
        after: Duration,
    ) -> (String, Duration) {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut o = BackupOptions::new(101);
        o.time = Some(1_700_000_000);
        o.bwlimit = bwlimit;
        o.cancel = Some(Arc::clone(&cancel));
        let c = Arc::clone(&cancel);
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(after);
            c.store(true, Ordering::Relaxed);
        });
        let t = Instant::now();
        let mut b = Backup::start(store, o).unwrap();
        let e = b
            .add_tree(src, "./", &ExcludeSet::new(), true)
            .unwrap_err()
            .to_string();
        let took = t.elapsed();
        stopper.join().unwrap();
        drop(b);
        (e, took)
    }

    #[test]
    fn reads_are_paced_and_a_cancelled_backup_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        // 1.5 MiB in a large file and 300 packed ones.
        std::fs::write(src.join("big"), vec![7u8; 1 << 20]).unwrap();
        small_tree(&src, 5);
        let store = new_store(dir.path());

        let mut o = BackupOptions::new(100);
        o.time = Some(1_700_000_000);
        o.bwlimit = 4 << 20;
        let t = Instant::now();
        let mut b = Backup::start(&store, o).unwrap();
        b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let r = b.finish().unwrap();
        let read = r.stats.bytes_read;
        assert!(read > (3 << 20) / 2, "{:?}", r.stats);
        // At 4 MiB/s the reads alone take at least read / rate seconds.
        let min = read as f64 / f64::from(4u32 << 20);
        assert!(
            t.elapsed().as_secs_f64() >= min,
            "{:?} < {min}",
            t.elapsed()
        );

        // Cancelled while paced: the backup stops with an error and its
        // temporary snapshot is removed.
        let (e, took) = cancelled_backup(&store, &src, 512 << 10, Duration::from_millis(300));
        assert!(e.contains("interrupted by signal"), "{e}");
        // Well before the 3 s the paced reads would take.
        assert!(took < Duration::from_millis(2500), "{took:?}");
        let left: Vec<_> = std::fs::read_dir(store.group_dir(101))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn unchanged_files_are_reused_unopened_and_the_base_stays() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        tree(&src);
        let store = new_store(dir.path());
        let backup = |time: i64| {
            let mut o = BackupOptions::new(100);
            o.time = Some(time);
            // Nothing is racy: the files are older than the backups.
            let mut b = Backup::start(&store, o).unwrap();
            b.state.start_ns = i64::MAX / 2;
            b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
            b
        };
        let first = backup(1_700_000_000).finish().unwrap();
        std::fs::write(src.join("a/b/small"), b"changed\n").unwrap();
        let b = backup(1_700_000_010);
        // The base is locked against removal while the backup runs.
        let base = first.snapshot.path(&store);
        let e = SnapshotLock::try_lock(&base, true, "in use").unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        let second = b.finish().unwrap();
        assert!(SnapshotLock::try_lock(&base, true, "in use").is_ok());
        // big, a/copy and empty are reused; a/b/small (and its hard link) is read.
        assert_eq!(second.stats.files_reused, 3, "{:?}", second.stats);
        assert_eq!(second.stats.files_read, 1, "{:?}", second.stats);
        assert_eq!(second.stats.chunks_new, 1, "{:?}", second.stats);

        let mut w = ArchiveWriter::new(Vec::new());
        w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let want = w.finish().unwrap();
        assert!(stream(&store, &second.snapshot) == want, "stream differs");
        assert_ne!(stream(&store, &first.snapshot), want);
        // Reused chunk lists (big, a/copy) keep their checks.
        assert_eq!(checked_refs(&store, &second.snapshot).0, 3);
    }

    /// Every chunk reference of a snapshot's files carries the check of its
    /// chunk's data: the number of files with data, and whether slices of
    /// packed chunks were among them.
    fn checked_refs(store: &Store, snap: &SnapshotRef) -> (usize, bool) {
        let mut cat = snapshot::catalog(store, snap).unwrap();
        let (mut files, mut packed) = (0, false);
        while let Some(m) = cat.next_member().unwrap() {
            if m.tree == DATA_TREE || m.chunks.is_empty() {
                continue;
            }
            files += 1;
            for c in &m.chunks {
                let data = store.read_chunk(&c.digest, c.len).unwrap();
                assert_eq!(c.check, check_of(&data), "{}", m.name_lossy());
                packed |= !c.is_whole();
            }
        }
        (files, packed)
    }

    /// The chunk digests of `name` in a snapshot.
    fn chunk_list(store: &Store, snap: &SnapshotRef, name: &[u8]) -> Vec<[u8; 32]> {
        let mut cat = snapshot::catalog(store, snap).unwrap();
        while let Some(m) = cat.next_member().unwrap() {
            if m.name == name {
                return m.chunks.iter().map(|c| c.digest).collect();
            }
        }
        panic!("no {}", String::from_utf8_lossy(name));
    }

    /// Changed large files are chunked along their base chunk lists: what is
    /// unchanged is taken without cutting, and the chunks are those a full
    /// re-read (`--change-detection data`) cuts.
    #[test]
    fn changed_large_files_take_their_unchanged_base_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let data = |n: u32, seed: u64| crate::chunker::tests::pseudo_random(n as usize, seed);
        // One file chunked while read on a second thread, one on the walking thread.
        let (log, blob) = (data(12 << 20, 0), data(3 << 20, 7));
        std::fs::write(src.join("log"), &log).unwrap();
        std::fs::write(src.join("blob"), &blob).unwrap();
        small_tree(&src, 3);
        let store = new_store(dir.path());
        let backup = |time: i64, detect: ChangeDetection| {
            let mut o = BackupOptions::new(100);
            o.time = Some(time);
            o.change_detection = detect;
            let mut b = Backup::start(&store, o).unwrap();
            b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
            b.finish().unwrap()
        };
        let first = backup(1_700_000_000, ChangeDetection::Metadata);
        assert_eq!(first.stats.bytes_matched, 0);
        // Appended to, and overwritten in the middle.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(src.join("log"))
            .unwrap();
        std::io::Write::write_all(&mut f, &data(300_000, 99)).unwrap();
        drop(f);
        let mut blob2 = blob.clone();
        blob2[1_000_000..1_000_100].fill(0);
        std::fs::write(src.join("blob"), &blob2).unwrap();
        let second = backup(1_700_000_010, ChangeDetection::Metadata);
        // All but the chunks at the change and at the ends (both files count).
        let unchanged = (log.len() + blob.len()) as u64;
        assert!(
            second.stats.bytes_matched > unchanged - 3 * (1 << 20)
                && second.stats.bytes_matched < unchanged,
            "{:?}",
            second.stats
        );
        let third = backup(1_700_000_020, ChangeDetection::Data);
        assert_eq!(third.stats.bytes_matched, 0);
        for name in [&b"./log"[..], b"./blob"] {
            let hinted = chunk_list(&store, &second.snapshot, name);
            assert_eq!(hinted, chunk_list(&store, &third.snapshot, name));
            let base = chunk_list(&store, &first.snapshot, name);
            let kept = hinted.iter().filter(|d| base.contains(d)).count();
            assert!(
                kept + 3 >= base.len(),
                "{kept} of {} chunks kept",
                base.len()
            );
        }
        let mut w = ArchiveWriter::new(Vec::new());
        w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        assert!(
            stream(&store, &second.snapshot) == w.finish().unwrap(),
            "stream differs"
        );
    }
}
