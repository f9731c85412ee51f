//! Restoring containers: `pct restore` from vzdump archives, `pct create` from OS
//! templates, `pvesm extractconfig`, and the appliance index behind `pveam`.
//!
//! | module | what | PVE counterpart |
//! |---|---|---|
//! | [`extractconfig`] | the backed-up `pct.conf` of an archive | `extract_vzdump_config` |
//! | [`plan`] | parameters → volumes to create, config merge (pure) | `create_vm` param split, `recover_config`, `sanitize_and_merge_config` |
//! | [`restore`] | the executor: lock, allocate, mount, extract, merge, clean up | `create_vm` worker, `restore_archive` |
//! | [`flush`] | write-back of the new volumes during the extraction | — |
//! | [`ostype`] | OS type detection from files | `PVE::LXC::Setup` |
//! | [`throttle`] | `--bwlimit` on the archive stream | `cstream -t` |
//! | [`appliance`] | `aplinfo` index, template download with checksum | `PVE::APLInfo` |
//!
//! Departure from PVE: with `--force`, the old container's volumes are freed only after the
//! new restore has succeeded, so a failed forced restore loses nothing.

pub mod appliance;
pub mod error;
pub mod extractconfig;
pub mod flush;
pub mod ostype;
pub mod plan;
pub mod restore;
pub mod throttle;

pub use error::{RestoreError, Result};
