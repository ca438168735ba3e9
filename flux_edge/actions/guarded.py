"""Running a command through the safety layer and into the audit log: the one sequence.

    guard = Guarded(safety, audit)
    outcome = await guard.run(cmd, executor, values)   # None when the safety layer blocked it

For each command: ``SafetyLayer.check`` -> (blocked: audit record, done) -> ``executor.execute``
-> ``SafetyLayer.record`` -> audit record with the outcome. Commands to actions outside every
actuator are allowed by the check and audited too (every actuation attempt is).

check, execute and record of one actuator run under that actuator's lock: its "on" and "off"
actions are different actions (the pipeline's per-action locks would let them overlap), and a
decision must see the state the previous command left. A command driving several actuators takes
their locks in name order. A cancelled execution (shutdown) is audited as failed and re-raised;
the safety layer records nothing for it (the state is not known).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from flux_edge.actions.audit import AuditLog
from flux_edge.actions.safety import SafetyLayer, Values
from flux_edge.model import Command, Outcome

__all__ = ["Executor", "Guarded"]


class Executor(Protocol):
    async def execute(self, cmd: Command) -> Outcome: ...


class Guarded:
    def __init__(
        self,
        safety: SafetyLayer,
        audit: AuditLog | None = None,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.safety = safety
        self.audit = audit
        self._wall = wall
        self._locks: dict[str, asyncio.Lock] = {}

    async def run(self, cmd: Command, executor: Executor, values: Values) -> Outcome | None:
        """Check, execute, record and audit ``cmd``. Returns the outcome, or None when blocked.
        ``values``: device -> name -> latest measurement, as the safety layer reads them."""
        names = sorted(self.safety.actuators_of(cmd.action))
        async with contextlib.AsyncExitStack() as stack:
            for name in names:
                await stack.enter_async_context(self._locks.setdefault(name, asyncio.Lock()))
            decision = self.safety.check(cmd, values)
            if decision.blocked:
                if self.audit is not None:
                    self.audit.record(
                        cmd, allowed=False, reason=decision.reason, actuator=decision.actuator
                    )
                return None
            started = time.perf_counter()
            try:
                outcome = await executor.execute(cmd)
            except asyncio.CancelledError:
                if self.audit is not None:
                    cancelled = Outcome(
                        command=cmd, ok=False, ts=self._wall(),
                        latency_s=time.perf_counter() - started,
                        error=f"action {cmd.action!r}: cancelled (shutdown?) before it completed",
                    )
                    self.audit.record(cmd, allowed=True, reason=decision.reason,
                                      outcome=cancelled, actuator=decision.actuator)
                raise
            self.safety.record(cmd, outcome)
            if self.audit is not None:
                self.audit.record(
                    cmd, allowed=True, reason=decision.reason, outcome=outcome,
                    actuator=decision.actuator,
                )
            return outcome
