//! `pct` life-cycle subcommands: `start`, `stop`, `shutdown`, `reboot`, `suspend`,
//! `resume`, `status`, `exec`, `enter`, `console`, `cpusets`.
//!
//! [`dispatch`] takes the subcommand name and the arguments after it, and returns `None`
//! for any other subcommand so the `pct` front end can fall through to its own parser.
//! Interactive commands (`exec`, `enter`, `console`) run LXC's tool in the foreground on
//! this terminal and exit with its status, as PVE's `exec()` does.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vzkit_host::command::{Cmd, Exit, run_foreground};
use vzkit_runtime::lxc::{Lxc, StartOptions, cpusets_table};

use crate::common;

const BOOL_OPTS: &[&str] = &["debug", "verbose", "forceStop", "skiplock"];

/// The names [`dispatch`] handles.
pub const COMMANDS: &[&str] = &[
    "start", "stop", "shutdown", "reboot", "suspend", "resume", "status", "exec", "enter",
    "console", "cpusets",
];

#[derive(Debug, Parser)]
#[command(name = "pct")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd0,
}

#[derive(Debug, Subcommand)]
enum Cmd0 {
    /// Start the container.
    Start {
        vmid: u32,
        /// If set, enables very verbose debug log-level on start.
        #[arg(long, value_parser = crate::args::parse_bool)]
        debug: Option<bool>,
        /// Ignore locks - only root is allowed to use this option.
        #[arg(long, value_parser = crate::args::parse_bool)]
        skiplock: Option<bool>,
    },
    /// Stop the container. This will abruptly stop all processes running in the container.
    Stop {
        vmid: u32,
        /// Ignore locks - only root is allowed to use this option.
        #[arg(long, value_parser = crate::args::parse_bool)]
        skiplock: Option<bool>,
    },
    /// Shutdown the container. This will trigger a clean shutdown of the container.
    Shutdown {
        vmid: u32,
        /// Wait maximal timeout seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Make sure the Container stops.
        #[arg(long = "forceStop", value_parser = crate::args::parse_bool)]
        force_stop: Option<bool>,
        /// Ignore locks - only root is allowed to use this option.
        #[arg(long, value_parser = crate::args::parse_bool)]
        skiplock: Option<bool>,
    },
    /// Reboot the container by shutting it down, and starting it again.
    Reboot {
        vmid: u32,
        /// Wait maximal timeout seconds for the shutdown.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Suspend the container.
    Suspend {
        vmid: u32,
        /// Ignore locks - only root is allowed to use this option.
        #[arg(long, value_parser = crate::args::parse_bool)]
        skiplock: Option<bool>,
    },
    /// Resume the container.
    Resume {
        vmid: u32,
        /// Ignore locks - only root is allowed to use this option.
        #[arg(long, value_parser = crate::args::parse_bool)]
        skiplock: Option<bool>,
    },
    /// Show CT status.
    Status {
        vmid: u32,
        /// Verbose output format.
        #[arg(long, value_parser = crate::args::parse_bool)]
        verbose: Option<bool>,
    },
    /// Launch a command inside the specified container.
    Exec {
        vmid: u32,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        extra_args: Vec<String>,
    },
    /// Launch a shell for the specified container.
    Enter { vmid: u32 },
    /// Launch a console for the specified container.
    Console {
        vmid: u32,
        /// Escape sequence prefix (`^a`).
        #[arg(long)]
        escape: Option<String>,
    },
    /// Print the list of assigned CPU sets.
    Cpusets,
}

fn warn(msg: String) {
    eprintln!("WARN: {msg}");
}

/// Runs the life-cycle subcommand `cmd` with the arguments that followed it on the command
/// line; `None` when `cmd` is not one of [`COMMANDS`].
#[must_use]
pub fn dispatch(cmd: &str, args: &[String]) -> Option<ExitCode> {
    if !COMMANDS.contains(&cmd) {
        return None;
    }
    let cli: Cli = match common::parse_subcommand("pct", cmd, args, BOOL_OPTS) {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    let mut code = ExitCode::SUCCESS;
    let res = common::run(run(cli.cmd, &mut code));
    Some(if res == ExitCode::SUCCESS { code } else { res })
}

fn exit_code(exit: Exit) -> ExitCode {
    match exit {
        Exit::Code(c) => ExitCode::from(u8::try_from(c).unwrap_or(255)),
        Exit::Signal(s) => ExitCode::from(u8::try_from(128 + s).unwrap_or(255)),
    }
}

fn foreground(cmd: &Cmd) -> anyhow::Result<ExitCode> {
    Ok(exit_code(run_foreground(cmd)?))
}

fn lock_check(lxc: &Lxc<'_>, vmid: u32, skiplock: Option<bool>) -> anyhow::Result<()> {
    if !skiplock.unwrap_or(false) {
        lxc.check_lock(vmid)?;
    }
    Ok(())
}

async fn run(cmd: Cmd0, code: &mut ExitCode) -> anyhow::Result<()> {
    let storages = common::storages()?;
    let lxc = Lxc::new(&storages);
    match cmd {
        Cmd0::Start {
            vmid,
            debug,
            skiplock,
        } => {
            let opts = StartOptions {
                debug: debug.unwrap_or(false),
                skiplock: skiplock.unwrap_or(false),
            };
            lxc.start_with(vmid, opts, &mut warn).await?;
        }
        Cmd0::Stop { vmid, skiplock } => {
            lock_check(&lxc, vmid, skiplock)?;
            lxc.stop(vmid, &mut warn).await?;
        }
        Cmd0::Shutdown {
            vmid,
            timeout,
            force_stop,
            skiplock,
        } => {
            lock_check(&lxc, vmid, skiplock)?;
            lxc.shutdown(vmid, timeout, force_stop.unwrap_or(false), &mut warn)
                .await?;
        }
        Cmd0::Reboot { vmid, timeout } => {
            lxc.check_lock(vmid)?;
            lxc.reboot(vmid, timeout, &mut warn).await?;
        }
        Cmd0::Suspend { vmid, skiplock } => {
            lock_check(&lxc, vmid, skiplock)?;
            lxc.freeze(vmid).await?;
        }
        Cmd0::Resume { vmid, skiplock } => {
            lock_check(&lxc, vmid, skiplock)?;
            lxc.thaw(vmid).await?;
        }
        Cmd0::Status { vmid, verbose } => {
            if verbose.unwrap_or(false) {
                for (k, v) in lxc.status_verbose(vmid).await? {
                    println!("{k}: {v}");
                }
            } else {
                lxc.store().load(vmid)?;
                println!("status: {}", lxc.status(vmid).await?);
            }
        }
        Cmd0::Exec { vmid, extra_args } => {
            let c = lxc.attach_cmd(vmid, &extra_args).await?;
            *code = foreground(&c)?;
        }
        Cmd0::Enter { vmid } => {
            let c = lxc.enter_cmd(vmid).await?;
            *code = foreground(&c)?;
        }
        Cmd0::Console { vmid, escape } => {
            let c = lxc.console_cmd(vmid, escape.as_deref())?;
            *code = foreground(&c)?;
        }
        Cmd0::Cpusets => {
            print!("{}", cpusets_table(&lxc.cpusets(&mut warn).await?));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_commands_fall_through() {
        assert!(dispatch("set", &["100".into()]).is_none());
        assert!(dispatch("list", &[]).is_none());
    }

    #[test]
    fn pve_style_options_parse() {
        let parse = |v: &[&str]| {
            let argv: Vec<String> = v.iter().map(|s| (*s).to_string()).collect();
            Cli::try_parse_from(crate::args::normalize(argv, BOOL_OPTS)).map(|c| c.cmd)
        };
        match parse(&[
            "pct",
            "shutdown",
            "100",
            "-timeout",
            "5",
            "-forceStop",
            "-skiplock",
        ])
        .unwrap()
        {
            Cmd0::Shutdown {
                vmid,
                timeout,
                force_stop,
                skiplock,
            } => assert_eq!(
                (vmid, timeout, force_stop, skiplock),
                (100, 5, Some(true), Some(true))
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["pct", "exec", "100", "--", "ls", "-la"]).unwrap() {
            Cmd0::Exec { vmid, extra_args } => {
                assert_eq!((vmid, extra_args), (100, vec!["ls".into(), "-la".into()]));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["pct", "status", "7", "--verbose"]).unwrap() {
            Cmd0::Status { verbose, .. } => assert_eq!(verbose, Some(true)),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["pct", "start", "x"]).is_err());
    }
}
