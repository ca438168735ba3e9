"""Run ``flux-edge`` with bench-only instrumentation: ``python bench/_profiled.py run --config X``.

Environment switches (all optional; nothing in flux_edge/ is changed, only wrapped):

- ``FLUX_BENCH_PROFILE=FILE``: cProfile of the main thread (the event loop: everything but
  wasmtime's epoch ticker), written to FILE when the daemon exits (SIGTERM ends it cleanly).
  Read it with ``python -m pstats FILE`` (sort tottime / cumulative). With
  ``FLUX_BENCH_PROFILE_READY=1`` it starts at READY: the steady state, without the start-up's
  imports and config parsing (whose calls otherwise outnumber those of a short run).
- ``FLUX_BENCH_GC=1``: time every garbage collection (gc.callbacks); at exit print, per
  generation, the count, total and longest pause, and the objects tracked.
- ``FLUX_BENCH_STALLS=MS``: a sampling thread looks at the main thread's stack about every
  millisecond (as often as the GIL lets it: 5 ms switch interval); a run of samples outside
  the selector (the loop busy) longer than MS milliseconds is a stall (counted from READY on).
  At exit it prints the number of stalls, their total and longest length, and the functions
  (file:line name) found most often in the stalls' samples: a poor man's py-spy.
- ``FLUX_BENCH_MEM=1``: at exit, pymalloc's arena statistics (sys._debugmallocstats, to
  stderr): how much of the resident memory is Python objects.
- ``FLUX_BENCH_SLOW=MS``: asyncio debug mode with ``slow_callback_duration`` = MS: asyncio logs
  every callback or task step that held the loop longer (WARNING "Executing <...> took ...").
  Debug mode itself slows the loop down: use it to find culprits, not to measure.
- ``FLUX_BENCH_SKIP=rulestate,audit``: experiments that measure what a part costs by skipping
  it (NOT a configuration: durability is lost): ``rulestate`` makes RuleStore.save a no-op (the
  per-firing SQLite transaction on the event loop), ``audit`` AuditLog.record (the per-command
  JSON line), ``actionlock`` the per-action lock in Pipeline._run_action (commands of one action
  then overlap: what a pipelined mqtt_publish would do), ``ticker`` the wasmtime epoch ticker
  thread (plugin time-outs then never fire: it measures what the thread's GIL hand-offs cost).
- ``FLUX_BENCH_TRACE=FILE``: for every command, how late (now - the cause measurement's ts, which
  the bench sets to the device's send time) it was when the rule fired, when the action started
  and when its publish completed; one line per command in FILE at exit.
- ``FLUX_BENCH_LINGER=MS``: the plugin stage waits MS milliseconds after the first reading
  arrives before taking its batch (BoundedQueue.get_batch of the "readings" queue), so one
  plugin call carries more messages at low rates: the candidate "linger" change, measured.
- ``FLUX_BENCH_WAKEUPS=1``: count the event loop's wake-ups (a select that waited and returned
  something) from READY on and, per wake-up, name what woke it: the first callback run after it
  (a reader's or a timer's or a future's). At exit, the wake-ups per second and the top causes.
- ``FLUX_BENCH_GC_FREEZE=1``: an experiment for a candidate fix: ``gc.freeze()`` when the
  daemon signals READY (Notifier.ready is wrapped), so the objects of the start-up (modules,
  plugins, config) leave the collector's generations and a full collection only walks what the
  pipeline allocated since.
"""

from __future__ import annotations

import collections
import cProfile
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux_edge.cli import main
from flux_edge.runtime import systemd

_gc_start = [0.0]
_gc_stats: dict[int, list[float]] = {0: [], 1: [], 2: []}


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        _gc_stats[info["generation"]].append(time.perf_counter() - _gc_start[0])


def _gc_report() -> None:
    for gen, pauses in _gc_stats.items():
        if pauses:
            print(f"bench-gc: gen{gen}: {len(pauses)} collections, total "
                  f"{sum(pauses) * 1000:.1f} ms, longest {max(pauses) * 1000:.1f} ms",
                  file=sys.stderr)
    print(f"bench-gc: tracked objects {len(gc.get_objects())}, frozen {gc.get_freeze_count()}",
          file=sys.stderr)


class StallSampler:
    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self.main = threading.main_thread().ident
        self.stalls: list[float] = []
        self.frames: collections.Counter[str] = collections.Counter()
        self.leaf: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.armed = False  # set at READY: start-up (imports, plugin loading) is not counted
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="bench-stalls", daemon=True)
        self._t.start()

    def _run(self) -> None:
        busy_since: float | None = None
        run: list[list[str]] = []
        while not self._stop.wait(0.001):
            if not self.armed:
                continue
            frame = sys._current_frames().get(self.main)
            now = time.perf_counter()
            if frame is None:
                continue
            idle = frame.f_code.co_name in ("select", "poll") and "selectors" in \
                frame.f_code.co_filename
            if idle:
                if busy_since is not None and now - busy_since >= self.threshold:
                    self.stalls.append(now - busy_since)
                    for stack in run:
                        self.samples += 1
                        for name in set(stack):
                            self.frames[name] += 1
                        self.leaf[stack[0]] += 1
                busy_since = None
                run = []
                continue
            if busy_since is None:
                busy_since = now
            stack = []
            f: Any = frame
            while f is not None and len(stack) < 40:
                code = f.f_code
                stack.append(f"{Path(code.co_filename).name}:{f.f_lineno} {code.co_name}")
                f = f.f_back
            run.append(stack)

    def report(self) -> None:
        self._stop.set()
        self._t.join(1)
        if not self.stalls:
            print("bench-stalls: none", file=sys.stderr)
            return
        print(f"bench-stalls: {len(self.stalls)} stalls >= {self.threshold * 1000:g} ms, total "
              f"{sum(self.stalls) * 1000:.0f} ms, longest {max(self.stalls) * 1000:.0f} ms, "
              f"{self.samples} samples", file=sys.stderr)
        for name, n in self.leaf.most_common(12):
            print(f"bench-stalls: leaf {n:5d} {name}", file=sys.stderr)
        for name, n in self.frames.most_common(40):
            print(f"bench-stalls: in   {n:5d} {name}", file=sys.stderr)


sampler = StallSampler(float(os.environ["FLUX_BENCH_STALLS"])) \
    if os.environ.get("FLUX_BENCH_STALLS") else None

_skip = set(filter(None, os.environ.get("FLUX_BENCH_SKIP", "").split(",")))
if "rulestate" in _skip:
    from flux_edge.rules.state import RuleStore

    RuleStore.save = lambda self, records: None  # type: ignore[method-assign]
if "audit" in _skip:
    from flux_edge.actions.audit import AuditLog

    AuditLog.record = lambda self, *a, **k: None  # type: ignore[method-assign]

_trace: list[tuple[str, float, float, str]] = []
if os.environ.get("FLUX_BENCH_TRACE"):
    from flux_edge.actions.mqtt_publish import MqttPublishExecutor
    from flux_edge.rules.engine import RuleEngine

    _on_m = RuleEngine.on_measurement
    _exec = MqttPublishExecutor.execute

    def _traced_on_measurement(self: Any, m: Any) -> Any:
        cmds = _on_m(self, m)
        if cmds:
            _trace.append(("fired", m.ts, time.time(), f"{m.device}/{m.value}"))
        return cmds

    async def _traced_execute(self: Any, cmd: Any) -> Any:
        c = cmd.cause
        _trace.append(("start", c.ts, time.time(), f"{c.device}/{c.value}"))
        out = await _exec(self, cmd)
        _trace.append(("done", c.ts, time.time(), f"{c.device}/{c.value}"))
        return out

    RuleEngine.on_measurement = _traced_on_measurement  # type: ignore[method-assign]
    MqttPublishExecutor.execute = _traced_execute  # type: ignore[method-assign]

if "ticker" in _skip:
    from flux_edge.plugins.host import PluginHost

    def _no_ticks(self: Any) -> None:
        while not self._stopping:
            time.sleep(0.5)

    PluginHost._tick_loop = _no_ticks  # type: ignore[method-assign]

if "actionlock" in _skip:
    import contextlib

    from flux_edge.runtime.pipeline import Pipeline

    _start = Pipeline.start

    async def _start_unlocked(self: Any) -> None:
        await _start(self)  # builds the locks; no command runs before this returns
        for name in list(self._action_locks):
            self._action_locks[name] = contextlib.nullcontext()

    Pipeline.start = _start_unlocked  # type: ignore[method-assign]

if os.environ.get("FLUX_BENCH_LINGER"):
    import asyncio

    from flux_edge.runtime.queues import BoundedQueue

    _get_batch = BoundedQueue.get_batch
    _linger = float(os.environ["FLUX_BENCH_LINGER"]) / 1000

    async def _lingering_get_batch(self: Any, max_items: int) -> Any:
        if self.name == "readings":
            while not self._items:
                await self._not_empty.wait()
            if len(self._items) < max_items:
                await asyncio.sleep(_linger)
        return await _get_batch(self, max_items)

    BoundedQueue.get_batch = _lingering_get_batch  # type: ignore[method-assign]

_wakeups: collections.Counter[str] = collections.Counter()
_wake_state = {"armed": False, "woke": False, "t0": 0.0, "n": 0}
if os.environ.get("FLUX_BENCH_WAKEUPS"):
    import asyncio.events
    import selectors

    _select = selectors.EpollSelector.select
    _handle_run = asyncio.events.Handle._run

    def _counting_select(self: Any, timeout: float | None = None) -> Any:
        ready = _select(self, timeout)
        if _wake_state["armed"] and (timeout is None or timeout > 0):
            _wake_state["n"] += 1
            _wake_state["woke"] = True
        return ready

    def _naming_run(self: Any) -> None:
        if _wake_state["woke"]:
            _wake_state["woke"] = False
            cb = self._callback
            name = getattr(cb, "__qualname__", None) or getattr(
                getattr(cb, "func", None), "__qualname__", repr(cb))
            if name.endswith("__step") or name.endswith("__wakeup"):
                task = getattr(cb, "__self__", None)
                coro = task.get_coro() if task is not None else None
                name += " " + getattr(coro, "__qualname__", "?")
            _wakeups[name] += 1
        _handle_run(self)

    selectors.EpollSelector.select = _counting_select  # type: ignore[method-assign]
    asyncio.events.Handle._run = _naming_run  # type: ignore[method-assign]


def _wakeups_report() -> None:
    secs = time.monotonic() - _wake_state["t0"]
    n = _wake_state["n"]
    print(f"wake-ups: {n} in {secs:.1f} s ({n / secs:.0f}/s)", file=sys.stderr)
    for name, count in _wakeups.most_common(15):
        print(f"  {count / secs:8.1f}/s  {name}", file=sys.stderr)


_ready = systemd.Notifier.ready
profile_to = os.environ.get("FLUX_BENCH_PROFILE")
prof = cProfile.Profile() if profile_to else None
from_ready = bool(os.environ.get("FLUX_BENCH_PROFILE_READY"))


def _on_ready(self: systemd.Notifier, status: str = "") -> None:
    if os.environ.get("FLUX_BENCH_GC_FREEZE"):
        gc.collect()
        gc.freeze()
    if sampler is not None:
        sampler.armed = True
    _wake_state["armed"] = True
    _wake_state["t0"] = time.monotonic()
    if prof is not None and from_ready:
        prof.enable()
    _ready(self, status)


systemd.Notifier.ready = _on_ready  # type: ignore[method-assign]

if os.environ.get("FLUX_BENCH_GC"):
    gc.callbacks.append(_gc_callback)

if os.environ.get("FLUX_BENCH_SLOW"):
    import asyncio

    _run = asyncio.run
    _slow = float(os.environ["FLUX_BENCH_SLOW"]) / 1000

    def _debug_run(main: Any, *, debug: bool | None = None) -> Any:
        async def wrapped() -> Any:
            asyncio.get_running_loop().slow_callback_duration = _slow
            return await main

        return _run(wrapped(), debug=True)

    asyncio.run = _debug_run

if prof is not None and not from_ready:
    prof.enable()
try:
    rc = main(sys.argv[1:])
finally:
    if prof is not None and profile_to:
        prof.disable()
        prof.dump_stats(profile_to)
    if os.environ.get("FLUX_BENCH_GC"):
        _gc_report()
    if sampler is not None:
        sampler.report()
    if os.environ.get("FLUX_BENCH_TRACE"):
        with open(os.environ["FLUX_BENCH_TRACE"], "w") as f:
            for stage, ts, now, key in _trace:
                f.write(f"{stage} {key} {ts!r} {now!r}\n")
    if os.environ.get("FLUX_BENCH_MEM"):
        sys._debugmallocstats()
    if os.environ.get("FLUX_BENCH_WAKEUPS"):
        _wakeups_report()
raise SystemExit(rc)
