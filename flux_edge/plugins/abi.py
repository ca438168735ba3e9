"""Plugin ABI v1 wire format (docs/plugin-abi.md), pure Python: no wasmtime here.

- :func:`encode_batch` turns readings (and measurements of a chain's earlier step) into the input
  batch the host writes into guest memory.
- :func:`decode_output` turns the guest's JSON Lines output into measurements and error records.

Both sit on the hot path: one call per batch, precompiled :class:`struct.Struct` objects and one
``bytes.join`` for the input, one msgspec ``decode_lines`` into a typed Struct for the output.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from flux_edge.errors import PluginABIError
from flux_edge.model import (
    KIND_MEASUREMENT,
    KIND_REGISTERS,
    ErrorRecord,
    Measurement,
    Reading,
)

ABI_VERSION = 1
MAX_LINE = 64 * 1024  # bytes of one output line, without its "\n"

# message := size:u32 kind:u8 function:u8 address:u16 ts:f64 device_len:u16 device
#            topic_len:u16 topic payload_len:u32 payload
_COUNT = struct.Struct("<I")
_FIXED = 12 + 2 + 2 + 4  # bytes counted by ``size`` besides device, topic and payload

# (device, topic, register count or -1) -> (pack, device bytes, topic bytes, size w/o payload,
# device_len, topic_len, payload bytes of registers): one precompiled Struct packs a whole
# register message, or everything but the payload of a bytes message, in one call.
_Layout = tuple[Callable[..., bytes], bytes, bytes, int, int, int, int]
_LAYOUTS: dict[tuple[str, str, int], _Layout] = {}
_LAYOUTS_MAX = 4096


def _layout(device: str, topic: str, nregs: int) -> _Layout:
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    dev = device.encode()
    top = topic.encode()
    dl, tl = len(dev), len(top)
    if dl > 0xFFFF or tl > 0xFFFF:
        raise ValueError("device names and topics are limited to 65535 bytes")
    if nregs >= 0:
        fmt = f"<IBBHdH{dl}sH{tl}sI{nregs}H"
        layout = (
            struct.Struct(fmt).pack,
            dev,
            top,
            _FIXED + dl + tl + 2 * nregs,
            dl,
            tl,
            2 * nregs,
        )
    else:
        fmt = f"<IBBHdH{dl}sH{tl}sI"
        layout = (struct.Struct(fmt).pack, dev, top, _FIXED + dl + tl, dl, tl, 0)
    _LAYOUTS[(device, topic, nregs)] = layout
    return layout


class BatchEncodeError(ValueError):
    """An input message cannot be put on the wire (a host-side problem, not the guest's).

    ``index`` is the message's position in the batch.
    """

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"input message {index}: {reason}")


class _WireMeasurement(msgspec.Struct, gc=False):
    """A kind-2 payload: exactly the keys the ABI names, in this order."""

    name: str
    value: bool | int | float | str
    unit: str
    quality: str
    ts: float
    device: str


_json_encode = msgspec.json.Encoder().encode


def encode_batch(messages: Sequence[Reading | Measurement]) -> bytes:
    """Encode a batch for ``flux_process`` (docs/plugin-abi.md, "Input batch").

    A :class:`Measurement` travels as kind 2 with its JSON object as payload. Raises
    :class:`BatchEncodeError` naming the message when one cannot be encoded (a register outside
    0..65535, a device name or topic longer than 65535 bytes, a kind outside 0..255, ...).
    """
    parts: list[bytes] = [_COUNT.pack(len(messages))]
    append = parts.append
    layouts = _LAYOUTS
    i = 0
    try:
        for i, m in enumerate(messages):  # noqa: B007 (i is read in the except clause)
            if type(m) is Reading:
                if m.kind == KIND_REGISTERS:
                    regs = m.registers
                    lay = layouts.get((m.device, m.topic, len(regs)))
                    if lay is None:
                        lay = _layout(m.device, m.topic, len(regs))
                    pack, dev, top, size, dl, tl, pl = lay
                    append(
                        pack(
                            size,
                            KIND_REGISTERS,
                            m.function,
                            m.address,
                            m.ts,
                            dl,
                            dev,
                            tl,
                            top,
                            pl,
                            *regs,
                        )
                    )
                    continue
                kind = m.kind
                payload = m.payload
                function = m.function
                address = m.address
                lay = layouts.get((m.device, m.topic, -1))
                if lay is None:
                    lay = _layout(m.device, m.topic, -1)
            else:
                if not isinstance(m, Measurement):
                    raise TypeError(f"expected Reading or Measurement, got {type(m).__name__}")
                kind = KIND_MEASUREMENT
                payload = _json_encode(
                    _WireMeasurement(m.name, m.value, m.unit, m.quality, m.ts, m.device)
                )
                function = address = 0
                lay = layouts.get((m.device, "", -1))
                if lay is None:
                    lay = _layout(m.device, "", -1)
            pack, dev, top, size, dl, tl, _ = lay
            n = len(payload)
            append(pack(size + n, kind, function, address, m.ts, dl, dev, tl, top, n))
            append(payload)
    except (struct.error, TypeError, ValueError, OverflowError, UnicodeError) as exc:
        raise BatchEncodeError(i, _why(messages[i], exc)) from exc
    return b"".join(parts)


def _why(m: object, exc: BaseException) -> str:
    """A readable reason for an encoding failure (error path only)."""
    if isinstance(m, Reading):
        bad = [r for r in m.registers if not (isinstance(r, int) and 0 <= r <= 0xFFFF)]
        if m.kind == KIND_REGISTERS and bad:
            return f"register value {bad[0]!r} is outside 0..65535"
        if len(m.device.encode(errors="replace")) > 0xFFFF:
            return "device name is longer than 65535 bytes"
        if len(m.topic.encode(errors="replace")) > 0xFFFF:
            return "topic is longer than 65535 bytes"
        if not 0 <= m.kind <= 0xFF or not 0 <= m.function <= 0xFF:
            return f"kind {m.kind} / function {m.function} must be within 0..255"
        if not 0 <= m.address <= 0xFFFF:
            return f"address {m.address} is outside 0..65535"
    elif isinstance(m, Measurement) and len(m.device.encode(errors="replace")) > 0xFFFF:
        return "device name is longer than 65535 bytes"
    return f"{type(exc).__name__}: {exc}"


# --- output ---------------------------------------------------------------------------------------


class OutputLine(msgspec.Struct, gc=False):
    """One line of guest output (docs/plugin-abi.md, "Output"). Unknown keys are ignored."""

    i: int
    name: str | None = None
    value: bool | int | float | str | None = None
    unit: str = ""
    quality: Literal["good", "stale", "bad"] = "good"
    device: str | None = None
    ts: float | None = None
    error: str | None = None


_decode_lines = msgspec.json.Decoder(OutputLine).decode_lines
_INT64 = (-(2**63), 2**63 - 1)


def decode_output(
    data: bytes,
    messages: Sequence[Reading | Measurement],
    plugin: str,
    *,
    indices: list[int] | None = None,
) -> list[Measurement | ErrorRecord]:
    """Decode a guest's output about ``messages`` into measurements and error records.

    ``device`` and ``ts`` default to the input message's, ``source`` is always the input
    message's. Records come in the order the guest wrote them. When ``indices`` is given, the
    input index of each record is appended to it (same order).

    Raises :class:`PluginABIError` (naming the plugin and the output line) when the output is not
    valid JSON Lines, a line is longer than 64 KiB, ``i`` is outside the batch, or a line has
    neither ``error`` nor both ``name`` and ``value``.
    """
    if not data:
        return []
    if len(data) > MAX_LINE:
        _check_line_lengths(data, plugin)
    try:
        lines = _decode_lines(data)
    except msgspec.DecodeError as exc:
        raise PluginABIError(plugin, _describe_decode_error(data, exc)) from None
    except UnicodeDecodeError:
        raise PluginABIError(plugin, _describe_bad_utf8(data)) from None
    n = len(messages)
    out: list[Measurement | ErrorRecord] = []
    append = out.append
    last: int | None = None  # consecutive lines are mostly about one message: look it up once
    device = source = ""
    ts = 0.0
    lo, hi = _INT64
    for ln in lines:
        i = ln.i
        if i != last:
            if not 0 <= i < n:
                k = _index_of(lines, ln)
                raise PluginABIError(
                    plugin,
                    f'output line {_line_no(data, k)}: "i": {i} is outside the batch (0..{n - 1})',
                )
            m = messages[i]
            device, ts, source, last = m.device, m.ts, m.source, i
        if ln.error is None:
            name = ln.name
            value = ln.value
            if name is None or value is None or (type(value) is int and not lo <= value <= hi):
                raise PluginABIError(plugin, _describe_bad_line(data, _index_of(lines, ln), ln))
            append(
                Measurement(
                    device=device if ln.device is None else ln.device,
                    name=name,
                    value=value,
                    ts=ts if ln.ts is None else ln.ts,
                    unit=ln.unit,
                    quality=ln.quality,
                    source=source,
                )
            )
        else:
            append(
                ErrorRecord(
                    stage="plugin",
                    source=source,
                    device=device if ln.device is None else ln.device,
                    ts=ts if ln.ts is None else ln.ts,
                    error=ln.error,
                    plugin=plugin,
                )
            )
    if indices is not None:
        indices.extend([ln.i for ln in lines])
    return out


# --- error path helpers (never on the hot path) ------------------------------------------------


def _index_of(lines: list[OutputLine], ln: OutputLine) -> int:
    for k, x in enumerate(lines):
        if x is ln:
            return k
    return 0


def _describe_bad_line(data: bytes, k: int, ln: OutputLine) -> str:
    where = f"output line {_line_no(data, k)}"
    if ln.name is None or ln.value is None:
        what = "no name" if ln.name is None else "no value"
        return f'{where}: {what} (a line needs "name" and "value", or "error"): {_snippet(data, k)}'
    return f"{where}: value {ln.value} does not fit in 64 bits"


def _check_line_lengths(data: bytes, plugin: str) -> None:
    start = 0
    no = 1
    end = len(data)
    find = data.find
    while start < end:
        nl = find(b"\n", start)
        if nl < 0:
            nl = end
        if nl - start > MAX_LINE:
            raise PluginABIError(
                plugin,
                f"output line {no} is {nl - start} bytes long (the limit is {MAX_LINE} bytes)",
            )
        start = nl + 1
        no += 1


def _physical_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(1-based line number, content) of every non-blank line."""
    return [(no, line) for no, line in enumerate(data.split(b"\n"), 1) if line.strip(b" \t\r")]


def _line_no(data: bytes, k: int) -> int:
    """Physical line number of the k-th decoded (non-blank) line."""
    lines = _physical_lines(data)
    return lines[k][0] if k < len(lines) else k + 1


def _snippet(data: bytes, k: int) -> str:
    lines = _physical_lines(data)
    text = lines[k][1] if k < len(lines) else b""
    s = text[:120].decode("utf-8", "replace")
    return s + ("…" if len(text) > 120 else "")


_BYTE_RE = re.compile(r"\(byte (\d+)\)")
_PATH_RE = re.compile(r"`\$\[(\d+)\]\.?([^`]*)`")


def _describe_decode_error(data: bytes, exc: msgspec.DecodeError) -> str:
    msg = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        m = _PATH_RE.search(msg)
        if m:
            k = int(m.group(1))
            where = f"`{m.group(2)}`" if m.group(2) else "the line"
            head = re.sub(r"\s*-\s*at\s*$", "", msg[: m.start()])
            msg = f"{head} (at {where}): {_snippet(data, k)}"
            return f"malformed output line {_line_no(data, k)}: {msg}"
        return f"malformed output: {msg}"
    m = _BYTE_RE.search(msg)
    if m:
        pos = int(m.group(1))
        no = data.count(b"\n", 0, pos) + 1
        line_start = data.rfind(b"\n", 0, pos) + 1
        line_end = data.find(b"\n", pos)
        text = data[line_start : line_end if line_end >= 0 else len(data)]
        col = pos - line_start + 1
        shown = text[:120].decode("utf-8", "replace")
        return (
            f"malformed output line {no}, column {col}: "
            f"{msg[: m.start()].rstrip()}: {shown}{'…' if len(text) > 120 else ''}"
        )
    return f"malformed output: {msg}"


def _describe_bad_utf8(data: bytes) -> str:
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        no = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        return f"output line {no} is not valid UTF-8 (column {col})"
    return "output is not valid UTF-8"
