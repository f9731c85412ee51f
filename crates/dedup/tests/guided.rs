//! Backups of a tree on a real ext4 image guided by its inode table
//! ([`vzkit_dedup::ext4scan`]): only directories with changed inodes in or
//! below them are walked, and every snapshot is exactly the tar stream of a
//! full walk of the mounted image.

use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use vzkit_archive::{ArchiveWriter, ExcludeSet};
use vzkit_dedup::snapshot::TarStream;
use vzkit_dedup::{Backup, BackupOptions, BackupResult, ChangeDetection, Store, VolumeInfo};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The image loop-mounted at `dir` (read-only or not) until dropped.
struct Mounted {
    dir: PathBuf,
    dev: String,
}

impl Mounted {
    fn new(image: &Path, dir: &Path, ro: bool) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let img = image.to_str().unwrap();
        let dev = if ro {
            run("losetup", &["-r", "-f", "--show", img])
        } else {
            run("losetup", &["-f", "--show", img])
        };
        let m = Mounted {
            dir: dir.to_path_buf(),
            dev,
        };
        let opts = if ro { "ro" } else { "rw" };
        run("mount", &["-o", opts, &m.dev, dir.to_str().unwrap()]);
        m
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A loop device attached until dropped.
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn build(root: &Path) {
    for d in 0..12 {
        for f in 0..25 {
            let data = format!("file {d}/{f}\n").repeat(f * 40 + 1);
            write(
                &root.join(format!("d{d}/sub{}/f{f}", f % 3)),
                data.as_bytes(),
            );
        }
    }
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&root.join("big/blob"), &big);
    write(&root.join("links/target"), b"linked\n");
    std::fs::hard_link(root.join("links/target"), root.join("links/other")).unwrap();
    symlink("../d1/sub0/f0", root.join("links/sym")).unwrap();
    run("mkfifo", &[root.join("links/fifo").to_str().unwrap()]);
    write(&root.join("attrs/file"), b"x");
    run(
        "setfattr",
        &[
            "-n",
            "user.k",
            "-v",
            "v1",
            root.join("attrs").to_str().unwrap(),
        ],
    );
}

/// Changes in a few places: content, mode, owner, a rename between
/// directories, a new directory, a removal, an mtime put back, an xattr, a
/// new hard link.
fn change(root: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("d3/sub1/f4"))
        .unwrap();
    f.write_all(b"appended\n").unwrap();
    std::fs::set_permissions(
        root.join("d5/sub2/f2"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("d6/sub0/f0"), Some(1234), Some(5678)).unwrap();
    std::fs::rename(root.join("d7/sub0/f3"), root.join("d8/sub1/moved")).unwrap();
    write(&root.join("new/deeper/file"), b"new\n");
    std::fs::remove_file(root.join("d9/sub2/f5")).unwrap();
    let blob = root.join("big/blob");
    let mut data = std::fs::read(&blob).unwrap();
    data[1_000_000] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    run(
        "touch",
        &["-d", "2020-01-01 00:00:00", blob.to_str().unwrap()],
    );
    run(
        "setfattr",
        &[
            "-n",
            "user.k",
            "-v",
            "v2",
            root.join("attrs").to_str().unwrap(),
        ],
    );
    std::fs::hard_link(root.join("d10/sub1/f1"), root.join("d11/sub0/linked")).unwrap();
}

/// The tar stream of a full walk of the tree.
fn full_walk(root: &Path) -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new());
    w.append_tree(root, "./", &ExcludeSet::new(), true).unwrap();
    w.finish().unwrap()
}

/// The device numbers in the stat keys of a snapshot's records.
fn key_devs(store: &Store, r: &BackupResult) -> std::collections::BTreeSet<u64> {
    let mut cat = vzkit_dedup::snapshot::catalog(store, &r.snapshot).unwrap();
    let mut devs = std::collections::BTreeSet::new();
    while let Some(m) = cat.next_member().unwrap() {
        if let Some(k) = m.key {
            devs.insert(k.dev);
        }
    }
    devs
}

/// A new 64 MiB ext4 image at `image` (`mkfs.ext4` with `args` too).
fn ext4_image(image: &Path, args: &[&str]) {
    std::fs::File::create(image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut all = vec!["-q", "-F"];
    all.extend_from_slice(args);
    all.push(image.to_str().unwrap());
    run("mkfs.ext4", &all);
}

/// The tests of this file take turns: one of them forces a backup onto another loop
/// device than the one before.
static LOOP_DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn stream(store: &Store, r: &BackupResult) -> Vec<u8> {
    let mut got = Vec::new();
    TarStream::open(store, &r.snapshot, true)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    got
}

#[test]
#[ignore = "needs root: loop devices"]
fn guided_backups_walk_only_changed_directories_and_equal_a_full_walk() {
    let _turn = LOOP_DEVICES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm-100-disk-0.raw");
    let mnt = dir.path().join("mnt");
    ext4_image(&image, &[]);
    {
        let m = Mounted::new(&image, &mnt, false);
        build(&m.dir);
    }
    std::fs::create_dir(dir.path().join("store")).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut time = 1_800_000_000;
    // Files changed within a second before a backup are not trusted by the next one.
    let settle = || std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut backup = |mode: ChangeDetection, layout: &str, scan: bool| {
        let inodes = vzkit_dedup::ext4scan::scan(&image).unwrap();
        assert!(inodes.is_some(), "a cleanly unmounted ext4 image is read");
        let inodes = inodes.filter(|_| scan);
        let m = Mounted::new(&image, &mnt, true);
        time += 10;
        let mut o = BackupOptions::new(100);
        o.time = Some(time);
        o.change_detection = mode;
        let mut b = Backup::start(&store, o).unwrap();
        b.add_volume_tree(
            &m.dir,
            "./",
            &ExcludeSet::new(),
            true,
            VolumeInfo {
                inodes,
                layout: layout.into(),
                ..VolumeInfo::default()
            },
        )
        .unwrap();
        let r = b.finish().unwrap();
        let got = stream(&store, &r);
        assert!(
            got == full_walk(&m.dir),
            "the snapshot differs from a full walk"
        );
        r
    };
    let dirs_below_root = || {
        let m = Mounted::new(&image, &mnt, true);
        run(
            "find",
            &[m.dir.to_str().unwrap(), "-mindepth", "1", "-type", "d"],
        )
        .lines()
        .count() as u64
    };
    let dirs = dirs_below_root();
    settle();
    let first = backup(ChangeDetection::Metadata, "./", true);
    assert_eq!(first.stats.dirs_reused, 0, "no base: walked");

    // Unchanged: every directory below the root is taken over and nothing is read,
    // except `links` (files with several links are never taken over unopened).
    settle();
    let same = backup(ChangeDetection::Metadata, "./", true);
    assert_eq!(same.stats.dirs_reused, dirs - 1, "{:?}", same.stats);
    assert_eq!(same.stats.files_read, 0, "{:?}", same.stats);
    assert_eq!(same.stats.files, first.stats.files);

    // Changes in a few directories: only those and their parents are walked.
    {
        let m = Mounted::new(&image, &mnt, false);
        change(&m.dir);
    }
    settle();
    let changed = backup(ChangeDetection::Metadata, "./", true);
    let s = &changed.stats;
    // Walked: d3, d5, d6, d7, d8, d9, d10, d11 with the subdirectory each change is
    // in (16), big, attrs, links; and the new ones (not counted as reused).
    assert_eq!(s.dirs_reused, dirs - 19, "{s:?}");
    // Read: the appended, chmod-ed, chown-ed, moved, new files, the blob and the
    // first name of the new hard link.
    assert_eq!(s.files_read, 7, "{s:?}");

    // Taken-over records get the device of the current mount, like the walked ones
    // (the next backup compares them with the root's).
    let devs = key_devs(&store, &changed);
    assert_eq!(devs.len(), 1, "{devs:?}");
    let dev = devs.into_iter().next().unwrap();

    // The next backup takes over what this one walked, except the directories with
    // files of several links: links, d10, d10/sub1, d11, d11/sub0 — also when the
    // volume is mounted from another loop device (the loop device the last backup
    // used is held by another image meanwhile).
    let held = format!("/dev/loop{}", rustix::fs::minor(dev));
    let dummy = dir.path().join("dummy.img");
    std::fs::File::create(&dummy)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Held by the dummy image; if that fails, something else holds it.
    let _holder = Command::new("losetup")
        .args([held.as_str(), dummy.to_str().unwrap()])
        .status()
        .unwrap()
        .success()
        .then(|| Attached(held.clone()));
    settle();
    let again = backup(ChangeDetection::Metadata, "./", true);
    let again_devs = key_devs(&store, &again);
    assert_eq!(again_devs.len(), 1, "{again_devs:?}");
    assert!(
        !again_devs.contains(&dev),
        "mounted from the same loop device"
    );
    assert_eq!(again.stats.dirs_reused, dirs + 2 - 5, "{:?}", again.stats);
    assert_eq!(again.stats.files_read, 0, "{:?}", again.stats);

    // A base walked without the inode table (as in snapshot mode) guides nothing;
    // the backup after it is guided again.
    settle();
    let unscanned = backup(ChangeDetection::Metadata, "./", false);
    assert_eq!(unscanned.stats.dirs_reused, 0, "{:?}", unscanned.stats);
    settle();
    let after = backup(ChangeDetection::Metadata, "./", true);
    assert_eq!(after.stats.dirs_reused, 0, "{:?}", after.stats);
    settle();
    let guided = backup(ChangeDetection::Metadata, "./", true);
    assert_eq!(guided.stats.dirs_reused, dirs + 2 - 5, "{:?}", guided.stats);

    // e2fsck may move entries (into lost+found) without changing their
    // directories' ctime: after a check, nothing is taken over.
    run("e2fsck", &["-f", "-y", image.to_str().unwrap()]);
    settle();
    let checked = backup(ChangeDetection::Metadata, "./", true);
    assert_eq!(checked.stats.dirs_reused, 0, "{:?}", checked.stats);
    settle();
    let next = backup(ChangeDetection::Metadata, "./", true);
    assert_eq!(next.stats.dirs_reused, dirs + 2 - 5, "{:?}", next.stats);

    // Another layout of mount points, or data change detection: walked whole.
    settle();
    let other = backup(ChangeDetection::Metadata, "./\n./mnt/data", true);
    assert_eq!(other.stats.dirs_reused, 0, "{:?}", other.stats);
    settle();
    let data = backup(ChangeDetection::Data, "./", true);
    assert_eq!(data.stats.dirs_reused, 0, "{:?}", data.stats);
    assert_eq!(data.stats.files_read, data.stats.files, "{:?}", data.stats);
}

/// Files of every layout: fragmented, sparse, preallocated (unwritten extents), with a
/// hole at the end, empty, small.
fn build_layouts(root: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let pattern = |n: usize, k: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(k).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    };
    // Two files written in turns, 64 KiB at a time: many extents each.
    let (mut a, mut b) = (
        std::fs::File::create(root.join("frag-a")).unwrap(),
        std::fs::File::create(root.join("frag-b")).unwrap(),
    );
    for i in 0..64 {
        a.write_all(&pattern(65536, i)).unwrap();
        a.sync_all().unwrap();
        b.write_all(&pattern(65536, 1000 + i)).unwrap();
        b.sync_all().unwrap();
    }
    let mut s = std::fs::File::create(root.join("sparse")).unwrap();
    for off in [0u64, 3 << 20, 9 << 20] {
        s.seek(SeekFrom::Start(off)).unwrap();
        s.write_all(&pattern(300_000, off as u32)).unwrap();
    }
    s.set_len(12 << 20).unwrap();
    let p = root.join("prealloc");
    run("fallocate", &["-l", "4M", p.to_str().unwrap()]);
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&pattern(100_000, 7)).unwrap();
    let mut t = std::fs::File::create(root.join("tail-hole")).unwrap();
    t.write_all(&pattern(1 << 20, 9)).unwrap();
    t.set_len(5 << 20).unwrap();
    std::fs::File::create(root.join("empty")).unwrap();
    std::fs::write(root.join("small"), b"small\n").unwrap();
}

/// With the image given, changed files are read straight from it: the snapshot is still
/// exactly a full walk's tar stream, for every layout of file data; only files whose
/// data is not plainly in the image (inline data) are read through the mount; nothing
/// is read from the image of a writable mount or through another image.
#[test]
#[ignore = "needs root: loop devices"]
fn file_data_read_from_the_image_equals_a_full_walk() {
    let _turn = LOOP_DEVICES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(dir.path().join("store")).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut time = 1_800_000_000;
    for (name, features) in [("plain", "^inline_data"), ("inline", "inline_data")] {
        let image = dir.path().join(format!("{name}.raw"));
        ext4_image(&image, &["-O", features]);
        {
            let m = Mounted::new(&image, &mnt, false);
            build_layouts(&m.dir);
        }
        let other = dir.path().join("other.raw");
        std::fs::copy(&image, &other).unwrap();
        // The image is read with or without an inode table (`--change-detection data`
        // does not scan it); never for a writable mount or through another image.
        for (ro, via, data_mode) in [
            (true, &image, false),
            (true, &image, true),
            (false, &image, false),
            (true, &other, false),
        ] {
            let inodes = vzkit_dedup::ext4scan::scan(&image).unwrap();
            assert!(inodes.is_some(), "a cleanly unmounted ext4 image is read");
            let inodes = inodes.filter(|_| !data_mode);
            let m = Mounted::new(&image, &mnt, ro);
            time += 10;
            let mut o = BackupOptions::new(100);
            o.time = Some(time);
            if data_mode {
                o.change_detection = vzkit_dedup::ChangeDetection::Data;
            }
            // No base: every file is read.
            o.vmid = 100 + u32::try_from(time % 1000).unwrap();
            let mut b = Backup::start(&store, o).unwrap();
            b.add_volume_tree(
                &m.dir,
                "./",
                &ExcludeSet::new(),
                true,
                VolumeInfo {
                    inodes,
                    layout: "./".into(),
                    image: Some(via.clone()),
                    ..VolumeInfo::default()
                },
            )
            .unwrap();
            let r = b.finish().unwrap();
            assert!(
                stream(&store, &r) == full_walk(&m.dir),
                "{name}, read-only {ro}, data mode {data_mode}, through {}: the snapshot \
                 differs from a full walk",
                via.display()
            );
            let s = &r.stats;
            if ro && via == &image {
                // Everything; with inline data, all but the data kept in the inode ("small").
                assert!(s.bytes_read > 14_000_000, "{name}: {s:?}");
                if name == "plain" {
                    assert_eq!(s.bytes_direct, s.bytes_read, "{name}: {s:?}");
                } else {
                    assert_eq!(s.bytes_direct, s.bytes_read - 6, "{name}: {s:?}");
                }
            } else {
                assert_eq!(s.bytes_direct, 0, "{name}, read-only {ro}: {s:?}");
            }
        }
    }
}
