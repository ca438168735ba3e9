"""Framers: a serial byte stream -> frames. Pure code, no I/O, no clock of their own.

One framer per ``SerialSource.framing`` mode:

- ``"delimiter"``: a frame ends at ``delimiter`` (which is not part of the frame). Empty frames
  (two delimiters in a row) are skipped.
- ``"fixed"``: every ``frame_length`` bytes are a frame.
- ``"length_prefix"``: a length field of ``length_bytes`` (1, 2 or 4) bytes in ``length_order``
  sits at ``length_offset``; the whole frame is ``length_offset + length_bytes + value +
  length_adjust`` bytes and is passed on *with* its header.
- ``"idle"``: a gap of at least ``idle`` seconds between two chunks ends a frame.

Every framer is incremental: ``feed(data, now)`` takes the next chunk with its arrival time
(monotonic seconds) and returns the frames it completed; ``flush(now)`` returns what a gap has
completed by ``now`` (only the idle framer ever has such a frame); ``deadline()`` says when the
pending frame completes if no byte arrives before then (None: never). The frames do not depend on
how the stream was cut into chunks (for the idle framer: cuts between bytes that arrived at the
same time).

Every framer enforces ``max_frame``. A frame longer than that is counted in ``errors`` (one per
frame, described in ``last_error``), its bytes are dropped (``discarded``) up to the next
boundary, and framing carries on: garbage never raises and never stalls the stream.

- delimiter: dropped up to and including the next delimiter;
- idle: dropped up to the next gap;
- length_prefix: a length field that makes the frame longer than ``max_frame`` (or shorter than
  its own header) cannot be trusted on a noisy line, so the framer hunts for the next plausible
  header byte by byte (one error per run of implausible headers). Hunting never waits for
  bytes a broken length claims;
- fixed: a frame is always ``frame_length`` bytes, which must be at most ``max_frame``.

``make_framer(cfg)`` builds the framer for a ``SerialSource`` and raises ``ValueError`` naming
the key for settings no framer could work with (the config checks can call it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:  # the struct is declared by the kind module, which imports this one
    from flux_edge.sources.serial_kind import SerialSource


__all__ = [
    "DelimiterFramer",
    "FixedFramer",
    "Framer",
    "IdleFramer",
    "LengthPrefixFramer",
    "delimiter_bytes",
    "make_framer",
]


class Framer(Protocol):
    """What ``SerialReader`` needs of a framer."""

    errors: int  # frames dropped as overlong or implausible
    discarded: int  # bytes dropped with them
    last_error: str  # what the last error was, for health and logs

    def feed(self, data: bytes, now: float) -> list[bytes]: ...

    def flush(self, now: float) -> list[bytes]: ...

    def deadline(self) -> float | None: ...


def delimiter_bytes(text: str) -> bytes:
    """The bytes of a configured delimiter: each character U+0000..U+00FF is one byte (so
    ``"\\r\\n"``, ``"\\u0003"`` (ETX) and ``"\\u00ff"`` all mean what a serial protocol means).
    Raises ValueError for an empty delimiter or a character above U+00FF."""
    if not text:
        raise ValueError("delimiter must not be empty")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"delimiter {text!r}: {bad!r} (U+{ord(bad):04X}) is not a single byte; write bytes "
            'as "\\u0000".."\\u00ff" (for example "\\r\\n" or "\\u0003")'
        ) from None


class _Base:
    def __init__(self, max_frame: int) -> None:
        if max_frame <= 0:
            raise ValueError(f"max_frame must be > 0, got {max_frame}")
        self.max_frame = max_frame
        self.errors = 0
        self.discarded = 0
        self.last_error = ""

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message

    def flush(self, now: float) -> list[bytes]:
        return []

    def deadline(self) -> float | None:
        return None


class DelimiterFramer(_Base):
    """Frames end at ``delimiter``, which is not part of them; empty frames are skipped."""

    def __init__(self, delimiter: bytes, max_frame: int) -> None:
        super().__init__(max_frame)
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        self.delimiter = delimiter
        self._buf = bytearray()
        self._scanned = 0  # no delimiter starts before this position of _buf
        self._skipping = False  # inside an overlong frame: drop up to the next delimiter

    def feed(self, data: bytes, now: float) -> list[bytes]:
        buf = self._buf
        buf += data
        d = self.delimiter
        n = len(d)
        frames: list[bytes] = []
        start = 0  # consumed prefix of buf
        while True:
            at = buf.find(d, max(self._scanned, start))
            if at < 0:
                break
            length = at - start
            if self._skipping:
                self.discarded += length + n
                self._skipping = False
            elif length > self.max_frame:
                self._overlong(length)
                self.discarded += length + n
            elif length:
                frames.append(bytes(buf[start:at]))
            start = at + n
            self._scanned = start
        pending = len(buf) - start
        # No delimiter starts before the last n-1 bytes. A frame that cannot end within
        # max_frame bytes is overlong now: drop it, keeping a possible partial delimiter.
        if pending >= self.max_frame + n or (self._skipping and pending >= n):
            keep = n - 1
            dropped = pending - keep
            if not self._skipping:
                self._overlong(None)
                self._skipping = True
            self.discarded += dropped
            start += dropped
        del buf[:start]
        self._scanned = max(len(buf) - (n - 1), 0)
        return frames

    def _overlong(self, length: int | None) -> None:
        size = f"{length} bytes" if length is not None else f"over {self.max_frame} bytes"
        self._error(
            f"frame of {size} without a delimiter {self.delimiter!r} exceeds max_frame "
            f"{self.max_frame}: dropped up to the next delimiter (wrong delimiter or baud rate?)"
        )


class FixedFramer(_Base):
    """Every ``frame_length`` bytes are one frame."""

    def __init__(self, frame_length: int, max_frame: int) -> None:
        super().__init__(max_frame)
        if frame_length <= 0:
            raise ValueError(f"frame_length must be > 0 for fixed framing, got {frame_length}")
        if frame_length > max_frame:
            raise ValueError(f"frame_length {frame_length} exceeds max_frame {max_frame}")
        self.frame_length = frame_length
        self._buf = bytearray()

    def feed(self, data: bytes, now: float) -> list[bytes]:
        buf = self._buf
        buf += data
        k = self.frame_length
        whole = len(buf) - len(buf) % k
        frames = [bytes(buf[i : i + k]) for i in range(0, whole, k)]
        del buf[:whole]
        return frames


class LengthPrefixFramer(_Base):
    """Frames announce their length: header (``offset`` bytes, then the length field), then
    ``value + adjust`` more bytes. The frame passed on includes the header."""

    def __init__(
        self,
        offset: int,
        length_bytes: int,
        order: Literal["big", "little"],
        adjust: int,
        max_frame: int,
    ) -> None:
        super().__init__(max_frame)
        if offset < 0:
            raise ValueError(f"length_offset must be >= 0, got {offset}")
        if length_bytes not in (1, 2, 4):
            raise ValueError(f"length_bytes must be 1, 2 or 4, got {length_bytes}")
        if order not in ("big", "little"):
            raise ValueError(f'length_order must be "big" or "little", got {order!r}')
        self.offset = offset
        self.length_bytes = length_bytes
        self.order: Literal["big", "little"] = order
        self.adjust = adjust
        self.header = offset + length_bytes
        if self.header > max_frame:
            raise ValueError(
                f"length_offset + length_bytes = {self.header} exceeds max_frame {max_frame}"
            )
        self._buf = bytearray()
        self._hunting = False  # inside a run of implausible headers (counted once)

    def _value(self, start: int) -> int:
        return int.from_bytes(self._buf[start + self.offset : start + self.header], self.order)

    def feed(self, data: bytes, now: float) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        start = 0
        hunted = 0
        while len(buf) - start >= self.header:
            value = self._value(start)
            total = self.header + value + self.adjust
            if total < self.header or total > self.max_frame:
                if not self._hunting:
                    self._hunting = True
                    self._error(
                        f"length field {value} at byte {self.offset} makes a frame of {total} "
                        f"bytes (header {self.header}, max_frame {self.max_frame}): not a frame "
                        "start, looking for the next one byte by byte (check length_offset, "
                        "length_bytes, length_order, length_adjust and max_frame)"
                    )
                start += 1
                hunted += 1
                continue
            if len(buf) - start < total:
                break
            self._hunting = False
            frames.append(bytes(buf[start : start + total]))
            start += total
        self.discarded += hunted
        del buf[:start]
        return frames


class IdleFramer(_Base):
    """A gap of at least ``idle`` seconds after the last byte ends a frame.

    ``now`` is the arrival time of each chunk (monotonic seconds); ``flush(now)`` emits the
    pending frame once ``now`` is ``idle`` past its last byte, ``deadline()`` says when that is.
    """

    def __init__(self, idle: float, max_frame: int) -> None:
        super().__init__(max_frame)
        if not idle > 0:
            raise ValueError(f"idle must be > 0 for idle framing, got {idle}")
        self.idle = idle
        self._buf = bytearray()
        self._last = 0.0  # arrival time of the last byte
        self._skipping = False  # the pending frame is overlong: drop up to the next gap

    def _end_frame(self) -> list[bytes]:
        frame = bytes(self._buf)
        self._buf.clear()
        if self._skipping:
            self._skipping = False
            return []
        return [frame] if frame else []

    def feed(self, data: bytes, now: float) -> list[bytes]:
        frames = self.flush(now)
        if not data:
            return frames
        self._last = now
        if self._skipping:
            self.discarded += len(data)
            return frames
        self._buf += data
        if len(self._buf) > self.max_frame:
            self._skipping = True
            self.discarded += len(self._buf)
            self._buf.clear()
            self._error(
                f"more than max_frame {self.max_frame} bytes without a gap of {self.idle:g} s: "
                "dropped up to the next gap (is the device streaming without pauses? raise "
                "max_frame or use another framing)"
            )
        return frames

    def flush(self, now: float) -> list[bytes]:
        # the same test as deadline(): the caller's timer and this check never disagree
        if (self._buf or self._skipping) and now >= self._last + self.idle:
            return self._end_frame()
        return []

    def deadline(self) -> float | None:
        if self._buf or self._skipping:
            return self._last + self.idle
        return None


def make_framer(cfg: SerialSource) -> Framer:
    """The framer for a serial source's settings. Raises ValueError naming the bad key."""
    if cfg.framing == "delimiter":
        return DelimiterFramer(delimiter_bytes(cfg.delimiter), cfg.max_frame)
    if cfg.framing == "fixed":
        return FixedFramer(cfg.frame_length, cfg.max_frame)
    if cfg.framing == "length_prefix":
        return LengthPrefixFramer(
            cfg.length_offset, cfg.length_bytes, cfg.length_order, cfg.length_adjust, cfg.max_frame
        )
    if cfg.framing == "idle":
        return IdleFramer(cfg.idle, cfg.max_frame)
    raise ValueError(
        f"framing must be delimiter, fixed, length_prefix or idle, got {cfg.framing!r}"
    )
