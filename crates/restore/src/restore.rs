//! The restore executor (`pct restore`, `pct create`): PVE's `create_vm` worker with a safer
//! `--force`.
//!
//! Sequence:
//! 1. Check everything that can be checked without changing anything: parameters, the
//!    archive, the backed-up config, the target storages and volumes, an existing container
//!    (refused without `--force`; with it: not locked, not protected). A refusal changes
//!    nothing.
//! 2. Under the config flock: `lock: create` — a new config holding only the lock, or the old
//!    config (kept as it is) with the lock added.
//! 3. Allocate the new volumes, mount them below `/var/lib/lxc/<vmid>/rootfs` (bind and device
//!    mount points of the backup are not mounted: they return in the config only), extract
//!    the archive (safe extraction, id-mapped for unprivileged containers, `./dev/*` skipped,
//!    existing files kept), merge the backed-up config and firewall rules, unmount.
//! 4. Write the new config (no lock). Only then, with `--force`, free the old container's
//!    volumes that the new config does not use.
//!
//! Any error in 3–4 unmounts, frees every volume created, restores the old firewall file, and
//! removes the config again (new container) or restores the old one without the lock
//! (`--force`): a failed restore loses nothing and leaks nothing.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use vzkit_archive::{ExtractOptions, ExtractReport, IdMap as ArchiveIdMap, IdMapEntry};
use vzkit_runtime::conf::idmap::IdKind;
use vzkit_runtime::conf::mountpoint::{MountPoint, MountPointKind};
use vzkit_runtime::conf::{CtConfig, DEFAULT_MAC_PREFIX, Lock, random_ether_addr};
use vzkit_runtime::ct::root_owner;
use vzkit_runtime::disks::{alloc_disk, destroy_disks};
use vzkit_runtime::mount::{RootOwner, deactivate_volumes, mount_all, umount_all};
use vzkit_runtime::setup::Dns;
use vzkit_runtime::setup::create::{CreateParams, post_create};
use vzkit_runtime::setup::files::GuestRoot;
use vzkit_runtime::store::CtStore;
use vzkit_runtime::usage::volume_users;
use vzkit_storage::config::ContentType;
use vzkit_storage::manager::Storages;

use crate::error::{RestoreError, Result};
use crate::extractconfig::{
    ConfigMatch, archive_path, config_from_file, dedup_snapshot, is_dedup_snapshot,
};
use crate::ostype::require_ostype;
use crate::plan::{
    DiskPlan, DiskSpec, Mode as RunMode, PlannedMount, advanced_plan, apply_defaults,
    default_create_plan, merge_backup_config, simple_plan, split_params,
};
use crate::throttle::{Throttle, kib_to_bytes_per_sec, restore_bwlimit};

/// A `pct restore` or `pct create` request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Target container.
    pub vmid: u32,
    /// Archive: volume id, path, or `-` (stdin, restore only).
    pub archive: String,
    /// Default target storage (`--storage`, PVE's default `local`).
    pub storage: String,
    /// Restore or create.
    pub mode: RunMode,
    /// Overwrite an existing container.
    pub force: bool,
    /// New random MAC addresses.
    pub unique: bool,
    /// Report member errors instead of failing.
    pub ignore_unpack_errors: bool,
    /// Bandwidth limit in KiB/s.
    pub bwlimit: Option<f64>,
    /// `--unprivileged` if given.
    pub unprivileged: Option<bool>,
    /// `--start`.
    pub start: bool,
    /// Every other `--key value`: config options, `rootfs`, `mpN`, `unusedN`.
    pub params: Vec<(String, String)>,
}

/// What a successful restore did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The written config.
    pub config: CtConfig,
    /// The extraction's counters, errors (with `--ignore-unpack-errors`) and warnings.
    pub report: ExtractReport,
}

/// Message severity for the caller's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Progress (stdout in the CLI).
    Info,
    /// Warnings (stderr).
    Warn,
}

/// Where progress goes.
pub type Log<'a> = &'a mut dyn FnMut(Level, String);

/// Names files `etc/vzdump/pct.conf` and `pct.fw` inside the extracted root.
const VZDUMP_DIR: [&str; 2] = ["etc", "vzdump"];

/// Everything checked and decided before anything changes.
#[derive(Debug)]
struct Prepared {
    archive_path: Option<PathBuf>,
    conf: CtConfig,
    plan: DiskPlan,
    was_template: bool,
    old: Option<CtConfig>,
    ostype_given: bool,
    /// `pct create`'s `--password` and `--ssh-public-keys` for the guest.
    guest: CreateParams,
}

/// What step 3 created, for cleanup.
#[derive(Debug, Default)]
struct Created {
    volumes: Vec<String>,
    mounted: bool,
    /// The firewall file before we wrote one: `Some(None)` = there was none.
    old_fw: Option<Option<Vec<u8>>>,
}

/// Runs a restore or create.
///
/// # Errors
/// Refusals before anything changed ("CT N already exists", parameter and storage errors),
/// and "unable to restore CT N - `<what failed>`" (or "unable to create CT N - …") after a
/// failure that was cleaned up.
pub async fn run(storages: &Storages, req: &Request, log: Log<'_>) -> Result<Outcome> {
    if req.start {
        return Err(RestoreError::Invalid(
            "--start is not supported yet: vzkit has no LXC runtime to start containers".into(),
        ));
    }
    let store = CtStore::new(storages.layout().clone());
    let verb = match req.mode {
        RunMode::Restore => "restore",
        RunMode::Create => "create",
    };
    let prep = prepare(storages, &store, req, log)
        .await
        .map_err(|e| wrap(verb, req.vmid, e))?;
    lock_create(&store, req, prep.old.is_some()).map_err(|e| wrap(verb, req.vmid, e))?;
    let mut created = Created::default();
    let res = work(storages, &store, req, prep, &mut created, log).await;
    match res {
        Ok((outcome, old)) => {
            if let Some(old) = old {
                free_old_volumes(storages, req.vmid, &old, &outcome.config, log).await;
            }
            Ok(outcome)
        }
        Err((e, old)) => {
            cleanup(storages, &store, req, old.as_ref(), created, log).await;
            Err(wrap(verb, req.vmid, e))
        }
    }
}

fn wrap(verb: &str, vmid: u32, e: RestoreError) -> RestoreError {
    match e {
        RestoreError::Exists(_) | RestoreError::Invalid(_) => e,
        e => RestoreError::Failed(format!("unable to {verb} CT {vmid} - {e}")),
    }
}

async fn prepare(
    storages: &Storages,
    store: &CtStore,
    req: &Request,
    log: Log<'_>,
) -> Result<Prepared> {
    let split = split_params(&req.params, &req.storage)?;
    for w in &split.warnings {
        log(Level::Warn, w.clone());
    }
    let stdin = req.archive == "-";
    if stdin && req.mode == RunMode::Create {
        return Err(RestoreError::Invalid(
            "creating from a pipe is not possible; give a template archive".into(),
        ));
    }
    if stdin && split.mp_param.is_empty() {
        return Err(RestoreError::Invalid(
            "restore from pipe requires rootfs parameter".into(),
        ));
    }
    let old = if store.exists(req.vmid) {
        if !req.force {
            return Err(RestoreError::Exists(format!(
                "CT {} already exists",
                req.vmid
            )));
        }
        let old = store.load(req.vmid)?;
        old.check_lock()?;
        if old.main.protection() {
            return Err(RestoreError::Invalid(format!(
                "unable to restore CT {} - protection mode enabled",
                req.vmid
            )));
        }
        Some(old)
    } else {
        None
    };
    let archive_path = if stdin {
        None
    } else {
        Some(archive_path(storages, &req.archive).await?)
    };
    let backup = match (&archive_path, req.mode) {
        (Some(p), RunMode::Restore) => {
            log(
                Level::Info,
                format!("recovering backed-up configuration from '{}'", req.archive),
            );
            let found = config_from_file(p, ConfigMatch::Suffix)?;
            if found.openvz {
                return Err(RestoreError::Invalid(
                    "OpenVZ backups (vps.conf) are not supported".into(),
                ));
            }
            let text = String::from_utf8_lossy(&found.text);
            let (mut conf, warnings) = CtConfig::parse(req.vmid, &text)?;
            for w in warnings {
                log(Level::Warn, w);
            }
            conf.snapshots.clear();
            Some(conf)
        }
        _ => None,
    };
    let mut conf = CtConfig::default();
    let mut ostype_given = false;
    let mut guest = CreateParams::default();
    for (k, v) in &split.options {
        match k.as_str() {
            "password" if req.mode == RunMode::Create => {
                guest.password = Some(v.clone());
                continue;
            }
            "ssh-public-keys" if req.mode == RunMode::Create => {
                guest.ssh_public_keys = Some(read_ssh_keys(v)?);
                continue;
            }
            "password" | "ssh-public-keys" | "pool" | "ha-managed" => {
                return Err(RestoreError::Invalid(format!(
                    "option '{k}' is not supported by vzkit yet"
                )));
            }
            _ => {}
        }
        ostype_given |= k == "ostype";
        conf.set(k, v)?;
    }
    if req.unprivileged == Some(true) {
        conf.set("unprivileged", "1")?;
    }
    let mut was_template = false;
    if let Some(b) = &backup {
        was_template = b.main.is_template();
        conf.main.lxc.clone_from(&b.main.lxc);
        if req.unprivileged.is_none() && b.main.unprivileged() {
            conf.set("unprivileged", "1")?;
        }
    }
    conf.main.id_map()?.validate()?;
    let plan = if !split.mp_param.is_empty() {
        advanced_plan(&split.mp_param)?
    } else if let Some(b) = &backup {
        simple_plan(b, &req.storage)?
    } else {
        default_create_plan(&req.storage)
    };
    for w in &plan.warnings {
        log(Level::Warn, w.clone());
    }
    for m in &plan.mounts {
        check_mount(storages, store, req.vmid, old.as_ref(), m)?;
    }
    if plan.mounts.iter().any(|m| m.mp.quota == Some(true)) && conf.main.unprivileged() {
        return Err(RestoreError::Invalid(
            "Quotas are not supported by unprivileged containers.".into(),
        ));
    }
    Ok(Prepared {
        archive_path,
        conf,
        plan,
        was_template,
        old,
        ostype_given,
        guest,
    })
}

/// `--ssh-public-keys`: a file of `authorized_keys` lines (as `pct create` takes it).
fn read_ssh_keys(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        RestoreError::Invalid(format!("unable to read ssh public keys file '{path}': {e}"))
    })
}

/// Step 6 of `create_vm`: the target of each mount point is usable.
fn check_mount(
    storages: &Storages,
    store: &CtStore,
    vmid: u32,
    old: Option<&CtConfig>,
    m: &PlannedMount,
) -> Result<()> {
    match (&m.spec, m.mp.kind()) {
        (DiskSpec::New { storage, .. }, _) => {
            let section = storages.section(storage)?;
            storages.plugin(storage)?;
            if !section.content().contains(&ContentType::Rootdir) {
                return Err(RestoreError::Invalid(format!(
                    "storage '{storage}' does not support container directories"
                )));
            }
        }
        (DiskSpec::Existing, MountPointKind::Volume) => {
            storages.resolve(&m.mp.volume)?;
            for (other, key) in volume_users(store.layout(), &m.mp.volume)? {
                let ours = other == vmid
                    && old.is_some_and(|o| o.main.used_volumes().contains(&m.mp.volume));
                if !ours {
                    return Err(RestoreError::Invalid(format!(
                        "volume '{}' is already in use by CT {other} ({key})",
                        m.mp.volume
                    )));
                }
            }
        }
        (DiskSpec::Existing, MountPointKind::Bind) => {
            if !Path::new(&m.mp.volume).is_dir() {
                return Err(RestoreError::Invalid(format!(
                    "{}: bind mount source '{}' is not a directory",
                    m.key, m.mp.volume
                )));
            }
        }
        (DiskSpec::Existing, MountPointKind::Device) => {
            use std::os::unix::fs::FileTypeExt;
            let ok =
                std::fs::metadata(&m.mp.volume).is_ok_and(|md| md.file_type().is_block_device());
            if !ok {
                return Err(RestoreError::Invalid(format!(
                    "{}: '{}' is not a block device",
                    m.key, m.mp.volume
                )));
            }
        }
    }
    Ok(())
}

/// Step 8 (`create_and_lock_config`): `lock: create`, re-checking under the flock.
fn lock_create(store: &CtStore, req: &Request, had_old: bool) -> Result<()> {
    let _flock = store.lock(req.vmid)?;
    if store.exists(req.vmid) {
        if !req.force || !had_old {
            return Err(RestoreError::Exists(format!(
                "CT {} already exists",
                req.vmid
            )));
        }
        let mut old = store.load(req.vmid)?;
        old.check_lock()?;
        old.main.set_lock(Some(Lock::Create));
        store.write(req.vmid, &old)?;
    } else {
        if had_old {
            return Err(RestoreError::Failed(format!(
                "CT {} disappeared during the restore",
                req.vmid
            )));
        }
        let mut conf = CtConfig::default();
        conf.main.set_lock(Some(Lock::Create));
        store.write(req.vmid, &conf)?;
    }
    Ok(())
}

type WorkResult =
    std::result::Result<(Outcome, Option<CtConfig>), (RestoreError, Option<CtConfig>)>;

async fn work(
    storages: &Storages,
    store: &CtStore,
    req: &Request,
    prep: Prepared,
    created: &mut Created,
    log: Log<'_>,
) -> WorkResult {
    let old = prep.old.clone();
    match work_inner(storages, store, req, prep, created, log).await {
        Ok(o) => Ok((o, old)),
        Err(e) => Err((e, old)),
    }
}

async fn work_inner(
    storages: &Storages,
    store: &CtStore,
    req: &Request,
    prep: Prepared,
    created: &mut Created,
    log: Log<'_>,
) -> Result<Outcome> {
    let Prepared {
        archive_path,
        mut conf,
        plan,
        was_template,
        old: _,
        ostype_given,
        guest,
    } = prep;
    let vmid = req.vmid;
    let owner = root_owner(&conf)?;
    // Allocate.
    let mut mounts: Vec<(String, MountPoint)> = Vec::new();
    for m in plan.mounts {
        let mut mp = m.mp;
        if let DiskSpec::New { storage, size_kib } = &m.spec {
            let volid = alloc_disk(storages, vmid, storage, *size_kib, owner)
                .await
                .map_err(|e| {
                    RestoreError::Failed(format!("unable to create volume for {}: {e}", m.key))
                })?;
            created.volumes.push(volid.clone());
            mp.volume = volid;
            mp.size = Some(size_kib * 1024);
        }
        conf.set(&m.key, &mp.print(m.key == "rootfs")?)?;
        mounts.push((m.key, mp));
    }
    // Mount (read-only forced off, as `mount_all(..., ignore_ro=1)`).
    let root = store.layout().ct_rootfs(vmid);
    let to_mount: Vec<(String, MountPoint)> = mounts
        .iter()
        .map(|(k, mp)| {
            let mut mp = mp.clone();
            mp.ro = None;
            (k.clone(), mp)
        })
        .collect();
    let mut warn = |m: String| log(Level::Warn, m);
    created.mounted = true;
    mount_all(storages, &root, &to_mount, owner, &mut warn).await?;
    // Extract.
    if archive_path.is_some() {
        log(Level::Info, format!("restoring '{}' now..", req.archive));
    }
    let bwlimit = effective_bwlimit(storages, &mounts, req.bwlimit);
    let report = extract_archive(archive_path.as_deref(), &root, &conf, req, bwlimit, log).await?;
    // Merge.
    if req.mode == RunMode::Restore {
        log(
            Level::Info,
            "merging backed-up and given configuration..".into(),
        );
        merge_from_rootdir(store, &root, &mut conf, req, created, log)?;
    } else {
        if !ostype_given {
            let ostype = require_ostype(&root)?;
            conf.set("ostype", ostype)?;
        }
        // PVE's `post_create_hook`: randomized crontab, root password, SSH keys, host keys,
        // and the start-time files (hostname, hosts, network, DNS).
        let guest_root = GuestRoot::open(&root, owner)?;
        let host_resolv = std::fs::read_to_string(store.layout().join("/etc/resolv.conf")).ok();
        let dns = Dns::lookup(&conf, host_resolv.as_deref());
        let mut random = || {
            let mut b = [0u8; 4];
            File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .map_or(0, |()| u32::from_le_bytes(b))
        };
        post_create(
            &guest_root,
            &conf,
            &dns,
            &guest,
            storages.runner().as_ref(),
            &mut random,
        )
        .await?;
    }
    // Unmount.
    let runner = storages.runner();
    let devices: Vec<String> = mounts
        .iter()
        .filter(|(_, mp)| mp.kind() == MountPointKind::Device)
        .map(|(_, mp)| mp.volume.clone())
        .collect();
    umount_all(runner.as_ref(), &root, &devices).await?;
    created.mounted = false;
    deactivate_volumes(storages, &mounts, None, &mut |m: String| {
        log(Level::Warn, m)
    })
    .await;
    // Finish the config.
    apply_defaults(&mut conf.main, vmid);
    for (k, v) in &plan.delayed {
        conf.main.options.insert(k.clone(), v.clone());
    }
    if was_template {
        log(
            Level::Info,
            "Convert restored container to template...".into(),
        );
        for (key, mp) in &mounts {
            if mp.kind() != MountPointKind::Volume {
                continue;
            }
            let (plugin, volname) = storages.resolve(&mp.volume)?;
            let base = plugin.create_base(&volname).await?;
            let volid = format!("{}:{base}", plugin.id());
            if let Some(v) = created.volumes.iter_mut().find(|v| **v == mp.volume) {
                v.clone_from(&volid);
            }
            let mut mp = mp.clone();
            mp.volume = volid;
            conf.set(key, &mp.print(key == "rootfs")?)?;
        }
        conf.set("template", "1")?;
    }
    conf.main.set_lock(None);
    {
        let _flock = store.lock(vmid)?;
        let current = store.load(vmid)?;
        if current.get("lock") != Some(Lock::Create.as_str()) {
            return Err(RestoreError::Failed(format!(
                "config of CT {vmid} changed during the restore (lock is no longer 'create')"
            )));
        }
        store.write(vmid, &conf)?;
    }
    Ok(Outcome {
        config: conf,
        report,
    })
}

/// The restore bandwidth limit: `--bwlimit`, else the target storages' and the
/// datacenter's `bwlimit` (§4.11).
fn effective_bwlimit(
    storages: &Storages,
    mounts: &[(String, MountPoint)],
    given: Option<f64>,
) -> Option<f64> {
    let mut ids: Vec<String> = mounts
        .iter()
        .filter(|(_, mp)| mp.kind() == MountPointKind::Volume)
        .filter_map(|(_, mp)| mp.volume.split_once(':').map(|(s, _)| s.to_string()))
        .collect();
    ids.sort();
    ids.dedup();
    let props: Vec<Option<&str>> = ids
        .iter()
        .map(|id| storages.section(id).ok().and_then(|s| s.get("bwlimit")))
        .collect();
    let dc = std::fs::read_to_string(storages.layout().join("/etc/pve/datacenter.cfg"))
        .unwrap_or_default();
    let dc_prop = dc
        .lines()
        .find_map(|l| l.strip_prefix("bwlimit:").map(str::trim));
    restore_bwlimit(given, &props, dc_prop)
}

fn archive_id_map(conf: &CtConfig) -> Result<Option<ArchiveIdMap>> {
    let map = conf.main.id_map()?;
    if map.is_empty() {
        return Ok(None);
    }
    let mut entries = Vec::new();
    for e in &map.entries {
        let conv = |v: u64| {
            u32::try_from(v)
                .map_err(|_| RestoreError::Invalid(format!("id map value {v} out of range")))
        };
        entries.push(IdMapEntry {
            kind: match e.kind {
                IdKind::User => vzkit_archive::IdKind::Uid,
                IdKind::Group => vzkit_archive::IdKind::Gid,
            },
            container: conv(e.ct_start)?,
            host: conv(e.host_start)?,
            count: conv(e.count)?,
        });
    }
    Ok(Some(ArchiveIdMap::new(entries)))
}

/// `restore_archive`: decompress (format sniffed, so `.tgz` and stdin work too), throttle,
/// extract on a blocking thread.
async fn extract_archive(
    path: Option<&Path>,
    root: &Path,
    conf: &CtConfig,
    req: &Request,
    bwlimit: Option<f64>,
    log: Log<'_>,
) -> Result<ExtractReport> {
    let id_map = archive_id_map(conf)?;
    let opts = ExtractOptions::pve_restore(id_map, req.ignore_unpack_errors);
    // The volumes are written back while the extraction runs, not all at the unmount.
    let _flush = crate::flush::Flusher::start(root, crate::flush::INTERVAL);
    if let Some(p) = path.filter(|p| is_dedup_snapshot(p)) {
        return extract_dedup(p, root, opts, log).await;
    }
    match path {
        Some(p) => log(Level::Info, format!("extracting archive '{}'", p.display())),
        None => log(Level::Info, "extracting archive from STDIN".into()),
    }
    let rate = bwlimit.map_or(0, kib_to_bytes_per_sec);
    let path = path.map(Path::to_path_buf);
    let root = root.to_path_buf();
    let start = Instant::now();
    let (report, read) = tokio::task::spawn_blocking(move || -> Result<(ExtractReport, u64)> {
        let input: Box<dyn Read + Send> = match &path {
            Some(p) => Box::new(File::open(p).map_err(|e| {
                RestoreError::Failed(format!("unable to open '{}': {e}", p.display()))
            })?),
            None => Box::new(std::io::stdin()),
        };
        let counted = Counted {
            inner: Throttle::new(input, rate),
            n: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        let n = std::sync::Arc::clone(&counted.n);
        let (reader, producer) = spawn_decompressor(counted);
        let report = vzkit_archive::extract_buffered(reader, &root, &opts);
        // The reader is gone: a producer still running stops at its next send.
        if producer.join().is_err() {
            return Err(RestoreError::Failed("decompression thread panicked".into()));
        }
        Ok((report?, n.load(std::sync::atomic::Ordering::Relaxed)))
    })
    .await
    .map_err(|e| RestoreError::Failed(format!("extraction task failed: {e}")))??;
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    log(
        Level::Info,
        format!(
            "Total bytes read: {read} ({:.1}MiB, {:.1}MiB/s)",
            read as f64 / 1048576.0,
            read as f64 / 1048576.0 / secs
        ),
    );
    const SHOWN: usize = 50;
    for e in report.errors.iter().take(SHOWN) {
        log(Level::Warn, format!("unpack error ignored: {e}"));
    }
    if !report.errors.is_empty() {
        log(
            Level::Warn,
            format!(
                "{} unpack error(s) ignored (--ignore-unpack-errors){}",
                report.errors.len(),
                if report.errors.len() > SHOWN {
                    " - only the first 50 are shown"
                } else {
                    ""
                }
            ),
        );
    }
    Ok(report)
}

/// Restore a `dedup` store snapshot: its tar stream, rebuilt from the catalog and chunks,
/// goes through the same extractor. Files with damaged chunks are not left behind; they are
/// logged and make the restore fail after everything else is extracted (which frees the new
/// volumes, as any failed restore), unless `--ignore-unpack-errors` keeps the rest.
async fn extract_dedup(
    path: &Path,
    root: &Path,
    opts: ExtractOptions,
    log: Log<'_>,
) -> Result<ExtractReport> {
    let (store, snap) = dedup_snapshot(path)?;
    let ignore = opts.ignore_unpack_errors;
    log(
        Level::Info,
        format!(
            "extracting snapshot '{}' of dedup store '{}'",
            snap.name(),
            store.root().display()
        ),
    );
    let root = root.to_path_buf();
    let start = Instant::now();
    let report = tokio::task::spawn_blocking(move || {
        vzkit_dedup::snapshot::restore(&store, &snap, &root, &opts, None)
    })
    .await
    .map_err(|e| RestoreError::Failed(format!("extraction task failed: {e}")))?
    .map_err(|e| RestoreError::Failed(e.to_string()))?;
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    let bytes = report.extract.bytes;
    log(
        Level::Info,
        format!(
            "Total bytes written: {bytes} ({:.1}MiB, {:.1}MiB/s)",
            bytes as f64 / 1048576.0,
            bytes as f64 / 1048576.0 / secs
        ),
    );
    for e in report.extract.errors.iter().take(50) {
        log(Level::Warn, format!("unpack error ignored: {e}"));
    }
    if !report.failed.is_empty() {
        for f in &report.failed {
            log(
                Level::Warn,
                format!("error: file '{}' not restored: {}", f.member, f.error),
            );
        }
        let msg = format!(
            "{} file(s) could not be restored from damaged chunks (run verify on the store)",
            report.failed.len()
        );
        if !ignore {
            return Err(RestoreError::Failed(msg));
        }
        log(
            Level::Warn,
            format!("{msg} - ignored (--ignore-unpack-errors)"),
        );
    }
    Ok(report.extract)
}

/// Chunks the decompression thread hands to the extractor.
const CHUNK: usize = 1 << 20;
/// Chunks in flight (bounded memory: 16 MiB).
const CHUNKS_IN_FLIGHT: usize = 16;

/// Decompresses `input` on its own thread (as `zstd -d | tar x` runs two processes), so
/// decompression and file creation overlap. Errors of the stream reach the reader.
fn spawn_decompressor<R: Read + Send + 'static>(
    input: R,
) -> (ChannelReader, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(CHUNKS_IN_FLIGHT);
    // Emptied chunks come back for reuse, so buffers are not allocated and zeroed anew.
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    let handle = std::thread::spawn(move || {
        let res = (|| -> std::io::Result<()> {
            let (_, mut dec) =
                vzkit_archive::decompressor_auto(BufReader::with_capacity(CHUNK, input))?;
            loop {
                let mut buf = free_rx.try_recv().unwrap_or_default();
                buf.resize(CHUNK, 0);
                let mut len = 0;
                while len < buf.len() {
                    match dec.read(&mut buf[len..]) {
                        Ok(0) => break,
                        Ok(k) => len += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if len == 0 {
                    return Ok(());
                }
                buf.truncate(len);
                if tx.send(Ok(buf)).is_err() {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = res {
            // The extractor may be gone already; then nobody needs the error.
            let _ = tx.send(Err(e));
        }
    });
    (
        ChannelReader {
            rx,
            free: free_tx,
            cur: Vec::new(),
            pos: 0,
        },
        handle,
    )
}

/// The extractor's end of [`spawn_decompressor`].
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    free: std::sync::mpsc::SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::io::BufRead for ChannelReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    let done = std::mem::replace(&mut self.cur, chunk);
                    self.pos = 0;
                    // A full free list or a finished producer just drops the buffer.
                    let _ = self.free.try_send(done);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        vzkit_archive::reader::read_buffered(self, buf)
    }
}

/// A reader counting what passes through (the compressed bytes, as tar's `--totals`).
struct Counted<R> {
    inner: R,
    n: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n
            .fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(k)
    }
}

/// Opens `etc/vzdump` below `root` without following symlinks.
fn open_vzdump_dir(root: &Path) -> Option<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::open(root, flags, Mode::empty()).ok()?;
    for c in VZDUMP_DIR {
        fd = rustix::fs::openat(&fd, c, flags, Mode::empty()).ok()?;
    }
    Some(fd)
}

/// Reads a regular file `name` in `dir` (no symlinks, no devices); `None` if absent.
fn read_regular(dir: &OwnedFd, name: &str) -> Result<Option<Vec<u8>>> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(RestoreError::Failed(format!("stat {name}: {e}"))),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| RestoreError::Failed(format!("open {name}: {e}")))?;
    let mut buf = Vec::new();
    File::from(fd)
        .take(crate::extractconfig::MAX_CONFIG_SIZE)
        .read_to_end(&mut buf)
        .map_err(|e| RestoreError::Failed(format!("read {name}: {e}")))?;
    Ok(Some(buf))
}

fn unlink_in(dir: &OwnedFd, name: &str) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(RestoreError::Failed(format!(
            "unable to remove etc/vzdump/{name} from the restored root: {e}"
        ))),
    }
}

/// `restore_configuration` for tar archives: merge `etc/vzdump/pct.conf` of the extracted
/// root, install `pct.fw`, remove both from the root.
fn merge_from_rootdir(
    store: &CtStore,
    root: &Path,
    conf: &mut CtConfig,
    req: &Request,
    created: &mut Created,
    log: Log<'_>,
) -> Result<()> {
    let dir = open_vzdump_dir(root);
    let pct = match &dir {
        Some(d) => read_regular(d, "pct.conf")?,
        None => None,
    };
    let Some(pct) = pct else {
        log(
            Level::Info,
            "###########################################################".into(),
        );
        log(
            Level::Info,
            "Backup archive does not contain any configuration".into(),
        );
        log(
            Level::Info,
            "###########################################################".into(),
        );
        return Ok(());
    };
    let dir = dir.expect("pct.conf was read from it");
    let (backup, warnings) = CtConfig::parse(req.vmid, &String::from_utf8_lossy(&pct))?;
    for w in warnings {
        log(Level::Warn, w);
    }
    let mut new_mac = || -> Result<String> {
        let mut r = [0u8; 6];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut r))
            .map_err(|e| RestoreError::Failed(format!("unable to read /dev/urandom: {e}")))?;
        Ok(random_ether_addr(Some(DEFAULT_MAC_PREFIX), r)?)
    };
    merge_backup_config(&mut conf.main, &backup.main, req.unique, &mut new_mac)?;
    unlink_in(&dir, "pct.conf")?;
    if let Some(fw) = read_regular(&dir, "pct.fw")?
        && !fw.is_empty()
    {
        let target = store.layout().ct_firewall(req.vmid);
        let old = match std::fs::read(&target) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(RestoreError::Failed(format!(
                    "unable to read '{}': {e}",
                    target.display()
                )));
            }
        };
        created.old_fw = Some(old);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| RestoreError::Failed(format!("mkdir '{}': {e}", parent.display())))?;
        }
        std::fs::write(&target, &fw).map_err(|e| {
            RestoreError::Failed(format!("unable to write '{}': {e}", target.display()))
        })?;
    }
    unlink_in(&dir, "pct.fw")?;
    Ok(())
}

/// Error cleanup: unmount, free created volumes, restore the firewall file, remove the new
/// config or restore the old one.
async fn cleanup(
    storages: &Storages,
    store: &CtStore,
    req: &Request,
    old: Option<&CtConfig>,
    created: Created,
    log: Log<'_>,
) {
    let vmid = req.vmid;
    let root = store.layout().ct_rootfs(vmid);
    if created.mounted {
        let runner = storages.runner();
        if let Err(e) = umount_all(runner.as_ref(), &root, &[]).await {
            log(
                Level::Warn,
                format!("unable to unmount '{}': {e}", root.display()),
            );
        }
    }
    let mut warn = |m: String| log(Level::Warn, m);
    for volid in &created.volumes {
        if let Ok((plugin, volname)) = storages.resolve(volid)
            && let Err(e) = plugin.deactivate_volume(&volname, None).await
        {
            warn(format!("unable to deactivate '{volid}': {e}"));
        }
    }
    destroy_disks(storages, &created.volumes, &mut warn).await;
    if let Some(old_fw) = created.old_fw {
        let target = store.layout().ct_firewall(vmid);
        let res = match old_fw {
            Some(bytes) => std::fs::write(&target, bytes),
            None => std::fs::remove_file(&target),
        };
        if let Err(e) = res {
            warn(format!("unable to restore '{}': {e}", target.display()));
        }
    }
    // Only empty directories are removed: anything still mounted keeps them.
    let _ = std::fs::remove_dir(&root);
    let _ = std::fs::remove_dir(store.layout().ct_dir(vmid));
    let res = match old {
        None => store.remove(vmid),
        Some(old) => {
            let _flock = store.lock(vmid);
            store.write(vmid, old)
        }
    };
    if let Err(e) = res {
        warn(format!("unable to clean up the config of CT {vmid}: {e}"));
    }
}

/// After a successful `--force` restore: free the old volumes the new config does not use
/// (only those owned by `vmid`, as `destroy_lxc_container`).
async fn free_old_volumes(
    storages: &Storages,
    vmid: u32,
    old: &CtConfig,
    new: &CtConfig,
    log: Log<'_>,
) {
    let keep = new.main.used_volumes();
    let mut vols: Vec<String> = old.main.used_volumes().into_iter().collect();
    vols.extend(old.main.unused_volumes().into_iter().map(|(_, v)| v));
    if let Ok(p) = old.pending.mountpoints() {
        vols.extend(
            p.into_iter()
                .filter(|(_, mp)| mp.kind() == MountPointKind::Volume)
                .map(|(_, mp)| mp.volume),
        );
    }
    vols.sort();
    vols.dedup();
    for volid in vols.into_iter().filter(|v| !keep.contains(v)) {
        let owner = storages
            .resolve(&volid)
            .and_then(|(p, name)| p.parse_volname(&name))
            .map(|p| p.vmid);
        match owner {
            Ok(Some(o)) if o == vmid => {
                if let Err(e) = storages.vdisk_free(&volid).await {
                    log(
                        Level::Warn,
                        format!("unable to free old volume '{volid}': {e}"),
                    );
                }
            }
            Ok(_) => log(
                Level::Warn,
                format!("ignore deletion of '{volid}', CT {vmid} isn't the owner!"),
            ),
            Err(e) => log(
                Level::Warn,
                format!("unable to free old volume '{volid}': {e}"),
            ),
        }
    }
}

/// The host uid/gid of the container root of `conf` (for callers that prepare volumes).
///
/// # Errors
/// An id map that does not map root.
pub fn container_root_owner(conf: &CtConfig) -> Result<RootOwner> {
    Ok(root_owner(conf)?)
}
