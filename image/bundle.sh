#!/usr/bin/env bash
# Make a signed RAUC bundle (verity format) of one root filesystem image, for the flux-edge A/B
# image: what `image/build.sh --bundle` runs, and what makes a bundle of a root filesystem
# changed afterwards.
#
#   image/bundle.sh --rootfs ROOTFS.ext4 --compatible flux-edge-rpi-arm64|flux-edge-pc-amd64
#                   --version V --cert SIGNING.cert.pem --key SIGNING.key.pem --out OUT.raucb
#                   [--keyring CA.pem]     # also check the new bundle against it
#                   [--description TEXT]
set -euo pipefail
die() { echo "bundle.sh: error: $*" >&2; exit 1; }
ROOTFS="" COMPATIBLE="" VERSION="" CERT="" KEY="" OUT="" KEYRING="" DESCRIPTION="flux-edge image"
while [ $# -gt 0 ]; do
    case $1 in
        --rootfs) ROOTFS=$2; shift 2 ;;
        --compatible) COMPATIBLE=$2; shift 2 ;;
        --version) VERSION=$2; shift 2 ;;
        --cert) CERT=$2; shift 2 ;;
        --key) KEY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keyring) KEYRING=$2; shift 2 ;;
        --description) DESCRIPTION=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
for v in ROOTFS COMPATIBLE VERSION CERT KEY OUT; do [ -n "${!v}" ] || die "--${v,,} is required"; done
[ -f "$ROOTFS" ] || die "$ROOTFS: no such file"
[ -f "$CERT" ] && [ -f "$KEY" ] || die "the signing certificate or key is missing"
command -v rauc >/dev/null || die "rauc is missing (Debian: apt-get install rauc squashfs-tools)"
# an ext4 filesystem, and one the slots can take (the superblock magic at 1080)
[ "$(od -An -tx1 -j1080 -N2 "$ROOTFS" | tr -d ' \n')" = 53ef ] || die "$ROOTFS is not an ext4 image"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/flux-edge-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/content"
# a hard link where possible (no copy of a GB), else a sparse copy
ln "$ROOTFS" "$work/content/rootfs.ext4" 2>/dev/null || cp --sparse=always "$ROOTFS" "$work/content/rootfs.ext4"
cat >"$work/content/manifest.raucm" <<MANIFEST
[update]
compatible=$COMPATIBLE
version=$VERSION
description=$DESCRIPTION
build=$(date -u +%Y%m%d%H%M%S)

[bundle]
format=verity

[image.rootfs]
filename=rootfs.ext4
MANIFEST
rm -f "$OUT"
rauc bundle --cert "$CERT" --key "$KEY" "$work/content" "$OUT"
if [ -n "$KEYRING" ]; then
    rauc info --keyring "$KEYRING" "$OUT" >/dev/null || die "$OUT does not verify against $KEYRING"
fi
echo "bundle.sh: $OUT ($(stat -c %s "$OUT") bytes): $COMPATIBLE $VERSION" >&2
