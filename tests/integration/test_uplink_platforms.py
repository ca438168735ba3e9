"""The thingsboard and homeassistant encoders against a real mosquitto, each checked by a
consumer written from the platform's public docs (ThingsBoard gateway MQTT API, Home Assistant
MQTT discovery), commands included (RPC with replies, HA switch command topics), through a real
safety layer and audit log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import UplinkConfig
from flux_edge.model import Measurement
from flux_edge.mqtt import MqttClient
from flux_edge.uplink.sender import Uplink
from tests.integration.test_uplink_commands import FakePipeline
from tests.support import run
from tests.support.mosquitto import Mosquitto
from tests.unit.test_guarded import audit_lines

pytestmark = pytest.mark.integration


def poll(i: int, device: str, quality: str = "good") -> list[Measurement]:
    ts = 1732780000.0 + i
    q: Any = quality
    return [
        Measurement(device=device, name="temp", value=696 * 0.1, ts=ts, unit="degC", quality=q),
        Measurement(device=device, name="hum", value=40.1, ts=ts, unit="%", quality=q),
        Measurement(device=device, name="burner", value=i % 2 == 0, ts=ts, quality=q),
        Measurement(device=device, name="seq", value=i, ts=ts, quality=q),
    ]


class Watcher:
    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.client = MqttClient("watcher", broker.host, broker.port, protocol="3.1.1")
        self.topic = topic
        self.client.subscribe(topic, 1, self._on)
        self.messages: list[tuple[str, bytes, bool]] = []
        self.changed = asyncio.Event()

    def _on(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.messages.append((topic, payload, retain))
        self.changed.set()

    async def start(self) -> None:
        await self.client.connect(10)
        await self.client.wait_subscribed(self.topic)

    async def until(self, cond: Any) -> None:
        while not cond():
            self.changed.clear()
            await self.changed.wait()


# --- ThingsBoard --------------------------------------------------------------------------------


def tb_check(messages: list[tuple[str, bytes, bool]]) -> dict[str, list[int]]:
    """Every message per the gateway API: connect before a device's telemetry, the telemetry
    shape, disconnect ends it. Returns the seq values per device."""
    connected: set[str] = set()
    seqs: dict[str, list[int]] = {}
    for topic, payload, _ in messages:
        msg = json.loads(payload)
        if topic == "v1/gateway/connect":
            assert set(msg) == {"device", "type"}
            connected.add(msg["device"])
        elif topic == "v1/gateway/disconnect":
            assert set(msg) == {"device"}
            connected.discard(msg["device"])
        elif topic == "v1/gateway/telemetry":
            for device, entries in msg.items():
                assert device in connected, f"telemetry of {device} before connect"
                for e in entries:
                    assert set(e) == {"ts", "values"} and isinstance(e["ts"], int)
                    assert e["values"]["temp"] == 69.6
                    seqs.setdefault(device, []).append(e["values"]["seq"])
    return seqs


def test_thingsboard_telemetry_and_rpc_through_the_safety_layer(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    enc = {"type": "thingsboard", "commands": {"burner_on": "burner_on",
                                               "burner_off": "burner_off"}}

    async def scenario() -> None:
        w = Watcher(broker, "v1/gateway/#")
        await w.start()
        p = FakePipeline(tmp_path, min_on=30)
        up = Uplink(UplinkConfig(host=broker.host, port=broker.port, encoder=enc,
                                 status_topic=""), gateway="gw1", state_dir=tmp_path / "state",
                    precision={("A", "temp"): 1, ("B", "temp"): 1})
        up.bind(p)
        await up.start()
        for i in range(100):
            up.add(poll(i, "A") + poll(i, "B"))
            if i == 50:
                up.add(poll(i, "B", "bad"))
        up.commit()
        assert await up.flush(20)
        await w.until(lambda: len(tb_check(w.messages).get("B", [])) >= 100)
        seqs = tb_check(w.messages)
        assert seqs["A"] == list(range(100)) and seqs["B"] == list(range(100))
        topics = [t for t, _, _ in w.messages]
        assert topics.count("v1/gateway/disconnect") == 1
        assert topics.count("v1/gateway/connect") == 3  # A, B, B again after its disconnect
        # RPC: a server-side command, its reply carries the outcome
        await up._client.wait_subscribed("v1/gateway/rpc")
        rpc = MqttClient("tb", broker.host, broker.port)
        await rpc.connect(10)

        async def call(rid: int, method: str) -> dict[str, Any]:
            body = {"device": "A", "data": {"id": rid, "method": method, "params": {}}}
            await rpc.publish("v1/gateway/rpc", json.dumps(body).encode(), 1)

            def replied() -> bool:
                return any(t == "v1/gateway/rpc" and json.loads(pl).get("id") == rid
                           and "data" in json.loads(pl) and "method" not in json.loads(pl)["data"]
                           for t, pl, _ in w.messages)
            await w.until(replied)
            return next(json.loads(pl) for t, pl, _ in reversed(w.messages)
                        if t == "v1/gateway/rpc" and json.loads(pl).get("id") == rid
                        and "method" not in json.loads(pl)["data"])

        assert await call(1, "burner_on") == {"device": "A", "id": 1, "data": {"success": True}}
        denied = await call(2, "burner_off")
        assert denied["data"]["success"] is False and denied["data"]["status"] == "denied"
        assert denied["data"]["error"].startswith("min_on")
        unknown = await call(3, "self_destruct")
        assert unknown["data"]["status"] == "unknown"
        assert p.device.calls == ["burner_on"]
        await rpc.close()
        await up.close()
        await w.client.close()

    try:
        run(scenario(), 40)
    finally:
        broker.close()


# --- Home Assistant -----------------------------------------------------------------------------


REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"},
            "switch": {"command_topic"}, "number": {"command_topic", "state_topic"}}


def test_homeassistant_discovery_state_availability_and_a_switch(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    enc = {"type": "homeassistant", "switches": {"burner": {"on": "burner_on",
                                                             "off": "burner_off"}},
           "numbers": {"d1.setpoint": {"action": "burner_on", "min": 20, "max": 90,
                                       "step": 0.5}}}

    async def scenario() -> None:
        w = Watcher(broker, "#")
        await w.start()
        p = FakePipeline(tmp_path)
        up = Uplink(UplinkConfig(host=broker.host, port=broker.port, encoder=enc),
                    gateway="gw1", state_dir=tmp_path / "state", precision={("d1", "temp"): 1})
        up.bind(p)
        await up.start()
        for i in range(10):
            setpoint = Measurement(device="d1", name="setpoint", value=65.0,
                                   ts=1732780000.0 + i, unit="degC")
            up.add([*poll(i, "d1"), setpoint])
        up.add(poll(10, "d1", "bad"))
        up.commit()
        assert await up.flush(20)

        def states() -> list[dict[str, Any]]:
            return [json.loads(pl) for t, pl, _ in w.messages if t == "flux-edge/gw1/d1/state"]
        await w.until(lambda: len(states()) >= 10 and any(
            t.endswith("/availability") and pl == b"offline" for t, pl, _ in w.messages))
        configs: dict[str, dict[str, Any]] = {}
        for topic, payload, retain in w.messages:
            if topic.startswith("homeassistant/"):
                _prefix, component, node, obj, last = topic.split("/")
                assert last == "config" and node == "gw1_d1"
                cfg = json.loads(payload)
                assert REQUIRED[component] <= set(cfg)
                assert {"name", "unique_id", "device", "availability"} <= set(cfg)
                assert cfg["device"]["identifiers"] == ["gw1_d1"]
                assert cfg["availability"][0]["topic"] == "flux-edge/gw1/status"
                configs[obj] = {"component": component, **cfg}
                # a config comes before the first state that carries its value
                first_state = next(i for i, m in enumerate(w.messages) if m[0].endswith("/state"))
                assert w.messages.index((topic, payload, retain)) < first_state
        assert configs["temp"]["component"] == "sensor"
        assert configs["temp"]["device_class"] == "temperature"
        assert configs["temp"]["unit_of_measurement"] == "°C"
        assert configs["temp"]["state_class"] == "measurement"
        assert configs["hum"]["device_class"] == "humidity"
        assert configs["burner"]["component"] == "switch"
        assert configs["seq"]["component"] == "sensor" and "device_class" not in configs["seq"]
        sp = configs["setpoint"]
        assert sp["component"] == "number" and (sp["min"], sp["max"], sp["step"]) == (20, 90, 0.5)
        assert sp["command_topic"] == "flux-edge/gw1/d1/setpoint/set"
        for s in states():  # every state carries the keys the templates read
            for name in configs:
                assert name in s
            assert s["temp"] == 69.6
        assert [s["seq"] for s in states()] == list(range(10))
        avail = [pl for t, pl, _ in w.messages if t == "flux-edge/gw1/d1/availability"]
        assert avail == [b"online", b"offline"]
        late = Watcher(broker, "homeassistant/#")  # HA started later: configs are retained
        late.client = MqttClient("late", broker.host, broker.port, protocol="3.1.1")
        late.client.subscribe("homeassistant/#", 1, late._on)
        await late.start()
        await late.until(lambda: len(late.messages) >= len(configs))
        assert all(retain for _, _, retain in late.messages)
        await late.client.close()
        # the switch's command topic runs the action through the safety layer
        await up._client.wait_subscribed("flux-edge/gw1/+/+/set")
        ha = MqttClient("ha", broker.host, broker.port)
        await ha.connect(10)
        await ha.publish(configs["burner"]["command_topic"], b"ON", 1)
        await ha.publish("flux-edge/gw1/d1/valve/set", b"ON", 1)
        await ha.publish("flux-edge/gw1/d1/setpoint/set", b"95", 1)  # out of range
        while up.command_stats.received < 3:  # noqa: ASYNC110 - HA commands have no reply
            await asyncio.sleep(0.01)
        assert p.device.calls == ["burner_on"] and up.command_stats.unknown == 2
        p.clock.advance(3600)  # past any rate limit
        await ha.publish("flux-edge/gw1/d1/setpoint/set", b"70.5", 1)
        while up.command_stats.received < 4:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert up.command_stats.received == 4
        rec = audit_lines(p.audit)[-1]
        assert rec["rule"] == "uplink:homeassistant" and rec["params"]["value"] == 70.5
        # HA restarts: its birth message brings every config again
        n_cfg = sum(1 for t, _, _ in w.messages if t.startswith("homeassistant/sensor/"))
        await ha.publish("homeassistant/status", b"online", 1)
        await w.until(lambda: sum(1 for t, _, _ in w.messages
                                  if t.startswith("homeassistant/sensor/")) >= 2 * n_cfg)
        await ha.close()
        await up.close()
        await w.until(lambda: any(t == "flux-edge/gw1/status" and pl == b"offline"
                                  for t, pl, _ in w.messages))
        await w.client.close()

    try:
        run(scenario(), 40)
    finally:
        broker.close()
