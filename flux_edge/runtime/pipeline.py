"""Wires the stages of one configuration together and runs them under the supervisor.

    sources --readings--> plugin stage --measurements--> rule stage --commands--> action stage

Every queue is bounded. Sources block when the plugin stage falls behind (a poller then polls
late, which it counts), so nothing between stages is dropped; anything that cannot be processed
becomes an ErrorRecord (dead letter) that is counted, logged and handed to observers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from flux_edge.actions.modbus_write import ModbusWriteExecutor
from flux_edge.config import Config, ModbusTcpSource, resolve_plugin_path
from flux_edge.errors import PluginError
from flux_edge.model import Command, ErrorRecord, Measurement, Outcome, Reading
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits
from flux_edge.rules.engine import RuleEngine
from flux_edge.runtime.queues import BoundedQueue
from flux_edge.runtime.supervisor import Supervisor
from flux_edge.sources.modbus import ModbusTcpPoller

log = logging.getLogger("flux_edge.runtime")


@dataclass(slots=True)
class Observers:
    """Callbacks the embedding program (daemon, demo, tests) can hang on the data path."""

    measurements: list[Callable[[str, list[Measurement]], None]] = field(default_factory=list)
    errors: list[Callable[[ErrorRecord], None]] = field(default_factory=list)
    outcomes: list[Callable[[Outcome], None]] = field(default_factory=list)


@dataclass(slots=True)
class StageStats:
    processed: int = 0
    errors: int = 0
    last_progress: float = 0.0  # monotonic time of the last completed unit of work


class _RateLimitedLog:
    """At most one log line per key per ``every`` seconds; the rest are counted and summarised."""

    def __init__(self, every: float = 5.0) -> None:
        self._every = every
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, key: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -float("inf")) >= self._every:
            extra = self._suppressed.pop(key, 0)
            suffix = f" ({extra} similar message(s) suppressed)" if extra else ""
            log.warning("%s%s", msg, suffix)
            self._last[key] = now
        else:
            self._suppressed[key] += 1


def source_context(name: str, cfg: ModbusTcpSource) -> dict[str, Any]:
    """What a plugin instance learns about the source it serves (ABI v1: the ``source`` object)."""
    return {
        "name": name,
        "type": "modbus_tcp",
        "device": cfg.device or name,
        "registers": [msgspec.to_builtins(r) for r in cfg.registers],
    }


class Pipeline:
    def __init__(
        self,
        config: Config,
        *,
        host: PluginHost,
        observers: Observers | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.host = host
        self.observers = observers or Observers()
        self._clock = clock
        qsize = config.daemon.queue_size
        self.readings: BoundedQueue[Reading] = BoundedQueue("readings", qsize)
        self.measurements: BoundedQueue[Measurement] = BoundedQueue("measurements", qsize)
        self.commands: BoundedQueue[Command] = BoundedQueue("commands", qsize)
        self.stats: dict[str, StageStats] = {
            s: StageStats() for s in ("sources", "plugins", "rules", "actions")
        }
        self.dead_letters: collections.deque[ErrorRecord] = collections.deque(maxlen=1000)
        self.dead_letter_total = 0
        self.chains: dict[str, list[Plugin]] = {}
        self.pollers: dict[str, ModbusTcpPoller] = {}
        self.executors: dict[str, ModbusWriteExecutor] = {}
        self.engine = RuleEngine(config, clock=clock)
        self._supervisor = Supervisor()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._action_locks: dict[str, asyncio.Lock] = {}
        self._ratelog = _RateLimitedLog()
        self._started = False

    # --- construction ------------------------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        for sname, scfg in cfg.sources.items():
            chain: list[Plugin] = []
            for pname in scfg.chain:
                pcfg = cfg.plugins[pname]
                init_cfg = dict(pcfg.config)
                init_cfg["source"] = source_context(sname, scfg)
                chain.append(
                    self.host.load(
                        pname,
                        Path(resolve_plugin_path(cfg, pname)),
                        PluginLimits.from_config(pcfg),
                        init_cfg,
                        wasi=pcfg.wasi,
                    )
                )
            self.chains[sname] = chain
            self.pollers[sname] = ModbusTcpPoller(sname, scfg, self._emit)
        for aname, acfg in cfg.actions.items():
            self.executors[aname] = ModbusWriteExecutor(aname, acfg, self.pollers[acfg.source])
            self._action_locks[aname] = asyncio.Lock()

    async def _emit(self, reading: Reading) -> None:
        await self.readings.put(reading)
        self.stats["sources"].processed += 1
        self.stats["sources"].last_progress = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every plugin, then start consumers before producers."""
        self._build()
        sup = self._supervisor
        sup.spawn("actions", self._action_stage)
        sup.spawn("rules", self._rule_stage)
        sup.spawn("plugins", self._plugin_stage)
        for name, poller in self.pollers.items():
            sup.spawn(f"source:{name}", poller.run)
        self._started = True
        log.info(
            "pipeline running: %d source(s), %d plugin instance(s), %d rule(s), %d action(s)",
            len(self.pollers),
            sum(len(c) for c in self.chains.values()),
            len(self.config.rules),
            len(self.executors),
        )

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop sources, let queued data flow through every stage, then stop the stages."""
        if not self._started:
            return
        self._started = False
        sup = self._supervisor
        await sup.cancel(*[f"source:{n}" for n in self.pollers])
        try:
            async with asyncio.timeout(drain_timeout):
                await self.readings.join()
                await self.measurements.join()
                await self.commands.join()
                while self._in_flight:
                    await asyncio.wait(set(self._in_flight))
        except TimeoutError:
            log.warning(
                "stop: queues not drained within %.0f s (readings %d, measurements %d, "
                "commands %d, actions in flight %d)",
                drain_timeout,
                len(self.readings),
                len(self.measurements),
                len(self.commands),
                len(self._in_flight),
            )
        await sup.cancel_all()
        for poller in self.pollers.values():
            await poller.close()
        for chain in self.chains.values():
            for plugin in chain:
                plugin.close()

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

    def run_chain(self, source: str, readings: Sequence[Reading]) -> list[Measurement]:
        """Pass one source's readings through its plugin chain, in order."""
        msgs: Sequence[Reading | Measurement] = readings
        out: list[Measurement] = []
        for plugin in self.chains.get(source, ()):
            out = []
            for item in plugin.process(msgs):
                if isinstance(item, Measurement):
                    out.append(item)
                else:
                    self._dead_letter(item)
            msgs = out
        return out

    async def _plugin_stage(self) -> None:
        stats = self.stats["plugins"]
        batch_max = self.config.daemon.batch_max
        while True:
            batch = await self.readings.get_batch(batch_max)
            by_source: dict[str, list[Reading]] = {}
            for r in batch:
                by_source.setdefault(r.source, []).append(r)
            for source, readings in by_source.items():
                try:
                    measurements = self.run_chain(source, readings)
                except PluginError as exc:  # host bug guard: Plugin.process should not raise
                    for r in readings:
                        self._dead_letter(
                            ErrorRecord(
                                stage="plugin", source=source, device=r.device, ts=r.ts,
                                error=str(exc), plugin=exc.plugin,
                            )
                        )
                    continue
                for cb in self.observers.measurements:
                    cb(source, measurements)
                for m in measurements:
                    await self.measurements.put(m)
                stats.processed += len(readings)
            stats.last_progress = time.monotonic()
            self.readings.task_done_if_empty()

    async def _rule_stage(self) -> None:
        stats = self.stats["rules"]
        while True:
            batch = await self.measurements.get_batch(1024)
            for m in batch:
                for cmd in self.engine.on_measurement(m):
                    await self.commands.put(cmd)
            stats.processed += len(batch)
            stats.last_progress = time.monotonic()
            self.measurements.task_done_if_empty()

    async def _action_stage(self) -> None:
        stats = self.stats["actions"]
        while True:
            batch = await self.commands.get_batch(256)
            for cmd in batch:
                task = asyncio.get_running_loop().create_task(self._run_action(cmd))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            stats.processed += len(batch)
            stats.last_progress = time.monotonic()
            self.commands.task_done_if_empty()

    async def _run_action(self, cmd: Command) -> None:
        executor = self.executors.get(cmd.action)
        if executor is None:  # config validation makes this unreachable; never silent anyway
            self._dead_letter(
                ErrorRecord(
                    stage="actions", source="", device="", ts=cmd.ts,
                    error=f"rule {cmd.rule!r} asked for unknown action {cmd.action!r}",
                )
            )
            return
        async with self._action_locks[cmd.action]:
            outcome = await executor.execute(cmd)
        if outcome.ok:
            log.info(
                "action %s (rule %s): ok%s in %.1f ms",
                cmd.action, cmd.rule,
                f", read back {outcome.verified!r}" if outcome.verified is not None else "",
                outcome.latency_s * 1000,
            )
        else:
            self.stats["actions"].errors += 1
            log.warning("action %s (rule %s) failed: %s", cmd.action, cmd.rule, outcome.error)
        for cb in self.observers.outcomes:
            cb(outcome)
