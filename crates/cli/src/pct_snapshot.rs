//! `pct` snapshot, template and clone subcommands: `snapshot`, `delsnapshot`, `rollback`,
//! `listsnapshot`, `template`, `clone`.
//!
//! [`dispatch`] takes the subcommand name and the arguments after it, and returns `None`
//! for any other subcommand so the `pct` front end can fall through to its own parser.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vzkit_runtime::lxc::Lxc;
use vzkit_runtime::snapshot::{
    CloneOptions, HostOps, check_snapname, clone_ct, format_snapshot_tree, snapshot_create,
    snapshot_delete, snapshot_list, snapshot_rollback, template,
};
use vzkit_runtime::store::CtStore;

use crate::common;

const BOOL_OPTS: &[&str] = &["force", "start", "full"];

/// The names [`dispatch`] handles.
pub const COMMANDS: &[&str] = &[
    "snapshot",
    "delsnapshot",
    "rollback",
    "listsnapshot",
    "template",
    "clone",
];

#[derive(Debug, Parser)]
#[command(name = "pct")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd0,
}

#[derive(Debug, Subcommand)]
enum Cmd0 {
    /// Snapshot a container.
    Snapshot {
        vmid: u32,
        /// The name of the snapshot.
        snapname: String,
        /// A textual description or comment.
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a LXC snapshot.
    Delsnapshot {
        vmid: u32,
        /// The name of the snapshot.
        snapname: String,
        /// For removal from config file, even if removing disk snapshots fails.
        #[arg(long, value_parser = crate::args::parse_bool)]
        force: Option<bool>,
    },
    /// Rollback LXC state to specified snapshot.
    Rollback {
        vmid: u32,
        /// The name of the snapshot.
        snapname: String,
        /// Whether the container should get started after rolling back successfully.
        #[arg(long, value_parser = crate::args::parse_bool)]
        start: Option<bool>,
    },
    /// List all snapshots.
    Listsnapshot { vmid: u32 },
    /// Create a Template.
    Template { vmid: u32 },
    /// Create a container clone/copy.
    Clone {
        vmid: u32,
        /// VMID for the clone.
        newid: u32,
        /// Create a full copy of all disks (default for non-templates).
        #[arg(long, value_parser = crate::args::parse_bool)]
        full: Option<bool>,
        /// The name of the snapshot.
        #[arg(long)]
        snapname: Option<String>,
        /// Target storage for full clone.
        #[arg(long)]
        storage: Option<String>,
        /// Set a hostname for the new CT.
        #[arg(long)]
        hostname: Option<String>,
        /// Description for the new CT.
        #[arg(long)]
        description: Option<String>,
    },
}

fn warn(msg: String) {
    eprintln!("{msg}");
}

/// Runs the snapshot/template/clone subcommand `cmd` with the arguments that followed it;
/// `None` when `cmd` is not one of [`COMMANDS`].
#[must_use]
pub fn dispatch(cmd: &str, args: &[String]) -> Option<ExitCode> {
    if !COMMANDS.contains(&cmd) {
        return None;
    }
    let cli: Cli = match common::parse_subcommand("pct", cmd, args, BOOL_OPTS) {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    Some(common::run(run(cli.cmd)))
}

/// `strftime("%F %H:%M:%S", localtime(t))`.
fn local_time(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| {
            ts.to_zoned_datetime(jiff::tz::TimeZone::system())
                .strftime("%F %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
}

async fn run(cmd: Cmd0) -> anyhow::Result<()> {
    let storages = common::storages()?;
    let store = CtStore::new(storages.layout().clone());
    let ops = HostOps::new(&storages);
    match cmd {
        Cmd0::Snapshot {
            vmid,
            snapname,
            description,
        } => {
            check_snapname(&snapname)?;
            let descr = description.as_deref();
            snapshot_create(&store, &ops, vmid, &snapname, descr, false, &mut warn).await?;
        }
        Cmd0::Delsnapshot {
            vmid,
            snapname,
            force,
        } => {
            let force = force.unwrap_or(false);
            snapshot_delete(&store, &ops, vmid, &snapname, force, &mut warn).await?;
        }
        Cmd0::Rollback {
            vmid,
            snapname,
            start,
        } => {
            snapshot_rollback(&store, &ops, vmid, &snapname).await?;
            if start.unwrap_or(false) {
                Lxc::new(&storages).start(vmid, false, &mut warn).await?;
            }
        }
        Cmd0::Listsnapshot { vmid } => {
            let conf = store.load(vmid)?;
            print!(
                "{}",
                format_snapshot_tree(&snapshot_list(&conf), &local_time)
            );
        }
        Cmd0::Template { vmid } => template(&storages, vmid).await?,
        Cmd0::Clone {
            vmid,
            newid,
            full,
            snapname,
            storage,
            hostname,
            description,
        } => {
            let opts = CloneOptions {
                full,
                snapname,
                storage,
                hostname,
                description,
            };
            clone_ct(&storages, vmid, newid, &opts, &mut warn).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_commands() {
        assert!(dispatch("list", &[]).is_none());
        assert!(dispatch("start", &["100".into()]).is_none());
    }

    #[test]
    fn pve_option_forms_parse() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["pct".to_string()];
            argv.extend(args.iter().map(|s| (*s).to_string()));
            Cli::try_parse_from(crate::args::normalize(argv, BOOL_OPTS)).map(|c| c.cmd)
        };
        match parse(&["delsnapshot", "100", "s1", "-force"]).unwrap() {
            Cmd0::Delsnapshot { force, .. } => assert_eq!(force, Some(true)),
            other => panic!("{other:?}"),
        }
        match parse(&[
            "clone",
            "100",
            "101",
            "--full",
            "0",
            "-snapname",
            "s1",
            "--hostname",
            "c",
        ])
        .unwrap()
        {
            Cmd0::Clone {
                full,
                snapname,
                hostname,
                storage,
                ..
            } => {
                assert_eq!(full, Some(false));
                assert_eq!(snapname.as_deref(), Some("s1"));
                assert_eq!(hostname.as_deref(), Some("c"));
                assert_eq!(storage, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["snapshot", "100"]).is_err());
        assert!(parse(&["rollback", "x", "s1"]).is_err());
    }
}
