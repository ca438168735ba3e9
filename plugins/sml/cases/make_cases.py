"""Writes the golden inputs of the sml plugin (``*.in.jsonl``) from an SML encoder written from
the specification (SML 1.04 / BSI TR-03109-1 Anlage IIIa: type-length fields, message list,
transport escape, padding and CRC-16/X.25). The ``*.out.jsonl`` files are the plugin's output,
checked by hand against the values encoded here. tests/integration/test_plugin_converters.py
imports this module for its property and fuzz tests.

    python3 plugins/sml/cases/make_cases.py

The frames follow the layout of a typical eHZ (OpenResponse, GetListResponse with manufacturer,
server ID, energy registers with status word, power, voltages, CloseResponse); the values and
IDs are made up, not copied from a meter dump.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

ESC = b"\x1b" * 4
START = ESC + b"\x01\x01\x01\x01"
ABSENT = b"\x01"


def crc16(data: bytes) -> int:
    """CRC-16/X.25: poly 0x1021 reflected (0x8408), init 0xFFFF, xorout 0xFFFF."""
    crc = 0xFFFF
    for c in data:
        crc ^= c
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def _tl(ty: int, n: int) -> bytes:
    """Type-length field: for a list ``n`` is its element count, else the payload length (the
    length field then counts the TL bytes too)."""
    if ty == 7:
        if n < 16:
            return bytes([0x70 | n])
        return bytes([0xF0 | (n >> 4), n & 15])
    if n + 1 < 16:
        return bytes([(ty << 4) | (n + 1)])
    total = n + 2
    assert total < 256
    return bytes([0x80 | (ty << 4) | (total >> 4), total & 15])


def octets(b: bytes) -> bytes:
    return _tl(0, len(b)) + b


def uint(v: int, size: int = 0) -> bytes:
    size = size or max(1, (v.bit_length() + 7) // 8)
    return _tl(6, size) + v.to_bytes(size, "big")


def sint(v: int, size: int = 0) -> bytes:
    size = size or max(1, (v.bit_length() + 8) // 8)
    return _tl(5, size) + v.to_bytes(size, "big", signed=True)


def boolean(v: bool) -> bytes:
    return b"\x42" + (b"\x01" if v else b"\x00")


def lst(*items: bytes) -> bytes:
    return _tl(7, len(items)) + b"".join(items)


def obis(*code: int) -> bytes:
    """objName from A, B, C, D, E and optionally F (default 255)."""
    return octets(bytes(code if len(code) == 6 else (*code, 255)))


def entry(
    code: bytes,
    value: bytes,
    unit: int | None = None,
    scaler: int | None = None,
    status: bytes = ABSENT,
) -> bytes:
    return lst(
        code,
        status,
        ABSENT,  # valTime
        ABSENT if unit is None else uint(unit, 1),
        ABSENT if scaler is None else sint(scaler, 1),
        value,
        ABSENT,  # valueSignature
    )


def message(txid: bytes, tag: int, body: bytes, good_crc: bool = True) -> bytes:
    head = _tl(7, 6) + octets(txid) + uint(0, 1) + uint(0, 1) + lst(uint(tag, 2), body)
    crc = crc16(head)
    if not good_crc:
        crc ^= 0x0100
    # crc16 as an Unsigned16: the CRC's low byte first (big-endian read of the swapped value)
    return head + b"\x63" + crc.to_bytes(2, "little") + b"\x00"


def open_response(txid: bytes, server: bytes) -> bytes:
    return message(
        txid,
        0x0101,
        lst(ABSENT, ABSENT, octets(b"\x00\x12\x34\x56"), octets(server), ABSENT, ABSENT),
    )


def close_response(txid: bytes) -> bytes:
    return message(txid, 0x0201, lst(ABSENT))


def get_list(
    txid: bytes,
    server: bytes,
    entries: list[bytes],
    good_crc: bool = True,
    sec_index: int = 0x0123ABCD,
) -> bytes:
    body = lst(
        ABSENT,  # clientId
        octets(server),
        octets(bytes([1, 0, 0x62, 0x0A, 0xFF, 0xFF])),  # listName
        lst(uint(1, 1), uint(sec_index, 4)),  # actSensorTime: secIndex
        lst(*entries),
        ABSENT,  # listSignature
        ABSENT,  # actGatewayTime
    )
    return message(txid, 0x0701, body, good_crc)


def frame(messages: list[bytes], good_crc: bool = True) -> bytes:
    """Transport v1: start, escaped data padded to 4 bytes, end with pad count and CRC."""
    data = b"".join(messages)
    pad = (-len(data)) % 4
    data += b"\x00" * pad
    escaped = b"".join(
        data[i : i + 4] * (2 if data[i : i + 4] == ESC else 1) for i in range(0, len(data), 4)
    )
    raw = START + escaped + ESC + bytes([0x1A, pad])
    crc = crc16(raw)
    if not good_crc:
        crc ^= 0x0001
    return raw + crc.to_bytes(2, "little")


SERVER = bytes.fromhex("0a01454d480000bc614e")  # "\n\x01EMH" + a made-up serial


def ehz(
    import_wh10: int, export_wh10: int, power_w10: int, txid: int = 0x1000, volts: bool = True
) -> bytes:
    """One frame of an eHZ-like meter: energy in 0.1 Wh (scaler -1), power in 0.1 W."""
    t = txid.to_bytes(4, "big")
    entries = [
        entry(obis(129, 129, 199, 130, 3), octets(b"EMH")),
        entry(obis(1, 0, 0, 0, 9), octets(SERVER)),
        entry(
            obis(1, 0, 1, 8, 0), sint(import_wh10, 5), unit=30, scaler=-1, status=uint(0x0182, 2)
        ),
        entry(obis(1, 0, 2, 8, 0), sint(export_wh10, 5), unit=30, scaler=-1),
        entry(obis(1, 0, 16, 7, 0), sint(power_w10, 4), unit=27, scaler=-1),
    ]
    if volts:
        entries += [
            entry(obis(1, 0, 32, 7, 0), uint(2301, 2), unit=35, scaler=-1),
            entry(obis(1, 0, 31, 7, 0), uint(153, 2), unit=33, scaler=-2),
            entry(obis(1, 0, 14, 7, 0), uint(4998, 2), unit=44, scaler=-2),
        ]
    return frame(
        [
            open_response(t + b"\x01", SERVER),
            get_list(t + b"\x02", SERVER, entries),
            close_response(t + b"\x03"),
        ]
    )


def _line(payload: bytes, ts: float, device: str = "meter") -> dict[str, object]:
    return {"device": device, "ts": ts, "source": "meter", "topic": "/dev/ttyUSB0",
            "payload_b64": base64.b64encode(payload).decode()}  # fmt: skip


def cases() -> dict[str, tuple[dict[str, object], list[dict[str, object]]]]:
    src = {"source": {"name": "meter", "type": "serial"}}
    one = ehz(83916488, 2012, 1635)
    t = (0x2000).to_bytes(4, "big")
    # an octet string whose bytes hold 1b1b1b1b at a 4-byte boundary: sent escaped
    escaped = frame(
        [get_list(t + b"\x01", SERVER, [
            entry(obis(1, 0, 96, 1, 0), octets(b"\x1b" * 9)),
            entry(obis(1, 0, 1, 8, 0), sint(12345, 5), unit=30, scaler=-1),
        ])]
    )  # fmt: skip
    bad_msg = frame(
        [
            open_response(t + b"\x02", SERVER),
            get_list(
                t + b"\x03",
                SERVER,
                [entry(obis(1, 0, 1, 8, 0), sint(1, 5), unit=30, scaler=-1)],
                good_crc=False,
            ),
            close_response(t + b"\x04"),
        ]
    )
    damaged = bytearray(one)
    damaged[100] ^= 0x10
    export = ehz(83916500, 150000, -23456, txid=0x1100, volts=False)
    unlocked = frame(
        [get_list(t + b"\x05", SERVER, [
            entry(obis(1, 0, 1, 8, 1), uint(0x0123456789, 5), unit=30, scaler=-1),
            entry(obis(1, 0, 36, 7, 0), sint(-5, 1), unit=27, scaler=0),
            entry(obis(1, 0, 96, 5, 0), uint(0x001C0104, 4)),
            entry(obis(1, 0, 96, 50, 1, 1), octets(b"ISK")),
            entry(obis(1, 0, 0, 2, 0), octets(b"\x01\x02\xff")),
            entry(obis(1, 0, 99, 1, 0), sint(7, 1), unit=255),
            entry(obis(1, 0, 1, 8, 0), uint(98765, 3), unit=30, scaler=2),
            entry(obis(1, 0, 97, 97, 0), boolean(True)),
        ])]
    )  # fmt: skip
    assert ESC * 2 in escaped  # the 1b1b1b1b block really is sent twice
    meters = [
        _line(one, 1700000000.0),
        _line(one + ehz(83916490, 2012, 1640, txid=0x1010), 1700000002.0),
        _line(export, 1700000004.0),
        _line(escaped, 1700000006.0),
        _line(unlocked, 1700000008.0),
    ]
    errors = [
        _line(bytes(damaged), 1700000010.0),
        _line(bad_msg, 1700000012.0),
        _line(one[-60:] + one, 1700000014.0),  # the port opened mid-frame
        _line(one[: len(one) // 2], 1700000016.0),  # the burst ends mid-frame
        _line(one[:200] + one, 1700000018.0),  # a frame cut off by the next start
        _line(frame([b"\x76\x05\x00\x00\x00\x01\x62\x00"]), 1700000020.0),  # a truncated message
        _line(START + b"\x76\x01\x01\x01" + ESC + b"\x1b\x1b\x02\x02", 1700000022.0),  # bad escape
        {
            "device": "meter",
            "ts": 1700000024.0,
            "source": "meter",
            "registers": [1, 2],
            "function": 3,
            "address": 0,
        },
    ]
    options = [
        _line(one, 1700000030.0),
        _line(unlocked, 1700000032.0),
        _line(escaped, 1700000034.0),
    ]
    names = {"1-0:16.7.0": "grid_power", "1.8.1": "import_day", "1-0:96.50.1*1": "maker"}
    opt_cfg = {"strings": True, "energy_unit": "kWh", "device": "server_id", "names": names}
    both_wrong = get_list(t, SERVER, [entry(obis(1, 0, 1, 8, 0), sint(5, 1), unit=30)], False)
    return {
        "meters": ({"crc": "check", **src}, meters),
        "errors": ({**src}, errors),
        "options": ({**opt_cfg, **src}, options),
        "no_crc": ({"crc": "ignore", **src}, [_line(frame([both_wrong], good_crc=False), 1.0)]),
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, (config, lines) in cases().items():
        (here / f"{name}.config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (here / f"{name}.in.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
