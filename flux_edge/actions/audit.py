"""The audit log: one JSON line per actuation attempt, append-only, rotated by size.

Record (one line, keys in this order)::

    {"ts": "2026-11-28T07:00:00.123Z", "unix": 1795849200.123, "rule": "overheat",
     "action": "burner_off", "actuator": "burner", "params": {},
     "cause": {"device": "boiler", "name": "temperature", "value": 82.5, "quality": "good",
               "ts": 1795849200.1, "unit": "°C"} | null,
     "decision": "allowed" | "blocked", "reason": "min_on: ...",
     "outcome": {"ok": true, "verified": true, "error": "", "latency_ms": 12.3} | null,
     "suppressed": 0}

``outcome`` is null for a blocked attempt. ``suppressed`` counts identical blocked attempts (same
rule, action and reason) that were not written since the last written one: a level rule firing on
every poll against a min_on block would otherwise write a line per poll; the first block is
written, repeats within ``suppress_window`` seconds are only counted, and the count rides on the
next written record of that rule and action.

Durability and the SD card: every record is one ``os.write`` of a complete line to a file opened
``O_APPEND``, so a record is never interleaved with another and a crash of the daemon loses
nothing that was written (the kernel holds it). A *power cut* loses what the kernel had not yet
written back. ``fsync`` after every record would close that gap, but on an SD card each fsync
forces a flash page program (wear; 10-100 ms stalls on cheap cards), so fsync is batched: at
most one per ``fsync_interval`` seconds (default 5 s) when a record arrives, run in a short-lived
worker thread on a duplicate of the descriptor so the event loop never waits for the card; plus
on rotation and ``close()`` (inline); ``sync()`` can be called from a periodic timer to bound
the window when no further record comes. So a power cut loses at most the records of the last
``fsync_interval`` seconds (or the kernel's writeback delay, typically 30 s, if no record follows);
``fsync_interval = 0`` syncs every record. A power cut in the middle of a write can leave a
partial last line: ``audit tail`` shows it as unreadable, and the next record starts on a new
line (also after a restart: a file not ending in a newline gets one first).

Rotation: before a record would take the file past ``max_size`` bytes, ``audit.jsonl`` becomes
``audit.jsonl.1``, ``.1`` becomes ``.2`` ... up to ``keep`` files (the oldest is deleted);
``keep = 0`` keeps no rotated file.

Disk errors (full, read-only, removed directory) never reach the caller: the record waits in
memory (up to ``PENDING_MAX`` records; past that the oldest are lost, counted in
``stats.errors``), ``health`` says the store is degraded and why, a warning is logged when
writing starts failing (then nothing until it works again, which is logged too), and the write
is retried on a timer with back-off (0.5 s doubling to 30 s) and with every new record
(re-opening the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from flux_edge.actions.templates import iso_utc
from flux_edge.files import ensure_dir, open_state_file
from flux_edge.model import Command, Outcome
from flux_edge.state.faults import Backoff, StoreHealth

__all__ = ["AuditLog", "AuditStats", "rotated_path"]

log = logging.getLogger("flux_edge.audit")

_encoder = msgspec.json.Encoder()
PENDING_MAX = 10_000  # audit records kept in memory while the disk fails


def rotated_path(path: Path, index: int) -> Path:
    """``audit.jsonl`` -> ``audit.jsonl.<index>`` (index 0: the live file)."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


@dataclass(slots=True)
class AuditStats:
    written: int = 0  # records written
    suppressed: int = 0  # identical blocked attempts counted, not written
    errors: int = 0  # records lost (disk errors past PENDING_MAX waiting, unencodable)
    rotations: int = 0
    fsyncs: int = 0
    last_error: str = ""


class AuditLog:
    """Append-only JSON Lines audit trail. Use from one thread (the event loop)."""

    def __init__(
        self,
        path: Path,
        *,
        max_size: int,
        keep: int,
        fsync_interval: float = 5.0,
        suppress_window: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.keep = max(keep, 0)
        self.fsync_interval = fsync_interval
        self.suppress_window = suppress_window
        self._clock = clock
        self._mono = monotonic
        self.stats = AuditStats()
        self._fd = -1
        self._size = 0
        self._dirty = False
        self._last_sync = -float("inf")
        self._failing = False
        self._broken_line = False  # a partial write left the file without a final newline
        # (rule, action) -> (reason, first block time, repeats not written)
        self._blocks: dict[tuple[str, str], tuple[str, float, int]] = {}
        self._closed = False
        self._syncing: threading.Thread | None = None  # a background fsync in progress
        self.health = StoreHealth("audit", str(self.path))
        self._pending: deque[bytes] = deque()  # lines not yet written (the disk failed)
        self._retry = Backoff(0.5, 30.0)
        self._retry_handle: asyncio.TimerHandle | None = None

    # --- writing ---------------------------------------------------------------------------------

    def record(
        self,
        cmd: Command,
        *,
        allowed: bool,
        reason: str = "",
        outcome: Outcome | None = None,
        actuator: str = "",
    ) -> None:
        """Write one attempt: ``allowed`` with its ``outcome`` (after the action ran), or
        blocked with the ``reason``. Never raises."""
        try:
            line = self._line(cmd, allowed, reason, outcome, actuator)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:  # an unencodable param
            self._fail(f"record of {cmd.action!r} could not be encoded: {exc}")
            return
        if line is not None:
            self._write(line)

    def _line(
        self, cmd: Command, allowed: bool, reason: str, outcome: Outcome | None, actuator: str
    ) -> bytes | None:
        now = self._clock()
        key = (cmd.rule, cmd.action)
        suppressed = 0
        prev = self._blocks.get(key)
        if not allowed:
            if prev is not None and prev[0] == reason and now - prev[1] < self.suppress_window:
                self._blocks[key] = (prev[0], prev[1], prev[2] + 1)
                self.stats.suppressed += 1
                return None
            self._blocks[key] = (reason, now, 0)
        else:
            self._blocks.pop(key, None)
        if prev is not None:
            suppressed = prev[2]
        m = cmd.cause
        cause = (
            None
            if m is None
            else {
                "device": m.device,
                "name": m.name,
                "value": m.value,
                "quality": m.quality,
                "ts": m.ts,
                "unit": m.unit,
            }
        )
        result: dict[str, Any] | None = None
        if outcome is not None:
            result = {
                "ok": outcome.ok,
                "verified": outcome.verified,
                "error": outcome.error,
                "latency_ms": round(outcome.latency_s * 1000, 3),
            }
        rec = {
            "ts": iso_utc(now),
            "unix": round(now, 6),
            "rule": cmd.rule,
            "action": cmd.action,
            "actuator": actuator,
            "params": cmd.params,
            "cause": cause,
            "decision": "allowed" if allowed else "blocked",
            "reason": reason,
            "outcome": result,
            "suppressed": suppressed,
        }
        return _encoder.encode(rec) + b"\n"

    def _write(self, line: bytes) -> None:
        if self._closed:
            self._fail("record after close()")
            return
        self._pending.append(line)
        self._write_pending()

    def _write_pending(self) -> None:
        """Write the records waiting, oldest first; on a disk error keep them (up to
        ``PENDING_MAX``, beyond that the oldest are lost and counted) and try again on a timer
        with back-off, or with the next record."""
        pending = self._pending
        while pending:
            try:
                self._write_one(pending[0])
            except OSError as exc:
                self._close_fd()
                self._write_failed(exc)
                while len(pending) > PENDING_MAX:
                    pending.popleft()
                    self.stats.errors += 1
                self._schedule_retry()
                return
            pending.popleft()
            self.stats.written += 1
        self._retry.reset()
        if self._failing:
            self._failing = False
            self.health.ok()
            log.warning("audit log %s: writing works again (%d record(s) lost)",
                        self.path, self.stats.errors)

    def _write_one(self, line: bytes) -> None:
        if self._fd < 0:
            self._open()
        data = b"\n" + line if self._broken_line else line
        if self._size > 0 and self._size + len(data) > self.max_size:
            self._rotate()
            data = line
        n = os.write(self._fd, data)
        self._size += max(n, 0)
        if n != len(data):
            self._broken_line = True
            raise OSError(errno.ENOSPC, f"short write: {n} of {len(data)} bytes (disk full?)")
        self._broken_line = False
        self._dirty = True
        if self._mono() - self._last_sync >= self.fsync_interval:
            if self.fsync_interval > 0:
                self._sync_in_background()
            else:
                self._sync()

    def _write_failed(self, exc: OSError) -> None:
        self.health.failed(exc)
        message = f"cannot write {self.path}: {exc.strerror or exc}"
        self.stats.last_error = message
        if not self._failing:
            self._failing = True
            log.warning("audit log: %s (%s); records wait in memory (up to %d) and are written "
                        "when this works again, retried with back-off", message,
                        self.health.reason, PENDING_MAX)

    def _schedule_retry(self) -> None:
        if self._retry_handle is not None and not self._retry_handle.cancelled():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the next record tries again
            return
        self._retry_handle = loop.call_later(self._retry.next(), self._retry_now)

    def _retry_now(self) -> None:
        self._retry_handle = None
        if not self._closed and self._pending:
            self._write_pending()

    @property
    def pending(self) -> int:
        """Records waiting for the disk."""
        return len(self._pending)

    def _fail(self, message: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = message
        log.warning("audit log: %s; the record is counted and lost", message)

    def _open(self) -> None:
        ensure_dir(self.path.parent)  # 0750; the log 0640, never through a link
        self._fd = open_state_file(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        self._size = os.fstat(self._fd).st_size
        # a power cut during a write may have left a partial last line
        self._broken_line = self._size > 0 and os.pread(self._fd, 1, self._size - 1) != b"\n"

    def _sync(self) -> None:
        if self._fd >= 0 and self._dirty:
            os.fsync(self._fd)
            self.stats.fsyncs += 1
            self._dirty = False
        self._last_sync = self._mono()

    def _sync_in_background(self) -> None:
        self._last_sync = self._mono()
        if self._fd < 0 or not self._dirty or self._syncing is not None:
            return
        fd = os.dup(self._fd)  # rotation or close may close ours meanwhile
        self._dirty = False

        def work() -> None:
            try:
                os.fsync(fd)
                self.stats.fsyncs += 1
            except OSError as exc:
                self._dirty = True  # retried with the next record
                log.warning("audit log: cannot fsync %s: %s", self.path, exc.strerror or exc)
            finally:
                os.close(fd)
                self._syncing = None

        self._syncing = threading.Thread(target=work, name="audit-fsync", daemon=True)
        self._syncing.start()

    def _rotate(self) -> None:
        self._sync()
        self._close_fd()
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.keep - 1, 0, -1):
                older = rotated_path(self.path, i)
                if older.exists():
                    os.replace(older, rotated_path(self.path, i + 1))
            os.replace(self.path, rotated_path(self.path, 1))
        self.stats.rotations += 1
        self._fd = open_state_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._size = 0
        self._broken_line = False

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    # --- lifecycle -------------------------------------------------------------------------------

    def sync(self) -> None:
        """fsync now if anything was written since the last one. Never raises."""
        try:
            self._sync()
        except OSError as exc:
            self._fail(f"cannot fsync {self.path}: {exc.strerror or exc}")

    def close(self) -> None:
        """fsync and close; later records are counted as errors. Idempotent."""
        if self._closed:
            return
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._pending:
            self._write_pending()  # a last try; what is left is lost (counted)
            self.stats.errors += len(self._pending)
            self._pending.clear()
        syncing = self._syncing
        if syncing is not None:
            syncing.join(10.0)
        self.sync()
        self._close_fd()
        self._closed = True
