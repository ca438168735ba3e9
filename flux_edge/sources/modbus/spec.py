"""The config structs of the Modbus source kinds (modbus_tcp, modbus_rtu) and of device profiles.

Kept apart from their checks (``kind.py``) because the planner, the poller, the simulator and the
rules read them without needing the loader. ``REGISTER_WORDS`` is the one table of register widths.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from flux_edge.config import Order, Parity, SourceSpec, Table
from flux_edge.config.values import CEL_IDENT, DURATION, HOST, NAME, PROFILE_REF

RegisterFunction = Literal["coil", "discrete", "holding", "input"]
RegisterType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]

# Registers (16-bit words) each register type takes; a "string" takes its ``count``.
REGISTER_WORDS: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
BIT_FUNCTIONS = frozenset({"coil", "discrete"})

# Model discovery: "sunspec" finds the SunSpec models behind the 'SunS' marker (sunspec.py).
Discover = Literal["", "sunspec"]
ModelId = Annotated[int, Meta(ge=1, le=65534)]  # 0xFFFF ends a SunSpec chain
BaseAddress = Annotated[int, Meta(ge=0, le=65532)]  # the marker and one header must fit


class RegisterConfig(Table, frozen=True):
    # a CEL identifier: [A-Za-z_][A-Za-z0-9_]*
    name: Annotated[str, Meta(min_length=1), CEL_IDENT]
    address: Annotated[int, Meta(ge=0, le=65535)]  # 0..65535
    function: RegisterFunction = "holding"
    type: RegisterType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    # registers of a "string" (2 ASCII bytes each); required for strings only
    count: Annotated[int, Meta(ge=1, le=125)] = 0
    # poll this point on its own interval; 0 = the device's interval
    interval: Annotated[float, Meta(gt=0), DURATION] = 0.0


class ModbusDeviceConfig(Table, frozen=True):
    """One slave (unit id) on a Modbus bus or behind a Modbus TCP endpoint/gateway."""

    # device name carried by its measurements
    name: Annotated[str, Meta(min_length=1), NAME]
    unit_id: Annotated[int, Meta(ge=0, le=247)] = 1
    # a register map file: <profile>.toml in daemon.profile_dirs, or a path
    profile: Annotated[str, PROFILE_REF] = ""
    registers: tuple[RegisterConfig, ...] = ()  # after loading: the profile's map, then these
    interval: Annotated[float, Meta(ge=0), DURATION] = 0.0  # 0 = the bus's interval
    timeout: Annotated[float, Meta(ge=0), DURATION] = 0.0  # 0 = the bus's timeout
    # "sunspec": find its SunSpec models at connect and poll their blocks
    discover: Discover = ""
    # with discover: the model ids to poll; default: every model found
    models: tuple[ModelId, ...] = ()
    # with discover: where to look for the 'SunS' marker; default: 40000, 50000, 0
    bases: tuple[BaseAddress, ...] = ()


class _ModbusSource(SourceSpec, frozen=True):
    """What the two Modbus kinds share: devices, each with its register map, each served by a
    chain of its own (a plugin instance learns its device's map)."""

    def _devices(self, name: str) -> tuple[ModbusDeviceConfig, ...]:
        if not isinstance(self, ModbusTcpSource | ModbusRtuSource):
            raise TypeError(f"{type(self).__name__} is not a Modbus source kind")
        return source_devices(name, self)

    def chain_keys(self, name: str) -> tuple[str, ...]:
        return tuple(d.name for d in self._devices(name))

    def plugin_context(self, name: str, key: str) -> dict[str, Any]:
        for device in self._devices(name):
            if device.name == key:
                return {
                    "device": device.name,
                    "unit_id": device.unit_id,
                    "registers": [msgspec.to_builtins(r) for r in device.registers],
                }
        return {}

    def declared_points(self, name: str) -> dict[str, list[tuple[str, str]]]:
        return {
            d.name: [(r.name, register_cel_type(r)) for r in d.registers]
            for d in self._devices(name)
        }


def register_cel_type(reg: RegisterConfig) -> str:
    """The type a rule sees for a register: bool for coils, discrete inputs and type "bool",
    string for "string", else double (scale and offset make any number a double)."""
    if reg.function in BIT_FUNCTIONS or reg.type == "bool":
        return "bool"
    return "string" if reg.type == "string" else "double"


class ModbusTcpSource(_ModbusSource, frozen=True, kw_only=True, tag="modbus_tcp"):
    """A Modbus TCP endpoint: one device (the shorthand keys) or several unit ids behind it."""

    host: Annotated[str, Meta(min_length=1), HOST]
    port: Annotated[int, Meta(ge=1, le=65535)] = 502
    # single-device shorthand (with device/registers); or use `devices`
    unit_id: Annotated[int, Meta(ge=0, le=247)] = 1
    interval: Annotated[float, Meta(gt=0), DURATION] = 1.0  # seconds between polls
    timeout: Annotated[float, Meta(gt=0), DURATION] = 1.0  # seconds per request
    # device name for measurements; default: the source's table name
    device: Annotated[str, NAME] = ""
    max_gap: Annotated[int, Meta(ge=0, le=123)] = 8  # registers a coalesced read may skip over
    registers: tuple[RegisterConfig, ...] = ()
    devices: tuple[ModbusDeviceConfig, ...] = ()  # several unit ids behind one endpoint
    # single-device shorthand: "sunspec" finds and polls the device's SunSpec models
    discover: Discover = ""
    models: tuple[ModelId, ...] = ()  # single-device shorthand, with discover
    bases: tuple[BaseAddress, ...] = ()  # single-device shorthand, with discover
    # extra attempts of a failed request before the device counts as failing
    retries: Annotated[int, Meta(ge=0, le=100)] = 1
    # longest pause between attempts to reach a failing device
    backoff_max: Annotated[float, Meta(gt=0), DURATION] = 60.0


class ModbusRtuSource(_ModbusSource, frozen=True, kw_only=True, tag="modbus_rtu"):
    """An RS-485 line: one request at a time, several slaves."""

    port: Annotated[str, Meta(min_length=1)]  # /dev/ttyUSB0, /dev/serial/by-id/...
    devices: tuple[ModbusDeviceConfig, ...]
    baudrate: Annotated[int, Meta(ge=300, le=4_000_000)] = 9600
    parity: Parity = "E"  # the Modbus spec's default; many devices ship set to "N"
    stopbits: Annotated[int, Meta(ge=1, le=2)] = 1
    bytesize: Annotated[int, Meta(ge=7, le=8)] = 8
    interval: Annotated[float, Meta(gt=0), DURATION] = 1.0
    timeout: Annotated[float, Meta(gt=0), DURATION] = 0.2  # response timeout per request
    retries: Annotated[int, Meta(ge=0, le=100)] = 1
    backoff_max: Annotated[float, Meta(gt=0), DURATION] = 60.0
    max_gap: Annotated[int, Meta(ge=0, le=123)] = 8
    # silence between frames; 0 = the spec's 3.5 characters (>= 1.75 ms)
    inter_frame: Annotated[float, Meta(ge=0, le=1), DURATION] = 0.0
    # How long a slave takes from the end of a request to the start of its answer. Used only by
    # the bus budget check (``bus_budget``); the protocol does not bound it, devices document it.
    turnaround: Annotated[float, Meta(ge=0, le=10), DURATION] = 0.005


class ProfileInfo(Table, frozen=True):
    """The ``[profile]`` table of a device profile file."""

    manufacturer: str
    model: str
    description: str = ""
    source: str = ""  # URL of the public register documentation the map was taken from


class DeviceProfile(Table, frozen=True):
    """A device profile file (config/devices/*.toml): a reusable register map."""

    profile: ProfileInfo
    registers: tuple[RegisterConfig, ...]


def source_devices(
    name: str, source: ModbusTcpSource | ModbusRtuSource
) -> tuple[ModbusDeviceConfig, ...]:
    """The devices of a Modbus source, whatever its shape: ``devices`` if given (each with its
    interval/timeout defaulted to the bus's), else the single device of the TCP shorthand (named
    ``device`` or the source's name). Loaded configs are already in this shape; structs built
    in code may not be. Profiles are resolved by the loader only."""
    if source.devices:
        return tuple(
            d
            if d.interval and d.timeout
            else msgspec.structs.replace(
                d, interval=d.interval or source.interval, timeout=d.timeout or source.timeout
            )
            for d in source.devices
        )
    if isinstance(source, ModbusTcpSource):
        return (
            ModbusDeviceConfig(
                name=source.device or name,
                unit_id=source.unit_id,
                registers=source.registers,
                interval=source.interval,
                timeout=source.timeout,
                discover=source.discover,
                models=source.models,
                bases=source.bases,
            ),
        )
    return ()
