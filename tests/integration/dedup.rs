//! The deduplicating backup store (`vzkit-store`, crate `vzkit-dedup`) on real trees: restores
//! compared exactly with the source, exports compared byte for byte with vzdump's tar stream,
//! incremental change detection, and faults (kill -9 of backups and garbage collections,
//! corrupted chunks, backups running during a garbage collection).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vzkit_archive::{ArchiveWriter, ExcludeSet};

use crate::common;
use crate::restore::{Skips, compare_trees, mp_skips};

const CONF: &[u8] =
    b"arch: amd64\nhostname: ct100\nmemory: 512\nrootfs: local:100/vm-100-disk-0.raw,size=1G\n";
const CONF_MTIME: i64 = 1_700_000_000;

/// A store directory plus helpers running `vzkit-store` on it.
struct Env {
    _dir: tempfile::TempDir,
    store: PathBuf,
    work: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("vzkit-dedup-")
            .tempdir()
            .unwrap();
        let store = dir.path().join("store");
        let work = dir.path().join("work");
        fs::create_dir(&store).unwrap();
        fs::create_dir(&work).unwrap();
        fs::write(work.join("pct.conf"), CONF).unwrap();
        Env {
            _dir: dir,
            store,
            work,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(vzkit_tests::bin("vzkit-store"));
        c.arg("--store").arg(&self.store).args(args);
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vzkit-store {args:?} failed: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn backup_args(&self, src: &Path, time: i64, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "backup".into(),
            "100".into(),
            src.display().to_string(),
            "--conf".into(),
            self.work.join("pct.conf").display().to_string(),
            "--conf-mtime".into(),
            CONF_MTIME.to_string(),
            "--time".into(),
            time.to_string(),
        ];
        a.extend(extra.iter().map(|s| (*s).to_string()));
        a
    }

    /// Back up `src` as snapshot `time`; the backup's statistics.
    fn backup(&self, src: &Path, time: i64, extra: &[&str]) -> Value {
        let a = self.backup_args(src, time, extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn spawn_backup(&self, src: &Path, time: i64, extra: &[&str]) -> Child {
        let a = self.backup_args(src, time, extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.cmd(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn snapshots(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["list"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["snapshot"].as_str().unwrap().to_string())
            .collect()
    }

    fn gc(&self, grace: &str) -> Value {
        serde_json::from_str(&self.ok(&["garbage-collect", "--grace", grace])).unwrap()
    }

    /// Chunk files (not temporary, not swept or bad ones).
    fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.store.join(".chunks");
        let list = |p: &Path| fs::read_dir(p).into_iter().flatten().flatten();
        for a in list(&root) {
            for c in list(&a.path()) {
                let n = c.file_name().to_string_lossy().into_owned();
                if n.len() == 64 {
                    out.push(c.path());
                }
            }
        }
        out
    }

    fn chunk_path(&self, data: &[u8]) -> PathBuf {
        let h = blake3::hash(data).to_hex().to_string();
        self.store.join(".chunks").join(&h[..2]).join(&h)
    }

    fn restore(&self, snap: &str, target: &Path) {
        fs::create_dir_all(target).unwrap();
        self.ok(&["restore", snap, &target.display().to_string()]);
    }
}

fn snap_name(time: i64) -> String {
    let t = jiff::Timestamp::from_second(time).unwrap();
    format!("ct/100/{}", t.strftime("%Y-%m-%dT%H:%M:%SZ"))
}

fn skips() -> Skips {
    Skips {
        meta: vec![b"", b"etc"],
        extra: vec![b"etc/vzdump"],
    }
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// The tar stream vzdump writes for `src` with the test config.
fn vzdump_tar(src: &Path) -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new());
    w.append_data("./etc/vzdump/pct.conf", CONF, 0o644, CONF_MTIME)
        .unwrap();
    w.append_data("./etc/vzdump/pct.fw", b"", 0o644, CONF_MTIME)
        .unwrap();
    w.append_tree(src, "./", &ExcludeSet::new(), true).unwrap();
    w.finish().unwrap()
}

/// Distinct pseudo-random bytes per seed (`common::noise` ignores the lowest seed bit).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    common::noise(len, seed << 1)
}

/// A tree of `n` files of `size` pseudo-random bytes in a few directories.
fn bulk_tree(root: &Path, n: usize, size: usize, seed: u64) {
    fs::create_dir_all(root.join("etc")).unwrap();
    for i in 0..n {
        let d = root.join(format!("d{}", i % 10));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), noise(size, seed + i as u64)).unwrap();
    }
}

/// Files changed within a second before a backup are not trusted by the next one.
fn settle() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
#[ignore = "needs root: fixture with owners, devices, ACLs; restores as root"]
fn backup_restores_exactly_and_exports_the_vzdump_tar() {
    let scratch = common::Scratch::new();
    let env = Env::new();
    let src = scratch.subdir("src");
    common::build_fixture(&src);
    let st = env.backup(&src, 1_700_000_100, &[]);
    assert!(num(&st, "chunks-new") > 0, "{st}");
    let snaps = env.snapshots();
    assert_eq!(snaps, vec![snap_name(1_700_000_100)]);

    let dst = scratch.subdir("dst");
    env.restore(&snaps[0], &dst);
    compare_trees(&src, &dst, 0, &skips());

    let tar = vzdump_tar(&src);
    assert_eq!(num(&st, "logical-size"), tar.len() as u64);
    let out = env.work.join("export.tar.zst");
    env.ok(&["export", &snaps[0], &out.display().to_string()]);
    let mut exported = Vec::new();
    zstd::stream::read::Decoder::new(fs::File::open(&out).unwrap())
        .unwrap()
        .read_to_end(&mut exported)
        .unwrap();
    assert!(exported == tar, "export differs from the vzdump tar stream");
    // GNU tar reads it too.
    common::run(Command::new("tar").arg("--zstd").arg("-tf").arg(&out));
    // Onto stdout (a pipe): the archive alone.
    let o = env.run(&["export", &snaps[0], "/dev/stdout"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        zstd::decode_all(&o.stdout[..]).unwrap() == tar,
        "export to stdout differs"
    );

    // Stored config, listing and single-file extraction.
    assert_eq!(env.ok(&["extractconfig", &snaps[0]]).as_bytes(), CONF);
    let files = env.ok(&["files", &snaps[0], "usr/bin"]);
    assert!(files.contains("./usr/bin/suid"), "{files}");
    assert!(!files.contains("./etc/hostname"), "{files}");
    let one = scratch.subdir("one");
    env.ok(&[
        "extract-file",
        &snaps[0],
        "./usr/bin/big",
        &one.display().to_string(),
    ]);
    assert_eq!(
        fs::read(one.join("usr/bin/big")).unwrap(),
        fs::read(src.join("usr/bin/big")).unwrap()
    );
    let missing = env.run(&[
        "extract-file",
        &snaps[0],
        "./no/such",
        &one.display().to_string(),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[test]
#[ignore = "needs root: restores with an id map (chown to 100000+)"]
fn unprivileged_restore_maps_owners() {
    let scratch = common::Scratch::new();
    let env = Env::new();
    let src = scratch.subdir("src");
    common::build_fixture(&src);
    for f in ["null", "blk", "owned-big-id"] {
        fs::remove_file(src.join(f)).unwrap();
    }
    env.backup(&src, 1_700_000_100, &[]);
    let dst = scratch.subdir("dst");
    env.ok(&[
        "restore",
        &snap_name(1_700_000_100),
        &dst.display().to_string(),
        "--unprivileged",
    ]);
    compare_trees(&src, &dst, 100_000, &skips());
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn incremental_backup_reads_only_changed_files() {
    let env = Env::new();
    let src = env.work.join("src");
    bulk_tree(&src, 40, 300_000, 1);
    fs::write(src.join("big"), common::noise(6 << 20, 99)).unwrap();
    settle();
    let first = env.backup(&src, 1_700_000_000, &[]);
    assert_eq!(num(&first, "files"), 41);
    assert_eq!(num(&first, "files-read"), 41);

    // Unchanged: nothing is read, nothing is written.
    let same = env.backup(&src, 1_700_000_010, &[]);
    assert_eq!(num(&same, "files-read"), 0, "{same}");
    assert_eq!(num(&same, "bytes-read"), 0, "{same}");
    assert_eq!(num(&same, "files-reused"), 41);
    assert_eq!(num(&same, "chunks-new"), 0);

    // Two changes: an append, and a same-size rewrite whose mtime is put back.
    let appended = src.join("d1/f1");
    let mut f = fs::OpenOptions::new().append(true).open(&appended).unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    let sneaky = src.join("d2/f2");
    let mut data = fs::read(&sneaky).unwrap();
    data[1000] ^= 0xff;
    fs::write(&sneaky, &data).unwrap();
    common::run(
        Command::new("touch")
            .arg("-d")
            .arg("@1600000000.123456789")
            .arg(&sneaky),
    );
    common::run(
        Command::new("touch")
            .arg("-d")
            .arg("@1600000000.123456789")
            .arg(src.join("d3/f3")),
    );
    let ino_before = std::os::unix::fs::MetadataExt::ino(&fs::metadata(src.join("d3/f3")).unwrap());
    let changed = env.backup(&src, 1_700_000_020, &[]);
    assert_eq!(num(&changed, "files-read"), 3, "{changed}");
    assert_eq!(
        num(&changed, "bytes-read"),
        300_008 + 300_000 + 300_000,
        "{changed}"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(src.join("d3/f3")).unwrap()),
        ino_before
    );
    // Only the two changed files produce new chunks (f3's content is unchanged).
    assert_eq!(num(&changed, "chunks-new"), 2, "{changed}");
    let dst = env.work.join("r2");
    env.restore(&snap_name(1_700_000_020), &dst);
    compare_trees(&src, &dst, 0, &skips());

    // A renamed big file is read again (new name) but deduplicates completely.
    settle();
    fs::rename(src.join("big"), src.join("d9/big-renamed")).unwrap();
    let renamed = env.backup(&src, 1_700_000_030, &[]);
    // The three files changed just before the last backup are read again (racy rule).
    assert_eq!(num(&renamed, "files-read"), 4, "{renamed}");
    assert_eq!(
        num(&renamed, "bytes-read"),
        (6 << 20) + 900_008,
        "{renamed}"
    );
    assert_eq!(num(&renamed, "chunks-new"), 0, "{renamed}");

    // --change-detection data reads everything.
    settle();
    let full = env.backup(&src, 1_700_000_040, &["--change-detection", "data"]);
    assert_eq!(num(&full, "files-read"), 41, "{full}");
    assert_eq!(num(&full, "chunks-new"), 0, "{full}");
    let dst = env.work.join("r4");
    env.restore(&snap_name(1_700_000_040), &dst);
    compare_trees(&src, &dst, 0, &skips());
    let bad = env.run(
        &env.backup_args(&src, 1_700_000_050, &["--change-detection", "mtime"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid change detection mode"));
}

/// Wait until `pred` holds (or panic after 60 s).
fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let t = Instant::now();
    while !pred() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill9(child: &mut Child) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "process ended before it was killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn killed_backup_leaves_no_snapshot_and_gc_removes_its_chunks() {
    let env = Env::new();
    let src = env.work.join("src");
    bulk_tree(&src, 200, 1 << 20, 7);
    let mut child = env.spawn_backup(&src, 1_700_000_000, &[]);
    wait_for("the first chunks", || env.chunk_files().len() >= 5);
    kill9(&mut child);
    assert!(env.snapshots().is_empty());
    let orphans = env.chunk_files().len();
    assert!(orphans >= 5);
    let tmp: Vec<_> = fs::read_dir(env.store.join("ct/100"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert_eq!(tmp.len(), 1, "the killed backup's temporary snapshot");
    // Within the grace period no chunk goes; the dead writer's directory does.
    let kept = env.gc("3600");
    assert_eq!(num(&kept, "chunks-removed"), 0, "{kept}");
    assert_eq!(num(&kept, "stale-snapshots-removed"), 1, "{kept}");
    settle();
    let r = env.gc("0");
    assert_eq!(num(&r, "chunks-removed") as usize, orphans, "{r}");
    assert!(env.chunk_files().is_empty());
    assert_eq!(
        fs::read_dir(env.store.join("ct/100"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != ".lock")
            .count(),
        0
    );
    // The group is usable again.
    let st = env.backup(&src, 1_700_000_100, &[]);
    assert_eq!(num(&st, "files-read"), 200);
    let out = env.ok(&["verify"]);
    assert!(out.contains(": ok"), "{out}");
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn killed_gc_loses_no_referenced_chunk() {
    let env = Env::new();
    let src = env.work.join("src");
    // Many small files, not packed: one chunk each, so marking and sweeping take a while.
    bulk_tree(&src, 3000, 2000, 11);
    env.backup(&src, 1_700_000_000, &["--pack-below", "0"]);
    // A second version with a third of the files replaced; then the first is removed,
    // so the sweep has garbage to remove.
    for i in (0..3000).step_by(3) {
        fs::write(
            src.join(format!("d{}/f{i}", i % 10)),
            noise(2000, 50_000 + i as u64),
        )
        .unwrap();
    }
    env.backup(&src, 1_700_000_010, &["--pack-below", "0"]);
    env.ok(&["remove", &snap_name(1_700_000_000)]);
    settle();
    let mut killed = 0;
    for delay in [0u64, 10, 30, 60, 100, 200] {
        let mut gc = env
            .cmd(&["garbage-collect", "--grace", "0"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        if gc.try_wait().unwrap().is_some() {
            break;
        }
        killed += 1;
        gc.kill().unwrap();
        gc.wait().unwrap();
        let out = env.ok(&["verify"]);
        assert!(
            out.contains(": ok") && !out.contains("FAILED"),
            "after kill at {delay} ms: {out}"
        );
    }
    assert!(killed >= 2, "the collection was killed {killed} times");
    let r = env.gc("0");
    assert_eq!(r["missing"], serde_json::json!([]), "{r}");
    let out = env.ok(&["verify"]);
    assert!(out.contains(": ok"), "{out}");
    // 3000 file chunks and the config's.
    assert_eq!(num(&r, "chunks-marked"), 3001, "{r}");
    assert_eq!(env.chunk_files().len(), 3001);
    let dst = env.work.join("r");
    env.restore(&snap_name(1_700_000_010), &dst);
    compare_trees(&src, &dst, 0, &skips());
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn corrupt_chunk_is_found_and_only_its_files_fail_to_restore() {
    let env = Env::new();
    let src = env.work.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    // Two small files packed into one chunk (together smaller than the minimum chunk
    // size), and a larger file with a chunk of its own.
    let victim = common::noise(50_000, 3);
    fs::write(src.join("etc/victim"), &victim).unwrap();
    fs::write(src.join("neighbour"), b"packed with the victim\n").unwrap();
    fs::write(src.join("etc/fine"), common::noise(100_000, 4)).unwrap();
    settle();
    let st = env.backup(&src, 1_700_000_000, &[]);
    // The config's chunk, fine's and the pack chunk.
    assert_eq!(num(&st, "chunks-new"), 3, "{st}");
    let snap = snap_name(1_700_000_000);
    let packed = [victim.as_slice(), b"packed with the victim\n"].concat();
    let chunk = env.chunk_path(&packed);
    assert!(
        env.chunk_path(&fs::read(src.join("etc/fine")).unwrap())
            .exists()
    );
    let mut bytes = fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&chunk, &bytes).unwrap();

    let dst = env.work.join("r");
    fs::create_dir(&dst).unwrap();
    let o = env.run(&["restore", &snap, &dst.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("file './etc/victim' not restored"), "{err}");
    assert!(err.contains("file './neighbour' not restored"), "{err}");
    assert!(!dst.join("etc/victim").exists());
    assert!(!dst.join("neighbour").exists());
    assert_eq!(
        fs::read(dst.join("etc/fine")).unwrap(),
        fs::read(src.join("etc/fine")).unwrap()
    );

    let o = env.run(&["verify", &snap]);
    assert_eq!(o.status.code(), Some(2));
    let out = String::from_utf8_lossy(&o.stdout);
    let digest = blake3::hash(&packed).to_hex().to_string();
    assert!(
        out.contains(&format!(
            "bad chunk {digest}: content does not match its digest"
        )),
        "{out}"
    );
    assert!(out.contains("used by ./etc/victim"), "{out}");
    assert!(out.contains("used by ./neighbour"), "{out}");
    let v: Value = serde_json::from_str(&env.ok(&["list"])).unwrap();
    assert_eq!(v[0]["verification"], "failed");
    assert!(!chunk.exists(), "the bad chunk is moved away");
    assert!(chunk.with_extension("bad").exists());
    let export = env.run(&[
        "export",
        &snap,
        &env.work.join("x.tar.zst").display().to_string(),
    ]);
    assert!(!export.status.success());
    assert!(String::from_utf8_lossy(&export.stderr).contains("./etc/victim"));
    assert!(!env.work.join("x.tar.zst").exists());
    // Into a device (here through a link to /dev/null): written to, left in place.
    let null = env.work.join("null");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    let export = env.run(&["export", &snap, &null.display().to_string()]);
    assert!(!export.status.success());
    assert!(String::from_utf8_lossy(&export.stderr).contains("./etc/victim"));
    assert!(fs::symlink_metadata(&null).is_ok());

    // The next backup (metadata mode: the files are unchanged) reads the files of the
    // bad chunk again and so writes it again.
    let st = env.backup(&src, 1_700_000_010, &[]);
    assert_eq!(num(&st, "files-read"), 2, "{st}");
    assert!(chunk.exists());
    let out = env.ok(&["verify", &snap_name(1_700_000_010)]);
    assert!(out.contains(": ok"), "{out}");
    // The next collection drops it from the list of bad chunks; later backups trust it.
    let listed = || fs::read_to_string(env.store.join(".bad-chunks")).unwrap();
    assert!(listed().contains(&digest), "{}", listed());
    let r = env.gc("3600");
    assert_eq!(num(&r, "bad-chunks-cleared"), 1, "{r}");
    assert!(!listed().contains(&digest), "{}", listed());
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn damaged_chunk_in_a_large_file_leaves_the_files_after_it_intact() {
    let env = Env::new();
    let src = env.work.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    // In walk order: a small file, a large file of several chunks, then small files
    // (packed together into one chunk).
    fs::write(src.join("d/a-before"), b"before\n").unwrap();
    // Not a multiple of 512: the member is padded.
    fs::write(src.join("d/b-big"), common::noise((3 << 20) + 1000, 7)).unwrap();
    fs::write(src.join("d/c-after"), common::noise(40_000, 8)).unwrap();
    fs::write(src.join("d/d-small"), b"small after\n").unwrap();
    settle();
    env.backup(&src, 1_700_000_000, &[]);
    let snap = snap_name(1_700_000_000);
    // Damage b-big's chunks: the large ones, and its last one (followed by the member's
    // padding), which may be short. The packed small files and the config are not.
    let data = fs::read(src.join("d/b-big")).unwrap();
    let big: Vec<_> = env
        .chunk_files()
        .into_iter()
        .filter(|c| {
            let plain = zstd::decode_all(fs::File::open(c).unwrap()).unwrap();
            plain.len() >= 64 << 10 || data.ends_with(&plain)
        })
        .collect();
    assert!(big.len() >= 3, "{big:?}");
    assert!(big.iter().any(|c| {
        let plain = zstd::decode_all(fs::File::open(c).unwrap()).unwrap();
        data.ends_with(&plain)
    }));
    for chunk in &big {
        let mut bytes = fs::read(chunk).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(chunk, &bytes).unwrap();
    }

    let dst = env.work.join("r");
    fs::create_dir(&dst).unwrap();
    let o = env.run(&["restore", &snap, &dst.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("file './d/b-big' not restored"), "{err}");
    assert!(!dst.join("d/b-big").exists());
    for f in ["a-before", "c-after", "d-small"] {
        assert_eq!(
            fs::read(dst.join("d").join(f)).unwrap(),
            fs::read(src.join("d").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn swapped_chunk_files_fail_their_file_and_verify() {
    // The chunk files of two files exchanged: both hold intact zstd data of the right
    // length, so only the check the catalog recorded for each reference (or the digest)
    // tells. Files of 100 KiB (chunked on their own, one chunk each).
    let env = Env::new();
    let src = env.work.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let (a, b) = (common::noise(100 << 10, 11), common::noise(100 << 10, 13));
    fs::write(src.join("d/a"), &a).unwrap();
    fs::write(src.join("d/b"), &b).unwrap();
    fs::write(src.join("d/other"), b"other\n").unwrap();
    settle();
    env.backup(&src, 1_700_000_000, &[]);
    let snap = snap_name(1_700_000_000);
    let (ca, cb) = (env.chunk_path(&a), env.chunk_path(&b));
    let (za, zb) = (fs::read(&ca).unwrap(), fs::read(&cb).unwrap());
    fs::write(&ca, &zb).unwrap();
    fs::write(&cb, &za).unwrap();

    let dst = env.work.join("r");
    fs::create_dir(&dst).unwrap();
    let o = env.run(&["restore", &snap, &dst.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    for f in ["a", "b"] {
        assert!(
            err.contains(&format!("file './d/{f}' not restored")),
            "{err}"
        );
        assert!(!dst.join("d").join(f).exists());
    }
    assert!(err.contains("does not match its digest"), "{err}");
    assert_eq!(fs::read(dst.join("d/other")).unwrap(), b"other\n");
    let o = env.run(&["verify", &snap]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("content does not match its digest"), "{out}");
}

/// `VmHWM` (peak resident set) of a running process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn restore_streams_in_bounded_memory() {
    // 256 MiB of incompressible data in one file (about 1,000 chunks) and 2,000 small files.
    let env = Env::new();
    let src = env.work.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    {
        use std::io::Write;
        let mut f = fs::File::create(src.join("d/big")).unwrap();
        for i in 0..64 {
            f.write_all(&common::noise(4 << 20, 100 + i)).unwrap();
        }
    }
    bulk_tree(&src.join("small"), 2000, 3000, 5);
    settle();
    env.backup(&src, 1_700_000_000, &[]);
    let snap = snap_name(1_700_000_000);

    // What the process may hold: the chunk stream's batches (about 30 MiB), kept buffers
    // (32 MiB) and packed chunks (16 MiB), the program itself, and per CPU a chunk reading
    // thread (a restore) and a zstd worker with its buffers (an export). Far below the
    // 256 MiB of data on a few CPUs (an unbounded read-ahead held 300 MiB here).
    let cpus = std::thread::available_parallelism().map_or(2, usize::from) as u64;
    let restore_kib = (96 + 4 * cpus) << 10;
    let export_kib = (80 + 24 * cpus) << 10;

    // The stream's reader stalls: an export into a pipe nobody reads for 4 s. The chunk
    // readers stop a few batches ahead instead of taking the snapshot into memory.
    let fifo = env.work.join("export.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut child = env
        .cmd(&["export", &snap, &fifo.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Opening the pipe waits for the export to open it: should it fail before, a writer
    // opened here ends the wait (and the test fails below, not hangs).
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (opened, fifo, pid) = (std::sync::Arc::clone(&opened), fifo.clone(), child.id());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !opened.load(std::sync::atomic::Ordering::Relaxed) {
                // After ")" in the stat line: the state (Z: exited, not yet waited for).
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ended = stat
                    .rsplit_once(')')
                    .is_none_or(|(_, r)| r.trim_start().starts_with('Z'));
                if ended || start.elapsed() > Duration::from_secs(120) {
                    let _ = fs::OpenOptions::new().write(true).open(&fifo);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut pipe = fs::File::open(&fifo).unwrap();
    opened.store(true, std::sync::atomic::Ordering::Relaxed);
    watch.join().unwrap();
    let mut buf = vec![0; 1 << 20];
    if pipe.read_exact(&mut buf).is_err() {
        let _ = child.kill();
        panic!("export ended early: {:?}", child.wait_with_output());
    }
    std::thread::sleep(Duration::from_secs(4));
    let stalled = peak_kib(child.id());
    let mut exported = buf.len() as u64;
    loop {
        let n = pipe.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        exported += n as u64;
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(exported > 200 << 20, "{exported}");
    assert!(
        stalled < export_kib,
        "peak resident set {stalled} KiB while stalled (bound {export_kib} KiB)"
    );

    // A restore, timed by GNU time: the same bound, and the tree is exact.
    let dst = env.work.join("r");
    fs::create_dir(&dst).unwrap();
    let o = Command::new("/usr/bin/time")
        .args(["-f", "peak-kib %M"])
        .arg(vzkit_tests::bin("vzkit-store"))
        .arg("--store")
        .arg(&env.store)
        .args(["restore", &snap, &dst.display().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let kib: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("peak-kib "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak in {err}"));
    assert!(
        kib < restore_kib,
        "peak resident set {kib} KiB (bound {restore_kib} KiB)"
    );
    compare_trees(&src, &dst, 0, &skips());
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn backup_during_gc_stays_complete() {
    let env = Env::new();
    let src = env.work.join("src");
    bulk_tree(&src, 150, 1 << 20, 21);
    env.backup(&src, 1_700_000_000, &[]);
    // All chunks become garbage, and the next backup finds them present.
    env.ok(&["remove", &snap_name(1_700_000_000)]);
    settle();
    let mut child = env.spawn_backup(&src, 1_700_000_010, &["--change-detection", "data"]);
    let mut runs = 0;
    while child.try_wait().unwrap().is_none() {
        env.gc("0");
        runs += 1;
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(runs >= 2, "only {runs} collections ran during the backup");
    let v = env.ok(&["verify"]);
    assert!(v.contains(": ok") && !v.contains("FAILED"), "{v}");
    let r = env.gc("0");
    assert_eq!(r["missing"], serde_json::json!([]), "{r}");
    let dst = env.work.join("r");
    env.restore(&snap_name(1_700_000_010), &dst);
    compare_trees(&src, &dst, 0, &skips());
}

#[test]
#[ignore = "needs root: the store tests run with the other root-only integration tests"]
fn prune_keeps_protected_snapshots_and_notes() {
    let env = Env::new();
    let src = env.work.join("src");
    bulk_tree(&src, 3, 1000, 1);
    for i in 0..5 {
        env.backup(&src, 1_700_000_000 + i * 86_400, &[]);
    }
    env.ok(&["protect", &snap_name(1_700_000_000), "1"]);
    env.ok(&["notes", &snap_name(1_700_000_000), "before upgrade"]);
    assert_eq!(
        env.ok(&["notes", &snap_name(1_700_000_000)]),
        "before upgrade"
    );
    let dry = env.ok(&["prune", "100", "--keep", "keep-last=2", "--dry-run"]);
    assert_eq!(env.snapshots().len(), 5, "{dry}");
    env.ok(&["prune", "100", "--keep", "keep-last=2"]);
    let left = env.snapshots();
    assert_eq!(
        left,
        vec![
            snap_name(1_700_000_000),
            snap_name(1_700_000_000 + 3 * 86_400),
            snap_name(1_700_000_000 + 4 * 86_400)
        ]
    );
    let o = env.run(&["remove", &snap_name(1_700_000_000)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("protected"));
}

/// A vzkit root with a `local` dir storage, a `dedup` storage `backups` at `/srv/backups`
/// (with `dedup_options`, tab-indented lines) and the config of container 100 without
/// volumes.
fn vzdump_host(dedup_options: &str) -> vzkit_tests::TestRoot {
    let tr = vzkit_tests::TestRoot::new();
    tr.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: local\n\tpath {}\n\tcontent backup,rootdir,images,vztmpl\n\n\
             dedup: backups\n\tpath {}\n\tcontent backup\n{dedup_options}",
            tr.join("/var/lib/vz").display(),
            tr.join("/srv/backups").display()
        ),
    );
    tr.write(
        "/etc/pve/lxc/100.conf",
        "arch: amd64\nhostname: src100\nmemory: 256\nostype: debian\n",
    );
    tr
}

/// `pvesm list backups` (JSON rows, oldest first).
fn snapshot_rows(tr: &vzkit_tests::TestRoot) -> Vec<Value> {
    let list: Value =
        serde_json::from_str(&tr.ok("pvesm", &["list", "backups", "--output-format", "json"]))
            .unwrap();
    list.as_array().cloned().unwrap_or_default()
}

/// `vzdump --storage <dedup>` of a real container (rootfs and a `backup=1` mount point, stop
/// mode), twice (the second reads nothing), then `pvesm list`, `pvesm extractconfig`,
/// `pct restore` privileged and unprivileged compared with the source, and
/// `pvesm prune-backups`.
#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts, chown"]
fn vzdump_to_dedup_storage_and_pct_restore() {
    let tr = vzdump_host("\tprune-backups keep-last=5\n");
    let src = crate::restore::fixture_ct_100(&tr, |_| {});
    settle();

    let both = |args: &[&str]| {
        let o = tr.run("vzdump", args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "vzdump {args:?} failed: {text}");
        text
    };
    let first = both(&[
        "100",
        "--storage",
        "backups",
        "--mode",
        "stop",
        "--notes-template",
        "{{guestname}}",
    ]);
    assert!(
        first.contains("creating snapshot in dedup storage 'backups'"),
        "{first}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let second = both(&["100", "--storage", "backups", "--mode", "stop"]);
    let line = second
        .lines()
        .find(|l| l.contains("files: "))
        .unwrap_or_else(|| panic!("{second}"));
    assert!(
        line.contains("(0 read, "),
        "the unchanged container was read again: {line}"
    );

    let rows = snapshot_rows(&tr);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert!(
            r["volid"]
                .as_str()
                .unwrap()
                .starts_with("backups:backup/ct/100/"),
            "{r}"
        );
        assert_eq!(r["format"], "dedup");
        assert_eq!(r["vmid"], 100);
    }
    assert_eq!(rows[0]["notes"], "src100");
    let volid = rows[1]["volid"].as_str().unwrap().to_string();
    let conf = tr.ok("pvesm", &["extractconfig", &volid]);
    assert!(conf.contains("hostname: src100"), "{conf}");

    let sk = mp_skips();
    tr.with_mounted(&["100"], || {
        for (vmid, unprivileged) in [(401u32, false), (402, true)] {
            let id = vmid.to_string();
            let mut args = vec!["restore", id.as_str(), volid.as_str(), "--storage", "local"];
            if unprivileged {
                args.extend(["--unprivileged", "1"]);
            }
            tr.ok("pct", &args);
            let root = tr.join(&format!("/var/lib/lxc/{vmid}/rootfs"));
            let shift = if unprivileged { 100_000 } else { 0 };
            tr.with_mounted(&[&id], || compare_trees(&src, &root, shift, &sk));
        }
    });

    tr.ok("pvesm", &["prune-backups", "backups", "--keep-last", "1"]);
    let rows = snapshot_rows(&tr);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["volid"].as_str().unwrap(), volid);
}

/// `vzdump --storage <dedup> --bwlimit`: file data is read at the limit, and a SIGTERM in
/// the middle stops the job like a tar backup: "interrupted by signal", no snapshot and no
/// temporary directory left in the store, the container unlocked and unmounted.
#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts"]
fn vzdump_to_dedup_storage_honours_bwlimit_and_signals() {
    use vzkit_tests::bin;
    let tr = vzdump_host("");
    let store = tr.join("/srv/backups");
    tr.ok("pct", &["set", "100", "--rootfs", "local:0.1"]);
    tr.with_mounted(&["100"], || {
        let src = tr.join("/var/lib/lxc/100/rootfs");
        fs::write(src.join("big"), noise(3 << 20, 31)).unwrap();
    });
    // 3 MiB at 1 MiB/s.
    let t = Instant::now();
    let o = tr.run(
        "vzdump",
        &["100", "--storage", "backups", "--bwlimit", "1024"],
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(log.contains("INFO: bandwidth limit: 1024 KiB/s"), "{log}");
    assert_eq!(snapshot_rows(&tr).len(), 1);

    // Interrupted: SIGTERM one second into the paced reads of a full re-read.
    std::thread::sleep(Duration::from_millis(1100));
    let child = Command::new(bin("vzdump"))
        .args([
            "100",
            "--storage",
            "backups",
            "--bwlimit",
            "1024",
            "--change-detection",
            "data",
        ])
        .env("VZKIT_ROOT", tr.path())
        .env("TZ", "UTC")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the temporary snapshot", || {
        fs::read_dir(store.join("ct/100"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
    });
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    common::run(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()),
    );
    let out = child.wait_with_output().unwrap();
    // Stopped at the next paced read, not after the remaining ~2 s of reading.
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INFO: bandwidth limit: 1024 KiB/s"), "{err}");
    assert!(
        err.contains("ERROR: Backup of VM 100 failed - interrupted by signal"),
        "{err}"
    );
    assert!(
        err.contains("ERROR: Backup job failed - interrupted by signal"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(store.join("ct/100"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(left.len(), 1, "only the first snapshot: {left:?}");
    assert!(!tr.read("/etc/pve/lxc/100.conf").contains("lock:"));
    assert!(tr.mounts().is_empty(), "{:?}", tr.mounts());
}

/// A stopped container whose volume images did not change since its last backup: the next
/// `vzdump --storage <dedup>` takes its trees over from that backup without walking them.
/// Mounting a volume writable (here to change one file) changes its image, so the backup
/// after that walks again — only the directories the volumes' inode tables show changed —
/// reads only the changed file, and the restore holds the change.
#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts"]
fn vzdump_takes_over_trees_of_unchanged_volume_images() {
    let tr = vzdump_host("");
    tr.ok(
        "pct",
        &[
            "set",
            "100",
            "--rootfs",
            "local:0.1",
            "--mp0",
            "local:0.1,mp=/mnt/data,backup=1",
        ],
    );
    let src = tr.join("/var/lib/lxc/100/rootfs");
    tr.with_mounted(&["100"], || {
        bulk_tree(&src, 30, 20_000, 41);
        bulk_tree(&src.join("mnt/data"), 20, 70_000, 42);
    });
    settle();
    let backup = || {
        std::thread::sleep(Duration::from_millis(1100));
        let o = tr.run("vzdump", &["100", "--storage", "backups", "--mode", "stop"]);
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{log}");
        let files = log
            .lines()
            .find(|l| l.contains("INFO: files: "))
            .unwrap_or_else(|| panic!("{log}"))
            .to_string();
        let taken: Vec<String> = log
            .lines()
            .filter(|l| l.contains("unchanged since the last backup: its tree"))
            .map(String::from)
            .collect();
        let dirs = log
            .lines()
            .find(|l| l.contains("unchanged since the last backup by the volume's inode table"))
            .map(String::from);
        (files, taken, dirs)
    };
    let (files, taken, dirs) = backup();
    assert!(taken.is_empty(), "{taken:?}");
    assert_eq!(dirs, None);
    assert!(files.contains("(50 read, 0 unchanged"), "{files}");
    let (files, taken, _) = backup();
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert!(
        taken[0].contains("'./'") && taken[1].contains("'./mnt/data'"),
        "{taken:?}"
    );
    assert!(
        files.contains("(0 read, 50 unchanged and reused)"),
        "{files}"
    );

    // A writable mount changes both images: walked again, one file read. Only the
    // directories with changed inodes in or below them are walked: the roots, /mnt (it
    // holds the mount point) and /mnt/data/d3. Taken over: etc, d0..d9 and lost+found of
    // the rootfs (12) and of the mount point but d3 (11), with the files in them (30 and
    // 18), and the unchanged file of d3 (its listing shows the same inode).
    tr.with_mounted(&["100"], || {
        fs::write(src.join("mnt/data/d3/f3"), b"changed\n").unwrap();
    });
    settle();
    let (files, taken, dirs) = backup();
    assert!(taken.is_empty(), "{taken:?}");
    let dirs = dirs.unwrap_or_else(|| panic!("no directory taken over: {files}"));
    assert!(
        dirs.contains("INFO: 23 directories and 72 entries in all unchanged"),
        "{dirs}"
    );
    assert!(
        files.contains("(1 read, 49 unchanged and reused)"),
        "{files}"
    );
    let (files, taken, _) = backup();
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert!(
        files.contains("(0 read, 50 unchanged and reused)"),
        "{files}"
    );

    // Leaving the mount point out of the backup changes what the rootfs tree holds at
    // /mnt/data (the rootfs's own directory): walked, though the rootfs image is unchanged.
    let conf = tr.read("/etc/pve/lxc/100.conf");
    let mp0 = conf
        .lines()
        .find_map(|l| l.strip_prefix("mp0: "))
        .unwrap_or_else(|| panic!("{conf}"))
        .to_string();
    assert!(mp0.contains("backup=1"), "{mp0}");
    tr.ok(
        "pct",
        &["set", "100", "--mp0", &mp0.replace("backup=1", "backup=0")],
    );
    let (files, taken, dirs) = backup();
    assert!(taken.is_empty(), "{taken:?}");
    assert_eq!(dirs, None, "another layout: walked whole");
    assert!(
        files.contains("INFO: files: 30 (0 read, 30 unchanged"),
        "{files}"
    );
    tr.ok("pct", &["set", "100", "--mp0", &mp0]);
    let (files, taken, dirs) = backup();
    assert!(taken.is_empty(), "{taken:?}");
    assert_eq!(dirs, None, "another layout: walked whole");
    assert!(files.contains("(20 read, 30 unchanged"), "{files}");
    let (_, taken, _) = backup();
    assert_eq!(taken.len(), 2, "{taken:?}");

    // The snapshot made of taken-over trees restores the current state exactly.
    let rows = snapshot_rows(&tr);
    assert_eq!(rows.len(), 7, "{rows:?}");
    let volid = rows[6]["volid"].as_str().unwrap();
    tr.ok("pct", &["restore", "101", volid, "--storage", "local"]);
    let sk = mp_skips();
    tr.with_mounted(&["100", "101"], || {
        let dst = tr.join("/var/lib/lxc/101/rootfs");
        assert_eq!(fs::read(dst.join("mnt/data/d3/f3")).unwrap(), b"changed\n");
        compare_trees(&src, &dst, 0, &sk);
    });

    // `--change-detection data` reads every file, straight from the clean images too.
    std::thread::sleep(Duration::from_millis(1100));
    let o = tr.run(
        "vzdump",
        &[
            "100",
            "--storage",
            "backups",
            "--mode",
            "stop",
            "--change-detection",
            "data",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("(50 read, 0 unchanged"), "{log}");
    let read = |suffix: &str| {
        log.lines()
            .find(|l| l.ends_with(suffix))
            .unwrap_or_else(|| panic!("no '{suffix}': {log}"))
            .to_string()
    };
    // "files: 50 (…), 2MB read" and "2MB of it read straight from the volume images".
    let total = read(" read");
    let total = total.rsplit(", ").next().unwrap().trim_end_matches(" read");
    let direct = read(" of it read straight from the volume images");
    assert!(direct.contains(&format!("INFO: {total} of it")), "{log}");
}
