"""The plugin stage: readings through their plugin chains, off the event loop, one lane per chain.

A Wasm call is user code with a wall-time limit (the plugin's ``timeout``); on the event loop, a
plugin that runs to its limit on every call would hold up every source, action, timer and
``/healthz`` for as long. So calls run on worker threads (``Workers``): wasmtime-py calls the C
API through ctypes, which releases the GIL for the call, so the loop keeps running while a module
computes. Host imports (``flux.log_*``) take the GIL back for their short Python part.

Each chain (a Modbus device's, or a whole MQTT or serial source's) is a ``Lane``: its readings
are processed in order, one call of each plugin per job, and what queued up while a call ran is
taken together as the next job (a busy lane batches itself). Lanes do not wait for one another,
so a slow chain delays only its own readings. Threads are started as lanes need them, up to
``Workers.limit``: a chain stuck at its time limit holds one thread, the others keep theirs.

Durability stays exact per source: the readings of a batch are counted per source (``taken``)
and a source's count moves on (``completed(source, count)``) only when every lane holding its
readings up to that count has delivered them, in order. A slow Modbus device's lane therefore
holds back only its own source's count, never an MQTT source's acknowledgements.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux_edge.model import ErrorRecord, Measurement, Reading
from flux_edge.plugins.host import Plugin
from flux_edge.runtime.health import HealthMonitor, Heartbeat

log = logging.getLogger("flux_edge.runtime")

Key = tuple[str, str]  # (source, device): the chain's key; device "" = the whole source's
RunChain = Callable[[list[Plugin], Sequence[Reading]], tuple[list[Measurement], list[ErrorRecord]]]
Deliver = Callable[[str, Sequence[Reading], list[Measurement], list[ErrorRecord]], Awaitable[None]]
Completed = Callable[[str, int], Awaitable[None]]


_Item = tuple["asyncio.Future[Any]", Callable[[Any], Any], Any]


class Workers:
    """Daemon threads that run plugin calls; results come back to the loop as futures.

    A job is ``fn(arg)``; its result (or exception) is set on the future on the loop thread.
    Threads start when a job finds none idle, up to ``limit``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = 8) -> None:
        self.limit = max(1, limit)
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0
        self.busy = 0  # jobs running or waiting for a thread

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        with self._lock:
            self.busy += 1
            start = self._idle == 0 and len(self._threads) < self.limit
            if start:
                self._idle += 1  # the new thread is idle until it takes this job
        if start:
            thread = threading.Thread(
                target=self._work, name=f"flux-plugins-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        self._jobs.put((fut, fn, arg))
        return fut

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fut, fn, arg = item
            with self._lock:
                self._idle -= 1
            try:
                result = fn(arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which decides
                self._finish(fut, None, exc)
            else:
                self._finish(fut, result, None)

    def _finish(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        with self._lock:
            self._idle += 1
            self.busy -= 1
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it any more
            self._loop.call_soon_threadsafe(_settle, fut, result, exc)

    async def close(self, wait: float) -> bool:
        """Let running jobs finish (each is bounded by its plugin's timeout), then stop the
        threads. True if every thread ended within ``wait`` seconds."""
        for _ in self._threads:
            self._jobs.put(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        ended = True
        for thread in self._threads:
            left = max(0.0, deadline - loop.time())
            await asyncio.to_thread(thread.join, left)
            ended = ended and not thread.is_alive()
        self._threads.clear()
        return ended


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


@dataclass(slots=True)
class _Count:
    """Readings of one source up to ``end`` are delivered once ``left`` jobs have been."""

    source: str
    end: int
    left: int


@dataclass(slots=True)
class _Job:
    readings: list[Reading]
    counts: list[_Count]


@dataclass(slots=True)
class Lane:
    key: Key
    chain: list[Plugin]
    beat: Heartbeat
    jobs: collections.deque[_Job] = field(default_factory=collections.deque)
    queued: int = 0  # readings waiting in ``jobs``
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    running: bool = False
    task: asyncio.Task[None] | None = None


class Lanes:
    """The plugin stage's lanes (module docstring). ``dispatch`` is called by the stage that
    takes readings off the queue; each lane's task runs its chain on a worker thread and hands
    the results to ``deliver`` on the loop, in order."""

    def __init__(
        self,
        chains: dict[Key, list[Plugin]],
        *,
        run_chain: RunChain,
        deliver: Deliver,
        completed: Completed,
        monitor: HealthMonitor,
        batch_max: int,
        capacity: int,
        workers: int = 8,
    ) -> None:
        self._chains = chains
        self._run_chain = run_chain
        self._deliver = deliver
        self._completed = completed
        self._monitor = monitor
        self._batch_max = batch_max
        self._capacity = max(capacity, batch_max)
        self._workers_limit = workers
        self.workers: Workers | None = None
        self.lanes: dict[Key, Lane] = {}
        self.taken: collections.Counter[str] = collections.Counter()
        self._order: dict[str, collections.deque[_Count]] = collections.defaultdict(
            collections.deque
        )
        self._idle = asyncio.Event()
        self._idle.set()

    def key_of(self, reading: Reading) -> Key:
        key = (reading.source, reading.device)
        return key if key in self._chains else (reading.source, "")

    def start(self) -> None:
        self.workers = Workers(asyncio.get_running_loop(), self._workers_limit)
        for key, chain in self._chains.items():
            name = f"plugins:{key[0]}/{key[1]}" if key[1] else f"plugins:{key[0]}"
            lane = Lane(key, chain, self._monitor.register(name))
            lane.room.set()
            lane.task = asyncio.get_running_loop().create_task(self._run(lane), name=name)
            self.lanes[key] = lane

    async def dispatch(self, batch: Sequence[Reading]) -> None:
        """Hand a batch of readings to their lanes (waiting while a lane is full)."""
        groups: dict[Key, list[Reading]] = {}
        per_source: collections.Counter[str] = collections.Counter()
        for r in batch:
            groups.setdefault(self.key_of(r), []).append(r)
            per_source[r.source] += 1
        counts: dict[str, _Count] = {}
        lanes_of: collections.Counter[str] = collections.Counter(k[0] for k in groups)
        for source, n in per_source.items():
            self.taken[source] += n
            count = counts[source] = _Count(source, self.taken[source], lanes_of[source])
            self._order[source].append(count)
        self._idle.clear()
        for key, readings in groups.items():
            lane = self.lanes.get(key)
            if lane is None:  # a chain key every reading maps to exists: never, but not silent
                lane = self._missing_lane(key)
            while lane.queued >= self._capacity:
                lane.room.clear()
                await lane.room.wait()
            lane.jobs.append(_Job(readings, [counts[key[0]]]))
            lane.queued += len(readings)
            lane.wake.set()

    def _missing_lane(self, key: Key) -> Lane:
        self._chains[key] = []
        lane = Lane(key, [], self._monitor.register(f"plugins:{key[0]}/{key[1]}"))
        lane.room.set()
        lane.task = asyncio.get_running_loop().create_task(self._run(lane))
        self.lanes[key] = lane
        return lane

    async def _run(self, lane: Lane) -> None:
        assert self.workers is not None
        while True:
            while not lane.jobs:
                lane.running = False
                self._check_idle()
                lane.wake.clear()
                await lane.wake.wait()
            lane.running = True
            readings: list[Reading] = []
            counts: list[_Count] = []
            while lane.jobs and len(readings) < self._batch_max:
                job = lane.jobs.popleft()
                readings += job.readings
                counts += job.counts
            lane.queued -= len(readings)
            lane.room.set()
            lane.beat.begin()
            try:
                if lane.chain:
                    measurements, errors = await self.workers.submit(
                        self._job, (lane.chain, readings)
                    )
                else:
                    measurements, errors = [], []
                await self._deliver(lane.key[0], readings, measurements, errors)
            finally:
                lane.beat.done()
            for count in counts:
                count.left -= 1
            for count in {id(c): c for c in counts}.values():
                await self._advance(count.source)

    def _job(self, args: tuple[list[Plugin], list[Reading]]) -> tuple[
        list[Measurement], list[ErrorRecord]
    ]:
        return self._run_chain(*args)

    async def _advance(self, source: str) -> None:
        order = self._order[source]
        end = 0
        while order and order[0].left <= 0:
            end = order.popleft().end
        if end:
            await self._completed(source, end)

    def _check_idle(self) -> None:
        if all(not lane.jobs and not lane.running for lane in self.lanes.values()):
            self._idle.set()

    async def join(self) -> None:
        """Until every lane has delivered everything dispatched to it."""
        await self._idle.wait()

    async def close(self, wait: float) -> bool:
        """Stop the lanes and wait up to ``wait`` seconds for calls in flight (so that their
        plugins can be closed); False if some call is still running."""
        for lane in self.lanes.values():
            if lane.task is not None:
                lane.task.cancel()
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self.lanes.values():
            self._monitor.unregister(lane.beat.name)
        ended = True
        if self.workers is not None:
            ended = await self.workers.close(wait)
            if not ended:
                log.error(
                    "plugin calls still running %.1f s after stop: their plugins are left open",
                    wait,
                )
        return ended
