//! End-to-end tests: `pct restore`, `pct create` and `pvesm extractconfig` on archives made
//! by GNU tar with vzdump's exact flags, restored onto real loop-mounted ext4 volumes.
//!
//! The restored tree is compared entry by entry with the source (types, modes, owners,
//! mtimes, contents, link targets, devices, `user.*`/`security.capability` xattrs, holes,
//! hard links, ACLs). What GNU tar with `--skip-old-files` also leaves alone is not compared:
//! the metadata of the root, of `etc` (created implicitly for `./etc/vzdump/pct.conf`, the
//! first member) and of mount-point roots; `lost+found`, the emptied `etc/vzdump` and bind
//! mount targets are extra.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vzkit_tests::{TestRoot, bin, is_root};

use crate::common;

const ROOT: &str = "needs root: loop devices, ext4 images, mounts, chown, mknod";
const DUMP: &str = "/var/lib/vz/dump";
const STAMP: &str = "2026_01_01-00_00_00";

/// vzdump's tar flags (pve-manager `PVE/VZDump/LXC.pm`, `archive`): `--totals`, the common
/// flags, then `--one-file-system --warning=no-file-ignored` once more.
fn vzdump_tar_flags() -> Vec<String> {
    let mut v = vec!["--totals".to_string()];
    v.extend(common::COMMON_TAR_FLAGS.iter().map(|s| s.to_string()));
    v.push("--one-file-system".into());
    v.push("--warning=no-file-ignored".into());
    v
}

/// Compression suffixes and the filter that makes them.
const COMPRESSIONS: &[(&str, Option<&[&str]>)] = &[
    ("tar", None),
    ("tar.gz", Some(&["gzip", "-c"])),
    ("tgz", Some(&["gzip", "-c"])),
    ("tar.lzo", Some(&["lzop", "-c"])),
    ("tar.zst", Some(&["zstd", "-q", "-c"])),
];

/// Writes a vzdump-layout archive: `./etc/vzdump/pct.conf`, `./etc/vzdump/pct.fw`, then
/// `./` of `src` and, appended as vzdump lists it as its own source, each of `mps` (their
/// contents are excluded from `./`, as `--one-file-system` does for separate mounts).
fn make_archive(src: &Path, conf: &str, fw: &str, mps: &[&str], out: &Path, ext: &str) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("etc/vzdump")).unwrap();
    std::fs::write(tmp.path().join("etc/vzdump/pct.conf"), conf).unwrap();
    std::fs::write(tmp.path().join("etc/vzdump/pct.fw"), fw).unwrap();
    let tar = tmp.path().join("a.tar");
    let mut c = Command::new("tar");
    c.arg("cpf").arg(&tar).args(vzdump_tar_flags());
    c.arg(format!("--directory={}", tmp.path().display()));
    c.args(["./etc/vzdump/pct.conf", "./etc/vzdump/pct.fw"]);
    c.arg(format!("--directory={}", src.display()));
    c.arg("--no-anchored").arg("--anchored");
    for mp in mps {
        c.arg(format!("--exclude=.{mp}/?*"));
    }
    c.arg("./");
    common::run(&mut c);
    for mp in mps {
        let mut c = Command::new("tar");
        c.arg("rpf").arg(&tar).args(vzdump_tar_flags());
        c.arg(format!("--directory={}", src.display()));
        c.arg(format!(".{mp}"));
        common::run(&mut c);
    }
    let raw = std::fs::read(&tar).unwrap();
    let filter = COMPRESSIONS.iter().find(|(e, _)| *e == ext).unwrap().1;
    let bytes = match filter {
        None => raw,
        Some(argv) => common::run_with_input(Command::new(argv[0]).args(&argv[1..]), &raw),
    };
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(out, bytes).unwrap();
}

fn archive_name(vmid: u32, ext: &str) -> String {
    format!("vzdump-lxc-{vmid}-{STAMP}.{ext}")
}

/// Places an archive in the `local` dump directory of `tr`; returns its volume id.
fn put_archive(tr: &TestRoot, src: &Path, conf: &str, mps: &[&str], ext: &str) -> String {
    let name = archive_name(100, ext);
    make_archive(
        src,
        conf,
        "[OPTIONS]\nenable: 1\n",
        mps,
        &tr.join(&format!("{DUMP}/{name}")),
        ext,
    );
    format!("local:backup/{name}")
}

/// The fixture tree, plus a mount point directory with contents.
fn fixture(scratch: &common::Scratch, unprivileged: bool) -> PathBuf {
    let src = scratch.subdir(if unprivileged { "src-unpriv" } else { "src" });
    common::build_fixture(&src);
    if unprivileged {
        // Devices cannot be made in a user namespace, and ids beyond the map cannot be
        // owned there: those cases have their own tests.
        for f in ["null", "blk", "owned-big-id"] {
            std::fs::remove_file(src.join(f)).unwrap();
        }
    }
    std::fs::create_dir_all(src.join("mnt/data/sub")).unwrap();
    std::fs::write(src.join("mnt/data/sub/file"), common::noise(70_000, 9)).unwrap();
    std::os::unix::fs::chown(src.join("mnt/data/sub"), Some(33), Some(33)).unwrap();
    // A dev/ entry that restores skip (`--exclude ./dev/*`), the directory itself stays.
    std::fs::create_dir_all(src.join("dev")).unwrap();
    std::fs::write(src.join("dev/skipped"), b"x").unwrap();
    common::whole_second_mtimes(&src);
    src
}

fn backup_conf(bind_src: &Path, unprivileged: bool) -> String {
    format!(
        "arch: amd64\nhostname: src100\nmemory: 256\nmp0: local:100/vm-100-disk-1.raw,mp=/mnt/data,backup=1,size=512M\nmp1: {},mp=/bindmnt\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=1G\nswap: 512\n{}",
        bind_src.display(),
        if unprivileged {
            "unprivileged: 1\n"
        } else {
            ""
        }
    )
}

/// Entries whose metadata is not compared, and extra entries allowed in the restore.
pub(crate) struct Skips {
    pub(crate) meta: Vec<&'static [u8]>,
    pub(crate) extra: Vec<&'static [u8]>,
}

fn skips(simple: bool) -> Skips {
    let mut meta: Vec<&'static [u8]> = vec![b"", b"etc"];
    let mut extra: Vec<&'static [u8]> = vec![b"lost+found", b"etc/vzdump", b"bindmnt"];
    if simple {
        // mp0's target and its parent exist (mounted) before extraction: kept as they are.
        meta.push(b"mnt");
        meta.push(b"mnt/data");
        extra.push(b"mnt/data/lost+found");
    }
    Skips { meta, extra }
}

fn under(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix || (path.starts_with(prefix) && path.get(prefix.len()) == Some(&b'/'))
}

/// `security.capability` as the host sees it after an id-shifted restore (v2 → v3 with the
/// namespace root id).
fn shifted_cap(v: &[u8], shift: u32) -> Vec<u8> {
    if shift == 0 || v.len() != 20 {
        return v.to_vec();
    }
    let magic = u32::from_le_bytes(v[..4].try_into().unwrap());
    let mut out = v.to_vec();
    out[..4].copy_from_slice(&((magic & 0x00ff_ffff) | 0x0300_0000).to_le_bytes());
    out.extend_from_slice(&shift.to_le_bytes());
    out
}

/// `getfacl -R -n` output split per file, with ids shifted by `shift`.
fn acl_blocks(text: &[u8], shift: u32) -> BTreeMap<String, Vec<String>> {
    let text = String::from_utf8_lossy(text);
    let mut out = BTreeMap::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut lines = block.lines();
        let Some(file) = lines.next().and_then(|l| l.strip_prefix("# file: ")) else {
            continue;
        };
        let file = file.trim_start_matches("./").to_string();
        let shifted = lines
            .map(|l| {
                let add = |n: &str| (n.parse::<u64>().unwrap() + u64::from(shift)).to_string();
                if let Some(n) = l.strip_prefix("# owner: ") {
                    return format!("# owner: {}", add(n));
                }
                if let Some(n) = l.strip_prefix("# group: ") {
                    return format!("# group: {}", add(n));
                }
                let parts: Vec<&str> = l.split(':').collect();
                let (pre, rest) = if parts.first() == Some(&"default") {
                    ("default:", &parts[1..])
                } else {
                    ("", &parts[..])
                };
                if rest.len() == 3
                    && (rest[0] == "user" || rest[0] == "group")
                    && !rest[1].is_empty()
                {
                    return format!("{pre}{}:{}:{}", rest[0], add(rest[1]), rest[2]);
                }
                l.to_string()
            })
            .collect();
        out.insert(file, shifted);
    }
    out
}

/// Compares the restored tree `dst` with `src`, ids shifted by `shift`.
pub(crate) fn compare_trees(src: &Path, dst: &Path, shift: u32, sk: &Skips) {
    compare_trees_with(src, dst, shift, sk, false);
}

/// As [`compare_trees`]; with `ignore_holes` whether a file has holes is not compared (a
/// source on zfs-fuse, whose block accounting makes dense files look sparse, so that the
/// archive stores their zero runs as holes). Content is always compared.
pub(crate) fn compare_trees_with(
    src: &Path,
    dst: &Path,
    shift: u32,
    sk: &Skips,
    ignore_holes: bool,
) {
    let (ms, acl_s) = common::snapshot(src);
    let (md, acl_d) = common::snapshot(dst);
    let mut diffs = Vec::new();
    for (k, want) in &ms {
        if under(k, b"dev") && k.as_slice() != b"dev" {
            if md.contains_key(k) {
                diffs.push(format!(
                    "{} restored despite --exclude ./dev/*",
                    k.escape_ascii()
                ));
            }
            continue;
        }
        let Some(got) = md.get(k) else {
            diffs.push(format!("missing: {}", k.escape_ascii()));
            continue;
        };
        if sk.meta.contains(&k.as_slice()) {
            continue;
        }
        let mut want = want.clone();
        if ignore_holes {
            want.sparse_blocks = got.sparse_blocks;
        }
        want.uid += shift;
        want.gid += shift;
        for (name, v) in &mut want.xattrs {
            if name == b"security.capability" {
                *v = shifted_cap(v, shift);
            }
        }
        if &want != got {
            diffs.push(format!(
                "{}:\n  want {want:?}\n  got  {got:?}",
                k.escape_ascii()
            ));
        }
    }
    for k in md.keys() {
        if !ms.contains_key(k) && !sk.extra.iter().any(|p| under(k, p)) {
            diffs.push(format!("extra: {}", k.escape_ascii()));
        }
    }
    let want_acl = acl_blocks(&acl_s, shift);
    let got_acl = acl_blocks(&acl_d, 0);
    for (file, lines) in &want_acl {
        let skip = sk
            .meta
            .iter()
            .any(|m| file.as_bytes() == *m || (m.is_empty() && file == "."))
            || (file.starts_with("dev/"));
        if skip {
            continue;
        }
        if got_acl.get(file) != Some(lines) {
            diffs.push(format!(
                "ACL of {file}:\n  want {lines:?}\n  got  {:?}",
                got_acl.get(file)
            ));
        }
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// Mounts the CT with `pct mount`, compares, unmounts.
fn check_restored_tree(tr: &TestRoot, vmid: u32, src: &Path, shift: u32, simple: bool) {
    let root = tr.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
    tr.with_mounted(&[&vmid.to_string()], || {
        compare_trees(src, &root, shift, &skips(simple));
    });
}

/// Nothing of `vmid` is left: no config, no volumes, no mounts, no firewall file.
fn assert_no_trace(tr: &TestRoot, vmid: u32) {
    assert!(
        !tr.join(&format!("/etc/pve/lxc/{vmid}.conf")).exists(),
        "config left"
    );
    let images = tr.join(&format!("/var/lib/vz/images/{vmid}"));
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "volumes left: {left:?}");
    assert!(tr.mounts().is_empty(), "mounts left: {:?}", tr.mounts());
    assert!(!tr.join(&format!("/etc/pve/firewall/{vmid}.fw")).exists());
    assert!(!tr.join(&format!("/var/lib/lxc/{vmid}")).exists());
}

/// The files (not directories) below the root with their contents: what a failed restore
/// must leave as it was. (Empty storage and config directories are created on first use,
/// as PVE's storage activation does.)
fn files_state(tr: &TestRoot) -> Vec<(PathBuf, Vec<u8>)> {
    let mut s = tr.snapshot_files();
    s.retain(|(p, _)| !tr.path().join(p).is_dir());
    s
}

fn conf_of(tr: &TestRoot, vmid: u32) -> String {
    tr.read(&format!("/etc/pve/lxc/{vmid}.conf"))
}

/// What a restore of container 100 (rootfs and a mount point at /mnt/data, both ext4
/// volumes) may differ in from the source: each new file system has its own lost+found,
/// and etc/vzdump is emptied by the restore.
pub(crate) fn mp_skips() -> Skips {
    Skips {
        meta: vec![
            b"",
            b"etc",
            b"mnt",
            b"mnt/data",
            b"lost+found",
            b"mnt/data/lost+found",
        ],
        extra: vec![b"etc/vzdump"],
    }
}

/// Give container 100 (its config written) a 256 MiB rootfs and a 128 MiB `backup=1` mount
/// point at /mnt/data on `local`, holding the common fixture (without device nodes and ids
/// beyond an unprivileged map) and a file in the mount point; `extra` runs on the mounted
/// tree before it is unmounted. The rootfs path (valid while mounted).
pub(crate) fn fixture_ct_100(tr: &TestRoot, extra: impl FnOnce(&Path)) -> PathBuf {
    tr.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.25",
            "--mp0",
            "local:0.125,mp=/mnt/data,backup=1",
        ],
    );
    tr.ok("pct", &["mount", "100"]);
    let src = tr.join("/var/lib/lxc/100/rootfs");
    common::build_fixture(&src);
    // Devices cannot be made in a user namespace, and ids beyond the map cannot be owned
    // there: the GNU tar matrix and the hostile corpus cover those.
    for f in ["null", "blk", "owned-big-id"] {
        std::fs::remove_file(src.join(f)).unwrap();
    }
    std::fs::create_dir_all(src.join("mnt/data/sub")).unwrap();
    std::fs::write(src.join("mnt/data/sub/file"), common::noise(70_000, 9)).unwrap();
    extra(&src);
    tr.ok("pct", &["unmount", "100"]);
    src
}

/// Archives written by vzkit's own `vzdump`, in every compression, restored with `pct restore`
/// privileged and unprivileged (ids shifted by 100000), compare entry by entry with the
/// backed-up container's tree (rootfs plus the `backup=1` mount point).
#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn restore_matrix_vzkit_archives() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    tr.write(
        "/etc/pve/lxc/100.conf",
        "arch: amd64\nhostname: src100\nmemory: 256\nostype: debian\n",
    );
    let src = fixture_ct_100(&tr, |src| {
        std::os::unix::fs::chown(src.join("mnt/data/sub"), Some(33), Some(33)).unwrap();
    });
    for compress in ["0", "lzo", "gzip", "zstd"] {
        tr.ok(
            "vzdump",
            &["100", "--compress", compress, "--storage", "local"],
        );
    }
    let mut archives: Vec<String> = std::fs::read_dir(tr.join(DUMP))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tar"))
        .filter(|n| !n.ends_with(".blake3") && !n.ends_with(".log") && !n.ends_with(".notes"))
        .collect();
    archives.sort();
    assert_eq!(archives.len(), 4, "{archives:?}");
    let sk = mp_skips();
    tr.ok("pct", &["mount", "100"]);
    let mut vmid = 400;
    for name in &archives {
        for unprivileged in [false, true] {
            vmid += 1;
            let id = vmid.to_string();
            let volid = format!("local:backup/{name}");
            let mut args = vec!["restore", id.as_str(), volid.as_str(), "--storage", "local"];
            if unprivileged {
                args.extend(["--unprivileged", "1"]);
            }
            tr.ok("pct", &args);
            tr.ok("pct", &["mount", &id]);
            let root = tr.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
            let shift = if unprivileged { 100_000 } else { 0 };
            let res = std::panic::catch_unwind(|| compare_trees(&src, &root, shift, &sk));
            tr.ok("pct", &["unmount", &id]);
            if let Err(p) = res {
                tr.ok("pct", &["unmount", "100"]);
                eprintln!("archive {name}, unprivileged {unprivileged}");
                std::panic::resume_unwind(p);
            }
        }
    }
    tr.ok("pct", &["unmount", "100"]);
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn restore_matrix_gnu_tar_archives() {
    assert!(is_root(), "{ROOT}");
    let scratch = common::Scratch::new();
    for unprivileged in [false, true] {
        let src = fixture(&scratch, unprivileged);
        let shift = if unprivileged { 100_000 } else { 0 };
        let mut vmid = if unprivileged { 300 } else { 200 };
        for (ext, _) in COMPRESSIONS {
            let tr = TestRoot::new();
            let bind = tr.join("/srv/host-only");
            std::fs::create_dir_all(&bind).unwrap();
            let conf = backup_conf(&bind, unprivileged);
            let volid = put_archive(&tr, &src, &conf, &["/mnt/data"], ext);
            // Simple mode: the backed-up layout comes back.
            vmid += 1;
            let id = vmid.to_string();
            let out = tr.ok("pct", &["restore", &id, &volid]);
            assert!(
                out.contains("merging backed-up and given configuration.."),
                "{out}"
            );
            let mut want = format!(
                "arch: amd64\nhostname: src100\nmemory: 256\nmp0: local:{id}/vm-{id}-disk-1.raw,mp=/mnt/data,backup=1,size=512M\nmp1: {},mp=/bindmnt\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth\nostype: debian\nrootfs: local:{id}/vm-{id}-disk-0.raw,size=1G\nswap: 512\n",
                bind.display()
            );
            if unprivileged {
                want.push_str("unprivileged: 1\n");
            }
            assert_eq!(conf_of(&tr, vmid), want, "{ext}");
            assert_eq!(
                tr.read(&format!("/etc/pve/firewall/{id}.fw")),
                "[OPTIONS]\nenable: 1\n"
            );
            check_restored_tree(&tr, vmid, &src, shift, true);
            // Advanced mode: one rootfs holds everything, options from the command line win.
            vmid += 1;
            let id = vmid.to_string();
            let mut args = vec![
                "restore",
                &id,
                &volid,
                "--rootfs",
                "local:1",
                "--hostname",
                "adv",
            ];
            if unprivileged {
                args.extend(["--unprivileged", "1"]);
            }
            tr.ok("pct", &args);
            let c = conf_of(&tr, vmid);
            assert!(c.contains("hostname: adv\n"), "{c}");
            assert!(
                c.contains(&format!("rootfs: local:{id}/vm-{id}-disk-0.raw,size=1G\n")),
                "{c}"
            );
            assert!(!c.contains("mp0") && !c.contains("mp1"), "{c}");
            assert_eq!(c.contains("unprivileged: 1"), unprivileged, "{c}");
            check_restored_tree(&tr, vmid, &src, shift, false);
        }
    }
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn unmappable_entries_fail_unless_ignored() {
    assert!(is_root(), "{ROOT}");
    let scratch = common::Scratch::new();
    let src = fixture(&scratch, false);
    let tr = TestRoot::new();
    let conf = "arch: amd64\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=1G\nunprivileged: 1\n";
    let volid = put_archive(&tr, &src, conf, &[], "tar.zst");
    let before = files_state(&tr);
    let err = tr.fails("pct", &["restore", "150", &volid]);
    assert!(err.contains("unable to restore CT 150 - "), "{err}");
    assert!(
        err.contains("is not mapped") || err.contains("device nodes"),
        "{err}"
    );
    assert_no_trace(&tr, 150);
    assert_eq!(files_state(&tr), before);
    // With --ignore-unpack-errors the rest is restored and the skipped entries reported.
    let out = tr.run(
        "pct",
        &["restore", "150", &volid, "--ignore-unpack-errors", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("owned-big-id") && err.contains("is not mapped"),
        "{err}"
    );
    assert!(
        err.contains("./null") && err.contains("device nodes are not allowed"),
        "{err}"
    );
    assert!(err.contains("unpack error(s) ignored"), "{err}");
    tr.ok("pct", &["mount", "150"]);
    let root = tr.join("/var/lib/lxc/150/rootfs");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(root.join("owned-1234")).unwrap();
    assert_eq!((md.uid(), md.gid()), (101_234, 105_678));
    // What tar in the user namespace would leave: the entry, owned by the container's root.
    let md = std::fs::metadata(root.join("owned-big-id")).unwrap();
    assert_eq!((md.uid(), md.gid()), (100_000, 100_000));
    assert!(!root.join("null").exists());
    tr.ok("pct", &["unmount", "150"]);
}

/// A tar stream built byte by byte (ustar headers), for hostile members.
struct Raw(Vec<u8>);

impl Raw {
    fn header(name: &str, typeflag: u8, size: usize, link: &str, mode: u32) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let oct = |h: &mut [u8], off: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[off..off + len].copy_from_slice(s.as_bytes());
        };
        oct(&mut h, 100, 8, u64::from(mode));
        oct(&mut h, 108, 8, 0);
        oct(&mut h, 116, 8, 0);
        oct(&mut h, 124, 12, size as u64);
        oct(&mut h, 136, 12, 1_700_000_000);
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }
    fn new(conf: &str) -> Raw {
        Raw(Vec::new())
            .file("./etc/vzdump/pct.conf", conf.as_bytes())
            .dir("./")
    }
    fn file(mut self, name: &str, data: &[u8]) -> Raw {
        self.0
            .extend_from_slice(&Self::header(name, b'0', data.len(), "", 0o644));
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }
    fn dir(mut self, name: &str) -> Raw {
        self.0
            .extend_from_slice(&Self::header(name, b'5', 0, "", 0o755));
        self
    }
    fn link(mut self, name: &str, flag: u8, target: &str) -> Raw {
        self.0
            .extend_from_slice(&Self::header(name, flag, 0, target, 0o777));
        self
    }
    fn chardev(mut self, name: &str) -> Raw {
        let mut h = Self::header(name, b'3', 0, "", 0o666);
        // devmajor 1, devminor 3, then the checksum again.
        h[329..337].copy_from_slice(b"0000001\0");
        h[337..345].copy_from_slice(b"0000003\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.0.extend_from_slice(&h);
        self
    }
    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn hostile_archives_leave_the_host_untouched() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"keep").unwrap();
    let out = outside.path().display().to_string();
    let conf = "arch: amd64\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n";
    let good = Raw::new(conf).file("./ok", b"fine").end();
    let truncated_zst = {
        let full = Raw::new(conf)
            .file("./big", &common::noise(200_000, 3))
            .end();
        let z = common::run_with_input(Command::new("zstd").args(["-q", "-c"]), &full);
        z[..z.len() / 2].to_vec()
    };
    let mut corrupt = good.clone();
    corrupt[1024 + 512 + 148] ^= 0x55; // checksum of the member after "./"
    let cases: Vec<(&str, Vec<u8>, &str, &[&str])> = vec![
        (
            "dotdot",
            Raw::new(conf).file("./../escape", b"x").end(),
            "'..'",
            &[],
        ),
        (
            "dotdot-deep",
            Raw::new(conf)
                .file(&format!("./a/../../..{out}/dd"), b"x")
                .end(),
            "'..'",
            &[],
        ),
        (
            "absolute",
            Raw::new(conf).file(&format!("{out}/abs"), b"x").end(),
            "absolute",
            &[],
        ),
        (
            "symlink-escape",
            Raw::new(conf)
                .link("./evil", b'2', &out)
                .file("./evil/through-link", b"x")
                .end(),
            "symbolic link",
            &[],
        ),
        (
            "hardlink-escape",
            Raw::new(conf)
                .link("./hl", b'1', &format!("{out}/secret"))
                .end(),
            "hard link target",
            &[],
        ),
        (
            "hardlink-dotdot",
            Raw::new(conf).link("./hl", b'1', "../../secret").end(),
            "hard link target",
            &[],
        ),
        (
            "symlink-replaces-dir",
            Raw::new(conf)
                .link("./d", b'2', &out)
                .dir("./d/")
                .file("./d/x", b"x")
                .end(),
            "symbolic link",
            &[],
        ),
        (
            "device-unprivileged",
            Raw::new(conf).chardev("./dev2/null").end(),
            "device nodes are not allowed",
            &["--unprivileged", "1"],
        ),
        (
            "truncated",
            good[..good.len() - 1024 - 300].to_vec(),
            "unexpected end of archive",
            &[],
        ),
        ("truncated-zstd", truncated_zst, "", &[]),
        ("corrupt-header", corrupt, "", &[]),
    ];
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    for (name, bytes, needle, extra) in &cases {
        let path = tr.join(&format!("{DUMP}/{}", archive_name(100, "tar")));
        let (path, volid) = if *name == "truncated-zstd" {
            let p = tr.join(&format!("{DUMP}/{}", archive_name(100, "tar.zst")));
            (p, format!("local:backup/{}", archive_name(100, "tar.zst")))
        } else {
            (path, format!("local:backup/{}", archive_name(100, "tar")))
        };
        std::fs::write(&path, bytes).unwrap();
        let snap = files_state(&tr);
        let mut args = vec!["restore", "120", volid.as_str()];
        args.extend(extra.iter());
        let err = tr.fails("pct", &args);
        assert!(err.contains("unable to restore CT 120 - "), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert_no_trace(&tr, 120);
        assert_eq!(files_state(&tr), snap, "{name}: root changed");
        let mut names: Vec<_> = std::fs::read_dir(outside.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["secret"], "{name}: outside changed");
        assert_eq!(std::fs::read(&secret).unwrap(), b"keep", "{name}");
        std::fs::remove_file(&path).unwrap();
    }
    // Member-level refusals are reported, not fatal, with --ignore-unpack-errors; the host
    // stays untouched all the same.
    let path = tr.join(&format!("{DUMP}/{}", archive_name(100, "tar")));
    let hostile = Raw::new(conf)
        .link("./evil", b'2', &out)
        .file("./evil/x", b"x")
        .link("./hl", b'1', &format!("{out}/secret"))
        .file(&format!("{out}/abs"), b"x")
        .file("./fine", b"ok")
        .end();
    std::fs::write(&path, hostile).unwrap();
    let volid = format!("local:backup/{}", archive_name(100, "tar"));
    let o = tr.run(
        "pct",
        &["restore", "121", &volid, "--ignore-unpack-errors", "1"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("3 unpack error(s) ignored"), "{err}");
    assert_eq!(std::fs::read(&secret).unwrap(), b"keep");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    tr.ok("pct", &["mount", "121"]);
    let root = tr.join("/var/lib/lxc/121/rootfs");
    assert_eq!(std::fs::read(root.join("fine")).unwrap(), b"ok");
    assert!(
        std::fs::symlink_metadata(root.join("evil"))
            .unwrap()
            .is_symlink()
    );
    tr.ok("pct", &["unmount", "121"]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn force_keeps_the_old_container_when_the_new_restore_fails() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    let conf = "arch: amd64\nhostname: first\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n";
    let good = Raw::new(conf).file("./marker", b"old data").end();
    let name = archive_name(100, "tar");
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    std::fs::write(tr.join(&format!("{DUMP}/{name}")), &good).unwrap();
    let volid = format!("local:backup/{name}");
    tr.ok("pct", &["restore", "130", &volid]);
    let old_conf = conf_of(&tr, 130);
    let old_image = std::fs::read(tr.join("/var/lib/vz/images/130/vm-130-disk-0.raw")).unwrap();

    // Refused without --force: nothing changes.
    let snap = files_state(&tr);
    let err = tr.fails("pct", &["restore", "130", &volid]);
    assert!(err.contains("CT 130 already exists"), "{err}");
    assert_eq!(files_state(&tr), snap);

    // A failing forced restore keeps the old CT: config, volume and content.
    let bad_name = archive_name(100, "tar.zst");
    let bad =
        Raw::new("arch: amd64\nhostname: second\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n")
            .file("./../escape", b"x")
            .end();
    let bad_z = common::run_with_input(Command::new("zstd").args(["-q", "-c"]), &bad);
    std::fs::write(tr.join(&format!("{DUMP}/{bad_name}")), bad_z).unwrap();
    let err = tr.fails(
        "pct",
        &[
            "restore",
            "130",
            &format!("local:backup/{bad_name}"),
            "--force",
            "1",
        ],
    );
    assert!(err.contains("unable to restore CT 130 - "), "{err}");
    assert_eq!(conf_of(&tr, 130), old_conf);
    let mut now = files_state(&tr);
    now.retain(|(p, _)| !p.ends_with(&bad_name));
    assert_eq!(now, snap);
    assert_eq!(
        std::fs::read(tr.join("/var/lib/vz/images/130/vm-130-disk-0.raw")).unwrap(),
        old_image
    );
    assert!(tr.mounts().is_empty());

    // A locked CT is refused even with --force.
    tr.ok("pct", &["set", "130", "--lock", "backup"]);
    let err = tr.fails("pct", &["restore", "130", &volid, "--force", "1"]);
    assert!(err.contains("CT is locked (backup)"), "{err}");
    tr.ok("pct", &["unlock", "130"]);
    // Protection is honoured.
    tr.ok("pct", &["set", "130", "--protection", "1"]);
    let err = tr.fails("pct", &["restore", "130", &volid, "--force", "1"]);
    assert!(err.contains("protection mode enabled"), "{err}");
    tr.ok("pct", &["set", "130", "--protection", "0"]);

    // A successful forced restore replaces the CT and only then frees the old volume.
    let new = Raw::new("arch: amd64\nhostname: second\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n")
        .file("./marker", b"new data")
        .end();
    std::fs::write(tr.join(&format!("{DUMP}/{name}")), &new).unwrap();
    tr.ok("pct", &["restore", "130", &volid, "--force", "1"]);
    let c = conf_of(&tr, 130);
    assert!(c.contains("hostname: second\n"), "{c}");
    assert!(
        c.contains("rootfs: local:130/vm-130-disk-1.raw,size=64M\n"),
        "{c}"
    );
    assert!(!c.contains("lock"), "{c}");
    assert!(!tr.join("/var/lib/vz/images/130/vm-130-disk-0.raw").exists());
    tr.ok("pct", &["mount", "130"]);
    assert_eq!(
        std::fs::read(tr.join("/var/lib/lxc/130/rootfs/marker")).unwrap(),
        b"new data"
    );
    tr.ok("pct", &["unmount", "130"]);
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn refusals_change_nothing() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    tr.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: local\n\tpath {}\n\tcontent backup,rootdir,images,vztmpl\n\ndir: isos\n\tpath {}\n\tcontent iso\n",
            tr.join("/var/lib/vz").display(),
            tr.join("/isos").display()
        ),
    );
    let conf = "arch: amd64\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n";
    let name = archive_name(100, "tar");
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    std::fs::write(
        tr.join(&format!("{DUMP}/{name}")),
        Raw::new(conf).file("./x", b"x").end(),
    )
    .unwrap();
    let volid = format!("local:backup/{name}");
    let noconf = archive_name(101, "tar");
    std::fs::write(
        tr.join(&format!("{DUMP}/{noconf}")),
        Raw(Vec::new()).dir("./").file("./x", b"x").end(),
    )
    .unwrap();
    let noconf_volid = format!("local:backup/{noconf}");
    let before = tr.snapshot_files();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["140", "-"],
            "restore from pipe requires rootfs parameter",
        ),
        (
            vec!["140", &volid, "--mp0", "local:1,mp=/a"],
            "mount points configured, but 'rootfs' not set - aborting",
        ),
        (
            vec!["140", &volid, "--storage", "isos"],
            "storage 'isos' does not support container directories",
        ),
        (
            vec!["140", &volid, "--storage", "nope"],
            "storage 'nope' does not exist",
        ),
        (
            vec!["140", "/nonexistent/x.tar"],
            "can't find file '/nonexistent/x.tar'",
        ),
        (
            vec!["140", &noconf_volid],
            "archive contains no configuration file",
        ),
        (vec!["140", &volid, "--start", "1"], "not supported yet"),
        (vec!["140", &volid, "--memory", "lots"], "memory"),
        (
            vec!["140", &volid, "--rootfs", "/nonexistent-dir"],
            "is not a directory",
        ),
    ];
    for (args, needle) in cases {
        let mut a = vec!["restore"];
        a.extend(args.iter().copied());
        let err = tr.fails("pct", &a);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(tr.snapshot_files(), before, "{args:?} changed the root");
        assert!(tr.mounts().is_empty());
    }
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn restore_from_stdin_and_bwlimit() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    let conf = "arch: amd64\nhostname: piped\nmemory: 128\nostype: alpine\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n";
    let data = common::noise(300 * 1024, 5);
    let raw = Raw::new(conf).file("./data", &data).end();
    let gz = common::run_with_input(Command::new("gzip").arg("-c"), &raw);
    let mut child = Command::new(bin("pct"))
        .args([
            "restore",
            "160",
            "-",
            "--rootfs",
            "local:0.1",
            "--bwlimit",
            "512",
        ])
        .env("VZKIT_ROOT", tr.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&gz));
    // While the (throttled) restore runs, the config carries `lock: create`.
    let conf_path = tr.join("/etc/pve/lxc/160.conf");
    let mut seen_lock = false;
    while start.elapsed() < std::time::Duration::from_secs(5) {
        if std::fs::read_to_string(&conf_path).is_ok_and(|c| c == "lock: create\n") {
            seen_lock = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(seen_lock, "no 'lock: create' config during the restore");
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    let took = start.elapsed();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("extracting archive from STDIN"), "{so}");
    // About 300 KiB of (incompressible) data at 512 KiB/s.
    assert!(took >= std::time::Duration::from_millis(450), "{took:?}");
    let c = conf_of(&tr, 160);
    assert!(
        c.contains("hostname: piped\n") && c.contains("ostype: alpine\n"),
        "{c}"
    );
    assert!(
        c.contains("rootfs: local:160/vm-160-disk-0.raw,size=102M\n"),
        "{c}"
    );
    tr.ok("pct", &["mount", "160"]);
    assert_eq!(
        std::fs::read(tr.join("/var/lib/lxc/160/rootfs/data")).unwrap(),
        data
    );
    assert!(
        !tr.join("/var/lib/lxc/160/rootfs/etc/vzdump/pct.conf")
            .exists()
    );
    tr.ok("pct", &["unmount", "160"]);
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn templates_and_unique_restore() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    let conf = "arch: amd64\nhostname: tmpl\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,type=veth\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\ntemplate: 1\n";
    let name = archive_name(100, "tar");
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    std::fs::write(
        tr.join(&format!("{DUMP}/{name}")),
        Raw::new(conf).file("./x", b"x").end(),
    )
    .unwrap();
    let volid = format!("local:backup/{name}");
    let out = tr.ok("pct", &["restore", "170", &volid, "--unique", "1"]);
    assert!(
        out.contains("Convert restored container to template..."),
        "{out}"
    );
    let c = conf_of(&tr, 170);
    assert!(
        c.contains("rootfs: local:170/base-170-disk-0.raw,size=64M\n"),
        "{c}"
    );
    assert!(c.contains("template: 1\n"), "{c}");
    assert!(
        !c.contains("BC:24:11:00:00:01"),
        "--unique keeps the old MAC: {c}"
    );
    assert!(c.contains("hwaddr=BC:24:11:"), "{c}");
    assert!(
        tr.join("/var/lib/vz/images/170/base-170-disk-0.raw")
            .exists()
    );
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn extractconfig_is_byte_exact() {
    assert!(is_root(), "{ROOT}");
    let scratch = common::Scratch::new();
    let src = scratch.subdir("src");
    std::fs::write(src.join("f"), b"x").unwrap();
    let tr = TestRoot::new();
    // Descriptions, lxc keys and a missing final newline, as written by hand.
    let conf = "#my %C3%A9 container\n#second line\narch: amd64\nhostname: x\nlxc.idmap: u 0 100000 65536\nrootfs: local:100/vm-100-disk-0.raw,size=1G";
    for (ext, _) in COMPRESSIONS {
        let volid = put_archive(&tr, &src, conf, &[], ext);
        let out = tr.run("pvesm", &["extractconfig", &volid]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, format!("{conf}\n\n").as_bytes(), "{ext}");
        let path = tr.join(&format!("{DUMP}/{}", archive_name(100, ext)));
        let by_path = tr.ok("pvesm", &["extractconfig", &path.display().to_string()]);
        assert_eq!(by_path.as_bytes(), format!("{conf}\n\n").as_bytes());
    }
    // Errors.
    let err = tr.fails(
        "pvesm",
        &[
            "extractconfig",
            "/nonexistent/vzdump-lxc-100-2026_01_01-00_00_00.tar",
        ],
    );
    assert!(err.contains("can't find file '/nonexistent/"), "{err}");
    let odd = tr.join("/var/lib/vz/dump/backup.tar");
    std::fs::write(&odd, b"").unwrap();
    let err = tr.fails("pvesm", &["extractconfig", &odd.display().to_string()]);
    assert!(
        err.contains("ERROR: couldn't determine archive info from"),
        "{err}"
    );
    let nocfg = archive_name(101, "tar");
    std::fs::write(
        tr.join(&format!("{DUMP}/{nocfg}")),
        Raw(Vec::new()).dir("./").file("./x", b"x").end(),
    )
    .unwrap();
    let err = tr.fails(
        "pvesm",
        &["extractconfig", &format!("local:backup/{nocfg}")],
    );
    assert_eq!(
        err.trim_end(),
        "ERROR: archive contains no configuration file"
    );
}

/// Only a prefix of the archive is read: a config followed by garbage still extracts.
#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn extractconfig_reads_only_as_far_as_needed() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    let mut bytes = Raw(Vec::new())
        .file("./etc/vzdump/pct.conf", b"arch: amd64\n")
        .0;
    bytes.extend(std::iter::repeat_n(0xAAu8, 4 << 20));
    let name = archive_name(100, "tar");
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    std::fs::write(tr.join(&format!("{DUMP}/{name}")), bytes).unwrap();
    let out = tr.ok("pvesm", &["extractconfig", &format!("local:backup/{name}")]);
    assert_eq!(out, "arch: amd64\n\n");
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn create_from_template_detects_ostype() {
    assert!(is_root(), "{ROOT}");
    let scratch = common::Scratch::new();
    let tr = TestRoot::new();
    let cache = tr.join("/var/lib/vz/template/cache");
    std::fs::create_dir_all(&cache).unwrap();
    for (name, file, ostype) in [
        ("deb.tar.gz", "debian_version", Some("debian")),
        ("alp.tar.zst", "alpine-release", Some("alpine")),
        ("none.tar.gz", "hostname", None),
    ] {
        let src = scratch.subdir(name);
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc").join(file), b"1\n").unwrap();
        if ostype == Some("debian") {
            std::fs::write(src.join("etc/shadow"), b"root:*:19000:0:99999:7:::\n").unwrap();
            std::fs::write(src.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
            std::fs::create_dir_all(src.join("root")).unwrap();
        }
        std::fs::create_dir_all(src.join("usr/bin")).unwrap();
        std::fs::write(src.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        let mut c = Command::new("tar");
        c.arg("cpf")
            .arg(cache.join(name))
            .args(common::COMMON_TAR_FLAGS);
        c.arg(if name.ends_with("zst") {
            "--zstd"
        } else {
            "-z"
        });
        c.arg("-C").arg(&src).arg(".");
        common::run(&mut c);
        let vmid = match ostype {
            Some("debian") => "180",
            Some(_) => "181",
            None => "182",
        };
        let tmpl = format!("local:vztmpl/{name}");
        match ostype {
            Some(t) => {
                let keys = scratch.path().join("keys.pub");
                std::fs::write(
                    &keys,
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIvzkit test@vzkit\n",
                )
                .unwrap();
                let mut args = vec![
                    "create",
                    vmid,
                    &tmpl,
                    "--rootfs",
                    "local:0.1",
                    "--hostname",
                    "c1",
                ];
                if t == "debian" {
                    args.extend([
                        "--password",
                        "s3cret",
                        "--ssh-public-keys",
                        keys.to_str().unwrap(),
                    ]);
                }
                tr.ok("pct", &args);
                let c = conf_of(&tr, vmid.parse().unwrap());
                assert!(c.contains(&format!("ostype: {t}\n")), "{c}");
                assert!(
                    c.contains("hostname: c1\n") && c.contains("memory: 512\n"),
                    "{c}"
                );
                tr.ok("pct", &["mount", vmid]);
                let root = tr.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
                // Create-time guest setup (PVE's post_create_hook) wrote these.
                let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
                let (hostname, hosts) = (read("etc/hostname"), read("etc/hosts"));
                let (shadow, keys) = (read("etc/shadow"), read("root/.ssh/authorized_keys"));
                let sk = Skips {
                    meta: vec![b"", b"etc", b"etc/passwd", b"etc/shadow", b"root"],
                    extra: vec![
                        b"lost+found",
                        b"etc/hostname",
                        b"etc/hosts",
                        b"etc/network",
                        b"etc/network/interfaces",
                        b"etc/resolv.conf",
                        b"root/.ssh",
                        b"root/.ssh/authorized_keys",
                    ],
                };
                let res = std::panic::catch_unwind(|| {
                    assert_eq!(hostname, "c1\n");
                    assert!(
                        hosts.contains(" c1\n") || hosts.contains("\tc1\n"),
                        "{hosts}"
                    );
                    if t == "debian" {
                        // The password is stored hashed (SHA-256 crypt), never in clear.
                        assert!(shadow.starts_with("root:$5$"), "{shadow}");
                        assert!(!shadow.contains("s3cret"), "{shadow}");
                        assert!(keys.contains("test@vzkit"), "{keys}");
                    }
                    compare_trees(&src, &root, 0, &sk);
                });
                tr.ok("pct", &["unmount", vmid]);
                if let Err(p) = res {
                    std::panic::resume_unwind(p);
                }
            }
            None => {
                let err = tr.fails("pct", &["create", vmid, &tmpl, "--rootfs", "local:0.1"]);
                assert!(
                    err.contains("unable to create CT 182 - unable to detect OS distribution"),
                    "{err}"
                );
                assert_no_trace(&tr, 182);
                // An explicit --ostype needs no detection.
                tr.ok(
                    "pct",
                    &[
                        "create",
                        vmid,
                        &tmpl,
                        "--rootfs",
                        "local:0.1",
                        "--ostype",
                        "unmanaged",
                    ],
                );
                assert!(conf_of(&tr, 182).contains("ostype: unmanaged\n"));
            }
        }
    }
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn advanced_mode_bare_size_bind_and_existing_volume() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    let conf = "arch: amd64\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\nmp0: local:100/vm-100-disk-1.raw,mp=/mnt/data,backup=1,size=64M\n";
    let name = archive_name(100, "tar");
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    std::fs::write(
        tr.join(&format!("{DUMP}/{name}")),
        Raw::new(conf)
            .file("./ok", b"from archive")
            .dir("./mnt/")
            .dir("./mnt/data/")
            .file("./mnt/data/file", b"data")
            .end(),
    )
    .unwrap();
    let volid = format!("local:backup/{name}");

    // A bare number is a size on --storage; a bind mount point receives its files.
    let host = tr.join("/srv/bind-target");
    std::fs::create_dir_all(&host).unwrap();
    let mp0 = format!("{},mp=/mnt/data", host.display());
    tr.ok(
        "pct",
        &["restore", "190", &volid, "--rootfs", "0.1", "--mp0", &mp0],
    );
    let c = conf_of(&tr, 190);
    assert!(
        c.contains("rootfs: local:190/vm-190-disk-0.raw,size=102M\n"),
        "{c}"
    );
    assert!(c.contains(&format!("mp0: {mp0}\n")), "{c}");
    assert_eq!(std::fs::read(host.join("file")).unwrap(), b"data");
    assert!(tr.mounts().is_empty());

    // An existing volume is used as it is: not allocated, not formatted, files kept.
    tr.ok(
        "pvesm",
        &[
            "alloc",
            "local",
            "191",
            "subvol-191-disk-7.subvol",
            "0",
            "--format",
            "subvol",
        ],
    );
    let vol = tr.join("/var/lib/vz/images/191/subvol-191-disk-7.subvol");
    std::fs::write(vol.join("ok"), b"already there").unwrap();
    tr.ok(
        "pct",
        &[
            "restore",
            "191",
            &volid,
            "--rootfs",
            "local:191/subvol-191-disk-7.subvol",
        ],
    );
    let c = conf_of(&tr, 191);
    assert!(
        c.contains("rootfs: local:191/subvol-191-disk-7.subvol\n"),
        "{c}"
    );
    assert_eq!(std::fs::read(vol.join("ok")).unwrap(), b"already there");
    assert_eq!(std::fs::read(vol.join("mnt/data/file")).unwrap(), b"data");
    let images: Vec<_> = std::fs::read_dir(tr.join("/var/lib/vz/images/191"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(images, ["subvol-191-disk-7.subvol"]);
    // The volume now belongs to CT 191: another restore may not take it.
    let err = tr.fails(
        "pct",
        &[
            "restore",
            "192",
            &volid,
            "--rootfs",
            "local:191/subvol-191-disk-7.subvol",
        ],
    );
    assert!(err.contains("already in use by CT 191"), "{err}");
    assert_no_trace(&tr, 192);
}

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown, mknod"]
fn storage_restore_bwlimit_applies_without_override() {
    assert!(is_root(), "{ROOT}");
    let tr = TestRoot::new();
    tr.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: local\n\tpath {}\n\tcontent backup,rootdir,images\n\tbwlimit restore=256\n",
            tr.join("/var/lib/vz").display()
        ),
    );
    let conf = "arch: amd64\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n";
    let name = archive_name(100, "tar");
    std::fs::create_dir_all(tr.join(DUMP)).unwrap();
    std::fs::write(
        tr.join(&format!("{DUMP}/{name}")),
        Raw::new(conf)
            .file("./x", &common::noise(768 * 1024, 7))
            .end(),
    )
    .unwrap();
    let volid = format!("local:backup/{name}");
    // About 770 KiB at the storage's 256 KiB/s: 3 s.
    let start = std::time::Instant::now();
    let out = tr.ok("pct", &["restore", "195", &volid]);
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(2900),
        "{took:?}: {out}"
    );
    // --bwlimit overrides it (root may).
    let start = std::time::Instant::now();
    tr.ok("pct", &["restore", "196", &volid, "--bwlimit", "100000"]);
    assert!(start.elapsed() < std::time::Duration::from_millis(2500));
}
