"""Per-message cost of the converter plugins through the host (encode + one wasm call + decode
into Measurement objects), at batch 64, with inputs taken from their golden cases.

    .venv/bin/python bench/plugin_converters.py [--seconds 2] [--batch 64] [--breakdown] [NAME ...]

Builds nothing: run plugins/build-all.sh first. Target (docs/performance.md, issue 15):
<= 3 us per message at batch 64. Prints us per message and per measurement (a VE.Direct
block carries 10-20 measurements, so the per-measurement figure is the fairer comparison
with modbus_decode / json_normalize in bench/plugin_call.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from plugin_call import breakdown, measure  # noqa: E402

from flux_edge.model import Reading  # noqa: E402
from flux_edge.plugins.host import PluginHost, PluginLimits  # noqa: E402

BUNDLED = ROOT / "flux_edge" / "plugins" / "bundled"
# plugin: (golden case, line of the case to repeat, lines processed once before: births)
CASES: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "vedirect": ("victron", 0, ()),  # a SmartSolar MPPT block, 19 fields
    "sml": ("meters", 0, ()),  # an eHZ frame: open, GetList with 8 entries, close
    "iec62056_21": ("readouts", 0, ()),  # an MT174-style mode C readout, 8 data lines
    "mbus": ("meters", 0, ()),  # a heat meter RSP_UD, 13 records
    "sparkplug_b": ("options", 2, (0, 1)),  # a DDATA of 5 metrics by alias, after the births
    "sunspec": ("inverters", 0, ()),  # a model 103 block (50 registers), 23 points implemented
}


def _reading(row: dict[str, object], ts: float) -> Reading:
    if "registers" in row:  # a Modbus block (sunspec: topic "sunspec/<model id>")
        return Reading(
            source="bench",
            device="dev",
            ts=ts,
            kind=1,
            registers=tuple(int(w) for w in row["registers"]),  # type: ignore[attr-defined]
            function=int(row.get("function", 3)),  # type: ignore[call-overload]
            address=int(row.get("address", 0)),  # type: ignore[call-overload]
            topic=str(row.get("topic", "")),
        )
    return Reading(
        source="bench",
        device="dev",
        ts=ts,
        kind=0,
        payload=base64.b64decode(str(row["payload_b64"])),
        topic=str(row.get("topic", "")),
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true", help="+ encode / call / decode split")
    parser.add_argument("plugins", nargs="*", help="only these (default: all of CASES)")
    args = parser.parse_args()
    print(f"{platform.machine()} {platform.python_version()}; batch {args.batch}")
    with PluginHost(None) as host:
        for name, (case, line, prelude) in CASES.items():
            if args.plugins and name not in args.plugins:
                continue
            folder = ROOT / "plugins" / name / "cases"
            config = json.loads((folder / f"{case}.config.json").read_text())
            rows = [json.loads(x) for x in (folder / f"{case}.in.jsonl").read_text().splitlines()]
            plugin = host.load(name, BUNDLED / f"{name}.wasm", PluginLimits(timeout_s=1.0), config)
            plugin.process([_reading(rows[k], 1.7e9) for k in prelude])
            msgs = [_reading(rows[line], 1.7e9 + k) for k in range(args.batch)]
            per_msg, least, records, errors = measure(plugin, msgs, args.seconds)
            per_meas = per_msg * args.batch / max(records, 1)
            print(
                f"{name}: {per_msg * 1e6:.2f} us/msg (best {least * 1e6:.2f}), "
                f"{records / args.batch:g} measurements/msg, {per_meas * 1e6:.2f} us/measurement, "
                f"{errors} errors"
            )
            if args.breakdown:
                enc, call, dec = breakdown(plugin, msgs, args.seconds)
                print(
                    f"  encode {enc * 1e6:.2f}, call (guest) {call * 1e6:.2f}, "
                    f"decode {dec * 1e6:.2f} us/msg"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
