//! The `rbd` backend (PVE's `RBDPlugin`): Ceph RBD images `vm-<vmid>-disk-N` in pool `pool`
//! (default `rbd`), optionally in a RADOS `namespace` and with a separate `data-pool`.
//!
//! Every volume is `raw`; containers format it with ext4 and mount it. Snapshots are RBD
//! snapshots; templates are renamed to `base-…` and get a protected snapshot `__base__`;
//! linked clones are RBD clones of a protected snapshot, named `<base>/<clone>` as in PVE.
//! All cluster access goes through the `rbd` command with PVE's option prefix
//! (`rbd -p <pool> [--namespace ns] [-c conf] [-m monhost] [--auth_supported x]
//! -n client.<user> [--keyring f] <op> …`), plus a bounded monitor connect and command
//! time, so that an unreachable cluster gives an error instead of a hang.
//!
//! # Where the connection settings come from
//!
//! As in PVE, a storage with `monhost` is an external cluster: its ceph.conf is
//! `/etc/pve/priv/ceph/<storeid>.conf` and its keyring `/etc/pve/priv/ceph/<storeid>.keyring`
//! (both below the vzkit root, both optional; with a keyring the client authenticates with
//! cephx, without one with `auth_supported none`). A storage without `monhost` uses
//! `/etc/pve/ceph.conf` when that exists and otherwise librados' default
//! (`/etc/ceph/ceph.conf`). The `username` defaults to `admin`.
//!
//! # Mapping an image for a container
//!
//! With kernel RBD support (`/sys/bus/rbd` exists) volumes are mapped with `rbd map` and
//! reached as block devices, as PVE does for containers. Without it, `activate_volume` starts
//! one `qemu-storage-daemon` per image (or snapshot, read-only) that exports the image as a
//! regular file through FUSE; the mount layer loop-attaches that file. Its pid file, the
//! export file and the cephx key file live in `/run/vzkit/rbd/<storeid>/` below the vzkit
//! root; `deactivate_volume` waits until no loop device uses the file any more, then stops
//! the daemon by its pid and removes them.
//!
//! Unit tests pin the argument vectors; the integration tests run every operation against a
//! real single-node Ceph cluster on 127.0.0.1 (`tests/integration/rbd.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use vzkit_host::command::{Cmd, CommandError, Runner};
use vzkit_host::paths::Layout;

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::{
    Feature, FeatureTable, StoragePlugin, StorageStatus, VolumeAccess, VolumeInfo, VolumeState,
};
use crate::volid::{self, ParsedVolname};

/// The `rbd` command.
pub const RBD: &str = "/usr/bin/rbd";
/// The `ceph` command (pool usage).
pub const CEPH: &str = "/usr/bin/ceph";
/// The userspace exporter used when the kernel has no RBD support.
pub const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";
/// The snapshot a template's linked clones are made from.
pub const BASE_SNAP: &str = "__base__";
/// Seconds a client waits for the monitors (connect and each monitor request).
pub const CONNECT_TIMEOUT_SECS: u64 = 10;
/// Upper bound for one `rbd`/`ceph` command, after which it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// The directory, below the vzkit root, of the userspace exports' state.
pub const RUN_DIR: &str = "/run/vzkit/rbd";

/// PVE's `volume_has_feature` table for RBD (§4.6).
const RBD_FEATURES: FeatureTable = FeatureTable(&[
    (Feature::Snapshot, VolumeState::Current, None),
    (Feature::Snapshot, VolumeState::Snap, None),
    (Feature::Clone, VolumeState::Base, None),
    (Feature::Clone, VolumeState::Snap, None),
    (Feature::Template, VolumeState::Current, None),
    (Feature::Copy, VolumeState::Base, None),
    (Feature::Copy, VolumeState::Current, None),
    (Feature::Copy, VolumeState::Snap, None),
    (Feature::SparseInit, VolumeState::Base, None),
    (Feature::SparseInit, VolumeState::Current, None),
    (Feature::Rename, VolumeState::Current, None),
]);

/// How images are made reachable on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapMode {
    /// Kernel RBD (`rbd map`), a block device.
    Kernel,
    /// A `qemu-storage-daemon` FUSE export, a regular file for a loop device.
    Userspace,
}

impl MapMode {
    /// Kernel mapping when the kernel has RBD support (`/sys/bus/rbd`), else userspace.
    #[must_use]
    pub fn detect() -> Self {
        if Path::new("/sys/bus/rbd").exists() {
            MapMode::Kernel
        } else {
            MapMode::Userspace
        }
    }
}

/// One entry of `rbd ls -l --format json` (images and, separately, their snapshots).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdListEntry {
    /// Image name.
    pub image: String,
    /// Size in bytes.
    pub size: u64,
    /// Image format (1 or 2).
    #[serde(default)]
    pub format: Option<u32>,
    /// Set on snapshot entries.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// The parent of a clone.
    #[serde(default)]
    pub parent: Option<RbdParent>,
}

/// The parent of a cloned image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdParent {
    /// Parent image.
    pub image: String,
    /// Parent snapshot.
    pub snapshot: String,
}

/// One entry of `rbd snap ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RbdSnap {
    /// Snapshot id (increasing with age).
    pub id: u64,
    /// Snapshot name.
    pub name: String,
    /// `"true"` or `"false"` (a string in rbd's JSON).
    #[serde(default)]
    pub protected: Option<String>,
}

impl RbdSnap {
    /// Whether the snapshot is protected.
    #[must_use]
    pub fn is_protected(&self) -> bool {
        self.protected.as_deref() == Some("true")
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| StorageError::Failed(format!("unable to parse {what} output: {e}")))
}

/// Parses `rbd ls -l --format json` (an empty pool prints nothing or `[]`).
///
/// # Errors
/// Output that is not the expected JSON.
pub fn parse_ls(text: &str) -> Result<Vec<RbdListEntry>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    parse_json("rbd ls", text)
}

/// Parses `rbd snap ls --format json`.
///
/// # Errors
/// Output that is not the expected JSON.
pub fn parse_snap_ls(text: &str) -> Result<Vec<RbdSnap>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    parse_json("rbd snap ls", text)
}

/// The pool usage from `ceph df --format json`: `(max_avail, used)` of `pool`, `None` when
/// the cluster reports no statistics for it (no ceph-mgr running).
///
/// # Errors
/// Output that is not JSON.
pub fn parse_ceph_df(text: &str, pool: &str) -> Result<Option<(u64, u64)>> {
    let v: serde_json::Value = parse_json("ceph df", text)?;
    let Some(p) = v["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
    else {
        return Ok(None);
    };
    let st = &p["stats"];
    let avail = st["max_avail"].as_u64().unwrap_or(0);
    let used = st["stored"]
        .as_u64()
        .or_else(|| st["bytes_used"].as_u64())
        .unwrap_or(0);
    Ok(Some((avail, used)))
}

/// PVE's monitor list: entries separated by `,`, `;` or spaces, joined with `,`.
#[must_use]
pub fn monhost_list(monhost: &str) -> Vec<String> {
    monhost
        .split([',', ';', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A monitor address as host and port for qemu's rbd driver: `v2:`/`v1:` prefixes and the
/// `/nonce` suffix dropped, brackets removed from IPv6 addresses, port 6789 by default.
#[must_use]
pub fn mon_host_port(addr: &str) -> (String, u16) {
    let a = addr
        .strip_prefix("v2:")
        .or_else(|| addr.strip_prefix("v1:"))
        .unwrap_or(addr);
    let a = a.split('/').next().unwrap_or(a);
    if let Some(rest) = a.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').unwrap_or((rest, ""));
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(6789);
        return (host.to_string(), port);
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().unwrap_or(6789)),
        _ => (a.to_string(), 6789),
    }
}

/// The cephx key of `client.<user>` (or the first key) in a keyring file's text.
#[must_use]
pub fn keyring_key(text: &str, user: &str) -> Option<String> {
    let want = format!("[client.{user}]");
    let mut section = String::new();
    let mut first = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == "key"
        {
            let v = v.trim().to_string();
            if section == want {
                return Some(v);
            }
            first.get_or_insert(v);
        }
    }
    first
}

/// Escapes a value for qemu's `key=value,…` option syntax (a comma is doubled).
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// An `rbd` storage.
#[derive(Debug)]
pub struct RbdPlugin {
    section: StorageSection,
    runner: Arc<dyn Runner>,
    layout: Layout,
    pool: String,
    mode: MapMode,
}

impl RbdPlugin {
    /// An rbd plugin for `section`, with paths below `layout`, choosing the mapping from the
    /// running kernel.
    ///
    /// # Errors
    /// None today; the signature matches the other backends.
    pub fn new(section: StorageSection, runner: Arc<dyn Runner>, layout: Layout) -> Result<Self> {
        Ok(Self::with_mode(section, runner, layout, MapMode::detect()))
    }

    /// As [`RbdPlugin::new`] with a fixed mapping mode.
    #[must_use]
    pub fn with_mode(
        section: StorageSection,
        runner: Arc<dyn Runner>,
        layout: Layout,
        mode: MapMode,
    ) -> Self {
        let pool = section.get("pool").unwrap_or("rbd").to_string();
        Self {
            section,
            runner,
            layout,
            pool,
            mode,
        }
    }

    /// The mapping mode in use.
    #[must_use]
    pub fn map_mode(&self) -> MapMode {
        self.mode
    }

    fn volid(&self, volname: &str) -> String {
        format!("{}:{volname}", self.section.id())
    }

    fn namespace(&self) -> Option<&str> {
        self.section.get("namespace").filter(|n| !n.is_empty())
    }

    fn external(&self) -> bool {
        self.section.get("monhost").is_some()
    }

    fn user(&self) -> &str {
        self.section
            .get("username")
            .filter(|u| !u.is_empty())
            .unwrap_or("admin")
    }

    /// The ceph.conf the clients read, if any (see the module docs).
    #[must_use]
    pub fn ceph_conf(&self) -> Option<PathBuf> {
        let p = if self.external() {
            self.layout
                .join(&format!("/etc/pve/priv/ceph/{}.conf", self.id()))
        } else {
            self.layout.join("/etc/pve/ceph.conf")
        };
        p.exists().then_some(p)
    }

    /// The keyring of an external cluster, if there is one.
    #[must_use]
    pub fn keyring(&self) -> Option<PathBuf> {
        let p = self
            .layout
            .join(&format!("/etc/pve/priv/ceph/{}.keyring", self.id()));
        p.exists().then_some(p)
    }

    fn auth_supported(&self) -> Option<&'static str> {
        self.external().then(|| {
            if self.keyring().is_some() {
                "cephx"
            } else {
                "none"
            }
        })
    }

    fn mon_hosts(&self) -> Vec<String> {
        self.section
            .get("monhost")
            .map(monhost_list)
            .unwrap_or_default()
    }

    /// The connection options shared by `rbd` and `ceph`.
    fn connect_args(&self, cmd: Cmd) -> Cmd {
        let mut cmd = cmd;
        match self.ceph_conf() {
            Some(c) => cmd = cmd.arg("-c").arg(c),
            // An external cluster without its own ceph.conf: not the host's default one
            // (which describes some other cluster, or does not exist).
            None if self.external() => cmd = cmd.args(["-c", "/dev/null"]),
            None => {}
        }
        let mons = self.mon_hosts();
        if !mons.is_empty() {
            cmd = cmd.arg("-m").arg(mons.join(","));
        }
        if let Some(a) = self.auth_supported() {
            cmd = cmd.args(["--auth_supported", a]);
        }
        cmd = cmd.arg("-n").arg(format!("client.{}", self.user()));
        if let Some(k) = self.keyring() {
            cmd = cmd.arg("--keyring").arg(k);
        }
        cmd
    }

    /// PVE's `rbd_cmd`: the prefix, the timeouts, `op` and its arguments.
    fn rbd_cmd<I, S>(&self, op: &str, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Cmd::new(RBD).args(["-p", &self.pool]);
        if let Some(ns) = self.namespace()
            && op != "unmap"
        {
            cmd = cmd.args(["--namespace", ns]);
        }
        let secs = CONNECT_TIMEOUT_SECS.to_string();
        self.connect_args(cmd)
            .args([
                "--client_mount_timeout",
                &secs,
                "--rados_mon_op_timeout",
                &secs,
            ])
            .arg(op)
            .args(args)
            .timeout(COMMAND_TIMEOUT)
    }

    async fn rbd(&self, op: &str, args: &[&str], errmsg: &str) -> Result<String> {
        let cmd = self.rbd_cmd(op, args);
        self.runner
            .run_stdout(&cmd)
            .await
            .map_err(|e| Self::command_error(errmsg, e))
    }

    /// An `rbd` failure as `<errmsg>: <rbd's message>`, with "does not exist" and "exists"
    /// answers turned into the matching variants.
    fn command_error(errmsg: &str, e: CommandError) -> StorageError {
        match e {
            CommandError::Failed { stderr, .. } => {
                let msg = stderr
                    .lines()
                    .map(str::trim)
                    .filter(|l| {
                        !l.is_empty()
                            && !l.contains("did not load config file")
                            && !l.contains("Errors while parsing config file")
                            && !l.contains("can't open ceph.conf")
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let text = format!("{errmsg}: {msg}");
                // rbd's own verdict is on its `rbd:` lines; librados log lines come before.
                let verdict: String = stderr
                    .lines()
                    .filter(|l| l.starts_with("rbd:") || l.starts_with("Error"))
                    .collect();
                if verdict.contains("(2) No such file or directory") {
                    StorageError::NotFound(text)
                } else if verdict.contains("(17) File exists") {
                    StorageError::AlreadyExists(text)
                } else if msg.contains("timed out") {
                    StorageError::Failed(format!(
                        "{text} (no Ceph monitor answered within {CONNECT_TIMEOUT_SECS} s)"
                    ))
                } else {
                    StorageError::Failed(text)
                }
            }
            other => other.into(),
        }
    }

    /// `pool[/namespace]/name`, PVE's `get_rbd_path`.
    fn rbd_path(&self, name: &str) -> String {
        match self.namespace() {
            Some(ns) => format!("{}/{ns}/{name}", self.pool),
            None => format!("{}/{name}", self.pool),
        }
    }

    /// The pool's images and snapshots.
    ///
    /// # Errors
    /// When `rbd ls` fails.
    pub async fn ls(&self) -> Result<Vec<RbdListEntry>> {
        let out = self
            .rbd("ls", &["-l", "--format", "json"], "rbd error")
            .await?;
        parse_ls(&out)
    }

    async fn snaps(&self, name: &str) -> Result<Vec<RbdSnap>> {
        let out = self
            .rbd(
                "snap",
                &["ls", name, "--format", "json"],
                &format!("rbd snap ls '{name}' error"),
            )
            .await?;
        let mut snaps = parse_snap_ls(&out)?;
        snaps.sort_by_key(|s| s.id);
        Ok(snaps)
    }

    async fn info(&self, name: &str) -> Result<serde_json::Value> {
        let out = self
            .rbd(
                "info",
                &[name, "--format", "json"],
                &format!("rbd info '{name}' error"),
            )
            .await?;
        parse_json("rbd info", &out)
    }

    async fn free_name(&self, vmid: u32) -> Result<String> {
        let names: Vec<String> = self
            .ls()
            .await?
            .into_iter()
            .filter(|e| e.snapshot.is_none())
            .map(|e| e.image)
            .collect();
        volid::next_vm_diskname(&names, self.id(), vmid, "raw", false, false)
            .map_err(|e| StorageError::Failed(e.to_string()))
    }

    fn check_snapname(snap: &str) -> Result<()> {
        volid::verify_configid(snap)
            .map(|_| ())
            .map_err(|e| StorageError::Invalid(e.to_string()))
    }

    async fn protect(&self, name: &str, snap: &str) -> Result<()> {
        if self
            .snaps(name)
            .await?
            .iter()
            .any(|s| s.name == snap && s.is_protected())
        {
            return Ok(());
        }
        self.rbd(
            "snap",
            &["protect", name, "--snap", snap],
            &format!("rbd protect {name} snap '{snap}' error"),
        )
        .await?;
        Ok(())
    }

    async fn snap_create(&self, volname: &str, name: &str, snap: &str) -> Result<()> {
        self.rbd(
            "snap",
            &["create", "--snap", snap, "--no-progress", name],
            &format!("rbd snapshot '{volname}' error"),
        )
        .await?;
        Ok(())
    }

    // --- userspace exports -------------------------------------------------------------

    /// The state directory of this storage's exports.
    #[must_use]
    pub fn run_dir(&self) -> PathBuf {
        self.layout.join(RUN_DIR).join(self.id())
    }

    fn export_base(&self, name: &str, snap: Option<&str>) -> PathBuf {
        let file = match snap {
            Some(s) => format!("{name}@{s}"),
            None => name.to_string(),
        };
        self.run_dir().join(file)
    }

    /// The FUSE file exporting `name` (or its snapshot).
    #[must_use]
    pub fn export_file(&self, name: &str, snap: Option<&str>) -> PathBuf {
        self.export_base(name, snap).with_extension("img")
    }

    fn export_pidfile(&self, name: &str, snap: Option<&str>) -> PathBuf {
        self.export_base(name, snap).with_extension("pid")
    }

    fn export_keyfile(&self, name: &str, snap: Option<&str>) -> PathBuf {
        self.export_base(name, snap).with_extension("key")
    }

    /// The `qemu-storage-daemon` command exporting `name` (or its snapshot, read-only).
    fn export_cmd(&self, name: &str, snap: Option<&str>, keyfile: Option<&Path>) -> Cmd {
        let mut bd = format!("driver=rbd,node-name=rbd0,pool={}", qemu_escape(&self.pool));
        if let Some(ns) = self.namespace() {
            bd.push_str(&format!(",namespace={}", qemu_escape(ns)));
        }
        bd.push_str(&format!(",image={}", qemu_escape(name)));
        if let Some(s) = snap {
            bd.push_str(&format!(",snapshot={},read-only=on", qemu_escape(s)));
        }
        if let Some(c) = self.ceph_conf() {
            bd.push_str(&format!(",conf={}", qemu_escape(&c.to_string_lossy())));
        }
        for (i, m) in self.mon_hosts().iter().enumerate() {
            let (h, p) = mon_host_port(m);
            bd.push_str(&format!(
                ",server.{i}.host={},server.{i}.port={p}",
                qemu_escape(&h)
            ));
        }
        bd.push_str(&format!(",user={}", qemu_escape(self.user())));
        if let Some(a) = self.auth_supported() {
            bd.push_str(&format!(",auth-client-required.0={a}"));
        }
        let mut cmd = Cmd::new(QEMU_STORAGE_DAEMON);
        if let Some(k) = keyfile {
            bd.push_str(",key-secret=rbdkey0");
            cmd = cmd.arg("--object").arg(format!(
                "secret,id=rbdkey0,format=base64,file={}",
                qemu_escape(&k.to_string_lossy())
            ));
        }
        bd.push_str(",cache.direct=on");
        let file = self.export_file(name, snap);
        let writable = if snap.is_some() { "off" } else { "on" };
        cmd.arg("--blockdev")
            .arg(bd)
            .arg("--export")
            .arg(format!(
                "type=fuse,id=rbdexp0,node-name=rbd0,mountpoint={},writable={writable}",
                qemu_escape(&file.to_string_lossy())
            ))
            .arg("--pidfile")
            .arg(self.export_pidfile(name, snap))
            .arg("--daemonize")
            .timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS * 6))
    }

    /// The pid of the live daemon exporting `name`: the pid file's process, if it runs and
    /// its command line names this export (a reused pid is left alone).
    fn export_pid(&self, name: &str, snap: Option<&str>) -> Option<i32> {
        let file = self.export_file(name, snap);
        let needle = format!("mountpoint={}", qemu_escape(&file.to_string_lossy()));
        std::fs::read_to_string(self.export_pidfile(name, snap))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|&p| pid_alive(p))
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
    }

    fn export_is_up(&self, name: &str, snap: Option<&str>) -> bool {
        let file = self.export_file(name, snap);
        self.export_pid(name, snap).is_some()
            && vzkit_host::mount::is_mountpoint(&file).unwrap_or(false)
    }

    async fn start_export(&self, volname: &str, name: &str, snap: Option<&str>) -> Result<()> {
        if self.export_is_up(name, snap) {
            return Ok(());
        }
        // A daemon whose export vanished, or leftovers of one, go first.
        self.stop_export(name, snap).await?;
        let dir = self.run_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io("unable to create directory", &dir, e))?;
        let file = self.export_file(name, snap);
        std::fs::write(&file, b"").map_err(|e| StorageError::io("unable to create", &file, e))?;
        let keyfile = match self.keyring() {
            Some(k) => {
                let text = std::fs::read_to_string(&k)
                    .map_err(|e| StorageError::io("unable to read", &k, e))?;
                let key = keyring_key(&text, self.user()).ok_or_else(|| {
                    StorageError::Invalid(format!("no key in keyring '{}'", k.display()))
                })?;
                let kf = self.export_keyfile(name, snap);
                write_private(&kf, key.as_bytes())
                    .map_err(|e| StorageError::io("unable to write", &kf, e))?;
                Some(kf)
            }
            None => None,
        };
        eprintln!(
            "rbd: kernel has no rbd support (no /sys/bus/rbd), exporting '{}' through \
             qemu-storage-daemon (FUSE) at '{}'",
            self.volid(volname),
            file.display()
        );
        let cmd = self.export_cmd(name, snap, keyfile.as_deref());
        let res = self.runner.run(&cmd).await;
        let res = match res {
            Ok(_) if self.export_is_up(name, snap) => Ok(()),
            Ok(_) => Err(StorageError::Failed(format!(
                "qemu-storage-daemon did not export '{}' at '{}'",
                self.volid(volname),
                file.display()
            ))),
            Err(e) => Err(StorageError::Failed(format!(
                "unable to export '{}': {e}",
                self.volid(volname)
            ))),
        };
        if res.is_err() {
            let _ = self.stop_export(name, snap).await;
        }
        res
    }

    /// Stops the export of `name` (if any): waits up to 10 s for loop devices on its file to
    /// go, then stops the daemon by pid (SIGTERM, SIGKILL after 10 s) and removes its files.
    async fn stop_export(&self, name: &str, snap: Option<&str>) -> Result<()> {
        let file = self.export_file(name, snap);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while loop_backed_by(&file) {
            if std::time::Instant::now() >= deadline {
                return Err(StorageError::Failed(format!(
                    "unable to release '{}': a loop device still uses it",
                    file.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(pid) = self.export_pid(name, snap) {
            stop_pid(pid).await;
        }
        // A daemon killed hard leaves its FUSE mount behind.
        if vzkit_host::mount::is_mountpoint(&file).unwrap_or(false) {
            let _ = rustix::mount::unmount(&file, rustix::mount::UnmountFlags::DETACH);
        }
        for p in [
            file,
            self.export_pidfile(name, snap),
            self.export_keyfile(name, snap),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("unable to remove", &p, e)),
            }
        }
        Ok(())
    }

    // --- kernel mapping ----------------------------------------------------------------

    async fn mapped_device(&self, name: &str, snap: Option<&str>) -> Result<Option<PathBuf>> {
        let out = self
            .rbd("showmapped", &["--format", "json"], "rbd showmapped error")
            .await?;
        let v: serde_json::Value = if out.trim().is_empty() {
            serde_json::Value::Array(Vec::new())
        } else {
            parse_json("rbd showmapped", &out)?
        };
        let ns = self.namespace().unwrap_or("");
        let want_snap = snap.unwrap_or("-");
        Ok(v.as_array().into_iter().flatten().find_map(|m| {
            (m["pool"] == self.pool.as_str()
                && m["namespace"].as_str().unwrap_or("") == ns
                && m["name"] == name
                && m["snap"].as_str().unwrap_or("-") == want_snap)
                .then(|| m["device"].as_str().map(PathBuf::from))
                .flatten()
        }))
    }

    fn map_spec(name: &str, snap: Option<&str>) -> String {
        match snap {
            Some(s) => format!("{name}@{s}"),
            None => name.to_string(),
        }
    }
}

/// Writes `data` to a new file readable by root only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

fn pid_alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

async fn stop_pid(pid: i32) {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        if std::time::Instant::now() >= deadline {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a loop device's backing file is `file`.
fn loop_backed_by(file: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    dir.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("loop")
            && std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end_matches('\n')) == file)
    })
}

#[async_trait::async_trait]
impl StoragePlugin for RbdPlugin {
    fn section(&self) -> &StorageSection {
        &self.section
    }

    fn storage_type(&self) -> &'static str {
        "rbd"
    }

    fn parse_volname(&self, volname: &str) -> Result<ParsedVolname> {
        volid::parse_volname_rbd(volname).map_err(|e| StorageError::Invalid(e.to_string()))
    }

    fn features(&self) -> FeatureTable {
        RBD_FEATURES
    }

    fn volume_snapshot_needs_fsfreeze(&self) -> bool {
        true
    }

    async fn activate_storage(&self) -> Result<()> {
        Ok(())
    }

    /// Pool usage from `ceph df` (`data-pool`, else `pool`): free = `max_avail`, used =
    /// `stored`. A cluster without a ceph-mgr reports no pool statistics; then the space
    /// the images use (`rbd du`) is reported as used and as total, with nothing free.
    async fn status(&self) -> Result<StorageStatus> {
        let pool = self.section.get("data-pool").unwrap_or(&self.pool);
        let mut cmd = Cmd::new(CEPH);
        if self.ceph_conf().is_none() && !self.external() {
            // The ceph tool refuses to run without a configuration file.
            cmd = cmd.args(["-c", "/dev/null"]);
        }
        let cmd = self
            .connect_args(cmd)
            .args([
                "--connect-timeout",
                &CONNECT_TIMEOUT_SECS.to_string(),
                "df",
                "--format",
                "json",
            ])
            .timeout(COMMAND_TIMEOUT);
        let out = self
            .runner
            .run_stdout(&cmd)
            .await
            .map_err(|e| Self::command_error("ceph df error", e))?;
        if let Some((avail, used)) = parse_ceph_df(&out, pool)? {
            return Ok(StorageStatus {
                total: avail + used,
                avail,
                used,
                active: true,
            });
        }
        let du = self
            .rbd("du", &["--format", "json"], "rbd du error")
            .await?;
        let v: serde_json::Value = if du.trim().is_empty() {
            serde_json::Value::Null
        } else {
            parse_json("rbd du", &du)?
        };
        let used = v["total_used_size"].as_u64().unwrap_or(0);
        Ok(StorageStatus {
            total: used,
            avail: 0,
            used,
            active: true,
        })
    }

    /// PVE's `path`: the kernel device with kernel mapping, else the `rbd:` URL qemu
    /// understands.
    async fn path(&self, volname: &str, snapname: Option<&str>) -> Result<PathBuf> {
        let p = self.parse_volname(volname)?;
        let spec = Self::map_spec(&p.name, snapname);
        let ns = self
            .namespace()
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        if self.mode == MapMode::Kernel {
            return Ok(PathBuf::from(format!("/dev/rbd/{}/{ns}{spec}", self.pool)));
        }
        let mut url = format!("rbd:{}/{ns}{spec}", self.pool);
        if let Some(c) = self.ceph_conf() {
            url.push_str(&format!(":conf={}", c.display()));
        }
        let mons = self.mon_hosts();
        if !mons.is_empty() {
            url.push_str(&format!(
                ":mon_host={}:auth_supported={}",
                mons.join(";"),
                self.auth_supported().unwrap_or("none")
            ));
        }
        if let Some(k) = self.keyring() {
            url.push_str(&format!(":id={}:keyring={}", self.user(), k.display()));
        }
        Ok(PathBuf::from(url))
    }

    async fn access(&self, volname: &str, snapname: Option<&str>) -> Result<VolumeAccess> {
        let p = self.parse_volname(volname)?;
        match self.mode {
            MapMode::Userspace => Ok(VolumeAccess::ImageFile(self.export_file(&p.name, snapname))),
            MapMode::Kernel => match self.mapped_device(&p.name, snapname).await? {
                Some(dev) => Ok(VolumeAccess::BlockDevice(dev)),
                None => Ok(VolumeAccess::BlockDevice(
                    self.path(volname, snapname).await?,
                )),
            },
        }
    }

    async fn alloc_image(
        &self,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        if format != "raw" {
            return Err(StorageError::Invalid(format!(
                "illegal format '{format}' - only raw images are supported"
            )));
        }
        if let Some(n) = name {
            crate::plugin::check_vm_volume_name(vmid, n)?;
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => self.free_name(vmid).await?,
        };
        self.parse_volname(&name)?;
        let size_mib = size_kib.div_ceil(1024).to_string();
        let mut args = vec!["--image-format", "2", "--size", &size_mib];
        if let Some(dp) = self.section.get("data-pool") {
            args.extend(["--data-pool", dp]);
        }
        args.push(&name);
        self.rbd("create", &args, &format!("rbd create '{name}' error"))
            .await?;
        Ok(name)
    }

    async fn free_image(&self, volname: &str) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let name = &p.name;
        let snaps = self.snaps(name).await.map_err(|e| match e {
            StorageError::NotFound(_) => {
                StorageError::NotFound(format!("volume '{}' does not exist", self.volid(volname)))
            }
            other => other,
        })?;
        for s in snaps.iter().filter(|s| s.is_protected()) {
            self.rbd(
                "snap",
                &["unprotect", name, "--snap", &s.name],
                &format!("rbd unprotect {name} snap '{}' error", s.name),
            )
            .await?;
        }
        self.deactivate_volume(volname, None).await?;
        self.rbd(
            "snap",
            &["purge", name, "--no-progress"],
            &format!("rbd snap purge '{name}' error"),
        )
        .await?;
        // A client that just closed the image may still be listed as a watcher for a
        // moment; a live user (a mapping elsewhere) keeps it busy.
        let mut tries = 0;
        loop {
            match self
                .rbd(
                    "rm",
                    &[name, "--no-progress"],
                    &format!("rbd rm '{name}' error"),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.to_string().contains("still has watchers") && tries < 5 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) if e.to_string().contains("still has watchers") => {
                    return Err(StorageError::Failed(format!(
                        "{e} (the image is still open: mapped or in use on some host)"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn list_images(&self, vmid: Option<u32>) -> Result<Vec<VolumeInfo>> {
        let mut res = Vec::new();
        for e in self.ls().await? {
            if e.snapshot.is_some() {
                continue;
            }
            let Ok(p) = self.parse_volname(&e.image) else {
                continue;
            };
            if vmid.is_some_and(|v| Some(v) != p.vmid) {
                continue;
            }
            let base = e
                .parent
                .as_ref()
                .filter(|par| par.snapshot == BASE_SNAP && par.image.starts_with("base-"))
                .map(|par| par.image.clone());
            let volname = match &base {
                Some(b) => format!("{b}/{}", e.image),
                None => e.image.clone(),
            };
            let mut info = VolumeInfo::new(self.volid(&volname), "images", "raw", e.size);
            info.vmid = p.vmid;
            info.parent = base.map(|b| self.volid(&b));
            res.push(info);
        }
        Ok(res)
    }

    async fn activate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let p = self.parse_volname(volname)?;
        // Fails within the connect timeout when the cluster is unreachable, and names a
        // missing image or snapshot.
        let info = self.info(&p.name).await.map_err(|e| match e {
            StorageError::NotFound(_) => {
                StorageError::NotFound(format!("volume '{}' does not exist", self.volid(volname)))
            }
            other => other,
        })?;
        if let Some(s) = snapname
            && !self.snaps(&p.name).await?.iter().any(|x| x.name == s)
        {
            return Err(StorageError::NotFound(format!(
                "snapshot '{s}' of volume '{}' does not exist",
                self.volid(volname)
            )));
        }
        drop(info);
        match self.mode {
            MapMode::Userspace => self.start_export(volname, &p.name, snapname).await,
            MapMode::Kernel => {
                if self.mapped_device(&p.name, snapname).await?.is_none() {
                    let spec = Self::map_spec(&p.name, snapname);
                    self.rbd("map", &[&spec], &format!("can't map rbd volume {spec}"))
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn deactivate_volume(&self, volname: &str, snapname: Option<&str>) -> Result<()> {
        let p = self.parse_volname(volname)?;
        match self.mode {
            MapMode::Userspace => self.stop_export(&p.name, snapname).await,
            MapMode::Kernel => {
                if let Some(dev) = self.mapped_device(&p.name, snapname).await? {
                    let dev = dev.to_string_lossy().into_owned();
                    self.rbd("unmap", &[&dev], &format!("can't unmap rbd device {dev}"))
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn volume_size_info(&self, volname: &str) -> Result<u64> {
        let p = self.parse_volname(volname)?;
        let info = self.info(&p.name).await?;
        info["size"]
            .as_u64()
            .ok_or_else(|| StorageError::Failed(format!("rbd info '{}' reported no size", p.name)))
    }

    async fn volume_resize(&self, volname: &str, size_bytes: u64) -> Result<()> {
        let p = self.parse_volname(volname)?;
        let mib = size_bytes.div_ceil(1024 * 1024).to_string();
        self.rbd(
            "resize",
            &["--size", &mib, "--no-progress", &p.name],
            &format!("rbd resize '{}' error", p.name),
        )
        .await?;
        Ok(())
    }

    async fn volume_snapshot(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        self.snap_create(volname, &p.name, snap).await
    }

    /// RBD rolls back to any snapshot and keeps the newer ones, so nothing blocks it.
    async fn volume_rollback_is_possible(&self, volname: &str, snap: &str) -> Result<Vec<String>> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        if !self.snaps(&p.name).await?.iter().any(|s| s.name == snap) {
            return Err(StorageError::NotFound(format!(
                "can't rollback, snapshot '{snap}' does not exist on '{}'",
                self.volid(volname)
            )));
        }
        Ok(Vec::new())
    }

    async fn volume_snapshot_rollback(&self, volname: &str, snap: &str) -> Result<()> {
        self.volume_rollback_is_possible(volname, snap).await?;
        let p = self.parse_volname(volname)?;
        self.rbd(
            "snap",
            &["rollback", "--snap", snap, "--no-progress", &p.name],
            &format!("rbd snapshot {volname} to '{snap}' error"),
        )
        .await?;
        Ok(())
    }

    async fn volume_snapshot_delete(&self, volname: &str, snap: &str) -> Result<()> {
        Self::check_snapname(snap)?;
        let p = self.parse_volname(volname)?;
        self.deactivate_volume(volname, Some(snap)).await?;
        let snaps = self.snaps(&p.name).await?;
        let Some(s) = snaps.iter().find(|s| s.name == snap) else {
            return Err(StorageError::NotFound(format!(
                "snapshot '{snap}' of volume '{}' does not exist",
                self.volid(volname)
            )));
        };
        if s.is_protected() {
            self.rbd(
                "snap",
                &["unprotect", &p.name, "--snap", snap],
                &format!("rbd unprotect {} snap '{snap}' error", p.name),
            )
            .await?;
        }
        self.rbd(
            "snap",
            &["rm", "--snap", snap, "--no-progress", &p.name],
            &format!("rbd snapshot '{volname}' error"),
        )
        .await?;
        Ok(())
    }

    async fn volume_snapshot_list(&self, volname: &str) -> Result<Vec<String>> {
        let p = self.parse_volname(volname)?;
        Ok(self
            .snaps(&p.name)
            .await?
            .into_iter()
            .map(|s| s.name)
            .filter(|n| n != BASE_SNAP)
            .collect())
    }

    async fn clone_image(&self, volname: &str, vmid: u32, snap: Option<&str>) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if !p.is_base && snap.is_none() {
            return Err(StorageError::Invalid(format!(
                "{volname} is not a base image and snapname is not provided"
            )));
        }
        if let Some(s) = snap {
            Self::check_snapname(s)?;
        }
        let name = self.free_name(vmid).await?;
        if let Some(s) = snap {
            self.protect(&p.name, s).await?;
        }
        let from_snap = snap.unwrap_or(BASE_SNAP);
        let src = self.rbd_path(&p.name);
        let dst = self.rbd_path(&name);
        let mut args = vec![src.as_str(), "--snap", from_snap];
        if let Some(dp) = self.section.get("data-pool") {
            args.extend(["--data-pool", dp]);
        }
        args.push(&dst);
        self.rbd("clone", &args, &format!("rbd clone '{}' error", p.name))
            .await?;
        Ok(match snap {
            Some(_) => name,
            None => format!("{}/{name}", p.name),
        })
    }

    async fn create_base(&self, volname: &str) -> Result<String> {
        let p = self.parse_volname(volname)?;
        if p.is_base {
            return Err(StorageError::Invalid(
                "create_base not possible with base image".into(),
            ));
        }
        let info = self.info(&p.name).await?;
        if info["format"].as_u64() != Some(2) {
            return Err(StorageError::Invalid(
                "rbd image must be at format V2".into(),
            ));
        }
        if let Some(b) = &p.basename {
            let parent = format!(
                "{}@{}",
                info["parent"]["image"].as_str().unwrap_or(""),
                info["parent"]["snapshot"].as_str().unwrap_or("")
            );
            if parent != format!("{b}@{BASE_SNAP}") {
                return Err(StorageError::Invalid(format!(
                    "volname '{volname}' contains wrong information about parent {parent} {b}"
                )));
            }
        }
        let newname = p.name.replacen("vm-", "base-", 1);
        let newvolname = match &p.basename {
            Some(b) => format!("{b}/{newname}"),
            None => newname.clone(),
        };
        self.rbd(
            "rename",
            &[&self.rbd_path(&p.name), &self.rbd_path(&newname)],
            &format!("rbd rename '{}' error", p.name),
        )
        .await?;
        self.deactivate_volume(volname, None).await?;
        self.snap_create(&newname, &newname, BASE_SNAP).await?;
        self.protect(&newname, BASE_SNAP).await?;
        Ok(newvolname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use vzkit_host::command::{Output, RecordingRunner};

    const PREFIX: &str =
        "/usr/bin/rbd -p rbd -n client.admin --client_mount_timeout 10 --rados_mon_op_timeout 10";
    /// Verbatim `rbd ls -l --format json` (ceph 16.2.15).
    const LS: &str = r#"[{"image":"base-100-disk-0","id":"1032f2fcc03c","size":1073741824,"format":2},{"image":"base-100-disk-0","id":"1032f2fcc03c","snapshot":"__base__","snapshot_id":4,"size":1073741824,"format":2,"protected":"true"},{"image":"vm-101-disk-0","id":"103a109e8fad","size":1073741824,"parent":{"pool":"rbd","pool_namespace":"","image":"base-100-disk-0","snapshot":"__base__"},"format":2},{"image":"vm-100-disk-1","id":"1034bb6e37ca","size":536870912,"format":2},{"image":"other","id":"1","size":1,"format":2}]"#;
    const SNAPS: &str = r#"[{"id":7,"name":"s2","size":1073741824,"protected":"false","timestamp":"Sat Nov 28 11:31:40 2026"},{"id":4,"name":"s1","size":1073741824,"protected":"true","timestamp":"Sat Nov 28 11:30:40 2026"}]"#;

    fn plugin_cfg(cfg: &str, root: &Path) -> (RbdPlugin, Arc<RecordingRunner>) {
        let (cfg, warnings) = StorageConfig::parse(cfg, "storage.cfg");
        assert!(warnings.is_empty(), "{warnings:?}");
        let runner = Arc::new(RecordingRunner::new());
        let section = cfg.sections()[0].clone();
        let p = RbdPlugin::with_mode(
            section,
            runner.clone(),
            Layout::new(root),
            MapMode::Userspace,
        );
        (p, runner)
    }

    fn plugin() -> (RbdPlugin, Arc<RecordingRunner>) {
        plugin_cfg(
            "rbd: ceph\n\tcontent rootdir,images\n",
            Path::new("/nonexistent-vzkit-root"),
        )
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn json_parsers() {
        let ls = parse_ls(LS).unwrap();
        assert_eq!(ls.len(), 5);
        assert_eq!(ls[1].snapshot.as_deref(), Some("__base__"));
        assert_eq!(ls[2].parent.as_ref().unwrap().image, "base-100-disk-0");
        assert!(parse_ls("").unwrap().is_empty());
        let snaps = parse_snap_ls(SNAPS).unwrap();
        assert!(!snaps[0].is_protected());
        assert!(snaps[1].is_protected());
        assert!(parse_ls("garbage").is_err());
        let df = r#"{"stats":{"total_bytes":10737418240},"pools":[{"name":"rbd","id":1,"stats":{"stored":4096,"objects":3,"kb_used":12,"bytes_used":12288,"percent_used":0,"max_avail":10200547328}}]}"#;
        assert_eq!(
            parse_ceph_df(df, "rbd").unwrap(),
            Some((10_200_547_328, 4096))
        );
        assert_eq!(parse_ceph_df(df, "other").unwrap(), None);
        assert_eq!(
            parse_ceph_df(r#"{"stats":{"total_bytes":0},"pools":[]}"#, "rbd").unwrap(),
            None
        );
    }

    #[test]
    fn monitor_and_keyring_helpers() {
        assert_eq!(
            monhost_list("10.0.0.1 10.0.0.2;10.0.0.3,, 10.0.0.4"),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        assert_eq!(mon_host_port("127.0.0.1:3300"), ("127.0.0.1".into(), 3300));
        assert_eq!(
            mon_host_port("v2:127.0.0.1:3300/0"),
            ("127.0.0.1".into(), 3300)
        );
        assert_eq!(mon_host_port("10.0.0.1"), ("10.0.0.1".into(), 6789));
        assert_eq!(mon_host_port("[::1]:3300"), ("::1".into(), 3300));
        assert_eq!(mon_host_port("[fd00::1]"), ("fd00::1".into(), 6789));
        let kr = "[client.other]\n\tkey = AAA==\n[client.admin]\n\tkey = BBB==\n\tcaps mon = \"allow *\"\n";
        assert_eq!(keyring_key(kr, "admin").as_deref(), Some("BBB=="));
        assert_eq!(keyring_key(kr, "nobody").as_deref(), Some("AAA=="));
        assert_eq!(keyring_key("", "admin"), None);
    }

    #[test]
    fn external_cluster_prefix_uses_conf_keyring_and_monhost() {
        let root = tempfile::tempdir().unwrap();
        let (p, r) = plugin_cfg(
            "rbd: ext\n\tpool vms\n\tnamespace ns1\n\tmonhost 10.0.0.1 10.0.0.2:3300\n\tusername vzkit\n\tcontent images\n",
            root.path(),
        );
        // Without conf and keyring: no -c, cephx off.
        block_on(p.volume_snapshot("vm-100-disk-0", "s1")).unwrap();
        let dir = root.path().join("etc/pve/priv/ceph");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ext.conf"), "[global]\n").unwrap();
        std::fs::write(
            dir.join("ext.keyring"),
            "[client.vzkit]\n\tkey = S3CRET==\n",
        )
        .unwrap();
        block_on(p.volume_snapshot("vm-100-disk-0", "s1")).unwrap();
        block_on(p.deactivate_volume("vm-100-disk-0", None)).unwrap();
        let conf = dir.join("ext.conf");
        let keyring = dir.join("ext.keyring");
        assert_eq!(
            r.call_lines(),
            [
                "/usr/bin/rbd -p vms --namespace ns1 -c /dev/null -m 10.0.0.1,10.0.0.2:3300 --auth_supported none -n client.vzkit --client_mount_timeout 10 --rados_mon_op_timeout 10 snap create --snap s1 --no-progress vm-100-disk-0".to_string(),
                format!(
                    "/usr/bin/rbd -p vms --namespace ns1 -c {} -m 10.0.0.1,10.0.0.2:3300 --auth_supported cephx -n client.vzkit --keyring {} --client_mount_timeout 10 --rados_mon_op_timeout 10 snap create --snap s1 --no-progress vm-100-disk-0",
                    conf.display(),
                    keyring.display()
                ),
            ]
        );
        assert_eq!(
            block_on(p.path("vm-100-disk-0", Some("s1"))).unwrap(),
            PathBuf::from(format!(
                "rbd:vms/ns1/vm-100-disk-0@s1:conf={}:mon_host=10.0.0.1;10.0.0.2:3300:auth_supported=cephx:id=vzkit:keyring={}",
                conf.display(),
                keyring.display()
            ))
        );
        // The userspace export: monitors as qemu servers, the key through a secret file.
        let key = p.export_keyfile("vm-100-disk-0", Some("s1"));
        let argv = p.export_cmd("vm-100-disk-0", Some("s1"), Some(&key)).argv();
        let run = root.path().join("run/vzkit/rbd/ext");
        assert_eq!(
            argv,
            [
                "qemu-storage-daemon".to_string(),
                "--object".into(),
                format!(
                    "secret,id=rbdkey0,format=base64,file={}/vm-100-disk-0@s1.key",
                    run.display()
                ),
                "--blockdev".into(),
                format!(
                    "driver=rbd,node-name=rbd0,pool=vms,namespace=ns1,image=vm-100-disk-0,snapshot=s1,read-only=on,conf={},server.0.host=10.0.0.1,server.0.port=6789,server.1.host=10.0.0.2,server.1.port=3300,user=vzkit,auth-client-required.0=cephx,key-secret=rbdkey0,cache.direct=on",
                    conf.display()
                ),
                "--export".into(),
                format!(
                    "type=fuse,id=rbdexp0,node-name=rbd0,mountpoint={}/vm-100-disk-0@s1.img,writable=off",
                    run.display()
                ),
                "--pidfile".into(),
                format!("{}/vm-100-disk-0@s1.pid", run.display()),
                "--daemonize".into(),
            ]
        );
    }

    #[test]
    fn alloc_creates_a_format_2_image() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(LS));
        let name = block_on(p.alloc_image(100, "raw", None, 1_048_577)).unwrap();
        assert_eq!(name, "vm-100-disk-2");
        assert_eq!(
            r.call_lines(),
            [
                format!("{PREFIX} ls -l --format json"),
                format!("{PREFIX} create --image-format 2 --size 1025 vm-100-disk-2"),
            ]
        );
        let (p, r) = plugin_cfg(
            "rbd: ceph\n\tdata-pool ec\n\tcontent rootdir\n",
            Path::new("/nonexistent-vzkit-root"),
        );
        block_on(p.alloc_image(100, "raw", Some("vm-100-disk-7"), 1024)).unwrap();
        assert_eq!(
            r.call_lines(),
            [format!(
                "{PREFIX} create --image-format 2 --size 1 --data-pool ec vm-100-disk-7"
            )]
        );
        let err = block_on(p.alloc_image(100, "raw", Some("vm-101-disk-0"), 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-101-disk-0' - should be 'vm-100-*'"
        );
        let err = block_on(p.alloc_image(100, "subvol", None, 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal format 'subvol' - only raw images are supported"
        );
        // An existing name: rbd's answer, as AlreadyExists.
        let (p, r) = plugin();
        r.push_reply(Output::failed(
            17,
            "2026-11-28T15:00:00.000+0000 7f -1 librbd: rbd image vm-100-disk-0 already exists\nrbd: create error: (17) File exists",
        ));
        let err = block_on(p.alloc_image(100, "raw", Some("vm-100-disk-0"), 1024)).unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("rbd create 'vm-100-disk-0' error: "),
            "{err}"
        );
    }

    #[test]
    fn free_unprotects_purges_and_removes() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(SNAPS));
        block_on(p.free_image("vm-100-disk-1")).unwrap();
        assert_eq!(
            r.call_lines(),
            [
                format!("{PREFIX} snap ls vm-100-disk-1 --format json"),
                format!("{PREFIX} snap unprotect vm-100-disk-1 --snap s1"),
                format!("{PREFIX} snap purge vm-100-disk-1 --no-progress"),
                format!("{PREFIX} rm vm-100-disk-1 --no-progress"),
            ]
        );
        // A clone's image name is the part after the base.
        let (p, r) = plugin();
        block_on(p.free_image("base-100-disk-0/vm-101-disk-0")).unwrap();
        assert_eq!(
            r.call_lines()[2],
            format!("{PREFIX} rm vm-101-disk-0 --no-progress")
        );
        let (p, r) = plugin();
        r.push_reply(Output::failed(
            2,
            "rbd: error opening image vm-100-disk-9: (2) No such file or directory",
        ));
        let err = block_on(p.free_image("vm-100-disk-9")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume 'ceph:vm-100-disk-9' does not exist"
        );
        // A snapshot with clones cannot be unprotected: nothing is removed.
        let (p, r) = plugin();
        r.push_reply(Output::ok(SNAPS));
        r.push_reply(Output::failed(
            16,
            "2026-11-28T15:00:00.000+0000 7f -1 librbd::SnapshotUnprotectRequest: cannot unprotect: at least 1 child(ren) [103a109e8fad] in pool 'rbd'\nrbd: unprotecting snap failed: (16) Device or resource busy",
        ));
        let err = block_on(p.free_image("vm-100-disk-1")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("rbd unprotect vm-100-disk-1 snap 's1' error: "),
            "{err}"
        );
        assert_eq!(r.calls().len(), 2);
    }

    #[test]
    fn list_and_size() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(LS));
        let vols = block_on(p.list_images(None)).unwrap();
        let ids: Vec<(&str, Option<&str>)> = vols
            .iter()
            .map(|v| (v.volid.as_str(), v.parent.as_deref()))
            .collect();
        assert_eq!(
            ids,
            [
                ("ceph:base-100-disk-0", None),
                (
                    "ceph:base-100-disk-0/vm-101-disk-0",
                    Some("ceph:base-100-disk-0")
                ),
                ("ceph:vm-100-disk-1", None),
            ]
        );
        assert_eq!(vols[2].size, 536_870_912);
        assert_eq!(vols[2].vmid, Some(100));
        r.push_reply(Output::ok(LS));
        assert_eq!(block_on(p.list_images(Some(101))).unwrap().len(), 1);
        r.push_reply(Output::ok(
            r#"{"name":"vm-100-disk-1","size":536870912,"format":2}"#,
        ));
        assert_eq!(
            block_on(p.volume_size_info("vm-100-disk-1")).unwrap(),
            536_870_912
        );
        block_on(p.volume_resize("vm-100-disk-1", 805_306_369)).unwrap();
        assert_eq!(
            r.call_lines()[2..],
            [
                format!("{PREFIX} info vm-100-disk-1 --format json"),
                format!("{PREFIX} resize --size 769 --no-progress vm-100-disk-1"),
            ]
        );
    }

    #[test]
    fn status_from_ceph_df_or_rbd_du() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(
            r#"{"pools":[{"name":"rbd","stats":{"stored":4096,"max_avail":8192}}]}"#,
        ));
        let st = block_on(p.status()).unwrap();
        assert_eq!(
            (st.total, st.avail, st.used, st.active),
            (12288, 8192, 4096, true)
        );
        r.push_reply(Output::ok(r#"{"stats":{},"pools":[]}"#));
        r.push_reply(Output::ok(
            r#"{"images":[],"total_provisioned_size":67108864,"total_used_size":1048576}"#,
        ));
        let st = block_on(p.status()).unwrap();
        assert_eq!((st.total, st.avail, st.used), (1_048_576, 0, 1_048_576));
        assert_eq!(
            r.call_lines(),
            [
                "/usr/bin/ceph -c /dev/null -n client.admin --connect-timeout 10 df --format json"
                    .to_string(),
                "/usr/bin/ceph -c /dev/null -n client.admin --connect-timeout 10 df --format json"
                    .to_string(),
                format!("{PREFIX} du --format json"),
            ]
        );
    }

    #[test]
    fn snapshot_rollback_delete() {
        let (p, r) = plugin();
        block_on(p.volume_snapshot("vm-100-disk-1", "s3")).unwrap();
        r.push_reply(Output::ok(SNAPS));
        // Rolling back to an older snapshot is allowed and keeps the newer ones.
        block_on(p.volume_snapshot_rollback("vm-100-disk-1", "s1")).unwrap();
        r.push_reply(Output::ok(SNAPS));
        block_on(p.volume_snapshot_delete("vm-100-disk-1", "s1")).unwrap();
        r.push_reply(Output::ok(SNAPS));
        assert_eq!(
            block_on(p.volume_snapshot_list("vm-100-disk-1")).unwrap(),
            ["s1", "s2"]
        );
        assert_eq!(
            r.call_lines(),
            [
                format!("{PREFIX} snap create --snap s3 --no-progress vm-100-disk-1"),
                format!("{PREFIX} snap ls vm-100-disk-1 --format json"),
                format!("{PREFIX} snap rollback --snap s1 --no-progress vm-100-disk-1"),
                format!("{PREFIX} snap ls vm-100-disk-1 --format json"),
                format!("{PREFIX} snap unprotect vm-100-disk-1 --snap s1"),
                format!("{PREFIX} snap rm --snap s1 --no-progress vm-100-disk-1"),
                format!("{PREFIX} snap ls vm-100-disk-1 --format json"),
            ]
        );
        let (p, r) = plugin();
        r.push_reply(Output::ok(SNAPS));
        let err = block_on(p.volume_snapshot_rollback("vm-100-disk-1", "nope")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "can't rollback, snapshot 'nope' does not exist on 'ceph:vm-100-disk-1'"
        );
        assert_eq!(r.calls().len(), 1);
        let (p, r) = plugin();
        r.push_reply(Output::failed(
            17,
            "rbd: failed to create snapshot: (17) File exists",
        ));
        let err = block_on(p.volume_snapshot("vm-100-disk-1", "s1")).unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "rbd snapshot 'vm-100-disk-1' error: rbd: failed to create snapshot: (17) File exists"
        );
        assert!(p.volume_snapshot_needs_fsfreeze());
    }

    #[test]
    fn template_and_clones() {
        let (p, r) = plugin();
        r.push_reply(Output::ok(
            r#"{"name":"vm-100-disk-0","size":1,"format":2}"#,
        ));
        r.push_reply(Output::ok("")); // rename
        r.push_reply(Output::ok("")); // snap create
        r.push_reply(Output::ok("[]")); // snap ls
        assert_eq!(
            block_on(p.create_base("vm-100-disk-0")).unwrap(),
            "base-100-disk-0"
        );
        r.push_reply(Output::ok(LS));
        assert_eq!(
            block_on(p.clone_image("base-100-disk-0", 101, None)).unwrap(),
            "base-100-disk-0/vm-101-disk-1"
        );
        r.push_reply(Output::ok(LS));
        r.push_reply(Output::ok(SNAPS));
        assert_eq!(
            block_on(p.clone_image("vm-100-disk-1", 102, Some("s2"))).unwrap(),
            "vm-102-disk-0"
        );
        assert_eq!(
            r.call_lines(),
            [
                format!("{PREFIX} info vm-100-disk-0 --format json"),
                format!("{PREFIX} rename rbd/vm-100-disk-0 rbd/base-100-disk-0"),
                format!("{PREFIX} snap create --snap __base__ --no-progress base-100-disk-0"),
                format!("{PREFIX} snap ls base-100-disk-0 --format json"),
                format!("{PREFIX} snap protect base-100-disk-0 --snap __base__"),
                format!("{PREFIX} ls -l --format json"),
                format!("{PREFIX} clone rbd/base-100-disk-0 --snap __base__ rbd/vm-101-disk-1"),
                format!("{PREFIX} ls -l --format json"),
                format!("{PREFIX} snap ls vm-100-disk-1 --format json"),
                format!("{PREFIX} snap protect vm-100-disk-1 --snap s2"),
                format!("{PREFIX} clone rbd/vm-100-disk-1 --snap s2 rbd/vm-102-disk-0"),
            ]
        );
        let err = block_on(p.clone_image("vm-100-disk-0", 101, None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vm-100-disk-0 is not a base image and snapname is not provided"
        );
        let err = block_on(p.create_base("base-100-disk-0")).unwrap_err();
        assert_eq!(err.to_string(), "create_base not possible with base image");
    }

    #[test]
    fn activation_checks_the_image_and_names_a_missing_one() {
        let (p, r) = plugin();
        r.push_reply(Output::failed(
            2,
            "rbd: error opening image vm-100-disk-9: (2) No such file or directory",
        ));
        let err = block_on(p.activate_volume("vm-100-disk-9", None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume 'ceph:vm-100-disk-9' does not exist"
        );
        r.push_reply(Output::ok(
            r#"{"name":"vm-100-disk-1","size":1,"format":2}"#,
        ));
        r.push_reply(Output::ok(SNAPS));
        let err = block_on(p.activate_volume("vm-100-disk-1", Some("s9"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot 's9' of volume 'ceph:vm-100-disk-1' does not exist"
        );
        // The monitor timeout is reported as such.
        r.push_reply(Output::failed(
            110,
            "rbd: couldn't connect to the cluster!\nrbd: info: (110) Connection timed out",
        ));
        let err = block_on(p.activate_volume("vm-100-disk-1", None)).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("(110) Connection timed out (no Ceph monitor answered within 10 s)"),
            "{err}"
        );
    }

    #[test]
    fn kernel_mapping_uses_map_and_unmap() {
        let (cfg, _) = StorageConfig::parse("rbd: ceph\n\tnamespace n\n", "storage.cfg");
        let r = Arc::new(RecordingRunner::new());
        let p = RbdPlugin::with_mode(
            cfg.get("ceph").unwrap().clone(),
            r.clone(),
            Layout::new("/nonexistent"),
            MapMode::Kernel,
        );
        r.push_reply(Output::ok(
            r#"{"name":"vm-100-disk-1","size":1,"format":2}"#,
        ));
        r.push_reply(Output::ok("[]"));
        block_on(p.activate_volume("vm-100-disk-1", None)).unwrap();
        let mapped = r#"[{"id":"0","pool":"rbd","namespace":"n","name":"vm-100-disk-1","snap":"-","device":"/dev/rbd0"}]"#;
        r.push_reply(Output::ok(mapped));
        assert_eq!(
            block_on(p.access("vm-100-disk-1", None)).unwrap(),
            VolumeAccess::BlockDevice("/dev/rbd0".into())
        );
        r.push_reply(Output::ok(mapped));
        block_on(p.deactivate_volume("vm-100-disk-1", None)).unwrap();
        let pre = "/usr/bin/rbd -p rbd --namespace n -n client.admin --client_mount_timeout 10 --rados_mon_op_timeout 10";
        assert_eq!(
            r.call_lines(),
            [
                format!("{pre} info vm-100-disk-1 --format json"),
                format!("{pre} showmapped --format json"),
                format!("{pre} map vm-100-disk-1"),
                format!("{pre} showmapped --format json"),
                format!("{pre} showmapped --format json"),
                "/usr/bin/rbd -p rbd -n client.admin --client_mount_timeout 10 --rados_mon_op_timeout 10 unmap /dev/rbd0".to_string(),
            ]
        );
    }

    #[test]
    fn feature_table_is_pves() {
        let (p, _) = plugin();
        let has = |f, v: &str, s| p.volume_has_feature(f, v, s).unwrap();
        assert!(has(Feature::Snapshot, "vm-100-disk-0", None));
        assert!(has(Feature::Snapshot, "vm-100-disk-0", Some("s")));
        assert!(has(Feature::Clone, "base-100-disk-0", None));
        assert!(has(Feature::Clone, "vm-100-disk-0", Some("s")));
        assert!(!has(Feature::Clone, "vm-100-disk-0", None));
        assert!(has(Feature::Copy, "vm-100-disk-0", Some("s")));
        assert!(has(Feature::Template, "vm-100-disk-0", None));
        assert!(!has(Feature::Replicate, "vm-100-disk-0", None));
        assert!(has(Feature::Rename, "vm-100-disk-0", None));
    }
}
