//! `pveam`: container template download and management.

fn main() -> std::process::ExitCode {
    vzkit_cli::pveam::main()
}
