"""Read planning (plan_reads, plan_device) and RTU wire timing: pure functions, no devices."""

from __future__ import annotations

import itertools
import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.sources.modbus.plan import (
    MAX_BITS,
    MAX_REGISTERS,
    PollGroup,
    ReadBlock,
    bus_devices,
    plan_device,
    plan_reads,
    register_span,
    request_bytes,
    response_bytes,
    transaction_time,
)
from flux_edge.sources.modbus.spec import (
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)
from flux_edge.sources.modbus.timing import char_time, inter_frame_gap

FUNCS = ("coil", "discrete", "holding", "input")
TYPES = (
    "bool", "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64",
    "string",
)


def reg(
    address: int,
    function: str = "holding",
    type: str = "uint16",
    name: str = "r",
    *,
    count: int | None = None,
    interval: float = 0.0,
) -> RegisterConfig:
    if count is None:
        count = 4 if type == "string" else 0  # a string needs a count: 8 characters by default
    return RegisterConfig(
        name=name,
        address=address,
        function=function,  # type: ignore[arg-type]
        type=type,  # type: ignore[arg-type]
        count=count,
        interval=interval,
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


# --- widths of the issue #3 types ---------------------------------------------------------------


def test_64_bit_types_take_four_registers_and_strings_their_count() -> None:
    for t in ("int64", "uint64", "float64"):
        assert register_span(reg(100, "input", t)) == (4, 100, 4)
        assert register_span(reg(100, "coil", t)) == (1, 100, 1)  # a bit is a bit
    assert register_span(reg(7, type="string", count=10)) == (3, 7, 10)
    regs = [reg(0, type="float64"), reg(4, type="string", count=3), reg(7, type="uint64")]
    assert plan_reads(regs, max_gap=0) == [ReadBlock(3, 0, 11)]
    # a float64 at 122 needs 122..125: it does not fit the first request and is never split
    regs = [reg(a) for a in range(122)] + [reg(122, type="float64")]
    assert plan_reads(regs, max_gap=0) == [ReadBlock(3, 0, 122), ReadBlock(3, 122, 4)]


def test_a_string_needs_a_count() -> None:
    with pytest.raises(ValueError, match=r"'serial'.*count"):
        register_span(reg(0, type="string", name="serial", count=0))
    with pytest.raises(ValueError, match="count"):
        plan_reads([reg(0, type="string", count=0)], max_gap=0)
    # the longest string one request can read, and one past it
    assert plan_reads([reg(0, type="string", count=125)], 0) == [ReadBlock(3, 0, 125)]
    with pytest.raises(ValueError, match="65535"):
        plan_reads([reg(65530, type="string", count=7)], max_gap=0)


# --- devices and per-point intervals ------------------------------------------------------------


def device(*regs: RegisterConfig, interval: float = 0.0, name: str = "meter") -> ModbusDeviceConfig:
    return ModbusDeviceConfig(name=name, unit_id=3, registers=regs, interval=interval)


def test_points_without_an_interval_share_the_devices_schedule() -> None:
    dev = device(reg(0, name="a"), reg(1, name="b"), reg(10, "input", name="c"))
    assert plan_device(dev, default_interval=2.0, max_gap=8) == [
        PollGroup(2.0, (ReadBlock(3, 0, 2), ReadBlock(4, 10, 1)), ("a", "b", "c"))
    ]
    # the device's own interval wins over the bus's
    assert plan_device(device(reg(0), interval=0.5), 2.0, 8)[0].interval == 0.5


def test_per_point_intervals_make_groups_fastest_first_coalesced_within_each() -> None:
    dev = device(
        reg(0, name="power", type="float32", interval=0.1),
        reg(2, name="voltage", type="float32"),
        reg(4, name="current", type="float32", interval=0.1),
        reg(6, name="energy", type="float64", interval=60.0),
        reg(10, name="freq", type="float32", interval=1.0),  # the device's interval: no own group
        interval=1.0,
    )
    groups = plan_device(dev, default_interval=5.0, max_gap=8)
    assert [g.interval for g in groups] == [0.1, 1.0, 60.0]
    fast, base, slow = groups
    # power and current are coalesced over voltage's two registers (a gap of 2)
    assert fast == PollGroup(0.1, (ReadBlock(3, 0, 6),), ("power", "current"))
    # voltage and freq are coalesced over 4..9, whatever other groups read there
    assert base == PollGroup(1.0, (ReadBlock(3, 2, 10),), ("voltage", "freq"))
    assert slow == PollGroup(60.0, (ReadBlock(3, 6, 4),), ("energy",))
    # with smaller gaps allowed, more requests
    assert plan_device(dev, 5.0, max_gap=5)[1].blocks == (ReadBlock(3, 2, 2), ReadBlock(3, 10, 2))
    assert plan_device(dev, 5.0, max_gap=0)[0].blocks == (ReadBlock(3, 0, 2), ReadBlock(3, 4, 2))


def test_plan_device_errors_name_the_device() -> None:
    assert plan_device(device(), 1.0, 8) == []
    with pytest.raises(ValueError, match=r"'meter'.*interval"):
        plan_device(device(reg(0)), default_interval=0.0, max_gap=8)
    with pytest.raises(ValueError, match=r"'meter'.*65535"):
        plan_device(device(reg(65535, type="uint32")), 1.0, 8)


intervals_st = st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, 30.0])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.builds(
            reg,
            address=st.integers(0, 400),
            function=st.sampled_from(FUNCS),
            type=st.sampled_from(TYPES),
            count=st.integers(1, 12),
            interval=intervals_st,
        ),
        max_size=60,
    ),
    st.sampled_from([0.5, 1.0, 2.0]),
    st.integers(0, 10),
)
def test_every_point_is_read_on_its_own_interval_exactly_once(
    regs: list[RegisterConfig], base: float, max_gap: int
) -> None:
    regs = [r if r.type == "string" else msgspec.structs.replace(r, count=0) for r in regs]
    groups = plan_device(device(*regs), default_interval=base, max_gap=max_gap)
    assert [g.interval for g in groups] == sorted({r.interval or base for r in regs})
    for r in regs:
        fn, start, width = register_span(r)
        holders = [
            (g.interval, b)
            for g in groups
            for b in g.blocks
            if b.function == fn and b.address <= start and start + width <= b.address + b.count
        ]
        own = [h for h in holders if h[0] == (r.interval or base)]
        assert len(own) == 1, (r, groups)  # read in exactly one block of its own group
    for g in groups:
        assert len(g.points) == sum(1 for r in regs if (r.interval or base) == g.interval)


def test_bus_devices_expands_the_single_device_shorthand() -> None:
    regs = (reg(0),)
    short = ModbusTcpSource(host="h", unit_id=9, registers=regs)
    assert bus_devices(short, "boiler") == (
        ModbusDeviceConfig(name="boiler", unit_id=9, registers=regs),
    )
    named = ModbusTcpSource(host="h", unit_id=9, device="b1", registers=regs)
    assert bus_devices(named, "boiler")[0].name == "b1"
    devs = (device(reg(0), name="m1"), device(reg(1), name="m2"))
    assert bus_devices(ModbusTcpSource(host="h", devices=devs), "x") == devs
    assert bus_devices(ModbusRtuSource(port="/dev/ttyUSB0", devices=devs), "x") == devs


# --- RTU wire timing ----------------------------------------------------------------------------


def test_character_time_and_inter_frame_silence() -> None:
    assert char_time(9600, 8, "E", 1) == pytest.approx(11 / 9600)
    assert char_time(9600, 8, "N", 1) == pytest.approx(10 / 9600)
    assert char_time(9600, 8, "N", 2) == pytest.approx(11 / 9600)
    assert char_time(19200, 7, "O", 1) == pytest.approx(10 / 19200)
    # 3.5 characters up to 19200 baud, a fixed 1.75 ms above (the spec's rule)
    assert inter_frame_gap(9600, 8, "E", 1) == pytest.approx(3.5 * 11 / 9600)  # 4.01 ms
    assert inter_frame_gap(19200, 8, "E", 1) == pytest.approx(3.5 * 11 / 19200)
    assert inter_frame_gap(38400, 8, "E", 1) == 0.00175
    assert inter_frame_gap(115200, 8, "N", 1) == 0.00175
    assert inter_frame_gap(9600, 8, "E", 1, override=0.01) == 0.01
    with pytest.raises(ValueError):
        char_time(0)


def test_frame_sizes_and_transaction_time() -> None:
    one, ten = ReadBlock(3, 0, 1), ReadBlock(4, 0, 10)
    assert (request_bytes(one), response_bytes(one)) == (8, 7)
    assert response_bytes(ten) == 25
    assert response_bytes(ReadBlock(1, 0, 9)) == 7  # 9 coils: 2 data bytes
    assert response_bytes(ReadBlock(2, 0, 2000)) == 255
    assert response_bytes(ReadBlock(3, 0, 125)) == 255  # the longest RTU frame is 256 bytes
    ct = char_time(9600, 8, "E", 1)
    gap = inter_frame_gap(9600, 8, "E", 1)
    # 15 characters and two silences: 17.2 + 8.0 ms = 25.2 ms, about 40 reads a second
    assert transaction_time(one, ct, gap) == pytest.approx(15 * 11 / 9600 + 7 * 11 / 9600)
    assert 1 / transaction_time(one, ct, gap) == pytest.approx(39.7, abs=0.1)
