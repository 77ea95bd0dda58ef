#!/usr/bin/env bash
# Builds the lean `ferry-agent` for devices (docs/devices.md): no guest
# compiler (guests come precompiled in the bundle: native code, or Pulley
# bytecode on armv7), the `device` profile (stripped, fat LTO), and a glibc
# floor of 2.28 (Debian 10, Ubuntu 20.04, Raspberry Pi OS bullseye and later)
# through cargo-zigbuild, with zig from PyPI.
#
#   scripts/device-build.sh [x86_64|aarch64|armv7]...   (default: all three)
#
# Installs what it needs (pip: ziglang, cargo-zigbuild; rustup targets) and
# prints one line per architecture: `ARCH PATH`. Uses CARGO_TARGET_DIR like
# any cargo build; each target has its own directory in it
# (<target-dir>/<triple>/device/ferry-agent).
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.28
# Versions the builds were checked with (docs/devices.md).
ZIGLANG=0.17.1
ZIGBUILD=0.24.1

triple() {
    case "$1" in
        x86_64) echo x86_64-unknown-linux-gnu ;;
        aarch64) echo aarch64-unknown-linux-gnu ;;
        armv7) echo armv7-unknown-linux-gnueabihf ;;
        *) echo "unknown architecture $1 (x86_64, aarch64, armv7)" >&2; exit 2 ;;
    esac
}

archs=("$@")
[ "${#archs[@]}" -gt 0 ] || archs=(x86_64 aarch64 armv7)

if ! command -v cargo-zigbuild >/dev/null || ! python3 -m ziglang version >/dev/null 2>&1; then
    echo "installing ziglang $ZIGLANG and cargo-zigbuild $ZIGBUILD (PyPI)" >&2
    python3 -m pip install --quiet "ziglang==$ZIGLANG" "cargo-zigbuild==$ZIGBUILD" >&2
fi
for arch in "${archs[@]}"; do
    t=$(triple "$arch")
    rustup target list --installed | grep -qx "$t" || rustup target add "$t" >&2
done

target_dir=${CARGO_TARGET_DIR:-target}
for arch in "${archs[@]}"; do
    t=$(triple "$arch")
    # `-p` on purpose: the agent's features alone (no `compiler`), not the
    # workspace's union.
    cargo zigbuild --profile device --target "$t.$GLIBC" \
        -p ferry-agent --no-default-features --bin ferry-agent >&2
    echo "$arch $target_dir/$t/device/ferry-agent"
done
