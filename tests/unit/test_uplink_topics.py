"""Uplink topic templates (flux_edge/uplink/topics.py): our own placeholder syntax, refused
with a column where str.format would have taken it, rendering exactly as str.format did."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_edge.uplink.topics import (
    UPLINK_TOPIC_FIELDS,
    TemplateError,
    check_uplink_topic,
    compile_topic,
)

FIELDS = st.fixed_dictionaries({f: st.text(max_size=12) for f in UPLINK_TOPIC_FIELDS})


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("t/{device:>12}", 3, "no format specs like ':>12'"),
        ("t/{name!r}", 3, "no conversions like '!r'"),
        ("t/{device.x}", 3, "no attribute or index access"),
        ("t/{device[0]}", 3, "no attribute or index access"),
        ("{0}/x", 1, "positional fields"),
        ("t/{}", 3, "an empty field"),
        ("t/{value}", 4, "unknown placeholder {value}"),
        ("a/{gatway}/b", 4, "unknown placeholder {gatway}"),
        ("t/{device:json}", 11, "no format is allowed"),
        ("t/{device", 3, "not closed"),
        ("t/device}", 9, "without '{'"),
        ("t/{de{vice}", 3, "is not a placeholder"),
    ],
)
def test_bad_placeholders_are_refused_with_a_column(text: str, column: int, words: str) -> None:
    with pytest.raises(TemplateError) as e:
        compile_topic(text)
    assert e.value.column == column and words in e.value.message
    problem = check_uplink_topic(text)
    assert problem is not None and words in problem and f"(column {column})" in problem


def test_check_uplink_topic() -> None:
    assert check_uplink_topic("flux/{gateway}/{source}/{device}/{name}") is None
    assert check_uplink_topic("literal/{{braces}}") is None
    unknown = check_uplink_topic("gw/{gatway}/{device}")
    assert unknown is not None
    assert "{gatway}" in unknown and "{gateway}" in unknown and "(column 5)" in unknown
    wild = check_uplink_topic("x/+/{device}")
    assert wild is not None and "wildcards" in wild
    assert "wildcards" in (check_uplink_topic("x/#") or "")


def test_names_and_rendering() -> None:
    t = compile_topic("flux/{gateway}/{device}/{name}/{{x}}")
    assert t.names == frozenset({"gateway", "device", "name"})
    assert t.render(gateway="g", source="s", device="d{0}", name="n}") == "flux/g/d{0}/n}/{x}"
    assert compile_topic("{a}/{b}", ("a", "b")).render(a="1", b="2") == "1/2"
    with pytest.raises(TemplateError):
        compile_topic("{gateway}", ("a",))


_PIECE = st.one_of(
    st.sampled_from([f"{{{f}}}" for f in UPLINK_TOPIC_FIELDS]),
    st.sampled_from(["{{", "}}", "/"]),
    st.text(st.characters(blacklist_characters="{}"), max_size=8),
)


@given(st.lists(_PIECE, max_size=10).map("".join), FIELDS)
def test_good_templates_render_as_str_format_did(text: str, fields: dict[str, str]) -> None:
    assert compile_topic(text).render(**fields) == text.format(**fields)


_ANY = st.sampled_from([*"{}ab:!.[]0/", *(f"{{{f}}}" for f in UPLINK_TOPIC_FIELDS)])


@given(st.lists(_ANY, max_size=12).map("".join), FIELDS)
def test_anything_accepted_is_what_str_format_makes_of_it(
    text: str, fields: dict[str, str],
) -> None:
    try:
        t = compile_topic(text)
    except TemplateError as exc:
        assert 1 <= exc.column <= len(text)
        return
    assert t.render(**fields) == text.format(**fields)
