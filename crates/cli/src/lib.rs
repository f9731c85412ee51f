//! The `vzdump`, `pct` and `pvesm` front ends: parse arguments, call the library, print.
//! No logic lives here beyond formatting.

pub mod args;
pub mod common;
pub mod output;
pub mod pct;
pub mod pct_lifecycle;
pub mod pct_snapshot;
pub mod pveam;
pub mod pvesm;
pub mod vzdump;
