"""The rule engine: Measurement -> Commands. Pure: no I/O, the clock is injected.

Semantics (decided here, relied on by tests):

* **Variables.** A rule reads the variables ``rule_variables`` declares: the registers of the
  Modbus devices it watches (every device of every TCP and RTU source, profile registers
  included), its ``inputs``, and ``device``/``name`` (the device and name of the measurement
  being processed). Values are looked up *in the measurement's device*: a rule
  with ``device = ""`` runs for each device separately, against that device's own values.
* **Trigger.** A measurement evaluates only the rules whose condition references its name and
  whose device filter matches its device (an index built once). A rule that references no
  measurement variable could never be triggered and is rejected by ``check_rules``.
* **Quality gating.** The engine keeps the latest *good* value per (device, name); a stale or bad
  measurement removes it. A rule is evaluated only when every variable it references has a current
  good value. Otherwise its condition is **unknown**: level rules do not fire, and an edge rule
  keeps its previous state (unknown is neither a rising nor a falling edge). So a sensor that
  drops out and comes back while the condition holds does not fire the rule a second time.
* **Modes.** ``edge`` fires when the condition goes false -> true (the first evaluation that is
  true counts as a rising edge); the edge state is kept per device. ``level`` fires every time the
  condition evaluates true.
* **Errors.** An evaluation error (division by zero, an ill-typed value from a plugin, ...) is
  counted in ``stats``, logged on the ``flux_edge.rules`` logger (a warning when a rule starts
  failing, then quiet until it succeeds again) and treated as unknown. Never raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flux_edge.config import (
    Config,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
    source_devices,
)
from flux_edge.errors import RuleError
from flux_edge.model import Command, Measurement, Value
from flux_edge.rules.cel import Condition, compile_condition

__all__ = ["BUILTIN_VARIABLES", "RuleEngine", "RuleStats", "check_rules", "rule_variables"]

log = logging.getLogger("flux_edge.rules")

#: variables every rule has: the device and the name of the measurement being processed
BUILTIN_VARIABLES: dict[str, str] = {"device": "string", "name": "string"}

_BOOL_FUNCTIONS = ("coil", "discrete")


# A register as a rule sees it: (variable name, type, where it comes from).
_Declared = tuple[str, str, str]


def _register_type(reg: RegisterConfig) -> str:
    if reg.function in _BOOL_FUNCTIONS or reg.type == "bool":
        return "bool"
    return "string" if reg.type == "string" else "double"


def _registers_by_device(config: Config) -> dict[str, list[_Declared]]:
    """device -> the variables its registers declare, in config order: every device of every
    Modbus source, TCP and RTU (a loaded config's devices already hold their profile's map)."""
    out: dict[str, list[_Declared]] = {}
    for source_name, source in config.sources.items():
        if not isinstance(source, ModbusTcpSource | ModbusRtuSource):
            continue
        for device in source_devices(source_name, source):
            declared = out.setdefault(device.name, [])
            origin = f"register of device {device.name!r}, source {source_name!r}"
            declared.extend((reg.name, _register_type(reg), origin) for reg in device.registers)
    return out


def rule_variables(config: Config, rule_name: str) -> dict[str, str]:
    """The variables rule ``rule_name`` may use, name -> "bool" | "int" | "double" | "string".

    Every register of every Modbus device (TCP or RTU, profile registers included) whose name
    matches the rule's ``device`` (all devices when it is ""): bool for coils, discrete inputs and
    type "bool", string for type "string", else double (scale and offset make any number a
    double); the rule's ``inputs``; ``device`` and ``name``. Raises ``RuleError`` when one name
    would have two types.
    """
    return _rule_variables(config, rule_name, _registers_by_device(config))


def _rule_variables(
    config: Config, rule_name: str, registers: dict[str, list[_Declared]]
) -> dict[str, str]:
    rule = config.rules.get(rule_name)
    if rule is None:
        raise RuleError(rule_name, "no such rule in the configuration")
    if rule.device:
        declared = list(registers.get(rule.device, ()))
    else:
        declared = [d for regs in registers.values() for d in regs]
    declared.extend((name, type_, "rule input") for name, type_ in rule.inputs.items())
    declared.extend((name, type_, "built-in") for name, type_ in BUILTIN_VARIABLES.items())
    types: dict[str, str] = {}
    origins: dict[str, str] = {}
    for name, type_, origin in declared:
        known = types.get(name)
        if known is None:
            types[name] = type_
            origins[name] = origin
        elif known != type_:
            raise RuleError(
                rule_name,
                f"variable {name!r} is {known} ({origins[name]}) but {type_} ({origin}); "
                "rename one of them or restrict the rule to one device",
            )
    return types


def _compile_rule(
    config: Config, rule_name: str, registers: dict[str, list[_Declared]]
) -> Condition:
    rule = config.rules[rule_name]
    variables = _rule_variables(config, rule_name, registers)
    condition = compile_condition(rule_name, rule.when, variables)
    if not condition.variables - BUILTIN_VARIABLES.keys():
        raise RuleError(
            rule_name,
            "condition references no measurement (no register or input variable), so no "
            "measurement would ever evaluate it",
        )
    return condition


def check_rules(config: Config) -> list[RuleError]:
    """Compile every rule of ``config``; return all the errors (empty when every rule is fine)."""
    registers = _registers_by_device(config)
    errors: list[RuleError] = []
    for rule_name in config.rules:
        try:
            _compile_rule(config, rule_name, registers)
        except RuleError as exc:
            errors.append(exc)
    return errors


@dataclass(slots=True)
class RuleStats:
    """Counters of one rule, across devices."""

    evaluations: int = 0  # times the condition was evaluated (errors included)
    firings: int = 0  # times the rule emitted its actions
    errors: int = 0  # evaluation errors
    skipped: int = 0  # triggered, but an input had no current good value
    last_fired_ts: float | None = None
    last_error: str = ""


class _Rule:
    __slots__ = (
        "actions",
        "condition",
        "data_vars",
        "edge",
        "failing",
        "name",
        "order",
        "state",
        "stats",
        "uses_device",
        "uses_name",
    )

    def __init__(
        self, order: int, name: str, condition: Condition, actions: tuple[str, ...], edge: bool
    ) -> None:
        self.order = order
        self.name = name
        self.condition = condition
        self.actions = actions
        self.edge = edge
        self.data_vars = tuple(sorted(condition.variables - BUILTIN_VARIABLES.keys()))
        self.uses_device = "device" in condition.variables
        self.uses_name = "name" in condition.variables
        self.state: dict[str, bool] = {}  # edge state per device
        self.failing = False
        self.stats = RuleStats()


class RuleEngine:
    """Evaluates the rules of a ``Config`` against a stream of measurements.

    Not thread-safe: call ``on_measurement`` from one task.
    """

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        registers = _registers_by_device(config)
        rules: list[_Rule] = []
        for order, (rule_name, rule) in enumerate(config.rules.items()):
            condition = _compile_rule(config, rule_name, registers)  # raises the first RuleError
            rules.append(_Rule(order, rule_name, condition, rule.actions, rule.mode == "edge"))
        self._rules = rules
        #: per rule name
        self.stats: dict[str, RuleStats] = {r.name: r.stats for r in rules}

        # (device or "*", variable name) -> rules, in config order. A (device, name) entry also
        # holds the "*" rules for that name, so one lookup finds everything for a known device.
        index: dict[tuple[str, str], list[_Rule]] = {}
        devices = {config.rules[r.name].device for r in rules} - {""}
        for r in rules:
            device = config.rules[r.name].device
            for var in r.data_vars:
                if device:
                    index.setdefault((device, var), []).append(r)
                else:
                    index.setdefault(("*", var), []).append(r)
                    for d in devices:
                        index.setdefault((d, var), []).append(r)
        self._index: dict[tuple[str, str], tuple[_Rule, ...]] = {
            key: tuple(sorted(rs, key=lambda r: r.order)) for key, rs in index.items()
        }
        # device -> name -> latest good value (only names some rule reads)
        self._values: dict[str, dict[str, Value]] = {}

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rules)

    def on_measurement(self, m: Measurement) -> list[Command]:
        """Record ``m`` and evaluate the rules it triggers; return the commands they emit."""
        index = self._index
        rules = index.get((m.device, m.name)) or index.get(("*", m.name))
        if rules is None:
            return []
        values = self._values.get(m.device)
        if m.quality == "good":
            if values is None:
                values = self._values[m.device] = {}
            values[m.name] = m.value
        elif values is not None:
            values.pop(m.name, None)

        if values is None:  # a bad first measurement of this device: nothing is known yet
            for r in rules:
                r.stats.skipped += 1
            return []
        commands: list[Command] = []
        for r in rules:
            stats = r.stats
            try:
                data = {v: values[v] for v in r.data_vars}
            except KeyError:  # an input without a current good value: the condition is unknown
                stats.skipped += 1
                continue
            if r.uses_device:
                data["device"] = m.device
            if r.uses_name:
                data["name"] = m.name
            stats.evaluations += 1
            try:
                result = r.condition.evaluate(data)
            except RuleError as exc:
                stats.errors += 1
                stats.last_error = str(exc)
                if not r.failing:
                    r.failing = True
                    log.warning("%s (device %r, after %s=%r)", exc, m.device, m.name, m.value)
                continue
            r.failing = False
            if r.edge:
                was = r.state.get(m.device, False)
                r.state[m.device] = result
                if was:
                    continue
            if not result:
                continue
            ts = self._clock()
            stats.firings += 1
            stats.last_fired_ts = ts
            commands.extend(Command(rule=r.name, action=a, ts=ts, cause=m) for a in r.actions)
        return commands
