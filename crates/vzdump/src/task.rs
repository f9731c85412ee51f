//! One guest's backup (`exec_backup_task` of pve-manager 14a22df and the LXC plugin of
//! pve-container), in PVE's order:
//!
//! 1. retention pre-check; names; the temporary archive (`.dat`) is removed if present;
//!    the temporary directory; the guest log `/var/log/vzdump/lxc-<vmid>.log`;
//! 2. "Starting Backup of VM N (lxc)", "status = running|stopped", `lock: backup`
//!    (a locked container fails here with "CT is locked (…)", its lock untouched);
//! 3. the mode (`stop` for a stopped container; snapshot falls back to suspend on a mode
//!    failure), "backup mode: …", "bandwidth limit: …", "ionice priority: …";
//! 4. the mode's steps with the hook phases (`backup-start`, `pre-stop`, `pre-restart`,
//!    `post-restart`), the config and firewall files, the archive (to the `.dat` name, fsynced,
//!    renamed), its size, vzkit's blake3 checksum (`<archive>.blake3`), notes, protection,
//!    pruning, `backup-end`;
//! 5. always: unlock, unmount, remove the `vzdump` snapshot, resume or restart the guest,
//!    remove the temporary archive and directory; "Finished Backup of VM N (HH:MM:SS)" or
//!    "Backup of VM N failed - …" (+ `backup-abort`); the guest log copied beside the archive
//!    (also on failure); `log-end`.
//!
//! Everything the task changes on the host is recorded in its [`Journal`] first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use vzkit_archive::{IdKind as ArchiveIdKind, IdMap as ArchiveIdMap, IdMapEntry as ArchiveIdEntry};
use vzkit_host::command::{Cmd, Runner};
use vzkit_host::paths::Layout;
use vzkit_runtime::conf::{CtConfig, IdKind, Lock, MountPoint};
use vzkit_runtime::ct::root_owner;
use vzkit_runtime::mount::{RootOwner, deactivate_volumes};
use vzkit_runtime::store::CtStore;
use vzkit_storage::manager::Storages;
use vzkit_storage::plugin::VolumeAttribute;

use crate::error::{Error, Result};
use crate::guest::{GuestControl, GuestStatus};
use crate::hook::{HookScript, HookTask};
use crate::journal::Journal;
use crate::log::{Level, TaskLog, format_size, format_time, local_time_string, tar_totals_line};

use crate::mounts::{MountRoots, mount_disks, prepare_mount_root, umount_targets, used_bytes};
use crate::notes::{NotesVars, expand_notes_template};
use crate::options::JobOptions;
use crate::pipeline::{ArchiveJob, ArchiveOutcome, ArchiveSource, Control, Sink, write_archive};
use crate::plan::{
    CompressorChoice, Mode, VolumePlan, archive_names, backup_volumes, basename, effective_mode,
    exclude_set, fstype_of, is_mode_failure, tmpdir_for,
};
use crate::progress::ProgressBar;
use crate::prune::{Target, blake3_path, prune_after_backup, retention_precheck};
use crate::snapshot::{VZDUMP_SNAP, check_snapshot_feature, snapshot_create, snapshot_delete};

/// `rsync`, for suspend mode's copies.
pub const RSYNC: &str = "rsync";

/// What all tasks of a job share.
#[derive(Debug)]
pub struct JobContext {
    /// Path layout.
    pub layout: Layout,
    /// Storages.
    pub storages: Storages,
    /// Container configs.
    pub store: CtStore,
    /// Container state and lifecycle.
    pub guest: Arc<dyn GuestControl>,
    /// The log.
    pub log: TaskLog,
    /// The resolved options.
    pub opts: JobOptions,
    /// Exclude patterns (vzdump.conf, command line, standard excludes).
    pub exclude_patterns: Vec<String>,
    /// Hook script.
    pub hooks: HookScript,
    /// Compressor.
    pub compressor: CompressorChoice,
    /// Set by SIGINT/SIGTERM/SIGHUP/SIGQUIT.
    pub cancel: Arc<AtomicBool>,
    /// Draw a progress bar.
    pub progress: bool,
    /// Node name (notes `{{node}}`).
    pub node: String,
}

impl JobContext {
    /// [`Error::Interrupted`] once a signal arrived.
    ///
    /// # Errors
    /// As described.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn runner(&self) -> Arc<dyn Runner> {
        self.storages.runner()
    }
}

/// The result of one guest's backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    /// The guest.
    pub vmid: u32,
    /// Error message, if it failed.
    pub error: Option<String>,
    /// A signal ended it (the job stops).
    pub interrupted: bool,
    /// The archive (`-` for stdout).
    pub target: Option<String>,
    /// Archive size.
    pub size: u64,
}

/// Per-task state, for the steps and for the cleanup.
#[derive(Debug)]
struct Task {
    vmid: u32,
    mode: Mode,
    hook: HookTask,
    journal: Option<Journal>,
    tmplog: Option<PathBuf>,
    logfile: Option<PathBuf>,
    tmptar: Option<PathBuf>,
    tmpdir: Option<PathBuf>,
    locked: bool,
    prepared: bool,
    snapshot_made: bool,
    resume: bool,
    restart: bool,
    vmstoptime: Option<Instant>,
    plan: VolumePlan,
    owner: RootOwner,
    id_map: Option<ArchiveIdMap>,
    unprivileged: bool,
    sources: Vec<ArchiveSource>,
    /// Suspend mode: where rsync reads each disk from.
    suspend_from: Option<PathBuf>,
    size: u64,
}

fn io_msg(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::msg(format!("{what} '{}' - {e}", path.display()))
}

fn roots(layout: &Layout) -> MountRoots {
    MountRoots {
        root: layout.vzsnap(0),
        side: layout.join("/mnt/vzsnap0.mp"),
    }
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
                .map_err(|_| Error::msg(format!("id map entry out of range: {}", e.to_line())))
        };
        entries.push(ArchiveIdEntry {
            kind: match e.kind {
                IdKind::User => ArchiveIdKind::Uid,
                IdKind::Group => ArchiveIdKind::Gid,
            },
            container: conv(e.ct_start)?,
            host: conv(e.host_start)?,
            count: conv(e.count)?,
        });
    }
    Ok(Some(ArchiveIdMap::new(entries)))
}

fn remove_tree(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn now_string(log: &TaskLog) -> String {
    local_time_string(&log.tz(), Timestamp::now())
}

/// Back up one guest; never fails (the outcome says how it went).
pub async fn exec_backup_task(ctx: &JobContext, vmid: u32) -> TaskOutcome {
    let start = Instant::now();
    let requested = ctx
        .opts
        .mode
        .as_deref()
        .map_or(Ok(Mode::Snapshot), Mode::parse)
        .unwrap_or(Mode::Snapshot);
    let mut t = Task {
        vmid,
        mode: requested,
        hook: HookTask {
            mode: requested.as_str().to_string(),
            vmid,
            ..HookTask::default()
        },
        journal: None,
        tmplog: None,
        logfile: None,
        tmptar: None,
        tmpdir: None,
        locked: false,
        prepared: false,
        snapshot_made: false,
        resume: false,
        restart: false,
        vmstoptime: None,
        plan: VolumePlan::default(),
        owner: RootOwner::default(),
        id_map: None,
        unprivileged: false,
        sources: Vec::new(),
        suspend_from: None,
        size: 0,
    };
    let res = run_steps(ctx, &mut t).await;
    cleanup(ctx, &mut t).await;

    let log = &ctx.log;
    let delay = start.elapsed().as_secs();
    let (error, interrupted) = match &res {
        Ok(()) => {
            log.info(format!(
                "Finished Backup of VM {vmid} ({})",
                format_time(delay)
            ));
            log.task(
                Level::Info,
                format!("Backup finished at {}", now_string(log)),
            );
            (None, false)
        }
        Err(e) => {
            log.err(format!("Backup of VM {vmid} failed - {e}"));
            log.task(Level::Info, format!("Failed at {}", now_string(log)));
            // PVE ignores errors of this phase.
            if let Err(h) = ctx.hooks.run("backup-abort", Some(&t.hook), log).await {
                log.task(Level::Warn, format!("hook script failed: {h}"));
            }
            (Some(e.to_string()), matches!(e, Error::Interrupted))
        }
    };
    log.close_guest_log();
    if let (Some(tmplog), Some(logfile)) = (&t.tmplog, &t.logfile)
        && let Err(e) = std::fs::copy(tmplog, logfile)
    {
        log.task(
            Level::Warn,
            format!("unable to copy the log to '{}' - {e}", logfile.display()),
        );
    }
    if let Err(h) = ctx.hooks.run("log-end", Some(&t.hook), log).await {
        log.task(Level::Warn, format!("hook script failed: {h}"));
    }
    if let Some(j) = t.journal.take()
        && let Err(e) = j.remove()
    {
        log.task(Level::Warn, e.to_string());
    }
    TaskOutcome {
        vmid,
        error,
        interrupted,
        target: t.hook.target.clone(),
        size: t.size,
    }
}

async fn run_steps(ctx: &JobContext, t: &mut Task) -> Result<()> {
    let (log, opts, vmid) = (&ctx.log, &ctx.opts, t.vmid);
    if !ctx.store.exists(vmid) {
        return Err(Error::msg(format!("unable to find VM '{vmid}'")));
    }
    let now = Timestamp::now().to_zoned_datetime(log.tz());
    let base = basename(vmid, &now);
    let keep = opts.prune_backups.clone().unwrap_or_default();
    let remove = opts.remove == Some(true);
    let dumpdir = opts
        .dumpdir
        .clone()
        .ok_or_else(|| Error::msg("no dump directory (PBS storages are not supported)"))?;
    let target_kind = match opts.storage.as_deref() {
        Some(s) => Target::Storage(s),
        None => Target::Dir(Path::new(&dumpdir)),
    };
    retention_precheck(
        &ctx.storages,
        target_kind,
        vmid,
        &keep,
        remove,
        opts.protected == Some(true),
    )
    .await?;

    let names = archive_names(&dumpdir, &base, ctx.compressor.compression);
    t.logfile = Some(names.logfile.clone());
    t.hook.logfile = Some(names.logfile.display().to_string());
    let stdout = opts.stdout == Some(true);
    if stdout {
        t.hook.target = Some("-".into());
    } else {
        t.hook.target = Some(names.target.display().to_string());
        // PVE's plain `unlink`: a failure shows when the archive is created.
        let _ = std::fs::remove_file(&names.tmptar);
        t.tmptar = Some(names.tmptar.clone());
    }
    t.hook.vmtype = Some("lxc".into());

    let mut journal = Journal::create(&ctx.layout, vmid)?;
    let tmplog = ctx.layout.vzdump_log_dir().join(format!("lxc-{vmid}.log"));
    journal.update(|s| {
        s.tmptar = t.tmptar.clone();
        s.tmplog = Some(tmplog.clone());
        s.logfile = t.logfile.clone();
    })?;
    t.journal = Some(journal);

    let canonical = std::fs::canonicalize(&dumpdir).unwrap_or_else(|_| PathBuf::from(&dumpdir));
    let mounts = vzkit_host::mount::mount_table().unwrap_or_default();
    let fstype = fstype_of(&canonical, &mounts);
    let (tmpdir, line) = tmpdir_for(
        &ctx.layout,
        opts.tmpdir.as_deref(),
        &dumpdir,
        fstype.as_deref(),
        &base,
        std::process::id(),
        vmid,
    );
    if let Some(l) = line {
        log.info(l);
    }
    remove_tree(&tmpdir).map_err(|e| io_msg("unable to remove", &tmpdir, &e))?;
    if let Some(j) = t.journal.as_mut() {
        j.update(|s| s.tmpdir = Some(tmpdir.clone()))?;
    }
    // As PVE's `mkpath`: parents such as a fresh root's `/var/tmp` are created too.
    std::fs::create_dir_all(&tmpdir)
        .map_err(|e| io_msg("unable to create temporary directory", &tmpdir, &e))?;
    t.tmpdir = Some(tmpdir.clone());

    let logdir = ctx.layout.vzdump_log_dir();
    std::fs::create_dir_all(&logdir).map_err(|e| io_msg("unable to create", &logdir, &e))?;
    log.open_guest_log(&tmplog)
        .map_err(|e| io_msg("unable to create log file", &tmplog, &e))?;
    t.tmplog = Some(tmplog);
    if let Err(e) = std::fs::remove_file(&names.logfile)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log.warn(format!(
            "unable to remove '{}' - {e}",
            names.logfile.display()
        ));
    }

    log.info(format!("Starting Backup of VM {vmid} (lxc)"));
    log.task(
        Level::Info,
        format!("Backup started at {}", now_string(log)),
    );

    let status = ctx.guest.status(vmid).await?;
    log.info(format!("status = {}", status.as_str()));

    ctx.store.set_lock(vmid, Lock::Backup)?;
    t.locked = true;
    if let Some(j) = t.journal.as_mut() {
        j.update(|s| s.lock_set = true)?;
    }
    ctx.check()?;

    let running = status == GuestStatus::Running;
    let mut mode = effective_mode(t.mode, status);
    if mode == Mode::Snapshot
        && let Err(e) = prepare(ctx, t, Mode::Snapshot).await
    {
        if !is_mode_failure(&e) {
            return Err(e);
        }
        log.info(e.to_string());
        log.info("trying 'suspend' mode instead");
        mode = Mode::Suspend;
        t.plan = VolumePlan::default();
    }
    t.prepared = true;
    t.mode = mode;
    t.hook.mode = mode.as_str().to_string();

    log.info(format!("backup mode: {}", mode.as_str()));
    if let Some(bw) = opts.bwlimit.filter(|b| *b > 0) {
        log.info(format!("bandwidth limit: {bw} KiB/s"));
    }
    log.info(format!("ionice priority: {}", opts.ionice.unwrap_or(7)));

    let hooks = &ctx.hooks;
    match mode {
        Mode::Stop => {
            prepare(ctx, t, Mode::Stop).await?;
            hooks.run("backup-start", Some(&t.hook), log).await?;
            if running {
                log.info("stopping virtual guest");
                t.vmstoptime = Some(Instant::now());
                hooks.run("pre-stop", Some(&t.hook), log).await?;
                let wait = u64::try_from(opts.stopwait.unwrap_or(10)).unwrap_or(10) * 60;
                let res = ctx.guest.shutdown(vmid, Duration::from_secs(wait)).await;
                // A shutdown that failed after the container stopped (an unmount, a
                // hookscript) still needs the restart.
                if res.is_ok() || ctx.guest.status(vmid).await? == GuestStatus::Stopped {
                    t.restart = true;
                }
                res?;
            }
        }
        Mode::Suspend => {
            prepare(ctx, t, Mode::Suspend).await?;
            hooks.run("backup-start", Some(&t.hook), log).await?;
            rsync_phase(ctx, t, true).await?;
            log.info("suspending guest");
            t.vmstoptime = Some(Instant::now());
            hooks.run("pre-stop", Some(&t.hook), log).await?;
            ctx.guest.freeze(vmid).await?;
            t.resume = true;
            rsync_phase(ctx, t, false).await?;
            log.info("resuming guest");
            // The guest is thawed even when the hook fails; a failed thaw is retried by
            // the cleanup.
            let hook = hooks.run("pre-restart", Some(&t.hook), log).await;
            ctx.guest.thaw(vmid).await?;
            t.resume = false;
            hook?;
            hooks.run("post-restart", Some(&t.hook), log).await?;
            online_again(log, t);
        }
        Mode::Snapshot => {
            hooks.run("backup-start", Some(&t.hook), log).await?;
            let count = t.plan.volids().len();
            hooks.run("pre-stop", Some(&t.hook), log).await?;
            if count > 1 {
                log.info("suspend vm to make snapshot");
                t.vmstoptime = Some(Instant::now());
                ctx.guest.freeze(vmid).await?;
                t.resume = true;
            }
            snapshot(ctx, t, running).await?;
            hooks.run("pre-restart", Some(&t.hook), log).await?;
            if count > 1 {
                log.info("resume vm");
                t.resume = false;
                ctx.guest.thaw(vmid).await?;
                online_again(log, t);
            }
            hooks.run("post-restart", Some(&t.hook), log).await?;
        }
    }
    ctx.check()?;

    let (config, firewall) = assemble(ctx, t)?;

    if stdout {
        log.info("sending archive to stdout");
        let out = archive(ctx, t, config, firewall, &Sink::Stdout).await?;
        log.info(format!("archive blake3 checksum: {}", out.blake3.to_hex()));
        t.size = out.out_bytes;
        hooks.run("backup-end", Some(&t.hook), log).await?;
        return Ok(());
    }

    if let Some(storeid) = opts.storage.as_deref()
        && let Ok(section) = ctx.storages.section(storeid)
        && section.storage_type() == "dedup"
    {
        // The store is the storage's `path`; the task log stays in the dump directory.
        let store_path = section
            .path()
            .map_or_else(|| PathBuf::from(&dumpdir), Path::to_path_buf);
        log.info(format!(
            "creating snapshot in dedup storage '{storeid}' ({})",
            store_path.display()
        ));
        let r = archive_dedup(ctx, t, config, firewall, store_path).await?;
        ctx.check()?;
        t.tmptar = None;
        t.size = r.stats.logical_size;
        let volid = format!("{storeid}:backup/{}", r.snapshot.name());
        log.info(format!("backup volume: {volid}"));
        finish_volume(ctx, t, &volid).await?;
        if remove {
            prune_after_backup(&ctx.storages, target_kind, vmid, &keep, log).await?;
        }
        hooks.run("backup-end", Some(&t.hook), log).await?;
        return Ok(());
    }

    log.info(format!(
        "creating vzdump archive '{}'",
        names.target.display()
    ));
    let out = archive(ctx, t, config, firewall, &Sink::File(names.tmptar.clone())).await?;
    ctx.check()?;
    std::fs::rename(&names.tmptar, &names.target).map_err(|_| {
        Error::msg(format!(
            "unable to rename '{}' to '{}'",
            names.tmptar.display(),
            names.target.display()
        ))
    })?;
    t.tmptar = None;
    sync_dir(Path::new(&dumpdir));
    t.size = std::fs::metadata(&names.target).map_or(0, |m| m.len());
    log.info(format!("archive file size: {}", format_size(t.size)));

    let sum = format!(
        "{}  {}\n",
        out.blake3.to_hex(),
        names
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let sum_path = blake3_path(&names.target);
    write_synced(&sum_path, sum.as_bytes())
        .map_err(|e| io_msg("unable to write", &sum_path, &e))?;
    log.info(format!("archive blake3 checksum: {}", out.blake3.to_hex()));

    if let Some(storeid) = opts.storage.as_deref() {
        let file = names
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let volid = format!("{storeid}:backup/{file}");
        finish_volume(ctx, t, &volid).await?;
    }

    if remove {
        prune_after_backup(&ctx.storages, target_kind, vmid, &keep, log).await?;
    }
    hooks.run("backup-end", Some(&t.hook), log).await?;
    Ok(())
}

/// Notes (from the template) and protection of a new backup volume.
async fn finish_volume(ctx: &JobContext, t: &Task, volid: &str) -> Result<()> {
    let (log, opts, vmid) = (&ctx.log, &ctx.opts, t.vmid);
    if let Some(tpl) = opts.notes_template.as_deref().filter(|t| !t.is_empty()) {
        log.info("adding notes to backup");
        let vars = NotesVars {
            cluster: "standalone node".into(),
            guestname: t
                .hook
                .hostname
                .clone()
                .unwrap_or_else(|| format!("CT{vmid}")),
            node: ctx.node.clone(),
            vmid,
        };
        match expand_notes_template(tpl, &vars) {
            Ok(notes) => {
                if let Err(e) = set_attribute(ctx, volid, VolumeAttribute::Notes, &notes).await {
                    log.warn(format!("unable to add notes - {e}"));
                }
            }
            Err(e) => log.warn(format!("unable to add notes - {e}")),
        }
    }
    if opts.protected == Some(true) {
        log.info("marking backup as protected");
        set_attribute(ctx, volid, VolumeAttribute::Protected, "1")
            .await
            .map_err(|e| Error::msg(format!("unable to set protected flag - {e}")))?;
    }
    Ok(())
}

async fn set_attribute(
    ctx: &JobContext,
    volid: &str,
    attr: VolumeAttribute,
    value: &str,
) -> Result<()> {
    let (plugin, volname) = ctx.storages.resolve(volid)?;
    plugin
        .update_volume_attribute(&volname, attr, Some(value))
        .await?;
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// fsync a directory after a rename in it (best effort: the archive itself is synced).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn online_again(log: &TaskLog, t: &Task) {
    if let Some(stop) = t.vmstoptime {
        let secs = stop.elapsed().as_secs();
        let delay = if secs < 1 {
            "<1".to_string()
        } else {
            secs.to_string()
        };
        log.info(format!("guest is online again after {delay} seconds"));
    }
}

/// The LXC plugin's `prepare`.
async fn prepare(ctx: &JobContext, t: &mut Task, mode: Mode) -> Result<()> {
    let (log, vmid) = (&ctx.log, t.vmid);
    let conf = ctx.store.load(vmid)?;
    if let Some(h) = conf.main.hostname() {
        log.info(format!("CT Name: {h}"));
    }
    t.hook.hostname = Some(
        conf.main
            .hostname()
            .map_or_else(|| format!("CT{vmid}"), str::to_string),
    );
    t.owner = root_owner(&conf)?;
    t.id_map = archive_id_map(&conf)?;
    t.unprivileged = conf.main.unprivileged();
    let plan = backup_volumes(&conf)?;
    for l in &plan.log {
        log.info(l);
    }
    let roots = roots(&ctx.layout);
    match mode {
        Mode::Snapshot => {
            check_snapshot_feature(&ctx.storages, &plan.volids()).await?;
            if conf.snapshots.contains_key(VZDUMP_SNAP) {
                log.info("found old vzdump snapshot (force removal)");
                snapshot_delete(
                    &ctx.store,
                    &ctx.storages,
                    vmid,
                    true,
                    Some(Lock::Backup),
                    log,
                )
                .await?;
            }
            prepare_mount_root(&roots.root)?;
        }
        Mode::Stop => prepare_mount_root(&roots.root)?,
        Mode::Suspend => {
            let pid = ctx.guest.root_pid(vmid).await?;
            t.suspend_from = Some(PathBuf::from(format!("/proc/{pid}/root")));
        }
    }
    t.plan = plan;
    Ok(())
}

/// The LXC plugin's `snapshot`: create `vzdump` and mount it read-only.
async fn snapshot(ctx: &JobContext, t: &mut Task, running: bool) -> Result<()> {
    let log = &ctx.log;
    log.info("create storage snapshot 'vzdump'");
    let freeze: Option<&dyn GuestControl> = running.then_some(ctx.guest.as_ref());
    let now = Timestamp::now().as_second();
    snapshot_create(
        &ctx.store,
        &ctx.storages,
        t.vmid,
        Some(Lock::Backup),
        freeze,
        now,
        log,
    )
    .await?;
    t.snapshot_made = true;
    if let Some(j) = t.journal.as_mut() {
        j.update(|s| s.snapshot = true)?;
    }
    let conf = ctx.store.load(t.vmid)?;
    if !conf.snapshots.contains_key(VZDUMP_SNAP) {
        return Err(Error::msg(
            "unable to read vzdump snapshot config - internal error",
        ));
    }
    let journal = t
        .journal
        .as_mut()
        .ok_or_else(|| Error::msg("internal error - no task journal"))?;
    t.sources = mount_disks(
        &ctx.storages,
        &roots(&ctx.layout),
        &t.plan.disks,
        Some(VZDUMP_SNAP),
        t.owner,
        journal,
        log,
    )
    .await?;
    Ok(())
}

/// Suspend mode's copies: rsync from `/proc/<pid>/root` into the temporary directory.
async fn rsync_phase(ctx: &JobContext, t: &Task, first: bool) -> Result<()> {
    let log = &ctx.log;
    let from = t
        .suspend_from
        .as_ref()
        .ok_or_else(|| Error::msg("internal error - suspend mode without a source"))?;
    let to = t
        .tmpdir
        .as_ref()
        .ok_or_else(|| Error::msg("internal error - no temporary directory"))?;
    let mut no_xattrs = false;
    if first {
        let mounts = vzkit_host::mount::mount_table().unwrap_or_default();
        let canonical = std::fs::canonicalize(to).unwrap_or_else(|_| to.clone());
        if fstype_of(&canonical, &mounts).is_some_and(|f| f.starts_with("nfs")) {
            log.info(
                "temporary directory is on NFS, disabling xattr and acl support, consider \
                 configuring a local tmpdir via /etc/vzdump.conf",
            );
            no_xattrs = true;
        }
    }
    let text = if first { "first" } else { "final" };
    let cmd = rsync_command(
        from,
        to,
        &t.plan,
        &ctx.exclude_patterns,
        ctx.opts.bwlimit.unwrap_or(0),
        no_xattrs,
    );
    log.info(format!(
        "starting {text} sync {}/ to {}",
        from.display(),
        to.display()
    ));
    let start = Instant::now();
    let out = ctx.runner().output(&cmd).await?;
    // rsync exit code 24 (vanished source files) is not an error, as in PVE's run_command.
    let ok = out.success() || out.exit == vzkit_host::command::Exit::Code(24);
    if !ok {
        return Err(Error::msg(format!("command '{cmd}' failed: {}", out.exit)));
    }
    let stdout = out.stdout_str();
    let transferred = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Total transferred file size: "))
        .unwrap_or("?");
    log.info(format!(
        "{text} sync finished - transferred {transferred} in {}s",
        start.elapsed().as_secs()
    ));
    Ok(())
}

/// The rsync command line of suspend mode (`copy_data_phase1/2`).
#[must_use]
pub fn rsync_command(
    from: &Path,
    to: &Path,
    plan: &VolumePlan,
    excludes: &[String],
    bwlimit: i64,
    no_xattrs: bool,
) -> Cmd {
    let mut cmd = Cmd::new(RSYNC).args(["--stats", "-h"]);
    if !no_xattrs {
        cmd = cmd.args(["-X", "-A"]);
    }
    cmd = cmd.args([
        "--numeric-ids",
        "-aH",
        "--delete",
        "--no-whole-file",
        "--sparse",
        "--one-file-system",
        "--relative",
    ]);
    if bwlimit > 0 {
        cmd = cmd.arg(format!("--bwlimit={bwlimit}"));
    }
    for e in excludes.iter().chain(&plan.exclude_dirs) {
        cmd = cmd.arg(format!("--exclude={e}"));
    }
    for d in &plan.disks {
        cmd = cmd.arg(format!("{}/.{}", from.display(), d.mp.mp));
    }
    cmd.arg(to)
}

/// `assemble`: the config without `lock`/`snapshots`/`parent`/`pending` and the firewall
/// file (empty if none), written to `<tmpdir>/etc/vzdump/` and returned for the archive.
fn assemble(ctx: &JobContext, t: &Task) -> Result<(Vec<u8>, Vec<u8>)> {
    let conf = ctx.store.load(t.vmid)?;
    let text = conf.to_backup_config().write()?;
    let fw_path = ctx.layout.ct_firewall(t.vmid);
    let fw = match std::fs::read(&fw_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_msg("unable to read", &fw_path, &e)),
    };
    if let Some(tmpdir) = &t.tmpdir {
        let dir = tmpdir.join("etc/vzdump");
        std::fs::create_dir_all(&dir).map_err(|e| io_msg("unable to create", &dir, &e))?;
        std::fs::write(dir.join("pct.conf"), text.as_bytes())
            .map_err(|e| io_msg("unable to write", &dir.join("pct.conf"), &e))?;
        std::fs::write(dir.join("pct.fw"), &fw)
            .map_err(|e| io_msg("unable to write", &dir.join("pct.fw"), &e))?;
    }
    Ok((text.into_bytes(), fw))
}

/// The LXC plugin's `archive` up to the stream: mount (stop mode), collect the sources.
async fn archive_job(
    ctx: &JobContext,
    t: &mut Task,
    config: Vec<u8>,
    firewall: Vec<u8>,
) -> Result<ArchiveJob> {
    let log = &ctx.log;
    match t.mode {
        Mode::Stop => {
            let journal = t
                .journal
                .as_mut()
                .ok_or_else(|| Error::msg("internal error - no task journal"))?;
            t.sources = mount_disks(
                &ctx.storages,
                &roots(&ctx.layout),
                &t.plan.disks,
                None,
                t.owner,
                journal,
                log,
            )
            .await?;
        }
        Mode::Snapshot => {}
        Mode::Suspend => {
            let dir = t
                .tmpdir
                .clone()
                .ok_or_else(|| Error::msg("internal error - no temporary directory"))?;
            t.sources = vec![ArchiveSource {
                dir,
                prefix: "./".into(),
            }];
        }
    }
    ctx.check()?;
    let (mut excludes, warnings) = exclude_set(&ctx.exclude_patterns, t.unprivileged);
    if t.mode != Mode::Suspend {
        for w in warnings {
            log.warn(w);
        }
    } else {
        // The copy in the temporary directory also holds the config files `assemble` wrote
        // there; they lead the archive already and are not repeated in the tree.
        excludes.add_anchored("./etc/vzdump/pct.conf");
        excludes.add_anchored("./etc/vzdump/pct.fw");
    }
    let job = ArchiveJob {
        config,
        firewall,
        config_mtime: Timestamp::now().as_second(),
        sources: t.sources.clone(),
        excludes,
        id_map: t.id_map.clone(),
        compression: ctx.compressor.compression,
        threads: ctx.compressor.threads,
        level: None,
        direct: Vec::new(),
        bwlimit: u64::try_from(ctx.opts.bwlimit.unwrap_or(0)).unwrap_or(0) * 1024,
    };
    Ok(job)
}

/// The LXC plugin's `archive`: mount (stop mode), then stream.
async fn archive(
    ctx: &JobContext,
    t: &mut Task,
    config: Vec<u8>,
    firewall: Vec<u8>,
    sink: &Sink,
) -> Result<ArchiveOutcome> {
    let log = &ctx.log;
    // Images of cleanly unmounted ext2/3/4 file systems (read before they are mounted,
    // read-only): file data is read straight from them.
    let clean = if t.mode == Mode::Stop {
        clean_images(&disk_images(&ctx.storages, &t.plan.disks).await).await
    } else {
        Vec::new()
    };
    let mut job = archive_job(ctx, t, config, firewall).await?;
    job.direct = direct_images(&clean, &job.sources).await;
    let control = Control {
        cancel: Arc::clone(&ctx.cancel),
        counters: Arc::default(),
    };
    let bar = ctx.progress.then(|| {
        ProgressBar::start(
            log.clone(),
            Arc::clone(&control.counters),
            used_bytes(&t.sources),
        )
    });
    let sink = sink.clone();
    let res = tokio::task::spawn_blocking(move || write_archive(&job, &sink, &control))
        .await
        .map_err(|e| Error::msg(format!("archive task failed - {e}")))?;
    if let Some(b) = bar {
        b.finish();
    }
    let out = res?;
    for w in &out.stats.warnings {
        // GNU tar under --warning=no-file-ignored says nothing about sockets.
        if !w.ends_with("socket ignored") {
            log.info(format!("tar: {w}"));
        }
    }
    log.info(tar_totals_line(out.tar_bytes, out.elapsed.as_secs_f64()));
    Ok(out)
}

/// A disk's member prefix and, for a volume image file, its path and image key.
type DiskImage = (String, Option<(PathBuf, Option<vzkit_dedup::VolumeKey>)>);

/// The member prefix, image file and image key ([`vzkit_dedup::VolumeKey`]) of each of
/// `disks`; `None` for volumes that are not image files (and no key for images on file
/// systems whose keys are not trusted).
async fn disk_images(storages: &Storages, disks: &[crate::plan::Disk]) -> Vec<DiskImage> {
    let mut out = Vec::new();
    for d in disks {
        let mut image = None;
        if d.mp.kind() == vzkit_runtime::conf::MountPointKind::Volume
            && let Ok((plugin, volname)) = storages.resolve(&d.mp.volume)
            && let Ok(vzkit_storage::plugin::VolumeAccess::ImageFile(path)) =
                plugin.access(&volname, None).await
        {
            let key = vzkit_dedup::VolumeKey::of_image(&path);
            image = Some((path, key));
        }
        out.push((d.member_prefix(), image));
    }
    out
}

/// The member prefix and image key of each of `images` ([`disk_images`]).
fn image_keys(images: &[DiskImage]) -> Vec<(String, Option<vzkit_dedup::VolumeKey>)> {
    images
        .iter()
        .map(|(prefix, image)| (prefix.clone(), image.as_ref().and_then(|(_, key)| *key)))
        .collect()
}

/// The member prefix and image key of each of `disks`.
async fn disk_keys(
    storages: &Storages,
    disks: &[crate::plan::Disk],
) -> Vec<(String, Option<vzkit_dedup::VolumeKey>)> {
    image_keys(&disk_images(storages, disks).await)
}

/// What `check` (on a blocking thread) finds in each image of `images` that has a key, by
/// member prefix: only images on the local file systems trusted for keys are read (not FUSE
/// or network file systems, where another client could change the image between the check
/// and the walk).
async fn check_images<T: Send + 'static>(
    images: &[DiskImage],
    check: fn(&Path) -> std::io::Result<Option<T>>,
) -> Vec<(String, PathBuf, T)> {
    let mut out = Vec::new();
    for (prefix, image) in images {
        if let Some((path, Some(_))) = image {
            let p = path.clone();
            if let Ok(Ok(Some(t))) = tokio::task::spawn_blocking(move || check(&p)).await {
                out.push((prefix.clone(), path.clone(), t));
            }
        }
    }
    out
}

/// The inode table ([`vzkit_dedup::ext4scan::scan`]) of each image of `images` that holds a
/// cleanly unmounted ext2/3/4 file system, by member prefix ([`check_images`]).
async fn image_inodes(images: &[DiskImage]) -> Vec<(String, vzkit_dedup::ext4scan::InodeTable)> {
    check_images(images, vzkit_dedup::ext4scan::scan)
        .await
        .into_iter()
        .map(|(prefix, _, t)| (prefix, t))
        .collect()
}

/// The member prefix and image file of each of `images` that holds a cleanly unmounted
/// ext2/3/4 file system ([`vzkit_dedup::ext4scan::is_clean`], [`check_images`]).
async fn clean_images(images: &[DiskImage]) -> Vec<(String, PathBuf)> {
    check_images(images, |p| {
        Ok(vzkit_dedup::ext4scan::is_clean(p)?.then_some(()))
    })
    .await
    .into_iter()
    .map(|(prefix, path, ())| (prefix, path))
    .collect()
}

/// For each of `sources`, the image of `clean` (member prefix, image file) it is mounted
/// from, if file data can be read from it ([`vzkit_archive::direct::DirectImage::new`]).
async fn direct_images(
    clean: &[(String, PathBuf)],
    sources: &[ArchiveSource],
) -> Vec<Option<vzkit_archive::direct::DirectImage>> {
    let mut out = Vec::new();
    for s in sources {
        let image = clean
            .iter()
            .find(|(p, _)| *p == s.prefix)
            .map(|(_, i)| i.clone());
        let dir = s.dir.clone();
        let direct = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(image?).ok()?;
            vzkit_archive::direct::DirectImage::new(f, &dir)
        })
        .await
        .ok()
        .flatten();
        out.push(direct);
    }
    out
}

/// The image key of each archive source, from [`disk_keys`]; all `None` unless every source
/// has one (a tree is only taken over together with the trees nested in it).
fn source_keys(
    keys: &[(String, Option<vzkit_dedup::VolumeKey>)],
    sources: &[ArchiveSource],
) -> Vec<Option<vzkit_dedup::VolumeKey>> {
    let out: Vec<Option<vzkit_dedup::VolumeKey>> = sources
        .iter()
        .map(|s| {
            keys.iter()
                .find(|(p, _)| *p == s.prefix)
                .and_then(|(_, k)| *k)
        })
        .collect();
    if out.iter().all(Option::is_some) {
        out
    } else {
        vec![None; sources.len()]
    }
}

/// The archive step for a `dedup` storage: the same sources, excludes and id map as the tar
/// archive, written as a snapshot of the store (incremental against the group's newest one).
async fn archive_dedup(
    ctx: &JobContext,
    t: &mut Task,
    config: Vec<u8>,
    firewall: Vec<u8>,
    store_path: PathBuf,
) -> Result<vzkit_dedup::BackupResult> {
    let log = &ctx.log;
    // Volume image keys are taken before the volumes are mounted, and again after the walk.
    let stop = t.mode == Mode::Stop;
    let mode = match (
        ctx.opts.change_detection.as_deref(),
        ctx.opts.pbs_change_detection_mode.as_deref(),
    ) {
        (Some("data"), _) | (None, Some("data" | "legacy")) => vzkit_dedup::ChangeDetection::Data,
        _ => vzkit_dedup::ChangeDetection::Metadata,
    };
    let (keys_before, mut inodes, clean) = if stop {
        let images = disk_images(&ctx.storages, &t.plan.disks).await;
        let inodes = if mode == vzkit_dedup::ChangeDetection::Metadata {
            image_inodes(&images).await
        } else {
            Vec::new()
        };
        (image_keys(&images), inodes, clean_images(&images).await)
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let job = archive_job(ctx, t, config, firewall).await?;
    log.info(format!(
        "change detection: {}",
        if mode == vzkit_dedup::ChangeDetection::Data {
            "data"
        } else {
            "metadata"
        }
    ));
    let sources = job.sources.clone();
    let volumes = source_keys(&keys_before, &sources);
    // A tree's walk stops at the mount points nested in it and records their roots: every
    // tree is taken over only together with all of them.
    let layout: Vec<String> = sources
        .iter()
        .zip(&volumes)
        .map(|(s, k)| format!("{}={k:?}", s.prefix))
        .collect();
    let layout = layout.join("\n");
    let prefixes: Vec<&str> = sources.iter().map(|s| s.prefix.as_str()).collect();
    let prefixes = prefixes.join("\n");
    let infos: Vec<vzkit_dedup::VolumeInfo> = sources
        .iter()
        .zip(&volumes)
        .map(|(s, k)| vzkit_dedup::VolumeInfo {
            key: *k,
            inodes: inodes
                .iter()
                .position(|(p, _)| *p == s.prefix)
                .map(|i| inodes.swap_remove(i).1),
            context: layout.clone(),
            layout: prefixes.clone(),
            // Mounted read-only from this image (stop mode), which held a cleanly
            // unmounted file system: file data is read from the image.
            image: clean
                .iter()
                .find(|(p, _)| *p == s.prefix)
                .map(|(_, path)| path.clone()),
        })
        .collect();
    let vmid = t.vmid;
    let cancel = Arc::clone(&ctx.cancel);
    let cancelled = Arc::clone(&ctx.cancel);
    // KiB/s, as for the tar stream; here the file data read is paced.
    let bwlimit = u64::try_from(ctx.opts.bwlimit.unwrap_or(0)).unwrap_or(0) * 1024;
    let res = tokio::task::spawn_blocking(
        move || -> vzkit_dedup::Result<(vzkit_dedup::Backup, Vec<String>)> {
            let store = vzkit_dedup::Store::open(&store_path)?;
            let mut o = vzkit_dedup::BackupOptions::new(vmid);
            o.change_detection = mode;
            o.id_map = job.id_map.clone();
            o.bwlimit = bwlimit;
            o.cancel = Some(Arc::clone(&cancel));
            let mut b = vzkit_dedup::Backup::start(&store, o)?;
            b.add_data(
                "./etc/vzdump/pct.conf",
                &job.config,
                0o644,
                job.config_mtime,
            )?;
            b.add_data(
                "./etc/vzdump/pct.fw",
                &job.firewall,
                0o644,
                job.config_mtime,
            )?;
            let mut reused = Vec::new();
            for (s, v) in job.sources.iter().zip(infos) {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(vzkit_dedup::Error::Invalid("interrupted by signal".into()));
                }
                let (_, whole) = b.add_volume_tree(&s.dir, &s.prefix, &job.excludes, true, v)?;
                if whole {
                    reused.push(s.prefix.clone());
                }
            }
            Ok((b, reused))
        },
    )
    .await
    .map_err(|e| Error::msg(format!("archive task failed - {e}")))?;
    let failed = |e: vzkit_dedup::Error| {
        if cancelled.load(std::sync::atomic::Ordering::Relaxed) {
            Error::Interrupted
        } else {
            Error::msg(format!("dedup backup failed - {e}"))
        }
    };
    let (mut b, reused) = res.map_err(failed)?;
    if volumes.iter().any(Option::is_some)
        && source_keys(&disk_keys(&ctx.storages, &t.plan.disks).await, &sources) != volumes
    {
        log.info("a volume image changed during the backup: the next backup walks every tree");
        b.forget_volumes();
    }
    let r = tokio::task::spawn_blocking(move || b.finish())
        .await
        .map_err(|e| Error::msg(format!("archive task failed - {e}")))?
        .map_err(failed)?;
    for p in reused {
        log.info(format!(
            "volume image of '{p}' unchanged since the last backup: its tree was taken over without walking it"
        ));
    }
    for w in &r.stats.warnings {
        if !w.ends_with("socket ignored") {
            log.info(format!("tar: {w}"));
        }
    }
    let st = &r.stats;
    log.info(format!(
        "files: {} ({} read, {} unchanged and reused), {} read",
        st.files,
        st.files_read,
        st.files_reused,
        format_size(st.bytes_read)
    ));
    if st.bytes_direct > 0 {
        log.info(format!(
            "{} of it read straight from the volume images",
            format_size(st.bytes_direct)
        ));
    }
    if st.bytes_matched > 0 {
        log.info(format!(
            "{} of it still in the chunks of the files' last backup: hashed, not cut",
            format_size(st.bytes_matched)
        ));
    }
    if st.entries_reused > 0 {
        log.info(format!(
            "{} directories and {} entries in all unchanged since the last backup by the volume's inode table: taken over without walking them",
            st.dirs_reused, st.entries_reused
        ));
    }
    log.info(format!(
        "chunks: {} referenced, {} new ({} -> {} compressed)",
        st.chunks,
        st.chunks_new,
        format_size(st.bytes_new),
        format_size(st.bytes_new_compressed)
    ));
    log.info(format!(
        "snapshot size {} in {:.1}s",
        format_size(st.logical_size),
        r.seconds
    ));
    Ok(r)
}

/// Always run after the steps: PVE's cleanup block.
async fn cleanup(ctx: &JobContext, t: &mut Task) {
    let (log, vmid) = (&ctx.log, t.vmid);
    if t.locked {
        match ctx.store.remove_lock(vmid, Some(Lock::Backup)) {
            Ok(()) => {
                t.locked = false;
                if let Some(j) = t.journal.as_mut()
                    && let Err(e) = j.update(|s| s.lock_set = false)
                {
                    log.warn(e.to_string());
                }
            }
            Err(e) => log.warn(e.to_string()),
        }
    }
    if t.prepared {
        if let Some(j) = t.journal.as_ref() {
            let (mounts, dirs) = (j.state.mounts.clone(), j.state.mount_dirs.clone());
            umount_targets(ctx.runner().as_ref(), &mounts, &dirs, log).await;
            if t.mode == Mode::Stop && !mounts.is_empty() {
                // Stop mode mounted the live volumes: release them (rbd exports) again.
                let mps: Vec<(String, MountPoint)> = t
                    .plan
                    .disks
                    .iter()
                    .map(|d| (d.key.clone(), d.mp.clone()))
                    .collect();
                let mut warn = |m: String| log.warn(m);
                deactivate_volumes(&ctx.storages, &mps, None, &mut warn).await;
            }
            let root = roots(&ctx.layout);
            for d in [&root.side] {
                if let Err(e) = std::fs::remove_dir(d)
                    && e.kind() != std::io::ErrorKind::NotFound
                    && e.kind() != std::io::ErrorKind::DirectoryNotEmpty
                {
                    log.warn(format!("unable to remove '{}' - {e}", d.display()));
                }
            }
        }
        if t.snapshot_made {
            log.info("cleanup temporary 'vzdump' snapshot");
            match snapshot_delete(&ctx.store, &ctx.storages, vmid, false, None, log).await {
                Ok(()) => {
                    if let Some(j) = t.journal.as_mut()
                        && let Err(e) = j.update(|s| s.snapshot = false)
                    {
                        log.warn(e.to_string());
                    }
                }
                Err(e) => log.warn(format!("snapshot 'vzdump' was not (fully) removed - {e}")),
            }
        }
    }
    if t.resume || t.restart {
        let res: Result<()> = async {
            // A failing hook does not keep the guest frozen or stopped.
            if let Err(e) = ctx.hooks.run("pre-restart", Some(&t.hook), log).await {
                log.warn(e.to_string());
            }
            if t.resume {
                log.info("resume vm");
                ctx.guest.thaw(vmid).await?;
            } else if ctx.guest.status(vmid).await? != GuestStatus::Running {
                log.info("restarting vm");
                ctx.guest.start(vmid).await?;
            }
            ctx.hooks.run("post-restart", Some(&t.hook), log).await?;
            Ok(())
        }
        .await;
        match res {
            Ok(()) => online_again(log, t),
            Err(e) => log.warn(e.to_string()),
        }
    }
    if let Some(tmptar) = t.tmptar.take()
        && let Err(e) = std::fs::remove_file(&tmptar)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log.warn(format!("unable to remove '{}' - {e}", tmptar.display()));
    }
    if let Some(tmpdir) = t.tmpdir.take()
        && let Err(e) = remove_tree(&tmpdir)
    {
        log.warn(format!("unable to remove '{}' - {e}", tmpdir.display()));
    }
}

/// Undo what a dead task's journal lists (see [`crate::journal`]).
pub async fn recover_leftover(
    ctx: &JobContext,
    path: &Path,
    state: &crate::journal::TaskState,
) -> Result<()> {
    let log = &ctx.log;
    log.task(
        Level::Warn,
        format!(
            "cleaning up after an interrupted backup of CT {} (pid {})",
            state.vmid, state.pid
        ),
    );
    umount_targets(ctx.runner().as_ref(), &state.mounts, &state.mount_dirs, log).await;
    if let Some(p) = &state.tmptar
        && let Err(e) = std::fs::remove_file(p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log.task(
            Level::Warn,
            format!("unable to remove '{}' - {e}", p.display()),
        );
    }
    if let Some(d) = &state.tmpdir
        && let Err(e) = remove_tree(d)
    {
        log.task(
            Level::Warn,
            format!("unable to remove '{}' - {e}", d.display()),
        );
    }
    if ctx.store.exists(state.vmid) {
        let conf = ctx.store.load(state.vmid)?;
        let held = conf.get("lock").map(str::to_string);
        if state.snapshot && conf.snapshots.contains_key(VZDUMP_SNAP) {
            let lock = (held.as_deref() == Some(Lock::Backup.as_str()) && state.lock_set)
                .then_some(Lock::Backup);
            if let Err(e) =
                snapshot_delete(&ctx.store, &ctx.storages, state.vmid, true, lock, log).await
            {
                log.task(
                    Level::Warn,
                    format!("unable to remove snapshot 'vzdump' - {e}"),
                );
            }
        }
        if state.lock_set && held.as_deref() == Some(Lock::Backup.as_str()) {
            ctx.store.remove_lock(state.vmid, Some(Lock::Backup))?;
        }
    }
    if let (Some(tmplog), Some(logfile)) = (&state.tmplog, &state.logfile)
        && tmplog.exists()
        && !logfile.exists()
        && let Err(e) = std::fs::copy(tmplog, logfile)
    {
        log.task(
            Level::Warn,
            format!("unable to copy the log to '{}' - {e}", logfile.display()),
        );
    }
    crate::journal::forget(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Disk;
    use vzkit_runtime::conf::MountPoint;

    #[test]
    fn rsync_argv() {
        let plan = VolumePlan {
            disks: vec![
                Disk {
                    key: "rootfs".into(),
                    mp: MountPoint::new("local:100/a.raw", "/"),
                },
                Disk {
                    key: "mp0".into(),
                    mp: MountPoint::new("local:100/b.raw", "/mnt/data"),
                },
            ],
            exclude_dirs: vec!["/mnt/skip".into()],
            log: Vec::new(),
        };
        let cmd = rsync_command(
            Path::new("/proc/42/root"),
            Path::new("/var/tmp/vzdumptmp1_100"),
            &plan,
            &["/tmp/?*".to_string()],
            100,
            false,
        );
        assert_eq!(
            cmd.argv().join(" "),
            "rsync --stats -h -X -A --numeric-ids -aH --delete --no-whole-file --sparse \
             --one-file-system --relative --bwlimit=100 --exclude=/tmp/?* --exclude=/mnt/skip \
             /proc/42/root/./ /proc/42/root/./mnt/data /var/tmp/vzdumptmp1_100"
        );
        let nfs = rsync_command(Path::new("/p"), Path::new("/t"), &plan, &[], 0, true);
        assert!(!nfs.argv().contains(&"-X".to_string()));
    }

    #[test]
    fn id_maps_convert() {
        let c = CtConfig::parse(100, "unprivileged: 1\n").unwrap().0;
        let m = archive_id_map(&c).unwrap().unwrap();
        assert_eq!(m, ArchiveIdMap::pve_default_unprivileged());
        let c = CtConfig::parse(100, "arch: amd64\n").unwrap().0;
        assert!(archive_id_map(&c).unwrap().is_none());
    }
}
