//! The `iscsi` backend (PVE's `ISCSIPlugin`, open-iscsi semantics): the LUNs of one target,
//! named `<channel>.<id>.<lun>.<by-id name>` (`0.0.1.scsi-SIET_VIRTUAL-DISK_beaf11`), listed
//! with owner 0, raw, never allocated or freed (unless the storage is *managed*, below).
//! Snapshots, clones, templates and resizing are refused with PVE's messages; the only
//! feature is a full copy of the current state.
//!
//! # Initiators
//!
//! Which initiator serves the LUNs is decided at run time ([`Initiator`]):
//!
//! * **kernel** (open-iscsi), where the kernel has the iSCSI TCP transport
//!   (`/sys/class/iscsi_transport/tcp` or `/sys/module/iscsi_tcp`): `activate_storage` logs
//!   in with `iscsiadm` (discovery + login, or a session rescan) exactly as PVE; LUNs are the
//!   SCSI disks of the target's sessions, found through sysfs, named by their
//!   `/dev/disk/by-id` link and used as block devices.
//! * **userspace** (libiscsi + `qemu-storage-daemon`) everywhere else: LUNs are listed with
//!   `iscsi-ls -s`, their names derived from the VPD unit serial number (page 0x80) as udev's
//!   `scsi_id` does for its `scsi-S<vendor>_<model>_<serial>` link, sizes read with
//!   `iscsi-readcapacity16`. `activate_volume` starts a `qemu-storage-daemon` that exports
//!   the LUN as a regular file through FUSE (state under `<root>/run/vzkit/iscsi/<storage>/`),
//!   which the mount layer attaches to a loop device; `deactivate_volume` stops it by PID.
//!
//! The `initiator` option (`auto`, `kernel`, `userspace`) overrides the choice; asking for the
//! kernel initiator where the kernel has none is an error naming what is missing.
//!
//! # Containers
//!
//! PVE's iscsi storages have no `rootdir` content, but an existing LUN can be a container
//! mount point (`mp0: san:0.0.1.scsi-…,mp=/data`): vzkit mounts the filesystem that is on it
//! and, like PVE, never formats an existing LUN.
//!
//! # Managed mode (not in PVE)
//!
//! With `target-provider tgt` and `lun-dir <path>`, vzkit allocates LUNs itself: a sparse
//! backing file `<lun-dir>/vm-<vmid>-disk-N.raw` becomes a new logical unit of the target
//! through `tgtadm --op new --mode logicalunit`, with the volume name as its SCSI serial (so
//! its by-id name, and the volume name, carry the owner). `free_image` deletes the logical
//! unit and the file, and only for LUNs whose backing file lies in `lun-dir`. `tgt-pidfile`
//! names the PID file of a `tgtd` running in its own mount namespace (whose control socket
//! is not in the host's `/run`); `tgtadm` is then run through `nsenter -t <pid> -m`.
//!
//! Unit tests pin the `iscsiadm`, libiscsi, `qemu-storage-daemon` and `tgtadm` argument
//! vectors and parse captured output and a sysfs tree; `tests/integration/iscsi.rs` runs the
//! userspace path and managed mode against a real tgt target on 127.0.0.1, and
//! `tests/integration/vm_iscsi.rs` the kernel path (open-iscsi login, `/dev/sdX`) in the
//! kernel VM tier.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vzkit_host::command::{Cmd, CommandError, Runner};
use vzkit_host::paths::Layout;

use crate::config::{ContentType, StorageSection};
use crate::error::{Result, StorageError};
use crate::plugin::{
    Feature, FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeInfo, VolumeState,
};
use crate::volid::{self, ParsedVolname, VolumeType};

/// open-iscsi's administration tool (PVE's path).
pub const ISCSIADM: &str = "/usr/bin/iscsiadm";
/// libiscsi's LUN lister.
pub const ISCSI_LS: &str = "/usr/bin/iscsi-ls";
/// libiscsi's INQUIRY tool.
pub const ISCSI_INQ: &str = "/usr/bin/iscsi-inq";
/// libiscsi's READ CAPACITY(16) tool.
pub const ISCSI_READCAPACITY16: &str = "/usr/bin/iscsi-readcapacity16";
/// QEMU's storage daemon (FUSE exports of iSCSI LUNs).
pub const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";
/// tgt's administration tool.
pub const TGTADM: &str = "tgtadm";
/// util-linux `nsenter`.
pub const NSENTER: &str = "nsenter";

/// The default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
/// How long one libiscsi or `tgtadm` command may take (a portal that accepts connections
/// but does not answer must not hang a command).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `iscsiadm` discovery, login and rescans may take.
pub const ISCSIADM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long PVE's connection check waits for the portal's TCP port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The feature table of both iSCSI backends: a full copy of the current state only.
pub const ISCSI_FEATURES: FeatureTable =
    FeatureTable(&[(Feature::Copy, VolumeState::Current, None)]);

/// PVE's refusals (`ISCSIPlugin` / `ISCSIDirectPlugin`).
pub mod msg {
    /// `alloc_image`.
    pub const ALLOC: &str = "can't allocate space in iscsi storage";
    /// `free_image`.
    pub const FREE: &str = "can't free space in iscsi storage";
    /// `clone_image`.
    pub const CLONE: &str = "can't clone images in iscsi storage";
    /// `create_base`.
    pub const CREATE_BASE: &str = "can't create base images in iscsi storage";
    /// `volume_resize`.
    pub const RESIZE: &str = "volume resize is not possible on iscsi device";
    /// `volume_snapshot`.
    pub const SNAPSHOT: &str = "volume snapshot is not possible on iscsi device";
    /// `volume_snapshot_rollback`.
    pub const ROLLBACK: &str = "volume snapshot rollback is not possible on iscsi device";
    /// `volume_snapshot_delete`.
    pub const SNAPSHOT_DELETE: &str = "volume snapshot delete is not possible on iscsi device";
    /// `path` with a snapshot (iscsi).
    pub const SNAPSHOT_PATH: &str = "snapshot is not possible on iscsi storage";
}

// ---------------------------------------------------------------------------------------
// Portals and initiators

/// An iSCSI portal (`host[:port]`, IPv6 hosts in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The portal as configured (used verbatim in `iscsi://` URLs, as PVE does).
    pub raw: String,
}

impl Portal {
    /// Parses `10.0.0.5`, `10.0.0.5:3261`, `[fd00::1]:3260`, `san.example`.
    ///
    /// # Errors
    /// An empty host or an invalid port.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || StorageError::Invalid(format!("invalid iscsi portal '{text}'"));
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => (text, None),
                None => (text, None),
            }
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
            None => DEFAULT_PORT,
        };
        Ok(Self {
            host: host.to_string(),
            port,
            raw: text.to_string(),
        })
    }

    /// `host:port` (`[v6]:port`), as iSCSI URLs and `iscsiadm` want it.
    #[must_use]
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `iscsi://<portal>`, or with a target and LUN `iscsi://<portal>/<target>/<lun>`, with
    /// the portal as configured.
    #[must_use]
    pub fn url(&self, target_lun: Option<(&str, u32)>) -> String {
        match target_lun {
            Some((t, l)) => format!("iscsi://{}/{t}/{l}", self.raw),
            None => format!("iscsi://{}", self.raw),
        }
    }

    /// PVE's `check_connection`: whether the portal's TCP port accepts a connection within
    /// [`CONNECT_TIMEOUT`].
    pub async fn reachable(&self) -> bool {
        let host = self.host.clone();
        let port = self.port;
        tokio::task::spawn_blocking(move || {
            use std::net::ToSocketAddrs;
            let Ok(addrs) = (host.as_str(), port).to_socket_addrs() else {
                return false;
            };
            addrs
                .into_iter()
                .any(|a| std::net::TcpStream::connect_timeout(&a, CONNECT_TIMEOUT).is_ok())
        })
        .await
        .unwrap_or(false)
    }
}

/// Which iSCSI initiator serves a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The kernel's, driven by open-iscsi's `iscsiadm`; LUNs are `/dev/sdX`.
    Kernel,
    /// libiscsi tools for listing, `qemu-storage-daemon` FUSE exports for data.
    Userspace,
}

impl Initiator {
    /// Whether the kernel below `sys_root` (`/` on a real host) has the iSCSI TCP transport.
    #[must_use]
    pub fn kernel_available(sys_root: &Path) -> bool {
        sys_root.join("sys/class/iscsi_transport/tcp").exists()
            || sys_root.join("sys/module/iscsi_tcp").exists()
    }

    /// The initiator for the `initiator` option (`auto` when absent).
    ///
    /// # Errors
    /// `kernel` asked for where the kernel has no iSCSI initiator, or an unknown value.
    pub fn choose(option: Option<&str>, sys_root: &Path) -> Result<Self> {
        let kernel = Self::kernel_available(sys_root);
        match option.unwrap_or("auto") {
            "auto" if kernel => Ok(Self::Kernel),
            "auto" | "userspace" => Ok(Self::Userspace),
            "kernel" if kernel => Ok(Self::Kernel),
            "kernel" => Err(StorageError::Unsupported(
                "the kernel iSCSI initiator is not available (no /sys/class/iscsi_transport/tcp: \
                 load iscsi_tcp, or use 'initiator userspace')"
                    .into(),
            )),
            other => Err(StorageError::Invalid(format!(
                "invalid initiator '{other}' (auto, kernel or userspace)"
            ))),
        }
    }

    /// A one-line description for messages.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Kernel => "kernel initiator (open-iscsi)",
            Self::Userspace => "userspace initiator (libiscsi, qemu-storage-daemon)",
        }
    }
}

/// The initiator name: `InitiatorName=` of `/etc/iscsi/initiatorname.iscsi` (below the root),
/// else `iqn.2003-01.org.vzkit:<hostname>`.
#[must_use]
pub fn initiator_name(layout: &Layout) -> String {
    let file = layout.join("/etc/iscsi/initiatorname.iscsi");
    if let Ok(text) = std::fs::read_to_string(file)
        && let Some(name) = text.lines().find_map(|l| {
            l.trim()
                .strip_prefix("InitiatorName=")
                .map(str::trim)
                .filter(|n| !n.is_empty())
        })
    {
        return name.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "iqn.2003-01.org.vzkit:{}",
        if host.is_empty() { "host" } else { &host }
    )
}

// ---------------------------------------------------------------------------------------
// Pure parsers

/// One LUN line of `iscsi-ls -s`.
#[derive(Debug, Clone, PartialEq)]
pub struct LsLun {
    /// The target it belongs to.
    pub target: String,
    /// LUN number.
    pub lun: u32,
    /// SCSI device type (`DIRECT_ACCESS`).
    pub device_type: String,
    /// Size as PVE computes it from the rounded `(Size:…)` (value × unit), if printed.
    pub size: Option<u64>,
}

/// Parses `iscsi-ls -s iscsi://<portal>`: `Target:<iqn> Portal:…` lines followed by
/// `Lun:<n>    Type:<type> (Size:<v><k|M|G|T>)` lines.
#[must_use]
pub fn parse_iscsi_ls(text: &str) -> Vec<LsLun> {
    let mut target = String::new();
    let mut res = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Target:") {
            target = rest.split_whitespace().next().unwrap_or("").to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix("Lun:") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(lun) = words.next().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let device_type = words
            .next()
            .map(|t| t.strip_prefix("Type:").unwrap_or(t).to_string())
            .unwrap_or_default();
        let size = words
            .next()
            .and_then(|s| {
                s.strip_prefix("(Size:")?
                    .strip_suffix(')')
                    .map(str::to_string)
            })
            .and_then(|s| {
                let unit = s.chars().last()?;
                let factor: u64 = match unit {
                    'k' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => return None,
                };
                let value: f64 = s[..s.len() - 1].parse().ok()?;
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                Some((value * factor as f64) as u64)
            });
        res.push(LsLun {
            target: target.clone(),
            lun,
            device_type,
            size,
        });
    }
    res
}

/// The value of a `Key:value` line of libiscsi tool output (`Vendor:IET     `), untrimmed.
#[must_use]
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
}

/// The unit serial number of `iscsi-inq -e 1 -c 128` (`Unit Serial Number:[   beaf11]`).
#[must_use]
pub fn parse_unit_serial(text: &str) -> Option<String> {
    let v = field(text, "Unit Serial Number")?;
    let v = v.trim().strip_prefix('[')?.strip_suffix(']')?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// `Total size:<bytes>` of `iscsi-readcapacity16`.
#[must_use]
pub fn parse_readcapacity16(text: &str) -> Option<u64> {
    field(text, "Total size")?.trim().parse().ok()
}

/// udev's `ID_SERIAL` rules for a by-id name: whitespace runs become one `_` (leading and
/// trailing dropped), characters outside `0-9A-Za-z#+-.:=@_` become `_`.
#[must_use]
pub fn udev_encode(raw: &str) -> String {
    raw.split_whitespace()
        .collect::<Vec<_>>()
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The by-id name udev's `scsi_id` gives a disk identified by its unit serial number (VPD
/// page 0x80): `scsi-S<vendor:8><model:16><serial>`, whitespace-encoded.
#[must_use]
pub fn by_id_from_serial(vendor: &str, model: &str, serial: &str) -> String {
    format!(
        "scsi-{}",
        udev_encode(&format!("S{vendor:<8}{model:<16}{serial}"))
    )
}

/// The sessions of `iscsiadm --mode session`: `(sid, target)` from lines
/// `tcp: [<sid>] <portal>,<tpgt> <target> (non-flash)`.
#[must_use]
pub fn parse_iscsiadm_sessions(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("tcp:")?.trim_start();
            let rest = rest.strip_prefix('[')?;
            let (sid, rest) = rest.split_once(']')?;
            let mut words = rest.split_whitespace();
            let _portal = words.next()?;
            let target = words.next()?;
            Some((sid.to_string(), target.to_string()))
        })
        .collect()
}

/// Splits an iscsi volume name `<channel>.<id>.<lun>.<by-id name>`.
///
/// # Errors
/// "unable to parse iscsi volume name 'X'".
pub fn parse_iscsi_volname(volname: &str) -> Result<(u32, u32, u32, String)> {
    let bad = || StorageError::Invalid(format!("unable to parse iscsi volume name '{volname}'"));
    let mut parts = volname.splitn(4, '.');
    let mut num = || -> Result<u32> {
        parts
            .next()
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .ok_or_else(bad)
    };
    let (channel, id, lun) = (num()?, num()?, num()?);
    let name = parts.next().ok_or_else(bad)?;
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    Ok((channel, id, lun, name.to_string()))
}

/// The owner encoded at the end of a managed LUN's by-id name (`…_vm-100-disk-0`).
#[must_use]
pub fn managed_owner(by_id: &str) -> Option<u32> {
    let tail = by_id.rsplit('_').next()?;
    let rest = tail.strip_prefix("vm-")?;
    let (vmid, disk) = rest.split_once("-disk-")?;
    if disk.is_empty() || !disk.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    vmid.parse().ok()
}

/// One logical unit of a tgt target (`tgtadm --op show --mode target`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TgtLun {
    /// LUN number.
    pub lun: u32,
    /// Backing file (`None` for the controller LUN 0).
    pub backing: Option<PathBuf>,
}

/// One tgt target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TgtTarget {
    /// Target id.
    pub tid: u32,
    /// Target name (IQN).
    pub name: String,
    /// Its logical units.
    pub luns: Vec<TgtLun>,
}

/// Parses `tgtadm --lld iscsi --op show --mode target`.
#[must_use]
pub fn parse_tgtadm_show(text: &str) -> Vec<TgtTarget> {
    let mut res: Vec<TgtTarget> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = line.strip_prefix("Target ") {
            if let Some((tid, name)) = rest.split_once(": ")
                && let Ok(tid) = tid.parse()
            {
                res.push(TgtTarget {
                    tid,
                    name: name.trim().to_string(),
                    luns: Vec::new(),
                });
            }
        } else if let Some(n) = t.strip_prefix("LUN: ") {
            if let (Some(target), Ok(lun)) = (res.last_mut(), n.trim().parse()) {
                target.luns.push(TgtLun { lun, backing: None });
            }
        } else if let Some(p) = t.strip_prefix("Backing store path:")
            && let Some(l) = res.last_mut().and_then(|t| t.luns.last_mut())
        {
            let p = p.trim();
            if p.starts_with('/') {
                l.backing = Some(PathBuf::from(p));
            }
        }
    }
    res
}

// ---------------------------------------------------------------------------------------
// Kernel initiator: sysfs

/// One LUN of a target as the storage sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lun {
    /// SCSI channel.
    pub channel: u32,
    /// SCSI target id.
    pub id: u32,
    /// LUN number.
    pub lun: u32,
    /// Stable by-id name (`scsi-…`).
    pub by_id: String,
    /// Size in bytes.
    pub size: u64,
}

impl Lun {
    /// The volume name `<channel>.<id>.<lun>.<by-id>`.
    #[must_use]
    pub fn volname(&self) -> String {
        format!("{}.{}.{}.{}", self.channel, self.id, self.lun, self.by_id)
    }
}

fn read_first_line(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| t.lines().next().map(|l| l.trim().to_string()))
}

fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `/dev/disk/by-id` (below `sys_root`): block device name → stable name (`scsi-*` or
/// `dm-uuid-mpath-*`, no partitions), as PVE's `iscsi_disk_list` reads it.
#[must_use]
pub fn stable_paths(sys_root: &Path) -> std::collections::BTreeMap<String, String> {
    let dir = sys_root.join("dev/disk/by-id");
    let mut res = std::collections::BTreeMap::new();
    for name in dir_names(&dir) {
        if !(name.starts_with("scsi-") || name.starts_with("dm-uuid-mpath-"))
            || name.contains("-part")
        {
            continue;
        }
        if let Ok(target) = std::fs::read_link(dir.join(&name))
            && let Some(dev) = target.file_name().and_then(|d| d.to_str())
        {
            res.insert(dev.to_string(), name);
        }
    }
    res
}

/// The disks (SCSI type 0) of the kernel sessions logged in to `target`, found through sysfs
/// below `sys_root` as PVE's `iscsi_device_list` does (multipath holders preferred).
#[must_use]
pub fn kernel_luns(sys_root: &Path, target: &str) -> Vec<Lun> {
    let stable = stable_paths(sys_root);
    let sessions = sys_root.join("sys/class/iscsi_session");
    let scsi = sys_root.join("sys/bus/scsi/devices");
    let mut res = Vec::new();
    for sess in dir_names(&sessions) {
        if !sess.starts_with("session") {
            continue;
        }
        if read_first_line(&sessions.join(&sess).join("targetname")).as_deref() != Some(target) {
            continue;
        }
        let Some(host) = dir_names(&sessions.join(&sess).join("device"))
            .into_iter()
            .find_map(|e| {
                let rest = e.strip_prefix("target")?;
                rest.split(':').next().map(str::to_string)
            })
        else {
            continue;
        };
        for dev in dir_names(&scsi) {
            let f: Vec<&str> = dev.split(':').collect();
            if f.len() != 4 || f[0] != host {
                continue;
            }
            let (Ok(channel), Ok(id), Ok(lun)) = (f[1].parse(), f[2].parse(), f[3].parse()) else {
                continue;
            };
            if read_first_line(&scsi.join(&dev).join("type")).as_deref() != Some("0") {
                continue;
            }
            let block = scsi.join(&dev).join("block");
            let bdev = if block.is_dir() {
                dir_names(&block).into_iter().next()
            } else {
                dir_names(&scsi.join(&dev))
                    .into_iter()
                    .find_map(|e| e.strip_prefix("block:").map(str::to_string))
            };
            let Some(mut bdev) = bdev else { continue };
            if let Some(holder) = dir_names(&sys_root.join("sys/block").join(&bdev).join("holders"))
                .into_iter()
                .next()
            {
                bdev = holder;
            }
            let Some(by_id) = stable.get(&bdev) else {
                continue;
            };
            let Some(sectors) =
                read_first_line(&sys_root.join("sys/block").join(&bdev).join("size"))
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|s| *s > 0)
            else {
                continue;
            };
            res.push(Lun {
                channel,
                id,
                lun,
                by_id: by_id.clone(),
                size: sectors * 512,
            });
        }
    }
    res.sort_by_key(|l| (l.channel, l.id, l.lun));
    res
}

// ---------------------------------------------------------------------------------------
// Userspace initiator: libiscsi tools

/// libiscsi tools against one portal and target.
#[derive(Debug, Clone)]
pub struct Libiscsi {
    runner: Arc<dyn Runner>,
    portal: Portal,
    target: String,
}

impl Libiscsi {
    /// Tools for `target` behind `portal`.
    #[must_use]
    pub fn new(runner: Arc<dyn Runner>, portal: Portal, target: String) -> Self {
        Self {
            runner,
            portal,
            target,
        }
    }

    fn url(&self, lun: u32) -> String {
        self.portal.url(Some((&self.target, lun)))
    }

    async fn stdout(&self, cmd: Cmd) -> Result<String> {
        self.runner
            .run_stdout(&cmd.timeout(COMMAND_TIMEOUT))
            .await
            .map_err(|e| match e {
                CommandError::Timeout { .. } => StorageError::Failed(format!(
                    "iscsi portal {} did not answer within {} s - {e}",
                    self.portal.addr(),
                    COMMAND_TIMEOUT.as_secs()
                )),
                other => other.into(),
            })
    }

    /// `iscsi-ls -s iscsi://<portal>`, the LUNs of every target behind the portal.
    ///
    /// # Errors
    /// When the tool fails or times out.
    pub async fn ls(&self) -> Result<Vec<LsLun>> {
        let out = self
            .stdout(Cmd::new(ISCSI_LS).args(["-s", &self.portal.url(None)]))
            .await?;
        Ok(parse_iscsi_ls(&out))
    }

    /// The disk LUNs (`DIRECT_ACCESS`) of this storage's target.
    ///
    /// # Errors
    /// As [`Libiscsi::ls`].
    pub async fn disk_luns(&self) -> Result<Vec<LsLun>> {
        Ok(self
            .ls()
            .await?
            .into_iter()
            .filter(|l| l.target == self.target && l.device_type == "DIRECT_ACCESS")
            .collect())
    }

    /// The by-id name of a LUN from its vendor, model and unit serial number.
    ///
    /// # Errors
    /// When the INQUIRY fails or the LUN has no unit serial number.
    pub async fn by_id(&self, lun: u32) -> Result<String> {
        let std_inq = self.stdout(Cmd::new(ISCSI_INQ).arg(self.url(lun))).await?;
        let serial_page = self
            .stdout(Cmd::new(ISCSI_INQ).args(["-e", "1", "-c", "128", &self.url(lun)]))
            .await?;
        let serial = parse_unit_serial(&serial_page).ok_or_else(|| {
            StorageError::Failed(format!(
                "LUN {lun} of '{}' has no unit serial number (VPD page 0x80)",
                self.target
            ))
        })?;
        let vendor = field(&std_inq, "Vendor").unwrap_or("");
        let model = field(&std_inq, "Product").unwrap_or("");
        Ok(by_id_from_serial(vendor, model, &serial))
    }

    /// The exact size of a LUN in bytes.
    ///
    /// # Errors
    /// When the tool fails or prints no size.
    pub async fn size(&self, lun: u32) -> Result<u64> {
        let out = self
            .stdout(Cmd::new(ISCSI_READCAPACITY16).arg(self.url(lun)))
            .await?;
        parse_readcapacity16(&out).ok_or_else(|| {
            StorageError::Failed(format!("unable to read the size of '{}'", self.url(lun)))
        })
    }

    /// Every disk LUN of the target with its by-id name and exact size (channel and id 0).
    ///
    /// # Errors
    /// As the single queries.
    pub async fn luns(&self) -> Result<Vec<Lun>> {
        let mut res = Vec::new();
        for l in self.disk_luns().await? {
            res.push(Lun {
                channel: 0,
                id: 0,
                lun: l.lun,
                by_id: self.by_id(l.lun).await?,
                size: self.size(l.lun).await?,
            });
        }
        Ok(res)
    }
}

// ---------------------------------------------------------------------------------------
// FUSE exports through qemu-storage-daemon

/// The FUSE exports of one storage: `<dir>/lun<N>.img` (the exported file) and
/// `<dir>/lun<N>.pid` (the daemon's PID file).
#[derive(Debug, Clone)]
pub struct FuseExports {
    runner: Arc<dyn Runner>,
    dir: PathBuf,
    portal: Portal,
    target: String,
    initiator_name: String,
}

/// Escapes a value for a QEMU option string (commas doubled).
fn qemu_escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Live `qemu-storage-daemon` processes whose command line exports to `file` (a daemon whose
/// start timed out has not written its PID file yet).
fn daemons_exporting(file: &Path) -> Vec<i32> {
    let needle = format!("mountpoint={},", qemu_escape(&file.display().to_string()));
    dir_names(Path::new("/proc"))
        .into_iter()
        .filter_map(|d| d.parse::<i32>().ok())
        .filter(|pid| {
            read_first_line(&PathBuf::from(format!("/proc/{pid}/comm")))
                .is_some_and(|c| c.starts_with("qemu-storage-d"))
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                && alive(*pid)
        })
        .collect()
}

impl FuseExports {
    /// Exports of `target` behind `portal`, with state in `dir`.
    #[must_use]
    pub fn new(
        runner: Arc<dyn Runner>,
        dir: PathBuf,
        portal: Portal,
        target: String,
        initiator_name: String,
    ) -> Self {
        Self {
            runner,
            dir,
            portal,
            target,
            initiator_name,
        }
    }

    /// The exported file of LUN `lun`.
    #[must_use]
    pub fn file(&self, lun: u32) -> PathBuf {
        self.dir.join(format!("lun{lun}.img"))
    }

    fn pidfile(&self, lun: u32) -> PathBuf {
        self.dir.join(format!("lun{lun}.pid"))
    }

    fn pid(&self, lun: u32) -> Option<i32> {
        read_first_line(&self.pidfile(lun)).and_then(|p| p.parse().ok())
    }

    /// Whether LUN `lun` is exported (daemon alive, file FUSE-mounted).
    #[must_use]
    pub fn is_active(&self, lun: u32) -> bool {
        self.pid(lun).is_some_and(alive)
            && vzkit_host::mount::is_mountpoint(&self.file(lun)).unwrap_or(false)
    }

    /// The `qemu-storage-daemon` command exporting LUN `lun`.
    #[must_use]
    pub fn daemon_cmd(&self, lun: u32, writable: bool) -> Cmd {
        let blockdev = format!(
            "driver=iscsi,node-name=lun{lun},transport=tcp,portal={},target={},lun={lun},initiator-name={}",
            qemu_escape(&self.portal.addr()),
            qemu_escape(&self.target),
            qemu_escape(&self.initiator_name),
        );
        let export = format!(
            "type=fuse,id=export{lun},node-name=lun{lun},mountpoint={},writable={}",
            qemu_escape(&self.file(lun).display().to_string()),
            if writable { "on" } else { "off" },
        );
        Cmd::new(QEMU_STORAGE_DAEMON)
            .args(["--blockdev", &blockdev, "--export", &export, "--pidfile"])
            .arg(self.pidfile(lun))
            .arg("--daemonize")
    }

    /// Exports LUN `lun` as a regular file (a no-op when it is exported already); returns the
    /// file.
    ///
    /// # Errors
    /// When the daemon does not start or the export is not up (state is removed again).
    pub async fn start(&self, lun: u32) -> Result<PathBuf> {
        let file = self.file(lun);
        if self.is_active(lun) {
            return Ok(file);
        }
        // A stale daemon (file no longer mounted) or stale files from a crash.
        self.stop(lun).await?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| StorageError::io("unable to create directory", &self.dir, e))?;
        std::fs::File::create(&file)
            .map_err(|e| StorageError::io("unable to create export file", &file, e))?;
        let res = self
            .runner
            .run(&self.daemon_cmd(lun, true).timeout(COMMAND_TIMEOUT))
            .await;
        if let Err(e) = res {
            // On a timeout the daemonized child may still be connecting, without a PID file.
            for pid in daemons_exporting(&file) {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
            let _ = self.stop(lun).await;
            return Err(StorageError::Failed(format!(
                "unable to export LUN {lun} of '{}' through the {} - {e}",
                self.target,
                Initiator::Userspace.describe()
            )));
        }
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        if !self.is_active(lun) || size == 0 {
            let _ = self.stop(lun).await;
            return Err(StorageError::Failed(format!(
                "unable to export LUN {lun} of '{}' through the {} - the FUSE export of '{}' is not up",
                self.target,
                Initiator::Userspace.describe(),
                file.display()
            )));
        }
        Ok(file)
    }

    /// The loop device (`loopN`) attached to LUN `lun`'s exported file, if any.
    #[must_use]
    pub fn loop_device(&self, lun: u32) -> Option<String> {
        let file = self.file(lun);
        let file = file.canonicalize().unwrap_or(file);
        dir_names(Path::new("/sys/block"))
            .into_iter()
            .filter(|d| d.starts_with("loop"))
            .find(|d| {
                read_first_line(&Path::new("/sys/block").join(d).join("loop/backing_file"))
                    .is_some_and(|b| Path::new(&b) == file)
            })
    }

    /// Waits for the loop device on LUN `lun`'s export to go away (the kernel releases a
    /// detached, unmounted loop device asynchronously). Returns the device still attached,
    /// and whether it is mounted (in use), when it is mounted or did not go away within 5 s.
    async fn loop_still_attached(&self, lun: u32) -> Option<(String, bool)> {
        let mut waited = Duration::ZERO;
        loop {
            let dev = self.loop_device(lun)?;
            let source = format!("/dev/{dev}");
            let mounted = vzkit_host::mount::mount_table()
                .map(|t| t.iter().any(|m| m.source == source))
                .unwrap_or(true);
            if mounted || waited >= Duration::from_secs(5) {
                return Some((dev, mounted));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += Duration::from_millis(20);
        }
    }

    /// Stops the export of LUN `lun` (SIGTERM, then SIGKILL after 5 s) and removes its files.
    /// An export whose loop device is mounted (a mounted container) keeps running; one whose
    /// loop device stays attached though unmounted is an error.
    ///
    /// # Errors
    /// When the daemon does not exit or the files cannot be removed.
    pub async fn stop(&self, lun: u32) -> Result<()> {
        match self.loop_still_attached(lun).await {
            // A mounted container still reads through the export: it stays.
            Some((_, true)) => return Ok(()),
            Some((dev, false)) if self.pid(lun).is_some_and(alive) => {
                return Err(StorageError::Failed(format!(
                    "the export of LUN {lun} is still used by /dev/{dev}; not stopped"
                )));
            }
            _ => {}
        }
        if let Some(pid) = self.pid(lun).filter(|p| alive(*p)) {
            let p = rustix::process::Pid::from_raw(pid);
            if let Some(p) = p {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
                let mut waited = Duration::ZERO;
                while alive(pid) && waited < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    waited += Duration::from_millis(20);
                }
                if alive(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if alive(pid) {
                    return Err(StorageError::Failed(format!(
                        "qemu-storage-daemon {pid} exporting LUN {lun} did not exit"
                    )));
                }
            }
        }
        let file = self.file(lun);
        if vzkit_host::mount::is_mountpoint(&file).unwrap_or(false) {
            // The daemon died without unmounting its export.
            let _ = vzkit_host::mount::umount(self.runner.as_ref(), &file, true).await;
        }
        for f in [file, self.pidfile(lun)] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("unable to remove", &f, e)),
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Managed mode: tgt

/// `tgtadm` against one tgtd (directly, or inside its mount namespace).
#[derive(Debug, Clone)]
pub struct Tgtadm {
    runner: Arc<dyn Runner>,
    pidfile: Option<PathBuf>,
}

impl Tgtadm {
    /// `tgtadm`, run through `nsenter -t <pid> -m` when `pidfile` names a tgtd's PID file.
    #[must_use]
    pub fn new(runner: Arc<dyn Runner>, pidfile: Option<PathBuf>) -> Self {
        Self { runner, pidfile }
    }

    /// The command for `tgtadm --lld iscsi <args>`.
    ///
    /// # Errors
    /// When the PID file cannot be read.
    pub fn cmd(&self, args: &[&str]) -> Result<Cmd> {
        let base = match &self.pidfile {
            Some(pf) => {
                let pid = read_first_line(pf)
                    .and_then(|p| p.parse::<u32>().ok())
                    .ok_or_else(|| {
                        StorageError::Failed(format!(
                            "unable to read the tgtd PID from '{}'",
                            pf.display()
                        ))
                    })?;
                Cmd::new(NSENTER).args(["-t", &pid.to_string(), "-m", TGTADM])
            }
            None => Cmd::new(TGTADM),
        };
        Ok(base
            .args(["--lld", "iscsi"])
            .args(args)
            .timeout(COMMAND_TIMEOUT))
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        Ok(self.runner.run_stdout(&self.cmd(args)?).await?)
    }

    /// The target named `name`.
    ///
    /// # Errors
    /// When `tgtadm` fails or tgtd has no such target.
    pub async fn target(&self, name: &str) -> Result<TgtTarget> {
        let out = self.run(&["--op", "show", "--mode", "target"]).await?;
        parse_tgtadm_show(&out)
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| StorageError::NotFound(format!("tgt has no target '{name}'")))
    }

    /// Adds a logical unit `lun` backed by `file`, with `serial` as its SCSI serial number.
    ///
    /// # Errors
    /// When `tgtadm` fails (a half-created unit is deleted again).
    pub async fn new_lun(&self, tid: u32, lun: u32, file: &Path, serial: &str) -> Result<()> {
        let (tid, lun) = (tid.to_string(), lun.to_string());
        let file = file.display().to_string();
        self.run(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &tid,
            "--lun",
            &lun,
            "--backing-store",
            &file,
        ])
        .await?;
        let params = format!("scsi_sn={serial}");
        if let Err(e) = self
            .run(&[
                "--op",
                "update",
                "--mode",
                "logicalunit",
                "--tid",
                &tid,
                "--lun",
                &lun,
                "--params",
                &params,
            ])
            .await
        {
            let _ = self
                .run(&[
                    "--op",
                    "delete",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    &tid,
                    "--lun",
                    &lun,
                ])
                .await;
            return Err(e);
        }
        Ok(())
    }

    /// Deletes logical unit `lun`.
    ///
    /// # Errors
    /// When `tgtadm` fails (a LUN in use, say).
    pub async fn delete_lun(&self, tid: u32, lun: u32) -> Result<()> {
        self.run(&[
            "--op",
            "delete",
            "--mode",
            "logicalunit",
            "--tid",
            &tid.to_string(),
            "--lun",
            &lun.to_string(),
        ])
        .await
        .map(drop)
    }
}

/// The managed-mode settings of a section (`target-provider tgt`, `lun-dir`, `tgt-pidfile`).
#[derive(Debug, Clone)]
pub struct Managed {
    /// Directory of the LUN backing files.
    pub lun_dir: PathBuf,
    /// `tgtadm` access.
    pub tgtadm: Tgtadm,
}

impl Managed {
    /// The managed-mode settings of `section`, `None` without `target-provider`.
    ///
    /// # Errors
    /// `target-provider` without `lun-dir` (or the other way round), or `rootdir` content on
    /// a storage that cannot allocate.
    pub fn from_section(
        section: &StorageSection,
        runner: &Arc<dyn Runner>,
    ) -> Result<Option<Self>> {
        let provider = section.get("target-provider");
        let lun_dir = section.get("lun-dir");
        match (provider, lun_dir) {
            (Some(_), Some(dir)) => Ok(Some(Self {
                lun_dir: PathBuf::from(dir),
                tgtadm: Tgtadm::new(
                    Arc::clone(runner),
                    section.get("tgt-pidfile").map(PathBuf::from),
                ),
            })),
            (Some(_), None) => Err(StorageError::Invalid(format!(
                "storage '{}': 'target-provider' needs 'lun-dir'",
                section.id()
            ))),
            (None, _) if lun_dir.is_some() || section.get("tgt-pidfile").is_some() => {
                Err(StorageError::Invalid(format!(
                    "storage '{}': 'lun-dir' and 'tgt-pidfile' need 'target-provider'",
                    section.id()
                )))
            }
            (None, _) if section.has_content(ContentType::Rootdir) => {
                Err(StorageError::Invalid(format!(
                    "storage '{}': content 'rootdir' needs a managed target ('target-provider')",
                    section.id()
                )))
            }
            (None, _) => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The plugin

/// An `iscsi` storage.
#[derive(Debug)]
pub struct IscsiPlugin {
    section: StorageSection,
    portal: Portal,
    target: String,
    initiator: Initiator,
    sys_root: PathBuf,
    runner: Arc<dyn Runner>,
    libiscsi: Libiscsi,
    exports: FuseExports,
    managed: Option<Managed>,
}

impl IscsiPlugin {
    /// An iscsi plugin for `section` (with `portal` and `target`), choosing the initiator for
    /// this host.
    ///
    /// # Errors
    /// Missing or invalid options.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>, layout: &Layout) -> Result<Self> {
        Self::with_sys_root(section, runner, layout, PathBuf::from("/"))
    }

    /// As [`IscsiPlugin::new`], with sysfs and `/dev` read below `sys_root`.
    ///
    /// # Errors
    /// As [`IscsiPlugin::new`].
    pub fn with_sys_root(
        section: StorageSection,
        runner: Arc<dyn Runner>,
        layout: &Layout,
        sys_root: PathBuf,
    ) -> Result<Self> {
        let portal = Portal::parse(required(&section, "portal")?)?;
        let target = required(&section, "target")?.to_string();
        let initiator = Initiator::choose(section.get("initiator"), &sys_root)?;
        let managed = Managed::from_section(&section, &runner)?;
        let exports = FuseExports::new(
            Arc::clone(&runner),
            export_dir(layout, section.id()),
            portal.clone(),
            target.clone(),
            initiator_name(layout),
        );
        Ok(Self {
            libiscsi: Libiscsi::new(Arc::clone(&runner), portal.clone(), target.clone()),
            section,
            portal,
            target,
            initiator,
            sys_root,
            runner,
            exports,
            managed,
        })
    }

    /// The initiator this storage uses on this host.
    #[must_use]
    pub fn initiator(&self) -> Initiator {
        self.initiator
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    fn not_online(&self) -> StorageError {
        StorageError::Failed(format!(
            "storage '{}' is not online (iscsi portal {} unreachable)",
            self.section.id(),
            self.portal.addr()
        ))
    }

    /// A failure of the kernel path, naming the initiator.
    fn kernel_failed(&self, what: &str) -> StorageError {
        StorageError::Failed(format!(
            "storage '{}': {what} ({})",
            self.section.id(),
            Initiator::Kernel.describe()
        ))
    }

    async fn iscsiadm(&self, args: &[&str]) -> Result<String> {
        let cmd = Cmd::new(ISCSIADM).args(args).timeout(ISCSIADM_TIMEOUT);
        Ok(self.runner.run_stdout(&cmd).await?)
    }

    /// The kernel sessions to this storage's target.
    async fn sessions(&self) -> Result<Vec<String>> {
        let cmd = Cmd::new(ISCSIADM)
            .args(["--mode", "session"])
            .timeout(ISCSIADM_TIMEOUT);
        // "No active sessions" is exit code 21; PVE ignores the exit status here too.
        let out = self.runner.output(&cmd).await?;
        Ok(parse_iscsiadm_sessions(&out.stdout_str())
            .into_iter()
            .filter(|(_, t)| *t == self.target)
            .map(|(sid, _)| sid)
            .collect())
    }

    /// The LUNs of the target.
    ///
    /// # Errors
    /// When they cannot be listed.
    pub async fn luns(&self) -> Result<Vec<Lun>> {
        match self.initiator {
            Initiator::Kernel => Ok(kernel_luns(&self.sys_root, &self.target)),
            Initiator::Userspace => self.libiscsi.luns().await,
        }
    }

    async fn find_lun(&self, volname: &str) -> Result<Lun> {
        let (channel, id, lun, name) = parse_iscsi_volname(volname)?;
        self.luns()
            .await?
            .into_iter()
            .find(|l| (l.channel, l.id, l.lun) == (channel, id, lun) && l.by_id == name)
            .ok_or_else(|| {
                StorageError::NotFound(format!("volume '{}' does not exist", self.volid(volname)))
            })
    }

    fn managed(&self) -> Option<&Managed> {
        self.managed.as_ref()
    }

    /// Allocation in managed mode.
    async fn managed_alloc(
        &self,
        m: &Managed,
        vmid: u32,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        let prefix = format!("vm-{vmid}-");
        if let Some(n) = name
            && (!n.starts_with(&prefix) || n.contains(['/', ' ', '_']))
        {
            return Err(StorageError::Invalid(format!(
                "illegal name '{n}' - should be 'vm-{vmid}-*'"
            )));
        }
        if size_kib == 0 {
            return Err(StorageError::Invalid(
                "iscsi storages cannot hold size-0 (directory) volumes".into(),
            ));
        }
        let existing: Vec<String> = dir_names(&m.lun_dir)
            .into_iter()
            .filter_map(|n| n.strip_suffix(".raw").map(str::to_string))
            .collect();
        let name = match name {
            Some(n) if existing.iter().any(|e| e == n) => {
                return Err(StorageError::AlreadyExists(format!(
                    "disk image '{}/{n}.raw' already exists",
                    m.lun_dir.display()
                )));
            }
            Some(n) => n.to_string(),
            None => volid::next_vm_diskname(&existing, self.id(), vmid, "raw", false, false)
                .map_err(|e| StorageError::Failed(e.to_string()))?,
        };
        let target = m.tgtadm.target(&self.target).await?;
        let lun = target.luns.iter().map(|l| l.lun).max().unwrap_or(0) + 1;
        std::fs::create_dir_all(&m.lun_dir)
            .map_err(|e| StorageError::io("unable to create directory", &m.lun_dir, e))?;
        let file = m.lun_dir.join(format!("{name}.raw"));
        let created = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&file)
            .and_then(|f| f.set_len(size_kib * 1024));
        if let Err(e) = created {
            let _ = std::fs::remove_file(&file);
            return Err(StorageError::io("unable to create backing file", &file, e));
        }
        let undo_file = |e: StorageError| {
            let _ = std::fs::remove_file(&file);
            e
        };
        m.tgtadm
            .new_lun(target.tid, lun, &file, &name)
            .await
            .map_err(undo_file)?;
        if self.initiator == Initiator::Kernel {
            for sid in self.sessions().await.unwrap_or_default() {
                let _ = self
                    .iscsiadm(&["--mode", "session", "--sid", &sid, "--rescan"])
                    .await;
            }
        }
        let found = match self.initiator {
            Initiator::Userspace => self
                .libiscsi
                .by_id(lun)
                .await
                .map(|by_id| format!("0.0.{lun}.{by_id}")),
            Initiator::Kernel => self.luns().await.and_then(|ls| {
                ls.into_iter()
                    .find(|l| l.lun == lun)
                    .map(|l| l.volname())
                    .ok_or_else(|| StorageError::Failed(format!("new LUN {lun} did not appear")))
            }),
        };
        match found {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = m.tgtadm.delete_lun(target.tid, lun).await;
                Err(undo_file(e))
            }
        }
    }

    async fn managed_free(&self, m: &Managed, volname: &str) -> Result<()> {
        let (_, _, lun, name) = parse_iscsi_volname(volname)?;
        let target = m.tgtadm.target(&self.target).await?;
        let unit = target.luns.iter().find(|l| l.lun == lun).ok_or_else(|| {
            StorageError::NotFound(format!("volume '{}' does not exist", self.volid(volname)))
        })?;
        let backing = unit.backing.clone().unwrap_or_default();
        let lun_dir = m
            .lun_dir
            .canonicalize()
            .unwrap_or_else(|_| m.lun_dir.clone());
        if backing.parent() != Some(lun_dir.as_path())
            && backing.parent() != Some(m.lun_dir.as_path())
        {
            return Err(StorageError::Invalid(format!(
                "{} (LUN {lun} is not backed by a file in '{}')",
                msg::FREE,
                m.lun_dir.display()
            )));
        }
        // The LUN number must still name the same volume.
        let current = self.find_lun(volname).await;
        if current.is_err() {
            return Err(StorageError::NotFound(format!(
                "volume '{}' does not exist (LUN {lun} is not '{name}')",
                self.volid(volname)
            )));
        }
        m.tgtadm.delete_lun(target.tid, lun).await?;
        std::fs::remove_file(&backing)
            .map_err(|e| StorageError::io("unable to remove", &backing, e))
    }
}

/// A required option of a section.
pub(crate) fn required<'a>(section: &'a StorageSection, key: &str) -> Result<&'a str> {
    section
        .get(key)
        .ok_or_else(|| StorageError::Invalid(format!("storage definition has no {key}")))
}

/// Where a storage's FUSE exports live: `<root>/run/vzkit/iscsi/<storage>`.
#[must_use]
pub fn export_dir(layout: &Layout, storeid: &str) -> PathBuf {
    layout.join(&format!("/run/vzkit/iscsi/{storeid}"))
}

#[async_trait::async_trait]
impl StoragePlugin for IscsiPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "iscsi"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        let (_, _, _, name) = parse_iscsi_volname(volname)?;
        let vmid = if self.managed.is_some() {
            managed_owner(&name)
        } else {
            None
        };
        Ok(ParsedVolname {
            vtype: VolumeType::Images,
            name,
            vmid,
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
        match self.initiator {
            Initiator::Userspace => {
                if !self.portal.reachable().await {
                    return Err(self.not_online());
                }
                Ok(())
            }
            Initiator::Kernel => {
                let sessions = self.sessions().await?;
                if sessions.is_empty() {
                    if !self.portal.reachable().await {
                        return Err(self.not_online());
                    }
                    let portal = self.portal.addr();
                    self.iscsiadm(&[
                        "--mode",
                        "discovery",
                        "--type",
                        "sendtargets",
                        "--portal",
                        &portal,
                    ])
                    .await?;
                    self.iscsiadm(&[
                        "--mode",
                        "node",
                        "--targetname",
                        &self.target,
                        "--op",
                        "update",
                        "--name",
                        "node.session.initial_login_retry_max",
                        "--value",
                        "0",
                    ])
                    .await?;
                    self.iscsiadm(&["--mode", "node", "--targetname", &self.target, "--login"])
                        .await?;
                } else {
                    for sid in sessions {
                        self.iscsiadm(&["--mode", "session", "--sid", &sid, "--rescan"])
                            .await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn deactivate_storage(&self) -> Result<()> {
        if self.initiator == Initiator::Kernel && !self.sessions().await?.is_empty() {
            self.iscsiadm(&["--mode", "node", "--targetname", &self.target, "--logout"])
                .await?;
        }
        Ok(())
    }

    async fn status(&self) -> Result<StorageStatus> {
        let active = match self.initiator {
            Initiator::Kernel => !self.sessions().await?.is_empty(),
            Initiator::Userspace => self.portal.reachable().await,
        };
        if let Some(m) = self.managed()
            && let Ok(st) = rustix::fs::statvfs(&m.lun_dir)
        {
            let total = st.f_blocks * st.f_frsize;
            let avail = st.f_bavail * st.f_frsize;
            return Ok(StorageStatus {
                total,
                avail,
                used: total.saturating_sub(st.f_bfree * st.f_frsize),
                active,
            });
        }
        Ok(StorageStatus {
            total: 0,
            avail: 0,
            used: 0,
            active,
        })
    }

    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        if snapname.is_some() {
            return Err(StorageError::Unsupported(msg::SNAPSHOT_PATH.into()));
        }
        let (_, _, lun, name) = parse_iscsi_volname(volname)?;
        Ok(match self.initiator {
            Initiator::Kernel => PathBuf::from("/dev/disk/by-id").join(name),
            Initiator::Userspace => self.exports.file(lun),
        })
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        let path = self.path(volname, snapname).await?;
        Ok(match self.initiator {
            Initiator::Kernel => VolumeAccess::BlockDevice(path),
            Initiator::Userspace => VolumeAccess::ImageFile(path),
        })
    }

    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        let Some(m) = self.managed() else {
            return Err(StorageError::Unsupported(msg::ALLOC.into()));
        };
        if format != "raw" {
            return Err(StorageError::Invalid(format!(
                "unsupported format '{format}'"
            )));
        }
        self.managed_alloc(m, vmid, name, size_kib).await
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let Some(m) = self.managed() else {
            return Err(StorageError::Unsupported(msg::FREE.into()));
        };
        self.managed_free(m, volname).await
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        for l in self.luns().await? {
            let volname = l.volname();
            let owner = self.parse_volname(&volname)?.vmid.unwrap_or(0);
            if vmid.is_some_and(|v| v != owner) {
                continue;
            }
            let mut info = VolumeInfo::new(self.volid(&volname), "images", "raw", l.size);
            info.vmid = Some(owner);
            res.push(info);
        }
        Ok(res)
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        if snapname.is_some() {
            return Err(StorageError::Unsupported(msg::SNAPSHOT_PATH.into()));
        }
        match self.initiator {
            Initiator::Userspace => {
                let lun = self.find_lun(volname).await?;
                self.exports.start(lun.lun).await.map(drop)
            }
            Initiator::Kernel => {
                let path = self.path(volname, None).await?;
                let real = path.canonicalize().map_err(|_| {
                    StorageError::NotFound(format!(
                        "volume '{}' does not exist ('{}' is missing; {})",
                        self.volid(volname),
                        path.display(),
                        Initiator::Kernel.describe()
                    ))
                })?;
                use std::os::unix::fs::FileTypeExt;
                let is_block = std::fs::metadata(&real)
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false);
                if !is_block {
                    return Err(
                        self.kernel_failed(&format!("'{}' is not a block device", real.display()))
                    );
                }
                Ok(())
            }
        }
    }

    async fn deactivate_volume(&self, volname: &str, _snapname: Option<&str>) -> Result<()> {
        if self.initiator == Initiator::Userspace {
            let (_, _, lun, _) = parse_iscsi_volname(volname)?;
            self.exports.stop(lun).await?;
        }
        Ok(())
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        Ok(self.find_lun(volname).await?.size)
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
    use vzkit_host::command::{Output, RecordingRunner};

    /// Verbatim `iscsi-ls -s iscsi://127.0.0.1` (libiscsi 1.19) against tgt 1.0.85.
    const LS_OUT: &str = "Target:iqn.2024-01.test.local:t1 Portal:127.0.0.1:3260,1\n\
Lun:0    Type:STORAGE_ARRAY_CONTROLLER\n\
Lun:1    Type:DIRECT_ACCESS (Size:63M)\n\
Lun:2    Type:DIRECT_ACCESS (Size:31M)\n\
Target:iqn.2024-01.test.local:other Portal:127.0.0.1:3260,1\n\
Lun:1    Type:DIRECT_ACCESS (Size:1.5G)\n";
    /// Verbatim `iscsi-inq iscsi://…/1` (abridged: the lines read).
    const INQ_OUT: &str = "Peripheral Qualifier:CONNECTED\nPeripheral Device Type:DIRECT_ACCESS\n\
Vendor:IET     \nProduct:VIRTUAL-DISK    \nRevision:0001\n";
    /// Verbatim `iscsi-inq -e 1 -c 128 iscsi://…/1`.
    const SERIAL_OUT: &str = "Unit Serial Number:[                              beaf11]\n";
    /// Verbatim `iscsi-readcapacity16 iscsi://…/2`.
    const CAP_OUT: &str = "RETURNED LOGICAL BLOCK ADDRESS:65535\nLOGICAL BLOCK LENGTH IN BYTES:512\n\
P_TYPE:0 PROT_EN:0\nLBPME:0 LBPRZ:0\nTotal size:33554432\n";
    /// Verbatim `tgtadm --lld iscsi --op show --mode target` (tgt 1.0.85), abridged.
    const TGT_SHOW: &str = "Target 1: iqn.2024-01.test.local:t1\n    System information:\n        Driver: iscsi\n\
        State: ready\n    I_T nexus information:\n        I_T nexus: 23\n            Initiator: iqn.2003-01.org.vzkit:vm alias: none\n\
    LUN information:\n        LUN: 0\n            Type: controller\n            Backing store type: null\n\
            Backing store path: None\n        LUN: 1\n            Type: disk\n            SCSI SN: beaf11\n\
            Backing store path: /srv/luns/vm-100-disk-0.raw\n    ACL information:\n        ALL\n\
Target 2: iqn.2024-01.test.local:t2\n    LUN information:\n        LUN: 0\n";

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn plugin_at(
        extra: &str,
        portal: &str,
        sys_root: &Path,
    ) -> (IscsiPlugin, Arc<RecordingRunner>) {
        let (cfg, warnings) = StorageConfig::parse(
            &format!("iscsi: san\n\tportal {portal}\n\ttarget iqn.2024-01.test.local:t1\n{extra}"),
            "storage.cfg",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner = Arc::new(RecordingRunner::new());
        let p = IscsiPlugin::with_sys_root(
            cfg.get("san").unwrap().clone(),
            runner.clone(),
            &Layout::new("/vz"),
            sys_root.to_path_buf(),
        )
        .unwrap();
        (p, runner)
    }

    #[test]
    fn portals() {
        let p = Portal::parse("10.0.0.5").unwrap();
        assert_eq!(
            (p.addr(), p.url(None)),
            ("10.0.0.5:3260".into(), "iscsi://10.0.0.5".into())
        );
        let p = Portal::parse("san.example:3261").unwrap();
        assert_eq!(p.addr(), "san.example:3261");
        assert_eq!(
            p.url(Some(("iqn.x:y", 3))),
            "iscsi://san.example:3261/iqn.x:y/3"
        );
        let p = Portal::parse("[fd00::1]:3262").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.addr()),
            ("fd00::1", 3262, "[fd00::1]:3262".into())
        );
        assert_eq!(Portal::parse("fd00::2").unwrap().addr(), "[fd00::2]:3260");
        for bad in ["", "h:0", "h:x", "[fd00::1", "a b", "h:70000"] {
            assert_eq!(
                Portal::parse(bad).unwrap_err().to_string(),
                format!("invalid iscsi portal '{bad}'")
            );
        }
    }

    #[test]
    fn libiscsi_output_parses() {
        let luns = parse_iscsi_ls(LS_OUT);
        assert_eq!(luns.len(), 4);
        assert_eq!(
            luns[1],
            LsLun {
                target: "iqn.2024-01.test.local:t1".into(),
                lun: 1,
                device_type: "DIRECT_ACCESS".into(),
                size: Some(63 << 20),
            }
        );
        assert_eq!(luns[0].size, None);
        assert_eq!(luns[3].target, "iqn.2024-01.test.local:other");
        assert_eq!(luns[3].size, Some(1_610_612_736));
        assert_eq!(parse_unit_serial(SERIAL_OUT).as_deref(), Some("beaf11"));
        assert_eq!(parse_unit_serial("Unit Serial Number:[   ]\n"), None);
        assert_eq!(parse_readcapacity16(CAP_OUT), Some(33_554_432));
        assert_eq!(
            by_id_from_serial(
                field(INQ_OUT, "Vendor").unwrap(),
                field(INQ_OUT, "Product").unwrap(),
                "beaf11"
            ),
            "scsi-SIET_VIRTUAL-DISK_beaf11"
        );
        // Short fields are padded as in the INQUIRY data; odd characters become '_'.
        assert_eq!(
            by_id_from_serial("LIO-ORG", "FILEIO", "a b/c"),
            "scsi-SLIO-ORG_FILEIO_a_b_c"
        );
    }

    #[test]
    fn iscsiadm_and_tgtadm_output_parses() {
        let s = parse_iscsiadm_sessions(
            "tcp: [1] 10.0.0.5:3260,1 iqn.2003-01.org.example:t1 (non-flash)\n\
             tcp: [12] [fd00::1]:3260,1 iqn.2003-01.org.example:t2 (non-flash)\n\
             iscsiadm: No active sessions.\n",
        );
        assert_eq!(
            s,
            [
                ("1".to_string(), "iqn.2003-01.org.example:t1".to_string()),
                ("12".to_string(), "iqn.2003-01.org.example:t2".to_string())
            ]
        );
        let t = parse_tgtadm_show(TGT_SHOW);
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].tid, t[0].name.as_str()),
            (1, "iqn.2024-01.test.local:t1")
        );
        assert_eq!(
            t[0].luns,
            [
                TgtLun {
                    lun: 0,
                    backing: None
                },
                TgtLun {
                    lun: 1,
                    backing: Some("/srv/luns/vm-100-disk-0.raw".into())
                }
            ]
        );
        assert_eq!(
            t[1].luns,
            [TgtLun {
                lun: 0,
                backing: None
            }]
        );
    }

    #[test]
    fn volume_names() {
        assert_eq!(
            parse_iscsi_volname("0.0.1.scsi-36001405abc").unwrap(),
            (0, 0, 1, "scsi-36001405abc".to_string())
        );
        assert_eq!(parse_iscsi_volname("1.2.3.a.b").unwrap().3, "a.b");
        for bad in [
            "lun1",
            "0.0.1",
            "0.0.x.n",
            "0.0.1.",
            "0.0.1.a/b",
            "-1.0.1.x",
        ] {
            assert_eq!(
                parse_iscsi_volname(bad).unwrap_err().to_string(),
                format!("unable to parse iscsi volume name '{bad}'")
            );
        }
        assert_eq!(
            managed_owner("scsi-SIET_VIRTUAL-DISK_vm-100-disk-0"),
            Some(100)
        );
        assert_eq!(managed_owner("scsi-SIET_VIRTUAL-DISK_beaf11"), None);
        assert_eq!(managed_owner("scsi-SIET_VIRTUAL-DISK_vm-100-disk-"), None);
    }

    #[test]
    fn initiator_choice() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Initiator::choose(None, dir.path()).unwrap(),
            Initiator::Userspace
        );
        assert_eq!(
            Initiator::choose(Some("kernel"), dir.path())
                .unwrap_err()
                .to_string(),
            "the kernel iSCSI initiator is not available (no /sys/class/iscsi_transport/tcp: \
             load iscsi_tcp, or use 'initiator userspace')"
        );
        std::fs::create_dir_all(dir.path().join("sys/class/iscsi_transport/tcp")).unwrap();
        assert_eq!(
            Initiator::choose(Some("auto"), dir.path()).unwrap(),
            Initiator::Kernel
        );
        assert_eq!(
            Initiator::choose(Some("userspace"), dir.path()).unwrap(),
            Initiator::Userspace
        );
    }

    /// A sysfs and /dev/disk/by-id tree as the kernel initiator leaves it (session 1 on host
    /// 2, two disks, one of them multipathed, plus a LUN of another target).
    fn fake_sysfs(root: &Path) {
        let w = |rel: &str, text: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        let d = |rel: &str| std::fs::create_dir_all(root.join(rel)).unwrap();
        w(
            "sys/class/iscsi_session/session1/targetname",
            "iqn.2024-01.test.local:t1\n",
        );
        d("sys/class/iscsi_session/session1/device/target2:0:0");
        w(
            "sys/class/iscsi_session/session2/targetname",
            "iqn.other:x\n",
        );
        d("sys/class/iscsi_session/session2/device/target3:0:0");
        for (dev, ty, blk) in [
            ("2:0:0:0", "12", None),
            ("2:0:0:1", "0", Some("sdb")),
            ("2:0:0:2", "0", Some("sdc")),
            ("3:0:0:1", "0", Some("sdd")),
        ] {
            w(
                &format!("sys/bus/scsi/devices/{dev}/type"),
                &format!("{ty}\n"),
            );
            if let Some(b) = blk {
                d(&format!("sys/bus/scsi/devices/{dev}/block/{b}"));
            }
        }
        w("sys/block/sdb/size", "131072\n");
        d("sys/block/sdc/holders/dm-0");
        w("sys/block/dm-0/size", "65536\n");
        w("sys/block/sdd/size", "2048\n");
        d("dev/disk/by-id");
        for (name, target) in [
            ("scsi-360000000000000000e00000000010001", "../../sdb"),
            ("scsi-360000000000000000e00000000010001-part1", "../../sdb1"),
            (
                "dm-uuid-mpath-360000000000000000e00000000010002",
                "../../dm-0",
            ),
            ("scsi-SIET_VIRTUAL-DISK_other", "../../sdd"),
            ("wwn-0x60000000000000000e00000000010001", "../../sdb"),
        ] {
            std::os::unix::fs::symlink(target, root.join("dev/disk/by-id").join(name)).unwrap();
        }
    }

    #[test]
    fn kernel_luns_come_from_sysfs_as_pve_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path());
        assert_eq!(
            kernel_luns(dir.path(), "iqn.2024-01.test.local:t1"),
            [
                Lun {
                    channel: 0,
                    id: 0,
                    lun: 1,
                    by_id: "scsi-360000000000000000e00000000010001".into(),
                    size: 64 << 20
                },
                Lun {
                    channel: 0,
                    id: 0,
                    lun: 2,
                    by_id: "dm-uuid-mpath-360000000000000000e00000000010002".into(),
                    size: 32 << 20
                },
            ]
        );
        assert!(kernel_luns(dir.path(), "iqn.none:x").is_empty());
    }

    #[test]
    fn userspace_listing_runs_libiscsi_tools() {
        let dir = tempfile::tempdir().unwrap();
        let (p, r) = plugin_at("", "127.0.0.1", dir.path());
        assert_eq!(p.initiator(), Initiator::Userspace);
        r.push_reply(Output::ok(LS_OUT));
        for _ in 0..2 {
            r.push_reply(Output::ok(INQ_OUT));
            r.push_reply(Output::ok(SERIAL_OUT));
            r.push_reply(Output::ok(CAP_OUT));
        }
        let list = block_on(p.list_images(None)).unwrap();
        let url = "iscsi://127.0.0.1/iqn.2024-01.test.local:t1";
        assert_eq!(
            r.call_lines(),
            [
                "/usr/bin/iscsi-ls -s iscsi://127.0.0.1".to_string(),
                format!("/usr/bin/iscsi-inq {url}/1"),
                format!("/usr/bin/iscsi-inq -e 1 -c 128 {url}/1"),
                format!("/usr/bin/iscsi-readcapacity16 {url}/1"),
                format!("/usr/bin/iscsi-inq {url}/2"),
                format!("/usr/bin/iscsi-inq -e 1 -c 128 {url}/2"),
                format!("/usr/bin/iscsi-readcapacity16 {url}/2"),
            ]
        );
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].volid, "san:0.0.1.scsi-SIET_VIRTUAL-DISK_beaf11");
        assert_eq!((list[0].size, list[0].vmid), (33_554_432, Some(0)));
        assert_eq!(
            block_on(p.path("0.0.1.scsi-SIET_VIRTUAL-DISK_beaf11", None)).unwrap(),
            Path::new("/vz/run/vzkit/iscsi/san/lun1.img")
        );
        assert_eq!(
            block_on(p.access("0.0.7.x", None)).unwrap(),
            VolumeAccess::ImageFile("/vz/run/vzkit/iscsi/san/lun7.img".into())
        );
        assert_eq!(
            block_on(p.path("0.0.1.x", Some("s")))
                .unwrap_err()
                .to_string(),
            "snapshot is not possible on iscsi storage"
        );
    }

    #[test]
    fn kernel_activation_runs_pves_iscsiadm_commands() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/iscsi_tcp")).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let portal = listener.local_addr().unwrap().to_string();
        // No session yet: discovery, no login retries, login.
        let (p, r) = plugin_at("", &portal, dir.path());
        assert_eq!(p.initiator(), Initiator::Kernel);
        r.push_reply(Output::failed(21, "iscsiadm: No active sessions.\n"));
        block_on(p.activate_storage()).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "/usr/bin/iscsiadm --mode session".to_string(),
                format!("/usr/bin/iscsiadm --mode discovery --type sendtargets --portal {portal}"),
                "/usr/bin/iscsiadm --mode node --targetname iqn.2024-01.test.local:t1 --op update \
                 --name node.session.initial_login_retry_max --value 0"
                    .to_string(),
                "/usr/bin/iscsiadm --mode node --targetname iqn.2024-01.test.local:t1 --login"
                    .to_string(),
            ]
        );
        // A session: rescan it; deactivation logs out.
        let (p, r) = plugin_at("", &portal, dir.path());
        let sessions = format!("tcp: [4] {portal},1 iqn.2024-01.test.local:t1 (non-flash)\n");
        r.push_reply(Output::ok(sessions.clone()));
        block_on(p.activate_storage()).unwrap();
        r.push_reply(Output::ok(sessions));
        block_on(p.deactivate_storage()).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "/usr/bin/iscsiadm --mode session",
                "/usr/bin/iscsiadm --mode session --sid 4 --rescan",
                "/usr/bin/iscsiadm --mode session",
                "/usr/bin/iscsiadm --mode node --targetname iqn.2024-01.test.local:t1 --logout",
            ]
        );
        assert_eq!(
            block_on(p.path("0.0.1.scsi-3600", None)).unwrap(),
            Path::new("/dev/disk/by-id/scsi-3600")
        );
        assert_eq!(
            block_on(p.access("0.0.1.scsi-3600", None)).unwrap(),
            VolumeAccess::BlockDevice("/dev/disk/by-id/scsi-3600".into())
        );
        // An unreachable portal is refused before iscsiadm would retry it for minutes.
        drop(listener);
        let (p, r) = plugin_at("", &portal, dir.path());
        r.push_reply(Output::failed(21, ""));
        assert_eq!(
            block_on(p.activate_storage()).unwrap_err().to_string(),
            format!("storage 'san' is not online (iscsi portal {portal} unreachable)")
        );
        assert_eq!(r.call_lines(), ["/usr/bin/iscsiadm --mode session"]);
    }

    #[test]
    fn refusals_carry_pves_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (p, r) = plugin_at("", "127.0.0.1", dir.path());
        let v = "0.0.1.scsi-x";
        let errs = [
            block_on(p.alloc_image(100, "raw", None, 1024)).unwrap_err(),
            block_on(p.free_image(v)).unwrap_err(),
            block_on(p.volume_resize(v, 1 << 30)).unwrap_err(),
            block_on(p.volume_snapshot(v, "s")).unwrap_err(),
            block_on(p.volume_snapshot_rollback(v, "s")).unwrap_err(),
            block_on(p.volume_snapshot_delete(v, "s")).unwrap_err(),
            block_on(p.clone_image(v, 101, None)).unwrap_err(),
            block_on(p.create_base(v)).unwrap_err(),
        ];
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                msg::ALLOC,
                msg::FREE,
                msg::RESIZE,
                msg::SNAPSHOT,
                msg::ROLLBACK,
                msg::SNAPSHOT_DELETE,
                msg::CLONE,
                msg::CREATE_BASE
            ]
        );
        assert!(r.calls().is_empty());
        for f in [
            Feature::Snapshot,
            Feature::Clone,
            Feature::Template,
            Feature::Rename,
        ] {
            assert!(!p.volume_has_feature(f, v, None).unwrap());
        }
        assert!(p.volume_has_feature(Feature::Copy, v, None).unwrap());
        assert!(!p.volume_has_feature(Feature::Copy, v, Some("s")).unwrap());
        assert!(p.container_mountable());
    }

    #[test]
    fn fuse_export_command() {
        let exports = FuseExports::new(
            Arc::new(RecordingRunner::new()),
            "/vz/run/vzkit/iscsi/san".into(),
            Portal::parse("127.0.0.1").unwrap(),
            "iqn.2024-01.test.local:t1".into(),
            "iqn.2003-01.org.vzkit:node1".into(),
        );
        assert_eq!(
            exports.daemon_cmd(3, true).argv(),
            [
                "qemu-storage-daemon",
                "--blockdev",
                "driver=iscsi,node-name=lun3,transport=tcp,portal=127.0.0.1:3260,\
                 target=iqn.2024-01.test.local:t1,lun=3,initiator-name=iqn.2003-01.org.vzkit:node1",
                "--export",
                "type=fuse,id=export3,node-name=lun3,mountpoint=/vz/run/vzkit/iscsi/san/lun3.img,writable=on",
                "--pidfile",
                "/vz/run/vzkit/iscsi/san/lun3.pid",
                "--daemonize",
            ]
        );
        assert_eq!(qemu_escape("a,b"), "a,,b");
        let layout = Layout::new("/nonexistent-root");
        assert!(initiator_name(&layout).starts_with("iqn.2003-01.org.vzkit:"));
    }

    #[test]
    fn managed_mode_runs_tgtadm() {
        let dir = tempfile::tempdir().unwrap();
        let luns = dir.path().join("luns");
        let pidfile = dir.path().join("tgtd.pid");
        std::fs::write(&pidfile, "4242\n").unwrap();
        let (p, r) = plugin_at(
            &format!(
                "\tcontent images,rootdir\n\ttarget-provider tgt\n\tlun-dir {}\n\ttgt-pidfile {}\n",
                luns.display(),
                pidfile.display()
            ),
            "127.0.0.1",
            dir.path(),
        );
        assert_eq!(
            p.parse_volname("0.0.2.scsi-SIET_VIRTUAL-DISK_vm-100-disk-0")
                .unwrap()
                .vmid,
            Some(100)
        );
        r.push_reply(Output::ok(TGT_SHOW));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok(INQ_OUT));
        r.push_reply(Output::ok("Unit Serial Number:[vm-100-disk-0]\n"));
        let vol = block_on(p.alloc_image(100, "raw", None, 65536)).unwrap();
        assert_eq!(vol, "0.0.2.scsi-SIET_VIRTUAL-DISK_vm-100-disk-0");
        let file = luns.join("vm-100-disk-0.raw");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20);
        let ta = "nsenter -t 4242 -m tgtadm --lld iscsi";
        let url = "iscsi://127.0.0.1/iqn.2024-01.test.local:t1/2";
        assert_eq!(
            r.call_lines(),
            [
                format!("{ta} --op show --mode target"),
                format!(
                    "{ta} --op new --mode logicalunit --tid 1 --lun 2 --backing-store {}",
                    file.display()
                ),
                format!(
                    "{ta} --op update --mode logicalunit --tid 1 --lun 2 --params scsi_sn=vm-100-disk-0"
                ),
                format!("/usr/bin/iscsi-inq {url}"),
                format!("/usr/bin/iscsi-inq -e 1 -c 128 {url}"),
            ]
        );
        // A failed tgtadm leaves no backing file behind.
        let (p, r) = plugin_at(
            &format!("\ttarget-provider tgt\n\tlun-dir {}\n", luns.display()),
            "127.0.0.1",
            dir.path(),
        );
        r.push_reply(Output::ok(TGT_SHOW));
        r.push_reply(Output::failed(
            22,
            "tgtadm: this logical unit number already exists\n",
        ));
        let err = block_on(p.alloc_image(101, "raw", None, 1024)).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(!luns.join("vm-101-disk-0.raw").exists());
        assert_eq!(
            r.call_lines()[1],
            format!(
                "tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 2 --backing-store {}",
                luns.join("vm-101-disk-0.raw").display()
            )
        );
        // Names are the owner's; size 0 (a directory) cannot be a LUN.
        let err = block_on(p.alloc_image(101, "raw", Some("vm-102-disk-0"), 1024)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-102-disk-0' - should be 'vm-101-*'"
        );
        let err = block_on(p.alloc_image(101, "raw", None, 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "iscsi storages cannot hold size-0 (directory) volumes"
        );
        // Free refuses LUNs whose backing file is elsewhere, without touching tgt.
        let (p, r) = plugin_at(
            "\ttarget-provider tgt\n\tlun-dir /elsewhere\n",
            "127.0.0.1",
            dir.path(),
        );
        r.push_reply(Output::ok(TGT_SHOW));
        let err = block_on(p.free_image("0.0.1.scsi-SIET_VIRTUAL-DISK_beaf11")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "can't free space in iscsi storage (LUN 1 is not backed by a file in '/elsewhere')"
        );
        assert_eq!(
            r.call_lines(),
            ["tgtadm --lld iscsi --op show --mode target"]
        );
    }
}
