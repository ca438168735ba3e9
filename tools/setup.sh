#!/usr/bin/env bash
# Set up a development/demo checkout of flux-edge on Debian 12 (run as root, or with sudo rights
# for apt-get): system packages, a venv in .venv with flux-edge and its dev tools, and every
# plugin in plugins/ built to .wasm and bundled into the package. Idempotent: re-running only
# does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the project needs from Debian, with the reason for each: tools/debian-packages.txt.
mapfile -t PKGS < <(sed 's/#.*//' tools/debian-packages.txt | tr -s ' \t' '\n' | grep -v '^$')

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.flux-edge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing flux-edge and dev tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev,provision]'
  touch "$stamp"
fi

echo "setup: building plugins"
bash plugins/build-all.sh
echo "setup: done. Try: .venv/bin/flux-edge demo --seconds 30"
