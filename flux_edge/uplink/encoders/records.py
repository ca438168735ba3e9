"""``records``: the uplink's own format, one JSON record per measurement (or an array of those
with ``uplink.format = "batch"``), unchanged; the default when ``[uplink.encoder]`` is absent.

    {"id":"<outbox_id>-<seq>","seq":<seq>,"gateway":...,"device":...,"name":...,"value":...,
     "ts":...,"unit":...,"quality":...,"source":...}

Topics come from ``uplink.topic``. Values are rounded at their declared precision
(``numbers.py``) before the outbox encodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from flux_edge.model import Measurement
from flux_edge.uplink.encoders.base import (
    Encoder,
    EncoderEnv,
    EncoderKind,
    EncoderSpec,
    Message,
    StagedRow,
)
from flux_edge.uplink.encoders.numbers import Precision

if TYPE_CHECKING:
    from flux_edge.uplink.outbox import Row


class RecordsEncoderSpec(EncoderSpec, frozen=True, tag="records"):
    """``[uplink.encoder] type = "records"``: no options besides the common ones."""


def _record(oid: bytes, row: Row) -> bytes:
    s = str(row.seq).encode()
    return b'{"id":"' + oid + b"-" + s + b'","seq":' + s + b"," + row.payload


class RecordsEncoder(Encoder):
    def __init__(self, spec: RecordsEncoderSpec, env: EncoderEnv, *, batch: bool = False,
                 batch_max: int = 100) -> None:
        self._precision = Precision(env.precision, spec.decimals, spec.precision)
        self._declared = env.precision
        self._identity = spec.decimals < 0 and not spec.precision
        self.batch = batch
        self.rows_per_publish = batch_max if batch else 1

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow] | None:
        return None  # the outbox encodes records itself

    def prepare(self, measurements: Sequence[Measurement]) -> Sequence[Measurement]:
        """The measurements with floats at their declared precision."""
        if self._identity and not self._declared:
            return measurements
        p = self._precision
        out: list[Measurement] = []
        for m in measurements:
            v = p.round(m.device, m.name, m.value)
            out.append(m if v is m.value else msgspec.structs.replace(m, value=v))
        return out

    def wire(self, oid: bytes, rows: Sequence[Row]) -> list[Message]:
        if len(rows) == 1 and not self.batch:
            return [Message(rows[0].topic, _record(oid, rows[0]))]
        return [Message(rows[0].topic, b"[" + b",".join([_record(oid, r) for r in rows]) + b"]")]


def _make(spec: RecordsEncoderSpec, env: EncoderEnv) -> Encoder:
    return RecordsEncoder(spec, env)


KIND = EncoderKind(tag="records", struct=RecordsEncoderSpec, factory=_make, rank=0)
