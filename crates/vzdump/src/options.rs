//! vzdump job options: the schema (`$confdesc` of pve-guest-common `VZDump/Common.pm`), typed
//! as [`JobOptions`], and their resolution as in `PVE::VZDump->new` (pve-manager 14a22df).
//!
//! Precedence: CLI > `/etc/vzdump.conf` > schema defaults, except
//! * `prune-backups`: CLI > the storage's `prune-backups` (storage.cfg) > vzdump.conf >
//!   `keep-all=1`;
//! * `dumpdir`/`storage` come from the defaults only if neither is given on the CLI;
//! * `performance` is merged key-wise (CLI wins);
//! * `exclude-path` = vzdump.conf entries + CLI entries (+ the standard excludes);
//! * `remove` is forced to 0 when the resulting `prune-backups` keeps all;
//! * without a storage, `notes-template` and `protected` are dropped.
//!
//! The resolution is pure: checking that `dumpdir`/`tmpdir` exist is left to the caller
//! ([`ResolvedJob::missing_dirs`] takes the existence test as a function).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;
use vzkit_storage::config::{ContentType, StorageConfig, split_list};
use vzkit_storage::prune::{PruneError, PruneOptions, parse_boolean, parse_integer};
use vzkit_storage::volid;

/// Patterns added by `stdexcludes` (the default).
pub const STD_EXCLUDES: [&str; 3] = ["/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid"];

/// Errors of option parsing and resolution, with PVE's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A schema error for one parameter (`raise_param_exc`).
    #[error("Parameter verification failed.\n{key}: {message}")]
    Param { key: String, message: String },
    /// The `prune-backups` property string (message as PVE's `parse_property_string`).
    #[error(transparent)]
    Prune(#[from] PruneError),
    #[error("cannot use options 'storage' and 'stdout' at the same time")]
    StorageAndStdout,
    #[error("cannot use options 'storage' and 'dumpdir' at the same time")]
    StorageAndDumpdir,
    #[error("could not get storage information for '{storage}': {reason}")]
    StorageInfo { storage: String, reason: String },
}

/// Why a single value was rejected (see [`JobOptions::set`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueError {
    /// Not a vzdump option.
    Unknown,
    /// Schema error message.
    Invalid(String),
    /// `prune-backups` error.
    Prune(PruneError),
}

impl ValueError {
    /// The message PVE's schema check would report for this key.
    pub fn message(&self) -> String {
        match self {
            ValueError::Unknown => "property is not defined in schema and the schema does not allow additional properties".to_string(),
            ValueError::Invalid(m) => m.clone(),
            ValueError::Prune(e) => format!("invalid format - {e}"),
        }
    }
}

/// `performance`: `[max-workers=N][,pbs-entries-max=N]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Performance {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pbs_entries_max: Option<u64>,
}

/// `fleecing`: `[enabled=BOOL][,storage=ID]` (VMs only; kept for config compatibility).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fleecing {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// All vzdump options; `None` = not set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdexcludes: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_path: Option<Vec<String>>,
    /// `0`, `1` (= lzo), `gzip`, `lzo`, `zstd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pigz: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zstd: Option<i64>,
    /// `snapshot`, `suspend`, `stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailto: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailnotification: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tmpdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dumpdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ionice: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub performance: Option<Performance>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleecing: Option<Fleecing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lockwait: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopwait: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune_backups: Option<PruneOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes_template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pbs_change_detection_mode: Option<String>,
    /// `dedup` storages: `metadata` (reuse unchanged files, default) or `data` (read all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_detection: Option<String>,
    /// API only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// CLI only: write the archive to stdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<bool>,
}

/// Keys of the schema (`$confdesc` + `job-id`, `stdout`).
pub const OPTION_KEYS: [&str; 34] = [
    "vmid",
    "node",
    "all",
    "exclude",
    "pool",
    "stdexcludes",
    "exclude-path",
    "compress",
    "pigz",
    "zstd",
    "mode",
    "quiet",
    "mailto",
    "mailnotification",
    "notification-mode",
    "tmpdir",
    "dumpdir",
    "script",
    "storage",
    "stop",
    "bwlimit",
    "ionice",
    "performance",
    "fleecing",
    "lockwait",
    "stopwait",
    "prune-backups",
    "remove",
    "notes-template",
    "protected",
    "pbs-change-detection-mode",
    "change-detection",
    "job-id",
    "stdout",
];

/// Boolean keys (values go through `parse_boolean`).
pub fn is_boolean_key(key: &str) -> bool {
    matches!(
        key,
        "all" | "stdexcludes" | "quiet" | "stop" | "remove" | "protected" | "stdout"
    )
}

/// Array keys (several lines / several CLI values accumulate).
pub fn is_array_key(key: &str) -> bool {
    key == "exclude-path"
}

static NODE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?$").expect("static regex"));
static POOL_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_\-]+$").expect("static regex"));
static EMAIL_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[A-Za-z0-9_+\-~]+(?::?\.[A-Za-z0-9_+\-~]+)*@[a-zA-Z0-9\-]+(?::?\.[a-zA-Z0-9\-]+)*$",
    )
    .expect("static regex")
});
static EMAIL_USER_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_+\-~]+$").expect("static regex"));

fn bool_value(v: &str) -> Result<bool, ValueError> {
    parse_boolean(v)
        .ok_or_else(|| ValueError::Invalid(format!("type check ('boolean') failed - got '{v}'")))
}

fn int_value(v: &str, min: Option<i64>, max: Option<i64>) -> Result<i64, ValueError> {
    let n = parse_integer(v)
        .ok_or_else(|| ValueError::Invalid(format!("type check ('integer') failed - got '{v}'")))?;
    if let Some(m) = min.filter(|m| n < *m) {
        return Err(ValueError::Invalid(format!(
            "value must have a minimum value of {m}"
        )));
    }
    if let Some(m) = max.filter(|m| n > *m) {
        return Err(ValueError::Invalid(format!(
            "value must have a maximum value of {m}"
        )));
    }
    Ok(n)
}

fn enum_value(v: &str, list: &[&str]) -> Result<String, ValueError> {
    if list.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(ValueError::Invalid(format!(
            "value '{v}' does not have a value in the enumeration '{}'",
            list.join(", ")
        )))
    }
}

fn vmid_list(v: &str) -> Result<Vec<u32>, ValueError> {
    split_list(v)
        .iter()
        .map(|id| {
            volid::verify_vmid(id).map_err(|e| ValueError::Invalid(format!("invalid format - {e}")))
        })
        .collect()
}

fn storage_id(v: &str) -> Result<String, ValueError> {
    volid::parse_storage_id(v)
        .map(str::to_string)
        .map_err(|e| ValueError::Invalid(format!("invalid format - {e}")))
}

/// A small `parse_property_string` for `performance` and `fleecing`.
fn property_string(
    v: &str,
    keys: &[&str],
    mut check: impl FnMut(&str, &str) -> Result<(), String>,
) -> Result<(), ValueError> {
    let mut errors = BTreeMap::new();
    let mut seen = Vec::new();
    for part in v.split(',') {
        if part.trim().is_empty() {
            continue;
        }
        let Some((k, val)) = part
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        else {
            return Err(ValueError::Invalid(
                "invalid format - missing key in comma-separated list property".to_string(),
            ));
        };
        if seen.contains(&k) {
            return Err(ValueError::Invalid(format!(
                "invalid format - duplicate key in comma-separated list property: {k}"
            )));
        }
        seen.push(k);
        if !keys.contains(&k) {
            errors.insert(k.to_string(), ValueError::Unknown.message());
        } else if let Err(e) = check(k, val) {
            errors.insert(k.to_string(), e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        let lines: Vec<String> = errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
        Err(ValueError::Invalid(format!(
            "invalid format - format error\n{}",
            lines.join("\n")
        )))
    }
}

fn msg(e: ValueError) -> String {
    e.message()
}

fn parse_performance(v: &str) -> Result<Performance, ValueError> {
    let mut p = Performance::default();
    property_string(v, &["max-workers", "pbs-entries-max"], |k, val| {
        if k == "max-workers" {
            p.max_workers = Some(
                int_value(val, Some(1), Some(256))
                    .map_err(msg)?
                    .unsigned_abs(),
            );
        } else {
            p.pbs_entries_max = Some(int_value(val, Some(1), None).map_err(msg)?.unsigned_abs());
        }
        Ok(())
    })?;
    Ok(p)
}

fn parse_fleecing(v: &str) -> Result<Fleecing, ValueError> {
    let mut f = Fleecing::default();
    property_string(v, &["enabled", "storage"], |k, val| {
        if k == "enabled" {
            f.enabled = Some(bool_value(val).map_err(msg)?);
        } else {
            f.storage = Some(storage_id(val).map_err(msg)?);
        }
        Ok(())
    })?;
    Ok(f)
}

/// `email-or-username-list`, split with `split_list`.
fn mailto_list(v: &str) -> Result<Vec<String>, ValueError> {
    let list = split_list(v);
    if list
        .iter()
        .all(|m| EMAIL_RE.is_match(m) || EMAIL_USER_RE.is_match(m))
    {
        Ok(list)
    } else {
        Err(ValueError::Invalid(
            "invalid format - value does not look like a valid list of email addresses or user names"
                .to_string(),
        ))
    }
}

impl JobOptions {
    /// Schema check and store one value. For `exclude-path` the value is appended; other keys
    /// are replaced. Booleans accept `parse_boolean` spellings; `mailto` is `split_list`ed.
    ///
    /// # Errors
    /// [`ValueError`] with PVE's schema message.
    pub fn set(&mut self, key: &str, v: &str) -> Result<(), ValueError> {
        let s = || Some(v.to_string());
        match key {
            "vmid" => self.vmid = Some(vmid_list(v)?),
            "exclude" => self.exclude = Some(vmid_list(v)?),
            "node" => {
                if !NODE_RE.is_match(v) {
                    return Err(ValueError::Invalid(
                        "invalid format - value does not look like a valid node name".into(),
                    ));
                }
                self.node = s();
            }
            "pool" => {
                if !POOL_RE.is_match(v) {
                    return Err(ValueError::Invalid(format!(
                        "invalid format - invalid pool ID '{v}'"
                    )));
                }
                self.pool = s();
            }
            "all" => self.all = Some(bool_value(v)?),
            "stdexcludes" => self.stdexcludes = Some(bool_value(v)?),
            "quiet" => self.quiet = Some(bool_value(v)?),
            "stop" => self.stop = Some(bool_value(v)?),
            "remove" => self.remove = Some(bool_value(v)?),
            "protected" => self.protected = Some(bool_value(v)?),
            "stdout" => self.stdout = Some(bool_value(v)?),
            "exclude-path" => self
                .exclude_path
                .get_or_insert_with(Vec::new)
                .push(v.to_string()),
            "compress" => self.compress = Some(enum_value(v, &["0", "1", "gzip", "lzo", "zstd"])?),
            "pigz" => self.pigz = Some(int_value(v, None, None)?),
            "zstd" => self.zstd = Some(int_value(v, None, None)?),
            "mode" => self.mode = Some(enum_value(v, &["snapshot", "suspend", "stop"])?),
            "mailto" => self.mailto = Some(mailto_list(v)?),
            "mailnotification" => {
                self.mailnotification = Some(enum_value(v, &["always", "failure"])?)
            }
            "notification-mode" => {
                self.notification_mode = Some(enum_value(
                    v,
                    &["auto", "legacy-sendmail", "notification-system"],
                )?)
            }
            "tmpdir" => self.tmpdir = s(),
            "dumpdir" => self.dumpdir = s(),
            "script" => self.script = s(),
            "storage" => self.storage = Some(storage_id(v)?),
            "bwlimit" => self.bwlimit = Some(int_value(v, Some(0), None)?),
            "ionice" => self.ionice = Some(int_value(v, Some(0), Some(8))?),
            "lockwait" => self.lockwait = Some(int_value(v, Some(0), None)?),
            "stopwait" => self.stopwait = Some(int_value(v, Some(0), None)?),
            "performance" => self.performance = Some(parse_performance(v)?),
            "fleecing" => self.fleecing = Some(parse_fleecing(v)?),
            "prune-backups" => {
                self.prune_backups = Some(PruneOptions::parse(v).map_err(ValueError::Prune)?)
            }
            "notes-template" => {
                if v.chars().count() > 1024 {
                    return Err(ValueError::Invalid(
                        "value may only be 1024 characters long".into(),
                    ));
                }
                self.notes_template = s();
            }
            "change-detection" => {
                self.change_detection = Some(enum_value(v, &["data", "metadata"])?)
            }
            "pbs-change-detection-mode" => {
                self.pbs_change_detection_mode =
                    Some(enum_value(v, &["legacy", "data", "metadata"])?)
            }
            "job-id" => self.job_id = s(),
            _ => return Err(ValueError::Unknown),
        }
        Ok(())
    }

    /// The schema defaults (`read_vzdump_defaults` before reading the file).
    pub fn schema_defaults() -> Self {
        JobOptions {
            all: Some(false),
            stdexcludes: Some(true),
            compress: Some("0".into()),
            pigz: Some(0),
            zstd: Some(1),
            mode: Some("snapshot".into()),
            quiet: Some(false),
            mailnotification: Some("always".into()),
            notification_mode: Some("auto".into()),
            stop: Some(false),
            bwlimit: Some(0),
            ionice: Some(7),
            lockwait: Some(180),
            stopwait: Some(10),
            prune_backups: Some(PruneOptions::keep_all()),
            remove: Some(true),
            performance: Some(Performance {
                max_workers: Some(16),
                pbs_entries_max: Some(1_048_576),
            }),
            fleecing: Some(Fleecing {
                enabled: Some(false),
                storage: None,
            }),
            ..JobOptions::default()
        }
    }

    /// Fill every unset key from `defaults` (the key-wise part of `VZDump->new`), except
    /// `exclude-path` and `prune-backups` (handled separately) and `dumpdir`/`storage`
    /// (only when neither is set). `performance` is merged key-wise.
    fn fill_from_defaults(&mut self, d: &JobOptions) {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = d.$f.clone(); } )* };
        }
        fill!(
            vmid,
            node,
            all,
            exclude,
            pool,
            stdexcludes,
            compress,
            pigz,
            zstd,
            mode,
            quiet,
            mailto,
            mailnotification,
            notification_mode,
            tmpdir,
            script,
            stop,
            bwlimit,
            ionice,
            fleecing,
            lockwait,
            stopwait,
            remove,
            notes_template,
            protected,
            pbs_change_detection_mode,
            change_detection,
            job_id,
            stdout
        );
        if self.dumpdir.is_none() && self.storage.is_none() {
            self.dumpdir = d.dumpdir.clone();
            self.storage = d.storage.clone();
        }
        self.performance = match (self.performance.take(), &d.performance) {
            (None, d) => d.clone(),
            (Some(p), None) => Some(p),
            (Some(p), Some(d)) => Some(Performance {
                max_workers: p.max_workers.or(d.max_workers),
                pbs_entries_max: p.pbs_entries_max.or(d.pbs_entries_max),
            }),
        };
    }

    /// Build CLI/API parameters: each `(key, value)` is checked against the schema (as the
    /// API does before calling `VZDump->new`); `exclude-path` values are also split at NUL
    /// (`parse_mailto_exclude_path`), `mailto` with `split_list`.
    ///
    /// # Errors
    /// [`OptionsError::Param`] (unknown key, schema error), [`OptionsError::Prune`] for
    /// `prune-backups`.
    pub fn from_params<K: AsRef<str>, V: AsRef<str>>(
        params: &[(K, V)],
    ) -> Result<Self, OptionsError> {
        let mut o = JobOptions::default();
        for (k, v) in params {
            let (k, v) = (k.as_ref(), v.as_ref());
            if k == "exclude-path" {
                for p in v.split('\0').filter(|p| !p.is_empty()) {
                    o.exclude_path
                        .get_or_insert_with(Vec::new)
                        .push(p.to_string());
                }
                o.exclude_path.get_or_insert_with(Vec::new);
                continue;
            }
            o.set(k, v).map_err(|e| match e {
                ValueError::Prune(p) => OptionsError::Prune(p),
                other => OptionsError::Param {
                    key: k.to_string(),
                    message: other.message(),
                },
            })?;
        }
        Ok(o)
    }
}

fn param_err(key: &str, message: &str) -> OptionsError {
    OptionsError::Param {
        key: key.to_string(),
        message: message.to_string(),
    }
}

/// `verify_vzdump_parameters`: `all`, `exclude` and `pool` conflict with `vmid`; `exclude`
/// without `pool` implies `all`; with `check_missing`, one of vmid/all/stop/pool is needed.
///
/// # Errors
/// [`OptionsError::Param`] with PVE's messages.
pub fn verify_vzdump_parameters(
    p: &mut JobOptions,
    check_missing: bool,
) -> Result<(), OptionsError> {
    let has_vmid = p.vmid.as_ref().is_some_and(|v| !v.is_empty());
    if p.all == Some(true) && has_vmid {
        return Err(param_err("all", "option conflicts with option 'vmid'"));
    }
    if p.exclude.is_some() && has_vmid {
        return Err(param_err("exclude", "option conflicts with option 'vmid'"));
    }
    if p.pool.is_some() && has_vmid {
        return Err(param_err("pool", "option conflicts with option 'vmid'"));
    }
    if p.exclude.is_some() && p.pool.is_none() {
        p.all = Some(true);
    }
    if check_missing
        && !(p.all == Some(true) || p.stop == Some(true) || p.pool.is_some())
        && !has_vmid
    {
        return Err(param_err("vmid", "property is missing"));
    }
    Ok(())
}

/// The outcome of [`resolve`]: the effective options plus what `VZDump->new` derives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedJob {
    pub options: JobOptions,
    /// vzdump.conf `exclude-path` + CLI `exclude-path` + [`STD_EXCLUDES`] if `stdexcludes`.
    pub exclude_patterns: Vec<String>,
    /// The target is a Proxmox Backup Server storage.
    pub pbs: bool,
}

impl ResolvedJob {
    /// The fatal "does not exist" errors of `VZDump->new` for `dumpdir` (only without a
    /// storage) and `tmpdir`, given a directory test.
    pub fn missing_dirs(&self, is_dir: impl Fn(&Path) -> bool) -> Vec<String> {
        let mut errors = Vec::new();
        let o = &self.options;
        if o.storage.is_none()
            && let Some(d) = o.dumpdir.as_deref().filter(|d| !is_dir(Path::new(d)))
        {
            errors.push(format!("dumpdir '{d}' does not exist"));
        }
        if let Some(t) = o
            .tmpdir
            .as_deref()
            .filter(|t| !t.is_empty() && !is_dir(Path::new(t)))
        {
            errors.push(format!("tmpdir '{t}' does not exist"));
        }
        errors
    }
}

fn strip_trailing_slashes(s: &mut Option<String>) {
    if let Some(v) = s.as_mut() {
        let t = v.trim_end_matches('/').to_string();
        *v = t;
    }
}

/// `VZDump->new`: merge CLI parameters (already schema-checked, e.g. by
/// [`JobOptions::from_params`]) with the vzdump.conf defaults (from
/// [`crate::conf::parse_vzdump_conf`], schema defaults filled) and the storage config.
///
/// # Errors
/// `storage`+`stdout`, `storage`+`dumpdir` conflicts; storage lookup failures
/// (`could not get storage information for 'S': ...`, wrong content type).
pub fn resolve(
    cli: JobOptions,
    defaults: &JobOptions,
    storage_cfg: &StorageConfig,
) -> Result<ResolvedJob, OptionsError> {
    let mut o = cli;
    if o.remove.is_none() {
        o.remove = Some(true);
    }
    o.fill_from_defaults(defaults);
    // PVE: `$opts->{dumpdir} =~ s|/+$||` (only for true values)
    strip_trailing_slashes(&mut o.dumpdir);
    strip_trailing_slashes(&mut o.tmpdir);

    let mut exclude_patterns: Vec<String> = Vec::new();
    exclude_patterns.extend(defaults.exclude_path.iter().flatten().cloned());
    exclude_patterns.extend(o.exclude_path.iter().flatten().cloned());
    if o.stdexcludes == Some(true) {
        exclude_patterns.extend(STD_EXCLUDES.iter().map(|s| s.to_string()));
    }

    if o.storage.is_some() && o.stdout == Some(true) {
        return Err(OptionsError::StorageAndStdout);
    }
    if o.storage.is_some() && o.dumpdir.is_some() {
        return Err(OptionsError::StorageAndDumpdir);
    }
    if o.dumpdir.as_deref().is_none_or(str::is_empty) && o.storage.is_none() {
        o.storage = Some("local".to_string());
    }

    let mut pbs = false;
    if let Some(storage) = o.storage.clone() {
        let info_err = |reason: String| OptionsError::StorageInfo {
            storage: storage.clone(),
            reason,
        };
        let scfg = storage_cfg
            .get(&storage)
            .ok_or_else(|| info_err(format!("storage '{storage}' does not exist")))?;
        if !scfg.has_content(ContentType::Backup) {
            return Err(info_err(format!(
                "can't use storage '{storage}' for backups - wrong content type"
            )));
        }
        if scfg.storage_type() == "pbs" {
            pbs = true;
        } else {
            o.dumpdir = Some(scfg.subdir("backup").map_err(|e| info_err(e.to_string()))?);
        }
        if o.prune_backups.is_none()
            && let Some(p) = scfg.prune_backups()
        {
            o.prune_backups = Some(p.map_err(|e| info_err(e.to_string()))?);
        }
    } else {
        o.notes_template = None;
        o.protected = None;
    }
    if o.prune_backups.is_none() {
        o.prune_backups = Some(
            defaults
                .prune_backups
                .clone()
                .unwrap_or_else(PruneOptions::keep_all),
        );
    }
    if o.prune_backups
        .as_ref()
        .is_some_and(|p| p.keep_all == Some(true))
    {
        o.remove = Some(false);
    }
    Ok(ResolvedJob {
        options: o,
        exclude_patterns,
        pbs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(text: &str) -> StorageConfig {
        let (cfg, w) = StorageConfig::parse(text, "storage.cfg");
        assert!(w.is_empty(), "{w:?}");
        cfg
    }

    #[test]
    fn schema_errors() {
        let cases = [
            (
                "mode",
                "fast",
                "value 'fast' does not have a value in the enumeration 'snapshot, suspend, stop'",
            ),
            ("ionice", "9", "value must have a maximum value of 8"),
            ("bwlimit", "-1", "value must have a minimum value of 0"),
            (
                "quiet",
                "maybe",
                "type check ('boolean') failed - got 'maybe'",
            ),
            (
                "vmid",
                "100,12",
                "invalid format - value '12' does not look like a valid VM ID",
            ),
            (
                "frobnicate",
                "1",
                "property is not defined in schema and the schema does not allow additional properties",
            ),
            (
                "performance",
                "max-workers=0",
                "invalid format - format error\nmax-workers: value must have a minimum value of 1",
            ),
        ];
        for (k, v, m) in cases {
            assert_eq!(
                JobOptions::from_params(&[(k, v)]).unwrap_err().to_string(),
                format!("Parameter verification failed.\n{k}: {m}")
            );
        }
        let o = JobOptions::from_params(&[
            ("vmid", "100 101"),
            ("quiet", "yes"),
            ("exclude-path", "/a\0/b c"),
        ])
        .unwrap();
        assert_eq!(o.vmid, Some(vec![100, 101]));
        assert_eq!(o.quiet, Some(true));
        assert_eq!(
            o.exclude_path,
            Some(vec!["/a".to_string(), "/b c".to_string()])
        );
    }

    #[test]
    fn verify_parameters() {
        let mut p = JobOptions::from_params(&[("vmid", "100"), ("all", "1")]).unwrap();
        assert_eq!(
            verify_vzdump_parameters(&mut p, true)
                .unwrap_err()
                .to_string(),
            "Parameter verification failed.\nall: option conflicts with option 'vmid'"
        );
        let mut p = JobOptions::from_params(&[("exclude", "100")]).unwrap();
        verify_vzdump_parameters(&mut p, true).unwrap();
        assert_eq!(p.all, Some(true));
        let mut p = JobOptions::default();
        assert_eq!(
            verify_vzdump_parameters(&mut p, true)
                .unwrap_err()
                .to_string(),
            "Parameter verification failed.\nvmid: property is missing"
        );
        verify_vzdump_parameters(&mut p, false).unwrap();
    }

    #[test]
    fn resolution() {
        let cfg = storage(
            "dir: local\n\tpath /var/lib/vz\n\tcontent backup\n\n\
             dir: images\n\tpath /srv/img\n\tcontent images\n\n\
             pbs: pbs1\n\tdatastore d\n\tserver 10.0.0.1\n\tcontent backup\n",
        );
        let defaults = JobOptions {
            exclude_path: Some(vec!["/conf".into()]),
            performance: Some(Performance {
                max_workers: Some(4),
                pbs_entries_max: None,
            }),
            notes_template: Some("{{guestname}}".into()),
            ..JobOptions::schema_defaults()
        };
        let cli = JobOptions::from_params(&[
            ("vmid", "100"),
            ("exclude-path", "/cli"),
            ("performance", "pbs-entries-max=5"),
            ("tmpdir", "/tmp//"),
        ])
        .unwrap();
        let r = resolve(cli, &defaults, &cfg).unwrap();
        let o = &r.options;
        assert_eq!(o.storage.as_deref(), Some("local"));
        assert_eq!(o.dumpdir.as_deref(), Some("/var/lib/vz/dump"));
        assert_eq!(o.tmpdir.as_deref(), Some("/tmp"));
        assert_eq!(
            o.performance,
            Some(Performance {
                max_workers: Some(4),
                pbs_entries_max: Some(5)
            })
        );
        assert_eq!(o.remove, Some(false));
        assert_eq!(o.notes_template.as_deref(), Some("{{guestname}}"));
        assert_eq!(
            r.exclude_patterns,
            ["/conf", "/cli", "/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid"]
        );
        assert!(!r.pbs);
        assert_eq!(r.missing_dirs(|_| true), Vec::<String>::new());
        assert_eq!(r.missing_dirs(|_| false), ["tmpdir '/tmp' does not exist"]);

        let r = resolve(
            JobOptions::from_params(&[("storage", "pbs1")]).unwrap(),
            &defaults,
            &cfg,
        )
        .unwrap();
        assert!(r.pbs);
        assert_eq!(r.options.dumpdir, None);

        let dump =
            JobOptions::from_params(&[("dumpdir", "/backups/"), ("protected", "1")]).unwrap();
        let r = resolve(dump, &defaults, &cfg).unwrap();
        assert_eq!(r.options.dumpdir.as_deref(), Some("/backups"));
        assert_eq!(r.options.storage, None);
        assert_eq!(
            (r.options.protected, r.options.notes_template.clone()),
            (None, None)
        );
        assert_eq!(
            r.missing_dirs(|_| false)[0],
            "dumpdir '/backups' does not exist"
        );

        let errs = [
            (
                vec![("storage", "local"), ("stdout", "1")],
                "cannot use options 'storage' and 'stdout' at the same time",
            ),
            (
                vec![("storage", "local"), ("dumpdir", "/x")],
                "cannot use options 'storage' and 'dumpdir' at the same time",
            ),
            (
                vec![("storage", "images")],
                "could not get storage information for 'images': can't use storage 'images' for backups - wrong content type",
            ),
            (
                vec![("storage", "nope")],
                "could not get storage information for 'nope': storage 'nope' does not exist",
            ),
        ];
        for (params, msg) in errs {
            let cli = JobOptions::from_params(&params).unwrap();
            assert_eq!(resolve(cli, &defaults, &cfg).unwrap_err().to_string(), msg);
        }
    }
}
