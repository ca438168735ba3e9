"""Modbus RTU on the baud-accurate simulated line: throughput against the wire limit, and what a
silent slave costs the healthy ones.

    .venv/bin/python bench/modbus_rtu.py                 # both parts, default durations
    .venv/bin/python bench/modbus_rtu.py --part wire --seconds 5
    .venv/bin/python bench/modbus_rtu.py --part silent --seconds 30

Part "wire": one slave, the poller asking as fast as it can (a poll every 1 ms, so the line is
always busy) for 1 and 10 holding registers at 9600 and 115200 baud. The wire limit is
1 / (request + response characters x character time + 2 inter-frame silences): nothing can be
faster, since the slave may not answer before 3.5 characters of silence and the master may not
ask again before another 3.5. Target: >= 90% of it.

Part "silent": ten slaves on a line, one of them silent, all polled as fast as the line allows,
with the bus defaults (timeout 0.2 s, 1 retry, backoff from 1 s doubling to 60 s). A twin line
with only the nine healthy slaves runs at the same time, so both see the same machine load;
the loss is 1 - (healthy reads/s with the silent slave) / (reads/s without). Target: <= 5%.

The line and its slaves run in a child process each (tests/support/serial_line.py), so the
poller shares no interpreter lock with them. The simulated slave answers 3.5 characters after
the request left the wire (as the spec requires; timed like a slave's hardware timer, from the
relay's wire times) plus its own turnaround, reported below; it counts against the poller, as
do the relay's hand-over latencies. Not simulated: USB adapter latency (an FTDI adapter's
latency timer adds 1-16 ms per transaction unless set low). This machine's ptys refuse parity
bits, so lines run 8N1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymodbus  # noqa: E402 (bench only: the daemon imports pymodbus in sources/modbus/client.py alone)

from flux_edge.model import Reading  # noqa: E402
from flux_edge.sources.modbus.plan import ReadBlock, transaction_time  # noqa: E402
from flux_edge.sources.modbus.poller import ModbusBusPoller  # noqa: E402
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusRtuSource, RegisterConfig  # noqa: E402
from flux_edge.sources.modbus.timing import char_time, inter_frame_gap  # noqa: E402
from tests.support.serial_line import LineProcess  # noqa: E402


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load}; Linux {platform.release()}; "
        f"Python {platform.python_version()}; pymodbus {pymodbus.__version__}"
    )


def device(name: str, unit: int, count: int) -> ModbusDeviceConfig:
    reg = RegisterConfig(name="block", address=0, type="string", count=count)
    if count == 1:
        reg = RegisterConfig(name="block", address=0)
    return ModbusDeviceConfig(name=name, unit_id=unit, registers=(reg,))


def source(line: LineProcess, *devices: ModbusDeviceConfig, **kw: Any) -> ModbusRtuSource:
    return ModbusRtuSource(
        port=line.master_port,
        baudrate=line.baudrate,
        parity=line.parity,  # type: ignore[arg-type]
        stopbits=line.stopbits,
        bytesize=line.bytesize,
        devices=devices,
        **kw,
    )


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Counter:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    async def __call__(self, reading: Reading) -> None:
        self.times.setdefault(reading.device, []).append(time.monotonic())

    def count(self, devices: list[str], since: float, until: float) -> int:
        return sum(1 for d in devices for t in self.times.get(d, ()) if since <= t < until)


# --- part 1: throughput against the wire limit ----------------------------------------------


async def wire_case(baud: int, count: int, seconds: float) -> dict[str, Any]:
    line = LineProcess(baud, [1], parity="N", registers=max(count, 1))
    try:
        out = Counter()
        cfg = source(line, device("dev", 1, count), interval=0.001, timeout=0.2)
        poller = ModbusBusPoller("bench", cfg, out)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(max(1.0, 20 * transaction_time(ReadBlock(3, 0, count), 1e-3, 0)))
        line.reset()
        t0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        t1, cpu1 = time.monotonic(), time.process_time()
        n = out.count(["dev"], t0, t1)
        stats = line.stats()
        await stop(task)
    finally:
        line.close()
    ct = char_time(baud, 8, "N", 1)
    gap = inter_frame_gap(baud, 8, "N", 1)
    limit = 1 / transaction_time(ReadBlock(3, 0, count), ct, gap)
    turn = sorted(stats["turnarounds"])
    return {
        "baud": baud,
        "count": count,
        "rate": n / (t1 - t0),
        "limit": limit,
        "turnaround_median_us": statistics.median(turn) * 1e6 if turn else float("nan"),
        "turnaround_p90_us": turn[int(0.9 * len(turn))] * 1e6 if turn else float("nan"),
        "cpu_us_per_read": (cpu1 - cpu0) / max(n, 1) * 1e6,
        "errors": poller.health["dev"].total_errors,
        "collisions": stats["collisions"],
    }


async def part_wire(seconds: float) -> bool:
    print("\n## RTU throughput vs the wire limit (8N1, one slave, back-to-back polls)\n")
    print(
        "| baud | registers | reads/s | wire limit/s | % of limit | slave turnaround "
        "median / p90 (us) | poller CPU us/read | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for baud in (9600, 115200):
        for count in (1, 10):
            r = await wire_case(baud, count, seconds)
            pct = 100 * r["rate"] / r["limit"]
            ok = ok and pct >= 90 and r["errors"] == 0 and r["collisions"] == 0
            print(
                f"| {baud} | {count} | {r['rate']:.1f} | {r['limit']:.1f} | {pct:.1f}% | "
                f"{r['turnaround_median_us']:.0f} / {r['turnaround_p90_us']:.0f} | "
                f"{r['cpu_us_per_read']:.0f} | {r['errors']} |"
            )
    print("\ntarget: >= 90% of the wire limit:", "met" if ok else "MISSED")
    return ok


# --- part 2: a silent slave among ten -------------------------------------------------------


async def silent_case(baud: int, seconds: float) -> dict[str, Any]:
    units = list(range(1, 11))
    healthy = [f"dev{u}" for u in units[:-1]]
    devices = [device(f"dev{u}", u, 10) for u in units]
    line_a = LineProcess(baud, units[:-1], parity="N", registers=10)
    line_b = LineProcess(baud, units, parity="N", registers=10)
    try:
        line_b.silence(10)
        out_a, out_b = Counter(), Counter()
        marks: dict[str, float] = {}

        def on_status(dev: str, quality: str, error: str) -> None:
            marks.setdefault(f"{dev} {quality}", time.monotonic())

        # the bus defaults: timeout 0.2 s, 1 retry, backoff 1 s doubling up to 60 s
        poller_a = ModbusBusPoller("a", source(line_a, *devices[:-1], interval=0.001), out_a)
        poller_b = ModbusBusPoller(
            "b", source(line_b, *devices, interval=0.001), out_b, on_status=on_status
        )
        t0 = time.monotonic()
        tasks = [asyncio.create_task(p.run()) for p in (poller_a, poller_b)]
        await asyncio.sleep(seconds)
        t1 = time.monotonic()
        for task in tasks:
            await stop(task)
        dead_requests = line_b.stats()["requests"].get((10, 3), 0)
    finally:
        line_a.close()
        line_b.close()
    t_bad = marks.get("dev10 bad", t0)
    settle = 0.5  # both pollers starting up
    alone = out_a.count(healthy, t0 + settle, t1) / (t1 - t0 - settle)
    together = out_b.count(healthy, t0 + settle, t1) / (t1 - t0 - settle)
    alone_after = out_a.count(healthy, t_bad, t1) / (t1 - t_bad)
    together_after = out_b.count(healthy, t_bad, t1) / (t1 - t_bad)
    return {
        "baud": baud,
        "alone": alone,
        "together": together,
        "loss": 1 - together / alone,
        "loss_after": 1 - together_after / alone_after,
        "detect": t_bad - t0,
        "dead_requests": dead_requests,
        "healthy_errors": sum(
            p.health[d].total_errors for p in (poller_a, poller_b) for d in healthy
        ),
    }


async def part_silent(seconds: float) -> bool:
    print(
        f"\n## One silent slave among ten (8N1, 10 registers each, back-to-back polls, "
        f"{seconds:g} s; bus defaults: timeout 0.2 s, retries 1, backoff 1 s .. 60 s)\n"
    )
    print(
        "| baud | healthy 9 alone (reads/s) | with the silent one (reads/s) | loss, whole run | "
        "loss once it is known dead | found dead after (s) | requests to it | errors of the 9 "
        "(both lines) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for baud in (9600, 115200):
        r = await silent_case(baud, seconds)
        ok = ok and r["loss"] <= 0.05 and r["healthy_errors"] == 0
        print(
            f"| {baud} | {r['alone']:.1f} | {r['together']:.1f} | {100 * r['loss']:.1f}% | "
            f"{100 * r['loss_after']:.1f}% | {r['detect']:.2f} | {r['dead_requests']} | "
            f"{r['healthy_errors']} |"
        )
    print("\ntarget: <= 5% loss:", "met" if ok else "MISSED")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("wire", "silent", "all"), default="all")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="measuring time per case (default: wire 5 s, silent 30 s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="log: %(name)s: %(message)s")
    print("command: .venv/bin/python bench/modbus_rtu.py " + " ".join(sys.argv[1:]))
    print("machine:", machine())
    ok = True
    if args.part in ("wire", "all"):
        ok = asyncio.run(part_wire(args.seconds or 5.0)) and ok
    if args.part in ("silent", "all"):
        ok = asyncio.run(part_silent(args.seconds or 30.0)) and ok
    print("\nmachine after:", machine())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
