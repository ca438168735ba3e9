"""Writes the golden inputs of the sunspec plugin (``*.in.jsonl``, ``*.config.json``) and builds
SunSpec register maps for the tests (tests/integration/test_sunspec*.py import this module).

The layouts are the SunSpec model definitions (github.com/sunspec/models, json/model_1.json,
model_101..103.json, model_201..204.json): point order, sizes, types, scale factor points and
'not implemented' values. ``published`` holds the common model of pysunspec2's test device
(sunspec2/tests/test_data/inverter_123.json: Mn "Device Manufacturer", Md "Inverter 123",
Vr "v0.0.1", SN "9999abcd", Opt and DA not implemented, Pad 0x8000); ``fronius`` the register
map of a Fronius IG+ inverter from pysunspec's test devices (mbmap_fronius.xml: model 1 with
L = 65, model 101), byte for byte; ``test_inverter`` pysunspec's test three-phase inverter
(mbmap_test_inverter_1.xml: models 1 and 103); ``symbols`` reports St by its symbol
(``enums = "symbol"``). The other blocks are
written here from the definitions with hand-picked values; the ``*.out.jsonl`` files are the
plugin's output, checked by hand against the values below.

    python3 plugins/sunspec/cases/make_cases.py
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

MARKER = (0x5375, 0x6E53)  # "SunS"
END = (0xFFFF, 0)

NI16 = 0x8000  # int16 and sunssf: not implemented
NU16 = 0xFFFF  # uint16, enum16
NU32 = 0xFFFFFFFF  # uint32, bitfield32
NACC = 0  # acc32

# (name, type, registers) in definition order; the scale factor points are "sunssf"
COMMON = [("Mn", "string", 16), ("Md", "string", 16), ("Opt", "string", 8),
          ("Vr", "string", 8), ("SN", "string", 16), ("DA", "uint16", 1), ("Pad", "pad", 1)]  # fmt: skip

INVERTER = [
    ("A", "uint16", 1), ("AphA", "uint16", 1), ("AphB", "uint16", 1), ("AphC", "uint16", 1),
    ("A_SF", "sunssf", 1),
    ("PPVphAB", "uint16", 1), ("PPVphBC", "uint16", 1), ("PPVphCA", "uint16", 1),
    ("PhVphA", "uint16", 1), ("PhVphB", "uint16", 1), ("PhVphC", "uint16", 1), ("V_SF", "sunssf", 1),
    ("W", "int16", 1), ("W_SF", "sunssf", 1), ("Hz", "uint16", 1), ("Hz_SF", "sunssf", 1),
    ("VA", "int16", 1), ("VA_SF", "sunssf", 1), ("VAr", "int16", 1), ("VAr_SF", "sunssf", 1),
    ("PF", "int16", 1), ("PF_SF", "sunssf", 1), ("WH", "acc32", 2), ("WH_SF", "sunssf", 1),
    ("DCA", "uint16", 1), ("DCA_SF", "sunssf", 1), ("DCV", "uint16", 1), ("DCV_SF", "sunssf", 1),
    ("DCW", "int16", 1), ("DCW_SF", "sunssf", 1),
    ("TmpCab", "int16", 1), ("TmpSnk", "int16", 1), ("TmpTrns", "int16", 1), ("TmpOt", "int16", 1),
    ("Tmp_SF", "sunssf", 1), ("St", "enum16", 1), ("StVnd", "enum16", 1),
    ("Evt1", "bitfield32", 2), ("Evt2", "bitfield32", 2), ("EvtVnd1", "bitfield32", 2),
    ("EvtVnd2", "bitfield32", 2), ("EvtVnd3", "bitfield32", 2), ("EvtVnd4", "bitfield32", 2),
]  # fmt: skip


def _meter() -> list[tuple[str, str, int]]:
    pts: list[tuple[str, str, int]] = []

    def group(names: Sequence[str], type_: str, size: int, sf: str) -> None:
        pts.extend((n, type_, size) for n in names)
        pts.append((sf, "sunssf", 1))

    group(["A", "AphA", "AphB", "AphC"], "int16", 1, "A_SF")
    group(["PhV", "PhVphA", "PhVphB", "PhVphC", "PPV", "PhVphAB", "PhVphBC", "PhVphCA"],
          "int16", 1, "V_SF")  # fmt: skip
    group(["Hz"], "int16", 1, "Hz_SF")
    for q, unit in (("W", "W"), ("VA", "VA"), ("VAR", "VAR"), ("PF", "PF")):
        group([q, f"{unit}phA", f"{unit}phB", f"{unit}phC"], "int16", 1, f"{q}_SF")
    phases = ["", "PhA", "PhB", "PhC"]
    group([f"TotWh{d}{p}" for d in ("Exp", "Imp") for p in phases], "acc32", 2, "TotWh_SF")
    group([f"TotVAh{d}{p}" for d in ("Exp", "Imp") for p in phases], "acc32", 2, "TotVAh_SF")
    group([f"TotVArh{q}{p}" for q in ("ImpQ1", "ImpQ2", "ExpQ3", "ExpQ4") for p in phases],
          "acc32", 2, "TotVArh_SF")  # fmt: skip
    pts.append(("Evt", "bitfield32", 2))
    return pts


METER = _meter()
DEFINITIONS = {1: COMMON, 101: INVERTER, 102: INVERTER, 103: INVERTER,
               201: METER, 202: METER, 203: METER, 204: METER}  # fmt: skip
assert sum(n for _, _, n in COMMON) == 66
assert sum(n for _, _, n in INVERTER) == 50
assert sum(n for _, _, n in METER) == 105


def _not_implemented(type_: str, size: int) -> list[int]:
    if type_ in ("int16", "sunssf", "pad"):
        return [NI16]
    if type_ in ("uint16", "enum16"):
        return [NU16]
    if type_ == "acc32":
        return [0, 0]
    if type_ in ("uint32", "bitfield32"):
        return [0xFFFF, 0xFFFF]
    return [0] * size  # a string of NULs


def block(model: int, values: Mapping[str, int | str]) -> list[int]:
    """The block of one model (after its header): ``values`` by point name (raw integers, a
    string for string points), every other point 'not implemented'."""
    words: list[int] = []
    for name, type_, size in DEFINITIONS[model]:
        if name not in values:
            words += _not_implemented(type_, size)
            continue
        v = values[name]
        if type_ == "string":
            raw = str(v).encode()[: 2 * size].ljust(2 * size, b"\0")
            words += [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]
        elif size == 2:
            u = int(v) & 0xFFFFFFFF
            words += [u >> 16, u & 0xFFFF]
        else:
            words.append(int(v) & 0xFFFF)
    return words


def device_map(models: Sequence[tuple[int, list[int]]], *, marker: bool = True) -> list[int]:
    """Registers from the base address on: 'SunS', each model's header (ID, L) and block, and
    the end of the chain (0xFFFF, 0)."""
    words: list[int] = list(MARKER) if marker else [0, 0]
    for model, body in models:
        words += [model, len(body), *body]
    return words + list(END)


# --- published device maps --------------------------------------------------------------------
# Register dumps from pysunspec's test devices (sunspec/core/test/devices/), as hex bytes, two
# per register, from the 'SunS' marker on. mbmap_fronius.xml is a Fronius IG+ inverter's map:
# model 1 with L = 65 (no Pad), model 101 (single phase). The values below are its registers.
FRONIUS_HEX = """
53 75 6E 53 00 01 00 41
46 72 6F 6E 69 75 73 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
49 47 2B 56 37 2E 35 55 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
32 2E 31 2E 31 38 00 00 00 00 00 00 00 00 00 00 36 2E 32 2E 30 00 00 00 00 00 00 00 00 00 00 00
35 30 2E 32 35 39 37 39 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 01
00 65 00 32
02 25 02 25 FF FF FF FF FF FE FF FF FF FF FF FF 00 F3 FF FF FF FF 00 00 05 1B 00 00 17 71 FF FE
05 36 00 00 01 0B 00 00 03 D3 FF FF 00 1A 42 87 00 00 01 7C FF FE 01 5E 00 00 33 F4 FF FF 80 00
80 00 80 00 80 00 80 00 00 04 00 04 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 00 00 00
"""


def hex_words(hex_text: str) -> list[int]:
    raw = bytes.fromhex(hex_text)
    return [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]


def fronius_models() -> dict[int, list[int]]:
    """Model id -> block of the Fronius map (its chain walked: 'SunS', then ID, L, block)."""
    words = hex_words(FRONIUS_HEX)
    assert tuple(words[:2]) == MARKER
    models: dict[int, list[int]] = {}
    at = 2
    while at < len(words):
        model, length = words[at], words[at + 1]
        models[model] = words[at + 2 : at + 2 + length]
        at += 2 + length
    return models


# mbmap_test_inverter_1.xml: pysunspec's test three-phase inverter (model 1, L = 66; model 103),
# written there as typed values, here by point name.
TEST_INVERTER_COMMON = {"Mn": "SunSpecTest", "Md": "TestInverter-1", "Opt": "opt_a_b_c",
                        "Vr": "1.2.3", "SN": "sn-123456789", "DA": 1, "Pad": 0}  # fmt: skip
TEST_INVERTER_103 = {
    "A": 124, "AphA": 41, "AphB": 42, "AphC": 43, "A_SF": -1,
    "PhVphA": 2401, "PhVphB": 2402, "PhVphC": 2403, "V_SF": -1,  # PPVph.. 0xffff
    "W": 2970, "W_SF": 0, "Hz": 5999, "Hz_SF": -2, "VA": 2978, "VA_SF": 0,
    "VAr": 1, "VAr_SF": -1, "PF": 995, "PF_SF": -3, "WH": 1234567, "WH_SF": 0,
    "DCA": 100, "DCA_SF": -1, "DCV": 3001, "DCV_SF": -1, "DCW": 3001, "DCW_SF": 0,
    "TmpCab": 401, "TmpSnk": 402, "TmpTrns": 403, "TmpOt": 404, "Tmp_SF": -1,
    "St": 1, "StVnd": 2, "Evt1": 3, "Evt2": 4, "EvtVnd1": 5, "EvtVnd2": 6, "EvtVnd3": 7,
    "EvtVnd4": 8,
}  # fmt: skip


# --- the blocks of the cases ------------------------------------------------------------------

PUBLISHED_COMMON = {"Mn": "Device Manufacturer", "Md": "Inverter 123", "Vr": "v0.0.1",
                    "SN": "9999abcd", "Pad": 0x8000}  # fmt: skip

INVERTER_103 = {
    "A": 1234, "AphA": 412, "AphB": 411, "AphC": 411, "A_SF": -2,  # 12.34 A
    "PPVphAB": 4001, "PPVphBC": 3998, "PPVphCA": 4003,
    "PhVphA": 2305, "PhVphB": 2311, "PhVphC": 2298, "V_SF": -1,  # 230.5 V
    "W": 8520, "W_SF": 0, "Hz": 5001, "Hz_SF": -2, "VA": 8600, "VA_SF": 0,
    "VAr": -1100, "VAr_SF": 0, "PF": 9912, "PF_SF": -2,
    "WH": 12345678, "WH_SF": 1,  # 123456780 Wh
    "DCA": 2250, "DCA_SF": -2, "DCV": 3921, "DCV_SF": -1, "DCW": 8822, "DCW_SF": 0,
    "TmpCab": 412, "TmpSnk": 558, "Tmp_SF": -1,  # TmpTrns, TmpOt not implemented
    "St": 4, "StVnd": 0, "Evt1": 0, "Evt2": 0,  # MPPT, no events
}  # fmt: skip

INVERTER_101 = {  # single phase: phases B and C and the phase-to-phase voltages not implemented
    "A": 2170, "AphA": 2170, "A_SF": -2, "PhVphA": 2298, "V_SF": -1,
    "W": 4990, "W_SF": 0, "Hz": 4998, "Hz_SF": -2, "PF": -95, "PF_SF": 0,
    "WH": 998877, "WH_SF": 0, "TmpCab": -52, "Tmp_SF": -1, "St": 2, "Evt1": 1 << 10,
}  # fmt: skip

METER_203 = {
    "A": 2012, "AphA": 712, "AphB": 655, "AphC": 645, "A_SF": -2,
    "PhV": 2301, "PhVphA": 2302, "PhVphB": 2299, "PhVphC": 2303,
    "PPV": 3986, "PhVphAB": 3987, "PhVphBC": 3984, "PhVphCA": 3988, "V_SF": -1,
    "Hz": 4999, "Hz_SF": -2,
    "W": -4520, "WphA": -1510, "WphB": -1500, "WphC": -1510, "W_SF": 0,  # exporting 4.52 kW
    "VA": 4630, "VA_SF": 0, "VAR": 1003, "VAR_SF": 0, "PF": -976, "PF_SF": -1,
    "TotWhExp": 5432101, "TotWhImp": 1234567, "TotWhImpPhA": 411522, "TotWh_SF": 0,
    "TotVAhImp": 1300000, "TotVAh_SF": 0, "TotVArhImpQ1": 20123, "TotVArh_SF": 1,
    "Evt": 0,
}  # fmt: skip

METER_204 = {  # delta: no neutral, so no line-to-neutral voltages
    "A": 150, "AphA": 50, "AphB": 50, "AphC": 50, "A_SF": -1,
    "PPV": 4002, "PhVphAB": 4001, "PhVphBC": 4003, "PhVphCA": 4002, "V_SF": -1,
    "Hz": 50, "Hz_SF": 0, "W": 1040, "W_SF": 0, "TotWhImp": 77, "TotWh_SF": 3,  # 77 kWh
    "Evt": 1 << 2,  # M_EVENT_Power_Failure
}  # fmt: skip


def _line(model: int, words: list[int], ts: float, address: int, device: str = "pv") -> dict[str, object]:
    return {"device": device, "ts": ts, "source": "pv", "topic": f"sunspec/{model}",
            "registers": words, "function": 3, "address": address}  # fmt: skip


def cases() -> dict[str, tuple[dict[str, object], list[dict[str, object]]]]:
    common = block(1, PUBLISHED_COMMON)
    fronius = fronius_models()
    short_common = common[:65]  # an older device: model 1 with L = 65 (no Pad)
    inv = block(103, INVERTER_103)
    meter = block(203, METER_203)
    bad_sf = block(103, {**INVERTER_103, "W_SF": NI16})  # W implemented, W_SF not
    wild_sf = block(203, {**METER_203, "TotWh_SF": 11})
    return {
        "published": ({}, [_line(1, common, 1700000000.0, 40004), _line(1, short_common, 1700000001.0, 40004)]),
        "fronius": ({}, [_line(m, body, 1700000000.0 + k, a) for k, (m, body, a) in enumerate(
            [(1, fronius[1], 40004), (101, fronius[101], 40071)])]),
        "symbols": ({"enums": "symbol", "points": ["St", "StVnd", "W"]}, [
            _line(101, fronius[101], 1700000000.0, 40071),  # St 4: MPPT
            _line(103, block(103, {"St": 7, "StVnd": 12}), 1700000001.0, 40072),  # FAULT
            _line(103, block(103, {"St": 9}), 1700000002.0, 40072),  # not defined: "9"
        ]),
        "test_inverter": ({}, [
            _line(1, block(1, TEST_INVERTER_COMMON), 1700000000.0, 40004),
            _line(103, block(103, TEST_INVERTER_103), 1700000000.0, 40072),
        ]),
        "inverters": ({}, [
            _line(103, inv, 1700000000.0, 40070),
            _line(101, block(101, INVERTER_101), 1700000001.0, 40070),
            _line(102, block(102, {"A": 31, "AphA": 16, "AphB": 15, "A_SF": 0, "PPVphAB": 240,
                                   "PhVphA": 120, "PhVphB": 121, "V_SF": 0, "W": 37, "W_SF": 2,
                                   "St": 1}), 1700000002.0, 40070),
        ]),
        "meters": ({}, [
            _line(203, meter, 1700000000.0, 40122),
            _line(201, block(201, {"A": 52, "AphA": 52, "A_SF": -1, "PhV": 231, "PhVphA": 231,
                                   "V_SF": 0, "Hz": 50, "Hz_SF": 0, "W": 1201, "WphA": 1201,
                                   "W_SF": 0, "TotWhImp": 4242, "TotWh_SF": 0}), 1700000001.0, 40122),
            _line(204, block(204, METER_204), 1700000002.0, 40122),
        ]),
        "options": ({"names": "model", "prefix": "pv_", "models": [1, 103, 203],
                     "points": ["Mn", "W", "WH", "TotWhImp", "St"]}, [
            _line(1, common, 1700000000.0, 40004),
            _line(103, inv, 1700000000.0, 40070),
            _line(203, meter, 1700000000.0, 40122),
            _line(201, block(201, {"W": 5, "W_SF": 0}), 1700000000.0, 40122),  # not kept: nothing
        ]),
        "errors": ({}, [
            _line(103, inv[:40], 1700000000.0, 40070),  # a short block
            _line(103, bad_sf, 1700000001.0, 40070),  # W without its scale factor
            _line(203, wild_sf, 1700000002.0, 40122),  # a scale factor outside -10..10
            {**_line(103, inv, 1700000003.0, 40070), "topic": ""},  # a plain register block
            {**_line(103, inv, 1700000004.0, 40070), "topic": "sunspec/x"},
            {"device": "pv", "ts": 1700000005.0, "source": "pv", "payload": "SunS"},  # bytes
            _line(160, [0] * 20, 1700000006.0, 40300),  # a model it does not decode: nothing
            _line(103, block(103, {}), 1700000007.0, 40070),  # nothing implemented at all
        ]),
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, (config, lines) in cases().items():
        (here / f"{name}.config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (here / f"{name}.in.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
