"""The Sparkplug B ``Payload`` protobuf (proto2, ``sparkplug_b.proto`` of the specification):
the fields an edge node writes, and a reader for the commands it receives.

    Payload { uint64 timestamp = 1; repeated Metric metrics = 2; uint64 seq = 3; ... }
    Metric  { string name = 1; uint64 alias = 2; uint64 timestamp = 3; uint32 datatype = 4;
              bool is_historical = 5; ... uint32 int_value = 10; uint64 long_value = 11;
              float float_value = 12; double double_value = 13; bool boolean_value = 14;
              string string_value = 15; ... }

Protobuf wire format: a key is ``field << 3 | wire type`` as a varint; varint (0), 64-bit (1),
length-delimited (2), 32-bit (5). An Int64 value is its two's complement in ``long_value``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from flux_edge.model import Value

INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14

_D = struct.Struct("<d")
_F = struct.Struct("<f")


def varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wt: int) -> bytes:
    return varint(field << 3 | wt)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + varint(len(data)) + data


@dataclass(frozen=True, slots=True)
class Metric:
    name: str = ""
    alias: int | None = None
    datatype: int = DOUBLE
    value: Value | None = None
    timestamp: int | None = None
    historical: bool = False

    def encode(self) -> bytes:
        out = bytearray()
        if self.name:
            out += _bytes(1, self.name.encode())
        if self.alias is not None:
            out += _key(2, 0) + varint(self.alias)
        if self.timestamp is not None:
            out += _key(3, 0) + varint(self.timestamp)
        out += _key(4, 0) + varint(self.datatype)
        if self.historical:
            out += _key(5, 0) + b"\x01"
        v = self.value
        dt = self.datatype
        if v is None:
            out += _key(7, 0) + b"\x01"  # is_null
        elif dt == BOOLEAN:
            out += _key(14, 0) + (b"\x01" if v else b"\x00")
        elif dt in (STRING, TEXT):
            out += _bytes(15, str(v).encode())
        elif dt == DOUBLE:
            out += _key(13, 1) + _D.pack(float(v))
        elif dt == FLOAT:
            out += _key(12, 5) + _F.pack(float(v))
        elif dt in (INT64, UINT64, DATETIME):
            out += _key(11, 0) + varint(int(v))
        else:
            out += _key(10, 0) + varint(int(v) & 0xFFFFFFFF)
        return bytes(out)


_SMALL = [bytes([i]) for i in range(128)]
_DT_KEY = {dt: b"\x20" + bytes([dt]) for dt in range(1, 35)}  # datatype = 4, varint


def _uv(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 128 else varint(n)


def data_metric(alias: int, dt: int, v: Value, historical: bool = False) -> bytes:
    """One DATA metric (alias, datatype, value), already framed as Payload field 2: the hot
    path of NDATA/DDATA, the same bytes as ``Metric(alias=..., ...).encode()`` framed."""
    m = b"\x10" + _uv(alias) + _DT_KEY[dt]
    if historical:
        m += b"\x28\x01"
    if dt == DOUBLE:
        m += b"\x69" + _D.pack(v)  # double_value = 13, 64-bit
    elif dt == BOOLEAN:
        m += b"\x70\x01" if v else b"\x70\x00"  # boolean_value = 14
    elif dt == INT64:
        m += b"\x58" + _uv(v) if isinstance(v, int) and 0 <= v < 128 else b"\x58" + varint(
            int(v))  # long_value = 11
    else:
        s = str(v).encode()
        m += b"\x7a" + _uv(len(s)) + s  # string_value = 15
    return b"\x12" + _uv(len(m)) + m


def data_payload(timestamp: int, seq: int, framed: list[bytes]) -> bytes:
    return b"\x08" + varint(timestamp) + b"".join(framed) + b"\x18" + _uv(seq)


def payload(timestamp: int | None, seq: int | None, metrics: list[Metric]) -> bytes:
    out = bytearray()
    if timestamp is not None:
        out += _key(1, 0) + varint(timestamp)
    for m in metrics:
        out += _bytes(2, m.encode())
    if seq is not None:
        out += _key(3, 0) + varint(seq)
    return bytes(out)


# --- reading (commands from upstream; the tests' consumer has its own) ----------------------------


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    out: list[tuple[int, int, Any]] = []
    i, n = 0, len(data)
    while i < n:
        key, i = _read_varint(data, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(data, i)
            out.append((field, wt, v))
        elif wt == 1:
            if i + 8 > n:
                raise ValueError("truncated 64-bit field")
            out.append((field, wt, data[i:i + 8]))
            i += 8
        elif wt == 2:
            ln, i = _read_varint(data, i)
            if i + ln > n:
                raise ValueError("truncated length-delimited field")
            out.append((field, wt, data[i:i + ln]))
            i += ln
        elif wt == 5:
            if i + 4 > n:
                raise ValueError("truncated 32-bit field")
            out.append((field, wt, data[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"wire type {wt} not supported")
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# the wire type each Metric field must have
_WIRE = {1: 2, 2: 0, 3: 0, 4: 0, 5: 0, 7: 0, 10: 0, 11: 0, 12: 5, 13: 1, 14: 0, 15: 2}


def decode_metric(data: bytes) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for field, wt, v in _fields(data):
        if wt != _WIRE.get(field, wt):
            raise ValueError(f"metric field {field} has wire type {wt}")
        if field == 1:
            m["name"] = bytes(v).decode("utf-8", "replace")
        elif field == 2:
            m["alias"] = v
        elif field == 3:
            m["timestamp"] = v
        elif field == 4:
            m["datatype"] = v
        elif field == 5:
            m["is_historical"] = bool(v)
        elif field == 7:
            m["is_null"] = bool(v)
        elif field == 10:
            m["value"] = v
        elif field == 11:
            m["value"] = _signed(v) if m.get("datatype", INT64) <= INT64 else v
        elif field == 12:
            m["value"] = _F.unpack(v)[0]
        elif field == 13:
            m["value"] = _D.unpack(v)[0]
        elif field == 14:
            m["value"] = bool(v)
        elif field == 15:
            m["value"] = bytes(v).decode("utf-8", "replace")
    return m


def decode_payload(data: bytes) -> dict[str, Any]:
    """Raises ValueError for bytes that are not a well-formed payload."""
    out: dict[str, Any] = {"metrics": []}
    for field, wt, v in _fields(data):
        if field == 1 and wt == 0:
            out["timestamp"] = v
        elif field == 2 and wt == 2:
            out["metrics"].append(decode_metric(v))
        elif field == 3 and wt == 0:
            out["seq"] = v
    return out
