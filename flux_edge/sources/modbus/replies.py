"""Checking a device's reply against the request it answers, byte by byte: pure, no pymodbus.

pymodbus decodes whatever arrives: a reply with another function code becomes another response
object, a frame for another unit id or transaction is skipped with an error line (and the request
waits for its timeout), and a frame it cannot decode raises inside the transport's callback
(asyncio logs a traceback and drops the connection). So the links (client.py) hold every reply
to this check before pymodbus sees it, and pass it on only when it is exactly the answer to the
request that went out: same unit id, same transaction id (TCP), same function code (or its
exception response), a byte count that matches both the request and the frame, a correct CRC
(RTU), nothing before or after it.

``check_reply(framing, request, buffer)`` takes the request frame as it was sent and everything
received since; it says ``INCOMPLETE`` (wait for more), ``OK`` (one well-formed answer, of
``length`` bytes) or ``Bad(reason, detail)``. ``REASONS`` lists every reason (a metric label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "INCOMPLETE",
    "OK",
    "REASONS",
    "Bad",
    "Framing",
    "Verdict",
    "check_reply",
    "crc16",
    "leftover",
]

Framing = Literal["tcp", "rtu"]

# Every reason a reply (or the lack of one) is refused; the metric label and the log's word.
REASONS: Final[dict[str, str]] = {
    "function_code": "the reply carries another function code than the request",
    "unit_id": "the reply comes from another unit id",
    "transaction_id": "the reply answers another transaction",
    "protocol_id": "the MBAP protocol id is not 0 (not Modbus)",
    "length": "the MBAP length disagrees with the frame",
    "byte_count": "the byte count disagrees with the request or the frame",
    "echo": "a write's echo names another address (or count) than the request",
    "crc": "the CRC is wrong",
    "garbage": "bytes that belong to no frame came with the reply",
    "truncated": "the reply stopped mid-frame",
    "undecodable": "the frame could not be decoded",
    "unsolicited": "bytes arrived while no request was waiting",
    "exception": "the device answered with a Modbus exception response",
    "timeout": "no reply within the timeout",
    "link": "the connection or port failed",
    "connect": "the connection or port could not be opened",
}

READS: Final = frozenset({1, 2, 3, 4})
ECHO_WRITES: Final = frozenset({5, 6, 15, 16})  # the reply repeats the request's first 4 bytes


@dataclass(frozen=True, slots=True)
class Ok:
    length: int  # bytes of the buffer the answer takes (the whole buffer)


@dataclass(frozen=True, slots=True)
class Incomplete:
    pass


@dataclass(frozen=True, slots=True)
class Bad:
    reason: str  # a key of REASONS
    detail: str  # what exactly, for the log line

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


Verdict = Ok | Incomplete | Bad
INCOMPLETE: Final = Incomplete()
OK = Ok  # OK(length)


def _crc_table() -> list[int]:
    table = []
    for value in range(256):
        crc, byte = 0, value
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if (byte ^ crc) & 1 else crc >> 1
            byte >>= 1
        table.append(crc)
    return table


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes) -> bytes:
    """Modbus RTU CRC of ``data``, as the two bytes that follow it on the line (low byte first)."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc.to_bytes(2, "little")


def _expected_data_bytes(pdu: bytes) -> int | None:
    """The byte count the answer to request ``pdu`` (function code first) must carry; None when
    the request is not a read."""
    fn = pdu[0]
    if fn not in READS or len(pdu) < 5:
        return None
    count = int.from_bytes(pdu[3:5], "big")
    return (count + 7) // 8 if fn in (1, 2) else 2 * count


def _check_pdu(req: bytes, pdu: bytes) -> Verdict:
    """The reply PDU ``pdu`` (function code first, complete: its frame says how long) against
    the request PDU ``req``."""
    fn = req[0]
    got = pdu[0]
    if got == fn | 0x80:
        if len(pdu) != 2:
            return Bad("length", f"an exception response of {len(pdu)} bytes (2 expected)")
        return Ok(0)
    if got != fn:
        return Bad("function_code", f"function code {got} in reply to function code {fn}")
    if fn in READS:
        want = _expected_data_bytes(req)
        if len(pdu) < 2:
            return Bad("byte_count", "a read reply without a byte count")
        if pdu[1] != want:
            return Bad("byte_count", f"byte count {pdu[1]}, the request asks for {want}")
        if len(pdu) != 2 + pdu[1]:
            return Bad("byte_count", f"byte count {pdu[1]} but {len(pdu) - 2} data bytes")
        return Ok(0)
    if fn in ECHO_WRITES:
        # the address (5, 6) or the address and count (15, 16) come back; a single write's value
        # may differ (the device says what it holds): the read-back reports that, not us
        same = 5 if fn in (15, 16) else 3
        if pdu[:same] != req[:same] or len(pdu) != 5:
            return Bad("echo", f"echo {pdu.hex()} to request {req[:5].hex()}")
        return Ok(0)
    return Ok(0)  # a function we never send: pymodbus decides


def _check_tcp(req: bytes, buf: bytes) -> Verdict:
    if len(buf) < 7:
        return INCOMPLETE
    if buf[2:4] != b"\0\0":
        return Bad("protocol_id", f"protocol id {int.from_bytes(buf[2:4], 'big')}")
    length = int.from_bytes(buf[4:6], "big")
    if not 2 <= length <= 254:
        return Bad("length", f"MBAP length {length} (2..254)")
    total = 6 + length
    if len(buf) < total:
        return INCOMPLETE
    if buf[0:2] != req[0:2]:
        return Bad(
            "transaction_id",
            f"transaction id {int.from_bytes(buf[0:2], 'big')}, "
            f"the request's is {int.from_bytes(req[0:2], 'big')}",
        )
    if buf[6] != req[6]:
        return Bad("unit_id", f"unit id {buf[6]} in reply to unit id {req[6]}")
    verdict = _check_pdu(req[7:], buf[7:total])
    if isinstance(verdict, Bad):
        return verdict
    if len(buf) > total:
        return Bad("garbage", f"{len(buf) - total} byte(s) after the frame")
    return Ok(total)


def _rtu_length(req_pdu: bytes, buf: bytes) -> int | None:
    """The length of the RTU frame at the start of ``buf`` as its header tells (None: not yet
    known). Only frames of our request's function code or its exception are measured."""
    if len(buf) < 2:
        return None
    fn, got = req_pdu[0], buf[1]
    if got == fn | 0x80:
        return 5
    if got != fn:
        return -1
    if fn in READS:
        return 5 + buf[2] if len(buf) >= 3 else None
    if fn in ECHO_WRITES:
        return 8
    return -1


def _check_rtu(req: bytes, buf: bytes) -> Verdict:
    if len(buf) < 2:
        return INCOMPLETE
    req_pdu = req[1:-2]
    total = _rtu_length(req_pdu, buf)
    if total is None:
        return INCOMPLETE
    if total < 0:
        # not our function code: a frame of another one, or bytes that belong to no frame
        if buf[0] == req[0]:
            if _valid_frame_at_start(buf):
                return Bad("function_code", f"function code {buf[1]} in reply to {req_pdu[0]}")
            if len(buf) < 256:
                return INCOMPLETE  # perhaps a frame of another function: wait for its CRC
        return Bad("garbage", f"{buf[:8].hex()}... is no reply to function code {req_pdu[0]}")
    if len(buf) < total:
        return INCOMPLETE
    frame = buf[:total]
    if crc16(frame[:-2]) != frame[-2:]:
        return Bad("crc", f"CRC {frame[-2:].hex()}, computed {crc16(frame[:-2]).hex()}")
    if frame[0] != req[0]:
        return Bad("unit_id", f"unit id {frame[0]} in reply to unit id {req[0]}")
    verdict = _check_pdu(req_pdu, frame[1:-2])
    if isinstance(verdict, Bad):
        return verdict
    if len(buf) > total:
        return Bad("garbage", f"{len(buf) - total} byte(s) after the frame")
    return Ok(total)


def _valid_frame_at_start(buf: bytes) -> bool:
    """Some prefix of ``buf`` (4 bytes or more) ends in its own CRC."""
    return any(crc16(buf[: n - 2]) == buf[n - 2 : n] for n in range(4, min(len(buf), 256) + 1))


def leftover(framing: Framing, request: bytes, buffer: bytes) -> Bad:
    """Why ``buffer``, still ``INCOMPLETE`` when the reply's time ran out, is no answer: the
    start of our answer that stopped (``truncated``), or bytes that form none (``garbage``)."""
    start = buffer[:7] if framing == "tcp" else buffer[:2]
    ours = request[:7] if framing == "tcp" else request[:2]
    if framing == "tcp":
        ours, start = ours[:4] + ours[6:7], start[:4] + start[6:7]
    if start == ours[: len(start)]:
        return Bad("truncated", f"{len(buffer)} byte(s) of a reply, then silence")
    return Bad("garbage", f"{len(buffer)} byte(s) that form no reply: {buffer[:8].hex()}...")


def check_reply(framing: Framing, request: bytes, buffer: bytes) -> Verdict:
    """Whether ``buffer`` (everything received since ``request`` went out, as sent: the MBAP
    header or the RTU address and CRC included) is exactly one well-formed answer to it."""
    if framing == "tcp":
        if len(request) < 8:
            return Ok(len(buffer))  # not a request we built: nothing to hold it to
        return _check_tcp(request, buffer)
    if len(request) < 4:
        return Ok(len(buffer))
    return _check_rtu(request, buffer)
