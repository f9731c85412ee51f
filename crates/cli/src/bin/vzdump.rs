//! `vzdump`: container backups. The backup job is not part of this build yet; the binary
//! says so instead of pretending to succeed.

fn main() -> std::process::ExitCode {
    eprintln!("vzdump: container backups are not available in this vzkit build yet");
    std::process::ExitCode::from(255)
}
