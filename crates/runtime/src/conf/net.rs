//! Network interface (`netN`) and device passthrough (`devN`) property strings, and the
//! MAC address generator used for new or `--unique` interfaces.
//!
//! ```text
//! net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:2A:3B:4C,ip=dhcp,ip6=auto,type=veth
//! dev0: /dev/ttyUSB0,mode=0660,uid=0,gid=20
//! ```
//!
//! Compatibility target: pve-container `$netconf_desc`, `$dev_desc`
//! (`PVE::LXC::Config::parse_lxc_network`/`print_lxc_network`, `parse_device`) and
//! `PVE::Tools::random_ether_addr`. `name` is the required key of `netN` and prints first;
//! `devN` prints its `path` bare. IP address formats are checked for shape (CIDR, `dhcp`,
//! `manual`, `auto`), not resolved.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;

use super::error::ConfError;
use super::propstring::{self, PropDesc, PropType};

/// PVE's default `mac_prefix` (datacenter.cfg) for generated addresses.
pub const DEFAULT_MAC_PREFIX: &str = "BC:24:11";

fn verify_ipv4(v: &str) -> Result<(), String> {
    v.parse::<Ipv4Addr>()
        .map(|_| ())
        .map_err(|_| "value does not look like a valid IPv4 address".to_string())
}

fn verify_ipv6(v: &str) -> Result<(), String> {
    v.parse::<Ipv6Addr>()
        .map(|_| ())
        .map_err(|_| "value does not look like a valid IPv6 address".to_string())
}

fn cidr_ok<T: std::str::FromStr>(v: &str, max_prefix: u8) -> bool {
    let Some((addr, prefix)) = v.split_once('/') else {
        return false;
    };
    addr.parse::<T>().is_ok()
        && !prefix.is_empty()
        && prefix.bytes().all(|b| b.is_ascii_digit())
        && prefix.parse::<u8>().is_ok_and(|p| p <= max_prefix)
}

fn verify_ipv4_config(v: &str) -> Result<(), String> {
    if v == "dhcp" || v == "manual" || cidr_ok::<Ipv4Addr>(v, 32) {
        Ok(())
    } else {
        Err("value does not look like a valid ipv4 network configuration".to_string())
    }
}

fn verify_ipv6_config(v: &str) -> Result<(), String> {
    if v == "auto" || v == "dhcp" || v == "manual" || cidr_ok::<Ipv6Addr>(v, 128) {
        Ok(())
    } else {
        Err("value does not look like a valid ipv6 network configuration".to_string())
    }
}

static NET_SCHEMA: LazyLock<Vec<PropDesc>> = LazyLock::new(|| {
    vec![
        PropDesc::new("type", PropType::Str).enumeration(&["veth"]),
        PropDesc::new("name", PropType::Str)
            .required()
            .pattern(r"[-_.\w\d]+"),
        PropDesc::new("bridge", PropType::Str).pattern(r"[-_.\w\d]+"),
        PropDesc::new("hwaddr", PropType::Str).pattern(r"(?i:[a-f0-9]{2}:){5}(?i:[a-f0-9]{2})"),
        PropDesc::new(
            "mtu",
            PropType::Int {
                min: Some(64),
                max: Some(65535),
            },
        ),
        PropDesc::new("ip", PropType::Str).format(verify_ipv4_config),
        PropDesc::new("gw", PropType::Str).format(verify_ipv4),
        PropDesc::new("ip6", PropType::Str).format(verify_ipv6_config),
        PropDesc::new("gw6", PropType::Str).format(verify_ipv6),
        PropDesc::new("firewall", PropType::Bool),
        PropDesc::new("link_down", PropType::Bool),
        PropDesc::new(
            "tag",
            PropType::Int {
                min: Some(1),
                max: Some(4094),
            },
        ),
        PropDesc::new("trunks", PropType::Str).pattern(r"\d+(?:;\d+)*"),
        PropDesc::new(
            "rate",
            PropType::Number {
                min: Some(0.0),
                max: None,
            },
        ),
    ]
});

/// A parsed `netN` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NetConfig {
    /// Interface name inside the container (required).
    pub name: String,
    /// Host bridge.
    pub bridge: Option<String>,
    /// MAC address `XX:XX:XX:XX:XX:XX`.
    pub hwaddr: Option<String>,
    /// `IPv4/CIDR`, `dhcp` or `manual`.
    pub ip: Option<String>,
    /// `IPv6/CIDR`, `auto`, `dhcp` or `manual`.
    pub ip6: Option<String>,
    /// IPv4 gateway.
    pub gw: Option<String>,
    /// IPv6 gateway.
    pub gw6: Option<String>,
    /// MTU (64..=65535).
    pub mtu: Option<u32>,
    /// Rate limit in MB/s, kept as written (a decimal number).
    pub rate: Option<String>,
    /// Use the interface's firewall rules.
    pub firewall: Option<bool>,
    /// Keep the link down.
    pub link_down: Option<bool>,
    /// VLAN tag (1..=4094).
    pub tag: Option<u16>,
    /// VLAN trunks, `id[;id...]`.
    pub trunks: Option<String>,
    /// Interface type; only `veth` exists.
    pub net_type: Option<String>,
}

fn put(m: &mut BTreeMap<String, String>, k: &str, v: Option<String>) {
    if let Some(v) = v {
        m.insert(k.to_string(), v);
    }
}

fn bool_text(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

impl NetConfig {
    /// Parses a `netN` value.
    ///
    /// # Errors
    /// Property-string errors and `format error` for schema violations (missing `name`,
    /// bad MAC, out-of-range `tag`/`mtu`, unknown keys, ...).
    pub fn parse(text: &str) -> Result<Self, ConfError> {
        let m = propstring::parse(&NET_SCHEMA, text)?;
        let get = |k: &str| m.get(k).cloned();
        let num = |k: &str| -> Result<Option<u64>, ConfError> {
            m.get(k)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| ConfError::InvalidValue {
                        key: k.to_string(),
                        message: format!("type check ('integer') failed - got '{v}'"),
                    })
                })
                .transpose()
        };
        let mtu = num("mtu")?.and_then(|v| u32::try_from(v).ok());
        let tag = num("tag")?.and_then(|v| u16::try_from(v).ok());
        Ok(Self {
            name: get("name").unwrap_or_default(),
            bridge: get("bridge"),
            hwaddr: get("hwaddr"),
            ip: get("ip"),
            ip6: get("ip6"),
            gw: get("gw"),
            gw6: get("gw6"),
            mtu,
            rate: get("rate"),
            firewall: m.get("firewall").map(|v| v == "1"),
            link_down: m.get("link_down").map(|v| v == "1"),
            tag,
            trunks: get("trunks"),
            net_type: get("type"),
        })
    }

    fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("name".to_string(), self.name.clone());
        put(&mut m, "bridge", self.bridge.clone());
        put(&mut m, "hwaddr", self.hwaddr.clone());
        put(&mut m, "ip", self.ip.clone());
        put(&mut m, "ip6", self.ip6.clone());
        put(&mut m, "gw", self.gw.clone());
        put(&mut m, "gw6", self.gw6.clone());
        put(&mut m, "mtu", self.mtu.map(|v| v.to_string()));
        put(&mut m, "rate", self.rate.clone());
        put(&mut m, "firewall", self.firewall.map(bool_text));
        put(&mut m, "link_down", self.link_down.map(bool_text));
        put(&mut m, "tag", self.tag.map(|v| v.to_string()));
        put(&mut m, "trunks", self.trunks.clone());
        put(&mut m, "type", self.net_type.clone());
        m
    }

    /// Prints the value as `print_lxc_network`: `name=` first, then the other keys sorted.
    ///
    /// # Errors
    /// `format error` when a field would not parse back; [`ConfError::CommaInValue`].
    pub fn print(&self) -> Result<String, ConfError> {
        let m = self.to_map();
        propstring::check_object(&NET_SCHEMA, &m)?;
        propstring::print(&NET_SCHEMA, &m)
    }
}

fn verify_dev_path(path: &str) -> Result<(), String> {
    let bad = !path.starts_with("/dev/")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..");
    if bad {
        Err(format!("{path} is not a valid device path"))
    } else {
        Ok(())
    }
}

static DEV_SCHEMA: LazyLock<Vec<PropDesc>> = LazyLock::new(|| {
    vec![
        PropDesc::new("path", PropType::Str)
            .default_key()
            .format(verify_dev_path),
        PropDesc::new("mode", PropType::Str).pattern("0[0-7]{3}"),
        PropDesc::new(
            "uid",
            PropType::Int {
                min: Some(0),
                max: Some(i64::from(u32::MAX)),
            },
        ),
        PropDesc::new(
            "gid",
            PropType::Int {
                min: Some(0),
                max: Some(i64::from(u32::MAX)),
            },
        ),
        PropDesc::new("deny-write", PropType::Bool),
    ]
});

/// A parsed `devN` value (device passthrough).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct DevConfig {
    /// Device path, must start with `/dev/`.
    pub path: Option<String>,
    /// Octal access mode `0NNN`.
    pub mode: Option<String>,
    /// Owner uid of the device node.
    pub uid: Option<u32>,
    /// Owner gid of the device node.
    pub gid: Option<u32>,
    /// Deny writes from the container.
    pub deny_write: Option<bool>,
}

impl DevConfig {
    /// Parses a `devN` value.
    ///
    /// # Errors
    /// Property-string errors and `format error` (`<path> is not a valid device path`, bad
    /// mode, ...).
    pub fn parse(text: &str) -> Result<Self, ConfError> {
        let m = propstring::parse(&DEV_SCHEMA, text)?;
        let id = |k: &str| m.get(k).and_then(|v| v.parse::<u32>().ok());
        Ok(Self {
            path: m.get("path").cloned(),
            mode: m.get("mode").cloned(),
            uid: id("uid"),
            gid: id("gid"),
            deny_write: m.get("deny-write").map(|v| v == "1"),
        })
    }

    /// Prints the value: path bare, then the other keys sorted.
    ///
    /// # Errors
    /// `format error` when a field would not parse back; [`ConfError::CommaInValue`].
    pub fn print(&self) -> Result<String, ConfError> {
        let mut m = BTreeMap::new();
        put(&mut m, "path", self.path.clone());
        put(&mut m, "mode", self.mode.clone());
        put(&mut m, "uid", self.uid.map(|v| v.to_string()));
        put(&mut m, "gid", self.gid.map(|v| v.to_string()));
        put(&mut m, "deny-write", self.deny_write.map(bool_text));
        propstring::check_object(&DEV_SCHEMA, &m)?;
        propstring::print(&DEV_SCHEMA, &m)
    }
}

/// `PVE::Tools::random_ether_addr($prefix)` with the randomness supplied by the caller:
/// the first octet of `random` gets the multicast bit cleared and the locally-administered
/// bit set, then the (upper-cased) `prefix` replaces the leading characters. With
/// [`DEFAULT_MAC_PREFIX`] the result is `BC:24:11:xx:xx:xx`.
///
/// # Errors
/// [`ConfError::Invalid`] for a prefix that is not PVE's `mac-prefix` format
/// (`^[a-f0-9][02468ace](?::[a-f0-9]{2}){0,2}:?$`, i.e. a unicast prefix of 1..=3 octets).
pub fn random_ether_addr(prefix: Option<&str>, random: [u8; 6]) -> Result<String, ConfError> {
    static PREFIX_RE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^(?i)[a-f0-9][02468ace](?::[a-f0-9]{2}){0,2}:?$").expect("static regex")
    });
    let mut bytes = random;
    bytes[0] = (bytes[0] & 0xfe) | 2;
    let addr = bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    match prefix {
        None => Ok(addr),
        Some(p) if PREFIX_RE.is_match(p) => {
            Ok(format!("{}{}", p.to_ascii_uppercase(), &addr[p.len()..]))
        }
        Some(p) => Err(ConfError::Invalid(format!("invalid mac prefix '{p}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_round_trip_and_order() {
        let text = "name=eth0,bridge=vmbr0,hwaddr=12:34:56:78:90:12,ip=dhcp,ip6=dhcp,type=veth";
        let net = NetConfig::parse(text).expect("parse");
        assert_eq!(net.name, "eth0");
        assert_eq!(net.print().expect("print"), text);
        // Key order in the input does not matter; name prints first, the rest sorted.
        let net = NetConfig::parse(
            "bridge=vmbr0,firewall=yes,gw=10.0.0.1,ip=10.0.0.2/24,ip6=auto,mtu=1500,rate=12.5,\
             tag=5,trunks=1;2,link_down=0,name=eth1,gw6=fe80::1",
        )
        .expect("parse");
        assert_eq!(
            net.print().expect("print"),
            "name=eth1,bridge=vmbr0,firewall=1,gw=10.0.0.1,gw6=fe80::1,ip=10.0.0.2/24,ip6=auto,\
             link_down=0,mtu=1500,rate=12.5,tag=5,trunks=1;2"
        );
    }

    #[test]
    fn net_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "bridge=vmbr0",
                "format error\nname: property is missing and it is not optional",
            ),
            (
                "name=eth0,tag=4095",
                "format error\ntag: value must have a maximum value of 4094",
            ),
            (
                "name=eth0,mtu=10",
                "format error\nmtu: value must have a minimum value of 64",
            ),
            (
                "name=eth0,hwaddr=zz:00:00:00:00:00",
                "format error\nhwaddr: value does not match the regex pattern",
            ),
            (
                "name=eth0,ip=10.0.0.1",
                "format error\nip: value does not look like a valid ipv4 network configuration",
            ),
            (
                "name=eth0,type=macvlan",
                "format error\ntype: value 'macvlan' does not have a value in the enumeration 'veth'",
            ),
            (
                "eth0",
                "value without key, but schema does not define a default key",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                NetConfig::parse(text).expect_err(text).to_string(),
                *want,
                "{text}"
            );
        }
    }

    #[test]
    fn dev_round_trip_and_errors() {
        let text = "/dev/ttyUSB0,deny-write=1,gid=20,mode=0660,uid=0";
        assert_eq!(
            DevConfig::parse(text)
                .expect("parse")
                .print()
                .expect("print"),
            text
        );
        assert_eq!(
            DevConfig::parse("/tmp/x")
                .expect_err("bad path")
                .to_string(),
            "format error\npath: /tmp/x is not a valid device path"
        );
        assert_eq!(
            DevConfig::parse("/dev/x,mode=777")
                .expect_err("bad mode")
                .to_string(),
            "format error\nmode: value does not match the regex pattern"
        );
    }

    #[test]
    fn mac_generation() {
        let r = [0xff, 0x11, 0x22, 0x33, 0x44, 0x55];
        // Multicast bit cleared, locally administered bit set: 0xff -> 0xfe.
        assert_eq!(
            random_ether_addr(None, r).expect("mac"),
            "FE:11:22:33:44:55"
        );
        assert_eq!(
            random_ether_addr(Some(DEFAULT_MAC_PREFIX), r).expect("mac"),
            "BC:24:11:33:44:55"
        );
        assert_eq!(
            random_ether_addr(Some("0a:bc"), r).expect("mac"),
            "0A:BC:22:33:44:55"
        );
        assert!(
            random_ether_addr(Some("01:00"), r).is_err(),
            "multicast prefix"
        );
        let mac = random_ether_addr(None, [0x01; 6]).expect("mac");
        assert!(NetConfig::parse(&format!("name=eth0,hwaddr={mac}")).is_ok());
    }
}
