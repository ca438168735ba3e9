"""MQTT pipeline benchmark (issue #5): the real daemon next to a naive paho script.

    .venv/bin/python bench/mqtt_pipeline.py [--qos 0,1] [--seconds 8] [--rate 1000] [--devices 10]
        [--only daemon|naive] [--phase tput,lat] [--format batch|single] [--max-rate 0]
        [--window 2000] [--set TABLE.KEY=VALUE ...] [--nagle] [--profile DIR] [--keep DIR]
        [--verbose]

The job: devices publish {"seq": n, "temp": t, "sent": unix_time} on site/<device>/telemetry to
a local mosquitto; every 10th message of a device is hot (temp > 80). The system under test
subscribes to site/+/telemetry, sends {"device": d, "temp": t} on site/<device>/cmd for every
hot message, and forwards every message upstream to a second mosquitto.

- daemon: ``flux-edge run --config <generated toml>`` as a subprocess: an mqtt source
  (device_from_topic "site/{device}/telemetry", subscription QoS = --qos), the bundled
  json_normalize plugin (fields temp and seq, ts from "sent"), the rule ``temp > 80`` (mode
  level: every hot message fires), an mqtt_publish action (QoS = --qos) and the durable
  uplink (QoS 1 always, the outbox in SQLite; --format batch: topic up/{gateway}/{device},
  arrays of up to 100 records; single: up/{gateway}/{device}/{name}, one record per publish).
  Two measurements per message (temp, seq) go upstream; the record named "seq" identifies the
  message. --set changes the generated config (e.g. --set 'sources.site.protocol="3.1.1"').
- naive: bench/naive_mqtt.py, one paho callback, QoS = --qos everywhere.

Each run gets two fresh brokers on free ports (max_queued_messages 1,000,000 and
max_inflight_messages 1000, so mosquitto does not silently drop what a slow QoS 1 client has not
taken; set_tcp_nodelay true unless --nagle: with Nagle on, the broker holds its PUBACK to the
daemon's QoS 1 command until the daemon's next outbox commit makes it send its own PUBACKs), a
fresh collector and device simulator (bench/_mqtt_load.py: raw-socket MQTT in separate
processes) and a fresh state dir (the compiled-plugin cache and the bytecode cache are warmed
once beforehand, as on a gateway that has started before). Phases:

- tput: closed loop: the devices publish as fast as the simulator can (or --max-rate), keeping
  at most --window messages sent but not yet seen upstream, for --seconds; delivered msg/s =
  messages seen upstream / (last upstream arrival - first send). What the system drops at
  QoS 0 is lost (reported); at QoS 1 nothing may be lost.
- lat: paced at --rate msg/s in total for --seconds; latency = arrival at the collector - the
  device's send time, for commands (site/<d>/cmd) and upstream records; sends in the first
  second are left out (warm-up).

CPU s/10k: utime+stime of the system's process (/proc/<pid>/stat) from the first send until
everything arrived, per 10,000 delivered messages. RSS: VmHWM (/proc/<pid>/status) at the end.
--verbose adds the daemon's metrics, an RSS breakdown (/proc/<pid>/smaps) and the main thread's
run-queue wait (/proc/<pid>/schedstat). --profile DIR runs the daemon under cProfile
(bench/_profiled.py) and writes DIR/<run>.prof; any FLUX_BENCH_* variable in the environment
also starts it through bench/_profiled.py (GC timing, stall sampler, stage trace, experiments:
see there). --keep DIR keeps configs, logs and the raw send/receive times of every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.mosquitto import Mosquitto  # noqa: E402

PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
LOAD = str(ROOT / "bench/_mqtt_load.py")
NAIVE = str(ROOT / "bench/naive_mqtt.py")
PROFILED = str(ROOT / "bench/_profiled.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 1.0  # seconds of sends left out of the latency figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) of ``pid``'s main thread and of all its other threads
    (Python does not name OS threads, so they are told apart by thread id only)."""
    out: dict[str, float] = {"main": 0.0, "others": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            key = "main" if task.name == str(pid) else "others"
            out[key] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def schedstat(pid: int) -> tuple[float, float, int]:
    """The main thread's (seconds on a CPU, seconds runnable but waiting for one, timeslices)."""
    run, wait, slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(run) / 1e9, int(wait) / 1e9, int(slices)


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smaps_summary(pid: int, top: int = 6) -> str:
    """Resident kB by mapping: anonymous (Python arenas, thread heaps, wasm memory), [heap],
    and the largest files."""
    agg: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            name = Path(parts[5]).name if len(parts) >= 6 else "[anon]"
        elif parts[0] == "Rss:":
            agg[name] = agg.get(name, 0) + int(parts[1])
    items = sorted(agg.items(), key=lambda kv: -kv[1])
    return f"RSS {sum(agg.values()) / 1024:.1f} MB: " + ", ".join(
        f"{k} {v / 1024:.1f}" for k, v in items[:top])


def daemon_config(state: Path, *, in_port: int, up_port: int, metrics_port: int, qos: int,
                  fmt: str) -> str:
    topic = "up/{gateway}/{device}" if fmt == "batch" else "up/{gateway}/{device}/{name}"
    return f"""\
[daemon]
name = "bench"
state_dir = "{state}"
log_level = "info"

[metrics]
port = {metrics_port}

[plugins.json_normalize]
[plugins.json_normalize.config]
ts_path = "sent"
ts_unit = "s"
fields = [{{ path = "temp" }}, {{ path = "seq" }}]

[sources.site]
type = "mqtt"
port = {in_port}
topics = [{{ topic = "site/+/telemetry", qos = {qos} }}]
device_from_topic = "site/{{device}}/telemetry"
chain = ["json_normalize"]

[rules.hot]
when = "temp > 80"
inputs = {{ temp = "double" }}
mode = "level"
severity = "debug"
actions = ["cmd"]

[actions.cmd]
type = "mqtt_publish"
source = "site"
topic = "site/{{device}}/cmd"
payload = '{{{{"device": {{device:json}}, "temp": {{value:json}}}}}}'
qos = {qos}

[uplink]
host = "127.0.0.1"
port = {up_port}
topic = "{topic}"
format = "{fmt}"
"""


def apply_overrides(toml: str, overrides: list[str]) -> str:
    """--set TABLE.KEY=VALUE (VALUE in TOML syntax): replace or add KEY in [TABLE]."""
    lines = toml.splitlines()
    for item in overrides:
        path, _, value = item.partition("=")
        table, _, key = path.strip().rpartition(".")
        start = lines.index(f"[{table}]") + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")),
                   len(lines))
        for i in range(start, end):
            if lines[i].split("=")[0].strip() == key:
                lines[i] = f"{key} = {value.strip()}"
                break
        else:
            lines.insert(start, f"{key} = {value.strip()}")
    return "\n".join(lines) + "\n"


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


@dataclass
class Result:
    sut: str
    qos: int
    phase: str
    fmt: str
    sent: int = 0
    offered: float = 0.0  # msg/s the simulator achieved
    delivered: int = 0  # unique messages seen upstream
    rate: float = 0.0
    lost_up: int = 0
    lost_cmd: int = 0
    dups: int = 0
    cpu_10k: float = 0.0
    hwm_mb: float = 0.0
    cmd_ms: tuple[float, float] = (float("nan"), float("nan"))
    up_ms: tuple[float, float] = (float("nan"), float("nan"))
    notes: list[str] = field(default_factory=list)


class Lines:
    """Reads a child's stdout lines in a thread; keeps the last JSON object and a 'ready' flag."""

    def __init__(self, stream: IO[str]) -> None:
        self.last: dict[str, Any] = {}
        self.forward: IO[str] | None = None  # the collector's count goes to the simulator
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._t.start()

    def _run(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.strip()
            if line == "ready":
                self.ready.set()
            elif line.startswith("{"):
                self.last = json.loads(line)
                fwd = self.forward
                if fwd is not None and "up" in self.last:
                    try:
                        fwd.write(f"{self.last['up']}\n")
                        fwd.flush()
                    except (BrokenPipeError, ValueError):
                        self.forward = None
            self.lines.append(line)

    def join(self, timeout: float) -> None:
        self._t.join(timeout)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def scrape(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
    return out


def sut_env(work: Path) -> dict[str, str]:
    """The systems under test run with a bytecode cache, as installed software does: compiling
    modules from source (PYTHONDONTWRITEBYTECODE is set on this machine) costs ~3.5 MB of RSS
    that stays, and more at the peak. The cache lives in the work dir, not in the repo."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def warm_cache(work: Path) -> tuple[Path, float]:
    """Start the daemon once so json_normalize is compiled into a cache (and the bytecode of
    flux_edge and its libraries); its peak RSS, cold."""
    state = work / "warm"
    cfg = work / "warm.toml"
    metrics_port = free_port()
    cfg.write_text(daemon_config(state, in_port=free_port(), up_port=free_port(),
                                 metrics_port=metrics_port, qos=1, fmt="batch"))
    log = work / "warm.log"
    with log.open("w") as err:
        proc = subprocess.Popen([PY, "-m", "flux_edge", "run", "--config", str(cfg)],
                                stderr=err, cwd=ROOT, env=sut_env(work))
    try:
        def up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                scrape(metrics_port)
            except OSError:
                return False
            return True

        wait_for(up, 60, "the daemon to start (warm-up)")
        hwm = vm_hwm_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    if proc.returncode != 0:
        raise RuntimeError(f"warm-up daemon failed:\n{log.read_text()}")
    return state / "cache", hwm


def run_one(sut: str, qos: int, phase: str, *, args: argparse.Namespace, work: Path,
            cache: Path | None) -> Result:
    res = Result(sut, qos, phase, args.format if sut == "daemon" else "-")
    name = f"{sut}-q{qos}-{phase}-{res.fmt}"
    d = work / name
    d.mkdir()
    brokers = []
    for sub in ("in", "up"):
        (d / sub).mkdir()
        brokers.append(Mosquitto(d / sub, max_queued_messages=1_000_000,
                                 max_inflight_messages=1000,
                                 extra_config="" if args.nagle else "set_tcp_nodelay true"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        for b in brokers:
            b.start()
        b_in, b_up = brokers
        collector = subprocess.Popen(
            [PY, LOAD, "collect", "--in-port", str(b_in.port), "--up-port", str(b_up.port),
             "--out", str(d / "collected.pkl")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(collector)
        assert collector.stdout is not None and collector.stdin is not None
        progress = Lines(collector.stdout)
        progress.ready.wait(10)

        metrics_port = 0
        if sut == "daemon":
            assert cache is not None
            state = d / "state"
            state.mkdir()
            shutil.copytree(cache, state / "cache")
            metrics_port = free_port()
            cfg = d / "daemon.toml"
            cfg.write_text(apply_overrides(
                daemon_config(state, in_port=b_in.port, up_port=b_up.port,
                              metrics_port=metrics_port, qos=qos, fmt=args.format),
                args.set))
            cmd = [PY, "-m", "flux_edge", "run", "--config", str(cfg)]
            env = sut_env(work)
            if args.profile:
                env["FLUX_BENCH_PROFILE"] = str(Path(args.profile).resolve() / f"{name}.prof")
            if any(k.startswith("FLUX_BENCH_") for k in env):
                cmd = [PY, PROFILED, "run", "--config", str(cfg)]
            log = d / "daemon.log"
            with log.open("w") as err:
                sut_proc = subprocess.Popen(cmd, stderr=err, cwd=ROOT, env=env)
            procs.append(sut_proc)

            def started() -> bool:
                if sut_proc.poll() is not None:
                    raise RuntimeError(f"daemon exited:\n{log.read_text()}")
                try:
                    m = scrape(metrics_port)
                except OSError:
                    return False
                return (m.get("flux_edge_uplink_connected") == 1 and
                        m.get('flux_edge_device_up{source="site",device="site"}') == 1)

            wait_for(started, 60, "the daemon to connect")
        else:
            sut_proc = subprocess.Popen(
                [PY, NAIVE, "--in-port", str(b_in.port), "--up-port", str(b_up.port),
                 "--qos", str(qos)], stdout=subprocess.PIPE, text=True, env=sut_env(work))
            procs.append(sut_proc)
            assert sut_proc.stdout is not None
            naive_out = Lines(sut_proc.stdout)
            wait_for(naive_out.ready.is_set, 20, "the naive script to subscribe")

        if args.sut_nice:
            for task in Path(f"/proc/{sut_proc.pid}/task").iterdir():
                os.setpriority(os.PRIO_PROCESS, int(task.name), args.sut_nice)
        rate = args.rate if phase == "lat" else args.max_rate
        gen = subprocess.Popen(
            [PY, LOAD, "gen", "--port", str(b_in.port), "--qos", str(qos), "--devices",
             str(args.devices), "--rate", str(rate), "--seconds", str(args.seconds),
             "--out", str(d / "sent.pkl"),
             "--window", str(args.window if phase == "tput" else 0)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(gen)
        assert gen.stdin is not None and gen.stdout is not None
        gen_out = Lines(gen.stdout)
        wait_for(gen_out.ready.is_set, 20, "the device simulator to connect")
        cpu0 = cpu_seconds(sut_proc.pid)
        threads0 = thread_cpu(sut_proc.pid)
        sched0, wall0 = schedstat(sut_proc.pid), time.monotonic()
        gen.stdin.write("go\n")
        gen.stdin.flush()
        progress.forward = gen.stdin
        gen.wait(args.seconds + 60)
        progress.forward = None
        gen_out.join(5)
        summary = gen_out.last
        with (d / "sent.pkl").open("rb") as f:
            sent: dict[str, list[float]] = pickle.load(f)
        res.sent = summary["sent"]
        res.offered = res.sent / summary["seconds"]
        if summary["unacked"]:
            res.notes.append(f"{summary['unacked']} device publishes never acknowledged")
        want_cmd = sum(len(s) // 10 for s in sent.values())

        # drain: until everything arrived, or nothing new came for `idle` seconds
        idle = 3.0 if qos == 0 else 15.0
        deadline = time.monotonic() + 90
        seen = (-1, -1)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            p = progress.last
            now_seen = (p.get("up", 0), p.get("cmd", 0))
            if now_seen[0] >= res.sent and now_seen[1] >= want_cmd:
                break
            if now_seen != seen:
                seen, quiet_since = now_seen, time.monotonic()
            elif time.monotonic() - quiet_since > idle:
                break
            time.sleep(0.05)
        cpu1 = cpu_seconds(sut_proc.pid)
        sched1, wall1 = schedstat(sut_proc.pid), time.monotonic()
        if args.verbose:
            threads1 = thread_cpu(sut_proc.pid)
            print(f"  [{name}] CPU s by thread: " + ", ".join(
                f"{t} {threads1[t] - threads0.get(t, 0.0):.2f}" for t in sorted(threads1)
                if threads1[t] - threads0.get(t, 0.0) > 0), file=sys.stderr)
            run, wait, slices = (b - a for a, b in zip(sched0, sched1, strict=True))
            print(f"  [{name}] main thread: on CPU {run / (wall1 - wall0):.0%} of the time, "
                  f"waiting for a CPU {wait / (wall1 - wall0):.1%} ({wait * 1000:.0f} ms, "
                  f"{slices} slices, {wait / max(slices, 1) * 1e6:.0f} us per slice)",
                  file=sys.stderr)
        res.hwm_mb = vm_hwm_mb(sut_proc.pid)
        if args.verbose:
            print(f"  [{name}] {smaps_summary(sut_proc.pid)}", file=sys.stderr)
        if sut == "daemon":
            m = scrape(metrics_port)
            if args.verbose:
                for k, v in m.items():
                    if v and any(s in k for s in ("total", "depth", "outbox", "sum", "count")):
                        print(f"  [{name}] {k} = {v:g}", file=sys.stderr)
            drop = m.get('flux_edge_device_errors_total{source="site",device="site"}', 0)
            if drop:
                res.notes.append(f"source errors/overflow {drop:g}")
        sut_proc.send_signal(signal.SIGTERM)
        sut_proc.wait(40)
        if sut == "daemon" and args.verbose:
            for line in (d / "daemon.log").read_text().splitlines():
                if line.startswith("bench-"):
                    print(f"  [{name}] {line}", file=sys.stderr)
        collector.stdin.close()
        collector.wait(30)
        with (d / "collected.pkl").open("rb") as f:
            got = pickle.load(f)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for b in brokers:
            b.stop()

    up: dict[str, dict[int, float]] = got["up"]
    cmds: dict[str, dict[int, float]] = got["cmd"]
    res.delivered = sum(len(v) for v in up.values())
    res.lost_up = res.sent - res.delivered
    res.lost_cmd = want_cmd - sum(len(v) for v in cmds.values())
    res.dups = got["dup_up"] + got["dup_cmd"]
    first = min(s[0] for s in sent.values() if s)
    last = max((t for v in up.values() for t in v.values()), default=first)
    res.rate = res.delivered / (last - first) if last > first else 0.0
    res.cpu_10k = (cpu1 - cpu0) / res.delivered * 10_000 if res.delivered else float("nan")
    if phase == "lat":
        t_from = first + WARMUP
        lat_up = [(t - sent[dev][seq - 1]) * 1000 for dev, v in up.items()
                  for seq, t in v.items() if sent[dev][seq - 1] >= t_from]
        lat_cmd = [(t - sent[dev][seq - 1]) * 1000 for dev, v in cmds.items()
                   for seq, t in v.items() if sent[dev][seq - 1] >= t_from]
        res.up_ms = (pct(lat_up, 0.5), pct(lat_up, 0.99))
        res.cmd_ms = (pct(lat_cmd, 0.5), pct(lat_cmd, 0.99))
    if got["other"]:
        res.notes.append(f"{got['other']} other message(s)")
    return res


def table(results: list[Result], args: argparse.Namespace) -> str:
    head = ("| system | QoS in/cmd/up | phase | offered msg/s | delivered msg/s | lost up/cmd "
            "| dup | cmd p50/p99 ms | up p50/p99 ms | CPU s/10k | peak RSS MB |")
    rows = [head, "|" + "---|" * 11]
    for r in results:
        sut = r.sut if r.sut == "naive" else f"daemon ({r.fmt})"
        qos = f"{r.qos}/{r.qos}/{r.qos}" if r.sut == "naive" else f"{r.qos}/{r.qos}/1"
        lat_c = f"{r.cmd_ms[0]:.2f} / {r.cmd_ms[1]:.2f}" if r.phase == "lat" else "-"
        lat_u = f"{r.up_ms[0]:.2f} / {r.up_ms[1]:.2f}" if r.phase == "lat" else "-"
        phase = "max" if r.phase == "tput" else f"{args.rate:g}/s"
        rows.append(
            f"| {sut} | {qos} | {phase} | {r.offered:,.0f} | {r.rate:,.0f} | "
            f"{r.lost_up}/{r.lost_cmd} | {r.dups} | {lat_c} | {lat_u} | {r.cpu_10k:.2f} | "
            f"{r.hwm_mb:.1f} |" + (f" {'; '.join(r.notes)}" if r.notes else ""))
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qos", default="0,1", help="0, 1 or 0,1")
    p.add_argument("--seconds", type=float, default=8.0, help="load time per phase")
    p.add_argument("--rate", type=float, default=1000.0, help="paced msg/s of the lat phase")
    p.add_argument("--max-rate", type=float, default=0.0,
                   help="offered msg/s of the tput phase (0: as fast as possible)")
    p.add_argument("--window", type=int, default=2000,
                   help="tput phase: most messages sent but not yet seen upstream")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--only", choices=("daemon", "naive"))
    p.add_argument("--phase", default="tput,lat", help="tput, lat or tput,lat")
    p.add_argument("--format", choices=("batch", "single"), default="batch",
                   help="the daemon's uplink format")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="change the daemon's config, e.g. sources.site.max_inflight=1000 "
                   "(VALUE in TOML); repeatable")
    p.add_argument("--nagle", action="store_true",
                   help="brokers with mosquitto's default Nagle (no set_tcp_nodelay true)")
    p.add_argument("--sut-nice", type=int, default=0,
                   help="nice value for the system under test (e.g. -10: an experiment to see "
                   "how much CPU contention on this 2-core machine adds to latency)")
    p.add_argument("--profile", help="directory for cProfile output of the daemon")
    p.add_argument("--verbose", action="store_true", help="print the daemon's metrics")
    p.add_argument("--keep", help="work in this (new) directory and keep it: configs, logs, "
                   "sent.pkl and collected.pkl of every run")
    args = p.parse_args()
    qoses = [int(q) for q in args.qos.split(",")]
    phases = args.phase.split(",")
    suts = [args.only] if args.only else ["daemon", "naive"]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = None
        if "daemon" in suts:
            cache, cold = warm_cache(work)
            print(f"daemon cold start (compiling json_normalize): peak RSS {cold:.1f} MB",
                  file=sys.stderr)
        if "naive" in suts:
            subprocess.run([PY, "-c", "import paho.mqtt.client, json"], check=True,
                           env=sut_env(work))
        for qos in qoses:
            for phase in phases:
                for sut in suts:
                    r = run_one(sut, qos, phase, args=args, work=work, cache=cache)
                    print(table([r], args).splitlines()[-1], file=sys.stderr)
                    results.append(r)
    print(table(results, args))
    print(f"\n{args.devices} devices, {args.seconds:g} s per phase, total "
          f"{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
