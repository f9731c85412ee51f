//! `vzdump`: container backups.

fn main() -> std::process::ExitCode {
    vzkit_cli::vzdump::main()
}
