"""Exit codes systemd acts on (issue #13, item 8): 78 only for what a restart cannot fix (the
unit's RestartPreventExitStatus=78), 75 for a transient failure at start-up: here a real
'Cannot allocate memory' loading a plugin, under an address-space limit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, bundled_wasm

pytestmark = [pytest.mark.system, pytest.mark.integration]

CONFIG = """
[daemon]
state_dir = "{state}"
[metrics]
enabled = false
[plugins.modbus_decode]
[sources.b]
type = "modbus_tcp"
host = "127.0.0.1"
port = 1
chain = ["modbus_decode"]
[[sources.b.registers]]
name = "t"
address = 0
"""


def run(config: Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "flux_edge", "run", "--config", str(config)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, preexec_fn=cap,
        check=False,
    )


def test_out_of_memory_loading_a_plugin_exits_75_not_78(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(state=tmp_path / "state"))
    # enough for Python and the imports, not for wasmtime's reservation of a linear memory
    done = run(cfg, limit=1200 * 1024 * 1024)
    assert done.returncode == 75, done.stderr[-2000:]
    assert "Cannot allocate memory" in done.stderr and "transient" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_config_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[daemon]\nshutdown_timeout = " + "9" * 400 + "\n")
    done = run(cfg)
    assert done.returncode == 78, done.stderr
    assert "Traceback" not in done.stderr and "out of range" in done.stderr
