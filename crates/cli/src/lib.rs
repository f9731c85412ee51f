//! The `vzdump`, `pct` and `pvesm` front ends: parse arguments, call the library, print.
//! No logic lives here beyond formatting.

pub mod args;
pub mod common;
pub mod output;
pub mod pct;
pub mod pveam;
pub mod pvesm;
pub mod vzdump;
