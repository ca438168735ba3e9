"""``influx``: InfluxDB line protocol, one line per reading, lines of one topic batched.

    [uplink.encoder]
    type = "influx"
    topic = "telegraf/{gateway}"          # what Telegraf's mqtt_consumer (data_format = "influx")
    measurement = "{device}"              # or a fixed name, e.g. "plant"
    tags = { site = "north" }             # static tags, besides those below
    tag_fields = ["gateway", "source", "device"]

    d1,gateway=gw1,source=plc,device=d1 temp=81.2,hum=40.1,run=true,alarms=3i 1732780000123000000

The line protocol's rules (InfluxDB docs, "Line protocol"): the measurement escapes commas and
spaces; tag keys, tag values and field keys escape commas, equals signs and spaces; string field
values are double-quoted with ``"`` and ``\\`` escaped; integers end in ``i``; booleans are
``true``/``false``; the timestamp is an integer in nanoseconds. A tag with an empty value is
left out (the protocol has no empty tag values); a NaN or infinite float, which it cannot carry,
is left out of the fields (and a reading with no field left is not sent). Newlines cannot be
escaped in any element: they become spaces. A backslash before a separator or at the end of a
measurement, key or tag value cannot be written either (InfluxDB reads it as an escape): "_".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from flux_edge.model import Measurement
from flux_edge.uplink.encoders.base import (
    Encoder,
    EncoderEnv,
    EncoderKind,
    EncoderSpec,
    Message,
    StagedRow,
    readings,
)
from flux_edge.uplink.encoders.numbers import Precision, ns
from flux_edge.uplink.topics import TemplateError, compile_topic

if TYPE_CHECKING:
    from flux_edge.config.kinds import Context
    from flux_edge.config.values import Key
    from flux_edge.uplink.outbox import Row

TOPIC_FIELDS = ("gateway", "source", "device")
TagField = Literal["gateway", "source", "device"]

_MEAS = str.maketrans({",": "\\,", " ": "\\ ", "\n": " ", "\r": " "})
_KEY = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\n": " ", "\r": " "})
_STR = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": " ", "\r": " "})


class InfluxEncoderSpec(EncoderSpec, frozen=True, tag="influx"):
    """``[uplink.encoder] type = "influx"``."""

    topic: Annotated[str, Meta(min_length=1)] = "flux-edge/{gateway}/influx"
    measurement: Annotated[str, Meta(min_length=1)] = "{device}"  # {gateway}/{source}/{device}
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    tag_fields: tuple[TagField, ...] = ("gateway", "source", "device")
    # the quality of each measurement as a string field "<name>_quality" when not good
    quality_fields: bool = False
    batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 100  # lines per publish


# InfluxDB 1.x reads a backslash before a separator as its escape whatever precedes it, so a
# literal backslash there (or at the end of an element) cannot be written: it becomes "_"
_LONE_BACKSLASH = re.compile(r"\\+(?=[ ,=]|$)")


def escape_measurement(s: str) -> str:
    return _LONE_BACKSLASH.sub("_", s).translate(_MEAS)


def escape_key(s: str) -> str:
    return _LONE_BACKSLASH.sub("_", s).translate(_KEY)


def field_value(v: Any) -> str | None:
    """The line-protocol text of a field value; None if the protocol cannot carry it."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if type(v) is int:
        return f"{v}i"
    if type(v) is float:
        return repr(v) if math.isfinite(v) else None
    if isinstance(v, str):
        return '"' + v.translate(_STR) + '"'
    return None


class InfluxEncoder(Encoder):
    def __init__(self, spec: InfluxEncoderSpec, env: EncoderEnv) -> None:
        self._spec = spec
        self._gateway = env.gateway
        self._topic = compile_topic(spec.topic, TOPIC_FIELDS)
        self._meas = compile_topic(spec.measurement, TOPIC_FIELDS)
        self._precision = Precision(env.precision, spec.decimals, spec.precision)
        self.rows_per_publish = spec.batch_max
        self._heads: dict[tuple[str, str], tuple[str, str]] = {}

    def _head(self, source: str, device: str) -> tuple[str, str]:
        key = (source, device)
        got = self._heads.get(key)
        if got is None:
            gw = self._gateway
            fields = {"gateway": gw, "source": source, "device": device}
            meas = escape_measurement(self._meas.render(**fields))
            tags: list[tuple[str, str]] = [
                (t, fields[t]) for t in self._spec.tag_fields if fields[t]
            ]
            # tags sorted by key, as InfluxDB prefers (it sorts them itself otherwise)
            pairs = sorted(
                [(k, v) for k, v in self._spec.tags.items() if v] + tags, key=lambda kv: kv[0]
            )
            head = meas + "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in pairs)
            got = self._heads[key] = (head, self._topic.render(**fields))
            if len(self._heads) > 10_000:
                self._heads.clear()
        return got

    def line(self, reading: Sequence[Measurement]) -> str | None:
        p = self._precision
        fields = []
        qf = self._spec.quality_fields
        for m in reading:
            text = field_value(p.round(m.device, m.name, m.value))
            if text is None:
                continue
            fields.append(f"{escape_key(m.name)}={text}")
            if qf and m.quality != "good":
                fields.append(f'{escape_key(m.name + "_quality")}="{m.quality}"')
        if not fields:
            return None
        first = reading[0]
        head = self._head(first.source, first.device)[0]
        return f"{head} {','.join(fields)} {ns(first.ts)}"

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow]:
        out = []
        for reading in readings(measurements):
            text = self.line(reading)
            if text is not None:
                first = reading[0]
                topic = self._head(first.source, first.device)[1]
                out.append(StagedRow(first.ts, topic, text.encode()))
        return out

    def wire(self, oid: bytes, rows: Sequence[Row]) -> list[Message]:
        return [Message(rows[0].topic, b"\n".join([r.payload for r in rows]))]


def check(ctx: Context, table: dict[str, Any], path: Key) -> None:
    for key in ("topic", "measurement"):
        value = table.get(key)
        if isinstance(value, str):
            try:
                compile_topic(value, TOPIC_FIELDS)
            except TemplateError as exc:
                ctx.report((*path, key), f"{exc} (placeholders: {{gateway}}, {{source}}, "
                           "{device})")
    tags = table.get("tags", {})
    if isinstance(tags, dict):
        for k in tags:
            if k in table.get("tag_fields", ("gateway", "source", "device")):
                ctx.report((*path, "tags", k), f'tag "{k}" is already set from tag_fields',
                           at="key")


def _make(spec: InfluxEncoderSpec, env: EncoderEnv) -> Encoder:
    return InfluxEncoder(spec, env)


KIND = EncoderKind(tag="influx", struct=InfluxEncoderSpec, factory=_make, check=check, rank=20)
