//! An incremental, deduplicated, verifiable backup store for container
//! trees (storage type `dedup`).
//!
//! A snapshot stands for exactly the tar stream vzdump writes for the same
//! tree (`./etc/vzdump/pct.conf`, `./etc/vzdump/pct.fw`, then each tree),
//! but stores it as a catalog of members ([`catalog`]) plus content-defined
//! chunks of file data ([`chunker`]), addressed by blake3 and compressed
//! with zstd at level 1 ([`store`], [`backup::CHUNK_LEVEL`]). The tree is walked by `vzkit_archive`'s
//! [`Walker`](vzkit_archive::Walker) (the same walker as tar archives:
//! excludes, one file system, hard links, sparse files, ACLs, xattrs, id
//! mapping) and restored by rebuilding the tar stream ([`snapshot::TarStream`])
//! and feeding it to [`vzkit_archive::extract()`], so restores behave
//! exactly like archive restores; [`snapshot::export`] writes it as a
//! PVE-compatible `.tar.zst`.
//!
//! | module | what |
//! |---|---|
//! | [`store`] | layout, chunk files, locks, running-backup registry |
//! | [`chunker`] | FastCDC (v2020) over file data streams |
//! | [`catalog`] | streamed, compressed member records with chunk lists |
//! | [`backup`] | writing a snapshot (parallel compression, incremental reuse) |
//! | [`snapshot`] | listing, manifest, notes, protection, restore, export, single files |
//! | [`verify`] | re-hashing chunks, marking bad ones |
//! | [`gc`] | mark and sweep with a grace period |
//! | [`prune`] | `prune-backups` |
//! | [`ext4scan`] | stat data of an unmounted ext2/3/4 image's inodes, from its inode tables |
//!
//! # Change detection (incremental backups)
//!
//! With [`ChangeDetection::Metadata`] (the default) a regular file is
//! taken over from the newest earlier complete snapshot of the same group
//! (the *base*) if, for the member of the same name in the same source
//! tree, all of these are equal: inode number, size, mtime (ns), ctime
//! (ns), `st_mode` (type and permissions), uid and gid (host values), and
//! the earlier entry was not *racy* (its mtime or ctime was not within 1 s
//! before that backup started).
//!
//! The key is first compared with the `lstat` the walker takes anyway,
//! before the file is opened ([`vzkit_archive::TreeSink::file_unopened`]):
//! on a match the whole earlier entry — header with mode, owners, mtime,
//! ACLs, xattrs, sparse map — and its chunk list are reused, and the file
//! is not opened at all (no `open`, `fstat`, xattr or ACL reads). This
//! needs the base to have been walked with the same id map (recorded in
//! its manifest; older snapshots have none) and, for an entry stored
//! sparse, the file to still have fewer blocks than its size. Otherwise
//! the file is opened, and with the key of its `fstat` and an equal
//! sparse map only its chunk list is reused (header, ACLs and xattrs read
//! fresh); else it is read.
//!
//! Why this is safe: any write to a file, and any change of its metadata
//! — including setting or removing an xattr or ACL (`setxattr`,
//! `setfacl`), `chmod`, `chown` — sets its ctime to the current time, and
//! ctime cannot be set by unprivileged users (`touch -d` or `utimensat`
//! restore mtime but update ctime). So an equal ctime also means equal
//! ACLs and xattrs. A file replaced by another (rename over it, restore
//! from elsewhere) has a different inode number even if size and times
//! were copied. The racy rule covers timestamp granularity: a write in the
//! same clock tick as the change the earlier backup saw would leave ctime
//! unchanged, so entries changed shortly before a backup started are not
//! trusted by the next one. The file system's device number is not
//! compared, as snapshot mounts get a new one each time. With
//! [`ChangeDetection::Data`] every file is read; unchanged regions of
//! changed files still deduplicate through content-defined chunking.
//!
//! Files are read through the mount, or, for a tree on a raw ext2/3/4 image
//! given with its inode table ([`VolumeInfo::image`]), straight from the
//! image where their extent maps show their data
//! ([`vzkit_archive::direct`]).
//!
//! A changed file chunked on its own (64 KiB or more, not sparse) is read
//! whole, but cut along its chunk list in the base snapshot
//! ([`chunker::Hint`]): where its data still holds a base chunk and the one
//! after it, the chunk is taken after a blake3 instead of the cut search,
//! giving the same chunks as cutting (metadata change detection only).
//!
//! # Unchanged volumes (whole trees)
//!
//! A tree mounted from a volume image file ([`Backup::add_volume_tree`]:
//! vzdump's stop mode, for raw images on `dir` and `btrfs` storages) is not
//! walked at all if the base snapshot recorded the same tree — member
//! prefix, excludes, one-file-system rule, id map and the caller's context
//! (vzdump: every source tree with its image key, since a walk stops at
//! nested mount points and records their roots), as a blake3 fingerprint —
//! with the same image key: device, inode number, size, mtime and ctime
//! (ns) of the image file. vzdump takes the keys before mounting the
//! volumes and again after the walk, and records none if one changed. Its records are then copied
//! from the base. Why this is safe: every write to the image — through a
//! loop device (buffered or direct I/O), `write`, `mmap` — updates its
//! ctime, which cannot be set back; a writable mount of the file system
//! alone writes its superblock; vzdump mounts the volume read-only, and
//! its lock keeps the container from starting or being mounted meanwhile
//! (after an unmount, all of the file system is in the image). Only
//! images on local file systems where this holds are keyed (ext2/3/4, xfs,
//! btrfs, tmpfs, zfs; not FUSE or network file systems, where another
//! client or a daemon may write), and a key is only recorded if the image
//! did not change within 1 s before the backup started (timestamp
//! granularity). With [`ChangeDetection::Data`], or while a chunk that
//! verification reported bad has not been written again, trees are walked.
//!
//! # Changed directories only (ext2/3/4 images)
//!
//! When a tree's image did change, vzdump's stop mode reads the inode
//! table of the ext2/3/4 file system in it before mounting it
//! ([`ext4scan`]: straight from the image file, a few MB, no mount; only if
//! the file system was cleanly unmounted — no journal recovery or orphan
//! cleanup pending, no error state — so that the tables on disk are what a
//! mount shows). The base guides the walk if it walked the same tree the
//! same way: same parameters, same layout of source trees (prefixes,
//! without image keys), and also from a table of the same file system
//! ([`ext4scan::InodeTable::stamp`]: UUID, time of the last `e2fsck` check,
//! block and inode counts). So only trees walked from a cleanly unmounted
//! image — a consistent view — guide later walks (not snapshot mode, whose
//! mounts skip the journal), and a check or resize in between turns the
//! guide off. The mounted tree's root must also be the inode the table
//! shows. Then every record of the tree in the base is compared with the
//! inode it was made from, by inode number: mode, uid, gid, size, mtime and
//! ctime (ns). A record whose inode differs, is gone, or that is racy, lies
//! on another file system (a nested mount point's root), has no key
//! (catalogs written before keys were kept for all members), or is a
//! non-directory with several links, marks its parent directories *dirty*,
//! and itself if it is a directory. The walker asks before it `lstat`s an
//! entry, with the inode number of the directory listing
//! ([`vzkit_archive::TreeSink::unstatted`]): an entry whose base record is
//! for that inode and unchanged (for a directory: not dirty) is taken over
//! with everything below it, neither `lstat`ed nor opened; so only dirty
//! directories are listed, and in them only changed entries `lstat`ed.
//! Entries of dirty directories stored sparse are left to the walk (which
//! checks that they still have holes). Records taken over get the device
//! number of the current mount, as walked ones do.
//!
//! Why this is safe: creating, removing or renaming an entry changes the
//! mtime and ctime of its directory, and every change of an inode (data,
//! mode, owners, xattrs, ACLs, links) changes its ctime, which cannot be
//! set back through the file system. So a directory whose inode is
//! unchanged has the same entries, and if no inode below it changed
//! either, everything below it is as the base recorded it; a new entry
//! anywhere makes its parent directory (or, for a new directory, an older
//! ancestor) dirty. Offline tools can bypass this (`e2fsck` reconnecting an
//! inode into `lost+found`, `resize2fs`), hence the stamp; not detected are
//! a hand edit with `debugfs -w` and a repairing `e2fsck` that leaves the
//! time of the last check as it was (it does with a clock it considers
//! insane, or `E2FSCK_TIME` set). Files with several links are never taken
//! over this way because the walk must see every name of such an inode to
//! write the later ones as hard links. The table is read while vzdump's
//! lock keeps the stopped container from starting or being mounted, and
//! the image keys taken with it are compared again after the walk, as for
//! whole trees.
//!
//! # Read-ahead
//!
//! While a tree is walked, a second thread
//! ([`vzkit_archive::prefetch::Prefetcher`]) walks it ahead in the same
//! order, `stat`ing every entry and asking the kernel to read ahead the
//! data of the files the walk will read — all of them without a base,
//! else those the base does not show unchanged by the rule above — at
//! most 64 MiB ahead of the reads; it does not enter directories the walk
//! takes over. A freshly mounted volume is cold: the
//! walk would otherwise wait for every directory block, inode and file.
//!
//! Reused chunks are not touched: the backup holds a shared lock on its
//! base for its whole run, so the base cannot be removed and every garbage
//! collection marks its chunks (the argument is in [`gc`]). Chunks that
//! verification found damaged or missing (listed in `.bad-chunks`) are
//! checked first; a file using a missing one is read, and the chunk is
//! written again. Garbage collection drops chunks that are intact again or
//! no longer used by any snapshot from that list.

//! # Chunking
//!
//! FastCDC 2020 (normalization level 1) with min/avg/max 64 KiB / 256 KiB /
//! 1 MiB per file of at least the minimum size; smaller files are packed
//! into one stream cut by the same chunker (see [`backup`]). Measured (before
//! packing, when every small file was one chunk) on
//! a 597 MB tree (a copy of /usr/bin, a 64 MiB random blob, a 63 MB log) with
//! two further versions (2% of the binaries appended to, 1 MiB of the blob
//! overwritten, 10,000 log lines appended), compressed bytes written per
//! version and first-backup time (2 shared cores, load 6–7):
//!
//! | avg | chunks after 3 versions | store | version 2 | version 3 | first backup |
//! |---|---|---|---|---|---|
//! | 256 KiB | 2,747 | 273.1 MB | 2.06 MB | 1.87 MB | 6.4 s |
//! | 1 MiB | 1,343 | 271.2 MB | 8.48 MB | 3.34 MB | 7.3 s |
//! | 4 MiB | 1,009 | 277.8 MB | 9.52 MB | 11.85 MB | 4.8 s |
//!
//! Smaller chunks cost more chunk files but cut the data written per small
//! change by 2–5×; throughput is within the noise of the shared machine.
//! (Measured with chunks at zstd level 3; they are level 1 now, see
//! [`backup::CHUNK_LEVEL`].)
//! blake3 of each chunk runs on the walking thread (for files of 8 MiB or more on a second
//! thread that cuts and hashes while the walking thread reads, at most 8 pieces of 256 KiB
//! ahead); compression and writing run on a
//! pool of one thread per CPU fed through a bounded queue (memory: at most
//! two queued chunks per thread plus one chunk being cut and one pack chunk
//! being filled, at most 16,384 catalog records waiting for it, and at most
//! 1M remembered chunk digests). Chunks already
//! present are only touched, never recompressed or rewritten. Each thread
//! keeps one zstd compression and one decompression context
//! ([`store::compress`], [`store::decompress`]) instead of creating one
//! per chunk.
//!
//! # Performance
//!
//! `scripts/bench-dedup.sh` (1.23 GB container tree, 31,086 files, 10
//! versions; 2 cores; three runs in README.md, on a journaled ext4 backup
//! file system): first backup 2.76–2.96 s against vzdump tar.zst
//! 2.96–3.78 s (medians of six); unchanged re-backup 2.0–3.0% of the first
//! (2.8–3.3% when the image changed: inode-guided); 1% change 6.1–7.9%
//! (changed files are re-read whole, 170 MB, but their unchanged chunks
//! are hashed, not cut); 590–591 MB after 10 versions (restic 610–617 MB);
//! restore of the tenth version 1.60–1.74 s against 1.74–2.02 s from the
//! tar.zst (medians of five). The restore's chunk stream needs about the
//! CPU of decoding the tar.zst (batches of 4 MiB, the catalog's xxh3 checks,
//! packed chunks kept for the members further on) and runs on every core;
//! both restores are bound by the extracting thread.

/// How many chunk digests a backup, a verification or a collection
/// remembers to skip repeated work (touching, checking) on chunks it has
/// handled: beyond this (1M chunks, about 256 GiB of unique data) the set
/// starts over, which only costs repeating some of that work, and memory
/// stays bounded (about 50 MB).
pub const MEMO_MAX: usize = 1 << 20;

pub mod backup;
pub mod catalog;
pub mod chunker;
pub mod error;
pub mod ext4scan;
pub mod gc;
pub mod prune;
pub mod snapshot;
pub mod store;
pub mod verify;

pub use backup::{
    Backup, BackupOptions, BackupResult, BackupStats, ChangeDetection, VolumeInfo, VolumeKey,
};
pub use error::{Error, Result};
pub use snapshot::{SnapshotInfo, SnapshotRef};
pub use store::Store;
