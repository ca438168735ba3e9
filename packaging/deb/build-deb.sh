#!/usr/bin/env bash
# Build a Debian package of flux-edge: the daemon (as a wheelhouse installed into
# /opt/flux-edge/venv by the package's postinst, offline), its systemd unit, a default
# configuration (a conffile: your edits survive upgrades), the manual the unit points at.
#
#   packaging/deb/build-deb.sh ARCH OUTDIR [PYVER]
#       ARCH: amd64 | arm64;  PYVER: the target release's python3: 3.13 (trixie, default), 3.11 (bookworm)
#
# Needs dpkg-deb (any Debian/Ubuntu) and what tools/build-wheelhouse.sh needs (pip, the package
# index). The same paths as the Ansible role and the image: one unit, one layout.
set -euo pipefail
die() { echo "build-deb: error: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 amd64|arm64 OUTDIR [3.11|3.13]"
arch=$1; out=$2; pyver=${3:-3.13}
case $arch in amd64) wh_arch=x86_64 ;; arm64) wh_arch=aarch64 ;; *) die "ARCH: amd64 or arm64" ;; esac
case $pyver in 3.11|3.12|3.13) ;; *) die "PYVER: 3.11, 3.12 or 3.13" ;; esac
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n 1)
[ -n "$version" ] || die "no version in pyproject.toml"
debver="$version-1"
next="3.$(( ${pyver#3.} + 1 ))"
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$work/pkg

# the wheels (flux-edge with its bundled plugins, every dependency for ARCH and PYVER)
"$repo/tools/build-wheelhouse.sh" "$wh_arch" "$pkg/opt/flux-edge/wheelhouse" "$pyver" >&2
install -D -m 0644 "$repo/config/systemd/flux-edge.service" "$pkg/usr/lib/systemd/system/flux-edge.service"
install -D -m 0644 "$here/flux-edge.toml" "$pkg/etc/flux-edge/flux-edge.toml"
for doc in operations.md configuration.md; do
    install -D -m 0644 "$repo/docs/$doc" "$pkg/usr/share/doc/flux-edge/$doc"
done
install -D -m 0644 "$here/copyright" "$pkg/usr/share/doc/flux-edge/copyright"
install -d -m 0755 "$pkg/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: flux-edge
Version: $debver
Architecture: $arch
Maintainer: flux-edge developers <flux-edge@localhost>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< $next), python3-venv, procps, systemd, adduser
Recommends: openssl
Section: net
Priority: optional
Description: IoT gateway daemon: Modbus/serial/MQTT in, Wasm plugins, CEL rules, MQTT uplink
 flux-edge reads Modbus TCP/RTU, serial and MQTT devices, normalizes their data through
 sandboxed WebAssembly plugins, evaluates rules, acts locally behind a safety layer and forwards
 every measurement upstream over MQTT through a durable outbox. It runs as the hardened systemd
 service flux-edge.service; its configuration is /etc/flux-edge/flux-edge.toml.
 .
 The Python environment (/opt/flux-edge/venv) is made at installation from the wheels in
 /opt/flux-edge/wheelhouse, without network access.
CONTROL
echo /etc/flux-edge/flux-edge.toml >"$pkg/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/$script" "$pkg/DEBIAN/$script"
done
deb=$out/flux-edge_${debver}_${arch}.deb
dpkg-deb --root-owner-group --build -Zxz "$pkg" "$deb" >&2
echo "$deb"
