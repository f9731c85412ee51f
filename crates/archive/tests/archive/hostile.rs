//! Hostile archives, built byte by byte: nothing outside the target root
//! may change, and errors must say what is wrong.

use std::path::Path;

use vzkit_archive::{ArchiveError, ExtractOptions, extract, extract_buffered};

use crate::common::{Scratch, ShortBufReader, snapshot};

/// A ustar header block, built here independently of the crate's encoder.
fn header(name: &[u8], typeflag: u8, size: usize, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn file(mut self, name: &str, data: &[u8]) -> Self {
        self.0
            .extend_from_slice(&header(name.as_bytes(), b'0', data.len(), b""));
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }
    fn dir(mut self, name: &str) -> Self {
        self.0
            .extend_from_slice(&header(name.as_bytes(), b'5', 0, b""));
        self
    }
    fn symlink(mut self, name: &str, target: &str) -> Self {
        self.0
            .extend_from_slice(&header(name.as_bytes(), b'2', 0, target.as_bytes()));
        self
    }
    fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.0
            .extend_from_slice(&header(name.as_bytes(), b'1', 0, target.as_bytes()));
        self
    }
    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// Scratch with `root/` (target) and `outside/secret` beside it.
struct Setup {
    s: Scratch,
}

impl Setup {
    fn new() -> Setup {
        let s = Scratch::new();
        s.subdir("root");
        s.subdir("outside");
        std::fs::write(s.path().join("outside/secret"), b"orig").unwrap();
        Setup { s }
    }
    fn root(&self) -> std::path::PathBuf {
        self.s.path().join("root")
    }
    fn outside(&self) -> std::path::PathBuf {
        self.s.path().join("outside")
    }
    fn outside_str(&self) -> String {
        self.outside().display().to_string()
    }
}

fn overwrite() -> ExtractOptions {
    ExtractOptions::default()
}

fn check(archive: &[u8], opts: &ExtractOptions, setup: &Setup) -> Result<(), ArchiveError> {
    guarded(setup, || extract(archive, &setup.root(), opts).map(|_| ()))
}

/// [`check`] from a buffered stream of short pieces (content written in place).
fn check_buffered(
    archive: &[u8],
    opts: &ExtractOptions,
    setup: &Setup,
) -> Result<(), ArchiveError> {
    guarded(setup, || {
        extract_buffered(ShortBufReader::new(archive), &setup.root(), opts).map(|_| ())
    })
}

/// Run an extraction; nothing outside the root may have changed.
fn guarded(
    setup: &Setup,
    f: impl FnOnce() -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let before = snapshot(&setup.outside());
    let res = f();
    assert_eq!(
        snapshot(&setup.outside()),
        before,
        "outside of the root changed"
    );
    assert!(!Path::new("/evil").exists() && !Path::new("/tmp/evil").exists());
    res
}

fn expect_unsafe(res: Result<(), ArchiveError>, needle: &str) {
    match res {
        Err(e @ ArchiveError::UnsafePath { .. }) => {
            assert!(
                e.to_string().contains(needle),
                "message '{e}' lacks '{needle}'"
            )
        }
        other => panic!("expected UnsafePath, got {other:?}"),
    }
}

#[test]
fn dotdot_and_absolute_names_are_refused() {
    let st = Setup::new();
    let a = Tar::default().file("../outside/evil", b"x").end();
    expect_unsafe(check(&a, &overwrite(), &st), "'..'");
    let a = Tar::default().file("./a/../../outside/evil", b"x").end();
    expect_unsafe(check(&a, &overwrite(), &st), "'..'");
    let abs = format!("{}/evil", st.outside_str());
    let a = Tar::default().file(&abs, b"x").end();
    expect_unsafe(check(&a, &overwrite(), &st), "absolute");
}

#[test]
fn file_through_symlink_is_refused() {
    let st = Setup::new();
    let a = Tar::default()
        .symlink("./l", &st.outside_str())
        .file("./l/evil", b"x")
        .end();
    expect_unsafe(check(&a, &overwrite(), &st), "symbolic link");
    // A symlink already present in the target is not followed either.
    let st = Setup::new();
    std::os::unix::fs::symlink(st.outside(), st.root().join("pre")).unwrap();
    let a = Tar::default().file("./pre/secret", b"pwned").end();
    expect_unsafe(check(&a, &overwrite(), &st), "symbolic link");
}

#[test]
fn hardlinks_outside_the_root_are_refused() {
    let st = Setup::new();
    let a = Tar::default().hardlink("./h", "../outside/secret").end();
    expect_unsafe(check(&a, &overwrite(), &st), "hard link target");
    let abs = format!("{}/secret", st.outside_str());
    let a = Tar::default().hardlink("./h", &abs).end();
    expect_unsafe(check(&a, &overwrite(), &st), "hard link target");
    let a = Tar::default()
        .symlink("./l", &st.outside_str())
        .hardlink("./h", "./l/secret")
        .end();
    expect_unsafe(check(&a, &overwrite(), &st), "symbolic link");
}

#[test]
fn data_is_never_written_through_existing_links() {
    let st = Setup::new();
    let secret = format!("{}/secret", st.outside_str());
    // symlink then a file of the same name: the symlink is replaced.
    let a = Tar::default()
        .symlink("./s", &secret)
        .file("./s", b"pwned")
        .end();
    check(&a, &overwrite(), &st).unwrap();
    assert_eq!(std::fs::read(st.root().join("s")).unwrap(), b"pwned");
    // hard link to a file inside, then new content for the link name: the
    // link is broken, the first name keeps its content.
    let a = Tar::default()
        .file("./f", b"one")
        .hardlink("./g", "./f")
        .file("./g", b"two")
        .end();
    check(&a, &overwrite(), &st).unwrap();
    assert_eq!(std::fs::read(st.root().join("f")).unwrap(), b"one");
    assert_eq!(std::fs::read(st.root().join("g")).unwrap(), b"two");
}

#[test]
fn symlink_replacing_a_directory_mid_archive() {
    let st = Setup::new();
    let a = Tar::default()
        .dir("./d/")
        .file("./d/f", b"x")
        .symlink("./d", &st.outside_str())
        .file("./d/g", b"y")
        .end();
    // Overwrite mode refuses to replace the directory…
    match check(&a, &overwrite(), &st) {
        Err(ArchiveError::Unsupported { message, .. }) => assert!(message.contains("directory")),
        other => panic!("expected refusal, got {other:?}"),
    }
    // …and with ignore_unpack_errors the rest lands inside the root.
    let st = Setup::new();
    let opts = ExtractOptions {
        ignore_unpack_errors: true,
        ..overwrite()
    };
    let report = extract(&a[..], &st.root(), &opts).unwrap();
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(std::fs::read(st.root().join("d/g")).unwrap(), b"y");
    assert!(!st.outside().join("g").exists());
    // A symlink first, then a directory and a file of that name.
    let st = Setup::new();
    let a = Tar::default()
        .symlink("./x", &st.outside_str())
        .dir("./x/")
        .file("./x/secret", b"pwned")
        .end();
    check(&a, &overwrite(), &st).unwrap();
    assert!(st.root().join("x").is_dir());
    assert_eq!(std::fs::read(st.root().join("x/secret")).unwrap(), b"pwned");
    // With skip_old_files, the symlink stays and the file is refused.
    let st = Setup::new();
    let skip = ExtractOptions {
        skip_old_files: true,
        ..overwrite()
    };
    expect_unsafe(check(&a, &skip, &st), "symbolic link");
}

#[test]
fn truncated_and_corrupt_streams_fail_cleanly() {
    let good = Tar::default()
        .file("./a", &[7u8; 3000])
        .file("./b", b"bb")
        .end();
    // Read plainly, and from a buffered stream whose content is written in place.
    for buffered in [false, true] {
        let st = Setup::new();
        let run = |a: &[u8]| {
            if buffered {
                check_buffered(a, &overwrite(), &st)
            } else {
                check(a, &overwrite(), &st)
            }
        };
        for cut in [0, 100, 512, 1000, 3584, 4096, good.len() - 1024] {
            match run(&good[..cut]) {
                Err(ArchiveError::Truncated { .. }) => {}
                other => {
                    panic!("buffered {buffered}, cut at {cut}: expected Truncated, got {other:?}")
                }
            }
        }
        let mut bad = good.clone();
        bad[10] ^= 1; // name byte; checksum no longer matches
        match run(&bad) {
            Err(e @ ArchiveError::Corrupt { .. }) => {
                assert!(e.to_string().contains("checksum"), "{e}")
            }
            other => panic!("buffered {buffered}: expected Corrupt, got {other:?}"),
        }
        let mut garbage = crate::common::noise(4096, 77);
        garbage.extend_from_slice(&[0u8; 1024]);
        assert!(matches!(run(&garbage), Err(ArchiveError::Corrupt { .. })));
    }
}

#[test]
fn ignore_unpack_errors_reports_and_continues() {
    let st = Setup::new();
    let a = Tar::default()
        .file("../outside/evil", b"x")
        .file("./fine", b"ok")
        .end();
    let opts = ExtractOptions {
        ignore_unpack_errors: true,
        ..overwrite()
    };
    let before = snapshot(&st.outside());
    let report = extract(&a[..], &st.root(), &opts).unwrap();
    assert_eq!(snapshot(&st.outside()), before);
    assert_eq!(report.errors.len(), 1);
    assert!(
        report.errors[0].contains("../outside/evil"),
        "{:?}",
        report.errors
    );
    assert_eq!(std::fs::read(st.root().join("fine")).unwrap(), b"ok");
}
