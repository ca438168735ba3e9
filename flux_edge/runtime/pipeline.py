r"""Wires the stages of one configuration together and runs them under the supervisor.

    sources --readings--> plugin stage --measurements--> rule stage --commands--> action stage
                                       \--uplink queue--> uplink stage (durable outbox, upstream)

Every queue is bounded. Sources block when the plugin stage falls behind (a poller then polls
late, which it counts), so nothing between stages is dropped; anything that cannot be processed
becomes an ErrorRecord (dead letter) that is counted, logged and handed to observers.

Durability: with an uplink, the plugin stage follows the measurements of each batch of readings
with a marker (the count of readings taken so far); the uplink stage commits them to its outbox and
then moves ``durable_seq`` up to the marker. A source that can have its data re-sent (MQTT QoS 1/2)
acknowledges a message only once the readings up to it are durable (``durable_after``), so a
process killed at any moment loses nothing: the broker redelivers what was not yet on disk.

Health: each stage stamps a ``Heartbeat`` (begin/done) around every unit of work; the daemon's
watchdog feeder stops feeding systemd when a critical stage stays busy past ``stall_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import operator
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from flux_edge.actions import ActionFactory, Executor
from flux_edge.actions.audit import AuditLog
from flux_edge.actions.audit_cli import audit_path
from flux_edge.actions.guarded import Guarded
from flux_edge.actions.safety import SafetyLayer
from flux_edge.config import ActionSpec, Config, SourceSpec
from flux_edge.errors import FluxError, PluginLoadError
from flux_edge.kinds import KINDS
from flux_edge.logs import RateLimitedLog
from flux_edge.model import Command, ErrorRecord, Measurement, Outcome, Quality, Reading
from flux_edge.plugins.host import Plugin, PluginHost
from flux_edge.rules.engine import RuleEngine
from flux_edge.rules.state import RuleStore
from flux_edge.runtime import plugin_instances
from flux_edge.runtime.health import HealthMonitor, Heartbeat
from flux_edge.runtime.plugin_lanes import Lanes
from flux_edge.runtime.queues import BoundedQueue
from flux_edge.runtime.supervisor import Supervisor
from flux_edge.sources import Emit, Source, SourceEnv, SourceFactory, SourceHealth, StatusCallback
from flux_edge.state.faults import Backoff, StoreHealth
from flux_edge.uplink.sender import Uplink
from flux_edge.uplink.topics import compile_topic

log = logging.getLogger("flux_edge.runtime")
_LOG_EVERY = 5.0  # seconds between two warnings of the same kind (dead letters, commits)


@dataclass(slots=True)
class Observers:
    """Callbacks the embedding program (daemon, demo, tests) can hang on the data path."""

    measurements: list[Callable[[str, list[Measurement]], None]] = field(default_factory=list)
    errors: list[Callable[[ErrorRecord], None]] = field(default_factory=list)
    outcomes: list[Callable[[Outcome], None]] = field(default_factory=list)
    blocked: list[Callable[[Command], None]] = field(default_factory=list)  # by the safety layer


@dataclass(slots=True)
class StageStats:
    processed: int = 0
    errors: int = 0
    last_progress: float = 0.0  # monotonic time of the last completed unit of work


def make_source(
    name: str,
    cfg: SourceSpec,
    emit: Emit,
    on_status: StatusCallback,
    gateway: str = "",
    *,
    durable: Callable[[], asyncio.Future[None] | None] | None = None,
    emit_nowait: Callable[[Reading], bool] | None = None,
) -> Source:
    """The source object for one config entry, built by its kind's factory (which imports the
    protocol's module only when a config uses it)."""
    factory: SourceFactory = KINDS.sources.of(cfg).factory
    env = SourceEnv(gateway=gateway, durable=durable, emit_nowait=emit_nowait)
    return factory(name, cfg, emit, on_status, env)


class _ActionEnv:
    """What an action kind's factory gets from the pipeline (``flux_edge.actions.ActionEnv``)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self.clock = pipeline._clock

    def source(self, name: str) -> Any:
        return self._pipeline.sources[name]

    def executor(self, name: str) -> Executor | None:
        return self._pipeline.executors.get(name)

    def load_plugin(self, action: str, cfg: Any) -> Plugin:
        p = self._pipeline
        return plugin_instances.load(
            p.host, p.config, plugin_instances.action_instance(action, cfg)
        )

    def offload(self, call: Callable[[], Any]) -> Awaitable[Any]:
        lanes = self._pipeline.lanes
        if lanes is None or lanes.workers is None:  # not started (tests building executors)
            return _now(call)
        return lanes.workers.submit(_call, call)


def _call(call: Callable[[], Any]) -> Any:
    return call()


async def _now(call: Callable[[], Any]) -> Any:
    return call()


def _topic_key(template: str) -> Callable[[Measurement], Any] | None:
    """What distinguishes the uplink topics of measurements (None: they all share one)."""
    used = compile_topic(template).names
    fields = [f for f in ("source", "device", "name") if f in used]
    return operator.attrgetter(*fields) if fields else None


class Pipeline:
    def __init__(
        self,
        config: Config,
        *,
        host: PluginHost,
        observers: Observers | None = None,
        clock: Callable[[], float] = time.time,
        uplink: Uplink | None = None,
        monitor: HealthMonitor | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.observers = observers or Observers()
        self._clock = clock
        self.uplink = uplink
        if uplink is not None:  # upstream commands through this pipeline's guard; precision
            uplink.bind(self)
        qsize = config.daemon.queue_size
        self.readings: BoundedQueue[Reading] = BoundedQueue("readings", qsize)
        self.measurements: BoundedQueue[Measurement] = BoundedQueue("measurements", qsize)
        self.commands: BoundedQueue[Command] = BoundedQueue("commands", qsize)
        # measurements bound upstream, and markers (source, n): "that source's readings up to
        # its n-th are in here"
        self.upstream: BoundedQueue[Measurement | tuple[str, int]] = BoundedQueue("uplink", qsize)
        self.stats: dict[str, StageStats] = {
            s: StageStats() for s in ("sources", "plugins", "rules", "actions", "uplink")
        }
        self.monitor = monitor or HealthMonitor(config.daemon.stall_timeout)
        self._owns_monitor = monitor is None
        self.beats: dict[str, Heartbeat] = {}
        # per source: readings emitted, and how many of them are durable in the outbox (or
        # were dead letters); the plugin lanes count those taken (plugin_lanes.py)
        self.emitted_seq = 0
        self.emitted: collections.Counter[str] = collections.Counter()
        self.durable: collections.Counter[str] = collections.Counter()
        self._durable_waiters: dict[str, collections.deque[tuple[int, asyncio.Future[None]]]] = (
            collections.defaultdict(collections.deque)
        )
        self.lanes: Lanes | None = None
        # per action: [ok, failed, blocked by the safety layer]
        self.action_counts: dict[str, list[int]] = {a: [0, 0, 0] for a in config.actions}
        self.dead_letters: collections.deque[ErrorRecord] = collections.deque(maxlen=1000)
        self.dead_letter_total = 0
        # plugin chains by (source, device); device "" = the source's chain for every device
        self.chains: dict[tuple[str, str], list[Plugin]] = {}
        self.sources: dict[str, Source] = {}
        self.executors: dict[str, Executor] = {}
        # the last measurement of each (device, name): marked bad when its device stops answering
        self.latest: dict[str, dict[str, Measurement]] = {}
        state_dir = Path(config.daemon.state_dir)
        self.store = RuleStore.in_state_dir(state_dir)
        # durations on the monotonic clock, timestamps on ``clock`` (issue #13: time that jumps)
        self.engine = RuleEngine(config, wall=clock, store=self.store)
        self.safety = SafetyLayer(config, wall=clock)
        self._safety_file = state_dir / "safety.json"
        self.safety_health = StoreHealth("actuator_state", str(self._safety_file))
        self._safety_backoff = Backoff(first=0.5, limit=30.0)
        self._safety_retry: asyncio.TimerHandle | None = None
        self._restore_safety()
        self.audit = AuditLog(
            audit_path(config),
            max_size=config.daemon.audit_max_size,
            keep=config.daemon.audit_keep,
        )
        self.guard = Guarded(self.safety, self.audit, wall=clock)
        self._supervisor = Supervisor()
        self._in_flight: set[asyncio.Task[None]] = set()
        # one command at a time per action, except MQTT publishes that drive no actuator: the
        # client keeps their order and waiting for each PUBACK in turn would cap them at one
        # round trip each (None = no lock)
        self._action_locks: dict[str, asyncio.Lock | None] = {}
        self._ratelog = RateLimitedLog(log, _LOG_EVERY)
        self._started = False

    # --- construction ------------------------------------------------------------------------

    def _load_chain(self, instances: list[plugin_instances.Instance]) -> list[Plugin]:
        chain: list[Plugin] = []
        try:
            for instance in instances:
                plugin = plugin_instances.load(self.host, self.config, instance)
                chain.append(plugin)
                if not plugin.has_process:
                    raise PluginLoadError(
                        instance.plugin,
                        f"it is in the chain of source {instance.owner!r} but does not export "
                        "flux_process (it only answers wasm actions, with flux_act)",
                    )
        except BaseException:
            for plugin in chain:
                plugin.close()
            raise
        return chain

    def _build(self) -> None:
        cfg = self.config
        for sname, scfg in cfg.sources.items():
            by_device: dict[str, list[plugin_instances.Instance]] = {}
            for instance in plugin_instances.source_instances(cfg, sname):
                by_device.setdefault(instance.device, []).append(instance)
            for device, instances in by_device.items():
                self.chains[(sname, device)] = self._load_chain(instances)
            for key in scfg.chain_keys(sname):  # devices without a chain too
                self.chains.setdefault((sname, key), [])
            self.sources[sname] = make_source(
                sname, scfg, self._emit, functools.partial(self._on_status, sname),
                cfg.daemon.name,
                durable=(
                    functools.partial(self.durable_after, sname)
                    if self.uplink is not None else None
                ),
                emit_nowait=self._emit_nowait,
            )
        # an action that sends through another (wasm) is built after the others
        ordered = sorted(cfg.actions.items(), key=lambda item: item[1].builds_late)
        for aname, acfg in ordered:
            self.executors[aname] = self._make_executor(aname, acfg)
            free = acfg.concurrent and not self.safety.actuators_of(aname)
            self._action_locks[aname] = None if free else asyncio.Lock()

    def _make_executor(self, name: str, cfg: ActionSpec) -> Executor:
        factory: ActionFactory = KINDS.actions.of(cfg).factory
        return factory(name, cfg, _ActionEnv(self))

    # --- safety state: last switch times survive a restart (min_on/min_off, rate limits) ---

    def _restore_safety(self) -> None:
        try:
            data = msgspec.json.decode(self._safety_file.read_bytes())
            self.safety.restore(data)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s unreadable (%s): actuator timers start fresh", self._safety_file, exc)

    def _save_safety(self) -> None:
        self._safety_retry = None
        tmp = self._safety_file.with_suffix(".tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(self.safety.snapshot()))
            os.replace(tmp, self._safety_file)
        except OSError as exc:  # disk full, read-only: kept in memory, retried with back-off
            if self.safety_health.failed(exc):
                log.warning("cannot save actuator state to %s (%s): min on/off times and rate "
                            "limits do not survive a restart until it works; retried",
                            self._safety_file, exc)
            with contextlib.suppress(RuntimeError):  # no loop: the next switch tries again
                self._safety_retry = asyncio.get_running_loop().call_later(
                    self._safety_backoff.next(), self._save_safety)
            return
        self._safety_backoff.reset()
        if self.safety_health.ok():
            log.warning("actuator state %s: saving works again", self._safety_file)

    def _on_status(self, source: str, device: str, quality: Quality, error: str) -> None:
        """A source says a device stopped answering (or is back). Its last measurements are
        re-sent with the new quality, so rules see stale inputs at once and never act on them."""
        if quality == "good":
            log.info("device %s is answering again", device)
            return
        log.warning("device %s is %s: %s", device, quality, error)
        latest = self.latest.get(device)
        if not latest:
            return
        now = self._clock()
        marked = [msgspec.structs.replace(m, quality=quality, ts=now) for m in latest.values()]
        for m in marked:
            latest[m.name] = m
            if not self.measurements.offer(m):
                log.warning("measurement queue full: quality change of %s.%s not delivered",
                            device, m.name)
            if self.uplink is not None and not self.upstream.offer(m):
                log.warning("uplink queue full: quality change of %s.%s not forwarded",
                            device, m.name)
        for cb in self.observers.measurements:
            cb(source, marked)

    def plugins_by_name(self) -> dict[str, list[Plugin]]:
        """Every loaded plugin instance, by plugin name: those in source chains and those an
        action owns (metrics, health, the console)."""
        by_name: dict[str, list[Plugin]] = collections.defaultdict(list)
        for chain in self.chains.values():
            for plugin in chain:
                by_name[plugin.name].append(plugin)
        for executor in self.executors.values():
            owned = getattr(executor, "plugin", None)
            if isinstance(owned, Plugin):
                by_name[owned.name].append(owned)
        return by_name

    def health(self) -> dict[str, dict[str, SourceHealth]]:
        return {name: dict(src.health) for name, src in self.sources.items()}

    async def _emit(self, reading: Reading) -> None:
        await self.readings.put(reading)
        self._emitted(reading)  # no await since the put: the count matches the queue's order

    def _emit_nowait(self, reading: Reading) -> bool:
        if not self.readings.try_put(reading):
            return False
        self._emitted(reading)
        return True

    def _emitted(self, reading: Reading) -> None:
        self.emitted[reading.source] += 1
        self.emitted_seq += 1
        stats = self.stats["sources"]
        stats.processed += 1
        stats.last_progress = time.monotonic()

    def durable_after(self, source: str) -> asyncio.Future[None] | None:
        """A future that completes once every reading ``source`` emitted so far is durable in
        the outbox (or was a dead letter); None if that is already so. Sources call it right
        after emit."""
        seq = self.emitted[source]
        if seq <= self.durable[source]:
            return None
        fut = asyncio.get_running_loop().create_future()
        self._durable_waiters[source].append((seq, fut))
        return fut

    def _made_durable(self, source: str, seq: int) -> None:
        self.durable[source] = max(self.durable[source], seq)
        waiters = self._durable_waiters[source]
        while waiters and waiters[0][0] <= self.durable[source]:
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every plugin, then start consumers before producers."""
        self._build()
        for stage in ("plugins", "rules", "actions") + (("uplink",) if self.uplink else ()):
            self.beats[stage] = self.monitor.register(stage)
        sup = self._supervisor
        sup.spawn("actions", self._action_stage)
        sup.spawn("rules", self._rule_stage)
        if self.uplink is not None:
            sup.spawn("uplink", self._uplink_stage)
        self.lanes = self._new_lanes()
        self.lanes.start()
        sup.spawn("plugins", self._plugin_stage)
        if self.config.actuators:
            sup.spawn("safety", self._safety_loop)
        if self.config.rules:
            sup.spawn("checkpoint", self._checkpoint_loop)
        for name, source in self.sources.items():
            sup.spawn(f"source:{name}", source.run)
        self._started = True
        log.info(
            "pipeline running: %d source(s), %d plugin instance(s), %d rule(s), %d action(s)",
            len(self.sources),
            sum(len(c) for c in self.chains.values()),
            len(self.config.rules),
            len(self.executors),
        )

    _drain_deadline: asyncio.Timeout | None = None

    def hurry(self) -> None:
        """End a drain in progress now (a second SIGTERM): ``stop`` goes on to the safe state."""
        deadline = self._drain_deadline
        if deadline is not None and not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time())

    async def stop(self, drain_timeout: float = 10.0, *, safe_state: bool = True) -> bool:
        """Stop sources, let queued data flow through every stage (into the outbox, if there is
        an uplink), then stop the stages. ``safe_state``: put actuators in their configured safe
        state (shutdown); a reload keeps them as they are. True if everything drained."""
        if not self._started:
            return True
        self._started = False
        sup = self._supervisor
        await sup.cancel(*[f"source:{n}" for n in self.sources])
        drained = True
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            async with asyncio.timeout(drain_timeout) as self._drain_deadline:
                await self.readings.join()
                if self.lanes is not None:
                    await self.lanes.join()
                await self.measurements.join()
                await self.upstream.join()
                await self.commands.join()
                while self._in_flight:
                    await asyncio.wait(set(self._in_flight))
        except TimeoutError:
            drained = False
            took = loop.time() - began
            log.warning(
                "stop: queues not drained (%s after %.1f s: readings %d, measurements %d, "
                "uplink %d, commands %d, actions in flight %d)",
                "cut short by a second stop signal" if took < drain_timeout - 0.05
                else "the drain timeout", took,
                len(self.readings),
                len(self.measurements),
                len(self.upstream),
                len(self.commands),
                len(self._in_flight),
            )
        await sup.cancel("safety")
        safe = self.safety.safe_commands("shutdown") if safe_state else []
        if safe:
            log.info("shutdown: putting %d actuator(s) in their safe state", len(safe))
            await asyncio.gather(*(self._run_action(cmd) for cmd in safe))
        await sup.cancel_all()
        lanes_closed = True
        if self.lanes is not None:  # before the plugins are closed: no call may be in flight
            lanes_closed = await self.lanes.close(self._max_plugin_timeout() + 1.0)
        if self.uplink is not None and self.upstream:  # left over after a timed-out drain
            self.uplink.add([m for m in self.upstream.drain() if isinstance(m, Measurement)])
            self.uplink.commit()
        for name in self.beats:
            self.monitor.unregister(name)
        self.beats.clear()
        for waiters in self._durable_waiters.values():
            for _seq, fut in waiters:
                fut.cancel()  # never acknowledged: the broker redelivers it
        self._durable_waiters.clear()
        self.audit.close()
        self.store.close()
        if self._safety_retry is not None:
            self._safety_retry.cancel()
            self._safety_retry = None
        for source in self.sources.values():
            try:
                await source.close()
            except (OSError, FluxError) as exc:
                log.warning("closing source %s: %s", source.name, exc)
        if lanes_closed:
            for chain in self.chains.values():
                for plugin in chain:
                    plugin.close()
        for executor in self.executors.values():
            owned = getattr(executor, "plugin", None)
            if isinstance(owned, Plugin):
                owned.close()
        return drained

    def _max_plugin_timeout(self) -> float:
        timeouts = [p.timeout for p in self.config.plugins.values()]
        chain_len = max((len(c) for c in self.chains.values()), default=1)
        return max(timeouts, default=0.0) * max(chain_len, 1)

    # --- stages ------------------------------------------------------------------------------

    def _dead_letter(self, rec: ErrorRecord) -> None:
        self.dead_letters.append(rec)
        self.dead_letter_total += 1
        key = f"{rec.stage}:{rec.plugin or rec.source}"
        self._ratelog.warning(
            key,
            f"{rec.stage} error ({'plugin ' + rec.plugin + ', ' if rec.plugin else ''}"
            f"source {rec.source}, device {rec.device}): {rec.error}",
        )
        for cb in self.observers.errors:
            cb(rec)

    @staticmethod
    def chain_results(
        chain: list[Plugin], readings: Sequence[Reading]
    ) -> tuple[list[Measurement], list[ErrorRecord]]:
        """Pass readings of one chain through its plugins, in order: (measurements, dead
        letters). Runs on a plugin worker thread: it touches nothing but the plugins."""
        msgs: Sequence[Reading | Measurement] = readings
        out: list[Measurement] = []
        errors: list[ErrorRecord] = []
        for plugin in chain:
            out = []
            for item in plugin.process(msgs):
                if isinstance(item, Measurement):
                    out.append(item)
                else:
                    errors.append(item)
            msgs = out
        return out, errors

    def run_chain(self, key: tuple[str, str], readings: Sequence[Reading]) -> list[Measurement]:
        """Pass readings of one (source, device) through its plugin chain, here and now (tools
        and tests; the pipeline runs chains on its plugin lanes)."""
        chain = self.chains.get(key)
        if chain is None:
            chain = self.chains.get((key[0], ""), [])
        out, errors = self.chain_results(chain, readings)
        for rec in errors:
            self._dead_letter(rec)
        return out

    async def _deliver(
        self,
        source: str,
        readings: Sequence[Reading],
        measurements: list[Measurement],
        errors: list[ErrorRecord],
    ) -> None:
        """A lane's results, on the loop: dead letters, observers, the rule stage, upstream."""
        for rec in errors:
            self._dead_letter(rec)
        for cb in self.observers.measurements:
            cb(source, measurements)
        latest = self.latest
        for m in measurements:
            by_name = latest.get(m.device)
            if by_name is None:
                by_name = latest[m.device] = {}
            by_name[m.name] = m
        await self.measurements.put_many(measurements)
        if self.uplink is not None:
            await self.upstream.put_many(measurements)
        stats = self.stats["plugins"]
        stats.processed += len(readings)
        stats.last_progress = time.monotonic()

    async def _completed(self, source: str, seq: int) -> None:
        """Every reading of ``source`` up to its ``seq``-th has been delivered."""
        if self.uplink is not None:
            await self.upstream.put((source, seq))
        else:
            self._made_durable(source, seq)

    def _new_lanes(self) -> Lanes:
        return Lanes(
            self.chains,
            run_chain=self.chain_results,
            deliver=self._deliver,
            completed=self._completed,
            monitor=self.monitor,
            batch_max=self.config.daemon.batch_max,
            capacity=self.config.daemon.queue_size,
        )

    async def _plugin_stage(self) -> None:
        """Readings off the queue, to their chains' lanes (plugin_lanes.py): user code runs on
        worker threads, never on the loop, and a slow chain holds up only its own readings."""
        assert self.lanes is not None
        beat = self.beats["plugins"]
        batch_max = self.config.daemon.batch_max
        while True:
            batch = await self.readings.get_batch(batch_max)
            beat.begin()
            await self.lanes.dispatch(batch)
            beat.done()
            self.readings.task_done_if_empty()

    async def _rule_stage(self) -> None:
        """Measurements through the rules; between them, wake exactly when a `for` timer is due
        (get_batch is cancellation-safe: nothing is taken before its only await)."""
        stats = self.stats["rules"]
        beat = self.beats["rules"]
        engine = self.engine
        while True:
            deadline = engine.next_deadline()
            if deadline is None:
                batch = await self.measurements.get_batch(1024)
            else:
                try:
                    async with asyncio.timeout(max(0.0, deadline - engine.now())):
                        batch = await self.measurements.get_batch(1024)
                except TimeoutError:
                    beat.begin()
                    for cmd in engine.tick():
                        await self.commands.put(cmd)
                    stats.last_progress = time.monotonic()
                    beat.done()
                    continue
            beat.begin()
            commands = engine.on_measurements(batch)  # rule state: one write for the batch
            if commands:
                await self.commands.put_many(commands)
            stats.processed += len(batch)
            stats.last_progress = time.monotonic()
            beat.done()
            self.measurements.task_done_if_empty()

    async def _checkpoint_loop(self, period: float = 5.0) -> None:
        """Rule-state WAL checkpoints (they fsync) in a worker thread, never on the loop."""
        done = self.store.writes
        while True:
            await asyncio.sleep(period)
            if self.store.writes != done:
                done = self.store.writes
                await asyncio.to_thread(self.store.checkpoint)

    async def _safety_loop(self, period: float = 1.0) -> None:
        """Once a second: actuators whose inputs went stale, or whose interlock holds, are driven
        to their safe state."""
        while True:
            for cmd in self.safety.enforce(self.latest):
                await self.commands.put(cmd)
            await asyncio.sleep(period)

    async def _uplink_stage(self) -> None:
        """Measurements into the outbox, one SQLite transaction per ``commit_interval`` at most
        (group commit: an SD card is not written per message); then the readings they came from
        are durable and their sources may acknowledge them."""
        uplink = self.uplink
        assert uplink is not None and self.config.uplink is not None
        ucfg = self.config.uplink
        interval = ucfg.commit_interval
        # format "batch" sends runs of records that share a topic: within one commit, put each
        # topic's records together (their own order kept) so devices that interleave still batch
        group = _topic_key(ucfg.topic) if ucfg.format == "batch" else None
        stats = self.stats["uplink"]
        beat = self.beats["uplink"]
        queue = self.upstream
        loop = asyncio.get_running_loop()
        last_commit = -float("inf")
        # a failed commit (disk full, read-only, I/O error) is retried on its own timer, not
        # only when the next batch comes: sources waiting to acknowledge send no next batch
        marks: dict[str, int] = {}  # readings per source that become durable with a commit
        retry = Backoff(first=max(interval, 0.05), limit=5.0)
        retry_at: float | None = None
        while True:
            if retry_at is None:
                batch = await queue.get_batch(4096)
            else:
                try:
                    async with asyncio.timeout_at(retry_at):
                        batch = await queue.get_batch(4096)
                except TimeoutError:
                    batch = []
            beat.begin()
            window: list[Measurement] = []
            while True:
                ms = [m for m in batch if isinstance(m, Measurement)]
                if len(ms) != len(batch):
                    for item in batch:
                        if isinstance(item, tuple):  # (source, n): its readings up to n
                            marks[item[0]] = item[1]
                window += ms
                delay = last_commit + interval - loop.time()
                if delay > 0:  # committed a moment ago: gather more for this transaction
                    beat.done()
                    await asyncio.sleep(delay)
                    beat.begin()
                if not queue:
                    break
                batch = await queue.get_batch(4096)
            if window:
                if group is not None:
                    window.sort(key=group)
                uplink.add(window)
                stats.processed += len(window)
            try:
                uplink.commit()
            except FluxError as exc:  # disk full, I/O error: counted, logged, retried
                stats.errors += 1
                self._ratelog.warning("uplink-commit", f"uplink outbox: {exc}")
                retry_at = loop.time() + retry.next()
            else:
                retry.reset()
                retry_at = None
                for source, seq in marks.items():
                    self._made_durable(source, seq)
                marks.clear()
            last_commit = loop.time()
            stats.last_progress = time.monotonic()
            beat.done()
            queue.task_done_if_empty()

    async def _action_stage(self) -> None:
        stats = self.stats["actions"]
        beat = self.beats["actions"]
        while True:
            batch = await self.commands.get_batch(256)
            beat.begin()
            for cmd in batch:
                task = asyncio.get_running_loop().create_task(self._run_action(cmd))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            stats.processed += len(batch)
            stats.last_progress = time.monotonic()
            beat.done()
            self.commands.task_done_if_empty()

    async def _run_action(self, cmd: Command) -> None:
        await self.execute(cmd)

    async def execute(self, cmd: Command) -> Outcome | None:
        """Run one command the way every command runs, whoever sent it (a rule, the safety
        layer, an operator at the console, an upstream platform): one at a time per action where
        the action drives an actuator, through the safety layer and the audit log (Guarded),
        counted, the safety state saved after an actuator switched, observers told. None: the
        safety layer blocked it (and logged and audited why), or the action does not exist (a
        dead letter)."""
        executor = self.executors.get(cmd.action)
        if executor is None:  # config validation makes this unreachable; never silent anyway
            self._dead_letter(
                ErrorRecord(
                    stage="actions", source="", device="", ts=cmd.ts,
                    error=f"{cmd.rule!r} asked for unknown action {cmd.action!r}",
                )
            )
            return None
        lock = self._action_locks.get(cmd.action)
        if lock is None:
            outcome = await self.guard.run(cmd, executor, self.latest)
        else:
            async with lock:
                outcome = await self.guard.run(cmd, executor, self.latest)
        if outcome is None:  # blocked by the safety layer, which logged and audited why
            self.action_counts[cmd.action][2] += 1
            for blocked_cb in self.observers.blocked:
                blocked_cb(cmd)
            return None
        actuates = bool(self.safety.actuators_of(cmd.action))
        if outcome.ok and actuates:
            self._save_safety()
        if outcome.ok:
            self.action_counts[cmd.action][0] += 1
            # actuator switches belong in the journal; routine publishes/writes only in debug
            # (the audit log and the metrics count every one)
            acfg = self.config.actions.get(cmd.action)
            device_write = acfg is not None and acfg.writes_device
            (log.info if actuates or device_write else log.debug)(
                "action %s (rule %s): ok%s in %.1f ms",
                cmd.action, cmd.rule,
                f", read back {outcome.verified!r}" if outcome.verified is not None else "",
                outcome.latency_s * 1000,
            )
        else:
            self.action_counts[cmd.action][1] += 1
            self.stats["actions"].errors += 1
            log.warning("action %s (rule %s) failed: %s", cmd.action, cmd.rule, outcome.error)
        for cb in self.observers.outcomes:
            cb(outcome)
        return outcome
