"""The sparkplug_b encoder against a real mosquitto, checked by a host application written from
the Sparkplug B 3.0 specification (its own protobuf reader, below): birth before data, seq
continuity 0-255 per session, aliases from the birth, datatypes, DDEATH/DBIRTH when a device goes
bad and comes back, NDEATH (the will) with the NBIRTH's bdSeq on kill -9, a new NBIRTH after a
reconnect with the backlog delivered, rebirth on NCMD."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from flux_edge.config import UplinkConfig
from flux_edge.model import Measurement
from flux_edge.mqtt import MqttClient
from flux_edge.uplink.sender import Uplink
from tests.support import run
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENC = {"type": "sparkplug_b", "group_id": "plant1", "edge_node": "gw1"}


# --- a host application's reader, from the spec's sparkplug_b.proto ------------------------------


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _msg(b: bytes) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    i = 0
    while i < len(b):
        k, i = _varint(b, i)
        f, wt = k >> 3, k & 7
        v: Any
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        out.append((f, v))
    return out


def parse(payload: bytes) -> dict[str, Any]:
    p: dict[str, Any] = {"metrics": []}
    for f, v in _msg(payload):
        if f == 1:
            p["timestamp"] = v
        elif f == 3:
            p["seq"] = v
        elif f == 2:
            m: dict[str, Any] = {}
            for g, w in _msg(v):
                key = {1: "name", 2: "alias", 3: "timestamp", 4: "datatype", 5: "historical",
                       7: "null"}.get(g)
                if key == "name":
                    m[key] = w.decode()
                elif key:
                    m[key] = w
                elif g == 11:
                    m["value"] = w - (1 << 64) if w >= 1 << 63 else w
                elif g == 13:
                    m["value"] = struct.unpack("<d", w)[0]
                elif g == 14:
                    m["value"] = bool(w)
                elif g == 15:
                    m["value"] = w.decode()
                elif g == 10:
                    m["value"] = w
            p["metrics"].append(m)
    return p


class Host:
    """Checks every message against the edge node rules as it arrives."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = MqttClient("host", broker.host, broker.port, protocol="3.1.1")
        self.client.subscribe("spBv1.0/plant1/#", 1, self._on)
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.node_seq: int | None = None
        self.bdseq: int | None = None
        self.aliases: dict[tuple[str, int], str] = {}  # (device, alias) -> name
        self.types: dict[tuple[str, str], int] = {}
        self.alive: set[str] = set()
        self.values: dict[str, list[Any]] = {}  # device -> seq values in DDATA order
        self.errors: list[str] = []
        self._changed = asyncio.Event()

    def _on(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        parts = topic.split("/")
        kind, device = parts[2], (parts[4] if len(parts) > 4 else "")
        p = parse(payload)
        self.log.append((kind, p))
        err = self.errors.append
        if kind in ("NBIRTH", "DBIRTH", "DDEATH") and qos != 0:
            err(f"{kind} at QoS {qos}, the specification asks for 0")
        if kind == "NDEATH" and qos != 1:
            err(f"NDEATH at QoS {qos}, the specification asks for 1")
        if kind == "NDEATH":
            bd = [m["value"] for m in p["metrics"] if m.get("name") == "bdSeq"]
            if bd != [self.bdseq]:
                err(f"NDEATH bdSeq {bd} != NBIRTH's {self.bdseq}")
            self.node_seq = None
        elif kind == "NBIRTH":
            names = {m["name"]: m for m in p["metrics"]}
            if p.get("seq") != 0:
                err(f"NBIRTH seq {p.get('seq')}")
            if "bdSeq" not in names or "Node Control/Rebirth" not in names:
                err(f"NBIRTH metrics {sorted(names)}")
            self.bdseq = names["bdSeq"]["value"]
            self.node_seq = 0
            self.alive.clear()
        elif kind in ("DBIRTH", "DDATA", "DDEATH", "NDATA"):
            if self.node_seq is None:
                err(f"{kind} before NBIRTH")
            else:
                want = (self.node_seq + 1) % 256
                if p.get("seq") != want:
                    err(f"{kind} seq {p.get('seq')} != {want}")
                self.node_seq = p.get("seq")
            if kind == "DBIRTH":
                self.alive.add(device)
                for m in p["metrics"]:
                    self.aliases[(device, m["alias"])] = m["name"]
                    self.types[(device, m["name"])] = m["datatype"]
                    if "value" not in m:
                        err(f"DBIRTH metric without value {m}")
            elif kind == "DDEATH":
                self.alive.discard(device)
            elif kind == "DDATA":
                if device not in self.alive:
                    err(f"DDATA of {device} without DBIRTH")
                for m in p["metrics"]:
                    if "name" in m:
                        err("DDATA carries names, not aliases")
                    name = self.aliases.get((device, m.get("alias", -1)))
                    if name is None:
                        err(f"unknown alias {m.get('alias')}")
                    elif name == "seq":
                        self.values.setdefault(device, []).append(m["value"])
        self._changed.set()

    async def start(self) -> None:
        await self.client.connect(10)
        await self.client.wait_subscribed("spBv1.0/plant1/#")

    async def until(self, cond: Any) -> None:
        while not cond():
            self._changed.clear()
            await self._changed.wait()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.log]


def poll(i: int, device: str = "d1", quality: str = "good") -> list[Measurement]:
    ts = 1732780000.0 + i
    q: Any = quality
    return [
        Measurement(device=device, name="temp", value=696 * 0.1, ts=ts, unit="degC", quality=q),
        Measurement(device=device, name="run", value=i % 2 == 0, ts=ts, quality=q),
        Measurement(device=device, name="state", value="ok", ts=ts, quality=q),
        Measurement(device=device, name="seq", value=i, ts=ts, quality=q),
    ]


def cfg(broker: Mosquitto) -> UplinkConfig:
    return UplinkConfig(host=broker.host, port=broker.port, reconnect_min=0.05,
                        reconnect_max=0.3, encoder=ENC, status_topic="")


def test_birth_data_seq_aliases_and_device_death(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()

    async def scenario() -> None:
        host = Host(broker)
        await host.start()
        (tmp_path / "state").mkdir()
        up = Uplink(cfg(broker), gateway="gw1", state_dir=tmp_path / "state",
                    precision={("d1", "temp"): 1})
        await up.start()
        for i in range(300):  # past 255: seq wraps
            up.add(poll(i))
            up.add(poll(i, "d2"))
            if i == 100:
                up.add(poll(i, "d2", "bad"))  # d2 stops answering: DDEATH
        up.add([Measurement(device="d1", name="extra", value=1.5, ts=1732790000.0)])  # rebirth
        up.commit()
        assert await up.flush(30)
        await host.until(lambda: len(host.values.get("d1", [])) >= 300)
        await host.until(lambda: len(host.values.get("d2", [])) >= 300)
        assert host.errors == []
        assert host.kinds()[:3] == ["NBIRTH", "DBIRTH", "DDATA"]
        assert host.values["d1"] == list(range(300))
        assert host.values["d2"] == list(range(300))
        assert host.kinds().count("DDEATH") == 1
        assert host.kinds().count("DBIRTH") == 4  # d1, d2, d2 after its death, d1 with "extra"
        assert host.types[("d1", "temp")] == 10 and host.types[("d1", "run")] == 11
        assert host.types[("d1", "state")] == 12 and host.types[("d1", "seq")] == 4
        births = [p for k, p in host.log if k == "DBIRTH"]
        temp = next(m for m in births[0]["metrics"] if m["name"] == "temp")
        assert temp["value"] == 69.6  # the declared precision, not 69.60000000000001
        await up.close()
        await host.until(lambda: "NDEATH" in host.kinds())  # sent by hand on a clean close
        assert host.errors == []
        await host.client.close()

    try:
        run(scenario(), 40)
    finally:
        broker.close()


def test_reconnect_new_birth_then_the_backlog_and_rebirth_on_ncmd(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()

    async def scenario() -> None:
        host = Host(broker)
        await host.start()
        (tmp_path / "state").mkdir()
        # reconnects a second apart: host2 below subscribes right after the broker is back, and
        # must do so before the uplink's next attempt sends the new birth (with 0.05-0.3 s the
        # two raced on a loaded machine and the birth reached nobody)
        link = msgspec.structs.replace(cfg(broker), reconnect_min=1.0, reconnect_max=1.0)
        up = Uplink(link, gateway="gw1", state_dir=tmp_path / "state")
        await up.start()
        for i in range(20):
            up.add(poll(i))
        up.commit()
        await host.until(lambda: len(host.values.get("d1", [])) >= 20)
        await host.client.close()
        await asyncio.to_thread(broker.stop)
        for i in range(20, 60):
            up.add(poll(i))
            up.commit()
        await asyncio.to_thread(broker.start)
        host2 = Host(broker)
        host2.values = host.values
        await host2.start()
        assert await up.flush(30)
        await host2.until(lambda: len(host2.values["d1"]) >= 60)
        assert list(dict.fromkeys(host2.values["d1"])) == list(range(60))
        assert host2.errors == []  # the backlog follows a new NBIRTH and DBIRTH in sequence
        assert host2.kinds()[:2] == ["NBIRTH", "DBIRTH"]
        hist = [m.get("historical") for k, p in host2.log if k == "DDATA" for m in p["metrics"]]
        assert hist and all(hist)  # readings from before the session are historical
        # rebirth: NCMD with Node Control/Rebirth = true (Boolean 11, boolean_value 14)
        name = b"Node Control/Rebirth"
        metric = b"\x0a" + bytes([len(name)]) + name + b"\x20\x0b\x70\x01"
        ncmd = b"\x12" + bytes([len(metric)]) + metric
        n_births = host2.kinds().count("NBIRTH")
        pub = MqttClient("scada", broker.host, broker.port)
        await pub.connect(10)
        await pub.publish("spBv1.0/plant1/NCMD/gw1", ncmd, 1)
        await host2.until(lambda: host2.kinds().count("NBIRTH") > n_births)
        await host2.until(lambda: host2.kinds()[-1] == "DBIRTH")
        assert up.rebirths == 1 and host2.errors == []
        await pub.close()
        await up.close()
        await host2.client.close()

    try:
        run(scenario(), 40)
    finally:
        broker.close()


_CHILD = """
import asyncio, json, sys
from pathlib import Path
from flux_edge.config import UplinkConfig
from flux_edge.uplink.sender import Uplink
from tests.integration.test_uplink_sparkplug import poll

async def main() -> None:
    up = Uplink(UplinkConfig(**json.loads(sys.argv[1])), gateway="gw1", state_dir=Path(sys.argv[2]))
    await up.start()
    up.add(poll(0))
    up.commit()
    assert await up.flush(10)
    print("sent", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_kill_9_publishes_ndeath_with_the_births_bdseq(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    state = tmp_path / "state"
    state.mkdir()
    c = {"host": broker.host, "port": broker.port, "encoder": ENC, "status_topic": ""}

    async def scenario() -> list[int]:
        host = Host(broker)
        await host.start()
        bdseqs = []
        for _ in range(2):  # two runs: bdSeq moves on between them
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, json.dumps(c), str(state),
                stdout=subprocess.PIPE, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": "."},
            )
            assert child.stdout is not None
            assert await child.stdout.readline() == b"sent\n"
            await host.until(lambda: "DDATA" in host.kinds()[-1:])
            bdseqs.append(host.bdseq)
            child.send_signal(signal.SIGKILL)
            await child.wait()
            await host.until(lambda: host.kinds()[-1] == "NDEATH")
        assert host.errors == []  # NDEATH's bdSeq matched its NBIRTH's each time
        await host.client.close()
        return bdseqs  # type: ignore[return-value]

    try:
        bd = run(scenario(), 60)
        assert bd[1] == (bd[0] + 1) % 256
    finally:
        broker.close()
