#!/usr/bin/env bash
# Builds Debian packages from already-built binaries (docs/devices.md):
#
#   scripts/deb.sh agent ARCH BINARY VERSION OUTDIR   # ferry-agent_VERSION_<deb arch>.deb
#   scripts/deb.sh ferry ARCH BINARY VERSION OUTDIR   # ferry_VERSION_<deb arch>.deb (CI machines)
#
# ARCH is x86_64, aarch64 or armv7 (amd64, arm64, armhf in Debian's words).
# ferry-agent: the binary, the hardened systemd unit (system user
# `ferry-agent`, ProtectSystem=strict, ReadWritePaths=/var/lib/ferry-agent),
# /etc/ferry/agent.toml as a conffile, /var/lib/ferry-agent. Depends on the
# glibc the binary asks for (its newest GLIBC_x.y symbol version: 2.28 for
# the device builds of scripts/device-build.sh). Needs dpkg-deb and readelf;
# prints the path of the package.
set -euo pipefail
cd "$(dirname "$0")/.."

what=$1 arch=$2 binary=$3 version=$4 outdir=$5
case "$arch" in
    x86_64 | amd64) deb_arch=amd64 ;;
    aarch64 | arm64) deb_arch=arm64 ;;
    armv7 | armhf) deb_arch=armhf ;;
    *) echo "unknown architecture $arch" >&2; exit 2 ;;
esac
[ -f "$binary" ] || { echo "$binary: no such binary" >&2; exit 1; }
# The oldest glibc the binary runs on: the newest symbol version it needs
# (none for a static build).
glibc=$(readelf --version-info -W "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' |
    sort -uV | tail -1)
libc_dep=${glibc:+libc6 (>= $glibc)}
mkdir -p "$outdir"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
doc_dir() { install -d "$root/usr/share/doc/$1"; }

case "$what" in
    agent)
        name=ferry-agent
        install -D -m 0755 "$binary" "$root/usr/bin/ferry-agent"
        install -D -m 0644 packaging/deb/ferry-agent.service \
            "$root/lib/systemd/system/ferry-agent.service"
        install -D -m 0644 edge-agent/agent.toml "$root/etc/ferry/agent.toml"
        install -d -m 0755 "$root/etc/ferry/keys"
        install -d -m 0750 "$root/var/lib/ferry-agent"
        doc_dir ferry-agent
        install -m 0644 packaging/deb/README.Debian "$root/usr/share/doc/ferry-agent/"
        install -d "$root/DEBIAN"
        install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
        echo /etc/ferry/agent.toml > "$root/DEBIAN/conffiles"
        description="Ferry edge agent: local ML predictions, signed model updates, telemetry
 Serves ONNX models packed by Ferry in a WebAssembly sandbox, installs signed
 updates with rollback, buffers telemetry and reports to a fleet over MQTT.
 This is the lean device build: guests come precompiled in the bundle."
        depends="${libc_dep:+$libc_dep, }passwd"
        ;;
    ferry)
        name=ferry
        install -D -m 0755 "$binary" "$root/usr/bin/ferry"
        doc_dir ferry
        install -d "$root/DEBIAN"
        description="Ferry packager: signed bundles of ONNX models for devices and Lambda
 ferry keygen, pack, verify, inspect, run, publish: what a CI job needs to
 ship a model to Ferry's edge agents and AWS Lambda."
        depends=$libc_dep
        ;;
    *) echo "unknown package $what (agent, ferry)" >&2; exit 2 ;;
esac
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $deb_arch
Maintainer: Ferry maintainers <ferry@example.invalid>
Section: misc
Priority: optional
Installed-Size: $size
${depends:+Depends: $depends
}Homepage: https://example.invalid/ferry
Description: $description
CONTROL
out="$outdir/${name}_${version}_${deb_arch}.deb"
# xz: what every dpkg since Debian 10 reads (DEB_COMPRESSION=gzip is faster).
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$root" "$out" >/dev/null
echo "$out"
