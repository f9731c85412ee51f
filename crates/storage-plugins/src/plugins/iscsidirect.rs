//! The `iscsidirect` backend (PVE's `ISCSIDirectPlugin`, libiscsi semantics): the LUNs of one
//! target reached from user space, named `lun<N>`, with the path `iscsi://<portal>/<target>/<N>`.
//!
//! Listing is PVE's: `iscsi-ls -s iscsi://<portal>`, sizes from its rounded `(Size:…)` column
//! (value × unit), owner 0. The size of one volume comes from `iscsi-readcapacity16` as in
//! PVE. Everything else (allocation, freeing, snapshots, resizing, clones, templates) is
//! refused with PVE's messages; the only feature is a full copy of the current state.
//!
//! Beyond PVE (where iscsidirect volumes are for VMs only): a LUN can be a container mount
//! point. `activate_volume` exports it as a regular file through `qemu-storage-daemon`'s FUSE
//! export (as the userspace path of [`super::iscsi`]), the mount layer loop-attaches that
//! file, and `deactivate_volume` stops the daemon by PID. Existing LUNs are never formatted.

use std::path::PathBuf;
use std::sync::Arc;

use vzkit_host::command::Runner;
use vzkit_host::paths::Layout;

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::{FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeInfo};
use crate::plugins::iscsi::{
    FuseExports, ISCSI_FEATURES, Libiscsi, Portal, export_dir, initiator_name, msg, required,
};
use crate::volid::{ParsedVolname, VolumeType};

/// An `iscsidirect` storage.
#[derive(Debug)]
pub struct IscsiDirectPlugin {
    section: StorageSection,
    portal: Portal,
    target: String,
    libiscsi: Libiscsi,
    exports: FuseExports,
}

/// The LUN number of a volume name `lun<N>`.
///
/// # Errors
/// "unable to parse iscsi volume name 'X'".
pub fn parse_lun_volname(volname: &str) -> Result<u32> {
    volname
        .strip_prefix("lun")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            StorageError::Invalid(format!("unable to parse iscsi volume name '{volname}'"))
        })
}

impl IscsiDirectPlugin {
    /// An iscsidirect plugin for `section` (with `portal` and `target`).
    ///
    /// # Errors
    /// Missing or invalid options.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>, layout: &Layout) -> Result<Self> {
        let portal = Portal::parse(required(&section, "portal")?)?;
        let target = required(&section, "target")?.to_string();
        let exports = FuseExports::new(
            Arc::clone(&runner),
            export_dir(layout, section.id()),
            portal.clone(),
            target.clone(),
            initiator_name(layout),
        );
        Ok(Self {
            libiscsi: Libiscsi::new(runner, portal.clone(), target.clone()),
            section,
            portal,
            target,
            exports,
        })
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    /// The LUN of `volname`, which must be a disk of the target.
    async fn existing_lun(&self, volname: &str) -> Result<u32> {
        let lun = parse_lun_volname(volname)?;
        if self
            .libiscsi
            .disk_luns()
            .await?
            .iter()
            .any(|l| l.lun == lun)
        {
            Ok(lun)
        } else {
            Err(StorageError::NotFound(format!(
                "volume '{}' does not exist",
                self.volid(volname)
            )))
        }
    }
}

#[async_trait::async_trait]
impl StoragePlugin for IscsiDirectPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "iscsidirect"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        let lun = parse_lun_volname(volname)?;
        Ok(ParsedVolname {
            vtype: VolumeType::Images,
            name: lun.to_string(),
            vmid: None,
            basename: None,
            basevmid: None,
            is_base: false,
            format: "raw".into(),
        })
    }

    fn features(&self) -> FeatureTable {
        ISCSI_FEATURES
    }

    fn container_mountable(&self) -> bool {
        true
    }

    async fn activate_storage(&self) -> Result<()> {
        Ok(())
    }

    async fn status(&self) -> Result<StorageStatus> {
        Ok(StorageStatus {
            total: 0,
            avail: 0,
            used: 0,
            active: true,
        })
    }

    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        if snapname.is_some() {
            return Err(StorageError::Unsupported(
                "direct access to snapshots not implemented".into(),
            ));
        }
        let lun = parse_lun_volname(volname)?;
        Ok(PathBuf::from(self.portal.url(Some((&self.target, lun)))))
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        if snapname.is_some() {
            return Err(StorageError::Unsupported(
                "direct access to snapshots not implemented".into(),
            ));
        }
        Ok(VolumeAccess::ImageFile(
            self.exports.file(parse_lun_volname(volname)?),
        ))
    }

    async fn alloc_image(
        &self,
        _vmid: u32,
        _format: &str,
        _name: Option<&str>,
        _size_kib: u64,
    ) -> Result<String> {
        Err(StorageError::Unsupported(msg::ALLOC.into()))
    }

    async fn free_image(&self, _volname: &str) -> Result<()> {
        Err(StorageError::Unsupported(msg::FREE.into()))
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        if vmid.is_some_and(|v| v != 0) {
            return Ok(Vec::new());
        }
        Ok(self
            .libiscsi
            .disk_luns()
            .await?
            .into_iter()
            .filter_map(|l| {
                let mut info = VolumeInfo::new(
                    self.volid(&format!("lun{}", l.lun)),
                    "images",
                    "raw",
                    l.size?,
                );
                info.vmid = Some(0);
                Some(info)
            })
            .collect())
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        if snapname.is_some() {
            return Err(StorageError::Unsupported(
                "direct access to snapshots not implemented".into(),
            ));
        }
        let lun = self.existing_lun(volname).await?;
        self.exports.start(lun).await.map(drop)
    }

    async fn deactivate_volume(&self, volname: &str, _snapname: Option<&str>) -> Result<()> {
        self.exports.stop(parse_lun_volname(volname)?).await
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let lun = self.existing_lun(volname).await?;
        self.libiscsi.size(lun).await
    }

    async fn volume_resize(&self, _volname: &str, _size_bytes: u64) -> Result<()> {
        Err(StorageError::Unsupported(msg::RESIZE.into()))
    }

    async fn volume_snapshot(&self, _volname: &str, _snap: &str) -> Result<()> {
        Err(StorageError::Unsupported(msg::SNAPSHOT.into()))
    }

    async fn volume_rollback_is_possible(
        &self,
        _volname: &str,
        _snap: &str,
    ) -> Result<Vec<String>> {
        Err(StorageError::Unsupported(msg::ROLLBACK.into()))
    }

    async fn volume_snapshot_rollback(&self, _volname: &str, _snap: &str) -> Result<()> {
        Err(StorageError::Unsupported(msg::ROLLBACK.into()))
    }

    async fn volume_snapshot_delete(&self, _volname: &str, _snap: &str) -> Result<()> {
        Err(StorageError::Unsupported(msg::SNAPSHOT_DELETE.into()))
    }

    async fn clone_image(&self, _volname: &str, _vmid: u32, _snap: Option<&str>) -> Result<String> {
        Err(StorageError::Unsupported(msg::CLONE.into()))
    }

    async fn create_base(&self, _volname: &str) -> Result<String> {
        Err(StorageError::Unsupported(msg::CREATE_BASE.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::plugin::Feature;
    use vzkit_host::command::{Output, RecordingRunner};

    fn plugin() -> (IscsiDirectPlugin, Arc<RecordingRunner>) {
        let (cfg, warnings) = StorageConfig::parse(
            "iscsidirect: sand\n\tportal 127.0.0.1\n\ttarget iqn.2024-01.test.local:t1\n",
            "storage.cfg",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner = Arc::new(RecordingRunner::new());
        let p = IscsiDirectPlugin::new(
            cfg.get("sand").unwrap().clone(),
            runner.clone(),
            &Layout::new("/vz"),
        )
        .unwrap();
        (p, runner)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn lists_luns_as_pve_and_refuses_the_rest() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(
            "Target:iqn.2024-01.test.local:t1 Portal:127.0.0.1:3260,1\n\
             Lun:0    Type:STORAGE_ARRAY_CONTROLLER\n\
             Lun:1    Type:DIRECT_ACCESS (Size:63M)\n\
             Lun:4    Type:DIRECT_ACCESS (Size:2G)\n",
        ));
        let list = block_on(p.list_images(None)).unwrap();
        assert_eq!(r.call_lines(), ["/usr/bin/iscsi-ls -s iscsi://127.0.0.1"]);
        let rows: Vec<(&str, u64, Option<u32>)> = list
            .iter()
            .map(|v| (v.volid.as_str(), v.size, v.vmid))
            .collect();
        assert_eq!(
            rows,
            [
                ("sand:lun1", 63 << 20, Some(0)),
                ("sand:lun4", 2 << 30, Some(0))
            ]
        );
        assert!(block_on(p.list_images(Some(100))).unwrap().is_empty());
        assert_eq!(
            block_on(p.path("lun4", None)).unwrap(),
            PathBuf::from("iscsi://127.0.0.1/iqn.2024-01.test.local:t1/4")
        );
        assert_eq!(
            block_on(p.access("lun4", None)).unwrap(),
            VolumeAccess::ImageFile("/vz/run/vzkit/iscsi/sand/lun4.img".into())
        );
        assert_eq!(
            block_on(p.path("lun4", Some("s"))).unwrap_err().to_string(),
            "direct access to snapshots not implemented"
        );
        for bad in ["lun", "lunx", "0.0.1.x", "LUN1"] {
            assert_eq!(
                p.parse_volname(bad).unwrap_err().to_string(),
                format!("unable to parse iscsi volume name '{bad}'")
            );
        }
        assert_eq!(p.parse_volname("lun12").unwrap().name, "12");
        let msgs: Vec<String> = [
            block_on(p.alloc_image(100, "raw", None, 1024)).unwrap_err(),
            block_on(p.free_image("lun1")).unwrap_err(),
            block_on(p.volume_resize("lun1", 1)).unwrap_err(),
            block_on(p.volume_snapshot("lun1", "s")).unwrap_err(),
            block_on(p.clone_image("lun1", 1, None)).unwrap_err(),
            block_on(p.create_base("lun1")).unwrap_err(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            msgs,
            [
                "can't allocate space in iscsi storage",
                "can't free space in iscsi storage",
                "volume resize is not possible on iscsi device",
                "volume snapshot is not possible on iscsi device",
                "can't clone images in iscsi storage",
                "can't create base images in iscsi storage",
            ]
        );
        assert!(p.volume_has_feature(Feature::Copy, "lun1", None).unwrap());
        assert!(
            !p.volume_has_feature(Feature::Snapshot, "lun1", None)
                .unwrap()
        );
        let st = block_on(p.status()).unwrap();
        assert_eq!((st.total, st.active), (0, true));
    }
}
