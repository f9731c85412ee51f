//! `pct`: container management.

fn main() -> std::process::ExitCode {
    vzkit_cli::pct::main()
}
