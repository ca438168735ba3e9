"""The protobuf wire-format reader shared by rules/cel.py and rules/cost.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_edge.rules import protobuf


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


Field = tuple[int, int | bytes]
fields_st = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=2**29 - 1),
        st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=40)),
    ),
    max_size=12,
)


def _encode(fields: list[Field]) -> bytes:
    out = b""
    for num, value in fields:
        if isinstance(value, int):
            out += _varint(num << 3) + _varint(value)
        else:
            out += _varint(num << 3 | 2) + _varint(len(value)) + value
    return out


@given(fields_st)
def test_fields_round_trip(fields: list[Field]) -> None:
    buf = _encode(fields)
    assert list(protobuf.fields(buf)) == fields
    for num, value in fields:
        if isinstance(value, bytes):
            assert protobuf.first(buf, num) == next(
                v for n, v in fields if n == num and isinstance(v, bytes))
    assert protobuf.every(buf, 1) == [v for n, v in fields if n == 1 and isinstance(v, bytes)]


@given(fields_st.filter(bool), st.data())
def test_truncated_messages_raise_value_error(fields: list[Field], data: st.DataObject) -> None:
    buf = _encode(fields)
    cut = data.draw(st.integers(min_value=1, max_value=len(buf)))
    try:
        parsed = list(protobuf.fields(buf[:-cut]))
    except ValueError:
        return
    # a cut that lands on a field boundary is a shorter, valid message
    assert len(parsed) < len(fields) or _encode(parsed) == buf[:-cut]


def test_fixed_width_fields_are_skipped_and_bad_wire_types_refused() -> None:
    buf = _varint(1 << 3 | 1) + bytes(8) + _varint(2 << 3 | 5) + bytes(4)
    buf += _varint(3 << 3) + b"\x07"
    assert list(protobuf.fields(buf)) == [(3, 7)]
    with pytest.raises(ValueError, match="wire type"):
        list(protobuf.fields(_varint(1 << 3 | 3)))
    with pytest.raises(ValueError, match="varint"):
        list(protobuf.fields(b"\x08\xff"))
    assert protobuf.first(buf, 9) is None
