//! End-to-end tests: the `iscsi` and `iscsidirect` backends against a real tgt target on
//! 127.0.0.1:3260 (`vzkit_tests::tgt`), through the userspace initiator (libiscsi tools for
//! listing, `qemu-storage-daemon` FUSE exports loop-attached for data): this host's kernel
//! has no iSCSI initiator.
//!
//! Every test ends by checking that nothing is left behind: no `qemu-storage-daemon`
//! exporting below its root, no loop device on a file below its root or the target's
//! scratch directory, no mount below its root.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vzkit_host::command::SystemRunner;
use vzkit_storage::plugins::iscsi::{FuseExports, Portal};
use vzkit_tests::tgt::{self, PORTAL, Tgt};
use vzkit_tests::{TestRoot, is_root};

use crate::common;
use crate::restore::{Skips, compare_trees};

const IQN: &str = "iqn.2024-01.org.vzkit.test:t1";
const ROOT: &str = "needs root: runs tgtd, FUSE exports, loop devices and mounts";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

/// The by-id name udev gives a tgt LUN identified by its unit serial number.
fn by_id(serial: &str) -> String {
    format!("scsi-SIET_VIRTUAL-DISK_{serial}")
}

/// The target's configuration (`tgtadm --op show`) without its current sessions.
fn target_config(t: &Tgt) -> String {
    let mut skip = false;
    let mut out = String::new();
    for l in t.show().lines() {
        match l.trim() {
            "I_T nexus information:" => skip = true,
            "LUN information:" => skip = false,
            _ => {}
        }
        if !skip {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The SCSI serial numbers of target 1's LUNs as tgt reports them (`SCSI SN: beaf11`).
fn tgt_serials(t: &Tgt) -> Vec<(u32, String)> {
    let show = t.show();
    let mut res = Vec::new();
    let mut lun = None;
    for l in show.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("LUN: ") {
            lun = n.parse().ok();
        } else if let (Some(sn), Some(n)) = (l.strip_prefix("SCSI SN: "), lun) {
            res.push((n, sn.to_string()));
        }
    }
    res
}

fn storage_cfg(extra: &str) -> String {
    format!(
        "iscsi: san\n\tportal {PORTAL}\n\ttarget {IQN}\n\tcontent images\n\n\
         iscsidirect: sand\n\tportal 127.0.0.1\n\ttarget {IQN}\n\n{extra}"
    )
}

/// Loop devices attached to files below `dir`.
fn loops_below(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|f| Path::new(f).starts_with(&dir))
        })
        .map(str::to_string)
        .collect()
}

/// Nothing of `r` is left: exports, loop devices, mounts.
fn assert_clean(r: &TestRoot, t: Option<&Tgt>) {
    let root = r.path().display().to_string();
    assert_eq!(
        tgt::processes("qemu-storage-da", &root),
        Vec::<u32>::new(),
        "qemu-storage-daemon left running"
    );
    // The kernel releases detached loop devices asynchronously.
    let loops = || {
        let mut l = loops_below(r.path());
        if let Some(t) = t {
            l.extend(loops_below(t.dir()));
        }
        l
    };
    let start = Instant::now();
    while !loops().is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(loops(), Vec::<String>::new(), "loop devices left");
    assert_eq!(r.mounts(), Vec::<std::path::PathBuf>::new(), "mounts left");
}

/// A file's content through debugfs, read from an ext4 image (the LUN's backing file on the
/// target side), without mounting it.
fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn mkfs(image: &Path) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(image)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
}

#[test]
#[ignore = "needs root: runs tgtd, FUSE exports, loop devices and mounts"]
fn pvesm_lists_luns_of_a_real_target_and_refuses_what_pve_refuses() {
    assert!(is_root(), "{ROOT}");
    let started = Instant::now();
    let t = Tgt::start();
    eprintln!("tgtd up in {:?}", started.elapsed());
    t.add_target(1, IQN);
    let lun1 = t.add_lun(1, 1, 64 << 20);
    t.add_lun(1, 2, 32 << 20);
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &storage_cfg(""));

    // The names come from tgt's serial numbers, the sizes from the backing files.
    let serials = tgt_serials(&t);
    let sn = |lun: u32| serials.iter().find(|(l, _)| *l == lun).unwrap().1.clone();
    let vol1 = format!("0.0.1.{}", by_id(&sn(1)));
    let vol2 = format!("0.0.2.{}", by_id(&sn(2)));
    let list = json(&r.ok("pvesm", &["list", "san", "--output-format", "json"]));
    assert_eq!(
        list,
        serde_json::json!([
            {"volid": format!("san:{vol1}"), "content": "images", "format": "raw", "size": 64 << 20, "vmid": 0},
            {"volid": format!("san:{vol2}"), "content": "images", "format": "raw", "size": 32 << 20, "vmid": 0},
        ])
    );
    // Stable: the same names again (a second session), and for content images only.
    let again = json(&r.ok(
        "pvesm",
        &[
            "list",
            "san",
            "--content",
            "images",
            "--output-format",
            "json",
        ],
    ));
    assert_eq!(again, list);
    // iscsidirect: PVE's names and iscsi-ls's rounded sizes (value x unit).
    let list = json(&r.ok("pvesm", &["list", "sand", "--output-format", "json"]));
    let rows: Vec<(String, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["volid"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0].0, "sand:lun1");
    assert_eq!(rows[1].0, "sand:lun2");
    // iscsi-ls prints the size rounded down to whole MiB of the last LBA.
    assert!(rows[0].1 <= 64 << 20 && rows[0].1 >= 63 << 20, "{list}");
    assert!(rows[1].1 <= 32 << 20 && rows[1].1 >= 31 << 20, "{list}");

    let status = json(&r.ok("pvesm", &["status", "--output-format", "json"]));
    for id in ["san", "sand"] {
        let row = status
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["storage"] == id)
            .unwrap_or_else(|| panic!("{id} in {status}"));
        assert_eq!(row["active"], 1, "{row}");
        assert_eq!(row["total"], 0, "{row}");
    }
    assert_eq!(
        r.ok("pvesm", &["path", &format!("san:{vol1}")]).trim(),
        r.join("/run/vzkit/iscsi/san/lun1.img")
            .display()
            .to_string()
    );
    assert_eq!(
        r.ok("pvesm", &["path", "sand:lun2"]).trim(),
        format!("iscsi://127.0.0.1/{IQN}/2")
    );
    let err = r.fails("pvesm", &["path", "san:lun1"]);
    assert!(
        err.contains("unable to parse iscsi volume name 'lun1'"),
        "{err}"
    );
    let err = r.fails("pvesm", &["path", "sand:0.0.1.x"]);
    assert!(
        err.contains("unable to parse iscsi volume name '0.0.1.x'"),
        "{err}"
    );

    // Refusals with PVE's messages; none of them changes anything.
    r.write("/etc/pve/lxc/100.conf", "arch: amd64\nostype: debian\n");
    r.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.05",
            "--mp0",
            &format!("san:{vol1},mp=/data"),
        ],
    );
    let before = (
        r.snapshot_files(),
        target_config(&t),
        std::fs::metadata(&lun1).unwrap().len(),
    );
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "pvesm",
            vec![
                "alloc".into(),
                "san".into(),
                "100".into(),
                String::new(),
                "1G".into(),
            ],
            "can't allocate space in iscsi storage",
        ),
        (
            "pvesm",
            vec![
                "alloc".into(),
                "sand".into(),
                "100".into(),
                String::new(),
                "1G".into(),
            ],
            "can't allocate space in iscsi storage",
        ),
        (
            "pvesm",
            vec!["free".into(), format!("san:{vol2}")],
            "can't free space in iscsi storage",
        ),
        (
            "pvesm",
            vec!["free".into(), "sand:lun2".into()],
            "can't free space in iscsi storage",
        ),
        (
            "pct",
            vec![
                "set".into(),
                "100".into(),
                "--mp1".into(),
                "san:1,mp=/new".into(),
            ],
            "content type 'rootdir' is not available or configured on storage 'san'",
        ),
        (
            "pct",
            vec!["resize".into(), "100".into(), "mp0".into(), "+1G".into()],
            "volume resize is not possible on iscsi device",
        ),
        (
            "pct",
            vec!["snapshot".into(), "100".into(), "s1".into()],
            "snapshot feature is not available",
        ),
        (
            "pct",
            vec!["template".into(), "100".into()],
            "Template feature is not available",
        ),
    ];
    for (bin, args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        eprintln!("{bin} {args:?}");
        let err = r.fails(bin, &args);
        assert!(err.contains(want), "{bin} {args:?}: {err}");
        assert_eq!(
            (
                r.snapshot_files(),
                target_config(&t),
                std::fs::metadata(&lun1).unwrap().len()
            ),
            before,
            "{bin} {args:?} changed something"
        );
        assert_clean(&r, Some(&t));
    }

    // An unformatted LUN is not formatted behind the user's back: the mount fails, and the
    // export, loop device and rootfs mount it needed are gone again.
    r.write("/etc/pve/lxc/101.conf", "arch: amd64\nostype: debian\n");
    r.ok(
        "pct",
        &[
            "set",
            "101",
            "--rootfs",
            "local:0.05",
            "--mp0",
            &format!("san:{vol2},mp=/data"),
        ],
    );
    let err = r.fails("pct", &["mount", "101"]);
    assert!(err.contains("mounting mp0 failed"), "{err}");
    assert!(err.contains("wrong fs type"), "{err}");
    assert_clean(&r, Some(&t));
    assert!(!r.read("/etc/pve/lxc/101.conf").contains("lock:"));
}

#[test]
#[ignore = "needs root: runs tgtd, FUSE exports, loop devices and mounts"]
fn a_lun_is_a_container_mount_point_backed_up_and_restored_onto_dir() {
    assert!(is_root(), "{ROOT}");
    let t = Tgt::start();
    t.add_target(1, IQN);
    let lun1 = t.add_lun(1, 1, 96 << 20);
    let lun2 = t.add_lun(1, 2, 16 << 20);
    // The LUNs carry file systems already: vzkit never formats an existing LUN.
    mkfs(&lun1);
    mkfs(&lun2);
    let r = TestRoot::new();
    r.write("/etc/pve/storage.cfg", &storage_cfg(""));
    let serials = tgt_serials(&t);
    let vol1 = format!(
        "0.0.1.{}",
        by_id(&serials.iter().find(|(l, _)| *l == 1).unwrap().1)
    );

    r.write(
        "/etc/pve/lxc/100.conf",
        "arch: amd64\nostype: debian\nhostname: ct100\n",
    );
    r.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.25",
            "--mp0",
            &format!("san:{vol1},mp=/data,backup=1"),
            "--mp1",
            "sand:lun2,mp=/direct",
        ],
    );
    let started = Instant::now();
    r.ok("pct", &["mount", "100"]);
    let mount_time = started.elapsed();
    let src = r.join("/var/lib/lxc/100/rootfs");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "ct100\n").unwrap();
    common::build_fixture(&src.join("data"));
    std::fs::write(src.join("direct/through-iscsidirect"), b"direct\n").unwrap();
    let started = Instant::now();
    r.ok("pct", &["unmount", "100"]);
    let unmount_time = started.elapsed();
    eprintln!("pct mount {mount_time:?}, pct unmount {unmount_time:?}");
    assert_clean(&r, Some(&t));
    // The data went through iSCSI into the target's backing files.
    assert_eq!(debugfs_cat(&lun1, "/etc/hostname"), b"ct100\n");
    assert_eq!(
        debugfs_cat(&lun1, "/usr/bin/big"),
        common::noise(3 * 1024 * 1024 + 17, 1)
    );
    assert_eq!(debugfs_cat(&lun2, "/through-iscsidirect"), b"direct\n");

    // vzdump includes mp0 (backup=1), not mp1; the archive path reads through the export.
    let out = r.run("vzdump", &["100", "--mode", "stop", "--storage", "local"]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("including mount point mp0 ('/data') in backup"),
        "{log}"
    );
    assert!(
        log.contains("excluding volume mount point mp1 ('/direct') from backup (disabled)"),
        "{log}"
    );
    assert_clean(&r, Some(&t));
    let dump = r.join("/var/lib/vz/dump");
    let archive: String = std::fs::read_dir(&dump)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".tar"))
        .expect("archive");

    // Restore with the mount point onto dir storage, then compare the trees exactly.
    r.ok(
        "pct",
        &[
            "restore",
            "200",
            &format!("local:backup/{archive}"),
            "--rootfs",
            "local:0.25",
            "--mp0",
            "local:0.125,mp=/data",
        ],
    );
    let conf = r.read("/etc/pve/lxc/200.conf");
    assert!(
        conf.contains("mp0: local:200/vm-200-disk-1.raw,mp=/data,size=128M\n"),
        "{conf}"
    );
    assert_clean(&r, Some(&t));
    // mp1 was not in the backup: mount the source without it.
    let conf100 = r.read("/etc/pve/lxc/100.conf");
    let without_mp1: String = conf100
        .lines()
        .filter(|l| !l.starts_with("mp1:"))
        .map(|l| format!("{l}\n"))
        .collect();
    r.write("/etc/pve/lxc/100.conf", &without_mp1);
    let dst = r.join("/var/lib/lxc/200/rootfs");
    let sk = Skips {
        meta: vec![b"", b"etc", b"data", b"lost+found", b"data/lost+found"],
        extra: vec![b"etc/vzdump", b"direct"],
    };
    r.with_mounted(&["100", "200"], || compare_trees(&src, &dst, 0, &sk));
    assert_clean(&r, Some(&t));
}

#[test]
#[ignore = "needs root: runs tgtd, FUSE exports, loop devices and mounts"]
fn managed_mode_allocates_and_frees_luns_through_tgtadm() {
    assert!(is_root(), "{ROOT}");
    let t = Tgt::start();
    t.add_target(1, IQN);
    let foreign = t.add_lun(1, 1, 16 << 20);
    let r = TestRoot::new();
    let lun_dir = t.dir().join("managed");
    std::fs::create_dir_all(&lun_dir).unwrap();
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "iscsi: sanm\n\tportal {PORTAL}\n\ttarget {IQN}\n\tcontent images,rootdir\n\t\
             target-provider tgt\n\tlun-dir {}\n\ttgt-pidfile {}\n",
            lun_dir.display(),
            t.pidfile().display()
        ),
    );
    let out = r.ok("pvesm", &["alloc", "sanm", "100", "", "64M"]);
    let vol = "0.0.2.scsi-SIET_VIRTUAL-DISK_vm-100-disk-0";
    assert_eq!(out.trim(), format!("successfully created 'sanm:{vol}'"));
    let backing = lun_dir.join("vm-100-disk-0.raw");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 64 << 20);
    let show = t.show();
    assert!(
        show.contains(&format!("Backing store path: {}", backing.display())),
        "{show}"
    );
    let list = json(&r.ok(
        "pvesm",
        &["list", "sanm", "--vmid", "100", "--output-format", "json"],
    ));
    assert_eq!(
        list,
        serde_json::json!([{"volid": format!("sanm:{vol}"), "content": "images", "format": "raw", "size": 64 << 20, "vmid": 100}])
    );
    // A LUN vzkit did not create is not freed; nothing changes.
    let serial1 = tgt_serials(&t)
        .into_iter()
        .find(|(l, _)| *l == 1)
        .unwrap()
        .1;
    let before = target_config(&t);
    let err = r.fails(
        "pvesm",
        &["free", &format!("sanm:0.0.1.{}", by_id(&serial1))],
    );
    assert!(
        err.contains("can't free space in iscsi storage (LUN 1 is not backed by a file in"),
        "{err}"
    );
    assert_eq!(target_config(&t), before);
    assert!(foreign.exists());
    // A stale name (LUN 2 is not vm-100-disk-7) is not freed either.
    let err = r.fails(
        "pvesm",
        &["free", "sanm:0.0.2.scsi-SIET_VIRTUAL-DISK_vm-100-disk-7"],
    );
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(target_config(&t), before);
    r.ok("pvesm", &["free", &format!("sanm:{vol}")]);
    assert!(!backing.exists());
    assert!(!t.show().contains("managed/"));

    // A container whose rootfs is a managed LUN: create, write, back up, restore onto dir.
    r.write(
        "/etc/pve/lxc/300.conf",
        "arch: amd64\nostype: debian\nhostname: ct300\n",
    );
    r.ok("pct", &["set", "300", "--rootfs", "sanm:0.125"]);
    let conf = r.read("/etc/pve/lxc/300.conf");
    assert!(
        conf.contains("rootfs: sanm:0.0.2.scsi-SIET_VIRTUAL-DISK_vm-300-disk-0,size=128M\n"),
        "{conf}"
    );
    assert_clean(&r, Some(&t));
    r.ok("pct", &["mount", "300"]);
    let src = r.join("/var/lib/lxc/300/rootfs");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "ct300\n").unwrap();
    std::fs::write(src.join("payload"), common::noise(5 << 20, 7)).unwrap();
    r.ok("pct", &["unmount", "300"]);
    assert_clean(&r, Some(&t));
    assert_eq!(
        debugfs_cat(&lun_dir.join("vm-300-disk-0.raw"), "/payload"),
        common::noise(5 << 20, 7)
    );
    r.ok("vzdump", &["300", "--mode", "stop", "--storage", "local"]);
    let archive: String = std::fs::read_dir(r.join("/var/lib/vz/dump"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".tar"))
        .expect("archive");
    r.ok(
        "pct",
        &[
            "restore",
            "301",
            &format!("local:backup/{archive}"),
            "--storage",
            "local",
        ],
    );
    // And restored onto the managed storage itself (a new LUN for the rootfs).
    r.ok(
        "pct",
        &[
            "restore",
            "302",
            &format!("local:backup/{archive}"),
            "--storage",
            "sanm",
        ],
    );
    let conf = r.read("/etc/pve/lxc/302.conf");
    assert!(
        conf.contains("rootfs: sanm:0.0.3.scsi-SIET_VIRTUAL-DISK_vm-302-disk-0,size=128M\n"),
        "{conf}"
    );
    assert_clean(&r, Some(&t));
    let sk = Skips {
        meta: vec![b"", b"etc", b"lost+found"],
        extra: vec![b"etc/vzdump"],
    };
    r.with_mounted(&["300"], || {
        for ct in ["301", "302"] {
            r.with_mounted(&[ct], || {
                compare_trees(&src, &r.join(&format!("/var/lib/lxc/{ct}/rootfs")), 0, &sk);
            });
        }
    });
    std::fs::remove_file(r.join("/etc/pve/lxc/302.conf")).unwrap();
    r.ok(
        "pvesm",
        &["free", "sanm:0.0.3.scsi-SIET_VIRTUAL-DISK_vm-302-disk-0"],
    );
    // A volume in use is not freed; once the container is gone it is.
    let volid = "sanm:0.0.2.scsi-SIET_VIRTUAL-DISK_vm-300-disk-0";
    let err = r.fails("pvesm", &["free", volid]);
    assert!(err.contains("in use"), "{err}");
    std::fs::remove_file(r.join("/etc/pve/lxc/300.conf")).unwrap();
    r.ok("pvesm", &["free", volid]);
    assert!(!lun_dir.join("vm-300-disk-0.raw").exists());
    assert_clean(&r, Some(&t));
}

#[test]
fn unreachable_portals_fail_with_a_clear_error_within_a_timeout() {
    // A port nobody listens on, and a listener that accepts and never answers.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let r = TestRoot::new();
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "iscsi: closed\n\tportal 127.0.0.1:{closed_port}\n\ttarget {IQN}\n\n\
             iscsidirect: closedd\n\tportal 127.0.0.1:{closed_port}\n\ttarget {IQN}\n\n\
             iscsi: silent\n\tportal 127.0.0.1:{silent_port}\n\ttarget {IQN}\n"
        ),
    );
    let timed = |args: &[&str]| {
        let start = Instant::now();
        let err = r.fails("pvesm", args);
        (err, start.elapsed())
    };
    let (err, took) = timed(&["list", "closed"]);
    assert!(
        err.contains(&format!(
            "storage 'closed' is not online (iscsi portal 127.0.0.1:{closed_port} unreachable)"
        )),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (err, took) = timed(&["list", "closedd"]);
    assert!(err.contains("iscsi-ls"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (err, took) = timed(&["list", "silent"]);
    assert!(
        err.contains(&format!(
            "iscsi portal 127.0.0.1:{silent_port} did not answer within 10 s"
        )),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    let status = json(&r.ok("pvesm", &["status", "--output-format", "json"]));
    let closed_row = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["storage"] == "closed")
        .cloned()
        .unwrap();
    assert_eq!(closed_row["active"], 0, "{status}");
}

#[test]
#[ignore = "needs root: FUSE exports"]
fn an_export_that_cannot_start_leaves_no_daemon_behind() {
    assert!(is_root(), "{ROOT}");
    // A portal that accepts connections and never answers: qemu-storage-daemon's start
    // times out while its daemonized child is still connecting.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let r = TestRoot::new();
    let exports = FuseExports::new(
        std::sync::Arc::new(SystemRunner),
        r.join("/run/vzkit/iscsi/x"),
        Portal::parse(&format!("127.0.0.1:{port}")).unwrap(),
        IQN.to_string(),
        "iqn.2024-01.org.vzkit.test:initiator".to_string(),
    );
    let start = Instant::now();
    let err = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(exports.start(1))
        .unwrap_err()
        .to_string();
    let took = start.elapsed();
    assert!(
        err.starts_with(&format!(
            "unable to export LUN 1 of '{IQN}' through the userspace initiator"
        )),
        "{err}"
    );
    assert!(err.contains("got timeout after 10 s"), "{err}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_clean(&r, None);
    assert!(!r.join("/run/vzkit/iscsi/x").exists());
}
