//! End-to-end tests: the real binaries against a scratch `VZKIT_ROOT`, with real loop devices,
//! ext4 images and mounts. They need root and are marked `#[ignore]` with that reason; the
//! project's test command runs them with `--include-ignored` as root.

mod dir_storage;
mod lxc;
mod pct_mounts;
mod refusals;
mod btrfs;
mod pveam;
mod restore;
mod vzdump;
mod zfspool;
mod vm_lvmthin;
