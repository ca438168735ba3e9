"""Logging to stderr, readable by people and by journald.

Under systemd (JOURNAL_STREAM is set) each line starts with an sd-daemon priority prefix (``<4>``)
so journald records the level, and carries no timestamp (journald adds its own). Elsewhere lines
look like ``2026-11-28 05:40:27.123 INFO  flux_edge.runtime: pipeline running``.

Levels per logger come from a filter in the style of RUST_LOG, e.g. ``FLUX_EDGE_LOG=info,
plugin.modbus_decode=trace,source=debug``: a bare level sets the default; ``name=level`` sets
the level of ``flux_edge.<name>`` and everything below it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
# sd-daemon(3) priorities
_PRIORITY = {TRACE: 7, logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 2 if record.levelno >= logging.CRITICAL else 6)
        text = f"<{prio}>{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text.replace("\n", f"\n<{prio}>  ")


def parse_filter(spec: str) -> tuple[int, dict[str, int]]:
    """Parse ``info,plugin.x=trace`` into (default level, {logger name: level}).

    Raises ValueError naming the bad part.
    """
    default = logging.INFO
    per: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        name, sep, level = part.rpartition("=")
        key = level.strip().lower()
        if key not in _LEVELS:
            raise ValueError(
                f"bad log filter part {part!r}: level must be one of {', '.join(_LEVELS)}"
            )
        if not sep:
            default = _LEVELS[key]
        else:
            name = name.strip()
            full = name if name.startswith("flux_edge") else f"flux_edge.{name}"
            per[full] = _LEVELS[key]
    return default, per


def setup_logging(spec: str | None = None, *, stream: object = None) -> None:
    """Configure the root logger once for the process. ``spec`` defaults to $FLUX_EDGE_LOG."""
    if spec is None:
        spec = os.environ.get("FLUX_EDGE_LOG", "info")
    try:
        default, per = parse_filter(spec)
    except ValueError as exc:
        print(f"flux-edge: warning: FLUX_EDGE_LOG: {exc}; using 'info'", file=sys.stderr)
        default, per = logging.INFO, {}
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s")
        fmt.datefmt = "%Y-%m-%d %H:%M:%S"
        handler.setFormatter(fmt)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(default)
    # third-party libraries are noisy at info (pymodbus logs every reconnect): warnings only
    for noisy in ("pymodbus", "asyncio"):
        logging.getLogger(noisy).setLevel(max(default, logging.WARNING))
    for name, level in per.items():
        logging.getLogger(name).setLevel(level)


class RateLimitedLog:
    """At most one line per key per ``every`` seconds to ``logger``; the rest are counted.

    The first message of a key is logged at once; repeats within ``every`` seconds of the last
    line logged for that key are dropped and counted, and the count rides on the next line that
    is logged for the key: ``... (3 similar message(s) suppressed)``. ``level`` is the level of
    every line (``log(..., level=)`` overrides it per call); ``clock`` is injectable for tests.
    Messages take ``%``-style ``args`` like ``logging`` (formatted only when a line is logged).
    """

    __slots__ = ("_clock", "_last", "_logger", "_suppressed", "every", "level")

    def __init__(
        self,
        logger: logging.Logger,
        every: float,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.every = every
        self.level = level
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, msg: str, *args: object, level: int | None = None) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``every`` seconds ago (then
        count it). True when a line went to the logger."""
        return self._write(key, msg, args, self.level if level is None else level)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """``log`` at WARNING, whatever ``level`` is."""
        return self._write(key, msg, args, logging.WARNING)

    def _write(self, key: str, msg: str, args: tuple[object, ...], level: int) -> bool:
        now = self._clock()
        if now - self._last.get(key, -math.inf) < self.every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            msg = f"{msg} ({held} similar message(s) suppressed)"
        # stacklevel 3: the record names our caller's line, not this module
        self._logger.log(level, msg, *args, stacklevel=3)
        return True

    def reset(self, key: str) -> None:
        """Forget ``key``: its next message is logged at once (its suppressed count is dropped)."""
        self._last.pop(key, None)
        self._suppressed.pop(key, None)

    def suppressed(self, key: str) -> int:
        """Messages of ``key`` held back since its last line."""
        return self._suppressed.get(key, 0)
