//! `--bwlimit`: a reader that delivers at most a given number of bytes per second, as
//! `cstream -t <bytes/s>` does in front of PVE's `tar`.

use std::io::Read;
use std::time::{Duration, Instant};

/// Limits reads from `inner` to `bytes_per_sec` on average.
#[derive(Debug)]
pub struct Throttle<R> {
    inner: R,
    bytes_per_sec: u64,
    start: Instant,
    done: u64,
}

impl<R: Read> Throttle<R> {
    /// A throttled `inner`; a rate of 0 means unlimited.
    pub fn new(inner: R, bytes_per_sec: u64) -> Self {
        Self {
            inner,
            bytes_per_sec,
            start: Instant::now(),
            done: 0,
        }
    }
}

impl<R: Read> Read for Throttle<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.bytes_per_sec == 0 {
            return self.inner.read(buf);
        }
        // Small reads keep the rate smooth: at most 1/8 s worth of data at a time.
        let max = usize::try_from((self.bytes_per_sec / 8).max(512)).unwrap_or(usize::MAX);
        let len = buf.len().min(max);
        let n = self.inner.read(&mut buf[..len])?;
        self.done += n as u64;
        let due = Duration::from_secs_f64(self.done as f64 / self.bytes_per_sec as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        Ok(n)
    }
}

/// The byte rate for a `bwlimit` in KiB/s (`cstream -t <bwlimit*1024>`).
#[must_use]
pub fn kib_to_bytes_per_sec(kib: f64) -> u64 {
    if kib.is_finite() && kib > 0.0 {
        (kib * 1024.0) as u64
    } else {
        0
    }
}

/// The limit for `op` in a `bwlimit` property string (`default=N,restore=N,...`, KiB/s):
/// the operation's value, else `default`.
#[must_use]
pub fn bwlimit_for(prop: &str, op: &str) -> Option<f64> {
    let mut default = None;
    let mut specific = None;
    for part in prop.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        let Ok(v) = v.trim().parse::<f64>() else {
            continue;
        };
        if k.trim() == op {
            specific = Some(v);
        } else if k.trim() == "default" {
            default = Some(v);
        }
    }
    specific.or(default)
}

/// `get_bandwidth_limit('restore', storages, override)` for root (who may override every
/// limit): a given override wins; otherwise the smallest limit of the target storages, and
/// the datacenter's `bwlimit` when a storage has none. `None`/0 is unlimited.
#[must_use]
pub fn restore_bwlimit(
    override_kib: Option<f64>,
    storage_props: &[Option<&str>],
    datacenter_prop: Option<&str>,
) -> Option<f64> {
    if override_kib.is_some() {
        return override_kib;
    }
    let mut limit: Option<f64> = None;
    let mut apply = |prop: Option<&str>| -> bool {
        match prop.and_then(|p| bwlimit_for(p, "restore")) {
            Some(l) => {
                if limit.is_none_or(|cur| cur == 0.0 || l < cur) {
                    limit = Some(l);
                }
                true
            }
            None => false,
        }
    };
    let mut use_global = storage_props.is_empty();
    for p in storage_props {
        use_global |= !apply(*p);
    }
    if use_global {
        apply(datacenter_prop);
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bwlimit_resolution() {
        assert_eq!(bwlimit_for("default=100,restore=50", "restore"), Some(50.0));
        assert_eq!(
            bwlimit_for("default=100,migration=5", "restore"),
            Some(100.0)
        );
        assert_eq!(bwlimit_for("clone=5", "restore"), None);
        // The command line wins, even over smaller limits (root may override).
        assert_eq!(
            restore_bwlimit(Some(1000.0), &[Some("restore=10")], Some("restore=5")),
            Some(1000.0)
        );
        // Smallest storage limit; the datacenter only when a storage has none.
        assert_eq!(
            restore_bwlimit(
                None,
                &[Some("restore=300"), Some("default=200")],
                Some("restore=5")
            ),
            Some(200.0)
        );
        assert_eq!(
            restore_bwlimit(None, &[Some("restore=300"), None], Some("restore=500")),
            Some(300.0)
        );
        assert_eq!(
            restore_bwlimit(None, &[None], Some("default=70")),
            Some(70.0)
        );
        assert_eq!(restore_bwlimit(None, &[None], None), None);
    }

    #[test]
    fn rate_is_honoured() {
        let data = vec![7u8; 300 * 1024];
        let start = Instant::now();
        let mut r = Throttle::new(&data[..], 1024 * 1024);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        let t = start.elapsed();
        assert_eq!(out, data);
        // 300 KiB at 1 MiB/s: about 0.29 s.
        assert!(t >= Duration::from_millis(280), "{t:?}");
        assert!(t < Duration::from_secs(2), "{t:?}");
        assert_eq!(kib_to_bytes_per_sec(10.0), 10240);
        assert_eq!(kib_to_bytes_per_sec(0.0), 0);
    }
}
