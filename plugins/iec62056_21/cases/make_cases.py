"""Writes the golden inputs of the iec62056_21 plugin (``*.in.jsonl``): readouts in the format of
IEC 62056-21 (identification message ``/XXXZident`` CR LF; mode C data message STX, data lines
``address(value*unit)``, ``!`` CR LF, ETX and the BCC, the XOR of every byte after STX up to and
including ETX; push mode D without STX, ETX and BCC). The ``*.out.jsonl`` files are the
plugin's output, checked by hand. tests/integration/test_plugin_golden.py imports this module.

    python3 plugins/iec62056_21/cases/make_cases.py

The readouts are laid out like those of common meters (an Iskra MT174, a Landis+Gyr ZMD, an
eBZ DD3 pushing in mode D); the identifiers and values are made up.
"""

from __future__ import annotations

import base64
import json
from functools import reduce
from pathlib import Path

STX, ETX = b"\x02", b"\x03"


def bcc(data: bytes) -> int:
    return reduce(lambda a, c: a ^ c, data, 0)


def mode_c(ident: str, lines: list[str], good_bcc: bool = True) -> bytes:
    body = "".join(x + "\r\n" for x in lines).encode() + b"!\r\n" + ETX
    check = bcc(body) ^ (0 if good_bcc else 0x01)
    return f"/{ident}\r\n".encode() + STX + body + bytes([check])


def mode_d(ident: str, lines: list[str]) -> bytes:
    return f"/{ident}\r\n\r\n".encode() + "".join(x + "\r\n" for x in lines).encode() + b"!\r\n"


def even_parity(data: bytes) -> bytes:
    """7E1 bytes as a port opened 8N1 receives them: the parity bit in bit 7."""
    return bytes(c | (0x80 if bin(c).count("1") % 2 else 0) for c in data)


MT174 = [
    "0.0.0(51000123)",
    "0.9.1(143205)",
    "0.9.2(231207)",
    "1.8.0(0012345.678*kWh)",
    "1.8.1(0010000.123*kWh)",
    "1.8.2(0002345.555*kWh)",
    "2.8.0(0000012.345*kWh)",
    "F.F(0000000)",
]
ZMD = [
    "F.F(00)",
    "C.1.0(12345678)",
    "1.8.1(012345.6*kWh)1.8.2(001234.5*kWh)",
    "1.6.1(02.345*kW)(2312011530)",
    "32.7(231.5*V)",
    "C.7.0(0012)",
]
DD3 = [
    "1-0:0.0.0*255(1EBZ0100123456)",
    "1-0:96.1.0*255(1EBZ0100123456)",
    "1-0:1.8.0*255(000123.45678901*kWh)",
    "1-0:2.8.0*255(000000.00000000*kWh)",
    "1-0:16.7.0*255(-000321.12*W)",
    "1-0:36.7.0*255(000100.01*W)",
    "1-0:32.7.0*255(232.1*V)",
    "1-0:96.5.0*255(001C0104)",
]


def _line(payload: bytes, ts: float) -> dict[str, object]:
    return {"device": "meter", "ts": ts, "source": "d0", "topic": "/dev/ttyUSB0",
            "payload_b64": base64.b64encode(payload).decode()}  # fmt: skip


def cases() -> dict[str, tuple[dict[str, object], list[dict[str, object]]]]:
    src = {"source": {"name": "d0", "type": "serial"}}
    mt = mode_c("ISk5MT174-0001", MT174)
    readouts = [
        _line(mt, 1700000000.0),
        _line(even_parity(b"/?!\r\n" + mode_c("LGZ4ZMD3104407.B32", ZMD)), 1700000010.0),
        _line(mode_d("EBZ5DD3BZ06ETA_107", DD3), 1700000020.0),
        _line(mode_d("EBZ5DD3BZ06ETA_107", DD3[2:4]) * 2, 1700000022.0),
    ]
    errors = [
        _line(mode_c("ISk5MT174-0001", MT174, good_bcc=False), 1700000100.0),
        _line(mt[: len(mt) // 2], 1700000101.0),  # the burst ends mid-readout
        _line(mt[40:] + mt, 1700000102.0),  # the port opened mid-readout
        _line(mt[:-2], 1700000103.0),  # no ETX / BCC
        _line(
            mode_c("ISk5MT174-0001", ["1.8.0 0012.5*kWh", "2.8.0(0001.0*kWh)", "(1)x"]),
            1700000104.0,
        ),
        _line(b"/12\r\n" + mode_d("EBZ5DD3BZ06ETA_107", DD3[2:3]), 1700000105.0),
        _line(
            mode_d("EBZ5DD3BZ06ETA_107", DD3[:2])[:30] + mode_d("EBZ5DD3BZ06ETA_107", DD3[2:3]),
            1700000106.0,
        ),
        {
            "device": "meter",
            "ts": 1700000107.0,
            "source": "d0",
            "registers": [1],
            "function": 3,
            "address": 0,
        },
    ]
    names = {"1.8.0": "import_total", "1-0:16.7.0*255": "grid_power"}
    options = [_line(mt, 1700000200.0), _line(mode_d("EBZ5DD3BZ06ETA_107", DD3), 1700000201.0)]
    return {
        "readouts": ({**src}, readouts),
        "errors": ({**src}, errors),
        "options": ({"strings": False, "require_bcc": True, "names": names, **src}, options),
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, (config, lines) in cases().items():
        (here / f"{name}.config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (here / f"{name}.in.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
