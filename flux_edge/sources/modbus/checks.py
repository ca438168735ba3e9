"""The checks of the Modbus kinds: constraints on their fields, checks across one table's fields
(a register, a device, a TCP endpoint, an RTU bus), and the devices a source entry declares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flux_edge.config.kinds import Device, Devices, TableCheck
from flux_edge.config.tables import baudrate_warning
from flux_edge.config.values import (
    Key,
    _got,
)
from flux_edge.sources.modbus.spec import (
    BIT_FUNCTIONS,
    REGISTER_WORDS,
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)

if TYPE_CHECKING:
    from flux_edge.config.validate import _Validator


def _register_words(register: dict[str, Any]) -> int:
    """Registers (or bits) one checked register entry takes."""
    if register.get("function", "holding") in BIT_FUNCTIONS:
        return 1
    type_ = register.get("type", "uint16")
    if type_ == "string":
        return max(1, int(register.get("count", 1)))
    return REGISTER_WORDS.get(type_, 1)


def _register_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    function = out.get("function", "holding")
    if function in BIT_FUNCTIONS:
        if "type" not in out:
            out["type"] = "bool"  # a coil or discrete input is one bit: bool unless told
        elif out["type"] != "bool":
            v.report(
                (*path, "type"),
                f'a {function} is a single bit: type must be "bool", got {_got(out["type"])}',
            )
            return
    type_ = out.get("type", "uint16")
    if type_ == "string" and "count" not in out:
        v.report(
            (*path, "count"),
            'a string needs "count": how many registers it takes (2 characters each)',
            at="key",
            where=path,
        )
        return
    if type_ != "string" and "count" in out:
        v.report(
            (*path, "count"),
            f'"count" is only for type = "string"; a {type_} has a fixed size',
            at="key",
        )
        return
    words = _register_words(out)
    if out["address"] + words - 1 > 65535:
        v.report(
            (*path, "address"),
            f"a {type_} takes {words} registers: address must be at most {65536 - words}",
        )


def unique_register_names(v: _Validator, registers: list[Any], path: Key, scope: str) -> None:
    seen: dict[str, int] = {}
    for index, register in enumerate(registers):
        name = register.get("name") if isinstance(register, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            v.report(
                (*path, "registers", index, "name"),
                f'register name "{name}" is already used by registers[{seen[name]}]: '
                f"names must be unique within {scope}",
            )
        else:
            seen[name] = index


def _unique_unit_ids(v: _Validator, devices: list[Any], path: Key) -> None:
    seen: dict[int, int] = {}
    for index, device in enumerate(devices):
        if not v.clean((*path, "devices", index, "unit_id")):
            continue  # a bad unit id is not the default
        unit = device.get("unit_id", 1)
        if unit in seen:
            other = devices[seen[unit]].get("name", "?")
            given = "unit_id" in device
            default = "" if given else " (the default)"
            v.report(
                (*path, "devices", index, "unit_id"),
                f'unit id {unit}{default} is already used by devices[{seen[unit]}] ("{other}"): '
                "each device on a bus answers to its own address",
                at="value" if given else "key",
                where=None if given else (*path, "devices", index),
            )
        else:
            seen[unit] = index


def _discovery_checks(v: _Validator, out: dict[str, Any], path: Key) -> None:
    """``models`` and ``bases`` belong to ``discover = "sunspec"``; each model id once."""
    for key in ("models", "bases"):
        if key in out and not out.get("discover"):
            v.report(
                (*path, key),
                f'"{key}" is for SunSpec discovery: add discover = "sunspec" or remove it',
                at="key",
            )
    for key, what in (("models", "model id"), ("bases", "base address")):
        seen: set[Any] = set()
        for index, item in enumerate(out.get(key, [])):
            if item in seen:
                v.report((*path, key, index), f"{what} {item} is listed twice")
            seen.add(item)


def _device_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    unique_register_names(v, out.get("registers", []), path, "a device")
    _discovery_checks(v, out, path)


_SHORTHAND_KEYS = ("device", "unit_id", "registers", "discover", "models", "bases")


def _tcp_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    unique_register_names(v, out.get("registers", []), path, "a source")
    if "devices" not in out:
        _discovery_checks(v, out, path)
        if clean and not out.get("registers") and not out.get("discover"):
            v.report(
                path, "this source has no registers: it will poll nothing", at="key", warning=True
            )
        return
    for key in _SHORTHAND_KEYS:
        if key in out:
            v.report(
                (*path, key),
                "give either the single-device keys (device, unit_id, registers, discover, "
                'models, bases) or "devices", '
                f'not both: move "{key}" into a device',
                at="key",
            )
    if clean and not out["devices"]:
        v.report(
            (*path, "devices"),
            '"devices" is empty: list at least one device, or leave it out and give '
            "unit_id and registers",
        )
    _unique_unit_ids(v, out["devices"], path)


def _rtu_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    baudrate_warning(v, out, path)
    devices = out.get("devices")
    if devices is None:
        return  # missing: already reported
    if clean and not devices:
        v.report(
            (*path, "devices"),
            "an RTU bus needs at least one device: "
            'devices = [{ name = "meter1", unit_id = 1, profile = "eastron_sdm120" }]',
        )
    for index, device in enumerate(devices):
        if device.get("unit_id", 1) == 0:
            v.report(
                (*path, "devices", index, "unit_id"),
                "unit id 0 is the broadcast address on a serial bus: no device answers a read "
                "sent to it; give the device's own address, 1..247",
            )
    _unique_unit_ids(v, devices, path)


TABLE_CHECKS: dict[type, TableCheck] = {
    RegisterConfig: _register_checks,
    ModbusDeviceConfig: _device_checks,
    ModbusTcpSource: _tcp_checks,
    ModbusRtuSource: _rtu_checks,
}


def devices(name: str, src: dict[str, Any]) -> Devices:
    """The devices a checked Modbus source entry declares, each with its register names."""
    if src.get("type") == "modbus_tcp" and "devices" not in src:  # the single-device shorthand
        device = src.get("device")
        path: Key = ("sources", name, "device") if device else ("sources", name)
        return Devices((Device(device or name, path, _points(src)),))
    found = []
    for index, entry in enumerate(src.get("devices", [])):
        dname = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(dname, str):
            found.append(
                Device(dname, ("sources", name, "devices", index, "name"), _points(entry))
            )
    return Devices(tuple(found))


def _points(table: dict[str, Any]) -> frozenset[str]:
    return frozenset(
        str(r.get("name")) for r in table.get("registers", []) if isinstance(r, dict)
    )
