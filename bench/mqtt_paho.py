"""MQTT on loopback: what the adapter's choices cost or buy (flux_edge/mqtt/).

    .venv/bin/python bench/mqtt_paho.py [--n 5000] [--lat 500] [--repeat 3] [--rtt 20]

Starts a private mosquitto (tests/support/mosquitto.py, broker limits raised so it never drops)
and measures, each best of ``--repeat`` runs:

1. QoS 1 publish throughput (publishes awaited concurrently, each completes on its PUBACK) by
   paho in-flight window (20 = paho's default, 100 = ours, 1000) and TCP_NODELAY on/off, on
   loopback and through a relay that adds a round trip (``--rtt`` ms, like a WAN link);
2. QoS 1 publish latency: one publish at a time, publish() -> PUBACK, p50/p99;
3. end-to-end latency publisher -> broker -> subscriber (QoS 1), p50/p99;
4. subscriber drain rate of a backlog the broker holds (QoS 0/1/2, acks by the adapter);
5. the same 1-2 with paho's own network thread (loop_start) bridged into asyncio with
   call_soon_threadsafe: the design the adapter does not use.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402 (bench only: the daemon imports paho in flux_edge/mqtt/ alone)
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

from flux_edge.mqtt import MqttClient  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def best(repeat: int, fn: Callable[[], Awaitable[float]]) -> float:
    return max([await fn() for _ in range(repeat)])


class DelayProxy:
    """A TCP relay that holds every chunk for ``one_way`` seconds in each direction: a link with
    RTT = 2 x one_way (the kernel here has no netem). TCP ACKs between the client and the relay
    stay immediate, so Nagle's algorithm cannot be observed through it; the in-flight window can.
    """

    def __init__(self, upstream_port: int, one_way: float) -> None:
        self.upstream_port = upstream_port
        self.one_way = one_way
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    w.close()
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                w.write(data)

        t = asyncio.create_task(deliver())
        self._tasks.add(t)
        try:
            while data := await r.read(65536):
                q.put_nowait((loop.time() + self.one_way, data))
        except ConnectionError:
            pass
        q.put_nowait((0.0, b""))

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for a, b in ((r, uw), (ur, w)):
            t = asyncio.create_task(self._pipe(a, b))
            self._tasks.add(t)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Target:
    """Where the clients connect: the broker, or the delay relay in front of it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


# --- the adapter ---------------------------------------------------------------------------------


async def adapter_throughput(broker: Target, n: int, inflight: int, nodelay: bool) -> float:
    c = MqttClient("tp", broker.host, broker.port, max_inflight=inflight, max_queued=n,
                   tcp_nodelay=nodelay)
    await c.connect(timeout=5)
    payload = b"x" * 64
    t = time.perf_counter()
    await asyncio.gather(*(c.publish("bench/tp", payload, qos=1) for _ in range(n)))
    dt = time.perf_counter() - t
    await c.close()
    return n / dt


async def adapter_latency(broker: Target, n: int, nodelay: bool) -> list[float]:
    c = MqttClient("lat", broker.host, broker.port, tcp_nodelay=nodelay)
    await c.connect(timeout=5)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await c.publish("bench/lat", b"x" * 64, qos=1)
        out.append(time.perf_counter() - t)
    await c.close()
    return out


async def end_to_end(broker: Target, n: int, nodelay: bool) -> list[float]:
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[float]] = []

    def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if waiter and not waiter[0].done():
            waiter[0].set_result(time.perf_counter())

    sub = MqttClient("e2e-sub", broker.host, broker.port, tcp_nodelay=nodelay)
    sub.subscribe("bench/e2e", 1, handler)
    await sub.connect(timeout=5)
    pub = MqttClient("e2e-pub", broker.host, broker.port, tcp_nodelay=nodelay)
    await pub.connect(timeout=5)
    await sub.wait_subscribed("bench/e2e")
    out = []
    for _ in range(n):
        fut: asyncio.Future[float] = loop.create_future()
        waiter[:] = [fut]
        t = time.perf_counter()
        await pub.publish("bench/e2e", b"x" * 64, qos=1)
        out.append(await fut - t)
    await pub.close()
    await sub.close()
    return out


async def subscriber_throughput(broker: Target, n: int, qos: int) -> float:
    """Drain rate of a backlog the broker holds for a persistent session: isolates the
    subscriber from the publisher's speed."""
    done = asyncio.Event()
    count = 0
    first = 0.0

    def handler(topic: str, payload: bytes, q: int, retain: bool) -> None:
        nonlocal count, first
        if count == 0:
            first = time.perf_counter()
        count += 1
        if count == n:
            done.set()

    def subscriber() -> MqttClient:
        sub = MqttClient(f"st-sub{qos}", broker.host, broker.port, max_inflight=1000,
                         clean_start=False, session_expiry=600)
        sub.subscribe("bench/st", qos, handler)
        return sub

    sub = subscriber()
    await sub.connect(timeout=5)
    await sub.wait_subscribed("bench/st")
    await sub.close()  # the session, and its subscription, stay at the broker
    pub = MqttClient("st-pub", broker.host, broker.port, max_inflight=100, max_queued=n)
    await pub.connect(timeout=5)
    await asyncio.gather(*(pub.publish("bench/st", b"x" * 64, qos=1) for _ in range(n)))
    await pub.close()
    sub = subscriber()
    await sub.connect(timeout=5)
    await asyncio.wait_for(done.wait(), 120)
    rate = (n - 1) / (time.perf_counter() - first)
    await sub.close()
    return rate


# --- paho's network thread bridged into asyncio (the road not taken) -----------------------------


class ThreadedPaho:
    def __init__(self, broker: Target, inflight: int, nodelay: bool) -> None:
        import socket

        self.loop = asyncio.get_running_loop()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="thr",
                             protocol=MQTTProtocolVersion.MQTTv5)
        self.c.max_inflight_messages_set(inflight)
        self.waiters: dict[int, asyncio.Future[None]] = {}
        self.early: set[int] = set()
        self.connected = asyncio.Event()

        def on_sock(client: Any, userdata: Any, sock: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))

        self.c.on_socket_open = on_sock
        self.c.on_connect = lambda *a: self.loop.call_soon_threadsafe(self.connected.set)
        self.c.on_publish = lambda c, u, mid, rc, p: self.loop.call_soon_threadsafe(
            self._acked, mid)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _acked(self, mid: int) -> None:
        fut = self.waiters.pop(mid, None)
        if fut is None:
            self.early.add(mid)
        elif not fut.done():
            fut.set_result(None)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        info = self.c.publish(topic, payload, qos)
        await asyncio.sleep(0)  # let a racing ack land in `early`
        if info.mid in self.early:
            self.early.discard(info.mid)
            return
        fut = self.loop.create_future()
        self.waiters[info.mid] = fut
        await fut

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def threaded_throughput(broker: Target, n: int, inflight: int) -> float:
    c = ThreadedPaho(broker, inflight, True)
    await c.connected.wait()
    t = time.perf_counter()
    await asyncio.gather(*(c.publish("bench/tp", b"x" * 64, 1) for _ in range(n)))
    dt = time.perf_counter() - t
    c.close()
    return n / dt


async def threaded_latency(broker: Target, n: int) -> list[float]:
    c = ThreadedPaho(broker, 100, True)
    await c.connected.wait()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await c.publish("bench/lat", b"x" * 64, 1)
        out.append(time.perf_counter() - t)
    c.close()
    return out


# -------------------------------------------------------------------------------------------------


def lat_line(name: str, xs: list[float]) -> str:
    return (f"  {name:<44} p50 {statistics.median(xs) * 1e6:8.0f} us   "
            f"p99 {pct(xs, 0.99) * 1e6:8.0f} us")


async def main(args: argparse.Namespace) -> None:
    n, m, r = args.n, args.lat, args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp), max_queued_messages=1_000_000, max_inflight_messages=0,
                           extra_config="queue_qos0_messages true")
        broker.start()
        proxy = DelayProxy(broker.port, args.rtt / 2000)
        await proxy.start()
        lo = Target(broker.host, broker.port)
        far = Target("127.0.0.1", proxy.port)
        try:
            print(f"mosquitto 2.0 on loopback; {n} messages of 64 B; best of {r}; "
                  f"relay with RTT {args.rtt:g} ms")
            print("1. QoS 1 publish throughput (asyncio adapter, each publish awaits its PUBACK)")
            for nodelay in (True, False):
                for inflight in (20, 100, 1000):
                    rate = await best(r, lambda i=inflight, nd=nodelay: adapter_throughput(
                        lo, n, i, nd))
                    print(f"  loopback  max_inflight {inflight:>4}  TCP_NODELAY "
                          f"{'on ' if nodelay else 'off'}  {rate:9.0f} msg/s")
            for inflight in (20, 100, 1000):
                rate = await best(1, lambda i=inflight: adapter_throughput(far, n // 5, i, True))
                print(f"  RTT {args.rtt:g} ms  max_inflight {inflight:>4}  TCP_NODELAY on "
                      f"  {rate:9.0f} msg/s")
            print("2./3. QoS 1 latency on loopback, one message at a time")
            for nodelay in (True, False):
                tag = "on" if nodelay else "off"
                print(lat_line(f"publish -> PUBACK, TCP_NODELAY {tag}",
                               await adapter_latency(lo, m, nodelay)))
                print(lat_line(f"publisher -> subscriber, TCP_NODELAY {tag}",
                               await end_to_end(lo, m, nodelay)))
            print("4. subscriber drain rate of a broker-held backlog (asyncio adapter)")
            for qos in (0, 1, 2):
                rate = await best(r, lambda q=qos: subscriber_throughput(lo, n, q))
                print(f"  QoS {qos}  {rate:9.0f} msg/s")
            print("5. paho network thread + call_soon_threadsafe (not used)")
            for inflight in (20, 100):
                rate = await best(r, lambda i=inflight: threaded_throughput(lo, n, i))
                print(f"  loopback  QoS 1 publish, max_inflight {inflight:>4}  {rate:9.0f} msg/s")
            print(lat_line("publish -> PUBACK", await threaded_latency(lo, m)))
        finally:
            await proxy.close()
            broker.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--lat", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rtt", type=float, default=20.0, help="round trip of the relay, ms")
    asyncio.run(main(ap.parse_args()))
