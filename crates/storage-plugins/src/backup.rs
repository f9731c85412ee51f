//! Backup archive names: `archive_info`, `decompressor_info`, the companion files and the
//! file-name regexes used to classify files in dump/template directories.
//!
//! Compatibility target: pve-storage 0c56bad `PVE::Storage::archive_info` /
//! `decompressor_info` and the `$BACKUP_EXT_RE_2`, `$VZTMPL_EXT_RE_1`, `$ISO_EXT_RE_0`
//! regexes.
//!
//! Archive names: `vzdump-<lxc|openvz|qemu>-<anything>.<ext>` with ext one of `tgz`,
//! `tar[.gz|.lzo|.zst|.bz2]`, `vma[.gz|.lzo|.zst|.bz2]`. A *standard* name is
//! `vzdump-<type>-<vmid>-YYYY_MM_DD-HH_MM_SS.<ext>` (vmid `[1-9][0-9]{2,8}`); its time is
//! interpreted in the **local** time zone (`timelocal`), which honours `TZ`. Companions:
//! `<stem>.log` (stem = name without extension), `<archive>.notes`, `<archive>.protected`.

use std::path::Path;
use std::sync::LazyLock;

use jiff::ZonedDateTime;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use regex::Regex;
use serde::Serialize;

/// `$ISO_EXT_RE_0` (no capture groups).
pub const ISO_EXT_RE: &str = r"(?i:\.(?:iso|img))";
/// `$VZTMPL_EXT_RE_1` for use directly before `$`: PVE's `(tar)(?!\.)` alternative only
/// differs from plain `tar` when more text follows, which an end anchor rules out.
pub const VZTMPL_EXT_RE: &str = r"(?i:\.(?:tar|tar\.(?:gz|xz|zst|bz2)))";
/// `$BACKUP_EXT_RE_2`: group 1 = full extension, group 2 = compression.
pub const BACKUP_EXT_RE: &str = r"\.(tgz|(?:tar|vma)(?:\.(gz|lzo|zst|bz2))?)";
/// `KNOWN_COMPRESSION_FORMATS`.
pub const COMPRESSION_FORMATS: [&str; 4] = ["gz", "lzo", "zst", "bz2"];

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static regex must compile")
}

static ARCHIVE_RE: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"^(vzdump-(lxc|openvz|qemu)-.+{BACKUP_EXT_RE})$")));
static ISO_FILE_RE: LazyLock<Regex> = LazyLock::new(|| re(&format!(r"^[^/]+{ISO_EXT_RE}$")));
static VZTMPL_FILE_RE: LazyLock<Regex> = LazyLock::new(|| re(&format!(r"^[^/]+{VZTMPL_EXT_RE}$")));
static BACKUP_FILE_RE: LazyLock<Regex> = LazyLock::new(|| re(&format!(r"^[^/]+{BACKUP_EXT_RE}$")));

/// Errors of [`archive_info`] and [`decompressor_info`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("ERROR: couldn't determine archive info from '{0}'")]
    Unrecognized(String),
    #[error("ERROR: archive format not defined")]
    FormatNotDefined,
    /// PVE dies inside `Time::Local::timelocal` here; vzkit reports the name.
    #[error("ERROR: invalid backup time in '{name}' - {reason}")]
    InvalidTime { name: String, reason: String },
}

/// Guest type of a backup archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestType {
    Lxc,
    Openvz,
    Qemu,
}

impl GuestType {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestType::Lxc => "lxc",
            GuestType::Openvz => "openvz",
            GuestType::Qemu => "qemu",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        match s {
            "lxc" => Some(GuestType::Lxc),
            "openvz" => Some(GuestType::Openvz),
            "qemu" => Some(GuestType::Qemu),
            _ => None,
        }
    }
}

/// `decompressor_info` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecompressorInfo {
    /// `tar`, `vma` (or `iso`).
    pub format: String,
    /// `gz`, `lzo`, `zst`, `bz2`.
    pub compression: Option<String>,
    /// The decompressing command prefix, e.g. `["tar", "--zstd"]` or `["zstd", "-q", "-d",
    /// "-c"]`. `None` for uncompressed archives.
    pub decompressor: Option<Vec<String>>,
}

/// `decompressor_info($format, $comp)`; `tgz` without compression means `tar` + `gz`.
///
/// # Errors
/// `ERROR: archive format not defined` for formats other than tar, vma, iso.
pub fn decompressor_info(
    format: &str,
    compression: Option<&str>,
) -> Result<DecompressorInfo, ArchiveError> {
    let (format, compression) = match (format, compression) {
        ("tgz", None) => ("tar", Some("gz")),
        other => other,
    };
    let table: &[(&str, &[&str])] = match format {
        "tar" => &[
            ("gz", &["tar", "-z"]),
            ("lzo", &["tar", "--lzop"]),
            ("zst", &["tar", "--zstd"]),
            ("bz2", &["tar", "--bzip2"]),
        ],
        "vma" => &[
            ("gz", &["zcat"]),
            ("lzo", &["lzop", "-d", "-c"]),
            ("zst", &["zstd", "-q", "-d", "-c"]),
            ("bz2", &["bzcat", "-q"]),
        ],
        "iso" => &[],
        _ => return Err(ArchiveError::FormatNotDefined),
    };
    let decompressor = compression.and_then(|c| {
        table
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, cmd)| cmd.iter().map(|s| s.to_string()).collect())
    });
    Ok(DecompressorInfo {
        format: format.to_string(),
        compression: compression.map(str::to_string),
        decompressor,
    })
}

/// `archive_info` result. Fields mirror PVE's hash (`type` is `guest_type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiveInfo {
    /// The archive's file name (basename).
    pub filename: String,
    #[serde(rename = "type")]
    pub guest_type: GuestType,
    pub format: String,
    pub compression: Option<String>,
    pub decompressor: Option<Vec<String>>,
    /// `<stem>.log`, standard names only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logfilename: Option<String>,
    /// `<filename>.notes`, standard names only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notesfilename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// Seconds since the epoch, from the name interpreted in local time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctime: Option<i64>,
    pub is_std_name: bool,
}

impl ArchiveInfo {
    /// `<filename>.protected` (the protection marker beside the archive).
    pub fn protected_filename(&self) -> String {
        protected_filename(&self.filename)
    }
}

/// `<archive>.protected`.
pub fn protected_filename(archive: &str) -> String {
    format!("{archive}.protected")
}

/// `<archive>.notes`.
pub fn notes_filename(archive: &str) -> String {
    format!("{archive}.notes")
}

/// [`archive_info_in`] with the system time zone ([`TimeZone::system`], which honours `TZ`).
///
/// # Errors
/// See [`archive_info_in`].
pub fn archive_info(archive: &str) -> Result<ArchiveInfo, ArchiveError> {
    archive_info_in(archive, &TimeZone::system())
}

/// `archive_info`: classify a backup archive by its (base)name; `archive` may be a path or a
/// volid (`local:backup/...`), only the part after the last `/` is looked at.
///
/// # Errors
/// `ERROR: couldn't determine archive info from '<archive>'` for names that are not backup
/// archives; [`ArchiveError::InvalidTime`] for standard names with an impossible date.
pub fn archive_info_in(archive: &str, tz: &TimeZone) -> Result<ArchiveInfo, ArchiveError> {
    let volid = perl_basename(archive);
    let unrecognized = || ArchiveError::Unrecognized(archive.to_string());
    let c = ARCHIVE_RE.captures(volid).ok_or_else(unrecognized)?;
    let filename = c[1].to_string();
    let guest_type = GuestType::from_name(&c[2]).ok_or_else(unrecognized)?;
    let extension = &c[3];
    let compression = c.get(4).map(|m| m.as_str());
    let format = extension.split('.').next().unwrap_or(extension);
    let dec = decompressor_info(format, compression)?;

    let mut info = ArchiveInfo {
        filename,
        guest_type,
        format: dec.format,
        compression: dec.compression,
        decompressor: dec.decompressor,
        logfilename: None,
        notesfilename: None,
        vmid: None,
        ctime: None,
        is_std_name: false,
    };

    let std_re = re(&format!(
        r"^(vzdump-{}-([1-9][0-9]{{2,8}})-([0-9]{{4}})_([0-9]{{2}})_([0-9]{{2}})-([0-9]{{2}})_([0-9]{{2}})_([0-9]{{2}}))\.{}$",
        guest_type.as_str(),
        regex::escape(extension)
    ));
    if let Some(s) = std_re.captures(volid) {
        let num = |i: usize| -> i64 { s[i].parse().unwrap_or(i64::MAX) };
        let ctime =
            timelocal(tz, num(3), num(4), num(5), num(6), num(7), num(8)).map_err(|reason| {
                ArchiveError::InvalidTime {
                    name: archive.to_string(),
                    reason,
                }
            })?;
        info.logfilename = Some(format!("{}.log", &s[1]));
        info.notesfilename = Some(notes_filename(&info.filename));
        info.vmid = Some(s[2].parse().map_err(|_| unrecognized())?);
        info.ctime = Some(ctime);
        info.is_std_name = true;
    }
    Ok(info)
}

/// Perl's `File::Basename::basename`: trailing slashes are ignored.
fn perl_basename(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return path;
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed)
}

/// `Time::Local::timelocal` with PVE's range checks (month 1..12 here, day within the
/// month, hour 0..23, minute and second 0..59).
fn timelocal(
    tz: &TimeZone,
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
) -> Result<i64, String> {
    let check = |what: &str, v: i64, lo: i64, hi: i64| {
        if v < lo || v > hi {
            Err(format!("{what} '{v}' out of range {lo}..{hi}"))
        } else {
            Ok(())
        }
    };
    check("Month", month - 1, 0, 11)?;
    check("Hour", hour, 0, 23)?;
    check("Minute", minute, 0, 59)?;
    check("Second", second, 0, 59)?;
    let as_i8 = |v: i64| i8::try_from(v).map_err(|e| e.to_string());
    let year = i16::try_from(year).map_err(|e| e.to_string())?;
    let first = jiff::civil::date(year, as_i8(month)?, 1);
    let days = i64::from(first.days_in_month());
    check("Day", day, 1, days)?;
    let dt = DateTime::new(
        year,
        as_i8(month)?,
        as_i8(day)?,
        as_i8(hour)?,
        as_i8(minute)?,
        as_i8(second)?,
        0,
    )
    .map_err(|e| e.to_string())?;
    let zoned = dt
        .to_zoned_datetime(tz.clone())
        .map_err(|e| e.to_string())?;
    Ok(zoned.timestamp().as_second())
}

/// The archive name vzdump writes for a container:
/// `vzdump-lxc-<vmid>-YYYY_MM_DD-HH_MM_SS.<ext>` (time as given, normally local time).
pub fn backup_name(vmid: u32, time: &ZonedDateTime, ext: &str) -> String {
    format!(
        "vzdump-lxc-{vmid}-{}.{ext}",
        time.strftime("%Y_%m_%d-%H_%M_%S")
    )
}

/// Whether a file name in a dump directory is a backup archive (`[^/]+$BACKUP_EXT_RE_2`).
pub fn is_backup_file(name: &str) -> bool {
    BACKUP_FILE_RE.is_match(name)
}

/// Whether a file name in `template/cache` is a container template.
pub fn is_vztmpl_file(name: &str) -> bool {
    VZTMPL_FILE_RE.is_match(name)
}

/// Whether a file name in `template/iso` is an ISO image.
pub fn is_iso_file(name: &str) -> bool {
    ISO_FILE_RE.is_match(name)
}

/// The archive's file name (basename) of a path, for callers holding a [`Path`].
pub fn archive_file_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(name: &str) -> Result<ArchiveInfo, ArchiveError> {
        archive_info_in(name, &TimeZone::UTC)
    }

    fn v(list: &[&str]) -> Option<Vec<String>> {
        Some(list.iter().map(|s| s.to_string()).collect())
    }

    /// (extension, compression, decompressor)
    type DecompCase = (&'static str, Option<&'static str>, Option<Vec<String>>);

    // 2020-03-30 21:12:40 UTC
    const CTIME: i64 = 1_585_602_760;

    #[test]
    fn std_names_all_types_formats_compressions() {
        let decomp_tar: &[DecompCase] = &[
            ("tar", None, None),
            ("tgz", Some("gz"), v(&["tar", "-z"])),
            ("tar.gz", Some("gz"), v(&["tar", "-z"])),
            ("tar.lzo", Some("lzo"), v(&["tar", "--lzop"])),
            ("tar.zst", Some("zst"), v(&["tar", "--zstd"])),
            ("tar.bz2", Some("bz2"), v(&["tar", "--bzip2"])),
        ];
        let decomp_vma: &[DecompCase] = &[
            ("vma", None, None),
            ("vma.gz", Some("gz"), v(&["zcat"])),
            ("vma.lzo", Some("lzo"), v(&["lzop", "-d", "-c"])),
            ("vma.zst", Some("zst"), v(&["zstd", "-q", "-d", "-c"])),
            ("vma.bz2", Some("bz2"), v(&["bzcat", "-q"])),
        ];
        for ty in [GuestType::Lxc, GuestType::Openvz, GuestType::Qemu] {
            for (ext, comp, dec) in decomp_tar.iter().chain(decomp_vma) {
                let stem = format!("vzdump-{}-16110-2020_03_30-21_12_40", ty.as_str());
                let name = format!("{stem}.{ext}");
                for archive in [name.clone(), format!("/here/be/dragons/{name}")] {
                    let info = utc(&archive).unwrap();
                    assert_eq!(info.filename, name);
                    assert_eq!(info.guest_type, ty);
                    let fmt = if ext.starts_with("vma") { "vma" } else { "tar" };
                    assert_eq!(info.format, fmt, "{archive}");
                    assert_eq!(info.compression.as_deref(), *comp, "{archive}");
                    assert_eq!(&info.decompressor, dec, "{archive}");
                    assert_eq!(info.logfilename, Some(format!("{stem}.log")));
                    assert_eq!(info.notesfilename, Some(format!("{name}.notes")));
                    assert_eq!(info.vmid, Some(16110));
                    assert_eq!(info.ctime, Some(CTIME));
                    assert!(info.is_std_name);
                }
            }
        }
    }

    #[test]
    fn non_std_names() {
        for name in [
            "vzdump-lxc-16110.tar",
            "vzdump-qemu-99-2020_03_30-21_12_40.vma.zst", // vmid < 100
            "vzdump-lxc-0100-2020_03_30-21_12_40.tar",
            "vzdump-lxc-16110-2020_03_30-21_12_40-extra.tar.zst",
            "vzdump-openvz-my-backup.tgz",
        ] {
            let info = utc(name).unwrap();
            assert!(!info.is_std_name, "{name}");
            assert_eq!(info.vmid, None);
            assert_eq!(info.ctime, None);
            assert_eq!(info.logfilename, None);
            assert_eq!(info.notesfilename, None);
            assert_eq!(info.filename, name);
        }
        let info = utc("vzdump-openvz-my-backup.tgz").unwrap();
        assert_eq!(info.format, "tar");
        assert_eq!(info.compression.as_deref(), Some("gz"));
    }

    #[test]
    fn failures() {
        for name in [
            "/some/path/to/backup.tar.gz",
            "vzdump-lxc-16110-2020_03_30-21_12_40.zip.gz",
            "vzdump-lxc-16110-2020_03_30-21_12_40.tgz.lzo",
            "vzdump-qemu-16110-2020_03_30-21_12_40.vma.xz",
            "vzdump-qemu-16110-2020_03_30-21_12_40.vms.gz",
            "vzdump-none-16110-2020_03_30-21_12_40.tar",
            "vzdump-lxc-.tar",
            "",
        ] {
            assert_eq!(
                utc(name).unwrap_err().to_string(),
                format!("ERROR: couldn't determine archive info from '{name}'")
            );
        }
        assert!(matches!(
            utc("vzdump-lxc-100-2020_13_01-00_00_00.tar"),
            Err(ArchiveError::InvalidTime { .. })
        ));
        assert!(matches!(
            utc("vzdump-lxc-100-2021_02_29-00_00_00.tar"),
            Err(ArchiveError::InvalidTime { .. })
        ));
        assert_eq!(
            decompressor_info("zip", None).unwrap_err().to_string(),
            "ERROR: archive format not defined"
        );
    }

    #[test]
    fn local_time() {
        // CET-1CEST: 21:12:40 local in summer time is 19:12:40 UTC.
        let tz = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let info = archive_info_in("vzdump-lxc-100-2020_03_30-21_12_40.tar", &tz).unwrap();
        assert_eq!(info.ctime, Some(CTIME - 2 * 3600));
        let info = archive_info_in("vzdump-lxc-100-2020_01_30-21_12_40.tar", &tz).unwrap();
        assert_eq!(info.ctime, Some(1_580_418_760 - 3600));
    }

    #[test]
    fn names_and_classifiers() {
        let t: ZonedDateTime = "2020-03-30T21:12:40[UTC]".parse().unwrap();
        let name = backup_name(100, &t, "tar.zst");
        assert_eq!(name, "vzdump-lxc-100-2020_03_30-21_12_40.tar.zst");
        assert_eq!(utc(&name).unwrap().ctime, Some(CTIME));
        assert_eq!(protected_filename(&name), format!("{name}.protected"));
        assert!(is_backup_file("vzdump-lxc-100-2020_03_30-21_12_40.tar.zst"));
        assert!(is_backup_file("anything.vma"));
        assert!(!is_backup_file("x.tar.xz"));
        assert!(is_vztmpl_file("debian-12-standard_12.2-1_amd64.tar.zst"));
        assert!(is_vztmpl_file("alpine.TAR.XZ"));
        assert!(!is_vztmpl_file("alpine.tar.lzo"));
        assert!(is_iso_file("x.ISO"));
        assert!(!is_iso_file("x.dvd"));
    }
}
