"""A bounded queue between two stages, with an explicit and counted overflow policy.

asyncio.Queue can block or raise, but it cannot drop-and-count, and it has no batch get. A stage
reads whole batches (``get_batch``) so that one plugin call carries many messages.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Policy = Literal["block", "drop_oldest"]

log = logging.getLogger("flux_edge.runtime.queue")


class BoundedQueue(Generic[T]):
    """FIFO with a capacity.

    ``put`` waits for room when the policy is "block" (back-pressure: a poller simply polls later);
    with "drop_oldest" it never waits, drops the oldest item and counts it. Overflow is logged at
    most once per ``log_every`` seconds with the number dropped since the last log line.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        policy: Policy = "block",
        *,
        log_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"queue {name!r}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.policy: Policy = policy
        self._items: collections.deque[T] = collections.deque()
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._clock = clock
        self._log_every = log_every
        self._last_log = -float("inf")
        self._dropped_since_log = 0
        # counters, read by metrics and tests
        self.put_total = 0
        self.got_total = 0
        self.dropped_total = 0
        self.blocked_total = 0
        self.high_watermark = 0

    def __len__(self) -> int:
        return len(self._items)

    def _push(self, item: T) -> None:
        self._items.append(item)
        self.put_total += 1
        n = len(self._items)
        self.high_watermark = max(self.high_watermark, n)
        if n >= self.capacity:
            self._not_full.clear()
        self._not_empty.set()
        self._empty.clear()

    def offer(self, item: T) -> bool:
        """Put without waiting. Returns False if an item had to be dropped to make room."""
        dropped = False
        if len(self._items) >= self.capacity:
            if self.policy == "drop_oldest":
                self._items.popleft()
            dropped = True
            self._count_drop()
            if self.policy == "block":  # caller chose not to wait: the new item is the one lost
                return False
        self._push(item)
        return not dropped

    def try_put(self, item: T) -> bool:
        """Put if there is room (True); otherwise change nothing, count nothing (False): the
        caller falls back to ``put`` and waits."""
        if len(self._items) >= self.capacity:
            return False
        self._push(item)
        return True

    async def put(self, item: T) -> None:
        if self.policy == "drop_oldest":
            self.offer(item)
            return
        if len(self._items) >= self.capacity:
            self.blocked_total += 1
            while len(self._items) >= self.capacity:
                await self._not_full.wait()
        self._push(item)

    async def put_many(self, items: Sequence[T]) -> None:
        """``put`` each item in order; one call for a batch (a lane's measurements)."""
        if self.policy == "drop_oldest":
            for item in items:
                self.offer(item)
            return
        buf = self._items
        cap = self.capacity
        if len(buf) + len(items) <= cap:  # room for all of them: no waiting, one bookkeeping
            if not items:
                return
            buf.extend(items)
            self.put_total += len(items)
            n = len(buf)
            self.high_watermark = max(self.high_watermark, n)
            if n >= cap:
                self._not_full.clear()
            self._not_empty.set()
            self._empty.clear()
            return
        for item in items:
            await self.put(item)

    async def get_batch(self, max_items: int) -> list[T]:
        """Wait for at least one item, then take up to ``max_items`` without waiting further."""
        while not self._items:
            await self._not_empty.wait()
        items = self._items
        if len(items) <= max_items:
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(max_items)]
        self.got_total += len(batch)
        if not items:
            self._not_empty.clear()
        self._not_full.set()
        return batch

    def drain(self) -> list[T]:
        """Take every item without waiting (after the consumer has stopped)."""
        batch = list(self._items)
        self._items.clear()
        self.got_total += len(batch)
        self._not_empty.clear()
        self._not_full.set()
        self._empty.set()
        return batch

    def task_done_if_empty(self) -> None:
        """Called by the consumer after it finished processing a batch."""
        if not self._items:
            self._empty.set()

    async def join(self) -> None:
        """Wait until the queue is empty and its consumer has finished its last batch."""
        await self._empty.wait()

    def _count_drop(self) -> None:
        self.dropped_total += 1
        self._dropped_since_log += 1
        now = self._clock()
        if now - self._last_log >= self._log_every:
            log.warning(
                "queue %s is full (capacity %d, policy %s): %d item(s) dropped since last report, "
                "%d in all; the next stage is not keeping up",
                self.name,
                self.capacity,
                self.policy,
                self._dropped_since_log,
                self.dropped_total,
            )
            self._last_log = now
            self._dropped_since_log = 0
