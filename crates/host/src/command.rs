//! The one way vzkit runs external commands.
//!
//! Rules: argument vectors only (never `sh -c`), `LC_ALL=C` so that tools print parseable
//! English, an optional timeout, and cancellation: dropping a running command's future kills
//! the child. A failure names the argument vector, the exit status or signal, and the tail
//! of stderr, matching PVE's `command '…' failed: exit code N` wording.
//!
//! Code above this layer talks to a [`Runner`]. [`SystemRunner`] executes for real;
//! [`RecordingRunner`] records argument vectors and replays canned outputs, so unit tests can
//! assert the exact commands a backend issues.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// A command to run: program, arguments, and how to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    timeout: Option<Duration>,
    stdin: Option<Vec<u8>>,
    env: Vec<(OsString, OsString)>,
}

impl Cmd {
    /// A command running `program` (a name looked up on `PATH`, or a path).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            timeout: None,
            stdin: None,
            env: Vec::new(),
        }
    }

    /// Appends one argument.
    #[must_use]
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends several arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Kills the command after `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Feeds `data` to the command's standard input.
    #[must_use]
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Sets an environment variable for the command.
    #[must_use]
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The program and arguments, lossily converted to strings.
    #[must_use]
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }
}

impl fmt::Display for Cmd {
    /// Shell-quoted, as PVE prints commands in error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quoted: Vec<String> = self.argv().iter().map(|a| shell_quote(a)).collect();
        f.write_str(&quoted.join(" "))
    }
}

fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "got signal {s}"),
        }
    }
}

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub exit: Exit,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// A successful output with `stdout`.
    #[must_use]
    pub fn ok(stdout: impl Into<Vec<u8>>) -> Self {
        Self {
            exit: Exit::Code(0),
            stdout: stdout.into(),
            stderr: Vec::new(),
        }
    }

    /// A failed output with exit `code` and `stderr`.
    #[must_use]
    pub fn failed(code: i32, stderr: impl Into<Vec<u8>>) -> Self {
        Self {
            exit: Exit::Code(code),
            stdout: Vec::new(),
            stderr: stderr.into(),
        }
    }

    /// Whether the command exited with code 0.
    #[must_use]
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// Stdout as (lossy) UTF-8.
    #[must_use]
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as (lossy) UTF-8, trimmed.
    #[must_use]
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// A command that could not be run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started.
    #[error("command '{cmd}' failed to start: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("command '{cmd}' failed: {exit}{}", stderr_suffix(.stderr))]
    Failed {
        /// The command line.
        cmd: String,
        /// How it ended.
        exit: Exit,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The program did not finish in time and was killed.
    #[error("command '{cmd}' failed: got timeout after {secs} s")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The timeout in seconds.
        secs: u64,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

impl CommandError {
    /// The stderr of a failed command ("" otherwise).
    #[must_use]
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// Runs commands. Implemented by [`SystemRunner`] (for real) and [`RecordingRunner`] (tests).
#[async_trait::async_trait]
pub trait Runner: Send + Sync + fmt::Debug {
    /// Runs `cmd` to completion and returns its output whatever the exit status.
    ///
    /// # Errors
    /// [`CommandError::Spawn`] or [`CommandError::Timeout`].
    async fn output(&self, cmd: &Cmd) -> Result<Output, CommandError>;

    /// Runs `cmd` and requires exit code 0.
    ///
    /// # Errors
    /// As [`Runner::output`], plus [`CommandError::Failed`] for a non-zero exit.
    async fn run(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        let out = self.output(cmd).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(CommandError::Failed {
                cmd: cmd.to_string(),
                exit: out.exit,
                stderr: out.stderr_str(),
            })
        }
    }

    /// Runs `cmd`, requires success, and returns stdout as a string.
    ///
    /// # Errors
    /// As [`Runner::run`].
    async fn run_stdout(&self, cmd: &Cmd) -> Result<String, CommandError> {
        Ok(self.run(cmd).await?.stdout_str())
    }
}

/// Runs commands on this host.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

#[async_trait::async_trait]
impl Runner for SystemRunner {
    async fn output(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        let mut command = tokio::process::Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .env("LC_ALL", "C")
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &cmd.env {
            command.env(k, v);
        }
        let mut child = command.spawn().map_err(|source| CommandError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
        if let (Some(data), Some(mut stdin)) = (cmd.stdin.clone(), child.stdin.take()) {
            tokio::spawn(async move {
                // A child that exits without reading all input is not an error here; its exit
                // status tells.
                let _ = stdin.write_all(&data).await;
            });
        }
        let wait = child.wait_with_output();
        let out = match cmd.timeout {
            Some(t) => match tokio::time::timeout(t, wait).await {
                Ok(r) => r,
                // Dropping the future drops the child, which kills it (kill_on_drop).
                Err(_) => {
                    return Err(CommandError::Timeout {
                        cmd: cmd.to_string(),
                        secs: t.as_secs(),
                    });
                }
            },
            None => wait.await,
        }
        .map_err(|source| CommandError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
        use std::os::unix::process::ExitStatusExt;
        let exit = match (out.status.code(), out.status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(-1),
        };
        Ok(Output {
            exit,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// Runs `cmd` in the foreground with this process's stdin, stdout and stderr (for
/// interactive tools such as `lxc-attach` and `lxc-console`) and returns how it ended.
/// The timeout and stdin data of `cmd` are not used.
///
/// # Errors
/// [`CommandError::Spawn`] when the program cannot be started.
pub fn run_foreground(cmd: &Cmd) -> Result<Exit, CommandError> {
    let mut command = std::process::Command::new(&cmd.program);
    command.args(&cmd.args);
    for (k, v) in &cmd.env {
        command.env(k, v);
    }
    let status = command.status().map_err(|source| CommandError::Spawn {
        cmd: cmd.to_string(),
        source,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Code(-1),
    })
}

/// A test double: records every command's argument vector and answers from a queue of
/// canned outputs (success with empty output when the queue is empty).
#[derive(Debug, Default)]
pub struct RecordingRunner {
    calls: Mutex<Vec<Vec<String>>>,
    replies: Mutex<VecDeque<Output>>,
}

impl RecordingRunner {
    /// A runner with no canned replies.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues the output returned for the next unanswered command.
    pub fn push_reply(&self, out: Output) {
        lock(&self.replies).push_back(out);
    }

    /// The argument vectors run so far.
    #[must_use]
    pub fn calls(&self) -> Vec<Vec<String>> {
        lock(&self.calls).clone()
    }

    /// The command lines run so far, space-joined (handy for assertions).
    #[must_use]
    pub fn call_lines(&self) -> Vec<String> {
        self.calls().iter().map(|c| c.join(" ")).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait::async_trait]
impl Runner for RecordingRunner {
    async fn output(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        lock(&self.calls).push(cmd.argv());
        Ok(lock(&self.replies)
            .pop_front()
            .unwrap_or_else(|| Output::ok(Vec::new())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_real_commands_with_lc_all_c() {
        let out = SystemRunner
            .run(&Cmd::new("sh").args(["-c", "echo $LC_ALL"]))
            .await
            .unwrap();
        assert_eq!(out.stdout_str(), "C\n");
    }

    #[tokio::test]
    async fn failure_names_command_status_and_stderr() {
        let err = SystemRunner
            .run(&Cmd::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "command 'sh -c 'echo oops >&2; exit 3'' failed: exit code 3: oops"
        );
    }

    #[tokio::test]
    async fn signals_are_reported() {
        let err = SystemRunner
            .run(&Cmd::new("sh").args(["-c", "kill -9 $$"]))
            .await
            .unwrap_err();
        assert!(err.to_string().ends_with("failed: got signal 9"), "{err}");
    }

    #[tokio::test]
    async fn timeout_kills_the_child() {
        let start = std::time::Instant::now();
        let err = SystemRunner
            .run(
                &Cmd::new("sleep")
                    .arg("30")
                    .timeout(Duration::from_millis(200)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn stdin_is_fed() {
        let out = SystemRunner
            .run(&Cmd::new("cat").stdin("hello"))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"hello");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = SystemRunner
            .run(&Cmd::new("/nonexistent/vzkit-nothing"))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn recording_runner_records_and_replays() {
        let r = RecordingRunner::new();
        r.push_reply(Output::failed(1, "no such pool"));
        let err = r
            .run(&Cmd::new("zpool").args(["list", "tank"]))
            .await
            .unwrap_err();
        assert_eq!(err.stderr(), "no such pool");
        r.run(&Cmd::new("true")).await.unwrap();
        assert_eq!(r.call_lines(), vec!["zpool list tank", "true"]);
    }
}
