//! The container config file `/etc/pve/lxc/<vmid>.conf` (`pct.conf` inside backups).
//!
//! ```text
//! #free-form description, %-encoded
//! arch: amd64
//! hostname: ct1
//! rootfs: local-lvm:vm-100-disk-0,size=8G
//! lxc.environment.runtime: FOO=1
//! lxc.apparmor.profile: unconfined
//!
//! [pve:pending]
//! delete: swap
//!
//! [snap1]
//! ...
//! ```
//!
//! Compatibility target: pve-container `parse_pct_config` / `write_pct_config`
//! (`PVE::LXC::Config`, commit 94f55852) — byte-exact output for files PVE writes. Each
//! section (main, `[pve:pending]`, `[<snapshot>]`) is written as: the description as `#`
//! lines (PVE's %-encoding of everything outside 0x20-0x24, 0x26-0x39, 0x3b-0x7e), all
//! keys sorted, one `lxc.environment.runtime:` line per `env` entry, then the raw `lxc.*`
//! keys in stored order. Pending follows the main section if it has content, snapshots
//! follow sorted by name, each after an empty line. The writer leaves out `snapstate` of
//! the main section and `unusedN` entries whose volume a `rootfs`/`mpN` still uses.
//!
//! Values are kept as the strings PVE would store (the parser's `check_type`
//! normalisation applied: booleans `1`/`0`, integers without leading zeros), so values
//! vzkit does not understand survive a round trip; typed views are accessor methods.
//! Deviations: raw `lxc.*` values with a newline are refused by the writer (PVE would write
//! a corrupt file); keys PVE keeps but never writes (`digest`, `snapname`, `lxc`,
//! `pending`, `snapshots` as plain `key: value` lines) are dropped by the parser with a
//! warning.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;
use sha1::{Digest, Sha1};

use super::error::ConfError;
use super::idmap::IdMap;
use super::mountpoint::{self, MountPoint, MountPointKind, index_of, is_indexed};
use super::net::{DevConfig, NetConfig};
use super::options::{self, MAX_LXC_NETWORKS, MAX_MOUNT_POINTS, MAX_UNUSED_DISKS};
use super::propstring::perl_true;

/// Value of the `lock` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lock {
    /// `backup`
    Backup,
    /// `create`
    Create,
    /// `destroyed`
    Destroyed,
    /// `disk`
    Disk,
    /// `fstrim`
    Fstrim,
    /// `migrate`
    Migrate,
    /// `mounted`
    Mounted,
    /// `rollback`
    Rollback,
    /// `snapshot`
    Snapshot,
    /// `snapshot-delete`
    SnapshotDelete,
}

impl Lock {
    /// All locks, in PVE's enum order.
    pub const ALL: [Lock; 10] = [
        Self::Backup,
        Self::Create,
        Self::Destroyed,
        Self::Disk,
        Self::Fstrim,
        Self::Migrate,
        Self::Mounted,
        Self::Rollback,
        Self::Snapshot,
        Self::SnapshotDelete,
    ];

    /// The config value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        options::LOCK_VALUES[self as usize]
    }
}

impl fmt::Display for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Lock {
    type Err = ConfError;
    fn from_str(s: &str) -> Result<Self, ConfError> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| ConfError::InvalidValue {
                key: "lock".to_string(),
                message: format!(
                    "value '{s}' does not have a value in the enumeration '{}'",
                    options::LOCK_VALUES.join(", ")
                ),
            })
    }
}

/// `snapstate` of a snapshot section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapState {
    /// Snapshot creation in progress.
    Prepare,
    /// Snapshot deletion in progress.
    Delete,
}

impl SnapState {
    /// The config value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Delete => "delete",
        }
    }
}

/// How PVE treats a raw `lxc.*` key (`is_valid_lxc_conf_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LxcKeyValidity {
    /// Accepted.
    Valid,
    /// Accepted with a warning (deprecated name); the message is the warning's tail.
    Deprecated(String),
    /// Refused with a specific message (`lxc.rootfs.path`, `lxc.rootfs.options`).
    Refused(&'static str),
    /// Not a key PVE passes through.
    Unknown,
}

const VALID_LXC_KEYS: &[&str] = &[
    "lxc.apparmor.profile",
    "lxc.apparmor.allow_incomplete",
    "lxc.apparmor.allow_nesting",
    "lxc.apparmor.raw",
    "lxc.selinux.context",
    "lxc.include",
    "lxc.arch",
    "lxc.uts.name",
    "lxc.signal.halt",
    "lxc.signal.reboot",
    "lxc.signal.stop",
    "lxc.init.cmd",
    "lxc.pty.max",
    "lxc.console.logfile",
    "lxc.console.path",
    "lxc.tty.max",
    "lxc.devtty.dir",
    "lxc.hook.autodev",
    "lxc.autodev",
    "lxc.kmsg",
    "lxc.mount.fstab",
    "lxc.mount.entry",
    "lxc.mount.auto",
    "lxc.rootfs.mount",
    "lxc.cap.drop",
    "lxc.cap.keep",
    "lxc.seccomp.profile",
    "lxc.seccomp.notify.proxy",
    "lxc.seccomp.notify.cookie",
    "lxc.idmap",
    "lxc.hook.pre-start",
    "lxc.hook.pre-mount",
    "lxc.hook.mount",
    "lxc.hook.start",
    "lxc.hook.stop",
    "lxc.hook.post-stop",
    "lxc.hook.clone",
    "lxc.hook.destroy",
    "lxc.hook.version",
    "lxc.log.level",
    "lxc.log.file",
    "lxc.start.auto",
    "lxc.start.delay",
    "lxc.start.order",
    "lxc.group",
    "lxc.environment",
    "lxc.environment.runtime",
    "lxc.environment.hooks",
    // Namespaced via CLONE_NEWIPC.
    "lxc.sysctl.fs.mqueue",
    "lxc.sysctl.kernel.msgmax",
    "lxc.sysctl.kernel.msgmnb",
    "lxc.sysctl.kernel.msgmni",
    "lxc.sysctl.kernel.sem",
    "lxc.sysctl.kernel.shmall",
    "lxc.sysctl.kernel.shmmax",
    "lxc.sysctl.kernel.shmmni",
    "lxc.sysctl.kernel.shm_rmid_forced",
];

const DEPRECATED_LXC_KEYS: &[(&str, &str)] = &[
    ("lxc.aa_profile", "lxc.apparmor.profile"),
    ("lxc.aa_allow_incomplete", "lxc.apparmor.allow_incomplete"),
    ("lxc.console", "lxc.console.path"),
    ("lxc.devttydir", "lxc.tty.dir"),
    ("lxc.haltsignal", "lxc.signal.halt"),
    ("lxc.rebootsignal", "lxc.signal.reboot"),
    ("lxc.stopsignal", "lxc.signal.stop"),
    ("lxc.id_map", "lxc.idmap"),
    ("lxc.init_cmd", "lxc.init.cmd"),
    ("lxc.loglevel", "lxc.log.level"),
    ("lxc.logfile", "lxc.log.file"),
    ("lxc.mount", "lxc.mount.fstab"),
    ("lxc.network.type", "lxc.net.INDEX.type"),
    ("lxc.network.flags", "lxc.net.INDEX.flags"),
    ("lxc.network.link", "lxc.net.INDEX.link"),
    ("lxc.network.mtu", "lxc.net.INDEX.mtu"),
    ("lxc.network.name", "lxc.net.INDEX.name"),
    ("lxc.network.hwaddr", "lxc.net.INDEX.hwaddr"),
    ("lxc.network.ipv4", "lxc.net.INDEX.ipv4.address"),
    ("lxc.network.ipv4.gateway", "lxc.net.INDEX.ipv4.gateway"),
    ("lxc.network.ipv6", "lxc.net.INDEX.ipv6.address"),
    ("lxc.network.ipv6.gateway", "lxc.net.INDEX.ipv6.gateway"),
    ("lxc.network.script.up", "lxc.net.INDEX.script.up"),
    ("lxc.network.script.down", "lxc.net.INDEX.script.down"),
    ("lxc.pts", "lxc.pty.max"),
    ("lxc.se_context", "lxc.selinux.context"),
    ("lxc.seccomp", "lxc.seccomp.profile"),
    ("lxc.tty", "lxc.tty.max"),
    ("lxc.utsname", "lxc.uts.name"),
];

/// `is_valid_lxc_conf_key`: the raw-key whitelist.
#[must_use]
pub fn lxc_key_validity(key: &str) -> LxcKeyValidity {
    if key.starts_with("lxc.limit.") {
        return LxcKeyValidity::Deprecated("lxc.limit.* was renamed to lxc.prlimit.*".into());
    }
    if let Some((_, new)) = DEPRECATED_LXC_KEYS.iter().find(|(old, _)| *old == key) {
        return LxcKeyValidity::Deprecated(format!("is deprecated and was renamed to {new}"));
    }
    match key {
        "lxc.rootfs.path" => {
            return LxcKeyValidity::Refused("lxc.rootfs.path is auto generated from rootfs");
        }
        "lxc.rootfs.options" => {
            return LxcKeyValidity::Refused(
                "lxc.rootfs.options is not supported, please use mount point options in the \
                 \"rootfs\" key",
            );
        }
        _ => {}
    }
    if VALID_LXC_KEYS.contains(&key)
        || key.starts_with("lxc.cgroup.")
        || key.starts_with("lxc.cgroup2.")
        || key.starts_with("lxc.prlimit.")
        || key.starts_with("lxc.net.")
    {
        LxcKeyValidity::Valid
    } else {
        LxcKeyValidity::Unknown
    }
}

/// One section of a config file: the current config, `[pve:pending]` or a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSection {
    /// Description (the decoded `#` lines, each ending in `\n`).
    pub description: Option<String>,
    /// `key: value` options as stored (includes `snapstate` in snapshot sections and
    /// `delete` in the pending section).
    pub options: BTreeMap<String, String>,
    /// Raw `lxc.*` keys in file order, without `lxc.environment.runtime`.
    pub lxc: Vec<(String, String)>,
    /// `lxc.environment.runtime` entries (PVE's NUL-separated `env`).
    pub env: Vec<String>,
}

/// Keys the writer never prints as `key: value`.
const UNWRITTEN_KEYS: [&str; 7] = [
    "digest",
    "description",
    "pending",
    "snapshots",
    "snapname",
    "env",
    "lxc",
];

/// `PVE::Tools::encode_text`.
#[must_use]
pub fn encode_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        let safe = matches!(b, 0x20..=0x24 | 0x26..=0x39 | 0x3b..=0x7e);
        if safe {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `PVE::Tools::decode_text`: URI-unescape, then UTF-8 decode (invalid sequences become
/// U+FFFD).
#[must_use]
pub fn decode_text(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| char::from(c).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Both digits < 16, so the value fits a byte.
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ConfigSection {
    /// `true` if the section would print anything.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.description.is_none()
            && self.options.is_empty()
            && self.lxc.is_empty()
            && self.env.is_empty()
    }

    /// The stored value of `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
    }

    /// Sets `key` after validating the value against the option schema (as `pct set`).
    /// `description` goes to the description; `env` replaces the env entries
    /// (NUL-separated).
    ///
    /// # Errors
    /// [`ConfError::UnknownSetting`], [`ConfError::InvalidValue`] (type, enum, range,
    /// format).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfError> {
        let stored = options::validate(key, value)?;
        match key {
            "description" => self.description = Some(stored),
            "env" => self.env = stored.split('\0').map(str::to_string).collect(),
            _ => {
                self.options.insert(key.to_string(), stored);
            }
        }
        Ok(())
    }

    /// Removes `key` and returns its old value.
    pub fn delete(&mut self, key: &str) -> Option<String> {
        match key {
            "description" => self.description.take(),
            "env" if !self.env.is_empty() => Some(std::mem::take(&mut self.env).join("\0")),
            _ => self.options.remove(key),
        }
    }

    /// The `lock` value.
    ///
    /// # Errors
    /// [`ConfError::InvalidValue`] for a stored lock outside PVE's enum.
    pub fn lock(&self) -> Result<Option<Lock>, ConfError> {
        self.get("lock").map(str::parse).transpose()
    }

    /// Sets (or with `None` clears) the lock.
    pub fn set_lock(&mut self, lock: Option<Lock>) {
        match lock {
            Some(l) => {
                self.options
                    .insert("lock".to_string(), l.as_str().to_string());
            }
            None => {
                self.options.remove("lock");
            }
        }
    }

    /// `check_lock`.
    ///
    /// # Errors
    /// [`ConfError::Locked`] (`CT is locked (<lock>)`) when any lock is set (PVE checks
    /// the stored string, so unknown locks lock too).
    pub fn check_lock(&self) -> Result<(), ConfError> {
        match self.get("lock") {
            Some(l) => Err(ConfError::Locked(l.to_string())),
            None => Ok(()),
        }
    }

    /// `snapstate` of a snapshot section.
    #[must_use]
    pub fn snapstate(&self) -> Option<SnapState> {
        match self.get("snapstate") {
            Some("prepare") => Some(SnapState::Prepare),
            Some("delete") => Some(SnapState::Delete),
            _ => None,
        }
    }

    /// Sets or clears `snapstate`.
    pub fn set_snapstate(&mut self, state: Option<SnapState>) {
        match state {
            Some(s) => {
                self.options
                    .insert("snapstate".to_string(), s.as_str().to_string());
            }
            None => {
                self.options.remove("snapstate");
            }
        }
    }

    fn bool_opt(&self, key: &str) -> Option<bool> {
        self.get(key).map(|v| v == "1")
    }

    /// `unprivileged` (default 0).
    #[must_use]
    pub fn unprivileged(&self) -> bool {
        self.bool_opt("unprivileged").unwrap_or(false)
    }

    /// `template` (default 0).
    #[must_use]
    pub fn is_template(&self) -> bool {
        self.bool_opt("template").unwrap_or(false)
    }

    /// `protection` (default 0).
    #[must_use]
    pub fn protection(&self) -> bool {
        self.bool_opt("protection").unwrap_or(false)
    }

    /// `onboot` (default 0).
    #[must_use]
    pub fn onboot(&self) -> bool {
        self.bool_opt("onboot").unwrap_or(false)
    }

    /// `hostname`, if set.
    #[must_use]
    pub fn hostname(&self) -> Option<&str> {
        self.get("hostname")
    }

    /// `arch` (default `amd64`).
    #[must_use]
    pub fn arch(&self) -> &str {
        self.get("arch").unwrap_or("amd64")
    }

    /// `ostype`, if set.
    #[must_use]
    pub fn ostype(&self) -> Option<&str> {
        self.get("ostype")
    }

    /// `memory` in MiB (default 512).
    ///
    /// # Errors
    /// [`ConfError::InvalidValue`] for a stored value that is not an integer.
    pub fn memory(&self) -> Result<u64, ConfError> {
        self.int_opt("memory", 512)
    }

    /// `swap` in MiB (default 512).
    ///
    /// # Errors
    /// [`ConfError::InvalidValue`] for a stored value that is not an integer.
    pub fn swap(&self) -> Result<u64, ConfError> {
        self.int_opt("swap", 512)
    }

    /// `cores`, if set.
    ///
    /// # Errors
    /// [`ConfError::InvalidValue`] for a stored value that is not an integer.
    pub fn cores(&self) -> Result<Option<u64>, ConfError> {
        self.get("cores")
            .map(|_| self.int_opt("cores", 0))
            .transpose()
    }

    fn int_opt(&self, key: &str, default: u64) -> Result<u64, ConfError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| ConfError::InvalidValue {
                key: key.to_string(),
                message: format!("type check ('integer') failed - got '{v}'"),
            }),
        }
    }

    /// Keys of the volume options present, in PVE's `foreach_volume` order: `rootfs`,
    /// then `mp0`..`mp255` numerically.
    #[must_use]
    pub fn mountpoint_keys(&self) -> Vec<String> {
        let mut keys: Vec<(u32, &String)> = self
            .options
            .keys()
            .filter_map(|k| {
                if k == "rootfs" {
                    Some((0, k))
                } else {
                    index_of(k, "mp")
                        .filter(|n| *n < MAX_MOUNT_POINTS)
                        .map(|n| (n + 1, k))
                }
            })
            .collect();
        keys.sort_by_key(|(n, _)| *n);
        keys.into_iter().map(|(_, k)| k.clone()).collect()
    }

    /// The parsed mount points (`rootfs`, `mp0`..`mp255` in numeric order).
    ///
    /// # Errors
    /// The first mount point value that does not parse.
    pub fn mountpoints(&self) -> Result<Vec<(String, MountPoint)>, ConfError> {
        self.mountpoint_keys()
            .into_iter()
            .map(|k| {
                let mp = mountpoint::parse_volume(&k, &self.options[&k])?;
                Ok((k, mp))
            })
            .collect()
    }

    /// The `netN` interfaces in numeric order.
    ///
    /// # Errors
    /// The first value that does not parse.
    pub fn nets(&self) -> Result<Vec<(String, NetConfig)>, ConfError> {
        self.indexed("net", MAX_LXC_NETWORKS)
            .into_iter()
            .map(|(k, v)| Ok((k, NetConfig::parse(&v)?)))
            .collect()
    }

    /// The `devN` passthrough devices in numeric order.
    ///
    /// # Errors
    /// The first value that does not parse.
    pub fn devs(&self) -> Result<Vec<(String, DevConfig)>, ConfError> {
        self.indexed("dev", 256)
            .into_iter()
            .map(|(k, v)| Ok((k, DevConfig::parse(&v)?)))
            .collect()
    }

    /// `(unusedN, volid)` pairs in numeric order.
    #[must_use]
    pub fn unused_volumes(&self) -> Vec<(String, String)> {
        self.indexed("unused", MAX_UNUSED_DISKS)
    }

    fn indexed(&self, prefix: &str, limit: u32) -> Vec<(String, String)> {
        let mut v: Vec<(u32, String, String)> = self
            .options
            .iter()
            .filter_map(|(k, val)| {
                index_of(k, prefix)
                    .filter(|n| *n < limit)
                    .map(|n| (n, k.clone(), val.clone()))
            })
            .collect();
        v.sort_by_key(|e| e.0);
        v.into_iter().map(|(_, k, val)| (k, val)).collect()
    }

    /// `add_unused_volume`: records `volid` in the lowest free `unusedN` unless it is
    /// already listed; returns the key used (or already holding it).
    ///
    /// # Errors
    /// [`ConfError::TooManyUnused`] when all 256 slots are taken.
    pub fn add_unused_volume(&mut self, volid: &str) -> Result<String, ConfError> {
        let mut free = None;
        for n in (0..MAX_UNUSED_DISKS).rev() {
            let key = format!("unused{n}");
            match self.options.get(&key) {
                Some(v) if v == volid => return Ok(key),
                Some(_) => {}
                None => free = Some(key),
            }
        }
        let key = free.ok_or(ConfError::TooManyUnused)?;
        self.options.insert(key.clone(), volid.to_string());
        Ok(key)
    }

    /// Volume ids used by `rootfs`/`mpN` (`get_vm_volumes`): volume mount points that
    /// parse and carry a valid volume id.
    #[must_use]
    pub fn used_volumes(&self) -> BTreeSet<String> {
        self.mountpoint_keys()
            .into_iter()
            .filter_map(|k| mountpoint::parse_volume(&k, &self.options[&k]).ok())
            .filter(|mp| {
                mp.kind() == MountPointKind::Volume
                    && !mp.volume.is_empty()
                    && mountpoint::verify_volume_id(&mp.volume).is_ok()
            })
            .map(|mp| mp.volume)
            .collect()
    }

    /// Appends a raw `lxc.*` key (or an env entry for `lxc.environment.runtime`).
    ///
    /// # Errors
    /// `<key>: <message>` for `lxc.rootfs.path`/`lxc.rootfs.options`, `unable to parse
    /// config: <key>` for keys outside the whitelist, [`ConfError::Newline`].
    pub fn push_lxc(&mut self, key: &str, value: &str) -> Result<(), ConfError> {
        if value.contains('\n') {
            return Err(ConfError::Newline(key.to_string()));
        }
        match lxc_key_validity(key) {
            LxcKeyValidity::Refused(msg) => Err(ConfError::Invalid(format!("{key}: {msg}"))),
            LxcKeyValidity::Unknown => {
                Err(ConfError::Invalid(format!("unable to parse config: {key}")))
            }
            LxcKeyValidity::Valid | LxcKeyValidity::Deprecated(_) => {
                if key == "lxc.environment.runtime" {
                    self.env.push(value.to_string());
                } else {
                    self.lxc.push((key.to_string(), value.to_string()));
                }
                Ok(())
            }
        }
    }

    /// The id map (`parse_id_maps`) from `lxc.idmap` entries and `unprivileged`.
    ///
    /// # Errors
    /// `failed to parse idmap: <value>`.
    pub fn id_map(&self) -> Result<IdMap, ConfError> {
        IdMap::from_lxc(
            self.lxc.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            self.unprivileged(),
        )
    }

    fn write_into(
        &self,
        out: &mut String,
        skip: &dyn Fn(&str, &str) -> bool,
    ) -> Result<(), ConfError> {
        if let Some(descr) = self.description.as_deref().filter(|d| perl_true(d)) {
            // Perl's split drops trailing empty fields only.
            let mut lines: Vec<&str> = descr.split('\n').collect();
            while lines.last().is_some_and(|l| l.is_empty()) {
                lines.pop();
            }
            for line in lines {
                out.push('#');
                out.push_str(&encode_text(line));
                out.push('\n');
            }
        }
        for (k, v) in &self.options {
            if UNWRITTEN_KEYS.contains(&k.as_str()) || skip(k, v) {
                continue;
            }
            if v.contains('\n') {
                return Err(ConfError::Newline(k.clone()));
            }
            out.push_str(&format!("{k}: {v}\n"));
        }
        for e in &self.env {
            if e.contains('\n') {
                return Err(ConfError::Newline("env".to_string()));
            }
            out.push_str(&format!("lxc.environment.runtime: {e}\n"));
        }
        for (k, v) in &self.lxc {
            if v.contains('\n') {
                return Err(ConfError::Newline(k.clone()));
            }
            out.push_str(&format!("{k}: {v}\n"));
        }
        Ok(())
    }
}

/// A parsed container config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtConfig {
    /// The current config.
    pub main: ConfigSection,
    /// `[pve:pending]` changes (`delete:` holds the pending deletions).
    pub pending: ConfigSection,
    /// Snapshot sections by name.
    pub snapshots: BTreeMap<String, ConfigSection>,
    /// SHA-1 (hex) of the text this config was parsed from; empty for built configs.
    pub digest: String,
}

enum Target {
    Main,
    Pending,
    Snapshot(String),
}

static PENDING_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?i)\[pve:pending\][\t\n\x0B\x0C\r ]*$").expect("static regex"));
static SNAP_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?i)\[([a-z][a-z0-9_\-]+)\][\t\n\x0B\x0C\r ]*$").expect("static regex")
});
static LXC_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(lxc\.[a-z0-9_\-.]+)(?::|[\t\n\x0B\x0C\r ]*=)[\t\n\x0B\x0C\r ]*(.*?)[\t\n\x0B\x0C\r ]*$",
    )
    .expect("static regex")
});
static DESCR_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^description:[\t\n\x0B\x0C\r ]*(.*[^\t\n\x0B\x0C\r ])[\t\n\x0B\x0C\r ]*$")
        .expect("static regex")
});
static SNAPSTATE_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"snapstate:[\t\n\x0B\x0C\r ]*(prepare|delete)[\t\n\x0B\x0C\r ]*$")
        .expect("static regex")
});
static DELETE_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^delete:[\t\n\x0B\x0C\r ]*(.*[^\t\n\x0B\x0C\r ])[\t\n\x0B\x0C\r ]*$")
        .expect("static regex")
});
static KEY_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([a-z][a-z_]*[0-9]*):[\t\n\x0B\x0C\r ]*(.+?)[\t\n\x0B\x0C\r ]*$")
        .expect("static regex")
});

fn is_blank(line: &str) -> bool {
    line.bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | 0x0b | 0x0c))
}

impl CtConfig {
    /// Parses a config file leniently, as PVE does when loading: problems become warnings
    /// (`vm N - ...`) and offending values are still stored.
    ///
    /// # Errors
    /// None in lenient mode; the `Result` mirrors [`CtConfig::parse_strict`].
    pub fn parse(vmid: u32, text: &str) -> Result<(Self, Vec<String>), ConfError> {
        Self::parse_mode(vmid, text, false)
    }

    /// Parses a config file strictly (`parse_pct_config(..., strict = 1)`): the first
    /// problem is an error. Deprecation warnings are still only warnings.
    ///
    /// # Errors
    /// [`ConfError::Parse`] with PVE's `vm N - ...` message.
    pub fn parse_strict(vmid: u32, text: &str) -> Result<(Self, Vec<String>), ConfError> {
        Self::parse_mode(vmid, text, true)
    }

    fn parse_mode(vmid: u32, text: &str, strict: bool) -> Result<(Self, Vec<String>), ConfError> {
        let mut warnings = Vec::new();
        let handle = |msg: String, warnings: &mut Vec<String>| -> Result<(), ConfError> {
            if strict {
                Err(ConfError::Parse(msg))
            } else {
                warnings.push(msg);
                Ok(())
            }
        };
        let mut conf = Self {
            digest: hex(&Sha1::digest(text.as_bytes())),
            ..Self::default()
        };
        let mut target = Target::Main;
        let mut descr = String::new();

        for line in text.split('\n') {
            if is_blank(line) {
                continue;
            }
            let new_target = if PENDING_RE.is_match(line) {
                Some(Target::Pending)
            } else {
                SNAP_RE
                    .captures(line)
                    .map(|c| Target::Snapshot(c[1].to_string()))
            };
            if let Some(t) = new_target {
                let sec = conf.section_mut(&target);
                if perl_true(&descr) {
                    sec.description = Some(std::mem::take(&mut descr));
                }
                descr.clear();
                match &t {
                    Target::Main => {}
                    Target::Pending => conf.pending = ConfigSection::default(),
                    Target::Snapshot(name) => {
                        conf.snapshots
                            .insert(name.clone(), ConfigSection::default());
                    }
                }
                target = t;
                continue;
            }
            let in_pending = matches!(target, Target::Pending);
            let sec = conf.section_mut(&target);

            if let Some(rest) = line.strip_prefix('#') {
                descr.push_str(&decode_text(rest));
                descr.push('\n');
            } else if let Some(c) = LXC_RE.captures(line) {
                let (key, value) = (&c[1], &c[2]);
                match lxc_key_validity(key) {
                    LxcKeyValidity::Valid => push_lxc_unchecked(sec, key, value),
                    LxcKeyValidity::Deprecated(msg) => {
                        warnings.push(format!("vm {vmid} - {key}: {msg}"));
                        push_lxc_unchecked(sec, key, value);
                    }
                    LxcKeyValidity::Refused(msg) => {
                        handle(format!("vm {vmid} - {key}: {msg}"), &mut warnings)?;
                    }
                    LxcKeyValidity::Unknown => {
                        handle(
                            format!("vm {vmid} - unable to parse config: {line}"),
                            &mut warnings,
                        )?;
                    }
                }
            } else if let Some(c) = DESCR_RE.captures(line) {
                descr.push_str(&decode_text(&c[1]));
            } else if let Some(c) = SNAPSTATE_RE.captures(line) {
                sec.options
                    .insert("snapstate".to_string(), c[1].to_string());
            } else if let Some(c) = DELETE_RE.captures(line) {
                if in_pending {
                    sec.options.insert("delete".to_string(), c[1].to_string());
                } else {
                    handle(
                        format!("vm {vmid} - property 'delete' is only allowed in [pve:pending]"),
                        &mut warnings,
                    )?;
                }
            } else if let Some(c) = KEY_RE.captures(line) {
                let (key, raw) = (&c[1], &c[2]);
                let value = match options::check_type(key, raw) {
                    Ok(v) => v,
                    Err(e) => {
                        handle(
                            format!("vm {vmid} - unable to parse value of '{key}' - {e}"),
                            &mut warnings,
                        )?;
                        raw.to_string()
                    }
                };
                match key {
                    "description" => sec.description = Some(value),
                    "env" => sec.env = value.split('\0').map(str::to_string).collect(),
                    k if UNWRITTEN_KEYS.contains(&k) => {
                        warnings.push(format!("vm {vmid} - ignoring reserved key '{k}'"));
                    }
                    _ => {
                        sec.options.insert(key.to_string(), value);
                    }
                }
            } else {
                handle(
                    format!("vm {vmid} - unable to parse config: {line}"),
                    &mut warnings,
                )?;
            }
        }
        if perl_true(&descr) {
            conf.section_mut(&target).description = Some(descr);
        }
        conf.main.options.remove("snapstate");
        Ok((conf, warnings))
    }

    fn section_mut(&mut self, target: &Target) -> &mut ConfigSection {
        match target {
            Target::Main => &mut self.main,
            Target::Pending => &mut self.pending,
            Target::Snapshot(name) => self.snapshots.entry(name.clone()).or_default(),
        }
    }

    /// Writes the config in PVE's canonical layout.
    ///
    /// # Errors
    /// [`ConfError::Newline`] for a value containing a newline.
    pub fn write(&self) -> Result<String, ConfError> {
        let used = self.main.used_volumes();
        let mut out = String::new();
        self.main.write_into(&mut out, &|k, v| {
            k == "snapstate" || (k.starts_with("unused") && used.contains(v))
        })?;
        if !self.pending.is_empty() {
            out.push_str("\n[pve:pending]\n");
            self.pending.write_into(&mut out, &|_, _| false)?;
        }
        for (name, snap) in &self.snapshots {
            out.push_str(&format!("\n[{name}]\n"));
            snap.write_into(&mut out, &|_, _| false)?;
        }
        Ok(out)
    }

    /// The config as vzdump stores it in an archive (`etc/vzdump/pct.conf`): without
    /// `lock`, `parent`, the pending section and snapshots. Write it with
    /// [`CtConfig::write`].
    #[must_use]
    pub fn to_backup_config(&self) -> Self {
        let mut main = self.main.clone();
        main.options.remove("lock");
        main.options.remove("parent");
        Self {
            main,
            pending: ConfigSection::default(),
            snapshots: BTreeMap::new(),
            digest: String::new(),
        }
    }

    /// `get` on the current config.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.main.get(key)
    }

    /// `set` on the current config.
    ///
    /// # Errors
    /// See [`ConfigSection::set`].
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfError> {
        self.main.set(key, value)
    }

    /// `delete` on the current config.
    pub fn delete(&mut self, key: &str) -> Option<String> {
        self.main.delete(key)
    }

    /// The lock of the current config.
    ///
    /// # Errors
    /// See [`ConfigSection::lock`].
    pub fn lock(&self) -> Result<Option<Lock>, ConfError> {
        self.main.lock()
    }

    /// `check_lock` on the current config.
    ///
    /// # Errors
    /// [`ConfError::Locked`].
    pub fn check_lock(&self) -> Result<(), ConfError> {
        self.main.check_lock()
    }

    /// Mount points of the current config.
    ///
    /// # Errors
    /// See [`ConfigSection::mountpoints`].
    pub fn mountpoints(&self) -> Result<Vec<(String, MountPoint)>, ConfError> {
        self.main.mountpoints()
    }

    /// `add_unused_volume` on the current config.
    ///
    /// # Errors
    /// [`ConfError::TooManyUnused`].
    pub fn add_unused_volume(&mut self, volid: &str) -> Result<String, ConfError> {
        self.main.add_unused_volume(volid)
    }
}

fn push_lxc_unchecked(sec: &mut ConfigSection, key: &str, value: &str) {
    if key == "lxc.environment.runtime" {
        sec.env.push(value.to_string());
    } else {
        sec.lxc.push((key.to_string(), value.to_string()));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `true` if `key` names a volume option (`rootfs`, `mpN`).
#[must_use]
pub fn is_volume_key(key: &str) -> bool {
    key == "rootfs" || is_indexed(key, "mp", MAX_MOUNT_POINTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_encoding() {
        assert_eq!(encode_text("a:b%c\td ä"), "a%3Ab%25c%09d %C3%A4");
        assert_eq!(decode_text("a%3Ab%25c%09d %C3%A4"), "a:b%c\td ä");
        assert_eq!(decode_text("100%"), "100%");
        assert_eq!(decode_text("%zz%4"), "%zz%4");
        assert_eq!(decode_text("%FF"), "\u{fffd}");
    }

    #[test]
    fn writes_canonical_layout() {
        let input = "memory: 512\n#line one\narch: amd64\n\
                     lxc.environment.runtime: A=1\nlxc.apparmor.profile = unconfined\n\
                     description: more\nonboot: yes\n\
                     [zsnap]\nsnapstate: prepare\nmemory: 1\n[pve:pending]\ndelete: swap;!mp0\n\
                     [asnap]\narch: i386\n";
        let (conf, warnings) = CtConfig::parse(100, input).expect("parse");
        assert!(warnings.is_empty(), "{warnings:?}");
        let want = "#line one\n#more\narch: amd64\nmemory: 512\nonboot: 1\n\
                    lxc.environment.runtime: A=1\nlxc.apparmor.profile: unconfined\n\
                    \n[pve:pending]\ndelete: swap;!mp0\n\
                    \n[asnap]\narch: i386\n\
                    \n[zsnap]\nmemory: 1\nsnapstate: prepare\n";
        assert_eq!(conf.write().expect("write"), want);
        assert_eq!(conf.main.env, ["A=1"]);
        assert_eq!(conf.digest, hex(&Sha1::digest(input.as_bytes())));
    }

    #[test]
    fn lenient_and_strict_parse_messages() {
        let cases: &[(&str, &str)] = &[
            (
                "lxc.rootfs.path: /x\n",
                "vm 7 - lxc.rootfs.path: lxc.rootfs.path is auto generated from rootfs",
            ),
            (
                "lxc.bogus: 1\n",
                "vm 7 - unable to parse config: lxc.bogus: 1",
            ),
            (
                "Hostname: x\n",
                "vm 7 - unable to parse config: Hostname: x",
            ),
            (
                "delete: swap\n",
                "vm 7 - property 'delete' is only allowed in [pve:pending]",
            ),
            (
                "foo: bar\n",
                "vm 7 - unable to parse value of 'foo' - unknown setting 'foo'",
            ),
            (
                "memory: lots\n",
                "vm 7 - unable to parse value of 'memory' - memory: type check ('integer') failed - got 'lots'",
            ),
        ];
        for (text, want) in cases {
            let (_, warnings) = CtConfig::parse(7, text).expect("lenient");
            assert_eq!(warnings, [want.to_string()], "{text}");
            assert_eq!(
                CtConfig::parse_strict(7, text).expect_err(text).to_string(),
                *want
            );
        }
        // Lenient parsing keeps the unparsable value, as PVE does.
        let (conf, _) = CtConfig::parse(7, "memory: lots\n").expect("lenient");
        assert_eq!(conf.get("memory"), Some("lots"));
        let (_, warnings) = CtConfig::parse(7, "lxc.id_map: u 0 1 2\n").expect("deprecated");
        assert_eq!(
            warnings,
            ["vm 7 - lxc.id_map: is deprecated and was renamed to lxc.idmap"]
        );
    }

    #[test]
    fn writer_drops_used_unused_and_main_snapstate() {
        let mut conf = CtConfig::default();
        conf.set("rootfs", "local:vm-1-disk-0,size=8G")
            .expect("set");
        conf.set("mp0", "local:vm-1-disk-1,mp=/a").expect("set");
        conf.main
            .options
            .insert("unused0".into(), "local:vm-1-disk-1".into());
        conf.main
            .options
            .insert("unused1".into(), "local:vm-1-disk-2".into());
        conf.main
            .options
            .insert("snapstate".into(), "prepare".into());
        assert_eq!(
            conf.write().expect("write"),
            "mp0: local:vm-1-disk-1,mp=/a\nrootfs: local:vm-1-disk-0,size=8G\nunused1: local:vm-1-disk-2\n"
        );
        conf.main.options.insert("hostname".into(), "a\nb".into());
        assert_eq!(
            conf.write().expect_err("newline").to_string(),
            "detected invalid newline inside property 'hostname'"
        );
    }

    #[test]
    fn unused_volume_slots() {
        let mut s = ConfigSection::default();
        s.options.insert("unused0".into(), "a:1".into());
        s.options.insert("unused2".into(), "a:2".into());
        assert_eq!(s.add_unused_volume("a:3").expect("add"), "unused1");
        assert_eq!(s.add_unused_volume("a:2").expect("dup"), "unused2");
        assert_eq!(s.add_unused_volume("a:4").expect("add"), "unused3");
        for n in 0..MAX_UNUSED_DISKS {
            s.options.insert(format!("unused{n}"), format!("b:{n}"));
        }
        assert_eq!(
            s.add_unused_volume("c:1").expect_err("full").to_string(),
            "Too many unused volumes - please delete them first."
        );
    }

    #[test]
    fn mountpoints_in_numeric_order_and_locks() {
        let text = "mp10: s:c,mp=/c\nmp2: s:b,mp=/b\nrootfs: s:a\nmp256: s:x,mp=/x\nlock: backup\n";
        let (conf, warnings) = CtConfig::parse(1, text).expect("parse");
        assert_eq!(
            warnings,
            ["vm 1 - unable to parse value of 'mp256' - unknown setting 'mp256'"]
        );
        let keys: Vec<_> = conf
            .mountpoints()
            .expect("mps")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["rootfs", "mp2", "mp10"]);
        assert_eq!(conf.lock(), Ok(Some(Lock::Backup)));
        assert_eq!(
            conf.check_lock().expect_err("locked").to_string(),
            "CT is locked (backup)"
        );
        assert!(conf.lock().is_ok());
        let (odd, _) = CtConfig::parse(1, "lock: weird\n").expect("parse");
        assert!(odd.lock().is_err());
        assert_eq!(odd.check_lock(), Err(ConfError::Locked("weird".into())));
    }

    #[test]
    fn set_get_delete_and_lxc_whitelist() {
        let mut conf = CtConfig::default();
        assert_eq!(
            conf.set("nope", "1"),
            Err(ConfError::UnknownSetting("nope".into()))
        );
        conf.set("onboot", "true").expect("set");
        assert_eq!(conf.get("onboot"), Some("1"));
        assert_eq!(conf.delete("onboot"), Some("1".into()));
        assert_eq!(conf.get("onboot"), None);
        assert_eq!(
            conf.main
                .push_lxc("lxc.rootfs.path", "/x")
                .expect_err("refused")
                .to_string(),
            "lxc.rootfs.path: lxc.rootfs.path is auto generated from rootfs"
        );
        conf.main
            .push_lxc("lxc.cgroup2.devices.allow", "c 1:3 rwm")
            .expect("ok");
        conf.main
            .push_lxc("lxc.environment.runtime", "X=1")
            .expect("ok");
        assert_eq!(conf.main.env, ["X=1"]);
        assert_eq!(lxc_key_validity("lxc.net.0.type"), LxcKeyValidity::Valid);
        assert_eq!(lxc_key_validity("lxc.foo"), LxcKeyValidity::Unknown);
    }

    #[test]
    fn backup_config_strips_lock_parent_pending_snapshots() {
        let text = "lock: backup\nmemory: 512\nparent: s1\n\n[pve:pending]\nmemory: 1024\n\n[s1]\nmemory: 256\n";
        let (conf, _) = CtConfig::parse(5, text).expect("parse");
        assert_eq!(
            conf.to_backup_config().write().expect("write"),
            "memory: 512\n"
        );
    }

    #[test]
    fn id_map_from_config() {
        let (conf, _) = CtConfig::parse(5, "unprivileged: 1\n").expect("parse");
        let map = conf.main.id_map().expect("map");
        assert_eq!((map.root_uid, map.root_gid), (100_000, 100_000));
        assert_eq!(
            map.usernsexec_args(),
            ["-m", "u:0:100000:65536", "-m", "g:0:100000:65536", "--"]
        );
        assert_eq!(
            map.map_to_host(super::super::IdKind::Group, 65_535),
            Some(165_535)
        );
        assert_eq!(map.map_to_host(super::super::IdKind::Group, 65_536), None);
        let (conf, _) = CtConfig::parse(5, "lxc.idmap: u 0 100000 x\n").expect("parse");
        assert_eq!(
            conf.main.id_map().expect_err("bad").to_string(),
            "failed to parse idmap: u 0 100000 x"
        );
        let (priv_conf, _) = CtConfig::parse(5, "memory: 1\n").expect("parse");
        let map = priv_conf.main.id_map().expect("map");
        assert!(map.is_empty());
        assert_eq!(map.map_to_host(super::super::IdKind::User, 7), Some(7));
    }
}
