"""``json``: one JSON message per reading, shaped by a template.

    [uplink.encoder]
    type = "json"
    topic = "up/{device}"
    exclude = ["seq"]                      # names left out of {values}/{units}/{qualities}
    template = { device = "{device}", ts = "{ts}", seq = "{values.seq}", metrics = "{values}" }

gives, for a poll of d1 with temp, hum and a passed-through seq, on ``up/d1``::

    {"device":"d1","ts":1732780000.123,"seq":123,"metrics":{"temp":81.2,"hum":40.1}}

A string that is one placeholder becomes the typed value; a string with text around
placeholders becomes text. Placeholders (``PLACEHOLDERS``): ``{device}``, ``{source}``,
``{gateway}``, ``{ts}`` (the reading's own timestamp in seconds, exactly as received),
``{ts_ms}``, ``{ts_iso}`` (RFC 3339, UTC), ``{quality}`` (the worst of the reading),
``{values}``, ``{units}``, ``{qualities}`` (objects by measurement name), and
``{values.NAME}``, ``{units.NAME}``, ``{qualities.NAME}`` (one measurement; ``null`` when the
reading does not have it). Other values (numbers, booleans, arrays, tables) are copied.
Everything is checked at check-config, at the key path of the string.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from flux_edge.model import Measurement
from flux_edge.uplink.encoders.base import (
    Encoder,
    EncoderEnv,
    EncoderKind,
    EncoderSpec,
    StagedRow,
    readings,
)
from flux_edge.uplink.encoders.numbers import Precision, ms
from flux_edge.uplink.topics import TemplateError, compile_topic

if TYPE_CHECKING:
    from flux_edge.config.kinds import Context
    from flux_edge.config.values import Key

TOPIC_FIELDS = ("gateway", "source", "device")
PLACEHOLDERS = ("device", "source", "gateway", "ts", "ts_ms", "ts_iso", "quality",
                "values", "units", "qualities")
_GROUPS = ("values", "units", "qualities")
_PH = re.compile(r"\{([^{}]*)\}")
_RANK = {"good": 0, "stale": 1, "bad": 2}

DEFAULT_TEMPLATE: dict[str, Any] = {
    "device": "{device}", "ts": "{ts}", "metrics": "{values}",
}


class JsonEncoderSpec(EncoderSpec, frozen=True, tag="json"):
    """``[uplink.encoder] type = "json"``."""

    # {gateway}, {source}, {device}
    topic: Annotated[str, Meta(min_length=1)] = "flux-edge/{gateway}/{device}"
    template: dict[str, Any] = msgspec.field(default_factory=lambda: dict(DEFAULT_TEMPLATE))
    exclude: tuple[str, ...] = ()  # measurement names left out of {values}, {units}, {qualities}


Ctx = tuple[Sequence[Measurement], dict[str, Measurement], str]
Part = Callable[[Ctx], Any]


class _Problem(Exception):
    def __init__(self, message: str, column: int = 0) -> None:
        super().__init__(message)
        self.column = column


def _placeholder(expr: str, gateway_: list[str], exclude: frozenset[str]) -> Part:
    """One placeholder's getter; raises _Problem for an unknown one."""
    if expr in ("device", "source"):
        return (lambda c: c[0][0].device) if expr == "device" else (lambda c: c[0][0].source)
    if expr == "gateway":
        return lambda c: c[2]
    if expr == "ts":
        return lambda c: c[0][0].ts
    if expr == "ts_ms":
        return lambda c: ms(c[0][0].ts)
    if expr == "ts_iso":
        return lambda c: _dt.datetime.fromtimestamp(c[0][0].ts, _dt.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
    if expr == "quality":
        return lambda c: max((m.quality for m in c[0]), key=_RANK.__getitem__)
    if expr in _GROUPS:
        attr = {"values": "value", "units": "unit", "qualities": "quality"}[expr]
        return lambda c: {m.name: getattr(m, attr) for m in c[0] if m.name not in exclude}
    group, dot, name = expr.partition(".")
    if dot and group in _GROUPS and name:
        attr = {"values": "value", "units": "unit", "qualities": "quality"}[group]

        def one(c: Ctx, name: str = name, attr: str = attr) -> Any:
            m = c[1].get(name)
            return None if m is None else getattr(m, attr)
        return one
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    raise _Problem(f"unknown placeholder {{{expr}}}; known: {known}, {{values.NAME}}, "
                   "{units.NAME}, {qualities.NAME}")


def _compile_string(text: str, gw: list[str], exclude: frozenset[str]) -> Any:
    matches = list(_PH.finditer(text))
    if "{" not in text and "}" not in text:
        return text
    if len(matches) == 1 and matches[0].span() == (0, len(text)):
        return _placeholder(matches[0].group(1), gw, exclude)
    parts: list[str | Part] = []
    pos = 0
    for mt in matches:
        lit = text[pos:mt.start()]
        if "{" in lit or "}" in lit:
            raise _Problem("unbalanced brace", pos + 1)
        if lit:
            parts.append(lit)
        if mt.group(1) in _GROUPS:
            raise _Problem(f"{{{mt.group(1)}}} is an object: use it as the whole string",
                           mt.start() + 1)
        try:
            parts.append(_placeholder(mt.group(1), gw, exclude))
        except _Problem as exc:
            raise _Problem(str(exc), mt.start() + 1) from None
        pos = mt.end()
    tail = text[pos:]
    if "{" in tail or "}" in tail:
        raise _Problem("unbalanced brace", pos + 1)
    if tail:
        parts.append(tail)

    def joined(c: Ctx) -> str:
        return "".join(p if isinstance(p, str) else _text(p(c)) for p in parts)
    return joined


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def compile_shape(template: Any, exclude: frozenset[str] = frozenset(),
                  path: tuple[str | int, ...] = (),
                  problems: list[tuple[tuple[str | int, ...], str, int]] | None = None) -> Part:
    """The template as one getter. Problems are appended as (path below the template, message,
    1-based column in the string or 0); without a list the first one raises ValueError."""
    gw: list[str] = []
    if isinstance(template, dict):
        items = [(k, compile_shape(v, exclude, (*path, k), problems)) for k, v in template.items()]
        return lambda c: {k: p(c) for k, p in items}
    if isinstance(template, list):
        elems = [compile_shape(v, exclude, (*path, i), problems) for i, v in enumerate(template)]
        return lambda c: [p(c) for p in elems]
    if isinstance(template, str):
        try:
            got = _compile_string(template, gw, exclude)
        except _Problem as exc:
            if problems is None:
                raise ValueError(f"{'.'.join(map(str, path))}: {exc}") from None
            problems.append((path, str(exc), exc.column))
            return lambda c: None
        if callable(got):
            part: Part = got
            return part
        return _const(template)
    return _const(template)


def _const(v: Any) -> Part:
    return lambda c: v


class JsonEncoder(Encoder):
    def __init__(self, spec: JsonEncoderSpec, env: EncoderEnv) -> None:
        self._shape = compile_shape(spec.template, frozenset(spec.exclude))
        self._topic = compile_topic(spec.topic, TOPIC_FIELDS)
        self._gateway = env.gateway
        self._precision = Precision(env.precision, spec.decimals, spec.precision)
        self._enc = msgspec.json.Encoder()
        self._topics: dict[tuple[str, str], str] = {}

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow]:
        out: list[StagedRow] = []
        p = self._precision
        gw = self._gateway
        for reading in readings(measurements):
            first = reading[0]
            rounded = [
                m if type(m.value) is not float
                else msgspec.structs.replace(m, value=p.round(m.device, m.name, m.value))
                for m in reading
            ]
            by_name = {m.name: m for m in rounded}
            payload = self._enc.encode(self._shape((rounded, by_name, gw)))
            key = (first.source, first.device)
            topic = self._topics.get(key)
            if topic is None:
                topic = self._topics[key] = self._topic.render(
                    gateway=gw, source=first.source, device=first.device)
            out.append(StagedRow(first.ts, topic, payload))
        return out


def check(ctx: Context, table: dict[str, Any], path: Key) -> None:
    topic = table.get("topic")
    if isinstance(topic, str):
        try:
            compile_topic(topic, TOPIC_FIELDS)
        except TemplateError as exc:
            ctx.report((*path, "topic"), f"{exc} (placeholders: {{gateway}}, {{source}}, "
                       "{device})")
    template = table.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, dict):
        return
    problems: list[tuple[tuple[str | int, ...], str, int]] = []
    compile_shape(template, frozenset(), (), problems)
    for sub, message, column in problems:
        where = (*path, "template", *sub)
        if column:
            ctx.report_in_string(where, message, column)
        else:
            ctx.report(where, message)


def _make(spec: JsonEncoderSpec, env: EncoderEnv) -> Encoder:
    return JsonEncoder(spec, env)


KIND = EncoderKind(tag="json", struct=JsonEncoderSpec, factory=_make, check=check, rank=10)
