"""The MQTT client with and without its fast path (flux_edge.mqtt.paho_internals), against a
real mosquitto: when the start-up check of paho's internals fails, paho's own reading delivers
and acknowledges every message just the same."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_edge.mqtt import paho_internals
from flux_edge.mqtt.client import MqttClient
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    paho_internals.fast_path_usable.cache_clear()
    yield
    paho_internals.fast_path_usable.cache_clear()


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "paho-fallback"])
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_message_arrives_with_or_without_the_fast_path(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch, fast: bool, protocol: str
) -> None:
    if not fast:
        def changed() -> None:
            raise paho_internals.PahoCompatError("9.9.9", ["simulated change"])

        monkeypatch.setattr(paho_internals, "check_paho_internals", changed)
    n = 300

    async def scenario() -> None:
        got: list[tuple[str, bytes, int]] = []
        done = asyncio.Event()
        sub = MqttClient(f"sub-{protocol}", broker.host, broker.port,
                         protocol="5" if protocol == "5" else "3.1.1")
        assert sub.fast_path is fast

        def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            got.append((topic, payload, qos))
            if len(got) == 3 * n:
                done.set()

        sub.subscribe("fb/#", 2, handler)
        await sub.connect(timeout=5)
        await sub.wait_subscribed("fb/#")
        pub = MqttClient(f"pub-{protocol}", broker.host, broker.port)
        await pub.connect(timeout=5)
        for qos in (0, 1, 2):
            await asyncio.gather(*(
                pub.publish(f"fb/q{qos}", str(i).encode(), qos=qos) for i in range(n)
            ))
        async with asyncio.timeout(20):
            await done.wait()
        for qos in (0, 1, 2):
            seq = [int(p) for t, p, q in got if t == f"fb/q{qos}"]
            assert seq == list(range(n))
            assert all(q == qos for t, _, q in got if t == f"fb/q{qos}")
        assert sub.stats.received == 3 * n and sub.stats.handler_errors == 0
        await pub.close()
        await sub.close()

    asyncio.run(scenario())
