"""MQTT adapter and MQTT sources against a real mosquitto on 127.0.0.1 (tests/support/mosquitto.py).

Waits are bounded and event-driven: every scenario runs under a timeout and awaits the
readings/status changes it expects instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from flux_edge.errors import SourceError
from flux_edge.model import KIND_BYTES, Quality, Reading
from flux_edge.mqtt import MqttClient, MqttError, TlsSettings, Will
from flux_edge.sources.mqtt_in import MqttSourceClient
from flux_edge.sources.mqtt_kind import MqttSource, MqttSubscription
from tests.support.mosquitto import HOST, Mosquitto

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Collector:
    """emit(): keeps readings; tests await a condition on them. Optional delay per reading."""

    def __init__(self, delay: float = 0.0) -> None:
        self.readings: list[Reading] = []
        self.delay = delay
        self._changed = asyncio.Event()

    async def __call__(self, reading: Reading) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.readings.append(reading)
        self._changed.set()

    async def until(self, cond: Callable[[list[Reading]], bool]) -> None:
        while not cond(self.readings):
            self._changed.clear()
            await self._changed.wait()

    def seqs(self, topic: str) -> list[int]:
        return [int(r.payload) for r in self.readings if r.topic == topic]


class Status:
    """on_status(): records calls; tests await a device reaching a quality."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Quality, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, device: str, quality: Quality, error: str) -> None:
        self.calls.append((device, quality, error))
        self._changed.set()

    async def until(self, device: str, quality: Quality) -> str:
        while True:
            for d, q, e in reversed(self.calls):
                if d == device:
                    if q == quality:
                        return e
                    break
            self._changed.clear()
            await self._changed.wait()


async def until(cond: Callable[[], bool], step: float = 0.01) -> None:
    """For state that has no event of its own (health fields): poll, bounded by run()'s timeout."""
    while not cond():  # noqa: ASYNC110 - health fields have no event to wait on
        await asyncio.sleep(step)


def mqtt_source(broker: Mosquitto, *topics: tuple[str, int], **kw: Any) -> MqttSource:
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.5)
    return MqttSource(
        host=broker.host,
        port=broker.port,
        topics=tuple(MqttSubscription(topic=t, qos=q) for t, q in topics),
        **kw,
    )


async def subscriber(
    broker: Mosquitto, topic_filter: str, qos: int, handler: Any, name: str = "sub", **kw: Any
) -> MqttClient:
    """A client connected to ``broker`` with ``handler`` subscribed to ``topic_filter``."""
    client = MqttClient(name, broker.host, broker.port, **kw)
    client.subscribe(topic_filter, qos, handler)
    await client.connect(timeout=5)
    await client.wait_subscribed(topic_filter)
    return client


async def publisher(broker: Mosquitto, name: str = "pub") -> MqttClient:
    client = MqttClient(name, broker.host, broker.port, reconnect_min=0.05, reconnect_max=0.5)
    await client.connect(timeout=5)
    return client


async def started(source: MqttSourceClient) -> asyncio.Task[None]:
    """Run the source and return once its subscriptions are granted."""
    task = asyncio.create_task(source.run())
    for sub in source.cfg.topics:
        await source.client.wait_subscribed(sub.topic)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- receiving ----------------------------------------------------------------------------------


def test_qos_0_1_2_subscriptions_receive_every_message(broker: Mosquitto) -> None:
    n = 300

    async def scenario() -> None:
        out = Collector()
        wall = iter(range(10**9))
        cfg = mqtt_source(broker, ("t/q0", 0), ("t/q1", 1), ("t/q2", 2), device="meter")
        src = MqttSourceClient("bus", cfg, out, wall=lambda: float(next(wall)))
        task = await started(src)
        assert src.client.granted == {"t/q0": 0, "t/q1": 1, "t/q2": 2}
        pub = await publisher(broker)
        await asyncio.gather(*(
            pub.publish(f"t/q{q}", b"%d" % i, qos=q) for i in range(n) for q in (0, 1, 2)
        ))
        # QoS 0 has no delivery guarantee in general, but on loopback with room in every queue
        # (broker limits set by the fixture, local buffer 1000) nothing may be lost either.
        await out.until(lambda rs: len(rs) >= 3 * n)
        for q in (1, 2):
            assert sorted(out.seqs(f"t/q{q}")) == list(range(n)), f"QoS {q} lost messages"
        assert len(out.seqs("t/q2")) == n  # exactly once
        assert sorted(set(out.seqs("t/q0"))) == list(range(n))
        r = out.readings[0]
        assert (r.source, r.device, r.kind) == ("bus", "meter", KIND_BYTES)
        assert [r.ts for r in out.readings] == sorted(r.ts for r in out.readings)
        h = src.health["bus"]
        assert h.quality == "good" and h.total_errors == 0 and h.polls == 3 * n
        assert h.last_success_ts is not None
        await pub.close()
        await stop(task)

    run(scenario())


def test_wildcard_subscriptions(broker: Mosquitto) -> None:
    async def scenario() -> None:
        out = Collector()
        cfg = mqtt_source(broker, ("plant/+/temp", 1), ("logs/#", 0))
        src = MqttSourceClient("plant", cfg, out)
        task = await started(src)
        pub = await publisher(broker)
        delivered = ["plant/a/temp", "plant/b/temp", "logs", "logs/x", "logs/x/y/z"]
        ignored = ["plant/a/hum", "plant/a/b/temp", "plant/temp", "other/logs"]
        for t in ignored + delivered:
            await pub.publish(t, t.encode(), qos=1)
        await pub.publish("logs/end", b"end", qos=1)  # a marker: everything before it arrived
        await out.until(lambda rs: any(r.topic == "logs/end" for r in rs))
        got = [r.topic for r in out.readings if r.topic != "logs/end"]
        assert sorted(got) == sorted(delivered)
        assert all(r.payload == r.topic.encode() for r in out.readings if r.topic != "logs/end")
        assert {r.device for r in out.readings} == {"plant"}
        await pub.close()
        await stop(task)

    run(scenario())


def test_device_from_topic_and_unmatched_topics_are_counted(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        out = Collector()
        cfg = mqtt_source(broker, ("site/#", 1), device_from_topic="site/{device}/telemetry")
        src = MqttSourceClient("site", cfg, out)
        task = await started(src)
        pub = await publisher(broker)
        await pub.publish("site/boiler/telemetry", b"1")
        for i in range(5):
            await pub.publish(f"site/boiler/status{i}", b"x")
        await pub.publish("site/pump/telemetry", b"2")
        await out.until(lambda rs: len(rs) == 2)
        assert [(r.device, r.payload) for r in out.readings] == [("boiler", b"1"), ("pump", b"2")]
        h = src.health["site"]
        assert src.stats.unmatched == 5 and h.total_errors == 5
        assert "site/boiler/status4" in h.last_error and "site/{device}/telemetry" in h.last_error
        assert h.polls == 7 and h.quality == "good"  # a stray topic is not a broken connection
        await pub.close()
        await stop(task)

    with caplog.at_level(logging.WARNING, logger="flux_edge.source.site"):
        run(scenario())
    warnings = [r for r in caplog.records if "does not match" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line for five strays


def test_slow_pipeline_throttles_the_broker_instead_of_buffering(broker: Mosquitto) -> None:
    """QoS 1 messages are acknowledged only once emit() took them, so with a slow emit the
    broker holds the backlog (Receive Maximum = max_inflight) and nothing is lost."""
    n, window = 400, 10

    async def scenario() -> None:
        out = Collector(delay=0.001)
        cfg = mqtt_source(broker, ("slow", 1), max_inflight=window)
        src = MqttSourceClient("slow", cfg, out, buffer_size=5)
        task = await started(src)
        pub = await publisher(broker)
        await asyncio.gather(*(pub.publish("slow", b"%d" % i, qos=1) for i in range(n)))
        await out.until(lambda rs: len(rs) >= n)
        assert out.seqs("slow") == list(range(n))  # none lost, in order
        assert src.stats.overflow == 0
        # bounded: the broker's window, or (mosquitto 2.0.11 overruns it) the pause threshold
        assert src.stats.buffered_max <= 5 + window + 1
        await pub.close()
        await stop(task)

    run(scenario())


def test_qos0_overflow_is_counted_not_silent(broker: Mosquitto) -> None:
    n = 200

    async def scenario() -> None:
        gate = asyncio.Event()

        async def blocked(reading: Reading) -> None:
            await gate.wait()

        cfg = mqtt_source(broker, ("fast", 0))
        src = MqttSourceClient("fast", cfg, blocked, buffer_size=20)
        task = await started(src)
        pub = await publisher(broker)
        for i in range(n):
            await pub.publish("fast", b"%d" % i, qos=0)
        await until(lambda: src.stats.received == n)
        assert src.stats.overflow == n - 20  # the first 20 wait in the buffer
        assert src.stats.pauses == 0  # QoS 0 never pauses the socket
        h = src.health["fast"]
        assert h.total_errors == src.stats.overflow and "buffer full" in h.last_error
        gate.set()
        await pub.close()
        await stop(task)

    run(scenario())


# --- connection ---------------------------------------------------------------------------------


def test_source_reconnects_after_the_broker_restarts(broker: Mosquitto) -> None:
    async def scenario() -> None:
        out = Collector()
        status = Status()
        cfg = mqtt_source(broker, ("r/#", 1), device_from_topic="r/{device}")
        src = MqttSourceClient("r", cfg, out, on_status=status)
        task = await started(src)
        pub = await publisher(broker)
        await pub.publish("r/dev1", b"before")
        await out.until(lambda rs: len(rs) == 1)
        assert status.calls == []  # the first connection is no news

        broker.stop()
        err = await status.until("dev1", "bad")
        assert "127.0.0.1" in err
        h = src.health["r"]
        assert h.quality == "bad"
        assert h.total_errors >= 1

        await until(lambda: h.consecutive_errors >= 2)  # attempts fail while it is down
        assert "connection refused" in h.last_error
        broker.start()  # same port
        await status.until("dev1", "good")
        assert h.quality == "good"  # type: ignore[comparison-overlap]  # changed by callbacks
        assert h.consecutive_errors == 0
        assert await src.client.wait_subscribed("r/#") == 1  # subscriptions restored
        await pub.wait_connected()
        await pub.publish("r/dev1", b"after")
        await out.until(lambda rs: len(rs) == 2)
        assert out.readings[-1].payload == b"after"
        assert src.client.stats.connects == 2
        await pub.close()
        await stop(task)

    run(scenario())


def test_session_survives_a_dropped_connection(broker: Mosquitto) -> None:
    """QoS 1 messages published while the source's link is down arrive after the reconnect
    (clean start on the first connection only, session expiry > 0)."""
    n = 50

    async def scenario() -> None:
        out = Collector()
        cfg = mqtt_source(broker, ("s", 1), reconnect_min=0.3, reconnect_max=0.3)
        status = Status()
        src = MqttSourceClient("s", cfg, out, on_status=status)
        task = await started(src)
        pub = await publisher(broker)
        src.client.abort_connection("test: link down")
        await status.until("s", "bad")
        assert src.health["s"].last_error.endswith("test: link down")
        for i in range(n):  # published while the source is offline
            await pub.publish("s", b"%d" % i, qos=1)
        await out.until(lambda rs: len(rs) >= n)
        assert out.seqs("s") == list(range(n))
        assert src.client.stats.connects == 2
        await pub.close()
        await stop(task)

    run(scenario())


def test_tcp_nodelay_and_inflight_window_on_the_client_socket(broker: Mosquitto) -> None:
    async def scenario() -> None:
        client = await publisher(broker, "nodelay")
        sock = client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await client.close()
        assert client.socket() is None

    run(scenario())


def test_refused_connection_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here

    async def scenario() -> None:
        cfg = MqttSource(host=HOST, port=port, topics=(MqttSubscription(topic="x"),),
                         reconnect_min=0.05, reconnect_max=0.1)
        src = MqttSourceClient("nobody", cfg, Collector())
        task = asyncio.create_task(src.run())
        h = src.health["nobody"]
        await until(lambda: h.consecutive_errors >= 3)
        assert h.quality == "bad"
        assert h.last_error == f"MQTT broker {HOST}:{port}: connection refused " \
            "(is the broker running and listening on this port?)"
        await stop(task)

        client = MqttClient("c", HOST, port, reconnect_min=0.05)
        with pytest.raises(MqttError, match=r"127\.0\.0\.1:\d+: not connected after 0\.3 s: "
                           "connection refused"):
            await client.connect(timeout=0.3)
        await client.close()

    with caplog.at_level(logging.WARNING, logger="flux_edge.source.nobody"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "flux_edge.source.nobody"]
    assert len(lines) == 1 and "connection refused" in lines[0]  # once, not per attempt


def test_bad_credentials_are_reported(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"gw": "right"})
    broker.start()

    async def scenario() -> None:
        protocols: tuple[Literal["5", "3.1.1"], ...] = ("5", "3.1.1")
        for protocol in protocols:
            client = MqttClient(f"bad-{protocol}", broker.host, broker.port, username="gw",
                                password="wrong", protocol=protocol, reconnect_min=0.05)
            with pytest.raises(MqttError) as info:
                await client.connect(timeout=0.5)
            assert "bad user name or password" in info.value.reason or \
                "not authorised" in info.value.reason, info.value.reason
            await client.close()

        good = MqttClient("good", broker.host, broker.port, username="gw", password="right")
        await good.connect(timeout=5)
        await good.close()

        cfg = mqtt_source(broker, ("x", 1), username="gw", password="nope")
        src = MqttSourceClient("auth", cfg, Collector())
        task = asyncio.create_task(src.run())
        h = src.health["auth"]
        await until(lambda: h.consecutive_errors >= 1)
        assert h.quality == "bad" and "broker refused the connection" in h.last_error
        await stop(task)

    try:
        run(scenario())
    finally:
        broker.close()


def test_no_connack_times_out(tmp_path: Path) -> None:
    """A port that accepts TCP but never speaks MQTT."""

    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            await reader.read(1 << 16)
            writer.close()

        server = await asyncio.start_server(silent, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        client = MqttClient("c", HOST, port, connect_timeout=0.2, reconnect_min=0.05)
        with pytest.raises(MqttError, match=r"did not answer CONNECT within 0\.2 s"):
            await client.connect(timeout=0.5)
        await client.close()
        server.close()
        await server.wait_closed()

    run(scenario())


def test_refused_subscription_marks_the_source_bad(tmp_path: Path) -> None:
    """The dynamic-security plugin lets client "gw" subscribe to allowed/# only."""
    plugin = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
    if not plugin.exists():
        pytest.skip(f"{plugin} missing")
    dynsec = tmp_path / "dynsec.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(dynsec), "gw", "secret"],
                   check=True, capture_output=True)
    doc = json.loads(dynsec.read_text())
    (role,) = doc["roles"]
    role["acls"] = [a for a in role["acls"] if a["acltype"] != "subscribePattern"]
    role["acls"].append({"acltype": "subscribePattern", "topic": "allowed/#", "allow": True})
    dynsec.write_text(json.dumps(doc))
    broker = Mosquitto(
        tmp_path, extra_config=f"plugin {plugin}\nplugin_opt_config_file {dynsec}"
    )
    broker.start()

    async def scenario() -> None:
        protocols: tuple[Literal["5", "3.1.1"], ...] = ("5", "3.1.1")
        for protocol in protocols:
            refused: list[tuple[str, str]] = []
            client = MqttClient(f"acl-{protocol}", broker.host, broker.port, username="gw",
                                password="secret", protocol=protocol,
                                on_subscribe_error=lambda *fr: refused.append(fr))  # noqa: B023
            client.subscribe("allowed/x", 1, lambda *a: None)
            client.subscribe("secret/x", 1, lambda *a: None)
            await client.connect(timeout=5)
            why = "Not authorized" if protocol == "5" else r"failure \(MQTT 3\.1\.1 gives no"
            with pytest.raises(MqttError, match=f"subscription 'secret/x' refused: {why}"):
                await client.wait_subscribed("secret/x")
            assert refused[0][0] == "secret/x" and client.granted == {"allowed/x": 1}
            # a publish the ACL denies: MQTT 5 says so in the PUBACK (0x87), which the fast path
            # leaves to paho; MQTT 3.1.1 cannot say so (a plain PUBACK)
            if protocol == "5":
                with pytest.raises(MqttError, match="refused the message: Not authorized"):
                    await client.publish("secret/x", b"no", qos=1)
                assert client.stats.fast_acked == 0
            else:
                await client.publish("secret/x", b"no", qos=1)
                assert client.stats.fast_acked == 1
            await client.close()

        cfg = mqtt_source(broker, ("allowed/x", 1), ("secret/x", 1), username="gw",
                          password="secret")
        src = MqttSourceClient("acl", cfg, Collector())
        task = asyncio.create_task(src.run())
        h = src.health["acl"]
        await until(lambda: "secret/x" in h.last_error)
        assert "refused" in h.last_error and h.quality == "bad"
        assert src.client.granted == {"allowed/x": 1}
        await stop(task)

    try:
        run(scenario())
    finally:
        broker.close()


# --- the adapter's publish side (used by actions and the uplink) ---------------------------------


def test_publish_waits_for_the_broker_and_completes_after_it_comes_up(
    broker: Mosquitto,
) -> None:
    async def scenario() -> None:
        broker.stop()
        client = MqttClient("uplink", broker.host, broker.port, reconnect_min=0.05,
                            reconnect_max=0.2)
        client.start()
        sent = asyncio.create_task(client.publish("up/1", b"hello", qos=1))
        await until(lambda: client.stats.connect_failures >= 2)
        assert not sent.done()
        broker.start()
        await sent  # acknowledged by the broker
        assert client.stats.published == 1
        await client.close()
        with pytest.raises(MqttError, match="client is closed"):
            await client.publish("up/1", b"late")

    run(scenario())


def test_an_awaitable_handler_delays_the_ack(broker: Mosquitto) -> None:
    """The broker keeps at most Receive Maximum (max_inflight) QoS 1 messages unacknowledged
    with us: a handler that has not finished holds the rest back at the broker."""
    n, window = 30, 8

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        held: list[asyncio.Future[None]] = []
        seen: list[bytes] = []
        release = False

        def handler(topic: str, payload: bytes, qos: int, retain: bool) -> Any:
            seen.append(payload)
            if release:
                return None  # acknowledged at once
            fut: asyncio.Future[None] = loop.create_future()
            held.append(fut)
            return fut

        sub = await subscriber(broker, "held", 1, handler, name="held", max_inflight=window)
        pub = await publisher(broker)
        await asyncio.gather(*(pub.publish("held", b"%d" % i, qos=1) for i in range(n)))
        await until(lambda: len(seen) == window)
        await asyncio.sleep(0.1)  # nothing more may come while all of them are held
        assert len(seen) == window
        release = True
        for fut in reversed(held):  # completing out of order still acknowledges in order
            fut.set_result(None)
        await until(lambda: len(seen) >= n)
        assert [int(p) for p in seen] == list(range(n))
        await pub.close()
        await sub.close()

    run(scenario())


def test_publish_qos_round_trip_and_retain(broker: Mosquitto) -> None:
    async def scenario() -> None:
        pub = await publisher(broker)
        await pub.publish("ret/a", b"kept", qos=1, retain=True)
        got: list[tuple[str, bytes, int, bool]] = []
        done = asyncio.Event()
        sub = MqttClient("sub", broker.host, broker.port)

        def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            got.append((topic, payload, qos, retain))
            done.set()

        sub.subscribe("ret/#", 2, handler)
        await sub.connect(timeout=5)
        await done.wait()
        assert got == [("ret/a", b"kept", 1, True)]
        with pytest.raises(ValueError, match="wildcard"):
            await pub.publish("ret/#", b"x")
        await pub.close()
        await sub.close()

    run(scenario())


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_pubacks_of_qos1_publishes_take_the_fast_path(
    broker: Mosquitto, protocol: Literal["5", "3.1.1"]
) -> None:
    # issue #12: paho spent most of its PUBACK time on MQTT 5 Properties objects; the client
    # decodes successful ones itself and hands them to paho's store. Half of these go to a topic
    # nobody subscribes to: mosquitto's MQTT 5 PUBACK then carries 0x10 "no matching
    # subscribers", a success.
    async def scenario() -> tuple[int, int, int, int]:
        got: list[bytes] = []
        sub = await subscriber(broker, "heard/#", 1, lambda t, p, q, r: got.append(p))
        pub = MqttClient("pub-acks", broker.host, broker.port, protocol=protocol)
        await pub.connect(timeout=5)
        sends = [pub.publish(f"heard/{i}", b"%d" % i, qos=1) for i in range(200)]
        sends += [pub.publish(f"unheard/{i}", b"x", qos=1) for i in range(200)]
        await asyncio.gather(*sends)
        await until(lambda: len(got) == 200)
        paho_client: Any = pub._paho
        held, inflight = len(paho_client._out_messages), paho_client._inflight_messages
        await pub.close()
        await sub.close()
        return pub.stats.fast_acked, pub.stats.published, held, inflight

    fast, published, held, inflight = run(scenario())
    assert published == 400
    assert fast == 400  # every PUBACK, none by paho
    assert held == 0 and inflight == 0  # paho's store released each message


def test_will_on_abort_not_on_close_and_handler_errors_are_contained(broker: Mosquitto) -> None:
    async def scenario() -> None:
        got: list[tuple[str, bytes]] = []

        def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            got.append((topic, payload))
            if payload == b"boom":
                raise RuntimeError("handler bug")

        watcher = MqttClient("watcher", broker.host, broker.port)
        watcher.subscribe("gw/#", 1, handler)
        await watcher.connect(timeout=5)
        await watcher.wait_subscribed("gw/#")

        will = Will("gw/status", b"offline", qos=1, retain=False)
        gw = MqttClient("gw", broker.host, broker.port, will=will, reconnect_min=0.05)
        await gw.connect(timeout=5)
        await gw.publish("gw/x", b"boom")  # the watcher's handler raises on this one
        await gw.publish("gw/x", b"fine")
        await until(lambda: len(got) == 2)
        assert watcher.stats.handler_errors == 1 and watcher.connected
        gw.abort_connection()  # vanishes without DISCONNECT: the broker publishes the will
        await until(lambda: ("gw/status", b"offline") in got)
        await gw.wait_connected()
        await gw.close()  # a clean DISCONNECT: no will this time
        await barrier(broker)
        await until(lambda: ("gw/marker", b"m") in got)
        assert got.count(("gw/status", b"offline")) == 1
        await watcher.close()

    async def barrier(broker: Mosquitto) -> None:
        marker = await publisher(broker, "marker")
        await marker.publish("gw/marker", b"m")  # arrives after anything the close caused
        await marker.close()

    run(scenario())


def test_tls_errors_are_named(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    port = free_port()
    broker = Mosquitto(
        tmp_path, port=free_port(),
        extra_config=f"listener {port} {HOST}\ncertfile {cert}\nkeyfile {key}\n",
    )
    broker.start()

    async def scenario() -> None:
        # the system CAs do not know this self-signed certificate
        client = MqttClient("tls1", HOST, port, tls=TlsSettings(), reconnect_min=0.05)
        with pytest.raises(MqttError, match="TLS certificate verification failed"):
            await client.connect(timeout=0.5)
        await client.close()
        # trusting it works, and TCP_NODELAY is set on the TLS socket too
        client = MqttClient("tls2", HOST, port, tls=TlsSettings(ca_file=str(cert)))
        await client.connect(timeout=5)
        got = asyncio.Event()
        client.subscribe("tls/x", 1, lambda *a: got.set())
        await client.wait_subscribed("tls/x")
        await client.publish("tls/x", b"secret", qos=1)
        await got.wait()
        sock = client.socket()
        assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await client.close()
        # plain MQTT to the TLS port: the broker hangs up
        client = MqttClient("plain", HOST, port, reconnect_min=0.05, connect_timeout=1)
        with pytest.raises(MqttError):
            await client.connect(timeout=0.5)
        await client.close()

    try:
        run(scenario())
    finally:
        broker.close()


def test_bad_source_config_is_a_source_error(broker: Mosquitto) -> None:
    with pytest.raises(SourceError, match=r"device_from_topic.*exactly once"):
        MqttSourceClient("x", mqtt_source(broker, ("a", 0), device_from_topic="a/b"), Collector())
    with pytest.raises(SourceError, match="must fill a whole level"):
        MqttSourceClient("x", mqtt_source(broker, ("a/b#", 0)), Collector())


@pytest.mark.parametrize("qos", [0, 1])
def test_one_message_per_read_still_takes_the_fast_path(broker: Mosquitto, qos: int) -> None:
    # regression: the fast path ran only on bytes already buffered, so a message arriving on
    # its own (one PUBLISH per readiness event, the usual case below saturation) was decoded by
    # paho at ~20x the cost
    async def scenario() -> tuple[int, int]:
        got: list[bytes] = []
        one = asyncio.Event()

        def handler(topic: str, payload: bytes, q: int, retain: bool) -> None:
            got.append(payload)
            one.set()

        sub = await subscriber(broker, "t/#", qos, handler, reconnect_min=0.05)
        pub = await publisher(broker)
        for i in range(20):  # each waits for the previous to arrive: one packet per read
            one.clear()
            await pub.publish(f"t/{i}", str(i).encode(), qos=qos)
            await asyncio.wait_for(one.wait(), 5)
        stats = sub.stats
        await pub.close()
        await sub.close()
        return stats.received, stats.fast_decoded

    received, fast = run(scenario())
    assert received == 20 and fast == 20


def test_linger_batches_a_busy_connection_but_not_the_first_message(broker: Mosquitto) -> None:
    # issue #12: a busy socket is read at most once per linger (many messages per wake-up);
    # a message after a quiet spell is read at once
    linger = 0.5

    async def scenario() -> tuple[float, float, int, int]:
        loop = asyncio.get_running_loop()
        got: list[tuple[float, bytes]] = []
        first = asyncio.Event()
        done = asyncio.Event()

        def handler(topic: str, payload: bytes, q: int, retain: bool) -> None:
            got.append((loop.time(), payload))
            first.set()
            if len(got) == 51:
                done.set()

        sub = await subscriber(broker, "t/#", 0, handler, reconnect_min=0.05, linger=linger)
        pub = await publisher(broker)
        await asyncio.sleep(linger * 1.2)  # a quiet spell: nothing read for longer than a linger
        reads_before = sub.stats.reads
        t0 = loop.time()
        await pub.publish("t/first", b"0", qos=0)
        await asyncio.wait_for(first.wait(), 5)
        t_first = loop.time() - t0
        for i in range(50):  # within the linger of the first read: gathered, not read one by one
            await pub.publish(f"t/{i}", str(i).encode(), qos=0)
        await asyncio.wait_for(done.wait(), 10)
        t_all = loop.time() - t0
        reads = sub.stats.reads - reads_before
        await pub.close()
        await sub.close()
        return t_first, t_all, reads, len(got)

    t_first, t_all, reads, n = run(scenario())
    assert n == 51
    assert t_first < linger * 0.8  # the first message after quiet is not held back
    assert t_all >= linger * 0.9  # the rest waited for the linger ...
    assert reads <= 3, reads  # ... and came in one or two wake-ups, not 50


def test_linger_keeps_a_steadily_busy_socket_off_the_selector(broker: Mosquitto) -> None:
    # issue #12: while the linger's reads keep finding messages, the next read is the linger's
    # timer again; the socket's readiness events (a selector change and a timer each) are not
    # used until a read finds nothing
    linger = 0.1

    async def scenario() -> tuple[list[float], int, int]:
        loop = asyncio.get_running_loop()
        late: list[float] = []
        done = asyncio.Event()

        def handler(topic: str, payload: bytes, q: int, retain: bool) -> None:
            late.append(loop.time() - float(payload))
            if len(late) == 40:
                done.set()

        sub = await subscriber(broker, "t/#", 0, handler, reconnect_min=0.05, linger=linger)
        pub = await publisher(broker)
        added = 0
        add_reader = loop.add_reader

        def counting_add_reader(fd: Any, cb: Any, *args: Any) -> None:
            nonlocal added
            added += 1
            add_reader(fd, cb, *args)

        loop.add_reader = counting_add_reader  # type: ignore[method-assign,assignment]
        reads_before = sub.stats.reads
        try:
            for _ in range(40):  # one message per 20 ms for 0.8 s: busy for eight lingers
                await pub.publish("t/x", repr(loop.time()).encode(), qos=0)
                await asyncio.sleep(0.02)
            await asyncio.wait_for(done.wait(), 5)
        finally:
            loop.add_reader = add_reader  # type: ignore[method-assign]
        reads = sub.stats.reads - reads_before
        await pub.close()
        await sub.close()
        return late, added, reads

    late, added, reads = run(scenario())
    assert len(late) == 40
    assert max(late) < linger + 0.2, max(late)  # nothing waited much more than a linger
    assert reads <= 12, reads  # about one read per linger, not one per message
    assert added <= 2, added  # the reader went back on the selector at most at the stream's end


def test_emit_nowait_takes_messages_at_once_and_emit_keeps_the_order_when_full(
    broker: Mosquitto,
) -> None:
    # issue #12: with room in the pipeline's queue a message is handed over in the read
    # callback (no task hop); when the queue is full the source buffers and awaits emit, and
    # every message still arrives once, in order, QoS 1 acknowledged only after it was taken
    n = 200

    async def scenario() -> tuple[list[int], int, int]:
        order: list[int] = []
        room = [True]
        taken_now = [0]
        all_in = asyncio.Event()

        def nowait(reading: Reading) -> bool:
            if not room[0]:
                return False
            order.append(int(reading.payload))
            all_in.set() if len(order) == n else None
            taken_now[0] += 1
            room[0] = taken_now[0] % 50 != 0  # full after every 50th: emit's path until drained
            return True

        async def emit(reading: Reading) -> None:
            order.append(int(reading.payload))
            all_in.set() if len(order) == n else None
            room[0] = True

        src = MqttSourceClient("bus", mqtt_source(broker, ("t/x", 1)), emit, emit_nowait=nowait)
        task = await started(src)
        pub = await publisher(broker)
        for i in range(n):
            await pub.publish("t/x", b"%d" % i, qos=1)
        await asyncio.wait_for(all_in.wait(), 30)
        await pub.close()
        await stop(task)
        return order, taken_now[0], src.stats.emitted

    order, now, emitted = run(scenario())
    assert order == list(range(n))
    assert 0 < now < n  # both paths were taken
    assert emitted == n
