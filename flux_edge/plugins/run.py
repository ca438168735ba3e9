"""``flux-edge plugin run PLUGIN.wasm [--config FILE]``: JSON Lines through one plugin.

For plugin authors and golden tests. Each non-blank stdin line is one input message::

    {"device": "boiler", "ts": 1700000000.0, "source": "s", "topic": "",
     "registers": [215, 153], "function": 3, "address": 0}          kind 1 (registers)
    {"payload": "text"} | {"payload_hex": "01ff"} | {"payload_b64": "Af8="}   kind 0 (bytes)
    {"measurement": {"name": "t", "value": 21.5, "unit": "°C"}}     kind 2 (a chain's input)

(``device`` defaults to "device", ``ts`` to 0.0, ``source`` to "cli"; a measurement's own
``device``/``ts`` default to the line's.) Every result is one JSON line on stdout, in input
order::

    {"device":"boiler","name":"temperature","value":21.5,"unit":"°C","quality":"good","ts":1700000000.0}
    {"index":3,"device":"boiler","error":"checksum mismatch"}

``index`` counts input messages from 0 (blank lines are not messages). Exit status: 0 when every
message was processed, 1 when any became an error, 2 for usage, input or load errors, reported
as one ``flux-edge: error: ...`` line on stderr.
"""

from __future__ import annotations

import base64
import binascii
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import msgspec

from flux_edge.errors import PluginError
from flux_edge.model import KIND_BYTES, KIND_REGISTERS, Measurement, Reading
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class _InMeasurement(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    value: bool | int | float | str
    unit: str = ""
    quality: Literal["good", "stale", "bad"] = "good"
    ts: float | None = None
    device: str | None = None


class _InLine(msgspec.Struct, forbid_unknown_fields=True):
    device: str = "device"
    ts: float = 0.0
    source: str = "cli"
    topic: str = ""
    function: U8 = 0
    address: U16 = 0
    registers: list[U16] | None = None
    payload: str | None = None
    payload_hex: str | None = None
    payload_b64: str | None = None
    measurement: _InMeasurement | None = None


class _OutMeasurement(msgspec.Struct):
    device: str
    name: str
    value: bool | int | float | str
    unit: str
    quality: str
    ts: float


class _OutError(msgspec.Struct):
    index: int
    device: str
    error: str


_decode_line = msgspec.json.Decoder(_InLine).decode
_encode = msgspec.json.Encoder().encode
_BODIES = ("registers", "payload", "payload_hex", "payload_b64", "measurement")


class _Usage(Exception):
    """A usage, input or load error: one line on stderr, exit 2."""


def parse_input_line(text: str) -> Reading | Measurement:
    """One stdin line -> the message it describes. Raises ValueError with a readable reason."""
    try:
        ln = _decode_line(text)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc).replace("$.", "")) from None
    given = [k for k in _BODIES if getattr(ln, k) is not None]
    if len(given) != 1:
        raise ValueError(
            f"needs exactly one of {', '.join(_BODIES)}"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if ln.measurement is not None:
        m = ln.measurement
        return Measurement(
            device=ln.device if m.device is None else m.device,
            name=m.name,
            value=m.value,
            ts=ln.ts if m.ts is None else m.ts,
            unit=m.unit,
            quality=m.quality,
            source=ln.source,
        )
    common: dict[str, Any] = {
        "source": ln.source,
        "device": ln.device,
        "ts": ln.ts,
        "topic": ln.topic,
        "function": ln.function,
        "address": ln.address,
    }
    if ln.registers is not None:
        return Reading(kind=KIND_REGISTERS, registers=tuple(ln.registers), **common)
    if ln.payload is not None:
        payload = ln.payload.encode()
    elif ln.payload_hex is not None:
        try:
            payload = bytes.fromhex(ln.payload_hex)
        except ValueError:
            raise ValueError("payload_hex is not hexadecimal") from None
    else:
        try:
            payload = base64.b64decode(ln.payload_b64 or "", validate=True)
        except binascii.Error:
            raise ValueError("payload_b64 is not base64") from None
    return Reading(kind=KIND_BYTES, payload=payload, **common)


def load_plugin_config(path: Path | None) -> dict[str, Any]:
    """A JSON or TOML file holding one object, passed to flux_init as is."""
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise _Usage(f"cannot read config {path}: {why}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = msgspec.json.decode(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise _Usage(f"config {path}: use a .json or .toml file")
    except (msgspec.DecodeError, tomllib.TOMLDecodeError) as exc:
        raise _Usage(f"config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise _Usage(f"config {path}: must hold an object (a table), got {type(data).__name__}")
    return data


def run_plugin_cli(  # noqa: PLR0917 (the CLI's calling convention)
    wasm: Path,
    config_file: Path | None,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    batch: int = 64,
    *,
    wasi: bool = False,
) -> int:
    """Run ``plugin run``; returns the exit status (see the module docstring)."""
    try:
        if batch < 1:
            raise _Usage(f"--batch must be at least 1, got {batch}")
        config = load_plugin_config(config_file)
        with PluginHost(None) as host:
            try:
                plugin = host.load(wasm.stem, wasm, PluginLimits(), config, wasi=wasi)
            except PluginError as exc:
                raise _Usage(str(exc)) from None
            return _run(plugin, stdin, stdout, batch)
    except _Usage as exc:
        stderr.write(f"flux-edge: error: {_one_line(str(exc))}\n")
        stderr.flush()
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_FAILED


def _run(plugin: Plugin, stdin: Iterable[str], stdout: TextIO, batch: int) -> int:
    pending: list[Reading | Measurement] = []
    first = 0  # index of pending[0] among all messages
    failed = False
    bad_line: _Usage | None = None
    for no, text in enumerate(stdin, 1):
        if not text.strip():
            continue
        try:
            pending.append(parse_input_line(text))
        except ValueError as exc:
            bad_line = _Usage(f"stdin line {no}: {exc}")
            break
        if len(pending) >= batch:
            failed |= _flush(plugin, pending, first, stdout)
            first += len(pending)
            pending = []
    if pending:
        failed |= _flush(plugin, pending, first, stdout)
    stdout.flush()
    if bad_line is not None:
        raise bad_line
    return EXIT_FAILED if failed else EXIT_OK


def _flush(plugin: Plugin, msgs: list[Reading | Measurement], first: int, out: TextIO) -> bool:
    """Process one batch and write its results in input order; True if any failed."""
    indices: list[int] = []
    records = plugin.process(msgs, indices=indices)
    order = sorted(range(len(records)), key=indices.__getitem__)  # stable: guest order kept
    failed = False
    lines: list[bytes] = []
    for k in order:
        r = records[k]
        if isinstance(r, Measurement):
            lines.append(
                _encode(_OutMeasurement(r.device, r.name, r.value, r.unit, r.quality, r.ts))
            )
        else:
            failed = True
            lines.append(_encode(_OutError(first + indices[k], r.device, r.error)))
    if lines:
        out.write(b"\n".join(lines).decode() + "\n")
    return failed


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
