#!/usr/bin/env bash
# Tests the Debian packages on this machine (root; docs/devices.md):
#
#   scripts/deb-test.sh AGENT_BINARY FERRY_BINARY [ARCH]
#
# Builds ferry-agent 0.0.1 and 0.0.2 for ARCH (x86_64, aarch64 or armv7;
# default: this machine's) and ferry (this machine's) from the binaries given,
# then: checks the agent package's metadata (Architecture, Depends on the
# glibc the binary needs, the file list); installs ferry and ferry-agent 0.0.1
# (system user, state directory, hardened unit, conffile: the maintainer
# scripts run for real); configures the device; runs the installed agent as
# its user outside systemd (`check-config`, one prediction); upgrades to 0.0.2
# (edited configuration, keys and state kept; still serves); `dpkg -r`
# (configuration and state kept) and `dpkg --purge` (both gone). Ends with
# "deb: N passed, N failed"; exits 1 on a failure.
#
# An ARM package on an x86_64 machine is installed with
# `dpkg --force-architecture --force-depends` (this machine has no
# libc6:arm64; the Depends line is checked in the metadata instead) and the
# installed binary runs under qemu-user with the cross glibc
# (`qemu-aarch64 -L /usr/aarch64-linux-gnu`, `qemu-arm -L /usr/arm-linux-gnueabihf`:
# Debian's qemu-user and libc6-{arm64,armhf}-cross). FERRY_DEB_GLIBC, when
# set, is the glibc floor the agent package must declare (2.28 for the
# device builds of scripts/device-build.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
# gzip: fast on the test's unstripped binaries (the packages default to xz).
export DEB_COMPRESSION=${DEB_COMPRESSION:-gzip}
agent_bin=$1 ferry_bin=$2
host=$(uname -m)
arch=${3:-$host}
[ "$(id -u)" -eq 0 ] || { echo "deb-test: run as root (dpkg -i)" >&2; exit 1; }
for p in ferry-agent ferry; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -qv "not-installed"; then
        echo "deb-test: $p is installed on this machine; refusing to replace it" >&2
        exit 1
    fi
done
# How the installed agent runs here, and how dpkg takes its package.
run=() force=()
if [ "$arch" != "$host" ]; then
    case "$arch" in
        aarch64) run=(qemu-aarch64 -L /usr/aarch64-linux-gnu) deb_arch=arm64 ;;
        armv7) run=(qemu-arm -L /usr/arm-linux-gnueabihf) deb_arch=armhf ;;
        *) echo "deb-test: cannot run $arch binaries on $host" >&2; exit 2 ;;
    esac
    command -v "${run[0]}" >/dev/null && [ -d "${run[2]}/lib" ] ||
        { echo "deb-test: needs ${run[0]} (qemu-user) and ${run[2]} (libc6-$deb_arch-cross)" >&2; exit 1; }
    force=(--force-architecture --force-depends)
fi
work=$(mktemp -d)
agent_pid=""
pass=0 fail=0
cleanup() {
    [ -z "$agent_pid" ] || kill "$agent_pid" 2>/dev/null
    dpkg --purge ferry-agent ferry >/dev/null 2>&1
    rm -rf /etc/ferry/keys/deb-test.pub /etc/ferry/initial.ferry "$work"
    rmdir /etc/ferry/keys /etc/ferry 2>/dev/null
}
trap cleanup EXIT
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then
        pass=$((pass + 1))
        echo "ok: $what"
    else
        fail=$((fail + 1))
        echo "FAILED: $what" >&2
    fi
}
must() { "$@" || { echo "deb-test: setup step failed: $*" >&2; exit 1; }; }

must scripts/deb.sh agent "$arch" "$agent_bin" 0.0.1 "$work/old" >/dev/null
new=$(must scripts/deb.sh agent "$arch" "$agent_bin" 0.0.2 "$work/new")
old=$(ls "$work"/old/*.deb)
ferry_deb=$(must scripts/deb.sh ferry "$host" "$ferry_bin" 0.0.2 "$work/ferry")

# The agent package's metadata and contents.
deb_arch=$(dpkg-deb -f "$old" Architecture)
case "$arch" in
    x86_64) want_arch=amd64 ;;
    aarch64) want_arch=arm64 ;;
    armv7) want_arch=armhf ;;
    *) want_arch="?" ;;
esac
check "Architecture: $want_arch" [ "$deb_arch" = "$want_arch" ]
floor=$(readelf --version-info -W "$agent_bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -uV | tail -1)
depends=$(dpkg-deb -f "$old" Depends)
check "Depends: libc6 (>= $floor), the binary's glibc floor ($depends)" \
    sh -c "echo '$depends' | grep -qF 'libc6 (>= $floor)'"
if [ -n "${FERRY_DEB_GLIBC:-}" ]; then
    check "the binary needs glibc $FERRY_DEB_GLIBC at most (GLIBC_$floor)" [ "$floor" = "$FERRY_DEB_GLIBC" ]
fi
dpkg-deb -c "$old" | awk '{print $6}' | sort > "$work/files"
for f in ./usr/bin/ferry-agent ./lib/systemd/system/ferry-agent.service ./etc/ferry/agent.toml \
    ./etc/ferry/keys/ ./var/lib/ferry-agent/ ./usr/share/doc/ferry-agent/README.Debian; do
    check "the package holds $f" grep -qxF "$f" "$work/files"
done
check "its binary is the $arch one" \
    sh -c "dpkg-deb --fsys-tarfile '$old' | tar -xOf - ./usr/bin/ferry-agent | cmp -s - '$agent_bin'"

# ferry, for CI machines.
check "dpkg -i ferry" dpkg -i "$ferry_deb"
check "ferry runs" /usr/bin/ferry --version

# ferry-agent, first install.
check "dpkg -i ferry-agent 0.0.1" dpkg -i "${force[@]}" "$old"
check "the binary is installed" test -x /usr/bin/ferry-agent
check "a system user ferry-agent" sh -c 'getent passwd ferry-agent | grep -q ":/usr/sbin/nologin$"'
check "the state directory belongs to it" \
    sh -c '[ "$(stat -c %U:%G:%a /var/lib/ferry-agent)" = ferry-agent:ferry-agent:750 ]'
check "agent.toml is a conffile" sh -c 'dpkg-query -W -f="\${Conffiles}" ferry-agent | grep -q /etc/ferry/agent.toml'
unit=/lib/systemd/system/ferry-agent.service
for line in "ProtectSystem=strict" "NoNewPrivileges=yes" "ReadWritePaths=/var/lib/ferry-agent" \
    "User=ferry-agent" "ExecStart=/usr/bin/ferry-agent --config /etc/ferry/agent.toml"; do
    check "the unit has $line" grep -qx "$line" "$unit"
done
if command -v systemd-analyze >/dev/null; then
    check "systemd-analyze verify accepts the unit" systemd-analyze verify "$unit"
fi

# Configure the device as an operator would: a key, a first bundle, an id.
must /usr/bin/ferry keygen -o "$work/release" >/dev/null 2>&1
must /usr/bin/ferry pack examples/iris --key "$work/release.key" -o "$work/iris.ferry" \
    --fleet deb --channel stable --sequence 1 >/dev/null
install -m 0644 "$work/release.pub" /etc/ferry/keys/deb-test.pub
install -m 0644 "$work/iris.ferry" /etc/ferry/initial.ferry
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -i -e 's/^id = "device-1"/id = "deb-test-1"/' -e 's/^fleet = "default"/fleet = "deb"/' \
    -e 's|^# initial_bundle = .*|initial_bundle = "/etc/ferry/initial.ferry"|' \
    -e 's|^trusted_keys = .*|trusted_keys = ["/etc/ferry/keys/deb-test.pub"]|' \
    -e "s|^listen = \"127.0.0.1:8089\"|listen = \"127.0.0.1:$port\"|" /etc/ferry/agent.toml
check "check-config accepts the edited configuration" \
    runuser -u ferry-agent -- "${run[@]}" /usr/bin/ferry-agent --config /etc/ferry/agent.toml check-config

serve_one() { # runs the installed agent as its user, outside systemd; one prediction
    # setpriv execs the agent (runuser would stay its parent and turn the
    # SIGTERM below into a killed session).
    setpriv --reuid=ferry-agent --regid=ferry-agent --init-groups \
        "${run[@]}" /usr/bin/ferry-agent --config /etc/ferry/agent.toml \
        --log-format text 2>"$work/agent.log" &
    agent_pid=$!
    for _ in $(seq 1 1200); do
        curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.1
    done
    local answer
    answer=$(curl -fs -H 'Content-Type: application/json' \
        -d '{"record":{"sepal_length":5.4,"sepal_width":3.4,"petal_length":1.7,"petal_width":0.2}}' \
        "http://127.0.0.1:$port/v1/predict")
    kill -TERM "$agent_pid"
    wait "$agent_pid"
    local status=$?
    agent_pid=""
    echo "$answer" | grep -q '"label":"setosa"' && [ "$status" -eq 0 ] ||
        { echo "answer: $answer, exit $status"; cat "$work/agent.log"; return 1; }
}
check "the installed agent serves a prediction as user ferry-agent" serve_one
check "its state is in /var/lib/ferry-agent, owned by it" \
    sh -c '[ -n "$(find /var/lib/ferry-agent -mindepth 1 -user ferry-agent | head -1)" ]'
state_before=$(cd /var/lib/ferry-agent && find . -type f -name '*.ferry' | sort)

# Upgrade: edited configuration, keys and state kept.
check "dpkg -i ferry-agent 0.0.2 over 0.0.1" dpkg -i "${force[@]}" "$new"
check "the version is 0.0.2" sh -c '[ "$(dpkg-query -W -f="\${Version}" ferry-agent)" = 0.0.2 ]'
check "the edited configuration is kept" grep -q '^id = "deb-test-1"' /etc/ferry/agent.toml
check "the key is kept" test -f /etc/ferry/keys/deb-test.pub
check "the installed bundles are kept" \
    sh -c "[ -n '$state_before' ] && [ \"\$(cd /var/lib/ferry-agent && find . -type f -name '*.ferry' | sort)\" = '$state_before' ]"
check "the upgraded agent serves" serve_one

# Remove: binary gone, configuration and state kept; purge: both gone.
check "dpkg -r ferry-agent" dpkg -r ferry-agent
check "the binary is gone" test ! -e /usr/bin/ferry-agent
check "the configuration stays after -r" grep -q '^id = "deb-test-1"' /etc/ferry/agent.toml
check "the state stays after -r" test -d /var/lib/ferry-agent
check "dpkg --purge ferry-agent" dpkg --purge ferry-agent
check "the configuration is gone after --purge" test ! -e /etc/ferry/agent.toml
check "the state is gone after --purge" test ! -e /var/lib/ferry-agent
check "dpkg --purge ferry" dpkg --purge ferry

echo "deb: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
