"""Commands from upstream: a message on the uplink's own connection asks for a configured action,
which runs through the same path as a rule's command (``Pipeline.execute``: the action's lock,
``actions/guarded.py``'s safety check, execution, state record and audit, the counts, the safety
state saved after a switch), so interlocks, minimum on/off times and rate limits apply and
the audit log names the upstream (``rule = "uplink:<protocol>"``).

Only the uplink's connection can command: the subscriptions are made on its client, to the
broker its config names. A command name maps to an action by the encoder's ``commands`` table;
a name that is not in it is refused ("unknown command") without running anything. Each outcome
is counted (``CommandStats``), and answered where the protocol has replies (ThingsBoard RPC, the
plain command topic's ``/reply``).

The runtime binds ``Commander`` to the pipeline (its ``execute``, executors and safety layer),
used through a Protocol so this module imports nothing of the runtime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from flux_edge.model import Command, Outcome

__all__ = ["CommandResult", "CommandStats", "Commander", "UpstreamCommand"]

log = logging.getLogger("flux_edge.uplink")


@dataclass(frozen=True, slots=True)
class CommandResult:
    ok: bool
    reason: str = ""  # why not (unknown, denied by the safety layer, failed), or ""
    verified: Any = None
    status: str = "ok"  # ok | unknown | denied | failed | unavailable


@dataclass(slots=True)
class UpstreamCommand:
    """One command from upstream. ``reply`` makes the protocol's answer (None: none)."""

    protocol: str  # "mqtt", "sparkplug_b", "thingsboard", "homeassistant"
    name: str  # looked up in the encoder's ``commands``
    device: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    reply: Callable[[CommandResult], list[Any]] | None = None


@dataclass(slots=True)
class CommandStats:
    received: int = 0
    ok: int = 0
    unknown: int = 0
    denied: int = 0
    failed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def count(self, result: CommandResult) -> None:
        self.received += 1
        if result.status == "ok":
            self.ok += 1
        elif result.status == "unknown":
            self.unknown += 1
        elif result.status == "denied":
            self.denied += 1
        else:
            self.failed += 1
        if result.status != "ok":
            self.by_reason[result.status] = self.by_reason.get(result.status, 0) + 1


class _Pipeline(Protocol):  # what the commander uses of the pipeline
    executors: Mapping[str, Any]
    safety: Any

    async def execute(self, cmd: Command) -> Outcome | None: ...


class Commander:
    """Runs upstream commands through a pipeline's guarded action path."""

    def __init__(self, pipeline: _Pipeline, commands: Mapping[str, str],
                 clock: Callable[[], float] = time.time) -> None:
        self._p = pipeline
        self.commands = dict(commands)
        self._clock = clock

    async def run(self, req: UpstreamCommand) -> CommandResult:
        action = self.commands.get(req.name)
        if action is None:
            known = ", ".join(sorted(self.commands)) or "none"
            return CommandResult(False, f"unknown command {req.name!r} (configured: {known})",
                                 status="unknown")
        executor = self._p.executors.get(action)
        if executor is None:
            return CommandResult(False, f"action {action!r} is not running", status="unavailable")
        params = {"upstream": req.protocol, "command": req.name, **req.params}
        if req.device:
            params.setdefault("device", req.device)
        cmd = Command(rule=f"uplink:{req.protocol}", action=action, ts=self._clock(),
                      params=msgspec.convert(params, dict[str, Any]))
        # the pipeline's one path for every command: its lock, the safety layer, the audit
        # log, the counts, the safety state saved after a switch
        outcome = await self._p.execute(cmd)
        if outcome is None:
            return CommandResult(False, self._blocked_reason(action), status="denied")
        if not outcome.ok:
            return CommandResult(False, outcome.error or "failed", status="failed")
        return CommandResult(True, verified=outcome.verified)

    def _blocked_reason(self, action: str) -> str:
        safety = self._p.safety
        reasons = []
        for name in sorted(safety.actuators_of(action)):
            st = safety.stats.get(name) if hasattr(safety.stats, "get") else None
            reason: str = getattr(st, "last_block_reason", "") if st is not None else ""
            if reason:
                reasons.append(reason)
        return "; ".join(reasons) or "blocked by the safety layer"
