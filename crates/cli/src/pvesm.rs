//! `pvesm`: storage status, volume listing, allocation, paths, pruning.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use vzkit_storage::config::ContentType;
use vzkit_storage::prune::{BackupEntry, PruneMark, PruneOptions, prune_mark};

use crate::common;
use crate::output::{OutputFormat, print_json, table};

const BOOL_OPTS: &[&str] = &["dry-run", "keep-all", "enabled"];

/// Proxmox VE compatible storage manager.
#[derive(Debug, Parser)]
#[command(name = "pvesm", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Get status for all datastores.
    Status {
        /// Only list status for the specified storage.
        #[arg(long)]
        storage: Option<String>,
        /// Only list stores which support this content type.
        #[arg(long)]
        content: Option<String>,
        /// Only list stores which are enabled.
        #[arg(long, value_parser = crate::args::parse_bool)]
        enabled: Option<bool>,
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
    },
    /// List storage content.
    List {
        storage: String,
        /// Only list content of this type.
        #[arg(long)]
        content: Option<String>,
        /// Only list images for this VM.
        #[arg(long)]
        vmid: Option<u32>,
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
    },
    /// Allocate disk images.
    Alloc {
        storage: String,
        vmid: u32,
        /// The name of the file to create ('' picks the next free name).
        filename: String,
        /// Size in kilobyte (1024 bytes); optional suffixes 'M' (megabyte) and 'G' (gigabyte).
        size: String,
        /// Format (raw, subvol, qcow2, vmdk).
        #[arg(long)]
        format: Option<String>,
    },
    /// Delete volume.
    Free {
        volume: String,
        /// The storage identifier (when `volume` is a bare volume name).
        #[arg(long)]
        storage: Option<String>,
    },
    /// Get filesystem path for specified volume.
    Path { volume: String },
    /// Extract configuration from vzdump backup archive.
    Extractconfig {
        /// Volume identifier or path of the backup archive.
        volume: String,
    },
    /// Prune backups. Only those using the standard naming scheme are considered.
    PruneBackups {
        storage: String,
        /// Only show what would be pruned, don't delete anything.
        #[arg(long, value_parser = crate::args::parse_bool)]
        dry_run: Option<bool>,
        /// Prune only backups of this guest type (lxc or qemu).
        #[arg(long = "type")]
        guest_type: Option<String>,
        /// Prune only backups for this VM.
        #[arg(long)]
        vmid: Option<u32>,
        #[arg(long, value_parser = crate::args::parse_bool)]
        keep_all: Option<bool>,
        #[arg(long)]
        keep_last: Option<u64>,
        #[arg(long)]
        keep_hourly: Option<u64>,
        #[arg(long)]
        keep_daily: Option<u64>,
        #[arg(long)]
        keep_weekly: Option<u64>,
        #[arg(long)]
        keep_monthly: Option<u64>,
        #[arg(long)]
        keep_yearly: Option<u64>,
        #[arg(long, value_enum, default_value_t)]
        output_format: OutputFormat,
    },
}

/// Entry point of the `pvesm` binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli: Cli = common::parse_args(BOOL_OPTS);
    common::run(dispatch(cli.cmd))
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Status {
            storage,
            content,
            enabled,
            output_format,
        } => status(storage, content, enabled.unwrap_or(false), output_format).await,
        Cmd::List {
            storage,
            content,
            vmid,
            output_format,
        } => list(&storage, content, vmid, output_format).await,
        Cmd::Alloc {
            storage,
            vmid,
            filename,
            size,
            format,
        } => alloc(&storage, vmid, &filename, &size, format).await,
        Cmd::Free { volume, storage } => free(&volume, storage).await,
        Cmd::Extractconfig { volume } => {
            use std::io::Write;
            let st = common::storages()?;
            let text = vzkit_restore::extractconfig::extract_config(&st, &volume).await?;
            let mut out = std::io::stdout().lock();
            out.write_all(&text)?;
            out.flush()?;
            Ok(())
        }
        Cmd::Path { volume } => {
            let st = common::storages()?;
            println!("{}", st.path(&volume, None).await?.display());
            Ok(())
        }
        Cmd::PruneBackups {
            storage,
            dry_run,
            guest_type,
            vmid,
            keep_all,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            output_format,
        } => {
            let cli_keep = PruneOptions {
                keep_all,
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                keep_monthly,
                keep_yearly,
            };
            prune(
                &storage,
                cli_keep,
                vmid,
                guest_type,
                dry_run.unwrap_or(false),
                output_format,
            )
            .await
        }
    }
}

fn parse_content(text: &str) -> anyhow::Result<ContentType> {
    text.parse::<ContentType>()
        .map_err(|e| anyhow::anyhow!("content: {e}"))
}

#[derive(Debug, Serialize)]
struct StatusRow {
    storage: String,
    #[serde(rename = "type")]
    storage_type: String,
    content: String,
    active: u8,
    enabled: u8,
    shared: u8,
    total: u64,
    used: u64,
    avail: u64,
    used_fraction: f64,
}

async fn status(
    only: Option<String>,
    content: Option<String>,
    only_enabled: bool,
    fmt: OutputFormat,
) -> anyhow::Result<()> {
    let st = common::storages()?;
    if let Some(id) = &only {
        st.section(id)?;
    }
    let content = content.as_deref().map(parse_content).transpose()?;
    let mut rows = Vec::new();
    for (section, status) in st.status_all().await {
        if only.as_deref().is_some_and(|id| id != section.id()) {
            continue;
        }
        if content.is_some_and(|c| !section.content().contains(&c)) {
            continue;
        }
        let enabled = !section.is_disabled();
        if only_enabled && !enabled {
            continue;
        }
        let (active, s) = match status {
            Ok(s) => (s.active, s),
            Err(e) => {
                if enabled {
                    eprintln!("storage '{}' is not online: {e}", section.id());
                }
                (
                    false,
                    vzkit_storage::plugin::StorageStatus {
                        total: 0,
                        avail: 0,
                        used: 0,
                        active: false,
                    },
                )
            }
        };
        let content: Vec<&str> = section.content().iter().map(|c| c.as_str()).collect();
        rows.push(StatusRow {
            storage: section.id().to_string(),
            storage_type: section.storage_type().to_string(),
            content: content.join(","),
            active: u8::from(active),
            enabled: u8::from(enabled),
            shared: u8::from(section.is_shared()),
            total: s.total,
            used: s.used,
            avail: s.avail,
            used_fraction: if s.total > 0 {
                s.used as f64 / s.total as f64
            } else {
                0.0
            },
        });
    }
    if fmt != OutputFormat::Text {
        return print_json(&rows, fmt);
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let status = match (r.enabled, r.active) {
                (0, _) => "disabled",
                (_, 1) => "active",
                _ => "inactive",
            };
            vec![
                r.storage.clone(),
                r.storage_type.clone(),
                status.to_string(),
                (r.total / 1024).to_string(),
                (r.used / 1024).to_string(),
                (r.avail / 1024).to_string(),
                format!("{:.2}%", r.used_fraction * 100.0),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["Name", "Type", "Status", "Total", "Used", "Available", "%"],
            &[false, true, true, true, true, true, true],
            &body
        )
    );
    Ok(())
}

async fn list(
    storage: &str,
    content: Option<String>,
    vmid: Option<u32>,
    fmt: OutputFormat,
) -> anyhow::Result<()> {
    let st = common::storages()?;
    let content = content.as_deref().map(parse_content).transpose()?;
    let vols = st.list(storage, content, vmid).await?;
    if fmt != OutputFormat::Text {
        return print_json(&vols, fmt);
    }
    let body: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.volid.clone(),
                v.format.clone(),
                v.content.clone(),
                v.size.to_string(),
                v.vmid.map(|id| id.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["Volid", "Format", "Type", "Size", "VMID"],
            &[false, false, false, true, false],
            &body
        )
    );
    Ok(())
}

/// `pvesm alloc` sizes: KiB, or with an `M`/`G` suffix.
fn parse_alloc_size(size: &str) -> anyhow::Result<u64> {
    let (num, mult) = match size.as_bytes().last() {
        Some(b'M') => (&size[..size.len() - 1], 1024),
        Some(b'G') => (&size[..size.len() - 1], 1024 * 1024),
        _ => (size, 1),
    };
    let n: u64 = num
        .parse()
        .ok()
        .filter(|_| !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("size: value does not match the regex pattern ('{size}')"))?;
    Ok(n * mult)
}

async fn alloc(
    storage: &str,
    vmid: u32,
    filename: &str,
    size: &str,
    format: Option<String>,
) -> anyhow::Result<()> {
    let size_kib = parse_alloc_size(size)?;
    let st = common::storages()?;
    let name = (!filename.is_empty()).then_some(filename);
    if let Some(n) = name {
        let prefix_ok = n.starts_with(&format!("vm-{vmid}-"))
            || n.starts_with(&format!("subvol-{vmid}-"))
            || n.starts_with(&format!("base-{vmid}-"));
        if !prefix_ok {
            bail!("illegal name '{n}' - should be 'vm-{vmid}-*'");
        }
    }
    let format = match format {
        Some(f) => f,
        None => match name.and_then(|n| n.rsplit_once('.')) {
            Some((_, ext)) => ext.to_string(),
            None => "raw".to_string(),
        },
    };
    let volid = st
        .vdisk_alloc(storage, vmid, &format, name, size_kib)
        .await?;
    println!("successfully created '{volid}'");
    Ok(())
}

async fn free(volume: &str, storage: Option<String>) -> anyhow::Result<()> {
    let st = common::storages()?;
    let volid = match storage {
        Some(s) if !volume.contains(':') => format!("{s}:{volume}"),
        _ => volume.to_string(),
    };
    let users = vzkit_runtime::usage::volume_users(st.layout(), &volid)?;
    if let Some((vmid, key)) = users.first() {
        bail!("volume '{volid}' is still in use by CT {vmid} ({key}) - not removing it");
    }
    st.vdisk_free(&volid).await?;
    Ok(())
}

async fn prune(
    storage: &str,
    cli_keep: PruneOptions,
    vmid: Option<u32>,
    guest_type: Option<String>,
    dry_run: bool,
    fmt: OutputFormat,
) -> anyhow::Result<()> {
    if let Some(t) = &guest_type
        && t != "lxc"
        && t != "qemu"
    {
        bail!("type: value '{t}' does not have a value in the enumeration 'qemu, lxc'");
    }
    let st = common::storages()?;
    let section = st.section(storage)?;
    if !section.content().contains(&ContentType::Backup) {
        bail!("storage '{storage}' does not support backups");
    }
    let keep = if cli_keep == PruneOptions::default() {
        match section.prune_backups() {
            Some(k) => k?,
            None => bail!("no prune-backups options configured for storage '{storage}'"),
        }
    } else {
        cli_keep.validate()?
    };
    let vols = st.list(storage, Some(ContentType::Backup), vmid).await?;
    let entries: Vec<BackupEntry> = vols
        .iter()
        .map(|v| BackupEntry {
            volid: v.volid.clone(),
            ctime: v.ctime.unwrap_or(0),
            protected: v.protected.unwrap_or(false),
            vmid: v.vmid,
        })
        .collect();
    let marked = prune_mark(&entries, &keep, vmid, guest_type.as_deref());
    if !dry_run {
        let mut failed = false;
        for e in marked.iter().filter(|e| e.mark == Some(PruneMark::Remove)) {
            println!("removing backup '{}'", e.volid);
            if let Err(err) = st.vdisk_free(&e.volid).await {
                eprintln!("error when removing backup '{}' - {err}", e.volid);
                failed = true;
            }
        }
        if failed {
            bail!("error pruning backups - check log");
        }
        return Ok(());
    }
    if fmt != OutputFormat::Text {
        return print_json(&marked, fmt);
    }
    let body: Vec<Vec<String>> = marked
        .iter()
        .map(|e| {
            let mark = e
                .mark
                .map(|m| format!("{m:?}").to_lowercase())
                .unwrap_or_default();
            vec![
                e.volid.clone(),
                e.vmid.map(|v| v.to_string()).unwrap_or_default(),
                format_ctime(e.ctime),
                mark,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["Backup", "Backup-ID", "Creation Time", "Mark"],
            &[false, false, false, false],
            &body
        )
    );
    Ok(())
}

fn format_ctime(ctime: i64) -> String {
    jiff::Timestamp::from_second(ctime)
        .map(|t| {
            t.to_zoned_datetime(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| ctime.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_sizes_are_kib_with_m_and_g_suffixes() {
        assert_eq!(parse_alloc_size("4096").unwrap(), 4096);
        assert_eq!(parse_alloc_size("64M").unwrap(), 64 * 1024);
        assert_eq!(parse_alloc_size("2G").unwrap(), 2 * 1024 * 1024);
        assert!(parse_alloc_size("1.5G").is_err());
        assert!(parse_alloc_size("G").is_err());
        assert!(parse_alloc_size("-1").is_err());
    }
}
