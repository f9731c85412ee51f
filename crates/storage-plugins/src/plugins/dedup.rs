//! The `dedup` backend: a deduplicating backup store (crate `vzkit-dedup`) in a directory.
//!
//! ```text
//! dedup: backups
//!         path /srv/backups
//!         content backup
//!         prune-backups keep-last=7
//! ```
//!
//! Backups are snapshots `ct/<vmid>/<RFC 3339 UTC time>/` of the store, listed as volumes
//! `<storage>:backup/ct/<vmid>/<time>` (format `dedup`, size = the size of the tar stream the
//! snapshot stands for). This module only reads the snapshot directories (`manifest.json`,
//! `notes`, `protected`); writing and reading snapshots is `vzkit-dedup`'s job, which builds
//! on this crate (prune marking), so the dependency cannot go the other way.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;

use crate::config::{ContentType, StorageSection};
use crate::error::{Result, StorageError};
use crate::plugin::{
    FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeAttribute, VolumeInfo,
};
use crate::volid::{ParsedVolname, VolumeType};

/// The volume format of store snapshots.
pub const FORMAT: &str = "dedup";

static VOLNAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^backup/(ct/([1-9][0-9]{2,8})/([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z))$",
    )
    .expect("static regex must compile")
});

/// Parse `backup/ct/<vmid>/<time>`: (snapshot name `ct/<vmid>/<time>`, vmid, ctime).
#[must_use]
pub fn parse_snapshot_volname(volname: &str) -> Option<(String, u32, i64)> {
    let c = VOLNAME_RE.captures(volname)?;
    let vmid = c[2].parse().ok()?;
    let ts: jiff::Timestamp = c[3].parse().ok()?;
    Some((c[1].to_string(), vmid, ts.as_second()))
}

/// A `dedup` storage.
#[derive(Debug)]
pub struct DedupPlugin {
    section: StorageSection,
    path: PathBuf,
}

impl DedupPlugin {
    /// A plugin for `section` (which must have a `path`).
    ///
    /// # Errors
    /// "storage definition has no path".
    pub fn new(section: StorageSection) -> Result<Self> {
        let path = section
            .path()
            .map(Path::to_path_buf)
            .ok_or_else(|| StorageError::Invalid("storage definition has no path".into()))?;
        Ok(Self { section, path })
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    fn snapshot_dir(&self, volname: &str) -> Result<PathBuf> {
        let (name, _, _) = parse_snapshot_volname(volname).ok_or_else(|| {
            StorageError::Invalid(format!("unable to parse dedup volume name '{volname}'"))
        })?;
        Ok(self.path.join(name))
    }

    fn list_backups(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        let ct = self.path.join("ct");
        let Ok(groups) = std::fs::read_dir(&ct) else {
            return Ok(res);
        };
        for g in groups.flatten() {
            let gname = g.file_name().to_string_lossy().into_owned();
            let Ok(owner) = gname.parse::<u32>() else {
                continue;
            };
            if vmid.is_some_and(|v| v != owner) {
                continue;
            }
            let Ok(snaps) = std::fs::read_dir(g.path()) else {
                continue;
            };
            for s in snaps.flatten() {
                let volname = format!("backup/ct/{gname}/{}", s.file_name().to_string_lossy());
                let Some((_, _, ctime)) = parse_snapshot_volname(&volname) else {
                    continue;
                };
                let dir = s.path();
                // Complete snapshots only: the manifest is written last.
                let Ok(manifest) = std::fs::read(dir.join("manifest.json")) else {
                    continue;
                };
                let size = serde_json::from_slice::<serde_json::Value>(&manifest)
                    .ok()
                    .and_then(|v| v["size"].as_u64())
                    .unwrap_or(0);
                let mut info = VolumeInfo::new(self.volid(&volname), "backup", FORMAT, size);
                info.ctime = Some(ctime);
                info.vmid = Some(owner);
                info.subtype = Some("lxc".into());
                if let Ok(text) = std::fs::read_to_string(dir.join("notes")) {
                    info.notes = text.lines().next().map(str::to_string);
                }
                info.protected = Some(dir.join("protected").exists());
                res.push(info);
            }
        }
        Ok(res)
    }

    fn attribute_path(&self, volname: &str, attr: VolumeAttribute) -> Result<PathBuf> {
        let dir = self.snapshot_dir(volname)?;
        if !dir.join("manifest.json").exists() {
            return Err(StorageError::NotFound(format!(
                "volume '{}' does not exist",
                self.volid(volname)
            )));
        }
        Ok(dir.join(match attr {
            VolumeAttribute::Notes => "notes",
            VolumeAttribute::Protected => "protected",
        }))
    }
}

fn unsupported(what: &str) -> StorageError {
    StorageError::Unsupported(format!("{what} is not supported on dedup backup storages"))
}

#[async_trait::async_trait]
impl StoragePlugin for DedupPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "dedup"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        let (name, vmid, _) = parse_snapshot_volname(volname).ok_or_else(|| {
            StorageError::Invalid(format!("unable to parse dedup volume name '{volname}'"))
        })?;
        Ok(ParsedVolname {
            vtype: VolumeType::Backup,
            name,
            vmid: Some(vmid),
            basename: None,
            basevmid: None,
            is_base: false,
            format: FORMAT.into(),
        })
    }

    fn features(&self) -> FeatureTable {
        FeatureTable(&[])
    }

    async fn activate_storage(&self) -> Result<()> {
        if !self.path.is_dir() {
            std::fs::create_dir_all(&self.path)
                .map_err(|e| StorageError::io("unable to create directory", &self.path, e))?;
        }
        Ok(())
    }

    async fn status(&self) -> Result<StorageStatus> {
        let st = rustix::fs::statvfs(&self.path)
            .map_err(|e| StorageError::io("unable to query filesystem", &self.path, e.into()))?;
        let total = st.f_blocks * st.f_frsize;
        Ok(StorageStatus {
            total,
            avail: st.f_bavail * st.f_frsize,
            used: total.saturating_sub(st.f_bfree * st.f_frsize),
            active: true,
        })
    }

    async fn path(&self, volname: &str, _snapname: Option<&str>) -> Result<PathBuf> {
        self.snapshot_dir(volname)
    }

    async fn access(&self, _volname: &str, _snapname: Option<&str>) -> Result<VolumeAccess> {
        Err(unsupported("guest volume access"))
    }

    async fn alloc_image(
        &self,
        _vmid: u32,
        _fmt: &str,
        _name: Option<&str>,
        _size_kib: u64,
    ) -> Result<String> {
        Err(unsupported("allocating images"))
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let dir = self.snapshot_dir(volname)?;
        if dir.join("protected").exists() {
            return Err(StorageError::Invalid(format!(
                "volume '{}' is protected",
                self.volid(volname)
            )));
        }
        let (_, vmid, _) = parse_snapshot_volname(volname).unwrap_or_default();
        let hidden = self.path.join("ct").join(vmid.to_string()).join(format!(
            ".del-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        std::fs::rename(&dir, &hidden)
            .map_err(|e| StorageError::io("unable to remove", &dir, e))?;
        std::fs::remove_dir_all(&hidden)
            .map_err(|e| StorageError::io("unable to remove", &hidden, e))
    }

    async fn list_images(&self, _vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        Ok(Vec::new())
    }

    async fn list_volumes(
        &self,
        vmid: Option<u32>,
        content: &[ContentType],
    ) -> Result<Vec<VolumeInfo>> {
        if content.contains(&ContentType::Backup) {
            self.list_backups(vmid)
        } else {
            Ok(Vec::new())
        }
    }

    async fn activate_volume(&self, volname: &str, _snapname: Option<&str>) -> Result<()> {
        self.attribute_path(volname, VolumeAttribute::Notes)
            .map(|_| ())
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let dir = self.snapshot_dir(volname)?;
        let m = std::fs::read(dir.join("manifest.json"))
            .map_err(|e| StorageError::io("unable to read", dir.join("manifest.json"), e))?;
        Ok(serde_json::from_slice::<serde_json::Value>(&m)
            .ok()
            .and_then(|v| v["size"].as_u64())
            .unwrap_or(0))
    }

    async fn volume_resize(&self, _volname: &str, _size_bytes: u64) -> Result<()> {
        Err(unsupported("resizing"))
    }

    async fn get_volume_attribute(
        &self,
        volname: &str,
        attr: VolumeAttribute,
    ) -> Result<Option<String>> {
        attr.read_file(&self.attribute_path(volname, attr)?)
    }

    async fn update_volume_attribute(
        &self,
        volname: &str,
        attr: VolumeAttribute,
        value: Option<&str>,
    ) -> Result<()> {
        attr.write_file(&self.attribute_path(volname, attr)?, value)
    }

    fn backup_dir(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volnames() {
        assert_eq!(
            parse_snapshot_volname("backup/ct/100/2026-11-28T15:14:09Z"),
            Some(("ct/100/2026-11-28T15:14:09Z".into(), 100, 1_795_878_849))
        );
        for bad in [
            "backup/ct/100/2026-11-28T15:14:09",
            "backup/ct/10/2026-11-28T15:14:09Z",
            "backup/vm/100/2026-11-28T15:14:09Z",
            "backup/ct/100/2026-11-28T15:14:09Z/x",
            "ct/100/2026-11-28T15:14:09Z",
        ] {
            assert_eq!(parse_snapshot_volname(bad), None, "{bad}");
        }
    }
}
