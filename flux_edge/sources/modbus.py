"""Modbus sources: TCP endpoints and RTU buses, their client adapters, the bus poller, and a
simulated TCP server.

This is the ONLY module that imports pymodbus (pinned to 3.16: its API changes between minor
releases). Everything pymodbus raises or returns is turned into flux-edge types here:
``SourceError`` (naming host:port or serial port and unit id) and ``Reading``.

- ``ModbusTcpClient`` / ``ModbusRtuClient``: one TCP connection / one serial port; every call
  is bounded by a timeout and raises ``SourceError``; our retry policy, not pymodbus' (its
  retries and auto-reconnect are off). The RTU client keeps the spec's inter-frame silence
  (3.5 characters, 1.75 ms above 19200 baud) between the last byte on the line and its next
  request, timed to ~0.1 ms.
- ``ModbusBusPoller``: one per source (a TCP endpoint or an RTU bus) with all its devices.
  Each device's points are polled in ``PollGroup``s (per-point intervals) on fixed schedules
  without drift. TCP devices are polled concurrently, one connection each; an RTU bus carries
  exactly one request at a time, from one scheduler that runs the due polls in order. A device
  that stops answering is backed off (exponentially, up to ``backoff_max``) and, while backed
  off, not polled at all: when its backoff ends it gets one probe, so it costs the others at
  most one timeout per backoff period. It recovers by itself. ``on_status`` hears each change.
- ``SimulatedModbusServer``: a pymodbus TCP server (SimDevice datastore) whose tables Python
  reads and writes directly, that counts requests and reports writes; tests and the demo use
  it. (The RTU test slaves live in tests/support/serial_line.py: they must time their answers
  on a simulated line, which pymodbus' server cannot.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from flux_edge.config import ModbusDeviceConfig, ModbusRtuSource, ModbusTcpSource
from flux_edge.errors import SourceError
from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING, KIND_REGISTERS, Reading
from flux_edge.sources import Emit, SourceHealth, StatusCallback
from flux_edge.sources.modbus_plan import (
    _TABLE_NAMES,
    MAX_BITS,
    MAX_REGISTERS,
    PollGroup,
    ReadBlock,
    bus_devices,
    char_time,
    inter_frame_gap,
    plan_device,
    plan_reads,
    register_span,
    request_bytes,
    response_bytes,
)

__all__ = [
    "MAX_BITS",
    "MAX_REGISTERS",
    "ModbusBusPoller",
    "ModbusExceptionResponse",
    "ModbusRtuClient",
    "ModbusTcpClient",
    "ModbusTcpPoller",
    "PollGroup",
    "ReadBlock",
    "SimWrite",
    "SimulatedModbusServer",
    "SourceHealth",
    "bus_devices",
    "plan_device",
    "plan_reads",
    "register_span",
]

# --- pymodbus glue ------------------------------------------------------------------------------

# pymodbus swallows the OSError of a failed connect or listen: it logs it (and only the first of
# identical consecutive messages) and returns False. Two small pieces of glue:
# - ``_remember_oserror`` wraps the protocol's connection factory to keep the OSError, so the
#   caller can say "connection refused" rather than "failed";
# - a filter on pymodbus' logger drops those records, so a dead device does not log a warning on
#   every retry (the poller logs each change of state once).
_SWALLOWED_PREFIXES = ("Failed to connect", "Failed to start server")


class _PymodbusLogFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._dropped_last = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg == "Repeating....":  # pymodbus' note that the previous message repeats
            return not self._dropped_last
        self._dropped_last = msg.startswith(_SWALLOWED_PREFIXES)
        return not self._dropped_last


logging.getLogger("pymodbus.logging").addFilter(_PymodbusLogFilter())


def _remember_oserror(protocol: object) -> list[OSError]:
    """Collect the OSErrors the protocol's connect/listen factory raises (pymodbus 3.16 keeps
    the factory in ``call_create``; without it we only lose the detail)."""
    seen: list[OSError] = []
    create: Callable[[], Awaitable[object]] | None = getattr(protocol, "call_create", None)
    if create is None:
        return seen
    factory = create

    async def create_and_remember() -> object:
        try:
            return await factory()
        except OSError as exc:
            seen.append(exc)
            raise

    setattr(protocol, "call_create", create_and_remember)  # noqa: B010 - not a typed attribute
    return seen


def _os_reason(errors: list[OSError]) -> str:
    """The last OSError as a short reason: 'connection refused', 'name or service not known'."""
    if not errors:
        return ""
    exc = errors[-1]
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return exc.strerror or str(exc) or type(exc).__name__



# --- clients ------------------------------------------------------------------------------------

_EXCEPTION_CODES: dict[int, tuple[str, str]] = {
    1: ("ILLEGAL_FUNCTION", "the device does not support this function"),
    2: ("ILLEGAL_DATA_ADDRESS", "the device has no such address: check the register map"),
    3: ("ILLEGAL_DATA_VALUE", "the device refused the value or the count"),
    4: ("SERVER_DEVICE_FAILURE", "the device failed while handling the request"),
    5: ("ACKNOWLEDGE", "the device accepted a long-running request"),
    6: ("SERVER_DEVICE_BUSY", "the device is busy: retry later"),
    7: ("NEGATIVE_ACKNOWLEDGE", "the device cannot perform the request"),
    8: ("MEMORY_PARITY_ERROR", "the device detected a memory parity error"),
    10: ("GATEWAY_PATH_UNAVAILABLE", "the gateway has no path to this unit id"),
    11: (
        "GATEWAY_TARGET_FAILED_TO_RESPOND",
        "no device answered behind the gateway: check the unit id",
    ),
}


class ModbusExceptionResponse(SourceError):
    """The device answered, with a Modbus exception response (``code``, e.g. 2 illegal address).

    The link is fine: a poller does not back off for these (the device is alive), it reports
    them in its health.
    """

    def __init__(self, source: str, message: str, code: int) -> None:
        self.code = code
        super().__init__(source, message)


Request = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]


class _Client:
    """What the TCP and RTU clients share: connect on demand, bound every call by a timeout,
    turn pymodbus' errors and exception responses into ``SourceError``s. One request at a
    time: callers serialise (the poller holds a lock per link)."""

    drop_on_timeout = True  # a late answer would be taken for the next request's
    lost_text = "the device closed the connection"

    def __init__(self, source: str, *, timeout: float) -> None:
        self.source = source
        self.timeout = timeout
        self._client: ModbusBaseClient | None = None
        # The task waiting for a response, so a link closed under it fails the request at
        # once (pymodbus would leave it waiting for the timeout).
        self._waiting: asyncio.Task[object] | None = None
        self._lost = False

    # -- what each transport provides --

    def _where(self, unit_id: int | None = None) -> str:
        raise NotImplementedError

    def _new_client(self) -> ModbusBaseClient:
        raise NotImplementedError

    def _connect_failed(self, reason: str, timed_out: bool) -> str:
        raise NotImplementedError

    async def _before_request(self) -> None:
        """Called with the request about to go out (RTU: keep the inter-frame silence)."""

    def _waiting_for(
        self, deadline: asyncio.Timeout | None, timeout: float, response_bytes: int
    ) -> None:
        """The response's time limit while a call waits for it (None: no call waits)."""

    def _call_timeout(self, timeout: float, request_bytes: int, response_bytes: int) -> float:
        """The time a call may wait for its answer (RTU: for its first byte; see there)."""
        return timeout

    def _timeout_text(self, what: str, limit: float) -> str:
        return f"no response to {what} within {limit:g} s"

    # -- shared --

    def _on_connection(self, connected: bool) -> None:
        if not connected and self._waiting is not None and not self._waiting.done():
            self._lost = True
            self._waiting.cancel()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def connect(self) -> None:
        """Connect (open the port) unless connected. Raises SourceError saying why not."""
        if self.connected:
            return
        self._drop()
        client = self._new_client()
        errors = _remember_oserror(client.ctx)
        try:
            async with asyncio.timeout(self.timeout):
                ok = await client.connect()
        except TimeoutError as exc:
            client.close()
            raise SourceError(self.source, self._connect_failed("", timed_out=True)) from exc
        except asyncio.CancelledError:
            client.close()
            raise
        if not ok:
            client.close()
            raise SourceError(self.source, self._connect_failed(_os_reason(errors), False))
        self._client = client

    async def _call(
        self,
        what: str,
        unit_id: int,
        request: Request,
        per_request: float | None,
        frame: tuple[int, int],
    ) -> ModbusPDU:
        """One request and its response; ``frame``: their sizes in bytes on an RTU line."""
        await self.connect()
        client = self._client
        assert client is not None
        timeout = per_request or self.timeout
        limit = self._call_timeout(timeout, *frame)
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        self._waiting, self._lost = task, False
        try:
            await self._before_request()
            async with asyncio.timeout(limit) as deadline:
                self._waiting_for(deadline, timeout, frame[1])
                response = await request(client)
            if task is not None and task.cancelling() > cancelling:
                # pymodbus awaits the answer with asyncio.wait_for, which in Python 3.11 drops
                # a cancellation that comes with the answer (the task would poll on, and never
                # stop): deliver it here.
                raise asyncio.CancelledError
        except TimeoutError as exc:
            if self.drop_on_timeout:
                self._drop()
            raise SourceError(
                self.source, f"{self._where(unit_id)}: {self._timeout_text(what, limit)}"
            ) from exc
        except (ModbusException, OSError) as exc:
            self._drop()
            raise SourceError(self.source, f"{self._where(unit_id)}: {what} failed: {exc}") from exc
        except asyncio.CancelledError:
            # A late answer would be taken for the next request's: start afresh.
            self._drop()
            if self._lost and task is not None and task.uncancel() == 0:
                raise SourceError(
                    self.source,
                    f"{self._where(unit_id)}: {self.lost_text} during {what}",
                ) from None
            raise
        finally:
            self._waiting = None
            self._waiting_for(None, timeout, 0)
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            name, hint = _EXCEPTION_CODES.get(code, ("UNKNOWN", "unknown exception code"))
            raise ModbusExceptionResponse(
                self.source,
                f"{self._where(unit_id)}: {what}: exception response {code:#04x} {name} ({hint})",
                code,
            )
        return response

    async def read(
        self, block: ReadBlock, unit_id: int, *, per_request: float | None = None
    ) -> tuple[int, ...]:
        """Read one block. Coils/discrete inputs come back as 0/1 words, exactly ``count``."""
        fn, addr, count = block.function, block.address, block.count
        what = block.describe()

        def request(c: ModbusBaseClient) -> Awaitable[ModbusPDU]:
            if fn == FN_COIL:
                return c.read_coils(addr, count=count, device_id=unit_id)
            if fn == FN_DISCRETE:
                return c.read_discrete_inputs(addr, count=count, device_id=unit_id)
            if fn == FN_HOLDING:
                return c.read_holding_registers(addr, count=count, device_id=unit_id)
            return c.read_input_registers(addr, count=count, device_id=unit_id)

        if fn not in _TABLE_NAMES:
            raise SourceError(self.source, f"{what}: unknown function code {fn}")
        frame = (request_bytes(block), response_bytes(block))
        response = await self._call(what, unit_id, request, per_request, frame)
        if fn in (FN_COIL, FN_DISCRETE):
            bits = list(response.bits)
            if len(bits) < count:
                self._drop()
                raise SourceError(
                    self.source,
                    f"{self._where(unit_id)}: {what}: got {len(bits)} bits, expected {count}",
                )
            return tuple(1 if b else 0 for b in bits[:count])
        words = list(response.registers)
        if len(words) != count:
            self._drop()
            raise SourceError(
                self.source,
                f"{self._where(unit_id)}: {what}: got {len(words)} registers, expected {count}",
            )
        return tuple(words)

    async def write_coil(
        self, address: int, value: bool, unit_id: int, *, per_request: float | None = None
    ) -> None:
        await self._call(
            f"write coil {address} := {int(value)}",
            unit_id,
            lambda c: c.write_coil(address, bool(value), device_id=unit_id),
            per_request,
            (8, 8),
        )

    async def write_register(
        self, address: int, value: int, unit_id: int, *, per_request: float | None = None
    ) -> None:
        """Write one holding register; ``value`` is 0..65535 (negative int16 values: -32768..-1
        are written as their two's complement)."""
        if not -32768 <= value <= 65535:
            raise SourceError(
                self.source,
                f"{self._where(unit_id)}: value {value} does not fit holding register {address} "
                f"(16 bits: -32768..65535)",
            )
        word = value & 0xFFFF
        await self._call(
            f"write holding register {address} := {word}",
            unit_id,
            lambda c: c.write_register(address, word, device_id=unit_id),
            per_request,
            (8, 8),
        )

    async def close(self) -> None:
        self._drop()
        await asyncio.sleep(0)  # let the transport finish closing


class ModbusTcpClient(_Client):
    """One Modbus TCP connection to one endpoint (host:port, any unit id).

    After a failure (timeout included) the connection is dropped and the next call reconnects.
    """

    def __init__(self, source: str, host: str, port: int = 502, *, timeout: float = 1.0) -> None:
        super().__init__(source, timeout=timeout)
        self.host = host
        self.port = port

    def _where(self, unit_id: int | None = None) -> str:
        unit = f" unit {unit_id}" if unit_id is not None else ""
        return f"{self.host}:{self.port}{unit}"

    def _new_client(self) -> ModbusBaseClient:
        return AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=f"flux-edge {self.source}",
            # Our asyncio.timeout fires first; pymodbus' own limit is only a backstop.
            timeout=self.timeout + 1.0,
            retries=0,
            reconnect_delay=0,  # 0 = pymodbus never reconnects behind our back
            reconnect_delay_max=0,
            trace_connect=self._on_connection,
        )

    def _connect_failed(self, reason: str, timed_out: bool) -> str:
        if timed_out:
            return (
                f"cannot connect to {self._where()}: no answer within {self.timeout:g} s "
                f"(is the host up and the port right?)"
            )
        return (
            f"cannot connect to {self._where()}: {reason or 'connection failed'} "
            f"(is the device on and listening on that port?)"
        )


class _PreciseTimer:
    """Waits until a monotonic deadline to within a few tens of microseconds.

    asyncio's timers are only as fine as epoll's timeout, whole milliseconds: waiting out a
    1.75 ms inter-frame silence that way overshoots by ~0.8 ms, which at 115200 baud is a sixth
    of a whole transaction. So the loop sleeps the coarse part; a helper thread (started on
    first use, one per RTU port) sleeps the last couple of milliseconds with the OS' precision
    and wakes the loop. Waking the loop from a thread takes ~0.1 ms itself, so the thread wakes
    it that much early (``lead``, learned from the wake-ups so far) and the loop spins out the
    rest, never past ``SPIN_MAX``: the deadline is never cut short, and the CPU spent spinning
    is about the jitter of a wake-up.
    """

    MARGIN = 0.002  # the part left to the thread
    SPIN_MAX = 0.0003  # longest the loop spins; the lead is kept below it

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[
            tuple[float, asyncio.AbstractEventLoop, asyncio.Future[None]] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.lead = 0.0  # how early the thread wakes the loop (a running mean of the lateness)

    async def sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if remaining > 2 * self.MARGIN:
            await asyncio.sleep(remaining - self.MARGIN)
        while (wake_at := deadline - self.lead) > time.monotonic():
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((wake_at, loop, fut))
            await fut
            late = time.monotonic() - wake_at
            self.lead = min(0.9 * self.lead + 0.1 * max(late, 0.0), 0.8 * self.SPIN_MAX)
            if deadline - time.monotonic() <= self.SPIN_MAX:
                break
        while time.monotonic() < deadline:
            pass  # at most SPIN_MAX (the loop resumed earlier than that only if the OS was fast)

    def _run(self) -> None:
        # Linux ends a thread's timed sleeps up to 50 us late by default (timer slack): ask for
        # 1 us on this thread (best effort: PR_SET_TIMERSLACK, elsewhere nothing happens).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
        while (item := self._queue.get()) is not None:
            deadline, loop, fut = item
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ModbusRtuClient(_Client):
    """One serial port (an RS-485 line) to any unit id on it, in Modbus RTU framing.

    Before each request it keeps the line silent for ``inter_frame`` seconds (0: the spec's
    3.5 characters, 1.75 ms above 19200 baud) after the last byte sent or received. The
    response ``timeout`` counts from the end of the request on the wire (plus the silence that
    ends it) to the first byte of the answer; the rest of the answer then gets the time it takes
    at this baud rate (plus ``timeout`` again), so a long read at 9600 baud needs no larger
    timeout, and a dead slave costs no more than the request and the timeout. A timeout
    keeps the port open (a silent device is no reason to reopen the line); a port error closes
    it and the next call reopens it.
    """

    drop_on_timeout = False
    lost_text = "the port was closed"

    def __init__(
        self,
        source: str,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "E",
        stopbits: int = 1,
        bytesize: int = 8,
        timeout: float = 0.2,
        inter_frame: float = 0.0,
    ) -> None:
        super().__init__(source, timeout=timeout)
        self.port = port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        self.char_time = char_time(baudrate, bytesize, parity, stopbits)
        self.gap = inter_frame_gap(baudrate, bytesize, parity, stopbits, inter_frame)
        self._quiet_from = 0.0  # monotonic time the line last carried a byte (ours or theirs)
        self._deadline: asyncio.Timeout | None = None  # the waiting call's response deadline
        self._rx_allowance = 0.0  # the time its answer may take once it has started
        self._rx_started = False
        self._timer = _PreciseTimer(f"flux-edge {source} timer")

    def _where(self, unit_id: int | None = None) -> str:
        unit = f" unit {unit_id}" if unit_id is not None else ""
        return f"{self.port}{unit}"

    def _settings(self) -> str:
        return f"{self.baudrate} baud {self.bytesize}{self.parity}{self.stopbits}"

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        now = time.monotonic()
        # Sending: the line is busy until our last character is out. Receiving: pymodbus passes
        # what it has buffered so far; its last byte arrived now.
        if sending:
            self._quiet_from = now + len(data) * self.char_time
            return data
        self._quiet_from = now
        deadline = self._deadline
        if deadline is not None and not self._rx_started:
            self._rx_started = True
            deadline.reschedule(asyncio.get_running_loop().time() + self._rx_allowance)
        return data

    def _new_client(self) -> ModbusBaseClient:
        return AsyncModbusSerialClient(
            self.port,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            bytesize=self.bytesize,
            name=f"flux-edge {self.source}",
            timeout=self.timeout + 1.0,  # a backstop; also the port open limit
            retries=0,
            reconnect_delay=0,
            reconnect_delay_max=0,
            trace_packet=self._trace_packet,
            trace_connect=self._on_connection,
        )

    def _connect_failed(self, reason: str, timed_out: bool) -> str:
        why = f"not open within {self.timeout:g} s" if timed_out else reason or "open failed"
        return (
            f"cannot open {self.port} ({self._settings()}): {why} "
            f"(is the adapter plugged in, the path right, the port free, and are these settings "
            f"supported by it?)"
        )

    async def connect(self) -> None:
        if not self.connected:
            # A master that has just opened the port knows nothing of the line: another master
            # may have left an answer in flight. Listen for one silence first (bytes arriving
            # meanwhile move it on).
            self._quiet_from = time.monotonic()
        await super().connect()

    async def _before_request(self) -> None:
        # Bytes arriving while we wait (a late answer) move the end of the silence on.
        while (deadline := self._quiet_from + self.gap) > time.monotonic():
            await self._timer.sleep_until(deadline)

    def _call_timeout(self, timeout: float, request_bytes: int, response_bytes: int) -> float:
        # The answer must start within ``timeout`` once our request has left the line and the
        # slave has seen the silence that ends it; when it starts, the deadline moves on to
        # the time the rest of it takes at line speed (``_trace_packet``). So a dead slave
        # costs the request, the silence and the timeout, not the time of an answer it never
        # sends, and a long answer at a low baud rate is never cut short.
        return request_bytes * self.char_time + self.gap + timeout

    def _waiting_for(
        self, deadline: asyncio.Timeout | None, timeout: float, response_bytes: int
    ) -> None:
        self._deadline = deadline
        self._rx_allowance = response_bytes * self.char_time + timeout
        self._rx_started = False

    def _timeout_text(self, what: str, limit: float) -> str:
        if self._rx_started:
            return f"incomplete response to {what} (the answer stopped mid-frame)"
        return super()._timeout_text(what, limit)

    async def close(self) -> None:
        self._timer.close()
        await super().close()


# --- the bus poller -----------------------------------------------------------------------------


class _Unreachable(Exception):
    """A device did not answer one request in any of its attempts."""

    def __init__(self, error: SourceError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class _Link:
    """One connection (TCP) or port (RTU), and the lock that keeps one request on it at a time."""

    client: _Client
    devices: list[_Device] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _Device:
    cfg: ModbusDeviceConfig
    timeout: float
    groups: list[PollGroup]
    link: _Link
    health: SourceHealth = field(default_factory=SourceHealth)
    state: Literal["good", "bad"] | None = None  # None until it first answers or fails
    epoch: int = 0  # bumped when its schedule is rebuilt: older heap entries are dropped
    start: float = 0.0  # the schedule's origin: slot k of a group is due at start + k*interval
    slots: list[int] = field(default_factory=list)  # next slot of each group
    failures: int = 0  # unreachable polls/probes in a row: the backoff exponent
    refused: set[ReadBlock] = field(default_factory=set)  # blocks answered with an exception
    unexpected_logged: bool = False

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def label(self) -> str:
        return f"device {self.cfg.name!r} (unit {self.cfg.unit_id})"


_Entry = tuple[float, int, _Device, int, int]  # due, sequence, device, group (-1: probe), epoch
_Outcome = Literal["ok", "refused", "unreachable", "error"]


class ModbusBusPoller:
    """Polls every device of one Modbus source (a TCP endpoint or an RTU bus); emits one
    ``Reading`` per read request, with ``device`` set to the device's name.

    Schedules: each device's ``PollGroup`` (see ``plan_device``) has slot k due at start +
    k * interval, without drift. A poll that starts late runs once for the latest slot already
    due and skips (counts in ``missed_polls``) the older ones; on a busy RTU bus the due polls
    run in order of their due times, so no device starves.

    TCP: every device has its own connection and schedule (``tcp_connections="device"``), so
    devices behind one endpoint are polled concurrently; ``"endpoint"`` shares one connection
    among them, polled in turn. RTU: one port, one schedule, exactly one request on the line at
    a time, with the inter-frame silence kept between frames (``ModbusRtuClient``).

    Fault isolation: a request is tried ``1 + retries`` times within a poll, each bounded by the
    device's timeout. A device that does not answer is marked bad (``on_status(device, "bad",
    error)``, one warning) and backed off: ``backoff_min`` doubling up to ``backoff_max``,
    aligned to its fastest group's slots. While backed off it is not polled at all; at the end
    of each backoff it gets one probe (its fastest group, one attempt), so a dead device costs
    the others at most one timeout per backoff period. When it answers, ``on_status(device,
    "good", "")`` and its schedule resumes. Exception responses (the device is alive but refuses
    a block) are counted errors, logged once per block, and never back off.

    ``write`` shares the device's link (serialised with the polls). ``run()`` ends only by
    cancellation and then closes every link.
    """

    def __init__(
        self,
        name: str,
        cfg: ModbusTcpSource | ModbusRtuSource,
        emit: Emit,
        *,
        on_status: StatusCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_min: float = 1.0,
        tcp_connections: Literal["device", "endpoint"] = "device",
    ) -> None:
        if cfg.interval <= 0:
            raise ValueError(f"source {name!r}: interval must be > 0, got {cfg.interval}")
        self.name = name
        self.cfg = cfg
        self._emit = emit
        self._on_status = on_status
        self._clock = clock
        self._wall = wall
        self._sleep = sleep  # tests pair it with ``clock`` to run schedules on virtual time
        self._attempts = 1 + max(0, cfg.retries)
        self._backoff_min = backoff_min
        self._backoff_max = max(cfg.backoff_max, backoff_min)
        self._log = logging.getLogger(f"flux_edge.source.{name}")
        devices = bus_devices(cfg, name)
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"source {name!r}: device names must be unique, repeated: {dup}")
        self.plans: dict[str, list[PollGroup]] = {}
        for d in devices:
            try:
                self.plans[d.name] = plan_device(d, cfg.interval, cfg.max_gap)
            except ValueError as exc:
                raise ValueError(f"source {name!r}: {exc}") from None
        self._links: list[_Link] = []
        self._devices: dict[str, _Device] = {}
        shared: _Link | None = None
        if isinstance(cfg, ModbusRtuSource):
            shared = _Link(
                ModbusRtuClient(
                    name,
                    cfg.port,
                    baudrate=cfg.baudrate,
                    parity=cfg.parity,
                    stopbits=cfg.stopbits,
                    bytesize=cfg.bytesize,
                    timeout=cfg.timeout,
                    inter_frame=cfg.inter_frame,
                )
            )
        elif tcp_connections == "endpoint":
            shared = _Link(ModbusTcpClient(name, cfg.host, cfg.port, timeout=cfg.timeout))
        if shared is not None:
            self._links.append(shared)
        for d in devices:
            timeout = d.timeout if d.timeout > 0 else cfg.timeout
            link = shared
            if link is None:
                assert isinstance(cfg, ModbusTcpSource)
                link = _Link(ModbusTcpClient(name, cfg.host, cfg.port, timeout=timeout))
                self._links.append(link)
            dev = _Device(d, timeout, self.plans[d.name], link)
            link.devices.append(dev)
            self._devices[d.name] = dev
        self.health: dict[str, SourceHealth] = {n: d.health for n, d in self._devices.items()}

    # -- running --

    async def run(self) -> None:
        """Poll until cancelled. Never raises anything but CancelledError."""
        try:
            async with asyncio.TaskGroup() as tg:
                for i, link in enumerate(self._links):
                    tg.create_task(self._run_link(link), name=f"modbus {self.name} link {i}")
        finally:
            await self.close()

    async def _run_link(self, link: _Link) -> None:
        heap: list[_Entry] = []
        seq = itertools.count()

        def push(dev: _Device, group: int, due: float) -> None:
            heapq.heappush(heap, (due, next(seq), dev, group, dev.epoch))

        start = self._clock()
        for dev in link.devices:
            dev.start = start
            dev.slots = [0] * len(dev.groups)
            for gi in range(len(dev.groups)):
                push(dev, gi, start)
        if not heap:
            await asyncio.Event().wait()  # nothing to poll (write-only devices): idle
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                raise asyncio.CancelledError  # a cancellation something below swallowed
            due, _, dev, gi, epoch = heap[0]
            if epoch != dev.epoch:
                heapq.heappop(heap)
                continue
            delay = due - self._clock()
            if delay > 0:
                await self._sleep(delay)
                continue
            heapq.heappop(heap)
            probe = gi < 0
            outcome = await self._poll_guarded(dev, 0 if probe else gi, 1 if probe else None)
            now = self._clock()
            if outcome == "unreachable":
                self._back_off(dev, now, push)
            elif probe:
                self._resume(dev, now, push)
            else:
                self._next_slot(dev, gi, now, push)

    def _next_slot(
        self, dev: _Device, gi: int, now: float, push: Callable[[_Device, int, float], None]
    ) -> None:
        """Schedule group ``gi`` after its slot ran: the next slot, or the latest one already
        due if the poll overran (the ones in between are counted as missed)."""
        interval = dev.groups[gi].interval
        k = dev.slots[gi]
        latest = math.floor((now - dev.start) / interval + 1e-9)
        nxt = max(k + 1, latest)
        dev.health.missed_polls += nxt - (k + 1)
        dev.slots[gi] = nxt
        push(dev, gi, dev.start + nxt * interval)

    def _back_off(
        self, dev: _Device, now: float, push: Callable[[_Device, int, float], None]
    ) -> None:
        """Stop polling ``dev``; schedule one probe at the end of its backoff, on a slot of its
        fastest group (group 0)."""
        dev.failures += 1
        backoff = min(self._backoff_max, self._backoff_min * 2.0 ** min(dev.failures - 1, 32))
        interval = dev.groups[0].interval
        k = max(dev.slots[0] + 1, math.ceil((now + backoff - dev.start) / interval - 1e-9))
        dev.slots[0] = k
        dev.epoch += 1  # drops its pending entries
        push(dev, -1, dev.start + k * interval)

    def _resume(
        self, dev: _Device, now: float, push: Callable[[_Device, int, float], None]
    ) -> None:
        """The probe was answered: group 0 carries on from the probe's slot, every other group
        polls at once (its latest due slot); slots lost while backed off are not 'missed'."""
        dev.epoch += 1
        for gi, group in enumerate(dev.groups):
            latest = math.floor((now - dev.start) / group.interval + 1e-9)
            if gi == 0:
                dev.slots[0] = max(dev.slots[0] + 1, latest)
            else:
                dev.slots[gi] = max(dev.slots[gi], latest)
            push(dev, gi, dev.start + dev.slots[gi] * group.interval)

    # -- one poll --

    async def _read(self, dev: _Device, block: ReadBlock, attempts: int) -> tuple[int, ...]:
        link = dev.link
        last: SourceError | None = None
        for _ in range(attempts):
            try:
                async with link.lock:
                    return await link.client.read(block, dev.cfg.unit_id, per_request=dev.timeout)
            except ModbusExceptionResponse:
                raise
            except SourceError as exc:
                last = exc
        assert last is not None
        raise _Unreachable(last)

    async def _poll_group(self, dev: _Device, group: PollGroup, attempts: int) -> None:
        """Read every block of ``group`` and emit a Reading per block.

        Raises ``_Unreachable`` when a request got no answer in ``attempts`` tries (the rest
        of the poll is skipped). A block answered with an exception response does not stop the
        others; the first such error is raised at the end.
        """
        refused: ModbusExceptionResponse | None = None
        for block in group.blocks:
            try:
                words = await self._read(dev, block, attempts)
            except ModbusExceptionResponse as exc:
                self._answered(dev)
                refused = refused or exc
                if block not in dev.refused:
                    dev.refused.add(block)
                    self._log.warning(
                        "%s refuses %s: %s (its points stay without values; logged again "
                        "when it reads)", dev.label, block.describe(), exc,
                    )
                continue
            self._answered(dev)
            if dev.refused and block in dev.refused:
                dev.refused.discard(block)
                self._log.info("%s: %s reads again", dev.label, block.describe())
            await self._emit(
                Reading(
                    source=self.name,
                    device=dev.cfg.name,
                    ts=self._wall(),
                    kind=KIND_REGISTERS,
                    registers=words,
                    function=block.function,
                    address=block.address,
                )
            )
        if refused is not None:
            raise refused

    async def _poll_guarded(self, dev: _Device, gi: int, attempts: int | None) -> _Outcome:
        """One poll of one group that never raises (but CancelledError)."""
        outcome = await self._poll_outcome(dev, gi, attempts)
        dev.health.polls += 1  # counted when over: polls - total_errors = complete polls
        return outcome

    async def _poll_outcome(self, dev: _Device, gi: int, attempts: int | None) -> _Outcome:
        h = dev.health
        try:
            await self._poll_group(dev, dev.groups[gi], attempts or self._attempts)
        except _Unreachable as exc:
            self._unreachable(dev, exc.error)
            return "unreachable"
        except ModbusExceptionResponse as exc:
            self._count_error(dev, str(exc))
            return "refused"
        except Exception as exc:  # noqa: BLE001 - a poller must survive anything (emit failing)
            self._count_error(dev, f"unexpected error: {exc!r}")
            if not dev.unexpected_logged:
                dev.unexpected_logged = True
                self._log.warning(
                    "%s: poll failed: %r (logged once until a poll succeeds)",
                    dev.label, exc, exc_info=exc,
                )
            return "error"
        h.last_success_ts = self._wall()
        h.consecutive_errors = 0
        dev.unexpected_logged = False
        return "ok"

    # -- state --

    def _status(self, dev: _Device, quality: Literal["good", "bad"], error: str) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(dev.cfg.name, quality, error)
        except Exception:  # noqa: BLE001 - the runtime's callback must not stop the bus
            self._log.exception("on_status callback failed for %s", dev.label)

    def _answered(self, dev: _Device) -> None:
        """The device answered a request (data or an exception response)."""
        if dev.state == "good":
            return
        h = dev.health
        if dev.state == "bad":
            self._log.info(
                "%s answers again after %d failed poll(s)", dev.label, h.consecutive_errors
            )
        else:
            groups = ", ".join(f"{len(g.blocks)} request(s) every {g.interval:g} s"
                               for g in dev.groups)
            self._log.info("polling %s on %s: %s", dev.label, self._where(dev), groups)
        previous = dev.state
        dev.state = "good"
        h.quality = "good"
        dev.failures = 0
        if previous == "bad":
            self._status(dev, "good", "")

    def _unreachable(self, dev: _Device, error: SourceError) -> None:
        self._count_error(dev, str(error))
        dev.health.quality = "bad"
        if dev.state != "bad":
            dev.state = "bad"
            self._log.warning(
                "%s does not answer: %s (backing off; logged again when it answers)",
                dev.label, error,
            )
            self._status(dev, "bad", str(error))
        else:
            self._log.debug(
                "%s still does not answer (%d polls): %s",
                dev.label, dev.health.consecutive_errors, error,
            )

    @staticmethod
    def _count_error(dev: _Device, message: str) -> None:
        h = dev.health
        h.total_errors += 1
        h.consecutive_errors += 1
        h.last_error = message

    def _where(self, dev: _Device) -> str:
        cfg = self.cfg
        if isinstance(cfg, ModbusRtuSource):
            return f"{cfg.port} ({cfg.baudrate} baud)"
        return f"{cfg.host}:{cfg.port}"

    def _device(self, device: str) -> _Device:
        if device in self._devices:
            return self._devices[device]
        names = ", ".join(sorted(self._devices))
        if not device:
            if len(self._devices) == 1:
                return next(iter(self._devices.values()))
            raise SourceError(
                self.name, f"the source has {len(self._devices)} devices ({names}): name one"
            )
        raise SourceError(self.name, f"no device {device!r} on this source (devices: {names})")

    # -- for tests, tools and actions --

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    async def poll_once(self, device: str = "") -> None:
        """Poll every group of one device once, now ("" = the only device). Raises SourceError
        (an exception response, or the error of a request that was never answered)."""
        dev = self._device(device)
        for group in dev.groups:
            try:
                await self._poll_group(dev, group, self._attempts)
            except _Unreachable as exc:
                raise exc.error from None

    async def write(
        self,
        device: str,
        function: Literal["coil", "holding"],
        address: int,
        value: bool | int,
        verify: bool,
    ) -> bool | int:
        """Write one coil or holding register of ``device`` ("" = the only device) over its
        link, serialised with the polls. With ``verify``, read it back and return what the
        device holds (a coil as bool, a register as 0..65535); else return what was written.
        Raises SourceError."""
        dev = self._device(device)
        client, unit, limit = dev.link.client, dev.cfg.unit_id, dev.timeout
        async with dev.link.lock:
            if function == "coil":
                await client.write_coil(address, bool(value), unit, per_request=limit)
                if not verify:
                    return bool(value)
                (bit,) = await client.read(ReadBlock(FN_COIL, address, 1), unit, per_request=limit)
                return bool(bit)
            await client.write_register(address, int(value), unit, per_request=limit)
            if not verify:
                return int(value) & 0xFFFF
            (word,) = await client.read(ReadBlock(FN_HOLDING, address, 1), unit, per_request=limit)
            return word

    def device_unit(self, device: str = "") -> int:
        """The unit id of ``device`` ("" = the only device). Raises SourceError."""
        return self._device(device).cfg.unit_id

    async def close(self) -> None:
        for link in self._links:
            await link.client.close()


ModbusTcpPoller = ModbusBusPoller  # the name before RTU buses (issue #2)


# --- simulated server ---------------------------------------------------------------------------

Table = Literal["coil", "discrete", "holding", "input"]
_FC_TABLE: dict[int, Table] = {
    1: "coil", 5: "coil", 15: "coil",
    2: "discrete",
    3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding",
    4: "input",
}


@dataclass(frozen=True, slots=True)
class SimWrite:
    """A write the simulated server received, as applied (an ignored write shows in ``values``
    the unchanged value, in ``requested`` what the client asked for)."""

    device_id: int
    table: Literal["coil", "holding"]
    address: int
    values: tuple[int, ...]
    requested: tuple[int, ...]


@dataclass
class _Tables:
    size: int
    coil: list[bool] = field(init=False)
    discrete: list[bool] = field(init=False)
    holding: list[int] = field(init=False)
    input: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.coil = [False] * self.size
        self.discrete = [False] * self.size
        self.holding = [0] * self.size
        self.input = [0] * self.size


def _pack16(bits: Sequence[bool]) -> int:
    word = 0
    for i, bit in enumerate(bits):
        if bit:
            word |= 1 << i
    return word


class SimulatedModbusServer:
    """A Modbus TCP server on ``host:port`` (port 0: a free port, see ``.port`` after start)
    serving one or more unit ids, each with ``size`` coils, discrete inputs, holding and input
    registers, all 0 at first. Unknown unit ids get exception 0x0B (gateway target failed).

    Python reads and writes the tables directly (``set_holding``, ``get_coil``, ...; the first
    unit id unless ``device_id=`` says otherwise); ``requests``/``request_count`` count what
    clients asked for, ``on_write``/``next_write()`` report writes, ``ignore_writes`` makes an
    address accept writes without changing (a faulty device), ``silence`` makes a unit stop
    answering (a dead device behind a gateway: requests are counted, no response is sent).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        device_id: int | Iterable[int] = 1,
        *,
        size: int = 4096,
    ) -> None:
        self.host = host
        self.port = port
        ids = [device_id] if isinstance(device_id, int) else list(device_id)
        if not ids:
            raise ValueError("SimulatedModbusServer needs at least one device id")
        self.device_ids: tuple[int, ...] = tuple(ids)
        self.size = -(-size // 16) * 16  # bit tables are stored in 16-bit words
        self._tables = {dev: _Tables(self.size) for dev in self.device_ids}
        self._ignored: set[tuple[int, str, int]] = set()
        self._silent: set[int] = set()
        self.requests: collections.Counter[tuple[int, int]] = collections.Counter()
        self.connections = 0
        self.writes: list[SimWrite] = []  # most recent last; bounded
        self.on_write: Callable[[SimWrite], None] | None = None
        self._waiters: list[asyncio.Future[SimWrite]] = []
        self._server: ModbusTcpServer | None = None

    # -- python access to the tables --

    def _t(self, device_id: int | None) -> _Tables:
        return self._tables[self.device_ids[0] if device_id is None else device_id]

    def _check(self, address: int) -> None:
        if not 0 <= address < self.size:
            raise IndexError(f"address {address} outside 0..{self.size - 1}")

    def set_coil(self, address: int, value: bool, *, device_id: int | None = None) -> None:
        self._check(address)
        self._t(device_id).coil[address] = bool(value)

    def get_coil(self, address: int, *, device_id: int | None = None) -> bool:
        self._check(address)
        return self._t(device_id).coil[address]

    def set_discrete(self, address: int, value: bool, *, device_id: int | None = None) -> None:
        self._check(address)
        self._t(device_id).discrete[address] = bool(value)

    def get_discrete(self, address: int, *, device_id: int | None = None) -> bool:
        self._check(address)
        return self._t(device_id).discrete[address]

    @staticmethod
    def _word(value: int) -> int:
        if not -32768 <= value <= 65535:
            raise ValueError(f"{value} does not fit a 16-bit register")
        return value & 0xFFFF

    def set_holding(self, address: int, value: int, *, device_id: int | None = None) -> None:
        """Set a holding register (0..65535, or -32768..-1 stored as two's complement)."""
        self._check(address)
        self._t(device_id).holding[address] = self._word(value)

    def get_holding(self, address: int, *, device_id: int | None = None) -> int:
        self._check(address)
        return self._t(device_id).holding[address]

    def set_input(self, address: int, value: int, *, device_id: int | None = None) -> None:
        self._check(address)
        self._t(device_id).input[address] = self._word(value)

    def get_input(self, address: int, *, device_id: int | None = None) -> int:
        self._check(address)
        return self._t(device_id).input[address]

    def set_words(
        self, table: Table, address: int, words: Iterable[int], *, device_id: int | None = None
    ) -> None:
        """Set consecutive registers (or bits, 0/1) of one table from ``address`` on."""
        for i, word in enumerate(words):
            if table == "coil":
                self.set_coil(address + i, bool(word), device_id=device_id)
            elif table == "discrete":
                self.set_discrete(address + i, bool(word), device_id=device_id)
            elif table == "holding":
                self.set_holding(address + i, word, device_id=device_id)
            else:
                self.set_input(address + i, word, device_id=device_id)

    def silence(self, device_id: int, silent: bool = True) -> None:
        """A silent unit receives requests (they are counted) but never answers."""
        if silent:
            self._silent.add(device_id)
        else:
            self._silent.discard(device_id)

    def ignore_writes(
        self, table: Literal["coil", "holding"], address: int, *, device_id: int | None = None
    ) -> None:
        """Accept writes to this address with a normal response but keep the old value."""
        dev = self.device_ids[0] if device_id is None else device_id
        self._ignored.add((dev, table, address))

    # -- observing clients --

    def request_count(self, function: int | None = None, device_id: int | None = None) -> int:
        """Requests received (every function code, or one), for every unit id or one."""
        return sum(
            n
            for (dev, fn), n in self.requests.items()
            if (function is None or fn == function) and (device_id is None or dev == device_id)
        )

    async def next_write(self) -> SimWrite:
        """Wait for the next write a client makes."""
        fut: asyncio.Future[SimWrite] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[(pdu.dev_id, pdu.function_code)] += 1
        return pdu

    def _trace_packet(self, sending: bool, packet: bytes) -> bytes:
        # A response's MBAP header carries the unit id in byte 6: a silenced unit's is not sent.
        if sending and self._silent and len(packet) > 6 and packet[6] in self._silent:
            return b""
        return packet

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            self.connections += 1

    # -- the pymodbus datastore hook --

    def _sync(
        self,
        *,
        dev: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus for every datastore access: our tables are the truth, so copy the
        accessed range into pymodbus' block before it answers, and apply writes to our tables
        (rewriting ``values`` in place for ignored addresses)."""
        table = _FC_TABLE.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        tables = self._tables[dev]
        if table in ("coil", "discrete"):
            bits = tables.coil if table == "coil" else tables.discrete
            first = address // 16  # bit blocks: pymodbus passes the count of 16-bit words
            for r in range(count):
                base = (first + r) * 16
                registers[first - start_address + r] = _pack16(bits[base : base + 16])
        else:
            words = tables.holding if table == "holding" else tables.input
            off = address - start_address
            registers[off : off + count] = words[address : address + count]
        if values is not None and table in ("coil", "holding"):
            self._apply_write(dev, table, address, values)
        return None

    def _apply_write(
        self,
        dev: int,
        table: Literal["coil", "holding"],
        address: int,
        values: list[int] | list[bool],
    ) -> None:
        tables = self._tables[dev]
        requested = tuple(int(v) for v in values)
        for i, v in enumerate(values):
            addr = address + i
            if (dev, table, addr) in self._ignored:
                old = tables.coil[addr] if table == "coil" else tables.holding[addr]
                values[i] = old  # type: ignore[call-overload]  # list[bool] | list[int]
            elif table == "coil":
                tables.coil[addr] = bool(v)
            else:
                tables.holding[addr] = int(v) & 0xFFFF
        write = SimWrite(dev, table, address, tuple(int(v) for v in values), requested)
        self.writes.append(write)
        del self.writes[:-1000]
        if self.on_write is not None:
            self.on_write(write)
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(write)
        self._waiters.clear()

    def _device(self, dev: int, gateway_reject: bool) -> SimDevice:
        async def action(  # noqa: PLR0917 - the signature pymodbus calls
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if gateway_reject:
                return ExcCodes.GATEWAY_NO_RESPONSE
            return self._sync(
                dev=dev,
                function_code=function_code,
                start_address=start_address,
                address=address,
                count=count,
                registers=registers,
                values=values,
            )

        def bits() -> list[SimData]:
            # One list of values, count=1: pymodbus multiplies a bit block by count twice while
            # checking it (count=4096 with a scalar value builds a 16M-entry list).
            return [SimData(0, count=1, values=[False] * self.size, datatype=DataType.BITS)]

        def words() -> list[SimData]:
            return [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(id=dev, simdata=(bits(), bits(), words(), words()), action=action)

    # -- lifecycle --

    async def start(self) -> None:
        """Listen. Raises SourceError when the address cannot be bound (port in use?)."""
        if self._server is not None:
            return
        devices = [self._device(dev, gateway_reject=False) for dev in self.device_ids]
        if 0 not in self.device_ids:
            # pymodbus routes unknown unit ids to unit 0: make that answer like a gateway would.
            devices.append(self._device(0, gateway_reject=True))
        server = ModbusTcpServer(
            devices,
            address=(self.host, self.port),
            trace_pdu=self._trace_pdu,
            trace_packet=self._trace_packet,
            trace_connect=self._trace_connect,
        )
        errors = _remember_oserror(server)
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            reason = _os_reason(errors) or str(exc)
            raise SourceError(
                f"simulator {self.host}:{self.port}", f"cannot listen: {reason}"
            ) from exc
        listener = server.transport
        sockets = getattr(listener, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._server = server

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.shutdown()  # type: ignore[no-untyped-call]
        await asyncio.sleep(0)
        for fut in self._waiters:
            fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> SimulatedModbusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
