"""ABI v1 wire format: encode_batch against a parser written from docs/plugin-abi.md, and
decode_output on generated and broken guest output."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.errors import PluginABIError
from flux_edge.model import ErrorRecord, Measurement, Reading
from flux_edge.plugins import abi
from flux_edge.plugins.abi import (
    MAX_LINE,
    BatchEncodeError,
    decode_output,
    decode_output_counted,
    encode_batch,
)

# --- a reference parser, written from the spec only -----------------------------------------------


def parse_batch(data: bytes) -> list[dict[str, Any]]:
    """Parse an input batch exactly as docs/plugin-abi.md describes it (a guest's view)."""
    (count,) = struct.unpack_from("<I", data, 0)
    pos = 4
    out = []
    for _ in range(count):
        (size,) = struct.unpack_from("<I", data, pos)
        body = pos + 4
        kind, function, address, ts = struct.unpack_from("<BBHd", data, body)
        p = body + 12
        (dl,) = struct.unpack_from("<H", data, p)
        device = data[p + 2 : p + 2 + dl].decode()
        p += 2 + dl
        (tl,) = struct.unpack_from("<H", data, p)
        topic = data[p + 2 : p + 2 + tl].decode()
        p += 2 + tl
        (pl,) = struct.unpack_from("<I", data, p)
        payload = data[p + 4 : p + 4 + pl]
        p += 4 + pl
        assert p == body + size, "size must cover exactly the rest of the message"
        out.append(
            {
                "kind": kind,
                "function": function,
                "address": address,
                "ts": ts,
                "device": device,
                "topic": topic,
                "payload": payload,
            }
        )
        pos = body + size  # a guest skips by size
    assert pos == len(data), "no trailing bytes"
    return out


texts = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), finite, texts)

readings = st.one_of(
    st.builds(
        Reading,
        source=texts,
        device=texts,
        ts=finite,
        kind=st.just(1),
        registers=st.lists(st.integers(0, 0xFFFF), max_size=130).map(tuple),
        function=st.integers(0, 255),
        address=st.integers(0, 0xFFFF),
        topic=texts,
    ),
    st.builds(
        Reading,
        source=texts,
        device=texts,
        ts=finite,
        kind=st.just(0),
        payload=st.binary(max_size=300),
        topic=texts,
    ),
)
measurements = st.builds(
    Measurement,
    device=texts,
    name=texts,
    value=values,
    ts=finite,
    unit=texts,
    quality=st.sampled_from(["good", "stale", "bad"]),
    source=texts,
)


@settings(max_examples=300)
@given(st.lists(st.one_of(readings, measurements), max_size=20))
def test_encode_batch_round_trips_through_a_spec_parser(msgs: list[Reading | Measurement]) -> None:
    parsed = parse_batch(encode_batch(msgs))
    assert len(parsed) == len(msgs)
    for m, p in zip(msgs, parsed, strict=True):
        assert p["device"] == m.device
        assert p["ts"] == m.ts or (math.isnan(p["ts"]) and math.isnan(m.ts))
        if isinstance(m, Measurement):
            assert (p["kind"], p["function"], p["address"], p["topic"]) == (2, 0, 0, "")
            obj = json.loads(p["payload"])
            assert list(obj) == ["name", "value", "unit", "quality", "ts", "device"]
            assert obj == {
                "name": m.name,
                "value": m.value,
                "unit": m.unit,
                "quality": m.quality,
                "ts": m.ts,
                "device": m.device,
            }
        else:
            assert p["kind"] == m.kind and p["topic"] == m.topic
            assert p["function"] == m.function and p["address"] == m.address
            if m.kind == 1:
                n = len(p["payload"]) // 2
                assert struct.unpack(f"<{n}H", p["payload"]) == m.registers
            else:
                assert p["payload"] == m.payload


# A few shared str objects, so consecutive messages often reuse the previous layout (the
# identity check in encode_batch) and often switch layout (device, topic, register count, kind).
_DEVICES = ["boiler", "pump", "°C-sensor"]
_TOPICS = ["", "a/b"]
shared_readings = st.builds(
    Reading,
    source=st.just("s"),
    device=st.sampled_from(_DEVICES),
    ts=finite,
    kind=st.sampled_from([0, 1, 1]),
    registers=st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple),
    payload=st.binary(max_size=8),
    function=st.integers(0, 4),
    address=st.integers(0, 0xFFFF),
    topic=st.sampled_from(_TOPICS),
)
shared_measurements = st.builds(
    Measurement, device=st.sampled_from(_DEVICES), name=st.just("m"), value=values, ts=finite
)


@settings(max_examples=300)
@given(st.lists(st.one_of(shared_readings, shared_measurements), max_size=12))
def test_encode_batch_layout_changes_between_messages(msgs: list[Reading | Measurement]) -> None:
    # kind 0 messages carry a payload and no registers, kind 1 the other way round
    msgs = [
        msgs_i
        if not isinstance(msgs_i, Reading)
        else Reading(
            source=msgs_i.source,
            device=msgs_i.device,
            ts=msgs_i.ts,
            kind=msgs_i.kind,
            registers=msgs_i.registers if msgs_i.kind == 1 else (),
            payload=msgs_i.payload if msgs_i.kind == 0 else b"",
            function=msgs_i.function,
            address=msgs_i.address,
            topic=msgs_i.topic,
        )
        for msgs_i in msgs
    ]
    parsed = parse_batch(encode_batch(msgs))
    for m, p in zip(msgs, parsed, strict=True):
        assert p["device"] == m.device
        if isinstance(m, Reading):
            assert (p["kind"], p["topic"], p["function"], p["address"]) == (
                m.kind,
                m.topic,
                m.function,
                m.address,
            )
            want = struct.pack(f"<{len(m.registers)}H", *m.registers) if m.kind == 1 else m.payload
            assert p["payload"] == want
        else:
            assert (p["kind"], p["topic"]) == (2, "")
    # equal but distinct str objects take the same layout
    a = Reading(source="s", device="".join(["boi", "ler"]), ts=1.0, kind=1, registers=(1,))
    b = Reading(source="s", device="".join(["boil", "er"]), ts=1.0, kind=1, registers=(1,))
    assert a.device is not b.device
    assert encode_batch([a, b]) == encode_batch([a, a])


def test_encode_batch_names_the_bad_message_after_a_run_of_good_ones() -> None:
    good = [Reading(source="s", device="d", ts=0, kind=1, registers=(k, 1)) for k in range(3)]
    bad = Reading(source="s", device="d", ts=0, kind=1, registers=(1, 1 << 16))
    with pytest.raises(BatchEncodeError) as ei:
        encode_batch([*good, bad, *good])
    assert ei.value.index == 3
    assert "65536 is outside 0..65535" in str(ei.value)


def test_encode_batch_layout_by_hand() -> None:
    data = encode_batch(
        [
            Reading(
                source="s",
                device="b",
                ts=1.5,
                kind=1,
                registers=(1, 0x0203),
                function=3,
                address=40001 - 40000,
            )
        ]
    )
    assert data == (
        b"\x01\x00\x00\x00"  # count
        + struct.pack("<I", 12 + 2 + 1 + 2 + 0 + 4 + 4)  # size
        + b"\x01\x03\x01\x00"
        + struct.pack("<d", 1.5)  # kind function address ts
        + b"\x01\x00b"
        + b"\x00\x00"
        + b"\x04\x00\x00\x00"  # device, topic, payload_len
        + b"\x01\x00\x03\x02"  # registers little-endian
    )
    assert encode_batch([]) == b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (Reading(source="s", device="d", ts=0, kind=1, registers=(1, 70000)), "70000"),
        (Reading(source="s", device="d", ts=0, kind=1, registers=(-1,)), "-1"),
        (Reading(source="s", device="x" * 70000, ts=0, kind=0), "65535 bytes"),
        (Reading(source="s", device="d", ts=0, kind=0, topic="t" * 70000), "65535 bytes"),
        (Reading(source="s", device="d", ts=0, kind=0, function=300), "0..255"),
        (Reading(source="s", device="d", ts=0, kind=1, address=70000), "70000"),
    ],
)
def test_encode_batch_names_the_bad_message(msg: Reading, why: str) -> None:
    good = Reading(source="s", device="d", ts=0)
    with pytest.raises(BatchEncodeError) as ei:
        encode_batch([good, msg])
    assert ei.value.index == 1
    assert why in str(ei.value)


# --- decode_output -------------------------------------------------------------------------------

INPUT = [
    Reading(source="src-a", device="boiler", ts=100.0, kind=1, registers=(1,)),
    Measurement(source="src-b", device="pump", name="x", value=1, ts=200.0),
    Reading(source="src-c", device="tank", ts=300.0),
]

lines = st.one_of(
    st.fixed_dictionaries(
        {"i": st.integers(0, len(INPUT) - 1), "name": texts, "value": values},
        optional={
            "unit": texts,
            "quality": st.sampled_from(["good", "stale", "bad"]),
            "device": texts,
            "ts": finite,
            "extra": st.integers(),
        },
    ),
    st.fixed_dictionaries(
        {"i": st.integers(0, len(INPUT) - 1), "error": texts},
        optional={"device": texts, "ts": finite},
    ),
)


@settings(max_examples=300)
@given(st.lists(lines, max_size=30), st.booleans())
def test_decode_output_matches_the_lines(objs: list[dict[str, Any]], ascii_only: bool) -> None:
    data = "".join(json.dumps(o, ensure_ascii=ascii_only) + "\n" for o in objs).encode()
    indices: list[int] = []
    got = decode_output(data, INPUT, "p", indices=indices)
    assert indices == [o["i"] for o in objs]
    assert len(got) == len(objs)
    for o, r in zip(objs, got, strict=True):
        m = INPUT[o["i"]]
        assert r.source == m.source
        assert r.device == o.get("device", m.device)
        if "error" in o:
            assert r == ErrorRecord(
                stage="plugin",
                source=m.source,
                device=r.device,
                ts=o.get("ts", m.ts),
                error=o["error"],
                plugin="p",
            )
        else:
            assert isinstance(r, Measurement)
            assert (r.name, r.unit, r.quality) == (
                o["name"],
                o.get("unit", ""),
                o.get("quality", "good"),
            )
            assert r.ts == o.get("ts", m.ts)
            assert r.value == o["value"] and type(r.value) is type(o["value"])


def test_decode_output_defaults_and_empty() -> None:
    assert decode_output(b"", INPUT, "p") == []
    (r,) = decode_output(b'{"i": 2, "name": "level", "value": 3}', INPUT, "p")  # no final \n
    assert r == Measurement(device="tank", name="level", value=3, ts=300.0, source="src-c")
    out = decode_output(b'\n{"i":0,"name":"a","value":true}\r\n\n', INPUT, "p")
    assert [m.value for m in out if isinstance(m, Measurement)] == [True]


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b'{"i":0,"name":"a","value":1}\nnot json\n', "line 2"),
        (b'{"i":0,"name":"a","value":1}\n{"i":3,"name":"a","value":1}\n', '"i": 3 is outside'),
        (b'{"i":-1,"name":"a","value":1}\n', "outside the batch"),
        (b'{"i":0,"value":1}\n', "no name"),
        (b'{"i":0,"name":"a"}\n', "no value"),
        (b'{"i":0,"name":"a","value":null}\n', "no value"),
        (b'{"name":"a","value":1}\n', "`i`"),
        (b'{"i":"0","name":"a","value":1}\n', "line 1"),
        (b'{"i":0,"name":"a","value":[1]}\n', "`value`"),
        (b'{"i":0,"name":"a","value":1,"quality":"great"}\n', "`quality`"),
        (b"[1, 2]\n", "line 1"),
        (b'{"i":0,"name":"\xff\xfe","value":1}\n', "line 1"),
        (b'{"i":0,"name":"a","value":123456789012345678901234567890}\n', "64 bits"),
        (
            b'{"i":0,"name":"a","value":1}\n{"i":0,"name":"' + b"x" * MAX_LINE + b'","value":1}\n',
            "line 2 is",
        ),
    ],
)
def test_decode_output_rejects_malformed_output(data: bytes, expect: str) -> None:
    with pytest.raises(PluginABIError) as ei:
        decode_output(data, INPUT, "modbus_decode")
    assert ei.value.plugin == "modbus_decode"
    assert expect in str(ei.value)


def test_a_line_of_exactly_64_kib_is_accepted() -> None:
    head = b'{"i":0,"name":"'
    tail = b'","value":1}'
    line = head + b"x" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_LINE
    (m,) = decode_output(line + b"\n", INPUT, "p")
    assert isinstance(m, Measurement) and len(m.name) == MAX_LINE - len(head) - len(tail)


# --- the fast path of decode_output ---------------------------------------------------------------

plain_lines = st.fixed_dictionaries(
    {"i": st.integers(0, len(INPUT) - 1), "name": texts, "value": values},
    optional={"unit": texts, "quality": st.sampled_from(["good", "stale", "bad"])},
)
odd_lines = st.one_of(
    lines,
    st.fixed_dictionaries(
        {"i": st.integers(-2, len(INPUT) + 1)},
        optional={
            "name": st.one_of(st.none(), texts),
            "value": st.one_of(
                st.none(), values, st.integers(-(2**70), 2**70), st.just([1]), st.just({})
            ),
            "quality": st.sampled_from(["good", "great"]),
            "error": st.none(),
            "device": st.none(),
        },
    ),
)


def _outcome(fn: Any, data: bytes) -> Any:
    indices: list[int] = []
    try:
        result = fn(data, INPUT, "p", indices)
    except PluginABIError as exc:
        return ("raised", str(exc))
    return ("ok", result, indices)


@settings(max_examples=400)
@given(st.lists(st.one_of(plain_lines, odd_lines), max_size=12), st.booleans())
def test_decode_fast_path_agrees_with_the_general_decoder(
    objs: list[dict[str, Any]], ascii_only: bool
) -> None:
    data = "".join(json.dumps(o, ensure_ascii=ascii_only) + "\n" for o in objs).encode()

    def fast(d: bytes, msgs: Any, plugin: str, indices: list[int]) -> Any:
        return decode_output_counted(d, msgs, plugin, indices=indices)

    assert _outcome(fast, data) == _outcome(abi._decode_general, data)


@settings(max_examples=100)
@given(st.lists(plain_lines, min_size=1, max_size=12))
def test_plain_measurement_lines_take_the_fast_path(
    objs: list[dict[str, Any]],
) -> None:
    data = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode()
    want = abi._decode_general(data, INPUT, "p", None)
    saved = abi._decode_general

    def refuse(*args: Any) -> Any:
        raise AssertionError("the general decoder was used")

    abi._decode_general = refuse  # type: ignore[assignment]
    try:
        assert decode_output_counted(data, INPUT, "p") == want
    finally:
        abi._decode_general = saved


def test_decode_output_counts_error_records() -> None:
    data = (
        b'{"i":0,"name":"a","value":1}\n{"i":1,"error":"x"}\n'
        b'{"i":2,"error":"y","device":"z"}\n{"i":2,"name":"b","value":2,"ts":5}\n'
    )
    records, errors = decode_output_counted(data, INPUT, "p")
    assert errors == 2
    assert [type(r).__name__ for r in records] == [
        "Measurement",
        "ErrorRecord",
        "ErrorRecord",
        "Measurement",
    ]
    assert decode_output_counted(b'{"i":0,"name":"a","value":1}', INPUT, "p")[1] == 0
    assert decode_output_counted(b"", INPUT, "p") == ([], 0)


@settings(max_examples=60)
@given(
    st.integers(1500, 3000),
    st.integers(0, 10**9),
    st.sampled_from(
        [
            None,
            b'{"i":1,"error":"late error"}',
            b'{"i":7,"name":"a","value":1}',
            b'{"i":0,"name":"a","value":1,"device":"x"}',
            b'{"i":0,"name":"a"',
            b'{"i":2,"name":"' + b"y" * 40_000 + b'","value":2.5}',
        ]
    ),
)
def test_large_outputs_decode_like_the_general_decoder(
    count: int, where: int, odd: bytes | None
) -> None:
    lines = [
        json.dumps({"i": k % len(INPUT), "name": f"m{k}", "value": k * 0.5, "unit": "°C"}).encode()
        for k in range(count)
    ]
    if odd is not None:
        lines.insert(where % (count + 1), odd)
    data = b"\n".join(lines) + b"\n"
    assert len(data) > MAX_LINE

    def fast(d: bytes, msgs: Any, plugin: str, indices: list[int]) -> Any:
        return decode_output_counted(d, msgs, plugin, indices=indices)

    got = _outcome(fast, data)
    assert got == _outcome(abi._decode_general, data)
    if odd is None or b"y" * 10 in odd:
        assert got[0] == "ok" and len(got[1][0]) == len(lines)


@settings(max_examples=200)
@given(st.lists(st.integers(0, MAX_LINE + 2), max_size=5), st.booleans())
def test_long_line_check_agrees_with_splitting(lengths: list[int], final_newline: bool) -> None:
    data = b"\n".join(b"x" * n for n in lengths) + (b"\n" if final_newline else b"")
    want = any(n > MAX_LINE for n in lengths)
    assert abi._has_long_line(data) == want
    if want:
        with pytest.raises(PluginABIError, match=r"bytes long \(the limit is 65536 bytes\)"):
            decode_output(data, INPUT, "p")
