"""Storage faults: what a failed write means, each store's health, and retry back-off.

Every durable store (the uplink outbox, the rule state, the audit log, the actuator state) keeps
one :class:`StoreHealth`. A write that fails marks it *degraded* with a short reason ("disk
full", "read-only", "I/O error", ...) and the error's text; the next successful write marks it
ok again. The runtime reads them for ``/healthz``, ``STATUS=`` and the
``flux_edge_store_degraded`` metric. A degraded store is not a stuck stage: the daemon is alive,
keeps the watchdog fed and retries on its own timer (:class:`Backoff`), because restarting it
would not free a single byte.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Backoff", "StoreHealth", "fault_reason"]

log = logging.getLogger("flux_edge.state")

_ERRNO_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk full",
    errno.EROFS: "read-only",
    errno.EIO: "I/O error",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "missing",
    errno.ENOTDIR: "missing",
}
_SQLITE_REASONS = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_CANTOPEN: "cannot open",
    sqlite3.SQLITE_CORRUPT: "corrupt",
    sqlite3.SQLITE_NOTADB: "corrupt",
    sqlite3.SQLITE_PERM: "permission denied",
    sqlite3.SQLITE_BUSY: "locked",
    sqlite3.SQLITE_LOCKED: "locked",
}


def fault_reason(exc: BaseException) -> str:
    """A short, stable reason for a storage error (a metric label): ``disk full``,
    ``read-only``, ``I/O error``, ``permission denied``, ``corrupt``, ``locked``, ... or
    ``error``. Follows ``__cause__`` (an UplinkError raised from a sqlite3 error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[seen.errno]
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            if isinstance(code, int) and code & 0xFF in _SQLITE_REASONS:
                return _SQLITE_REASONS[code & 0xFF]
            text = str(seen).lower()  # errors raised without a code (e.g. by the sqlite3 module)
            for words, reason in (("full", "disk full"), ("readonly", "read-only"),
                                  ("read-only", "read-only"), ("disk i/o", "I/O error"),
                                  ("malformed", "corrupt"), ("not a database", "corrupt")):
                if words in text:
                    return reason
        seen = seen.__cause__
    return "error"


@dataclass(slots=True)
class StoreHealth:
    """Whether one store's writes succeed. ``since`` is monotonic."""

    name: str  # "outbox", "rule_state", "audit", "actuator_state"
    path: str
    reason: str = ""  # "" while writes succeed
    detail: str = ""  # the last error's text
    since: float | None = None
    failures: int = 0  # failed writes, in total
    recoveries: int = 0  # times it went from degraded back to ok
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    @property
    def degraded(self) -> bool:
        return bool(self.reason)

    def failed(self, exc: BaseException) -> bool:
        """A write failed; True when this starts a degraded period (log it then)."""
        self.failures += 1
        reason = fault_reason(exc)
        self.detail = str(exc)
        started = not self.reason
        if started:
            self.since = self.clock()
        self.reason = reason
        return started

    def ok(self) -> bool:
        """A write succeeded; True when this ends a degraded period (log it then)."""
        if not self.reason:
            return False
        self.reason = ""
        self.detail = ""
        self.since = None
        self.recoveries += 1
        return True

    def describe(self) -> dict[str, object]:
        """For /healthz."""
        return {
            "path": self.path,
            "status": "degraded" if self.reason else "ok",
            "reason": self.reason,
            "error": self.detail,
            "degraded_for_s": None if self.since is None else round(self.clock() - self.since, 1),
            "failures": self.failures,
        }


class Backoff:
    """Retry delays that double from ``first`` up to ``limit``; :meth:`reset` after success."""

    __slots__ = ("attempts", "first", "limit")

    def __init__(self, first: float = 0.25, limit: float = 30.0) -> None:
        self.first = first
        self.limit = limit
        self.attempts = 0

    def next(self) -> float:
        delay = min(self.limit, self.first * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
