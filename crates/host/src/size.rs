//! Size units as PVE writes and reads them.
//!
//! * [`parse_size`] accepts `^(\d+(\.\d+)?)([KMGT](?:iB)?)?$` (no unit = bytes), the
//!   `disk-size` format of PVE's mount point `size=` option. Fractions are computed exactly
//!   (decimal arithmetic, truncated to whole bytes), not through floats.
//! * [`format_size`] prints the largest unit that divides the value exactly (`8G`, `512M`,
//!   `1073741825`); `0` prints as `0T`, as PVE does.
//! * [`parse_gib_kib`] converts the GiB number of the `STORAGE_ID:SIZE` syntax to KiB.

use std::fmt;

/// A size string that does not match PVE's `disk-size` format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size: {0}")]
pub struct SizeError(pub String);

const KIB: u64 = 1024;
const UNITS: [(char, u64); 4] = [
    ('T', KIB * KIB * KIB * KIB),
    ('G', KIB * KIB * KIB),
    ('M', KIB * KIB),
    ('K', KIB),
];

/// Splits `"12.5"` into (integer part, fraction digits). Both must be ASCII digits; the
/// fraction may be empty only when there is no dot.
fn split_decimal(num: &str) -> Option<(&str, &str)> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) if !f.is_empty() => (i, f),
        Some(_) => return None,
        None => (num, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((int, frac))
}

/// `value * mult`, truncated to an integer, computed exactly.
fn scale_decimal(int: &str, frac: &str, mult: u64) -> Option<u64> {
    let int_v: u128 = int.parse().ok()?;
    let mut total = int_v.checked_mul(u128::from(mult))?;
    if !frac.is_empty() {
        // Only the first 30 fraction digits can matter for values < 2^64.
        let frac = &frac[..frac.len().min(30)];
        let frac_v: u128 = frac.parse().ok()?;
        let denom = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
        total = total.checked_add(frac_v.checked_mul(u128::from(mult))? / denom)?;
    }
    u64::try_from(total).ok()
}

/// Parses a PVE `disk-size` string into bytes.
///
/// # Errors
/// [`SizeError`] when the text does not match `^(\d+(\.\d+)?)([KMGT](?:iB)?)?$` or the value
/// does not fit in 64 bits.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError(text.to_string());
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(digits_end);
    let mult = match unit {
        "" => 1,
        u => {
            let letter = u.chars().next().ok_or_else(err)?;
            let rest = &u[1..];
            if !(rest.is_empty() || rest == "iB") {
                return Err(err());
            }
            UNITS
                .iter()
                .find(|(c, _)| *c == letter)
                .map(|(_, m)| *m)
                .ok_or_else(err)?
        }
    };
    let (int, frac) = split_decimal(num).ok_or_else(err)?;
    scale_decimal(int, frac, mult).ok_or_else(err)
}

/// Prints a byte count the way PVE's `format_size` does.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    for (letter, mult) in UNITS {
        if bytes.is_multiple_of(mult) {
            return format!("{}{letter}", bytes / mult);
        }
    }
    bytes.to_string()
}

/// A byte count that displays as [`format_size`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

/// Converts the GiB number of `STORAGE_ID:SIZE` (`\d+(\.\d+)?`) into KiB as PVE does:
/// `int(gib * 1024) * 1024`. Returns `None` for text that is not such a number.
#[must_use]
pub fn parse_gib_kib(text: &str) -> Option<u64> {
    let (int, frac) = split_decimal(text)?;
    let mib = scale_decimal(int, frac, 1024)?;
    mib.checked_mul(1024)
}

/// Formats a byte count for humans, as PVE's `render_bytes` (`1.50 GiB`).
#[must_use]
pub fn render_bytes(bytes: u64) -> String {
    const NAMES: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut idx = 0;
    while value >= 1024.0 && idx + 1 < NAMES.len() {
        value /= 1024.0;
        idx += 1;
    }
    if idx == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", NAMES[idx])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pve_disk_sizes() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1024", 1024),
            ("8G", 8 << 30),
            ("8GiB", 8 << 30),
            ("512M", 512 << 20),
            ("4K", 4096),
            ("1T", 1 << 40),
            ("0.5G", 512 << 20),
            ("1.5K", 1536),
            ("1.0001K", 1024),
            ("0T", 0),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_sizes() {
        for text in [
            "",
            "G",
            "1.G",
            ".5G",
            "1g",
            "1GB",
            "1 G",
            "-1",
            "1Gi",
            "1P",
            "99999999999T",
        ] {
            assert_eq!(parse_size(text), Err(SizeError(text.to_string())), "{text}");
        }
    }

    #[test]
    fn formats_like_pve() {
        assert_eq!(format_size(8 << 30), "8G");
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1_073_741_825), "1073741825");
        assert_eq!(format_size(0), "0T");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(3 << 10), "3K");
        assert_eq!(format_size(2 << 40), "2T");
    }

    #[test]
    fn gib_to_kib_like_pve() {
        assert_eq!(parse_gib_kib("8"), Some(8 * 1024 * 1024));
        assert_eq!(parse_gib_kib("0.5"), Some(512 * 1024));
        assert_eq!(parse_gib_kib("0"), Some(0));
        // int(0.001 * 1024) = 1 MiB
        assert_eq!(parse_gib_kib("0.001"), Some(1024));
        assert_eq!(parse_gib_kib("1."), None);
        assert_eq!(parse_gib_kib("x"), None);
    }

    #[test]
    fn format_then_parse_round_trips() {
        for v in [0u64, 1, 1023, 1024, 4096, 5 << 20, (7 << 30) + 1, 3 << 40] {
            assert_eq!(parse_size(&format_size(v)), Ok(v));
        }
    }

    #[test]
    fn renders_human_sizes() {
        assert_eq!(render_bytes(512), "512 B");
        assert_eq!(render_bytes(1536), "1.50 KiB");
        assert_eq!(render_bytes(8 << 30), "8.00 GiB");
    }
}
