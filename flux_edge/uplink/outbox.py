"""The durable outbox of the uplink: every measurement bound upstream, in a SQLite file, until the
upstream broker has acknowledged it.

File (``<state_dir>/outbox.sqlite`` unless ``uplink.outbox_file`` says otherwise)::

    meta(key, value)       outbox_id: 8 random hex digits made with the file; schema version
    counters(rows, bytes)  what the outbox table holds, kept in every write transaction, so
                           opening a 1 GB backlog does not scan it
    outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, size, ts, topic, payload)

``seq`` is never reused (AUTOINCREMENT), so ``"<outbox_id>-<seq>"`` names one measurement for good:
consumers de-duplicate on it (delivery is at-least-once). ``payload`` holds the record encoded once
at ``add()``, without its id and seq, which are spliced in front at send time (:func:`record`).
The topic is rendered at ``add()`` and stored per row.

Writes: ``add()`` only stages rows in memory; ``commit()`` writes everything staged (plus the
deletion of acknowledged rows) in ONE transaction. journal_mode=WAL, synchronous=NORMAL and no
automatic checkpoint: a commit appends to the WAL without fsync, so it survives a crash of the
process at once, and a power cut once :meth:`checkpoint` (run in a worker thread with its own
connection, see the sender) has synced the WAL.

Size bound: a row counts ``len(payload) + len(topic) + ROW_OVERHEAD`` bytes. When a commit would
take the total past ``max_size``, the oldest rows not yet handed to the sender (so never one in
flight) are deleted first, then, if that is not enough, the oldest of the rows being committed;
each one is counted in ``stats.dropped`` and logged (rate-limited warning with the total). The
file itself can grow to about twice ``max_size`` (SQLite page slack, free pages kept for reuse,
the WAL). Rows in flight are never dropped, so they can take the total past the bound by at most
``max_inflight`` publishes.

Reading: :meth:`take` hands the sender the next rows in ``seq`` order from a page buffer
(``PAGE_ROWS`` rows read at a time, so a large backlog never sits in memory); :meth:`acked`
records a delivered unit (its rows are deleted with the next commit or :meth:`delete_acked`);
:meth:`rewind` starts reading again from the oldest row after a failed publish.

Not thread-safe: everything but :meth:`checkpoint` runs on the event loop thread.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

import msgspec

from flux_edge.errors import FluxError, StateError, UplinkError
from flux_edge.files import ensure_dir, open_state_file
from flux_edge.model import Measurement
from flux_edge.mqtt import check_topic
from flux_edge.state.clock import SYSTEM_CLOCK, ClockSync
from flux_edge.state.faults import StoreHealth, fault_reason
from flux_edge.state.versions import open_versioned
from flux_edge.uplink.outbox_file import INSERTS as _INSERTS
from flux_edge.uplink.outbox_file import OUTBOX_SCHEMA
from flux_edge.uplink.outbox_file import connect as _connect
from flux_edge.uplink.rows import Row, Unit, UplinkStats, record
from flux_edge.uplink.topics import TemplateError, compile_topic

__all__ = [
    "OUTBOX_SCHEMA",
    "PAGE_ROWS",
    "ROW_OVERHEAD",
    "Outbox",
    "Row",
    "Unit",
    "UplinkStats",
    "record",
]

log = logging.getLogger("flux_edge.uplink")

ROW_OVERHEAD = 64  # bytes counted per row besides payload and topic (seq, size, ts, b-tree cell)
PAGE_ROWS = 500  # rows read from the file at a time
_DROP_LOG_EVERY = 10.0  # seconds between two "outbox full" warnings
# while the file cannot be written, staged records wait in memory up to this many bytes (or
# max_size, if smaller); past it the oldest are dropped, counted as "store_unavailable"
STAGED_MEMORY_MAX = 16 * 1024 * 1024
_TOPIC_CACHE_MAX = 10_000
_TOPIC_UNSAFE = str.maketrans({"+": "_", "#": "_", "\x00": "_"})


class Outbox:
    """The SQLite outbox (see the module docstring).

    ``where`` names the setting that chose the location, for error messages ("uplink.outbox_file"
    or "daemon.state_dir"). Raises :class:`UplinkError` when the location cannot be written or the
    file is used by another process; a corrupt file is renamed to ``<name>.corrupt-<unix time>``
    (an error is logged naming both paths) and a new one started.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_size: int,
        gateway: str,
        topic: str,
        where: str = "uplink.outbox_file",
        stats: UplinkStats | None = None,
        clock: Callable[[], float] = time.time,
        mode: str = "disk",
        spill_after: float = 5.0,
    ) -> None:
        if mode not in ("disk", "memory"):
            raise ValueError(f"outbox mode {mode!r}: 'disk' or 'memory'")
        self.path = Path(path)
        self.mode = mode
        self.spill_after = spill_after
        self.max_size = max_size
        self.gateway = gateway
        self.topic_template = topic
        self.where = where
        try:
            self._topic_tpl = compile_topic(topic)
        except TemplateError as exc:
            raise UplinkError(f"uplink.topic {topic!r}: bad placeholder: {exc}") from exc
        self.stats = stats if stats is not None else UplinkStats()
        self.health = StoreHealth("outbox", str(self.path))
        self.memory_max = min(max_size, STAGED_MEMORY_MAX)
        self._clock = clock
        self._lock_fd = -1
        self._ckpt: sqlite3.Connection | None = None  # the checkpoint thread's connection
        self._closed = False
        # staging
        self._staged: list[tuple[int, float, str, bytes]] = []
        self._staged_bytes = 0
        self._enc = msgspec.json.Encoder()
        self._gw_prefix = b'"gateway":' + self._enc.encode(gateway) + b","
        # while the wall clock is not known to be right, records say so ("clock":"unsynced")
        self._gw_prefix_unsynced = self._gw_prefix + b'"clock":"unsynced",'
        self.clock_sync: ClockSync | None = SYSTEM_CLOCK
        self._topics: dict[tuple[str, str, str], tuple[str, int] | None] = {}
        # reading and acknowledgements
        self._cursor = 0  # last seq handed to the sender
        self._read_pos = 0  # last seq read into the page buffer (>= cursor)
        self._buffer: deque[Row] = deque()
        self._acked: list[list[int]] = []  # [first, last] ranges acknowledged, not yet deleted
        self._acked_max = 0
        self._acked_rows = 0
        self._acked_bytes = 0
        # what the outbox table holds (mirror of the counters row)
        self._db_rows = 0
        self._db_bytes = 0
        self.dirty = False  # committed since the last complete checkpoint
        self._drop_log_ts = -float("inf")
        self._drops_unlogged = 0
        self.lost_at_open = 0  # records in a corrupt file moved aside at open
        # memory mode: the rows live in an in-memory copy while the uplink keeps up
        self._file_db: sqlite3.Connection | None = None  # the file, while in memory
        # in memory: (last seq, monotonic time) of each commit, to tell the oldest record's age
        self._commit_times: deque[tuple[int, float]] = deque()
        self.spills = 0  # times the backlog was written to the file

        self._lock()
        try:
            self._db = self._open()
        except BaseException:
            self._unlock()
            raise
        if mode == "memory":
            self._memory_epoch_check()
        self.outbox_id: str = self._db.execute(
            "SELECT value FROM meta WHERE key = 'outbox_id'"
        ).fetchone()[0]
        self._oid = self.outbox_id.encode()
        if self._db_bytes > max_size:  # the bound was lowered since the last run
            try:
                self._begin()
                dropped, freed, _last = self._drop_oldest(self._db_bytes - max_size)
                self._write_counters(self._db_rows - dropped, self._db_bytes - freed)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                log.error("uplink outbox %s: cannot trim to %d bytes: %s", self.path, max_size,
                          exc)
            else:
                self._db_rows -= dropped
                self._db_bytes -= freed
                self._note_dropped(dropped, "outbox_full")

    # --- opening ------------------------------------------------------------------------------

    def _unwritable(self, what: str) -> UplinkError:
        setting = (
            "set uplink.outbox_file to a writable path"
            if self.where == "uplink.outbox_file"
            else "set daemon.state_dir (or uplink.outbox_file) to a writable directory"
        )
        return UplinkError(
            f"uplink outbox {self.path} ({self.where}): {what}; {setting}, or give the "
            "service user write access to it"
        )

    def _lock(self) -> None:
        """One process per outbox: a second daemon on the same file would send every row twice
        and upset the counters."""
        try:
            ensure_dir(self.path.parent)  # 0750; files 0640, never through a link
            fd = open_state_file(f"{self.path}.lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise self._unwritable(exc.strerror or str(exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise UplinkError(
                f"uplink outbox {self.path} ({self.where}) is in use by another process (is "
                "another flux-edge running with this state directory?); stop it or give this "
                "one its own uplink.outbox_file"
            ) from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _open(self) -> sqlite3.Connection:
        try:
            opened = open_versioned(self.path, OUTBOX_SCHEMA, _connect, clock=self._clock)
        except StateError as exc:
            raise UplinkError(f"{exc} ({self.where})") from exc
        except (sqlite3.Error, OSError, FluxError) as exc:  # FluxError: a symlink refused
            raise self._unwritable(str(exc)) from exc
        db = opened.db
        if opened.moved_aside is not None:
            lost = "an unknown number of" if opened.lost is None else str(opened.lost)
            self.lost_at_open = opened.lost or 0
            log.error(
                "uplink outbox %s is unreadable (%s): moved it aside to %s and started a new "
                "one; %s record(s) in it were not sent", self.path, opened.corrupt_reason,
                opened.moved_aside, lost,
            )
        if opened.migrated_from is not None:
            log.warning("uplink outbox %s: migrated from schema version %d to %d (backup: %s)",
                        self.path, opened.migrated_from, OUTBOX_SCHEMA.version, opened.backup)
        try:
            self._setup(db)
            self._load_counters(db)
        except sqlite3.Error as exc:
            db.close()
            raise self._unwritable(str(exc)) from exc
        return db

    def _setup(self, db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode here (journal mode {mode})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints (fsync) run in a worker thread
        db.execute("PRAGMA journal_size_limit=16777216")
        # touch the first and last pages of the table: a truncated or garbled file fails here
        db.execute("SELECT * FROM outbox ORDER BY seq LIMIT 1").fetchone()
        db.execute("SELECT * FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
        # and find out now rather than at the first commit whether the file is writable: a
        # full disk or a read-only file system is a degraded store (retried), not a refusal
        # to start that systemd would restart in a loop
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE meta SET value = value WHERE key = 'version'")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if fault_reason(exc) not in ("disk full", "read-only", "I/O error"):
                raise
            self._write_failed(exc)

    def _load_counters(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT rows, bytes FROM counters WHERE id = 1").fetchone()
        any_row = db.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is not None
        if row is None or (row[0] > 0) != any_row:
            # missing or disagreeing with the table: count once (a full scan)
            rows, size = db.execute("SELECT count(*), total(size) FROM outbox").fetchone()
            log.warning("uplink outbox %s: counters recomputed (%d rows, %d bytes)",
                        self.path, rows, int(size))
            db.execute("INSERT OR REPLACE INTO counters (id, rows, bytes) VALUES (1, ?, ?)",
                       (rows, int(size)))
            row = (rows, int(size))
        self._db_rows, self._db_bytes = int(row[0]), int(row[1])

    # --- staging and committing ---------------------------------------------------------------

    def _topic(self, key: tuple[str, str, str]) -> tuple[str, int] | None:
        source, device, name = (k.translate(_TOPIC_UNSAFE) for k in key)
        topic = self._topic_tpl.render(
            gateway=self.gateway.translate(_TOPIC_UNSAFE), source=source, device=device,
            name=name,
        )
        problem = check_topic(topic)
        if problem:
            log.error("uplink: measurement %s.%s (source %r) cannot be published: %s",
                      key[1], key[2], key[0], problem)
            return None
        if len(self._topics) >= _TOPIC_CACHE_MAX:
            self._topics.clear()
        return topic, len(topic.encode())

    def add(self, measurements: Sequence[Measurement]) -> None:
        """Stage measurements for the next commit (memory only, no I/O)."""
        staged = self._staged
        topics = self._topics
        enc = self._enc.encode
        prefix = self._gw_prefix
        sync = self.clock_sync
        if sync is not None and not sync.synced():
            prefix = self._gw_prefix_unsynced
            sync.unsynced_stamps += len(measurements)
        total = 0
        rejected = 0
        for m in measurements:
            key = (m.source, m.device, m.name)
            try:
                t = topics[key]
            except KeyError:
                t = topics[key] = self._topic(key)
            if t is None:
                rejected += 1
                continue
            payload = prefix + enc(m)[1:]
            size = len(payload) + t[1] + ROW_OVERHEAD
            staged.append((size, m.ts, t[0], payload))
            total += size
        self._staged_bytes += total
        self.stats.staged += len(measurements)
        if rejected:
            self._note_dropped(rejected, "unpublishable")

    def add_rows(self, rows: Sequence[tuple[float, str, bytes]], measurements: int) -> None:
        """Stage rows an uplink encoder made (``(ts, topic, payload)``, payload stored and sent
        as it is; ``measurements``: how many measurements they carry, for the statistics)."""
        staged = self._staged
        total = 0
        for ts, topic, payload in rows:
            size = len(payload) + len(topic.encode()) + ROW_OVERHEAD
            staged.append((size, ts, topic, payload))
            total += size
        self._staged_bytes += total
        self.stats.staged += measurements

    @property
    def staged(self) -> int:
        return len(self._staged)

    def commit(self) -> int:
        """Write everything staged, and delete what was acknowledged, in one transaction; drop the
        oldest rows not in flight when the size bound requires it. Returns the records committed.
        Raises UplinkError when the file cannot be written (the staged records stay staged and are
        tried again by the next commit; past ``max_size`` of them the oldest are dropped)."""
        staged = self._staged
        if not staged and not self._acked:
            return 0
        waiting_before = self.depth()
        new_bytes = self._staged_bytes
        n = len(staged)
        try:
            self._begin()
            rows, size = self._delete_acked()
            dropped_rows, dropped_last, freed = 0, 0, 0
            over = self._db_bytes - size + new_bytes - self.max_size
            if over > 0 and staged:
                dropped_rows, freed, dropped_last = self._drop_oldest(over)
            keep_from = 0
            if over - freed > 0:  # the new rows alone are too many: drop the oldest of them
                excess = over - freed
                while keep_from < n and excess > 0:
                    excess -= staged[keep_from][0]
                    keep_from += 1
            if keep_from:
                new_bytes -= sum(r[0] for r in staged[:keep_from])
            self._insert(staged[keep_from:] if keep_from else staged)
            db_rows = self._db_rows + n - keep_from - rows - dropped_rows
            db_bytes = self._db_bytes + new_bytes - size - freed
            self._write_counters(db_rows, db_bytes)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._after_failed_commit(exc)
            raise UplinkError(
                f"uplink outbox {self.path}: cannot write ({exc}); {len(self._staged)} "
                "record(s) kept in memory and retried (is the disk full or read-only?)"
            ) from exc
        self._write_ok()
        self._db_rows, self._db_bytes = db_rows, db_bytes
        self._acked_done()
        if dropped_rows:
            self._trim_buffer(dropped_last)
        staged.clear()
        self._staged_bytes = 0
        if self._file_db is None:
            self.dirty = True
        self.stats.committed += n
        if n > keep_from:
            self.stats.commits += 1
        if dropped_rows or keep_from:
            self._note_dropped(dropped_rows + keep_from, "outbox_full")
        if self.mode == "memory":
            self._memory_step(waiting_before)
        return n

    # --- memory mode ----------------------------------------------------------------------------

    @property
    def in_memory(self) -> bool:
        """The rows are in memory now (memory mode, uplink keeping up)."""
        return self._file_db is not None

    def _memory_epoch_check(self) -> None:
        """A file last used in memory mode and not closed cleanly may be behind on seq numbers
        that were sent from memory: a new outbox id keeps every record id unique."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'memory'").fetchone()
        if row is not None and row[0] == "1":
            new = secrets.token_hex(4)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'outbox_id'", (new,))
                self._db.execute("UPDATE meta SET value = '0' WHERE key = 'memory'")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._unwritable(f"cannot renew the outbox id: {exc}") from exc
            log.warning(
                "uplink outbox %s: the daemon stopped without closing it while the outbox was in "
                "memory: what was in memory then is lost; new outbox id %s (record ids stay "
                "unique)", self.path, new,
            )

    def _memory_step(self, waiting_before: int) -> None:
        """After a commit in memory mode: go to memory once the file's backlog has drained;
        spill to the file when the oldest waiting record was committed ``spill_after`` ago."""
        now = time.monotonic()
        if self._file_db is None:
            if waiting_before == 0:  # everything committed before has been delivered
                self._commit_times.clear()
                self._to_memory()
            return
        oldest, newest = self._db.execute("SELECT min(seq), max(seq) FROM outbox").fetchone()
        times = self._commit_times
        if newest is not None and (not times or times[-1][0] < newest):
            times.append((int(newest), now))
        if oldest is None:
            times.clear()
            return
        while times and times[0][0] < oldest:
            times.popleft()
        if times and now - times[0][1] >= self.spill_after:
            self._spill()
            times.clear()

    def _to_memory(self) -> None:
        file_db = self._db
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            file_db.backup(mem)
            file_db.execute("BEGIN IMMEDIATE")
            file_db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('memory', '1')")
            file_db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                file_db.execute("ROLLBACK")
            mem.close()
            log.debug("uplink outbox %s: stays on disk: %s", self.path, exc)
            return
        self._file_db = file_db
        self._db = mem
        self.dirty = True  # the flag: checkpointed like any write
        log.info("uplink outbox %s: in memory while the uplink keeps up (spills to the file "
                 "after %g s behind)", self.path, self.spill_after)

    def _spill(self) -> None:
        """Write the in-memory outbox to the file and go on from there."""
        file_db = self._file_db
        assert file_db is not None
        try:
            self._db.backup(file_db)  # one copy of the pages, in the file's WAL
            file_db.execute("BEGIN IMMEDIATE")
            file_db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('memory', '0')")
            file_db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                file_db.execute("ROLLBACK")
            self._write_failed(exc)
            return  # stays in memory; tried again with the next commit
        self._db.close()
        self._db = file_db
        self._file_db = None
        self.dirty = True
        self.spills += 1
        log.warning("uplink outbox %s: a record has waited %g s: %d record(s) "
                    "written to the file, which holds the backlog until it drains", self.path,
                    self.spill_after, self.depth())

    def delete_acked(self) -> None:
        """Delete acknowledged rows now (when no commit comes along to carry them)."""
        if not self._acked:
            return
        try:
            self._begin()
            rows, size = self._delete_acked()
            self._write_counters(self._db_rows - rows, self._db_bytes - size)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._write_failed(exc)
            raise UplinkError(f"uplink outbox {self.path}: cannot delete sent records: {exc}") \
                from exc
        self._write_ok()
        self._db_rows -= rows
        self._db_bytes -= size
        self._acked_done()
        if self._file_db is None:
            self.dirty = True

    def _insert(self, rows: list[tuple[int, float, str, bytes]]) -> None:
        """Multi-row INSERTs of 64, 32, ... 1 rows: AUTOINCREMENT updates sqlite_sequence once
        per statement, so this costs about 60 % of one statement per row (executemany)."""
        db = self._db
        n = len(rows)
        i = 0
        for size, sql in _INSERTS:
            while n - i >= size:
                db.execute(sql, list(chain.from_iterable(rows[i:i + size])))
                i += size

    def _begin(self) -> None:
        self._db.execute("BEGIN")

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def _write_counters(self, rows: int, size: int) -> None:
        self._db.execute("UPDATE counters SET rows = ?, bytes = ? WHERE id = 1", (rows, size))

    def _delete_acked(self) -> tuple[int, int]:
        if self._acked:
            self._db.executemany(
                "DELETE FROM outbox WHERE seq BETWEEN ? AND ?", [tuple(r) for r in self._acked]
            )
        return self._acked_rows, self._acked_bytes

    def _acked_done(self) -> None:
        self._acked.clear()
        self._acked_rows = self._acked_bytes = self._acked_max = 0

    def _drop_oldest(self, need: int) -> tuple[int, int, int]:
        """In the open transaction, delete the oldest rows not yet handed out until ``need``
        bytes are freed (or none is left). Returns (rows, bytes, last seq deleted); counters and
        the read buffer are the caller's to update once the transaction commits."""
        cur = self._db.execute(
            "SELECT seq, size FROM outbox WHERE seq > ? ORDER BY seq", (self._cursor,)
        )
        rows = freed = last = 0
        while freed < need:
            page = cur.fetchmany(1000)
            if not page:
                break
            for seq, size in page:
                rows += 1
                freed += size
                last = seq
                if freed >= need:
                    break
        cur.close()
        if rows:
            self._db.execute(
                "DELETE FROM outbox WHERE seq > ? AND seq <= ?", (self._cursor, last)
            )
        return rows, freed, last

    def _trim_buffer(self, last: int) -> None:
        buf = self._buffer
        while buf and buf[0].seq <= last:
            buf.popleft()
        self._read_pos = max(self._read_pos, last)

    def _write_failed(self, exc: sqlite3.Error) -> None:
        self.stats.last_error = f"outbox: {exc}"
        if self.health.failed(exc):
            log.error(
                "uplink outbox %s cannot be written (%s: %s): records wait in memory (up to "
                "%d bytes, then the oldest are dropped and counted), inputs that can be sent "
                "again are not acknowledged, the write is retried with back-off",
                self.path, self.health.reason, exc, self.memory_max,
            )

    def _write_ok(self) -> None:
        since = self.health.since
        if self.health.ok():
            lost = self.stats.dropped_by_reason.get("store_unavailable", 0)
            log.warning(
                "uplink outbox %s: writing works again after %.1f s (%d record(s) dropped "
                "while it failed, in total)", self.path,
                0.0 if since is None else self.health.clock() - since, lost,
            )

    def _after_failed_commit(self, exc: sqlite3.Error) -> None:
        self._write_failed(exc)
        over = self._staged_bytes - self.memory_max
        if over <= 0:
            return
        staged = self._staged
        cut = 0
        while cut < len(staged) and over > 0:
            over -= staged[cut][0]
            cut += 1
        self._staged_bytes -= sum(r[0] for r in staged[:cut])
        del staged[:cut]
        self._note_dropped(cut, "store_unavailable")

    def _note_dropped(self, n: int, reason: str) -> None:
        if n <= 0:
            return
        self.stats.dropped += n
        by = self.stats.dropped_by_reason
        by[reason] = by.get(reason, 0) + n
        self._drops_unlogged += n
        now = time.monotonic()
        if now - self._drop_log_ts >= _DROP_LOG_EVERY:
            self._drop_log_ts = now
            log.warning(
                "uplink outbox %s: dropped the %d oldest unsent record(s) (%s; bound %d bytes "
                "on disk, %d in memory while the file cannot be written); %d dropped in total",
                self.path, self._drops_unlogged, reason, self.max_size, self.memory_max,
                self.stats.dropped,
            )
            self._drops_unlogged = 0

    # --- reading for the sender ---------------------------------------------------------------

    def take(self, max_rows: int = 1) -> Unit | None:
        """The next rows to send: up to ``max_rows`` consecutive rows with the same topic, or
        None when every committed row has been handed out."""
        buf = self._buffer
        if not buf and not self._refill():
            return None
        prev = self._cursor
        first = buf.popleft()
        rows = [first]
        if max_rows > 1:
            topic = first.topic
            while len(rows) < max_rows:
                if not buf and not self._refill():
                    break
                if buf[0].topic != topic:
                    break
                rows.append(buf.popleft())
        self._cursor = rows[-1].seq
        return Unit(prev, rows)

    def _refill(self) -> bool:
        while True:
            fetched = self._db.execute(
                "SELECT seq, size, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._read_pos, PAGE_ROWS),
            ).fetchall()
            if not fetched:
                return False
            self._read_pos = fetched[-1][0]
            if self._acked_max and fetched[0][0] <= self._acked_max:
                # read again after a rewind: skip what was delivered but not deleted yet
                fetched = [r for r in fetched if not self._is_acked(r[0])]
            if fetched:
                self._buffer.extend(Row._make(r) for r in fetched)
                return True

    def _is_acked(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self._acked)

    def acked(self, unit: Unit) -> None:
        """The broker acknowledged ``unit``: count it; its rows are deleted with the next commit."""
        n = len(unit.rows)
        size = unit.size
        ranges = self._acked
        if ranges and ranges[-1][1] == unit.prev:
            ranges[-1][1] = unit.last
        else:
            ranges.append([unit.first, unit.last])
        self._acked_max = max(self._acked_max, unit.last)
        self._acked_rows += n
        self._acked_bytes += size
        self.stats.acked += n

    def discard(self, unit: Unit, why: str) -> None:
        """A unit that can never be published (counted as dropped, deleted like an acked one)."""
        log.error("uplink: %d record(s) on %r cannot be published and are dropped: %s",
                  len(unit.rows), unit.rows[0].topic, why)
        self.acked(unit)
        self.stats.acked -= len(unit.rows)
        self._note_dropped(len(unit.rows), "unpublishable")

    def rewind(self) -> None:
        """Read again from the oldest row not acknowledged (after a failed publish; nothing may
        be in flight)."""
        self._cursor = self._read_pos = 0
        self._buffer.clear()

    # --- state --------------------------------------------------------------------------------

    def depth(self) -> int:
        """Records committed and not yet acknowledged."""
        return self._db_rows - self._acked_rows

    def depth_bytes(self) -> int:
        return self._db_bytes - self._acked_bytes

    def oldest_ts(self) -> float | None:
        """Measurement time of the oldest record waiting (committed, not acknowledged)."""
        if self.depth() <= 0:
            return None
        ranges = sorted(self._acked)
        starts = [r[0] for r in ranges]
        after = 0
        while True:
            row = self._db.execute(
                "SELECT seq, ts FROM outbox WHERE seq > ? ORDER BY seq LIMIT 1", (after,)
            ).fetchone()
            if row is None:
                return None
            i = bisect.bisect_right(starts, row[0]) - 1
            if i >= 0 and ranges[i][1] >= row[0]:
                after = ranges[i][1]
                continue
            return float(row[1])

    def checkpoint(self, mode: str = "PASSIVE") -> bool:
        """Sync the WAL to disk and copy it into the database file (a WAL checkpoint: this is
        the fsync that bounds the power-loss window). Runs in a worker thread with its own
        connection; one call at a time. True when the whole WAL was checkpointed."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"bad checkpoint mode {mode!r}")
        db = self._ckpt
        if db is None:
            db = sqlite3.connect(
                str(self.path), timeout=2.0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA synchronous=NORMAL")
            self._ckpt = db
        busy, frames, done = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return not busy and (frames <= 0 or done >= frames)

    def close(self) -> None:
        """Close the file (idempotent). Committing what is staged, deleting what was acknowledged
        and a final checkpoint are the caller's, before this; what is left is kept in the file
        or, for staged records, lost (and counted as dropped)."""
        if self._closed:
            return
        self._closed = True
        self._note_dropped(len(self._staged), "shutdown")
        self._staged.clear()
        self._staged_bytes = 0
        try:
            if self._file_db is not None:  # memory mode: what is left goes to the file now
                try:
                    self._db.backup(self._file_db)
                    self._file_db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('memory', '0')")
                except sqlite3.Error as exc:
                    log.error("uplink outbox %s: cannot write the in-memory outbox at close "
                              "(%s): %d record(s) lost", self.path, exc, self.depth())
                self._db.close()
                self._db = self._file_db
                self._file_db = None
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if self._ckpt is not None:
                self._ckpt.close()
                self._ckpt = None
            self._db.close()
        finally:
            self._unlock()

    @property
    def has_acked(self) -> bool:
        """Acknowledged rows wait for deletion."""
        return bool(self._acked)

    @property
    def closed(self) -> bool:
        return self._closed
