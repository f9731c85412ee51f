//! The catalog of a snapshot: every member of the tar stream the snapshot
//! stands for, in stream order, with its metadata (as the tar header stores
//! it), the [`StatKey`] of each member read from a tree (for change detection) and the
//! chunk list of its data. Stored zstd-compressed and streamed, so memory
//! does not grow with the number of files.
//!
//! Record format (little endian): `u32 length` then the payload; a length
//! of 0 ends the catalog. Payload: `u8 kind`, `u32 tree` (index of the
//! source tree; `u32::MAX` for data members such as the config), `bytes
//! name`, `u32 mode`, `u64 uid`, `u64 gid`, `i64 mtime`, `u32 mtime_nsec`,
//! `u64 size`, `opt bytes link`, `u32 major`, `u32 minor`, `opt sparse`
//! (`u64 real size`, `u32 n`, n × (`u64 offset`, `u64 length`)), `opt bytes
//! acl_access`, `opt bytes acl_default`, `u32 n` × (`bytes name`, `bytes
//! value`) xattrs, `u8 flags` (1: stat key present, 2: key is racy, 4:
//! chunk references carry slices, 8: chunk references carry checks), the
//! stat key (`u64 dev, ino, size`, `i64 mtime_ns, ctime_ns`, `u32 mode,
//! uid, gid`) if present, `u32 n` × (`[u8; 32] digest`, `u32 length`, with
//! flag 4 also `u32 offset`, `u32 used`, with flag 8 also `u64 check`)
//! chunks. `bytes` is `u32 length` + data, `opt` is `u8 0|1` + value.
//! Catalogs written before checks existed lack flag 8 and read with checks
//! of 0; a record with other flags (written by a later version) is refused.
//!
//! A member's data is the concatenation of its chunk references' slices:
//! bytes `offset..offset + used` of each chunk. Large files own their
//! chunks (whole slices); small files are packed together, several to a
//! chunk (see [`crate::backup`]).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vzkit_archive::header::{self, MemberHeader};
use vzkit_archive::{MemberKind, SparseRegion, StatKey};

use crate::error::{Error, Result};

/// A chunk reference: blake3 digest of the uncompressed data, its length,
/// the slice of it that belongs to the member, and its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// blake3 of the uncompressed chunk.
    pub digest: [u8; 32],
    /// Uncompressed length of the whole chunk.
    pub len: u32,
    /// Start of the member's bytes in the chunk.
    pub offset: u32,
    /// Number of the member's bytes in the chunk.
    pub used: u32,
    /// [`check_of`] the uncompressed chunk, recorded when it was backed up;
    /// 0 if not recorded (catalogs of older versions). Reading a chunk for
    /// a restore compares its data with this instead of re-hashing it with
    /// blake3 (see [`crate::store::Store::read_chunk_for`]).
    pub check: u64,
}

/// The check of chunk data: its 64-bit xxh3. A chunk read back for a
/// restore must match the check its catalog recorded: damage (a flipped
/// byte, a chunk file holding other data) goes unnoticed with a
/// probability of 2^-64, for a tenth of the CPU of blake3. It is no
/// cryptographic hash; against damage it is stronger than the 32-bit
/// checksum of a `.tar.zst`, and against someone who can write to the
/// store a cryptographic one would not help either: the catalogs and
/// manifests are in the store as well, unsigned. `verify` re-hashes every
/// chunk with blake3 and compares the checks the catalog records.
#[must_use]
pub fn check_of(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

impl ChunkRef {
    /// A reference to all of a chunk.
    #[must_use]
    pub fn whole(digest: [u8; 32], len: u32) -> ChunkRef {
        ChunkRef {
            digest,
            len,
            offset: 0,
            used: len,
            check: 0,
        }
    }

    /// This reference with check `check`.
    #[must_use]
    pub fn with_check(self, check: u64) -> ChunkRef {
        ChunkRef { check, ..self }
    }

    /// The reference covers its whole chunk.
    #[must_use]
    pub fn is_whole(&self) -> bool {
        self.offset == 0 && self.used == self.len
    }

    /// The member's bytes out of the chunk's data.
    #[must_use]
    pub fn slice<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        let start = (self.offset as usize).min(data.len());
        let end = (start + self.used as usize).min(data.len());
        &data[start..end]
    }
}

/// Tree index of members not from a tree walk (config files).
pub const DATA_TREE: u32 = u32::MAX;

/// One catalog record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Member type.
    pub kind: MemberKind,
    /// Source tree index ([`DATA_TREE`] for data members).
    pub tree: u32,
    /// Member name.
    pub name: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// Owner as archived.
    pub uid: u64,
    /// Group as archived.
    pub gid: u64,
    /// mtime seconds.
    pub mtime: i64,
    /// mtime nanoseconds.
    pub mtime_nsec: u32,
    /// Content bytes in the tar stream.
    pub size: u64,
    /// Link target.
    pub link: Option<Vec<u8>>,
    /// Device numbers.
    pub device: (u32, u32),
    /// Real size and data regions of sparse files.
    pub sparse: Option<(u64, Vec<SparseRegion>)>,
    /// Access ACL text.
    pub acl_access: Option<String>,
    /// Default ACL text.
    pub acl_default: Option<String>,
    /// xattrs.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Stat key of members read from a tree (older catalogs: regular
    /// files only).
    pub key: Option<StatKey>,
    /// The key was taken too close to the backup's start to prove the
    /// content unchanged later (see the crate docs).
    pub racy: bool,
    /// The content, in order.
    pub chunks: Vec<ChunkRef>,
}

impl Member {
    /// A record from a walker header.
    #[must_use]
    pub fn from_header(h: &MemberHeader<'_>, tree: u32) -> Member {
        Member {
            kind: h.kind,
            tree,
            name: h.name.to_vec(),
            mode: h.mode,
            uid: h.uid,
            gid: h.gid,
            mtime: h.mtime,
            mtime_nsec: h.mtime_nsec,
            size: h.size,
            link: h.link.map(<[u8]>::to_vec),
            device: h.device,
            sparse: h.sparse.map(|(s, r)| (s, r.to_vec())),
            acl_access: h.acl_access.clone(),
            acl_default: h.acl_default.clone(),
            xattrs: h.xattrs.to_vec(),
            key: None,
            racy: false,
            chunks: Vec::new(),
        }
    }

    /// The header view of this record.
    #[must_use]
    pub fn header(&self) -> MemberHeader<'_> {
        MemberHeader {
            name: &self.name,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
            size: self.size,
            link: self.link.as_deref(),
            device: self.device,
            sparse: self.sparse.as_ref().map(|(s, r)| (*s, r.as_slice())),
            acl_access: self.acl_access.clone(),
            acl_default: self.acl_default.clone(),
            xattrs: &self.xattrs,
        }
    }

    /// The tar header blocks of this member.
    ///
    /// # Errors
    /// Names the tar format cannot store.
    pub fn encode_header(&self) -> Result<Vec<u8>> {
        Ok(header::encode(&self.header())?)
    }

    /// Bytes of this member in the tar stream (headers, content, padding).
    ///
    /// # Errors
    /// As [`Member::encode_header`].
    pub fn stream_len(&self) -> Result<u64> {
        Ok(self.encode_header()?.len() as u64 + self.size + header::padding(self.size) as u64)
    }

    /// The member name, lossy UTF-8.
    #[must_use]
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

fn kind_byte(k: MemberKind) -> u8 {
    match k {
        MemberKind::Regular => 0,
        MemberKind::HardLink => 1,
        MemberKind::Symlink => 2,
        MemberKind::CharDevice => 3,
        MemberKind::BlockDevice => 4,
        MemberKind::Directory => 5,
        MemberKind::Fifo => 6,
    }
}

fn kind_of(b: u8) -> Option<MemberKind> {
    Some(match b {
        0 => MemberKind::Regular,
        1 => MemberKind::HardLink,
        2 => MemberKind::Symlink,
        3 => MemberKind::CharDevice,
        4 => MemberKind::BlockDevice,
        5 => MemberKind::Directory,
        6 => MemberKind::Fifo,
        _ => return None,
    })
}

fn put_bytes(o: &mut Vec<u8>, b: &[u8]) {
    o.extend_from_slice(&(b.len() as u32).to_le_bytes());
    o.extend_from_slice(b);
}

fn put_opt(o: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            o.push(1);
            put_bytes(o, b);
        }
        None => o.push(0),
    }
}

/// Encode one record payload.
#[must_use]
pub fn encode(m: &Member) -> Vec<u8> {
    let mut o = Vec::with_capacity(64 + m.name.len() + 36 * m.chunks.len());
    o.push(kind_byte(m.kind));
    o.extend_from_slice(&m.tree.to_le_bytes());
    put_bytes(&mut o, &m.name);
    o.extend_from_slice(&m.mode.to_le_bytes());
    o.extend_from_slice(&m.uid.to_le_bytes());
    o.extend_from_slice(&m.gid.to_le_bytes());
    o.extend_from_slice(&m.mtime.to_le_bytes());
    o.extend_from_slice(&m.mtime_nsec.to_le_bytes());
    o.extend_from_slice(&m.size.to_le_bytes());
    put_opt(&mut o, m.link.as_deref());
    o.extend_from_slice(&m.device.0.to_le_bytes());
    o.extend_from_slice(&m.device.1.to_le_bytes());
    match &m.sparse {
        Some((real, regions)) => {
            o.push(1);
            o.extend_from_slice(&real.to_le_bytes());
            o.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            for r in regions {
                o.extend_from_slice(&r.offset.to_le_bytes());
                o.extend_from_slice(&r.length.to_le_bytes());
            }
        }
        None => o.push(0),
    }
    put_opt(&mut o, m.acl_access.as_deref().map(str::as_bytes));
    put_opt(&mut o, m.acl_default.as_deref().map(str::as_bytes));
    o.extend_from_slice(&(m.xattrs.len() as u32).to_le_bytes());
    for (n, v) in &m.xattrs {
        put_bytes(&mut o, n);
        put_bytes(&mut o, v);
    }
    let sliced = m.chunks.iter().any(|c| !c.is_whole());
    let checked = m.chunks.iter().any(|c| c.check != 0);
    let flags = u8::from(m.key.is_some())
        | (u8::from(m.racy) << 1)
        | (u8::from(sliced) << 2)
        | (u8::from(checked) << 3);
    o.push(flags);
    if let Some(k) = &m.key {
        for v in [k.dev, k.ino, k.size] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o.extend_from_slice(&k.mtime_ns.to_le_bytes());
        o.extend_from_slice(&k.ctime_ns.to_le_bytes());
        for v in [k.mode, k.uid, k.gid] {
            o.extend_from_slice(&v.to_le_bytes());
        }
    }
    o.extend_from_slice(&(m.chunks.len() as u32).to_le_bytes());
    for c in &m.chunks {
        o.extend_from_slice(&c.digest);
        o.extend_from_slice(&c.len.to_le_bytes());
        if sliced {
            o.extend_from_slice(&c.offset.to_le_bytes());
            o.extend_from_slice(&c.used.to_le_bytes());
        }
        if checked {
            o.extend_from_slice(&c.check.to_le_bytes());
        }
    }
    o
}

struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn opt(&mut self) -> Option<Option<Vec<u8>>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.bytes()?)),
            _ => None,
        }
    }
    fn opt_string(&mut self) -> Option<Option<String>> {
        match self.opt()? {
            None => Some(None),
            Some(b) => Some(Some(String::from_utf8(b).ok()?)),
        }
    }
}

/// Decode one record payload.
#[must_use]
pub fn decode(b: &[u8]) -> Option<Member> {
    let mut c = Cur(b);
    let kind = kind_of(c.u8()?)?;
    let tree = c.u32()?;
    let name = c.bytes()?;
    let mode = c.u32()?;
    let uid = c.u64()?;
    let gid = c.u64()?;
    let mtime = c.i64()?;
    let mtime_nsec = c.u32()?;
    let size = c.u64()?;
    let link = c.opt()?;
    let device = (c.u32()?, c.u32()?);
    let sparse = match c.u8()? {
        0 => None,
        1 => {
            let real = c.u64()?;
            let n = c.u32()? as usize;
            let mut r = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                r.push(SparseRegion {
                    offset: c.u64()?,
                    length: c.u64()?,
                });
            }
            Some((real, r))
        }
        _ => return None,
    };
    let acl_access = c.opt_string()?;
    let acl_default = c.opt_string()?;
    let nx = c.u32()? as usize;
    let mut xattrs = Vec::with_capacity(nx.min(1024));
    for _ in 0..nx {
        xattrs.push((c.bytes()?, c.bytes()?));
    }
    let flags = c.u8()?;
    if flags & !0x0f != 0 {
        // Written by a later version.
        return None;
    }
    let key = if flags & 1 != 0 {
        Some(StatKey {
            dev: c.u64()?,
            ino: c.u64()?,
            size: c.u64()?,
            mtime_ns: c.i64()?,
            ctime_ns: c.i64()?,
            mode: c.u32()?,
            uid: c.u32()?,
            gid: c.u32()?,
        })
    } else {
        None
    };
    let nc = c.u32()? as usize;
    let mut chunks = Vec::with_capacity(nc.min(1 << 16));
    for _ in 0..nc {
        let digest: [u8; 32] = c.take(32)?.try_into().ok()?;
        let len = c.u32()?;
        let r = if flags & 4 != 0 {
            let (offset, used) = (c.u32()?, c.u32()?);
            if u64::from(offset) + u64::from(used) > u64::from(len) {
                return None;
            }
            ChunkRef {
                digest,
                len,
                offset,
                used,
                check: 0,
            }
        } else {
            ChunkRef::whole(digest, len)
        };
        let check = if flags & 8 != 0 { c.u64()? } else { 0 };
        chunks.push(r.with_check(check));
    }
    if !c.0.is_empty() {
        return None;
    }
    let m = Member {
        kind,
        tree,
        name,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        size,
        link,
        device,
        sparse,
        acl_access,
        acl_default,
        xattrs,
        key,
        racy: flags & 2 != 0,
        chunks,
    };
    let total: u64 = m.chunks.iter().map(|c| u64::from(c.used)).sum();
    (total == m.size || m.kind != MemberKind::Regular).then_some(m)
}

/// zstd level of catalogs: most of a catalog is names and digests; level 1
/// is faster than 3 and (measured on a 31,086-file catalog of 7.7 MB) no
/// larger.
const CATALOG_LEVEL: i32 = 1;

/// Writes a catalog file.
pub struct CatalogWriter {
    out: zstd::stream::write::Encoder<'static, BufWriter<File>>,
    path: PathBuf,
    /// Records written.
    pub count: u64,
}

impl std::fmt::Debug for CatalogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogWriter")
            .field("path", &self.path)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl CatalogWriter {
    /// Create the catalog file `path`.
    ///
    /// # Errors
    /// Creating the file.
    pub fn create(path: &Path) -> Result<CatalogWriter> {
        let f = File::create(path).map_err(|e| Error::io("create", path, e))?;
        let out =
            zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, f), CATALOG_LEVEL)
                .map_err(|e| Error::io("compress", path, e))?;
        Ok(CatalogWriter {
            out,
            path: path.to_path_buf(),
            count: 0,
        })
    }

    /// Append a record.
    ///
    /// # Errors
    /// Writing.
    pub fn push(&mut self, m: &Member) -> Result<()> {
        let b = encode(m);
        self.out
            .write_all(&(b.len() as u32).to_le_bytes())
            .and_then(|()| self.out.write_all(&b))
            .map_err(|e| Error::io("write", &self.path, e))?;
        self.count += 1;
        Ok(())
    }

    /// Write the end marker and close the file.
    ///
    /// # Errors
    /// Writing.
    pub fn finish(mut self) -> Result<()> {
        self.out
            .write_all(&0u32.to_le_bytes())
            .map_err(|e| Error::io("write", &self.path, e))?;
        let mut w = self
            .out
            .finish()
            .map_err(|e| Error::io("write", &self.path, e))?;
        w.flush().map_err(|e| Error::io("write", &self.path, e))?;
        Ok(())
    }
}

/// Reads a catalog file record by record.
pub struct CatalogReader {
    inp: zstd::stream::read::Decoder<'static, BufReader<File>>,
    path: PathBuf,
    done: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for CatalogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl CatalogReader {
    /// Open a catalog file.
    ///
    /// # Errors
    /// Opening it.
    pub fn open(path: &Path) -> Result<CatalogReader> {
        let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let inp = zstd::stream::read::Decoder::new(f).map_err(|e| Error::io("read", path, e))?;
        Ok(CatalogReader {
            inp,
            path: path.to_path_buf(),
            done: false,
            buf: Vec::new(),
        })
    }

    fn corrupt(&self, message: impl Into<String>) -> Error {
        Error::Corrupt {
            what: "catalog",
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// The next record, `None` after the end marker.
    ///
    /// # Errors
    /// Read errors, malformed or truncated catalogs.
    pub fn next_member(&mut self) -> Result<Option<Member>> {
        if self.done {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.inp
            .read_exact(&mut len)
            .map_err(|e| self.corrupt(format!("truncated: {e}")))?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            self.done = true;
            return Ok(None);
        }
        self.buf.resize(len, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.inp.read_exact(&mut buf);
        self.buf = buf;
        r.map_err(|e| self.corrupt(format!("truncated: {e}")))?;
        decode(&self.buf)
            .map(Some)
            .ok_or_else(|| self.corrupt("malformed record"))
    }
}

impl Iterator for CatalogReader {
    type Item = Result<Member>;
    fn next(&mut self) -> Option<Result<Member>> {
        self.next_member().transpose()
    }
}

/// Order of member names in a tree walk: component by component
/// (children sorted by bytes, a directory before its contents).
#[must_use]
pub fn walk_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let mut ia = a.strip_suffix(b"/").unwrap_or(a).split(|&c| c == b'/');
    let mut ib = b.strip_suffix(b"/").unwrap_or(b).split(|&c| c == b'/');
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Equal => {}
                o => return o,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let m = Member {
            kind: MemberKind::Regular,
            tree: 0,
            name: b"./a b/c\nd".to_vec(),
            mode: 0o4755,
            uid: 100_000,
            gid: 5,
            mtime: -3,
            mtime_nsec: 7,
            size: 10,
            link: None,
            device: (0, 0),
            sparse: Some((
                1 << 30,
                vec![SparseRegion {
                    offset: 4096,
                    length: 10,
                }],
            )),
            acl_access: Some("user::rw-\n".into()),
            acl_default: None,
            xattrs: vec![(b"user.x".to_vec(), vec![0, 1, 2])],
            key: Some(StatKey {
                dev: 1,
                ino: 2,
                size: 1 << 30,
                mtime_ns: 5,
                ctime_ns: 6,
                mode: 0o100_644,
                uid: 100_000,
                gid: 5,
            }),
            racy: true,
            chunks: vec![ChunkRef::whole([7; 32], 10)],
        };
        assert_eq!(decode(&encode(&m)), Some(m.clone()));
        let mut bad = encode(&m);
        bad.pop();
        assert_eq!(decode(&bad), None);

        // Slices of packed chunks.
        let mut p = m.clone();
        p.chunks = vec![
            ChunkRef {
                digest: [8; 32],
                len: 100,
                offset: 95,
                used: 5,
                check: 0,
            },
            ChunkRef {
                digest: [9; 32],
                len: 50,
                offset: 0,
                used: 5,
                check: 0,
            },
        ];
        let e = encode(&p);
        assert_eq!(e.len(), encode(&m).len() + 36 + 16);
        assert_eq!(decode(&e), Some(p.clone()));
        // Checks (of all references, 0 included), after the slices.
        let mut c = p.clone();
        c.chunks[0].check = u64::MAX - 1;
        let e = encode(&c);
        assert_eq!(e.len(), encode(&p).len() + 16);
        assert_eq!(decode(&e), Some(c.clone()));
        // Flags of a later version are refused.
        let mut later = encode(&c);
        let flags_at = later.len() - 4 - 2 * (44 + 8) - 52 - 1;
        assert_eq!(later[flags_at], 1 | 2 | 4 | 8);
        later[flags_at] |= 16;
        assert_eq!(decode(&later), None);
        // Without checks the record is as older versions wrote it (sizes
        // above), and reads with checks of 0.
        assert!(
            decode(&encode(&p))
                .unwrap()
                .chunks
                .iter()
                .all(|c| c.check == 0)
        );
        // A slice past the end of its chunk is refused.
        p.chunks[0].used = 6;
        assert_eq!(decode(&encode(&p)), None);
    }

    #[test]
    fn walk_order_is_tree_preorder() {
        use std::cmp::Ordering::*;
        assert_eq!(walk_order(b"./a/", b"./a-c"), Less);
        assert_eq!(walk_order(b"./a/z", b"./a-c"), Less);
        assert_eq!(walk_order(b"./", b"./a"), Less);
        assert_eq!(walk_order(b"./a/", b"./a"), Equal);
        assert_eq!(walk_order(b"./b", b"./a/x"), Greater);
    }
}
