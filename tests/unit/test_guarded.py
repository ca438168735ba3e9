"""check -> execute -> record -> audit (flux_edge/actions/guarded.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from flux_edge.actions.audit import AuditLog
from flux_edge.actions.guarded import Guarded
from flux_edge.actions.safety import SafetyLayer
from flux_edge.model import Command, Outcome
from tests.unit.test_safety import Clock, make_config


class Device:
    """An executor whose writes complete when the test lets them (``gate``)."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def execute(self, cmd: Command) -> Outcome:
        self.calls.append(cmd.action)
        self.started.set()
        await self.gate.wait()
        return Outcome(command=cmd, ok=self.ok, ts=0.0, latency_s=0.002,
                       error="" if self.ok else "write failed")


def setup(tmp_path: Path, **actuator: Any) -> tuple[Guarded, SafetyLayer, AuditLog, Clock]:
    clock = Clock()
    safety = SafetyLayer(make_config(**actuator), clock=clock)
    audit = AuditLog(tmp_path / "audit.jsonl", max_size=1 << 20, keep=1, clock=clock)
    return Guarded(safety, audit), safety, audit, clock


def audit_lines(audit: AuditLog) -> list[dict[str, Any]]:
    audit.sync()
    return [json.loads(x) for x in audit.path.read_text().splitlines()]


def test_allowed_blocked_and_pass_through_are_all_audited(tmp_path: Path) -> None:
    guard, safety, audit, clock = setup(tmp_path, min_on=30)
    device = Device()

    async def scenario() -> None:
        on = await guard.run(Command(rule="cold", action="burner_on", ts=0), device, {})
        assert on is not None and on.ok
        clock.advance(5)
        off = await guard.run(Command(rule="warm", action="burner_off", ts=0), device, {})
        assert off is None  # min_on
        horn = await guard.run(Command(rule="alarm", action="horn", ts=0), device, {})
        assert horn is not None

    asyncio.run(scenario())
    assert device.calls == ["burner_on", "horn"]
    assert safety.state("burner") == "on"
    recs = audit_lines(audit)
    assert [(r["action"], r["decision"], r["actuator"]) for r in recs] == [
        ("burner_on", "allowed", "burner"),
        ("burner_off", "blocked", "burner"),
        ("horn", "allowed", ""),
    ]
    assert recs[0]["outcome"]["ok"] is True and recs[1]["outcome"] is None
    assert recs[1]["reason"] == "min_on: burner switched on 5 s ago, min_on is 30 s"


def test_on_and_off_of_one_actuator_do_not_overlap(tmp_path: Path) -> None:
    guard, safety, _audit, _clock = setup(tmp_path, min_on=30)
    device = Device()
    device.gate.clear()

    async def scenario() -> tuple[Outcome | None, Outcome | None]:
        on = asyncio.create_task(
            guard.run(Command(rule="a", action="burner_on", ts=0), device, {})
        )
        await device.started.wait()  # burner_on is being written
        off = asyncio.create_task(
            guard.run(Command(rule="b", action="burner_off", ts=0), device, {})
        )
        await asyncio.sleep(0)  # let it reach the lock
        assert not off.done() and device.calls == ["burner_on"]
        device.gate.set()
        return await on, await off

    on, off = asyncio.run(scenario())
    # off was decided after on was recorded: the burner had just been switched on
    assert on is not None and on.ok and off is None
    assert safety.stats["burner"].blocked_by["min_on"] == 1


def test_a_cancelled_action_is_audited_as_failed(tmp_path: Path) -> None:
    guard, safety, audit, _clock = setup(tmp_path)
    device = Device()
    device.gate.clear()

    async def scenario() -> None:
        task = asyncio.create_task(
            guard.run(Command(rule="a", action="burner_on", ts=0), device, {})
        )
        await device.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    (rec,) = audit_lines(audit)
    assert rec["decision"] == "allowed" and rec["outcome"]["ok"] is False
    assert "cancelled" in rec["outcome"]["error"]
    assert safety.state("burner") is None  # nothing recorded: the state is not known


def test_failed_outcome_is_audited_and_changes_no_state(tmp_path: Path) -> None:
    guard, safety, audit, _clock = setup(tmp_path)

    async def scenario() -> Outcome | None:
        return await guard.run(Command(rule="a", action="burner_on", ts=0), Device(ok=False), {})

    outcome = asyncio.run(scenario())
    assert outcome is not None and not outcome.ok
    assert safety.state("burner") is None and safety.stats["burner"].failures == 1
    (rec,) = audit_lines(audit)
    assert rec["outcome"] == {"ok": False, "verified": None, "error": "write failed",
                              "latency_ms": 2.0}
