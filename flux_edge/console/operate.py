"""Operator actions: every one goes through the same path as the rules' commands and leaves an
audit record naming the user.

- **Override** an actuator: a ``Command`` from rule ``console:<user>`` to the actuator's on or
  off action, run by the pipeline's ``Guarded`` (safety check -> execute with read-back ->
  record -> audit) under the action's lock. A denied override answers the safety layer's reason.
  Once switched, the actuator is *held*: rule commands to it are blocked (audited as
  ``manual override``) until it is released. Safety-layer commands (stale inputs, interlock,
  shutdown) are never held back: the safe state protects people and plant.
- **Release** ends the hold (the actuator keeps its state until a rule switches it).
- **Config**: check an edited text as check-config does; apply it (written atomically, the
  previous file kept as ``.prev``), then reloaded; a failed reload puts the old file back.
- **Retry** a quarantined plugin: its quarantine ends now, so the next call is its trial.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_edge.actions.safety import SAFETY_RULE, Values
from flux_edge.errors import FluxError
from flux_edge.model import Command, Outcome

if TYPE_CHECKING:
    from flux_edge.actions.guarded import Executor, Guarded
    from flux_edge.runtime.daemon import Daemon
    from flux_edge.runtime.pipeline import Pipeline

MANUAL = "console:"  # Command.rule prefix of operator commands


class OperateError(FluxError):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        self.status = status
        self.extra = extra
        super().__init__(message)


class HoldingGuard:
    """Wraps a pipeline's ``Guarded``: commands from rules to a held (overridden) actuator are
    blocked and audited; everything else passes to the wrapped guard unchanged."""

    def __init__(self, inner: Guarded, overrides: dict[str, dict[str, Any]]) -> None:
        self.inner = inner
        self.overrides = overrides
        self.safety = inner.safety
        self.audit = inner.audit

    async def run(self, cmd: Command, executor: Executor, values: Values) -> Outcome | None:
        if self.overrides and cmd.rule != SAFETY_RULE and not cmd.rule.startswith(MANUAL):
            for name in self.safety.actuators_of(cmd.action):
                o = self.overrides.get(name)
                if o is not None:
                    reason = (f"manual override: {name} held {o['state']} by {o['user']} "
                              f"({o['reason']})")
                    st = self.safety.stats[name]
                    st.blocked += 1
                    st.blocked_by["override"] += 1
                    st.last_block_reason, st.last_block_ts = reason, time.time()
                    if self.audit is not None:
                        self.audit.record(cmd, allowed=False, reason=reason, actuator=name)
                    return None
        return await self.inner.run(cmd, executor, values)


def hold(pipeline: Pipeline, overrides: dict[str, dict[str, Any]]) -> None:
    """Put ``HoldingGuard`` in front of a pipeline's guard (once)."""
    if not isinstance(pipeline.guard, HoldingGuard):
        pipeline.guard = HoldingGuard(pipeline.guard, overrides)  # type: ignore[assignment]


def _audit(p: Pipeline, user: str, action: str, reason: str, actuator: str = "",
           **params: Any) -> None:
    cmd = Command(rule=MANUAL + user, action=action, ts=time.time(),
                  params={"operator": user, "reason": reason, **params})
    p.audit.record(cmd, allowed=True, reason=reason, actuator=actuator)


def _pipeline(d: Daemon) -> Pipeline:
    if d.pipeline is None:
        raise OperateError(503, "the pipeline is not running")
    return d.pipeline


async def override(d: Daemon, overrides: dict[str, dict[str, Any]], actuator: str, *,
                   state: str, reason: str, user: str) -> dict[str, Any]:
    p = _pipeline(d)
    cfg = p.config.actuators.get(actuator)
    if cfg is None:
        raise OperateError(404, f"no actuator {actuator!r}")
    if state not in ("on", "off"):
        raise OperateError(400, 'state must be "on" or "off"')
    if not reason.strip():
        raise OperateError(400, "give a reason: it goes into the audit log")
    action = cfg.on if state == "on" else cfg.off
    executor = p.executors.get(action)
    if executor is None:
        raise OperateError(500, f"action {action!r} is not built")
    cmd = Command(rule=MANUAL + user, action=action, ts=time.time(),
                  params={"operator": user, "reason": reason.strip(), "override": state})
    hold(p, overrides)
    # the pipeline's one path for every command (its lock, the safety layer, the audit log,
    # the counts, the safety state saved after a switch)
    outcome = await p.execute(cmd)
    if outcome is None:
        why = p.safety.stats[actuator].last_block_reason
        raise OperateError(409, f"denied by the safety layer: {why}", blocked=why)
    if not outcome.ok:
        raise OperateError(502, f"the write failed: {outcome.error}", error=outcome.error)
    overrides[actuator] = {"state": state, "user": user, "reason": reason.strip(),
                           "since": time.time()}
    return {"ok": True, "actuator": actuator, "state": state, "verified": outcome.verified,
            "latency_ms": round(outcome.latency_s * 1000, 1)}


def release(d: Daemon, overrides: dict[str, dict[str, Any]], actuator: str, reason: str,
            user: str) -> dict[str, Any]:
    p = _pipeline(d)
    if actuator not in p.config.actuators:
        raise OperateError(404, f"no actuator {actuator!r}")
    held = overrides.pop(actuator, None)
    if held is None:
        raise OperateError(409, f"actuator {actuator!r} is not overridden")
    _audit(p, user, "console.release", reason.strip() or "released", actuator,
           held=held["state"])
    return {"ok": True, "actuator": actuator, "released": held}


def check_text(d: Daemon, text: str) -> tuple[bool, list[dict[str, Any]]]:
    from flux_edge.kinds import check_config_text

    config, problems = check_config_text(text, d.config.path or "<console>")
    out = [{"line": pr.line, "column": pr.column, "path": pr.path, "message": pr.message,
            "severity": pr.severity} for pr in problems]
    ok = config is not None and not any(pr.severity == "error" for pr in problems)
    return ok, out


async def apply_text(d: Daemon, text: str, reason: str, user: str) -> dict[str, Any]:
    ok, problems = check_text(d, text)
    if not ok:
        raise OperateError(422, "the configuration has errors", problems=problems)
    if not reason.strip():
        raise OperateError(400, "give a reason: it goes into the audit log")
    path = Path(d.config.path)
    if not d.config.path:
        raise OperateError(409, "the running configuration was not loaded from a file")
    try:
        old = path.read_text()  # noqa: ASYNC240 (a config file: small, local)
        _write(path.with_name(path.name + ".prev"), old)
        _write(path, text)
    except OSError as exc:
        raise OperateError(500, f"cannot write {path}: {exc.strerror}") from exc
    p = _pipeline(d)
    _audit(p, user, "console.config_apply", reason.strip(), file=str(path))
    done = await d.reload()
    if not done:
        with contextlib.suppress(OSError):
            _write(path, old)
        raise OperateError(422, f"the reload failed, the previous configuration runs on and "
                           f"is back in {path}: {d.reload_error}", problems=problems)
    return {"ok": True, "problems": problems}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.console.tmp")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o640
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def retry_plugin(d: Daemon, name: str, reason: str, user: str) -> dict[str, Any]:
    from flux_edge.console.views import _plugin_instances

    p = _pipeline(d)
    instances = _plugin_instances(d).get(name)
    if not instances:
        raise OperateError(404, f"no plugin {name!r}")
    retried = 0
    for plugin in instances:
        if plugin.retry_now():  # the next call is its trial call
            retried += 1
    if not retried:
        raise OperateError(409, f"plugin {name!r} is not quarantined")
    _audit(p, user, "console.plugin_retry", reason.strip() or "acknowledged", plugin=name)
    return {"ok": True, "plugin": name, "instances": retried}
