"""Plugin.act (the optional flux_act export) against a real module: tests/fixtures/wat/act.wat.

act.wat answers with the command JSON it received; the first letter of the rule name makes it
misbehave (see the comment at its top).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux_edge.errors import (
    PluginABIError,
    PluginError,
    PluginQuarantined,
    PluginTimeout,
    PluginTrap,
)
from flux_edge.model import Command, Measurement, Reading
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits, encode_command
from tests.support import FakeClock

WAT = Path(__file__).resolve().parent.parent / "fixtures" / "wat"


def load_act(host: PluginHost, **limits: float) -> Plugin:
    return host.load("act", WAT / "act.wat", PluginLimits(**limits), {})  # type: ignore[arg-type]


def command(rule: str = "hot", params: dict[str, object] | None = None) -> Command:
    cause = Measurement(device="boiler1", name="temp", value=81.5, ts=12.0, unit="°C")
    return Command(rule=rule, action="cool", ts=13.5, cause=cause, params=params or {"x": 1})


def test_act_returns_the_guest_bytes(host: PluginHost) -> None:
    plugin = load_act(host)
    assert plugin.has_act and not plugin.has_process
    out = plugin.act(command())
    assert json.loads(out) == {
        "rule": "hot", "action": "cool", "ts": 13.5, "device": "boiler1", "name": "temp",
        "value": 81.5, "unit": "°C", "quality": "good", "params": {"x": 1},
    }
    assert out.startswith(b'{"rule":"hot"')  # the fixture relies on the field order
    assert plugin.stats.calls == 1


def test_command_without_a_cause_has_empty_cause_fields() -> None:
    cmd = Command(rule="r", action="a", ts=1.0)
    assert json.loads(encode_command(cmd)) == {
        "rule": "r", "action": "a", "ts": 1.0, "device": "", "name": "", "value": None,
        "unit": "", "quality": "", "params": {},
    }


def test_trap_raises_and_recycles(host: PluginHost) -> None:
    plugin = load_act(host)
    with pytest.raises(PluginTrap, match="unreachable"):
        plugin.act(command("trap"))
    assert plugin.stats.traps == 1
    assert json.loads(plugin.act(command()))["rule"] == "hot"  # a fresh instance
    assert plugin.stats.recycles == 1


def test_timeout_raises(host: PluginHost) -> None:
    plugin = load_act(host, timeout_s=0.02)
    with pytest.raises(PluginTimeout, match="timed out after 20 ms"):
        plugin.act(command("loop"))
    assert plugin.stats.timeouts == 1


def test_refusal_carries_the_logged_error(host: PluginHost) -> None:
    plugin = load_act(host)
    with pytest.raises(PluginError) as ei:
        plugin.act(command("no"))
    assert type(ei.value) is PluginError
    assert "flux_act failed the command (returned -1): no frame for this" in str(ei.value)


def test_output_outside_memory_is_an_abi_error(host: PluginHost) -> None:
    plugin = load_act(host)
    with pytest.raises(PluginABIError, match="outside the guest"):
        plugin.act(command("out"))


def test_failures_quarantine(host: PluginHost, clock: FakeClock) -> None:
    plugin = load_act(host, max_failures=2, quarantine_s=10.0)
    for _ in range(2):
        with pytest.raises(PluginTrap):
            plugin.act(command("trap"))
    with pytest.raises(PluginQuarantined, match="quarantined until"):
        plugin.act(command())
    clock.now += 11.0
    assert plugin.act(command())  # one trial after the quarantine, and it works
    assert not plugin.quarantined


def test_act_only_plugin_cannot_process(host: PluginHost) -> None:
    plugin = load_act(host)
    r = Reading(source="s", device="d", ts=1.0, payload=b"x")
    out = plugin.process([r])
    assert len(out) == 1 and "does not export flux_process" in out[0].error  # type: ignore[union-attr]


def test_process_only_plugin_cannot_act(host: PluginHost) -> None:
    plugin = host.load("echo", WAT / "echo.wat", PluginLimits(), {"source": {"name": "s"}})
    assert plugin.has_process and not plugin.has_act
    with pytest.raises(PluginError, match="does not export flux_act"):
        plugin.act(command())
