//! Id maps between container-side ids (as stored in archives) and host ids.
//!
//! An entry is PVE's `lxc.idmap` `u|g <container start> <host start> <count>`
//! (pve-container `parse_id_maps`). Archives store container-side ids (vzdump
//! runs tar inside the user namespace); extraction maps them to host ids, and
//! our writer, running as host root, maps host ids back. Parsing `lxc.idmap`
//! lines is the config crate's business; this module is only the arithmetic.

/// Which id space an entry maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// User ids (`u`).
    Uid,
    /// Group ids (`g`).
    Gid,
}

/// One `lxc.idmap` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdMapEntry {
    /// Uid or gid range.
    pub kind: IdKind,
    /// First id inside the container.
    pub container: u32,
    /// First id on the host.
    pub host: u32,
    /// Number of ids.
    pub count: u32,
}

/// A set of id ranges, as for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    entries: Vec<IdMapEntry>,
}

/// The id an unmappable owner shows as inside a user namespace
/// (`/proc/sys/kernel/overflowuid`, default 65534).
pub const OVERFLOW_ID: u32 = 65534;

impl IdMap {
    /// A map of the given ranges.
    #[must_use]
    pub fn new(entries: Vec<IdMapEntry>) -> Self {
        IdMap { entries }
    }

    /// PVE's default map of unprivileged containers: `u 0 100000 65536`,
    /// `g 0 100000 65536`.
    #[must_use]
    pub fn pve_default_unprivileged() -> Self {
        IdMap::new(vec![
            IdMapEntry {
                kind: IdKind::Uid,
                container: 0,
                host: 100_000,
                count: 65536,
            },
            IdMapEntry {
                kind: IdKind::Gid,
                container: 0,
                host: 100_000,
                count: 65536,
            },
        ])
    }

    /// The ranges.
    #[must_use]
    pub fn entries(&self) -> &[IdMapEntry] {
        &self.entries
    }

    /// Container id → host id, `None` if unmapped.
    #[must_use]
    pub fn to_host(&self, kind: IdKind, id: u64) -> Option<u32> {
        self.entries
            .iter()
            .filter(|e| e.kind == kind)
            .find_map(|e| {
                let off = id.checked_sub(u64::from(e.container))?;
                (off < u64::from(e.count))
                    .then(|| e.host as u64 + off)?
                    .try_into()
                    .ok()
            })
    }

    /// Host id → container id, `None` if unmapped.
    #[must_use]
    pub fn to_container(&self, kind: IdKind, id: u64) -> Option<u32> {
        self.entries
            .iter()
            .filter(|e| e.kind == kind)
            .find_map(|e| {
                let off = id.checked_sub(u64::from(e.host))?;
                (off < u64::from(e.count))
                    .then(|| e.container as u64 + off)?
                    .try_into()
                    .ok()
            })
    }
}

/// Direction in which an [`IdMap`] is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Archive (container) ids to host ids: extraction.
    ToHost,
    /// Host ids to archive (container) ids: archiving.
    ToContainer,
}

impl IdMap {
    pub(crate) fn map(&self, dir: Direction, kind: IdKind, id: u64) -> Option<u32> {
        match dir {
            Direction::ToHost => self.to_host(kind, id),
            Direction::ToContainer => self.to_container(kind, id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_map_table() {
        let m = IdMap::pve_default_unprivileged();
        let cases = [
            (IdKind::Uid, 0, Some(100_000), None),
            (IdKind::Uid, 65535, Some(165_535), None),
            (IdKind::Uid, 65536, None, None),
            (IdKind::Gid, 33, Some(100_033), None),
            (IdKind::Uid, 100_000, None, Some(0)),
            (IdKind::Gid, 165_536, None, None),
        ];
        for (kind, id, host, _) in cases {
            assert_eq!(m.to_host(kind, id), host, "{kind:?} {id}");
        }
        for (kind, id, _, ct) in cases.iter().filter(|c| c.1 >= 100_000) {
            assert_eq!(m.to_container(*kind, *id), *ct, "{kind:?} {id}");
        }
        assert_eq!(m.to_container(IdKind::Uid, 5), None);
        assert_eq!(m.to_host(IdKind::Uid, u64::MAX), None);
    }

    #[test]
    fn split_ranges() {
        let m = IdMap::new(vec![
            IdMapEntry {
                kind: IdKind::Uid,
                container: 0,
                host: 100_000,
                count: 1000,
            },
            IdMapEntry {
                kind: IdKind::Uid,
                container: 1000,
                host: 1000,
                count: 1,
            },
            IdMapEntry {
                kind: IdKind::Uid,
                container: 1001,
                host: 101_001,
                count: 64535,
            },
        ]);
        assert_eq!(m.to_host(IdKind::Uid, 1000), Some(1000));
        assert_eq!(m.to_host(IdKind::Uid, 1001), Some(101_001));
        assert_eq!(m.to_container(IdKind::Uid, 1000), Some(1000));
        assert_eq!(m.to_host(IdKind::Gid, 0), None);
    }
}
