//! `/etc/pve/storage.cfg`: the section-config parser and writer, per-type option schemas and
//! content types.
//!
//! Compatibility target: pve-common `PVE::SectionConfig::parse_config`/`write_config` with the
//! `PVE::Storage::Plugin` overrides (`parse_section_header`, `decode_value`, `encode_value`,
//! `parse_config`) of pve-storage 0c56bad.
//!
//! Format:
//! ```text
//! <type>: <STORAGE_ID>
//! <TAB><key> <value>
//! <TAB><boolean-key>
//!
//! ```
//! Lines whose first non-blank character is `#` are skipped everywhere (comments are not
//! preserved). A section ends only at an empty line (or EOF). Problems never fail the parse:
//! they produce warnings with PVE's wording (`file F line N (section 'S') - unable to parse
//! value of 'k': ...`, `... (skip section 'S'): ...`, `... - ignore config line: ...`) and the
//! offending key, line or section is dropped.
//!
//! After parsing, a missing `content` gets the type's default content, the network types are
//! forced `shared 1`, and `local` loses any `nodes` restriction.
//!
//! Deviations from PVE, on purpose:
//! * PVE replaces a `local` storage that is not `dir` with path `/var/lib/vz` by its default;
//!   vzkit keeps a user-defined `local`, and only adds the default (with a configurable path)
//!   through [`StorageConfig::ensure_local`] when there is none.
//! * `content` and `nodes` are written sorted; PVE writes them in Perl hash order (random).
//! * The writer writes what the parser keeps, so `print` output re-parses to the same config.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;

use crate::prune::{PruneError, PruneOptions, parse_integer};
use crate::volid::{self, NS, VolumeError, VolumeId};

/// The types PVE forces `shared 1` on (`@SHARED_STORAGE`).
pub const SHARED_STORAGE_TYPES: [&str; 9] = [
    "iscsi",
    "nfs",
    "cifs",
    "rbd",
    "cephfs",
    "iscsidirect",
    "zfs",
    "drbd",
    "pbs",
];

/// Errors of building or modifying a [`StorageConfig`] programmatically.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    InvalidId(#[from] VolumeError),
    #[error("unknown section type '{0}'")]
    UnknownType(String),
    #[error("unable to parse value of '{key}': {message}")]
    Value { key: String, message: String },
    #[error("missing value for required option '{0}'")]
    MissingRequired(String),
    #[error("can't delete required option '{0}'")]
    DeleteRequired(String),
    #[error("storage ID '{0}' already defined")]
    AlreadyExists(String),
}

/// A content type (`valid_content_types`). Ordered by name, which is the order vzkit writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContentType {
    Backup,
    Images,
    Import,
    Iso,
    None,
    Rootdir,
    Snippets,
    Vztmpl,
}

impl ContentType {
    pub const ALL: [ContentType; 8] = [
        ContentType::Backup,
        ContentType::Images,
        ContentType::Import,
        ContentType::Iso,
        ContentType::None,
        ContentType::Rootdir,
        ContentType::Snippets,
        ContentType::Vztmpl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Backup => "backup",
            ContentType::Images => "images",
            ContentType::Import => "import",
            ContentType::Iso => "iso",
            ContentType::None => "none",
            ContentType::Rootdir => "rootdir",
            ContentType::Snippets => "snippets",
            ContentType::Vztmpl => "vztmpl",
        }
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`ContentType::from_str`]: PVE's `verify_content` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid content type '{0}'")]
pub struct InvalidContentType(pub String);

impl FromStr for ContentType {
    type Err = InvalidContentType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ContentType::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| InvalidContentType(s.to_string()))
    }
}

/// `PVE::Tools::split_list`: NUL-separated if the text has a NUL, else separated by `,`,
/// `;` and whitespace.
pub fn split_list(text: &str) -> Vec<String> {
    if text.contains('\0') {
        let mut v: Vec<String> = text.split('\0').map(str::to_string).collect();
        // Perl's split drops trailing empty fields.
        while v.last().is_some_and(String::is_empty) {
            v.pop();
        }
        return v;
    }
    text.split(|c: char| c == ',' || c == ';' || is_perl_space(c))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

// ---------------------------------------------------------------------------------------
// Schema

/// How a property's value is checked and stored.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    Int(Option<i64>, Option<i64>),
    Str,
    Enum(&'static [&'static str]),
    Path,
    Content,
    Nodes,
    ContentDirs,
    Prune,
    Bwlimit,
    LvmName,
    Volid,
    MountOptions,
}

fn property_kind(key: &str) -> Option<Kind> {
    use Kind::*;
    Some(match key {
        "disable"
        | "shared"
        | "mkdir"
        | "create-base-path"
        | "create-subdirs"
        | "snapshot-as-volume-chain"
        | "sparse"
        | "krbd"
        | "saferemove"
        | "tagged_only"
        | "nowritecache"
        | "nocow" => Bool,
        "max-protected-backups" => Int(Some(-1), None),
        "port" => Int(Some(1), Some(65535)),
        "maxfiles" => Int(Some(0), None),
        "path" | "subdir" | "export" | "lun-dir" | "tgt-pidfile" => Path,
        "content" => Content,
        "nodes" => Nodes,
        "content-dirs" => ContentDirs,
        "prune-backups" => Prune,
        "bwlimit" => Bwlimit,
        "vgname" | "thinpool" => LvmName,
        "base" => Volid,
        "options" => MountOptions,
        "format" => Enum(&["raw", "qcow2", "subvol", "vmdk"]),
        "preallocation" => Enum(&["off", "metadata", "falloc", "full"]),
        "iscsiprovider" => Enum(&["comstar", "istgt", "iet", "LIO"]),
        "target-provider" => Enum(&["tgt"]),
        "initiator" => Enum(&["auto", "kernel", "userspace"]),
        "smbversion" => Enum(&["default", "2.0", "2.1", "3", "3.0", "3.11"]),
        "is_mountpoint"
        | "pool"
        | "blocksize"
        | "mountpoint"
        | "monhost"
        | "data-pool"
        | "namespace"
        | "username"
        | "keyring"
        | "authsupported"
        | "portal"
        | "target"
        | "comstar_hg"
        | "comstar_tg"
        | "lio_tpg"
        | "zfs-base-path"
        | "server"
        | "share"
        | "domain"
        | "password"
        | "fs-name"
        | "datastore"
        | "fingerprint"
        | "encryption-key"
        | "master-pubkey"
        | "saferemove_throughput" => Str,
        _ => return None,
    })
}

/// Whether an option is required and/or immutable for a type (`options()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionSpec {
    pub key: &'static str,
    /// `fixed => 1`: cannot be changed after creation.
    pub fixed: bool,
    /// `optional => 1`: may be absent.
    pub optional: bool,
}

const fn o(key: &'static str) -> OptionSpec {
    OptionSpec {
        key,
        fixed: false,
        optional: true,
    }
}
const fn fixed(key: &'static str) -> OptionSpec {
    OptionSpec {
        key,
        fixed: true,
        optional: false,
    }
}
const fn fixed_opt(key: &'static str) -> OptionSpec {
    OptionSpec {
        key,
        fixed: true,
        optional: true,
    }
}

/// Per-type schema: accepted options, valid and default content, valid formats.
#[derive(Debug)]
pub struct TypeSchema {
    pub name: &'static str,
    pub options: &'static [OptionSpec],
    pub content_valid: &'static [ContentType],
    pub content_default: &'static [ContentType],
    /// Valid image formats (empty = raw only, no `format` option).
    pub formats: &'static [&'static str],
}

impl TypeSchema {
    pub fn option(&self, key: &str) -> Option<&OptionSpec> {
        self.options.iter().find(|o| o.key == key)
    }

    /// Whether `key` is a boolean property.
    pub fn is_boolean(&self, key: &str) -> bool {
        self.option(key).is_some() && matches!(property_kind(key), Some(Kind::Bool))
    }

    pub fn supports_content(&self, c: ContentType) -> bool {
        self.content_valid.contains(&c)
    }
}

use ContentType as C;

const ALL_FILE_CONTENT: &[ContentType] = &[
    C::Images,
    C::Rootdir,
    C::Vztmpl,
    C::Iso,
    C::Backup,
    C::Snippets,
    C::None,
    C::Import,
];

static SCHEMAS: &[TypeSchema] = &[
    TypeSchema {
        name: "dir",
        options: &[
            fixed("path"),
            o("content-dirs"),
            o("nodes"),
            o("shared"),
            o("disable"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("content"),
            o("format"),
            o("mkdir"),
            o("create-base-path"),
            o("create-subdirs"),
            o("is_mountpoint"),
            o("bwlimit"),
            o("preallocation"),
            o("snapshot-as-volume-chain"),
        ],
        content_valid: ALL_FILE_CONTENT,
        content_default: &[C::Images, C::Rootdir],
        formats: &["raw", "qcow2", "vmdk", "subvol"],
    },
    TypeSchema {
        name: "lvmthin",
        options: &[
            fixed("thinpool"),
            fixed("vgname"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("bwlimit"),
        ],
        content_valid: &[C::Images, C::Rootdir],
        content_default: &[C::Images, C::Rootdir],
        formats: &[],
    },
    TypeSchema {
        name: "lvm",
        options: &[
            fixed("vgname"),
            fixed_opt("base"),
            o("nodes"),
            o("shared"),
            o("disable"),
            o("saferemove"),
            o("saferemove_throughput"),
            o("content"),
            o("tagged_only"),
            o("bwlimit"),
            o("snapshot-as-volume-chain"),
        ],
        content_valid: &[C::Images, C::Rootdir],
        content_default: &[C::Images],
        formats: &[],
    },
    TypeSchema {
        name: "zfspool",
        options: &[
            fixed("pool"),
            o("blocksize"),
            o("sparse"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("bwlimit"),
            o("mountpoint"),
        ],
        content_valid: &[C::Images, C::Rootdir],
        content_default: &[C::Images, C::Rootdir],
        formats: &["raw", "subvol"],
    },
    TypeSchema {
        name: "rbd",
        options: &[
            o("monhost"),
            o("pool"),
            o("data-pool"),
            o("namespace"),
            o("username"),
            o("krbd"),
            o("keyring"),
            o("authsupported"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("bwlimit"),
        ],
        content_valid: &[C::Images, C::Rootdir],
        content_default: &[C::Images],
        formats: &[],
    },
    TypeSchema {
        name: "iscsi",
        options: &[
            fixed("portal"),
            fixed("target"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("bwlimit"),
            // vzkit: initiator choice and managed (tgt-allocated) LUNs.
            o("initiator"),
            fixed_opt("target-provider"),
            fixed_opt("lun-dir"),
            o("tgt-pidfile"),
        ],
        // `rootdir` only with `target-provider` (checked by the backend).
        content_valid: &[C::Images, C::Rootdir, C::None],
        content_default: &[C::Images],
        formats: &[],
    },
    TypeSchema {
        name: "iscsidirect",
        options: &[
            fixed("portal"),
            fixed("target"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("bwlimit"),
        ],
        content_valid: &[C::Images, C::None],
        content_default: &[C::Images],
        formats: &[],
    },
    TypeSchema {
        name: "btrfs",
        options: &[
            fixed("path"),
            o("nodes"),
            o("shared"),
            o("disable"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("content"),
            o("format"),
            o("is_mountpoint"),
            o("nocow"),
            o("preallocation"),
            o("bwlimit"),
        ],
        content_valid: ALL_FILE_CONTENT,
        content_default: &[C::Images, C::Rootdir],
        formats: &["raw", "subvol"],
    },
    TypeSchema {
        name: "dedup",
        options: &[
            fixed("path"),
            o("nodes"),
            o("shared"),
            o("disable"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("content"),
        ],
        content_valid: &[C::Backup],
        content_default: &[C::Backup],
        formats: &[],
    },
    TypeSchema {
        name: "nfs",
        options: &[
            fixed("path"),
            fixed("server"),
            fixed("export"),
            o("content-dirs"),
            o("nodes"),
            o("disable"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("options"),
            o("content"),
            o("format"),
            o("mkdir"),
            o("create-base-path"),
            o("create-subdirs"),
            o("bwlimit"),
            o("preallocation"),
            o("snapshot-as-volume-chain"),
        ],
        content_valid: &[
            C::Images,
            C::Rootdir,
            C::Vztmpl,
            C::Iso,
            C::Backup,
            C::Snippets,
            C::Import,
        ],
        content_default: &[C::Images],
        formats: &["raw", "qcow2", "vmdk"],
    },
    TypeSchema {
        name: "cifs",
        options: &[
            fixed("path"),
            fixed("server"),
            fixed("share"),
            o("content-dirs"),
            o("subdir"),
            o("nodes"),
            o("disable"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("content"),
            o("format"),
            o("username"),
            o("password"),
            o("domain"),
            o("smbversion"),
            o("mkdir"),
            o("create-base-path"),
            o("create-subdirs"),
            o("bwlimit"),
            o("preallocation"),
            o("options"),
            o("snapshot-as-volume-chain"),
        ],
        content_valid: &[
            C::Images,
            C::Rootdir,
            C::Vztmpl,
            C::Iso,
            C::Backup,
            C::Snippets,
            C::Import,
        ],
        content_default: &[C::Images],
        formats: &["raw", "qcow2", "vmdk"],
    },
    TypeSchema {
        name: "cephfs",
        options: &[
            fixed("path"),
            o("content-dirs"),
            o("monhost"),
            o("nodes"),
            o("subdir"),
            o("disable"),
            o("options"),
            o("username"),
            o("keyring"),
            o("content"),
            o("fs-name"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("mkdir"),
            o("create-base-path"),
            o("create-subdirs"),
            o("bwlimit"),
        ],
        content_valid: &[C::Vztmpl, C::Iso, C::Backup, C::Snippets, C::Import],
        content_default: &[C::Backup],
        formats: &[],
    },
    TypeSchema {
        name: "pbs",
        options: &[
            fixed("datastore"),
            fixed("server"),
            o("port"),
            o("username"),
            o("password"),
            o("encryption-key"),
            o("master-pubkey"),
            o("fingerprint"),
            o("namespace"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("bwlimit"),
        ],
        content_valid: &[C::Backup, C::None],
        content_default: &[C::Backup],
        formats: &[],
    },
    TypeSchema {
        name: "zfs",
        options: &[
            fixed("portal"),
            fixed("target"),
            fixed("pool"),
            fixed("blocksize"),
            fixed("iscsiprovider"),
            o("nowritecache"),
            o("sparse"),
            o("comstar_hg"),
            o("comstar_tg"),
            o("lio_tpg"),
            o("zfs-base-path"),
            o("nodes"),
            o("disable"),
            o("content"),
            o("bwlimit"),
        ],
        content_valid: &[C::Images],
        content_default: &[C::Images],
        formats: &[],
    },
    TypeSchema {
        name: "dedup",
        options: &[
            fixed("path"),
            o("content"),
            o("prune-backups"),
            o("max-protected-backups"),
            o("disable"),
            o("nodes"),
        ],
        content_valid: &[C::Backup, C::None],
        content_default: &[C::Backup],
        formats: &[],
    },
];

/// The schema of a storage type, `None` for unsupported types.
pub fn type_schema(storage_type: &str) -> Option<&'static TypeSchema> {
    SCHEMAS.iter().find(|s| s.name == storage_type)
}

/// All supported storage types.
pub fn storage_types() -> impl Iterator<Item = &'static str> {
    SCHEMAS.iter().map(|s| s.name)
}

static NODE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?$").expect("static regex"));
static PATH_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^/[^;()]+").expect("static regex"));
static DIR_OVERRIDE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([a-z]+)=([^.]*(?:\.?[^.]+)+)$").expect("static regex"));

fn verify_dir_override(v: &str) -> bool {
    let Some(c) = DIR_OVERRIDE_RE.captures(v) else {
        return false;
    };
    let ok_content = &c[1] == "import" || ContentType::from_str(&c[1]).is_ok();
    let rel = &c[2];
    ok_content && rel.len() < 1023 && !rel.split('/').any(|p| p.len() >= 255)
}

fn verify_bwlimit(v: &str) -> Result<(), String> {
    const KEYS: [&str; 5] = ["clone", "default", "migration", "move", "restore"];
    let mut errors = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for part in v.split(',') {
        if part.trim_matches(is_perl_space).is_empty() {
            continue;
        }
        let Some((k, val)) = part
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        else {
            return Err("missing key in comma-separated list property".to_string());
        };
        if !seen.insert(k) {
            return Err(format!(
                "duplicate key in comma-separated list property: {k}"
            ));
        }
        if !KEYS.contains(&k) {
            errors.insert(
                k.to_string(),
                "property is not defined in schema and the schema does not allow additional properties",
            );
        } else if val
            .parse::<f64>()
            .map_or(true, |n| !n.is_finite() || n < 0.0)
        {
            errors.insert(k.to_string(), "type check ('number') failed");
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        let lines: Vec<String> = errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
        Err(format!("format error\n{}", lines.join("\n")))
    }
}

/// `check_value` with the schema check: returns the canonical value to store.
fn check_value(schema: &TypeSchema, key: &str, value: Option<&str>) -> Result<String, String> {
    if schema.option(key).is_none() {
        return Err(format!("unexpected property '{key}'"));
    }
    let kind = property_kind(key).ok_or_else(|| "unknown property type".to_string())?;
    let value = match (kind, value) {
        (Kind::Bool, None) => "1",
        (_, None) => return Err("got undefined value".to_string()),
        (_, Some(v)) => v,
    };
    if value.contains(['\n', '\r']) {
        return Err("property contains a line feed".to_string());
    }
    let invalid = |m: String| Err(format!("invalid format - {m}"));
    match kind {
        Kind::Bool => match value {
            "1" | "0" => Ok(value.to_string()),
            _ => Err(format!("type check ('boolean') failed - got '{value}'")),
        },
        Kind::Int(min, max) => {
            let n = parse_integer(value)
                .ok_or_else(|| format!("type check ('integer') failed - got '{value}'"))?;
            if let Some(min) = min.filter(|m| n < *m) {
                return Err(format!("value must have a minimum value of {min}"));
            }
            if let Some(max) = max.filter(|m| n > *m) {
                return Err(format!("value must have a maximum value of {max}"));
            }
            Ok(n.to_string())
        }
        Kind::Enum(list) => {
            if list.contains(&value) {
                Ok(value.to_string())
            } else {
                Err(format!(
                    "value '{value}' does not have a value in the enumeration '{}'",
                    list.join(", ")
                ))
            }
        }
        Kind::Path => {
            if PATH_RE.is_match(value) {
                Ok(value.to_string())
            } else {
                invalid("value does not look like a valid absolute path".to_string())
            }
        }
        Kind::Content => {
            for c in split_list(value) {
                if c != "import" && ContentType::from_str(&c).is_err() {
                    return invalid(format!("invalid content type '{c}'"));
                }
            }
            Ok(value.to_string())
        }
        Kind::Nodes => {
            if split_list(value).iter().all(|n| NODE_RE.is_match(n)) {
                Ok(value.to_string())
            } else {
                invalid("value does not look like a valid node name".to_string())
            }
        }
        Kind::ContentDirs => {
            for d in split_list(value) {
                if !verify_dir_override(&d) {
                    return invalid(format!("invalid override '{d}'"));
                }
            }
            Ok(value.to_string())
        }
        Kind::Prune => match PruneOptions::parse(value) {
            Ok(_) => Ok(value.to_string()),
            Err(e) => invalid(e.to_string()),
        },
        Kind::Bwlimit => match verify_bwlimit(value) {
            Ok(()) => Ok(value.to_string()),
            Err(e) => invalid(e),
        },
        Kind::LvmName => match volid::parse_lvm_name(value) {
            Ok(_) => Ok(value.to_string()),
            Err(e) => invalid(e.to_string()),
        },
        Kind::Volid => match VolumeId::parse(value) {
            Ok(_) => Ok(value.to_string()),
            Err(e) => invalid(e.to_string()),
        },
        Kind::MountOptions => {
            if !value.is_empty() && !value.contains(is_perl_space) {
                Ok(value.to_string())
            } else {
                invalid(format!("invalid options '{value}'"))
            }
        }
        Kind::Str => Ok(value.to_string()),
    }
}

// ---------------------------------------------------------------------------------------
// Sections

/// One storage definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSection {
    storage_type: String,
    id: String,
    content: BTreeSet<ContentType>,
    nodes: BTreeSet<String>,
    content_dirs: BTreeMap<String, String>,
    /// Every other key, with its checked canonical value (booleans `1`/`0`).
    values: BTreeMap<String, String>,
}

impl StorageSection {
    /// A new section of a supported type, with the type's default content and no options.
    ///
    /// # Errors
    /// Invalid storage id, unsupported type.
    pub fn new(storage_type: &str, id: &str) -> Result<Self, ConfigError> {
        volid::parse_storage_id(id)?;
        let schema = type_schema(storage_type)
            .ok_or_else(|| ConfigError::UnknownType(storage_type.into()))?;
        let mut s = Self {
            storage_type: storage_type.to_string(),
            id: id.to_string(),
            content: schema.content_default.iter().copied().collect(),
            nodes: BTreeSet::new(),
            content_dirs: BTreeMap::new(),
            values: BTreeMap::new(),
        };
        if SHARED_STORAGE_TYPES.contains(&storage_type) {
            s.values.insert("shared".into(), "1".into());
        }
        Ok(s)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn storage_type(&self) -> &str {
        &self.storage_type
    }

    /// The schema of this section's type.
    pub fn schema(&self) -> &'static TypeSchema {
        // Sections are only built for known types.
        type_schema(&self.storage_type).unwrap_or(&SCHEMAS[0])
    }

    /// Content types. Empty or `{none}` means no content.
    pub fn content(&self) -> &BTreeSet<ContentType> {
        &self.content
    }

    pub fn has_content(&self, c: ContentType) -> bool {
        self.content.contains(&c)
    }

    /// Node restriction (empty = all nodes).
    pub fn nodes(&self) -> &BTreeSet<String> {
        &self.nodes
    }

    /// `content-dirs` overrides: vtype → path relative to `path`.
    pub fn content_dirs(&self) -> &BTreeMap<String, String> {
        &self.content_dirs
    }

    /// The stored value of a scalar option. `content`, `nodes` and `content-dirs` have their
    /// own accessors and are not returned here.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A boolean option (`1`).
    pub fn flag(&self, key: &str) -> bool {
        self.get(key) == Some("1")
    }

    pub fn path(&self) -> Option<&Path> {
        self.get("path").map(Path::new)
    }

    /// The `prune-backups` option, parsed and validated.
    pub fn prune_backups(&self) -> Option<Result<PruneOptions, PruneError>> {
        self.get("prune-backups").map(PruneOptions::parse)
    }

    pub fn is_shared(&self) -> bool {
        self.flag("shared") || SHARED_STORAGE_TYPES.contains(&self.storage_type.as_str())
    }

    pub fn is_disabled(&self) -> bool {
        self.flag("disable")
    }

    /// `get_subdir` for this storage.
    ///
    /// # Errors
    /// `storage definition has no path`, `unknown vtype 'X'`.
    pub fn subdir(&self, vtype: &str) -> Result<String, VolumeError> {
        volid::get_subdir(self.get("path"), &self.content_dirs, vtype)
    }

    /// Set an option, with the parser's checks and decoding.
    ///
    /// # Errors
    /// [`ConfigError::Value`] with PVE's message if the key is not accepted by this type or
    /// the value does not pass the schema or decoding.
    pub fn set(&mut self, key: &str, value: &str) -> Result<Vec<String>, ConfigError> {
        let schema = self.schema();
        let err = |message: String| ConfigError::Value {
            key: key.to_string(),
            message,
        };
        let v = check_value(schema, key, Some(value)).map_err(err)?;
        let mut warnings = Vec::new();
        self.store(schema, key, v, &mut warnings).map_err(err)?;
        Ok(warnings)
    }

    /// Remove an optional option (content falls back to the type default).
    ///
    /// # Errors
    /// [`ConfigError::DeleteRequired`] for required options.
    pub fn delete(&mut self, key: &str) -> Result<(), ConfigError> {
        let schema = self.schema();
        if schema.option(key).is_some_and(|o| !o.optional) {
            return Err(ConfigError::DeleteRequired(key.to_string()));
        }
        match key {
            "content" => self.content = schema.content_default.iter().copied().collect(),
            "nodes" => self.nodes.clear(),
            "content-dirs" => self.content_dirs.clear(),
            _ => {
                self.values.remove(key);
            }
        }
        Ok(())
    }

    /// `decode_value` + store.
    fn store(
        &mut self,
        schema: &TypeSchema,
        key: &str,
        value: String,
        warnings: &mut Vec<String>,
    ) -> Result<(), String> {
        match key {
            "content" => {
                let mut set = BTreeSet::new();
                for c in split_list(&value) {
                    match ContentType::from_str(&c) {
                        Ok(ct) if schema.supports_content(ct) => {
                            set.insert(ct);
                        }
                        _ => warnings.push(format!("storage does not support content type '{c}'")),
                    }
                }
                if set.contains(&ContentType::None) && set.len() > 1 {
                    return Err("unable to combine 'none' with other content types".to_string());
                }
                if set.is_empty() {
                    if !schema.supports_content(ContentType::None) {
                        return Err("storage does not support content type 'none'".to_string());
                    }
                    // PVE keeps `{}` and writes it as `none`; store what re-parses.
                    set.insert(ContentType::None);
                }
                self.content = set;
            }
            "nodes" => {
                self.nodes = split_list(&value)
                    .into_iter()
                    .filter(|n| NODE_RE.is_match(n))
                    .collect();
            }
            "content-dirs" => {
                let mut dirs = BTreeMap::new();
                for d in split_list(&value) {
                    let (c, p) = d.split_once('=').unwrap_or((d.as_str(), ""));
                    match ContentType::from_str(c) {
                        Ok(ct) if schema.supports_content(ct) => {
                            dirs.insert(c.to_string(), p.to_string());
                        }
                        _ => warnings.push(format!("storage does not support content type '{c}'")),
                    }
                }
                self.content_dirs = dirs;
            }
            "format" if !schema.formats.contains(&value.as_str()) => {
                warnings.push(format!("storage does not support format '{value}'"));
            }
            // `disable 0` is never written by PVE; not storing it keeps parse(print(x)) == x.
            "disable" if value == "0" => {
                self.values.remove(key);
            }
            _ => {
                self.values.insert(key.to_string(), value);
            }
        }
        Ok(())
    }

    /// vzkit's cross-option rules for managed iSCSI storages: `target-provider` and `lun-dir`
    /// go together, `tgt-pidfile` and content `rootdir` need them.
    fn inconsistent(&self) -> Option<&'static str> {
        if self.storage_type != "iscsi" {
            return None;
        }
        let managed = self.values.contains_key("target-provider");
        if managed != self.values.contains_key("lun-dir") {
            return Some("'target-provider' and 'lun-dir' must be set together");
        }
        if !managed && self.values.contains_key("tgt-pidfile") {
            return Some("'tgt-pidfile' needs 'target-provider'");
        }
        if !managed && self.content.contains(&ContentType::Rootdir) {
            return Some("content 'rootdir' needs a managed target ('target-provider')");
        }
        None
    }

    fn missing_required(&self) -> Option<&'static str> {
        self.schema()
            .options
            .iter()
            .filter(|o| !o.optional)
            .map(|o| o.key)
            .find(|k| !self.is_set(k))
    }

    fn is_set(&self, key: &str) -> bool {
        match key {
            // content always has a value (the default when absent)
            "content" => true,
            "nodes" => !self.nodes.is_empty(),
            "content-dirs" => !self.content_dirs.is_empty(),
            _ => self.values.contains_key(key),
        }
    }

    /// `encode_value`; `None` = not written.
    fn encoded(&self, key: &str) -> Option<String> {
        let v = match key {
            "content" => {
                let list: Vec<&str> = self.content.iter().map(|c| c.as_str()).collect();
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(",")
                }
            }
            "nodes" => self.nodes.iter().cloned().collect::<Vec<_>>().join(","),
            "content-dirs" => self
                .content_dirs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            _ => self.values.get(key)?.clone(),
        };
        (!v.is_empty()).then_some(v)
    }

    fn write(&self, out: &mut String) {
        out.push_str(&format!("{}: {}\n", self.storage_type, self.id));
        if self.is_disabled() {
            out.push_str("\tdisable\n");
        }
        let mut keys: Vec<&OptionSpec> = self
            .schema()
            .options
            .iter()
            .filter(|o| o.key != "disable")
            .collect();
        keys.sort_by_key(|o| o.key);
        let required = keys.iter().filter(|o| !o.optional);
        let optional = keys.iter().filter(|o| o.optional);
        for spec in required.chain(optional) {
            if let Some(v) = self.encoded(spec.key) {
                out.push_str(&format!("\t{} {v}\n", spec.key));
            }
        }
        out.push('\n');
    }
}

/// A parsed `storage.cfg`: sections in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageConfig {
    sections: Vec<StorageSection>,
}

static HEADER_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"^({NS}+):[ \t\n\r\x0B\x0C]*({NS}+)[ \t\n\r\x0B\x0C]*$"
    ))
    .expect("static regex")
});
static PROPERTY_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"^[ \t\n\r\x0B\x0C]+({NS}+)(?:[ \t\n\r\x0B\x0C]+(.*{NS}))?[ \t\n\r\x0B\x0C]*$"
    ))
    .expect("static regex")
});
static COMMENT_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[ \t\n\r\x0B\x0C]*#").expect("static regex"));

/// Perl truthiness of a line: `""` and `"0"` end a section.
fn is_falsy(line: &str) -> bool {
    line.is_empty() || line == "0"
}

impl StorageConfig {
    /// Parse `storage.cfg` text. Never fails; returns the warnings PVE would print.
    /// `filename` is only used in the warnings.
    pub fn parse(text: &str, filename: &str) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let mut cfg = StorageConfig::default();
        let lines: Vec<&str> = text.split('\n').collect();
        let mut idx = 0usize;
        let mut lineno = 0usize;
        let next_line = |idx: &mut usize, lineno: &mut usize| -> Option<&str> {
            while *idx < lines.len() {
                let line = lines[*idx];
                *idx += 1;
                *lineno += 1;
                if !COMMENT_RE.is_match(line) {
                    return Some(line);
                }
            }
            None
        };

        while idx < lines.len() {
            let Some(line) = next_line(&mut idx, &mut lineno) else {
                break;
            };
            if is_falsy(line) {
                continue;
            }
            let mut errprefix = format!("file {filename} line {lineno}");
            let Some(h) = HEADER_RE.captures(line) else {
                warnings.push(format!("{errprefix} - ignore config line: {line}"));
                continue;
            };
            let stype = h[1].to_lowercase();
            let id = h[2].to_string();
            let mut skip = false;
            let mut section = None;
            if let Err(e) = volid::parse_storage_id(&id) {
                skip = true;
                warnings.push(format!("{errprefix} (skip section '{id}'): {e}"));
            } else {
                match StorageSection::new(&stype, &id) {
                    Ok(s) => section = Some(s),
                    Err(_) => {
                        skip = true;
                        warnings.push(format!(
                            "{errprefix} (skip section '{id}'): unsupported type '{stype}'"
                        ));
                    }
                }
            }
            let schema = type_schema(&stype);
            // raw checked values, in line order
            let mut raw: Vec<(String, String)> = Vec::new();
            while let Some(line) = next_line(&mut idx, &mut lineno) {
                if is_falsy(line) {
                    break;
                }
                if skip {
                    continue;
                }
                errprefix = format!("file {filename} line {lineno}");
                let Some(schema) = schema else { continue };
                match PROPERTY_RE.captures(line) {
                    Some(p) => {
                        let k = &p[1];
                        let v = p.get(2).map(|m| m.as_str());
                        let res = if raw.iter().any(|(rk, _)| rk == k) {
                            Err("duplicate attribute".to_string())
                        } else {
                            check_value(schema, k, v)
                        };
                        match res {
                            Ok(v) => raw.push((k.to_string(), v)),
                            Err(e) => warnings.push(format!(
                                "{errprefix} (section '{id}') - unable to parse value of '{k}': {e}"
                            )),
                        }
                    }
                    None => warnings.push(format!(
                        "{errprefix} (section '{id}') - ignore config line: {line}"
                    )),
                }
            }
            let (Some(mut section), Some(schema)) = (section.filter(|_| !skip), schema) else {
                continue;
            };
            // check_config: decode, then required options
            let mut decode_warnings = Vec::new();
            let mut failed = None;
            for (k, v) in raw {
                if let Err(e) = section.store(schema, &k, v, &mut decode_warnings) {
                    failed = Some(e);
                    break;
                }
            }
            warnings.extend(decode_warnings);
            if failed.is_none() {
                failed = section
                    .missing_required()
                    .map(|k| format!("missing value for required option '{k}'"))
                    .or_else(|| section.inconsistent().map(str::to_string));
            }
            if let Some(e) = failed {
                warnings.push(format!("{errprefix} (skip section '{id}'): {e}"));
                continue;
            }
            // a later section with the same id replaces the earlier one (and its position)
            cfg.sections.retain(|s| s.id != section.id);
            cfg.sections.push(section);
        }

        for s in &mut cfg.sections {
            if s.id == "local" {
                s.nodes.clear();
            }
        }
        (cfg, warnings)
    }

    /// Write the config: sections in order, each followed by a blank line; per section the
    /// header, `\tdisable` if set, the required options sorted, then all other set options
    /// sorted.
    pub fn print(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            s.write(&mut out);
        }
        out
    }

    pub fn get(&self, id: &str) -> Option<&StorageSection> {
        self.sections.iter().find(|s| s.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut StorageSection> {
        self.sections.iter_mut().find(|s| s.id == id)
    }

    /// Sections in file order.
    pub fn sections(&self) -> &[StorageSection] {
        &self.sections
    }

    /// Append a section.
    ///
    /// # Errors
    /// [`ConfigError::AlreadyExists`], [`ConfigError::MissingRequired`].
    pub fn add_section(&mut self, section: StorageSection) -> Result<(), ConfigError> {
        if self.get(&section.id).is_some() {
            return Err(ConfigError::AlreadyExists(section.id));
        }
        if let Some(k) = section.missing_required() {
            return Err(ConfigError::MissingRequired(k.to_string()));
        }
        self.sections.push(section);
        Ok(())
    }

    /// Remove a section by id.
    pub fn remove(&mut self, id: &str) -> Option<StorageSection> {
        let pos = self.sections.iter().position(|s| s.id == id)?;
        Some(self.sections.remove(pos))
    }

    /// PVE's default `local` storage, with a configurable path: `dir: local`, content
    /// `backup,images,iso,rootdir,snippets,vztmpl`, `prune-backups keep-all=1`.
    pub fn default_local(path: PathBuf) -> StorageSection {
        StorageSection {
            storage_type: "dir".to_string(),
            id: "local".to_string(),
            content: [
                C::Rootdir,
                C::Images,
                C::Vztmpl,
                C::Iso,
                C::Backup,
                C::Snippets,
            ]
            .into_iter()
            .collect(),
            nodes: BTreeSet::new(),
            content_dirs: BTreeMap::new(),
            values: [
                ("path".to_string(), path.to_string_lossy().into_owned()),
                ("prune-backups".to_string(), "keep-all=1".to_string()),
            ]
            .into_iter()
            .collect(),
        }
    }

    /// Add [`StorageConfig::default_local`] as the first section if there is no `local`.
    /// Unlike PVE, an existing `local` is kept even if it is not a `dir` storage at
    /// `/var/lib/vz`. Returns whether it was added.
    pub fn ensure_local(&mut self, path: PathBuf) -> bool {
        if self.get("local").is_some() {
            return false;
        }
        self.sections.insert(0, Self::default_local(path));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS_EXAMPLE: &str = "dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

zfspool: local-zfs
\tpool rpool/data
\tsparse
\tcontent images,rootdir
";

    fn parse(text: &str) -> (StorageConfig, Vec<String>) {
        StorageConfig::parse(text, "/etc/pve/storage.cfg")
    }

    #[test]
    fn docs_example() {
        let (cfg, w) = parse(DOCS_EXAMPLE);
        assert!(w.is_empty(), "{w:?}");
        let ids: Vec<&str> = cfg.sections().iter().map(|s| s.id()).collect();
        assert_eq!(ids, ["local", "local-lvm", "local-zfs"]);
        let local = cfg.get("local").unwrap();
        assert_eq!(local.path(), Some(Path::new("/var/lib/vz")));
        assert!(local.has_content(C::Backup));
        assert_eq!(local.content().len(), 3);
        let zfs = cfg.get("local-zfs").unwrap();
        assert!(zfs.flag("sparse"));
        assert_eq!(zfs.get("pool"), Some("rpool/data"));
        assert!(!zfs.is_shared());
        assert_eq!(
            cfg.print(),
            "dir: local
\tpath /var/lib/vz
\tcontent backup,iso,vztmpl

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent images,rootdir

zfspool: local-zfs
\tpool rpool/data
\tcontent images,rootdir
\tsparse 1

"
        );
        let (again, w) = parse(&cfg.print());
        assert!(w.is_empty());
        assert_eq!(again, cfg);
    }

    #[test]
    fn writer_order_disable_and_shared() {
        let text = "rbd: ceph\n\tpool rbd\n\tkrbd 1\n\tdisable\n\tcontent rootdir,images\n\tmonhost 10.0.0.1 10.0.0.2\n\tusername admin\n\n\
                    iscsi: san\n\tportal 10.0.0.5\n\ttarget iqn.2003-01.org.example:t1\n\tcontent none\n\n\
                    dir: backup\n\tpath /mnt/backup\n\tcontent backup\n\tprune-backups keep-last=3,keep-weekly=2\n\tmax-protected-backups 5\n\tdisable 0\n";
        let (cfg, w) = parse(text);
        assert!(w.is_empty(), "{w:?}");
        let ceph = cfg.get("ceph").unwrap();
        assert!(ceph.is_shared() && ceph.is_disabled());
        assert!(cfg.get("san").unwrap().content().contains(&C::None));
        let b = cfg.get("backup").unwrap();
        assert_eq!(
            b.prune_backups().unwrap().unwrap().to_string(),
            "keep-last=3,keep-weekly=2"
        );
        assert!(!b.is_disabled());
        assert_eq!(
            cfg.print(),
            "rbd: ceph\n\tdisable\n\tcontent images,rootdir\n\tkrbd 1\n\tmonhost 10.0.0.1 10.0.0.2\n\tpool rbd\n\tusername admin\n\n\
             iscsi: san\n\tportal 10.0.0.5\n\ttarget iqn.2003-01.org.example:t1\n\tcontent none\n\n\
             dir: backup\n\tpath /mnt/backup\n\tcontent backup\n\tmax-protected-backups 5\n\tprune-backups keep-last=3,keep-weekly=2\n\n"
        );
    }

    #[test]
    fn warnings_and_skips() {
        let text = "# comment\n\
dir: 1bad\n\tpath /x\n\n\
foo: s1\n\tbar baz\n\n\
dir: d1\n\tpath /d1\n\tbogus 1\n\tpath /again\n\tshared yes\n\tcontent images,backup,foo\n\tmax-protected-backups -2\n\n\
lvmthin: t1\n\tvgname pve\n\tcontent backup,images\n\tthinpool data\n\n\
lvmthin: t2\n\tvgname pve\n\n\
dir: d2\n\tpath /d2\n\tcontent none,images\n\n\
lvmthin: t3\n\tvgname pve\n\tthinpool data\n\tcontent iso\n\n\
dir: d3\n\tpath /d3\nnot indented\n\tprune-backups keephourly=24\n\tsparse\n\n\
garbage line\n";
        let (cfg, w) = parse(text);
        let f = "file /etc/pve/storage.cfg";
        let expected = vec![
            format!(
                "{f} line 2 (skip section '1bad'): storage ID '1bad' contains illegal characters"
            ),
            format!("{f} line 5 (skip section 's1'): unsupported type 'foo'"),
            format!(
                "{f} line 10 (section 'd1') - unable to parse value of 'bogus': unexpected property 'bogus'"
            ),
            format!(
                "{f} line 11 (section 'd1') - unable to parse value of 'path': duplicate attribute"
            ),
            format!(
                "{f} line 12 (section 'd1') - unable to parse value of 'shared': type check ('boolean') failed - got 'yes'"
            ),
            format!(
                "{f} line 13 (section 'd1') - unable to parse value of 'content': invalid format - invalid content type 'foo'"
            ),
            format!(
                "{f} line 14 (section 'd1') - unable to parse value of 'max-protected-backups': value must have a minimum value of -1"
            ),
            "storage does not support content type 'backup'".to_string(),
            format!(
                "{f} line 22 (skip section 't2'): missing value for required option 'thinpool'"
            ),
            format!(
                "{f} line 26 (skip section 'd2'): unable to combine 'none' with other content types"
            ),
            "storage does not support content type 'iso'".to_string(),
            format!(
                "{f} line 31 (skip section 't3'): storage does not support content type 'none'"
            ),
            format!("{f} line 35 (section 'd3') - ignore config line: not indented"),
            format!(
                "{f} line 36 (section 'd3') - unable to parse value of 'prune-backups': invalid format - format error\nkeephourly: property is not defined in schema and the schema does not allow additional properties"
            ),
            format!(
                "{f} line 37 (section 'd3') - unable to parse value of 'sparse': unexpected property 'sparse'"
            ),
            format!("{f} line 39 - ignore config line: garbage line"),
        ];
        assert_eq!(w, expected);
        let ids: Vec<&str> = cfg.sections().iter().map(|s| s.id()).collect();
        assert_eq!(ids, ["d1", "t1", "d3"]);
        let d1 = cfg.get("d1").unwrap();
        // unparsable content line dropped -> default content
        assert_eq!(d1.content(), &[C::Images, C::Rootdir].into_iter().collect());
        assert_eq!(d1.get("path"), Some("/d1"));
        assert_eq!(
            cfg.get("t1").unwrap().content(),
            &[C::Images].into_iter().collect()
        );
        // d3 keeps its valid keys, gets the default content
        assert_eq!(cfg.get("d3").unwrap().prune_backups(), None);
    }

    #[test]
    fn sections_need_blank_lines() {
        let (cfg, w) = parse("dir: a1\n\tpath /a\ndir: b1\n\tpath /b\n");
        assert_eq!(cfg.sections().len(), 1);
        assert_eq!(
            w,
            ["file f line 3 (section 'a1') - ignore config line: dir: b1", "file f line 4 (section 'a1') - unable to parse value of 'path': duplicate attribute"]
                .iter()
                .map(|s| s.replace("file f", "file /etc/pve/storage.cfg"))
                .collect::<Vec<_>>()
        );
        // comments inside a section do not end it
        let (cfg, w) = parse("dir: a1\n# c\n\tpath /a\n   # indented comment\n\tcontent backup\n");
        assert!(w.is_empty());
        assert!(cfg.get("a1").unwrap().has_content(C::Backup));
    }

    #[test]
    fn post_processing() {
        let (cfg, w) = parse(
            "nfs: n1\n\tpath /mnt/pve/n1\n\tserver 10.0.0.1\n\texport /srv\n\n\
             dir: local\n\tpath /srv/vz\n\tnodes a,b\n\n\
             DIR: up1\n\tpath /up\n\tnodes n1;bad_node n2\n\tcontent-dirs backup=bk,iso=isos\n\tformat qcow9\n",
        );
        assert!(
            w == [
                "file /etc/pve/storage.cfg line 12 (section 'up1') - unable to parse value of 'nodes': invalid format - value does not look like a valid node name",
                "file /etc/pve/storage.cfg line 14 (section 'up1') - unable to parse value of 'format': value 'qcow9' does not have a value in the enumeration 'raw, qcow2, subvol, vmdk'"
            ],
            "{w:?}"
        );
        let n1 = cfg.get("n1").unwrap();
        assert!(n1.is_shared() && n1.flag("shared"));
        assert_eq!(n1.content(), &[C::Images].into_iter().collect());
        assert!(cfg.get("local").unwrap().nodes().is_empty());
        let up = cfg.get("up1").unwrap();
        assert_eq!(up.storage_type(), "dir");
        assert_eq!(up.subdir("backup").unwrap(), "/up/bk");
        assert_eq!(up.subdir("images").unwrap(), "/up/images");
        // shared is not a nfs option, so it is not written
        assert!(!cfg.print().contains("shared"));
        assert!(cfg.print().contains("\tcontent-dirs backup=bk,iso=isos\n"));
    }

    #[test]
    fn build_and_local() {
        let mut cfg = StorageConfig::default();
        assert!(cfg.ensure_local(PathBuf::from("/var/lib/vz")));
        assert!(!cfg.ensure_local(PathBuf::from("/elsewhere")));
        let mut s = StorageSection::new("dedup", "dd").unwrap();
        assert!(matches!(
            cfg.add_section(s.clone()),
            Err(ConfigError::MissingRequired(k)) if k == "path"
        ));
        s.set("path", "/srv/dedup").unwrap();
        s.set("prune-backups", "keep-daily=7").unwrap();
        assert!(s.set("sparse", "1").is_err());
        assert_eq!(
            s.set("content", "images,backup").unwrap(),
            ["storage does not support content type 'images'"]
        );
        cfg.add_section(s.clone()).unwrap();
        assert!(matches!(
            cfg.add_section(s),
            Err(ConfigError::AlreadyExists(_))
        ));
        assert_eq!(
            cfg.print(),
            "dir: local\n\tpath /var/lib/vz\n\tcontent backup,images,iso,rootdir,snippets,vztmpl\n\tprune-backups keep-all=1\n\n\
             dedup: dd\n\tpath /srv/dedup\n\tcontent backup\n\tprune-backups keep-daily=7\n\n"
        );
        let (again, w) = StorageConfig::parse(&cfg.print(), "x");
        assert!(w.is_empty());
        assert_eq!(again, cfg);
        assert!(cfg.remove("dd").is_some());
        assert!(cfg.remove("dd").is_none());
        assert!(StorageSection::new("weird", "w1").is_err());
        assert!(StorageSection::new("dir", "w").is_err());
    }

    #[test]
    fn fixed_points() {
        // all content unsupported on a type that allows none -> none
        let (cfg, w) = parse("iscsi: s1\n\tportal p\n\ttarget t\n\tcontent backup\n\tdisable 0\n");
        assert_eq!(w, ["storage does not support content type 'backup'"]);
        let s = cfg.get("s1").unwrap();
        assert_eq!(s.content(), &[C::None].into_iter().collect());
        assert_eq!(s.get("disable"), None);
        let (again, w) = parse(&cfg.print());
        assert!(w.is_empty());
        assert_eq!(again, cfg);
    }

    #[test]
    fn managed_iscsi_options() {
        let (cfg, w) = parse(
            "iscsi: m1\n\tportal 127.0.0.1\n\ttarget iqn.t:1\n\tcontent images,rootdir\n\t\
             target-provider tgt\n\tlun-dir /srv/luns\n\ttgt-pidfile /run/tgtd.pid\n\tinitiator userspace\n",
        );
        assert!(w.is_empty(), "{w:?}");
        let m1 = cfg.get("m1").unwrap();
        assert!(m1.has_content(C::Rootdir));
        assert_eq!(m1.get("lun-dir"), Some("/srv/luns"));
        let (again, w) = parse(&cfg.print());
        assert!(w.is_empty());
        assert_eq!(again, cfg);
        for (body, warning) in [
            (
                "\ttarget-provider tgt\n",
                "'target-provider' and 'lun-dir' must be set together",
            ),
            (
                "\tlun-dir /srv/l\n",
                "'target-provider' and 'lun-dir' must be set together",
            ),
            (
                "\tcontent rootdir\n",
                "content 'rootdir' needs a managed target ('target-provider')",
            ),
            (
                "\ttarget-provider lio\n\tlun-dir /l\n",
                "value 'lio' does not have a value in the enumeration 'tgt'",
            ),
            (
                "\tlun-dir relative\n\ttarget-provider tgt\n",
                "invalid format - value does not look like a valid absolute path",
            ),
            (
                "\tinitiator both\n",
                "value 'both' does not have a value in the enumeration 'auto, kernel, userspace'",
            ),
        ] {
            let (cfg, w) = parse(&format!("iscsi: x1\n\tportal p\n\ttarget t\n{body}"));
            assert!(w.iter().any(|l| l.ends_with(warning)), "{w:?} / {warning}");
            // The section is skipped, or kept without the bad value.
            if let Some(x) = cfg.get("x1") {
                assert_eq!(
                    (
                        x.get("target-provider"),
                        x.get("lun-dir"),
                        x.get("initiator")
                    ),
                    (None, None, None),
                    "{body}"
                );
            }
        }
        // iscsidirect has none of them.
        let (cfg, w) = parse("iscsidirect: d1\n\tportal p\n\ttarget t\n\tlun-dir /l\n");
        assert_eq!(cfg.get("d1").unwrap().get("lun-dir"), None);
        assert!(w[0].ends_with("unexpected property 'lun-dir'"), "{w:?}");
    }

    #[test]
    fn split_list_cases() {
        assert_eq!(split_list(" ,,; a, ; b "), ["a", "b"]);
        assert!(split_list("").is_empty());
        assert_eq!(split_list("a b\0c,d\0"), ["a b", "c,d"]);
    }
}
