//! Our writer and reader against GNU tar with PVE's flags.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use vzkit_archive::{
    ArchiveReader, ArchiveWriter, ExcludeSet, ExtractOptions, extract, extract_buffered,
    find_member,
};

use crate::common::{
    COMMON_TAR_FLAGS, Scratch, ShortBufReader, ShortReader, TmpfsMount, assert_trees_equal,
    build_fixture, run, run_with_input,
};

fn write_ours(src: &Path, excludes: &ExcludeSet) -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new());
    let stats = w.append_tree(src, "./", excludes, true).unwrap();
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    w.finish().unwrap()
}

fn gnu_tar_create(dir: &Path, extra: &[&str]) -> Vec<u8> {
    run(Command::new("tar")
        .args(["cpf", "-", "--totals"])
        .args(COMMON_TAR_FLAGS)
        .args(extra)
        .arg("-C")
        .arg(dir)
        .arg("./"))
}

fn gnu_tar_extract(archive: &[u8], dest: &Path) {
    run_with_input(
        Command::new("tar")
            .args(["xpf", "-", "--numeric-owner", "--acls", "--xattrs"])
            .args([
                "--xattrs-include=user.*",
                "--xattrs-include=security.capability",
                "--sparse",
            ])
            .arg("-C")
            .arg(dest),
        archive,
    );
}

fn gnu_tar_list(archive: &[u8]) -> BTreeSet<String> {
    let out = run_with_input(Command::new("tar").args(["tf", "-"]), archive);
    String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn ours_extracted_by_gnu_tar_equals_source() {
    let s = Scratch::new();
    let src = s.subdir("src");
    build_fixture(&src);
    let archive = write_ours(&src, &ExcludeSet::new());
    let dst = s.subdir("dst");
    gnu_tar_extract(&archive, &dst);
    assert_trees_equal(&src, &dst);
}

/// Extract `archive` below `dst` cleanly (no errors or warnings) into a copy of `src`:
/// read through short reads, or (`buffered`: file content written straight from the
/// stream's own pieces) from pieces that end anywhere in headers, content and padding.
fn assert_extracts_to(archive: &[u8], src: &Path, dst: &Path, buffered: bool) {
    let opts = ExtractOptions::default();
    let report = if buffered {
        extract_buffered(ShortBufReader::new(archive), dst, &opts)
    } else {
        extract(ShortReader::new(archive), dst, &opts)
    }
    .unwrap();
    assert!(
        report.errors.is_empty() && report.warnings.is_empty(),
        "buffered {buffered}: {report:?}"
    );
    assert_trees_equal(src, dst);
}

#[test]
fn gnu_tar_archive_extracted_by_us_equals_source() {
    let s = Scratch::new();
    let src = s.subdir("src");
    build_fixture(&src);
    let archive = gnu_tar_create(&src, &[]);
    assert_extracts_to(&archive, &src, &s.subdir("dst"), false);
    assert_extracts_to(&archive, &src, &s.subdir("dst-buffered"), true);
}

#[test]
fn content_not_taken_by_a_failed_write_is_skipped_with_the_member() {
    let s = Scratch::new();
    let src = s.subdir("src");
    std::fs::write(src.join("a"), vec![b'a'; 200_000]).unwrap();
    std::fs::write(src.join("b"), b"second member\n").unwrap();
    let archive = gnu_tar_create(&src, &["--sort=name"]);
    for buffered in [false, true] {
        let mut rd = if buffered {
            ArchiveReader::new_buffered(ShortBufReader::new(&archive))
        } else {
            ArchiveReader::new(ShortBufReader::new(&archive))
        };
        let mut names = Vec::new();
        let mut scratch = vec![0u8; 4096];
        while let Some(e) = rd.next_entry().unwrap() {
            names.push(e.name_lossy());
            if e.name_lossy() == "./a" {
                // Some content is taken, then a write fails.
                let n = rd.with_data(1000, &mut scratch, |b| {
                    assert!(b.iter().all(|&c| c == b'a'));
                    Ok(())
                });
                assert!(n.unwrap() > 0);
                let failed = rd.with_data(1000, &mut scratch, |_| {
                    Err(vzkit_archive::ArchiveError::Corrupt {
                        offset: 0,
                        message: "write failed".into(),
                    })
                });
                assert!(failed.is_err());
            }
            if e.name_lossy() == "./b" {
                let mut got = Vec::new();
                while rd
                    .with_data(usize::MAX, &mut scratch, |b| {
                        got.extend_from_slice(b);
                        Ok(())
                    })
                    .unwrap()
                    > 0
                {}
                assert_eq!(got, b"second member\n", "buffered: {buffered}");
            }
        }
        assert_eq!(names, ["./", "./a", "./b"], "buffered: {buffered}");
    }
}

#[test]
fn ours_round_trip_equals_source() {
    let s = Scratch::new();
    let src = s.subdir("src");
    build_fixture(&src);
    let archive = write_ours(&src, &ExcludeSet::new());
    assert_extracts_to(&archive, &src, &s.subdir("dst"), false);
    assert_extracts_to(&archive, &src, &s.subdir("dst-buffered"), true);
}

#[test]
fn gnu_format_archive_with_old_sparse_and_long_names() {
    let s = Scratch::new();
    let src = s.subdir("src");
    let long = src.join("l".repeat(150));
    std::fs::create_dir(&long).unwrap();
    std::fs::write(long.join("x".repeat(120)), b"long").unwrap();
    std::os::unix::fs::symlink("y".repeat(150), src.join("longlink")).unwrap();
    std::fs::hard_link(long.join("x".repeat(120)), src.join("hl")).unwrap();
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..10u64 {
        f.write_all_at(b"data", i * 1024 * 1024).unwrap();
    }
    f.set_len(12 * 1024 * 1024).unwrap();
    crate::common::whole_second_mtimes(&src);
    let archive = run(Command::new("tar")
        .args(["cpf", "-", "-H", "gnu", "--sparse", "--numeric-owner", "-C"])
        .arg(&src)
        .arg("./"));
    let dst = s.subdir("dst");
    extract(&archive[..], &dst, &ExtractOptions::default()).unwrap();
    assert_trees_equal(&src, &dst);
}

#[test]
fn member_names_and_excludes_match_gnu_tar() {
    let s = Scratch::new();
    let src = s.subdir("src");
    build_fixture(&src);
    let _mnt = TmpfsMount::new(&src.join("var/tmp"));
    std::fs::write(src.join("var/tmp/on-other-fs"), b"x").unwrap();
    std::fs::create_dir(src.join("lost+found")).unwrap();
    let patterns = ["/usr/bin/s?id", "hl-b", "/deep/*", "*.none", "/srv/acl/"];
    let (excludes, warnings) = ExcludeSet::from_vzdump_patterns(&patterns);
    assert_eq!(warnings.len(), 1);
    let mut ex = excludes.clone();
    ex.add_unanchored("lost+found");
    // vzdump's option order: --no-anchored [lost+found] unanchored…, --anchored ./anchored…
    let mut args: Vec<String> = vec!["--no-anchored".into(), "--exclude=lost+found".into()];
    args.extend(
        patterns
            .iter()
            .filter(|p| !p.starts_with('/'))
            .map(|p| format!("--exclude={p}")),
    );
    args.push("--anchored".into());
    args.extend(
        patterns
            .iter()
            .filter(|p| p.starts_with('/'))
            .map(|p| format!("--exclude=.{p}")),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gnu = gnu_tar_list(&gnu_tar_create(&src, &args));
    let ours = gnu_tar_list(&write_ours(&src, &ex));
    assert_eq!(ours, gnu);
    assert!(ours.contains("./var/tmp/") && !ours.contains("./var/tmp/on-other-fs"));
    assert!(!ours.contains("./etc/hl-b") && !ours.contains("./lost+found/"));
    assert!(
        ours.contains("./srv/acl/"),
        "trailing-slash pattern matches nothing"
    );
}

#[test]
fn pve_layout_config_first_and_find_member_reads_only_a_prefix() {
    let s = Scratch::new();
    let src = s.subdir("src");
    std::fs::write(src.join("big"), crate::common::noise(4 << 20, 9)).unwrap();
    let conf = b"arch: amd64\nhostname: ct100\nrootfs: local:100/vm-100-disk-0.raw,size=8G\n";
    let mut w = ArchiveWriter::new(Vec::new());
    w.append_data("./etc/vzdump/pct.conf", conf, 0o644, 1_700_000_000)
        .unwrap();
    w.append_data("./etc/vzdump/pct.fw", b"", 0o644, 1_700_000_000)
        .unwrap();
    w.append_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
    let archive = w.finish().unwrap();
    let listing = run_with_input(Command::new("tar").args(["tf", "-"]), &archive);
    let first: Vec<&str> = std::str::from_utf8(&listing)
        .unwrap()
        .lines()
        .take(3)
        .collect();
    assert_eq!(
        first,
        ["./etc/vzdump/pct.conf", "./etc/vzdump/pct.fw", "./"]
    );

    struct Counting<'a>(&'a [u8], usize);
    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (&self.0[self.1..]).read(buf)?;
            self.1 += n;
            Ok(n)
        }
    }
    let mut r = Counting(&archive, 0);
    let is_conf = |n: &[u8]| n == b"./etc/vzdump/pct.conf";
    let got = find_member(&mut r, is_conf, 1 << 20).unwrap();
    assert_eq!(got.as_deref(), Some(&conf[..]));
    assert!(r.1 < 256 * 1024, "read {} bytes of {}", r.1, archive.len());

    // The same from an archive GNU tar wrote the way vzdump calls it.
    let tmp = s.subdir("tmp");
    std::fs::create_dir_all(tmp.join("etc/vzdump")).unwrap();
    std::fs::write(tmp.join("etc/vzdump/pct.conf"), conf).unwrap();
    std::fs::write(tmp.join("etc/vzdump/pct.fw"), b"").unwrap();
    let gnu = run(Command::new("tar")
        .args(["cpf", "-", "--totals"])
        .args(COMMON_TAR_FLAGS)
        .arg(format!("--directory={}", tmp.display()))
        .args(["./etc/vzdump/pct.conf", "./etc/vzdump/pct.fw"])
        .arg(format!("--directory={}", src.display()))
        .arg("./"));
    assert_eq!(
        find_member(&gnu[..], is_conf, 1 << 20).unwrap().as_deref(),
        Some(&conf[..])
    );
    assert_eq!(
        find_member(&gnu[..], |n| n == b"./nope", 1 << 20).unwrap(),
        None
    );
}

#[test]
fn pve_restore_options_skip_dev_and_existing_files() {
    let s = Scratch::new();
    let src = s.subdir("src");
    std::fs::create_dir_all(src.join("dev/pts")).unwrap();
    std::fs::write(src.join("dev/pts/x"), b"x").unwrap();
    std::fs::write(src.join("keep"), b"from archive").unwrap();
    std::fs::write(src.join("new"), b"new").unwrap();
    let archive = write_ours(&src, &ExcludeSet::new());
    let dst = s.subdir("dst");
    std::fs::write(dst.join("keep"), b"existing").unwrap();
    let report = extract(
        &archive[..],
        &dst,
        &ExtractOptions::pve_restore(None, false),
    )
    .unwrap();
    assert_eq!(std::fs::read(dst.join("keep")).unwrap(), b"existing");
    assert_eq!(std::fs::read(dst.join("new")).unwrap(), b"new");
    assert!(dst.join("dev").is_dir() && !dst.join("dev/pts").exists());
    assert_eq!((report.excluded, report.skipped_existing), (2, 1));
}
