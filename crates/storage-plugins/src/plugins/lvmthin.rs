//! The `lvmthin` backend (PVE's `LvmThinPlugin`): thin logical volumes `vm-<vmid>-disk-N` in
//! the thin pool `thinpool` of volume group `vgname`.
//!
//! Every volume is `raw` (a block device `/dev/<vg>/<name>`); containers format it with ext4
//! and mount it. Snapshots are read-only thin snapshots `snap_<name>_<snap>`; templates are
//! renamed to `base-…`, made read-only and get the activation-skip flag; linked clones are
//! thin snapshots of a base (or of a snapshot) and, as in PVE, their names do not record the
//! base. The commands are PVE's, with its `/sbin/` paths; `lvs`/`vgs` output is read in
//! PVE's `--separator :` format by pure functions.
//!
//! Unit tests pin the argument vectors and parse captured `lvs`/`vgs` output; every operation
//! also runs against real LVM-thin in the kernel-VM tier (`tests/integration/vm_lvmthin.rs`:
//! this host's kernel has no device-mapper).

use std::path::PathBuf;
use std::sync::Arc;

use vzkit_host::command::{Cmd, CommandError, Runner};

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::{
    Feature, FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeInfo, VolumeState,
};
use crate::volid::{self, ParsedVolname};

/// `lvcreate`.
pub const LVCREATE: &str = "/sbin/lvcreate";
/// `lvchange`.
pub const LVCHANGE: &str = "/sbin/lvchange";
/// `lvremove`.
pub const LVREMOVE: &str = "/sbin/lvremove";
/// `lvrename`.
pub const LVRENAME: &str = "/sbin/lvrename";
/// `lvextend`.
pub const LVEXTEND: &str = "/sbin/lvextend";
/// `lvs`.
pub const LVS: &str = "/sbin/lvs";
/// `vgs`.
pub const VGS: &str = "/sbin/vgs";
/// `vgscan`.
pub const VGSCAN: &str = "/sbin/vgscan";

/// PVE's `volume_has_feature` table for LVM-thin (§4.6).
const LVMTHIN_FEATURES: FeatureTable = FeatureTable(&[
    (Feature::Snapshot, VolumeState::Current, None),
    (Feature::Clone, VolumeState::Base, None),
    (Feature::Clone, VolumeState::Snap, None),
    (Feature::Template, VolumeState::Current, None),
    (Feature::Copy, VolumeState::Base, None),
    (Feature::Copy, VolumeState::Current, None),
    (Feature::Copy, VolumeState::Snap, None),
    (Feature::SparseInit, VolumeState::Base, None),
    (Feature::SparseInit, VolumeState::Current, None),
    (Feature::Rename, VolumeState::Current, None),
]);

/// One logical volume from `lvs` (PVE's `lvm_list_volumes`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalVolume {
    /// Volume group.
    pub vg: String,
    /// LV name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `lv_attr`.
    pub attr: String,
    /// Thin pool of a thin volume (empty otherwise).
    pub pool_lv: String,
    /// `data_percent`, where reported.
    pub data_percent: Option<f64>,
    /// Creation time (seconds), where reported.
    pub ctime: Option<i64>,
}

impl LogicalVolume {
    /// The volume type (first `lv_attr` character: `V` thin volume, `t` thin pool).
    #[must_use]
    pub fn lv_type(&self) -> char {
        self.attr.chars().next().unwrap_or(' ')
    }

    /// Whether the LV is active (fifth `lv_attr` character `a`).
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.attr.chars().nth(4) == Some('a')
    }
}

/// Parses `lvs --separator : --noheadings --units b --nosuffix … --options
/// vg_name,lv_name,lv_size,lv_attr,pool_lv,data_percent,metadata_percent,snap_percent,uuid,
/// tags,metadata_size,time`.
///
/// # Errors
/// A line with too few fields or a size that is not a number.
pub fn parse_lvs(text: &str) -> Result<Vec<LogicalVolume>> {
    let mut res = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 6 {
            return Err(StorageError::Failed(format!(
                "unable to parse lvs output line '{line}'"
            )));
        }
        let size = f[2].parse().map_err(|_| {
            StorageError::Failed(format!("unable to parse lvs output line '{line}'"))
        })?;
        res.push(LogicalVolume {
            vg: f[0].to_string(),
            name: f[1].to_string(),
            size,
            attr: f[3].to_string(),
            pool_lv: f[4].to_string(),
            data_percent: f[5].parse().ok(),
            ctime: f.get(11).and_then(|t| t.parse().ok()),
        });
    }
    Ok(res)
}

/// Parses `vgs --separator : --noheadings --units b --nosuffix --options
/// vg_name,vg_size,vg_free,lv_count` into the volume group names.
#[must_use]
pub fn parse_vgs(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| l.split(':').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// An `lvmthin` storage.
#[derive(Debug)]
pub struct LvmThinPlugin {
    section: StorageSection,
    vg: String,
    thinpool: String,
    runner: Arc<dyn Runner>,
}

fn lvs_cmd(vg: Option<&str>) -> Cmd {
    let mut cmd = Cmd::new(LVS).args([
        "--separator",
        ":",
        "--noheadings",
        "--units",
        "b",
        "--unbuffered",
        "--nosuffix",
        "--config",
        "report/time_format=\"%s\"",
        "--options",
        "vg_name,lv_name,lv_size,lv_attr,pool_lv,data_percent,metadata_percent,snap_percent,uuid,tags,metadata_size,time",
    ]);
    if let Some(vg) = vg {
        cmd = cmd.arg(vg);
    }
    cmd
}

impl LvmThinPlugin {
    /// An lvmthin plugin for `section` (which must have `vgname` and `thinpool`).
    ///
    /// # Errors
    /// When either is missing.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>) -> Result<Self> {
        let get = |k: &str| {
            section
                .get(k)
                .map(str::to_string)
                .ok_or_else(|| StorageError::Invalid(format!("storage definition has no {k}")))
        };
        Ok(Self {
            vg: get("vgname")?,
            thinpool: get("thinpool")?,
            section,
            runner,
        })
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    fn lv(&self, name: &str) -> String {
        format!("{}/{name}", self.vg)
    }

    fn snap_name(name: &str, snap: &str) -> String {
        format!("snap_{name}_{snap}")
    }

    async fn run(&self, cmd: Cmd) -> Result<()> {
        self.runner.run(&cmd).await?;
        Ok(())
    }

    /// The LVs of this storage's volume group.
    ///
    /// # Errors
    /// When `lvs` fails or prints something unexpected.
    pub async fn list_lvs(&self) -> Result<Vec<LogicalVolume>> {
        let out = self.runner.run_stdout(&lvs_cmd(Some(&self.vg))).await?;
        parse_lvs(&out)
    }

    async fn volume_groups(&self) -> Result<Vec<String>> {
        let cmd = Cmd::new(VGS).args([
            "--separator",
            ":",
            "--noheadings",
            "--units",
            "b",
            "--unbuffered",
            "--nosuffix",
            "--options",
            "vg_name,vg_size,vg_free,lv_count",
        ]);
        Ok(parse_vgs(&self.runner.run_stdout(&cmd).await?))
    }

    /// Turns off auto-activation; PVE only warns when that fails (old LVM versions lack the
    /// option), so a failure is not an error here either.
    async fn disable_autoactivation(&self, name: &str) {
        let cmd = Cmd::new(LVCHANGE).args(["--setautoactivation", "n", &self.lv(name)]);
        let _ = self.runner.run(&cmd).await;
    }

    async fn free_name(&self, vmid: u32) -> Result<String> {
        let names: Vec<String> = self.list_lvs().await?.into_iter().map(|l| l.name).collect();
        volid::next_vm_diskname(&names, self.id(), vmid, "raw", false, false)
            .map_err(|e| StorageError::Failed(e.to_string()))
    }

    fn check_snapname(snap: &str) -> Result<()> {
        volid::verify_configid(snap)
            .map(|_| ())
            .map_err(|e| StorageError::Invalid(e.to_string()))
    }
}

#[async_trait::async_trait]
impl StoragePlugin for LvmThinPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "lvmthin"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        volid::parse_volname_lvmthin(volname).map_err(|e| StorageError::Invalid(e.to_string()))
    }

    fn features(&self) -> FeatureTable {
        LVMTHIN_FEATURES
    }

    async fn activate_storage(&self) -> Result<()> {
        if !self.volume_groups().await?.contains(&self.vg) {
            self.run(Cmd::new(VGSCAN).args(["--ignorelockingfailure", "--mknodes"]))
                .await?;
        }
        let lvs = self.list_lvs().await?;
        let pool = lvs
            .iter()
            .find(|l| l.name == self.thinpool)
            .ok_or_else(|| {
                StorageError::NotFound(format!("no such thin pool '{}'", self.lv(&self.thinpool)))
            })?;
        if !pool.is_active() {
            self.run(Cmd::new(LVCHANGE).args(["-ay", "-K", &self.lv(&self.thinpool)]))
                .await?;
        }
        Ok(())
    }

    async fn status(&self) -> Result<StorageStatus> {
        let lvs = self.list_lvs().await?;
        let Some(pool) = lvs
            .iter()
            .find(|l| l.name == self.thinpool && l.lv_type() == 't')
        else {
            return Ok(StorageStatus {
                total: 0,
                avail: 0,
                used: 0,
                active: false,
            });
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let used = (pool.data_percent.unwrap_or(0.0) * pool.size as f64 / 100.0) as u64;
        Ok(StorageStatus {
            total: pool.size,
            avail: pool.size.saturating_sub(used),
            used,
            active: pool.is_active(),
        })
    }

    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        let p = self.parse_volname(volname)?;
        let name = match snapname {
            Some(s) => Self::snap_name(&p.name, s),
            None => p.name,
        };
        Ok(PathBuf::from(format!("/dev/{}/{name}", self.vg)))
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        Ok(VolumeAccess::BlockDevice(
            self.path(volname, snapname).await?,
        ))
    }

    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        if format != "raw" {
            return Err(StorageError::Invalid(format!(
                "unsupported format '{format}'"
            )));
        }
        if let Some(n) = name {
            crate::plugin::check_vm_volume_name(vmid, n)?;
        }
        if !self.volume_groups().await?.contains(&self.vg) {
            return Err(StorageError::NotFound(format!(
                "no such volume group '{}'",
                self.vg
            )));
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => self.free_name(vmid).await?,
        };
        self.parse_volname(&name)?;
        self.run(Cmd::new(LVCREATE).args([
            "-aly",
            "-V",
            &format!("{size_kib}k"),
            "--name",
            &name,
            "--thinpool",
            &self.lv(&self.thinpool),
        ]))
        .await?;
        self.disable_autoactivation(&name).await;
        Ok(name)
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let lvs = self.list_lvs().await?;
        let prefix = format!("snap_{}_", p.name);
        for lv in &lvs {
            if let Some(snap) = lv.name.strip_prefix(&prefix)
                && volid::verify_configid(snap).is_ok()
            {
                self.run(Cmd::new(LVREMOVE).args(["-f", &self.lv(&lv.name)]))
                    .await?;
            }
        }
        if lvs.iter().any(|l| l.name == p.name) {
            self.run(Cmd::new(LVREMOVE).args(["-f", &self.lv(&p.name)]))
                .await?;
        }
        Ok(())
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        for lv in self.list_lvs().await? {
            if lv.lv_type() != 'V' || lv.pool_lv != self.thinpool {
                continue;
            }
            let Ok(p) = self.parse_volname(&lv.name) else {
                continue;
            };
            if vmid.is_some_and(|v| Some(v) != p.vmid) {
                continue;
            }
            let mut info = VolumeInfo::new(self.volid(&lv.name), "images", "raw", lv.size);
            info.vmid = p.vmid;
            info.ctime = lv.ctime;
            res.push(info);
        }
        Ok(res)
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let name = match snapname {
            Some(s) => Self::snap_name(&p.name, s),
            None => p.name,
        };
        let lvs = self.list_lvs().await?;
        let lv = lvs.iter().find(|l| l.name == name).ok_or_else(|| {
            StorageError::NotFound(format!("no such logical volume {}", self.lv(&name)))
        })?;
        if !lv.is_active() {
            self.run(Cmd::new(LVCHANGE).args(["-ay", "-K", &self.lv(&name)]))
                .await?;
        }
        Ok(())
    }

    async fn deactivate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let name = match snapname {
            Some(s) => Self::snap_name(&p.name, s),
            None if p.is_base => p.name,
            None => return Ok(()),
        };
        self.run(Cmd::new(LVCHANGE).args(["-an", &self.lv(&name)]))
            .await
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let path = self.path(volname, None).await?;
        let out = self
            .runner
            .run_stdout(
                &Cmd::new(LVS)
                    .args([
                        "--separator",
                        ":",
                        "--noheadings",
                        "--units",
                        "b",
                        "--unbuffered",
                        "--nosuffix",
                        "--options",
                        "lv_size",
                    ])
                    .arg(&path),
            )
            .await?;
        out.trim()
            .parse()
            .map_err(|_| StorageError::Failed(format!("unable to parse lv size '{}'", out.trim())))
    }

    async fn volume_resize(&self, volname: &str, size_bytes: u64) -> Result<()> {
        let path = self.path(volname, None).await?;
        self.run(
            Cmd::new(LVEXTEND)
                .args(["-L", &format!("{}k", size_bytes / 1024)])
                .arg(&path),
        )
        .await
    }

    async fn volume_snapshot(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        let cmd = Cmd::new(LVCREATE).args([
            "-n",
            &Self::snap_name(&p.name, snap),
            "-pr",
            "-s",
            &self.lv(&p.name),
        ]);
        match self.runner.run(&cmd).await {
            Ok(_) => Ok(()),
            // lvcreate: `Logical Volume "snap_…" already exists in volume group "pve"`.
            Err(e) if e.stderr().contains("already exists") => {
                Err(StorageError::AlreadyExists(e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Thin snapshots are independent LVs, so any snapshot can be rolled back to; but it must
    /// exist. PVE does not check: its rollback removes the volume first and only then finds
    /// out that the snapshot is missing, losing the volume.
    async fn volume_rollback_is_possible(&self, volname: &str, snap: &str) -> Result<Vec<String>> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        let snapvol = Self::snap_name(&p.name, snap);
        if !self.list_lvs().await?.iter().any(|l| l.name == snapvol) {
            return Err(StorageError::NotFound(format!(
                "can't rollback, snapshot '{snap}' does not exist on '{}'",
                self.volid(volname)
            )));
        }
        Ok(Vec::new())
    }

    async fn volume_snapshot_rollback(&self, volname: &str, snap: &str) -> Result<()> {
        self.volume_rollback_is_possible(volname, snap).await?;
        let p = self.parse_volname(volname)?;
        self.run(Cmd::new(LVREMOVE).args(["-f", &self.lv(&p.name)]))
            .await?;
        self.run(Cmd::new(LVCREATE).args([
            "-kn",
            "-n",
            &p.name,
            "-s",
            &self.lv(&Self::snap_name(&p.name, snap)),
        ]))
        .await?;
        self.disable_autoactivation(&p.name).await;
        Ok(())
    }

    async fn volume_snapshot_delete(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        self.run(Cmd::new(LVREMOVE).args(["-f", &self.lv(&Self::snap_name(&p.name, snap))]))
            .await
    }

    async fn volume_snapshot_list(&self, volname: &str) -> Result<Vec<String>> {
        let p = self.parse_volname(volname)?;
        let prefix = format!("snap_{}_", p.name);
        let mut snaps: Vec<(Option<i64>, String)> = self
            .list_lvs()
            .await?
            .into_iter()
            .filter_map(|l| {
                let s = l.name.strip_prefix(&prefix)?.to_string();
                volid::verify_configid(&s).is_ok().then_some((l.ctime, s))
            })
            .collect();
        snaps.sort();
        Ok(snaps.into_iter().map(|(_, s)| s).collect())
    }

    async fn clone_image(&self, volname: &str, vmid: u32, snap: Option<&str>) -> Result<String> {
        let p = self.parse_volname(volname)?;
        let source = match snap {
            Some(s) => {
                Self::check_snapname(s)?;
                self.lv(&Self::snap_name(&p.name, s))
            }
            None if p.is_base => self.lv(&p.name),
            None => {
                return Err(StorageError::Invalid(
                    "clone_image only works on base images".into(),
                ));
            }
        };
        let name = self.free_name(vmid).await?;
        self.runner
            .run(&Cmd::new(LVCREATE).args(["-n", &name, "-prw", "-kn", "-s", &source]))
            .await
            .map_err(|e| match e {
                CommandError::Failed { stderr, .. } => {
                    StorageError::Failed(format!("clone image '{source}' error: {stderr}"))
                }
                other => other.into(),
            })?;
        self.disable_autoactivation(&name).await;
        Ok(name)
    }

    async fn create_base(&self, volname: &str) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if p.is_base {
            return Err(StorageError::Invalid(
                "create_base not possible with base image".into(),
            ));
        }
        let prefix = format!("snap_{}_", p.name);
        if let Some(snap) = self
            .list_lvs()
            .await?
            .iter()
            .find_map(|l| l.name.strip_prefix(&prefix).map(str::to_string))
        {
            // PVE's wording, typo included.
            return Err(StorageError::Invalid(format!(
                "unable to create base volume - found snaphost '{snap}'"
            )));
        }
        let newname = p.name.replacen("vm-", "base-", 1);
        self.run(Cmd::new(LVRENAME).args([&self.vg, &p.name, &newname]))
            .await?;
        self.run(Cmd::new(LVCHANGE).args(["-pr", "-ky", &self.lv(&newname)]))
            .await?;
        self.run(Cmd::new(LVCHANGE).args(["-an", &self.lv(&newname)]))
            .await?;
        Ok(newname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use vzkit_host::command::{Output, RecordingRunner};

    /// Verbatim guest output (lvm2 2.03.16) of PVE's `lvs` command, two leading spaces kept.
    const LVS_OUT: &str = "  pve:data:3221225472:twi-aotz--::0.54:11.43:0.54:ISjQpU-T4sm-EWJW-FsL2-AogU-x5Z2-gcADlh::4194304:1795866907\n\
  pve:vm-100-disk-0:536870912:Vwi-a-tz--:data:3.23::3.23:nFWFeq-eKpr-QKh3-lPu9-J2gy-C2bU-oQG20N:::1795866909\n\
  pve:snap_vm-100-disk-0_s1:536870912:Vri---tz-k:data::::B880PF-kUcj-uR4W-Hu8C-vtZ9-sX0p-jFez0f:::1795866911\n";
    const VGS_OUT: &str = "  pve:4290772992:1061158912:1\n";
    const LVS_PREFIX: &str = "/sbin/lvs --separator : --noheadings --units b --unbuffered --nosuffix --config report/time_format=\"%s\" --options vg_name,lv_name,lv_size,lv_attr,pool_lv,data_percent,metadata_percent,snap_percent,uuid,tags,metadata_size,time pve";
    const VGS_LINE: &str = "/sbin/vgs --separator : --noheadings --units b --unbuffered --nosuffix --options vg_name,vg_size,vg_free,lv_count";

    fn plugin() -> (LvmThinPlugin, Arc<RecordingRunner>) {
        let (cfg, warnings) = StorageConfig::parse(
            "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n",
            "storage.cfg",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner = Arc::new(RecordingRunner::new());
        let p = LvmThinPlugin::new(cfg.get("local-lvm").unwrap().clone(), runner.clone()).unwrap();
        (p, runner)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn lvs_and_vgs_parse() {
        let lvs = parse_lvs(LVS_OUT).unwrap();
        assert_eq!(lvs.len(), 3);
        assert_eq!(lvs[0].lv_type(), 't');
        assert!(lvs[0].is_active());
        assert_eq!(lvs[0].data_percent, Some(0.54));
        assert_eq!(lvs[1].pool_lv, "data");
        assert_eq!(lvs[1].ctime, Some(1_795_866_909));
        assert!(!lvs[2].is_active());
        assert_eq!(lvs[2].data_percent, None);
        assert_eq!(parse_vgs(VGS_OUT), ["pve"]);
        assert!(parse_lvs("  pve:x\n").is_err());
    }

    #[test]
    fn alloc_creates_a_thin_lv() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(VGS_OUT));
        r.push_reply(Output::ok(LVS_OUT));
        let name = block_on(p.alloc_image(100, "raw", None, 524_288)).unwrap();
        assert_eq!(name, "vm-100-disk-1");
        assert_eq!(
            r.call_lines(),
            [
                VGS_LINE,
                LVS_PREFIX,
                "/sbin/lvcreate -aly -V 524288k --name vm-100-disk-1 --thinpool pve/data",
                "/sbin/lvchange --setautoactivation n pve/vm-100-disk-1",
            ]
        );
        let (p, r) = plugin();
        r.push_reply(Output::ok("  other:1:1:0\n"));
        let err = block_on(p.alloc_image(100, "raw", None, 1024)).unwrap_err();
        assert_eq!(err.to_string(), "no such volume group 'pve'");
        let err = block_on(p.alloc_image(100, "raw", Some("vm-101-disk-0"), 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-101-disk-0' - should be 'vm-100-*'"
        );
        let err = block_on(p.alloc_image(100, "subvol", None, 1)).unwrap_err();
        assert_eq!(err.to_string(), "unsupported format 'subvol'");
    }

    #[test]
    fn free_removes_snapshots_first() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(LVS_OUT));
        block_on(p.free_image("vm-100-disk-0")).unwrap();
        assert_eq!(
            r.call_lines()[1..],
            [
                "/sbin/lvremove -f pve/snap_vm-100-disk-0_s1",
                "/sbin/lvremove -f pve/vm-100-disk-0",
            ]
        );
    }

    #[test]
    fn list_status_and_size() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(LVS_OUT));
        let vols = block_on(p.list_images(None)).unwrap();
        let ids: Vec<&str> = vols.iter().map(|v| v.volid.as_str()).collect();
        assert_eq!(ids, ["local-lvm:vm-100-disk-0"]);
        assert_eq!(vols[0].size, 536_870_912);
        r.push_reply(Output::ok(LVS_OUT));
        let st = block_on(p.status()).unwrap();
        assert_eq!(st.total, 3_221_225_472);
        assert_eq!(st.used, 17_394_617);
        assert!(st.active);
        r.push_reply(Output::ok("  805306368\n"));
        assert_eq!(
            block_on(p.volume_size_info("vm-101-disk-0")).unwrap(),
            805_306_368
        );
        block_on(p.volume_resize("vm-101-disk-0", 805_306_368)).unwrap();
        assert_eq!(
            r.call_lines()[2..],
            [
                "/sbin/lvs --separator : --noheadings --units b --unbuffered --nosuffix --options lv_size /dev/pve/vm-101-disk-0",
                "/sbin/lvextend -L 786432k /dev/pve/vm-101-disk-0",
            ]
        );
    }

    #[test]
    fn snapshot_rollback_delete() {
        let (p, r) = plugin();
        block_on(p.volume_snapshot("vm-100-disk-0", "s1")).unwrap();
        r.push_reply(Output::ok(LVS_OUT));
        block_on(p.volume_snapshot_rollback("vm-100-disk-0", "s1")).unwrap();
        block_on(p.volume_snapshot_delete("vm-100-disk-0", "s1")).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                "/sbin/lvcreate -n snap_vm-100-disk-0_s1 -pr -s pve/vm-100-disk-0",
                LVS_PREFIX,
                "/sbin/lvremove -f pve/vm-100-disk-0",
                "/sbin/lvcreate -kn -n vm-100-disk-0 -s pve/snap_vm-100-disk-0_s1",
                "/sbin/lvchange --setautoactivation n pve/vm-100-disk-0",
                "/sbin/lvremove -f pve/snap_vm-100-disk-0_s1",
            ]
        );
        assert_eq!(
            block_on(p.path("vm-100-disk-0", Some("vzdump"))).unwrap(),
            PathBuf::from("/dev/pve/snap_vm-100-disk-0_vzdump")
        );
        r.push_reply(Output::ok(LVS_OUT));
        assert_eq!(
            block_on(p.volume_snapshot_list("vm-100-disk-0")).unwrap(),
            ["s1"]
        );
        // An existing snapshot name: lvcreate's error, as AlreadyExists.
        let (p, r) = plugin();
        r.push_reply(Output::failed(
            5,
            "  Logical Volume \"snap_vm-100-disk-0_s1\" already exists in volume group \"pve\"",
        ));
        let err = block_on(p.volume_snapshot("vm-100-disk-0", "s1")).unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
        assert!(
            err.to_string().contains("already exists in volume group"),
            "{err}"
        );
        // A missing snapshot is refused before anything is removed.
        let (p, r) = plugin();
        r.push_reply(Output::ok(LVS_OUT));
        let err = block_on(p.volume_snapshot_rollback("vm-100-disk-0", "s2")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "can't rollback, snapshot 's2' does not exist on 'local-lvm:vm-100-disk-0'"
        );
        assert_eq!(r.call_lines(), [LVS_PREFIX]);
    }

    #[test]
    fn activation() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(LVS_OUT));
        block_on(p.activate_volume("vm-100-disk-0", Some("s1"))).unwrap();
        r.push_reply(Output::ok(LVS_OUT));
        block_on(p.activate_volume("vm-100-disk-0", None)).unwrap();
        block_on(p.deactivate_volume("vm-100-disk-0", Some("s1"))).unwrap();
        block_on(p.deactivate_volume("vm-100-disk-0", None)).unwrap();
        r.push_reply(Output::ok(LVS_OUT));
        let err = block_on(p.activate_volume("vm-100-disk-9", None)).unwrap_err();
        assert_eq!(err.to_string(), "no such logical volume pve/vm-100-disk-9");
        assert_eq!(
            r.call_lines(),
            [
                LVS_PREFIX,
                "/sbin/lvchange -ay -K pve/snap_vm-100-disk-0_s1",
                LVS_PREFIX,
                "/sbin/lvchange -an pve/snap_vm-100-disk-0_s1",
                LVS_PREFIX,
            ]
        );
        let (p, r) = plugin();
        r.push_reply(Output::ok("  other:1:1:0\n"));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok(LVS_OUT));
        block_on(p.activate_storage()).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                VGS_LINE,
                "/sbin/vgscan --ignorelockingfailure --mknodes",
                LVS_PREFIX
            ]
        );
    }

    #[test]
    fn template_and_clones() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(LVS_OUT));
        let err = block_on(p.create_base("vm-100-disk-0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unable to create base volume - found snaphost 's1'"
        );
        let (p, r2) = plugin();
        r2.push_reply(Output::ok(""));
        assert_eq!(
            block_on(p.create_base("vm-100-disk-0")).unwrap(),
            "base-100-disk-0"
        );
        r2.push_reply(Output::ok(""));
        assert_eq!(
            block_on(p.clone_image("base-100-disk-0", 101, None)).unwrap(),
            "vm-101-disk-0"
        );
        r2.push_reply(Output::ok(LVS_OUT));
        assert_eq!(
            block_on(p.clone_image("vm-100-disk-0", 100, Some("s1"))).unwrap(),
            "vm-100-disk-1"
        );
        assert_eq!(
            r2.call_lines()[1..],
            [
                "/sbin/lvrename pve vm-100-disk-0 base-100-disk-0",
                "/sbin/lvchange -pr -ky pve/base-100-disk-0",
                "/sbin/lvchange -an pve/base-100-disk-0",
                LVS_PREFIX,
                "/sbin/lvcreate -n vm-101-disk-0 -prw -kn -s pve/base-100-disk-0",
                "/sbin/lvchange --setautoactivation n pve/vm-101-disk-0",
                LVS_PREFIX,
                "/sbin/lvcreate -n vm-100-disk-1 -prw -kn -s pve/snap_vm-100-disk-0_s1",
                "/sbin/lvchange --setautoactivation n pve/vm-100-disk-1",
            ]
        );
        let err = block_on(p.clone_image("vm-100-disk-0", 101, None)).unwrap_err();
        assert_eq!(err.to_string(), "clone_image only works on base images");
        assert_eq!(r.calls().len(), 1);
    }

    #[test]
    fn feature_table_is_pves() {
        let (p, _) = plugin();
        let has = |f, v: &str, s| p.volume_has_feature(f, v, s).unwrap();
        assert!(has(Feature::Snapshot, "vm-100-disk-0", None));
        assert!(!has(Feature::Snapshot, "vm-100-disk-0", Some("s")));
        assert!(has(Feature::Clone, "base-100-disk-0", None));
        assert!(has(Feature::Clone, "vm-100-disk-0", Some("s")));
        assert!(!has(Feature::Clone, "vm-100-disk-0", None));
        assert!(has(Feature::Copy, "vm-100-disk-0", Some("s")));
        assert!(has(Feature::Rename, "vm-100-disk-0", None));
    }
}
