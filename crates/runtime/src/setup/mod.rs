//! Guest operating system setup at container start (PVE's `PVE::LXC::Setup`).
//!
//! The distribution is detected from files inside the mounted root (`/etc/lsb-release`
//! with `DISTRIB_ID=Ubuntu`, `/etc/debian_version`, `/etc/fedora-release`,
//! `/etc/redhat-release`, `/etc/arch-release`, `/etc/alpine-release`,
//! `/etc/gentoo-release`); a configured `ostype` that differs fails the start ("got
//! unexpected ostype (<detected> != <configured>)"), and `ostype: unmanaged` skips all of
//! this. Before each start vzkit writes `/etc/hostname`, the PVE section of `/etc/hosts`,
//! the network configuration in the distribution's format and the PVE section of
//! `/etc/resolv.conf`. All file access goes through [`files::GuestRoot`], which cannot leave
//! the container's root, and skips files that have a `.pve-ignore.<name>` beside them.
//!
//! Network formats: Debian and Alpine `/etc/network/interfaces` (the interface stanzas in a
//! PVE section, where PVE rewrites the whole file), CentOS/RedHat
//! `/etc/sysconfig/network-scripts/ifcfg-<name>`, Ubuntu, Fedora and Arch
//! systemd-networkd `/etc/systemd/network/<name>.network`, Gentoo `/etc/conf.d/net`.

pub mod create;
pub mod files;

use std::fmt;
use std::str::FromStr;

use crate::conf::{CtConfig, NetConfig};
use crate::error::{Result, RuntimeError};
use files::{GuestRoot, Placement};

/// A guest distribution vzkit knows how to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsType {
    /// `debian`
    Debian,
    /// `ubuntu`
    Ubuntu,
    /// `fedora`
    Fedora,
    /// `centos` (also RedHat)
    Centos,
    /// `archlinux`
    Archlinux,
    /// `alpine`
    Alpine,
    /// `gentoo`
    Gentoo,
    /// `unmanaged`: vzkit changes nothing inside.
    Unmanaged,
}

impl OsType {
    /// The `ostype` config value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            OsType::Debian => "debian",
            OsType::Ubuntu => "ubuntu",
            OsType::Fedora => "fedora",
            OsType::Centos => "centos",
            OsType::Archlinux => "archlinux",
            OsType::Alpine => "alpine",
            OsType::Gentoo => "gentoo",
            OsType::Unmanaged => "unmanaged",
        }
    }
}

impl fmt::Display for OsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OsType {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "debian" => OsType::Debian,
            "ubuntu" => OsType::Ubuntu,
            "fedora" => OsType::Fedora,
            "centos" => OsType::Centos,
            "archlinux" => OsType::Archlinux,
            "alpine" => OsType::Alpine,
            "gentoo" => OsType::Gentoo,
            "unmanaged" => OsType::Unmanaged,
            other => {
                return Err(RuntimeError::Invalid(format!(
                    "unsupported ostype '{other}' - vzkit cannot set up this guest"
                )));
            }
        })
    }
}

/// Detects the distribution inside `root` (PVE's `detect_ostype` order).
///
/// # Errors
/// "unable to detect OS distribution" when no known file exists.
pub fn detect_ostype(root: &GuestRoot) -> Result<OsType> {
    if let Some(lsb) = root.read("/etc/lsb-release")?
        && lsb
            .lines()
            .any(|l| l.trim_end().eq_ignore_ascii_case("DISTRIB_ID=Ubuntu"))
    {
        return Ok(OsType::Ubuntu);
    }
    let table = [
        ("/etc/debian_version", OsType::Debian),
        ("/etc/fedora-release", OsType::Fedora),
        ("/etc/redhat-release", OsType::Centos),
        ("/etc/arch-release", OsType::Archlinux),
        ("/etc/alpine-release", OsType::Alpine),
        ("/etc/gentoo-release", OsType::Gentoo),
    ];
    for (file, os) in table {
        if root.is_file(file) {
            return Ok(os);
        }
    }
    Err(RuntimeError::Invalid(
        "unable to detect OS distribution".into(),
    ))
}

/// The DNS settings written into the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    /// Search domains.
    pub searchdomains: Vec<String>,
    /// Name servers.
    pub nameservers: Vec<String>,
}

impl Dns {
    /// PVE's `lookup_dns_conf`: the config's `searchdomain`/`nameserver`, each falling back
    /// to the host's `resolv.conf` text (`search`, up to three `nameserver` lines).
    #[must_use]
    pub fn lookup(conf: &CtConfig, host_resolv_conf: Option<&str>) -> Self {
        let split = |s: &str| -> Vec<String> {
            s.split(|c: char| c == ',' || c == ';' || c.is_whitespace() || c == '\0')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        };
        let host = host_resolv_conf.unwrap_or("");
        let nameservers = match conf.get("nameserver") {
            Some(ns) => split(ns),
            None => host
                .lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .take(3)
                .collect(),
        };
        let searchdomains = match conf.get("searchdomain") {
            Some(sd) => split(sd),
            None => host
                .lines()
                .filter_map(|l| l.trim().strip_prefix("search"))
                .flat_map(split)
                .collect(),
        };
        Self {
            searchdomains,
            nameservers,
        }
    }
}

/// Sets up the guest in `root` for container `vmid` before it starts (PVE's
/// `pre_start_hook`). Returns the detected OS type.
///
/// # Errors
/// Detection failures, an `ostype` mismatch, unparsable `netN` values, I/O errors.
pub fn pre_start(root: &GuestRoot, conf: &CtConfig, dns: &Dns) -> Result<OsType> {
    let configured = conf.main.ostype();
    if configured == Some("unmanaged") {
        return Ok(OsType::Unmanaged);
    }
    let detected = detect_ostype(root)?;
    if let Some(want) = configured
        && want != detected.as_str()
    {
        // Ubuntu is a Debian for the `debian` files; PVE compares the exact names too.
        return Err(RuntimeError::Invalid(format!(
            "got unexpected ostype ({detected} != {want})"
        )));
    }
    let mut nets = conf.main.nets()?;
    if detected == OsType::Alpine {
        // As PVE: busybox's udhcpc6 is unreliable, so DHCPv6 becomes `manual` on Alpine.
        for (_, n) in &mut nets {
            if n.ip6.as_deref() == Some("dhcp") {
                n.ip6 = Some("manual".into());
            }
        }
    }
    setup_init(root, detected, conf)?;
    setup_network(root, detected, &nets)?;
    set_hostname(root, detected, conf, &nets, dns)?;
    set_dns(root, dns)?;
    Ok(detected)
}

/// The getty lines of `/etc/inittab` for `tty` consoles (PVE's `setup_init` for Debian
/// and Alpine; systemd guests keep their own getty units).
fn setup_init(root: &GuestRoot, os: OsType, conf: &CtConfig) -> Result<()> {
    if !matches!(os, OsType::Debian | OsType::Alpine) || !root.is_file("/etc/inittab") {
        return Ok(());
    }
    let Some(text) = root.read("/etc/inittab")? else {
        return Ok(());
    };
    let ttycount: u32 = conf
        .get("tty")
        .map_or(Ok(2), str::parse)
        .map_err(|_| RuntimeError::Invalid("tty: type check ('integer') failed".into()))?;
    let new = inittab_text(&text, os, ttycount);
    if new != text {
        root.write("/etc/inittab", &new, None)?;
    }
    Ok(())
}

/// `/etc/inittab` with PVE's getty lines for `ttycount` consoles.
#[must_use]
pub fn inittab_text(text: &str, os: OsType, ttycount: u32) -> String {
    let is_getty = |l: &str| -> bool {
        let t = l.trim_start();
        match os {
            // `^\s*tty\d+::[^:]*:.*getty`
            OsType::Alpine => t.strip_prefix("tty").is_some_and(|r| {
                let digits = r.len() - r.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                digits > 0
                    && r[digits..].starts_with("::")
                    && r[digits + 2..]
                        .split_once(':')
                        .is_some_and(|(_, rest)| rest.contains("getty"))
            }),
            // `^\s*\d+:\d*:[^:]*:.*getty` and power lines `^\s*p[fno0]:`
            _ => {
                let f: Vec<&str> = t.splitn(4, ':').collect();
                let getty = f.len() == 4
                    && !f[0].is_empty()
                    && f[0].bytes().all(|b| b.is_ascii_digit())
                    && f[1].bytes().all(|b| b.is_ascii_digit())
                    && f[3].contains("getty");
                let power = t.len() >= 3
                    && t.starts_with('p')
                    && b"fno0".contains(&t.as_bytes()[1])
                    && t.as_bytes()[2] == b':';
                getty || power
            }
        }
    };
    let mut lines: Vec<&str> = text.split('\n').collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut out: String = lines
        .into_iter()
        .filter(|l| !is_getty(l))
        .map(|l| format!("{l}\n"))
        .collect();
    if out.is_empty() {
        out.push('\n');
    }
    if os != OsType::Alpine {
        out.push_str("p0::powerfail:/sbin/init 0\n");
    }
    for id in (1..=ttycount).filter(|id| *id != 7) {
        match os {
            OsType::Alpine => {
                out.push_str(&format!("tty{id}::respawn:/sbin/getty 38400 tty{id}\n"))
            }
            _ => {
                let levels = if id == 1 { "2345" } else { "23" };
                out.push_str(&format!(
                    "{id}:{levels}:respawn:/sbin/getty --noclear 38400 tty{id}\n"
                ));
            }
        }
    }
    out
}

fn primary_ip(nets: &[(String, NetConfig)]) -> Option<String> {
    let net0 = nets.iter().find(|(k, _)| k == "net0").map(|(_, n)| n)?;
    let strip = |ip: &str| ip.split('/').next().unwrap_or(ip).to_string();
    net0.ip
        .as_deref()
        .filter(|ip| !matches!(*ip, "dhcp" | "manual"))
        .map(strip)
        .or_else(|| {
            net0.ip6
                .as_deref()
                .filter(|ip| !matches!(*ip, "auto" | "dhcp" | "manual"))
                .map(strip)
        })
}

/// PVE's `set_hostname` + `update_etc_hosts`.
fn set_hostname(
    root: &GuestRoot,
    os: OsType,
    conf: &CtConfig,
    nets: &[(String, NetConfig)],
    dns: &Dns,
) -> Result<()> {
    let hostname = conf.main.hostname().unwrap_or("localhost");
    let namepart = hostname.split('.').next().unwrap_or(hostname);
    let all_names = if hostname.contains('.') {
        format!("{hostname} {namepart}")
    } else {
        let mut v: Vec<String> = dns
            .searchdomains
            .iter()
            .map(|d| format!("{hostname}.{d}"))
            .collect();
        v.push(hostname.to_string());
        v.join(" ")
    };
    let lo4 = "127.0.0.1 localhost.localnet localhost\n";
    let lo6 = "::1 localhost.localnet localhost\n";
    let mut section = String::new();
    match root.read("/etc/hosts")? {
        Some(data) => {
            let data = remove_pve_sections(&data);
            let has = |p: &str| {
                data.lines().any(|l| {
                    l.trim_start()
                        .strip_prefix(p)
                        .is_some_and(|r| r.starts_with([' ', '\t']))
                })
            };
            if !has("127.0.0.1") {
                section.push_str(lo4);
            }
            if !has("::1") {
                section.push_str(lo6);
            }
        }
        None => {
            section.push_str(lo4);
            section.push_str(lo6);
        }
    }
    match primary_ip(nets) {
        Some(ip) => section.push_str(&format!("{ip} {all_names}\n")),
        None => section.push_str(&format!("127.0.1.1 {namepart}\n")),
    }
    root.modify_file("/etc/hosts", &section, Placement::Append)?;
    if os == OsType::Gentoo {
        root.make_path("/etc/conf.d")?;
        root.write(
            "/etc/conf.d/hostname",
            &format!("hostname=\"{namepart}\"\n"),
            None,
        )?;
    }
    root.write("/etc/hostname", &format!("{namepart}\n"), None)
}

/// Removes PVE sections from a text (PVE's `remove_pve_sections`).
#[must_use]
pub fn remove_pve_sections(data: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in data.split_inclusive('\n') {
        let t = line.trim_start();
        if !inside && t.starts_with(files::SECTION_HEAD) {
            inside = true;
            continue;
        }
        if inside {
            if t.starts_with(files::SECTION_TAIL) {
                inside = false;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

/// PVE's `set_dns`: the PVE section of `/etc/resolv.conf`, replacing other content when
/// there is no section yet.
fn set_dns(root: &GuestRoot, dns: &Dns) -> Result<()> {
    let mut data = String::new();
    if !dns.searchdomains.is_empty() {
        data.push_str(&format!("search {}\n", dns.searchdomains.join(" ")));
    }
    for ns in &dns.nameservers {
        data.push_str(&format!("nameserver {ns}\n"));
    }
    root.modify_file("/etc/resolv.conf", &data, Placement::Replace)
}

fn setup_network(root: &GuestRoot, os: OsType, nets: &[(String, NetConfig)]) -> Result<()> {
    match os {
        OsType::Debian | OsType::Alpine => {
            root.make_path("/etc/network")?;
            root.modify_file(
                "/etc/network/interfaces",
                &debian_interfaces(nets),
                Placement::Append,
            )
        }
        OsType::Centos => {
            root.make_path("/etc/sysconfig/network-scripts")?;
            for (_, net) in nets {
                root.write(
                    &format!("/etc/sysconfig/network-scripts/ifcfg-{}", net.name),
                    &redhat_ifcfg(net),
                    None,
                )?;
            }
            Ok(())
        }
        OsType::Ubuntu | OsType::Fedora | OsType::Archlinux => {
            root.make_path("/etc/systemd/network")?;
            for (_, net) in nets {
                root.write(
                    &format!("/etc/systemd/network/{}.network", net.name),
                    &systemd_networkd(net),
                    None,
                )?;
            }
            Ok(())
        }
        OsType::Gentoo => {
            root.make_path("/etc/conf.d")?;
            root.modify_file("/etc/conf.d/net", &gentoo_net(nets), Placement::Append)
        }
        OsType::Unmanaged => Ok(()),
    }
}

/// The interface stanzas of `/etc/network/interfaces` (Debian, Alpine).
#[must_use]
pub fn debian_interfaces(nets: &[(String, NetConfig)]) -> String {
    let mut s = String::from("auto lo\niface lo inet loopback\n");
    for (_, n) in nets {
        s.push_str(&format!("\nauto {}\n", n.name));
        match n.ip.as_deref() {
            Some("dhcp") => s.push_str(&format!("iface {} inet dhcp\n", n.name)),
            Some("manual") | None if n.ip6.is_some() => {}
            Some("manual") | None => s.push_str(&format!("iface {} inet manual\n", n.name)),
            Some(ip) => {
                s.push_str(&format!("iface {} inet static\n\taddress {ip}\n", n.name));
                if let Some(gw) = &n.gw {
                    s.push_str(&format!("\tgateway {gw}\n"));
                }
                if let Some(mtu) = n.mtu {
                    s.push_str(&format!("\tmtu {mtu}\n"));
                }
            }
        }
        match n.ip6.as_deref() {
            None => {}
            Some("dhcp") => s.push_str(&format!("iface {} inet6 dhcp\n", n.name)),
            Some("auto") => s.push_str(&format!("iface {} inet6 auto\n", n.name)),
            Some("manual") => s.push_str(&format!("iface {} inet6 manual\n", n.name)),
            Some(ip) => {
                s.push_str(&format!("iface {} inet6 static\n\taddress {ip}\n", n.name));
                if let Some(gw) = &n.gw6 {
                    s.push_str(&format!("\tgateway {gw}\n"));
                }
            }
        }
    }
    s
}

/// A CentOS/RedHat `ifcfg-<name>` file.
#[must_use]
pub fn redhat_ifcfg(n: &NetConfig) -> String {
    let mut s = format!("DEVICE={}\nONBOOT=yes\n", n.name);
    match n.ip.as_deref() {
        Some("dhcp") => s.push_str("BOOTPROTO=dhcp\n"),
        Some(ip) if ip != "manual" => {
            s.push_str("BOOTPROTO=none\n");
            let (addr, prefix) = ip.split_once('/').unwrap_or((ip, "32"));
            s.push_str(&format!("IPADDR={addr}\nPREFIX={prefix}\n"));
            if let Some(gw) = &n.gw {
                s.push_str(&format!("GATEWAY={gw}\n"));
            }
        }
        _ => s.push_str("BOOTPROTO=none\n"),
    }
    match n.ip6.as_deref() {
        None | Some("manual") => {}
        Some("dhcp") => s.push_str("IPV6INIT=yes\nDHCPV6C=yes\n"),
        Some("auto") => s.push_str("IPV6INIT=yes\nIPV6_AUTOCONF=yes\n"),
        Some(ip) => {
            s.push_str(&format!("IPV6INIT=yes\nIPV6ADDR={ip}\n"));
            if let Some(gw) = &n.gw6 {
                s.push_str(&format!("IPV6_DEFAULTGW={gw}\n"));
            }
        }
    }
    if let Some(mtu) = n.mtu {
        s.push_str(&format!("MTU={mtu}\n"));
    }
    s
}

/// A systemd-networkd `<name>.network` file (PVE's `setup_systemd_networkd`).
#[must_use]
pub fn systemd_networkd(n: &NetConfig) -> String {
    let mut s = format!(
        "[Match]\nName = {0}\n\n[Network]\nDescription = Interface {0} autoconfigured by PVE\n",
        n.name
    );
    let mut dhcp4 = false;
    let mut dhcp6 = false;
    match n.ip.as_deref() {
        Some("dhcp") => dhcp4 = true,
        Some("manual") | None => {}
        Some(ip) => s.push_str(&format!("Address = {ip}\n")),
    }
    if let Some(gw) = &n.gw {
        s.push_str(&format!("Gateway = {gw}\n"));
    }
    match n.ip6.as_deref() {
        Some("dhcp") => dhcp6 = true,
        Some("manual" | "auto") | None => {}
        Some(ip) => s.push_str(&format!("Address = {ip}\n")),
    }
    if let Some(gw) = &n.gw6 {
        s.push_str(&format!("Gateway = {gw}\n"));
    }
    let mode = match (dhcp4, dhcp6) {
        (false, false) => "none",
        (true, false) => "v4",
        (false, true) => "v6",
        (true, true) => "both",
    };
    s.push_str(&format!("DHCP = {mode}\n"));
    s
}

/// Gentoo's `/etc/conf.d/net` section.
#[must_use]
pub fn gentoo_net(nets: &[(String, NetConfig)]) -> String {
    let mut s = String::new();
    for (_, n) in nets {
        let mut cfg = Vec::new();
        match n.ip.as_deref() {
            Some("dhcp") => cfg.push("dhcp".to_string()),
            Some("manual") | None => {}
            Some(ip) => cfg.push(ip.to_string()),
        }
        if let Some(ip6) = n
            .ip6
            .as_deref()
            .filter(|i| !matches!(*i, "manual" | "auto"))
        {
            cfg.push(if ip6 == "dhcp" {
                "dhcpv6".into()
            } else {
                ip6.to_string()
            });
        }
        if cfg.is_empty() {
            cfg.push("null".into());
        }
        s.push_str(&format!("config_{}=\"{}\"\n", n.name, cfg.join(" ")));
        let routes: Vec<String> = [&n.gw, &n.gw6]
            .into_iter()
            .flatten()
            .map(|gw| format!("default via {gw}"))
            .collect();
        if !routes.is_empty() {
            s.push_str(&format!("routes_{}=\"{}\"\n", n.name, routes.join("\n")));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::RootOwner;
    use std::path::Path;

    fn conf(text: &str) -> CtConfig {
        CtConfig::parse(100, text).unwrap().0
    }

    fn guest(files: &[(&str, &str)]) -> (tempfile::TempDir, GuestRoot) {
        let dir = tempfile::tempdir().unwrap();
        for (p, t) in files {
            let path = dir.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, t).unwrap();
        }
        let g = GuestRoot::open(dir.path(), RootOwner::default()).unwrap();
        (dir, g)
    }

    fn read(dir: &Path, p: &str) -> String {
        std::fs::read_to_string(dir.join(p.trim_start_matches('/'))).unwrap()
    }

    #[test]
    fn detection_follows_pve_order() {
        let cases: &[(&[(&str, &str)], OsType)] = &[
            (
                &[
                    ("/etc/lsb-release", "DISTRIB_ID=Ubuntu\n"),
                    ("/etc/debian_version", "x"),
                ],
                OsType::Ubuntu,
            ),
            (
                &[
                    ("/etc/lsb-release", "DISTRIB_ID=LinuxMint\n"),
                    ("/etc/debian_version", "12.5\n"),
                ],
                OsType::Debian,
            ),
            (&[("/etc/fedora-release", "")], OsType::Fedora),
            (&[("/etc/redhat-release", "")], OsType::Centos),
            (&[("/etc/arch-release", "")], OsType::Archlinux),
            (&[("/etc/alpine-release", "3.19")], OsType::Alpine),
            (&[("/etc/gentoo-release", "")], OsType::Gentoo),
        ];
        for (files, want) in cases {
            let (_d, g) = guest(files);
            assert_eq!(detect_ostype(&g).unwrap(), *want, "{files:?}");
        }
        let (_d, g) = guest(&[("/etc/os-release", "ID=nixos\n")]);
        assert_eq!(
            detect_ostype(&g).unwrap_err().to_string(),
            "unable to detect OS distribution"
        );
    }

    #[test]
    fn detection_does_not_follow_symlinks_out_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("debian_version"), "12\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("etc")).unwrap();
        let g = GuestRoot::open(dir.path(), RootOwner::default()).unwrap();
        assert!(detect_ostype(&g).is_err());
    }

    #[test]
    fn debian_start_writes_hostname_hosts_interfaces_and_dns() {
        let (d, g) = guest(&[
            ("/etc/debian_version", "12.5\n"),
            ("/etc/hosts", "127.0.0.1 localhost\n10.9.9.9 other\n"),
            ("/etc/resolv.conf", "nameserver 9.9.9.9\n"),
            (
                "/etc/network/interfaces",
                "source /etc/network/interfaces.d/*\n",
            ),
        ]);
        let c = conf(
            "arch: amd64\nhostname: web\nostype: debian\nrootfs: local:1\nsearchdomain: example.org\n\
             nameserver: 10.0.0.53 10.0.0.54\n\
             net0: name=eth0,bridge=vmbr0,ip=10.0.0.2/24,gw=10.0.0.1,ip6=dhcp\n\
             net1: name=eth1,bridge=vmbr0,ip=dhcp\n",
        );
        let dns = Dns::lookup(&c, Some("nameserver 1.1.1.1\nsearch host.lan\n"));
        assert_eq!(pre_start(&g, &c, &dns).unwrap(), OsType::Debian);
        assert_eq!(read(d.path(), "/etc/hostname"), "web\n");
        assert_eq!(
            read(d.path(), "/etc/hosts"),
            "127.0.0.1 localhost\n10.9.9.9 other\n# --- BEGIN PVE ---\n\
             ::1 localhost.localnet localhost\n10.0.0.2 web.example.org web\n# --- END PVE ---\n"
        );
        assert_eq!(
            read(d.path(), "/etc/resolv.conf"),
            "# --- BEGIN PVE ---\nsearch example.org\nnameserver 10.0.0.53\n\
             nameserver 10.0.0.54\n# --- END PVE ---\n"
        );
        assert_eq!(
            read(d.path(), "/etc/network/interfaces"),
            "source /etc/network/interfaces.d/*\n# --- BEGIN PVE ---\nauto lo\n\
             iface lo inet loopback\n\nauto eth0\niface eth0 inet static\n\taddress 10.0.0.2/24\n\
             \tgateway 10.0.0.1\niface eth0 inet6 dhcp\n\nauto eth1\niface eth1 inet dhcp\n\
             # --- END PVE ---\n"
        );
        // A second start updates the sections in place.
        let c2 = conf("arch: amd64\nhostname: db\nostype: debian\nrootfs: local:1\n");
        pre_start(&g, &c2, &Dns::lookup(&c2, None)).unwrap();
        assert_eq!(
            read(d.path(), "/etc/hosts"),
            "127.0.0.1 localhost\n10.9.9.9 other\n# --- BEGIN PVE ---\n\
             ::1 localhost.localnet localhost\n127.0.1.1 db\n# --- END PVE ---\n"
        );
        assert_eq!(read(d.path(), "/etc/hostname"), "db\n");
        // No DNS settings any more (and none on the host): the section stays, empty.
        assert_eq!(
            read(d.path(), "/etc/resolv.conf"),
            "# --- BEGIN PVE ---\n# --- END PVE ---\n"
        );
    }

    #[test]
    fn ostype_mismatch_and_unmanaged() {
        let (d, g) = guest(&[("/etc/alpine-release", "3.19\n")]);
        let c = conf("arch: amd64\nostype: debian\nrootfs: local:1\n");
        assert_eq!(
            pre_start(&g, &c, &Dns::default()).unwrap_err().to_string(),
            "got unexpected ostype (alpine != debian)"
        );
        let c = conf("arch: amd64\nostype: unmanaged\nhostname: x\nrootfs: local:1\n");
        assert_eq!(
            pre_start(&g, &c, &Dns::default()).unwrap(),
            OsType::Unmanaged
        );
        assert!(!d.path().join("etc/hostname").exists());
    }

    #[test]
    fn ignore_files_protect_single_files() {
        let (d, g) = guest(&[
            ("/etc/alpine-release", "3.19\n"),
            ("/etc/.pve-ignore.hostname", ""),
            ("/etc/hostname", "keep\n"),
        ]);
        let c = conf(
            "arch: amd64\nostype: alpine\nhostname: new\nrootfs: local:1\n\
             net0: name=eth0,bridge=vmbr0,ip=dhcp\n",
        );
        pre_start(&g, &c, &Dns::default()).unwrap();
        assert_eq!(read(d.path(), "/etc/hostname"), "keep\n");
        assert!(read(d.path(), "/etc/hosts").contains("127.0.1.1 new\n"));
        assert!(read(d.path(), "/etc/network/interfaces").contains("iface eth0 inet dhcp\n"));
        // No DNS data and no file: nothing is written.
        assert!(!d.path().join("etc/resolv.conf").exists());
    }

    #[test]
    fn inittab_gets_pve_getty_lines() {
        let alpine = "::sysinit:/sbin/openrc sysinit\ntty1::respawn:/sbin/getty 38400 tty1\n\
                      tty5::respawn:/sbin/getty 38400 tty5\n::shutdown:/sbin/openrc shutdown\n";
        assert_eq!(
            inittab_text(alpine, OsType::Alpine, 2),
            "::sysinit:/sbin/openrc sysinit\n::shutdown:/sbin/openrc shutdown\n\
             tty1::respawn:/sbin/getty 38400 tty1\ntty2::respawn:/sbin/getty 38400 tty2\n"
        );
        let debian = "id:2:initdefault:\n1:2345:respawn:/sbin/getty 38400 tty1\n\
                      pf::powerwait:/etc/init.d/powerfail start\nca:12345:ctrlaltdel:/sbin/shutdown\n";
        assert_eq!(
            inittab_text(debian, OsType::Debian, 1),
            "id:2:initdefault:\nca:12345:ctrlaltdel:/sbin/shutdown\n\
             p0::powerfail:/sbin/init 0\n1:2345:respawn:/sbin/getty --noclear 38400 tty1\n"
        );
        let (d, g) = guest(&[("/etc/alpine-release", "3.19\n"), ("/etc/inittab", alpine)]);
        let c = conf(
            "arch: amd64\nostype: alpine\ntty: 1\nrootfs: local:1\n\
                      net0: name=eth0,ip6=dhcp\n",
        );
        pre_start(&g, &c, &Dns::default()).unwrap();
        assert!(
            read(d.path(), "/etc/inittab")
                .ends_with("shutdown\ntty1::respawn:/sbin/getty 38400 tty1\n")
        );
        assert!(read(d.path(), "/etc/network/interfaces").contains("iface eth0 inet6 manual\n"));
    }

    #[test]
    fn other_distributions_get_their_network_formats() {
        let net = "net0: name=eth0,bridge=vmbr0,ip=192.168.1.5/24,gw=192.168.1.1,mtu=1400\n";
        let (d, g) = guest(&[("/etc/redhat-release", "CentOS Stream 9\n")]);
        let c = conf(&format!(
            "arch: amd64\nostype: centos\nrootfs: local:1\n{net}"
        ));
        pre_start(&g, &c, &Dns::default()).unwrap();
        assert_eq!(
            read(d.path(), "/etc/sysconfig/network-scripts/ifcfg-eth0"),
            "DEVICE=eth0\nONBOOT=yes\nBOOTPROTO=none\nIPADDR=192.168.1.5\nPREFIX=24\n\
             GATEWAY=192.168.1.1\nMTU=1400\n"
        );
        for (file, os) in [
            ("/etc/arch-release", "archlinux"),
            ("/etc/fedora-release", "fedora"),
        ] {
            let (d, g) = guest(&[(file, "")]);
            let c = conf(&format!(
                "arch: amd64\nostype: {os}\nrootfs: local:1\n{net}"
            ));
            pre_start(&g, &c, &Dns::default()).unwrap();
            assert_eq!(
                read(d.path(), "/etc/systemd/network/eth0.network"),
                "[Match]\nName = eth0\n\n[Network]\nDescription = Interface eth0 autoconfigured \
                 by PVE\nAddress = 192.168.1.5/24\nGateway = 192.168.1.1\nDHCP = none\n"
            );
        }
        let (d, g) = guest(&[("/etc/gentoo-release", "")]);
        let c = conf(&format!(
            "arch: amd64\nostype: gentoo\nhostname: g\nrootfs: local:1\n{net}"
        ));
        pre_start(&g, &c, &Dns::default()).unwrap();
        assert_eq!(
            read(d.path(), "/etc/conf.d/net"),
            "# --- BEGIN PVE ---\nconfig_eth0=\"192.168.1.5/24\"\n\
             routes_eth0=\"default via 192.168.1.1\"\n# --- END PVE ---\n"
        );
        assert_eq!(read(d.path(), "/etc/conf.d/hostname"), "hostname=\"g\"\n");
    }
}
