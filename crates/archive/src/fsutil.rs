//! Small file-system helpers over rustix: stat conversion and xattr access
//! through a file descriptor or, for special files that must not be opened,
//! through `/proc/self/fd/<dirfd>/<name>` with the non-following `l*` calls.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{FileType, Stat, XattrFlags};

/// The stat fields we use, in fixed-width types on every architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
}

impl Meta {
    #[allow(
        clippy::unnecessary_cast,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    pub(crate) fn from_stat(st: &Stat) -> Meta {
        Meta {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
            nlink: st.st_nlink as u64,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            rdev: st.st_rdev as u64,
            size: st.st_size.max(0) as u64,
            blocks: st.st_blocks.max(0) as u64,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as u32,
            ctime: st.st_ctime as i64,
            ctime_nsec: st.st_ctime_nsec as u32,
        }
    }

    pub(crate) fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }
}

/// Path of `name` in the directory `dirfd` through procfs.
pub(crate) fn proc_path(dirfd: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dirfd.as_raw_fd()));
    p.push(OsStr::from_bytes(name));
    p
}

/// Where xattrs are read from or written to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum XattrTarget<'a> {
    /// An open regular file or directory.
    Fd(BorrowedFd<'a>),
    /// A path whose last component is not followed.
    Path(&'a std::path::Path),
}

/// xattr names and values are at most 64 KiB (`XATTR_LIST_MAX`, `XATTR_SIZE_MAX`).
const XATTR_MAX: usize = 64 * 1024;

fn unsupported(e: &rustix::io::Errno) -> bool {
    *e == rustix::io::Errno::NOTSUP || *e == rustix::io::Errno::OPNOTSUPP
}

impl XattrTarget<'_> {
    /// The value of `name`, `None` if absent or xattrs are unsupported.
    pub(crate) fn get(&self, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; XATTR_MAX];
        let name = OsStr::from_bytes(name);
        let res = match *self {
            XattrTarget::Fd(fd) => rustix::fs::fgetxattr(fd, name, &mut buf[..]),
            XattrTarget::Path(p) => rustix::fs::lgetxattr(p, name, &mut buf[..]),
        };
        match res {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e == rustix::io::Errno::NODATA || unsupported(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// All xattr names, empty if unsupported.
    pub(crate) fn list(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut buf = vec![0u8; XATTR_MAX];
        let res = match *self {
            XattrTarget::Fd(fd) => rustix::fs::flistxattr(fd, &mut buf[..]),
            XattrTarget::Path(p) => rustix::fs::llistxattr(p, &mut buf[..]),
        };
        match res {
            Ok(n) => Ok(buf[..n]
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect()),
            Err(e) if unsupported(&e) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Set `name` to `value`.
    pub(crate) fn set(&self, name: &[u8], value: &[u8]) -> io::Result<()> {
        let name = OsStr::from_bytes(name);
        match *self {
            XattrTarget::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
            XattrTarget::Path(p) => rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()),
        }
        .map_err(Into::into)
    }
}
