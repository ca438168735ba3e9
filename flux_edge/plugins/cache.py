"""The compiled-module cache: in memory per host, and on disk in ``cache_dir``.

A module is compiled once per host (two instances of one plugin share it) and, with a
``cache_dir`` (the daemon uses ``<state_dir>/cache``), written there as
``<plugin>.<key>.<checksum>.cwasm``:

- key: SHA-256 of the engine key (wasmtime version, machine, every engine setting in
  ``ffi.ENGINE_SETTINGS``) and the SHA-256 of the module's bytes, cut to 32 hex digits; a new
  wasmtime, another machine, another setting or another .wasm gives another key, so the entry
  is never used for anything it was not compiled for;
- checksum: BLAKE2b-128 of the file's contents. A file that does not hash to its name (an SD
  card, a crash mid-write, a hand edit) or that wasmtime refuses is removed and recompiled;
- writes go to a temporary file, fsync'ed, then renamed; writing a plugin's entry removes its
  other ones (older builds), so the directory holds one file per plugin. Deleting it is safe.

Why ours and not wasmtime's own cache (``wasmtime.Config.cache`` in wasmtime-py 50, checked in
the installed package's ``_config.py``): it takes only ``True``, meaning wasmtime's default
directory under ``$XDG_CACHE_HOME`` or ``$HOME/.cache`` (on a gateway the service user's home,
so ``/var/lib/flux-edge/.cache/wasmtime``, whatever ``daemon.state_dir`` says; in tests and
``plugin run``, the developer's home), or the path of a TOML file we would have to write before
creating the engine to point it at ``<state_dir>/cache``. It also starts a background worker
thread that prunes and recompresses entries by its own count and size limits (one more thread
on a Pi; a plugin's old builds linger until a limit is reached instead of going at once), and
Python sees no hit or miss, so ``compiles`` / ``cache_hits`` (tests/unit/test_host.py,
tests/integration/test_reload.py) could not be kept. A hit here costs one file read, one hash
and ``Module.deserialize_file``: switching would gain nothing and lose those.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
from contextlib import suppress
from pathlib import Path

from flux_edge.errors import PluginLoadError
from flux_edge.plugins import ffi

log = logging.getLogger("flux_edge.plugins.host")  # the logger these messages always used


def engine_key() -> str:
    """What a compiled module depends on besides its bytes."""
    return "|".join(
        [
            f"wasmtime={ffi.wasmtime_version()}",
            f"machine={platform.machine()}",
            *(f"{k}={v}" for k, v in sorted(ffi.ENGINE_SETTINGS.items())),
        ]
    )


class ModuleCache:
    """Compiled modules of one engine; ``cache_dir`` None keeps them in memory only."""

    def __init__(self, engine: ffi.Engine, cache_dir: Path | None) -> None:
        self.engine = engine
        self.cache_dir = cache_dir
        self._engine_key = engine_key()
        self._modules: dict[str, ffi.Module] = {}
        self.compiles = 0  # modules compiled from .wasm bytes
        self.cache_hits = 0  # modules loaded from the on-disk cache

    def module(self, name: str, path: Path) -> ffi.Module:
        """The compiled module of ``path``; raises :class:`PluginLoadError`."""
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
                module = ffi.compile_module(self.engine, data)
            except ffi.WasmError as exc:
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

    def clear(self) -> None:
        """Forget the in-memory modules (the files stay)."""
        self._modules.clear()

    def _cache_prefix(self, name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] + "."

    def _load_cached(self, name: str, key: str) -> ffi.Module | None:
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
                module = ffi.deserialize_file(self.engine, path)
            except (OSError, ValueError, ffi.WasmError) as exc:
                log.warning("plugin %r: discarding corrupt cache file %s (%s)", name, path, exc)
                with suppress(OSError):
                    path.unlink()
                continue
            self.cache_hits += 1
            return module
        return None

    def _store_cached(self, name: str, key: str, module: ffi.Module) -> None:
        assert self.cache_dir is not None
        prefix = self._cache_prefix(name)
        tmp: Path | None = None
        try:
            blob = ffi.serialize(module)
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
        except (OSError, ffi.WasmError) as exc:
            log.warning("plugin %r: cannot write the compiled-module cache: %s", name, exc)
        finally:
            if tmp is not None:
                with suppress(OSError):
                    tmp.unlink()
