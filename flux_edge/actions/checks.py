"""Checks at load time that span actions (a ``Domain`` of the config loader): actuators, the
safety layer's view of the actions that drive one physical thing."""

from __future__ import annotations

from flux_edge.config.kinds import Context, Domain
from flux_edge.config.values import Key, _suggest


def _check_actuators(ctx: Context) -> None:
    """Actuators name existing actions, each action belongs to at most one actuator; inputs and
    interlock_device name known devices (point names checked where the config declares them:
    Modbus registers)."""
    v, data = ctx.v, ctx.data
    actions = ctx.names("actions")
    owner: dict[str, str] = {}
    found = ctx.devices()
    devices = {d.name for d in found.declared}
    check_devices = (
        not found.dynamic and v.clean(("sources",)) and isinstance(data.get("sources"), dict)
    )
    registers = {d.name: d.points for d in found.declared if d.points is not None}
    for aname, actuator in data.get("actuators", {}).items():
        path: Key = ("actuators", aname)
        for key in ("on", "off"):
            target = actuator.get(key)
            if not isinstance(target, str) or not target:
                continue
            if actions is not None and target not in actions:
                v.report((*path, key), ctx.missing_ref("action", target, actions))
            elif target in owner and owner[target] != aname:
                v.report(
                    (*path, key),
                    f'action "{target}" already belongs to actuator "{owner[target]}": an '
                    "action drives one actuator, so that one safety layer sees every command",
                )
            else:
                owner[target] = aname
        if actuator.get("on") and actuator.get("on") == actuator.get("off"):
            v.report((*path, "off"), '"on" and "off" must be two different actions')
        if not check_devices:
            continue
        device = actuator.get("interlock_device", "")
        if device and device not in devices:
            v.report(
                (*path, "interlock_device"),
                f'no source reads a device named "{device}"; {_suggest(device, sorted(devices))}'
                f"devices: {', '.join(sorted(devices)) or 'none'}",
            )
        if device and not actuator.get("interlock"):
            v.report(
                (*path, "interlock_device"),
                '"interlock_device" is set but there is no "interlock" condition',
                at="key",
                warning=True,
            )
        for index, ref in enumerate(actuator.get("inputs", [])):
            dname, _, mname = ref.partition(".")
            if dname not in devices:
                v.report(
                    (*path, "inputs", index),
                    f'no source reads a device named "{dname}"; '
                    f"{_suggest(dname, sorted(devices))}"
                    f"devices: {', '.join(sorted(devices)) or 'none'}",
                )
            elif dname in registers and mname not in registers[dname]:
                names = sorted(n for n in registers[dname] if isinstance(n, str))
                v.report(
                    (*path, "inputs", index),
                    f'device "{dname}" has no register named "{mname}" (a plugin may still '
                    f"produce it); {_suggest(mname, names)}registers: {', '.join(names) or 'none'}",
                    warning=True,
                )


DOMAIN = Domain(name="actuators", semantic=_check_actuators)
