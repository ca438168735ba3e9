"""The durable uplink (flux_edge/uplink) against a real mosquitto on 127.0.0.1.

The upstream side is watched by a subscriber with a persistent session (MQTT 3.1.1, clean
session off, QoS 1) on a broker with ``persistence true``. For a broker restart the subscriber
first takes everything so far and disconnects cleanly; the broker queues what the uplink
publishes meanwhile in the subscriber's session and saves it across the restart, and the
subscriber resumes the session afterwards. So "every id arrived" is checked deterministically,
without racing the uplink's reconnect, and without depending on what mosquitto 2.0.11 does with
messages it had written to a subscriber's socket when it shut down (they can be lost on the
subscriber's side: the connection is reset with them unread). Waits are event-driven and
bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import TlsConfig, UplinkConfig
from flux_edge.model import Measurement
from flux_edge.mqtt import MqttClient
from flux_edge.uplink.outbox import ROW_OVERHEAD
from flux_edge.uplink.sender import Uplink
from tests.conftest import free_port
from tests.support import run
from tests.support.mosquitto import HOST, Mosquitto

pytestmark = pytest.mark.integration

GW = "gw1"


def persistent_broker(tmp_path: Path, **kw: Any) -> Mosquitto:
    store = tmp_path / "store"
    store.mkdir()
    extra = kw.pop("extra_config", "")
    return Mosquitto(
        tmp_path, extra_config=f"persistence true\npersistence_location {store}/\n{extra}", **kw
    )


def cfg(broker: Mosquitto, **kw: Any) -> UplinkConfig:
    base: dict[str, Any] = {
        "host": broker.host, "port": broker.port, "reconnect_min": 0.05, "reconnect_max": 0.5,
    }
    base.update(kw)
    return UplinkConfig(**base)


def ms(start: int, n: int, devices: int = 1) -> list[Measurement]:
    return [
        Measurement(device=f"dev{i % devices}", name="temp", value=i, ts=1000.0 + i,
                    unit="degC", source="plc")
        for i in range(start, start + n)
    ]


class Upstream:
    """A subscriber on the upstream broker: records in arrival order (duplicates kept)."""

    def __init__(self, broker: Mosquitto, topic: str = f"flux-edge/{GW}/#",
                 client_id: str = "upstream", *, records: list[dict[str, Any]] | None = None,
                 **kw: Any) -> None:
        # MQTT 3.1.1 persistent session: mosquitto 2.0.11 does not restore MQTT 5 sessions
        # (session expiry) from its persistence file after a restart; 3.1.1 ones it does
        self.client = MqttClient(client_id, broker.host, broker.port, reconnect_min=0.05,
                                 reconnect_max=0.3, protocol="3.1.1", clean_start=False, **kw)
        self.topic = topic
        self.records: list[dict[str, Any]] = records if records is not None else []
        self.publishes: list[tuple[str, bytes, bool]] = []
        self._changed = asyncio.Event()
        self.client.subscribe(topic, 1, self._on)

    def _on(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.publishes.append((topic, payload, retain))
        if not topic.endswith("/status"):
            data = json.loads(payload)
            for rec in data if isinstance(data, list) else [data]:
                rec["_topic"] = topic
                self.records.append(rec)
        self._changed.set()

    async def start(self) -> None:
        await self.client.connect(10)
        await self.client.wait_subscribed(self.topic)

    async def close(self) -> None:
        await self.client.close()

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self._changed.clear()
            await self._changed.wait()

    def values(self) -> set[int]:
        return {r["value"] for r in self.records}

    def statuses(self) -> list[bytes]:
        return [p for t, p, _ in self.publishes if t.endswith("/status")]


def first_seen(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


async def eventually(cond: Callable[[], bool]) -> None:
    """For counters that no event announces (connection attempts, refused publishes); the
    scenario's overall timeout bounds it."""
    while not cond():  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def stop_broker(broker: Mosquitto) -> None:
    await asyncio.to_thread(broker.stop)


async def start_broker(broker: Mosquitto) -> None:
    await asyncio.to_thread(broker.start)


# --- format and order ---------------------------------------------------------------------------


def test_single_records_arrive_in_order_with_the_documented_payload(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker)
        await sub.start()
        up = Uplink(cfg(broker), gateway=GW, state_dir=tmp_path / "state")
        await up.start()
        for start in range(0, 600, 100):
            up.add(ms(start, 100, devices=3))
            assert up.commit() == 100
        assert await up.flush(20)
        await sub.until(lambda: len(sub.values()) == 600)
        recs = sub.records
        assert [r["value"] for r in recs] == list(range(600))  # in order, none twice
        assert [r["seq"] for r in recs] == sorted(r["seq"] for r in recs)
        r = recs[7]
        assert r == {
            "id": f"{up.outbox_id}-{r['seq']}", "seq": r["seq"], "gateway": GW, "source": "plc",
            "device": "dev1", "name": "temp", "value": 7, "unit": "degC", "quality": "good",
            "ts": 1007.0, "_topic": f"flux-edge/{GW}/dev1/temp",
        }
        assert len({x["id"] for x in recs}) == 600
        assert up.depth() == 0 and up.oldest_ts() is None
        s = up.stats
        assert (s.staged, s.committed, s.acked, s.published, s.dropped) == (600, 600, 600, 600, 0)
        assert up.connected
        await up.close()
        await up.close()  # idempotent
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


def test_batches_carry_consecutive_records_of_one_topic(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker)
        await sub.start()
        up = Uplink(
            cfg(broker, format="batch", batch_max=40, topic="flux-edge/{gateway}/{device}"),
            gateway=GW, state_dir=tmp_path / "state",
        )
        # committed before the connection: the backlog is there to be batched
        up.add(ms(0, 100))  # dev0 only
        up.add(ms(100, 30, devices=2))  # alternating dev0/dev1
        up.add(ms(130, 50))
        up.commit()
        await up.start()
        assert await up.flush(20)
        await sub.until(lambda: len(sub.values()) == 180)
        data = [json.loads(p) for t, p, _ in sub.publishes if not t.endswith("/status")]
        assert all(isinstance(d, list) and 1 <= len(d) <= 40 for d in data)
        assert [len(d) for d in data[:3]] == [40, 40, 21]  # dev0 up to value 100
        assert [len(d) for d in data[-2:]] == [40, 10]
        for (topic, _p, _r), batch in zip(
            [p for p in sub.publishes if not p[0].endswith("/status")], data, strict=True
        ):
            assert {f"flux-edge/{GW}/{rec['device']}" for rec in batch} == {topic}
        assert [r["value"] for r in sub.records] == list(range(180))
        assert up.stats.published == len(data) and up.stats.acked == 180
        await up.close()
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


def test_a_backlog_from_before_a_restart_is_sent_in_order(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # not started yet: the upstream is down

    async def scenario() -> None:
        up = Uplink(cfg(broker), gateway=GW, state_dir=tmp_path / "state")
        await up.start()
        up.add(ms(0, 300))
        up.commit()
        assert not await up.flush(0.3) and up.depth() == 300 and up.oldest_ts() == 1000.0
        await up.close()  # the daemon stops with the broker still down
        await start_broker(broker)
        sub = Upstream(broker)
        await sub.start()
        up = Uplink(cfg(broker), gateway=GW, state_dir=tmp_path / "state")
        assert up.depth() == 300
        await up.start()
        up.add(ms(300, 10))
        up.commit()
        assert await up.flush(20)
        await sub.until(lambda: len(sub.values()) == 310)
        assert [r["value"] for r in sub.records] == list(range(310))
        await up.close()
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


# --- outages --------------------------------------------------------------------------------------


async def quiesce_and_leave(up: Uplink, sub: Upstream, produced: int) -> None:
    """Everything so far acknowledged and received; then the subscriber disconnects cleanly
    (its session stays on the broker and collects what comes next)."""
    assert await up.flush(20)
    await sub.until(lambda: len(sub.values()) == produced)
    await sub.close()


async def resume(broker: Mosquitto, sub: Upstream) -> Upstream:
    again = Upstream(broker, records=sub.records)
    await again.start()
    return again


def test_a_broker_outage_loses_nothing_and_the_backlog_comes_in_order(tmp_path: Path) -> None:
    broker = persistent_broker(tmp_path)
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker)
        await sub.start()
        up = Uplink(cfg(broker, max_inflight=20), gateway=GW, state_dir=tmp_path / "state")
        await up.start()
        produced = 0

        async def produce(seconds: float) -> None:
            nonlocal produced
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                up.add(ms(produced, 25))
                produced += 25
                up.commit()
                await asyncio.sleep(0.02)

        await produce(0.3)
        await quiesce_and_leave(up, sub, produced)
        await produce(0.3)
        stop = asyncio.create_task(stop_broker(broker))
        await produce(0.3)  # publishes in flight while the broker goes away
        await stop
        assert not broker.running
        await produce(2.5)  # the outage: everything goes to the outbox
        assert up.depth() > 100 and not up.connected
        await start_broker(broker)
        await produce(0.5)
        assert await up.flush(30), f"{up.depth()} record(s) still waiting"
        sub = await resume(broker, sub)
        await sub.until(lambda: len(sub.values()) == produced)
        values = [r["value"] for r in sub.records]
        assert set(values) == set(range(produced))  # every record, duplicates allowed
        assert first_seen(values) == list(range(produced))  # in order
        seqs = first_seen([r["seq"] for r in sub.records])
        assert seqs == sorted(seqs)
        assert up.stats.dropped == 0 and up.stats.reconnects >= 1
        assert up.stats.committed == up.stats.acked == produced
        await up.close()
        await sub.close()

    try:
        run(scenario(), 90)
    finally:
        broker.close()


def test_a_full_outbox_during_an_outage_drops_the_oldest_exactly(tmp_path: Path) -> None:
    broker = persistent_broker(tmp_path)
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker)
        await sub.start()
        # room for ~150 rows of ~190 bytes
        up = Uplink(cfg(broker, outbox_max_size=150 * (ROW_OVERHEAD + 130), max_inflight=10),
                    gateway=GW, state_dir=tmp_path / "state")
        await up.start()
        up.add(ms(0, 50))
        up.commit()
        await quiesce_and_leave(up, sub, 50)
        up.add(ms(50, 30))  # some of these are in flight when the broker goes
        up.commit()
        await asyncio.sleep(0)
        await stop_broker(broker)
        produced = 80
        for _ in range(100):  # 1,000 records while the broker is down
            up.add(ms(produced, 10))
            produced += 10
            up.commit()
            await asyncio.sleep(0)
        dropped = up.stats.dropped
        assert dropped > 700 and up.depth() < 200
        await start_broker(broker)
        assert await up.flush(30)
        sub = await resume(broker, sub)
        await sub.until(lambda: len(sub.values()) + dropped == produced)
        delivered = sub.values()
        assert len(delivered) + up.stats.dropped == produced  # exactly: nothing silent
        missing = sorted(set(range(produced)) - delivered)
        # one block of the oldest unsent records: before it what was delivered or in flight,
        # after it the newest
        assert missing == list(range(missing[0], missing[0] + len(missing)))
        assert missing[0] >= 50 and missing[-1] < produced - 100
        s = up.stats
        assert s.committed == s.acked + s.dropped + up.depth()
        await up.close()
        await sub.close()

    try:
        run(scenario(), 90)
    finally:
        broker.close()


# --- status ---------------------------------------------------------------------------------------


def test_last_will_offline_when_the_link_dies_and_online_after_reconnect(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker, topic=f"flux-edge/{GW}/status")
        await sub.start()
        up = Uplink(cfg(broker), gateway=GW, state_dir=tmp_path / "state")
        await up.start()
        await sub.until(lambda: sub.statuses() == [b"online"])
        up._client.abort_connection("test: link cut")  # no DISCONNECT: the broker sends the will
        await sub.until(lambda: sub.statuses()[1:2] == [b"offline"])
        await sub.until(lambda: sub.statuses()[2:3] == [b"online"])
        assert up.stats.reconnects == 1
        up.add(ms(0, 5))
        up.commit()
        assert await up.flush(10)
        await up.close()
        await sub.until(lambda: sub.statuses()[-1:] == [b"offline"])
        assert sub.statuses() == [b"online", b"offline", b"online", b"offline"]
        await sub.close()
        # retained: a newcomer learns the gateway is offline
        late = Upstream(broker, topic=f"flux-edge/{GW}/status", client_id="late")
        await late.start()
        await late.until(lambda: bool(late.publishes))
        assert late.publishes == [(f"flux-edge/{GW}/status", b"offline", True)]
        await late.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


# --- TLS ------------------------------------------------------------------------------------------


def make_pki(d: Path) -> dict[str, Path]:
    """A test CA, a broker certificate for 127.0.0.1 and a client certificate, all from it."""

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    p = {k: d / f"{k}.pem" for k in ("ca", "ca_key", "srv", "srv_key", "cli", "cli_key")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", str(p["ca_key"]), "-out", str(p["ca"]), "-days", "2",
         "-subj", "/CN=flux-edge test CA")
    for name, cn, ext in (("srv", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                          ("cli", "gw1", "extendedKeyUsage=clientAuth")):
        csr = d / f"{name}.csr"
        extfile = d / f"{name}.ext"
        extfile.write_text(ext + "\n")
        ossl("req", "-new", *ec, "-keyout", str(p[f"{name}_key"]), "-out", str(csr),
             "-subj", f"/CN={cn}")
        ossl("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
             "-CAcreateserial", "-out", str(p[name]), "-days", "2", "-extfile", str(extfile))
    return p


def test_tls_with_a_client_certificate_and_a_password(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls_port = free_port()
    broker = Mosquitto(
        tmp_path, users={"gateway": "s3cret", "reader": "r3ad"},
        extra_config=(
            f"listener {tls_port} {HOST}\ncafile {pki['ca']}\ncertfile {pki['srv']}\n"
            f"keyfile {pki['srv_key']}\nrequire_certificate true\n"
        ),
    )
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker, username="reader", password="r3ad")
        await sub.start()
        tls = TlsConfig(ca_file=str(pki["ca"]), cert_file=str(pki["cli"]),
                        key_file=str(pki["cli_key"]))
        # without the client certificate the broker refuses the handshake
        anon = Uplink(cfg(broker, port=tls_port, username="gateway", password="s3cret",
                          tls=TlsConfig(ca_file=str(pki["ca"])), client_id="no-cert"),
                      gateway=GW, state_dir=tmp_path / "s1")
        await anon.start()
        # a wrong password is refused with a reason
        badpw = Uplink(cfg(broker, port=tls_port, username="gateway", password="nope", tls=tls,
                           client_id="bad-pw"), gateway=GW, state_dir=tmp_path / "s2")
        await badpw.start()
        up = Uplink(cfg(broker, port=tls_port, username="gateway", password="s3cret", tls=tls),
                    gateway=GW, state_dir=tmp_path / "s3")
        await up.start()
        up.add(ms(0, 20))
        up.commit()
        assert await up.flush(20)
        await sub.until(lambda: len(sub.values()) == 20)
        assert [r["value"] for r in sub.records] == list(range(20))
        sock = up._client.socket()
        assert isinstance(sock, ssl.SSLSocket) and sock.getpeercert()  # really TLS
        await eventually(lambda: "refused the connection" in badpw.stats.last_error)
        await eventually(lambda: "certificate required" in anon.stats.last_error)
        assert not anon.connected and not badpw.connected
        for u in (anon, badpw, up):
            await u.close()
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()


# --- refused publishes ----------------------------------------------------------------------------


def test_refused_publishes_stay_in_the_outbox_and_go_once_allowed(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite flux-edge/{GW}/dev0/#\ntopic readwrite flux-edge/{GW}/status\n"
                   "topic read #\n")
    broker = Mosquitto(tmp_path, extra_config=f"acl_file {acl}")
    broker.start()

    async def scenario() -> None:
        sub = Upstream(broker)
        await sub.start()
        up = Uplink(cfg(broker, reconnect_min=0.05, reconnect_max=0.2), gateway=GW,
                    state_dir=tmp_path / "state")
        await up.start()
        up.add(ms(0, 20, devices=2))  # dev1 may not publish
        up.commit()
        # refused, read again, refused again ...; the allowed ones all go
        await eventually(lambda: up.stats.publish_errors >= 3 and up.depth() == 10)
        await sub.until(lambda: len(sub.values()) >= 10)
        assert "Not authorized" in up.stats.last_error
        assert sub.values() == set(range(0, 20, 2))
        # the operator fixes the ACL; mosquitto re-reads it on SIGHUP
        acl.write_text("topic readwrite #\n")
        assert broker._proc is not None
        broker._proc.send_signal(signal.SIGHUP)
        assert await up.flush(20)
        await sub.until(lambda: len(sub.values()) == 20)
        odd = first_seen([r["value"] for r in sub.records if r["value"] % 2])
        assert odd == list(range(1, 20, 2))  # the held-back ones in order
        assert up.stats.acked == 20 and up.stats.dropped == 0
        await up.close()
        await sub.close()

    try:
        run(scenario(), 60)
    finally:
        broker.close()
