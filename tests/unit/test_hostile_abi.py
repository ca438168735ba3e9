"""Hostile output at the wire-format level (flux_edge/plugins/abi.py): the nesting limit and
the records cap, without a guest."""

from __future__ import annotations

import pytest

from flux_edge.errors import PluginABIError
from flux_edge.model import ErrorRecord, Measurement, Reading
from flux_edge.plugins.abi import MAX_DEPTH, Decoded, TooManyRecords, decode_output_counted


def batch(n: int) -> list[Reading]:
    return [
        Reading(source="s", device=f"d{k}", ts=float(k), kind=0, payload=b"x") for k in range(n)
    ]


def nested(depth: int) -> bytes:
    """A line whose own object plus an unknown key's arrays nest ``depth`` levels."""
    inner = depth - 1
    return b'{"i":0,"name":"x","value":1,"z":' + b"[" * inner + b"]" * inner + b"}\n"


def test_unknown_keys_may_nest_up_to_the_limit() -> None:
    out, errors = decode_output_counted(nested(MAX_DEPTH), batch(1), "p")
    assert errors == 0 and [(m.name, m.value) for m in out if isinstance(m, Measurement)] == [
        ("x", 1)
    ]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 5000, 30_000])
def test_one_level_more_is_an_abi_error(depth: int) -> None:
    with pytest.raises(PluginABIError, match=f"output line 1 is nested more than {MAX_DEPTH}"):
        decode_output_counted(nested(depth), batch(1), "p")


def test_the_line_number_is_the_deep_one() -> None:
    data = b'{"i":0,"name":"a","value":1}\n\n' + nested(100)
    with pytest.raises(PluginABIError, match="output line 3 is nested"):
        decode_output_counted(data, batch(1), "p")


def test_brackets_in_strings_do_not_nest() -> None:
    brackets = "[" * 200 + '\\"' + "{" * 200
    data = f'{{"i":0,"name":"{brackets}","value":1,"other":"{brackets}"}}\n'.encode()
    (m,), errors = decode_output_counted(data, batch(1), "p")
    assert errors == 0 and isinstance(m, Measurement) and m.name.startswith("[[[")


def test_a_value_that_nests_under_a_known_key_is_refused() -> None:
    data = b'{"i":0,"name":"x","value":' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
    with pytest.raises(PluginABIError, match="output line 1 is nested more than"):
        decode_output_counted(data, batch(1), "p")
    with pytest.raises(PluginABIError, match="malformed output line 1"):
        decode_output_counted(b'{"i":0,"name":"x","value":[1]}\n', batch(1), "p")


def line(i: int, extra: str = "") -> str:
    return f'{{"i":{i},"name":"v","value":{i}{extra}}}\n'


@pytest.mark.parametrize("extra", ["", ',"device":"mine"'])  # the fast and the general path
def test_a_message_over_the_records_cap_gets_one_error_record(extra: str) -> None:
    data = (line(0, extra) * 3 + line(1, extra) + '{"i":2,"error":"bad frame"}\n').encode()
    found = Decoded()
    indices: list[int] = []
    out, errors = decode_output_counted(
        data, batch(3), "p", indices=indices, max_records=2, found=found
    )
    assert [type(r).__name__ for r in out] == ["Measurement", "ErrorRecord", "ErrorRecord"]
    assert indices == [1, 2, 0]
    over = out[2]
    assert isinstance(over, ErrorRecord) and over.device == "d0" and over.plugin == "p"
    assert over.error.startswith("output limit: 3 records for one input message")
    assert errors == 2 and found.errors == 2 and found.guest_errors == 1 and found.over == {0: 3}


def test_under_the_cap_nothing_changes_and_found_says_so() -> None:
    found = Decoded()
    found.over = {9: 9}  # left from an earlier call
    data = (line(0) + '{"i":0,"error":"e"}\n').encode()
    out, errors = decode_output_counted(data, batch(1), "p", max_records=2, found=found)
    assert len(out) == 2
    assert errors == 1 and found.over == {} and found.guest_errors == 1


def test_more_lines_than_the_whole_batch_may_have_is_refused_before_decoding() -> None:
    data = line(0).encode() * 7  # 7 > 3 messages x 2
    with pytest.raises(TooManyRecords, match=r"7 lines for 3 input message\(s\)"):
        decode_output_counted(data, batch(3), "p", max_records=2)
    # blank lines count too: a line is at least a byte
    with pytest.raises(TooManyRecords):
        decode_output_counted(line(0).encode() + b"\n" * 10, batch(1), "p", max_records=4)
    # not a syntax check: garbage still within the count is decoded, and reported as such
    with pytest.raises(PluginABIError, match="malformed"):
        decode_output_counted(b"x" * 20, batch(1), "p", max_records=4)


def test_an_index_outside_the_batch_is_reported_even_over_the_cap() -> None:
    data = (line(5) * 3).encode()
    with pytest.raises(PluginABIError, match='"i": 5 is outside the batch'):
        decode_output_counted(data, batch(2), "p", max_records=2)
