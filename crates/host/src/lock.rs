//! Advisory file locks (`flock`), compatible with PVE's lock files.
//!
//! A lock is held while the returned [`FileLock`] lives; dropping it (or the process dying)
//! releases it, so a crash can never leave a lock file held.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Somebody else held it for the whole timeout.
    #[error("can't lock file '{}' - got timeout", .0.display())]
    Timeout(PathBuf),
    /// The lock file could not be opened.
    #[error("can't open lock file '{}' - {}", .0.display(), .1)]
    Io(PathBuf, #[source] std::io::Error),
}

/// A held `flock` on a file.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Takes an exclusive (or shared) lock on `path`, creating the file and its parent
    /// directories, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`LockError::Timeout`] if the lock stayed busy; [`LockError::Io`] if the file cannot be
    /// opened.
    pub fn acquire(path: &Path, timeout: Duration, shared: bool) -> Result<Self, LockError> {
        let io = |e| LockError::Io(path.to_path_buf(), e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let deadline = Instant::now() + timeout;
        loop {
            let res = if shared {
                file.try_lock_shared()
            } else {
                file.try_lock()
            };
            match res {
                Ok(()) => {
                    return Ok(Self {
                        _file: file,
                        path: path.to_path_buf(),
                    });
                }
                Err(TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(LockError::Timeout(path.to_path_buf()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }

    /// The locked file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_exclusive_lock_times_out_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.lock");
        let first = FileLock::acquire(&p, Duration::ZERO, false).unwrap();
        let err = FileLock::acquire(&p, Duration::from_millis(50), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("can't lock file '{}' - got timeout", p.display())
        );
        drop(first);
        FileLock::acquire(&p, Duration::ZERO, false).unwrap();
    }

    #[test]
    fn shared_locks_coexist_but_exclude_writers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.lock");
        let a = FileLock::acquire(&p, Duration::ZERO, true).unwrap();
        let _b = FileLock::acquire(&p, Duration::ZERO, true).unwrap();
        assert!(FileLock::acquire(&p, Duration::ZERO, false).is_err());
        drop(a);
    }
}
