"""Stage health (fake clock) and the watchdog feeder against a real notify socket.

The feeder tests let the feeder's own STATUS messages mark its ticks (status_every below the
tick period: one STATUS per tick, numbered by the status callback), so "no ping for N ticks"
is read off the datagram order instead of guessed from sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_edge.runtime.health import HealthMonitor, WatchdogFeeder
from flux_edge.runtime.systemd import Notifier
from tests.support import FakeClock, run
from tests.unit.test_systemd_notify import NotifyReceiver

WATCHDOG = "WATCHDOG=1"


# --- HealthMonitor ------------------------------------------------------------------------------


def test_a_busy_critical_stage_past_stall_timeout_is_reported() -> None:
    clock = FakeClock()
    mon = HealthMonitor(30.0, clock)
    plugins = mon.register("plugins")
    rules = mon.register("rules")
    plugins.begin()
    clock.now += 30.0
    assert mon.check() == []  # exactly at the limit is not yet stuck
    clock.now += 12.0
    assert mon.check() == [
        "stage plugins has been busy with one batch for 42 s (stall_timeout 30 s)"
    ]
    rules.begin()
    clock.now += 30.5
    assert mon.check() == [
        "stage plugins has been busy with one batch for 72.5 s (stall_timeout 30 s)",
        "stage rules has been busy with one batch for 30.5 s (stall_timeout 30 s)",
    ]
    plugins.done()
    rules.done()
    assert mon.check() == []
    assert mon.health()[0] is True


def test_an_idle_stage_is_never_stuck() -> None:
    clock = FakeClock()
    mon = HealthMonitor(0.5, clock)
    beat = mon.register("sources")
    clock.now += 3600.0  # an hour without input: a quiet plant, not a hang
    assert mon.check() == []
    beat.begin()
    clock.now += 0.4
    beat.done()
    clock.now += 3600.0
    assert mon.check() == []


def test_a_non_critical_stage_never_withholds() -> None:
    clock = FakeClock()
    mon = HealthMonitor(1.0, clock)
    mon.register("uplink", critical=False).begin()
    clock.now += 100.0
    assert mon.check() == []
    snap = mon.snapshot()["uplink"]
    assert snap == {"critical": False, "busy": 100.0, "since_progress": 100.0, "stalled": False}


def test_snapshot_and_health() -> None:
    clock = FakeClock()
    mon = HealthMonitor(5.0, clock)
    a = mon.register("plugins")
    mon.register("rules")
    clock.now += 2.0
    a.begin()
    clock.now += 7.0
    assert mon.snapshot() == {
        "plugins": {"critical": True, "busy": 7.0, "since_progress": 9.0, "stalled": True},
        "rules": {"critical": True, "busy": None, "since_progress": 9.0, "stalled": False},
    }
    mon.loop_lag = 0.25
    healthy, body = mon.health()
    assert healthy is False
    assert body["problems"] == [
        "stage plugins has been busy with one batch for 7 s (stall_timeout 5 s)"
    ]
    assert body["loop_lag"] == 0.25
    assert body["stages"] == mon.snapshot()
    a.done()
    assert mon.snapshot()["plugins"] == {
        "critical": True,
        "busy": None,
        "since_progress": 0.0,
        "stalled": False,
    }


def test_register_unregister() -> None:
    mon = HealthMonitor(1.0, FakeClock())
    mon.register("plugins")
    with pytest.raises(ValueError, match="'plugins' is registered already"):
        mon.register("plugins")
    mon.unregister("plugins")
    mon.unregister("plugins")  # unknown: ignored
    beat = mon.register("plugins", critical=False)
    assert beat.name == "plugins" and beat.critical is False
    assert not hasattr(beat, "__dict__")  # __slots__: the hot path stays lean
    with pytest.raises(ValueError, match="stall_timeout"):
        HealthMonitor(0.0)


# --- WatchdogFeeder against a real notify socket ------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    r = NotifyReceiver(str(tmp_path / "notify"))
    yield r
    r.close()


class Ticks:
    """The feeder's status callback: ``tick <n>``, so each STATUS datagram marks one tick."""

    def __init__(self) -> None:
        self.n = 0
        self.fail = False

    def __call__(self) -> str:
        if self.fail:
            raise RuntimeError("summary broke")
        self.n += 1
        return f"tick {self.n}"


async def wait_texts(r: NotifyReceiver, done: Callable[[list[str]], bool]) -> list[str]:
    """Wait (in a thread, the receiver's condition) until the datagrams satisfy ``done``."""
    return await asyncio.to_thread(r.wait, done)


def statuses(texts: list[str]) -> int:
    return sum(t.startswith("STATUS=") for t in texts)


def feeder_test(
    body: Callable[
        [NotifyReceiver, HealthMonitor, WatchdogFeeder, Ticks], Coroutine[Any, Any, None]
    ],
    r: NotifyReceiver,
    clock: Callable[[], float] = time.monotonic,
    watchdog_usec: str = "300000",
) -> None:
    env = {"NOTIFY_SOCKET": r.address}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = watchdog_usec
    notifier = Notifier(env)
    mon = HealthMonitor(30.0, clock)
    ticks = Ticks()
    feeder = WatchdogFeeder(notifier, mon, ticks, status_every=0.01)

    async def main() -> None:
        task = asyncio.create_task(feeder.run())
        try:
            await body(r, mon, feeder, ticks)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main(), timeout=30.0)
    notifier.close()


def test_pings_stop_while_a_stage_is_stuck_and_resume(
    receiver: NotifyReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_edge.runtime.health")
    clock = FakeClock()

    async def body(
        r: NotifyReceiver, mon: HealthMonitor, feeder: WatchdogFeeder, ticks: Ticks
    ) -> None:
        beat = mon.register("plugins")
        mon.register("sources", critical=False).begin()  # busy forever, but not critical
        texts = await wait_texts(r, lambda t: t.count(WATCHDOG) >= 3)
        assert texts[:2] == [WATCHDOG, "STATUS=tick 1"]  # a ping and a status at once
        beat.begin()
        clock.now += 31.0  # the plugin call has now run past stall_timeout
        k = ticks.n  # ticks up to k ran before the stall; each sent its ping, then its status
        texts = await wait_texts(r, lambda t: f"STATUS=tick {k + 6}" in t)
        assert feeder.withholding
        after = texts[texts.index(f"STATUS=tick {k}") + 1 :]
        assert WATCHDOG not in after, after  # six ticks without a ping
        beat.done()
        k = ticks.n
        texts = await wait_texts(r, lambda t: f"STATUS=tick {k + 2}" in t)
        after = texts[texts.index(f"STATUS=tick {k}") + 1 :]
        assert after == [WATCHDOG, f"STATUS=tick {k + 1}", WATCHDOG, f"STATUS=tick {k + 2}"]
        assert not feeder.withholding

    feeder_test(body, receiver, clock)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "watchdog not fed: stage plugins has been busy with one batch for 31 s "
        "(stall_timeout 30 s); systemd will restart the service"
    ]
    assert "every critical stage makes progress again: watchdog fed again" in caplog.text


def test_pings_follow_the_interval(receiver: NotifyReceiver) -> None:
    async def body(
        r: NotifyReceiver, mon: HealthMonitor, feeder: WatchdogFeeder, ticks: Ticks
    ) -> None:
        await wait_texts(r, lambda t: t.count(WATCHDOG) >= 6)

    feeder_test(body, receiver)
    pings = [ts for ts, text in receiver.messages if text == WATCHDOG]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # WATCHDOG_USEC=300000: a ping every 0.1 s, well within the 0.3 s systemd allows
    assert 0.1 * 5 * 0.9 <= pings[5] - pings[0] < 0.3 * 5
    assert max(gaps) < 0.3, gaps


def test_a_blocked_event_loop_stops_the_pings(receiver: NotifyReceiver) -> None:
    block = 1.0  # more than 3 watchdog intervals of 0.3 s

    async def body(
        r: NotifyReceiver, mon: HealthMonitor, feeder: WatchdogFeeder, ticks: Ticks
    ) -> None:
        await wait_texts(r, lambda t: t.count(WATCHDOG) >= 3)
        before = r.texts().count(WATCHDOG)
        time.sleep(block)  # noqa: ASYNC251  a plugin call that does not return blocks the whole loop
        await wait_texts(r, lambda t: t.count(WATCHDOG) >= before + 3)
        assert mon.loop_lag_max >= block - 0.2

    feeder_test(body, receiver)
    pings = [ts for ts, text in receiver.messages if text == WATCHDOG]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= block - 0.1, gaps  # systemd (WatchdogSec=0.3s) would have restarted us
    assert sorted(gaps)[-2] < 0.3, gaps  # and that was the only gap


def test_status_failures_are_logged_and_survived(
    receiver: NotifyReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(
        r: NotifyReceiver, mon: HealthMonitor, feeder: WatchdogFeeder, ticks: Ticks
    ) -> None:
        await wait_texts(r, lambda t: statuses(t) >= 1)
        ticks.fail = True
        at = len(r.texts())
        await wait_texts(r, lambda t: t[at:].count(WATCHDOG) >= 4)  # still pinging
        assert statuses(r.texts()[at:]) <= 1  # (one may have been on its way)
        ticks.fail = False
        await wait_texts(r, lambda t: statuses(t) >= 3)

    feeder_test(body, receiver)
    failures = [rec for rec in caplog.records if "status summary" in rec.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_without_a_watchdog_only_status_is_sent(
    receiver: NotifyReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()

    async def body(
        r: NotifyReceiver, mon: HealthMonitor, feeder: WatchdogFeeder, ticks: Ticks
    ) -> None:
        mon.register("rules").begin()
        clock.now += 60.0
        await wait_texts(r, lambda t: statuses(t) >= 1)
        assert feeder.withholding  # decided in the tick that sent that status

    feeder_test(body, receiver, clock, watchdog_usec="")
    assert WATCHDOG not in receiver.texts()
    assert "no systemd watchdog is set, so nothing will restart the service" in caplog.text
