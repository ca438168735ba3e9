"""A source kind declared in one module (tests/support/counter_kind.py) runs in the daemon like the
built-in kinds: the pipeline builds it with its factory and its readings go through a real plugin
chain (json_normalize.wasm)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flux_edge.kinds import KINDS, load_config_text
from flux_edge.model import Measurement
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers
from tests.conftest import bundled_wasm
from tests.support import counter_kind

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.json_normalize.config]
fields = [{{ path = "count" }}]

[sources.ticks]
type = "counter"
interval = "10ms"
start = 7
device = "ticker"
chain = ["json_normalize"]
"""


def test_a_kind_from_one_module_runs_through_a_plugin_chain(tmp_path: Path) -> None:
    bundled_wasm("json_normalize")
    KINDS.sources.add(counter_kind.KIND)
    try:
        config = load_config_text(CONFIG.format(state=tmp_path / "state"))
    finally:
        KINDS.sources.remove("counter")
    seen: list[Measurement] = []
    enough = asyncio.Event()

    def on_measurements(source: str, ms: list[Measurement]) -> None:
        seen.extend(ms)
        if len(seen) >= 3:
            enough.set()

    async def go() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(
            run_pipeline(config, observers=Observers(measurements=[on_measurements]), stop=stop)
        )
        try:
            await asyncio.wait_for(enough.wait(), 30)
        finally:
            stop.set()
            await runner

    KINDS.sources.add(counter_kind.KIND)  # the pipeline builds the source from the registry
    try:
        asyncio.run(go())
    finally:
        KINDS.sources.remove("counter")
    assert [(m.device, m.name, m.value) for m in seen[:3]] == [
        ("ticker", "count", 7.0), ("ticker", "count", 8.0), ("ticker", "count", 9.0)
    ]
    assert all(m.source == "ticks" for m in seen)
