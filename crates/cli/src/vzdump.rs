//! `vzdump`: container backups.

use std::process::ExitCode;

/// Entry point of the `vzdump` binary.
pub fn main() -> ExitCode {
    eprintln!("vzdump: container backups are not available in this vzkit build yet");
    ExitCode::from(255)
}
