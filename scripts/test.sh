#!/usr/bin/env bash
# The test command: every test of the workspace, in the one profile CI builds.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
cargo test --release --workspace "$@"
