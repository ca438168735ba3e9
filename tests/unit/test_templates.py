"""Payload/topic templates (flux_edge/actions/templates.py): rendering, escaping, config errors."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_edge.actions.templates import (
    PLACEHOLDERS,
    TemplateError,
    command_context,
    compile_template,
    iso_utc,
)
from flux_edge.model import Command, Measurement, Value


def ctx(value: Value = 82.5) -> dict[str, Value | None]:
    m = Measurement(device="boiler", name="temp", value=value, ts=0.5, unit="°C")
    return command_context(Command(rule="hot", action="alarm", ts=1.0, cause=m))


def test_plain_and_json_rendering() -> None:
    t = compile_template("{device}/{name}: {value} {unit} [{quality}] {rule}->{action} @{ts}")
    assert t.render(ctx()) == "boiler/temp: 82.5 °C [good] hot->alarm @1970-01-01T00:00:00.500Z"
    assert compile_template("{value}").render(ctx(True)) == "true"
    assert compile_template("{value}").render(ctx(3.0)) == "3"
    assert compile_template("{value}").render(ctx(-7)) == "-7"
    j = compile_template('{{"v": {value:json}, "d": {device:json}}}')
    assert json.loads(j.render(ctx('a "b"\n\\'))) == {"v": 'a "b"\n\\', "d": "boiler"}
    assert j.render(ctx(math.nan)) == '{"v": null, "d": "boiler"}'
    assert j.render(ctx(False)) == '{"v": false, "d": "boiler"}'
    assert t.names == frozenset(PLACEHOLDERS)
    assert compile_template("a/b").static and compile_template("{{x}}").render({}) == "{x}"


def test_a_command_without_cause() -> None:
    c = command_context(Command(rule="safety", action="off", ts=1.25))
    assert compile_template("[{device}|{value}]").render(c) == "[|]"
    assert compile_template("{value:json}").render(c) == "null"
    assert compile_template("{ts}").render(c) == iso_utc(1.25) == "1970-01-01T00:00:01.250Z"


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("site/{devcie}/x", 7, "unknown placeholder {devcie}"),
        ("ab{value:xml}", 10, "unknown format 'xml'"),
        ("ab{", 3, "not closed"),
        ("a}b", 2, "without '{'"),
        ("x{}", 2, "an empty field"),
        ("{value.__class__}", 1, "is not a placeholder"),
        ("{value[0]}", 1, "is not a placeholder"),
        ("{value!r}", 1, "is not a placeholder"),
        ("{0}", 1, "is not a placeholder"),
    ],
)
def test_errors_name_the_column(text: str, column: int, words: str) -> None:
    with pytest.raises(TemplateError) as e:
        compile_template(text)
    assert e.value.column == column and words in e.value.message
    assert str(e.value).endswith(f"(column {column})")


@given(st.text(max_size=40))
def test_any_text_compiles_or_raises_template_error(text: str) -> None:
    try:
        t = compile_template(text)
    except TemplateError as exc:
        assert 1 <= exc.column <= len(text)
        return
    # text without fields renders to itself with the braces unescaped
    if not t.names:
        assert t.render({}) == re.sub(r"\{\{|\}\}", lambda m: m.group()[0], text)


@given(st.one_of(st.text(), st.integers(), st.floats(), st.booleans()))
def test_json_fields_always_give_valid_json(value: Value) -> None:
    out = compile_template('{{"v": {value:json}}}').render(ctx(value))
    decoded = json.loads(out)
    if isinstance(value, float) and not math.isfinite(value):
        assert decoded == {"v": None}
    else:
        assert decoded == {"v": value}


@given(st.one_of(
    st.floats(min_value=-2e10, max_value=2e11, allow_nan=False),
    st.integers(min_value=0, max_value=2**33).map(lambda s: s + 0.9999996),
))
def test_iso_utc_matches_datetime(ts: float) -> None:
    # iso_utc keeps the text of the last second (commands and audit records call it per
    # command): the cached text must never differ from formatting with datetime directly
    from datetime import UTC, datetime

    from flux_edge.actions.templates import iso_utc

    dt = datetime.fromtimestamp(ts, UTC)
    assert iso_utc(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    assert iso_utc(ts) == iso_utc(ts)


def test_iso_utc_out_of_range_is_empty() -> None:
    from flux_edge.actions.templates import iso_utc

    assert iso_utc(1e20) == iso_utc(float("nan")) == iso_utc(float("inf")) == ""
