//! Reading file data straight from the image file of a loop-mounted file system.
//!
//! A file read through a loop-mounted image costs two copies per byte: the loop driver
//! copies the image file's pages into the loop device's page cache, then `read` copies
//! them out. In a backup of a changed container most of the CPU time went to the first
//! copy. When the caller vouches that the file system is mounted read-only and that
//! everything it shows is on the image (cleanly unmounted before: no journal to replay),
//! a file's data can be read from the image file at the places its extent map
//! (`FS_IOC_FIEMAP`) gives instead: one copy, from the image file's page cache.
//!
//! [`DirectImage::new`] checks that the mount is read-only and a loop device backed by
//! exactly that image file, from its start and without a size limit. Files whose map has
//! anything but plain, unwritten (read as zeros) or shared extents — inline, encoded,
//! unaligned or delayed data — are read through the mount as before, and so are
//! encrypted, compressed and verity files (by their `statx` attributes) and files of other
//! file systems (mount points below the tree).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use fiemap::FiemapExtentFlags;

/// The image file behind a loop-mounted file system (cheap to clone: the walker and the
/// read-ahead thread share it).
#[derive(Debug, Clone)]
pub struct DirectImage {
    image: std::sync::Arc<File>,
    size: u64,
    /// Device number of the mounted file system.
    dev: u64,
}

/// One extent of a file's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    logical: u64,
    physical: u64,
    length: u64,
    /// Allocated but never written: reads as zeros.
    unwritten: bool,
}

/// Where a file's data lies in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    extents: Vec<Extent>,
}

impl ExtentMap {
    /// Number of extents.
    #[must_use]
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// No extents (the file is empty or one hole).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }
}

/// The loop device behind device number `dev`: (backing file's dev and inode, offset,
/// size limit).
fn loop_backing(dev: u64) -> Option<((u64, u64), u64, u64)> {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = format!("/sys/dev/block/{major}:{minor}/loop");
    let read = |f: &str| std::fs::read_to_string(format!("{sys}/{f}")).ok();
    let backing = read("backing_file")?;
    let meta = std::fs::metadata(backing.trim_end_matches('\n')).ok()?;
    let num = |f: &str| read(f)?.trim().parse::<u64>().ok();
    Some(((meta.dev(), meta.ino()), num("offset")?, num("sizelimit")?))
}

impl DirectImage {
    /// The image file `image` behind the file system mounted at `mount`; `None` unless
    /// that mount is read-only and a loop device backed by this very file, from its start
    /// and without a size limit. The caller vouches that the file system was cleanly
    /// unmounted before it was mounted (its journal holds nothing the image lacks) and
    /// that nothing writes the image while files are read.
    #[must_use]
    pub fn new(image: File, mount: &Path) -> Option<DirectImage> {
        let vfs = rustix::fs::statvfs(mount).ok()?;
        if !vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
            return None;
        }
        let dev = std::fs::metadata(mount).ok()?.dev();
        let meta = image.metadata().ok()?;
        let (backing, offset, limit) = loop_backing(dev)?;
        if backing != (meta.dev(), meta.ino()) || offset != 0 || limit != 0 {
            return None;
        }
        Some(DirectImage {
            image: std::sync::Arc::new(image),
            size: meta.len(),
            dev,
        })
    }

    /// The extent map of `file` (of `size` bytes, on the mounted file system), if all
    /// of its data can be read from the image. Encrypted, compressed and verity files are
    /// read through the mount: their bytes in the image are not what a read returns (or
    /// a read checks them), and FIEMAP does not say so for every file system.
    #[must_use]
    pub fn map(&self, file: &File, size: u64) -> Option<ExtentMap> {
        if file.metadata().ok()?.dev() != self.dev {
            return None;
        }
        let sx = rustix::fs::statx(
            file,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::BASIC_STATS,
        )
        .ok()?;
        let special = rustix::fs::StatxAttributes::ENCRYPTED
            | rustix::fs::StatxAttributes::COMPRESSED
            | rustix::fs::StatxAttributes::VERITY;
        // Attributes the file system does not report cannot be ruled out.
        if !sx.stx_attributes_mask.contains(special) || sx.stx_attributes.intersects(special) {
            return None;
        }
        let known = FiemapExtentFlags::LAST
            | FiemapExtentFlags::UNWRITTEN
            | FiemapExtentFlags::MERGED
            | FiemapExtentFlags::SHARED;
        let mut extents: Vec<Extent> = Vec::new();
        for e in fiemap::Fiemap::new(file) {
            let e = e.ok()?;
            if e.fe_logical >= size {
                break;
            }
            let end = e.fe_physical.checked_add(e.fe_length)?;
            e.fe_logical.checked_add(e.fe_length)?;
            if !known.contains(e.fe_flags)
                || end > self.size
                || e.fe_length == 0
                || extents
                    .last()
                    .is_some_and(|p| p.logical + p.length > e.fe_logical)
            {
                return None;
            }
            extents.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                unwritten: e.fe_flags.contains(FiemapExtentFlags::UNWRITTEN),
            });
        }
        Some(ExtentMap { extents })
    }

    /// Read the data of `map` at `off` into `buf` (holes and unwritten extents as
    /// zeros); like `pread`, fewer bytes than asked may come.
    ///
    /// # Errors
    /// Read errors on the image.
    pub fn read_at(&self, map: &ExtentMap, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let i = map.extents.partition_point(|e| e.logical + e.length <= off);
        match map.extents.get(i) {
            // In an extent.
            Some(e) if e.logical <= off => {
                let n = usize::try_from(e.logical + e.length - off)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                if e.unwritten {
                    buf[..n].fill(0);
                    Ok(n)
                } else {
                    self.image
                        .read_at(&mut buf[..n], e.physical + (off - e.logical))
                }
            }
            // In a hole (up to the next extent, or past the last).
            next => {
                let n = next
                    .map_or(usize::MAX, |e| {
                        usize::try_from(e.logical - off).unwrap_or(usize::MAX)
                    })
                    .min(buf.len());
                buf[..n].fill(0);
                Ok(n)
            }
        }
    }

    /// Ask the kernel to read `len` bytes of `map` at `off` ahead (`POSIX_FADV_WILLNEED`
    /// on the image).
    pub fn advise(&self, map: &ExtentMap, off: u64, len: u64) {
        let end = off.saturating_add(len);
        let first = map.extents.partition_point(|e| e.logical + e.length <= off);
        for e in map.extents[first..].iter().take_while(|e| e.logical < end) {
            let (s, t) = (e.logical.max(off), (e.logical + e.length).min(end));
            if s < t && !e.unwritten {
                let _ = rustix::fs::fadvise(
                    &self.image,
                    e.physical + (s - e.logical),
                    std::num::NonZeroU64::new(t - s),
                    rustix::fs::Advice::WillNeed,
                );
            }
        }
    }
}
