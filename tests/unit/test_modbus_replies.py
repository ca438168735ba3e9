"""replies.check_reply: every correct answer passes, every mutation of one is refused with a
reason, and no input makes it raise (issue #13, item 2)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.sources.modbus.replies import (
    REASONS,
    Bad,
    Incomplete,
    Ok,
    check_reply,
    crc16,
    leftover,
)

TCP_REQ = bytes.fromhex("0001 0000 0006 07 03 000a 0003".replace(" ", ""))
TCP_OK = bytes.fromhex("0001 0000 0009 07 03 06 1234beef0007".replace(" ", ""))
RTU_BODY = bytes.fromhex("07 03 000a 0003".replace(" ", ""))
RTU_REQ = RTU_BODY + crc16(RTU_BODY)
RTU_ANS = bytes.fromhex("07 03 06 1234beef0007".replace(" ", ""))
RTU_OK = RTU_ANS + crc16(RTU_ANS)


def test_crc16_matches_the_spec_example() -> None:
    # Modbus over serial line, appendix B: 01 03 00 00 00 0A -> C5 CD
    assert crc16(bytes.fromhex("01030000000a")) == bytes.fromhex("c5cd")


def test_correct_answers_pass_and_every_prefix_waits() -> None:
    assert check_reply("tcp", TCP_REQ, TCP_OK) == Ok(len(TCP_OK))
    assert check_reply("rtu", RTU_REQ, RTU_OK) == Ok(len(RTU_OK))
    for n in range(len(TCP_OK)):
        assert isinstance(check_reply("tcp", TCP_REQ, TCP_OK[:n]), Incomplete)
    for n in range(len(RTU_OK)):
        assert isinstance(check_reply("rtu", RTU_REQ, RTU_OK[:n]), Incomplete)
    exc = bytes.fromhex("0001 0000 0003 07 83 02".replace(" ", ""))
    assert check_reply("tcp", TCP_REQ, exc) == Ok(len(exc))


def reason(framing: str, buf: bytes) -> str:
    req = TCP_REQ if framing == "tcp" else RTU_REQ
    verdict = check_reply(framing, req, buf)  # type: ignore[arg-type]
    assert isinstance(verdict, Bad), verdict
    assert verdict.reason in REASONS
    return verdict.reason


def test_each_fault_has_its_reason() -> None:
    t = TCP_OK
    assert reason("tcp", t[:7] + b"\x04" + t[8:]) == "function_code"
    assert reason("tcp", t[:6] + b"\x08" + t[7:]) == "unit_id"
    assert reason("tcp", b"\x00\x02" + t[2:]) == "transaction_id"
    assert reason("tcp", t[:2] + b"\x00\x01" + t[4:]) == "protocol_id"
    assert reason("tcp", t[:4] + b"\x00\x01" + t[6:]) == "length"
    assert reason("tcp", t[:8] + b"\x04" + t[9:]) == "byte_count"
    short = t[:4] + struct.pack(">H", 7) + t[6:9] + t[9:13]
    assert reason("tcp", short) == "byte_count"
    assert reason("tcp", t + b"\x00") == "garbage"
    r = RTU_OK
    assert reason("rtu", r[:-1] + bytes([r[-1] ^ 1])) == "crc"
    other = b"\x08" + RTU_ANS[1:]
    assert reason("rtu", other + crc16(other)) == "unit_id"
    fn4 = RTU_ANS[:1] + b"\x04" + RTU_ANS[2:]
    assert reason("rtu", fn4 + crc16(fn4)) == "function_code"
    bc = RTU_ANS[:2] + b"\x04" + RTU_ANS[3:7]
    assert reason("rtu", bc + crc16(bc)) == "byte_count"
    assert reason("rtu", r + b"\xff") == "garbage"
    assert reason("rtu", b"\x55\x66" + r) == "garbage"
    assert leftover("tcp", TCP_REQ, TCP_OK[:9]).reason == "truncated"
    assert leftover("rtu", RTU_REQ, RTU_OK[:4]).reason == "truncated"
    assert leftover("rtu", RTU_REQ, b"\x99\x98").reason == "garbage"


def test_a_write_echo_names_its_address() -> None:
    body = bytes.fromhex("0706000a0001")
    req = body + crc16(body)
    assert check_reply("rtu", req, req) == Ok(len(req))
    held = bytes.fromhex("0706000a0000")  # the device echoes what it holds: read-back's job
    assert isinstance(check_reply("rtu", req, held + crc16(held)), Ok)
    other = bytes.fromhex("0706000b0001")
    assert reason_of(req, other + crc16(other)) == "echo"


def reason_of(req: bytes, buf: bytes) -> str:
    verdict = check_reply("rtu", req, buf)
    assert isinstance(verdict, Bad)
    return verdict.reason


@settings(max_examples=500, deadline=None)
@given(
    framing=st.sampled_from(["tcp", "rtu"]),
    request=st.binary(max_size=20),
    buffer=st.binary(max_size=300),
)
def test_no_input_makes_it_raise(framing: str, request: bytes, buffer: bytes) -> None:
    verdict = check_reply(framing, request, buffer)  # type: ignore[arg-type]
    assert isinstance(verdict, Ok | Incomplete | Bad)
    if isinstance(verdict, Bad):
        assert verdict.reason in REASONS
    leftover(framing, request, buffer)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, len(TCP_OK) - 1), xor=st.integers(1, 255))
def test_any_changed_byte_of_an_answer_is_refused_or_changes_only_data(pos: int, xor: int) -> None:
    tcp = bytearray(TCP_OK)
    tcp[pos] ^= xor
    verdict = check_reply("tcp", TCP_REQ, bytes(tcp))
    # only the data bytes (9..14) may change and still pass: they are the values
    assert isinstance(verdict, Bad | Incomplete) or pos >= 9
    rtu = bytearray(RTU_OK)
    p = pos % len(rtu)
    rtu[p] ^= xor
    assert not isinstance(check_reply("rtu", RTU_REQ, bytes(rtu)), Ok)  # the CRC sees it
