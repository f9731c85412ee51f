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

/// Builds the multi-threaded tokio runtime every front end runs on; prints the error and
/// yields exit code 255 when it cannot be started.
///
/// # Errors
/// The exit code to return when the runtime cannot be built.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("unable to start runtime: {e}");
            ExitCode::from(255)
        })
}

/// Parses `pct <cmd> <args...>` with PVE conventions into the clap type `T`, for `pct`
/// subcommand groups that live in their own modules. Help and version print to stdout and
/// yield success; usage errors print to stderr and yield 255, as PVE's CLI.
///
/// # Errors
/// The exit code to return when parsing ended the command.
pub fn parse_subcommand<T: clap::Parser>(
    prog: &str,
    cmd: &str,
    args: &[String],
    bool_opts: &[&str],
) -> Result<T, ExitCode> {
    let mut argv = vec![prog.to_string(), cmd.to_string()];
    argv.extend(args.iter().cloned());
    let argv = crate::args::normalize(argv, bool_opts);
    T::try_parse_from(argv).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(255)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Runs `fut` on a runtime and turns an error into PVE-style output and exit code 255
/// (PVE's CLI exits 255 on errors).
pub fn run<F>(fut: F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
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
