"""Writes the golden inputs of the mbus plugin (``*.in.jsonl``). ``published`` is the RSP_UD
example of the M-Bus Usergroup's "The M-Bus: A Documentation" (rev. 4.8, "variable data
structure", mode 1), byte for byte; the other frames come from the encoder below, written from
EN 13757-2 (long frame, checksum) and EN 13757-3 (DIF/DIFE/VIF/VIFE, data types A, B, F, G, H).
The ``*.out.jsonl`` files are the plugin's output, checked by hand against these values.
tests/integration/test_plugin_golden.py imports this module.

    python3 plugins/mbus/cases/make_cases.py
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

# The documentation's example: ID 12345678, manufacturer PAD, water; 12565 l (24-bit integer),
# maximum volume flow 113 l/h in storage 5 (4-digit BCD), energy 218.37 kWh tariff 2 unit 1
# (6-digit BCD).
PUBLISHED = bytes.fromhex(
    "681F1F680802727856341224400107550000000313153100DA023B13018B60043718021816"
)


def long_frame(c: int, a: int, ci: int, data: bytes, good_cs: bool = True) -> bytes:
    body = bytes([c, a, ci]) + data
    cs = sum(body) % 256 ^ (0 if good_cs else 1)
    return bytes([0x68, len(body), len(body), 0x68]) + body + bytes([cs, 0x16])


def manufacturer(code: str) -> bytes:
    a, b, c = (ord(x) - 64 for x in code)
    return ((a << 10) | (b << 5) | c).to_bytes(2, "little")


def bcd(value: int, size: int) -> bytes:
    digits = f"{abs(value):0{2 * size}d}"
    if value < 0:
        digits = "F" + digits[1:]
    return bytes.fromhex(digits)[::-1]


def long_header(ident: int, man: str, version: int, medium: int, access: int) -> bytes:
    return bcd(ident, 4) + manufacturer(man) + bytes([version, medium, access, 0, 0, 0])


def rsp_ud(records: list[bytes], header: bytes, address: int = 1, good_cs: bool = True) -> bytes:
    ci = 0x72 if len(header) == 12 else 0x7A if len(header) == 4 else 0x78
    return long_frame(0x08, address, ci, header + b"".join(records), good_cs)


def record(dif: int, vif: bytes, data: bytes, dife: bytes = b"") -> bytes:
    return bytes([dif]) + dife + vif + data


def i(v: int, size: int) -> bytes:
    return v.to_bytes(size, "little", signed=True)


def date_g(y: int, m: int, d: int) -> bytes:
    y -= 2000
    return bytes([(d & 0x1F) | ((y & 7) << 5), (m & 0x0F) | ((y >> 3) << 4)])


def datetime_f(y: int, m: int, d: int, hh: int, mm: int) -> bytes:
    return bytes([mm & 0x3F, hh & 0x1F]) + date_g(y, m, d)


HEAT = [
    record(0x0C, b"\x78", bcd(87654321, 4)),  # fabrication number
    record(0x04, b"\x06", i(123456, 4)),  # energy 123456 kWh (VIF 06: 10^3 Wh)
    record(0x0C, b"\x14", bcd(4567890, 4)),  # volume 45678.90 m³ (10^-2 m³)
    record(0x0B, b"\x2d", bcd(12, 3)),  # power 1.2 kW (10^2 W)
    record(0x0B, b"\x3b", bcd(456, 3)),  # volume flow 456 l/h
    record(0x0A, b"\x5a", bcd(654, 2)),  # flow temperature 65.4 °C
    record(0x0A, b"\x5e", bcd(421, 2)),  # return temperature 42.1 °C
    record(0x0B, b"\x61", bcd(2332, 3)),  # temperature difference 23.32 K
    record(0x04, b"\x6d", datetime_f(2024, 12, 7, 6, 30)),  # date and time
    record(0x44, b"\x06", i(120000, 4)),  # energy, storage 1 (last due date)
    record(0x42, b"\x6c", date_g(2024, 1, 1)),  # due date, storage 1
    record(0x84, b"\x06", i(80000, 4), dife=b"\x10"),  # energy, tariff 1
    record(0x02, b"\xfd\x17", i(0, 2)),  # error flags
]
ELECTRICITY = [
    record(0x05, b"\x2b", struct.pack("<f", 1234.5)),  # power 1234.5 W as a 32-bit real
    record(0x07, b"\x03", i(9876543210, 8)),  # energy, 64-bit integer, Wh
    record(0x0E, b"\x84\x70", bcd(123456789012, 6)),  # energy 10 Wh * 10^-6 (VIFE correction)
    record(0x02, b"\xfd\x48", i(2301, 2)),  # voltage 230.1 V
    record(0x02, b"\xfd\x59", i(-1530, 2)),  # current -1.530 A
    record(0x01, b"\xfb\x00", i(7, 1)),  # energy 0.7 MWh (table FB)
    record(0x02, b"\x7c\x03" + b"hPa"[::-1], i(1013, 2)),  # plain-text unit "hPa"
    record(0x0D, b"\xfd\x0c", b"\x05" + b"MK-42"[::-1]),  # model, variable-length ASCII
    record(0x1A, b"\x5a", bcd(701, 2)),  # maximum flow temperature 70.1 °C
    record(0x2A, b"\x5a", bcd(102, 2)),  # minimum flow temperature 10.2 °C
    b"\x2f\x2f",  # idle fillers
    record(0x0F, b"", b"\x01\x02\x03"),  # manufacturer-specific data to the end
]


def _line(payload: bytes, ts: float) -> dict[str, object]:
    return {"device": "mbus", "ts": ts, "source": "mbus", "topic": "/dev/ttyAMA0",
            "payload_b64": base64.b64encode(payload).decode()}  # fmt: skip


def cases() -> dict[str, tuple[dict[str, object], list[dict[str, object]]]]:
    src = {"source": {"name": "mbus", "type": "serial"}}
    heat = rsp_ud(HEAT, long_header(12345678, "KAM", 1, 0x04, 17), address=5)
    elec = rsp_ud(ELECTRICITY, bytes([0x21, 0x00, 0, 0]), address=7)
    req_ud2 = bytes([0x10, 0x5B, 0x05, 0x60, 0x16])
    bad_bcd = rsp_ud([record(0x0A, b"\x5a", b"\x1a\x02"), record(0x02, b"\x3b", i(5, 2))], b"")
    cut_record = rsp_ud([record(0x02, b"\x3b", i(5, 2)), b"\x04\x13\x01"], b"")
    damaged = bytearray(heat)
    damaged[30] ^= 0x04
    meters = [
        _line(heat, 1700000000.0),
        _line(req_ud2 + elec, 1700000010.0),
        _line(
            b"\xe5" + heat + rsp_ud(HEAT[1:3], long_header(12345679, "KAM", 1, 0x04, 18), 6),
            1700000020.0,
        ),
    ]
    errors = [
        _line(bytes(damaged), 1700000100.0),
        _line(heat[:40], 1700000101.0),
        _line(heat[:-1] + b"\x17", 1700000102.0),
        _line(long_frame(0x53, 1, 0x51, b"\x01\x02"), 1700000103.0),
        _line(long_frame(0x08, 1, 0x73, b"\x01\x02"), 1700000104.0),
        _line(b"\x00\x12" + heat, 1700000105.0),
        _line(bad_bcd, 1700000106.0),
        _line(cut_record, 1700000107.0),
        {
            "device": "mbus",
            "ts": 1700000108.0,
            "source": "mbus",
            "registers": [1],
            "function": 3,
            "address": 0,
        },
    ]
    names = {"energy_s1": "energy_last_due_date", "time_point_s1": "last_due_date"}
    return {
        "published": ({"header": True, **src}, [_line(PUBLISHED, 1700000200.0)]),
        "meters": ({**src}, meters),
        "errors": ({**src}, errors),
        "secondary": (
            {"energy_unit": "kWh", "device": "secondary", "names": names, **src},
            [_line(heat, 1.0)],
        ),
        "primary": ({"device": "primary", "header": True, **src}, [_line(elec, 2.0)]),
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, (config, lines) in cases().items():
        (here / f"{name}.config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (here / f"{name}.in.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
