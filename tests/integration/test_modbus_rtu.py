"""Modbus RTU buses: ModbusBusPoller over a baud-accurate simulated RS-485 line (two ptys and a
relay that delays every byte by its character time) with several simulated slaves on it.

Note: this machine's pty driver refuses parity bits (tcsetattr EINVAL), so the lines here run
8N1 or 8N2; a real adapter takes 8E1 the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flux_edge.errors import SourceError
from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING, FN_INPUT
from flux_edge.sources.modbus.client import ModbusRtuClient
from flux_edge.sources.modbus.poller import ModbusBusPoller
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusRtuSource, RegisterConfig
from tests.support import Collector, StatusLog, run, stop_task
from tests.support.serial_line import (
    LineProcess,
    RtuSlaves,
    SimulatedLine,
    WireFrame,
    wire_problems,
)

pytestmark = pytest.mark.integration


def reg(name: str, address: int, function: str = "holding", type: str = "uint16",
        **kw: Any) -> RegisterConfig:
    return RegisterConfig(name=name, address=address, function=function,  # type: ignore[arg-type]
                          type=type, **kw)  # type: ignore[arg-type]


def bus(
    line: SimulatedLine | LineProcess, *devices: ModbusDeviceConfig, **kw: Any
) -> ModbusRtuSource:
    return ModbusRtuSource(
        port=line.master_port,
        baudrate=line.baudrate,
        parity=line.parity,  # type: ignore[arg-type]
        stopbits=line.stopbits,
        bytesize=line.bytesize,
        devices=devices,
        **kw,
    )


def f32(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def f64(value: float) -> list[int]:
    return list(struct.unpack(">HHHH", struct.pack(">d", value)))


def ten_registers(name: str, unit: int, **kw: Any) -> ModbusDeviceConfig:
    return ModbusDeviceConfig(
        name=name, unit_id=unit, registers=(reg("block", 0, type="string", count=10),), **kw
    )


# --- wire checks --------------------------------------------------------------------------------


def check_wire(line: SimulatedLine, slaves: RtuSlaves) -> None:
    """One request at a time, with the spec's silence before every frame, seen from the wire
    and from the slaves' side."""
    problems = wire_problems(line, slaves)
    assert not problems, "\n".join(problems[:10])


def requests_to(line: SimulatedLine, unit: int) -> list[WireFrame]:
    return [f for f in line.frames_from("master") if f.data and f.data[0] == unit]


@pytest.fixture
def line38400() -> Iterator[SimulatedLine]:
    # 38400 8N1: 0.26 ms a character, 1.75 ms between frames; a 10-register read ~12 ms
    with SimulatedLine(38400, parity="N") as line:
        yield line


# --- tests --------------------------------------------------------------------------------------


def test_several_slaves_on_one_line_with_realistic_maps(line38400: SimulatedLine) -> None:
    line = line38400
    meter = ModbusDeviceConfig(
        name="meter",
        unit_id=1,
        registers=(
            reg("voltage", 0, "input", "float32"),
            reg("current", 6, "input", "float32"),
            reg("energy", 342, "input", "float64"),
            reg("serial", 64512, "holding", "string", count=4),
        ),
    )
    controller = ModbusDeviceConfig(
        name="controller",
        unit_id=2,
        interval=0.05,
        registers=(
            reg("temperature", 0, type="int16", scale=0.1),
            reg("setpoint", 1, type="int16", scale=0.1),
            reg("mode", 5),
        ),
    )
    io = ModbusDeviceConfig(
        name="io",
        unit_id=7,
        registers=(
            reg("relay1", 0, "coil", "bool"),
            reg("relay2", 1, "coil", "bool"),
            reg("door", 3, "discrete", "bool"),
        ),
    )

    async def scenario() -> None:
        slaves = RtuSlaves.on(line, (1, 2, 7), size=65536)
        slaves.set_words("input", 0, f32(230.1), unit=1)
        slaves.set_words("input", 6, f32(4.25), unit=1)
        slaves.set_words("input", 342, f64(123456.789), unit=1)
        slaves.set_words("holding", 64512, [0x534D, 0x3330, 0x2D31, 0x0000], unit=1)  # "SM30-1"
        slaves.set_words("holding", 0, [0xFF38, 700, 0, 0, 0, 2], unit=2)  # -20.0 °C, 70.0 °C
        slaves.set_words("coil", 0, [1, 0], unit=7)
        slaves.set_words("discrete", 0, [0, 0, 0, 1], unit=7)
        out = Collector()
        poller = ModbusBusPoller("rs485", bus(line, meter, controller, io, interval=0.1), out)
        with slaves:
            task = asyncio.create_task(poller.run())
            await out.wait_until(lambda: all(len(out.of(d)) >= 10 for d in poller.devices))
            await stop_task(task)
        got = {(r.device, r.function, r.address): r.registers for r in out.readings}
        assert got[("meter", FN_INPUT, 0)] == (*f32(230.1), 0, 0, 0, 0, *f32(4.25))
        assert got[("meter", FN_INPUT, 342)] == tuple(f64(123456.789))
        assert got[("meter", FN_HOLDING, 64512)] == (0x534D, 0x3330, 0x2D31, 0)
        assert got[("controller", FN_HOLDING, 0)] == (0xFF38, 700, 0, 0, 0, 2)
        assert got[("io", FN_COIL, 0)] == (1, 0)
        assert got[("io", FN_DISCRETE, 3)] == (1,)
        # coalescing, counted by the slaves: the meter's map is 3 requests a poll, the
        # controller's 1, the io's 2 (coils and discrete inputs are different functions)
        for name, unit, per_poll in (("meter", 1, 3), ("controller", 2, 1), ("io", 7, 2)):
            polls = poller.health[name].polls
            assert polls * per_poll <= slaves.request_count(unit=unit) <= (polls + 1) * per_poll
            assert poller.health[name].total_errors == 0
        # the controller asks for 0.05 s: it is polled about twice as often as the others
        n_ctrl, n_io = len(out.of("controller")), len(out.of("io")) / 2
        assert n_ctrl >= 1.5 * n_io, (n_ctrl, n_io)
        check_wire(line, slaves)

    run(scenario())


def test_a_silent_slave_costs_the_others_at_most_one_timeout_per_backoff() -> None:
    """Two saturated buses side by side (every device wants a poll every 20 ms, a line carries
    ~80 reads/s), the same three healthy slaves on each, and a fourth, silent slave on the
    second: measured over the same window (so the machine's load hits both alike; each line
    and its slaves run in a process of their own), the healthy devices' poll rate on the
    second line is within 10% of the first's. The silent one is marked bad once, probed once
    per backoff period, and recovers by itself when it answers again."""
    healthy = [ten_registers(f"dev{u}", u) for u in (1, 2, 3)]
    silent = ten_registers("dead", 9)
    window = 4.0  # the first probe comes 2 s after the device was found dead, the next 4 s later
    kw: dict[str, Any] = {"interval": 0.02, "timeout": 0.1, "backoff_max": 4.0}

    def rate(out: Collector, since: float, until: float) -> float:
        return sum(out.count(d.name, since, until) for d in healthy) / (until - since)

    async def scenario() -> None:
        line_a = LineProcess(38400, (1, 2, 3), parity="N", record=True)
        line_b = LineProcess(38400, (1, 2, 3, 9), parity="N", record=True)
        try:
            line_b.silence(9)
            out_a, out_b, status = Collector(), Collector(), StatusLog()
            poller_a = ModbusBusPoller("a", bus(line_a, *healthy, **kw), out_a)
            poller_b = ModbusBusPoller(
                "b", bus(line_b, *healthy, silent, **kw), out_b, on_status=status, backoff_min=2.0
            )
            tasks = [asyncio.create_task(p.run()) for p in (poller_a, poller_b)]
            await status.wait_for("dead", "bad")
            t_bad = time.monotonic()
            await asyncio.sleep(window)
            t_end = time.monotonic()
            alone, together = rate(out_a, t_bad, t_end), rate(out_b, t_bad, t_end)
            stats_b = line_b.stats()
            dead_requests = [r for r in stats_b["log"] if r[0] == 9 and r[2] > t_bad]

            # it speaks again: it recovers by itself
            line_b.silence(9, False)
            await status.wait_for("dead", "good")
            await out_b.wait_until(lambda: len(out_b.of("dead")) >= 3)
            for task in tasks:
                await stop_task(task)
            for line in (line_a, line_b):
                problems = line.stats()["problems"]
                assert not problems, "\n".join(problems[:10])
        finally:
            line_a.close()
            line_b.close()

        for d in healthy:
            assert poller_a.health[d.name].total_errors == 0
            assert poller_b.health[d.name].total_errors == 0
        loss = 1 - together / alone
        assert loss <= 0.10, (
            f"healthy poll rate {alone:.1f}/s without, {together:.1f}/s with a silent slave on "
            f"the line: {loss:.1%} lost"
        )
        assert alone > 40  # the bus was really saturated (80 reads/s at most)
        # the dead device was asked once per backoff period, one attempt each
        assert 1 <= len(dead_requests) <= 2, dead_requests
        for a, b in itertools.pairwise(dead_requests):
            assert b[2] - a[2] >= 3.9
        # on_status: bad once, good once; nothing about the healthy ones
        assert [q for q, _ in status.of("dead")] == ["bad", "good"]
        assert "no response" in status.of("dead")[0][1] and "unit 9" in status.of("dead")[0][1]
        assert not [c for c in status.calls if c[0] != "dead"]
        h = poller_b.health["dead"]
        assert h.quality == "good" and h.consecutive_errors == 0 and h.total_errors >= 2

    run(scenario(), timeout=60)


def test_writes_and_polls_share_the_line_one_at_a_time(line38400: SimulatedLine) -> None:
    line = line38400
    devices = [ten_registers("a", 1), ten_registers("b", 2)]

    async def scenario() -> None:
        with RtuSlaves.on(line, (1, 2)) as slaves:
            out = Collector()
            poller = ModbusBusPoller("rs485", bus(line, *devices, interval=0.01), out)
            task = asyncio.create_task(poller.run())
            await out.wait_for(4)
            results = await asyncio.gather(
                *(poller.write("b", "holding", 100 + i, 1000 + i, verify=True) for i in range(8)),
                *(poller.write("a", "coil", i, True, verify=True) for i in range(4)),
            )
            await out.wait_for(len(out.readings) + 4)  # polls carry on
            await stop_task(task)
            assert results == [1000 + i for i in range(8)] + [True] * 4
            assert [slaves.get_holding(100 + i, unit=2) for i in range(8)] == [
                1000 + i for i in range(8)
            ]
            assert all(slaves.get_coil(i, unit=1) for i in range(4))
            with pytest.raises(SourceError, match="2 devices"):
                await poller.write("", "coil", 0, True, verify=False)
            with pytest.raises(SourceError, match="no device 'c'"):
                await poller.write("c", "coil", 0, True, verify=False)
            check_wire(line, slaves)

    run(scenario())


def test_timeout_counts_from_the_end_of_the_frames_on_the_wire() -> None:
    """At 9600 baud a 125-register answer takes 266 ms on the wire: a 0.2 s response timeout
    must not cut it short; a silent slave still fails after about the timeout."""

    async def scenario() -> None:
        with SimulatedLine(9600, parity="N") as line, RtuSlaves.on(line, (1, 2)) as slaves:
            slaves.set_words("holding", 0, range(125), unit=1)
            slaves.silence(2)
            big = ModbusDeviceConfig(
                name="big", unit_id=1, registers=(reg("s", 0, type="string", count=125),)
            )
            mute = ModbusDeviceConfig(name="mute", unit_id=2, registers=(reg("x", 0),))
            out = Collector()
            poller = ModbusBusPoller("slow", bus(line, big, mute, timeout=0.2, retries=0), out)
            try:
                t0 = time.monotonic()
                await poller.poll_once("big")
                assert time.monotonic() - t0 >= 8 * line.char_time + 255 * line.char_time
                assert out.readings[0].registers == tuple(range(125))
                t0 = time.monotonic()
                with pytest.raises(SourceError, match=r"unit 2: no response") as err:
                    await poller.poll_once("mute")
                elapsed = time.monotonic() - t0
                assert 0.2 <= elapsed < 0.6, elapsed
                assert line.master_port in str(err.value)
            finally:
                await poller.close()

    run(scenario())


def test_a_port_that_cannot_be_opened_marks_every_device_bad(tmp_path: Any) -> None:
    port = str(tmp_path / "ttyUSB9")

    async def scenario() -> None:
        devices = (ten_registers("a", 1), ten_registers("b", 2))
        cfg = ModbusRtuSource(port=port, devices=devices, interval=0.05, baudrate=19200)
        status = StatusLog()
        poller = ModbusBusPoller("rs485", cfg, Collector(), on_status=status)
        with pytest.raises(SourceError) as err:
            await poller.poll_once("a")
        msg = str(err.value)
        assert f"cannot open {port} (19200 baud 8E1)" in msg and "plugged in" in msg
        task = asyncio.create_task(poller.run())
        await status.wait_for("a", "bad")
        await status.wait_for("b", "bad")
        await stop_task(task)
        h = poller.health["a"]
        assert h.quality == "bad" and "cannot open" in h.last_error

    run(scenario())


def test_a_cancellation_that_comes_with_an_answer_still_stops_the_poller(
    line38400: SimulatedLine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's asyncio.wait_for (pymodbus awaits answers with it) drops a cancellation
    that arrives in the same loop iteration as the answer. The poller must stop anyway, or a
    daemon's shutdown would hang on it. The cancel is made from inside the client's receive
    path, just before pymodbus completes the answer: exactly that race."""
    line = line38400
    armed: list[asyncio.Task[None]] = []
    receive = ModbusRtuClient._trace_packet

    def cancel_with_the_answer(self: ModbusRtuClient, sending: bool, data: bytes) -> bytes:
        if not sending and len(data) >= 25 and armed:  # a whole 10-register answer
            armed.pop().cancel()
        return receive(self, sending, data)

    monkeypatch.setattr(ModbusRtuClient, "_trace_packet", cancel_with_the_answer)

    async def scenario() -> None:
        with RtuSlaves.on(line, (1,)):
            out = Collector()
            poller = ModbusBusPoller("rs485", bus(line, ten_registers("a", 1), interval=0.01), out)
            task = asyncio.create_task(poller.run())
            await out.wait_for(2)
            armed.append(task)
            done, _ = await asyncio.wait({task}, timeout=2.0)
            assert done, "the poller went on polling after it was cancelled"
            assert task.cancelled()
            assert not poller.health["a"].total_errors

    run(scenario())
