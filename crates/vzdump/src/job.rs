//! The backup job (`VZDump->new` + `exec_backup` of pve-manager 14a22df, and the API's
//! wrapper): options, the global lock, guest selection, hooks, and one task per guest.
//!
//! Order: parameters checked (`verify_vzdump_parameters`, the notes template); defaults from
//! `/etc/vzdump.conf` and the storage merged ([`crate::options::resolve`]); `--stop` stops a
//! running job; hook `job-init`; storage activated, `dumpdir`/`tmpdir` checked; the global
//! lock `/var/run/vzdump.lock` taken (waiting up to `lockwait` minutes: "trying to get global
//! lock - waiting...", "got global lock", "can't acquire lock '…' (wait = 0)" / "- got
//! timeout"), the job's pid written to `/var/run/vzdump.pid`; `ionice` applied; leftovers of
//! killed jobs cleaned up (see [`crate::journal`]); `starting new backup job: <cmdline>`;
//! hook `job-start`; the guests in ascending order, each with its own outcome (a failed guest
//! does not stop the job; a signal does); hook `job-end` (or `job-abort`); "Backup job
//! finished successfully" / "… with errors" / "Backup job failed - …". The job fails with "job
//! errors" if any guest failed.
//!
//! SIGINT, SIGTERM, SIGHUP and SIGQUIT set a flag that every step and the archive pipeline
//! check: the current guest is cleaned up (unmounted, snapshot removed, unlocked, temporary
//! archive removed) and the job ends with "interrupted by signal".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vzkit_host::command::Cmd;
use vzkit_host::lock::{FileLock, LockError};
use vzkit_host::paths::Layout;
use vzkit_runtime::store::CtStore;
use vzkit_storage::manager::Storages;

use crate::conf::parse_vzdump_conf_explicit;
use crate::error::{Error, Result};
use crate::guest::{GuestControl, RuntimeGuests};
use crate::hook::HookScript;
use crate::log::{Level, TaskLog};
use crate::notes::verify_notes_template;
use crate::options::{JobOptions, OptionsError, ResolvedJob, resolve, verify_vzdump_parameters};
use crate::plan::{command_line, compressor_choice};
use crate::task::{JobContext, exec_backup_task, recover_leftover};

/// `ionice`
pub const IONICE: &str = "ionice";

/// How the job ended, when not successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// The message for the command line (`job errors`, a parameter error, …).
    pub message: String,
    /// `--quiet`: print nothing.
    pub quiet: bool,
}

/// What the job runs against.
#[derive(Debug)]
pub struct JobEnv {
    /// Path layout.
    pub layout: Layout,
    /// Storages (from `storage.cfg`).
    pub storages: Storages,
    /// Container state and lifecycle (default: [`RuntimeGuests`]).
    pub guest: Option<Arc<dyn GuestControl>>,
    /// Whether stderr is a terminal (progress bar).
    pub stderr_is_tty: bool,
}

fn param_err(key: &str, message: String) -> Error {
    Error::Failed(
        OptionsError::Param {
            key: key.to_string(),
            message,
        }
        .to_string(),
    )
}

/// The node name: the short host name.
#[must_use]
pub fn nodename() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().split('.').next().map(str::to_string))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// `/var/run/vzdump.pid`, naming the running job (`<pid>:<start time in ticks>`).
#[must_use]
pub fn pidfile(layout: &Layout) -> std::path::PathBuf {
    layout.join("/var/run/vzdump.pid")
}

/// The start time (clock ticks since boot) of a live process, from `/proc/<pid>/stat`
/// (`None` for a process that has exited, also while it is a zombie).
#[must_use]
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// `vzdump --stop`: SIGTERM to the running job, waiting up to 15 s for it to end.
///
/// # Errors
/// "stopping backup process N failed".
pub async fn stop_running_backups(layout: &Layout) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(pidfile(layout)) else {
        return Ok(());
    };
    let mut it = text.trim().split(':');
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<u32>().ok()),
        it.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return Ok(());
    };
    let running = || process_start_time(pid) == Some(start);
    if !running() {
        return Ok(());
    }
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return Ok(());
    };
    rustix::process::kill_process(p, rustix::process::Signal::TERM)
        .map_err(|e| Error::msg(format!("unable to signal backup process {pid} - {e}")))?;
    for _ in 0..15 {
        if !running() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if running() {
        return Err(Error::msg(format!("stopping backup process {pid} failed")));
    }
    Ok(())
}

/// Take the global lock, waiting up to `lockwait` minutes (and stopping on a signal).
async fn global_lock(
    layout: &Layout,
    lockwait: i64,
    log: &TaskLog,
    cancel: &AtomicBool,
) -> Result<FileLock> {
    let path = layout.vzdump_lock();
    let shown = path.display().to_string();
    let try_once = || match FileLock::acquire(&path, Duration::ZERO, false) {
        Ok(l) => Ok(Some(l)),
        Err(LockError::Timeout(_)) => Ok(None),
        Err(e) => Err(Error::msg(format!(
            "can't open lock on file '{shown}' - {e}"
        ))),
    };
    if let Some(l) = try_once()? {
        return Ok(l);
    }
    if lockwait <= 0 {
        let msg = format!("can't acquire lock '{shown}' (wait = 0)");
        log.task(Level::Err, &msg);
        return Err(Error::msg(msg));
    }
    log.task(Level::Info, "trying to get global lock - waiting...");
    let deadline = Instant::now() + Duration::from_secs(u64::try_from(lockwait).unwrap_or(0) * 60);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if let Some(l) = try_once()? {
            log.task(Level::Info, "got global lock");
            return Ok(l);
        }
        if Instant::now() >= deadline {
            let msg = format!("can't acquire lock '{shown}' - got timeout");
            log.task(Level::Err, &msg);
            return Err(Error::msg(msg));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Apply `ionice` to every thread of this process (PVE: `ionice -c2 -n<N> -p $$`, `-c3` for
/// 8); threads started later inherit it.
async fn apply_ionice(storages: &Storages, ionice: i64, log: &TaskLog) {
    let mut tids: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if tids.is_empty() {
        tids.push(std::process::id().to_string());
    }
    let mut cmd = Cmd::new(IONICE);
    cmd = if ionice > 7 {
        cmd.arg("-c3")
    } else {
        cmd.arg("-c2").arg(format!("-n{ionice}"))
    };
    let cmd = cmd.arg("-p").args(tids);
    if let Err(e) = storages.runner().run(&cmd).await {
        log.task(Level::Warn, format!("unable to set the I/O priority - {e}"));
    }
}

/// Turn SIGINT, SIGTERM, SIGHUP and SIGQUIT into the cancel flag.
fn install_signal_handlers(cancel: Arc<AtomicBool>, log: &TaskLog) {
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ];
    for kind in kinds {
        match signal(kind) {
            Ok(mut s) => {
                let c = Arc::clone(&cancel);
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        c.store(true, Ordering::Relaxed);
                    }
                });
            }
            Err(e) => log.task(
                Level::Warn,
                format!("unable to install signal handler - {e}"),
            ),
        }
    }
}

fn selected_guests(store: &CtStore, opts: &JobOptions) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = if let Some(v) = opts.vmid.as_ref().filter(|v| !v.is_empty()) {
        v.clone()
    } else if opts.all == Some(true) {
        let exclude = opts.exclude.clone().unwrap_or_default();
        store
            .list()?
            .into_iter()
            .filter(|id| !exclude.contains(id))
            .collect()
    } else if let Some(pool) = &opts.pool {
        return Err(Error::msg(format!(
            "pool '{pool}': resource pools are not supported by vzkit"
        )));
    } else {
        Vec::new()
    };
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Run a vzdump job with the command-line parameters `params` (PVE names, in the order
/// given; `vmid` holds the guest list).
///
/// # Errors
/// [`JobFailure`] with the message to print (nothing with `--quiet`).
pub async fn run_job(
    env: JobEnv,
    params: Vec<(String, String)>,
) -> std::result::Result<(), JobFailure> {
    // Until vzdump.conf is read we do not know about `quiet`: take it from the command line.
    let cli_quiet = params
        .iter()
        .any(|(k, v)| k == "quiet" && vzkit_host::schema::parse_boolean(v) == Some(true));
    let mut quiet = cli_quiet;
    let res = run_job_inner(env, params, &mut quiet).await;
    res.map_err(|e| JobFailure {
        message: e.to_string(),
        quiet,
    })
}

/// `/etc/vzdump.conf`: the defaults (schema defaults filled in), what the file sets itself,
/// and the parser's warnings.
fn read_defaults(layout: &Layout) -> Result<(JobOptions, JobOptions, Vec<String>)> {
    let path = layout.vzdump_conf();
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(parse_vzdump_conf_explicit(&t, crate::conf::VZDUMP_CONF)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((
            JobOptions::schema_defaults(),
            JobOptions::default(),
            Vec::new(),
        )),
        Err(e) => Err(Error::msg(format!(
            "unable to read '{}' - {e}",
            path.display()
        ))),
    }
}

/// The checks of `VZDump->new` after the options are merged, collected into one error:
/// hook `job-init`, the storage activated (and its dump directory created), `dumpdir` and
/// `tmpdir` existing.
async fn check_setup(
    storages: &Storages,
    resolved: &ResolvedJob,
    init_hooks: &HookScript,
    log: &TaskLog,
) -> Result<()> {
    let opts = &resolved.options;
    let mut errors: Vec<String> = Vec::new();
    if let Err(e) = init_hooks.run("job-init", None, log).await {
        errors.push(e.to_string());
    }
    if let Some(storeid) = opts.storage.as_deref() {
        let act = async {
            let plugin = storages.plugin(storeid)?;
            plugin.activate_storage().await
        }
        .await;
        if let Err(e) = act {
            errors.push(format!("could not activate storage '{storeid}': {e}"));
        }
        if let Some(d) = opts.dumpdir.as_deref()
            && let Err(e) = std::fs::create_dir_all(d)
        {
            errors.push(format!("unable to create dump directory '{d}' - {e}"));
        }
    }
    errors.extend(resolved.missing_dirs(|p| p.is_dir()));
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::msg(errors.join("\n")))
    }
}

/// Write `<pid>:<start time>` to the pid file (`vzdump --stop` reads it).
fn write_pidfile(layout: &Layout) -> Result<std::path::PathBuf> {
    let pid = std::process::id();
    let pf = pidfile(layout);
    if let Some(dir) = pf.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::msg(format!("unable to create '{}' - {e}", dir.display())))?;
    }
    std::fs::write(
        &pf,
        format!("{pid}:{}\n", process_start_time(pid).unwrap_or(0)),
    )
    .map_err(|e| Error::msg(format!("unable to write '{}' - {e}", pf.display())))?;
    Ok(pf)
}

/// `exec_backup` after the lock: hooks around one task per guest, and the job's end line.
async fn exec_backup(ctx: &JobContext, vmids: &[u32], params: &[(String, String)]) -> Result<()> {
    let log = &ctx.log;
    log.task(
        Level::Info,
        format!("starting new backup job: {}", command_line(params)),
    );
    let mut errcount = 0;
    let job: Result<()> = async {
        ctx.hooks.run("job-start", None, log).await?;
        for vmid in vmids {
            ctx.check()?;
            let outcome = exec_backup_task(ctx, *vmid).await;
            if outcome.interrupted {
                return Err(Error::Interrupted);
            }
            if outcome.error.is_some() {
                errcount += 1;
            }
        }
        ctx.hooks.run("job-end", None, log).await
    }
    .await;
    if let Err(e) = &job {
        if let Err(h) = ctx.hooks.run("job-abort", None, log).await {
            log.task(Level::Warn, format!("hook script failed: {h}"));
        }
        log.task(Level::Err, format!("Backup job failed - {e}"));
    } else if errcount > 0 {
        log.task(Level::Info, "Backup job finished with errors");
    } else {
        log.task(Level::Info, "Backup job finished successfully");
    }
    job?;
    if errcount > 0 {
        return Err(Error::msg("job errors"));
    }
    Ok(())
}

async fn run_job_inner(env: JobEnv, params: Vec<(String, String)>, quiet: &mut bool) -> Result<()> {
    let layout = env.layout.clone();
    let mut cli = JobOptions::from_params(&params)?;
    verify_vzdump_parameters(&mut cli, true)?;
    if let Some(t) = &cli.notes_template {
        verify_notes_template(t).map_err(|m| param_err("notes-template", m))?;
    }
    let (defaults, explicit, conf_warnings) = read_defaults(&layout)?;
    *quiet = cli.quiet.or(explicit.quiet) == Some(true);
    let log = TaskLog::new(
        (!*quiet).then(|| Box::new(std::io::stderr()) as Box<dyn std::io::Write + Send>),
    );
    for w in conf_warnings {
        log.task(Level::Warn, w);
    }

    if cli.stop == Some(true) {
        stop_running_backups(&layout).await?;
        if cli.vmid.as_ref().is_none_or(Vec::is_empty)
            && cli.all != Some(true)
            && cli.pool.is_none()
        {
            return Ok(());
        }
    }
    let node = nodename();
    if cli.node.as_deref().is_some_and(|n| n != node) {
        return Ok(());
    }

    let explicit_zstd = cli.zstd.or(explicit.zstd);
    let explicit_pigz = cli.pigz.or(explicit.pigz);
    let resolved = resolve(cli, &defaults, env.storages.config())?;
    if resolved.pbs {
        return Err(Error::msg(
            "Proxmox Backup Server storages are not supported by vzkit",
        ));
    }
    let runner = env.storages.runner();
    // job-init runs before PVE looks at the storage: DUMPDIR only if given explicitly.
    let explicit_dumpdir = params
        .iter()
        .find(|(k, _)| k == "dumpdir")
        .map(|(_, v)| v.clone())
        .or(explicit.dumpdir.clone());
    let init_hooks = HookScript::new(
        resolved.options.script.clone(),
        resolved.options.storage.clone(),
        explicit_dumpdir,
        Arc::clone(&runner),
    );
    check_setup(&env.storages, &resolved, &init_hooks, &log).await?;
    let opts = resolved.options;

    let store = CtStore::new(layout.clone());
    let vmids = selected_guests(&store, &opts)?;
    if opts.stdout == Some(true) && vmids.len() > 1 {
        return Err(Error::msg(
            "you can only backup a single VM with option --stdout",
        ));
    }
    let cpus =
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
    let compressor = compressor_choice(&opts, explicit_zstd, explicit_pigz, cpus)?;

    let cancel = Arc::new(AtomicBool::new(false));
    install_signal_handlers(Arc::clone(&cancel), &log);
    let _global = global_lock(&layout, opts.lockwait.unwrap_or(180), &log, &cancel).await?;
    let pf = write_pidfile(&layout)?;
    apply_ionice(&env.storages, opts.ionice.unwrap_or(7), &log).await;

    let hooks = HookScript::new(
        opts.script.clone(),
        opts.storage.clone(),
        opts.dumpdir.clone(),
        Arc::clone(&runner),
    );
    let guest: Arc<dyn GuestControl> = env
        .guest
        .unwrap_or_else(|| Arc::new(RuntimeGuests::new(env.storages.clone(), Some(log.clone()))));
    let ctx = JobContext {
        layout: layout.clone(),
        storages: env.storages,
        store,
        guest,
        log: log.clone(),
        exclude_patterns: resolved.exclude_patterns,
        hooks,
        compressor,
        cancel,
        progress: env.stderr_is_tty && !*quiet,
        node,
        opts,
    };
    for (path, state) in crate::journal::leftovers(&layout)? {
        recover_leftover(&ctx, &path, &state).await?;
    }
    exec_backup(&ctx, &vmids, &params).await?;
    // PVE removes the pid file only after a job without errors.
    if let Err(e) = std::fs::remove_file(&pf) {
        log.task(
            Level::Warn,
            format!("unable to remove '{}' - {e}", pf.display()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(!nodename().contains('.'));
    }

    #[test]
    fn guest_selection() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        std::fs::create_dir_all(layout.lxc_conf_dir()).unwrap();
        for id in [101, 100, 102] {
            std::fs::write(layout.ct_conf(id), "arch: amd64\n").unwrap();
        }
        let store = CtStore::new(layout);
        let all = JobOptions {
            all: Some(true),
            exclude: Some(vec![101]),
            ..JobOptions::default()
        };
        assert_eq!(selected_guests(&store, &all).unwrap(), [100, 102]);
        let some = JobOptions {
            vmid: Some(vec![300, 100, 300]),
            ..JobOptions::default()
        };
        assert_eq!(selected_guests(&store, &some).unwrap(), [100, 300]);
        let pool = JobOptions {
            pool: Some("p".into()),
            ..JobOptions::default()
        };
        assert!(selected_guests(&store, &pool).is_err());
    }
}
