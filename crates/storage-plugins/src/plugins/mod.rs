//! One module per backend, and the factory that picks one for a `storage.cfg` section.
//!
//! | type | module | proven by |
//! |---|---|---|
//! | `dir` | [`dir`] | argument vectors; real files, loop devices and mounts |
//! | `zfspool` | [`zfspool`] | argument vectors; a real zfs-fuse pool (datasets only: zfs-fuse has no zvols) |
//! | `btrfs` | [`btrfs`] | argument vectors; a real loop-mounted btrfs with and without quotas |
//! | `dedup` | [`dedup`] | volume names; real stores in `tests/integration/dedup.rs` |
//! | `lvmthin` | [`lvmthin`] | argument vectors and captured `lvs`/`vgs` output in unit tests; real LVM-thin in the kernel VM tier (`tests/integration/vm_lvmthin.rs`) |

pub mod btrfs;
pub mod dedup;
pub mod dir;
pub mod lvmthin;
pub mod zfspool;

use std::sync::Arc;

use vzkit_host::command::Runner;

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::StoragePlugin;

/// The backend for a `storage.cfg` section.
///
/// # Errors
/// An error naming the type when vzkit has no backend for it, or when the section is
/// unusable (e.g. a `dir` without `path`).
pub fn plugin_for(
    section: &StorageSection,
    runner: Arc<dyn Runner>,
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
             rbd: r1\n\tpool rbd\n",
            "storage.cfg",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner: Arc<dyn Runner> = Arc::new(RecordingRunner::new());
        for (id, ty) in [
            ("d1", "dir"),
            ("z1", "zfspool"),
            ("b1", "btrfs"),
            ("l1", "lvmthin"),
        ] {
            let p = plugin_for(cfg.get(id).unwrap(), Arc::clone(&runner)).unwrap();
            assert_eq!((p.id(), p.storage_type()), (id, ty));
        }
        let err = plugin_for(cfg.get("r1").unwrap(), runner).unwrap_err();
        assert_eq!(
            err.to_string(),
            "storage 'r1': storage type 'rbd' is not supported by this vzkit build"
        );
    }
}
