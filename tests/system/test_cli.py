"""The `flux-edge` command as a user runs it: a subprocess, its exit code and what it prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, bundled_wasm, free_port

pytestmark = pytest.mark.system


def flux(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flux_edge", *args],
        input=stdin,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_check_config_accepts_the_shipped_configs() -> None:
    bundled_wasm("modbus_decode")
    bundled_wasm("json_normalize")
    for name in ("demo.toml", "example.toml"):
        r = flux("check-config", str(ROOT / "config" / name))
        assert r.returncode == 0, r.stderr
        assert "ok" in r.stdout


def test_check_config_rejects_a_bad_file_with_78_and_precise_messages(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")
    text = (ROOT / "config" / "demo.toml").read_text()
    bad = text.replace('when = "temperature > 80"', "when = 'temperature > \"80\"'", 1)
    assert bad != text
    bad = bad.replace('type = "int16"', 'type = "int17"', 1)
    bad += "\n[sources.extra]\ntype = \"modbus_tcp\"\nhots = \"x\"\n"
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    r = flux("check-config", str(path))
    assert r.returncode == 78
    err = r.stderr
    assert "Traceback" not in err
    assert bad != text
    assert "sources.boiler.registers[0].type" in err and "int17" in err
    assert "sources.extra.hots" in err and "host" in err  # unknown key, with a suggestion
    assert "sources.extra.host" in err  # missing required key
    for line in err.splitlines()[:-1]:
        assert line.startswith(f"{path}:"), line


def test_check_config_reports_bad_cel_with_rule_and_column(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")
    text = (ROOT / "config" / "demo.toml").read_text()
    path = tmp_path / "cel.toml"
    path.write_text(text.replace('when = "temperature > 80"', "when = 'temperature > \"80\"'", 1))
    r = flux("check-config", str(path))
    assert r.returncode == 78
    assert "rules.overheat.when" in r.stderr and "no matching overload" in r.stderr


def test_check_config_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "syntax.toml"
    path.write_text('[daemon]\nname = "gw"\nqueue_size = = 3\n')
    r = flux("check-config", str(path))
    assert r.returncode == 78
    assert f"{path}:3:" in r.stderr and "Traceback" not in r.stderr


def test_plugin_run_bad_input_is_one_clear_line() -> None:
    wasm = bundled_wasm("json_normalize")
    cfg = ROOT / "plugins" / "json_normalize" / "cases" / "vendor.config.json"
    r = flux("plugin", "run", str(wasm), "--config", str(cfg), stdin="{not json\n")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "line 1" in r.stderr


def test_plugin_run_missing_file_is_one_clear_line() -> None:
    r = flux("plugin", "run", "/nonexistent/x.wasm", stdin="")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "/nonexistent/x.wasm" in r.stderr


def test_demo_shows_overheat_and_reheat_firing() -> None:
    bundled_wasm("modbus_decode")
    r = flux("demo", "--seconds", "26", "--port", str(free_port()), timeout=90)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rule overheat" in out and "rule reheat" in out, out
    assert "FAILED" not in out
    assert "temperature" in out and "burner" in out


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`flux-edge run` against the simulator; SIGTERM -> drained, exit 0."""
    bundled_wasm("modbus_decode")
    port = free_port()
    text = (ROOT / "config" / "demo.toml").read_text()
    text = text.replace("port = 15020", f"port = {port}").replace(
        'state_dir = "/var/lib/flux-edge"', f'state_dir = "{tmp_path / "state"}"'
    )
    assert f"port = {port}" in text and str(tmp_path) in text
    cfg = tmp_path / "flux-edge.toml"
    cfg.write_text(text)
    # copy-free: plugin lookup falls back to the bundled dir
    sim = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio,sys\n"
         "from flux_edge.demo.boiler import BoilerSimulator\n"
         "async def m():\n"
         f"    s=BoilerSimulator(port={port}); await s.start(); print('up', flush=True)\n"
         "    await asyncio.Event().wait()\n"
         "asyncio.run(m())\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert sim.stdout is not None and sim.stdout.readline().strip() == "up"
        env = dict(os.environ, FLUX_EDGE_LOG="info")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "flux_edge", "run", "--config", str(cfg)],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env,
        )
        assert daemon.stderr is not None
        for line in daemon.stderr:  # wait for the pipeline to be running: an event, not a sleep
            if "pipeline running" in line:
                break
        else:
            pytest.fail("daemon exited before running")
        daemon.send_signal(signal.SIGTERM)
        rest = daemon.stderr.read()
        assert daemon.wait(30) == 0, rest
        assert "stopped" in rest and "Traceback" not in rest
    finally:
        sim.kill()
        sim.wait()
