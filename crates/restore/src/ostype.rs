//! OS type detection from the files of a container's root (PVE's `PVE::LXC::Setup`), used by
//! `pct create` when `--ostype` is not given.
//!
//! | ostype | test |
//! |---|---|
//! | ubuntu | `/etc/lsb-release` has `DISTRIB_ID=Ubuntu` |
//! | devuan | `/etc/devuan_version` |
//! | debian | `/etc/debian_version` |
//! | opensuse | `/etc/SuSE-brand` or `/etc/SuSE-release` |
//! | fedora | `/etc/fedora-release` |
//! | centos | `/etc/centos-release` or `/etc/redhat-release` |
//! | archlinux | `/etc/arch-release` |
//! | alpine | `/etc/alpine-release` |
//! | gentoo | `/etc/gentoo-release` |
//!
//! The root is untrusted: `/etc` and the files are looked up without following symbolic
//! links (only regular files count), so a template cannot make vzkit read host files.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{RestoreError, Result};

/// Tests in PVE's order: (ostype, files, whose existence decides).
const TESTS: &[(&str, &[&str])] = &[
    ("devuan", &["devuan_version"]),
    ("debian", &["debian_version"]),
    ("opensuse", &["SuSE-brand", "SuSE-release"]),
    ("fedora", &["fedora-release"]),
    ("centos", &["centos-release", "redhat-release"]),
    ("archlinux", &["arch-release"]),
    ("alpine", &["alpine-release"]),
    ("gentoo", &["gentoo-release"]),
];

fn open_etc(root: &Path) -> Option<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root = rustix::fs::open(root, flags, Mode::empty()).ok()?;
    rustix::fs::openat(&root, "etc", flags, Mode::empty()).ok()
}

fn is_regular(etc: &OwnedFd, name: &str) -> bool {
    rustix::fs::statat(etc, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
}

fn read_small(etc: &OwnedFd, name: &str) -> Option<String> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = rustix::fs::openat(etc, name, flags, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Detects the OS type of the tree at `root`; `None` when nothing matches.
#[must_use]
pub fn detect_ostype(root: &Path) -> Option<&'static str> {
    let etc = open_etc(root)?;
    if let Some(lsb) = read_small(&etc, "lsb-release")
        && lsb.lines().any(|l| l.trim_end() == "DISTRIB_ID=Ubuntu")
    {
        return Some("ubuntu");
    }
    TESTS
        .iter()
        .find(|(_, files)| files.iter().any(|f| is_regular(&etc, f)))
        .map(|(t, _)| *t)
}

/// [`detect_ostype`], failing as PVE does.
///
/// # Errors
/// "unable to detect OS distribution".
pub fn require_ostype(root: &Path) -> Result<&'static str> {
    detect_ostype(root)
        .ok_or_else(|| RestoreError::Failed("unable to detect OS distribution".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join("etc").join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn detection_table() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (
                &[
                    ("lsb-release", "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=24.04\n"),
                    ("debian_version", "trixie/sid\n"),
                ],
                Some("ubuntu"),
            ),
            (
                &[
                    ("lsb-release", "DISTRIB_ID=Mint\n"),
                    ("debian_version", "12\n"),
                ],
                Some("debian"),
            ),
            (&[("debian_version", "12.5\n")], Some("debian")),
            (
                &[("devuan_version", "5\n"), ("debian_version", "12\n")],
                Some("devuan"),
            ),
            (&[("fedora-release", "Fedora 40\n")], Some("fedora")),
            (&[("redhat-release", "Rocky 9\n")], Some("centos")),
            (&[("arch-release", "")], Some("archlinux")),
            (&[("alpine-release", "3.20.0\n")], Some("alpine")),
            (&[("gentoo-release", "Gentoo\n")], Some("gentoo")),
            (&[("os-release", "ID=unknown\n")], None),
        ];
        for (files, want) in cases {
            let d = tree(files);
            assert_eq!(detect_ostype(d.path()), *want, "{files:?}");
        }
    }

    #[test]
    fn symlinks_are_not_followed() {
        let d = tree(&[]);
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("etc/debian_version")).unwrap();
        assert_eq!(detect_ostype(d.path()), None);
        let d2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", d2.path().join("etc")).unwrap();
        assert_eq!(detect_ostype(d2.path()), None);
        assert_eq!(
            require_ostype(d2.path()).unwrap_err().to_string(),
            "unable to detect OS distribution"
        );
    }
}
