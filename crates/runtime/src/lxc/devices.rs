//! `devN` device passthrough.
//!
//! PVE's start creates, for each `devN: <path>[,mode=0NNN][,uid=N][,gid=N][,deny-write=1]`,
//! a device node with the host device's type and number in a `passthrough` directory of the
//! container, owned by `uid`/`gid` (container ids mapped to the host, default root) with
//! `mode` (default `0660`), and its autodev hook bind-mounts that node to `<path>` inside the
//! container, which the devices cgroup allows. vzkit does the same without a hook: the nodes
//! are made before `lxc-start` in `<ct_dir>/passthrough/<path>`, and the generated
//! configuration bind-mounts them (`lxc.mount.entry … bind,create=file`) and allows them
//! (`lxc.cgroup.devices.allow = b|c MAJ:MIN rw`). With `deny-write=1` the cgroup allows
//! reads only (`r`, plus a `w` deny for devices LXC's defaults allow, such as `/dev/full`),
//! so the kernel refuses every write; a read-only bind mount would not, as it does not
//! apply to device nodes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode};

use crate::conf::CtConfig;
use crate::conf::idmap::IdKind;
use crate::error::{Result, RuntimeError};

/// A host device node, as `devN` passes it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNode {
    /// Block (`true`) or character device.
    pub block: bool,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DevNode {
    /// `b` or `c`, as the devices cgroup and `mknod` name the type.
    #[must_use]
    pub fn type_char(&self) -> char {
        if self.block { 'b' } else { 'c' }
    }
}

/// Reads the type and number of the device node at `path`.
///
/// # Errors
/// When it does not exist or is no device.
pub fn probe(path: &str) -> Result<DevNode> {
    let st = rustix::fs::stat(path)
        .map_err(|e| RuntimeError::Invalid(format!("device '{path}' - {e}")))?;
    let block = match FileType::from_raw_mode(st.st_mode) {
        FileType::BlockDevice => true,
        FileType::CharacterDevice => false,
        _ => {
            return Err(RuntimeError::Invalid(format!(
                "'{path}' is not a block or character device"
            )));
        }
    };
    Ok(DevNode {
        block,
        major: rustix::fs::major(st.st_rdev),
        minor: rustix::fs::minor(st.st_rdev),
    })
}

/// The host devices of every `devN` of `conf`, by path.
///
/// # Errors
/// A `devN` without a path, or a path that is no device.
pub fn probe_all(conf: &CtConfig) -> Result<BTreeMap<String, DevNode>> {
    let mut out = BTreeMap::new();
    for (key, dev) in conf.main.devs()? {
        let path = dev.path.ok_or_else(|| {
            RuntimeError::Invalid(format!("Path is not defined for passthrough device {key}"))
        })?;
        let node = probe(&path)?;
        out.insert(path, node);
    }
    Ok(out)
}

/// Where the node of the container path `path` (`/dev/ttyUSB0`) is made.
#[must_use]
pub fn node_path(ct_dir: &Path, path: &str) -> PathBuf {
    ct_dir
        .join("passthrough")
        .join(path.trim_start_matches('/'))
}

/// Makes the nodes of every `devN` below `<ct_dir>/passthrough` (removed first), with the
/// configured mode and owners (container ids mapped to the host).
///
/// # Errors
/// Unmapped owners, bad modes, or failing system calls.
pub fn make_nodes(ct_dir: &Path, conf: &CtConfig, nodes: &BTreeMap<String, DevNode>) -> Result<()> {
    let dir = ct_dir.join("passthrough");
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RuntimeError::io("unable to remove", &dir, e)),
    }
    let map = conf.main.id_map()?;
    for (key, dev) in conf.main.devs()? {
        let Some(path) = dev.path else { continue };
        let node = nodes
            .get(&path)
            .ok_or_else(|| RuntimeError::Invalid(format!("{key}: device '{path}' not probed")))?;
        let target = node_path(ct_dir, &path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| RuntimeError::io("unable to create", parent, e))?;
        }
        let kind = if node.block {
            FileType::BlockDevice
        } else {
            FileType::CharacterDevice
        };
        let dev_t = rustix::fs::makedev(node.major, node.minor);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &target,
            kind,
            Mode::from_raw_mode(0o600),
            dev_t,
        )
        .map_err(|e| RuntimeError::io("unable to create device node", &target, e.into()))?;
        let mode = match &dev.mode {
            Some(m) => u32::from_str_radix(m, 8)
                .map_err(|_| RuntimeError::Invalid(format!("{key}: invalid mode '{m}'")))?,
            None => 0o660,
        };
        // chmod after mknod: the umask does not apply.
        rustix::fs::chmod(&target, Mode::from_raw_mode(mode))
            .map_err(|e| RuntimeError::io("unable to chmod", &target, e.into()))?;
        let host = |kind, id: u32| {
            map.map_to_host(kind, u64::from(id))
                .and_then(|h| u32::try_from(h).ok())
                .ok_or_else(|| RuntimeError::Invalid(format!("{key}: id {id} is not mapped")))
        };
        let uid = host(IdKind::User, dev.uid.unwrap_or(0))?;
        let gid = host(IdKind::Group, dev.gid.unwrap_or(0))?;
        rustix::fs::chown(
            &target,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| RuntimeError::io("unable to chown", &target, e.into()))?;
    }
    Ok(())
}
