"""Plugin ABI v1 wire format (docs/plugin-abi.md), pure Python: no wasmtime here.

- :func:`encode_batch` turns readings (and measurements of a chain's earlier step) into the input
  batch the host writes into guest memory.
- :func:`decode_output` turns the guest's JSON Lines output into measurements and error records.

Both sit on the hot path: one call per batch, precompiled :class:`struct.Struct` objects and one
``bytes.join`` for the input, one msgspec ``decode_lines`` into a typed Struct for the output
(a strict one for the common case of plain measurement lines, checked in C, and a general one
for everything else).

Nesting. msgspec decodes recursively and has no depth option: a value nested 1,000 levels deep
raises RecursionError (at a depth that depends on the caller's own stack). Only a value that is
*skipped* (a key the ABI does not name) can nest at all: every key the ABI names has a scalar
type, so msgspec rejects an array or object there at its first byte. So the two decoders tried
first both forbid unknown keys (:class:`_PlainLine`, :class:`_KnownLine`) and never recurse past
the line object; only an output with another key (or a malformed one) reaches the tolerant
decoder, and before it :func:`_check_depth` measures every line's nesting (strings stripped by a
regex, brackets counted in C) and refuses one deeper than :data:`MAX_DEPTH` levels. The hot path
is unchanged (bench/plugin_call.py --breakdown). RecursionError and MemoryError from msgspec are
still caught (an ABI error for the batch) in case the stack is already deep.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import accumulate
from operator import attrgetter
from typing import Annotated, Literal

import msgspec

from flux_edge.errors import FluxError, PluginABIError
from flux_edge.model import (
    KIND_MEASUREMENT,
    KIND_REGISTERS,
    ErrorRecord,
    Measurement,
    Reading,
)

ABI_VERSION = 1
MAX_LINE = 64 * 1024  # bytes of one output line, without its "\n"
MAX_DEPTH = 64  # nesting levels of one output line, its own object included

# message := size:u32 kind:u8 function:u8 address:u16 ts:f64 device_len:u16 device
#            topic_len:u16 topic payload_len:u32 payload
_COUNT = struct.Struct("<I")
_FIXED = 12 + 2 + 2 + 4  # bytes counted by ``size`` besides device, topic and payload

# (device, topic, register count or -1) -> (pack, head, middle, size w/o payload). struct.pack
# converts every argument on its own (the bulk of the cost), so the parts that are the same
# for every message of a layout are packed once: for a register message ``head`` is size and
# kind, ``middle`` is device_len .. payload_len, and ``pack(head, function, address, ts,
# middle, *registers)`` is the whole message; for a bytes message ``middle`` is device_len ..
# topic, and ``pack(size, kind, function, address, ts, middle, payload_len)`` precedes the
# payload.
_Layout = tuple[Callable[..., bytes], bytes, bytes, int]
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
    names = struct.pack(f"<H{dl}sH{tl}s", dl, dev, tl, top)
    if nregs >= 0:
        size = _FIXED + dl + tl + 2 * nregs
        head = struct.pack("<IB", size, KIND_REGISTERS)
        middle = names + struct.pack("<I", 2 * nregs)
        pack = struct.Struct(f"<{len(head)}sBHd{len(middle)}s{nregs}H").pack
        layout = (pack, head, middle, size)
    else:
        pack = struct.Struct(f"<IBBHd{len(names)}sI").pack
        layout = (pack, b"", names, _FIXED + dl + tl)
    _LAYOUTS[(device, topic, nregs)] = layout
    return layout


class BatchEncodeError(FluxError, ValueError):
    """An input message cannot be put on the wire (a host-side problem, not the guest's).

    ``index`` is the message's position in the batch. Still a ValueError, as it always was.
    """

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"input message {index}: {reason}")


class TooManyRecords(PluginABIError):
    """An output with more lines than ``max_records`` for every message of the batch: the
    batch fails as a whole, but as an output limit (the guest is not recycled for it)."""


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
    # The layout of the previous message: a batch is mostly one device and one topic (the same
    # str objects), so an identity check replaces the dict lookup.
    last_dev: object = None
    last_top: object = None
    last_n = -2
    pack: Callable[..., bytes] = _COUNT.pack
    head = middle = b""
    size = 0
    try:
        for m in messages:
            if type(m) is Reading:
                device = m.device
                topic = m.topic
                if m.kind == KIND_REGISTERS:
                    regs = m.registers
                    n = len(regs)
                    if device is not last_dev or topic is not last_top or n != last_n:
                        lay = layouts.get((device, topic, n)) or _layout(device, topic, n)
                        pack, head, middle, size = lay
                        last_dev, last_top, last_n = device, topic, n
                    append(pack(head, m.function, m.address, m.ts, middle, *regs))
                    continue
                kind = m.kind
                payload = m.payload
                function = m.function
                address = m.address
            else:
                if not isinstance(m, Measurement):
                    raise TypeError(f"expected Reading or Measurement, got {type(m).__name__}")
                device = m.device
                topic = ""
                kind = KIND_MEASUREMENT
                payload = _json_encode(
                    _WireMeasurement(m.name, m.value, m.unit, m.quality, m.ts, device)
                )
                function = address = 0
            if device is not last_dev or topic is not last_top or last_n != -1:
                lay = layouts.get((device, topic, -1)) or _layout(device, topic, -1)
                pack, _, middle, size = lay
                last_dev, last_top, last_n = device, topic, -1
            n = len(payload)
            append(pack(size + n, kind, function, address, m.ts, middle, n))
            append(payload)
    except _ENCODE_ERRORS as exc:
        if len(messages) == 1:
            raise BatchEncodeError(0, _why(messages[0], exc)) from exc
        failure: BaseException = exc
    else:
        return b"".join(parts)
    # Error path: find the first message that cannot be encoded on its own, and say why.
    for i, m in enumerate(messages):
        try:
            encode_batch([m])
        except BatchEncodeError as exc:
            raise BatchEncodeError(i, exc.reason) from exc.__cause__
    raise BatchEncodeError(0, f"{type(failure).__name__}: {failure}") from failure


_ENCODE_ERRORS = (struct.error, TypeError, ValueError, OverflowError, UnicodeError)


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


_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _PlainLine(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """The common line: a measurement taking device and ts from its input message.

    msgspec checks in C what :func:`decode_output` would check per line in Python (``name``
    and ``value`` present, ``value`` within 64 bits, ``i`` not negative). Any other line (an
    error, a device or ts of its own, any other key, anything malformed) fails this decode,
    and the output is decoded again as :class:`OutputLine`, which accepts and reports it.
    """

    i: Annotated[int, msgspec.Meta(ge=0)]
    name: str
    value: bool | _Int64 | float | str
    unit: str = ""
    quality: Literal["good", "stale", "bad"] = "good"


class _KnownLine(OutputLine, gc=False, forbid_unknown_fields=True):
    """:class:`OutputLine` without unknown keys: nothing in it nests (module docstring)."""


_decode_lines = msgspec.json.Decoder(OutputLine).decode_lines
_decode_known = msgspec.json.Decoder(_KnownLine).decode_lines
_decode_plain = msgspec.json.Decoder(_PlainLine).decode_lines
_INT64 = (-(2**63), 2**63 - 1)
_get_i = attrgetter("i")


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
    return decode_output_counted(data, messages, plugin, indices=indices)[0]


class Decoded:
    """What :func:`decode_output_counted` found besides the records: ``errors`` is how many
    records are error records, ``guest_errors`` how many of them are the guest's own error
    lines, and ``over`` maps each input index that produced more than ``max_records`` records
    to how many it produced (its records were replaced by one error record). Filled in only
    when the output has an error record (the count returned is not 0): one object can be
    reused for every call."""

    __slots__ = ("errors", "guest_errors", "over")

    def __init__(self) -> None:
        self.errors = 0
        self.guest_errors = 0
        self.over: dict[int, int] = {}


_NO_LIMIT = 1 << 62


def decode_output_counted(
    data: bytes,
    messages: Sequence[Reading | Measurement],
    plugin: str,
    *,
    indices: list[int] | None = None,
    max_records: int = _NO_LIMIT,
    found: Decoded | None = None,
) -> tuple[list[Measurement | ErrorRecord], int]:
    """:func:`decode_output`, and how many of the records are error records.

    With ``max_records``, an input message about which the guest wrote more lines than that
    gets one error record instead of its records, after the other records (docs/plugin-abi.md,
    "Limits and failure"); the other messages keep theirs; the dropped lines are never made
    into records. ``found``, when given, is filled in (:class:`Decoded`).
    """
    if not data:
        return [], 0
    if len(data) > MAX_LINE and _has_long_line(data):
        _check_line_lengths(data, plugin)  # raises, naming the line
    cap = max_records
    n = len(messages)
    if len(data) > cap * n:  # then there may be more lines than every message may have
        _check_line_count(data, n, cap, plugin)
    try:
        plain = _decode_plain(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return _decode_general(data, messages, plugin, indices, cap=cap, found=found)
    # Fast path: every line is a measurement about an input message; only the upper bound
    # of ``i`` is left to check, once per run of lines about the same message. Records per
    # message are counted only when the output has more lines than one message may have.
    over = None
    if len(plain) > cap:
        over = _over_cap(plain, n, cap)
        if over:
            plain = [ln for ln in plain if ln.i not in over]
    out: list[Measurement | ErrorRecord] = []
    append = out.append
    last = -1
    device = source = ""
    ts = 0.0
    for ln in plain:
        i = ln.i
        if i != last:
            if i >= n:
                return _decode_general(
                    data, messages, plugin, indices, cap=cap, found=found
                )  # reports it
            m = messages[i]
            device, ts, source, last = m.device, m.ts, m.source, i
        append(
            Measurement(
                device=device,
                name=ln.name,
                value=ln.value,
                ts=ts,
                unit=ln.unit,
                quality=ln.quality,
                source=source,
            )
        )
    if indices is not None:
        indices.extend(map(_get_i, plain))
    if over:
        return _over_records(out, over, 0, cap, messages, plugin, indices, found)
    return out, 0


def _decode_general(
    data: bytes,
    messages: Sequence[Reading | Measurement],
    plugin: str,
    indices: list[int] | None,
    *,
    cap: int = _NO_LIMIT,
    found: Decoded | None = None,
) -> tuple[list[Measurement | ErrorRecord], int]:
    """Any valid output (error lines, device and ts of a line's own); names what is wrong."""
    decoded: Sequence[OutputLine]
    try:
        decoded = _decode_known(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # another key, or malformed: the tolerant decoder skips values, so it recurses
        _check_depth(data, plugin)
        try:
            decoded = _decode_lines(data)
        except msgspec.DecodeError as exc:
            raise PluginABIError(plugin, _describe_decode_error(data, exc)) from None
        except UnicodeDecodeError:
            raise PluginABIError(plugin, _describe_bad_utf8(data)) from None
        except RecursionError:
            raise PluginABIError(plugin, "output is nested too deeply to decode") from None
        except MemoryError:
            raise PluginABIError(plugin, "output is too large to decode") from None
    n = len(messages)
    over = _over_cap(decoded, n, cap) if len(decoded) > cap else None
    lines = [ln for ln in decoded if ln.i not in over] if over else decoded
    out: list[Measurement | ErrorRecord] = []
    append = out.append
    errors = 0
    last: int | None = None  # consecutive lines are mostly about one message: look it up once
    device = source = ""
    ts = 0.0
    lo, hi = _INT64
    for ln in lines:
        i = ln.i
        if i != last:
            if not 0 <= i < n:
                k = _index_of(decoded, ln)
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
                raise PluginABIError(plugin, _describe_bad_line(data, _index_of(decoded, ln), ln))
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
            errors += 1
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
        indices.extend(map(_get_i, lines))
    if over:
        return _over_records(out, over, errors, cap, messages, plugin, indices, found)
    if found is not None:
        found.errors = found.guest_errors = errors
        found.over = {}
    return out, errors


def _check_line_count(data: bytes, n: int, cap: int, plugin: str) -> None:
    """Refuse an output with more lines than ``cap`` for each of the ``n`` messages, before
    any is decoded (a line is at least one byte: only a long output needs the count)."""
    nlines = data.count(b"\n") + (data[-1:] != b"\n")
    if nlines > cap * n:
        raise TooManyRecords(
            plugin,
            f"output limit: {nlines} lines for {n} input message(s) "
            f"(max_records_per_message is {cap})",
        )


def _over_cap(lines: Sequence[_PlainLine | OutputLine], n: int, cap: int) -> dict[int, int]:
    """Input index -> line count, of the messages of the batch with more than ``cap`` lines."""
    counts = Counter(map(_get_i, lines))
    return {i: c for i, c in counts.items() if c > cap and 0 <= i < n}


def _over_records(  # noqa: PLR0917 - one caller per decoder, both right above
    out: list[Measurement | ErrorRecord],
    over: dict[int, int],
    guest_errors: int,
    cap: int,
    messages: Sequence[Reading | Measurement],
    plugin: str,
    indices: list[int] | None,
    found: Decoded | None,
) -> tuple[list[Measurement | ErrorRecord], int]:
    """One error record for each message whose lines were dropped (after the other records)."""
    for i, c in over.items():
        m = messages[i]
        out.append(
            ErrorRecord(
                stage="plugin",
                source=m.source,
                device=m.device,
                ts=m.ts,
                error=(
                    f"output limit: {c} records for one input message "
                    f"(max_records_per_message is {cap}); its records were dropped"
                ),
                plugin=plugin,
            )
        )
    if indices is not None:
        indices.extend(over)
    if found is not None:
        found.over = over
        found.guest_errors = guest_errors
        found.errors = guest_errors + len(over)
    return out, guest_errors + len(over)


# --- error path helpers (never on the hot path) ------------------------------------------------


def _index_of(lines: Sequence[OutputLine], ln: OutputLine) -> int:
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


_STRING_RE = re.compile(rb'"(?:[^"\\\n]|\\.)*"')
_BRACKETS = bytes(range(256)).translate(None, b"[]{}\n")  # every byte but these: deleted
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _check_depth(data: bytes, plugin: str) -> None:
    """Refuse an output with a line nested more than MAX_DEPTH levels (module docstring).

    Strings are removed first (a bracket inside one does not nest), then everything but the
    brackets; a line with no more brackets than MAX_DEPTH cannot be too deep, so only longer
    ones are walked (by ``accumulate``, in C)."""
    skeleton = _STRING_RE.sub(b"", data).translate(None, _BRACKETS)
    if len(skeleton) <= MAX_DEPTH:
        return
    step = _DEPTH_STEP.__getitem__
    for no, line in enumerate(skeleton.split(b"\n"), 1):
        if len(line) > MAX_DEPTH and max(accumulate(map(step, line))) > MAX_DEPTH:
            raise PluginABIError(
                plugin,
                f"output line {no} is nested more than {MAX_DEPTH} levels deep "
                "(docs/plugin-abi.md, Output)",
            )


def _has_long_line(data: bytes) -> bool:
    """Whether a line is longer than MAX_LINE: one ``rfind`` per 64 KiB, not one per line."""
    start = 0  # always the start of a line
    total = len(data)
    rfind = data.rfind
    while total - start > MAX_LINE:
        nl = rfind(b"\n", start, start + MAX_LINE + 1)
        if nl < 0:
            return True
        start = nl + 1
    return False


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
