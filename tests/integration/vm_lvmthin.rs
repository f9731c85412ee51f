//! The kernel-VM tier: LVM-thin, quota enforcement and a snapshot-mode backup of a running
//! LXC container on LVM-thin, on Debian's kernel under qemu (this host's kernel has neither
//! device-mapper nor ext4 quota support).
//!
//! One guest boot serves every test here: the first test to ask for [`guest_run`] boots the
//! VM, which runs all groups of steps (see `tests/src/vm.rs`); each test then asserts its own
//! group from the captured output. vzkit's real `pvesm` and `pct` run in the guest, and the
//! plugin API is driven by this very test binary, re-run inside the guest with
//! [`vm::GUEST_ENV`] set (it then executes [`plugin_api_steps`] instead of booting).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use vzkit_host::command::SystemRunner;
use vzkit_storage::config::StorageConfig;
use vzkit_storage::error::StorageError;
use vzkit_storage::plugin::{StoragePlugin, VolumeAccess};
use vzkit_storage::plugins::lvmthin::LvmThinPlugin;
use vzkit_tests::pools::{ok, run};
use vzkit_tests::vm::{self, GuestPlan, GuestRun, Outcome};

/// The guest's scratch root for the LVM-thin container (on the guest's `/run` tmpfs).
const ROOT: &str = "/run/vzkit-root";
/// The guest's scratch root for the quota container (default `local` dir storage only).
const QROOT: &str = "/run/vzkit-quota";
const BASE_CONF: &str = "arch: amd64\nhostname: ct100\nmemory: 512\nostype: debian\n";
/// The name of the plugin-API test, re-run inside the guest.
const PLUGIN_TEST: &str = "vm_lvmthin::lvmthin_plugin_api_in_vm";
/// The name of the snapshot-mode backup test, re-run inside the guest.
const SNAPSHOT_TEST: &str = "vm_lvmthin::lvmthin_snapshot_mode_backup_of_a_running_container_in_vm";

fn storage_cfg() -> String {
    format!(
        "dir: local\n\tpath {ROOT}/var/lib/vz\n\tcontent rootdir,images,vztmpl,iso,backup,snippets\n\n\
         lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n"
    )
}

/// Every step of the one guest boot.
fn plan() -> GuestPlan {
    let test_exe = std::env::current_exe().expect("current exe");
    let lvm_setup = format!(
        "pvcreate -q /dev/vda\n\
         vgcreate -q pve /dev/vda\n\
         lvcreate -q --type thin-pool -L 3G -n data pve\n\
         mkdir -p {ROOT}/etc/pve/lxc\n\
         cat > {ROOT}/etc/pve/storage.cfg <<'EOF'\n{cfg}EOF\n\
         lvs --noheadings -o lv_name,lv_attr pve\n",
        cfg = storage_cfg()
    );
    let ct = format!("{ROOT}/var/lib/lxc/100/rootfs");
    let q = format!("{QROOT}/var/lib/lxc/200/rootfs/q");
    GuestPlan::new()
        .modules(&["dm-thin-pool", "dm-snapshot", "loop", "quota_v2", "btrfs", "veth", "bridge",
            "sch_htb", "sch_ingress", "cls_basic", "act_police"])
        .env("PVESM", vzkit_tests::bin("pvesm"))
        .env("PCT", vzkit_tests::bin("pct"))
        .env("TEST_EXE", &test_exe)
        .env("TZ", "UTC")
        .timeout(Duration::from_secs(900))
        .group("lvm", &[])
        .step("lvm-setup", &lvm_setup)
        // pvesm on the lvmthin storage.
        .group("pvesm", &["lvm"])
        .step(
            "pvesm-status",
            &format!("export VZKIT_ROOT={ROOT}\n$PVESM status --output-format json\n"),
        )
        .step(
            "pvesm-alloc",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 $PVESM alloc local-lvm 100 '' 64M\n\
                 $PVESM alloc local-lvm 100 vm-100-disk-7 1G\n"
            ),
        )
        .step(
            "pvesm-alloc-lvs",
            "lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,lv_attr,pool_lv pve\n",
        )
        .step(
            "pvesm-list",
            &format!("export VZKIT_ROOT={ROOT}\n$PVESM list local-lvm --output-format json\n"),
        )
        .step(
            "pvesm-path",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 p=$($PVESM path local-lvm:vm-100-disk-0)\n\
                 test -b \"$p\"\n\
                 echo \"$p\"\n"
            ),
        )
        .step(
            "pvesm-free",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 $PVESM free local-lvm:vm-100-disk-0\n\
                 $PVESM free local-lvm:vm-100-disk-7\n\
                 lvs --noheadings -o lv_name pve\n"
            ),
        )
        // pct with the rootfs and mount points (one with quota=1) on lvmthin.
        .group("pct", &["pvesm"])
        .step(
            "pct-set",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 printf '{conf}' > {ROOT}/etc/pve/lxc/100.conf\n\
                 $PCT set 100 --rootfs local-lvm:1 --mp0 local-lvm:0.25,mp=/srv/data \\\n\
                   --mp1 local-lvm:0.125,mp=/srv/q,quota=1\n\
                 cat {ROOT}/etc/pve/lxc/100.conf\n\
                 echo ---\n\
                 dumpe2fs -h /dev/pve/vm-100-disk-1 2>/dev/null | grep -E '^(Filesystem features|Block count|Block size):'\n",
                conf = BASE_CONF.replace('\n', "\\n")
            ),
        )
        .step(
            "pct-mount",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 $PCT mount 100\n\
                 echo hello > {ct}/hello\n\
                 head -c 8388608 /dev/urandom > {ct}/srv/data/blob\n\
                 sha256sum {ct}/srv/data/blob > /run/blob.sha256\n\
                 echo ---\n\
                 findmnt -rn -o TARGET,SOURCE,FSTYPE -R {ct}\n\
                 echo ---\n\
                 findmnt -n -o OPTIONS {ct}/srv/q\n\
                 echo ---\n\
                 grep -o 'lock: .*' {ROOT}/etc/pve/lxc/100.conf\n\
                 $PCT unmount 100\n\
                 ! findmnt {ct}\n"
            ),
        )
        .step(
            "pct-resize",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 $PCT resize 100 mp0 +256M\n\
                 lvs --noheadings --units b --nosuffix -o lv_size pve/vm-100-disk-1\n\
                 grep '^mp0:' {ROOT}/etc/pve/lxc/100.conf\n"
            ),
        )
        .step(
            "pct-remount",
            &format!(
                "export VZKIT_ROOT={ROOT}\n\
                 $PCT mount 100\n\
                 cat {ct}/hello\n\
                 sha256sum -c /run/blob.sha256\n\
                 df -B1 --output=size {ct}/srv/data | tail -n 1\n\
                 $PCT unmount 100\n\
                 $PVESM list local-lvm --vmid 100 --output-format json\n"
            ),
        )
        // The plugin API, by this test binary inside the guest.
        .group("plugin-api", &["lvm"])
        .step(
            "plugin-api",
            &format!(
                "export {}=1\n\
                 \"$TEST_EXE\" --exact {PLUGIN_TEST} --include-ignored --nocapture --test-threads 1\n",
                vm::GUEST_ENV
            ),
        )
        // A running container on LXC in the guest, backed up in snapshot mode.
        .group("lxc-snapshot", &["lvm"])
        .step(
            "lxc-host",
            // What LXC needs of a host: the hybrid cgroup v1 layout this project's LXC
            // configuration is written for (as on the build host), devpts for the console,
            // and no lxcfs (its mount hook skips an empty directory).
            "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n\
             for c in cpu cpuacct cpuset memory devices freezer blkio pids; do\n\
             \tmkdir /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c\n\
             done\n\
             mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified\n\
             mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd\n\
             mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified\n\
             mkdir -p /dev/pts\n\
             mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts\n\
             ln -sf pts/ptmx /dev/ptmx\n\
             mount -t tmpfs tmpfs /var/lib/lxcfs\n\
             ip link add vzkbr0 type bridge\n\
             ip link set vzkbr0 up\n\
             grep cgroup /proc/self/mounts\n",
        )
        .step(
            "lxc-snapshot-backup",
            &format!(
                "export {}=1\n\
                 \"$TEST_EXE\" --exact {SNAPSHOT_TEST} --include-ignored --nocapture --test-threads 1\n",
                vm::GUEST_ENV
            ),
        )
        // The harness itself: a failing step is reported, the rest of its group and the
        // groups that need it are skipped.
        .group("self-check", &[])
        .step("self-check-fails", "echo before\nexit 3\necho after\n")
        .step("self-check-skipped", "true\n")
        .group("self-check-needs", &["self-check"])
        .step("self-check-needs-skipped", "true\n")
        // Quota enforcement on a `quota=1` mount point (ext4 image on a loop device).
        .group("quota", &[])
        .step(
            "quota-mount",
            &format!(
                "export VZKIT_ROOT={QROOT}\n\
                 mkdir -p {QROOT}/etc/pve/lxc\n\
                 printf '{conf}' > {QROOT}/etc/pve/lxc/200.conf\n\
                 $PCT set 200 --rootfs local:0.25 --mp0 local:0.125,mp=/q,quota=1\n\
                 $PCT mount 200\n\
                 findmnt -n -o OPTIONS {q}\n",
                conf = BASE_CONF.replace('\n', "\\n")
            ),
        )
        .step(
            "quota-on",
            &format!(
                "quotacheck -cmug {q}\n\
                 quotaon {q}\n\
                 mkdir {q}/u1000\n\
                 chown 1000:1000 {q}/u1000\n\
                 setquota -u 1000 4096 5120 0 0 {q}\n\
                 repquota -n -u {q}\n"
            ),
        )
        .step(
            "quota-exceeded",
            &format!(
                "w() {{ setpriv --reuid=1000 --regid=1000 --clear-groups dd if=/dev/zero of=$1 bs=1M count=$2 conv=fsync; }}\n\
                 w {q}/u1000/small 2\n\
                 if w {q}/u1000/big 10 2> /run/dd.err; then\n\
                 \techo 'a write beyond the hard limit succeeded'; exit 1\n\
                 fi\n\
                 cat /run/dd.err\n\
                 echo ---\n\
                 stat -c %s {q}/u1000/big\n\
                 echo ---\n\
                 dd if=/dev/zero of={q}/root-big bs=1M count=10 conv=fsync 2>&1 | tail -n 1\n\
                 repquota -n -u {q}\n"
            ),
        )
        .step(
            "quota-unmount",
            &format!(
                "quotaoff {q}\n\
                 export VZKIT_ROOT={QROOT}\n\
                 $PCT unmount 200\n\
                 ! findmnt {q}\n"
            ),
        )
}

static RUN: OnceLock<Result<GuestRun, String>> = OnceLock::new();

/// The one guest boot of this test binary (booted by the first test that asks).
fn guest_run() -> &'static GuestRun {
    let run = RUN.get_or_init(|| {
        let res = plan().run();
        if let Ok(r) = &res {
            eprintln!("{}", r.timings());
        }
        res
    });
    run.as_ref().unwrap_or_else(|e| panic!("{e}"))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

fn section(out: &str, n: usize) -> &str {
    out.split("---\n")
        .nth(n)
        .unwrap_or_else(|| panic!("no section {n} in:\n{out}"))
}

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn lvmthin_pvesm_status_alloc_list_free_in_vm() {
    let run = guest_run();
    run.assert_group_ok("pvesm");

    let rows = json(run.ok("pvesm-status"));
    let lvm = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["storage"] == "local-lvm")
        .unwrap_or_else(|| panic!("no local-lvm in {rows}"));
    assert_eq!(lvm["type"], "lvmthin");
    assert_eq!(lvm["active"], 1);
    assert_eq!(lvm["total"], 3u64 << 30, "{lvm}");
    let used = lvm["used"].as_u64().unwrap();
    assert!(used < 64 << 20, "a fresh pool uses {used} bytes");
    assert_eq!(lvm["avail"].as_u64().unwrap(), (3u64 << 30) - used);

    assert_eq!(
        run.ok("pvesm-alloc"),
        "successfully created 'local-lvm:vm-100-disk-0'\n\
         successfully created 'local-lvm:vm-100-disk-7'\n"
    );
    let lvs = json(run.ok("pvesm-alloc-lvs"));
    let lvs = lvs["report"][0]["lv"].as_array().unwrap();
    let lv = |name: &str| {
        lvs.iter()
            .find(|l| l["lv_name"] == name)
            .unwrap_or_else(|| panic!("no LV {name} in {lvs:?}"))
    };
    assert_eq!(lv("vm-100-disk-0")["lv_size"], "67108864");
    assert_eq!(lv("vm-100-disk-0")["pool_lv"], "data");
    // A thin volume ('V'), active ('a').
    let attr = lv("vm-100-disk-0")["lv_attr"].as_str().unwrap().to_string();
    assert!(
        attr.starts_with('V') && attr.chars().nth(4) == Some('a'),
        "{attr}"
    );
    assert_eq!(lv("vm-100-disk-7")["lv_size"], "1073741824");

    let list = json(run.ok("pvesm-list"));
    let vols: Vec<(String, u64, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["volid"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
                v["format"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        vols,
        [
            ("local-lvm:vm-100-disk-0".into(), 64 << 20, "raw".into()),
            ("local-lvm:vm-100-disk-7".into(), 1 << 30, "raw".into()),
        ]
    );
    assert_eq!(run.ok("pvesm-path"), "/dev/pve/vm-100-disk-0\n");
    let left: Vec<&str> = run.ok("pvesm-free").split_whitespace().collect();
    assert_eq!(left, ["data"], "only the pool is left after pvesm free");
}

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn lvmthin_pct_set_mount_resize_in_vm() {
    let run = guest_run();
    run.assert_group_ok("pct");

    let out = run.ok("pct-set");
    let conf = section(out, 0);
    assert_eq!(
        conf,
        "arch: amd64\nhostname: ct100\nmemory: 512\n\
         mp0: local-lvm:vm-100-disk-1,mp=/srv/data,size=256M\n\
         mp1: local-lvm:vm-100-disk-2,mp=/srv/q,quota=1,size=128M\n\
         ostype: debian\nrootfs: local-lvm:vm-100-disk-0,size=1G\n"
    );
    let fs = section(out, 1);
    assert!(fs.contains(" mmp"), "ext4 without mmp: {fs}");

    let out = run.ok("pct-mount");
    assert_eq!(
        section(out, 0),
        format!("mounted CT 100 in '{ROOT}/var/lib/lxc/100/rootfs'\n")
    );
    let mounts = section(out, 1);
    assert!(
        mounts.contains(&format!(
            "{ROOT}/var/lib/lxc/100/rootfs /dev/mapper/pve-vm--100--disk--0 ext4"
        )),
        "{mounts}"
    );
    assert!(
        mounts.contains(&format!(
            "{ROOT}/var/lib/lxc/100/rootfs/srv/data /dev/mapper/pve-vm--100--disk--1 ext4"
        )),
        "{mounts}"
    );
    // quota=1 on a block device: the journaled quota options.
    let opts: Vec<&str> = section(out, 2).trim().split(',').collect();
    for o in [
        "usrjquota=aquota.user",
        "grpjquota=aquota.group",
        "jqfmt=vfsv0",
    ] {
        assert!(
            opts.contains(&o),
            "quota=1 mount point without {o}: {opts:?}"
        );
    }
    assert_eq!(section(out, 3), "lock: mounted\n");

    let out = run.ok("pct-resize");
    let mut lines = out.lines();
    assert_eq!(lines.next().map(str::trim), Some("536870912"), "{out}");
    assert_eq!(
        lines.next(),
        Some("mp0: local-lvm:vm-100-disk-1,mp=/srv/data,size=512M")
    );

    let out = run.ok("pct-remount");
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .starts_with("mounted CT 100"),
        "{out}"
    );
    assert_eq!(lines.next(), Some("hello"), "{out}");
    assert!(lines.next().unwrap_or_default().ends_with(": OK"), "{out}");
    let fs_size: u64 = lines.next().unwrap_or_default().trim().parse().unwrap();
    assert!(
        fs_size > 400 << 20,
        "resize2fs did not grow the filesystem: {fs_size}"
    );
    let rest: String = lines.map(|l| format!("{l}\n")).collect();
    let list = json(&rest);
    let vols: Vec<(&str, &str, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["volid"].as_str().unwrap(),
                v["content"].as_str().unwrap(),
                v["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        vols,
        [
            ("local-lvm:vm-100-disk-0", "rootdir", 1 << 30),
            ("local-lvm:vm-100-disk-1", "rootdir", 512 << 20),
            ("local-lvm:vm-100-disk-2", "rootdir", 128 << 20),
        ]
    );
}

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn quota_enforced_on_a_quota_mount_point_in_vm() {
    let run = guest_run();
    run.assert_group_ok("quota");
    let out = run.ok("quota-mount");
    let opts: Vec<&str> = out.lines().last().unwrap_or_default().split(',').collect();
    for o in [
        "usrjquota=aquota.user",
        "grpjquota=aquota.group",
        "jqfmt=vfsv0",
    ] {
        assert!(opts.contains(&o), "quota=1 mount without {o}: {out}");
    }
    let rep = run.ok("quota-on");
    assert!(
        rep.lines()
            .any(|l| l.starts_with("#1000") && l.contains("4096") && l.contains("5120")),
        "no limits for uid 1000 in repquota:\n{rep}"
    );
    let out = run.ok("quota-exceeded");
    let err = section(out, 0);
    assert!(err.contains("Disk quota exceeded"), "{out}");
    let big: u64 = section(out, 1).trim().parse().unwrap();
    assert!(
        big < 4 << 20,
        "uid 1000 wrote {big} bytes past its 5 MiB hard limit (2 MiB already used)"
    );
    // Root is not limited (CAP_SYS_RESOURCE): the limit is the user's, not a full disk.
    let root = section(out, 2);
    assert!(root.contains("10485760 bytes"), "{out}");
}

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn lvmthin_plugin_api_in_vm() {
    if vm::in_guest() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(plugin_api_steps());
        return;
    }
    println!(
        "{}",
        guest_test_output("plugin-api", "plugin-api", "plugin-api: all steps passed")
    );
}

/// The output of a test that re-ran itself in the guest (step `step` of `group`), checked to
/// have passed and printed `marker`.
fn guest_test_output(group: &str, step: &str, marker: &str) -> &'static str {
    let run = guest_run();
    run.assert_group_ok(group);
    let out = run.ok(step);
    // The guest really ran the test (a name filter matching nothing would also exit 0).
    assert!(
        out.contains("test result: ok. 1 passed"),
        "the test of step {step} did not run in the guest:\n{out}"
    );
    assert!(out.contains(marker), "{out}");
    out
}

/// Snapshot mode on LVM-thin: a running busybox container (rootfs on lvmthin, a `backup=1`
/// mount point on a btrfs image) is backed up by the real `vzdump` binary inside the guest.
/// The `snap_<vol>_vzdump` LV and the btrfs snapshot are gone afterwards and the container
/// kept running. The archive is restored onto `dir` and back onto lvmthin, both trees equal
/// the source.
#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn lvmthin_snapshot_mode_backup_of_a_running_container_in_vm() {
    if vm::in_guest() {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(snapshot_backup_steps());
        return;
    }
    println!(
        "{}",
        guest_test_output(
            "lxc-snapshot",
            "lxc-snapshot-backup",
            "lxc-snapshot: all steps passed"
        )
    );
}

async fn snapshot_backup_steps() {
    use vzkit_host::paths::Layout;
    use vzkit_runtime::lxc::{Lxc, State};
    use vzkit_storage::manager::Storages;

    let step = |s: &str| println!("lxc-snapshot: {s}");
    let mut warn = |m: String| eprintln!("WARN: {m}");
    let r = vzkit_tests::TestRoot::new();
    let bt = r.join("/btrfs");
    std::fs::create_dir_all(&bt).unwrap();
    let img = r.join("/btrfs.img");
    ok("truncate", &["-s", "256M", &img.to_string_lossy()]);
    ok("mkfs.btrfs", &["-q", &img.to_string_lossy()]);
    ok(
        "mount",
        &["-o", "loop", &img.to_string_lossy(), &bt.to_string_lossy()],
    );
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: local\n\tpath {}\n\tcontent rootdir,images,backup\n\n\
             lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n\n\
             btrfs: bt\n\tpath {}\n\tcontent rootdir,images\n",
            r.join("/var/lib/vz").display(),
            bt.display()
        ),
    );
    r.write(
        "/etc/pve/lxc/400.conf",
        "arch: amd64\nhostname: ct400\nmemory: 64\nostype: alpine\n\
         net0: name=eth0,bridge=vzkbr0,ip=10.250.9.2/24,rate=1.5,type=veth\n",
    );
    r.ok(
        "pct",
        &[
            "set",
            "400",
            "--rootfs",
            "local-lvm:0.25",
            "--mp0",
            "bt:0,mp=/mnt/data,backup=1",
        ],
    );
    r.ok("pct", &["mount", "400"]);
    let root = r.join("/var/lib/lxc/400/rootfs");
    vzkit_tests::lxc::populate_busybox(&root, "ct400");
    std::fs::create_dir_all(root.join("mnt/data/sub")).unwrap();
    std::fs::write(root.join("mnt/data/sub/f"), b"on btrfs\n").unwrap();
    std::fs::write(root.join("root/blob"), crate::common::noise(1 << 20, 3)).unwrap();
    ok(
        "chown",
        &["-h", "33:33", &root.join("mnt/data/sub").to_string_lossy()],
    );
    r.ok("pct", &["unmount", "400"]);
    step("container on lvmthin + btrfs populated");

    let s = Storages::load(Layout::new(r.path()), Arc::new(SystemRunner))
        .unwrap()
        .0;
    let lxc = Lxc::new(&s);
    lxc.start(400, false, &mut warn).await.unwrap();
    let out = lxc
        .exec(
            400,
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo live > /root/live.txt".into(),
            ],
        )
        .await
        .unwrap();
    assert!(out.success(), "{}", out.stderr_str());
    let pid = lxc.init_pid(400).await.unwrap();
    step("container running");
    // net0's rate (1.5 MB/s) on the host end, with PVE's htb class and ingress policer.
    let class = ok("tc", &["class", "show", "dev", "veth400i0"]);
    assert!(
        class.contains("htb 1:1") && class.contains("rate 12582Kbit"),
        "{class}"
    );
    let filter = ok(
        "tc",
        &["filter", "show", "dev", "veth400i0", "parent", "ffff:"],
    );
    assert!(
        filter.contains("basic") && filter.contains("police"),
        "{filter}"
    );
    step("net0 rate limit set on veth400i0");

    // A backup that fails after the snapshots were taken (a 256 KiB dump directory cannot
    // hold the archive): both vzdump snapshots are removed, the container runs on.
    let small = r.join("/small-dump");
    std::fs::create_dir_all(&small).unwrap();
    ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=256k",
            "tmpfs",
            &small.to_string_lossy(),
        ],
    );
    let o = r.run(
        "vzdump",
        &[
            "400",
            "--mode",
            "snapshot",
            "--dumpdir",
            &small.to_string_lossy(),
            "--compress",
            "zstd",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    ok("umount", &[&small.to_string_lossy()]);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("create storage snapshot 'vzdump'"), "{log}");
    assert!(log.contains("Backup of VM 400 failed - "), "{log}");
    assert!(
        !lv_names().iter().any(|n| n.contains("vzdump")),
        "{:?}",
        lv_names()
    );
    let subvols = ok("btrfs", &["subvolume", "list", &bt.to_string_lossy()]);
    assert!(!subvols.contains("vzdump"), "{subvols}");
    assert_eq!(lxc.init_pid(400).await.unwrap(), pid);
    step("a failing snapshot-mode backup leaves no vzdump snapshot");

    let dump = r.join("/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let o = r.run(
        "vzdump",
        &[
            "400",
            "--mode",
            "snapshot",
            "--dumpdir",
            &dump.to_string_lossy(),
            "--compress",
            "zstd",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{log}");
    for needle in [
        "backup mode: snapshot",
        "create storage snapshot 'vzdump'",
        "including mount point mp0 ('/mnt/data') in backup",
        "cleanup temporary 'vzdump' snapshot",
    ] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }
    assert_eq!(lxc.state(400).await.unwrap(), State::Running);
    assert_eq!(lxc.init_pid(400).await.unwrap(), pid);
    let lvs = lv_names();
    assert!(!lvs.iter().any(|n| n.contains("vzdump")), "{lvs:?}");
    let subvols = ok("btrfs", &["subvolume", "list", &bt.to_string_lossy()]);
    assert!(!subvols.contains("vzdump"), "{subvols}");
    let conf = r.read("/etc/pve/lxc/400.conf");
    assert!(
        !conf.contains("vzdump") && !conf.contains("lock:"),
        "{conf}"
    );
    step("snapshot-mode vzdump of the running container; no vzdump snapshot left");
    lxc.stop(400, &mut warn).await.unwrap();

    let archive = vzkit_tests::the_archive(&dump);
    r.restore_onto(401, &archive, "local:0.25", Some("local:0.1,mp=/mnt/data"));
    let restored = r.restore_onto(
        402,
        &archive,
        "local-lvm:0.25",
        Some("local-lvm:0.1,mp=/mnt/data"),
    );
    assert!(
        restored.contains("rootfs: local-lvm:vm-402-disk-0"),
        "{restored}"
    );
    let sk = crate::restore::Skips {
        // Each restored ext4 volume has its own fresh lost+found.
        meta: vec![b"", b"etc", b"mnt", b"mnt/data", b"lost+found"],
        extra: vec![b"lost+found", b"etc/vzdump", b"mnt/data/lost+found"],
    };
    r.with_mounted(&["400", "401", "402"], || {
        for id in [401, 402] {
            let dst = r.join(&format!("/var/lib/lxc/{id}/rootfs"));
            assert_eq!(
                std::fs::read_to_string(dst.join("root/live.txt")).unwrap(),
                "live\n"
            );
            crate::restore::compare_trees(&root, &dst, 0, &sk);
        }
    });
    ok("umount", &[&bt.to_string_lossy()]);
    step("restored onto dir and onto lvmthin, trees equal");
    println!("lxc-snapshot: all steps passed");
}

fn plugin() -> LvmThinPlugin {
    plugin_from(&storage_cfg(), "local-lvm")
}

fn plugin_from(cfg: &str, id: &str) -> LvmThinPlugin {
    let (cfg, warnings) = StorageConfig::parse(cfg, "storage.cfg");
    assert!(warnings.is_empty(), "{warnings:?}");
    LvmThinPlugin::new(cfg.get(id).unwrap().clone(), Arc::new(SystemRunner)).unwrap()
}

/// Writes `len` bytes of a pattern to `dev` and syncs; the first error.
fn fill_device(dev: &Path, len: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(dev)?;
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..len / chunk.len() {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}

async fn dev(p: &LvmThinPlugin, volname: &str, snap: Option<&str>) -> PathBuf {
    match p.access(volname, snap).await.unwrap() {
        VolumeAccess::BlockDevice(d) => d,
        other => panic!("{volname}: expected a block device, got {other:?}"),
    }
}

const MNT: &str = "/run/plugin-api-mnt";

/// Mounts `dev` (read-only with `noload` when `ro`), returns the content of `f`.
fn read_file(dev: &Path, ro: bool) -> String {
    std::fs::create_dir_all(MNT).unwrap();
    let opts = if ro { "ro,noload" } else { "rw" };
    ok("mount", &["-o", opts, &dev.to_string_lossy(), MNT]);
    let text = std::fs::read_to_string(Path::new(MNT).join("f")).unwrap_or_default();
    ok("umount", &[MNT]);
    text
}

fn write_file(dev: &Path, text: &str) {
    std::fs::create_dir_all(MNT).unwrap();
    ok("mount", &[&dev.to_string_lossy(), MNT]);
    std::fs::write(Path::new(MNT).join("f"), text).unwrap();
    ok("umount", &[MNT]);
}

fn lv_attr(name: &str) -> String {
    ok(
        "lvs",
        &["--noheadings", "-o", "lv_attr", &format!("pve/{name}")],
    )
    .trim()
    .to_string()
}

fn lv_names() -> Vec<String> {
    ok("lvs", &["--noheadings", "-o", "lv_name", "pve"])
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Runs inside the guest (VG `pve` with thin pool `data` exists).
async fn plugin_api_steps() {
    let p = plugin();
    let step = |s: &str| println!("plugin-api: {s}");

    p.activate_storage().await.unwrap();
    let st = p.status().await.unwrap();
    assert!(st.active && st.total == 3 << 30, "{st:?}");
    step("activate_storage, status");

    let vol = p.alloc_image(300, "raw", None, 256 << 10).await.unwrap();
    assert_eq!(vol, "vm-300-disk-0");
    let d = dev(&p, &vol, None).await;
    assert_eq!(d, Path::new("/dev/pve/vm-300-disk-0"));
    ok("mkfs.ext4", &["-q", &d.to_string_lossy()]);
    write_file(&d, "v1");
    let imgs = p.list_images(Some(300)).await.unwrap();
    assert_eq!(imgs.len(), 1);
    assert_eq!(
        (imgs[0].volid.as_str(), imgs[0].size),
        ("local-lvm:vm-300-disk-0", 256 << 20)
    );
    assert_eq!(p.volume_size_info(&vol).await.unwrap(), 256 << 20);
    step("alloc_image, list_images, volume_size_info");

    p.volume_snapshot(&vol, "s1").await.unwrap();
    let err = p.volume_snapshot(&vol, "s1").await.unwrap_err();
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
    write_file(&d, "v2");
    p.volume_snapshot(&vol, "s2").await.unwrap();
    write_file(&d, "v3");
    assert_eq!(p.volume_snapshot_list(&vol).await.unwrap(), ["s1", "s2"]);
    // Snapshots are read-only thin LVs with the activation-skip flag.
    let attr = lv_attr("snap_vm-300-disk-0_s1");
    assert!(attr.starts_with("Vri") && attr.ends_with('k'), "{attr}");
    step("volume_snapshot (twice refused), volume_snapshot_list");

    p.activate_volume(&vol, Some("s1")).await.unwrap();
    let s1 = dev(&p, &vol, Some("s1")).await;
    assert_eq!(read_file(&s1, true), "v1");
    p.deactivate_volume(&vol, Some("s1")).await.unwrap();
    assert!(
        !s1.exists(),
        "{} still there after deactivation",
        s1.display()
    );
    step("activate/deactivate a snapshot, read it ro,noload");

    // A missing snapshot is refused and the volume is kept.
    let err = p
        .volume_snapshot_rollback(&vol, "nosuch")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "can't rollback, snapshot 'nosuch' does not exist on 'local-lvm:vm-300-disk-0'"
    );
    assert_eq!(read_file(&d, false), "v3");
    // Rollback to the older snapshot (thin snapshots are independent: allowed).
    p.volume_rollback_is_possible(&vol, "s1").await.unwrap();
    p.volume_snapshot_rollback(&vol, "s1").await.unwrap();
    p.activate_volume(&vol, None).await.unwrap();
    assert_eq!(read_file(&d, false), "v1");
    write_file(&d, "v4");
    assert_eq!(read_file(&d, false), "v4");
    let attr = lv_attr("vm-300-disk-0");
    assert!(attr.starts_with("Vwi-a"), "rolled back volume: {attr}");
    step("volume_snapshot_rollback (writable afterwards)");

    p.volume_snapshot_delete(&vol, "s2").await.unwrap();
    assert_eq!(p.volume_snapshot_list(&vol).await.unwrap(), ["s1"]);
    let err = p.create_base(&vol).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unable to create base volume - found snaphost 's1'"
    );
    step("volume_snapshot_delete, create_base refused with a snapshot");

    // Linked clone from a snapshot.
    let c1 = p.clone_image(&vol, 301, Some("s1")).await.unwrap();
    assert_eq!(c1, "vm-301-disk-0");
    p.activate_volume(&c1, None).await.unwrap();
    let c1dev = dev(&p, &c1, None).await;
    assert_eq!(read_file(&c1dev, false), "v1");
    write_file(&c1dev, "c1");
    step("clone_image from a snapshot");

    // free_image removes the volume's snapshots with it.
    p.free_image(&vol).await.unwrap();
    let names = lv_names();
    assert!(
        !names.iter().any(|n| n.contains("vm-300-disk-0")),
        "{names:?}"
    );
    assert_eq!(read_file(&c1dev, false), "c1");
    step("free_image with a snapshot");

    // Template: base volume, read-only, activation skip; linked clone of it.
    let base = p.create_base(&c1).await.unwrap();
    assert_eq!(base, "base-301-disk-0");
    let attr = lv_attr(&base);
    assert!(
        attr.starts_with("Vri") && attr.ends_with('k') && attr.chars().nth(4) != Some('a'),
        "base volume: {attr}"
    );
    let c2 = p.clone_image(&base, 302, None).await.unwrap();
    assert_eq!(c2, "vm-302-disk-0");
    p.activate_volume(&c2, None).await.unwrap();
    let c2dev = dev(&p, &c2, None).await;
    assert_eq!(read_file(&c2dev, false), "c1");
    write_file(&c2dev, "c2");
    p.activate_volume(&base, None).await.unwrap();
    assert_eq!(read_file(&dev(&p, &base, None).await, true), "c1");
    p.deactivate_volume(&base, None).await.unwrap();
    let err = p.clone_image(&c2, 303, None).await.unwrap_err();
    assert_eq!(err.to_string(), "clone_image only works on base images");
    step("create_base, clone_image of a base");

    // Resize (lvextend) and size.
    p.volume_resize(&c2, 512 << 20).await.unwrap();
    assert_eq!(p.volume_size_info(&c2).await.unwrap(), 512 << 20);
    let out = run("e2fsck", &["-f", "-y", &c2dev.to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    ok("resize2fs", &[&c2dev.to_string_lossy()]);
    assert_eq!(read_file(&c2dev, false), "c2");
    step("volume_resize");

    // A full pool: thin volumes over-commit (allocation succeeds), writes beyond the pool
    // fail (`--errorwhenfull y`: at once, not after dm-thin's 60 s queueing), and the
    // status shows the pool used up.
    ok(
        "lvcreate",
        &[
            "-q",
            "--type",
            "thin-pool",
            "-L",
            "8M",
            "-n",
            "small",
            "pve",
        ],
    );
    ok("lvchange", &["-q", "--errorwhenfull", "y", "pve/small"]);
    let small = plugin_from(
        "lvmthin: small-lvm\n\tthinpool small\n\tvgname pve\n\tcontent rootdir,images\n",
        "small-lvm",
    );
    let big = small.alloc_image(304, "raw", None, 64 << 10).await.unwrap();
    let bigdev = dev(&small, &big, None).await;
    let err = fill_device(&bigdev, 16 << 20).expect_err("writing 16 MiB into an 8 MiB pool");
    println!("plugin-api: write into a full pool: {err}");
    let st = small.status().await.unwrap();
    assert!(
        st.total == 8 << 20 && st.used == st.total && st.avail == 0,
        "{st:?}"
    );
    small.free_image(&big).await.unwrap();
    ok("lvremove", &["-q", "-f", "pve/small"]);
    step("a full pool");

    p.free_image(&c2).await.unwrap();
    p.free_image(&base).await.unwrap();
    let left: Vec<String> = lv_names()
        .into_iter()
        .filter(|n| n.contains("-30"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    step("free_image of a clone and its base");
    println!("plugin-api: all steps passed");
}

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn vm_harness_reports_failed_and_skipped_steps() {
    let run = guest_run();
    let failed = run.step("self-check-fails");
    assert_eq!(failed.outcome, Outcome::Exited(3));
    assert_eq!(failed.stdout, "before\n");
    assert!(failed.stderr.contains("+ exit 3"), "{}", failed.stderr);
    assert_eq!(run.step("self-check-skipped").outcome, Outcome::Skipped);
    assert_eq!(
        run.step("self-check-needs-skipped").outcome,
        Outcome::Skipped
    );
    let panic = std::panic::catch_unwind(|| run.assert_group_ok("self-check-needs"))
        .expect_err("a skipped group must fail its test");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("step self-check-fails (Exited(3)"), "{msg}");
}

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn vm_harness_fails_a_guest_that_times_out() {
    let plan = GuestPlan::new()
        .timeout(Duration::from_secs(2))
        .group("slow", &[])
        .step("sleep", "sleep 600\n");
    let err = plan
        .run()
        .expect_err("a guest killed after its timeout must be an error");
    assert!(err.contains("timed out after 2 s; qemu killed"), "{err}");
}
