"""MQTT topic names and filters (MQTT 3.1.1 section 4.7, MQTT 5.0 section 4.7). Pure: no paho.

The config checker imports these cheaply; the client adapter (:mod:`flux_edge.mqtt.client`) uses
them to check what it is given and to dispatch incoming messages to subscriptions.
"""

from __future__ import annotations

import functools

MAX_TOPIC_BYTES = 65535
_SHARE_PREFIX = "$share/"


def _check_common(text: str, what: str) -> str | None:
    if not text:
        return f"an empty {what} is not allowed"
    if "\x00" in text:
        return f"a {what} must not contain the NUL character"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"a {what} is limited to {MAX_TOPIC_BYTES} bytes of UTF-8"
    return None


def check_topic(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None when it is a valid topic name."""
    problem = _check_common(topic, "topic")
    if problem:
        return problem
    if "+" in topic or "#" in topic:
        return f"topic {topic!r} contains a wildcard (+ or #): wildcards are for subscriptions"
    return None


def check_filter(topic_filter: str) -> str | None:
    """Why ``topic_filter`` cannot be subscribed to, or None when it is a valid filter.

    ``+`` must fill a whole level, ``#`` must be the last level; ``$share/<group>/<filter>``
    (MQTT 5 shared subscriptions) is accepted and its filter part checked.
    """
    problem = _check_common(topic_filter, "topic filter")
    if problem:
        return problem
    body = topic_filter
    if topic_filter.startswith(_SHARE_PREFIX):
        group, sep, body = topic_filter[len(_SHARE_PREFIX):].partition("/")
        if not group or not sep or not body or "+" in group or "#" in group:
            return (
                f"shared subscription {topic_filter!r} must be $share/<group>/<filter> with a "
                "group name without wildcards"
            )
    levels = body.split("/")
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                return (
                    f"in {topic_filter!r}, '#' must fill a whole level (level {i + 1}: {level!r})"
                )
            if i != len(levels) - 1:
                return f"in {topic_filter!r}, '#' is only allowed as the last level"
        elif "+" in level and level != "+":
            return f"in {topic_filter!r}, '+' must fill a whole level (level {i + 1}: {level!r})"
    return None


def filter_body(topic_filter: str) -> str:
    """The matching part of a filter (without a ``$share/<group>/`` prefix)."""
    if topic_filter.startswith(_SHARE_PREFIX):
        return topic_filter[len(_SHARE_PREFIX):].partition("/")[2]
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a message published on ``topic`` is delivered to a subscription ``topic_filter``.

    ``+`` matches exactly one level (possibly empty), ``#`` the parent level and any number of
    child levels, and a filter starting with a wildcard does not match topics starting with ``$``
    (``$SYS/...``). Raises ValueError for an invalid filter (see :func:`check_filter`).
    """
    problem = check_filter(topic_filter)
    if problem:
        raise ValueError(problem)
    return match_levels(filter_body(topic_filter).split("/"), topic)


def match_levels(filter_levels: list[str], topic: str) -> bool:
    """:func:`topic_matches` for a filter already checked and split into levels (no
    ``$share/`` prefix): the dispatch fast path."""
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(filter_levels):
        if f == "#":
            return True  # "a/#" matches "a" too: len(topic_levels) >= i is guaranteed here
        if i >= len(topic_levels):
            return False
        if f != "+" and f != topic_levels[i]:
            return False
    return len(topic_levels) == len(filter_levels)


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters ``a`` and ``b``.

    The same rules as :func:`topic_matches`: ``+`` stands for any one level, ``#`` for the parent
    level and any number of child levels, a ``$share/<group>/`` prefix is ignored, and a filter
    starting with a wildcard matches no topic starting with ``$``, so ``"+/x"`` and
    ``"$SYS/x"`` do not overlap. The filters are not validated (see :func:`check_filter`): an
    invalid one is compared level by level as written, without raising.
    """
    left, right = filter_body(a).split("/"), filter_body(b).split("/")
    for first, other in ((left[0], right[0]), (right[0], left[0])):
        if first in ("+", "#") and other.startswith("$"):
            return False  # wildcards never match a $-topic's first level
    # The empty string is no topic: a match that must end after an empty first level ("/#" and
    # "+" both match only "") is no match.
    empty_first = "" in (left[0], right[0])
    for index in range(max(len(left), len(right))):
        x = left[index] if index < len(left) else None
        y = right[index] if index < len(right) else None
        if x == "#" or y == "#":
            # "a/#" also matches "a": when the other filter ends here, so must the topic
            return not (index == 1 and empty_first and (x is None or y is None))
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return not (len(left) == 1 and empty_first)


class DevicePattern:
    """A topic pattern naming the device: ``"site/{device}/telemetry"``.

    Exactly one level is ``{device}``; the others are literal, ``+``, or a final ``#``.
    ``device(topic)`` returns the ``{device}`` level of a matching topic (never empty), else None.
    ``subscription`` is the pattern as an MQTT filter (``{device}`` -> ``+``).
    Raises ValueError for a malformed pattern, saying what is wrong.
    """

    __slots__ = ("_found", "_index", "_levels", "pattern", "subscription")

    def __init__(self, pattern: str) -> None:
        levels = pattern.split("/")
        marks = [i for i, level in enumerate(levels) if "{device}" in level]
        if len(marks) != 1:
            raise ValueError(
                f"device pattern {pattern!r} must contain {{device}} exactly once "
                f"(found {len(marks)}), e.g. \"site/{{device}}/telemetry\""
            )
        index = marks[0]
        if levels[index] != "{device}":
            raise ValueError(
                f"in device pattern {pattern!r}, {{device}} must fill a whole topic level "
                f"(level {index + 1} is {levels[index]!r})"
            )
        subscription = "/".join("+" if i == index else lv for i, lv in enumerate(levels))
        problem = check_filter(subscription)
        if problem or "{" in subscription or "}" in subscription:
            raise ValueError(
                f"device pattern {pattern!r}: "
                + (problem or "only {device} may appear in braces")
            )
        self.pattern = pattern
        self.subscription = subscription
        self._levels = subscription.split("/")
        self._index = index
        self._found: dict[str, str | None] = {}  # topic -> device, for the topics seen last

    def device(self, topic: str) -> str | None:
        found = self._found
        try:
            return found[topic]
        except KeyError:
            pass
        if not match_levels(self._levels, topic):
            name: str | None = None
        else:
            name = topic.split("/", self._index + 1)[self._index] or None
        if len(found) >= _DEVICE_CACHE_MAX:
            found.clear()
        found[topic] = name
        return name

    def __repr__(self) -> str:
        return f"DevicePattern({self.pattern!r})"


_DEVICE_CACHE_MAX = 4096  # topics remembered per pattern (a site has one or a few per device)


@functools.lru_cache(maxsize=64)
def _device_pattern(pattern: str) -> DevicePattern:
    return DevicePattern(pattern)


def device_from_topic(pattern: str, topic: str) -> str | None:
    """The ``{device}`` level of ``topic`` under ``pattern`` (see :class:`DevicePattern`), or None
    when the topic does not match. Raises ValueError for a malformed pattern."""
    return _device_pattern(pattern).device(topic)

