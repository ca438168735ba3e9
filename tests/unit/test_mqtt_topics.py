"""Topic filters and device patterns (flux_edge.mqtt.topics), against the MQTT 3.1.1 / 5.0
rules."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from flux_edge.mqtt.topics import (
    DevicePattern,
    check_filter,
    check_topic,
    device_from_topic,
    filters_overlap,
    topic_matches,
)

# Topic levels: short, from an alphabet that includes the interesting characters ($, space,
# empty levels, non-ASCII) but no wildcards, '/' or NUL.
level = st.text(alphabet=st.sampled_from("ab$ é_-.0"), max_size=3)
topic = st.lists(level, min_size=1, max_size=6).map("/".join)
filter_level = st.one_of(level, st.just("+"))


@st.composite
def topic_filter(draw: st.DrawFn) -> str:
    levels = draw(st.lists(filter_level, min_size=1, max_size=6))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


def reference(f: str, t: str) -> bool:
    """The spec's rules as a regular expression, independent of the implementation's loop."""
    if t.startswith("$") and (f.startswith("+") or f.startswith("#")):
        return False
    parts = f.split("/")
    rx = ""
    for i, p in enumerate(parts):
        sep = "/" if i else ""
        if p == "#":
            # "#" also matches the parent level: "a/#" matches "a"
            rx += "(?:/.*)?" if i else ".*"
            break
        rx += sep + ("[^/]*" if p == "+" else re.escape(p))
    return re.fullmatch(rx, t, flags=re.DOTALL) is not None


# --- the examples from the specification -----------------------------------------------------

SPEC = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/broker/load", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/b", "A/b", False),  # case sensitive
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),  # '+' matches an empty level
    ("$share/group/a/+", "a/x", True),
    ("$share/group/#", "$SYS/x", False),
]


@pytest.mark.parametrize(("f", "t", "expected"), SPEC)
def test_spec_examples(f: str, t: str, expected: bool) -> None:
    assert topic_matches(f, t) is expected
    if not f.startswith("$share/"):
        assert reference(f, t) is expected  # the oracle agrees with the spec, too


@pytest.mark.parametrize(
    "bad",
    ["", "sport/tennis#", "sport/tennis/#/ranking", "sport+", "a/b+/c", "#/a", "a\x00b",
     "$share/g", "$share//a", "$share/g+/a", "$share/g/"],
)
def test_invalid_filters_are_explained(bad: str) -> None:
    problem = check_filter(bad)
    assert problem
    with pytest.raises(ValueError, match=re.escape(problem)):
        topic_matches(bad, "a")


def test_valid_filters() -> None:
    for f in ("#", "+", "+/+", "a/#", "/", "a//b", "$SYS/#", "$share/g/a/+/#", "é/ü"):
        assert check_filter(f) is None, f


def test_check_topic() -> None:
    assert check_topic("a/b") is None
    assert check_topic("$SYS/x") is None
    for bad in ("", "a/+", "a/#", "a\x00"):
        assert check_topic(bad)
    assert check_topic("x" * 65536)
    assert check_filter("é" * 40000)  # the limit is in UTF-8 bytes, not characters


# --- properties ------------------------------------------------------------------------------


@given(topic_filter(), topic)
@example("+", "$")
@example("a/#", "a")
@example("#", "")
def test_matches_the_reference(f: str, t: str) -> None:
    assume(check_filter(f) is None and check_topic(t) is None)
    assert topic_matches(f, t) is reference(f, t)


@given(topic)
def test_a_topic_matches_itself_and_hash(t: str) -> None:
    assume(check_topic(t) is None)
    assert topic_matches(t, t)
    assert topic_matches("#", t) is (not t.startswith("$"))


@given(topic, st.data())
def test_plus_replaces_any_level_and_hash_any_suffix(t: str, data: st.DataObject) -> None:
    assume(check_topic(t) is None)
    levels = t.split("/")
    i = data.draw(st.integers(0, len(levels) - 1))
    plus = "/".join("+" if j == i else lv for j, lv in enumerate(levels))
    hashed = "/".join([*levels[:i], "#"])
    dollar_first = t.startswith("$") and i == 0
    assert topic_matches(plus, t) is not dollar_first
    assert topic_matches(hashed, t) is not dollar_first


@given(topic, topic)
def test_a_filter_without_wildcards_matches_only_itself(a: str, b: str) -> None:
    assume(check_topic(a) is None and check_topic(b) is None)
    assert topic_matches(a, b) is (a == b)


# --- device patterns -------------------------------------------------------------------------


def test_device_from_topic() -> None:
    assert device_from_topic("site/{device}/telemetry", "site/boiler-1/telemetry") == "boiler-1"
    assert device_from_topic("site/{device}/telemetry", "site/boiler-1/status") is None
    assert device_from_topic("site/{device}/telemetry", "site/boiler-1/telemetry/x") is None
    assert device_from_topic("site/{device}/telemetry", "site//telemetry") is None  # empty name
    assert device_from_topic("+/{device}/+", "plant/pump/t") == "pump"
    assert device_from_topic("{device}", "pump") == "pump"
    assert device_from_topic("{device}/#", "pump/a/b") == "pump"
    assert device_from_topic("{device}/#", "pump") == "pump"
    assert device_from_topic("{device}/#", "$SYS/x") is None  # wildcard-like first level
    assert DevicePattern("site/{device}/+/v").subscription == "site/+/+/v"


@given(st.lists(topic, max_size=30), st.sampled_from(["a/{device}/+", "{device}/#", "+/{device}"]))
def test_device_pattern_answers_the_same_from_its_cache(topics: list[str], pattern: str) -> None:
    # issue #12: the device of each topic is remembered (one lookup per message, not a match)
    p = DevicePattern(pattern)
    fresh = [DevicePattern(pattern).device(t) for t in topics]
    assert [p.device(t) for t in topics] == fresh
    assert [p.device(t) for t in topics] == fresh  # now from the cache


def test_device_pattern_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from flux_edge.mqtt import topics as topics_module

    monkeypatch.setattr(topics_module, "_DEVICE_CACHE_MAX", 8)
    p = DevicePattern("site/{device}/t")
    for i in range(50):
        assert p.device(f"site/d{i}/t") == f"d{i}"
        assert len(p._found) <= 8
    assert p.device("site/d3/t") == "d3" and p.device("other/d3/t") is None


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("site/telemetry", "exactly once"),
        ("{device}/{device}", "exactly once"),
        ("site/dev-{device}/x", "whole topic level"),
        ("site/{device}/#/x", "last level"),
        ("site/{device}/{other}", "braces"),
        ("", "exactly once"),
    ],
)
def test_bad_device_patterns(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        DevicePattern(pattern)


@given(st.lists(level, min_size=1, max_size=5), st.data())
def test_device_pattern_finds_the_level(levels: list[str], data: st.DataObject) -> None:
    t = "/".join(levels)
    assume(check_topic(t) is None)
    i = data.draw(st.integers(0, len(levels) - 1))
    # other levels literal or '+', chosen at random
    pat = [
        "{device}" if j == i else data.draw(st.sampled_from([lv, "+"]))
        for j, lv in enumerate(levels)
    ]
    pattern = "/".join(pat)
    hidden = t.startswith("$") and pat[0] in ("+", "{device}")  # wildcard vs $-topic
    got = device_from_topic(pattern, t)
    if hidden or levels[i] == "":
        assert got is None
    else:
        assert got == levels[i]
    # a topic one level longer never matches a pattern without '#'
    assert device_from_topic(pattern, t + "/extra") is None
    # the pattern's subscription filter receives this topic unless it is a hidden $-topic
    assert topic_matches(DevicePattern(pattern).subscription, t) is not hidden


# --- filters that overlap --------------------------------------------------------------------

overlap_level = st.sampled_from(["a", "b", "", "$s", "+"])


@st.composite
def small_filter(draw: st.DrawFn) -> str:
    levels = draw(st.lists(overlap_level, min_size=1, max_size=3))
    if draw(st.booleans()):
        levels.append("#")
    f = "/".join(levels)
    return "$share/g/" + f if draw(st.integers(0, 4)) == 0 else f


def overlap_by_brute_force(a: str, b: str) -> bool:
    """Whether some valid topic matches both filters, trying every topic that could: levels
    from the filters' literal levels plus one fresh name, up to as many as the longer filter."""
    bodies = [f.removeprefix("$share/g/") for f in (a, b)]
    literals = {lv for body in bodies for lv in body.split("/") if lv not in ("+", "#")}
    alphabet = sorted(literals | {"z"})
    longest = max(len(body.split("/")) for body in bodies)
    for n in range(1, longest + 1):
        for levels in itertools.product(alphabet, repeat=n):
            t = "/".join(levels)
            if check_topic(t) is None and topic_matches(a, t) and topic_matches(b, t):
                return True
    return False


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("site/+/telemetry", "site/boiler/telemetry", True),
        ("site/+/telemetry", "site/boiler/status", False),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/+/#", "a", False),
        ("sport/+", "sport", False),
        ("+", "+", True),
        ("#", "$SYS/#", False),  # wildcards at the first level never match $-topics
        ("+/x", "$SYS/x", False),
        ("$SYS/+", "$SYS/#", True),
        ("$share/g/a/+", "a/b", True),
        ("/#", "+", False),  # both match only "", which is no topic
        ("/#", "+/x", True),
    ],
)
def test_filters_overlap_examples(a: str, b: str, expected: bool) -> None:
    assert filters_overlap(a, b) is expected
    assert filters_overlap(b, a) is expected
    assert overlap_by_brute_force(a, b) is expected  # the oracle agrees, too


@given(small_filter(), small_filter())
@example("/#", "+")
@example("#", "$s")
@example("+/#", "$s/a")
def test_filters_overlap_matches_brute_force(a: str, b: str) -> None:
    assume(check_filter(a) is None and check_filter(b) is None)
    assert filters_overlap(a, b) is overlap_by_brute_force(a, b)
