"""Per-message cost of Plugin.process (encode + ONE wasm call + decode) by batch size.

    .venv/bin/python bench/plugin_call.py                    # bundled plugins, else the WAT echo
    .venv/bin/python bench/plugin_call.py --wasm X.wasm --input registers|json [--config F.json]
    .venv/bin/python bench/plugin_call.py --raw               # + the cost of one empty call

Prints one table per plugin (batch, us/msg, msgs/s, output records, error records) and the
process' peak RSS. Target (docs/performance.md): <= 3 us per message at batch >= 64.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wasmtime  # noqa: E402 (bench only: the daemon imports wasmtime in host.py alone)
from wasmtime import _bindings  # noqa: E402

from flux_edge.model import Measurement, Reading  # noqa: E402
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits  # noqa: E402

BUNDLED = ROOT / "flux_edge" / "plugins" / "bundled"
ECHO = ROOT / "tests" / "fixtures" / "wat" / "echo.wat"

# A small boiler: 8 holding registers read in one request, as the Modbus source would.
REGISTERS: list[dict[str, Any]] = [
    {
        "name": "temperature",
        "function": "holding",
        "address": 0,
        "type": "int16",
        "byte_order": "big",
        "word_order": "big",
        "scale": 0.1,
        "offset": 0.0,
        "unit": "°C",
    },
    {
        "name": "pressure",
        "function": "holding",
        "address": 1,
        "type": "uint16",
        "byte_order": "big",
        "word_order": "big",
        "scale": 0.01,
        "offset": 0.0,
        "unit": "bar",
    },
    {
        "name": "flow",
        "function": "holding",
        "address": 2,
        "type": "float32",
        "byte_order": "big",
        "word_order": "big",
        "scale": 1.0,
        "offset": 0.0,
        "unit": "l/min",
    },
    {
        "name": "energy",
        "function": "holding",
        "address": 4,
        "type": "uint32",
        "byte_order": "big",
        "word_order": "big",
        "scale": 1.0,
        "offset": 0.0,
        "unit": "Wh",
    },
    {
        "name": "burner",
        "function": "holding",
        "address": 6,
        "type": "bool",
        "byte_order": "big",
        "word_order": "big",
        "scale": 1.0,
        "offset": 0.0,
        "unit": "",
    },
    {
        "name": "setpoint",
        "function": "holding",
        "address": 7,
        "type": "int16",
        "byte_order": "big",
        "word_order": "big",
        "scale": 0.1,
        "offset": 0.0,
        "unit": "°C",
    },
]
SOURCE = {"name": "boiler", "type": "modbus_tcp", "device": "boiler", "registers": REGISTERS}
JSON_FIELDS = [
    {"path": "temperature", "unit": "°C"},
    {"path": "humidity", "unit": "%"},
    {"path": "battery", "unit": "V"},
    {"path": "ok"},
]


def registers_input(n: int) -> list[Reading | Measurement]:
    return [
        Reading(
            source="boiler",
            device="boiler",
            ts=1_700_000_000.0 + k,
            kind=1,
            registers=(215 + k % 7, 153, 0x4148, 0x0000, 0, 1234, 1, 650),
            function=3,
            address=0,
        )
        for k in range(n)
    ]


def json_input(n: int) -> list[Reading | Measurement]:
    return [
        Reading(
            source="mqtt",
            device="sensor-7",
            ts=1_700_000_000.0 + k,
            kind=0,
            topic="site/hall/sensor-7",
            payload=json.dumps(
                {"temperature": 21.5 + k % 5, "humidity": 40, "battery": 3.01, "ok": True}
            ).encode(),
        )
        for k in range(n)
    ]


def measure(
    plugin: Plugin, messages: Sequence[Reading | Measurement], seconds: float
) -> tuple[float, int, int]:
    out = plugin.process(messages)  # warm up: input buffer allocated, caches filled
    errors = sum(1 for r in out if not isinstance(r, Measurement))
    iterations = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(20):
            plugin.process(messages)
        iterations += 20
        now = time.perf_counter()
        if now >= deadline:
            break
    per_msg = (now - t0) / (iterations * len(messages))
    return per_msg, len(out), errors


def raw_call_cost(host: PluginHost) -> None:
    """Cost of one empty wasm call: public Func.__call__ vs the C API path the host uses."""
    module = wasmtime.Module(
        host.engine,
        '(module (func (export "empty")) (func (export "p") (param i32 i32) (result i64)'
        " (i64.extend_i32_u (local.get 1))))",
    )
    store = wasmtime.Store(host.engine)
    store.set_epoch_deadline(1 << 40)
    ex = wasmtime.Instance(store, module, []).exports(store)
    empty, p = ex["empty"], ex["p"]
    assert isinstance(empty, wasmtime.Func) and isinstance(p, wasmtime.Func)
    ctx = store._context()
    args = (_bindings.wasmtime_val_raw_t * 2)()
    call = _bindings._wasmtime_func_call_unchecked
    trap_t = ctypes.POINTER(_bindings.wasm_trap_t)
    eref, pref = ctypes.byref(empty._func), ctypes.byref(p._func)

    def unchecked(fref: Any) -> None:
        trap = trap_t()
        if call(ctx, fref, args, 2, ctypes.byref(trap)) or trap:
            raise RuntimeError("trap")

    def bench(label: str, fn: Any, n: int = 20000) -> None:
        for _ in range(500):
            fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"  {label:<46} {(time.perf_counter() - t) / n * 1e6:7.2f} us")

    print("raw cost of one call (this machine):")
    bench("Func.__call__  () -> ()", lambda: empty(store))
    bench("Func.__call__  (i32, i32) -> i64", lambda: p(store, 1, 2))
    bench("wasmtime_func_call_unchecked () -> ()", lambda: unchecked(eref))

    def with_args() -> None:
        args[0].i32 = 1
        args[1].i32 = 2
        unchecked(pref)

    bench("wasmtime_func_call_unchecked (i32, i32) -> i64", with_args)
    bench("store.set_epoch_deadline", lambda: store.set_epoch_deadline(26))
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wasm", type=Path, help="plugin to measure (.wasm or .wat)")
    ap.add_argument("--input", choices=["registers", "json"], default="registers")
    ap.add_argument("--config", type=Path, help="JSON config for flux_init (default: a boiler)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--seconds", type=float, default=1.0, help="per batch size")
    ap.add_argument("--raw", action="store_true", help="also measure one empty call")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    targets: list[tuple[str, Path, str]] = []
    if args.wasm:
        targets.append((args.wasm.stem, args.wasm, args.input))
    else:
        for name, kind in (("modbus_decode", "registers"), ("json_normalize", "json")):
            path = BUNDLED / f"{name}.wasm"
            if path.exists():
                targets.append((name, path, kind))
        if not targets:
            print(f"(no plugins in {BUNDLED} yet: measuring the WAT echo fixture)\n")
            targets.append(("echo", ECHO, "registers"))

    with PluginHost(None) as host:
        if args.raw:
            raw_call_cost(host)
        for name, path, kind in targets:
            config: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
            if kind == "registers":
                config.setdefault("source", SOURCE)
            else:
                config.setdefault("source", {"name": "mqtt", "type": "mqtt", "device": "sensor-7"})
                config.setdefault("fields", JSON_FIELDS)  # json_normalize's field map
            plugin = host.load(name, path, PluginLimits(timeout_s=1.0), config)
            make = registers_input if kind == "registers" else json_input
            print(f"{name} ({path.name}, {kind} input)")
            print(f"  {'batch':>5}  {'us/msg':>7}  {'msgs/s':>9}  {'records':>7}  {'errors':>6}")
            for b in batches:
                per_msg, records, errors = measure(plugin, make(b), args.seconds)
                print(
                    f"  {b:>5}  {per_msg * 1e6:7.2f}  {1 / per_msg:9.0f}  {records:>7}  {errors:>6}"
                )
            print(f"  stats: {plugin.stats}")
            print()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
