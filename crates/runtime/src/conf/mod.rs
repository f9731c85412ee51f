//! Container configuration formats, pure (no I/O): the `pct.conf` file, its property
//! strings and the id maps derived from it.
//!
//! | module | format | PVE counterpart |
//! |---|---|---|
//! | [`pct_conf`] | `/etc/pve/lxc/<vmid>.conf`, `etc/vzdump/pct.conf` | `parse_pct_config`, `write_pct_config` |
//! | [`options`] | top-level option schema and value checks | `$confdesc`, `check_type` |
//! | [`mountpoint`] | `rootfs`, `mpN`, `unusedN`, `STORAGE:SIZE` | `parse_volume`, `print_ct_mountpoint`, `NEW_DISK_RE` |
//! | [`net`] | `netN`, `devN`, MAC generation | `$netconf_desc`, `$dev_desc`, `random_ether_addr` |
//! | [`idmap`] | `lxc.idmap` | `parse_id_maps`, `validate_id_maps` |
//! | [`pending`] | `[pve:pending]` `delete:` list | `AbstractConfig` pending helpers |
//!
//! Round trips are exact for files PVE writes: `CtConfig::parse(t)?.write()? == t`. All
//! messages are PVE's, so users can search for them.

pub mod error;
pub mod idmap;
pub mod mountpoint;
pub mod net;
pub mod options;
pub mod pct_conf;
pub mod pending;
pub(crate) mod propstring;

pub use error::ConfError;
pub use idmap::{IdKind, IdMap, IdMapEntry};
pub use mountpoint::{
    MountPoint, MountPointKind, MpIdMap, MpIdMapEntry, classify_mountpoint, parse_mp,
    parse_new_disk, parse_rootfs, parse_unused, parse_volume,
};
pub use net::{DEFAULT_MAC_PREFIX, DevConfig, NetConfig, random_ether_addr};
pub use pct_conf::{ConfigSection, CtConfig, Lock, LxcKeyValidity, SnapState, lxc_key_validity};
pub use pending::{PendingDelete, parse_pending_delete, print_pending_delete};
