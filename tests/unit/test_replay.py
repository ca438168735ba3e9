"""flux_edge.rules.replay: rules in simulated time, replay files, rule test cases, the report,
and the golden replay cases under tests/cases/replay."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.config import Config, RuleConfig, RuleTest, RuleTestStep
from flux_edge.errors import FluxError
from flux_edge.kinds import check_config
from flux_edge.model import Measurement, Quality, Value
from flux_edge.rules.replay import (
    CASE_EPOCH,
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_UNREADABLE,
    ReplayFileError,
    format_report,
    parse_replay,
    read_replay_file,
    replay,
    run_rule_tests,
)
from flux_edge.rules.replay_cli import cmd_rules_test
from flux_edge.sources.modbus.spec import ModbusTcpSource, RegisterConfig

CASES = Path(__file__).resolve().parent.parent / "cases" / "replay"
T0 = 1_795_867_200.0  # 2026-11-28T12:00:00Z

BOILER = ModbusTcpSource(
    host="127.0.0.1",
    registers=(
        RegisterConfig(name="temperature", address=0, type="int16", scale=0.1),
        RegisterConfig(name="pressure", address=1, type="float32"),
        RegisterConfig(name="count", address=2, type="int16"),
    ),
)


def config(**rules: RuleConfig) -> Config:
    return Config(sources={"boiler": BOILER}, rules=rules)


def rule(when: str, *actions: str, **kw: Any) -> RuleConfig:
    kw.setdefault("device", "boiler")
    return RuleConfig(when=when, actions=actions or ("act",), **kw)


def m(t: float, value: Value, name: str = "temperature", quality: Quality = "good") -> Measurement:
    return Measurement(device="boiler", name=name, value=value, ts=T0 + t, quality=quality)


def fired(cfg: Config, *ms: Measurement, until: float | None = None) -> list[tuple[float, str]]:
    """(seconds after T0, rule:actions) of every firing."""
    result = replay(cfg, ms, until=None if until is None else T0 + until)
    return [(f.ts - T0, f"{f.rule}:{','.join(f.actions)}") for f in result.firings]


# --- simulated time -------------------------------------------------------------------------------


def test_for_period_fires_at_its_deadline_between_two_readings() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", for_=30.0))
    started = time.monotonic()
    result = replay(cfg, [m(0, 85.0), m(40, 86.0)])
    assert time.monotonic() - started < 5  # simulated: no 30 s wait
    (f,) = result.firings
    assert f.ts == T0 + 30
    assert (f.rule, f.actions, f.state, f.device) == ("hot", ("lamp",), "on", "boiler")
    assert f.cause is not None and f.cause.ts == T0  # what started the period
    assert result.start == T0 and result.end == T0 + 40
    assert result.rules["hot"].fired == 1


def test_timers_fire_in_deadline_order_before_the_next_measurement() -> None:
    cfg = config(
        slow=rule("temperature > 80.0", "slow", for_=45.0),
        quick=rule("temperature > 80.0", "quick", for_=30.0),
        now=rule("temperature > 80.0", "now"),
        cold=rule("temperature < 10.0", "cold"),
    )
    out = fired(cfg, m(0, 90.0), m(100, 5.0), m(110, 95.0), m(150, 96.0))
    assert out == [
        (0, "now:now"),
        (30, "quick:quick"),
        (45, "slow:slow"),
        (100, "cold:cold"),
        (110, "now:now"),
        (140, "quick:quick"),
    ]


def test_a_timer_due_exactly_at_a_measurement_fires_before_it() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", for_=30.0))
    # the reading at 30 s is false: the period completed at 30 s, just before it
    assert fired(cfg, m(0, 85.0), m(30, 20.0)) == [(30, "hot:lamp")]


def test_timers_run_up_to_the_last_reading_or_until() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", for_=30.0))
    assert fired(cfg, m(0, 85.0), m(29, 85.0)) == []
    assert fired(cfg, m(0, 85.0), m(29, 85.0), until=29.999) == []
    assert fired(cfg, m(0, 85.0), m(29, 85.0), until=30) == [(30, "hot:lamp")]
    assert fired(cfg, m(0, 85.0), until=1000) == [(30, "hot:lamp")]


def test_a_false_reading_cancels_the_period() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", for_=30.0))
    assert fired(cfg, m(0, 85.0), m(20, 70.0), m(25, 85.0), until=54) == []
    assert fired(cfg, m(0, 85.0), m(20, 70.0), m(25, 85.0), until=55) == [(55, "hot:lamp")]


def test_cooldown_deferred_edge_fires_when_the_cooldown_ends() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", cooldown=60.0))
    out = fired(cfg, m(0, 85.0), m(10, 70.0), m(20, 90.0), until=100)
    assert out == [(0, "hot:lamp"), (60, "hot:lamp")]


def test_measurements_are_replayed_in_time_order() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", for_=30.0))
    assert fired(cfg, m(40, 86.0), m(0, 85.0)) == [(30, "hot:lamp")]


def test_off_actions_are_firings_in_state_off() -> None:
    cfg = config(
        hot=rule(
            "temperature > 80.0",
            "burner_off",
            "horn",
            off_when="temperature < 70.0",
            off_actions=("burner_on",),
            severity="error",
        )
    )
    result = replay(cfg, [m(0, 85.0), m(10, 75.0), m(20, 65.0)])
    on, off = result.firings
    assert (on.ts, on.actions, on.state, on.severity) == (T0, ("burner_off", "horn"), "on", "error")
    assert (off.ts, off.actions, off.state, off.severity) == (
        T0 + 20,
        ("burner_on",),
        "off",
        "info",
    )
    assert (result.rules["hot"].fired, result.rules["hot"].went_off) == (1, 1)


def test_bad_quality_never_satisfies_a_condition() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", for_=30.0))
    assert fired(cfg, m(0, 85.0), m(10, 99.0, quality="bad"), m(40, 85.0), until=60) == []


def test_evaluation_errors_are_counted_per_rule() -> None:
    cfg = config(
        div=rule("100 / int(count) > 1", "x"),
        fine=rule("count > 1.0", "y"),
    )
    result = replay(cfg, [m(0, 0, "count"), m(1, 0, "count"), m(2, 5, "count")])
    assert result.rules["div"].errors == 2
    assert "divide by zero" in result.rules["div"].last_error
    assert result.rules["fine"].errors == 0
    assert result.errors == 2
    assert [f.rule for f in result.firings] == ["div", "fine"]  # at 2 s: 100 / 5 > 1
    report = format_report(result, [], "x.jsonl")
    assert (
        "\n  div   fired 1, 2 evaluation error(s), the last: evaluation failed: divide by zero\n"
        "  fine  fired 1\n"
    ) in report


def test_replay_logs_no_firings_and_restores_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", severity="error"))
    with caplog.at_level(logging.DEBUG, logger="flux_edge.rules"):
        assert len(replay(cfg, [m(0, 85.0)]).firings) == 1
    assert not [r for r in caplog.records if "fired" in r.getMessage()]
    assert logging.getLogger("flux_edge.rules").disabled is False


def test_empty_replay() -> None:
    result = replay(config(hot=rule("temperature > 80.0")), [])
    assert result.firings == () and result.measurements == 0 and result.end is None


# --- replay files ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "in.jsonl"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_replay_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# recorded at the plant\n"
        '{"device": "b", "name": "t", "value": 81.5, "ts": 1795867200.5, "unit": "°C"}\n'
        "\n"
        '{"device": "b", "name": "on", "value": true, "ts": "2026-11-28T12:00:30Z"}\n'
        '{"device": "b", "name": "s", "value": "x", "ts": "2026-11-28T13:00:30+01:00",'
        ' "quality": "stale", "source": "plc"}\n'
        '{"device": "b", "name": "n", "value": 3, "ts": "2026-11-28T12:00:31"}\n',
    )
    assert read_replay_file(path) == [
        Measurement(device="b", name="t", value=81.5, ts=T0 + 0.5, unit="°C"),
        Measurement(device="b", name="on", value=True, ts=T0 + 30),
        Measurement(device="b", name="s", value="x", ts=T0 + 30, quality="stale", source="plc"),
        Measurement(device="b", name="n", value=3, ts=T0 + 31),  # no offset: UTC
    ]


BAD_LINES = [
    ('{"device": "b", "name": "t", "value": 1, "ts": 1', "not a JSON object"),
    ("[1, 2]", "expected a JSON object (one measurement), got [1,2]"),
    ('{"device": "b", "name": "t", "value": 1}', "missing ts (each line needs"),
    ('{"device": "b", "name": "t", "vlaue": 1, "ts": 0}', 'unknown key "vlaue"; the keys are'),
    (
        '{"device": "", "name": "t", "value": 1, "ts": 0}',
        'device must be a non-empty string, got ""',
    ),
    ('{"device": "b", "name": 7, "value": 1, "ts": 0}', "name must be a non-empty string, got 7"),
    ('{"device": "b", "name": "t", "value": null, "ts": 0}', "value must be a number, true/false"),
    ('{"device": "b", "name": "t", "value": [1], "ts": 0}', "value must be a number, true/false"),
    ('{"device": "b", "name": "t", "value": 1, "ts": "noon"}', 'ts "noon" is not an ISO 8601'),
    ('{"device": "b", "name": "t", "value": 1, "ts": true}', "ts must be unix seconds or an ISO"),
    ('{"device": "b", "name": "t", "value": 1, "ts": -5}', "ts -5 is out of range"),
    ('{"device": "b", "name": "t", "value": 1, "ts": 1e300}', "is out of range (1970 to 9999)"),
    (
        '{"device": "b", "name": "t", "value": 1, "ts": 0, "quality": "ok"}',
        "quality must be one of",
    ),
    ('{"device": "b", "name": "t", "value": 1, "ts": 0, "unit": 5}', "unit must be a string"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_is_reported_with_its_number(tmp_path: Path, line: str, message: str) -> None:
    good = '{"device": "b", "name": "t", "value": 1, "ts": 0}\n'
    path = write(tmp_path, good + "\n" + line + "\n" + good)
    with pytest.raises(ReplayFileError) as info:
        read_replay_file(path)
    (p,) = info.value.problems
    assert p.line == 3, p
    assert message in p.message, p.message
    assert str(p).startswith(f"{path}:3: ")
    assert isinstance(info.value, FluxError)


def test_every_bad_line_is_reported(tmp_path: Path) -> None:
    lines = [line for line, _ in BAD_LINES] * 2
    path = write(tmp_path, b"\n".join(x.encode() for x in lines) + b"\n\xff\xfe{}\n")
    with pytest.raises(ReplayFileError) as info:
        read_replay_file(path)
    problems = info.value.problems
    assert [p.line for p in problems] == list(range(1, len(lines) + 2))
    assert problems[-1].message == "not UTF-8 text" and problems[-1].column == 1
    shown = str(info.value).split("\n")
    assert len(shown) == 21  # the first 20, then how many more
    assert shown[-1] == f"... and {len(problems) - 20} more bad line(s)"


def test_unreadable_replay_file(tmp_path: Path) -> None:
    with pytest.raises(ReplayFileError, match="cannot read the replay file"):
        read_replay_file(tmp_path / "missing.jsonl")


_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10)
_values = st.one_of(
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
_measurements = st.builds(
    Measurement,
    device=_names,
    name=_names,
    value=_values,
    ts=st.floats(0, 253_402_300_799),
    unit=st.text(st.characters(codec="utf-8"), max_size=5),
    quality=st.sampled_from(["good", "stale", "bad"]),
    source=st.text(st.characters(codec="utf-8"), max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_measurements, max_size=5), st.sampled_from([b"\n", b"\r\n"]))
def test_recorded_measurements_read_back_equal(ms: list[Measurement], eol: bytes) -> None:
    data = b"".join(msgspec.json.encode(x) + eol for x in ms)
    assert parse_replay(data) == ms


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_measurements_or_a_replay_file_error(data: bytes) -> None:
    try:
        parse_replay(data, "f")
    except ReplayFileError as exc:
        assert exc.problems and all(p.line >= 1 and p.file == "f" for p in exc.problems)


# --- rule test cases ------------------------------------------------------------------------------


def case(*steps: tuple[float, Value], expect: tuple[str, ...] = (), **kw: Any) -> RuleTest:
    given = tuple(RuleTestStep(t=t, name="temperature", value=v) for t, v in steps)
    return RuleTest(given=given, expect=expect, **kw)


def test_rule_test_cases_pass_and_fail_with_clear_messages() -> None:
    hot = rule(
        "temperature > 80.0",
        "burner_off",
        for_=30.0,
        off_when="temperature < 70.0",
        off_actions=("burner_on",),
        tests=(
            case((0, 85.0), (40, 86.0), expect=("burner_off",), name="hot for 30 s"),
            case((0, 85.0), (40, 86.0), (50, 60.0), expect=("burner_off",)),
            case((0, 85.0), (29, 86.0), expect=("burner_off",), name="too early"),
            case((0, 85.0), expect=("burner_off",), at=30.0, name="at"),
        ),
    )
    results = run_rule_tests(config(hot=hot, other=rule("temperature > 0.0", "x")))
    assert [r.ok for r in results] == [True, False, False, True]
    assert str(results[0]) == "rule 'hot' test 'hot for 30 s': ok"
    assert str(results[1]) == (
        "rule 'hot' test tests[1] failed: expected [burner_off], "
        "the rule asked for [burner_off at 30s, burner_on at 50s]"
    )
    assert results[1].got == ("burner_off", "burner_on")
    assert str(results[2]) == (
        "rule 'hot' test 'too early' failed: expected [burner_off], the rule asked for []"
    )


def test_rule_test_that_must_not_fire() -> None:
    hot = rule("temperature > 80.0", "a", tests=(case((0, 90.0), name="quiet"),))
    (r,) = run_rule_tests(config(hot=hot))
    assert not r.ok
    assert str(r) == "rule 'hot' test 'quiet' failed: expected [], the rule asked for [a at 0s]"


def test_rule_test_failure_explains_a_condition_never_evaluated() -> None:
    hot = rule(
        "temperature > pressure",
        "a",
        tests=(case((0, 90.0), expect=("a",), name="no pressure"),),
    )
    (r,) = run_rule_tests(config(hot=hot))
    assert not r.ok
    assert "its condition was never evaluated" in str(r)


def test_rule_test_failure_shows_evaluation_errors() -> None:
    div = rule(
        "100 / int(count) > 1",
        "a",
        tests=(RuleTest(given=(RuleTestStep(name="count", value=0),), expect=("a",)),),
    )
    (r,) = run_rule_tests(config(div=div))
    assert str(r) == (
        "rule 'div' test tests[0] failed: expected [a], the rule asked for [] "
        "(1 evaluation error(s), the last: evaluation failed: divide by zero)"
    )


def test_rule_test_step_without_a_device_cannot_run() -> None:
    anyone = rule("temperature > 80.0", "a", device="", tests=(case((0, 90.0), expect=("a",)),))
    (r,) = run_rule_tests(config(anyone=anyone))
    assert not r.ok
    assert "given[0] names no device" in str(r)


def test_rule_tests_are_independent_of_each_other_and_of_other_rules() -> None:
    hot = rule(
        "temperature > 80.0",
        "a",
        tests=(case((0, 90.0), expect=("a",)), case((0, 90.0), expect=("a",))),
    )
    results = run_rule_tests(config(hot=hot, other=rule("temperature > 0.0", "b")))
    assert [r.got for r in results] == [("a",), ("a",)]


def test_case_times_are_offsets_from_the_case_epoch() -> None:
    hot = rule("temperature > 80.0", "a", for_=30.0, tests=(case((0, 90.0), at=30.0),))
    (r,) = run_rule_tests(config(hot=hot))
    assert r.happened == ("a at 30s",)
    assert CASE_EPOCH > 0


# --- the command ----------------------------------------------------------------------------------

CONFIG = """
[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
registers = [{ name = "temperature", address = 0, type = "int16", scale = 0.1 }]

[actions.burner_off]
type = "modbus_write"
source = "boiler"
address = 10
value = false

[rules.overheat]
device = "boiler"
when = "temperature > 80.0"
for = "30s"
severity = "error"
actions = ["burner_off"]

[[rules.overheat.tests]]
name = "hot for 30 s"
given = [
  { t = 0, name = "temperature", value = 90.0 },
  { t = 40, name = "temperature", value = 91.0 },
]
expect = ["burner_off"]
"""

REPLAY = (
    '{"device": "boiler", "name": "temperature", "value": 81.2, "unit": "°C", "ts": 1795867200}\n'
    '{"device": "boiler", "name": "temperature", "value": 82.0, "unit": "°C", "ts": 1795867240}\n'
)


def run(tmp_path: Path, cfg: str, data: str | None = None, **kw: Any) -> tuple[int, str, str]:
    (tmp_path / "flux.toml").write_text(cfg, encoding="utf-8")
    replay_path = None
    if data is not None:
        replay_path = tmp_path / "rec.jsonl"
        replay_path.write_text(data, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    code = cmd_rules_test(tmp_path / "flux.toml", replay_path, out, err, **kw)
    return code, out.getvalue(), err.getvalue()


def test_cmd_report_and_exit_0(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, CONFIG, REPLAY)
    assert code == EX_OK, err
    assert out == (
        f"replay of {tmp_path / 'rec.jsonl'}: 2 measurement(s), "
        "2026-11-28 12:00:00 to 12:00:40 UTC\n"
        "12:00:30  error    overheat fired (boiler.temperature=81.2 °C since 12:00:00) "
        "-> burner_off [would run]\n"
        "rules:\n"
        "  overheat  fired 1\n"
        "rule tests:\n"
        "  ok      rule 'overheat' test 'hot for 30 s'\n"
        "1 rule test(s): 1 passed, 0 failed\n"
    )


def test_cmd_failing_rule_test_exits_1_not_78(tmp_path: Path) -> None:
    failing = CONFIG.replace("t = 40", "t = 20")
    code, out, _ = run(tmp_path, failing)
    assert code == EX_FAILED
    assert (
        "  FAILED  rule 'overheat' test 'hot for 30 s' failed: expected [burner_off], "
        "the rule asked for []\n"
    ) in out
    assert out.endswith("1 rule test(s): 0 passed, 1 failed\n")
    # check-config still reports the failing case as an error of the config
    config, problems = check_config(tmp_path / "flux.toml")
    assert config is None
    assert [p.path for p in problems if p.severity == "error"] == ["rules.overheat.tests[0]"]


def test_cmd_invalid_config_exits_78(tmp_path: Path) -> None:
    code, out, err = run(
        tmp_path, CONFIG.replace("temperature > 80.0", "temprature > 80.0"), REPLAY
    )
    assert code == EX_CONFIG
    assert out == ""
    assert "temprature" in err and "invalid configuration (1 error(s))" in err


def test_cmd_unreadable_replay_exits_2(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, CONFIG, REPLAY + "{oops\n")
    assert code == EX_UNREADABLE
    assert out == ""
    assert f"{tmp_path / 'rec.jsonl'}:3: error: not a JSON object" in err
    out_err = io.StringIO()
    missing = cmd_rules_test(
        tmp_path / "flux.toml", tmp_path / "nope.jsonl", io.StringIO(), out_err
    )
    assert missing == EX_UNREADABLE and "cannot read the replay file" in out_err.getvalue()


def test_cmd_json(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path, CONFIG, REPLAY, json=True)
    assert code == EX_OK
    doc = json.loads(out)
    (f,) = doc["replay"]["firings"]
    assert f["time"] == "2026-11-28T12:00:30Z" and f["ts"] == T0 + 30
    assert (f["rule"], f["severity"], f["actions"]) == ("overheat", "error", ["burner_off"])
    assert f["cause"]["value"] == 81.2
    assert doc["replay"]["rules"]["overheat"]["fired"] == 1
    assert doc["tests"][0]["ok"] is True and doc["ok"] is True


def test_cmd_without_replay_or_tests(tmp_path: Path) -> None:
    bare = CONFIG.split("[[rules.overheat.tests]]", maxsplit=1)[0]
    code, out, _ = run(tmp_path, bare)
    assert (code, out) == (EX_OK, "no replay file and no rule test cases: nothing to run\n")


def test_report_dates_when_the_replay_spans_days() -> None:
    cfg = config(hot=rule("temperature > 80.0", "lamp", mode="level"))
    result = replay(cfg, [m(0, 85.0), m(86400.5, 85.0)])
    report = format_report(result, [], "r.jsonl")
    assert "2026-11-28 12:00:00 to 2026-11-29 12:00:00 UTC" in report
    assert "\n2026-11-28 12:00:00.000  info     hot fired" in report
    assert "\n2026-11-29 12:00:00.500  info     hot fired" in report


# --- golden replay cases --------------------------------------------------------------------------

GOLDEN = sorted(p.name for p in CASES.iterdir() if p.is_dir())


def test_golden_cases_exist() -> None:
    assert {
        "empty_message",
        "normal_reading",
        "high_temperature",
        "critical_temperature",
        "oversized_message",
        "for_30s",
    } <= set(GOLDEN)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_replay_case(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    here = CASES / name
    monkeypatch.chdir(here)
    config, problems = check_config("config.toml")  # the real loader
    assert config is not None, problems
    assert [p for p in problems if p.severity == "error"] == []
    out, err = io.StringIO(), io.StringIO()
    code = cmd_rules_test("config.toml", "input.jsonl", out, err)
    assert (code, err.getvalue()) == (EX_OK, "")
    assert out.getvalue() == (here / "expected.txt").read_text(encoding="utf-8")


def test_add_rules_parser_wires_rules_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from flux_edge.rules.replay_cli import add_rules_parser

    (tmp_path / "flux.toml").write_text(CONFIG, encoding="utf-8")
    (tmp_path / "rec.jsonl").write_text(REPLAY, encoding="utf-8")
    parser = argparse.ArgumentParser(prog="flux-edge")
    add_rules_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "rules",
            "test",
            "--config",
            str(tmp_path / "flux.toml"),
            "--replay",
            str(tmp_path / "rec.jsonl"),
            "--json",
        ]
    )
    assert args.func(args) == EX_OK
    assert json.loads(capsys.readouterr().out)["replay"]["rules"]["overheat"]["fired"] == 1


@settings(max_examples=150, deadline=None)
@given(
    readings=st.dictionaries(st.integers(0, 200), st.sampled_from([70.0, 90.0]), max_size=12),
    for_=st.sampled_from([0.0, 10.0, 30.0]),
    cooldown=st.sampled_from([0.0, 25.0]),
    mode=st.sampled_from(["edge", "level"]),
    extra=st.integers(0, 60),
)
def test_replay_matches_a_second_by_second_simulation(
    readings: dict[int, float], for_: float, cooldown: float, mode: str, extra: int
) -> None:
    """Firing at exact deadlines gives what ticking every second would (integer times)."""
    from flux_edge.rules.engine import RuleEngine
    from flux_edge.rules.replay import SimClock

    cfg = config(hot=rule("temperature > 80.0", "a", for_=for_, cooldown=cooldown, mode=mode))
    ms = [m(t, v) for t, v in sorted(readings.items())]
    end = (max(readings) if readings else 0) + extra
    got = fired(cfg, *ms, until=end)

    clock = SimClock(T0)
    engine = RuleEngine(cfg, clock=clock)
    want: list[tuple[float, str]] = []
    for second in range(end + 1):
        clock.now = T0 + second
        commands = engine.tick(clock.now)
        if second in readings:
            commands += engine.on_measurement(m(second, readings[second]))
        want += [(float(second), f"{c.rule}:{c.action}") for c in commands]
    assert got == want
