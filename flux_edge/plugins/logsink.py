"""The host side of the ``flux.log_*`` imports and of WASI stdout/stderr (docs/plugin-abi.md).

Five levels (trace is logged at level 5) to the plugin's own logger ``flux_edge.plugin.<name>``;
a message longer than :data:`LOG_CAP` bytes is cut (never inside a UTF-8 character) and marked
:data:`TRUNCATED`; invalid UTF-8 is replaced, never fatal; a pointer/length outside guest memory
traps the call as an ABI error; a token bucket (:data:`LOG_RATE` a second, bursts of
:data:`LOG_BURST`) drops and counts the excess. The last error-level message is kept for the
error text of a refused ``flux_init`` / failed ``flux_process``.

A guest's text never reaches a log line raw: control characters (C0, DEL, C1, so newlines and
ANSI escape sequences), the Unicode line and paragraph separators and the bidirectional
overrides are written as escapes (``\\n``, ``\\x1b``, ``\\u2028``; a backslash as ``\\\\``
only when the message has something to escape), so a plugin cannot forge a log line or
repaint a terminal. WASI stdout/stderr is logged one line per ``\\n``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flux_edge.errors import FluxError
from flux_edge.plugins import ffi

if TYPE_CHECKING:
    from flux_edge.plugins.quarantine import PluginStats

TRACE = 5
LOG_LEVELS = {"trace": TRACE, "debug": 10, "info": 20, "warn": 30, "error": 40}
LOG_CAP = 4096  # bytes of one guest log message
TRUNCATED = "…[truncated]"
LOG_RATE = 20  # guest log messages per second per plugin, on average
LOG_BURST = 200  # ... and in a burst; the rest is counted and reported as suppressed


# what escape_text rewrites: C0 controls, DEL, C1 controls, U+2028/2029, bidi embeddings,
# overrides and isolates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """Guest text made safe for one log line (module docstring); unchanged when it is."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_one, text.replace("\\", "\\\\"))


def plugin_logger(name: str) -> logging.Logger:
    """The logger of plugin ``name``: what it logs, and what the host says about it."""
    return logging.getLogger(f"flux_edge.plugin.{name}")


class LogAbort(FluxError):
    """Raised inside a host import to trap the guest's call (an ABI violation)."""


class LogSink:
    """Host side of the ``flux.log_*`` imports and of WASI stdout/stderr for one plugin.

    Holds no reference to the plugin (the callbacks live in wasmtime's global function table
    until the linker is freed, so a reference back would keep every plugin alive).
    """

    __slots__ = (
        "abi_error",
        "last_error",
        "logger",
        "stats",
        "suppressed",
        "tokens",
        "tokens_at",
    )

    def __init__(self, logger: logging.Logger, stats: PluginStats | None = None) -> None:
        self.logger = logger
        self.stats = stats  # logs_dropped counted there
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
            if self.stats is not None:
                self.stats.logs_dropped += 1
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

    def imports(self) -> dict[str, Callable[[ffi.Caller, int, int], None]]:
        """The ``flux`` module's imports: ``log_<level>`` -> callback."""
        return {f"log_{lvl}": self.callback(lvl) for lvl in LOG_LEVELS}

    def callback(self, level_name: str) -> Callable[[ffi.Caller, int, int], None]:
        level = LOG_LEVELS[level_name]
        logger = self.logger
        is_error = level >= logging.ERROR

        def log_import(caller: ffi.Caller, ptr: int, length: int) -> None:
            p = ptr & 0xFFFFFFFF
            n = length & 0xFFFFFFFF
            mem, size = ffi.caller_memory(caller)
            if p + n > size:
                self.abi_error = (
                    f"ABI error: flux.log_{level_name}(ptr={p}, len={n}) is outside the guest's "
                    f"{size}-byte memory"
                )
                raise LogAbort
            if not (is_error or logger.isEnabledFor(level)):
                return
            allowed = self._allow()
            if not (allowed or is_error):
                return
            assert mem is not None
            take = min(n, LOG_CAP)
            raw = ffi.read_caller_memory(caller, mem, p, take) if take else b""
            text = escape_text(cut_utf8(raw, take < n))
            if is_error:
                self.last_error = text
            if allowed:
                logger.log(level, "%s", text)

        return log_import

    def stream(self, level: int) -> Callable[[bytes], int]:
        """WASI stdout/stderr writes, logged line by line (each capped, escaped and rate
        limited like a log_* message)."""

        def write(data: bytes) -> int:
            if not self.logger.isEnabledFor(level):
                return len(data)
            for line in data.rstrip(b"\n").split(b"\n"):
                text = escape_text(cut_utf8(line[:LOG_CAP], len(line) > LOG_CAP))
                if text and self._allow():
                    if level >= logging.ERROR:
                        self.last_error = text
                    self.logger.log(level, "%s", text)
            return len(data)

        return write


def cut_utf8(raw: bytes, truncated: bool) -> str:
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
