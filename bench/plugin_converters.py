"""Per-message cost of the converter plugins through the host (encode + one wasm call + decode
into Measurement objects), at batch 64, with inputs taken from their golden cases.

    .venv/bin/python bench/plugin_converters.py [--seconds 2] [--batch 64]

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

from plugin_call import measure  # noqa: E402

from flux_edge.model import Reading  # noqa: E402
from flux_edge.plugins.host import PluginHost, PluginLimits  # noqa: E402

BUNDLED = ROOT / "flux_edge" / "plugins" / "bundled"
CASES = {"vedirect": ("victron", 0)}  # plugin: (golden case, line of the case to repeat)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"{platform.machine()} {platform.python_version()}; batch {args.batch}")
    with PluginHost(None) as host:
        for name, (case, line) in CASES.items():
            folder = ROOT / "plugins" / name / "cases"
            config = json.loads((folder / f"{case}.config.json").read_text())
            row = json.loads((folder / f"{case}.in.jsonl").read_text().splitlines()[line])
            payload = base64.b64decode(row["payload_b64"])
            plugin = host.load(name, BUNDLED / f"{name}.wasm", PluginLimits(timeout_s=1.0), config)
            msgs = [
                Reading(source="bench", device="dev", ts=1.7e9 + k, kind=0, payload=payload)
                for k in range(args.batch)
            ]
            per_msg, least, records, errors = measure(plugin, msgs, args.seconds)
            per_meas = per_msg * args.batch / max(records, 1)
            print(
                f"{name}: {per_msg * 1e6:.2f} us/msg (best {least * 1e6:.2f}), "
                f"{records / args.batch:g} measurements/msg, {per_meas * 1e6:.2f} us/measurement, "
                f"{errors} errors"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
