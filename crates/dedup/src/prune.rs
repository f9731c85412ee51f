//! `prune-backups` on the snapshots of a store, with the marking of
//! `vzkit_storage::prune` (PVE's `prune_mark_backup_group`).

use vzkit_storage::prune::{PruneEntry, PruneMark, PruneOptions, prune_mark_backup_group};

use crate::error::Result;
use crate::snapshot::{self, SnapshotRef};
use crate::store::Store;

/// Mark the snapshots of group `vmid` (all groups if `None`) and, unless
/// `dry_run`, remove those marked `remove`. Entries are named by
/// `volid(snapshot)`. Protected snapshots are kept and do not count.
///
/// # Errors
/// I/O errors; a group locked by a running backup.
pub fn prune(
    store: &Store,
    vmid: Option<u32>,
    keep: &PruneOptions,
    dry_run: bool,
    volid: &dyn Fn(&SnapshotRef) -> String,
) -> Result<Vec<PruneEntry>> {
    let all = snapshot::list(store, vmid)?;
    let mut groups: std::collections::BTreeMap<u32, Vec<(SnapshotRef, PruneEntry)>> =
        Default::default();
    for s in all.iter().rev() {
        groups.entry(s.snapshot.vmid).or_default().push((
            s.snapshot,
            PruneEntry {
                volid: volid(&s.snapshot),
                ctime: s.snapshot.time,
                mark: s.protected.then_some(PruneMark::Protected),
                guest_type: "lxc".into(),
                vmid: Some(s.snapshot.vmid),
            },
        ));
    }
    let mut out = Vec::new();
    for (_, g) in groups {
        let (snaps, mut entries): (Vec<SnapshotRef>, Vec<PruneEntry>) = g.into_iter().unzip();
        prune_mark_backup_group(&mut entries, keep);
        for (s, e) in snaps.iter().zip(&entries) {
            if !dry_run && e.mark == Some(PruneMark::Remove) {
                snapshot::remove(store, s)?;
            }
        }
        out.extend(entries);
    }
    Ok(out)
}
