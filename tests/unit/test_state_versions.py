"""Versioned state (issue #13): every SQLite store carries PRAGMA user_version; older files are
migrated forward in one transaction after a backup copy, newer ones refused, corrupt ones moved
aside (what they held counted) and replaced. Fixtures are built as each earlier release wrote
its files (from git history: the outbox of 8c75e9d, schema "1" in meta.version and no
user_version; the rule state of 010f980, user_version 1)."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

from flux_edge.errors import StateError, UplinkError
from flux_edge.model import Measurement
from flux_edge.rules.state import RULE_STATE_SCHEMA, STATE_FILE, RuleStore, StateRecord
from flux_edge.state.versions import Schema, file_info, open_versioned
from flux_edge.uplink.outbox import OUTBOX_SCHEMA, Outbox, record

TOPIC = "flux-edge/{gateway}/{device}/{name}"


# --- fixture builders: files as earlier releases wrote them ------------------------------------


def outbox_v1(path: Path, rows: int, oid: str = "0badc0de") -> None:
    """The outbox of 8c75e9d (schema "1"): meta.version, no user_version, no application_id."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        "BEGIN;"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1), rows INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL);"
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL,"
        " ts REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);"
        f"INSERT INTO meta (key, value) VALUES ('outbox_id', '{oid}');"
        "INSERT INTO meta (key, value) VALUES ('version', '1');"
        "COMMIT;"
    )
    size = 0
    for i in range(rows):
        payload = f'"gateway":"gw","device":"d","name":"v","value":{i},"ts":{i}.0}}'.encode()
        db.execute("INSERT INTO outbox (size, ts, topic, payload) VALUES (?,?,?,?)",
                   (len(payload) + 64 + 9, float(i), "flux-edge/gw/d/v", payload))
        size += len(payload) + 64 + 9
    db.execute("INSERT INTO counters (id, rows, bytes) VALUES (1, ?, ?)", (rows, size))
    db.close()


def rule_state_v1(path: Path, records: list[tuple[str, str, str, float | None]]) -> None:
    """The rule state of 010f980 (version 1)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA application_id = 1179408466")
    db.execute("PRAGMA user_version = 1")
    db.execute("CREATE TABLE rule_state (rule TEXT NOT NULL, digest TEXT NOT NULL, "
               "device TEXT NOT NULL, since REAL, on_ INTEGER NOT NULL, last_fire REAL, "
               "due REAL, PRIMARY KEY (rule, device))")
    for rule, digest, device, since in records:
        db.execute("INSERT INTO rule_state VALUES (?,?,?,?,0,NULL,NULL)",
                   (rule, digest, device, since))
    db.close()


def open_outbox(path: Path) -> Outbox:
    return Outbox(path, max_size=1 << 30, gateway="gw", topic=TOPIC)


def pragma(path: Path, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        db.close()


# --- the outbox ----------------------------------------------------------------------------------


def test_outbox_v1_is_migrated_after_a_backup_and_keeps_every_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox_v1(path, 50)
    caplog.set_level(logging.WARNING, logger="flux_edge.uplink")
    box = open_outbox(path)
    try:
        assert box.outbox_id == "0badc0de"  # consumers' de-duplication ids stay the same
        assert box.depth() == 50
        unit = box.take(100)
        assert unit is not None and len(unit.rows) == 50
        assert record(b"0badc0de", unit.rows[0]).startswith(b'{"id":"0badc0de-1","seq":1,')
        box.add([Measurement(device="d", name="v", value=1, ts=1.0, source="s")])
        assert box.commit() == 1
    finally:
        box.close()
    assert pragma(path, "user_version") == OUTBOX_SCHEMA.version == 2
    assert pragma(path, "application_id") == OUTBOX_SCHEMA.application_id
    backups = list(tmp_path.glob("outbox.sqlite.v1-*.bak"))
    assert len(backups) == 1
    db = sqlite3.connect(backups[0])
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 50  # the WAL's rows too
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    assert any("migrated from schema version 1 to 2" in r.getMessage() for r in caplog.records)
    # and opening it again migrates nothing
    open_outbox(path).close()
    assert len(list(tmp_path.glob("outbox.sqlite.v1-*.bak"))) == 1


def test_a_newer_outbox_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    open_outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()
    before = path.read_bytes()
    with pytest.raises(UplinkError, match="schema version 7, newer than the 2"):
        open_outbox(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.corrupt-*"))


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_outbox_is_moved_aside_and_its_records_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "outbox.sqlite"
    box = open_outbox(path)
    box.add([Measurement(device="d", name="v", value="x" * 200, ts=float(i), source="s")
             for i in range(3000)])
    box.commit()
    box.checkpoint("TRUNCATE")
    box.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:  # garbage over pages in the middle: quick_check fails, the counters still read
            f.seek(size // 2)
            f.write(b"\xa5" * 16384)
    caplog.set_level(logging.ERROR, logger="flux_edge.uplink")
    box = open_outbox(path)
    try:
        assert box.depth() == 0
        assert len(list(tmp_path.glob("outbox.sqlite.corrupt-*"))) == 1
        text = " ".join(r.getMessage() for r in caplog.records)
        assert "moved it aside" in text
        if damage == "truncated":  # nothing of it can be read: said so
            assert "an unknown number of record(s)" in text
        else:
            assert box.lost_at_open == 3000, text
            assert "3000 record(s) in it were not sent" in text
    finally:
        box.close()


@pytest.mark.parametrize("content", [b"garbage " * 1000, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_a_garbage_outbox_is_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(content)
    box = open_outbox(path)
    box.close()
    aside = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox_v1(path, 5)

    def broken(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = '2' WHERE key = 'version'")
        db.execute("DELETE FROM outbox")
        raise sqlite3.OperationalError("disk I/O error")

    schema = Schema(**{**OUTBOX_SCHEMA.__dict__, "migrations": {1: broken}})

    def connect(p: Path) -> sqlite3.Connection:
        return sqlite3.connect(p, isolation_level=None)

    with pytest.raises(StateError, match="nothing was changed"):
        open_versioned(path, schema, connect)
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 5
    assert db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0] == "1"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    box = open_outbox(path)  # the real migration still works afterwards
    assert box.depth() == 5
    box.close()


def test_a_migration_that_cannot_write_its_backup_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox_v1(path, 5)
    blocker = tmp_path / "outbox.sqlite.v1-1.bak"
    blocker.mkdir()  # the backup's name is taken by a directory

    def connect(p: Path) -> sqlite3.Connection:
        return sqlite3.connect(p, isolation_level=None)

    with pytest.raises(StateError, match="backup copy"):
        open_versioned(path, OUTBOX_SCHEMA, connect, clock=lambda: 1.0)
    assert pragma(path, "user_version") == 0


# --- the rule state ------------------------------------------------------------------------------


def test_rule_state_v1_wall_clock_times_are_migrated_to_the_duration_clock(
    tmp_path: Path,
) -> None:
    path = tmp_path / STATE_FILE
    wall_since = time.time() - 20.0  # the condition has been true for 20 s
    rule_state_v1(path, [("hot", "abc", "boiler", wall_since)])
    store = RuleStore(path)
    [rec] = store.load()
    assert (rec.rule, rec.digest, rec.device) == ("hot", "abc", "boiler")
    assert rec.since is not None and abs((time.monotonic() - rec.since) - 20.0) < 1.0
    store.close()
    assert pragma(path, "user_version") == RULE_STATE_SCHEMA.version == 2
    assert len(list(tmp_path.glob(f"{STATE_FILE}.v1-*.bak"))) == 1


def test_rule_state_of_another_boot_keeps_the_time_elapsed_before_it(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    store = RuleStore(path)
    store.save([StateRecord(rule="hot", digest="d", device="b", since=1000.0, due=1030.0)])
    store.close()
    db = sqlite3.connect(path)  # as if written in another boot, last at t = 1010 there
    db.execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
    db.execute("UPDATE meta SET value = '1010.0' WHERE key = 'at'")
    db.commit()
    db.close()
    store = RuleStore(path)
    [rec] = store.load()
    now = time.monotonic()
    assert rec.since is not None and rec.due is not None
    assert abs((now - rec.since) - 10.0) < 1.0  # 10 s had elapsed; the reboot adds none
    assert abs((rec.due - now) - 20.0) < 1.0  # 20 s remain
    store.close()
    store = RuleStore(path)  # carried once: the same boot now
    [again] = store.load()
    assert again == rec
    store.close()


def test_a_newer_rule_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    rule_state_v1(path, [])
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 9")
    db.close()
    with pytest.raises(StateError, match="newer"):
        RuleStore(path)


def test_a_corrupt_rule_state_counts_what_was_lost(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    rule_state_v1(path, [(f"r{i}", "d", "boiler", float(i)) for i in range(3)])
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE rule_state ADD COLUMN extra")  # not a schema we know
    db.close()
    store = RuleStore(path)
    assert store.lost_at_open == 3 and store.load() == []
    store.close()


def test_rule_state_writes_that_fail_are_kept_and_written_later(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    store = RuleStore(path)
    rec = StateRecord(rule="hot", digest="d", device="boiler", since=1.0)
    assert store._db is not None
    real = store._db
    store._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    store.save([rec])  # read-only: fails, kept
    assert store.health.degraded and store.health.reason == "read-only"
    assert store.pending == 1
    store._db.close()
    store._db = real
    store.save([])  # the next write carries it
    assert store.pending == 0 and not store.health.degraded
    assert store.load() == [rec]
    store.close()


# --- state info ----------------------------------------------------------------------------------


def test_file_info_shows_version_records_and_integrity(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox_v1(path, 7)
    info = file_info(path, OUTBOX_SCHEMA, full=True)
    assert info["version"] == 1 and info["code_version"] == 2
    assert info["records"] == 7 and info["integrity"] == "ok"
    garbage = tmp_path / "g.sqlite"
    garbage.write_bytes(b"x" * 4096)
    assert "unreadable" in str(file_info(garbage, OUTBOX_SCHEMA)["integrity"])
    assert os.path.exists(path)


def test_state_cli_info_check_migrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flux_edge.cli import main

    outbox_v1(tmp_path / "outbox.sqlite", 4)
    rule_state_v1(tmp_path / STATE_FILE, [])
    assert main(["state", "info", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "schema 1 (this flux-edge: 2), 4 record(s), integrity ok" in out
    assert main(["state", "migrate", "--state-dir", str(tmp_path)]) == 0
    assert "migrated from schema 1 to 2" in capsys.readouterr().out
    assert main(["state", "check", "--state-dir", str(tmp_path)]) == 0
    (tmp_path / STATE_FILE).write_bytes(b"garbage" * 1000)
    assert main(["state", "check", "--state-dir", str(tmp_path)]) == 1
    assert "rules.sqlite" in capsys.readouterr().err
    # migrate refuses while a daemon holds the outbox
    outbox_v1(tmp_path / "outbox-b.sqlite", 1)
    box_lock = os.open(tmp_path / "outbox-b.sqlite.lock", os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(box_lock, fcntl.LOCK_EX)
    try:
        assert main(["state", "migrate", "--state-dir", str(tmp_path)]) == 1
        assert "running flux-edge" in capsys.readouterr().err
    finally:
        os.close(box_lock)
