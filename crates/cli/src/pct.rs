//! `pct`: container configs, volumes and mounts.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};
use serde::Serialize;
use vzkit_restore::plan::Mode;
use vzkit_restore::restore::{Level, Request, run as run_restore};
use vzkit_runtime::ct::{Containers, config_text};

use crate::common;
use crate::output::{OutputFormat, print_json, table};

const BOOL_OPTS: &[&str] = &[
    "current",
    "force",
    "unique",
    "ignore-unpack-errors",
    "start",
    "unprivileged",
    "template",
    "onboot",
    "protection",
    "console",
    "debug",
];

/// Proxmox VE compatible container toolkit.
#[derive(Debug, Parser)]
#[command(
    name = "pct",
    version,
    after_help = "More commands (see `pct <command> --help`):\n  \
        lifecycle: start, stop, shutdown, reboot, suspend, resume, status, exec, enter, console, cpusets\n  \
        snapshots: snapshot, rollback, delsnapshot, listsnapshot, template, clone"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Get container configuration.
    Config {
        vmid: u32,
        /// Get current values (instead of pending values).
        #[arg(long, value_parser = crate::args::parse_bool)]
        current: Option<bool>,
        /// Fetch config values from the given snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
    },
    /// Set container options (`--key value`, `--delete key[,key]`).
    Set {
        vmid: u32,
        /// Options as `--key value` pairs.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        options: Vec<String>,
    },
    /// Resize a container mount point.
    Resize {
        vmid: u32,
        /// `rootfs` or `mpN`.
        disk: String,
        /// New size; with a leading `+` the value is added to the current size.
        size: String,
    },
    /// Unlock the container.
    Unlock { vmid: u32 },
    /// Mount the container's filesystem on the host (sets `lock: mounted`).
    Mount { vmid: u32 },
    /// Unmount the container's filesystem.
    Unmount { vmid: u32 },
    /// Restore a container from a vzdump archive (`pct restore <vmid> <archive|-> [OPTIONS]`).
    Restore {
        /// `<vmid> <archive>` and `--key value` options (any order).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Create a container from an OS template (`pct create <vmid> <template> [OPTIONS]`).
    Create {
        /// `<vmid> <template>` and `--key value` options (any order).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
    },
}

/// Entry point of the `pct` binary.
#[must_use]
pub fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(cmd) = argv.get(1)
        && let Some(code) = crate::pct_lifecycle::dispatch(cmd, &argv[2..])
            .or_else(|| crate::pct_snapshot::dispatch(cmd, &argv[2..]))
    {
        return code;
    }
    let cli: Cli = common::parse_args(BOOL_OPTS);
    common::run(dispatch(cli.cmd))
}

fn warn(msg: String) {
    eprintln!("WARN: {msg}");
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    let storages = common::storages()?;
    let cts = Containers::new(&storages);
    match cmd {
        Cmd::Config {
            vmid,
            current: _,
            snapshot,
            output_format,
        } => {
            let conf = cts.store().load(vmid)?;
            let conf = match snapshot {
                Some(name) => match conf.snapshots.get(&name) {
                    Some(s) => vzkit_runtime::conf::CtConfig {
                        main: s.clone(),
                        ..Default::default()
                    },
                    None => bail!("snapshot '{name}' does not exist"),
                },
                None => conf,
            };
            if output_format == OutputFormat::Text {
                print!("{}", config_text(&conf));
                return Ok(());
            }
            let mut map = serde_json::Map::new();
            if let Some(d) = &conf.main.description {
                map.insert("description".into(), d.clone().into());
            }
            for (k, v) in &conf.main.options {
                map.insert(k.clone(), v.clone().into());
            }
            if !conf.main.lxc.is_empty() {
                let lxc: Vec<[String; 2]> = conf
                    .main
                    .lxc
                    .iter()
                    .map(|(k, v)| [k.clone(), v.clone()])
                    .collect();
                map.insert("lxc".into(), serde_json::to_value(lxc)?);
            }
            if !conf.digest.is_empty() {
                map.insert("digest".into(), conf.digest.clone().into());
            }
            print_json(&map, output_format)
        }
        Cmd::Set { vmid, options } => {
            let (changes, delete) = parse_set_options(&options)?;
            if changes.is_empty() && delete.is_empty() {
                bail!("no options specified");
            }
            cts.set(vmid, &changes, &delete, &mut warn).await?;
            Ok(())
        }
        Cmd::Resize { vmid, disk, size } => {
            cts.resize(vmid, &disk, &size).await?;
            Ok(())
        }
        Cmd::Unlock { vmid } => Ok(cts.unlock(vmid)?),
        Cmd::Restore { args } => restore(&storages, &args, Mode::Restore).await,
        Cmd::Create { args } => restore(&storages, &args, Mode::Create).await,
        Cmd::Mount { vmid } => {
            let root = cts.mount(vmid, &mut warn).await?;
            println!("mounted CT {vmid} in '{}'", root.display());
            Ok(())
        }
        Cmd::Unmount { vmid } => Ok(cts.unmount(vmid).await?),
        Cmd::List { output_format } => {
            #[derive(Serialize)]
            struct Row {
                vmid: u32,
                status: String,
                lock: String,
                name: String,
            }
            let rows: Vec<Row> = cts
                .list()
                .await?
                .into_iter()
                .map(|(vmid, status, lock, name)| Row {
                    vmid,
                    status,
                    lock,
                    name,
                })
                .collect();
            if output_format != OutputFormat::Text {
                return print_json(&rows, output_format);
            }
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.vmid.to_string(),
                        r.status.clone(),
                        r.lock.clone(),
                        r.name.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["VMID", "Status", "Lock", "Name"], &[false; 4], &body)
            );
            Ok(())
        }
    }
}

/// `pct restore` / `pct create`: positionals `<vmid> <archive>`, options as `--key value`.
async fn restore(
    storages: &vzkit_storage::manager::Storages,
    args: &[String],
    mode: Mode,
) -> anyhow::Result<()> {
    let req = restore_request(args, mode)?;
    let mut log = |level: Level, msg: String| match level {
        Level::Info => println!("{msg}"),
        Level::Warn => eprintln!("{msg}"),
    };
    run_restore(storages, &req, &mut log).await?;
    Ok(())
}

/// Parses the arguments of `pct restore`/`pct create` into a request.
fn restore_request(args: &[String], mode: Mode) -> anyhow::Result<Request> {
    let mut positional = Vec::new();
    let mut opts: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let Some(key) = a.strip_prefix("--").filter(|k| !k.is_empty()) else {
            positional.push(a.clone());
            continue;
        };
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match args.get(i) {
                Some(v) => {
                    i += 1;
                    (key.to_string(), v.clone())
                }
                None => bail!("option '--{key}' needs a value"),
            },
        };
        if opts.iter().any(|(k, _)| *k == key) {
            bail!("duplicate option '{key}'");
        }
        opts.push((key, value));
    }
    let [vmid, archive] = positional.as_slice() else {
        bail!(
            "usage: pct {} <vmid> <archive> [OPTIONS]",
            match mode {
                Mode::Restore => "restore",
                Mode::Create => "create",
            }
        );
    };
    let vmid: u32 = vmid
        .parse()
        .ok()
        .filter(|v| (100..=999_999_999).contains(v))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "vmid: invalid format - value '{vmid}' does not look like a valid VM ID"
            )
        })?;
    let mut req = Request {
        vmid,
        archive: archive.clone(),
        storage: "local".into(),
        mode,
        force: false,
        unique: false,
        ignore_unpack_errors: false,
        bwlimit: None,
        unprivileged: None,
        start: false,
        params: Vec::new(),
    };
    let boolean =
        |k: &str, v: &str| crate::args::parse_bool(v).map_err(|e| anyhow::anyhow!("{k}: {e}"));
    for (k, v) in opts {
        match k.as_str() {
            "storage" => req.storage = v,
            "force" => req.force = boolean(&k, &v)?,
            "unique" => req.unique = boolean(&k, &v)?,
            "ignore-unpack-errors" => req.ignore_unpack_errors = boolean(&k, &v)?,
            "start" => req.start = boolean(&k, &v)?,
            "unprivileged" => req.unprivileged = Some(boolean(&k, &v)?),
            "restore" => {}
            "bwlimit" => {
                let n: f64 = v.parse().ok().filter(|n: &f64| *n >= 0.0).ok_or_else(|| {
                    anyhow::anyhow!("bwlimit: type check ('number') failed - got '{v}'")
                })?;
                req.bwlimit = Some(n);
            }
            _ => req.params.push((k, v)),
        }
    }
    if req.unique && mode == Mode::Create {
        bail!("option 'unique' requires option 'restore'");
    }
    if req.force && mode == Mode::Create {
        bail!("option 'force' is only possible with 'pct restore'");
    }
    Ok(req)
}

/// Splits `--key value` pairs; `--delete a,b` lists keys to remove. A key not followed by a
/// value means `1` (PVE booleans).
/// `pct set` options: (key, value) changes and keys to delete.
type SetOptions = (Vec<(String, String)>, Vec<String>);

fn parse_set_options(args: &[String]) -> anyhow::Result<SetOptions> {
    let mut changes = Vec::new();
    let mut delete = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let Some(key) = args[i].strip_prefix("--") else {
            bail!("unexpected argument '{}'", args[i]);
        };
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match args.get(i + 1) {
                Some(v) if !v.starts_with("--") => {
                    i += 1;
                    (key.to_string(), v.clone())
                }
                _ => (key.to_string(), "1".to_string()),
            },
        };
        i += 1;
        match key.as_str() {
            "delete" => delete.extend(
                value
                    .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            "digest" | "revert" => {}
            _ => {
                if changes.iter().any(|(k, _): &(String, String)| *k == key) {
                    bail!("duplicate option '{key}'");
                }
                changes.push((key, value));
            }
        }
    }
    Ok((changes, delete))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn set_options_are_split_into_changes_and_deletes() {
        let (c, d) = parse_set_options(&v(
            "--hostname ct1 --onboot --mp0 local:1,mp=/a --delete mp1,mp2",
        ))
        .unwrap();
        assert_eq!(
            c,
            vec![
                ("hostname".into(), "ct1".into()),
                ("onboot".into(), "1".into()),
                ("mp0".into(), "local:1,mp=/a".into())
            ]
        );
        assert_eq!(d, vec!["mp1", "mp2"]);
        assert!(parse_set_options(&v("hostname x")).is_err());
        assert!(parse_set_options(&v("--a 1 --a 2")).is_err());
    }

    #[test]
    fn restore_arguments() {
        let r = restore_request(
            &v("101 local:backup/vzdump-lxc-100-2026_01_01-00_00_00.tar.zst --storage s2 --force 1 --rootfs 8 --hostname h --bwlimit 1024 --unprivileged 0"),
            Mode::Restore,
        )
        .unwrap();
        assert_eq!(r.vmid, 101);
        assert_eq!(r.storage, "s2");
        assert!(r.force);
        assert_eq!(r.unprivileged, Some(false));
        assert_eq!(r.bwlimit, Some(1024.0));
        assert_eq!(
            r.params,
            vec![
                ("rootfs".into(), "8".into()),
                ("hostname".into(), "h".into())
            ]
        );
        let r = restore_request(&v("--rootfs local:1 102 -"), Mode::Restore).unwrap();
        assert_eq!((r.vmid, r.archive.as_str()), (102, "-"));
        assert!(restore_request(&v("102"), Mode::Restore).is_err());
        assert!(restore_request(&v("99 a.tar"), Mode::Restore).is_err());
        assert!(restore_request(&v("102 a.tar --force 1"), Mode::Create).is_err());
        assert!(restore_request(&v("102 a.tar --x 1 --x 2"), Mode::Restore).is_err());
    }
}
