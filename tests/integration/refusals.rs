//! Bad input gets a clear error and changes nothing: no config rewritten, no volume left
//! behind, no lock held.

use vzkit_tests::TestRoot;

const CONF: &str = "arch: amd64\nhostname: ct100\nmemory: 512\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=64M\n";

fn setup() -> TestRoot {
    let r = TestRoot::new();
    r.write(
        "/etc/pve/lxc/100.conf",
        "arch: amd64\nhostname: ct100\nmemory: 512\nostype: debian\n",
    );
    r.ok("pct", &["set", "100", "--rootfs", "local:0.0625"]);
    assert_eq!(r.read("/etc/pve/lxc/100.conf"), CONF);
    r
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn refused_commands_change_nothing() {
    let r = setup();
    let cases: &[(&[&str], &str)] = &[
        (
            &["set", "100", "--mp0", "nosuch:1,mp=/x"],
            "storage 'nosuch' does not exist",
        ),
        (&["set", "100", "--mp0", "local:1"], "mp"),
        (
            &["set", "100", "--mp0", "local:1,mp=/x,size=12Q"],
            "invalid size",
        ),
        (
            &["set", "100", "--mp0", "local:1,mp=/../x"],
            "illegal character sequences",
        ),
        (&["set", "100", "--foo", "1"], "unknown setting 'foo'"),
        (&["set", "100", "--memory", "lots"], "memory"),
        (
            &[
                "set",
                "100",
                "--mp0",
                "local:100/vm-100-disk-0.raw,mp=/again",
            ],
            "already used by rootfs",
        ),
        // The second volume would be fine, the first key is bad: nothing is allocated.
        (
            &[
                "set",
                "100",
                "--mp1",
                "local:0.1,mp=/ok",
                "--mp0",
                "local:1,mp=/x,bogus=1",
            ],
            "bogus",
        ),
        (
            &["set", "100", "--delete", "rootfs"],
            "unable to delete required option 'rootfs'",
        ),
        (
            &["resize", "100", "rootfs", "32M"],
            "unable to shrink disk size",
        ),
        (&["resize", "100", "mp7", "+1G"], "mp7"),
        (
            &["unmount", "100"],
            "no lock found trying to remove 'mounted' lock",
        ),
        (&["config", "999"], "does not exist"),
    ];
    let before = r.snapshot_files();
    for (args, want) in cases {
        let err = r.fails("pct", args);
        assert!(
            err.contains(want),
            "pct {args:?}: expected '{want}' in: {err}"
        );
        assert_eq!(r.snapshot_files(), before, "pct {args:?} changed files");
        assert!(r.mounts().is_empty(), "pct {args:?} left mounts");
    }
    // The config lock is not held afterwards: a normal change goes through at once.
    r.ok("pct", &["set", "100", "--hostname", "fine"]);
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn a_failed_mount_unmounts_what_it_mounted() {
    let r = setup();
    // mp0 is a bind mount of a directory that does not exist: rootfs mounts, mp0 fails.
    let conf = format!(
        "{CONF}mp0: {},mp=/missing\n",
        r.join("/nonexistent").display()
    );
    r.write("/etc/pve/lxc/100.conf", &conf);
    let err = r.fails("pct", &["mount", "100"]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(r.mounts().is_empty(), "left mounted: {:?}", r.mounts());
    assert_eq!(r.read("/etc/pve/lxc/100.conf"), conf, "config changed");
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn a_symlink_in_the_container_cannot_redirect_a_mount_point() {
    let r = setup();
    r.ok("pct", &["mount", "100"]);
    let root = r.join("/var/lib/lxc/100/rootfs");
    let outside = r.join("/outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    r.ok("pct", &["unmount", "100"]);
    r.ok(
        "pct",
        &["set", "100", "--mp0", "local:0.0625,mp=/escape/data"],
    );
    let err = r.fails("pct", &["mount", "100"]);
    assert!(err.contains("symlink encountered at: ./escape"), "{err}");
    assert!(r.mounts().is_empty());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was created outside"
    );
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn malformed_config_is_reported_not_rewritten() {
    let r = TestRoot::new();
    let bad = "arch: amd64\nrootfs: local:100/vm-100-disk-0.raw,size=64M,mp=/\n";
    r.write("/etc/pve/lxc/100.conf", bad);
    let err = r.fails("pct", &["mount", "100"]);
    assert!(err.contains("mp"), "{err}");
    assert_eq!(r.read("/etc/pve/lxc/100.conf"), bad);
}
