"""Rules, the safety layer and the audit log in the running pipeline, against a real pymodbus
boiler: a `for` timer fires between polls, an actuator's min_on holds a command back, and
shutdown leaves the burner in its safe state, every attempt audited."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flux_edge.demo.boiler import BoilerSimulator
from flux_edge.kinds import load_config_text
from flux_edge.model import Command, Outcome
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers, Pipeline
from tests.conftest import bundled_wasm

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.modbus_decode]

[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "{interval}"
chain = ["modbus_decode"]
registers = [
  {{ name = "temperature", address = 0, type = "int16", scale = 0.1 }},
  {{ name = "burner", function = "coil", address = 0 }},
]

[rules.warm]
device = "boiler"
when = "temperature > 50"
for = "{hold}"
actions = ["burner_off"]

[actions.burner_off]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = false

[actions.burner_on]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = true

[actuators.burner]
on = "burner_on"
off = "burner_off"
safe = "off"
min_on = "{min_on}"
"""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    blocked: list[Command] = field(default_factory=list)
    pipeline: Pipeline | None = None
    burner_after: bool | None = None
    polls: int = 0


def run(tmp_path: Path, *, interval: str, hold: str, min_on: str) -> Run:
    """Run until the rule's command ran or was blocked, then stop (SIGTERM path) and report."""
    bundled_wasm("modbus_decode")
    result = Run()

    async def go() -> None:
        sim = BoilerSimulator(port=0, start_temperature=55.0, burner=True, tick=3600.0)
        await sim.start()  # physics frozen (one step an hour): 55 °C, burner on
        text = CONFIG.format(state=tmp_path / "state", port=sim.port, interval=interval,
                             hold=hold, min_on=min_on)
        config = load_config_text(text, str(tmp_path / "site.toml"))
        done = asyncio.Event()

        def on_outcome(o: Outcome) -> None:
            result.outcomes.append(o)
            if o.command.rule == "warm":
                done.set()

        def on_blocked(cmd: Command) -> None:
            result.blocked.append(cmd)
            done.set()

        def started(p: Pipeline) -> None:
            result.pipeline = p

        stop = asyncio.Event()
        observers = Observers(outcomes=[on_outcome], blocked=[on_blocked])
        runner = asyncio.create_task(
            run_pipeline(config, observers=observers, stop=stop, started=started)
        )
        try:
            await asyncio.wait_for(done.wait(), 10)
            assert result.pipeline is not None
            result.polls = result.pipeline.sources["boiler"].health["boiler"].polls
        finally:
            stop.set()
            await runner
            result.burner_after = sim.burner
            await sim.stop()

    asyncio.run(go())
    return result


def audit(tmp_path: Path) -> list[dict[str, object]]:
    text = (tmp_path / "state" / "audit.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_for_timer_fires_between_polls_and_shutdown_is_audited(tmp_path: Path) -> None:
    # one poll every 30 s: the rule must fire from its timer 0.3 s after the first poll
    r = run(tmp_path, interval="30s", hold="300ms", min_on="0s")
    warm = [o for o in r.outcomes if o.command.rule == "warm"]
    assert len(warm) == 1 and warm[0].ok, warm
    cause = warm[0].command.cause
    assert cause is not None
    assert 0.3 <= warm[0].command.ts - cause.ts < 2.0  # fired by the timer ...
    assert r.polls == 1  # ... with no second poll to trigger it
    assert r.burner_after is False
    rules = [rec["rule"] for rec in audit(tmp_path)]
    assert rules[0] == "warm" and "safety" in rules  # the shutdown's safe state, audited too


def test_min_on_blocks_an_early_off_but_never_the_safe_state(tmp_path: Path) -> None:
    # the actuator state restored from disk says the burner went on a moment ago; min_on = 1 h
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    (state / "safety.json").write_text(
        json.dumps({"burner": {"state": "on", "last_switch": now, "history": [now]}})
    )
    r = run(tmp_path, interval="100ms", hold="0s", min_on="1h")
    assert [c.action for c in r.blocked] == ["burner_off"]
    assert not [o for o in r.outcomes if o.command.rule == "warm"]
    assert r.burner_after is False  # shutdown's safe state went through regardless
    records = audit(tmp_path)
    blocked = [rec for rec in records if rec["rule"] == "warm"]
    assert blocked and "min_on" in json.dumps(blocked[0])
    assert any(rec["rule"] == "safety" for rec in records)


def test_audit_tail_shows_what_the_pipeline_did(tmp_path: Path) -> None:
    import subprocess
    import sys

    run(tmp_path, interval="30s", hold="0s", min_on="0s")
    out = subprocess.run(
        [sys.executable, "-m", "flux_edge", "audit", "tail", "--file",
         str(tmp_path / "state" / "audit.jsonl")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("warm" in line and "burner_off" in line for line in lines), out.stdout
    assert any("safety" in line for line in lines), out.stdout


def test_upstream_commands_take_the_pipelines_one_path(tmp_path: Path) -> None:
    # regression: upstream commands called the guard directly, so an actuator they switched was
    # not saved to safety.json (a restart forgot the switch and min_on with it), the action's
    # lock was skipped and nothing was counted; they now run through Pipeline.execute
    from flux_edge.uplink.commands import Commander, UpstreamCommand

    bundled_wasm("modbus_decode")

    async def go() -> tuple[bool, str, bool, list[int], dict[str, object]]:
        sim = BoilerSimulator(port=0, start_temperature=20.0, burner=False, tick=3600.0)
        await sim.start()
        text = CONFIG.format(state=tmp_path / "state", port=sim.port, interval="100ms",
                             hold="1h", min_on="1h")
        config = load_config_text(text, str(tmp_path / "site.toml"))
        up = asyncio.Event()
        pipelines: list[Pipeline] = []

        def started(p: Pipeline) -> None:
            pipelines.append(p)
            up.set()

        stop = asyncio.Event()
        runner = asyncio.create_task(run_pipeline(config, stop=stop, started=started))
        try:
            await asyncio.wait_for(up.wait(), 10)
            p = pipelines[0]
            commander = Commander(p, {"on": "burner_on", "off": "burner_off"})
            on = await commander.run(UpstreamCommand("mqtt", "on"))
            off = await commander.run(UpstreamCommand("mqtt", "off"))  # min_on = 1 h
            saved = json.loads((tmp_path / "state" / "safety.json").read_text())
            counts = p.action_counts["burner_on"][:1] + p.action_counts["burner_off"][2:]
            burner = sim.burner
        finally:
            stop.set()
            await runner
            await sim.stop()
        return on.ok, off.reason, burner, counts, saved

    on_ok, off_reason, burner, counts, saved = asyncio.run(go())
    assert on_ok and burner is True
    assert "min_on" in off_reason
    assert counts == [1, 1]  # one ok, one blocked, counted like a rule's
    burner_state = saved["burner"]
    assert isinstance(burner_state, dict) and burner_state["state"] == "on"
    rules = [rec["rule"] for rec in audit(tmp_path)]
    assert rules.count("uplink:mqtt") == 2
