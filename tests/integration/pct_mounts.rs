//! `pct set` / `mount` / `unmount` / `resize` on real loop-mounted ext4 images.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use vzkit_tests::TestRoot;

const BASE_CONF: &str = "arch: amd64\nhostname: ct100\nmemory: 512\nostype: debian\n";

/// Options of the mount at `path` from /proc/self/mountinfo (per-mount and super options).
fn mount_info(path: &Path) -> Option<(String, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == path).then(|| {
            (
                f[sep + 1].to_string(),
                f[5].to_string(),
                f[sep + 3].to_string(),
            )
        })
    })
}

/// The source of the mount at `path` (`/dev/loopN` for an image).
fn mount_source(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == path).then(|| f[sep + 2].to_string())
    })
}

fn dumpe2fs_features(image: &Path) -> String {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn set_allocates_formats_and_mount_order_is_parent_first() {
    let r = TestRoot::new();
    r.write("/etc/pve/lxc/100.conf", BASE_CONF);
    r.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.25",
            "--mp1",
            "local:0.1,mp=/srv/data,backup=1,acl=1",
            "--mp0",
            "local:0,mp=/srv",
            "--mp2",
            "local:0.1,mp=/ro,ro=1,mountoptions=noatime;nodev",
        ],
    );
    let conf = r.read("/etc/pve/lxc/100.conf");
    assert_eq!(
        conf,
        "arch: amd64\nhostname: ct100\nmemory: 512\n\
         mp0: local:100/subvol-100-disk-1.subvol,mp=/srv,size=0T\n\
         mp1: local:100/vm-100-disk-2.raw,mp=/srv/data,acl=1,backup=1,size=102M\n\
         mp2: local:100/vm-100-disk-3.raw,mp=/ro,mountoptions=noatime;nodev,ro=1,size=102M\n\
         ostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=256M\n"
    );
    let img = r.join("/var/lib/vz/images/100/vm-100-disk-0.raw");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 256 << 20);
    let features = dumpe2fs_features(&img);
    assert!(features.contains("mmp"), "ext4 without mmp: {features}");

    let out = r.ok("pct", &["mount", "100"]);
    let root = r.join("/var/lib/lxc/100/rootfs");
    assert_eq!(
        out.trim(),
        format!("mounted CT 100 in '{}'", root.display())
    );
    assert!(r.read("/etc/pve/lxc/100.conf").contains("lock: mounted\n"));
    let (fstype, opts, _) = mount_info(&root).expect("rootfs mounted");
    assert_eq!(fstype, "ext4");
    assert!(opts.starts_with("rw"), "{opts}");
    // The subvol is bind-mounted at /srv, the image at /srv/data on top of it.
    assert!(mount_info(&root.join("srv")).is_some());
    let (fstype, _, sopts) = mount_info(&root.join("srv/data")).expect("mp1 mounted");
    assert_eq!(fstype, "ext4");
    assert!(sopts.contains("acl") || !sopts.contains("noacl"), "{sopts}");
    let (_, ro_opts, _) = mount_info(&root.join("ro")).expect("mp2 mounted");
    assert!(ro_opts.starts_with("ro"), "{ro_opts}");
    assert!(ro_opts.contains("nodev"), "{ro_opts}");
    assert!(
        !ro_opts.contains("noatime"),
        "noatime is not allowed for ro mounts: {ro_opts}"
    );
    assert!(
        std::fs::write(root.join("ro/x"), b"x").is_err(),
        "ro mount is writable"
    );

    // Data written through the mount lands in the images and survives a remount.
    std::fs::write(root.join("srv/data/hello"), b"world").unwrap();
    std::fs::write(root.join("etc-file"), b"root").unwrap();
    let err = r.fails("pct", &["set", "100", "--hostname", "x"]);
    assert_eq!(err.trim(), "CT is locked (mounted)");
    r.ok("pct", &["unmount", "100"]);
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    assert!(!r.read("/etc/pve/lxc/100.conf").contains("lock:"));
    r.ok("pct", &["mount", "100"]);
    assert_eq!(
        std::fs::read(root.join("srv/data/hello")).unwrap(),
        b"world"
    );
    assert_eq!(std::fs::read(root.join("etc-file")).unwrap(), b"root");
    // Files of the subvol live in the storage directory.
    std::fs::write(root.join("srv/in-subvol"), b"s").unwrap();
    assert!(
        r.join("/var/lib/vz/images/100/subvol-100-disk-1.subvol/in-subvol")
            .exists()
    );
    r.ok("pct", &["unmount", "100"]);
    assert!(r.mounts().is_empty());
    // No loop device is left attached to the images.
    let out = Command::new("losetup")
        .arg("--associated")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "loop device leaked: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn quota_bind_and_device_mount_points() {
    let r = TestRoot::new();
    let hostdir = r.join("/srv/shared");
    std::fs::create_dir_all(&hostdir).unwrap();
    std::fs::write(hostdir.join("f"), b"bind").unwrap();
    // A device mount point: a loop device of our own with an ext4 filesystem.
    let devimg = r.join("/dev-image.raw");
    std::fs::File::create(&devimg)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&devimg)
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("losetup")
        .args(["--show", "-f"])
        .arg(&devimg)
        .output()
        .unwrap();
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());

    r.write(
        "/etc/pve/lxc/100.conf",
        &format!(
            "{BASE_CONF}mp0: {},mp=/shared,ro=1\nmp1: {dev},mp=/dev-mp\n",
            hostdir.display()
        ),
    );
    r.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.1",
            "--mp2",
            "local:0.1,mp=/q,quota=1",
        ],
    );
    r.ok("pct", &["mount", "100"]);
    let root = r.join("/var/lib/lxc/100/rootfs");
    assert_eq!(std::fs::read(root.join("shared/f")).unwrap(), b"bind");
    // Writable images are attached with direct I/O (cached once, not again by the host)
    // where it suits their file system (ext4 or xfs with 512-byte direct I/O: this host's).
    for m in [root.clone(), root.join("q")] {
        let src = mount_source(&m).unwrap();
        let sys = Path::new("/sys/block")
            .join(src.strip_prefix("/dev/").unwrap())
            .join("loop");
        let dio = std::fs::read_to_string(sys.join("dio")).unwrap();
        let image = std::fs::read_to_string(sys.join("backing_file")).unwrap();
        let suits = vzkit_host::mount::direct_io_suits(Path::new(image.trim()));
        assert_eq!(dio.trim() == "1", suits, "{src} of {}", m.display());
    }
    let (_, opts, _) = mount_info(&root.join("shared")).unwrap();
    assert!(opts.starts_with("ro"), "bind mount not read-only: {opts}");
    let (fstype, _, _) = mount_info(&root.join("dev-mp")).unwrap();
    assert_eq!(fstype, "ext4");
    let (_, _, qopts) = mount_info(&root.join("q")).unwrap();
    assert!(
        qopts.contains("usrjquota=aquota.user") && qopts.contains("jqfmt=vfsv0"),
        "quota options missing: {qopts}"
    );
    // Directories created on the way belong to the container's root (0:0 here).
    assert_eq!(std::fs::metadata(root.join("q")).unwrap().uid(), 0);
    r.ok("pct", &["unmount", "100"]);
    assert!(r.mounts().is_empty());
    // The device's loop stays attached: vzkit must not detach what it did not attach.
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        dev.trim_start_matches("/dev/")
    );
    assert!(
        Path::new(&backing).exists(),
        "{dev} was detached by pct unmount"
    );
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn resize_grows_image_and_filesystem() {
    let r = TestRoot::new();
    r.write("/etc/pve/lxc/100.conf", BASE_CONF);
    r.ok("pct", &["set", "100", "--rootfs", "local:0.125"]);
    r.ok("pct", &["resize", "100", "rootfs", "+64M"]);
    assert!(
        r.read("/etc/pve/lxc/100.conf")
            .contains("rootfs: local:100/vm-100-disk-0.raw,size=192M\n")
    );
    r.ok("pct", &["resize", "100", "rootfs", "256M"]);
    let err = r.fails("pct", &["resize", "100", "rootfs", "100M"]);
    assert_eq!(err.trim(), "unable to shrink disk size");
    assert!(r.read("/etc/pve/lxc/100.conf").contains("size=256M\n"));
    r.ok("pct", &["mount", "100"]);
    let root = r.join("/var/lib/lxc/100/rootfs");
    let st = rustix::fs::statvfs(&root).unwrap();
    let total = st.f_blocks * st.f_frsize;
    assert!(total > 200 << 20, "filesystem not grown: {total} bytes");
    r.ok("pct", &["unmount", "100"]);
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn delete_moves_volumes_to_unused_and_unlock_clears_locks() {
    let r = TestRoot::new();
    r.write("/etc/pve/lxc/100.conf", BASE_CONF);
    r.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.1",
            "--mp0",
            "local:0.1,mp=/a",
        ],
    );
    r.ok("pct", &["set", "100", "--delete", "mp0"]);
    let conf = r.read("/etc/pve/lxc/100.conf");
    assert!(
        conf.contains("unused0: local:100/vm-100-disk-1.raw\n"),
        "{conf}"
    );
    assert!(!conf.contains("mp0:"));
    // Re-attaching the unused volume removes the unusedN entry.
    r.ok(
        "pct",
        &["set", "100", "--mp3", "local:100/vm-100-disk-1.raw,mp=/b"],
    );
    let conf = r.read("/etc/pve/lxc/100.conf");
    assert!(
        conf.contains("mp3: local:100/vm-100-disk-1.raw,mp=/b\n"),
        "{conf}"
    );
    assert!(!conf.contains("unused0"), "{conf}");
    // A volume used by a config cannot be freed.
    let err = r.fails("pvesm", &["free", "local:100/vm-100-disk-1.raw"]);
    assert!(err.contains("still in use by CT 100 (mp3)"), "{err}");
    r.write(
        "/etc/pve/lxc/100.conf",
        &format!("{}lock: backup\n", r.read("/etc/pve/lxc/100.conf")),
    );
    assert_eq!(
        r.fails("pct", &["mount", "100"]).trim(),
        "CT is locked (backup)"
    );
    r.ok("pct", &["unlock", "100"]);
    assert!(!r.read("/etc/pve/lxc/100.conf").contains("lock:"));
    let list = r.ok("pct", &["list"]);
    assert_eq!(list, "VMID Status  Lock Name\n100  stopped      ct100\n");
}
