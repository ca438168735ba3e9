"""A source kind written the way docs/architecture.md ("Adding a source kind") says: one module
with its config struct, its checks and its factory. It counts: every ``interval`` it emits
``{"count": N}`` as a reading of its device. Registered by the tests that use it
(``tests/unit/test_kinds.py``); a kind in flux_edge/sources/ is found by its module name."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Annotated, Any

from msgspec import Meta

from flux_edge.config import DURATION, NAME, Key, Kind, SourceSpec
from flux_edge.config.validate import _Validator
from flux_edge.model import Reading
from flux_edge.sources import Emit, Source, SourceEnv, SourceHealth, StatusCallback


class CounterSource(SourceSpec, frozen=True, kw_only=True, tag="counter"):
    """``[sources.NAME] type = "counter"``."""

    interval: Annotated[float, Meta(gt=0), DURATION] = 1.0  # seconds between two readings
    start: int = 0  # the first count
    device: Annotated[str, NAME] = ""  # default: the source's table name

    def plugin_context(self, name: str, key: str) -> dict[str, Any]:
        return {"device": self.device or name}


def _check(v: _Validator, table: dict[str, Any], path: Key, clean: bool) -> None:
    """Checks across the table's fields (here: one field, to show the shape)."""
    if clean and table.get("start", 0) < 0:
        v.report((*path, "start"), "a count starts at 0 or more")


class CounterReader:
    def __init__(self, name: str, cfg: CounterSource, emit: Emit) -> None:
        self.name = name
        self._cfg = cfg
        self._emit = emit
        self._device = cfg.device or name
        self._health = {self._device: SourceHealth()}

    @property
    def health(self) -> Mapping[str, SourceHealth]:
        return self._health

    async def run(self) -> None:
        count = self._cfg.start
        health = self._health[self._device]
        while True:
            payload = b'{"count": %d}' % count
            await self._emit(
                Reading(source=self.name, device=self._device, ts=time.time(), payload=payload)
            )
            health.polls += 1
            health.last_success_ts = time.time()
            health.quality = "good"
            count += 1
            await asyncio.sleep(self._cfg.interval)

    async def close(self) -> None:
        return None


def make_source(
    name: str, cfg: CounterSource, emit: Emit, on_status: StatusCallback, env: SourceEnv
) -> Source:
    return CounterReader(name, cfg, emit)


KIND = Kind(
    section="sources",
    tag="counter",
    struct=CounterSource,
    factory=make_source,
    table_checks={CounterSource: _check},
)
