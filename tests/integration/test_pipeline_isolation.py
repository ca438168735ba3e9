"""A plugin that traps on every call is quarantined, and the pipeline keeps serving another source.

Real parts: two pymodbus servers, the real poller, the real wasm host running modbus_decode.wasm
for the good source and the echo.wat fixture, told to hit `unreachable`, for the bad one.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from flux_edge.kinds import load_config_text
from flux_edge.model import ErrorRecord, Measurement
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers, Pipeline
from flux_edge.sim.modbus_server import SimulatedModbusServer
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


QUALITY_CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.modbus_decode]

[sources.tank]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "50ms"
timeout = "200ms"
backoff_max = "200ms"
chain = ["modbus_decode"]
registers = [{{ name = "level", address = 0, type = "uint16" }}]

[rules.low]
device = "tank"
when = "level < 10"
mode = "level"
actions = []
"""


def test_a_device_that_stops_answering_has_its_measurements_marked_bad_then_recovers(
    tmp_path: Path,
) -> None:
    bundled_wasm("modbus_decode")

    async def go() -> None:
        server = SimulatedModbusServer(port=0)
        await server.start()
        port = server.port
        server.set_holding(0, 5)
        text = QUALITY_CONFIG.format(state=tmp_path / "state", port=port)
        config = load_config_text(text, str(tmp_path / "site.toml"))

        seen: list[Measurement] = []
        first_good, bad, good_again = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def on_measurements(source: str, ms: list[Measurement]) -> None:
            for m in ms:
                seen.append(m)
                if m.quality == "good":
                    (good_again if bad.is_set() else first_good).set()
                elif m.quality == "bad" and not bad.is_set():
                    stats = holder[0].engine.stats["low"]
                    at_bad.extend([stats.firings, stats.skipped])
                    bad.set()

        holder: list[Pipeline] = []
        at_bad: list[int] = []
        stop = asyncio.Event()
        runner = asyncio.create_task(
            run_pipeline(config, observers=Observers(measurements=[on_measurements]), stop=stop,
                         started=holder.append)
        )
        try:
            await asyncio.wait_for(first_good.wait(), 10)
            await server.stop()  # the device goes silent
            await asyncio.wait_for(bad.wait(), 10)
            await holder[0].measurements.join()  # the rule stage has seen the bad measurement
            after_bad = holder[0].engine.stats["low"]
            firings_after_bad, skipped_after_bad = after_bad.firings, after_bad.skipped
            server = SimulatedModbusServer(port=port)  # ... and comes back on the same port
            await server.start()
            server.set_holding(0, 5)
            await asyncio.wait_for(good_again.wait(), 10)
        finally:
            stop.set()
            await runner
            await server.stop()

        marked = [m for m in seen if m.quality == "bad"]
        assert [(m.device, m.name, m.value) for m in marked] == [("tank", "level", 5.0)]
        # the level rule fired on good readings; the bad one was skipped, not a firing
        firings_at_bad, skipped_at_bad = at_bad
        assert firings_at_bad >= 1
        assert firings_after_bad == firings_at_bad
        assert skipped_after_bad == skipped_at_bad + 1
        assert holder[0].engine.stats["low"].firings > firings_after_bad  # fires again after
        assert holder[0].sources["tank"].health["tank"].quality == "good"

    asyncio.run(go())
