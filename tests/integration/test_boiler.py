"""The demo's simulated boiler: physics by step(dt), and its Modbus face over a real server."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from flux_edge.demo.boiler import BoilerSimulator
from flux_edge.model import FN_COIL, FN_HOLDING
from flux_edge.sources.modbus.client import ModbusTcpClient
from flux_edge.sources.modbus.plan import ReadBlock

pytestmark = pytest.mark.integration


def test_starts_at_55_with_the_burner_on_and_heats_and_cools() -> None:
    b = BoilerSimulator(port=0)
    assert b.temperature == 55.0 and b.burner is True and b.setpoint == 70.0
    assert b.server.get_holding(0) == 550 and b.server.get_holding(1) == 700
    b.step(1.0)
    assert b.temperature == pytest.approx(57.5)
    assert b.server.get_holding(0) == 575
    b.burner = False
    b.step(2.0)
    assert b.temperature == pytest.approx(53.5)
    assert b.server.get_holding(0) == 535
    for _ in range(7):
        b.step(0.1)
    assert b.temperature == pytest.approx(52.1)
    assert b.server.get_holding(0) == 521  # 0.1 °C resolution


def test_stays_between_ambient_and_the_high_limit() -> None:
    b = BoilerSimulator(port=0, start_temperature=90.0)
    for _ in range(40):
        b.step(0.1)  # 2.5 °C/s: reaches the 95 °C cut-out after 2 s
        assert b.temperature <= BoilerSimulator.HIGH_LIMIT + 0.25 + 1e-9
    assert b.burner is False  # the safety cut-out switched it off
    for _ in range(100):
        b.step(1.0)
    assert b.temperature == BoilerSimulator.AMBIENT
    assert b.server.get_holding(0) == 150


def test_a_60_80_controller_cycles_in_10_to_20_seconds() -> None:
    """What the demo's two rules do, stepped at the simulator's own 0.1 s tick."""
    b = BoilerSimulator(port=0)
    switched_on: list[float] = []
    t = 0.0
    lo, hi = 200.0, -200.0
    while t < 90.0:
        b.step(0.1)
        t += 0.1
        if t > 12.0:
            lo, hi = min(lo, b.temperature), max(hi, b.temperature)
        if b.burner and b.temperature >= 80.0:
            b.burner = False
        elif not b.burner and b.temperature <= 60.0:
            b.burner = True
            switched_on.append(t)
    periods = [b_ - a for a, b_ in itertools.pairwise(switched_on)]
    assert len(periods) >= 3
    assert all(10.0 <= p <= 20.0 for p in periods), periods
    assert lo >= 59.5, lo
    assert hi <= 80.5, hi


def test_speaks_modbus_and_takes_burner_writes() -> None:
    async def scenario() -> None:
        b = BoilerSimulator(port=0, tick=3600.0)  # the physics task stays idle: we step()
        await b.start()
        client = ModbusTcpClient("boiler", "127.0.0.1", b.port, timeout=1.0)
        try:
            assert b.port != 0
            assert await client.read(ReadBlock(FN_HOLDING, 0, 2), 1) == (550, 700)
            assert await client.read(ReadBlock(FN_COIL, 0, 1), 1) == (1,)
            await client.write_coil(0, False, 1)
            assert b.burner is False
            b.step(1.0)
            assert await client.read(ReadBlock(FN_HOLDING, 0, 1), 1) == (530,)
        finally:
            await client.close()
            await b.stop()

    asyncio.run(scenario())


def test_the_physics_task_runs_on_wall_time() -> None:
    async def scenario() -> None:
        b = BoilerSimulator(port=0, tick=0.01)
        warm = asyncio.Event()
        b.on_step = lambda temperature: warm.set() if temperature >= 55.2 else None
        await b.start()
        try:
            async with asyncio.timeout(5.0):
                await warm.wait()  # +2.5 °C/s: ~0.1 s
        finally:
            await b.stop()
        stopped_at = b.temperature
        await asyncio.sleep(0.05)
        assert b.temperature == stopped_at  # stop() ends the physics

    asyncio.run(scenario())
