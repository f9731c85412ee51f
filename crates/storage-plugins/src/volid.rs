//! Volume identifiers and volume names: `STOREID:VOLNAME`, VMIDs, the per-plugin
//! `parse_volname` regexes, dir-storage subdirectories and paths, and free disk names.
//!
//! Compatibility target: pve-storage 0c56bad (`PVE::Storage::parse_volume_id`,
//! `Plugin::parse_volname`/`parse_name_dir`/`get_subdir`/`filesystem_path`/
//! `get_next_vm_diskname`, `LvmThinPlugin`/`ZFSPoolPlugin`/`RBDPlugin::parse_volname`,
//! `PVE::Storage::path_to_volume_id`). Error messages are PVE's, without the trailing
//! newline.
//!
//! Formats:
//! * volume id: `^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$` (case-insensitive)
//! * dir volnames: `<vmid>/<name>`, `<basevmid>/<basename>/<vmid>/<name>` (linked clone),
//!   `iso/<f>.iso|img`, `vztmpl/<f>.tar[.gz|.xz|.zst|.bz2]`, `backup/<f>.<BACKUP_EXT>`,
//!   `snippets/<f>`, `import/<f>.(ova|ovf|qcow2|raw|vmdk)`, `import/<f>.ova/<disk>`,
//!   legacy `rootdir/<vmid>`.
//!
//! Regex notes: Perl's `\d`, `\s`, `\S` are ASCII here (Rust's are Unicode), and `$` means end
//! of string (Perl's `$` also accepts one trailing newline — vzkit rejects such input).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;

use crate::backup;
use crate::config::StorageConfig;

/// Perl `\S` on byte strings: anything but ASCII whitespace.
pub(crate) const NS: &str = r"[^ \t\n\r\x0B\x0C]";
/// `$SAFE_CHAR_WITH_WHITESPACE_CLASS_RE`.
const SAFE_WS: &str = r"[ a-zA-Z0-9\-.+=_]";

/// Most volumes a guest may have on one storage (`$MAX_VOLUMES_PER_GUEST`).
pub const MAX_VOLUMES_PER_GUEST: u32 = 1024;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static regex must compile")
}

static STORAGE_ID_RE: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^[a-z][a-z0-9\-_.]*[a-z0-9]$"));
static VOLUME_ID_RE: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$"));
static VMID_RE: LazyLock<Regex> = LazyLock::new(|| re(r"^[1-9][0-9]{2,8}$"));
static DIGITS_RE: LazyLock<Regex> = LazyLock::new(|| re(r"^[0-9]+$"));
static CONFIGID_RE: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^[a-z][a-z0-9_-]+$"));
static LVM_NAME_RE: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^[a-z0-9][a-z0-9\-_.]*[a-z0-9]$"));

/// Errors of identifier and volume-name handling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("unable to parse volume ID '{0}'")]
    VolumeId(String),
    #[error("storage ID '{0}' contains illegal characters")]
    StorageId(String),
    #[error("VMID '{0}' contains illegal characters")]
    VmidChars(String),
    #[error("value '{0}' does not look like a valid VM ID")]
    Vmid(String),
    #[error("invalid configuration ID '{0}'")]
    ConfigId(String),
    #[error("unable to parse directory volume name '{0}'")]
    DirVolname(String),
    #[error("unable to parse volume filename '{0}'")]
    VolumeFilename(String),
    #[error("'{0}' is a snapshot filename, not a volume!")]
    SnapshotFilename(String),
    #[error("lvm name '{0}' contains illegal characters")]
    LvmName(String),
    #[error("unable to parse lvm volume name '{0}'")]
    LvmVolname(String),
    #[error("unable to parse zfs volume name '{0}'")]
    ZfsVolname(String),
    #[error("unable to parse rbd volume name '{0}'")]
    RbdVolname(String),
    #[error("storage definition has no path")]
    NoPath,
    #[error("unknown vtype '{0}'")]
    UnknownVtype(String),
    #[error("can't snapshot this image format")]
    CantSnapshot,
    #[error("unable to allocate an image name for VM {vmid} in storage '{storeid}'")]
    NoFreeDiskName { vmid: u32, storeid: String },
}

/// `parse_storage_id`: `^[a-z][a-z0-9\-_.]*[a-z0-9]$` (case-insensitive, length >= 2).
///
/// # Errors
/// [`VolumeError::StorageId`] if the id contains illegal characters.
pub fn parse_storage_id(id: &str) -> Result<&str, VolumeError> {
    if STORAGE_ID_RE.is_match(id) {
        Ok(id)
    } else {
        Err(VolumeError::StorageId(id.to_string()))
    }
}

/// `pve-vmid` format: `^[1-9][0-9]{2,8}$` (100 ..= 999999999).
///
/// # Errors
/// [`VolumeError::Vmid`] if the value is not a valid VMID.
pub fn verify_vmid(vmid: &str) -> Result<u32, VolumeError> {
    if VMID_RE.is_match(vmid) {
        vmid.parse()
            .map_err(|_| VolumeError::Vmid(vmid.to_string()))
    } else {
        Err(VolumeError::Vmid(vmid.to_string()))
    }
}

/// `PVE::Storage::parse_vmid`: only checks `^\d+$`. vzkit additionally rejects values that do
/// not fit a `u32` (with the same message).
///
/// # Errors
/// [`VolumeError::VmidChars`].
pub fn parse_vmid(vmid: &str) -> Result<u32, VolumeError> {
    if DIGITS_RE.is_match(vmid) {
        vmid.parse()
            .map_err(|_| VolumeError::VmidChars(vmid.to_string()))
    } else {
        Err(VolumeError::VmidChars(vmid.to_string()))
    }
}

/// `pve-configid`: `^[a-z][a-z0-9_-]+$` (case-insensitive), used for snapshot names.
///
/// # Errors
/// [`VolumeError::ConfigId`].
pub fn verify_configid(id: &str) -> Result<&str, VolumeError> {
    if CONFIGID_RE.is_match(id) {
        Ok(id)
    } else {
        Err(VolumeError::ConfigId(id.to_string()))
    }
}

/// `parse_lvm_name`: `^[a-z0-9][a-z0-9\-_.]*[a-z0-9]$` (case-insensitive).
///
/// # Errors
/// [`VolumeError::LvmName`].
pub fn parse_lvm_name(name: &str) -> Result<&str, VolumeError> {
    if LVM_NAME_RE.is_match(name) {
        Ok(name)
    } else {
        Err(VolumeError::LvmName(name.to_string()))
    }
}

/// A volume id `STOREID:VOLNAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId {
    pub storage: String,
    pub volname: String,
}

impl VolumeId {
    /// `parse_volume_id`.
    ///
    /// # Errors
    /// [`VolumeError::VolumeId`] (`unable to parse volume ID 'X'`).
    pub fn parse(volid: &str) -> Result<Self, VolumeError> {
        let caps = VOLUME_ID_RE
            .captures(volid)
            .ok_or_else(|| VolumeError::VolumeId(volid.to_string()))?;
        Ok(Self {
            storage: caps[1].to_string(),
            volname: caps[2].to_string(),
        })
    }
}

impl FromStr for VolumeId {
    type Err = VolumeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.storage, self.volname)
    }
}

/// Volume type (`vtype`) as returned by `parse_volname`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VolumeType {
    Images,
    Rootdir,
    Iso,
    Vztmpl,
    Backup,
    Snippets,
    Import,
}

impl VolumeType {
    /// All volume types, in `get_vtype_subdirs` order.
    pub const ALL: [VolumeType; 7] = [
        VolumeType::Images,
        VolumeType::Rootdir,
        VolumeType::Iso,
        VolumeType::Vztmpl,
        VolumeType::Backup,
        VolumeType::Snippets,
        VolumeType::Import,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeType::Images => "images",
            VolumeType::Rootdir => "rootdir",
            VolumeType::Iso => "iso",
            VolumeType::Vztmpl => "vztmpl",
            VolumeType::Backup => "backup",
            VolumeType::Snippets => "snippets",
            VolumeType::Import => "import",
        }
    }

    /// Default subdirectory of a dir-style storage (`$vtype_subdirs`).
    pub fn default_subdir(self) -> &'static str {
        match self {
            VolumeType::Images => "images",
            VolumeType::Rootdir => "private",
            VolumeType::Iso => "template/iso",
            VolumeType::Vztmpl => "template/cache",
            VolumeType::Backup => "dump",
            VolumeType::Snippets => "snippets",
            VolumeType::Import => "import",
        }
    }
}

impl fmt::Display for VolumeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VolumeType {
    type Err = VolumeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VolumeType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| VolumeError::UnknownVtype(s.to_string()))
    }
}

/// The 7-tuple `($vtype, $name, $vmid, $basename, $basevmid, $isBase, $format)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedVolname {
    pub vtype: VolumeType,
    pub name: String,
    pub vmid: Option<u32>,
    pub basename: Option<String>,
    pub basevmid: Option<u32>,
    pub is_base: bool,
    /// Volume format (`raw`, `qcow2`, `subvol`, `ova+vmdk`, ...). Empty for the legacy
    /// `rootdir/<vmid>` volumes, where PVE returns `undef`.
    pub format: String,
}

impl ParsedVolname {
    fn simple(vtype: VolumeType, name: &str, format: &str) -> Self {
        Self {
            vtype,
            name: name.to_string(),
            vmid: None,
            basename: None,
            basevmid: None,
            is_base: false,
            format: format.to_string(),
        }
    }
}

/// Result of [`parse_name_dir`]: `(name, format, isBase)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirImageName {
    pub name: String,
    pub format: String,
    pub is_base: bool,
}

static NAME_DIR_RE: LazyLock<Regex> = LazyLock::new(|| {
    re(r"^((vm-|base-|subvol-)([0-9]+)-[^/ \t\n\r\x0B\x0C]+\.(raw|qcow2|vmdk|subvol))$")
});
static NAME_DIR_SNAP_RE: LazyLock<Regex> = LazyLock::new(|| re(r"^snap-.*\.qcow2$"));
static NAME_DIR_LEGACY_RE: LazyLock<Regex> =
    LazyLock::new(|| re(r"^((base-)?[^/ \t\n\r\x0B\x0C]+\.(raw|qcow2|vmdk|subvol))$"));

/// `parse_name_dir`: the file name of a dir-storage image.
///
/// # Errors
/// [`VolumeError::SnapshotFilename`] for `snap-*.qcow2`, else [`VolumeError::VolumeFilename`].
pub fn parse_name_dir(name: &str) -> Result<DirImageName, VolumeError> {
    if let Some(c) = NAME_DIR_RE.captures(name) {
        return Ok(DirImageName {
            name: c[1].to_string(),
            format: c[4].to_string(),
            is_base: &c[2] == "base-",
        });
    }
    if NAME_DIR_SNAP_RE.is_match(name) {
        return Err(VolumeError::SnapshotFilename(name.to_string()));
    }
    if let Some(c) = NAME_DIR_LEGACY_RE.captures(name) {
        return Ok(DirImageName {
            name: c[1].to_string(),
            format: c[3].to_string(),
            is_base: c.get(2).is_some(),
        });
    }
    Err(VolumeError::VolumeFilename(name.to_string()))
}

static DIR_LINKED_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^([0-9]+)/({NS}+)/([0-9]+)/({NS}+)$")));
static DIR_IMAGE_RE: LazyLock<Regex> = LazyLock::new(|| re(&format!(r"^([0-9]+)/({NS}+)$")));
static DIR_ISO_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^iso/([^/]+{})$", backup::ISO_EXT_RE)));
static DIR_VZTMPL_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^vztmpl/([^/]+{})$", backup::VZTMPL_EXT_RE)));
static DIR_ROOTDIR_RE: LazyLock<Regex> = LazyLock::new(|| re(r"^rootdir/([0-9]+)$"));
static DIR_BACKUP_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^backup/([^/]+{})$", backup::BACKUP_EXT_RE)));
static BACKUP_VMID_RE: LazyLock<Regex> =
    LazyLock::new(|| re(r"^vzdump-(openvz|lxc|qemu)-([0-9]+)-.+"));
static DIR_SNIPPETS_RE: LazyLock<Regex> = LazyLock::new(|| re(r"^snippets/([^/]+)$"));
static DIR_IMPORT_OVA_RE: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"^import/({SAFE_WS}+\.ova/{SAFE_WS}+\.(qcow2|raw|vmdk))$"
    ))
});
static DIR_IMPORT_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^import/({SAFE_WS}+\.(ova|ovf|qcow2|raw|vmdk))$")));

fn dir_vmid(digits: &str, volname: &str) -> Result<u32, VolumeError> {
    digits
        .parse()
        .map_err(|_| VolumeError::DirVolname(volname.to_string()))
}

/// Dir-style (`Plugin`) `parse_volname`, used by dir, nfs, cifs, cephfs, btrfs, dedup.
///
/// # Errors
/// `unable to parse directory volume name 'X'`, or the [`parse_name_dir`] errors for image
/// names. VMIDs that do not fit a `u32` are reported as unparsable volume names.
pub fn parse_volname_dir(volname: &str) -> Result<ParsedVolname, VolumeError> {
    if let Some(c) = DIR_LINKED_RE.captures(volname) {
        let basevmid = dir_vmid(&c[1], volname)?;
        parse_name_dir(&c[2])?;
        let vmid = dir_vmid(&c[3], volname)?;
        let image = parse_name_dir(&c[4])?;
        return Ok(ParsedVolname {
            vtype: VolumeType::Images,
            name: c[4].to_string(),
            vmid: Some(vmid),
            basename: Some(c[2].to_string()),
            basevmid: Some(basevmid),
            is_base: image.is_base,
            format: image.format,
        });
    }
    if let Some(c) = DIR_IMAGE_RE.captures(volname) {
        let vmid = dir_vmid(&c[1], volname)?;
        let image = parse_name_dir(&c[2])?;
        return Ok(ParsedVolname {
            vtype: VolumeType::Images,
            name: c[2].to_string(),
            vmid: Some(vmid),
            basename: None,
            basevmid: None,
            is_base: image.is_base,
            format: image.format,
        });
    }
    if let Some(c) = DIR_ISO_RE.captures(volname) {
        return Ok(ParsedVolname::simple(VolumeType::Iso, &c[1], "raw"));
    }
    if let Some(c) = DIR_VZTMPL_RE.captures(volname) {
        return Ok(ParsedVolname::simple(VolumeType::Vztmpl, &c[1], "raw"));
    }
    if let Some(c) = DIR_ROOTDIR_RE.captures(volname) {
        let vmid = dir_vmid(&c[1], volname)?;
        let mut p = ParsedVolname::simple(VolumeType::Rootdir, &c[1], "");
        p.vmid = Some(vmid);
        return Ok(p);
    }
    if let Some(c) = DIR_BACKUP_RE.captures(volname) {
        let file = &c[1];
        let mut p = ParsedVolname::simple(VolumeType::Backup, file, "raw");
        if let Some(v) = BACKUP_VMID_RE.captures(file) {
            p.vmid = Some(dir_vmid(&v[2], volname)?);
        }
        return Ok(p);
    }
    if let Some(c) = DIR_SNIPPETS_RE.captures(volname) {
        return Ok(ParsedVolname::simple(VolumeType::Snippets, &c[1], "raw"));
    }
    if let Some(c) = DIR_IMPORT_OVA_RE.captures(volname) {
        return Ok(ParsedVolname::simple(
            VolumeType::Import,
            &c[1],
            &format!("ova+{}", &c[2]),
        ));
    }
    if let Some(c) = DIR_IMPORT_RE.captures(volname) {
        return Ok(ParsedVolname::simple(VolumeType::Import, &c[1], &c[2]));
    }
    Err(VolumeError::DirVolname(volname.to_string()))
}

static LVMTHIN_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^((vm|base)-([0-9]+)-{NS}+)$")));

/// `LvmThinPlugin::parse_volname`: `parse_lvm_name`, then `^((vm|base)-(\d+)-\S+)$`.
///
/// # Errors
/// `lvm name 'X' contains illegal characters` or `unable to parse lvm volume name 'X'`.
pub fn parse_volname_lvmthin(volname: &str) -> Result<ParsedVolname, VolumeError> {
    parse_lvm_name(volname)?;
    let c = LVMTHIN_RE
        .captures(volname)
        .ok_or_else(|| VolumeError::LvmVolname(volname.to_string()))?;
    let vmid = c[3]
        .parse()
        .map_err(|_| VolumeError::LvmVolname(volname.to_string()))?;
    Ok(ParsedVolname {
        vtype: VolumeType::Images,
        name: c[1].to_string(),
        vmid: Some(vmid),
        basename: None,
        basevmid: None,
        is_base: &c[2] == "base",
        format: "raw".to_string(),
    })
}

static ZFS_RE: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"^(((base|basevol)-([0-9]+)-{NS}+)/)?((base|basevol|vm|subvol)-([0-9]+)-{NS}+)$"
    ))
});

/// `ZFSPoolPlugin::parse_volname`.
///
/// # Errors
/// `unable to parse zfs volume name 'X'`.
pub fn parse_volname_zfspool(volname: &str) -> Result<ParsedVolname, VolumeError> {
    let err = || VolumeError::ZfsVolname(volname.to_string());
    let c = ZFS_RE.captures(volname).ok_or_else(err)?;
    let kind = &c[6];
    let basevmid = match c.get(4) {
        Some(m) => Some(m.as_str().parse().map_err(|_| err())?),
        None => None,
    };
    Ok(ParsedVolname {
        vtype: VolumeType::Images,
        name: c[5].to_string(),
        vmid: Some(c[7].parse().map_err(|_| err())?),
        basename: c.get(2).map(|m| m.as_str().to_string()),
        basevmid,
        is_base: kind == "base" || kind == "basevol",
        format: if kind == "subvol" || kind == "basevol" {
            "subvol"
        } else {
            "raw"
        }
        .to_string(),
    })
}

static RBD_RE: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"^((base-([0-9]+)-{NS}+)/)?((base)?(vm)?-([0-9]+)-{NS}+)$"
    ))
});

/// `RBDPlugin::parse_volname`: `^((base-(\d+)-\S+)\/)?((base)?(vm)?-(\d+)-\S+)$`.
///
/// # Errors
/// `unable to parse rbd volume name 'X'`.
pub fn parse_volname_rbd(volname: &str) -> Result<ParsedVolname, VolumeError> {
    let err = || VolumeError::RbdVolname(volname.to_string());
    let c = RBD_RE.captures(volname).ok_or_else(err)?;
    let basevmid = match c.get(3) {
        Some(m) => Some(m.as_str().parse().map_err(|_| err())?),
        None => None,
    };
    Ok(ParsedVolname {
        vtype: VolumeType::Images,
        name: c[4].to_string(),
        vmid: Some(c[7].parse().map_err(|_| err())?),
        basename: c.get(2).map(|m| m.as_str().to_string()),
        basevmid,
        is_base: c.get(5).is_some(),
        format: "raw".to_string(),
    })
}

/// `Plugin::get_subdir`: `<path>/<content-dirs override // default subdir>`.
///
/// `content_dirs` maps a vtype name to a path relative to `path`.
///
/// # Errors
/// `storage definition has no path` (checked first), `unknown vtype 'X'`.
pub fn get_subdir(
    path: Option<&str>,
    content_dirs: &BTreeMap<String, String>,
    vtype: &str,
) -> Result<String, VolumeError> {
    let path = path.filter(|p| !p.is_empty()).ok_or(VolumeError::NoPath)?;
    let vt: VolumeType = vtype.parse()?;
    let subdir = content_dirs
        .get(vtype)
        .map(String::as_str)
        .unwrap_or(vt.default_subdir());
    Ok(format!("{path}/{subdir}"))
}

/// Result of [`filesystem_path`]: PVE's list-context `($path, $vmid, $vtype)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePath {
    pub path: PathBuf,
    pub owner: Option<u32>,
    pub vtype: VolumeType,
}

/// Dir-style `filesystem_path`: images live in `<images subdir>/<vmid>/<name>`, everything
/// else in `<subdir>/<name>`. A snapshot name is only accepted for qcow2/qed images (the
/// snapshot is internal, so the path is the same). `snapshot-as-volume-chain` is not
/// supported by vzkit.
///
/// # Errors
/// The [`parse_volname_dir`] errors, `can't snapshot this image format`, and the
/// [`get_subdir`] errors.
pub fn filesystem_path(
    path: Option<&str>,
    content_dirs: &BTreeMap<String, String>,
    volname: &str,
    snapname: Option<&str>,
) -> Result<VolumePath, VolumeError> {
    let p = parse_volname_dir(volname)?;
    if snapname.is_some() && !(p.format == "qcow2" || p.format == "qed") {
        return Err(VolumeError::CantSnapshot);
    }
    let mut dir = get_subdir(path, content_dirs, p.vtype.as_str())?;
    if p.vtype == VolumeType::Images
        && let Some(vmid) = p.vmid
    {
        dir = format!("{dir}/{vmid}");
    }
    Ok(VolumePath {
        path: PathBuf::from(format!("{dir}/{}", p.name)),
        owner: p.vmid,
        vtype: p.vtype,
    })
}

/// `PVE::Storage::path_to_volume_id` as a pure function.
///
/// A volume id is returned unchanged (after checking it parses on a path-based storage);
/// otherwise `path` is matched against the content subdirectories of every path-based
/// storage, in config order. PVE canonicalizes the path with `abs_path` first — callers that
/// want that must canonicalize themselves; here trailing slashes are stripped. PVE checks
/// image paths against `list_images`; here the image name must satisfy [`parse_name_dir`].
///
/// Returns `None` where PVE returns `('')`.
///
/// # Errors
/// Only for a volume id whose volname does not parse ([`parse_volname_dir`]).
pub fn path_to_volume_id(
    cfg: &StorageConfig,
    path: &str,
) -> Result<Option<(VolumeType, String)>, VolumeError> {
    if let Ok(volid) = VolumeId::parse(path) {
        if let Some(scfg) = cfg.get(&volid.storage)
            && scfg.path().is_some()
        {
            let p = parse_volname_dir(&volid.volname)?;
            return Ok(Some((p.vtype, path.to_string())));
        }
        return Ok(None);
    }

    let trimmed = path.trim_end_matches('/');
    let path = if trimmed.is_empty() { path } else { trimmed };

    for scfg in cfg.sections() {
        let Some(base) = scfg.get("path") else {
            continue;
        };
        let dirs = scfg.content_dirs();
        let sid = scfg.id();
        let sub = |vt: VolumeType| get_subdir(Some(base), dirs, vt.as_str());
        let rel = |vt: VolumeType| -> Result<Option<String>, VolumeError> {
            let dir = sub(vt)?;
            Ok(path
                .strip_prefix(dir.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .map(str::to_string))
        };

        if let Some(r) = rel(VolumeType::Images)?
            && let Some((vmid, name)) = r.split_once('/')
            && DIGITS_RE.is_match(vmid)
            && !name.is_empty()
            && !name.contains('/')
            && !name.chars().any(is_perl_space)
        {
            // PVE's branch for this pattern consults list_images and otherwise moves on
            // to the next storage.
            if parse_name_dir(name).is_ok() {
                return Ok(Some((VolumeType::Images, format!("{sid}:{vmid}/{name}"))));
            }
            continue;
        }
        let file_in = |r: &str, re: &Regex| !r.contains('/') && re.is_match(r);
        if let Some(r) = rel(VolumeType::Iso)?
            && file_in(&r, &ISO_FILE_RE)
        {
            return Ok(Some((VolumeType::Iso, format!("{sid}:iso/{r}"))));
        }
        if let Some(r) = rel(VolumeType::Vztmpl)?
            && file_in(&r, &VZTMPL_FILE_RE)
        {
            return Ok(Some((VolumeType::Vztmpl, format!("{sid}:vztmpl/{r}"))));
        }
        if let Some(r) = rel(VolumeType::Rootdir)?
            && DIGITS_RE.is_match(&r)
        {
            return Ok(Some((VolumeType::Rootdir, format!("{sid}:rootdir/{r}"))));
        }
        if let Some(r) = rel(VolumeType::Backup)?
            && file_in(&r, &BACKUP_FILE_RE)
        {
            return Ok(Some((VolumeType::Backup, format!("{sid}:backup/{r}"))));
        }
        if let Some(r) = rel(VolumeType::Snippets)?
            && !r.is_empty()
            && !r.contains('/')
        {
            return Ok(Some((VolumeType::Snippets, format!("{sid}:snippets/{r}"))));
        }
        if let Some(r) = rel(VolumeType::Import)?
            && IMPORT_FILE_RE.is_match(&r)
        {
            return Ok(Some((VolumeType::Import, format!("{sid}:import/{r}"))));
        }
    }
    Ok(None)
}

fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

static ISO_FILE_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^[^/]+{}$", backup::ISO_EXT_RE)));
static VZTMPL_FILE_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^[^/]+{}$", backup::VZTMPL_EXT_RE)));
static BACKUP_FILE_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^[^/]+{}$", backup::BACKUP_EXT_RE)));
static IMPORT_FILE_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^{SAFE_WS}+\.(ova|ovf|qcow2|raw|vmdk)$")));

/// `get_next_vm_diskname`: the first free `<prefix>-<vmid>-disk-<N><suffix>` for N in
/// 0..1024, where prefix is `subvol` for format `subvol` else `vm`, and suffix is `.<fmt>`
/// if `add_fmt_suffix`.
///
/// `existing` are volids or names; a number is taken if any of them matches
/// `(vm|base)-<vmid>-disk-(\d+)<suffix>` anywhere (unanchored, like PVE), or, when the plugin
/// supports subvols (`subvol_aware`: dir, zfspool, btrfs),
/// `(vm|base|subvol|basevol)-<vmid>-disk-(\d+)` without suffix. As in PVE, `disk-01` does not
/// block `disk-1`. The suffix is matched literally (PVE interpolates it into the regex
/// unescaped, so its `.` matches any character).
///
/// # Errors
/// `unable to allocate an image name for VM <vmid> in storage '<storeid>'`.
pub fn next_vm_diskname(
    existing: &[String],
    storeid: &str,
    vmid: u32,
    fmt: &str,
    add_fmt_suffix: bool,
    subvol_aware: bool,
) -> Result<String, VolumeError> {
    let prefix = if fmt == "subvol" { "subvol" } else { "vm" };
    let suffix = if add_fmt_suffix {
        format!(".{fmt}")
    } else {
        String::new()
    };
    let pattern = if subvol_aware {
        format!(r"(vm|base|subvol|basevol)-{vmid}-disk-([0-9]+)")
    } else {
        format!(r"(vm|base)-{vmid}-disk-([0-9]+){}", regex::escape(&suffix))
    };
    let disk_re = re(&pattern);
    let used: std::collections::BTreeSet<&str> = existing
        .iter()
        .filter_map(|d| disk_re.captures(d).and_then(|c| c.get(2)))
        .map(|m| m.as_str())
        .collect();
    (0..MAX_VOLUMES_PER_GUEST)
        .map(|i| i.to_string())
        .find(|i| !used.contains(i.as_str()))
        .map(|i| format!("{prefix}-{vmid}-disk-{i}{suffix}"))
        .ok_or_else(|| VolumeError::NoFreeDiskName {
            vmid,
            storeid: storeid.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_round_trip() {
        let v = VolumeId::parse("local:100/vm-100-disk-0.raw").unwrap();
        assert_eq!(v.storage, "local");
        assert_eq!(v.volname, "100/vm-100-disk-0.raw");
        assert_eq!(v.to_string(), "local:100/vm-100-disk-0.raw");
        // greedy: the volname may itself contain ':'
        let v = VolumeId::parse("a1:b:c").unwrap();
        assert_eq!((v.storage.as_str(), v.volname.as_str()), ("a1", "b:c"));
    }

    #[test]
    fn volume_id_errors() {
        for bad in [
            "",
            "local",
            "local:",
            "1local:x",
            "l:x",
            "local-:x",
            "/var/lib:x",
            "a1:x\n",
        ] {
            assert_eq!(
                VolumeId::parse(bad).unwrap_err().to_string(),
                format!("unable to parse volume ID '{bad}'")
            );
        }
    }

    #[test]
    fn storage_ids() {
        for ok in ["local", "local-lvm", "a1", "My.Store_2"] {
            assert!(parse_storage_id(ok).is_ok(), "{ok}");
        }
        for bad in ["a", "1a", "a-", "a b", "a:b", "", "ä1"] {
            assert_eq!(
                parse_storage_id(bad).unwrap_err().to_string(),
                format!("storage ID '{bad}' contains illegal characters")
            );
        }
    }

    #[test]
    fn vmids() {
        assert_eq!(verify_vmid("100"), Ok(100));
        assert_eq!(verify_vmid("999999999"), Ok(999_999_999));
        for bad in ["99", "0100", "1000000000", "abc", ""] {
            assert!(verify_vmid(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_vmid("007"), Ok(7));
        assert_eq!(
            parse_vmid("1a").unwrap_err().to_string(),
            "VMID '1a' contains illegal characters"
        );
        assert!(verify_configid("snap1").is_ok());
        assert!(verify_configid("s").is_err());
        assert!(verify_configid("1snap").is_err());
    }

    #[test]
    fn name_dir() {
        assert_eq!(
            parse_name_dir("base-100-disk-0.qcow2").unwrap(),
            DirImageName {
                name: "base-100-disk-0.qcow2".into(),
                format: "qcow2".into(),
                is_base: true
            }
        );
        assert_eq!(
            parse_name_dir("snap-x-vm-100-disk-0.qcow2")
                .unwrap_err()
                .to_string(),
            "'snap-x-vm-100-disk-0.qcow2' is a snapshot filename, not a volume!"
        );
        assert_eq!(parse_name_dir("custom.raw").unwrap().format, "raw");
        assert!(parse_name_dir("vm-100-disk-0.vhdx").is_err());
        assert!(parse_name_dir("vm-100-disk 0.raw").is_err());
    }

    #[test]
    fn rootdir_legacy() {
        let p = parse_volname_dir("rootdir/101").unwrap();
        assert_eq!(p.vtype, VolumeType::Rootdir);
        assert_eq!(p.vmid, Some(101));
        assert_eq!(p.format, "");
    }

    #[test]
    fn lvmthin() {
        let p = parse_volname_lvmthin("vm-100-disk-0").unwrap();
        assert_eq!(
            (p.name.as_str(), p.vmid, p.is_base),
            ("vm-100-disk-0", Some(100), false)
        );
        assert!(parse_volname_lvmthin("base-100-disk-0").unwrap().is_base);
        assert_eq!(
            parse_volname_lvmthin("snap_vm-100-disk-0_x")
                .unwrap_err()
                .to_string(),
            "unable to parse lvm volume name 'snap_vm-100-disk-0_x'"
        );
        assert_eq!(
            parse_volname_lvmthin("vm-100/disk")
                .unwrap_err()
                .to_string(),
            "lvm name 'vm-100/disk' contains illegal characters"
        );
    }

    #[test]
    fn zfspool() {
        let p = parse_volname_zfspool("subvol-100-disk-0").unwrap();
        assert_eq!(
            (p.format.as_str(), p.is_base, p.vmid),
            ("subvol", false, Some(100))
        );
        let p = parse_volname_zfspool("basevol-200-disk-0/subvol-201-disk-0").unwrap();
        assert_eq!(p.name, "subvol-201-disk-0");
        assert_eq!(p.basename.as_deref(), Some("basevol-200-disk-0"));
        assert_eq!(p.basevmid, Some(200));
        assert_eq!(p.vmid, Some(201));
        assert!(!p.is_base);
        let p = parse_volname_zfspool("base-100-disk-0").unwrap();
        assert!(p.is_base);
        assert_eq!(p.format, "raw");
        assert!(parse_volname_zfspool("basevol-100-disk-0").unwrap().is_base);
        assert_eq!(
            parse_volname_zfspool("foo").unwrap_err().to_string(),
            "unable to parse zfs volume name 'foo'"
        );
        // `\S+` includes '/', so this is one (odd) name, as in PVE
        assert_eq!(
            parse_volname_zfspool("vm-100-disk-0/vm-101-disk-0")
                .unwrap()
                .name,
            "vm-100-disk-0/vm-101-disk-0"
        );
    }

    #[test]
    fn rbd() {
        let p = parse_volname_rbd("vm-100-disk-0").unwrap();
        assert_eq!((p.vmid, p.is_base), (Some(100), false));
        let p = parse_volname_rbd("base-100-disk-0/vm-101-disk-0").unwrap();
        assert_eq!(p.basevmid, Some(100));
        assert_eq!(p.basename.as_deref(), Some("base-100-disk-0"));
        assert!(!p.is_base);
        assert!(parse_volname_rbd("base-100-disk-0").unwrap().is_base);
        // the regex lets `-<vmid>-...` through without a prefix, like PVE
        assert_eq!(parse_volname_rbd("-100-x").unwrap().vmid, Some(100));
        assert_eq!(
            parse_volname_rbd("subvol-100-disk-0")
                .unwrap_err()
                .to_string(),
            "unable to parse rbd volume name 'subvol-100-disk-0'"
        );
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn diskname() {
        let cases: &[(&[&str], &str, bool, bool, &str)] = &[
            (&[], "raw", true, true, "vm-100-disk-0.raw"),
            (
                &["local:100/vm-100-disk-0.raw"],
                "raw",
                true,
                true,
                "vm-100-disk-1.raw",
            ),
            (
                &["local:100/subvol-100-disk-0.subvol"],
                "subvol",
                true,
                true,
                "subvol-100-disk-1.subvol",
            ),
            (
                &["local:100/vm-100-disk-0.qcow2"],
                "raw",
                true,
                true,
                "vm-100-disk-1.raw",
            ),
            (&["vm-100-disk-0"], "raw", false, false, "vm-100-disk-1"),
            (
                &["vm-100-disk-0.qcow2"],
                "raw",
                true,
                false,
                "vm-100-disk-0.raw",
            ),
            (&["vm-100-disk-01"], "raw", false, false, "vm-100-disk-0"),
            (
                &["vm-100-disk-0", "vm-100-disk-01"],
                "raw",
                false,
                false,
                "vm-100-disk-1",
            ),
            (
                &["vm-1000-disk-0", "vm-10-disk-0"],
                "raw",
                false,
                false,
                "vm-100-disk-0",
            ),
            (
                &["base-100-disk-0", "vm-100-disk-2"],
                "raw",
                false,
                false,
                "vm-100-disk-1",
            ),
            (
                &["subvol-100-disk-0"],
                "subvol",
                false,
                true,
                "subvol-100-disk-1",
            ),
            (&["subvol-100-disk-0"], "raw", false, false, "vm-100-disk-0"),
        ];
        for (existing, fmt, suffix, subvol, expected) in cases {
            assert_eq!(
                next_vm_diskname(&names(existing), "s", 100, fmt, *suffix, *subvol).unwrap(),
                *expected,
                "{existing:?}"
            );
        }
        let full: Vec<String> = (0..1024).map(|i| format!("vm-100-disk-{i}")).collect();
        assert_eq!(
            next_vm_diskname(&full, "local-lvm", 100, "raw", false, false)
                .unwrap_err()
                .to_string(),
            "unable to allocate an image name for VM 100 in storage 'local-lvm'"
        );
    }
}
