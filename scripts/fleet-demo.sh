#!/usr/bin/env bash
# The fleet demo, on one machine with no setup: packs the iris example, starts
# the fleet console with its embedded MQTT broker and dashboard, three real
# `ferry-agent` processes, feeds them traffic, shifts one device's data so drift
# appears, shows the retraining trigger firing (a hook script writes the
# request), then rolls out a v2 bundle to a canary and then the whole fleet.
# Prints what happens and the dashboard URL; Ctrl-C stops everything (without a
# terminal it stops by itself at the end). Nothing outside a temporary
# directory (kept, and printed).
set -euo pipefail
cd "$(dirname "$0")/.."
# FERRY_DEMO_BIN_DIR: use binaries already built there (the fleet's tests run
# this script that way); otherwise build them.
if [ -n "${FERRY_DEMO_BIN_DIR:-}" ]; then
    bin_dir="$FERRY_DEMO_BIN_DIR"
else
    rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
    cargo build --release --workspace --bins
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
ferry="$bin_dir/ferry"
agent="$bin_dir/ferry-agent"
fleet="$bin_dir/ferry-fleet"
work="$(mktemp -d -t ferry-fleet-demo.XXXXXX)"
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
get() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())' "$1"; }
# GET with the console's token (every route but /healthz needs one).
get_api() { python3 -c 'import os, sys, urllib.request; r = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["FERRY_FLEET_TOKEN"]}); print(urllib.request.urlopen(r, timeout=30).read().decode())' "$1"; }
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    printf '\neverything (bundles, keys, console state, agents, logs) is in %s\n' "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "# A release key and the iris bundle (fleet demo, sequence 1)"
step "$ferry" keygen -o "$work/keys/release"
step "$ferry" pack examples/iris --key "$work/keys/release.key" -o "$work/iris-v1.ferry" --fleet demo --sequence 1

broker_port="$(free_port)"
console_port="$(free_port)"
console="http://127.0.0.1:$console_port"
cat > "$work/retrain-hook.sh" <<'EOF'
#!/bin/sh
# Called by the console with the retraining request (JSON) as its argument. In
# production: trigger a CI pipeline or an Airflow DAG that retrains, packs and rolls out.
echo "retraining requested: $1" >> "$(dirname "$1")/../../hook.log"
EOF
chmod +x "$work/retrain-hook.sh"

say "# The console: embedded broker (loopback, no auth: demo only), dashboard, rollouts, retraining hook"
"$fleet" --log-format text serve --embedded-broker "127.0.0.1:$broker_port" --fleet demo \
    --listen "127.0.0.1:$console_port" --state "$work/console" \
    --trust "$work/keys/release.pub" --key "$work/keys/release.key" \
    --retrain-hook-cmd "$work/retrain-hook.sh" --retrain-calm 30s \
    > "$work/console.out" 2> "$work/console.log" &
pids+=($!)
for _ in $(seq 1 300); do get "$console/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
# The console wrote its first admin token at its first start (mode 0600).
admin_token="$work/console/admin.token"
for _ in $(seq 1 100); do [ -s "$admin_token" ] && break; sleep 0.1; done
export FERRY_FLEET_TOKEN="$(cat "$admin_token")"
echo "dashboard: $console/  (log in with the token in $admin_token)"

say "# The admin enrols the three devices (the console follows enrolled devices only)"
step "$fleet" enrol device-1 device-2 device-3 --console "$console"

say "# Three devices running ferry-agent"
agent_ports=()
for i in 1 2 3; do
    port="$(free_port)"
    agent_ports+=("$port")
    mkdir -p "$work/device-$i"
    cat > "$work/device-$i/agent.toml" <<EOF
[device]
id = "device-$i"
fleet = "demo"
[paths]
state_dir = "$work/device-$i/state"
initial_bundle = "$work/iris-v1.ferry"
trusted_keys = ["$work/keys/release.pub"]
[http]
listen = "127.0.0.1:$port"
[mqtt]
url = "mqtt://127.0.0.1:$broker_port"
status_interval_s = 2
[drift]
window_predictions = 200
[telemetry]
sample_rate = 0.2
EOF
    "$agent" --config "$work/device-$i/agent.toml" --log-format text 2> "$work/device-$i/agent.log" &
    pids+=($!)
done
for port in "${agent_ports[@]}"; do
    for _ in $(seq 1 300); do get "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
done
echo "agents on ports ${agent_ports[*]}"

# Sends rows of an iris CSV to a device, 50 per request.
traffic() {
    python3 - "$1" "$2" "$3" <<'PY'
import csv, json, sys, urllib.request
port, path, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(path)))[start:start + 600]
for i in range(0, len(rows), 50):
    body = json.dumps({"records": [{k: float(v) for k, v in r.items()} for r in rows[i:i + 50]]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body,
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
PY
}

say "# Traffic: devices 1 and 2 see data like the training data; device 3's data shifts"
traffic "${agent_ports[0]}" examples/iris/data/current_same.csv 0
traffic "${agent_ports[1]}" examples/iris/data/current_same.csv 200
traffic "${agent_ports[2]}" examples/iris/data/current_shifted.csv 0

say "# The console sees the drift (fleet-wide, weighted by traffic)"
for _ in $(seq 1 150); do
    [ -s "$work/console/hook.log" ] && break
    sleep 0.2
done
python3 - "$console" <<'PY'
import json, os, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/fleet-drift",
                             headers={"Authorization": "Bearer " + os.environ["FERRY_FLEET_TOKEN"]})
d = json.load(urllib.request.urlopen(req, timeout=30))
d = d.get("drift", d)
for f in d.get("features", []):
    print(f"  {f['name']:<14} drifting on {100 * f['share']:5.1f}% of traffic: {', '.join(f.get('devices', [])) or '-'}")
PY
if [ -s "$work/console/hook.log" ]; then
    say "# The retraining trigger fired (once): the hook got the request and the data set"
    cat "$work/console/hook.log"
    request="$(sed -n 's/^retraining requested: //p' "$work/console/hook.log" | head -1)"
    python3 - "$request" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
print("  features:", ", ".join(f"{f['name']} ({100 * f['share']:.0f}% of traffic)" for f in r["features"]))
print("  devices: ", ", ".join(d["device"] if isinstance(d, dict) else d for d in r["devices"]))
print("  data set:", r["rows"], "rows in", r["samples_csv"])
PY
    ls -l "$(dirname "$request")"
else
    say "# The retraining trigger did not fire yet (see $work/console.log)"
fi

say "# Release v2 (here: the same model retrained, packed as sequence 2), rolled out: canary first, then everyone"
step "$ferry" pack examples/iris --key "$work/keys/release.key" -o "$work/iris-v2.ferry" --fleet demo --sequence 2
# The shifted device's sensor is fixed: its traffic is back to normal.
traffic "${agent_ports[2]}" examples/iris/data/current_same.csv 400 &
say "# The admin makes an operator's token (shown once); the audit log will name its holder"
"$fleet" token create --name demo-operator --role operator --console "$console" > "$work/operator.token"
chmod 600 "$work/operator.token"
echo "demo-operator's token is in $work/operator.token"
step "$fleet" rollout "$work/iris-v2.ferry" --console "$console" --token-file "$work/operator.token" \
    --canary 34% --bake 5s --abort-if 'error_rate>5%' --abort-if 'failed_installs>0'
for _ in $(seq 1 120); do
    phase="$("$fleet" rollouts --console "$console" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["rollouts"][-1]["phase"]["phase"])')"
    case "$phase" in done|aborted) break ;; esac
    sleep 1
done
wait %% 2>/dev/null || true
step "$fleet" rollouts --console "$console"
step "$fleet" status --broker "mqtt://127.0.0.1:$broker_port" --fleet demo

say "# Dashboard: $console/   (live: devices, drift heat map, rates, events, rollouts; log in with the token in $admin_token)"
if [ -t 0 ]; then
    echo "Ctrl-C stops the console and the agents."
    wait
fi
