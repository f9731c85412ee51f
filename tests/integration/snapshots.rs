//! Container snapshots on real storage: zfs-fuse pools and loop-mounted btrfs. Volumes are
//! allocated with the `pct` binary, data goes in and comes out through `pct mount`, and the
//! snapshot flows run through `vzkit_runtime::snapshot` against the host's storages.

use std::path::Path;
use std::sync::Arc;

use vzkit_host::command::SystemRunner;
use vzkit_host::paths::Layout;
use vzkit_runtime::snapshot::{
    HostOps, format_snapshot_tree, format_utc, snapshot_create, snapshot_delete, snapshot_list,
    snapshot_rollback,
};
use vzkit_runtime::store::CtStore;
use vzkit_storage::manager::Storages;
use vzkit_tests::TestRoot;
use vzkit_tests::pools::{BtrfsFs, ZfsPool, ok as host_ok};

const CONF: &str = "/etc/pve/lxc/100.conf";

fn host(r: &TestRoot) -> (Storages, CtStore) {
    let layout = Layout::new(r.path());
    let (st, _) = Storages::load(layout.clone(), Arc::new(SystemRunner)).unwrap();
    (st, CtStore::new(layout))
}

/// Writes `rootfs/f` and `data/f` through `pct mount`.
fn put(r: &TestRoot, vmid: &str, text: &str) {
    r.ok("pct", &["mount", vmid]);
    let root = r.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
    std::fs::write(root.join("f"), text).unwrap();
    std::fs::write(root.join("data/f"), text.repeat(2)).unwrap();
    r.ok("pct", &["unmount", vmid]);
}

/// Reads `rootfs/f` and `data/f` through `pct mount`.
fn get(r: &TestRoot, vmid: &str) -> (String, String) {
    r.ok("pct", &["mount", vmid]);
    let root = r.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"));
    let res = (read(&root.join("f")), read(&root.join("data/f")));
    r.ok("pct", &["unmount", vmid]);
    res
}

fn expect(text: &str) -> (String, String) {
    (text.to_string(), text.repeat(2))
}

fn new_ct(r: &TestRoot, vmid: &str, rootfs: &str, mp0: &str) {
    r.write(
        &format!("/etc/pve/lxc/{vmid}.conf"),
        "arch: amd64\nhostname: snap\nmemory: 512\nostype: debian\n",
    );
    r.ok("pct", &["set", vmid, "--rootfs", rootfs, "--mp0", mp0]);
}

fn no_warn() -> impl FnMut(String) {
    |w| panic!("unexpected warning: {w}")
}

/// The common flow: two snapshots, rollback rules of the backend, delete, list.
/// `older_rollback_allowed`: btrfs may roll back past a newer snapshot, zfs may not.
async fn snapshot_cycle(r: &TestRoot, older_rollback_allowed: bool, older_refusal: &str) {
    let (st, store) = host(r);
    let ops = HostOps::new(&st);
    put(r, "100", "one");
    snapshot_create(
        &store,
        &ops,
        100,
        "s1",
        Some("first\nmore"),
        false,
        &mut no_warn(),
    )
    .await
    .unwrap();
    let conf = store.load(100).unwrap();
    assert_eq!(conf.get("parent"), Some("s1"));
    assert_eq!(conf.get("lock"), None);
    let s1 = &conf.snapshots["s1"];
    assert_eq!(s1.description.as_deref(), Some("first\nmore\n"));
    assert_eq!(s1.get("rootfs"), conf.get("rootfs"));
    assert_eq!(s1.get("mp0"), conf.get("mp0"));
    assert_eq!(s1.get("snapstate"), None);
    assert!(s1.get("snaptime").unwrap().parse::<i64>().unwrap() > 1_700_000_000);

    // The name is taken now; the refusal changes nothing.
    let before = r.read(CONF);
    let err = snapshot_create(&store, &ops, 100, "s1", None, false, &mut no_warn())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "snapshot name 's1' already used");
    assert_eq!(r.read(CONF), before);

    put(r, "100", "two");
    snapshot_create(&store, &ops, 100, "s2", None, false, &mut no_warn())
        .await
        .unwrap();
    put(r, "100", "three");
    assert_eq!(get(r, "100"), expect("three"));

    // listsnapshot: s1 -> s2 -> current.
    let conf = store.load(100).unwrap();
    assert_eq!(conf.snapshots["s2"].get("parent"), Some("s1"));
    let tree = format_snapshot_tree(&snapshot_list(&conf), &|_| "T".to_string());
    let sp = |n: usize| " ".repeat(n);
    let want = format!(
        "`-> s1{}T{}first\n `-> s2{}T{}no-description\n  `-> current{}You are here!\n",
        sp(26),
        sp(23),
        sp(25),
        sp(23),
        sp(43)
    );
    assert_eq!(tree, want, "\n{tree}");

    // Rolling back to the newest snapshot restores both volumes.
    snapshot_rollback(&store, &ops, 100, "s2").await.unwrap();
    assert_eq!(get(r, "100"), expect("two"));
    let conf = store.load(100).unwrap();
    assert_eq!(conf.get("parent"), Some("s2"));
    assert_eq!(conf.get("lock"), None);

    // Rolling back past s2: the backend decides.
    let before = r.read(CONF);
    let res = snapshot_rollback(&store, &ops, 100, "s1").await;
    if older_rollback_allowed {
        res.unwrap();
        assert_eq!(get(r, "100"), expect("one"));
        assert_eq!(store.load(100).unwrap().get("parent"), Some("s1"));
    } else {
        let err = res.unwrap_err().to_string();
        assert_eq!(err, older_refusal);
        assert_eq!(r.read(CONF), before, "a refused rollback changes nothing");
        assert_eq!(get(r, "100"), expect("two"));
    }

    // Delete s2: s1 stays, current's parent follows.
    snapshot_delete(&store, &ops, 100, "s2", false, &mut no_warn())
        .await
        .unwrap();
    let conf = store.load(100).unwrap();
    assert_eq!(conf.snapshots.keys().collect::<Vec<_>>(), ["s1"]);
    assert_eq!(conf.get("parent"), Some("s1"));
    assert!(conf.main.unused_volumes().is_empty(), "{:?}", conf.main);
    let err = snapshot_delete(&store, &ops, 100, "s2", false, &mut no_warn())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "snapshot 's2' does not exist");

    // Now s1 is the newest everywhere.
    put(r, "100", "four");
    snapshot_rollback(&store, &ops, 100, "s1").await.unwrap();
    assert_eq!(get(r, "100"), expect("one"));

    // A locked container refuses.
    r.ok("pct", &["mount", "100"]);
    let err = snapshot_create(&store, &ops, 100, "s3", None, false, &mut no_warn())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "CT is locked (mounted)");
    r.ok("pct", &["unmount", "100"]);

    snapshot_delete(&store, &ops, 100, "s1", false, &mut no_warn())
        .await
        .unwrap();
    let conf = store.load(100).unwrap();
    assert!(conf.snapshots.is_empty());
    assert_eq!(conf.get("parent"), None);
    assert_eq!(conf.get("lock"), None);
}

/// A container on `dir` raw images has no snapshot feature: refused, config byte-identical.
async fn dir_raw_refused(r: &TestRoot) {
    new_ct(r, "101", "local:0.05", "local:0.05,mp=/data");
    let (st, store) = host(r);
    let ops = HostOps::new(&st);
    let before = r.read("/etc/pve/lxc/101.conf");
    let err = snapshot_create(&store, &ops, 101, "s1", None, false, &mut no_warn())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "snapshot feature is not available");
    assert_eq!(r.read("/etc/pve/lxc/101.conf"), before);
    r.ok("pct", &["set", "101", "--delete", "mp0"]);
}

fn zfs_snapshots(pool: &ZfsPool) -> String {
    host_ok(
        "zfs",
        &[
            "list",
            "-H",
            "-t",
            "snapshot",
            "-o",
            "name",
            "-r",
            pool.name(),
        ],
    )
}

#[tokio::test]
#[ignore = "needs root: runs the zfs-fuse daemon, creates a pool, bind and loop mounts"]
async fn snapshots_on_zfs_fuse() {
    let pool = ZfsPool::start();
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &pool.storage_cfg("ztank"));
    new_ct(&r, "100", "ztank:0.1", "ztank:0.1,mp=/data");
    let conf = r.read(CONF);
    assert!(
        conf.contains("rootfs: ztank:subvol-100-disk-0,size=102M\n"),
        "{conf}"
    );
    let refusal = "can't rollback, 's1' is not most recent snapshot on 'ztank:subvol-100-disk-0'";
    snapshot_cycle(&r, false, refusal).await;
    assert_eq!(zfs_snapshots(&pool).trim(), "", "snapshots left");

    // vzdump's snapshot (backup_only): rootfs and backup=1 volumes only, here just rootfs.
    {
        let (st, store) = host(&r);
        let ops = HostOps::new(&st);
        snapshot_create(&store, &ops, 100, "vzdump", None, true, &mut no_warn())
            .await
            .unwrap();
        let rootfs_snap = format!("{}/subvol-100-disk-0@vzdump", pool.name());
        assert_eq!(zfs_snapshots(&pool).trim(), rootfs_snap);
        snapshot_delete(&store, &ops, 100, "vzdump", false, &mut no_warn())
            .await
            .unwrap();
        assert_eq!(zfs_snapshots(&pool).trim(), "");
        assert!(store.load(100).unwrap().snapshots.is_empty());
    }

    // A failure midway: the mount point's snapshot name is taken by hand, so the rootfs
    // snapshot is made, the mount point's fails, and the cleanup removes both again.
    let mp0 = format!("{}/subvol-100-disk-1@clash", pool.name());
    host_ok("zfs", &["snapshot", &mp0]);
    let (st, store) = host(&r);
    let ops = HostOps::new(&st);
    let before = r.read(CONF);
    let mut warnings = Vec::new();
    let err = snapshot_create(&store, &ops, 100, "clash", None, false, &mut |w| {
        warnings.push(w);
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("clash"), "{err}");
    assert_eq!(warnings, ["snapshot create failed: starting cleanup"]);
    assert_eq!(r.read(CONF), before, "config back as it was");
    assert_eq!(
        zfs_snapshots(&pool).trim(),
        mp0,
        "only the hand-made one is left"
    );
    host_ok("zfs", &["destroy", &mp0]);

    dir_raw_refused(&r).await;
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    drop(r);
}

#[tokio::test]
#[ignore = "needs root: mounts a btrfs loop image, loop devices"]
async fn snapshots_on_btrfs() {
    let fs = BtrfsFs::new(768 << 20, true);
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &fs.storage_cfg("bt", "store"));
    // rootfs: a subvolume (size 0); mp0: a raw image with ext4 in its own subvolume.
    new_ct(&r, "100", "bt:0", "bt:0.1,mp=/data");
    let conf = r.read(CONF);
    assert!(
        conf.contains("mp0: bt:100/vm-100-disk-1.raw,mp=/data,size=102M\n"),
        "{conf}"
    );
    snapshot_cycle(&r, true, "").await;
    let left: Vec<_> = std::fs::read_dir(fs.mountpoint().join("store/images/100"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('@'))
        .collect();
    assert!(left.is_empty(), "snapshots left: {left:?}");
    dir_raw_refused(&r).await;
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    drop(r);
}

#[test]
fn utc_formatting() {
    assert_eq!(format_utc(1_234_567_890), "2009-02-13 23:31:30");
    assert_eq!(format_utc(0), "1970-01-01 00:00:00");
}

/// Per path: `(mode, uid, gid, size, content or link target, more than 64 blocks)`.
type Tree = std::collections::BTreeMap<String, (u32, u32, u32, u64, Vec<u8>, bool)>;

/// Metadata and content of every entry below `root` (without ext4's `lost+found`):
/// `(mode, uid, gid, size, content or link target, allocated 512-byte blocks > 64)`.
fn tree(root: &Path) -> Tree {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "lost+found" || rel == "data/lost+found" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            let size = if m.is_dir() { 0 } else { m.len() };
            out.insert(
                rel,
                (m.mode(), m.uid(), m.gid(), size, body, m.blocks() > 64),
            );
        }
    }
    out
}

/// Writes a tree with owners, modes, a symlink and a sparse file through `pct mount`;
/// returns it as [`tree`] sees it.
fn put_tree(r: &TestRoot, vmid: &str) -> Tree {
    use std::os::unix::fs::PermissionsExt;
    r.ok("pct", &["mount", vmid]);
    let root = r.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::write(root.join("etc/app/conf"), "key=value\n").unwrap();
    std::os::unix::fs::chown(root.join("etc/app/conf"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(root.join("etc/app"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("app/conf", root.join("etc/link")).unwrap();
    let sparse = std::fs::File::create(root.join("data/sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    drop(sparse);
    std::fs::write(root.join("data/setuid"), "x").unwrap();
    std::fs::set_permissions(
        root.join("data/setuid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let t = tree(&root);
    r.ok("pct", &["unmount", vmid]);
    assert!(!t["data/sparse"].5, "the source file is sparse");
    t
}

fn mounted_tree(r: &TestRoot, vmid: &str) -> Tree {
    r.ok("pct", &["mount", vmid]);
    let t = tree(&r.join(&format!("/var/lib/lxc/{vmid}/rootfs")));
    r.ok("pct", &["unmount", vmid]);
    t
}

#[tokio::test]
#[ignore = "needs root: runs the zfs-fuse daemon, creates a pool, bind and loop mounts"]
async fn template_and_clones_on_zfs_fuse() {
    use vzkit_runtime::snapshot::{CloneOptions, clone_ct, template};
    let pool = ZfsPool::start();
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &pool.storage_cfg("ztank"));
    let (st, store) = host(&r);
    let ops = HostOps::new(&st);
    r.write(
        "/etc/pve/lxc/200.conf",
        "arch: amd64\nhostname: base\nmemory: 512\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,type=veth\nostype: debian\n",
    );
    r.ok(
        "pct",
        &[
            "set",
            "200",
            "--rootfs",
            "ztank:0.1",
            "--mp0",
            "ztank:0.1,mp=/data",
        ],
    );
    put(&r, "200", "base");

    // Snapshots forbid the conversion.
    snapshot_create(&store, &ops, 200, "snap", None, false, &mut no_warn())
        .await
        .unwrap();
    let before = r.read("/etc/pve/lxc/200.conf");
    let err = template(&st, 200).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unable to create template, because CT contains snapshots"
    );
    assert_eq!(r.read("/etc/pve/lxc/200.conf"), before);
    snapshot_delete(&store, &ops, 200, "snap", false, &mut no_warn())
        .await
        .unwrap();

    template(&st, 200).await.unwrap();
    let conf = store.load(200).unwrap();
    assert_eq!(conf.get("template"), Some("1"));
    assert_eq!(
        conf.get("rootfs"),
        Some("ztank:basevol-200-disk-0,size=102M")
    );
    assert_eq!(
        conf.get("mp0"),
        Some("ztank:basevol-200-disk-1,mp=/data,size=102M")
    );
    let err = template(&st, 200).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "you can't convert a template to a template"
    );
    let err = snapshot_create(&store, &ops, 200, "snap", None, false, &mut no_warn())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "you can't take a snapshot if it's a template"
    );

    // A linked clone (the default for templates) sees the template's data.
    let opts = CloneOptions {
        hostname: Some("linked".into()),
        ..CloneOptions::default()
    };
    clone_ct(&st, 200, 201, &opts, &mut no_warn())
        .await
        .unwrap();
    let clone = store.load(201).unwrap();
    assert_eq!(
        clone.get("rootfs"),
        Some("ztank:basevol-200-disk-0/subvol-201-disk-0,size=102M")
    );
    assert_eq!(clone.get("hostname"), Some("linked"));
    assert_eq!(clone.get("template"), None);
    assert_eq!(clone.get("lock"), None);
    let net0 = clone.get("net0").unwrap();
    assert!(
        !net0.contains("BC:24:11:00:00:01") && net0.contains("hwaddr=BC:24:11:"),
        "{net0}"
    );
    assert_eq!(store.load(200).unwrap().get("lock"), None);
    assert_eq!(get(&r, "201"), expect("base"));
    put(&r, "201", "changed");
    // The base keeps its data and cannot be freed while a clone depends on it.
    let base = pool.mountpoint().join("basevol-200-disk-0");
    assert_eq!(std::fs::read_to_string(base.join("f")).unwrap(), "base");
    let (plugin, _) = st.resolve("ztank:basevol-200-disk-0").unwrap();
    assert!(plugin.free_image("basevol-200-disk-0").await.is_err());
    let err = clone_ct(&st, 200, 201, &opts, &mut no_warn())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // A linked clone of a non-template: zfs subvols have no clone feature outside bases.
    r.write(
        "/etc/pve/lxc/300.conf",
        "arch: amd64\nhostname: src\nmemory: 512\nostype: debian\n",
    );
    r.ok(
        "pct",
        &[
            "set",
            "300",
            "--rootfs",
            "ztank:0.1",
            "--mp0",
            "ztank:0.1,mp=/data",
        ],
    );
    let full_no = CloneOptions {
        full: Some(false),
        ..CloneOptions::default()
    };
    let err = clone_ct(&st, 300, 302, &full_no, &mut no_warn())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Linked clone feature for 'ztank:subvol-300-disk-0' is not available"
    );
    assert!(!store.exists(302));

    // A full clone of a snapshot onto `dir`: the tree as it was at the snapshot.
    let want = put_tree(&r, "300");
    snapshot_create(&store, &ops, 300, "s1", None, false, &mut no_warn())
        .await
        .unwrap();
    put(&r, "300", "later");
    let opts = CloneOptions {
        snapname: Some("s1".into()),
        storage: Some("local".into()),
        ..CloneOptions::default()
    };
    clone_ct(&st, 300, 301, &opts, &mut no_warn())
        .await
        .unwrap();
    let clone = store.load(301).unwrap();
    assert_eq!(
        clone.get("rootfs"),
        Some("local:301/vm-301-disk-0.raw,size=102M")
    );
    assert_eq!(
        clone.get("mp0"),
        Some("local:301/vm-301-disk-1.raw,mp=/data,size=102M")
    );
    assert_eq!(clone.get("parent"), None);
    assert!(clone.snapshots.is_empty());
    let got = mounted_tree(&r, "301");
    assert_eq!(got, want);
    assert_eq!(store.load(300).unwrap().get("lock"), None);

    // A full clone failing midway (the mount point's snapshot is gone): the target's
    // volumes and config are removed, the source is unlocked.
    host_ok(
        "zfs",
        &["destroy", &format!("{}/subvol-300-disk-1@s1", pool.name())],
    );
    let mut warnings = Vec::new();
    let err = clone_ct(&st, 300, 302, &opts, &mut |w| warnings.push(w))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("s1"), "{err}");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(!store.exists(302));
    assert!(
        !r.join("/var/lib/vz/images/302")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
    );
    assert_eq!(store.load(300).unwrap().get("lock"), None);
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    drop(r);
}

#[tokio::test]
#[ignore = "needs root: mounts a btrfs loop image, loop devices"]
async fn template_and_linked_clone_on_btrfs() {
    use vzkit_runtime::snapshot::{CloneOptions, clone_ct, template};
    let fs = BtrfsFs::new(768 << 20, true);
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &fs.storage_cfg("bt", "store"));
    new_ct(&r, "200", "bt:0", "bt:0.1,mp=/data");
    put(&r, "200", "base");
    let (st, store) = host(&r);
    template(&st, 200).await.unwrap();
    let conf = store.load(200).unwrap();
    assert_eq!(conf.get("template"), Some("1"));
    let base_root = conf.get("rootfs").unwrap().to_string();
    let base_mp0 = conf.get("mp0").unwrap().to_string();
    assert!(
        base_root.starts_with("bt:200/base-200-disk-0.subvol,"),
        "{base_root}"
    );
    assert!(
        base_mp0.starts_with("bt:200/base-200-disk-1.raw,"),
        "{base_mp0}"
    );

    clone_ct(&st, 200, 201, &CloneOptions::default(), &mut no_warn())
        .await
        .unwrap();
    let clone = store.load(201).unwrap();
    let root = clone.get("rootfs").unwrap();
    assert!(root.starts_with("bt:201/"), "{root}");
    assert_eq!(get(&r, "201"), expect("base"));
    put(&r, "201", "clone");
    assert_eq!(get(&r, "201"), expect("clone"));
    // The template's volumes are unchanged: its base subvolume is read-only.
    let base_dir = fs
        .mountpoint()
        .join("store/images/200/base-200-disk-0.subvol");
    assert_eq!(std::fs::read_to_string(base_dir.join("f")).unwrap(), "base");
    let err = std::fs::write(base_dir.join("x"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "{err}"); // EROFS
    assert_eq!(
        store.load(200).unwrap().get("rootfs"),
        Some(base_root.as_str())
    );

    // A full clone of the template's current state onto `dir`.
    let full = CloneOptions {
        full: Some(true),
        storage: Some("local".into()),
        description: Some("copy".into()),
        ..CloneOptions::default()
    };
    clone_ct(&st, 200, 202, &full, &mut no_warn())
        .await
        .unwrap();
    let copy = store.load(202).unwrap();
    assert_eq!(
        copy.get("rootfs"),
        Some("local:202/subvol-202-disk-0.subvol,size=0T")
    );
    assert_eq!(
        copy.get("mp0"),
        Some("local:202/vm-202-disk-1.raw,mp=/data,size=102M")
    );
    assert_eq!(copy.main.description.as_deref(), Some("copy\n"));
    assert_eq!(get(&r, "202"), expect("base"));
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    drop(r);
}

#[tokio::test]
#[ignore = "needs root: a real LXC container on a btrfs loop image, lxcfs"]
async fn running_container_is_frozen_for_snapshots_and_stopped_for_rollback() {
    use std::os::unix::fs::PermissionsExt;
    use vzkit_runtime::lxc::{Lxc, State, lxcpath};
    let _session = vzkit_tests::lxc::session();
    let fs = BtrfsFs::new(512 << 20, false);
    let r = TestRoot::new();
    std::fs::set_permissions(r.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    r.write("/etc/pve/storage.cfg", &fs.storage_cfg("bt", "store"));
    r.write(
        "/etc/pve/lxc/950.conf",
        "arch: amd64\nhostname: ct950\nmemory: 128\nostype: alpine\n",
    );
    r.ok("pct", &["set", "950", "--rootfs", "bt:0"]);
    r.ok("pct", &["mount", "950"]);
    let root = r.join("/var/lib/lxc/950/rootfs");
    vzkit_tests::lxc::populate_busybox(&root, "ct950");
    std::fs::write(root.join("f"), "one").unwrap();
    r.ok("pct", &["unmount", "950"]);

    let _guard = vzkit_tests::lxc::CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![950],
    };
    let (st, store) = host(&r);
    let ops = HostOps::new(&st);
    let lxc = Lxc::new(&st);
    lxc.start(950, false, &mut |w| eprintln!("WARN: {w}"))
        .await
        .unwrap();
    assert_eq!(lxc.state(950).await.unwrap(), State::Running);

    snapshot_create(&store, &ops, 950, "live", None, false, &mut no_warn())
        .await
        .unwrap();
    // Thawed again: the container runs and can write.
    assert_eq!(lxc.state(950).await.unwrap(), State::Running);
    let out = lxc
        .exec(
            950,
            &["/bin/sh".into(), "-c".into(), "echo -n two > /f".into()],
        )
        .await
        .unwrap();
    assert!(out.success(), "{}", out.stderr_str());

    // Rollback stops the running container first, then restores the data.
    snapshot_rollback(&store, &ops, 950, "live").await.unwrap();
    assert_eq!(lxc.state(950).await.unwrap(), State::Stopped);
    assert_eq!(get(&r, "950").0, "one");
    snapshot_delete(&store, &ops, 950, "live", false, &mut no_warn())
        .await
        .unwrap();
    assert!(store.load(950).unwrap().snapshots.is_empty());
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
}
