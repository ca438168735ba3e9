"""The RTU bus budget: how much of a line's time its poll plan needs (``check-config`` reports an
overcommitted bus through the modbus_rtu kind's ``built_check``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flux_edge.config import Config
from flux_edge.config.kinds import Context
from flux_edge.config.values import Key
from flux_edge.sources.modbus import plan, sunspec
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusRtuSource, source_devices

# --- RTU bus budget -----------------------------------------------------------------------------

WARN_UTILISATION = 0.8  # a bus busier than this gets a warning; above 1.0 it is an error


@dataclass(frozen=True, slots=True)
class BusRequest:
    """One read request of an RTU bus's poll plan and what it costs on the line."""

    device: str
    unit_id: int
    read: str  # what it reads, like "read input registers 0..75"
    interval: float  # seconds between two of these requests
    request_bytes: int
    response_bytes: int
    wire: float  # seconds both frames take on the line
    seconds: float  # bus time of the transaction: both frames, two gaps, the turnaround


@dataclass(frozen=True, slots=True)
class BusBudget:
    """How much of an RTU line's time its poll plan needs (see docs/configuration.md)."""

    source: str
    baudrate: int
    framing: str  # like "8E1"
    bits_per_char: int  # 1 start + data bits + parity bit + stop bits
    gap: float  # silence after each frame, seconds
    turnaround: float  # assumed slave response delay, seconds
    requests: tuple[BusRequest, ...]
    utilisation: float  # seconds of traffic per second: 1.0 = the line never rests
    lines: tuple[str, ...]  # the plan, for people

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _every(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%" if fraction < 0.1 else f"{fraction * 100:.0f}%"


def bus_budget(config: Config, source_name: str) -> BusBudget:
    """The line time the poll plan of RTU source ``source_name`` needs.

    Per request: request and response frames at ``1 + bytesize + parity + stopbits`` bits per
    byte, a gap of 3.5 characters (1.75 ms above 19200 baud, or ``inter_frame``) after each
    frame, and the slave's ``turnaround``. Utilisation = the sum over requests of time / interval.
    Retries, timeouts of silent devices and writes come on top. Raises ``KeyError`` for an
    unknown source, ``ValueError`` if it is not a modbus_rtu source or cannot be planned.
    """
    source = config.sources[source_name]
    if not isinstance(source, ModbusRtuSource):
        raise ValueError(f"source {source_name!r} is not a modbus_rtu source")
    framing = f"{source.bytesize}{source.parity}{source.stopbits}"
    bits = plan.char_bits(source.bytesize, source.parity, source.stopbits)
    char = plan.char_time(source.baudrate, source.bytesize, source.parity, source.stopbits)
    gap = plan.inter_frame_gap(
        source.baudrate, source.bytesize, source.parity, source.stopbits, source.inter_frame
    )
    if source.inter_frame > 0:
        gap_how = "inter_frame"
    elif source.baudrate > plan.RTU_FAST_BAUD:
        gap_how = f"fixed above {plan.RTU_FAST_BAUD} baud"
    else:
        gap_how = "3.5 characters"
    requests: list[BusRequest] = []
    notes: list[str] = []

    def add(device: ModbusDeviceConfig, block: plan.ReadBlock, interval: float, read: str) -> None:
        requests.append(
            BusRequest(
                device=device.name,
                unit_id=device.unit_id,
                read=read,
                interval=interval,
                request_bytes=plan.request_bytes(block),
                response_bytes=plan.response_bytes(block),
                wire=plan.transaction_time(block, char, 0.0),
                seconds=plan.transaction_time(block, char, gap) + source.turnaround,
            )
        )

    for device in source_devices(source_name, source):
        for group in plan.plan_device(device, source.interval, source.max_gap):
            for block in group.blocks:
                add(device, block, group.interval, block.describe())
        if device.discover == "sunspec":
            notes.extend(_sunspec_requests(device, add))
    utilisation = sum(r.seconds / r.interval for r in requests)
    lines = [
        f"bus {source_name} ({source.port}): {source.baudrate} baud {framing} = {bits} bits "
        f"per byte, {char * 1000:.3f} ms each; gap after each frame {_ms(gap)} ({gap_how}); "
        f"slave turnaround {_ms(source.turnaround)} (assumed: set turnaround)"
    ]
    for r in requests:
        total = r.request_bytes + r.response_bytes
        lines.append(
            f"  {r.device} unit {r.unit_id}: {r.read} every {_every(r.interval)}: "
            f"{r.request_bytes} B + {r.response_bytes} B = {total} B -> {_ms(r.wire)} "
            f"+ {_ms(r.seconds - r.wire)} gaps and turnaround = {_ms(r.seconds)} "
            f"({_pct(r.seconds / r.interval)})"
        )
    lines.extend(notes)
    verdict = " > 100%" if utilisation > 1 else " > 80%" if utilisation > WARN_UTILISATION else ""
    lines.append(
        f"bus {source_name}: {source.baudrate} baud {framing}: {utilisation:.3g} s of traffic "
        f"per 1 s = {_pct(utilisation)}{verdict}"
    )
    return BusBudget(
        source=source_name,
        baudrate=source.baudrate,
        framing=framing,
        bits_per_char=bits,
        gap=gap,
        turnaround=source.turnaround,
        requests=tuple(requests),
        utilisation=utilisation,
        lines=tuple(lines),
    )


def _sunspec_requests(
    device: ModbusDeviceConfig,
    add: Callable[[ModbusDeviceConfig, plan.ReadBlock, float, str], None],
) -> list[str]:
    """Count a SunSpec device's per-poll block reads by the models' standard lengths (its real
    chain is known only once it answers): its ``models``, or ``ASSUMED_MODELS`` without them.
    Discovery (a few short reads at connect) is not counted. ``device`` comes from
    ``source_devices`` (its interval is the bus's when it has none, checked by ``plan_device``).
    Returns notes for the plan: models whose length the standard does not fix."""
    interval = device.interval
    models = device.models or sunspec.ASSUMED_MODELS
    how = "configured" if device.models else "assumed: set models to count the device's own"
    notes: list[str] = []
    unknown: list[str] = []
    for model in models:
        length = sunspec.STANDARD_LENGTHS.get(model)
        if length is None:
            unknown.append(str(model))
            continue
        # the block's address is known only after discovery; its size is what costs line time
        for block in sunspec.model_blocks(0, length):
            add(
                device,
                block,
                interval,
                f"SunSpec model {model} ({how}), {block.count} holding registers",
            )
    if unknown:
        notes.append(
            f"  {device.name} unit {device.unit_id}: SunSpec models {', '.join(unknown)} not "
            "counted: the standard does not fix their length"
        )
    return notes


def check_budget(ctx: Context, config: Config, name: str) -> None:
    """Report an RTU bus whose poll plan needs more than its line's time (or nearly all)."""
    path: Key = ("sources", name)
    try:
        budget = bus_budget(config, name)
    except ValueError as exc:
        ctx.report(path, f"the bus's read plan cannot be made: {exc}", at="key")
        return
    listing = "\n".join("    " + line for line in budget.lines)
    share = _pct(budget.utilisation)
    if budget.utilisation > 1:
        ctx.report(
            path,
            f"the RTU bus is overcommitted: its polls need {share} of the line's time "
            "(more than 100%), so polls would fall behind their intervals; poll less "
            "often, read fewer registers, raise the baud rate or split the devices over "
            f"two lines. The plan:\n{listing}",
            at="key",
        )
    elif budget.utilisation > WARN_UTILISATION:
        ctx.report(
            path,
            f"the RTU bus is busy: its polls need {share} of the line's time (more than "
            f"80%), leaving little for retries, a silent device's timeouts and writes. "
            f"The plan:\n{listing}",
            at="key",
            warning=True,
        )
