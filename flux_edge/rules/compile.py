"""Rules at load time: the variables a rule's conditions may use and their types, the per-rule
budget, compiling conditions (``when``, ``off_when``, actuators' interlocks), the checks that
check-config runs (``check_rules``, with each condition's cost estimate) and the digest that
ties a rule's durable state to its definition. ``engine.py`` runs what this compiles."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from flux_edge.config import Config, RuleConfig
from flux_edge.errors import RuleError
from flux_edge.rules.cel import DEFAULT_BUDGET, Budget, Condition, compile_condition

#: variables every rule has: the device and the name of the measurement being processed
BUILTIN_VARIABLES: dict[str, str] = {"device": "string", "name": "string"}
#: maps keyed by measurement name, declared unless a register or input has the same name
MAP_VARIABLES: dict[str, str] = {
    "previous": "map(dyn)",
    "delta": "map(double)",
    "age": "map(double)",
}

_BOOL_FUNCTIONS = ("coil", "discrete")
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class ConditionError(RuleError):
    """A condition other than a rule's ``when`` failed to compile: ``key`` is its config key
    path (``("rules", "r", "off_when")``, ``("actuators", "pump", "interlock")``)."""

    def __init__(self, err: RuleError, key: tuple[str, ...]) -> None:
        text = str(err)
        message = text.split(": ", 1)[1] if ": " in text else text
        super().__init__(err.rule, f"{key[-1]}: {message}", err.column)
        self.key = key
        if key[0] == "actuators":
            self.args = (f"actuator {key[1]!r}: {key[-1]}: {message}",)


# A register as a rule sees it: (variable name, type, where it comes from).
_Declared = tuple[str, str, str]


def _registers_by_device(config: Config) -> dict[str, list[_Declared]]:
    """device -> the variables the config declares for it, in config order: what each source's
    kind declares (every register of every Modbus device, TCP and RTU; a loaded config's
    devices already hold their profile's map)."""
    out: dict[str, list[_Declared]] = {}
    for source_name, source in config.sources.items():
        for device, points in source.declared_points(source_name).items():
            declared = out.setdefault(device, [])
            origin = f"register of device {device!r}, source {source_name!r}"
            declared.extend((point, type_, origin) for point, type_ in points)
    return out


def rule_variables(config: Config, rule_name: str) -> dict[str, str]:
    """The scalar variables rule ``rule_name`` may use, name -> "bool" | "int" | "double" |
    "string" (``MAP_VARIABLES`` come on top).

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
    return _variables(rule_name, rule.device, rule.inputs, registers)


def _variables(
    owner: str, device: str, inputs: Mapping[str, str], registers: dict[str, list[_Declared]]
) -> dict[str, str]:
    if device:
        declared = list(registers.get(device, ()))
    else:
        declared = [d for regs in registers.values() for d in regs]
    declared.extend((name, type_, "rule input") for name, type_ in inputs.items())
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
                owner,
                f"variable {name!r} is {known} ({origins[name]}) but {type_} ({origin}); "
                "rename one of them or restrict the rule to one device",
            )
    return types


def _with_maps(variables: dict[str, str]) -> dict[str, str]:
    out = dict(variables)
    for name, type_ in MAP_VARIABLES.items():
        out.setdefault(name, type_)
    return out


def rule_budget(rule: RuleConfig | None) -> Budget:
    """The budget of a rule's conditions: its ``max_cost`` (when the config has the field and
    it is set) over the defaults."""
    max_cost = getattr(rule, "max_cost", None) if rule is not None else None
    if isinstance(max_cost, int) and not isinstance(max_cost, bool) and max_cost > 0:
        return Budget(
            max_cost=max_cost,
            max_memory=DEFAULT_BUDGET.max_memory,
            max_string=DEFAULT_BUDGET.max_string,
            max_entries=DEFAULT_BUDGET.max_entries,
            max_key=DEFAULT_BUDGET.max_key,
        )
    return DEFAULT_BUDGET


def _compile(
    owner: str,
    expr: str,
    variables: dict[str, str],
    key: tuple[str, ...] | None,
    budget: Budget = DEFAULT_BUDGET,
) -> Condition:
    """Compile one condition; its map keys must be measurement variables; it must read some
    measurement. ``key`` (for conditions other than ``when``) wraps errors in ConditionError."""
    try:
        condition = compile_condition(owner, expr, _with_maps(variables), budget=budget)
        measurements = set(variables) - BUILTIN_VARIABLES.keys()
        direct = condition.variables & measurements
        for map_name, keys in condition.fields.items():
            if variables.get(map_name) is not None:
                continue  # a register or input of that name: not our map
            unknown = sorted((keys or frozenset()) - measurements)
            if unknown:
                raise RuleError(
                    owner,
                    f"{map_name}.{unknown[0]}: no measurement named {unknown[0]!r}; "
                    f"known: {', '.join(sorted(measurements)) or 'none'}",
                    expr.find(f"{map_name}.{unknown[0]}") + 1,
                )
            direct |= keys or frozenset()
        if not direct:
            raise RuleError(
                owner,
                "condition references no measurement (no register or input variable), so no "
                "measurement would ever evaluate it",
            )
    except RuleError as exc:
        if key is None:
            raise
        raise ConditionError(exc, key) from None
    return condition


def _compile_rule(
    config: Config, rule_name: str, registers: dict[str, list[_Declared]]
) -> tuple[Condition, Condition | None]:
    rule = config.rules[rule_name]
    variables = _rule_variables(config, rule_name, registers)
    budget = rule_budget(rule)
    when = _compile(rule_name, rule.when, variables, None, budget)
    off = None
    if rule.off_when:
        key = ("rules", rule_name, "off_when")
        off = _compile(rule_name, rule.off_when, variables, key, budget)
    return when, off


def compile_interlock(config: Config, actuator: str) -> Condition | None:
    """The compiled ``interlock`` of actuator ``actuator`` (None when it has none). It reads the
    registers of ``interlock_device`` (of every device when that is ""), ``device``/``name`` and
    the ``previous``/``delta``/``age`` maps. Raises ``ConditionError`` (``key`` =
    ("actuators", name, "interlock"))."""
    spec = config.actuators[actuator]
    if not spec.interlock:
        return None
    key = ("actuators", actuator, "interlock")
    try:
        variables = _variables(actuator, spec.interlock_device, {}, _registers_by_device(config))
    except RuleError as exc:
        raise ConditionError(exc, key) from None
    return _compile(actuator, spec.interlock, variables, key)


@dataclass(frozen=True, slots=True)
class ConditionCost:
    """The estimated worst case of one evaluation of a condition, and its budget."""

    rule: str
    key: tuple[str, ...]  # ("rules", name, "when" | "off_when") or ("actuators", name, ...)
    cost: int  # cost units
    memory: int  # bytes
    max_cost: int
    max_memory: int


def _cost(key: tuple[str, ...], c: Condition) -> ConditionCost:
    b = c.budget
    return ConditionCost(key[1], key, c.cost, c.memory, b.max_cost, b.max_memory)


def check_rules(config: Config, costs: list[ConditionCost] | None = None) -> list[RuleError]:
    """Compile every rule's conditions and every actuator's interlock of ``config``; return all
    the errors (empty when everything is fine). Errors about a condition other than a rule's
    ``when`` are ``ConditionError``s naming their key. ``costs``, when given, receives the
    estimate of every condition that compiled."""
    registers = _registers_by_device(config)
    errors: list[RuleError] = []
    for rule_name, rule in config.rules.items():
        try:
            variables = _rule_variables(config, rule_name, registers)
        except RuleError as exc:
            errors.append(exc)
            continue
        budget = rule_budget(rule)
        try:
            when = _compile(rule_name, rule.when, variables, None, budget)
            if costs is not None:
                costs.append(_cost(("rules", rule_name, "when"), when))
        except RuleError as exc:
            errors.append(exc)
        if rule.off_when:
            key = ("rules", rule_name, "off_when")
            try:
                off = _compile(rule_name, rule.off_when, variables, key, budget)
                if costs is not None:
                    costs.append(_cost(key, off))
            except RuleError as exc:
                errors.append(exc)
    for actuator in config.actuators:
        try:
            interlock = compile_interlock(config, actuator)
            if interlock is not None and costs is not None:
                costs.append(_cost(("actuators", actuator, "interlock"), interlock))
        except RuleError as exc:
            errors.append(exc)
    return errors


def rule_digest(rule: RuleConfig) -> str:
    """A digest of what a rule's state depends on: its conditions, mode, device, ``for`` and
    inputs (not its actions, cooldown, severity or description). Stored state of a rule whose
    digest changed is discarded."""
    what = [
        rule.when,
        rule.off_when,
        rule.mode,
        rule.device,
        rule.for_,
        sorted(rule.inputs.items()),
    ]
    return hashlib.sha256(msgspec.json.encode(what)).hexdigest()[:16]


