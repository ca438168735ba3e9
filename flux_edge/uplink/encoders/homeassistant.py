"""``homeassistant``: Home Assistant MQTT discovery.

    [uplink]
    host = "homeassistant.local"
    status_topic = "flux-edge/{gateway}/status"      # the daemon's availability (its will)
    [uplink.encoder]
    type = "homeassistant"
    discovery_prefix = "homeassistant"
    base_topic = "flux-edge/{gateway}"
    device_classes = { "boiler.flow" = "volume_flow_rate" }
    switches = { "boiler.pump" = { on = "pump_on", off = "pump_off" } }

For every measurement a retained config message on
``<discovery_prefix>/<component>/<gateway>_<device>/<name>/config`` (component ``sensor``,
``binary_sensor`` for booleans, ``switch`` for ``switches``) before its first state, and again
at every reconnect. It holds ``name``, ``unique_id``, ``object_id``, ``state_topic``,
``value_template``, the ``device`` block (``identifiers``, ``name``, ``manufacturer``, ``model``,
``via_device``), ``availability`` (the daemon's status topic and the device's own, mode
``all``), and ``unit_of_measurement``, ``device_class`` and ``state_class`` where known (from the
unit: degC -> temperature in °C, W power, kWh energy (total_increasing), V, A, Pa/hPa/bar, Hz,
% humidity when the name says so; ``device_classes``/``state_classes`` override).

States: one retained JSON object per reading on ``<base_topic>/<device>/state``
(``{"temp": 81.2, "run": true}``); ``<base_topic>/<device>/availability`` is ``online``, or
``offline`` when the device's measurements all turn bad. A switch's command topic
``<base_topic>/<device>/<name>/set`` takes ``ON``/``OFF`` and runs the ``on``/``off`` action
through the safety layer; its state is the measurement of the same name. A ``numbers`` entry
(``{ action = "write_setpoint", min = 20, max = 90, step = 0.5 }``) is a ``number`` entity: a
number on its command topic (within min..max) runs the action with ``{"value": <number>}``.
When Home Assistant publishes ``online`` on ``<discovery_prefix>/status`` (its birth, after a
restart), every config and availability is sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from flux_edge.config.schema import Table
from flux_edge.model import Measurement, Value
from flux_edge.uplink.commands import UpstreamCommand
from flux_edge.uplink.encoders.base import (
    Encoder,
    EncoderEnv,
    EncoderKind,
    EncoderSpec,
    Message,
    StagedRow,
    readings,
)
from flux_edge.uplink.encoders.numbers import Precision
from flux_edge.uplink.topics import TemplateError, compile_topic

if TYPE_CHECKING:
    from flux_edge.config.kinds import Context
    from flux_edge.config.values import Key
    from flux_edge.uplink.outbox import Row

UNITS: dict[str, tuple[str, str, str]] = {  # our unit -> (HA unit, device_class, state_class)
    "degC": ("°C", "temperature", "measurement"), "°C": ("°C", "temperature", "measurement"),
    "degF": ("°F", "temperature", "measurement"), "°F": ("°F", "temperature", "measurement"),
    "K": ("K", "temperature", "measurement"),
    "W": ("W", "power", "measurement"), "kW": ("kW", "power", "measurement"),
    "Wh": ("Wh", "energy", "total_increasing"), "kWh": ("kWh", "energy", "total_increasing"),
    "V": ("V", "voltage", "measurement"), "A": ("A", "current", "measurement"),
    "Pa": ("Pa", "pressure", "measurement"), "hPa": ("hPa", "pressure", "measurement"),
    "bar": ("bar", "pressure", "measurement"), "Hz": ("Hz", "frequency", "measurement"),
}


class Switch(Table, frozen=True):
    on: str  # action run on "ON"
    off: str  # action run on "OFF"


class Number(Table, frozen=True):
    action: str  # run with params {"value": <the number>}
    min: float = 0.0
    max: float = 100.0
    step: float = 1.0


class HomeAssistantEncoderSpec(EncoderSpec, frozen=True, tag="homeassistant"):
    """``[uplink.encoder] type = "homeassistant"``."""

    discovery_prefix: str = "homeassistant"
    base_topic: str = "flux-edge/{gateway}"  # {gateway}
    device_classes: dict[str, str] = msgspec.field(default_factory=dict)  # "dev.name"/"name"
    state_classes: dict[str, str] = msgspec.field(default_factory=dict)
    switches: dict[str, Switch] = msgspec.field(default_factory=dict)  # "dev.name" or "name"
    numbers: dict[str, Number] = msgspec.field(default_factory=dict)  # setpoints, same keys
    manufacturer: str = "flux-edge"
    model: str = "flux-edge gateway"


def _lookup(table: dict[str, Any], device: str, name: str) -> Any:
    return table.get(f"{device}.{name}", table.get(name))


class HomeAssistantEncoder(Encoder):
    commands = True

    def __init__(self, spec: HomeAssistantEncoderSpec, env: EncoderEnv) -> None:
        self.spec = spec
        self.gw = env.gateway
        self.base = compile_topic(spec.base_topic, ("gateway",)).render(gateway=env.gateway)
        self.status_topic = env.status_topic
        self._precision = Precision(env.precision, spec.decimals, spec.precision)
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder()
        self.points: dict[str, dict[str, str]] = {}  # device -> name -> our unit
        self.kinds: dict[tuple[str, str], str] = {}  # (device, name) -> component
        self.dead: set[str] = set()
        self.announced: set[tuple[str, str]] = set()  # this session
        self.available: set[str] = set()  # this session

    def extra_commands(self) -> dict[str, str]:
        out = {}
        for key, sw in self.spec.switches.items():
            out[f"{key}:ON"] = sw.on
            out[f"{key}:OFF"] = sw.off
        for key, num in self.spec.numbers.items():
            out[f"{key}:SET"] = num.action
        return out

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow]:
        out = []
        p = self._precision
        for reading in readings(measurements):
            first = reading[0]
            d = first.device
            topic = f"{self.base}/{d}/state"
            if all(m.quality == "bad" for m in reading):
                out.append(StagedRow(first.ts, f"{self.base}/{d}/availability", b"offline"))
                continue
            state = {m.name: p.round(d, m.name, m.value) for m in reading if m.quality != "bad"}
            units = {m.name: m.unit for m in reading}
            out.append(StagedRow(first.ts, topic, self._enc.encode([state, units])))
        return out

    def _component(self, device: str, name: str, value: Value) -> str:
        if _lookup(self.spec.switches, device, name) is not None:
            return "switch"
        if _lookup(self.spec.numbers, device, name) is not None:
            return "number"
        return "binary_sensor" if isinstance(value, bool) else "sensor"

    def discovery(self, device: str, name: str, unit: str, component: str) -> Message:
        uid = f"{self.gw}_{device}_{name}"
        node = f"{self.gw}_{device}"
        cfg: dict[str, Any] = {
            "name": name,
            "unique_id": uid,
            "object_id": uid,
            "state_topic": f"{self.base}/{device}/state",
            "availability": [{"topic": f"{self.base}/{device}/availability"}],
            "availability_mode": "all",
            "device": {
                "identifiers": [node], "name": device, "manufacturer": self.spec.manufacturer,
                "model": self.spec.model, "via_device": self.gw,
            },
        }
        if self.status_topic:
            cfg["availability"].insert(0, {"topic": self.status_topic})
        tpl = "{{ value_json['" + name.replace("'", "\\'") + "'] }}"
        if component == "number":
            num = _lookup(self.spec.numbers, device, name)
            cfg["value_template"] = tpl
            cfg["command_topic"] = f"{self.base}/{device}/{name}/set"
            cfg["min"], cfg["max"], cfg["step"] = num.min, num.max, num.step
            known = UNITS.get(unit)
            if known is not None or unit:
                cfg["unit_of_measurement"] = known[0] if known is not None else unit
        elif component == "sensor":
            cfg["value_template"] = tpl
            known = UNITS.get(unit)
            dc = _lookup(self.spec.device_classes, device, name)
            sc = _lookup(self.spec.state_classes, device, name)
            if known is not None:
                cfg["unit_of_measurement"] = known[0]
                dc = dc or known[1]
                sc = sc or known[2]
            elif unit:
                cfg["unit_of_measurement"] = unit
                if unit == "%" and "hum" in name.lower():
                    dc = dc or "humidity"
                sc = sc or "measurement"
            if dc:
                cfg["device_class"] = dc
            if sc:
                cfg["state_class"] = sc
        else:
            cfg["value_template"] = ("{{ 'ON' if value_json['" + name.replace("'", "\\'")
                                     + "'] else 'OFF' }}")
            dc = _lookup(self.spec.device_classes, device, name)
            if dc:
                cfg["device_class"] = dc
        if component == "switch":
            cfg["command_topic"] = f"{self.base}/{device}/{name}/set"
            cfg["payload_on"], cfg["payload_off"] = "ON", "OFF"
            cfg["state_on"], cfg["state_off"] = "ON", "OFF"
        topic = f"{self.spec.discovery_prefix}/{component}/{node}/{name}/config"
        return Message(topic, self._enc.encode(cfg), True, 1)

    def _online(self, device: str) -> Message:
        self.available.add(device)
        return Message(f"{self.base}/{device}/availability", b"online", True, 1)

    def wire(self, oid: bytes, rows: Sequence[Row]) -> list[Message]:
        row = rows[0]
        device = row.topic.split("/")[-2]
        if row.topic.endswith("/availability"):
            self.dead.add(device)
            self.available.discard(device)
            return [Message(row.topic, b"offline", True, 1)]
        state, units = self._dec.decode(row.payload)
        out: list[Message] = []
        self.dead.discard(device)
        pts = self.points.setdefault(device, {})
        for name, value in state.items():
            pts[name] = units.get(name, "")
            key = (device, name)
            if key not in self.announced:
                comp = self.kinds.setdefault(key, self._component(device, name, value))
                out.append(self.discovery(device, name, pts[name], comp))
                self.announced.add(key)
        if device not in self.available:
            out.append(self._online(device))
        out.append(Message(row.topic, self._enc.encode(state), True))
        return out

    def on_connect(self) -> list[Message]:
        self.announced = set()
        self.available = set()
        out = []
        for device, pts in self.points.items():
            for name, unit in pts.items():
                out.append(self.discovery(device, name, unit, self.kinds[(device, name)]))
                self.announced.add((device, name))
            if device not in self.dead:
                out.append(self._online(device))
        return out

    def on_disconnect(self) -> None:
        self.announced = set()
        self.available = set()

    def subscriptions(self) -> list[str]:
        birth = [f"{self.spec.discovery_prefix}/status"]
        entities = self.spec.switches or self.spec.numbers
        return birth + ([f"{self.base}/+/+/set"] if entities else [])

    def on_message(self, topic: str, payload: bytes) -> str | UpstreamCommand | None:
        if topic == f"{self.spec.discovery_prefix}/status":
            # Home Assistant (re)started: it asks for every config again (its birth message)
            return "rebirth" if payload.strip() == b"online" else None
        parts = topic.split("/")
        if len(parts) < 3:
            return None
        device, name = parts[-3], parts[-2]
        text = payload.decode("utf-8", "replace").strip()
        if _lookup(self.spec.numbers, device, name) is not None:
            key = f"{device}.{name}" if f"{device}.{name}" in self.spec.numbers else name
            try:
                value = float(text)
            except ValueError:
                return UpstreamCommand("homeassistant", f"{key}:{text!r}", device)
            num = _lookup(self.spec.numbers, device, name)
            if not num.min <= value <= num.max:  # HA's own slider keeps to it; others may not
                return UpstreamCommand("homeassistant", f"{key}:out of range", device)
            return UpstreamCommand("homeassistant", f"{key}:SET", device, {"value": value})
        word = text.upper()
        key = f"{device}.{name}" if f"{device}.{name}" in self.spec.switches else name
        return UpstreamCommand("homeassistant", f"{key}:{word}", device, {"payload": word})


def check(ctx: Context, table: dict[str, Any], path: Key) -> None:
    base = table.get("base_topic")
    if isinstance(base, str):
        try:
            compile_topic(base, ("gateway",))
        except TemplateError as exc:
            ctx.report((*path, "base_topic"), f"{exc} (placeholder: {{gateway}})")
    declared = list(ctx.entries("actions"))
    for section, keys in (("switches", ("on", "off")), ("numbers", ("action",))):
        entries = table.get(section, {})
        if not isinstance(entries, dict):
            continue
        for key, entry in entries.items():
            for which in keys:
                action = entry.get(which) if isinstance(entry, dict) else None
                if isinstance(action, str) and action not in declared:
                    ctx.report((*path, section, key, which),
                               ctx.missing_ref("action", action, declared))
            if section == "numbers" and isinstance(entry, dict):
                lo, hi = entry.get("min", 0.0), entry.get("max", 100.0)
                if isinstance(lo, int | float) and isinstance(hi, int | float) and lo >= hi:
                    ctx.report((*path, section, key, "max"), f"must be > min ({lo})")


def _make(spec: HomeAssistantEncoderSpec, env: EncoderEnv) -> Encoder:
    return HomeAssistantEncoder(spec, env)


KIND = EncoderKind(tag="homeassistant", struct=HomeAssistantEncoderSpec, factory=_make,
                   check=check, rank=50)
