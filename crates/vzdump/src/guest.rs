//! Guest state and control, behind a small trait so that the backup job never needs to know
//! how containers run.
//!
//! The job asks a [`GuestControl`] whether a container runs and, for running containers,
//! to shut it down and start it again (stop mode), to freeze and thaw it (suspend and
//! snapshot mode) and for the pid of its init (suspend mode copies from
//! `/proc/<pid>/root`). Archive code never calls it.
//!
//! [`RuntimeGuests`], the job's default, is the implementation over vzkit's container runtime
//! ([`vzkit_runtime::lxc::Lxc`], LXC with vzkit's private lxcpath): a shutdown unmounts the
//! container's volumes and runs its hookscript as `pct shutdown` does, and the restart after
//! a stop-mode backup starts with `skiplock`, because the job still holds `lock: backup`.
//! [`LxcTools`] is the thin variant over the bare LXC command-line tools (`lxc-info`,
//! `lxc-stop --nokill --timeout`, `lxc-start`, `lxc-freeze`, `lxc-unfreeze`) without
//! vzkit's mount handling; it only reports what it can observe: without `lxc-info` on the
//! host no container can be running.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vzkit_host::command::{Cmd, Runner};
use vzkit_host::paths::Layout;

use vzkit_runtime::lxc::{Lxc, StartOptions};
use vzkit_storage::manager::Storages;

use crate::error::{Error, Result};
use crate::log::TaskLog;

/// `lxc-info`
pub const LXC_INFO: &str = "lxc-info";
/// `lxc-stop`
pub const LXC_STOP: &str = "lxc-stop";
/// `lxc-start`
pub const LXC_START: &str = "lxc-start";
/// `lxc-freeze`
pub const LXC_FREEZE: &str = "lxc-freeze";
/// `lxc-unfreeze`
pub const LXC_UNFREEZE: &str = "lxc-unfreeze";

/// Whether a guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    /// Running (or frozen).
    Running,
    /// Not running.
    Stopped,
}

impl GuestStatus {
    /// PVE's status text (`running`, `stopped`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            GuestStatus::Running => "running",
            GuestStatus::Stopped => "stopped",
        }
    }
}

/// State and lifecycle of containers, as the backup job needs them.
#[async_trait::async_trait]
pub trait GuestControl: Send + Sync + std::fmt::Debug {
    /// Whether the container runs.
    ///
    /// # Errors
    /// When the state cannot be determined.
    async fn status(&self, vmid: u32) -> Result<GuestStatus>;

    /// Shuts the container down cleanly, waiting at most `timeout` (`lxc-stop --nokill`).
    ///
    /// # Errors
    /// When it does not stop in time.
    async fn shutdown(&self, vmid: u32, timeout: Duration) -> Result<()>;

    /// Starts the container.
    ///
    /// # Errors
    /// When it does not start.
    async fn start(&self, vmid: u32) -> Result<()>;

    /// Freezes all processes of the container.
    ///
    /// # Errors
    /// When the freezer fails.
    async fn freeze(&self, vmid: u32) -> Result<()>;

    /// Thaws a frozen container.
    ///
    /// # Errors
    /// When the freezer fails.
    async fn thaw(&self, vmid: u32) -> Result<()>;

    /// The host pid of the container's init.
    ///
    /// # Errors
    /// When the container does not run.
    async fn root_pid(&self, vmid: u32) -> Result<u32>;
}

/// [`GuestControl`] over the LXC command-line tools; see the module docs.
#[derive(Debug, Clone)]
pub struct LxcTools {
    runner: Arc<dyn Runner>,
    /// `-P <lxcpath>`: `<root>/var/lib/lxc` (PVE's `/var/lib/lxc`).
    lxcpath: PathBuf,
}

/// Whether `name` is an executable on `PATH`.
#[must_use]
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(name);
            f.is_file() && rustix::fs::access(&f, rustix::fs::Access::EXEC_OK).is_ok()
        })
    })
}

/// Parses `lxc-info -s` output (`State:          RUNNING`).
#[must_use]
pub fn parse_lxc_state(out: &str) -> Option<GuestStatus> {
    out.lines().find_map(|l| {
        let v = l.strip_prefix("State:")?.trim();
        Some(match v {
            "RUNNING" | "FROZEN" | "FREEZING" | "THAWED" | "STOPPING" | "STARTING" => {
                GuestStatus::Running
            }
            _ => GuestStatus::Stopped,
        })
    })
}

impl LxcTools {
    /// Tools for the containers of `layout`.
    #[must_use]
    pub fn new(runner: Arc<dyn Runner>, layout: &Layout) -> Self {
        LxcTools {
            runner,
            lxcpath: layout.join("/var/lib/lxc"),
        }
    }

    fn cmd(&self, program: &str, vmid: u32) -> Cmd {
        Cmd::new(program)
            .arg("-P")
            .arg(&self.lxcpath)
            .arg("-n")
            .arg(vmid.to_string())
    }

    async fn run(&self, cmd: Cmd) -> Result<String> {
        Ok(self.runner.run_stdout(&cmd).await?)
    }
}

#[async_trait::async_trait]
impl GuestControl for LxcTools {
    async fn status(&self, vmid: u32) -> Result<GuestStatus> {
        // Without LXC, or for a container LXC was never given a config for, nothing runs.
        if !on_path(LXC_INFO) || !self.lxcpath.join(vmid.to_string()).join("config").exists() {
            return Ok(GuestStatus::Stopped);
        }
        let out = self
            .runner
            .output(&self.cmd(LXC_INFO, vmid).arg("-s"))
            .await?;
        // lxc-info fails for containers it does not know: those are not running.
        if !out.success() {
            return Ok(GuestStatus::Stopped);
        }
        parse_lxc_state(&out.stdout_str()).ok_or_else(|| {
            Error::msg(format!(
                "unable to parse lxc-info output for CT {vmid}: {}",
                out.stdout_str().trim()
            ))
        })
    }

    async fn shutdown(&self, vmid: u32, timeout: Duration) -> Result<()> {
        let cmd = self
            .cmd(LXC_STOP, vmid)
            .arg("--nokill")
            .arg("--timeout")
            .arg(timeout.as_secs().to_string());
        self.run(cmd).await.map(drop)
    }

    async fn start(&self, vmid: u32) -> Result<()> {
        self.run(self.cmd(LXC_START, vmid)).await.map(drop)
    }

    async fn freeze(&self, vmid: u32) -> Result<()> {
        self.run(self.cmd(LXC_FREEZE, vmid)).await.map(drop)
    }

    async fn thaw(&self, vmid: u32) -> Result<()> {
        self.run(self.cmd(LXC_UNFREEZE, vmid)).await.map(drop)
    }

    async fn root_pid(&self, vmid: u32) -> Result<u32> {
        let out = self
            .run(self.cmd(LXC_INFO, vmid).args(["-p", "-H"]))
            .await?;
        out.trim()
            .parse()
            .map_err(|_| Error::msg(format!("unable to get PID for CT {vmid} (not running?)")))
    }
}

/// [`GuestControl`] over vzkit's container runtime; see the module docs.
#[derive(Debug, Clone)]
pub struct RuntimeGuests {
    storages: Storages,
    log: Option<TaskLog>,
}

impl RuntimeGuests {
    /// The containers of the host `storages` belong to; runtime warnings go to `log`.
    #[must_use]
    pub fn new(storages: Storages, log: Option<TaskLog>) -> Self {
        RuntimeGuests { storages, log }
    }

    fn lxc(&self) -> Lxc<'_> {
        Lxc::new(&self.storages)
    }

    /// Runs a runtime operation that reports warnings through a callback. The runtime's
    /// futures are not `Send` (the callback is a plain `&mut dyn FnMut`), so the operation
    /// runs on a blocking thread of the job's runtime.
    async fn with_warnings<F>(&self, op: F) -> Result<()>
    where
        F: for<'a> FnOnce(
                &'a Lxc<'a>,
                &'a mut dyn FnMut(String),
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = vzkit_runtime::error::Result<()>> + 'a>,
            > + Send
            + 'static,
    {
        let storages = self.storages.clone();
        let handle = tokio::runtime::Handle::current();
        let (res, warnings) = tokio::task::spawn_blocking(move || {
            let lxc = Lxc::new(&storages);
            let mut warnings = Vec::new();
            let res = {
                let mut warn = |w: String| warnings.push(w);
                handle.block_on(op(&lxc, &mut warn))
            };
            (res, warnings)
        })
        .await
        .map_err(|e| Error::msg(format!("container operation failed - {e}")))?;
        warnings.into_iter().for_each(|w| self.warn(w));
        Ok(res?)
    }

    fn warn(&self, msg: String) {
        match &self.log {
            Some(log) => log.warn(msg),
            None => eprintln!("WARN: {msg}"),
        }
    }
}

#[async_trait::async_trait]
impl GuestControl for RuntimeGuests {
    async fn status(&self, vmid: u32) -> Result<GuestStatus> {
        Ok(if self.lxc().state(vmid).await?.is_running() {
            GuestStatus::Running
        } else {
            GuestStatus::Stopped
        })
    }

    async fn shutdown(&self, vmid: u32, timeout: Duration) -> Result<()> {
        let secs = timeout.as_secs();
        self.with_warnings(move |lxc, warn| {
            Box::pin(async move { lxc.shutdown(vmid, secs, false, warn).await })
        })
        .await
    }

    async fn start(&self, vmid: u32) -> Result<()> {
        let opts = StartOptions {
            debug: false,
            skiplock: true,
        };
        self.with_warnings(move |lxc, warn| {
            Box::pin(async move { lxc.start_with(vmid, opts, warn).await })
        })
        .await
    }

    async fn freeze(&self, vmid: u32) -> Result<()> {
        Ok(self.lxc().freeze(vmid).await?)
    }

    async fn thaw(&self, vmid: u32) -> Result<()> {
        Ok(self.lxc().thaw(vmid).await?)
    }

    async fn root_pid(&self, vmid: u32) -> Result<u32> {
        self.lxc()
            .init_pid(vmid)
            .await?
            .ok_or_else(|| Error::msg(format!("unable to get PID for CT {vmid} (not running?)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzkit_host::command::{Output, RecordingRunner};

    #[test]
    fn lxc_info_states() {
        assert_eq!(
            parse_lxc_state("State:          RUNNING\n"),
            Some(GuestStatus::Running)
        );
        assert_eq!(
            parse_lxc_state("Name: 100\nState: STOPPED\n"),
            Some(GuestStatus::Stopped)
        );
        assert_eq!(parse_lxc_state("FROZEN"), None);
    }

    #[tokio::test]
    async fn lifecycle_argument_vectors() {
        let runner = Arc::new(RecordingRunner::new());
        let t = LxcTools::new(runner.clone(), &Layout::new("/srv/root"));
        t.shutdown(100, Duration::from_secs(600)).await.unwrap();
        t.freeze(100).await.unwrap();
        t.thaw(100).await.unwrap();
        t.start(100).await.unwrap();
        runner.push_reply(Output::ok("4242\n"));
        assert_eq!(t.root_pid(100).await.unwrap(), 4242);
        assert_eq!(
            runner.call_lines(),
            [
                "lxc-stop -P /srv/root/var/lib/lxc -n 100 --nokill --timeout 600",
                "lxc-freeze -P /srv/root/var/lib/lxc -n 100",
                "lxc-unfreeze -P /srv/root/var/lib/lxc -n 100",
                "lxc-start -P /srv/root/var/lib/lxc -n 100",
                "lxc-info -P /srv/root/var/lib/lxc -n 100 -p -H",
            ]
        );
        let plain = LxcTools::new(runner.clone(), &Layout::new("/"));
        assert_eq!(
            plain.cmd(LXC_FREEZE, 7).argv(),
            ["lxc-freeze", "-P", "/var/lib/lxc", "-n", "7"]
        );
        // No LXC config for the container: stopped, without asking LXC.
        assert_eq!(t.status(100).await.unwrap(), GuestStatus::Stopped);
    }
}
