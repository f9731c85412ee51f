//! The kernel-VM test tier: what this host's kernel cannot do (device-mapper, LVM-thin, ext4
//! quota enforcement) is tested inside a qemu guest running Debian's kernel.
//!
//! # How a guest run works
//!
//! [`GuestPlan::run`] creates a scratch directory (below `vm-scratch` in the cargo target
//! directory, or `$VZKIT_VM_SCRATCH`) and, inside it:
//! - `initrd.img`: a minimal initramfs (uncompressed `newc` cpio, written here) holding the
//!   static busybox and the virtio/9p modules of the installed kernel (their `modules.dep`
//!   closure). Its `/init` loads them, mounts the host's root read-only over 9p and
//!   `switch_root`s into it, running the generated guest init;
//! - `init.sh`: the guest init. It mounts `/proc`, `/sys`, `/dev` (devtmpfs: no udev) and a
//!   tmpfs on `/run`, mounts the writable results share, writes an udev-less LVM
//!   configuration (`LVM_SYSTEM_DIR=/run/lvm-system`), loads the requested modules and runs
//!   the steps, then powers off;
//! - `steps/<name>.sh`: one shell script per step, run with `sh -ex`;
//! - `disk.img`: a sparse scratch disk, `/dev/vda` in the guest;
//! - `res/`: the results share. Each step leaves `<name>.rc`, `<name>.out` (stdout),
//!   `<name>.err` (stderr and the `-x` trace) and `<name>.ms`; `done` marks a finished run.
//!
//! The guest sees the host's whole root at the same paths, read-only: vzkit's binaries and
//! test programs under the cargo target directory run there as they are. Guest-writable
//! state belongs in `/run` (a tmpfs, also `TMPDIR` and `HOME`).
//!
//! Steps are grouped: a failed step skips the rest of its group and every group that needs
//! it. The kernel modules are loaded by the implicit first group `boot`.
//!
//! A run that does not finish (no `done` file, a step without a result, qemu killed after the
//! timeout or exiting with an error) is an error carrying the console's tail: the tier never
//! passes by not running. Dropping the run kills qemu (by its PID, through the child handle)
//! and removes the scratch directory; `VZKIT_VM_KEEP=1` keeps it for inspection.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the environment of steps that run a test program inside the guest.
pub const GUEST_ENV: &str = "VZKIT_VM_GUEST";

/// The modules the initramfs loads to reach the 9p root (with their dependencies).
const INITRD_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// The static busybox the initramfs runs (Debian's `busybox-static`).
const BUSYBOX: &str = "/usr/bin/busybox";

/// The qemu binary.
const QEMU: &str = "qemu-system-x86_64";

/// Whether this process runs inside a guest started by [`GuestPlan::run`].
#[must_use]
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_ENV).is_some()
}

/// An installed Debian kernel: the image under `/boot` and its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The release (`uname -r` in the guest), e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// `/boot/vmlinuz-<release>`.
    pub image: PathBuf,
    /// `/lib/modules/<release>`.
    pub modules: PathBuf,
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*` that has a `/lib/modules/<release>/modules.dep`.
    ///
    /// # Errors
    /// When there is none (the package `linux-image-amd64` is not installed).
    pub fn discover() -> Result<Self, String> {
        let entries = std::fs::read_dir("/boot").map_err(|e| format!("cannot read /boot: {e}"))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read /boot: {e}"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(release) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            let modules = Path::new("/lib/modules").join(release);
            if modules.join("modules.dep").is_file() {
                found.push(Kernel {
                    release: release.to_string(),
                    image: entry.path(),
                    modules,
                });
            }
        }
        found.sort_by_key(|k| version_key(&k.release));
        found.pop().ok_or_else(|| {
            "no kernel for the VM tier: no /boot/vmlinuz-<release> with /lib/modules/<release>/\
             modules.dep (apt-get install linux-image-amd64, see scripts/setup.sh)"
                .to_string()
        })
    }

    /// The module files for `names` and everything they depend on, dependencies first, as
    /// paths relative to [`Kernel::modules`]. Built-in modules are skipped.
    ///
    /// # Errors
    /// When a module is neither in `modules.dep` nor in `modules.builtin`.
    pub fn module_closure(&self, names: &[&str]) -> Result<Vec<String>, String> {
        let read = |f: &str| {
            std::fs::read_to_string(self.modules.join(f))
                .map_err(|e| format!("cannot read {}/{f}: {e}", self.modules.display()))
        };
        let deps = parse_modules_dep(&read("modules.dep")?);
        let builtin: HashSet<String> = read("modules.builtin")?.lines().map(module_name).collect();
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let name = name.replace('-', "_");
            if builtin.contains(&name) {
                continue;
            }
            let path = deps
                .keys()
                .find(|p| module_name(p) == name)
                .ok_or_else(|| format!("kernel {}: no module {name}", self.release))?;
            visit(path, &deps, &mut seen, &mut order);
        }
        Ok(order)
    }
}

/// Dependencies first (depth first over `modules.dep`).
fn visit(
    path: &str,
    deps: &BTreeMap<String, Vec<String>>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(path.to_string()) {
        return;
    }
    for dep in deps.get(path).into_iter().flatten() {
        visit(dep, deps, seen, order);
    }
    order.push(path.to_string());
}

/// `modules.dep`: `kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko …` → path → dependency paths.
fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.trim().to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect()
}

/// `kernel/drivers/md/dm-thin-pool.ko.xz` → `dm_thin_pool`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Orders kernel releases by their numeric parts (`6.10.0-1` after `6.9.0-2`).
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// A module file's content, decompressed (busybox `insmod` takes plain `.ko` files).
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(|e| format!("cannot read {name}: {e}")),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| format!("cannot run {tool}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{tool} -dc {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(out.stdout)
        }
    }
}

/// One member of a `newc` cpio archive.
struct CpioEntry {
    name: String,
    mode: u32,
    data: Vec<u8>,
}

/// Writes a `newc` ("070701") cpio archive, the format the kernel unpacks as initramfs.
fn cpio_newc(entries: &[CpioEntry]) -> Vec<u8> {
    fn pad(out: &mut Vec<u8>) {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let trailer = CpioEntry {
        name: "TRAILER!!!".into(),
        mode: 0,
        data: Vec::new(),
    };
    for (ino, e) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let nlink = if e.mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            ino as u32 + 1,
            e.mode,
            0,
            0,
            nlink,
            0,
            e.data.len() as u32,
            0,
            0,
            0,
            0,
            e.name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(&e.data);
        pad(&mut out);
    }
    out
}

/// The initramfs `/init`: load virtio + 9p, mount the host root read-only, switch into it.
const INITRD_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules.order); do
    $B insmod /lib/$m || echo "VZKIT-VM: insmod $m failed"
done
INIT=/sbin/init
for a in $($B cat /proc/cmdline); do case "$a" in init=*) INIT=${a#init=};; esac; done
# The root is read-only and does not change during a run: cache it (cache=loose), so that
# the large debug binaries are read over 9p once, not at every exec.
if ! $B mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose rootfs /newroot; then
    echo "VZKIT-VM: mounting the 9p root failed"
    $B poweroff -f
fi
$B umount /proc
$B umount /dev
exec $B switch_root /newroot "$INIT"
"#;

/// Builds the initramfs for `kernel` into `out`.
///
/// # Errors
/// Missing busybox or modules.
pub fn build_initrd(kernel: &Kernel, out: &Path) -> Result<(), String> {
    let dir = |name: &str| CpioEntry {
        name: name.into(),
        mode: 0o040_755,
        data: Vec::new(),
    };
    let mut entries = vec![
        dir("bin"),
        dir("lib"),
        dir("proc"),
        dir("sys"),
        dir("dev"),
        dir("newroot"),
    ];
    let busybox = std::fs::read(BUSYBOX)
        .map_err(|e| format!("cannot read {BUSYBOX}: {e} (apt-get install busybox-static)"))?;
    entries.push(CpioEntry {
        name: "bin/busybox".into(),
        mode: 0o100_755,
        data: busybox,
    });
    let mut order = String::new();
    for rel in kernel.module_closure(INITRD_MODULES)? {
        let file = format!("{}.ko", module_name(&rel));
        entries.push(CpioEntry {
            name: format!("lib/{file}"),
            mode: 0o100_644,
            data: module_bytes(&kernel.modules.join(&rel))?,
        });
        order.push_str(&file);
        order.push('\n');
    }
    entries.push(CpioEntry {
        name: "modules.order".into(),
        mode: 0o100_644,
        data: order.into_bytes(),
    });
    entries.push(CpioEntry {
        name: "init".into(),
        mode: 0o100_755,
        data: INITRD_INIT.as_bytes().to_vec(),
    });
    std::fs::write(out, cpio_newc(&entries))
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// One step: a shell script run with `sh -ex` in the guest.
#[derive(Debug, Clone)]
struct Step {
    name: String,
    script: String,
}

/// Steps that run in order; a failure skips the rest and every group that needs this one.
#[derive(Debug, Clone)]
struct Group {
    name: String,
    needs: Vec<String>,
    steps: Vec<Step>,
}

/// What a guest run does: environment, modules to load, groups of steps, limits.
#[derive(Debug, Clone)]
pub struct GuestPlan {
    env: Vec<(String, String)>,
    modules: Vec<String>,
    groups: Vec<Group>,
    disk_size: u64,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
}

impl Default for GuestPlan {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestPlan {
    /// An empty plan: a 4 GiB scratch disk, 1536 MiB of memory, 2 CPUs, 10 minutes.
    #[must_use]
    pub fn new() -> Self {
        Self {
            env: Vec::new(),
            modules: Vec::new(),
            groups: Vec::new(),
            disk_size: 4 << 30,
            memory_mib: 1536,
            cpus: 2,
            timeout: Duration::from_secs(600),
        }
    }

    /// Exports `key=value` to every step.
    #[must_use]
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((
            key.to_string(),
            value.as_ref().to_string_lossy().into_owned(),
        ));
        self
    }

    /// Kernel modules to `modprobe` (from the host's `/lib/modules` over 9p) before the steps.
    #[must_use]
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|s| (*s).to_string()));
        self
    }

    /// The size of the sparse scratch disk (`/dev/vda`).
    #[must_use]
    pub fn disk_size(mut self, bytes: u64) -> Self {
        self.disk_size = bytes;
        self
    }

    /// How long the whole guest may run before qemu is killed and the run fails.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts a group of steps that runs only when the groups in `needs` all succeeded.
    ///
    /// # Panics
    /// On a duplicate or unsafe name, or an unknown group in `needs`.
    #[must_use]
    pub fn group(mut self, name: &str, needs: &[&str]) -> Self {
        check_name(name);
        assert!(
            name != "boot" && !self.groups.iter().any(|g| g.name == name),
            "duplicate group {name}"
        );
        for n in needs {
            assert!(
                self.groups.iter().any(|g| g.name == *n),
                "group {name} needs unknown group {n}"
            );
        }
        self.groups.push(Group {
            name: name.to_string(),
            needs: needs.iter().map(|s| (*s).to_string()).collect(),
            steps: Vec::new(),
        });
        self
    }

    /// Adds a step (a shell script, run with `sh -ex`) to the current group.
    ///
    /// # Panics
    /// Before the first [`GuestPlan::group`], or on a duplicate or unsafe name.
    #[must_use]
    pub fn step(mut self, name: &str, script: &str) -> Self {
        check_name(name);
        assert!(
            name != "modules"
                && !self
                    .groups
                    .iter()
                    .any(|g| g.steps.iter().any(|s| s.name == name)),
            "duplicate step {name}"
        );
        let group = self.groups.last_mut().expect("step() before group()");
        group.steps.push(Step {
            name: name.to_string(),
            script: script.to_string(),
        });
        self
    }

    /// All groups, the implicit `boot` group (loading the modules) first.
    fn all_groups(&self) -> Vec<Group> {
        let mut script = String::from("modprobe -a virtio_blk");
        for m in &self.modules {
            script.push(' ');
            script.push_str(m);
        }
        script.push_str("\ncat /proc/modules | cut -d' ' -f1 | sort\n");
        let mut groups = vec![Group {
            name: "boot".into(),
            needs: Vec::new(),
            steps: vec![Step {
                name: "modules".into(),
                script,
            }],
        }];
        for g in &self.groups {
            let mut g = g.clone();
            g.needs.insert(0, "boot".into());
            groups.push(g);
        }
        groups
    }

    /// The guest init script for results in `res` and step scripts in `steps`.
    fn init_script(&self, res: &Path, steps: &Path) -> String {
        let mut s = format!(
            r#"#!/bin/sh
# vzkit kernel-VM tier: guest init (generated by tests/src/vm.rs)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/run/home TMPDIR=/run/tmp LC_ALL=C
export LVM_SYSTEM_DIR=/run/lvm-system
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=0755 run /run
mkdir -p /run/home /run/tmp /run/lock/lvm /run/lvm-system/backup /dev/shm
mount -t tmpfs -o mode=1777 shm /dev/shm
RES='{res}'
STEPS='{steps}'
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 res "$RES"; then
    echo "VZKIT-VM: mounting the results share failed"
    busybox poweroff -f
fi
echo "VZKIT-VM: up after $(cut -d' ' -f1 /proc/uptime) s, kernel $(uname -r)"
cat > /run/lvm-system/lvm.conf <<'EOF'
devices {{ obtain_device_list_from_udev = 0 external_device_info_source = "none" use_devicesfile = 0 }}
activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }}
global {{ use_lvmpolld = 0 event_activation = 0 }}
backup {{ backup = 1 backup_dir = "/run/lvm-system/backup" archive = 0 }}
EOF
"#,
            res = res.display(),
            steps = steps.display(),
        );
        for (k, v) in &self.env {
            let _ = writeln!(s, "export {k}={}", shell_quote(v));
        }
        s.push_str(
            r#"step() {
    if [ "$G_OK" != 1 ]; then
        echo skipped > "$RES/$1.rc"
        echo "VZKIT-VM: step $1 skipped"
        return
    fi
    echo "VZKIT-VM: step $1"
    : > "$RES/$1.started"
    t0=$(date +%s%N)
    (cd /run/home && sh -ex "$STEPS/$1.sh") > "$RES/$1.out" 2> "$RES/$1.err" < /dev/null
    rc=$?
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 )) > "$RES/$1.ms"
    echo $rc > "$RES/$1.rc"
    echo "VZKIT-VM: step $1 rc=$rc"
    [ $rc = 0 ] || G_OK=0
}
"#,
        );
        for g in self.all_groups() {
            let _ = writeln!(s, "G_OK=1");
            for n in &g.needs {
                let _ = writeln!(s, "[ -e \"$RES/group-{n}.ok\" ] || G_OK=0");
            }
            for st in &g.steps {
                let _ = writeln!(s, "step {}", st.name);
            }
            let _ = writeln!(s, "[ $G_OK = 1 ] && : > \"$RES/group-{}.ok\"", g.name);
        }
        s.push_str(
            "echo \"VZKIT-VM: done after $(cut -d' ' -f1 /proc/uptime) s\"\n\
             : > \"$RES/done\"\nsync\numount \"$RES\"\nbusybox poweroff -f\n",
        );
        s
    }

    /// Boots the guest, runs every step and collects the results.
    ///
    /// # Errors
    /// When the guest cannot be prepared or started, times out, or ends without running
    /// every step to a result. Failed steps are not errors here: see [`GuestRun`].
    pub fn run(&self) -> Result<GuestRun, String> {
        let kernel = Kernel::discover()?;
        let scratch = Scratch::new()?;
        let dir = scratch.path().to_path_buf();
        let initrd = dir.join("initrd.img");
        build_initrd(&kernel, &initrd)?;
        let res = dir.join("res");
        let steps = dir.join("steps");
        let groups = self.all_groups();
        mkdir(&res)?;
        mkdir(&steps)?;
        for g in &groups {
            for st in &g.steps {
                write_file(&steps.join(format!("{}.sh", st.name)), &st.script, 0o644)?;
            }
        }
        let init = dir.join("init.sh");
        write_file(&init, &self.init_script(&res, &steps), 0o755)?;
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(self.disk_size))
            .map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
        let console_path = dir.join("console.log");
        let console = std::fs::File::create(&console_path)
            .map_err(|e| format!("cannot create {}: {e}", console_path.display()))?;
        let console_err = console
            .try_clone()
            .map_err(|e| format!("cannot dup console log: {e}"))?;

        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg,thread=multi", "-nographic", "-no-reboot"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-fsdev")
            .arg("local,id=root,path=/,security_model=passthrough,readonly=on,multidevs=remap")
            .args(["-device", "virtio-9p-pci,fsdev=root,mount_tag=rootfs"])
            .arg("-fsdev")
            .arg(format!(
                "local,id=res,path={},security_model=passthrough",
                res.display()
            ))
            .args(["-device", "virtio-9p-pci,fsdev=res,mount_tag=res"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=unsafe",
                disk.display()
            ))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 init={} panic=-1 quiet apparmor=0",
                init.display()
            ))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err);
        let start = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e} (apt-get install qemu-system-x86)"))?;
        let mut qemu = Qemu(child);
        let status = loop {
            match qemu.0.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() > self.timeout => {
                    qemu.kill();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(format!("waiting for qemu failed: {e}")),
            }
        };
        let wall = start.elapsed();
        let console = std::fs::read_to_string(&console_path).unwrap_or_default();
        let fail = |why: String| {
            Err(format!(
                "VM guest failed: {why} (after {:.1} s)\n--- console (tail) ---\n{}",
                wall.as_secs_f64(),
                tail(&console, 60)
            ))
        };
        let Some(status) = status else {
            let running = groups
                .iter()
                .flat_map(|g| &g.steps)
                .find(|st| {
                    res.join(format!("{}.started", st.name)).exists()
                        && !res.join(format!("{}.rc", st.name)).exists()
                })
                .map_or_else(|| "none".to_string(), |st| st.name.clone());
            return fail(format!(
                "timed out after {} s; qemu killed (step running: {running})",
                self.timeout.as_secs()
            ));
        };
        if !status.success() {
            return fail(format!("qemu exited with {status}"));
        }
        if !res.join("done").exists() {
            return fail("the guest did not finish (no 'done' result file)".into());
        }
        let mut results = Vec::new();
        for g in &groups {
            for st in &g.steps {
                let read = |ext: &str| {
                    std::fs::read_to_string(res.join(format!("{}.{ext}", st.name)))
                        .unwrap_or_default()
                };
                let rc = read("rc");
                let outcome = match rc.trim() {
                    "" => return fail(format!("step {} left no result", st.name)),
                    "skipped" => Outcome::Skipped,
                    n => Outcome::Exited(
                        n.parse()
                            .map_err(|_| format!("step {}: bad exit status '{n}'", st.name))?,
                    ),
                };
                results.push(StepResult {
                    name: st.name.clone(),
                    group: g.name.clone(),
                    outcome,
                    stdout: read("out"),
                    stderr: read("err"),
                    millis: read("ms").trim().parse().unwrap_or(0),
                });
            }
        }
        drop(qemu);
        if std::env::var_os("VZKIT_VM_KEEP").is_some() {
            eprintln!("VZKIT_VM_KEEP: keeping {}", scratch.keep().display());
        }
        Ok(GuestRun {
            steps: results,
            groups: groups.into_iter().map(|g| (g.name, g.needs)).collect(),
            console,
            wall,
            kernel: kernel.release,
        })
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and exited with this status.
    Exited(i32),
    /// It did not run: an earlier step of its group, or a group it needs, failed.
    Skipped,
}

/// The result of one step.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Step name.
    pub name: String,
    /// Its group.
    pub group: String,
    /// Exit status or skipped.
    pub outcome: Outcome,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr, with the `sh -x` trace.
    pub stderr: String,
    /// Its run time inside the guest.
    pub millis: u64,
}

impl StepResult {
    /// Whether it ran and exited 0.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Exited(0)
    }

    fn describe(&self) -> String {
        format!(
            "step {} ({:?}, {} ms)\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.outcome,
            self.millis,
            tail(&self.stdout, 80),
            tail(&self.stderr, 80)
        )
    }
}

/// The results of a finished guest run.
#[derive(Debug, Clone)]
pub struct GuestRun {
    steps: Vec<StepResult>,
    /// Each group with the groups it needs.
    groups: Vec<(String, Vec<String>)>,
    /// The serial console (qemu's stdout and stderr).
    pub console: String,
    /// Wall time from starting qemu to its exit.
    pub wall: Duration,
    /// The guest kernel's release.
    pub kernel: String,
}

impl GuestRun {
    /// All step results in run order.
    #[must_use]
    pub fn steps(&self) -> &[StepResult] {
        &self.steps
    }

    /// The result of step `name`.
    ///
    /// # Panics
    /// When there is no such step.
    #[must_use]
    pub fn step(&self, name: &str) -> &StepResult {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name} in this guest run"))
    }

    /// The stdout of step `name`, which must have passed.
    ///
    /// # Panics
    /// When it failed or was skipped (the message shows its output).
    #[must_use]
    pub fn ok(&self, name: &str) -> &str {
        let s = self.step(name);
        assert!(s.passed(), "{}", s.describe());
        &s.stdout
    }

    /// Requires every step of `group` (and of the `boot` group) to have passed.
    ///
    /// # Panics
    /// At the first step that did not, showing its output (or that of the failed step that
    /// caused the skip).
    pub fn assert_group_ok(&self, group: &str) {
        assert!(
            self.steps.iter().any(|s| s.group == group),
            "no group {group} in this guest run"
        );
        for s in self.steps.iter().filter(|s| s.group == group) {
            if s.outcome == Outcome::Skipped {
                let related = self.group_closure(group);
                let cause = self
                    .steps
                    .iter()
                    .filter(|f| related.contains(&f.group))
                    .find(|f| !f.passed() && f.outcome != Outcome::Skipped)
                    .map_or_else(|| "no failed step found".into(), StepResult::describe);
                panic!(
                    "step {} of group {group} was skipped; first failure:\n{cause}",
                    s.name
                );
            }
            assert!(s.passed(), "{}", s.describe());
        }
    }

    /// `group` and every group it needs, directly or not.
    fn group_closure(&self, group: &str) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut todo = vec![group.to_string()];
        while let Some(g) = todo.pop() {
            if seen.insert(g.clone())
                && let Some((_, needs)) = self.groups.iter().find(|(n, _)| *n == g)
            {
                todo.extend(needs.iter().cloned());
            }
        }
        seen
    }

    /// One line per step with its time, for the test log.
    #[must_use]
    pub fn timings(&self) -> String {
        let mut s = format!(
            "guest run on kernel {}: {:.1} s wall\n",
            self.kernel,
            self.wall.as_secs_f64()
        );
        for st in &self.steps {
            let _ = writeln!(s, "  {:<28} {:>7} ms  {:?}", st.name, st.millis, st.outcome);
        }
        s
    }
}

/// qemu, killed by its PID (the child handle) when dropped while still running.
struct Qemu(Child);

impl Qemu {
    fn kill(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            if let Err(e) = self.0.kill() {
                eprintln!("warning: cannot kill qemu (pid {}): {e}", self.0.id());
            }
            if let Err(e) = self.0.wait() {
                eprintln!("warning: cannot reap qemu (pid {}): {e}", self.0.id());
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The scratch directory of one run, removed when dropped unless kept.
struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    /// A fresh directory below [`scratch_base`].
    fn new() -> Result<Self, String> {
        let base = scratch_base()?;
        std::fs::create_dir_all(&base)
            .map_err(|e| format!("cannot create {}: {e}", base.display()))?;
        tempfile::Builder::new()
            .prefix("vzkit-vm-")
            .tempdir_in(&base)
            .map(|d| Scratch(Some(d)))
            .map_err(|e| {
                format!(
                    "cannot create a scratch directory in {}: {e}",
                    base.display()
                )
            })
    }

    fn path(&self) -> &Path {
        self.0.as_ref().expect("scratch dir").path()
    }

    fn keep(mut self) -> PathBuf {
        self.0.take().expect("scratch dir").keep()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Scratch").field(&self.0).finish()
    }
}

/// Where runs keep their scratch directories: `$VZKIT_VM_SCRATCH`, or `vm-scratch` in the
/// cargo target directory of the running test binary (`target/<profile>/deps/<exe>`).
/// The guest must see it at the same path, so it may not be below a path the guest mounts
/// over (`/run`, `/dev`, `/proc`, `/sys`).
fn scratch_base() -> Result<PathBuf, String> {
    let base = match std::env::var_os("VZKIT_VM_SCRATCH") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe =
                std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
            exe.ancestors()
                .nth(3)
                .ok_or_else(|| format!("no target directory above {}", exe.display()))?
                .join("vm-scratch")
        }
    };
    let base = std::path::absolute(&base)
        .map_err(|e| format!("bad scratch directory {}: {e}", base.display()))?;
    if ["/run", "/dev", "/proc", "/sys"]
        .iter()
        .any(|p| base.starts_with(p))
    {
        return Err(format!(
            "scratch directory {} is hidden in the guest (set VZKIT_VM_SCRATCH)",
            base.display()
        ));
    }
    Ok(base)
}

fn check_name(name: &str) {
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "bad step or group name '{name}'"
    );
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::create_dir(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    let mut f = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Single-quotes `s` for the shell.
#[must_use]
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_closure_loads_dependencies_first() {
        let deps = parse_modules_dep(
            "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n\
             kernel/net/9p/9pnet.ko:\n\
             kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n\
             kernel/fs/netfs/netfs.ko:\n",
        );
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        visit("kernel/fs/9p/9p.ko", &deps, &mut seen, &mut order);
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/fscache/fscache.ko",
                "kernel/fs/9p/9p.ko"
            ]
        );
        assert_eq!(
            module_name("kernel/drivers/md/dm-thin-pool.ko.xz"),
            "dm_thin_pool"
        );
        assert!(version_key("6.10.0-1-amd64") > version_key("6.9.0-2-amd64"));
    }

    #[test]
    fn cpio_newc_layout() {
        let a = cpio_newc(&[CpioEntry {
            name: "init".into(),
            mode: 0o100_755,
            data: b"abcde".to_vec(),
        }]);
        // header (110) + "init\0" (5) padded to 116, data 5 padded to 8.
        assert_eq!(&a[..6], b"070701");
        assert_eq!(&a[6..14], b"00000001");
        assert_eq!(&a[14..22], b"000081ed");
        assert_eq!(&a[54..62], b"00000005");
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..121], b"abcde");
        assert_eq!(&a[124..130], b"070701");
        assert!(a.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
