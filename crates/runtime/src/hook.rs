//! The container `hookscript` (PVE's `PVE::GuestHelpers::exec_hookscript`).
//!
//! The script is a volume in a storage's `snippets` content (`local:snippets/hook.sh`). It
//! is run as `<script> <vmid> <phase>` for the phases `pre-start`, `post-start`, `pre-stop`
//! and `post-stop`. A failing `pre-start` (or `pre-stop`) hook aborts the operation
//! ("hookscript error for <vmid> on <phase>: …"); failures in the other phases are only
//! warned about, as in PVE.

use vzkit_host::command::Cmd;
use vzkit_storage::manager::Storages;
use vzkit_storage::volid::VolumeType;

use crate::conf::CtConfig;
use crate::error::{Result, RuntimeError};

/// A phase of the container life cycle that runs the hookscript.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the container starts (failure aborts the start).
    PreStart,
    /// After the container started.
    PostStart,
    /// Before the container is stopped or shut down (failure aborts the stop).
    PreStop,
    /// After the container stopped and its volumes were unmounted.
    PostStop,
}

impl Phase {
    /// The phase name passed to the script.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreStart => "pre-start",
            Phase::PostStart => "post-start",
            Phase::PreStop => "pre-stop",
            Phase::PostStop => "post-stop",
        }
    }

    /// Whether a failure aborts the operation (PVE's `stop_on_error`).
    #[must_use]
    pub fn stops_on_error(self) -> bool {
        matches!(self, Phase::PreStart | Phase::PreStop)
    }
}

/// `check_hookscript`: the host path of the script volume `volid`.
///
/// # Errors
/// "'<volid>' is not in the snippets directory", "script '<volid>' does not exist",
/// "script '<volid>' is not executable", storage errors.
pub async fn check_hookscript(storages: &Storages, volid: &str) -> Result<std::path::PathBuf> {
    let (plugin, volname) = storages.resolve(volid)?;
    let parsed = plugin.parse_volname(&volname)?;
    if parsed.vtype != VolumeType::Snippets {
        return Err(RuntimeError::Invalid(format!(
            "'{volid}' is not in the snippets directory"
        )));
    }
    let path = plugin.path(&volname, None).await?;
    let meta = std::fs::metadata(&path)
        .ok()
        .filter(std::fs::Metadata::is_file);
    let Some(meta) = meta else {
        return Err(RuntimeError::Invalid(format!(
            "script '{volid}' does not exist"
        )));
    };
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(RuntimeError::Invalid(format!(
            "script '{volid}' is not executable"
        )));
    }
    Ok(path)
}

/// Runs the container's hookscript (if it has one) for `phase`. Failures in phases that do
/// not stop on error are passed to `warn`.
///
/// # Errors
/// "hookscript error for <vmid> on <phase>: <reason>" in the phases that stop on error.
pub async fn exec_hookscript(
    storages: &Storages,
    conf: &CtConfig,
    vmid: u32,
    phase: Phase,
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let Some(volid) = conf.get("hookscript") else {
        return Ok(());
    };
    let res = async {
        let path = check_hookscript(storages, volid).await?;
        let cmd = Cmd::new(path).arg(vmid.to_string()).arg(phase.as_str());
        storages.runner().run(&cmd).await?;
        Ok::<(), RuntimeError>(())
    }
    .await;
    match res {
        Ok(()) => Ok(()),
        Err(e) => {
            let msg = format!("hookscript error for {vmid} on {}: {e}", phase.as_str());
            if phase.stops_on_error() {
                Err(RuntimeError::Failed(msg))
            } else {
                warn(msg);
                Ok(())
            }
        }
    }
}
