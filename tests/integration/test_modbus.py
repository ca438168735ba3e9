"""Modbus TCP client, poller and write action against real pymodbus servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from flux_edge.actions.modbus_write import ModbusWriteExecutor
from flux_edge.config import ModbusTcpSource, ModbusWriteAction, RegisterConfig
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
from flux_edge.sources.modbus import (
    ModbusExceptionResponse,
    ModbusTcpClient,
    ModbusTcpPoller,
    ReadBlock,
    SimulatedModbusServer,
    SourceHealth,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
HOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


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


class Collector:
    """An emit callback that keeps readings and lets a test await the n-th one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.readings: list[Reading] = []
        self.times: list[float] = []
        self._clock = clock
        self._changed = asyncio.Event()
        self.work: Callable[[int], Awaitable[None]] | None = None  # per-reading extra work

    async def __call__(self, reading: Reading) -> None:
        self.times.append(self._clock())
        self.readings.append(reading)
        self._changed.set()
        if self.work is not None:
            await self.work(len(self.readings))

    async def wait_for(self, n: int) -> None:
        while len(self.readings) < n:
            self._changed.clear()
            await self._changed.wait()


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


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


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


class VirtualTime:
    """A clock and a sleep for the poller: time moves only when the poller sleeps or a test
    says so (``advance``), so schedules are checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
        # pymodbus' own "Failed to connect" warnings are not repeated on every retry
        assert not [r for r in caplog.records if r.name.startswith("pymodbus") and
                    r.levelno >= logging.WARNING]

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
