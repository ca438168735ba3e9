"""The wasmtime adapter: the ONLY module of flux_edge that imports wasmtime.

Everything that touches wasmtime lives here: the engine and its settings, compiling,
(de)serialising and introspecting modules, linking the host imports, stores, instantiation,
the low-level call path, decoding a failed call, and the cached memoryview over guest memory.
What a failure *means* (fault kinds, messages, quarantine) is decided by the callers
(``instance.py``, ``quarantine.py``), which see only plain Python values.

Two things rely on wasmtime-py internals (wasmtime-py 50, pinned ``>=50,<51`` in pyproject.toml;
tests/unit/test_host.py covers both):

- ``wasmtime._bindings``: guest calls go through the C API ``wasmtime_func_call_unchecked`` with
  a preallocated argument array instead of ``Func.__call__``: measured ~4 us against ~35-55 us
  per call, because ``Func.__call__`` builds a ``FuncType`` and converts every value through
  ``Val``. It is safe because every export's signature is checked when the module is loaded (the
  "unchecked" part is only the argument types), and traps, time-outs and errors come back
  through the same trap/error pointers ``Func.__call__`` reads. The epoch deadline is set through
  the C API too (``Store.set_epoch_deadline`` costs a Python wrapper per call). The ``Func``'s
  ``_func`` struct and the store's ``_context()`` are the handles that call needs.
- ``wasmtime._func.LAST_EXCEPTION``: where wasmtime-py parks a Python exception raised in a host
  import (our log callbacks); the unchecked path never reads it, so :func:`describe_failure`
  consumes it, or it would surface in an unrelated call later.
- ``Error._from_ptr`` / ``Trap._from_ptr`` turn (and free) the C pointers the call returns.

Guest memory is read and written through one memoryview over the whole linear memory
(:meth:`GuestInstance.refresh_view`), valid because the engine is configured with
``memory_may_move = False``: memory never moves and never shrinks, it only grows.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _bindings as _wb  # private: the C API call path (module docstring)
from wasmtime import _func as _wfunc  # private: LAST_EXCEPTION (module docstring)

from flux_edge.errors import FluxError

# wasmtime types the other plugin modules name in annotations (no other use of wasmtime there)
Engine = wasmtime.Engine
Module = wasmtime.Module
Caller = wasmtime.Caller
Memory = wasmtime.Memory
Store = wasmtime.Store
InstancePre = wasmtime.InstancePre
Linker = wasmtime.Linker
WasmError = wasmtime.WasmtimeError  # compile, (de)serialise, link, instantiate errors

# --- low-level call path (see the module docstring) -----------------------------------------------

call_unchecked = _wb._wasmtime_func_call_unchecked
set_deadline = _wb._wasmtime_context_set_epoch_deadline
TrapPtr = ctypes.POINTER(_wb.wasm_trap_t)
Raw = _wb.wasmtime_val_raw_t
byref = ctypes.byref

WASI_MODULE = "wasi_snapshot_preview1"

# The engine configuration; every entry is part of the compiled-module cache key (cache.py).
ENGINE_SETTINGS: dict[str, object] = {
    "epoch_interruption": True,  # wall-time limits
    "cranelift_opt_level": "speed",  # wasmtime's default, written down for the key
    "memory_may_move": False,  # guest memory never moves: cached memoryviews stay valid
    "wasm_threads": False,  # no shared memories: a plugin is single-threaded
    # ABI v1 is one 32-bit linear memory (docs/plugin-abi.md). instance.check_memories refuses
    # the rest with a clear message first; these make the engine refuse it too. GC is off
    # because a GC heap is memory beside the linear memory that the budget would not see.
    "wasm_multi_memory": False,
    "wasm_memory64": False,
    "wasm_gc": False,
}


def new_args() -> Any:
    """The 2-slot argument/result array of :func:`call_unchecked` (one per plugin, reused)."""
    return (Raw * 2)()


def wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def new_engine() -> Engine:
    cfg = wasmtime.Config()
    for key, value in ENGINE_SETTINGS.items():
        setattr(cfg, key, value)
    return wasmtime.Engine(cfg)


# --- modules --------------------------------------------------------------------------------------


def compile_module(engine: Engine, data: bytes) -> Module:
    """Compile .wasm (or .wat) bytes; raises :data:`WasmError`."""
    return wasmtime.Module(engine, data)


def serialize(module: Module) -> bytes:
    return bytes(module.serialize())


def deserialize_file(engine: Engine, path: Path) -> Module:
    """A module written by :func:`serialize`; raises :data:`WasmError` if it is not one."""
    return wasmtime.Module.deserialize_file(engine, str(path))


def module_binary(data: bytes) -> bytes:
    """The binary form of a module given as .wasm or .wat bytes; raises :data:`WasmError`."""
    if data[:4] == b"\0asm":
        return data
    return bytes(wasmtime.wat2wasm(data.decode("utf-8", "replace")))


def sig(params: Sequence[object], results: Sequence[object]) -> str:
    """A function signature as the ABI checks write it: ``(i32, i32) -> (i64)``."""
    return f"({', '.join(map(str, params))}) -> ({', '.join(map(str, results))})"


def exports_of(module: Module) -> dict[str, tuple[str, str]]:
    """Every export: name -> (kind, signature); kind is memory | func | other, the signature
    is :func:`sig`'s for functions and empty otherwise."""
    found: dict[str, tuple[str, str]] = {}
    for e in module.exports:
        ty = e.type
        if isinstance(ty, wasmtime.MemoryType):
            found[e.name] = ("memory", "")
        elif isinstance(ty, wasmtime.FuncType):
            found[e.name] = ("func", sig(ty.params, ty.results))
        else:
            found[e.name] = ("other", "")
    return found


def imports_of(module: Module) -> list[tuple[str, str | None, str]]:
    """Every import: (module, name, signature); the signature is ``?`` for a non-function
    (wasmtime types the name as optional)."""
    out = []
    for imp in module.imports:
        ty = imp.type
        s = sig(ty.params, ty.results) if isinstance(ty, wasmtime.FuncType) else "?"
        out.append((imp.module, imp.name, s))
    return out


# --- linking, stores, instances -------------------------------------------------------------------


def link(
    engine: Engine,
    module: Module,
    log_imports: Mapping[str, Callable[[Caller, int, int], None]],
    *,
    wasi: bool,
    poll_oneoff_errno: int,
) -> tuple[Linker, InstancePre]:
    """Link ``flux.<name>`` (i32, i32) -> () host imports that get the caller (the log calls)
    and, with ``wasi``, WASI whose ``poll_oneoff`` returns ``poll_oneoff_errno``. Raises
    :data:`WasmError`. Keep the linker as long as the InstancePre: the callbacks live in
    wasmtime's global function table until it is freed."""
    linker = wasmtime.Linker(engine)
    if wasi:
        linker.define_wasi()
        linker.allow_shadowing = True
        # A guest could block the thread in poll_oneoff (sleep) where no epoch deadline
        # reaches it: refuse it.
        i32 = wasmtime.ValType.i32()
        linker.define_func(
            WASI_MODULE,
            "poll_oneoff",
            wasmtime.FuncType([i32, i32, i32, i32], [i32]),
            lambda *_: poll_oneoff_errno,
        )
    log_type = wasmtime.FuncType([wasmtime.ValType.i32(), wasmtime.ValType.i32()], [])
    for name, fn in log_imports.items():
        linker.define_func("flux", name, log_type, fn, access_caller=True)
    return linker, linker.instantiate_pre(module)


TABLE_ELEMENT_BYTES = 8  # what wasmtime stores per table element (Store.set_limits' docs)


def new_store(
    engine: Engine,
    memory_limit: int,
    deadline: int,
    wasi_streams: tuple[Callable[[bytes], int], Callable[[bytes], int]] | None,
    *,
    tables: int = 0,
    table_elements: int = 0,
) -> Store:
    """A store with one linear memory of at most ``memory_limit`` bytes, at most ``tables``
    tables of at most ``table_elements`` elements each (``memory.grow`` and ``table.grow``
    return -1 beyond; instantiating more fails), its epoch deadline armed; ``wasi_streams``
    (stdout, stderr writers) sets up WASI with nothing else granted."""
    store = wasmtime.Store(engine)
    store.set_limits(
        memory_size=memory_limit, table_elements=table_elements, tables=tables, memories=1
    )
    if wasi_streams is not None:
        wcfg = wasmtime.WasiConfig()
        wcfg.stdout_custom, wcfg.stderr_custom = wasi_streams
        store.set_wasi(wcfg)
    store.set_epoch_deadline(deadline)
    return store


class InstantiateFailed(FluxError):
    """Instantiation (the start function) failed; ``kind`` is interrupt | trap | error and
    ``text`` the cause on one line. Python exceptions raised by a host import propagate."""

    def __init__(self, kind: str, text: str) -> None:
        self.kind = kind
        self.text = text
        super().__init__(text)


def instantiate(pre: InstancePre, store: Store) -> GuestInstance:
    try:
        instance = pre.instantiate(store)
    except wasmtime.Trap as exc:
        kind = "interrupt" if exc.trap_code == wasmtime.TrapCode.INTERRUPT else "trap"
        raise InstantiateFailed(kind, first_line(exc)) from None
    except wasmtime.WasmtimeError as exc:
        raise InstantiateFailed("error", first_line(exc)) from None
    return GuestInstance(store, instance)


_REQUIRED = ("flux_abi_version", "flux_alloc", "flux_dealloc", "flux_init")
_OPTIONAL = ("flux_process", "flux_act")  # at least one of them, checked at load


class GuestInstance:
    """One Store + Instance: the C API refs of its ABI exports, its memory as a memoryview and
    the ABI input buffer (``in_ptr``, ``in_cap``). Discarded whole after any fault."""

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

    def __init__(self, store: Store, instance: wasmtime.Instance) -> None:
        self.store = store
        self.ctx = store._context()
        exports = instance.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        funcs: dict[str, wasmtime.Func] = {}
        for fname in (*_REQUIRED, *_OPTIONAL):
            f = exports.get(fname) if fname in _OPTIONAL else exports[fname]
            if f is None:
                continue
            assert isinstance(f, wasmtime.Func)
            funcs[fname] = f
        self.funcs = funcs  # keeps the wasmtime_func_t structs the refs below point to alive
        self.f_version = byref(funcs["flux_abi_version"]._func)
        self.f_alloc = byref(funcs["flux_alloc"]._func)
        self.f_dealloc = byref(funcs["flux_dealloc"]._func)
        self.f_init = byref(funcs["flux_init"]._func)
        # None when the module does not export it (checked at load: at least one of the two)
        f_process, f_act = funcs.get("flux_process"), funcs.get("flux_act")
        self.f_process: Any = byref(f_process._func) if f_process is not None else None
        self.f_act: Any = byref(f_act._func) if f_act is not None else None
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

    def memory_len(self) -> int:
        return self.memory.data_len(self.store)

    def drop(self) -> None:
        self.view.release()
        self.view_len = 0
        self.funcs.clear()


# --- a failed call --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallFailure:
    """What :func:`call_unchecked` reported, decoded (and its C objects freed).

    ``error``: wasmtime returned an error rather than a trap; then ``exit_code`` is set if the
    guest called WASI ``proc_exit``. ``interrupted``: the epoch deadline passed. ``text``: the
    error's first line, or what trapped (``unreachable``, ``memory out of bounds``...);
    ``where``: `` in <function>`` when known. ``host_exception``: a Python exception a host
    import raised during the call, if any.
    """

    error: bool
    exit_code: int | None
    interrupted: bool
    text: str
    where: str
    host_exception: BaseException | None


def describe_failure(err: Any, trap: Any) -> CallFailure:
    """Decode the error/trap pointers of a failed call; consumes wasmtime-py's parked host
    exception so it cannot surface in an unrelated call."""
    pyexc = _wfunc.LAST_EXCEPTION
    _wfunc.LAST_EXCEPTION = None
    if err:
        error = wasmtime.WasmtimeError._from_ptr(err)
        if trap:
            wasmtime.Trap._from_ptr(trap)  # free it
        code = error.code if isinstance(error, wasmtime.ExitTrap) else None
        return CallFailure(True, code, False, first_line(error), "", pyexc)
    t = wasmtime.Trap._from_ptr(trap)
    trap_code = t.trap_code
    if trap_code == wasmtime.TrapCode.INTERRUPT:
        return CallFailure(False, None, True, "interrupt", "", pyexc)
    what = trap_code.name.lower().replace("_", " ") if trap_code is not None else first_line(t)
    where = ""
    with suppress(wasmtime.WasmtimeError, ValueError):
        frames = t.frames
        if frames and frames[0].func_name:
            where = f" in {frames[0].func_name}"
    return CallFailure(False, None, False, what, where, pyexc)


def first_line(exc: BaseException) -> str:
    """wasmtime errors carry a backtrace; keep the cause, on one line."""
    text = str(exc).strip()
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if "Caused by:" in lines:
        k = lines.index("Caused by:")
        return "; ".join(lines[k + 1 :]) or lines[0]
    return lines[0] if lines else type(exc).__name__


# --- guest memory from inside a host import -------------------------------------------------------


def caller_memory(caller: Caller) -> tuple[Memory | None, int]:
    """The calling guest's exported memory (None if it has none) and its size in bytes."""
    mem = caller.get("memory")
    if isinstance(mem, wasmtime.Memory):
        return mem, mem.data_len(caller)
    return None, 0


def read_caller_memory(caller: Caller, mem: Memory, ptr: int, n: int) -> bytes:
    """``n`` bytes at ``ptr`` (bounds checked by the caller)."""
    base = ctypes.addressof(mem.data_ptr(caller).contents)
    return ctypes.string_at(base + ptr, n)
