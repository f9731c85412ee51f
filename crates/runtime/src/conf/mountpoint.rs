//! Mount point property strings: `rootfs`, `mpN` and `unusedN` values of a container config.
//!
//! ```text
//! rootfs: local-lvm:vm-100-disk-0,size=8G
//! mp0: local-lvm:vm-100-disk-1,mp=/mnt/data,backup=1,size=32G
//! mp2: /mnt/bindmounts/shared,mp=/shared,ro=1
//! unused0: local-lvm:vm-100-disk-5
//! ```
//!
//! Compatibility target: pve-container `PVE::LXC::Config` (`$rootfs_desc`, `$mp_desc`,
//! `$unused_desc`, `parse_volume`, `print_ct_mountpoint`, `classify_mountpoint`,
//! `verify_lxc_mp_string`) and `NEW_DISK_RE` of `PVE::LXC`. Printing puts the volume bare
//! first, then `mp=`, then the remaining keys sorted, with `size` through
//! [`format_size`]; booleans print as `1`/`0` (the parser normalises `yes`/`on`/...).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use vzkit_host::size::{format_size, parse_gib_kib, parse_size};

use super::error::ConfError;
use super::propstring::{self, PropDesc, PropType};

/// Mount options PVE passes through (`$valid_mount_option_re`).
pub const MOUNT_OPTIONS: [&str; 6] = [
    "discard", "lazytime", "noatime", "nodev", "noexec", "nosuid",
];

const MOUNT_OPTIONS_PATTERN: &str = "(discard|lazytime|noatime|nodev|noexec|nosuid)(;(discard|lazytime|noatime|nodev|noexec|nosuid))*";

/// `verify_lxc_mp_string`: rejects `/./`, `/../`, a trailing `/.` or `/..` and a leading
/// `../`.
///
/// # Errors
/// `"<path> contains illegal character sequences"`.
pub fn verify_mp_string(path: &str) -> Result<(), String> {
    let bad = path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
        || path.starts_with("../");
    if bad {
        Err(format!("{path} contains illegal character sequences"))
    } else {
        Ok(())
    }
}

/// `pve-volume-id`: `STORAGE:VOLNAME` with a PVE storage id.
///
/// # Errors
/// `"unable to parse volume ID '<volid>'"`.
pub fn verify_volume_id(volid: &str) -> Result<(), String> {
    static RE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?s)^(?i:[a-z][a-z0-9\-_.]*[a-z0-9]):.+$").expect("static regex")
    });
    if RE.is_match(volid) {
        Ok(())
    } else {
        Err(format!("unable to parse volume ID '{volid}'"))
    }
}

fn verify_idmap(text: &str) -> Result<(), String> {
    MpIdMap::parse(text).map(|_| ())
}

fn rootfs_props() -> [PropDesc; 9] {
    [
        PropDesc::new("volume", PropType::Str)
            .required()
            .default_key()
            .format(verify_mp_string),
        PropDesc::new("size", PropType::Str),
        PropDesc::new("acl", PropType::Bool),
        PropDesc::new("mountoptions", PropType::Str).pattern(MOUNT_OPTIONS_PATTERN),
        PropDesc::new("ro", PropType::Bool),
        PropDesc::new("quota", PropType::Bool),
        PropDesc::new("replicate", PropType::Bool),
        PropDesc::new("shared", PropType::Bool),
        PropDesc::new("idmap", PropType::Str).format(verify_idmap),
    ]
}

static ROOTFS_SCHEMA: LazyLock<Vec<PropDesc>> = LazyLock::new(|| rootfs_props().to_vec());

static MP_SCHEMA: LazyLock<Vec<PropDesc>> = LazyLock::new(|| {
    let mut v = rootfs_props().to_vec();
    v.push(PropDesc::new("backup", PropType::Bool));
    v.push(PropDesc::new("keepattrs", PropType::Bool));
    v.push(
        PropDesc::new("mp", PropType::Str)
            .required()
            .format(verify_mp_string),
    );
    v
});

static UNUSED_SCHEMA: LazyLock<Vec<PropDesc>> = LazyLock::new(|| {
    vec![
        PropDesc::new("volume", PropType::Str)
            .required()
            .default_key()
            .format(verify_volume_id),
    ]
});

/// What a mount point's `volume` names (`classify_mountpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MountPointKind {
    /// A storage volume (`STORAGE:VOLNAME` or `STORAGE:SIZE`).
    Volume,
    /// A host directory bind-mounted into the container.
    Bind,
    /// A host block device (`/dev/...`).
    Device,
}

impl MountPointKind {
    /// PVE's name for the kind (`volume`, `bind`, `device`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Volume => "volume",
            Self::Bind => "bind",
            Self::Device => "device",
        }
    }
}

/// `classify_mountpoint`: `/dev/...` is a device, other absolute paths are bind mounts,
/// anything else is a storage volume.
#[must_use]
pub fn classify_mountpoint(volume: &str) -> MountPointKind {
    if volume.starts_with("/dev/") {
        MountPointKind::Device
    } else if volume.starts_with('/') {
        MountPointKind::Bind
    } else {
        MountPointKind::Volume
    }
}

/// One entry of a per-mount-point id map: `u:CT:DISK:COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MpIdMapEntry {
    /// `true` for uids (`u`), `false` for gids (`g`).
    pub uid: bool,
    /// First id inside the container.
    pub ct: u32,
    /// First id on the disk.
    pub disk: u32,
    /// Number of ids.
    pub count: u32,
}

/// The `idmap` option of a mount point.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MpIdMap {
    /// `passthrough`: ids on disk are used unchanged.
    Passthrough,
    /// `u:0:100000:65536;g:0:100000:65536`.
    Map(Vec<MpIdMapEntry>),
}

impl MpIdMap {
    /// Parses `passthrough` or `;`-separated `[ug]:ct:disk:count` entries.
    ///
    /// # Errors
    /// A message naming the entry that does not match `^([ug]):(\d+):(\d+):(\d+)$`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "passthrough" {
            return Ok(Self::Passthrough);
        }
        let mut entries = Vec::new();
        for part in text.split(';') {
            let bad = || format!("invalid idmap entry '{part}'");
            let mut it = part.split(':');
            let (Some(t), Some(ct), Some(disk), Some(count), None) =
                (it.next(), it.next(), it.next(), it.next(), it.next())
            else {
                return Err(bad());
            };
            let num = |s: &str| -> Result<u32, String> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                s.parse().map_err(|_| bad())
            };
            let uid = match t {
                "u" => true,
                "g" => false,
                _ => return Err(bad()),
            };
            entries.push(MpIdMapEntry {
                uid,
                ct: num(ct)?,
                disk: num(disk)?,
                count: num(count)?,
            });
        }
        Ok(Self::Map(entries))
    }

    /// Prints the option value.
    #[must_use]
    pub fn print(&self) -> String {
        match self {
            Self::Passthrough => "passthrough".to_string(),
            Self::Map(entries) => entries
                .iter()
                .map(|e| {
                    let t = if e.uid { 'u' } else { 'g' };
                    format!("{t}:{}:{}:{}", e.ct, e.disk, e.count)
                })
                .collect::<Vec<_>>()
                .join(";"),
        }
    }
}

/// A parsed `rootfs` or `mpN` value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MountPoint {
    /// Volume id, `STORAGE:SIZE`, host directory or `/dev/...` device.
    pub volume: String,
    /// Path inside the container; `/` for `rootfs`.
    pub mp: String,
    /// Size in bytes (`size=`, informational).
    pub size: Option<u64>,
    /// Explicit ACL on/off; `None` = filesystem default.
    pub acl: Option<bool>,
    /// User quotas.
    pub quota: Option<bool>,
    /// Include in backups (`mpN` only; absent means *not* backed up).
    pub backup: Option<bool>,
    /// Read-only mount.
    pub ro: Option<bool>,
    /// Include in replication (schema default 1).
    pub replicate: Option<bool>,
    /// Non-volume mount point available on all nodes (schema default 0).
    pub shared: Option<bool>,
    /// Extra mount options, a subset of [`MOUNT_OPTIONS`].
    pub mountoptions: Vec<String>,
    /// Keep the mount point's root directory attributes (`mpN` only).
    pub keepattrs: Option<bool>,
    /// Per-mount-point id mapping.
    pub idmap: Option<MpIdMap>,
}

fn bool_field(map: &BTreeMap<String, String>, key: &str) -> Option<bool> {
    map.get(key).map(|v| v == "1")
}

impl MountPoint {
    /// A mount point of `volume` at `mp` with no options set.
    #[must_use]
    pub fn new(volume: impl Into<String>, mp: impl Into<String>) -> Self {
        Self {
            volume: volume.into(),
            mp: mp.into(),
            size: None,
            acl: None,
            quota: None,
            backup: None,
            ro: None,
            replicate: None,
            shared: None,
            mountoptions: Vec::new(),
            keepattrs: None,
            idmap: None,
        }
    }

    /// The kind of source this mount point names.
    #[must_use]
    pub fn kind(&self) -> MountPointKind {
        classify_mountpoint(&self.volume)
    }

    /// `mountpoint_backup_enabled`: rootfs always, volumes only with `backup=1`, bind and
    /// device mount points never.
    #[must_use]
    pub fn backup_enabled(&self, key: &str) -> bool {
        key == "rootfs" || (self.kind() == MountPointKind::Volume && self.backup == Some(true))
    }

    fn from_map(map: &BTreeMap<String, String>, mp: String) -> Result<Self, ConfError> {
        let size = match map.get("size") {
            Some(s) => Some(parse_size(s).map_err(|_| ConfError::InvalidSize(s.clone()))?),
            None => None,
        };
        let idmap = match map.get("idmap") {
            Some(s) => Some(MpIdMap::parse(s).map_err(ConfError::Invalid)?),
            None => None,
        };
        Ok(Self {
            volume: map.get("volume").cloned().unwrap_or_default(),
            mp,
            size,
            acl: bool_field(map, "acl"),
            quota: bool_field(map, "quota"),
            backup: bool_field(map, "backup"),
            ro: bool_field(map, "ro"),
            replicate: bool_field(map, "replicate"),
            shared: bool_field(map, "shared"),
            mountoptions: map
                .get("mountoptions")
                .map(|s| s.split(';').map(str::to_string).collect())
                .unwrap_or_default(),
            keepattrs: bool_field(map, "keepattrs"),
            idmap,
        })
    }

    fn to_map(&self, nomp: bool) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("volume".to_string(), self.volume.clone());
        if !nomp {
            m.insert("mp".to_string(), self.mp.clone());
        }
        if let Some(size) = self.size {
            m.insert("size".to_string(), format_size(size));
        }
        let bools = [
            ("acl", self.acl),
            ("quota", self.quota),
            ("backup", self.backup),
            ("ro", self.ro),
            ("replicate", self.replicate),
            ("shared", self.shared),
            ("keepattrs", self.keepattrs),
        ];
        for (k, v) in bools {
            if let Some(b) = v {
                m.insert(k.to_string(), if b { "1" } else { "0" }.to_string());
            }
        }
        if !self.mountoptions.is_empty() {
            m.insert("mountoptions".to_string(), self.mountoptions.join(";"));
        }
        if let Some(idmap) = &self.idmap {
            m.insert("idmap".to_string(), idmap.print());
        }
        m
    }

    /// Prints the value as `print_ct_mountpoint($info, $nomp)`; `nomp` (for `rootfs`)
    /// leaves out `mp=`.
    ///
    /// # Errors
    /// [`ConfError::CommaInValue`] when a value contains `,`, or the schema errors PVE's
    /// printer raises for values it would not parse back (bad paths, mount options).
    pub fn print(&self, nomp: bool) -> Result<String, ConfError> {
        let map = self.to_map(nomp);
        let schema: &[PropDesc] = if nomp { &ROOTFS_SCHEMA } else { &MP_SCHEMA };
        propstring::check_object(schema, &map)?;
        propstring::print(schema, &map)
    }
}

/// Parses a `rootfs` value (`parse_ct_rootfs`); the result has `mp = "/"`.
///
/// # Errors
/// Property-string errors, `format error` for schema violations (unknown keys, illegal
/// path sequences, bad booleans or mount options) and [`ConfError::InvalidSize`].
pub fn parse_rootfs(text: &str) -> Result<MountPoint, ConfError> {
    let map = propstring::parse(&ROOTFS_SCHEMA, text)?;
    MountPoint::from_map(&map, "/".to_string())
}

/// Parses an `mpN` value (`parse_ct_mountpoint`).
///
/// # Errors
/// As [`parse_rootfs`]; additionally `mp: property is missing and it is not optional`.
pub fn parse_mp(text: &str) -> Result<MountPoint, ConfError> {
    let map = propstring::parse(&MP_SCHEMA, text)?;
    let mp = map.get("mp").cloned().unwrap_or_default();
    MountPoint::from_map(&map, mp)
}

/// Parses an `unusedN` value and returns its volume id.
///
/// # Errors
/// Property-string errors; `format error` with `volume: unable to parse volume ID '...'`.
pub fn parse_unused(text: &str) -> Result<String, ConfError> {
    let map = propstring::parse(&UNUSED_SCHEMA, text)?;
    Ok(map.get("volume").cloned().unwrap_or_default())
}

/// Parses the value of a volume key: `rootfs`, `mpN` or `unusedN` (the latter as a mount
/// point with an empty `mp`).
///
/// # Errors
/// The errors of the respective parser; [`ConfError::UnknownSetting`] for other keys.
pub fn parse_volume(key: &str, text: &str) -> Result<MountPoint, ConfError> {
    if key == "rootfs" {
        parse_rootfs(text)
    } else if is_indexed(key, "mp", 256) {
        parse_mp(text)
    } else if is_indexed(key, "unused", 256) {
        parse_unused(text).map(|v| MountPoint::new(v, ""))
    } else {
        Err(ConfError::UnknownSetting(key.to_string()))
    }
}

/// `true` for `prefix<N>` with a canonical decimal `N < limit`.
pub(crate) fn is_indexed(key: &str, prefix: &str, limit: u32) -> bool {
    index_of(key, prefix).is_some_and(|n| n < limit)
}

/// The `N` of `prefix<N>` (canonical decimal, no leading zeros).
pub(crate) fn index_of(key: &str, prefix: &str) -> Option<u32> {
    let digits = key.strip_prefix(prefix)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// `NEW_DISK_RE` (`^([^:\s]+):(\d+(\.\d+)?)$`): a request for a new disk of `SIZE` GiB on
/// `STORAGE`. Returns the storage and the size in KiB (`int(gib * 1024) * 1024`).
#[must_use]
pub fn parse_new_disk(volume: &str) -> Option<(String, u64)> {
    static RE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^([^:\t\n\x0B\x0C\r ]+):(\d+(?:\.\d+)?)$").expect("static regex")
    });
    let caps = RE.captures(volume)?;
    let kib = parse_gib_kib(&caps[2])?;
    Some((caps[1].to_string(), kib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_pve_examples() {
        let cases: &[(&str, &str, bool)] = &[
            ("rootfs", "local-lvm:vm-100-disk-0,size=8G", true),
            (
                "mp0",
                "local-lvm:vm-100-disk-1,mp=/mnt/data,backup=1,size=32G",
                false,
            ),
            (
                "mp1",
                "local-zfs:subvol-100-disk-0,mp=/srv,acl=1,size=0T",
                false,
            ),
            ("mp2", "/mnt/bindmounts/shared,mp=/shared,ro=1", false),
            ("mp3", "/dev/sdb1,mp=/mnt/dev,quota=1", false),
            (
                "mp4",
                "local:100/vm-100-disk-0.raw,mp=/a,mountoptions=noatime;nodev,replicate=0",
                false,
            ),
            (
                "rootfs",
                "local:1,idmap=u:0:100000:65536;g:0:100000:65536",
                true,
            ),
        ];
        for (key, text, nomp) in cases {
            let mp = parse_volume(key, text).expect(text);
            assert_eq!(mp.print(*nomp).expect(text), *text, "{key}");
        }
    }

    #[test]
    fn print_orders_volume_then_mp_then_sorted() {
        let mp = parse_mp("size=1G,backup=yes,mp=/x,ro=on,vol:1,acl=0").expect("parse");
        assert_eq!(
            mp.print(false).expect("print"),
            "vol:1,mp=/x,acl=0,backup=1,ro=1,size=1G"
        );
        assert_eq!(mp.kind(), MountPointKind::Volume);
        assert_eq!(mp.size, Some(1 << 30));
        let rootfs = parse_rootfs("vol:1,size=1073741825").expect("parse");
        assert_eq!(rootfs.mp, "/");
        assert_eq!(rootfs.print(true).expect("print"), "vol:1,size=1073741825");
    }

    #[test]
    fn classifies_mountpoints() {
        assert_eq!(classify_mountpoint("/dev/sdb1"), MountPointKind::Device);
        assert_eq!(classify_mountpoint("/srv/data"), MountPointKind::Bind);
        assert_eq!(classify_mountpoint("local:1"), MountPointKind::Volume);
        let bind = parse_mp("/srv,mp=/srv,backup=1").expect("parse");
        assert!(!bind.backup_enabled("mp0"));
        assert!(
            parse_mp("s:v,mp=/a,backup=1")
                .expect("parse")
                .backup_enabled("mp0")
        );
        assert!(!parse_mp("s:v,mp=/a").expect("parse").backup_enabled("mp0"));
        assert!(
            parse_rootfs("/srv")
                .expect("parse")
                .backup_enabled("rootfs")
        );
    }

    #[test]
    fn reports_pve_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "s:v,mp=/a,mp=/b",
                "duplicate key in comma-separated list property: mp",
            ),
            (
                "s:v,t:w,mp=/a",
                "duplicate key in comma-separated list property: volume",
            ),
            (
                "s:v,mp=/a,foo=1",
                "format error\nfoo: property is not defined in schema and the schema does not \
                 allow additional properties",
            ),
            (
                "s:v",
                "format error\nmp: property is missing and it is not optional",
            ),
            ("s:v,mp=/a,size=12X", "invalid size: 12X"),
            (
                "s:v,mp=/a/../b",
                "format error\nmp: /a/../b contains illegal character sequences",
            ),
            (
                "../x,mp=/a",
                "format error\nvolume: ../x contains illegal character sequences",
            ),
            (
                "s:v,mp=/a/.",
                "format error\nmp: /a/. contains illegal character sequences",
            ),
            (
                "s:v,mp=/a,ro=maybe",
                "format error\nro: type check ('boolean') failed - got 'maybe'",
            ),
            (
                "s:v,mp=/a,mountoptions=noatime;rw",
                "format error\nmountoptions: value does not match the regex pattern",
            ),
            ("s:v,mp=", "missing key in comma-separated list property"),
            (
                "s:v,=x,mp=/a",
                "missing key in comma-separated list property",
            ),
        ];
        for (text, want) in cases {
            let err = parse_mp(text).expect_err(text);
            assert_eq!(err.to_string(), *want, "{text}");
        }
        assert_eq!(
            parse_rootfs("s:v,mp=/")
                .expect_err("no mp on rootfs")
                .to_string(),
            "format error\nmp: property is not defined in schema and the schema does not allow \
             additional properties"
        );
        assert_eq!(
            parse_unused("nonsense").expect_err("bad volid").to_string(),
            "format error\nvolume: unable to parse volume ID 'nonsense'"
        );
        assert_eq!(
            parse_unused("local:vm-1-disk-0"),
            Ok("local:vm-1-disk-0".to_string())
        );
        let mut mp = MountPoint::new("s:a,b", "/x");
        assert_eq!(
            mp.print(false).expect_err("comma").to_string(),
            "illegal value with commas for volume"
        );
        mp.volume = "s:a".into();
        mp.mp = "/x,y".into();
        assert_eq!(
            mp.print(false).expect_err("comma").to_string(),
            "illegal value with commas for mp"
        );
    }

    #[test]
    fn perl_falsy_default_key_is_overwritten() {
        // `!$res->{volume}` is true for "0", so a bare value replaces `volume=0`.
        let mp = parse_mp("volume=0,s:v,mp=/a").expect("parse");
        assert_eq!(mp.volume, "s:v");
    }

    #[test]
    fn new_disk_syntax() {
        assert_eq!(
            parse_new_disk("local-lvm:8"),
            Some(("local-lvm".into(), 8 * 1024 * 1024))
        );
        assert_eq!(
            parse_new_disk("local:0.5"),
            Some(("local".into(), 512 * 1024))
        );
        assert_eq!(parse_new_disk("local:0"), Some(("local".into(), 0)));
        for bad in [
            "local:vm-100-disk-0",
            "local:1.",
            "lo cal:1",
            ":1",
            "local:1G",
            "/srv:1",
        ] {
            if bad == "/srv:1" {
                // NEW_DISK_RE only excludes ':' and whitespace from the storage part.
                assert_eq!(parse_new_disk(bad), Some(("/srv".into(), 1024 * 1024)));
            } else {
                assert_eq!(parse_new_disk(bad), None, "{bad}");
            }
        }
    }
}
