"""What the console keeps while it runs: a short trend per value, the recent log, and the hub
that feeds Server-Sent Events streams.

Nothing here wakes up by itself: the trend is filled by the pipeline's measurement observer
(one dict lookup and a comparison per measurement; a point is kept at most every
``trend / trend_points`` seconds), and the hub does work only while a browser is connected.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

from flux_edge.model import Measurement

_json = msgspec.json.Encoder()


class Trends:
    def __init__(self, span: float, points: int) -> None:
        self.step = span / points
        self.points = points
        self._rings: dict[tuple[str, str], deque[tuple[float, float]]] = {}

    def add(self, ms: Iterable[Measurement]) -> None:
        rings = self._rings
        step = self.step
        for m in ms:
            v = m.value
            if isinstance(v, str) or m.quality != "good":
                continue
            key = (m.device, m.name)
            ring = rings.get(key)
            if ring is None:
                ring = rings[key] = deque(maxlen=self.points)
            elif m.ts - ring[-1][0] < step:
                continue
            ring.append((m.ts, float(v)))

    def of(self, device: str, name: str) -> list[tuple[float, float]]:
        ring = self._rings.get((device, name))
        return list(ring) if ring else []


class LogBuffer(logging.Handler):
    """The last ``size`` log records (INFO and above), for the console's log view."""

    def __init__(self, size: int, hub: Hub | None = None) -> None:
        super().__init__(logging.INFO)
        self.records: deque[dict[str, Any]] = deque(maxlen=max(size, 1))
        self.hub = hub
        self.seq = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):
            msg = str(record.msg)
        self.seq += 1
        rec = {"seq": self.seq, "ts": record.created, "level": record.levelname.lower(),
               "logger": record.name, "message": msg[:2000]}
        self.records.append(rec)  # deque.append is atomic: records may come from any thread
        hub = self.hub
        if hub is not None and hub.clients and hub.loop is not None:
            if threading.get_ident() == hub.loop_thread:
                hub.publish("log", rec)
            else:  # a plugin lane's worker thread: the hub belongs to the loop
                hub.loop.call_soon_threadsafe(hub.publish, "log", rec)


class _Client:
    __slots__ = ("dropped", "event", "queue")

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque(maxlen=256)
        self.event = asyncio.Event()
        self.dropped = 0


class Hub:
    """Fan-out of live events to the connected SSE streams. Measurements are coalesced: the
    latest value of each (device, name) goes out at most every ``flush_s`` seconds."""

    def __init__(self, flush_s: float = 0.25) -> None:
        self.clients: set[_Client] = set()
        self.flush_s = flush_s
        self._pending: dict[tuple[str, str], Measurement] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0

    def bind(self) -> None:
        """Call on the event loop that serves the streams."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()

    def join(self) -> _Client:
        c = _Client()
        self.clients.add(c)
        return c

    def leave(self, c: _Client) -> None:
        self.clients.discard(c)
        if not self.clients and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._pending.clear()

    def publish(self, event: str, data: Any) -> None:
        data_frame = frame(event, data)
        for c in self.clients:
            if len(c.queue) == c.queue.maxlen:
                c.dropped += 1
            c.queue.append(data_frame)
            c.event.set()

    def measurements(self, ms: Iterable[Measurement]) -> None:
        if not self.clients:
            return
        pending = self._pending
        for m in ms:
            pending[(m.device, m.name)] = m
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._pending:
            return
        now = time.time()
        values = [value_view(m, now) for m in self._pending.values()]
        self._pending = {}
        self.publish("values", values)


def frame(event: str, data: Any) -> bytes:
    """One Server-Sent Events frame."""
    return b"event: " + event.encode() + b"\ndata: " + _json.encode(data) + b"\n\n"


def value_view(m: Measurement, now: float) -> dict[str, Any]:
    return {"device": m.device, "name": m.name, "value": m.value, "unit": m.unit,
            "quality": m.quality, "ts": m.ts, "age_s": round(max(now - m.ts, 0.0), 3),
            "source": m.source}
