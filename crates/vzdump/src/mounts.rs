//! Making the archived volumes visible for tar: each mount point mounted below a private
//! directory (`/mnt/vzsnap0` under the root, as PVE), read-only where possible, and unmounted
//! again in reverse order.
//!
//! Stop mode mounts the live volumes read-only (a backup does not write to the container;
//! PVE mounts them writable); if a read-only mount fails (an ext4 journal that needs
//! recovery cannot be replayed on a read-only device), it retries writable and warns. Snapshot
//! mode mounts `<volume>@vzdump`, always read-only. Mount points are nested below the rootfs
//! as in the container, so tar's `--one-file-system` walk of `./` stops at them; when the
//! mount point's directory does not exist in the (read-only) parent, it is mounted in a
//! directory of its own beside (`/mnt/vzsnap0.mp/<key>`) and archived from there under the
//! same member names — vzkit never creates directories in the container's volumes.

use std::path::{Path, PathBuf};

use vzkit_host::command::Runner;
use vzkit_host::mount as hmount;
use vzkit_runtime::mount::{RootOwner, mount_one};
use vzkit_storage::manager::Storages;

use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::log::TaskLog;
use crate::pipeline::ArchiveSource;
use crate::plan::Disk;

/// Whether `rel` exists below `root` as a directory, without following symlinks.
///
/// # Errors
/// "symlink encountered at: ./x" (as `walk_tree_nofollow`), or a non-directory on the way.
pub fn target_exists(root: &Path, rel: &str) -> Result<bool> {
    let mut cur = root.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if comp == ".." {
            return Err(Error::msg(format!(
                "illegal path component '..' in '{rel}'"
            )));
        }
        cur.push(comp);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let shown = cur.strip_prefix(root).unwrap_or(&cur);
                return Err(Error::msg(format!(
                    "symlink encountered at: ./{}",
                    shown.display()
                )));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::msg(format!(
                    "mount target '{}' is not a directory",
                    cur.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(Error::msg(format!(
                    "unable to stat '{}' - {e}",
                    cur.display()
                )));
            }
        }
    }
    Ok(true)
}

/// `mkpath` + "mount point 'X' not empty" / "is not a directory".
///
/// # Errors
/// As described.
pub fn prepare_mount_root(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)
        .map_err(|e| Error::msg(format!("unable to create '{}' - {e}", root.display())))?;
    if !root.is_dir() {
        return Err(Error::msg(format!(
            "mount point '{}' is not a directory",
            root.display()
        )));
    }
    let mut rd = std::fs::read_dir(root)
        .map_err(|e| Error::msg(format!("unable to read '{}' - {e}", root.display())))?;
    if rd.next().is_some() {
        return Err(Error::msg(format!(
            "mount point '{}' not empty",
            root.display()
        )));
    }
    Ok(())
}

/// Where the volumes of one task are mounted.
#[derive(Debug, Clone)]
pub struct MountRoots {
    /// The rootfs and nested mount points (`/mnt/vzsnap0`).
    pub root: PathBuf,
    /// Mount points without a directory in their parent (`/mnt/vzsnap0.mp`).
    pub side: PathBuf,
}

/// Mount `disks` (rootfs first) for archiving; returns the archive sources. Every mount target
/// is recorded in the journal before mounting, so an interrupted task can be cleaned up.
///
/// # Errors
/// The first mount that fails (what was mounted is in the journal; the caller unmounts).
pub async fn mount_disks(
    storages: &Storages,
    roots: &MountRoots,
    disks: &[Disk],
    snapshot: Option<&str>,
    owner: RootOwner,
    journal: &mut Journal,
    log: &TaskLog,
) -> Result<Vec<ArchiveSource>> {
    let mut sources = Vec::new();
    // rootfs first, then parents before children (PVE's mount order).
    let mut order: Vec<&Disk> = disks.iter().collect();
    order.sort_by(|a, b| {
        (a.key != "rootfs")
            .cmp(&(b.key != "rootfs"))
            .then_with(|| a.mp.mp.cmp(&b.mp.mp))
    });
    for disk in order {
        let nested = disk.key == "rootfs" || target_exists(&roots.root, &disk.mp.mp)?;
        let (root, mut mp) = if nested {
            (roots.root.clone(), disk.mp.clone())
        } else {
            let side = roots.side.join(&disk.key);
            std::fs::create_dir_all(&side)
                .map_err(|e| Error::msg(format!("unable to create '{}' - {e}", side.display())))?;
            journal.update(|s| s.mount_dirs.push(side.clone()))?;
            let mut mp = disk.mp.clone();
            mp.mp = "/".into();
            (side, mp)
        };
        let target = root.join(mp.mp.trim_start_matches('/'));
        journal.update(|s| s.mounts.push(target.clone()))?;
        let mut warn = |m: String| log.warn(m);
        let want_ro = mp.ro;
        mp.ro = Some(true);
        let res = mount_one(storages, &root, &mp, snapshot, owner, &mut warn).await;
        if let Err(e) = res {
            if snapshot.is_some() || want_ro == Some(true) {
                return Err(e.into());
            }
            log.warn(format!(
                "mounting {} read-only failed, mounting it writable - {e}",
                disk.key
            ));
            mp.ro = want_ro;
            mount_one(storages, &root, &mp, snapshot, owner, &mut warn).await?;
        }
        sources.push(ArchiveSource {
            dir: target,
            prefix: disk.member_prefix(),
        });
    }
    // Archive in foreach_mountpoint order (rootfs, mp0, mp1, ...), as PVE lists the sources.
    let mut ordered = Vec::new();
    for d in disks {
        if let Some(s) = sources.iter().find(|s| s.prefix == d.member_prefix()) {
            ordered.push(s.clone());
        }
    }
    Ok(ordered)
}

/// Unmount everything mounted at or below each of `targets` (deepest first), then remove
/// `dirs`. `umount -d` (detaching loop devices), falling back to `umount -l -d` as PVE
/// does. Failures are warnings: cleanup goes on.
pub async fn umount_targets(
    runner: &dyn Runner,
    targets: &[PathBuf],
    dirs: &[PathBuf],
    log: &TaskLog,
) {
    for t in targets.iter().rev() {
        let below = match hmount::mounts_below(t) {
            Ok(m) => m,
            Err(e) => {
                log.warn(format!("unable to read the mount table - {e}"));
                continue;
            }
        };
        for m in below {
            if hmount::umount(runner, &m.mount_point, false).await.is_err()
                && let Err(e) = hmount::umount(runner, &m.mount_point, true).await
            {
                log.warn(format!(
                    "unable to unmount '{}' - {e}",
                    m.mount_point.display()
                ));
            }
        }
    }
    for d in dirs.iter().rev() {
        if let Err(e) = std::fs::remove_dir(d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log.warn(format!("unable to remove '{}' - {e}", d.display()));
        }
    }
}

/// Bytes in use on the file systems of `sources` (the progress bar's estimate).
#[must_use]
pub fn used_bytes(sources: &[ArchiveSource]) -> u64 {
    sources
        .iter()
        .filter_map(|s| rustix::fs::statvfs(&s.dir).ok())
        .map(|st| st.f_blocks.saturating_sub(st.f_bfree) * st.f_frsize)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_roots() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("mnt/data")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("evil")).unwrap();
        std::fs::write(d.path().join("file"), b"").unwrap();
        assert!(target_exists(d.path(), "/mnt/data").unwrap());
        assert!(!target_exists(d.path(), "/mnt/other").unwrap());
        assert_eq!(
            target_exists(d.path(), "/evil/x").unwrap_err().to_string(),
            "symlink encountered at: ./evil"
        );
        assert!(target_exists(d.path(), "/file/x").is_err());
        let root = d.path().join("vzsnap0");
        prepare_mount_root(&root).unwrap();
        std::fs::write(root.join("x"), b"").unwrap();
        assert_eq!(
            prepare_mount_root(&root).unwrap_err().to_string(),
            format!("mount point '{}' not empty", root.display())
        );
    }
}
