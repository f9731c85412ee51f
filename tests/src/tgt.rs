//! A real iSCSI target for tests: `tgtd` (the Linux SCSI target framework's user-space
//! daemon) on 127.0.0.1:3260, with targets and LUNs on sparse files in a scratch directory.
//!
//! tgtd always puts its control socket in `/var/run/tgtd/`; to keep the host's `/run`
//! untouched, it runs in a private mount namespace with the scratch directory's `run`
//! bind-mounted over `/run`, and `tgtadm` is sent into that namespace with
//! `nsenter -t <pid> -m` ([`Tgt::tgtadm`]). Only one tgtd can listen on port 3260, so users
//! are serialised host-wide by an exclusive `flock` on [`LOCK_FILE`], held for the guard's
//! lifetime. Dropping the guard stops tgtd by its PID (taking the system offline and deleting
//! it through `tgtadm`, then SIGKILL if it is still there), reaps it and removes the scratch
//! directory, also when the test panicked; `qemu-storage-daemon` exports of the portal that a
//! failed test left behind are killed first.
//!
//! Drop order: anything connected to the target (a [`crate::TestRoot`] with mounted LUNs)
//! should be dropped before the target, so declare the target first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The lock file serialising users of port 3260.
pub const LOCK_FILE: &str = "/run/lock/vzkit-tests-tgt.lock";
/// The portal tgtd listens on.
pub const PORTAL: &str = "127.0.0.1:3260";

/// A running tgtd.
#[derive(Debug)]
pub struct Tgt {
    child: Option<Child>,
    dir: tempfile::TempDir,
    _lock: File,
}

/// Whether `pid` is a live (not zombie) process.
#[must_use]
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Live processes whose command name is `comm` (as the kernel keeps it: at most 15 bytes)
/// and whose command line mentions `needle`.
#[must_use]
pub fn processes(comm: &str, needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                && alive(*pid)
        })
        .collect()
}

fn accepts(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(
        &addr.parse().expect("socket address"),
        Duration::from_millis(200),
    )
    .is_ok()
}

impl Tgt {
    /// Takes the lock and starts tgtd; returns once it accepts connections.
    ///
    /// # Panics
    /// When tgt is not installed or tgtd does not come up within 10 s (after cleanup).
    #[must_use]
    pub fn start() -> Self {
        let lock = crate::host_lock(LOCK_FILE);
        let dir = tempfile::Builder::new()
            .prefix("vzkit-tgt-")
            .tempdir()
            .expect("tempdir");
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).expect("mkdir run");
        let log = File::create(dir.path().join("tgtd.log")).expect("tgtd.log");
        assert!(
            !accepts(PORTAL),
            "something else listens on {PORTAL} (a tgtd not started by these tests?)"
        );
        let script = format!(
            "mount --bind '{}' /run && exec tgtd -f --iscsi portal={PORTAL}",
            run.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("cannot start tgtd (is tgt installed?)");
        let tgt = Self {
            child: Some(child),
            dir,
            _lock: lock,
        };
        let start = Instant::now();
        while !(tgt.socket().exists() && accepts(PORTAL)) {
            if start.elapsed() > Duration::from_secs(10) {
                let log =
                    std::fs::read_to_string(tgt.dir.path().join("tgtd.log")).unwrap_or_default();
                drop(tgt);
                panic!("tgtd did not come up within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(tgt.pidfile(), format!("{}\n", tgt.pid())).expect("pid file");
        tgt
    }

    /// tgtd's PID (the same process as `unshare` and `sh`, which exec).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A PID file of tgtd (for storage.cfg's `tgt-pidfile`).
    #[must_use]
    pub fn pidfile(&self) -> PathBuf {
        self.dir.path().join("tgtd.pid")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/tgtd/socket.0")
    }

    /// The scratch directory (backing files live in `luns/`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `tgtadm --lld iscsi <args>` inside tgtd's mount namespace.
    ///
    /// # Panics
    /// When `nsenter` cannot be started.
    #[must_use]
    pub fn tgtadm_output(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args([
                "-t",
                &self.pid().to_string(),
                "-m",
                "tgtadm",
                "--lld",
                "iscsi",
            ])
            .args(args)
            .env("LC_ALL", "C")
            .output()
            .expect("cannot run tgtadm")
    }

    /// Runs `tgtadm --lld iscsi <args>` and requires success; returns stdout.
    ///
    /// # Panics
    /// When it fails.
    pub fn tgtadm(&self, args: &[&str]) -> String {
        let out = self.tgtadm_output(args);
        assert!(
            out.status.success(),
            "tgtadm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates target `tid` named `iqn`, open to every initiator.
    pub fn add_target(&self, tid: u32, iqn: &str) {
        let tid = tid.to_string();
        self.tgtadm(&["--op", "new", "--mode", "target", "--tid", &tid, "-T", iqn]);
        self.tgtadm(&[
            "--op", "bind", "--mode", "target", "--tid", &tid, "-I", "ALL",
        ]);
    }

    /// Adds LUN `lun` to target `tid`, backed by a new sparse file of `size` bytes; returns
    /// the file.
    ///
    /// # Panics
    /// On I/O or tgtadm errors.
    pub fn add_lun(&self, tid: u32, lun: u32, size: u64) -> PathBuf {
        let luns = self.dir.path().join("luns");
        std::fs::create_dir_all(&luns).expect("mkdir luns");
        let file = luns.join(format!("t{tid}-lun{lun}.img"));
        File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        self.tgtadm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &tid.to_string(),
            "--lun",
            &lun.to_string(),
            "-b",
            &file.display().to_string(),
        ]);
        file
    }

    /// `tgtadm --op show --mode target`.
    #[must_use]
    pub fn show(&self) -> String {
        self.tgtadm(&["--op", "show", "--mode", "target"])
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        // qemu-storage-daemon exports of this target's LUNs that a failed test left behind
        // (they would retry the vanished target forever): the lock makes them ours.
        for pid in processes("qemu-storage-da", &format!("portal={PORTAL}")) {
            eprintln!("warning: killing leftover qemu-storage-daemon {pid}");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        if alive(pid) {
            let _ = self.tgtadm_output(&[
                "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline",
            ]);
            let _ = self.tgtadm_output(&["--op", "delete", "--mode", "system"]);
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if alive(pid) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}
