//! Container snapshots, templates and clones (`pct snapshot`, `delsnapshot`,
//! `rollback`, `listsnapshot`, `template`, `clone`), following PVE's `AbstractConfig` flows.
//!
//! A snapshot is a `[name]` section of the config holding a copy of the current config
//! (without `lock`, `snapstate`, `snaptime`, `vmstate`, `digest`, `description` and
//! `unusedN`) plus `snaptime` and the snapshot's `description`, and a storage snapshot of
//! every volume mount point. The config changes are pure functions on [`CtConfig`]
//! ([`prepare`], [`commit`], [`delete_begin`], [`delete_finish`], [`rollback_prepare`],
//! [`rollback_commit`]); the flows ([`snapshot_create`], [`snapshot_delete`],
//! [`snapshot_rollback`]) run them under the config flock and call the storage and the
//! container life cycle through [`SnapshotOps`], whose real implementation is
//! [`HostOps`].
//!
//! Creating: the `snapshot` lock is set and the section written with `snapstate: prepare`;
//! a running container is frozen while its volumes are snapshotted and always thawed; on a
//! failure the volume snapshots made so far are deleted again and the section removed
//! ("snapshot create failed: starting cleanup"); the commit drops `snapstate` and the lock and
//! points `parent` at the new snapshot. Deleting: lock `snapshot-delete`, `snapstate:
//! delete`, every volume snapshot deleted (with `force`, failures are warnings), then
//! `parent` links re-pointed and the section removed. Rolling back: every volume must allow
//! it (`volume_rollback_is_possible`), a running container is stopped, lock `rollback`, the
//! volumes are rolled back, and the config is replaced by the snapshot's (keeping the
//! current description, the snapshot list and `unusedN`, with volumes only the current config
//! used becoming `unusedN`). A failed volume rollback leaves `lock: rollback`, as in PVE.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use vzkit_storage::manager::Storages;
use vzkit_storage::plugin::Feature;

use crate::conf::mountpoint::MountPointKind;
use crate::conf::{ConfigSection, CtConfig, Lock, SnapState};
use crate::error::{Result, RuntimeError};
use crate::lxc::Lxc;
use crate::store::CtStore;

/// Longest snapshot name PVE accepts.
pub const MAX_SNAPNAME_LEN: usize = 40;

fn failed(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Failed(msg.into())
}

/// Checks a snapshot name as PVE's API does: `pve-configid` format, at most 40 characters,
/// not `current` (and not `vzdump`, which only vzdump itself uses).
///
/// # Errors
/// `snapname: invalid format - invalid configuration ID 'X'`, `snapname: value may only be
/// 40 characters long`, `invalid snapshot name 'current'`.
pub fn check_snapname(name: &str) -> Result<()> {
    check_snapname_format(name)?;
    if name == "current" || name == "vzdump" {
        return Err(RuntimeError::Invalid(format!(
            "invalid snapshot name '{name}'"
        )));
    }
    Ok(())
}

/// The format part of [`check_snapname`] (what a config section name can hold).
///
/// # Errors
/// As [`check_snapname`], without the reserved names.
pub fn check_snapname_format(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(RuntimeError::Invalid(format!(
            "snapname: invalid format - invalid configuration ID '{name}'"
        )));
    }
    if name.len() > MAX_SNAPNAME_LEN {
        return Err(RuntimeError::Invalid(format!(
            "snapname: value may only be {MAX_SNAPNAME_LEN} characters long"
        )));
    }
    Ok(())
}

/// Whether `key` is left out when a config is copied into or out of a snapshot
/// (`__snapshot_copy_config`).
fn excluded_from_copy(key: &str) -> bool {
    matches!(
        key,
        "snapshots" | "snapstate" | "snaptime" | "vmstate" | "lock" | "digest" | "description"
    ) || key
        .strip_prefix("unused")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `__snapshot_copy_config`: the options, raw `lxc.*` keys and env of `source` without the
/// excluded keys (the description is not copied).
#[must_use]
pub fn copy_config(source: &ConfigSection) -> ConfigSection {
    ConfigSection {
        description: None,
        options: source
            .options
            .iter()
            .filter(|(k, _)| !excluded_from_copy(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        lxc: source.lxc.clone(),
        env: source.env.clone(),
    }
}

/// `(key, volid)` of the volume mount points of `section` in `foreach_volume` order; with
/// `backup_only`, only rootfs and `backup=1` ones. Mount points that do not parse are
/// skipped (the config was validated when it was written).
#[must_use]
pub fn section_volumes(section: &ConfigSection, backup_only: bool) -> Vec<(String, String)> {
    section
        .mountpoint_keys()
        .into_iter()
        .filter_map(|k| {
            let mp = crate::conf::mountpoint::parse_volume(&k, section.get(&k)?).ok()?;
            if mp.kind() != MountPointKind::Volume || mp.volume.is_empty() {
                return None;
            }
            if backup_only && !mp.backup_enabled(&k) {
                return None;
            }
            Some((k, mp.volume))
        })
        .collect()
}

/// `__snapshot_prepare`: refuses templates, locked configs, used names and configs without
/// the snapshot feature; sets `lock: snapshot`; drops `parent` references to `snap` from
/// other snapshots (returned as warnings); adds the `[snap]` section with `snapstate:
/// prepare`, `snaptime` and `description`.
///
/// `has_feature` answers `has_feature('snapshot', conf)` for the current config;
/// `save_vmstate` asks for the RAM state, which containers cannot save.
///
/// # Errors
/// PVE's messages: "you can't take a snapshot if it's a template", "CT is locked (X)",
/// "snapshot name 'X' already used", "snapshot feature is not available",
/// "implement me - snapshot_save_vmstate".
pub fn prepare(
    conf: &mut CtConfig,
    snap: &str,
    comment: Option<&str>,
    snaptime: i64,
    save_vmstate: bool,
    has_feature: impl FnOnce(&ConfigSection) -> bool,
) -> Result<Vec<String>> {
    if conf.main.is_template() {
        return Err(failed("you can't take a snapshot if it's a template"));
    }
    conf.check_lock()?;
    conf.main.set_lock(Some(Lock::Snapshot));
    if conf.snapshots.contains_key(snap) {
        return Err(failed(format!("snapshot name '{snap}' already used")));
    }
    if !has_feature(&conf.main) {
        return Err(failed("snapshot feature is not available"));
    }
    let mut warnings = Vec::new();
    for (name, section) in &mut conf.snapshots {
        if section.get("parent") == Some(snap) {
            warnings.push(format!(
                "deleting parent '{snap}' reference from '{name}' to avoid bogus snapshot cycle."
            ));
            section.options.remove("parent");
        }
    }
    if save_vmstate {
        return Err(failed("implement me - snapshot_save_vmstate"));
    }
    let mut section = copy_config(&conf.main);
    section.set_snapstate(Some(SnapState::Prepare));
    section
        .options
        .insert("snaptime".to_string(), snaptime.to_string());
    if let Some(c) = comment.filter(|c| !c.is_empty() && *c != "0") {
        section.description = Some(c.to_string());
    }
    conf.snapshots.insert(snap.to_string(), section);
    Ok(warnings)
}

/// `__snapshot_commit`: requires `lock: snapshot` and the snapshot in state `prepare`;
/// drops `snapstate` and the lock and sets `parent: <snap>`.
///
/// # Errors
/// "missing snapshot lock", "snapshot 'X' does not exist", "wrong snapshot state".
pub fn commit(conf: &mut CtConfig, snap: &str) -> Result<()> {
    if conf.get("lock") != Some(Lock::Snapshot.as_str()) {
        return Err(failed("missing snapshot lock"));
    }
    let section = conf
        .snapshots
        .get_mut(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))?;
    if section.snapstate() != Some(SnapState::Prepare) {
        return Err(failed("wrong snapshot state"));
    }
    section.set_snapstate(None);
    conf.main.set_lock(None);
    conf.main
        .options
        .insert("parent".to_string(), snap.to_string());
    Ok(())
}

fn expect_lock(conf: &CtConfig, lock: Lock) -> Result<()> {
    if conf.get("lock") == Some(lock.as_str()) {
        Ok(())
    } else {
        Err(failed(format!(
            "encountered invalid lock, expected '{}'",
            lock.as_str()
        )))
    }
}

fn snapshot_of<'a>(conf: &'a mut CtConfig, snap: &str) -> Result<&'a mut ConfigSection> {
    conf.snapshots
        .get_mut(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))
}

/// The first step of deleting under the config lock: the expected lock (`snapshot-delete`,
/// or `snapshot` when cleaning up a failed create) must be set, no template, and the
/// snapshot gets `snapstate: delete`.
///
/// # Errors
/// "encountered invalid lock, expected 'X'", "you can't delete a snapshot if vm is a
/// template", "snapshot 'X' does not exist".
pub fn delete_begin(conf: &mut CtConfig, snap: &str, expected: Lock) -> Result<()> {
    expect_lock(conf, expected)?;
    if conf.main.is_template() {
        return Err(failed("you can't delete a snapshot if vm is a template"));
    }
    snapshot_of(conf, snap)?.set_snapstate(Some(SnapState::Delete));
    Ok(())
}

/// `__snapshot_delete_remove_drive`: after its storage snapshot is gone, the volume `key`
/// leaves the snapshot section and is recorded there as `unusedN` (so an interrupted delete
/// still shows which volumes were handled).
///
/// # Errors
/// As [`delete_begin`], too many unused volumes.
pub fn delete_drive(conf: &mut CtConfig, snap: &str, key: &str, expected: Lock) -> Result<()> {
    expect_lock(conf, expected)?;
    let section = snapshot_of(conf, snap)?;
    if let Some(value) = section.options.remove(key)
        && let Ok(mp) = crate::conf::mountpoint::parse_volume(key, &value)
        && mp.kind() == MountPointKind::Volume
    {
        section.add_unused_volume(&mp.volume)?;
    }
    Ok(())
}

/// The last step of deleting: `parent` references to `snap` (of the current config and the
/// other snapshots) move to its parent, the section and the lock go, and the volumes whose
/// snapshots were deleted are recorded as `unusedN` (the writer leaves out those the current
/// config still uses).
///
/// # Errors
/// As [`delete_begin`], [`crate::conf::error::ConfError::TooManyUnused`].
pub fn delete_finish(
    conf: &mut CtConfig,
    snap: &str,
    expected: Lock,
    unused: &[String],
) -> Result<()> {
    expect_lock(conf, expected)?;
    let parent = snapshot_of(conf, snap)?.get("parent").map(str::to_string);
    let relink = |section: &mut ConfigSection| {
        if section.get("parent") == Some(snap) {
            match &parent {
                Some(p) => {
                    section.options.insert("parent".to_string(), p.clone());
                }
                None => {
                    section.options.remove("parent");
                }
            }
        }
    };
    relink(&mut conf.main);
    for (name, section) in &mut conf.snapshots {
        if name != snap {
            relink(section);
        }
    }
    conf.snapshots.remove(snap);
    conf.main.set_lock(None);
    for volid in unused {
        if !conf.main.used_volumes().contains(volid) {
            conf.add_unused_volume(volid)?;
        }
    }
    Ok(())
}

/// The checks of the rollback's prepare phase that need no storage: not a template, the
/// snapshot exists. Returns the snapshot's volumes.
///
/// # Errors
/// "you can't rollback if vm is a template", "snapshot 'X' does not exist".
pub fn rollback_snapshot(conf: &CtConfig, snap: &str) -> Result<Vec<(String, String)>> {
    if conf.main.is_template() {
        return Err(failed("you can't rollback if vm is a template"));
    }
    let section = conf
        .snapshots
        .get(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))?;
    Ok(section_volumes(section, false))
}

/// The rest of the prepare phase (after `volume_rollback_is_possible` passed and before the
/// container is stopped): the snapshot must be complete and the config unlocked.
///
/// # Errors
/// "unable to rollback to incomplete snapshot (snapstate = X)", "CT is locked (X)".
pub fn rollback_prepare(conf: &CtConfig, snap: &str) -> Result<()> {
    let section = conf
        .snapshots
        .get(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))?;
    if let Some(state) = section.get("snapstate") {
        return Err(failed(format!(
            "unable to rollback to incomplete snapshot (snapstate = {state})"
        )));
    }
    conf.check_lock()?;
    Ok(())
}

/// The commit phase of a rollback: requires `lock: rollback`; volumes of the current config
/// the snapshot does not use become `unusedN`; the new config is the snapshot's copy plus
/// the current description, `unusedN` and snapshot list, with `parent: <snap>`. The pending
/// section is dropped.
///
/// # Errors
/// "got wrong lock", "snapshot 'X' does not exist", too many unused volumes.
pub fn rollback_commit(conf: &mut CtConfig, snap: &str) -> Result<()> {
    let section = conf
        .snapshots
        .get(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))?
        .clone();
    if conf.get("lock") != Some(Lock::Rollback.as_str()) {
        return Err(failed("got wrong lock"));
    }
    conf.main.set_lock(None);
    let snap_vols: BTreeSet<String> = section_volumes(&section, false)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    for (_, volid) in section_volumes(&conf.main, false) {
        if !snap_vols.contains(&volid) {
            conf.add_unused_volume(&volid)?;
        }
    }
    let mut main = copy_config(&section);
    main.description = conf.main.description.take();
    for (k, v) in &conf.main.options {
        if excluded_from_copy(k) && k.starts_with("unused") {
            main.options.insert(k.clone(), v.clone());
        }
    }
    main.options.insert("parent".to_string(), snap.to_string());
    conf.main = main;
    conf.pending = ConfigSection::default();
    Ok(())
}

/// One entry of `pct listsnapshot` (`snapshot_list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot name (`current` for the current state).
    pub name: String,
    /// Parent snapshot.
    pub parent: Option<String>,
    /// Creation time (seconds since the epoch); `None` for `current`.
    pub snaptime: Option<i64>,
    /// Description (`You are here!` for `current`).
    pub description: String,
}

/// The snapshots of `conf` and the current state (`snapshot_list`), sorted by name with
/// `current` last.
#[must_use]
pub fn snapshot_list(conf: &CtConfig) -> Vec<SnapshotInfo> {
    let mut list: Vec<SnapshotInfo> = conf
        .snapshots
        .iter()
        .map(|(name, s)| SnapshotInfo {
            name: name.clone(),
            parent: s.get("parent").map(str::to_string),
            snaptime: s.get("snaptime").and_then(|t| t.parse().ok()),
            description: s.description.clone().unwrap_or_default(),
        })
        .collect();
    list.push(SnapshotInfo {
        name: "current".to_string(),
        parent: conf.get("parent").map(str::to_string),
        snaptime: None,
        description: "You are here!".to_string(),
    });
    list
}

/// `print_snapshot_tree`: children below their parent, siblings and roots ordered by
/// `snaptime` (`current` last), each line `<prefix> <name> <time> <first description line>`;
/// `fmt_time` formats a snaptime (PVE: local time, `%F %H:%M:%S`).
#[must_use]
pub fn format_snapshot_tree(list: &[SnapshotInfo], fmt_time: &dyn Fn(i64) -> String) -> String {
    use std::collections::BTreeMap;
    let by_name: BTreeMap<&str, &SnapshotInfo> =
        list.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut children: BTreeMap<&str, Vec<&SnapshotInfo>> = BTreeMap::new();
    let mut roots = Vec::new();
    for e in list {
        match e.parent.as_deref().filter(|p| by_name.contains_key(p)) {
            Some(p) => children.entry(p).or_default().push(e),
            None => roots.push(e),
        }
    }
    fn order(v: &mut [&SnapshotInfo]) {
        v.sort_by(|a, b| match (a.snaptime, b.snaptime) {
            (None, _) => std::cmp::Ordering::Greater,
            (_, None) => std::cmp::Ordering::Less,
            (Some(x), Some(y)) => x.cmp(&y),
        });
    }
    fn walk(
        out: &mut String,
        prefix: &str,
        e: &SnapshotInfo,
        children: &mut std::collections::BTreeMap<&str, Vec<&SnapshotInfo>>,
        fmt_time: &dyn Fn(i64) -> String,
    ) {
        let description = if e.description.is_empty() {
            "no-description"
        } else {
            e.description.lines().next().unwrap_or("")
        };
        let time = e.snaptime.map(fmt_time).unwrap_or_default();
        let len = 30usize.saturating_sub(prefix.len());
        out.push_str(&format!(
            "{prefix} {:<len$} {time:<23} {description}\n",
            e.name
        ));
        if let Some(mut kids) = children.remove(e.name.as_str()) {
            order(&mut kids);
            let prefix = format!(" {prefix}");
            for k in kids {
                walk(out, &prefix, k, children, fmt_time);
            }
        }
    }
    order(&mut roots);
    let mut out = String::new();
    for r in roots {
        walk(&mut out, "`->", r, &mut children, fmt_time);
    }
    out
}

/// Formats seconds since the epoch as `YYYY-MM-DD HH:MM:SS` in UTC.
#[must_use]
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The side effects of the snapshot flows: storage and container life cycle.
#[async_trait(?Send)]
pub trait SnapshotOps {
    /// The current time (seconds since the epoch) for `snaptime`.
    fn now(&self) -> i64;
    /// `has_feature(feature, section, snap, backup_only)`: every (backup-enabled, with
    /// `backup_only`) mount point is a volume with `feature`.
    fn has_feature(
        &self,
        feature: Feature,
        section: &ConfigSection,
        snap: Option<&str>,
        backup_only: bool,
    ) -> bool;
    /// Activates the storages of `volids`.
    async fn activate_storages(&self, volids: &[String]) -> Result<()>;
    /// Whether the container runs.
    async fn is_running(&self, vmid: u32) -> Result<bool>;
    /// Freezes a running container.
    async fn freeze(&self, vmid: u32) -> Result<()>;
    /// Thaws it again.
    async fn thaw(&self, vmid: u32) -> Result<()>;
    /// Stops it hard.
    async fn stop(&self, vmid: u32) -> Result<()>;
    /// `volume_snapshot`.
    async fn volume_snapshot(&self, volid: &str, snap: &str) -> Result<()>;
    /// `volume_snapshot_delete`.
    async fn volume_snapshot_delete(&self, volid: &str, snap: &str) -> Result<()>;
    /// `volume_rollback_is_possible`.
    async fn volume_rollback_is_possible(&self, volid: &str, snap: &str) -> Result<()>;
    /// `volume_snapshot_rollback`.
    async fn volume_snapshot_rollback(&self, volid: &str, snap: &str) -> Result<()>;
}

/// [`SnapshotOps`] on the host: the configured storages and LXC.
#[derive(Debug)]
pub struct HostOps<'a> {
    storages: &'a Storages,
    lxc: Lxc<'a>,
}

impl<'a> HostOps<'a> {
    /// The host's storages and containers.
    #[must_use]
    pub fn new(storages: &'a Storages) -> Self {
        Self {
            storages,
            lxc: Lxc::new(storages),
        }
    }

    /// Whether `volid` has `feature` (at `snap`); `false` for volume ids that do not resolve.
    #[must_use]
    pub fn volume_has_feature(&self, feature: Feature, volid: &str, snap: Option<&str>) -> bool {
        self.storages
            .resolve(volid)
            .and_then(|(p, name)| p.volume_has_feature(feature, &name, snap))
            .unwrap_or(false)
    }
}

/// `has_feature` for containers: every mount point considered (all, or with `backup_only`
/// rootfs and `backup=1` ones) must be a volume whose storage has `feature`; bind and
/// device mount points fail it.
pub fn section_has_feature(
    section: &ConfigSection,
    backup_only: bool,
    volume_has: impl Fn(&str) -> bool,
) -> bool {
    let Ok(mps) = section.mountpoints() else {
        return false;
    };
    mps.iter()
        .filter(|(k, mp)| !backup_only || mp.backup_enabled(k))
        .all(|(_, mp)| mp.kind() == MountPointKind::Volume && volume_has(&mp.volume))
}

#[async_trait(?Send)]
impl SnapshotOps for HostOps<'_> {
    fn now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    fn has_feature(
        &self,
        feature: Feature,
        section: &ConfigSection,
        snap: Option<&str>,
        backup_only: bool,
    ) -> bool {
        section_has_feature(section, backup_only, |v| {
            self.volume_has_feature(feature, v, snap)
        })
    }

    async fn activate_storages(&self, volids: &[String]) -> Result<()> {
        let mut done = BTreeSet::new();
        for volid in volids {
            let (plugin, _) = self.storages.resolve(volid)?;
            if done.insert(plugin.id().to_string()) {
                plugin.activate_storage().await?;
            }
        }
        Ok(())
    }

    async fn is_running(&self, vmid: u32) -> Result<bool> {
        Ok(self.lxc.state(vmid).await?.is_running())
    }

    async fn freeze(&self, vmid: u32) -> Result<()> {
        self.lxc.freeze(vmid).await
    }

    async fn thaw(&self, vmid: u32) -> Result<()> {
        self.lxc.thaw(vmid).await
    }

    async fn stop(&self, vmid: u32) -> Result<()> {
        let mut warnings = Vec::new();
        let res = self.lxc.stop(vmid, &mut |w| warnings.push(w)).await;
        for w in warnings {
            eprintln!("WARN: {w}");
        }
        res
    }

    async fn volume_snapshot(&self, volid: &str, snap: &str) -> Result<()> {
        let (plugin, name) = self.storages.resolve(volid)?;
        plugin.volume_snapshot(&name, snap).await?;
        Ok(())
    }

    async fn volume_snapshot_delete(&self, volid: &str, snap: &str) -> Result<()> {
        let (plugin, name) = self.storages.resolve(volid)?;
        // A snapshot a backup mounted must not be active while it is removed.
        let _ = plugin.deactivate_volume(&name, Some(snap)).await;
        plugin.volume_snapshot_delete(&name, snap).await?;
        Ok(())
    }

    async fn volume_rollback_is_possible(&self, volid: &str, snap: &str) -> Result<()> {
        let (plugin, name) = self.storages.resolve(volid)?;
        plugin.volume_rollback_is_possible(&name, snap).await?;
        Ok(())
    }

    async fn volume_snapshot_rollback(&self, volid: &str, snap: &str) -> Result<()> {
        let (plugin, name) = self.storages.resolve(volid)?;
        plugin.volume_snapshot_rollback(&name, snap).await?;
        Ok(())
    }
}

/// `pct snapshot` (and vzdump's snapshot mode with `backup_only`: only rootfs and
/// `backup=1` volumes). Warnings go to `warn`.
///
/// # Errors
/// The [`prepare`] refusals (config unchanged), freeze and volume snapshot errors (after
/// deleting the snapshots made and the section), and [`commit`] errors.
pub async fn snapshot_create(
    store: &CtStore,
    ops: &dyn SnapshotOps,
    vmid: u32,
    snap: &str,
    comment: Option<&str>,
    backup_only: bool,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    check_snapname_format(snap)?;
    let now = ops.now();
    let warnings = store.update(vmid, |conf| {
        prepare(conf, snap, comment, now, false, |s| {
            ops.has_feature(Feature::Snapshot, s, None, backup_only)
        })
    })?;
    for w in warnings {
        warn(w);
    }
    let section = store
        .load(vmid)?
        .snapshots
        .remove(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))?;
    let volumes = section_volumes(&section, backup_only);
    let mut made: BTreeSet<String> = BTreeSet::new();
    let res: Result<()> = async {
        let running = ops.is_running(vmid).await?;
        let mut frozen = false;
        let inner: Result<()> = async {
            if running {
                ops.freeze(vmid).await?;
                frozen = true;
            }
            let vols: Vec<String> = volumes.iter().map(|(_, v)| v.clone()).collect();
            ops.activate_storages(&vols).await?;
            for (key, volid) in &volumes {
                ops.volume_snapshot(volid, snap).await?;
                made.insert(key.clone());
            }
            Ok(())
        }
        .await;
        if frozen && let Err(e) = ops.thaw(vmid).await {
            warn(format!("unable to thaw CT {vmid}: {e}"));
        }
        inner
    }
    .await;
    if let Err(e) = res {
        warn("snapshot create failed: starting cleanup".to_string());
        if let Err(undo) =
            delete_flow(store, ops, vmid, snap, true, Some(&made), backup_only, warn).await
        {
            warn(undo.to_string());
        }
        return Err(e);
    }
    store.update(vmid, |conf| commit(conf, snap))
}

/// `pct delsnapshot`. With `force`, volume errors are warnings (to `warn`). The snapshot
/// `vzdump` (made with `backup_only`) covers only rootfs and `backup=1` volumes.
///
/// # Errors
/// "snapshot 'X' does not exist", storage activation, "CT is locked (X)", volume snapshot
/// delete errors without `force` (the lock `snapshot-delete` stays then, as in PVE).
pub async fn snapshot_delete(
    store: &CtStore,
    ops: &dyn SnapshotOps,
    vmid: u32,
    snap: &str,
    force: bool,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    // vzdump's snapshot covers only rootfs and backup=1 volumes (PVE keys this on the name).
    let backup_only = snap == "vzdump";
    delete_flow(store, ops, vmid, snap, force, None, backup_only, warn).await
}

#[allow(clippy::too_many_arguments)]
async fn delete_flow(
    store: &CtStore,
    ops: &dyn SnapshotOps,
    vmid: u32,
    snap: &str,
    force: bool,
    drives: Option<&BTreeSet<String>>,
    backup_only: bool,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let conf = store.load(vmid)?;
    let section = conf
        .snapshots
        .get(snap)
        .ok_or_else(|| failed(format!("snapshot '{snap}' does not exist")))?;
    let volumes = section_volumes(section, backup_only);
    let expected = if drives.is_some() {
        Lock::Snapshot
    } else {
        let vols: Vec<String> = volumes.iter().map(|(_, v)| v.clone()).collect();
        ops.activate_storages(&vols).await?;
        store.set_lock(vmid, Lock::SnapshotDelete)?;
        Lock::SnapshotDelete
    };
    store.update(vmid, |conf| delete_begin(conf, snap, expected))?;
    let mut unused = Vec::new();
    for (key, volid) in &volumes {
        if drives.is_none_or(|d| d.contains(key)) {
            match ops.volume_snapshot_delete(volid, snap).await {
                Ok(()) => unused.push(volid.clone()),
                Err(e) if force => warn(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        if !force {
            store.update(vmid, |conf| delete_drive(conf, snap, key, expected))?;
        }
    }
    store.update(vmid, |conf| delete_finish(conf, snap, expected, &unused))
}

/// `pct rollback`: checks every volume, stops a running container, rolls the volumes back
/// and replaces the config by the snapshot's. With `start`, the container is started again
/// afterwards by the caller.
///
/// # Errors
/// "snapshot 'X' does not exist", template, storage activation, the storage's
/// `volume_rollback_is_possible` refusal, incomplete snapshots, locks, "unable to rollback vm
/// N: vm is running", volume rollback errors (leaving `lock: rollback`).
pub async fn snapshot_rollback(
    store: &CtStore,
    ops: &dyn SnapshotOps,
    vmid: u32,
    snap: &str,
) -> Result<()> {
    // Prepare, under the config flock.
    let volumes = {
        let _lock = store.lock(vmid)?;
        let mut conf = store.load(vmid)?;
        let volumes = rollback_snapshot(&conf, snap)?;
        let vols: Vec<String> = volumes.iter().map(|(_, v)| v.clone()).collect();
        ops.activate_storages(&vols).await?;
        for volid in &vols {
            ops.volume_rollback_is_possible(volid, snap).await?;
        }
        rollback_prepare(&conf, snap)?;
        if ops.is_running(vmid).await? {
            // A failed stop shows as "still running" below, as in PVE.
            let _ = ops.stop(vmid).await;
        }
        if ops.is_running(vmid).await.unwrap_or(true) {
            return Err(failed(format!(
                "unable to rollback vm {vmid}: vm is running"
            )));
        }
        conf.main.set_lock(Some(Lock::Rollback));
        store.write(vmid, &conf)?;
        volumes
    };
    for (_, volid) in &volumes {
        ops.volume_snapshot_rollback(volid, snap).await?;
    }
    let vmstate = store.update(vmid, |conf| {
        let vmstate = conf
            .snapshots
            .get(snap)
            .is_some_and(|s| s.get("vmstate").is_some());
        rollback_commit(conf, snap)?;
        Ok(vmstate)
    })?;
    if vmstate {
        return Err(failed("implement me - save vmstate"));
    }
    Ok(())
}

/// Rewrites the volume of the mount point `key` in `section` to `volid`, keeping its
/// options.
fn set_volume(section: &mut ConfigSection, key: &str, volid: &str) -> Result<()> {
    let value = section
        .get(key)
        .ok_or_else(|| failed(format!("missing mount point '{key}'")))?;
    let mut mp = crate::conf::mountpoint::parse_volume(key, value)?;
    mp.volume = volid.to_string();
    let printed = mp.print(key == "rootfs")?;
    section.options.insert(key.to_string(), printed);
    Ok(())
}

/// `pct template`: converts the container's volumes into base volumes (`create_base`) and
/// sets `template: 1`. Refused for locked, running or already converted containers and
/// for containers with snapshots; every volume must have the `template` feature before
/// anything is converted. The config is rewritten after each converted volume, so it always
/// names volumes that exist.
///
/// # Errors
/// "unable to create template, because CT contains snapshots", "you can't convert a
/// template to a template", "you can't convert a CT to template if the CT is running",
/// "Template feature is not available for 'X'", storage errors.
pub async fn template(storages: &Storages, vmid: u32) -> Result<()> {
    let store = CtStore::new(storages.layout().clone());
    let _lock = store.lock(vmid)?;
    let mut conf = store.load(vmid)?;
    conf.check_lock()?;
    if !conf.snapshots.is_empty() {
        return Err(failed(
            "unable to create template, because CT contains snapshots",
        ));
    }
    if conf.main.is_template() {
        return Err(failed("you can't convert a template to a template"));
    }
    let lxc = Lxc::new(storages);
    if lxc.state(vmid).await?.is_running() {
        return Err(failed(
            "you can't convert a CT to template if the CT is running",
        ));
    }
    let ops = HostOps::new(storages);
    let mps = conf.mountpoints()?;
    for (_, mp) in &mps {
        if mp.kind() != MountPointKind::Volume
            || !ops.volume_has_feature(Feature::Template, &mp.volume, None)
        {
            return Err(failed(format!(
                "Template feature is not available for '{}'",
                mp.volume
            )));
        }
    }
    for (key, mp) in &mps {
        let (plugin, volname) = storages.resolve(&mp.volume)?;
        plugin.activate_volume(&volname, None).await?;
        let base = plugin.create_base(&volname).await?;
        set_volume(&mut conf.main, key, &format!("{}:{base}", plugin.id()))?;
        store.write(vmid, &conf)?;
    }
    conf.main.set("template", "1")?;
    store.write(vmid, &conf)
}

/// Options of [`clone_ct`] (`pct clone`).
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// Full copy instead of a linked clone (default: full unless the source is a template).
    pub full: Option<bool>,
    /// Clone this snapshot instead of the current state.
    pub snapname: Option<String>,
    /// Target storage of a full clone (default: each volume's own storage).
    pub storage: Option<String>,
    /// Hostname of the new container.
    pub hostname: Option<String>,
    /// Description of the new container.
    pub description: Option<String>,
}

fn random_mac() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| RuntimeError::io("read", "/dev/urandom", e))?;
    Ok(crate::conf::random_ether_addr(
        Some(crate::conf::DEFAULT_MAC_PREFIX),
        bytes,
    )?)
}

/// The new container's config: the source state without snapshot and lock keys, `pending`,
/// `template` and `unusedN`, with new MAC addresses, and `hostname`/`description` from the
/// options.
fn clone_config(source: &ConfigSection, opts: &CloneOptions) -> Result<CtConfig> {
    let mut section = copy_config(source);
    for k in ["parent", "template"] {
        section.options.remove(k);
    }
    // PVE copies every key of the cloned state, its description included.
    section.description = source.description.clone();
    for (key, mut net) in section.nets()? {
        net.hwaddr = Some(random_mac()?);
        section.options.insert(key, net.print()?);
    }
    if let Some(h) = &opts.hostname {
        section.set("hostname", h)?;
    }
    if let Some(d) = &opts.description {
        section.description = Some(d.clone());
    }
    Ok(CtConfig {
        main: section,
        ..CtConfig::default()
    })
}

/// `pct clone`: a new container `newid` from `vmid` (or its snapshot `snapname`). Linked
/// clones (from templates) use `clone_image` and need the `clone` feature on every volume;
/// full clones allocate new volumes (on `storage`, else the source volume's storage) and
/// copy the files through mounts (`cp -a --sparse=always`, keeping owners, modes, ACLs,
/// xattrs and holes). During the copy the source carries `lock: disk` and the target
/// `lock: create`; on failure every volume made for the target and its config are removed
/// again.
///
/// # Errors
/// "CT N already exists", "parameter 'storage' not allowed for linked clones",
/// "snapshot 'X' does not exist", "Linked clone feature for 'X' is not available",
/// "Cannot do full clones on a running container without snapshots", locks, storage, mount
/// and copy errors.
pub async fn clone_ct(
    storages: &Storages,
    vmid: u32,
    newid: u32,
    opts: &CloneOptions,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let store = CtStore::new(storages.layout().clone());
    if newid == vmid {
        return Err(RuntimeError::Invalid(
            "new CT id must differ from the source".into(),
        ));
    }
    let src = store.load(vmid)?;
    let full = opts.full.unwrap_or(!src.main.is_template());
    if opts.storage.is_some() && !full {
        return Err(RuntimeError::Invalid(
            "parameter 'storage' not allowed for linked clones".into(),
        ));
    }
    let lxc = Lxc::new(storages);
    let running = lxc.state(vmid).await?.is_running();
    if full && running && opts.snapname.is_none() {
        return Err(failed(
            "Cannot do full clones on a running container without snapshots",
        ));
    }
    let source = match &opts.snapname {
        Some(s) => src
            .snapshots
            .get(s)
            .ok_or_else(|| failed(format!("snapshot '{s}' does not exist")))?,
        None => &src.main,
    };
    let snap = opts.snapname.as_deref();
    let mut newconf = clone_config(source, opts)?;
    let mps = source.mountpoints()?;
    let ops = HostOps::new(storages);
    for (key, mp) in &mps {
        if mp.kind() != MountPointKind::Volume {
            return Err(failed(format!(
                "unable to clone mountpoint '{key}' (type {})",
                mp.kind().as_str()
            )));
        }
        if !full && !ops.volume_has_feature(Feature::Clone, &mp.volume, snap) {
            return Err(failed(format!(
                "Linked clone feature for '{}' is not available",
                mp.volume
            )));
        }
    }
    newconf.main.set_lock(Some(Lock::Create));
    store.create(newid, &newconf)?;
    if let Err(e) = store.set_lock(vmid, Lock::Disk) {
        let _ = store.remove(newid);
        return Err(e);
    }
    let mut made = Vec::new();
    let res = clone_volumes(
        storages,
        &store,
        newid,
        &mut newconf,
        &mps,
        snap,
        full,
        opts,
        &mut made,
        warn,
    )
    .await;
    if let Err(e) = store.remove_lock(vmid, Some(Lock::Disk)) {
        warn(format!("unable to remove lock of CT {vmid}: {e}"));
    }
    match res {
        Ok(()) => {
            newconf.main.set_lock(None);
            store.write(newid, &newconf)
        }
        Err(e) => {
            for volid in made.iter().rev() {
                if let Err(undo) = storages.vdisk_free(volid).await {
                    warn(format!("unable to free '{volid}': {undo}"));
                }
            }
            if let Err(undo) = store.remove(newid) {
                warn(format!("unable to remove config of CT {newid}: {undo}"));
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn clone_volumes(
    storages: &Storages,
    store: &CtStore,
    newid: u32,
    newconf: &mut CtConfig,
    mps: &[(String, crate::conf::mountpoint::MountPoint)],
    snap: Option<&str>,
    full: bool,
    opts: &CloneOptions,
    made: &mut Vec<String>,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let owner = crate::ct::root_owner(newconf)?;
    for (key, mp) in mps {
        let (plugin, volname) = storages.resolve(&mp.volume)?;
        let new_volid = if full {
            let storage = opts
                .storage
                .clone()
                .unwrap_or_else(|| plugin.id().to_string());
            let size_kib = mp.size.unwrap_or(0) / 1024;
            let volid =
                crate::disks::alloc_disk(storages, newid, &storage, size_kib, owner).await?;
            made.push(volid.clone());
            copy_volume(storages, mp, snap, &volid, owner, warn).await?;
            volid
        } else {
            plugin.activate_volume(&volname, snap).await?;
            let name = plugin.clone_image(&volname, newid, snap).await?;
            let volid = format!("{}:{name}", plugin.id());
            made.push(volid.clone());
            volid
        };
        set_volume(&mut newconf.main, key, &new_volid)?;
        store.write(newid, newconf)?;
    }
    Ok(())
}

/// Copies the files of `mp` (at `snap`) into the volume `target` through two scratch mounts.
async fn copy_volume(
    storages: &Storages,
    mp: &crate::conf::mountpoint::MountPoint,
    snap: Option<&str>,
    target: &str,
    owner: crate::mount::RootOwner,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let runner = storages.runner();
    let scratch = storages.layout().join("/run/vzkit/clone");
    let dir = scratch.join(format!(
        "{}-{}",
        std::process::id(),
        target.replace([':', '/'], "_")
    ));
    let (src_root, dst_root) = (dir.join("src"), dir.join("dst"));
    for d in [&src_root, &dst_root] {
        std::fs::create_dir_all(d).map_err(|e| RuntimeError::io("mkdir", d, e))?;
    }
    let res: Result<()> = async {
        let mut src_mp = crate::conf::mountpoint::MountPoint::new(mp.volume.clone(), "/");
        src_mp.ro = Some(true);
        let from = crate::mount::mount_one(storages, &src_root, &src_mp, snap, owner, warn).await?;
        let dst_mp = crate::conf::mountpoint::MountPoint::new(target.to_string(), "/");
        let to = crate::mount::mount_one(storages, &dst_root, &dst_mp, None, owner, warn).await?;
        let cmd = vzkit_host::command::Cmd::new("cp")
            .args(["-a", "--sparse=always", "--no-target-directory"])
            .arg(from.join("."))
            .arg(&to);
        runner.run(&cmd).await?;
        Ok(())
    }
    .await;
    let mut undo = Ok(0);
    for root in [&dst_root, &src_root] {
        let r = crate::mount::umount_all(runner.as_ref(), root, &[]).await;
        if r.is_err() {
            undo = r;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if undo.is_ok() {
        let dst = [(
            "target".to_string(),
            crate::conf::mountpoint::MountPoint::new(target.to_string(), "/"),
        )];
        crate::mount::deactivate_volumes(storages, &dst, None, warn).await;
    }
    if snap.is_some() && undo.is_ok() {
        // Some backends expose a snapshot through a temporary clone or device.
        let (plugin, volname) = storages.resolve(&mp.volume)?;
        if let Err(e) = plugin.deactivate_volume(&volname, snap).await {
            warn(format!(
                "unable to deactivate '{}' at '{}': {e}",
                mp.volume,
                snap.unwrap_or_default()
            ));
        }
    }
    res?;
    undo.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> CtConfig {
        CtConfig::parse(100, text).unwrap().0
    }

    #[test]
    fn snapshot_names() {
        for ok in ["s1", "before-upgrade", "a_b", "Ab"] {
            check_snapname(ok).unwrap();
        }
        for (bad, msg) in [
            (
                "s",
                "snapname: invalid format - invalid configuration ID 's'",
            ),
            (
                "1a",
                "snapname: invalid format - invalid configuration ID '1a'",
            ),
            (
                "a.b",
                "snapname: invalid format - invalid configuration ID 'a.b'",
            ),
            ("current", "invalid snapshot name 'current'"),
            ("vzdump", "invalid snapshot name 'vzdump'"),
        ] {
            assert_eq!(check_snapname(bad).unwrap_err().to_string(), msg);
        }
        let long = format!("a{}", "b".repeat(40));
        assert_eq!(
            check_snapname(&long).unwrap_err().to_string(),
            "snapname: value may only be 40 characters long"
        );
        check_snapname_format("vzdump").unwrap();
    }

    #[test]
    fn copy_leaves_out_state_keys() {
        let c = conf(
            "#descr\narch: amd64\nlock: backup\nparent: x\nrootfs: a:b\nunused0: a:c\nunused12: a:d\n\
             lxc.cap.drop: sys_admin\n",
        );
        let s = copy_config(&c.main);
        assert_eq!(s.description, None);
        assert_eq!(
            s.options.keys().collect::<Vec<_>>(),
            ["arch", "parent", "rootfs"]
        );
        assert_eq!(s.lxc, c.main.lxc);
    }

    #[test]
    fn feature_needs_every_considered_mount_point() {
        let c = conf("rootfs: a:r\nmp0: a:v,mp=/v,backup=1\nmp1: b:w,mp=/w\nmp2: /host,mp=/bind\n");
        let all = |v: &str| v.starts_with("a:") || v.starts_with("b:");
        // The bind mount point fails the full check; vzdump's check only looks at rootfs
        // and backup=1 volumes.
        assert!(!section_has_feature(&c.main, false, all));
        assert!(section_has_feature(&c.main, true, all));
        assert!(!section_has_feature(&c.main, true, |v| v == "a:r"));
        assert_eq!(
            section_volumes(&c.main, false),
            [
                ("rootfs".to_string(), "a:r".to_string()),
                ("mp0".to_string(), "a:v".to_string()),
                ("mp1".to_string(), "b:w".to_string())
            ]
        );
        assert_eq!(section_volumes(&c.main, true).len(), 2);
    }

    #[test]
    fn tree_with_two_roots_sorted_by_time() {
        let c = conf(
            "parent: sb\nrootfs: a:r\n\n[sa]\n#one\n#two\nrootfs: a:r\nsnaptime: 20\n\n\
             [sb]\nparent: sa\nrootfs: a:r\nsnaptime: 30\n\n[sc]\nparent: gone\nrootfs: a:r\n\
             snaptime: 10\n",
        );
        let list = snapshot_list(&c);
        assert_eq!(list.len(), 4);
        let tree = format_snapshot_tree(&list, &format_utc);
        let lines: Vec<&str> = tree.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "`-> sc{}1970-01-01 00:00:10     no-description",
                " ".repeat(26)
            )
        );
        assert_eq!(
            lines[1],
            format!("`-> sa{}1970-01-01 00:00:20     one", " ".repeat(26))
        );
        assert!(lines[2].starts_with(" `-> sb "), "{tree}");
        assert!(lines[3].starts_with("  `-> current "), "{tree}");
        assert!(lines[3].ends_with(" You are here!"), "{tree}");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn clone_config_renews_macs_and_drops_state() {
        let c = conf(
            "#src\nhostname: a\nlock: disk\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,type=veth\n\
             parent: s\nrootfs: a:r\ntemplate: 1\nunused0: a:x\n",
        );
        let opts = CloneOptions {
            hostname: Some("b".into()),
            ..CloneOptions::default()
        };
        let n = clone_config(&c.main, &opts).unwrap();
        assert_eq!(n.get("hostname"), Some("b"));
        for k in ["lock", "parent", "template", "unused0"] {
            assert_eq!(n.get(k), None, "{k}");
        }
        assert_eq!(n.main.description.as_deref(), Some("src\n"));
        let net = n.get("net0").unwrap();
        assert!(
            net.starts_with("name=eth0,bridge=vmbr0,hwaddr=BC:24:11:"),
            "{net}"
        );
        assert_ne!(net, c.get("net0").unwrap());
    }

    #[test]
    fn utc() {
        assert_eq!(format_utc(1_234_567_890), "2009-02-13 23:31:30");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59");
    }
}
