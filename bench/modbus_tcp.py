"""Modbus TCP: reads per second across 50 simulated devices.

    .venv/bin/python bench/modbus_tcp.py                       # 5 servers x 10 unit ids, 5 s
    .venv/bin/python bench/modbus_tcp.py --servers 50 --units 1 --seconds 10

Simulated servers (pymodbus, flux_edge.sim.modbus_server.SimulatedModbusServer) run in a child
process; each serves ``--units`` unit ids, every device is polled for 10 holding registers as
fast as it answers (a poll every 1 ms: the poller is always busy). One ModbusBusPoller per
server (a source = one endpoint), in both connection modes:

- ``device``: one connection per device, devices polled concurrently (the default);
- ``endpoint``: one connection per endpoint, its devices polled in turn.

Prints reads/s in total and per device (mean and the slowest device: fairness), and the
poller's CPU time per read (this process only: the servers' CPU is the child's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import sys
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymodbus  # noqa: E402 (bench only: the daemon imports pymodbus in sources/modbus/client.py alone)

from flux_edge.model import Reading  # noqa: E402
from flux_edge.sim.modbus_server import SimulatedModbusServer  # noqa: E402
from flux_edge.sources.modbus.poller import ModbusBusPoller  # noqa: E402
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusTcpSource, RegisterConfig  # noqa: E402

HOST = "127.0.0.1"


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


# --- servers in a child process ---------------------------------------------------------------


def _serve(conn: multiprocessing.connection.Connection, servers: int, units: int) -> None:
    # Stopping the pollers closes connections under answers in flight: pymodbus logs each
    # unsent answer as an error (with a dump of the last frames). Not news here.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def main() -> None:
        sims = [SimulatedModbusServer(HOST, 0, device_id=range(1, units + 1), size=64)
                for _ in range(servers)]
        for sim in sims:
            for u in range(1, units + 1):
                sim.set_words("holding", 0, [u * 100 + i for i in range(10)], device_id=u)
            await sim.start()
        conn.send([sim.port for sim in sims])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # until told to stop
        conn.send(sum(sim.request_count() for sim in sims))
        for sim in sims:
            await sim.stop()

    asyncio.run(main())


# --- the poller side --------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.by_device: dict[str, int] = {}
        self.total = 0

    async def __call__(self, reading: Reading) -> None:
        key = f"{reading.source}/{reading.device}"
        self.by_device[key] = self.by_device.get(key, 0) + 1
        self.total += 1


async def measure(
    ports: list[int], units: int, mode: Literal["device", "endpoint"], seconds: float
) -> dict[str, float]:
    out = Counter()
    reg = RegisterConfig(name="block", address=0, type="string", count=10)
    pollers = []
    for i, port in enumerate(ports):
        devices = tuple(
            ModbusDeviceConfig(name=f"u{u}", unit_id=u, registers=(reg,))
            for u in range(1, units + 1)
        )
        cfg = ModbusTcpSource(host=HOST, port=port, devices=devices, interval=0.001)
        pollers.append(ModbusBusPoller(f"s{i}", cfg, out, tcp_connections=mode))
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    await asyncio.sleep(1.0)  # connect and warm up
    start = dict(out.by_device)
    n0, t0, c0 = out.total, time.monotonic(), time.process_time()
    await asyncio.sleep(seconds)
    n1, t1, c1 = out.total, time.monotonic(), time.process_time()
    per_device = [(out.by_device.get(k, 0) - start.get(k, 0)) / (t1 - t0) for k in out.by_device]
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    errors = sum(h.total_errors for p in pollers for h in p.health.values())
    return {
        "rate": (n1 - n0) / (t1 - t0),
        "per_device": sum(per_device) / len(ports) / units,
        "slowest": min(per_device) if len(per_device) == len(ports) * units else 0.0,
        "cpu_us": (c1 - c0) / max(n1 - n0, 1) * 1e6,
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=5)
    parser.add_argument("--units", type=int, default=10, help="unit ids per server")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="log: %(name)s: %(message)s")
    print("command: .venv/bin/python bench/modbus_tcp.py " + " ".join(sys.argv[1:]))
    print("machine:", machine())
    devices = args.servers * args.units
    print(
        f"\n## Modbus TCP: {devices} devices ({args.servers} server(s) x {args.units} unit "
        f"id(s)), 10 holding registers each, back-to-back polls, {args.seconds:g} s\n"
    )
    print("| connections | reads/s | per device (mean) | slowest device | poller CPU us/read |"
          " errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("device", "endpoint"):
        ctx = multiprocessing.get_context("fork")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, args.servers, args.units), daemon=True)
        proc.start()
        child.close()  # so a child that dies is an EOF here, not a hang
        try:
            if not conn.poll(30):
                raise RuntimeError("the simulated servers did not start within 30 s")
            ports = conn.recv()
            r = asyncio.run(measure(ports, args.units, mode, args.seconds))  # type: ignore[arg-type]
            conn.send("stop")
            conn.poll(30)
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        label = (f"one per device ({devices})" if mode == "device"
                 else f"one per endpoint ({args.servers})")
        print(f"| {label} | {r['rate']:.0f} | {r['per_device']:.1f} | {r['slowest']:.1f} | "
              f"{r['cpu_us']:.0f} | {r['errors']:.0f} |")
    print("\nmachine after:", machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
