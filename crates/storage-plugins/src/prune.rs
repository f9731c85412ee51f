//! Backup retention: the `prune-backups` property string and the marking algorithm.
//!
//! Compatibility target: pve-storage 0c56bad `$prune_backups_format` +
//! `validate_prune_backups`, `PVE::Storage::prune_mark_backup_group` and
//! `Plugin::prune_backups` (dry-run part: classification and marking).
//!
//! Property string: `keep-all=<0|1>,keep-last=N,keep-hourly=N,keep-daily=N,keep-weekly=N,
//! keep-monthly=N,keep-yearly=N` (all optional, N >= 0). Validation: if no option other than
//! `keep-all` is > 0 the result is `keep-all=1`; otherwise `keep-all=1` is an error. Printing
//! writes the set keys sorted by name, as `print_property_string` does.
//!
//! Marking: per group (guest type + vmid), backups newest first; each `keep-*` option keeps
//! the newest backup of each of its next N periods not already covered by an earlier option;
//! periods are computed in **local time** (the caller's [`TimeZone`]; the plain functions use
//! [`TimeZone::system`], which honours `TZ`); weekly uses the ISO week and ISO week-year.
//! `protected` and `renamed` entries are never touched and do not count.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Serialize, Serializer};

use crate::backup::archive_info_in;
use crate::volid::VolumeId;

/// Errors of the `prune-backups` property string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PruneError {
    /// `parse_property_string`'s schema errors, one `key: message` per entry.
    #[error("format error\n{}", .0.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("\n"))]
    Format(BTreeMap<String, String>),
    #[error("duplicate key in comma-separated list property: {0}")]
    DuplicateKey(String),
    #[error("value without key, but schema does not define a default key")]
    ValueWithoutKey,
    #[error("missing key in comma-separated list property")]
    MissingKey,
    #[error("keep-all cannot be set together with other options.")]
    KeepAllConflict,
}

/// Validated `prune-backups` options. `None` = key not set. Zero-valued keys given alongside
/// a positive one are kept (as PVE does), they simply never keep anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneOptions {
    pub keep_all: Option<bool>,
    pub keep_last: Option<u64>,
    pub keep_hourly: Option<u64>,
    pub keep_daily: Option<u64>,
    pub keep_weekly: Option<u64>,
    pub keep_monthly: Option<u64>,
    pub keep_yearly: Option<u64>,
}

/// The count keys in processing order.
const COUNT_KEYS: [&str; 6] = [
    "keep-last",
    "keep-hourly",
    "keep-daily",
    "keep-weekly",
    "keep-monthly",
    "keep-yearly",
];

impl PruneOptions {
    /// `{keep-all => 1}`.
    pub fn keep_all() -> Self {
        Self {
            keep_all: Some(true),
            ..Self::default()
        }
    }

    fn count(&self, key: &str) -> Option<u64> {
        match key {
            "keep-last" => self.keep_last,
            "keep-hourly" => self.keep_hourly,
            "keep-daily" => self.keep_daily,
            "keep-weekly" => self.keep_weekly,
            "keep-monthly" => self.keep_monthly,
            "keep-yearly" => self.keep_yearly,
            _ => None,
        }
    }

    fn count_mut(&mut self, key: &str) -> Option<&mut Option<u64>> {
        match key {
            "keep-last" => Some(&mut self.keep_last),
            "keep-hourly" => Some(&mut self.keep_hourly),
            "keep-daily" => Some(&mut self.keep_daily),
            "keep-weekly" => Some(&mut self.keep_weekly),
            "keep-monthly" => Some(&mut self.keep_monthly),
            "keep-yearly" => Some(&mut self.keep_yearly),
            _ => None,
        }
    }

    /// Whether everything is kept (`keep-all` set, or no positive count).
    pub fn is_keep_all(&self) -> bool {
        self.keep_all == Some(true) || !COUNT_KEYS.iter().any(|k| self.count(k).unwrap_or(0) > 0)
    }

    /// The set keys and their values as printed (`keep-all` as 0/1), sorted by key.
    pub fn entries(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        if let Some(a) = self.keep_all {
            out.push(("keep-all", u64::from(a)));
        }
        for k in COUNT_KEYS {
            if let Some(v) = self.count(k) {
                out.push((k, v));
            }
        }
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// `validate_prune_backups`.
    ///
    /// # Errors
    /// `keep-all cannot be set together with other options.`
    pub fn validate(self) -> Result<Self, PruneError> {
        let keep_all = self.keep_all;
        let mut rest = self;
        rest.keep_all = None;
        if !COUNT_KEYS.iter().any(|k| rest.count(k).unwrap_or(0) > 0) {
            Ok(Self::keep_all())
        } else if keep_all == Some(true) {
            Err(PruneError::KeepAllConflict)
        } else {
            Ok(rest)
        }
    }

    /// `parse_property_string('prune-backups', ...)` including the format validator.
    ///
    /// # Errors
    /// PVE's property-string errors (`format error\n<key>: <reason>`, duplicate/missing key)
    /// and [`PruneOptions::validate`]'s.
    pub fn parse(s: &str) -> Result<Self, PruneError> {
        let mut raw: BTreeMap<String, String> = BTreeMap::new();
        for part in s.split(',') {
            if part.trim_matches(is_perl_space).is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                    if raw.contains_key(k) {
                        return Err(PruneError::DuplicateKey(k.to_string()));
                    }
                    raw.insert(k.to_string(), v.to_string());
                }
                Some(_) => return Err(PruneError::MissingKey),
                None => return Err(PruneError::ValueWithoutKey),
            }
        }
        let mut opts = PruneOptions::default();
        let mut errors = BTreeMap::new();
        for (k, v) in &raw {
            if k == "keep-all" {
                match parse_boolean(v) {
                    Some(b) => opts.keep_all = Some(b),
                    None => {
                        errors.insert(
                            k.clone(),
                            format!("type check ('boolean') failed - got '{v}'"),
                        );
                    }
                }
            } else if let Some(slot) = opts.count_mut(k) {
                match parse_integer(v) {
                    None => {
                        errors.insert(
                            k.clone(),
                            format!("type check ('integer') failed - got '{v}'"),
                        );
                    }
                    Some(n) if n < 0 => {
                        errors.insert(
                            k.clone(),
                            "value must have a minimum value of 0".to_string(),
                        );
                    }
                    Some(n) => *slot = Some(u64::try_from(n).unwrap_or(u64::MAX)),
                }
            } else {
                errors.insert(
                    k.clone(),
                    "property is not defined in schema and the schema does not allow additional properties"
                        .to_string(),
                );
            }
        }
        if !errors.is_empty() {
            return Err(PruneError::Format(errors));
        }
        opts.validate()
    }
}

impl FromStr for PruneOptions {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for PruneOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .entries()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for PruneOptions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let entries = self.entries();
        let mut m = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            m.serialize_entry(k, &v)?;
        }
        m.end()
    }
}

fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

pub use vzkit_host::schema::parse_boolean;

/// JSON-schema integer check `^[+-]?\d+$`; values beyond `i64` saturate.
pub fn parse_integer(v: &str) -> Option<i64> {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<i64>().unwrap_or(if v.starts_with('-') {
        i64::MIN
    } else {
        i64::MAX
    }))
}

/// The mark of one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneMark {
    Keep,
    Remove,
    Protected,
    Renamed,
}

/// One entry of the prune list (as printed by `pvesm prune-backups --dry-run` in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneEntry {
    pub volid: String,
    pub ctime: i64,
    pub mark: Option<PruneMark>,
    /// `lxc`, `qemu`, `openvz` or `unknown`.
    #[serde(rename = "type")]
    pub guest_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
}

/// A backup as listed by `list_volumes(..., ['backup'])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupEntry {
    pub volid: String,
    /// From the name for standard names, else the file's mtime.
    pub ctime: i64,
    pub protected: bool,
    /// The owner as parsed from the volname (`vzdump-<type>-<vmid>-...`), if any.
    pub vmid: Option<u32>,
}

/// Snapshots of a `dedup` store (`backup/ct/<vmid>/<time>`) are standard container backups.
fn dedup_archive_info(volname: &str) -> Option<crate::backup::ArchiveInfo> {
    let (name, vmid, ctime) = crate::plugins::dedup::parse_snapshot_volname(volname)?;
    Some(crate::backup::ArchiveInfo {
        filename: name,
        guest_type: crate::backup::GuestType::Lxc,
        format: crate::plugins::dedup::FORMAT.into(),
        compression: None,
        decompressor: None,
        logfilename: None,
        notesfilename: None,
        vmid: Some(vmid),
        ctime: Some(ctime),
        is_std_name: true,
    })
}

fn period_id(ctime: i64, key: &str, tz: &TimeZone) -> String {
    if key == "keep-last" {
        return ctime.to_string();
    }
    let Ok(ts) = Timestamp::from_second(ctime) else {
        // Outside jiff's range: every such backup is its own period.
        return format!("out-of-range/{ctime}");
    };
    let z = ts.to_zoned_datetime(tz.clone());
    // Perl's localtime fields: mon is 0-based, year is years since 1900.
    let (hour, mday, mon, year) = (
        z.hour(),
        z.day(),
        i32::from(z.month()) - 1,
        i32::from(z.year()) - 1900,
    );
    match key {
        "keep-hourly" => format!("{hour}/{mday}/{mon}/{year}"),
        "keep-daily" => format!("{mday}/{mon}/{year}"),
        "keep-weekly" => {
            let iso = z.date().iso_week_date();
            format!("{}/{}", iso.week(), iso.year())
        }
        "keep-monthly" => format!("{mon}/{year}"),
        _ => format!("{year}"),
    }
}

/// `$prune_mark`: `list` holds indices into `entries`, newest first.
fn mark_period(
    entries: &mut [PruneEntry],
    list: &[usize],
    keep_count: u64,
    key: &str,
    tz: &TimeZone,
) {
    if keep_count == 0 {
        return;
    }
    let ids: Vec<String> = list
        .iter()
        .map(|&i| period_id(entries[i].ctime, key, tz))
        .collect();
    let already: HashSet<&str> = list
        .iter()
        .zip(&ids)
        .filter(|(i, _)| entries[**i].mark == Some(PruneMark::Keep))
        .map(|(_, id)| id.as_str())
        .collect();
    let mut newly: HashSet<&str> = HashSet::new();
    for (&i, id) in list.iter().zip(&ids) {
        if entries[i].mark.is_some() || already.contains(id.as_str()) {
            continue;
        }
        if !newly.contains(id.as_str()) {
            if newly.len() as u64 >= keep_count {
                break;
            }
            newly.insert(id.as_str());
            entries[i].mark = Some(PruneMark::Keep);
        } else {
            entries[i].mark = Some(PruneMark::Remove);
        }
    }
}

/// [`prune_mark_backup_group_in`] in the system time zone.
pub fn prune_mark_backup_group(group: &mut [PruneEntry], keep: &PruneOptions) {
    prune_mark_backup_group_in(group, keep, &TimeZone::system());
}

/// `prune_mark_backup_group`: mark one group's entries in place (their order is kept).
pub fn prune_mark_backup_group_in(group: &mut [PruneEntry], keep: &PruneOptions, tz: &TimeZone) {
    let positive = COUNT_KEYS.iter().any(|k| keep.count(k).unwrap_or(0) > 0);
    if keep.keep_all == Some(true) || !positive {
        for e in group.iter_mut() {
            if matches!(e.mark, None | Some(PruneMark::Remove)) {
                e.mark = Some(PruneMark::Keep);
            }
        }
        return;
    }
    let mut list: Vec<usize> = (0..group.len()).collect();
    // Perl's sort is a stable merge sort.
    list.sort_by(|&a, &b| group[b].ctime.cmp(&group[a].ctime));
    for key in COUNT_KEYS {
        mark_period(group, &list, keep.count(key).unwrap_or(0), key, tz);
    }
    for e in group.iter_mut() {
        e.mark.get_or_insert(PruneMark::Remove);
    }
}

/// [`prune_mark_in`] in the system time zone.
pub fn prune_mark(
    backups: &[BackupEntry],
    keep: &PruneOptions,
    vmid: Option<u32>,
    guest_type: Option<&str>,
) -> Vec<PruneEntry> {
    prune_mark_in(backups, keep, vmid, guest_type, &TimeZone::system())
}

/// `Plugin::prune_backups` without the removal: classify each backup with `archive_info`,
/// filter by vmid (as `list_volumes` does) and guest type, group standard names by
/// `<type>/<vmid>`, mark renamed and protected ones, and mark each group. The result keeps
/// the input order.
pub fn prune_mark_in(
    backups: &[BackupEntry],
    keep: &PruneOptions,
    vmid: Option<u32>,
    guest_type: Option<&str>,
    tz: &TimeZone,
) -> Vec<PruneEntry> {
    let mut list: Vec<PruneEntry> = Vec::new();
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for b in backups {
        if vmid.is_some() && b.vmid != vmid {
            continue;
        }
        let name = VolumeId::parse(&b.volid)
            .map(|v| v.volname)
            .unwrap_or_else(|_| b.volid.clone());
        let ai = archive_info_in(&name, tz)
            .ok()
            .or_else(|| dedup_archive_info(&name));
        let btype = ai
            .as_ref()
            .map_or("unknown", |a| a.guest_type.as_str())
            .to_string();
        if guest_type.is_some_and(|t| t != btype) {
            continue;
        }
        let bvmid = ai.as_ref().and_then(|a| a.vmid).or(b.vmid);
        let mut e = PruneEntry {
            volid: b.volid.clone(),
            ctime: b.ctime,
            mark: None,
            guest_type: btype.clone(),
            vmid: bvmid,
        };
        match ai.as_ref().filter(|a| a.is_std_name) {
            Some(a) => {
                e.ctime = a.ctime.unwrap_or(b.ctime);
                let key = format!(
                    "{btype}/{}",
                    bvmid.map(|v| v.to_string()).unwrap_or_default()
                );
                groups.entry(key).or_default().push(list.len());
            }
            None => e.mark = Some(PruneMark::Renamed),
        }
        if b.protected {
            e.mark = Some(PruneMark::Protected);
        }
        list.push(e);
    }
    for idx in groups.values() {
        let mut group: Vec<PruneEntry> = idx.iter().map(|&i| list[i].clone()).collect();
        prune_mark_backup_group_in(&mut group, keep, tz);
        for (&i, e) in idx.iter().zip(group) {
            list[i] = e;
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let cases = [
            ("keep-all=1", "keep-all=1"),
            ("keep-last=0", "keep-all=1"),
            ("", "keep-all=1"),
            ("keep-all=0", "keep-all=1"),
            ("keep-all=0,keep-last=10", "keep-last=10"),
            ("keep-last=10,keep-hourly=0", "keep-hourly=0,keep-last=10"),
            (
                "keep-yearly=6,keep-last=1,keep-hourly=2,keep-daily=3,keep-weekly=4,keep-monthly=5",
                "keep-daily=3,keep-hourly=2,keep-last=1,keep-monthly=5,keep-weekly=4,keep-yearly=6",
            ),
            ("keep-all=yes", "keep-all=1"),
            (" ,keep-last=3,,", "keep-last=3"),
            ("keep-last=+3", "keep-last=3"),
        ];
        for (input, printed) in cases {
            let p = PruneOptions::parse(input).unwrap();
            assert_eq!(p.to_string(), printed, "{input}");
            assert_eq!(PruneOptions::parse(printed).unwrap(), p);
        }
    }

    #[test]
    fn parse_errors() {
        let cases = [
            (
                "keep-all=1,keep-last=1",
                "keep-all cannot be set together with other options.",
            ),
            (
                "foo=bar",
                "format error\nfoo: property is not defined in schema and the schema does not allow additional properties",
            ),
            (
                "keep-last=x",
                "format error\nkeep-last: type check ('integer') failed - got 'x'",
            ),
            (
                "keep-last=-1",
                "format error\nkeep-last: value must have a minimum value of 0",
            ),
            (
                "keep-all=maybe",
                "format error\nkeep-all: type check ('boolean') failed - got 'maybe'",
            ),
            (
                "keep-last=1,keep-last=2",
                "duplicate key in comma-separated list property: keep-last",
            ),
            (
                "keep-last",
                "value without key, but schema does not define a default key",
            ),
            ("keep-last=", "missing key in comma-separated list property"),
            // no trimming of keys, as in PVE
            (
                " keep-last=3",
                "format error\n keep-last: property is not defined in schema and the schema does not allow additional properties",
            ),
        ];
        for (input, msg) in cases {
            assert_eq!(
                PruneOptions::parse(input).unwrap_err().to_string(),
                msg,
                "{input}"
            );
        }
    }

    #[test]
    fn serialize_json() {
        let p = PruneOptions::parse("keep-last=2,keep-daily=1").unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"keep-last": 2, "keep-daily": 1})
        );
    }
}
