//! End-to-end tests: `vzdump` on containers with real loop-mounted ext4 volumes, created with
//! the real `pct` and `pvesm` binaries; GNU tar (with PVE's restore flags) and the compression
//! CLIs as oracles.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vzkit_tests::{TestRoot, bin};

use crate::common;

use common::{COMMON_TAR_FLAGS, build_fixture, noise, run, snapshot};

const BASE_CONF: &str = "arch: amd64\nhostname: ct100\nmemory: 512\nostype: debian\n";

/// A container with rootfs, `mp0` (`/mnt/data`, backup=1), `mp1` (`/mnt/nobk`, no backup) and
/// `mp2` (a bind mount of a host directory). `fill` writes into the mounted container
/// (rootfs path, with the mount points mounted below it).
struct Ct {
    vmid: u32,
}

fn make_ct(r: &TestRoot, vmid: u32, fill: impl FnOnce(&Path)) -> Ct {
    let bind_src = r.join(&format!("/srv/bind-{vmid}"));
    fs::create_dir_all(&bind_src).unwrap();
    fs::write(bind_src.join("secret-bind"), b"bind").unwrap();
    r.write(
        &format!("/etc/pve/lxc/{vmid}.conf"),
        &format!("{BASE_CONF}mp2: {},mp=/mnt/bind\n", bind_src.display()),
    );
    let id = vmid.to_string();
    r.ok(
        "pct",
        &[
            "set",
            &id,
            "--rootfs",
            "local:0.25",
            "--mp0",
            "local:0.125,mp=/mnt/data,backup=1",
            "--mp1",
            "local:0.0625,mp=/mnt/nobk",
        ],
    );
    r.ok("pct", &["mount", &id]);
    let root = r.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
    fs::write(root.join("mnt/nobk/secret-nobk"), b"nobk").unwrap();
    fill(&root);
    r.ok("pct", &["unmount", &id]);
    assert!(r.mounts().is_empty(), "{:?}", r.mounts());
    Ct { vmid }
}

fn dump_dir(r: &TestRoot) -> PathBuf {
    r.join("/var/lib/vz/dump")
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Archives (not companions) in `dir`, sorted.
fn archives(dir: &Path) -> Vec<PathBuf> {
    files_in(dir)
        .into_iter()
        .filter(|n| {
            n.starts_with("vzdump-lxc-")
                && [".tar", ".tar.zst", ".tar.gz", ".tar.lzo"]
                    .iter()
                    .any(|e| n.ends_with(e))
        })
        .map(|n| dir.join(n))
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(r: &TestRoot, args: &[&str]) -> String {
    let o = r.run("vzdump", args);
    assert!(
        o.status.success(),
        "vzdump {args:?} failed ({}):\n{}",
        o.status,
        stderr(&o)
    );
    stderr(&o)
}

fn fails(r: &TestRoot, args: &[&str]) -> String {
    let o = r.run("vzdump", args);
    assert!(
        !o.status.success(),
        "vzdump {args:?} succeeded:\n{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(255));
    stderr(&o)
}

fn conf(r: &TestRoot, vmid: u32) -> String {
    r.read(&format!("/etc/pve/lxc/{vmid}.conf"))
}

/// GNU tar's decompression option for an archive name, as PVE's restore picks it.
fn tar_comp_flag(archive: &Path) -> Option<&'static str> {
    let n = archive.to_string_lossy();
    if n.ends_with(".gz") {
        Some("-z")
    } else if n.ends_with(".lzo") {
        Some("--lzop")
    } else if n.ends_with(".zst") {
        Some("--zstd")
    } else {
        None
    }
}

/// `tar tf` (names) with GNU tar.
fn tar_list(archive: &Path) -> Vec<String> {
    let out = run(Command::new("tar")
        .arg("tf")
        .arg(archive)
        .args(tar_comp_flag(archive)));
    String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_string)
        .collect()
}

/// PVE's restore extraction (§2.5): `tar xpf - [comp] --totals COMMON_TAR_FLAGS -C <dir>
/// --skip-old-files --anchored --exclude ./dev/*`.
fn pve_extract(archive: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    let out = Command::new("tar")
        .args(["xpf", "-"])
        .args(tar_comp_flag(archive))
        .arg("--totals")
        .args(COMMON_TAR_FLAGS)
        .arg("-C")
        .arg(dest)
        .args(["--skip-old-files", "--anchored", "--exclude", "./dev/*"])
        .stdin(fs::File::open(archive).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar x failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The member `name` of an archive, via GNU tar.
fn tar_member(archive: &Path, name: &str) -> Vec<u8> {
    run(Command::new("tar")
        .arg("xf")
        .arg(archive)
        .arg("-O")
        .args(tar_comp_flag(archive))
        .arg(name))
}

fn set_mtime_ns(p: &Path, sec: i64, nsec: i64) {
    run(Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{sec}.{nsec:09}"))
        .arg(p));
}

/// Remove `./etc/vzdump` from an extracted tree the way a restore would (it unlinks the
/// files), keeping the parent's mtime so that the tree compares equal to the source.
fn drop_vzdump_dir(root: &Path) {
    let etc = root.join("etc");
    let m = fs::symlink_metadata(&etc).unwrap();
    fs::remove_dir_all(etc.join("vzdump")).unwrap();
    set_mtime_ns(&etc, m.mtime(), m.mtime_nsec());
}

/// The container's tree as vzdump must archive it: rootfs with the backed-up mp0 mounted
/// at `/mnt/data`, read-only, nothing else mounted.
fn mount_source_view(r: &TestRoot, vmid: u32, at: &Path) {
    fs::create_dir_all(at).unwrap();
    let img = |n: u32| r.join(&format!("/var/lib/vz/images/{vmid}/vm-{vmid}-disk-{n}.raw"));
    run(Command::new("mount")
        .args(["-o", "ro,loop,noload"])
        .arg(img(0))
        .arg(at));
    run(Command::new("mount")
        .args(["-o", "ro,loop,noload"])
        .arg(img(1))
        .arg(at.join("mnt/data")));
}

/// No loop device is attached to the container's images (detaching is asynchronous while
/// udev still has the device open, so give it a moment).
fn no_loops_for(r: &TestRoot, vmid: u32) {
    for n in 0..3 {
        let img = r.join(&format!("/var/lib/vz/images/{vmid}/vm-{vmid}-disk-{n}.raw"));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = run(Command::new("losetup").arg("-j").arg(&img));
            if out.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "loop device left on {}: {}",
                img.display(),
                String::from_utf8_lossy(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn assert_clean(r: &TestRoot, vmid: u32) {
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    no_loops_for(r, vmid);
    assert!(!conf(r, vmid).contains("lock:"), "{}", conf(r, vmid));
    let dats: Vec<String> = files_in(&dump_dir(r))
        .into_iter()
        .filter(|n| n.ends_with(".dat") || n.ends_with(".tmp"))
        .collect();
    assert!(dats.is_empty(), "temporary files left: {dats:?}");
    assert!(
        files_in(&r.join("/var/lib/vzkit/vzdump")).is_empty(),
        "task journal left"
    );
    assert!(files_in(&r.join("/mnt/vzsnap0")).is_empty());
}

/// The archive crate's whole-tree comparison (types, modes, owners, times, content, xattrs,
/// sparseness, hard links, devices, `getfacl -R`), with the ACL listing compared per file:
/// its order is readdir order, which differs between two file systems.
fn assert_same_tree(a: &Path, b: &Path) {
    let (ma, acl_a) = snapshot(a);
    let (mb, acl_b) = snapshot(b);
    let mut diffs = Vec::new();
    for (k, va) in &ma {
        match mb.get(k) {
            None => diffs.push(format!("missing: {}", k.escape_ascii())),
            Some(vb) if vb != va => diffs.push(format!(
                "{}:\n  want {va:?}\n  got  {vb:?}",
                k.escape_ascii()
            )),
            Some(_) => {}
        }
    }
    for k in mb.keys().filter(|k| !ma.contains_key(*k)) {
        diffs.push(format!("extra: {}", k.escape_ascii()));
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
    let blocks = |t: &[u8]| {
        let mut v: Vec<String> = String::from_utf8_lossy(t)
            .split("\n\n")
            .map(|b| b.trim().to_string())
            .filter(|b| !b.is_empty())
            .collect();
        v.sort();
        v
    };
    assert_eq!(blocks(&acl_a), blocks(&acl_b), "getfacl -R differs");
}

fn strip_log_prefix(line: &str) -> &str {
    // "2024-01-02 03:04:05 INFO: x" -> "INFO: x"
    if line.len() > 20 && line.as_bytes()[4] == b'-' && line.as_bytes()[19] == b' ' {
        &line[20..]
    } else {
        line
    }
}

/// `vzdump-lxc-<vmid>-YYYY_MM_DD-HH_MM_SS` → `vzdump-lxc-<vmid>-<date>`.
fn mask_names(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("vzdump-lxc-") {
        out.push_str(&rest[..i + 11]);
        rest = &rest[i + 11..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..digits]);
        rest = &rest[digits..];
        if rest.len() >= 20 && rest.as_bytes()[0] == b'-' && rest.as_bytes()[5] == b'_' {
            out.push_str("-<date>");
            rest = &rest[20..];
        }
    }
    out.push_str(rest);
    out
}

/// Replace the variable parts of log lines (times, sizes, names) with placeholders.
fn normalize_log(text: &str, r: &TestRoot) -> Vec<String> {
    let root = r.path().display().to_string();
    text.lines()
        .map(|l| {
            let l = mask_names(&strip_log_prefix(l).replace(&root, "<root>"));
            if l.starts_with("INFO: Total bytes written: ") {
                "INFO: Total bytes written: <n>".to_string()
            } else if l.starts_with("INFO: archive file size: ") {
                "INFO: archive file size: <size>".to_string()
            } else if l.starts_with("INFO: archive blake3 checksum: ") {
                "INFO: archive blake3 checksum: <hex>".to_string()
            } else if let Some(i) = l.find(" at 20") {
                format!("{} at <time>", &l[..i])
            } else if l.starts_with("INFO: Finished Backup of VM") {
                l.rsplit_once(' ')
                    .map(|(a, _)| format!("{a} (<t>)"))
                    .unwrap()
            } else {
                l
            }
        })
        .collect()
}

fn blake3_file_of(archive: &Path) -> String {
    let mut p = archive.as_os_str().to_owned();
    p.push(".blake3");
    fs::read_to_string(PathBuf::from(p)).unwrap()
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn full_tree_every_compression_matches_the_source() {
    let r = TestRoot::new();
    let ct = make_ct(&r, 100, |root| {
        build_fixture(&root.join("mnt/data"));
        build_fixture(root);
    });
    // Config extras that must not go into the archive.
    let base = conf(&r, 100);
    r.write(
        "/etc/pve/lxc/100.conf",
        &format!(
            "{}\n[pve:pending]\nmemory: 1024\n\n[snap1]\n{BASE_CONF}snaptime: 1\n",
            base.replace("rootfs:", "parent: snap1\nrootfs:")
        ),
    );
    r.write("/etc/pve/firewall/100.fw", "[OPTIONS]\nenable: 1\n");
    let before = conf(&r, 100);

    let mut logs = Vec::new();
    for compress in ["0", "1", "gzip", "zstd"] {
        logs.push(ok(&r, &["100", "--compress", compress]));
        assert_eq!(conf(&r, 100), before, "config changed by the backup");
        assert_clean(&r, 100);
    }
    let list = archives(&dump_dir(&r));
    let exts: Vec<String> = list
        .iter()
        .map(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n[n.find(".tar").unwrap()..].to_string()
        })
        .collect();
    assert_eq!(
        exts,
        [".tar", ".tar.lzo", ".tar.gz", ".tar.zst"],
        "{list:?}"
    );

    // The log of the first run, line by line (PVE's wording and order).
    assert_eq!(
        normalize_log(&logs[0], &r),
        [
            "INFO: starting new backup job: vzdump 100 --compress 0",
            "INFO: Starting Backup of VM 100 (lxc)",
            "INFO: Backup started at <time>",
            "INFO: status = stopped",
            "INFO: backup mode: stop",
            "INFO: ionice priority: 7",
            "INFO: CT Name: ct100",
            "INFO: including mount point rootfs ('/') in backup",
            "INFO: including mount point mp0 ('/mnt/data') in backup",
            "INFO: excluding volume mount point mp1 ('/mnt/nobk') from backup (disabled)",
            "INFO: excluding bind mount point mp2 ('/mnt/bind') from backup (not a volume)",
            "INFO: creating vzdump archive '<root>/var/lib/vz/dump/vzdump-lxc-100-<date>.tar'",
            "INFO: Total bytes written: <n>",
            "INFO: archive file size: <size>",
            "INFO: archive blake3 checksum: <hex>",
            "INFO: Finished Backup of VM 100 (<t>)",
            "INFO: Backup finished at <time>",
            "INFO: Backup job finished successfully",
        ]
    );

    let view = r.join("/source-view");
    mount_source_view(&r, ct.vmid, &view);
    // Restore onto the same kind of file system as the source (block size matters for the
    // allocation of sparse files), as a restore into a new volume would.
    let restore_img = r.join("/restore.img");
    run(Command::new("truncate")
        .arg("-s")
        .arg("256M")
        .arg(&restore_img));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&restore_img));
    let restore_fs = r.join("/restore");
    fs::create_dir_all(&restore_fs).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&restore_img)
        .arg(&restore_fs));
    let expected_conf = {
        // lock, parent, pending and snapshots are dropped.
        let (main, _) = before.split_once("\n[pve:pending]").unwrap();
        main.replace("parent: snap1\n", "")
    };
    for archive in &list {
        let name = archive.file_name().unwrap().to_string_lossy().into_owned();
        // The CLI tools read them.
        let tool: Option<&[&str]> = match tar_comp_flag(archive) {
            Some("-z") => Some(&["gzip", "-t"]),
            Some("--lzop") => Some(&["lzop", "-t"]),
            Some("--zstd") => Some(&["zstd", "-t", "-q"]),
            _ => None,
        };
        if let Some(t) = tool {
            run(Command::new(t[0]).args(&t[1..]).arg(archive));
        }
        // Layout: config first, `./` names, nothing of mp1 or the bind mount.
        let members = tar_list(archive);
        assert_eq!(
            members[..3],
            ["./etc/vzdump/pct.conf", "./etc/vzdump/pct.fw", "./"],
            "{name}"
        );
        assert!(members.iter().all(|m| m.starts_with("./")), "{name}");
        assert!(members.contains(&"./mnt/data/usr/bin/big".to_string()));
        assert!(members.contains(&"./mnt/nobk/".to_string()));
        assert!(members.contains(&"./mnt/bind/".to_string()));
        assert!(
            !members
                .iter()
                .any(|m| m.contains("secret-nobk") || m.contains("secret-bind")),
            "{name}"
        );
        let pct_conf = String::from_utf8(tar_member(archive, "./etc/vzdump/pct.conf")).unwrap();
        assert_eq!(pct_conf, expected_conf, "{name}");
        assert_eq!(
            tar_member(archive, "./etc/vzdump/pct.fw"),
            b"[OPTIONS]\nenable: 1\n"
        );
        // Numeric owners beyond ustar's range survive.
        let verbose = run(Command::new("tar")
            .arg("tvf")
            .arg(archive)
            .arg("--numeric-owner")
            .args(tar_comp_flag(archive)));
        assert!(
            String::from_utf8_lossy(&verbose).contains("3000000/2500000"),
            "{name}"
        );
        // Checksum file: `<blake3>  <name>`.
        let sum = blake3_file_of(archive);
        let want = format!(
            "{}  {name}\n",
            blake3::hash(&fs::read(archive).unwrap()).to_hex()
        );
        assert_eq!(sum, want);
        // The log beside the archive.
        let stem = name.split(".tar").next().unwrap();
        let log = fs::read_to_string(dump_dir(&r).join(format!("{stem}.log"))).unwrap();
        assert!(
            log.lines()
                .all(|l| l.len() > 20 && l.as_bytes()[19] == b' '),
            "{log}"
        );
        assert!(log.contains("INFO: Finished Backup of VM 100"), "{log}");
        let tag = tar_comp_flag(archive)
            .unwrap_or("none")
            .trim_start_matches('-');
        // GNU tar reproduces the tree exactly.
        let dest = restore_fs.join(format!("plain-{tag}"));
        fs::create_dir_all(&dest).unwrap();
        run(Command::new("tar")
            .arg("xpf")
            .arg(archive)
            .args(tar_comp_flag(archive))
            .args(COMMON_TAR_FLAGS)
            .arg("-C")
            .arg(&dest));
        drop_vzdump_dir(&dest);
        assert_same_tree(&view, &dest);
        // And with PVE's restore flags. `--skip-old-files` leaves directories that exist
        // before their member alone: the target itself, `./etc` (created for
        // `./etc/vzdump/pct.conf`, the first member) and a mount point's directory (listed
        // once by the rootfs walk and again as its own source); PVE's restore shows the same.
        // Their mtimes are therefore taken from the source; everything else must match.
        let dest = restore_fs.join(format!("pve-{tag}"));
        pve_extract(archive, &dest);
        drop_vzdump_dir(&dest);
        for d in ["", "etc", "mnt/data"] {
            let m = fs::symlink_metadata(view.join(d)).unwrap();
            set_mtime_ns(&dest.join(d), m.mtime(), m.mtime_nsec());
        }
        assert_same_tree(&view, &dest);
    }
    // The storage lists them with their format.
    let listing = r.ok("pvesm", &["list", "local", "--content", "backup"]);
    for f in ["tar.zst", "tar.gz", "tar.lzo"] {
        assert!(listing.contains(f), "{listing}");
    }
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn locked_containers_are_skipped_and_locks_released() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| fs::write(root.join("a"), b"a").unwrap());
    make_ct(&r, 101, |root| fs::write(root.join("b"), b"b").unwrap());
    let locked = format!("{}lock: mounted\n", conf(&r, 100));
    r.write("/etc/pve/lxc/100.conf", &locked);

    let err = fails(&r, &["100", "101", "--compress", "zstd"]);
    assert!(
        err.contains("ERROR: Backup of VM 100 failed - CT is locked (mounted)"),
        "{err}"
    );
    assert!(err.contains("INFO: Finished Backup of VM 101"), "{err}");
    assert!(
        err.contains("INFO: Backup job finished with errors"),
        "{err}"
    );
    assert_eq!(err.lines().last(), Some("job errors"));
    assert_eq!(conf(&r, 100), locked, "the foreign lock was touched");
    assert!(!conf(&r, 101).contains("lock:"));
    let names = files_in(&dump_dir(&r));
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("vzdump-lxc-100-") && n.ends_with(".log")),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("vzdump-lxc-100-") && n.contains(".tar"))
    );
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("vzdump-lxc-101-") && n.ends_with(".tar.zst"))
    );
    let log100 = names
        .iter()
        .find(|n| n.starts_with("vzdump-lxc-100-") && n.ends_with(".log"))
        .unwrap();
    let text = fs::read_to_string(dump_dir(&r).join(log100)).unwrap();
    assert!(text.contains("ERROR: Backup of VM 100 failed - CT is locked (mounted)"));

    // A failure after the lock was taken releases it: a hook script failing in backup-start.
    let hook = r.join("/hook-fail.sh");
    fs::write(
        &hook,
        "#!/bin/sh\n[ \"$1\" = backup-start ] && { echo nope; exit 3; }\nexit 0\n",
    )
    .unwrap();
    run(Command::new("chmod").arg("755").arg(&hook));
    let err = fails(&r, &["101", "--script", hook.to_str().unwrap()]);
    assert!(err.contains("INFO: nope"), "{err}");
    assert!(
        err.contains(&format!(
            "ERROR: Backup of VM 101 failed - command '{} backup-start stop 101' failed: exit code 3",
            hook.display()
        )),
        "{err}"
    );
    assert_clean(&r, 101);
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn hook_script_phases_and_environment() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| fs::write(root.join("a"), b"a").unwrap());
    let record = r.join("/hook-calls");
    let hook = r.join("/hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$*|$(/usr/bin/env | /usr/bin/sort | /usr/bin/tr '\\n' ' ')\" >> {}\necho \"phase $1\"\n",
            record.display()
        ),
    )
    .unwrap();
    run(Command::new("chmod").arg("755").arg(&hook));
    let err = ok(
        &r,
        &[
            "100",
            "--script",
            hook.to_str().unwrap(),
            "--mode",
            "snapshot",
        ],
    );
    assert!(err.contains("INFO: phase backup-end"), "{err}");
    let calls = fs::read_to_string(&record).unwrap();
    let phases: Vec<&str> = calls
        .lines()
        .map(|l| l.split('|').next().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "job-init",
            "job-start",
            "backup-start stop 100",
            "backup-end stop 100",
            "log-end stop 100",
            "job-end"
        ]
    );
    let dump = dump_dir(&r).display().to_string();
    let env_of = |i: usize| -> Vec<String> {
        calls
            .lines()
            .nth(i)
            .unwrap()
            .split('|')
            .nth(1)
            .unwrap()
            .split_whitespace()
            // the shell itself adds PWD (and may add SHLVL/_); PVE's scripts see them too
            .filter(|v| !v.starts_with("PWD=") && !v.starts_with("SHLVL=") && !v.starts_with("_="))
            .map(str::to_string)
            .collect()
    };
    // job-init runs before the storage is looked at: no DUMPDIR yet.
    assert_eq!(env_of(0), ["LC_ALL=C", "STOREID=local"]);
    assert_eq!(
        env_of(1),
        [
            format!("DUMPDIR={dump}"),
            "LC_ALL=C".into(),
            "STOREID=local".into()
        ]
    );
    let start = env_of(2);
    let keys: Vec<&str> = start.iter().map(|v| v.split('=').next().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "DUMPDIR", "HOSTNAME", "LC_ALL", "LOGFILE", "STOREID", "TARGET", "VMTYPE"
        ]
    );
    assert!(start.contains(&"HOSTNAME=ct100".to_string()));
    assert!(start.contains(&"VMTYPE=lxc".to_string()));
    assert!(
        start.iter().any(
            |v| v.starts_with(&format!("TARGET={dump}/vzdump-lxc-100-")) && v.ends_with(".tar")
        )
    );
    assert!(
        start.iter().any(
            |v| v.starts_with(&format!("LOGFILE={dump}/vzdump-lxc-100-")) && v.ends_with(".log")
        )
    );
    assert!(
        !calls.contains("PATH="),
        "the hook must start from an empty environment"
    );

    // Not executable / missing.
    run(Command::new("chmod").arg("644").arg(&hook));
    let err = fails(&r, &["100", "--script", hook.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "Error: The hook script '{}' is not executable.",
            hook.display()
        )),
        "{err}"
    );
    let err = fails(&r, &["100", "--script", "/nonexistent/hook"]);
    assert!(
        err.contains("Error: The hook script '/nonexistent/hook' does not exist."),
        "{err}"
    );
    assert_clean(&r, 100);
}

fn backups_of(r: &TestRoot, vmid: u32) -> Vec<String> {
    files_in(&dump_dir(r))
        .into_iter()
        .filter(|n| n.starts_with(&format!("vzdump-lxc-{vmid}-")) && n.ends_with(".tar.zst"))
        .collect()
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn prune_protection_and_retention_limits() {
    let r = TestRoot::new();
    let path = r.join("/var/lib/vz");
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: local\n\tpath {}\n\tcontent backup,rootdir,images\n\tmax-protected-backups 1\n",
            path.display()
        ),
    );
    make_ct(&r, 100, |root| fs::write(root.join("a"), b"a").unwrap());
    let mut first = String::new();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1100));
        }
        let err = ok(
            &r,
            &[
                "100",
                "--compress",
                "zstd",
                "--prune-backups",
                "keep-last=2",
            ],
        );
        if i == 0 {
            first = backups_of(&r, 100)[0].clone();
            assert!(
                err.contains("INFO: prune older backups with retention: keep-last=2"),
                "{err}"
            );
            assert!(err.contains("INFO: pruned 0 backup(s)\n"), "{err}");
        }
        if i == 2 {
            assert!(
                err.contains(&format!("INFO: removing backup 'local:backup/{first}'")),
                "{err}"
            );
            assert!(
                err.contains("INFO: pruned 1 backup(s) not covered by keep-retention policy"),
                "{err}"
            );
        }
    }
    let list = backups_of(&r, 100);
    assert_eq!(list.len(), 2, "{list:?}");
    let stem = first.trim_end_matches(".tar.zst");
    let names = files_in(&dump_dir(&r));
    assert!(
        !names.iter().any(|n| n.starts_with(stem)),
        "companions of the pruned backup left: {names:?}"
    );

    // Protected: allowed once (max-protected-backups 1), never pruned.
    std::thread::sleep(Duration::from_millis(1100));
    let err = ok(
        &r,
        &[
            "100",
            "--compress",
            "zstd",
            "--protected",
            "1",
            "--prune-backups",
            "keep-last=1",
        ],
    );
    assert!(err.contains("INFO: marking backup as protected"), "{err}");
    let names = files_in(&dump_dir(&r));
    let prot: Vec<&String> = names.iter().filter(|n| n.ends_with(".protected")).collect();
    assert_eq!(prot.len(), 1, "{names:?}");
    std::thread::sleep(Duration::from_millis(1100));
    let err = fails(&r, &["100", "--compress", "zstd", "--protected", "1"]);
    assert!(
        err.contains(
            "ERROR: Backup of VM 100 failed - The number of protected backups per guest is limited to 1 on storage 'local'"
        ),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    ok(
        &r,
        &[
            "100",
            "--compress",
            "zstd",
            "--prune-backups",
            "keep-last=1",
        ],
    );
    let list = backups_of(&r, 100);
    assert_eq!(list.len(), 2, "protected + newest: {list:?}");
    assert!(dump_dir(&r).join(prot[0]).exists());

    // Without remove, the retention is a limit.
    let err = fails(
        &r,
        &[
            "100",
            "--compress",
            "zstd",
            "--prune-backups",
            "keep-last=1",
            "--remove",
            "0",
        ],
    );
    assert!(
        err.contains(
            "There is a max backup limit of 1 enforced by the target storage or the vzdump parameters. Either increase the limit or delete old backups."
        ),
        "{err}"
    );
    // A plain dump directory is pruned by name.
    let dd = r.join("/dumpdir");
    fs::create_dir_all(&dd).unwrap();
    for i in 0..2 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1100));
        }
        let err = ok(
            &r,
            &[
                "100",
                "--dumpdir",
                dd.to_str().unwrap(),
                "--compress",
                "lzo",
                "--prune-backups",
                "keep-last=1",
            ],
        );
        if i == 1 {
            assert!(
                err.contains(&format!(
                    "INFO: delete old backup '{}/vzdump-lxc-100-",
                    dd.display()
                )),
                "{err}"
            );
        }
    }
    let names = files_in(&dd);
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".tar.lzo")).count(),
        1,
        "{names:?}"
    );
    assert_clean(&r, 100);
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn exclude_paths_and_standard_excludes() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| {
        for d in [
            "var/log",
            "var/tmp/sub",
            "tmp/t",
            "var/run",
            "a/cache/x",
            "cache",
            "cache2",
            "keep/me",
            "srv/var/log",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "var/log/syslog",
            "var/tmp/sub/f",
            "tmp/t/f",
            "var/run/x.pid",
            "var/run/y.sock.txt",
            "a/cache/x/f",
            "cache/f",
            "cache2/f",
            "keep/me/f",
            "srv/var/log/f",
            "mnt/data/cache",
        ] {
            fs::write(root.join(f), b"x").unwrap();
        }
    });
    let err = ok(
        &r,
        &[
            "100",
            "--exclude-path",
            "/var/log",
            "--exclude-path",
            "cache",
            "--exclude-path",
            "keep/",
        ],
    );
    assert!(
        err.contains("WARN: tar does not match exclusion with a trailing slash 'keep/'"),
        "{err}"
    );
    let m = tar_list(&archives(&dump_dir(&r))[0]);
    let has = |n: &str| m.iter().any(|x| x == n);
    // anchored: only /var/log, not /srv/var/log
    assert!(!has("./var/log/") && !has("./var/log/syslog"));
    assert!(has("./srv/var/log/f"));
    // unanchored: every `cache` component, also in the mount point, but not `cache2`
    assert!(!has("./a/cache/") && !has("./cache/") && !has("./mnt/data/cache"));
    assert!(has("./cache2/f"));
    // a trailing slash matches nothing
    assert!(has("./keep/me/f"));
    // stdexcludes: the contents of /tmp and /var/tmp, pid files in /var/run
    assert!(has("./tmp/") && !has("./tmp/t/") && !has("./tmp/t/f"));
    assert!(has("./var/tmp/") && !has("./var/tmp/sub/f"));
    assert!(!has("./var/run/x.pid") && has("./var/run/y.sock.txt"));

    std::thread::sleep(Duration::from_millis(1100));
    fs::remove_dir_all(dump_dir(&r)).unwrap();
    ok(&r, &["100", "--stdexcludes", "0"]);
    let m = tar_list(&archives(&dump_dir(&r))[0]);
    assert!(m.contains(&"./tmp/t/f".to_string()) && m.contains(&"./var/run/x.pid".to_string()));
    assert!(m.contains(&"./var/log/syslog".to_string()));
    assert_clean(&r, 100);
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn stdout_dumpdir_tmpdir_quiet_notes_and_options() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| {
        fs::write(root.join("a"), noise(100_000, 9)).unwrap()
    });
    // --stdout: the archive on standard output, the log on stderr (and beside in `local`).
    let out = Command::new(bin("vzdump"))
        .args(["100", "--stdout", "--compress", "zstd", "--mode", "suspend"])
        .env("VZKIT_ROOT", r.path())
        .env("TZ", "UTC")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("INFO: sending archive to stdout"), "{err}");
    assert!(err.contains("INFO: backup mode: stop"), "{err}");
    assert!(!err.contains("creating vzdump archive"), "{err}");
    let tarball = r.join("/stdout.tar.zst");
    fs::write(&tarball, &out.stdout).unwrap();
    let members = tar_list(&tarball);
    assert_eq!(members[0], "./etc/vzdump/pct.conf");
    assert!(members.contains(&"./a".to_string()));
    assert!(archives(&dump_dir(&r)).is_empty());
    let sum = blake3::hash(&out.stdout).to_hex().to_string();
    assert!(
        err.contains(&format!("INFO: archive blake3 checksum: {sum}")),
        "{err}"
    );

    // --dumpdir and --tmpdir; notes/protected need a storage and are dropped.
    let dd = r.join("/elsewhere");
    let td = r.join("/scratch");
    fs::create_dir_all(&dd).unwrap();
    fs::create_dir_all(&td).unwrap();
    let err = ok(
        &r,
        &[
            "100",
            "--dumpdir",
            dd.to_str().unwrap(),
            "--tmpdir",
            td.to_str().unwrap(),
            "--notes-template",
            "x",
            "--compress",
            "gzip",
            "--pigz",
            "2",
            "--bwlimit",
            "100000",
            "--ionice",
            "8",
        ],
    );
    assert!(err.contains("INFO: bandwidth limit: 100000 KiB/s"), "{err}");
    assert!(err.contains("INFO: ionice priority: 8"), "{err}");
    assert!(!err.contains("adding notes"), "{err}");
    let names = files_in(&dd);
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".tar.gz")).count(),
        1,
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.ends_with(".log")));
    assert!(names.iter().any(|n| n.ends_with(".tar.gz.blake3")));
    assert!(files_in(&td).is_empty(), "tmpdir left: {:?}", files_in(&td));
    run(Command::new("gzip")
        .arg("-t")
        .arg(dd.join(names.iter().find(|n| n.ends_with(".tar.gz")).unwrap())));

    // Notes from the template on a storage.
    std::thread::sleep(Duration::from_millis(1100));
    let err = ok(
        &r,
        &[
            "100",
            "--notes-template",
            r"{{guestname}}/{{vmid}}\n{{node}}\\x",
            "--quiet",
            "0",
        ],
    );
    assert!(err.contains("INFO: adding notes to backup"), "{err}");
    let notes: Vec<String> = files_in(&dump_dir(&r))
        .into_iter()
        .filter(|n| n.ends_with(".notes"))
        .collect();
    assert_eq!(notes.len(), 1);
    let text = fs::read_to_string(dump_dir(&r).join(&notes[0])).unwrap();
    let node = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let node = node.trim().split('.').next().unwrap();
    assert_eq!(text, format!("ct100/100\n{node}\\x"));

    // --quiet: nothing on stderr, the log is still written.
    std::thread::sleep(Duration::from_millis(1100));
    let o = r.run("vzdump", &["100", "--quiet"]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "");
    // --all with --exclude, and a vzdump.conf default.
    r.write("/etc/vzdump.conf", "compress: lzo\n# comment\nbogus line\n");
    std::thread::sleep(Duration::from_millis(1100));
    let err = ok(&r, &["--all", "--exclude", "101"]);
    assert!(
        err.contains("WARN: ignore config line: bogus line"),
        "{err}"
    );
    assert!(
        err.contains("INFO: starting new backup job: vzdump --all 1 --exclude 101"),
        "{err}"
    );
    assert!(err.contains(".tar.lzo'"), "{err}");
    assert_clean(&r, 100);
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| fs::write(root.join("a"), b"a").unwrap());
    let path = r.join("/var/lib/vz");
    let img = r.join("/images-only");
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: local\n\tpath {}\n\tcontent backup,rootdir,images\n\ndir: imgs\n\tpath {}\n\tcontent images\n",
            path.display(),
            img.display()
        ),
    );
    let err = fails(&r, &["999"]);
    assert!(
        err.contains("ERROR: Backup of VM 999 failed - unable to find VM '999'"),
        "{err}"
    );
    assert_eq!(err.lines().last(), Some("job errors"));
    let err = fails(&r, &["100", "--storage", "nope"]);
    assert_eq!(
        err.trim(),
        "could not get storage information for 'nope': storage 'nope' does not exist"
    );
    let err = fails(&r, &["100", "--storage", "imgs"]);
    assert_eq!(
        err.trim(),
        "could not get storage information for 'imgs': can't use storage 'imgs' for backups - wrong content type"
    );
    let err = fails(&r, &["100", "--dumpdir", "/nonexistent/dump"]);
    assert_eq!(err.trim(), "dumpdir '/nonexistent/dump' does not exist");
    let err = fails(&r, &["100", "--tmpdir", "/nonexistent/tmp"]);
    assert_eq!(err.trim(), "tmpdir '/nonexistent/tmp' does not exist");
    let err = fails(&r, &["100", "--notes-template", r"a\q {{bad}}"]);
    assert_eq!(
        err.trim(),
        "Parameter verification failed.\nnotes-template: found unknown: escape sequence '\\q' at char 1, variable 'bad' at char 8"
    );
    let err = fails(&r, &["100", "--mode", "fast"]);
    assert!(
        err.contains("mode: value 'fast' does not have a value in the enumeration"),
        "{err}"
    );
    let err = fails(&r, &[]);
    assert!(err.contains("vmid: property is missing"), "{err}");
    make_ct(&r, 101, |_| {});
    let err = fails(&r, &["100", "101", "--stdout"]);
    assert_eq!(
        err.trim(),
        "you can only backup a single VM with option --stdout"
    );

    // Unwritable dump directory: a read-only bind mount.
    let ro = r.join("/ro-dump");
    fs::create_dir_all(&ro).unwrap();
    run(Command::new("mount").arg("--bind").arg(&ro).arg(&ro));
    run(Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&ro));
    let err = fails(&r, &["100", "--dumpdir", ro.to_str().unwrap()]);
    assert!(
        err.contains("ERROR: Backup of VM 100 failed - unable to create temporary directory"),
        "{err}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(files_in(&ro).is_empty());
    run(Command::new("umount").arg(&ro));

    // The global lock is busy and we may not wait.
    let lock = r.join("/var/run/vzdump.lock");
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        let o = r.run("vzdump", &["100", "--lockwait", "0"]);
        let e = stderr(&o);
        if !o.status.success() || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        err.contains(&format!(
            "can't acquire lock '{}' (wait = 0)",
            lock.display()
        )),
        "{err}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_clean(&r, 100);
    assert!(archives(&dump_dir(&r)).is_empty());
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn full_disk_mid_archive() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| {
        fs::write(root.join("big"), noise(12 << 20, 5)).unwrap();
    });
    let img = r.join("/small.img");
    run(Command::new("truncate").arg("-s").arg("8M").arg(&img));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let dd = r.join("/small");
    fs::create_dir_all(&dd).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&dd));
    let err = fails(&r, &["100", "--dumpdir", dd.to_str().unwrap()]);
    assert!(
        err.contains("ERROR: Backup of VM 100 failed - unable to write '")
            && err.contains(".dat' - No space left on device"),
        "{err}"
    );
    let names = files_in(&dd);
    assert!(
        names
            .iter()
            .all(|n| n == "lost+found" || n.ends_with(".log")),
        "{names:?}"
    );
    let log = names
        .iter()
        .find(|n| n.ends_with(".log"))
        .expect("log kept");
    let text = fs::read_to_string(dd.join(log)).unwrap();
    assert!(text.contains("No space left on device"), "{text}");
    run(Command::new("umount").arg(&dd));
    assert_clean(&r, 100);
}

fn spawn_vzdump(r: &TestRoot, args: &[&str]) -> std::process::Child {
    Command::new(bin("vzdump"))
        .args(args)
        .env("VZKIT_ROOT", r.path())
        .env("TZ", "UTC")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until a `.dat` file is in the dump directory and has grown.
fn wait_for_dat(r: &TestRoot) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(n) = files_in(&dump_dir(r))
            .into_iter()
            .find(|n| n.ends_with(".dat"))
        {
            let p = dump_dir(r).join(n);
            if fs::metadata(&p).map(|m| m.len()).unwrap_or(0) > 0 {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "no .dat appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn signals_and_kill_mid_archive() {
    let r = TestRoot::new();
    make_ct(&r, 100, |root| {
        fs::write(root.join("big"), noise(8 << 20, 11)).unwrap();
        fs::write(root.join("mnt/data/more"), noise(2 << 20, 12)).unwrap();
    });
    // SIGTERM: the task is cleaned up and the job ends "interrupted by signal".
    let child = spawn_vzdump(&r, &["100", "--bwlimit", "1024"]);
    wait_for_dat(&r);
    run(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string()));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = stderr(&out);
    assert!(
        err.contains("ERROR: Backup of VM 100 failed - interrupted by signal"),
        "{err}"
    );
    assert!(
        err.contains("ERROR: Backup job failed - interrupted by signal"),
        "{err}"
    );
    assert!(err.contains("INFO: bandwidth limit: 1024 KiB/s"), "{err}");
    assert_clean(&r, 100);
    assert!(archives(&dump_dir(&r)).is_empty());

    // `vzdump --stop` stops the running job the same way.
    std::thread::sleep(Duration::from_millis(1100));
    let child = spawn_vzdump(&r, &["100", "--bwlimit", "1024"]);
    wait_for_dat(&r);
    let stop = r.run("vzdump", &["--stop"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("ERROR: Backup job failed - interrupted by signal"),
        "{}",
        stderr(&out)
    );
    assert_clean(&r, 100);

    // SIGKILL leaves state behind; the next run cleans it up and works.
    std::thread::sleep(Duration::from_millis(1100));
    let mut child = spawn_vzdump(&r, &["100", "--bwlimit", "1024"]);
    let dat = wait_for_dat(&r);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(conf(&r, 100).contains("lock: backup"));
    assert!(!r.mounts().is_empty());
    assert!(dat.exists());
    std::thread::sleep(Duration::from_millis(1100));
    let err = ok(&r, &["100", "--compress", "zstd"]);
    assert!(
        err.contains("WARN: cleaning up after an interrupted backup of CT 100"),
        "{err}"
    );
    assert!(!dat.exists());
    assert_clean(&r, 100);
    let list = archives(&dump_dir(&r));
    assert_eq!(list.len(), 1, "{list:?}");
    // The killed run's log was kept beside where its archive would have been.
    let killed_log = dat.to_string_lossy().replace(".dat", ".log");
    assert!(Path::new(&killed_log).exists(), "{killed_log}");
    let members = tar_list(&list[0]);
    assert!(members.contains(&"./big".to_string()));
    assert!(members.contains(&"./mnt/data/more".to_string()));
}
