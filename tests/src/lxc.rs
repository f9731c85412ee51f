//! Shared harness for tests that run real LXC containers: one container test at a time
//! (lxcfs, `/etc/subuid`, cgroup names `lxc/<vmid>` and bridge names are host-wide), lxcfs
//! for the duration of a test, and a busybox root filesystem.
//!
//! Every LXC test starts with [`session`]: the returned guard holds a process-wide mutex and
//! a host-wide flock (`/run/lock/vzkit-tests-lxc.lock`, so separate test processes take
//! turns too) and keeps lxcfs mounted until it is dropped. lxcfs is started only when none
//! runs, and then stopped by PID when the guard drops.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Where lxcfs is mounted (the path LXC's `lxcfs.mount.hook` expects).
pub const LXCFS_DIR: &str = "/var/lib/lxcfs";
const LOCK_FILE: &str = "/run/lock/vzkit-tests-lxc.lock";

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `cmd` with `sh -c` and returns its output.
///
/// # Panics
/// When `sh` cannot be run.
#[must_use]
pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("run sh")
}

/// Runs `cmd` with `sh -c`, panics with its stderr when it fails, returns its stdout.
///
/// # Panics
/// When the command fails.
pub fn must(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lxcfs_mounted() -> bool {
    sh(&format!("mountpoint -q {LXCFS_DIR}")).status.success()
}

/// One LXC test's hold on the host; see the module documentation.
#[derive(Debug)]
pub struct Session {
    lxcfs: Option<Child>,
    _flock: File,
    _serial: MutexGuard<'static, ()>,
}

/// Waits for the other LXC tests, then makes sure lxcfs runs.
///
/// # Panics
/// When the lock file cannot be taken or lxcfs does not come up within 10 s.
#[must_use]
pub fn session() -> Session {
    let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let flock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .expect("open the LXC test lock file");
    rustix::fs::flock(&flock, rustix::fs::FlockOperation::LockExclusive)
        .expect("lock the LXC test lock file");
    let mut session = Session {
        lxcfs: None,
        _flock: flock,
        _serial: serial,
    };
    if !lxcfs_mounted() {
        std::fs::create_dir_all(LXCFS_DIR).expect("create the lxcfs directory");
        let pidfile = std::env::temp_dir().join(format!("vzkit-lxcfs-{}.pid", std::process::id()));
        let child = Command::new("lxcfs")
            .arg("-f")
            .arg("-p")
            .arg(&pidfile)
            .arg(LXCFS_DIR)
            .spawn()
            .expect("start lxcfs");
        session.lxcfs = Some(child);
        let t = Instant::now();
        while !Path::new(LXCFS_DIR).join("proc/meminfo").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "lxcfs did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    session
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut child) = self.lxcfs.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if lxcfs_mounted() {
                let _ = sh(&format!("umount -l {LXCFS_DIR}"));
            }
        }
    }
}

/// Kills containers on drop (declare it after the `TestRoot`, so it drops first and the
/// root can then unmount the volumes).
#[derive(Debug)]
pub struct CtGuard {
    /// The lxcpath the containers live in.
    pub lxcpath: PathBuf,
    /// The containers to kill.
    pub vmids: Vec<u32>,
}

impl Drop for CtGuard {
    fn drop(&mut self) {
        for vmid in &self.vmids {
            // A frozen container cannot be killed: thaw it first.
            let _ = Command::new("lxc-unfreeze")
                .arg("-P")
                .arg(&self.lxcpath)
                .args(["-n", &vmid.to_string()])
                .output();
            let _ = Command::new("lxc-stop")
                .arg("-P")
                .arg(&self.lxcpath)
                .args(["-n", &vmid.to_string(), "--kill"])
                .output();
        }
    }
}

/// Makes sure `/etc/subuid` and `/etc/subgid` allow root the range 100000:65536 (what
/// unprivileged containers map to); restores the files on drop.
#[derive(Debug)]
pub struct SubIds {
    saved: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl SubIds {
    /// Adds the range where it is missing.
    ///
    /// # Panics
    /// When a file cannot be written.
    #[must_use]
    pub fn ensure() -> Self {
        let mut saved = Vec::new();
        for f in ["/etc/subuid", "/etc/subgid"] {
            let old = std::fs::read(f).ok();
            let text = String::from_utf8_lossy(old.as_deref().unwrap_or_default()).into_owned();
            if !text.lines().any(|l| l.trim() == "root:100000:65536") {
                let mut new = text.clone();
                if !new.is_empty() && !new.ends_with('\n') {
                    new.push('\n');
                }
                new.push_str("root:100000:65536\n");
                std::fs::write(f, new).unwrap();
                saved.push((PathBuf::from(f), old));
            }
        }
        Self { saved }
    }
}

impl Drop for SubIds {
    fn drop(&mut self) {
        for (f, old) in &self.saved {
            match old {
                Some(data) => {
                    let _ = std::fs::write(f, data);
                }
                None => {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
    }
}

/// Writes a minimal busybox system to `root`: busybox with all applet links, an inittab
/// running `/etc/init.d/rcS` (sets the hostname) and a long sleep, `passwd`/`group`, and
/// `/etc/alpine-release` so that guest setup treats it as Alpine. `/etc/hostname` holds
/// `<hostname>-old`, so a test can see guest setup replace it.
///
/// # Panics
/// When a file cannot be written or busybox cannot install its links.
pub fn populate_busybox(root: &Path, hostname: &str) {
    for d in [
        "bin",
        "sbin",
        "etc/init.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "run",
        "var/log",
        "usr/bin",
        "usr/sbin",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    must(&format!(
        "chroot '{}' /bin/busybox --install -s",
        root.display()
    ));
    std::fs::write(
        root.join("etc/inittab"),
        "::sysinit:/etc/init.d/rcS\n::respawn:/bin/sleep 1000000\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/init.d/rcS"),
        "#!/bin/sh\nhostname -F /etc/hostname\n",
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("etc/init.d/rcS"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("etc/alpine-release"), "3.19.0\n").unwrap();
    std::fs::write(root.join("etc/hostname"), format!("{hostname}-old\n")).unwrap();
}

/// A bridge in the host, removed on drop.
#[derive(Debug)]
pub struct Bridge(&'static str);

impl Bridge {
    /// Creates (or re-creates) the bridge `name`, up, without addresses.
    ///
    /// # Panics
    /// When `ip` fails.
    #[must_use]
    pub fn create(name: &'static str) -> Self {
        let _ = sh(&format!("ip link del {name}"));
        must(&format!(
            "ip link add {name} type bridge && ip link set {name} up"
        ));
        Self(name)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {}", self.0));
    }
}
