//! File data read straight from the image of a loop-mounted ext4 file system
//! ([`vzkit_archive::direct`]) gives the same tar stream as reads through the mount.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vzkit_archive::direct::DirectImage;
use vzkit_archive::{ArchiveWriter, ExcludeSet, Stats};

use crate::common::{build_fixture, run};

/// `image` loop-mounted at `dir` until dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new(image: &Path, dir: &Path, opts: &str) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-o", &format!("loop,{opts}")])
            .arg(image)
            .arg(dir));
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-d").arg(&self.0).status();
    }
}

/// The tar stream of `root`, crossing into other file systems below it.
fn stream(root: &Path, direct: Option<DirectImage>) -> (Vec<u8>, Stats) {
    let mut w = ArchiveWriter::new(Vec::new());
    w.set_direct(direct);
    let st = w
        .append_tree(root, "./", &ExcludeSet::new(), false)
        .unwrap();
    (w.finish().unwrap(), st)
}

#[test]
fn reads_from_the_image_give_the_same_stream() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm-100-disk-0.raw");
    let other = dir.path().join("other.raw");
    let mnt = dir.path().join("mnt");
    run(Command::new("truncate").args(["-s", "256M"]).arg(&image));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    {
        let _m = Mounted::new(&image, &mnt, "rw,acl,user_xattr");
        build_fixture(&mnt);
        // 40 extents: more than one FIEMAP call returns.
        let f = fs::File::create(mnt.join("many-extents")).unwrap();
        for i in 0..40u64 {
            let block = [u8::try_from(i).unwrap() + 1; 8192];
            std::os::unix::fs::FileExt::write_at(&f, &block, i * 32768).unwrap();
        }
        fs::create_dir(mnt.join("nested")).unwrap();
    }
    fs::copy(&image, &other).unwrap();

    let m = Mounted::new(&image, &mnt, "ro");
    // Another file system below the tree: its files are read through their mount.
    let nested = mnt.join("nested");
    run(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&nested));
    let nested = Mounted(nested);
    fs::write(nested.0.join("on-tmpfs"), vec![7u8; 100_000]).unwrap();
    let (want, plain) = stream(&mnt, None);
    assert_eq!(plain.bytes_direct, 0);
    let direct = DirectImage::new(fs::File::open(&image).unwrap(), &mnt);
    let d = direct
        .as_ref()
        .expect("the image behind a read-only loop mount");
    let many = fs::File::open(mnt.join("many-extents")).unwrap();
    let map = d.map(&many, many.metadata().unwrap().len()).unwrap();
    assert_eq!(map.len(), 40);
    drop(many);
    let (got, st) = stream(&mnt, direct);
    assert!(
        got == want,
        "the stream differs from reads through the mount"
    );
    // Everything but the tmpfs file is read from the image (the fixture has sparse
    // files, holes at the end, empty and large files).
    assert!(
        st.bytes_direct > 0 && st.bytes_direct == st.bytes_read - 100_000,
        "{st:?}"
    );
    // Another image (even an identical copy) is not taken for the mount's.
    assert!(DirectImage::new(fs::File::open(&other).unwrap(), &mnt).is_none());
    drop(nested);
    drop(m);

    // A writable mount is never read around.
    let _m = Mounted::new(&image, &mnt, "rw");
    assert!(DirectImage::new(fs::File::open(&image).unwrap(), &mnt).is_none());
}
