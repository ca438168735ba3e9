"""RTU timing: what a character and the inter-frame silence take on an RS-485 line, and the timer
that waits such silences out to ~0.1 ms. Pure (no pymodbus): config's bus budget uses the
figures, ``ModbusRtuClient`` (client.py) the timer.

- ``char_bits``/``char_time``: bits and seconds one character takes at a baud rate and framing;
- ``inter_frame_gap``: the silence between two frames (3.5 characters, 1.75 ms above 19200 baud);
- ``PreciseTimer``: sleeps until a monotonic deadline to within a few tens of microseconds.

Frame sizes and the cost of one read (``request_bytes``, ``response_bytes``,
``transaction_time``) are in plan.py, next to the ``ReadBlock`` they measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import queue
import threading
import time

__all__ = [
    "RTU_FAST_BAUD",
    "RTU_FAST_GAP",
    "PreciseTimer",
    "char_bits",
    "char_time",
    "inter_frame_gap",
]

RTU_FAST_BAUD = 19200  # above this rate the spec fixes the inter-frame silence at 1.75 ms
RTU_FAST_GAP = 0.00175


def char_bits(bytesize: int = 8, parity: str = "E", stopbits: int = 1) -> int:
    """Bits on the wire per character: start bit, data bits, parity bit (unless "N"), stop bits."""
    return 1 + bytesize + (0 if parity == "N" else 1) + stopbits


def char_time(baudrate: int, bytesize: int = 8, parity: str = "E", stopbits: int = 1) -> float:
    """Seconds one character takes on the wire (11 bits at 9600 baud: 1.146 ms)."""
    if baudrate <= 0:
        raise ValueError(f"baudrate must be > 0, got {baudrate}")
    return char_bits(bytesize, parity, stopbits) / baudrate


def inter_frame_gap(
    baudrate: int,
    bytesize: int = 8,
    parity: str = "E",
    stopbits: int = 1,
    override: float = 0.0,
) -> float:
    """The silence required between two frames (``override`` when > 0): 3.5 character times,
    fixed at 1.75 ms above 19200 baud (Modbus over serial line, 2.5.1.1)."""
    if override > 0:
        return override
    if baudrate > RTU_FAST_BAUD:
        return RTU_FAST_GAP
    return 3.5 * char_time(baudrate, bytesize, parity, stopbits)


class PreciseTimer:
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
