//! Snapshot mode's storage snapshot `vzdump`, through the storage plugin trait.
//!
//! Compatibility target: pve-container `PVE/VZDump/LXC.pm` (`prepare`, `snapshot`, `cleanup`)
//! and pve-guest-common `AbstractConfig.pm` (`snapshot_create`, `snapshot_delete`) with the
//! LXC overrides, for the one snapshot vzdump makes.
//!
//! * Feature check: every archived storage volume must have the `snapshot` feature
//!   (`has_feature(..., backup_only = 1)`), else "mode failure - some volumes do not support
//!   snapshots", after which the job falls back to suspend mode.
//! * A `vzdump` snapshot left by a crashed run is force-removed first ("found old vzdump
//!   snapshot (force removal)").
//! * Create: under the config lock the `lock: backup` becomes `lock: snapshot` and a `[vzdump]`
//!   section (a copy of the config without `snapshots snapstate snaptime vmstate lock digest
//!   description unusedN`, with `snapstate: prepare`, `snaptime`, description "vzdump backup
//!   snapshot") is written; the volumes are snapshotted (a running container frozen meanwhile);
//!   then under the lock again `snapstate` goes, `parent: vzdump` is set and the lock is
//!   `backup` again. PVE does the same in three steps under a re-entrant lock; here each
//!   config change is one locked read-modify-write, and the lock never passes through "none".
//!   A failed create deletes the volume snapshots it made ("snapshot create failed: starting
//!   cleanup").
//! * Delete: `lock: snapshot-delete` and `snapstate: delete`, the volume snapshots deleted
//!   (errors are warnings with `force`), then `parent` references re-pointed, the section and
//!   the lock removed.
//!
//! * Volumes whose backend asks for it (`volume_snapshot_needs_fsfreeze`: rbd) of a running
//!   container have their filesystems frozen with `fsfreeze -f /proc/<pid>/root/<mp>` after
//!   the container is frozen and synced, and thawed after the snapshots, also on failure
//!   (failures there are warnings, as in PVE's `__snapshot_freeze`).
//!
//! Volume operations go through [`VolumeSnapshots`], implemented for [`Storages`] by the
//! storage plugins; unit tests use a recording implementation.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;

use vzkit_host::command::{Cmd, Runner};

use vzkit_runtime::conf::{ConfigSection, CtConfig, Lock, MountPoint, SnapState};
use vzkit_runtime::store::CtStore;
use vzkit_storage::manager::Storages;
use vzkit_storage::plugin::Feature;

use vzkit_runtime::error::RuntimeError;

use crate::error::{Error, Result};
use crate::guest::GuestControl;
use crate::log::TaskLog;

/// A failure inside a config update closure.
fn failed(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed(e.to_string())
}

/// The snapshot's name.
pub const VZDUMP_SNAP: &str = "vzdump";
/// Its description.
pub const VZDUMP_SNAP_DESCRIPTION: &str = "vzdump backup snapshot";

/// The volume side of snapshots.
#[async_trait::async_trait]
pub trait VolumeSnapshots: Send + Sync {
    /// Whether the volume can be snapshotted.
    ///
    /// # Errors
    /// Unknown storage or volume.
    async fn can_snapshot(&self, volid: &str) -> Result<bool>;
    /// Take snapshot `snap` of the volume.
    ///
    /// # Errors
    /// Backend errors.
    async fn snapshot(&self, volid: &str, snap: &str) -> Result<()>;
    /// Delete snapshot `snap` of the volume.
    ///
    /// # Errors
    /// Backend errors.
    async fn delete_snapshot(&self, volid: &str, snap: &str) -> Result<()>;
    /// Whether the volume's filesystem must be frozen (FIFREEZE) while a running
    /// container's snapshot is taken (PVE's `volume_snapshot_needs_fsfreeze`: rbd).
    async fn needs_fsfreeze(&self, _volid: &str) -> bool {
        false
    }
}

#[async_trait::async_trait]
impl VolumeSnapshots for Storages {
    async fn can_snapshot(&self, volid: &str) -> Result<bool> {
        let (plugin, volname) = self.resolve(volid)?;
        Ok(plugin.volume_has_feature(Feature::Snapshot, &volname, None)?)
    }

    async fn snapshot(&self, volid: &str, snap: &str) -> Result<()> {
        let (plugin, volname) = self.resolve(volid)?;
        plugin.activate_storage().await?;
        Ok(plugin.volume_snapshot(&volname, snap).await?)
    }

    async fn delete_snapshot(&self, volid: &str, snap: &str) -> Result<()> {
        let (plugin, volname) = self.resolve(volid)?;
        plugin.activate_storage().await?;
        Ok(plugin.volume_snapshot_delete(&volname, snap).await?)
    }

    async fn needs_fsfreeze(&self, volid: &str) -> bool {
        self.resolve(volid)
            .is_ok_and(|(plugin, _)| plugin.volume_snapshot_needs_fsfreeze())
    }
}

/// Freezes (`fsfreeze -f`) or thaws (`fsfreeze -u`) the filesystems mounted at `paths`
/// inside the container whose init is `pid` (PVE's `freeze_mountpoint`, through
/// `/proc/<pid>/root`). Failures are warnings; returns the paths that were frozen.
async fn fsfreeze(pid: u32, paths: &[String], freeze: bool, log: &TaskLog) -> Vec<String> {
    let runner = vzkit_host::command::SystemRunner;
    let mut done = Vec::new();
    for mp in paths {
        let path = PathBuf::from(format!("/proc/{pid}/root")).join(mp.trim_start_matches('/'));
        let cmd = Cmd::new("fsfreeze")
            .arg(if freeze { "-f" } else { "-u" })
            .arg(&path)
            .timeout(std::time::Duration::from_secs(60));
        match runner.run(&cmd).await {
            Ok(_) => done.push(mp.clone()),
            Err(e) => log.warn(format!(
                "unable to {} filesystem at '{mp}' - {e}",
                if freeze { "freeze" } else { "thaw" }
            )),
        }
    }
    done
}

/// The mode-failure check of `prepare`: every archived volume can be snapshotted.
///
/// # Errors
/// "mode failure - some volumes do not support snapshots".
pub async fn check_snapshot_feature(vols: &dyn VolumeSnapshots, volids: &[String]) -> Result<()> {
    for v in volids {
        // PVE's has_feature treats a volume it cannot ask about as lacking the feature.
        if !vols.can_snapshot(v).await.unwrap_or(false) {
            return Err(Error::msg(
                "mode failure - some volumes do not support snapshots",
            ));
        }
    }
    Ok(())
}

/// Keys a snapshot section does not copy from the current config.
fn copied(key: &str) -> bool {
    !matches!(
        key,
        "snapshots" | "snapstate" | "snaptime" | "vmstate" | "lock" | "digest" | "description"
    ) && !key.starts_with("unused")
}

/// The volumes of a snapshot section vzdump snapshots: rootfs and backup-enabled volumes.
fn snapshot_volids(section: &ConfigSection) -> Result<Vec<String>> {
    Ok(snapshot_mounts(section)?
        .into_iter()
        .map(|(v, _)| v)
        .collect())
}

/// As [`snapshot_volids`], with each volume's mount path in the container.
fn snapshot_mounts(section: &ConfigSection) -> Result<Vec<(String, String)>> {
    Ok(section
        .mountpoints()?
        .into_iter()
        .filter(|(k, mp): &(String, MountPoint)| {
            mp.backup_enabled(k) && mp.kind() == vzkit_runtime::conf::MountPointKind::Volume
        })
        .map(|(_, mp)| (mp.volume, mp.mp))
        .collect())
}

fn expect_lock(conf: &CtConfig, want: Option<Lock>) -> Result<()> {
    let have = conf.get("lock");
    match (have, want) {
        (None, None) => Ok(()),
        (Some(h), Some(w)) if h == w.as_str() => Ok(()),
        (Some(h), _) => Err(Error::msg(format!("CT is locked ({h})"))),
        (None, Some(w)) => Err(Error::msg(format!(
            "no lock found trying to remove '{}' lock",
            w.as_str()
        ))),
    }
}

/// `snapshot_create($vmid, 'vzdump', 0, "vzdump backup snapshot")` for a container holding
/// `held` (vzdump: `backup`), which it holds again afterwards. `freeze` is the running
/// container's controller (frozen, and the host's filesystems synced, while the volumes are
/// snapshotted). `now` is the
/// `snaptime`.
///
/// # Errors
/// Template, lock and name errors, or the first failing volume snapshot (after cleanup).
pub async fn snapshot_create(
    store: &CtStore,
    vols: &dyn VolumeSnapshots,
    vmid: u32,
    held: Option<Lock>,
    freeze: Option<&dyn GuestControl>,
    now: i64,
    log: &TaskLog,
) -> Result<()> {
    let volids = store.update(vmid, |conf| {
        if conf.main.is_template() {
            return Err(failed("you can't take a snapshot if it's a template"));
        }
        expect_lock(conf, held).map_err(failed)?;
        if conf.snapshots.contains_key(VZDUMP_SNAP) {
            return Err(failed(format!(
                "snapshot name '{VZDUMP_SNAP}' already used"
            )));
        }
        conf.main.set_lock(Some(Lock::Snapshot));
        for (name, s) in &mut conf.snapshots {
            if s.get("parent") == Some(VZDUMP_SNAP) {
                log.warn(format!(
                    "deleting parent '{VZDUMP_SNAP}' reference from '{name}' to avoid bogus snapshot cycle."
                ));
                s.options.remove("parent");
            }
        }
        let mut snap = ConfigSection {
            description: Some(VZDUMP_SNAP_DESCRIPTION.to_string()),
            options: conf
                .main
                .options
                .iter()
                .filter(|(k, _)| copied(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            lxc: conf.main.lxc.clone(),
            env: conf.main.env.clone(),
        };
        snap.set_snapstate(Some(SnapState::Prepare));
        snap.options.insert("snaptime".into(), now.to_string());
        let mounts = snapshot_mounts(&snap).map_err(failed)?;
        conf.snapshots.insert(VZDUMP_SNAP.to_string(), snap);
        Ok(mounts)
    })?;
    let mut freeze_paths = Vec::new();
    for (v, mp) in &volids {
        if vols.needs_fsfreeze(v).await {
            freeze_paths.push(mp.clone());
        }
    }
    let volids: Vec<String> = volids.into_iter().map(|(v, _)| v).collect();

    let mut made = Vec::new();
    let mut res = Ok(());
    let mut frozen = false;
    let mut fs_frozen = Vec::new();
    let mut fs_pid = None;
    if let Some(g) = freeze {
        match g.freeze(vmid).await {
            Ok(()) => frozen = true,
            Err(e) => res = Err(e),
        }
        // PVE's `sync_container_namespace`: with the processes frozen, flush what they
        // wrote so far (a guest filesystem on a loop-mounted image keeps it in the page
        // cache, where a storage snapshot of the image would not see it).
        if frozen && let Err(e) = tokio::task::spawn_blocking(rustix::fs::sync).await {
            res = Err(Error::msg(format!("unable to sync CT {vmid} - {e}")));
        }
        // PVE's `__snapshot_freeze`: the filesystems of volumes whose storage snapshot
        // does not see the page cache (rbd) are frozen in the container's namespace too.
        if frozen && res.is_ok() && !freeze_paths.is_empty() {
            match g.root_pid(vmid).await {
                Ok(pid) => {
                    fs_frozen = fsfreeze(pid, &freeze_paths, true, log).await;
                    fs_pid = Some(pid);
                }
                Err(e) => log.warn(format!("unable to freeze filesystems - {e}")),
            }
        }
    }
    if res.is_ok() {
        for v in &volids {
            if let Err(e) = vols.snapshot(v, VZDUMP_SNAP).await {
                res = Err(e);
                break;
            }
            made.push(v.clone());
        }
    }
    if frozen
        && let Some(g) = freeze
        && let Err(e) = g.thaw(vmid).await
    {
        res = res.and(Err(e));
    }
    if let Some(pid) = fs_pid {
        // Thawed also after a failure; a thaw that fails is only a warning, as in PVE.
        fsfreeze(pid, &fs_frozen, false, log).await;
    }
    if let Err(e) = res {
        log.warn("snapshot create failed: starting cleanup");
        if let Err(c) = delete_volumes_and_section(store, vols, vmid, &made, true, held, log).await
        {
            log.warn(format!("cleanup after failed snapshot failed - {c}"));
        }
        return Err(e);
    }

    store.update(vmid, |conf| {
        if conf.get("lock") != Some(Lock::Snapshot.as_str()) {
            return Err(failed("missing snapshot lock"));
        }
        let Some(snap) = conf.snapshots.get_mut(VZDUMP_SNAP) else {
            return Err(failed(format!("snapshot '{VZDUMP_SNAP}' does not exist")));
        };
        if snap.snapstate() != Some(SnapState::Prepare) {
            return Err(failed("wrong snapshot state"));
        }
        snap.set_snapstate(None);
        conf.main.set_lock(held);
        conf.main
            .options
            .insert("parent".into(), VZDUMP_SNAP.to_string());
        Ok(())
    })?;
    Ok(())
}

/// `snapshot_delete($vmid, 'vzdump', $force)`; the container holds `held` before and after
/// (vzdump's stale-snapshot removal runs under `lock: backup`; the final cleanup after the
/// lock was dropped).
///
/// # Errors
/// Missing snapshot, lock conflicts, or (without `force`) a failing volume.
pub async fn snapshot_delete(
    store: &CtStore,
    vols: &dyn VolumeSnapshots,
    vmid: u32,
    force: bool,
    held: Option<Lock>,
    log: &TaskLog,
) -> Result<()> {
    let volids = store.update(vmid, |conf| {
        let Some(snap) = conf.snapshots.get(VZDUMP_SNAP) else {
            return Err(failed(format!("snapshot '{VZDUMP_SNAP}' does not exist")));
        };
        let volids = snapshot_volids(snap).map_err(failed)?;
        expect_lock(conf, held).map_err(failed)?;
        conf.main.set_lock(Some(Lock::SnapshotDelete));
        if let Some(s) = conf.snapshots.get_mut(VZDUMP_SNAP) {
            s.set_snapstate(Some(SnapState::Delete));
        }
        Ok(volids)
    })?;
    delete_volumes_and_section(store, vols, vmid, &volids, force, held, log).await
}

async fn delete_volumes_and_section(
    store: &CtStore,
    vols: &dyn VolumeSnapshots,
    vmid: u32,
    volids: &[String],
    force: bool,
    held: Option<Lock>,
    log: &TaskLog,
) -> Result<()> {
    for v in volids {
        if let Err(e) = vols.delete_snapshot(v, VZDUMP_SNAP).await {
            if force {
                log.warn(format!("{e}"));
            } else {
                return Err(e);
            }
        }
    }
    store.update(vmid, |conf| {
        let parent = conf
            .snapshots
            .get(VZDUMP_SNAP)
            .and_then(|s| s.get("parent"))
            .map(str::to_string);
        let repoint = |sec: &mut ConfigSection| {
            if sec.get("parent") == Some(VZDUMP_SNAP) {
                match &parent {
                    Some(p) => {
                        sec.options.insert("parent".into(), p.clone());
                    }
                    None => {
                        sec.options.remove("parent");
                    }
                }
            }
        };
        repoint(&mut conf.main);
        for s in conf.snapshots.values_mut() {
            repoint(s);
        }
        conf.snapshots.remove(VZDUMP_SNAP);
        conf.main.set_lock(held);
        Ok(())
    })?;
    Ok(())
}

/// A recording [`VolumeSnapshots`] for tests: volumes in `capable` can snapshot, snapshots of
/// volumes in `failing` fail; every call is recorded as `op volid@snap`.
#[derive(Debug, Default)]
pub struct RecordingSnapshots {
    /// Volumes with the snapshot feature.
    pub capable: BTreeSet<String>,
    /// Volumes whose snapshot operations fail.
    pub failing: BTreeSet<String>,
    /// The calls.
    pub calls: Mutex<Vec<String>>,
}

impl RecordingSnapshots {
    fn record(&self, s: String) {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s);
    }

    /// The calls so far.
    #[must_use]
    pub fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[async_trait::async_trait]
impl VolumeSnapshots for RecordingSnapshots {
    async fn can_snapshot(&self, volid: &str) -> Result<bool> {
        Ok(self.capable.contains(volid))
    }
    async fn snapshot(&self, volid: &str, snap: &str) -> Result<()> {
        self.record(format!("snapshot {volid}@{snap}"));
        if self.failing.contains(volid) {
            return Err(Error::msg(format!("snapshot of {volid} failed")));
        }
        Ok(())
    }
    async fn delete_snapshot(&self, volid: &str, snap: &str) -> Result<()> {
        self.record(format!("delete {volid}@{snap}"));
        if self.failing.contains(volid) {
            return Err(Error::msg(format!("delete of {volid}@{snap} failed")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzkit_host::paths::Layout;

    const CONF: &str = "arch: amd64\nhostname: ct100\nlock: backup\n\
        mp0: zfs:subvol-100-disk-1,mp=/data,backup=1,size=1G\n\
        mp1: zfs:subvol-100-disk-2,mp=/skip,size=1G\n\
        mp2: /srv/bind,mp=/bind\n\
        rootfs: zfs:subvol-100-disk-0,size=1G\nunused0: zfs:subvol-100-disk-9\n";

    fn setup() -> (tempfile::TempDir, CtStore) {
        let d = tempfile::tempdir().unwrap();
        let store = CtStore::new(Layout::new(d.path()));
        std::fs::create_dir_all(d.path().join("etc/pve/lxc")).unwrap();
        std::fs::write(d.path().join("etc/pve/lxc/100.conf"), CONF).unwrap();
        (d, store)
    }

    fn vols(capable: &[&str], failing: &[&str]) -> RecordingSnapshots {
        RecordingSnapshots {
            capable: capable.iter().map(|s| s.to_string()).collect(),
            failing: failing.iter().map(|s| s.to_string()).collect(),
            ..RecordingSnapshots::default()
        }
    }

    #[tokio::test]
    async fn feature_check_is_a_mode_failure() {
        let v = vols(&["zfs:a"], &[]);
        check_snapshot_feature(&v, &["zfs:a".into()]).await.unwrap();
        let err = check_snapshot_feature(&v, &["zfs:a".into(), "local:100/x.raw".into()])
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mode failure - some volumes do not support snapshots"
        );
    }

    #[tokio::test]
    async fn create_writes_the_section_and_keeps_the_backup_lock() {
        let (d, store) = setup();
        let v = vols(&[], &[]);
        let log = TaskLog::new(None);
        snapshot_create(
            &store,
            &v,
            100,
            Some(Lock::Backup),
            None,
            1_700_000_000,
            &log,
        )
        .await
        .unwrap();
        assert_eq!(
            v.calls(),
            [
                "snapshot zfs:subvol-100-disk-0@vzdump",
                "snapshot zfs:subvol-100-disk-1@vzdump"
            ]
        );
        let text = std::fs::read_to_string(d.path().join("etc/pve/lxc/100.conf")).unwrap();
        assert!(
            text.starts_with("arch: amd64\nhostname: ct100\nlock: backup\n"),
            "{text}"
        );
        assert!(text.contains("parent: vzdump\n"), "{text}");
        let snap = text.split("[vzdump]\n").nth(1).expect("section");
        assert!(
            snap.contains("#vzdump backup snapshot\n") || snap.contains("description"),
            "{snap}"
        );
        assert!(snap.contains("snaptime: 1700000000\n"), "{snap}");
        assert!(
            !snap.contains("lock:") && !snap.contains("unused0") && !snap.contains("snapstate")
        );
        // A second create refuses the name.
        let err = snapshot_create(&store, &v, 100, Some(Lock::Backup), None, 1, &log)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "snapshot name 'vzdump' already used");

        // Cleanup after the backup lock is gone: delete volumes, section, parent.
        store.remove_lock(100, Some(Lock::Backup)).unwrap();
        snapshot_delete(&store, &v, 100, false, None, &log)
            .await
            .unwrap();
        let text = std::fs::read_to_string(d.path().join("etc/pve/lxc/100.conf")).unwrap();
        assert!(
            !text.contains("[vzdump]") && !text.contains("parent:") && !text.contains("lock:"),
            "{text}"
        );
        assert_eq!(
            v.calls()[2..],
            [
                "delete zfs:subvol-100-disk-0@vzdump".to_string(),
                "delete zfs:subvol-100-disk-1@vzdump".to_string()
            ]
        );
    }

    #[tokio::test]
    async fn failed_create_cleans_up_what_it_made() {
        let (d, store) = setup();
        let v = vols(&[], &["zfs:subvol-100-disk-1"]);
        let log = TaskLog::new(None);
        let err = snapshot_create(&store, &v, 100, Some(Lock::Backup), None, 1, &log)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "snapshot of zfs:subvol-100-disk-1 failed");
        assert_eq!(
            v.calls(),
            [
                "snapshot zfs:subvol-100-disk-0@vzdump",
                "snapshot zfs:subvol-100-disk-1@vzdump",
                "delete zfs:subvol-100-disk-0@vzdump",
            ]
        );
        let text = std::fs::read_to_string(d.path().join("etc/pve/lxc/100.conf")).unwrap();
        assert!(!text.contains("[vzdump]"), "{text}");
        assert!(text.contains("lock: backup\n"), "{text}");
    }

    #[tokio::test]
    async fn stale_snapshot_is_force_removed_under_the_backup_lock() {
        let (d, store) = setup();
        let text = format!(
            "{CONF}parent: vzdump\n\n[vzdump]\n#vzdump backup snapshot\narch: amd64\n\
             rootfs: zfs:subvol-100-disk-0,size=1G\nsnaptime: 5\n"
        );
        std::fs::write(d.path().join("etc/pve/lxc/100.conf"), text).unwrap();
        // The stale snapshot is gone on the storage already: force turns that into a warning.
        let v = vols(&[], &["zfs:subvol-100-disk-0"]);
        let log = TaskLog::new(None);
        snapshot_delete(&store, &v, 100, true, Some(Lock::Backup), &log)
            .await
            .unwrap();
        assert_eq!(log.warnings(), 1);
        let text = std::fs::read_to_string(d.path().join("etc/pve/lxc/100.conf")).unwrap();
        assert!(
            !text.contains("[vzdump]") && !text.contains("parent:"),
            "{text}"
        );
        assert!(text.contains("lock: backup\n"), "{text}");
        // Without a snapshot there is nothing to delete.
        let err = snapshot_delete(&store, &v, 100, true, Some(Lock::Backup), &log)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "snapshot 'vzdump' does not exist");
    }
}
