//! `pvesm extractconfig` and the config recovery of `pct restore` (PVE's
//! `extract_vzdump_config_tar`): the first `./etc/vzdump/pct.conf` member of a vzdump
//! archive, reading the stream only as far as that member (it is the first member of
//! archives vzdump writes).
//!
//! Output as PVE prints it: the member's lines, each terminated by `\n` (PVE collects `tar
//! -xpOf` output line by line), followed by one more `\n` from the CLI.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use vzkit_archive::{decompressor_auto, find_member};
use vzkit_storage::backup::{GuestType, archive_info};
use vzkit_storage::manager::Storages;
use vzkit_storage::volid::VolumeId;

use crate::error::{RestoreError, Result};

/// Largest config member read (PVE has no limit; a config is a few KiB).
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// Which member names count as the backed-up config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigMatch {
    /// `^\./etc/vzdump/(pct|vps)\.conf$` (`pvesm extractconfig`).
    Anchored,
    /// `(\./etc/vzdump/(pct|vps)\.conf)$` (`recover_config` of `pct restore`).
    Suffix,
}

impl ConfigMatch {
    /// Whether `name` matches.
    #[must_use]
    pub fn matches(self, name: &[u8]) -> bool {
        const NAMES: [&[u8]; 2] = [b"./etc/vzdump/pct.conf", b"./etc/vzdump/vps.conf"];
        match self {
            ConfigMatch::Anchored => NAMES.contains(&name),
            ConfigMatch::Suffix => NAMES.iter().any(|n| name.ends_with(n)),
        }
    }
}

/// The backed-up config found in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundConfig {
    /// Whether it is an OpenVZ `vps.conf` rather than a `pct.conf`.
    pub openvz: bool,
    /// The text, each line terminated by `\n`.
    pub text: Vec<u8>,
}

/// Re-terminates every line with `\n`, as PVE's line-wise collection does.
#[must_use]
pub fn reterminate_lines(raw: &[u8]) -> Vec<u8> {
    let mut out = raw.to_vec();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

/// Reads the first member matching `how` from a (possibly compressed) tar stream.
///
/// # Errors
/// "ERROR: archive contains no configuration file", stream and decompression errors.
pub fn config_from_stream<R: Read>(r: R, how: ConfigMatch) -> Result<FoundConfig> {
    let (_, dec) = decompressor_auto(r)
        .map_err(|e| RestoreError::Failed(format!("unable to read archive: {e}")))?;
    let mut openvz = false;
    let found = find_member(
        dec,
        |name| {
            let m = how.matches(name);
            if m {
                openvz = name.ends_with(b"vps.conf");
            }
            m
        },
        MAX_CONFIG_SIZE,
    )?;
    match found {
        Some(raw) => Ok(FoundConfig {
            openvz,
            text: reterminate_lines(&raw),
        }),
        None => Err(RestoreError::NotFound(
            "ERROR: archive contains no configuration file".into(),
        )),
    }
}

/// Reads the config of the archive file at `path` (`extract_vzdump_config_tar`).
///
/// # Errors
/// "ERROR: file 'X' does not exist", and those of [`config_from_stream`].
pub fn config_from_file(path: &Path, how: ConfigMatch) -> Result<FoundConfig> {
    if is_dedup_snapshot(path) {
        return match std::fs::read(path.join(vzkit_dedup::snapshot::CONFIG)) {
            Ok(raw) => Ok(FoundConfig {
                openvz: false,
                text: reterminate_lines(&raw),
            }),
            Err(_) => Err(RestoreError::NotFound(
                "ERROR: archive contains no configuration file".into(),
            )),
        };
    }
    if !path.is_file() {
        return Err(RestoreError::NotFound(format!(
            "ERROR: file '{}' does not exist",
            path.display()
        )));
    }
    let f = File::open(path)
        .map_err(|e| RestoreError::Failed(format!("unable to open '{}': {e}", path.display())))?;
    config_from_stream(BufReader::with_capacity(64 * 1024, f), how)
}

/// Whether `path` (as a storage resolved a volume id) is a complete snapshot of a `dedup`
/// store rather than an archive file.
#[must_use]
pub fn is_dedup_snapshot(path: &Path) -> bool {
    path.join(vzkit_dedup::snapshot::MANIFEST).is_file()
}

/// The store and snapshot of a `dedup` snapshot directory (`<store>/ct/<vmid>/<time>`).
///
/// # Errors
/// A path not of that form.
pub fn dedup_snapshot(path: &Path) -> Result<(vzkit_dedup::Store, vzkit_dedup::SnapshotRef)> {
    let bad = || RestoreError::Invalid(format!("'{}' is not a dedup snapshot", path.display()));
    let time = path.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?;
    let group = path.parent().ok_or_else(bad)?;
    let vmid = group.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?;
    let root = group.parent().and_then(Path::parent).ok_or_else(bad)?;
    let snap = vzkit_dedup::SnapshotRef::parse(&format!("ct/{vmid}/{time}"))
        .map_err(|e| RestoreError::Invalid(e.to_string()))?;
    let store = vzkit_dedup::Store::open(root).map_err(|e| RestoreError::Failed(e.to_string()))?;
    Ok((store, snap))
}

/// `abs_filesystem_path`: a volume id of a configured storage resolves to its path; anything
/// else is a file path that must exist.
///
/// # Errors
/// "can't find file 'X'", storage errors for volume ids.
pub async fn archive_path(storages: &Storages, volume: &str) -> Result<PathBuf> {
    if let Ok(id) = VolumeId::parse(volume)
        && storages.section(&id.storage).is_ok()
    {
        return Ok(storages.path(volume, None).await?);
    }
    let p = PathBuf::from(volume);
    if !p.is_file() {
        return Err(RestoreError::NotFound(format!(
            "can't find file '{volume}'"
        )));
    }
    Ok(p)
}

/// `pvesm extractconfig`: the text to print (the config plus the trailing empty line).
///
/// # Errors
/// PVE's messages: "can't find file", "ERROR: couldn't determine archive info from 'X'",
/// "ERROR: archive contains no configuration file"; qemu backups are not supported.
pub async fn extract_config(storages: &Storages, volume: &str) -> Result<Vec<u8>> {
    let path = archive_path(storages, volume).await?;
    if is_dedup_snapshot(&path) {
        let mut text = config_from_file(&path, ConfigMatch::Anchored)?.text;
        text.push(b'\n');
        return Ok(text);
    }
    let name = path.display().to_string();
    let info = archive_info(&name).map_err(|e| RestoreError::Invalid(e.to_string()))?;
    match info.guest_type {
        GuestType::Lxc | GuestType::Openvz => {}
        GuestType::Qemu => {
            return Err(RestoreError::Invalid(format!(
                "unable to extract configuration for backup format '{}' (qemu backups are not supported by vzkit)",
                info.format
            )));
        }
    }
    let mut text = config_from_file(&path, ConfigMatch::Anchored)?.text;
    text.push(b'\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_name_patterns() {
        let a = ConfigMatch::Anchored;
        let s = ConfigMatch::Suffix;
        assert!(a.matches(b"./etc/vzdump/pct.conf"));
        assert!(a.matches(b"./etc/vzdump/vps.conf"));
        assert!(!a.matches(b"etc/vzdump/pct.conf"));
        assert!(!a.matches(b"./x/./etc/vzdump/pct.conf"));
        assert!(s.matches(b"./x/./etc/vzdump/pct.conf"));
        assert!(!s.matches(b"./etc/vzdump/pct.conf.bak"));
    }

    #[test]
    fn lines_are_reterminated() {
        assert_eq!(reterminate_lines(b"a: 1\nb: 2"), b"a: 1\nb: 2\n");
        assert_eq!(reterminate_lines(b"a: 1\n"), b"a: 1\n");
        assert_eq!(reterminate_lines(b""), b"");
    }
}
