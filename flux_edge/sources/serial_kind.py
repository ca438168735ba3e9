"""The ``serial`` source kind: a non-Modbus serial device (NMEA GPS, ASCII sensor, barcode
reader ...) read frame by frame. Its config struct, checks and factory; the reader is
``serial.py`` (the only pyserial import), framing ``framing.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta

from flux_edge.config import Order, Parity, SourceSpec
from flux_edge.config.kinds import Kind
from flux_edge.config.tables import baudrate_warning
from flux_edge.config.values import DURATION, NAME, SIZE, Key

if TYPE_CHECKING:
    from flux_edge.config.validate import _Validator
    from flux_edge.sources import Emit, Source, SourceEnv, StatusCallback


class SerialSource(SourceSpec, frozen=True, kw_only=True, tag="serial"):
    """A non-Modbus serial device (NMEA GPS, ASCII sensor, barcode reader ...)."""

    port: Annotated[str, Meta(min_length=1)]
    baudrate: Annotated[int, Meta(ge=300, le=4_000_000)] = 9600
    parity: Parity = "N"
    stopbits: Annotated[int, Meta(ge=1, le=2)] = 1
    bytesize: Annotated[int, Meta(ge=7, le=8)] = 8
    device: Annotated[str, NAME] = ""  # default: the source's table name
    framing: Literal["delimiter", "fixed", "length_prefix", "idle"] = "delimiter"
    # delimiter framing: TOML escapes allowed ("\r\n"); the delimiter is not part of the frame
    delimiter: str = "\n"
    frame_length: Annotated[int, Meta(ge=0, le=16 * 2**20)] = 0  # fixed framing: bytes per frame
    # length_prefix: where the length field starts in the frame
    length_offset: Annotated[int, Meta(ge=0, le=65535)] = 0
    length_bytes: int = 1  # length_prefix: 1, 2 or 4
    length_order: Order = "big"  # length_prefix: byte order of the length field
    # length_prefix: added to the length field to get the bytes after it
    length_adjust: Annotated[int, Meta(ge=-65535, le=65535)] = 0
    # idle framing: a gap this long ends a frame
    idle: Annotated[float, Meta(le=60, gt=0), DURATION] = 0.02
    # longer frames are counted errors and dropped up to the next boundary
    max_frame: Annotated[int, Meta(ge=1, le=16 * 2**20), SIZE] = 4096

    def plugin_context(self, name: str, key: str) -> dict[str, Any]:
        return {"device": self.device or name}


# Keys each serial framing reads; the others are ignored (a warning if given).
_FRAMING_KEYS: dict[str, frozenset[str]] = {
    "delimiter": frozenset({"delimiter"}),
    "fixed": frozenset({"frame_length"}),
    "length_prefix": frozenset({"length_offset", "length_bytes", "length_order", "length_adjust"}),
    "idle": frozenset({"idle"}),
}
_ALL_FRAMING_KEYS = sorted(frozenset().union(*_FRAMING_KEYS.values()))


def _serial_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    baudrate_warning(v, out, path)
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


def make_source(
    name: str, cfg: SerialSource, emit: Emit, on_status: StatusCallback, env: SourceEnv
) -> Source:
    from flux_edge.sources.serial import SerialReader  # pyserial: only when used

    return SerialReader(name, cfg, emit, on_status=on_status)


KIND = Kind(
    section="sources",
    tag="serial",
    rank=20,
    struct=SerialSource,
    factory=make_source,
    table_checks={SerialSource: _serial_checks},
    exclusive="port",
)
