#!/usr/bin/env bash
# The main job on embedded defaults: build ferry, make a key, pack both
# examples, verify, inspect and run them, and measure drift; then run the edge
# agent on the iris bundle: predictions over HTTP, drift measured on the
# device, a signed update pulled from a local channel; then the fleet demo
# (scripts/fleet-demo.sh: console + embedded broker + dashboard, three agents,
# drift, the retraining trigger, a canary rollout). No setup, no external
# broker, no network, nothing outside temporary directories (kept, and printed).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
cargo build --release --workspace --bins
bin_dir="${CARGO_TARGET_DIR:-target}/release"
ferry="$bin_dir/ferry"
agent="$bin_dir/ferry-agent"
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

# --- The edge agent ----------------------------------------------------------
# HTTP with Python's standard library (curl may not be installed).
http() {
    python3 - "$@" <<'PY'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
data = open(sys.argv[3], "rb").read() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
try:
    print(urllib.request.urlopen(req, timeout=30).read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
PY
}
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
api="http://127.0.0.1:$port"
step "$ferry" publish "$work/iris.ferry" --to "$work/channel" --pub "$work/keys/release.pub"
cat > "$work/agent.toml" <<EOF
# Written by scripts/demo.sh (\`ferry-agent init\` writes a commented default).
[device]
id = "demo-device-1"
fleet = "demo"
[paths]
state_dir = "$work/agent-state"
initial_bundle = "$work/iris.ferry"
trusted_keys = ["$work/keys/release.pub"]
[http]
listen = "127.0.0.1:$port"
[updates]
source = "$work/channel"
poll_interval_s = 1
EOF
say "\$ $agent --config $work/agent.toml --log-format text 2> $work/agent.log &"
"$agent" --config "$work/agent.toml" --log-format text 2> "$work/agent.log" &
agent_pid=$!
trap 'kill $agent_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    http GET "$api/healthz" 2>/dev/null | grep -q '"ok"' && break
    sleep 0.1
done
step http GET "$api/v1/model"
step http POST "$api/v1/predict" examples/iris/golden/setosa.json
say "# 1000 shifted rows, 50 per request: the agent measures drift against the bundle's baseline"
python3 - "$api" <<'PY'
import csv, json, sys, urllib.request
rows = list(csv.DictReader(open("examples/iris/data/current_shifted.csv")))
for i in range(0, len(rows), 50):
    body = json.dumps({"records": [{k: float(v) for k, v in r.items()} for r in rows[i:i + 50]]}).encode()
    req = urllib.request.Request(sys.argv[1] + "/v1/predict", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
PY
for _ in $(seq 1 100); do
    http GET "$api/v1/drift" | grep -q '"features"' && break
    sleep 0.1
done
step http GET "$api/v1/drift"
say "# The same model as sequence 2 on the channel: the agent verifies it, runs its golden examples, activates it"
step "$ferry" pack examples/iris --key "$work/keys/release.key" -o "$work/iris-2.ferry" --sequence 2
step "$ferry" publish "$work/iris-2.ferry" --to "$work/channel" --pub "$work/keys/release.pub"
for _ in $(seq 1 100); do
    http GET "$api/v1/model" | grep -q '"sequence":2' && break
    sleep 0.2
done
step http GET "$api/v1/model"
say "\$ curl $api/metrics   (excerpt)"
http GET "$api/metrics" | grep -E '^ferry_(predictions_total|updates_installed_total|buffer_records|drift_drifted)' || true
kill -TERM "$agent_pid"
wait "$agent_pid" || true
trap - EXIT
printf '\nagent log: %s\n' "$work/agent.log"
printf 'bundles, keys, the channel and the agent state are in %s\n' "$work"

# --- The fleet ---------------------------------------------------------------
# A console with its embedded broker and dashboard, three agents, drift on one
# device, the retraining trigger, a canary rollout (scripts/fleet-demo.sh).
FERRY_DEMO_BIN_DIR="$bin_dir" bash scripts/fleet-demo.sh
