"""``thingsboard``: the ThingsBoard gateway MQTT API (flux-edge connects as a gateway device).

    [uplink]
    host = "thingsboard.example"
    username = "<the gateway device's access token>"
    [uplink.encoder]
    type = "thingsboard"
    device_type = "default"             # the ThingsBoard device profile of new devices
    attribute_names = ["firmware"]      # measurements sent as client attributes, not telemetry
    commands = { toggle_pump = "pump_on" }   # RPC method -> action

- ``v1/gateway/connect`` ``{"device": "boiler", "type": "default"}`` before a device's first
  message of a session (and for every device alive at each reconnect);
- ``v1/gateway/telemetry`` ``{"boiler": [{"ts": 1732780000123, "values": {"temp": 81.2}}]}``
  (readings of one publish merged: several devices, several readings each, in order);
- ``v1/gateway/attributes`` ``{"boiler": {"firmware": "1.2"}}``;
- ``v1/gateway/disconnect`` ``{"device": "boiler"}`` when its measurements all turn bad;
- RPC: ``v1/gateway/rpc`` ``{"device": "boiler", "data": {"id": 1, "method": "toggle_pump",
  "params": {...}}}`` runs the action mapped by ``commands`` through the safety layer and is
  answered on ``v1/gateway/rpc`` with ``{"device": "boiler", "id": 1, "data": {"success": true}}``
  (or ``"success": false, "error": "<why>", "status": "denied|unknown|failed"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from flux_edge.model import Measurement
from flux_edge.uplink.commands import CommandResult, UpstreamCommand
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
    from flux_edge.uplink.outbox import Row

CONNECT = "v1/gateway/connect"
DISCONNECT = "v1/gateway/disconnect"
TELEMETRY = "v1/gateway/telemetry"
ATTRIBUTES = "v1/gateway/attributes"
RPC = "v1/gateway/rpc"


class ThingsBoardEncoderSpec(EncoderSpec, frozen=True, tag="thingsboard"):
    """``[uplink.encoder] type = "thingsboard"``."""

    device_type: Annotated[str, Meta(min_length=1)] = "default"
    attribute_names: tuple[str, ...] = ()
    batch_max: Annotated[int, Meta(ge=1, le=1000)] = 50  # readings per telemetry publish


class ThingsBoardEncoder(Encoder):
    commands = True

    def __init__(self, spec: ThingsBoardEncoderSpec, env: EncoderEnv) -> None:
        self._type = spec.device_type
        self._attrs = frozenset(spec.attribute_names)
        self._precision = Precision(env.precision, spec.decimals, spec.precision)
        self.rows_per_publish = spec.batch_max
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder()
        self.known: dict[str, None] = {}  # devices seen, in order
        self.dead: set[str] = set()
        self.connected: set[str] = set()  # this session

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow]:
        out = []
        p = self._precision
        enc = self._enc.encode
        for reading in readings(measurements):
            first = reading[0]
            d = first.device
            if all(m.quality == "bad" for m in reading):
                out.append(StagedRow(first.ts, DISCONNECT, enc({"device": d})))
                continue
            values = {m.name: p.round(d, m.name, m.value) for m in reading
                      if m.quality != "bad" and m.name not in self._attrs}
            attrs = {m.name: p.round(d, m.name, m.value) for m in reading
                     if m.quality != "bad" and m.name in self._attrs}
            if values:
                out.append(StagedRow(first.ts, TELEMETRY,
                                     enc({d: [{"ts": ms(first.ts), "values": values}]})))
            if attrs:
                out.append(StagedRow(first.ts, ATTRIBUTES, enc({d: attrs})))
        return out

    def _connect(self, device: str) -> Message:
        self.connected.add(device)
        return Message(CONNECT, self._enc.encode({"device": device, "type": self._type}))

    def wire(self, oid: bytes, rows: Sequence[Row]) -> list[Message]:
        topic = rows[0].topic
        out: list[Message] = []
        if topic == DISCONNECT:
            for r in rows:
                device = self._dec.decode(r.payload)["device"]
                self.dead.add(device)
                if device in self.connected:
                    self.connected.discard(device)
                    out.append(Message(DISCONNECT, r.payload))
            return out
        merged: dict[str, Any] = {}
        for r in rows:
            for device, body in self._dec.decode(r.payload).items():
                if device not in self.connected:
                    out.append(self._connect(device))
                self.known[device] = None
                self.dead.discard(device)
                if topic == TELEMETRY:
                    merged.setdefault(device, []).extend(body)
                else:
                    merged.setdefault(device, {}).update(body)
        out.append(Message(topic, self._enc.encode(merged)))
        return out

    def on_connect(self) -> list[Message]:
        self.connected = set()
        return [self._connect(d) for d in self.known if d not in self.dead]

    def on_disconnect(self) -> None:
        self.connected = set()

    def on_close(self) -> list[Message]:
        return [Message(DISCONNECT, self._enc.encode({"device": d})) for d in self.connected]

    def subscriptions(self) -> list[str]:
        return [RPC]

    def on_message(self, topic: str, payload: bytes) -> UpstreamCommand | None:
        try:
            msg = self._dec.decode(payload)
        except msgspec.DecodeError:
            return None
        if not isinstance(msg, dict) or not isinstance(msg.get("data"), dict):
            return None
        device = str(msg.get("device", ""))
        data = msg["data"]
        rpc_id = data.get("id")
        method = str(data.get("method", ""))
        params = data.get("params")
        params = params if isinstance(params, dict) else {"value": params}
        enc = self._enc.encode

        def reply(result: CommandResult) -> list[Message]:
            body: dict[str, Any] = {"success": result.ok}
            if not result.ok:
                body["error"] = result.reason
                body["status"] = result.status
            if result.verified is not None:
                body["verified"] = result.verified
            return [Message(RPC, enc({"device": device, "id": rpc_id, "data": body}), False, 1)]

        return UpstreamCommand("thingsboard", method, device, params, reply)


def _make(spec: ThingsBoardEncoderSpec, env: EncoderEnv) -> Encoder:
    return ThingsBoardEncoder(spec, env)


KIND = EncoderKind(tag="thingsboard", struct=ThingsBoardEncoderSpec, factory=_make, rank=40)
