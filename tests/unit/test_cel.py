"""flux_edge.rules.cel: compiling and evaluating CEL conditions against real cel-expr-python."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_edge.errors import RuleError
from flux_edge.rules import cel as celmod
from flux_edge.rules.cel import MAX_EXPRESSION_CHARS, MAX_NESTING, compile_condition

VARS = {"temperature": "double", "count": "int", "running": "bool", "mode": "string"}


def compile_(expr: str, variables: dict[str, str] | None = None) -> celmod.Condition:
    return compile_condition("r1", expr, VARS if variables is None else variables)


def error(expr: str, variables: dict[str, str] | None = None) -> RuleError:
    with pytest.raises(RuleError) as info:
        compile_(expr, variables)
    assert info.value.rule == "r1"
    return info.value


# --- type checking ------------------------------------------------------------------------------


def test_string_compared_with_double_is_rejected_with_column() -> None:
    err = error('temperature > "80"')
    assert err.column == 13
    assert "found no matching overload for '_>_' applied to '(double, string)'" in str(err)
    assert "rule 'r1'" in str(err)
    # one clean line: no status codes, no caret snippet
    assert "\n" not in str(err)
    assert "INVALID_ARGUMENT" not in str(err)
    assert "ERROR" not in str(err)


def test_unknown_name_is_rejected_with_column() -> None:
    err = error("running && presure > 2.0")
    assert str(err) == "rule 'r1': undeclared reference to 'presure'"
    assert err.column == 12


def test_column_in_second_line_is_an_offset_into_the_expression() -> None:
    expr = "running &&\n  mode > 1"
    err = error(expr)
    assert expr[err.column - 1] == ">"


def test_column_counts_code_points() -> None:
    expr = 'mode == "é" && temperature > "x"'
    err = error(expr)
    assert expr[err.column - 1 :].startswith("> ")


def test_syntax_error_has_column() -> None:
    err = error("running &&")
    assert "Syntax error" in str(err)
    assert err.column == 11


def test_non_bool_condition_is_rejected() -> None:
    assert str(error("count + 1")) == "rule 'r1': condition must be a bool expression, got int"
    assert "got double" in str(error("temperature"))
    assert "got string" in str(error("mode"))
    assert "got list<int>" in str(error("[1, 2]"))


def test_mixed_arithmetic_error_says_what_to_write() -> None:
    err = error("temperature + 1 > 2.0")
    assert "'_+_' applied to '(double, int)'" in str(err)
    assert "80.0" in str(err)


def test_several_errors_report_the_first_and_count_the_rest() -> None:
    err = error("a > 1.0 && b > 1.0 && c")
    assert "undeclared reference to 'a'" in str(err)
    assert "(and 2 more errors)" in str(err)
    assert err.column == 1


def test_bad_variable_declarations() -> None:
    assert "not a CEL identifier" in str(error("true", {"bad-name": "double"}))
    assert "unknown type 'float'" in str(error("true", {"x": "float"}))


def test_empty_condition() -> None:
    assert "empty" in str(error("   "))


# --- evaluation: mixed numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(79.9, False), (80.0, False), (80.1, True), (79, False), (80, False), (81, True)],
)
def test_double_compared_with_int_literal(value: float, expected: bool) -> None:
    cond = compile_("temperature > 80")
    assert cond.evaluate({"temperature": value}) is expected


@pytest.mark.parametrize(
    ("expr", "values", "expected"),
    [
        ("temperature == 80", {"temperature": 80.0}, True),
        ("temperature == 80", {"temperature": 80}, True),
        ("temperature == 80", {"temperature": 80.5}, False),
        ("temperature != 80", {"temperature": 80.5}, True),
        ("count == 80.0", {"count": 80}, True),
        ("count == 80.5", {"count": 80}, False),
        ("count < 1.5", {"count": 1}, True),
        ("count >= 2.5", {"count": 2}, False),
        ("temperature <= 80u", {"temperature": 80.0}, True),
        ("count > 3u", {"count": 4}, True),
        ("temperature in [80, 90]", {"temperature": 90.0}, True),
        ("temperature in [80, 90]", {"temperature": 85.0}, False),
        ("count in [1.0, 2.5]", {"count": 1}, True),
        ("temperature + 0.5 > 80.0", {"temperature": 80}, True),  # int given for a double
        ("temperature > 80", {"temperature": True}, False),  # bool given for a double: 1.0
    ],
)
def test_mixed_number_evaluation(
    expr: str, values: dict[str, bool | int | float | str], expected: bool
) -> None:
    assert compile_(expr).evaluate(values) is expected


def test_bool_and_string_variables() -> None:
    cond = compile_('running && mode == "auto" || !running && mode.startsWith("man")')
    assert cond.evaluate({"running": True, "mode": "auto"}) is True
    assert cond.evaluate({"running": True, "mode": "manual"}) is False
    assert cond.evaluate({"running": False, "mode": "manual"}) is True
    assert cond.variables == {"running", "mode"}
    assert error("running > 1").column == 9


def test_evaluate_does_not_modify_its_input() -> None:
    values: dict[str, bool | int | float | str] = {"temperature": 81}
    assert compile_("temperature > 80").evaluate(values) is True
    assert type(values["temperature"]) is int


def test_nan_compares_false() -> None:
    cond = compile_("temperature > 80")
    assert cond.evaluate({"temperature": math.nan}) is False


# --- evaluation errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "values", "fragment"),
    [
        ("count / 0 > 1", {"count": 1}, "divide by zero"),
        ("temperature > 1.0", {}, "no value for 'temperature'"),
        (
            "temperature == 1.0",
            {"temperature": "hot"},
            "'temperature' is str 'hot', expected double",
        ),
        ("count > 1", {"count": 2**70}, "out of range"),
        ("count > 1", {"count": 2.5}, "'count' is float 2.5, expected int"),
        ("count > 1", {"count": True}, "'count' is bool True, expected int"),
        ("running", {"running": 1}, "'running' is int 1, expected bool"),
        ("mode == 'a'", {"mode": b"a"}, "'mode' is bytes b'a', expected string"),
        ('mode == "a"', {"mode": "a\ud800"}, "evaluation failed"),
    ],
)
def test_evaluation_errors_raise_rule_error(
    expr: str, values: dict[str, bool | int | float | str], fragment: str
) -> None:
    cond = compile_(expr)
    with pytest.raises(RuleError) as info:
        cond.evaluate(values)
    assert info.value.rule == "r1"
    assert str(info.value).startswith("rule 'r1': evaluation failed: ")
    assert fragment in str(info.value)
    assert "[INVALID_ARGUMENT]" not in str(info.value)


def test_short_circuit_hides_an_error() -> None:
    cond = compile_("running || count / 0 > 1")
    assert cond.evaluate({"running": True, "count": 1}) is True


def test_iteration_budget_is_an_evaluation_error() -> None:
    big = "[" + ",".join(["0"] * 400) + "]"
    expr = f"{big}.all(a, {big}.all(b, running))"
    with pytest.raises(RuleError, match="may allocate"):  # refused by the cost estimate
        compile_(expr)
    # with the estimate's limits lifted, CEL's own iteration budget still stops it
    lifted = celmod.Budget(max_cost=10**12, max_memory=10**12)
    cond = compile_condition("r1", expr, {"running": "bool"}, budget=lifted)
    start = time.perf_counter()
    with pytest.raises(celmod.EvaluationError, match="budget") as info:
        cond.evaluate({"running": True})
    assert info.value.reason == "iterations"
    assert time.perf_counter() - start < 1.0


# --- referenced variables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("temperature > 80", {"temperature"}),
        ('mode == "temperature and running"', {"mode"}),
        ("[1, 2].exists(count, count > 1) && running", {"running"}),  # shadowed by the macro
        ("[1, 2].exists(x, x > count)", {"count"}),
        ("[count].all(count, count > 1)", {"count"}),  # the range reads the variable
        ("{'k': temperature}['k'] > 1.0 && size([mode]) == 1", {"temperature", "mode"}),
        ("running ? count > 1 : temperature > 1.5", {"running", "count", "temperature"}),
        ("mode.size() > 2", {"mode"}),
        ("true", set()),
    ],
)
def test_variables_are_the_referenced_declared_names(expr: str, expected: set[str]) -> None:
    cond = compile_(expr)
    assert cond.variables == expected
    assert dict(cond.types) == {n: VARS[n] for n in expected}


def test_variables_fallback_when_the_ast_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(serialized: bytes, declared: object, *more: object) -> frozenset[str]:
        raise ValueError("unreadable")

    monkeypatch.setattr(celmod, "_referenced_variables", broken)
    cond = compile_('mode == "temperature" && r"count" != mode && running')
    assert cond.variables == {"mode", "running"}


def test_blank_strings_keeps_offsets_and_skips_literals() -> None:
    expr = """a == "x(\\"[" && b == 'y' && c == r"\\" && d == '''(((''' && e == b"("."""
    blanked = celmod._blank_strings(expr)
    assert len(blanked) == len(expr)
    assert celmod._max_nesting(blanked, 1) == (0, 0)
    assert [w for w in "abcde" if w in blanked] == list("abcde")
    assert "x" not in blanked and "y" not in blanked


# --- hostile input ------------------------------------------------------------------------------


def assert_fast_rule_error(expr: str, fragment: str) -> RuleError:
    start = time.perf_counter()
    with pytest.raises(RuleError) as info:
        compile_(expr)
    assert time.perf_counter() - start < 1.0
    assert fragment in str(info.value)
    return info.value


def test_too_long_expression_is_rejected_before_cel() -> None:
    chain = " && ".join(["temperature > 1.0"] * 4000)  # ~84 KB, CEL itself would take it
    assert len(chain) > 80_000
    assert_fast_rule_error(chain, f"the limit is {MAX_EXPRESSION_CHARS}")
    assert_fast_rule_error("x" * 1_000_000, "characters long")


def test_just_under_the_length_limit_compiles() -> None:
    chain = " && ".join(["running"] * 370)
    assert len(chain) <= MAX_EXPRESSION_CHARS
    assert compile_(chain).evaluate({"running": True}) is True


@pytest.mark.parametrize("opener", ["(", "["])
def test_deep_nesting_is_rejected_before_cel(opener: str) -> None:
    closer = {"(": ")", "[": "]"}[opener]
    deep = opener * 10_000 + "running" + closer * 10_000
    assert_fast_rule_error(deep, "the limit is 4096")  # the length check comes first
    deep = opener * 2000 + "running" + closer * 2000
    err = assert_fast_rule_error(
        deep, f"nests brackets 2000 levels deep; the limit is {MAX_NESTING}"
    )
    assert err.column == MAX_NESTING + 1  # the first bracket beyond the limit
    ok = "(" * MAX_NESTING + "running" + ")" * MAX_NESTING
    assert compile_(ok).evaluate({"running": True}) is True


@pytest.mark.parametrize(
    "expr",
    [
        "count " + "+ count " * 200 + "> 0",  # long left-deep operator chain
        "[[1]]" + "[0]" * 200 + " > 0",  # index chain
        "mode" + ".size()" * 300 + " > 0",  # member-call chain
        "running ? running : " * 100 + "running",  # right-deep conditional chain
    ],
)
def test_cel_recursion_limits_become_rule_errors(expr: str) -> None:
    assert len(expr) <= MAX_EXPRESSION_CHARS
    assert_fast_rule_error(expr, "rule 'r1'")


def test_unary_chains_are_harmless() -> None:
    assert compile_("!" * 2000 + "running").evaluate({"running": True}) is True
    assert compile_("-" * 2000 + "1 > 0").evaluate({}) is True


def test_invalid_unicode_is_rejected() -> None:
    err = error('mode == "\ud800"')
    assert err.column == 10


# --- property tests -----------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
ints = st.integers(min_value=-(2**53), max_value=2**53)


@settings(max_examples=300, deadline=None)
@given(threshold=st.one_of(ints, finite), value=st.one_of(ints, finite))
def test_greater_than_agrees_with_python(threshold: int | float, value: int | float) -> None:
    cond = compile_(f"temperature > {threshold!r}")
    assert cond.evaluate({"temperature": value}) is (float(value) > threshold)


@settings(max_examples=200, deadline=None)
@given(threshold=ints, value=ints)
def test_int_variable_against_double_literal_agrees_with_python(threshold: int, value: int) -> None:
    literal = f"{threshold}.5"
    cond = compile_(f"count < {literal}")
    assert cond.evaluate({"count": value}) is (value < float(literal))


cel_alphabet = st.sampled_from(
    [
        *"()[]{}<>=!&|?:.,+-*/%\"'\\ \n\trbu0123456789",
        *("temperature", "count", "running", "mode", "true", "in", "&&", "||", "1.5", "'''"),
        "\ud800",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(cel_alphabet, max_size=60).map("".join)))
def test_garbage_only_ever_raises_rule_error(expr: str) -> None:
    try:
        cond = compile_(expr)
    except RuleError as err:
        assert err.rule == "r1"
        assert 0 <= err.column <= len(expr) + 1
        assert "\n" not in str(err) or "\n" in expr
        return
    assert cond.variables <= VARS.keys()
    values: dict[str, bool | int | float | str] = {
        "temperature": 0.0,
        "count": 0,
        "running": False,
        "mode": "",
    }
    try:
        assert cond.evaluate(values) in (True, False)
    except RuleError as err:
        assert err.rule == "r1"


# --- map variables (the engine's previous/delta/age) -------------------------------------------

MAPS = {
    "temperature": "double",
    "pressure": "double",
    "previous": "map(dyn)",
    "delta": "map(double)",
    "age": "map(double)",
}


def test_map_variables_type_check_and_record_their_keys() -> None:
    cond = compile_condition("r", "delta.temperature > 5 && age.pressure < 60.0", MAPS)
    assert cond.variables == {"delta", "age"}
    assert cond.fields == {"delta": {"temperature"}, "age": {"pressure"}}
    data: dict[str, object] = {"delta": {"temperature": 6.0}, "age": {"pressure": 1.0}}
    assert cond.evaluate(data) is True
    data["delta"] = {"temperature": 4.0}
    assert cond.evaluate(data) is False


def test_previous_is_dyn() -> None:
    cond = compile_condition("r", "previous.temperature < temperature", MAPS)
    assert cond.fields == {"previous": {"temperature"}}
    assert cond.evaluate({"temperature": 2.0, "previous": {"temperature": 1.0}})


def test_map_used_whole_records_none() -> None:
    cond = compile_condition("r", '"temperature" in delta || delta["pressure"] > 1.0', MAPS)
    assert cond.fields == {"delta": None}
    cond = compile_condition("r", "has(age.temperature) && temperature > 1.0", MAPS)
    assert cond.fields == {"age": None}


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ('delta.temperature > "5"', "no matching overload"),
        ("age.pressure + 1 > 2.0", "no matching overload"),
        ("delta > 1.0", "no matching overload"),
    ],
)
def test_map_type_errors(expr: str, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        compile_condition("r", expr, MAPS)


def test_missing_map_key_is_an_evaluation_error() -> None:
    cond = compile_condition("r", "delta.temperature > 5.0", MAPS)
    with pytest.raises(RuleError, match="evaluation failed"):
        cond.evaluate({"delta": {}})
    with pytest.raises(RuleError, match="'delta' is list"):
        cond.evaluate({"delta": []})
