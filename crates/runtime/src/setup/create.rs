//! Guest setup after a container was created from a template (PVE's `post_create_hook`):
//! randomized root crontab minutes, the root password, root's SSH authorized keys and fresh
//! SSH host keys, then the same setup as before each start.
//!
//! Everything is written through [`GuestRoot`], so a template cannot redirect a write out of
//! its root, and `.pve-ignore.<name>` files are honoured.

use vzkit_host::command::{Cmd, Runner};

use super::files::{GuestRoot, Placement};
use super::{Dns, OsType, pre_start};
use crate::conf::CtConfig;
use crate::error::{Result, RuntimeError};

/// `ssh-keygen`
pub const SSH_KEYGEN: &str = "ssh-keygen";
/// `openssl`, used to hash a plain-text root password (`openssl passwd -5`).
pub const OPENSSL: &str = "openssl";

/// The host key types vzkit regenerates when the template has them.
const HOST_KEY_TYPES: &[&str] = &["rsa", "ecdsa", "ed25519"];

/// What `pct create` passes to the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateParams {
    /// Root password: plain text, or already hashed (starting with `$`). `None` locks the
    /// root password (`*`), as PVE does.
    pub password: Option<String>,
    /// `authorized_keys` lines for root.
    pub ssh_public_keys: Option<String>,
}

/// Runs the create-time guest setup. `random` yields random numbers (minutes are taken
/// modulo 59).
///
/// # Errors
/// Detection and setup errors, command failures (`openssl`, `ssh-keygen`), I/O errors.
pub async fn post_create(
    root: &GuestRoot,
    conf: &CtConfig,
    dns: &Dns,
    params: &CreateParams,
    runner: &dyn Runner,
    random: &mut dyn FnMut() -> u32,
) -> Result<OsType> {
    if conf.main.ostype() == Some("unmanaged") {
        return Ok(OsType::Unmanaged);
    }
    randomize_crontab(root, random)?;
    set_root_password(root, params.password.as_deref(), runner).await?;
    if let Some(keys) = &params.ssh_public_keys {
        set_root_authorized_keys(root, keys)?;
    }
    rewrite_ssh_host_keys(root, conf, runner).await?;
    pre_start(root, conf, dns)
}

/// The minute field of a root crontab line replaced (`^\d+(\s+\S+){4}\s+root\s+\S.*$`).
#[must_use]
pub fn randomize_crontab_text(text: &str, random: &mut dyn FnMut() -> u32) -> String {
    let mut out = String::new();
    for line in text.split('\n') {
        let digits = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let rest = &line[digits..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let is_root_entry = digits > 0
            && rest.starts_with(char::is_whitespace)
            && fields.len() >= 6
            && fields[4] == "root";
        if is_root_entry {
            out.push_str(&format!("{}{rest}\n", random() % 59));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    // `split` yields a last empty piece for text ending in a newline.
    if text.ends_with('\n') || text.is_empty() {
        out.pop();
    }
    out
}

fn randomize_crontab(root: &GuestRoot, random: &mut dyn FnMut() -> u32) -> Result<()> {
    let mut files = Vec::new();
    if root.is_file("/etc/crontab") {
        files.push("/etc/crontab".to_string());
    }
    for name in root.list_files("/etc/cron.d")? {
        if name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            files.push(format!("/etc/cron.d/{name}"));
        }
    }
    for f in files {
        if let Some(text) = root.read(&f)? {
            let new = randomize_crontab_text(&text, random);
            if new != text {
                root.write(&f, &new, None)?;
            }
        }
    }
    Ok(())
}

/// Replaces the password field of `user` in a passwd/shadow text; in shadow also the
/// "last change" day.
#[must_use]
pub fn replace_password(text: &str, user: &str, epw: &str, shadow_day: Option<u64>) -> String {
    let prefix = format!("{user}:");
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix(&prefix) {
            let mut fields: Vec<&str> = rest.split(':').collect();
            let day;
            if fields.len() >= 2 {
                fields[0] = epw;
                if let Some(d) = shadow_day {
                    day = d.to_string();
                    fields[1] = &day;
                }
                out.push_str(&prefix);
                out.push_str(&fields.join(":"));
                continue;
            }
        }
        out.push_str(line);
    }
    out
}

async fn set_root_password(
    root: &GuestRoot,
    password: Option<&str>,
    runner: &dyn Runner,
) -> Result<()> {
    if !root.is_file("/etc/passwd") {
        return Ok(());
    }
    let epw = match password {
        Some(p) if p.starts_with('$') => p.to_string(),
        Some(p) => {
            let out = runner
                .run(&Cmd::new(OPENSSL).args(["passwd", "-5", "-stdin"]).stdin(p))
                .await?;
            out.stdout_str().trim().to_string()
        }
        None => "*".to_string(),
    };
    if epw.contains(':') || epw.contains('\n') {
        return Err(RuntimeError::Invalid("invalid password hash".into()));
    }
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    if root.is_file("/etc/shadow") {
        if let Some(text) = root.read("/etc/shadow")? {
            root.write(
                "/etc/shadow",
                &replace_password(&text, "root", &epw, Some(day)),
                None,
            )?;
        }
        if let Some(text) = root.read("/etc/passwd")? {
            root.write(
                "/etc/passwd",
                &replace_password(&text, "root", "x", None),
                None,
            )?;
        }
    } else if let Some(text) = root.read("/etc/passwd")? {
        root.write(
            "/etc/passwd",
            &replace_password(&text, "root", &epw, None),
            None,
        )?;
    }
    Ok(())
}

fn set_root_authorized_keys(root: &GuestRoot, keys: &str) -> Result<()> {
    let home = root
        .read("/etc/passwd")?
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("root:").map(str::to_string))
                .and_then(|rest| rest.split(':').nth(4).map(str::to_string))
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".to_string());
    if !root.is_dir(&home) {
        return Err(RuntimeError::Invalid(format!(
            "home directory '{home}' of root does not exist!"
        )));
    }
    root.make_path(&format!("{home}/.ssh"))?;
    let file = format!("{home}/.ssh/authorized_keys");
    root.modify_file_perms(&file, keys, Placement::Append, Some(0o600))
}

async fn rewrite_ssh_host_keys(
    root: &GuestRoot,
    conf: &CtConfig,
    runner: &dyn Runner,
) -> Result<()> {
    let hostname = conf.main.hostname().unwrap_or("localhost");
    let hostname = hostname.split('.').next().unwrap_or(hostname);
    let wanted: Vec<&str> = HOST_KEY_TYPES
        .iter()
        .copied()
        .filter(|t| root.is_file(&format!("/etc/ssh/ssh_host_{t}_key")))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("vzkit-hostkeys-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| RuntimeError::io("mkdir", &tmp, e))?;
    let res = async {
        for t in wanted {
            let key = tmp.join(format!("ssh_host_{t}_key"));
            let cmd = Cmd::new(SSH_KEYGEN)
                .args(["-q", "-t", t, "-N", "", "-C"])
                .arg(format!("root@{hostname}"))
                .arg("-f")
                .arg(&key);
            runner.run(&cmd).await?;
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| RuntimeError::io("read", p, e))
            };
            let private = read(&key)?;
            let public = read(&key.with_extension("pub"))?;
            let dst = format!("/etc/ssh/ssh_host_{t}_key");
            root.write_with_mode(&dst, &private, 0o600)?;
            root.write_with_mode(&format!("{dst}.pub"), &public, 0o644)?;
        }
        Ok::<(), RuntimeError>(())
    }
    .await;
    if let Err(e) = std::fs::remove_dir_all(&tmp) {
        // The keys are in the guest already; a leftover temp dir is only worth a note.
        eprintln!("unable to remove '{}': {e}", tmp.display());
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::RootOwner;
    use std::os::unix::fs::PermissionsExt;
    use vzkit_host::command::SystemRunner;

    #[test]
    fn crontab_minutes_of_root_entries_change() {
        let text = "SHELL=/bin/sh\n17 *\t* * *\troot    cd / && run-parts --report /etc/cron.hourly\n\
                    25 6 * * * user job\n";
        let mut n = 60;
        let out = randomize_crontab_text(text, &mut || {
            n += 1;
            n
        });
        assert_eq!(
            out,
            "SHELL=/bin/sh\n2 *\t* * *\troot    cd / && run-parts --report /etc/cron.hourly\n\
             25 6 * * * user job\n"
        );
    }

    #[test]
    fn passwords_are_replaced_per_file_kind() {
        let shadow = "root:!:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n";
        assert_eq!(
            replace_password(shadow, "root", "$5$x$y", Some(20000)),
            "root:$5$x$y:20000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n"
        );
        let passwd = "root:x:0:0:root:/root:/bin/bash\nrootless:x:1:1::/:/bin/sh\n";
        assert_eq!(
            replace_password(passwd, "root", "*", None),
            "root:*:0:0:root:/root:/bin/bash\nrootless:x:1:1::/:/bin/sh\n"
        );
    }

    #[tokio::test]
    async fn post_create_sets_password_keys_and_host_keys() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["etc/ssh", "etc/cron.d", "root"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let files = [
            ("etc/debian_version", "12.5\n"),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
            ("etc/ssh/ssh_host_ed25519_key", "OLD\n"),
            ("etc/ssh/ssh_host_ed25519_key.pub", "OLD\n"),
            (
                "etc/cron.d/e2scrub_all",
                "30 3 * * 0 root test -e /run/systemd/system\n",
            ),
        ];
        for (p, t) in files {
            std::fs::write(r.join(p), t).unwrap();
        }
        let g = GuestRoot::open(r, RootOwner::default()).unwrap();
        let conf = CtConfig::parse(
            100,
            "arch: amd64\nhostname: web.example\nostype: debian\nrootfs: local:1\n",
        )
        .unwrap()
        .0;
        let params = CreateParams {
            password: Some("secret".into()),
            ssh_public_keys: Some("ssh-ed25519 AAAAC3Nza test@host".into()),
        };
        let os = post_create(
            &g,
            &conf,
            &Dns::default(),
            &params,
            &SystemRunner,
            &mut || 5,
        )
        .await
        .unwrap();
        assert_eq!(os, OsType::Debian);
        let shadow = std::fs::read_to_string(r.join("etc/shadow")).unwrap();
        let hash = shadow.split(':').nth(1).unwrap();
        assert!(hash.starts_with("$5$"), "{shadow}");
        // The hash verifies against the password.
        let salt = hash.split('$').nth(2).unwrap();
        let again = SystemRunner
            .run(
                &Cmd::new(OPENSSL)
                    .args(["passwd", "-5", "-salt", salt, "-stdin"])
                    .stdin("secret"),
            )
            .await
            .unwrap()
            .stdout_str();
        assert_eq!(again.trim(), hash);
        let ak = r.join("root/.ssh/authorized_keys");
        assert_eq!(
            std::fs::metadata(&ak).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(&ak).unwrap(),
            "# --- BEGIN PVE ---\nssh-ed25519 AAAAC3Nza test@host\n# --- END PVE ---\n"
        );
        let key = std::fs::read_to_string(r.join("etc/ssh/ssh_host_ed25519_key")).unwrap();
        assert!(
            key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
            "{key}"
        );
        let public = std::fs::read_to_string(r.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
        assert!(public.trim_end().ends_with("root@web"), "{public}");
        let mode = std::fs::metadata(r.join("etc/ssh/ssh_host_ed25519_key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private host keys are 0600");
        assert_eq!(
            std::fs::read_to_string(r.join("etc/cron.d/e2scrub_all")).unwrap(),
            "5 3 * * 0 root test -e /run/systemd/system\n"
        );
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "web\n"
        );
    }
}
