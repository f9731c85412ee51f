//! The `dir` backend: volumes as files and directories below a path (PVE's base `Plugin`).
//!
//! Layout below the storage `path` (overridable per content type by `content-dirs`):
//! `images/<vmid>/<name>` guest volumes, `dump/` backups, `template/cache/` container
//! templates, `template/iso/` ISO images, `snippets/`.
//!
//! Container volumes: `size > 0` → `vm-<vmid>-disk-N.raw`, a sparse raw file that the caller
//! formats with ext4 and mounts through a loop device; `size = 0` →
//! `subvol-<vmid>-disk-N.subvol`, a plain directory that is bind-mounted (no size limit).
//! Like PVE, `dir` has no snapshots for raw or subvol volumes (qcow2 only), so the capability
//! table says so and vzdump's snapshot mode falls back to suspend.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vzkit_host::command::{Cmd, Runner};

use crate::backup::archive_info;
use crate::config::{ContentType, StorageSection};
use crate::error::{Result, StorageError};
use crate::plugin::{
    Feature, FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeAttribute, VolumeInfo,
    VolumeState,
};
use crate::volid::{self, ParsedVolname, VolumeType};

/// `qemu-img`, for the qcow2/vmdk image formats.
pub const QEMU_IMG: &str = "qemu-img";
/// `chattr`, to make base volumes immutable.
pub const CHATTR: &str = "chattr";

const IMAGE_FORMATS: &[&str] = &["qcow2", "raw", "vmdk"];

/// PVE's `volume_has_feature` table for file storages (§4.6).
const DIR_FEATURES: FeatureTable = FeatureTable(&[
    (Feature::Snapshot, VolumeState::Current, Some(&["qcow2"])),
    (Feature::Snapshot, VolumeState::Snap, Some(&["qcow2"])),
    (
        Feature::Clone,
        VolumeState::Base,
        Some(&["qcow2", "raw", "vmdk"]),
    ),
    (
        Feature::Template,
        VolumeState::Current,
        Some(&["qcow2", "raw", "vmdk", "subvol"]),
    ),
    (
        Feature::Copy,
        VolumeState::Base,
        Some(&["qcow2", "raw", "vmdk"]),
    ),
    (
        Feature::Copy,
        VolumeState::Current,
        Some(&["qcow2", "raw", "vmdk"]),
    ),
    (Feature::Copy, VolumeState::Snap, Some(&["qcow2"])),
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
    (
        Feature::Rename,
        VolumeState::Current,
        Some(&["qcow2", "raw", "vmdk"]),
    ),
]);

/// A `dir` storage.
#[derive(Debug, Clone)]
pub struct DirPlugin {
    section: StorageSection,
    path: PathBuf,
    runner: Arc<dyn Runner>,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |e| StorageError::io(what, path, e)
}

impl DirPlugin {
    /// A dir plugin for `section` (which must have a `path`).
    ///
    /// # Errors
    /// "storage definition has no path" when `path` is missing.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>) -> Result<Self> {
        let path = section
            .path()
            .map(Path::to_path_buf)
            .ok_or_else(|| StorageError::Invalid("storage definition has no path".into()))?;
        Ok(Self {
            section,
            path,
            runner,
        })
    }

    /// The storage's base path.
    #[must_use]
    pub fn base_path(&self) -> &Path {
        &self.path
    }

    /// The directory holding volumes of content `vtype`.
    ///
    /// # Errors
    /// For an unknown vtype.
    pub fn subdir(&self, vtype: VolumeType) -> Result<PathBuf> {
        self.section
            .subdir(vtype.as_str())
            .map(PathBuf::from)
            .map_err(|e| StorageError::Invalid(e.to_string()))
    }

    fn filesystem_path(&self, p: &ParsedVolname) -> Result<PathBuf> {
        let dir = self.subdir(p.vtype)?;
        Ok(match (p.vtype, p.vmid) {
            (VolumeType::Images, Some(vmid)) => dir.join(vmid.to_string()).join(&p.name),
            _ => dir.join(&p.name),
        })
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{}", self.section.id(), volname)
    }

    fn existing_image_names(&self) -> Result<Vec<String>> {
        let images = self.subdir(VolumeType::Images)?;
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

    async fn image_size(&self, path: &Path, format: &str) -> Result<(u64, u64)> {
        let meta = std::fs::metadata(path).map_err(io_err("unable to stat", path))?;
        use std::os::unix::fs::MetadataExt;
        let used = meta.blocks() * 512;
        if format == "subvol" {
            return Ok((0, used));
        }
        if format == "raw" {
            return Ok((meta.len(), used));
        }
        let out = self
            .runner
            .run_stdout(
                &Cmd::new(QEMU_IMG)
                    .args(["info", "--output=json", "-f", format])
                    .arg(path),
            )
            .await?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| StorageError::Failed(format!("unable to parse qemu-img info: {e}")))?;
        Ok((v["virtual-size"].as_u64().unwrap_or(0), used))
    }

    fn scan_files(&self, vtype: VolumeType) -> Result<Vec<(String, std::fs::Metadata)>> {
        let dir = self.subdir(vtype)?;
        let mut res = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(res);
        };
        for e in entries {
            let e = e.map_err(io_err("unable to read directory", &dir))?;
            let meta = e.metadata().map_err(io_err("unable to stat", &e.path()))?;
            if meta.is_file() {
                res.push((e.file_name().to_string_lossy().into_owned(), meta));
            }
        }
        res.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(res)
    }

    fn list_backups(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let dir = self.subdir(VolumeType::Backup)?;
        let mut res = Vec::new();
        for (name, meta) in self.scan_files(VolumeType::Backup)? {
            let Some(format) = backup_format(&name) else {
                continue;
            };
            let volname = format!("backup/{name}");
            let mut info = VolumeInfo::new(self.volid(&volname), "backup", &format, meta.len());
            use std::os::unix::fs::MetadataExt;
            info.ctime = Some(meta.mtime());
            if let Ok(ai) = archive_info(&name) {
                info.subtype = Some(ai.guest_type.as_str().to_string());
                info.vmid = ai.vmid;
                if ai.is_std_name {
                    info.ctime = ai.ctime;
                }
            }
            if vmid.is_some() && info.vmid != vmid {
                continue;
            }
            let notes = dir.join(format!("{name}.notes"));
            if let Ok(text) = std::fs::read_to_string(&notes) {
                info.notes = text.lines().next().map(str::to_string);
            }
            info.protected = Some(dir.join(format!("{name}.protected")).exists());
            res.push(info);
        }
        Ok(res)
    }

    fn list_plain(&self, vtype: VolumeType) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        for (name, meta) in self.scan_files(vtype)? {
            let volname = format!("{}/{name}", vtype.as_str());
            let Ok(p) = volid::parse_volname_dir(&volname) else {
                continue;
            };
            let format = match vtype {
                VolumeType::Vztmpl => vztmpl_format(&name).unwrap_or("raw").to_string(),
                VolumeType::Iso => "iso".to_string(),
                _ => p.format.clone(),
            };
            let mut info =
                VolumeInfo::new(self.volid(&volname), vtype.as_str(), &format, meta.len());
            use std::os::unix::fs::MetadataExt;
            info.ctime = Some(meta.mtime());
            res.push(info);
        }
        Ok(res)
    }

    fn attribute_path(&self, volname: &str, attr: VolumeAttribute) -> Result<PathBuf> {
        let p = self.parse_volname(volname)?;
        if p.vtype != VolumeType::Backup {
            return Err(StorageError::Unsupported(format!(
                "attributes are only supported for backups, not for volume '{}'",
                self.volid(volname)
            )));
        }
        let path = self.filesystem_path(&p)?;
        let ext = match attr {
            VolumeAttribute::Notes => "notes",
            VolumeAttribute::Protected => "protected",
        };
        let mut s = path.into_os_string();
        s.push(format!(".{ext}"));
        Ok(PathBuf::from(s))
    }
}

/// The format `pvesm list` shows for a backup file (`tar.zst`, `tgz`, `vma.gz`): the extension
/// matched by PVE's `BACKUP_EXT_RE_2`, or `None` for files that are not backups. Non-standard
/// names are backups too (pruning marks them `renamed`).
fn backup_format(name: &str) -> Option<String> {
    const BASES: [&str; 2] = ["tar", "vma"];
    const COMPRESSIONS: [&str; 4] = ["gz", "lzo", "zst", "bz2"];
    if name.len() > 4 && name.ends_with(".tgz") {
        return Some("tgz".into());
    }
    for base in BASES {
        if name.len() > base.len() + 1 && name.ends_with(&format!(".{base}")) {
            return Some(base.into());
        }
        for comp in COMPRESSIONS {
            let ext = format!("{base}.{comp}");
            if name.len() > ext.len() + 1 && name.ends_with(&format!(".{ext}")) {
                return Some(ext);
            }
        }
    }
    None
}

/// The format `pvesm list` shows for a container template (`tgz`, `txz`, `tbz2`, `tzst`,
/// `tar`), or `None` for other files.
fn vztmpl_format(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    [
        (".tar.gz", "tgz"),
        (".tar.xz", "txz"),
        (".tar.bz2", "tbz2"),
        (".tar.zst", "tzst"),
        (".tar", "tar"),
    ]
    .into_iter()
    .find(|(ext, _)| lower.ends_with(ext))
    .map(|(_, f)| f)
}

/// Removes a backup archive and its companions (`<stem>.log`, `<archive>.notes`), as PVE's
/// `archive_remove`. A missing companion is fine; a missing archive is not.
fn remove_archive(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            StorageError::NotFound(format!("backup '{}' does not exist", path.display()))
        }
        _ => StorageError::io("unable to remove", path, e),
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut companions = vec![path.with_file_name(format!("{name}.notes"))];
    if let Ok(ai) = archive_info(&name)
        && let Some(log) = ai.logfilename
    {
        companions.push(path.with_file_name(log));
    }
    for c in companions {
        match std::fs::remove_file(&c) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("unable to remove", &c, e)),
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl StoragePlugin for DirPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "dir"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        volid::parse_volname_dir(volname).map_err(|e| StorageError::Invalid(e.to_string()))
    }

    fn features(&self) -> FeatureTable {
        DIR_FEATURES
    }

    async fn activate_storage(&self) -> Result<()> {
        let create_base = self
            .section
            .get("create-base-path")
            .is_none_or(|v| v != "0")
            && self.section.get("mkdir").is_none_or(|v| v != "0");
        if !self.path.is_dir() {
            if create_base {
                std::fs::create_dir_all(&self.path)
                    .map_err(io_err("unable to create directory", &self.path))?;
            } else {
                return Err(StorageError::Failed(format!(
                    "unable to activate storage '{}' - directory '{}' does not exist or is unreachable",
                    self.id(),
                    self.path.display()
                )));
            }
        }
        if self.section.get("create-subdirs").is_some_and(|v| v == "0")
            || self.section.get("mkdir").is_some_and(|v| v == "0")
        {
            return Ok(());
        }
        let mut seen: Vec<(PathBuf, ContentType)> = Vec::new();
        for content in self.content() {
            let Ok(vtype) = content.as_str().parse::<VolumeType>() else {
                continue;
            };
            let dir = self.subdir(vtype)?;
            if let Some((_, other)) = seen.iter().find(|(d, _)| *d == dir) {
                return Err(StorageError::Invalid(format!(
                    "storage '{}': content types '{}' and '{}' resolve to the same directory '{}'",
                    self.id(),
                    other.as_str(),
                    content.as_str(),
                    dir.display()
                )));
            }
            std::fs::create_dir_all(&dir).map_err(io_err("unable to create directory", &dir))?;
            seen.push((dir, content));
        }
        Ok(())
    }

    async fn status(&self) -> Result<StorageStatus> {
        let st = rustix::fs::statvfs(&self.path).map_err(|e| {
            StorageError::io(
                "unable to query filesystem",
                &self.path,
                std::io::Error::from(e),
            )
        })?;
        let frsize = st.f_frsize;
        let total = st.f_blocks * frsize;
        let avail = st.f_bavail * frsize;
        let used = total.saturating_sub(st.f_bfree * frsize);
        Ok(StorageStatus {
            total,
            avail,
            used,
            active: true,
        })
    }

    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        let p = self.parse_volname(volname)?;
        if snapname.is_some() && p.format != "qcow2" {
            return Err(StorageError::Unsupported(
                "can't snapshot this image format".into(),
            ));
        }
        self.filesystem_path(&p)
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        let p = self.parse_volname(volname)?;
        let path = self.path(volname, snapname).await?;
        match p.format.as_str() {
            "subvol" => Ok(VolumeAccess::Directory(path)),
            "raw" => Ok(VolumeAccess::ImageFile(path)),
            f => Err(StorageError::Unsupported(format!(
                "unsupported image format '{f}'"
            ))),
        }
    }

    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        if !IMAGE_FORMATS.contains(&format) && format != "subvol" {
            return Err(StorageError::Invalid(format!(
                "unsupported format '{format}'"
            )));
        }
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
        let (parsed_name, parsed_fmt) = (parsed.name, parsed.format);
        if parsed_fmt != format {
            return Err(StorageError::Invalid(format!(
                "illegal name '{parsed_name}' - wrong extension for format ('{parsed_fmt} != '{format}')"
            )));
        }
        let dir = self.subdir(VolumeType::Images)?.join(vmid.to_string());
        std::fs::create_dir_all(&dir).map_err(io_err("unable to create directory", &dir))?;
        let path = dir.join(&name);
        if path.symlink_metadata().is_ok() {
            return Err(StorageError::AlreadyExists(format!(
                "disk image '{}' already exists",
                path.display()
            )));
        }
        let cleanup = |dir: &Path| {
            // Leaves a non-empty directory (other volumes) alone.
            let _ = std::fs::remove_dir(dir);
        };
        let res: Result<()> = async {
            match format {
                "subvol" => {
                    if size_kib != 0 {
                        return Err(StorageError::Unsupported(
                            "storage does not support subvol quotas".into(),
                        ));
                    }
                    std::fs::create_dir(&path)
                        .map_err(io_err("unable to create directory", &path))?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .map_err(io_err("unable to chmod", &path))?;
                }
                "raw" => {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(io_err("unable to create image", &path))?;
                    f.set_len(size_kib * 1024)
                        .map_err(io_err("unable to size image", &path))?;
                }
                fmt => {
                    self.runner
                        .run(
                            &Cmd::new(QEMU_IMG)
                                .args(["create", "-o", "preallocation=metadata", "-f", fmt])
                                .arg(&path)
                                .arg(format!("{size_kib}K")),
                        )
                        .await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            if path.is_dir() {
                let _ = std::fs::remove_dir(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
            cleanup(&dir);
            return Err(e);
        }
        Ok(format!("{vmid}/{name}"))
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let path = self.filesystem_path(&p)?;
        if p.vtype == VolumeType::Backup
            && self
                .attribute_path(volname, VolumeAttribute::Protected)?
                .exists()
        {
            return Err(StorageError::Failed(format!(
                "cannot remove protected volume '{volname}' on '{}'",
                self.id()
            )));
        }
        if p.is_base {
            self.runner
                .run(&Cmd::new(CHATTR).arg("-i").arg(&path))
                .await?;
        }
        if p.vtype == VolumeType::Backup {
            return remove_archive(&path);
        }
        if p.format == "subvol" {
            if path.exists() {
                std::fs::remove_dir_all(&path).map_err(io_err("unable to remove", &path))?;
            }
        } else {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StorageError::NotFound(format!(
                        "disk image '{}' does not exist",
                        path.display()
                    )));
                }
                Err(e) => return Err(StorageError::io("unable to remove", &path, e)),
            }
        }
        if p.vtype == VolumeType::Images
            && let Some(dir) = path.parent()
        {
            // Only succeeds when the directory is empty, as PVE's rmdir.
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let images = self.subdir(VolumeType::Images)?;
        let mut res = Vec::new();
        let Ok(vmdirs) = std::fs::read_dir(&images) else {
            return Ok(res);
        };
        let mut vmdirs: Vec<_> = vmdirs.filter_map(|e| e.ok()).collect();
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
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(parsed) = volid::parse_name_dir(&name) else {
                    continue;
                };
                let format = parsed.format;
                let path = f.path();
                let (size, used) = self.image_size(&path, &format).await?;
                let volname = format!("{owner}/{name}");
                let content = if format == "subvol" {
                    "rootdir"
                } else {
                    "images"
                };
                let mut info = VolumeInfo::new(self.volid(&volname), content, &format, size);
                info.used = Some(used);
                info.vmid = Some(owner);
                use std::os::unix::fs::MetadataExt;
                info.ctime = std::fs::symlink_metadata(&path).ok().map(|m| m.ctime());
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
        for c in content {
            match c {
                ContentType::Backup => res.extend(self.list_backups(vmid)?),
                ContentType::Vztmpl if vmid.is_none() => {
                    res.extend(self.list_plain(VolumeType::Vztmpl)?)
                }
                ContentType::Iso if vmid.is_none() => res.extend(self.list_plain(VolumeType::Iso)?),
                ContentType::Snippets if vmid.is_none() => {
                    res.extend(self.list_plain(VolumeType::Snippets)?);
                }
                _ => {}
            }
        }
        Ok(res)
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let path = self.path(volname, snapname).await?;
        if path.symlink_metadata().is_err() {
            return Err(StorageError::NotFound(format!(
                "volume '{}' does not exist",
                self.volid(volname)
            )));
        }
        Ok(())
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let p = self.parse_volname(volname)?;
        let path = self.filesystem_path(&p)?;
        Ok(self.image_size(&path, &p.format).await?.0)
    }

    async fn volume_resize(&self, volname: &str, size_bytes: u64) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let path = self.filesystem_path(&p)?;
        match p.format.as_str() {
            "raw" => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("unable to open image", &path))?;
                f.set_len(size_bytes)
                    .map_err(io_err("unable to resize image", &path))?;
                f.sync_all().map_err(io_err("unable to sync image", &path))
            }
            "qcow2" => {
                self.runner
                    .run(
                        &Cmd::new(QEMU_IMG)
                            .args(["resize", "-f", "qcow2"])
                            .arg(&path)
                            .arg(size_bytes.to_string())
                            .timeout(std::time::Duration::from_secs(10)),
                    )
                    .await?;
                Ok(())
            }
            _ => Err(StorageError::Unsupported(
                "can't resize this image format".into(),
            )),
        }
    }

    async fn create_base(&self, volname: &str) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if p.vtype != VolumeType::Images {
            return Err(StorageError::Invalid(
                "create_base not possible with types other than images".into(),
            ));
        }
        if p.is_base {
            return Err(StorageError::Invalid(
                "create_base not possible with base image".into(),
            ));
        }
        let path = self.filesystem_path(&p)?;
        let newname = p.name.replacen("vm-", "base-", 1);
        if newname == p.name {
            return Err(StorageError::Invalid(format!(
                "create_base not possible with volume '{volname}'"
            )));
        }
        let newpath = path.with_file_name(&newname);
        if newpath.exists() {
            return Err(StorageError::AlreadyExists(format!(
                "file '{}' already exists",
                newpath.display()
            )));
        }
        std::fs::rename(&path, &newpath).map_err(io_err("rename failed for", &path))?;
        std::fs::set_permissions(&newpath, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err("unable to chmod", &newpath))?;
        self.runner
            .run(&Cmd::new(CHATTR).arg("+i").arg(&newpath))
            .await?;
        Ok(format!("{}/{newname}", p.vmid.unwrap_or_default()))
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
        self.subdir(VolumeType::Backup).ok()
    }
}
