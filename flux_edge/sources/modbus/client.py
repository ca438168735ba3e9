"""Modbus clients: the ONLY pymodbus import of flux-edge (pinned to 3.16: its API changes
between minor releases). Everything pymodbus raises or returns is turned into flux-edge types
here: ``SourceError`` (naming host:port or serial port and unit id), ``ModbusExceptionResponse``
(link.py) for an exception response, and plain tuples of words.

- ``ModbusTcpClient`` / ``ModbusRtuClient``: one TCP connection / one serial port; every call
  is bounded by a timeout and raises ``SourceError``; our retry policy, not pymodbus' (its
  retries and auto-reconnect are off). The RTU client keeps the spec's inter-frame silence
  (3.5 characters, 1.75 ms above 19200 baud) between the last byte on the line and its next
  request, timed to ~0.1 ms (timing.py). Both are ``ModbusLink``s (link.py), what the poller
  talks to; ``open_link`` is the ``LinkFactory`` that makes them from a source's config.
- Replies checked, not trusted: every byte received goes through ``replies.check_reply``
  before pymodbus sees it (``_guard``, wrapping the transaction manager's ``callback_data``), so
  a reply that is not exactly the answer to the request sent (wrong function code, unit id,
  transaction id, byte count, CRC; truncated; garbage before or after it) fails the request at
  once with ``BadReply`` (a reason and what exactly), and pymodbus only ever decodes well-formed
  answers. Whatever pymodbus still raises in its receive callback is caught there too: no
  traceback from a device's bytes reaches the log.
- pymodbus' own logging is routed into ours (``flux_edge.source.modbus.pymodbus``), one line per
  message per minute at most; a dead device does not log pymodbus' warning on every retry.

pymodbus internals we rely on (3.16), checked when a client is made: ``client.ctx`` (the
transaction manager), its ``callback_data`` (what the transport calls with the bytes received
so far; returns how many it used) and ``call_create`` (the connection factory).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from flux_edge.errors import SourceError
from flux_edge.logs import RateLimitedLog
from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING
from flux_edge.sources.modbus.link import (
    BadReply,
    LinkFailure,
    ModbusExceptionResponse,
    ModbusLink,
    exception_text,
)
from flux_edge.sources.modbus.plan import _TABLE_NAMES, ReadBlock, request_bytes, response_bytes
from flux_edge.sources.modbus.replies import Bad, Framing, Incomplete, check_reply, leftover
from flux_edge.sources.modbus.spec import ModbusRtuSource, ModbusTcpSource
from flux_edge.sources.modbus.timing import PreciseTimer, char_time, inter_frame_gap

__all__ = [
    "ModbusExceptionResponse",
    "ModbusRtuClient",
    "ModbusTcpClient",
    "open_link",
    "os_reason",
    "remember_oserror",
]

# --- pymodbus glue ------------------------------------------------------------------------------

# pymodbus swallows the OSError of a failed connect or listen: it logs it (and only the first of
# identical consecutive messages) and returns False. Two small pieces of glue:
# - ``remember_oserror`` wraps the protocol's connection factory to keep the OSError, so the
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


class _RouteToOurs(logging.Handler):
    """pymodbus' records, re-logged under ``flux_edge.source.modbus.pymodbus`` at most once per
    minute per place in pymodbus that logs (pymodbus formats its messages itself, data bytes
    included, so the text cannot be the key; the count of the rest rides on the next line),
    without tracebacks (an exception's one-line summary is kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.target = logging.getLogger("flux_edge.source.modbus.pymodbus")
        self.limit = RateLimitedLog(self.target, 60.0)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a record whose arguments do not fit its format
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {exc})"
        if not self.target.isEnabledFor(record.levelno):
            return
        key = f"{record.pathname}:{record.lineno}:{record.levelno}"
        self.limit.log(key, "%s", text[:500], level=record.levelno)


_pymodbus_log = logging.getLogger("pymodbus")
_pymodbus_log.addHandler(_RouteToOurs())
_pymodbus_log.propagate = False
logging.getLogger("pymodbus.logging").addFilter(_PymodbusLogFilter())


def remember_oserror(protocol: object) -> list[OSError]:
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


def os_reason(errors: list[OSError]) -> str:
    """The last OSError as a short reason: 'connection refused', 'name or service not known'."""
    if not errors:
        return ""
    exc = errors[-1]
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return exc.strerror or str(exc) or type(exc).__name__


# --- clients ------------------------------------------------------------------------------------

Request = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]


class _Client:
    """What the TCP and RTU clients share: connect on demand, bound every call by a timeout,
    turn pymodbus' errors and exception responses into ``SourceError``s. One request at a
    time: callers serialise (the poller holds a lock per link)."""

    drop_on_timeout = True  # a late answer would be taken for the next request's
    drop_on_bad_reply = True  # a TCP stream that carried a bad frame is out of step
    framing: Framing = "tcp"
    lost_text = "the device closed the connection"

    def __init__(self, source: str, *, timeout: float) -> None:
        self.source = source
        self.timeout = timeout
        self._client: ModbusBaseClient | None = None
        # The task waiting for a response, so a link closed under it fails the request at
        # once (pymodbus would leave it waiting for the timeout).
        self._waiting: asyncio.Task[object] | None = None
        self._lost = False
        self._sent: bytes | None = None  # the request frame out now, as sent (None: none)
        self._received = b""  # what has arrived for it so far (pymodbus' buffer)
        self._bad: Bad | None = None  # why the reply to it was refused

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

    def _trace_sent(self, data: bytes) -> None:
        """The request frame pymodbus is about to write (its transaction id included)."""
        if self._waiting is not None:
            self._sent, self._received = data, b""

    def _heard(self, data: bytes) -> None:
        """Bytes arrived (``data``: all not yet used); RTU keeps its line timing here."""

    def _guard(self, callback: Callable[..., int]) -> Callable[..., int]:
        """Wrap the transaction manager's ``callback_data``: check what arrived against the
        request (replies.py) and pass it to pymodbus only when it is exactly its answer."""

        def on_data(data: bytes, addr: tuple[object, ...] | None = None) -> int:
            self._heard(data)
            sent, waiting = self._sent, self._waiting
            if sent is None or waiting is None or waiting.done() or self._bad is not None:
                self._noise(data)
                return len(data)
            self._received = data
            verdict = check_reply(self.framing, sent, data)
            if isinstance(verdict, Incomplete):
                return 0  # keep it; more is coming (or the timeout says why not)
            if isinstance(verdict, Bad):
                self._refuse(verdict)
                return len(data)
            try:
                return callback(data, addr)
            except Exception as exc:  # noqa: BLE001 - pymodbus raising in its receive callback
                self._refuse(Bad("undecodable", f"{type(exc).__name__}: {exc}"))
                return len(data)

        return on_data

    def _refuse(self, bad: Bad) -> None:
        self._bad = bad
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.cancel()

    def _noise(self, data: bytes) -> None:
        """Bytes with no request waiting for them: dropped, counted."""
        self.noise_bytes += len(data)

    noise_bytes = 0  # bytes received while no request waited (line noise, late answers)

    def _install(self, client: ModbusBaseClient) -> None:
        ctx = getattr(client, "ctx", None)
        callback = getattr(ctx, "callback_data", None)
        if ctx is None or callback is None:
            raise SourceError(
                self.source,
                "this pymodbus has no ctx.callback_data (flux-edge needs pymodbus 3.16): replies "
                "cannot be checked, so none is read",
            )
        setattr(ctx, "callback_data", self._guard(callback))  # noqa: B010 - not typed

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
        self._install(client)
        errors = remember_oserror(client.ctx)
        try:
            async with asyncio.timeout(self.timeout):
                ok = await client.connect()
        except TimeoutError as exc:
            client.close()
            raise LinkFailure(
                self.source, self._connect_failed("", timed_out=True), "connect"
            ) from exc
        except asyncio.CancelledError:
            client.close()
            raise
        if not ok:
            client.close()
            raise LinkFailure(
                self.source, self._connect_failed(os_reason(errors), False), "connect"
            )
        self._client = client

    async def _call(
        self,
        what: str,
        unit_id: int,
        request: Request,
        per_request: float | None,
        frame: tuple[int, int],
        *,
        function: int,
    ) -> ModbusPDU:
        """One request and its response; ``frame``: their sizes in bytes on an RTU line;
        ``function``: the request's function code (the answer must carry it)."""
        await self.connect()
        client = self._client
        assert client is not None
        timeout = per_request or self.timeout
        limit = self._call_timeout(timeout, *frame)
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        self._waiting, self._lost = task, False
        self._sent, self._received, self._bad = None, b"", None
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
            sent, got = self._sent, self._received
            if sent is not None and got:
                bad = leftover(self.framing, sent, got)
                raise BadReply(
                    self.source, f"{self._where(unit_id)}: {what}: bad reply: {bad}", bad.reason
                ) from None
            raise LinkFailure(
                self.source, f"{self._where(unit_id)}: {self._timeout_text(what, limit)}",
                "timeout",
            ) from exc
        except (ModbusException, OSError) as exc:
            self._drop()
            raise LinkFailure(
                self.source, f"{self._where(unit_id)}: {what} failed: {exc}", "link"
            ) from exc
        except asyncio.CancelledError:
            bad = self._bad
            if bad is not None and task is not None and task.uncancel() == 0:
                if self.drop_on_bad_reply:
                    self._drop()
                raise BadReply(
                    self.source, f"{self._where(unit_id)}: {what}: bad reply: {bad}", bad.reason
                ) from None
            # A late answer would be taken for the next request's: start afresh.
            self._drop()
            if self._lost and task is not None and task.uncancel() == 0:
                raise LinkFailure(
                    self.source,
                    f"{self._where(unit_id)}: {self.lost_text} during {what}",
                    "link",
                ) from None
            raise
        finally:
            self._waiting = None
            self._sent = None
            self._waiting_for(None, timeout, 0)
        fn = response.function_code & 0x7F
        if fn != function:  # replies.py saw to it already; pymodbus must agree
            self._drop()
            raise BadReply(
                self.source,
                f"{self._where(unit_id)}: {what}: bad reply: function code {fn}",
                "function_code",
            )
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise ModbusExceptionResponse(
                self.source,
                f"{self._where(unit_id)}: {what}: exception response {exception_text(code)}",
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
        response = await self._call(what, unit_id, request, per_request, frame, function=fn)
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
            function=5,
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
            function=6,
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
            trace_packet=self._trace_packet,
            trace_connect=self._on_connection,
        )

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self._trace_sent(data)
        return data

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
    drop_on_bad_reply = False  # the next request waits for the line's silence anyway
    framing: Framing = "rtu"
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
        self._timer = PreciseTimer(f"flux-edge {source} timer")

    def _where(self, unit_id: int | None = None) -> str:
        unit = f" unit {unit_id}" if unit_id is not None else ""
        return f"{self.port}{unit}"

    def _settings(self) -> str:
        return f"{self.baudrate} baud {self.bytesize}{self.parity}{self.stopbits}"

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        # Sending: the line is busy until our last character is out. (Receiving: ``_heard``.)
        if sending:
            self._trace_sent(data)
            self._quiet_from = time.monotonic() + len(data) * self.char_time
        return data

    def _heard(self, data: bytes) -> None:
        # pymodbus passes what it has buffered so far; its last byte arrived now
        self._quiet_from = time.monotonic()
        deadline = self._deadline
        if deadline is not None and not self._rx_started:
            self._rx_started = True
            deadline.reschedule(asyncio.get_running_loop().time() + self._rx_allowance)

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


def open_link(source: str, cfg: ModbusTcpSource | ModbusRtuSource, timeout: float) -> ModbusLink:
    """The ``LinkFactory`` of real links: the RTU client of ``cfg``'s port, or a TCP client to
    its endpoint; ``timeout`` is the response time limit of the device(s) it serves."""
    if isinstance(cfg, ModbusRtuSource):
        return ModbusRtuClient(
            source,
            cfg.port,
            baudrate=cfg.baudrate,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            bytesize=cfg.bytesize,
            timeout=timeout,
            inter_frame=cfg.inter_frame,
        )
    return ModbusTcpClient(source, cfg.host, cfg.port, timeout=timeout)
