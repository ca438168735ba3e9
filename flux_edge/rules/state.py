"""Durable rule state: ``<state_dir>/rules.sqlite`` (SQLite, WAL, synchronous=NORMAL).

What is kept, per (rule, device): when the rule's condition became true (``since``, the start of
a ``for`` period), whether the rule is on (edge state / hysteresis latch), when it last fired
(cooldown) and when a deferred firing is due (``due``). All times are on the engine's duration
clock (``time.monotonic``: a wall clock that jumps moves no timer), with the boot they belong to
and the time of the last write in ``meta`` (schema 2). Within one boot a daemon restart counts
the time it was down (a ``for`` period that started before a restart ends at its original
deadline); after a reboot the times are shifted so what had elapsed at the last write is kept
(the time the gateway was off is unknowable without a trusted clock; timers then end late, never
early). Schema 1 (wall-clock times, no meta) is migrated (``flux_edge.state.versions``).

Rows are keyed by rule name *and* a digest of the rule's definition (its conditions, mode,
device, ``for`` and inputs): the state of a rule that was removed or whose condition changed is
discarded at start (``RuleStore.retain``).

Writes happen on state *changes* only, one transaction per engine call. WAL with
``synchronous=NORMAL`` keeps a committed change across a crash of the daemon and, at worst, loses
the last transactions on a power cut (the database itself stays consistent). SQLite's automatic
checkpoint (which fsyncs, 10-100 ms on an SD card) is off: the runtime calls ``checkpoint()``
every few seconds from a worker thread, so the event loop never waits on the card.

A file that is not a flux-edge rule-state database, or is corrupt, is logged, renamed aside
(``rules.sqlite.corrupt-<unix time>``) and replaced by a fresh one: the daemon never refuses to
start because of it. A failed write is logged (once until a write succeeds again) and counted
in ``write_errors``; the engine keeps running on its in-memory state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from flux_edge.errors import FluxError, StateError
from flux_edge.files import ensure_dir, prepare_sqlite
from flux_edge.state.clock import boot_id, carry_offset
from flux_edge.state.faults import Backoff, StoreHealth
from flux_edge.state.versions import Schema, open_versioned

__all__ = ["STATE_FILE", "RuleStore", "StateRecord"]

log = logging.getLogger("flux_edge.rules")

STATE_FILE: Final = "rules.sqlite"
_APPLICATION_ID: Final = 0x464C5852  # "FLXR"
_SCHEMA_VERSION: Final = 2  # 1 (010f980): wall-clock times; 2: duration-clock times + meta
_COLUMNS: Final = ("rule", "digest", "device", "since", "on_", "last_fire", "due")
_RETRY_FIRST: Final = 0.5  # seconds before a failed write is tried again (doubling)
_RETRY_MAX: Final = 30.0


def _connect(path: Path) -> sqlite3.Connection:
    # a short busy timeout: the engine runs on the event loop, and only a second daemon on
    # the same state directory (a misconfiguration) would hold the write lock
    prepare_sqlite(path)  # no symlink at it or its -wal/-shm; created 0640
    return sqlite3.connect(path, timeout=0.2, isolation_level=None, check_same_thread=False)


def _validate(db: sqlite3.Connection) -> str:
    cols = tuple(r[1] for r in db.execute("PRAGMA table_info(rule_state)"))
    return "" if cols == _COLUMNS else f"unexpected rule_state columns {cols}"


def _count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM rule_state").fetchone()[0])


_META: Final = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_SHIFT: Final = (
    "UPDATE rule_state SET since = since + ?1, last_fire = last_fire + ?1, due = due + ?1"
)


def _stamp(db: sqlite3.Connection, at: float | None = None) -> None:
    """Say which boot's duration clock the times are on, and when they were last written."""
    db.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [("boot_id", boot_id()), ("at", repr(time.monotonic() if at is None else at))],
    )


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 1 kept wall-clock times; version 2 keeps duration-clock (monotonic) times and
    the boot they belong to."""
    db.execute(_META)
    db.execute(_SHIFT, (time.monotonic() - time.time(),))
    _stamp(db)


RULE_STATE_SCHEMA: Final = Schema(
    kind="rule state",
    application_id=_APPLICATION_ID,
    version=_SCHEMA_VERSION,
    create=(
        "CREATE TABLE rule_state (rule TEXT NOT NULL, digest TEXT NOT NULL, "
        "device TEXT NOT NULL, since REAL, on_ INTEGER NOT NULL, last_fire REAL, "
        "due REAL, PRIMARY KEY (rule, device));" + _META
    ),
    migrations={1: _v1_to_v2},
    tables=frozenset({"rule_state", "meta"}),
    init=_stamp,
    count=_count,
    validate=_validate,
)


@dataclass(frozen=True, slots=True)
class StateRecord:
    """The durable state of one rule for one device."""

    rule: str
    digest: str  # of the rule's definition: state of a changed rule is not restored
    device: str
    since: float | None = None  # the condition has been true since (wall clock)
    on: bool = False  # fired and not yet re-armed (edge state, hysteresis latch)
    last_fire: float | None = None  # for the cooldown
    due: float | None = None  # a pending firing (end of a `for` period or of a cooldown)

    @property
    def idle(self) -> bool:
        """Nothing worth keeping: the row can be deleted."""
        return self.since is None and not self.on and self.last_fire is None and self.due is None


class RuleStore:
    """The rule-state database. Not thread-safe: used from the engine's task only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.write_errors = 0
        self.writes = 0  # transactions committed (the runtime checkpoints when this moved)
        self._failing = False
        self.health = StoreHealth("rule_state", str(self.path))
        self.lost_at_open = 0  # states in a corrupt file moved aside at open
        # records whose write failed, by (rule, device): written with the next write or by the
        # retry timer, so a full disk delays the rule state instead of losing it
        self._pending: dict[tuple[str, str], StateRecord] = {}
        self._retry = Backoff(_RETRY_FIRST, _RETRY_MAX)
        self._retry_handle: asyncio.TimerHandle | None = None
        self._db = self._open()

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> RuleStore:
        """The store at ``<state_dir>/rules.sqlite`` (the directory is created if needed)."""
        directory = ensure_dir(state_dir)  # 0750; the database 0640, never through a link
        return cls(directory / STATE_FILE)

    # --- opening ---------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        try:
            opened = open_versioned(self.path, RULE_STATE_SCHEMA, _connect)
        except StateError:
            raise  # a newer schema: refuse rather than damage it (the message says what to do)
        except (OSError, sqlite3.Error, FluxError) as exc:
            self.health.failed(exc)
            log.error(
                "rule state %s cannot be created or opened (%s): rule state will not survive a "
                "restart; check that the state directory exists and is writable and has space",
                self.path, exc,
            )
            return None
        db = opened.db
        if opened.moved_aside is not None:
            self.lost_at_open = opened.lost or 0
            log.warning(
                "rule state %s is unusable (%s): moved aside to %s; starting with no rule "
                "state (%s rule/device state(s) lost: pending `for` timers, latches and "
                "cooldowns are reset)", self.path, opened.corrupt_reason, opened.moved_aside,
                "an unknown number of" if opened.lost is None else opened.lost,
            )
        if opened.migrated_from is not None:
            log.warning("rule state %s: migrated from schema version %d to %d (backup: %s)",
                        self.path, opened.migrated_from, RULE_STATE_SCHEMA.version,
                        opened.backup)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoint() does it, off the loop
            self._carry(db)
        except sqlite3.Error as exc:
            db.close()
            self.health.failed(exc)
            log.error("rule state %s cannot be used (%s): rule state will not survive a restart",
                      self.path, exc)
            return None
        return db

    def _carry(self, db: sqlite3.Connection) -> None:
        """Times written in another boot are shifted onto this boot's clock (keeping the time
        that had elapsed when they were last written), in one transaction with the new stamp."""
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        try:
            at = float(meta.get("at", "nan"))
        except ValueError:
            at = float("nan")
        now = time.monotonic()
        saved_boot = str(meta.get("boot_id", ""))
        if saved_boot and saved_boot == boot_id():
            return
        offset = 0.0 if math.isnan(at) else carry_offset(saved_boot, at, now)
        db.execute("BEGIN IMMEDIATE")
        try:
            if offset:
                db.execute(_SHIFT, (offset,))
            _stamp(db, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if offset:
            log.info("rule state %s: written in another boot; timers carried over with the "
                     "time elapsed before the restart (the time the gateway was off does not "
                     "count: no trusted clock)", self.path)

    # --- reading and writing ---------------------------------------------------------------------

    def load(self) -> list[StateRecord]:
        """Every stored record (none when the store could not be opened)."""
        if self._db is None:
            return []
        try:
            rows = self._db.execute(
                "SELECT rule, digest, device, since, on_, last_fire, due FROM rule_state"
            ).fetchall()
        except sqlite3.Error as exc:
            log.warning("rule state %s cannot be read (%s): starting fresh", self.path, exc)
            return []
        return [
            StateRecord(
                rule=str(r[0]),
                digest=str(r[1]),
                device=str(r[2]),
                since=_time(r[3]),
                on=bool(r[4]),
                last_fire=_time(r[5]),
                due=_time(r[6]),
            )
            for r in rows
        ]

    def retain(self, digests: dict[str, str]) -> int:
        """Delete the state of rules not in ``digests`` (rule -> digest of its definition) or
        whose digest differs. Returns how many rows were deleted."""
        if self._db is None:
            return 0
        stale = [
            (rec.rule, rec.device) for rec in self.load() if digests.get(rec.rule) != rec.digest
        ]
        if stale:
            self._write(
                lambda db: db.executemany(
                    "DELETE FROM rule_state WHERE rule = ? AND device = ?", stale
                )
            )
        return len(stale)

    def save(self, records: Iterable[StateRecord]) -> None:
        """Write these records (and any whose write failed before) in one transaction; an idle
        record deletes its row. A failed write keeps them for the next call or the retry timer
        (with back-off, while an event loop runs)."""
        if self._db is None:
            return
        pending = self._pending
        for rec in records:
            pending[(rec.rule, rec.device)] = rec
        if pending:
            self._write_pending()

    def _write_pending(self) -> None:
        pending = self._pending
        put = []
        drop = []
        for rec in pending.values():
            if rec.idle:
                drop.append((rec.rule, rec.device))
            else:
                put.append(
                    (rec.rule, rec.digest, rec.device, rec.since, int(rec.on), rec.last_fire,
                     rec.due)
                )

        def run(db: sqlite3.Connection) -> None:
            if put:
                db.executemany("INSERT OR REPLACE INTO rule_state VALUES (?,?,?,?,?,?,?)", put)
            if drop:
                db.executemany("DELETE FROM rule_state WHERE rule = ? AND device = ?", drop)
            db.execute("UPDATE meta SET value = ? WHERE key = 'at'", (repr(time.monotonic()),))

        if self._write(run):
            pending.clear()
        else:
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests): the next save() tries again
            return
        self._retry_handle = loop.call_later(self._retry.next(), self._retry_now)

    def _retry_now(self) -> None:
        self._retry_handle = None
        if self._db is not None and self._pending:
            self._write_pending()

    @property
    def pending(self) -> int:
        """Records waiting for a write that failed to be tried again."""
        return len(self._pending)

    def _write(self, run: Callable[[sqlite3.Connection], object]) -> bool:
        db = self._db
        if db is None:
            return False
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                run(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self.writes += 1
        except sqlite3.Error as exc:
            self.write_errors += 1
            if self.health.failed(exc):
                self._failing = True
                log.warning(
                    "rule state %s: write failed (%s: %s); the state is kept in memory and "
                    "written when writes work again (retried with back-off); it does not "
                    "survive a restart until then",
                    self.path, self.health.reason, exc,
                )
            return False
        self._retry.reset()
        if self.health.ok():
            log.warning("rule state %s: writing works again", self.path)
        self._failing = False
        return True

    def checkpoint(self) -> None:
        """Copy the WAL into the database and fsync it. Thread-safe (its own connection): the
        runtime calls it from a worker thread. Never raises; a failure is logged at debug (the
        next call retries; SQLite's WAL stays valid meanwhile)."""
        try:
            db = sqlite3.connect(self.path, timeout=1.0, check_same_thread=False)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()
        except sqlite3.Error as exc:
            log.debug("rule state %s: checkpoint failed: %s", self.path, exc)

    def close(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._db is not None and self._pending:
            self._write_pending()  # a last try
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
