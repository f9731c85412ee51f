//! Id shifting (unprivileged containers) with owners, ACLs and capabilities.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use vzkit_archive::{ArchiveError, ArchiveWriter, ExcludeSet, ExtractOptions, IdMap, extract};

use crate::common::{CAP_V2_NET_BIND, COMMON_TAR_FLAGS, Scratch, assert_trees_equal, run};

/// A container-side tree: root-owned, a user 1000 file with ACLs, a cap.
fn container_tree(s: &Scratch) -> std::path::PathBuf {
    let src = s.subdir("ct");
    std::fs::create_dir(src.join("home")).unwrap();
    std::fs::write(src.join("home/user-file"), b"u").unwrap();
    std::os::unix::fs::lchown(src.join("home/user-file"), Some(1000), Some(1000)).unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:1001:rw,g:33:r"])
        .arg(src.join("home/user-file")));
    run(Command::new("setfacl")
        .args(["-d", "-m", "u:1001:rwx"])
        .arg(src.join("home")));
    std::fs::write(src.join("ping"), b"elf").unwrap();
    let hex: String = CAP_V2_NET_BIND.iter().map(|b| format!("{b:02x}")).collect();
    run(Command::new("setfattr")
        .args(["-n", "security.capability", "-v", &format!("0x{hex}")])
        .arg(src.join("ping")));
    src
}

fn getfacl(p: &std::path::Path) -> String {
    String::from_utf8(run(Command::new("getfacl")
        .args(["-n", "-p", "--omit-header"])
        .arg(p)))
    .unwrap()
}

fn cap_hex(p: &std::path::Path) -> String {
    let out = String::from_utf8(run(Command::new("getfattr")
        .args(["--absolute-names", "-n", "security.capability", "-e", "hex"])
        .arg(p)))
    .unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("security.capability="))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn restore_with_default_unprivileged_map_and_back() {
    let s = Scratch::new();
    let ct = container_tree(&s);
    let archive = run(Command::new("tar")
        .args(["cpf", "-"])
        .args(COMMON_TAR_FLAGS)
        .arg("-C")
        .arg(&ct)
        .arg("./"));
    let host = s.subdir("host");
    let map = IdMap::pve_default_unprivileged();
    // Not skip_old_files: the existing target root gets the archived metadata too.
    let opts = ExtractOptions {
        skip_old_files: false,
        ..ExtractOptions::pve_restore(Some(map.clone()), false)
    };
    let report = extract(&archive[..], &host, &opts).unwrap();
    assert!(
        report.warnings.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );

    let md = std::fs::metadata(host.join("home/user-file")).unwrap();
    assert_eq!((md.uid(), md.gid()), (101_000, 101_000));
    assert_eq!(std::fs::metadata(host.join("home")).unwrap().uid(), 100_000);
    let acl = getfacl(&host.join("home/user-file"));
    assert!(
        acl.contains("user:101001:rw-") && acl.contains("group:100033:r--"),
        "{acl}"
    );
    assert!(getfacl(&host.join("home")).contains("default:user:101001:rwx"));
    // v2 cap becomes v3 with the namespace root 100000 (0x000186a0 LE).
    let cap = cap_hex(&host.join("ping"));
    assert!(
        cap.starts_with("0x01000003") && cap.ends_with("a0860100"),
        "{cap}"
    );

    // Archiving the host tree with the map gives back the container view.
    let mut w = ArchiveWriter::with_id_map(Vec::new(), map);
    let stats = w
        .append_tree(&host, "./", &ExcludeSet::new(), true)
        .unwrap();
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    let ours = w.finish().unwrap();
    let back = s.subdir("back");
    crate::common::run_with_input(
        Command::new("tar")
            .args(["xpf", "-", "--numeric-owner", "--acls", "--xattrs"])
            .args([
                "--xattrs-include=user.*",
                "--xattrs-include=security.capability",
            ])
            .arg("-C")
            .arg(&back),
        &ours,
    );
    assert_trees_equal(&ct, &back);
}

#[test]
fn unmapped_owner_is_an_error_unless_ignored() {
    let s = Scratch::new();
    let ct = s.subdir("ct");
    std::fs::write(ct.join("far"), b"x").unwrap();
    std::os::unix::fs::lchown(ct.join("far"), Some(70_000), Some(0)).unwrap();
    std::fs::write(ct.join("acl-far"), b"x").unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:70000:r"])
        .arg(ct.join("acl-far")));
    let archive = run(Command::new("tar")
        .args(["cpf", "-"])
        .args(COMMON_TAR_FLAGS)
        .arg("-C")
        .arg(&ct)
        .arg("./"));
    let map = IdMap::pve_default_unprivileged();

    let host = s.subdir("host");
    match extract(
        &archive[..],
        &host,
        &ExtractOptions::pve_restore(Some(map.clone()), false),
    ) {
        Err(ArchiveError::UnmappedId {
            kind: "uid",
            id: 70_000,
            ..
        }) => {}
        other => panic!("expected UnmappedId, got {other:?}"),
    }
    let host2 = s.subdir("host2");
    let report = extract(
        &archive[..],
        &host2,
        &ExtractOptions::pve_restore(Some(map), true),
    )
    .unwrap();
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(report.errors[0].contains("70000"));
    // The ACL with an unmapped qualifier is skipped with a warning (tar only warns).
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(host2.join("acl-far").exists());
}
