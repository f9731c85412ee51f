//! `vzdump`: container backups (PVE's `vzdump` command line).
//!
//! `vzdump <vmid>... | --all [--exclude <vmid>...] [OPTIONS]`: options as PVE's
//! (`--opt value` or `-opt value`, bare booleans), checked by the option schema of
//! [`vzkit_vzdump::options`]; the job is [`vzkit_vzdump::job`]. Errors print the message and
//! exit 255 (nothing is printed with `--quiet`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use vzkit_host::paths::Layout;
use vzkit_vzdump::job::{JobEnv, run_job};

use crate::common;

/// Boolean options (bare `--opt` means `--opt 1`).
const BOOL_OPTS: &[&str] = &[
    "all",
    "stdexcludes",
    "quiet",
    "stop",
    "remove",
    "protected",
    "stdout",
];

/// Backup utility for containers, compatible with Proxmox VE's vzdump.
#[derive(Debug, Parser)]
#[command(name = "vzdump", version)]
struct Cli {
    /// The ID of the guest system you want to backup (several may be given).
    #[arg(value_name = "VMID")]
    vmid: Vec<String>,
    /// Backup all known guest systems on this host.
    #[arg(long, value_name = "BOOLEAN")]
    all: Option<String>,
    /// Exclude specified guest systems (assumes --all).
    #[arg(long, value_name = "VMID_LIST")]
    exclude: Option<String>,
    /// Backup all known guest systems included in the specified pool.
    #[arg(long)]
    pool: Option<String>,
    /// Only run if executed on this node.
    #[arg(long)]
    node: Option<String>,
    /// Backup mode: snapshot, suspend or stop (a stopped container is always backed up in
    /// stop mode).
    #[arg(long)]
    mode: Option<String>,
    /// Store resulting file to this storage.
    #[arg(long)]
    storage: Option<String>,
    /// Store resulting files to specified directory.
    #[arg(long)]
    dumpdir: Option<String>,
    /// Store temporary files to specified directory.
    #[arg(long)]
    tmpdir: Option<String>,
    /// Compress dump file: 0, 1 (= lzo), gzip, lzo, zstd.
    #[arg(long)]
    compress: Option<String>,
    /// Zstd threads. N=0 uses half of the available cores, N>0 uses N threads (default:
    /// all cores).
    #[arg(long, value_name = "N")]
    zstd: Option<String>,
    /// Gzip threads, as pigz: N=1 uses half of the cores, N>1 uses N threads, 0 one thread
    /// (default: all cores).
    #[arg(long, value_name = "N")]
    pigz: Option<String>,
    /// Exclude certain files/directories (shell globs). Paths starting with '/' are anchored to
    /// the container's root, other paths match relative to each subdirectory. Repeatable.
    #[arg(long = "exclude-path", value_name = "PATH")]
    exclude_path: Vec<String>,
    /// Exclude temporary files and logs (default 1).
    #[arg(long, value_name = "BOOLEAN")]
    stdexcludes: Option<String>,
    /// Write the archive to standard output.
    #[arg(long, value_name = "BOOLEAN")]
    stdout: Option<String>,
    /// Limit I/O bandwidth (in KiB/s).
    #[arg(long, value_name = "KIBPS")]
    bwlimit: Option<String>,
    /// Set IO priority (0-7 best-effort, 8 idle; default 7).
    #[arg(long, value_name = "PRI")]
    ionice: Option<String>,
    /// Maximal time to wait for the global lock (minutes, default 180).
    #[arg(long, value_name = "MINUTES")]
    lockwait: Option<String>,
    /// Maximal time to wait until a guest system is stopped (minutes, default 10).
    #[arg(long, value_name = "MINUTES")]
    stopwait: Option<String>,
    /// Use these retention options instead of those from the storage configuration
    /// (keep-all=1 or keep-last,keep-hourly,keep-daily,keep-weekly,keep-monthly,keep-yearly).
    #[arg(long = "prune-backups", value_name = "KEEP")]
    prune_backups: Option<String>,
    /// Prune older backups according to 'prune-backups' (default 1).
    #[arg(long, value_name = "BOOLEAN")]
    remove: Option<String>,
    /// Template string for generating notes for the backup(s): {{cluster}}, {{guestname}},
    /// {{node}}, {{vmid}}; newline and backslash escaped as '\n' and '\\'.
    #[arg(long = "notes-template", value_name = "TEMPLATE")]
    notes_template: Option<String>,
    /// If true, mark backup(s) as protected.
    #[arg(long, value_name = "BOOLEAN")]
    protected: Option<String>,
    /// Use specified hook script.
    #[arg(long, value_name = "FILENAME")]
    script: Option<String>,
    /// Be quiet.
    #[arg(long, value_name = "BOOLEAN")]
    quiet: Option<String>,
    /// Stop running backup jobs on this host.
    #[arg(long, value_name = "BOOLEAN")]
    stop: Option<String>,
    /// Deprecated: comma-separated list of email addresses or users to notify (accepted,
    /// no mail is sent).
    #[arg(long)]
    mailto: Option<String>,
    /// Deprecated: when to send a notification mail (always, failure).
    #[arg(long)]
    mailnotification: Option<String>,
    /// Notification system to use (auto, legacy-sendmail, notification-system).
    #[arg(long = "notification-mode")]
    notification_mode: Option<String>,
    /// Other performance-related settings ([max-workers=N][,pbs-entries-max=N]).
    #[arg(long)]
    performance: Option<String>,
    /// Fleecing (VMs only; accepted for compatibility).
    #[arg(long)]
    fleecing: Option<String>,
    /// PBS change detection mode (legacy, data, metadata; PBS only).
    #[arg(long = "pbs-change-detection-mode")]
    pbs_change_detection_mode: Option<String>,
    /// Dedup storages: 'metadata' reuses files whose size, times, inode, mode and owners are
    /// unchanged; 'data' reads everything.
    #[arg(long = "change-detection", value_name = "data|metadata")]
    change_detection: Option<String>,
    /// Job id (API only).
    #[arg(long = "job-id")]
    job_id: Option<String>,
}

/// The clap argument ids and PVE's option names.
const OPTIONS: &[(&str, &str)] = &[
    ("all", "all"),
    ("exclude", "exclude"),
    ("pool", "pool"),
    ("node", "node"),
    ("mode", "mode"),
    ("storage", "storage"),
    ("dumpdir", "dumpdir"),
    ("tmpdir", "tmpdir"),
    ("compress", "compress"),
    ("zstd", "zstd"),
    ("pigz", "pigz"),
    ("exclude_path", "exclude-path"),
    ("stdexcludes", "stdexcludes"),
    ("stdout", "stdout"),
    ("bwlimit", "bwlimit"),
    ("ionice", "ionice"),
    ("lockwait", "lockwait"),
    ("stopwait", "stopwait"),
    ("prune_backups", "prune-backups"),
    ("remove", "remove"),
    ("notes_template", "notes-template"),
    ("protected", "protected"),
    ("script", "script"),
    ("quiet", "quiet"),
    ("stop", "stop"),
    ("mailto", "mailto"),
    ("mailnotification", "mailnotification"),
    ("notification_mode", "notification-mode"),
    ("performance", "performance"),
    ("fleecing", "fleecing"),
    ("pbs_change_detection_mode", "pbs-change-detection-mode"),
    ("change_detection", "change-detection"),
    ("job_id", "job-id"),
];

/// The parameters as `(PVE key, value)` in command-line order; the guest ids go first as one
/// `vmid` list.
fn params_from(args: Vec<String>) -> Result<Vec<(String, String)>, clap::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut out = Vec::new();
    if let Some(ids) = matches.get_many::<String>("vmid") {
        let ids: Vec<&str> = ids.map(String::as_str).collect();
        if !ids.is_empty() {
            out.push(("vmid".to_string(), ids.join(",")));
        }
    }
    let mut opts: Vec<(usize, String, String)> = Vec::new();
    for (id, key) in OPTIONS {
        if let (Some(vals), Some(idx)) = (matches.get_many::<String>(id), matches.indices_of(id)) {
            for (v, i) in vals.zip(idx) {
                opts.push((i, (*key).to_string(), v.clone()));
            }
        }
    }
    opts.sort_by_key(|(i, _, _)| *i);
    out.extend(opts.into_iter().map(|(_, k, v)| (k, v)));
    Ok(out)
}

/// Entry point of the `vzdump` binary.
#[must_use]
pub fn main() -> ExitCode {
    let args = crate::args::normalize(std::env::args().collect(), BOOL_OPTS);
    let params = match params_from(args) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    let rt = match common::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let res = rt.block_on(async {
        let storages = common::storages().map_err(|e| vzkit_vzdump::job::JobFailure {
            message: format!("{e:#}"),
            quiet: false,
        })?;
        let env = JobEnv {
            layout: Layout::from_env(),
            storages,
            guest: None,
            stderr_is_tty: std::io::stderr().is_terminal(),
        };
        run_job(env, params).await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.quiet {
                eprintln!("{}", f.message.trim_end());
            }
            ExitCode::from(255)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cmdline: &str) -> Vec<(String, String)> {
        let args = crate::args::normalize(
            cmdline.split_whitespace().map(str::to_string).collect(),
            BOOL_OPTS,
        );
        params_from(args).unwrap()
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pve_conventions_and_order() {
        assert_eq!(
            p("vzdump 100 101 -compress zstd --stdout --exclude-path /a -quiet 0 --exclude-path b"),
            kv(&[
                ("vmid", "100,101"),
                ("compress", "zstd"),
                ("stdout", "1"),
                ("exclude-path", "/a"),
                ("quiet", "0"),
                ("exclude-path", "b"),
            ])
        );
        assert_eq!(
            p("vzdump --all --exclude 100,102 --prune-backups keep-last=2"),
            kv(&[
                ("all", "1"),
                ("exclude", "100,102"),
                ("prune-backups", "keep-last=2")
            ])
        );
        let args: Vec<String> = ["vzdump", "--frobnicate", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(params_from(args).is_err());
    }
}
