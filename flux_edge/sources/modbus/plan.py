"""Modbus read planning: pure, no pymodbus, so config checks (the bus budget) can use it too.

- ``register_span``/``register_width``: where a configured point lies (function, address, width);
- ``plan_reads``: a register map -> the fewest read requests (coalesced across small gaps);
- ``plan_device``: one device's map -> ``PollGroup``s, one per poll interval (per-point intervals);
- ``bus_devices``: the devices of a Modbus source, single-device shorthand included;
- RTU frames: ``request_bytes``/``response_bytes``, ``transaction_time``: what one read costs on
  an RS-485 line. The character times and the inter-frame gap they need are in timing.py
  (``char_bits``, ``char_time``, ``inter_frame_gap``, ``RTU_FAST_BAUD``; importable from here too,
  as config's bus budget does).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING, FN_INPUT
from flux_edge.sources.modbus.spec import (
    REGISTER_WORDS,
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)
from flux_edge.sources.modbus.timing import (  # re-exported: config's bus budget reads them here
    RTU_FAST_BAUD,
    RTU_FAST_GAP,
    char_bits,
    char_time,
    inter_frame_gap,
)

__all__ = [
    "MAX_BITS",
    "MAX_REGISTERS",
    "RTU_FAST_BAUD",
    "RTU_FAST_GAP",
    "PollGroup",
    "ReadBlock",
    "bus_devices",
    "char_bits",
    "char_time",
    "inter_frame_gap",
    "plan_device",
    "plan_reads",
    "register_span",
    "register_width",
    "request_bytes",
    "response_bytes",
    "transaction_time",
]

# --- read planning ------------------------------------------------------------------------------

MAX_REGISTERS = 125  # most registers one read holding/input registers request may ask for
MAX_BITS = 2000  # most bits one read coils/discrete inputs request may ask for

_FUNCTION_CODES: dict[str, int] = {
    "coil": FN_COIL,
    "discrete": FN_DISCRETE,
    "holding": FN_HOLDING,
    "input": FN_INPUT,
}
_WORDS = REGISTER_WORDS  # registers per type: one table, in config
_TABLE_NAMES = {
    FN_COIL: "coils",
    FN_DISCRETE: "discrete inputs",
    FN_HOLDING: "holding registers",
    FN_INPUT: "input registers",
}


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: Modbus function code (1-4), first address, number of registers/bits."""

    function: int
    address: int
    count: int

    def describe(self) -> str:
        table = _TABLE_NAMES.get(self.function, f"function {self.function}")
        if self.count == 1:
            return f"read {table} {self.address}"
        return f"read {table} {self.address}..{self.address + self.count - 1}"


def register_width(reg: RegisterConfig) -> int:
    """Registers (or bits) one configured point takes.

    Coils and discrete inputs are one bit whatever the type; on holding/input registers a bool
    is a whole register (true when != 0), 32-bit types take two registers, 64-bit types four,
    and a string ``count`` registers (two ASCII bytes each). Raises ValueError for a string
    without a positive ``count``.
    """
    if reg.function in ("coil", "discrete"):
        return 1
    if reg.type == "string":
        if reg.count < 1:
            raise ValueError(
                f"register {reg.name!r}: a string needs count >= 1 (registers, 2 bytes each)"
            )
        return reg.count
    return _WORDS[reg.type]


def register_span(reg: RegisterConfig) -> tuple[int, int, int]:
    """(function code, first address, width) of one configured register (see ``register_width``)."""
    return _FUNCTION_CODES[reg.function], reg.address, register_width(reg)


def plan_reads(registers: Sequence[RegisterConfig], max_gap: int) -> list[ReadBlock]:
    """Group a register map into as few read requests as possible.

    Registers of one function are sorted and merged into one request while the hole between them
    is at most ``max_gap`` registers (the hole is read and thrown away: devices with holes in
    their map may answer "illegal address" for it, hence the knob) and the request stays within
    the protocol limit (125 registers, 2000 bits). Overlapping registers always share a request,
    so every register lies inside exactly one block and blocks never overlap.

    Raises ValueError for a register that runs past address 65535, or for overlapping registers
    spanning more than one request can read.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    spans: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for reg in registers:
        function, start, width = register_span(reg)
        end = start + width
        if start < 0 or end > 65536:
            raise ValueError(
                f"register {reg.name!r}: address {reg.address} with {width} register(s) "
                f"runs past 65535"
            )
        spans[function].append((start, end))
    blocks: list[ReadBlock] = []
    for function in sorted(spans):
        limit = MAX_BITS if function in (FN_COIL, FN_DISCRETE) else MAX_REGISTERS
        # Overlapping registers form an atomic run: it cannot be split between two requests.
        atoms: list[list[int]] = []
        for start, end in sorted(spans[function]):
            if atoms and start < atoms[-1][1]:
                atoms[-1][1] = max(atoms[-1][1], end)
            else:
                atoms.append([start, end])
        cur_start = cur_end = -1
        for start, end in atoms:
            if end - start > limit:
                raise ValueError(
                    f"overlapping {_TABLE_NAMES[function]} at {start}..{end - 1} span "
                    f"{end - start}, more than one request can read ({limit})"
                )
            if cur_end >= 0 and start - cur_end <= max_gap and end - cur_start <= limit:
                cur_end = end
                continue
            if cur_end >= 0:
                blocks.append(ReadBlock(function, cur_start, cur_end - cur_start))
            cur_start, cur_end = start, end
        if cur_end >= 0:
            blocks.append(ReadBlock(function, cur_start, cur_end - cur_start))
    return blocks


# --- devices and per-point intervals ------------------------------------------------------------


def bus_devices(
    cfg: ModbusTcpSource | ModbusRtuSource, name: str
) -> tuple[ModbusDeviceConfig, ...]:
    """The devices of a Modbus source.

    The loader fills ``devices`` for every source; a ``ModbusTcpSource`` built in code with the
    single-device shorthand (``unit_id``/``device``/``registers``, no ``devices``) is one device
    named ``device`` or, without it, the source's name.
    """
    if cfg.devices or isinstance(cfg, ModbusRtuSource):
        return cfg.devices
    return (
        ModbusDeviceConfig(
            name=cfg.device or name,
            unit_id=cfg.unit_id,
            registers=cfg.registers,
            discover=cfg.discover,
            models=cfg.models,
            bases=cfg.bases,
        ),
    )


@dataclass(frozen=True, slots=True)
class PollGroup:
    """The points of one device polled together on one interval, as coalesced read requests."""

    interval: float  # seconds between polls of this group
    blocks: tuple[ReadBlock, ...]
    points: tuple[str, ...] = ()  # names of the registers it carries, for messages and plans


def plan_device(
    device: ModbusDeviceConfig, default_interval: float, max_gap: int
) -> list[PollGroup]:
    """One device's register map -> its poll groups, fastest first.

    A point with its own ``interval`` is polled on that schedule; every other point on the
    device's interval (``device.interval``, or ``default_interval`` when that is 0, i.e. the
    bus's). Points sharing an interval form one group and are coalesced together
    (``plan_reads``); points of different groups are never read twice. A device without
    registers has no groups. Raises ValueError for a non-positive interval or a map
    ``plan_reads`` rejects (the message names the device).
    """
    base = device.interval if device.interval > 0 else default_interval
    if base <= 0:
        raise ValueError(f"device {device.name!r}: interval must be > 0, got {base}")
    by_interval: dict[float, list[RegisterConfig]] = collections.defaultdict(list)
    for reg in device.registers:
        if reg.interval < 0:
            raise ValueError(
                f"device {device.name!r}, register {reg.name!r}: interval must be >= 0"
            )
        by_interval[reg.interval if reg.interval > 0 else base].append(reg)
    groups: list[PollGroup] = []
    for interval in sorted(by_interval):
        regs = by_interval[interval]
        try:
            blocks = plan_reads(regs, max_gap)
        except ValueError as exc:
            raise ValueError(f"device {device.name!r}: {exc}") from None
        groups.append(PollGroup(interval, tuple(blocks), tuple(r.name for r in regs)))
    return groups


# --- RTU frames ---------------------------------------------------------------------------------


def request_bytes(block: ReadBlock) -> int:
    """An RTU read request: address, function, start (2), count (2), CRC (2)."""
    return 8


def response_bytes(block: ReadBlock) -> int:
    """An RTU read response: address, function, byte count, data, CRC (2)."""
    if block.function in (FN_COIL, FN_DISCRETE):
        return 5 + (block.count + 7) // 8
    return 5 + 2 * block.count


def transaction_time(block: ReadBlock, char_seconds: float, gap: float) -> float:
    """The least wire time one read can take on an RTU line: request and response frames plus
    the silence before each (the slave cannot answer sooner, the master cannot ask sooner)."""
    return (request_bytes(block) + response_bytes(block)) * char_seconds + 2 * gap
