//! Retention around a backup: the limit check before it, pruning after it.
//!
//! Compatibility target: pve-manager 14a22df `exec_backup_task` (retention pre-check, `remove`),
//! `get_backup_file_list`; pve-storage `prune_backups`, `archive_remove`.
//!
//! * Before: without `remove` but with a positive retention, or with `protected`, the existing
//!   backups of the guest are counted: "There is a max backup limit of N enforced by the target
//!   storage or the vzdump parameters. Either increase the limit or delete old backups." /
//!   "The number of protected backups per guest is limited to N on storage 'S'"
//!   (`max-protected-backups`, -1 = unlimited, the default for root).
//! * After (`remove`): on a storage, its backups of the guest are marked with
//!   `prune_mark_backup_group` and the `remove` ones deleted (`removing backup '<volid>'`); in a
//!   plain dump directory, the standard-named archives `vzdump-lxc-<vmid>-*` (`delete old backup
//!   '<path>'`). Protected backups never count and are never removed. Removing an archive also
//!   removes its `.log` and `.notes` companions and vzkit's `.blake3`.

use std::path::{Path, PathBuf};

use vzkit_storage::backup::{archive_info, protected_filename};
use vzkit_storage::config::ContentType;
use vzkit_storage::manager::Storages;
use vzkit_storage::prune::{
    BackupEntry, PruneEntry, PruneMark, PruneOptions, prune_mark, prune_mark_backup_group,
};

use crate::error::{Error, Result};
use crate::log::{Level, TaskLog};
use crate::plan::backup_limit;

/// A standard-named backup in a dump directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFile {
    /// `<dir>/<archive>`
    pub path: PathBuf,
    /// From the name (local time).
    pub ctime: i64,
    /// A `.protected` marker exists.
    pub protected: bool,
}

/// `get_backup_file_list(dir, "vzdump-lxc-<vmid>")`: standard-named archives only.
///
/// # Errors
/// When the directory cannot be read.
pub fn backup_file_list(dir: &Path, bkname: &str) -> Result<Vec<BackupFile>> {
    let prefix = format!("{bkname}-");
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::msg(format!("unable to read '{}' - {e}", dir.display())))?;
    let mut list = Vec::new();
    for entry in rd {
        let entry =
            entry.map_err(|e| Error::msg(format!("unable to read '{}' - {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let Ok(info) = archive_info(&name) else {
            continue; // logs, notes, checksums, temporary files
        };
        if !info.is_std_name {
            continue;
        }
        let path = dir.join(&info.filename);
        list.push(BackupFile {
            protected: dir.join(protected_filename(&info.filename)).exists(),
            ctime: info.ctime.unwrap_or(0),
            path,
        });
    }
    list.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(list)
}

/// `<archive>.blake3`
#[must_use]
pub fn blake3_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".blake3");
    PathBuf::from(s)
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `archive_remove`: refuse protected archives, remove the archive, then its `.notes`,
/// `.log` (standard names) and `.blake3` companions (failures there are warnings).
///
/// # Errors
/// "cannot remove protected archive 'P'", "removing archive P failed: E".
pub fn archive_remove(path: &Path, log: &TaskLog) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if path.with_file_name(protected_filename(&name)).exists() {
        return Err(Error::msg(format!(
            "cannot remove protected archive '{}'",
            path.display()
        )));
    }
    remove_if_exists(path)
        .map_err(|e| Error::msg(format!("removing archive {} failed: {e}", path.display())))?;
    remove_companions(path, log);
    Ok(())
}

fn remove_companions(path: &Path, log: &TaskLog) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut aux = vec![("notes", path.with_file_name(format!("{name}.notes")))];
    if let Ok(info) = archive_info(&name)
        && let Some(l) = info.logfilename
    {
        aux.push(("log", path.with_file_name(l)));
    }
    aux.push(("blake3", blake3_path(path)));
    for (kind, p) in aux {
        if let Err(e) = remove_if_exists(&p) {
            log.warn(format!("Removing {kind} file failed: {e}"));
        }
    }
}

/// Where backups of this job go.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A configured storage.
    Storage(&'a str),
    /// A plain directory (`--dumpdir`).
    Dir(&'a Path),
}

/// The storage's `max-protected-backups` (-1: unlimited, PVE's default for root).
fn max_protected(storages: &Storages, storeid: &str) -> i64 {
    storages
        .section(storeid)
        .ok()
        .and_then(|s| s.get("max-protected-backups"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

/// The retention pre-check of `exec_backup_task`.
///
/// # Errors
/// The limit messages (see the module docs), or listing errors.
pub async fn retention_precheck(
    storages: &Storages,
    target: Target<'_>,
    vmid: u32,
    keep: &PruneOptions,
    remove: bool,
    protected: bool,
) -> Result<()> {
    let limit = backup_limit(keep);
    if !((limit > 0 && !remove) || protected) {
        return Ok(());
    }
    let (count, protected_count) = match target {
        Target::Storage(storeid) => {
            let list = storages
                .list(storeid, Some(ContentType::Backup), Some(vmid))
                .await?;
            let list: Vec<_> = list
                .into_iter()
                .filter(|b| b.subtype.as_deref().is_none_or(|t| t == "lxc"))
                .collect();
            let count = list.iter().filter(|b| b.protected != Some(true)).count();
            (count, list.len() - count)
        }
        Target::Dir(dir) => {
            let list = backup_file_list(dir, &format!("vzdump-lxc-{vmid}"))?;
            (list.iter().filter(|b| !b.protected).count(), 0)
        }
    };
    if protected {
        if let Target::Storage(storeid) = target {
            let max = max_protected(storages, storeid);
            if max > -1 && protected_count as i64 >= max {
                return Err(Error::msg(format!(
                    "The number of protected backups per guest is limited to {max} on storage '{storeid}'"
                )));
            }
        }
    } else if count as u64 >= limit {
        return Err(Error::msg(format!(
            "There is a max backup limit of {limit} enforced by the target storage or the vzdump \
             parameters. Either increase the limit or delete old backups."
        )));
    }
    Ok(())
}

/// `prune older backups with retention: …` and the pruning; returns how many were removed.
///
/// # Errors
/// Listing or removal errors ("error pruning backups - check log" on a storage).
pub async fn prune_after_backup(
    storages: &Storages,
    target: Target<'_>,
    vmid: u32,
    keep: &PruneOptions,
    log: &TaskLog,
) -> Result<usize> {
    let keepstr: Vec<String> = keep
        .entries()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    log.info(format!(
        "prune older backups with retention: {}",
        keepstr.join(", ")
    ));
    let pruned = match target {
        Target::Storage(storeid) => prune_storage(storages, storeid, vmid, keep, log).await?,
        Target::Dir(dir) => prune_dir(dir, vmid, keep, log)?,
    };
    let extra = if pruned > 0 {
        " not covered by keep-retention policy"
    } else {
        ""
    };
    log.info(format!("pruned {pruned} backup(s){extra}"));
    Ok(pruned)
}

async fn prune_storage(
    storages: &Storages,
    storeid: &str,
    vmid: u32,
    keep: &PruneOptions,
    log: &TaskLog,
) -> Result<usize> {
    let section = storages.section(storeid)?;
    if !section.has_content(ContentType::Backup) {
        return Err(Error::msg(format!(
            "storage '{storeid}' does not support backups"
        )));
    }
    let vols = storages
        .list(storeid, Some(ContentType::Backup), Some(vmid))
        .await?;
    let entries: Vec<BackupEntry> = vols
        .iter()
        .map(|v| BackupEntry {
            volid: v.volid.clone(),
            ctime: v.ctime.unwrap_or(0),
            protected: v.protected.unwrap_or(false),
            vmid: v.vmid,
        })
        .collect();
    let marked = prune_mark(&entries, keep, Some(vmid), Some("lxc"));
    let mut failed = false;
    let mut pruned = 0;
    for e in marked.iter().filter(|e| e.mark == Some(PruneMark::Remove)) {
        pruned += 1;
        log.info(format!("removing backup '{}'", e.volid));
        let path = storages.path(&e.volid, None).await.ok();
        match storages.vdisk_free(&e.volid).await {
            Ok(()) => {
                if let Some(p) = path
                    && let Err(err) = remove_if_exists(&blake3_path(&p))
                {
                    log.warn(format!("Removing blake3 file failed: {err}"));
                }
            }
            Err(err) => {
                log.log(
                    Level::Err,
                    format!("error when removing backup '{}' - {err}", e.volid),
                );
                failed = true;
            }
        }
    }
    if failed {
        return Err(Error::msg("error pruning backups - check log"));
    }
    Ok(pruned)
}

fn prune_dir(dir: &Path, vmid: u32, keep: &PruneOptions, log: &TaskLog) -> Result<usize> {
    let list = backup_file_list(dir, &format!("vzdump-lxc-{vmid}"))?;
    let mut group: Vec<PruneEntry> = list
        .iter()
        .map(|b| PruneEntry {
            volid: b.path.display().to_string(),
            ctime: b.ctime,
            mark: b.protected.then_some(PruneMark::Protected),
            guest_type: "lxc".into(),
            vmid: Some(vmid),
        })
        .collect();
    prune_mark_backup_group(&mut group, keep);
    let mut pruned = 0;
    for e in group.iter().filter(|e| e.mark == Some(PruneMark::Remove)) {
        pruned += 1;
        log.info(format!("delete old backup '{}'", e.volid));
        archive_remove(Path::new(&e.volid), log)?;
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) {
        std::fs::write(dir.join(name), b"x").unwrap();
    }

    #[test]
    fn dump_dir_listing_and_pruning() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        for day in 1..=4 {
            let stem = format!("vzdump-lxc-100-2024_01_0{day}-00_00_00");
            touch(dir, &format!("{stem}.tar.zst"));
            touch(dir, &format!("{stem}.log"));
            touch(dir, &format!("{stem}.tar.zst.notes"));
            touch(dir, &format!("{stem}.tar.zst.blake3"));
        }
        touch(dir, "vzdump-lxc-100-2024_01_01-00_00_00.tar.zst.protected");
        touch(dir, "vzdump-lxc-100-2024_01_05-00_00_00.tar.dat");
        touch(dir, "vzdump-lxc-1000-2024_01_01-00_00_00.tar");
        touch(dir, "vzdump-lxc-100-renamed.tar");
        let list = backup_file_list(dir, "vzdump-lxc-100").unwrap();
        assert_eq!(list.len(), 4);
        assert!(list[0].protected && !list[1].protected);

        let log = TaskLog::new(None);
        let keep = PruneOptions::parse("keep-last=2").unwrap();
        assert_eq!(prune_dir(dir, 100, &keep, &log).unwrap(), 1);
        // 01 is protected, 03 and 04 are kept, 02 goes with its companions.
        let stem2 = "vzdump-lxc-100-2024_01_02-00_00_00";
        for suffix in [".tar.zst", ".log", ".tar.zst.notes", ".tar.zst.blake3"] {
            assert!(!dir.join(format!("{stem2}{suffix}")).exists(), "{suffix}");
        }
        assert!(
            dir.join("vzdump-lxc-100-2024_01_01-00_00_00.tar.zst")
                .exists()
        );
        assert!(dir.join("vzdump-lxc-100-renamed.tar").exists());
        assert!(dir.join("vzdump-lxc-1000-2024_01_01-00_00_00.tar").exists());

        let prot = dir.join("vzdump-lxc-100-2024_01_01-00_00_00.tar.zst");
        assert_eq!(
            archive_remove(&prot, &log).unwrap_err().to_string(),
            format!("cannot remove protected archive '{}'", prot.display())
        );
    }
}
