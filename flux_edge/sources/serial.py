"""Serial devices that are not Modbus: NMEA GPS receivers, ASCII sensors, barcode readers ...

This is the ONLY module that imports pyserial. pyserial opens and configures the port (baud
rate, parity, stop bits, byte size, raw mode, an exclusive lock); the reading itself is done on
the port's non-blocking file descriptor with the event loop's ``add_reader``, so no thread is
involved and every chunk is stamped with its arrival time (the idle framing needs it).

``SerialReader`` follows the source shape of ``flux_edge.sources``:

- ``run()`` opens the port, reads, cuts the stream into frames (``flux_edge.sources.framing``)
  and emits one ``Reading`` (kind bytes, ``topic`` = the port) per frame. A port that cannot be
  opened, or disappears (USB adapter unplugged), is retried with exponential backoff; the
  device's state goes to ``on_status`` ("bad" / "good") and to ``health``.
- Framing errors (an overlong frame, an implausible length field) are counted in
  ``health[device].total_errors``, logged at most once per ``log_every`` seconds, and never
  stop the source.
- ``write(data, timeout)`` sends bytes on the open port for actions, serialised by a lock.
- ``close()`` releases the port.

Reading pauses (the fd is taken off the event loop) while more than ``_HIGH_WATER`` bytes wait
for a slow ``emit``, so a stalled pipeline does not make this process buffer without bound;
the kernel's tty buffer holds what arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import serial

from flux_edge.errors import SourceError
from flux_edge.logs import RateLimitedLog
from flux_edge.model import KIND_BYTES, Reading
from flux_edge.sources import SourceHealth, StatusCallback
from flux_edge.sources.framing import Framer, make_framer

if TYPE_CHECKING:  # the struct is declared by the kind module, which imports this one
    from flux_edge.sources.serial_kind import SerialSource

__all__ = ["SerialReader", "SerialStats"]

_HIGH_WATER = 256 * 1024  # bytes read but not yet framed/emitted before reading pauses
_BYTESIZES = {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}
_STOPBITS = {1: serial.STOPBITS_ONE, 2: serial.STOPBITS_TWO}
_PARITIES = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


@dataclass
class SerialStats:
    """Counters beyond ``SourceHealth`` (for metrics)."""

    frames: int = 0  # frames emitted
    bytes_read: int = 0
    framing_errors: int = 0  # overlong frames / implausible length fields
    discarded_bytes: int = 0  # bytes dropped with them
    opens: int = 0  # successful opens of the port
    port_errors: int = 0  # failed opens and lost ports
    writes: int = 0  # successful write() calls


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a pyserial exception (pyserial sometimes keeps it only in the chained
    OSError)."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if isinstance(code, int):
            return code
        seen = seen.__cause__ or seen.__context__
    return None


def explain_open_error(port: str, exc: BaseException) -> str:
    """Why ``port`` could not be opened, and what to do about it."""
    code = _errno_of(exc)
    text = str(exc)
    if code == errno.ENOENT:
        return (
            f"port {port} does not exist: is the device plugged in? check the path "
            "(ls -l /dev/serial/by-id/ lists adapters by a name that does not change)"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied opening {port}: add the service user to the dialout group "
            "(usermod -aG dialout USER, then restart the service) or fix the device's udev rule"
        )
    if code in (errno.EBUSY, errno.EWOULDBLOCK) or "exclusively lock" in text:
        return (
            f"port {port} is in use by another program (gpsd, ModemManager, a serial console, "
            "another flux-edge source?): stop it or use another port"
        )
    if code in (errno.ENXIO, errno.ENODEV, errno.EIO):
        return f"port {port} has no device behind it (unplugged, or a driver problem): {text}"
    if code == errno.ENOTTY or "Could not configure port" in text:
        return f"{port} is not a serial port (it cannot be configured as one): {text}"
    return f"cannot open port {port}: {text}"


class SerialReader:
    """Reads one serial port, frames it, emits a kind-bytes ``Reading`` per frame.

    ``health`` has one entry, the device (``cfg.device`` or the source name): quality "good"
    while the port is open, ``polls`` counts frames, ``last_success_ts`` is the last frame's
    time, ``total_errors`` counts framing errors and port failures, ``consecutive_errors`` the
    port failures since it last opened. ``run()`` ends by cancellation or ``close()``.
    """

    def __init__(
        self,
        name: str,
        cfg: SerialSource,
        emit: Callable[[Reading], Awaitable[None]],
        *,
        on_status: StatusCallback | None = None,
        wall: Callable[[], float] = time.time,
        backoff_min: float = 1.0,
        backoff_max: float = 30.0,
        log_every: float = 10.0,
        read_size: int = 4096,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.device = cfg.device or name
        try:
            make_framer(cfg)  # refuse settings no framer works with, before anything runs
        except ValueError as exc:
            raise SourceError(name, f"invalid framing settings: {exc}") from None
        self._health = SourceHealth()
        self.health: dict[str, SourceHealth] = {self.device: self._health}
        self.stats = SerialStats()
        self._emit = emit
        self._on_status = on_status
        self._wall = wall
        self._backoff_min = backoff_min
        self._backoff_max = max(backoff_max, backoff_min)
        self._read_size = read_size
        self._log = logging.getLogger(f"flux_edge.source.{name}")
        self._framing_log = RateLimitedLog(self._log, log_every)
        self._state: Literal["good", "bad"] | None = None
        self._failures = 0  # port failures since data last arrived: drives the backoff
        self._port: serial.Serial | None = None
        self._fd: int | None = None
        self._write_lock = asyncio.Lock()
        self._write_waiter: asyncio.Future[None] | None = None
        # read side, valid while the port is open
        self._chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self._pending = 0  # bytes in _chunks
        self._paused = False
        self._lost: SourceError | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._stop = asyncio.Event()  # set by close()

    # -- state -----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _set_state(self, quality: Literal["good", "bad"], error: str) -> None:
        if quality == self._state:
            return
        self._state = quality
        if self._on_status is not None:
            try:
                self._on_status(self.device, quality, error)
            except Exception as exc:  # noqa: BLE001 - a runtime callback must not stop reading
                self._log.error("status callback failed", exc_info=exc)

    def _port_failed(self, exc: SourceError) -> None:
        h = self._health
        h.total_errors += 1
        h.consecutive_errors += 1
        h.last_error = str(exc)
        h.quality = "bad"
        self.stats.port_errors += 1
        self._failures += 1
        if self._state != "bad":
            self._log.warning("%s (retrying; logged again when it works)", exc)
        else:
            self._log.debug("still failing (%d in a row): %s", h.consecutive_errors, exc)
        self._set_state("bad", str(exc))

    def _port_opened(self) -> None:
        h = self._health
        self.stats.opens += 1
        if self._state == "bad":
            self._log.info("port %s is open again after %d failure(s)", self.cfg.port,
                           h.consecutive_errors)
        else:
            self._log.info(
                "reading %s at %d baud, %d%s%d, %s framing",
                self.cfg.port, self.cfg.baudrate, self.cfg.bytesize, self.cfg.parity,
                self.cfg.stopbits, self.cfg.framing,
            )
        h.consecutive_errors = 0
        h.quality = "good"
        self._set_state("good", "")

    def _backoff(self) -> float:
        n = max(self._failures, 1)
        return min(self._backoff_max, self._backoff_min * 2.0 ** min(n - 1, 32))

    # -- the port --------------------------------------------------------------------------------

    def _open(self) -> None:
        cfg = self.cfg
        port = serial.Serial()
        try:
            port.port = cfg.port
            port.baudrate = cfg.baudrate
            port.bytesize = _BYTESIZES.get(cfg.bytesize, cfg.bytesize)
            port.parity = _PARITIES.get(cfg.parity, cfg.parity)
            port.stopbits = _STOPBITS.get(cfg.stopbits, cfg.stopbits)
            port.timeout = 0  # non-blocking: the event loop waits
            port.write_timeout = 0
            port.exclusive = True  # two readers of one port would each get half the bytes
        except ValueError as exc:
            raise SourceError(self.name, f"port {cfg.port}: unsupported setting: {exc}") from None
        try:
            port.open()
        except serial.SerialException as exc:
            raise SourceError(self.name, explain_open_error(cfg.port, exc)) from exc
        except ValueError as exc:
            raise SourceError(self.name, f"port {cfg.port}: unsupported setting: {exc}") from exc
        except OSError as exc:
            raise SourceError(self.name, explain_open_error(cfg.port, exc)) from exc
        self._port = port
        self._fd = port.fileno()

    def _close_port(self) -> None:
        fd, port = self._fd, self._port
        self._fd = self._port = None
        loop = self._loop
        if fd is not None and loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(SourceError(self.name, f"port {self.cfg.port} was closed"))
        self._paused = False
        if port is not None:
            with contextlib.suppress(OSError, serial.SerialException):
                port.close()

    # -- reading ---------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        fd = self._fd
        loop = self._loop
        if fd is None or loop is None:
            return
        try:
            data = os.read(fd, self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(f"port {self.cfg.port} failed while reading ({exc.strerror or exc}): "
                       "was the device unplugged?")
            return
        if not data:
            self._lose(f"port {self.cfg.port} hung up (device unplugged or closed)")
            return
        self._chunks.append((loop.time(), data))
        self._pending += len(data)
        if self._pending > _HIGH_WATER and not self._paused:
            loop.remove_reader(fd)
            self._paused = True
        self._wake.set()

    def _lose(self, message: str) -> None:
        self._lost = SourceError(self.name, message)
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._wake.set()

    def _resume(self) -> None:
        if self._paused and self._fd is not None and self._loop is not None and not self._lost:
            self._paused = False
            self._loop.add_reader(self._fd, self._on_readable)

    async def _deliver(self, frames: list[bytes], framer: Framer, arrived: float) -> None:
        """Emit ``frames`` (completed by bytes that arrived at loop time ``arrived``) and
        account for the framer's errors."""
        stats = self.stats
        if framer.errors != stats.framing_errors:
            new = framer.errors - stats.framing_errors
            stats.framing_errors = framer.errors
            stats.discarded_bytes = framer.discarded
            h = self._health
            h.total_errors += new
            h.last_error = framer.last_error
            self._framing_log.warning(
                "framing",
                f"port {self.cfg.port}: framing error ({stats.framing_errors} so far): "
                f"{framer.last_error}"
            )
        stats.discarded_bytes = framer.discarded
        if not frames:
            return
        loop = asyncio.get_running_loop()
        for frame in frames:
            # when the frame was received, not when a slow pipeline took it
            ts = self._wall() - max(loop.time() - arrived, 0.0)
            await self._emit(
                Reading(
                    source=self.name,
                    device=self.device,
                    ts=ts,
                    kind=KIND_BYTES,
                    payload=frame,
                    topic=self.cfg.port,
                )
            )
            stats.frames += 1
            self._health.polls += 1
            self._health.last_success_ts = ts

    async def _read_loop(self, framer: Framer) -> None:
        """Read and frame until the port is lost (raises SourceError), the reader is closed
        or the task cancelled."""
        loop = asyncio.get_running_loop()
        assert self._fd is not None
        wake = self._wake
        chunks = self._chunks
        loop.add_reader(self._fd, self._on_readable)
        while not self._closed:
            wake.clear()
            if chunks:
                now, data = chunks.popleft()
                self._pending -= len(data)
                self.stats.bytes_read += len(data)
                self._failures = 0
                await self._deliver(framer.feed(data, now), framer, now)
                if not chunks:
                    self._resume()
                continue
            if self._lost is not None:
                raise self._lost
            deadline = framer.deadline()
            if deadline is None:
                await wake.wait()
                continue
            delay = deadline - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()
                continue
            now = loop.time()
            await self._deliver(framer.flush(now), framer, now)

    async def _pause(self, seconds: float) -> None:
        """Sleep between attempts; close() cuts it short."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def run(self) -> None:
        """Open, read, reopen after failures, until cancelled (or ``close()``). Never raises
        anything but CancelledError."""
        self._loop = asyncio.get_running_loop()
        # Each open gets a fresh framer (a frame cut by a lost port is not glued to the next
        # bytes); the counters carry on.
        errors_before = 0
        discarded_before = 0
        try:
            while not self._closed:
                try:
                    self._open()
                except SourceError as exc:
                    self._port_failed(exc)
                    await self._pause(self._backoff())
                    continue
                self._chunks.clear()
                self._pending = 0
                self._lost = None
                self._port_opened()
                framer = make_framer(self.cfg)
                framer.errors = errors_before
                framer.discarded = discarded_before
                try:
                    await self._read_loop(framer)
                except SourceError as exc:
                    self._port_failed(exc)
                except Exception as exc:  # noqa: BLE001 - run() must survive anything (emit)
                    self._log.error("unexpected failure reading %s", self.cfg.port, exc_info=exc)
                    self._port_failed(SourceError(self.name, f"unexpected error: {exc!r}"))
                finally:
                    errors_before, discarded_before = framer.errors, framer.discarded
                    self._close_port()
                await self._pause(self._backoff())
        finally:
            self._close_port()

    # -- writing ---------------------------------------------------------------------------------

    async def _writable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._write_waiter = waiter

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await waiter
        finally:
            if self._fd == fd:
                loop.remove_writer(fd)
            if self._write_waiter is waiter:
                self._write_waiter = None

    async def write(self, data: bytes, timeout: float) -> None:  # noqa: ASYNC109 - the contract
        """Send ``data`` on the open port within ``timeout`` seconds (waiting for an earlier
        write included). Returns when every byte is in the kernel's buffer. Raises SourceError:
        port not open, write failed, or timed out (saying how many bytes went out)."""
        sent = 0
        try:
            async with asyncio.timeout(timeout):
                async with self._write_lock:
                    while sent < len(data):
                        fd = self._fd
                        if fd is None:
                            why = self._health.last_error or "it has not been opened yet"
                            raise SourceError(
                                self.name, f"port {self.cfg.port} is not open ({why})"
                            )
                        try:
                            sent += os.write(fd, data[sent:])
                        except (BlockingIOError, InterruptedError):
                            await self._writable(fd)
                        except OSError as exc:
                            self._lose(f"port {self.cfg.port} failed while writing "
                                       f"({exc.strerror or exc}): was the device unplugged?")
                            raise SourceError(
                                self.name,
                                f"writing to {self.cfg.port} failed after {sent} of "
                                f"{len(data)} bytes: {exc.strerror or exc}",
                            ) from exc
        except TimeoutError:
            raise SourceError(
                self.name,
                f"writing {len(data)} bytes to {self.cfg.port} took longer than {timeout:g} s "
                f"({sent} sent; is the device applying flow control?)",
            ) from None
        self.stats.writes += 1

    async def close(self) -> None:
        """Release the port; a running ``run()`` returns. ``run()`` also releases the port
        when it ends."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._close_port()
