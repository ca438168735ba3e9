"""The Wasm plugin host: :class:`PluginHost` and :class:`Plugin`, the facade of ``plugins/``.

One :class:`PluginHost` owns one wasmtime engine (epoch interruption on), a ticker thread that
advances the engine's epoch while a guest runs, and the compiled-module cache. ``load`` gives a
:class:`Plugin`: one instance of one module in its own store, with a memory limit and a
per-call wall-time limit. ``Plugin.process`` never raises for what a guest does: traps, time-outs,
memory exhaustion and ABI violations turn every message of the batch into an
:class:`~flux_edge.model.ErrorRecord`, the instance is recycled, and repeated failures quarantine
the plugin (docs/plugin-abi.md, "Limits and failure").

Budgets per plugin (:class:`PluginLimits`): ``memory_limit`` over its one linear memory and its
tables together (a module with more memories, or memory64, is refused at load),
``max_output_bytes`` per call and ``max_records_per_message``. Any failure, the host's own
included (a MemoryError or RecursionError while decoding), fails only that plugin's batch:
every record it makes is counted by reason in ``PluginStats.dead_letters``, every failed call
in ``PluginStats.failed_calls`` (reasons: ``quarantine.REASONS``).

Hot path (one batch): encode (abi.py) -> one slice assignment into a cached memoryview over guest
memory -> ONE ``flux_process`` call through the C API -> one copy of the output -> decode (abi.py).

The parts, by concern:

- ``ffi.py``: the only wasmtime import (engine, modules, linking, stores, the low-level call
  path, guest memory); every use of wasmtime-py internals is there, with the reason;
- ``cache.py``: the compiled-module cache (in memory and ``<state_dir>/cache``);
- ``logsink.py``: the ``flux.log_*`` imports and WASI stdout/stderr;
- ``instance.py``: one plugin instance: limits, epoch deadlines, calls, recycling;
- ``quarantine.py``: failure counting, the quarantine policy, :class:`PluginStats`.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from flux_edge.config import PluginConfig
from flux_edge.errors import (
    PluginABIError,
    PluginError,
    PluginLoadError,
    PluginQuarantined,
    PluginTimeout,
    PluginTrap,
)
from flux_edge.logs import RateLimitedLog
from flux_edge.model import Command, ErrorRecord, Measurement, Reading
from flux_edge.plugins import ffi
from flux_edge.plugins.abi import (
    BatchEncodeError,
    Decoded,
    TooManyRecords,
    decode_output_counted,
    encode_batch,
)
from flux_edge.plugins.cache import ModuleCache
from flux_edge.plugins.instance import (
    INIT_TIMEOUT_MIN,
    Fault,
    ModuleShape,
    PluginInstance,
    check_exports,
    check_imports,
    check_memories,
    deadline_ticks,
)
from flux_edge.plugins.logsink import (
    LOG_BURST,
    LOG_CAP,
    LOG_LEVELS,
    LOG_RATE,
    TRACE,
    TRUNCATED,
    LogSink,
    plugin_logger,
)
from flux_edge.plugins.quarantine import (
    CALL_BUCKETS,
    FAILED_CALL_REASONS,
    FAULT_REASONS,
    REASONS,
    PluginStats,
    Quarantine,
)

__all__ = [
    "CALL_BUCKETS",
    "FAILED_CALL_REASONS",
    "INIT_TIMEOUT_MIN",
    "LOG_BURST",
    "LOG_CAP",
    "LOG_LEVELS",
    "LOG_RATE",
    "MAX_OUTPUT_BYTES",
    "MAX_RECORDS_PER_MESSAGE",
    "REASONS",
    "TRACE",
    "TRUNCATED",
    "Plugin",
    "PluginHost",
    "PluginLimits",
    "PluginStats",
    "encode_command",
]


MAX_RECORDS_PER_MESSAGE = 4096  # default of PluginLimits.max_records_per_message
MAX_OUTPUT_BYTES = 4 * 1024 * 1024  # default of PluginLimits.max_output_bytes


@dataclass(frozen=True, slots=True)
class PluginLimits:
    """What one plugin instance may use. Defaults match docs/plugin-abi.md."""

    timeout_s: float = 0.05  # wall time per call
    memory_limit: int = 16 * 1024 * 1024  # bytes of linear memory and tables, together
    max_failures: int = 3  # consecutive failed calls before quarantine
    quarantine_s: float = 60.0  # how long a quarantined plugin is left alone
    # records (output lines) about one input message; more: one error record for it instead
    max_records_per_message: int = MAX_RECORDS_PER_MESSAGE
    # bytes of output of one call; more: the call fails (every message an error record)
    max_output_bytes: int = MAX_OUTPUT_BYTES

    @classmethod
    def from_config(cls, cfg: PluginConfig) -> PluginLimits:
        # getattr: PluginConfig gains the output caps in flux_edge/config/schema.py
        return cls(
            timeout_s=cfg.timeout,
            memory_limit=cfg.memory_limit,
            max_failures=cfg.max_failures,
            quarantine_s=cfg.quarantine,
            max_records_per_message=getattr(
                cfg, "max_records_per_message", MAX_RECORDS_PER_MESSAGE
            ),
            max_output_bytes=getattr(cfg, "max_output_bytes", MAX_OUTPUT_BYTES),
        )


class PluginHost:
    """One wasmtime engine, its epoch ticker and the compiled-module cache.

    ``cache_dir`` None disables the on-disk cache. ``epoch_tick`` is the ticker period in
    seconds: the resolution of every time-out. ``clock`` (monotonic seconds) decides
    quarantines; inject one in tests.
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        epoch_tick: float = 0.005,
        *,
        clock: Callable[[], float] = time.monotonic,
        park_after: float = 0.1,
    ) -> None:
        if epoch_tick <= 0:
            raise ValueError("epoch_tick must be > 0")
        self.epoch_tick = epoch_tick
        # the ticker keeps ticking this long after the last call before it parks: with calls
        # coming every few ms, waking it for each one (a futex and a GIL hand-off per call)
        # cost more than ticking on; idle, it still sleeps
        self.park_after_ticks = max(0, round(park_after / epoch_tick))
        self.clock = clock
        self.engine = ffi.new_engine()
        self._cache = ModuleCache(self.engine, cache_dir)
        self._plugins: weakref.WeakSet[Plugin] = weakref.WeakSet()
        # Ticker: runs while guest calls are in progress (``_active`` > 0) and for
        # ``park_after`` after the last one, parks otherwise so an idle daemon does not wake.
        # PluginInstance.invoke inlines _busy() on the hot path.
        self._active = 0
        self._wake = threading.Event()
        self.parked = threading.Event()  # set while the ticker is parked (tests, diagnostics)
        self._stopping = False
        self._closed = False
        self._ticker = threading.Thread(target=self._tick_loop, name="flux-epoch", daemon=True)
        self._ticker.start()

    @property
    def cache_dir(self) -> Path | None:
        return self._cache.cache_dir

    @property
    def compiles(self) -> int:
        """Modules compiled from .wasm bytes."""
        return self._cache.compiles

    @property
    def cache_hits(self) -> int:
        """Modules loaded from the on-disk cache."""
        return self._cache.cache_hits

    # --- epoch ticker ---------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        tick = self.epoch_tick
        wake = self._wake
        engine = self.engine
        monotonic = time.monotonic
        next_t = monotonic()
        idle_ticks = 0
        park_after = self.park_after_ticks
        while not self._stopping:
            if self._active == 0:
                idle_ticks += 1
                if idle_ticks > park_after:  # quiet for a while: park until the next call
                    wake.clear()
                    if self._active == 0:  # re-check after clear: see _busy()
                        self.parked.set()
                        wake.wait()
                        self.parked.clear()
                        next_t = monotonic()
                        idle_ticks = 0
                        continue
            else:
                idle_ticks = 0
            next_t += tick
            delay = next_t - monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -10 * tick:  # far behind (process stopped, machine suspended)
                next_t = monotonic()
            engine.increment_epoch()

    @contextmanager
    def _busy(self) -> Iterator[None]:
        self._active += 1
        if not self._wake.is_set():
            self._wake.set()
        try:
            yield
        finally:
            self._active -= 1

    def deadline_ticks(self, seconds: float) -> int:
        """Epoch ticks to arm so that a call is interrupted no earlier than ``seconds``."""
        return deadline_ticks(seconds, self.epoch_tick)

    # --- plugins --------------------------------------------------------------------------------

    def load(
        self,
        name: str,
        path: Path,
        limits: PluginLimits,
        config: Mapping[str, Any],
        *,
        wasi: bool = False,
    ) -> Plugin:
        """Compile (or load from the cache), validate, instantiate and initialise a plugin.

        Raises :class:`PluginLoadError` naming what is wrong: unreadable or invalid module, a
        missing export or one with another signature, an import not granted, an ABI version
        other than 1, or ``flux_init`` refusing the config.
        """
        if self._closed:
            raise PluginLoadError(name, "the plugin host is closed")
        try:
            config_json = msgspec.json.encode(dict(config))
        except (TypeError, msgspec.EncodeError) as exc:
            raise PluginLoadError(name, f"config cannot be passed as JSON: {exc}") from None
        shape = _module_shape(name, path)
        module = self._cache.module(name, path)
        check_exports(name, module)
        check_imports(name, module, wasi)
        plugin = Plugin(
            self,
            name,
            path=path,
            module=module,
            limits=limits,
            config_json=config_json,
            wasi=wasi,
            shape=shape,
        )
        self._plugins.add(plugin)
        return plugin

    def close(self) -> None:
        """Close every plugin loaded by this host and stop the ticker."""
        if self._closed:
            return
        self._closed = True
        for plugin in list(self._plugins):
            plugin.close()
        self._stopping = True
        self._wake.set()
        self._ticker.join(timeout=1.0)
        self._cache.clear()

    def __enter__(self) -> PluginHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Plugin:
    """One plugin instance (per source), created by :meth:`PluginHost.load`.

    Not thread-safe: call :meth:`process` from one thread (the event loop's). Calls block that
    thread for at most ``limits.timeout_s`` (plus one epoch tick).
    """

    def __init__(
        self,
        host: PluginHost,
        name: str,
        *,
        path: Path,
        module: ffi.Module,
        limits: PluginLimits,
        config_json: bytes,
        wasi: bool,
        shape: ModuleShape | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.limits = limits
        self.stats = PluginStats()
        self._logger = plugin_logger(name)
        self._ratelog = RateLimitedLog(self._logger, 60.0)
        self._found = Decoded()  # reused: filled in by decode_output_counted on error paths
        self._max_records = limits.max_records_per_message
        self._q = Quarantine(
            name,
            max_failures=limits.max_failures,
            quarantine_s=limits.quarantine_s,
            clock=host.clock,
            stats=self.stats,
            logger=self._logger,
        )
        self._closed = False
        exported = ffi.exports_of(module)
        self.has_process = "flux_process" in exported  # can normalize batches (process)
        self.has_act = "flux_act" in exported  # can answer commands (act)
        self._runner = PluginInstance(
            host,
            name,
            module,
            limits,
            config_json,
            wasi=wasi,
            stats=self.stats,
            sink=LogSink(self._logger, self.stats),
            logger=self._logger,
            shape=shape,
        )
        # the call alone (copy in, flux_process, copy out); bench/plugin_call.py times it
        self._call_process = self._runner.call_process

    # --- public ---------------------------------------------------------------------------------

    @property
    def quarantined(self) -> bool:
        return self._q.active

    def retry_now(self) -> bool:
        """End a quarantine early (an operator acknowledged it): the next call is its trial
        call, as when the quarantine runs out. False if the plugin is not quarantined."""
        return self._q.end_now()

    @property
    def _inst(self) -> ffi.GuestInstance | None:
        """The current guest instance (None after a fault until the next call)."""
        return self._runner.inst

    def process(
        self, messages: Sequence[Reading | Measurement], *, indices: list[int] | None = None
    ) -> list[Measurement | ErrorRecord]:
        """Run one batch through the plugin: ONE ``flux_process`` call.

        Returns measurements and error records in the guest's output order; a failed call (or
        quarantine) gives one error record per input message, in input order. With
        ``indices``, the input index of every record is appended to it. Never raises for
        anything the guest does.
        """
        n = len(messages)
        if n == 0:
            return []
        stats = self.stats
        stats.messages += n
        if self._closed:
            return self._fail_all(messages, "plugin is closed", indices, "unavailable")
        if not self.has_process:
            return self._fail_all(
                messages,
                "the plugin does not export flux_process (it only acts)",
                indices,
                "unavailable",
            )
        q = self._q
        until = q.until
        if until is not None:
            now = q.clock()
            if now < until:
                return self._fail_all(messages, q.text(until - now), indices, "quarantined")
        t0 = time.perf_counter()
        try:
            data = encode_batch(messages)
        except BatchEncodeError:
            return self._process_encodable(messages, indices)
        mark = len(indices) if indices is not None else 0
        try:
            runner = self._runner
            inst = runner.inst
            if inst is None:
                inst = self._recycle()
            out = runner.call_process(inst, data)
            result, errors = decode_output_counted(
                out,
                messages,
                self.name,
                indices=indices,
                max_records=self._max_records,
                found=self._found,
            )
        except Fault as f:
            result = self._failed(messages, f, indices, mark)
        except TooManyRecords as exc:
            if indices is not None:
                del indices[mark:]
            text = _abi_text(exc, self.name, "")
            result = self._fail_all(messages, text, indices, "records")
            self._ratelog.warning("records", "plugin %r: %s", self.name, text)
        except PluginABIError as exc:
            result = self._failed(messages, Fault("abi", _abi_text(exc, self.name)), indices, mark)
        except Exception as exc:  # noqa: BLE001 - contained: a host bug must fail this batch only
            result = self._failed(messages, self._host_fault(exc), indices, mark)
        else:
            q.failures = 0
            if until is not None:
                q.recovered()
            if errors:
                self._count_output_errors(messages)
        dt = time.perf_counter() - t0
        stats.last_call_s = dt
        stats.total_call_s += dt
        stats.call_counts[bisect_left(CALL_BUCKETS, dt)] += 1
        return result

    def act(self, command: Command) -> bytes:
        """Ask the plugin what to send for ``command``: ONE ``flux_act`` call.

        Returns the bytes the guest produced. Unlike :meth:`process` this raises:
        :class:`PluginTimeout`, :class:`PluginTrap`, :class:`PluginABIError` (the instance is
        recycled and the failure counts toward quarantine), :class:`PluginQuarantined`, or
        :class:`PluginError` when the guest refused (negative return; the message carries its
        last error-level log) or the plugin is closed / does not export ``flux_act``.
        """
        if self._closed:
            raise PluginError(self.name, "plugin is closed")
        if not self.has_act:
            raise PluginError(
                self.name, "the plugin does not export flux_act, so it cannot run an action"
            )
        q = self._q
        until = q.until
        if until is not None:
            now = q.clock()
            if now < until:
                raise PluginQuarantined(self.name, q.text(until - now))
        stats = self.stats
        t0 = time.perf_counter()
        try:
            data = encode_command(command)
        except (TypeError, msgspec.EncodeError) as exc:
            raise PluginError(self.name, f"cannot pass the command to the plugin: {exc}") from None
        try:
            runner = self._runner
            inst = runner.inst
            if inst is None:
                inst = self._recycle()
            try:
                out = runner.call_entry(inst, inst.f_act, "flux_act", data, "the command")
            except Fault:
                raise
            except Exception as exc:  # noqa: BLE001 - contained, as in process()
                raise self._host_fault(exc) from None
        except Fault as f:
            msg = self._record_failure(f)
            if f.kind == "timeout":
                raise PluginTimeout(self.name, msg) from None
            if f.kind == "trap":
                raise PluginTrap(self.name, msg) from None
            if f.kind == "abi":
                raise PluginABIError(self.name, msg) from None
            raise PluginError(self.name, msg) from None
        finally:
            dt = time.perf_counter() - t0
            stats.last_call_s = dt
            stats.total_call_s += dt
            stats.call_counts[bisect_left(CALL_BUCKETS, dt)] += 1
        q.failures = 0
        if until is not None:
            q.recovered()
        return out

    def close(self) -> None:
        """Free the input buffer and drop the instance. Later calls give error records."""
        if self._closed:
            return
        self._closed = True
        self._runner.close()

    def __enter__(self) -> Plugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Plugin {self.name!r} {self.path}>"

    # --- failures -------------------------------------------------------------------------------

    def _recycle(self) -> ffi.GuestInstance:
        """A fresh instance after a fault; a failure to make one is an ``init`` fault."""
        try:
            return self._runner.recycle()
        except Fault as f:
            raise Fault("init", f"cannot make a fresh instance: {f}") from None

    def _host_fault(self, exc: Exception) -> Fault:
        """An unexpected exception while calling the guest or decoding its output (a
        MemoryError, a host bug): logged with its traceback, a ``host`` failure of the call."""
        self._ratelog.log(
            "host-exception",
            "plugin %r: unexpected %s while handling a call",
            self.name,
            type(exc).__name__,
            level=logging.ERROR,
        )
        self._logger.debug("plugin %r: the exception", self.name, exc_info=exc)
        return Fault("error", f"host error: {type(exc).__name__}: {exc}"[:500])

    def _count_output_errors(self, messages: Sequence[Reading | Measurement]) -> None:
        """A successful call whose output holds error records: count them by reason."""
        found = self._found
        stats = self.stats
        if found.guest_errors:
            stats.dead("guest", found.guest_errors)
        over = found.over
        if over:
            stats.dead("records", len(over))
            i, c = next(iter(over.items()))
            self._ratelog.warning(
                "records",
                "plugin %r: %d input message(s) produced more than %d records each "
                "(input %d: %d records, source %s, device %s); each became one error record",
                self.name,
                len(over),
                self._max_records,
                i,
                c,
                messages[i].source,
                messages[i].device,
            )

    def _failed(
        self,
        messages: Sequence[Reading | Measurement],
        fault: Fault,
        indices: list[int] | None,
        mark: int,
    ) -> list[Measurement | ErrorRecord]:
        """A whole call failed: discard the instance, count, maybe quarantine."""
        if indices is not None:
            del indices[mark:]
        reason = FAULT_REASONS.get(fault.kind, "host")
        return self._fail_all(messages, self._record_failure(fault), indices, reason)

    def _record_failure(self, fault: Fault) -> str:
        """Discard the instance, count the failure, maybe quarantine; returns the message."""
        self._runner.discard()
        msg = str(fault)
        self._q.record(fault.kind, msg)
        return msg

    def _fail_all(
        self,
        messages: Sequence[Reading | Measurement],
        error: str,
        indices: list[int] | None,
        reason: str,
    ) -> list[Measurement | ErrorRecord]:
        name = self.name
        self.stats.dead(reason, len(messages))
        if indices is not None:
            indices.extend(range(len(messages)))
        return [
            ErrorRecord(
                stage="plugin", source=m.source, device=m.device, ts=m.ts, error=error, plugin=name
            )
            for m in messages
        ]

    def _process_encodable(
        self, messages: Sequence[Reading | Measurement], indices: list[int] | None
    ) -> list[Measurement | ErrorRecord]:
        """Slow path: some messages cannot be encoded. They become error records; the rest is
        processed. Records are ordered by input index."""
        self.stats.messages -= len(messages)  # counted again below
        good: list[int] = []
        bad: dict[int, str] = {}
        for i, m in enumerate(messages):
            try:
                encode_batch([m])
            except BatchEncodeError as exc:
                bad[i] = f"cannot pass the message to the plugin: {exc.reason}"
            else:
                good.append(i)
        sub_idx: list[int] = []
        sub = self.process([messages[i] for i in good], indices=sub_idx) if good else []
        self.stats.messages += len(bad)
        self.stats.dead("encode", len(bad))
        pairs: list[tuple[int, Measurement | ErrorRecord]] = [
            (good[k], r) for k, r in zip(sub_idx, sub, strict=True)
        ]
        for i, why in bad.items():
            m = messages[i]
            pairs.append(
                (
                    i,
                    ErrorRecord(
                        stage="plugin",
                        source=m.source,
                        device=m.device,
                        ts=m.ts,
                        error=why,
                        plugin=self.name,
                    ),
                )
            )
        pairs.sort(key=lambda p: p[0])
        if indices is not None:
            indices.extend(i for i, _ in pairs)
        return [r for _, r in pairs]


def encode_command(command: Command) -> bytes:
    """The JSON object ``flux_act`` receives (docs/plugin-abi.md, "Actions")."""
    cause = command.cause
    return msgspec.json.encode(
        {
            "rule": command.rule,
            "action": command.action,
            "ts": command.ts,
            "device": cause.device if cause is not None else "",
            "name": cause.name if cause is not None else "",
            "value": cause.value if cause is not None else None,
            "unit": cause.unit if cause is not None else "",
            "quality": cause.quality if cause is not None else "",
            "params": command.params,
        }
    )


def _module_shape(name: str, path: Path) -> ModuleShape:
    """Read (and check) what the module declares: one 32-bit memory, its tables. A file that
    cannot be read or converted is left to the compiled-module cache to report."""
    try:
        binary = ffi.module_binary(path.read_bytes())
    except (OSError, ffi.WasmError):
        return ModuleShape()
    return check_memories(name, binary)


def _abi_text(exc: PluginABIError, name: str, head: str = "ABI error: ") -> str:
    text = str(exc)
    prefix = f"plugin {name!r}: "
    return head + (text[len(prefix) :] if text.startswith(prefix) else text)
