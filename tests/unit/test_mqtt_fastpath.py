"""The MQTT client's own PUBLISH decoder (flux_edge.mqtt.codec, run by
flux_edge.mqtt.client.MqttClient._fast_publishes): byte-exact against packets encoded here from
the MQTT 3.1.1 / 5.0 specs, with partial packets left for later and QoS 2 or other packet types
left to paho."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.mqtt.client import MqttClient


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, qos: int, retain: bool, mid: int, *, v5: bool,
            props: bytes = b"") -> bytes:
    t = topic.encode()
    var = len(t).to_bytes(2, "big") + t
    if qos:
        var += mid.to_bytes(2, "big")
    if v5:
        var += varint(len(props)) + props
    body = var + payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + varint(len(body)) + body


Msg = tuple[str, bytes, int, bool, int]

messages = st.lists(
    st.tuples(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="+#\0"),
                max_size=40).map(lambda t: "t/" + t),  # "$..." topics never match "#"
        st.binary(max_size=300) | st.binary(min_size=16_384, max_size=17_000),
        st.sampled_from([0, 1]),
        st.booleans(),
        st.integers(1, 65535),
    ),
    max_size=12,
)


def client(v5: bool) -> tuple[MqttClient, list[Msg], list[int]]:
    c = MqttClient("fast", "127.0.0.1", 1, protocol="5" if v5 else "3.1.1")
    got: list[Msg] = []
    acks: list[int] = []

    def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        got.append((topic, payload, qos, retain, 0))

    c.subscribe("#", 1, handler)
    c._paho.ack = lambda mid, qos: acks.append(mid)  # type: ignore[method-assign]
    return c, got, acks


def feed(c: MqttClient, data: bytes) -> None:
    c._rbuf, c._rpos = data, 0
    c._fast_publishes()


@settings(max_examples=150, deadline=None)
@given(msgs=messages, v5=st.booleans(), cut=st.integers(0, 40))
def test_complete_publishes_are_delivered_and_a_partial_one_is_left(
    msgs: list[Msg], v5: bool, cut: int
) -> None:
    props = b"\x01\x01" if v5 else b""  # payload format indicator: skipped, not misread
    packets = [publish(*m, v5=v5, props=props) for m in msgs]
    data = b"".join(packets)
    partial = publish("tail/x", b"z" * 50, 1, False, 7, v5=v5)[: max(1, cut)]
    c, got, acks = client(v5)
    feed(c, data + partial)
    assert got == [(t, p, q, r, 0) for t, p, q, r, _ in msgs]
    assert acks == [mid for _, _, q, _, mid in msgs if q == 1]
    assert c._rpos == len(data)  # the partial packet is untouched, for paho or the next read
    assert c.stats.received == len(msgs)


def test_qos2_and_other_packets_stop_the_fast_path() -> None:
    for v5 in (False, True):
        c, got, _ = client(v5)
        first = publish("a", b"1", 0, False, 0, v5=v5)
        q2 = publish("b", b"2", 2, False, 9, v5=v5)
        feed(c, first + q2 + publish("c", b"3", 0, False, 0, v5=v5))
        assert [g[0] for g in got] == ["a"]
        assert c._rpos == len(first)
        c2, got2, _ = client(v5)
        pingresp = b"\xd0\x00"
        feed(c2, pingresp + first)
        assert got2 == [] and c2._rpos == 0


def test_a_bad_utf8_topic_is_not_delivered_to_handlers() -> None:
    c, got, _ = client(False)
    raw: Any = b"\x30\x05\x00\x02\xff\xfeX"
    feed(c, raw)
    assert got == [] and c.stats.unhandled == 1 and c._rpos == len(raw)
