//! The container runtime: the `pct.conf` model and formats, config storage and locks, mount
//! points (quota, ACL, bind and device mounts), volume allocation for containers, and the
//! `pct` operations built on them.
//!
//! This is the only crate that knows what a container is.

pub mod conf;
pub mod ct;
pub mod disks;
pub mod error;
pub mod hook;
pub mod lxc;
pub mod mount;
pub mod setup;
pub mod snapshot;
pub mod store;
pub mod usage;
