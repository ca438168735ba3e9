"""Plugin calls run off the event loop (runtime/plugin_lanes.py): a plugin that runs to its time
limit on every call holds up neither a healthy source's data, nor the loop, nor /healthz.

Real parts: two pymodbus servers, the real poller, modbus_decode.wasm for the healthy source and
the echo.wat fixture, told to loop forever (register address 1), for the other, with a 300 ms
limit and no quarantine, so that every one of its calls runs to the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from pathlib import Path

import pytest

from flux_edge.kinds import load_config_text
from flux_edge.model import ErrorRecord, Measurement
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers, Pipeline
from flux_edge.sim.modbus_server import SimulatedModbusServer
from tests.conftest import ROOT, bundled_wasm, free_port

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[metrics]
port = {metrics_port}

[plugins.modbus_decode]

[plugins.spinner]
file = "echo.wat"          # address 1 in the first message: an endless loop
timeout = "300ms"
max_failures = 1000000     # never quarantined: every call runs to the limit

[sources.good]
type = "modbus_tcp"
host = "127.0.0.1"
port = {good_port}
interval = "20ms"
chain = ["modbus_decode"]
registers = [{{ name = "level", address = 0, type = "uint16" }}]

[sources.slow]
type = "modbus_tcp"
host = "127.0.0.1"
port = {slow_port}
interval = "20ms"
chain = ["spinner"]
registers = [{{ name = "junk", address = 1, type = "uint16" }}]
"""


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    body = await reader.read()
    writer.close()
    return body


async def _healthz(port: int) -> float:
    """Seconds one GET /healthz takes (status line read)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 "), status
    return time.monotonic() - started


def test_a_plugin_at_its_time_limit_holds_up_nothing_else(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")
    shutil.copy(ROOT / "tests" / "fixtures" / "wat" / "echo.wat", tmp_path / "echo.wat")
    metrics_port = free_port()

    async def go() -> tuple[list[float], list[float], list[float], int, bytes]:
        async with SimulatedModbusServer(port=0) as good, SimulatedModbusServer(port=0) as slow:
            good.set_holding(0, 42)
            text = CONFIG.format(
                state=tmp_path / "state", good_port=good.port, slow_port=slow.port,
                metrics_port=metrics_port,
            )
            cfg_path = tmp_path / "site.toml"
            cfg_path.write_text(text)
            config = load_config_text(text, str(cfg_path))
            arrivals: list[float] = []
            timeouts: list[ErrorRecord] = []

            def on_measurements(source: str, ms: list[Measurement]) -> None:
                if source == "good" and ms:
                    arrivals.append(time.monotonic())

            def on_error(rec: ErrorRecord) -> None:
                if rec.source == "slow" and "timed out" in rec.error:
                    timeouts.append(rec)

            holder: list[Pipeline] = []
            running = asyncio.Event()
            stop = asyncio.Event()

            def started(pipeline: Pipeline) -> None:
                holder.append(pipeline)
                running.set()

            obs = Observers(measurements=[on_measurements], errors=[on_error])
            runner = asyncio.create_task(
                run_pipeline(
                    config, observers=obs, stop=stop, started=started, serve_metrics=True
                )
            )
            lags: list[float] = []
            health: list[float] = []
            try:
                await asyncio.wait_for(running.wait(), 30)
                # the probe: how late a 10 ms sleep wakes is how long the loop was held up
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    before = time.monotonic()
                    await asyncio.sleep(0.01)
                    lags.append(time.monotonic() - before - 0.01)
                    if len(lags) % 5 == 0:
                        health.append(await _healthz(metrics_port))
                metrics = await _get(metrics_port, "/metrics")
            finally:
                stop.set()
                await runner
            return arrivals, lags, health, len(timeouts), metrics

    arrivals, lags, health, timeouts, metrics = asyncio.run(go())
    assert timeouts >= 5  # the spinner really ran to its limit, call after call
    assert len(arrivals) > 50
    steady = arrivals[5:]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    # on the loop, each 300 ms call would have stopped the healthy source's data for 300 ms
    assert max(gaps) < 0.15, f"largest gap between healthy readings: {max(gaps):.3f} s"
    assert max(lags) < 0.1, f"the loop was held up for {max(lags):.3f} s"
    assert max(health) < 0.1, f"/healthz took {max(health):.3f} s"
    # the spinner's messages are counted as dead letters by reason, and its lane is a stage
    text = metrics.decode()
    lines = [
        ln for ln in text.splitlines()
        if ln.startswith('flux_edge_plugin_dead_letters_total{plugin="spinner",reason="timeout"}')
    ]
    assert len(lines) == 1, [ln for ln in text.splitlines() if "dead_letters" in ln]
    assert float(lines[0].rsplit(" ", 1)[1]) >= 5
    assert 'flux_edge_stage_busy_seconds{stage="plugins:slow/slow"}' in text
