//! Storage: `storage.cfg`, volume ids and names, backup archive names and pruning, the
//! plugin trait and one module per backend.

pub mod backup;
pub mod config;
pub mod prune;
pub mod volid;
