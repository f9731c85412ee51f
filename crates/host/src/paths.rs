//! The relocatable path layout.
//!
//! Every well-known PVE path is resolved below a root directory taken from the environment
//! variable `VZKIT_ROOT` (default `/`). This lets a whole vzkit "host" live in a scratch
//! directory (the demo and the tests use that), while a real installation uses `/`.
//!
//! Paths written *inside* configuration files (e.g. a `path` in `storage.cfg`) are plain host
//! paths and are not re-rooted.

use std::path::{Path, PathBuf};

/// The environment variable naming the root directory.
pub const ROOT_ENV: &str = "VZKIT_ROOT";

/// Resolves PVE's well-known paths under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `root`.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The layout named by `VZKIT_ROOT`, or `/`.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var_os(ROOT_ENV) {
            Some(r) if !r.is_empty() => Self::new(r),
            _ => Self::new("/"),
        }
    }

    /// The root directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` (an absolute PVE path such as `/etc/pve/storage.cfg`) below the root.
    #[must_use]
    pub fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// `/etc/pve/storage.cfg`
    #[must_use]
    pub fn storage_cfg(&self) -> PathBuf {
        self.join("/etc/pve/storage.cfg")
    }

    /// `/etc/pve/lxc`, the directory of container configs.
    #[must_use]
    pub fn lxc_conf_dir(&self) -> PathBuf {
        self.join("/etc/pve/lxc")
    }

    /// `/etc/pve/lxc/<vmid>.conf`
    #[must_use]
    pub fn ct_conf(&self, vmid: u32) -> PathBuf {
        self.lxc_conf_dir().join(format!("{vmid}.conf"))
    }

    /// `/etc/pve/firewall/<vmid>.fw`
    #[must_use]
    pub fn ct_firewall(&self, vmid: u32) -> PathBuf {
        self.join(&format!("/etc/pve/firewall/{vmid}.fw"))
    }

    /// `/etc/vzdump.conf`
    #[must_use]
    pub fn vzdump_conf(&self) -> PathBuf {
        self.join("/etc/vzdump.conf")
    }

    /// `/var/lib/vz`, the path of the default `local` storage.
    #[must_use]
    pub fn default_local_path(&self) -> PathBuf {
        self.join("/var/lib/vz")
    }

    /// `/run/lock/lxc/pve-config-<vmid>.lock`, the per-container config lock.
    #[must_use]
    pub fn ct_lock(&self, vmid: u32) -> PathBuf {
        self.join(&format!("/run/lock/lxc/pve-config-{vmid}.lock"))
    }

    /// `/var/lock/pve-manager/pve-storage-<id>`, the per-storage lock.
    #[must_use]
    pub fn storage_lock(&self, storeid: &str) -> PathBuf {
        self.join(&format!("/var/lock/pve-manager/pve-storage-{storeid}"))
    }

    /// `/run/lock/pve-manager/pve-storage-cfg.lock`, the `storage.cfg` lock.
    #[must_use]
    pub fn storage_cfg_lock(&self) -> PathBuf {
        self.join("/run/lock/pve-manager/pve-storage-cfg.lock")
    }

    /// `/var/lib/lxc/<vmid>`
    #[must_use]
    pub fn ct_dir(&self, vmid: u32) -> PathBuf {
        self.join(&format!("/var/lib/lxc/{vmid}"))
    }

    /// `/var/lib/lxc/<vmid>/rootfs`, where `pct mount` and the runtime mount the container.
    #[must_use]
    pub fn ct_rootfs(&self, vmid: u32) -> PathBuf {
        self.ct_dir(vmid).join("rootfs")
    }

    /// `/mnt/vzsnap0`, where vzdump mounts snapshots.
    #[must_use]
    pub fn vzsnap(&self, n: u32) -> PathBuf {
        self.join(&format!("/mnt/vzsnap{n}"))
    }

    /// `/var/log/vzdump`, per-guest task logs.
    #[must_use]
    pub fn vzdump_log_dir(&self) -> PathBuf {
        self.join("/var/log/vzdump")
    }

    /// `/var/run/vzdump.lock`, the global vzdump lock.
    #[must_use]
    pub fn vzdump_lock(&self) -> PathBuf {
        self.join("/var/run/vzdump.lock")
    }

    /// `/var/log/pve/tasks`, the task log directory.
    #[must_use]
    pub fn task_log_dir(&self) -> PathBuf {
        self.join("/var/log/pve/tasks")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_under_the_root() {
        let l = Layout::new("/tmp/r");
        assert_eq!(l.storage_cfg(), Path::new("/tmp/r/etc/pve/storage.cfg"));
        assert_eq!(l.ct_conf(100), Path::new("/tmp/r/etc/pve/lxc/100.conf"));
        assert_eq!(l.ct_rootfs(100), Path::new("/tmp/r/var/lib/lxc/100/rootfs"));
        assert_eq!(
            l.ct_lock(7),
            Path::new("/tmp/r/run/lock/lxc/pve-config-7.lock")
        );
        assert_eq!(l.default_local_path(), Path::new("/tmp/r/var/lib/vz"));
        assert_eq!(
            Layout::new("/").vzdump_conf(),
            Path::new("/etc/vzdump.conf")
        );
    }
}
