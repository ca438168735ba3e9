"""Shared test helpers. Tests start the real parts they need and stop them."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "flux_edge" / "plugins" / "bundled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def port() -> int:
    return free_port()


def bundled_wasm(name: str) -> Path:
    """A plugin built by tools/setup.sh (plugins/build-all.sh). In CI setup always runs first, so
    a missing file is a failure, not a skip."""
    path = BUNDLED / f"{name}.wasm"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: plugins/build-all.sh did not build it")
        pytest.skip(f"{path} not built: run plugins/build-all.sh")
    return path


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


PYTHON = sys.executable
