//! Test helpers shared by the archive tests (and reusable by other crates'
//! tests by `#[path]`): external-command runner, a scratch directory on a
//! file system with ACL and xattr support, a fixture tree with every kind
//! of member, and a whole-tree snapshot/compare.
//!
//! Needs root and the Debian packages `tar acl attr lzop zstd gzip`
//! (`apt-get install -y acl attr lzop zstd`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// PVE's `@COMMON_TAR_FLAGS` (pve-storage `PVE/Storage/Plugin.pm`).
pub const COMMON_TAR_FLAGS: &[&str] = &[
    "--one-file-system",
    "-p",
    "--sparse",
    "--numeric-owner",
    "--acls",
    "--xattrs",
    "--xattrs-include=user.*",
    "--xattrs-include=security.capability",
    "--warning=no-file-ignored",
    "--warning=no-xattr-write",
];

/// Run a command, panic with argv, status and stderr if it fails; return stdout.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Run a command with `input` on stdin; return stdout.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait");
    feeder.join().expect("feeder thread").expect("write stdin");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A temporary directory on a file system with POSIX ACLs and user xattrs:
/// a plain tempdir if it supports them, else a loop-mounted ext4 image that
/// is unmounted (and its loop device detached) on drop.
pub struct Scratch {
    dir: tempfile::TempDir,
    mounted: Option<PathBuf>,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("vzkit-archive-")
            .tempdir()
            .expect("tempdir");
        if supports_acl_and_xattr(dir.path()) {
            return Scratch { dir, mounted: None };
        }
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        run(Command::new("truncate").arg("-s").arg("256M").arg(&img));
        run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&img));
        run(Command::new("mount")
            .arg("-o")
            .arg("loop,acl,user_xattr")
            .arg(&img)
            .arg(&mnt));
        let s = Scratch {
            dir,
            mounted: Some(mnt.clone()),
        };
        assert!(
            supports_acl_and_xattr(&mnt),
            "loop-mounted ext4 lacks ACL/xattr support"
        );
        s
    }

    /// The usable directory.
    pub fn path(&self) -> &Path {
        self.mounted.as_deref().unwrap_or(self.dir.path())
    }

    /// A new empty subdirectory.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::create_dir(&p).expect("mkdir");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mnt) = &self.mounted {
            match Command::new("umount").arg("-d").arg(mnt).status() {
                Ok(s) if s.success() => {}
                other => eprintln!("warning: could not unmount {}: {other:?}", mnt.display()),
            }
        }
    }
}

fn supports_acl_and_xattr(dir: &Path) -> bool {
    let probe = dir.join(".probe");
    fs::write(&probe, b"").expect("write probe");
    let acl = Command::new("setfacl")
        .arg("-m")
        .arg("u:4242:r")
        .arg(&probe)
        .status();
    let xattr = Command::new("setfattr")
        .args(["-n", "user.probe", "-v", "1"])
        .arg(&probe)
        .status();
    fs::remove_file(&probe).expect("remove probe");
    matches!(acl, Ok(s) if s.success()) && matches!(xattr, Ok(s) if s.success())
}

/// A tmpfs mounted on `dir` for the guard's lifetime.
pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    pub fn new(dir: &Path) -> TmpfsMount {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(dir));
        TmpfsMount(dir.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        match Command::new("umount").arg(&self.0).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("warning: could not unmount {}: {other:?}", self.0.display()),
        }
    }
}

fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    // `touch -h` does not follow symlinks.
    let stamp = format!("@{secs}.{nsec:09}");
    run(Command::new("touch").arg("-h").arg("-d").arg(stamp).arg(p));
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("lchown");
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write_at(p: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .expect("open");
    f.write_all_at(data, offset).expect("write_at");
}

/// Pseudo-random bytes (xorshift), deterministic per seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A v2 `security.capability` value granting cap_net_bind_service (effective).
pub const CAP_V2_NET_BIND: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// Build a tree with every kind of member the archive code must preserve.
/// Must run as root (devices, chown, capabilities).
pub fn build_fixture(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for d in ["etc", "usr/bin", "var/tmp", "srv/acl", "deep"] {
        fs::create_dir_all(p(d)).expect("mkdir");
    }
    fs::write(p("etc/hostname"), b"ct100\n").unwrap();
    fs::write(p("empty"), b"").unwrap();
    fs::write(p("usr/bin/big"), noise(3 * 1024 * 1024 + 17, 1)).unwrap();
    fs::write(p("usr/bin/suid"), b"#!/bin/sh\n").unwrap();
    chmod(&p("usr/bin/suid"), 0o4755);
    fs::write(p("usr/bin/sgid"), b"x").unwrap();
    chmod(&p("usr/bin/sgid"), 0o2711);
    chmod(&p("var/tmp"), 0o1777);
    fs::write(p("etc/shadow"), b"root:*:1:0:99999:7:::\n").unwrap();
    chmod(&p("etc/shadow"), 0o640);
    chown(&p("etc/shadow"), 0, 42);
    fs::write(p("owned-1234"), b"a").unwrap();
    chown(&p("owned-1234"), 1234, 5678);
    fs::write(p("owned-big-id"), b"b").unwrap();
    chown(&p("owned-big-id"), 3_000_000, 2_500_000); // beyond ustar's 7 octal digits
    // Hard links: three names, one inode; and a hard-linked FIFO.
    fs::write(p("etc/hl-a"), b"shared\n").unwrap();
    fs::hard_link(p("etc/hl-a"), p("etc/hl-b")).unwrap();
    fs::hard_link(p("etc/hl-a"), p("usr/hl-c")).unwrap();
    // Symlinks: relative, absolute (dangling), long target.
    symlink("hostname", p("etc/link-rel")).unwrap();
    symlink("/nonexistent/target", p("etc/link-abs")).unwrap();
    symlink("t/".repeat(70), p("etc/link-long")).unwrap();
    chown(&p("etc/link-rel"), 1234, 1234);
    // Devices and FIFO.
    run(Command::new("mknod").arg(p("null")).args(["c", "1", "3"]));
    run(Command::new("mknod").arg(p("blk")).args(["b", "7", "200"]));
    run(Command::new("mkfifo").arg(p("fifo")));
    chmod(&p("fifo"), 0o620);
    // Sparse files: hole in the middle, trailing hole, leading hole, only hole.
    write_at(&p("sparse-mid"), 0, &noise(8192, 2));
    write_at(&p("sparse-mid"), 8 * 1024 * 1024, &noise(4096, 3));
    write_at(&p("sparse-trailing"), 0, &noise(4096, 4));
    fs::OpenOptions::new()
        .write(true)
        .open(p("sparse-trailing"))
        .unwrap()
        .set_len(5 * 1024 * 1024)
        .unwrap();
    write_at(&p("sparse-leading"), 1024 * 1024, &noise(100, 5));
    fs::File::create(p("sparse-empty"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Long names (> 100 and > 255 bytes in total), non-UTF-8 name.
    let long_dir = p(&format!("deep/{}", "d".repeat(120)));
    fs::create_dir_all(&long_dir).unwrap();
    fs::write(long_dir.join("f".repeat(200)), b"long").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"bin\xff\xfename")), b"latin1").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"deep/\xe9t\xe9")), b"x").unwrap();
    // ACLs (access + default) and xattrs (with newline and binary bytes).
    run(Command::new("setfacl")
        .args(["-m", "u:1234:rw,g:33:r"])
        .arg(p("srv/acl")));
    run(Command::new("setfacl")
        .args(["-d", "-m", "u:1234:rwx,g:33:rx"])
        .arg(p("srv/acl")));
    fs::write(p("srv/acl/file"), b"acl").unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:1234:rw-"])
        .arg(p("srv/acl/file")));
    run(Command::new("setfattr")
        .args(["-n", "user.comment", "-v", "line1\nline2"])
        .arg(p("srv/acl/file")));
    run(Command::new("setfattr")
        .args(["-n", "user.bin", "-v", "0x00ff0a3d"])
        .arg(p("etc/hostname")));
    run(Command::new("setfattr")
        .args(["-n", "user.dir", "-v", "yes"])
        .arg(p("srv")));
    run(Command::new("setfattr")
        .args(["-n", "trusted.not-archived", "-v", "1"])
        .arg(p("etc/hostname")));
    let caphex = format!(
        "0x{}",
        CAP_V2_NET_BIND
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    run(Command::new("setfattr")
        .args(["-n", "security.capability", "-v", &caphex])
        .arg(p("usr/bin/suid")));
    // Owners and mtimes (with nanoseconds, and an old one) last: writes above
    // change directory mtimes.
    chown(&p("srv"), 1000, 1000);
    let mut all = Vec::new();
    walk(root, &mut all);
    for (i, path) in all.iter().enumerate() {
        set_mtime(
            path,
            1_600_000_000 + i as i64 * 1000,
            (i as i64 * 7_919_117) % 1_000_000_000,
        );
    }
    set_mtime(&p("empty"), 100, 0);
    set_mtime(root, 1_650_000_000, 123_456_789);
}

/// Set every mtime in the tree (incl. the root) to whole seconds, for
/// formats without sub-second times (GNU format, ustar).
pub fn whole_second_mtimes(root: &Path) {
    let mut all = vec![root.to_path_buf()];
    walk(root, &mut all);
    for p in all {
        let md = fs::symlink_metadata(&p).unwrap();
        set_mtime(&p, md.mtime(), 0);
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        out.push(p.clone());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(&p, out);
        }
    }
    // children first, so directory mtimes set later stay.
    let n = out.len();
    out[..n].sort_by_key(|p| std::cmp::Reverse(p.components().count()));
}

/// What a tree comparison looks at, per path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub content: u64,
    pub link: Option<Vec<u8>>,
    pub rdev: u64,
    /// `user.*` and `security.capability`, sorted.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Allocated 512-byte blocks, for regular files with holes (else 0).
    pub sparse_blocks: u64,
    /// First (sorted) path of the same inode, for hard links.
    pub link_group: Option<Vec<u8>>,
}

/// Snapshot options.
#[derive(Debug, Clone, Copy)]
pub struct SnapOpts {
    /// Compare directory mtimes.
    pub dir_mtimes: bool,
}

/// Snapshot a tree: path (relative, bytes) → node; plus `getfacl -R` output.
pub fn snapshot(root: &Path) -> (BTreeMap<Vec<u8>, Node>, Vec<u8>) {
    let mut map = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    snap_dir(root, root, &mut map, &mut inodes);
    for node in map.values_mut() {
        if let Some(key) = node.link_group.take() {
            let ino = u64::from_le_bytes(key.try_into().unwrap());
            node.link_group = Some(inodes[&ino].clone());
        }
    }
    let acl = run(Command::new("getfacl")
        .args(["-R", "-P", "-n", "-p", "."])
        .current_dir(root));
    (map, acl)
}

fn snap_dir(
    root: &Path,
    dir: &Path,
    map: &mut BTreeMap<Vec<u8>, Node>,
    inodes: &mut BTreeMap<u64, Vec<u8>>,
) {
    let rel = dir
        .strip_prefix(root)
        .unwrap()
        .as_os_str()
        .as_bytes()
        .to_vec();
    map.insert(rel, node_of(dir, inodes, b""));
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let relp = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            snap_dir(root, &p, map, inodes);
        } else {
            let n = node_of(&p, inodes, &relp);
            map.insert(relp, n);
        }
    }
}

fn node_of(p: &Path, inodes: &mut BTreeMap<u64, Vec<u8>>, rel: &[u8]) -> Node {
    let md = fs::symlink_metadata(p).unwrap();
    let ft = md.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "other"
    };
    let content = if ft.is_file() {
        let mut h = DefaultHasher::new();
        h.write(&fs::read(p).unwrap());
        h.finish()
    } else {
        0
    };
    let link_group = if !ft.is_dir() && md.nlink() > 1 {
        let e = inodes.entry(md.ino()).or_insert_with(|| rel.to_vec());
        if rel < e.as_slice() {
            *e = rel.to_vec();
        }
        Some(md.ino().to_le_bytes().to_vec())
    } else {
        None
    };
    let mut xattrs = Vec::new();
    if !ft.is_symlink() {
        let mut buf = vec![0u8; 65536];
        // A file system without xattr support (zfs-fuse) has no xattrs to compare.
        let n = match rustix::fs::llistxattr(p, &mut buf[..]) {
            Err(rustix::io::Errno::NOTSUP) => 0,
            r => r.unwrap(),
        };
        for name in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
            if name.starts_with(b"user.") || name == b"security.capability" {
                let mut v = vec![0u8; 65536];
                let len = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
                v.truncate(len);
                xattrs.push((name.to_vec(), v));
            }
        }
        xattrs.sort();
    }
    Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        size: if ft.is_file() { md.len() } else { 0 },
        content,
        link: ft
            .is_symlink()
            .then(|| fs::read_link(p).unwrap().as_os_str().as_bytes().to_vec()),
        rdev: if ft.is_char_device() || ft.is_block_device() {
            md.rdev()
        } else {
            0
        },
        xattrs,
        sparse_blocks: if ft.is_file() && md.blocks() * 512 < md.len() {
            md.blocks()
        } else {
            0
        },
        link_group,
    }
}

/// Assert two trees are the same in every respect `Node` covers, plus ACLs.
pub fn assert_trees_equal(a: &Path, b: &Path) {
    let (ma, acl_a) = snapshot(a);
    let (mb, acl_b) = snapshot(b);
    let mut diffs = Vec::new();
    for (k, va) in &ma {
        match mb.get(k) {
            None => diffs.push(format!("missing in {}: {}", b.display(), k.escape_ascii())),
            Some(vb) if vb != va => diffs.push(format!(
                "{}:\n  want {va:?}\n  got  {vb:?}",
                k.escape_ascii()
            )),
            Some(_) => {}
        }
    }
    for k in mb.keys().filter(|k| !ma.contains_key(*k)) {
        diffs.push(format!("extra in {}: {}", b.display(), k.escape_ascii()));
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
    assert!(
        acl_a == acl_b,
        "getfacl -R output differs:\n--- {}\n{}\n--- {}\n{}",
        a.display(),
        String::from_utf8_lossy(&acl_a),
        b.display(),
        String::from_utf8_lossy(&acl_b)
    );
}

/// A reader that returns short reads of pseudo-random length, to catch
/// parsers that assume `read` fills the buffer.
pub struct ShortReader<R> {
    inner: R,
    state: u64,
}

impl<R> ShortReader<R> {
    pub fn new(inner: R) -> Self {
        ShortReader {
            inner,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl<R: std::io::Read> std::io::Read for ShortReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let n = (self.state % 700) as usize + 1;
        let n = n.min(buf.len());
        self.inner.read(&mut buf[..n])
    }
}

/// A buffered reader of a byte slice whose `fill_buf` hands out pieces of
/// pseudo-random length (1 to 700 bytes), to catch consumers that assume a
/// piece holds a whole header or member.
pub struct ShortBufReader<'a> {
    data: &'a [u8],
    pos: usize,
    piece: usize,
    state: u64,
}

impl<'a> ShortBufReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        ShortBufReader {
            data,
            pos: 0,
            piece: 0,
            state: 0x2545_f491_4f6c_dd1d,
        }
    }
}

impl std::io::BufRead for ShortBufReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.piece == 0 {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.piece = (self.state % 700) as usize + 1;
        }
        let end = (self.pos + self.piece).min(self.data.len());
        Ok(&self.data[self.pos..end])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.piece = self.piece.saturating_sub(n);
    }
}

impl std::io::Read for ShortBufReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        vzkit_archive::reader::read_buffered(self, buf)
    }
}
