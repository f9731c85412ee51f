//! Writing the archive: a pipeline of threads with bounded queues, so that reading the tree
//! and encoding tar, compressing, and hashing plus writing the output all run at once.
//!
//! ```text
//!  encoder (caller's thread)      compressor thread(s)           writer thread
//!  pct.conf, pct.fw, trees  --->  gzip / lzop / zstd      --->   blake3 + write(2)
//!  tar stream, bwlimit,      1 MiB  (zstd: libzstd workers;  1 MiB  (file: fsync at the end;
//!  cancellation              chunks  gzip: pigz-style blocks) chunks  or stdout)
//! ```
//!
//! Memory is bounded: [`QUEUE_CHUNKS`] chunks of [`CHUNK`] bytes per queue, plus the
//! compressor's own buffers (zstd: a few jobs per worker; gzip: two blocks per thread).
//! `--bwlimit` limits the tar stream (where PVE puts `cstream -t` after tar). The first error
//! wins, taken from the stage nearest to the output (a full disk shows as the write error,
//! not as the encoder's broken queue). A set cancel flag (SIGINT/SIGTERM) stops every stage
//! within a chunk and makes the result [`Error::Interrupted`].
//!
//! The tar stream is the archive crate's [`ArchiveWriter`]: `./etc/vzdump/pct.conf` and
//! `./etc/vzdump/pct.fw` first, then each source tree under its member prefix, with
//! `--one-file-system` semantics and the job's exclude set.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use vzkit_archive::direct::DirectImage;
use vzkit_archive::prefetch::{Prefetcher, StopOnDrop};
use vzkit_archive::{ArchiveWriter, Compression, ExcludeSet, IdMap, Stats, compressor};

use crate::error::{Error, Result};

/// Bytes per queued chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunks per queue.
pub const QUEUE_CHUNKS: usize = 8;
/// The writer starts writeback of the archive every this many bytes.
const WRITEBACK_STEP: u64 = 32 << 20;
/// How far (allocated bytes) the prefetcher may run ahead of the encoder.
const PREFETCH_WINDOW: u64 = 64 << 20;

/// One tree to archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSource {
    /// Where the tree is mounted (or copied) on the host.
    pub dir: PathBuf,
    /// Member prefix: `./` for the rootfs, `./mnt/data` for a mount point.
    pub prefix: String,
}

/// Everything the pipeline needs.
#[derive(Debug, Clone)]
pub struct ArchiveJob {
    /// `./etc/vzdump/pct.conf`
    pub config: Vec<u8>,
    /// `./etc/vzdump/pct.fw` (always written for tar archives, possibly empty).
    pub firewall: Vec<u8>,
    /// mtime of the two config members.
    pub config_mtime: i64,
    /// The trees, in order.
    pub sources: Vec<ArchiveSource>,
    /// Excluded member names.
    pub excludes: ExcludeSet,
    /// Host → container id mapping for unprivileged containers.
    pub id_map: Option<IdMap>,
    /// Output format.
    pub compression: Compression,
    /// Compressing threads.
    pub threads: u32,
    /// Compression level (`None`: the tool's default).
    pub level: Option<i32>,
    /// Per source (in order; missing: none), the volume image its file data is read from
    /// ([`vzkit_archive::direct`]).
    pub direct: Vec<Option<DirectImage>>,
    /// Limit of the tar stream in bytes per second (0: none).
    pub bwlimit: u64,
}

/// Where the archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// A file, created (truncated) and fsynced at the end.
    File(PathBuf),
    /// Standard output (`--stdout`).
    Stdout,
}

/// Progress counters, read by the progress bar while the pipeline runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of tar stream produced.
    pub tar_bytes: AtomicU64,
    /// Bytes written to the output.
    pub out_bytes: AtomicU64,
}

/// What the caller shares with a running pipeline.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Set to stop (signal).
    pub cancel: Arc<AtomicBool>,
    /// Progress.
    pub counters: Arc<Counters>,
}

/// The result of a complete archive.
#[derive(Debug, Clone)]
pub struct ArchiveOutcome {
    /// Size of the tar stream.
    pub tar_bytes: u64,
    /// Size of the written (compressed) archive.
    pub out_bytes: u64,
    /// blake3 of the written archive.
    pub blake3: blake3::Hash,
    /// Counters and warnings of the tree walks, added up.
    pub stats: Stats,
    /// Wall time.
    pub elapsed: Duration,
}

const CANCELLED: &str = "interrupted by signal";
const QUEUE_CLOSED: &str = "archive pipeline stage ended";

fn cancelled() -> io::Error {
    io::Error::other(CANCELLED)
}

fn queue_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, QUEUE_CLOSED)
}

fn is_queue_closed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe && e.to_string() == QUEUE_CLOSED
}

/// `cstream -t`-like limiter: keeps the average rate since the start at or below `rate`.
#[derive(Debug)]
struct RateLimit {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl RateLimit {
    fn consume(&mut self, n: usize, cancel: &AtomicBool) -> io::Result<()> {
        self.sent += n as u64;
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
    }
}

/// A `Write` that cuts the stream into chunks for the next stage.
struct ChunkSender {
    tx: Option<SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    cancel: Arc<AtomicBool>,
    counter: Option<Arc<Counters>>,
    limit: Option<RateLimit>,
    total: u64,
}

impl ChunkSender {
    fn new(tx: SyncSender<Vec<u8>>, cancel: Arc<AtomicBool>) -> Self {
        ChunkSender {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
            cancel,
            counter: None,
            limit: None,
            total: 0,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let tx = self.tx.as_ref().ok_or_else(queue_closed)?;
        tx.send(chunk).map_err(|_| queue_closed())
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let n = (CHUNK - self.buf.len()).min(data.len());
        if let Some(l) = self.limit.as_mut() {
            l.consume(n, &self.cancel)?;
        }
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        if let Some(c) = &self.counter {
            c.tar_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The output side: hash, write, count.
fn writer_stage(
    rx: Receiver<Vec<u8>>,
    mut out: File,
    sync: bool,
    ctl: Control,
    what: String,
) -> Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    let mut written_back = 0u64;
    let werr = |e: io::Error| Error::msg(format!("unable to write '{what}' - {e}"));
    for chunk in rx {
        if ctl.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        hasher.update(&chunk);
        out.write_all(&chunk).map_err(werr)?;
        total += chunk.len() as u64;
        ctl.counters
            .out_bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if sync && total - written_back >= WRITEBACK_STEP {
            // Start writing back what is written so far (and let the kernel drop it from
            // the page cache once it is clean), so that the final fsync is short and a
            // backup does not fill the page cache. Advice only: errors do not matter.
            let _ = rustix::fs::fadvise(
                &out,
                written_back,
                std::num::NonZeroU64::new(total - written_back),
                rustix::fs::Advice::DontNeed,
            );
            written_back = total;
        }
    }
    if sync {
        out.sync_all().map_err(werr)?;
    }
    Ok((total, hasher.finalize()))
}

/// The compressing stage.
fn compressor_stage(
    rx: Receiver<Vec<u8>>,
    tx: SyncSender<Vec<u8>>,
    job: (Compression, u32, Option<i32>),
    cancel: Arc<AtomicBool>,
) -> io::Result<()> {
    let (c, threads, level) = job;
    let mut enc = compressor(ChunkSender::new(tx, Arc::clone(&cancel)), c, threads, level)?;
    for chunk in rx {
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        enc.write_all(&chunk)?;
    }
    let mut inner = enc.finish()?;
    inner.flush()
}

fn add_stats(total: &mut Stats, s: &Stats) {
    total.files += s.files;
    total.sparse_files += s.sparse_files;
    total.dirs += s.dirs;
    total.symlinks += s.symlinks;
    total.hardlinks += s.hardlinks;
    total.devices += s.devices;
    total.fifos += s.fifos;
    total.sockets_skipped += s.sockets_skipped;
    total.excluded += s.excluded;
    total.other_fs_dirs += s.other_fs_dirs;
    total.data_bytes += s.data_bytes;
    total.bytes_read += s.bytes_read;
    total.bytes_direct += s.bytes_direct;
    total.warnings.extend(s.warnings.iter().cloned());
}

/// The tar encoder on the calling thread.
fn encoder_stage(job: &ArchiveJob, out: ChunkSender) -> Result<(u64, Stats)> {
    let mut w = match &job.id_map {
        Some(m) => ArchiveWriter::with_id_map(out, m.clone()),
        None => ArchiveWriter::new(out),
    };
    w.append_data(
        "./etc/vzdump/pct.conf",
        &job.config,
        0o644,
        job.config_mtime,
    )?;
    w.append_data(
        "./etc/vzdump/pct.fw",
        &job.firewall,
        0o644,
        job.config_mtime,
    )?;
    let mut stats = Stats::default();
    for (i, s) in job.sources.iter().enumerate() {
        w.set_direct(job.direct.get(i).cloned().flatten());
        let st = w.append_tree(&s.dir, &s.prefix, &job.excludes, true)?;
        w.set_direct(None);
        add_stats(&mut stats, &st);
    }
    let mut sender = w.finish()?;
    sender
        .flush()
        .map_err(|e| Error::msg(format!("archive stream: {e}")))?;
    Ok((sender.total, stats))
}

/// Open the output.
///
/// # Errors
/// `unable to create '<path>' - <reason>`.
fn open_sink(sink: &Sink) -> Result<(File, bool, String)> {
    match sink {
        Sink::File(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(p)
                .map_err(|e| Error::msg(format!("unable to create '{}' - {e}", p.display())))?;
            Ok((f, true, p.display().to_string()))
        }
        Sink::Stdout => {
            let fd = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::msg(format!("unable to use standard output - {e}")))?;
            Ok((File::from(fd), false, "-".to_string()))
        }
    }
}

/// Write the archive of `job` to `sink`; blocks until done (run it on a blocking thread).
///
/// # Errors
/// The first error of any stage (see the module docs), or [`Error::Interrupted`].
pub fn write_archive(job: &ArchiveJob, sink: &Sink, ctl: &Control) -> Result<ArchiveOutcome> {
    let start = Instant::now();
    let (file, sync, what) = open_sink(sink)?;
    let (tar_tx, tar_rx) = sync_channel::<Vec<u8>>(QUEUE_CHUNKS);
    let (out_tx, out_rx) = sync_channel::<Vec<u8>>(QUEUE_CHUNKS);

    let wctl = ctl.clone();
    let writer = std::thread::Builder::new()
        .name("vzdump-write".into())
        .spawn(move || writer_stage(out_rx, file, sync, wctl, what))
        .map_err(|e| Error::msg(format!("unable to start writer thread - {e}")))?;
    let params = (job.compression, job.threads, job.level);
    let ccancel = Arc::clone(&ctl.cancel);
    let comp = std::thread::Builder::new()
        .name("vzdump-compress".into())
        .spawn(move || compressor_stage(tar_rx, out_tx, params, ccancel))
        .map_err(|e| Error::msg(format!("unable to start compressor thread - {e}")))?;

    let mut sender = ChunkSender::new(tar_tx, Arc::clone(&ctl.cancel));
    sender.counter = Some(Arc::clone(&ctl.counters));
    if job.bwlimit > 0 {
        sender.limit = Some(RateLimit {
            rate: job.bwlimit,
            start: Instant::now(),
            sent: 0,
        });
    }
    let done = AtomicBool::new(false);
    let encoded = std::thread::scope(|scope| {
        let _ = std::thread::Builder::new()
            .name("vzdump-prefetch".into())
            .spawn_scoped(scope, || {
                let mut p = Prefetcher::new(
                    &job.excludes,
                    &ctl.counters.tar_bytes,
                    &done,
                    PREFETCH_WINDOW,
                );
                for (i, s) in job.sources.iter().enumerate() {
                    p.set_direct(job.direct.get(i).and_then(Option::as_ref));
                    if !p.run_tree(&s.dir, &s.prefix) {
                        break;
                    }
                }
            });
        let _stop = StopOnDrop(&done);
        encoder_stage(job, sender)
    });
    // The encoder's sender is dropped by now: the compressor sees the end of its input.
    let compressed = comp
        .join()
        .map_err(|_| Error::msg("compressor thread panicked"))?;
    let written = writer
        .join()
        .map_err(|_| Error::msg("writer thread panicked"))?;

    if ctl.cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    let (out_bytes, blake3) = written?;
    if let Err(e) = compressed
        && !is_queue_closed(&e)
    {
        return Err(Error::msg(format!("compressing the archive failed - {e}")));
    }
    let (tar_bytes, stats) = encoded?;
    Ok(ArchiveOutcome {
        tar_bytes,
        out_bytes,
        blake3,
        stats,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/hostname"), b"ct100\n").unwrap();
        let big: Vec<u8> = (0..3 * CHUNK + 77).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.path().join("big"), &big).unwrap();
        std::fs::create_dir_all(d.path().join("tmp/x")).unwrap();
        std::fs::write(d.path().join("tmp/x/junk"), b"junk").unwrap();
        d
    }

    fn job(dir: &std::path::Path, c: Compression, threads: u32) -> ArchiveJob {
        let (excludes, _) = ExcludeSet::from_vzdump_patterns(&["/tmp/?*"]);
        ArchiveJob {
            config: b"arch: amd64\n".to_vec(),
            firewall: Vec::new(),
            config_mtime: 1_700_000_000,
            sources: vec![ArchiveSource {
                dir: dir.to_path_buf(),
                prefix: "./".into(),
            }],
            excludes,
            id_map: None,
            compression: c,
            threads,
            level: None,
            direct: Vec::new(),
            bwlimit: 0,
        }
    }

    fn members(archive: &[u8], c: Compression) -> Vec<String> {
        let mut tar = Vec::new();
        vzkit_archive::decompressor(archive, c)
            .unwrap()
            .read_to_end(&mut tar)
            .unwrap();
        let mut r = vzkit_archive::ArchiveReader::new(&tar[..]);
        let mut names = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            names.push(e.name_lossy());
        }
        names
    }

    #[test]
    fn every_format_round_trips_with_checksum_and_layout() {
        let src = tree();
        let out = tempfile::tempdir().unwrap();
        for (c, threads) in [
            (Compression::None, 1),
            (Compression::Lzo, 1),
            (Compression::Gzip, 1),
            (Compression::Gzip, 3),
            (Compression::Zstd, 1),
            (Compression::Zstd, 2),
        ] {
            let p = out.path().join(format!("a{threads}{}", c.extension()));
            let ctl = Control::default();
            let res =
                write_archive(&job(src.path(), c, threads), &Sink::File(p.clone()), &ctl).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(res.out_bytes, bytes.len() as u64);
            assert_eq!(res.blake3, blake3::hash(&bytes));
            assert_eq!(res.tar_bytes % 10240, 0);
            assert_eq!(
                ctl.counters.tar_bytes.load(Ordering::Relaxed),
                res.tar_bytes
            );
            let names = members(&bytes, c);
            assert_eq!(
                names,
                [
                    "./etc/vzdump/pct.conf",
                    "./etc/vzdump/pct.fw",
                    "./",
                    "./big",
                    "./etc/",
                    "./etc/hostname",
                    "./tmp/",
                ],
                "{c:?}"
            );
            assert_eq!(res.stats.excluded, 1);
        }
    }

    #[test]
    fn write_errors_win_and_cancel_interrupts() {
        let src = tree();
        // A directory cannot be opened for writing.
        let out = tempfile::tempdir().unwrap();
        let err = write_archive(
            &job(src.path(), Compression::Zstd, 2),
            &Sink::File(out.path().to_path_buf()),
            &Control::default(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("unable to create"), "{err}");
        let ctl = Control::default();
        ctl.cancel.store(true, Ordering::Relaxed);
        let err = write_archive(
            &job(src.path(), Compression::Gzip, 2),
            &Sink::File(out.path().join("x.tar.gz")),
            &ctl,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Interrupted), "{err}");
    }

    #[test]
    fn bandwidth_limit_slows_the_stream() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("f"), vec![7u8; 300 * 1024]).unwrap();
        let mut j = job(src.path(), Compression::None, 1);
        j.bwlimit = 1024 * 1024; // 1 MiB/s; the stream is ~320 KiB
        let out = tempfile::tempdir().unwrap();
        let res = write_archive(
            &j,
            &Sink::File(out.path().join("x.tar")),
            &Control::default(),
        )
        .unwrap();
        assert!(
            res.elapsed >= Duration::from_millis(250),
            "{:?} for {} bytes",
            res.elapsed,
            res.tar_bytes
        );
    }
}
