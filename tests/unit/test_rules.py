"""flux_edge.rules.engine: variables per rule, config checks, and the engine's semantics."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.config import Config, RuleConfig, SourceSpec
from flux_edge.errors import RuleError
from flux_edge.model import Measurement, Quality, Value
from flux_edge.rules import RuleEngine, check_rules, rule_variables
from flux_edge.sources.modbus.spec import (
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)


def source(device: str = "", *registers: RegisterConfig) -> ModbusTcpSource:
    return ModbusTcpSource(host="127.0.0.1", device=device, registers=registers)


def reg(name: str, address: int = 0, **kw: Any) -> RegisterConfig:
    return RegisterConfig(name=name, address=address, **kw)


BOILER = source(
    "",  # device defaults to the source name: "boiler"
    reg("temperature", 0, type="int16", scale=0.1),
    reg("pressure", 1, type="float32"),
    reg("pump", 10, function="coil"),
    reg("alarm", 11, function="discrete"),
    reg("flag", 12, type="bool"),
)
TANK = source("tank1", reg("level", 0), reg("temperature", 1, function="input"))


def config(rules: dict[str, RuleConfig], **sources: SourceSpec) -> Config:
    return Config(sources=sources or {"boiler": BOILER, "tank": TANK}, rules=rules)


def rule(when: str, *actions: str, **kw: Any) -> RuleConfig:
    return RuleConfig(when=when, actions=actions or ("act",), **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def meas(name: str, value: Value, device: str = "boiler", quality: Quality = "good") -> Measurement:
    return Measurement(device=device, name=name, value=value, ts=1.0, quality=quality)


def fired(engine: RuleEngine, *ms: Measurement) -> list[list[tuple[str, str]]]:
    """For each measurement in turn, the (rule, action) pairs it produced."""
    return [[(c.rule, c.action) for c in engine.on_measurement(m)] for m in ms]


# --- rule_variables -----------------------------------------------------------------------------


def test_rule_variables_for_one_device() -> None:
    cfg = config({"r": rule("temperature > 80", device="boiler")})
    assert rule_variables(cfg, "r") == {
        "temperature": "double",
        "pressure": "double",
        "pump": "bool",
        "alarm": "bool",
        "flag": "bool",
        "device": "string",
        "name": "string",
    }


def test_rule_variables_for_any_device_and_inputs() -> None:
    cfg = config({"r": rule("true", device="", inputs={"setpoint": "double", "label": "string"})})
    got = rule_variables(cfg, "r")
    assert got["level"] == "double"  # from tank1
    assert got["pump"] == "bool"  # from boiler
    assert got["setpoint"] == "double"
    assert got["label"] == "string"
    cfg = config({"r": rule("true", device="tank1")})
    assert "pump" not in rule_variables(cfg, "r")


def test_rule_variables_cover_every_device_of_tcp_and_rtu_buses() -> None:
    meter = ModbusDeviceConfig(
        name="meter1",
        unit_id=1,
        registers=(
            reg("voltage", 0, function="input", type="float32"),
            reg("serial_no", 0xFC00, type="string", count=4),
            reg("relay", 0, function="coil"),
            reg("energy", 0x48, function="input", type="uint64"),
        ),
    )
    sensor = ModbusDeviceConfig(name="room", unit_id=2, registers=(reg("humidity", 2),))
    bus = ModbusRtuSource(port="/dev/ttyUSB0", devices=(meter, sensor))
    gateway = ModbusTcpSource(
        host="10.0.0.5",
        devices=(ModbusDeviceConfig(name="pv", unit_id=3, registers=(reg("pv_power", 0),)),),
    )
    cfg = config(
        {"m": rule("voltage > 250.0", device="meter1"), "any": rule("true")},
        bus=bus,
        gateway=gateway,
        boiler=BOILER,
    )
    assert rule_variables(cfg, "m") == {
        "voltage": "double",
        "serial_no": "string",
        "relay": "bool",
        "energy": "double",
        "device": "string",
        "name": "string",
    }
    everything = rule_variables(cfg, "any")
    assert {"voltage", "humidity", "pv_power", "temperature", "pump"} <= everything.keys()
    room = rule_variables(config({"r": rule("true", device="room")}, bus=bus), "r")
    assert room["humidity"] == "double" and "voltage" not in room
    assert "voltage" not in rule_variables(config({"r": rule("true", device="pv")}, g=gateway), "r")
    errors = check_rules(config({"s": rule('serial_no == "SDM"', device="meter1")}, bus=bus))
    assert errors == []
    errors = check_rules(config({"s": rule("serial_no > 3", device="meter1")}, bus=bus))
    assert len(errors) == 1 and errors[0].rule == "s"


def test_conflicting_types_across_devices() -> None:
    cfg = config(
        {"r": rule("x", device="")},
        a=source("", reg("x", 0)),
        b=source("", reg("x", 0, function="coil")),
    )
    with pytest.raises(RuleError) as info:
        rule_variables(cfg, "r")
    assert info.value.rule == "r"
    assert (
        "'x' is double (register of device 'a', source 'a') "
        "but bool (register of device 'b', source 'b')"
    ) in str(info.value)
    # restricted to one device the conflict is gone
    cfg = config({"r": rule("x", device="b")}, a=source("", reg("x", 0)), b=source("", reg("x", 0)))
    assert rule_variables(cfg, "r")["x"] == "double"


def test_register_named_like_a_builtin_conflicts() -> None:
    cfg = config({"r": rule("name > 1.0")}, a=source("", reg("name", 0)))
    with pytest.raises(RuleError, match="'name' is double"):
        rule_variables(cfg, "r")


def test_input_conflicting_with_register() -> None:
    cfg = config({"r": rule("pump", device="boiler", inputs={"pump": "int"})})
    with pytest.raises(RuleError, match=r"'pump' is bool .* but int"):
        rule_variables(cfg, "r")


def test_unknown_rule() -> None:
    with pytest.raises(RuleError, match="no such rule"):
        rule_variables(config({}), "nope")


# --- check_rules --------------------------------------------------------------------------------


def test_check_rules_collects_every_error() -> None:
    cfg = config(
        {
            "ok": rule("temperature > 80"),
            "type": rule('temperature > "80"'),
            "unknown": rule("pump && presure > 2.0", device="boiler"),
            "not_bool": rule("level + 1.0", device="tank1"),
            "constant": rule('device == "boiler"'),
        }
    )
    errors = check_rules(cfg)
    by_rule = {e.rule: e for e in errors}
    assert set(by_rule) == {"type", "unknown", "not_bool", "constant"}
    assert by_rule["type"].column == 13
    assert "undeclared reference to 'presure'" in str(by_rule["unknown"])
    assert by_rule["unknown"].column == 9
    assert "must be a bool expression, got double" in str(by_rule["not_bool"])
    assert "references no measurement" in str(by_rule["constant"])


def test_check_rules_clean_config() -> None:
    assert check_rules(config({"r": rule("temperature > 80 && !pump", device="boiler")})) == []


def test_engine_raises_the_first_error() -> None:
    with pytest.raises(RuleError) as info:
        RuleEngine(config({"good": rule("pump"), "bad": rule("pump > 1")}))
    assert info.value.rule == "bad"


# --- engine: firing semantics -------------------------------------------------------------------


def test_edge_fires_once_on_rising_edge() -> None:
    clock = Clock()
    engine = RuleEngine(
        config({"hot": rule("temperature > 80", "fan_on", "alarm_on", device="boiler")}),
        clock=clock,
    )
    m = meas("temperature", 81.0)
    commands = engine.on_measurement(m)
    assert [(c.rule, c.action) for c in commands] == [("hot", "fan_on"), ("hot", "alarm_on")]
    assert all(c.ts == 1001.0 and c.cause is m for c in commands)
    assert fired(
        engine,
        meas("temperature", 82.0),  # true -> true: nothing
        meas("temperature", 80.0),  # -> false
        meas("temperature", 79.0),
        meas("temperature", 90),  # false -> true, an int value for a double variable
        meas("temperature", 91.0),
    ) == [[], [], [], [("hot", "fan_on"), ("hot", "alarm_on")], []]
    stats = engine.stats["hot"]
    assert (stats.evaluations, stats.firings, stats.errors) == (6, 2, 0)
    assert stats.last_fired_ts == 1005.0  # the clock is read once per measurement evaluated


def test_level_fires_each_time_true() -> None:
    engine = RuleEngine(config({"hot": rule("temperature > 80", mode="level")}), clock=Clock())
    assert fired(
        engine,
        meas("temperature", 81.0),
        meas("temperature", 82.0),
        meas("temperature", 70.0),
        meas("temperature", 83.0),
    ) == [[("hot", "act")], [("hot", "act")], [], [("hot", "act")]]
    assert engine.stats["hot"].firings == 3


@pytest.mark.parametrize(
    ("value", "fires"), [(79.9, False), (80.0, False), (80.1, True), (80, False), (81, True)]
)
def test_int_literal_threshold_against_double_values(value: float, fires: bool) -> None:
    engine = RuleEngine(config({"hot": rule("temperature > 80")}))
    assert bool(engine.on_measurement(meas("temperature", value))) is fires


def test_bool_and_string_variables() -> None:
    cfg = config(
        {
            "r": rule('pump && !alarm && name == "pump" && device == "boiler"', device="boiler"),
            "s": rule('state == "fault"', device="boiler", inputs={"state": "string"}),
        }
    )
    engine = RuleEngine(cfg)
    assert fired(
        engine,
        meas("alarm", False),
        meas("pump", True),
        meas("state", "ok"),
        meas("state", "fault"),
    ) == [[], [("r", "act")], [], [("s", "act")]]


def test_rules_without_device_run_per_device() -> None:
    cfg = config({"hot": rule("temperature > 80")})
    engine = RuleEngine(cfg)
    out = fired(
        engine,
        meas("temperature", 85.0, "boiler"),
        meas("temperature", 85.0, "tank1"),  # tank1's own edge: fires too
        meas("temperature", 86.0, "tank1"),
        meas("temperature", 70.0, "boiler"),
        meas("temperature", 86.0, "tank1"),  # boiler going false does not touch tank1
    )
    assert out == [[("hot", "act")], [("hot", "act")], [], [], []]


def test_values_are_not_shared_between_devices() -> None:
    cfg = config({"r": rule("temperature > 80 && level > 1.0")})
    engine = RuleEngine(cfg)
    assert fired(
        engine,
        meas("level", 5.0, "tank1"),
        meas("temperature", 90.0, "boiler"),  # boiler has no level
        meas("temperature", 90.0, "tank1"),
    ) == [[], [], [("r", "act")]]


def test_commands_follow_config_order() -> None:
    cfg = config(
        {
            "a": rule("temperature > 1.0", "a1"),
            "b": rule("temperature > 2.0", "b1", device="boiler"),
            "c": rule("temperature > 3.0", "c1"),
        }
    )
    engine = RuleEngine(cfg)
    assert fired(engine, meas("temperature", 5.0)) == [[("a", "a1"), ("b", "b1"), ("c", "c1")]]


# --- engine: quality gating ---------------------------------------------------------------------


def test_rule_waits_for_every_input() -> None:
    engine = RuleEngine(config({"r": rule("temperature > 80 && !pump", device="boiler")}))
    assert fired(engine, meas("temperature", 90.0)) == [[]]
    assert engine.stats["r"].evaluations == 0
    assert engine.stats["r"].skipped == 1
    assert fired(engine, meas("pump", False)) == [[("r", "act")]]


@pytest.mark.parametrize("quality", ["bad", "stale"])
def test_non_good_input_makes_the_condition_unknown(quality: Quality) -> None:
    engine = RuleEngine(
        config(
            {
                "edge": rule("temperature > 80", "e"),
                "level": rule("temperature > 80", "l", mode="level"),
            }
        )
    )
    assert fired(engine, meas("temperature", 90.0)) == [[("edge", "e"), ("level", "l")]]
    # a bad value is not used, and the old good value is forgotten
    assert fired(engine, meas("temperature", 95.0, quality=quality)) == [[]]
    assert engine.stats["level"].skipped == 1
    # unknown holds the edge state: coming back still true does not fire the edge rule again
    assert fired(engine, meas("temperature", 91.0)) == [[("level", "l")]]
    # a real false -> true still does
    assert fired(engine, meas("temperature", 50.0), meas("temperature", 99.0)) == [
        [],
        [("edge", "e"), ("level", "l")],
    ]


def test_other_input_going_bad_blocks_evaluation() -> None:
    engine = RuleEngine(config({"r": rule("temperature > 80 && !pump", mode="level")}))
    assert fired(engine, meas("pump", False), meas("temperature", 90.0)) == [[], [("r", "act")]]
    assert fired(engine, meas("pump", True, quality="bad"), meas("temperature", 91.0)) == [[], []]


def test_bad_first_measurement_of_a_device() -> None:
    engine = RuleEngine(config({"r": rule("temperature > 80")}))
    assert fired(engine, meas("temperature", 90.0, "newdev", quality="bad")) == [[]]
    assert engine.stats["r"].skipped == 1
    assert engine.stats["r"].evaluations == 0


# --- engine: index ------------------------------------------------------------------------------


def test_index_only_evaluates_matching_rules() -> None:
    cfg = config(
        {
            "boiler_hot": rule("temperature > 80", device="boiler"),
            "tank_low": rule("level < 1.0", device="tank1"),
            "any_hot": rule("temperature > 80"),
        }
    )
    engine = RuleEngine(cfg)
    engine.on_measurement(meas("temperature", 10.0, "tank1"))  # other device
    engine.on_measurement(meas("pressure", 1.0, "boiler"))  # a name no rule reads
    engine.on_measurement(meas("level", 5.0, "boiler"))  # tank_low watches tank1 only
    engine.on_measurement(meas("unrelated", 5.0, "elsewhere"))
    assert engine.stats["boiler_hot"].evaluations == 0
    assert engine.stats["tank_low"].evaluations == 0
    assert engine.stats["any_hot"].evaluations == 1  # the tank1 temperature
    engine.on_measurement(meas("temperature", 10.0, "boiler"))
    engine.on_measurement(meas("level", 5.0, "tank1"))
    assert engine.stats["boiler_hot"].evaluations == 1
    assert engine.stats["tank_low"].evaluations == 1
    assert engine.stats["any_hot"].evaluations == 2


def test_names_no_rule_reads_are_not_stored() -> None:
    engine = RuleEngine(config({"r": rule("temperature > 80")}))
    for i in range(1000):
        engine.on_measurement(meas(f"junk{i}", 1.0, f"dev{i}"))
    assert engine._values == {}


def test_comprehension_variable_does_not_trigger() -> None:
    # "level" is a register of tank1, but here it is only the macro's own variable
    cfg = config({"r": rule("[1.0, 2.0].exists(level, level > temperature)", device="tank1")})
    engine = RuleEngine(cfg)
    engine.on_measurement(meas("level", 5.0, "tank1"))
    assert engine.stats["r"].evaluations == 0
    assert fired(engine, meas("temperature", 1.5, "tank1")) == [[("r", "act")]]


# --- engine: evaluation errors ------------------------------------------------------------------


def test_evaluation_errors_are_counted_and_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config({"div": rule("100.0 / temperature > 2.0 && pump", mode="level")})
    engine = RuleEngine(cfg)
    caplog.set_level(logging.DEBUG, logger="flux_edge.rules")
    engine.on_measurement(meas("pump", True))
    out = fired(
        engine,
        meas("temperature", "hot"),  # ill-typed value from a plugin
        meas("temperature", "hotter"),
        meas("temperature", 10.0),
        meas("temperature", True),  # bool for a double: 1.0
        meas("temperature", "again"),
    )
    assert out == [[], [], [("div", "act")], [("div", "act")], []]
    stats = engine.stats["div"]
    assert (stats.evaluations, stats.errors, stats.firings) == (5, 3, 2)
    assert "'temperature' is str 'again', expected double" in stats.last_error
    warnings = [
        r for r in caplog.records if r.name == "flux_edge.rules" and r.levelno >= logging.WARNING
    ]
    # one warning when the rule starts failing, quiet while it keeps failing, again after recovery
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING and "rule 'div'" in r.getMessage() for r in warnings)


def test_evaluation_error_holds_edge_state() -> None:
    cfg = config({"r": rule("temperature > 80", device="boiler")})
    engine = RuleEngine(cfg)
    assert fired(engine, meas("temperature", 90.0)) == [[("r", "act")]]
    assert fired(engine, meas("temperature", "x"), meas("temperature", 91.0)) == [[], []]


# --- engine v2: time and state (an injected clock, no sleeps) ----------------------------------


class Now:
    """A clock that only moves when the test says so."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(
    clock: Now,
    t: float,
    name: str,
    value: Value,
    quality: Quality = "good",
    *,
    device: str = "boiler",
) -> Measurement:
    clock.t = t
    return Measurement(device=device, name=name, value=value, ts=t, quality=quality)


def acts(commands: list[Any]) -> list[str]:
    return [c.action for c in commands]


def timed(**kw: Any) -> tuple[RuleEngine, Now]:
    clock = Now()
    rules = kw.pop("rules", None) or {"hot": rule("temperature > 80.0", "fan_on", **kw)}
    return RuleEngine(config(rules), clock=clock), clock


def test_for_fires_exactly_at_start_plus_for_via_tick() -> None:
    engine, clock = timed(for_=30.0, device="boiler")
    assert engine.next_deadline() is None
    assert acts(engine.on_measurement(at(clock, 0.0, "temperature", 90.0))) == []
    assert engine.next_deadline() == 30.0
    assert acts(engine.on_measurement(at(clock, 10.0, "temperature", 95.0))) == []
    assert engine.tick(29.999) == []
    commands = engine.tick(30.0)
    assert acts(commands) == ["fan_on"]
    assert commands[0].ts == 30.0
    assert commands[0].params == {"device": "boiler", "rule_state": "on"}
    assert commands[0].cause is not None and commands[0].cause.ts == 0.0  # what started it
    assert engine.next_deadline() is None
    assert engine.tick(100.0) == []  # fired once
    assert acts(engine.on_measurement(at(clock, 101.0, "temperature", 99.0))) == []  # edge: on


def test_for_fires_on_a_measurement_after_the_deadline_without_tick() -> None:
    engine, clock = timed(for_=30.0, device="boiler")
    engine.on_measurement(at(clock, 0.0, "temperature", 90.0))
    # a measurement no rule reads still fires what is due
    assert acts(engine.on_measurement(at(clock, 31.0, "pressure", 1.0))) == ["fan_on"]


@pytest.mark.parametrize(
    ("value", "quality"), [(70.0, "good"), (95.0, "stale"), (95.0, "bad"), ("x", "good")]
)
def test_for_is_cancelled_by_a_false_unknown_or_failing_reading(
    value: Value, quality: Quality
) -> None:
    engine, clock = timed(for_=30.0, device="boiler")
    engine.on_measurement(at(clock, 0.0, "temperature", 90.0))
    assert engine.on_measurement(at(clock, 20.0, "temperature", value, quality)) == []
    assert engine.next_deadline() is None
    assert engine.tick(30.0) == []
    # a new period starts at the next true reading
    engine.on_measurement(at(clock, 40.0, "temperature", 90.0))
    assert engine.next_deadline() == 70.0
    assert acts(engine.tick(70.0)) == ["fan_on"]


def test_for_checks_max_age_at_the_deadline() -> None:
    engine, clock = timed(for_=30.0, max_age=20.0, device="boiler")
    engine.on_measurement(at(clock, 0.0, "temperature", 90.0))
    assert engine.tick(30.0) == []  # the reading that started it is 30 s old: unknown
    engine.on_measurement(at(clock, 40.0, "temperature", 90.0))
    engine.on_measurement(at(clock, 55.0, "temperature", 91.0))
    assert acts(engine.tick(70.0)) == ["fan_on"]  # the latest reading is 15 s old


def test_level_rule_with_for_fires_on_each_true_reading_once_held() -> None:
    engine, clock = timed(for_=10.0, mode="level", device="boiler")
    assert acts(engine.on_measurement(at(clock, 0.0, "temperature", 90.0))) == []
    assert acts(engine.on_measurement(at(clock, 5.0, "temperature", 90.0))) == []
    assert acts(engine.tick(10.0)) == ["fan_on"]
    assert acts(engine.on_measurement(at(clock, 11.0, "temperature", 90.0))) == ["fan_on"]


def test_hysteresis_latches_until_off_when() -> None:
    engine, clock = timed(off_when="temperature < 70.0", off_actions=("fan_off",), device="boiler")
    seq = [(0, 85.0), (1, 75.0), (2, 90.0), (3, 69.0), (4, 75.0), (5, 81.0)]
    out = [acts(engine.on_measurement(at(clock, t, "temperature", v))) for t, v in seq]
    assert out == [["fan_on"], [], [], ["fan_off"], [], ["fan_on"]]


def test_off_when_reading_another_input_triggers_the_rule() -> None:
    engine, clock = timed(
        rules={
            "r": rule(
                "temperature > 80.0", "on", off_when="pump", off_actions=("off",), device="boiler"
            )
        }
    )
    assert acts(engine.on_measurement(at(clock, 0, "temperature", 85.0))) == ["on"]
    assert acts(engine.on_measurement(at(clock, 1, "pump", False))) == []
    commands = engine.on_measurement(at(clock, 2, "pump", True))
    assert acts(commands) == ["off"]
    assert commands[0].params == {"device": "boiler", "rule_state": "off"}


def test_edge_without_off_when_runs_off_actions_when_false() -> None:
    engine, clock = timed(off_actions=("fan_off",), device="boiler")
    seq: list[tuple[float, float, Quality]] = [
        (0, 85.0, "good"),
        (1, 86.0, "good"),
        (2, 95.0, "bad"),  # unknown: neither an edge nor a fall
        (3, 90.0, "good"),
        (4, 50.0, "good"),
        (5, 40.0, "good"),
    ]
    out = [acts(engine.on_measurement(at(clock, t, "temperature", v, q))) for t, v, q in seq]
    assert out == [["fan_on"], [], [], [], ["fan_off"], []]


def test_level_vs_edge() -> None:
    engine, clock = timed(
        rules={
            "e": rule("temperature > 80.0", "e", device="boiler"),
            "l": rule("temperature > 80.0", "l", mode="level", device="boiler"),
        }
    )
    out = [
        acts(engine.on_measurement(at(clock, t, "temperature", v)))
        for t, v in [(0, 90.0), (1, 91.0), (2, 10.0), (3, 92.0)]
    ]
    assert out == [["e", "l"], ["l"], [], ["e", "l"]]


def test_cooldown_edge_defers_to_the_cooldown_end() -> None:
    engine, clock = timed(cooldown=60.0, device="boiler")
    assert acts(engine.on_measurement(at(clock, 0, "temperature", 90.0))) == ["fan_on"]
    assert acts(engine.on_measurement(at(clock, 5, "temperature", 50.0))) == []
    assert acts(engine.on_measurement(at(clock, 10, "temperature", 90.0))) == []
    assert engine.stats["hot"].suppressed == 1
    assert engine.next_deadline() == 60.0
    assert acts(engine.tick(60.0)) == ["fan_on"]
    # within the next cooldown, going false cancels the deferred firing
    engine.on_measurement(at(clock, 70, "temperature", 50.0))
    engine.on_measurement(at(clock, 80, "temperature", 90.0))
    assert engine.next_deadline() == 120.0
    engine.on_measurement(at(clock, 90, "temperature", 50.0))
    assert engine.next_deadline() is None
    assert engine.tick(200.0) == []


def test_cooldown_level_skips() -> None:
    engine, clock = timed(cooldown=60.0, mode="level", device="boiler")
    out = [acts(engine.on_measurement(at(clock, t, "temperature", 90.0))) for t in (0, 30, 59, 60)]
    assert out == [["fan_on"], [], [], ["fan_on"]]
    assert engine.next_deadline() is None


def test_cooldown_is_per_device() -> None:
    engine, clock = timed(rules={"any": rule("temperature > 80.0", "a", cooldown=60.0)})
    assert acts(engine.on_measurement(at(clock, 0, "temperature", 90.0))) == ["a"]
    assert acts(engine.on_measurement(at(clock, 1, "temperature", 90.0, device="tank1"))) == ["a"]


def test_max_age_gates_old_inputs() -> None:
    engine, clock = timed(
        rules={"r": rule("temperature > 80.0 && !pump", "a", max_age=60.0, device="boiler")}
    )
    engine.on_measurement(at(clock, 0, "pump", False))
    # the pump value is 100 s old when the temperature comes: unknown, not fired
    assert engine.on_measurement(at(clock, 100, "temperature", 90.0)) == []
    assert acts(engine.on_measurement(at(clock, 101, "pump", False))) == ["a"]


def test_max_age_by_measurement_timestamp() -> None:
    engine, clock = timed(max_age=10.0, device="boiler", mode="level")
    clock.t = 100.0
    old = Measurement(device="boiler", name="temperature", value=90.0, ts=50.0)
    assert engine.on_measurement(old) == []
    fresh = Measurement(device="boiler", name="temperature", value=90.0, ts=95.0)
    assert acts(engine.on_measurement(fresh)) == ["fan_on"]


@pytest.mark.parametrize("quality", ["bad", "stale"])
def test_allow_stale_uses_values_of_any_quality(quality: Quality) -> None:
    engine, clock = timed(
        rules={
            "strict": rule("temperature > 80.0", "s", mode="level", device="boiler"),
            "lenient": rule(
                "temperature > 80.0", "l", mode="level", allow_stale=True, device="boiler"
            ),
        }
    )
    assert acts(engine.on_measurement(at(clock, 0, "temperature", 90.0, quality))) == ["l"]


def test_previous_delta_and_age() -> None:
    engine, clock = timed(
        rules={
            "jump": rule("delta.temperature > 5.0", "jump", mode="level", device="boiler"),
            "rising": rule(
                "previous.temperature < temperature", "rising", mode="level", device="boiler"
            ),
            "fresh": rule(
                "temperature > 80.0 && age.pressure < 30.0",
                "fresh",
                mode="level",
                device="boiler",
            ),
        }
    )
    # no previous value yet: jump and rising are not evaluated (and log nothing)
    assert acts(engine.on_measurement(at(clock, 0, "temperature", 50.0))) == []
    assert engine.stats["jump"].errors == 0
    assert acts(engine.on_measurement(at(clock, 1, "temperature", 53.0))) == ["rising"]
    assert acts(engine.on_measurement(at(clock, 2, "temperature", 60.0))) == ["jump", "rising"]
    engine.on_measurement(at(clock, 3, "pressure", 1.0))
    assert acts(engine.on_measurement(at(clock, 10, "temperature", 85.0))) == [
        "jump",
        "rising",
        "fresh",
    ]
    # pressure is now 40 s old
    assert acts(engine.on_measurement(at(clock, 43, "temperature", 85.0))) == []
    # a pressure reading triggers "fresh" too (it reads age.pressure)
    assert acts(engine.on_measurement(at(clock, 44, "pressure", 1.0))) == ["fresh"]


def test_previous_skips_a_bad_value() -> None:
    engine, clock = timed(
        rules={"d": rule("delta.temperature < -5.0", "drop", mode="level", device="boiler")}
    )
    engine.on_measurement(at(clock, 0, "temperature", 50.0))
    engine.on_measurement(at(clock, 1, "temperature", 0.0, "bad"))
    # previous is the last good value (50.0), not the bad one
    assert acts(engine.on_measurement(at(clock, 2, "temperature", 40.0))) == ["drop"]


def test_map_keys_must_name_measurements() -> None:
    errors = check_rules(config({"r": rule("delta.temprature > 5.0", device="boiler")}))
    assert len(errors) == 1
    assert "no measurement named 'temprature'" in str(errors[0])
    assert errors[0].column == 1


def test_register_named_like_a_map_keeps_its_type() -> None:
    cfg = config({"r": rule("age > 3.0")}, s=source("s", reg("age", 0)))
    engine = RuleEngine(cfg)
    assert acts(engine.on_measurement(meas("age", 5.0, "s"))) == ["act"]


def test_severity_sets_the_fired_log_level(caplog: pytest.LogCaptureFixture) -> None:
    engine, clock = timed(
        rules={
            "crit": rule("temperature > 90.0", "a", severity="error", device="boiler"),
            "high": rule("temperature > 80.0", "b", severity="warning", device="boiler"),
            "norm": rule("temperature > 0.0", "c", severity="debug", device="boiler"),
        }
    )
    caplog.set_level(logging.DEBUG, logger="flux_edge.rules")
    engine.on_measurement(at(clock, 0, "temperature", 95.0))
    fired_lines = {
        r.getMessage().split("'")[1]: r.levelno for r in caplog.records if "fired" in r.getMessage()
    }
    assert fired_lines == {"crit": logging.ERROR, "high": logging.WARNING, "norm": logging.DEBUG}


@pytest.mark.parametrize(
    "expr",
    [
        "temperature > 1.0 || " * 300 + "pump",
        "(" * 40 + "pump" + ")" * 40,
        "[" + ",".join(["1"] * 50) + "].all(x, [1,2,3].all(y, [1,2,3].exists(z, z > x)))",
        'temperature > "80"',
    ],
)
def test_hostile_off_when_is_rejected_with_its_key(expr: str) -> None:
    from flux_edge.rules.engine import ConditionError

    cfg = config({"r": rule("temperature > 80.0", off_when=expr, device="boiler")})
    errors = check_rules(cfg)
    if expr.startswith("["):  # a comprehension without a measurement
        assert errors and "references no measurement" in str(errors[0])
    else:
        assert errors
    assert all(
        isinstance(e, ConditionError) and e.key == ("rules", "r", "off_when") for e in errors
    )
    with pytest.raises(RuleError):
        RuleEngine(cfg)


# --- replay in simulated time ------------------------------------------------------------------


def test_replay_fires_timers_between_measurements_at_their_time() -> None:
    from flux_edge.rules.replay import SimClock, replay

    clock = SimClock()
    cfg = config(
        {
            "slow": rule("temperature > 80.0", "slow", for_=30.0, device="boiler"),
            "now": rule("temperature > 80.0", "now", device="boiler"),
        }
    )
    engine = RuleEngine(cfg, clock=clock)
    ms = [
        Measurement(device="boiler", name="temperature", value=v, ts=t)
        for t, v in [(0.0, 90.0), (10.0, 91.0), (100.0, 50.0), (110.0, 95.0)]
    ]
    out = [(t, acts(c)) for t, c in replay(engine, clock, ms, until=200.0)]
    assert out == [(0.0, ["now"]), (30.0, ["slow"]), (110.0, ["now"]), (140.0, ["slow"])]


def test_run_rule_test_runs_the_rule_alone() -> None:
    from flux_edge.config import RuleTest, RuleTestStep
    from flux_edge.rules.replay import check_rule_tests

    case = RuleTest(
        name="c",
        given=(RuleTestStep(name="temperature", value=90.0),),
        expect=("a",),
    )
    cfg = config(
        {
            "r": rule("temperature > 80.0", "a", device="boiler", tests=(case,)),
            "other": rule("temperature > 0.0", "b", device="boiler"),
        }
    )
    (result,) = check_rule_tests(cfg)
    assert result.ok and result.got == ("a",)
    assert str(result) == "rule 'r' test 'c': ok"


@settings(max_examples=200, deadline=None)
@given(
    for_=st.sampled_from([5.0, 30.0]),
    events=st.lists(
        st.tuples(st.integers(min_value=0, max_value=20), st.sampled_from(["T", "F", "bad"])),
        max_size=30,
    ),
)
def test_for_and_edge_match_a_reference_model(for_: float, events: list[tuple[int, str]]) -> None:
    """Firing times of an edge rule with ``for`` over random readings (true, false, bad) in
    simulated time, against a direct model of the documented semantics."""
    from flux_edge.rules.replay import SimClock, replay

    clock = SimClock()
    engine = RuleEngine(
        config({"r": rule("temperature > 80.0", "a", for_=for_, device="boiler")}), clock=clock
    )
    t = 0.0
    ms = []
    for gap, kind in events:
        t += gap
        value, quality = (90.0, "good") if kind == "T" else (50.0, "good")
        if kind == "bad":
            value, quality = 90.0, "bad"
        ms.append(
            Measurement(device="boiler", name="temperature", value=value, ts=t, quality=quality)
        )
    until = t + 100.0
    got = [when for when, commands in replay(engine, clock, ms, until=until) for _ in commands]

    expected: list[float] = []
    on, since = False, None
    for m in ms:
        if since is not None and not on and since + for_ <= m.ts:
            expected.append(since + for_)
            on = True
        if m.quality != "good":
            since = None
        elif m.value == 90.0:
            since = m.ts if since is None else since
        else:
            since, on = None, False
    if since is not None and not on and since + for_ <= until:
        expected.append(since + for_)
    assert got == expected
