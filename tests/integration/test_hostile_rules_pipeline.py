"""Hostile rules in the daemon, beside a healthy rule on the same source.

The bombs are refused when the config loads (the daemon never sees them); what passes the
budget but fails at every evaluation (a CEL runtime error, a library failure of the worst kind,
MemoryError) or is heavy but within budget runs in the real pipeline: each failure is a counted
rule error with its reason, the rule stage never crashes, the healthy rule fires on every
reading, and the process's RSS stays far below the unit's MemoryMax (256 MiB).

Real parts: a pymodbus server, the real poller, the modbus_decode plugin, the rule stage.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flux_edge.errors import ConfigError
from flux_edge.kinds import load_config_text
from flux_edge.model import Measurement
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers, Pipeline
from flux_edge.sim.modbus_server import SimulatedModbusServer
from tests.conftest import bundled_wasm

pytestmark = pytest.mark.integration

MEMORY_MAX = 256 << 20
L40 = "[" + ",".join(str(i) for i in range(40)) + "]"
L25 = "[" + ",".join(str(i) for i in range(25)) + "]"
A8 = "a+a+a+a+a+a+a+a"
BOMBS = {
    "string_bomb": f"[name+name+name+name]{f'.map(a, {A8})' * 9}[0].size() > 0 && level > 0.0",
    "list_bomb": f"[{L40}]{'.map(l, l + l + l + l)' * 6}[0].size() > 0 && level > 0.0",
    "nested": f"{L40}.all(a, {L40}.all(b, {L40}.all(c, level > double(a + b + c))))",
    "regex_bomb": 'name.matches("[a-z]{1000}[a-z]{1000}[a-z]{1000}") && level > 0.0',
    "bad_regex": 'level > 0.0 && name.matches("(unclosed")',
}

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.modbus_decode]

[sources.tank]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "20ms"
chain = ["modbus_decode"]
registers = [{{ name = "level", address = 0, type = "uint16" }}]

[rules.healthy]
when = "level > 10.0"
mode = "level"
actions = []

[rules.divides]
when = "int(level) / (int(level) - 42) > 1"
mode = "level"
actions = []

[rules.explodes]
when = "level > 1.0"
mode = "level"
actions = []

[rules.heavy_strings]
when = "level > 0.0 && {l40}.map(a, name + string(a) + name).exists(s, s.size() > 4000)"
mode = "level"
actions = []

[rules.heavy_lists]
when = "level > 0.0 && {l25}.map(a, {l25}.filter(b, b > a)).exists(l, l.size() > 100)"
mode = "level"
actions = []
{extra}
"""


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


class _Raising:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def eval(self, **_: Any) -> Any:
        raise self.exc


def test_bombs_are_refused_when_the_config_loads(tmp_path: Path) -> None:
    extra = "".join(
        f'\n[rules.{name}]\nwhen = """{expr}"""\nactions = []\n' for name, expr in BOMBS.items()
    )
    text = CONFIG.format(state=tmp_path / "state", port=1502, l40=L40, l25=L25, extra=extra)
    with pytest.raises(ConfigError) as info:
        load_config_text(text, str(tmp_path / "site.toml"))
    refused = {p.path for p in info.value.problems if p.severity == "error"}
    assert refused == {f"rules.{name}.when" for name in BOMBS}
    assert all(p.line > 0 for p in info.value.problems)


def test_failing_and_heavy_rules_never_hurt_the_healthy_rule(tmp_path: Path) -> None:
    bundled_wasm("modbus_decode")
    readings = 60

    async def go() -> None:
        async with SimulatedModbusServer(port=0) as server:
            server.set_holding(0, 42)
            text = CONFIG.format(
                state=tmp_path / "state", port=server.port, l40=L40, l25=L25, extra=""
            )
            config = load_config_text(text, str(tmp_path / "site.toml"))

            holder: list[Pipeline] = []
            rss_before = _rss()[0]
            rss_max = [rss_before]
            enough = asyncio.Event()

            def started(p: Pipeline) -> None:
                holder.append(p)
                rule = p.engine._by_name["explodes"]
                rule.when.condition._program = _Raising(MemoryError("std::bad_alloc"))

            def on_measurements(source: str, ms: list[Measurement]) -> None:
                rss_max[0] = max(rss_max[0], _rss()[0])
                stats = holder[0].engine.stats
                if min(stats["healthy"].firings, stats["explodes"].errors) >= readings:
                    enough.set()

            stop = asyncio.Event()
            obs = Observers(measurements=[on_measurements])
            runner = asyncio.create_task(
                run_pipeline(config, observers=obs, stop=stop, started=started)
            )
            try:
                await asyncio.wait_for(enough.wait(), 60)
            finally:
                stop.set()
                await runner

            pipeline = holder[0]
            st = pipeline.engine.stats
            # the healthy rule fired on every reading it saw, without a single error
            assert st["healthy"].errors == 0
            assert st["healthy"].firings == st["healthy"].evaluations >= readings
            # each failing rule failed on every reading, counted with its reason
            assert st["explodes"].errors_by_reason == {"memory": st["explodes"].evaluations}
            assert st["divides"].errors_by_reason == {"runtime": st["divides"].evaluations}
            assert "divide by zero" in st["divides"].last_error
            assert st["divides"].consecutive_errors == st["divides"].evaluations
            assert set(pipeline.engine.failing(at_least=readings)) >= {"divides", "explodes"}
            # the heavy ones ran within their budget, every time, without error
            for name in ("heavy_strings", "heavy_lists"):
                assert st[name].errors == 0
                assert st[name].evaluations >= readings
                assert 0 < st[name].cost <= st[name].max_cost
            assert pipeline.stats["rules"].errors == 0  # the rule stage never failed
            # this process also holds whatever the tests before this one left (pytest runs them
            # all in one process), so what counts is the growth while the bombs ran
            assert rss_max[0] - rss_before < 64 << 20
            assert _rss()[0] - rss_before < MEMORY_MAX // 4

    asyncio.run(go())
