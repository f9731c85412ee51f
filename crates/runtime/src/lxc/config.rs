//! The LXC configuration of a container, generated from its `pct.conf` the way PVE's
//! `update_lxc_config` does, for a hybrid cgroup v1 host (`lxc.cgroup.*` keys).
//!
//! The generator is pure: everything it needs from the host (which include files exist,
//! the CPUs of the cpuset cgroup, bridge MTUs, the contents of `common.seccomp`) comes in
//! through [`HostFacts`], so the output can be pinned by unit tests.
//!
//! Order of the lines, as PVE writes them: cgroup layout, `lxc.arch`, includes, seccomp,
//! AppArmor (accepted and ignored on hosts without it), `features`, `lxc.monitor.unshare`,
//! id map, console/tty, `lxc.uts.name`, memory, cpu, `lxc.rootfs.path`, networks, raw `lxc.*`
//! keys from the config (in their order), then the cpuset for `cores`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::conf::CtConfig;
use crate::error::{Result, RuntimeError};

/// Where LXC's distribution config snippets live.
pub const LXC_CONFIG_PATH: &str = "/usr/share/lxc/config";

/// What the generator needs to know about the host.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// The container's directory (`<lxcpath>/<vmid>`); `rootfs` below it is the mounted root.
    pub ct_dir: PathBuf,
    /// Include files that exist below [`LXC_CONFIG_PATH`] (file names such as
    /// `debian.common.conf`).
    pub includes: Vec<String>,
    /// The CPUs of the host's cpuset cgroup (for `cores`).
    pub host_cpus: Vec<u32>,
    /// MTU of each bridge that exists (name → MTU).
    pub bridges: BTreeMap<String, u32>,
    /// The text of `common.seccomp`, used to build the per-container seccomp rules.
    pub common_seccomp: String,
    /// The host devices `devN` entries name, by path ([`super::devices::probe_all`]).
    pub devices: BTreeMap<String, super::devices::DevNode>,
}

/// A generated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LxcConfig {
    /// The text of `<ct_dir>/config`.
    pub text: String,
    /// The text of `<ct_dir>/rules.seccomp`, when the container needs its own rules.
    pub seccomp_rules: Option<String>,
    /// The host devices the `devN` entries pass through, by path (their nodes are made
    /// before the start).
    pub devices: BTreeMap<String, super::devices::DevNode>,
}

/// Parsed `features` option.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    /// `nesting=1`
    pub nesting: bool,
    /// `fuse=1`
    pub fuse: bool,
    /// `mknod=1`
    pub mknod: bool,
    /// `keyctl=1`
    pub keyctl: bool,
    /// `force_rw_sys=1`
    pub force_rw_sys: bool,
    /// `mount=fs;fs`
    pub mount: Vec<String>,
}

impl Features {
    /// Parses a `features` value (already validated when the config was written).
    ///
    /// # Errors
    /// An unknown key or a value that is not a boolean.
    pub fn parse(text: &str) -> Result<Self> {
        let mut f = Self::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, "1"));
            if k == "mount" {
                f.mount = v
                    .split(';')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                continue;
            }
            let b = vzkit_host::schema::parse_boolean(v).ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "features: {k}: type check ('boolean') failed - got '{v}'"
                ))
            })?;
            match k {
                "nesting" => f.nesting = b,
                "fuse" => f.fuse = b,
                "mknod" => f.mknod = b,
                "keyctl" => f.keyctl = b,
                "force_rw_sys" => f.force_rw_sys = b,
                _ => {
                    return Err(RuntimeError::Invalid(format!(
                        "features: unknown feature '{k}'"
                    )));
                }
            }
        }
        Ok(f)
    }
}

/// `clamp_cpu_shares` for cgroup v1: default 1024, clamped to 2..=262144.
#[must_use]
pub fn cpu_shares(cpuunits: Option<u64>) -> u64 {
    cpuunits.unwrap_or(1024).clamp(2, 262_144)
}

/// Picks `cores` CPUs out of `host` (the whole set when `cores` is not smaller). PVE drops
/// random members; vzkit rotates the start by the vmid instead, so containers spread over
/// the CPUs and the choice is reproducible.
#[must_use]
pub fn pick_cpus(host: &[u32], cores: usize, vmid: u32) -> Vec<u32> {
    if cores == 0 || cores >= host.len() {
        return host.to_vec();
    }
    let start = vmid as usize % host.len();
    let mut v: Vec<u32> = (0..cores).map(|i| host[(start + i) % host.len()]).collect();
    v.sort_unstable();
    v
}

/// Formats a CPU list as ranges (`0-2,5`), as `PVE::CpuSet::short_string`.
#[must_use]
pub fn cpuset_string(cpus: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        if j == i {
            parts.push(cpus[i].to_string());
        } else {
            parts.push(format!("{}-{}", cpus[i], cpus[j]));
        }
        i = j + 1;
    }
    parts.join(",")
}

/// Parses a cpuset list (`0-2,5`).
///
/// # Errors
/// Text that is not a list of numbers and ranges.
pub fn parse_cpuset(text: &str) -> Result<Vec<u32>> {
    let bad = || RuntimeError::Invalid(format!("unable to parse cpuset '{}'", text.trim()));
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.parse().map_err(|_| bad())?;
                let b: u32 = b.parse().map_err(|_| bad())?;
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn has_lxc_entry(conf: &CtConfig, key: &str) -> bool {
    conf.main.lxc.iter().any(|(k, _)| k == key)
}

/// Generates the LXC configuration of container `vmid`.
///
/// # Errors
/// A template (PVE never starts those), missing `rootfs`, option values that do not parse,
/// a bridge that does not exist, an MTU above the bridge's.
pub fn generate(vmid: u32, conf: &CtConfig, host: &HostFacts) -> Result<LxcConfig> {
    let main = &conf.main;
    if main.is_template() {
        return Err(RuntimeError::Invalid(format!(
            "CT {vmid} is a template - unable to start"
        )));
    }
    let mut raw = String::new();
    let mut line = |k: &str, v: &str| {
        raw.push_str(k);
        raw.push_str(" = ");
        raw.push_str(v);
        raw.push('\n');
    };
    line("lxc.cgroup.relative", "0");
    line("lxc.cgroup.dir.monitor", &format!("lxc.monitor/{vmid}"));
    line("lxc.cgroup.dir.container", &format!("lxc/{vmid}"));
    line("lxc.cgroup.dir.container.inner", "ns");
    line("lxc.arch", main.arch());

    let custom_idmap = has_lxc_entry(conf, "lxc.idmap");
    let unprivileged = main.unprivileged() || custom_idmap;
    let ostype = main.ostype().unwrap_or("unmanaged");
    let include = |name: &str, fallback: &str| {
        let wanted = format!("{ostype}.{name}");
        let file = if host.includes.contains(&wanted) {
            wanted
        } else {
            fallback.to_string()
        };
        format!("{LXC_CONFIG_PATH}/{file}")
    };
    line("lxc.include", &include("common.conf", "common.conf"));
    if unprivileged {
        line("lxc.include", &include("userns.conf", "userns.conf"));
    }

    let features = Features::parse(main.get("features").unwrap_or(""))?;
    let mut seccomp_rules = None;
    if unprivileged && !features.keyctl {
        // As PVE: keyctl fails with ENOSYS, so systemd in the guest falls back gracefully.
        let mut rules = host.common_seccomp.clone();
        if !rules.is_empty() && !rules.ends_with('\n') {
            rules.push('\n');
        }
        rules.push_str("keyctl errno 38\n");
        let file = host.ct_dir.join("rules.seccomp");
        line("lxc.seccomp.profile", &file.display().to_string());
        seccomp_rules = Some(rules);
    }
    if !has_lxc_entry(conf, "lxc.apparmor.profile") {
        line("lxc.apparmor.profile", "generated");
        if features.nesting {
            line("lxc.apparmor.allow_nesting", "1");
        } else {
            line("lxc.apparmor.raw", "deny mount -> /proc/,");
            line("lxc.apparmor.raw", "deny mount -> /sys/,");
        }
        for fs in &features.mount {
            line("lxc.apparmor.raw", &format!("mount fstype={fs},"));
        }
    }
    if features.nesting && host.includes.iter().any(|i| i == "nesting.conf") {
        line("lxc.include", &format!("{LXC_CONFIG_PATH}/nesting.conf"));
    }
    if features.fuse {
        line("lxc.apparmor.raw", "mount fstype=fuse,");
        line(
            "lxc.mount.entry",
            "/dev/fuse dev/fuse none bind,create=file 0 0",
        );
    }
    if features.mknod {
        line("lxc.cgroup.devices.allow", "c *:* m");
        line("lxc.cgroup.devices.allow", "b *:* m");
    }
    if unprivileged && !features.force_rw_sys {
        line("lxc.mount.auto", "sys:mixed");
    }
    for (key, dev) in main.devs()? {
        let path = dev.path.ok_or_else(|| {
            RuntimeError::Invalid(format!("Path is not defined for passthrough device {key}"))
        })?;
        let node = host.devices.get(&path).ok_or_else(|| {
            RuntimeError::Invalid(format!("{key}: device '{path}' not found on the host"))
        })?;
        let id = format!("{} {}:{}", node.type_char(), node.major, node.minor);
        if dev.deny_write == Some(true) {
            // The default allow list of LXC's common.conf may already grant writes (e.g.
            // `/dev/full`): take them away explicitly.
            line("lxc.cgroup.devices.allow", &format!("{id} r"));
            line("lxc.cgroup.devices.deny", &format!("{id} w"));
        } else {
            line("lxc.cgroup.devices.allow", &format!("{id} rw"));
        }
        line(
            "lxc.mount.entry",
            &format!(
                "{} {} none bind,create=file 0 0",
                super::devices::node_path(&host.ct_dir, &path).display(),
                path.trim_start_matches('/')
            ),
        );
    }
    line("lxc.monitor.unshare", "1");
    if main.unprivileged() && !custom_idmap {
        line("lxc.idmap", "u 0 100000 65536");
        line("lxc.idmap", "g 0 100000 65536");
    }
    let console = main.get("console").is_none_or(|v| v != "0");
    if !console {
        line("lxc.console.path", "none");
        line("lxc.cgroup.devices.deny", "c 5:1 rwm");
    }
    line("lxc.tty.max", main.get("tty").unwrap_or("2"));
    line("lxc.environment", "TERM=linux");
    let utsname = main
        .hostname()
        .map_or_else(|| format!("CT{vmid}"), str::to_string);
    line("lxc.uts.name", &utsname);

    let memory = main.memory()?;
    let swap = main.swap()?;
    line(
        "lxc.cgroup.memory.limit_in_bytes",
        &(memory * 1024 * 1024).to_string(),
    );
    line(
        "lxc.cgroup.memory.memsw.limit_in_bytes",
        &((memory + swap) * 1024 * 1024).to_string(),
    );
    if let Some(limit) = main.get("cpulimit") {
        let limit: f64 = limit.parse().map_err(|_| {
            RuntimeError::Invalid(format!(
                "cpulimit: type check ('number') failed - got '{limit}'"
            ))
        })?;
        if limit > 0.0 {
            line("lxc.cgroup.cpu.cfs_period_us", "100000");
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let quota = (100_000.0 * limit) as u64;
            line("lxc.cgroup.cpu.cfs_quota_us", &quota.to_string());
        }
    }
    let units = main
        .get("cpuunits")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                RuntimeError::Invalid(format!(
                    "cpuunits: type check ('integer') failed - got '{v}'"
                ))
            })
        })
        .transpose()?;
    line("lxc.cgroup.cpu.shares", &cpu_shares(units).to_string());

    if main.get("rootfs").is_none() {
        return Err(RuntimeError::Invalid(
            "missing 'rootfs' configuration".into(),
        ));
    }
    line(
        "lxc.rootfs.path",
        &host.ct_dir.join("rootfs").display().to_string(),
    );

    for (key, net) in main.nets()? {
        let ind = key.trim_start_matches("net");
        let p = |s: &str| format!("lxc.net.{ind}.{s}");
        line(&p("type"), "veth");
        line(&p("veth.pair"), &format!("veth{vmid}i{ind}"));
        if let Some(hw) = &net.hwaddr {
            line(&p("hwaddr"), hw);
        }
        line(&p("name"), &net.name);
        if let Some(bridge) = &net.bridge {
            let bridge_mtu = *host.bridges.get(bridge).ok_or_else(|| {
                RuntimeError::Invalid(format!("{key}: bridge '{bridge}' does not exist"))
            })?;
            let mtu = net.mtu.unwrap_or(bridge_mtu);
            if mtu > bridge_mtu {
                return Err(RuntimeError::Invalid(format!(
                    "{key}: MTU size '{mtu}' is bigger than bridge MTU '{bridge_mtu}'"
                )));
            }
            line(&p("mtu"), &mtu.to_string());
            if net.link_down != Some(true) {
                line(&p("link"), bridge);
            }
        } else if let Some(mtu) = net.mtu {
            line(&p("mtu"), &mtu.to_string());
        }
        if net.link_down != Some(true) {
            line(&p("flags"), "up");
        }
    }

    let mut had_cpuset = false;
    for (k, v) in &main.lxc {
        had_cpuset |= k == "lxc.cgroup.cpuset.cpus" || k == "lxc.cgroup2.cpuset.cpus";
        line(k, v);
    }
    if let Some(cores) = main.cores()?
        && !had_cpuset
        && !host.host_cpus.is_empty()
    {
        let cores = usize::try_from(cores).unwrap_or(usize::MAX);
        let cpus = pick_cpus(&host.host_cpus, cores, vmid);
        line("lxc.cgroup.cpuset.cpus", &cpuset_string(&cpus));
    }
    // Only the devices this container passes through.
    let mut devices = BTreeMap::new();
    for (_, dev) in main.devs()? {
        if let Some(node) = dev.path.and_then(|p| host.devices.get_key_value(&p)) {
            devices.insert(node.0.clone(), *node.1);
        }
    }
    Ok(LxcConfig {
        text: raw,
        seccomp_rules,
        devices,
    })
}

/// Collects [`HostFacts`] from this host for a container directory.
///
/// # Errors
/// When `/sys/class/net` cannot be read.
pub fn host_facts(ct_dir: &Path) -> Result<HostFacts> {
    let includes = match std::fs::read_dir(LXC_CONFIG_PATH) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    let host_cpus = match std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.cpus") {
        Ok(t) => parse_cpuset(&t)?,
        Err(_) => Vec::new(),
    };
    let mut bridges = BTreeMap::new();
    let net = Path::new("/sys/class/net");
    let rd = std::fs::read_dir(net).map_err(|e| RuntimeError::io("read", net, e))?;
    for e in rd {
        let e = e.map_err(|err| RuntimeError::io("read", net, err))?;
        if !e.path().join("bridge").is_dir() {
            continue;
        }
        let mtu = std::fs::read_to_string(e.path().join("mtu"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(1500);
        bridges.insert(e.file_name().to_string_lossy().into_owned(), mtu);
    }
    let common_seccomp = std::fs::read_to_string(Path::new(LXC_CONFIG_PATH).join("common.seccomp"))
        .unwrap_or_default();
    Ok(HostFacts {
        devices: BTreeMap::new(),
        ct_dir: ct_dir.to_path_buf(),
        includes,
        host_cpus,
        bridges,
        common_seccomp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            ct_dir: PathBuf::from("/r/var/lib/lxc/100"),
            includes: vec!["common.conf".into(), "userns.conf".into()],
            host_cpus: vec![0, 1, 2, 3],
            bridges: BTreeMap::from([("vmbr0".to_string(), 1500)]),
            common_seccomp: "2\ndenylist\n[all]\nkexec_load errno 1\n".into(),
            devices: BTreeMap::from([(
                "/dev/ttyUSB0".to_string(),
                super::super::devices::DevNode {
                    block: false,
                    major: 188,
                    minor: 0,
                },
            )]),
        }
    }

    fn conf(text: &str) -> CtConfig {
        CtConfig::parse(100, text).unwrap().0
    }

    #[test]
    fn privileged_config_matches_pve_layout() {
        let c = conf(
            "arch: amd64\ncores: 2\ncpulimit: 1.5\ncpuunits: 512\nhostname: web\nmemory: 256\n\
             net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=10.0.0.2/24,mtu=1400,type=veth\n\
             ostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=1G\nswap: 128\ntty: 3\n\
             lxc.cap.drop: sys_time\n",
        );
        let out = generate(100, &c, &facts()).unwrap();
        assert_eq!(
            out.text,
            "lxc.cgroup.relative = 0\n\
             lxc.cgroup.dir.monitor = lxc.monitor/100\n\
             lxc.cgroup.dir.container = lxc/100\n\
             lxc.cgroup.dir.container.inner = ns\n\
             lxc.arch = amd64\n\
             lxc.include = /usr/share/lxc/config/common.conf\n\
             lxc.apparmor.profile = generated\n\
             lxc.apparmor.raw = deny mount -> /proc/,\n\
             lxc.apparmor.raw = deny mount -> /sys/,\n\
             lxc.monitor.unshare = 1\n\
             lxc.tty.max = 3\n\
             lxc.environment = TERM=linux\n\
             lxc.uts.name = web\n\
             lxc.cgroup.memory.limit_in_bytes = 268435456\n\
             lxc.cgroup.memory.memsw.limit_in_bytes = 402653184\n\
             lxc.cgroup.cpu.cfs_period_us = 100000\n\
             lxc.cgroup.cpu.cfs_quota_us = 150000\n\
             lxc.cgroup.cpu.shares = 512\n\
             lxc.rootfs.path = /r/var/lib/lxc/100/rootfs\n\
             lxc.net.0.type = veth\n\
             lxc.net.0.veth.pair = veth100i0\n\
             lxc.net.0.hwaddr = BC:24:11:00:00:01\n\
             lxc.net.0.name = eth0\n\
             lxc.net.0.mtu = 1400\n\
             lxc.net.0.link = vmbr0\n\
             lxc.net.0.flags = up\n\
             lxc.cap.drop = sys_time\n\
             lxc.cgroup.cpuset.cpus = 0-1\n"
        );
        assert_eq!(out.seccomp_rules, None);
    }

    #[test]
    fn unprivileged_gets_idmap_userns_and_keyctl_rule() {
        let c = conf(
            "arch: amd64\nostype: alpine\nrootfs: local:100/vm-100-disk-0.raw,size=1G\n\
             unprivileged: 1\nconsole: 0\nfeatures: nesting=1,fuse=1\n",
        );
        let out = generate(100, &c, &facts()).unwrap();
        let t = &out.text;
        assert!(t.contains("lxc.include = /usr/share/lxc/config/userns.conf\n"));
        assert!(t.contains("lxc.idmap = u 0 100000 65536\nlxc.idmap = g 0 100000 65536\n"));
        assert!(t.contains("lxc.seccomp.profile = /r/var/lib/lxc/100/rules.seccomp\n"));
        assert!(t.contains("lxc.apparmor.allow_nesting = 1\n"));
        assert!(t.contains("lxc.mount.entry = /dev/fuse dev/fuse none bind,create=file 0 0\n"));
        assert!(t.contains("lxc.mount.auto = sys:mixed\n"));
        assert!(t.contains("lxc.console.path = none\nlxc.cgroup.devices.deny = c 5:1 rwm\n"));
        assert!(t.contains("lxc.uts.name = CT100\n"));
        assert!(t.contains("lxc.cgroup.memory.limit_in_bytes = 536870912\n"));
        assert!(t.contains("lxc.cgroup.cpu.shares = 1024\n"));
        assert!(!t.contains("cpuset"));
        assert_eq!(
            out.seccomp_rules.as_deref(),
            Some("2\ndenylist\n[all]\nkexec_load errno 1\nkeyctl errno 38\n")
        );
    }

    #[test]
    fn passthrough_devices_are_allowed_and_bind_mounted() {
        let c = conf(
            "arch: amd64\nrootfs: local:100/vm-100-disk-0.raw\n\
             dev0: /dev/ttyUSB0,mode=0640,uid=33\ndev1: /dev/ttyUSB0,deny-write=1\n",
        );
        let t = generate(100, &c, &facts()).unwrap().text;
        assert!(
            t.contains(
                "lxc.cgroup.devices.allow = c 188:0 rw\n\
                 lxc.mount.entry = /r/var/lib/lxc/100/passthrough/dev/ttyUSB0 dev/ttyUSB0 none bind,create=file 0 0\n\
                 lxc.cgroup.devices.allow = c 188:0 r\n\
                 lxc.cgroup.devices.deny = c 188:0 w\n"
            ),
            "{t}"
        );
        let missing = conf("arch: amd64\nrootfs: local:100/vm-100-disk-0.raw\ndev0: /dev/sdz\n");
        assert_eq!(
            generate(100, &missing, &facts()).unwrap_err().to_string(),
            "dev0: device '/dev/sdz' not found on the host"
        );
    }

    #[test]
    fn custom_idmap_replaces_the_default_and_cpuset_key_wins() {
        let c = conf(
            "arch: amd64\ncores: 1\nrootfs: local:100/vm-100-disk-0.raw\n\
             lxc.idmap: u 0 200000 65536\nlxc.idmap: g 0 200000 65536\n\
             lxc.cgroup.cpuset.cpus: 3\n",
        );
        let t = generate(100, &c, &facts()).unwrap().text;
        assert!(!t.contains("100000"));
        assert!(t.contains("lxc.idmap = u 0 200000 65536\n"));
        assert_eq!(t.matches("cpuset.cpus").count(), 1);
        assert!(t.contains("lxc.include = /usr/share/lxc/config/userns.conf\n"));
    }

    #[test]
    fn refusals_use_pve_messages() {
        let f = facts();
        let e = |text: &str| generate(100, &conf(text), &f).unwrap_err().to_string();
        assert_eq!(
            e("arch: amd64\nrootfs: local:1\nnet0: name=eth0,bridge=vmbr0,mtu=9000\n"),
            "net0: MTU size '9000' is bigger than bridge MTU '1500'"
        );
        assert_eq!(
            e("arch: amd64\nrootfs: local:1\nnet1: name=eth1,bridge=nobr\n"),
            "net1: bridge 'nobr' does not exist"
        );
        assert_eq!(e("arch: amd64\n"), "missing 'rootfs' configuration");
        assert_eq!(
            e("arch: amd64\nrootfs: local:1\ntemplate: 1\n"),
            "CT 100 is a template - unable to start"
        );
    }

    #[test]
    fn cpusets_print_and_parse() {
        assert_eq!(cpuset_string(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(parse_cpuset("0-2,5\n").unwrap(), [0, 1, 2, 5]);
        assert!(parse_cpuset("3-1").is_err());
        assert_eq!(pick_cpus(&[0, 1, 2, 3], 2, 103), [0, 3]);
        assert_eq!(pick_cpus(&[0, 1], 4, 1), [0, 1]);
        assert_eq!(cpu_shares(Some(0)), 2);
        assert_eq!(cpu_shares(Some(600_000)), 262_144);
    }
}
