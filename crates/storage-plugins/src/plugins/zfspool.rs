//! The `zfspool` backend (PVE's `ZFSPoolPlugin`): volumes are ZFS datasets and zvols below
//! the configured `pool` (which may be `pool/dataset`).
//!
//! Volume names are the dataset names below the pool: `subvol-<vmid>-disk-N` (a filesystem
//! dataset, format `subvol`, bind-mounted into containers, size = `refquota`, `none` for size
//! 0), `vm-<vmid>-disk-N` (a zvol, format `raw`, a block device below `/dev/zvol/<pool>/`),
//! `basevol-…`/`base-…` for templates, and `<base>/<name>` for linked clones of a template.
//! Every external command is PVE's `zfs`/`zpool` command line, driven through the command
//! runner and parsed from `-H -p` output by pure functions.
//!
//! Differences between ZFS implementations are detected, never assumed, and cached per
//! plugin instance:
//! - `acltype=posixacl,xattr=sa` are only passed when `zfs get acltype <pool>` knows the
//!   property (OpenZFS does; zfs-fuse 0.7 rejects it with "invalid property 'acltype'").
//! - `zfs list -p` (parsable sizes) is missing in zfs-fuse ("invalid option 'p'"); the same
//!   table is then read through `zfs get -H -p -o name,property,value -d 1 …`.
//! - zvols: zfs-fuse aborts `zfs create -V` with "Function not implemented"; `alloc_image`
//!   for `raw` then fails with [`StorageError::Unsupported`] naming the reason.
//! - `zfs rename` of a mounted dataset fails in zfs-fuse with "dataset is busy"; the dataset
//!   is then unmounted, renamed and mounted again.
//!
//! Snapshot access for containers (vzdump's snapshot mode, `pct mount` of a snapshot):
//! PVE mounts `<pool>/<name>@<snap>` with `mount -t zfs`, which needs OpenZFS's kernel module.
//! vzkit gives the runtime a directory to bind-mount read-only instead: the dataset's
//! `<mountpoint>/.zfs/snapshot/<snap>` when the implementation has a `.zfs` control directory
//! (OpenZFS), otherwise (zfs-fuse has none) a read-only clone `<pool>/.vzsnap.<snap>.<name>`
//! that `activate_volume(vol, Some(snap))` creates and `deactivate_volume`,
//! `volume_snapshot_delete` and `free_image` destroy again. Its name matches none of the
//! volume patterns, so listings and free-name searches ignore it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vzkit_host::command::{Cmd, CommandError, Runner};

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::{
    Feature, FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeInfo, VolumeState,
};
use crate::volid::{self, ParsedVolname};

/// The `zfs` tool.
pub const ZFS: &str = "zfs";
/// The `zpool` tool.
pub const ZPOOL: &str = "zpool";
/// The snapshot `create_base` takes and linked clones start from.
pub const BASE_SNAPSHOT: &str = "__base__";
/// The user property a snapshot keeps its dataset's `refquota` in.
pub const REFQUOTA_PROPERTY: &str = "pve-storage:refquota";
/// Prefix of the read-only clones that give access to snapshots where ZFS has no `.zfs`.
pub const SNAPSHOT_CLONE_PREFIX: &str = ".vzsnap.";

/// Timeout of queries (PVE's `zfs_request` default outside workers).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of changes (create, destroy, rollback, …).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `alloc_image`/`activate_volume` wait for a zvol's device link.
const ZVOL_LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `free_image` tries `zfs destroy` while the dataset is busy.
const DESTROY_TRIES: u32 = 6;

/// PVE's `volume_has_feature` table for ZFSPool (§4.6): every format.
const ZFS_FEATURES: FeatureTable = FeatureTable(&[
    (Feature::Snapshot, VolumeState::Current, None),
    (Feature::Snapshot, VolumeState::Snap, None),
    (Feature::Clone, VolumeState::Base, None),
    (Feature::Template, VolumeState::Current, None),
    (Feature::Copy, VolumeState::Base, None),
    (Feature::Copy, VolumeState::Current, None),
    (Feature::SparseInit, VolumeState::Base, None),
    (Feature::SparseInit, VolumeState::Current, None),
    (Feature::Replicate, VolumeState::Base, None),
    (Feature::Replicate, VolumeState::Current, None),
    (Feature::Rename, VolumeState::Current, None),
]);

/// One dataset or zvol directly below the pool, as `zfs list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZfsVolume {
    /// Dataset name below the pool (`subvol-100-disk-0`).
    pub name: String,
    /// Size in bytes: `volsize` of a zvol, `refquota` of a filesystem (0 for `none`).
    pub size: u64,
    /// `origin` (`<pool>/<base>@__base__`) of a clone.
    pub origin: Option<String>,
    /// `raw` (zvol) or `subvol` (filesystem).
    pub format: &'static str,
    /// Owner from the name.
    pub vmid: u32,
}

fn parse_size(value: &str, what: &str) -> Result<u64> {
    match value {
        "none" | "-" => Ok(0),
        v => v.parse().map_err(|_| {
            StorageError::Failed(format!("unable to parse zfs {what} value '{value}'"))
        }),
    }
}

/// Parses `zfs list -o name,volsize,origin,type,refquota -t volume,filesystem -d1 -Hp <pool>`
/// as PVE's `zfs_parse_zvol_list`: only direct children of `pool` named
/// `(vm|base|subvol|basevol)-<vmid>-…` are volumes.
///
/// # Errors
/// A line without five fields, or a size that is not a number.
pub fn parse_zfs_list(text: &str, pool: &str) -> Result<Vec<ZfsVolume>> {
    let mut res = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let [dataset, volsize, origin, kind, refquota] = f[..] else {
            return Err(StorageError::Failed(format!(
                "unable to parse zfs list output line '{line}'"
            )));
        };
        if kind != "volume" && kind != "filesystem" {
            continue;
        }
        let Some((parent, name)) = dataset.rsplit_once('/') else {
            continue;
        };
        if parent != pool {
            continue;
        }
        let Some(vmid) = volume_owner(name) else {
            continue;
        };
        let (size, format) = if kind == "filesystem" {
            (parse_size(refquota, "refquota")?, "subvol")
        } else {
            (parse_size(volsize, "volsize")?, "raw")
        };
        res.push(ZfsVolume {
            name: name.to_string(),
            size,
            origin: (origin != "-").then(|| origin.to_string()),
            format,
            vmid,
        });
    }
    Ok(res)
}

/// The owner of a dataset named `^(vm|base|subvol|basevol)-(\d+)-(\S+)$`.
fn volume_owner(name: &str) -> Option<u32> {
    let (prefix, rest) = name.split_once('-')?;
    if !matches!(prefix, "vm" | "base" | "subvol" | "basevol") {
        return None;
    }
    let (digits, tail) = rest.split_once('-')?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || tail.is_empty()
        || tail.bytes().any(|b| b.is_ascii_whitespace())
    {
        return None;
    }
    digits.parse().ok()
}

/// Turns `zfs get -H -p -o name,property,value volsize,origin,type,refquota …` output into
/// the line format of `zfs list -o name,volsize,origin,type,refquota -H -p` (for zfs
/// implementations without `zfs list -p`).
///
/// # Errors
/// A line without three fields, or a dataset missing one of the four properties.
pub fn zfs_get_to_list(text: &str) -> Result<String> {
    const PROPS: [&str; 4] = ["volsize", "origin", "type", "refquota"];
    let mut rows: Vec<(String, [Option<String>; 4])> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let [name, prop, value] = f[..] else {
            return Err(StorageError::Failed(format!(
                "unable to parse zfs get output line '{line}'"
            )));
        };
        let Some(idx) = PROPS.iter().position(|p| *p == prop) else {
            continue;
        };
        let pos = match rows.iter().position(|(n, _)| n == name) {
            Some(p) => p,
            None => {
                rows.push((name.to_string(), Default::default()));
                rows.len() - 1
            }
        };
        rows[pos].1[idx] = Some(value.to_string());
    }
    let mut out = String::new();
    for (name, props) in rows {
        let mut fields = vec![name.clone()];
        for (p, v) in PROPS.iter().zip(props) {
            fields.push(v.ok_or_else(|| {
                StorageError::Failed(format!("zfs get reported no '{p}' for '{name}'"))
            })?);
        }
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    Ok(out)
}

/// Parses `zfs get -o value -Hp available,used <pool>` into `(avail, used)`.
///
/// # Errors
/// Output that is not two numbers.
pub fn parse_pool_usage(text: &str) -> Result<(u64, u64)> {
    let vals: Vec<&str> = text.lines().map(str::trim).collect();
    let [avail, used] = vals[..] else {
        return Err(StorageError::Failed(format!(
            "unable to parse zfs pool usage '{}'",
            text.trim()
        )));
    };
    Ok((parse_size(avail, "available")?, parse_size(used, "used")?))
}

/// The snapshot names of `dataset`, in the order listed (`-s creation`: oldest first).
#[must_use]
pub fn parse_snapshot_list(text: &str, dataset: &str) -> Vec<String> {
    let prefix = format!("{dataset}@");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// The name of the read-only clone that gives access to snapshot `snap` of `name`.
#[must_use]
pub fn snapshot_clone_name(name: &str, snap: &str) -> String {
    format!("{SNAPSHOT_CLONE_PREFIX}{snap}.{name}")
}

fn is_busy(e: &CommandError) -> bool {
    e.stderr().contains("dataset is busy")
}

fn is_missing(e: &CommandError) -> bool {
    e.stderr().contains("dataset does not exist")
}

/// Maps a failed zfs command to a typed error.
fn zfs_error(e: CommandError) -> StorageError {
    let stderr = e.stderr();
    if stderr.contains("dataset already exists") {
        StorageError::AlreadyExists(format!("zfs error: {stderr}"))
    } else if is_missing(&e) {
        StorageError::NotFound(format!("zfs error: {stderr}"))
    } else {
        StorageError::Command(e)
    }
}

/// A `zfspool` storage.
#[derive(Debug)]
pub struct ZfsPoolPlugin {
    section: StorageSection,
    pool: String,
    mountpoint: PathBuf,
    runner: Arc<dyn Runner>,
    zvol_link_timeout: Duration,
    busy_retry_delay: Duration,
    /// Whether `acltype`/`xattr=sa` are known properties (probed once).
    acl_properties: OnceLock<bool>,
    /// Whether `zfs list` takes `-p` (learnt on first use).
    list_parsable: OnceLock<bool>,
}

impl ZfsPoolPlugin {
    /// A zfspool plugin for `section` (which must have a `pool`).
    ///
    /// # Errors
    /// "storage definition has no pool" when `pool` is missing.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>) -> Result<Self> {
        let pool = section
            .get("pool")
            .map(|p| p.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| StorageError::Invalid("storage definition has no pool".into()))?;
        let mountpoint = section
            .get("mountpoint")
            .map_or_else(|| PathBuf::from(format!("/{pool}")), PathBuf::from);
        Ok(Self {
            section,
            pool,
            mountpoint,
            runner,
            zvol_link_timeout: ZVOL_LINK_TIMEOUT,
            busy_retry_delay: Duration::from_secs(1),
            acl_properties: OnceLock::new(),
            list_parsable: OnceLock::new(),
        })
    }

    /// Changes how long zvol allocation and activation wait for `/dev/zvol/<pool>/<name>`
    /// (10 s) and the pause between `zfs destroy` tries on a busy dataset (1 s).
    #[must_use]
    pub fn with_timings(mut self, zvol_link_timeout: Duration, busy_retry_delay: Duration) -> Self {
        self.zvol_link_timeout = zvol_link_timeout;
        self.busy_retry_delay = busy_retry_delay;
        self
    }

    /// The pool (or `pool/dataset`) volumes live in.
    #[must_use]
    pub fn pool(&self) -> &str {
        &self.pool
    }

    fn dataset(&self, name: &str) -> String {
        format!("{}/{name}", self.pool)
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    fn zfs<I, S>(args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Cmd::new(ZFS).args(args)
    }

    async fn query(&self, cmd: Cmd) -> Result<String> {
        self.runner
            .run_stdout(&cmd.timeout(QUERY_TIMEOUT))
            .await
            .map_err(zfs_error)
    }

    async fn change(&self, cmd: Cmd) -> std::result::Result<(), CommandError> {
        self.runner
            .run(&cmd.timeout(CHANGE_TIMEOUT))
            .await
            .map(|_| ())
    }

    /// Whether this zfs knows `acltype` (and so `xattr=sa`): `zfs get -H -o value acltype
    /// <pool>` succeeds on OpenZFS and fails with "invalid property" on zfs-fuse.
    ///
    /// # Errors
    /// Any other failure of the probe.
    pub async fn supports_acl_properties(&self) -> Result<bool> {
        if let Some(v) = self.acl_properties.get() {
            return Ok(*v);
        }
        let cmd = Self::zfs(["get", "-H", "-o", "value", "acltype", &self.pool]);
        let supported = match self.runner.run(&cmd.timeout(QUERY_TIMEOUT)).await {
            Ok(_) => true,
            Err(e) if e.stderr().contains("invalid property") => false,
            Err(e) => return Err(zfs_error(e)),
        };
        Ok(*self.acl_properties.get_or_init(|| supported))
    }

    /// The datasets and zvols directly below the pool (PVE's `zfs_list_zvol`).
    ///
    /// # Errors
    /// When zfs fails or prints something unexpected.
    pub async fn zfs_list(&self) -> Result<Vec<ZfsVolume>> {
        if self.list_parsable.get() != Some(&false) {
            let cmd = Self::zfs([
                "list",
                "-o",
                "name,volsize,origin,type,refquota",
                "-t",
                "volume,filesystem",
                "-d1",
                "-Hp",
                &self.pool,
            ]);
            match self.runner.run(&cmd.timeout(QUERY_TIMEOUT)).await {
                Ok(out) => {
                    self.list_parsable.get_or_init(|| true);
                    return parse_zfs_list(&out.stdout_str(), &self.pool);
                }
                Err(e) if e.stderr().contains("invalid option 'p'") => {
                    self.list_parsable.get_or_init(|| false);
                }
                Err(e) => return Err(zfs_error(e)),
            }
        }
        let text = self
            .query(Self::zfs([
                "get",
                "-H",
                "-p",
                "-o",
                "name,property,value",
                "-d",
                "1",
                "volsize,origin,type,refquota",
                &self.pool,
            ]))
            .await?;
        parse_zfs_list(&zfs_get_to_list(&text)?, &self.pool)
    }

    /// One numeric property of a dataset (`zfs get -o value -Hp <prop> <dataset>`); `none`
    /// reads as 0.
    async fn get_size(&self, prop: &str, dataset: &str) -> Result<u64> {
        let out = self
            .query(Self::zfs(["get", "-o", "value", "-Hp", prop, dataset]))
            .await?;
        parse_size(out.trim(), prop)
    }

    async fn dataset_exists(&self, dataset: &str) -> Result<bool> {
        let cmd = Self::zfs(["list", "-H", "-o", "name", dataset]);
        match self.runner.run(&cmd.timeout(QUERY_TIMEOUT)).await {
            Ok(_) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(zfs_error(e)),
        }
    }

    /// `zfs destroy [-r] <dataset>`, retried while the dataset is busy (up to six tries, one
    /// second apart, as PVE). A dataset that does not exist counts as destroyed.
    async fn destroy(&self, dataset: &str, recursive: bool) -> Result<()> {
        let mut args = vec!["destroy"];
        if recursive {
            args.push("-r");
        }
        args.push(dataset);
        let mut tries = 0;
        loop {
            tries += 1;
            match self.change(Self::zfs(&args)).await {
                Ok(()) => return Ok(()),
                Err(e) if is_missing(&e) => return Ok(()),
                Err(e) if is_busy(&e) && tries < DESTROY_TRIES => {
                    tokio::time::sleep(self.busy_retry_delay).await;
                }
                Err(e) => return Err(zfs_error(e)),
            }
        }
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name).join(".zfs").join("snapshot")
    }

    /// Whether snapshots of `name` are reached through `.zfs/snapshot` (OpenZFS) rather than
    /// a read-only clone.
    fn has_snapshot_dir(&self, name: &str) -> bool {
        self.snapshot_dir(name).is_dir()
    }

    /// Destroys the snapshot-access clones of `name` (all of them, or the one of `snap`).
    async fn destroy_snapshot_clones(&self, name: &str, snap: Option<&str>) -> Result<()> {
        let text = self
            .query(Self::zfs([
                "list",
                "-H",
                "-o",
                "name,origin",
                "-t",
                "filesystem",
                "-d1",
                &self.pool,
            ]))
            .await?;
        let origin_prefix = format!("{}@", self.dataset(name));
        for line in text.lines() {
            let Some((clone, origin)) = line.split_once('\t') else {
                continue;
            };
            let Some(clone_name) = clone
                .strip_prefix(&self.pool)
                .and_then(|c| c.strip_prefix('/'))
            else {
                continue;
            };
            let Some(origin_snap) = origin.strip_prefix(&origin_prefix) else {
                continue;
            };
            if clone_name != snapshot_clone_name(name, origin_snap)
                || snap.is_some_and(|s| s != origin_snap)
            {
                continue;
            }
            self.destroy(clone, false).await?;
        }
        Ok(())
    }

    async fn wait_for_zvol_link(&self, name: &str) -> Result<()> {
        let link = PathBuf::from(format!("/dev/zvol/{}", self.dataset(name)));
        let start = std::time::Instant::now();
        loop {
            if link.exists() {
                return Ok(());
            }
            if start.elapsed() >= self.zvol_link_timeout {
                return Err(StorageError::Failed(format!(
                    "timeout: no zvol device link for '{name}' found after {} sec.",
                    self.zvol_link_timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn mount_dataset(&self, dataset: &str) -> Result<()> {
        let mounted = self
            .query(Self::zfs(["get", "-o", "value", "-Hp", "mounted", dataset]))
            .await?;
        if mounted.trim() != "yes" {
            self.change(Self::zfs(["mount", dataset]))
                .await
                .map_err(zfs_error)?;
        }
        Ok(())
    }

    /// `zfs rename`; zfs-fuse refuses to rename a mounted dataset ("dataset is busy"), so
    /// then the dataset is unmounted and the rename retried while it stays busy (as
    /// `destroy`), and the new dataset mounted.
    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        match self.change(Self::zfs(["rename", from, to])).await {
            Ok(()) => return Ok(()),
            Err(e) if is_busy(&e) => {}
            Err(e) => return Err(zfs_error(e)),
        }
        match self.change(Self::zfs(["unmount", from])).await {
            Ok(()) => {}
            Err(e) if e.stderr().ends_with("not currently mounted") => {}
            Err(e) => return Err(zfs_error(e)),
        }
        let mut tries = 1;
        loop {
            tries += 1;
            match self.change(Self::zfs(["rename", from, to])).await {
                Ok(()) => break,
                Err(e) if is_busy(&e) && tries < DESTROY_TRIES => {
                    tokio::time::sleep(self.busy_retry_delay).await;
                }
                Err(e) => {
                    // Best effort: leave the old dataset mounted as it was.
                    let _ = self.change(Self::zfs(["mount", from])).await;
                    return Err(zfs_error(e));
                }
            }
        }
        self.change(Self::zfs(["mount", to]))
            .await
            .map_err(zfs_error)
    }

    /// Snapshot names become part of dataset names: letters, digits, `_` and `-` only
    /// (PVE's snapshot names and `__base__`).
    fn check_snapname(snap: &str) -> Result<()> {
        if snap.is_empty()
            || !snap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(StorageError::Invalid(format!(
                "invalid snapshot name '{snap}'"
            )));
        }
        Ok(())
    }

    fn is_pool_mounted(&self) -> bool {
        let Ok(table) = vzkit_host::mount::mount_table() else {
            return false;
        };
        let child = format!("{}/", self.pool);
        table.iter().any(|m| {
            (m.fstype == "zfs" || m.fstype == "fuse.zfs")
                && (m.source == self.pool || m.source.starts_with(&child))
        })
    }

    async fn pool_imported(&self, pool: &str) -> Result<bool> {
        let out = self
            .runner
            .run(
                &Cmd::new(ZPOOL)
                    .args(["list", "-o", "name", "-H", pool])
                    .timeout(QUERY_TIMEOUT),
            )
            .await;
        match out {
            Ok(o) => Ok(o.stdout_str().lines().any(|l| l.trim() == pool)),
            Err(CommandError::Failed { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait::async_trait]
impl StoragePlugin for ZfsPoolPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "zfspool"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        volid::parse_volname_zfspool(volname).map_err(|e| StorageError::Invalid(e.to_string()))
    }

    fn features(&self) -> FeatureTable {
        ZFS_FEATURES
    }

    async fn activate_storage(&self) -> Result<()> {
        if self.is_pool_mounted() {
            return Ok(());
        }
        let pool = self
            .pool
            .split('/')
            .next()
            .unwrap_or(&self.pool)
            .to_string();
        let fail = |e: String| {
            StorageError::Failed(format!("could not activate storage '{}', {e}", self.id()))
        };
        if !self.pool_imported(&pool).await? {
            let import = Cmd::new(ZPOOL)
                .args(["import", "-d", "/dev/disk/by-id/", "-o", "cachefile=none"])
                .arg(&pool)
                .timeout(CHANGE_TIMEOUT);
            if let Err(e) = self.runner.run(&import).await {
                // Another import may have raced this one.
                if !self.pool_imported(&pool).await? {
                    return Err(fail(e.to_string()));
                }
            }
        }
        self.change(Self::zfs(["mount", "-a"]))
            .await
            .map_err(|e| fail(e.to_string()))
    }

    async fn status(&self) -> Result<StorageStatus> {
        let out = self
            .query(Self::zfs([
                "get",
                "-o",
                "value",
                "-Hp",
                "available,used",
                &self.pool,
            ]))
            .await?;
        let (avail, used) = parse_pool_usage(&out)?;
        Ok(StorageStatus {
            total: avail + used,
            avail,
            used,
            active: true,
        })
    }

    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        let p = self.parse_volname(volname)?;
        if p.format == "subvol" {
            Ok(match snapname {
                None => self.mountpoint.join(&p.name),
                Some(snap) if self.has_snapshot_dir(&p.name) => {
                    self.snapshot_dir(&p.name).join(snap)
                }
                Some(snap) => self.mountpoint.join(snapshot_clone_name(&p.name, snap)),
            })
        } else {
            let mut path = format!("/dev/zvol/{}", self.dataset(&p.name));
            if let Some(snap) = snapname {
                path.push('@');
                path.push_str(snap);
            }
            Ok(PathBuf::from(path))
        }
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        let p = self.parse_volname(volname)?;
        let path = self.path(volname, snapname).await?;
        Ok(if p.format == "subvol" {
            VolumeAccess::Directory(path)
        } else {
            VolumeAccess::BlockDevice(path)
        })
    }

    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        let prefix = match format {
            "raw" => "vm",
            "subvol" => "subvol",
            f => {
                return Err(StorageError::Invalid(format!("unsupported format '{f}'")));
            }
        };
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let existing: Vec<String> =
                    self.zfs_list().await?.into_iter().map(|v| v.name).collect();
                volid::next_vm_diskname(&existing, self.id(), vmid, format, false, true)
                    .map_err(|e| StorageError::Failed(e.to_string()))?
            }
        };
        if !name.starts_with(&format!("{prefix}-{vmid}-")) {
            return Err(StorageError::Invalid(format!(
                "illegal name '{name}' - should be '{prefix}-{vmid}-*'"
            )));
        }
        self.parse_volname(&name)?;
        let dataset = self.dataset(&name);
        if format == "raw" {
            let size = size_kib.div_ceil(1024) * 1024;
            let mut cmd = Self::zfs(["create"]);
            if self.section.flag("sparse") {
                cmd = cmd.arg("-s");
            }
            if let Some(bs) = self.section.get("blocksize") {
                cmd = cmd.args(["-b", bs]);
            }
            cmd = cmd.args(["-V", &format!("{size}k"), &dataset]);
            if let Err(e) = self.change(cmd).await {
                if e.stderr().contains("Function not implemented") {
                    return Err(StorageError::Unsupported(format!(
                        "storage '{}': this zfs implementation cannot create volumes (zvols) - \
                         {e}; use format 'subvol' (containers always get datasets)",
                        self.id()
                    )));
                }
                return Err(zfs_error(e));
            }
            if let Err(e) = self.wait_for_zvol_link(&name).await {
                if let Err(undo) = self.destroy(&dataset, true).await {
                    return Err(StorageError::Failed(format!(
                        "{e}; removing '{dataset}' again failed too: {undo}"
                    )));
                }
                return Err(e);
            }
        } else {
            let mut cmd = Self::zfs(["create"]);
            if self.supports_acl_properties().await? {
                cmd = cmd.args(["-o", "acltype=posixacl", "-o", "xattr=sa"]);
            }
            let quota = if size_kib == 0 {
                "none".to_string()
            } else {
                format!("{size_kib}k")
            };
            cmd = cmd.args(["-o", &format!("refquota={quota}"), &dataset]);
            self.change(cmd).await.map_err(zfs_error)?;
        }
        Ok(name)
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let p = self.parse_volname(volname)?;
        if p.format == "subvol" {
            self.destroy_snapshot_clones(&p.name, None).await?;
        }
        self.destroy(&self.dataset(&p.name), true).await
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        let origin_prefix = format!("{}/", self.pool);
        for v in self.zfs_list().await? {
            if vmid.is_some_and(|id| id != v.vmid) {
                continue;
            }
            let parent = v
                .origin
                .as_deref()
                .map(|o| o.strip_prefix(&origin_prefix).unwrap_or(o).to_string());
            let volname = match parent
                .as_deref()
                .and_then(|p| p.strip_suffix(&format!("@{BASE_SNAPSHOT}")))
            {
                Some(base) => format!("{base}/{}", v.name),
                None => v.name.clone(),
            };
            let content = if v.format == "subvol" {
                "rootdir"
            } else {
                "images"
            };
            let mut info = VolumeInfo::new(self.volid(&volname), content, v.format, v.size);
            info.vmid = Some(v.vmid);
            info.parent = parent;
            res.push(info);
        }
        Ok(res)
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let dataset = self.dataset(&p.name);
        match (p.format.as_str(), snapname) {
            ("subvol", Some(snap)) => {
                Self::check_snapname(snap)?;
                if self.has_snapshot_dir(&p.name) {
                    if !self.snapshot_dir(&p.name).join(snap).is_dir() {
                        return Err(StorageError::NotFound(format!(
                            "snapshot '{snap}' of volume '{}' does not exist",
                            self.volid(volname)
                        )));
                    }
                    return Ok(());
                }
                let clone = self.dataset(&snapshot_clone_name(&p.name, snap));
                if self.dataset_exists(&clone).await? {
                    return self.mount_dataset(&clone).await;
                }
                self.change(Self::zfs([
                    "clone",
                    "-o",
                    "readonly=on",
                    &format!("{dataset}@{snap}"),
                    &clone,
                ]))
                .await
                .map_err(zfs_error)
            }
            (_, Some(_)) => Ok(()),
            ("subvol", None) => self.mount_dataset(&dataset).await,
            (_, None) => self.wait_for_zvol_link(&p.name).await,
        }
    }

    async fn deactivate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let p = self.parse_volname(volname)?;
        match snapname {
            Some(snap) if p.format == "subvol" && !self.has_snapshot_dir(&p.name) => {
                self.destroy(&self.dataset(&snapshot_clone_name(&p.name, snap)), false)
                    .await
            }
            _ => Ok(()),
        }
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let p = self.parse_volname(volname)?;
        let prop = if p.format == "subvol" {
            "refquota"
        } else {
            "volsize"
        };
        let out = self
            .query(Self::zfs([
                "get",
                "-o",
                "value",
                "-Hp",
                &format!("{prop},usedbydataset"),
                &self.dataset(&p.name),
            ]))
            .await?;
        let first = out.lines().next().unwrap_or_default().trim();
        parse_size(first, prop)
    }

    async fn volume_resize(&self, volname: &str, size_bytes: u64) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let mut new_kib = size_bytes / 1024;
        let prop = if p.format == "subvol" {
            "refquota"
        } else {
            new_kib = new_kib.div_ceil(1024) * 1024;
            "volsize"
        };
        self.change(Self::zfs([
            "set",
            &format!("{prop}={new_kib}k"),
            &self.dataset(&p.name),
        ]))
        .await
        .map_err(zfs_error)
    }

    async fn volume_snapshot(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        let dataset = self.dataset(&p.name);
        self.change(Self::zfs(["snapshot", &format!("{dataset}@{snap}")]))
            .await
            .map_err(zfs_error)?;
        if p.format == "subvol" {
            let refquota = self
                .query(Self::zfs([
                    "get", "-o", "value", "-Hp", "refquota", &dataset,
                ]))
                .await?;
            self.change(Self::zfs([
                "set",
                &format!("{REFQUOTA_PROPERTY}={}", refquota.trim()),
                &format!("{dataset}@{snap}"),
            ]))
            .await
            .map_err(zfs_error)?;
        }
        Ok(())
    }

    async fn volume_snapshot_list(&self, volname: &str) -> Result<Vec<String>> {
        let p = self.parse_volname(volname)?;
        let dataset = self.dataset(&p.name);
        let out = self
            .query(Self::zfs([
                "list", "-H", "-r", "-t", "snapshot", "-o", "name", "-s", "creation", &dataset,
            ]))
            .await?;
        Ok(parse_snapshot_list(&out, &dataset))
    }

    async fn volume_rollback_is_possible(&self, volname: &str, snap: &str) -> Result<Vec<String>> {
        let snapshots = self.volume_snapshot_list(volname).await?;
        let volid = self.volid(volname);
        let Some(pos) = snapshots.iter().position(|s| s == snap) else {
            return Err(StorageError::NotFound(format!(
                "can't rollback, snapshot '{snap}' does not exist on '{volid}'"
            )));
        };
        if pos + 1 < snapshots.len() {
            return Err(StorageError::Failed(format!(
                "can't rollback, '{snap}' is not most recent snapshot on '{volid}'"
            )));
        }
        Ok(Vec::new())
    }

    async fn volume_snapshot_rollback(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        self.volume_rollback_is_possible(volname, snap).await?;
        let p = self.parse_volname(volname)?;
        let dataset = self.dataset(&p.name);
        let snapshot = format!("{dataset}@{snap}");
        self.change(Self::zfs(["rollback", &snapshot]))
            .await
            .map_err(zfs_error)?;
        if p.format != "subvol" {
            return Ok(());
        }
        let saved = self
            .query(Self::zfs([
                "get",
                "-o",
                "value",
                "-Hp",
                REFQUOTA_PROPERTY,
                &snapshot,
            ]))
            .await?;
        let saved = saved.trim();
        if let Ok(v) = saved.parse::<u64>() {
            let value = if v == 0 {
                "none".to_string()
            } else {
                v.to_string()
            };
            self.change(Self::zfs(["set", &format!("refquota={value}"), &dataset]))
                .await
                .map_err(zfs_error)?;
        } else if saved != "-" {
            return Err(StorageError::Failed(format!(
                "rolled back '{snapshot}', but its saved refquota '{saved}' is not a number"
            )));
        }
        // Rolled-back datasets are unmounted so that stale caches go; activate_volume
        // mounts them again (PVE does the same, OpenZFS issue 10931).
        match self.change(Self::zfs(["unmount", &dataset])).await {
            Ok(()) => Ok(()),
            Err(e) if e.stderr().ends_with("not currently mounted") => Ok(()),
            Err(e) => Err(zfs_error(e)),
        }
    }

    async fn volume_snapshot_delete(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        if p.format == "subvol" {
            self.destroy_snapshot_clones(&p.name, Some(snap)).await?;
        }
        let snapshot = format!("{}@{snap}", self.dataset(&p.name));
        self.change(Self::zfs(["destroy", &snapshot]))
            .await
            .map_err(zfs_error)
    }

    /// `acl=1`/`acl=0` of a mount point: `zfs set acltype=posixacl|noacl <dataset>` (PVE's
    /// `mountpoint_mount`). Snapshots are left alone (immutable). Where the implementation
    /// has no `acltype` (zfs-fuse, which has no POSIX ACLs at all), `acl=0` holds already and
    /// `acl=1` is refused.
    async fn set_volume_acl(
        &self,
        volname: &str,
        snapname: Option<&str>,
        enabled: bool,
    ) -> Result<()> {
        let p = self.parse_volname(volname)?;
        if snapname.is_some() || p.format != "subvol" {
            return Ok(());
        }
        if !self.supports_acl_properties().await? {
            if enabled {
                return Err(StorageError::Unsupported(format!(
                    "storage '{}': this zfs implementation has no 'acltype' property - \
                     cannot enable POSIX ACLs on '{}'",
                    self.id(),
                    self.volid(volname)
                )));
            }
            return Ok(());
        }
        let acltype = if enabled { "posixacl" } else { "noacl" };
        self.change(Self::zfs([
            "set",
            &format!("acltype={acltype}"),
            &self.dataset(&p.name),
        ]))
        .await
        .map_err(zfs_error)
    }

    async fn clone_image(&self, volname: &str, vmid: u32, snap: Option<&str>) -> Result<String> {
        let snap = snap.unwrap_or(BASE_SNAPSHOT);
        let p = self.parse_volname(volname)?;
        if !p.is_base {
            return Err(StorageError::Invalid(
                "clone_image only works on base images".into(),
            ));
        }
        let existing: Vec<String> = self.zfs_list().await?.into_iter().map(|v| v.name).collect();
        let name = volid::next_vm_diskname(&existing, self.id(), vmid, &p.format, false, true)
            .map_err(|e| StorageError::Failed(e.to_string()))?;
        let base = self.dataset(&p.name);
        let origin = format!("{base}@{snap}");
        let target = self.dataset(&name);
        let mut cmd = Self::zfs(["clone", &origin, &target]);
        if p.format == "subvol" {
            let size = self.get_size("refquota", &base).await?;
            let quota = if size == 0 {
                "none".to_string()
            } else {
                size.to_string()
            };
            cmd = cmd.args(["-o", &format!("refquota={quota}")]);
        }
        self.change(cmd).await.map_err(zfs_error)?;
        Ok(format!("{}/{name}", p.name))
    }

    async fn create_base(&self, volname: &str) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if p.is_base {
            return Err(StorageError::Invalid(
                "create_base not possible with base image".into(),
            ));
        }
        let newname = if let Some(rest) = p.name.strip_prefix("subvol-") {
            format!("basevol-{rest}")
        } else if let Some(rest) = p.name.strip_prefix("vm-") {
            format!("base-{rest}")
        } else {
            p.name.clone()
        };
        let newvolname = match &p.basename {
            Some(b) => format!("{b}/{newname}"),
            None => newname.clone(),
        };
        self.rename(&self.dataset(&p.name), &self.dataset(&newname))
            .await?;
        self.volume_snapshot(&newname, BASE_SNAPSHOT).await?;
        Ok(newvolname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use std::path::Path;
    use vzkit_host::command::{Output, RecordingRunner};

    fn plugin(extra: &str) -> (ZfsPoolPlugin, Arc<RecordingRunner>) {
        let text = format!("zfspool: tank\n\tpool rpool/data\n\tcontent rootdir,images\n{extra}");
        let (cfg, warnings) = StorageConfig::parse(&text, "storage.cfg");
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner = Arc::new(RecordingRunner::new());
        let p = ZfsPoolPlugin::new(cfg.get("tank").unwrap().clone(), runner.clone()).unwrap();
        (p.with_timings(Duration::ZERO, Duration::ZERO), runner)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// `zfs list … -Hp` output as OpenZFS prints it.
    const LIST: &str = "rpool/data\t-\t-\tfilesystem\t0\n\
        rpool/data/subvol-100-disk-0\t-\t-\tfilesystem\t8589934592\n\
        rpool/data/subvol-100-disk-1\t-\t-\tfilesystem\tnone\n\
        rpool/data/vm-101-disk-0\t4294967296\t-\tvolume\t-\n\
        rpool/data/basevol-102-disk-0\t-\t-\tfilesystem\t1073741824\n\
        rpool/data/subvol-103-disk-0\t-\trpool/data/basevol-102-disk-0@__base__\tfilesystem\t1073741824\n\
        rpool/data/.vzsnap.vzdump.subvol-100-disk-0\t-\trpool/data/subvol-100-disk-0@vzdump\tfilesystem\t0\n\
        rpool/data/nested/subvol-104-disk-0\t-\t-\tfilesystem\t0\n\
        rpool/data/other\t-\t-\tfilesystem\t0\n";

    #[test]
    fn list_parsing_follows_pve() {
        let vols = parse_zfs_list(LIST, "rpool/data").unwrap();
        let names: Vec<(&str, u64, &str, u32)> = vols
            .iter()
            .map(|v| (v.name.as_str(), v.size, v.format, v.vmid))
            .collect();
        assert_eq!(
            names,
            [
                ("subvol-100-disk-0", 8 << 30, "subvol", 100),
                ("subvol-100-disk-1", 0, "subvol", 100),
                ("vm-101-disk-0", 4 << 30, "raw", 101),
                ("basevol-102-disk-0", 1 << 30, "subvol", 102),
                ("subvol-103-disk-0", 1 << 30, "subvol", 103),
            ]
        );
        assert_eq!(
            vols[4].origin.as_deref(),
            Some("rpool/data/basevol-102-disk-0@__base__")
        );
        assert!(parse_zfs_list("a\tb\n", "rpool").is_err());
        assert!(parse_zfs_list("rpool/vm-1-disk-0\tx\t-\tvolume\t-\n", "rpool").is_err());
    }

    #[test]
    fn zfs_get_rows_become_list_lines() {
        // Verbatim zfs-fuse 0.7 output of
        // `zfs get -H -p -o name,property,value -d 1 volsize,origin,type,refquota ztest`.
        let text = "ztest\tvolsize\t-\nztest\torigin\t-\nztest\ttype\tfilesystem\n\
                    ztest\trefquota\t0\n\
                    ztest/subvol-100-disk-0\tvolsize\t-\nztest/subvol-100-disk-0\torigin\t-\n\
                    ztest/subvol-100-disk-0\ttype\tfilesystem\n\
                    ztest/subvol-100-disk-0\trefquota\t1073741824\n";
        let list = zfs_get_to_list(text).unwrap();
        assert_eq!(
            list,
            "ztest\t-\t-\tfilesystem\t0\nztest/subvol-100-disk-0\t-\t-\tfilesystem\t1073741824\n"
        );
        assert!(zfs_get_to_list("ztest\ttype\tfilesystem\n").is_err());
    }

    #[test]
    fn usage_and_snapshots_parse() {
        assert_eq!(
            parse_pool_usage("494555136\n372736\n").unwrap(),
            (494_555_136, 372_736)
        );
        assert!(parse_pool_usage("1\n").is_err());
        let text = "p/subvol-1-disk-0@a\np/subvol-1-disk-0@b\np/subvol-1-disk-00@c\n";
        assert_eq!(parse_snapshot_list(text, "p/subvol-1-disk-0"), ["a", "b"]);
    }

    #[test]
    fn listing_builds_linked_clone_volids() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok(LIST));
        let vols = block_on(p.list_images(None)).unwrap();
        let ids: Vec<&str> = vols.iter().map(|v| v.volid.as_str()).collect();
        assert_eq!(
            ids,
            [
                "tank:subvol-100-disk-0",
                "tank:subvol-100-disk-1",
                "tank:vm-101-disk-0",
                "tank:basevol-102-disk-0",
                "tank:basevol-102-disk-0/subvol-103-disk-0",
            ]
        );
        assert_eq!(vols[2].content, "images");
        assert_eq!(vols[0].content, "rootdir");
        assert_eq!(
            vols[4].parent.as_deref(),
            Some("basevol-102-disk-0@__base__")
        );
        assert_eq!(
            r.call_lines(),
            [
                "zfs list -o name,volsize,origin,type,refquota -t volume,filesystem -d1 -Hp rpool/data"
            ]
        );
        r.push_reply(Output::ok(LIST));
        assert_eq!(block_on(p.list_images(Some(101))).unwrap().len(), 1);
    }

    #[test]
    fn list_falls_back_to_zfs_get_without_list_p() {
        let (p, r) = plugin("");
        r.push_reply(Output::failed(2, "invalid option 'p'\nusage: ..."));
        r.push_reply(Output::ok(
            "rpool/data/subvol-100-disk-0\tvolsize\t-\nrpool/data/subvol-100-disk-0\torigin\t-\n\
             rpool/data/subvol-100-disk-0\ttype\tfilesystem\n\
             rpool/data/subvol-100-disk-0\trefquota\t0\n",
        ));
        r.push_reply(Output::ok(""));
        let vols = block_on(p.list_images(None)).unwrap();
        assert_eq!(vols.len(), 1);
        block_on(p.list_images(None)).unwrap();
        let get =
            "zfs get -H -p -o name,property,value -d 1 volsize,origin,type,refquota rpool/data";
        // The failed probe is not repeated.
        assert_eq!(
            r.call_lines(),
            [
                "zfs list -o name,volsize,origin,type,refquota -t volume,filesystem -d1 -Hp rpool/data",
                get,
                get
            ]
        );
    }

    #[test]
    fn subvol_alloc_with_acl_properties_where_supported() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok(LIST));
        let name = block_on(p.alloc_image(100, "subvol", None, 8 << 20)).unwrap();
        assert_eq!(name, "subvol-100-disk-2");
        assert_eq!(
            r.call_lines()[1..],
            [
                "zfs get -H -o value acltype rpool/data",
                "zfs create -o acltype=posixacl -o xattr=sa -o refquota=8388608k rpool/data/subvol-100-disk-2",
            ]
        );
    }

    #[test]
    fn subvol_alloc_without_acl_properties_and_unlimited() {
        let (p, r) = plugin("");
        r.push_reply(Output::failed(
            2,
            "bad property list: invalid property 'acltype'\nusage: ...",
        ));
        let name = block_on(p.alloc_image(100, "subvol", Some("subvol-100-disk-7"), 0)).unwrap();
        assert_eq!(name, "subvol-100-disk-7");
        block_on(p.alloc_image(100, "subvol", Some("subvol-100-disk-8"), 1024)).unwrap();
        // The probe ran once.
        assert_eq!(
            r.call_lines(),
            [
                "zfs get -H -o value acltype rpool/data",
                "zfs create -o refquota=none rpool/data/subvol-100-disk-7",
                "zfs create -o refquota=1024k rpool/data/subvol-100-disk-8",
            ]
        );
    }

    #[test]
    fn alloc_refuses_wrong_names_and_formats() {
        let (p, r) = plugin("");
        let err = block_on(p.alloc_image(100, "subvol", Some("vm-100-disk-0"), 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-100-disk-0' - should be 'subvol-100-*'"
        );
        let err = block_on(p.alloc_image(100, "raw", Some("vm-101-disk-0"), 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-101-disk-0' - should be 'vm-100-*'"
        );
        let err = block_on(p.alloc_image(100, "qcow2", None, 0)).unwrap_err();
        assert_eq!(err.to_string(), "unsupported format 'qcow2'");
        assert!(r.calls().is_empty());
        r.push_reply(Output::ok(""));
        r.push_reply(Output::failed(
            1,
            "cannot create 'rpool/data/subvol-100-disk-0': dataset already exists",
        ));
        let err = block_on(p.alloc_image(100, "subvol", Some("subvol-100-disk-0"), 0)).unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
    }

    #[test]
    fn zvol_alloc_rounds_to_mib_and_uses_sparse_and_blocksize() {
        let (p, r) = plugin("\tsparse 1\n\tblocksize 16k\n");
        let err = block_on(p.alloc_image(100, "raw", Some("vm-100-disk-0"), 1025)).unwrap_err();
        // No /dev/zvol link appears for a recorded command: the volume is removed again.
        assert!(
            err.to_string()
                .starts_with("timeout: no zvol device link for 'vm-100-disk-0' found after 0 sec."),
            "{err}"
        );
        assert_eq!(
            r.call_lines(),
            [
                "zfs create -s -b 16k -V 2048k rpool/data/vm-100-disk-0",
                "zfs destroy -r rpool/data/vm-100-disk-0",
            ]
        );
    }

    #[test]
    fn zvols_unsupported_by_the_implementation_are_reported() {
        let (p, r) = plugin("");
        r.push_reply(Output {
            exit: vzkit_host::command::Exit::Signal(6),
            stdout: Vec::new(),
            stderr: b"internal error: Function not implemented\n".to_vec(),
        });
        let err = block_on(p.alloc_image(100, "raw", Some("vm-100-disk-0"), 1024)).unwrap_err();
        assert!(matches!(err, StorageError::Unsupported(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("this zfs implementation cannot create volumes (zvols)"),
            "{err}"
        );
    }

    #[test]
    fn free_retries_busy_and_ignores_missing() {
        let (p, r) = plugin("");
        block_on(async {
            // clone listing, then destroy: busy, busy, ok
            r.push_reply(Output::ok(
                "rpool/data\t-\nrpool/data/.vzsnap.s1.subvol-100-disk-0\trpool/data/subvol-100-disk-0@s1\n\
                 rpool/data/.vzsnap.s1.subvol-100-disk-01\trpool/data/subvol-100-disk-01@s1\n",
            ));
            r.push_reply(Output::ok(""));
            r.push_reply(Output::failed(1, "cannot destroy: dataset is busy"));
            r.push_reply(Output::failed(1, "cannot destroy: dataset is busy"));
            p.free_image("subvol-100-disk-0").await.unwrap();
        });
        assert_eq!(
            r.call_lines(),
            [
                "zfs list -H -o name,origin -t filesystem -d1 rpool/data",
                "zfs destroy rpool/data/.vzsnap.s1.subvol-100-disk-0",
                "zfs destroy -r rpool/data/subvol-100-disk-0",
                "zfs destroy -r rpool/data/subvol-100-disk-0",
                "zfs destroy -r rpool/data/subvol-100-disk-0",
            ]
        );
        let (p, r) = plugin("");
        r.push_reply(Output::failed(
            1,
            "cannot open 'rpool/data/vm-100-disk-0': dataset does not exist",
        ));
        block_on(p.free_image("vm-100-disk-0")).unwrap();
        let (p, r) = plugin("");
        block_on(async {
            for _ in 0..DESTROY_TRIES {
                r.push_reply(Output::failed(1, "cannot destroy: dataset is busy"));
            }
            let err = p.free_image("vm-100-disk-0").await.unwrap_err();
            assert!(err.to_string().contains("dataset is busy"), "{err}");
        });
        assert_eq!(r.calls().len(), DESTROY_TRIES as usize);
    }

    #[test]
    fn status_and_size_and_resize() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok("1000\n24\n"));
        let st = block_on(p.status()).unwrap();
        assert_eq!((st.total, st.avail, st.used), (1024, 1000, 24));
        r.push_reply(Output::ok("8589934592\n12345\n"));
        assert_eq!(
            block_on(p.volume_size_info("subvol-100-disk-0")).unwrap(),
            8 << 30
        );
        r.push_reply(Output::ok("none\n12345\n"));
        assert_eq!(
            block_on(p.volume_size_info("subvol-100-disk-1")).unwrap(),
            0
        );
        r.push_reply(Output::ok("4294967296\n0\n"));
        assert_eq!(
            block_on(p.volume_size_info("vm-100-disk-2")).unwrap(),
            4 << 30
        );
        block_on(p.volume_resize("subvol-100-disk-0", (9 << 30) + 1000)).unwrap();
        block_on(p.volume_resize("vm-100-disk-2", (4 << 30) + 1024)).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zfs get -o value -Hp available,used rpool/data",
                "zfs get -o value -Hp refquota,usedbydataset rpool/data/subvol-100-disk-0",
                "zfs get -o value -Hp refquota,usedbydataset rpool/data/subvol-100-disk-1",
                "zfs get -o value -Hp volsize,usedbydataset rpool/data/vm-100-disk-2",
                "zfs set refquota=9437184k rpool/data/subvol-100-disk-0",
                "zfs set volsize=4195328k rpool/data/vm-100-disk-2",
            ]
        );
    }

    #[test]
    fn snapshot_saves_refquota() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("8589934592\n"));
        block_on(p.volume_snapshot("subvol-100-disk-0", "vzdump")).unwrap();
        block_on(p.volume_snapshot("vm-100-disk-1", "vzdump")).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zfs snapshot rpool/data/subvol-100-disk-0@vzdump",
                "zfs get -o value -Hp refquota rpool/data/subvol-100-disk-0",
                "zfs set pve-storage:refquota=8589934592 rpool/data/subvol-100-disk-0@vzdump",
                "zfs snapshot rpool/data/vm-100-disk-1@vzdump",
            ]
        );
        let err = block_on(p.volume_snapshot("subvol-100-disk-0", "a@b")).unwrap_err();
        assert_eq!(err.to_string(), "invalid snapshot name 'a@b'");
    }

    #[test]
    fn rollback_only_to_the_newest_snapshot() {
        let (p, r) = plugin("");
        let snaps = "rpool/data/subvol-100-disk-0@a\nrpool/data/subvol-100-disk-0@b\n";
        r.push_reply(Output::ok(snaps));
        let err = block_on(p.volume_snapshot_rollback("subvol-100-disk-0", "a")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "can't rollback, 'a' is not most recent snapshot on 'tank:subvol-100-disk-0'"
        );
        r.push_reply(Output::ok(snaps));
        let err = block_on(p.volume_rollback_is_possible("subvol-100-disk-0", "c")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "can't rollback, snapshot 'c' does not exist on 'tank:subvol-100-disk-0'"
        );
        let calls_before = r.calls().len();
        r.push_reply(Output::ok(snaps));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("1073741824\n"));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::failed(
            1,
            "cannot unmount 'rpool/data/subvol-100-disk-0': not currently mounted",
        ));
        block_on(p.volume_snapshot_rollback("subvol-100-disk-0", "b")).unwrap();
        assert_eq!(
            r.call_lines()[calls_before..],
            [
                "zfs list -H -r -t snapshot -o name -s creation rpool/data/subvol-100-disk-0",
                "zfs rollback rpool/data/subvol-100-disk-0@b",
                "zfs get -o value -Hp pve-storage:refquota rpool/data/subvol-100-disk-0@b",
                "zfs set refquota=1073741824 rpool/data/subvol-100-disk-0",
                "zfs unmount rpool/data/subvol-100-disk-0",
            ]
        );
    }

    #[test]
    fn rollback_restores_unlimited_and_skips_unset_refquota() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok("rpool/data/subvol-100-disk-0@a\n"));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("0\n"));
        block_on(p.volume_snapshot_rollback("subvol-100-disk-0", "a")).unwrap();
        assert_eq!(
            r.call_lines()[3],
            "zfs set refquota=none rpool/data/subvol-100-disk-0"
        );
        let (p, r) = plugin("");
        r.push_reply(Output::ok("rpool/data/subvol-100-disk-0@a\n"));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("-\n"));
        block_on(p.volume_snapshot_rollback("subvol-100-disk-0", "a")).unwrap();
        assert_eq!(
            r.call_lines()[3],
            "zfs unmount rpool/data/subvol-100-disk-0"
        );
    }

    #[test]
    fn snapshot_delete_and_snapshot_access_clones() {
        let (p, r) = plugin("\tmountpoint /nonexistent/tank\n");
        assert_eq!(
            block_on(p.path("subvol-100-disk-0", Some("vzdump"))).unwrap(),
            Path::new("/nonexistent/tank/.vzsnap.vzdump.subvol-100-disk-0")
        );
        assert_eq!(
            block_on(p.path("subvol-100-disk-0", None)).unwrap(),
            Path::new("/nonexistent/tank/subvol-100-disk-0")
        );
        r.push_reply(Output::failed(
            1,
            "cannot open 'rpool/data/.vzsnap.vzdump.subvol-100-disk-0': dataset does not exist",
        ));
        block_on(p.activate_volume("subvol-100-disk-0", Some("vzdump"))).unwrap();
        block_on(p.deactivate_volume("subvol-100-disk-0", Some("vzdump"))).unwrap();
        r.push_reply(Output::ok(
            "rpool/data/.vzsnap.vzdump.subvol-100-disk-0\trpool/data/subvol-100-disk-0@vzdump\n",
        ));
        block_on(p.volume_snapshot_delete("subvol-100-disk-0", "vzdump")).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zfs list -H -o name rpool/data/.vzsnap.vzdump.subvol-100-disk-0",
                "zfs clone -o readonly=on rpool/data/subvol-100-disk-0@vzdump rpool/data/.vzsnap.vzdump.subvol-100-disk-0",
                "zfs destroy rpool/data/.vzsnap.vzdump.subvol-100-disk-0",
                "zfs list -H -o name,origin -t filesystem -d1 rpool/data",
                "zfs destroy rpool/data/.vzsnap.vzdump.subvol-100-disk-0",
                "zfs destroy rpool/data/subvol-100-disk-0@vzdump",
            ]
        );
    }

    #[test]
    fn paths_and_access() {
        let (p, _) = plugin("");
        assert_eq!(
            block_on(p.path("vm-100-disk-0", Some("s1"))).unwrap(),
            Path::new("/dev/zvol/rpool/data/vm-100-disk-0@s1")
        );
        assert_eq!(
            block_on(p.access("basevol-100-disk-0/subvol-101-disk-0", None)).unwrap(),
            VolumeAccess::Directory("/rpool/data/subvol-101-disk-0".into())
        );
        assert_eq!(
            block_on(p.access("vm-100-disk-0", None)).unwrap(),
            VolumeAccess::BlockDevice("/dev/zvol/rpool/data/vm-100-disk-0".into())
        );
        assert_eq!(
            p.parse_volname("foo").unwrap_err().to_string(),
            "unable to parse zfs volume name 'foo'"
        );
    }

    #[test]
    fn create_base_and_linked_clone() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("1073741824\n"));
        let base = block_on(p.create_base("subvol-100-disk-0")).unwrap();
        assert_eq!(base, "basevol-100-disk-0");
        r.push_reply(Output::ok(
            "rpool/data/basevol-100-disk-0\t-\t-\tfilesystem\t1073741824\n",
        ));
        r.push_reply(Output::ok("1073741824\n"));
        let clone = block_on(p.clone_image(&base, 101, None)).unwrap();
        assert_eq!(clone, "basevol-100-disk-0/subvol-101-disk-0");
        r.push_reply(Output::ok(""));
        let zclone = block_on(p.clone_image("base-100-disk-1", 101, Some("s1"))).unwrap();
        assert_eq!(zclone, "base-100-disk-1/vm-101-disk-0");
        assert_eq!(
            r.call_lines(),
            [
                "zfs rename rpool/data/subvol-100-disk-0 rpool/data/basevol-100-disk-0",
                "zfs snapshot rpool/data/basevol-100-disk-0@__base__",
                "zfs get -o value -Hp refquota rpool/data/basevol-100-disk-0",
                "zfs set pve-storage:refquota=1073741824 rpool/data/basevol-100-disk-0@__base__",
                "zfs list -o name,volsize,origin,type,refquota -t volume,filesystem -d1 -Hp rpool/data",
                "zfs get -o value -Hp refquota rpool/data/basevol-100-disk-0",
                "zfs clone rpool/data/basevol-100-disk-0@__base__ rpool/data/subvol-101-disk-0 -o refquota=1073741824",
                "zfs list -o name,volsize,origin,type,refquota -t volume,filesystem -d1 -Hp rpool/data",
                "zfs clone rpool/data/base-100-disk-1@s1 rpool/data/vm-101-disk-0",
            ]
        );
        let err = block_on(p.clone_image("subvol-100-disk-0", 101, None)).unwrap_err();
        assert_eq!(err.to_string(), "clone_image only works on base images");
        let err = block_on(p.create_base("basevol-100-disk-0")).unwrap_err();
        assert_eq!(err.to_string(), "create_base not possible with base image");
    }

    #[test]
    fn busy_rename_unmounts_first() {
        let (p, r) = plugin("");
        let busy = "cannot rename 'rpool/data/vm-100-disk-0': dataset is busy";
        r.push_reply(Output::failed(1, busy));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::failed(1, busy));
        block_on(p.create_base("vm-100-disk-0")).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zfs rename rpool/data/vm-100-disk-0 rpool/data/base-100-disk-0",
                "zfs unmount rpool/data/vm-100-disk-0",
                "zfs rename rpool/data/vm-100-disk-0 rpool/data/base-100-disk-0",
                "zfs rename rpool/data/vm-100-disk-0 rpool/data/base-100-disk-0",
                "zfs mount rpool/data/base-100-disk-0",
                "zfs snapshot rpool/data/base-100-disk-0@__base__",
            ]
        );
    }

    #[test]
    fn activate_imports_and_mounts() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok(""));
        block_on(p.activate_storage()).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zpool list -o name -H rpool",
                "zpool import -d /dev/disk/by-id/ -o cachefile=none rpool",
                "zfs mount -a",
            ]
        );
        let (p, r) = plugin("");
        r.push_reply(Output::ok("rpool\n"));
        block_on(p.activate_storage()).unwrap();
        assert_eq!(
            r.call_lines(),
            ["zpool list -o name -H rpool", "zfs mount -a"]
        );
        let (p, r) = plugin("");
        r.push_reply(Output::failed(1, "cannot open 'rpool': no such pool"));
        r.push_reply(Output::failed(
            1,
            "cannot import 'rpool': no such pool available",
        ));
        r.push_reply(Output::failed(1, "cannot open 'rpool': no such pool"));
        let err = block_on(p.activate_storage()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("could not activate storage 'tank', command 'zpool import"),
            "{err}"
        );
    }

    #[test]
    fn activate_volume_mounts_unmounted_datasets() {
        let (p, r) = plugin("");
        r.push_reply(Output::ok("no\n"));
        block_on(p.activate_volume("subvol-100-disk-0", None)).unwrap();
        r.push_reply(Output::ok("yes\n"));
        block_on(p.activate_volume("subvol-100-disk-0", None)).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zfs get -o value -Hp mounted rpool/data/subvol-100-disk-0",
                "zfs mount rpool/data/subvol-100-disk-0",
                "zfs get -o value -Hp mounted rpool/data/subvol-100-disk-0",
            ]
        );
    }

    #[test]
    fn acl_option_sets_acltype_where_known() {
        let (p, r) = plugin("");
        block_on(p.set_volume_acl("subvol-100-disk-0", None, true)).unwrap();
        block_on(p.set_volume_acl("subvol-100-disk-0", None, false)).unwrap();
        block_on(p.set_volume_acl("subvol-100-disk-0", Some("s"), true)).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "zfs get -H -o value acltype rpool/data",
                "zfs set acltype=posixacl rpool/data/subvol-100-disk-0",
                "zfs set acltype=noacl rpool/data/subvol-100-disk-0",
            ]
        );
        let (p, r) = plugin("");
        r.push_reply(Output::failed(
            2,
            "bad property list: invalid property 'acltype'",
        ));
        block_on(p.set_volume_acl("subvol-100-disk-0", None, false)).unwrap();
        let err = block_on(p.set_volume_acl("subvol-100-disk-0", None, true)).unwrap_err();
        assert!(matches!(err, StorageError::Unsupported(_)), "{err:?}");
        assert_eq!(r.calls().len(), 1);
    }

    #[test]
    fn feature_table_is_pves() {
        let (p, _) = plugin("");
        let has = |f, v: &str, s| p.volume_has_feature(f, v, s).unwrap();
        assert!(has(Feature::Snapshot, "subvol-100-disk-0", None));
        assert!(has(Feature::Snapshot, "vm-100-disk-0", Some("s")));
        assert!(has(Feature::Clone, "basevol-100-disk-0", None));
        assert!(!has(Feature::Clone, "subvol-100-disk-0", None));
        assert!(!has(Feature::Clone, "subvol-100-disk-0", Some("s")));
        assert!(has(Feature::Template, "subvol-100-disk-0", None));
        assert!(!has(Feature::Template, "basevol-100-disk-0", None));
        assert!(has(Feature::Copy, "basevol-100-disk-0", None));
        assert!(!has(Feature::Copy, "subvol-100-disk-0", Some("s")));
        assert!(has(Feature::Replicate, "vm-100-disk-0", None));
        assert!(has(Feature::Rename, "vm-100-disk-0", None));
        assert!(!has(Feature::Rename, "base-100-disk-0", None));
    }

    #[test]
    fn section_needs_a_pool() {
        let s = StorageSection::new("zfspool", "zfs1").unwrap();
        let err = ZfsPoolPlugin::new(s, Arc::new(RecordingRunner::new())).unwrap_err();
        assert_eq!(err.to_string(), "storage definition has no pool");
    }
}
