"""The rules' checks at load time (a ``Domain`` of the config loader): rules name existing actions
and devices, their test cases are well-formed, their conditions type-check against the
variables their devices declare (CEL), and their own test cases pass (simulated time)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from flux_edge.config import Config, RuleConfig
from flux_edge.config.kinds import Context, Domain
from flux_edge.config.values import Key, _fmt_path, _suggest
from flux_edge.errors import FluxError, Problem
from flux_edge.rules.cost import format_bytes
from flux_edge.rules.engine import ConditionCost, check_rules
from flux_edge.rules.replay import check_rule_tests

if TYPE_CHECKING:
    from flux_edge.config.validate import _Validator


def _references(ctx: Context) -> None:
    """Rules name declared actions; a rule's device is one some source reads."""
    v = ctx.v
    actions = ctx.names("actions")
    sources = ctx.names("sources")
    found = ctx.devices()
    devices = {d.name for d in found.declared}
    known_devices = sources is not None and not found.dynamic and v.clean(("sources",))
    for rname, rule in ctx.entries("rules").items():
        for key in ("actions", "off_actions"):
            for index, aname in enumerate(rule.get(key, [])):
                if actions is not None and aname not in actions:
                    v.report(
                        ("rules", rname, key, index), ctx.missing_ref("action", aname, actions)
                    )
        _check_rule_tests(ctx, rname, rule, devices if known_devices else None)
        device = rule.get("device")
        if device and known_devices and device not in devices:
            v.report(
                ("rules", rname, "device"),
                f'no source reads a device named "{device}", so this rule never fires; '
                f"{_suggest(device, sorted(devices))}"
                f"devices: {', '.join(sorted(devices)) or 'none'}",
                warning=True,
            )


def _check_rule_tests(
    ctx: Context, rname: str, rule: dict[str, Any], devices: set[str] | None
) -> None:
    """A rule's own test cases: steps name a device it can see, expectations name its actions."""
    v = ctx.v
    own = [*rule.get("actions", []), *rule.get("off_actions", [])]
    for tindex, case in enumerate(rule.get("tests", [])):
        path: Key = ("rules", rname, "tests", tindex)
        for sindex, step in enumerate(case.get("given", [])):
            device = step.get("device") or rule.get("device", "")
            spath: Key = (*path, "given", sindex)
            if not device:
                v.report(
                    (*spath, "device"),
                    "the rule watches every device: say which one sent this measurement "
                    '(device = "...")',
                    at="key",
                    where=spath,
                )
            elif step.get("device") and rule.get("device") and device != rule["device"]:
                v.report(
                    (*spath, "device"),
                    f'the rule watches device "{rule["device"]}" only: a measurement of '
                    f'"{device}" never reaches it',
                )
            elif devices is not None and device not in devices and step.get("device"):
                v.report(
                    (*spath, "device"),
                    f'no source reads a device named "{device}"; '
                    f"{_suggest(device, sorted(devices))}"
                    f"devices: {', '.join(sorted(devices)) or 'none'}",
                )
        for eindex, aname in enumerate(case.get("expect", [])):
            if aname not in own:
                v.report(
                    (*path, "expect", eindex),
                    f'"{aname}" is not one of this rule\'s actions or off_actions; '
                    f"{_suggest(aname, own)}its actions: {', '.join(own) or 'none'}",
                )


def _rule_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if clean and not out.get("actions"):
        v.report(
            (*path, "actions"), "this rule has no actions: it will never do anything", warning=True
        )


def _semantic(ctx: Context) -> None:
    """Type-check every rule condition (CEL) against its devices' declared variables, then run
    the rules' own test cases."""
    v = ctx.v
    if not v.clean(("sources",)) or not ctx.data.get("rules"):
        return  # a broken source would make every rule using its registers look wrong
    config = ctx.build(_salvage(ctx))
    if config is None:
        return
    costs: list[ConditionCost] = []
    try:
        errors: list[Any] = list(check_rules(config, costs))
    except FluxError as exc:
        errors = [exc]
    for err in errors:
        rule = getattr(err, "rule", "")
        column = int(getattr(err, "column", 0) or 0)
        # a condition other than a rule's `when` (off_when, an actuator's interlock) says which
        key = getattr(err, "key", None)
        path: Key = tuple(key) if key else ("rules", rule, "when")
        line, col = v.pos.value(path)
        if column > 0:
            line, col = v.pos.in_string(path, column - 1) or (line, col)
        v.problems.append(Problem(v.file, _fmt_path(path), str(err), line, col))
        v.dirty.add(path)
    _report_costs(ctx, costs)
    _run_rule_tests(ctx, config)


#: a condition whose worst case is above this share of its budget is reported (a warning)
COST_WARNING_SHARE = 0.5


def _report_costs(ctx: Context, costs: list[ConditionCost]) -> None:
    """A warning for each condition whose estimated worst case per evaluation is above half its
    budget (those above the budget are errors already), so a rule close to its limit is
    noticed before an edit pushes it over."""
    for c in costs:
        if c.cost <= c.max_cost * COST_WARNING_SHARE and (
            c.memory <= c.max_memory * COST_WARNING_SHARE
        ):
            continue
        where = "interlock" if c.key[0] == "actuators" else "condition"
        ctx.report(
            c.key,
            f"this {where} may cost up to {c.cost:,} units ({c.cost * 100 // max(c.max_cost, 1)} % "
            f"of its limit, {c.max_cost:,}) and allocate up to {format_bytes(c.memory)} "
            f"(limit {format_bytes(c.max_memory)}) in one evaluation, in the worst case (inputs at "
            "their caps); simplify it, or set the rule's max_cost",
            warning=True,
        )


def _salvage(ctx: Context) -> dict[str, Any]:
    """The entries without an error, so that conditions are checked while others are broken."""
    v, data = ctx.v, ctx.data
    salvage: dict[str, Any] = {}
    for section in ("plugins", "sources", "rules", "actions", "actuators"):
        entries = data.get(section, {})
        salvage[section] = {k: e for k, e in entries.items() if v.clean((section, k))}
    if v.clean(("daemon",)) and "daemon" in data:
        salvage["daemon"] = data["daemon"]
    return salvage


def _run_rule_tests(ctx: Context, config: Config) -> None:
    """Run the rules' own test cases (in simulated time; no device is touched)."""
    tested = {
        name: rule
        for name, rule in config.rules.items()
        if rule.tests and ctx.clean(("rules", name))
    }
    if not tested:
        return
    for result in check_rule_tests(msgspec.structs.replace(config, rules=tested)):
        if not result.ok:
            ctx.report(("rules", result.rule, "tests", result.index), str(result), at="key")


DOMAIN = Domain(
    name="rules",
    table_checks={RuleConfig: _rule_checks},
    references=_references,
    semantic=_semantic,
)
