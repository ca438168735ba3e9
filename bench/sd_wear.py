"""SD-card wear (issue #13): bytes the daemon writes per hour at a steady message rate with the
uplink up.

    .venv/bin/python bench/sd_wear.py [--rate 100] [--seconds 90] [--warmup 10] [--set K=V ...]

The real daemon (``flux-edge run`` as a subprocess) reads numbered JSON messages from an MQTT
source (QoS 1, --rate messages/s spread over 4 devices, published by an in-process client to a
local mosquitto), normalizes them with the bundled json_normalize plugin (one measurement per
message) and forwards them through its outbox to a second mosquitto, where a collector counts
them. The state directory is on the machine's real file system (write_bytes on a tmpfs is 0).

Measured: ``write_bytes`` of /proc/<daemon pid>/io (bytes the process caused to be written to
the block layer: SQLite's WAL appends, checkpoints and fsyncs, the rule state, the audit log,
logs excluded since they go to stdout) between the end of --warmup and --seconds later,
extrapolated to an hour; also the outbox file sizes at the end and the records delivered.
--set TABLE.KEY=VALUE changes the generated config (e.g. --set uplink.commit_interval='"1s"').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_edge.mqtt import MqttClient
from tests.conftest import bundled_wasm, free_port
from tests.support.daemon import DaemonProcess, NotifySocket, http_get, metric
from tests.support.mosquitto import HOST, Mosquitto

CONFIG = """
[daemon]
name = "gw"
state_dir = "{state}"

[metrics]
port = {mport}

[plugins.json_normalize.config]
fields = [{{ path = "seq" }}]

[sources.devices]
type = "mqtt"
host = "127.0.0.1"
port = {local}
topics = [{{ topic = "site/+/telemetry", qos = 1 }}]
device_from_topic = "site/{{device}}/telemetry"
chain = ["json_normalize"]

[uplink]
host = "127.0.0.1"
port = {upstream}
topic = "flux-edge/{{gateway}}/{{device}}"
format = "batch"
{extra}
"""


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/PID/io")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE")
    args = ap.parse_args()
    extra = "\n".join(s.split(".", 1)[1] for s in args.set if s.startswith("uplink."))
    bundled_wasm("json_normalize")
    base = Path(tempfile.mkdtemp(prefix="sd-wear-", dir="/var/tmp"))
    (base / "local").mkdir()
    (base / "up").mkdir()
    local, upstream = Mosquitto(base / "local"), Mosquitto(base / "up")
    local.start()
    upstream.start()
    mport = free_port()
    config = base / "flux-edge.toml"
    config.write_text(CONFIG.format(state=base / "state", mport=mport, local=local.port,
                                    upstream=upstream.port, extra=extra))
    notify = NotifySocket(base / "notify.sock")
    seen: set[int] = set()

    def on_up(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if topic.endswith("/status"):
            return
        for r in json.loads(payload):
            seen.add(int(r["value"]))

    collector = MqttClient("collector", HOST, upstream.port)
    collector.subscribe("flux-edge/gw/+", 1, on_up)
    collector.start()
    await collector.wait_subscribed("flux-edge/gw/+")
    after = time.monotonic()
    daemon = DaemonProcess(config, notify, log=base / "daemon.log")
    try:
        await asyncio.to_thread(notify.wait_line, "READY=1", 60.0, after)
        while True:
            text = http_get(f"http://127.0.0.1:{mport}/metrics")[1]
            if metric(text, "flux_edge_device_up", 'source="devices"') == 1:
                break
            await asyncio.sleep(0.1)
        pub = MqttClient("devices", HOST, local.port)
        pub.start()
        await pub.wait_connected(10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        total = args.warmup + args.seconds
        n = int(total * args.rate)
        start_bytes = end_bytes = 0
        measured = False
        for seq in range(n):
            delay = t0 + seq / args.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not measured and loop.time() - t0 >= args.warmup:
                start_bytes, start_t, start_seq = write_bytes(daemon.pid), loop.time(), seq
                measured = True
            await pub.publish(f"site/dev{seq % 4}/telemetry", json.dumps({"seq": seq}).encode(), 1)
        end_bytes, end_t = write_bytes(daemon.pid), loop.time()
        await pub.close()
        deadline = loop.time() + 30
        while len(seen) < n and loop.time() < deadline:  # noqa: ASYNC110 - a bench, polled
            await asyncio.sleep(0.1)
        span = end_t - start_t
        written = end_bytes - start_bytes
        files = {p.name: p.stat().st_size for p in sorted((base / "state").iterdir())
                 if p.is_file()}
        print(f"rate {args.rate:g} msg/s for {span:.1f} s (after {args.warmup:g} s warm-up), "
              f"{n - start_seq} messages measured, config extra: {extra or '(defaults)'}")
        print(f"write_bytes: {written:,} B in {span:.1f} s = {written / span:,.0f} B/s = "
              f"{written / span * 3600 / 2**20:,.1f} MiB/hour = "
              f"{written / span * 86400 / 2**30:,.2f} GiB/day; "
              f"{written / max(1, (n - start_seq)):,.0f} B per message")
        print(f"delivered upstream: {len(seen)} of {n}; state files at the end: {files}")
    finally:
        daemon.stop()
        await collector.close()
        notify.close()
        local.stop()
        upstream.stop()


if __name__ == "__main__":
    asyncio.run(main())
