use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};

use super::*;

// ---- pure decoding -------------------------------------------------------

#[test]
fn ext4scan_decodes_times_with_sign_epoch_and_nanoseconds() {
    const NS: i64 = 1_000_000_000;
    assert_eq!(decode_time(5, 123 << 2), Ok(5 * NS + 123));
    // Signed base: 1901-12-13.
    assert_eq!(decode_time(0x8000_0000, 0), Ok(-(1i64 << 31) * NS));
    assert_eq!(
        decode_time(u32::MAX, 999_999_999 << 2),
        Ok(-NS + 999_999_999)
    );
    // Epoch bits extend the signed base: -1 + 2^32 is 2106-02-07.
    assert_eq!(decode_time(u32::MAX, 1), Ok(((1i64 << 32) - 1) * NS));
    assert_eq!(decode_time(0, 2), Ok((2i64 << 32) * NS));
    // 2^31 - 1 + 3 * 2^32 seconds (year 2446) does not fit in i64 ns.
    assert!(decode_time(0x7FFF_FFFF, 3).is_err());
    assert!(decode_time(0, 1_000_000_000 << 2).is_err());
}

/// A 256-byte raw inode with the fields the reader looks at.
fn raw_inode(mode: u16, links: u16, size: u64, extra_isize: u16) -> Vec<u8> {
    let mut r = vec![0u8; 256];
    r[0..2].copy_from_slice(&mode.to_le_bytes());
    r[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
    r[4..8].copy_from_slice(&(size as u32).to_le_bytes());
    r[12..16].copy_from_slice(&100u32.to_le_bytes());
    r[16..20].copy_from_slice(&200u32.to_le_bytes());
    r[24..26].copy_from_slice(&0x5678u16.to_le_bytes());
    r[26..28].copy_from_slice(&links.to_le_bytes());
    r[108..112].copy_from_slice(&((size >> 32) as u32).to_le_bytes());
    r[120..122].copy_from_slice(&1u16.to_le_bytes());
    r[122..124].copy_from_slice(&2u16.to_le_bytes());
    r[128..130].copy_from_slice(&extra_isize.to_le_bytes());
    r[132..136].copy_from_slice(&(7u32 << 2).to_le_bytes());
    r[136..140].copy_from_slice(&((9u32 << 2) | 1).to_le_bytes());
    r
}

#[test]
fn ext4scan_parses_inodes_like_the_kernel() {
    let big = (5u64 << 32) | 42;
    let info = parse_inode(&raw_inode(0o104_755, 3, big, 32), false)
        .unwrap()
        .unwrap();
    assert_eq!(
        info,
        InodeInfo {
            mode: 0o104_755,
            uid: 0x1_1234,
            gid: 0x2_5678,
            size: big,
            mtime_ns: (200 + (1i64 << 32)) * 1_000_000_000 + 9,
            ctime_ns: 100 * 1_000_000_000 + 7,
            nlink: 3,
        }
    );
    // i_size_high counts for directories only with LARGEDIR.
    let dir = raw_inode(0o040_755, 2, big, 32);
    assert_eq!(parse_inode(&dir, false).unwrap().unwrap().size, 42);
    assert_eq!(parse_inode(&dir, true).unwrap().unwrap().size, big);
    // Not in use.
    assert_eq!(
        parse_inode(&raw_inode(0o100_644, 0, 1, 32), false),
        Ok(None)
    );
    // Refused: no room for i_mtime_extra, bad extra size, bad type, dtime set.
    assert!(parse_inode(&raw_inode(0o100_644, 1, 1, 8), false).is_err());
    assert!(parse_inode(&raw_inode(0o100_644, 1, 1, 0), false).is_err());
    assert!(parse_inode(&raw_inode(0o100_644, 1, 1, 130), false).is_err());
    assert!(parse_inode(&raw_inode(0o100_644, 1, 1, 14), false).is_err());
    assert!(parse_inode(&raw_inode(0, 1, 1, 32), false).is_err());
    assert!(parse_inode(&raw_inode(0o170_644, 1, 1, 32), false).is_err());
    let mut dtime = raw_inode(0o100_644, 1, 1, 32);
    dtime[20] = 1;
    assert!(parse_inode(&dtime, false).is_err());
    assert!(parse_inode(&raw_inode(0o100_644, 1, 1 << 63, 32), false).is_err());
}

// ---- images built with e2fsprogs (no root needed) ------------------------

/// Runs a command, panicking with its output on failure; returns stdout.
fn run(prog: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(prog)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// A sparse image file of `mib` MiB made with `mkfs.ext4 -q -F <opts>`,
/// populated from `src` if given.
fn mkfs(dir: &Path, opts: &[&str], src: Option<&Path>, mib: u64) -> PathBuf {
    let img = dir.join("fs.img");
    let f = File::create(&img).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    let mut args: Vec<&std::ffi::OsStr> = vec![os("-q"), os("-F")];
    args.extend(opts.iter().map(|o| os(o)));
    if let Some(src) = src {
        args.push(os("-d"));
        args.push(src.as_os_str());
    }
    args.push(img.as_os_str());
    run("mkfs.ext4", &args);
    img
}

fn debugfs_w(img: &Path, request: &str) {
    run(
        "debugfs",
        &[os("-w"), os("-R"), os(request), img.as_os_str()],
    );
}

fn reason(img: &Path) -> Result<usize, Untrusted> {
    scan_checked(img, MAX_INODES).unwrap().map(|t| t.len())
}

#[test]
fn ext4scan_reads_a_fresh_image() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"hello").unwrap();
    let img = mkfs(tmp.path(), &[], Some(&src), 32);
    let t = scan(&img).unwrap().expect("trusted");
    // root, lost+found, d, d/f
    assert_eq!(t.len(), 4, "{:?}", t.entries);
    let root = t.get(2).expect("root");
    assert_eq!(root.mode & 0o170_000, 0o040_000);
    assert_eq!(root.nlink, 4);
    let lf = t.get(11).expect("lost+found");
    assert_eq!(lf.mode, 0o040_700);
    let file = t.entries.iter().find(|e| e.1.mode & 0o170_000 == 0o100_000);
    assert_eq!(file.expect("the file").1.size, 5);
    // Reserved inodes (journal: 8) are skipped; numbers past the end are not in use.
    assert_eq!(t.get(8), None);
    assert_eq!(t.get(1 << 40), None);
    assert_eq!(
        scan_checked(&img, 3).unwrap(),
        Err(Untrusted::TooManyInodes)
    );
}

#[test]
fn ext4scan_refuses_what_is_not_ext() {
    let tmp = tempfile::tempdir().unwrap();
    let zeros = tmp.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(scan(&zeros).unwrap(), None);
    assert_eq!(reason(&zeros), Err(Untrusted::NotExt));
    assert!(!is_clean(&zeros).unwrap());
    let tiny = tmp.path().join("tiny");
    std::fs::write(&tiny, b"EF53").unwrap();
    assert_eq!(reason(&tiny), Err(Untrusted::NotExt));
    assert!(!is_clean(&tiny).unwrap());
    let err = scan(&tmp.path().join("missing")).expect_err("error");
    assert_eq!(err.kind(), io::ErrorKind::NotFound);

    let xfs = tmp.path().join("xfs.img");
    File::create(&xfs).unwrap().set_len(320 << 20).unwrap();
    run("mkfs.xfs", &[os("-q"), xfs.as_os_str()]);
    assert_eq!(reason(&xfs), Err(Untrusted::NotExt));
}

#[test]
fn ext4scan_refuses_unclean_images() {
    let tmp = tempfile::tempdir().unwrap();
    let img = mkfs(tmp.path(), &[], None, 32);
    assert_eq!(reason(&img), Ok(2));
    assert!(is_clean(&img).unwrap());

    debugfs_w(&img, "feature needs_recovery");
    assert_eq!(scan(&img).unwrap(), None);
    assert_eq!(reason(&img), Err(Untrusted::NeedsRecovery));
    assert!(!is_clean(&img).unwrap());
    debugfs_w(&img, "feature ^needs_recovery");
    assert_eq!(reason(&img), Ok(2));

    debugfs_w(&img, "ssv state 0");
    assert_eq!(scan(&img).unwrap(), None);
    assert_eq!(reason(&img), Err(Untrusted::NotClean));
    assert!(!is_clean(&img).unwrap());
    debugfs_w(&img, "ssv state 3");
    assert_eq!(reason(&img), Err(Untrusted::NotClean));
    debugfs_w(&img, "ssv state 1");
    assert_eq!(reason(&img), Ok(2));
    assert!(is_clean(&img).unwrap());

    debugfs_w(&img, "ssv last_orphan 12");
    assert_eq!(reason(&img), Err(Untrusted::OrphansPending));
    assert!(!is_clean(&img).unwrap());
}

#[test]
fn ext4scan_refuses_unknown_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let img = mkfs(tmp.path(), &[], None, 32);
    debugfs_w(&img, "feature encrypt");
    assert_eq!(
        reason(&img),
        Err(Untrusted::Feature {
            incompat: 0x1_0000,
            ro_compat: 0
        })
    );

    let img = mkfs(tmp.path(), &["-O", "meta_bg,^resize_inode"], None, 32);
    assert_eq!(reason(&img), Err(Untrusted::MetaBg));

    let img = mkfs(tmp.path(), &["-I", "128"], None, 32);
    assert_eq!(reason(&img), Err(Untrusted::SmallInodes));

    let img = mkfs(tmp.path(), &[], None, 32);
    debugfs_w(&img, "set_bg 0 inode_table 999999999");
    assert_eq!(reason(&img), Err(Untrusted::OutsideImage { group: 0 }));

    // A group table inside the file system but past the end of a truncated image.
    let img = mkfs(tmp.path(), &["-b", "4096", "-O", "^resize_inode"], None, 32);
    let blocks = 32 << 20 >> 12;
    debugfs_w(&img, &format!("set_bg 0 inode_table {}", blocks - 600));
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((blocks - 700) << 12)
        .unwrap();
    assert_eq!(reason(&img), Err(Untrusted::OutsideImage { group: 0 }));
}

#[test]
fn ext4scan_refuses_an_inode_without_nanoseconds() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let img = mkfs(tmp.path(), &[], Some(&src), 32);
    assert_eq!(reason(&img), Ok(3));
    debugfs_w(&img, "sif /f extra_isize 8");
    assert_eq!(
        reason(&img),
        Err(Untrusted::BadInode {
            ino: 12,
            what: "i_extra_isize too small for nanosecond times"
        })
    );
}

/// The byte offset of inode `ino` in `img` (`debugfs -R "imap <ino>"`).
fn inode_offset(img: &Path, ino: u32) -> u64 {
    let out = run(
        "debugfs",
        &[os("-R"), os(&format!("imap <{ino}>")), img.as_os_str()],
    );
    // "Inode 12 is part of block group 0\n\tlocated at block 73, offset 0x0b00"
    let rest = out.split("located at block ").nth(1).expect(&out);
    let (block, off) = rest.trim().split_once(", offset 0x").expect(&out);
    let block: u64 = block.parse().unwrap();
    block * 4096 + u64::from_str_radix(off, 16).unwrap()
}

/// Writes an in-use-looking regular file inode as inode `ino`.
fn plant_inode(img: &Path, ino: u32) {
    let off = inode_offset(img, ino);
    let f = File::options().write(true).open(img).unwrap();
    f.write_all_at(&raw_inode(0o100_644, 1, 5, 32), off)
        .unwrap();
}

#[test]
fn ext4scan_skips_unused_inodes_only_with_group_checksums() {
    let tmp = tempfile::tempdir().unwrap();
    // 4 groups of 2048 inodes; group 0 uses 11 (reserved, root, lost+found).
    let img = mkfs(tmp.path(), &["-b", "4096", "-g", "2048"], None, 32);
    plant_inode(&img, 12); // first inode past bg_itable_unused
    plant_inode(&img, 2049); // first inode of an INODE_UNINIT group
    let t = scan(&img).unwrap().expect("trusted");
    assert_eq!(t.len(), 2);
    assert_eq!(t.get(12), None);
    assert_eq!(t.get(2049), None);
    // INODE_UNINIT alone is enough to skip a group.
    debugfs_w(&img, "set_bg 1 itable_unused 0");
    assert_eq!(scan(&img).unwrap().expect("trusted").get(2049), None);

    // Without checksums bg_flags and bg_itable_unused mean nothing: the
    // whole table is read, and the same planted inodes are seen.
    let opts = [
        "-b",
        "4096",
        "-g",
        "2048",
        "-O",
        "^metadata_csum,^uninit_bg",
    ];
    let img = mkfs(tmp.path(), &opts, None, 32);
    plant_inode(&img, 12);
    plant_inode(&img, 2049);
    let t = scan(&img).unwrap().expect("trusted");
    assert_eq!(t.len(), 4);
    assert_eq!(t.get(12).unwrap().size, 5);
    assert_eq!(t.get(2049).unwrap().uid, 0x1_1234);
}

#[test]
fn ext4scan_reads_large_tables_in_parts() {
    let tmp = tempfile::tempdir().unwrap();
    // One group of 32,768 512-byte inodes: a 16 MiB table, read whole
    // (no group checksums) in two 8 MiB reads.
    let opts = [
        "-b",
        "4096",
        "-I",
        "512",
        "-N",
        "32768",
        "-O",
        "^metadata_csum,^uninit_bg,^resize_inode",
    ];
    let img = mkfs(tmp.path(), &opts, None, 128);
    for ino in [16_384, 16_385, 32_768] {
        plant_inode(&img, ino);
    }
    let t = scan(&img).unwrap().expect("trusted");
    let inos: Vec<u32> = t.entries.iter().map(|e| e.0).collect();
    assert_eq!(inos, [2, 11, 16_384, 16_385, 32_768]);
}

// ---- against lstat on a loop mount (root) --------------------------------

/// A loop-mounted image; dropping it unmounts and detaches, even when a
/// test fails.
struct Mounted {
    dev: String,
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(image: &Path, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let dev = run("losetup", &[os("-f"), os("--show"), image.as_os_str()])
            .trim()
            .to_owned();
        let mut m = Mounted {
            dev,
            dir: dir.to_owned(),
            mounted: false,
        };
        run("mount", &[os(&m.dev), dir.as_os_str()]);
        m.mounted = true;
        m
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            match Command::new("umount").arg(&self.dir).status() {
                Ok(s) if s.success() => {}
                other => eprintln!("umount {}: {other:?}", self.dir.display()),
            }
        }
        match Command::new("losetup").arg("-d").arg(&self.dev).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("losetup -d {}: {other:?}", self.dev),
        }
    }
}

fn lstat_info(m: &std::fs::Metadata) -> InodeInfo {
    InodeInfo {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        nlink: u32::try_from(m.nlink()).unwrap(),
    }
}

/// `lstat` of every path below (and including) `root`, by inode number.
fn walk(root: &Path) -> BTreeMap<u64, (PathBuf, InodeInfo)> {
    fn rec(p: &Path, out: &mut BTreeMap<u64, (PathBuf, InodeInfo)>) {
        let m = std::fs::symlink_metadata(p).unwrap();
        let info = lstat_info(&m);
        if let Some((first, seen)) = out.get(&m.ino()) {
            assert_eq!(*seen, info, "{} and {}", first.display(), p.display());
        } else {
            out.insert(m.ino(), (p.to_owned(), info));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                rec(&e.unwrap().path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    rec(root, &mut out);
    out
}

/// The inode of the `orphan_file` feature (`s_orphan_file_inum`), if any:
/// in use, but without a directory entry.
fn orphan_file_inode(img: &Path) -> Option<u64> {
    let mut sb = [0u8; 1024];
    File::open(img)
        .unwrap()
        .read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
        .unwrap();
    (le32(&sb, 0x5C) & 0x1000 != 0).then(|| u64::from(le32(&sb, 0x280)))
}

/// Every inode the walk saw has the scanned stat data, and the scan has no
/// in-use inode the walk did not see other than `hidden`.
fn assert_same(
    table: &InodeTable,
    walked: &BTreeMap<u64, (PathBuf, InodeInfo)>,
    hidden: Option<u64>,
) {
    for (ino, (path, info)) in walked {
        assert_eq!(
            table.get(*ino),
            Some(*info),
            "{} (inode {ino})",
            path.display()
        );
    }
    let unseen: Vec<_> = table
        .entries
        .iter()
        .filter(|(ino, _)| !walked.contains_key(&u64::from(*ino)))
        .collect();
    match hidden {
        Some(h) => {
            assert_eq!(unseen.len(), 1, "{unseen:?}");
            assert_eq!(u64::from(unseen[0].0), h);
            assert_eq!(unseen[0].1.mode & 0o170_000, 0o100_000);
        }
        None => assert!(unseen.is_empty(), "in use but not in the tree: {unseen:?}"),
    }
}

fn set_times(p: &Path, mtime: (i64, u32)) {
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: mtime.0,
            tv_nsec: 0,
        },
        last_modification: Timespec {
            tv_sec: mtime.0,
            tv_nsec: i64::from(mtime.1),
        },
    };
    rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn mknod(p: &Path, ty: FileType, perm: u32, dev: u64) {
    rustix::fs::mknodat(CWD, p, ty, Mode::from_raw_mode(perm), dev).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of inode, owners beyond 16 bits, special mode
/// bits, and times before 1970, after 2038 and with nanoseconds.
fn fixture(src: &Path) {
    use std::os::unix::fs::{chown, lchown, symlink};
    std::fs::create_dir_all(src.join("dir/sub/deep")).unwrap();
    std::fs::create_dir(src.join("emptydir")).unwrap();
    for (i, name) in [
        "file1",
        "file2",
        "dir/file3",
        "file4",
        "file5",
        "file6",
        "gone",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(src.join(name), vec![b'a' + i as u8; 100 * i + 1]).unwrap();
    }
    std::fs::write(src.join("dir/sub/deep/big"), vec![7u8; 300_000]).unwrap();
    symlink("file1", src.join("fast-link")).unwrap();
    symlink("x".repeat(300), src.join("long-link")).unwrap();
    std::fs::write(src.join("hard-a"), b"linked").unwrap();
    std::fs::hard_link(src.join("hard-a"), src.join("hard-b")).unwrap();
    std::fs::hard_link(src.join("hard-a"), src.join("dir/hard-c")).unwrap();
    mknod(&src.join("fifo"), FileType::Fifo, 0o640, 0);
    mknod(
        &src.join("chardev"),
        FileType::CharacterDevice,
        0o666,
        rustix::fs::makedev(1, 3),
    );
    mknod(
        &src.join("blockdev"),
        FileType::BlockDevice,
        0o660,
        rustix::fs::makedev(7, 200),
    );
    std::fs::write(src.join("owned"), b"ids").unwrap();
    chown(src.join("owned"), Some(70_000), Some(80_000)).unwrap();
    lchown(src.join("fast-link"), Some(100_000), Some(65_536)).unwrap();
    std::fs::write(src.join("setuid"), b"#!/bin/sh\n").unwrap();
    chmod(&src.join("setuid"), 0o4755);
    std::fs::create_dir(src.join("sticky")).unwrap();
    chmod(&src.join("sticky"), 0o1777);
    std::fs::create_dir(src.join("setgid")).unwrap();
    chmod(&src.join("setgid"), 0o2750);
    std::fs::write(src.join("ns"), b"ns").unwrap();
    set_times(&src.join("ns"), (1_614_834_367, 123_456_789));
    std::fs::write(src.join("old"), b"1960").unwrap();
    set_times(&src.join("old"), (-302_400_000, 0));
    std::fs::write(src.join("future"), b"2100").unwrap();
    set_times(&src.join("future"), (4_102_444_800, 500_000_000));
    set_times(&src.join("long-link"), (1_000_000_000, 1));
}

/// Changes through the mount: data, owners, modes, names, times, links.
/// Returns the inode numbers removed.
fn modify(m: &Path) -> Vec<u64> {
    use std::io::Write;
    std::fs::write(m.join("file1"), b"rewritten, longer than before").unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("file2"))
        .unwrap()
        .write_all(&[9u8; 70_000])
        .unwrap();
    chmod(&m.join("dir/file3"), 0o600);
    std::os::unix::fs::chown(m.join("file4"), Some(100_000), Some(100_001)).unwrap();
    std::fs::rename(m.join("file5"), m.join("dir/sub/file5-renamed")).unwrap();
    std::fs::create_dir(m.join("newdir")).unwrap();
    std::fs::write(m.join("newdir/new"), b"new").unwrap();
    std::os::unix::fs::symlink("y".repeat(100), m.join("newdir/link")).unwrap();
    set_times(&m.join("file6"), (-1, 999_999_999));
    set_times(&m.join("ns"), (4_294_967_295, 42));
    set_times(&m.join("newdir/new"), (946_684_799, 500));
    let ino = |p: &str| std::fs::symlink_metadata(m.join(p)).unwrap().ino();
    let gone = vec![ino("gone"), ino("emptydir")];
    std::fs::remove_file(m.join("gone")).unwrap();
    std::fs::remove_file(m.join("hard-b")).unwrap();
    std::fs::remove_dir(m.join("emptydir")).unwrap();
    gone
}

/// Builds a 64 MiB image with `opts` from the fixture (below 512 MiB
/// `mke2fs` picks 1 KiB blocks unless told otherwise; `-g 2048` with 4 KiB
/// blocks makes 8 groups, over which `mke2fs` and the kernel spread the
/// top-level directories), compares a scan with a mount, changes it through
/// the mount, and compares again.
fn check_against_mount(opts: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fixture(&src);
    let img = mkfs(tmp.path(), opts, Some(&src), 64);
    let mnt = tmp.path().join("mnt");

    let table = scan(&img).unwrap().expect("trusted");
    {
        let m = Mounted::new(&img, &mnt);
        // Mounted read-write, the image says so: the tables are not trusted.
        let mounted = scan_checked(&img, MAX_INODES).unwrap();
        assert!(
            matches!(mounted, Err(Untrusted::NeedsRecovery | Untrusted::NotClean)),
            "{mounted:?}"
        );
        let walked = walk(&m.dir);
        assert_eq!(walked.len(), 27, "{walked:?}");
        assert_same(&table, &walked, orphan_file_inode(&img));
        let removed = modify(&m.dir);
        drop(m);

        let table = scan(&img).unwrap().expect("trusted after a clean unmount");
        let m = Mounted::new(&img, &mnt);
        let walked = walk(&m.dir);
        assert_same(&table, &walked, orphan_file_inode(&img));
        for ino in removed {
            assert_eq!(table.get(ino), None, "removed inode {ino}");
        }
        let hard = std::fs::symlink_metadata(m.dir.join("hard-a")).unwrap();
        assert_eq!(table.get(hard.ino()).unwrap().nlink, 2);
    }
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_ext4_defaults() {
    check_against_mount(&["-b", "4096", "-g", "2048"]);
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_ext4_without_metadata_csum_and_64bit() {
    check_against_mount(&["-b", "4096", "-g", "2048", "-O", "^metadata_csum,^64bit"]);
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_ext4_without_group_checksums() {
    check_against_mount(&[
        "-b",
        "4096",
        "-g",
        "2048",
        "-O",
        "^metadata_csum,^64bit,^uninit_bg",
    ]);
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_ext4_with_orphan_file() {
    check_against_mount(&["-b", "4096", "-g", "2048", "-O", "orphan_file"]);
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_ext2() {
    check_against_mount(&["-t", "ext2", "-b", "4096", "-g", "2048"]);
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_ext4_with_1k_blocks() {
    check_against_mount(&["-b", "1024"]);
}

#[test]
#[ignore = "needs root: loop devices"]
fn ext4scan_matches_lstat_beyond_65000_links() {
    let tmp = tempfile::tempdir().unwrap();
    // 1 KiB blocks: 65,010 directories of one block each.
    let opts = ["-b", "1024", "-N", "70000"];
    let img = mkfs(tmp.path(), &opts, None, 192);
    let mnt = tmp.path().join("mnt");
    {
        let m = Mounted::new(&img, &mnt);
        std::fs::create_dir(m.dir.join("many")).unwrap();
        for i in 0..65_010 {
            std::fs::create_dir(m.dir.join(format!("many/{i}"))).unwrap();
        }
    }
    let table = scan(&img).unwrap().expect("trusted");
    let m = Mounted::new(&img, &mnt);
    let many = std::fs::symlink_metadata(m.dir.join("many")).unwrap();
    // DIR_NLINK: past 65,000 links a directory stores and shows 1.
    assert_eq!(many.nlink(), 1);
    assert_same(&table, &walk(&m.dir), orphan_file_inode(&img));
}
