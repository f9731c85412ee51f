//! One module per backend, and the factory that picks one for a `storage.cfg` section.

pub mod dir;

use std::sync::Arc;

use vzkit_host::command::Runner;

use crate::config::StorageSection;
use crate::error::{Result, StorageError};
use crate::plugin::StoragePlugin;

/// The backend for a `storage.cfg` section.
///
/// # Errors
/// An error naming the type when vzkit has no backend for it, or when the section is
/// unusable (e.g. a `dir` without `path`).
pub fn plugin_for(
    section: &StorageSection,
    runner: Arc<dyn Runner>,
) -> Result<Arc<dyn StoragePlugin>> {
    match section.storage_type() {
        "dir" => Ok(Arc::new(dir::DirPlugin::new(section.clone(), runner)?)),
        other => Err(StorageError::Unsupported(format!(
            "storage '{}': storage type '{other}' is not supported by this vzkit build",
            section.id()
        ))),
    }
}
