"""Commands from upstream through the uplink's own connection: they run through the same
guarded path as rule commands (safety layer, audit log), are answered with the outcome where the
protocol has replies, and counted; unknown and denied ones carry the reason."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import UplinkConfig
from flux_edge.model import Command, Outcome
from flux_edge.mqtt import MqttClient
from flux_edge.uplink.encoders import spb_proto as pb
from flux_edge.uplink.sender import Uplink
from tests.support import run
from tests.support.mosquitto import Mosquitto
from tests.unit.test_guarded import Device, audit_lines, setup

pytestmark = pytest.mark.integration


class FakePipeline:
    """What Uplink.bind uses of a pipeline: execute (here straight through its guard),
    executors, safety."""

    def __init__(self, tmp_path: Path, **actuator: Any) -> None:
        self.guard, self.safety, self.audit, self.clock = setup(tmp_path, **actuator)
        self.device = Device()
        self.executors = {"burner_on": self.device, "burner_off": self.device}
        self.latest: dict[str, Any] = {}

    async def execute(self, cmd: Command) -> Outcome | None:  # Pipeline.execute, minus the rest
        return await self.guard.run(cmd, self.executors[cmd.action], self.latest)


def test_plain_command_topic_runs_guarded_and_replies(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    enc = {"type": "json", "command_topic": "cmd/{gateway}",
           "commands": {"burner_on": "burner_on", "burner_off": "burner_off"}}

    async def scenario() -> None:
        p = FakePipeline(tmp_path, min_on=30)
        up = Uplink(UplinkConfig(host=broker.host, port=broker.port, encoder=enc),
                    gateway="gw1", state_dir=tmp_path / "state")
        up.bind(p)
        await up.start()
        replies: list[dict[str, Any]] = []
        got = asyncio.Event()

        def on(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            replies.append({"topic": topic, **json.loads(payload)})
            got.set()

        ctl = MqttClient("scada", broker.host, broker.port)
        ctl.subscribe("cmd/gw1/+/reply", 1, on)
        await ctl.connect(10)
        await ctl.wait_subscribed("cmd/gw1/+/reply")
        await up._client.wait_subscribed("cmd/gw1/+")

        async def ask(name: str, body: bytes) -> dict[str, Any]:
            n = len(replies)
            await ctl.publish(f"cmd/gw1/{name}", body, 1)
            while len(replies) == n:
                got.clear()
                await got.wait()
            return replies[-1]

        r = await ask("burner_on", b'{"id": 1}')
        assert r == {"topic": "cmd/gw1/burner_on/reply", "ok": True, "status": "ok", "id": 1}
        r2 = await ask("burner_off", b'{"id": 2}')  # within min_on: the safety layer says no
        assert r2["ok"] is False and r2["status"] == "denied" and r2["id"] == 2
        assert r2["reason"].startswith("min_on: burner switched on")
        r = await ask("open_valve", b"{}")
        assert r["status"] == "unknown" and "open_valve" in r["reason"]
        r = await ask("burner_on", b"not json")
        assert r["status"] == "failed" and "JSON" in r["reason"]
        assert p.device.calls == ["burner_on"]
        s = up.command_stats
        assert (s.received, s.ok, s.denied, s.unknown, s.failed) == (4, 1, 1, 1, 1)
        lines = audit_lines(p.audit)
        assert [(x["rule"], x["action"], x["decision"]) for x in lines] == [
            ("uplink:mqtt", "burner_on", "allowed"), ("uplink:mqtt", "burner_off", "blocked")]
        assert lines[1]["reason"] == r2["reason"]
        await ctl.close()
        await up.close()

    try:
        run(scenario(), 40)
    finally:
        broker.close()


def test_sparkplug_dcmd_runs_guarded(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    enc = {"type": "sparkplug_b", "group_id": "plant1", "edge_node": "gw1",
           "commands": {"burner": "burner_on"}}

    async def scenario() -> None:
        p = FakePipeline(tmp_path)
        (tmp_path / "state").mkdir()
        up = Uplink(UplinkConfig(host=broker.host, port=broker.port, encoder=enc,
                                 status_topic=""), gateway="gw1", state_dir=tmp_path / "state")
        up.bind(p)
        await up.start()
        await up._client.wait_subscribed("spBv1.0/plant1/DCMD/gw1/+")
        ctl = MqttClient("scada", broker.host, broker.port)
        await ctl.connect(10)
        metric = pb.Metric(name="burner", datatype=pb.BOOLEAN, value=True)
        await ctl.publish("spBv1.0/plant1/DCMD/gw1/boiler", pb.payload(1, None, [metric]), 1)
        unknown = pb.Metric(name="valve", datatype=pb.BOOLEAN, value=True)
        await ctl.publish("spBv1.0/plant1/DCMD/gw1/boiler", pb.payload(1, None, [unknown]), 1)
        while up.command_stats.received < 2:  # noqa: ASYNC110 - no reply in Sparkplug to await
            await asyncio.sleep(0.01)
        assert p.device.calls == ["burner_on"]
        assert (up.command_stats.ok, up.command_stats.unknown) == (1, 1)
        line = audit_lines(p.audit)[0]
        assert line["rule"] == "uplink:sparkplug_b" and line["decision"] == "allowed"
        await ctl.close()
        await up.close()

    try:
        run(scenario(), 40)
    finally:
        broker.close()
