"""`flux-edge test` on an MQTT source: it listens --seconds on a real mosquitto, runs what came
through the plugin chain and the rules, and prints what would happen."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import bundled_wasm
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.json_normalize.config]
fields = [{{ path = "temp", name = "temp", unit = "°C" }}]

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
actions = ["alarm"]

[actions.alarm]
type = "mqtt_publish"
source = "site"
topic = "site/alarm"
payload = "hot"
"""


def test_flux_edge_test_listens_on_mqtt(tmp_path: Path) -> None:
    bundled_wasm("json_normalize")
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        path = tmp_path / "site.toml"
        path.write_text(CONFIG.format(state=tmp_path / "state", port=broker.port))
        stop = threading.Event()

        def publish() -> None:
            while not stop.is_set():
                subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1",
                                "-t", "site/boiler/telemetry", "-m", '{"temp": 85.5}'],
                               check=False, timeout=10)
                stop.wait(0.3)

        pub = threading.Thread(target=publish)
        pub.start()
        t0 = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-m", "flux_edge", "test", "-c", str(path),
                                  "--seconds", "2"], capture_output=True, text=True,
                                 timeout=60, check=False)
        finally:
            stop.set()
            pub.join()
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - t0 >= 2
        assert "source site (mqtt): listening 2 s" in out.stdout
        assert "temp = 85.5 °C" in out.stdout
        assert "hot would fire: action alarm" in out.stdout and "(not run)" in out.stdout
    finally:
        broker.close()
