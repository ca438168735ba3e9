"""The outbox's SQLite file: its tables, schema version and migrations (run by
flux_edge.state.versions), and how it is opened."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

from flux_edge.files import prepare_sqlite
from flux_edge.state.versions import Schema, tables_of

SCHEMA_VERSION = "2"  # also PRAGMA user_version (flux_edge.state.versions)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1), rows INTEGER NOT NULL,
                       bytes INTEGER NOT NULL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL,
                     ts REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);
"""
_TABLES = {"meta", "counters", "outbox"}
INSERTS = [
    (n, "INSERT INTO outbox (size, ts, topic, payload) VALUES " + ",".join(["(?,?,?,?)"] * n))
    for n in (64, 32, 16, 8, 4, 2, 1)
]


def connect(path: Path) -> sqlite3.Connection:
    prepare_sqlite(path)  # no symlink at it or its -wal/-shm; created 0640
    return sqlite3.connect(str(path), timeout=1.0, isolation_level=None, check_same_thread=False)


def _init(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO meta (key, value) VALUES ('outbox_id', ?)", (secrets.token_hex(4),))
    db.execute("INSERT INTO meta (key, value) VALUES ('version', ?)", (SCHEMA_VERSION,))
    db.execute("INSERT INTO counters (id, rows, bytes) VALUES (1, 0, 0)")


def _legacy(db: sqlite3.Connection) -> int | None:
    """Files from before PRAGMA user_version: schema 1 said so in meta.version."""
    if not tables_of(db) >= _TABLES:
        return None
    row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    return 1 if row is not None and row[0] == "1" else None


def _validate(db: sqlite3.Connection) -> str:
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    oid = meta.get("outbox_id", "")
    if len(oid) != 8 or any(c not in "0123456789abcdef" for c in oid):
        return f"bad outbox_id {oid!r}"
    if meta.get("version") != SCHEMA_VERSION:
        return f"meta.version {meta.get('version')!r} disagrees with the schema version"
    return ""


def _count(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT rows FROM counters WHERE id = 1").fetchone()
    return int(row[0]) if row is not None else int(
        db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def _v1_to_v2(db: sqlite3.Connection) -> None:
    # version 2 only moved the version into PRAGMA user_version (with an application id)
    db.execute("UPDATE meta SET value = '2' WHERE key = 'version'")


OUTBOX_SCHEMA = Schema(
    kind="uplink outbox",
    application_id=0x464C584F,  # "FLXO"
    version=int(SCHEMA_VERSION),
    create=_SCHEMA,
    migrations={1: _v1_to_v2},
    tables=frozenset(_TABLES),
    legacy=_legacy,
    count=_count,
    init=_init,
    validate=_validate,
)
