"""The outbox's memory mode (issue #13, SD-card wear): in memory while the broker acknowledges
promptly, written to the file once records have waited spill_after, back in memory once the
backlog drained; a clean close writes what is left; a crash in memory renews the outbox id."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from flux_edge.model import Measurement
from flux_edge.uplink.outbox import Outbox

TOPIC = "flux-edge/{gateway}/{device}/{name}"


def ms(start: int, n: int) -> list[Measurement]:
    return [Measurement(device="d", name="v", value=i, ts=float(i), source="s")
            for i in range(start, start + n)]


def box(path: Path, spill_after: float = 60.0) -> Outbox:
    return Outbox(path, max_size=1 << 30, gateway="gw", topic=TOPIC, mode="memory",
                  spill_after=spill_after)


def deliver_all(b: Outbox) -> int:
    n = 0
    while (u := b.take(100)) is not None:
        b.acked(u)
        n += len(u.rows)
    return n


def file_rows(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


def on_disk(path: Path) -> tuple[int, int]:
    wal = Path(f"{path}-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def test_prompt_acknowledgements_keep_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    b = box(path)
    b.add(ms(0, 1))
    b.commit()
    deliver_all(b)
    b.commit()  # the backlog drained: into memory
    assert b.in_memory
    before = on_disk(path)
    mtime = path.stat().st_mtime_ns, Path(f"{path}-wal").stat().st_mtime_ns
    delivered = 0
    for i in range(200):
        b.add(ms(1 + i * 10, 10))
        b.commit()
        delivered += deliver_all(b)
    b.commit()
    assert delivered == 2000 and b.in_memory and b.depth() == 0
    assert on_disk(path) == before
    assert (path.stat().st_mtime_ns, Path(f"{path}-wal").stat().st_mtime_ns) == mtime
    b.close()


def test_a_lagging_uplink_spills_the_backlog_to_the_file_and_drains_back(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    b = box(path, spill_after=0.05)
    b.add(ms(0, 1))
    b.commit()
    deliver_all(b)
    b.commit()
    assert b.in_memory
    b.add(ms(1, 50))
    b.commit()  # waiting now
    time.sleep(0.06)
    b.add(ms(51, 50))
    b.commit()  # behind for more than spill_after: written to the file
    assert not b.in_memory and b.spills == 1
    assert file_rows(path) == 100
    assert deliver_all(b) == 100
    b.commit()
    assert b.in_memory  # drained: memory again
    b.close()


def test_a_clean_close_writes_what_is_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    b = box(path)
    b.add(ms(0, 1))
    b.commit()
    deliver_all(b)
    b.commit()
    b.add(ms(1, 30))
    b.commit()
    oid = b.outbox_id
    assert b.in_memory and file_rows(path) == 1  # the first row only: written before memory
    b.close()
    again = box(path)
    assert again.outbox_id == oid and again.depth() == 30
    seqs = [r.seq for r in again.take(100).rows]  # type: ignore[union-attr]
    assert seqs == list(range(2, 32))
    again.close()


def test_a_crash_in_memory_renews_the_outbox_id(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    b = box(path)
    b.add(ms(0, 1))
    b.commit()
    deliver_all(b)
    b.commit()
    b.add(ms(1, 30))
    b.commit()  # seq 2..31 sent from memory, the file still says seq 1
    oid = b.outbox_id
    assert b.in_memory
    b._db.close()  # the process dies: nothing is written
    assert b._file_db is not None
    b._file_db.close()
    b._unlock()
    again = box(path)
    assert again.outbox_id != oid  # so "<id>-2" never names two records
    # what was only in memory is lost (documented); the rows the file held when the outbox went
    # to memory are sent again (already delivered: duplicates under the new id)
    assert again.depth() == 1
    again.close()


def test_a_failing_extra_outbox_does_not_hold_back_the_primary(tmp_path: Path) -> None:
    # issue #13: an extra uplink's outbox that cannot be written (its disk full) was committed
    # first and its error skipped the primary's commit, so the primary stopped too
    import asyncio

    import pytest

    from flux_edge.config import UplinkConfig
    from flux_edge.errors import UplinkError
    from flux_edge.uplink.sender import Uplink

    up = Uplink(UplinkConfig(host="127.0.0.1", port=1), gateway="gw", state_dir=tmp_path)
    extra = Uplink(UplinkConfig(host="127.0.0.1", port=1, outbox_file="outbox-x.sqlite"),
                   gateway="gw", state_dir=tmp_path)

    def full() -> int:
        raise UplinkError("outbox-x: disk full")

    extra.commit = full  # type: ignore[method-assign]
    up.extras["x"] = extra
    up._out.add(ms(0, 3))
    with pytest.raises(UplinkError, match="disk full"):
        up.commit()
    assert up.depth() == 3  # the primary's records are in its file
    up.extras.clear()
    asyncio.run(up.close())
    asyncio.run(extra.close())


def test_records_that_cannot_be_stored_are_bounded_in_memory_and_counted_by_reason(
    tmp_path: Path,
) -> None:
    # issue #13: polled devices and QoS 0 input cannot be held back upstream: while the file
    # cannot be written the outbox keeps what it can in memory and counts the rest by reason
    import pytest

    from flux_edge.errors import UplinkError

    path = tmp_path / "outbox.sqlite"
    b = Outbox(path, max_size=64 * 1024, gateway="gw", topic=TOPIC)
    real = b._db
    b._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                            check_same_thread=False)
    added = 0
    for i in range(40):
        b.add(ms(i * 50, 50))
        added += 50
        with pytest.raises(UplinkError):
            b.commit()
    assert b.health.degraded and b.health.reason == "read-only"
    lost = b.stats.dropped_by_reason["store_unavailable"]
    assert lost > 0 and b.staged + lost == added
    assert b._staged_bytes <= b.memory_max
    b._db.close()
    b._db = real  # writable again
    kept = b.staged
    assert b.commit() == kept and not b.health.degraded
    assert b.depth() + lost == added
    b.close()
