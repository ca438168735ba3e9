"""Uplink topic templates: ``flux/{gateway}/{device}/{name}``.

The syntax is that of action templates (``flux_edge.actions.templates``, the one template
compiler), restricted: literal text plus ``{name}`` placeholders from ``UPLINK_TOPIC_FIELDS``;
``{{`` and ``}}`` are literal braces. No format specs (``{device:>12}``), no conversions
(``{name!r}``), no attribute or index access (``{device.x}``, ``{device[0]}``), no positional
fields (``{0}``): each is refused with its 1-based column, when the configuration is checked.

A compiled ``TopicTemplate`` renders with one ``str.format`` call on a format string built from
the checked parts (literal braces re-escaped), so the hot path costs what it did when topics were
``str.format`` templates, and gives the same text for every template this syntax accepts.

Pure: imports nothing but the template compiler (flux_edge.config imports this module).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

from flux_edge.actions.templates import TemplateError, compile_template

__all__ = [
    "UPLINK_TOPIC_FIELDS",
    "TemplateError",
    "TopicTemplate",
    "check_uplink_topic",
    "compile_topic",
]

#: the placeholders of ``uplink.topic`` and ``uplink.status_topic``
UPLINK_TOPIC_FIELDS: Final = ("gateway", "source", "device", "name")


class TopicTemplate:
    """A compiled topic template. ``render`` takes a value (a string) for each name in
    ``names`` as a keyword argument; others are ignored."""

    __slots__ = ("_format", "names", "text")

    def __init__(self, text: str, format_text: str, names: frozenset[str]) -> None:
        self.text = text
        self._format = format_text
        #: the placeholder names used
        self.names = names

    def __repr__(self) -> str:
        return f"TopicTemplate({self.text!r})"

    def render(self, **fields: str) -> str:
        return self._format.format(**fields)


def compile_topic(text: str, fields: Sequence[str] = UPLINK_TOPIC_FIELDS) -> TopicTemplate:
    """Compile ``text`` with placeholders from ``fields``. Raises ``TemplateError`` (with the
    1-based column) for anything but literal text, ``{name}`` and ``{{``/``}}``."""
    template = compile_template(text, fields, ())
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part.replace("{", "{{").replace("}", "}}"))
        else:
            out.append("{" + part.name + "}")
    return TopicTemplate(text, "".join(out), template.names)


def check_uplink_topic(value: str) -> str | None:
    """The problem with ``value`` as an uplink publish topic template, None when it is good.

    The message names the column of a bad placeholder; a publish topic has no wildcards."""
    try:
        compile_topic(value)
    except TemplateError as exc:
        return f"{_shown(value)}: {exc}"
    if "+" in value or "#" in value:
        return f"{_shown(value)}: a publish topic cannot contain the wildcards + or #"
    return None


def _shown(value: str) -> str:
    return json.dumps(value if len(value) <= 40 else value[:37] + "...", ensure_ascii=False)
