//! A throwaway single-node Ceph cluster for the rbd tests: one monitor and one OSD (memstore)
//! bound to 127.0.0.1, pool `rbd` with size 1, no manager, all state in a scratch directory.
//!
//! The monitor listens on the fixed port 3300 and the OSD on 6800 and up, so only one cluster
//! can run on the host at a time: [`CephCluster::start`] takes an exclusive `flock` on
//! [`LOCK_FILE`] and holds it until the guard is dropped. Dropping the guard (also when a
//! test panics) stops every daemon by the PID in its pid file, waits until it has exited,
//! and removes the scratch directory. Readiness is a write probe (creating and removing an
//! image), which needs no manager.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Serialises the clusters of all test processes on this host.
pub const LOCK_FILE: &str = "/run/lock/vzkit-tests-ceph.lock";
/// The monitor address.
pub const MON_ADDR: &str = "127.0.0.1:3300";

/// Authentication of the test cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `auth … required = none`.
    None,
    /// cephx, with a `client.admin` keyring.
    Cephx,
}

/// A running cluster; see the module documentation.
#[derive(Debug)]
pub struct CephCluster {
    dir: tempfile::TempDir,
    auth: Auth,
    /// How long the bootstrap took, up to a successful write probe.
    pub bootstrap: Duration,
    _lock: std::fs::File,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `pid` is a live (not zombie) process.
#[must_use]
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn uuid() -> String {
    ok(&mut Command::new("uuidgen")).trim().to_string()
}

impl CephCluster {
    /// Bootstraps a cluster with `auth`.
    ///
    /// # Panics
    /// When a step fails or the pool is not writable within 60 s (the daemons started so far
    /// are stopped by the guard's drop).
    #[must_use]
    pub fn start(auth: Auth) -> Self {
        let lock = crate::host_lock(LOCK_FILE);
        let dir = tempfile::Builder::new()
            .prefix("vzkit-ceph-")
            .tempdir()
            .expect("tempdir");
        let mut c = Self {
            dir,
            auth,
            bootstrap: Duration::ZERO,
            _lock: lock,
        };
        let t0 = Instant::now();
        c.bootstrap_cluster();
        c.bootstrap = t0.elapsed();
        eprintln!(
            "ceph: single-node cluster ({auth:?}) writable after {:.1} s",
            c.bootstrap.as_secs_f64()
        );
        c
    }

    /// The scratch directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's ceph.conf.
    #[must_use]
    pub fn conf(&self) -> PathBuf {
        self.dir().join("ceph.conf")
    }

    /// The `client.admin` keyring (cephx only).
    #[must_use]
    pub fn keyring(&self) -> Option<PathBuf> {
        (self.auth == Auth::Cephx).then(|| self.dir().join("keyring"))
    }

    fn auth_str(&self) -> &'static str {
        match self.auth {
            Auth::None => "none",
            Auth::Cephx => "cephx",
        }
    }

    /// A `ceph` command against this cluster.
    #[must_use]
    pub fn ceph(&self) -> Command {
        let mut c = Command::new("ceph");
        c.arg("-c").arg(self.conf());
        c
    }

    /// An `rbd` command against this cluster.
    #[must_use]
    pub fn rbd(&self) -> Command {
        let mut c = Command::new("rbd");
        c.arg("-c").arg(self.conf());
        c
    }

    /// Runs `rbd <args>` and returns stdout.
    ///
    /// # Panics
    /// When it fails.
    pub fn rbd_ok(&self, args: &[&str]) -> String {
        ok(self.rbd().args(args))
    }

    fn bootstrap_cluster(&mut self) {
        let d = self.dir().to_path_buf();
        let ds = d.display().to_string();
        for sub in ["mon/ceph-a", "osd/ceph-0", "run", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let fsid = uuid();
        let auth = self.auth_str();
        let conf = format!(
            "[global]\nfsid = {fsid}\nmon host = v2:{MON_ADDR}/0\nmon initial members = a\n\
             public addr = 127.0.0.1\ncluster addr = 127.0.0.1\nms bind ipv6 = false\n\
             ms bind msgr1 = false\nauth cluster required = {auth}\n\
             auth service required = {auth}\nauth client required = {auth}\n\
             auth allow insecure global id reclaim = false\nosd pool default size = 1\n\
             osd pool default min size = 1\nosd pool default pg num = 8\n\
             osd pool default pgp num = 8\nosd crush chooseleaf type = 0\n\
             mon allow pool size one = true\nmon allow pool delete = true\n\
             mon warn on pool no redundancy = false\nmon data avail warn = 1\n\
             mon data avail crit = 0\nrun dir = {ds}/run\n\
             pid file = {ds}/run/$cluster-$name.pid\nlog file = {ds}/log/$cluster-$name.log\n\
             log to stderr = false\nerr to stderr = true\nmon data = {ds}/mon/$cluster-$id\n\
             osd data = {ds}/osd/$cluster-$id\n\
             [mon]\nadmin socket = {ds}/run/$cluster-$name.asok\n\
             keyring = {ds}/mon/$cluster-$id/keyring\n\
             [osd]\nadmin socket = {ds}/run/$cluster-$name.asok\n\
             keyring = {ds}/osd/$cluster-$id/keyring\nosd objectstore = memstore\n\
             memstore device bytes = 2147483648\nosd memory target = 1073741824\n\
             [client]\nkeyring = {ds}/keyring\nadmin socket = {ds}/run/$cluster-$name.$pid.asok\n"
        );
        std::fs::write(self.conf(), conf).unwrap();
        let monmap = d.join("monmap");
        ok(Command::new("monmaptool")
            .args(["--create", "--clobber", "--fsid", &fsid, "--addv", "a"])
            .arg(format!("[v2:{MON_ADDR}/0]"))
            .arg(&monmap));
        let mut mkfs = Command::new("ceph-mon");
        mkfs.arg("-c")
            .arg(self.conf())
            .args(["--mkfs", "-i", "a", "--monmap"])
            .arg(&monmap);
        if self.auth == Auth::Cephx {
            let monkr = d.join("mon.keyring");
            let kr = d.join("keyring");
            ok(Command::new("ceph-authtool")
                .arg("--create-keyring")
                .arg(&monkr)
                .args(["--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]));
            ok(Command::new("ceph-authtool")
                .arg("--create-keyring")
                .arg(&kr)
                .args(["--gen-key", "-n", "client.admin"])
                .args(["--cap", "mon", "allow *", "--cap", "osd", "allow *"])
                .args(["--cap", "mds", "allow *", "--cap", "mgr", "allow *"]));
            ok(Command::new("ceph-authtool")
                .arg(&monkr)
                .arg("--import-keyring")
                .arg(&kr));
            mkfs.arg("--keyring").arg(&monkr);
        }
        ok(&mut mkfs);
        ok(Command::new("ceph-mon")
            .arg("-c")
            .arg(self.conf())
            .args(["-i", "a"]));
        let osd_uuid = uuid();
        let id = if self.auth == Auth::Cephx {
            let key = ok(Command::new("ceph-authtool").arg("--gen-print-key"))
                .trim()
                .to_string();
            let secret = format!("{{\"cephx_secret\": \"{key}\"}}");
            let secret_file = d.join("osd-secret.json");
            std::fs::write(&secret_file, secret).unwrap();
            let id = ok(self
                .ceph()
                .args(["osd", "new", &osd_uuid, "-i"])
                .arg(&secret_file))
            .trim()
            .to_string();
            ok(Command::new("ceph-authtool")
                .arg("--create-keyring")
                .arg(d.join(format!("osd/ceph-{id}/keyring")))
                .arg("--name")
                .arg(format!("osd.{id}"))
                .args(["--add-key", &key]));
            id
        } else {
            ok(self.ceph().args(["osd", "new", &osd_uuid]))
                .trim()
                .to_string()
        };
        ok(Command::new("ceph-osd").arg("-c").arg(self.conf()).args([
            "-i",
            &id,
            "--mkfs",
            "--osd-uuid",
            &osd_uuid,
        ]));
        ok(Command::new("ceph-osd")
            .arg("-c")
            .arg(self.conf())
            .args(["-i", &id]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(self.ceph().args(["osd", "stat"])).contains("1 up") {
            assert!(Instant::now() < deadline, "osd did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        ok(self.ceph().args(["osd", "pool", "create", "rbd", "8", "8"]));
        ok(self.rbd().args(["pool", "init", "rbd"]));
        loop {
            let probe = run(self.rbd().args(["create", "--size", "1M", "rbd/.probe"]));
            if probe.status.success() {
                ok(self.rbd().args(["rm", "--no-progress", "rbd/.probe"]));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pool rbd not writable: {}",
                String::from_utf8_lossy(&probe.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The PIDs of the running daemons (from their pid files).
    #[must_use]
    pub fn daemon_pids(&self) -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir(self.dir().join("run")) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| t.trim().parse().ok())
            .collect()
    }

    /// A `storage.cfg` section `rbd: <id>` for this cluster (monhost on 127.0.0.1).
    #[must_use]
    pub fn storage_cfg(&self, id: &str) -> String {
        format!("rbd: {id}\n\tpool rbd\n\tmonhost {MON_ADDR}\n\tcontent rootdir,images\n")
    }

    /// Puts the cluster's ceph.conf (and keyring, with cephx) where vzkit looks for the
    /// connection settings of storage `id` below `root`.
    ///
    /// # Panics
    /// On I/O errors.
    pub fn install_client_files(&self, root: &Path, id: &str) {
        let dir = root.join("etc/pve/priv/ceph");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.conf(), dir.join(format!("{id}.conf"))).unwrap();
        if let Some(k) = self.keyring() {
            std::fs::copy(k, dir.join(format!("{id}.keyring"))).unwrap();
        }
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        let pids = self.daemon_pids();
        for &pid in &pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for &pid in &pids {
            while alive(pid) {
                if Instant::now() >= deadline {
                    if let Some(p) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Stops, when dropped, every `qemu-storage-daemon` export vzkit's rbd backend left running
/// below a root (`<root>/run/vzkit/rbd/<storage>/*.pid`), so that a failing test leaks no
/// daemon. A passing test has none left; the tests assert that separately.
#[derive(Debug)]
pub struct ExportReaper {
    root: PathBuf,
}

impl ExportReaper {
    /// A reaper for the exports below `root`.
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
}

impl Drop for ExportReaper {
    fn drop(&mut self) {
        let Ok(stores) = std::fs::read_dir(self.root.join("run/vzkit/rbd")) else {
            return;
        };
        let mut pids = Vec::new();
        for store in stores.flatten() {
            for e in std::fs::read_dir(store.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if e.file_name().to_string_lossy().ends_with(".pid")
                    && let Some(pid) = std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok())
                    && alive(pid)
                {
                    pids.push(pid);
                }
            }
        }
        for &pid in &pids {
            eprintln!("ExportReaper: stopping leftover qemu-storage-daemon {pid}");
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
        }
        // A daemon whose cluster is already gone can hang in closing the image.
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in pids {
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid)
                && let Some(p) = rustix::process::Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}
