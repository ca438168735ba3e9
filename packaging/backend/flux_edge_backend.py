"""flux-edge's PEP 517 build backend: setuptools, plus the bundled Wasm plugins.

The plugins in ``flux_edge/plugins/bundled/*.wasm`` are build products (git ignores them), so a
wheel built from a fresh clone would otherwise ship without them and install a daemon that
cannot decode anything. Before a wheel (or an sdist) is built, this backend

- in a checkout (``plugins/build-all.sh`` is there): runs it when a bundled module is missing or
  older than its plugin's sources, and fails the build if it fails;
- anywhere: checks that every bundled module (named in plugins/build-all.sh, or found) exists and
  is a WebAssembly module, and fails the build otherwise.

Editable installs (``pip install -e``) are left alone: tools/setup.sh builds the plugins itself
after the venv has the dependencies the plugin tooling needs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517/660 hooks, as is)

ROOT = Path(__file__).resolve().parents[2]
BUILD_ALL = ROOT / "plugins" / "build-all.sh"
BUNDLED = ROOT / "flux_edge" / "plugins" / "bundled"
SDK_HEADER = ROOT / "flux_edge" / "plugins" / "templates" / "sdk" / "c" / "flux_plugin.h"
WASM_MAGIC = b"\0asm"


class PluginsMissing(RuntimeError):
    pass


def _plugin_dirs() -> list[Path]:
    """The plugin source directories plugins/build-all.sh builds (its `for dir in ...` line)."""
    m = re.search(r"^for dir in ([^;]+); do", BUILD_ALL.read_text(), re.MULTILINE)
    if not m:
        raise PluginsMissing(f"{BUILD_ALL}: no 'for dir in ...; do' line naming the plugins")
    return [ROOT / "plugins" / d for d in m.group(1).split()]


def _stale(dirs: list[Path]) -> list[str]:
    out = []
    for d in dirs:
        wasm = BUNDLED / f"{d.name}.wasm"
        if not wasm.is_file():
            out.append(f"{wasm.name} missing")
            continue
        newest = max((p.stat().st_mtime for p in d.rglob("*") if p.is_file()
                      and "target" not in p.relative_to(d).parts), default=0.0)
        if newest > wasm.stat().st_mtime:
            out.append(f"{wasm.name} older than plugins/{d.relative_to(ROOT / 'plugins')}")
    if not SDK_HEADER.is_file():
        out.append("templates/sdk missing")
    return out


def _check(names: list[str]) -> None:
    bad = []
    for name in names:
        wasm = BUNDLED / f"{name}.wasm"
        if not wasm.is_file() or wasm.stat().st_size < 8:
            bad.append(f"{wasm} is missing")
        elif wasm.read_bytes()[:4] != WASM_MAGIC:
            bad.append(f"{wasm} is not a WebAssembly module")
    if not names:
        bad.append(f"no bundled plugins in {BUNDLED}")
    if not SDK_HEADER.is_file():
        bad.append(f"{SDK_HEADER} is missing (the SDK `flux-edge plugin new` vendors)")
    if bad:
        raise PluginsMissing(
            "flux-edge: refusing to build a package without its bundled plugins:\n  "
            + "\n  ".join(bad)
            + "\nBuild them with plugins/build-all.sh (tools/setup.sh installs its toolchains).")


def ensure_plugins() -> None:
    if os.environ.get("FLUX_EDGE_SKIP_PLUGIN_BUILD") != "1" and BUILD_ALL.is_file():
        dirs = _plugin_dirs()
        stale = _stale(dirs)
        if stale:
            print(f"flux-edge build: building the plugins ({', '.join(stale)})", flush=True)
            # the build frontend's isolation (PYTHONPATH, PYTHONHOME, ...) is not for the
            # interpreter build-all.sh chooses: it gets the user's environment without them
            env = {k: v for k, v in os.environ.items()
                   if not (k.startswith("PYTHON") and k != "PYTHON")}
            # the plugin tooling imports flux_edge (msgspec, ...): the interpreter running this
            # build has its dependencies if any has; PYTHON=... chooses another
            env.setdefault("PYTHON", sys.executable)
            res = subprocess.run(["sh", str(BUILD_ALL)], cwd=ROOT, env=env)
            if res.returncode != 0:
                raise PluginsMissing(
                    f"flux-edge: plugins/build-all.sh failed (exit {res.returncode}): no package"
                    " without its plugins")
        _check([d.name for d in dirs])
    else:
        _check(sorted(p.stem for p in BUNDLED.glob("*.wasm")))


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    ensure_plugins()
    return _orig.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    ensure_plugins()
    return _orig.build_sdist(sdist_directory, config_settings)
