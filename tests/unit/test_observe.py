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


def test_quarantined_plugins_and_failing_rules_are_degraded_not_hung() -> None:
    # issue #12 item 5: user code that fails is named in /healthz and STATUS=, which stays 200
    # (the watchdog is fed: everything else is served); a stuck stage is what turns it 503
    from types import SimpleNamespace

    from flux_edge.runtime.observe import health_report, status_line
    from flux_edge.state.faults import StoreHealth

    bad = SimpleNamespace(name="decoder", quarantined=True)
    good = SimpleNamespace(name="scaler", quarantined=False)
    failing = {"overheat": object()}
    pipeline = SimpleNamespace(
        chains={("src", ""): [bad, good]}, executors={}, sources={},
        plugins_by_name=lambda: {"decoder": [bad], "scaler": [good]},
        stats={"plugins": SimpleNamespace(processed=5)},
        engine=SimpleNamespace(failing=lambda: failing),
        store=SimpleNamespace(health=StoreHealth("rule_state", "/tmp/x")),
        audit=SimpleNamespace(health=StoreHealth("audit", "/tmp/y")),
        safety_health=StoreHealth("actuator_state", "/tmp/z"),
    )
    now = [0.0]
    monitor = HealthMonitor(30.0, clock=lambda: now[0])
    daemon = SimpleNamespace(pipeline=pipeline, monitor=monitor, uplink=None, reload_error="")
    healthy, body = health_report(daemon)  # type: ignore[arg-type]
    assert healthy and body["status"] == "degraded"
    assert body["plugins_quarantined"] == ["decoder"] and body["rules_failing"] == ["overheat"]
    line = status_line(daemon)  # type: ignore[arg-type]
    assert "PLUGIN QUARANTINED: decoder" in line and "RULE FAILING: overheat" in line
    bad.quarantined = False
    failing.clear()
    healthy, body = health_report(daemon)  # type: ignore[arg-type]
    assert healthy and body["status"] == "ok"
    stage = monitor.register("plugins:src")
    stage.begin()
    now[0] += 31.0
    healthy, body = health_report(daemon)  # type: ignore[arg-type]
    assert not healthy and body["status"] == "stuck"
