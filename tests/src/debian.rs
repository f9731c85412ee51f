//! A Debian 12 container template with systemd, built once with `debootstrap` and cached.
//!
//! [`template`] returns a `debian-12-…_amd64.tar.zst` made the way PVE's appliance templates
//! are (a root filesystem tarred with numeric owners): `debootstrap --variant=minbase` of
//! bookworm plus `systemd-sysv` (PID 1), `ifupdown` (so the network configuration vzkit
//! writes is brought up at boot) and `iproute2`/`procps`. The first call downloads about
//! 60 MB from the Debian mirror (`$VZKIT_DEBIAN_MIRROR`, default `http://deb.debian.org/debian`)
//! and takes a minute; later calls, also from other test processes, reuse the cached file in
//! `<cargo target dir>/vzkit-cache/` (an exclusive flock serialises the build; the tarball
//! is written to a temporary name and renamed, so a killed build leaves no half template).

use std::fs::OpenOptions;
use std::path::PathBuf;

use crate::lxc::{must, sh};

/// The template's file name (PVE's `<os>-<version>-<name>_<release>_<arch>.tar.zst` form).
pub const TEMPLATE_NAME: &str = "debian-12-vzkit-systemd_12.0-1_amd64.tar.zst";

/// Packages added to `minbase`.
const INCLUDE: &str = "systemd-sysv,ifupdown,iproute2,procps";

fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary> -> target/vzkit-cache
    exe.ancestors()
        .nth(3)
        .expect("cargo target directory")
        .join("vzkit-cache")
}

/// The cached template, built first if missing.
///
/// # Panics
/// When `debootstrap` fails (no network to the mirror, no space).
#[must_use]
pub fn template() -> PathBuf {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).expect("create the template cache");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".debian.lock"))
        .expect("open the template lock");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .expect("lock the template cache");
    let out = dir.join(TEMPLATE_NAME);
    if out.exists() {
        return out;
    }
    let tree = dir.join("debian-12.build");
    let tmp = dir.join(format!("{TEMPLATE_NAME}.tmp"));
    let _ = std::fs::remove_dir_all(&tree);
    let mirror = std::env::var("VZKIT_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let bootstrap = sh(&format!(
        "debootstrap --variant=minbase --include={INCLUDE} bookworm '{}' '{mirror}'",
        tree.display()
    ));
    if !bootstrap.status.success() {
        let _ = std::fs::remove_dir_all(&tree);
        panic!(
            "debootstrap of Debian 12 from {mirror} failed: {}{}",
            String::from_utf8_lossy(&bootstrap.stdout),
            String::from_utf8_lossy(&bootstrap.stderr)
        );
    }
    must(&format!(
        "chroot '{t}' apt-get clean && rm -rf '{t}'/var/lib/apt/lists/* && \
         tar -C '{t}' --numeric-owner --xattrs --acls -cf - . | zstd -q -T0 -o '{o}' && \
         mv '{o}' '{f}'",
        t = tree.display(),
        o = tmp.display(),
        f = out.display()
    ));
    let _ = std::fs::remove_dir_all(&tree);
    out
}
