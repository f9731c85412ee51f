//! `pveam`: the appliance (container template) manager.

use std::process::ExitCode;

/// Entry point of the `pveam` binary.
pub fn main() -> ExitCode {
    eprintln!("pveam: not available in this vzkit build yet");
    ExitCode::from(255)
}
