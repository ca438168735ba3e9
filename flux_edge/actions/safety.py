"""The safety layer in front of actuators: interlocks, minimum on/off times, switch rate limits,
safe states. Pure: no I/O, the clock is injected.

An actuator (``[actuators.<name>]``) is driven by two actions, ``on`` and ``off``. Every command to
one of them passes ``SafetyLayer.check`` before it runs and ``SafetyLayer.record`` after; commands
to other actions pass through untouched. Decisions, in this order, for a command that would put
actuator A into state S:

1. **Safety commands** (made by ``safe_commands``/``enforce``, marked with ``rule = "safety"``
   and ``params["safety"]``) towards A's safe state are always allowed: anti-chatter limits
   protect equipment, the safe state protects people and plant.
2. **Interlock** (switching ON only): blocked while the interlock condition holds, and also while
   it is *unknown* (an input missing, stale, bad or older than ``stale_after``, or an evaluation
   error): fail safe. Checked even when A is already on.
3. **Stale inputs**: a command away from the safe state is blocked while one of A's ``inputs`` is
   missing, not good, or older than ``stale_after``.
4. **Already in S**: allowed, but it is *not a switch*: no minimum time applies, it is not counted
   against ``max_switches`` and ``record`` does not restart A's on/off timer. (Re-asserting a state
   is harmless and repairs a device whose state drifted.)
5. **min_on / min_off**: A was switched into its current state less than that long ago.
6. **max_switches per window** (sliding): that many switches already happened in the last
   ``window`` seconds.

A's state starts *unknown* (no minimum time applies to the first switch) unless ``restore``
gives it one. ``record`` changes it only for a successful outcome: a failed write leaves the
state as it was (a write that failed verification may or may not have taken effect; the next
reading of the device tells, not this layer). Switch times are on the duration clock
(``time.monotonic``), so a wall clock that jumps (NTP on a Pi without RTC) neither releases nor
extends a minimum time; a snapshot carries them across a restart with the boot they belong to
(``flux_edge.state.clock``: within a boot the downtime counts, after a reboot the time elapsed
at shutdown is kept). Input ages compare measurement timestamps with the wall clock. If the
duration clock goes backwards past a last switch (an injected clock), that switch is taken as
happening "now" (so a minimum time never stretches beyond its length).

Blocked commands are counted per actuator and reason kind (``stats``) and logged on
``flux_edge.safety`` (a warning the first time per actuator and reason kind within a minute,
then debug, so a level rule firing on every poll does not flood the log).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flux_edge.config import ActuatorConfig, Config
from flux_edge.errors import RuleError
from flux_edge.model import Command, Measurement, Outcome
from flux_edge.rules.cel import Condition
from flux_edge.rules.engine import BUILTIN_VARIABLES, MAP_VARIABLES, compile_interlock
from flux_edge.state.clock import boot_id, carry_offset

__all__ = [
    "SAFETY_RULE",
    "ActuatorStats",
    "Decision",
    "SafetyLayer",
    "Values",
]

log = logging.getLogger("flux_edge.safety")

#: ``Command.rule`` of the commands the safety layer makes itself
SAFETY_RULE = "safety"

#: device -> measurement name -> latest measurement (any quality)
Values = Mapping[str, Mapping[str, Measurement]]

State = Literal["on", "off"]
_BUILTINS = frozenset(BUILTIN_VARIABLES)
_MAPS = frozenset(MAP_VARIABLES)
_LOG_EVERY = 60.0  # seconds between warnings for the same actuator and reason kind


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``check`` says about one command."""

    allowed: bool
    reason: str = ""  # why it was blocked, or a note for an allowed one ("already on")
    actuator: str = ""  # "" when the command's action belongs to no actuator
    kind: str = ""  # blocked: "interlock" | "stale" | "min_on" | "min_off" | "rate_limit"
    switch: bool = False  # allowed and it changes the actuator's state

    @property
    def blocked(self) -> bool:
        return not self.allowed


@dataclass(slots=True)
class ActuatorStats:
    allowed: int = 0  # commands let through (switches and no-ops)
    switches: int = 0  # successful switches recorded
    failures: int = 0  # commands whose outcome failed
    blocked: int = 0
    blocked_by: Counter[str] = field(default_factory=Counter)  # reason kind -> count
    safety_commands: int = 0  # safe-state commands made by safe_commands/enforce
    last_block_reason: str = ""
    last_block_ts: float | None = None


class _Actuator:
    __slots__ = (
        "cfg",
        "history",
        "inputs",
        "interlock",
        "last_log",
        "last_switch",
        "name",
        "state",
        "stats",
        "tripped",
        "tripped_ts",
    )

    def __init__(self, name: str, cfg: ActuatorConfig, interlock: Condition | None) -> None:
        self.name = name
        self.cfg = cfg
        self.interlock = interlock
        self.inputs: tuple[tuple[str, str, str], ...] = tuple(
            (spec, *_split_input(name, spec)) for spec in cfg.inputs
        )
        self.state: State | None = None
        self.last_switch: float | None = None
        self.history: deque[float] = deque()
        self.stats = ActuatorStats()
        self.last_log: dict[str, float] = {}
        self.tripped = ""  # why enforce() last drove it to its safe state, "" when not tripped
        self.tripped_ts = -math.inf


def _split_input(actuator: str, spec: str) -> tuple[str, str]:
    device, dot, name = spec.rpartition(".")
    if not dot or not device or not name:
        raise ValueError(
            f"actuator {actuator!r}: input {spec!r} must be written device.measurement"
        )
    return device, name


def _dur(seconds: float) -> str:
    """A duration for people: "12 s", "1.5 s", "90 s", "5 min", "1 h", "90 min"."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    if seconds >= 600 or seconds == int(seconds):
        return f"{math.floor(seconds)} s"
    # rounded down to 0.1 s, so "29.96 s ago" never reads as "30 s ago" next to a limit of 30 s
    return f"{math.floor(seconds * 10 + 1e-6) / 10:g} s"


class SafetyLayer:
    """Guards the actuators of a ``Config`` (see the module docstring). Not thread-safe: use it
    from the task that runs the actions.

    Raises ``flux_edge.rules.engine.ConditionError`` (a ``RuleError``; ``key`` =
    ``("actuators", name, "interlock")``) when an interlock does not compile (the rules engine
    compiles it: same variables and types as a rule restricted to ``interlock_device``), and
    ``ValueError`` for an input not written ``device.measurement``.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
    ) -> None:
        if clock is None:
            clock, wall = time.monotonic, wall or time.time
        self._clock = clock  # durations: min on/off, rate-limit windows, retries
        self._wall = wall or clock  # measurement ages, command and block timestamps
        self._actuators: dict[str, _Actuator] = {}
        # action name -> [(actuator, the state that action puts it in)]
        self._by_action: dict[str, list[tuple[_Actuator, State]]] = {}
        for name, cfg in config.actuators.items():
            act = _Actuator(name, cfg, compile_interlock(config, name))
            self._actuators[name] = act
            self._by_action.setdefault(cfg.on, []).append((act, "on"))
            self._by_action.setdefault(cfg.off, []).append((act, "off"))
        #: per actuator name
        self.stats: dict[str, ActuatorStats] = {n: a.stats for n, a in self._actuators.items()}

    # --- queries ---------------------------------------------------------------------------------

    @property
    def actuator_names(self) -> tuple[str, ...]:
        return tuple(self._actuators)

    def guards(self, action: str) -> bool:
        """Whether commands to ``action`` pass through this layer."""
        return action in self._by_action

    def actuators_of(self, action: str) -> tuple[str, ...]:
        """The actuators ``action`` drives (usually one; none for other actions)."""
        return tuple(act.name for act, _ in self._by_action.get(action, ()))

    def state(self, actuator: str) -> State | None:
        """The actuator's last known state (None: unknown)."""
        return self._actuators[actuator].state

    # --- the decision ----------------------------------------------------------------------------

    def check(self, cmd: Command, values: Values) -> Decision:
        """Whether ``cmd`` may run now. Commands to actions outside every actuator are allowed
        (``actuator == ""``). Blocked commands are counted and logged here."""
        targets = self._by_action.get(cmd.action)
        if not targets:
            return Decision(True)
        now = self._clock()
        decision = Decision(True)
        for act, target in targets:
            decision = self._check_one(act, target, cmd, values, now)
            if decision.blocked:
                act.stats.blocked += 1
                act.stats.blocked_by[decision.kind] += 1
                act.stats.last_block_reason = decision.reason
                act.stats.last_block_ts = self._wall()
                self._log_block(act, cmd, decision, now)
                return decision
        for act, _target in targets:
            act.stats.allowed += 1
        return decision

    def _check_one(
        self, act: _Actuator, target: State, cmd: Command, values: Values, now: float
    ) -> Decision:
        cfg = act.cfg
        name = act.name
        if cmd.rule == SAFETY_RULE and "safety" in cmd.params and target == cfg.safe:
            return Decision(True, f"safe state ({cmd.params['safety']})", name, switch=True)
        if target == "on" and act.interlock is not None:
            holds, why = self._interlock(act, values, self._wall())
            if holds:
                return Decision(False, f"interlock: {why}", name, "interlock")
        if cfg.safe not in ("none", target):
            stale = self._stale(act, values, self._wall())
            if stale:
                spec, why = stale[0]
                return Decision(False, f"stale input: {spec} {why}", name, "stale")
        if act.state == target:
            return Decision(True, f"already {target}", name)
        if act.last_switch is not None and act.state is not None:
            act.last_switch = min(act.last_switch, now)  # the clock may have gone backwards
            elapsed = now - act.last_switch
            limit = cfg.min_on if act.state == "on" else cfg.min_off
            if elapsed < limit:
                kind = "min_on" if act.state == "on" else "min_off"
                return Decision(
                    False,
                    f"{kind}: {name} switched {act.state} {_dur(elapsed)} ago, "
                    f"{kind} is {_dur(limit)}",
                    name,
                    kind,
                )
        if cfg.max_switches > 0:
            recent = self._recent(act, now)
            if recent >= cfg.max_switches:
                return Decision(
                    False,
                    f"rate limit: {recent} switches in the last {_dur(cfg.window)} "
                    f"(max_switches is {cfg.max_switches})",
                    name,
                    "rate_limit",
                )
        return Decision(True, "", name, switch=True)

    def _recent(self, act: _Actuator, now: float) -> int:
        history = act.history
        start = now - act.cfg.window
        while history and history[0] <= start:
            history.popleft()
        return sum(1 for t in history if t <= now)

    def _interlock(self, act: _Actuator, values: Values, now: float) -> tuple[bool, str]:
        """(holds, why). Unknown counts as holding.

        Variables are looked up in ``interlock_device``'s values (with ``interlock_device = ""``
        in any device's). ``age.x`` is computed from the measurement's time; ``previous`` and
        ``delta`` are not known here (only the latest values are passed in), so an interlock
        reading them is always unknown, i.e. holding."""
        cond = act.interlock
        assert cond is not None
        device = act.cfg.interlock_device
        expr = cond.expression
        found: dict[str, Measurement] = {}
        for var in sorted(cond.variables - _BUILTINS - _MAPS):
            m = self._lookup(values, device, var)
            problem = self._input_problem(act, m, now)
            if problem:
                where = f"{device}.{var}" if device else var
                return True, f"{expr} is unknown ({where} {problem}): fail safe"
            assert m is not None
            found[var] = m
        data: dict[str, Any] = {n: m.value for n, m in found.items()}
        data["device"] = device
        data["name"] = ""
        for map_name in sorted(cond.variables & _MAPS):
            if map_name != "age":
                return True, f"{expr} is unknown ({map_name} is not known to the safety layer)"
            keys = cond.fields.get(map_name)
            names = keys if keys is not None else values.get(device, {}).keys()
            ages: dict[str, float] = {}
            for k in names:
                m = self._lookup(values, device, k)
                if m is None:
                    return True, f"{expr} is unknown (no value for age.{k}): fail safe"
                ages[k] = now - m.ts
            data[map_name] = ages
        try:
            holds = cond.evaluate(data)
        except RuleError as exc:
            return True, f"{expr} is unknown ({exc}): fail safe"
        return holds, f"{expr} holds"

    @staticmethod
    def _lookup(values: Values, device: str, name: str) -> Measurement | None:
        if device:
            return values.get(device, {}).get(name)
        for dev_values in values.values():
            m = dev_values.get(name)
            if m is not None:
                return m
        return None

    @staticmethod
    def _input_problem(act: _Actuator, m: Measurement | None, now: float) -> str:
        if m is None:
            return "has no value yet"
        if m.quality != "good":
            return f"is {m.quality}"
        limit = act.cfg.stale_after
        if limit > 0 and now - m.ts > limit:
            return f"is {_dur(now - m.ts)} old (stale_after is {_dur(limit)})"
        return ""

    def _stale(self, act: _Actuator, values: Values, now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for spec, device, name in act.inputs:
            problem = self._input_problem(act, values.get(device, {}).get(name), now)
            if problem:
                out.append((spec, problem))
        return out

    def _log_block(self, act: _Actuator, cmd: Command, d: Decision, now: float) -> None:
        last = act.last_log.get(d.kind, -math.inf)
        level = logging.WARNING if now - last >= _LOG_EVERY or now < last else logging.DEBUG
        if level == logging.WARNING:
            act.last_log[d.kind] = now
        log.log(level, "blocked %s (rule %s) for actuator %s: %s", cmd.action, cmd.rule,
                act.name, d.reason)

    # --- after the action ran --------------------------------------------------------------------

    def record(self, cmd: Command, outcome: Outcome) -> None:
        """Update actuator state after ``cmd`` ran (call for allowed commands only). Only a
        successful outcome changes anything: state, last switch time, switch history."""
        targets = self._by_action.get(cmd.action)
        if not targets:
            return
        now = self._clock()
        for act, target in targets:
            if not outcome.ok:
                act.stats.failures += 1
                continue
            if act.state == target:
                continue
            act.state = target
            act.last_switch = now
            act.history.append(now)
            act.stats.switches += 1
            if act.cfg.max_switches > 0:
                self._recent(act, now)  # trims the history
            else:
                act.history.clear()

    # --- safe states -----------------------------------------------------------------------------

    def safe_commands(self, reason: str, actuators: list[str] | None = None) -> list[Command]:
        """One command per actuator with a safe state (all, or those named) that puts it there:
        for shutdown, a watchdog stop, stale inputs. Sent whatever the known state (it may have
        drifted, or be unknown). ``check`` always allows them; run them through the same
        check/execute/record path as rule commands so they are recorded and audited."""
        now = self._wall()
        out: list[Command] = []
        for name, act in self._actuators.items():
            if actuators is not None and name not in actuators:
                continue
            safe = act.cfg.safe
            if safe == "none":
                continue
            action = act.cfg.off if safe == "off" else act.cfg.on
            act.stats.safety_commands += 1
            out.append(
                Command(rule=SAFETY_RULE, action=action, ts=now, params={"safety": reason})
            )
        return out

    def stale_actuators(
        self, values: Values, now: float | None = None
    ) -> list[tuple[str, str, str]]:
        """(actuator, input, why) for every input of every actuator that is missing, not good,
        or older than its ``stale_after``."""
        t = self._wall() if now is None else now
        out: list[tuple[str, str, str]] = []
        for name, act in self._actuators.items():
            out.extend((name, spec, why) for spec, why in self._stale(act, values, t))
        return out

    def interlocked_actuators(
        self, values: Values, now: float | None = None
    ) -> list[tuple[str, str]]:
        """(actuator, why) for every actuator whose interlock holds or is unknown."""
        t = self._wall() if now is None else now
        out: list[tuple[str, str]] = []
        for name, act in self._actuators.items():
            if act.interlock is not None:
                holds, why = self._interlock(act, values, t)
                if holds:
                    out.append((name, why))
        return out

    def enforce(self, values: Values, *, retry: float = 30.0) -> list[Command]:
        """Safe-state commands for actuators that must go to their safe state now: an input
        went stale/bad/missing, or the interlock holds (or is unknown) while the actuator is not
        known to be off. Call it periodically (say every second) and whenever a measurement of
        an input arrives. A command is made when an actuator becomes tripped, and again every
        ``retry`` seconds while it stays tripped and its state is not confirmed safe (a failed
        write). Nothing for actuators whose safe state is "none"."""
        now = self._clock()
        out: list[Command] = []
        for name, act in self._actuators.items():
            if act.cfg.safe == "none":
                continue
            why = ""
            stale = self._stale(act, values, self._wall())
            if stale:
                why = "stale input: " + ", ".join(f"{s} {w}" for s, w in stale)
            elif act.interlock is not None and act.state != "off":
                holds, text = self._interlock(act, values, self._wall())
                if holds:
                    why = f"interlock: {text}"
            if not why:
                act.tripped = ""
                continue
            first = not act.tripped
            again = act.state != act.cfg.safe and now - act.tripped_ts >= retry
            act.tripped = why
            if first or again:
                act.tripped_ts = now
                log.warning("actuator %s: driving to its safe state (%s): %s",
                            name, act.cfg.safe, why)
                out.extend(self.safe_commands(why, [name]))
        return out

    # --- persistence -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The state worth keeping across a restart, JSON-serialisable:
        ``{actuator: {"state": "on"|"off"|None, "last_switch": t|None, "history": [t, ...]}}``
        with duration-clock times, and under the key ``""`` (never an actuator's name) the
        clock they are on: ``{"boot_id": ..., "at": duration-clock time of the snapshot}``."""
        out: dict[str, dict[str, Any]] = {
            name: {
                "state": act.state,
                "last_switch": act.last_switch,
                "history": list(act.history),
            }
            for name, act in self._actuators.items()
        }
        out[""] = {"boot_id": boot_id(), "at": self._clock()}
        return out

    def restore(self, snapshot: Mapping[str, Mapping[str, Any]]) -> None:
        """Load a ``snapshot()``. Unknown actuators and malformed entries are ignored (a
        warning); switches older than the window are dropped. Times of another boot are
        shifted so the time elapsed at the snapshot is kept; a snapshot without the clock key
        (written before times were monotonic) holds wall-clock times, converted here."""
        now = self._clock()
        meta = snapshot.get("")
        if isinstance(meta, Mapping) and isinstance(meta.get("at"), int | float):
            offset = carry_offset(str(meta.get("boot_id", "")), float(meta["at"]), now)
        else:
            offset = now - self._wall()
        for name, entry in snapshot.items():
            if name == "":
                continue
            act = self._actuators.get(name)
            if act is None:
                log.info("safety snapshot: actuator %r is no longer configured", name)
                continue
            try:
                state = entry.get("state")
                last = entry.get("last_switch")
                history = [float(t) for t in entry.get("history", ())]
                if state not in ("on", "off", None):
                    raise ValueError(f"state {state!r}")
                act.state = state
                act.last_switch = None if last is None else min(float(last) + offset, now)
                history = [min(t + offset, now) for t in history]
                act.history = deque(sorted(t for t in history if t > now - act.cfg.window))
            except (TypeError, ValueError, AttributeError) as exc:
                log.warning("safety snapshot: entry of actuator %r ignored: %s", name, exc)
