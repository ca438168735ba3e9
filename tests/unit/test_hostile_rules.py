"""Hostile rules: conditions written to exhaust memory or CPU, or to fail at evaluation.

Each is refused at load time (check-config: an error at the rule's line and column, saying what
to change) or bounded at run time (an input above the caps, CEL's iteration budget, MemoryError,
any exception from the library: a counted rule error with a reason, never an exception out of
the engine, never a stop for the other rules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import Config, RuleConfig
from flux_edge.errors import RuleError
from flux_edge.kinds import check_config_text
from flux_edge.model import Measurement
from flux_edge.rules import RuleEngine, check_rules
from flux_edge.rules.cel import (
    DEFAULT_BUDGET,
    ERROR_REASONS,
    Budget,
    EvaluationError,
    compile_condition,
)
from flux_edge.rules.cost import regex_size
from flux_edge.rules.engine import rule_budget
from flux_edge.sources.modbus.spec import ModbusTcpSource, RegisterConfig

VARS = {"name": "string", "level": "double", "mode": "string", "previous": "map(dyn)"}

# the issue's bomb: ~300 characters, within every parse limit; each map() multiplies the
# strings of the one before by 8: 8 characters x 8^9 = 1 GiB of string in the last list, more
# in the intermediate sums (cel-cpp frees nothing before the evaluation ends)
A8 = "a+a+a+a+a+a+a+a"
STRING_BOMB = (
    f"[name+name+name+name+name+name+name+name]{f'.map(a, {A8})' * 9}[0].size() > 0 "
    "&& level > 0.0"
)
LIST = "[" + ",".join(str(i) for i in range(40)) + "]"

HOSTILE: dict[str, tuple[str, str]] = {
    # name: (condition, what the refusal says)
    "string bomb": (STRING_BOMB, "may allocate up to"),
    "list bomb": (
        f"[{LIST}]{'.map(l, l + l + l + l)' * 6}[0].size() > 0 && level > 0.0",
        "may allocate up to",
    ),
    "quadratic map": (
        f"[{LIST}]{'.map(l, l + l)' * 5}[0].map(x, x * 2).size() > 0 && level > 0.0",
        "map()/filter() builds its result one element at a time",
    ),
    "nested comprehensions": (
        f"{LIST}.all(a, {LIST}.all(b, {LIST}.all(c, level > double(a + b + c))))",
        "may cost up to",
    ),
    "huge literal in a comprehension": (
        f'{LIST}.map(x, {LIST}.map(y, "{"x" * 3000}" + name)).size() > 0 && level > 0.0',
        "`+` builds strings of up to",
    ),
    "regex bomb": (
        'name.matches("[a-z]{1000}[a-z]{1000}[a-z]{1000}") && level > 0.0',
        "matches() runs a regex of size ~3,000",
    ),
    "regex per element": (
        'previous.exists(k, k.matches("^temp.*[0-9]{2}$")) && level > 0.0',
        "matches() runs a regex",
    ),
    "pattern from data": ("name.matches(mode) && level > 0.0", "write the pattern as a string"),
    "invalid regex": ('level > 0.0 && name.matches("(unclosed")', "invalid regular expression"),
    "deep nesting": ("(" * 30 + "level > 0.0" + ")" * 30, "nests brackets 30 levels deep"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_condition_is_refused_at_compile_time(case: str) -> None:
    expr, says = HOSTILE[case]
    assert len(expr) <= 4096  # within the length limit: the budget is what stops it
    with pytest.raises(RuleError) as info:
        compile_condition("r", expr, VARS)
    assert says in str(info.value)


def test_the_issue_string_bomb_is_about_300_characters_and_names_the_culprit() -> None:
    assert 250 <= len(STRING_BOMB) <= 400
    with pytest.raises(RuleError) as info:
        compile_condition("r", STRING_BOMB, VARS)
    text = str(info.value)
    assert "GiB" in text  # the estimate says how bad it is
    assert "limit is 4.0 MiB" in text
    assert "no concatenation inside map/filter/all/exists" in text  # what to change
    # the column points into the expression, at one of the `+` inside the last map()
    assert STRING_BOMB[info.value.column - 1] in "a+"
    assert info.value.column > STRING_BOMB.index(".map(")


def test_invalid_regex_literal_column_points_at_the_literal() -> None:
    expr = 'level > 0.0 && name.matches("[a-")'
    with pytest.raises(RuleError, match=r"invalid regular expression '\[a-': missing \]") as info:
        compile_condition("r", expr, VARS)
    assert expr[info.value.column - 1] == '"'
    assert info.value.column == expr.index('"[a-') + 1


@pytest.mark.parametrize(
    "expr",
    [
        "level > 80.0",
        'mode == "auto" && level > 10.0',
        'name.matches("^tank[0-9]+$") && level > 1.0',
        'mode.startsWith("run") || previous.exists(k, k == "pump" && previous[k] == true)',
        "[1.0, 2.0, 3.0].exists(x, level > x)",
        'previous.filter(k, k.startsWith("door")).size() > 2 && level > 0.0',
        '[name, mode].map(s, s + "/x").exists(t, t.size() > 3) && level > 0.0',
    ],
)
def test_ordinary_conditions_stay_well_within_the_budget(expr: str) -> None:
    cond = compile_condition("r", expr, VARS)
    assert 0 < cond.cost <= DEFAULT_BUDGET.max_cost
    assert cond.memory <= DEFAULT_BUDGET.max_memory


def test_a_raised_budget_admits_what_the_default_refuses() -> None:
    expr = HOSTILE["regex per element"][0]
    with pytest.raises(RuleError):
        compile_condition("r", expr, VARS)
    cond = compile_condition("r", expr, VARS, budget=Budget(max_cost=10**6))
    assert DEFAULT_BUDGET.max_cost < cond.cost <= 10**6


def test_regex_size_estimate() -> None:
    assert regex_size("abc") == 3
    assert regex_size("a{10}") == 10
    assert regex_size("(ab){3}") == 6
    assert regex_size("[a-z]{1000}[0-9]{1000}") == 2000
    assert regex_size("a|b|c") == 3
    assert regex_size("x*") == 2
    assert regex_size("(?:a{5}){5}") >= 25


def test_estimate_is_an_upper_bound_for_a_string_builder() -> None:
    """Real sizes at the input caps stay below the estimate (checked through size())."""
    cap = DEFAULT_BUDGET.max_string
    expr = "[name, name].map(s, s + s + mode).exists(t, t.size() > 3000) && level > 0.0"
    cond = compile_condition("r", expr, VARS)
    assert cond.memory >= 2 * (3 * cap)  # two strings of up to 3 x cap characters
    data = {"name": "n" * cap, "mode": "m" * cap, "level": 1.0}
    assert cond.evaluate(data) is True  # 3,072 characters > 3,000: reached at the caps


# --- bounded at run time -------------------------------------------------------------------------


def test_inputs_above_the_caps_are_refused_with_a_reason() -> None:
    cond = compile_condition("r", 'name == "x" && previous.exists(k, k == "a")', VARS)
    ok = {"name": "x", "previous": {"a": 1.0}}
    assert cond.evaluate(ok) is True
    cases: list[dict[str, Any]] = [
        {"name": "x" * (DEFAULT_BUDGET.max_string + 1), "previous": {}},
        {"name": "x", "previous": {f"k{i}": 1.0 for i in range(DEFAULT_BUDGET.max_entries + 1)}},
        {"name": "x", "previous": {"k" * (DEFAULT_BUDGET.max_key + 1): 1.0}},
        {"name": "x", "previous": {"a": "v" * (DEFAULT_BUDGET.max_string + 1)}},
    ]
    for data in cases:
        with pytest.raises(EvaluationError, match="the limit is") as info:
            cond.evaluate(data)
        assert info.value.reason == "too_large"


class _Raising:
    """Stands in for a compiled CEL program whose evaluation raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def eval(self, **_: Any) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (MemoryError("std::bad_alloc"), "memory"),
        (RuntimeError("RESOURCE_EXHAUSTED: std::bad_alloc"), "memory"),
        (RuntimeError("INVALID_ARGUMENT: Iteration budget exceeded"), "iterations"),
        (ValueError("INVALID_ARGUMENT: divide by zero"), "runtime"),
        (KeyError("weird"), "internal"),
        (RecursionError("deep"), "runtime"),  # a RuntimeError
        (SystemError("pybind11 cast"), "internal"),
    ],
)
def test_every_library_failure_is_an_evaluation_error(exc: BaseException, reason: str) -> None:
    cond = compile_condition("r", "level > 1.0", VARS)
    cond._program = _Raising(exc)  # the compiled program's slot
    with pytest.raises(EvaluationError) as info:
        cond.evaluate({"level": 2.0})
    assert info.value.reason == reason
    assert reason in ERROR_REASONS
    assert "\n" not in str(info.value)


def test_runtime_errors_of_cel_itself_have_reasons() -> None:
    cond = compile_condition("r", "int(level) / int(mode.size()) > 1 && level > 0.0", VARS)
    with pytest.raises(EvaluationError, match="divide by zero") as info:
        cond.evaluate({"level": 5.0, "mode": ""})
    assert info.value.reason == "runtime"
    with pytest.raises(EvaluationError) as info:
        cond.evaluate({"level": "hot", "mode": ""})
    assert info.value.reason == "type"
    with pytest.raises(EvaluationError) as info:
        cond.evaluate({"mode": ""})
    assert info.value.reason == "missing"


# --- in the engine -------------------------------------------------------------------------------


def _config(rules: dict[str, RuleConfig]) -> Config:
    src = ModbusTcpSource(
        host="127.0.0.1",
        device="tank",
        registers=(
            RegisterConfig(name="level", address=0),
            RegisterConfig(name="mode", address=1, type="string", count=8),
        ),
    )
    return Config(sources={"tank": src}, rules=rules)


def _m(name: str, value: Any, ts: float = 1.0) -> Measurement:
    return Measurement(device="tank", name=name, value=value, ts=ts)


def test_a_failing_rule_is_counted_by_reason_and_the_healthy_rule_still_fires() -> None:
    rules = {
        "healthy": RuleConfig(when="level > 10.0", actions=("alarm",), mode="level"),
        "divides": RuleConfig(
            when="int(level) / int(mode.size()) > 1", actions=("alarm",), mode="level"
        ),
        "explodes": RuleConfig(when="level > 1.0", actions=("alarm",), mode="level"),
    }
    engine = RuleEngine(_config(rules), clock=lambda: 100.0)
    # a library failure of the worst kind, for one rule only
    engine._by_name["explodes"].when.condition._program = _Raising(MemoryError("bad_alloc"))
    engine.on_measurement(_m("mode", ""))
    fired = []
    for i in range(5):
        fired += [c.rule for c in engine.on_measurement(_m("level", 20.0 + i))]
    assert fired == ["healthy"] * 5
    st = engine.stats
    assert st["divides"].errors_by_reason == {"runtime": 5}
    assert st["explodes"].errors_by_reason == {"memory": 5}
    assert st["explodes"].consecutive_errors == 5
    assert st["explodes"].last_error_reason == "memory"
    assert st["explodes"].last_error_ts == 100.0
    assert "out of memory" in st["explodes"].last_error
    assert st["healthy"].errors == 0 and st["healthy"].firings == 5
    assert set(engine.failing(at_least=5)) == {"divides", "explodes"}
    assert engine.failing(at_least=6) == {}
    # the input that made `divides` fail goes away: it recovers, its streak ends
    engine.on_measurement(_m("mode", "auto"))
    assert st["divides"].consecutive_errors == 0
    assert st["divides"].errors == 5
    assert st["divides"].firings == 1  # 20 / 4 > 1


def test_a_bug_outside_cel_is_contained_too() -> None:
    rules = {
        "healthy": RuleConfig(when="level > 10.0", actions=("alarm",), mode="level"),
        "buggy": RuleConfig(when="level > 1.0", actions=("alarm",), mode="level"),
    }
    engine = RuleEngine(_config(rules), clock=lambda: 100.0)

    class Buggy:
        def evaluate(self, _values: Any) -> bool:
            raise ZeroDivisionError("not from cel.py")

    engine._by_name["buggy"].when.condition = Buggy()  # type: ignore[assignment]
    assert [c.rule for c in engine.on_measurement(_m("level", 20.0))] == ["healthy"]
    assert engine.stats["buggy"].errors_by_reason == {"internal": 1}
    assert "ZeroDivisionError: not from cel.py" in engine.stats["buggy"].last_error


def test_stats_hold_each_rules_estimate() -> None:
    rules = {
        "plain": RuleConfig(when="level > 10.0", actions=("alarm",)),
        "regex": RuleConfig(
            when='mode.matches("^(auto|manual)$") && level > 1.0',
            off_when="level < 0.5",
            actions=("alarm",),
        ),
    }
    engine = RuleEngine(_config(rules))
    st = engine.stats
    assert 0 < st["plain"].cost < st["regex"].cost <= DEFAULT_BUDGET.max_cost
    assert st["regex"].max_cost == DEFAULT_BUDGET.max_cost


def test_rule_budget_reads_max_cost_when_the_config_has_it() -> None:
    class WithMaxCost:
        max_cost = 400_000

    assert rule_budget(None) is DEFAULT_BUDGET
    assert rule_budget(RuleConfig(when="x", actions=())) is DEFAULT_BUDGET or (
        getattr(RuleConfig(when="x", actions=()), "max_cost", None) is not None
    )
    assert rule_budget(WithMaxCost()).max_cost == 400_000  # type: ignore[arg-type]


def test_check_rules_reports_every_refusal_and_the_costs_of_the_rest() -> None:
    rules = {
        "healthy": RuleConfig(when="level > 10.0", actions=("alarm",)),
        "bomb": RuleConfig(when=STRING_BOMB.replace("name", "mode"), actions=("alarm",)),
        "regex": RuleConfig(when='level > 0.0 && mode.matches("(")', actions=("alarm",)),
    }
    costs: list[Any] = []
    errors = check_rules(_config(rules), costs)
    assert sorted(e.rule for e in errors) == ["bomb", "regex"]
    assert [(c.rule, c.key[-1]) for c in costs] == [("healthy", "when")]


# --- check-config -------------------------------------------------------------------------------

SITE = """
[daemon]
state_dir = "{state}"

[sources.tank]
type = "modbus_tcp"
host = "127.0.0.1"
registers = [
  {{ name = "level", address = 0 }},
  {{ name = "mode", address = 1, type = "string", count = 8 }},
]

[rules.healthy]
when = "level > 10.0"
actions = []

[rules.bomb]
when = "{bomb}"
actions = []

[rules.badregex]
when = 'level > 0.0 && mode.matches("[a-")'
actions = []

[rules.close]
when = 'level > 0.0 && mode.matches("^[a-z]{{120}}$")'
actions = []
"""


def test_check_config_refuses_with_line_and_column_and_warns_near_the_limit(
    tmp_path: Path,
) -> None:
    bomb = STRING_BOMB.replace("name", "mode")
    text = SITE.format(state=tmp_path / "state", bomb=bomb)
    config, problems = check_config_text(text, str(tmp_path / "site.toml"))
    assert config is None
    by_path = {p.path: p for p in problems}
    lines = text.splitlines()

    p = by_path["rules.bomb.when"]
    assert p.severity == "error" and "may allocate up to" in p.message
    assert lines[p.line - 1].startswith("when = ")
    assert lines[p.line - 1][p.column - 1] in "a+"

    p = by_path["rules.badregex.when"]
    assert p.severity == "error" and "invalid regular expression '[a-'" in p.message
    assert lines[p.line - 1][p.column - 1 :].startswith('"[a-"')

    p = by_path["rules.close.when"]
    assert p.severity == "warning"
    assert "% of its limit" in p.message and "max_cost" in p.message
    assert "rules.healthy.when" not in by_path
