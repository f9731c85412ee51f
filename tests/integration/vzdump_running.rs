//! `vzdump` on running containers: real busybox containers started through the runtime
//! (`vzkit_runtime::lxc::Lxc`), backed up by the real `vzdump` binary in stop mode,
//! snapshot mode on btrfs (storage snapshots mounted read-only) and snapshot mode on `dir`
//! raw volumes (falling back to suspend mode: rsync, freeze, final rsync, thaw), and an
//! unprivileged container in suspend and stop mode. A writer inside each container keeps
//! appending to a file during the backups; GNU tar reads the archives, and one backup is
//! restored with `pct restore` and started. Failing hooks and SIGTERM must leave the
//! container running, unlocked and without a `vzdump` snapshot. Backups into a `dedup`
//! storage in every mode (stop, suspend, snapshot on btrfs, an unprivileged container with
//! an incremental backup) are restored in simple and advanced mode and compared entry by
//! entry with the source.
//!
//! The tests run one at a time with every other LXC test (`vzkit_tests::lxc::session`) and
//! clean up through guards even when an assertion fails: containers are killed, lxcfs (if the
//! session started it) is stopped by PID,
//! `TestRoot` unmounts volumes and detaches loop devices, `BtrfsFs` unmounts its image.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vzkit_host::command::SystemRunner;
use vzkit_host::paths::Layout;
use vzkit_runtime::lxc::{Lxc, State, lxcpath};
use vzkit_storage::manager::Storages;
use vzkit_tests::lxc::{CtGuard, SubIds, must, session, sh};
use vzkit_tests::pools::BtrfsFs;
use vzkit_tests::{TestRoot, the_archive};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn warn(msg: String) {
    eprintln!("WARN: {msg}");
}

/// A minimal busybox system (`vzkit_tests::lxc::populate_busybox`) whose init also runs
/// a writer that keeps appending a counter (`1`, `2`, …) to `/root/ticker` every 10 ms,
/// continuing the count after a restart.
fn populate_busybox(root: &Path) {
    vzkit_tests::lxc::populate_busybox(root, "ct");
    std::fs::write(
        root.join("etc/inittab"),
        "::sysinit:/etc/init.d/rcS\n::respawn:/bin/sleep 1000000\n\
         ::respawn:/bin/sh /etc/ticker.sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/ticker.sh"),
        "i=$(cat /root/ticker 2>/dev/null | wc -l)\n\
         while :; do i=$((i+1)); echo $i >> /root/ticker; usleep 10000; done\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/hostname"), "old\n").unwrap();
}

/// A scratch host with container `vmid` (rootfs `rootfs_spec`, e.g. `local:0.1`) holding a
/// busybox system. `storage_cfg` replaces the default storage configuration when given.
fn host_with_ct(vmid: u32, rootfs_spec: &str, storage_cfg: Option<&str>) -> (TestRoot, CtGuard) {
    host_with_ct_as(vmid, rootfs_spec, storage_cfg, 0)
}

/// As [`host_with_ct`]; with `uid` ≠ 0 an unprivileged container whose files belong to
/// `uid` (PVE's default mapping starts at 100000).
fn host_with_ct_as(
    vmid: u32,
    rootfs_spec: &str,
    storage_cfg: Option<&str>,
    uid: u32,
) -> (TestRoot, CtGuard) {
    let r = TestRoot::new();
    // Unprivileged containers must be able to walk down to their rootfs.
    std::fs::set_permissions(r.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let guard = CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![vmid],
    };
    if let Some(cfg) = storage_cfg {
        r.write("/etc/pve/storage.cfg", cfg);
    }
    r.write(
        &format!("/etc/pve/lxc/{vmid}.conf"),
        &format!(
            "arch: amd64\nhostname: ct{vmid}\nmemory: 64\nostype: alpine\n{}",
            if uid == 0 { "" } else { "unprivileged: 1\n" }
        ),
    );
    let id = vmid.to_string();
    r.ok("pct", &["set", &id, "--rootfs", rootfs_spec]);
    r.ok("pct", &["mount", &id]);
    let root = r.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
    populate_busybox(&root);
    if uid != 0 {
        must(&format!("chown -R -h {uid}:{uid} '{}'", root.display()));
    }
    r.ok("pct", &["unmount", &id]);
    (r, guard)
}

fn storages(r: &TestRoot) -> Storages {
    Storages::load(Layout::new(r.path()), Arc::new(SystemRunner))
        .unwrap()
        .0
}

async fn exec(lxc: &Lxc<'_>, vmid: u32, cmd: &str) -> String {
    let out = lxc
        .exec(vmid, &["/bin/sh".into(), "-c".into(), cmd.into()])
        .await
        .unwrap();
    assert!(out.success(), "{cmd}: {}", out.stderr_str());
    out.stdout_str()
}

/// Runs `vzdump` and returns (success, stderr).
fn vzdump(r: &TestRoot, args: &[&str]) -> (bool, String) {
    let o = r.run("vzdump", args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Extracts an archive with GNU tar and returns the member names.
fn extract(archive: &Path, dest: &Path) -> Vec<String> {
    std::fs::create_dir_all(dest).unwrap();
    must(&format!(
        "tar xpf '{}' --zstd --numeric-owner -C '{}'",
        archive.display(),
        dest.display()
    ));
    must(&format!("tar tf '{}' --zstd", archive.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Container `vmid` runs with the same init as before the backup and is not locked.
fn assert_kept_running(
    r: &TestRoot,
    rt: &tokio::runtime::Runtime,
    lxc: &Lxc<'_>,
    vmid: u32,
    pid_before: u32,
) {
    rt.block_on(async {
        assert_running_and_alive(lxc, vmid).await;
        assert_eq!(lxc.init_pid(vmid).await.unwrap().unwrap(), pid_before);
    });
    assert!(
        !r.read(&format!("/etc/pve/lxc/{vmid}.conf"))
            .contains("lock:")
    );
}

/// Start container `vmid`, write `/root/live.txt` in it and start its ticker; its init PID.
fn start_live(rt: &tokio::runtime::Runtime, lxc: &Lxc<'_>, vmid: u32) -> u32 {
    rt.block_on(async {
        lxc.start(vmid, false, &mut warn).await.unwrap();
        exec(lxc, vmid, "echo written-while-running > /root/live.txt").await;
        start_ticker(lxc, vmid).await;
        lxc.init_pid(vmid).await.unwrap().unwrap()
    })
}

/// Each restored container in `dsts` holds the file written while `src` ran, a prefix of its
/// ticker and otherwise `src`'s tree (both stopped); the last one starts with `src`'s
/// hostname.
fn assert_restored_and_starts(
    r: &TestRoot,
    rt: &tokio::runtime::Runtime,
    lxc: &Lxc<'_>,
    src: u32,
    dsts: &[u32],
    skips: &crate::restore::Skips,
) {
    let mut ids = vec![src.to_string()];
    ids.extend(dsts.iter().map(u32::to_string));
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    r.with_mounted(&ids, || {
        let from = r.join(&format!("/var/lib/lxc/{src}/rootfs"));
        for id in dsts {
            let dst = r.join(&format!("/var/lib/lxc/{id}/rootfs"));
            assert_eq!(
                std::fs::read_to_string(dst.join("root/live.txt")).unwrap(),
                "written-while-running\n"
            );
            assert_ticker_prefix(&from, &dst);
            crate::restore::compare_trees(&from, &dst, 0, skips);
        }
    });
    let Some(&last) = dsts.last() else { return };
    rt.block_on(async {
        lxc.start(last, false, &mut warn).await.unwrap();
        assert_running_and_alive(lxc, last).await;
        assert_eq!(exec(lxc, last, "hostname").await, format!("ct{src}\n"));
        lxc.stop(last, &mut warn).await.unwrap();
    });
}

/// The log steps of a snapshot-mode backup of a running container that falls back to
/// suspend mode, up to the guest running again.
const SUSPEND_FALLBACK: [&str; 11] = [
    "status = running",
    "mode failure - some volumes do not support snapshots",
    "trying 'suspend' mode instead",
    "backup mode: suspend",
    "starting first sync /proc/",
    "first sync finished",
    "suspending guest",
    "starting final sync /proc/",
    "final sync finished",
    "resuming guest",
    "guest is online again after ",
];

/// A snapshot-mode backup that fell back to suspend mode: its log has the suspend steps,
/// then `then`, the guest was online again in time, and the hook saw it frozen for the final
/// pass only (running at backup-start, frozen at pre-restart after the final sync, running
/// again at post-restart). The hook's record.
fn assert_suspend_fallback(log: &str, rec: &Path, then: &[&str]) -> String {
    assert_in_order(log, &[&SUSPEND_FALLBACK[..], then].concat());
    online_after(log);
    let hook_log = std::fs::read_to_string(rec).unwrap();
    assert_hook_phases(
        &hook_log,
        &[
            "backup-start state=RUNNING",
            "pre-stop state=RUNNING",
            "pre-restart state=FROZEN",
            "post-restart state=RUNNING",
        ],
    );
    hook_log
}

/// Each of `steps` is found in `log`, in this order.
fn assert_in_order(log: &str, steps: &[&str]) {
    let idx: Vec<usize> = steps.iter().map(|n| line_of(log, n)).collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{idx:?}\n{log}");
}

/// Each of `phases` is a line of the hook's record, in this order.
fn assert_hook_phases(hook_log: &str, phases: &[&str]) {
    let lines: Vec<&str> = hook_log.lines().collect();
    let pos = |p: &str| {
        lines
            .iter()
            .position(|l| *l == p)
            .unwrap_or_else(|| panic!("{p} missing:\n{hook_log}"))
    };
    for w in phases.windows(2) {
        assert!(
            pos(w[0]) < pos(w[1]),
            "{} before {}:\n{hook_log}",
            w[0],
            w[1]
        );
    }
}

/// The index of the first log line containing `needle`; panics with the log when missing.
fn line_of(log: &str, needle: &str) -> usize {
    log.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
}

/// The seconds of the "guest is online again after N seconds" line.
fn online_after(log: &str) -> String {
    let l = &log
        .lines()
        .nth(line_of(log, "guest is online again after "))
        .unwrap();
    let rest = l.split("online again after ").nth(1).unwrap();
    let n = rest.strip_suffix(" seconds").unwrap();
    assert!(n == "<1" || n.parse::<u64>().is_ok(), "{l}");
    n.to_string()
}

/// Waits until the container's writer (`/etc/ticker.sh`, started by init) wrote something.
async fn start_ticker(lxc: &Lxc<'_>, vmid: u32) {
    let t = Instant::now();
    while exec(lxc, vmid, "cat /root/ticker 2>/dev/null | wc -l")
        .await
        .trim()
        == "0"
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "ticker did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number of counter lines in a ticker file, checking they are exactly `1..=n`.
fn ticker_count(text: &str) -> usize {
    let n = text.lines().count();
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, (i + 1).to_string(), "ticker not consistent at line {i}");
    }
    n
}

async fn assert_running_and_alive(lxc: &Lxc<'_>, vmid: u32) {
    assert_eq!(lxc.state(vmid).await.unwrap(), State::Running);
    assert_eq!(exec(lxc, vmid, "echo alive").await, "alive\n");
}

#[test]
#[ignore = "needs root: real LXC containers, loop devices, mounts, lxcfs"]
fn stop_mode_shuts_down_backs_up_and_restarts_a_running_container() {
    let _s = session();
    let (r, _g) = host_with_ct(951, "local:0.1", None);
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let dump = r.join("/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let rec = write_hook(&r, 951);
    let hook = r.join("/hook.sh");
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, 951);
    let (ok, log) = vzdump(
        &r,
        &[
            "951",
            "--mode",
            "stop",
            "--dumpdir",
            dump.to_str().unwrap(),
            "--compress",
            "zstd",
            "--stopwait",
            "1",
            "--script",
            hook.to_str().unwrap(),
        ],
    );
    assert!(ok, "{log}");
    // Stopped for the archive (backup-end comes before the restart), running again after.
    let hook_log = std::fs::read_to_string(&rec).unwrap();
    assert!(
        hook_log.starts_with(
            "backup-start state=RUNNING\npre-stop state=RUNNING\n\
             backup-end state=STOPPED\npre-restart state=STOPPED\npost-restart state=RUNNING\n"
        ),
        "{hook_log}"
    );
    // PVE's order: status, mode, stop, archive, restart, online again, finished.
    let order = [
        "status = running",
        "backup mode: stop",
        "stopping virtual guest",
        "creating vzdump archive",
        "restarting vm",
        "guest is online again after ",
        "Finished Backup of VM 951",
    ];
    assert_in_order(&log, &order);
    online_after(&log);
    rt.block_on(async {
        assert_running_and_alive(&lxc, 951).await;
        // A new init: the container really was stopped and started again.
        assert_ne!(lxc.init_pid(951).await.unwrap().unwrap(), pid_before);
        assert_eq!(
            exec(&lxc, 951, "cat /root/live.txt").await,
            "written-while-running\n"
        );
    });
    assert!(!r.read("/etc/pve/lxc/951.conf").contains("lock:"));
    let x = r.join("/x");
    let names = extract(&the_archive(&dump), &x);
    assert_eq!(names[0], "./etc/vzdump/pct.conf");
    assert_eq!(
        std::fs::read_to_string(x.join("root/live.txt")).unwrap(),
        "written-while-running\n"
    );
    assert!(x.join("bin/busybox").is_file());
    let conf = std::fs::read_to_string(x.join("etc/vzdump/pct.conf")).unwrap();
    assert!(conf.contains("hostname: ct951\n"), "{conf}");
    assert!(!conf.contains("lock"), "{conf}");
    // The writer ran until the shutdown and continued after the restart: the archive holds
    // a consistent prefix of what it wrote.
    let archived = ticker_count(&std::fs::read_to_string(x.join("root/ticker")).unwrap());
    let live = rt.block_on(exec(&lxc, 951, "cat /root/ticker"));
    assert!(ticker_count(&live) > archived, "{archived}");

    // A backup failing after the archive still starts the container again.
    std::fs::write(r.join("/fail-end"), "").unwrap();
    let (ok, log) = vzdump(
        &r,
        &[
            "951",
            "--mode",
            "stop",
            "--dumpdir",
            dump.to_str().unwrap(),
            "--script",
            hook.to_str().unwrap(),
        ],
    );
    assert!(!ok, "{log}");
    assert!(log.contains("Backup of VM 951 failed - "), "{log}");
    assert!(
        line_of(&log, "stopping virtual guest") < line_of(&log, "restarting vm"),
        "{log}"
    );
    online_after(&log);
    rt.block_on(assert_running_and_alive(&lxc, 951));
    assert!(!r.read("/etc/pve/lxc/951.conf").contains("lock:"));
    rt.block_on(lxc.stop(951, &mut warn)).unwrap();
}

/// A `--script` hook that records, per phase, the container's LXC state and (with a
/// snapshot mounted) the mount options of `<root>/mnt/vzsnap0`, whether it can be written,
/// and the marker file as the snapshot has it. It fails `backup-end` when `<root>/fail-end`
/// exists and `pre-restart` when `<root>/fail-end-pre-restart` exists.
fn write_hook(r: &TestRoot, vmid: u32) -> PathBuf {
    let hook = r.join("/hook.sh");
    let rec = r.join("/hook.log");
    let snap = r.join("/mnt/vzsnap0");
    let lxcpath = lxcpath(&Layout::new(r.path()));
    let fail = r.join("/fail-end");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n\
             [ \"$3\" = {vmid} ] || exit 0\n\
             st=$(lxc-info -P '{lxcpath}' -n {vmid} -s -H)\n\
             echo \"$1 state=$st\" >> '{rec}'\n\
             if [ \"$1\" = post-restart ] && mountpoint -q '{snap}'; then\n\
               echo \"snapshot-options=$(findmnt -no OPTIONS '{snap}')\" >> '{rec}'\n\
               touch '{snap}/root/probe' 2>/dev/null && echo writable >> '{rec}'\n\
               echo \"snapshot-live=$(cat '{snap}/root/live.txt')\" >> '{rec}'\n\
             fi\n\
             [ \"$1\" = backup-end ] && [ -e '{fail}' ] && exit 3\n\
             [ \"$1\" = pre-restart ] && [ -e '{fail}-pre-restart' ] && exit 4\n\
             exit 0\n",
            lxcpath = lxcpath.display(),
            rec = rec.display(),
            snap = snap.display(),
            fail = fail.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    rec
}

fn btrfs_snapshots(fs: &BtrfsFs) -> String {
    must(&format!(
        "btrfs subvolume list '{}'",
        fs.mountpoint().display()
    ))
}

/// Snapshot mode on a running container `vmid` whose rootfs `spec` on a btrfs storage
/// (quotas on) becomes the volume `rootfs`.
fn btrfs_snapshot_case(vmid: u32, spec: &str, rootfs: &str) {
    let _s = session();
    let fs = BtrfsFs::new(1 << 30, true);
    let (r, _g) = host_with_ct(vmid, spec, Some(&fs.storage_cfg("bt", "store")));
    let conf_text = r.read(&format!("/etc/pve/lxc/{vmid}.conf"));
    assert!(
        conf_text.contains(&format!("rootfs: {rootfs}\n")),
        "{conf_text}"
    );
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let dump = r.join("/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let rec = write_hook(&r, vmid);
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, vmid);
    let id = vmid.to_string();
    let args = [
        id.as_str(),
        "--mode",
        "snapshot",
        "--dumpdir",
        dump.to_str().unwrap(),
        "--compress",
        "zstd",
        "--script",
        r.join("/hook.sh").to_str().unwrap(),
    ]
    .map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, log) = vzdump(&r, &args);
    assert!(ok, "{log}");
    let order = [
        "status = running",
        "backup mode: snapshot",
        "create storage snapshot 'vzdump'",
        "creating vzdump archive",
        "cleanup temporary 'vzdump' snapshot",
        &format!("Finished Backup of VM {vmid}"),
    ];
    assert_in_order(&log, &order);
    assert!(!log.contains("stopping virtual guest"), "{log}");
    assert!(!log.contains("suspending guest"), "{log}");
    // The hook saw the snapshot mounted read-only, with the file, and the CT running.
    let hook_log = std::fs::read_to_string(&rec).unwrap();
    assert!(
        hook_log.contains("backup-start state=RUNNING\n"),
        "{hook_log}"
    );
    assert!(
        hook_log.contains("post-restart state=RUNNING\n"),
        "{hook_log}"
    );
    assert!(
        hook_log.contains("backup-end state=RUNNING\n"),
        "{hook_log}"
    );
    let opts = hook_log
        .lines()
        .find_map(|l| l.strip_prefix("snapshot-options="))
        .unwrap_or_else(|| panic!("snapshot not mounted at post-restart:\n{hook_log}"));
    assert!(opts.split(',').any(|o| o == "ro"), "{opts}");
    assert!(!hook_log.contains("writable"), "{hook_log}");
    assert!(
        hook_log.contains("snapshot-live=written-while-running\n"),
        "{hook_log}"
    );
    rt.block_on(async {
        assert_running_and_alive(&lxc, vmid).await;
        // Not restarted: the same init.
        assert_eq!(lxc.init_pid(vmid).await.unwrap().unwrap(), pid_before);
    });
    let conf_after = r.read(&format!("/etc/pve/lxc/{vmid}.conf"));
    assert!(!conf_after.contains("[vzdump]"), "{conf_after}");
    assert!(!conf_after.contains("parent:"), "{conf_after}");
    assert!(!conf_after.contains("lock:"), "{conf_after}");
    assert!(
        !btrfs_snapshots(&fs).contains("vzdump"),
        "{}",
        btrfs_snapshots(&fs)
    );
    assert!(
        !sh(&format!(
            "mountpoint -q '{}'",
            r.join("/mnt/vzsnap0").display()
        ))
        .status
        .success()
    );
    let x = r.join("/x");
    let names = extract(&the_archive(&dump), &x);
    assert_eq!(names[0], "./etc/vzdump/pct.conf");
    assert_eq!(
        std::fs::read_to_string(x.join("root/live.txt")).unwrap(),
        "written-while-running\n"
    );
    assert!(x.join("bin/busybox").is_file());
    // The writer kept going: the archive holds a consistent prefix of what it wrote.
    let archived = ticker_count(&std::fs::read_to_string(x.join("root/ticker")).unwrap());
    let live = rt.block_on(exec(&lxc, vmid, "cat /root/ticker"));
    assert!(ticker_count(&live) > archived, "{archived}");

    // The same backup failing at backup-end: the snapshot still goes, the CT still runs.
    std::fs::write(r.join("/fail-end"), "").unwrap();
    std::fs::write(&rec, "").unwrap();
    let (ok, log) = vzdump(&r, &args);
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!("Backup of VM {vmid} failed - ")),
        "{log}"
    );
    assert!(
        line_of(&log, "create storage snapshot 'vzdump'")
            < line_of(&log, "cleanup temporary 'vzdump' snapshot"),
        "{log}"
    );
    let conf_after = r.read(&format!("/etc/pve/lxc/{vmid}.conf"));
    assert!(!conf_after.contains("[vzdump]"), "{conf_after}");
    assert!(!conf_after.contains("parent:"), "{conf_after}");
    assert!(!conf_after.contains("lock:"), "{conf_after}");
    assert!(
        !btrfs_snapshots(&fs).contains("vzdump"),
        "{}",
        btrfs_snapshots(&fs)
    );
    rt.block_on(async {
        assert_running_and_alive(&lxc, vmid).await;
        assert_eq!(lxc.init_pid(vmid).await.unwrap().unwrap(), pid_before);
    });

    // SIGTERM while the archive is written from the mounted snapshot (slowed down by
    // --bwlimit): the job stops, the snapshot goes, the container keeps running.
    std::fs::remove_file(r.join("/fail-end")).unwrap();
    let child = Command::new(vzkit_tests::bin("vzdump"))
        .args(&args)
        .args(["--bwlimit", "64"])
        .env("VZKIT_ROOT", r.path())
        .env("TZ", "UTC")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let snap = r.join("/mnt/vzsnap0");
    let t = Instant::now();
    while !sh(&format!("mountpoint -q '{}'", snap.display()))
        .status
        .success()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "snapshot never mounted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    must(&format!("kill -TERM {}", child.id()));
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("interrupted by signal"), "{log}");
    assert!(log.contains("cleanup temporary 'vzdump' snapshot"), "{log}");
    let conf_after = r.read(&format!("/etc/pve/lxc/{vmid}.conf"));
    assert!(!conf_after.contains("[vzdump]"), "{conf_after}");
    assert!(!conf_after.contains("lock:"), "{conf_after}");
    assert!(
        !btrfs_snapshots(&fs).contains("vzdump"),
        "{}",
        btrfs_snapshots(&fs)
    );
    assert!(
        !sh(&format!("mountpoint -q '{}'", snap.display()))
            .status
            .success()
    );
    rt.block_on(async {
        assert_running_and_alive(&lxc, vmid).await;
        assert_eq!(lxc.init_pid(vmid).await.unwrap().unwrap(), pid_before);
        lxc.stop(vmid, &mut warn).await.unwrap();
    });
}

#[test]
#[ignore = "needs root: real LXC containers on a loop-mounted btrfs image, lxcfs"]
fn snapshot_mode_on_btrfs_raw_keeps_the_container_running_and_removes_the_snapshot() {
    btrfs_snapshot_case(952, "bt:0.1", "bt:952/vm-952-disk-0.raw,size=102M");
}

#[test]
#[ignore = "needs root: real LXC containers on a loop-mounted btrfs image, lxcfs"]
fn snapshot_mode_on_btrfs_subvol_keeps_the_container_running_and_removes_the_snapshot() {
    btrfs_snapshot_case(954, "bt:0", "bt:954/subvol-954-disk-0.subvol,size=0T");
}

#[test]
#[ignore = "needs root: real LXC containers, loop devices, mounts, lxcfs, rsync"]
fn snapshot_mode_on_dir_falls_back_to_suspend_and_thaws_the_container() {
    let _s = session();
    let (r, _g) = host_with_ct(953, "local:0.1", None);
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let dump = r.join("/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let rec = write_hook(&r, 953);
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, 953);
    let hook = r.join("/hook.sh");
    let scratch = r.join("/scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let (ok, log) = vzdump(
        &r,
        &[
            "953",
            "--mode",
            "snapshot",
            "--tmpdir",
            scratch.to_str().unwrap(),
            "--dumpdir",
            dump.to_str().unwrap(),
            "--compress",
            "zstd",
            "--script",
            hook.to_str().unwrap(),
        ],
    );
    assert!(ok, "{log}");
    assert_suspend_fallback(
        &log,
        &rec,
        &["creating vzdump archive", "Finished Backup of VM 953"],
    );
    assert_kept_running(&r, &rt, &lxc, 953, pid_before);
    let x = r.join("/x");
    let names = extract(&the_archive(&dump), &x);
    assert_eq!(names[0], "./etc/vzdump/pct.conf");
    assert_eq!(
        names
            .iter()
            .filter(|n| *n == "./etc/vzdump/pct.conf")
            .count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        std::fs::read_to_string(x.join("root/live.txt")).unwrap(),
        "written-while-running\n"
    );
    assert!(x.join("bin/busybox").is_file());
    // The writer kept going after the thaw: the archive holds a consistent prefix.
    let archived = ticker_count(&std::fs::read_to_string(x.join("root/ticker")).unwrap());
    let live = rt.block_on(exec(&lxc, 953, "cat /root/ticker"));
    assert!(ticker_count(&live) > archived, "{archived}");
    // The copy went to `--tmpdir` and is gone.
    let first = log
        .lines()
        .nth(line_of(&log, "starting first sync /proc/"))
        .unwrap();
    assert!(
        first.contains(&format!(" to {}/vzdumptmp", scratch.display())),
        "{first}"
    );
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);

    // The backup restores to a new container, which starts and has the live data.
    let _g2 = CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![956],
    };
    let archive = the_archive(&dump);
    r.ok(
        "pct",
        &[
            "restore",
            "956",
            archive.to_str().unwrap(),
            "--storage",
            "local",
        ],
    );
    rt.block_on(async {
        lxc.start(956, false, &mut warn).await.unwrap();
        assert_eq!(
            exec(&lxc, 956, "cat /root/live.txt").await,
            "written-while-running\n"
        );
        assert_eq!(exec(&lxc, 956, "hostname").await, "ct953\n");
        lxc.stop(956, &mut warn).await.unwrap();
    });

    // A hook failing while the guest is frozen (pre-restart): the guest is thawed anyway.
    std::fs::write(r.join("/fail-end-pre-restart"), "").unwrap();
    std::fs::write(&rec, "").unwrap();
    let (ok, log) = vzdump(
        &r,
        &[
            "953",
            "--mode",
            "suspend",
            "--dumpdir",
            dump.to_str().unwrap(),
            "--script",
            hook.to_str().unwrap(),
        ],
    );
    assert!(!ok, "{log}");
    assert!(log.contains("Backup of VM 953 failed - "), "{log}");
    let hook_log = std::fs::read_to_string(&rec).unwrap();
    assert!(
        hook_log.contains("pre-restart state=FROZEN\n"),
        "{hook_log}"
    );
    assert!(
        hook_log.contains("backup-abort state=RUNNING\n"),
        "{hook_log}"
    );
    assert_kept_running(&r, &rt, &lxc, 953, pid_before);
    rt.block_on(lxc.stop(953, &mut warn)).unwrap();
}

/// `tar tvf` lines of an archive with numeric owners.
fn tar_verbose(archive: &Path) -> String {
    must(&format!(
        "tar tvf '{}' --zstd --numeric-owner",
        archive.display()
    ))
}

#[test]
#[ignore = "needs root: real unprivileged LXC containers, loop devices, mounts, rsync"]
fn unprivileged_container_in_suspend_and_stop_mode_archives_container_ids() {
    let _s = session();
    let _ids = SubIds::ensure();
    let (r, _g) = host_with_ct_as(955, "local:0.1", None, 100_000);
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, 955);
    let host_file = PathBuf::from(format!("/proc/{pid_before}/root/root/live.txt"));
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&host_file).unwrap()),
        100_000
    );
    for (mode, restarted) in [("suspend", false), ("stop", true)] {
        let dump = r.join(&format!("/dump-{mode}"));
        std::fs::create_dir_all(&dump).unwrap();
        let (ok, log) = vzdump(
            &r,
            &[
                "955",
                "--mode",
                mode,
                "--dumpdir",
                dump.to_str().unwrap(),
                "--compress",
                "zstd",
            ],
        );
        assert!(ok, "{log}");
        assert!(log.contains(&format!("backup mode: {mode}\n")), "{log}");
        online_after(&log);
        let archive = the_archive(&dump);
        // Owners as the container sees them, not the host's shifted ids.
        let listing = tar_verbose(&archive);
        let live = listing
            .lines()
            .find(|l| l.ends_with(" ./root/live.txt"))
            .unwrap_or_else(|| panic!("{listing}"));
        assert!(live.contains(" 0/0 "), "{live}");
        assert!(!listing.contains("100000/"), "{listing}");
        let x = r.join(&format!("/x-{mode}"));
        extract(&archive, &x);
        assert_eq!(
            std::fs::read_to_string(x.join("root/live.txt")).unwrap(),
            "written-while-running\n"
        );
        ticker_count(&std::fs::read_to_string(x.join("root/ticker")).unwrap());
        rt.block_on(async {
            assert_running_and_alive(&lxc, 955).await;
            let pid = lxc.init_pid(955).await.unwrap().unwrap();
            assert_eq!(pid != pid_before, restarted);
        });
        assert!(!r.read("/etc/pve/lxc/955.conf").contains("lock:"));
    }
    rt.block_on(lxc.stop(955, &mut warn)).unwrap();
}

/// Snapshot mode across two snapshot-capable storages of a running container (rootfs on
/// btrfs, a `backup=1` mount point on a zfs pool), then an advanced-mode restore of the
/// archive onto `dir` storage: the vzdump snapshots are gone from both storages, the
/// container kept running, and the restored tree equals the backed-up one entry by entry.
#[test]
#[ignore = "needs root: real LXC containers, a zfs-fuse pool, a loop-mounted btrfs, lxcfs"]
fn snapshot_mode_across_btrfs_and_zfs_then_advanced_restore_onto_dir() {
    let _s = session();
    let pool = vzkit_tests::pools::ZfsPool::start();
    let fs = BtrfsFs::new(512 << 20, false);
    let cfg = format!(
        "{}{}",
        fs.storage_cfg("bt", "store"),
        pool.storage_cfg("zt")
    );
    let (r, _g) = host_with_ct(958, "bt:0", Some(&cfg));
    r.ok(
        "pct",
        &["set", "958", "--mp0", "zt:0,mp=/mnt/data,backup=1"],
    );
    r.ok("pct", &["mount", "958"]);
    let data = r.join("/var/lib/lxc/958/rootfs/mnt/data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/file"), crate::common::noise(300_000, 5)).unwrap();
    std::os::unix::fs::symlink("sub/file", data.join("link")).unwrap();
    std::fs::hard_link(data.join("sub/file"), data.join("hard")).unwrap();
    must(&format!("chown -h 33:33 '{}'", data.join("sub").display()));
    r.ok("pct", &["unmount", "958"]);

    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let dump = r.join("/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let rt = rt();
    let pid_before = rt.block_on(async {
        lxc.start(958, false, &mut warn).await.unwrap();
        exec(
            &lxc,
            958,
            "echo live > /root/live.txt; echo mp > /mnt/data/live.txt",
        )
        .await;
        lxc.init_pid(958).await.unwrap().unwrap()
    });
    let (ok, log) = vzdump(
        &r,
        &[
            "958",
            "--mode",
            "snapshot",
            "--dumpdir",
            dump.to_str().unwrap(),
            "--compress",
            "zstd",
        ],
    );
    assert!(ok, "{log}");
    for needle in [
        "backup mode: snapshot",
        "create storage snapshot 'vzdump'",
        "including mount point mp0 ('/mnt/data') in backup",
        "cleanup temporary 'vzdump' snapshot",
    ] {
        line_of(&log, needle);
    }
    rt.block_on(async {
        assert_eq!(lxc.state(958).await.unwrap(), State::Running);
        assert_eq!(lxc.init_pid(958).await.unwrap(), Some(pid_before));
        lxc.stop(958, &mut warn).await.unwrap();
    });
    // No vzdump snapshot is left on either storage, nor in the config.
    let conf = r.read("/etc/pve/lxc/958.conf");
    assert!(
        !conf.contains("vzdump") && !conf.contains("lock:"),
        "{conf}"
    );
    let zsnaps = vzkit_tests::pools::ok("zfs", &["list", "-H", "-t", "snapshot", "-o", "name"]);
    assert!(!zsnaps.contains("vzdump"), "{zsnaps}");
    let bsnaps = btrfs_snapshots(&fs);
    assert!(!bsnaps.contains("vzdump"), "{bsnaps}");

    // Advanced restore onto dir, then compare with the (stopped) source.
    let archive = the_archive(&dump);
    let restored = r.restore_onto(959, &archive, "local:0.25", Some("local:0.25,mp=/mnt/data"));
    assert!(
        restored.contains("rootfs: local:959/vm-959-disk-0.raw"),
        "{restored}"
    );
    assert!(
        restored.contains("mp0: local:959/vm-959-disk-1.raw,mp=/mnt/data"),
        "{restored}"
    );
    r.with_mounted(&["958", "959"], || {
        let src = r.join("/var/lib/lxc/958/rootfs");
        let dst = r.join("/var/lib/lxc/959/rootfs");
        assert_eq!(
            std::fs::read_to_string(dst.join("mnt/data/live.txt")).unwrap(),
            "mp\n"
        );
        // zfs-fuse's block accounting makes dense files look sparse, so the whole-tree
        // comparison skips the zfs file's metadata; its content and hard link are checked here.
        let want = std::fs::read(src.join("mnt/data/sub/file")).unwrap();
        assert_eq!(std::fs::read(dst.join("mnt/data/sub/file")).unwrap(), want);
        let (a, b) = (
            std::fs::metadata(dst.join("mnt/data/sub/file")).unwrap(),
            std::fs::metadata(dst.join("mnt/data/hard")).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard link not restored");
        // The ticker inside the container went on writing after the backup.
        let sk = crate::restore::Skips {
            meta: vec![
                b"",
                b"etc",
                b"mnt",
                b"mnt/data",
                b"root/ticker",
                b"mnt/data/sub/file",
                b"mnt/data/hard",
            ],
            extra: vec![b"lost+found", b"etc/vzdump", b"mnt/data/lost+found"],
        };
        crate::restore::compare_trees(&src, &dst, 0, &sk);
    });
}

/// Snapshot mode with the rootfs on a zfs pool and a `backup=1` mount point on btrfs. A
/// first backup fails after the storage snapshots were taken (its dump directory is a 1 MiB
/// tmpfs that fills up): both `vzdump` snapshots are removed, no partial archive is left,
/// the container runs on unlocked. A second backup succeeds and is restored in advanced
/// mode onto `dir`, then onto the zfs pool again; both restored trees equal the source.
#[test]
#[ignore = "needs root: real LXC containers, a zfs-fuse pool, a loop-mounted btrfs, tmpfs"]
fn snapshot_mode_rootfs_on_zfs_failing_then_restored_onto_dir_and_back_onto_zfs() {
    let _s = session();
    let pool = vzkit_tests::pools::ZfsPool::start();
    let fs = BtrfsFs::new(512 << 20, false);
    let cfg = format!(
        "{}{}",
        pool.storage_cfg("zt"),
        fs.storage_cfg("bt", "store")
    );
    let (r, _g) = host_with_ct(960, "zt:0", Some(&cfg));
    assert!(
        r.read("/etc/pve/lxc/960.conf")
            .contains("rootfs: zt:subvol-960-disk-0"),
        "{}",
        r.read("/etc/pve/lxc/960.conf")
    );
    r.ok(
        "pct",
        &["set", "960", "--mp0", "bt:0,mp=/mnt/data,backup=1"],
    );
    r.ok("pct", &["mount", "960"]);
    let root = r.join("/var/lib/lxc/960/rootfs");
    // Incompressible data, larger than the small dump directory below.
    std::fs::write(root.join("root/noise"), crate::common::noise(4 << 20, 9)).unwrap();
    std::fs::create_dir_all(root.join("mnt/data/sub")).unwrap();
    std::fs::write(root.join("mnt/data/sub/f"), b"on btrfs\n").unwrap();
    must(&format!(
        "chown -h 33:33 '{}'",
        root.join("mnt/data/sub").display()
    ));
    r.ok("pct", &["unmount", "960"]);

    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let rt = rt();
    let pid_before = rt.block_on(async {
        lxc.start(960, false, &mut warn).await.unwrap();
        exec(&lxc, 960, "echo live > /root/live.txt").await;
        lxc.init_pid(960).await.unwrap().unwrap()
    });
    let no_vzdump_snapshots = || {
        let z = vzkit_tests::pools::ok("zfs", &["list", "-H", "-t", "all", "-o", "name"]);
        assert!(!z.contains("vzdump"), "{z}");
        let b = btrfs_snapshots(&fs);
        assert!(!b.contains("vzdump"), "{b}");
        let conf = r.read("/etc/pve/lxc/960.conf");
        assert!(
            !conf.contains("vzdump") && !conf.contains("lock:"),
            "{conf}"
        );
    };

    // 1. The archive cannot be written: the backup fails, its snapshots are cleaned up.
    let small = r.join("/small-dump");
    std::fs::create_dir_all(&small).unwrap();
    must(&format!(
        "mount -t tmpfs -o size=1m tmpfs '{}'",
        small.display()
    ));
    let (ok, log) = vzdump(
        &r,
        &[
            "960",
            "--mode",
            "snapshot",
            "--dumpdir",
            small.to_str().unwrap(),
            "--compress",
            "zstd",
        ],
    );
    let left: Vec<_> = std::fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    must(&format!("umount '{}'", small.display()));
    assert!(!ok, "{log}");
    line_of(&log, "create storage snapshot 'vzdump'");
    line_of(&log, "Backup of VM 960 failed - ");
    assert!(left.is_empty(), "partial archive left: {left:?}");
    no_vzdump_snapshots();
    rt.block_on(async {
        assert_eq!(lxc.state(960).await.unwrap(), State::Running);
        assert_eq!(lxc.init_pid(960).await.unwrap(), Some(pid_before));
    });

    // 2. A backup that succeeds.
    let dump = r.join("/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let (ok, log) = vzdump(
        &r,
        &[
            "960",
            "--mode",
            "snapshot",
            "--dumpdir",
            dump.to_str().unwrap(),
            "--compress",
            "zstd",
        ],
    );
    assert!(ok, "{log}");
    line_of(&log, "including mount point mp0 ('/mnt/data') in backup");
    line_of(&log, "cleanup temporary 'vzdump' snapshot");
    no_vzdump_snapshots();
    rt.block_on(async {
        assert_eq!(lxc.init_pid(960).await.unwrap(), Some(pid_before));
        lxc.stop(960, &mut warn).await.unwrap();
    });

    // 3. Restores: onto dir, and onto the zfs pool (rootfs) and btrfs (mount point).
    let archive = the_archive(&dump);
    r.restore_onto(961, &archive, "local:0.25", Some("local:0.25,mp=/mnt/data"));
    let restored = r.restore_onto(962, &archive, "zt:0", Some("bt:0,mp=/mnt/data"));
    assert!(
        restored.contains("rootfs: zt:subvol-962-disk-0"),
        "{restored}"
    );
    assert!(
        restored.contains("mp0: bt:962/subvol-962-disk-0.subvol,mp=/mnt/data"),
        "{restored}"
    );
    r.with_mounted(&["960", "961", "962"], || {
        let src = r.join("/var/lib/lxc/960/rootfs");
        for id in [961, 962] {
            let dst = r.join(&format!("/var/lib/lxc/{id}/rootfs"));
            assert_eq!(
                std::fs::read_to_string(dst.join("root/live.txt")).unwrap(),
                "live\n"
            );
            assert_eq!(
                std::fs::read(dst.join("root/noise")).unwrap(),
                std::fs::read(src.join("root/noise")).unwrap()
            );
            // The source is on zfs-fuse, whose block accounting makes dense files look
            // sparse: holes are not compared, content and all other metadata are.
            let sk = crate::restore::Skips {
                meta: vec![b"", b"etc", b"mnt", b"mnt/data", b"root/ticker"],
                extra: vec![b"lost+found", b"etc/vzdump", b"mnt/data/lost+found"],
            };
            crate::restore::compare_trees_with(&src, &dst, 0, &sk, true);
        }
    });
}

/// A running container backed up in stop mode into a `dedup` storage, restored with
/// `pct restore` as a new container that starts and holds what the first one wrote.
#[test]
#[ignore = "needs root: real LXC containers, loop devices, mounts, lxcfs"]
fn stop_mode_into_dedup_storage_restores_a_container_that_starts() {
    let _s = session();
    let (r, _g) = host_with_ct(954, "local:0.1", None);
    let _g2 = CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![955],
    };
    // `local` is added by default.
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dedup: backups\n\tpath {}\n\tcontent backup\n",
            r.join("/srv/dedup").display()
        ),
    );
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let rt = rt();
    rt.block_on(async {
        lxc.start(954, false, &mut warn).await.unwrap();
        exec(&lxc, 954, "echo written-while-running > /root/live.txt").await;
    });
    let (ok, log) = vzdump(
        &r,
        &[
            "954",
            "--mode",
            "stop",
            "--storage",
            "backups",
            "--stopwait",
            "1",
        ],
    );
    assert!(ok, "{log}");
    let order = [
        "stopping virtual guest",
        "creating snapshot in dedup storage 'backups'",
        "restarting vm",
        "Finished Backup of VM 954",
    ];
    assert_in_order(&log, &order);
    rt.block_on(assert_running_and_alive(&lxc, 954));
    let list = r.ok("pvesm", &["list", "backups"]);
    let volid = list
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("backups:backup/ct/954/"))
        })
        .unwrap_or_else(|| panic!("{list}"))
        .to_string();
    r.ok("pct", &["restore", "955", &volid, "--storage", "local"]);
    rt.block_on(async {
        lxc.start(955, false, &mut warn).await.unwrap();
        assert_running_and_alive(&lxc, 955).await;
        assert_eq!(
            exec(&lxc, 955, "cat /root/live.txt").await,
            "written-while-running\n"
        );
        assert_eq!(exec(&lxc, 955, "hostname").await, "ct954\n");
    });
}

/// The `storage.cfg` section of a `dedup` storage `backups` below the scratch root.
fn dedup_section(r: &TestRoot) -> String {
    format!(
        "dedup: backups\n\tpath {}\n\tcontent backup\n\n",
        r.join("/srv/dedup").display()
    )
}

/// The volume ids of `vmid`'s snapshots in the dedup storage `backups`, oldest first.
fn dedup_volids(r: &TestRoot, vmid: u32) -> Vec<String> {
    let list = r.ok("pvesm", &["list", "backups"]);
    let prefix = format!("backups:backup/ct/{vmid}/");
    let mut ids: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with(&prefix)))
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

/// The `backup volume: <volid>` of a vzdump log.
fn backup_volume(log: &str) -> String {
    let l = log.lines().nth(line_of(log, "backup volume: ")).unwrap();
    l.split("backup volume: ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string()
}

/// The numbers of the dedup log line `files: N (R read, U unchanged and reused), …`.
fn files_line(log: &str) -> (u64, u64, u64) {
    let l = log.lines().nth(line_of(log, "files: ")).unwrap();
    let rest = l.split("files: ").nth(1).unwrap();
    let num = |s: &str| -> u64 {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{s:?} in {l:?}"))
    };
    let (n, rest) = rest.split_once(" (").unwrap();
    let (read, rest) = rest.split_once(" read, ").unwrap();
    let (reused, _) = rest.split_once(" unchanged and reused").unwrap();
    (num(n), num(read), num(reused))
}

/// What a restored container differs in from its source, which ran on after the backup:
/// the ticker went on (its prefix is checked separately), the restore adds `etc/vzdump` and
/// gives the root directory its own time, and a fresh ext4 has its own `lost+found`.
fn running_skips() -> crate::restore::Skips {
    crate::restore::Skips {
        meta: vec![b"", b"etc", b"root/ticker", b"lost+found"],
        extra: vec![b"lost+found", b"etc/vzdump"],
    }
}

/// As [`running_skips`] for a suspend-mode backup, which rsync copied from the running
/// container's `/proc/<pid>/root`: there `dev`, `proc` and `sys` are mount points (tmpfs,
/// procfs, sysfs), and `rsync --one-file-system` copies such a directory with the mounted
/// file system's attributes, as with PVE.
fn suspend_skips() -> crate::restore::Skips {
    let mut sk = running_skips();
    sk.meta.extend([b"dev".as_slice(), b"proc", b"sys"]);
    sk
}

/// Lets a freshly written container tree age past the current second before a suspend-mode
/// backup: rsync leaves a copied symlink or directory with the copy time when that already
/// has the source's whole second, so a tree copied in the second it was written would not
/// keep its sub-second mtimes.
fn age_tree() {
    std::thread::sleep(Duration::from_millis(1100));
}

/// The restored ticker is a consistent prefix of the (longer) source ticker.
fn assert_ticker_prefix(src: &Path, dst: &Path) {
    let live = std::fs::read_to_string(src.join("root/ticker")).unwrap();
    let restored = std::fs::read_to_string(dst.join("root/ticker")).unwrap();
    let n = ticker_count(&restored);
    assert!(n > 0 && ticker_count(&live) > n, "{n}");
}

/// `vzdump --mode snapshot --storage <dedup>` of a running container on `dir` storage: the
/// mode falls back to suspend (rsync, freeze, final rsync, thaw) and the copy becomes a
/// snapshot of the store. The container keeps its init, the temporary copy is gone, and the
/// snapshot restores with `pct restore` to a tree equal to the (stopped) source, which starts.
#[test]
#[ignore = "needs root: real LXC containers, loop devices, mounts, lxcfs, rsync"]
fn suspend_mode_into_dedup_storage_keeps_the_container_running_and_restores_exactly() {
    let _s = session();
    let (r, _g) = host_with_ct(963, "local:0.1", None);
    let _g2 = CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![964],
    };
    r.write("/etc/pve/storage.cfg", &dedup_section(&r));
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let rec = write_hook(&r, 963);
    let hook = r.join("/hook.sh");
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, 963);
    age_tree();
    let (ok, log) = vzdump(
        &r,
        &[
            "963",
            "--mode",
            "snapshot",
            "--storage",
            "backups",
            "--script",
            hook.to_str().unwrap(),
        ],
    );
    assert!(ok, "{log}");
    let hook_log = assert_suspend_fallback(
        &log,
        &rec,
        &[
            "creating snapshot in dedup storage 'backups'",
            "files: ",
            "backup volume: backups:backup/ct/963/",
            "Finished Backup of VM 963",
        ],
    );
    assert_hook_phases(
        &hook_log,
        &["post-restart state=RUNNING", "backup-end state=RUNNING"],
    );
    assert_kept_running(&r, &rt, &lxc, 963, pid_before);
    // The rsync copy (below the storage's dump directory) is gone.
    let dumpdir = r.join("/srv/dedup/dump");
    let left: Vec<_> = std::fs::read_dir(&dumpdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let volids = dedup_volids(&r, 963);
    assert_eq!(volids, [backup_volume(&log)], "{log}");

    rt.block_on(lxc.stop(963, &mut warn)).unwrap();
    r.ok("pct", &["restore", "964", &volids[0], "--storage", "local"]);

    let conf = r.read("/etc/pve/lxc/964.conf");
    assert!(
        conf.contains("rootfs: local:964/vm-964-disk-0.raw"),
        "{conf}"
    );
    assert_restored_and_starts(&r, &rt, &lxc, 963, &[964], &suspend_skips());
}

/// `vzdump --mode snapshot --storage <dedup>` of a running container whose rootfs is a btrfs
/// subvolume: the snapshot is read from the mounted storage snapshot, which is removed
/// afterwards, the container keeps its init. The dedup snapshot restores in simple mode onto
/// the btrfs storage and in advanced mode (`--rootfs local:0.25`) onto `dir`; both trees
/// equal the (stopped) source and the advanced restore starts.
#[test]
#[ignore = "needs root: real LXC containers on a loop-mounted btrfs image, loop devices, lxcfs"]
fn snapshot_mode_on_btrfs_into_dedup_storage_then_simple_and_advanced_restore() {
    let _s = session();
    let fs = BtrfsFs::new(512 << 20, false);
    let bt = fs.storage_cfg("bt", "store");
    let (r, _g) = host_with_ct(965, "bt:0", Some(&bt));
    let _g2 = CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![966, 967],
    };
    r.write(
        "/etc/pve/storage.cfg",
        &format!("{bt}{}", dedup_section(&r)),
    );
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let rec = write_hook(&r, 965);
    let hook = r.join("/hook.sh");
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, 965);
    let (ok, log) = vzdump(
        &r,
        &[
            "965",
            "--mode",
            "snapshot",
            "--storage",
            "backups",
            "--script",
            hook.to_str().unwrap(),
        ],
    );
    assert!(ok, "{log}");
    // The snapshot was mounted read-only while the running container's data went in.
    let hook_log = std::fs::read_to_string(&rec).unwrap();
    let opts = hook_log
        .lines()
        .find_map(|l| l.strip_prefix("snapshot-options="))
        .unwrap_or_else(|| panic!("snapshot not mounted at post-restart:\n{hook_log}"));
    assert!(opts.split(',').any(|o| o == "ro"), "{opts}");
    assert!(
        hook_log.contains("snapshot-live=written-while-running\n")
            && hook_log.contains("backup-end state=RUNNING\n"),
        "{hook_log}"
    );
    let order = [
        "status = running",
        "backup mode: snapshot",
        "create storage snapshot 'vzdump'",
        "creating snapshot in dedup storage 'backups'",
        "files: ",
        "cleanup temporary 'vzdump' snapshot",
        "Finished Backup of VM 965",
    ];
    assert_in_order(&log, &order);
    assert!(!log.contains("stopping virtual guest"), "{log}");
    assert!(!log.contains("suspending guest"), "{log}");
    rt.block_on(async {
        assert_running_and_alive(&lxc, 965).await;
        assert_eq!(lxc.init_pid(965).await.unwrap().unwrap(), pid_before);
    });
    let conf = r.read("/etc/pve/lxc/965.conf");
    assert!(
        !conf.contains("vzdump") && !conf.contains("lock:") && !conf.contains("parent:"),
        "{conf}"
    );
    let snaps = btrfs_snapshots(&fs);
    assert!(!snaps.contains("vzdump"), "{snaps}");
    assert!(
        !sh(&format!(
            "mountpoint -q '{}'",
            r.join("/mnt/vzsnap0").display()
        ))
        .status
        .success()
    );
    let volids = dedup_volids(&r, 965);
    assert_eq!(volids, [backup_volume(&log)], "{log}");

    rt.block_on(lxc.stop(965, &mut warn)).unwrap();
    r.ok("pct", &["restore", "966", &volids[0], "--storage", "bt"]);
    let simple = r.read("/etc/pve/lxc/966.conf");
    assert!(
        simple.contains("rootfs: bt:966/subvol-966-disk-0.subvol"),
        "{simple}"
    );
    let advanced = r.ok(
        "pct",
        &["restore", "967", &volids[0], "--rootfs", "local:0.25"],
    );
    let advanced_conf = r.read("/etc/pve/lxc/967.conf");
    assert!(
        advanced_conf.contains("rootfs: local:967/vm-967-disk-0.raw,size=256M"),
        "{advanced}\n{advanced_conf}"
    );
    assert_restored_and_starts(&r, &rt, &lxc, 965, &[966, 967], &running_skips());
}

/// An unprivileged (id-mapped) container backed up into a `dedup` storage: in suspend mode
/// while it runs, then twice in stop mode once it is stopped. The snapshots hold the ids the
/// container sees, the third backup reuses the unchanged files of the second, and both the
/// suspend and the incremental snapshot restore unprivileged to trees equal to the source,
/// with host-mapped owners on disk; a privileged restore gets the container's ids on disk.
#[test]
#[ignore = "needs root: real unprivileged LXC containers, loop devices, mounts, rsync"]
fn unprivileged_container_into_dedup_storage_keeps_container_ids_and_reuses_files() {
    let _s = session();
    let _ids = SubIds::ensure();
    let (r, _g) = host_with_ct_as(968, "local:0.1", None, 100_000);
    let _g2 = CtGuard {
        lxcpath: lxcpath(&Layout::new(r.path())),
        vmids: vec![969, 970, 971],
    };
    r.write("/etc/pve/storage.cfg", &dedup_section(&r));
    let s = storages(&r);
    let lxc = Lxc::new(&s);
    let rt = rt();
    let pid_before = start_live(&rt, &lxc, 968);
    let host_file = PathBuf::from(format!("/proc/{pid_before}/root/root/live.txt"));
    assert_eq!(std::fs::metadata(&host_file).unwrap().uid(), 100_000);
    age_tree();

    // 1. Suspend mode while it runs.
    let (ok, log) = vzdump(&r, &["968", "--mode", "suspend", "--storage", "backups"]);
    assert!(ok, "{log}");
    assert!(
        line_of(&log, "backup mode: suspend") < line_of(&log, "suspending guest")
            && line_of(&log, "resuming guest")
                < line_of(&log, "creating snapshot in dedup storage 'backups'"),
        "{log}"
    );
    online_after(&log);
    let suspended = backup_volume(&log);
    assert_kept_running(&r, &rt, &lxc, 968, pid_before);
    // Owners as the container sees them, not the host's shifted ids.
    let files = r.ok("vzkit-store", &["files", &suspended]);
    let live = files
        .lines()
        .find(|l| l.ends_with(" ./root/live.txt"))
        .unwrap_or_else(|| panic!("{files}"));
    assert!(live.starts_with("- 0644 0/0 "), "{live}");
    assert!(!files.contains("100000/"), "{files}");
    assert!(
        files.lines().any(|l| l.ends_with(" ./bin/busybox")),
        "{files}"
    );
    // The export is a vzdump archive GNU tar reads with the same owners.
    let export = r.join("/export.tar.zst");
    r.ok(
        "vzkit-store",
        &["export", &suspended, export.to_str().unwrap()],
    );
    let listing = tar_verbose(&export);
    let live = listing
        .lines()
        .find(|l| l.ends_with(" ./root/live.txt"))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(live.contains(" 0/0 "), "{live}");
    assert!(!listing.contains("100000/"), "{listing}");

    // 2. Stopped: a stop-mode backup, then an incremental one of the unchanged container.
    // Snapshots are named by the second they start in: one per second and container.
    rt.block_on(lxc.stop(968, &mut warn)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (ok, log) = vzdump(&r, &["968", "--mode", "stop", "--storage", "backups"]);
    assert!(ok, "{log}");
    assert!(log.contains("status = stopped\n"), "{log}");
    // Files changed within 1 s before a backup are read again by the next one.
    std::thread::sleep(Duration::from_millis(1100));
    let (ok, log) = vzdump(&r, &["968", "--mode", "stop", "--storage", "backups"]);
    assert!(ok, "{log}");
    let (n, read, reused) = files_line(&log);
    assert!(reused > 0, "nothing reused:\n{log}");
    assert_eq!(read + reused, n, "{log}");
    // Only the ticker, written until the stop, may have been recent enough to be read.
    assert!(read <= 1, "the unchanged container was read again:\n{log}");
    let incremental = backup_volume(&log);
    let volids = dedup_volids(&r, 968);
    assert_eq!(volids.len(), 3, "{volids:?}");
    assert_eq!(volids[0], suspended);
    assert_eq!(volids[2], incremental);
    let files = r.ok("vzkit-store", &["files", &incremental]);
    assert!(!files.contains("100000/"), "{files}");

    // 3. Restores: unprivileged (from the backed-up config) and privileged.
    r.ok(
        "pct",
        &["restore", "969", &incremental, "--storage", "local"],
    );
    r.ok("pct", &["restore", "970", &suspended, "--storage", "local"]);
    r.ok(
        "pct",
        &[
            "restore",
            "971",
            &incremental,
            "--storage",
            "local",
            "--unprivileged",
            "0",
        ],
    );
    for id in [969, 970] {
        let conf = r.read(&format!("/etc/pve/lxc/{id}.conf"));
        assert!(conf.contains("unprivileged: 1\n"), "{conf}");
    }
    let conf = r.read("/etc/pve/lxc/971.conf");
    assert!(!conf.contains("unprivileged: 1"), "{conf}");
    r.with_mounted(&["968", "969", "970", "971"], || {
        let src = r.join("/var/lib/lxc/968/rootfs");
        let root = |id: u32| r.join(&format!("/var/lib/lxc/{id}/rootfs"));
        // Host-mapped owners on disk, as the source has them.
        for id in [969, 970] {
            let m = std::fs::metadata(root(id).join("root/live.txt")).unwrap();
            assert_eq!((m.uid(), m.gid()), (100_000, 100_000), "{id}");
        }
        let sk = crate::restore::Skips {
            meta: vec![b"", b"etc", b"lost+found"],
            extra: vec![b"lost+found", b"etc/vzdump"],
        };
        crate::restore::compare_trees(&src, &root(969), 0, &sk);
        assert_ticker_prefix(&src, &root(970));
        crate::restore::compare_trees(&src, &root(970), 0, &suspend_skips());
        // Privileged: the container's own ids on disk.
        for f in ["root/live.txt", "bin/busybox", "etc/passwd"] {
            let m = std::fs::metadata(root(971).join(f)).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 0), "{f}");
        }
        assert_eq!(
            std::fs::read(root(971).join("root/ticker")).unwrap(),
            std::fs::read(src.join("root/ticker")).unwrap()
        );
    });
    rt.block_on(async {
        lxc.start(969, false, &mut warn).await.unwrap();
        assert_running_and_alive(&lxc, 969).await;
        assert_eq!(
            exec(&lxc, 969, "cat /root/live.txt").await,
            "written-while-running\n"
        );
        assert_eq!(exec(&lxc, 969, "stat -c %u /root/live.txt").await, "0\n");
        lxc.stop(969, &mut warn).await.unwrap();
    });
}
