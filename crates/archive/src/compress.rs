//! Compression formats of vzdump archives.
//!
//! | [`Compression`] | vzdump `compress` | file name            | magic bytes            | PVE tool           |
//! |-----------------|-------------------|----------------------|------------------------|--------------------|
//! | `None`          | `0`               | `.tar`               | (ustar header)         | —                  |
//! | `Gzip`          | `gzip`            | `.tar.gz` (`.tgz` read) | `1f 8b`             | `gzip --rsyncable` / `pigz` |
//! | `Lzo`           | `1`, `lzo`        | `.tar.lzo`           | `89 4c 5a 4f 00 0d 0a 1a 0a` | `lzop`       |
//! | `Zstd`          | `zstd`            | `.tar.zst`           | `28 b5 2f fd`          | `zstd --threads=N` |
//!
//! Writers: zstd is multi-threaded through libzstd's own workers (`zstdmt`),
//! gzip is single-threaded flate2 on the pure-Rust zlib-rs backend (no
//! `--rsyncable` equivalent), lzo is the real lzop container (see [`crate::lzop`]).
//! Readers: gzip accepts concatenated members (pigz), zstd accepts
//! `--long=31` windows and concatenated frames.
//!
//! Encoders must be finished with [`Compressor::finish`]: dropping one
//! without finishing leaves a truncated stream (we never finish in `Drop`,
//! because errors there would be lost).

use std::io::{self, BufReader, Chain, Cursor, Read, Write};

use crate::lzop::{LzopReader, LzopWriter};

/// A compression format of vzdump archives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (RFC 1952), possibly multi-member.
    Gzip,
    /// lzop file format over LZO1X.
    Lzo,
    /// Zstandard.
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// Longest magic we sniff.
const SNIFF_LEN: usize = 9;

impl Compression {
    /// Archive file name suffix as vzdump writes it (`.tar`, `.tar.gz`, …).
    #[must_use]
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => ".tar",
            Compression::Gzip => ".tar.gz",
            Compression::Lzo => ".tar.lzo",
            Compression::Zstd => ".tar.zst",
        }
    }

    /// The compression a file name says, by suffix (`.tgz` counts as gzip).
    /// `None` (the Option) if the name is no tar archive name we know.
    #[must_use]
    pub fn from_file_name(name: &str) -> Option<Compression> {
        const TABLE: &[(&str, Compression)] = &[
            (".tar", Compression::None),
            (".tar.gz", Compression::Gzip),
            (".tgz", Compression::Gzip),
            (".tar.lzo", Compression::Lzo),
            (".tar.zst", Compression::Zstd),
        ];
        TABLE
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix))
            .map(|&(_, c)| c)
    }

    /// Detect the compression from the first bytes of a stream. Anything
    /// that is none of the known magics is taken as plain tar.
    #[must_use]
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else if head.starts_with(crate::lzop::MAGIC) {
            Compression::Lzo
        } else {
            Compression::None
        }
    }
}

/// A compressing writer; see [`compressor`].
#[allow(clippy::large_enum_variant)]
pub enum Compressor<W: Write> {
    /// Pass-through.
    None(W),
    /// gzip.
    Gzip(flate2::write::GzEncoder<W>),
    /// lzop.
    Lzo(LzopWriter<W>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> std::fmt::Debug for Compressor<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Compressor::None(_) => "None",
            Compressor::Gzip(_) => "Gzip",
            Compressor::Lzo(_) => "Lzo",
            Compressor::Zstd(_) => "Zstd",
        };
        f.debug_tuple("Compressor").field(&name).finish()
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Lzo(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::Lzo(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Compressor<W> {
    /// Write the trailer of the format, flush, and return the inner writer.
    ///
    /// # Errors
    /// Any write error of the inner writer, or a compressor error.
    pub fn finish(self) -> io::Result<W> {
        let mut w = match self {
            Compressor::None(w) => w,
            Compressor::Gzip(w) => w.finish()?,
            Compressor::Lzo(w) => w.finish()?,
            Compressor::Zstd(w) => w.finish()?,
        };
        w.flush()?;
        Ok(w)
    }
}

/// Default levels as the CLI tools use them (gzip 6, zstd 3; lzop's level
/// does not apply to our single LZO1X encoder).
#[must_use]
pub fn default_level(c: Compression) -> i32 {
    match c {
        Compression::Gzip => 6,
        Compression::Zstd => 3,
        Compression::None | Compression::Lzo => 0,
    }
}

/// Wrap `w` in an encoder for `c`.
///
/// `threads` is the number of zstd worker threads (`zstd --threads=N`);
/// `0` and `1` compress in the calling thread. It is ignored by the other
/// formats. `level` of `None` picks [`default_level`].
///
/// # Errors
/// An invalid level or thread count for zstd, or an error writing a header.
pub fn compressor<W: Write>(
    w: W,
    c: Compression,
    threads: u32,
    level: Option<i32>,
) -> io::Result<Compressor<W>> {
    let level = level.unwrap_or_else(|| default_level(c));
    Ok(match c {
        Compression::None => Compressor::None(w),
        Compression::Gzip => {
            let level = u32::try_from(level)
                .ok()
                .filter(|l| *l <= 9)
                .ok_or_else(|| invalid_input(format!("invalid gzip level {level}")))?;
            Compressor::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(level),
            ))
        }
        Compression::Lzo => Compressor::Lzo(LzopWriter::new(w)?),
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(w, level)?;
            if threads > 1 {
                enc.multithread(threads)?;
            }
            Compressor::Zstd(enc)
        }
    })
}

/// A decompressing reader; see [`decompressor`].
#[allow(clippy::large_enum_variant)]
pub enum Decompressor<R: Read> {
    /// Pass-through.
    None(R),
    /// gzip, all members.
    Gzip(flate2::read::MultiGzDecoder<R>),
    /// lzop.
    Lzo(LzopReader<R>),
    /// zstd, all frames.
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> std::fmt::Debug for Decompressor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Decompressor::None(_) => "None",
            Decompressor::Gzip(_) => "Gzip",
            Decompressor::Lzo(_) => "Lzo",
            Decompressor::Zstd(_) => "Zstd",
        };
        f.debug_tuple("Decompressor").field(&name).finish()
    }
}

impl<R: Read> Read for Decompressor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decompressor::None(r) => r.read(buf),
            Decompressor::Gzip(r) => r.read(buf),
            Decompressor::Lzo(r) => r.read(buf),
            Decompressor::Zstd(r) => r.read(buf),
        }
    }
}

/// zstd's largest window (`zstd --long=31` archives need it).
const ZSTD_WINDOW_LOG_MAX: u32 = 31;

/// Wrap `r` in a decoder for `c`.
///
/// # Errors
/// Setting up the zstd context fails, or the lzop file header is invalid.
pub fn decompressor<R: Read>(r: R, c: Compression) -> io::Result<Decompressor<R>> {
    Ok(match c {
        Compression::None => Decompressor::None(r),
        Compression::Gzip => Decompressor::Gzip(flate2::read::MultiGzDecoder::new(r)),
        Compression::Lzo => Decompressor::Lzo(LzopReader::new(r)?),
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::new(r)?;
            dec.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Decompressor::Zstd(dec)
        }
    })
}

/// A reader that replays the sniffed bytes before the rest of the stream.
pub type Sniffed<R> = Chain<Cursor<Vec<u8>>, R>;

/// Sniff the compression of `r` by its magic bytes and wrap it in the
/// matching decoder.
///
/// # Errors
/// Reading the first bytes fails, or see [`decompressor`].
pub fn decompressor_auto<R: Read>(mut r: R) -> io::Result<(Compression, Decompressor<Sniffed<R>>)> {
    let mut head = Vec::with_capacity(SNIFF_LEN);
    (&mut r).take(SNIFF_LEN as u64).read_to_end(&mut head)?;
    let c = Compression::detect(&head);
    let chained = Cursor::new(head).chain(r);
    Ok((c, decompressor(chained, c)?))
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_extensions() {
        let cases = [
            (
                "vzdump-lxc-100-2025_01_01-00_00_00.tar",
                Some(Compression::None),
            ),
            ("x.tar.gz", Some(Compression::Gzip)),
            ("x.tgz", Some(Compression::Gzip)),
            ("x.tar.lzo", Some(Compression::Lzo)),
            ("x.tar.zst", Some(Compression::Zstd)),
            ("x.tar.bz2", None),
            ("x.zst", None),
        ];
        for (name, want) in cases {
            assert_eq!(Compression::from_file_name(name), want, "{name}");
        }
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Lzo,
            Compression::Zstd,
        ] {
            assert_eq!(Compression::from_file_name(c.extension()), Some(c));
        }
    }

    #[test]
    fn round_trip_all_formats_with_sniffing() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Lzo,
            Compression::Zstd,
        ] {
            for threads in [1, 2] {
                let mut enc = compressor(Vec::new(), c, threads, None).unwrap();
                enc.write_all(&data).unwrap();
                let out = enc.finish().unwrap();
                let (sniffed, mut dec) = decompressor_auto(&out[..]).unwrap();
                if c != Compression::None {
                    assert_eq!(sniffed, c);
                }
                let mut back = Vec::new();
                dec.read_to_end(&mut back).unwrap();
                assert_eq!(back, data, "{c:?}");
            }
        }
    }

    #[test]
    fn gzip_reads_concatenated_members() {
        let mut out = Vec::new();
        for part in [&b"hello "[..], b"world"] {
            let mut enc = compressor(Vec::new(), Compression::Gzip, 1, None).unwrap();
            enc.write_all(part).unwrap();
            out.extend(enc.finish().unwrap());
        }
        let mut back = String::new();
        decompressor(&out[..], Compression::Gzip)
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, "hello world");
    }
}
