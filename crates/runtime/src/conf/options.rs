//! The top-level option schema of a container config (`$confdesc` of
//! `PVE::LXC::Config`) and PVE's two levels of value checking.
//!
//! * [`check_type`] is what the config-file parser applies (`check_type`): unknown keys,
//!   booleans (normalised to `1`/`0`), integers (normalised, leading zeros dropped),
//!   numbers, and string formats. Enums and numeric bounds are *not* checked there, so
//!   `ostype: redhat` in an old file parses fine, as in PVE.
//! * [`validate`] is what the API applies to new values (`pct set`/`create`): all of the
//!   above plus enums, minimum/maximum and maximum length.
//!
//! Formats checked: property strings (`rootfs`, `mpN`, `netN`, `devN`, `features`), volume
//! ids (`unusedN`, `hookscript`), DNS names (`hostname`) and config ids (`parent`). Other
//! formatted strings (`startup`, `tags`, `nameserver`, `searchdomain`, `timezone`) are
//! accepted as stored.

use std::sync::LazyLock;

use regex::Regex;

use super::error::ConfError;
use super::mountpoint::{self, is_indexed};
use super::net::{DevConfig, NetConfig};
use super::propstring::{self, PropDesc, PropType};

/// Number of `mpN`, `unusedN` and `devN` keys.
pub const MAX_MOUNT_POINTS: u32 = 256;
/// Number of `unusedN` keys.
pub const MAX_UNUSED_DISKS: u32 = MAX_MOUNT_POINTS;
/// Number of `netN` keys.
pub const MAX_LXC_NETWORKS: u32 = 32;
/// Number of `devN` keys.
pub const MAX_DEVICES: u32 = 256;

/// Values of the `lock` option.
pub const LOCK_VALUES: &[&str] = &[
    "backup",
    "create",
    "destroyed",
    "disk",
    "fstrim",
    "migrate",
    "mounted",
    "rollback",
    "snapshot",
    "snapshot-delete",
];
const ARCH_VALUES: &[&str] = &["amd64", "i386", "arm64", "armhf", "riscv32", "riscv64"];
const OSTYPE_VALUES: &[&str] = &[
    "debian",
    "devuan",
    "ubuntu",
    "centos",
    "fedora",
    "opensuse",
    "archlinux",
    "alpine",
    "gentoo",
    "nixos",
    "unmanaged",
];
const CMODE_VALUES: &[&str] = &["shell", "console", "tty"];

fn verify_rootfs(v: &str) -> Result<(), String> {
    mountpoint::parse_rootfs(v)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
fn verify_mp(v: &str) -> Result<(), String> {
    mountpoint::parse_mp(v)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
fn verify_net(v: &str) -> Result<(), String> {
    NetConfig::parse(v).map(|_| ()).map_err(|e| e.to_string())
}
fn verify_dev(v: &str) -> Result<(), String> {
    DevConfig::parse(v).map(|_| ()).map_err(|e| e.to_string())
}
fn verify_features(v: &str) -> Result<(), String> {
    propstring::parse(&FEATURES_SCHEMA, v)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `pve-configid`.
fn verify_configid(v: &str) -> Result<(), String> {
    static RE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^(?i)[a-z][a-z0-9_-]+$").expect("static regex"));
    if RE.is_match(v) {
        Ok(())
    } else {
        Err(format!("invalid configuration ID '{v}'"))
    }
}

/// `dns-name`.
fn verify_dns_name(v: &str) -> Result<(), String> {
    static RE: LazyLock<Regex> = LazyLock::new(|| {
        let label = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])";
        Regex::new(&format!(r"^(?:{label}\.)*{label}$")).expect("static regex")
    });
    if RE.is_match(v) {
        Ok(())
    } else {
        Err("value does not look like a valid DNS name".to_string())
    }
}

static FEATURES_SCHEMA: LazyLock<Vec<PropDesc>> = LazyLock::new(|| {
    vec![
        PropDesc::new("mount", PropType::Str).pattern("[a-zA-Z0-9_; ]+"),
        PropDesc::new("nesting", PropType::Bool),
        PropDesc::new("keyctl", PropType::Bool),
        PropDesc::new("fuse", PropType::Bool),
        PropDesc::new("mknod", PropType::Bool),
        PropDesc::new("force_rw_sys", PropType::Bool),
    ]
});

const fn int(min: Option<i64>, max: Option<i64>) -> PropType {
    PropType::Int { min, max }
}

/// The schema entry of a top-level key, or `None` for keys PVE does not know.
#[must_use]
pub(crate) fn option_desc(key: &str) -> Option<(PropDesc, Option<usize>)> {
    let s = |k: &'static str| PropDesc::new(k, PropType::Str);
    let b = |k: &'static str| PropDesc::new(k, PropType::Bool);
    let d = match key {
        "lock" => s("lock").enumeration(LOCK_VALUES),
        "onboot" => b("onboot"),
        "startup" => s("startup"),
        "template" => b("template"),
        "arch" => s("arch").enumeration(ARCH_VALUES),
        "ostype" => s("ostype").enumeration(OSTYPE_VALUES),
        "console" => b("console"),
        "tty" => PropDesc::new("tty", int(Some(0), Some(6))),
        "cores" => PropDesc::new("cores", int(Some(1), Some(8192))),
        "cpulimit" => PropDesc::new(
            "cpulimit",
            PropType::Number {
                min: Some(0.0),
                max: Some(8192.0),
            },
        ),
        "cpuunits" => PropDesc::new("cpuunits", int(Some(0), Some(500_000))),
        "memory" => PropDesc::new("memory", int(Some(16), None)),
        "swap" => PropDesc::new("swap", int(Some(0), None)),
        "hostname" => return Some((s("hostname").format(verify_dns_name), Some(255))),
        "description" => return Some((s("description"), Some(8192))),
        "searchdomain" => s("searchdomain"),
        "nameserver" => s("nameserver"),
        "rootfs" => s("rootfs").format(verify_rootfs),
        "parent" => return Some((s("parent").format(verify_configid), Some(40))),
        "snaptime" => PropDesc::new("snaptime", int(Some(0), None)),
        "cmode" => s("cmode").enumeration(CMODE_VALUES),
        "protection" => b("protection"),
        "unprivileged" => b("unprivileged"),
        "features" => s("features").format(verify_features),
        "hookscript" => s("hookscript").format(mountpoint::verify_volume_id),
        "tags" => s("tags"),
        "debug" => b("debug"),
        "timezone" => s("timezone"),
        "entrypoint" => s("entrypoint"),
        "env" => s("env"),
        k if is_indexed(k, "net", MAX_LXC_NETWORKS) => s("netN").format(verify_net),
        k if is_indexed(k, "mp", MAX_MOUNT_POINTS) => s("mpN").format(verify_mp),
        k if is_indexed(k, "unused", MAX_UNUSED_DISKS) => {
            s("unusedN").format(mountpoint::verify_volume_id)
        }
        k if is_indexed(k, "dev", MAX_DEVICES) => s("devN").format(verify_dev),
        _ => return None,
    };
    Some((d, None))
}

/// `true` if `key` is a top-level option of the container schema.
#[must_use]
pub fn is_known_option(key: &str) -> bool {
    option_desc(key).is_some()
}

fn invalid(key: &str, message: String) -> ConfError {
    ConfError::InvalidValue {
        key: key.to_string(),
        message,
    }
}

/// The parser's `check_type`: returns the value as PVE stores it (booleans `1`/`0`,
/// integers without leading zeros).
///
/// # Errors
/// [`ConfError::UnknownSetting`]; [`ConfError::InvalidValue`] with `property contains a
/// line feed`, `type check ('boolean') failed - got 'x'` (likewise integer/number) or the
/// format's message.
pub fn check_type(key: &str, value: &str) -> Result<String, ConfError> {
    let Some((desc, _)) = option_desc(key) else {
        return Err(ConfError::UnknownSetting(key.to_string()));
    };
    if value.contains(['\n', '\r']) {
        return Err(invalid(key, "property contains a line feed".to_string()));
    }
    match desc.ty {
        PropType::Bool => match propstring::parse_boolean(value) {
            // Perl: only the exact '1'/'0' or case-insensitive words; parse_boolean covers
            // both (digits have no case).
            Some(b) => Ok(if b { "1" } else { "0" }.to_string()),
            None => Err(invalid(
                key,
                format!("type check ('boolean') failed - got '{value}'"),
            )),
        },
        PropType::Int { .. } => {
            if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                let trimmed = value.trim_start_matches('0');
                Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_string())
            } else {
                Err(invalid(
                    key,
                    format!("type check ('integer') failed - got '{value}'"),
                ))
            }
        }
        PropType::Number { .. } => {
            static RE: LazyLock<Regex> =
                LazyLock::new(|| Regex::new(r"^\d+(\.\d+)?$").expect("static regex"));
            if RE.is_match(value) {
                Ok(value.to_string())
            } else {
                Err(invalid(
                    key,
                    format!("type check ('number') failed - got '{value}'"),
                ))
            }
        }
        PropType::Str => {
            if let Some(check) = desc.format {
                check(value).map_err(|m| invalid(key, m))?;
            }
            Ok(value.to_string())
        }
    }
}

/// Full validation of a new value as the API does it: [`check_type`] plus enums, bounds
/// and maximum length. Returns the value to store.
///
/// # Errors
/// As [`check_type`]; additionally `value 'x' does not have a value in the enumeration
/// '...'`, `value must have a minimum value of N`, `value must have a maximum value of N`,
/// `value may only be N characters long`.
pub fn validate(key: &str, value: &str) -> Result<String, ConfError> {
    let stored = check_type(key, value)?;
    let Some((desc, max_len)) = option_desc(key) else {
        return Err(ConfError::UnknownSetting(key.to_string()));
    };
    if let Some(max) = max_len
        && value.chars().count() > max
    {
        return Err(invalid(
            key,
            format!("value may only be {max} characters long"),
        ));
    }
    propstring::check_value(&desc, &stored).map_err(|m| invalid(key, m))?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_type_normalises_like_pve() {
        let cases: &[(&str, &str, &str)] = &[
            ("onboot", "yes", "1"),
            ("onboot", "OFF", "0"),
            ("memory", "0512", "512"),
            ("swap", "0", "0"),
            ("cpulimit", "1.5", "1.5"),
            ("ostype", "redhat", "redhat"), // enums are not checked when loading
            ("tty", "9", "9"),              // nor bounds
            ("mp7", "s:v,mp=/a,backup=yes", "s:v,mp=/a,backup=yes"),
        ];
        for (k, v, want) in cases {
            assert_eq!(check_type(k, v).as_deref(), Ok(*want), "{k}: {v}");
        }
    }

    #[test]
    fn check_type_and_validate_errors() {
        let parse_cases: &[(&str, &str, &str)] = &[
            ("foo", "1", "unknown setting 'foo'"),
            ("net32", "name=eth0", "unknown setting 'net32'"),
            ("mp256", "s:v,mp=/a", "unknown setting 'mp256'"),
            (
                "onboot",
                "2",
                "onboot: type check ('boolean') failed - got '2'",
            ),
            (
                "memory",
                "-1",
                "memory: type check ('integer') failed - got '-1'",
            ),
            (
                "cpulimit",
                "1e3",
                "cpulimit: type check ('number') failed - got '1e3'",
            ),
            ("unused0", "bad", "unused0: unable to parse volume ID 'bad'"),
            ("parent", "1abc", "parent: invalid configuration ID '1abc'"),
            (
                "hostname",
                "bad_name",
                "hostname: value does not look like a valid DNS name",
            ),
            (
                "features",
                "nesting=2",
                "features: format error\nnesting: type check ('boolean') failed - got '2'",
            ),
        ];
        for (k, v, want) in parse_cases {
            assert_eq!(
                check_type(k, v).expect_err(k).to_string(),
                *want,
                "{k}: {v}"
            );
        }
        let set_cases: &[(&str, &str, &str)] = &[
            (
                "memory",
                "8",
                "memory: value must have a minimum value of 16",
            ),
            ("tty", "7", "tty: value must have a maximum value of 6"),
            (
                "lock",
                "foo",
                "lock: value 'foo' does not have a value in the enumeration 'backup, create, \
                 destroyed, disk, fstrim, migrate, mounted, rollback, snapshot, snapshot-delete'",
            ),
            (
                "cmode",
                "x",
                "cmode: value 'x' does not have a value in the enumeration 'shell, console, tty'",
            ),
            (
                "parent",
                "a234567890123456789012345678901234567890x",
                "parent: value may only be 40 characters long",
            ),
        ];
        for (k, v, want) in set_cases {
            assert_eq!(validate(k, v).expect_err(k).to_string(), *want, "{k}: {v}");
        }
        assert_eq!(validate("memory", "16").as_deref(), Ok("16"));
        assert_eq!(validate("arch", "arm64").as_deref(), Ok("arm64"));
    }
}
