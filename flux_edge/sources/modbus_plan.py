"""Modbus read planning: pure, no pymodbus, so config checks (bus budget) can use it too.

Re-exported by ``flux_edge.sources.modbus``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from flux_edge.config import RegisterConfig
from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING, FN_INPUT

# --- read planning ------------------------------------------------------------------------------

MAX_REGISTERS = 125  # most registers one read holding/input registers request may ask for
MAX_BITS = 2000  # most bits one read coils/discrete inputs request may ask for

_FUNCTION_CODES: dict[str, int] = {
    "coil": FN_COIL,
    "discrete": FN_DISCRETE,
    "holding": FN_HOLDING,
    "input": FN_INPUT,
}
_WORDS: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
}
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


def register_span(reg: RegisterConfig) -> tuple[int, int, int]:
    """(function code, first address, width) of one configured register.

    Coils and discrete inputs are one bit whatever the type; on holding/input registers a bool is
    a whole register (true when != 0) and 32-bit types take two registers.
    """
    function = _FUNCTION_CODES[reg.function]
    width = 1 if function in (FN_COIL, FN_DISCRETE) else _WORDS[reg.type]
    return function, reg.address, width


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
