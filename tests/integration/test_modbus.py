"""Modbus TCP client, poller and write action against real pymodbus servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_edge.actions.modbus_write import ModbusWriteExecutor
from flux_edge.actions.modbus_write_kind import ModbusWriteAction
from flux_edge.errors import SourceError
from flux_edge.model import (
    FN_COIL,
    FN_DISCRETE,
    FN_HOLDING,
    FN_INPUT,
    KIND_REGISTERS,
    Command,
    Reading,
)
from flux_edge.sim.modbus_server import SimulatedModbusServer
from flux_edge.sources import SourceHealth
from flux_edge.sources.modbus.client import ModbusTcpClient
from flux_edge.sources.modbus.link import ModbusExceptionResponse
from flux_edge.sources.modbus.plan import ReadBlock
from flux_edge.sources.modbus.poller import ModbusBusPoller, ModbusTcpPoller
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusTcpSource, RegisterConfig
from tests.support import Collector, StatusLog, VirtualTime, run, stop_task

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def only(health: dict[str, SourceHealth]) -> SourceHealth:
    """The health of a single-device source."""
    (h,) = health.values()
    return h


def reg(address: int, function: str = "holding", type: str = "uint16") -> RegisterConfig:
    return RegisterConfig(
        name=f"r{function}{address}", address=address, function=function, type=type  # type: ignore[arg-type]
    )


def source(port: int, registers: list[RegisterConfig], **kw: Any) -> ModbusTcpSource:
    return ModbusTcpSource(host=HOST, port=port, registers=tuple(registers), **kw)


class SilentServer:
    """Accepts TCP connections, reads what it is sent, never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while await reader.read(1024):
            pass
        writer.close()

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


# --- client -------------------------------------------------------------------------------------


def test_reads_every_function_from_several_units() -> None:
    units = (1, 17, 247)

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=units) as srv:
            for u in units:
                for i in range(4):
                    srv.set_holding(10 + i, u * 100 + i, device_id=u)
                    srv.set_input(i, u * 200 + i, device_id=u)
                srv.set_coil(u % 5, True, device_id=u)
                srv.set_discrete(17, True, device_id=u)
                srv.set_discrete(u % 19, True, device_id=u)
            client = ModbusTcpClient("dev", HOST, srv.port, timeout=1.0)
            try:
                for u in units:
                    assert await client.read(ReadBlock(FN_HOLDING, 10, 4), u) == tuple(
                        u * 100 + i for i in range(4)
                    )
                    assert await client.read(ReadBlock(FN_INPUT, 1, 3), u) == tuple(
                        u * 200 + i for i in range(1, 4)
                    )
                    coils = await client.read(ReadBlock(FN_COIL, 0, 5), u)
                    assert coils == tuple(1 if i == u % 5 else 0 for i in range(5))
                    discretes = await client.read(ReadBlock(FN_DISCRETE, 0, 19), u)
                    assert len(discretes) == 19
                    assert {i for i, v in enumerate(discretes) if v} == {17, u % 19}
            finally:
                await client.close()
            for u in units:
                assert srv.request_count(device_id=u) == 4
            assert srv.connections == 1

    run(scenario())


def test_exception_responses_name_the_code_and_keep_the_connection() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=64) as srv:
            client = ModbusTcpClient("boiler", HOST, srv.port, timeout=1.0)
            try:
                with pytest.raises(ModbusExceptionResponse) as err:
                    await client.read(ReadBlock(FN_HOLDING, 60, 10), 1)
                msg = str(err.value)
                assert err.value.code == 2
                assert "0x02 ILLEGAL_DATA_ADDRESS" in msg
                assert f"{HOST}:{srv.port} unit 1" in msg
                assert "boiler" in msg and "60..69" in msg
                with pytest.raises(SourceError, match=r"unit 9: .*0x0b"):
                    await client.read(ReadBlock(FN_HOLDING, 0, 1), 9)
                assert await client.read(ReadBlock(FN_HOLDING, 0, 2), 1) == (0, 0)
            finally:
                await client.close()
            assert srv.connections == 1  # exception responses do not cost a reconnect

    run(scenario())


def test_timeout_when_the_device_never_answers() -> None:
    async def scenario() -> None:
        async with SilentServer() as silent:
            client = ModbusTcpClient("mute", HOST, silent.port, timeout=0.3)
            try:
                t0 = time.monotonic()
                with pytest.raises(SourceError) as err:
                    await client.read(ReadBlock(FN_HOLDING, 0, 4), 3)
                elapsed = time.monotonic() - t0
                assert 0.25 <= elapsed < 1.0
                assert f"{HOST}:{silent.port} unit 3: no response" in str(err.value)
                assert "0.3 s" in str(err.value)
                # the connection was dropped: the next call reconnects
                with pytest.raises(SourceError):
                    await client.write_coil(0, True, 3)
                assert silent.connections == 2
            finally:
                await client.close()

    run(scenario())


def test_connection_refused(port: int) -> None:
    async def scenario() -> None:
        client = ModbusTcpClient("gone", HOST, port, timeout=2.0)
        t0 = time.monotonic()
        with pytest.raises(SourceError) as err:
            await client.read(ReadBlock(FN_HOLDING, 0, 1), 1)
        assert time.monotonic() - t0 < 1.0  # refused at once, not timed out
        assert f"cannot connect to {HOST}:{port}: connection refused" in str(err.value)
        assert err.value.source == "gone"
        await client.close()

    run(scenario())


def test_reconnects_on_the_next_call_after_the_device_restarts(port: int) -> None:
    async def scenario() -> None:
        client = ModbusTcpClient("dev", HOST, port, timeout=1.0)
        srv = SimulatedModbusServer(HOST, port)
        srv.set_holding(0, 7)
        await srv.start()
        try:
            assert await client.read(ReadBlock(FN_HOLDING, 0, 1), 1) == (7,)
            await srv.stop()
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"closed the connection|connection refused"):
                await client.read(ReadBlock(FN_HOLDING, 0, 1), 1)
            assert time.monotonic() - t0 < 0.5  # a closed connection fails fast, not by timeout
            srv = SimulatedModbusServer(HOST, port)
            srv.set_holding(0, 8)
            await srv.start()
            assert await client.read(ReadBlock(FN_HOLDING, 0, 1), 1) == (8,)
        finally:
            await client.close()
            await srv.stop()

    run(scenario())


# --- poller -------------------------------------------------------------------------------------


def test_poller_coalesces_reads_and_emits_one_reading_per_request() -> None:
    regs = [
        reg(0), reg(1), reg(2), reg(5, type="uint32"), reg(40),
        reg(0, "coil", "bool"), reg(3, "coil", "bool"), reg(100, "coil", "bool"),
    ]

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=4) as srv:
            for a in range(7):
                srv.set_holding(a, 1000 + a, device_id=4)
            srv.set_holding(40, 40, device_id=4)
            srv.set_coil(3, True, device_id=4)
            out = Collector()
            cfg = source(srv.port, regs, unit_id=4, max_gap=8, device="boiler-1")
            poller = ModbusTcpPoller("plant", cfg, out, wall=lambda: 1234.5)
            try:
                await poller.poll_once()
            finally:
                await poller.close()
            # holding 0..6 (gap 3..4 bridged) + 40, coils 0..3 + 100: 4 requests, not 8
            assert srv.request_count() == 4
            assert srv.request_count(FN_HOLDING) == 2 and srv.request_count(FN_COIL) == 2
            got = {(r.function, r.address): r for r in out.readings}
            assert set(got) == {(3, 0), (3, 40), (1, 0), (1, 100)}
            assert got[(3, 0)].registers == tuple(1000 + a for a in range(7))
            assert got[(3, 40)].registers == (40,)
            assert got[(1, 0)].registers == (0, 0, 0, 1)
            assert got[(1, 100)].registers == (0,)
            for r in out.readings:
                assert (r.source, r.device, r.kind) == ("plant", "boiler-1", KIND_REGISTERS)
                assert r.ts == 1234.5

            srv.requests.clear()
            poller = ModbusTcpPoller("plant", source(srv.port, regs, unit_id=4, max_gap=0), out)
            try:
                await poller.poll_once()
            finally:
                await poller.close()
            assert srv.request_count() == 6  # 0..2, 5..6, 40 and coils 0, 3, 100
            assert out.readings[-1].device == "plant"  # default device name: the source name

    run(scenario())


def test_poller_keeps_a_fixed_schedule_without_drift() -> None:
    interval = 0.5

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            vt = VirtualTime()
            out = Collector(clock=vt.clock)

            async def slow_consumer(_: int) -> None:
                vt.advance(0.2)  # each poll costs 0.2 s: a sleep(interval) loop would drift

            out.work = slow_consumer
            cfg = source(srv.port, [reg(0)], interval=interval)
            poller = ModbusTcpPoller("p", cfg, out, clock=vt.clock, sleep=vt.sleep)
            task = asyncio.create_task(poller.run())
            await out.wait_for(20)
            await stop_task(task)
            t0 = out.times[0]
            for k, t in enumerate(out.times):
                assert t - t0 == pytest.approx(k * interval), (k, out.times)
            assert only(poller.health).missed_polls == 0 and only(poller.health).total_errors == 0

    run(scenario())


def test_poller_skips_and_counts_slots_missed_by_an_overrun() -> None:
    interval = 0.5

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            vt = VirtualTime()
            out = Collector(clock=vt.clock)

            async def one_slow_poll(n: int) -> None:
                if n == 2:
                    vt.advance(1.3)  # poll 1 (due at 0.5) ends at 1.8: slots 1.0 and 1.5 passed

            out.work = one_slow_poll
            cfg = source(srv.port, [reg(0)], interval=interval)
            poller = ModbusTcpPoller("p", cfg, out, clock=vt.clock, sleep=vt.sleep)
            task = asyncio.create_task(poller.run())
            await out.wait_for(6)
            await stop_task(task)
            t0 = out.times[0]
            slots = [(t - t0) / interval for t in out.times]
            # the latest slot already due (1.5) runs at once, late; the one before it (1.0) is
            # skipped and counted; then the schedule is back on its grid
            assert slots == pytest.approx([0, 1, 3.6, 4, 5, 6]), slots
            assert only(poller.health).missed_polls == 1

    run(scenario())


def test_poller_schedule_on_the_real_clock() -> None:
    interval = 0.2

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            out = Collector()

            async def slow_consumer(_: int) -> None:
                await asyncio.sleep(0.05)  # would add up to 0.25 s of drift over 6 polls

            out.work = slow_consumer
            poller = ModbusTcpPoller("p", source(srv.port, [reg(0)], interval=interval), out)
            task = asyncio.create_task(poller.run())
            await out.wait_for(6)
            await stop_task(task)
            t0 = out.times[0]
            # a poll runs in its own slot's window (on time, or late after a stall), so each
            # lands on its own slot; slots lost to an overrun are skipped, and those are counted
            slots = [math.floor((t - t0) / interval + 0.25) for t in out.times]
            assert slots == sorted(set(slots)), out.times
            assert slots[-1] == len(slots) - 1 + only(poller.health).missed_polls, out.times

    run(scenario())


def test_poller_backs_off_on_a_dead_device_and_recovers(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flux_edge.source.dead")

    async def scenario() -> None:
        out = Collector()
        cfg = source(port, [reg(0)], interval=0.02, timeout=0.5, backoff_max=0.2)
        poller = ModbusTcpPoller("dead", cfg, out, backoff_min=0.05)
        task = asyncio.create_task(poller.run())
        srv: SimulatedModbusServer | None = None
        try:
            await asyncio.sleep(0.8)  # a window to count attempts in
            h = only(poller.health)
            # every 20 ms would be ~40 attempts; backing off 0.05, 0.1, 0.2, 0.2 ... gives ~6
            assert 3 <= h.total_errors <= 10, h
            assert h.consecutive_errors == h.total_errors
            assert h.quality == "bad" and h.last_success_ts is None
            assert "connection refused" in h.last_error and f"{HOST}:{port}" in h.last_error
            srv = SimulatedModbusServer(HOST, port)
            srv.set_holding(0, 42)
            await srv.start()
            await asyncio.wait_for(out.wait_for(1), 2.0)
            assert out.readings[0].registers == (42,)
            h = only(poller.health)
            assert h.quality == "good" and h.consecutive_errors == 0
            assert h.last_success_ts is not None
        finally:
            await stop_task(task)
            if srv is not None:
                await srv.stop()
        records = [r for r in caplog.records if r.name == "flux_edge.source.dead"]
        warnings = [r for r in records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per state change
        assert "connection refused" in warnings[0].getMessage()
        recovered = [r for r in records if "answers again" in r.getMessage()]
        assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
        # pymodbus' own "Failed to connect" warnings are not repeated on every retry (other
        # pymodbus lines, e.g. a late reply "without a corresponding request" as the device
        # comes back, are routed and rate-limited: tests/integration/test_modbus_faults.py)
        assert not [r for r in caplog.records if r.name.startswith("pymodbus") and
                    r.levelno >= logging.WARNING and "Failed to connect" in r.getMessage()]

    run(scenario())


def test_poller_survives_a_failing_consumer_and_reports_exception_responses() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, size=32) as srv:
            out = Collector()

            async def fail_once(n: int) -> None:
                if n == 1:
                    raise RuntimeError("queue exploded")

            out.work = fail_once
            cfg = source(srv.port, [reg(0), reg(31, type="uint32")], interval=0.02, max_gap=0)
            poller = ModbusTcpPoller("p", cfg, out)
            task = asyncio.create_task(poller.run())
            await out.wait_for(3)
            await stop_task(task)
            h = only(poller.health)
            # holding 31 exists, but 32 does not: every poll gets one exception response,
            # and the block at 0 is still read and emitted every time
            assert all(r.address == 0 for r in out.readings)
            assert "ILLEGAL_DATA_ADDRESS" in h.last_error
            # every poll failed (the first by the consumer), but the device answers: it is good
            # and nothing backs off
            assert h.total_errors == h.polls and h.quality == "good"
            assert h.last_success_ts is None  # no poll read every block
            assert srv.connections == 1  # no reconnect, no backoff for a device that answers

    run(scenario())


def test_writes_share_the_pollers_connection() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            out = Collector()
            cfg = source(srv.port, [reg(a) for a in range(10)], interval=0.005)
            poller = ModbusTcpPoller("p", cfg, out)
            task = asyncio.create_task(poller.run())
            try:
                await out.wait_for(1)
                results = await asyncio.gather(
                    *(poller.write("", "holding", 100 + i, i * 3, verify=True) for i in range(20)),
                    *(poller.write("", "coil", i, i % 2 == 0, verify=True) for i in range(20)),
                )
                await out.wait_for(len(out.readings) + 2)  # polls carry on
            finally:
                await stop_task(task)
            assert results == [i * 3 for i in range(20)] + [i % 2 == 0 for i in range(20)]
            assert [srv.get_holding(100 + i) for i in range(20)] == [i * 3 for i in range(20)]
            assert srv.connections == 1
            assert only(poller.health).total_errors == 0

    run(scenario())


# --- modbus_write action ------------------------------------------------------------------------

CMD = Command(rule="too_hot", action="burner_off", ts=0.0)


def executor(
    port: int, *, timeout: float = 1.0, source_timeout: float = 1.0, **action: Any
) -> tuple[ModbusWriteExecutor, ModbusTcpPoller]:
    cfg = source(port, [reg(0)], timeout=source_timeout, unit_id=1)

    async def discard(_: Reading) -> None:
        return None

    poller = ModbusTcpPoller("boiler", cfg, discard)
    acfg = ModbusWriteAction(source="boiler", timeout=timeout, **action)
    return ModbusWriteExecutor("burner_off", acfg, poller, wall=lambda: 99.0), poller


def test_write_action_verifies_by_reading_back() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            srv.set_coil(0, True)
            ex, poller = executor(srv.port, address=0, value=False, function="coil")
            seen = asyncio.create_task(srv.next_write())
            try:
                outcome = await ex.execute(CMD)
            finally:
                await poller.close()
            assert outcome.ok, outcome.error
            assert outcome.verified is False and outcome.error == ""
            assert outcome.command is CMD and outcome.ts == 99.0
            assert 0 < outcome.latency_s < 1.0
            assert srv.get_coil(0) is False
            write = await seen
            assert (write.table, write.address, write.values) == ("coil", 0, (0,))
            assert srv.request_count(5) == 1 and srv.request_count(FN_COIL) == 1  # write + read

            ex, poller = executor(srv.port, address=7, value=-5, function="holding")
            try:
                outcome = await ex.execute(CMD)
            finally:
                await poller.close()
            assert outcome.ok and outcome.verified == -5
            assert srv.get_holding(7) == 65531

            ex, poller = executor(srv.port, address=8, value=1, function="holding", verify=False)
            try:
                outcome = await ex.execute(CMD)
            finally:
                await poller.close()
            assert outcome.ok and outcome.verified is None and srv.get_holding(8) == 1

    run(scenario())


def test_write_accepted_but_not_taken_is_a_failure() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            srv.ignore_writes("coil", 0)
            ex, poller = executor(srv.port, address=0, value=True, function="coil")
            try:
                outcome = await ex.execute(CMD)
            finally:
                await poller.close()
            assert not outcome.ok
            assert "read-back mismatch: wrote True, read False" in outcome.error
            assert outcome.verified is False
            assert srv.writes[-1].requested == (1,)  # the device did receive the write
            assert len(srv.writes) == 2  # tried again (retries = 1), then reported

    run(scenario())


def test_a_write_that_does_not_take_is_retried() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0) as srv:
            srv.ignore_writes("coil", 0)  # the first write is acknowledged but not applied ...

            def applied_from_now_on(_write: object) -> None:
                srv._ignored.clear()  # ... the retry is

            srv.on_write = applied_from_now_on
            ex, poller = executor(srv.port, address=0, value=True, function="coil")
            try:
                outcome = await ex.execute(CMD)
            finally:
                await poller.close()
            assert outcome.ok, outcome.error
            assert outcome.verified is True and srv.get_coil(0) is True
            assert len(srv.writes) == 2

    run(scenario())


def test_write_action_is_bounded_by_its_timeout() -> None:
    async def scenario() -> None:
        async with SilentServer() as silent:
            ex, poller = executor(
                silent.port, timeout=0.2, source_timeout=5.0, address=0, value=True
            )
            try:
                t0 = time.monotonic()
                outcome = await ex.execute(CMD)
                elapsed = time.monotonic() - t0
            finally:
                await poller.close()
            assert not outcome.ok
            assert "0.2 s (timeout)" in outcome.error and "burner_off" in outcome.error
            assert elapsed < 0.6 and outcome.latency_s < 0.6

    run(scenario())


def test_write_to_a_dead_device_is_an_outcome_not_an_exception(port: int) -> None:
    async def scenario() -> None:
        ex, poller = executor(port, address=0, value=True)
        try:
            outcome = await ex.execute(CMD)
        finally:
            await poller.close()
        assert not outcome.ok
        assert "connection refused" in outcome.error and f"{HOST}:{port}" in outcome.error

    run(scenario())


# --- several devices behind one endpoint (issue #3) ---------------------------------------------


def device(name: str, unit: int, *regs: RegisterConfig, **kw: Any) -> ModbusDeviceConfig:
    return ModbusDeviceConfig(name=name, unit_id=unit, registers=regs, **kw)


def point(name: str, address: int, function: str = "holding", type: str = "uint16",
          **kw: Any) -> RegisterConfig:
    return RegisterConfig(name=name, address=address, function=function,  # type: ignore[arg-type]
                          type=type, **kw)  # type: ignore[arg-type]


_FORMATS = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
            "int64": "q", "uint64": "Q", "float64": "d"}


def encode(type: str, value: Any, byte_order: str, word_order: str, count: int = 0) -> list[int]:
    """A value as a device lays it out in registers (most significant word first unless
    word_order is little; each word's bytes swapped when byte_order is little)."""
    if type == "string":
        raw = value.encode("ascii").ljust(2 * count, b"\0")
    elif type == "bool":
        raw = (1 if value else 0).to_bytes(2, "big")
    else:
        raw = struct.pack(">" + _FORMATS[type], value)
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def decode(type: str, words: tuple[int, ...], byte_order: str, word_order: str) -> Any:
    """The inverse of ``encode``: the test's own check that its layouts are faithful."""
    parts = [w.to_bytes(2, "big") for w in words]
    if byte_order == "little":
        parts = [p[::-1] for p in parts]
    if word_order == "little":
        parts.reverse()
    raw = b"".join(parts)
    if type == "string":
        return raw.rstrip(b"\0").decode("ascii")
    if type == "bool":
        return raw != b"\0\0"
    return struct.unpack(">" + _FORMATS[type], raw)[0]


def test_several_units_behind_one_endpoint_with_realistic_maps() -> None:
    # an SDM-style energy meter (input float32s), a PV inverter (holding: uint32 power,
    # int16 temperature, a model string) and an I/O module, on one gateway
    meter = device(
        "meter", 1,
        point("voltage", 0, "input", "float32"),
        point("current", 6, "input", "float32"),
        point("power", 12, "input", "float32"),
        point("frequency", 70, "input", "float32"),
        point("energy", 342, "input", "float32"),
    )
    inverter = device(
        "inverter", 3,
        point("ac_power", 30775, type="uint32", word_order="big"),
        point("temp", 30953, type="int16", scale=0.1),
        point("model", 40000, type="string", count=8),
        point("total", 30513, type="uint64"),
    )
    io = device(
        "io", 7,
        point("relay1", 0, "coil", "bool"), point("relay2", 1, "coil", "bool"),
        point("input1", 0, "discrete", "bool"),
    )

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=(1, 3, 7), size=65536) as srv:
            for addr, value in ((0, 231.4), (6, 5.125), (12, 1180.0), (70, 49.98), (342, 8812.5)):
                srv.set_words("input", addr, encode("float32", value, "big", "big"), device_id=1)
            srv.set_words("holding", 30775, encode("uint32", 4_321_000, "big", "big"), device_id=3)
            srv.set_words("holding", 30953, encode("int16", -125, "big", "big"), device_id=3)
            srv.set_words("holding", 40000, encode("string", "SB5.0-1AV", "big", "big", 8),
                          device_id=3)
            srv.set_words("holding", 30513, encode("uint64", 2**40 + 7, "big", "big"),
                          device_id=3)
            srv.set_words("coil", 0, [1, 1], device_id=7)
            out = Collector()
            cfg = ModbusTcpSource(host=HOST, port=srv.port, devices=(meter, inverter, io))
            poller = ModbusBusPoller("gateway", cfg, out)
            try:
                for name in poller.devices:
                    await poller.poll_once(name)
            finally:
                await poller.close()
            got = {(r.device, r.function, r.address): r.registers for r in out.readings}
            assert all(r.source == "gateway" for r in out.readings)
            words = got[("meter", FN_INPUT, 0)]
            assert decode("float32", words[0:2], "big", "big") == pytest.approx(231.4)
            assert decode("float32", words[12:14], "big", "big") == 1180.0
            assert decode("float32", got[("meter", FN_INPUT, 342)], "big", "big") == 8812.5
            assert decode("uint32", got[("inverter", FN_HOLDING, 30775)], "big", "big") == 4321000
            assert decode("string", got[("inverter", FN_HOLDING, 40000)], "big", "big") == \
                "SB5.0-1AV"
            # coalescing, counted by the server: meter 0..13 (gap 2..5 and 8..11 bridged), 70,
            # 342; inverter 30513..30516, 30775..30776, 30953, 40000..40007; io: coils, inputs
            assert srv.request_count(device_id=1) == 3
            assert srv.request_count(device_id=3) == 4
            assert srv.request_count(FN_COIL, 7) == 1 and srv.request_count(FN_DISCRETE, 7) == 1
            assert poller.plans["meter"][0].blocks[0] == ReadBlock(FN_INPUT, 0, 14)

    run(scenario())


_TYPES = ("bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
          "string")
_ORDERS = ("big", "little")


@st.composite
def points_st(draw: st.DrawFn) -> tuple[str, str, str, str, Any, int]:
    """(table, type, byte order, word order, value, string count)."""
    type = draw(st.sampled_from(_TYPES))
    table = draw(st.sampled_from(("holding", "input")))
    count = 0
    if type == "bool":
        value: Any = draw(st.booleans())
    elif type == "string":
        count = draw(st.integers(1, 12))
        value = draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                             max_size=2 * count))
    elif type.startswith("float"):
        value = draw(st.floats(allow_nan=False, width=32 if type == "float32" else 64))
    else:
        bits = {"16": 16, "32": 32, "64": 64}[type[-2:]]
        lo, hi = (0, 2**bits - 1) if type.startswith("u") else (-(2 ** (bits - 1)),
                                                                 2 ** (bits - 1) - 1)
        value = draw(st.integers(lo, hi))
    return (table, type, draw(st.sampled_from(_ORDERS)), draw(st.sampled_from(_ORDERS)),
            value, count)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(points_st(), st.integers(0, 12)), min_size=1, max_size=25),
       st.integers(0, 10))
def test_every_type_and_order_round_trips_at_the_register_level(
    points: list[tuple[tuple[str, str, str, str, Any, int], int]], max_gap: int
) -> None:
    """Encode each value as a device would (every type, byte and word order), put the words in
    a real server, poll them through the coalesced plan, and get exactly those words back in
    the readings (decoding numbers is the modbus_decode plugin's job; the words decode to the
    value here only to check the test's own layouts)."""
    regs: list[RegisterConfig] = []
    layout: list[tuple[RegisterConfig, list[int]]] = []
    next_free = {"holding": 0, "input": 0}
    for i, ((table, type, byte_order, word_order, value, count), gap) in enumerate(points):
        words = encode(type, value, byte_order, word_order, count)
        r = point(f"p{i}", next_free[table] + gap, table, type, byte_order=byte_order,
                  word_order=word_order, count=count)
        next_free[table] = r.address + len(words)
        regs.append(r)
        layout.append((r, words))
        back = decode(type, tuple(words), byte_order, word_order)
        assert back == value or (type.startswith("float") and math.isclose(back, value)) or (
            type == "float32" and back == struct.unpack(">f", struct.pack(">f", value))[0]
        )

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=5, size=512) as srv:
            for r, words in layout:
                srv.set_words(r.function, r.address, words, device_id=5)  # type: ignore[arg-type]
            out = Collector()
            cfg = ModbusTcpSource(host=HOST, port=srv.port, max_gap=max_gap,
                                  devices=(device("dut", 5, *regs),))
            poller = ModbusBusPoller("rt", cfg, out)
            try:
                await poller.poll_once("dut")
            finally:
                await poller.close()
            blocks = [b for g in poller.plans["dut"] for b in g.blocks]
            assert srv.request_count(device_id=5) == len(blocks)  # one request per block
            assert len(out.readings) == len(blocks)
            for r, words in layout:
                fn = FN_HOLDING if r.function == "holding" else FN_INPUT
                (reading,) = [
                    x for x in out.readings
                    if x.function == fn and x.address <= r.address
                    and r.address + len(words) <= x.address + len(x.registers)
                ]
                off = r.address - reading.address
                assert list(reading.registers[off : off + len(words)]) == words, r

    run(scenario())


def test_per_point_intervals_on_virtual_time() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1) as srv:
            vt = VirtualTime()
            out = Collector(clock=vt.clock)
            dev = device(
                "plc", 1,
                point("pressure", 0, interval=0.25),  # fast
                point("flow", 1, interval=0.25),
                point("level", 10),  # the device's 1 s
                point("counter", 20, type="uint32", interval=5.0),  # slow
                interval=1.0,
            )
            cfg = ModbusTcpSource(host=HOST, port=srv.port, devices=(dev,), max_gap=2)
            poller = ModbusBusPoller("p", cfg, out, clock=vt.clock, sleep=vt.sleep)
            task = asyncio.create_task(poller.run())
            await out.wait_until(lambda: vt.now >= 1000.0 + 10.0)
            await stop_task(task)
        t0 = 1000.0
        by_address: dict[int, list[float]] = {}
        for r, t in zip(out.readings, out.times, strict=True):
            if t < t0 + 10.0:
                by_address.setdefault(r.address, []).append(t - t0)
        assert by_address[0] == pytest.approx([0.25 * k for k in range(40)])
        assert by_address[10] == pytest.approx([1.0 * k for k in range(10)])
        assert by_address[20] == pytest.approx([0.0, 5.0])
        assert [g.interval for g in poller.plans["plc"]] == [0.25, 1.0, 5.0]
        assert only(poller.health).missed_polls == 0

    run(scenario())


def test_devices_behind_one_endpoint_are_polled_concurrently_and_isolated() -> None:
    """One unit behind the gateway stops answering: the others keep their schedule (their own
    connections), the silent one is reported bad once and recovers by itself."""
    interval = 0.05

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=(1, 2, 3)) as srv:
            srv.silence(2)
            out, status = Collector(), StatusLog()
            devs = tuple(device(f"u{u}", u, point("x", 0)) for u in (1, 2, 3))
            cfg = ModbusTcpSource(host=HOST, port=srv.port, devices=devs, interval=interval,
                                  timeout=0.3, backoff_max=0.5)
            poller = ModbusBusPoller("gw", cfg, out, on_status=status, backoff_min=0.25)
            task = asyncio.create_task(poller.run())
            await status.wait_for("u2", "bad")
            t0 = time.monotonic()
            await asyncio.sleep(1.0)  # two probes of u2, each waiting out its 0.3 s timeout
            t1 = time.monotonic()
            srv.silence(2, False)
            await status.wait_for("u2", "good")
            await out.wait_until(lambda: len(out.of("u2")) >= 2)
            await stop_task(task)
            for name in ("u1", "u3"):
                n = out.count(name, t0, t1)
                assert n >= 0.8 * (t1 - t0) / interval, (name, n)  # ~20 polls, undisturbed
                assert poller.health[name].total_errors == 0
            assert [q for q, _ in status.of("u2")] == ["bad", "good"]
            assert "unit 2: no response" in status.of("u2")[0][1]
            assert len(status.calls) == 2
            assert srv.connections >= 3  # one connection per device (u2 reconnects per probe)

    run(scenario())


def test_endpoint_mode_shares_one_connection() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=(1, 2, 3)) as srv:
            out = Collector()
            devs = tuple(device(f"u{u}", u, point("x", u)) for u in (1, 2, 3))
            cfg = ModbusTcpSource(host=HOST, port=srv.port, devices=devs, interval=0.02)
            poller = ModbusBusPoller("gw", cfg, out, tcp_connections="endpoint")
            task = asyncio.create_task(poller.run())
            await out.wait_until(lambda: all(len(out.of(f"u{u}")) >= 3 for u in (1, 2, 3)))
            assert await poller.write("u2", "holding", 9, 99, verify=True) == 99
            await stop_task(task)
            assert srv.connections == 1
            assert srv.get_holding(9, device_id=2) == 99 and srv.get_holding(9, device_id=1) == 0

    run(scenario())


def test_write_action_names_the_device_on_a_multi_device_source() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=(4, 5)) as srv:
            devs = (device("pump", 4, point("x", 0)), device("valve", 5, point("x", 0)))
            cfg = ModbusTcpSource(host=HOST, port=srv.port, devices=devs)

            async def discard(_: Reading) -> None:
                return None

            poller = ModbusBusPoller("plant", cfg, discard)
            try:
                act = ModbusWriteAction(source="plant", device="valve", address=3, value=True)
                outcome = await ModbusWriteExecutor("open", act, poller).execute(CMD)
                assert outcome.ok and outcome.verified is True, outcome.error
                assert srv.get_coil(3, device_id=5) and not srv.get_coil(3, device_id=4)
                act = ModbusWriteAction(source="plant", address=3, value=True)
                outcome = await ModbusWriteExecutor("open", act, poller).execute(CMD)
                assert not outcome.ok
                assert "2 devices (pump, valve): name one" in outcome.error
                act = ModbusWriteAction(source="plant", device="tap", address=3, value=True)
                outcome = await ModbusWriteExecutor("open", act, poller).execute(CMD)
                assert "no device 'tap'" in outcome.error and "no such device" in outcome.error
            finally:
                await poller.close()

    run(scenario())
