//! The pure decisions of a backup, separated from doing it: the effective mode, which mount
//! points are archived, the compressor and its threads, the names of the archive and its
//! temporary files, the temporary directory, the retention limit, the exclude set and the job's
//! command line as logged.
//!
//! Compatibility target: pve-manager 14a22df `PVE/VZDump.pm` (`exec_backup_task`,
//! `compressor_info`, `command_line`) and pve-container `PVE/VZDump/LXC.pm` (`prepare`).

use std::path::{Path, PathBuf};

use vzkit_archive::{Compression, ExcludeSet};
use vzkit_host::mount::MountInfo;
use vzkit_host::paths::Layout;
use vzkit_runtime::conf::{CtConfig, MountPoint, MountPointKind};
use vzkit_storage::prune::PruneOptions;

use crate::error::{Error, Result};
use crate::guest::GuestStatus;
use crate::hook::shell_quote;
use crate::options::JobOptions;

/// Backup mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Archive the stopped container's volumes (a running one is shut down and restarted).
    Stop,
    /// Copy a running container with rsync, freeze it for a final copy.
    Suspend,
    /// Archive read-only storage snapshots of the volumes.
    Snapshot,
}

impl Mode {
    /// PVE's name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Stop => "stop",
            Mode::Suspend => "suspend",
            Mode::Snapshot => "snapshot",
        }
    }

    /// Parse PVE's name.
    ///
    /// # Errors
    /// `unknown mode 'X'`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "stop" => Ok(Mode::Stop),
            "suspend" => Ok(Mode::Suspend),
            "snapshot" => Ok(Mode::Snapshot),
            _ => Err(Error::msg(format!("unknown mode '{s}'"))),
        }
    }
}

/// The mode a guest is backed up in: the requested one if it runs, `stop` if it does not.
#[must_use]
pub fn effective_mode(requested: Mode, status: GuestStatus) -> Mode {
    match status {
        GuestStatus::Running => requested,
        GuestStatus::Stopped => Mode::Stop,
    }
}

/// Whether a snapshot-mode `prepare` error makes the task fall back to suspend mode (PVE:
/// the message matches `^mode failure`); any other error fails the backup.
#[must_use]
pub fn is_mode_failure(err: &Error) -> bool {
    matches!(err, Error::Failed(m) if m.starts_with("mode failure"))
}

/// A mount point that goes into the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `rootfs`, `mpN`.
    pub key: String,
    /// Its configuration.
    pub mp: MountPoint,
}

impl Disk {
    /// The member prefix in the archive: `./` for the rootfs, `./mnt/data` for `/mnt/data`.
    #[must_use]
    pub fn member_prefix(&self) -> String {
        let rel = self.mp.mp.trim_matches('/');
        if rel.is_empty() {
            "./".to_string()
        } else {
            format!("./{rel}")
        }
    }

    /// Whether this is a storage volume (rootfs always is one).
    #[must_use]
    pub fn is_volume(&self) -> bool {
        self.mp.kind() == MountPointKind::Volume
    }
}

/// What [`backup_volumes`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumePlan {
    /// Mount points to archive, in `foreach_mountpoint` order (rootfs, mp0, mp1, …).
    pub disks: Vec<Disk>,
    /// Paths of excluded mount points (rsync excludes them in suspend mode).
    pub exclude_dirs: Vec<String>,
    /// One log line per decision.
    pub log: Vec<String>,
}

impl VolumePlan {
    /// The volume ids of included storage volumes (what snapshot mode snapshots).
    #[must_use]
    pub fn volids(&self) -> Vec<String> {
        self.disks
            .iter()
            .filter(|d| d.is_volume())
            .map(|d| d.mp.volume.clone())
            .collect()
    }
}

/// `get_backup_volumes` / `mountpoint_backup_enabled`: rootfs always; volumes with
/// `backup=1`; bind and device mount points never. Templates' volumes are mounted read-only.
///
/// # Errors
/// A mount point that does not parse.
pub fn backup_volumes(conf: &CtConfig) -> Result<VolumePlan> {
    let mut plan = VolumePlan::default();
    let template = conf.main.is_template();
    for (key, mut mp) in conf.mountpoints()? {
        if mp.volume.is_empty() || mp.mp.is_empty() {
            continue;
        }
        if !mp.backup_enabled(&key) {
            let reason = if mp.kind() == MountPointKind::Volume {
                "disabled"
            } else {
                "not a volume"
            };
            plan.log.push(format!(
                "excluding {} mount point {key} ('{}') from backup ({reason})",
                mp.kind().as_str(),
                mp.mp
            ));
            plan.exclude_dirs.push(mp.mp.clone());
            continue;
        }
        plan.log.push(format!(
            "including mount point {key} ('{}') in backup",
            mp.mp
        ));
        if template && mp.ro.is_none() {
            mp.ro = Some(true);
        }
        plan.disks.push(Disk { key, mp });
    }
    Ok(plan)
}

/// Compressor and thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressorChoice {
    /// The format.
    pub compression: Compression,
    /// Compressing threads (1 = one thread of its own, beside reading and writing).
    pub threads: u32,
}

/// `compressor_info`, with vzkit's default of using every core: `--zstd N` / `--pigz N` (from
/// the command line or `/etc/vzdump.conf`) pin the thread count as in PVE (`zstd 0` and
/// `pigz 1` = half the cores, `pigz 0` = single-threaded gzip); without them zstd and gzip
/// use all `cpus`.
///
/// # Errors
/// An unknown `compress` value (the schema rules it out).
pub fn compressor_choice(
    opts: &JobOptions,
    explicit_zstd: Option<i64>,
    explicit_pigz: Option<i64>,
    cpus: u32,
) -> Result<CompressorChoice> {
    let cpus = cpus.max(1);
    let half = cpus.div_ceil(2);
    let clamp = |n: i64| u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    let choice = match opts.compress.as_deref().unwrap_or("0") {
        "0" => CompressorChoice {
            compression: Compression::None,
            threads: 1,
        },
        "1" | "lzo" => CompressorChoice {
            compression: Compression::Lzo,
            threads: 1,
        },
        "gzip" => CompressorChoice {
            compression: Compression::Gzip,
            threads: match explicit_pigz {
                None => cpus,
                Some(n) if n <= 0 => 1,
                Some(1) => half,
                Some(n) => clamp(n),
            },
        },
        "zstd" => CompressorChoice {
            compression: Compression::Zstd,
            threads: match explicit_zstd {
                None => cpus,
                Some(0) => half,
                Some(n) => clamp(n),
            },
        },
        other => {
            return Err(Error::msg(format!(
                "internal error - unknown compression option '{other}'"
            )));
        }
    };
    Ok(choice)
}

/// The names of one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveNames {
    /// `vzdump-lxc-<vmid>-YYYY_MM_DD-HH_MM_SS`
    pub basename: String,
    /// `<dumpdir>/<basename>.tar[.zst|.gz|.lzo]`
    pub target: PathBuf,
    /// The target with its last extension replaced by `.dat`.
    pub tmptar: PathBuf,
    /// `<dumpdir>/<basename>.log`
    pub logfile: PathBuf,
}

/// `vzdump-lxc-<vmid>` plus the local time of the backup.
#[must_use]
pub fn basename(vmid: u32, time: &jiff::ZonedDateTime) -> String {
    format!("vzdump-lxc-{vmid}-{}", time.strftime("%Y_%m_%d-%H_%M_%S"))
}

/// `s/\.[^\.]+$/\.dat/` on the target path.
#[must_use]
pub fn tmptar_name(target: &str) -> String {
    match target.rfind('.') {
        Some(i) if !target[i + 1..].is_empty() && !target[i + 1..].contains('/') => {
            format!("{}.dat", &target[..i])
        }
        _ => target.to_string(),
    }
}

/// Names for a backup written to `dumpdir`.
#[must_use]
pub fn archive_names(dumpdir: &str, basename: &str, compression: Compression) -> ArchiveNames {
    let target = format!("{dumpdir}/{basename}{}", compression.extension());
    ArchiveNames {
        basename: basename.to_string(),
        tmptar: PathBuf::from(tmptar_name(&target)),
        target: PathBuf::from(target),
        logfile: PathBuf::from(format!("{dumpdir}/{basename}.log")),
    }
}

/// File systems on which the dump directory also holds the temporary directory.
pub const POSIX_FILESYSTEMS: [&str; 6] = ["ext3", "ext4", "nfs", "nfs4", "reiserfs", "xfs"];

/// The file system type of the mount holding `path` (longest mount point prefix; the path
/// should be canonical).
#[must_use]
pub fn fstype_of(path: &Path, mounts: &[MountInfo]) -> Option<String> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.fstype.clone())
}

/// The temporary directory of a task and, when PVE logs one, the line saying why.
#[must_use]
pub fn tmpdir_for(
    layout: &Layout,
    tmpdir_opt: Option<&str>,
    dumpdir: &str,
    dumpdir_fstype: Option<&str>,
    basename: &str,
    pid: u32,
    vmid: u32,
) -> (PathBuf, Option<String>) {
    if let Some(t) = tmpdir_opt.filter(|t| !t.is_empty()) {
        return (PathBuf::from(format!("{t}/vzdumptmp{pid}_{vmid}/")), None);
    }
    let fstype = dumpdir_fstype.unwrap_or("");
    if POSIX_FILESYSTEMS.contains(&fstype) {
        return (PathBuf::from(format!("{dumpdir}/{basename}.tmp")), None);
    }
    let dir = layout.join(&format!("/var/tmp/vzdumptmp{pid}_{vmid}"));
    let line = format!(
        "filesystem type on dumpdir is '{fstype}' -using {} for temporary files",
        dir.display()
    );
    (dir, Some(line))
}

/// The retention limit checked before a backup without `remove`: the sum of the `keep-*`
/// values (0 with `keep-all`).
#[must_use]
pub fn backup_limit(keep: &PruneOptions) -> u64 {
    if keep.keep_all == Some(true) {
        return 0;
    }
    keep.entries()
        .iter()
        .filter(|(k, _)| *k != "keep-all")
        .map(|(_, v)| v)
        .sum()
}

/// The exclude set of the tar stream: the job's patterns (`/x` anchored as `./x`, others
/// unanchored) plus `lost+found` for unprivileged containers, as PVE passes
/// `--no-anchored --exclude=lost+found` when tar runs in a user namespace. Also the
/// trailing-slash warnings.
#[must_use]
pub fn exclude_set(patterns: &[String], unprivileged: bool) -> (ExcludeSet, Vec<String>) {
    let (mut set, warnings) = ExcludeSet::from_vzdump_patterns(patterns);
    if unprivileged {
        set.add_unanchored("lost+found");
    }
    (set, warnings)
}

/// The command line logged as `starting new backup job: …` (`command_line` of
/// pve-guest-common): `vzdump <vmids>` and each given parameter as `--key value`, values
/// shell-quoted; `stdout` is left out.
#[must_use]
pub fn command_line(params: &[(String, String)]) -> String {
    let mut cmd = String::from("vzdump");
    for (_, v) in params.iter().filter(|(k, _)| k == "vmid") {
        for id in vzkit_storage::config::split_list(v) {
            cmd.push(' ');
            cmd.push_str(&id);
        }
    }
    for (k, v) in params {
        if k == "vmid" || k == "stdout" || v.is_empty() {
            continue;
        }
        if k == "exclude-path" {
            for p in v.split('\0').filter(|p| !p.is_empty()) {
                cmd.push_str(&format!(" --{k} {}", shell_quote(p)));
            }
            continue;
        }
        cmd.push_str(&format!(" --{k} {}", shell_quote(v)));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> CtConfig {
        CtConfig::parse(100, text).unwrap().0
    }

    #[test]
    fn mount_point_inclusion_and_log_lines() {
        let c = conf(
            "rootfs: local:100/vm-100-disk-0.raw,size=1G\n\
             mp0: local:100/vm-100-disk-1.raw,mp=/mnt/data,backup=1,size=1G\n\
             mp1: local:100/vm-100-disk-2.raw,mp=/mnt/nobackup,size=1G\n\
             mp2: /srv/host,mp=/mnt/bind,backup=1\n\
             mp10: /dev/sdb1,mp=/mnt/dev\n\
             mp3: local:100/vm-100-disk-3.raw,mp=/x,backup=0\n",
        );
        let plan = backup_volumes(&c).unwrap();
        assert_eq!(
            plan.log,
            [
                "including mount point rootfs ('/') in backup",
                "including mount point mp0 ('/mnt/data') in backup",
                "excluding volume mount point mp1 ('/mnt/nobackup') from backup (disabled)",
                "excluding bind mount point mp2 ('/mnt/bind') from backup (not a volume)",
                "excluding volume mount point mp3 ('/x') from backup (disabled)",
                "excluding device mount point mp10 ('/mnt/dev') from backup (not a volume)",
            ]
        );
        let keys: Vec<&str> = plan.disks.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["rootfs", "mp0"]);
        assert_eq!(plan.disks[0].member_prefix(), "./");
        assert_eq!(plan.disks[1].member_prefix(), "./mnt/data");
        assert_eq!(
            plan.exclude_dirs,
            ["/mnt/nobackup", "/mnt/bind", "/x", "/mnt/dev"]
        );
        assert_eq!(
            plan.volids(),
            ["local:100/vm-100-disk-0.raw", "local:100/vm-100-disk-1.raw"]
        );
        let t = conf("template: 1\nrootfs: local:100/base-100-disk-0.raw\n");
        assert_eq!(backup_volumes(&t).unwrap().disks[0].mp.ro, Some(true));
    }

    #[test]
    fn modes() {
        assert_eq!(
            effective_mode(Mode::Snapshot, GuestStatus::Stopped),
            Mode::Stop
        );
        assert_eq!(
            effective_mode(Mode::Suspend, GuestStatus::Running),
            Mode::Suspend
        );
        assert_eq!(Mode::parse("snapshot").unwrap(), Mode::Snapshot);
        assert!(Mode::parse("fast").is_err());
        assert!(is_mode_failure(&Error::msg(
            "mode failure - some volumes do not support snapshots"
        )));
        assert!(!is_mode_failure(&Error::msg("CT is locked (backup)")));
        assert!(!is_mode_failure(&Error::Interrupted));
    }

    #[test]
    fn compressors_and_threads() {
        let o = |c: &str| JobOptions {
            compress: Some(c.into()),
            ..JobOptions::default()
        };
        let pick = |c: &str, z: Option<i64>, p: Option<i64>| {
            let r = compressor_choice(&o(c), z, p, 8).unwrap();
            (r.compression, r.threads)
        };
        assert_eq!(pick("0", None, None), (Compression::None, 1));
        assert_eq!(pick("1", None, None), (Compression::Lzo, 1));
        assert_eq!(pick("lzo", None, None), (Compression::Lzo, 1));
        // vzkit: all cores unless told otherwise
        assert_eq!(pick("zstd", None, None), (Compression::Zstd, 8));
        assert_eq!(pick("gzip", None, None), (Compression::Gzip, 8));
        // PVE's meaning when given
        assert_eq!(pick("zstd", Some(1), None), (Compression::Zstd, 1));
        assert_eq!(pick("zstd", Some(0), None), (Compression::Zstd, 4));
        assert_eq!(pick("zstd", Some(3), None), (Compression::Zstd, 3));
        assert_eq!(pick("gzip", None, Some(0)), (Compression::Gzip, 1));
        assert_eq!(pick("gzip", None, Some(1)), (Compression::Gzip, 4));
        assert_eq!(pick("gzip", None, Some(6)), (Compression::Gzip, 6));
        let r = compressor_choice(&o("zstd"), Some(0), None, 3).unwrap();
        assert_eq!(r.threads, 2);
    }

    #[test]
    fn names() {
        let t: jiff::ZonedDateTime = "2024-01-02T03:04:05[UTC]".parse().unwrap();
        let b = basename(100, &t);
        assert_eq!(b, "vzdump-lxc-100-2024_01_02-03_04_05");
        let n = archive_names("/var/lib/vz/dump", &b, Compression::Zstd);
        assert_eq!(
            n.target,
            Path::new("/var/lib/vz/dump/vzdump-lxc-100-2024_01_02-03_04_05.tar.zst")
        );
        assert_eq!(
            n.tmptar,
            Path::new("/var/lib/vz/dump/vzdump-lxc-100-2024_01_02-03_04_05.tar.dat")
        );
        assert_eq!(
            n.logfile,
            Path::new("/var/lib/vz/dump/vzdump-lxc-100-2024_01_02-03_04_05.log")
        );
        let n = archive_names("/d", &b, Compression::None);
        assert_eq!(
            n.tmptar,
            Path::new("/d/vzdump-lxc-100-2024_01_02-03_04_05.dat")
        );
    }

    #[test]
    fn temporary_directories() {
        let l = Layout::new("/r");
        let b = "vzdump-lxc-100-2024_01_02-03_04_05";
        assert_eq!(
            tmpdir_for(&l, Some("/scratch"), "/d", Some("ext4"), b, 42, 100),
            (PathBuf::from("/scratch/vzdumptmp42_100/"), None)
        );
        assert_eq!(
            tmpdir_for(&l, None, "/d", Some("xfs"), b, 42, 100),
            (PathBuf::from(format!("/d/{b}.tmp")), None)
        );
        let (dir, line) = tmpdir_for(&l, None, "/d", Some("tmpfs"), b, 42, 100);
        assert_eq!(dir, Path::new("/r/var/tmp/vzdumptmp42_100"));
        assert_eq!(
            line.unwrap(),
            "filesystem type on dumpdir is 'tmpfs' -using /r/var/tmp/vzdumptmp42_100 for temporary files"
        );
        let mounts = vzkit_host::mount::parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 0:5 / /var/lib/vz/dump rw - tmpfs t rw\n",
        )
        .unwrap();
        assert_eq!(
            fstype_of(Path::new("/var/lib/vz/dump"), &mounts).as_deref(),
            Some("tmpfs")
        );
        assert_eq!(
            fstype_of(Path::new("/var/lib/vz"), &mounts).as_deref(),
            Some("ext4")
        );
    }

    #[test]
    fn limits_excludes_and_command_line() {
        assert_eq!(backup_limit(&PruneOptions::keep_all()), 0);
        assert_eq!(
            backup_limit(&PruneOptions::parse("keep-last=2,keep-daily=3").unwrap()),
            5
        );
        let (set, warnings) = exclude_set(&["/var/cache/".to_string(), "*.log".into()], true);
        assert_eq!(
            warnings,
            ["tar does not match exclusion with a trailing slash '/var/cache/'"]
        );
        assert!(set.is_excluded(b"./lost+found"));
        assert!(set.is_excluded(b"./srv/lost+found"));
        assert!(set.is_excluded(b"./a/b.log"));
        let (set, _) = exclude_set(&[], false);
        assert!(!set.is_excluded(b"./lost+found"));
        let params: Vec<(String, String)> = [
            ("vmid", "100,101"),
            ("storage", "local"),
            ("notes-template", "{{guestname}}"),
            ("exclude-path", "/a b\0/c"),
            ("stdout", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            command_line(&params),
            "vzdump 100 101 --storage local --notes-template '{{guestname}}' \
             --exclude-path '/a b' --exclude-path /c"
        );
    }
}
