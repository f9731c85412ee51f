#!/usr/bin/env bash
# Runs every vzkit test: unit tests anywhere, host integration tests (loop devices, real
# filesystems) when run as root. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --locked
if [ "$(id -u)" != 0 ]; then
    echo "test: not root - host integration tests that need loop devices will refuse to run" >&2
fi
cargo test --workspace --locked -- --test-threads=2
