//! Support for vzkit's end-to-end tests: a scratch relocatable root, the built binaries, and
//! cleanup of every mount and loop device a test leaves behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod ceph;
pub mod debian;
pub mod lxc;
pub mod pools;
pub mod tgt;
pub mod vm;

/// Whether the tests run as root (loop devices and mounts need it).
#[must_use]
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The path of a workspace binary (`pct`, `pvesm`, `vzdump`) built next to the test binary.
///
/// # Panics
/// When the binary has not been built (`cargo build --workspace` first).
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found - build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A scratch `VZKIT_ROOT`. Dropping it unmounts everything below it and removes it.
#[derive(Debug)]
pub struct TestRoot {
    dir: tempfile::TempDir,
}

impl TestRoot {
    /// A fresh, empty root.
    ///
    /// # Panics
    /// When the temporary directory cannot be created.
    #[must_use]
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vzkit-test-")
            .tempdir()
            .expect("tempdir");
        Self { dir }
    }

    /// The root directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `rel` (an absolute PVE path) below the root.
    #[must_use]
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path().join(rel.trim_start_matches('/'))
    }

    /// Writes `text` to `rel` below the root, creating directories.
    ///
    /// # Panics
    /// On I/O errors.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
    }

    /// Reads `rel` below the root.
    ///
    /// # Panics
    /// On I/O errors.
    #[must_use]
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.join(rel)).expect("read")
    }

    /// Runs a vzkit binary with `VZKIT_ROOT` set to this root.
    ///
    /// # Panics
    /// When the binary cannot be started.
    #[must_use]
    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        Command::new(bin(name))
            .args(args)
            .env("VZKIT_ROOT", self.path())
            .env("TZ", "UTC")
            .output()
            .expect("run binary")
    }

    /// Runs a vzkit binary and requires success; returns stdout.
    ///
    /// # Panics
    /// When it fails (the panic shows stdout and stderr).
    pub fn ok(&self, name: &str, args: &[&str]) -> String {
        let out = self.run(name, args);
        assert!(
            out.status.success(),
            "{name} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a vzkit binary and requires failure; returns stderr.
    ///
    /// # Panics
    /// When it succeeds.
    #[must_use]
    pub fn fails(&self, name: &str, args: &[&str]) -> String {
        let out = self.run(name, args);
        assert!(
            !out.status.success(),
            "{name} {args:?} unexpectedly succeeded:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Mount points currently below this root, deepest first.
    #[must_use]
    pub fn mounts(&self) -> Vec<PathBuf> {
        let root = self
            .path()
            .canonicalize()
            .unwrap_or_else(|_| self.path().to_path_buf());
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut res: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(&root))
            .collect();
        res.reverse();
        res
    }

    /// Mounts the containers `vmids` in order with `pct mount`, runs `f`, and unmounts them in
    /// reverse order also when `f` panics (the panic then goes on).
    ///
    /// # Panics
    /// When a mount or unmount fails, or `f` panics.
    pub fn with_mounted<R>(&self, vmids: &[&str], f: impl FnOnce() -> R) -> R {
        for id in vmids {
            self.ok("pct", &["mount", id]);
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        for id in vmids.iter().rev() {
            self.ok("pct", &["unmount", id]);
        }
        res.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// `pct restore <vmid> <archive> --rootfs <rootfs> [--mp0 <mp0>]` (advanced mode); returns
    /// the restored container's configuration.
    ///
    /// # Panics
    /// When the restore fails.
    pub fn restore_onto(
        &self,
        vmid: u32,
        archive: &Path,
        rootfs: &str,
        mp0: Option<&str>,
    ) -> String {
        let id = vmid.to_string();
        let mut args = vec![
            "restore",
            &id,
            archive.to_str().expect("UTF-8 path"),
            "--rootfs",
            rootfs,
        ];
        if let Some(mp0) = mp0 {
            args.extend(["--mp0", mp0]);
        }
        self.ok("pct", &args);
        self.read(&format!("/etc/pve/lxc/{vmid}.conf"))
    }

    /// Every file below the root (relative paths, sorted), for "nothing changed" checks.
    #[must_use]
    pub fn snapshot_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap_or(&p).to_path_buf();
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    out.push((rel, Vec::new()));
                    walk(base, &p, out);
                } else if ft.is_file() {
                    let meta_len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    // Image files are large and sparse: compare their size, not content.
                    let content = if meta_len > 1 << 20 {
                        format!("<{meta_len} bytes>").into_bytes()
                    } else {
                        std::fs::read(&p).unwrap_or_default()
                    };
                    out.push((rel, content));
                } else {
                    out.push((rel, b"<special>".to_vec()));
                }
            }
        }
        let mut out = Vec::new();
        walk(self.path(), self.path(), &mut out);
        // Lock files come and go with every command; they are not state.
        out.retain(|(p, _)| !p.starts_with("run") && !p.starts_with("var/lock"));
        out.sort();
        out
    }
}

impl Default for TestRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        for m in self.mounts() {
            let status = Command::new("umount").arg("-d").arg(&m).status();
            if !status.is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").args(["-l", "-d"]).arg(&m).status();
                eprintln!(
                    "warning: test left {} mounted; unmounted lazily",
                    m.display()
                );
            }
        }
    }
}

/// The single `.tar.zst` archive in `dir`.
///
/// # Panics
/// When there is none or more than one.
#[must_use]
pub fn the_archive(dir: &Path) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the dump directory")
        .map(|e| e.expect("read the dump directory").path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.into_iter().next().expect("one archive")
}

/// Opens (creating it) the lock file `path` and takes an exclusive `flock` on it, waiting for
/// other holders (threads or test processes); the lock lasts as long as the returned file.
///
/// # Panics
/// When the file cannot be opened or locked.
#[must_use]
pub fn host_lock(path: &str) -> std::fs::File {
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .unwrap_or_else(|e| panic!("cannot lock {path}: {e}"));
    lock
}
