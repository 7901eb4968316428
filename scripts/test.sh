#!/usr/bin/env bash
# The test command of the README: installs what the tests need (a Rust
# toolchain is expected; nothing else yet), builds, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "tessera needs a Rust toolchain (cargo); install it with rustup first" >&2
    exit 1
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Snapshots must match exactly in CI (insta fails on a mismatch when CI=true).
export INSTA_UPDATE="${INSTA_UPDATE:-no}"
cargo build --locked --release --bins
cargo test --locked --release --workspace
