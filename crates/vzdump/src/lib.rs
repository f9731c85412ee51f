//! vzdump for containers: PVE-compatible backups of containers into
//! `vzdump-lxc-<vmid>-YYYY_MM_DD-HH_MM_SS.tar[.zst|.gz|.lzo]` archives.
//!
//! Compatibility target: pve-manager 14a22df (`PVE/VZDump.pm`, `PVE/API2/VZDump.pm`),
//! pve-container (`PVE/VZDump/LXC.pm`), pve-guest-common (`VZDump/Common.pm`); the archives
//! extract with GNU tar under PVE's restore flags to the container's tree.
//!
//! | module | what |
//! |---|---|
//! | [`options`], [`conf`] | the option schema, `/etc/vzdump.conf`, precedence with the storage |
//! | [`job`] | the job: global lock, guest selection, hooks, signals, one task per guest |
//! | [`task`] | one guest's backup in PVE's order, and its cleanup |
//! | [`plan`] | the pure decisions: mode, archived mount points, compressor, names, tmpdir |
//! | [`mounts`] | mounting the archived volumes read-only below `/mnt/vzsnap0` |
//! | [`snapshot`] | snapshot mode's `vzdump` storage snapshot through the plugin trait |
//! | [`guest`] | container state and lifecycle behind [`guest::GuestControl`] |
//! | [`pipeline`] | the archive: tar encoding, compression, blake3 and writing on threads |
//! | [`prune`] | the retention check before and the pruning after a backup |
//! | [`journal`] | what a task changed, so a killed job is cleaned up by the next one |
//! | [`hook`] | the `--script` hook |
//! | [`notes`] | `notes-template` |
//! | [`log`] | PVE's log line format, sizes and times |
//! | [`progress`] | the progress bar on a terminal |
//!
//! Beyond PVE: every archive gets `<archive>.blake3` (`<hex>  <name>`, as `b3sum` writes it);
//! zstd and gzip compress with all cores unless `--zstd`/`--pigz` say otherwise; reading,
//! encoding, compressing and writing overlap; the archive is fsynced before it is renamed;
//! volumes are mounted read-only; state left by a killed job is cleaned up by the next.

pub mod conf;
pub mod error;
pub mod guest;
pub mod hook;
pub mod job;
pub mod journal;
pub mod log;
pub mod mounts;
pub mod notes;
pub mod options;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod prune;
pub mod snapshot;
pub mod task;
