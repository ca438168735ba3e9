"""Per-message cost of the plugin stage: Plugin.process = encode + ONE wasm call + decode into
Measurement objects, by batch size, for the bundled plugins (or any module).

    .venv/bin/python bench/plugin_call.py                      # modbus_decode, json_normalize
    .venv/bin/python bench/plugin_call.py --repeat 3           # median of 3 runs per row
    .venv/bin/python bench/plugin_call.py --breakdown          # + encode / call / decode split
    .venv/bin/python bench/plugin_call.py --wasm X.wasm --input registers|json [--config F.json]
    .venv/bin/python bench/plugin_call.py --raw                # + the cost of one empty call

Prints the command line and the machine first, then per plugin and batch size: us per input
message, us per output measurement, messages/s, measurements/s and the peak RSS of the process
measuring that plugin (each plugin runs in a fresh child process, so one plugin's memory does
not count for another; "RSS" is that process' peak). Every time is the median of slices of
~2,000 messages (robust to other work on a shared machine); with --repeat N, the median of N
such runs (all N shown). "best us/msg" is the least slice of all runs: the cost with the least
interference from other processes.
Target (docs/performance.md): <= 3 us per message at batch >= 64.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
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
from flux_edge.plugins.abi import decode_output, encode_batch  # noqa: E402
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


def _slices(fn: Any, count: int, seconds: float) -> tuple[float, float]:
    """Median and least seconds per message of ``fn()`` (about ``count`` messages each), timed
    in slices of ~2,000 messages for ``seconds``: a median of slices is robust to the bursts of
    other work on a shared machine that a plain mean over the whole run would absorb; the
    least slice is the cost with the least interference."""
    calls = max(1, 2000 // count)
    times = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        times.append((t1 - t0) / (calls * count))
        if t1 >= end:
            return statistics.median(times), min(times)


def measure(
    plugin: Plugin, messages: Sequence[Reading | Measurement], seconds: float
) -> tuple[float, float, int, int]:
    """Seconds per input message of ``plugin.process(messages)`` (median and least slice),
    measurements and error records in its result."""
    out = plugin.process(messages)  # warm up: input buffer allocated, caches filled
    errors = sum(1 for r in out if not isinstance(r, Measurement))
    median, least = _slices(lambda: plugin.process(messages), len(messages), seconds)
    return median, least, len(out) - errors, errors


def breakdown(
    plugin: Plugin, messages: Sequence[Reading | Measurement], seconds: float
) -> tuple[float, float, float]:
    """Seconds per input message spent in encode_batch, in the call (copy in, flux_process,
    copy out) and in decode_output, each timed on its own."""
    inst = plugin._inst
    assert inst is not None
    data = encode_batch(messages)
    out = plugin._call_process(inst, data)
    name = plugin.name
    n = len(messages)
    return (
        _slices(lambda: encode_batch(messages), n, seconds / 3)[0],
        _slices(lambda: plugin._call_process(inst, data), n, seconds / 3)[0],
        _slices(lambda: decode_output(out, messages, name), n, seconds / 3)[0],
    )


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


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return [
        f"machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()} "
        f"{platform.machine()}; load average {load}",
        f"python {platform.python_version()} ({platform.python_implementation()}); "
        f"wasmtime-py {version('wasmtime')}; msgspec {version('msgspec')}",
    ]


def targets(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    if args.wasm:
        return [(args.wasm.stem, args.wasm, args.input)]
    found = []
    for name, kind in (("modbus_decode", "registers"), ("json_normalize", "json")):
        path = BUNDLED / f"{name}.wasm"
        if path.exists():
            found.append((name, path, kind))
    if not found:
        print(f"(no plugins in {BUNDLED}: run plugins/build-all.sh; measuring the WAT echo)\n")
        found.append(("echo", ECHO, "registers"))
    return found


def run_plugin(args: argparse.Namespace, name: str, path: Path, kind: str) -> int:
    """Measure one plugin in this process (the child side of main)."""
    batches = [int(b) for b in args.batches.split(",")]
    config: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    if kind == "registers":
        config.setdefault("source", SOURCE)
    else:
        config.setdefault("source", {"name": "mqtt", "type": "mqtt", "device": "sensor-7"})
        config.setdefault("fields", JSON_FIELDS)  # json_normalize's field map
    make = registers_input if kind == "registers" else json_input
    with PluginHost(None) as host:
        if args.raw:
            raw_call_cost(host)
        plugin = host.load(name, path, PluginLimits(timeout_s=1.0), config)
        rows = []
        for b in batches:
            messages = make(b)
            runs = [measure(plugin, messages, args.seconds) for _ in range(args.repeat)]
            per_msg = statistics.median(r[0] for r in runs)
            least = min(r[1] for r in runs)
            _, _, records, errors = runs[0]
            split = breakdown(plugin, messages, args.seconds) if args.breakdown else None
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append((b, per_msg, least, [r[0] for r in runs], records, errors, split, rss))
        per = rows[0][4] / rows[0][0] if rows else 0.0
        size = path.stat().st_size
        print(f"{name} ({path.name}, {size} bytes; {kind} input; {per:g} measurements/message)")
        head = (
            f"  {'batch':>5}  {'us/msg':>6}  {'us/meas':>7}  {'msgs/s':>6}  {'meas/s':>7}  "
            f"{'best us/msg':>11}  {'errors':>6}  {'peak RSS':>9}"
        )
        if args.repeat > 1:
            head += f"  us/msg of {args.repeat} runs"
        if args.breakdown:
            head += "  encode + call + decode us/msg"
        print(head)
        for b, per_msg, least, all_runs, records, errors, split, rss in rows:
            meas = records / b
            us = per_msg * 1e6
            line = (
                f"  {b:>5}  {us:6.2f}  {us / meas if meas else float('nan'):7.3f}  "
                f"{1 / per_msg:6.0f}  {meas / per_msg:7.0f}  {least * 1e6:11.2f}  {errors:>6}  "
                f"{rss:5.1f} MiB"
            )
            if args.repeat > 1:
                line += "  " + " ".join(f"{x * 1e6:.2f}" for x in all_runs)
            if split is not None:
                e, c, d = (x * 1e6 for x in split)
                line += f"  {e:.2f} + {c:.2f} + {d:.2f}"
            print(line)
        print(f"  stats: {plugin.stats}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--wasm", type=Path, help="plugin to measure (.wasm or .wat)")
    ap.add_argument("--input", choices=["registers", "json"], default="registers")
    ap.add_argument("--config", type=Path, help="JSON config for flux_init (default: a boiler)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--seconds", type=float, default=1.0, help="per run of one batch size")
    ap.add_argument("--repeat", type=int, default=1, help="runs per batch size (median shown)")
    ap.add_argument("--breakdown", action="store_true", help="time encode / call / decode")
    ap.add_argument("--raw", action="store_true", help="also measure one empty call")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # child process: measure this target
    args = ap.parse_args(argv)
    found = targets(args)
    if args.only is not None:
        for name, path, kind in found:
            if name == args.only:
                return run_plugin(args, name, path, kind)
        return 2
    given = sys.argv[1:] if argv is None else argv
    print("command: " + shlex.join([sys.executable, *sys.argv[:1], *given]))
    for line in machine():
        print(line)
    print("target: <= 3 us per input message at batch >= 64\n")
    child_args = [a for a in given if a != "--raw"]
    for k, (name, _, _) in enumerate(found):
        raw = ["--raw"] if args.raw and k == 0 else []
        cmd = [sys.executable, str(Path(__file__).resolve()), *child_args, *raw, "--only", name]
        sys.stdout.flush()
        rc = subprocess.run(cmd, check=False).returncode
        if rc:
            return rc
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
