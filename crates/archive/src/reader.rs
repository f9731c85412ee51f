//! Streaming tar reader over `tar-core`'s sans-IO parser.
//!
//! Reads what GNU tar writes with PVE's flags — POSIX pax archives with
//! `SCHILY.acl.*`/`SCHILY.xattr.*` records and PAX sparse 1.0 members — and
//! also GNU-format archives (`L`/`K` long names, old GNU `S` sparse members)
//! and PAX sparse 0.0/0.1. PAX records are parsed by their length prefix, so
//! values with newlines (ACL text) or binary bytes (capabilities) are kept.
//!
//! Guarantees: the input is read sequentially and only as far as needed;
//! memory is bounded by the metadata limits ([`MAX_METADATA`] per member,
//! [`MAX_SPARSE_REGIONS`] map entries); a stream that ends before the
//! end-of-archive marker, or has a bad header checksum or malformed record,
//! fails with [`ArchiveError::Truncated`] / [`ArchiveError::Corrupt`] and
//! never panics (fuzzed: `fuzz/fuzz_targets/tar_reader.rs`).

use std::io::{self, BufRead, Read};

use tar_core::parse::{Limits, ParseEvent, ParsedEntry, Parser};
use tar_core::{EntryType, PaxExtensions};

use crate::error::{ArchiveError, Result};
use crate::header::{MemberKind, SparseRegion, padding};

/// Largest extended-header data (PAX records, long names) per member.
pub const MAX_METADATA: u32 = 4 * 1024 * 1024;
/// Largest sparse map accepted.
pub const MAX_SPARSE_REGIONS: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// Sparse layout of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sparse {
    /// Logical file size.
    pub real_size: u64,
    /// Data regions, in the order their bytes follow in the archive.
    pub regions: Vec<SparseRegion>,
}

/// One archive member's metadata, with all extensions applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// Name as stored (GNU.sparse.name / PAX path / long name / ustar).
    pub name: Vec<u8>,
    /// Member type; `None` for types we do not know (typeflag kept in `typeflag`).
    pub kind: Option<MemberKind>,
    /// Raw typeflag.
    pub typeflag: u8,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u64,
    /// Numeric group.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Sub-second part of the mtime (from the PAX record).
    pub mtime_nsec: u32,
    /// Content bytes stored in the archive (sparse: the data regions only).
    pub size: u64,
    /// Symlink or hard-link target.
    pub link_target: Option<Vec<u8>>,
    /// Device major/minor.
    pub device: (u32, u32),
    /// Sparse map, for sparse members.
    pub sparse: Option<Sparse>,
    /// `SCHILY.xattr.*` records: (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// `SCHILY.acl.access` text.
    pub acl_access: Option<String>,
    /// `SCHILY.acl.default` text.
    pub acl_default: Option<String>,
}

impl Entry {
    /// The name as lossy UTF-8, for messages.
    #[must_use]
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    fn from_parsed(p: &ParsedEntry<'_>, sparse: Option<Sparse>, offset: u64) -> Result<Entry> {
        let corrupt = |message: String| ArchiveError::Corrupt { offset, message };
        let kind = match p.entry_type {
            EntryType::Regular | EntryType::Continuous => Some(MemberKind::Regular),
            EntryType::Link => Some(MemberKind::HardLink),
            EntryType::Symlink => Some(MemberKind::Symlink),
            EntryType::Char => Some(MemberKind::CharDevice),
            EntryType::Block => Some(MemberKind::BlockDevice),
            EntryType::Directory => Some(MemberKind::Directory),
            EntryType::Fifo => Some(MemberKind::Fifo),
            EntryType::GnuSparse => Some(MemberKind::Regular),
            _ => None,
        };
        let mut e = Entry {
            name: p.path.to_vec(),
            kind,
            typeflag: p.entry_type.to_byte(),
            mode: p.mode,
            uid: p.uid,
            gid: p.gid,
            mtime: i64::try_from(p.mtime).map_err(|_| corrupt("mtime out of range".into()))?,
            mtime_nsec: 0,
            size: p.size,
            link_target: p.link_target.as_ref().map(|l| l.to_vec()),
            device: (p.dev_major.unwrap_or(0), p.dev_minor.unwrap_or(0)),
            sparse,
            xattrs: p
                .xattrs
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            acl_access: None,
            acl_default: None,
        };
        if let Some(pax) = p.pax {
            for rec in PaxExtensions::new(pax) {
                let rec = rec.map_err(|err| corrupt(format!("PAX record: {err}")))?;
                let text = || {
                    std::str::from_utf8(rec.value_bytes())
                        .map(str::to_owned)
                        .map_err(|_| corrupt(format!("non-UTF-8 {:?}", rec.key_bytes())))
                };
                match rec.key_bytes() {
                    b"SCHILY.acl.access" => e.acl_access = Some(text()?),
                    b"SCHILY.acl.default" => e.acl_default = Some(text()?),
                    b"mtime" => {
                        (e.mtime, e.mtime_nsec) = parse_pax_time(&text()?)
                            .ok_or_else(|| corrupt("bad PAX mtime".into()))?
                    }
                    _ => {}
                }
            }
        }
        Ok(e)
    }
}

/// Parse a PAX time value (`-?sec(.frac)?`) into seconds and nanoseconds
/// (negative values count backwards from the second: `-1.5` → (-2, 5e8)).
#[must_use]
pub fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nsec))
    }
}

/// Borrowing the input's own buffer ([`ArchiveReader::new_buffered`]):
/// its `fill_buf` and `consume`.
type Borrow<R> = (
    for<'a> fn(&'a mut R) -> io::Result<&'a [u8]>,
    fn(&mut R, usize),
);

fn fill_buf<R: BufRead>(r: &mut R) -> io::Result<&[u8]> {
    r.fill_buf()
}

fn consume_buf<R: BufRead>(r: &mut R, n: usize) {
    r.consume(n);
}

/// `Read::read` of a `BufRead` that keeps its bytes itself: a copy out of
/// its buffer (for the `Read` an [`ArchiveReader`] needs besides).
///
/// # Errors
/// `fill_buf`'s.
pub fn read_buffered<R: BufRead>(r: &mut R, out: &mut [u8]) -> io::Result<usize> {
    let b = r.fill_buf()?;
    let n = out.len().min(b.len());
    out[..n].copy_from_slice(&b[..n]);
    r.consume(n);
    Ok(n)
}

/// A streaming reader of tar members.
pub struct ArchiveReader<R: Read> {
    inner: R,
    /// For a `BufRead` input: member content is handed on from the input's
    /// buffer instead of being copied out of it.
    borrow: Option<Borrow<R>>,
    parser: Parser,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    /// Content bytes of the current member not yet consumed.
    remaining: u64,
    /// Padding after the current member's content.
    pad: u64,
    eof: bool,
    done: bool,
}

impl<R: Read> std::fmt::Debug for ArchiveReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveReader")
            .field("offset", &self.offset)
            .field("remaining", &self.remaining)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: Read> ArchiveReader<R> {
    /// A reader of the tar stream `inner` (already decompressed).
    pub fn new(inner: R) -> Self {
        let limits = Limits {
            max_metadata_size: MAX_METADATA,
            max_path_len: None,
            max_pending_entries: 16,
            max_sparse_entries: MAX_SPARSE_REGIONS,
        };
        ArchiveReader {
            inner,
            borrow: None,
            parser: Parser::new(limits),
            buf: Vec::new(),
            start: 0,
            end: 0,
            offset: 0,
            remaining: 0,
            pad: 0,
            eof: false,
            done: false,
        }
    }

    /// A reader of `inner` whose buffered bytes [`ArchiveReader::with_data`]
    /// hands on in place (a stream that already holds its data in memory
    /// saves copying every content byte once).
    pub fn new_buffered(inner: R) -> Self
    where
        R: BufRead,
    {
        let mut r = Self::new(inner);
        r.borrow = Some((fill_buf::<R>, consume_buf::<R>));
        r
    }

    /// Stream offset of the next unread byte.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Read more input so that at least `want` bytes are buffered; returns
    /// false at end of input.
    fn fill(&mut self, want: usize) -> Result<bool> {
        while self.end - self.start < want {
            if self.eof {
                return Ok(false);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let need = want.max(self.end + READ_CHUNK);
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ArchiveError::Stream(e)),
            }
        }
        Ok(true)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Skip `n` bytes of input.
    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<()> {
        while n > 0 {
            if self.start == self.end && !self.fill(1)? {
                return Err(ArchiveError::Truncated {
                    offset: self.offset,
                    what,
                });
            }
            let take = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.end - self.start);
            self.consume(take);
            n -= take as u64;
        }
        Ok(())
    }

    /// Skip what is left of the current member's content.
    ///
    /// # Errors
    /// Truncated input or a read error.
    pub fn skip_data(&mut self) -> Result<()> {
        let n = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.skip(n, "member content")
    }

    /// Read content of the current member; `Ok(0)` at its end.
    ///
    /// # Errors
    /// Truncated input or a read error.
    pub fn read_data(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.remaining == 0 || out.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(out.len());
        if self.start == self.end {
            // Large reads bypass the buffer.
            if want >= READ_CHUNK && !self.eof {
                let n = loop {
                    match self.inner.read(&mut out[..want]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(ArchiveError::Stream(e)),
                    }
                };
                if n == 0 {
                    self.eof = true;
                    return Err(ArchiveError::Truncated {
                        offset: self.offset,
                        what: "member content",
                    });
                }
                self.offset += n as u64;
                self.remaining -= n as u64;
                return Ok(n);
            }
            if !self.fill(1)? {
                return Err(ArchiveError::Truncated {
                    offset: self.offset,
                    what: "member content",
                });
            }
        }
        let n = want.min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.consume(n);
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Hand the next content bytes of the current member, at most `max`,
    /// to `f`; returns how many (0 at the end of the content). The bytes
    /// are passed in place when they are in this reader's buffer or, for
    /// [`ArchiveReader::new_buffered`], in the input's; otherwise they are
    /// read into `scratch` first (an empty `scratch` then reads nothing).
    /// After an error of `f` the stream stays in step: the bytes `f` got
    /// are not handed out again, and skipping the member skips the rest.
    ///
    /// # Errors
    /// Truncated input, a read error, or `f`'s error.
    pub fn with_data(
        &mut self,
        max: usize,
        scratch: &mut [u8],
        f: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<usize> {
        if self.remaining == 0 || max == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(max);
        if self.start < self.end {
            let n = want.min(self.end - self.start);
            f(&self.buf[self.start..self.start + n])?;
            self.consume(n);
            self.remaining -= n as u64;
            return Ok(n);
        }
        if let Some((fill, consume)) = self.borrow
            && !self.eof
        {
            let bytes = loop {
                match fill(&mut self.inner) {
                    Ok(b) => break b,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ArchiveError::Stream(e)),
                }
            };
            if bytes.is_empty() {
                self.eof = true;
                return Err(ArchiveError::Truncated {
                    offset: self.offset,
                    what: "member content",
                });
            }
            let n = want.min(bytes.len());
            f(&bytes[..n])?;
            consume(&mut self.inner, n);
            self.offset += n as u64;
            self.remaining -= n as u64;
            return Ok(n);
        }
        let take = want.min(scratch.len());
        let n = self.read_data(&mut scratch[..take])?;
        if n > 0 {
            f(&scratch[..n])?;
        }
        Ok(n)
    }

    /// Read the current member's whole content, failing if it is larger
    /// than `max` bytes.
    ///
    /// # Errors
    /// Too large, truncated input or a read error.
    pub fn read_data_to_vec(&mut self, max: u64) -> Result<Vec<u8>> {
        if self.remaining > max {
            return Err(ArchiveError::Corrupt {
                offset: self.offset,
                message: format!(
                    "member of {} bytes exceeds the limit of {max}",
                    self.remaining
                ),
            });
        }
        let mut v = vec![0u8; usize::try_from(self.remaining).unwrap_or(0)];
        let mut got = 0;
        while got < v.len() {
            got += self.read_data(&mut v[got..])?;
        }
        Ok(v)
    }

    /// Advance to the next member, skipping the rest of the current one.
    /// `Ok(None)` at the end-of-archive marker.
    ///
    /// # Errors
    /// Corrupt or truncated input, or a read error.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        self.skip_data()?;
        let mut want = 0usize;
        loop {
            if self.end - self.start < want && !self.fill(want)? {
                return Err(ArchiveError::Truncated {
                    offset: self.offset,
                    what: if self.start == self.end {
                        "end-of-archive marker missing"
                    } else {
                        "member header"
                    },
                });
            }
            let offset = self.offset;
            let event = self
                .parser
                .parse(&self.buf[self.start..self.end])
                .map_err(|e| ArchiveError::Corrupt {
                    offset,
                    message: e.to_string(),
                })?;
            let (consumed, entry) = match event {
                ParseEvent::NeedData { min_bytes } => {
                    want = min_bytes.max(self.end - self.start + 1);
                    continue;
                }
                ParseEvent::End { .. } => {
                    // Anything after the marker (record padding) is ignored,
                    // as GNU tar does.
                    self.done = true;
                    return Ok(None);
                }
                ParseEvent::GlobalExtensions { consumed, .. } => {
                    self.consume(consumed);
                    want = 0;
                    continue;
                }
                ParseEvent::Entry { consumed, entry } => {
                    (consumed, Entry::from_parsed(&entry, None, offset)?)
                }
                ParseEvent::SparseEntry {
                    consumed,
                    entry,
                    sparse_map,
                    real_size,
                } => {
                    let sparse = Sparse {
                        real_size,
                        regions: sparse_map
                            .iter()
                            .map(|s| SparseRegion {
                                offset: s.offset,
                                length: s.length,
                            })
                            .collect(),
                    };
                    (consumed, Entry::from_parsed(&entry, Some(sparse), offset)?)
                }
            };
            self.consume(consumed);
            self.remaining = entry.size;
            self.pad = padding(entry.size) as u64;
            if entry.kind == Some(MemberKind::Regular)
                && let Some(s) = &entry.sparse
            {
                validate_sparse(s, entry.size).map_err(|message| ArchiveError::Corrupt {
                    offset,
                    message: format!("member '{}': {message}", entry.name_lossy()),
                })?;
            }
            return Ok(Some(entry));
        }
    }
}

/// Regions must be ordered, non-overlapping, inside the file, and add up
/// to the stored size.
fn validate_sparse(s: &Sparse, stored: u64) -> std::result::Result<(), String> {
    let mut pos = 0u64;
    let mut sum = 0u64;
    for r in &s.regions {
        let end = r
            .offset
            .checked_add(r.length)
            .ok_or("sparse region overflows")?;
        if r.offset < pos || end > s.real_size {
            return Err("sparse map is unordered or exceeds the file size".into());
        }
        pos = end;
        sum = sum.checked_add(r.length).ok_or("sparse map overflows")?;
    }
    if sum != stored {
        return Err(format!(
            "sparse map covers {sum} bytes but {stored} are stored"
        ));
    }
    Ok(())
}

/// Content of the first regular-file member whose name satisfies `pred`,
/// reading the stream only up to it (for `pvesm extractconfig`, whose
/// pattern is `^\./etc/vzdump/(pct|vps)\.conf$`). Members larger than
/// `max_size` are an error.
///
/// # Errors
/// Corrupt or truncated input before the member is found, or a too large
/// member.
pub fn find_member<R: Read>(
    r: R,
    mut pred: impl FnMut(&[u8]) -> bool,
    max_size: u64,
) -> Result<Option<Vec<u8>>> {
    let mut rd = ArchiveReader::new(r);
    while let Some(e) = rd.next_entry()? {
        if e.kind == Some(MemberKind::Regular) && e.sparse.is_none() && pred(&e.name) {
            return rd.read_data_to_vec(max_size).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let cases = [
            ("1795867662.624504845", Some((1_795_867_662, 624_504_845))),
            ("12", Some((12, 0))),
            ("12.5", Some((12, 500_000_000))),
            ("-1.5", Some((-2, 500_000_000))),
            ("-3", Some((-3, 0))),
            ("1.1234567891", Some((1, 123_456_789))),
            ("", None),
            ("x", None),
            ("1.x", None),
            ("--1", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_pax_time(s), want, "{s:?}");
        }
    }

    /// A small archive with PAX records, a long name, a sparse member and a
    /// hard link, from our own encoder.
    fn sample_archive() -> Vec<u8> {
        use crate::header::{MemberHeader, encode, padding};
        let mut out = Vec::new();
        let xattrs = vec![(b"user.a".to_vec(), b"x\ny".to_vec())];
        let regions = [
            SparseRegion {
                offset: 4096,
                length: 5,
            },
            SparseRegion {
                offset: 9000,
                length: 0,
            },
        ];
        let long = format!("./{}", "n".repeat(150));
        let members: Vec<(MemberHeader<'_>, &[u8])> = vec![
            (
                MemberHeader {
                    name: long.as_bytes(),
                    kind: MemberKind::Regular,
                    mode: 0o4755,
                    uid: 3_000_000,
                    gid: 7,
                    mtime: 1_700_000_000,
                    mtime_nsec: 5,
                    size: 3,
                    link: None,
                    device: (0, 0),
                    sparse: None,
                    acl_access: Some(
                        "user::rw-\nuser:5:r--\ngroup::r--\nmask::r--\nother::---\n".into(),
                    ),
                    acl_default: None,
                    xattrs: &xattrs,
                },
                b"abc",
            ),
            (
                MemberHeader {
                    name: b"./sparse",
                    kind: MemberKind::Regular,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime: 1,
                    mtime_nsec: 0,
                    size: 5,
                    link: None,
                    device: (0, 0),
                    sparse: Some((9000, &regions)),
                    acl_access: None,
                    acl_default: None,
                    xattrs: &[],
                },
                b"hello",
            ),
        ];
        for (h, data) in &members {
            out.extend(encode(h).unwrap());
            out.extend_from_slice(data);
            out.resize(out.len() + padding(data.len() as u64), 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn drain(data: &[u8]) -> Result<Vec<Entry>> {
        let mut rd = ArchiveReader::new(data);
        let mut v = Vec::new();
        let mut buf = [0u8; 100];
        while let Some(e) = rd.next_entry()? {
            while rd.read_data(&mut buf)? > 0 {}
            v.push(e);
        }
        Ok(v)
    }

    #[test]
    fn sample_parses_with_all_metadata() {
        let entries = drain(&sample_archive()).unwrap();
        assert_eq!(entries.len(), 2);
        let e = &entries[0];
        assert_eq!(e.name.len(), 152);
        assert_eq!((e.mode, e.uid, e.mtime_nsec), (0o4755, 3_000_000, 5));
        assert_eq!(e.xattrs, vec![(b"user.a".to_vec(), b"x\ny".to_vec())]);
        assert!(e.acl_access.as_deref().unwrap().contains("user:5:r--"));
        let s = entries[1].sparse.as_ref().unwrap();
        assert_eq!(
            (s.real_size, s.regions.len(), entries[1].name.as_slice()),
            (9000, 2, &b"./sparse"[..])
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Mutated and truncated archives never panic.
        #[test]
        fn mutations_never_panic(
            flips in proptest::collection::vec((0usize..6000, proptest::prelude::any::<u8>()), 0..8),
            cut in 0usize..6000,
        ) {
            let mut a = sample_archive();
            for (pos, val) in flips {
                if pos < a.len() {
                    a[pos] = val;
                }
            }
            a.truncate(cut.min(a.len()));
            let _ = drain(&a);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let _ = drain(&data);
        }
    }

    #[test]
    fn sparse_validation() {
        let r = |offset, length| SparseRegion { offset, length };
        let ok = Sparse {
            real_size: 100,
            regions: vec![r(0, 10), r(50, 10), r(100, 0)],
        };
        assert!(validate_sparse(&ok, 20).is_ok());
        assert!(validate_sparse(&ok, 21).is_err());
        let overlap = Sparse {
            real_size: 100,
            regions: vec![r(0, 10), r(5, 10)],
        };
        assert!(validate_sparse(&overlap, 20).is_err());
        let beyond = Sparse {
            real_size: 100,
            regions: vec![r(95, 10)],
        };
        assert!(validate_sparse(&beyond, 10).is_err());
        let wrap = Sparse {
            real_size: u64::MAX,
            regions: vec![r(u64::MAX, 2)],
        };
        assert!(validate_sparse(&wrap, 2).is_err());
    }
}
