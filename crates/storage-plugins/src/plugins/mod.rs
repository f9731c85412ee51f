//! One module per backend, and the factory that picks one for a `storage.cfg` section.
//!
//! | type | module | proven by |
//! |---|---|---|
//! | `dir` | [`dir`] | argument vectors; real files, loop devices and mounts |
//! | `zfspool` | [`zfspool`] | argument vectors; a real zfs-fuse pool (datasets only: zfs-fuse has no zvols) |
//! | `btrfs` | [`btrfs`] | argument vectors; a real loop-mounted btrfs with and without quotas |
//! | `dedup` | [`dedup`] | volume names; real stores in `tests/integration/dedup.rs` |
//! | `lvmthin` | [`lvmthin`] | argument vectors and captured `lvs`/`vgs` output in unit tests; real LVM-thin in the kernel VM tier (`tests/integration/vm_lvmthin.rs`) |
//! | `rbd` | [`rbd`] | argument vectors and captured `rbd` JSON in unit tests; a real single-node Ceph cluster on 127.0.0.1, images reached through kernel `rbd map` where the kernel has RBD, else a `qemu-storage-daemon` FUSE export plus a loop device (`tests/integration/rbd.rs`) |
//! | `iscsi` | [`iscsi`] | argument vectors and captured `iscsiadm`/`iscsi-ls`/`iscsi-inq`/`tgtadm` output and a sysfs tree in unit tests; a real tgt target on 127.0.0.1 through the userspace initiator (libiscsi, qemu-storage-daemon FUSE exports), managed LUNs through `tgtadm` (`tests/integration/iscsi.rs`); the kernel initiator (open-iscsi login, `/dev/sdX`) in the kernel VM tier (`tests/integration/vm_iscsi.rs`) |
//! | `iscsidirect` | [`iscsidirect`] | argument vectors; the same real tgt target (`tests/integration/iscsi.rs`) |

pub mod btrfs;
pub mod dedup;
pub mod dir;
pub mod iscsi;
pub mod iscsidirect;
pub mod lvmthin;
pub mod rbd;
pub mod zfspool;

use std::sync::Arc;

use vzkit_host::command::Runner;
use vzkit_host::paths::Layout;

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::StoragePlugin;

/// The backend for a `storage.cfg` section; `layout` places the state a backend keeps
/// below the vzkit root (the `rbd` exports' pid files).
///
/// # Errors
/// An error naming the type when vzkit has no backend for it, or when the section is
/// unusable (e.g. a `dir` without `path`).
pub fn plugin_for(
    section: &StorageSection,
    runner: Arc<dyn Runner>,
    layout: &Layout,
) -> Result<Arc<dyn StoragePlugin>> {
    match section.storage_type() {
        "dir" => Ok(Arc::new(dir::DirPlugin::new(section.clone(), runner)?)),
        "btrfs" => Ok(Arc::new(btrfs::BtrfsPlugin::new(section.clone(), runner)?)),
        "dedup" => Ok(Arc::new(dedup::DedupPlugin::new(section.clone())?)),
        "lvmthin" => Ok(Arc::new(lvmthin::LvmThinPlugin::new(
            section.clone(),
            runner,
        )?)),
        "zfspool" => Ok(Arc::new(zfspool::ZfsPoolPlugin::new(
            section.clone(),
            runner,
        )?)),
        "rbd" => Ok(Arc::new(rbd::RbdPlugin::new(
            section.clone(),
            runner,
            layout.clone(),
        )?)),
        "iscsi" => Ok(Arc::new(iscsi::IscsiPlugin::new(
            section.clone(),
            runner,
            layout,
        )?)),
        "iscsidirect" => Ok(Arc::new(iscsidirect::IscsiDirectPlugin::new(
            section.clone(),
            runner,
            layout,
        )?)),
        other => Err(StorageError::Unsupported(format!(
            "storage '{}': storage type '{other}' is not supported by this vzkit build",
            section.id()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use vzkit_host::command::RecordingRunner;

    #[test]
    fn factory_serves_each_built_type_and_names_the_others() {
        let (cfg, warnings) = StorageConfig::parse(
            "dir: d1\n\tpath /srv/d1\n\n\
             zfspool: z1\n\tpool tank/data\n\n\
             btrfs: b1\n\tpath /srv/b1\n\n\
             lvmthin: l1\n\tvgname pve\n\tthinpool data\n\n\
             iscsi: i1\n\tportal 127.0.0.1\n\ttarget iqn.2024-01.test:t1\n\n\
             iscsidirect: i2\n\tportal 127.0.0.1:3261\n\ttarget iqn.2024-01.test:t1\n\n\
             rbd: r1\n\tpool rbd\n\n\
             nfs: x1\n\tserver 10.0.0.9\n\texport /srv\n\tpath /mnt/pve/x1\n",
            "storage.cfg",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner: Arc<dyn Runner> = Arc::new(RecordingRunner::new());
        let layout = Layout::new("/tmp/vzkit-factory-test");
        for (id, ty) in [
            ("d1", "dir"),
            ("z1", "zfspool"),
            ("b1", "btrfs"),
            ("l1", "lvmthin"),
            ("r1", "rbd"),
            ("i1", "iscsi"),
            ("i2", "iscsidirect"),
        ] {
            let p = plugin_for(cfg.get(id).unwrap(), Arc::clone(&runner), &layout).unwrap();
            assert_eq!((p.id(), p.storage_type()), (id, ty));
        }
        let err = plugin_for(cfg.get("x1").unwrap(), runner, &layout).unwrap_err();
        assert_eq!(
            err.to_string(),
            "storage 'x1': storage type 'nfs' is not supported by this vzkit build"
        );
    }
}
