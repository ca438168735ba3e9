"""Operator actions on a stub daemon: a quarantined plugin shown and retried (audited with the
user), a retry of a healthy plugin refused."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flux_edge.console import operate, views
from flux_edge.plugins.quarantine import PluginStats, Quarantine


class FakeAudit:
    def __init__(self) -> None:
        self.records: list[tuple[Any, dict[str, Any]]] = []

    def record(self, cmd: Any, **kw: Any) -> None:
        self.records.append((cmd, kw))


def stub(now: list[float]) -> Any:
    stats = PluginStats()
    q = Quarantine("dec", max_failures=2, quarantine_s=60.0, clock=lambda: now[0],
                   stats=stats, logger=logging.getLogger("test"))
    plugin = SimpleNamespace(name="dec", path=Path("/nonexistent/dec.wasm"), stats=stats, _q=q,
                             retry_now=q.end_now)  # Plugin.retry_now is Quarantine.end_now
    pipeline = SimpleNamespace(chains={("src", ""): [plugin]}, executors={}, audit=FakeAudit(),
                               plugins_by_name=lambda: {"dec": [plugin]})
    return SimpleNamespace(pipeline=pipeline), q


def test_quarantine_shown_and_retried() -> None:
    now = [100.0]
    daemon, q = stub(now)
    q.record("trap", "unreachable")
    q.record("trap", "unreachable")
    assert q.active
    (view,) = views.plugins(daemon)
    assert view["quarantined"] and view["last_failure"] == "unreachable"
    assert view["traps"] == 2 and view["quarantines"] == 1
    out = operate.retry_plugin(daemon, "dec", "fixed the meter", "alice")
    assert out == {"ok": True, "plugin": "dec", "instances": 1}
    assert not q.active  # the next call is the trial
    cmd, kw = daemon.pipeline.audit.records[-1]
    assert kw["allowed"] is True
    assert cmd.rule == "console:alice" and cmd.action == "console.plugin_retry"
    assert cmd.params["reason"] == "fixed the meter" and cmd.params["plugin"] == "dec"
    with pytest.raises(operate.OperateError, match="not quarantined"):
        operate.retry_plugin(daemon, "dec", "again", "alice")
    with pytest.raises(operate.OperateError, match="no plugin"):
        operate.retry_plugin(daemon, "nope", "", "alice")
