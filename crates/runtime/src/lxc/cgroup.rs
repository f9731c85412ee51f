//! Reading a running container's cgroup v1 files.
//!
//! vzkit's LXC config uses PVE's layout (`lxc.cgroup.dir.container = lxc/<vmid>`), so the
//! limits live in `/sys/fs/cgroup/<controller>/lxc/<vmid>/` and the container's processes
//! in its `ns` child.

use std::path::{Path, PathBuf};

use crate::error::{Result, RuntimeError};

/// Where the cgroup v1 hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroups of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtCgroup {
    root: PathBuf,
    vmid: u32,
}

impl CtCgroup {
    /// The cgroups of `vmid` below the host's cgroup root.
    #[must_use]
    pub fn new(vmid: u32) -> Self {
        Self::with_root(CGROUP_ROOT, vmid)
    }

    /// The cgroups of `vmid` below `root` (tests use a directory tree).
    #[must_use]
    pub fn with_root(root: impl Into<PathBuf>, vmid: u32) -> Self {
        Self {
            root: root.into(),
            vmid,
        }
    }

    /// `<root>/<controller>/lxc/<vmid>`.
    #[must_use]
    pub fn path(&self, controller: &str) -> PathBuf {
        self.root
            .join(controller)
            .join("lxc")
            .join(self.vmid.to_string())
    }

    /// Reads one file of `controller`, trimmed.
    ///
    /// # Errors
    /// When the file cannot be read (the container is not running).
    pub fn read(&self, controller: &str, file: &str) -> Result<String> {
        let p = self.path(controller).join(file);
        std::fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .map_err(|e| RuntimeError::io("read", p, e))
    }

    /// Reads a number from one file of `controller`.
    ///
    /// # Errors
    /// When the file cannot be read or does not hold a number.
    pub fn read_u64(&self, controller: &str, file: &str) -> Result<u64> {
        let text = self.read(controller, file)?;
        text.parse().map_err(|_| {
            RuntimeError::Failed(format!(
                "unable to parse '{}' from {}",
                text,
                Path::new(controller).join(file).display()
            ))
        })
    }

    /// `memory.limit_in_bytes`.
    ///
    /// # Errors
    /// As [`CtCgroup::read_u64`].
    pub fn memory_limit(&self) -> Result<u64> {
        self.read_u64("memory", "memory.limit_in_bytes")
    }

    /// `memory.usage_in_bytes`.
    ///
    /// # Errors
    /// As [`CtCgroup::read_u64`].
    pub fn memory_usage(&self) -> Result<u64> {
        self.read_u64("memory", "memory.usage_in_bytes")
    }

    /// `memory.memsw.limit_in_bytes` (memory plus swap).
    ///
    /// # Errors
    /// As [`CtCgroup::read_u64`].
    pub fn memsw_limit(&self) -> Result<u64> {
        self.read_u64("memory", "memory.memsw.limit_in_bytes")
    }

    /// `cpuacct.usage`: CPU time used, in nanoseconds.
    ///
    /// # Errors
    /// As [`CtCgroup::read_u64`].
    pub fn cpu_time_ns(&self) -> Result<u64> {
        self.read_u64("cpuacct", "cpuacct.usage")
    }

    /// `freezer.state` (`THAWED`, `FREEZING`, `FROZEN`).
    ///
    /// # Errors
    /// As [`CtCgroup::read`].
    pub fn freezer_state(&self) -> Result<String> {
        self.read("freezer", "freezer.state")
    }

    /// `cpuset.cpus` as a list of CPU numbers.
    ///
    /// # Errors
    /// As [`CtCgroup::read`], or a list that does not parse.
    pub fn cpuset(&self) -> Result<Vec<u32>> {
        super::config::parse_cpuset(&self.read("cpuset", "cpuset.cpus")?)
    }
}

/// Removes the cgroups that an earlier run of container `vmid` left behind below `root`
/// (`lxc.monitor/<vmid>` and `lxc/<vmid>` in every hierarchy). LXC refuses to start when its
/// monitor cgroup exists ("Failed to create monitor cgroup"), which happens after a failed
/// start and, briefly, while the monitor of a just stopped container exits. Cgroups that
/// still hold processes are waited for up to `wait`.
///
/// # Errors
/// A cgroup that keeps its processes, or one that cannot be removed.
pub fn remove_stale(root: &Path, vmid: u32, wait: std::time::Duration) -> Result<()> {
    let Ok(hierarchies) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let mut dirs = Vec::new();
    for h in hierarchies.flatten() {
        for sub in ["lxc.monitor", "lxc"] {
            let d = h.path().join(sub).join(vmid.to_string());
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    let deadline = std::time::Instant::now() + wait;
    for d in dirs {
        remove_tree(&d, deadline)?;
    }
    Ok(())
}

fn remove_tree(dir: &Path, deadline: std::time::Instant) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| RuntimeError::io("read", dir, e))?;
    for e in rd {
        let e = e.map_err(|err| RuntimeError::io("read", dir, err))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path(), deadline)?;
        }
    }
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(RuntimeError::io("unable to remove stale cgroup", dir, e));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v1_files_below_the_pve_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cg = CtCgroup::with_root(dir.path(), 105);
        for (ctrl, file, text) in [
            ("memory", "memory.limit_in_bytes", "268435456\n"),
            ("freezer", "freezer.state", "FROZEN\n"),
            ("cpuset", "cpuset.cpus", "0-1,3\n"),
        ] {
            let p = dir.path().join(ctrl).join("lxc/105");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join(file), text).unwrap();
        }
        assert_eq!(cg.memory_limit().unwrap(), 268_435_456);
        assert_eq!(cg.freezer_state().unwrap(), "FROZEN");
        assert_eq!(cg.cpuset().unwrap(), [0, 1, 3]);
        assert!(cg.memory_usage().is_err());
    }

    #[test]
    fn stale_cgroups_of_one_container_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for d in [
            "memory/lxc.monitor/7/x",
            "cpu/lxc/7/ns",
            "cpu/lxc/70",
            "pids/lxc.monitor/8",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        remove_stale(dir.path(), 7, std::time::Duration::ZERO).unwrap();
        assert!(!dir.path().join("memory/lxc.monitor/7").exists());
        assert!(!dir.path().join("cpu/lxc/7").exists());
        assert!(dir.path().join("cpu/lxc/70").exists());
        assert!(dir.path().join("pids/lxc.monitor/8").exists());
    }
}
