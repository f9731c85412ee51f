//! The lzop file format (`.tar.lzo`), written and read over raw LZO1X
//! block codecs.
//!
//! No Rust crate handles lzop framing, so it is done here after lzop 1.04's
//! `lzop.c` (all integers big-endian):
//!
//! ```text
//! magic     89 4c 5a 4f 00 0d 0a 1a 0a
//! header    version:u16 lib_version:u16 [version_needed:u16 if version>=0x0940]
//!           method:u8 [level:u8 if version>=0x0940] flags:u32
//!           [filter:u32 if F_H_FILTER] mode:u32 mtime_low:u32
//!           [mtime_high:u32 if version>=0x0940] name_len:u8 name
//!           checksum:u32   (adler32, or crc32 if F_H_CRC32, of the header
//!                           from `version` through `name`)
//!           [extra_len:u32 extra checksum:u32 if F_H_EXTRA_FIELD]
//! blocks    dst_len:u32 (0 = end)  src_len:u32
//!           [adler32(dst):u32 if F_ADLER32_D] [crc32(dst):u32 if F_CRC32_D]
//!           [adler32(src):u32 if F_ADLER32_C and src_len<dst_len]
//!           [crc32(src):u32   if F_CRC32_C  and src_len<dst_len]
//!           data: LZO1X-compressed if src_len<dst_len, else stored
//! ```
//!
//! We write version 0x1040, method 3 (LZO1X-999 class: lzokay's encoder),
//! flags `F_OS_UNIX | F_ADLER32_D | F_ADLER32_C`, 256 KiB blocks. We read
//! any method of the LZO1X family and any checksum combination; filters and
//! multipart files (never written by `lzop` 1.x by default) are rejected.

use std::io::{self, Read, Write};

/// lzop magic bytes.
pub const MAGIC: &[u8] = &[0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

const VERSION: u16 = 0x1040;
const LIB_VERSION: u16 = 0x20a0;
const VERSION_NEEDED: u16 = 0x0940;
const METHOD_LZO1X_1: u8 = 1;
const METHOD_LZO1X_1_15: u8 = 2;
const METHOD_LZO1X_999: u8 = 3;
const LEVEL_999: u8 = 9;

const F_ADLER32_D: u32 = 0x0000_0001;
const F_ADLER32_C: u32 = 0x0000_0002;
const F_H_EXTRA_FIELD: u32 = 0x0000_0040;
const F_CRC32_D: u32 = 0x0000_0100;
const F_CRC32_C: u32 = 0x0000_0200;
const F_MULTIPART: u32 = 0x0000_0400;
const F_H_FILTER: u32 = 0x0000_0800;
const F_H_CRC32: u32 = 0x0000_1000;
const F_OS_UNIX: u32 = 0x0300_0000;

/// lzop's default block size.
const BLOCK_SIZE: usize = 256 * 1024;
/// lzop refuses larger blocks (`MAX_BLOCK_SIZE`).
const MAX_BLOCK_SIZE: usize = 64 * 1024 * 1024;

/// Adler-32 as lzop computes it (`lzo_adler32(1, …)`).
#[must_use]
pub fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    // Largest n with 255*n*(n+1)/2 + (n+1)*(MOD-1) < 2^32.
    const NMAX: usize = 5552;
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(NMAX) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// Streaming lzop writer.
pub struct LzopWriter<W: Write> {
    inner: W,
    block: Vec<u8>,
    out: Vec<u8>,
    dict: Box<lzokay::compress::Dict>,
}

impl<W: Write> std::fmt::Debug for LzopWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LzopWriter")
            .field("buffered", &self.block.len())
            .finish_non_exhaustive()
    }
}

impl<W: Write> LzopWriter<W> {
    /// Write the lzop file header to `inner`.
    ///
    /// # Errors
    /// Writing the header fails.
    pub fn new(mut inner: W) -> io::Result<Self> {
        let mut h = Vec::with_capacity(32);
        h.extend_from_slice(&VERSION.to_be_bytes());
        h.extend_from_slice(&LIB_VERSION.to_be_bytes());
        h.extend_from_slice(&VERSION_NEEDED.to_be_bytes());
        h.push(METHOD_LZO1X_999);
        h.push(LEVEL_999);
        h.extend_from_slice(&(F_OS_UNIX | F_ADLER32_D | F_ADLER32_C).to_be_bytes());
        h.extend_from_slice(&0o100_644u32.to_be_bytes()); // mode
        h.extend_from_slice(&0u32.to_be_bytes()); // mtime low
        h.extend_from_slice(&0u32.to_be_bytes()); // mtime high
        h.push(0); // no name
        let sum = adler32(&h);
        inner.write_all(MAGIC)?;
        inner.write_all(&h)?;
        inner.write_all(&sum.to_be_bytes())?;
        Ok(LzopWriter {
            inner,
            block: Vec::with_capacity(BLOCK_SIZE),
            out: vec![0; lzokay::compress::compress_worst_size(BLOCK_SIZE)],
            dict: lzokay::compress::Dict::new(),
        })
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let src = &self.block;
        let n = lzokay::compress::compress_no_alloc(src, &mut self.out, &mut self.dict)
            .map_err(|e| io::Error::other(format!("lzo compression failed: {e:?}")))?;
        let d_sum = adler32(src);
        let mut hdr = Vec::with_capacity(16);
        hdr.extend_from_slice(&len_u32(src.len())?.to_be_bytes());
        if n < src.len() {
            let c = &self.out[..n];
            hdr.extend_from_slice(&len_u32(n)?.to_be_bytes());
            hdr.extend_from_slice(&d_sum.to_be_bytes());
            hdr.extend_from_slice(&adler32(c).to_be_bytes());
            self.inner.write_all(&hdr)?;
            self.inner.write_all(c)?;
        } else {
            hdr.extend_from_slice(&len_u32(src.len())?.to_be_bytes());
            hdr.extend_from_slice(&d_sum.to_be_bytes());
            self.inner.write_all(&hdr)?;
            self.inner.write_all(src)?;
        }
        self.block.clear();
        Ok(())
    }

    /// Write the last block and the end marker; return the inner writer.
    ///
    /// # Errors
    /// Writing fails.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        self.inner.write_all(&0u32.to_be_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

fn len_u32(n: usize) -> io::Result<u32> {
    u32::try_from(n).map_err(|_| io::Error::other("lzop block too large"))
}

impl<W: Write> Write for LzopWriter<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        while !buf.is_empty() {
            let room = BLOCK_SIZE - self.block.len();
            let take = room.min(buf.len());
            self.block.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == BLOCK_SIZE {
                self.flush_block()?;
            }
        }
        Ok(total)
    }

    /// Flushes only the inner writer: emitting a short block on every
    /// `flush` would hurt the ratio for no reader's benefit.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streaming lzop reader.
pub struct LzopReader<R: Read> {
    inner: R,
    flags: u32,
    block: Vec<u8>,
    pos: usize,
    src: Vec<u8>,
    done: bool,
}

impl<R: Read> std::fmt::Debug for LzopReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LzopReader")
            .field("flags", &self.flags)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("lzop: {}", msg.into()))
}

/// Reads into `buf` while recording what was read (for the header checksum).
fn read_exact_rec(r: &mut impl Read, buf: &mut [u8], rec: &mut Vec<u8>) -> io::Result<()> {
    r.read_exact(buf).map_err(eof_is_corrupt)?;
    rec.extend_from_slice(buf);
    Ok(())
}

fn eof_is_corrupt(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt("unexpected end of file")
    } else {
        e
    }
}

fn read_u8(r: &mut impl Read, rec: &mut Vec<u8>) -> io::Result<u8> {
    let mut b = [0u8; 1];
    read_exact_rec(r, &mut b, rec)?;
    Ok(b[0])
}

fn read_u16(r: &mut impl Read, rec: &mut Vec<u8>) -> io::Result<u16> {
    let mut b = [0u8; 2];
    read_exact_rec(r, &mut b, rec)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read, rec: &mut Vec<u8>) -> io::Result<u32> {
    let mut b = [0u8; 4];
    read_exact_rec(r, &mut b, rec)?;
    Ok(u32::from_be_bytes(b))
}

impl<R: Read> LzopReader<R> {
    /// Read and check the lzop file header.
    ///
    /// # Errors
    /// `InvalidData` for a bad magic, unsupported version/method/flags or a
    /// header checksum mismatch; read errors of `inner`.
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut magic = [0u8; 9];
        inner.read_exact(&mut magic).map_err(eof_is_corrupt)?;
        if magic != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let mut rec = Vec::with_capacity(64);
        let version = read_u16(&mut inner, &mut rec)?;
        if version < 0x0900 {
            return Err(corrupt(format!("unsupported version {version:#x}")));
        }
        let _lib_version = read_u16(&mut inner, &mut rec)?;
        if version >= 0x0940 {
            let needed = read_u16(&mut inner, &mut rec)?;
            if !(0x0900..=VERSION).contains(&needed) {
                return Err(corrupt(format!("needs lzop version {needed:#x}")));
            }
        }
        let method = read_u8(&mut inner, &mut rec)?;
        if !matches!(
            method,
            METHOD_LZO1X_1 | METHOD_LZO1X_1_15 | METHOD_LZO1X_999
        ) {
            return Err(corrupt(format!("unsupported method {method}")));
        }
        if version >= 0x0940 {
            let _level = read_u8(&mut inner, &mut rec)?;
        }
        let flags = read_u32(&mut inner, &mut rec)?;
        if flags & F_H_FILTER != 0 {
            return Err(corrupt("filters are not supported"));
        }
        if flags & F_MULTIPART != 0 {
            return Err(corrupt("multipart files are not supported"));
        }
        let _mode = read_u32(&mut inner, &mut rec)?;
        let _mtime_low = read_u32(&mut inner, &mut rec)?;
        if version >= 0x0940 {
            let _mtime_high = read_u32(&mut inner, &mut rec)?;
        }
        let name_len = read_u8(&mut inner, &mut rec)?;
        let mut name = vec![0u8; usize::from(name_len)];
        read_exact_rec(&mut inner, &mut name, &mut rec)?;
        let want = if flags & F_H_CRC32 != 0 {
            crc32(&rec)
        } else {
            adler32(&rec)
        };
        let got = read_u32(&mut inner, &mut Vec::new())?;
        if got != want {
            return Err(corrupt("header checksum mismatch"));
        }
        if flags & F_H_EXTRA_FIELD != 0 {
            let mut extra_rec = Vec::new();
            let len = read_u32(&mut inner, &mut extra_rec)?;
            if len as usize > MAX_BLOCK_SIZE {
                return Err(corrupt("extra field too large"));
            }
            let mut extra = vec![0u8; len as usize];
            read_exact_rec(&mut inner, &mut extra, &mut extra_rec)?;
            let want = if flags & F_H_CRC32 != 0 {
                crc32(&extra_rec)
            } else {
                adler32(&extra_rec)
            };
            if read_u32(&mut inner, &mut Vec::new())? != want {
                return Err(corrupt("extra field checksum mismatch"));
            }
        }
        Ok(LzopReader {
            inner,
            flags,
            block: Vec::new(),
            pos: 0,
            src: Vec::new(),
            done: false,
        })
    }

    fn next_block(&mut self) -> io::Result<()> {
        let r = &mut self.inner;
        let mut scratch = Vec::new();
        let dst_len = read_u32(r, &mut scratch)? as usize;
        if dst_len == 0 {
            self.done = true;
            return Ok(());
        }
        if dst_len > MAX_BLOCK_SIZE {
            return Err(corrupt(format!("block size {dst_len} too large")));
        }
        let src_len = read_u32(r, &mut scratch)? as usize;
        if src_len == 0 || src_len > dst_len {
            return Err(corrupt(format!("bad compressed block size {src_len}")));
        }
        let f = self.flags;
        let d_adler = (f & F_ADLER32_D != 0)
            .then(|| read_u32(r, &mut scratch))
            .transpose()?;
        let d_crc = (f & F_CRC32_D != 0)
            .then(|| read_u32(r, &mut scratch))
            .transpose()?;
        let compressed = src_len < dst_len;
        let c_adler = (f & F_ADLER32_C != 0 && compressed)
            .then(|| read_u32(r, &mut scratch))
            .transpose()?;
        let c_crc = (f & F_CRC32_C != 0 && compressed)
            .then(|| read_u32(r, &mut scratch))
            .transpose()?;
        self.src.resize(src_len, 0);
        r.read_exact(&mut self.src).map_err(eof_is_corrupt)?;
        if c_adler.is_some_and(|s| s != adler32(&self.src))
            || c_crc.is_some_and(|s| s != crc32(&self.src))
        {
            return Err(corrupt("compressed block checksum mismatch"));
        }
        self.block.resize(dst_len, 0);
        if compressed {
            let n = lzo::decompress_into(&self.src, &mut self.block)
                .map_err(|e| corrupt(e.to_string()))?;
            if n != dst_len {
                return Err(corrupt("block decompressed to the wrong size"));
            }
        } else {
            self.block.copy_from_slice(&self.src);
        }
        if d_adler.is_some_and(|s| s != adler32(&self.block))
            || d_crc.is_some_and(|s| s != crc32(&self.block))
        {
            return Err(corrupt("block checksum mismatch"));
        }
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for LzopReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.block.len() {
            if self.done {
                return Ok(0);
            }
            self.block.clear();
            self.pos = 0;
            self.next_block()?;
        }
        let n = buf.len().min(self.block.len() - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_vectors() {
        // RFC 1950 / zlib reference values.
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        let big = vec![0xffu8; 100_000];
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(u64::from(adler32(&big)), (b << 16) | a);
    }

    #[test]
    fn round_trip_and_corruption() {
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 13) as u8).collect();
        let mut w = LzopWriter::new(Vec::new()).unwrap();
        w.write_all(&data).unwrap();
        let out = w.finish().unwrap();
        let mut back = Vec::new();
        LzopReader::new(&out[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        for cut in [5, 20, 40, out.len() / 2, out.len() - 1] {
            let res = LzopReader::new(&out[..cut]).and_then(|mut r| r.read_to_end(&mut Vec::new()));
            assert!(res.is_err(), "truncated at {cut} must fail");
        }
        let mut flipped = out.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        let res = LzopReader::new(&flipped[..]).and_then(|mut r| r.read_to_end(&mut Vec::new()));
        assert!(res.is_err());
    }
}
