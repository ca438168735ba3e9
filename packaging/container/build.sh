#!/usr/bin/env bash
# Build the flux-edge container image (packaging/container/Containerfile) with podman (or
# docker: CONTAINER=docker): the build context is made here, with a wheelhouse for the target.
#
#   packaging/container/build.sh [--arch amd64|arm64] [--base IMAGE] [--tag TAG] [-- EXTRA BUILD ARGS]
#
# --base: the Debian slim image (default docker.io/library/debian:trixie-slim; the wheelhouse is
# for its Python, 3.13). An arm64 image built on an x86_64 host needs qemu-user-static (binfmt).
# podman here needs `--runtime runc` (crun fails on cgroup v1 hosts) and HEALTHCHECK needs the
# docker image format: both are passed when CONTAINER is podman.
set -euo pipefail
die() { echo "container/build.sh: error: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
arch=amd64 base=docker.io/library/debian:trixie-slim tag=localhost/flux-edge:latest pyver=3.13
while [ $# -gt 0 ]; do
    case $1 in
        --arch) arch=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --python) pyver=$2; shift 2 ;;
        --) shift; break ;;
        *) die "unknown argument: $1" ;;
    esac
done
case $arch in amd64) wh_arch=x86_64 ;; arm64) wh_arch=aarch64 ;; *) die "--arch amd64|arm64" ;; esac
engine=${CONTAINER:-podman}
command -v "$engine" >/dev/null || die "$engine is missing"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Containerfile" "$here/flux-edge.toml" "$here/healthcheck" "$ctx/"
"$repo/tools/build-wheelhouse.sh" "$wh_arch" "$ctx/wheelhouse" "$pyver" >&2
global=()
opts=(--platform "linux/$arch" --build-arg "BASE=$base" -t "$tag" -f "$ctx/Containerfile")
if [ "$engine" = podman ]; then
    global=(--runtime "${PODMAN_RUNTIME:-runc}")
    opts+=(--format docker --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)
fi
"$engine" "${global[@]}" build "${opts[@]}" "$@" "$ctx"
echo "$tag"
