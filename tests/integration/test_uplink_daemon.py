"""The northbound path in the running daemon: a real pymodbus boiler, the json encoder on one
broker and an extra influx uplink on another, a command from upstream through the safety layer
to the boiler's coil, numbers at the register map's precision, and what /metrics says."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from flux_edge.demo.boiler import BoilerSimulator
from flux_edge.kinds import load_config_text
from flux_edge.runtime.daemon import Daemon
from flux_edge.runtime.observe import render_metrics
from flux_edge.runtime.systemd import Notifier
from tests.conftest import bundled_wasm
from tests.integration.test_uplink_encoders import Consumer
from tests.support import run
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
name = "gw1"
state_dir = "{state}"

[plugins.modbus_decode]

[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "0.1s"
chain = ["modbus_decode"]
registers = [
  {{ name = "temperature", address = 0, type = "int16", scale = 0.1, unit = "degC" }},
  {{ name = "burner", function = "coil", address = 0 }},
]

[actions.burner_off]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = false

[actions.burner_on]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = true

[actuators.burner]
on = "burner_on"
off = "burner_off"
safe = "off"

[uplink]
host = "127.0.0.1"
port = {lan}
reconnect_min = "0.05s"
reconnect_max = "0.2s"
[uplink.encoder]
type = "json"
topic = "up/{{device}}"
command_topic = "cmd/{{gateway}}"
commands = {{ burner_off = "burner_off" }}
template = {{ device = "{{device}}", ts = "{{ts}}", metrics = "{{values}}" }}

[uplink.extra.plant]
host = "127.0.0.1"
port = {plant}
reconnect_min = "0.05s"
reconnect_max = "0.2s"
encoder = {{ type = "influx" }}
"""


def test_the_daemon_sends_json_and_influx_and_takes_a_command(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lan, plant = Mosquitto(tmp_path / "a"), Mosquitto(tmp_path / "b")
    lan.start()
    plant.start()

    async def go() -> None:
        sim = BoilerSimulator(port=0, start_temperature=55.0, burner=True, tick=3600.0)
        await sim.start()
        up, lp = Consumer(lan, "#"), Consumer(plant, "#")
        await up.start()
        await lp.start()
        text = CONFIG.format(state=tmp_path / "state", port=sim.port, lan=lan.port,
                             plant=plant.port)
        daemon = Daemon(load_config_text(text, str(tmp_path / "site.toml")),
                        notifier=Notifier({}))
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(daemon.run(stop=stop))
        try:
            # the holding register and the coil are read by two requests: two readings
            await up.until(lambda: any(t == "up/boiler" and b"temperature" in p
                                       for t, p, _ in up.messages))
            payload = next(p for t, p, _ in up.messages
                           if t == "up/boiler" and b"temperature" in p)
            msg = json.loads(payload)
            assert msg["device"] == "boiler" and set(msg["metrics"]) == {"temperature"}
            assert b'"temperature":55.0}' in payload  # 550 * 0.1 is 55.00000000000001
            await lp.until(lambda: any(t == "flux-edge/gw1/influx" for t, _, _ in lp.messages))
            line = next(p for t, p, _ in lp.messages if t == "flux-edge/gw1/influx")
            await lp.until(lambda: any(b"temperature=" in p for _, p, _ in lp.messages))
            line = next(p for _, p, _ in lp.messages if b"temperature=" in p)
            assert b"temperature=55.0 " in line
            # a command from upstream: the burner goes off through the safety layer
            uplink = daemon.uplink
            assert uplink is not None
            await uplink._client.wait_subscribed("cmd/gw1/+")
            await up.client.publish("cmd/gw1/burner_off", b'{"id": "a1"}', 1)
            await up.until(lambda: any(t == "cmd/gw1/burner_off/reply" for t, _, _ in
                                       up.messages))
            reply = json.loads(next(p for t, p, _ in up.messages
                                    if t == "cmd/gw1/burner_off/reply"))
            assert reply == {"ok": True, "status": "ok", "id": "a1", "verified": False}
            assert sim.burner is False
            await up.client.publish("cmd/gw1/burner_on", b"{}", 1)  # not in commands
            await up.until(lambda: any(t == "cmd/gw1/burner_on/reply" for t, _, _ in
                                       up.messages))
            text_metrics = render_metrics(daemon)
            assert 'flux_edge_uplink_commands_total{status="ok"} 1' in text_metrics
            assert 'flux_edge_uplink_commands_total{status="unknown"} 1' in text_metrics
            assert 'flux_edge_uplink_extra_connected{uplink="plant"} 1' in text_metrics
            audit = [json.loads(x) for x in
                     (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
            assert audit[0]["rule"] == "uplink:mqtt" and audit[0]["action"] == "burner_off"
        finally:
            stop.set()
            await task
            await up.close()
            await lp.close()
            await sim.stop()

    try:
        run(go(), 60)
    finally:
        lan.close()
        plant.close()
