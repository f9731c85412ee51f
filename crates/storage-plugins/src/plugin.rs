//! The storage plugin trait: one implementation per backend.
//!
//! Method names follow PVE's plugin API (`alloc_image`, `free_image`, `volume_snapshot`, …)
//! where a concept maps one to one, so behaviour can be compared with `PVE::Storage::Plugin`.
//! Volume names (`volname`) are the part of a volume id after `STORAGE:`. Allocation sizes
//! are in KiB, resize sizes in bytes, as in PVE.
//!
//! Capabilities are data: [`StoragePlugin::volume_has_feature`] answers from a per-backend
//! table ([`FeatureTable`]), never from scattered type checks. Operations a backend cannot do
//! have default implementations that return [`StorageError::Unsupported`] with PVE's message.
//!
//! The trait is async (external commands with timeouts and cancellation); byte streaming
//! is not done through it.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::{ContentType, StorageSection};
use crate::error::{Result, StorageError};
use crate::volid::ParsedVolname;

/// A volume feature, as asked by `volume_has_feature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// Take snapshots.
    Snapshot,
    /// Linked clone.
    Clone,
    /// Convert to a base (template) volume.
    Template,
    /// Full copy.
    Copy,
    /// Allocation that starts out zeroed without writing.
    SparseInit,
    /// Storage replication.
    Replicate,
    /// Rename.
    Rename,
}

impl Feature {
    /// PVE's name of the feature.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Snapshot => "snapshot",
            Feature::Clone => "clone",
            Feature::Template => "template",
            Feature::Copy => "copy",
            Feature::SparseInit => "sparseinit",
            Feature::Replicate => "replicate",
            Feature::Rename => "rename",
        }
    }
}

/// Which state of a volume a feature is asked for: a snapshot, a base volume, or the current
/// state of a normal volume (PVE's `snap` / `base` / `current` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeState {
    /// The current state of a normal volume.
    Current,
    /// A base (template) volume.
    Base,
    /// A snapshot.
    Snap,
}

impl VolumeState {
    /// The key PVE uses: `snap` if a snapshot is named, else `base` for base volumes, else
    /// `current`.
    #[must_use]
    pub fn of(is_base: bool, snapname: Option<&str>) -> Self {
        match (snapname, is_base) {
            (Some(_), _) => VolumeState::Snap,
            (None, true) => VolumeState::Base,
            (None, false) => VolumeState::Current,
        }
    }
}

/// A capability table: for each feature and state, the formats that have it (`None` = any
/// format).
#[derive(Debug, Clone, Copy)]
pub struct FeatureTable(pub &'static [(Feature, VolumeState, Option<&'static [&'static str]>)]);

impl FeatureTable {
    /// Whether `feature` is available for a volume of `format` in `state`.
    #[must_use]
    pub fn has(&self, feature: Feature, state: VolumeState, format: &str) -> bool {
        self.0.iter().any(|(f, s, formats)| {
            *f == feature && *s == state && formats.is_none_or(|fs| fs.contains(&format))
        })
    }
}

/// One volume as listed by `list_images` / `list_volumes` (the JSON fields of
/// `pvesm list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    /// `STORAGE:VOLNAME`
    pub volid: String,
    /// Content type (`images`, `rootdir`, `backup`, `vztmpl`, `iso`, `snippets`).
    pub content: String,
    /// Format (`raw`, `subvol`, `qcow2`, `tar.zst`, `tgz`, `iso`, …).
    pub format: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes used, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// Owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// Base volume of a linked clone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Creation time (seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctime: Option<i64>,
    /// Backup guest type (`lxc`, `qemu`, `openvz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtype: Option<String>,
    /// First line of a backup's notes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Whether a backup is protected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
}

impl VolumeInfo {
    /// A volume with only the mandatory fields set.
    #[must_use]
    pub fn new(volid: String, content: &str, format: &str, size: u64) -> Self {
        Self {
            volid,
            content: content.to_string(),
            format: format.to_string(),
            size,
            used: None,
            vmid: None,
            parent: None,
            ctime: None,
            subtype: None,
            notes: None,
            protected: None,
        }
    }
}

/// Usage of a storage, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StorageStatus {
    /// Total size.
    pub total: u64,
    /// Available to allocate.
    pub avail: u64,
    /// In use.
    pub used: u64,
    /// Whether the storage is reachable and active.
    pub active: bool,
}

/// How a container uses a volume's storage object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAccess {
    /// A directory, bind-mounted (dir `subvol`, zfs datasets).
    Directory(PathBuf),
    /// A regular file holding a filesystem image, mounted through a loop device.
    ImageFile(PathBuf),
    /// A block device holding a filesystem.
    BlockDevice(PathBuf),
}

/// A backup volume attribute (`notes`, `protected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeAttribute {
    /// Free text notes (`<archive>.notes`).
    Notes,
    /// Protection against pruning and removal (`<archive>.protected`).
    Protected,
}

/// PVE's check of a requested volume name for `vmid`: it must start with `vm-<vmid>-`.
///
/// # Errors
/// "illegal name '<name>' - should be 'vm-<vmid>-*'".
pub fn check_vm_volume_name(vmid: u32, name: &str) -> Result<()> {
    if name.starts_with(&format!("vm-{vmid}-")) {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "illegal name '{name}' - should be 'vm-{vmid}-*'"
        )))
    }
}

impl VolumeAttribute {
    /// Reads the attribute kept in the file `path` (`<archive>.notes`, `<archive>.protected`):
    /// the notes text, `1` for a protected backup, `None` when the file does not exist.
    ///
    /// # Errors
    /// When the notes file exists but cannot be read.
    pub fn read_file(self, path: &std::path::Path) -> Result<Option<String>> {
        match self {
            VolumeAttribute::Protected => Ok(path.exists().then(|| "1".to_string())),
            VolumeAttribute::Notes => match std::fs::read_to_string(path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StorageError::io("unable to read", path, e)),
            },
        }
    }

    /// Writes the attribute into the file `path`, or removes the file for an empty value,
    /// `None` or (protection) `0`.
    ///
    /// # Errors
    /// When the file cannot be written or removed.
    pub fn write_file(self, path: &std::path::Path, value: Option<&str>) -> Result<()> {
        let enable = match self {
            VolumeAttribute::Protected => value.is_some_and(|v| v != "0" && !v.is_empty()),
            VolumeAttribute::Notes => value.is_some_and(|v| !v.is_empty()),
        };
        if enable {
            let text = if self == VolumeAttribute::Notes {
                value.unwrap_or_default()
            } else {
                ""
            };
            std::fs::write(path, text).map_err(|e| StorageError::io("unable to write", path, e))
        } else {
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StorageError::io("unable to remove", path, e)),
            }
        }
    }
}

/// One storage backend bound to one `storage.cfg` section.
#[async_trait::async_trait]
pub trait StoragePlugin: Send + Sync + std::fmt::Debug {
    /// The `storage.cfg` section this backend serves.
    fn section(&self) -> &StorageSection;

    /// The storage id (`local`).
    fn id(&self) -> &str {
        self.section().id()
    }

    /// The type name in `storage.cfg` (`dir`).
    fn storage_type(&self) -> &'static str;

    /// Content types this storage is configured for.
    fn content(&self) -> Vec<ContentType> {
        self.section().content().iter().copied().collect()
    }

    /// Splits a volume name into its parts.
    ///
    /// # Errors
    /// PVE's "unable to parse … volume name" messages.
    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname>;

    /// The capability table of this backend.
    fn features(&self) -> FeatureTable;

    /// Whether `feature` is available for `volname` (at `snapname`).
    ///
    /// # Errors
    /// When the volume name does not parse.
    fn volume_has_feature(
        &self,
        feature: Feature,
        volname: &str,
        snapname: Option<&str>,
    ) -> Result<bool> {
        let p = self.parse_volname(volname)?;
        Ok(self
            .features()
            .has(feature, VolumeState::of(p.is_base, snapname), &p.format))
    }

    /// Whether containers may mount this storage's volumes. PVE's rule is content `rootdir`;
    /// iSCSI storages override it: a whole existing LUN can be a container mount point
    /// although the storage has no `rootdir` content.
    fn container_mountable(&self) -> bool {
        self.content().contains(&ContentType::Rootdir)
    }

    /// Whether snapshots of running containers' volumes need a filesystem freeze (RBD).
    fn volume_snapshot_needs_fsfreeze(&self) -> bool {
        false
    }

    /// Makes the storage usable (mount, import, create directories).
    ///
    /// # Errors
    /// When the storage is unreachable.
    async fn activate_storage(&self) -> Result<()>;

    /// Releases what `activate_storage` set up, where that means anything.
    ///
    /// # Errors
    /// Backend-specific.
    async fn deactivate_storage(&self) -> Result<()> {
        Ok(())
    }

    /// Usage of the storage.
    ///
    /// # Errors
    /// When it cannot be queried.
    async fn status(&self) -> Result<StorageStatus>;

    /// The host path of a volume (or of its snapshot).
    ///
    /// # Errors
    /// When the name does not parse or a snapshot path does not exist for this backend.
    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf>;

    /// How a container reaches the volume (after `activate_volume`).
    ///
    /// # Errors
    /// As [`StoragePlugin::path`].
    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess>;

    /// Creates a volume of `size_kib` KiB; returns its volume name.
    ///
    /// # Errors
    /// When the name is taken or invalid, or the backend fails.
    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String>;

    /// Deletes a volume.
    ///
    /// # Errors
    /// When it does not exist or cannot be removed.
    async fn free_image(&self, volname: &str) -> Result<()>;

    /// Lists the volumes of guests (`images`/`rootdir` content), optionally of one owner.
    ///
    /// # Errors
    /// When the storage cannot be read.
    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>>;

    /// Lists volumes of the given content types (backups, templates, ISOs, snippets come from
    /// directory scans on file storages).
    ///
    /// # Errors
    /// When the storage cannot be read.
    async fn list_volumes(
        &self,
        vmid: Option<u32>,
        content: &[ContentType],
    ) -> Result<Vec<VolumeInfo>> {
        if content
            .iter()
            .any(|c| matches!(c, ContentType::Images | ContentType::Rootdir))
        {
            self.list_images(vmid).await
        } else {
            Ok(Vec::new())
        }
    }

    /// Makes a volume (or snapshot) accessible.
    ///
    /// # Errors
    /// "volume 'S:V' does not exist" and backend errors.
    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()>;

    /// Undoes `activate_volume` where that means anything.
    ///
    /// # Errors
    /// Backend-specific.
    async fn deactivate_volume(&self, _volname: &str, _snapname: Option<&str>) -> Result<()> {
        Ok(())
    }

    /// The size of a volume in bytes.
    ///
    /// # Errors
    /// When the volume does not exist.
    async fn volume_size_info(&self, volname: &str) -> Result<u64>;

    /// Grows a volume to `size_bytes` (the caller rounds up to KiB).
    ///
    /// # Errors
    /// When the backend cannot resize this volume.
    async fn volume_resize(&self, volname: &str, size_bytes: u64) -> Result<()>;

    /// Takes a snapshot.
    ///
    /// # Errors
    /// Unsupported unless the backend overrides it.
    async fn volume_snapshot(&self, _volname: &str, _snap: &str) -> Result<()> {
        Err(StorageError::Unsupported(
            "can't snapshot this image format".into(),
        ))
    }

    /// Checks that rolling back to `snap` is possible; returns the newer snapshots that
    /// would block it (empty if none).
    ///
    /// # Errors
    /// PVE's messages when the rollback is impossible.
    async fn volume_rollback_is_possible(
        &self,
        _volname: &str,
        _snap: &str,
    ) -> Result<Vec<String>> {
        Err(StorageError::Unsupported(
            "can't rollback snapshot this image format".into(),
        ))
    }

    /// Rolls a volume back to a snapshot.
    ///
    /// # Errors
    /// Unsupported unless the backend overrides it.
    async fn volume_snapshot_rollback(&self, _volname: &str, _snap: &str) -> Result<()> {
        Err(StorageError::Unsupported(
            "can't rollback snapshot this image format".into(),
        ))
    }

    /// Deletes a snapshot.
    ///
    /// # Errors
    /// Unsupported unless the backend overrides it.
    async fn volume_snapshot_delete(&self, _volname: &str, _snap: &str) -> Result<()> {
        Err(StorageError::Unsupported(
            "can't delete snapshot for this image format".into(),
        ))
    }

    /// Lists a volume's snapshots, oldest first.
    ///
    /// # Errors
    /// Backend-specific.
    async fn volume_snapshot_list(&self, _volname: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Creates a linked clone of a base volume (or snapshot) for `vmid`; returns the new
    /// volume name.
    ///
    /// # Errors
    /// Unsupported unless the backend overrides it.
    async fn clone_image(&self, _volname: &str, _vmid: u32, _snap: Option<&str>) -> Result<String> {
        Err(StorageError::Unsupported(
            "clone_image is not implemented for this storage".into(),
        ))
    }

    /// Converts a volume into a base (template) volume; returns the new volume name.
    ///
    /// # Errors
    /// Unsupported unless the backend overrides it.
    async fn create_base(&self, _volname: &str) -> Result<String> {
        Err(StorageError::Unsupported(
            "create_base is not implemented for this storage".into(),
        ))
    }

    /// Reads a backup volume attribute.
    ///
    /// # Errors
    /// Unsupported unless the backend stores attributes.
    async fn get_volume_attribute(
        &self,
        _volname: &str,
        _attr: VolumeAttribute,
    ) -> Result<Option<String>> {
        Ok(None)
    }

    /// Writes (or with `None` removes) a backup volume attribute.
    ///
    /// # Errors
    /// Unsupported unless the backend stores attributes.
    async fn update_volume_attribute(
        &self,
        _volname: &str,
        _attr: VolumeAttribute,
        _value: Option<&str>,
    ) -> Result<()> {
        Err(StorageError::Unsupported(
            "attributes are not supported on this storage".into(),
        ))
    }

    /// Applies a mount point's `acl` option to the volume itself, for backends that keep ACL
    /// support as a volume property (zfs `acltype`, set before the dataset is bind-mounted).
    /// A no-op elsewhere, where `acl` is a mount option.
    ///
    /// # Errors
    /// When the backend cannot honour the setting.
    async fn set_volume_acl(
        &self,
        _volname: &str,
        _snapname: Option<&str>,
        _enabled: bool,
    ) -> Result<()> {
        Ok(())
    }

    /// The directory backups are written to, for storages that hold backup archives as files.
    fn backup_dir(&self) -> Option<PathBuf> {
        None
    }
}
