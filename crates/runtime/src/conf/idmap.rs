//! Container id maps: the `lxc.idmap` raw keys of a container config.
//!
//! ```text
//! lxc.idmap: u 0 100000 1005
//! lxc.idmap: g 0 100000 1007
//! ```
//!
//! Compatibility target: pve-container `PVE::LXC::parse_id_maps`, `validate_id_maps` and
//! `userns_command` (tested upstream by `src/test/idmap-test.pm`). An unprivileged container
//! without explicit entries gets `u 0 100000 65536` / `g 0 100000 65536`; a privileged one
//! an empty map. Validation sorts each (type, side) list by start id and compares only
//! neighbours, as upstream does — so a range that contains a later, non-adjacent range is
//! not reported (the upstream test documents this limitation and so does ours).

use super::error::ConfError;

/// Whether an entry maps user or group ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// `u`
    User,
    /// `g`
    Group,
}

impl IdKind {
    /// `u` or `g`.
    #[must_use]
    pub fn letter(self) -> char {
        match self {
            Self::User => 'u',
            Self::Group => 'g',
        }
    }
}

/// One `lxc.idmap` entry: `count` ids from `ct_start` inside map to `host_start` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdMapEntry {
    /// User or group ids.
    pub kind: IdKind,
    /// First container id.
    pub ct_start: u64,
    /// First host id.
    pub host_start: u64,
    /// Number of ids.
    pub count: u64,
}

impl IdMapEntry {
    /// Parses `^([ug])\s+(\d+)\s+(\d+)\s+(\d+)\s*$`.
    ///
    /// # Errors
    /// `failed to parse idmap: <value>`.
    pub fn parse(value: &str) -> Result<Self, ConfError> {
        let err = || ConfError::IdMap(format!("failed to parse idmap: {value}"));
        let is_ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
        let mut chars = value.chars();
        let kind = match chars.next() {
            Some('u') => IdKind::User,
            Some('g') => IdKind::Group,
            _ => return Err(err()),
        };
        let rest = chars.as_str();
        // Each number must be preceded by at least one whitespace character.
        let mut nums = [0u64; 3];
        let mut cur = rest;
        for n in &mut nums {
            let trimmed = cur.trim_start_matches(is_ws);
            if trimmed.len() == cur.len() {
                return Err(err());
            }
            let end = trimmed
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(trimmed.len());
            if end == 0 {
                return Err(err());
            }
            *n = trimmed[..end].parse().map_err(|_| err())?;
            cur = &trimmed[end..];
        }
        if !cur.chars().all(is_ws) {
            return Err(err());
        }
        Ok(Self {
            kind,
            ct_start: nums[0],
            host_start: nums[1],
            count: nums[2],
        })
    }

    /// `t ct host count`, as the entry is quoted in PVE's messages.
    #[must_use]
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.kind.letter(),
            self.ct_start,
            self.host_start,
            self.count
        )
    }

    /// The host id of container id `id`, if this entry covers it.
    #[must_use]
    pub fn map(&self, kind: IdKind, id: u64) -> Option<u64> {
        if kind != self.kind || id < self.ct_start || id - self.ct_start >= self.count {
            return None;
        }
        self.host_start.checked_add(id - self.ct_start)
    }
}

/// A container's id map with the host ids of container root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    /// Entries in config order (empty for privileged containers).
    pub entries: Vec<IdMapEntry>,
    /// Host uid of container uid 0.
    pub root_uid: u64,
    /// Host gid of container gid 0.
    pub root_gid: u64,
}

/// First host id of PVE's default unprivileged map.
pub const DEFAULT_HOST_START: u64 = 100_000;
/// Size of PVE's default unprivileged map.
pub const DEFAULT_COUNT: u64 = 65_536;

impl IdMap {
    /// `parse_id_maps`: collects `lxc.idmap` (and deprecated `lxc.id_map`) entries from the
    /// raw lxc keys; without entries an unprivileged container gets the default map.
    ///
    /// # Errors
    /// `failed to parse idmap: <value>` for a malformed entry.
    pub fn from_lxc<'a>(
        lxc: impl IntoIterator<Item = (&'a str, &'a str)>,
        unprivileged: bool,
    ) -> Result<Self, ConfError> {
        let mut entries = Vec::new();
        let (mut root_uid, mut root_gid) = (0, 0);
        for (key, value) in lxc {
            if key != "lxc.idmap" && key != "lxc.id_map" {
                continue;
            }
            let e = IdMapEntry::parse(value)?;
            if e.ct_start == 0 {
                match e.kind {
                    IdKind::User => root_uid = e.host_start,
                    IdKind::Group => root_gid = e.host_start,
                }
            }
            entries.push(e);
        }
        if entries.is_empty() && unprivileged {
            return Ok(Self::default_unprivileged());
        }
        Ok(Self {
            entries,
            root_uid,
            root_gid,
        })
    }

    /// `u 0 100000 65536` / `g 0 100000 65536`, root 100000:100000.
    #[must_use]
    pub fn default_unprivileged() -> Self {
        let entry = |kind| IdMapEntry {
            kind,
            ct_start: 0,
            host_start: DEFAULT_HOST_START,
            count: DEFAULT_COUNT,
        };
        Self {
            entries: vec![entry(IdKind::User), entry(IdKind::Group)],
            root_uid: DEFAULT_HOST_START,
            root_gid: DEFAULT_HOST_START,
        }
    }

    /// `true` when there is no mapping (privileged container).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Host id of container id `id`: the first entry covering it. With an empty map ids are
    /// identical; with a map, unmapped ids give `None`.
    #[must_use]
    pub fn map_to_host(&self, kind: IdKind, id: u64) -> Option<u64> {
        if self.entries.is_empty() {
            return Some(id);
        }
        self.entries.iter().find_map(|e| e.map(kind, id))
    }

    /// The arguments `userns_command` puts after `lxc-usernsexec`:
    /// `-m u:0:100000:65536 -m g:0:100000:65536 --`; empty for an empty map.
    #[must_use]
    pub fn usernsexec_args(&self) -> Vec<String> {
        if self.entries.is_empty() {
            return Vec::new();
        }
        let mut args = Vec::with_capacity(self.entries.len() * 2 + 1);
        for e in &self.entries {
            args.push("-m".to_string());
            args.push(format!(
                "{}:{}:{}:{}",
                e.kind.letter(),
                e.ct_start,
                e.host_start,
                e.count
            ));
        }
        args.push("--".to_string());
        args
    }

    /// `validate_id_maps`: per type (`u`, then `g`) and side (container, then host), sorts
    /// the ranges by start and reports the first pair of neighbours that overlap.
    ///
    /// # Errors
    /// `invalid map entry '<entry>': <side> <t>id <id> is also mapped by entry '<other>'`.
    pub fn validate(&self) -> Result<(), ConfError> {
        for kind in [IdKind::User, IdKind::Group] {
            for side in ["container", "host"] {
                let mut ranges: Vec<(u64, u64, usize)> = self
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.kind == kind)
                    .map(|(i, e)| {
                        let start = if side == "host" {
                            e.host_start
                        } else {
                            e.ct_start
                        };
                        (start, e.count, i)
                    })
                    .collect();
                // Stable, like Perl's merge sort.
                ranges.sort_by_key(|r| r.0);
                for pair in ranges.windows(2) {
                    let (prev, cur) = (pair[0], pair[1]);
                    if u128::from(prev.0) + u128::from(prev.1) > u128::from(cur.0) {
                        return Err(ConfError::IdMap(format!(
                            "invalid map entry '{}': {side} {}id {} is also mapped by entry '{}'",
                            self.entries[cur.2].to_line(),
                            kind.letter(),
                            cur.0,
                            self.entries[prev.2].to_line(),
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}
