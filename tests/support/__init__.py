"""Test doubles of real parts that pymodbus and the OS do not provide ready-made (a baud-accurate
RS-485 line on ptys, Modbus RTU slaves: ``serial_line``), and small helpers for asyncio tests of
sources. Used by tests/integration and bench/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from flux_edge.model import Quality, Reading

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """asyncio.run with an overall time limit, so a hung test fails instead of hanging."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


class Collector:
    """An emit callback that keeps readings (and when they came) and lets a test await them."""

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
        await self.wait_until(lambda: len(self.readings) >= n)

    async def wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._changed.clear()
            await self._changed.wait()

    def of(self, device: str) -> list[Reading]:
        return [r for r in self.readings if r.device == device]

    def count(self, device: str, since: float = -1.0, until: float = float("inf")) -> int:
        """Readings of ``device`` that arrived in [since, until) (collector clock)."""
        return sum(
            1
            for r, t in zip(self.readings, self.times, strict=True)
            if r.device == device and since <= t < until
        )


class StatusLog:
    """An ``on_status`` callback that records (device, quality, error) and lets a test await
    a given change."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Quality, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, device: str, quality: Quality, error: str) -> None:
        self.calls.append((device, quality, error))
        self._changed.set()

    async def wait_for(self, device: str, quality: Quality) -> None:
        while not any(d == device and q == quality for d, q, _ in self.calls):
            self._changed.clear()
            await self._changed.wait()

    def of(self, device: str) -> list[tuple[Quality, str]]:
        return [(q, e) for d, q, e in self.calls if d == device]


class VirtualTime:
    """A clock and a sleep for a poller: time moves only when the poller sleeps or a test says
    so (``advance``), so schedules are checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a source's run() task and check it ends by cancellation, nothing else."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    raise AssertionError("run() returned instead of being cancelled")


class FakeClock:
    """A clock tests set by hand: ``clock.now = ...``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
