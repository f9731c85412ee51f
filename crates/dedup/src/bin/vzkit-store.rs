//! `vzkit-store`: back up container trees into a deduplicating store and
//! list, restore, export, verify, prune and garbage-collect its snapshots.
//!
//! The store is `--store <path | dedup storage id>`; without it, the storage
//! of a volume id argument (`backups:backup/ct/100/2026-11-28T15:14:09Z`)
//! is used (`storage.cfg` of the host named by `VZKIT_ROOT`). Snapshots
//! are also accepted as `ct/<vmid>/<RFC 3339 UTC time>`. Exit status: 0 on
//! success, 1 on errors, 2 when verify or restore found damaged data.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use vzkit_archive::{ExcludeSet, ExtractOptions, IdMap};
use vzkit_dedup::backup::{Backup, BackupOptions, ChangeDetection};
use vzkit_dedup::snapshot::{self, SnapshotRef};
use vzkit_dedup::{Store, gc, prune, verify};
use vzkit_storage::prune::PruneOptions;

#[derive(Parser, Debug)]
#[command(
    name = "vzkit-store",
    about = "Deduplicated, incremental container backup store"
)]
struct Cli {
    /// The store: a directory, or the id of a `dedup` storage in storage.cfg.
    #[arg(long, env = "VZKIT_STORE")]
    store: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Back up a tree (and mount point trees) as a new snapshot.
    Backup {
        /// Container id (the backup group).
        vmid: u32,
        /// The root file system tree.
        rootfs: PathBuf,
        /// Mount point trees: `<member prefix>=<dir>` (`./mnt/data=/mnt/x`).
        #[arg(long = "mount")]
        mounts: Vec<String>,
        /// The container config stored as `./etc/vzdump/pct.conf`.
        #[arg(long)]
        conf: Option<PathBuf>,
        /// mtime of the config members (seconds); default now.
        #[arg(long)]
        conf_mtime: Option<i64>,
        /// Exclude pattern (vzdump `--exclude-path` syntax).
        #[arg(long = "exclude-path")]
        exclude: Vec<String>,
        /// `metadata` (default) or `data`.
        #[arg(long, default_value = "metadata")]
        change_detection: String,
        /// Store ids as an unprivileged container with PVE's default map sees them.
        #[arg(long)]
        unprivileged: bool,
        /// Snapshot time (seconds since the epoch); default now.
        #[arg(long)]
        time: Option<i64>,
        /// zstd level of chunks.
        #[arg(long, default_value_t = vzkit_dedup::backup::CHUNK_LEVEL)]
        level: i32,
        /// Average chunk size in KiB (min = avg/4, max = avg*4); for measurements.
        #[arg(long, hide = true)]
        chunk_avg_kib: Option<usize>,
        /// Files smaller than this many bytes share chunks (default: the minimum chunk
        /// size); 0 gives every file chunks of its own.
        #[arg(long)]
        pack_below: Option<u64>,
    },
    /// List snapshots.
    List {
        /// Only this group.
        vmid: Option<u32>,
    },
    /// Restore a snapshot into a directory (like `pct restore` extracts).
    Restore {
        snapshot: String,
        target: PathBuf,
        /// Map ids with PVE's default unprivileged map.
        #[arg(long)]
        unprivileged: bool,
    },
    /// Write a snapshot as a vzdump `.tar.zst` archive.
    Export { snapshot: String, file: PathBuf },
    /// Re-hash every chunk of a snapshot (or of all snapshots).
    Verify { snapshot: Option<String> },
    /// Remove chunks no snapshot references.
    GarbageCollect {
        /// Grace period in seconds.
        #[arg(long, default_value_t = 300)]
        grace: u64,
    },
    /// List the members of a snapshot at or below a path.
    Files {
        snapshot: String,
        #[arg(default_value = "")]
        path: String,
    },
    /// Extract one file or directory of a snapshot into a directory.
    ExtractFile {
        snapshot: String,
        path: String,
        dest: PathBuf,
    },
    /// Print the stored container config.
    Extractconfig { snapshot: String },
    /// Show or set the notes of a snapshot.
    Notes {
        snapshot: String,
        text: Option<String>,
    },
    /// Set or clear the protection of a snapshot.
    Protect { snapshot: String, on: u8 },
    /// Remove a snapshot.
    Remove { snapshot: String },
    /// Prune snapshots (`prune-backups` semantics).
    Prune {
        vmid: Option<u32>,
        /// `keep-last=3,keep-daily=7,…`
        #[arg(long)]
        keep: String,
        #[arg(long)]
        dry_run: bool,
    },
}

fn snap(s: &str) -> Result<SnapshotRef> {
    let s = if s.starts_with("ct/") || s.starts_with("backup/") {
        s
    } else {
        s.split_once(':').map_or(s, |(_, v)| v)
    };
    Ok(SnapshotRef::parse(s)?)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[allow(clippy::too_many_lines)]
/// The volume id or snapshot argument of a command, if any.
fn snapshot_arg(cmd: &Cmd) -> Option<&str> {
    match cmd {
        Cmd::Restore { snapshot, .. }
        | Cmd::Export { snapshot, .. }
        | Cmd::Files { snapshot, .. }
        | Cmd::ExtractFile { snapshot, .. }
        | Cmd::Extractconfig { snapshot }
        | Cmd::Notes { snapshot, .. }
        | Cmd::Protect { snapshot, .. }
        | Cmd::Remove { snapshot } => Some(snapshot),
        Cmd::Verify { snapshot } => snapshot.as_deref(),
        _ => None,
    }
}

/// The store directory: `--store` as a path or storage id, else the storage of the volid.
fn store_path(store: Option<&str>, snapshot: Option<&str>) -> Result<PathBuf> {
    let id = match store {
        Some(s) if s.contains('/') || std::path::Path::new(s).is_dir() => {
            return Ok(PathBuf::from(s));
        }
        Some(s) => s.to_string(),
        None => match snapshot.and_then(|v| v.split_once(':')).map(|(s, _)| s) {
            Some(s) if !s.starts_with("ct/") && !s.starts_with("backup/") => s.to_string(),
            _ => bail!(
                "no store given: use --store <path|storage> or a volume id '<storage>:backup/ct/<vmid>/<time>'"
            ),
        },
    };
    let (storages, _) = vzkit_storage::manager::Storages::load(
        vzkit_host::paths::Layout::from_env(),
        std::sync::Arc::new(vzkit_host::command::SystemRunner),
    )?;
    let section = storages.section(&id)?;
    if section.storage_type() != "dedup" {
        bail!(
            "storage '{id}' is not a dedup storage (type '{}')",
            section.storage_type()
        );
    }
    section
        .path()
        .map(std::path::Path::to_path_buf)
        .with_context(|| format!("storage '{id}' has no path"))
}

fn run(cli: Cli) -> Result<u8> {
    let root = store_path(cli.store.as_deref(), snapshot_arg(&cli.cmd))?;
    let store = Store::open(&root)?;
    match cli.cmd {
        Cmd::Backup {
            vmid,
            rootfs,
            mounts,
            conf,
            conf_mtime,
            exclude,
            change_detection,
            unprivileged,
            time,
            level,
            chunk_avg_kib,
            pack_below,
        } => {
            let mut o = BackupOptions::new(vmid);
            o.change_detection = change_detection.parse::<ChangeDetection>()?;
            o.time = time;
            o.level = level;
            if let Some(avg) = chunk_avg_kib {
                let avg = (avg.clamp(1, 4096) * 1024) & !1;
                o.chunk_sizes = vzkit_dedup::chunker::ChunkSizes {
                    min: avg / 4,
                    avg,
                    max: avg * 4,
                };
                o.pack_below = (avg / 4) as u64;
            }
            if let Some(p) = pack_below {
                o.pack_below = p;
            }
            o.id_map = unprivileged.then(IdMap::pve_default_unprivileged);
            let (excludes, bad) = ExcludeSet::from_vzdump_patterns(&exclude);
            if let Some(b) = bad.first() {
                bail!("invalid exclude pattern '{b}'");
            }
            let mut b = Backup::start(&store, o)?;
            eprintln!("creating snapshot {}", b.snapshot().name());
            let mtime = conf_mtime.unwrap_or_else(|| jiff::Timestamp::now().as_second());
            let conf = match conf {
                Some(p) => std::fs::read(&p).with_context(|| format!("read '{}'", p.display()))?,
                None => Vec::new(),
            };
            b.add_data("./etc/vzdump/pct.conf", &conf, 0o644, mtime)?;
            b.add_data("./etc/vzdump/pct.fw", b"", 0o644, mtime)?;
            b.add_tree(&rootfs, "./", &excludes, true)?;
            for m in mounts {
                let Some((prefix, dir)) = m.split_once('=') else {
                    bail!("invalid --mount '{m}' (expected <member prefix>=<dir>)");
                };
                b.add_tree(std::path::Path::new(dir), prefix, &excludes, true)?;
            }
            let r = b.finish()?;
            for w in &r.stats.warnings {
                eprintln!("warning: {w}");
            }
            let mut v = serde_json::to_value(&r.stats)?;
            v["snapshot"] = r.snapshot.name().into();
            v["seconds"] = r.seconds.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::List { vmid } => {
            let rows: Vec<_> = snapshot::list(&store, vmid)?
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "snapshot": s.snapshot.name(),
                        "ctime": s.snapshot.time,
                        "size": s.size,
                        "notes": s.notes,
                        "protected": u8::from(s.protected),
                        "verification": s.verify.map(|v| v.state),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Cmd::Restore {
            snapshot: s,
            target,
            unprivileged,
        } => {
            let s = snap(&s)?;
            let opts = ExtractOptions::pve_restore(
                unprivileged.then(IdMap::pve_default_unprivileged),
                false,
            );
            let r = snapshot::restore(&store, &s, &target, &opts, None)?;
            for w in &r.extract.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "restored {} entries, {} bytes",
                r.extract.entries, r.extract.bytes
            );
            if !r.failed.is_empty() {
                for f in &r.failed {
                    eprintln!("error: file '{}' not restored: {}", f.member, f.error);
                }
                eprintln!("{} file(s) could not be restored", r.failed.len());
                return Ok(2);
            }
        }
        Cmd::Export { snapshot: s, file } => {
            let n = snapshot::export(&store, &snap(&s)?, &file, 3)?;
            // Not on stdout: the archive may be going there.
            eprintln!("exported {n} bytes of tar to '{}'", file.display());
        }
        Cmd::Verify { snapshot: s } => {
            let list = match s {
                Some(s) => vec![snap(&s)?],
                None => snapshot::list(&store, None)?
                    .into_iter()
                    .map(|s| s.snapshot)
                    .collect(),
            };
            let mut good = HashMap::new();
            let mut failed = 0;
            for s in list {
                let r = verify::verify(&store, &s, &mut good)?;
                println!(
                    "{}: {} ({} chunk references, {} chunks checked)",
                    s.name(),
                    if r.ok() { "ok" } else { "FAILED" },
                    r.chunks,
                    r.chunks_checked
                );
                for p in &r.bad_parts {
                    println!("  bad part: {p}");
                }
                for b in &r.bad_chunks {
                    println!("  bad chunk {}: {}", b.digest, b.error);
                    for f in &b.files {
                        println!("    used by {f}");
                    }
                }
                failed += u32::from(!r.ok());
            }
            if failed > 0 {
                return Ok(2);
            }
        }
        Cmd::GarbageCollect { grace } => {
            let r = gc::garbage_collect(&store, Duration::from_secs(grace))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "snapshots": r.snapshots,
                    "chunks-marked": r.chunks_marked,
                    "missing": r.missing,
                    "chunks-removed": r.chunks_removed,
                    "bytes-removed": r.bytes_removed,
                    "chunks-kept": r.chunks_kept,
                    "tmp-removed": r.tmp_removed,
                    "stale-snapshots-removed": r.stale_snapshots_removed,
                    "bad-chunks-cleared": r.bad_chunks_cleared,
                }))?
            );
        }
        Cmd::Files { snapshot: s, path } => {
            let mut out = std::io::stdout().lock();
            snapshot::files(&store, &snap(&s)?, &path, &mut |m| {
                use std::io::Write;
                let t = match m.kind {
                    vzkit_archive::MemberKind::Regular => '-',
                    vzkit_archive::MemberKind::Directory => 'd',
                    vzkit_archive::MemberKind::Symlink => 'l',
                    vzkit_archive::MemberKind::HardLink => 'h',
                    vzkit_archive::MemberKind::CharDevice => 'c',
                    vzkit_archive::MemberKind::BlockDevice => 'b',
                    vzkit_archive::MemberKind::Fifo => 'p',
                };
                let size = m.sparse.as_ref().map_or(m.size, |(s, _)| *s);
                let _ = writeln!(
                    out,
                    "{t} {:04o} {}/{} {size:>12} {}",
                    m.mode & 0o7777,
                    m.uid,
                    m.gid,
                    m.name_lossy()
                );
                Ok(())
            })?;
        }
        Cmd::ExtractFile {
            snapshot: s,
            path,
            dest,
        } => {
            let r = snapshot::extract_path(&store, &snap(&s)?, &path, &dest)?;
            println!(
                "extracted {} entries, {} bytes",
                r.extract.entries, r.extract.bytes
            );
            if !r.failed.is_empty() {
                for f in &r.failed {
                    eprintln!("error: file '{}' not restored: {}", f.member, f.error);
                }
                return Ok(2);
            }
        }
        Cmd::Extractconfig { snapshot: s } => {
            use std::io::Write;
            std::io::stdout().write_all(&snapshot::config(&store, &snap(&s)?)?)?;
        }
        Cmd::Notes { snapshot: s, text } => match text {
            Some(t) => snapshot::set_notes(&store, &snap(&s)?, &t)?,
            None => print!("{}", snapshot::notes(&store, &snap(&s)?)?),
        },
        Cmd::Protect { snapshot: s, on } => snapshot::set_protected(&store, &snap(&s)?, on != 0)?,
        Cmd::Remove { snapshot: s } => snapshot::remove(&store, &snap(&s)?)?,
        Cmd::Prune {
            vmid,
            keep,
            dry_run,
        } => {
            let keep = PruneOptions::parse(&keep).map_err(|e| anyhow::anyhow!("{e}"))?;
            let entries = prune::prune(&store, vmid, &keep, dry_run, &|s| s.name())?;
            for e in entries {
                let mark = e
                    .mark
                    .map_or("-".to_string(), |m| format!("{m:?}").to_lowercase());
                println!("{} {mark}", e.volid);
            }
        }
    }
    Ok(0)
}
