//! `pct` operations on container configs and volumes: `set`, `resize`, `mount`, `unmount`,
//! `unlock`, `list`, `config`.
//!
//! Every operation that changes a config holds the config flock for its whole duration,
//! refuses a container that carries a `lock:` ("CT is locked (…)"), validates everything
//! before changing anything, and on failure leaves the config as it was and frees volumes it
//! allocated.

use std::path::PathBuf;

use vzkit_host::command::{Cmd, Runner};
use vzkit_host::mount as hmount;
use vzkit_host::size::{format_size, parse_size};
use vzkit_storage::manager::Storages;
use vzkit_storage::plugin::{StoragePlugin, VolumeAccess};

use crate::conf::idmap::IdKind;
use crate::conf::mountpoint::{MountPointKind, parse_new_disk, parse_volume};
use crate::conf::pct_conf::is_volume_key;
use crate::conf::{CtConfig, Lock, MountPoint};
use crate::disks::{create_disks, destroy_disks};
use crate::error::{Result, RuntimeError};
use crate::mount::{RootOwner, deactivate_volumes, mount_all, umount_all};
use crate::store::CtStore;
use crate::usage::volume_users;

/// `e2fsck`, run before growing an unmounted ext4 filesystem.
pub const E2FSCK: &str = "e2fsck";

/// The host uid/gid of the container's root user (0:0, or mapped through the id map of an
/// unprivileged container).
///
/// # Errors
/// An id map that does not parse or does not map root.
pub fn root_owner(conf: &CtConfig) -> Result<RootOwner> {
    let map = conf.main.id_map()?;
    if map.is_empty() {
        return Ok(RootOwner::default());
    }
    let uid = map.map_to_host(IdKind::User, 0);
    let gid = map.map_to_host(IdKind::Group, 0);
    match (uid, gid) {
        (Some(u), Some(g)) => Ok(RootOwner {
            uid: u32::try_from(u)
                .map_err(|_| RuntimeError::Invalid(format!("uid {u} out of range")))?,
            gid: u32::try_from(g)
                .map_err(|_| RuntimeError::Invalid(format!("gid {g} out of range")))?,
        }),
        _ => Err(RuntimeError::Invalid(
            "the id map does not map the container's root".into(),
        )),
    }
}

/// Container operations over one host's configs and storages.
#[derive(Debug)]
pub struct Containers<'a> {
    store: CtStore,
    storages: &'a Storages,
}

impl<'a> Containers<'a> {
    /// Operations over the configs below the storages' layout.
    #[must_use]
    pub fn new(storages: &'a Storages) -> Self {
        Self {
            store: CtStore::new(storages.layout().clone()),
            storages,
        }
    }

    /// The config store.
    #[must_use]
    pub fn store(&self) -> &CtStore {
        &self.store
    }

    /// `pct set`: applies `changes` (key, value) and `delete`s. `STORAGE:SIZE` mount points
    /// get new volumes; a replaced or deleted volume mount point becomes `unusedN`.
    ///
    /// # Errors
    /// Lock, validation, allocation and write errors; nothing is changed then.
    pub async fn set(
        &self,
        vmid: u32,
        changes: &[(String, String)],
        delete: &[String],
        warn: &mut dyn FnMut(String),
    ) -> Result<()> {
        let _lock = self.store.lock(vmid)?;
        let conf = self.store.load(vmid)?;
        conf.check_lock()?;
        let mut new = conf.clone();
        for key in delete {
            if changes.iter().any(|(k, _)| k == key) {
                return Err(RuntimeError::Invalid(format!(
                    "cannot set and delete '{key}' at the same time"
                )));
            }
            if key == "rootfs" {
                return Err(RuntimeError::Invalid(
                    "unable to delete required option 'rootfs'".into(),
                ));
            }
            let Some(old) = new.delete(key) else { continue };
            if is_volume_key(key) {
                let mp = parse_volume(key, &old)?;
                if mp.kind() == MountPointKind::Volume {
                    new.add_unused_volume(&mp.volume)?;
                }
            }
        }
        let mut new_disks: Vec<(String, MountPoint)> = Vec::new();
        for (key, value) in changes {
            if !is_volume_key(key) {
                new.set(key, value)?;
                continue;
            }
            let mp = parse_volume(key, value)?;
            if mp.kind() == MountPointKind::Volume && parse_new_disk(&mp.volume).is_none() {
                self.check_volume_free(vmid, &conf, key, &mp.volume)?;
                self.storages.resolve(&mp.volume)?;
            }
            if let Some(old) = conf.get(key) {
                let old = parse_volume(key, old)?;
                if old.kind() == MountPointKind::Volume && old.volume != mp.volume {
                    new.add_unused_volume(&old.volume)?;
                }
            }
            new_disks.push((key.clone(), mp));
        }
        // Allocate in PVE's volume order (rootfs, mp0, mp1, ...), whatever the argument order.
        new_disks.sort_by_key(|(k, _)| volume_key_rank(k));
        let owner = root_owner(&new)?;
        let created = create_disks(self.storages, vmid, &mut new_disks, None, owner).await?;
        let res = (|| {
            for (key, mp) in &new_disks {
                new.set(key, &mp.print(key == "rootfs")?)?;
                if mp.kind() == MountPointKind::Volume {
                    // The volume is now attached: it is not unused any more.
                    let unused: Vec<String> = new
                        .main
                        .unused_volumes()
                        .into_iter()
                        .filter(|(_, v)| *v == mp.volume)
                        .map(|(k, _)| k)
                        .collect();
                    for k in unused {
                        new.delete(&k);
                    }
                }
            }
            self.store.write(vmid, &new)
        })();
        if let Err(e) = res {
            destroy_disks(self.storages, &created, warn).await;
            return Err(e);
        }
        Ok(())
    }

    fn check_volume_free(&self, vmid: u32, conf: &CtConfig, key: &str, volid: &str) -> Result<()> {
        for (k, mp) in conf.mountpoints()? {
            if k != key && mp.volume == volid {
                return Err(RuntimeError::Invalid(format!(
                    "volume '{volid}' is already used by {k} of CT {vmid}"
                )));
            }
        }
        for (other, where_) in volume_users(self.store.layout(), volid)? {
            if other != vmid {
                return Err(RuntimeError::Invalid(format!(
                    "volume '{volid}' is already in use by CT {other} ({where_})"
                )));
            }
        }
        Ok(())
    }

    /// `pct resize`: grows a volume mount point (`size` absolute or `+delta`) and its ext4
    /// filesystem, then records the new size.
    ///
    /// # Errors
    /// "unable to shrink disk size", locks, storage and command errors.
    pub async fn resize(&self, vmid: u32, disk: &str, size: &str) -> Result<u64> {
        let _lock = self.store.lock(vmid)?;
        let mut conf = self.store.load(vmid)?;
        conf.check_lock()?;
        if !is_volume_key(disk) {
            return Err(RuntimeError::Invalid(format!(
                "disk: invalid format - unknown disk '{disk}'"
            )));
        }
        let value = conf.get(disk).ok_or_else(|| {
            RuntimeError::Invalid(format!("unable to parse config option '{disk}'"))
        })?;
        let mut mp = parse_volume(disk, value)?;
        if mp.kind() != MountPointKind::Volume {
            return Err(RuntimeError::Invalid(format!(
                "cannot resize non-volume mount point '{disk}'"
            )));
        }
        let (grow, num) = match size.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, size),
        };
        let bytes = parse_size(num).map_err(|_| {
            RuntimeError::Invalid(format!(
                "size: value does not match the regex pattern ('{size}')"
            ))
        })?;
        let (plugin, volname) = self.storages.resolve(&mp.volume)?;
        plugin.activate_storage().await?;
        plugin.activate_volume(&volname, None).await?;
        let res = self
            .resize_active(plugin.as_ref(), &volname, grow, bytes)
            .await;
        // Backends that run something per active volume keep it while the volume is in use
        // (a mounted container) and stop it otherwise.
        if let Err(e) = plugin.deactivate_volume(&volname, None).await
            && res.is_ok()
        {
            return Err(e.into());
        }
        let (newsize, changed) = res?;
        if !changed {
            return Ok(newsize);
        }
        mp.size = Some(newsize);
        conf.set(disk, &mp.print(disk == "rootfs")?)?;
        self.store.write(vmid, &conf)?;
        Ok(newsize)
    }

    /// Grows an activated volume (and its ext4); returns the size and whether it changed.
    async fn resize_active(
        &self,
        plugin: &dyn StoragePlugin,
        volname: &str,
        grow: bool,
        bytes: u64,
    ) -> Result<(u64, bool)> {
        let current = plugin.volume_size_info(volname).await?;
        let mut newsize = if grow { current + bytes } else { bytes };
        newsize = newsize.div_ceil(1024) * 1024;
        if newsize < current {
            return Err(RuntimeError::Invalid("unable to shrink disk size".into()));
        }
        if newsize == current {
            return Ok((current, false));
        }
        plugin.volume_resize(volname, newsize).await?;
        // Re-activated, so that a backend exposing the volume through a helper (rbd's
        // userspace export) shows the new size; a no-op for the others.
        plugin.deactivate_volume(volname, None).await?;
        plugin.activate_volume(volname, None).await?;
        let runner = self.storages.runner();
        match plugin.access(volname, None).await? {
            VolumeAccess::ImageFile(path) | VolumeAccess::BlockDevice(path) => {
                grow_ext4(runner.as_ref(), &path).await?;
            }
            VolumeAccess::Directory(_) => {}
        }
        Ok((newsize, true))
    }

    /// `pct mount`: mounts rootfs and mount points below `/var/lib/lxc/<vmid>/rootfs` and
    /// sets `lock: mounted`. Returns the mount directory.
    ///
    /// # Errors
    /// Locks, mount errors (after unmounting what was mounted).
    pub async fn mount(&self, vmid: u32, warn: &mut dyn FnMut(String)) -> Result<PathBuf> {
        let _lock = self.store.lock(vmid)?;
        let mut conf = self.store.load(vmid)?;
        conf.check_lock()?;
        let root = self.store.layout().ct_rootfs(vmid);
        let mps = conf.mountpoints()?;
        if !mps.iter().any(|(k, _)| k == "rootfs") {
            return Err(RuntimeError::Invalid(format!("CT {vmid} has no rootfs")));
        }
        let owner = root_owner(&conf)?;
        mount_all(self.storages, &root, &mps, owner, warn).await?;
        conf.main.set_lock(Some(Lock::Mounted));
        if let Err(e) = self.store.write(vmid, &conf) {
            let runner = self.storages.runner();
            if let Err(undo) = umount_all(runner.as_ref(), &root, &device_sources(&mps)).await {
                warn(format!("unable to unmount again: {undo}"));
            } else {
                deactivate_volumes(self.storages, &mps, None, warn).await;
            }
            return Err(e);
        }
        Ok(root)
    }

    /// `pct unmount`: unmounts everything below the container's mount directory and removes
    /// `lock: mounted`.
    ///
    /// # Errors
    /// Unmount errors; "no lock found trying to remove 'mounted' lock" when it was not mounted
    /// through `pct mount`.
    pub async fn unmount(&self, vmid: u32) -> Result<()> {
        let _lock = self.store.lock(vmid)?;
        let mut conf = self.store.load(vmid)?;
        let root = self.store.layout().ct_rootfs(vmid);
        let runner = self.storages.runner();
        let mps = conf.mountpoints()?;
        let devices = device_sources(&mps);
        umount_all(runner.as_ref(), &root, &devices).await?;
        deactivate_volumes(self.storages, &mps, None, &mut |w| eprintln!("WARN: {w}")).await;
        match conf.get("lock") {
            Some("mounted") => {
                conf.main.set_lock(None);
                self.store.write(vmid, &conf)
            }
            Some(other) => Err(RuntimeError::Failed(format!(
                "found lock '{other}' trying to remove 'mounted' lock"
            ))),
            None => Err(RuntimeError::Failed(
                "no lock found trying to remove 'mounted' lock".into(),
            )),
        }
    }

    /// `pct unlock`: removes any lock.
    ///
    /// # Errors
    /// Lock/load/write errors.
    pub fn unlock(&self, vmid: u32) -> Result<()> {
        self.store.update(vmid, |conf| {
            conf.main.set_lock(None);
            Ok(())
        })
    }

    /// `pct list` rows: (vmid, status, lock, name). The status is PVE's `running` or
    /// `stopped`, as LXC reports it; `pct mount` shows as the `mounted` lock.
    ///
    /// # Errors
    /// When a config cannot be read or LXC cannot be asked for a container's state.
    pub async fn list(&self) -> Result<Vec<(u32, String, String, String)>> {
        let lxc = crate::lxc::Lxc::new(self.storages);
        let mut rows = Vec::new();
        for vmid in self.store.list()? {
            let conf = self.store.load(vmid)?;
            let status = lxc.state(vmid).await?.status();
            rows.push((
                vmid,
                status.to_string(),
                conf.get("lock").unwrap_or_default().to_string(),
                conf.get("hostname")
                    .map_or_else(|| format!("CT{vmid}"), str::to_string),
            ));
        }
        Ok(rows)
    }
}

/// The host devices of device mount points: they are unmounted without detaching a loop
/// device behind them, which vzkit did not attach.
fn device_sources(mps: &[(String, MountPoint)]) -> Vec<String> {
    mps.iter()
        .filter(|(_, mp)| mp.kind() == MountPointKind::Device)
        .map(|(_, mp)| mp.volume.clone())
        .collect()
}

/// Sort rank of a volume key: `rootfs` first, then `mpN` by number.
fn volume_key_rank(key: &str) -> u32 {
    key.strip_prefix("mp")
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(0, |n| n + 1)
}

/// Checks and grows an ext4 filesystem on an image file or block device that is not mounted.
async fn grow_ext4(runner: &dyn Runner, path: &std::path::Path) -> Result<()> {
    let out = runner
        .output(&Cmd::new(E2FSCK).args(["-f", "-y"]).arg(path))
        .await?;
    // e2fsck exit codes 0 (clean) and 1 (errors corrected) are fine.
    if !matches!(out.exit, vzkit_host::command::Exit::Code(0 | 1)) {
        return Err(RuntimeError::Failed(format!(
            "e2fsck of '{}' failed ({}): {}",
            path.display(),
            out.exit,
            out.stderr_str()
        )));
    }
    hmount::resize2fs(runner, path).await?;
    Ok(())
}

/// The text `pct config` prints: the current section, keys sorted, description first.
#[must_use]
pub fn config_text(conf: &CtConfig) -> String {
    let mut out = String::new();
    if let Some(d) = &conf.main.description {
        out.push_str(&format!("description: {}\n", d.trim_end_matches('\n')));
    }
    for (k, v) in &conf.main.options {
        out.push_str(&format!("{k}: {v}\n"));
    }
    for e in &conf.main.env {
        out.push_str(&format!("lxc.environment.runtime: {e}\n"));
    }
    for (k, v) in &conf.main.lxc {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out
}

/// Formats a mount point size for messages (`8G`).
#[must_use]
pub fn size_text(bytes: u64) -> String {
    format_size(bytes)
}
