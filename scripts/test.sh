#!/usr/bin/env bash
# The test command: every test of the workspace, in the one profile CI builds.
# The edge agent's tests run a real MQTT broker (mosquitto, from Debian) and
# make TLS certificates for it with the openssl CLI; the fleet dashboard's
# test loads the page in Debian's headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
missing=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v openssl >/dev/null || missing+=(openssl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing ${missing[*]} (Debian packages) for the edge agent's and the fleet's tests" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The package starts a system broker on port 1883; the tests start their own
# brokers on free loopback ports and do not need it.
cargo test --release --workspace "$@"
