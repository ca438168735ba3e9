"""Writes the golden inputs of the sparkplug_b plugin (``*.in.jsonl``) with a protobuf encoder
written from the Sparkplug B schema (Eclipse Sparkplug 3.0, sparkplug_b.proto: Payload 1
timestamp, 2 metrics, 3 seq; Metric 1 name, 2 alias, 3 timestamp, 4 datatype, 7 is_null,
9 properties, 10 int_value ... 15 string_value; PropertySet 1 keys, 2 values; PropertyValue 1
type, 8 string_value). The ``*.out.jsonl`` files are the plugin's output, checked by hand.
The messages follow the spec's NBIRTH / DBIRTH / DDATA examples in shape (names such as
"Node Control/Rebirth", "bdSeq", aliases in the births only); values are made up.
tests/integration/test_plugin_golden.py imports this module.

    python3 plugins/sparkplug_b/cases/make_cases.py
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = range(1, 9)
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID, DATASET = range(9, 17)


def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(n: int, v: int) -> bytes:
    return varint(n << 3) + varint(v)


def field_bytes(n: int, b: bytes) -> bytes:
    return varint((n << 3) | 2) + varint(len(b)) + b


def field_f32(n: int, v: float) -> bytes:
    return varint((n << 3) | 5) + struct.pack("<f", v)


def field_f64(n: int, v: float) -> bytes:
    return varint((n << 3) | 1) + struct.pack("<d", v)


def unit_properties(unit: str) -> bytes:
    value = field_varint(1, STRING) + field_bytes(8, unit.encode())
    return field_bytes(1, b"engUnit") + field_bytes(2, value)


def metric(  # noqa: PLR0917 - the Metric message's fields, in its order
    value: object,
    datatype: int,
    name: str | None = None,
    alias: int | None = None,
    ts: int | None = None,
    unit: str | None = None,
    is_null: bool = False,
) -> bytes:
    out = b""
    if name is not None:
        out += field_bytes(1, name.encode())
    if alias is not None:
        out += field_varint(2, alias)
    if ts is not None:
        out += field_varint(3, ts)
    out += field_varint(4, datatype)
    if unit is not None:
        out += field_bytes(9, unit_properties(unit))
    if is_null:
        return out + field_varint(7, 1)
    if datatype in (INT8, INT16, INT32, UINT8, UINT16, UINT32):
        assert isinstance(value, int)
        out += field_varint(10, value & 0xFFFFFFFF)  # two's complement in a uint32
    elif datatype in (INT64, UINT64, DATETIME):
        assert isinstance(value, int)
        out += field_varint(11, value)
    elif datatype == FLOAT:
        assert isinstance(value, float)
        out += field_f32(12, value)
    elif datatype == DOUBLE:
        assert isinstance(value, float)
        out += field_f64(13, value)
    elif datatype == BOOLEAN:
        out += field_varint(14, int(bool(value)))
    elif datatype in (STRING, TEXT, UUID):
        assert isinstance(value, str)
        out += field_bytes(15, value.encode())
    elif datatype == DATASET:
        out += field_bytes(17, b"\x08\x01")  # a dataset: not decoded into measurements
    return out


def payload(ts: int, metrics: list[bytes], seq: int = 0) -> bytes:
    return field_varint(1, ts) + b"".join(field_bytes(2, m) for m in metrics) + field_varint(3, seq)


T0 = 1700000000000  # ms


def _line(topic: str, data: bytes, ts: float) -> dict[str, object]:
    return {"device": "broker", "ts": ts, "source": "spb", "topic": topic,
            "payload_b64": base64.b64encode(data).decode()}  # fmt: skip


NBIRTH = payload(T0, [
    metric(0, UINT64, "bdSeq", alias=0),
    metric(False, BOOLEAN, "Node Control/Rebirth", alias=1),
    metric(23.5, FLOAT, "Cabinet/Temperature", alias=2, unit="°C"),
    metric("1.4.2", STRING, "Properties/Firmware", alias=3),
])  # fmt: skip
DBIRTH = payload(T0 + 10, [
    metric(-12, INT16, "Pump/Speed delta", alias=10),
    metric(1234.5678, DOUBLE, "Pump/Flow", alias=11, unit="l/min"),
    metric(True, BOOLEAN, "Pump/Running", alias=12),
    metric(-3, INT8, "Pump/Offset", alias=13),
    metric(4000000000, UINT32, "Pump/Starts", alias=14),
    metric(-(2**40), INT64, "Pump/Counter", alias=15),
    metric(2**64 - 1, UINT64, "Pump/Max", alias=16),
    metric(T0 - 3600000, DATETIME, "Pump/Serviced", alias=17),
    metric(0, DATASET, "Pump/History", alias=18),
    metric(None, DOUBLE, "Pump/Pressure", alias=19, unit="bar", is_null=True),
], seq=1)  # fmt: skip
DDATA = payload(T0 + 1000, [
    metric(-7, INT16, alias=10),
    metric(1300.25, DOUBLE, alias=11, ts=T0 + 990),
    metric(False, BOOLEAN, alias=12),
    metric(2.5, DOUBLE, alias=19),
    metric(7, INT16, alias=99),
], seq=2)  # fmt: skip
NDATA = payload(
    T0 + 2000, [metric(24.25, FLOAT, alias=2), metric(0.1, FLOAT, "Cabinet/Humidity")], seq=3
)


def cases() -> dict[str, tuple[dict[str, object], list[dict[str, object]]]]:
    src = {"source": {"name": "spb", "type": "mqtt"}}
    edge = "spBv1.0/Plant1/{}/Edge1"
    session = [
        _line(edge.format("NBIRTH"), NBIRTH, 1700000000.1),
        _line(edge.format("DBIRTH") + "/Pump7", DBIRTH, 1700000000.2),
        _line(edge.format("DDATA") + "/Pump7", DDATA, 1700000001.1),
        _line(edge.format("NDATA"), NDATA, 1700000002.1),
        _line(
            edge.format("DCMD") + "/Pump7",
            payload(T0, [metric(True, BOOLEAN, "Pump/Running")]),
            1700000003.0,
        ),
        _line(edge.format("DDEATH") + "/Pump7", payload(T0 + 4000, [], seq=4), 1700000004.0),
        _line(
            edge.format("NDEATH"), payload(T0 + 5000, [metric(0, UINT64, "bdSeq")]), 1700000005.0
        ),
        _line(edge.format("NDATA"), NDATA, 1700000006.0),  # after NDEATH the aliases are gone
    ]
    errors = [
        _line("spBv1.0/Plant1/NDATA", NDATA, 1.0),
        _line("spBv1.0/STATE/host1", b'{"online":true}', 2.0),
        _line(edge.format("NDATA"), b"\x12\x05\x0a\x01", 3.0),
        _line(edge.format("NDATA"), payload(T0, [metric(1.5, DOUBLE), b"\x0b"]), 4.0),
        _line(
            edge.format("NDATA"),
            payload(T0, [field_bytes(1, b"x") + field_varint(4, DOUBLE) + field_varint(13, 5)]),
            5.0,
        ),
        {
            "device": "broker",
            "ts": 6.0,
            "source": "spb",
            "registers": [1],
            "function": 3,
            "address": 0,
        },
    ]
    options = [*session[:4], session[4]]
    no_topic = [
        {
            "device": "edge",
            "ts": 7.0,
            "source": "spb",
            "payload_b64": base64.b64encode(NBIRTH).decode(),
        }
    ]
    return {
        "session": ({**src}, session),
        "errors": ({**src}, errors),
        "options": (
            {"device": "full", "unknown_alias": "name", "commands": True, "online": False, **src},
            options,
        ),
        "no_topic": ({**src}, no_topic),
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, (config, lines) in cases().items():
        (here / f"{name}.config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (here / f"{name}.in.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
