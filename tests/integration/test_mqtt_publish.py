"""The mqtt_publish action against a real mosquitto on 127.0.0.1 (tests/support/mosquitto.py).

Every scenario is bounded; receipt is awaited as an event, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from flux_edge.actions.mqtt_publish import MqttPublishExecutor, check_templates
from flux_edge.actions.mqtt_publish_kind import MqttPublishAction
from flux_edge.errors import ActionError
from flux_edge.model import Command, Measurement
from flux_edge.mqtt import MqttClient
from tests.support.mosquitto import Mosquitto, mosquitto  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

T = TypeVar("T")
TS = 1_795_849_200.25  # 2026-11-28T07:00:00.250Z


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def command(value: Any = 82.5, rule: str = "overheat") -> Command:
    cause = Measurement(device="boiler", name="temperature", value=value, ts=TS, unit="°C")
    return Command(rule=rule, action="alarm", ts=TS + 0.1, cause=cause)


ALARM = MqttPublishAction(
    source="site",
    topic="site/{device}/alarm/{name}",
    payload='{{"rule": {rule:json}, "value": {value:json}, "unit": {unit:json}, "ts": {ts:json}}}',
    qos=1,
    timeout=5.0,
)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self.changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.messages.append((topic, payload, qos, retain))
        self.changed.set()

    async def wait(self, n: int) -> None:
        while len(self.messages) < n:
            self.changed.clear()
            await self.changed.wait()


async def subscriber(broker: Mosquitto, topic: str = "site/#") -> tuple[MqttClient, Inbox]:
    inbox = Inbox()
    sub = MqttClient("watcher", broker.host, broker.port)
    sub.subscribe(topic, 1, inbox)
    await sub.connect(timeout=10)
    async with asyncio.timeout(10):
        await sub.wait_subscribed(topic)
    return sub, inbox


def test_payload_rendered_and_qos1_acknowledged(mosquitto: Mosquitto) -> None:  # noqa: F811
    async def scenario() -> None:
        sub, inbox = await subscriber(mosquitto)
        gw = MqttClient("gw", mosquitto.host, mosquitto.port)
        await gw.connect(timeout=10)
        executor = MqttPublishExecutor("alarm", ALARM, gw, wall=lambda: 42.0)
        try:
            outcome = await executor.execute(command())
            assert outcome.ok, outcome.error
            assert outcome.error == "" and outcome.ts == 42.0 and outcome.verified is None
            assert 0 < outcome.latency_s < 5
            assert gw.stats.published == 1  # completed = the broker's PUBACK arrived
            # a string value with quotes stays valid JSON
            outcome = await executor.execute(command(value='he said "hot"\n', rule="r2"))
            assert outcome.ok, outcome.error
            await inbox.wait(2)
        finally:
            await gw.close()
            await sub.close()
        (topic, payload, qos, retain), second = inbox.messages
        assert topic == "site/boiler/alarm/temperature" and qos == 1 and not retain
        assert json.loads(payload) == {
            "rule": "overheat", "value": 82.5, "unit": "°C", "ts": "2026-11-28T07:00:00.250Z"
        }
        assert json.loads(second[1])["value"] == 'he said "hot"\n'

    run(scenario())


def test_qos0_and_retain(mosquitto: Mosquitto) -> None:  # noqa: F811
    async def scenario() -> None:
        gw = MqttClient("gw", mosquitto.host, mosquitto.port)
        await gw.connect(timeout=10)
        cfg = msgspec.structs.replace(
            ALARM, topic="site/state/{device}", payload="{value}", qos=0, retain=True
        )
        outcome = await MqttPublishExecutor("state", cfg, gw).execute(command(value=True))
        assert outcome.ok, outcome.error
        # the retained message is there for a subscriber that comes later
        sub, inbox = await subscriber(mosquitto, "site/state/+")
        try:
            await inbox.wait(1)
        finally:
            await gw.close()
            await sub.close()
        assert inbox.messages[0][:2] == ("site/state/boiler", b"true")
        assert inbox.messages[0][3] is True

    run(scenario())


def test_timeout_when_the_broker_is_gone(mosquitto: Mosquitto) -> None:  # noqa: F811
    async def scenario() -> None:
        gw = MqttClient("gw", mosquitto.host, mosquitto.port, reconnect_min=0.05,
                        reconnect_max=0.2)
        lost = asyncio.Event()
        gw.on_connection_change = lambda up, _reason: None if up else lost.set()
        await gw.connect(timeout=10)
        cfg = msgspec.structs.replace(ALARM, timeout=0.5)
        executor = MqttPublishExecutor("alarm", cfg, gw)
        try:
            mosquitto.kill()
            await lost.wait()
            outcome = await executor.execute(command())
        finally:
            await gw.close()
        assert not outcome.ok
        assert 0.5 <= outcome.latency_s < 3
        assert "took longer than 0.5 s (timeout; not connected" in outcome.error
        assert outcome.error.startswith("action 'alarm': publishing to 'site/boiler/alarm/")

    run(scenario())


def test_timeout_when_the_broker_does_not_acknowledge(mosquitto: Mosquitto) -> None:  # noqa: F811
    """A broker that hangs (SIGSTOP): connected, the PUBLISH is written, no PUBACK comes."""

    async def scenario() -> None:
        gw = MqttClient("gw", mosquitto.host, mosquitto.port)
        await gw.connect(timeout=10)
        cfg = msgspec.structs.replace(ALARM, timeout=0.3)
        executor = MqttPublishExecutor("alarm", cfg, gw)
        proc = mosquitto._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            outcome = await executor.execute(command())
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            await gw.close()
        assert not outcome.ok
        assert "took longer than 0.3 s (timeout; no acknowledgement (QoS 1)" in outcome.error

    run(scenario())


def test_rendered_topic_that_is_not_publishable_fails_cleanly(
    mosquitto: Mosquitto,  # noqa: F811
) -> None:
    async def scenario() -> None:
        gw = MqttClient("gw", mosquitto.host, mosquitto.port)
        await gw.connect(timeout=10)
        cfg = msgspec.structs.replace(ALARM, topic="site/{value}")
        try:
            outcome = await MqttPublishExecutor("alarm", cfg, gw).execute(command(value="a/#"))
        finally:
            await gw.close()
        assert not outcome.ok and "is not publishable" in outcome.error

    run(scenario())


def test_bad_templates_are_refused_at_construction() -> None:
    cfg = msgspec.structs.replace(ALARM, payload='{"v": {value}}')
    assert check_templates(cfg) == [
        ("payload", "{\"v\": {value} is not a placeholder: use {name} or {name:json} with name "
         "one of device, name, value, unit, quality, rule, action, ts; write '{{' and '}}' for "
         "literal braces (JSON payloads)", 1)
    ]
    with pytest.raises(ActionError, match=r"payload: .* \(column 1\)"):
        MqttPublishExecutor("x", cfg, MqttClient("unused", "127.0.0.1", 1))
    wild = msgspec.structs.replace(ALARM, topic="site/+/{device}")
    assert [p[0] for p in check_templates(wild)] == ["topic"]
    assert check_templates(msgspec.structs.replace(ALARM, qos=3, timeout=0)) == [
        ("qos", "QoS must be 0, 1 or 2, got 3", 0),
        ("timeout", "the timeout must be more than 0", 0),
    ]
    assert check_templates(ALARM) == []


def test_config_struct_decodes_with_its_tag() -> None:
    raw = {"type": "mqtt_publish", "source": "site", "topic": "a/{device}", "payload": "{value}"}
    cfg = msgspec.convert(raw, MqttPublishAction)
    assert cfg.qos == 1 and cfg.retain is False and cfg.timeout == 5.0
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({**raw, "qso": 1}, MqttPublishAction)


def test_pipeline_keeps_mqtt_commands_in_flight_together(
    tmp_path: Path, mosquitto: Mosquitto  # noqa: F811
) -> None:
    """Regression: the pipeline ran one command per action at a time, so each MQTT publish waited
    for the previous PUBACK (~50 commands/s against a broker that delays its PUBACKs). Commands
    of an mqtt_publish action that drives no actuator are now all handed to the client at once:
    with the broker stopped (SIGSTOP), all of them wait for their PUBACK together."""
    from flux_edge.kinds import load_config_text
    from flux_edge.plugins.host import PluginHost
    from flux_edge.runtime.pipeline import Pipeline

    cfg = load_config_text(f"""
[daemon]
state_dir = "{tmp_path / 'state'}"

[plugins.json_normalize]
[plugins.json_normalize.config]
fields = [{{ path = "t" }}]

[sources.site]
type = "mqtt"
host = "{mosquitto.host}"
port = {mosquitto.port}
topics = [{{ topic = "in/#", qos = 0 }}]
chain = ["json_normalize"]

[rules.hot]
when = "t > 1.0"
inputs = {{ t = "double" }}
mode = "level"
actions = ["alarm"]

[actions.alarm]
type = "mqtt_publish"
source = "site"
topic = "out/alarm"
payload = "{{value}}"
qos = 1
timeout = "20s"
""")

    async def scenario() -> None:
        from flux_edge.runtime.pipeline import Observers

        done = asyncio.Event()
        outcomes: list[object] = []

        def on_outcome(o: object) -> None:
            outcomes.append(o)
            if len(outcomes) == 5:
                done.set()

        pipeline = Pipeline(cfg, host=PluginHost(cache_dir=None),
                            observers=Observers(outcomes=[on_outcome]))
        await pipeline.start()
        client = pipeline.sources["site"].client  # type: ignore[attr-defined]
        try:
            await client.wait_subscribed("in/#")
            assert mosquitto._proc is not None
            os.kill(mosquitto._proc.pid, signal.SIGSTOP)
            try:
                # readings come in through the pipeline's front door, as a source emits them
                from flux_edge.model import Reading

                for i in range(5):
                    await pipeline._emit(Reading(source="site", device="site", ts=TS,
                                                 payload=json.dumps({"t": 2 + i}).encode()))
                # every publish awaits its PUBACK at once (client state, no event to await)
                while len(client._waiters) < 5:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            finally:
                os.kill(mosquitto._proc.pid, signal.SIGCONT)
            await done.wait()
            assert pipeline.action_counts["alarm"][0] == 5
        finally:
            await pipeline.stop()

    run(scenario(), timeout=30)
