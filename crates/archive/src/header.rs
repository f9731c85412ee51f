//! Encoding of tar headers in the format GNU tar writes with PVE's flags.
//!
//! `--xattrs`/`--acls` make GNU tar 1.34 write POSIX.1-2001 (pax) archives:
//! every member is a ustar header (`ustar\0` `00`), preceded by a typeflag
//! `x` extended header named `./PaxHeaders/<basename>` when it needs records.
//! We emit the same, with these records:
//!
//! | record | when |
//! |---|---|
//! | `path`, `linkpath` | name / link target longer than 100 bytes (bytes as they are) |
//! | `size`, `uid`, `gid` | value too large for its octal field |
//! | `mtime` | sub-second part or value outside the octal field (`sec.nnnnnnnnn`) |
//! | `SCHILY.acl.access`, `SCHILY.acl.default` | POSIX ACLs, libacl text with numeric ids |
//! | `SCHILY.xattr.<name>` | `user.*` and `security.capability` xattrs, raw value |
//! | `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name`, `GNU.sparse.realsize` | sparse files (PAX sparse format 1.0) |
//!
//! A PAX 1.0 sparse member is a regular-file header named
//! `./GNUSparseFile.0/<basename>` whose data starts with the map in decimal
//! (`count\n` then `offset\nlength\n` per data region, padded to 512 bytes)
//! followed by the data regions back to back. Records are `"<len> key=value\n"`
//! where `<len>` counts the whole record; values are length-delimited and may
//! contain newlines (ACL text) or any bytes (xattr values).

use crate::error::{ArchiveError, Result};

/// Tar block size.
pub const BLOCK: usize = 512;
/// GNU tar pads archives to records of 20 blocks.
pub const RECORD: usize = 20 * BLOCK;

const NAME_LEN: usize = 100;
const MAX_OCTAL_8: u64 = 0o7_777_777;
const MAX_OCTAL_12: u64 = 0o77_777_777_777;

/// Member type as stored in the typeflag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    /// `0`
    Regular,
    /// `1`
    HardLink,
    /// `2`
    Symlink,
    /// `3`
    CharDevice,
    /// `4`
    BlockDevice,
    /// `5`
    Directory,
    /// `6`
    Fifo,
}

impl MemberKind {
    fn typeflag(self) -> u8 {
        match self {
            MemberKind::Regular => b'0',
            MemberKind::HardLink => b'1',
            MemberKind::Symlink => b'2',
            MemberKind::CharDevice => b'3',
            MemberKind::BlockDevice => b'4',
            MemberKind::Directory => b'5',
            MemberKind::Fifo => b'6',
        }
    }
}

/// One region of real data in a sparse file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseRegion {
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes (0 only for the final marker of a file ending in a hole).
    pub length: u64,
}

/// Everything needed to encode one member's headers: the metadata of one
/// tree entry as the archive stores it (owners already id-mapped).
#[derive(Debug, Clone)]
pub struct MemberHeader<'a> {
    /// Member name (`./etc/hosts`, directories end in `/`).
    pub name: &'a [u8],
    /// Member type.
    pub kind: MemberKind,
    /// Permission bits incl. setuid/setgid/sticky (file type bits ignored).
    pub mode: u32,
    /// Owner as archived.
    pub uid: u64,
    /// Group as archived.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Content bytes following the header (for sparse: the data regions only).
    pub size: u64,
    /// Symlink or hard-link target.
    pub link: Option<&'a [u8]>,
    /// Major and minor number of devices.
    pub device: (u32, u32),
    /// Sparse files: real size and data regions.
    pub sparse: Option<(u64, &'a [SparseRegion])>,
    /// Access ACL in libacl text form.
    pub acl_access: Option<String>,
    /// Default ACL in libacl text form (directories).
    pub acl_default: Option<String>,
    /// Archived xattrs (name, raw value), sorted by name.
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

/// Append one PAX record.
pub(crate) fn push_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    // The length counts its own digits.
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn basename(name: &[u8]) -> &[u8] {
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

/// The lowest `field.len() - 1` octal digits of `value`, zero-padded, and a NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let mut v = value;
    for b in field[..digits].iter_mut().rev() {
        *b = b'0' + (v & 7) as u8;
        v >>= 3;
    }
    field[digits] = 0;
}

fn put_bytes(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// A ustar header block.
#[allow(clippy::too_many_arguments)]
fn ustar_block(
    name: &[u8],
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    link: &[u8],
    device: (u32, u32),
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    put_bytes(&mut h[0..100], name);
    put_octal(&mut h[100..108], u64::from(mode & 0o7777));
    put_octal(&mut h[108..116], if uid <= MAX_OCTAL_8 { uid } else { 0 });
    put_octal(&mut h[116..124], if gid <= MAX_OCTAL_8 { gid } else { 0 });
    put_octal(
        &mut h[124..136],
        if size <= MAX_OCTAL_12 { size } else { 0 },
    );
    put_octal(&mut h[136..148], mtime.min(MAX_OCTAL_12));
    h[156] = typeflag;
    put_bytes(&mut h[157..257], link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if matches!(typeflag, b'3' | b'4') {
        put_octal(&mut h[329..337], u64::from(device.0).min(MAX_OCTAL_8));
        put_octal(&mut h[337..345], u64::from(device.1).min(MAX_OCTAL_8));
    }
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    put_octal(&mut h[148..155], sum);
    h[155] = b' ';
    h
}

/// Padding needed after `len` content bytes.
#[must_use]
pub fn padding(len: u64) -> usize {
    let rem = (len % BLOCK as u64) as usize;
    if rem == 0 { 0 } else { BLOCK - rem }
}

/// Encode the header blocks of a member: optional PAX `x` header, the
/// ustar header and, for sparse files, the sparse map blocks. The caller
/// then writes `m.size` content bytes and [`padding`]`(m.size)` zeros.
///
/// # Errors
/// Names or link targets with NUL bytes, empty names, xattr names with `=`.
pub fn encode(m: &MemberHeader<'_>) -> Result<Vec<u8>> {
    let member = || String::from_utf8_lossy(m.name).into_owned();
    if m.link.is_some_and(|l| l.contains(&0)) || m.name.contains(&0) || m.name.is_empty() {
        return Err(ArchiveError::Unsupported {
            member: member(),
            message: "empty name or NUL byte in name or link target".into(),
        });
    }
    let mut pax = Vec::new();
    if let Some((real_size, _)) = m.sparse {
        push_record(&mut pax, b"GNU.sparse.major", b"1");
        push_record(&mut pax, b"GNU.sparse.minor", b"0");
        push_record(&mut pax, b"GNU.sparse.name", m.name);
        push_record(
            &mut pax,
            b"GNU.sparse.realsize",
            real_size.to_string().as_bytes(),
        );
    } else if m.name.len() > NAME_LEN {
        push_record(&mut pax, b"path", m.name);
    }
    let link = m.link.unwrap_or(b"");
    if link.len() > NAME_LEN {
        push_record(&mut pax, b"linkpath", link);
    }
    let (map_text, data_size) = match m.sparse {
        Some((_, regions)) => {
            let mut t = format!("{}\n", regions.len());
            for r in regions {
                t.push_str(&format!("{}\n{}\n", r.offset, r.length));
            }
            let mut t = t.into_bytes();
            t.resize(t.len() + padding(t.len() as u64), 0);
            let total = m.size + t.len() as u64;
            (t, total)
        }
        None => (Vec::new(), m.size),
    };
    if data_size > MAX_OCTAL_12 {
        push_record(&mut pax, b"size", data_size.to_string().as_bytes());
    }
    if m.uid > MAX_OCTAL_8 {
        push_record(&mut pax, b"uid", m.uid.to_string().as_bytes());
    }
    if m.gid > MAX_OCTAL_8 {
        push_record(&mut pax, b"gid", m.gid.to_string().as_bytes());
    }
    let header_mtime = u64::try_from(m.mtime).unwrap_or(0);
    if m.mtime < 0 {
        push_record(&mut pax, b"mtime", m.mtime.to_string().as_bytes());
    } else if m.mtime_nsec != 0 || header_mtime > MAX_OCTAL_12 {
        let v = format!("{}.{:09}", m.mtime, m.mtime_nsec);
        push_record(&mut pax, b"mtime", v.as_bytes());
    }
    if let Some(acl) = &m.acl_access {
        push_record(&mut pax, b"SCHILY.acl.access", acl.as_bytes());
    }
    if let Some(acl) = &m.acl_default {
        push_record(&mut pax, b"SCHILY.acl.default", acl.as_bytes());
    }
    for (name, value) in m.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        if name.contains(&b'=') || name.contains(&0) {
            return Err(ArchiveError::Unsupported {
                member: member(),
                message: "xattr name contains '=' or NUL".into(),
            });
        }
        push_record(&mut pax, &key, value);
    }

    let mut out = Vec::with_capacity(3 * BLOCK + pax.len() + map_text.len());
    if !pax.is_empty() {
        let mut xname = b"./PaxHeaders/".to_vec();
        xname.extend_from_slice(basename(m.name));
        out.extend_from_slice(&ustar_block(
            &xname,
            b'x',
            0o644,
            0,
            0,
            pax.len() as u64,
            header_mtime,
            b"",
            (0, 0),
        ));
        let plen = pax.len() as u64;
        out.extend_from_slice(&pax);
        out.resize(out.len() + padding(plen), 0);
    }
    let sparse_name;
    let name: &[u8] = if m.sparse.is_some() {
        sparse_name = [b"./GNUSparseFile.0/".as_slice(), basename(m.name)].concat();
        &sparse_name
    } else {
        m.name
    };
    out.extend_from_slice(&ustar_block(
        name,
        m.kind.typeflag(),
        m.mode,
        m.uid,
        m.gid,
        data_size,
        header_mtime,
        link,
        m.device,
    ));
    out.extend_from_slice(&map_text);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            (
                b"mtime",
                b"1795867662.624504845",
                b"30 mtime=1795867662.624504845\n",
            ),
            (b"GNU.sparse.major", b"1", b"22 GNU.sparse.major=1\n"),
            // 9 bytes of body + 1 digit would be 10 → needs 2 digits.
            (b"a", b"12345", b"11 a=12345\n"),
        ];
        for &(k, v, want) in cases {
            let mut out = Vec::new();
            push_record(&mut out, k, v);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn ustar_checksum_matches_gnu_layout() {
        let h = ustar_block(b"./a.txt", b'0', 0o644, 0, 0, 3, 1_700_000_000, b"", (0, 0));
        let parsed = tar_core::Header::from_bytes(&h);
        parsed.verify_checksum().unwrap();
        assert_eq!(parsed.entry_size().unwrap(), 3);
        assert_eq!(&h[100..108], b"0000644\0");
    }

    #[test]
    fn octal_fields_match_formatting() {
        for v in [
            0u64,
            1,
            7,
            8,
            0o644,
            0o7777777,
            0o10000000,
            123_456_789,
            u64::MAX,
        ] {
            for len in [7usize, 8, 12] {
                let mut f = vec![0xffu8; len];
                put_octal(&mut f, v);
                let d = len - 1;
                let s = format!("{v:0d$o}");
                assert_eq!(&f[..d], &s.as_bytes()[s.len() - d..], "{v:o} in {len}");
                assert_eq!(f[d], 0);
            }
        }
    }
}
