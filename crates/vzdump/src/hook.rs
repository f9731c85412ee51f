//! The hook script (`--script`): called at each phase of the job and of every guest's backup.
//!
//! Compatibility target: pve-manager 14a22df `run_hook_script`.
//!
//! Command line: `<script> <phase>` for job phases (`job-init`, `job-start`, `job-end`,
//! `job-abort`), `<script> <phase> <mode> <vmid>` for guest phases (`backup-start`,
//! `pre-stop`, `pre-restart`, `post-restart`, `backup-end`, `backup-abort`, `log-end`).
//! Environment: PVE starts from an **empty** environment (`local %ENV`) and sets only
//! `STOREID` (with a storage), `DUMPDIR` (with a dump directory) and, for guest phases,
//! `VMTYPE`, `HOSTNAME`, `TARGET`, `LOGFILE` where known, plus `LC_ALL=C` from
//! `run_command`: not even `PATH`. We run the script through `env -i` with exactly those
//! variables, via the one command runner. Every output line (stdout, then stderr) is logged as
//! `INFO:`; a non-zero exit fails the phase: the guest's backup for guest phases, the job
//! for `job-start`/`job-end`.

use std::sync::Arc;

use vzkit_host::command::{Cmd, Runner};

use crate::error::{Error, Result};
use crate::log::TaskLog;

/// `env`, to run the script with a clean environment.
pub const ENV: &str = "env";

/// What a guest phase tells the script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookTask {
    /// Backup mode (`stop`, `suspend`, `snapshot`).
    pub mode: String,
    /// The guest.
    pub vmid: u32,
    /// `lxc`
    pub vmtype: Option<String>,
    /// The guest's hostname (`CT<vmid>` without one).
    pub hostname: Option<String>,
    /// The archive path (`-` with `--stdout`).
    pub target: Option<String>,
    /// The log file beside the archive.
    pub logfile: Option<String>,
}

/// A phase's argument vector and environment.
pub type HookCommand = (Vec<String>, Vec<(String, String)>);

/// The job's hook script settings.
#[derive(Debug, Clone)]
pub struct HookScript {
    script: Option<String>,
    storage: Option<String>,
    dumpdir: Option<String>,
    runner: Arc<dyn Runner>,
}

impl HookScript {
    /// Hooks of a job (no script: every phase is a no-op).
    #[must_use]
    pub fn new(
        script: Option<String>,
        storage: Option<String>,
        dumpdir: Option<String>,
        runner: Arc<dyn Runner>,
    ) -> Self {
        HookScript {
            script: script.filter(|s| !s.is_empty()),
            storage,
            dumpdir,
            runner,
        }
    }

    /// The argument vector of a phase (without the `env -i` prefix) and its environment.
    #[must_use]
    pub fn argv_and_env(&self, phase: &str, task: Option<&HookTask>) -> Option<HookCommand> {
        let script = self.script.as_ref()?;
        let mut argv = vec![script.clone(), phase.to_string()];
        let mut env = vec![("LC_ALL".to_string(), "C".to_string())];
        if let Some(s) = self.storage.as_ref().filter(|s| !s.is_empty()) {
            env.push(("STOREID".into(), s.clone()));
        }
        if let Some(d) = self.dumpdir.as_ref().filter(|d| !d.is_empty()) {
            env.push(("DUMPDIR".into(), d.clone()));
        }
        if let Some(t) = task {
            argv.push(t.mode.clone());
            argv.push(t.vmid.to_string());
            for (k, v) in [
                ("VMTYPE", &t.vmtype),
                ("HOSTNAME", &t.hostname),
                ("TARGET", &t.target),
                ("LOGFILE", &t.logfile),
            ] {
                if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
                    env.push((k.to_string(), v.clone()));
                }
            }
        }
        Some((argv, env))
    }

    /// Run a phase; a no-op without a script.
    ///
    /// # Errors
    /// "Error: The hook script 'X' does not exist." / "... is not executable.", or
    /// `command '<script> <phase> …' failed: exit code N`.
    pub async fn run(&self, phase: &str, task: Option<&HookTask>, log: &TaskLog) -> Result<()> {
        let Some((argv, env)) = self.argv_and_env(phase, task) else {
            return Ok(());
        };
        let script = &argv[0];
        if !std::path::Path::new(script).is_file() {
            return Err(Error::msg(format!(
                "Error: The hook script '{script}' does not exist."
            )));
        }
        if rustix::fs::access(script.as_str(), rustix::fs::Access::EXEC_OK).is_err() {
            return Err(Error::msg(format!(
                "Error: The hook script '{script}' is not executable."
            )));
        }
        let mut cmd = Cmd::new(ENV).arg("-i");
        for (k, v) in &env {
            cmd = cmd.arg(format!("{k}={v}"));
        }
        let cmd = cmd.args(&argv);
        let out = self.runner.output(&cmd).await?;
        for line in out.stdout_str().lines().chain(out.stderr_str().lines()) {
            log.info(line);
        }
        if !out.success() {
            let shown: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
            return Err(Error::msg(format!(
                "command '{}' failed: {}",
                shown.join(" "),
                out.exit
            )));
        }
        Ok(())
    }
}

/// `String::ShellQuote::shell_quote` for one word (as PVE prints commands and job lines).
#[must_use]
pub fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!%+,-./:=@^_".contains(&b));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzkit_host::command::{Output, RecordingRunner};

    fn hooks(runner: Arc<RecordingRunner>, script: &str) -> HookScript {
        HookScript::new(
            Some(script.to_string()),
            Some("local".into()),
            Some("/var/lib/vz/dump".into()),
            runner,
        )
    }

    #[test]
    fn argv_and_environment() {
        let h = hooks(Arc::new(RecordingRunner::new()), "/usr/local/bin/hook");
        let (argv, env) = h.argv_and_env("job-start", None).unwrap();
        assert_eq!(argv, ["/usr/local/bin/hook", "job-start"]);
        assert_eq!(
            env,
            [
                ("LC_ALL".to_string(), "C".to_string()),
                ("STOREID".into(), "local".into()),
                ("DUMPDIR".into(), "/var/lib/vz/dump".into())
            ]
        );
        let task = HookTask {
            mode: "stop".into(),
            vmid: 100,
            vmtype: Some("lxc".into()),
            hostname: Some("ct100".into()),
            target: Some("/d/x.tar.zst".into()),
            logfile: None,
        };
        let (argv, env) = h.argv_and_env("backup-start", Some(&task)).unwrap();
        assert_eq!(argv, ["/usr/local/bin/hook", "backup-start", "stop", "100"]);
        let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "LC_ALL", "STOREID", "DUMPDIR", "VMTYPE", "HOSTNAME", "TARGET"
            ]
        );
        let none = HookScript::new(None, None, None, Arc::new(RecordingRunner::new()));
        assert!(none.argv_and_env("job-start", None).is_none());
    }

    #[tokio::test]
    async fn runs_through_env_i_and_logs_output() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hook.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let runner = Arc::new(RecordingRunner::new());
        let h = hooks(Arc::clone(&runner), script.to_str().unwrap());
        let log = TaskLog::new(None);
        // Not executable yet.
        let err = h.run("job-init", None, &log).await.unwrap_err();
        assert!(err.to_string().ends_with("is not executable."), "{err}");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        runner.push_reply(Output::ok("hello\n"));
        h.run("job-init", None, &log).await.unwrap();
        assert_eq!(
            runner.calls()[0],
            [
                "env".to_string(),
                "-i".into(),
                "LC_ALL=C".into(),
                "STOREID=local".into(),
                "DUMPDIR=/var/lib/vz/dump".into(),
                script.to_str().unwrap().into(),
                "job-init".into()
            ]
        );
        runner.push_reply(Output::failed(3, "bad\n"));
        let err = h.run("job-end", None, &log).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("command '{} job-end' failed: exit code 3", script.display())
        );
        let missing = hooks(Arc::clone(&runner), "/nonexistent/hook");
        assert_eq!(
            missing
                .run("job-init", None, &log)
                .await
                .unwrap_err()
                .to_string(),
            "Error: The hook script '/nonexistent/hook' does not exist."
        );
    }
}
