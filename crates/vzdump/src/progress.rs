//! The progress bar on a terminal: archived bytes, rate, and an ETA estimated from the used
//! size of the archived volumes. Off the terminal (and with `--quiet`) only the log lines are
//! printed; the bar never goes into the guest log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::log::{TaskLog, format_time};
use crate::pipeline::Counters;

const WIDTH: usize = 24;
const TICK: Duration = Duration::from_millis(250);

/// Binary units with one decimal (`1.5 GiB`).
#[must_use]
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{} B", v as u64)
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// One frame: `[######      ]  1.2 GiB / 4.0 GiB  30%  85.0 MiB/s  ETA 00:00:33`. Without an
/// estimate (`total == 0`) only bytes and rate; the percentage stays below 100 while running
/// (tar headers make the stream a little larger than the data).
#[must_use]
pub fn render(done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let rate_s = format!("{}/s", human(rate));
    if total == 0 {
        return format!("{}  {rate_s}", human(done as f64));
    }
    let frac = (done as f64 / total as f64).min(0.99);
    let filled = (frac * WIDTH as f64) as usize;
    let bar = format!("[{}{}]", "#".repeat(filled), " ".repeat(WIDTH - filled));
    let eta = if rate > 0.0 && done < total {
        format_time(((total - done) as f64 / rate).ceil() as u64)
    } else {
        "--:--:--".to_string()
    };
    format!(
        "{bar} {} / {}  {:>2}%  {rate_s}  ETA {eta}",
        human(done as f64),
        human(total as f64),
        (frac * 100.0) as u64
    )
}

/// A running progress bar; stops (and clears its line) on [`ProgressBar::finish`] or drop.
#[derive(Debug)]
pub struct ProgressBar {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    log: TaskLog,
}

impl ProgressBar {
    /// Start drawing every 250 ms.
    #[must_use]
    pub fn start(log: TaskLog, counters: Arc<Counters>, total: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, l) = (Arc::clone(&stop), log.clone());
        let start = Instant::now();
        let handle = std::thread::Builder::new()
            .name("vzdump-progress".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    let done = counters.tar_bytes.load(Ordering::Relaxed);
                    l.draw_bar(&render(done, total, start.elapsed()));
                }
            })
            .ok();
        ProgressBar { stop, handle, log }
    }

    /// Stop and clear the bar.
    pub fn finish(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // The drawing thread only sleeps and draws; a panic there loses only the bar.
            let _ = h.join();
        }
        self.log.clear_bar();
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let gib = 1u64 << 30;
        assert_eq!(
            render(gib, 4 * gib, Duration::from_secs(10)),
            "[######                  ] 1.0 GiB / 4.0 GiB  25%  102.4 MiB/s  ETA 00:00:30"
        );
        assert_eq!(
            render(5 * gib, 4 * gib, Duration::from_secs(10)),
            "[####################### ] 5.0 GiB / 4.0 GiB  99%  512.0 MiB/s  ETA --:--:--"
        );
        assert_eq!(
            render(1536, 0, Duration::from_secs(1)),
            "1.5 KiB  1.5 KiB/s"
        );
        assert_eq!(
            render(0, 10, Duration::ZERO).split("  ").last(),
            Some("ETA --:--:--")
        );
        assert_eq!(human(12.0), "12 B");
    }
}
