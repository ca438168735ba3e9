"""Daemon.reload in process: a changed .wasm is recompiled and takes over; a broken one (or a bad
file) leaves the running pipeline untouched and says why."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from flux_edge.kinds import load_config
from flux_edge.model import Measurement
from flux_edge.runtime.daemon import Daemon
from flux_edge.runtime.pipeline import Observers
from flux_edge.runtime.systemd import Notifier
from flux_edge.sim.modbus_server import SimulatedModbusServer
from tests.conftest import ROOT
from tests.support import run

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.p]
file = "p.wat"

[sources.dev]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "0.05s"
chain = ["p"]

[[sources.dev.registers]]
name = "x"
address = 0
"""

ECHO = (ROOT / "tests" / "fixtures" / "wat" / "echo.wat").read_text()


def test_changed_wasm_is_hot_reloaded_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    assert ECHO.count('",\\"name\\":\\"v\\",\\"value\\":"') == 1  # the fixture names it "v"
    shutil.copy(ROOT / "tests" / "fixtures" / "wat" / "echo.wat", tmp_path / "p.wat")
    seen: list[set[str]] = []  # the measurement names of each batch
    arrived = asyncio.Event()

    def on_measurements(source: str, ms: list[Measurement]) -> None:
        seen.append({m.name for m in ms} - {"calls"})  # echo.wat also counts its calls
        arrived.set()

    async def next_name() -> set[str]:
        arrived.clear()
        await arrived.wait()
        return seen[-1]

    async def go() -> None:
        async with SimulatedModbusServer("127.0.0.1", 0) as server:
            cfg_path = tmp_path / "flux.toml"
            cfg_path.write_text(CONFIG.format(state=tmp_path / "state", port=server.port))
            daemon = Daemon(load_config(cfg_path),
                            observers=Observers(measurements=[on_measurements]),
                            notifier=Notifier({}))
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(daemon.run(stop=stop))
            while not seen:
                await next_name()
            assert seen[-1] == {"v"}
            host = daemon.host
            assert host is not None
            compiles = host.compiles

            # the plugin's source changes: same config, new module
            (tmp_path / "p.wat").write_text(ECHO.replace(
                '",\\"name\\":\\"v\\",\\"value\\":"',
                '",\\"name\\":\\"w\\",\\"value\\":"',
            ))
            assert await daemon.reload() is True
            assert host.compiles == compiles + 1
            for _ in range(3):
                name = await next_name()
            assert name == {"w"}

            # a broken module: refused, the running pipeline keeps going with the last good one
            (tmp_path / "p.wat").write_text("(module (func $oops")
            old = daemon.pipeline
            assert await daemon.reload() is False
            assert daemon.pipeline is old
            assert "p" in daemon.reload_error and "p.wat" in daemon.reload_error
            for _ in range(3):
                name = await next_name()
            assert name == {"w"}
            assert "reload failed" in daemon.status_line()

            # a bad file: refused with the key path
            cfg_path.write_text(cfg_path.read_text().replace('interval = "0.05s"',
                                                             'interval = "fast"'))
            assert await daemon.reload() is False
            assert daemon.pipeline is old
            assert "sources.dev.interval" in daemon.reload_error
            stop.set()
            await task

    run(go(), timeout=60)
