//! What vzkit asks of the host operating system: running commands, lock files, mounts and
//! loop devices, the relocatable path layout, and size units.
//!
//! Nothing here knows what a container or a storage is; higher layers build on these pieces.

pub mod command;
pub mod lock;
pub mod mount;
pub mod paths;
pub mod schema;
pub mod size;
