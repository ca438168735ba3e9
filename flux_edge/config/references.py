"""References between tables: chains name plugins, actions name sources, rules name actions,
device names are unique, one source per serial port, actuators own their actions."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from flux_edge.config.plugin_files import _candidates, _missing_wasm
from flux_edge.config.schema import _MODBUS_TYPES, DaemonConfig, UplinkConfig, _default
from flux_edge.config.validate import _Validator
from flux_edge.config.values import Key, _fmt_path, _got, _is_number, _suggest

# --- references between tables ------------------------------------------------------------------


def _names(raw: dict[str, Any], section: str) -> list[str] | None:
    """The names declared in a top-level table, or None if it is not a table (already reported)."""
    table = raw.get(section, {})
    return list(table) if isinstance(table, dict) else None


def _missing_ref(kind: str, name: str, declared: list[str]) -> str:
    listed = ", ".join(declared) if declared else "none"
    return f'no {kind} named "{name}"; {_suggest(name, declared)}declared {kind}s: {listed}'


def _cross_check(v: _Validator, raw: dict[str, Any], data: dict[str, Any], base_dir: Path) -> None:
    plugins = _names(raw, "plugins")
    sources = _names(raw, "sources")
    actions = _names(raw, "actions")
    src_data: dict[str, Any] = data.get("sources", {})
    used_plugins: set[str] = set()
    act_data: dict[str, Any] = data.get("actions", {})
    for aname, action in act_data.items():
        if action.get("type") != "wasm" or not isinstance(action.get("plugin"), str):
            continue
        pname = action["plugin"]
        used_plugins.add(pname)
        if plugins is not None and pname and pname not in plugins:
            v.report(("actions", aname, "plugin"), _missing_ref("plugin", pname, plugins))

    for sname, src in src_data.items():
        for index, pname in enumerate(src.get("chain", [])):
            used_plugins.add(pname)
            if plugins is not None and pname not in plugins:
                v.report(("sources", sname, "chain", index), _missing_ref("plugin", pname, plugins))

    daemon = data.get("daemon", {})
    plugin_dirs = daemon.get("plugin_dirs", DaemonConfig().plugin_dirs)
    if not v.clean(("daemon", "plugin_dirs")):
        plugin_dirs = ()
    for pname, plugin in data.get("plugins", {}).items():
        path: Key = ("plugins", pname)
        if not (v.clean((*path, "file")) and v.clean((*path, "module"))):
            continue
        file, module = plugin.get("file", ""), plugin.get("module", "")
        candidates = _candidates(base_dir, plugin_dirs, pname, module, file)
        if not any(c.is_file() for c in candidates):
            where = (*path, "file") if file else (*path, "module") if module else path
            v.report(
                where,
                _missing_wasm(pname, file, candidates),
                at="value" if (file or module) else "key",
            )
        if sources is not None and pname not in used_plugins:
            v.report(
                path,
                f'plugin "{pname}" is declared but no source\'s chain uses it',
                at="key",
                warning=True,
            )

    _check_mqtt_clients(v, src_data, base_dir)
    _check_uplink(v, data, base_dir)
    _check_action_targets(v, data, sources)
    declared, dynamic = _declared_devices(data)
    _check_device_names(v, declared)
    _check_ports(v, src_data)

    devices = {name for name, _ in declared}
    known_devices = sources is not None and not dynamic and v.clean(("sources",))
    for rname, rule in data.get("rules", {}).items():
        for key in ("actions", "off_actions"):
            for index, aname in enumerate(rule.get(key, [])):
                if actions is not None and aname not in actions:
                    v.report(("rules", rname, key, index), _missing_ref("action", aname, actions))
        _check_rule_tests(v, rname, rule, devices if known_devices else None)
        device = rule.get("device")
        if (
            device
            and sources is not None
            and not dynamic
            and v.clean(("sources",))
            and device not in devices
        ):
            v.report(
                ("rules", rname, "device"),
                f'no source reads a device named "{device}", so this rule never fires; '
                f"{_suggest(device, sorted(devices))}"
                f"devices: {', '.join(sorted(devices)) or 'none'}",
                warning=True,
            )


def _check_rule_tests(
    v: _Validator, rname: str, rule: dict[str, Any], devices: set[str] | None
) -> None:
    """A rule's own test cases: steps name a device it can see, expectations name its actions."""
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


def _check_actuators(v: _Validator, data: dict[str, Any], actions: list[str] | None) -> None:
    """Actuators name existing actions, each action belongs to at most one actuator; inputs and
    interlock_device name known devices (register names checked for Modbus devices)."""
    owner: dict[str, str] = {}
    declared, dynamic = _declared_devices(data)
    devices = {name for name, _ in declared}
    check_devices = not dynamic and v.clean(("sources",)) and isinstance(data.get("sources"), dict)
    registers: dict[str, set[str]] = {}
    for src in data.get("sources", {}).values():
        if src.get("type") in _MODBUS_TYPES:
            for device in src.get("devices", []):
                if isinstance(device.get("name"), str):
                    registers[device["name"]] = {
                        str(r.get("name"))
                        for r in device.get("registers", [])
                        if isinstance(r, dict)
                    }
    for aname, actuator in data.get("actuators", {}).items():
        path: Key = ("actuators", aname)
        for key in ("on", "off"):
            target = actuator.get(key)
            if not isinstance(target, str) or not target:
                continue
            if actions is not None and target not in actions:
                v.report((*path, key), _missing_ref("action", target, actions))
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


def _declared_devices(data: dict[str, Any]) -> tuple[list[tuple[str, Key]], bool]:
    """Every device name the checked sources declare, with the key path that names it; and
    whether some source names its devices at run time (MQTT ``device_from_topic``)."""
    declared: list[tuple[str, Key]] = []
    dynamic = False
    for sname, src in data.get("sources", {}).items():
        kind = src.get("type")
        if kind in _MODBUS_TYPES and (kind == "modbus_rtu" or "devices" in src):
            for index, device in enumerate(src.get("devices", [])):
                name = device.get("name")
                if isinstance(name, str):
                    declared.append((name, ("sources", sname, "devices", index, "name")))
        elif kind == "mqtt" and src.get("device_from_topic"):
            dynamic = True
        elif src.get("device"):
            declared.append((src["device"], ("sources", sname, "device")))
        else:
            declared.append((sname, ("sources", sname)))
    return declared, dynamic


def _check_device_names(v: _Validator, declared: list[tuple[str, Key]]) -> None:
    first: dict[str, Key] = {}
    for name, path in declared:
        if name not in first:
            first[name] = path
            continue
        other = first[name]
        if len(other) == 2:
            by = f'source "{other[1]}" (a source without "device" is named after its table)'
        else:
            by = _fmt_path(other)
        v.report(
            path,
            f'device name "{name}" is already used by {by}: measurements are keyed by '
            "device, so device names must be unique across all sources",
            at="key" if len(path) == 2 else "value",
        )


def _port_identity(port: str) -> str:
    """Ports compared by the device they open (/dev/serial/by-id/... links resolved)."""
    with contextlib.suppress(OSError, RuntimeError):
        if Path(port).exists():
            return str(Path(port).resolve())
    return port


def _resolve_tls_files(v: _Validator, tls: object, where: Key, base_dir: Path) -> None:
    """TLS files (MQTT sources, uplink) must exist; relative paths become absolute, next to the
    config file."""
    if not isinstance(tls, dict):
        return
    for key in ("ca_file", "cert_file", "key_file"):
        value = tls.get(key, "")
        if not isinstance(value, str) or not value:
            continue
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            v.report((*where, key), f"no such file: {path}")
        else:
            tls[key] = str(path)


def _check_mqtt_clients(v: _Validator, src_data: dict[str, Any], base_dir: Path) -> None:
    """Two sources with one client id would keep kicking each other off the broker; TLS files
    must exist."""
    ids: dict[str, str] = {}
    for sname, src in src_data.items():
        if src.get("type") != "mqtt":
            continue
        cid = src.get("client_id", "")
        if isinstance(cid, str) and cid:
            if cid in ids:
                v.report(
                    ("sources", sname, "client_id"),
                    f'client id "{cid}" is already used by source "{ids[cid]}": the broker would '
                    "disconnect one whenever the other connects; give each source its own",
                )
            else:
                ids[cid] = sname
        _resolve_tls_files(v, src.get("tls"), ("sources", sname, "tls"), base_dir)


def _check_uplink(v: _Validator, data: dict[str, Any], base_dir: Path) -> None:
    """TLS files must exist; reconnect bounds in order; a batch topic should not name a
    measurement (each publish carries many)."""
    up = data.get("uplink")
    if not isinstance(up, dict):
        return
    _resolve_tls_files(v, up.get("tls"), ("uplink", "tls"), base_dir)
    outbox = up.get("outbox_file", "")
    if isinstance(outbox, str) and outbox and not Path(outbox).is_absolute():
        up["outbox_file"] = str(base_dir / outbox)
    lo, hi = up.get("reconnect_min", 1.0), up.get("reconnect_max", 60.0)
    if _is_number(lo) and _is_number(hi) and lo > hi:
        v.report(("uplink", "reconnect_max"),
                 f"must be >= reconnect_min ({lo} s), got {hi} s")
    topic = up.get("topic", _default(UplinkConfig, "topic"))
    if up.get("format") == "batch" and isinstance(topic, str) and "{name}" in topic:
        v.report(
            ("uplink", "topic"),
            "format = \"batch\" groups records by topic, and {name} makes one topic per "
            "measurement, so batches would hold one record each; use a topic without {name}, "
            'e.g. "flux-edge/{gateway}/{device}"',
            warning=True,
        )
    src_ids = {
        src.get("client_id") for src in data.get("sources", {}).values()
        if src.get("type") == "mqtt" and src.get("client_id")
    }
    cid = up.get("client_id")
    if cid and cid in src_ids:
        v.report(("uplink", "client_id"),
                 f'client id "{cid}" is already used by an MQTT source; give the uplink its own')


def _check_ports(v: _Validator, src_data: dict[str, Any]) -> None:
    owners: dict[str, str] = {}
    for sname, src in src_data.items():
        port = src.get("port")
        if src.get("type") not in ("modbus_rtu", "serial") or not isinstance(port, str) or not port:
            continue
        identity = _port_identity(port)
        if identity in owners:
            v.report(
                ("sources", sname, "port"),
                f'port {_got(port)} is already used by source "{owners[identity]}": a serial '
                "port is one bus, opened by one source; put every device of an RS-485 line "
                "into that source's devices",
            )
        else:
            owners[identity] = sname


def _source_device_names(sname: str, src: dict[str, Any]) -> list[str]:
    if src.get("type") == "modbus_tcp" and "devices" not in src:
        return [src.get("device") or sname]
    return [d["name"] for d in src.get("devices", []) if isinstance(d.get("name"), str)]


def _check_action_targets(v: _Validator, data: dict[str, Any], sources: list[str] | None) -> None:
    src_data: dict[str, Any] = data.get("sources", {})
    act_data: dict[str, Any] = data.get("actions", {})
    for aname, action in act_data.items():
        if action.get("type") == "wasm":
            _check_wasm_target(v, aname, action, act_data)
            continue
        target = action.get("source")
        if sources is None or not isinstance(target, str) or not target:
            continue
        path: Key = ("actions", aname)
        if target not in sources:
            v.report((*path, "source"), _missing_ref("source", target, sources))
            continue
        src = src_data.get(target)
        if src is None:
            continue  # the source itself is broken: already reported
        kind = src.get("type")
        if action.get("type") == "mqtt_publish":
            if kind != "mqtt":
                v.report(
                    (*path, "source"),
                    f'source "{target}" is a {kind} source: mqtt_publish needs an mqtt source '
                    "(its broker connection is used)",
                )
            continue
        if action.get("type") == "serial_write":
            if kind != "serial":
                v.report(
                    (*path, "source"),
                    f'source "{target}" is a {kind} source: serial_write needs a serial source',
                )
            continue
        if kind not in _MODBUS_TYPES:
            v.report(
                (*path, "source"),
                f'source "{target}" is a {kind} source: modbus_write needs a modbus_tcp or '
                "modbus_rtu source",
            )
            continue
        names = _source_device_names(target, src)
        device = action.get("device", "")
        listed = ", ".join(names) or "none"
        if not device and len(names) > 1:
            v.report(
                (*path, "device"),
                f'source "{target}" has {len(names)} devices ({listed}): say which one this '
                'action writes to with device = "..."',
                at="key",
                where=path,
            )
        elif device and device not in names:
            v.report(
                (*path, "device"),
                f'source "{target}" has no device named "{device}"; '
                f"{_suggest(device, names)}its devices: {listed}",
            )


def _check_wasm_target(
    v: _Validator, aname: str, action: dict[str, Any], act_data: dict[str, Any]
) -> None:
    target = action.get("target")
    if not isinstance(target, str) or not target:
        return
    where: Key = ("actions", aname, "target")
    if target not in act_data:
        v.report(where, _missing_ref("action", target, list(act_data)))
        return
    kind = act_data[target].get("type")
    if kind not in ("serial_write", "mqtt_publish"):
        v.report(
            where,
            f'action "{target}" is a {kind} action: a wasm action sends its plugin\'s bytes '
            "through a serial_write or mqtt_publish action",
        )
