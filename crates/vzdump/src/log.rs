//! Log lines as PVE's vzdump writes them (`debugmsg` of `PVE::VZDump::Plugin`).
//!
//! Every message line goes to stderr as `<PRE> <line>` (`INFO:`, `WARN:`, `ERROR:`) and, while a
//! guest's log is open, to that file as `<YYYY-MM-DD HH:MM:SS> <PRE> <line>` (local time).
//! Some lines are task-log only (stderr): "starting new backup job", "Backup started at",
//! "Backup finished at", "Failed at" and the job's end lines. Empty messages are dropped and a
//! trailing newline is removed; a message with several lines becomes several log lines.
//! `--quiet` silences stderr (PVE sends it to /dev/null); the guest log is still written.
//!
//! The log is shared (cheaply cloneable) between the job, its tasks and the progress bar:
//! when a bar is drawn on the terminal, a log line first clears it.
//!
//! Also here: PVE's `format_size` and `format_time`, and GNU tar's `--totals` line.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `INFO:`
    Info,
    /// `WARN:`
    Warn,
    /// `ERROR:`
    Err,
}

impl Level {
    /// The line prefix.
    #[must_use]
    pub fn prefix(self) -> &'static str {
        match self {
            Level::Info => "INFO:",
            Level::Warn => "WARN:",
            Level::Err => "ERROR:",
        }
    }
}

struct Inner {
    stderr: Option<Box<dyn Write + Send>>,
    guest: Option<File>,
    /// A progress bar line is on the terminal and must be cleared first.
    bar_drawn: bool,
    warnings: u64,
    tz: TimeZone,
}

/// The job's log; see the module docs.
#[derive(Clone)]
pub struct TaskLog {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for TaskLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskLog").finish_non_exhaustive()
    }
}

/// `strftime("%F %H:%M:%S", localtime)`.
#[must_use]
pub fn local_time_string(tz: &TimeZone, ts: Timestamp) -> String {
    ts.to_zoned_datetime(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

impl TaskLog {
    /// A log printing to `stderr` (`None`: quiet).
    #[must_use]
    pub fn new(stderr: Option<Box<dyn Write + Send>>) -> Self {
        Self::with_tz(stderr, TimeZone::system())
    }

    /// A log with the given time zone for the guest log's timestamps.
    #[must_use]
    pub fn with_tz(stderr: Option<Box<dyn Write + Send>>, tz: TimeZone) -> Self {
        TaskLog {
            inner: Arc::new(Mutex::new(Inner {
                stderr,
                guest: None,
                bar_drawn: false,
                warnings: 0,
                tz,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while logging leaves the data intact; keep logging.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The time zone of timestamps.
    #[must_use]
    pub fn tz(&self) -> TimeZone {
        self.lock().tz.clone()
    }

    /// Start writing to a guest log (truncating it).
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn open_guest_log(&self, path: &Path) -> std::io::Result<()> {
        let f = File::create(path)?;
        self.lock().guest = Some(f);
        Ok(())
    }

    /// Stop writing to the guest log (flushing it to disk).
    pub fn close_guest_log(&self) {
        if let Some(f) = self.lock().guest.take() {
            // Best effort: the log is copied right after, a failed sync loses nothing more.
            let _ = f.sync_all();
        }
    }

    /// Whether a guest log is open.
    #[must_use]
    pub fn guest_log_open(&self) -> bool {
        self.lock().guest.is_some()
    }

    /// Number of warnings logged so far.
    #[must_use]
    pub fn warnings(&self) -> u64 {
        self.lock().warnings
    }

    fn emit(&self, level: Level, msg: &str, to_guest: bool) {
        let msg = msg.strip_suffix('\n').unwrap_or(msg);
        if msg.is_empty() {
            return;
        }
        let mut g = self.lock();
        if level == Level::Warn {
            g.warnings += 1;
        }
        let ts =
            (to_guest && g.guest.is_some()).then(|| local_time_string(&g.tz, Timestamp::now()));
        let clear = std::mem::take(&mut g.bar_drawn);
        for line in msg.split('\n') {
            if let Some(e) = g.stderr.as_mut() {
                // Write errors on the terminal cannot be reported anywhere.
                if clear {
                    let _ = e.write_all(b"\r\x1b[K");
                }
                let _ = writeln!(e, "{} {line}", level.prefix());
            }
            if let (Some(ts), Some(f)) = (ts.as_deref(), g.guest.as_mut()) {
                // PVE ignores failing log writes too (a full disk must not fail the backup).
                let _ = writeln!(f, "{ts} {} {line}", level.prefix());
            }
        }
        if let Some(e) = g.stderr.as_mut() {
            let _ = e.flush();
        }
    }

    /// Log to stderr and the guest log.
    pub fn log(&self, level: Level, msg: impl AsRef<str>) {
        self.emit(level, msg.as_ref(), true);
    }

    /// `INFO:` to stderr and the guest log.
    pub fn info(&self, msg: impl AsRef<str>) {
        self.log(Level::Info, msg);
    }

    /// `WARN:` to stderr and the guest log.
    pub fn warn(&self, msg: impl AsRef<str>) {
        self.log(Level::Warn, msg);
    }

    /// `ERROR:` to stderr and the guest log.
    pub fn err(&self, msg: impl AsRef<str>) {
        self.log(Level::Err, msg);
    }

    /// A line for the task log (stderr) only.
    pub fn task(&self, level: Level, msg: impl AsRef<str>) {
        self.emit(level, msg.as_ref(), false);
    }

    /// Draw `text` as the progress line (stderr only, overwriting the previous one).
    pub fn draw_bar(&self, text: &str) {
        let mut g = self.lock();
        if let Some(e) = g.stderr.as_mut() {
            let _ = write!(e, "\r\x1b[K{text}");
            let _ = e.flush();
            g.bar_drawn = true;
        }
    }

    /// Remove the progress line.
    pub fn clear_bar(&self) {
        let mut g = self.lock();
        if std::mem::take(&mut g.bar_drawn)
            && let Some(e) = g.stderr.as_mut()
        {
            let _ = e.write_all(b"\r\x1b[K");
            let _ = e.flush();
        }
    }
}

/// PVE's `PVE::VZDump::format_size` (archive sizes in the log): `<1024 KiB` → `NKB`,
/// `<1024 MiB` → `NMB` (truncated), else `N.NNGB` / `N.NNTB`.
#[must_use]
pub fn format_size(size: u64) -> String {
    let kb = size as f64 / 1024.0;
    if kb < 1024.0 {
        return format!("{}KB", kb as u64);
    }
    let mb = kb / 1024.0;
    if mb < 1024.0 {
        return format!("{}MB", mb as u64);
    }
    let gb = mb / 1024.0;
    if gb < 1024.0 {
        return format!("{gb:.2}GB");
    }
    format!("{:.2}TB", gb / 1024.0)
}

/// PVE's `format_time`: `HH:MM:SS` (hours may exceed 99).
#[must_use]
pub fn format_time(seconds: u64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60
    )
}

/// gnulib `human_readable` as GNU tar calls it for `--totals`
/// (`human_autoscale | human_base_1024 | human_SI | human_B`, rounding up): `512B`, `1.5KiB`,
/// `85MiB`.
#[must_use]
pub fn human_1024(amount: f64) -> String {
    const UNITS: [&str; 9] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"];
    let mut v = amount;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        return format!("{}{}", v.ceil() as u64, UNITS[0]);
    }
    if v < 10.0 {
        let tenths = (v * 10.0).ceil() / 10.0;
        if tenths < 10.0 {
            return format!("{tenths:.1}{}", UNITS[i]);
        }
    }
    let n = v.ceil() as u64;
    if n >= 1024 && i + 1 < UNITS.len() {
        return format!("1.0{}", UNITS[i + 1]);
    }
    format!("{n}{}", UNITS[i])
}

/// GNU tar's `--totals` line: `Total bytes written: 536780800 (512MiB, 85MiB/s)`.
#[must_use]
pub fn tar_totals_line(bytes: u64, seconds: f64) -> String {
    let rate = if seconds > 0.0 {
        format!("{}/s", human_1024(bytes as f64 / seconds))
    } else {
        "?/s".to_string()
    };
    format!(
        "Total bytes written: {bytes} ({}, {rate})",
        human_1024(bytes as f64)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_go_to_stderr_and_guest_log_with_timestamps() {
        let buf = Buf::default();
        let log = TaskLog::with_tz(Some(Box::new(buf.clone())), TimeZone::UTC);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lxc-100.log");
        log.task(Level::Info, "starting new backup job: vzdump 100");
        log.open_guest_log(&p).unwrap();
        log.info("Starting Backup of VM 100 (lxc)\n");
        log.task(Level::Info, "Backup started at 2024-01-02 03:04:05");
        log.err("Backup of VM 100 failed - a\nb");
        log.info("");
        log.warn("w");
        log.close_guest_log();
        log.info("after");
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            out,
            "INFO: starting new backup job: vzdump 100\n\
             INFO: Starting Backup of VM 100 (lxc)\n\
             INFO: Backup started at 2024-01-02 03:04:05\n\
             ERROR: Backup of VM 100 failed - a\nERROR: b\nWARN: w\nINFO: after\n"
        );
        let guest = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = guest.lines().collect();
        assert_eq!(lines.len(), 4, "{guest}");
        let re = regex::Regex::new(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|ERROR|WARN): ").unwrap();
        assert!(lines.iter().all(|l| re.is_match(l)), "{guest}");
        assert!(lines[0].ends_with("INFO: Starting Backup of VM 100 (lxc)"));
        assert!(lines[2].ends_with("ERROR: b"));
        assert_eq!(log.warnings(), 1);
    }

    #[test]
    fn quiet_writes_only_the_guest_log() {
        let log = TaskLog::with_tz(None, TimeZone::UTC);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        log.open_guest_log(&p).unwrap();
        log.info("hello");
        log.close_guest_log();
        assert!(
            std::fs::read_to_string(&p)
                .unwrap()
                .ends_with(" INFO: hello\n")
        );
    }

    #[test]
    fn bar_is_cleared_before_a_log_line() {
        let buf = Buf::default();
        let log = TaskLog::with_tz(Some(Box::new(buf.clone())), TimeZone::UTC);
        log.draw_bar("[##  ] 10%");
        log.info("x");
        log.clear_bar();
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out, "\r\x1b[K[##  ] 10%\r\x1b[KINFO: x\n");
    }

    #[test]
    fn pve_sizes_and_times() {
        let cases = [
            (0, "0KB"),
            (1023, "0KB"),
            (1024 * 1023, "1023KB"),
            (1024 * 1024, "1MB"),
            (170 * 1024 * 1024 + 5, "170MB"),
            (1024 * 1024 * 1024, "1.00GB"),
            (1536 * 1024 * 1024, "1.50GB"),
            (1u64 << 40, "1.00TB"),
        ];
        for (n, want) in cases {
            assert_eq!(format_size(n), want, "{n}");
        }
        assert_eq!(format_time(7), "00:00:07");
        assert_eq!(format_time(3600 * 2 + 61), "02:01:01");
    }

    #[test]
    fn gnu_tar_totals() {
        assert_eq!(
            tar_totals_line(536_780_800, 536_780_800.0 / (85.0 * 1048576.0)),
            "Total bytes written: 536780800 (512MiB, 85MiB/s)"
        );
        assert_eq!(human_1024(10240.0), "10KiB");
        assert_eq!(human_1024(512.0), "512B");
        assert_eq!(human_1024(1536.0), "1.5KiB");
        assert_eq!(human_1024(1025.0), "1.1KiB");
        assert_eq!(human_1024(1024.0 * 1023.5), "1.0MiB");
        assert_eq!(
            tar_totals_line(10240, 0.0),
            "Total bytes written: 10240 (10KiB, ?/s)"
        );
    }
}
