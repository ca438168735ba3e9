"""The demo loop for real: pymodbus boiler -> poller -> modbus_decode.wasm -> CEL rules -> coil
write."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from flux_edge.demo import demo_config
from flux_edge.demo.boiler import BoilerSimulator
from flux_edge.model import Measurement, Outcome
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers
from tests.conftest import bundled_wasm

pytestmark = pytest.mark.integration


def test_both_rules_fire_and_the_coil_really_changes(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")

    async def go() -> None:
        t0 = time.monotonic()
        # the boiler's physics at 4x speed, so a full 60..80 °C cycle takes ~5 s
        sim = BoilerSimulator(port=0, tick=0.05, clock=lambda: t0 + (time.monotonic() - t0) * 4)
        await sim.start()
        cfg = demo_config(sim.port, tmp_path / "state")
        cfg = msgspec.structs.replace(
            cfg,
            sources={
                n: msgspec.structs.replace(s, interval=0.1) for n, s in cfg.sources.items()
            },
        )
        seen: list[tuple[Outcome, bool]] = []
        temps: list[float] = []
        both = asyncio.Event()

        def on_outcome(o: Outcome) -> None:
            seen.append((o, sim.burner))  # the device's coil right after the write completed
            if {"overheat", "reheat"} <= {x.command.rule for x, _ in seen}:
                both.set()

        def on_measurements(source: str, ms: list[Measurement]) -> None:
            temps.extend(float(m.value) for m in ms if m.name == "temperature")

        stop = asyncio.Event()
        obs = Observers(measurements=[on_measurements], outcomes=[on_outcome])
        runner = asyncio.create_task(run_pipeline(cfg, observers=obs, stop=stop))
        try:
            await asyncio.wait_for(both.wait(), 60)
        finally:
            stop.set()
            await runner
            await sim.stop()

        overheat = [(o, coil) for o, coil in seen if o.command.rule == "overheat"]
        reheat = [(o, coil) for o, coil in seen if o.command.rule == "reheat"]
        assert overheat and reheat
        for o, coil in overheat:
            assert o.ok, o.error
            assert o.command.action == "burner_off" and o.verified is False and coil is False
            assert o.command.cause is not None and float(o.command.cause.value) > 80
        for o, coil in reheat:
            assert o.ok, o.error
            assert o.command.action == "burner_on" and o.verified is True and coil is True
            assert o.command.cause is not None and float(o.command.cause.value) < 60
        # the rules kept the boiler near its band (one poll of overshoot at most)
        assert max(temps) < 85 and min(temps) > 55 - 0.01

    asyncio.run(go())
