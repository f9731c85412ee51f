//! What every front end shares: the runtime, the storage view, error printing.

use std::process::ExitCode;
use std::sync::Arc;

use vzkit_host::command::SystemRunner;
use vzkit_host::paths::Layout;
use vzkit_storage::manager::Storages;

/// Loads the storages of the host named by `VZKIT_ROOT`, printing parser warnings.
///
/// # Errors
/// When `storage.cfg` cannot be read.
pub fn storages() -> anyhow::Result<Storages> {
    let (storages, warnings) = Storages::load(Layout::from_env(), Arc::new(SystemRunner))?;
    for w in warnings {
        eprintln!("{w}");
    }
    Ok(storages)
}

/// Runs `fut` on a runtime and turns an error into PVE-style output and exit code 255
/// (PVE's CLI exits 255 on errors).
pub fn run<F>(fut: F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("unable to start runtime: {e}");
            return ExitCode::from(255);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("{}", msg.trim_end());
            ExitCode::from(255)
        }
    }
}

/// Parses the process arguments with PVE conventions into the clap type `T`.
pub fn parse_args<T: clap::Parser>(bool_opts: &[&str]) -> T {
    let args = crate::args::normalize(std::env::args().collect(), bool_opts);
    T::parse_from(args)
}
