"""Hostile plugins in a running daemon beside a healthy source (issue #12, items 2 and 3).

Real parts: two simulated Modbus servers, the real pollers, the daemon (flux_edge.runtime.daemon
.Daemon, as run_pipeline runs it) with the real plugin host. The healthy source ``good`` runs
the bundled modbus_decode; the source ``bad`` runs one module of tests/fixtures/wat/hostile/.
Each case asserts that the hostile plugin's failures are counted by reason, that the healthy
source keeps delivering (and never gets an error record), and that the process stays well
under the unit's MemoryMax=256M. Modules refused at load are tried as a reload: the reload
fails naming the cause and the running pipeline keeps delivering.

Plugin calls still run on the event loop in flux_edge/runtime/pipeline.py at the time of
writing (another change moves them to a worker thread), so these tests assert delivery and
counts, not latency; test_a_plugin_at_its_time_limit_does_not_delay_the_healthy_source is the
latency target, which holds now that plugin calls run off the loop (runtime/plugin_lanes.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flux_edge.kinds import load_config
from flux_edge.model import ErrorRecord, Measurement
from flux_edge.plugins.host import LOG_BURST, LOG_RATE, Plugin, PluginStats
from flux_edge.runtime.daemon import Daemon
from flux_edge.runtime.pipeline import Observers
from flux_edge.runtime.systemd import Notifier
from flux_edge.sim.modbus_server import SimulatedModbusServer
from tests.conftest import ROOT, bundled_wasm
from tests.support import run

pytestmark = pytest.mark.integration

HOSTILE = ROOT / "tests" / "fixtures" / "wat" / "hostile"
MEMORY_MAX = 256 << 20  # the unit's MemoryMax
DAEMON_RSS = 60 << 20  # a started daemon with its plugins (docs/performance.md: 55 MB)

GOOD = """
[daemon]
state_dir = "{state}"

[plugins.modbus_decode]

[sources.good]
type = "modbus_tcp"
host = "127.0.0.1"
port = {good_port}
interval = "50ms"
chain = ["modbus_decode"]
registers = [{{ name = "level", address = 0, type = "uint16" }}]
"""

BAD = """
[plugins.{name}]
file = "{name}.wat"
max_failures = 3
quarantine = "1h"
{extra}

[sources.bad]
type = "modbus_tcp"
host = "127.0.0.1"
port = {bad_port}
interval = "50ms"
chain = ["{name}"]
registers = [{{ name = "junk", address = 0, type = "uint16" }}]
"""


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Case:
    extra: str = ""
    done: Callable[[Plugin, list[Measurement]], bool] = lambda p, bad: p.quarantined
    failed: dict[str, int] | None = None  # the failed calls by reason at the end
    error: str = ""  # in the bad source's first error record


def quarantined_after(reason: str, error: str, extra: str = "") -> Case:
    return Case(extra=extra, failed={reason: 3}, error=error)


def _deadline_extra() -> str:
    # flux_init traps once the wall clock passes "d" (ns): loads now, traps after recycles
    return f"wasi = true\nconfig = {{ d = {time.time_ns() + 2_000_000_000} }}"


RUNNING: dict[str, Case | Callable[[], Case]] = {
    "infinite_loop": quarantined_after("timeout", "timed out after 50 ms", 'timeout = "50ms"'),
    "memory_bomb": quarantined_after(
        "trap",
        "trap: unreachable (linear memory is at its limit of 64 MiB)",
        'memory_limit = "64MiB"\ntimeout = "2s"',  # 1,024 grows and 64 MiB written
    ),
    "table_bomb": quarantined_after("trap", "trap: unreachable"),
    # (1 s limits: writing 12-15 MB in the guest may take more than 50 ms on a busy machine)
    "huge_output": quarantined_after(
        "output_bytes", "output limit: flux_process returned", 'timeout = "1s"'
    ),
    "deep_output": quarantined_after("abi", "ABI error: output line 1 is nested more than 64"),
    "record_bomb": quarantined_after(
        "output_bytes", "output limit: flux_process returned", 'timeout = "1s"'
    ),
    "invalid_utf8": quarantined_after("abi", "ABI error: output line 1 is not valid UTF-8"),
    "trap_process": quarantined_after("trap", "trap: unreachable in decode_frame"),
    "trap_init": lambda: Case(
        extra=_deadline_extra(), failed={"trap": 1, "init": 2}, error="trap: unreachable"
    ),
    # 100,000 log calls a batch: it may run into its time limit too; what counts here is
    # that the excess is dropped and counted, not logged
    "log_flood": Case(done=lambda p, bad: p.stats.logs_dropped > 0 and p.stats.calls >= 3),
    "log_control": Case(done=lambda p, bad: len(bad) >= 3, failed={}),
}

REFUSED = {
    "many_memories": ("", "it defines 25 memories; ABI v1 allows exactly one"),
    "memory64": ("", "its memory is 64-bit (memory64)"),
    "huge_table": ("", "table(s) of up to 4000000 elements need"),
    "trap_init": ("wasi = true\nconfig = { d = 0 }", "initialisation failed: trap: unreachable"),
}


def bad_plugin(daemon: Daemon) -> Plugin:
    assert daemon.pipeline is not None
    (chain,) = [c for key, c in daemon.pipeline.chains.items() if key[0] == "bad"]
    return chain[0]


def counts_by_reason(stats: PluginStats) -> tuple[dict[str, int], dict[str, int]]:
    assert stats.errors == sum(stats.dead_letters.values())
    assert stats.failures == sum(stats.failed_calls.values())
    dead = {k: v for k, v in stats.dead_letters.items() if v}
    return dead, {k: v for k, v in stats.failed_calls.items() if v}


@pytest.mark.parametrize("name", sorted(RUNNING))
def test_hostile_plugin_beside_a_healthy_source(tmp_path: Path, name: str) -> None:
    bundled_wasm("modbus_decode")
    spec = RUNNING[name]
    case = spec() if callable(spec) else spec
    shutil.copy(HOSTILE / f"{name}.wat", tmp_path / f"{name}.wat")
    plugin_log = logging.getLogger(f"flux_edge.plugin.{name}")
    handler = ListHandler()
    plugin_log.addHandler(handler)
    old_level = plugin_log.level
    plugin_log.setLevel(logging.INFO)  # the log cases need info enabled to be tested at all
    # only this handler: a handler an earlier test left on a parent logger, writing to a stream
    # pytest has closed since, made every guest log call print a "Logging error" traceback
    # (~1 ms each), so the flood ran into its time limit before it exceeded the burst
    old_propagate, plugin_log.propagate = plugin_log.propagate, False

    errors: list[ErrorRecord] = []
    good: list[Measurement] = []
    bad: list[Measurement] = []
    progress = asyncio.Event()

    def on_error(rec: ErrorRecord) -> None:
        errors.append(rec)
        progress.set()

    def on_measurements(source: str, ms: list[Measurement]) -> None:
        (good if source == "good" else bad).extend(ms)
        progress.set()

    async def until(cond: Callable[[], bool], limit: float = 30.0) -> None:
        async with asyncio.timeout(limit):
            while not cond():
                progress.clear()
                await progress.wait()

    async def go() -> None:
        # the daemon runs in this (pytest) process, which holds what the tests before this one
        # left behind: what counts is what the case adds on top, with a fresh daemon's ~60 MB
        before = rss()
        async with SimulatedModbusServer(port=0) as g, SimulatedModbusServer(port=0) as b:
            g.set_holding(0, 42)
            cfg_path = tmp_path / "site.toml"
            cfg_path.write_text(
                GOOD.format(state=tmp_path / "state", good_port=g.port)
                + BAD.format(name=name, extra=case.extra, bad_port=b.port)
            )
            daemon = Daemon(
                load_config(cfg_path),
                observers=Observers(measurements=[on_measurements], errors=[on_error]),
                notifier=Notifier({}),
            )
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(daemon.run(stop=stop))
            try:
                await until(lambda: daemon.pipeline is not None and bool(good))
                plugin = bad_plugin(daemon)
                await until(lambda: case.done(plugin, bad), limit=45)
                seen = len(good)
                await until(lambda: len(good) >= seen + 10)  # the healthy source carries on
                grown = rss() - before
                assert DAEMON_RSS + grown < MEMORY_MAX * 0.75, (grown, rss())
                check(plugin)
            finally:
                stop.set()
                await task

    def check(plugin: Plugin) -> None:
        assert plugin.name == name
        assert not [e for e in errors if e.source == "good"]
        assert {(m.device, m.name, m.value) for m in good} == {("good", "level", 42.0)}
        bad_errors = [e for e in errors if e.source == "bad"]
        assert all(e.plugin == name and e.stage == "plugin" for e in bad_errors)
        dead, failed = counts_by_reason(plugin.stats)
        if case.failed is not None:
            assert failed == case.failed
        if case.error:
            assert bad_errors and bad_errors[0].error.startswith(case.error), bad_errors[:1]
        if plugin.quarantined:
            assert dead.get("quarantined", 0) > 0
        own = [r.getMessage() for r in handler.records if r.name == plugin_log.name]
        assert not [m for m in own if any(c in m for c in "\n\r\x1b")]
        if name == "log_flood":
            floods = sum(m == "flood" for m in own)
            # a log call costs ~15 us through Python, so the 50 ms limit stops a batch after
            # a few thousand of them: the burst went to the log, the rest was counted
            assert LOG_BURST <= floods <= LOG_BURST + LOG_RATE * 60
            assert plugin.stats.logs_dropped > floods
        if name == "log_control":
            assert own and all("\\n2026-12-07 06:00:00 CRITICAL" in m for m in own)
            assert {m.name for m in bad} == {"v"}

    try:
        run(go(), timeout=90)
    finally:
        plugin_log.removeHandler(handler)
        plugin_log.setLevel(old_level)
        plugin_log.propagate = old_propagate


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_module_refused_at_load_fails_the_reload_and_the_pipeline_carries_on(
    tmp_path: Path, name: str
) -> None:
    bundled_wasm("modbus_decode")
    extra, why = REFUSED[name]
    shutil.copy(HOSTILE / f"{name}.wat", tmp_path / f"{name}.wat")
    good: list[Measurement] = []
    errors: list[ErrorRecord] = []
    progress = asyncio.Event()

    def on_measurements(source: str, ms: list[Measurement]) -> None:
        good.extend(m for m in ms if source == "good")
        progress.set()

    async def until(cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not cond():
                progress.clear()
                await progress.wait()

    async def go() -> None:
        async with SimulatedModbusServer(port=0) as g, SimulatedModbusServer(port=0) as b:
            g.set_holding(0, 42)
            cfg_path = tmp_path / "site.toml"
            text = GOOD.format(state=tmp_path / "state", good_port=g.port)
            cfg_path.write_text(text)
            daemon = Daemon(
                load_config(cfg_path),
                observers=Observers(measurements=[on_measurements], errors=[errors.append]),
                notifier=Notifier({}),
            )
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(daemon.run(stop=stop))
            try:
                await until(lambda: bool(good))
                old = daemon.pipeline
                cfg_path.write_text(text + BAD.format(name=name, extra=extra, bad_port=b.port))
                assert await daemon.reload() is False
                assert daemon.pipeline is old
                assert name in daemon.reload_error and why in daemon.reload_error
                seen = len(good)
                await until(lambda: len(good) >= seen + 10)
                assert not errors
            finally:
                stop.set()
                await task

    run(go(), timeout=60)


def test_a_plugin_at_its_time_limit_does_not_delay_the_healthy_source(tmp_path: Path) -> None:
    # the target of issue #12: a plugin that runs to its time limit on every call raises the
    # healthy source's latency by <= 50 ms. Healthy readings come every 50 ms, so no gap
    # between two of them may exceed 50 + 50 ms (+ 50 ms of slack for a shared machine).
    bundled_wasm("modbus_decode")
    shutil.copy(HOSTILE / "infinite_loop.wat", tmp_path / "infinite_loop.wat")
    arrivals: list[float] = []
    progress = asyncio.Event()
    calls: list[Plugin] = []

    def on_measurements(source: str, ms: list[Measurement]) -> None:
        if source == "good":
            arrivals.append(time.monotonic())
        progress.set()

    async def go() -> None:
        async with SimulatedModbusServer(port=0) as g, SimulatedModbusServer(port=0) as b:
            g.set_holding(0, 42)
            cfg_path = tmp_path / "site.toml"
            cfg_path.write_text(
                GOOD.format(state=tmp_path / "state", good_port=g.port)
                + BAD.format(
                    name="infinite_loop",
                    extra='timeout = "1s"',
                    bad_port=b.port,
                ).replace("max_failures = 3", "max_failures = 1000")
            )
            daemon = Daemon(
                load_config(cfg_path),
                observers=Observers(measurements=[on_measurements]),
                notifier=Notifier({}),
            )
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(daemon.run(stop=stop))
            try:
                async with asyncio.timeout(30):
                    while daemon.pipeline is None or not arrivals:
                        progress.clear()
                        await progress.wait()
                    calls.append(bad_plugin(daemon))
                    while calls[0].stats.timeouts < 3:
                        progress.clear()
                        await progress.wait()
            finally:
                stop.set()
                await task

    run(go(), timeout=60)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert calls[0].stats.timeouts >= 3
    assert max(gaps) <= 0.150, f"largest gap between healthy readings: {max(gaps) * 1000:.0f} ms"
