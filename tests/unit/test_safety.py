"""The safety layer in front of actuators (flux_edge/actions/safety.py), on an injected clock."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from flux_edge.actions.modbus_write_kind import ModbusWriteAction
from flux_edge.actions.safety import SAFETY_RULE, SafetyLayer
from flux_edge.config import ActionSpec, ActuatorConfig, Config
from flux_edge.errors import RuleError
from flux_edge.model import Command, Measurement, Outcome, Quality, Value
from flux_edge.rules.engine import ConditionError
from flux_edge.sources.modbus.spec import ModbusTcpSource, RegisterConfig


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_config(**actuator: Any) -> Config:
    registers = (
        RegisterConfig(name="pressure", address=0, scale=0.1),
        RegisterConfig(name="temperature", address=1),
        RegisterConfig(name="flame", address=0, function="coil"),
    )
    source = ModbusTcpSource(host="127.0.0.1", device="boiler", registers=registers)
    actions: dict[str, ActionSpec] = {
        name: ModbusWriteAction(source="plc", address=addr, value=value)
        for name, addr, value in (
            ("burner_on", 1, True),
            ("burner_off", 1, False),
            ("pump_on", 2, True),
            ("pump_off", 2, False),
            ("horn", 3, True),
        )
    }
    params: dict[str, Any] = {"on": "burner_on", "off": "burner_off"}
    params.update(actuator)
    return Config(
        sources={"plc": source},
        actions=actions,
        actuators={"burner": ActuatorConfig(**params)},
    )


def cmd(action: str, ts: float = 0.0, rule: str = "r") -> Command:
    return Command(rule=rule, action=action, ts=ts)


def ok(c: Command, good: bool = True) -> Outcome:
    return Outcome(command=c, ok=good, ts=0.0, latency_s=0.001, error="" if good else "boom")


def values(
    clock: Clock, quality: Quality = "good", age: float = 0.0, **named: Value
) -> dict[str, dict[str, Measurement]]:
    return {
        "boiler": {
            name: Measurement(
                device="boiler", name=name, value=v, ts=clock() - age, quality=quality
            )
            for name, v in named.items()
        }
    }


NONE: dict[str, dict[str, Measurement]] = {}


def run(layer: SafetyLayer, action: str, vals: Any = NONE, good: bool = True) -> bool:
    """check, and record a (successful) outcome when allowed; True when it ran."""
    c = cmd(action)
    d = layer.check(c, vals)
    if d.allowed:
        layer.record(c, ok(c, good))
    return d.allowed


# --- pass-through and no-ops ----------------------------------------------------------------------


def test_commands_outside_actuators_pass_through() -> None:
    layer = SafetyLayer(make_config(min_on=30), clock=Clock())
    for _ in range(10):
        d = layer.check(cmd("horn"), NONE)
        assert d.allowed and d.actuator == "" and d.reason == ""
    assert not layer.guards("horn") and layer.guards("burner_on")
    assert layer.stats["burner"].allowed == 0


def test_first_switch_from_unknown_state_is_allowed_and_recorded() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_on=30, min_off=30), clock=clock)
    assert layer.state("burner") is None
    d = layer.check(cmd("burner_on"), NONE)
    assert d.allowed and d.switch and d.actuator == "burner"
    layer.record(cmd("burner_on"), ok(cmd("burner_on")))
    assert layer.state("burner") == "on"
    assert layer.stats["burner"].switches == 1


def test_already_on_is_allowed_but_not_a_switch() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_on=30, max_switches=2, window=3600), clock=clock)
    assert run(layer, "burner_on")
    for _ in range(5):
        clock.advance(1)
        d = layer.check(cmd("burner_on"), NONE)
        assert d.allowed and not d.switch and d.reason == "already on"
        layer.record(cmd("burner_on"), ok(cmd("burner_on")))
    assert layer.stats["burner"].switches == 1
    # the re-assertions did not restart the min_on timer: 5 s + 25 s = 30 s after the switch
    clock.advance(25)
    assert layer.check(cmd("burner_off"), NONE).allowed


# --- minimum on/off times -------------------------------------------------------------------------


def test_min_on_blocks_switching_off_too_early() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_on=30), clock=clock)
    assert run(layer, "burner_on")
    clock.advance(12)
    d = layer.check(cmd("burner_off"), NONE)
    assert d.blocked and d.kind == "min_on"
    assert d.reason == "min_on: burner switched on 12 s ago, min_on is 30 s"
    clock.advance(17.9)
    assert layer.check(cmd("burner_off"), NONE).blocked
    clock.advance(0.1)
    assert run(layer, "burner_off")
    assert layer.state("burner") == "off"
    stats = layer.stats["burner"]
    assert stats.blocked == 2 and stats.blocked_by["min_on"] == 2
    assert stats.last_block_reason.startswith("min_on: burner switched on 29.9 s ago")


def test_min_off_blocks_switching_on_too_early() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_off=120), clock=clock)
    assert run(layer, "burner_on")
    assert run(layer, "burner_off")  # min_on 0
    clock.advance(60)
    d = layer.check(cmd("burner_on"), NONE)
    assert d.blocked and d.reason == "min_off: burner switched off 60 s ago, min_off is 2 min"
    clock.advance(60)
    assert run(layer, "burner_on")


def test_a_failed_outcome_changes_nothing() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_on=30, min_off=30), clock=clock)
    assert run(layer, "burner_on")
    clock.advance(40)
    assert run(layer, "burner_off", good=False)  # allowed, but the write failed
    assert layer.state("burner") == "on"
    assert layer.stats["burner"].failures == 1 and layer.stats["burner"].switches == 1
    # still on since 40 s: switching on again is a no-op, off is allowed again
    assert layer.check(cmd("burner_on"), NONE).reason == "already on"
    assert layer.check(cmd("burner_off"), NONE).allowed


def test_clock_going_backwards_does_not_stretch_min_on() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_on=30), clock=clock)
    assert run(layer, "burner_on")
    clock.advance(-3600)  # NTP corrected the clock by an hour
    assert layer.check(cmd("burner_off"), NONE).blocked
    clock.advance(30)
    assert layer.check(cmd("burner_off"), NONE).allowed


# --- switch rate limit ----------------------------------------------------------------------------


def test_max_switches_per_sliding_window() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(max_switches=6, window=3600), clock=clock)
    times = []
    for i in range(6):
        assert run(layer, "burner_on" if i % 2 == 0 else "burner_off")
        times.append(clock())
        clock.advance(600)  # switches at 0, 10, ..., 50 min
    # at 60 min: the first switch (at 0) is exactly one window old and has left the window
    assert clock() - times[0] == 3600
    assert run(layer, "burner_on")
    clock.advance(1)
    d = layer.check(cmd("burner_off"), NONE)
    assert d.blocked and d.kind == "rate_limit"
    assert d.reason == "rate limit: 6 switches in the last 1 h (max_switches is 6)"
    # no-ops are not switches: allowed while rate limited
    assert layer.check(cmd("burner_on"), NONE).allowed
    clock.advance(599)  # the switch at 10 min leaves the window
    assert run(layer, "burner_off")


def test_max_switches_zero_is_unlimited() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(), clock=clock)
    for i in range(100):
        assert run(layer, "burner_on" if i % 2 == 0 else "burner_off")
    assert layer.stats["burner"].switches == 100


# --- interlocks -----------------------------------------------------------------------------------


def interlocked(clock: Clock, **kw: Any) -> SafetyLayer:
    return SafetyLayer(
        make_config(interlock="pressure > 3.0", interlock_device="boiler", **kw), clock=clock
    )


def test_interlock_holds_blocks_switching_on() -> None:
    clock = Clock()
    layer = interlocked(clock)
    d = layer.check(cmd("burner_on"), values(clock, pressure=3.5))
    assert d.blocked and d.kind == "interlock"
    assert d.reason == "interlock: pressure > 3.0 holds"
    # switching off is never interlocked
    assert layer.check(cmd("burner_off"), values(clock, pressure=3.5)).allowed


def test_interlock_not_holding_allows() -> None:
    clock = Clock()
    layer = interlocked(clock)
    assert layer.check(cmd("burner_on"), values(clock, pressure=2.9)).allowed
    # an int value for a double register is widened
    assert layer.check(cmd("burner_on"), values(clock, pressure=2)).allowed


def test_interlock_blocks_even_when_already_on() -> None:
    clock = Clock()
    layer = interlocked(clock)
    assert run(layer, "burner_on", values(clock, pressure=1.0))
    d = layer.check(cmd("burner_on"), values(clock, pressure=4.0))
    assert d.blocked and d.kind == "interlock"


@pytest.mark.parametrize(
    ("vals", "why"),
    [
        ({}, "boiler.pressure has no value yet"),
        ({"quality": "bad"}, "boiler.pressure is bad"),
        ({"quality": "stale"}, "boiler.pressure is stale"),
        ({"age": 90.0}, "boiler.pressure is 90 s old (stale_after is 60 s)"),
    ],
)
def test_unknown_interlock_counts_as_holding(vals: dict[str, Any], why: str) -> None:
    clock = Clock()
    layer = interlocked(clock, stale_after=60)
    given = values(clock, pressure=1.0, **vals) if vals else values(clock, temperature=20.0)
    d = layer.check(cmd("burner_on"), given)
    assert d.blocked and d.kind == "interlock"
    assert d.reason == f"interlock: pressure > 3.0 is unknown ({why}): fail safe"


def test_interlock_with_wrong_value_type_is_unknown() -> None:
    clock = Clock()
    layer = interlocked(clock)
    d = layer.check(cmd("burner_on"), values(clock, pressure="high"))
    assert d.blocked and "is unknown" in d.reason


def test_interlock_compile_errors() -> None:
    with pytest.raises(ConditionError) as e:
        SafetyLayer(make_config(interlock="pressure > '3'", interlock_device="boiler"))
    assert e.value.key == ("actuators", "burner", "interlock") and e.value.column > 0
    with pytest.raises(RuleError, match="undeclared reference to 'presure'"):
        SafetyLayer(make_config(interlock="presure > 3.0", interlock_device="boiler"))


def test_interlock_reading_age_and_previous() -> None:
    clock = Clock()
    layer = SafetyLayer(
        make_config(interlock="age.pressure > 30.0", interlock_device="boiler"), clock=clock
    )
    assert layer.check(cmd("burner_on"), values(clock, pressure=1.0, age=10)).allowed
    d = layer.check(cmd("burner_on"), values(clock, pressure=1.0, age=31))
    assert d.blocked and d.reason == "interlock: age.pressure > 30.0 holds"
    # previous/delta are not known to the safety layer: unknown, so holding
    layer = SafetyLayer(
        make_config(interlock="delta.pressure > 0.5", interlock_device="boiler"), clock=clock
    )
    d = layer.check(cmd("burner_on"), values(clock, pressure=1.0))
    assert d.blocked and "is unknown (delta is not known" in d.reason


def test_interlock_without_a_device_reads_any_device() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(interlock="pressure > 3.0"), clock=clock)
    assert layer.check(cmd("burner_on"), values(clock, pressure=1.0)).allowed
    d = layer.check(cmd("burner_on"), {})
    assert d.blocked and "(pressure has no value yet)" in d.reason


def test_interlock_over_several_registers() -> None:
    clock = Clock()
    layer = SafetyLayer(
        make_config(interlock="!flame && temperature > 90.0", interlock_device="boiler"),
        clock=clock,
    )
    assert layer.check(cmd("burner_on"), values(clock, flame=False, temperature=95.0)).blocked
    assert layer.check(cmd("burner_on"), values(clock, flame=True, temperature=95.0)).allowed
    # one of two inputs missing: unknown, blocked
    assert layer.check(cmd("burner_on"), values(clock, flame=True)).blocked


# --- stale inputs ---------------------------------------------------------------------------------


def test_stale_actuators_lists_every_bad_input() -> None:
    clock = Clock()
    layer = SafetyLayer(
        make_config(inputs=("boiler.temperature", "boiler.pressure"), stale_after=30), clock=clock
    )
    vals = values(clock, temperature=50.0, pressure=1.0)
    assert layer.stale_actuators(vals) == []
    old = values(clock, age=31, temperature=50.0)
    old["boiler"]["pressure"] = vals["boiler"]["pressure"]
    assert layer.stale_actuators(old) == [
        ("burner", "boiler.temperature", "is 31 s old (stale_after is 30 s)")
    ]
    bad = values(clock, quality="bad", temperature=50.0)
    assert layer.stale_actuators(bad) == [
        ("burner", "boiler.temperature", "is bad"),
        ("burner", "boiler.pressure", "has no value yet"),
    ]
    # ``now`` may be given: the same values seen later
    assert layer.stale_actuators(vals, clock() + 31) == [
        ("burner", "boiler.temperature", "is 31 s old (stale_after is 30 s)"),
        ("burner", "boiler.pressure", "is 31 s old (stale_after is 30 s)"),
    ]


def test_stale_inputs_block_leaving_the_safe_state_only() -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(inputs=("boiler.temperature",)), clock=clock)
    bad = values(clock, quality="bad", temperature=50.0)
    d = layer.check(cmd("burner_on"), bad)
    assert d.blocked and d.kind == "stale"
    assert d.reason == "stale input: boiler.temperature is bad"
    assert layer.check(cmd("burner_off"), bad).allowed
    assert layer.check(cmd("burner_on"), values(clock, temperature=50.0)).allowed


def test_bad_input_spec_is_refused() -> None:
    with pytest.raises(ValueError, match=r"device\.measurement"):
        SafetyLayer(make_config(inputs=("temperature",)))


# --- safe states ----------------------------------------------------------------------------------


def test_safe_commands_for_every_actuator_with_a_safe_state() -> None:
    clock = Clock()
    config = make_config(min_on=300, max_switches=1)
    config = Config(
        sources=config.sources,
        actions=config.actions,
        actuators={
            "burner": config.actuators["burner"],
            "pump": ActuatorConfig(on="pump_on", off="pump_off", safe="on"),
            "valve": ActuatorConfig(on="horn", off="pump_off", safe="none"),
        },
    )
    layer = SafetyLayer(config, clock=clock)
    assert run(layer, "burner_on")
    clock.advance(1)
    commands = layer.safe_commands("shutdown")
    assert [(c.action, c.rule, c.params) for c in commands] == [
        ("burner_off", SAFETY_RULE, {"safety": "shutdown"}),
        ("pump_on", SAFETY_RULE, {"safety": "shutdown"}),
    ]
    assert all(c.ts == clock() for c in commands)
    # min_on (300 s) and the rate limit (1 switch, used) do not hold back the safe state
    d = layer.check(commands[0], NONE)
    assert d.allowed and d.reason == "safe state (shutdown)"
    layer.record(commands[0], ok(commands[0]))
    assert layer.state("burner") == "off"
    # ... but a rule asking for the same action is still subject to them
    assert layer.check(cmd("burner_on"), NONE).blocked
    assert [c.action for c in layer.safe_commands("watchdog", ["pump"])] == ["pump_on"]


def test_enforce_drives_to_safe_state_once_per_trip() -> None:
    clock = Clock()
    layer = SafetyLayer(
        make_config(inputs=("boiler.temperature",), stale_after=10, min_on=600), clock=clock
    )
    fresh = values(clock, temperature=50.0)
    assert layer.enforce(fresh) == []
    assert run(layer, "burner_on", fresh)
    clock.advance(11)  # the input is now stale
    commands = layer.enforce(fresh)
    assert [c.action for c in commands] == ["burner_off"]
    assert commands[0].params["safety"] == "stale input: boiler.temperature is 11 s old " \
        "(stale_after is 10 s)"
    assert layer.enforce(fresh) == []  # same trip: not again at once
    d = layer.check(commands[0], fresh)
    assert d.allowed  # despite min_on
    layer.record(commands[0], ok(commands[0], good=False))  # the write failed
    clock.advance(30)
    assert [c.action for c in layer.enforce(fresh)] == ["burner_off"]  # retried
    layer.record(commands[0], ok(commands[0]))
    clock.advance(30)
    assert layer.enforce(fresh) == []  # confirmed safe: no more retries
    # recovery re-arms: a later trip sends again
    assert layer.enforce(values(clock, temperature=50.0)) == []
    clock.advance(11)
    assert [c.action for c in layer.enforce(fresh)] == ["burner_off"]


def test_enforce_interlock_drives_to_safe() -> None:
    clock = Clock()
    layer = interlocked(clock)
    assert layer.enforce(values(clock, pressure=1.0)) == []
    assert run(layer, "burner_on", values(clock, pressure=1.0))
    commands = layer.enforce(values(clock, pressure=3.5))
    assert [c.action for c in commands] == ["burner_off"]
    assert commands[0].params["safety"] == "interlock: pressure > 3.0 holds"
    assert layer.interlocked_actuators(values(clock, pressure=3.5)) == [
        ("burner", "pressure > 3.0 holds")
    ]


# --- persistence, stats, logging ------------------------------------------------------------------


def test_snapshot_restore_keeps_timers_across_restart() -> None:
    clock = Clock()
    cfg = make_config(min_on=60, max_switches=3, window=3600)
    layer = SafetyLayer(cfg, clock=clock)
    assert run(layer, "burner_on")
    clock.advance(100)
    assert run(layer, "burner_off")
    clock.advance(100)
    assert run(layer, "burner_on")
    snap = json.loads(json.dumps(layer.snapshot()))  # survives JSON
    clock.advance(10)  # "restart" 10 s later
    again = SafetyLayer(cfg, clock=clock)
    again.restore(snap)
    assert again.state("burner") == "on"
    d = again.check(cmd("burner_off"), NONE)
    assert d.blocked and d.reason == "min_on: burner switched on 10 s ago, min_on is 60 s"
    clock.advance(50)
    d = again.check(cmd("burner_off"), NONE)
    assert d.blocked and d.kind == "rate_limit"
    # unknown actuators and junk are ignored
    again.restore({"gone": {"state": "on"}, "burner": {"state": "sideways"}})
    assert again.state("burner") == "on"


def test_restore_drops_switches_older_than_the_window() -> None:
    clock = Clock()
    cfg = make_config(max_switches=1, window=60)
    layer = SafetyLayer(cfg, clock=clock)
    layer.restore({"burner": {"state": "off", "last_switch": clock() - 61,
                              "history": [clock() - 61]}})
    assert layer.snapshot()["burner"]["history"] == []
    assert layer.check(cmd("burner_on"), NONE).allowed


def test_blocked_commands_are_logged_without_flooding(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    layer = SafetyLayer(make_config(min_on=3600), clock=clock)
    assert run(layer, "burner_on")
    caplog.set_level(logging.DEBUG, logger="flux_edge.safety")
    for _ in range(20):
        clock.advance(1)
        assert layer.check(cmd("burner_off", rule="cool"), NONE).blocked
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "blocked burner_off (rule cool) for actuator burner: min_on" in warnings[0].getMessage()
    clock.advance(60)
    layer.check(cmd("burner_off"), NONE)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert layer.stats["burner"].blocked == 21
