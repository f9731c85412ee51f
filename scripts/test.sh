#!/usr/bin/env bash
# Runs every vzkit test: unit tests anywhere, host integration tests (loop devices, real
# filesystems) when run as root. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The end-to-end tests run the built binaries, so build them first.
cargo build --workspace --locked
if [ "$(id -u)" = 0 ]; then
    # As root, also run the tests that need loop devices and mounts (marked #[ignore] with
    # that reason, so that an unprivileged `cargo test` stays green).
    cargo test --workspace --locked -- --include-ignored --test-threads=2
else
    echo "test: not root - skipping the tests that need loop devices and mounts" >&2
    cargo test --workspace --locked -- --test-threads=2
fi
