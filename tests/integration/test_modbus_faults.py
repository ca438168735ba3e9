"""Malformed Modbus replies (issue #13, item 2), from real peers: a raw asyncio TCP server on
127.0.0.1 and a raw RTU slave on a real pty, both answering with replies hypothesis builds
(a correct reply, then mutated: another function code, unit id or transaction id, a byte count
that disagrees, cut short, garbage before or after, a bad CRC, random bytes).

What must hold for every reply: the read returns exactly the registers of a correct reply and
nothing else; every other reply is a ``SourceError`` (never data), a ``BadReply`` naming its
reason where the bytes say what is wrong; no log record carries a traceback, and asyncio's
exception handler never runs. And on a bus: a misbehaving device is a bad reading (quality bad,
counted per reason, one line per reason), while a healthy device on the same source is still
polled at its rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_edge.errors import SourceError
from flux_edge.model import FN_HOLDING
from flux_edge.sources.modbus.client import ModbusRtuClient, ModbusTcpClient
from flux_edge.sources.modbus.link import BadReply, ModbusExceptionResponse
from flux_edge.sources.modbus.plan import ReadBlock
from flux_edge.sources.modbus.poller import ModbusBusPoller
from flux_edge.sources.modbus.replies import crc16
from flux_edge.sources.modbus.spec import (
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)
from tests.support import Collector, StatusLog, run, stop_task

pytestmark = pytest.mark.integration

UNIT = 7
COUNT = 3
BLOCK = ReadBlock(FN_HOLDING, 10, COUNT)
WORDS = (0x1234, 0xBEEF, 7)
PDU = bytes([FN_HOLDING, 2 * COUNT]) + struct.pack(">3H", *WORDS)

# --- replies: a correct one, then one mutation ----------------------------------------------

MUTATIONS = [
    "valid", "exception", "function_code", "unit_id", "transaction_id", "byte_count_low",
    "byte_count_high", "data_short", "truncated", "trailing", "leading", "random", "crc",
    "protocol_id", "length", "silence",
]


@dataclass(frozen=True)
class Reply:
    mutation: str
    value: int  # the mutation's byte (a function code, a unit id, a count, ...)
    cut: int  # where to cut (truncated) / how much garbage
    noise: bytes

    def expect_data(self, framing: str) -> bool:
        # MBAP-only mutations leave an RTU frame correct
        return self.mutation == "valid" or (
            framing == "rtu" and self.mutation in ("transaction_id", "protocol_id", "length")
        )


replies = st.builds(
    Reply,
    st.sampled_from(MUTATIONS),
    st.integers(0, 255),
    st.integers(1, 20),
    st.binary(min_size=1, max_size=40),
)


def tcp_reply(request: bytes, r: Reply) -> bytes:
    tid, unit = request[0:2], request[6]
    pdu = PDU
    if r.mutation == "exception":
        pdu = bytes([FN_HOLDING | 0x80, r.value % 11 + 1])
    elif r.mutation == "function_code":
        fn = r.value if r.value not in (FN_HOLDING, FN_HOLDING | 0x80) else 4
        pdu = bytes([fn]) + PDU[1:]
    elif r.mutation == "byte_count_low":
        pdu = bytes([FN_HOLDING, r.value % (2 * COUNT)]) + PDU[2:]
    elif r.mutation == "byte_count_high":
        pdu = bytes([FN_HOLDING, 2 * COUNT + 1 + r.value % 200]) + PDU[2:]
    elif r.mutation == "data_short":
        pdu = PDU[: 2 + r.value % (2 * COUNT)]
    if r.mutation == "unit_id":
        unit = unit ^ (1 + r.value % 255)
    if r.mutation == "transaction_id":
        tid = struct.pack(">H", struct.unpack(">H", tid)[0] ^ (1 + r.value))
    pid = b"\0\0" if r.mutation != "protocol_id" else struct.pack(">H", 1 + r.value)
    length = len(pdu) + 1
    if r.mutation == "length":
        length = (length + 1 + r.value) % 65536
        length = length if length != len(pdu) + 1 else length + 1
    frame = tid + pid + struct.pack(">H", length) + bytes([unit]) + pdu
    if r.mutation == "truncated":
        frame = frame[: max(1, len(frame) - r.cut)]
    elif r.mutation == "trailing":
        frame += r.noise
    elif r.mutation == "leading":
        frame = r.noise + frame
    elif r.mutation in ("random", "crc"):
        frame = r.noise
    elif r.mutation == "silence":
        frame = b""
    return frame


def rtu_reply(request: bytes, r: Reply) -> bytes:
    unit = request[0]
    pdu = PDU
    if r.mutation == "exception":
        pdu = bytes([FN_HOLDING | 0x80, r.value % 11 + 1])
    elif r.mutation == "function_code":
        fn = r.value if r.value not in (FN_HOLDING, FN_HOLDING | 0x80) else 4
        pdu = bytes([fn]) + PDU[1:]
    elif r.mutation == "byte_count_low":
        pdu = bytes([FN_HOLDING, r.value % (2 * COUNT)]) + PDU[2:]
    elif r.mutation == "byte_count_high":
        pdu = bytes([FN_HOLDING, 2 * COUNT + 1 + r.value % 40]) + PDU[2:]
    elif r.mutation == "data_short":
        pdu = PDU[: 2 + r.value % (2 * COUNT)]
    if r.mutation == "unit_id":
        unit = unit ^ (1 + r.value % 255)
    body = bytes([unit]) + pdu
    frame = body + crc16(body)
    if r.mutation == "crc":
        frame = body + bytes([frame[-2] ^ (1 + r.value % 255), frame[-1]])
    elif r.mutation == "truncated":
        frame = frame[: max(1, len(frame) - r.cut)]
    elif r.mutation == "trailing":
        frame += r.noise
    elif r.mutation == "leading":
        frame = r.noise + frame
    elif r.mutation == "random":
        frame = r.noise
    elif r.mutation == "silence":
        frame = b""
    # MBAP-only mutations mean nothing on a serial line: the frame stays correct
    return frame


# --- peers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_tcp_server(answer: Callable[[bytes], bytes]) -> AsyncIterator[int]:
    """A TCP server that reads one MBAP request at a time and writes ``answer(request)``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (cancelled when the test ends: a handler that ends cancelled makes asyncio log)
        quiet = (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError)
        with contextlib.suppress(*quiet):
            while True:
                head = await reader.readexactly(7)
                rest = await reader.readexactly(struct.unpack(">H", head[4:6])[0] - 1)
                if reply := answer(head + rest):
                    writer.write(reply)
                    await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class PtySlave:
    """The slave end of a real pty: reads RTU requests (8 bytes: function codes 1-6) and
    writes ``answer(request)``, on the test's event loop."""

    answer: Callable[[bytes], bytes]
    master: int = -1
    slave: int = -1
    path: str = ""
    requests: list[bytes] = field(default_factory=list)
    _buf: bytes = b""

    def __enter__(self) -> PtySlave:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        flags = fcntl.fcntl(self.master, fcntl.F_GETFL)
        fcntl.fcntl(self.master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.path = os.ttyname(self.slave)
        asyncio.get_running_loop().add_reader(self.master, self._readable)
        return self

    def _readable(self) -> None:
        try:
            self._buf += os.read(self.master, 4096)
        except BlockingIOError:
            return
        while len(self._buf) >= 8:
            request, self._buf = self._buf[:8], self._buf[8:]
            self.requests.append(request)
            if reply := self.answer(request):
                os.write(self.master, reply)

    def __exit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


# --- what every read must show --------------------------------------------------------------


class Watch:
    """Log records with tracebacks, and calls of the loop's exception handler."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.loop_errors: list[dict[str, Any]] = []

    def arm(self) -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, ctx: self.loop_errors.append(ctx)
        )

    def check(self) -> None:
        tracebacks = [r for r in self.caplog.records if r.exc_info or r.stack_info]
        assert not tracebacks, [r.getMessage() for r in tracebacks]
        assert "Traceback" not in self.caplog.text
        assert not self.loop_errors, self.loop_errors


def check_outcome(r: Reply, result: tuple[int, ...] | BaseException, framing: str) -> None:
    if r.expect_data(framing):
        assert result == WORDS
    elif r.mutation == "exception":
        assert isinstance(result, ModbusExceptionResponse), result
    else:
        assert isinstance(result, SourceError), f"{r}: {result!r} taken as data"
        if r.mutation not in ("silence", "random", "leading", "trailing", "length", "truncated"):
            assert isinstance(result, BadReply), f"{r}: {result!r}"


async def read_once(client: ModbusTcpClient | ModbusRtuClient) -> tuple[int, ...] | BaseException:
    try:
        return await client.read(BLOCK, UNIT, per_request=0.15)
    except SourceError as exc:
        return exc


FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(r=replies)
def test_tcp_replies_are_checked_not_trusted(caplog: pytest.LogCaptureFixture, r: Reply) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    watch = Watch(caplog)

    nonlocal_state: dict[str, Reply] = {"reply": r}

    def answer(req: bytes) -> bytes:
        return tcp_reply(req, nonlocal_state["reply"])

    async def scenario2() -> None:
        watch.arm()
        async with raw_tcp_server(answer) as port:
            client = ModbusTcpClient("fuzz", "127.0.0.1", port, timeout=0.15)
            try:
                check_outcome(r, await read_once(client), "tcp")
                ok = Reply("valid", 0, 0, b"")
                nonlocal_state["reply"] = ok
                check_outcome(ok, await read_once(client), "tcp")
            finally:
                await client.close()

    run(scenario2())
    watch.check()


@FUZZ
@given(r=replies)
def test_rtu_replies_over_a_pty_are_checked_not_trusted(
    caplog: pytest.LogCaptureFixture, r: Reply
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    watch = Watch(caplog)
    state = {"reply": r}

    async def scenario() -> None:
        watch.arm()
        with PtySlave(lambda req: rtu_reply(req, state["reply"])) as pty:
            client = ModbusRtuClient("fuzz", pty.path, baudrate=115200, parity="N", timeout=0.1)
            try:
                check_outcome(r, await read_once(client), "rtu")
                ok = Reply("valid", 0, 0, b"")
                state["reply"] = ok
                # what was left of a bad reply on the line is not taken for the next answer
                check_outcome(ok, await read_once(client), "rtu")
            finally:
                await client.close()

    run(scenario())
    watch.check()


# --- a bus: one misbehaving device, one healthy -----------------------------------------------


def device(name: str, unit: int) -> ModbusDeviceConfig:
    regs = tuple(
        RegisterConfig(name=f"r{i}", address=10 + i, function="holding", type="uint16")
        for i in range(COUNT)
    )
    return ModbusDeviceConfig(name=name, unit_id=unit, registers=regs)


BAD_KINDS = [m for m in MUTATIONS if m not in ("valid", "exception", "silence")]
MBAP_ONLY = ("transaction_id", "protocol_id", "length")  # an RTU frame stays correct
RTU_BAD_KINDS = [m for m in BAD_KINDS if m not in MBAP_ONLY]


def bad_answers(kinds: Iterator[str], framing: str) -> Callable[[bytes], bytes]:
    make = tcp_reply if framing == "tcp" else rtu_reply

    def answer(req: bytes) -> bytes:
        unit = req[6] if framing == "tcp" else req[0]
        if unit == 1:
            return make(req, Reply("valid", 0, 0, b""))
        return make(req, Reply(next(kinds), 0x55, 3, b"\x01\x02\x03"))

    return answer


def cycle(kinds: list[str]) -> Iterator[str]:
    while True:
        yield from kinds


def check_bus(
    got: Collector, status: StatusLog, poller: ModbusBusPoller, caplog: pytest.LogCaptureFixture
) -> None:
    """(The healthy device's rate is checked in the scenario: at least 80 % of its slots.)"""
    assert not got.of("bad_one"), "a bad reply was taken as data"
    assert [q for q, _ in status.of("bad_one")] == ["bad"]
    healthy = got.of("good_one")
    assert all(r.registers == WORDS for r in healthy)
    h = poller.health["bad_one"]
    assert h.quality == "bad" and sum(h.failures.values()) >= 1
    assert poller.health["good_one"].quality == "good"
    lines = [r for r in caplog.records if "bad reply (" in r.getMessage()]
    # one line per reason (rate-limited), each naming the device and the reason
    per_reason: dict[str, int] = {}
    for rec in lines:
        assert "'bad_one'" in rec.getMessage()
        reason = rec.getMessage().split("bad reply (")[1].split(")")[0]
        per_reason[reason] = per_reason.get(reason, 0) + 1
    assert per_reason and max(per_reason.values()) == 1, per_reason
    assert set(per_reason) <= set(h.failures)
    assert not [r for r in caplog.records if r.exc_info]


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(BAD_KINDS), min_size=1, max_size=6))
def test_tcp_bus_a_misbehaving_device_is_bad_the_healthy_one_polled_at_its_rate(
    caplog: pytest.LogCaptureFixture, kinds: list[str]
) -> None:
    caplog.clear()
    caplog.set_level(logging.INFO)
    answer = bad_answers(cycle(kinds), "tcp")

    async def main() -> tuple[Collector, StatusLog, ModbusBusPoller]:
        async with raw_tcp_server(answer) as port:
            cfg = ModbusTcpSource(
                host="127.0.0.1", port=port, interval=0.1, timeout=0.1, retries=0,
                devices=(device("good_one", 1), device("bad_one", 2)),
            )
            got, status = Collector(), StatusLog()
            poller = ModbusBusPoller("bus", cfg, got, on_status=status, backoff_min=0.1,
                                     tcp_connections="endpoint")
            task = asyncio.create_task(poller.run())
            await status.wait_for("bad_one", "bad")
            t0 = asyncio.get_running_loop().time()
            await asyncio.sleep(1.5)
            n = got.count("good_one", since=t0)
            await stop_task(task)
            assert n >= 0.7 * 1.5 / 0.1, n  # its slots, on a loaded machine
            return got, status, poller

    got, status, poller = run(main())
    check_bus(got, status, poller, caplog)


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(RTU_BAD_KINDS), min_size=1, max_size=6))
def test_rtu_bus_a_misbehaving_device_is_bad_the_healthy_one_polled_at_its_rate(
    caplog: pytest.LogCaptureFixture, kinds: list[str]
) -> None:
    caplog.clear()
    caplog.set_level(logging.INFO)
    answer = bad_answers(cycle(kinds), "rtu")

    async def main() -> tuple[Collector, StatusLog, ModbusBusPoller]:
        with PtySlave(answer) as pty:
            cfg = ModbusRtuSource(
                port=pty.path, baudrate=115200, parity="N", interval=0.1, timeout=0.1,
                retries=0, devices=(device("good_one", 1), device("bad_one", 2)),
            )
            got, status = Collector(), StatusLog()
            poller = ModbusBusPoller("bus", cfg, got, on_status=status, backoff_min=0.1)
            task = asyncio.create_task(poller.run())
            await status.wait_for("bad_one", "bad")
            t0 = asyncio.get_running_loop().time()
            await asyncio.sleep(1.5)
            n = got.count("good_one", since=t0)
            await stop_task(task)
            assert n >= 0.7 * 1.5 / 0.1, n  # its slots, on a loaded machine
            return got, status, poller

    got, status, poller = run(main())
    check_bus(got, status, poller, caplog)


def test_pymodbus_logging_is_routed_into_ours_and_rate_limited() -> None:
    from pymodbus.logging import Log

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    keep = Keep()  # on the root logger, as setup_logging's handler is
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        for i in range(50):  # one place in pymodbus, 50 different texts (as with frame bytes)
            Log.error("ERROR: frame {} unusable", i)
    finally:
        root.removeHandler(keep)
    names = [r.name for r in keep.records]
    assert names.count("flux_edge.source.modbus.pymodbus") == 1, names
    assert not [n for n in names if n.startswith("pymodbus")], names


def test_rtu_bytes_between_transactions_are_counted_on_the_device_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stray bytes after a correct answer (a slave that sends a late tail, noise): dropped,
    counted on that device as ``unsolicited``, logged once; its readings are unaffected."""
    caplog.set_level(logging.INFO)
    holder: dict[str, PtySlave] = {}

    def answer(req: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, os.write, holder["pty"].master, b"\x00\xff\x13")
        return rtu_reply(req, Reply("valid", 0, 0, b""))

    async def main() -> ModbusBusPoller:
        with PtySlave(answer) as pty:
            holder["pty"] = pty
            cfg = ModbusRtuSource(
                port=pty.path, baudrate=115200, parity="N", interval=0.05, timeout=0.1,
                retries=0, devices=(device("good_one", 1),),
            )
            got, status = Collector(), StatusLog()
            poller = ModbusBusPoller("bus", cfg, got, on_status=status)
            task = asyncio.create_task(poller.run())
            await got.wait_for(8)
            await stop_task(task)
            assert all(r.registers == WORDS for r in got.readings)
            return poller

    poller = run(main())
    h = poller.health["good_one"]
    assert h.failures.get("unsolicited", 0) >= 3 and h.quality == "good"
    lines = [r for r in caplog.records if "arrived after its last transaction" in r.getMessage()]
    assert len(lines) == 1
