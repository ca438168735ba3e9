"""Schema versions and migrations of the SQLite stores (the outbox, the rule state).

Every store file carries ``PRAGMA application_id`` (which store it is) and ``PRAGMA
user_version`` (its schema version). :func:`open_versioned` opens one:

- no file, or an empty one: the current schema is created in one transaction;
- an older version: a backup copy is made first (``<name>.v<old>-<unix time>.bak``, through
  SQLite's backup API, so what the WAL holds is in it), then every migration from that version
  up runs inside ONE transaction with the new ``user_version``: a crash or a full disk in the
  middle leaves the old version intact (and the daemon migrates it again at the next start);
- a newer version than this code knows: refused with :class:`~flux_edge.errors.StateError`
  (a downgrade never silently damages state: upgrade again, or move the file away);
- a corrupt file (garbage, truncated, ``quick_check`` failing, the wrong application id, tables
  missing): moved aside to ``<name>.corrupt-<unix time>`` (with its ``-wal``), the records it
  held counted where they can still be read, and a fresh store started. The caller logs it
  (:class:`Opened` says what happened).

Files written before versions existed (``user_version`` 0, no application id) are recognised by
their tables (``Schema.legacy``) and migrated like any older version.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flux_edge.errors import StateError

__all__ = ["Opened", "Schema", "file_info", "open_versioned", "tables_of"]

_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

Connect = Callable[[Path], sqlite3.Connection]


@dataclass(frozen=True)
class Schema:
    """One store's schema and its history."""

    kind: str  # for messages: "uplink outbox", "rule state"
    application_id: int
    version: int  # the version this code writes
    create: str  # SQL creating the current schema (run inside a transaction)
    # version v -> the step from v to v + 1 (run inside the migration's transaction)
    migrations: Mapping[int, Callable[[sqlite3.Connection], None]]
    tables: frozenset[str]  # the tables a file of the current version has
    # the version of a file without application id (written before versions), None: not ours
    legacy: Callable[[sqlite3.Connection], int | None] | None = None
    count: Callable[[sqlite3.Connection], int] | None = None  # records held (lost if corrupt)
    init: Callable[[sqlite3.Connection], None] | None = None  # after create, same transaction
    # a problem with the content of a current-version file ("" when none): treated as corrupt
    validate: Callable[[sqlite3.Connection], str] | None = None


@dataclass
class Opened:
    """What :func:`open_versioned` found and did."""

    db: sqlite3.Connection
    created: bool = False
    migrated_from: int | None = None
    backup: Path | None = None
    moved_aside: Path | None = None
    corrupt_reason: str = ""
    lost: int | None = None  # records in the file moved aside (None: could not be counted)


class _Corrupt(Exception):
    pass


def tables_of(db: sqlite3.Connection) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {str(r[0]) for r in rows} - {"sqlite_sequence"}


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _CORRUPT_CODES:
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def file_version(db: sqlite3.Connection, schema: Schema) -> int | None:
    """The file's schema version: 0 for an empty database, None when it is not this store."""
    app = int(db.execute("PRAGMA application_id").fetchone()[0])
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    tables = tables_of(db)
    if app == 0 and version == 0:
        if not tables:
            return 0
        return schema.legacy(db) if schema.legacy is not None else None
    if app != schema.application_id:
        return None
    return version


def open_versioned(
    path: Path,
    schema: Schema,
    connect: Connect,
    *,
    clock: Callable[[], float] = time.time,
) -> Opened:
    """Open (create, migrate or replace) the store at ``path``; see the module docstring.
    Raises StateError for a newer version or a failed backup or migration, and sqlite3.Error
    (not corruption: a full disk, a read-only file system, a lock) for the caller to judge."""
    if path.exists() and path.stat().st_size > 0:
        try:
            return _open_existing(path, schema, connect, clock)
        except _Corrupt as exc:
            reason, lost = str(exc.args[0]), exc.args[1] if len(exc.args) > 1 else None
        aside = _move_aside(path, clock)
        opened = _create(path, schema, connect)
        opened.moved_aside, opened.corrupt_reason, opened.lost = aside, reason, lost
        return opened
    with contextlib.suppress(FileNotFoundError):  # an empty file: start it afresh
        for suffix in ("-wal", "-shm"):
            os.unlink(f"{path}{suffix}")
    return _create(path, schema, connect)


def _count(db: sqlite3.Connection, schema: Schema) -> int | None:
    if schema.count is None:
        return None
    try:
        return schema.count(db)
    except sqlite3.Error:
        return None


def _open_existing(
    path: Path, schema: Schema, connect: Connect, clock: Callable[[], float]
) -> Opened:
    db = connect(path)
    try:
        try:
            version = file_version(db, schema)
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                raise _Corrupt(f"unreadable: {exc}", _count(db, schema)) from exc
            raise
        if version is None:
            app = db.execute("PRAGMA application_id").fetchone()[0]
            raise _Corrupt(
                f"not a flux-edge {schema.kind} file (application id {app:#x}, tables "
                f"{', '.join(sorted(tables_of(db))) or 'none'})", None,
            )
        if version > schema.version:
            raise StateError(
                f"{schema.kind} {path} has schema version {version}, newer than the "
                f"{schema.version} this flux-edge knows (written by a newer release?): it is "
                "left untouched; run "
                "the newer flux-edge again, or move the file away to start with an empty "
                f"{schema.kind} (what it holds is then not used)"
            )
        try:
            check = str(db.execute("PRAGMA quick_check").fetchone()[0])
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                raise _Corrupt(f"integrity check failed: {exc}", _count(db, schema)) from exc
            raise
        if check != "ok":
            raise _Corrupt(f"integrity check: {check}", _count(db, schema))
        if version == 0:  # an empty database (made by hand, or a crash before the schema)
            db.close()
            return _create(path, schema, connect)
        if version < schema.version:
            if not tables_of(db):
                raise _Corrupt("no tables", None)
            backup = _backup(db, path, version, schema, clock)
            _migrate(db, path, version, schema)
            _validate(db, schema)
            return Opened(db, migrated_from=version, backup=backup)
        _validate(db, schema)
        return Opened(db)
    except BaseException:
        db.close()
        raise


def _validate(db: sqlite3.Connection, schema: Schema) -> None:
    missing = schema.tables - tables_of(db)
    if missing:
        raise _Corrupt(f"tables missing: {', '.join(sorted(missing))}", None)
    if schema.validate is not None:
        try:
            problem = schema.validate(db)
        except sqlite3.Error as exc:
            if not _is_corrupt(exc):
                raise
            problem = f"unreadable: {exc}"
        if problem:
            raise _Corrupt(problem, _count(db, schema))


def _backup(
    db: sqlite3.Connection, path: Path, version: int, schema: Schema, clock: Callable[[], float]
) -> Path:
    target = path.with_name(f"{path.name}.v{version}-{int(clock())}.bak")
    try:
        copy = sqlite3.connect(target)
        try:
            db.backup(copy)
        finally:
            copy.close()
    except (sqlite3.Error, OSError) as exc:
        with contextlib.suppress(OSError):
            target.unlink()
        raise StateError(
            f"{schema.kind} {path}: version {version} needs migrating to {schema.version}, but "
            f"the backup copy {target} cannot be written ({exc}); the file is left as it was: "
            "free some space (or fix the permissions) and start again"
        ) from exc
    return target


def _migrate(db: sqlite3.Connection, path: Path, version: int, schema: Schema) -> None:
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version, schema.version):
                step = schema.migrations.get(v)
                if step is None:
                    raise StateError(
                        f"{schema.kind} {path}: no migration from version {v} (this flux-edge "
                        f"migrates versions {min(schema.migrations, default=schema.version)} to "
                        f"{schema.version}); move the file away to start empty"
                    )
                step(db)
            db.execute(f"PRAGMA application_id = {schema.application_id}")
            db.execute(f"PRAGMA user_version = {schema.version}")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StateError(
            f"{schema.kind} {path}: migrating version {version} to {schema.version} failed "
            f"({exc}); nothing was changed (the migration is one transaction)"
        ) from exc


def _create(path: Path, schema: Schema, connect: Connect) -> Opened:
    db = connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(schema.create):
                db.execute(stmt)
            if schema.init is not None:
                schema.init(db)
            db.execute(f"PRAGMA application_id = {schema.application_id}")
            db.execute(f"PRAGMA user_version = {schema.version}")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
    except BaseException:
        db.close()
        raise
    return Opened(db, created=True)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _move_aside(path: Path, clock: Callable[[], float]) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(clock())}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{int(clock())}-{n}")
        n += 1
    os.replace(path, aside)
    wal = Path(f"{path}-wal")
    if wal.exists():  # never let a new file pick up the old file's log
        os.replace(wal, f"{aside}-wal")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{path}-shm")
    return aside


def file_info(path: Path, schema: Schema, *, full: bool = False) -> dict[str, object]:
    """What ``flux-edge state info|check`` shows of one store, opened read-only (never
    changed): version, sizes, records, and the integrity check (``full``: integrity_check,
    else quick_check)."""
    info: dict[str, object] = {"store": schema.kind, "path": str(path), "exists": path.exists()}
    if not path.exists():
        return info
    wal = Path(f"{path}-wal")
    info["bytes"] = path.stat().st_size
    info["wal_bytes"] = wal.stat().st_size if wal.exists() else 0
    info["code_version"] = schema.version
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error as exc:
        info["integrity"] = f"cannot open: {exc}"
        return info
    try:
        version = file_version(db, schema)
        info["version"] = version
        info["records"] = _count(db, schema)
        pragma = "integrity_check" if full else "quick_check"
        rows = db.execute(f"PRAGMA {pragma}").fetchall()
        info["integrity"] = "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:5])
        if version is None:
            info["integrity"] = f"not a flux-edge {schema.kind} file"
    except sqlite3.Error as exc:
        info["integrity"] = f"unreadable: {exc}"
    finally:
        db.close()
    return info
