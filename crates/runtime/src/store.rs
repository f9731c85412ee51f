//! Container configs on disk (`/etc/pve/lxc/<vmid>.conf` under the relocatable root) and
//! their locks.
//!
//! Two kinds of lock, as in PVE: the short-lived config flock
//! (`/run/lock/lxc/pve-config-<vmid>.lock`, held while a config is read-modified-written) and
//! the `lock:` property inside the config, which marks long operations (`backup`, `create`,
//! `mounted`, …) and makes other operations refuse with "CT is locked (<lock>)". A config
//! write is atomic (temporary file, fsync, rename), so a crash never leaves half a config.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use vzkit_host::lock::FileLock;
use vzkit_host::paths::Layout;

use crate::conf::{CtConfig, Lock};
use crate::error::{Result, RuntimeError};

/// How long to wait for the config flock (PVE: 10 s).
const CONFIG_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads and writes container configs below a [`Layout`].
#[derive(Debug, Clone)]
pub struct CtStore {
    layout: Layout,
}

impl CtStore {
    /// A store over `layout`.
    #[must_use]
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }

    /// The layout.
    #[must_use]
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The config path of `vmid`.
    #[must_use]
    pub fn conf_path(&self, vmid: u32) -> PathBuf {
        self.layout.ct_conf(vmid)
    }

    /// Whether a config for `vmid` exists.
    #[must_use]
    pub fn exists(&self, vmid: u32) -> bool {
        self.conf_path(vmid).exists()
    }

    /// Takes the config flock of `vmid`.
    ///
    /// # Errors
    /// On timeout ("can't lock file … - got timeout").
    pub fn lock(&self, vmid: u32) -> Result<FileLock> {
        FileLock::acquire(&self.layout.ct_lock(vmid), CONFIG_LOCK_TIMEOUT, false)
            .map_err(|e| RuntimeError::Failed(e.to_string()))
    }

    /// Loads the config of `vmid`; parser warnings are returned alongside.
    ///
    /// # Errors
    /// "Configuration file '…' does not exist", read and parse errors.
    pub fn load_with_warnings(&self, vmid: u32) -> Result<(CtConfig, Vec<String>)> {
        let path = self.conf_path(vmid);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound(format!(
                    "Configuration file '{}' does not exist",
                    path.display()
                )));
            }
            Err(e) => return Err(RuntimeError::io("unable to read", &path, e)),
        };
        Ok(CtConfig::parse(vmid, &text)?)
    }

    /// Loads the config of `vmid`.
    ///
    /// # Errors
    /// As [`CtStore::load_with_warnings`].
    pub fn load(&self, vmid: u32) -> Result<CtConfig> {
        Ok(self.load_with_warnings(vmid)?.0)
    }

    /// Writes the config of `vmid` atomically.
    ///
    /// # Errors
    /// Formatting or I/O errors; the old file is untouched then.
    pub fn write(&self, vmid: u32, conf: &CtConfig) -> Result<()> {
        let text = conf.write()?;
        let path = self.conf_path(vmid);
        let dir = self.layout.lxc_conf_dir();
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("mkdir", &dir, e))?;
        let tmp = dir.join(format!(".{vmid}.conf.tmp.{}", std::process::id()));
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(RuntimeError::io("unable to write", &path, e));
        }
        Ok(())
    }

    /// Creates the config of a new container; refuses an existing one.
    ///
    /// # Errors
    /// "CT <vmid> already exists" or write errors.
    pub fn create(&self, vmid: u32, conf: &CtConfig) -> Result<()> {
        let _lock = self.lock(vmid)?;
        if self.exists(vmid) {
            return Err(RuntimeError::Exists(format!("CT {vmid} already exists")));
        }
        self.write(vmid, conf)
    }

    /// Removes the config of `vmid`.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub fn remove(&self, vmid: u32) -> Result<()> {
        let path = self.conf_path(vmid);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::io("unable to remove", &path, e)),
        }
    }

    /// The vmids that have a config, ascending.
    ///
    /// # Errors
    /// When the config directory cannot be read.
    pub fn list(&self) -> Result<Vec<u32>> {
        let dir = self.layout.lxc_conf_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io("unable to read", &dir, e)),
        };
        let mut ids = Vec::new();
        for e in entries {
            let e = e.map_err(|err| RuntimeError::io("unable to read", &dir, err))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_suffix(".conf")
                .and_then(|s| s.parse::<u32>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Under the config flock: loads, lets `f` change the config, and writes it back if `f`
    /// succeeds. Nothing is written when `f` fails.
    ///
    /// # Errors
    /// Lock, load, `f`'s and write errors.
    pub fn update<T>(&self, vmid: u32, f: impl FnOnce(&mut CtConfig) -> Result<T>) -> Result<T> {
        let _lock = self.lock(vmid)?;
        let mut conf = self.load(vmid)?;
        let res = f(&mut conf)?;
        self.write(vmid, &conf)?;
        Ok(res)
    }

    /// Sets the `lock:` property; fails with "CT is locked (<lock>)" if any is set.
    ///
    /// # Errors
    /// As described, plus lock/load/write errors.
    pub fn set_lock(&self, vmid: u32, lock: Lock) -> Result<()> {
        self.update(vmid, |conf| {
            conf.check_lock()?;
            conf.main.set_lock(Some(lock));
            Ok(())
        })
    }

    /// Removes the `lock:` property; with `expected`, only if it is that lock (PVE's
    /// messages otherwise).
    ///
    /// # Errors
    /// "no lock found trying to remove '<lock>' lock", "found lock 'A' trying to remove 'B'
    /// lock", and lock/load/write errors.
    pub fn remove_lock(&self, vmid: u32, expected: Option<Lock>) -> Result<()> {
        self.update(vmid, |conf| {
            let have = conf.get("lock").map(str::to_string);
            let want = expected.map(Lock::as_str);
            match (have.as_deref(), want) {
                (None, Some(want)) => {
                    return Err(RuntimeError::Failed(format!(
                        "no lock found trying to remove '{want}' lock"
                    )));
                }
                (None, None) => {
                    return Err(RuntimeError::Failed(
                        "no lock found trying to remove any lock".into(),
                    ));
                }
                (Some(have), Some(want)) if have != want => {
                    return Err(RuntimeError::Failed(format!(
                        "found lock '{have}' trying to remove '{want}' lock"
                    )));
                }
                _ => {}
            }
            conf.main.set_lock(None);
            Ok(())
        })
    }
}
