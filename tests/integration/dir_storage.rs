//! `pvesm` on the `dir` backend: the embedded default storage, allocation, listing, paths,
//! freeing, status, pruning.

use std::os::unix::fs::MetadataExt;

use serde_json::Value;
use vzkit_tests::TestRoot;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

#[test]
#[ignore = "needs root: writes below a scratch root and runs the binaries"]
fn embedded_default_storage_is_local_dir_below_the_root() {
    let r = TestRoot::new();
    let out = json(&r.ok("pvesm", &["status", "--output-format", "json"]));
    let rows = out.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["storage"], "local");
    assert_eq!(rows[0]["type"], "dir");
    assert_eq!(rows[0]["active"], 1);
    assert_eq!(
        rows[0]["content"],
        "backup,images,iso,rootdir,snippets,vztmpl"
    );
    assert!(rows[0]["total"].as_u64().unwrap() > 0);
    for sub in [
        "images",
        "dump",
        "template/cache",
        "template/iso",
        "snippets",
        "private",
    ] {
        assert!(r.join("/var/lib/vz").join(sub).is_dir(), "{sub} missing");
    }
}

#[test]
#[ignore = "needs root: writes below a scratch root and runs the binaries"]
fn alloc_list_path_free_round_trip_with_sparse_images() {
    let r = TestRoot::new();
    assert_eq!(
        r.ok("pvesm", &["alloc", "local", "100", "", "64M"]).trim(),
        "successfully created 'local:100/vm-100-disk-0.raw'"
    );
    assert_eq!(
        r.ok(
            "pvesm",
            &["alloc", "local", "100", "vm-100-disk-7.raw", "1024"]
        )
        .trim(),
        "successfully created 'local:100/vm-100-disk-7.raw'"
    );
    r.ok(
        "pvesm",
        &["alloc", "local", "100", "", "0", "--format", "subvol"],
    );
    let path = r.ok("pvesm", &["path", "local:100/vm-100-disk-0.raw"]);
    let path = std::path::PathBuf::from(path.trim());
    assert_eq!(path, r.join("/var/lib/vz/images/100/vm-100-disk-0.raw"));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "image is not sparse: {} blocks",
        meta.blocks()
    );

    let list = json(&r.ok("pvesm", &["list", "local", "--output-format", "json"]));
    let vols: Vec<(&str, &str, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["volid"].as_str().unwrap(),
                v["format"].as_str().unwrap(),
                v["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        vols,
        [
            ("local:100/subvol-100-disk-1.subvol", "subvol", 0),
            ("local:100/vm-100-disk-0.raw", "raw", 64 << 20),
            ("local:100/vm-100-disk-7.raw", "raw", 1 << 20),
        ]
    );
    // Filters: another vmid lists nothing; content filter.
    assert_eq!(
        json(&r.ok(
            "pvesm",
            &["list", "local", "--vmid", "101", "--output-format", "json"]
        )),
        Value::Array(vec![])
    );
    let backups = json(&r.ok(
        "pvesm",
        &[
            "list",
            "local",
            "--content",
            "backup",
            "--output-format",
            "json",
        ],
    ));
    assert_eq!(backups, Value::Array(vec![]));

    r.ok("pvesm", &["free", "local:100/vm-100-disk-0.raw"]);
    r.ok("pvesm", &["free", "local:100/vm-100-disk-7.raw"]);
    r.ok("pvesm", &["free", "local:100/subvol-100-disk-1.subvol"]);
    assert!(
        !r.join("/var/lib/vz/images/100").exists(),
        "empty vmid dir should be removed"
    );
    let err = r.fails("pvesm", &["free", "local:100/vm-100-disk-0.raw"]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
#[ignore = "needs root: writes below a scratch root and runs the binaries"]
fn a_configured_storage_cfg_is_used_and_local_added() {
    let r = TestRoot::new();
    let store = r.join("/srv/backups");
    r.write(
        "/etc/pve/storage.cfg",
        &format!(
            "dir: bk\n\tpath {}\n\tcontent backup\n\tprune-backups keep-last=2\n",
            store.display()
        ),
    );
    let out = json(&r.ok("pvesm", &["status", "--output-format", "json"]));
    let ids: Vec<&str> = out
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["storage"].as_str().unwrap())
        .collect();
    // PVE writes the default `local` storage first.
    assert_eq!(ids, ["local", "bk"]);
    assert!(store.join("dump").is_dir());
    // bk has no images content: allocation is refused and nothing is created.
    let before = r.snapshot_files();
    let err = r.fails("pct", &["set", "100", "--rootfs", "bk:1"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = r.fails("pvesm", &["alloc", "nosuch", "100", "", "1M"]);
    assert_eq!(err.trim(), "storage 'nosuch' does not exist");
    assert_eq!(r.snapshot_files(), before);
}

#[test]
#[ignore = "needs root: writes below a scratch root and runs the binaries"]
fn prune_backups_marks_and_removes_like_pve() {
    let r = TestRoot::new();
    let dump = r.join("/var/lib/vz/dump");
    std::fs::create_dir_all(&dump).unwrap();
    let names = [
        "vzdump-lxc-100-2024_01_01-10_00_00.tar.zst",
        "vzdump-lxc-100-2024_01_02-10_00_00.tar.zst",
        "vzdump-lxc-100-2024_01_03-10_00_00.tar.gz",
        "vzdump-lxc-100-2024_01_04-10_00_00.tar.lzo",
        "vzdump-lxc-101-2024_01_01-10_00_00.tar",
        "my-renamed-backup.tar.zst",
    ];
    for n in names {
        std::fs::write(dump.join(n), b"x").unwrap();
    }
    std::fs::write(dump.join("vzdump-lxc-100-2024_01_01-10_00_00.log"), b"log").unwrap();
    std::fs::write(
        dump.join("vzdump-lxc-100-2024_01_02-10_00_00.tar.zst.protected"),
        b"",
    )
    .unwrap();
    std::fs::write(
        dump.join("vzdump-lxc-100-2024_01_03-10_00_00.tar.gz.notes"),
        b"first line\nsecond",
    )
    .unwrap();

    let listed = json(&r.ok(
        "pvesm",
        &[
            "list",
            "local",
            "--content",
            "backup",
            "--vmid",
            "100",
            "--output-format",
            "json",
        ],
    ));
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0]["ctime"], 1_704_103_200);
    assert_eq!(listed[0]["subtype"], "lxc");
    assert_eq!(listed[1]["protected"], true);
    assert_eq!(listed[2]["notes"], "first line");
    assert_eq!(listed[2]["format"], "tar.gz");

    let marks = json(&r.ok(
        "pvesm",
        &[
            "prune-backups",
            "local",
            "--keep-last",
            "1",
            "--dry-run",
            "--output-format",
            "json",
        ],
    ));
    let mut got: Vec<(String, String)> = marks
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["volid"].as_str().unwrap().to_string(),
                e["mark"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let want = [
        ("local:backup/my-renamed-backup.tar.zst", "renamed"),
        (
            "local:backup/vzdump-lxc-100-2024_01_01-10_00_00.tar.zst",
            "remove",
        ),
        (
            "local:backup/vzdump-lxc-100-2024_01_02-10_00_00.tar.zst",
            "protected",
        ),
        (
            "local:backup/vzdump-lxc-100-2024_01_03-10_00_00.tar.gz",
            "remove",
        ),
        (
            "local:backup/vzdump-lxc-100-2024_01_04-10_00_00.tar.lzo",
            "keep",
        ),
        (
            "local:backup/vzdump-lxc-101-2024_01_01-10_00_00.tar",
            "keep",
        ),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
        .collect();
    assert_eq!(got, want);
    // The dry run removed nothing.
    assert_eq!(std::fs::read_dir(&dump).unwrap().count(), 9);

    let out = r.ok(
        "pvesm",
        &[
            "prune-backups",
            "local",
            "--keep-last",
            "1",
            "--vmid",
            "100",
        ],
    );
    assert!(
        out.contains("removing backup 'local:backup/vzdump-lxc-100-2024_01_01-10_00_00.tar.zst'"),
        "{out}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "my-renamed-backup.tar.zst",
            "vzdump-lxc-100-2024_01_02-10_00_00.tar.zst",
            "vzdump-lxc-100-2024_01_02-10_00_00.tar.zst.protected",
            "vzdump-lxc-100-2024_01_04-10_00_00.tar.lzo",
            "vzdump-lxc-101-2024_01_01-10_00_00.tar",
        ]
    );
    // A protected backup cannot be freed either.
    let err = r.fails(
        "pvesm",
        &[
            "free",
            "local:backup/vzdump-lxc-100-2024_01_02-10_00_00.tar.zst",
        ],
    );
    assert!(err.contains("cannot remove protected volume"), "{err}");
}
