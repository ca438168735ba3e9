"""A protobuf wire-format reader: just enough to walk the checked expressions the CEL library
serialises (rules/cel.py reads identifiers and types from them, rules/cost.py estimates costs).
Reading the wire format needs no schema and no library: (field number, value) pairs, varints and
length-delimited fields; fixed 32/64-bit values are skipped. Malformed input raises ValueError.
"""

from __future__ import annotations

from collections.abc import Iterator


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message; value is an int or bytes."""
    i, n = 0, len(buf)
    while i < n:
        key = buf[i]
        if key < 0x80:  # every field number below 16 has a one-byte key
            i += 1
        else:
            key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
            yield field, value
        elif wire == 2:
            size = buf[i] if i < n else 0x80
            if size < 0x80:
                i += 1
            else:
                size, i = varint(buf, i)
            if i + size > n:
                raise ValueError("truncated field")
            yield field, buf[i : i + size]
            i += size
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if i != n:
        raise ValueError("truncated message")


def varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def first(buf: bytes, fnum: int) -> bytes | None:
    """The first length-delimited field ``fnum`` of a message, or None."""
    for f, v in fields(buf):
        if f == fnum and isinstance(v, bytes):
            return v
    return None


def every(buf: bytes, fnum: int) -> list[bytes]:
    """Every length-delimited field ``fnum`` of a message, in order."""
    return [v for f, v in fields(buf) if f == fnum and isinstance(v, bytes)]
