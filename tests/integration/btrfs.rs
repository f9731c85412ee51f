//! End-to-end tests: btrfs on a real loop-mounted btrfs image (quotas on where sizes are
//! tested), through the plugin API and the `pvesm`/`pct` binaries.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use vzkit_host::command::SystemRunner;
use vzkit_storage::config::StorageConfig;
use vzkit_storage::error::StorageError;
use vzkit_storage::plugin::{StoragePlugin, VolumeAccess};
use vzkit_storage::plugins::btrfs::BtrfsPlugin;
use vzkit_tests::TestRoot;
use vzkit_tests::pools::BtrfsFs;

const STORE: &str = "bt";
/// EDQUOT and EROFS on Linux.
const EDQUOT: i32 = 122;
const EROFS: i32 = 30;

fn plugin(cfg_text: &str) -> BtrfsPlugin {
    let (cfg, warnings) = StorageConfig::parse(cfg_text, "storage.cfg");
    assert!(warnings.is_empty(), "{warnings:?}");
    BtrfsPlugin::new(cfg.get(STORE).unwrap().clone(), Arc::new(SystemRunner)).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

fn write_at(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

async fn local_path(p: &BtrfsPlugin, volname: &str, snap: Option<&str>) -> PathBuf {
    match p.access(volname, snap).await.unwrap() {
        VolumeAccess::Directory(d) | VolumeAccess::ImageFile(d) => d,
        other => panic!("unexpected access {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs root: mounts a btrfs loop image"]
async fn subvolumes_raw_images_snapshots_and_clones_on_btrfs() {
    let fs = BtrfsFs::new(512 << 20, true);
    let p = plugin(&fs.storage_cfg(STORE, "store"));
    p.activate_storage().await.unwrap();
    assert!(p.status().await.unwrap().total > 400 << 20);

    // A sized subvolume gets a qgroup limit that the kernel enforces.
    let sub = p.alloc_image(100, "subvol", None, 16 << 10).await.unwrap();
    assert_eq!(sub, "100/subvol-100-disk-0.subvol");
    let sdir = local_path(&p, &sub, None).await;
    assert_eq!(
        sdir,
        fs.mountpoint()
            .join("store/images/100/subvol-100-disk-0.subvol")
    );
    assert_eq!(p.volume_size_info(&sub).await.unwrap(), 16 << 20);
    let err = vzkit_tests::pools::fill(&sdir.join("big"), 24 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EDQUOT), "{err}");
    std::fs::remove_file(sdir.join("big")).unwrap();

    // A raw image lives as disk.raw in its own subvolume.
    let raw = p.alloc_image(100, "raw", None, 32 << 10).await.unwrap();
    assert_eq!(raw, "100/vm-100-disk-1.raw");
    let img = local_path(&p, &raw, None).await;
    assert_eq!(
        img,
        fs.mountpoint()
            .join("store/images/100/vm-100-disk-1/disk.raw")
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
    let err = p
        .alloc_image(100, "raw", Some("vm-100-disk-1.raw"), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");

    let listed: Vec<(String, String, u64)> = p
        .list_images(None)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.volid, v.format, v.size))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "bt:100/subvol-100-disk-0.subvol".into(),
                "subvol".into(),
                16 << 20
            ),
            ("bt:100/vm-100-disk-1.raw".into(), "raw".into(), 32 << 20),
        ]
    );

    // Snapshots are read-only subvolumes next to the volume.
    std::fs::write(sdir.join("f"), b"v1").unwrap();
    p.volume_snapshot(&sub, "s1").await.unwrap();
    let err = p.volume_snapshot(&sub, "s1").await.unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
    std::fs::write(sdir.join("f"), b"v2").unwrap();
    p.volume_snapshot(&sub, "s2").await.unwrap();
    std::fs::write(sdir.join("f"), b"v3").unwrap();
    assert_eq!(p.volume_snapshot_list(&sub).await.unwrap(), ["s1", "s2"]);
    p.activate_volume(&sub, Some("s1")).await.unwrap();
    let snapdir = local_path(&p, &sub, Some("s1")).await;
    assert_eq!(
        snapdir,
        fs.mountpoint()
            .join("store/images/100/subvol-100-disk-0.subvol@s1")
    );
    assert_eq!(std::fs::read(snapdir.join("f")).unwrap(), b"v1");
    let err = std::fs::write(snapdir.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");
    // Snapshots are not volumes.
    assert_eq!(p.list_images(None).await.unwrap().len(), 2);
    let err = p.activate_volume(&sub, Some("nosuch")).await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err:?}");

    // Rollback (any snapshot, as PVE's btrfs) swaps the content and keeps the limit.
    p.volume_snapshot_rollback(&sub, "s1").await.unwrap();
    assert_eq!(std::fs::read(sdir.join("f")).unwrap(), b"v1");
    assert_eq!(p.volume_size_info(&sub).await.unwrap(), 16 << 20);
    let err = vzkit_tests::pools::fill(&sdir.join("big"), 24 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EDQUOT), "{err}");
    std::fs::remove_file(sdir.join("big")).unwrap();
    let err = p
        .volume_snapshot_rollback(&sub, "nosuch")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "can't rollback, snapshot 'nosuch' does not exist on 'bt:100/subvol-100-disk-0.subvol'"
    );
    p.volume_snapshot_delete(&sub, "s2").await.unwrap();
    assert_eq!(p.volume_snapshot_list(&sub).await.unwrap(), ["s1"]);

    // Raw image snapshots and rollback.
    write_at(&img, b"AAAA");
    p.volume_snapshot(&raw, "r1").await.unwrap();
    write_at(&img, b"BBBB");
    assert_eq!(read_at(&local_path(&p, &raw, Some("r1")).await, 4), b"AAAA");
    p.volume_snapshot_rollback(&raw, "r1").await.unwrap();
    assert_eq!(read_at(&img, 4), b"AAAA");

    // Resize: the qgroup limit of a subvolume, the file size of a raw image.
    p.volume_resize(&sub, 32 << 20).await.unwrap();
    assert_eq!(p.volume_size_info(&sub).await.unwrap(), 32 << 20);
    p.volume_resize(&raw, 64 << 20).await.unwrap();
    assert_eq!(p.volume_size_info(&raw).await.unwrap(), 64 << 20);

    // Templates: no snapshots allowed, then renamed to base- and read-only.
    let err = p.create_base(&sub).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unable to create base volume - found snapshot 's1'"
    );
    p.volume_snapshot_delete(&sub, "s1").await.unwrap();
    let base = p.create_base(&sub).await.unwrap();
    assert_eq!(base, "100/base-100-disk-0.subvol");
    assert!(p.parse_volname(&base).unwrap().is_base);
    let bdir = local_path(&p, &base, None).await;
    assert_eq!(std::fs::read(bdir.join("f")).unwrap(), b"v1");
    let err = std::fs::write(bdir.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");

    // Linked clones (writable snapshots) of the base and of a raw image.
    let clone = p.clone_image(&base, 101, None).await.unwrap();
    assert_eq!(clone, "101/subvol-101-disk-0.subvol");
    let cdir = local_path(&p, &clone, None).await;
    assert_eq!(std::fs::read(cdir.join("f")).unwrap(), b"v1");
    std::fs::write(cdir.join("mine"), b"c").unwrap();
    assert!(!bdir.join("mine").exists());
    let rclone = p.clone_image(&raw, 101, Some("r1")).await.unwrap();
    assert_eq!(rclone, "101/vm-101-disk-1.raw");
    assert_eq!(read_at(&local_path(&p, &rclone, None).await, 4), b"AAAA");
    let err = p.clone_image(&clone, 102, None).await.unwrap_err();
    assert!(matches!(err, StorageError::Unsupported(_)), "{err:?}");

    // Free takes snapshots along; the owner directories go when empty.
    p.free_image(&raw).await.unwrap();
    assert!(!img.parent().unwrap().exists());
    assert!(
        !fs.mountpoint()
            .join("store/images/100/vm-100-disk-1@r1")
            .exists()
    );
    for v in [&base, &clone, &rclone] {
        p.free_image(v).await.unwrap();
    }
    assert!(p.list_images(None).await.unwrap().is_empty());
    assert!(!fs.mountpoint().join("store/images/100").exists());
    let err = p.free_image(&base).await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err:?}");
}

#[tokio::test]
#[ignore = "needs root: mounts a btrfs loop image"]
async fn sized_subvolumes_need_quotas_and_other_filesystems_are_refused() {
    let fs = BtrfsFs::new(256 << 20, false);
    let p = plugin(&fs.storage_cfg(STORE, "store"));
    p.activate_storage().await.unwrap();
    let err = p.alloc_image(100, "subvol", None, 1024).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "btrfs quotas are currently not supported, use an unsized subvolume or a raw file"
    );
    // Nothing was left behind.
    assert!(p.list_images(None).await.unwrap().is_empty());
    let v = p.alloc_image(100, "subvol", None, 0).await.unwrap();
    assert_eq!(p.volume_size_info(&v).await.unwrap(), 0);
    p.free_image(&v).await.unwrap();

    let not_btrfs = tempfile::tempdir().unwrap();
    let p = plugin(&format!(
        "btrfs: {STORE}\n\tpath {}\n\tcontent images\n",
        not_btrfs.path().display()
    ));
    let err = p.activate_storage().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "'{}' is not a btrfs file system",
            not_btrfs.path().display()
        )
    );
}

#[test]
#[ignore = "needs root: mounts a btrfs loop image, runs the binaries"]
fn pvesm_and_pct_on_btrfs() {
    let fs = BtrfsFs::new(512 << 20, false);
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &fs.storage_cfg(STORE, "store"));

    let status = json(&r.ok("pvesm", &["status", "--output-format", "json"]));
    let row = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["storage"] == STORE)
        .expect("bt in status")
        .clone();
    assert_eq!(row["type"], "btrfs");
    assert_eq!(row["active"], 1);
    assert!(row["total"].as_u64().unwrap() > 400 << 20, "{row}");
    assert_eq!(
        r.ok(
            "pvesm",
            &["alloc", STORE, "300", "", "0", "--format", "subvol"]
        )
        .trim(),
        "successfully created 'bt:300/subvol-300-disk-0.subvol'"
    );
    assert_eq!(
        r.ok("pvesm", &["alloc", STORE, "300", "", "16M"]).trim(),
        "successfully created 'bt:300/vm-300-disk-1.raw'"
    );
    let list = json(&r.ok("pvesm", &["list", STORE, "--output-format", "json"]));
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volid"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "bt:300/subvol-300-disk-0.subvol",
            "bt:300/vm-300-disk-1.raw"
        ]
    );
    assert_eq!(list[1]["size"], 16 << 20);
    assert_eq!(
        r.ok("pvesm", &["path", "bt:300/vm-300-disk-1.raw"]).trim(),
        fs.mountpoint()
            .join("store/images/300/vm-300-disk-1/disk.raw")
            .display()
            .to_string()
    );
    r.ok("pvesm", &["free", "bt:300/subvol-300-disk-0.subvol"]);
    r.ok("pvesm", &["free", "bt:300/vm-300-disk-1.raw"]);
    let list = json(&r.ok("pvesm", &["list", STORE, "--output-format", "json"]));
    assert_eq!(list, serde_json::json!([]));

    // rootfs as a subvolume (size 0), mp0 as a raw image with ext4 (size > 0).
    r.write(
        "/etc/pve/lxc/100.conf",
        "arch: amd64\nhostname: bct\nmemory: 512\nostype: debian\n",
    );
    r.ok(
        "pct",
        &["set", "100", "--rootfs", "bt:0", "--mp0", "bt:0.1,mp=/data"],
    );
    let conf = r.read("/etc/pve/lxc/100.conf");
    assert!(
        conf.contains("rootfs: bt:100/subvol-100-disk-0.subvol,size=0T\n"),
        "{conf}"
    );
    assert!(
        conf.contains("mp0: bt:100/vm-100-disk-1.raw,mp=/data,size=102M\n"),
        "{conf}"
    );
    r.ok("pct", &["mount", "100"]);
    let root = r.join("/var/lib/lxc/100/rootfs");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fstype = |target: &Path| {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (Path::new(f[4]) == target).then(|| f[sep + 1].to_string())
        })
    };
    assert_eq!(fstype(&root).as_deref(), Some("btrfs"), "{mounts}");
    assert_eq!(
        fstype(&root.join("data")).as_deref(),
        Some("ext4"),
        "{mounts}"
    );
    std::fs::write(root.join("in-root"), b"r").unwrap();
    std::fs::write(root.join("data/hello"), b"btrfs").unwrap();
    r.ok("pct", &["unmount", "100"]);
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    assert_eq!(
        std::fs::read(
            fs.mountpoint()
                .join("store/images/100/subvol-100-disk-0.subvol/in-root")
        )
        .unwrap(),
        b"r"
    );
    r.ok("pct", &["mount", "100"]);
    assert_eq!(std::fs::read(root.join("data/hello")).unwrap(), b"btrfs");
    r.ok("pct", &["unmount", "100"]);
    drop(r);
}

#[tokio::test]
#[ignore = "needs root: mounts a btrfs loop image, loop devices"]
async fn snapshots_mount_read_only_through_the_runtime() {
    use vzkit_host::paths::Layout;
    use vzkit_runtime::conf::mountpoint::MountPoint;
    use vzkit_runtime::mount::{RootOwner, mount_one, umount_all};
    use vzkit_storage::manager::Storages;

    let fs = BtrfsFs::new(512 << 20, false);
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &fs.storage_cfg(STORE, "store"));
    let runner = Arc::new(SystemRunner);
    let (st, _) = Storages::load(Layout::new(r.path()), runner.clone()).unwrap();
    let sub = st.vdisk_alloc(STORE, 100, "subvol", None, 0).await.unwrap();
    let raw = st
        .vdisk_alloc(STORE, 100, "raw", None, 64 << 10)
        .await
        .unwrap();
    let (p, subname) = st.resolve(&sub).unwrap();
    let (_, rawname) = st.resolve(&raw).unwrap();
    let img = p.path(&rawname, None).await.unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = p.path(&subname, None).await.unwrap();
    std::fs::write(live.join("f"), b"before").unwrap();
    // The mount point's directory exists in the (read-only) rootfs snapshot.
    std::fs::create_dir(live.join("data")).unwrap();
    p.volume_snapshot(&subname, "vzdump").await.unwrap();
    p.volume_snapshot(&rawname, "vzdump").await.unwrap();
    std::fs::write(live.join("f"), b"after").unwrap();

    let target = r.join("/mnt/vzsnap0");
    std::fs::create_dir_all(&target).unwrap();
    let mps = [
        MountPoint::new(sub.clone(), "/"),
        MountPoint::new(raw.clone(), "/data"),
    ];
    let mut warnings = Vec::new();
    for mp in &mps {
        mount_one(
            &st,
            &target,
            mp,
            Some("vzdump"),
            RootOwner::default(),
            &mut |w| warnings.push(w),
        )
        .await
        .unwrap();
    }
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"before");
    assert!(target.join("data/lost+found").is_dir());
    for dir in [target.clone(), target.join("data")] {
        let err = std::fs::write(dir.join("x"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EROFS), "{}: {err}", dir.display());
    }
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(umount_all(runner.as_ref(), &target, &[]).await.unwrap(), 2);
    for (vol, name) in [(&sub, &subname), (&raw, &rawname)] {
        p.deactivate_volume(name, Some("vzdump")).await.unwrap();
        p.volume_snapshot_delete(name, "vzdump").await.unwrap();
        st.vdisk_free(vol).await.unwrap();
    }
    assert!(p.list_images(None).await.unwrap().is_empty());
}
