//! End-to-end tests: zfspool on a real zfs-fuse pool (a sparse file in a scratch directory).
//!
//! The plugin API is driven through the real `zfs`/`zpool` commands; `pvesm` and `pct` run
//! as binaries against a scratch root whose `storage.cfg` points at the pool.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use vzkit_host::command::SystemRunner;
use vzkit_storage::config::StorageConfig;
use vzkit_storage::error::StorageError;
use vzkit_storage::plugin::{StoragePlugin, VolumeAccess};
use vzkit_storage::plugins::zfspool::ZfsPoolPlugin;
use vzkit_tests::TestRoot;
use vzkit_tests::pools::{self as zfs, ZfsPool};

const STORE: &str = "ztank";

fn plugin(pool: &ZfsPool) -> ZfsPoolPlugin {
    let (cfg, warnings) = StorageConfig::parse(&pool.storage_cfg(STORE), "storage.cfg");
    assert!(warnings.is_empty(), "{warnings:?}");
    ZfsPoolPlugin::new(cfg.get(STORE).unwrap().clone(), Arc::new(SystemRunner)).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

async fn dir_of(p: &ZfsPoolPlugin, volname: &str, snap: Option<&str>) -> std::path::PathBuf {
    match p.access(volname, snap).await.unwrap() {
        VolumeAccess::Directory(d) => d,
        other => panic!("{volname}: expected a directory, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs root: runs the zfs-fuse daemon and creates a pool"]
async fn alloc_quota_snapshot_rollback_free_on_zfs_fuse() {
    let pool = ZfsPool::start();
    let p = plugin(&pool);
    p.activate_storage().await.unwrap();
    let st = p.status().await.unwrap();
    assert!(
        st.active && st.avail > 400 << 20 && st.total >= st.avail,
        "{st:?}"
    );

    // zfs-fuse knows neither acltype nor zvols: detected, not assumed.
    assert!(!p.supports_acl_properties().await.unwrap());
    let err = p.alloc_image(100, "raw", None, 64 << 10).await.unwrap_err();
    assert!(matches!(err, StorageError::Unsupported(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("this zfs implementation cannot create volumes (zvols)"),
        "{err}"
    );

    // A sized dataset: refquota enforced.
    let vol = p.alloc_image(100, "subvol", None, 32 << 10).await.unwrap();
    assert_eq!(vol, "subvol-100-disk-0");
    p.activate_volume(&vol, None).await.unwrap();
    assert!(pool.is_mounted(&vol));
    let dir = dir_of(&p, &vol, None).await;
    assert_eq!(dir, pool.mountpoint().join(&vol));
    assert_eq!(p.volume_size_info(&vol).await.unwrap(), 32 << 20);
    let err = vzkit_tests::pools::fill(&dir.join("big"), 40 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_edquot()), "{err}");
    std::fs::remove_file(dir.join("big")).unwrap();
    // activate_storage mounts what is not mounted (`zfs mount -a`).
    std::fs::write(dir.join("kept"), b"k").unwrap();
    zfs::ok("zfs", &["unmount", &format!("{}/{vol}", pool.name())]);
    zfs::ok("zfs", &["unmount", pool.name()]);
    assert!(!pool.is_mounted(&vol));
    p.activate_storage().await.unwrap();
    assert!(pool.is_mounted(&vol));
    assert_eq!(std::fs::read(dir.join("kept")).unwrap(), b"k");
    std::fs::remove_file(dir.join("kept")).unwrap();
    // An existing name is refused.
    let err = p
        .alloc_image(100, "subvol", Some(&vol), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");

    // Snapshots: s1 (v1), s2 (v2); rollback only to the newest.
    std::fs::write(dir.join("f"), b"v1").unwrap();
    p.volume_snapshot(&vol, "s1").await.unwrap();
    let err = p.volume_snapshot(&vol, "s1").await.unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
    std::fs::write(dir.join("f"), b"v2").unwrap();
    p.volume_snapshot(&vol, "s2").await.unwrap();
    std::fs::write(dir.join("f"), b"v3").unwrap();
    assert_eq!(p.volume_snapshot_list(&vol).await.unwrap(), ["s1", "s2"]);
    let err = p.volume_snapshot_rollback(&vol, "s1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "can't rollback, 's1' is not most recent snapshot on 'ztank:subvol-100-disk-0'"
    );
    let err = p
        .volume_rollback_is_possible(&vol, "nosuch")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "can't rollback, snapshot 'nosuch' does not exist on 'ztank:subvol-100-disk-0'"
    );
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"v3");

    // Snapshot access: a read-only directory with the snapshot's content.
    p.activate_volume(&vol, Some("s1")).await.unwrap();
    let snapdir = dir_of(&p, &vol, Some("s1")).await;
    assert_eq!(std::fs::read(snapdir.join("f")).unwrap(), b"v1");
    assert!(std::fs::write(snapdir.join("x"), b"x").is_err());
    // Listings ignore the access clone.
    let vols = p.list_images(None).await.unwrap();
    assert_eq!(vols.len(), 1, "{vols:?}");
    // Deleting the snapshot takes its access clone along.
    p.volume_snapshot_delete(&vol, "s1").await.unwrap();
    assert!(!snapdir.join("f").exists());
    assert_eq!(p.volume_snapshot_list(&vol).await.unwrap(), ["s2"]);

    // Rollback to s2 restores the content and the refquota saved with the snapshot.
    p.volume_resize(&vol, 64 << 20).await.unwrap();
    assert_eq!(p.volume_size_info(&vol).await.unwrap(), 64 << 20);
    p.volume_snapshot_rollback(&vol, "s2").await.unwrap();
    p.activate_volume(&vol, None).await.unwrap();
    assert!(pool.is_mounted(&vol));
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"v2");
    assert_eq!(p.volume_size_info(&vol).await.unwrap(), 32 << 20);

    // An unlimited dataset next to it gets the next number.
    let vol2 = p.alloc_image(100, "subvol", None, 0).await.unwrap();
    assert_eq!(vol2, "subvol-100-disk-1");
    assert_eq!(p.volume_size_info(&vol2).await.unwrap(), 0);
    let listed: Vec<(String, u64)> = p
        .list_images(Some(100))
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.volid, v.size))
        .collect();
    assert_eq!(
        listed,
        [
            ("ztank:subvol-100-disk-0".to_string(), 32 << 20),
            ("ztank:subvol-100-disk-1".to_string(), 0),
        ]
    );

    // An exported pool is imported from /dev/disk/by-id/ as PVE does; a pool on a file is not
    // found there, so activation fails with PVE's message (and the pool is imported back).
    let scratch = pool
        .mountpoint()
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    zfs::ok("zpool", &["export", pool.name()]);
    let err = p.activate_storage().await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("could not activate storage 'ztank', command 'zpool import -d /dev/disk/by-id/ -o cachefile=none"),
        "{err}"
    );
    zfs::ok("zpool", &["import", "-d", &scratch, pool.name()]);
    p.activate_storage().await.unwrap();
    assert!(pool.is_mounted(&vol));

    // Free removes a volume with its snapshots (and retries while zfs-fuse says busy).
    p.free_image(&vol).await.unwrap();
    p.free_image(&vol2).await.unwrap();
    assert!(p.list_images(None).await.unwrap().is_empty());
    let out = zfs::ok(
        "zfs",
        &["list", "-H", "-t", "all", "-o", "name", "-r", pool.name()],
    );
    assert_eq!(out.trim(), pool.name(), "left over: {out}");
}

/// EDQUOT on Linux.
fn libc_edquot() -> i32 {
    122
}

#[tokio::test]
#[ignore = "needs root: runs the zfs-fuse daemon and creates a pool"]
async fn template_and_linked_clone_on_zfs_fuse() {
    let pool = ZfsPool::start();
    let p = plugin(&pool);
    p.activate_storage().await.unwrap();
    let vol = p.alloc_image(200, "subvol", None, 16 << 10).await.unwrap();
    p.activate_volume(&vol, None).await.unwrap();
    let dir = dir_of(&p, &vol, None).await;
    std::fs::write(dir.join("base-file"), b"from the template").unwrap();

    // create_base renames (unmounting first where zfs-fuse calls the dataset busy) and
    // takes @__base__.
    let base = p.create_base(&vol).await.unwrap();
    assert_eq!(base, "basevol-200-disk-0");
    assert!(p.parse_volname(&base).unwrap().is_base);
    assert_eq!(p.volume_snapshot_list(&base).await.unwrap(), ["__base__"]);
    p.activate_volume(&base, None).await.unwrap();
    assert!(pool.is_mounted(&base));
    let err = p.create_base(&base).await.unwrap_err();
    assert_eq!(err.to_string(), "create_base not possible with base image");

    let clone = p.clone_image(&base, 201, None).await.unwrap();
    assert_eq!(clone, "basevol-200-disk-0/subvol-201-disk-0");
    p.activate_volume(&clone, None).await.unwrap();
    let cdir = dir_of(&p, &clone, None).await;
    assert_eq!(
        std::fs::read(cdir.join("base-file")).unwrap(),
        b"from the template"
    );
    assert_eq!(p.volume_size_info(&clone).await.unwrap(), 16 << 20);
    std::fs::write(cdir.join("clone-file"), b"c").unwrap();
    assert!(!pool.mountpoint().join(&base).join("clone-file").exists());

    let vols = p.list_images(None).await.unwrap();
    let ids: Vec<&str> = vols.iter().map(|v| v.volid.as_str()).collect();
    assert_eq!(
        ids,
        [
            "ztank:basevol-200-disk-0",
            "ztank:basevol-200-disk-0/subvol-201-disk-0"
        ]
    );
    assert_eq!(
        vols[1].parent.as_deref(),
        Some("basevol-200-disk-0@__base__")
    );

    // A base with linked clones cannot be freed; the clone first, then the base.
    let err = p.free_image(&base).await.unwrap_err();
    assert!(err.to_string().contains("dependent clones"), "{err}");
    assert_eq!(p.list_images(None).await.unwrap().len(), 2);
    p.free_image(&clone).await.unwrap();
    p.free_image(&base).await.unwrap();
    assert!(p.list_images(None).await.unwrap().is_empty());
    // Clones need a base.
    let v = p.alloc_image(202, "subvol", None, 0).await.unwrap();
    let err = p.clone_image(&v, 203, None).await.unwrap_err();
    assert_eq!(err.to_string(), "clone_image only works on base images");
    p.free_image(&v).await.unwrap();
}

#[test]
#[ignore = "needs root: runs the zfs-fuse daemon, creates a pool, runs the binaries"]
fn pvesm_and_pct_on_zfs_fuse() {
    let pool = ZfsPool::start();
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &pool.storage_cfg(STORE));

    // pvesm status / alloc / list / path / free.
    let status = json(&r.ok("pvesm", &["status", "--output-format", "json"]));
    let row = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["storage"] == STORE)
        .expect("ztank in status")
        .clone();
    assert_eq!(row["type"], "zfspool");
    assert_eq!(row["active"], 1);
    assert_eq!(row["content"], "images,rootdir");
    assert!(row["total"].as_u64().unwrap() > 400 << 20, "{row}");
    assert_eq!(
        r.ok(
            "pvesm",
            &["alloc", STORE, "300", "", "64M", "--format", "subvol"]
        )
        .trim(),
        "successfully created 'ztank:subvol-300-disk-0'"
    );
    let err = r.fails("pvesm", &["alloc", STORE, "300", "", "64M"]);
    assert!(
        err.contains("this zfs implementation cannot create volumes (zvols)"),
        "{err}"
    );
    let list = json(&r.ok("pvesm", &["list", STORE, "--output-format", "json"]));
    assert_eq!(list[0]["volid"], "ztank:subvol-300-disk-0");
    assert_eq!(list[0]["format"], "subvol");
    assert_eq!(list[0]["size"], 64 << 20);
    assert_eq!(list[0]["vmid"], 300);
    assert_eq!(
        r.ok("pvesm", &["path", "ztank:subvol-300-disk-0"]).trim(),
        pool.mountpoint()
            .join("subvol-300-disk-0")
            .display()
            .to_string()
    );
    r.ok("pvesm", &["free", "ztank:subvol-300-disk-0"]);
    let list = json(&r.ok("pvesm", &["list", STORE, "--output-format", "json"]));
    assert_eq!(list, serde_json::json!([]));

    // A container with its rootfs and a mount point on the pool, mounted by pct.
    r.write(
        "/etc/pve/lxc/100.conf",
        "arch: amd64\nhostname: zct\nmemory: 512\nostype: debian\n",
    );
    r.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "ztank:1",
            "--mp0",
            "ztank:0.1,mp=/data,backup=1",
        ],
    );
    let conf = r.read("/etc/pve/lxc/100.conf");
    assert!(
        conf.contains("rootfs: ztank:subvol-100-disk-0,size=1G\n"),
        "{conf}"
    );
    assert!(
        conf.contains("mp0: ztank:subvol-100-disk-1,mp=/data,backup=1,size=102M\n"),
        "{conf}"
    );
    let sizes = zfs::ok(
        "zfs",
        &[
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "refquota",
            &format!("{}/subvol-100-disk-0", pool.name()),
            &format!("{}/subvol-100-disk-1", pool.name()),
        ],
    );
    assert_eq!(
        sizes.lines().collect::<Vec<_>>(),
        [(1u64 << 30).to_string(), (102u64 << 20).to_string()]
    );
    let list = json(&r.ok(
        "pvesm",
        &["list", STORE, "--vmid", "100", "--output-format", "json"],
    ));
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["content"], "rootdir");

    r.ok("pct", &["mount", "100"]);
    let root = r.join("/var/lib/lxc/100/rootfs");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for target in [root.clone(), root.join("data")] {
        assert!(
            mounts.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                Path::new(f[4]) == target && l.contains(" - fuse.zfs ")
            }),
            "{} is not a bind mount of a zfs dataset:\n{mounts}",
            target.display()
        );
    }
    std::fs::write(root.join("data/hello"), b"zfs").unwrap();
    std::fs::write(root.join("in-root"), b"r").unwrap();
    r.ok("pct", &["unmount", "100"]);
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    assert_eq!(
        std::fs::read(pool.mountpoint().join("subvol-100-disk-1/hello")).unwrap(),
        b"zfs"
    );
    assert_eq!(
        std::fs::read(pool.mountpoint().join("subvol-100-disk-0/in-root")).unwrap(),
        b"r"
    );
    // acl=1 needs the acltype property, which zfs-fuse lacks: a clear error, nothing mounted.
    r.ok("pct", &["set", "100", "--mp1", "ztank:0.1,mp=/acl,acl=1"]);
    let err = r.fails("pct", &["mount", "100"]);
    assert!(
        err.contains("this zfs implementation has no 'acltype' property"),
        "{err}"
    );
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    assert!(!r.read("/etc/pve/lxc/100.conf").contains("lock:"));
    r.ok("pct", &["set", "100", "--delete", "mp1"]);
    // In use by CT 100: pvesm refuses to free it.
    let err = r.fails("pvesm", &["free", "ztank:subvol-100-disk-1"]);
    assert!(err.contains("still in use by CT 100"), "{err}");
    // pct resize grows the refquota.
    r.ok("pct", &["resize", "100", "mp0", "200M"]);
    let q = zfs::ok(
        "zfs",
        &[
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "refquota",
            &format!("{}/subvol-100-disk-1", pool.name()),
        ],
    );
    assert_eq!(q.trim(), (200u64 << 20).to_string());
    drop(r);
}

#[tokio::test]
#[ignore = "needs root: runs the zfs-fuse daemon, creates a pool, bind-mounts"]
async fn snapshot_mounts_read_only_through_the_runtime() {
    use vzkit_host::paths::Layout;
    use vzkit_runtime::conf::mountpoint::MountPoint;
    use vzkit_runtime::mount::{RootOwner, mount_one, umount_all};
    use vzkit_storage::manager::Storages;

    let pool = ZfsPool::start();
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &pool.storage_cfg(STORE));
    let runner = Arc::new(SystemRunner);
    let (st, _) = Storages::load(Layout::new(r.path()), runner.clone()).unwrap();
    let volid = st.vdisk_alloc(STORE, 100, "subvol", None, 0).await.unwrap();
    assert_eq!(volid, "ztank:subvol-100-disk-0");
    let (p, volname) = st.resolve(&volid).unwrap();
    let live = pool.mountpoint().join(&volname);
    std::fs::write(live.join("f"), b"before").unwrap();
    p.volume_snapshot(&volname, "vzdump").await.unwrap();
    std::fs::write(live.join("f"), b"after").unwrap();

    // vzdump's snapshot mode: the snapshot, bind-mounted read-only at the target.
    let target = r.join("/mnt/vzsnap0");
    std::fs::create_dir_all(&target).unwrap();
    let mp = MountPoint::new(volid.clone(), "/");
    let mut warnings = Vec::new();
    let at = mount_one(
        &st,
        &target,
        &mp,
        Some("vzdump"),
        RootOwner::default(),
        &mut |w| warnings.push(w),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(at.join("f")).unwrap(), b"before");
    let err = std::fs::write(at.join("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "{err}"); // EROFS
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(umount_all(runner.as_ref(), &target, &[]).await.unwrap(), 1);
    p.deactivate_volume(&volname, Some("vzdump")).await.unwrap();
    p.volume_snapshot_delete(&volname, "vzdump").await.unwrap();
    assert!(p.volume_snapshot_list(&volname).await.unwrap().is_empty());
    assert_eq!(std::fs::read(live.join("f")).unwrap(), b"after");
    st.vdisk_free(&volid).await.unwrap();
    let out = zfs::ok(
        "zfs",
        &["list", "-H", "-t", "all", "-o", "name", "-r", pool.name()],
    );
    assert_eq!(out.trim(), pool.name(), "left over: {out}");
}

#[tokio::test]
#[ignore = "needs root: runs the zfs-fuse daemon and creates a pool"]
async fn full_pool_refuses_writes_and_recovers_after_free() {
    let pool = ZfsPool::start_with_size(96 << 20);
    let p = plugin(&pool);
    p.activate_storage().await.unwrap();
    let avail = p.status().await.unwrap().avail;
    let vol = p.alloc_image(100, "subvol", None, 0).await.unwrap();
    let dir = dir_of(&p, &vol, None).await;
    let start = std::time::Instant::now();
    let err = vzkit_tests::pools::fill(
        &dir.join("big"),
        usize::try_from(avail).unwrap() + (8 << 20),
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "{err}"); // ENOSPC
    eprintln!("filled the pool in {:?}", start.elapsed());
    assert!(p.status().await.unwrap().avail < 4 << 20);
    // zfs-fuse cannot even snapshot on a full pool: a clear error, no snapshot left.
    let err = p.volume_snapshot(&vol, "full").await.unwrap_err();
    assert!(err.to_string().contains("out of space"), "{err}");
    assert!(p.volume_snapshot_list(&vol).await.unwrap().is_empty());
    // Freeing the volume gives the space back.
    p.free_image(&vol).await.unwrap();
    assert!(p.status().await.unwrap().avail > avail / 2);
    let vol = p.alloc_image(100, "subvol", None, 0).await.unwrap();
    std::fs::write(dir_of(&p, &vol, None).await.join("f"), b"ok").unwrap();
    p.free_image(&vol).await.unwrap();
}
