"""Is every stage making progress? Gates the systemd watchdog and answers /healthz.

Each stage holds a :class:`Heartbeat` and marks the unit of work it is busy with
(``begin()`` ... ``done()``). A stage waiting for input is idle, never stuck: a quiet plant is
healthy. A *critical* stage busy with one unit longer than ``stall_timeout`` is stuck (a plugin
call that never returns, a device write that hangs): :class:`WatchdogFeeder` then stops feeding
systemd's watchdog, which restarts the service.

An event loop that is blocked outright needs no detection: the feeder runs on that loop, so its
pings stop by themselves. That is why the feeder must stay a coroutine, never a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from flux_edge.runtime.systemd import Notifier

log = logging.getLogger("flux_edge.runtime.health")

MIN_PERIOD = 0.05  # seconds: the feeder never wakes more often than this
IDLE_PERIOD = 1.0  # seconds between checks when systemd set no watchdog


class Heartbeat:
    """One stage's progress marks. The hot path only writes two attributes."""

    __slots__ = ("_clock", "busy_since", "critical", "last_progress", "name")

    def __init__(self, name: str, critical: bool, clock: Callable[[], float]) -> None:
        self.name = name
        self.critical = critical
        self._clock = clock
        # monotonic time the current unit of work started; None while waiting for input
        self.busy_since: float | None = None
        self.last_progress: float = clock()  # monotonic time the last unit was completed

    def begin(self) -> None:
        """The stage took a unit of work (a batch, a command, a poll)."""
        self.busy_since = self._clock()

    def done(self) -> None:
        """The unit is finished (successfully or not): the stage is idle again."""
        self.busy_since = None
        self.last_progress = self._clock()


def _secs(value: float) -> str:
    """42 s, 30.5 s, 1234 s: tenths only where they tell something."""
    text = f"{value:.0f}" if value >= 100 else f"{value:.1f}".removesuffix(".0")
    return text + " s"


class HealthMonitor:
    """The stages' heartbeats and the verdict on them. Pure: no I/O, the clock is injected."""

    def __init__(self, stall_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, not {stall_timeout!r}")
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.loop_lag: float = 0.0  # seconds; last event-loop lag measured by the feeder
        self.loop_lag_max: float = 0.0  # seconds; the worst lag measured so far
        self._beats: dict[str, Heartbeat] = {}

    def register(self, name: str, critical: bool = True) -> Heartbeat:
        """A heartbeat for stage ``name``. A non-critical stage is reported in the snapshot but
        never withholds the watchdog. Raises ValueError if ``name`` is registered already
        (unregister the old stage first, e.g. when a reload rebuilds it)."""
        if name in self._beats:
            raise ValueError(f"stage {name!r} is registered already: unregister it first")
        beat = Heartbeat(name, critical, self.clock)
        self._beats[name] = beat
        return beat

    def unregister(self, name: str) -> None:
        """Forget stage ``name`` (unknown names are ignored)."""
        self._beats.pop(name, None)

    def check(self) -> list[str]:
        """One sentence per critical stage stuck for longer than ``stall_timeout``; empty when
        every critical stage is idle or busy for less."""
        now = self.clock()
        limit = self.stall_timeout
        problems = []
        for beat in self._beats.values():
            since = beat.busy_since
            if beat.critical and since is not None and now - since > limit:
                problems.append(
                    f"stage {beat.name} has been busy with one batch for {_secs(now - since)} "
                    f"(stall_timeout {limit:g} s)"
                )
        return problems

    def snapshot(self) -> dict[str, dict[str, float | bool | None]]:
        """Per stage: ``critical``, ``busy`` (seconds busy with the current unit, None when
        idle), ``since_progress`` (seconds since the last completed unit, or since the stage was
        registered) and ``stalled`` (what :meth:`check` reports)."""
        now = self.clock()
        out: dict[str, dict[str, float | bool | None]] = {}
        for name, beat in self._beats.items():
            since = beat.busy_since
            busy = None if since is None else max(0.0, now - since)
            out[name] = {
                "critical": beat.critical,
                "busy": busy,
                "since_progress": max(0.0, now - beat.last_progress),
                "stalled": busy is not None and beat.critical and busy > self.stall_timeout,
            }
        return out

    def health(self) -> tuple[bool, dict[str, object]]:
        """The verdict for /healthz (MetricsServer's ``health`` callback): healthy when no
        critical stage is stuck."""
        problems = self.check()
        return not problems, {
            "healthy": not problems,
            "problems": problems,
            "loop_lag": self.loop_lag,
            "loop_lag_max": self.loop_lag_max,
            "stages": self.snapshot(),
        }


class WatchdogFeeder:
    """Feeds systemd's watchdog while every critical stage makes progress; sends STATUS."""

    def __init__(
        self,
        notifier: Notifier,
        monitor: HealthMonitor,
        status: Callable[[], str],
        status_every: float = 5.0,
    ) -> None:
        self._notifier = notifier
        self._monitor = monitor
        self._status = status
        self._status_every = status_every
        self.withholding = False  # True while stuck stages keep the watchdog unfed
        self._status_failing = False

    async def run(self) -> None:
        """Until cancelled. Pings every watchdog interval / 3 (at least 50 ms apart) while
        :meth:`HealthMonitor.check` finds nothing; measures how late its own wake-ups are
        (``monitor.loop_lag``)."""
        interval = self._notifier.watchdog_interval
        period = max(interval / 3, MIN_PERIOD) if interval else IDLE_PERIOD
        loop = asyncio.get_running_loop()
        next_status = loop.time()
        while True:
            self._tick(interval is not None)
            now = loop.time()
            if now >= next_status:
                self._send_status()
                next_status = now + self._status_every
            wake = loop.time() + period
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - wake)
            monitor = self._monitor
            monitor.loop_lag = lag
            monitor.loop_lag_max = max(monitor.loop_lag_max, lag)

    def _tick(self, watchdog: bool) -> None:
        problems = self._monitor.check()
        if not problems:
            if watchdog:
                self._notifier.watchdog()
            if self.withholding:
                self.withholding = False
                log.info(
                    "every critical stage makes progress again%s",
                    ": watchdog fed again" if watchdog else "",
                )
            return
        if not self.withholding:
            self.withholding = True
            stuck = "; ".join(problems)
            if watchdog:
                log.error("watchdog not fed: %s; systemd will restart the service", stuck)
            else:
                log.error(
                    "%s; no systemd watchdog is set, so nothing will restart the service", stuck
                )

    def _send_status(self) -> None:
        try:
            text = self._status()
        except Exception:
            if not self._status_failing:
                log.exception("the status summary for systemd failed; it is retried quietly")
            self._status_failing = True
            return
        self._status_failing = False
        self._notifier.status(text)
