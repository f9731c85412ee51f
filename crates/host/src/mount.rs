//! Mounts, loop devices and filesystems, through the command runner.
//!
//! The command lines follow PVE's (`mount [-o opts] [-o quota-opts] [-o ro] <dev> <target>`,
//! `losetup --show -f <file>`, `mkfs.ext4 -O mmp -E root_owner=U:G <dev>`), so behaviour can be
//! compared one to one. Whether a path is a mount point is read from `/proc/self/mountinfo`
//! by a pure parser.

use std::path::{Path, PathBuf};

use crate::command::{Cmd, CommandError, Runner};

/// `losetup`
pub const LOSETUP: &str = "losetup";
/// `mount`
pub const MOUNT: &str = "mount";
/// `umount`
pub const UMOUNT: &str = "umount";
/// `mkfs.ext4`
pub const MKFS_EXT4: &str = "mkfs.ext4";
/// `resize2fs`
pub const RESIZE2FS: &str = "resize2fs";

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (device or `none`).
    pub source: String,
    /// Per-mount options (`rw,relatime`).
    pub options: String,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// The directory of the file system mounted here (`/` unless a bind mount of a
    /// directory or a subvolume).
    pub root: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &field[i + 1..(i + 4).min(field.len())];
            if oct.len() == 3
                && oct.bytes().all(|b| (b'0'..=b'7').contains(&b))
                && let Ok(v) = u8::from_str_radix(oct, 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(out)
        .to_string_lossy()
        .into_owned()
}

/// Parses the text of `/proc/self/mountinfo`. Malformed lines are reported, not skipped.
///
/// # Errors
/// A message naming the first malformed line.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>, String> {
    let mut res = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-");
        match sep {
            Some(sep) if sep >= 6 && fields.len() >= sep + 3 => res.push(MountInfo {
                dev: fields[2].to_string(),
                root: unescape_mountinfo(fields[3]),
                mount_point: PathBuf::from(unescape_mountinfo(fields[4])),
                options: fields[5].to_string(),
                fstype: fields[sep + 1].to_string(),
                source: unescape_mountinfo(fields[sep + 2]),
            }),
            _ => return Err(format!("malformed mountinfo line: {line}")),
        }
    }
    Ok(res)
}

/// The current mount table.
///
/// # Errors
/// When `/proc/self/mountinfo` cannot be read or parsed.
pub fn mount_table() -> std::io::Result<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_mountinfo(&text).map_err(std::io::Error::other)
}

/// Whether `path` is currently a mount point (compared after canonicalisation).
///
/// # Errors
/// When the mount table cannot be read.
pub fn is_mountpoint(path: &Path) -> std::io::Result<bool> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(mount_table()?.iter().any(|m| m.mount_point == path))
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
///
/// # Errors
/// When the mount table cannot be read.
pub fn mounts_below(dir: &Path) -> std::io::Result<Vec<MountInfo>> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut found: Vec<MountInfo> = mount_table()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&dir))
        .collect();
    // The later a mount was made, the later it appears; unmount in reverse.
    found.reverse();
    Ok(found)
}

/// Parses `losetup --associated <file>` output: the first `/dev/loopN:` device.
#[must_use]
pub fn parse_losetup_associated(output: &str) -> Option<PathBuf> {
    output.lines().find_map(|l| {
        let dev = l.split(':').next()?;
        let n = dev.strip_prefix("/dev/loop")?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| PathBuf::from(dev))
    })
}

/// Attaches `file` to a loop device (reusing one already associated with it, as PVE does,
/// in whatever mode it has).
///
/// A new writable device does direct I/O on the file (`--direct-io=on`, as systemd's loop
/// devices do) where [`direct_io_suits`] the file: its blocks are cached once, by the file
/// system mounted on it, instead of a second time in the host's page cache. Writing a
/// restore back then costs one copy of the data less, and nothing is left to flush from the
/// host's cache at the end. If `losetup` cannot set direct I/O up, the device is attached
/// buffered. A read-only device stays buffered: backups read the same image again and
/// again, and the host's cache of it serves the next one.
///
/// # Errors
/// When `losetup` fails.
pub async fn loop_attach(
    runner: &dyn Runner,
    file: &Path,
    read_only: bool,
) -> Result<PathBuf, CommandError> {
    let direct = if read_only {
        false
    } else {
        // statfs/statx may block (a hung network file system): off the async threads.
        let f = file.to_path_buf();
        tokio::task::spawn_blocking(move || direct_io_suits(&f))
            .await
            .unwrap_or(false)
    };
    loop_attach_as(runner, file, read_only, direct).await
}

async fn loop_attach_as(
    runner: &dyn Runner,
    file: &Path,
    read_only: bool,
    direct: bool,
) -> Result<PathBuf, CommandError> {
    let associated = async || -> Result<Option<PathBuf>, CommandError> {
        let out = runner
            .run_stdout(&Cmd::new(LOSETUP).arg("--associated").arg(file))
            .await?;
        Ok(parse_losetup_associated(&out))
    };
    if let Some(dev) = associated().await? {
        return Ok(dev);
    }
    let attach = |direct: bool| {
        let mut cmd = Cmd::new(LOSETUP).args(["--show", "-f"]);
        if read_only {
            cmd = cmd.arg("-r");
        }
        if direct {
            cmd = cmd.arg("--direct-io=on");
        }
        cmd.arg(file)
    };
    let out = match runner.run_stdout(&attach(direct)).await {
        Ok(out) => out,
        Err(_) if direct => {
            // An older losetup may have attached the device before failing to switch it.
            if let Ok(Some(dev)) = associated().await {
                return Ok(dev);
            }
            runner.run_stdout(&attach(false)).await?
        }
        Err(e) => return Err(e),
    };
    Ok(PathBuf::from(out.trim()))
}

/// Whether a writable loop device on `file` should do direct I/O: only on a local ext4 or
/// xfs (not on FUSE or network file systems, nor on btrfs, whose data checksums do not
/// stand pages changing while they are written directly), and only where direct I/O
/// aligns to 512 bytes: otherwise the kernel gives the device the larger sectors of the
/// disk below, and a file system made with smaller blocks in the image would not mount.
#[must_use]
pub fn direct_io_suits(file: &Path) -> bool {
    if !matches!(fs_magic(file), Ok(EXT4_SUPER_MAGIC | XFS_SUPER_MAGIC)) {
        return false;
    }
    match rustix::fs::statx(
        rustix::fs::CWD,
        file,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::DIOALIGN,
    ) {
        Ok(st) if st.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() != 0 => {
            (1..=512).contains(&st.stx_dio_offset_align)
        }
        _ => false,
    }
}

/// `statfs` type of ext2/3/4.
pub const EXT4_SUPER_MAGIC: u64 = 0xEF53;
/// `statfs` type of xfs.
pub const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
/// `statfs` type of btrfs.
pub const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;
/// `statfs` type of tmpfs.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
/// `statfs` type of zfs.
pub const ZFS_SUPER_MAGIC: u64 = 0x2FC1_2FC1;

/// The type of the file system holding `path` (`statfs`'s `f_type`, an i64 on some targets
/// and a u32 on others).
///
/// # Errors
/// When `statfs` fails.
pub fn fs_magic(path: &Path) -> std::io::Result<u64> {
    let fs = rustix::fs::statfs(path)?;
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    u64::try_from(fs.f_type as i64)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
}

/// Detaches a loop device.
///
/// # Errors
/// When `losetup -d` fails.
pub async fn loop_detach(runner: &dyn Runner, dev: &Path) -> Result<(), CommandError> {
    runner
        .run(&Cmd::new(LOSETUP).arg("-d").arg(dev))
        .await
        .map(drop)
}

/// How to mount something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountSpec {
    /// `-t` type, if any.
    pub fstype: Option<String>,
    /// Options passed as one `-o a,b,c` group (user `mountoptions`, `acl`).
    pub options: Vec<String>,
    /// Options passed as their own `-o` group after the first (quota options).
    pub extra_options: Vec<String>,
    /// Read-only (`-o ro` last).
    pub read_only: bool,
    /// A bind mount (`-o bind` first).
    pub bind: bool,
}

/// Builds the `mount` command PVE would run.
#[must_use]
pub fn mount_cmd(source: &Path, target: &Path, spec: &MountSpec) -> Cmd {
    let mut cmd = Cmd::new(MOUNT);
    if spec.bind {
        cmd = cmd.args(["-o", "bind"]);
    }
    if let Some(t) = &spec.fstype {
        cmd = cmd.args(["-t", t]);
    }
    if !spec.options.is_empty() {
        cmd = cmd.arg("-o").arg(spec.options.join(","));
    }
    if !spec.extra_options.is_empty() {
        cmd = cmd.arg("-o").arg(spec.extra_options.join(","));
    }
    if spec.read_only && !spec.bind {
        cmd = cmd.args(["-o", "ro"]);
    }
    cmd.arg(source).arg(target)
}

/// Mounts `source` on `target`; a read-only bind mount is remounted read-only afterwards
/// (a bind mount ignores `ro` on the first call).
///
/// # Errors
/// When `mount` fails; a failed read-only remount unmounts again.
pub async fn mount(
    runner: &dyn Runner,
    source: &Path,
    target: &Path,
    spec: &MountSpec,
) -> Result<(), CommandError> {
    runner.run(&mount_cmd(source, target, spec)).await?;
    if spec.bind && spec.read_only {
        let remount = Cmd::new(MOUNT).args(["-o", "bind,remount,ro"]).arg(target);
        if let Err(e) = runner.run(&remount).await {
            if let Err(undo) = umount(runner, target, false).await {
                return Err(CommandError::Failed {
                    cmd: remount.to_string(),
                    exit: crate::command::Exit::Code(-1),
                    stderr: format!("{e}; and unmounting again failed: {undo}"),
                });
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target` (`umount -d`, detaching a loop device behind it; `-l` when lazy).
///
/// # Errors
/// When `umount` fails.
pub async fn umount(runner: &dyn Runner, target: &Path, lazy: bool) -> Result<(), CommandError> {
    umount_with(runner, target, lazy, true).await
}

/// Unmounts `target`; `detach` adds `-d` (free a loop device behind the mount), which must
/// not be used for loop devices someone else attached.
///
/// # Errors
/// When `umount` fails.
pub async fn umount_with(
    runner: &dyn Runner,
    target: &Path,
    lazy: bool,
    detach: bool,
) -> Result<(), CommandError> {
    let mut cmd = Cmd::new(UMOUNT);
    if lazy {
        cmd = cmd.arg("-l");
    }
    if detach {
        cmd = cmd.arg("-d");
    }
    runner.run(&cmd.arg(target)).await.map(drop)
}

/// Creates an ext4 filesystem the way PVE formats container volumes.
///
/// # Errors
/// When `mkfs.ext4` fails.
pub async fn mkfs_ext4(
    runner: &dyn Runner,
    dev: &Path,
    root_uid: u32,
    root_gid: u32,
) -> Result<(), CommandError> {
    let cmd = Cmd::new(MKFS_EXT4)
        .args(["-O", "mmp", "-E"])
        .arg(format!("root_owner={root_uid}:{root_gid}"))
        .arg(dev);
    runner.run(&cmd).await.map(drop)
}

/// Grows the ext4 filesystem on `dev` to fill it.
///
/// # Errors
/// When `resize2fs` fails.
pub async fn resize2fs(runner: &dyn Runner, dev: &Path) -> Result<(), CommandError> {
    runner.run(&Cmd::new(RESIZE2FS).arg(dev)).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Output, RecordingRunner};

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 7:0 / /var/lib/lxc/100/rootfs rw,relatime shared:2 - ext4 /dev/loop0 rw,acl
36 35 0:40 / /mnt/with\\040space rw - tmpfs none rw
37 35 254:0 /var/lib/vz/images/100/subvol-100-disk-1 /var/lib/lxc/100/rootfs/mnt rw - ext4 /dev/vda rw
";

    #[test]
    fn parses_mountinfo_with_escapes() {
        let m = parse_mountinfo(MOUNTINFO).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, Path::new("/var/lib/lxc/100/rootfs"));
        assert_eq!(m[1].source, "/dev/loop0");
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].root, "/");
        assert_eq!(m[2].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[3].root, "/var/lib/vz/images/100/subvol-100-disk-1");
        assert!(parse_mountinfo("garbage\n").is_err());
    }

    #[test]
    fn reads_the_real_mount_table() {
        let table = mount_table().unwrap();
        assert!(table.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(is_mountpoint(Path::new("/")).unwrap());
    }

    #[test]
    fn parses_losetup_associated() {
        assert_eq!(
            parse_losetup_associated("/dev/loop3: [2049]:1234 (/var/lib/vz/images/100/x.raw)\n"),
            Some(PathBuf::from("/dev/loop3"))
        );
        assert_eq!(parse_losetup_associated(""), None);
    }

    #[test]
    fn mount_command_lines_match_pve() {
        let spec = MountSpec {
            options: vec!["noatime".into(), "acl".into()],
            extra_options: vec!["usrjquota=aquota.user,grpjquota=aquota.group,jqfmt=vfsv0".into()],
            read_only: true,
            ..MountSpec::default()
        };
        assert_eq!(
            mount_cmd(Path::new("/dev/loop0"), Path::new("/t"), &spec)
                .argv()
                .join(" "),
            "mount -o noatime,acl -o usrjquota=aquota.user,grpjquota=aquota.group,jqfmt=vfsv0 -o ro /dev/loop0 /t"
        );
        let bind = MountSpec {
            bind: true,
            ..MountSpec::default()
        };
        assert_eq!(
            mount_cmd(Path::new("/src"), Path::new("/t"), &bind)
                .argv()
                .join(" "),
            "mount -o bind /src /t"
        );
    }

    #[tokio::test]
    async fn loop_attach_reuses_an_associated_device() {
        let r = RecordingRunner::new();
        r.push_reply(Output::ok("/dev/loop7: [2049]:12 (/x.raw)\n"));
        let dev = loop_attach(&r, Path::new("/x.raw"), false).await.unwrap();
        assert_eq!(dev, Path::new("/dev/loop7"));
        assert_eq!(r.call_lines(), vec!["losetup --associated /x.raw"]);

        let r = RecordingRunner::new();
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("/dev/loop2\n"));
        let dev = loop_attach(&r, Path::new("/x.raw"), true).await.unwrap();
        assert_eq!(dev, Path::new("/dev/loop2"));
        assert_eq!(
            r.call_lines(),
            vec!["losetup --associated /x.raw", "losetup --show -f -r /x.raw"]
        );

        // No such file: nothing says it suits direct I/O.
        let r = RecordingRunner::new();
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("/dev/loop3\n"));
        let dev = loop_attach(&r, Path::new("/x.raw"), false).await.unwrap();
        assert_eq!(dev, Path::new("/dev/loop3"));
        assert_eq!(
            r.call_lines(),
            vec!["losetup --associated /x.raw", "losetup --show -f /x.raw"]
        );
    }

    #[tokio::test]
    async fn direct_io_that_cannot_be_set_up_falls_back_to_buffered() {
        let r = RecordingRunner::new();
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("/dev/loop3\n"));
        let dev = loop_attach_as(&r, Path::new("/x.raw"), false, true)
            .await
            .unwrap();
        assert_eq!(dev, Path::new("/dev/loop3"));
        assert_eq!(
            r.call_lines(),
            vec![
                "losetup --associated /x.raw",
                "losetup --show -f --direct-io=on /x.raw"
            ]
        );

        let r = RecordingRunner::new();
        r.push_reply(Output::ok(""));
        r.push_reply(Output::failed(
            1,
            "losetup: /x.raw: failed to set up loop device",
        ));
        r.push_reply(Output::ok(""));
        r.push_reply(Output::ok("/dev/loop4\n"));
        let dev = loop_attach_as(&r, Path::new("/x.raw"), false, true)
            .await
            .unwrap();
        assert_eq!(dev, Path::new("/dev/loop4"));
        assert_eq!(
            r.call_lines(),
            vec![
                "losetup --associated /x.raw",
                "losetup --show -f --direct-io=on /x.raw",
                "losetup --associated /x.raw",
                "losetup --show -f /x.raw"
            ]
        );

        // Attached, then failed to switch: the attached device is used.
        let r = RecordingRunner::new();
        r.push_reply(Output::ok(""));
        r.push_reply(Output::failed(
            1,
            "losetup: /dev/loop5: set direct io failed",
        ));
        r.push_reply(Output::ok("/dev/loop5: [2049]:12 (/x.raw)\n"));
        let dev = loop_attach_as(&r, Path::new("/x.raw"), false, true)
            .await
            .unwrap();
        assert_eq!(dev, Path::new("/dev/loop5"));
        assert_eq!(r.call_lines().len(), 3);

        // A buffered attach that fails is not retried.
        let r = RecordingRunner::new();
        r.push_reply(Output::ok(""));
        r.push_reply(Output::failed(1, "losetup: no free loop device"));
        assert!(
            loop_attach_as(&r, Path::new("/x.raw"), false, false)
                .await
                .is_err()
        );
        assert_eq!(r.call_lines().len(), 2);
    }

    #[test]
    fn direct_io_only_on_local_disk_file_systems() {
        assert!(!direct_io_suits(Path::new("/nonexistent/x.raw")));
        // tmpfs: no disk below, nothing cached twice.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let f = tempfile::NamedTempFile::new_in(shm).unwrap();
            assert!(!direct_io_suits(f.path()));
        }
    }

    #[tokio::test]
    async fn read_only_bind_is_remounted() {
        let r = RecordingRunner::new();
        let spec = MountSpec {
            bind: true,
            read_only: true,
            ..MountSpec::default()
        };
        mount(&r, Path::new("/s"), Path::new("/t"), &spec)
            .await
            .unwrap();
        assert_eq!(
            r.call_lines(),
            vec!["mount -o bind /s /t", "mount -o bind,remount,ro /t"]
        );
    }
}
