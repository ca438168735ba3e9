from __future__ import annotations

import asyncio
import logging

import pytest

from flux_edge.logs import TRACE, parse_filter
from flux_edge.runtime.queues import BoundedQueue
from flux_edge.runtime.supervisor import Supervisor


def test_queue_batches_in_order() -> None:
    async def go() -> None:
        q: BoundedQueue[int] = BoundedQueue("t", 10)
        for i in range(7):
            await q.put(i)
        assert await q.get_batch(4) == [0, 1, 2, 3]
        assert await q.get_batch(10) == [4, 5, 6]
        assert q.got_total == 7 and q.high_watermark == 7

    asyncio.run(go())


def test_queue_drop_oldest_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        q: BoundedQueue[int] = BoundedQueue("t", 3, "drop_oldest")
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                await q.put(i)
        assert q.dropped_total == 2
        assert await q.get_batch(10) == [2, 3, 4]
        assert "queue t is full" in caplog.text

    asyncio.run(go())


def test_queue_block_policy_waits_for_room() -> None:
    async def go() -> None:
        q: BoundedQueue[int] = BoundedQueue("t", 2)
        await q.put(1)
        await q.put(2)
        putter = asyncio.create_task(q.put(3))
        await asyncio.sleep(0)
        assert not putter.done() and q.blocked_total == 1
        assert await q.get_batch(1) == [1]
        await putter
        assert await q.get_batch(5) == [2, 3]
        assert q.dropped_total == 0

    asyncio.run(go())


def test_queue_put_many_keeps_order_and_waits_for_room() -> None:
    async def go() -> None:
        q: BoundedQueue[int] = BoundedQueue("t", 4)
        await q.put_many([0, 1, 2])
        assert q.put_total == 3 and q.high_watermark == 3 and len(q) == 3
        putter = asyncio.create_task(q.put_many([3, 4, 5]))  # one fits, two wait for room
        await asyncio.sleep(0)
        assert not putter.done() and len(q) == 4
        assert await q.get_batch(2) == [0, 1]
        await putter
        assert await q.get_batch(10) == [2, 3, 4, 5]
        await q.put_many([])
        assert q.put_total == 6 and q.dropped_total == 0
        d: BoundedQueue[int] = BoundedQueue("d", 2, "drop_oldest")
        await d.put_many([1, 2, 3])
        assert d.dropped_total == 1 and await d.get_batch(5) == [2, 3]

    asyncio.run(go())


def test_queue_offer_on_full_block_queue_is_counted() -> None:
    q: BoundedQueue[int] = BoundedQueue("t", 1)
    assert q.offer(1)
    assert not q.offer(2)
    assert q.dropped_total == 1 and len(q) == 1


def test_queue_join_waits_for_consumer() -> None:
    async def go() -> None:
        q: BoundedQueue[int] = BoundedQueue("t", 5)
        await q.put(1)
        joined = asyncio.create_task(q.join())
        await asyncio.sleep(0)
        assert not joined.done()
        await q.get_batch(5)
        await asyncio.sleep(0)
        assert not joined.done()  # taken, but not yet processed
        q.task_done_if_empty()
        await asyncio.wait_for(joined, 1)

    asyncio.run(go())


def test_supervisor_restarts_failed_task() -> None:
    async def go() -> None:
        runs = 0
        done = asyncio.Event()

        async def flaky() -> None:
            nonlocal runs
            runs += 1
            if runs < 3:
                raise ValueError(f"boom {runs}")
            done.set()

        sup = Supervisor(backoff_initial=0.001)
        info = sup.spawn("flaky", flaky)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.wait_for(info.done.wait(), 5)
        assert info.restarts == 2 and "boom 2" in info.last_error

    asyncio.run(go())


def test_supervisor_cancel_all() -> None:
    async def go() -> None:
        sup = Supervisor()
        forever = asyncio.Event()
        a = sup.spawn("a", forever.wait)
        b = sup.spawn("b", forever.wait)
        await sup.cancel_all()
        assert a.task.done() and b.task.done()

    asyncio.run(go())


def test_log_filter_parsing() -> None:
    default, per = parse_filter("warn,plugin.modbus_decode=trace,source=debug")
    assert default == logging.WARNING
    assert per == {"flux_edge.plugin.modbus_decode": TRACE, "flux_edge.source": logging.DEBUG}
    with pytest.raises(ValueError, match="loud"):
        parse_filter("info,plugin.x=loud")
