"""flux_edge.rules.state: rule state in a real SQLite file, restored across engine restarts."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import Config, RuleConfig, SourceSpec
from flux_edge.model import Command, Measurement, Quality, Value
from flux_edge.rules import RuleEngine
from flux_edge.rules.state import STATE_FILE, RuleStore, StateRecord
from flux_edge.sources.modbus.spec import ModbusTcpSource, RegisterConfig

SOURCES: dict[str, SourceSpec] = {
    "boiler": ModbusTcpSource(
        host="127.0.0.1",
        registers=(
            RegisterConfig(name="temperature", address=0, type="int16"),
            RegisterConfig(name="pump", address=1, function="coil"),
        ),
    )
}


def cfg(**rules: RuleConfig) -> Config:
    return Config(sources=SOURCES, rules=rules)


def hot(**kw: Any) -> RuleConfig:
    kw.setdefault("device", "boiler")
    return RuleConfig(when=kw.pop("when", "temperature > 80.0"), actions=("fan_on",), **kw)


class Now:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(
    clock: Now, t: float, value: Value, quality: Quality = "good", name: str = "temperature"
) -> Measurement:
    clock.t = t
    return Measurement(device="boiler", name=name, value=value, ts=t, quality=quality)


def acts(commands: list[Command]) -> list[str]:
    return [c.action for c in commands]


def engine(config: Config, path: Path, t: float) -> tuple[RuleEngine, Now, RuleStore]:
    clock = Now(t)
    store = RuleStore(path)
    return RuleEngine(config, clock=clock, store=store), clock, store


def test_restart_in_the_middle_of_a_for_period(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    config = cfg(hot=hot(for_=30.0))
    a, clock, store_a = engine(config, path, 0.0)
    assert a.on_measurement(at(clock, 0.0, 90.0)) == []
    assert a.on_measurement(at(clock, 10.0, 91.0)) == []
    store_a.close()
    del a  # the daemon stops at t=10

    b, _, _ = engine(config, path, 20.0)  # and is back at t=20
    assert b.next_deadline() == 30.0  # the original deadline, not 20 + 30
    assert b.tick(29.0) == []
    commands = b.tick(30.0)
    assert acts(commands) == ["fan_on"]
    assert commands[0].params == {"device": "boiler", "rule_state": "on"}
    # fired and on: the next true reading does not fire again, after a second restart either
    c, clock_c, _ = engine(config, path, 40.0)
    assert c.next_deadline() is None
    assert c.on_measurement(at(clock_c, 41.0, 95.0)) == []
    assert acts(c.on_measurement(at(clock_c, 42.0, 10.0))) == []
    assert c.on_measurement(at(clock_c, 43.0, 95.0)) == []  # a new period starts
    assert c.next_deadline() == 73.0


def test_restored_timer_is_cancelled_by_a_false_reading(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    config = cfg(hot=hot(for_=30.0))
    a, clock, _ = engine(config, path, 0.0)
    a.on_measurement(at(clock, 0.0, 90.0))
    b, clock_b, _ = engine(config, path, 20.0)
    assert b.on_measurement(at(clock_b, 25.0, 50.0)) == []
    assert b.next_deadline() is None
    assert b.tick(30.0) == []


def test_an_input_not_seen_since_start_does_not_cancel(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    config = cfg(hot=hot(when="temperature > 80.0 && !pump", for_=30.0))
    a, clock, _ = engine(config, path, 0.0)
    a.on_measurement(at(clock, 0.0, False, name="pump"))
    a.on_measurement(at(clock, 1.0, 90.0))
    assert a.next_deadline() == 31.0
    b, clock_b, _ = engine(config, path, 20.0)
    # only the temperature has come since the restart: the condition cannot be evaluated yet
    assert b.on_measurement(at(clock_b, 22.0, 95.0)) == []
    assert acts(b.tick(31.0)) == ["fan_on"]


def test_deadline_passed_while_down_fires_on_the_first_true_reading(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    config = cfg(hot=hot(for_=30.0))
    a, clock, _ = engine(config, path, 0.0)
    a.on_measurement(at(clock, 0.0, 90.0))
    b, clock_b, _ = engine(config, path, 100.0)  # down from t=0 to t=100
    assert b.next_deadline() is None  # nobody watched meanwhile: not fired blindly
    assert b.tick(100.0) == []
    assert acts(b.on_measurement(at(clock_b, 101.0, 90.0))) == ["fan_on"]
    # ... and a false first reading cancels it instead
    c_path = tmp_path / "other.sqlite"
    a2, clock2, _ = engine(config, c_path, 0.0)
    a2.on_measurement(at(clock2, 0.0, 90.0))
    c, clock_c, _ = engine(config, c_path, 100.0)
    assert c.on_measurement(at(clock_c, 101.0, 50.0)) == []
    assert c.on_measurement(at(clock_c, 102.0, 90.0)) == []  # a new period
    assert c.next_deadline() == 132.0


def test_latch_and_cooldown_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    config = cfg(
        latch=hot(off_when="temperature < 70.0", off_actions=("fan_off",)),
        cool=hot(when="temperature > 50.0", cooldown=60.0, mode="level"),
    )
    a, clock, _ = engine(config, path, 0.0)
    assert acts(a.on_measurement(at(clock, 0.0, 90.0))) == ["fan_on", "fan_on"]
    b, clock_b, _ = engine(config, path, 10.0)
    assert b.on_measurement(at(clock_b, 11.0, 75.0)) == []  # latched; cooling down
    assert acts(b.on_measurement(at(clock_b, 12.0, 65.0))) == ["fan_off"]
    assert acts(b.on_measurement(at(clock_b, 61.0, 55.0))) == ["fan_on"]  # cooldown over


def test_state_of_removed_or_changed_rules_is_discarded(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    a, clock, store = engine(cfg(hot=hot(for_=30.0), gone=hot(for_=30.0)), path, 0.0)
    a.on_measurement(at(clock, 0.0, 90.0))
    assert {r.rule for r in store.load()} == {"hot", "gone"}
    store.close()
    changed = cfg(hot=hot(when="temperature > 85.0", for_=30.0))
    b, _, store_b = engine(changed, path, 10.0)
    assert b.next_deadline() is None
    assert store_b.load() == []
    # actions, cooldown and severity are not part of the digest
    a2, clock2, s2 = engine(cfg(hot=hot(for_=30.0)), tmp_path / "b.sqlite", 0.0)
    a2.on_measurement(at(clock2, 0.0, 90.0))
    s2.close()
    same = cfg(hot=hot(for_=30.0, cooldown=5.0, severity="warning"))
    c, _, _ = engine(same, tmp_path / "b.sqlite", 10.0)
    assert c.next_deadline() == 30.0


class CountingStore(RuleStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saves: list[list[StateRecord]] = []

    def save(self, records: Any) -> None:
        records = list(records)
        self.saves.append(records)
        super().save(records)


def test_writes_only_on_state_changes_one_batch_per_call(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / STATE_FILE)
    clock = Now()
    config = cfg(a=hot(for_=30.0), b=hot(when="temperature > 60.0"))
    e = RuleEngine(config, clock=clock, store=store)
    e.on_measurement(at(clock, 0.0, 90.0))  # a starts a period, b fires: one batch
    assert len(store.saves) == 1
    assert {r.rule for r in store.saves[0]} == {"a", "b"}
    for t in range(1, 20):
        e.on_measurement(at(clock, float(t), 90.0 + t))  # nothing changes
    assert len(store.saves) == 1
    e.tick(30.0)
    assert len(store.saves) == 2
    rows = {r.rule: r for r in store.load()}
    assert rows["a"].on and rows["a"].last_fire == 30.0 and rows["a"].due is None
    e.on_measurement(at(clock, 40.0, 10.0))  # both go off: idle rows are deleted
    assert len(store.saves) == 3
    assert {r.rule: r.on for r in store.load()} == {"a": False, "b": False}


def test_wal_mode(tmp_path: Path) -> None:
    RuleStore(tmp_path / STATE_FILE)
    db = sqlite3.connect(tmp_path / STATE_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_checkpoints_are_left_to_the_runtime_and_copy_the_wal(tmp_path: Path) -> None:
    """No automatic checkpoint (an fsync on the event loop); checkpoint() does it, from any
    thread, and afterwards the database file alone holds the state."""
    store = RuleStore(tmp_path / STATE_FILE)
    assert store._db is not None
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    clock = Now()
    e = RuleEngine(cfg(b=hot(when="temperature > 60.0")), clock=clock, store=store)
    e.on_measurement(at(clock, 0.0, 90.0))
    assert store.writes == 1
    wal = tmp_path / (STATE_FILE + "-wal")
    assert wal.stat().st_size > 0
    import threading

    t = threading.Thread(target=store.checkpoint)
    t.start()
    t.join()
    # a reader that ignores the WAL (immutable) sees the row: it is in the database file now
    db = sqlite3.connect(f"file:{tmp_path / STATE_FILE}?immutable=1", uri=True)
    assert db.execute("SELECT count(*) FROM rule_state").fetchone()[0] == 1
    store.close()


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database at all" * 100,
        b"SQLite format 3\x00" + b"\xff" * 4000,  # a damaged header
    ],
)
def test_corrupt_file_is_moved_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="flux_edge.rules")
    e, clock, store = engine(cfg(hot=hot(for_=30.0)), path, 0.0)
    aside = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert any("moved aside" in r.getMessage() for r in caplog.records)
    e.on_measurement(at(clock, 0.0, 90.0))  # and it works on a fresh file
    assert [r.rule for r in store.load()] == ["hot"]


def test_foreign_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE other (x)")
    db.execute("INSERT INTO other VALUES (1)")
    db.commit()
    db.close()
    store = RuleStore(path)
    assert store.load() == []
    assert len(list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))) == 1


def test_unwritable_state_dir_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing" / "deeper" / STATE_FILE
    caplog.set_level(logging.WARNING, logger="flux_edge.rules")
    e, clock, store = engine(cfg(hot=hot()), path, 0.0)
    assert acts(e.on_measurement(at(clock, 0.0, 90.0))) == ["fan_on"]
    assert store.load() == []
    assert any("cannot be created" in r.getMessage() for r in caplog.records)  # or opened
    assert not any("moved aside" in r.getMessage() for r in caplog.records)


def test_in_state_dir_creates_the_directory(tmp_path: Path) -> None:
    store = RuleStore.in_state_dir(tmp_path / "state")
    assert store.path == tmp_path / "state" / STATE_FILE
    assert store.path.exists()


def test_a_level_rule_firing_again_writes_nothing(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / STATE_FILE)
    clock = Now()
    e = RuleEngine(cfg(l=hot(mode="level")), clock=clock, store=store)
    for t in range(10):
        assert acts(e.on_measurement(at(clock, float(t), 90.0))) == ["fan_on"]
    assert len(store.saves) == 1
    # with a cooldown the last firing time matters, so it is written
    store2 = CountingStore(tmp_path / "c.sqlite")
    e2 = RuleEngine(cfg(l=hot(mode="level", cooldown=1.0)), clock=clock, store=store2)
    for t in range(10):
        e2.on_measurement(at(clock, float(t), 90.0))
    assert len(store2.saves) == 10


def test_a_batch_of_measurements_writes_the_rule_state_once(tmp_path: Path) -> None:
    # issue #12: the rule stage hands the engine what one wake-up delivered; the state of every
    # rule the batch changed goes to SQLite in one transaction, not one per measurement
    store = CountingStore(tmp_path / STATE_FILE)
    clock = Now()
    config = cfg(b=hot(when="temperature > 60.0"))
    e = RuleEngine(config, clock=clock, store=store)
    batch = [at(clock, 0.0, v) for v in (90.0, 10.0, 95.0, 12.0, 99.0)]  # on, off, on, off, on
    commands = e.on_measurements(batch)
    assert acts(commands) == ["fan_on"] * 3
    assert len(store.saves) == 1
    assert {r.rule: r.on for r in store.load()} == {"b": True}
    single = RuleEngine(config, clock=clock, store=CountingStore(tmp_path / "other.sqlite"))
    per_one = [c for m in batch for c in single.on_measurement(m)]
    assert acts(per_one) == acts(commands)  # same commands as one by one
