"""The console's footprint: the daemon's RSS and CPU with the console disabled, enabled with
nobody connected, and enabled with one browser (headless chromium, logged in, the live stream
open) - against a simulated boiler polled twice a second.

    .venv/bin/python bench/console_footprint.py [--seconds 30] [--warmup 10]

Targets (issue #16): RSS with the console enabled and one browser connected <= +5 MB over
disabled; no measurable CPU while nobody is connected. The daemon runs as `flux-edge run` in
a subprocess; RSS is VmRSS from /proc after the window, CPU is utime+stime over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux_edge.console.auth import add_user  # noqa: E402
from flux_edge.demo.boiler import BoilerSimulator  # noqa: E402

CONFIG = """
[daemon]
state_dir = "{state}"
log_level = "warning"
[metrics]
port = {mport}
[console]
enabled = {enabled}
port = {cport}
tls = "on"
[plugins.modbus_decode]
[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "0.5s"
chain = ["modbus_decode"]
registers = [
  {{ name = "temperature", address = 0, type = "int16", scale = 0.1, unit = "°C" }},
  {{ name = "burner", function = "coil", address = 0 }},
  {{ name = "setpoint", address = 1, type = "int16", scale = 0.1, unit = "°C" }},
]
[rules.hot]
device = "boiler"
when = "temperature > 80"
actions = ["burner_off"]
[actions.burner_off]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_phase(tmp: Path, sim_port: int, *, enabled: bool, browser: bool, warmup: float,
              seconds: float) -> tuple[int, float]:
    state = tmp / f"state-{enabled}-{browser}"
    users = state / "console" / "users.json"
    add_user(users, "bench", "viewer", "bench password 123")
    mport, cport = free_port(), free_port()
    cfg = tmp / f"site-{enabled}-{browser}.toml"
    cfg.write_text(CONFIG.format(state=state, mport=mport, cport=cport, port=sim_port,
                                 enabled=str(enabled).lower()))
    proc = subprocess.Popen([str(ROOT / ".venv/bin/flux-edge"), "run", "-c", str(cfg)],
                            stderr=subprocess.DEVNULL)
    if proc.poll() is not None:
        raise SystemExit(f"the daemon exited: {proc.returncode}")
    b = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if browser:
            from tests.support.browser import Browser

            b = Browser()
            b.get(f"https://127.0.0.1:{cport}/")
            b.wait(lambda: b.visible("#login"))
            b.type("#user", "bench")
            b.type("#password", "bench password 123")
            b.click("#login-btn")
            b.wait(lambda: b.visible("#app"))
        time.sleep(warmup)
        c0 = proc_cpu(proc.pid)
        time.sleep(seconds)
        cpu = proc_cpu(proc.pid) - c0
        rss = proc_rss_kib(proc.pid)
    finally:
        if b is not None:
            b.close()
        proc.terminate()
        proc.wait(30)
    return rss, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    sim = BoilerSimulator(port=0, start_temperature=55.0, burner=True, tick=0.1)
    loop.run_until_complete(sim.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {}
        for name, enabled, browser in (("disabled", False, False),
                                       ("enabled, nobody connected", True, False),
                                       ("enabled, one browser", True, True)):
            rss, cpu = run_phase(tmp, sim.port, enabled=enabled, browser=browser,
                                 warmup=args.warmup, seconds=args.seconds)
            results[name] = (rss, cpu)
            print(f"{name:28} RSS {rss / 1024:6.1f} MiB   CPU {cpu:5.2f} s in "
                  f"{args.seconds:g} s ({cpu / args.seconds * 100:4.1f} %)", flush=True)
    base_rss, base_cpu = results["disabled"]
    idle_rss, idle_cpu = results["enabled, nobody connected"]
    web_rss, web_cpu = results["enabled, one browser"]
    print(f"RSS: {(idle_rss - base_rss) / 1024:+.1f} MiB enabled, "
          f"{(web_rss - base_rss) / 1024:+.1f} MiB with one browser (target <= +5 MB)")
    print(f"CPU: {idle_cpu - base_cpu:+.2f} s enabled and idle vs disabled, "
          f"{web_cpu - base_cpu:+.2f} s with one browser, over {args.seconds:g} s")
    asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    main()
