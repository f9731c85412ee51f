//! Pure planning of a restore or create (no I/O): which parameters are mount points, which
//! volumes to create where, which mount points come back only in the config, and how the
//! backed-up config merges into the new one (pve-container `create_vm`,
//! `restore_configuration`, `sanitize_and_merge_config`).
//!
//! Departures from PVE, on purpose:
//! - simple mode re-creates volumes with their recorded size in bytes (rounded up to whole
//!   KiB), where PVE converts to float GiB and truncates to whole MiB;
//! - a `lock` in the backed-up config is never copied (vzdump strips it anyway).

use vzkit_runtime::conf::mountpoint::{MountPoint, MountPointKind, parse_new_disk, parse_volume};
use vzkit_runtime::conf::{ConfigSection, CtConfig, NetConfig};

use crate::error::{RestoreError, Result};

/// What is being done: restoring a backup or creating from an OS template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `pct restore`.
    Restore,
    /// `pct create` from a template.
    Create,
}

/// The volume behind a planned mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// Allocate a new volume of `size_kib` KiB on `storage` (0: a directory/subvol).
    New {
        /// Target storage.
        storage: String,
        /// Size in KiB.
        size_kib: u64,
    },
    /// Use what `volume` names as it is: an existing volume, a bind directory or a device.
    Existing,
}

/// One mount point of the new container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMount {
    /// `rootfs` or `mpN`.
    pub key: String,
    /// The parsed value (its `volume` is rewritten once allocated).
    pub mp: MountPoint,
    /// Where its volume comes from.
    pub spec: DiskSpec,
}

/// The mount points of the new container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskPlan {
    /// Mount points created/used and mounted during extraction (rootfs first).
    pub mounts: Vec<PlannedMount>,
    /// Bind/device mount points of the backup: back in the config after extraction only.
    pub delayed: Vec<(String, String)>,
    /// Messages to show.
    pub warnings: Vec<String>,
}

/// Command-line parameters, split as `create_vm` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitParams {
    /// `rootfs`/`mpN` values (a bare number became `<storage>:<number>`).
    pub mp_param: Vec<(String, String)>,
    /// Every other config option.
    pub options: Vec<(String, String)>,
    /// Messages to show.
    pub warnings: Vec<String>,
}

fn is_mp_key(key: &str) -> bool {
    key == "rootfs"
        || key
            .strip_prefix("mp")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_unused_key(key: &str) -> bool {
    key.strip_prefix("unused")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_bare_number(v: &str) -> bool {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (v, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Step 5 of `create_vm`: mount point parameters vs. the rest.
///
/// # Errors
/// "mount points configured, but 'rootfs' not set - aborting".
pub fn split_params(params: &[(String, String)], storage: &str) -> Result<SplitParams> {
    let mut out = SplitParams::default();
    for (k, v) in params {
        if is_mp_key(k) {
            let v = if is_bare_number(v) {
                format!("{storage}:{v}")
            } else {
                v.clone()
            };
            out.mp_param.push((k.clone(), v));
        } else if is_unused_key(k) {
            out.warnings.push(format!(
                "ignoring '{k}', cannot create/restore with unused volume"
            ));
        } else {
            out.options.push((k.clone(), v.clone()));
        }
    }
    if !out.mp_param.is_empty() && !out.mp_param.iter().any(|(k, _)| k == "rootfs") {
        return Err(RestoreError::Invalid(
            "mount points configured, but 'rootfs' not set - aborting".into(),
        ));
    }
    out.mp_param.sort_by_key(|(k, _)| key_rank(k));
    Ok(out)
}

/// Sort rank of a volume key: `rootfs` first, then `mpN` by number.
#[must_use]
pub fn key_rank(key: &str) -> u32 {
    key.strip_prefix("mp")
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(0, |n| n + 1)
}

/// Advanced mode: exactly the given `rootfs`/`mpN`.
///
/// # Errors
/// Mount point parse errors.
pub fn advanced_plan(mp_param: &[(String, String)]) -> Result<DiskPlan> {
    let mut plan = DiskPlan::default();
    for (key, value) in mp_param {
        let mp = parse_volume(key, value)?;
        let spec = match parse_new_disk(&mp.volume) {
            Some((storage, size_kib)) => DiskSpec::New { storage, size_kib },
            None => DiskSpec::Existing,
        };
        plan.mounts.push(PlannedMount {
            key: key.clone(),
            mp,
            spec,
        });
    }
    Ok(plan)
}

/// Simple mode: every mount point of the backed-up config comes back; volumes are
/// re-created on `storage` with their recorded sizes, bind/device mount points return in the
/// config only (never mounted during extraction).
///
/// # Errors
/// PVE's messages: "rootfs configuration could not be recovered, please check and specify
/// manually!", "unable to detect disk size - please specify `<key>` (size)", "restoring rootfs
/// to `<type>` mount is only possible by specifying -rootfs manually!".
pub fn simple_plan(backup: &CtConfig, storage: &str) -> Result<DiskPlan> {
    let mut plan = DiskPlan::default();
    let mps = backup.main.mountpoints()?;
    if !mps.iter().any(|(k, _)| k == "rootfs") {
        return Err(RestoreError::Invalid(
            "rootfs configuration could not be recovered, please check and specify manually!"
                .into(),
        ));
    }
    for (key, mut mp) in mps {
        match mp.kind() {
            MountPointKind::Volume => {
                let Some(bytes) = mp.size else {
                    return Err(RestoreError::Invalid(format!(
                        "unable to detect disk size - please specify {key} (size)"
                    )));
                };
                mp.size = None;
                plan.mounts.push(PlannedMount {
                    key,
                    mp,
                    spec: DiskSpec::New {
                        storage: storage.to_string(),
                        size_kib: bytes.div_ceil(1024),
                    },
                });
            }
            kind => {
                let ty = kind.as_str();
                if key == "rootfs" {
                    return Err(RestoreError::Invalid(format!(
                        "restoring rootfs to {ty} mount is only possible by specifying -rootfs manually!"
                    )));
                }
                if mp.backup == Some(true) {
                    plan.warnings.extend([
                        "WARNING - unsupported configuration!".to_string(),
                        format!(
                            "backup was enabled for {ty} mount point {key} ('{}')",
                            mp.mp
                        ),
                        "mount point configuration will be restored after archive extraction!"
                            .to_string(),
                        "contained files will be restored to wrong directory!".to_string(),
                    ]);
                }
                let value = mp.print(false)?;
                plan.delayed.push((key, value));
            }
        }
    }
    Ok(plan)
}

/// `pct create` without `--rootfs`: `<storage>:4`.
#[must_use]
pub fn default_create_plan(storage: &str) -> DiskPlan {
    DiskPlan {
        mounts: vec![PlannedMount {
            key: "rootfs".into(),
            mp: MountPoint::new(format!("{storage}:4"), "/"),
            spec: DiskSpec::New {
                storage: storage.to_string(),
                size_kib: 4 * 1024 * 1024,
            },
        }],
        ..DiskPlan::default()
    }
}

/// Keys of the backed-up config that are never merged.
fn skipped_in_merge(key: &str) -> bool {
    matches!(
        key,
        "digest" | "rootfs" | "snapshots" | "unprivileged" | "parent" | "template" | "lock"
    ) || is_mp_key(key)
        || is_unused_key(key)
}

/// `sanitize_and_merge_config`: the backup fills what the new config lacks; `netN` get new
/// MACs from `new_mac` with `unique` (overriding even command-line values, as PVE does).
/// Raw `lxc.*` keys are not handled here (copied before extraction).
///
/// # Errors
/// A `netN` of the backup that does not parse (with `unique`), or `new_mac` failing.
pub fn merge_backup_config(
    conf: &mut ConfigSection,
    backup: &ConfigSection,
    unique: bool,
    new_mac: &mut dyn FnMut() -> Result<String>,
) -> Result<()> {
    for (key, value) in &backup.options {
        if skipped_in_merge(key) {
            continue;
        }
        let is_net = key
            .strip_prefix("net")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_net && unique {
            let mut net = NetConfig::parse(value)?;
            net.hwaddr = Some(new_mac()?);
            conf.options.insert(key.clone(), net.print()?);
            continue;
        }
        if !conf.options.contains_key(key) {
            conf.options.insert(key.clone(), value.clone());
        }
    }
    if conf.description.is_none() {
        conf.description.clone_from(&backup.description);
    }
    if conf.env.is_empty() {
        conf.env.clone_from(&backup.env);
    }
    Ok(())
}

/// Step 9m defaults: `hostname` `CT<vmid>`, `memory` 512, `swap` 512.
pub fn apply_defaults(conf: &mut ConfigSection, vmid: u32) {
    conf.options
        .entry("hostname".into())
        .or_insert_with(|| format!("CT{vmid}"));
    conf.options
        .entry("memory".into())
        .or_insert_with(|| "512".into());
    conf.options
        .entry("swap".into())
        .or_insert_with(|| "512".into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn params_are_split_like_create_vm() {
        let s = split_params(
            &kv(&[
                ("mp1", "2.5,mp=/b"),
                ("hostname", "x"),
                ("rootfs", "8"),
                ("mp0", "other:1,mp=/a"),
                ("unused0", "local:1/x.raw"),
            ]),
            "local",
        )
        .unwrap();
        assert_eq!(
            s.mp_param,
            kv(&[
                ("rootfs", "local:8"),
                ("mp0", "other:1,mp=/a"),
                ("mp1", "2.5,mp=/b")
            ])
        );
        assert_eq!(s.options, kv(&[("hostname", "x")]));
        assert_eq!(
            s.warnings,
            ["ignoring 'unused0', cannot create/restore with unused volume"]
        );
        let e = split_params(&kv(&[("mp0", "local:1,mp=/a")]), "local").unwrap_err();
        assert_eq!(
            e.to_string(),
            "mount points configured, but 'rootfs' not set - aborting"
        );
        assert!(is_bare_number("1.5") && !is_bare_number("1.") && !is_bare_number("a1"));
    }

    #[test]
    fn advanced_plan_kinds() {
        let p = advanced_plan(&kv(&[
            ("rootfs", "local:0.5"),
            ("mp0", "local:100/vm-100-disk-3.raw,mp=/data"),
            ("mp1", "/srv/host,mp=/host"),
        ]))
        .unwrap();
        assert_eq!(
            p.mounts[0].spec,
            DiskSpec::New {
                storage: "local".into(),
                size_kib: 512 * 1024
            }
        );
        assert_eq!(p.mounts[1].spec, DiskSpec::Existing);
        assert_eq!(p.mounts[2].spec, DiskSpec::Existing);
        assert_eq!(p.mounts[2].mp.kind(), MountPointKind::Bind);
    }

    fn backup(text: &str) -> CtConfig {
        CtConfig::parse(100, text).unwrap().0
    }

    #[test]
    fn simple_plan_keeps_sizes_in_bytes_and_delays_binds() {
        let b = backup(
            "arch: amd64\nmp0: local:100/vm-100-disk-1.raw,mp=/data,backup=1,acl=1,size=1536M\nmp1: /srv/x,mp=/x,backup=1\nmp2: /dev/sdb1,mp=/dev1\nrootfs: local:100/vm-100-disk-0.raw,size=1049601K\n",
        );
        let p = simple_plan(&b, "store2").unwrap();
        let keys: Vec<&str> = p.mounts.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["rootfs", "mp0"]);
        assert_eq!(
            p.mounts[0].spec,
            DiskSpec::New {
                storage: "store2".into(),
                size_kib: 1_049_601
            }
        );
        assert_eq!(p.mounts[1].mp.acl, Some(true));
        assert_eq!(p.mounts[1].mp.backup, Some(true));
        assert_eq!(p.mounts[1].mp.size, None);
        assert_eq!(
            p.delayed,
            kv(&[
                ("mp1", "/srv/x,mp=/x,backup=1"),
                ("mp2", "/dev/sdb1,mp=/dev1")
            ])
        );
        assert_eq!(p.warnings[0], "WARNING - unsupported configuration!");
        assert_eq!(
            p.warnings[1],
            "backup was enabled for bind mount point mp1 ('/x')"
        );
    }

    #[test]
    fn simple_plan_errors() {
        let cases = [
            (
                "arch: amd64\n",
                "rootfs configuration could not be recovered, please check and specify manually!",
            ),
            (
                "rootfs: local:100/vm-100-disk-0.raw\n",
                "unable to detect disk size - please specify rootfs (size)",
            ),
            (
                "rootfs: /srv/root\n",
                "restoring rootfs to bind mount is only possible by specifying -rootfs manually!",
            ),
        ];
        for (text, msg) in cases {
            assert_eq!(
                simple_plan(&backup(text), "local").unwrap_err().to_string(),
                msg
            );
        }
    }

    #[test]
    fn merge_fills_gaps_and_skips_volume_keys() {
        let b = backup(
            "#my ct\narch: amd64\nhostname: old\nmemory: 1024\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,type=veth\nrootfs: local:100/vm-100-disk-0.raw,size=1G\nmp0: local:100/vm-100-disk-1.raw,mp=/a,size=1G\nunused0: local:100/vm-100-disk-9.raw\nunprivileged: 1\ntemplate: 1\nlock: backup\nparent: snap\n",
        );
        let mut conf = ConfigSection::default();
        conf.options.insert("hostname".into(), "new".into());
        conf.options
            .insert("rootfs".into(), "local:100/vm-100-disk-5.raw".into());
        let mut macs = 0;
        merge_backup_config(&mut conf, &b.main, false, &mut || {
            macs += 1;
            Ok("unused".into())
        })
        .unwrap();
        assert_eq!(macs, 0);
        let keys: Vec<&str> = conf.options.keys().map(String::as_str).collect();
        assert_eq!(keys, ["arch", "hostname", "memory", "net0", "rootfs"]);
        assert_eq!(conf.options["hostname"], "new");
        assert_eq!(conf.options["rootfs"], "local:100/vm-100-disk-5.raw");
        assert_eq!(conf.description.as_deref(), Some("my ct\n"));

        let mut conf = ConfigSection::default();
        conf.options.insert(
            "net0".into(),
            "name=eth1,bridge=vmbr1,hwaddr=BC:24:11:00:00:02".into(),
        );
        merge_backup_config(&mut conf, &b.main, true, &mut || {
            Ok("BC:24:11:AA:BB:CC".into())
        })
        .unwrap();
        assert_eq!(
            conf.options["net0"],
            "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:AA:BB:CC,type=veth"
        );
        apply_defaults(&mut conf, 123);
        assert_eq!(conf.options["hostname"], "old");
        assert_eq!(conf.options["swap"], "512");
    }
}
