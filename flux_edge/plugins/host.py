"""The Wasm plugin host: the ONLY module that imports wasmtime.

One :class:`PluginHost` owns one wasmtime ``Engine`` (epoch interruption on), a ticker thread that
advances the engine's epoch while a guest runs, and the compiled-module cache. ``load`` gives a
:class:`Plugin`: one instance of one module in its own ``Store``, with a memory limit and a
per-call wall-time limit. ``Plugin.process`` never raises for what a guest does: traps, time-outs,
memory exhaustion and ABI violations turn every message of the batch into an
:class:`~flux_edge.model.ErrorRecord`, the instance is recycled, and repeated failures quarantine
the plugin (docs/plugin-abi.md, "Limits and failure").

Hot path (one batch): encode (abi.py) -> one slice assignment into a cached memoryview over guest
memory -> ONE ``flux_process`` call -> one copy of the output -> decode (abi.py).

The call goes through wasmtime's C API ``wasmtime_func_call_unchecked`` with a preallocated
argument array instead of ``Func.__call__``: measured here ~4 us against ~35-55 us per call,
because ``Func.__call__`` builds a ``FuncType`` and converts every value through ``Val``. It is
safe because every export's signature is checked when the module is loaded (the "unchecked"
part is only the argument types), and traps, time-outs and errors are reported through the same
trap/error pointers ``Func.__call__`` reads. It relies on ``wasmtime._bindings`` of wasmtime-py
50 (pinned in pyproject.toml); tests/unit/test_host.py covers it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import wasmtime
from wasmtime import _bindings as _wb
from wasmtime import _func as _wfunc

from flux_edge.config import PluginConfig
from flux_edge.errors import (
    PluginABIError,
    PluginError,
    PluginLoadError,
    PluginQuarantined,
    PluginTimeout,
    PluginTrap,
)
from flux_edge.model import Command, ErrorRecord, Measurement, Reading
from flux_edge.plugins.abi import (
    ABI_VERSION,
    BatchEncodeError,
    decode_output_counted,
    encode_batch,
)

log = logging.getLogger(__name__)

TRACE = 5
LOG_LEVELS = {"trace": TRACE, "debug": 10, "info": 20, "warn": 30, "error": 40}
LOG_CAP = 4096  # bytes of one guest log message
TRUNCATED = "…[truncated]"
LOG_RATE = 20  # guest log messages per second per plugin, on average
LOG_BURST = 200  # ... and in a burst; the rest is counted and reported as suppressed
INIT_TIMEOUT_MIN = 1.0  # seconds: flux_init and instantiation get max(timeout, this)
# upper bounds (seconds, inclusive) of the per-call wall-time histogram in PluginStats.call_counts
CALL_BUCKETS: tuple[float, ...] = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)

_WASI_MODULE = "wasi_snapshot_preview1"
_WASI_ENOSYS = 52

# --- low-level call path (see the module docstring) ----------------------------------------------

_call_unchecked = _wb._wasmtime_func_call_unchecked
_set_deadline = _wb._wasmtime_context_set_epoch_deadline
_TrapPtr = ctypes.POINTER(_wb.wasm_trap_t)
_Raw = _wb.wasmtime_val_raw_t
_byref = ctypes.byref


# --- public types ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PluginLimits:
    """What one plugin instance may use. Defaults match docs/plugin-abi.md."""

    timeout_s: float = 0.05  # wall time per call
    memory_limit: int = 16 * 1024 * 1024  # bytes of linear memory
    max_failures: int = 3  # consecutive failed calls before quarantine
    quarantine_s: float = 60.0  # how long a quarantined plugin is left alone

    @classmethod
    def from_config(cls, cfg: PluginConfig) -> PluginLimits:
        return cls(
            timeout_s=cfg.timeout,
            memory_limit=cfg.memory_limit,
            max_failures=cfg.max_failures,
            quarantine_s=cfg.quarantine,
        )


@dataclass(slots=True)
class PluginStats:
    """Counters for metrics. ``calls`` counts ``flux_process`` calls actually made."""

    calls: int = 0
    messages: int = 0  # messages handed to process()
    errors: int = 0  # error records returned (guest "error" lines, failed calls, quarantine)
    failures: int = 0  # calls that failed as a whole (trap, time-out, ABI, negative return)
    traps: int = 0
    timeouts: int = 0
    abi_errors: int = 0
    recycles: int = 0  # fresh instances made after a failure
    quarantines: int = 0
    last_call_s: float = 0.0  # wall time of the last process() (encode + call + decode)
    total_call_s: float = 0.0
    # calls per CALL_BUCKETS bucket (not cumulative): call_counts[i] counts calls that took at
    # most CALL_BUCKETS[i] and more than the bound before it; the last entry counts the rest
    call_counts: list[int] = field(default_factory=lambda: [0] * (len(CALL_BUCKETS) + 1))


# --- guest faults (internal) ----------------------------------------------------------------------


class _Fault(Exception):
    """A guest call failed; ``kind`` is trap | timeout | abi | refused | error."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class _LogAbort(Exception):
    """Raised inside a host import to trap the guest's call (an ABI violation)."""


class _LogSink:
    """Host side of the ``flux.log_*`` imports and of WASI stdout/stderr for one plugin.

    Holds no reference to the plugin (the callbacks live in wasmtime's global function table
    until the linker is freed, so a reference back would keep every plugin alive).
    """

    __slots__ = ("abi_error", "last_error", "logger", "suppressed", "tokens", "tokens_at")

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.abi_error: str | None = None  # set by a callback that traps the call
        self.last_error: str | None = None  # last message logged at error level
        # token bucket: a plugin logging in a loop must not flood the journal (SD card wear)
        self.tokens = float(LOG_BURST)
        self.tokens_at = time.monotonic()
        self.suppressed = 0

    def _allow(self) -> bool:
        now = time.monotonic()
        tokens = min(float(LOG_BURST), self.tokens + (now - self.tokens_at) * LOG_RATE)
        self.tokens_at = now
        if tokens < 1.0:
            self.tokens = tokens
            self.suppressed += 1
            return False
        self.tokens = tokens - 1.0
        if self.suppressed:
            self.logger.warning(
                "%d log message(s) of this plugin suppressed (limit: %d/s, bursts of %d)",
                self.suppressed,
                LOG_RATE,
                LOG_BURST,
            )
            self.suppressed = 0
        return True

    def callback(self, level_name: str) -> Callable[[wasmtime.Caller, int, int], None]:
        level = LOG_LEVELS[level_name]
        logger = self.logger
        is_error = level >= logging.ERROR

        def log_import(caller: wasmtime.Caller, ptr: int, length: int) -> None:
            p = ptr & 0xFFFFFFFF
            n = length & 0xFFFFFFFF
            mem = caller.get("memory")
            size = mem.data_len(caller) if isinstance(mem, wasmtime.Memory) else 0
            if p + n > size:
                self.abi_error = (
                    f"ABI error: flux.log_{level_name}(ptr={p}, len={n}) is outside the guest's "
                    f"{size}-byte memory"
                )
                raise _LogAbort
            if not (is_error or logger.isEnabledFor(level)):
                return
            allowed = self._allow()
            if not (allowed or is_error):
                return
            assert isinstance(mem, wasmtime.Memory)
            take = min(n, LOG_CAP)
            base = ctypes.addressof(mem.data_ptr(caller).contents)
            raw = ctypes.string_at(base + p, take) if take else b""
            text = _cut_utf8(raw, take < n)
            if is_error:
                self.last_error = text
            if allowed:
                logger.log(level, "%s", text)

        return log_import

    def stream(self, level: int) -> Callable[[bytes], int]:
        """WASI stdout/stderr writes, logged line by line (capped like log_*)."""

        def write(data: bytes) -> int:
            text = _cut_utf8(data[:LOG_CAP], len(data) > LOG_CAP).rstrip("\n")
            if text and self.logger.isEnabledFor(level) and self._allow():
                if level >= logging.ERROR:
                    self.last_error = text
                self.logger.log(level, "%s", text)
            return len(data)

        return write


def _cut_utf8(raw: bytes, truncated: bool) -> str:
    """Decode guest text: invalid UTF-8 replaced; when cut, drop a split character at the end."""
    if truncated:
        # Back off to the start of a character cut in the middle (at most 3 continuation bytes).
        end = len(raw)
        k = end
        while k > 0 and end - k < 4 and (raw[k - 1] & 0xC0) == 0x80:
            k -= 1
        if k > 0:
            lead = raw[k - 1]
            if lead >> 5 == 0b110:
                need = 2
            elif lead >> 4 == 0b1110:
                need = 3
            elif lead >> 3 == 0b11110:
                need = 4
            else:
                need = 1
            if need > 1 and end - (k - 1) < need:
                raw = raw[: k - 1]
        return raw.decode("utf-8", "replace") + TRUNCATED
    return raw.decode("utf-8", "replace")


# --- the host -------------------------------------------------------------------------------------

_EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flux_abi_version": ((), ("i32",)),
    "flux_alloc": (("i32",), ("i32",)),
    "flux_dealloc": (("i32", "i32"), ()),
    "flux_init": (("i32", "i32"), ("i32",)),
}
# A plugin exports at least one of these: flux_process (normalize batches), flux_act (actions).
_ENTRY_EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flux_process": (("i32", "i32"), ("i64",)),
    "flux_act": (("i32", "i32"), ("i64",)),
}


def _sig(params: Sequence[object], results: Sequence[object]) -> str:
    return f"({', '.join(map(str, params))}) -> ({', '.join(map(str, results))})"


class PluginHost:
    """One wasmtime engine, its epoch ticker and the compiled-module cache.

    ``cache_dir`` None disables the on-disk cache. ``epoch_tick`` is the ticker period in
    seconds: the resolution of every time-out. ``clock`` (monotonic seconds) decides
    quarantines; inject one in tests.
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        epoch_tick: float = 0.002,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if epoch_tick <= 0:
            raise ValueError("epoch_tick must be > 0")
        self.cache_dir = cache_dir
        self.epoch_tick = epoch_tick
        self.clock = clock
        cfg = wasmtime.Config()
        # The engine configuration; every entry is part of the cache key.
        settings: dict[str, object] = {
            "epoch_interruption": True,  # wall-time limits
            "cranelift_opt_level": "speed",  # wasmtime's default, written down for the key
            "memory_may_move": False,  # guest memory never moves: cached memoryviews stay valid
            "wasm_threads": False,  # no shared memories: a plugin is single-threaded
        }
        for key, value in settings.items():
            setattr(cfg, key, value)
        self.engine = wasmtime.Engine(cfg)
        self._engine_key = "|".join(
            [
                f"wasmtime={_wasmtime_version()}",
                f"machine={platform.machine()}",
                *(f"{k}={v}" for k, v in sorted(settings.items())),
            ]
        )
        self._modules: dict[str, wasmtime.Module] = {}
        self._plugins: weakref.WeakSet[Plugin] = weakref.WeakSet()
        self.compiles = 0  # modules compiled from .wasm bytes
        self.cache_hits = 0  # modules loaded from the on-disk cache
        # Ticker: runs while a guest call is in progress (``_active`` > 0), parks otherwise so
        # an idle daemon does not wake up 500 times a second.
        self._active = 0
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._ticker = threading.Thread(target=self._tick_loop, name="flux-epoch", daemon=True)
        self._ticker.start()

    # --- epoch ticker ---------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        tick = self.epoch_tick
        wake = self._wake
        engine = self.engine
        monotonic = time.monotonic
        next_t = monotonic()
        while not self._stopping:
            if self._active == 0:
                wake.clear()
                if self._active == 0:  # re-check after clear: see _busy()
                    wake.wait()
                    next_t = monotonic()
                    continue
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
        return max(1, math.ceil(seconds / self.epoch_tick - 1e-9)) + 1

    # --- modules --------------------------------------------------------------------------------

    def _module(self, name: str, path: Path) -> wasmtime.Module:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PluginLoadError(name, f"cannot read {path}: {exc.strerror or exc}") from None
        key = hashlib.sha256(
            self._engine_key.encode() + b"\0" + hashlib.sha256(data).digest()
        ).hexdigest()
        module = self._modules.get(key)
        if module is not None:
            return module
        module = self._load_cached(name, key) if self.cache_dir is not None else None
        if module is None:
            try:
                module = wasmtime.Module(self.engine, data)
            except wasmtime.WasmtimeError as exc:
                first = str(exc).strip().splitlines()
                raise PluginLoadError(
                    name,
                    f"{path} is not a valid WebAssembly module: "
                    f"{'; '.join(s.strip() for s in first[:4])}",
                ) from None
            self.compiles += 1
            if self.cache_dir is not None:
                self._store_cached(name, key, module)
        self._modules[key] = module
        return module

    def _cache_prefix(self, name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] + "."

    def _load_cached(self, name: str, key: str) -> wasmtime.Module | None:
        assert self.cache_dir is not None
        prefix = f"{self._cache_prefix(name)}{key[:32]}."
        try:
            candidates = [p for p in self.cache_dir.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return None
        for path in candidates:
            # <name>.<key>.<blake2b of the contents>.cwasm: a file that does not hash to its
            # name is corrupt (an SD card, a crash mid-write, a hand edit): removed, recompiled.
            want = path.name[len(prefix) :].removesuffix(".cwasm")
            try:
                got = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
                if got != want:
                    raise ValueError("contents do not match their checksum")
                module = wasmtime.Module.deserialize_file(self.engine, str(path))
            except (OSError, ValueError, wasmtime.WasmtimeError) as exc:
                log.warning("plugin %r: discarding corrupt cache file %s (%s)", name, path, exc)
                with suppress(OSError):
                    path.unlink()
                continue
            self.cache_hits += 1
            return module
        return None

    def _store_cached(self, name: str, key: str, module: wasmtime.Module) -> None:
        assert self.cache_dir is not None
        prefix = self._cache_prefix(name)
        tmp: Path | None = None
        try:
            blob = bytes(module.serialize())
            final = self.cache_dir / (
                f"{prefix}{key[:32]}.{hashlib.blake2b(blob, digest_size=16).hexdigest()}.cwasm"
            )
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{final.name}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            tmp = None
            for old in self.cache_dir.iterdir():  # stale entries of this plugin
                if old.name.startswith(prefix) and old.suffix == ".cwasm" and old != final:
                    with suppress(OSError):
                        old.unlink()
        except (OSError, wasmtime.WasmtimeError) as exc:
            log.warning("plugin %r: cannot write the compiled-module cache: %s", name, exc)
        finally:
            if tmp is not None:
                with suppress(OSError):
                    tmp.unlink()

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
        module = self._module(name, path)
        _check_exports(name, module)
        _check_imports(name, module, wasi)
        plugin = Plugin(
            self,
            name,
            path=path,
            module=module,
            limits=limits,
            config_json=config_json,
            wasi=wasi,
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
        self._modules.clear()

    def __enter__(self) -> PluginHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_exports(name: str, module: wasmtime.Module) -> None:
    found = {e.name: e.type for e in module.exports}
    problems: list[str] = []
    mem = found.get("memory")
    if mem is None:
        problems.append("missing export `memory` (the guest's linear memory)")
    elif not isinstance(mem, wasmtime.MemoryType):
        problems.append("export `memory` is not a memory")
    if not any(f in found for f in _ENTRY_EXPORTS):
        problems.append(
            "missing export `flux_process` (i32, i32) -> (i64) or `flux_act` (i32, i32) -> (i64) "
            "(a plugin exports at least one of them)"
        )
    for fname, (params, results) in {**_EXPORTS, **_ENTRY_EXPORTS}.items():
        ty = found.get(fname)
        want = _sig(params, results)
        if ty is None:
            if fname not in _ENTRY_EXPORTS:
                problems.append(f"missing export `{fname}` {want}")
        elif not isinstance(ty, wasmtime.FuncType):
            problems.append(f"export `{fname}` is not a function (expected {want})")
        else:
            got = _sig(ty.params, ty.results)
            if got != want:
                problems.append(f"export `{fname}` has signature {got}, expected {want}")
    if problems:
        raise PluginLoadError(name, "; ".join(problems) + " (see docs/plugin-abi.md)")


def _check_imports(name: str, module: wasmtime.Module, wasi: bool) -> None:
    problems: list[str] = []
    log_names = {f"log_{lvl}" for lvl in LOG_LEVELS}
    for imp in module.imports:
        what = f"{imp.module}.{imp.name}"
        ty = imp.type
        if imp.module == "flux" and imp.name in log_names:
            sig = _sig(ty.params, ty.results) if isinstance(ty, wasmtime.FuncType) else "?"
            if sig != "(i32, i32) -> ()":
                problems.append(f"import `{what}` must be a function (i32, i32) -> (), got {sig}")
        elif imp.module == _WASI_MODULE:
            if not wasi:
                problems.append(
                    f"import `{what}` is WASI, which is not granted "
                    f"(set `wasi = true` in [plugins.{name}] to grant it)"
                )
        else:
            problems.append(
                f"import `{what}` is not provided by the host (a plugin may import only "
                f"flux.log_trace/debug/info/warn/error{' and WASI' if wasi else ''})"
            )
    if problems:
        raise PluginLoadError(name, "refused: " + "; ".join(problems))


# --- one plugin instance --------------------------------------------------------------------------


class _Instance:
    """One Store + Instance. Discarded whole after any fault (its memory goes with it)."""

    __slots__ = (
        "ctx",
        "f_act",
        "f_alloc",
        "f_dealloc",
        "f_init",
        "f_process",
        "f_version",
        "funcs",
        "in_cap",
        "in_ptr",
        "memory",
        "store",
        "view",
        "view_len",
    )

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None:
        self.store = store
        self.ctx = store._context()
        exports = instance.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        funcs: dict[str, wasmtime.Func] = {}
        for fname in (*_EXPORTS, *_ENTRY_EXPORTS):
            f = exports.get(fname) if fname in _ENTRY_EXPORTS else exports[fname]
            if f is None:
                continue
            assert isinstance(f, wasmtime.Func)
            funcs[fname] = f
        self.funcs = funcs  # keeps the wasmtime_func_t structs the refs below point to alive
        self.f_version = _byref(funcs["flux_abi_version"]._func)
        self.f_alloc = _byref(funcs["flux_alloc"]._func)
        self.f_dealloc = _byref(funcs["flux_dealloc"]._func)
        self.f_init = _byref(funcs["flux_init"]._func)
        # None when the module does not export it (checked at load: at least one of the two)
        f_process, f_act = funcs.get("flux_process"), funcs.get("flux_act")
        self.f_process: Any = _byref(f_process._func) if f_process is not None else None
        self.f_act: Any = _byref(f_act._func) if f_act is not None else None
        self.in_ptr = 0
        self.in_cap = 0
        self.view: memoryview = memoryview(b"")
        self.view_len = 0
        self.refresh_view()

    def refresh_view(self) -> int:
        """Map the whole current memory. Valid until the store goes: memory never moves
        (``memory_may_move = False``) and never shrinks; it only grows past ``view_len``."""
        n = self.memory.data_len(self.store)
        if n != self.view_len:
            self.view.release()
            if n:
                base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
                self.view = memoryview((ctypes.c_ubyte * n).from_address(base)).cast("B")
            else:
                self.view = memoryview(b"")
            self.view_len = n
        return n

    def drop(self) -> None:
        self.view.release()
        self.view_len = 0
        self.funcs.clear()


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
        module: wasmtime.Module,
        limits: PluginLimits,
        config_json: bytes,
        wasi: bool,
    ) -> None:
        self.name = name
        self.path = path
        self.limits = limits
        self.stats = PluginStats()
        self._host = host
        self._config_json = config_json
        self._wasi = wasi
        self._logger = logging.getLogger(f"flux_edge.plugin.{name}")
        self._sink = _LogSink(self._logger)
        self._ticks = host.deadline_ticks(limits.timeout_s)
        self._init_ticks = host.deadline_ticks(max(limits.timeout_s, INIT_TIMEOUT_MIN))
        self._args = (_Raw * 2)()
        self._failures = 0  # consecutive failed calls
        self._last_failure = ""
        self._quarantined_until: float | None = None
        self._closed = False
        exported = {e.name for e in module.exports}
        self.has_process = "flux_process" in exported  # can normalize batches (process)
        self.has_act = "flux_act" in exported  # can answer commands (act)
        linker = wasmtime.Linker(host.engine)
        if wasi:
            linker.define_wasi()
            linker.allow_shadowing = True
            # A guest could block the thread in poll_oneoff (sleep) where no epoch deadline
            # reaches it: refuse it.
            i32 = wasmtime.ValType.i32()
            linker.define_func(
                _WASI_MODULE,
                "poll_oneoff",
                wasmtime.FuncType([i32, i32, i32, i32], [i32]),
                lambda *_: _WASI_ENOSYS,
            )
        log_type = wasmtime.FuncType([wasmtime.ValType.i32(), wasmtime.ValType.i32()], [])
        for lvl in LOG_LEVELS:
            linker.define_func(
                "flux", f"log_{lvl}", log_type, self._sink.callback(lvl), access_caller=True
            )
        try:
            self._pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(name, f"cannot link: {_first_line(exc)}") from None
        self._linker = linker
        try:
            self._inst: _Instance | None = self._instantiate()
        except _Fault as f:
            raise PluginLoadError(name, str(f)) from None

    # --- public ---------------------------------------------------------------------------------

    @property
    def quarantined(self) -> bool:
        until = self._quarantined_until
        return until is not None and self._host.clock() < until

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
            return self._fail_all(messages, "plugin is closed", indices)
        if not self.has_process:
            return self._fail_all(
                messages, "the plugin does not export flux_process (it only acts)", indices
            )
        until = self._quarantined_until
        if until is not None:
            now = self._host.clock()
            if now < until:
                return self._fail_all(messages, self._quarantine_text(until - now), indices)
        t0 = time.perf_counter()
        try:
            data = encode_batch(messages)
        except BatchEncodeError:
            return self._process_encodable(messages, indices)
        mark = len(indices) if indices is not None else 0
        try:
            inst = self._inst
            if inst is None:
                inst = self._recycle()
            out = self._call_process(inst, data)
            result, errors = decode_output_counted(out, messages, self.name, indices=indices)
        except _Fault as f:
            result = self._failed(messages, f, indices, mark)
        except PluginABIError as exc:
            result = self._failed(messages, _Fault("abi", _abi_text(exc, self.name)), indices, mark)
        else:
            self._failures = 0
            if until is not None:
                self._quarantined_until = None
                self._logger.info("plugin %r works again after its quarantine", self.name)
            stats.errors += errors
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
        until = self._quarantined_until
        if until is not None:
            now = self._host.clock()
            if now < until:
                raise PluginQuarantined(self.name, self._quarantine_text(until - now))
        stats = self.stats
        t0 = time.perf_counter()
        try:
            data = encode_command(command)
        except (TypeError, msgspec.EncodeError) as exc:
            raise PluginError(self.name, f"cannot pass the command to the plugin: {exc}") from None
        try:
            inst = self._inst
            if inst is None:
                inst = self._recycle()
            out = self._call_entry(inst, inst.f_act, "flux_act", data, "the command")
        except _Fault as f:
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
        self._failures = 0
        if until is not None:
            self._quarantined_until = None
            self._logger.info("plugin %r works again after its quarantine", self.name)
        return out

    def close(self) -> None:
        """Free the input buffer and drop the instance. Later calls give error records."""
        if self._closed:
            return
        self._closed = True
        inst = self._inst
        self._inst = None
        if inst is not None:
            if inst.in_ptr:
                with suppress(_Fault):
                    self._dealloc(inst, inst.in_ptr, inst.in_cap)
            inst.drop()

    def __enter__(self) -> Plugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Plugin {self.name!r} {self.path}>"

    # --- calls into the guest -------------------------------------------------------------------

    def _invoke(self, inst: _Instance, fref: Any, args: Any, ticks: int) -> None:
        """Call a guest export through the C API; raise _Fault on trap/time-out/error.

        ``args`` is the 2-slot argument/result array: wasmtime requires its length to be at
        least max(params, results) of the function (a shorter one aborts the process); every
        ABI export has at most 2 of each, as checked at load time.
        """
        host = self._host
        _set_deadline(inst.ctx, ticks)
        trap = _TrapPtr()
        host._active += 1
        if not host._wake.is_set():
            host._wake.set()
        try:
            err = _call_unchecked(inst.ctx, fref, args, 2, _byref(trap))
        finally:
            host._active -= 1
        if err or trap:
            self._raise_fault(inst, err, trap, ticks)

    def _raise_fault(self, inst: _Instance, err: Any, trap: Any, ticks: int) -> None:
        # A Python exception raised in a host import (our log callbacks) is parked by
        # wasmtime-py in a global; consume it so it cannot surface in an unrelated call.
        pyexc = _wfunc.LAST_EXCEPTION
        _wfunc.LAST_EXCEPTION = None
        sink = self._sink
        abi = sink.abi_error
        sink.abi_error = None
        if err:
            error = wasmtime.WasmtimeError._from_ptr(err)
            if trap:
                wasmtime.Trap._from_ptr(trap)  # free it
            if abi is not None:
                raise _Fault("abi", abi)
            if isinstance(error, wasmtime.ExitTrap):
                raise _Fault("trap", f"trap: the guest called proc_exit({error.code})")
            if pyexc is not None:
                raise _Fault("error", f"host import failed: {type(pyexc).__name__}: {pyexc}")
            raise _Fault("error", f"wasmtime error: {_first_line(error)}")
        t = wasmtime.Trap._from_ptr(trap)
        if abi is not None:
            raise _Fault("abi", abi)
        code = t.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            secs = (ticks - 1) * self._host.epoch_tick
            raise _Fault("timeout", f"timed out after {secs * 1000:g} ms")
        if pyexc is not None and not isinstance(pyexc, _LogAbort):
            raise _Fault("error", f"host import failed: {type(pyexc).__name__}: {pyexc}")
        what = code.name.lower().replace("_", " ") if code is not None else _first_line(t)
        where = ""
        with suppress(wasmtime.WasmtimeError, ValueError):
            frames = t.frames
            if frames and frames[0].func_name:
                where = f" in {frames[0].func_name}"
        text = f"trap: {what}{where}"
        limit = self.limits.memory_limit
        with suppress(wasmtime.WasmtimeError, ValueError):
            if inst.memory.data_len(inst.store) + 65536 > limit:
                text += f" (linear memory is at its limit of {_size(limit)})"
        raise _Fault("trap", text)

    def _alloc(self, inst: _Instance, size: int, ticks: int) -> int:
        args = self._args
        args[0].i32 = size
        self._invoke(inst, inst.f_alloc, args, ticks)
        ptr: int = args[0].i32 & 0xFFFFFFFF
        if ptr == 0:
            raise _Fault("abi", f"ABI error: flux_alloc({size}) returned 0 (guest out of memory)")
        if ptr + size > inst.view_len and ptr + size > inst.refresh_view():
            raise _Fault(
                "abi",
                f"ABI error: flux_alloc({size}) returned {ptr}, outside the guest's "
                f"{inst.view_len}-byte memory",
            )
        return ptr

    def _dealloc(self, inst: _Instance, ptr: int, size: int) -> None:
        args = self._args
        args[0].i32 = ptr
        args[1].i32 = size
        self._invoke(inst, inst.f_dealloc, args, self._ticks)

    def _call_process(self, inst: _Instance, data: bytes) -> bytes:
        return self._call_entry(inst, inst.f_process, "flux_process", data, "the batch")

    def _call_entry(self, inst: _Instance, fref: Any, fname: str, data: bytes, what: str) -> bytes:
        need = len(data)
        if need > inst.in_cap:
            self._grow_input(inst, need)
        p = inst.in_ptr
        inst.view[p : p + need] = data
        args = self._args
        args[0].i32 = p
        args[1].i32 = need
        self.stats.calls += 1
        self._sink.last_error = None
        self._invoke(inst, fref, args, self._ticks)
        r: int = args[0].i64
        if r < 0:
            last = self._sink.last_error
            raise _Fault(
                "refused",
                f"{fname} failed {what} (returned {r})" + (f": {last}" if last else ""),
            )
        out_ptr = r >> 32
        out_len = r & 0xFFFFFFFF
        if out_len == 0:
            return b""
        end = out_ptr + out_len
        if end > inst.view_len and end > inst.refresh_view():
            raise _Fault(
                "abi",
                f"ABI error: output (ptr={out_ptr}, len={out_len}) is outside the guest's "
                f"{inst.view_len}-byte memory",
            )
        return inst.view[out_ptr:end].tobytes()

    def _grow_input(self, inst: _Instance, need: int) -> None:
        if inst.in_ptr:
            old, old_cap = inst.in_ptr, inst.in_cap
            inst.in_ptr = inst.in_cap = 0
            self._dealloc(inst, old, old_cap)
        cap = max(4096, 1 << (need - 1).bit_length())
        inst.in_ptr = self._alloc(inst, cap, self._ticks)
        inst.in_cap = cap

    # --- lifecycle ------------------------------------------------------------------------------

    def _instantiate(self) -> _Instance:
        """Fresh Store + Instance, ABI version check, flux_init. Raises _Fault."""
        host = self._host
        store = wasmtime.Store(host.engine)
        store.set_limits(memory_size=self.limits.memory_limit)
        if self._wasi:
            wcfg = wasmtime.WasiConfig()
            wcfg.stdout_custom = self._sink.stream(logging.INFO)
            wcfg.stderr_custom = self._sink.stream(logging.WARNING)
            store.set_wasi(wcfg)
        store.set_epoch_deadline(self._init_ticks)
        self._sink.last_error = None
        try:
            with host._busy():
                instance = self._pre.instantiate(store)
        except _LogAbort:
            raise _Fault("abi", self._sink.abi_error or "ABI error in a log call") from None
        except wasmtime.Trap as exc:
            code = exc.trap_code
            if code == wasmtime.TrapCode.INTERRUPT:
                raise _Fault("timeout", "instantiation (start function) timed out") from None
            raise _Fault("trap", f"cannot instantiate: trap: {_first_line(exc)}") from None
        except wasmtime.WasmtimeError as exc:
            text = _first_line(exc)
            if "memory" in text:
                text += f" (memory_limit is {_size(self.limits.memory_limit)})"
            raise _Fault("error", f"cannot instantiate: {text}") from None
        finally:
            self._sink.abi_error = None
        inst = _Instance(store, instance)
        try:
            args = self._args
            self._invoke(inst, inst.f_version, args, self._init_ticks)
            version = args[0].i32
            if version != ABI_VERSION:
                raise _Fault(
                    "refused",
                    f"flux_abi_version() returned {version}; this host speaks ABI "
                    f"{ABI_VERSION} (docs/plugin-abi.md)",
                )
            cfg = self._config_json
            ptr = self._alloc(inst, max(1, len(cfg)), self._init_ticks)
            inst.view[ptr : ptr + len(cfg)] = cfg
            args[0].i32 = ptr
            args[1].i32 = len(cfg)
            self._sink.last_error = None
            self._invoke(inst, inst.f_init, args, self._init_ticks)
            rc = args[0].i32
            if rc != 0:
                last = self._sink.last_error
                raise _Fault(
                    "refused",
                    f"flux_init refused the config with code {rc}"
                    + (f": {last}" if last else " (the plugin logged no error)"),
                )
            args[0].i32 = ptr
            args[1].i32 = max(1, len(cfg))
            self._invoke(inst, inst.f_dealloc, args, self._init_ticks)
        except _Fault as f:
            inst.drop()
            if f.kind == "refused":
                raise
            raise _Fault(f.kind, f"initialisation failed: {f}") from None
        return inst

    def _recycle(self) -> _Instance:
        self.stats.recycles += 1
        self._logger.debug("plugin %r: recycling its instance", self.name)
        inst = self._instantiate()
        self._inst = inst
        return inst

    def _failed(
        self,
        messages: Sequence[Reading | Measurement],
        fault: _Fault,
        indices: list[int] | None,
        mark: int,
    ) -> list[Measurement | ErrorRecord]:
        """A whole call failed: discard the instance, count, maybe quarantine."""
        if indices is not None:
            del indices[mark:]
        return self._fail_all(messages, self._record_failure(fault), indices)

    def _record_failure(self, fault: _Fault) -> str:
        """Discard the instance, count the failure, maybe quarantine; returns the message."""
        stats = self.stats
        stats.failures += 1
        if fault.kind == "trap":
            stats.traps += 1
        elif fault.kind == "timeout":
            stats.timeouts += 1
        elif fault.kind == "abi":
            stats.abi_errors += 1
        inst = self._inst
        self._inst = None
        if inst is not None:
            inst.drop()
        msg = str(fault)
        self._failures += 1
        self._last_failure = msg
        # _failures is reset only by a successful call, so a failed trial after a quarantine
        # quarantines again at once.
        if self._failures >= self.limits.max_failures:
            self._quarantined_until = self._host.clock() + self.limits.quarantine_s
            stats.quarantines += 1
            self._logger.error(
                "plugin %r quarantined for %g s after %d consecutive failed call(s); last: %s",
                self.name,
                self.limits.quarantine_s,
                self._failures,
                msg,
            )
        else:
            self._logger.warning("plugin %r: call failed: %s", self.name, msg)
        return msg

    def _quarantine_text(self, remaining: float) -> str:
        until = time.strftime("%H:%M:%S", time.gmtime(time.time() + remaining))
        return (
            f"quarantined until {until}Z after {self._failures} consecutive failed call(s) "
            f"(last: {self._last_failure})"
        )

    def _fail_all(
        self,
        messages: Sequence[Reading | Measurement],
        error: str,
        indices: list[int] | None,
    ) -> list[Measurement | ErrorRecord]:
        name = self.name
        self.stats.errors += len(messages)
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
        self.stats.errors += len(bad)
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


def _first_line(exc: BaseException) -> str:
    """wasmtime errors carry a backtrace; keep the cause, on one line."""
    text = str(exc).strip()
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if "Caused by:" in lines:
        k = lines.index("Caused by:")
        return "; ".join(lines[k + 1 :]) or lines[0]
    return lines[0] if lines else type(exc).__name__


def _abi_text(exc: PluginABIError, name: str) -> str:
    text = str(exc)
    prefix = f"plugin {name!r}: "
    return "ABI error: " + (text[len(prefix) :] if text.startswith(prefix) else text)


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} bytes"
