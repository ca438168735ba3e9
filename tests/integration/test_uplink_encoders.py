"""Uplink encoders end to end: a real mosquitto, a consumer per format written from its public
spec, QoS 0/1/2 through the outbox, outages and kill -9 without loss, and a real InfluxDB."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import UplinkConfig
from flux_edge.model import Measurement
from flux_edge.mqtt import MqttClient
from flux_edge.uplink.sender import Uplink
from tests.support import run
from tests.support.influxdb import InfluxDB
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

GW = "gw1"
JSON = {"type": "json", "topic": "up/{device}", "exclude": ["seq"],
        "template": {"device": "{device}", "ts": "{ts}", "seq": "{values.seq}",
                     "metrics": "{values}"}}
INFLUX = {"type": "influx", "topic": "lp/{gateway}", "tags": {"site": "north side"}}


def cfg(broker: Mosquitto, encoder: dict[str, Any], **kw: Any) -> UplinkConfig:
    base: dict[str, Any] = {"host": broker.host, "port": broker.port, "reconnect_min": 0.05,
                            "reconnect_max": 0.3, "encoder": encoder}
    base.update(kw)
    return UplinkConfig(**base)


def poll(seq: int, device: str = "d1") -> list[Measurement]:
    ts = 1732780000.0 + seq / 1000
    return [
        Measurement(device=device, name="temp", value=696 * 0.1 + seq, ts=ts, unit="degC",
                    source="plc"),
        Measurement(device=device, name="hum", value=40.1, ts=ts, unit="%", source="plc"),
        Measurement(device=device, name="seq", value=seq, ts=ts, source="plc"),
    ]


class Consumer:
    """Every message on ``topic`` in arrival order (QoS 2 subscription: no broker-side loss)."""

    def __init__(self, broker: Mosquitto, topic: str = "#", qos: int = 2) -> None:
        self.client = MqttClient("consumer", broker.host, broker.port, reconnect_min=0.05,
                                 reconnect_max=0.3, protocol="3.1.1", clean_start=False)
        self.topic = topic
        self.qos = qos
        self.messages: list[tuple[str, bytes, bool]] = []
        self._changed = asyncio.Event()
        self.client.subscribe(topic, qos, self._on)

    def _on(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.messages.append((topic, payload, retain))
        self._changed.set()

    async def start(self) -> None:
        await self.client.connect(10)
        await self.client.wait_subscribed(self.topic)

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        await self.client.close()


def json_seqs(c: Consumer) -> list[int]:
    out = []
    for topic, payload, _ in c.messages:
        if topic.startswith("up/"):
            msg = json.loads(payload)
            assert set(msg) == {"device", "ts", "seq", "metrics"}
            assert topic == f"up/{msg['device']}"
            assert set(msg["metrics"]) == {"temp", "hum"}
            # declared precision: never 69.60000000000001
            assert msg["metrics"]["temp"] == round(69.6 + msg["seq"], 1)
            out.append(msg["seq"])
    return out


def influx_seqs(c: Consumer) -> list[int]:
    out = []
    for topic, payload, _ in c.messages:
        if topic.startswith("lp/"):
            for line in payload.decode().split("\n"):
                head, fields, ts = line.split(" ")[-2:] and line.rsplit(" ", 2)
                assert head.startswith("d1,") and "site=north\\ side" in head
                kv = dict(f.split("=", 1) for f in fields.split(","))
                out.append(int(kv["seq"].rstrip("i")))
                assert int(ts) == 1732780000 * 10**9 + out[-1] * 10**6
    return out


def thingsboard_seqs(c: Consumer) -> list[int]:
    out = []
    connected = False
    for topic, payload, _ in c.messages:
        if topic == "v1/gateway/connect":
            connected = True
        elif topic == "v1/gateway/telemetry":
            assert connected, "telemetry before v1/gateway/connect"
            for entry in json.loads(payload)["d1"]:
                out.append(entry["values"]["seq"])
                assert entry["ts"] == 1732780000000 + out[-1]
    return out


def homeassistant_seqs(c: Consumer) -> list[int]:
    out = []
    announced = False
    for topic, payload, _ in c.messages:
        if topic.startswith("homeassistant/sensor/gw1_d1/"):
            announced = True
        elif topic == "flux-edge/gw1/d1/state":
            assert announced, "state before its discovery config"
            out.append(json.loads(payload)["seq"])
    return out


SEQS = {"json": json_seqs, "influx": influx_seqs, "thingsboard": thingsboard_seqs,
        "homeassistant": homeassistant_seqs}
ENCODERS: dict[str, dict[str, Any]] = {
    "json": JSON, "influx": INFLUX, "thingsboard": {"type": "thingsboard"},
    "homeassistant": {"type": "homeassistant"},
}


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_json_one_message_per_reading_at_each_qos(tmp_path: Path, qos: int) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()

    async def scenario() -> None:
        sub = Consumer(broker)
        await sub.start()
        up = Uplink(cfg(broker, JSON, qos=qos), gateway=GW, state_dir=tmp_path / "state",
                    precision={("d1", "temp"): 1})
        await up.start()
        for i in range(200):
            up.add(poll(i))
            if i % 20 == 19:
                up.commit()
        assert await up.flush(20)
        await sub.until(lambda: len(json_seqs(sub)) >= 200)
        assert json_seqs(sub) == list(range(200))  # in order, none lost, none twice
        payload = next(p for t, p, _ in sub.messages if t.startswith("up/"))
        assert payload == (b'{"device":"d1","ts":1732780000.0,"seq":0,'
                           b'"metrics":{"temp":69.6,"hum":40.1}}')
        assert up.depth() == 0
        await up.close()
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_broker_outage_loses_nothing(tmp_path: Path, name: str) -> None:
    broker = Mosquitto(tmp_path, extra_config=f"persistence true\npersistence_location "
                       f"{tmp_path}/\n")
    broker.start()
    seqs = SEQS[name]

    async def scenario() -> None:
        sub = Consumer(broker)
        await sub.start()
        up = Uplink(cfg(broker, ENCODERS[name]), gateway=GW, state_dir=tmp_path / "state",
                    precision={("d1", "temp"): 1})
        await up.start()
        for i in range(50):
            up.add(poll(i))
        up.commit()
        await sub.until(lambda: len(seqs(sub)) >= 50)
        await sub.close()  # its session (clean_start False) queues what comes meanwhile
        await asyncio.to_thread(broker.stop)
        for i in range(50, 150):
            up.add(poll(i))
            up.commit()
        assert up.depth() > 0
        await asyncio.to_thread(broker.start)
        sub2 = Consumer(broker)
        sub2.messages = sub.messages
        await sub2.start()
        assert await up.flush(20)
        await sub2.until(lambda: len(set(seqs(sub2))) >= 150)
        got = seqs(sub2)
        assert sorted(set(got)) == list(range(150))
        firsts = list(dict.fromkeys(got))
        assert firsts == list(range(150))  # in order (duplicates possible: at-least-once)
        await up.close()
        await sub2.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


_CHILD = """
import asyncio, sys
from pathlib import Path
from flux_edge.config import UplinkConfig
from flux_edge.uplink.sender import Uplink
from tests.integration.test_uplink_encoders import ENCODERS, poll
import json

async def main() -> None:
    cfg = UplinkConfig(**json.loads(sys.argv[1]))
    up = Uplink(cfg, gateway="gw1", state_dir=Path(sys.argv[2]), precision={("d1", "temp"): 1})
    await up.start()
    for i in range(300):
        up.add(poll(i))
        if i % 10 == 9:
            up.commit()
    print("committed", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("name", list(ENCODERS))
def test_kill_9_loses_nothing_committed(tmp_path: Path, name: str) -> None:
    """A child commits 300 readings towards a broker that is down and is killed with SIGKILL;
    a new uplink on the same outbox delivers every one, in order."""
    broker = Mosquitto(tmp_path)
    seqs = SEQS[name]
    state = tmp_path / "state"
    c: dict[str, Any] = {"host": broker.host, "port": broker.port, "reconnect_min": 0.05,
         "reconnect_max": 0.3, "encoder": ENCODERS[name]}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(c), str(state)], stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONPATH": "."},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"committed\n"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    broker.start()

    async def scenario() -> None:
        sub = Consumer(broker)
        await sub.start()
        up = Uplink(UplinkConfig(**c), gateway=GW, state_dir=state)
        assert up.depth() > 0
        await up.start()
        assert await up.flush(20)
        await sub.until(lambda: len(seqs(sub)) >= 300)
        assert seqs(sub) == list(range(300))
        await up.close()
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


def test_influx_lines_are_accepted_by_a_real_influxdb(tmp_path: Path) -> None:
    """What the encoder publishes, written to influxd unchanged and queried back: types,
    escaped tags, string escaping and ns timestamps survive."""
    broker = Mosquitto(tmp_path)
    broker.start()
    (tmp_path / "influx").mkdir()
    db = InfluxDB(tmp_path / "influx")

    async def scenario() -> list[bytes]:
        sub = Consumer(broker, "lp/#")
        await sub.start()
        up = Uplink(cfg(broker, {**INFLUX, "measurement": "plant floor,1"}), gateway=GW,
                    state_dir=tmp_path / "state",
                    precision={("dev 1", "temp"): 1, ("d1", "temp"): 1})
        await up.start()
        ts = 1732780000.123
        up.add([
            Measurement(device="dev 1", name="temp", value=696 * 0.1, ts=ts, source="p,l=c"),
            Measurement(device="dev 1", name="count", value=-42, ts=ts, source="p,l=c"),
            Measurement(device="dev 1", name="run", value=True, ts=ts, source="p,l=c"),
            Measurement(device="dev 1", name="msg", value='say "hi" \\o/', ts=ts,
                        source="p,l=c"),
            Measurement(device="dev 1", name="field key", value=1.5, ts=ts, source="p,l=c"),
            Measurement(device="dev 1", name="back\\slash", value=2, ts=ts, source="p,l=c"),
        ])
        up.add(poll(7))
        up.commit()
        assert await up.flush(20)
        await sub.until(lambda: len(sub.messages) >= 1 and sum(
            p.count(b"\n") + 1 for _, p, _ in sub.messages) >= 2)
        await up.close()
        await sub.close()
        return [p for _, p, _ in sub.messages]

    try:
        payloads = run(scenario(), 60)
        db.create("t")
        for p in payloads:
            db.write("t", p)
        out = db.query('SELECT * FROM "plant floor,1" WHERE device = \'dev 1\'', "t")
        series = out["results"][0]["series"][0]
        row = dict(zip(series["columns"], series["values"][0], strict=True))
        assert row == {
            "time": 1732780000123000000, "temp": 69.6, "count": -42, "run": True,
            "msg": 'say "hi" \\o/', "field key": 1.5, "device": "dev 1", "gateway": GW,
            "site": "north side", "source": "p,l=c", "hum": None, "seq": None,
            "back\\slash": 2,
        }
        types = db.query('SHOW FIELD KEYS FROM "plant floor,1"', "t")
        kinds = dict(types["results"][0]["series"][0]["values"])
        assert kinds == {"count": "integer", "field key": "float", "msg": "string",
                         "run": "boolean", "temp": "float", "hum": "float", "seq": "integer",
                         "back\\slash": "integer"}
        d1 = db.query('SELECT temp, seq FROM "plant floor,1" WHERE device = \'d1\'',
                      "t")["results"][0]["series"][0]
        assert d1["values"] == [[1732780000007000000, 76.6, 7]]
    finally:
        db.close()
        broker.close()


class Gate:
    """A TCP port in front of a broker that refuses connections until opened: the broker 'is
    down' for whoever connects through it, while a consumer connected straight to the broker is
    already subscribed (starting the broker late raced the consumer's subscription against the
    uplink's first publish, which then reached nobody)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.open = False
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection(self.broker.host, self.broker.port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


def test_several_uplinks_a_slow_one_holds_no_other_back(tmp_path: Path) -> None:
    """[uplink] json to one broker, [uplink.extra.plant] influx to another, which is down:
    the first gets every reading at once; the second its backlog, in order, once it is up."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lan = Mosquitto(tmp_path / "a")
    plant = Mosquitto(tmp_path / "b")
    lan.start()
    plant.start()

    async def scenario() -> None:
        sub = Consumer(lan)
        await sub.start()
        sub2 = Consumer(plant)
        await sub2.start()
        gate = Gate(plant)
        await gate.start()
        extra = {"host": "127.0.0.1", "port": gate.port, "reconnect_min": 0.05,
                 "reconnect_max": 0.2, "encoder": INFLUX}
        up = Uplink(cfg(lan, JSON, extra={"plant": extra}), gateway=GW,
                    state_dir=tmp_path / "state", precision={("d1", "temp"): 1})
        assert list(up.extras) == ["plant"]
        assert up.extras["plant"].client_id == f"flux-edge-{GW}-uplink-plant"
        await up.start()
        for i in range(100):
            up.add(poll(i))
            up.commit()
        await sub.until(lambda: len(json_seqs(sub)) >= 100)
        assert json_seqs(sub) == list(range(100))
        assert up.extras["plant"].depth() == 100  # all waiting there, none held here
        assert (tmp_path / "state" / "outbox-plant.sqlite").exists()
        gate.open = True  # the plant broker is reachable from now on
        assert await up.flush(20)
        await sub2.until(lambda: len(influx_seqs(sub2)) >= 100)
        assert influx_seqs(sub2) == list(range(100))
        await up.close()
        await sub.close()
        await sub2.close()
        await gate.close()

    try:
        run(scenario(), 60)
    finally:
        lan.close()
        plant.close()
