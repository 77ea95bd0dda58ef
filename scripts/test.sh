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
# The onnxruntime engine's tests use the real libonnxruntime from the PyPI
# wheel (the library only: no Python at run time), cached in the target
# directory; FERRY_REQUIRE_ONNXRUNTIME=1 makes a test fail, not skip, when the
# library is missing. A FERRY_ONNXRUNTIME already set is used as it is.
if [ -z "${FERRY_ONNXRUNTIME:-}" ]; then
    ort_dir="${CARGO_TARGET_DIR:-target}/onnxruntime"
    lib="$(ls "$ort_dir"/libonnxruntime.so.1.* 2>/dev/null | head -n 1 || true)"
    if [ -z "$lib" ]; then
        echo "fetching the onnxruntime wheel (PyPI) for the onnxruntime engine's tests" >&2
        mkdir -p "$ort_dir/wheel"
        python3 -m pip download --quiet "onnxruntime==1.32.0" --no-deps --only-binary=:all: -d "$ort_dir/wheel"
        python3 - "$ort_dir" <<'PY'
import glob, re, sys, zipfile
out = sys.argv[1]
wheel = sorted(glob.glob(out + "/wheel/onnxruntime-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if re.fullmatch(r"onnxruntime/capi/libonnxruntime\.so\.1\.[0-9.]+", n))
    with open(out + "/" + name.rsplit("/", 1)[1], "wb") as f:
        f.write(z.read(name))
PY
        lib="$(ls "$ort_dir"/libonnxruntime.so.1.* | head -n 1)"
    fi
    export FERRY_ONNXRUNTIME="$(cd "$(dirname "$lib")" && pwd)/$(basename "$lib")"
fi
export FERRY_REQUIRE_ONNXRUNTIME=1
# Tests that load onnxruntime in their own process (runtime/tests) keep its
# telemetry store out of the machine's home too; the binaries turn it off
# themselves (a test checks it with the variable removed).
export ORT_DISABLE_TELEMETRY=1
# The package starts a system broker on port 1883; the tests start their own
# brokers on free loopback ports and do not need it.
cargo test --release --workspace "$@"
