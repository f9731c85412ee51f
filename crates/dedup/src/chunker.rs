//! Content-defined chunking of file data streams with FastCDC (2020
//! variant, normalization level 1) over pushed pieces of data.

use fastcdc::v2020::FastCDC;

/// Chunk size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSizes {
    /// Smallest cut (except for a stream's last chunk).
    pub min: usize,
    /// Target average.
    pub avg: usize,
    /// Largest chunk.
    pub max: usize,
}

impl Default for ChunkSizes {
    /// 64 KiB / 256 KiB / 1 MiB (see the crate docs for the measurements).
    fn default() -> Self {
        ChunkSizes {
            min: 64 << 10,
            avg: 256 << 10,
            max: 1 << 20,
        }
    }
}

/// Cuts one data stream into chunks; data is pushed in pieces of any size.
#[derive(Debug)]
pub struct Chunker {
    sizes: ChunkSizes,
    buf: Vec<u8>,
    start: usize,
}

impl Chunker {
    /// A chunker for one stream.
    #[must_use]
    pub fn new(sizes: ChunkSizes) -> Chunker {
        Chunker {
            sizes,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// Add data; `emit` gets every chunk that is complete.
    pub fn push<E>(
        &mut self,
        data: &[u8],
        emit: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.buf.extend_from_slice(data);
        while self.buf.len() - self.start >= self.sizes.max {
            let avail = &self.buf[self.start..];
            let len = FastCDC::new(avail, self.sizes.min, self.sizes.avg, self.sizes.max)
                .next()
                .map_or(avail.len(), |c| c.length);
            emit(&avail[..len])?;
            self.start += len;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(())
    }

    /// End of the stream: emit the remaining chunks and reset.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let avail = &self.buf[self.start..];
        if !avail.is_empty() {
            for c in FastCDC::new(avail, self.sizes.min, self.sizes.avg, self.sizes.max) {
                emit(&avail[c.offset..c.offset + c.length])?;
            }
        }
        self.buf.clear();
        self.start = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn cuts(data: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut c = Chunker::new(ChunkSizes {
            min: 4096,
            avg: 16384,
            max: 65536,
        });
        let mut out = Vec::new();
        for p in data.chunks(piece) {
            c.push::<()>(p, &mut |x| {
                out.push(x.to_vec());
                Ok(())
            })
            .unwrap();
        }
        c.finish::<()>(&mut |x| {
            out.push(x.to_vec());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn cut_points_do_not_depend_on_push_sizes() {
        let data = pseudo_random(1 << 20, 7);
        let a = cuts(&data, 1000);
        let b = cuts(&data, 256 * 1024);
        assert_eq!(a, b);
        assert_eq!(a.concat(), data);
        assert!(a.len() > 20, "{} chunks", a.len());
        assert!(a.iter().all(|c| c.len() <= 65536));
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let data = pseudo_random(1 << 20, 9);
        let mut changed = data[..300_000].to_vec();
        changed.extend_from_slice(b"inserted bytes");
        changed.extend_from_slice(&data[300_000..]);
        let a = cuts(&data, 65536);
        let b = cuts(&changed, 65536);
        let common = a.iter().filter(|c| b.contains(c)).count();
        assert!(common + 3 >= a.len(), "{common} of {} chunks kept", a.len());
    }
}
