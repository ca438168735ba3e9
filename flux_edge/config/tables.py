"""Checks that span several fields of one table (a register, a device, a source, an action)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flux_edge.config.schema import (
    _BIT_FUNCTIONS,
    REGISTER_WORDS,
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    ModbusWriteAction,
    MqttPublishAction,
    MqttSource,
    PluginConfig,
    RegisterConfig,
    RuleConfig,
    SerialSource,
    SerialWriteAction,
)
from flux_edge.config.values import _DEVICE_LEVEL, _STANDARD_BAUDRATES, Key, _fmt_path, _got
from flux_edge.errors import Problem

if TYPE_CHECKING:  # the validator calls these checks; they only take it as an argument
    from flux_edge.config.validate import _Validator


# --- checks that span several fields of one table ------------------------------------------------


def _register_words(register: dict[str, Any]) -> int:
    """Registers (or bits) one checked register entry takes."""
    if register.get("function", "holding") in _BIT_FUNCTIONS:
        return 1
    type_ = register.get("type", "uint16")
    if type_ == "string":
        return max(1, int(register.get("count", 1)))
    return REGISTER_WORDS.get(type_, 1)


def _register_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    function = out.get("function", "holding")
    if function in _BIT_FUNCTIONS:
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


def _unique_register_names(v: _Validator, registers: list[Any], path: Key, scope: str) -> None:
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


def _device_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _unique_register_names(v, out.get("registers", []), path, "a device")


_SHORTHAND_KEYS = ("device", "unit_id", "registers")


def _tcp_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _unique_register_names(v, out.get("registers", []), path, "a source")
    if "devices" not in out:
        if clean and not out.get("registers"):
            v.report(
                path, "this source has no registers: it will poll nothing", at="key", warning=True
            )
        return
    for key in _SHORTHAND_KEYS:
        if key in out:
            v.report(
                (*path, key),
                'give either the single-device keys (device, unit_id, registers) or "devices", '
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


def _baudrate_warning(v: _Validator, out: dict[str, Any], path: Key) -> None:
    baud = out.get("baudrate")
    if baud is not None and baud not in _STANDARD_BAUDRATES:
        v.report(
            (*path, "baudrate"),
            f"{baud} is not a standard baud rate (9600, 19200, 38400, 115200, ...): check the "
            "device's setting; a rate the serial adapter cannot generate fails when the port opens",
            warning=True,
        )


def _rtu_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _baudrate_warning(v, out, path)
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


# Keys each serial framing reads; the others are ignored (a warning if given).
_FRAMING_KEYS: dict[str, frozenset[str]] = {
    "delimiter": frozenset({"delimiter"}),
    "fixed": frozenset({"frame_length"}),
    "length_prefix": frozenset({"length_offset", "length_bytes", "length_order", "length_adjust"}),
    "idle": frozenset({"idle"}),
}
_ALL_FRAMING_KEYS = sorted(frozenset().union(*_FRAMING_KEYS.values()))


def _serial_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _baudrate_warning(v, out, path)
    if not clean:
        return
    framing = out.get("framing", "delimiter")
    max_frame = out.get("max_frame", 4096)
    if framing == "delimiter" and out.get("delimiter", "\n") == "":
        v.report(
            (*path, "delimiter"), 'delimiter framing needs a delimiter, like "\\n" or "\\r\\n"'
        )
    elif framing == "delimiter" and any(ord(c) > 0xFF for c in out.get("delimiter", "\n")):
        v.report(
            (*path, "delimiter"),
            "a delimiter is bytes: use characters U+0000..U+00FF, written as TOML escapes "
            'like "\\u0003" for byte 0x03',
        )
    elif framing == "fixed":
        length = out.get("frame_length", 0)
        if length < 1:
            v.report(
                (*path, "frame_length"),
                'fixed framing needs "frame_length": the number of bytes in each frame (1 or more)',
                at="value" if "frame_length" in out else "key",
                where=None if "frame_length" in out else path,
            )
        elif length > max_frame:
            v.report(
                (*path, "frame_length"),
                f"frame_length {length} is more than max_frame ({max_frame}): every frame would "
                "be dropped; raise max_frame",
            )
    elif framing == "length_prefix":
        width = out.get("length_bytes", 1)
        if width not in (1, 2, 4):
            v.report(
                (*path, "length_bytes"), f"the length field is 1, 2 or 4 bytes long, got {width}"
            )
        elif out.get("length_offset", 0) + width > max_frame:
            v.report(
                (*path, "length_offset"),
                f"the length field ends past max_frame ({max_frame} bytes): no frame fits",
            )
    for key in _ALL_FRAMING_KEYS:
        if key in out and key not in _FRAMING_KEYS[framing]:
            v.report(
                (*path, key),
                f'"{key}" is not used with framing = "{framing}"',
                at="key",
                warning=True,
            )


def _mqtt_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    topics = out.get("topics")
    if clean and topics is not None and not topics:
        v.report(
            (*path, "topics"),
            'subscribe to at least one topic: topics = [{ topic = "site/+/telemetry" }]',
        )
    seen: dict[str, int] = {}
    for index, subscription in enumerate(topics or []):
        topic = subscription.get("topic")
        if not isinstance(topic, str):
            continue
        if topic in seen:
            v.report(
                (*path, "topics", index, "topic"),
                f'topic "{topic}" is already subscribed by topics[{seen[topic]}]',
            )
        else:
            seen[topic] = index
    pattern = out.get("device_from_topic", "")
    if out.get("device") and pattern:
        v.report(
            (*path, "device_from_topic"),
            'give either "device" (one fixed name) or "device_from_topic" (a name taken from '
            "each message's topic), not both",
        )
    elif clean and pattern and seen:
        wildcard = pattern.replace(_DEVICE_LEVEL, "+")
        from flux_edge.mqtt.topics import filters_overlap  # pure: paho is not imported

        if not any(filters_overlap(wildcard, topic) for topic in seen):
            v.report(
                (*path, "device_from_topic"),
                f"no subscribed topic can match {_got(pattern)}, so no message would get its "
                f"device name from it; subscribed: {', '.join(seen)}",
                warning=True,
            )
    low, high = out.get("reconnect_min", 1.0), out.get("reconnect_max", 60.0)
    if clean and high < low:
        v.report(
            (*path, "reconnect_max"),
            f"must be at least reconnect_min ({low:g}s), got {high:g}s",
        )


def _serial_write_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean or out.get("encoding", "text") != "hex":
        return
    try:
        bytes.fromhex(out["data"])
    except ValueError:
        v.report(
            (*path, "data"),
            f"{_got(out['data'])} is not hex bytes: write pairs of hex digits, optionally "
            'separated by spaces, like "01 03 00 00 00 0a"',
        )


def _mqtt_publish_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    from flux_edge.actions.templates import TemplateError, compile_template
    from flux_edge.mqtt import check_topic

    for field in ("topic", "payload"):
        text = out.get(field)
        if not isinstance(text, str) or not v.clean((*path, field)):
            continue
        try:
            template = compile_template(text)
        except TemplateError as exc:
            where = (*path, field)
            line, col = v.pos.value(where)
            if exc.column > 0:
                line, col = v.pos.in_string(where, exc.column - 1) or (line, col)
            v.problems.append(Problem(v.file, _fmt_path(where), exc.message, line, col))
            v.dirty.add(where)
            continue
        if field == "topic":  # the literal parts, each placeholder standing for one character
            problem = check_topic(template.render(dict.fromkeys(template.names, "x")))
            if problem:
                v.report((*path, field), problem)


def _plugin_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if out.get("file") and out.get("module"):
        v.report(
            (*path, "file"),
            'give either "file" (a path) or "module" (a name looked up in plugin_dirs), not both',
        )


def _action_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    value = out["value"]
    if out.get("function", "coil") == "coil":
        if not isinstance(value, bool):
            v.report((*path, "value"), f"a coil takes true or false, got {_got(value)}")
    elif isinstance(value, bool) or not -32768 <= value <= 65535:
        v.report(
            (*path, "value"),
            "a holding register takes an integer from -32768 to 65535 (negative values are "
            f"written as 16-bit two's complement), got {_got(value)}",
        )


def _rule_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if clean and not out.get("actions"):
        v.report(
            (*path, "actions"), "this rule has no actions: it will never do anything", warning=True
        )


_STRUCT_CHECKS: dict[type, Callable[[_Validator, dict[str, Any], Key, bool], None]] = {
    RegisterConfig: _register_checks,
    ModbusDeviceConfig: _device_checks,
    ModbusTcpSource: _tcp_checks,
    ModbusRtuSource: _rtu_checks,
    SerialSource: _serial_checks,
    MqttSource: _mqtt_checks,
    PluginConfig: _plugin_checks,
    ModbusWriteAction: _action_checks,
    SerialWriteAction: _serial_write_checks,
    MqttPublishAction: _mqtt_publish_checks,
    RuleConfig: _rule_checks,
}
