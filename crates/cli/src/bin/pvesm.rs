//! `pvesm`: storage management (status, list, alloc, free, path, prune-backups, extractconfig).

fn main() -> std::process::ExitCode {
    vzkit_cli::pvesm::main()
}
