//! Storage: `storage.cfg`, volume ids and names, backup archive names and pruning, the
//! plugin trait and one module per backend, and volume-id level operations over all
//! configured storages.

pub mod backup;
pub mod config;
pub mod error;
pub mod manager;
pub mod plugin;
pub mod plugins;
pub mod prune;
pub mod volid;
