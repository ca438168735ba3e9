"""The rule engine: Measurement -> Commands. No I/O of its own: the clock is injected, and so is
the optional durable store (``flux_edge.rules.state``).

Semantics (decided here, relied on by tests; docs/configuration.md says the same for users):

* **Variables.** A rule reads the variables ``rule_variables`` declares: the registers of the
  Modbus devices it watches (every device of every TCP and RTU source, profile registers
  included), its ``inputs``, and ``device``/``name`` (the device and name of the measurement
  being processed). Values are looked up *in the measurement's device*: a rule with
  ``device = ""`` runs for each device separately, against that device's own values. Besides,
  three maps keyed by measurement name (unless a register or input already has the name):
  ``previous`` (map(string, dyn): the last good value before the current one), ``delta``
  (map(string, double): current - previous, numbers only) and ``age`` (map(string, double):
  seconds since the value was measured, at evaluation time). ``delta.temperature > 5.0`` reads
  ``temperature`` like a direct reference does: it triggers the rule and must have a value
  (and, for previous/delta, a previous value: until then the condition is not evaluated).
* **Trigger.** A measurement evaluates only the rules whose conditions (``when``, ``off_when``)
  reference its name and whose device filter matches its device (an index built once).
* **Quality gating.** The engine keeps the latest *good* value per (device, name); a stale or bad
  measurement removes it. The condition is **unknown** when the triggering measurement is not
  good, when an input is older than ``max_age``, or on an evaluation error: level rules do not
  fire, edge state and latches are kept (unknown is neither a rising nor a falling edge), and a
  pending ``for`` timer is cancelled. An input never seen since start leaves the rule untouched
  (so state restored after a restart is not lost while the first values come in). With
  ``allow_stale = true`` the latest value of any quality is used and ``max_age`` is not applied.
* **Modes.** ``edge`` fires when the condition goes false -> true (the first evaluation that is
  true counts as a rising edge); ``level`` fires every time the condition evaluates true. Without
  ``off_when``, a rule that is on goes off when its condition is false (``off_actions`` run then).
  With ``off_when`` (hysteresis) it stays on (latched) until ``off_when`` is true; then
  ``off_actions`` run and it re-arms.
* **for.** The condition must hold continuously for ``for`` seconds: the period starts at the
  first true evaluation and the rule fires at start + ``for`` (``tick``, driven by
  ``next_deadline``), or on a later true evaluation if that comes first; a false or unknown
  evaluation cancels it. At the deadline the inputs' ``max_age`` is checked again.
* **cooldown.** After firing, a rule does not fire again for that device until ``cooldown`` has
  passed. An edge that rises during the cooldown is deferred to the cooldown's end (fired then if
  the condition has not gone false/unknown meanwhile); a level rule just skips those evaluations.
* **Restart.** With a store, state changes are written (one transaction per call, only when
  something changed) and restored at construction: a ``for`` period that started before the
  restart fires at its original wall-clock deadline if that is still ahead (via ``tick``, unless
  a measurement makes the condition false or unknown first). If the deadline passed while the
  daemon was down, nobody watched the inputs meanwhile: the rule fires on the first evaluation
  after start that is true (at once: the period is complete), and is cancelled if that
  evaluation is false or unknown.
* **Errors.** An evaluation error of any kind (a CEL error, an input above the budget's caps,
  CEL's iteration budget, MemoryError, any exception from the library) is counted in ``stats``
  (``errors``, ``errors_by_reason``, ``consecutive_errors``, ``last_error``,
  ``last_error_reason``), logged on the ``flux_edge.rules`` logger (a warning when a rule starts
  failing, then quiet until it succeeds again) and treated as unknown. Never raised: one rule's
  failure never stops the other rules.
* **Budgets.** Every condition is refused at load time when its estimated worst-case cost or
  memory per evaluation is above its budget (``flux_edge.rules.cost``): the rule's ``max_cost``
  (cost units; default ``DEFAULT_BUDGET.max_cost``), 4 MiB; ``stats`` holds each rule's
  estimate (``cost``, ``memory``).
* **Firing** logs "rule X fired" at the rule's ``severity`` and emits one ``Command`` per action,
  in config order, with ``params = {"device": ..., "rule_state": "on"}`` (``"off"`` for
  ``off_actions``).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from flux_edge.config import Config, RuleConfig
from flux_edge.errors import RuleError
from flux_edge.model import Command, Measurement, Value
from flux_edge.rules.cel import Condition
from flux_edge.rules.compile import (
    _LEVELS,
    BUILTIN_VARIABLES,
    MAP_VARIABLES,
    ConditionCost,
    ConditionError,
    _compile_rule,
    _registers_by_device,
    _rule_variables,
    check_rules,
    compile_interlock,
    rule_budget,
    rule_digest,
    rule_variables,
)
from flux_edge.rules.state import RuleStore, StateRecord

__all__ = [
    "BUILTIN_VARIABLES",
    "MAP_VARIABLES",
    "ConditionCost",
    "ConditionError",
    "RuleEngine",
    "RuleStats",
    "check_rules",
    "compile_interlock",
    "rule_budget",
    "rule_digest",
    "rule_variables",
]

log = logging.getLogger("flux_edge.rules")

@dataclass(slots=True)
class RuleStats:
    """Counters of one rule, across devices."""

    evaluations: int = 0  # times the condition was evaluated (errors included)
    firings: int = 0  # times the rule emitted its actions
    errors: int = 0  # evaluation errors
    skipped: int = 0  # triggered, but an input had no current good value
    suppressed: int = 0  # would have fired, but within the cooldown
    last_fired_ts: float | None = None
    last_error: str = ""
    #: evaluation errors by reason (flux_edge.rules.cel.ERROR_REASONS): missing, type,
    #: too_large, iterations, memory, runtime, internal
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    last_error_reason: str = ""
    last_error_ts: float | None = None
    #: evaluation errors since the rule's last successful evaluation (0: healthy)
    consecutive_errors: int = 0
    #: the estimated worst case of one evaluation (the largest of when/off_when): cost units,
    #: bytes; and the budget it was checked against
    cost: int = 0
    memory: int = 0
    max_cost: int = 0


class _Cond:
    """One compiled condition of a rule and what building its data needs."""

    __slots__ = ("condition", "data_vars", "maps", "needs", "uses_device", "uses_name")

    def __init__(self, condition: Condition, variables: dict[str, str]) -> None:
        self.condition = condition
        measured = set(variables) - BUILTIN_VARIABLES.keys()
        self.data_vars = tuple(sorted(condition.variables & measured))
        self.uses_device = "device" in condition.variables
        self.uses_name = "name" in condition.variables
        # map name -> the keys read (None: any key; then every value of the device is offered)
        self.maps: tuple[tuple[str, frozenset[str] | None], ...] = tuple(
            (n, condition.fields.get(n))
            for n in sorted(condition.variables & MAP_VARIABLES.keys())
            if n not in variables
        )
        keyed: set[str] = set()
        for _, keys in self.maps:
            keyed |= keys or set()
        #: every measurement that must have a value for the condition to be evaluated
        self.needs = tuple(sorted(set(self.data_vars) | keyed))


class _State:
    """One rule's state for one device."""

    __slots__ = ("cause", "due", "last_fire", "on", "since")

    def __init__(self) -> None:
        self.since: float | None = None  # the condition has been true since
        self.on = False  # fired, not re-armed yet
        self.last_fire: float | None = None
        self.due: float | None = None  # a scheduled firing (for / cooldown)
        self.cause: Measurement | None = None  # what made the condition true


class _Rule:
    __slots__ = (
        "actions",
        "allow_stale",
        "cooldown",
        "digest",
        "edge",
        "failing",
        "for_",
        "level",
        "max_age",
        "name",
        "off",
        "off_actions",
        "order",
        "states",
        "stats",
        "when",
    )

    def __init__(
        self, order: int, name: str, spec: RuleConfig, when: _Cond, off: _Cond | None
    ) -> None:
        self.order = order
        self.name = name
        self.when = when
        self.off = off
        self.actions = spec.actions
        self.off_actions = spec.off_actions
        self.edge = spec.mode == "edge"
        self.for_ = spec.for_
        self.cooldown = spec.cooldown
        self.max_age = 0.0 if spec.allow_stale else spec.max_age
        self.allow_stale = spec.allow_stale
        self.level = _LEVELS[spec.severity]
        self.digest = rule_digest(spec)
        self.states: dict[str, _State] = {}  # per device
        self.failing = False
        self.stats = RuleStats()
        conds = [c.condition for c in (when, off) if c is not None]
        self.stats.cost = max(c.cost for c in conds)
        self.stats.memory = max(c.memory for c in conds)
        self.stats.max_cost = when.condition.budget.max_cost


class _Device:
    """What the engine knows of one device's values (only names some rule reads)."""

    __slots__ = ("any", "last", "prev", "ts", "values")

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}  # current good values
        self.last: dict[str, Value] = {}  # last good value, kept when it goes bad
        self.prev: dict[str, Value] = {}  # the good value before ``last``
        self.ts: dict[str, float] = {}  # when the latest value (any quality) was measured
        self.any: dict[str, Value] = {}  # latest value of any quality (allow_stale rules only)


_NUMBERS: Final = (int, float)
_SKIP: Final = object()  # an input was never seen: leave the rule alone
_UNKNOWN: Final = object()  # stale/bad/too old/error: unknown


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


class RuleEngine:
    """Evaluates the rules of a ``Config`` against a stream of measurements.

    ``clock`` is the duration clock (default ``time.monotonic``: ``for`` periods, cooldowns and
    deadlines do not move when the wall clock jumps, e.g. when NTP syncs on a Pi without RTC);
    ``wall`` the wall clock (default ``time.time``, or ``clock`` when only that is given: replays
    and tests run on one simulated clock) for measurement ages at arrival, command timestamps and
    statistics. Durable state holds duration-clock times; :class:`RuleStore` carries them across
    restarts (``flux_edge.rules.state``).
    ``store`` (optional) makes rule state durable. ``log_firings=False`` silences the "rule X
    fired" lines (rule test cases run by check-config). Not thread-safe: call ``on_measurement`` and
    ``tick`` from one task.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
        store: RuleStore | None = None,
        log_firings: bool = True,
    ) -> None:
        if clock is None:
            clock, wall = time.monotonic, wall or time.time
        self._clock = clock
        self._wall = wall or clock
        self._same_clock = self._wall is clock
        self._wall_now = 0.0  # the wall clock at the current engine call (commands' ts)
        self._log_firings = log_firings
        self._store = store
        registers = _registers_by_device(config)
        rules: list[_Rule] = []
        for order, (rule_name, spec) in enumerate(config.rules.items()):
            when, off = _compile_rule(config, rule_name, registers)  # raises the first RuleError
            variables = _rule_variables(config, rule_name, registers)
            rules.append(
                _Rule(
                    order,
                    rule_name,
                    spec,
                    _Cond(when, variables),
                    None if off is None else _Cond(off, variables),
                )
            )
        self._rules = rules
        self._by_name = {r.name: r for r in rules}
        #: per rule name
        self.stats: dict[str, RuleStats] = {r.name: r.stats for r in rules}
        self._keep_any = any(r.allow_stale for r in rules)

        # (device or "*", variable name) -> rules, in config order. A (device, name) entry also
        # holds the "*" rules for that name, so one lookup finds everything for a known device.
        index: dict[tuple[str, str], list[_Rule]] = {}
        devices = {config.rules[r.name].device for r in rules} - {""}
        for r in rules:
            device = config.rules[r.name].device
            names = set(r.when.needs) | set(r.off.needs if r.off else ())
            for var in sorted(names):
                if device:
                    index.setdefault((device, var), []).append(r)
                else:
                    index.setdefault(("*", var), []).append(r)
                    for d in devices:
                        index.setdefault((d, var), []).append(r)
        self._index: dict[tuple[str, str], tuple[_Rule, ...]] = {
            key: tuple(sorted(rs, key=lambda r: r.order)) for key, rs in index.items()
        }
        self._values: dict[str, _Device] = {}
        # pending firings: (deadline, rule order, device); stale entries are skipped when popped
        self._timers: list[tuple[float, int, str]] = []
        self._dirty: dict[tuple[int, str], None] = {}
        if store is not None:
            self._restore(store)

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rules)

    def failing(self, at_least: int = 1) -> dict[str, RuleStats]:
        """The rules whose last ``at_least`` (or more) evaluations all failed, by name: for
        health reports (``/healthz``, ``STATUS=``)."""
        return {
            r.name: r.stats for r in self._rules if r.stats.consecutive_errors >= at_least
        }

    # --- time ------------------------------------------------------------------------------------

    def now(self) -> float:
        """The duration clock's time (what ``next_deadline`` and the rule states are on)."""
        return self._clock()

    def next_deadline(self) -> float | None:
        """The wall-clock time of the earliest pending firing (a ``for`` period or a cooldown
        ending), or None. The runtime calls ``tick`` then (``on_measurement`` also fires what is
        due)."""
        timers = self._timers
        rules = self._rules
        while timers:
            deadline, order, device = timers[0]
            st = rules[order].states.get(device)
            if st is not None and st.due == deadline:
                return deadline
            heapq.heappop(timers)
        return None

    def tick(self, now: float | None = None) -> list[Command]:
        """Fire every pending firing due at ``now`` (default: the clock)."""
        if now is None:
            now = self._clock()
        self._wall_now = now if self._same_clock else self._wall()
        out: list[Command] = []
        self._fire_due(now, out)
        if self._dirty:
            self._flush()
        return out

    def _fire_due(self, now: float, out: list[Command]) -> None:
        timers = self._timers
        rules = self._rules
        while timers and timers[0][0] <= now:
            deadline, order, device = heapq.heappop(timers)
            r = rules[order]
            st = r.states.get(device)
            if st is None or st.due != deadline:
                continue  # cancelled or rescheduled
            st.due = None
            self._dirty[(order, device)] = None
            if r.max_age and self._too_old(r.when, device, now, r.max_age):
                st.since = None  # the inputs went quiet: unknown
                continue
            self._fire(r, device, st, now, cause=st.cause, out=out)

    def _too_old(self, cond: _Cond, device: str, now: float, max_age: float) -> bool:
        dev = self._values.get(device)
        if dev is None:
            return False  # restored state, nothing measured since start: cannot tell
        ts = dev.ts
        return any(n in ts and now - ts[n] > max_age for n in cond.needs)

    def _schedule(self, r: _Rule, device: str, st: _State, at: float) -> None:
        if st.due != at:
            st.due = at
            heapq.heappush(self._timers, (at, r.order, device))
            self._dirty[(r.order, device)] = None

    # --- measurements ----------------------------------------------------------------------------

    @property
    def rules(self) -> Sequence[_Rule]:
        """The compiled rules with their per-device states and stats, in config order (read
        them, do not change them: the console and status show them)."""
        return self._rules

    def on_measurement(self, m: Measurement) -> list[Command]:
        """Record ``m`` and evaluate the rules it triggers (and fire what is due); return the
        commands they emit."""
        commands = self._on_one(m)
        if self._dirty:
            self._flush()
        return commands

    def on_measurements(self, batch: Sequence[Measurement]) -> list[Command]:
        """``on_measurement`` for each of ``batch`` in order, with the state of every rule they
        changed written once, in one transaction, at the end (the rule stage's batch: what one
        wake-up of a source delivered)."""
        commands: list[Command] = []
        for m in batch:
            commands += self._on_one(m)
        if self._dirty:
            self._flush()
        return commands

    def _on_one(self, m: Measurement) -> list[Command]:
        index = self._index
        rules = index.get((m.device, m.name)) or index.get(("*", m.name))
        if rules is None:
            if self._timers and self._timers[0][0] <= self._clock():
                return self.tick()
            return []
        dev = self._values.get(m.device)
        if dev is None:
            dev = self._values[m.device] = _Device()
        name = m.name
        if m.quality == "good":
            last = dev.last
            if name in last:
                dev.prev[name] = last[name]
            last[name] = dev.values[name] = m.value
        else:
            dev.values.pop(name, None)
        now = self._clock()
        wall = self._wall_now = now if self._same_clock else self._wall()
        # the measurement's time on the duration clock: its age when it arrived (wall clock,
        # never negative) before now; later wall-clock jumps do not age or rejuvenate it
        dev.ts[name] = now - max(0.0, wall - m.ts)
        if self._keep_any:
            dev.any[name] = m.value

        commands: list[Command] = []
        if self._timers and self._timers[0][0] <= now:
            self._fire_due(now, commands)
        for r in rules:
            self._step(r, m, dev, now, commands)
        return commands

    def _data(self, r: _Rule, c: _Cond, m: Measurement, dev: _Device, now: float) -> Any:
        """The condition's data, or _SKIP / _UNKNOWN."""
        if m.quality != "good" and not r.allow_stale:
            return _UNKNOWN  # only rules that read m.name are triggered by it
        values = dev.any if r.allow_stale else dev.values
        try:
            data: dict[str, Any] = {v: values[v] for v in c.data_vars}
        except KeyError:
            return _SKIP  # never seen since start, or gone bad earlier (handled then)
        if r.max_age:
            ts = dev.ts
            for n in c.needs:
                if now - ts.get(n, now) > r.max_age:
                    return _UNKNOWN
        if c.maps:
            ts = dev.ts
            prev = dev.prev
            for map_name, keys in c.maps:
                wanted = keys if keys is not None else tuple(values)
                out: dict[str, Any] = {}
                if map_name == "age":
                    for k in wanted:
                        if k in values:
                            out[k] = now - ts[k]
                        elif keys is not None:
                            return _SKIP
                elif map_name == "previous":
                    for k in wanted:
                        if k in prev and k in values:
                            out[k] = prev[k]
                        elif keys is not None:
                            return _SKIP  # no previous value yet
                else:  # delta: numbers only
                    for k in wanted:
                        if k in prev and k in values:
                            a, b = values[k], prev[k]
                            if type(a) in _NUMBERS and type(b) in _NUMBERS:
                                out[k] = float(a) - float(b)
                        elif keys is not None:
                            return _SKIP
                data[map_name] = out
        if c.uses_device:
            data["device"] = m.device
        if c.uses_name:
            data["name"] = m.name
        return data

    def _evaluate(self, r: _Rule, c: _Cond, m: Measurement, dev: _Device, now: float) -> Any:
        """True, False, _SKIP or _UNKNOWN."""
        stats = r.stats
        data = self._data(r, c, m, dev, now)
        if data is _SKIP or data is _UNKNOWN:
            stats.skipped += 1
            return data
        stats.evaluations += 1
        try:
            result = c.condition.evaluate(data)
        except Exception as exc:  # noqa: BLE001 - a RuleError with a reason, or anything at all
            self._failed(r, m, now, exc)
            return _UNKNOWN
        if r.failing:
            r.failing = False
            stats.consecutive_errors = 0
        return result

    def _failed(self, r: _Rule, m: Measurement, now: float, exc: Exception) -> None:
        stats = r.stats
        reason = getattr(exc, "reason", None)
        if not isinstance(reason, str):
            reason = "runtime" if isinstance(exc, RuleError) else "internal"
        stats.errors += 1
        stats.consecutive_errors += 1
        by = stats.errors_by_reason
        by[reason] = by.get(reason, 0) + 1
        if isinstance(exc, RuleError):
            stats.last_error = str(exc)
        else:  # not from cel.py (which wraps everything): say what it was, on one line
            text = " ".join(str(exc).split())[:200]
            stats.last_error = f"rule {r.name!r}: evaluation failed: {type(exc).__name__}: {text}"
        stats.last_error_reason = reason
        stats.last_error_ts = self._wall_now
        if not r.failing:
            r.failing = True
            log.warning(
                "%s [%s] (device %r, after %s=%r)",
                stats.last_error, reason, m.device, m.name, _short(m.value),
            )

    def _step(self, r: _Rule, m: Measurement, dev: _Device, now: float, out: list[Command]) -> None:
        device = m.device
        st = r.states.get(device)
        if st is None:
            st = r.states[device] = _State()
        key = (r.order, device)
        if r.off is not None and st.on:
            off = self._evaluate(r, r.off, m, dev, now)
            if off is True:  # hysteresis: re-arm
                st.on = False
                st.since = st.due = None
                self._dirty[key] = None
                self._emit(r, r.off_actions, device, now=now, cause=m, state="off", out=out)
                return
        if m.name not in r.when.needs:
            return
        result = self._evaluate(r, r.when, m, dev, now)
        if result is _SKIP:
            return
        if result is True:
            if st.since is None:
                st.since = now
                st.cause = m
                self._dirty[key] = None
            if r.edge and st.on:
                return
            ready = st.since + r.for_
            if st.last_fire is not None and r.cooldown:
                cool = st.last_fire + r.cooldown
                if cool > now and ready <= now:
                    r.stats.suppressed += 1
                ready = max(ready, cool)
            if ready <= now:
                if st.due is not None:
                    st.due = None
                self._fire(r, device, st, now, cause=m, out=out)
            elif r.edge or st.since + r.for_ > now:
                self._schedule(r, device, st, ready)
            return
        # false or unknown: a pending period ends
        if st.since is not None or st.due is not None:
            st.since = st.due = None
            st.cause = None
            self._dirty[key] = None
        if result is False and st.on and r.off is None:
            st.on = False
            self._dirty[key] = None
            self._emit(r, r.off_actions, device, now=now, cause=m, state="off", out=out)

    def _fire(
        self,
        r: _Rule,
        device: str,
        st: _State,
        now: float,
        *,
        cause: Measurement | None,
        out: list[Command],
    ) -> None:
        if not st.on or r.cooldown:  # a level rule firing again changes nothing durable
            self._dirty[(r.order, device)] = None
        st.on = True
        st.last_fire = now
        stats = r.stats
        stats.firings += 1
        stats.last_fired_ts = self._wall_now
        if self._log_firings and log.isEnabledFor(r.level):
            why = f" after {cause.name}={cause.value!r}" if cause is not None else ""
            log.log(
                r.level,
                "rule %r fired for device %r%s: %s",
                r.name,
                device,
                why,
                ", ".join(r.actions),
            )
        self._emit(r, r.actions, device, now=now, cause=cause, state="on", out=out)

    def _emit(
        self,
        r: _Rule,
        actions: tuple[str, ...],
        device: str,
        *,
        now: float,
        cause: Measurement | None,
        state: str,
        out: list[Command],
    ) -> None:
        if state == "off" and actions and self._log_firings and log.isEnabledFor(logging.INFO):
            log.info("rule %r re-armed for device %r: %s", r.name, device, ", ".join(actions))
        for a in actions:
            out.append(
                Command(
                    rule=r.name,
                    action=a,
                    ts=self._wall_now,
                    cause=cause,
                    params={"device": device, "rule_state": state},
                )
            )

    # --- durable state ---------------------------------------------------------------------------

    def _flush(self) -> None:
        dirty = self._dirty
        self._dirty = {}
        store = self._store
        if store is None:
            return
        rules = self._rules
        records = []
        for order, device in dirty:
            r = rules[order]
            st = r.states.get(device)
            if st is None:
                continue
            records.append(
                StateRecord(
                    rule=r.name,
                    digest=r.digest,
                    device=device,
                    since=st.since,
                    on=st.on,
                    last_fire=st.last_fire,
                    due=st.due,
                )
            )
        store.save(records)

    def _restore(self, store: RuleStore) -> None:
        store.retain({r.name: r.digest for r in self._rules})
        now = self._clock()
        restored = 0
        for rec in store.load():
            r = self._by_name.get(rec.rule)
            if r is None or rec.digest != r.digest:
                continue
            st = r.states[rec.device] = _State()
            st.since, st.on, st.last_fire = rec.since, rec.on, rec.last_fire
            restored += 1
            if rec.due is not None and rec.due > now:
                st.due = rec.due
                heapq.heappush(self._timers, (rec.due, r.order, rec.device))
            # a deadline that passed while down: the first true evaluation fires (since is kept)
        if restored:
            log.info("restored the state of %d rule/device pairs from %s", restored, store.path)
