//! Mounting a container's rootfs and mount points below its root directory
//! (`/var/lib/lxc/<vmid>/rootfs`), as PVE's `mountpoint_mount` / `mount_all` do.
//!
//! Order: rootfs first, then the mount points sorted by their path inside the container, so a
//! parent (`/srv`) is mounted before a child (`/srv/data`). Unmounting goes in reverse.
//! Target directories are created (owned by the container's root) by walking the path
//! component by component without following symlinks: a symlink on the way is an error
//! ("symlink encountered at: …"), so a container cannot redirect a mount onto the host.
//!
//! Options per PVE: `mountoptions` (`discard lazytime noatime nodev noexec nosuid`; only
//! `nodev noexec nosuid` for read-only or snapshot mounts), `acl=1` → `acl`, `quota=1` on a
//! writable mount → `usrjquota=aquota.user,grpjquota=aquota.group,jqfmt=vfsv0`, `ro=1` →
//! `-o ro` (bind mounts are remounted read-only). Quota on bind-mounted directories is not
//! possible and only warned about, as in PVE.
//!
//! A failure part-way unmounts everything this call mounted and detaches its loop devices.

use std::path::{Path, PathBuf};

use vzkit_host::command::Runner;
use vzkit_host::mount::{self as hmount, MountSpec};
use vzkit_storage::manager::Storages;
use vzkit_storage::plugin::{StoragePlugin, VolumeAccess};

use crate::conf::mountpoint::{MountPoint, MountPointKind};
use crate::error::{Result, RuntimeError};

/// Mount options a user may set through `mountoptions`.
const NORMAL_OPTIONS: &[&str] = &[
    "discard", "lazytime", "noatime", "nodev", "noexec", "nosuid",
];
/// Those that remain for read-only and snapshot mounts.
const RO_OPTIONS: &[&str] = &["nodev", "noexec", "nosuid"];
/// The journaled quota options PVE passes for `quota=1`.
pub const QUOTA_OPTIONS: &str = "usrjquota=aquota.user,grpjquota=aquota.group,jqfmt=vfsv0";

/// The owner of directories created on the way to a mount target (the container's root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootOwner {
    /// Host uid of the container's root.
    pub uid: u32,
    /// Host gid of the container's root.
    pub gid: u32,
}

/// One mounted entry, for unmounting later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// Config key (`rootfs`, `mp0`).
    pub key: String,
    /// Host path it is mounted on.
    pub target: PathBuf,
}

/// The mount options (first `-o` group) for a mount point.
#[must_use]
pub fn mount_options(mp: &MountPoint, snapshot: bool) -> Vec<String> {
    let allowed = if mp.ro == Some(true) || snapshot {
        RO_OPTIONS
    } else {
        NORMAL_OPTIONS
    };
    let mut opts: Vec<String> = mp
        .mountoptions
        .iter()
        .filter(|o| allowed.contains(&o.as_str()))
        .cloned()
        .collect();
    if mp.acl == Some(true) {
        opts.push("acl".into());
    }
    opts
}

/// Whether quota options apply (`quota && !ro && !snapshot`).
#[must_use]
pub fn quota_active(mp: &MountPoint, snapshot: bool) -> bool {
    mp.quota == Some(true) && mp.ro != Some(true) && !snapshot
}

/// Creates (or walks) `rel` below `root` without following symlinks; returns the full path.
///
/// # Errors
/// "symlink encountered at: <path>" when a component is a symlink; I/O errors otherwise.
pub fn walk_tree_nofollow(root: &Path, rel: &str, owner: RootOwner) -> Result<PathBuf> {
    let mut cur = root.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if comp == ".." {
            return Err(RuntimeError::Invalid(format!(
                "illegal path component '..' in '{rel}'"
            )));
        }
        cur.push(comp);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let shown = cur.strip_prefix(root).unwrap_or(&cur);
                return Err(RuntimeError::Invalid(format!(
                    "symlink encountered at: ./{}",
                    shown.display()
                )));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(RuntimeError::Invalid(format!(
                    "mount target '{}' is not a directory",
                    cur.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&cur).map_err(|e| RuntimeError::io("mkdir", &cur, e))?;
                std::os::unix::fs::lchown(&cur, Some(owner.uid), Some(owner.gid))
                    .map_err(|e| RuntimeError::io("chown", &cur, e))?;
            }
            Err(e) => return Err(RuntimeError::io("stat", &cur, e)),
        }
    }
    Ok(cur)
}

/// Mounts one mount point at `root`/`mp.mp`. `snapshot` names a storage snapshot to mount
/// read-only instead of the live volume.
///
/// # Errors
/// Storage, command and path errors; nothing stays mounted on failure.
pub async fn mount_one(
    storages: &Storages,
    root: &Path,
    mp: &MountPoint,
    snapshot: Option<&str>,
    owner: RootOwner,
    warn: &mut dyn FnMut(String),
) -> Result<PathBuf> {
    let runner = storages.runner();
    let runner: &dyn Runner = runner.as_ref();
    let target = walk_tree_nofollow(root, &mp.mp, owner)?;
    let is_snap = snapshot.is_some();
    let mut spec = MountSpec {
        options: mount_options(mp, is_snap),
        read_only: mp.ro == Some(true) || is_snap,
        ..MountSpec::default()
    };
    let quota = quota_active(mp, is_snap);
    match mp.kind() {
        MountPointKind::Bind => {
            let src = Path::new(&mp.volume);
            if !src.is_dir() {
                return Err(RuntimeError::Invalid(format!(
                    "directory '{}' does not exist",
                    src.display()
                )));
            }
            if quota {
                warn("cannot enable quota control for bind mounts".into());
            }
            spec.bind = true;
            hmount::mount(runner, src, &target, &spec).await?;
        }
        MountPointKind::Device => {
            if quota {
                spec.extra_options.push(QUOTA_OPTIONS.into());
            }
            hmount::mount(runner, Path::new(&mp.volume), &target, &spec).await?;
        }
        MountPointKind::Volume => {
            let (plugin, volname) = storages.resolve(&mp.volume)?;
            if !plugin.container_mountable() {
                return Err(RuntimeError::Invalid(format!(
                    "storage '{}' does not support containers",
                    plugin.id()
                )));
            }
            plugin.activate_storage().await?;
            plugin.activate_volume(&volname, snapshot).await?;
            let res = mount_volume(
                runner,
                plugin.as_ref(),
                &volname,
                snapshot,
                mp,
                spec,
                quota,
                &target,
                warn,
            )
            .await;
            if let Err(e) = res {
                if let Err(undo) = plugin.deactivate_volume(&volname, snapshot).await {
                    warn(format!("unable to deactivate '{}': {undo}", mp.volume));
                }
                return Err(e);
            }
        }
    }
    Ok(target)
}

/// Mounts an activated storage volume on `target`, by how the backend exposes it.
#[allow(clippy::too_many_arguments)]
async fn mount_volume(
    runner: &dyn Runner,
    plugin: &dyn StoragePlugin,
    volname: &str,
    snapshot: Option<&str>,
    mp: &MountPoint,
    mut spec: MountSpec,
    quota: bool,
    target: &Path,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let is_snap = snapshot.is_some();
    match plugin.access(volname, snapshot).await? {
        VolumeAccess::Directory(src) => {
            // zfs keeps ACL support as a dataset property (`acltype`).
            if let Some(acl) = mp.acl {
                plugin.set_volume_acl(volname, snapshot, acl).await?;
            }
            if quota {
                warn("cannot enable quota control for bind mounted subvolumes".into());
            }
            spec.bind = true;
            hmount::mount(runner, &src, target, &spec).await?;
        }
        VolumeAccess::ImageFile(file) => {
            let parsed = plugin.parse_volname(volname)?;
            if parsed.is_base || is_snap {
                spec.options.insert(0, "noload".into());
                spec.read_only = true;
            } else if quota {
                spec.extra_options.push(QUOTA_OPTIONS.into());
            }
            let dev = hmount::loop_attach(runner, &file, spec.read_only).await?;
            if let Err(e) = hmount::mount(runner, &dev, target, &spec).await {
                if let Err(undo) = hmount::loop_detach(runner, &dev).await {
                    warn(format!("unable to detach '{}': {undo}", dev.display()));
                }
                return Err(e.into());
            }
        }
        VolumeAccess::BlockDevice(dev) => {
            if quota && !is_snap {
                spec.extra_options.push(QUOTA_OPTIONS.into());
            }
            if is_snap {
                spec.options.insert(0, "noload".into());
            }
            hmount::mount(runner, &dev, target, &spec).await?;
        }
    }
    Ok(())
}

/// The mount points of a container in mount order: rootfs first, then by path.
#[must_use]
pub fn mount_order(mps: &[(String, MountPoint)]) -> Vec<(String, MountPoint)> {
    let mut list: Vec<(String, MountPoint)> = mps.to_vec();
    list.sort_by(|(ka, a), (kb, b)| {
        let ra = ka != "rootfs";
        let rb = kb != "rootfs";
        ra.cmp(&rb)
            .then_with(|| a.mp.cmp(&b.mp))
            .then_with(|| ka.cmp(kb))
    });
    list
}

/// Mounts all `mps` below `root` in mount order. On failure, unmounts what it mounted.
///
/// # Errors
/// The first failure, after cleanup.
pub async fn mount_all(
    storages: &Storages,
    root: &Path,
    mps: &[(String, MountPoint)],
    owner: RootOwner,
    warn: &mut dyn FnMut(String),
) -> Result<Vec<Mounted>> {
    std::fs::create_dir_all(root).map_err(|e| RuntimeError::io("mkdir", root, e))?;
    let mut done: Vec<Mounted> = Vec::new();
    for (key, mp) in mount_order(mps) {
        match mount_one(storages, root, &mp, None, owner, warn).await {
            Ok(target) => done.push(Mounted { key, target }),
            Err(e) => {
                let runner = storages.runner();
                for m in done.iter().rev() {
                    if let Err(undo) = hmount::umount(runner.as_ref(), &m.target, false).await {
                        warn(format!(
                            "unable to unmount '{}': {undo}",
                            m.target.display()
                        ));
                    }
                }
                deactivate_volumes(storages, mps, None, warn).await;
                return Err(RuntimeError::Failed(format!("mounting {key} failed: {e}")));
            }
        }
    }
    Ok(done)
}

/// Releases what `activate_volume` set up for the storage volumes among `mps` (at
/// `snapshot`), after they were unmounted, as PVE's `deactivate_volumes`: backends that
/// keep something running per active volume (rbd's userspace exports) stop it. Failures are
/// warnings.
pub async fn deactivate_volumes(
    storages: &Storages,
    mps: &[(String, MountPoint)],
    snapshot: Option<&str>,
    warn: &mut dyn FnMut(String),
) {
    for (_, mp) in mps {
        if mp.kind() != MountPointKind::Volume {
            continue;
        }
        let res = match storages.resolve(&mp.volume) {
            Ok((plugin, volname)) => plugin
                .deactivate_volume(&volname, snapshot)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = res {
            warn(format!("unable to deactivate volume '{}': {e}", mp.volume));
        }
    }
}

/// Unmounts everything mounted at or below `root`, deepest first (`umount -d`, except for
/// the devices in `keep_attached`: device mount points whose loop device the user attached).
///
/// # Errors
/// The first unmount failure (the others are still attempted).
pub async fn umount_all(
    runner: &dyn Runner,
    root: &Path,
    keep_attached: &[String],
) -> Result<usize> {
    let mounts =
        hmount::mounts_below(root).map_err(|e| RuntimeError::io("read mounts", root, e))?;
    let mut first_err = None;
    for m in &mounts {
        let detach = !keep_attached.contains(&m.source);
        if let Err(e) = hmount::umount_with(runner, &m.mount_point, false, detach).await {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e.into()),
        None => Ok(mounts.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(vol: &str, path: &str) -> MountPoint {
        MountPoint::new(vol, path)
    }

    #[test]
    fn rootfs_first_then_parents_before_children() {
        let list = vec![
            ("mp1".to_string(), mp("local:1/b.raw", "/srv/data")),
            ("mp0".to_string(), mp("local:1/a.raw", "/srv")),
            ("rootfs".to_string(), mp("local:1/r.raw", "/")),
        ];
        let keys: Vec<String> = mount_order(&list).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["rootfs", "mp0", "mp1"]);
    }

    #[test]
    fn options_follow_pve_filtering() {
        let mut m = mp("local:1/a.raw", "/a");
        m.mountoptions = vec!["noatime".into(), "nodev".into(), "discard".into()];
        m.acl = Some(true);
        assert_eq!(
            mount_options(&m, false),
            ["noatime", "nodev", "discard", "acl"]
        );
        m.ro = Some(true);
        assert_eq!(mount_options(&m, false), ["nodev", "acl"]);
        m.ro = None;
        assert_eq!(mount_options(&m, true), ["nodev", "acl"]);
        m.quota = Some(true);
        assert!(quota_active(&m, false));
        assert!(!quota_active(&m, true));
    }

    #[test]
    fn walk_refuses_symlinks_and_creates_owned_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        let err = walk_tree_nofollow(root, "/evil/x", RootOwner::default()).unwrap_err();
        assert_eq!(err.to_string(), "symlink encountered at: ./evil");
        assert!(!Path::new("/etc/x").exists());
        let p = walk_tree_nofollow(
            root,
            "/a/b",
            RootOwner {
                uid: 1234,
                gid: 4321,
            },
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 4321));
        assert!(walk_tree_nofollow(root, "/a/../../x", RootOwner::default()).is_err());
    }
}
