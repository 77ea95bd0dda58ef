#!/usr/bin/env bash
# The main job on embedded defaults: build ferry, make a key, pack both
# examples, verify, inspect and run them, and measure drift. No setup, no
# network, nothing outside a temporary directory (kept, and printed, at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
cargo build --release -p ferry
bin_dir="${CARGO_TARGET_DIR:-target}/release"
ferry="$bin_dir/ferry"
work="$(mktemp -d -t ferry-demo.XXXXXX)"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$ferry" keygen -o "$work/keys/release"
step "$ferry" pack examples/iris --key "$work/keys/release.key" -o "$work/iris.ferry"
step "$ferry" pack examples/digits --key "$work/keys/release.key" -o "$work/digits.ferry"
step "$ferry" verify "$work/digits.ferry" --pub "$work/keys/release.pub"
step "$ferry" inspect "$work/digits.ferry"
step "$ferry" run "$work/digits.ferry" --pub "$work/keys/release.pub" --input examples/digits/samples/sample.json
step "$ferry" run "$work/iris.ferry" --pub "$work/keys/release.pub" --input examples/iris/golden/batch.json
step "$ferry" drift "$work/iris.ferry" --pub "$work/keys/release.pub" --data examples/iris/data/current_same.csv
step "$ferry" drift "$work/iris.ferry" --pub "$work/keys/release.pub" --data examples/iris/data/current_shifted.csv
step "$ferry" pack --model examples/iris/model.onnx --key "$work/keys/release.key" -o "$work/iris-raw.ferry"
step "$ferry" run "$work/iris-raw.ferry" --pub "$work/keys/release.pub" --input examples/iris/golden/tensor_request.json
printf '\nbundles and keys are in %s\n' "$work"
