//! What a running backup has changed on the host, written down so that a run killed with
//! SIGKILL (or a crash) can be cleaned up by the next job.
//!
//! PVE leaves such state behind for the administrator (`lock: backup`, a mounted
//! `/mnt/vzsnap0`, a `.dat` file, a `vzdump` snapshot). vzkit writes one small JSON file per
//! guest being backed up (`/var/lib/vzkit/vzdump/<vmid>.json` below the root) before each
//! change: temporary archive and directory, mount targets, the `lock: backup` it set, the
//! `vzdump` snapshot it made. A finished task (successful or not) removes it.
//!
//! A new job takes the global lock first, so any journal it then finds belongs to a job that
//! no longer runs. [`crate::job`] undoes what the journal lists: unmounts, deletes the
//! temporary files, removes the `vzdump` snapshot, removes a `backup` lock only if that job set
//! it, and copies the dead task's log beside where its archive would have been.
//! A `lock: backup` that no journal claims (set by hand, or by another tool) is left alone.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vzkit_host::paths::Layout;

use crate::error::{Error, Result};

/// The journal directory.
#[must_use]
pub fn journal_dir(layout: &Layout) -> PathBuf {
    layout.join("/var/lib/vzkit/vzdump")
}

/// What one task has changed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    /// The backing-up process.
    pub pid: u32,
    /// The guest.
    pub vmid: u32,
    /// This task set `lock: backup`.
    pub lock_set: bool,
    /// The temporary archive (`.dat`).
    pub tmptar: Option<PathBuf>,
    /// The temporary directory.
    pub tmpdir: Option<PathBuf>,
    /// Mount targets, in mount order.
    pub mounts: Vec<PathBuf>,
    /// Directories created for mounts (removed after unmounting).
    pub mount_dirs: Vec<PathBuf>,
    /// This task created the `vzdump` snapshot.
    pub snapshot: bool,
    /// The task log (`/var/log/vzdump/lxc-<vmid>.log`).
    pub tmplog: Option<PathBuf>,
    /// Where the task log is copied to.
    pub logfile: Option<PathBuf>,
}

/// An open journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The recorded state.
    pub state: TaskState,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::msg(format!("unable to {what} '{}' - {e}", path.display()))
}

impl Journal {
    /// Start the journal of `vmid`'s task.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn create(layout: &Layout, vmid: u32) -> Result<Self> {
        let dir = journal_dir(layout);
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create directory", &dir, e))?;
        let mut j = Journal {
            path: dir.join(format!("{vmid}.json")),
            state: TaskState {
                pid: std::process::id(),
                vmid,
                ..TaskState::default()
            },
        };
        j.save()?;
        Ok(j)
    }

    /// Change the state and write it down (atomically: temporary file, fsync, rename).
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn update(&mut self, f: impl FnOnce(&mut TaskState)) -> Result<()> {
        f(&mut self.state);
        self.save()
    }

    fn save(&mut self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| Error::msg(format!("unable to encode task state - {e}")))?;
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        res.map_err(|e| io_err("write", &self.path, e))
    }

    /// The task is over: forget it.
    ///
    /// # Errors
    /// When the file cannot be removed.
    pub fn remove(self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err("remove", &self.path, e))
            }
            _ => Ok(()),
        }
    }
}

/// Journals left behind by earlier jobs: `(file, state)`, by vmid. Unreadable files are
/// reported, not skipped.
///
/// # Errors
/// When the directory or a journal cannot be read or parsed.
pub fn leftovers(layout: &Layout) -> Result<Vec<(PathBuf, TaskState)>> {
    let dir = journal_dir(layout);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", &dir, e)),
    };
    let mut res = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| io_err("read", &dir, e))?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read(&path).map_err(|e| io_err("read", &path, e))?;
        let state: TaskState = serde_json::from_slice(&text)
            .map_err(|e| Error::msg(format!("unable to parse '{}' - {e}", path.display())))?;
        res.push((path, state));
    }
    res.sort_by_key(|(_, s)| s.vmid);
    Ok(res)
}

/// Forget a leftover journal after cleaning up.
///
/// # Errors
/// When the file cannot be removed.
pub fn forget(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_update_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let mut j = Journal::create(&layout, 100).unwrap();
        j.update(|s| {
            s.lock_set = true;
            s.mounts.push("/mnt/vzsnap0".into());
        })
        .unwrap();
        let left = leftovers(&layout).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.vmid, 100);
        assert!(left[0].1.lock_set);
        assert_eq!(left[0].1.mounts, [PathBuf::from("/mnt/vzsnap0")]);
        j.remove().unwrap();
        assert!(leftovers(&layout).unwrap().is_empty());
        std::fs::write(journal_dir(&layout).join("7.json"), b"{").unwrap();
        assert!(leftovers(&layout).is_err());
    }
}
