//! Which containers use a volume: refuse to free or re-attach a volume that a config still
//! references (as a mount point, an unused volume, or in a snapshot).

use vzkit_host::paths::Layout;

use crate::error::Result;
use crate::store::CtStore;

/// The (vmid, key) pairs of every container config on this host that references `volid`.
/// Snapshot references are reported as `<snapshot>:<key>`.
///
/// # Errors
/// When a config cannot be read. Configs that do not parse are reported as errors too:
/// guessing "unused" for a config we cannot read could lose data.
pub fn volume_users(layout: &Layout, volid: &str) -> Result<Vec<(u32, String)>> {
    let store = CtStore::new(layout.clone());
    let mut users = Vec::new();
    for vmid in store.list()? {
        let conf = store.load(vmid)?;
        let mut sections = vec![(String::new(), &conf.main)];
        sections.extend(conf.snapshots.iter().map(|(n, s)| (format!("{n}:"), s)));
        for (prefix, section) in sections {
            for (key, value) in &section.options {
                let is_vol_key = key == "rootfs"
                    || key
                        .strip_prefix("mp")
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                    || key
                        .strip_prefix("unused")
                        .is_some_and(|n| n.parse::<u32>().is_ok());
                if !is_vol_key {
                    continue;
                }
                let vol = value.split(',').next().unwrap_or_default();
                let vol = vol.strip_prefix("volume=").unwrap_or(vol);
                if vol == volid {
                    users.push((vmid, format!("{prefix}{key}")));
                }
            }
        }
    }
    Ok(users)
}
