"""Durable rule state: ``<state_dir>/rules.sqlite`` (SQLite, WAL, synchronous=NORMAL).

What is kept, per (rule, device): when the rule's condition became true (``since``, the start of
a ``for`` period), whether the rule is on (edge state / hysteresis latch), when it last fired
(cooldown) and when a deferred firing is due (``due``). All times are wall-clock seconds
(``time.time()``), so the time the daemon was down counts: a ``for`` period that started before a
restart ends at its original deadline.

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

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from flux_edge.files import ensure_dir, prepare_sqlite

__all__ = ["STATE_FILE", "RuleStore", "StateRecord"]

log = logging.getLogger("flux_edge.rules")

STATE_FILE: Final = "rules.sqlite"
_APPLICATION_ID: Final = 0x464C5852  # "FLXR"
_SCHEMA_VERSION: Final = 1
_COLUMNS: Final = ("rule", "digest", "device", "since", "on_", "last_fire", "due")


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
        self._db = self._open()

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> RuleStore:
        """The store at ``<state_dir>/rules.sqlite`` (the directory is created if needed)."""
        directory = ensure_dir(state_dir)  # 0750; the database 0640, never through a link
        return cls(directory / STATE_FILE)

    # --- opening ---------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        if not self.path.exists():
            try:
                return self._connect()
            except (OSError, sqlite3.Error, _Foreign) as exc:
                log.error(
                    "rule state %s cannot be created (%s): rule state will not survive a "
                    "restart; check that the state directory exists and is writable",
                    self.path,
                    exc,
                )
                return None
        try:
            return self._connect()
        except (sqlite3.DatabaseError, _Foreign) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning(
                "rule state %s is unusable (%s): moved aside to %s; starting with no rule "
                "state (pending `for` timers, latches and cooldowns are reset)",
                self.path,
                exc,
                aside,
            )
            try:
                os.replace(self.path, aside)
                for suffix in ("-wal", "-shm"):
                    side = self.path.with_name(self.path.name + suffix)
                    if side.exists():
                        os.replace(side, aside.with_name(aside.name + suffix))
                return self._connect()
            except (OSError, sqlite3.Error, _Foreign) as again:
                log.error(
                    "rule state %s cannot be recreated (%s): rule state will not survive a "
                    "restart; check the state directory's permissions and free space",
                    self.path,
                    again,
                )
                return None
        except OSError as exc:
            log.error(
                "rule state %s cannot be opened (%s): rule state will not survive a restart",
                self.path,
                exc,
            )
            return None

    def _connect(self) -> sqlite3.Connection:
        # a short busy timeout: the engine runs on the event loop, and only a second daemon on
        # the same state directory (a misconfiguration) would hold the write lock
        prepare_sqlite(self.path)  # no symlink at it or its -wal/-shm; created 0640
        db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None, check_same_thread=False)
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if app == 0 and not tables:  # a new, empty file
                db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                db.execute(
                    "CREATE TABLE rule_state (rule TEXT NOT NULL, digest TEXT NOT NULL, "
                    "device TEXT NOT NULL, since REAL, on_ INTEGER NOT NULL, last_fire REAL, "
                    "due REAL, PRIMARY KEY (rule, device))"
                )
            elif app != _APPLICATION_ID:
                raise _Foreign(f"not a flux-edge rule state file (application id {app:#x})")
            else:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version != _SCHEMA_VERSION:
                    raise _Foreign(f"rule state schema version {version}, expected 1")
                cols = tuple(r[1] for r in db.execute("PRAGMA table_info(rule_state)"))
                if cols != _COLUMNS:
                    raise _Foreign(f"unexpected rule_state columns {cols}")
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(f"integrity check: {check}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoint() does it, off the loop
        except BaseException:
            db.close()
            raise
        return db

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
        """Write these records in one transaction (an idle record deletes its row)."""
        if self._db is None:
            return
        put = []
        drop = []
        for rec in records:
            if rec.idle:
                drop.append((rec.rule, rec.device))
            else:
                put.append(
                    (
                        rec.rule,
                        rec.digest,
                        rec.device,
                        rec.since,
                        int(rec.on),
                        rec.last_fire,
                        rec.due,
                    )
                )
        if not put and not drop:
            return

        def run(db: sqlite3.Connection) -> None:
            if put:
                db.executemany("INSERT OR REPLACE INTO rule_state VALUES (?,?,?,?,?,?,?)", put)
            if drop:
                db.executemany("DELETE FROM rule_state WHERE rule = ? AND device = ?", drop)

        self._write(run)

    def _write(self, run: Callable[[sqlite3.Connection], object]) -> None:
        db = self._db
        if db is None:
            return
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
            if not self._failing:
                self._failing = True
                log.warning(
                    "rule state %s: write failed (%s); rule state may not survive a restart "
                    "until writes succeed again",
                    self.path,
                    exc,
                )
            return
        self._failing = False

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
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


class _Foreign(Exception):
    """The file is a database, but not ours (or of another schema version)."""


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
