"""Payload and topic templates for actions: a small, safe substitution syntax.

    "site/{device}/alarm"                          -> site/boiler/alarm
    '{{"rule": {rule:json}, "value": {value:json}}}' -> {"rule": "overheat", "value": 82.5}

Placeholders are names from a fixed set (``PLACEHOLDERS``), optionally followed by ``:json``.
``{{`` and ``}}`` are literal braces. There is no code: no expressions, no attribute or item
access, no format specs beyond ``:json``; a template is split once into literal text and field
references and rendering only concatenates. Anything else (an unknown name, a stray brace, an
empty field) is refused by ``compile_template`` with the 1-based column, so it surfaces when the
configuration is loaded, not when the action runs.

Plain rendering: strings as they are, booleans ``true``/``false``, numbers in their shortest
form (``82.5``, ``3``), a missing value (a command without a cause measurement) as the empty
string. ``:json`` renders a JSON value: strings quoted and escaped, numbers, booleans, ``null``
for a missing value (a non-finite float also becomes ``null``: JSON has no NaN), so a JSON
payload stays valid whatever a device sends.

``ts`` is the cause measurement's time as ISO 8601 UTC with milliseconds
(``2026-11-28T07:00:00.123Z``), or the command's time without a cause.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from flux_edge.errors import FluxError
from flux_edge.model import Command, Value

__all__ = [
    "PLACEHOLDERS",
    "Template",
    "TemplateError",
    "command_context",
    "compile_template",
    "iso_utc",
]

#: the names a template may use
PLACEHOLDERS: Final = ("device", "name", "value", "unit", "quality", "rule", "action", "ts")
_FORMATS: Final = ("json",)
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_][A-Za-z0-9_]*))?\Z")

Context = Mapping[str, Value | None]


class TemplateError(FluxError, ValueError):
    """A template is malformed. ``column`` is the 1-based position of the problem.

    Also a ValueError (callers that catch ValueError keep working)."""

    def __init__(self, message: str, column: int) -> None:
        self.column = column
        super().__init__(f"{message} (column {column})")
        self.message = message


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    json: bool


class Template:
    """A compiled template. ``render`` never raises for any context values."""

    __slots__ = ("_parts", "names", "text")

    def __init__(self, text: str, parts: tuple[str | _Field, ...]) -> None:
        self.text = text
        self._parts = parts
        #: the placeholder names used
        self.names = frozenset(p.name for p in parts if isinstance(p, _Field))

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    @property
    def parts(self) -> tuple[str | _Field, ...]:
        """Literal text (braces unescaped) and fields, in order."""
        return self._parts

    @property
    def static(self) -> bool:
        """True when the template has no placeholders."""
        return not self.names

    def render(self, context: Context) -> str:
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = context.get(part.name)
                out.append(_json(value) if part.json else _plain(value))
        return "".join(out)


def _plain(value: Value | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if not value.is_integer() or abs(value) >= 1e16 else str(int(value))
    return str(value)


def _json(value: Value | None) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(value, ensure_ascii=False)


def compile_template(
    text: str,
    placeholders: Sequence[str] = PLACEHOLDERS,
    formats: Sequence[str] = _FORMATS,
) -> Template:
    """Split ``text`` into literal parts and fields. Raises ``TemplateError`` (with the column)
    for an unknown placeholder or format, an unclosed ``{``, a stray ``}`` or an empty field.

    ``placeholders`` are the names allowed and ``formats`` the ``:format`` suffixes (none: a
    field is ``{name}`` only); the defaults are those of action templates. Uplink topics use the
    same syntax with their own names and no formats (``flux_edge.uplink.topics``)."""
    parts: list[str | _Field] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "{":
            if text.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError(
                    "'{' is not closed by '}' (write '{{' for a literal brace)", i + 1
                )
            inner = text[i + 1 : end]
            m = _FIELD.match(inner)
            if m is None:
                raise TemplateError(_not_a_field(inner, placeholders, formats), i + 1)
            name, fmt = m.group(1), m.group(2)
            if name not in placeholders:
                raise TemplateError(
                    f"unknown placeholder {{{name}}}: known are "
                    + ", ".join("{" + p + "}" for p in placeholders),
                    i + 2,
                )
            if fmt is not None and fmt not in formats:
                raise TemplateError(
                    f"unknown format {fmt!r} in {{{inner}}}: "
                    + (
                        "the only format is " + " or ".join(repr(f) for f in formats)
                        if formats
                        else f"no format is allowed here, write {{{name}}}"
                    ),
                    i + 2 + len(name) + 1,
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Field(name, fmt == "json"))
            i = end + 1
        elif c == "}":
            if text.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError("'}' without '{' (write '}}' for a literal brace)", i + 1)
        else:
            j = i + 1
            while j < n and text[j] not in "{}":
                j += 1
            literal.append(text[i:j])
            i = j
    if literal:
        parts.append("".join(literal))
    return Template(text, tuple(parts))


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _not_a_field(inner: str, placeholders: Sequence[str], formats: Sequence[str]) -> str:
    """The message for ``{inner}`` that is not ``name`` or ``name:format``."""
    if not inner:
        what = "an empty field"
    else:
        what = f"{{{inner}}} is not a placeholder"
        m = _NAME.match(inner)
        rest = inner[m.end() :] if m else ""
        if inner[0].isdigit():
            what += " (positional fields are not supported)"
        elif rest[:1] == "!":
            what += f" (no conversions like {rest!r})"
        elif rest[:1] == ":":
            what += f" (no format specs like {rest!r})"
        elif rest[:1] in (".", "["):
            what += " (no attribute or index access)"
    usage = " or ".join(["{name}", *("{name:" + f + "}" for f in formats)])
    return (
        f"{what}: use {usage} with name one of "
        + ", ".join(placeholders)
        + "; write '{{' and '}}' for literal braces"
        + (" (JSON payloads)" if "json" in formats else "")
    )


_iso_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def iso_utc(ts: float) -> str:
    """Unix seconds -> ``2026-11-28T07:00:00.123Z`` (milliseconds truncated, as datetime's
    microseconds // 1000). Every command and audit record needs one: the text of the second is
    kept, so most calls only format the milliseconds."""
    try:
        frac, whole = math.modf(ts)
        us = round(frac * 1e6)  # datetime.fromtimestamp's own rounding
        sec = int(whole)
    except (OverflowError, ValueError):
        return ""
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    cached = _iso_second
    if cached[0] != sec:
        try:
            text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        except (OverflowError, OSError, ValueError):
            return ""
        cached[0], cached[1] = sec, text
    return f"{cached[1]}{us // 1000:03d}Z"


def command_context(cmd: Command) -> dict[str, Value | None]:
    """The placeholder values for ``cmd``: its cause measurement's fields (None without one)."""
    m = cmd.cause
    return {
        "device": m.device if m else None,
        "name": m.name if m else None,
        "value": m.value if m else None,
        "unit": m.unit if m else None,
        "quality": m.quality if m else None,
        "rule": cmd.rule,
        "action": cmd.action,
        "ts": iso_utc(m.ts if m else cmd.ts),
    }
