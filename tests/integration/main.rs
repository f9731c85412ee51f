//! End-to-end tests: the real binaries against a scratch `VZKIT_ROOT`, with real loop devices,
//! ext4 images and mounts. They need root and are marked `#[ignore]` with that reason; the
//! project's test command runs them with `--include-ignored` as root.

mod btrfs;
/// Tree fixtures and GNU tar helpers shared with the archive crate's tests.
#[path = "../../crates/archive/tests/common/mod.rs"]
mod common;
mod dedup;
mod dir_storage;
mod iscsi;
mod lxc;
mod lxc_systemd;
mod pct_mounts;
mod pveam;
mod rbd;
mod refusals;
mod restore;
mod snapshots;
mod vm_iscsi;
mod vm_lvmthin;
mod vzdump;
mod vzdump_running;
mod zfspool;
