"""``sparkplug_b``: Eclipse Sparkplug B 3.0 edge node.

    [uplink.encoder]
    type = "sparkplug_b"
    group_id = "plant1"
    edge_node = ""          # default: the gateway name (daemon.name)

Topics ``spBv1.0/{group_id}/{NBIRTH|NDATA|NDEATH|NCMD}/{edge_node}`` and
``spBv1.0/{group_id}/{DBIRTH|DDATA|DDEATH|DCMD}/{edge_node}/{device}``; payloads are the
specification's protobuf ``Payload`` (``sparkplug_b.proto``), written by ``spb_proto.py``
from the schema in the specification (no library: the part we write is five fields of two
messages; a generated-code library would pull in protobuf's runtime for that).

What an edge node must do, and where it is done:

- NDEATH is the MQTT will (QoS 1, not retained) carrying ``bdSeq``; NBIRTH carries the same
  ``bdSeq`` and ``Node Control/Rebirth``. bdSeq (0-255) is kept in
  ``<state_dir>/sparkplug-<group>-<node>.bdseq`` and moves on at every start of the daemon. The
  MQTT client sets its will once, so reconnects within one run reuse that run's bdSeq (the
  NBIRTH and NDEATH of every session still match).
- ``seq`` 0-255: NBIRTH is 0, every later NDATA/DBIRTH/DDATA/DDEATH of the session the next
  value, wrapping after 255. It is set when a message is sent, not when it is stored, so a
  backlog sent after a reconnect follows the new NBIRTH in sequence.
- A DBIRTH per device with every metric known for it (name, alias, datatype, last value),
  before its first DDATA of the session and again when a metric appears that its birth did not
  have; DDATA carries aliases only. Readings older than the session's start (a backlog) are
  marked ``is_historical``.
- A reading whose measurements are all ``bad`` (the runtime re-sends a silent device's values so)
  is a DDEATH; the next good reading is a DBIRTH again.
- NCMD ``Node Control/Rebirth = true``: NBIRTH and every DBIRTH again (``on_message``).

QoS as the specification asks: NBIRTH, DBIRTH and DDEATH 0, NDEATH (the will) 1; DDATA at
``uplink.qos`` (0 conforms strictly; the default 1 keeps what the broker had not acknowledged
when a link died, and such a message may then arrive once before the new NBIRTH).

Datatypes: bool -> Boolean (11), int -> Int64 (4), float -> Double (10), str -> String (12).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from flux_edge.config.values import NAME
from flux_edge.model import Measurement, Value
from flux_edge.uplink.commands import UpstreamCommand
from flux_edge.uplink.encoders import spb_proto as pb
from flux_edge.uplink.encoders.base import (
    Encoder,
    EncoderEnv,
    EncoderKind,
    EncoderSpec,
    Message,
    StagedRow,
    readings,
)
from flux_edge.uplink.encoders.numbers import Precision, ms

if TYPE_CHECKING:
    from flux_edge.config.kinds import Context
    from flux_edge.config.values import Key
    from flux_edge.uplink.outbox import Row

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
_DATA, _DEATH = 0, 1


class SparkplugEncoderSpec(EncoderSpec, frozen=True, kw_only=True, tag="sparkplug_b"):
    """``[uplink.encoder] type = "sparkplug_b"``."""

    group_id: Annotated[str, Meta(min_length=1), NAME]
    edge_node: Annotated[str, NAME] = ""  # default: the gateway name


def datatype(v: Value) -> int:
    if isinstance(v, bool):
        return pb.BOOLEAN
    if isinstance(v, int):
        return pb.INT64
    if isinstance(v, float):
        return pb.DOUBLE
    return pb.STRING


def _bdseq_next(path: Path) -> int:
    """The bdSeq of this run: one more than the last run's (0 the first time), saved."""
    last = -1
    with contextlib.suppress(OSError, ValueError):
        last = int(path.read_text().strip())
    value = (last + 1) % 256
    with contextlib.suppress(OSError):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, path)
    return value


class SparkplugEncoder(Encoder):
    commands = True

    def __init__(self, spec: SparkplugEncoderSpec, env: EncoderEnv,
                 clock: Any = time.time) -> None:
        self.group = spec.group_id
        self.node = spec.edge_node or env.gateway
        base = f"{NAMESPACE}/{self.group}"
        self.t_nbirth = f"{base}/NBIRTH/{self.node}"
        self.t_ndeath = f"{base}/NDEATH/{self.node}"
        self.t_ncmd = f"{base}/NCMD/{self.node}"
        self.t_dcmd = f"{base}/DCMD/{self.node}/+"
        self._base = base
        self._precision = Precision(env.precision, spec.decimals, spec.precision)
        self._clock = clock
        state = Path(env.state_dir) if env.state_dir else None
        self.bdseq = _bdseq_next(state / f"sparkplug-{self.group}-{self.node}.bdseq") \
            if state is not None and state.is_dir() else 0
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder()
        # across sessions: what each device has (alias, datatype, last value), in order
        self.aliases: dict[tuple[str, str], int] = {}
        self.last: dict[str, dict[str, Value]] = {}
        self.dead: set[str] = set()
        # per session
        self.seq = 0
        self.born: dict[str, frozenset[str]] = {}
        self.session_start = 0.0

    # --- storing ----------------------------------------------------------------------------

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow]:
        out = []
        p = self._precision
        for reading in readings(measurements):
            first = reading[0]
            topic = f"{self._base}/DDATA/{self.node}/{first.device}"
            if all(m.quality == "bad" for m in reading):
                payload = self._enc.encode([ms(first.ts), _DEATH, []])
            else:
                metrics = [[m.name, p.round(m.device, m.name, m.value)] for m in reading
                           if m.quality != "bad"]
                payload = self._enc.encode([ms(first.ts), _DATA, metrics])
            out.append(StagedRow(first.ts, topic, payload))
        return out

    # --- sending ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _alias(self, device: str, name: str) -> int:
        key = (device, name)
        alias = self.aliases.get(key)
        if alias is None:
            alias = self.aliases[key] = len(self.aliases) + 1  # 0 is never used
        return alias

    def _dbirth(self, device: str, now_ms: int) -> Message:
        values = self.last.get(device, {})
        metrics = [
            pb.Metric(name=n, alias=self._alias(device, n), datatype=datatype(v), value=v,
                      timestamp=now_ms)
            for n, v in values.items()
        ]
        self.born[device] = frozenset(values)
        payload = pb.payload(now_ms, self._next_seq(), metrics)
        return Message(f"{self._base}/DBIRTH/{self.node}/{device}", payload, False, 0)

    def wire(self, oid: bytes, rows: Sequence[Row]) -> list[Message]:
        row = rows[0]
        device = row.topic.rsplit("/", 1)[1]
        ts_ms, kind, metrics = self._dec.decode(row.payload)
        now_ms = int(self._clock() * 1000)
        if kind == _DEATH:
            self.dead.add(device)
            if device not in self.born:
                return []
            del self.born[device]
            payload = pb.payload(now_ms, self._next_seq(), [])
            return [Message(f"{self._base}/DDEATH/{self.node}/{device}", payload, False, 0)]
        self.dead.discard(device)
        values = self.last.setdefault(device, {})
        out: list[Message] = []
        born = self.born.get(device)
        new = [n for n, _v in metrics if born is None or n not in born]
        for n, v in metrics:
            old = values.get(n)
            if old is not None and datatype(old) != datatype(v):
                new.append(n)  # a datatype change needs a new birth
            values[n] = v
        if born is None or new:
            out.append(self._dbirth(device, now_ms))
        historical = ts_ms < self.session_start * 1000 - 1000
        aliases = self.aliases
        data = [
            pb.data_metric(aliases[(device, n)], datatype(v), v, historical)
            for n, v in metrics
        ]  # every name has its alias: the birth above gave it
        out.append(Message(row.topic, pb.data_payload(ts_ms, self._next_seq(), data)))
        return out

    def will(self) -> Message:
        metric = pb.Metric(name="bdSeq", datatype=pb.UINT64, value=self.bdseq)
        return Message(self.t_ndeath, pb.payload(None, None, [metric]), False, 1)

    def on_connect(self) -> list[Message]:
        """NBIRTH (seq 0, bdSeq, Node Control/Rebirth), then a DBIRTH per device alive."""
        now = self._clock()
        now_ms = int(now * 1000)
        self.session_start = now
        self.seq = 0
        self.born = {}
        metrics = [
            pb.Metric(name="bdSeq", datatype=pb.UINT64, value=self.bdseq, timestamp=now_ms),
            pb.Metric(name=REBIRTH, datatype=pb.BOOLEAN, value=False, timestamp=now_ms),
        ]
        out = [Message(self.t_nbirth, pb.payload(now_ms, 0, metrics), False, 0)]
        for device in self.last:
            if device not in self.dead:
                out.append(self._dbirth(device, now_ms))
        return out

    def on_disconnect(self) -> None:
        self.born = {}

    def on_close(self) -> list[Message]:
        """A clean DISCONNECT suppresses the will, so NDEATH is sent by hand first."""
        return [self.will()]

    def subscriptions(self) -> list[str]:
        return [self.t_ncmd, self.t_dcmd]

    def on_message(self, topic: str, payload: bytes) -> str | UpstreamCommand | None:
        """What an upstream message asks: "rebirth" (NCMD Node Control/Rebirth = true), or a
        command: an NCMD/DCMD metric by name (or by the alias its birth gave it), its value
        passed as ``value``; the device from the DCMD topic. One command per message (its
        first metric); the protocol has no replies, so the outcome is logged, audited and
        counted."""
        try:
            decoded = pb.decode_payload(payload)
        except ValueError:
            return None
        metrics = decoded.get("metrics", [])
        if topic == self.t_ncmd:
            for m in metrics:
                if m.get("name") == REBIRTH and m.get("value") is True:
                    return "rebirth"
            device = ""
        else:
            device = topic.rsplit("/", 1)[1]
        for m in metrics:
            name = m.get("name")
            if not name and "alias" in m:
                name = next((n for (d, n), a in self.aliases.items()
                             if a == m["alias"] and d == device), None)
            if name:
                return UpstreamCommand("sparkplug_b", name, device, {"value": m.get("value")})
        return None


def check(ctx: Context, table: dict[str, Any], path: Key) -> None:
    for key in ("group_id", "edge_node"):
        value = table.get(key)
        if isinstance(value, str) and any(c in value for c in "/+#"):
            ctx.report((*path, key), "a Sparkplug id cannot contain /, + or #")


def _make(spec: SparkplugEncoderSpec, env: EncoderEnv) -> Encoder:
    return SparkplugEncoder(spec, env)


KIND = EncoderKind(tag="sparkplug_b", struct=SparkplugEncoderSpec, factory=_make, check=check,
                   rank=30)
