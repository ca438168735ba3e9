"""One plugin instance: its limits, epoch deadlines, memory cap, the calls into the guest and
recycling (docs/plugin-abi.md, "Lifecycle" and "Limits and failure").

:class:`PluginInstance` holds what outlives a guest instance (the linked module, the limits as
epoch ticks, the argument array, the log sink) and the current :class:`ffi.GuestInstance`, made
fresh by :meth:`PluginInstance.instantiate`: a Store capped at ``memory_limit`` whose calls are
interrupted after ``timeout_s`` (the host's epoch ticker), the ABI version check and
``flux_init``. Every guest call raises :class:`Fault` for what the guest did; the instance is then
discarded whole (its memory goes with it) and a fresh one is made before the next call. There is
no fuel: time is bounded by epoch interruption alone (cheaper: no per-instruction accounting).

Also here: what a module must export and may import (checked at load, so the unchecked call
path in ffi.py is safe), and what it declares (:func:`check_memories`: exactly one 32-bit
memory, its tables), from which :func:`memory_budget` splits the plugin's ``memory_limit``
between its linear memory and its tables (the store limits are per memory and per table, so
the sum is bounded by reserving each table's most elements up front).
"""

from __future__ import annotations

import logging
import math
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flux_edge.errors import FluxError, PluginLoadError
from flux_edge.plugins import ffi
from flux_edge.plugins.abi import ABI_VERSION
from flux_edge.plugins.logsink import LOG_LEVELS, LogAbort, LogSink
from flux_edge.plugins.quarantine import PluginStats

if TYPE_CHECKING:
    from flux_edge.plugins.host import PluginHost, PluginLimits

INIT_TIMEOUT_MIN = 1.0  # seconds: flux_init and instantiation get max(timeout, this)
WASI_ENOSYS = 52
PAGE = 65536  # bytes of one wasm page
TABLE_ELEMENTS_MIN = 4096  # elements a table may grow to at least (its declared size if more)

EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flux_abi_version": ((), ("i32",)),
    "flux_alloc": (("i32",), ("i32",)),
    "flux_dealloc": (("i32", "i32"), ()),
    "flux_init": (("i32", "i32"), ("i32",)),
}
# A plugin exports at least one of these: flux_process (normalize batches), flux_act (actions).
ENTRY_EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flux_process": (("i32", "i32"), ("i64",)),
    "flux_act": (("i32", "i32"), ("i64",)),
}


class Fault(FluxError):
    """A guest call failed; ``kind`` is trap | timeout | abi | refused | error."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


def deadline_ticks(seconds: float, epoch_tick: float) -> int:
    """Epoch ticks to arm so that a call is interrupted no earlier than ``seconds``."""
    return max(1, math.ceil(seconds / epoch_tick - 1e-9)) + 1


def check_exports(name: str, module: ffi.Module) -> None:
    found = ffi.exports_of(module)
    problems: list[str] = []
    mem = found.get("memory")
    if mem is None:
        problems.append("missing export `memory` (the guest's linear memory)")
    elif mem[0] != "memory":
        problems.append("export `memory` is not a memory")
    if not any(f in found for f in ENTRY_EXPORTS):
        problems.append(
            "missing export `flux_process` (i32, i32) -> (i64) or `flux_act` (i32, i32) -> (i64) "
            "(a plugin exports at least one of them)"
        )
    for fname, (params, results) in {**EXPORTS, **ENTRY_EXPORTS}.items():
        ty = found.get(fname)
        want = ffi.sig(params, results)
        if ty is None:
            if fname not in ENTRY_EXPORTS:
                problems.append(f"missing export `{fname}` {want}")
        elif ty[0] != "func":
            problems.append(f"export `{fname}` is not a function (expected {want})")
        elif ty[1] != want:
            problems.append(f"export `{fname}` has signature {ty[1]}, expected {want}")
    if problems:
        raise PluginLoadError(name, "; ".join(problems) + " (see docs/plugin-abi.md)")


def check_imports(name: str, module: ffi.Module, wasi: bool) -> None:
    problems: list[str] = []
    log_names = {f"log_{lvl}" for lvl in LOG_LEVELS}
    for imp_module, imp_name, sig in ffi.imports_of(module):
        what = f"{imp_module}.{imp_name}"
        if imp_module == "flux" and imp_name in log_names:
            if sig != "(i32, i32) -> ()":
                problems.append(f"import `{what}` must be a function (i32, i32) -> (), got {sig}")
        elif imp_module == ffi.WASI_MODULE:
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


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """What a module declares that the memory budget depends on: its tables' initial sizes
    (None when a table's declaration could not be read; the store limit still applies)."""

    tables: tuple[int | None, ...] = ()


def _leb(data: bytes, pos: int) -> tuple[int, int]:
    """An unsigned LEB128 at ``pos``: (value, next position). Raises IndexError at the end."""
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("LEB128 too long")


def check_memories(name: str, binary: bytes) -> ModuleShape:
    """Refuse a module that defines more than one memory, a 64-bit or a shared memory (ABI v1:
    exactly one 32-bit memory, docs/plugin-abi.md), and read its tables. Reads the section
    headers only; a module too broken to read is left to the compiler to report."""
    memories: list[int] = []  # the limits flags of each defined memory
    tables: list[int | None] = []
    try:
        if binary[:4] != b"\0asm":
            return ModuleShape()
        pos = 8
        end = len(binary)
        while pos < end:
            sid = binary[pos]
            size, body = _leb(binary, pos + 1)
            pos = body + size
            if sid == 5:  # memory section: vec(limits)
                count, p = _leb(binary, body)
                for _ in range(min(count, 2)):
                    flags = binary[p]
                    memories.append(flags)
                    _, p = _leb(binary, p + 1)  # min
                    if flags & 1:
                        _, p = _leb(binary, p)  # max
                memories.extend([0] * (count - len(memories)))
            elif sid == 4:  # table section: vec(tabletype)
                count, p = _leb(binary, body)
                readable = True
                for _ in range(count):
                    if not readable:
                        tables.append(None)
                        continue
                    ref = binary[p]
                    if ref in (0x63, 0x64):  # (ref null? heaptype)
                        _, p = _leb(binary, p + 1)
                    elif ref in (0x70, 0x6F):
                        p += 1
                    else:  # 0x40: a table with an initializer expression; stop reading sizes
                        readable = False
                        tables.append(None)
                        continue
                    flags = binary[p]
                    initial, p = _leb(binary, p + 1)
                    if flags & 1:
                        _, p = _leb(binary, p)
                    tables.append(initial)
    except (IndexError, ValueError):
        return ModuleShape(tuple(tables))
    problems = []
    if len(memories) > 1:
        problems.append(f"it defines {len(memories)} memories")
    if any(f & 4 for f in memories):
        problems.append("its memory is 64-bit (memory64)")
    if any(f & 2 for f in memories):
        problems.append("its memory is shared")
    if problems:
        raise PluginLoadError(
            name,
            "refused: "
            + " and ".join(problems)
            + "; ABI v1 allows exactly one 32-bit linear memory (docs/plugin-abi.md)",
        )
    return ModuleShape(tuple(tables))


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """How one plugin's ``memory_limit`` is spent: its linear memory may grow to ``memory``
    bytes, each of its ``tables`` tables to ``table_elements`` elements (8 bytes each)."""

    limit: int
    memory: int
    tables: int
    table_elements: int

    @property
    def table_bytes(self) -> int:
        return self.tables * self.table_elements * ffi.TABLE_ELEMENT_BYTES


def memory_budget(name: str, limit: int, shape: ModuleShape) -> MemoryBudget:
    """Split ``limit`` between the linear memory and the tables (every table's most elements
    reserved up front); raises :class:`PluginLoadError` when the tables alone do not fit."""
    sizes = [t for t in shape.tables if t is not None]
    elements = max([TABLE_ELEMENTS_MIN, *sizes]) if shape.tables else 0
    tables = len(shape.tables)
    reserve = tables * elements * ffi.TABLE_ELEMENT_BYTES
    memory = (limit - reserve) // PAGE * PAGE
    if memory < PAGE:
        raise PluginLoadError(
            name,
            f"refused: its {tables} table(s) of up to {elements} elements need "
            f"{size_text(reserve)} of its memory budget of {size_text(limit)} "
            "(memory_limit counts linear memory and tables, 8 bytes a table element)",
        )
    return MemoryBudget(limit, memory, tables, elements)


class PluginInstance:
    """The guest side of one :class:`~flux_edge.plugins.host.Plugin`. Not thread-safe.

    ``inst`` is the current guest instance, None after a fault until :meth:`recycle`.
    Raises :class:`PluginLoadError` if the module cannot be linked or the first instance
    cannot be made.
    """

    def __init__(
        self,
        host: PluginHost,
        name: str,
        module: ffi.Module,
        limits: PluginLimits,
        config_json: bytes,
        *,
        wasi: bool,
        stats: PluginStats,
        sink: LogSink,
        logger: logging.Logger,
        shape: ModuleShape | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.stats = stats
        self.budget = memory_budget(name, limits.memory_limit, shape or ModuleShape())
        self._max_output = limits.max_output_bytes
        self._host = host
        self._config_json = config_json
        self._wasi = wasi
        self._sink = sink
        self._logger = logger
        self._ticks = deadline_ticks(limits.timeout_s, host.epoch_tick)
        self._init_ticks = deadline_ticks(max(limits.timeout_s, INIT_TIMEOUT_MIN), host.epoch_tick)
        self._args = ffi.new_args()
        try:
            self._linker, self._pre = ffi.link(
                host.engine, module, sink.imports(), wasi=wasi, poll_oneoff_errno=WASI_ENOSYS
            )
        except ffi.WasmError as exc:
            raise PluginLoadError(name, f"cannot link: {ffi.first_line(exc)}") from None
        try:
            self.inst: ffi.GuestInstance | None = self.instantiate()
        except Fault as f:
            raise PluginLoadError(name, str(f)) from None

    # --- calls into the guest -------------------------------------------------------------------

    def invoke(self, inst: ffi.GuestInstance, fref: Any, args: Any, ticks: int) -> None:
        """Call a guest export through the C API; raise Fault on trap/time-out/error.

        ``args`` is the 2-slot argument/result array: wasmtime requires its length to be at
        least max(params, results) of the function (a shorter one aborts the process); every
        ABI export has at most 2 of each, as checked at load time.
        """
        host = self._host
        ffi.set_deadline(inst.ctx, ticks)
        trap = ffi.TrapPtr()
        # the host's epoch ticker runs while a call is active (inlined PluginHost._busy)
        host._active += 1
        if not host._wake.is_set():
            host._wake.set()
        try:
            err = ffi.call_unchecked(inst.ctx, fref, args, 2, ffi.byref(trap))
        finally:
            host._active -= 1
        if err or trap:
            self._raise_fault(inst, err, trap, ticks)

    def _raise_fault(self, inst: ffi.GuestInstance, err: Any, trap: Any, ticks: int) -> None:
        failure = ffi.describe_failure(err, trap)
        pyexc = failure.host_exception
        sink = self._sink
        abi = sink.abi_error
        sink.abi_error = None
        if abi is not None:
            raise Fault("abi", abi)
        if failure.error:
            if failure.exit_code is not None:
                raise Fault("trap", f"trap: the guest called proc_exit({failure.exit_code})")
            if pyexc is not None:
                raise Fault("error", f"host import failed: {type(pyexc).__name__}: {pyexc}")
            raise Fault("error", f"wasmtime error: {failure.text}")
        if failure.interrupted:
            secs = (ticks - 1) * self._host.epoch_tick
            raise Fault("timeout", f"timed out after {secs * 1000:g} ms")
        if pyexc is not None and not isinstance(pyexc, LogAbort):
            raise Fault("error", f"host import failed: {type(pyexc).__name__}: {pyexc}")
        text = f"trap: {failure.text}{failure.where}"
        with suppress(ffi.WasmError, ValueError):
            if inst.memory_len() + PAGE > self.budget.memory:
                text += f" (linear memory is at its limit of {self._memory_text()})"
        raise Fault("trap", text)

    def _memory_text(self) -> str:
        b = self.budget
        if not b.tables:
            return size_text(b.memory)
        return (
            f"{size_text(b.memory)}: the memory budget of {size_text(b.limit)} less "
            f"{size_text(b.limit - b.memory)} for its tables"
        )

    def alloc(self, inst: ffi.GuestInstance, size: int, ticks: int) -> int:
        args = self._args
        args[0].i32 = size
        self.invoke(inst, inst.f_alloc, args, ticks)
        ptr: int = args[0].i32 & 0xFFFFFFFF
        if ptr == 0:
            raise Fault("abi", f"ABI error: flux_alloc({size}) returned 0 (guest out of memory)")
        if ptr + size > inst.view_len and ptr + size > inst.refresh_view():
            raise Fault(
                "abi",
                f"ABI error: flux_alloc({size}) returned {ptr}, outside the guest's "
                f"{inst.view_len}-byte memory",
            )
        return ptr

    def dealloc(self, inst: ffi.GuestInstance, ptr: int, size: int) -> None:
        args = self._args
        args[0].i32 = ptr
        args[1].i32 = size
        self.invoke(inst, inst.f_dealloc, args, self._ticks)

    def call_process(self, inst: ffi.GuestInstance, data: bytes) -> bytes:
        return self.call_entry(inst, inst.f_process, "flux_process", data, "the batch")

    def call_act(self, inst: ffi.GuestInstance, data: bytes) -> bytes:
        return self.call_entry(inst, inst.f_act, "flux_act", data, "the command")

    def call_entry(
        self, inst: ffi.GuestInstance, fref: Any, fname: str, data: bytes, what: str
    ) -> bytes:
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
        self.invoke(inst, fref, args, self._ticks)
        r: int = args[0].i64
        if r < 0:
            last = self._sink.last_error
            raise Fault(
                "refused",
                f"{fname} failed {what} (returned {r})" + (f": {last}" if last else ""),
            )
        out_ptr = r >> 32
        out_len = r & 0xFFFFFFFF
        if out_len == 0:
            return b""
        end = out_ptr + out_len
        if end > inst.view_len and end > inst.refresh_view():
            raise Fault(
                "abi",
                f"ABI error: output (ptr={out_ptr}, len={out_len}) is outside the guest's "
                f"{inst.view_len}-byte memory",
            )
        if out_len > self._max_output:  # checked before the copy: nothing big is made
            raise Fault(
                "output_bytes",
                f"output limit: {fname} returned {out_len} bytes "
                f"(max_output_bytes is {self._max_output})",
            )
        self.stats.output_bytes += out_len
        return inst.view[out_ptr:end].tobytes()

    def _grow_input(self, inst: ffi.GuestInstance, need: int) -> None:
        if inst.in_ptr:
            old, old_cap = inst.in_ptr, inst.in_cap
            inst.in_ptr = inst.in_cap = 0
            self.dealloc(inst, old, old_cap)
        cap = max(4096, 1 << (need - 1).bit_length())
        inst.in_ptr = self.alloc(inst, cap, self._ticks)
        inst.in_cap = cap

    # --- lifecycle ------------------------------------------------------------------------------

    def instantiate(self) -> ffi.GuestInstance:
        """Fresh Store + Instance, ABI version check, flux_init. Raises Fault."""
        host = self._host
        sink = self._sink
        streams = (sink.stream(logging.INFO), sink.stream(logging.WARNING)) if self._wasi else None
        b = self.budget
        store = ffi.new_store(
            host.engine,
            b.memory,
            self._init_ticks,
            streams,
            tables=b.tables,
            table_elements=b.table_elements,
        )
        sink.last_error = None
        try:
            with host._busy():
                inst = ffi.instantiate(self._pre, store)
        except LogAbort:
            raise Fault("abi", sink.abi_error or "ABI error in a log call") from None
        except ffi.InstantiateFailed as exc:
            if exc.kind == "interrupt":
                raise Fault("timeout", "instantiation (start function) timed out") from None
            if exc.kind == "trap":
                raise Fault("trap", f"cannot instantiate: trap: {exc.text}") from None
            text = exc.text
            if "memory" in text:
                text += f" (linear memory may use {self._memory_text()})"
            elif "table" in text:
                text += (
                    f" (a table may hold {b.table_elements} elements, "
                    f"{ffi.TABLE_ELEMENT_BYTES} bytes each, within memory_limit)"
                )
            raise Fault("error", f"cannot instantiate: {text}") from None
        finally:
            sink.abi_error = None
        try:
            args = self._args
            self.invoke(inst, inst.f_version, args, self._init_ticks)
            version = args[0].i32
            if version != ABI_VERSION:
                raise Fault(
                    "refused",
                    f"flux_abi_version() returned {version}; this host speaks ABI "
                    f"{ABI_VERSION} (docs/plugin-abi.md)",
                )
            cfg = self._config_json
            ptr = self.alloc(inst, max(1, len(cfg)), self._init_ticks)
            inst.view[ptr : ptr + len(cfg)] = cfg
            args[0].i32 = ptr
            args[1].i32 = len(cfg)
            sink.last_error = None
            self.invoke(inst, inst.f_init, args, self._init_ticks)
            rc = args[0].i32
            if rc != 0:
                last = sink.last_error
                raise Fault(
                    "refused",
                    f"flux_init refused the config with code {rc}"
                    + (f": {last}" if last else " (the plugin logged no error)"),
                )
            args[0].i32 = ptr
            args[1].i32 = max(1, len(cfg))
            self.invoke(inst, inst.f_dealloc, args, self._init_ticks)
        except Fault as f:
            inst.drop()
            if f.kind == "refused":
                raise
            raise Fault(f.kind, f"initialisation failed: {f}") from None
        return inst

    def recycle(self) -> ffi.GuestInstance:
        """A fresh instance in place of the discarded one. Raises Fault."""
        self.stats.recycles += 1
        self._logger.debug("plugin %r: recycling its instance", self.name)
        inst = self.instantiate()
        self.inst = inst
        return inst

    def discard(self) -> None:
        """Drop the current instance (after a fault): its whole memory goes with it."""
        inst = self.inst
        self.inst = None
        if inst is not None:
            inst.drop()

    def close(self) -> None:
        """Free the input buffer and drop the instance."""
        inst = self.inst
        self.inst = None
        if inst is not None:
            if inst.in_ptr:
                with suppress(Fault):
                    self.dealloc(inst, inst.in_ptr, inst.in_cap)
            inst.drop()


def size_text(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} bytes"
