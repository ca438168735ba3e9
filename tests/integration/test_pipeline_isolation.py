"""A plugin that traps on every call is quarantined, and the pipeline keeps serving another source.

Real parts: two pymodbus servers, the real poller, the real wasm host running modbus_decode.wasm
for the good source and the echo.wat fixture, told to hit `unreachable`, for the bad one.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from flux_edge.config import load_config_text
from flux_edge.model import ErrorRecord, Measurement
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers, Pipeline
from flux_edge.sources.modbus import SimulatedModbusServer
from tests.conftest import ROOT, bundled_wasm

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.modbus_decode]

[plugins.trapper]
file = "echo.wat"          # address 9 in the first message makes it execute `unreachable`
max_failures = 3
quarantine = "1h"

[sources.good]
type = "modbus_tcp"
host = "127.0.0.1"
port = {good_port}
interval = "50ms"
chain = ["modbus_decode"]
registers = [{{ name = "level", address = 0, type = "uint16" }}]

[sources.bad]
type = "modbus_tcp"
host = "127.0.0.1"
port = {bad_port}
interval = "50ms"
chain = ["trapper"]
registers = [{{ name = "junk", address = 9, type = "uint16" }}]
"""


def test_trapping_plugin_is_quarantined_while_another_source_keeps_flowing(
    tmp_path: Path,
) -> None:
    bundled_wasm("modbus_decode")
    shutil.copy(ROOT / "tests" / "fixtures" / "wat" / "echo.wat", tmp_path / "echo.wat")

    async def go() -> None:
        async with SimulatedModbusServer(port=0) as good, SimulatedModbusServer(port=0) as bad:
            good.set_holding(0, 42)
            text = CONFIG.format(state=tmp_path / "state", good_port=good.port, bad_port=bad.port)
            cfg_path = tmp_path / "site.toml"
            cfg_path.write_text(text)
            config = load_config_text(text, str(cfg_path))

            errors: list[ErrorRecord] = []
            good_after_quarantine: list[Measurement] = []
            quarantined = asyncio.Event()
            enough = asyncio.Event()

            def on_error(rec: ErrorRecord) -> None:
                errors.append(rec)
                if "quarantine" in rec.error:
                    quarantined.set()

            def on_measurements(source: str, ms: list[Measurement]) -> None:
                if source == "good" and quarantined.is_set():
                    good_after_quarantine.extend(ms)
                    if len(good_after_quarantine) >= 10:
                        enough.set()

            holder: list[Pipeline] = []
            stop = asyncio.Event()
            obs = Observers(measurements=[on_measurements], errors=[on_error])
            runner = asyncio.create_task(
                run_pipeline(config, observers=obs, stop=stop, started=holder.append)
            )
            try:
                await asyncio.wait_for(enough.wait(), 30)
            finally:
                stop.set()
                await runner

            pipeline = holder[0]
            trapper = pipeline.chains[("bad", "bad")][0]
            assert trapper.quarantined
            assert trapper.stats.traps == 3  # called exactly max_failures times, then left alone
            # every reading of the bad source became an error record: nothing vanished
            bad_errors = [e for e in errors if e.source == "bad"]
            assert all(e.plugin == "trapper" and e.stage == "plugin" for e in bad_errors)
            first_q = next(i for i, e in enumerate(bad_errors) if "quarantined" in e.error)
            assert first_q >= 3  # at least one message from each of the 3 failed calls
            assert all("trap: unreachable" in e.error for e in bad_errors[:first_q])
            assert all("quarantined" in e.error for e in bad_errors[first_q:])
            # the good source never noticed
            assert not [e for e in errors if e.source == "good"]
            assert {(m.device, m.name, m.value) for m in good_after_quarantine} == {
                ("good", "level", 42.0)
            }

    asyncio.run(go())
