#!/bin/sh
# Build every plugin in this repository and copy the modules to flux_edge/plugins/bundled/
# (shipped in the wheel), and the SDK sources to flux_edge/plugins/templates/sdk/ (what
# `flux-edge plugin new` vendors into new plugins when flux-edge runs from a wheel).
# Run before building a wheel. Uses the same code as `flux-edge plugin build`.
#
#   plugins/build-all.sh            # PYTHON=... to choose the interpreter
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
bundled="$repo/flux_edge/plugins/bundled"
mkdir -p "$bundled"
# One target directory for all Rust plugins: the SDK and serde_json are compiled once.
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}
export CARGO_TARGET_DIR
cd "$repo"
for dir in modbus_decode json_normalize nmea0183 vedirect sml iec62056_21 mbus sparkplug_b sunspec examples/c_scale examples/vendor_frame; do
    echo "building plugins/$dir" >&2
    wasm=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$py" -m flux_edge.plugins.tooling build "$here/$dir" --out "$bundled")
    echo "  $(wc -c < "$wasm") bytes -> ${wasm#"$repo"/}" >&2
done
# The checksums `flux-edge plugin verify` compares the shipped modules with.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$py" -c 'import sys; from pathlib import Path; from flux_edge.plugins.catalog import write_sums; write_sums(Path(sys.argv[1]))' "$bundled"
echo "checksums -> ${bundled#"$repo"/}/SHA256SUMS" >&2
sdk="$repo/flux_edge/plugins/templates/sdk"
rm -rf "$sdk"
mkdir -p "$sdk/rust" "$sdk/c"
cp -R "$here/sdk/rust/Cargo.toml" "$here/sdk/rust/README.md" "$here/sdk/rust/src" "$sdk/rust/"
cp "$here/sdk/c/flux_plugin.h" "$here/sdk/c/README.md" "$sdk/c/"
echo "SDK sources -> ${sdk#"$repo"/}" >&2
