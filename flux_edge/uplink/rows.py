"""What the uplink's outbox holds and hands out: rows (one stored record each), units (the rows
of one publish), the published form of a row, and the uplink's counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class UplinkStats:
    """Counters of the uplink, read by metrics and tests. ``committed == acked + dropped + depth``
    holds at all times unless records were dropped before reaching a commit (``staged`` rows that
    could not be committed while the disk failed, or whose topic cannot be published to)."""

    staged: int = 0  # records given to add()
    committed: int = 0  # records taken by a successful commit (stored, or dropped at once)
    commits: int = 0  # transactions that stored records
    published: int = 0  # publishes acknowledged by the broker (one per batch in "batch" format)
    acked: int = 0  # records acknowledged by the broker
    dropped: int = 0  # records deleted unsent because the outbox was full (or unpublishable)
    # the same, by reason: "outbox_full" (the size bound), "store_unavailable" (the file could
    # not be written and memory was full), "unpublishable" (a topic the broker cannot take),
    # "shutdown" (staged, never committed, at close)
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    publish_errors: int = 0
    reconnects: int = 0  # connections accepted after the first one
    last_error: str = ""


class Row(NamedTuple):
    seq: int
    size: int  # bytes counted against max_size
    topic: str
    payload: bytes  # the record without id and seq: '"gateway":...}'


@dataclass(slots=True)
class Unit:
    """Rows sent as one publish. No live row lies between ``prev`` and ``rows[0].seq``."""

    prev: int
    rows: list[Row]

    @property
    def first(self) -> int:
        return self.rows[0].seq

    @property
    def last(self) -> int:
        return self.rows[-1].seq

    @property
    def size(self) -> int:
        return sum(r.size for r in self.rows)


def record(outbox_id: bytes, row: Row) -> bytes:
    """The published JSON object of one row: id and seq spliced in front of the stored bytes."""
    s = str(row.seq).encode()
    return b'{"id":"' + outbox_id + b"-" + s + b'","seq":' + s + b"," + row.payload
