//! The kernel-VM tier for the `iscsi` backend's kernel-initiator path: inside a qemu guest
//! running Debian's kernel (which has `iscsi_tcp`), a tgt target serves a LUN on
//! 127.0.0.1:3261, open-iscsi's `iscsid` runs, and udev names the disk in
//! `/dev/disk/by-id`. vzkit's real `pvesm` logs in with `iscsiadm` (PVE's discovery + login
//! sequence), lists the LUN as the `/dev/sdX` disk it became, and `pct` mounts it as a
//! container mount point (a block device). The data written is then read back from the
//! target's backing file.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use vzkit_tests::vm::{GuestPlan, GuestRun};

/// The guest's scratch root (on the guest's `/run` tmpfs).
const ROOT: &str = "/run/vzkit-iscsi";
const IQN: &str = "iqn.2024-01.org.vzkit.vm:t1";

fn plan() -> GuestPlan {
    let cfg = format!(
        "dir: local\n\tpath {ROOT}/var/lib/vz\n\tcontent rootdir,images,backup\n\n\
         iscsi: san\n\tportal 127.0.0.1:3261\n\ttarget {IQN}\n\tcontent images\n"
    );
    let target = format!(
        "ip link set lo up\n\
         truncate -s 64M /run/lun1.img\n\
         mkfs.ext4 -q -F /run/lun1.img\n\
         tgtd --iscsi portal=127.0.0.1:3261\n\
         for i in $(seq 50); do test -S /run/tgtd/socket.0 && break; sleep 0.1; done\n\
         tgtadm --lld iscsi --op new --mode target --tid 1 -T {IQN}\n\
         tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b /run/lun1.img\n\
         tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL\n\
         tgtadm --lld iscsi --op show --mode target | grep -E 'SCSI (ID|SN)'\n"
    );
    // open-iscsi writes below /etc/iscsi (read-only here): a tmpfs with short login
    // timeouts, as a dead portal would otherwise be retried for two minutes.
    let iscsid = "cp /etc/iscsi/iscsid.conf /run/iscsid.conf\n\
         mount -t tmpfs none /etc/iscsi\n\
         sed -e 's#^iscsid.startup.*#iscsid.startup = /bin/true#' \\\n\
             -e 's#^node.session.initial_login_retry_max.*#node.session.initial_login_retry_max = 1#' \\\n\
             -e 's#^node.conn\\[0\\].timeo.login_timeout.*#node.conn[0].timeo.login_timeout = 5#' \\\n\
             /run/iscsid.conf > /etc/iscsi/iscsid.conf\n\
         echo InitiatorName=iqn.2024-01.org.vzkit.vm:initiator > /etc/iscsi/initiatorname.iscsi\n\
         mkdir -p /run/lock/iscsi\n\
         iscsid\n\
         /lib/systemd/systemd-udevd --daemon\n\
         udevadm trigger --action=add\n\
         udevadm settle -t 30\n\
         test -e /sys/class/iscsi_transport/tcp\n";
    GuestPlan::new()
        .modules(&["iscsi_tcp", "sd_mod", "loop"])
        .env("PVESM", vzkit_tests::bin("pvesm"))
        .env("PCT", vzkit_tests::bin("pct"))
        .env("VZKIT_ROOT", ROOT)
        .env("TZ", "UTC")
        .timeout(Duration::from_secs(600))
        .group("setup", &[])
        .step("tgt", &target)
        .step("iscsid-udev", iscsid)
        .group("pvesm", &["setup"])
        .step(
            "pvesm-status",
            &format!(
                "mkdir -p {ROOT}/etc/pve/lxc\n\
                 cat > {ROOT}/etc/pve/storage.cfg <<'EOF'\n{cfg}EOF\n\
                 $PVESM status --output-format json\n"
            ),
        )
        .step(
            "sessions",
            "udevadm settle -t 30\n\
             iscsiadm --mode session\n\
             echo ---\n\
             ls /dev/disk/by-id | grep -v -- -part || true\n",
        )
        .step("pvesm-list", "$PVESM list san --output-format json\n")
        .step(
            "pvesm-path",
            "vol=$($PVESM list san | awk 'NR==2 {print $1}')\n\
             p=$($PVESM path \"$vol\")\n\
             echo \"$p\"\n\
             test -b \"$p\"\n\
             readlink -f \"$p\"\n",
        )
        .group("pct", &["pvesm"])
        .step(
            "pct-mount",
            &format!(
                "vol=$($PVESM list san | awk 'NR==2 {{print $1}}')\n\
                 printf 'arch: amd64\\nostype: debian\\nhostname: ct100\\n' > {ROOT}/etc/pve/lxc/100.conf\n\
                 $PCT set 100 --rootfs local:0.0625 --mp0 \"$vol,mp=/data\"\n\
                 $PCT mount 100\n\
                 findmnt -n -o SOURCE {ROOT}/var/lib/lxc/100/rootfs/data\n\
                 echo 'through the kernel initiator' > {ROOT}/var/lib/lxc/100/rootfs/data/hello\n\
                 $PCT unmount 100\n\
                 sync\n\
                 echo ---\n\
                 debugfs -R 'cat /hello' /run/lun1.img 2>/dev/null\n\
                 echo ---\n\
                 grep -c '{ROOT}' /proc/mounts || true\n"
            ),
        )
}

static RUN: OnceLock<Result<GuestRun, String>> = OnceLock::new();

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

#[test]
#[ignore = "needs root and qemu: boots a kernel VM"]
fn iscsi_kernel_initiator_logs_in_lists_and_mounts_a_lun_in_vm() {
    let run = guest_run();
    run.assert_group_ok("setup");
    run.assert_group_ok("pvesm");

    let status = json(run.ok("pvesm-status"));
    let san = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["storage"] == "san")
        .unwrap_or_else(|| panic!("san in {status}"))
        .clone();
    assert_eq!(san["active"], 1, "{san}");
    let sessions = run.ok("sessions");
    assert!(
        sessions.contains(&format!("127.0.0.1:3261,1 {IQN}")),
        "{sessions}"
    );

    // One disk LUN (the controller LUN 0 is not listed), named by its by-id link.
    let list = json(run.ok("pvesm-list"));
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{list}");
    let volid = rows[0]["volid"].as_str().unwrap();
    let by_id = volid
        .strip_prefix("san:")
        .and_then(|v| v.splitn(4, '.').nth(3))
        .unwrap_or_else(|| panic!("{volid}"));
    eprintln!("listed {volid}");
    assert!(by_id.starts_with("scsi-"), "{volid}");
    assert!(
        sessions.contains(by_id),
        "{by_id} not among the by-id links:\n{sessions}"
    );
    assert!(volid.contains(".1.scsi-"), "LUN 1 expected: {volid}");
    assert_eq!(rows[0]["size"], 64 << 20);
    assert_eq!(rows[0]["vmid"], 0);
    assert_eq!(rows[0]["format"], "raw");
    let path = run.ok("pvesm-path");
    let mut lines = path.lines();
    assert_eq!(
        lines.next(),
        Some(format!("/dev/disk/by-id/{by_id}").as_str())
    );
    assert!(
        lines.next().is_some_and(|d| d.starts_with("/dev/sd")),
        "{path}"
    );

    // A container mount point on the LUN: a block device mount, data on the target.
    run.assert_group_ok("pct");
    let out = run.ok("pct-mount");
    let parts: Vec<&str> = out.split("---\n").collect();
    assert!(
        parts[0]
            .lines()
            .last()
            .is_some_and(|d| d.starts_with("/dev/sd")),
        "{out}"
    );
    assert_eq!(parts[1], "through the kernel initiator\n", "{out}");
    assert_eq!(parts[2].trim(), "0", "{out}");
}
