//! The `btrfs` backend (PVE 7+'s `BTRFSPlugin`): a directory storage on a btrfs filesystem
//! whose guest volumes are subvolumes.
//!
//! Layout below `<path>/images/<vmid>/` (volume names as on `dir` storages):
//! - `subvol-<vmid>-disk-N.subvol` — a subvolume, format `subvol`, bind-mounted into
//!   containers;
//! - `vm-<vmid>-disk-N.raw` — a subvolume directory `vm-<vmid>-disk-N/` holding the sparse
//!   image `disk.raw` (formatted and loop-mounted by the runtime);
//! - snapshots are read-only subvolume snapshots next to the volume: `<subvol>@<snap>`
//!   (`vm-<vmid>-disk-N@<snap>/disk.raw` for raw images).
//!
//! Backups, templates, ISOs, snippets and backup notes/protection work as on `dir`; this
//! backend delegates them to [`DirPlugin`].
//!
//! Sizes of subvolumes: PVE refuses `subvol` allocations with a size ("btrfs quotas are
//! currently not supported"). vzkit gives them a qgroup limit (`btrfs qgroup limit <KiB>k
//! 0/<id> <subvol>`) when quotas are enabled on the filesystem (`btrfs quota enable`),
//! detected with `btrfs qgroup show`; without quotas it refuses as PVE does. Size 0 means no
//! limit. Resizing a subvolume sets its limit; listings and `volume_size_info` report it.
//!
//! Templates: `create_base` renames `vm-…`/`subvol-…` to `base-…` and makes the subvolume
//! read-only (PVE renames only `vm-`, leaving subvol templates unrecognisable as bases).
//! Rollback snapshots the snapshot to a temporary subvolume and swaps it into place with
//! `renameat2(RENAME_EXCHANGE)`, as PVE does, so the volume is never missing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vzkit_host::command::{Cmd, Runner};

use crate::config::{ContentType, StorageSection};
use crate::error::{Result, StorageError};
use crate::plugin::{
    Feature, FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeAttribute, VolumeInfo,
    VolumeState,
};
use crate::plugins::dir::{CHATTR, DirPlugin};
use crate::volid::{self, ParsedVolname, VolumeType};

/// The `btrfs` tool.
pub const BTRFS: &str = "btrfs";
/// The inode number of a subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// PVE's `volume_has_feature` table for btrfs.
const BTRFS_FEATURES: FeatureTable = FeatureTable(&[
    (
        Feature::Snapshot,
        VolumeState::Current,
        Some(&["qcow2", "raw", "subvol"]),
    ),
    (
        Feature::Snapshot,
        VolumeState::Snap,
        Some(&["qcow2", "raw", "subvol"]),
    ),
    (
        Feature::Clone,
        VolumeState::Base,
        Some(&["qcow2", "raw", "subvol", "vmdk"]),
    ),
    (Feature::Clone, VolumeState::Current, Some(&["raw"])),
    (Feature::Clone, VolumeState::Snap, Some(&["raw"])),
    (
        Feature::Template,
        VolumeState::Current,
        Some(&["qcow2", "raw", "vmdk", "subvol"]),
    ),
    (
        Feature::Copy,
        VolumeState::Base,
        Some(&["qcow2", "raw", "subvol", "vmdk"]),
    ),
    (
        Feature::Copy,
        VolumeState::Current,
        Some(&["qcow2", "raw", "subvol", "vmdk"]),
    ),
    (
        Feature::Copy,
        VolumeState::Snap,
        Some(&["qcow2", "raw", "subvol"]),
    ),
    (
        Feature::SparseInit,
        VolumeState::Base,
        Some(&["qcow2", "raw", "vmdk"]),
    ),
    (
        Feature::SparseInit,
        VolumeState::Current,
        Some(&["qcow2", "raw", "vmdk"]),
    ),
]);

/// What `btrfs subvolume show --raw` says about a subvolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubvolumeInfo {
    /// The subvolume id (its qgroup is `0/<id>`).
    pub id: u64,
    /// The qgroup's referenced limit in bytes, if quotas are on and a limit is set.
    pub limit: Option<u64>,
}

/// Parses `btrfs subvolume show --raw -- <path>`.
///
/// # Errors
/// When the output names no subvolume id.
pub fn parse_subvolume_show(text: &str) -> Result<SubvolumeInfo> {
    let mut id = None;
    let mut limit = None;
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Subvolume ID" | "Object ID" => id = value.parse().ok(),
            "Limit referenced" => limit = value.parse().ok(),
            _ => {}
        }
    }
    let id = id.ok_or_else(|| {
        StorageError::Failed(format!(
            "failed to get btrfs subvolume ID from: {}",
            text.trim()
        ))
    })?;
    Ok(SubvolumeInfo { id, limit })
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |e| StorageError::io(what, path, e)
}

/// Whether `path` is the root of a subvolume (a directory with inode 256), as btrfs-progs
/// checks.
fn is_subvolume(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_FIRST_FREE_OBJECTID)
}

/// Snapshot names become part of directory names: letters, digits, `_` and `-` only.
fn check_snapname(snap: &str) -> Result<()> {
    if snap.is_empty()
        || !snap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(StorageError::Invalid(format!(
            "invalid snapshot name '{snap}'"
        )));
    }
    Ok(())
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A `btrfs` storage.
#[derive(Debug)]
pub struct BtrfsPlugin {
    dir: DirPlugin,
    section: StorageSection,
    runner: Arc<dyn Runner>,
}

impl BtrfsPlugin {
    /// A btrfs plugin for `section` (which must have a `path`).
    ///
    /// # Errors
    /// "storage definition has no path" when `path` is missing.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>) -> Result<Self> {
        Ok(Self {
            dir: DirPlugin::new(section.clone(), Arc::clone(&runner))?,
            section,
            runner,
        })
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    fn btrfs<I, S>(args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Cmd::new(BTRFS).arg("-q").args(args)
    }

    async fn run(&self, cmd: Cmd) -> Result<String> {
        Ok(self.runner.run_stdout(&cmd).await?)
    }

    /// The subvolume of a raw or subvol volume (at `snap`): `images/<vmid>/<name>[@snap]`,
    /// without `.raw` for raw images.
    fn subvol_path(&self, p: &ParsedVolname, snap: Option<&str>) -> Result<PathBuf> {
        let vmid = p
            .vmid
            .ok_or_else(|| StorageError::Invalid(format!("volume '{}' has no owner", p.name)))?;
        let dir = self.dir.subdir(VolumeType::Images)?.join(vmid.to_string());
        let mut name = match p.format.as_str() {
            "raw" => p
                .name
                .strip_suffix(".raw")
                .ok_or_else(|| {
                    StorageError::Failed(format!("internal error: bad disk name: {}", p.name))
                })?
                .to_string(),
            _ => p.name.clone(),
        };
        if let Some(s) = snap {
            name.push('@');
            name.push_str(s);
        }
        Ok(dir.join(name))
    }

    /// Whether `p` is a volume this backend keeps in a subvolume.
    fn in_subvolume(p: &ParsedVolname) -> bool {
        p.vtype == VolumeType::Images && (p.format == "raw" || p.format == "subvol")
    }

    fn filesystem_path(&self, p: &ParsedVolname, snap: Option<&str>) -> Result<PathBuf> {
        let subvol = self.subvol_path(p, snap)?;
        Ok(if p.format == "raw" {
            subvol.join("disk.raw")
        } else {
            subvol
        })
    }

    /// Whether quotas are enabled on the filesystem holding `path`.
    ///
    /// # Errors
    /// When `btrfs qgroup show` fails for another reason.
    pub async fn quotas_enabled(&self, path: &Path) -> Result<bool> {
        let cmd = Cmd::new(BTRFS)
            .args(["qgroup", "show", "-f", "--"])
            .arg(path);
        match self.runner.run(&cmd).await {
            Ok(_) => Ok(true),
            Err(e) if e.stderr().contains("quotas not enabled") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn subvolume_info(&self, path: &Path) -> Result<SubvolumeInfo> {
        // Without -q: it silences `show`.
        let out = self
            .run(
                Cmd::new(BTRFS)
                    .args(["subvolume", "show", "--raw", "--"])
                    .arg(path),
            )
            .await?;
        parse_subvolume_show(&out)
    }

    /// Sets the referenced limit of the subvolume at `path` (`none` for 0).
    async fn set_limit(&self, path: &Path, size_kib: u64) -> Result<()> {
        let id = self.subvolume_info(path).await?.id;
        let limit = if size_kib == 0 {
            "none".to_string()
        } else {
            format!("{size_kib}k")
        };
        self.run(Self::btrfs(["qgroup", "limit", "--", &limit, &format!("0/{id}")]).arg(path))
            .await?;
        Ok(())
    }

    async fn delete_subvolumes(&self, paths: &[PathBuf]) -> Result<()> {
        self.run(Self::btrfs(["subvolume", "delete", "--"]).args(paths))
            .await?;
        Ok(())
    }

    /// The snapshots of the subvolume at `subvol` (`<subvol>@<snap>` next to it), oldest
    /// first.
    fn snapshots_of(&self, subvol: &Path) -> Result<Vec<(String, PathBuf)>> {
        let (Some(dir), Some(base)) = (subvol.parent(), subvol.file_name()) else {
            return Ok(Vec::new());
        };
        let prefix = format!("{}@", base.to_string_lossy());
        let mut res: Vec<(std::time::SystemTime, String, PathBuf)> = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io("unable to read directory", dir, e)),
        };
        for e in entries {
            let e = e.map_err(io_err("unable to read directory", dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(snap) = name.strip_prefix(&prefix) else {
                continue;
            };
            let path = e.path();
            if !is_subvolume(&path) {
                continue;
            }
            let meta = std::fs::metadata(&path).map_err(io_err("unable to stat", &path))?;
            let born = meta
                .created()
                .or_else(|_| meta.modified())
                .map_err(io_err("unable to stat", &path))?;
            res.push((born, snap.to_string(), path));
        }
        res.sort();
        Ok(res.into_iter().map(|(_, s, p)| (s, p)).collect())
    }

    fn existing_image_names(&self) -> Result<Vec<String>> {
        let images = self.dir.subdir(VolumeType::Images)?;
        let mut names = Vec::new();
        let Ok(vmdirs) = std::fs::read_dir(&images) else {
            return Ok(names);
        };
        for vmdir in vmdirs {
            let vmdir = vmdir.map_err(io_err("unable to read directory", &images))?;
            if !vmdir.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = vmdir.path();
            for f in std::fs::read_dir(&p).map_err(io_err("unable to read directory", &p))? {
                let f = f.map_err(io_err("unable to read directory", &p))?;
                names.push(f.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    /// Size (bytes) and used bytes of a subvol volume: its qgroup limit (0 = unlimited).
    async fn subvol_size(&self, path: &Path) -> Result<u64> {
        if !self.quotas_enabled(path).await? {
            return Ok(0);
        }
        Ok(self.subvolume_info(path).await?.limit.unwrap_or(0))
    }

    async fn raw_volume_resize(path: &Path, size_bytes: u64) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err("unable to open image", path))?;
        f.set_len(size_bytes)
            .map_err(io_err("unable to resize image", path))?;
        f.sync_all().map_err(io_err("unable to sync image", path))
    }
}

#[async_trait::async_trait]
impl StoragePlugin for BtrfsPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "btrfs"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        volid::parse_volname_dir(volname).map_err(|e| StorageError::Invalid(e.to_string()))
    }

    fn features(&self) -> FeatureTable {
        BTRFS_FEATURES
    }

    async fn activate_storage(&self) -> Result<()> {
        let path = self.dir.base_path();
        if self.section.get("mkdir").is_none_or(|v| v != "0") {
            std::fs::create_dir_all(path).map_err(io_err("unable to create directory", path))?;
        }
        let magic = vzkit_host::mount::fs_magic(path)
            .map_err(|e| StorageError::io("statfs on", path, e))?;
        if magic != vzkit_host::mount::BTRFS_SUPER_MAGIC {
            return Err(StorageError::Invalid(format!(
                "'{}' is not a btrfs file system",
                path.display()
            )));
        }
        self.dir.activate_storage().await
    }

    async fn status(&self) -> Result<StorageStatus> {
        self.dir.status().await
    }

    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.path(volname, snapname).await;
        }
        if let Some(s) = snapname {
            check_snapname(s)?;
        }
        self.filesystem_path(&p, snapname)
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.access(volname, snapname).await;
        }
        let path = self.path(volname, snapname).await?;
        Ok(if p.format == "subvol" {
            VolumeAccess::Directory(path)
        } else {
            VolumeAccess::ImageFile(path)
        })
    }

    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        if format != "raw" && format != "subvol" {
            return self.dir.alloc_image(vmid, format, name, size_kib).await;
        }
        let imagedir = self.dir.subdir(VolumeType::Images)?.join(vmid.to_string());
        std::fs::create_dir_all(&imagedir)
            .map_err(io_err("unable to create directory", &imagedir))?;
        let name = match name {
            Some(n) => n.to_string(),
            None => volid::next_vm_diskname(
                &self.existing_image_names()?,
                self.id(),
                vmid,
                format,
                true,
                true,
            )
            .map_err(|e| StorageError::Failed(e.to_string()))?,
        };
        let parsed =
            volid::parse_name_dir(&name).map_err(|e| StorageError::Invalid(e.to_string()))?;
        if parsed.format != format {
            return Err(StorageError::Invalid(format!(
                "illegal name '{name}' - wrong extension for format ('{} != '{format}')",
                parsed.format
            )));
        }
        let subvol = imagedir.join(name.strip_suffix(".raw").unwrap_or(&name));
        if subvol.symlink_metadata().is_ok() {
            return Err(StorageError::AlreadyExists(format!(
                "disk image '{}' already exists",
                subvol.display()
            )));
        }
        let limited = format == "subvol" && size_kib > 0;
        if limited && !self.quotas_enabled(&imagedir).await? {
            return Err(StorageError::Unsupported(
                "btrfs quotas are currently not supported, use an unsized subvolume or a raw file"
                    .into(),
            ));
        }
        self.run(Self::btrfs(["subvolume", "create", "--"]).arg(&subvol))
            .await?;
        let res: Result<()> = async {
            if limited {
                self.set_limit(&subvol, size_kib).await?;
            } else if format == "raw" {
                let path = subvol.join("disk.raw");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err("failed to create raw file", &path))?;
                if self.section.flag("nocow") {
                    self.runner
                        .run(&Cmd::new(CHATTR).arg("+C").arg(&path))
                        .await?;
                }
                f.set_len(size_kib * 1024)
                    .map_err(io_err("failed to set file size for", &path))?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            if let Err(undo) = self.delete_subvolumes(std::slice::from_ref(&subvol)).await {
                return Err(StorageError::Failed(format!(
                    "{e}; removing '{}' again failed too: {undo}",
                    subvol.display()
                )));
            }
            return Err(e);
        }
        Ok(format!("{vmid}/{name}"))
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.free_image(volname).await;
        }
        let subvol = self.subvol_path(&p, None)?;
        if !is_subvolume(&subvol) {
            return Err(StorageError::NotFound(format!(
                "disk image '{}' does not exist",
                subvol.display()
            )));
        }
        let mut victims: Vec<PathBuf> = self
            .snapshots_of(&subvol)?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        victims.push(subvol.clone());
        self.delete_subvolumes(&victims).await?;
        if let Some(dir) = subvol.parent() {
            // Only succeeds when no other volume of the guest is left, as PVE's rmdir.
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let images = self.dir.subdir(VolumeType::Images)?;
        let mut res = Vec::new();
        let Ok(vmdirs) = std::fs::read_dir(&images) else {
            return Ok(res);
        };
        let mut vmdirs: Vec<_> = vmdirs
            .collect::<std::io::Result<_>>()
            .map_err(io_err("unable to read directory", &images))?;
        vmdirs.sort_by_key(std::fs::DirEntry::file_name);
        for vmdir in vmdirs {
            let dname = vmdir.file_name().to_string_lossy().into_owned();
            let Ok(owner) = dname.parse::<u32>() else {
                continue;
            };
            if dname.len() < 2 || vmid.is_some_and(|v| v != owner) {
                continue;
            }
            let dpath = vmdir.path();
            let mut files: Vec<_> = std::fs::read_dir(&dpath)
                .map_err(io_err("unable to read directory", &dpath))?
                .collect::<std::io::Result<_>>()
                .map_err(io_err("unable to read directory", &dpath))?;
            files.sort_by_key(std::fs::DirEntry::file_name);
            for f in files {
                let fname = f.file_name().to_string_lossy().into_owned();
                // Snapshots (`@`) and anything with another extension are not volumes.
                if fname.contains('@') {
                    continue;
                }
                let (stem, ext) = match fname.split_once('.') {
                    Some((s, e)) => (s, Some(e)),
                    None => (fname.as_str(), None),
                };
                if !matches!(ext, None | Some("qcow2" | "vmdk" | "subvol")) || stem.is_empty() {
                    continue;
                }
                let name = if ext.is_none() {
                    format!("{fname}.raw")
                } else {
                    fname.clone()
                };
                let Ok(parsed) = volid::parse_name_dir(&name) else {
                    continue;
                };
                let path = f.path();
                let (size, used, ctime) = match parsed.format.as_str() {
                    "raw" => {
                        let img = path.join("disk.raw");
                        let Ok(m) = std::fs::metadata(&img) else {
                            continue;
                        };
                        (m.len(), Some(m.blocks() * 512), Some(m.ctime()))
                    }
                    "subvol" => {
                        if !is_subvolume(&path) {
                            continue;
                        }
                        let m =
                            std::fs::metadata(&path).map_err(io_err("unable to stat", &path))?;
                        (self.subvol_size(&path).await?, Some(0), Some(m.ctime()))
                    }
                    // qcow2/vmdk files are listed by the dir code path.
                    _ => continue,
                };
                let volname = format!("{owner}/{name}");
                let content = if parsed.format == "subvol" {
                    "rootdir"
                } else {
                    "images"
                };
                let mut info = VolumeInfo::new(self.volid(&volname), content, &parsed.format, size);
                info.used = used;
                info.vmid = Some(owner);
                info.ctime = ctime;
                res.push(info);
            }
        }
        Ok(res)
    }

    async fn list_volumes(
        &self,
        vmid: Option<u32>,
        content: &[ContentType],
    ) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        if content
            .iter()
            .any(|c| matches!(c, ContentType::Images | ContentType::Rootdir))
        {
            res.extend(self.list_images(vmid).await?);
        }
        let others: Vec<ContentType> = content
            .iter()
            .copied()
            .filter(|c| !matches!(c, ContentType::Images | ContentType::Rootdir))
            .collect();
        if !others.is_empty() {
            res.extend(self.dir.list_volumes(vmid, &others).await?);
        }
        Ok(res)
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let path = self.path(volname, snapname).await?;
        if path.symlink_metadata().is_err() {
            return Err(StorageError::NotFound(match snapname {
                Some(s) => format!(
                    "snapshot '{s}' of volume '{}' does not exist",
                    self.volid(volname)
                ),
                None => format!("volume '{}' does not exist", self.volid(volname)),
            }));
        }
        Ok(())
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.volume_size_info(volname).await;
        }
        let path = self.filesystem_path(&p, None)?;
        if p.format == "subvol" {
            if !is_subvolume(&path) {
                return Err(StorageError::NotFound(format!(
                    "volume '{}' does not exist",
                    self.volid(volname)
                )));
            }
            return self.subvol_size(&path).await;
        }
        Ok(std::fs::metadata(&path)
            .map_err(io_err("unable to stat", &path))?
            .len())
    }

    async fn volume_resize(&self, volname: &str, size_bytes: u64) -> Result<()> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.volume_resize(volname, size_bytes).await;
        }
        let path = self.filesystem_path(&p, None)?;
        if p.format == "subvol" {
            if !self.quotas_enabled(&path).await? {
                return Err(StorageError::Unsupported(
                    "btrfs quotas are not enabled, cannot limit the size of a subvolume".into(),
                ));
            }
            return self.set_limit(&path, size_bytes / 1024).await;
        }
        Self::raw_volume_resize(&path, size_bytes).await
    }

    async fn volume_snapshot(&self, volname: &str, snap: &str) -> Result<()> {
        check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.volume_snapshot(volname, snap).await;
        }
        let subvol = self.subvol_path(&p, None)?;
        let snap_path = self.subvol_path(&p, Some(snap))?;
        if snap_path.symlink_metadata().is_ok() {
            return Err(StorageError::AlreadyExists(format!(
                "snapshot '{snap}' of volume '{}' already exists",
                self.volid(volname)
            )));
        }
        self.run(
            Self::btrfs(["subvolume", "snapshot", "-r", "--"])
                .arg(&subvol)
                .arg(&snap_path),
        )
        .await?;
        Ok(())
    }

    async fn volume_snapshot_list(&self, volname: &str) -> Result<Vec<String>> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return Ok(Vec::new());
        }
        Ok(self
            .snapshots_of(&self.subvol_path(&p, None)?)?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    async fn volume_rollback_is_possible(&self, volname: &str, snap: &str) -> Result<Vec<String>> {
        check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.volume_rollback_is_possible(volname, snap).await;
        }
        if !is_subvolume(&self.subvol_path(&p, Some(snap))?) {
            return Err(StorageError::NotFound(format!(
                "can't rollback, snapshot '{snap}' does not exist on '{}'",
                self.volid(volname)
            )));
        }
        Ok(Vec::new())
    }

    async fn volume_snapshot_rollback(&self, volname: &str, snap: &str) -> Result<()> {
        self.volume_rollback_is_possible(volname, snap).await?;
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.volume_snapshot_rollback(volname, snap).await;
        }
        let path = self.subvol_path(&p, None)?;
        let snap_path = self.subvol_path(&p, Some(snap))?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        self.run(
            Self::btrfs(["subvolume", "snapshot", "--"])
                .arg(&snap_path)
                .arg(&tmp),
        )
        .await?;
        let swapped = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            &path,
            rustix::fs::RenameFlags::EXCHANGE,
        );
        // After a successful swap `tmp` holds the old state; after a failed one, the new.
        let cleanup = self.delete_subvolumes(std::slice::from_ref(&tmp)).await;
        if let Err(e) = swapped {
            return Err(StorageError::Failed(format!(
                "failed to rotate '{}' into place at '{}' - {}",
                tmp.display(),
                path.display(),
                std::io::Error::from(e)
            )));
        }
        cleanup.map_err(|e| {
            StorageError::Failed(format!(
                "rolled back, but failed to remove '{}' subvolume: {e}",
                path_str(&tmp)
            ))
        })
    }

    async fn volume_snapshot_delete(&self, volname: &str, snap: &str) -> Result<()> {
        check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.volume_snapshot_delete(volname, snap).await;
        }
        let snap_path = self.subvol_path(&p, Some(snap))?;
        if !is_subvolume(&snap_path) {
            return Err(StorageError::NotFound(format!(
                "snapshot '{snap}' of volume '{}' does not exist",
                self.volid(volname)
            )));
        }
        self.delete_subvolumes(&[snap_path]).await
    }

    async fn clone_image(&self, volname: &str, vmid: u32, snap: Option<&str>) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.clone_image(volname, vmid, snap).await;
        }
        let has = self.volume_has_feature(Feature::Clone, volname, snap)?;
        if !has {
            return Err(StorageError::Unsupported(format!(
                "clone_image: volume '{}' cannot be cloned (only base volumes and raw images)",
                self.volid(volname)
            )));
        }
        if let Some(s) = snap {
            check_snapname(s)?;
        }
        let source = self.subvol_path(&p, snap)?;
        if !is_subvolume(&source) {
            return Err(StorageError::NotFound(format!(
                "volume '{}' does not exist",
                self.volid(volname)
            )));
        }
        let imagedir = self.dir.subdir(VolumeType::Images)?.join(vmid.to_string());
        std::fs::create_dir_all(&imagedir)
            .map_err(io_err("unable to create directory", &imagedir))?;
        let newname = volid::next_vm_diskname(
            &self.existing_image_names()?,
            self.id(),
            vmid,
            &p.format,
            true,
            true,
        )
        .map_err(|e| StorageError::Failed(e.to_string()))?;
        let newsubvol = imagedir.join(newname.strip_suffix(".raw").unwrap_or(&newname));
        self.run(
            Self::btrfs(["subvolume", "snapshot", "--"])
                .arg(&source)
                .arg(&newsubvol),
        )
        .await?;
        Ok(format!("{vmid}/{newname}"))
    }

    async fn create_base(&self, volname: &str) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if !Self::in_subvolume(&p) {
            return self.dir.create_base(volname).await;
        }
        if p.is_base {
            return Err(StorageError::Invalid(
                "create_base not possible with base image".into(),
            ));
        }
        let newname = if let Some(rest) = p.name.strip_prefix("vm-") {
            format!("base-{rest}")
        } else if let Some(rest) = p.name.strip_prefix("subvol-") {
            format!("base-{rest}")
        } else {
            return Err(StorageError::Invalid(format!(
                "create_base not possible with volume '{volname}'"
            )));
        };
        let subvol = self.subvol_path(&p, None)?;
        if let Some((snap, _)) = self.snapshots_of(&subvol)?.first() {
            return Err(StorageError::Invalid(format!(
                "unable to create base volume - found snapshot '{snap}'"
            )));
        }
        let vmid = p.vmid.unwrap_or_default();
        let newvolname = match (&p.basename, p.basevmid) {
            (Some(b), Some(bv)) => format!("{bv}/{b}/{vmid}/{newname}"),
            _ => format!("{vmid}/{newname}"),
        };
        let newp = self.parse_volname(&newvolname)?;
        let newsubvol = self.subvol_path(&newp, None)?;
        if newsubvol.symlink_metadata().is_ok() {
            return Err(StorageError::AlreadyExists(format!(
                "disk image '{}' already exists",
                newsubvol.display()
            )));
        }
        std::fs::rename(&subvol, &newsubvol).map_err(|e| {
            StorageError::Failed(format!(
                "rename '{}' to '{}' failed - {e}",
                subvol.display(),
                newsubvol.display()
            ))
        })?;
        self.run(
            Self::btrfs(["property", "set"])
                .arg(&newsubvol)
                .args(["ro", "true"]),
        )
        .await?;
        Ok(newvolname)
    }

    async fn get_volume_attribute(
        &self,
        volname: &str,
        attr: VolumeAttribute,
    ) -> Result<Option<String>> {
        self.dir.get_volume_attribute(volname, attr).await
    }

    async fn update_volume_attribute(
        &self,
        volname: &str,
        attr: VolumeAttribute,
        value: Option<&str>,
    ) -> Result<()> {
        self.dir.update_volume_attribute(volname, attr, value).await
    }

    fn backup_dir(&self) -> Option<PathBuf> {
        self.dir.backup_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use vzkit_host::command::{Output, RecordingRunner};

    fn plugin(path: &Path) -> (BtrfsPlugin, Arc<RecordingRunner>) {
        let text = format!(
            "btrfs: bt\n\tpath {}\n\tcontent rootdir,images,backup\n",
            path.display()
        );
        let (cfg, warnings) = StorageConfig::parse(&text, "storage.cfg");
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner = Arc::new(RecordingRunner::new());
        let p = BtrfsPlugin::new(cfg.get("bt").unwrap().clone(), runner.clone()).unwrap();
        (p, runner)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn subvolume_show_parses_id_and_limit() {
        // btrfs-progs 6.2 `btrfs subvolume show --raw`, quotas on, limit set.
        let text = "s2\n\tName: \t\t\ts2\n\tUUID: \t\t\t0c001415-a75a-394f-a737-7a052df1e937\n\
                    \tParent UUID: \t\t-\n\tCreation time: \t\t2026-11-28 12:45:40 +0000\n\
                    \tSubvolume ID: \t\t257\n\tGeneration: \t\t9\n\tFlags: \t\t\t-\n\
                    \tSnapshot(s):\n\tQuota group:\t\t0/257\n\t  Limit referenced:\t16777216\n\
                    \t  Limit exclusive:\t-\n";
        assert_eq!(
            parse_subvolume_show(text).unwrap(),
            SubvolumeInfo {
                id: 257,
                limit: Some(16 << 20)
            }
        );
        let no_limit = text.replace("16777216", "-");
        assert_eq!(parse_subvolume_show(&no_limit).unwrap().limit, None);
        assert!(parse_subvolume_show("garbage").is_err());
    }

    #[test]
    fn paths_follow_pves_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = plugin(dir.path());
        let img = dir.path().join("images/100");
        assert_eq!(
            block_on(p.path("100/vm-100-disk-0.raw", None)).unwrap(),
            img.join("vm-100-disk-0/disk.raw")
        );
        assert_eq!(
            block_on(p.path("100/vm-100-disk-0.raw", Some("s1"))).unwrap(),
            img.join("vm-100-disk-0@s1/disk.raw")
        );
        assert_eq!(
            block_on(p.access("100/subvol-100-disk-1.subvol", Some("vzdump"))).unwrap(),
            VolumeAccess::Directory(img.join("subvol-100-disk-1.subvol@vzdump"))
        );
        assert_eq!(
            block_on(p.access("100/vm-100-disk-0.raw", None)).unwrap(),
            VolumeAccess::ImageFile(img.join("vm-100-disk-0/disk.raw"))
        );
        assert!(block_on(p.path("100/vm-100-disk-0.raw", Some("../x"))).is_err());
        assert_eq!(
            block_on(p.path("backup/vzdump-lxc-100-2024_01_01-00_00_00.tar.zst", None)).unwrap(),
            dir.path()
                .join("dump/vzdump-lxc-100-2024_01_01-00_00_00.tar.zst")
        );
    }

    #[test]
    fn alloc_commands() {
        let dir = tempfile::tempdir().unwrap();
        let (p, r) = plugin(dir.path());
        // Not a real btrfs: the recorded subvolume create makes nothing, so the raw file
        // cannot be created and the subvolume is deleted again.
        let err = block_on(p.alloc_image(100, "raw", None, 1024)).unwrap_err();
        assert!(
            err.to_string().starts_with("failed to create raw file"),
            "{err}"
        );
        let sub = dir.path().join("images/100/vm-100-disk-0");
        assert_eq!(
            r.call_lines(),
            [
                format!("btrfs -q subvolume create -- {}", sub.display()),
                format!("btrfs -q subvolume delete -- {}", sub.display()),
            ]
        );
        let (p, r) = plugin(dir.path());
        let name = block_on(p.alloc_image(100, "subvol", None, 0)).unwrap();
        assert_eq!(name, "100/subvol-100-disk-0.subvol");
        let (p, r2) = plugin(dir.path());
        r2.push_reply(Output::failed(
            1,
            "ERROR: can't list qgroups: quotas not enabled",
        ));
        let err = block_on(p.alloc_image(100, "subvol", None, 1024)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "btrfs quotas are currently not supported, use an unsized subvolume or a raw file"
        );
        let (p, r3) = plugin(dir.path());
        r3.push_reply(Output::ok(""));
        r3.push_reply(Output::ok(""));
        r3.push_reply(Output::ok("\tSubvolume ID: \t\t260\n"));
        let name =
            block_on(p.alloc_image(100, "subvol", Some("subvol-100-disk-3.subvol"), 2048)).unwrap();
        assert_eq!(name, "100/subvol-100-disk-3.subvol");
        let s3 = dir.path().join("images/100/subvol-100-disk-3.subvol");
        assert_eq!(
            r3.call_lines(),
            [
                format!(
                    "btrfs qgroup show -f -- {}",
                    dir.path().join("images/100").display()
                ),
                format!("btrfs -q subvolume create -- {}", s3.display()),
                format!("btrfs subvolume show --raw -- {}", s3.display()),
                format!("btrfs -q qgroup limit -- 2048k 0/260 {}", s3.display()),
            ]
        );
        assert_eq!(
            r.call_lines(),
            [format!(
                "btrfs -q subvolume create -- {}",
                dir.path()
                    .join("images/100/subvol-100-disk-0.subvol")
                    .display()
            )]
        );
        let err = block_on(p.alloc_image(100, "raw", Some("vm-100-disk-9.subvol"), 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-100-disk-9.subvol' - wrong extension for format ('subvol != 'raw')"
        );
    }

    #[test]
    fn snapshot_and_template_commands() {
        let dir = tempfile::tempdir().unwrap();
        let (p, r) = plugin(dir.path());
        let img = dir.path().join("images/100");
        block_on(p.volume_snapshot("100/vm-100-disk-0.raw", "s1")).unwrap();
        block_on(p.volume_snapshot("100/subvol-100-disk-1.subvol", "vzdump")).unwrap();
        let err = block_on(p.volume_snapshot("100/subvol-100-disk-1.subvol", "a/b")).unwrap_err();
        assert_eq!(err.to_string(), "invalid snapshot name 'a/b'");
        // A plain directory stands in for the subvolume: renamed, then made read-only.
        std::fs::create_dir_all(img.join("subvol-100-disk-1.subvol")).unwrap();
        let base = block_on(p.create_base("100/subvol-100-disk-1.subvol")).unwrap();
        assert_eq!(base, "100/base-100-disk-1.subvol");
        assert!(img.join("base-100-disk-1.subvol").is_dir());
        let err = block_on(p.create_base(&base)).unwrap_err();
        assert_eq!(err.to_string(), "create_base not possible with base image");
        assert_eq!(
            r.call_lines(),
            [
                format!(
                    "btrfs -q subvolume snapshot -r -- {} {}",
                    img.join("vm-100-disk-0").display(),
                    img.join("vm-100-disk-0@s1").display()
                ),
                format!(
                    "btrfs -q subvolume snapshot -r -- {} {}",
                    img.join("subvol-100-disk-1.subvol").display(),
                    img.join("subvol-100-disk-1.subvol@vzdump").display()
                ),
                format!(
                    "btrfs -q property set {} ro true",
                    img.join("base-100-disk-1.subvol").display()
                ),
            ]
        );
    }

    #[test]
    fn feature_table_is_pves() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = plugin(dir.path());
        let has = |f, v: &str, s| p.volume_has_feature(f, v, s).unwrap();
        assert!(has(Feature::Snapshot, "100/subvol-100-disk-0.subvol", None));
        assert!(has(Feature::Snapshot, "100/vm-100-disk-0.raw", Some("s")));
        assert!(has(Feature::Clone, "100/vm-100-disk-0.raw", None));
        assert!(!has(Feature::Clone, "100/subvol-100-disk-0.subvol", None));
        assert!(has(Feature::Clone, "100/base-100-disk-0.subvol", None));
        assert!(has(
            Feature::Copy,
            "100/subvol-100-disk-0.subvol",
            Some("s")
        ));
        assert!(!has(
            Feature::SparseInit,
            "100/subvol-100-disk-0.subvol",
            None
        ));
        assert!(!has(Feature::Rename, "100/vm-100-disk-0.raw", None));
    }
}
