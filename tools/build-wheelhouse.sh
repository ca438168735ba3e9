#!/usr/bin/env bash
# Build a wheelhouse: the flux-edge wheel from this checkout (with its bundled plugins) and every
# dependency as a wheel for one device architecture and CPython version (3.11: Debian bookworm,
# 3.13: Debian trixie, the image's), so the
# Ansible role (ansible/roles/flux_edge, variable flux_edge_wheelhouse) can install flux-edge with
# `pip install --no-index --find-links`: the device needs no network.
#
#   tools/build-wheelhouse.sh ARCH OUTDIR [PYVER]
#       ARCH: aarch64 (Raspberry Pi 3/4/5/Zero 2 W) | x86_64
#       PYVER: the device's CPython, 3.11 (bookworm, the default), 3.12 or 3.13 (trixie)
#
# Runs on the controller (any Linux with Python >= 3.11 and pip, network access to the package
# index). PYTHON=... chooses the interpreter (default: .venv/bin/python, else python3).
# Wheels already in OUTDIR are removed first, so OUTDIR holds exactly one consistent set.
set -euo pipefail

usage() { echo "usage: $0 aarch64|x86_64 OUTDIR [3.11|3.12|3.13]" >&2; exit 2; }
die() { echo "build-wheelhouse: error: $*" >&2; exit 1; }
[ $# -eq 2 ] || [ $# -eq 3 ] || usage
arch=$1
out=$2
pyver=${3:-3.11}
case "$arch" in
  aarch64|x86_64) ;;
  *) echo "build-wheelhouse: unknown ARCH '$arch' (expected aarch64 or x86_64)" >&2; usage ;;
esac
# the newest glibc of the Debian release that ships that Python (manylinux tags it accepts)
case "$pyver" in
  3.11) glibc_minor=36 ;;   # bookworm
  3.12) glibc_minor=39 ;;   # e.g. Ubuntu 24.04
  3.13) glibc_minor=41 ;;   # trixie
  *) echo "build-wheelhouse: unsupported Python '$pyver' (3.11, 3.12 or 3.13)" >&2; usage ;;
esac
abi=cp${pyver/./}

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
"$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip (set PYTHON=... to an interpreter with pip)"

# 1. The bundled plugins are package data built by plugins/build-all.sh (they are not in git). A
#    wheel without them would install a daemon that cannot decode anything: refuse.
bundled="$repo/flux_edge/plugins/bundled"
for name in modbus_decode json_normalize nmea0183 c_scale vendor_frame; do
  wasm="$bundled/$name.wasm"
  [ -s "$wasm" ] || die "$wasm is missing: build the plugins first (plugins/build-all.sh, or tools/setup.sh)"
  [ "$(head -c 4 "$wasm" | od -An -tx1 | tr -d ' \n')" = "0061736d" ] \
    || die "$wasm is not a WebAssembly module: rebuild it with plugins/build-all.sh"
done
[ -f "$repo/flux_edge/plugins/templates/sdk/c/flux_plugin.h" ] \
  || die "flux_edge/plugins/templates/sdk is missing: run plugins/build-all.sh"

mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/*.whl "$out/SHA256SUMS"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Manylinux tags the device's glibc accepts, newest first.
platforms=()
for minor in $(seq "$glibc_minor" -1 17); do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
platforms+=(--platform "manylinux2014_${arch}")
if [ "$arch" = x86_64 ]; then
  for minor in $(seq 16 -1 5); do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
  platforms+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
fi
target=(--only-binary=:all: "${platforms[@]}" --python-version "$pyver" --implementation cp --abi "$abi")

# 2. flux-edge itself, built from a clean copy of the package sources (an in-tree build would leave
#    build/ and stale modules behind).
echo "build-wheelhouse: building the flux-edge wheel" >&2
mkdir -p "$work/src"
cp "$repo/pyproject.toml" "$repo/README.md" "$repo/MANIFEST.in" "$work/src/"
mkdir -p "$work/src/packaging/backend"
cp "$repo/packaging/backend/flux_edge_backend.py" "$work/src/packaging/backend/"
(cd "$repo" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' flux_edge) | tar -xf - -C "$work/src"
# Same sources -> byte-identical wheels (zip timestamps from SOURCE_DATE_EPOCH), so re-running this
# script does not make the role reinstall an unchanged flux-edge (or sdnotify, built below).
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 315532800)}
export SOURCE_DATE_EPOCH=$epoch
"$py" -m pip wheel -q --no-deps -w "$out" "$work/src" >&2
fe_wheel=$(ls "$out"/flux_edge-*.whl)
"$py" - "$fe_wheel" <<'EOF' || die "the flux-edge wheel lacks its bundled plugins"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = {f"flux_edge/plugins/bundled/{n}.wasm" for n in
        ("modbus_decode", "json_normalize", "nmea0183", "c_scale", "vendor_frame")}
missing = sorted(need - names)
if missing:
    print("missing from the wheel:", *missing, file=sys.stderr)
    sys.exit(1)
EOF

# 3. Its runtime requirements, read from the wheel's metadata (extras such as [dev] left out).
mapfile -t reqs < <("$py" - "$fe_wheel" <<'EOF'
import sys, zipfile
from email.parser import Parser
zf = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
for req in Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []:
    if "extra ==" not in req:
        print(req.strip())
EOF
)
[ ${#reqs[@]} -gt 0 ] || die "no requirements found in $fe_wheel"

# 4. Requirements published only as source distributions: built here as pure-Python wheels (a
#    compiled one would be for this machine's architecture, not the device's: refused).
sdist_only=(sdnotify)
for name in "${sdist_only[@]}"; do
  spec=$(printf '%s\n' "${reqs[@]}" | grep -i "^$name\b" || true)
  [ -n "$spec" ] || continue
  echo "build-wheelhouse: building $spec as a pure-Python wheel" >&2
  "$py" -m pip wheel -q --no-deps --no-binary="$name" -w "$work/pure" "$spec" >&2
  for w in "$work"/pure/*.whl; do
    case "$w" in
      *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$w" "$out/" ;;
      *) die "$(basename "$w") is not a pure-Python wheel: cannot use it on $arch" ;;
    esac
  done
done

# 5. Everything else as binary wheels for the device (transitive dependencies included).
echo "build-wheelhouse: downloading dependencies for $abi $arch" >&2
"$py" -m pip download -q "${target[@]}" --find-links "$out" -d "$out" "${reqs[@]}" >&2

# 6. Proof that the set is complete: resolve flux-edge from the wheelhouse alone, as the device will.
"$py" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$out" "${target[@]}" \
  --target "$work/resolve" flux-edge >&2 \
  || die "the wheelhouse in $out does not resolve offline for $arch"

(cd "$out" && sha256sum -- *.whl > SHA256SUMS)
echo "build-wheelhouse: $(ls "$out"/*.whl | wc -l) wheels for $abi $arch in $out:" >&2
ls -1 "$out"/*.whl | sed 's|.*/|  |' >&2
