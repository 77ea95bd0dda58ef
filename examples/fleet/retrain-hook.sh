#!/usr/bin/env bash
# The retraining hook of the iris example: retrain -> ferry pack -> ferry-fleet releases submit
# -> ferry-fleet rollout (only when the release needs no approver).
#
#   ferry-fleet serve ... --retrain-hook-cmd "examples/fleet/retrain-hook.sh"
#   examples/fleet/retrain-hook.sh REQUEST_JSON        # or by hand, e.g. after `ferry-fleet retrain --export DIR`
#
# REQUEST_JSON: the episode's request.json (the console passes its path as the last argument,
# and in FERRY_RETRAIN_REQUEST). Steps:
#   1. examples/iris/retrain.py REQUEST_JSON --out <dir next to the request>/retrained-<time>
#   2. ferry pack <dir> --key $FERRY_KEY --sequence N -o <dir>.ferry
#   3. ferry-fleet releases submit <dir>.ferry: the retrained model becomes a release candidate.
#      With a root of trust that has an approver role (ferry root init --approver), it waits there
#      for a second person (ferry-fleet releases show / approve / reject, or the console's page):
#      the hook stops here, and nothing reaches devices without that approval.
#   4. Otherwise (devices trust the builder's key alone): ferry-fleet rollout --release <id>
#        --canary 34% --bake 30s --abort-if 'error_rate>5%' --abort-if 'drift.psi>0.25'
#
# Environment:
#   FERRY_KEY            the builder's signing key file (from `ferry keygen`; the devices' root or
#                        trusted keys hold its .pub)                     [required]
#   FERRY_CONSOLE        the console's URL                              [default: http://127.0.0.1:8080]
#   FERRY_FLEET_TOKEN_FILE  file with an operator's token (ferry-fleet token create --role operator
#                        --name retrain-hook): the audit log names its holder   [or FERRY_FLEET_TOKEN]
#   FERRY_NEXT_SEQUENCE  [release] sequence of the new bundle  [default: the console's registry,
#                        `ferry-fleet releases --next-sequence`]
#   FERRY_BIN_DIR        where ferry and ferry-fleet are                [default: PATH]
#   PYTHON               the Python with examples/requirements.txt       [default: python3]
#
# The rollout command returns once the rollout has started; the console runs it (canaries, bake,
# abort rules) and `ferry-fleet rollouts` / the console page follow it. Exit status: non-zero
# if any step fails (the console records the hook's output in the episode).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
examples="$(dirname "$here")"
request="${1:-${FERRY_RETRAIN_REQUEST:-}}"
[[ -n "$request" ]] || { echo "usage: $0 REQUEST_JSON" >&2; exit 2; }
[[ -f "$request" ]] || { echo "retrain-hook: no such request: $request" >&2; exit 1; }
request="$(cd "$(dirname "$request")" && pwd)/$(basename "$request")"
: "${FERRY_KEY:?retrain-hook: set FERRY_KEY to the signing key file (ferry keygen -o KEYS/release)}"
[[ -r "$FERRY_KEY" ]] || { echo "retrain-hook: cannot read FERRY_KEY=$FERRY_KEY" >&2; exit 1; }
console="${FERRY_CONSOLE:-http://127.0.0.1:8080}"
token_args=()
if [[ -n "${FERRY_FLEET_TOKEN_FILE:-}" ]]; then
    token_args=(--token-file "$FERRY_FLEET_TOKEN_FILE")
elif [[ -z "${FERRY_FLEET_TOKEN:-}" ]]; then
    echo "retrain-hook: set FERRY_FLEET_TOKEN_FILE (or FERRY_FLEET_TOKEN) to an operator's token" >&2
    exit 1
fi
python="${PYTHON:-python3}"

bin() {
    if [[ -n "${FERRY_BIN_DIR:-}" ]]; then echo "$FERRY_BIN_DIR/$1"; else command -v "$1" || echo "$1"; fi
}
ferry="$(bin ferry)"
fleet="$(bin ferry-fleet)"
for b in "$ferry" "$fleet"; do
    command -v "$b" >/dev/null || { echo "retrain-hook: $b not found (set FERRY_BIN_DIR or PATH)" >&2; exit 1; }
done

if ! missing="$("$python" - <<'EOF' 2>&1
import importlib.util, sys
need = ["numpy", "onnx", "onnxruntime", "sklearn", "skl2onnx"]
gone = [m for m in need if importlib.util.find_spec(m) is None]
if gone:
    print(" ".join(gone)); sys.exit(1)
EOF
)"; then
    echo "retrain-hook: $python lacks Python package(s): $missing" >&2
    echo "retrain-hook: install them with: $python -m pip install -r $examples/requirements.txt" >&2
    exit 1
fi

if [[ -n "${FERRY_NEXT_SEQUENCE:-}" ]]; then
    sequence="$FERRY_NEXT_SEQUENCE"
else
    # From the console's release registry, never from what devices report:
    # a forged status claiming a huge sequence cannot push it.
    channel="$("$python" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(next((b["channel"] for b in r.get("bundles", []) if b.get("channel")), "stable"))' "$request")"
    sequence="$("$fleet" releases --console "$console" "${token_args[@]}" --next-sequence --channel "$channel")"
fi

out="$(dirname "$request")/retrained-$(date -u +%Y%m%dT%H%M%SZ)"
bundle="$out.ferry"
echo "retrain-hook: retraining from $request into $out (sequence $sequence)"
"$python" "$examples/iris/retrain.py" "$request" --out "$out" --sequence "$sequence"
"$ferry" pack "$out" --key "$FERRY_KEY" --sequence "$sequence" -o "$bundle"
echo "retrain-hook: submitting $bundle to $console"
submitted="$("$fleet" releases submit "$bundle" --console "$console" "${token_args[@]}" --json)"
read -r release status < <("$python" -c 'import json, sys
r = json.loads(sys.argv[1]); print(r["release"], r["status"])' "$submitted")
if [[ "$status" != "approved" ]]; then
    echo "retrain-hook: release $release is $status: an approver reviews it with"
    echo "  ferry-fleet releases show ${release:0:12}   (or on the console's page)"
    exit 0
fi
echo "retrain-hook: rolling out release $release on $console"
"$fleet" rollout --release "$release" --console "$console" "${token_args[@]}" --canary 34% --bake 30s \
    --abort-if 'error_rate>5%' --abort-if 'drift.psi>0.25'
