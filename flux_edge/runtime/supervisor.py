"""The supervisor owns every long-running task of the daemon.

A task that returns is done; a task that raises is logged with its name and restarted after an
exponential backoff, so one faulty stage cannot end the daemon while the rest keeps serving.
Cancellation is how tasks are stopped, in the order the caller chooses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("flux_edge.runtime")


@dataclass(slots=True)
class TaskInfo:
    name: str
    task: asyncio.Task[None]
    restarts: int = 0
    last_error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, *, backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self._tasks: dict[str, TaskInfo] = {}
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        return self._tasks

    def spawn(
        self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True
    ) -> TaskInfo:
        if name in self._tasks and not self._tasks[name].task.done():
            raise RuntimeError(f"task {name!r} is already running")
        task = asyncio.get_running_loop().create_task(
            self._guard(name, factory, restart), name=name
        )
        info = TaskInfo(name=name, task=task)
        self._tasks[name] = info
        return info

    async def _guard(
        self, name: str, factory: Callable[[], Awaitable[None]], restart: bool
    ) -> None:
        delay = self._backoff_initial
        try:
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    info = self._tasks.get(name)
                    if info is not None:
                        info.restarts += 1
                        info.last_error = f"{type(exc).__name__}: {exc}"
                    if not restart:
                        log.exception("task %s failed and is not restarted", name)
                        return
                    log.exception("task %s failed; restarting in %.1f s", name, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
        finally:
            info = self._tasks.get(name)
            if info is not None:
                info.done.set()

    async def cancel(self, *names: str) -> None:
        """Cancel the named tasks and wait until they have finished."""
        infos = [self._tasks[n] for n in names if n in self._tasks]
        for info in infos:
            info.task.cancel()
        if infos:
            await asyncio.wait([info.task for info in infos])

    async def cancel_all(self) -> None:
        await self.cancel(*reversed(list(self._tasks)))
