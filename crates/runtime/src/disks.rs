//! Allocating container volumes for `STORAGE:SIZE` mount points (PVE's `create_disks` /
//! `alloc_disk` / `format_disk`).
//!
//! Which kind of volume a storage gets: file storages (`dir`) get a raw image formatted with
//! ext4 for a size > 0 and a plain directory (`subvol`) for size 0; `zfspool` always gets a
//! dataset (`subvol`); block storages (`lvmthin`, `rbd`) get a raw volume formatted with ext4.
//! The filesystem is made with `mkfs.ext4 -O mmp -E root_owner=<uid>:<gid>`; subvol roots are
//! chowned to the container's root. Any failure frees every volume this call allocated.

use vzkit_storage::manager::Storages;
use vzkit_storage::plugin::VolumeAccess;

use crate::conf::mountpoint::{MountPoint, parse_new_disk};
use crate::error::{Result, RuntimeError};
use crate::mount::RootOwner;

/// The volume format a container volume of `size_kib` gets on a storage of `storage_type`.
#[must_use]
pub fn container_volume_format(storage_type: &str, has_path: bool, size_kib: u64) -> &'static str {
    match storage_type {
        "zfspool" => "subvol",
        "btrfs" if size_kib == 0 => "subvol",
        _ if has_path && size_kib == 0 => "subvol",
        _ => "raw",
    }
}

/// Allocates and prepares one container volume; returns its volume id.
///
/// # Errors
/// "content type 'rootdir' is not available or configured on storage 'S'", allocation and
/// mkfs errors (a volume whose formatting failed is freed again).
pub async fn alloc_disk(
    storages: &Storages,
    vmid: u32,
    storage: &str,
    size_kib: u64,
    owner: RootOwner,
) -> Result<String> {
    let section = storages.section(storage)?;
    if !section.content().iter().any(|c| c.as_str() == "rootdir") {
        return Err(RuntimeError::Invalid(format!(
            "content type 'rootdir' is not available or configured on storage '{storage}'"
        )));
    }
    let format =
        container_volume_format(section.storage_type(), section.path().is_some(), size_kib);
    let volid = storages
        .vdisk_alloc(storage, vmid, format, None, size_kib)
        .await?;
    if let Err(e) = prepare_disk(storages, &volid, owner).await {
        if let Err(undo) = storages.vdisk_free(&volid).await {
            return Err(RuntimeError::Failed(format!(
                "{e}; freeing '{volid}' again failed too: {undo}"
            )));
        }
        return Err(e);
    }
    Ok(volid)
}

/// Formats a raw volume with ext4, or chowns a directory volume's root.
async fn prepare_disk(storages: &Storages, volid: &str, owner: RootOwner) -> Result<()> {
    let (plugin, volname) = storages.resolve(volid)?;
    plugin.activate_volume(&volname, None).await?;
    let runner = storages.runner();
    match plugin.access(&volname, None).await? {
        VolumeAccess::Directory(dir) => {
            std::os::unix::fs::lchown(&dir, Some(owner.uid), Some(owner.gid))
                .map_err(|e| RuntimeError::io("chown", &dir, e))?;
        }
        VolumeAccess::ImageFile(path) | VolumeAccess::BlockDevice(path) => {
            let res =
                vzkit_host::mount::mkfs_ext4(runner.as_ref(), &path, owner.uid, owner.gid).await;
            // Backends that run something per active volume (iSCSI exports) stop it again.
            plugin.deactivate_volume(&volname, None).await?;
            res?;
        }
    }
    Ok(())
}

/// Allocates a volume for every mount point whose `volume` is `STORAGE:SIZE` (a bare number
/// means `default_storage:SIZE` when given), rewriting `volume` and `size`. Returns the volume
/// ids it created. On failure, frees them all and returns the error.
///
/// # Errors
/// Allocation errors, after cleanup.
pub async fn create_disks(
    storages: &Storages,
    vmid: u32,
    mps: &mut [(String, MountPoint)],
    default_storage: Option<&str>,
    owner: RootOwner,
) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for (key, mp) in mps.iter_mut() {
        let spec = if mp.volume.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && let Some(st) = default_storage
        {
            format!("{st}:{}", mp.volume)
        } else {
            mp.volume.clone()
        };
        let Some((storage, size_kib)) = parse_new_disk(&spec) else {
            continue;
        };
        match alloc_disk(storages, vmid, &storage, size_kib, owner).await {
            Ok(volid) => {
                mp.volume = volid.clone();
                mp.size = Some(size_kib * 1024);
                created.push(volid);
            }
            Err(e) => {
                let mut msgs = Vec::new();
                destroy_disks(storages, &created, &mut |m| msgs.push(m)).await;
                let extra = if msgs.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", msgs.join("; "))
                };
                return Err(RuntimeError::Failed(format!(
                    "unable to create volume for {key}: {e}{extra}"
                )));
            }
        }
    }
    Ok(created)
}

/// Frees `volids`, reporting (not failing on) each error through `warn`.
pub async fn destroy_disks(storages: &Storages, volids: &[String], warn: &mut dyn FnMut(String)) {
    for volid in volids.iter().rev() {
        if let Err(e) = storages.vdisk_free(volid).await {
            warn(format!("unable to free volume '{volid}': {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_formats_per_storage_type() {
        assert_eq!(container_volume_format("dir", true, 0), "subvol");
        assert_eq!(container_volume_format("dir", true, 1024), "raw");
        assert_eq!(container_volume_format("zfspool", false, 1024), "subvol");
        assert_eq!(container_volume_format("lvmthin", false, 0), "raw");
        assert_eq!(container_volume_format("rbd", false, 4096), "raw");
    }
}
