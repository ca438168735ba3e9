"""Modbus TCP: read planning, the client adapter, the poller, and a simulated server.

This is the ONLY module that imports pymodbus (pinned to 3.16: its API changes between minor
releases). Everything pymodbus raises or returns is turned into flux-edge types here:
``SourceError`` (with host:port and unit id in the message) and ``Reading``.

- ``plan_reads``: the register map -> the fewest requests (coalesced across small gaps).
- ``ModbusTcpClient``: one TCP connection, every call bounded by the configured timeout; our
  retry policy, not pymodbus' (its retries and auto-reconnect are switched off); after a failure
  the next call reconnects.
- ``ModbusTcpPoller``: polls on a fixed schedule without drift, backs off on a dead device, keeps
  a ``SourceHealth``, and shares its connection with writes (``write``), serialised by a lock.
- ``SimulatedModbusServer``: a pymodbus server (SimDevice datastore) whose tables Python reads
  and writes directly, that counts requests and reports writes; tests and the demo use it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from flux_edge.config import ModbusTcpSource
from flux_edge.errors import SourceError
from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING, KIND_REGISTERS, Reading
from flux_edge.sources import SourceHealth
from flux_edge.sources.modbus_plan import (
    _TABLE_NAMES,
    MAX_BITS,
    MAX_REGISTERS,
    ReadBlock,
    plan_reads,
    register_span,
)

__all__ = [
    "MAX_BITS",
    "MAX_REGISTERS",
    "ModbusExceptionResponse",
    "ModbusTcpClient",
    "ModbusTcpPoller",
    "ReadBlock",
    "SimWrite",
    "SimulatedModbusServer",
    "SourceHealth",
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


# --- client -------------------------------------------------------------------------------------

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

    The connection is fine: a poller does not back off for these (the device is alive), it
    reports them in its health.
    """

    def __init__(self, source: str, message: str, code: int) -> None:
        self.code = code
        super().__init__(source, message)


class ModbusTcpClient:
    """One Modbus TCP connection to one device (one host:port, any unit id).

    Every call is bounded by ``timeout`` (connecting counts separately) and raises
    ``SourceError`` naming host:port and unit; after a failure the connection is dropped and the
    next call reconnects. pymodbus' own retries and auto-reconnect are off: the caller's policy
    applies. One request at a time: callers serialise (``ModbusTcpPoller`` does).
    """

    def __init__(self, source: str, host: str, port: int = 502, *, timeout: float = 1.0) -> None:
        self.source = source
        self.host = host
        self.port = port
        self.timeout = timeout
        self._client: AsyncModbusTcpClient | None = None
        # The task waiting for a response, so a connection closed by the device fails the
        # request at once (pymodbus would leave it waiting for the timeout).
        self._waiting: asyncio.Task[object] | None = None
        self._lost = False

    def _on_connection(self, connected: bool) -> None:
        if not connected and self._waiting is not None and not self._waiting.done():
            self._lost = True
            self._waiting.cancel()

    def _where(self, unit_id: int | None = None) -> str:
        unit = f" unit {unit_id}" if unit_id is not None else ""
        return f"{self.host}:{self.port}{unit}"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def connect(self) -> None:
        """Connect unless connected. Raises SourceError (refused, unreachable, timed out)."""
        if self.connected:
            return
        self._drop()
        client = AsyncModbusTcpClient(
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
        errors = _remember_oserror(client.ctx)
        try:
            async with asyncio.timeout(self.timeout):
                ok = await client.connect()
        except TimeoutError as exc:
            client.close()
            raise SourceError(
                self.source,
                f"cannot connect to {self._where()}: no answer within {self.timeout:g} s "
                f"(is the host up and the port right?)",
            ) from exc
        except asyncio.CancelledError:
            client.close()
            raise
        if not ok:
            client.close()
            reason = _os_reason(errors) or "connection failed"
            raise SourceError(
                self.source,
                f"cannot connect to {self._where()}: {reason} "
                f"(is the device on and listening on that port?)",
            )
        self._client = client

    async def _call(
        self,
        what: str,
        unit_id: int,
        request: Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]],
    ) -> ModbusPDU:
        await self.connect()
        client = self._client
        assert client is not None
        task = asyncio.current_task()
        self._waiting, self._lost = task, False
        try:
            async with asyncio.timeout(self.timeout):
                response = await request(client)
        except TimeoutError as exc:
            self._drop()
            raise SourceError(
                self.source,
                f"{self._where(unit_id)}: no response to {what} within {self.timeout:g} s",
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
                    f"{self._where(unit_id)}: the device closed the connection during {what}",
                ) from None
            raise
        finally:
            self._waiting = None
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            name, hint = _EXCEPTION_CODES.get(code, ("UNKNOWN", "unknown exception code"))
            raise ModbusExceptionResponse(
                self.source,
                f"{self._where(unit_id)}: {what}: exception response {code:#04x} {name} ({hint})",
                code,
            )
        return response

    async def read(self, block: ReadBlock, unit_id: int) -> tuple[int, ...]:
        """Read one block. Coils/discrete inputs come back as 0/1 words, exactly ``count``."""
        fn, addr, count = block.function, block.address, block.count
        what = block.describe()

        def request(c: AsyncModbusTcpClient) -> Awaitable[ModbusPDU]:
            if fn == FN_COIL:
                return c.read_coils(addr, count=count, device_id=unit_id)
            if fn == FN_DISCRETE:
                return c.read_discrete_inputs(addr, count=count, device_id=unit_id)
            if fn == FN_HOLDING:
                return c.read_holding_registers(addr, count=count, device_id=unit_id)
            return c.read_input_registers(addr, count=count, device_id=unit_id)

        if fn not in _TABLE_NAMES:
            raise SourceError(self.source, f"{what}: unknown function code {fn}")
        response = await self._call(what, unit_id, request)
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

    async def write_coil(self, address: int, value: bool, unit_id: int) -> None:
        await self._call(
            f"write coil {address} := {int(value)}",
            unit_id,
            lambda c: c.write_coil(address, bool(value), device_id=unit_id),
        )

    async def write_register(self, address: int, value: int, unit_id: int) -> None:
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
        )

    async def close(self) -> None:
        self._drop()
        await asyncio.sleep(0)  # let the transport finish closing


# --- poller -------------------------------------------------------------------------------------


class ModbusTcpPoller:
    """Polls one Modbus TCP device on a fixed schedule and emits one ``Reading`` per block.

    Poll k is due at start + k * interval (no drift); a poll that overruns skips the slots it
    missed (counted in ``health.missed_polls``). When the device cannot be reached the poller backs
    off exponentially (``backoff_min`` doubling up to ``backoff_max``, never more often than the
    schedule) and resumes the schedule once it answers. Errors are logged once per change of
    state on ``flux_edge.source.<name>``. ``run()`` only ever ends by cancellation.
    """

    def __init__(
        self,
        name: str,
        cfg: ModbusTcpSource,
        emit: Callable[[Reading], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        backoff_min: float = 1.0,
        backoff_max: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if cfg.interval <= 0:
            raise ValueError(f"source {name!r}: interval must be > 0, got {cfg.interval}")
        self.name = name
        self.cfg = cfg
        self.device = cfg.device or name
        self.plan: list[ReadBlock] = plan_reads(cfg.registers, cfg.max_gap)
        self.health = SourceHealth()
        self._emit = emit
        self._clock = clock
        self._wall = wall
        self._sleep = sleep  # tests pair it with ``clock`` to run the schedule on virtual time
        self._backoff_min = backoff_min
        self._backoff_max = max(backoff_max, backoff_min)
        self._client = ModbusTcpClient(name, cfg.host, cfg.port, timeout=cfg.timeout)
        self._lock = asyncio.Lock()  # pymodbus serves one request at a time per connection
        self._log = logging.getLogger(f"flux_edge.source.{name}")
        self._state: Literal["good", "bad"] | None = None

    # -- polling --

    async def poll_once(self) -> None:
        """Read every block and emit a Reading per block. Raises SourceError on failure.

        A connection failure ends the poll at once. An exception response for one block (the
        device is alive but refuses that block) does not stop the other blocks; the first such
        error is raised at the end.
        """
        refused: ModbusExceptionResponse | None = None
        if not self.plan:
            async with self._lock:
                await self._client.connect()
            return
        for block in self.plan:
            try:
                async with self._lock:
                    words = await self._client.read(block, self.cfg.unit_id)
            except ModbusExceptionResponse as exc:
                refused = refused or exc
                continue
            await self._emit(
                Reading(
                    source=self.name,
                    device=self.device,
                    ts=self._wall(),
                    kind=KIND_REGISTERS,
                    registers=words,
                    function=block.function,
                    address=block.address,
                )
            )
        if refused is not None:
            raise refused

    def _succeeded(self) -> None:
        h = self.health
        h.polls += 1
        h.last_success_ts = self._wall()
        if self._state == "bad":
            self._log.info(
                "%s:%s answers again after %d failed poll(s)",
                self.cfg.host, self.cfg.port, h.consecutive_errors,
            )
        elif self._state is None:
            self._log.info(
                "polling %s:%s unit %d: %d request(s) every %g s",
                self.cfg.host, self.cfg.port, self.cfg.unit_id, len(self.plan), self.cfg.interval,
            )
        h.consecutive_errors = 0
        h.quality = "good"
        self._state = "good"

    def _failed(self, exc: BaseException, unexpected: bool) -> None:
        h = self.health
        h.polls += 1
        h.total_errors += 1
        h.consecutive_errors += 1
        h.last_error = str(exc) if not unexpected else f"unexpected error: {exc!r}"
        h.quality = "bad"
        if self._state != "bad":
            self._log.warning(
                "poll failed: %s (retrying; logged again when it recovers)",
                h.last_error,
                exc_info=exc if unexpected else None,
            )
        else:
            self._log.debug("poll failed again (%d in a row): %s", h.consecutive_errors, exc)
        self._state = "bad"

    async def _poll_guarded(self) -> bool:
        """One poll that never raises (but CancelledError). True when the poller should back
        off (the device could not be reached)."""
        try:
            await self.poll_once()
        except ModbusExceptionResponse as exc:
            self._failed(exc, unexpected=False)
            return False
        except SourceError as exc:
            self._failed(exc, unexpected=False)
            return True
        except Exception as exc:  # noqa: BLE001 - run() must survive anything (e.g. emit failing)
            self._failed(exc, unexpected=True)
            return False
        self._succeeded()
        return False

    def _backoff(self) -> float:
        n = max(self.health.consecutive_errors, 1)
        return min(self._backoff_max, self._backoff_min * 2.0 ** min(n - 1, 32))

    async def run(self) -> None:
        """Poll until cancelled. Never raises anything but CancelledError."""
        interval = self.cfg.interval
        try:
            start = self._clock()
            k = 0
            while True:
                back_off = await self._poll_guarded()
                now = self._clock()
                earliest = now + self._backoff() if back_off else now
                # The first slot after k that is not in the past (or inside the backoff).
                j = max(k + 1, math.ceil((earliest - start) / interval - 1e-9))
                if not back_off:
                    self.health.missed_polls += j - (k + 1)
                k = j
                delay = start + k * interval - self._clock()
                await self._sleep(max(delay, 0.0))
        finally:
            await self.close()

    # -- writes --

    async def write(
        self,
        function: Literal["coil", "holding"],
        address: int,
        value: bool | int,
        verify: bool,
    ) -> bool | int:
        """Write one coil or holding register on this source's unit, over the poller's
        connection (serialised with polls). With ``verify``, read it back and return what the
        device holds (a coil as bool, a register as 0..65535); else return what was written.
        Raises SourceError."""
        unit = self.cfg.unit_id
        async with self._lock:
            if function == "coil":
                await self._client.write_coil(address, bool(value), unit)
                if not verify:
                    return bool(value)
                (bit,) = await self._client.read(ReadBlock(FN_COIL, address, 1), unit)
                return bool(bit)
            await self._client.write_register(address, int(value), unit)
            if not verify:
                return int(value) & 0xFFFF
            (word,) = await self._client.read(ReadBlock(FN_HOLDING, address, 1), unit)
            return word

    async def close(self) -> None:
        await self._client.close()


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
    address accept writes without changing (a faulty device).
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
