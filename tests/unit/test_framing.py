"""Framers for serial sources (flux_edge.sources.framing): each mode, max_frame, and the
property that matters most on a serial line: how the stream is cut into reads never changes
the frames, and no input makes a framer raise or stall."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.sources.framing import (
    DelimiterFramer,
    FixedFramer,
    Framer,
    IdleFramer,
    LengthPrefixFramer,
    delimiter_bytes,
    make_framer,
)
from flux_edge.sources.serial_kind import SerialSource

PROPS = settings(max_examples=300, deadline=None)


def feed_all(framer: Framer, chunks: list[bytes], now: float = 0.0) -> list[bytes]:
    out: list[bytes] = []
    for c in chunks:
        out += framer.feed(c, now)
    return out


def outcome(framer: Framer, chunks: list[bytes]) -> tuple[list[bytes], int, int]:
    frames = feed_all(framer, chunks)
    return frames, framer.errors, framer.discarded


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


# --- delimiter ----------------------------------------------------------------------------------


def test_delimiter_frames_exclude_it_and_skip_empty_frames() -> None:
    f = DelimiterFramer(b"\r\n", 100)
    assert f.feed(b"$GPGGA,1*00\r\n\r\n$GPRMC", 0) == [b"$GPGGA,1*00"]
    assert f.feed(b",2*00\r", 0) == []  # half a delimiter waits
    assert f.feed(b"\nrest", 0) == [b"$GPRMC,2*00"]
    assert f.feed(b"\r\r\n", 0) == [b"rest\r"]  # a lone CR is data
    assert (f.errors, f.discarded) == (0, 0)


def test_delimiter_overlong_frame_is_one_error_and_dropped_to_the_next_delimiter() -> None:
    f = DelimiterFramer(b"\n", 8)
    assert f.feed(b"12345678\n", 0) == [b"12345678"]  # exactly max_frame: fine
    assert f.feed(b"123456789", 0) == []  # cannot end within 8 bytes: overlong now
    assert f.errors == 1 and "exceeds max_frame 8" in f.last_error
    assert f.feed(b"more garbage without end" * 100, 0) == []
    assert f.errors == 1  # one frame, one error, however long it runs
    assert f.feed(b"tail\nok\n", 0) == [b"ok"]
    assert f.errors == 1
    assert f.discarded == 9 + 2400 + 5  # the whole overlong frame and its delimiter


def test_delimiter_overlong_frame_in_one_read() -> None:
    f = DelimiterFramer(b"\r\n", 4)
    assert f.feed(b"abcde\r\nabcd\r\n", 0) == [b"abcd"]
    assert (f.errors, f.discarded) == (1, 7)


def test_delimiter_memory_stays_bounded_on_endless_garbage() -> None:
    f = DelimiterFramer(b"\r\n", 64)
    for _ in range(1000):
        f.feed(b"x" * 1000 + b"\r", 0)
    assert len(f._buf) < 64 + 2 and f.errors == 1
    assert f.feed(b"\nok\r\n", 0) == [b"ok"]


def test_delimiter_bytes() -> None:
    assert delimiter_bytes("\r\n") == b"\r\n"
    assert delimiter_bytes("\u0003") == b"\x03"
    assert delimiter_bytes("\u00ff") == b"\xff"
    with pytest.raises(ValueError, match="must not be empty"):
        delimiter_bytes("")
    with pytest.raises(ValueError, match="U\\+20AC"):
        delimiter_bytes("€")


def split_model(stream: bytes, d: bytes, max_frame: int) -> tuple[list[bytes], int]:
    """Frames and errors by an independent rule: split the whole stream at once."""
    pieces = stream.split(d)
    complete, last = pieces[:-1], pieces[-1]
    frames = [p for p in complete if 0 < len(p) <= max_frame]
    errors = sum(len(p) > max_frame for p in complete) + (len(last) >= max_frame + len(d))
    return frames, errors


stream_parts = st.lists(
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from([b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"\x03"]),
        st.binary(min_size=20, max_size=80),
    ),
    max_size=25,
)


@PROPS
@given(
    parts=stream_parts,
    d=st.sampled_from([b"\n", b"\r\n", b"\x03", b"ab", b"aab", b"\r\n\r"]),
    max_frame=st.integers(1, 40),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_delimiter_frames_do_not_depend_on_reads(
    parts: list[bytes], d: bytes, max_frame: int, cuts: list[int]
) -> None:
    stream = b"".join(parts)
    whole = outcome(DelimiterFramer(d, max_frame), [stream])
    chunked = outcome(DelimiterFramer(d, max_frame), split_at(stream, cuts))
    bytewise = outcome(DelimiterFramer(d, max_frame), [bytes([b]) for b in stream])
    assert whole == chunked == bytewise
    assert (whole[0], whole[1]) == split_model(stream, d, max_frame)


# --- fixed --------------------------------------------------------------------------------------


def test_fixed_frames() -> None:
    f = FixedFramer(4, 100)
    assert f.feed(b"abcdefg", 0) == [b"abcd"]
    assert f.feed(b"hij", 0) == [b"efgh"]
    assert f.feed(b"", 0) == []
    assert f.feed(b"klmnop", 0) == [b"ijkl", b"mnop"]


@pytest.mark.parametrize(
    ("length", "max_frame", "needle"),
    [(0, 10, "frame_length must be > 0"), (11, 10, "exceeds max_frame"), (1, 0, "max_frame")],
)
def test_fixed_refuses_bad_settings(length: int, max_frame: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        FixedFramer(length, max_frame)


@PROPS
@given(data=st.binary(max_size=300), k=st.integers(1, 20), cuts=st.lists(st.integers(0, 400)))
def test_fixed_frames_do_not_depend_on_reads(data: bytes, k: int, cuts: list[int]) -> None:
    want = [data[i : i + k] for i in range(0, len(data) - len(data) % k, k)]
    assert outcome(FixedFramer(k, 100), split_at(data, cuts)) == (want, 0, 0)


# --- length prefix -------------------------------------------------------------------------------


def prefixed(payload: bytes, *, sync: bytes = b"", nbytes: int = 1, order: str = "big",
             adjust: int = 0) -> bytes:
    """A frame: sync bytes, the length field (value = len(payload) - adjust), the payload."""
    value = len(payload) - adjust
    return sync + value.to_bytes(nbytes, order) + payload  # type: ignore[arg-type]


def test_length_prefix_includes_the_header() -> None:
    f = LengthPrefixFramer(0, 1, "big", 0, 64)
    assert f.feed(b"\x03abc\x00\x01", 0) == [b"\x03abc", b"\x00"]
    assert f.feed(b"z", 0) == [b"\x01z"]


def test_length_prefix_offset_two_bytes_little_and_adjust() -> None:
    # sync 0xAA 0x55, length (little endian) counts payload + 2-byte CRC: adjust = +2
    f = LengthPrefixFramer(2, 2, "little", 2, 64)
    frame = b"\xaa\x55" + struct.pack("<H", 3) + b"xyz" + b"\xc1\xc2"
    assert f.feed(frame[:5], 0) == []
    assert f.feed(frame[5:] + frame, 0) == [frame, frame]


def test_length_prefix_four_bytes_big() -> None:
    f = LengthPrefixFramer(0, 4, "big", 0, 64)
    assert f.feed(b"\x00\x00\x00\x02hi\x00\x00\x00\x00", 0) == [b"\x00\x00\x00\x02hi",
                                                                 b"\x00\x00\x00\x00"]


def test_length_prefix_implausible_length_hunts_byte_by_byte() -> None:
    f = LengthPrefixFramer(0, 1, "big", 0, 8)
    # 0xFF claims 255 bytes (> max_frame): not a frame start; neither is 0x10; 0x02 is
    garbage = b"\xff\x10"
    assert f.feed(garbage + b"\x02ok\x01!", 0) == [b"\x02ok", b"\x01!"]
    assert (f.errors, f.discarded) == (1, 2)  # one error for the run of bad headers
    assert "length field 255 at byte 0 makes a frame of 256 bytes" in f.last_error
    assert f.feed(b"\xee\x02ab", 0) == [b"\x02ab"]
    assert f.errors == 2


def test_length_prefix_negative_adjust_below_the_header_is_implausible() -> None:
    f = LengthPrefixFramer(0, 1, "big", -3, 16)
    assert f.feed(b"\x01\x07abcd", 0) == [b"\x07abcd"]  # 1 + 0x01 - 3 < 1: skipped
    assert f.errors == 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"length_bytes": 3}, "1, 2 or 4"),
        ({"order": "middle"}, "length_order"),
        ({"offset": -1}, "length_offset"),
        ({"offset": 10, "max_frame": 8}, "exceeds max_frame"),
    ],
)
def test_length_prefix_refuses_bad_settings(kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {"offset": 0, "length_bytes": 1, "order": "big", "adjust": 0,
                            "max_frame": 64}
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        LengthPrefixFramer(**args)


@PROPS
@given(
    payloads=st.lists(st.binary(max_size=30), max_size=12),
    nbytes=st.sampled_from([1, 2, 4]),
    order=st.sampled_from(["big", "little"]),
    adjust=st.integers(-2, 3),
    cuts=st.lists(st.integers(0, 1000), max_size=20),
)
def test_length_prefix_recovers_exactly_the_frames_sent(
    payloads: list[bytes], nbytes: int, order: str, adjust: int, cuts: list[int]
) -> None:
    payloads = [p for p in payloads if len(p) - adjust >= 0]
    frames = [prefixed(p, sync=b"\x7e", nbytes=nbytes, order=order, adjust=adjust)
              for p in payloads]
    framer = LengthPrefixFramer(1, nbytes, order, adjust, 64)  # type: ignore[arg-type]
    assert outcome(framer, split_at(b"".join(frames), cuts)) == (frames, 0, 0)


@PROPS
@given(
    stream=st.binary(max_size=400),
    offset=st.integers(0, 3),
    nbytes=st.sampled_from([1, 2, 4]),
    order=st.sampled_from(["big", "little"]),
    adjust=st.integers(-5, 5),
    max_frame=st.integers(8, 64),
    cuts=st.lists(st.integers(0, 1000), max_size=30),
)
def test_length_prefix_garbage_never_raises_or_depends_on_reads(
    *,
    stream: bytes, offset: int, nbytes: int, order: str, adjust: int, max_frame: int,
    cuts: list[int],
) -> None:
    def make() -> LengthPrefixFramer:
        return LengthPrefixFramer(offset, nbytes, order, adjust, max_frame)  # type: ignore[arg-type]

    whole = outcome(make(), [stream])
    assert whole == outcome(make(), split_at(stream, cuts))
    frames, _, discarded = whole
    assert all(offset + nbytes <= len(fr) <= max_frame for fr in frames)
    # every byte is a frame's, discarded, or waiting (at most one frame's worth)
    assert len(stream) - sum(map(len, frames)) - discarded < max_frame


# --- idle ---------------------------------------------------------------------------------------


def test_idle_gap_ends_a_frame() -> None:
    f = IdleFramer(0.02, 100)
    assert f.feed(b"abc", 1.0) == []
    assert f.feed(b"def", 1.01) == []  # 10 ms later: same frame
    assert f.deadline() == pytest.approx(1.03)
    assert f.flush(1.029) == []
    assert f.flush(1.03) == [b"abcdef"]
    assert f.deadline() is None and f.flush(5.0) == []
    assert f.feed(b"x", 6.0) == []
    assert f.feed(b"y", 6.5) == [b"x"]  # the gap before "y" ends "x"
    assert f.flush(7.0) == [b"y"]


def test_idle_overlong_frame_dropped_to_the_next_gap() -> None:
    f = IdleFramer(0.02, 4)
    assert f.feed(b"abc", 0.0) == []
    assert f.feed(b"de", 0.001) == []  # 5 bytes without a gap
    assert f.errors == 1 and "without a gap" in f.last_error
    assert f.feed(b"more", 0.002) == []
    assert f.deadline() == pytest.approx(0.022)
    assert f.flush(0.03) == []  # the gap ends the dropped frame
    assert f.feed(b"ok", 0.05) == []
    assert f.flush(0.1) == [b"ok"]
    assert (f.errors, f.discarded) == (1, 9)


def test_idle_refuses_zero() -> None:
    with pytest.raises(ValueError, match="idle must be > 0"):
        IdleFramer(0.0, 10)


@PROPS
@given(
    events=st.lists(
        st.tuples(st.binary(min_size=1, max_size=12), st.sampled_from([0.0, 0.005, 0.05, 1.0])),
        max_size=20,
    ),
    max_frame=st.integers(1, 30),
    cuts=st.lists(st.integers(0, 100), max_size=5),
)
def test_idle_frames_follow_the_gaps(
    events: list[tuple[bytes, float]], max_frame: int, cuts: list[int]
) -> None:
    """Chunks arriving less than `idle` apart form one frame; cutting a chunk into several
    reads at the same time changes nothing."""
    idle = 0.02

    def run(split: bool) -> tuple[list[bytes], int, int]:
        f = IdleFramer(idle, max_frame)
        now, out = 0.0, []
        for data, gap in events:
            now += gap
            for piece in split_at(data, cuts) if split else [data]:
                out += f.feed(piece, now)
        out += f.flush(now + idle)
        return out, f.errors, f.discarded

    # the model: group chunks by gaps, then drop the overlong groups
    groups: list[bytes] = []
    for k, (data, gap) in enumerate(events):
        if k == 0 or gap >= idle:
            groups.append(data)
        else:
            groups[-1] += data
    want = [g for g in groups if len(g) <= max_frame]
    errors = sum(len(g) > max_frame for g in groups)
    got = run(split=False)
    assert (got[0], got[1]) == (want, errors)
    assert run(split=True) == got


# --- make_framer ---------------------------------------------------------------------------------


def test_make_framer_for_each_mode() -> None:
    assert isinstance(make_framer(SerialSource(port="/dev/x")), DelimiterFramer)
    d = make_framer(SerialSource(port="/dev/x", delimiter="\r\n"))
    assert isinstance(d, DelimiterFramer) and d.delimiter == b"\r\n"
    fx = make_framer(SerialSource(port="/dev/x", framing="fixed", frame_length=7))
    assert isinstance(fx, FixedFramer) and fx.frame_length == 7
    lp = make_framer(
        SerialSource(port="/dev/x", framing="length_prefix", length_offset=2, length_bytes=2,
                     length_order="little", length_adjust=-1, max_frame=300)
    )
    assert isinstance(lp, LengthPrefixFramer)
    assert (lp.offset, lp.length_bytes, lp.order, lp.adjust, lp.max_frame) == (
        2, 2, "little", -1, 300)
    idle = make_framer(SerialSource(port="/dev/x", framing="idle", idle=0.05))
    assert isinstance(idle, IdleFramer) and idle.idle == 0.05


def test_make_framer_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match="frame_length"):
        make_framer(SerialSource(port="/dev/x", framing="fixed"))
    with pytest.raises(ValueError, match="length_bytes"):
        make_framer(SerialSource(port="/dev/x", framing="length_prefix", length_bytes=3))
    with pytest.raises(ValueError, match="delimiter"):
        make_framer(SerialSource(port="/dev/x", delimiter=""))
