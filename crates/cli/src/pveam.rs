//! `pveam`: the appliance (container template) manager: index update, listing, download with
//! checksum verification, and the templates on a storage.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use vzkit_restore::appliance::{self, Downloaded};
use vzkit_storage::config::ContentType;
use vzkit_storage::volid::VolumeType;

use crate::common;

/// Proxmox VE compatible appliance manager.
#[derive(Debug, Parser)]
#[command(name = "pveam", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Update Container Template Database.
    Update,
    /// List available templates.
    Available {
        /// Restrict list to specified section.
        #[arg(long)]
        section: Option<String>,
    },
    /// Download appliance templates.
    Download {
        /// The storage where the template will be stored.
        storage: String,
        /// The template which will be downloaded.
        template: String,
    },
    /// Get list of all templates on storage.
    List { storage: String },
    /// Remove a template.
    Remove {
        /// The template to remove (`STORAGE:vztmpl/NAME`).
        template_path: String,
    },
}

/// Entry point of the `pveam` binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli: Cli = common::parse_args(&[]);
    common::run(dispatch(cli.cmd))
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    let storages = common::storages()?;
    let layout = storages.layout().clone();
    match cmd {
        Cmd::Update => {
            let l = layout.clone();
            tokio::task::spawn_blocking(move || appliance::update(&l)).await??;
            println!("update successful");
        }
        Cmd::Available { section } => {
            for a in appliance::load_index(&layout)? {
                if section.as_deref().is_some_and(|s| s != a.section()) {
                    continue;
                }
                println!("{:<15} {}", a.section(), a.template);
            }
        }
        Cmd::Download { storage, template } => {
            let section = storages.section(&storage)?;
            if !section.content().contains(&ContentType::Vztmpl) {
                bail!("storage '{storage}' does not support templates");
            }
            let app = appliance::load_index(&layout)?
                .into_iter()
                .find(|a| a.template == template)
                .with_context(|| format!("no such template '{template}' in the appliance index"))?;
            let dest = storages
                .path(&format!("{storage}:vztmpl/{template}"), None)
                .await?;
            println!("downloading {} to {}", app.url, dest.display());
            let d = dest.clone();
            let a = app.clone();
            match tokio::task::spawn_blocking(move || appliance::download(&a, &d)).await?? {
                Downloaded::AlreadyThere => {
                    let (_, sum) = appliance::expected_checksum(&app)?;
                    println!("file already exists {sum} - no need to download");
                }
                Downloaded::Fetched { size } => println!(
                    "download of '{}' to '{}' finished ({size} bytes, checksum verified)",
                    app.url,
                    dest.display()
                ),
            }
        }
        Cmd::List { storage } => {
            let vols = storages
                .list(&storage, Some(ContentType::Vztmpl), None)
                .await?;
            println!("{:<60} SIZE", "NAME");
            for v in vols {
                println!(
                    "{:<60} {:4.2}MB",
                    v.volid,
                    v.size as f64 / (1024.0 * 1024.0)
                );
            }
        }
        Cmd::Remove { template_path } => {
            let (plugin, volname) = storages.resolve(&template_path)?;
            let parsed = plugin.parse_volname(&volname)?;
            if parsed.vtype != VolumeType::Vztmpl {
                bail!("Wrong volume type: '{template_path}' is not a container template");
            }
            let path = plugin.path(&volname, None).await?;
            std::fs::remove_file(&path)
                .with_context(|| format!("unable to remove '{}'", path.display()))?;
        }
    }
    Ok(())
}
