//! Running containers with LXC's command-line tools.
//!
//! vzkit keeps LXC's state in a private lxcpath below the relocatable root,
//! `<VZKIT_ROOT>/var/lib/lxc` (PVE's `/var/lib/lxc`), so each container has the directory
//! `<lxcpath>/<vmid>` with the generated `config` ([`config::generate`]), the mounted
//! `rootfs` and LXC's log `lxc.log`. Every LXC tool is called with `-P <lxcpath> -n <vmid>`.
//!
//! Start: config flock; refuse a running container or one with a `lock:` other than
//! `mounted` (a `pct mount` state is unmounted and its lock removed first); mount rootfs and
//! mount points ([`crate::mount::mount_all`]); guest setup ([`crate::setup`]); write the LXC
//! config; the `pre-start` hookscript; `lxc-start -d`; the `post-start` hookscript. A failure
//! after mounting unmounts again, and a failed `lxc-start` reports LXC's errors and how to
//! collect a debug log. Stop/shutdown: `pre-stop` hookscript, `lxc-stop`, then unmount and
//! the `post-stop` hookscript. The host must be cgroup v1 (hybrid), as this build host is.

pub mod cgroup;
pub mod config;
pub mod devices;
pub mod rate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vzkit_host::command::{Cmd, Output, Runner};
use vzkit_host::mount as hmount;
use vzkit_host::paths::Layout;
use vzkit_storage::manager::Storages;

use crate::conf::{CtConfig, MountPoint, MountPointKind};
use crate::ct::root_owner;
use crate::error::{Result, RuntimeError};
use crate::hook::{Phase, exec_hookscript};
use crate::mount::{deactivate_volumes, mount_all, umount_all};
use crate::setup::{self, Dns, files::GuestRoot};
use crate::store::CtStore;

pub use cgroup::CtCgroup;

/// `lxc-start`
pub const LXC_START: &str = "lxc-start";
/// `lxc-stop`
pub const LXC_STOP: &str = "lxc-stop";
/// `lxc-info`
pub const LXC_INFO: &str = "lxc-info";
/// `lxc-freeze`
pub const LXC_FREEZE: &str = "lxc-freeze";
/// `lxc-unfreeze`
pub const LXC_UNFREEZE: &str = "lxc-unfreeze";
/// `lxc-attach`
pub const LXC_ATTACH: &str = "lxc-attach";
/// `lxc-console`
pub const LXC_CONSOLE: &str = "lxc-console";

/// The private lxcpath of a layout: `<root>/var/lib/lxc`.
#[must_use]
pub fn lxcpath(layout: &Layout) -> PathBuf {
    layout.join("/var/lib/lxc")
}

/// A container's run state as LXC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running.
    Stopped,
    /// Running (also while starting or stopping).
    Running,
    /// Running, all processes frozen (`pct suspend`).
    Frozen,
}

impl State {
    /// PVE's `status` value: `running` or `stopped` (a frozen container is running).
    #[must_use]
    pub fn status(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Running | State::Frozen => "running",
        }
    }

    /// Whether the container has processes.
    #[must_use]
    pub fn is_running(self) -> bool {
        self != State::Stopped
    }
}

/// Parses `lxc-info -s -H` output.
///
/// # Errors
/// An unknown state word.
pub fn parse_state(text: &str) -> Result<State> {
    match text.trim() {
        "STOPPED" => Ok(State::Stopped),
        "RUNNING" | "STARTING" | "STOPPING" | "ABORTING" | "THAWED" => Ok(State::Running),
        "FROZEN" | "FREEZING" => Ok(State::Frozen),
        other => Err(RuntimeError::Failed(format!(
            "unable to parse container state '{other}'"
        ))),
    }
}

/// `startup` property: `order=N,up=S,down=S`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Startup {
    /// Start order (lower first); unset starts after all ordered ones.
    pub order: Option<u64>,
    /// Seconds to wait after starting.
    pub up: Option<u64>,
    /// Seconds to wait for shutdown when stopping all.
    pub down: Option<u64>,
}

impl Startup {
    /// Parses a `startup` value.
    ///
    /// # Errors
    /// Unknown keys or values that are not integers.
    pub fn parse(text: &str) -> Result<Self> {
        let mut s = Self::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or(("order", part));
            let n: u64 = v.parse().map_err(|_| {
                RuntimeError::Invalid(format!("startup: invalid value '{v}' for '{k}'"))
            })?;
            match k {
                "order" => s.order = Some(n),
                "up" => s.up = Some(n),
                "down" => s.down = Some(n),
                _ => {
                    return Err(RuntimeError::Invalid(format!("startup: unknown key '{k}'")));
                }
            }
        }
        Ok(s)
    }
}

/// The boot order of `onboot` containers: by `order`, unordered last, then by vmid.
#[must_use]
pub fn boot_order(mut cts: Vec<(u32, Startup)>) -> Vec<(u32, Startup)> {
    cts.sort_by_key(|(vmid, s)| (s.order.is_none(), s.order.unwrap_or(0), *vmid));
    cts
}

/// Options of [`Lxc::start_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// LXC logs at DEBUG level.
    pub debug: bool,
    /// Ignore the container's `lock:`.
    pub skiplock: bool,
}

/// Container life cycle over one host's configs and storages.
#[derive(Debug)]
pub struct Lxc<'a> {
    storages: &'a Storages,
    store: CtStore,
    runner: Arc<dyn Runner>,
    lxcpath: PathBuf,
}

fn device_sources(mps: &[(String, MountPoint)]) -> Vec<String> {
    mps.iter()
        .filter(|(_, mp)| mp.kind() == MountPointKind::Device)
        .map(|(_, mp)| mp.volume.clone())
        .collect()
}

impl<'a> Lxc<'a> {
    /// The life cycle of containers below the storages' layout.
    #[must_use]
    pub fn new(storages: &'a Storages) -> Self {
        let layout = storages.layout().clone();
        Self {
            storages,
            lxcpath: lxcpath(&layout),
            store: CtStore::new(layout),
            runner: storages.runner(),
        }
    }

    /// The private lxcpath.
    #[must_use]
    pub fn lxcpath(&self) -> &Path {
        &self.lxcpath
    }

    /// The config store.
    #[must_use]
    pub fn store(&self) -> &CtStore {
        &self.store
    }

    /// The directory of `vmid` in the lxcpath.
    #[must_use]
    pub fn ct_dir(&self, vmid: u32) -> PathBuf {
        self.lxcpath.join(vmid.to_string())
    }

    /// `<tool> -P <lxcpath> -n <vmid>`.
    #[must_use]
    pub fn lxc_cmd(&self, tool: &str, vmid: u32) -> Cmd {
        Cmd::new(tool)
            .arg("-P")
            .arg(&self.lxcpath)
            .arg("-n")
            .arg(vmid.to_string())
    }

    /// The run state of `vmid` (stopped when LXC has never seen it).
    ///
    /// # Errors
    /// When `lxc-info` fails for another reason.
    pub async fn state(&self, vmid: u32) -> Result<State> {
        if !self.ct_dir(vmid).join("config").exists() {
            return Ok(State::Stopped);
        }
        let out = self
            .runner
            .run(&self.lxc_cmd(LXC_INFO, vmid).args(["-s", "-H"]))
            .await?;
        parse_state(&out.stdout_str())
    }

    /// `running` or `stopped` (PVE's `status`).
    ///
    /// # Errors
    /// As [`Lxc::state`].
    pub async fn status(&self, vmid: u32) -> Result<&'static str> {
        Ok(self.state(vmid).await?.status())
    }

    /// The host PID of the container's init (for `/proc/<pid>/root`); `None` when stopped.
    ///
    /// # Errors
    /// When `lxc-info` fails or prints something else than a PID.
    pub async fn init_pid(&self, vmid: u32) -> Result<Option<u32>> {
        if !self.state(vmid).await?.is_running() {
            return Ok(None);
        }
        let out = self
            .runner
            .run(&self.lxc_cmd(LXC_INFO, vmid).args(["-p", "-H"]))
            .await?;
        let text = out.stdout_str();
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| RuntimeError::Failed(format!("unable to parse pid '{text}' of CT {vmid}")))
    }

    async fn require_running(&self, vmid: u32) -> Result<State> {
        self.store.load(vmid)?;
        let state = self.state(vmid).await?;
        if !state.is_running() {
            return Err(RuntimeError::Invalid(format!("CT {vmid} not running")));
        }
        Ok(state)
    }

    /// `pct start`. With `debug`, LXC logs at DEBUG level to `<ct_dir>/lxc.log`.
    ///
    /// # Errors
    /// "CT <vmid> already running", "CT is locked (<lock>)", mount, setup, hookscript and
    /// start failures; whatever was mounted is unmounted again.
    pub async fn start(&self, vmid: u32, debug: bool, warn: &mut dyn FnMut(String)) -> Result<()> {
        let opts = StartOptions {
            debug,
            skiplock: false,
        };
        self.start_with(vmid, opts, warn).await
    }

    /// Whether `vmid` carries a `lock:` (PVE's `check_lock`, for `stop`, `shutdown`,
    /// `suspend` and `resume` without `--skiplock`).
    ///
    /// # Errors
    /// "CT is locked (<lock>)", config errors.
    pub fn check_lock(&self, vmid: u32) -> Result<()> {
        Ok(self.store.load(vmid)?.check_lock()?)
    }

    /// Start with options; `skiplock` starts despite any `lock:` (a backup job restarting
    /// the container it holds locked).
    ///
    /// # Errors
    /// As [`Lxc::start`].
    pub async fn start_with(
        &self,
        vmid: u32,
        opts: StartOptions,
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        let debug = opts.debug;
        let _lock = self.store.lock(vmid)?;
        let mut conf = self.store.load(vmid)?;
        if self.state(vmid).await?.is_running() {
            return Err(RuntimeError::Invalid(format!("CT {vmid} already running")));
        }
        let root = self.store.layout().ct_rootfs(vmid);
        let mps = conf.mountpoints()?;
        let was_mounted = match conf.get("lock") {
            None => false,
            Some("mounted") => true,
            Some(_) if opts.skiplock => false,
            Some(other) => return Err(RuntimeError::Locked(other.to_string())),
        };
        if !mps.iter().any(|(k, _)| k == "rootfs") {
            return Err(RuntimeError::Invalid(
                "missing 'rootfs' configuration".into(),
            ));
        }
        let ct_dir = self.ct_dir(vmid);
        // Generate first: a bad config must fail before anything is (un)mounted.
        let mut facts = config::host_facts(&ct_dir)?;
        facts.devices = devices::probe_all(&conf)?;
        let lxc_conf = config::generate(vmid, &conf, &facts)?;
        if was_mounted {
            // `pct mount` state: start from a clean mount and drop the lock.
            umount_all(self.runner.as_ref(), &root, &device_sources(&mps)).await?;
            deactivate_volumes(self.storages, &mps, None, warn).await;
            conf.main.set_lock(None);
            self.store.write(vmid, &conf)?;
        } else {
            // A container that stopped by itself leaves its volumes mounted.
            self.cleanup_stopped_with(vmid, &conf, warn).await?;
        }
        let owner = root_owner(&conf)?;
        mount_all(self.storages, &root, &mps, owner, warn).await?;
        let res = self
            .start_mounted(vmid, &conf, &lxc_conf, owner, debug, warn)
            .await;
        if let Err(e) = res {
            if let Err(undo) = umount_all(self.runner.as_ref(), &root, &device_sources(&mps)).await
            {
                warn(format!("unable to unmount CT {vmid}: {undo}"));
            } else if let Err(undo) = self.wait_loops_released(&mps, warn).await {
                warn(format!("CT {vmid}: {undo}"));
            } else {
                deactivate_volumes(self.storages, &mps, None, warn).await;
            }
            return Err(e);
        }
        exec_hookscript(self.storages, &conf, vmid, Phase::PostStart, warn).await
    }

    async fn start_mounted(
        &self,
        vmid: u32,
        conf: &CtConfig,
        lxc_conf: &config::LxcConfig,
        owner: crate::mount::RootOwner,
        debug: bool,
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        let ct_dir = self.ct_dir(vmid);
        let guest = GuestRoot::open(&self.store.layout().ct_rootfs(vmid), owner)?;
        let host_resolv =
            std::fs::read_to_string(self.store.layout().join("/etc/resolv.conf")).ok();
        let dns = Dns::lookup(conf, host_resolv.as_deref());
        setup::pre_start(&guest, conf, &dns)?;
        let write = |name: &str, text: &str| {
            let p = ct_dir.join(name);
            std::fs::write(&p, text).map_err(|e| RuntimeError::io("unable to write", p, e))
        };
        if let Some(rules) = &lxc_conf.seccomp_rules {
            write("rules.seccomp", rules)?;
        }
        devices::make_nodes(&ct_dir, conf, &lxc_conf.devices)?;
        write("config", &lxc_conf.text)?;
        exec_hookscript(self.storages, conf, vmid, Phase::PreStart, warn).await?;
        let log = ct_dir.join("lxc.log");
        // A fresh log per start, so a failure reports this start's errors only.
        if let Err(e) = std::fs::remove_file(&log)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(RuntimeError::io("unable to remove", &log, e));
        }
        cgroup::remove_stale(
            Path::new(cgroup::CGROUP_ROOT),
            vmid,
            Duration::from_secs(10),
        )?;
        let level = if debug { "DEBUG" } else { "INFO" };
        let cmd = self
            .lxc_cmd(LXC_START, vmid)
            .arg("-d")
            .arg("-o")
            .arg(&log)
            .args(["-l", level])
            .timeout(Duration::from_secs(120));
        let out = self.runner.output(&cmd).await?;
        if !out.success() {
            let msg = self.start_failure(vmid, &out, &log);
            // LXC leaves the monitor cgroup of a failed start behind.
            let root = Path::new(cgroup::CGROUP_ROOT);
            if let Err(e) = cgroup::remove_stale(root, vmid, Duration::from_secs(2)) {
                warn(e.to_string());
            }
            return Err(RuntimeError::Failed(msg));
        }
        // `rate` on the host ends of the veths, as PVE's network up script does. A limit
        // that cannot be set stops the container again: it must not run unlimited.
        if let Err(e) = self.apply_rate_limits(vmid, conf).await {
            let _ = self
                .runner
                .output(&self.lxc_cmd(LXC_STOP, vmid).arg("--kill"))
                .await;
            return Err(e);
        }
        Ok(())
    }

    async fn apply_rate_limits(&self, vmid: u32, conf: &CtConfig) -> Result<()> {
        for (key, net) in conf.main.nets()? {
            let Some(rate) = &net.rate else { continue };
            let iface = format!("veth{vmid}i{}", key.trim_start_matches("net"));
            rate::apply(self.runner.as_ref(), &key, &iface, rate).await?;
        }
        Ok(())
    }

    fn start_failure(&self, vmid: u32, out: &Output, log: &Path) -> String {
        let mut msg = format!("startup for container '{vmid}' failed");
        let errors: Vec<String> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(str::to_string)
            .collect();
        let stderr = out.stderr_str();
        if !stderr.is_empty() {
            msg.push('\n');
            msg.push_str(&stderr);
        }
        for e in errors.iter().rev().take(10).rev() {
            msg.push('\n');
            msg.push_str(e);
        }
        msg.push_str(&format!(
            "\nto collect a debug log, run 'pct start {vmid} --debug' (log in '{}') or \
             'lxc-start -P {} -n {vmid} -F -l DEBUG -o /tmp/lxc-{vmid}.log'",
            log.display(),
            self.lxcpath.display()
        ));
        msg
    }

    /// Unmounts a stopped container's volumes and runs the `post-stop` hookscript.
    async fn post_stop(
        &self,
        vmid: u32,
        conf: &CtConfig,
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        let root = self.store.layout().ct_rootfs(vmid);
        let mps = conf.mountpoints()?;
        umount_all(self.runner.as_ref(), &root, &device_sources(&mps)).await?;
        self.wait_loops_released(&mps, warn).await?;
        deactivate_volumes(self.storages, &mps, None, warn).await;
        exec_hookscript(self.storages, conf, vmid, Phase::PostStop, warn).await
    }

    /// Waits until no loop device is attached to the container's image volumes any more.
    /// The exiting LXC monitor still holds copies of the mounts for a moment; a start (or a
    /// backup) that reused the loop device in that window would see it cleared under it.
    async fn wait_loops_released(
        &self,
        mps: &[(String, MountPoint)],
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        let mut files = Vec::new();
        for (_, mp) in mps {
            if mp.kind() != MountPointKind::Volume {
                continue;
            }
            let (plugin, volname) = self.storages.resolve(&mp.volume)?;
            if let vzkit_storage::plugin::VolumeAccess::ImageFile(f) =
                plugin.access(&volname, None).await?
            {
                files.push(f);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for f in files {
            loop {
                let out = self
                    .runner
                    .run_stdout(&Cmd::new(hmount::LOSETUP).arg("--associated").arg(&f))
                    .await?;
                if hmount::parse_losetup_associated(&out).is_none() {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    warn(format!(
                        "loop device of '{}' still attached after stop",
                        f.display()
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Finishes a container that stopped by itself (`poweroff` inside, a crash): unmounts
    /// its volumes and runs the `post-stop` hookscript. Returns whether there was anything
    /// to do. A `pct mount` (`lock: mounted`) is left alone.
    ///
    /// # Errors
    /// Config, unmount and `lxc-info` errors.
    pub async fn cleanup_stopped(&self, vmid: u32, warn: &mut dyn FnMut(String)) -> Result<bool> {
        let conf = self.store.load(vmid)?;
        if conf.get("lock") == Some("mounted") || self.state(vmid).await?.is_running() {
            return Ok(false);
        }
        self.cleanup_stopped_with(vmid, &conf, warn).await
    }

    async fn cleanup_stopped_with(
        &self,
        vmid: u32,
        conf: &CtConfig,
        warn: &mut dyn FnMut(String),
    ) -> Result<bool> {
        let root = self.store.layout().ct_rootfs(vmid);
        if !hmount::is_mountpoint(&root).unwrap_or(false) {
            return Ok(false);
        }
        self.post_stop(vmid, conf, warn).await?;
        Ok(true)
    }

    /// `pct stop`: kills the container at once (`lxc-stop --kill`), then unmounts.
    ///
    /// # Errors
    /// "CT <vmid> not running", hookscript, command and unmount errors.
    pub async fn stop(&self, vmid: u32, warn: &mut dyn FnMut(String)) -> Result<()> {
        self.require_running(vmid).await?;
        let conf = self.store.load(vmid)?;
        exec_hookscript(self.storages, &conf, vmid, Phase::PreStop, warn).await?;
        self.runner
            .run(&self.lxc_cmd(LXC_STOP, vmid).arg("--kill"))
            .await?;
        self.post_stop(vmid, &conf, warn).await
    }

    /// `pct shutdown`: asks init to power off (`lxc-stop --nokill --timeout N`). When it is
    /// still running after `timeout` seconds: with `force` it is killed, otherwise an error.
    ///
    /// # Errors
    /// "CT <vmid> not running", a timeout without `force`, command and unmount errors.
    pub async fn shutdown(
        &self,
        vmid: u32,
        timeout: u64,
        force: bool,
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        let state = self.require_running(vmid).await?;
        let conf = self.store.load(vmid)?;
        exec_hookscript(self.storages, &conf, vmid, Phase::PreStop, warn).await?;
        if state == State::Frozen {
            // A frozen init cannot react to the power-off signal.
            self.runner.run(&self.lxc_cmd(LXC_UNFREEZE, vmid)).await?;
        }
        let cmd = self
            .lxc_cmd(LXC_STOP, vmid)
            .arg("--nokill")
            .arg("--timeout")
            .arg(timeout.to_string())
            .timeout(Duration::from_secs(timeout + 30));
        let out = self.runner.output(&cmd).await?;
        if !out.success() && self.state(vmid).await?.is_running() {
            if !force {
                return Err(RuntimeError::Failed(format!(
                    "shutdown of CT {vmid} failed - still running after {timeout} seconds"
                )));
            }
            warn(format!(
                "CT {vmid} did not shut down within {timeout} seconds - killing it"
            ));
            self.runner
                .run(&self.lxc_cmd(LXC_STOP, vmid).arg("--kill"))
                .await?;
        }
        self.post_stop(vmid, &conf, warn).await
    }

    /// `pct reboot`: shutdown (waiting up to `timeout` seconds, then killing) and start.
    ///
    /// # Errors
    /// As [`Lxc::shutdown`] and [`Lxc::start`].
    pub async fn reboot(
        &self,
        vmid: u32,
        timeout: u64,
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        self.shutdown(vmid, timeout, true, warn).await?;
        self.start(vmid, false, warn).await
    }

    /// `pct suspend`: freezes all processes (`lxc-freeze`).
    ///
    /// # Errors
    /// "CT <vmid> not running", command errors.
    pub async fn freeze(&self, vmid: u32) -> Result<()> {
        self.require_running(vmid).await?;
        self.runner.run(&self.lxc_cmd(LXC_FREEZE, vmid)).await?;
        Ok(())
    }

    /// `pct resume`: thaws a frozen container (`lxc-unfreeze`).
    ///
    /// # Errors
    /// "CT <vmid> not running", command errors.
    pub async fn thaw(&self, vmid: u32) -> Result<()> {
        self.require_running(vmid).await?;
        self.runner.run(&self.lxc_cmd(LXC_UNFREEZE, vmid)).await?;
        Ok(())
    }

    /// Runs `command` inside the container and returns its output, whatever its exit.
    ///
    /// # Errors
    /// "missing command", "CT <vmid> not running", "CT <vmid> is frozen" (attaching would
    /// hang), command start errors.
    pub async fn exec(&self, vmid: u32, command: &[String]) -> Result<Output> {
        let cmd = self.attach_cmd(vmid, command).await?;
        Ok(self.runner.output(&cmd).await?)
    }

    /// The `lxc-attach` command for `pct exec` (run it in the foreground with
    /// `vzkit_host::command::run_foreground`).
    ///
    /// # Errors
    /// As [`Lxc::exec`].
    pub async fn attach_cmd(&self, vmid: u32, command: &[String]) -> Result<Cmd> {
        if command.is_empty() {
            return Err(RuntimeError::Invalid("missing command".into()));
        }
        if self.require_running(vmid).await? == State::Frozen {
            return Err(RuntimeError::Invalid(format!("CT {vmid} is frozen")));
        }
        Ok(self.lxc_cmd(LXC_ATTACH, vmid).arg("--").args(command))
    }

    /// The command for `pct enter` (a shell through `lxc-attach`).
    ///
    /// # Errors
    /// "Error: container '<vmid>' not running!".
    pub async fn enter_cmd(&self, vmid: u32) -> Result<Cmd> {
        self.store.load(vmid)?;
        if !self.state(vmid).await?.is_running() {
            return Err(RuntimeError::Invalid(format!(
                "Error: container '{vmid}' not running!"
            )));
        }
        Ok(self.lxc_cmd(LXC_ATTACH, vmid))
    }

    /// The command for `pct console` by `cmode` (PVE's `get_console_command`): `tty` →
    /// `lxc-console`, `console` → `lxc-console -t 0`, `shell` → `lxc-attach --clear-env`.
    ///
    /// # Errors
    /// Config errors, an unknown `cmode`.
    pub fn console_cmd(&self, vmid: u32, escape: Option<&str>) -> Result<Cmd> {
        let conf = self.store.load(vmid)?;
        let cmode = conf.get("cmode").unwrap_or("tty");
        let with_escape = |c: Cmd| match escape {
            Some(e) => c.arg("-e").arg(e),
            None => c,
        };
        match cmode {
            "tty" => Ok(with_escape(self.lxc_cmd(LXC_CONSOLE, vmid))),
            "console" => Ok(with_escape(
                self.lxc_cmd(LXC_CONSOLE, vmid).args(["-t", "0"]),
            )),
            "shell" => Ok(Cmd::new(LXC_ATTACH)
                .arg("--clear-env")
                .arg("-P")
                .arg(&self.lxcpath)
                .arg("-n")
                .arg(vmid.to_string())),
            other => Err(RuntimeError::Invalid(format!("unknown cmode '{other}'"))),
        }
    }

    /// `pct status --verbose`: PVE's `vmstatus` keys that vzkit knows.
    ///
    /// # Errors
    /// Config and `lxc-info` errors.
    pub async fn status_verbose(&self, vmid: u32) -> Result<BTreeMap<String, String>> {
        let conf = self.store.load(vmid)?;
        let state = self.state(vmid).await?;
        let mut m = BTreeMap::new();
        let main = &conf.main;
        m.insert("vmid".into(), vmid.to_string());
        m.insert("type".into(), "lxc".into());
        m.insert("status".into(), state.status().into());
        m.insert(
            "name".into(),
            main.hostname()
                .map_or_else(|| format!("CT{vmid}"), str::to_string),
        );
        m.insert("maxmem".into(), (main.memory()? * 1024 * 1024).to_string());
        m.insert("maxswap".into(), (main.swap()? * 1024 * 1024).to_string());
        if let Some(cores) = main.cores()? {
            m.insert("cpus".into(), cores.to_string());
        }
        if let Some(lock) = main.get("lock") {
            m.insert("lock".into(), lock.into());
        }
        if state == State::Frozen {
            m.insert("frozen".into(), "1".into());
        }
        if let Some(pid) = self.init_pid(vmid).await? {
            m.insert("pid".into(), pid.to_string());
            let cg = CtCgroup::new(vmid);
            m.insert("mem".into(), cg.memory_usage()?.to_string());
            m.insert("cputime".into(), cg.cpu_time_ns()?.to_string());
        } else {
            m.insert("mem".into(), "0".into());
        }
        Ok(m)
    }

    /// `pct cpusets`: the CPUs of every running container, by vmid.
    ///
    /// # Errors
    /// Config listing errors.
    pub async fn cpusets(&self, warn: &mut dyn FnMut(String)) -> Result<BTreeMap<u32, Vec<u32>>> {
        let mut res = BTreeMap::new();
        for vmid in self.store.list()? {
            if !self.state(vmid).await?.is_running() {
                continue;
            }
            match CtCgroup::new(vmid).cpuset() {
                Ok(cpus) => {
                    res.insert(vmid, cpus);
                }
                Err(e) => warn(e.to_string()),
            }
        }
        Ok(res)
    }

    /// Starts every `onboot` container that is not running, in boot order, waiting `up`
    /// seconds after each. Returns each attempted vmid with its result.
    ///
    /// # Errors
    /// Config listing errors (start failures are in the returned list).
    pub async fn start_all(&self, warn: &mut dyn FnMut(String)) -> Result<Vec<(u32, Result<()>)>> {
        let mut cts = Vec::new();
        for vmid in self.store.list()? {
            let conf = self.store.load(vmid)?;
            if !conf.main.onboot() {
                continue;
            }
            let startup = Startup::parse(conf.get("startup").unwrap_or(""))?;
            cts.push((vmid, startup));
        }
        let mut results = Vec::new();
        for (vmid, startup) in boot_order(cts) {
            if self.state(vmid).await?.is_running() {
                continue;
            }
            let res = self.start(vmid, false, warn).await;
            let ok = res.is_ok();
            results.push((vmid, res));
            if ok && let Some(up) = startup.up {
                tokio::time::sleep(Duration::from_secs(up)).await;
            }
        }
        Ok(results)
    }
}

/// PVE's `pct cpusets` table for `sets` (vmid → CPUs).
#[must_use]
pub fn cpusets_table(sets: &BTreeMap<u32, Vec<u32>>) -> String {
    if sets.is_empty() {
        return "no running containers\n".into();
    }
    let mut len = 0;
    let mut id_len = 0;
    let mut lines = Vec::new();
    for (vmid, cpus) in sets {
        let mut line = String::from(": ");
        let last = cpus.last().copied().unwrap_or(0);
        for id in 0..=last {
            let s = id.to_string();
            line.push(' ');
            if cpus.contains(&id) {
                line.push_str(&s);
            } else {
                line.push_str(&" ".repeat(s.len()));
            }
        }
        len = len.max(line.len());
        id_len = id_len.max(vmid.to_string().len());
        lines.push((*vmid, line));
    }
    let header = format!("{}\n", "-".repeat(len + id_len));
    let mut out = header.clone();
    for (vmid, line) in lines {
        out.push_str(&format!("{vmid:>id_len$}{line}\n"));
    }
    out.push_str(&header);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzkit_host::command::RecordingRunner;
    use vzkit_storage::config::StorageConfig;

    #[test]
    fn states_and_startup() {
        assert_eq!(parse_state("RUNNING\n").unwrap(), State::Running);
        assert_eq!(parse_state("FROZEN").unwrap().status(), "running");
        assert_eq!(parse_state("STOPPED").unwrap().status(), "stopped");
        assert!(parse_state("WEIRD").is_err());
        assert_eq!(
            Startup::parse("order=2,up=5,down=7").unwrap(),
            Startup {
                order: Some(2),
                up: Some(5),
                down: Some(7)
            }
        );
        assert!(Startup::parse("order=x").is_err());
        let order = boot_order(vec![
            (300, Startup::default()),
            (200, Startup::parse("order=2").unwrap()),
            (100, Startup::default()),
            (400, Startup::parse("order=1").unwrap()),
        ]);
        let ids: Vec<u32> = order.into_iter().map(|(v, _)| v).collect();
        assert_eq!(ids, [400, 200, 100, 300]);
    }

    #[test]
    fn cpusets_table_matches_pve_layout() {
        let sets = BTreeMap::from([(100, vec![0, 1]), (1001, vec![1])]);
        assert_eq!(
            cpusets_table(&sets),
            "----------\n 100:  0 1\n1001:    1\n----------\n"
        );
        assert_eq!(cpusets_table(&BTreeMap::new()), "no running containers\n");
    }

    #[tokio::test]
    async fn lifecycle_commands_use_the_private_lxcpath() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let runner = Arc::new(RecordingRunner::new());
        let storages =
            Storages::with_config(layout.clone(), StorageConfig::default(), runner.clone());
        let lxc = Lxc::new(&storages);
        std::fs::create_dir_all(layout.lxc_conf_dir()).unwrap();
        std::fs::write(
            layout.ct_conf(150),
            "arch: amd64\nrootfs: local:150/vm-150-disk-0.raw\ncmode: shell\n",
        )
        .unwrap();
        std::fs::create_dir_all(lxc.ct_dir(150)).unwrap();
        std::fs::write(lxc.ct_dir(150).join("config"), "").unwrap();
        let p = lxcpath(&layout).display().to_string();
        runner.push_reply(Output::ok("RUNNING\n"));
        lxc.freeze(150).await.unwrap();
        runner.push_reply(Output::ok("FROZEN\n"));
        let err = lxc.exec(150, &["true".into()]).await.unwrap_err();
        assert_eq!(err.to_string(), "CT 150 is frozen");
        runner.push_reply(Output::ok("FROZEN\n"));
        lxc.thaw(150).await.unwrap();
        runner.push_reply(Output::ok("STOPPED\n"));
        assert_eq!(
            lxc.freeze(150).await.unwrap_err().to_string(),
            "CT 150 not running"
        );
        assert_eq!(
            runner.call_lines(),
            [
                format!("lxc-info -P {p} -n 150 -s -H"),
                format!("lxc-freeze -P {p} -n 150"),
                format!("lxc-info -P {p} -n 150 -s -H"),
                format!("lxc-info -P {p} -n 150 -s -H"),
                format!("lxc-unfreeze -P {p} -n 150"),
                format!("lxc-info -P {p} -n 150 -s -H"),
            ]
        );
        assert_eq!(
            lxc.console_cmd(150, None).unwrap().argv().join(" "),
            format!("lxc-attach --clear-env -P {p} -n 150")
        );
    }
}
