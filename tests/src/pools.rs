//! Real storage pools for tests: [`ZfsPool`] (the zfs-fuse daemon, started here and stopped
//! by its PID, with a pool on a sparse file) and [`BtrfsFs`] (a loop-mounted btrfs image).
//!
//! zfs-fuse serves every `zfs`/`zpool` command of the host through one socket, so tests that
//! use it are serialised by an exclusive `flock` on [`LOCK_FILE`], held for the guard's
//! lifetime (across threads and test processes). A zfs-fuse daemon that is already running
//! and was not started here is used as it is and left running. Dropping the guard destroys
//! the pool, stops the daemon it started (SIGTERM, then waits for the PID to exit) and removes
//! the scratch directory, also when the test failed.
//!
//! Drop order matters: anything bind-mounted from a pool (a [`crate::TestRoot`] with
//! mounted containers) must be dropped before the pool, so declare the pool first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The lock file serialising users of the host's zfs-fuse daemon.
pub const LOCK_FILE: &str = "/run/lock/vzkit-tests-zfs-fuse.lock";
/// Default size of the pool's backing file.
pub const POOL_FILE_SIZE: u64 = 512 << 20;

static POOL_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running zfs-fuse with one scratch pool.
#[derive(Debug)]
pub struct ZfsPool {
    name: String,
    mountpoint: PathBuf,
    daemon_pid: Option<i32>,
    dir: Option<tempfile::TempDir>,
    _lock: File,
}

/// Runs `zfs`/`zpool` (or any program) and returns its output.
///
/// # Panics
/// When the program cannot be started.
#[must_use]
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command and requires success; returns stdout.
///
/// # Panics
/// When it fails.
pub fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ..." - the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A live zfs-fuse process not started by this module, if any.
fn running_daemon() -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "zfs-fuse")
                && alive(*pid)
        })
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "timeout waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl ZfsPool {
    /// Takes the zfs-fuse lock, starts the daemon (unless one runs already) and creates a
    /// fresh pool mounted below a scratch directory.
    ///
    /// # Panics
    /// When zfs-fuse is not installed or the daemon or pool cannot be set up (after cleaning
    /// up what was set up).
    #[must_use]
    pub fn start() -> Self {
        Self::start_with_size(POOL_FILE_SIZE)
    }

    /// As [`ZfsPool::start`], with a pool file of `size` bytes (zfs needs at least 64 MiB).
    ///
    /// # Panics
    /// As [`ZfsPool::start`].
    #[must_use]
    pub fn start_with_size(size: u64) -> Self {
        let lock = crate::host_lock(LOCK_FILE);
        let dir = tempfile::Builder::new()
            .prefix("vzkit-zfs-")
            .tempdir()
            .expect("tempdir");
        let n = POOL_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("vzt{}x{n}", std::process::id());
        let mountpoint = dir.path().join("mnt");
        // From here on, Drop cleans up whatever was set up.
        let mut pool = Self {
            name,
            mountpoint,
            daemon_pid: None,
            dir: Some(dir),
            _lock: lock,
        };
        if running_daemon().is_none() {
            pool.start_daemon();
        }
        let file = pool.scratch().join("pool.img");
        File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("create pool file");
        let file = file.to_str().expect("utf-8 path").to_string();
        let mnt = pool.mountpoint.to_str().expect("utf-8 path").to_string();
        ok("zpool", &["create", "-f", "-m", &mnt, &pool.name, &file]);
        pool
    }

    fn start_daemon(&mut self) {
        let pidfile = self.scratch().join("zfs-fuse.pid");
        let pidfile_s = pidfile.to_str().expect("utf-8 path").to_string();
        ok("zfs-fuse", &["--pidfile", &pidfile_s, "--no-kstat-mount"]);
        wait_until("the zfs-fuse pid file", Duration::from_secs(10), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
        });
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        self.daemon_pid = Some(pid);
        wait_until("zfs-fuse to answer", Duration::from_secs(10), || {
            run("zpool", &["list"]).status.success()
        });
    }

    fn scratch(&self) -> &Path {
        self.dir.as_ref().expect("scratch dir").path()
    }

    /// The pool's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the pool's root dataset is mounted (children below it by name).
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A `storage.cfg` section for this pool with storage id `id`.
    #[must_use]
    pub fn storage_cfg(&self, id: &str) -> String {
        format!(
            "zfspool: {id}\n\tpool {}\n\tmountpoint {}\n\tcontent rootdir,images\n\n",
            self.name,
            self.mountpoint.display()
        )
    }

    /// Whether `dataset` (below the pool) is mounted by zfs-fuse at its mount point.
    #[must_use]
    pub fn is_mounted(&self, dataset: &str) -> bool {
        let source = format!("{}/{dataset}", self.name);
        std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 2 && f[0] == source && f[2] == "fuse.zfs"
            })
        })
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        // zfs-fuse calls a pool busy for a moment after its datasets were used.
        let mut out = run("zpool", &["destroy", "-f", &self.name]);
        for _ in 0..10 {
            if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("busy") {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            out = run("zpool", &["destroy", "-f", &self.name]);
        }
        if !out.status.success() {
            eprintln!(
                "warning: zpool destroy {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if let Some(pid) = self.daemon_pid {
            let Some(p) = rustix::process::Pid::from_raw(pid) else {
                return;
            };
            if let Err(e) = rustix::process::kill_process(p, rustix::process::Signal::TERM) {
                eprintln!("warning: cannot stop zfs-fuse (pid {pid}): {e}");
            }
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                eprintln!("warning: zfs-fuse (pid {pid}) still running after SIGTERM");
            }
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!("warning: cannot remove the zfs scratch directory: {e}");
        }
    }
}

/// A btrfs filesystem on a sparse image file, loop-mounted below a scratch directory.
/// Dropping it unmounts it (detaching the loop device) and removes the scratch directory.
#[derive(Debug)]
pub struct BtrfsFs {
    mountpoint: PathBuf,
    mounted: bool,
    dir: Option<tempfile::TempDir>,
}

impl BtrfsFs {
    /// Makes a `size`-byte btrfs image, mounts it, and enables quotas (qgroups) if `quotas`.
    ///
    /// # Panics
    /// When mkfs, mount or `btrfs quota enable` fail (after cleaning up).
    #[must_use]
    pub fn new(size: u64, quotas: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vzkit-btrfs-")
            .tempdir()
            .expect("tempdir");
        let image = dir.path().join("btrfs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mkdir");
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        let mut fs = Self {
            mountpoint,
            mounted: false,
            dir: Some(dir),
        };
        let image = image.to_str().expect("utf-8 path").to_string();
        let mnt = fs.mountpoint.to_str().expect("utf-8 path").to_string();
        ok("mkfs.btrfs", &["-q", &image]);
        ok("mount", &["-o", "loop", &image, &mnt]);
        fs.mounted = true;
        if quotas {
            ok("btrfs", &["quota", "enable", &mnt]);
        }
        fs
    }

    /// Where the filesystem is mounted.
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A `storage.cfg` section for a `btrfs` storage `id` at `<mountpoint>/<sub>`.
    #[must_use]
    pub fn storage_cfg(&self, id: &str, sub: &str) -> String {
        format!(
            "btrfs: {id}\n\tpath {}\n\tcontent rootdir,images,backup\n\n",
            self.mountpoint.join(sub).display()
        )
    }
}

impl Drop for BtrfsFs {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.mountpoint.to_str().unwrap_or_default().to_string();
            let out = run("umount", &["-d", &mnt]);
            if !out.status.success() {
                eprintln!(
                    "warning: umount {mnt} failed ({}); unmounting lazily",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                let _ = run("umount", &["-l", "-d", &mnt]);
            }
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!("warning: cannot remove the btrfs scratch directory: {e}");
        }
    }
}

/// Writes `len` bytes (a non-zero pattern, so no file system can store them as a hole) to a
/// new file at `path` and syncs it; returns the error of the first failing write, which is
/// how the tests see a quota or a full pool.
///
/// # Errors
/// The first write or sync error.
pub fn fill(path: &Path, len: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()
}
