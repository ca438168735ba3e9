"""plan_reads: the register map -> coalesced read requests."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.config import RegisterConfig
from flux_edge.sources.modbus import (
    MAX_BITS,
    MAX_REGISTERS,
    ReadBlock,
    plan_reads,
    register_span,
)

FUNCS = ("coil", "discrete", "holding", "input")
TYPES = ("bool", "int16", "uint16", "int32", "uint32", "float32")


def reg(
    address: int, function: str = "holding", type: str = "uint16", name: str = "r"
) -> RegisterConfig:
    return RegisterConfig(
        name=name, address=address, function=function, type=type  # type: ignore[arg-type]
    )


def test_contiguous_registers_make_one_request() -> None:
    regs = [reg(a) for a in (3, 0, 2, 1)]
    assert plan_reads(regs, max_gap=0) == [ReadBlock(3, 0, 4)]


def test_gap_within_max_gap_is_bridged_and_larger_gap_splits() -> None:
    regs = [reg(0), reg(5), reg(20)]
    # hole 1..4 is 4 registers: bridged with max_gap 4, not with 3; hole 6..19 (14) never
    assert plan_reads(regs, max_gap=4) == [ReadBlock(3, 0, 6), ReadBlock(3, 20, 1)]
    assert plan_reads(regs, max_gap=3) == [
        ReadBlock(3, 0, 1),
        ReadBlock(3, 5, 1),
        ReadBlock(3, 20, 1),
    ]


def test_32_bit_types_take_two_registers() -> None:
    regs = [reg(10, type="float32"), reg(12, type="int32"), reg(14, type="int16")]
    assert plan_reads(regs, max_gap=0) == [ReadBlock(3, 10, 5)]
    # the second word of a uint32 at 20 is 21: a register at 22 is adjacent (gap 0)
    assert plan_reads([reg(20, type="uint32"), reg(22)], max_gap=0) == [ReadBlock(3, 20, 3)]


def test_bool_on_holding_is_a_whole_register_and_coils_are_bits() -> None:
    assert register_span(reg(7, "holding", "bool")) == (3, 7, 1)
    assert register_span(reg(7, "coil", "bool")) == (1, 7, 1)
    assert register_span(reg(7, "input", "float32")) == (4, 7, 2)


def test_functions_are_never_mixed_and_come_out_in_function_order() -> None:
    regs = [reg(0, "input"), reg(0, "coil", "bool"), reg(1, "holding"), reg(0, "discrete", "bool")]
    assert plan_reads(regs, max_gap=8) == [
        ReadBlock(1, 0, 1),
        ReadBlock(2, 0, 1),
        ReadBlock(3, 1, 1),
        ReadBlock(4, 0, 1),
    ]


def test_request_limits() -> None:
    holding = [reg(a) for a in range(300)]
    assert plan_reads(holding, max_gap=0) == [
        ReadBlock(3, 0, 125),
        ReadBlock(3, 125, 125),
        ReadBlock(3, 250, 50),
    ]
    coils = [reg(a, "coil", "bool") for a in range(4500)]
    assert [b.count for b in plan_reads(coils, max_gap=0)] == [2000, 2000, 500]
    # a 32-bit value never straddles two requests
    pairs = [reg(2 * i, type="uint32") for i in range(63)]  # 126 words
    assert plan_reads(pairs, max_gap=0) == [ReadBlock(3, 0, 124), ReadBlock(3, 124, 2)]


def test_overlapping_registers_share_a_request() -> None:
    # the same word seen as raw uint16 and as a flag, and a uint32 overlapping a uint16
    regs = [reg(5), reg(5, type="bool"), reg(6, type="uint32"), reg(7)]
    assert plan_reads(regs, max_gap=0) == [ReadBlock(3, 5, 3)]


def test_overlap_at_the_limit_moves_the_whole_overlap_to_the_next_request() -> None:
    # 125 uint16 fill one request; a uint32 at 124 overlaps the last one: both must move, or the
    # uint16 at 124 would be read twice (two requests overlapping)
    regs = [reg(a) for a in range(125)] + [reg(124, type="uint32")]
    assert plan_reads(regs, max_gap=0) == [ReadBlock(3, 0, 124), ReadBlock(3, 124, 2)]


def test_register_past_the_address_space_is_refused() -> None:
    with pytest.raises(ValueError, match="65535"):
        plan_reads([reg(65535, type="uint32", name="tail")], max_gap=0)
    assert plan_reads([reg(65534, type="uint32")], max_gap=0) == [ReadBlock(3, 65534, 2)]


def test_empty_map_and_bad_gap() -> None:
    assert plan_reads([], max_gap=8) == []
    with pytest.raises(ValueError):
        plan_reads([reg(0)], max_gap=-1)


# --- properties ---------------------------------------------------------------------------------

registers_st = st.lists(
    st.builds(
        reg,
        address=st.integers(0, 3000) | st.integers(0, 150),
        function=st.sampled_from(FUNCS),
        type=st.sampled_from(TYPES),
    ),
    max_size=150,
)


def _limit(function: int) -> int:
    return MAX_BITS if function in (1, 2) else MAX_REGISTERS


@settings(max_examples=400, deadline=None)
@given(registers_st, st.integers(0, 40))
def test_every_register_in_exactly_one_block_within_limits(
    regs: list[RegisterConfig], max_gap: int
) -> None:
    blocks = plan_reads(regs, max_gap)
    for b in blocks:
        assert 1 <= b.count <= _limit(b.function)
        assert b.address >= 0
        assert b.address + b.count <= 65536
    for r in regs:
        fn, start, width = register_span(r)
        holders = [
            b for b in blocks
            if b.function == fn and b.address <= start and start + width <= b.address + b.count
        ]
        assert len(holders) == 1, (r, blocks)
    # blocks of one function never overlap, and each starts and ends on a register
    for fn in {b.function for b in blocks}:
        mine = sorted((b for b in blocks if b.function == fn), key=lambda b: b.address)
        for a, b in itertools.pairwise(mine):
            assert a.address + a.count <= b.address
        spans = [register_span(r)[1:] for r in regs if register_span(r)[0] == fn]
        for b in mine:
            assert any(s == b.address for s, _ in spans)
            assert any(s + w == b.address + b.count for s, w in spans)
            # no hole inside a block is longer than max_gap
            covered: set[int] = set()
            for s, w in spans:
                if b.address <= s < b.address + b.count:
                    covered.update(range(s, s + w))
            hole = 0
            for addr in range(b.address, b.address + b.count):
                hole = 0 if addr in covered else hole + 1
                assert hole <= max_gap


def _min_blocks_contiguous(widths: list[int], limit: int) -> int:
    """Fewest requests covering back-to-back registers (independent DP, not greedy)."""
    n = len(widths)
    best = [0] + [math.inf] * n
    for i in range(1, n + 1):
        total = 0
        for j in range(i, 0, -1):  # registers j-1 .. i-1 in one request
            total += widths[j - 1]
            if total > limit:
                break
            best[i] = min(best[i], best[j - 1] + 1)
    return int(best[n])


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(FUNCS),
    st.lists(st.sampled_from(TYPES), min_size=1, max_size=400),
    st.integers(0, 1000),
)
def test_contiguous_runs_use_the_fewest_requests(
    function: str, types: list[str], first: int
) -> None:
    regs = []
    addr = first
    widths = []
    for t in types:
        r = reg(addr, function, t)
        width = register_span(r)[2]
        regs.append(r)
        widths.append(width)
        addr += width
    blocks = plan_reads(regs, max_gap=0)
    limit = _limit(register_span(regs[0])[0])
    assert len(blocks) == _min_blocks_contiguous(widths, limit)
    assert sum(b.count for b in blocks) == sum(widths)
