"""MQTT in through the whole pipeline: a real mosquitto, devices publishing JSON telemetry on
site/<device>/telemetry, json_normalize.wasm, a CEL rule. No Modbus, no mocks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from flux_edge.kinds import load_config_text
from flux_edge.model import Measurement
from flux_edge.mqtt import MqttClient
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers, Pipeline
from tests.conftest import bundled_wasm
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
name = "gw-test"
state_dir = "{state}"

[plugins.json_normalize.config]
fields = [{{ path = "temp", name = "temp", unit = "°C" }}, {{ path = "seq", name = "seq" }}]

[sources.site]
type = "mqtt"
host = "127.0.0.1"
port = {port}
topics = [{{ topic = "site/+/telemetry", qos = 1 }}]
device_from_topic = "site/{{device}}/telemetry"
chain = ["json_normalize"]

[rules.hot]
when = "temp > 80"
inputs = {{ temp = "double" }}
actions = []
"""


def test_mqtt_telemetry_is_normalized_per_device_and_evaluated(tmp_path: Path) -> None:
    bundled_wasm("json_normalize")
    broker = Mosquitto(tmp_path)
    broker.start()

    async def go() -> None:
        text = CONFIG.format(state=tmp_path / "state", port=broker.port)
        config = load_config_text(text, str(tmp_path / "site.toml"))
        got: list[Measurement] = []
        done = asyncio.Event()
        n_per_device = 50

        def on_measurements(source: str, ms: list[Measurement]) -> None:
            got.extend(ms)
            if sum(1 for m in got if m.name == "seq") >= 2 * n_per_device:
                done.set()

        holder: list[Pipeline] = []
        subscribed = asyncio.Event()
        stop = asyncio.Event()
        runner = asyncio.create_task(
            run_pipeline(config, observers=Observers(measurements=[on_measurements]), stop=stop,
                         started=lambda p: (holder.append(p), subscribed.set()))
        )
        pub = MqttClient("test-publisher", broker.host, broker.port)
        try:
            await asyncio.wait_for(subscribed.wait(), 10)
            src = holder[0].sources["site"]
            await asyncio.wait_for(src.client.wait_subscribed("site/+/telemetry"), 10)  # type: ignore[attr-defined]
            await pub.connect(timeout=10)
            for seq in range(n_per_device):
                for dev, base in (("boiler1", 70.0), ("boiler2", 20.0)):
                    payload = json.dumps({"temp": base + seq / 2, "seq": seq})
                    await pub.publish(f"site/{dev}/telemetry", payload.encode(), qos=1)
            await asyncio.wait_for(done.wait(), 20)
        finally:
            await pub.close()
            stop.set()
            await runner

        by_device: dict[str, list[float]] = {}
        for m in got:
            if m.name == "seq":
                by_device.setdefault(m.device, []).append(float(m.value))
        # every message, in order, per device named by its topic
        assert by_device == {d: [float(i) for i in range(n_per_device)]
                             for d in ("boiler1", "boiler2")}
        # boiler1 crosses 80 at seq 21 (edge: fires once); boiler2 never does
        stats = holder[0].engine.stats["hot"]
        assert stats.firings == 1

    try:
        asyncio.run(go())
    finally:
        broker.close()
