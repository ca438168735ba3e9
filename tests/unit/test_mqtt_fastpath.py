"""The MQTT client's own PUBLISH decoder (flux_edge.mqtt.codec, run by
flux_edge.mqtt.client.MqttClient._fast_packets): byte-exact against packets encoded here from
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
    c._fast_packets()


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


# --- PUBACKs of our own QoS 1 publishes --------------------------------------------------------


def puback(mid: int, reason: int | None = None, props: bytes | None = None) -> bytes:
    body = mid.to_bytes(2, "big")
    if reason is not None:
        body += bytes([reason])
        if props is not None:
            body += varint(len(props)) + props
    return bytes([0x40]) + varint(len(body)) + body


def holding(c: MqttClient, mids: list[int]) -> list[tuple[int, int, str]]:
    """Make paho's store hold ``mids`` as unacknowledged; return what on_publish is told."""
    done: list[tuple[int, int, str]] = []
    p: Any = c._paho
    for mid in mids:
        p._out_messages[mid] = object()

    def do_on_publish(mid: int, reason: Any, properties: Any) -> None:
        done.append((mid, reason.value, type(properties).__name__))
        del p._out_messages[mid]

    p._do_on_publish = do_on_publish
    return done


acks_and_publishes = st.lists(
    st.one_of(
        st.tuples(st.just("ack"), st.integers(1, 65535), st.sampled_from([None, 0, 0x10])),
        st.tuples(st.just("pub"), st.integers(1, 65535), st.sampled_from([0, 1])),
    ),
    max_size=15,
)


@settings(max_examples=150, deadline=None)
@given(items=acks_and_publishes, v5=st.booleans(), with_props_len=st.booleans())
def test_successful_pubacks_between_publishes_go_to_pahos_store(
    items: list[tuple[str, int, Any]], v5: bool, with_props_len: bool
) -> None:
    c, got, acks = client(v5)
    ack_items = [(mid, r) for kind, mid, r in items if kind == "ack" and (v5 or r is None)]
    done = holding(c, sorted({mid for mid, _ in ack_items}))
    data = b""
    for kind, mid, extra in items:
        if kind == "ack":
            if not v5 and extra is not None:
                continue  # MQTT 3.1.1 has no reason codes
            data += puback(mid, extra, b"" if with_props_len and extra is not None else None)
        else:
            data += publish(f"t/{mid}", b"p", extra, False, mid, v5=v5)
    feed(c, data)
    assert c._rpos == len(data)
    expected, seen = [], set()
    for mid, r in ack_items:
        if mid not in seen:  # a second PUBACK for a mid paho no longer holds is ignored
            expected.append((mid, r or 0, "Properties"))
            seen.add(mid)
    assert done == expected
    assert c.stats.fast_acked == len(ack_items)
    assert [g[0] for g in got] == [f"t/{mid}" for kind, mid, _ in items if kind == "pub"]
    assert acks == [mid for kind, mid, q in items if kind == "pub" and q == 1]


def test_a_failed_or_unusual_puback_is_left_to_paho() -> None:
    cases = [
        (True, puback(5, 0x87)),  # not authorized: paho reports the failure to on_publish
        (True, puback(5, 0, b"\x1f\x00\x02ok")),  # a Reason String property
        (False, puback(5, 0)),  # MQTT 3.1.1 has no reason code: malformed, paho says so
        (True, b"\x40\x01\x00"),  # too short
        (True, b"\x40\x02\x00"),  # incomplete: the rest comes with the next read
        (False, b"\x42\x02\x00\x05"),  # reserved flags set
    ]
    for v5, data in cases:
        c, _, _ = client(v5)
        done = holding(c, [5])
        first = publish("a", b"1", 0, False, 0, v5=v5)
        feed(c, first + data)
        assert c._rpos == len(first), data
        assert done == [] and c.stats.fast_acked == 0


def test_a_puback_for_a_message_paho_does_not_hold_is_ignored() -> None:
    c, _, _ = client(False)
    done = holding(c, [])
    feed(c, puback(9))
    assert done == [] and c._rpos == 4 and c.stats.fast_acked == 1
