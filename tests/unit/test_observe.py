"""What the daemon exports about its stages (runtime/observe.py)."""

from __future__ import annotations

from flux_edge.runtime.health import HealthMonitor
from flux_edge.runtime.observe import stage_busy


def test_stage_busy_seconds_come_from_the_monitor_snapshot() -> None:
    # regression: the gauge read a key the snapshot does not have ("busy_since"), so every
    # stage showed 0 however long it had been on one unit of work
    now = [100.0]
    monitor = HealthMonitor(30.0, clock=lambda: now[0])
    busy = monitor.register("plugins:slow")
    monitor.register("rules")
    busy.begin()
    now[0] += 2.5
    assert dict((labels["stage"], v) for labels, v in stage_busy(monitor.snapshot())) == {
        "plugins:slow": 2.5,
        "rules": 0.0,
    }
    busy.done()
    assert all(v == 0.0 for _labels, v in stage_busy(monitor.snapshot()))
