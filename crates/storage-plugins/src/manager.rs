//! Volume-id level operations over all configured storages (PVE's `PVE::Storage` wrappers).
//!
//! [`Storages`] loads `storage.cfg` from the relocatable root (falling back to the embedded
//! default: one `dir` storage `local` at `<root>/var/lib/vz`), maps a volume id to its
//! backend, and runs allocations under the per-storage lock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vzkit_host::command::Runner;
use vzkit_host::lock::FileLock;
use vzkit_host::paths::Layout;

use crate::config::{ContentType, StorageConfig, StorageSection};
use crate::error::{Result, StorageError};
use crate::plugin::{StoragePlugin, StorageStatus, VolumeInfo};
use crate::plugins::plugin_for;
use crate::volid::VolumeId;

/// How long to wait for a storage lock.
const STORAGE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// All storages of one host.
#[derive(Debug, Clone)]
pub struct Storages {
    layout: Layout,
    cfg: StorageConfig,
    runner: Arc<dyn Runner>,
}

impl Storages {
    /// Loads `storage.cfg` under `layout` (or the embedded default when it does not exist).
    /// Returns the parser's warnings alongside.
    ///
    /// # Errors
    /// When the file exists but cannot be read.
    pub fn load(layout: Layout, runner: Arc<dyn Runner>) -> Result<(Self, Vec<String>)> {
        let path = layout.storage_cfg();
        let (mut cfg, warnings) = match std::fs::read_to_string(&path) {
            Ok(text) => StorageConfig::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (StorageConfig::default(), Vec::new())
            }
            Err(e) => return Err(StorageError::io("unable to read", &path, e)),
        };
        cfg.ensure_local(layout.default_local_path());
        Ok((
            Self {
                layout,
                cfg,
                runner,
            },
            warnings,
        ))
    }

    /// A view over an already parsed configuration.
    #[must_use]
    pub fn with_config(layout: Layout, cfg: StorageConfig, runner: Arc<dyn Runner>) -> Self {
        Self {
            layout,
            cfg,
            runner,
        }
    }

    /// The parsed configuration.
    #[must_use]
    pub fn config(&self) -> &StorageConfig {
        &self.cfg
    }

    /// The path layout.
    #[must_use]
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The command runner the backends use.
    #[must_use]
    pub fn runner(&self) -> Arc<dyn Runner> {
        Arc::clone(&self.runner)
    }

    /// The section of `storeid`.
    ///
    /// # Errors
    /// "storage 'X' does not exist".
    pub fn section(&self, storeid: &str) -> Result<&StorageSection> {
        self.cfg
            .get(storeid)
            .ok_or_else(|| StorageError::NotFound(format!("storage '{storeid}' does not exist")))
    }

    /// The backend of `storeid` (refusing disabled storages).
    ///
    /// # Errors
    /// Unknown or disabled storage, or a type vzkit has no backend for.
    pub fn plugin(&self, storeid: &str) -> Result<Arc<dyn StoragePlugin>> {
        let section = self.section(storeid)?;
        if section.is_disabled() {
            return Err(StorageError::Invalid(format!(
                "storage '{storeid}' is disabled"
            )));
        }
        plugin_for(section, Arc::clone(&self.runner), &self.layout)
    }

    /// The backend and volume name of a volume id.
    ///
    /// # Errors
    /// A malformed volume id or an unknown storage.
    pub fn resolve(&self, volid: &str) -> Result<(Arc<dyn StoragePlugin>, String)> {
        let id = VolumeId::parse(volid).map_err(|e| StorageError::Invalid(e.to_string()))?;
        let plugin = self.plugin(&id.storage)?;
        plugin.parse_volname(&id.volname)?;
        Ok((plugin, id.volname))
    }

    /// Allocates a volume on `storeid` under the storage lock; returns its volume id.
    ///
    /// # Errors
    /// Unknown storage, lock timeout, backend failure.
    pub async fn vdisk_alloc(
        &self,
        storeid: &str,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> Result<String> {
        let plugin = self.plugin(storeid)?;
        plugin.activate_storage().await?;
        let _lock = self.lock_storage(storeid)?;
        let volname = plugin.alloc_image(vmid, format, name, size_kib).await?;
        Ok(format!("{storeid}:{volname}"))
    }

    /// Frees a volume under the storage lock.
    ///
    /// # Errors
    /// Malformed volid, unknown storage, backend failure.
    pub async fn vdisk_free(&self, volid: &str) -> Result<()> {
        let (plugin, volname) = self.resolve(volid)?;
        plugin.activate_storage().await?;
        let _lock = self.lock_storage(plugin.id())?;
        plugin.free_image(&volname).await
    }

    /// The host path of a volume.
    ///
    /// # Errors
    /// Malformed volid or unknown storage.
    pub async fn path(&self, volid: &str, snapname: Option<&str>) -> Result<PathBuf> {
        let (plugin, volname) = self.resolve(volid)?;
        plugin.path(&volname, snapname).await
    }

    /// Lists volumes on `storeid`, optionally filtered by content and owner, sorted by volid.
    /// Guest volumes of containers that have a config on this host report content `rootdir`.
    ///
    /// # Errors
    /// Unknown storage or backend failure.
    pub async fn list(
        &self,
        storeid: &str,
        content: Option<ContentType>,
        vmid: Option<u32>,
    ) -> Result<Vec<VolumeInfo>> {
        let plugin = self.plugin(storeid)?;
        plugin.activate_storage().await?;
        let configured = plugin.content();
        let wanted: Vec<ContentType> = match content {
            Some(c) => {
                if !configured.contains(&c) {
                    return Ok(Vec::new());
                }
                vec![c]
            }
            None => configured,
        };
        let mut vols = plugin.list_volumes(vmid, &wanted).await?;
        for v in &mut vols {
            if v.content == "images" && v.vmid.is_some_and(|id| self.layout.ct_conf(id).exists()) {
                v.content = "rootdir".into();
            }
        }
        vols.retain(|v| match content {
            Some(ContentType::Images) => v.content == "images",
            Some(ContentType::Rootdir) => v.content == "rootdir",
            _ => true,
        });
        vols.sort_by_key(|v| v.volid.to_lowercase());
        Ok(vols)
    }

    /// Status of every enabled storage, in configuration order.
    pub async fn status_all(&self) -> Vec<(StorageSection, Result<StorageStatus>)> {
        let mut res = Vec::new();
        for section in self.cfg.sections() {
            let status = async {
                let plugin = self.plugin(section.id())?;
                plugin.activate_storage().await?;
                plugin.status().await
            }
            .await;
            res.push((section.clone(), status));
        }
        res
    }

    /// Takes the per-storage lock (`/var/lock/pve-manager/pve-storage-<id>`).
    ///
    /// # Errors
    /// On timeout.
    pub fn lock_storage(&self, storeid: &str) -> Result<FileLock> {
        FileLock::acquire(
            &self.layout.storage_lock(storeid),
            STORAGE_LOCK_TIMEOUT,
            false,
        )
        .map_err(|e| StorageError::Failed(e.to_string()))
    }
}
