"""A baud-accurate RS-485 line on two pty pairs, and Modbus RTU slaves to put on it.

A pty moves bytes instantly, whatever baud rate is set on it, so RTU timing (character times,
inter-frame silence, how many transactions a line can carry) cannot be tested on a bare pty.
``SimulatedLine`` puts a relay between two pty pairs::

    master (the poller)                                       slaves (RtuSlaves)
    opens line.master_port  <-> pty A <-> relay thread <-> pty B <->  open line.slave_port

The relay forwards every byte in both directions and delivers it one character time (start bit,
data bits, parity, stop bits at the baud rate) after the line became free for it, so a frame
takes on the "wire" exactly as long as on a real line. Like a UART with a receive FIFO it
hands bytes over in bursts (8 at a time, or after 4 idle characters), but the last byte of a
frame always at once, so frame ends, which is what Modbus RTU timing hangs on, are exact.
Both directions share one medium, as on two-wire RS-485: a byte sent while the other direction
is still transmitting is a collision (``collisions``). Every frame is recorded with its wire
start and end (``frames``): tests check inter-frame silences and that requests never overlap.
Not simulated: USB adapter latency (FTDI latency timer), line noise, local echo.

``RtuSlaves`` serves several Modbus unit ids on the slave end, like several devices on one bus:
it detects the end of a request by the spec's silence (3.5 characters, 1.75 ms above 19200
baud), checks the CRC and answers at once from its tables (function codes 1-6, 15, 16, with
exception responses for bad addresses). ``silence(unit, True)`` makes a unit stop answering
(a dead device); ``requests``/``request_count`` count what each unit was asked; ``log`` keeps
every request with its times; ``turnarounds`` measures how long the slave took beyond the
required silence (its own cost, which counts against the master's throughput).

Both run in threads of the calling process (select() sleeps to the microsecond, asyncio only
to the millisecond). ``serve(...)``/``LineProcess`` run a line and slaves in a child process
instead (rate measurements: no interpreter lock shared with the master under test).
``wire_problems`` lists every breach of "one request at a time, silence before every frame".
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import itertools
import multiprocessing
import multiprocessing.connection
import os
import select
import threading
import time
import tty
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["master", "slave"]


def char_time(baudrate: int, bytesize: int = 8, parity: str = "E", stopbits: int = 1) -> float:
    """Seconds per character: start bit + data bits + parity bit (unless N) + stop bits."""
    return (1 + bytesize + (0 if parity == "N" else 1) + stopbits) / baudrate


def frame_gap(baudrate: int, bytesize: int = 8, parity: str = "E", stopbits: int = 1) -> float:
    """The RTU inter-frame silence: 3.5 characters, 1.75 ms above 19200 baud."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time(baudrate, bytesize, parity, stopbits)


@dataclass
class WireFrame:
    """A burst of characters one side sent, as it was on the wire (monotonic clock)."""

    direction: Direction  # who sent it
    start: float  # the first start bit
    end: float  # the last stop bit
    data: bytearray = field(default_factory=bytearray)


def fine_timer_slack() -> None:
    """Linux lets a thread's timed sleeps end up to 50 us late by default (timer slack); ask
    for 1 us on the calling thread, so the simulated line and slaves keep time."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in nanoseconds


def _raw_pty() -> tuple[int, int, str]:
    """A pty pair in raw mode: (master fd, slave fd, slave path). The master fd is non-blocking."""
    master, slave = os.openpty()
    tty.setraw(slave)
    flags = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return master, slave, os.ttyname(slave)


class SimulatedLine:
    """An RS-485 line with real character timing between ``master_port`` and ``slave_port``."""

    def __init__(
        self, baudrate: int, bytesize: int = 8, parity: str = "E", stopbits: int = 1
    ) -> None:
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity = parity
        self.stopbits = stopbits
        self.char_time = char_time(baudrate, bytesize, parity, stopbits)
        self.gap = frame_gap(baudrate, bytesize, parity, stopbits)
        self.frames: list[WireFrame] = []
        self.collisions = 0  # characters sent while the other side was transmitting
        # when the last character each side sent leaves the wire (monotonic): what a device's
        # silence timer (a hardware timer in a real slave's UART) starts from
        self.sent_end: dict[Direction, float] = {"master": 0.0, "slave": 0.0}
        self.dropped = 0  # characters the receiving pty could not take (nobody reading)
        self.record = True  # keep ``frames`` (turn off for long benchmarks)
        # Received bytes are handed over like a UART's: in bursts of ``fifo`` (its trigger
        # level), after 4 idle characters, and at once at the end of a burst. 1: byte by byte.
        self.fifo = 8
        self._fds: list[int] = []
        self._a = self._b = -1  # pty masters: A faces the master, B the slaves
        self.master_port = self.slave_port = ""
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- lifecycle --

    def start(self) -> SimulatedLine:
        if self._thread is not None:
            return self
        self._a, a_slave, self.master_port = _raw_pty()
        self._b, b_slave, self.slave_port = _raw_pty()
        self._wake_r, self._wake_w = os.pipe()
        # The slave ends stay open here too, so the relay never reads EIO while a side is closed.
        self._fds = [self._a, a_slave, self._b, b_slave, self._wake_r, self._wake_w]
        self._stop = False
        self._thread = threading.Thread(target=self._relay, name="rs485-line", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        thread.join(5)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> SimulatedLine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> SimulatedLine:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- what the wire saw --

    def frames_from(self, direction: Direction) -> list[WireFrame]:
        return [f for f in list(self.frames) if f.direction == direction]

    def wire_time(self, nbytes: int) -> float:
        return nbytes * self.char_time

    # -- the relay --

    def _relay(self) -> None:
        fine_timer_slack()
        a, b, ct = self._a, self._b, self.char_time
        other = {a: b, b: a}
        who: dict[int, Direction] = {a: "master", b: "slave"}
        pending: dict[int, collections.deque[tuple[float, int]]] = {
            a: collections.deque(),
            b: collections.deque(),
        }
        busy_until = {a: 0.0, b: 0.0}  # end of the last character scheduled from each side
        current: dict[int, WireFrame | None] = {a: None, b: None}
        fifo, fifo_timeout = max(1, self.fifo), 4 * ct
        while not self._stop:
            now = time.monotonic()
            wake = now + 0.5
            for src, queue in pending.items():
                if not queue:
                    continue
                # Like a UART: hand over what has arrived when the FIFO trigger level is
                # reached, when the oldest byte has waited 4 characters, or (an ideal UART)
                # at once when the last byte of the burst has arrived: frame ends are exact.
                trigger = queue[min(fifo, len(queue)) - 1][0]
                due = min(queue[-1][0], trigger, queue[0][0] + fifo_timeout)
                if due <= now:
                    out = bytearray()
                    while queue and queue[0][0] <= now:
                        out.append(queue.popleft()[1])
                    self._deliver(other[src], bytes(out))
                    if queue:
                        trigger = queue[min(fifo, len(queue)) - 1][0]
                        due = min(queue[-1][0], trigger, queue[0][0] + fifo_timeout)
                if queue:
                    wake = min(wake, due)
            timeout = max(0.0, wake - time.monotonic())
            try:
                ready, _, _ = select.select([a, b, self._wake_r], [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in ready:
                if fd == self._wake_r:
                    continue
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                except OSError as exc:  # EIO: no one has the slave end open (cannot happen here)
                    if exc.errno == errno.EIO:
                        continue
                    raise
                frame = current[fd]
                if frame is None or now > frame.end + 1.5 * ct:
                    frame = WireFrame(who[fd], max(now, busy_until[fd]), 0.0)
                    current[fd] = frame
                    if self.record:
                        self.frames.append(frame)
                for byte in data:
                    start = max(now, busy_until[fd])
                    if start < busy_until[other[fd]]:
                        self.collisions += 1
                    busy_until[fd] = start + ct
                    pending[fd].append((start + ct, byte))
                    frame.data.append(byte)
                frame.end = busy_until[fd]
                self.sent_end[who[fd]] = busy_until[fd]

    def _deliver(self, fd: int, data: bytes) -> None:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        self.dropped += len(data) - n


# --- Modbus RTU slaves --------------------------------------------------------------------------


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc16_table()


def crc16(data: bytes) -> bytes:
    """Modbus CRC-16 (initial 0xFFFF, polynomial 0xA001), low byte first as on the wire."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc.to_bytes(2, "little")


@dataclass
class SlaveRequest:
    """One request the slaves received (slave-side monotonic times)."""

    unit: int
    function: int
    first: float  # first byte arrived
    last: float  # last byte arrived
    answered: bool = False
    reply_at: float = 0.0  # when the response was handed to the line
    reply_bytes: int = 0


@dataclass
class _Unit:
    size: int
    coil: list[bool] = field(init=False)
    discrete: list[bool] = field(init=False)
    holding: list[int] = field(init=False)
    input: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.coil = [False] * self.size
        self.discrete = [False] * self.size
        self.holding = [0] * self.size
        self.input = [0] * self.size


Table = Literal["coil", "discrete", "holding", "input"]


class RtuSlaves:
    """Several Modbus RTU slaves (unit ids) answering on one port (``line.slave_port``).

    ``gap``: the silence that ends a request (default: the line's 3.5 characters);
    ``turnaround``: extra delay before answering (a slow device), default none.
    """

    def __init__(
        self,
        port: str,
        units: Iterable[int],
        *,
        gap: float,
        size: int = 1024,
        turnaround: float = 0.0,
    ) -> None:
        self.port = port
        self.units = tuple(units)
        self.gap = gap
        self.turnaround = turnaround
        self.line: SimulatedLine | None = None  # set by ``on``: wire times from the relay
        self.size = size
        self._tables = {u: _Unit(size) for u in self.units}
        self.silent: set[int] = set()
        self.requests: collections.Counter[tuple[int, int]] = collections.Counter()
        self.log: list[SlaveRequest] = []
        self.turnarounds: list[float] = []  # seconds beyond gap + turnaround, per answer
        self.crc_errors = 0
        self.keep_log = True
        self._fd = -1
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stop = False
        self._lock = threading.Lock()

    @classmethod
    def on(cls, line: SimulatedLine, units: Iterable[int], **kw: Any) -> RtuSlaves:
        """Slaves on ``line``: they time the silence after a request from the moment its last
        character left the wire (as a slave's hardware timer would), not from the moment the
        pty handed it over, so the relay's own latency does not count as their turnaround."""
        slaves = cls(line.slave_port, units, gap=line.gap, **kw)
        slaves.line = line
        return slaves

    # -- tables (thread-safe enough: single list item assignments under the GIL) --

    def _t(self, unit: int | None) -> _Unit:
        return self._tables[self.units[0] if unit is None else unit]

    def set_words(self, table: Table, address: int, words: Iterable[int], *, unit: int) -> None:
        t = self._t(unit)
        target: list[Any] = getattr(t, table)
        for i, w in enumerate(words):
            target[address + i] = bool(w) if table in ("coil", "discrete") else int(w) & 0xFFFF

    def set_holding(self, address: int, value: int, *, unit: int | None = None) -> None:
        self._t(unit).holding[address] = value & 0xFFFF

    def get_holding(self, address: int, *, unit: int | None = None) -> int:
        return self._t(unit).holding[address]

    def set_input(self, address: int, value: int, *, unit: int | None = None) -> None:
        self._t(unit).input[address] = value & 0xFFFF

    def set_coil(self, address: int, value: bool, *, unit: int | None = None) -> None:
        self._t(unit).coil[address] = bool(value)

    def get_coil(self, address: int, *, unit: int | None = None) -> bool:
        return self._t(unit).coil[address]

    def set_discrete(self, address: int, value: bool, *, unit: int | None = None) -> None:
        self._t(unit).discrete[address] = bool(value)

    def silence(self, unit: int, silent: bool = True) -> None:
        """A silent unit receives requests (they are counted) but never answers."""
        if silent:
            self.silent.add(unit)
        else:
            self.silent.discard(unit)

    def request_count(self, function: int | None = None, unit: int | None = None) -> int:
        with self._lock:
            items = list(self.requests.items())
        return sum(
            n
            for (u, fn), n in items
            if (function is None or fn == function) and (unit is None or u == unit)
        )

    # -- lifecycle --

    def start(self) -> RtuSlaves:
        if self._thread is not None:
            return self
        self._fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._fd)
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="rtu-slaves", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        thread.join(5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> RtuSlaves:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> RtuSlaves:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- serving --

    def _serve(self) -> None:
        fine_timer_slack()
        buf = bytearray()
        first = last = 0.0
        line = self.line

        def silent_since() -> float:
            return line.sent_end["master"] if line is not None else last

        while not self._stop:
            timeout = max(0.0, silent_since() + self.gap - time.monotonic()) if buf else 0.5
            try:
                ready, _, _ = select.select([self._fd, self._wake_r], [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            if self._fd in ready:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(self._fd, 4096)
                    if not buf:
                        first = now
                    buf += data
                    last = now
                continue
            end = silent_since()
            if buf and now >= end + self.gap:  # the silence ends the frame
                frame = bytes(buf)
                buf.clear()
                self._handle(frame, first, last, end)

    def _handle(self, frame: bytes, first: float, last: float, end: float) -> None:
        if len(frame) < 4 or crc16(frame[:-2]) != frame[-2:]:
            self.crc_errors += 1
            return
        unit, pdu = frame[0], frame[1:-2]
        if unit not in self._tables:
            return  # another slave's address: not ours
        req = SlaveRequest(unit, pdu[0], first, last)
        with self._lock:
            self.requests[(unit, pdu[0])] += 1
            if self.keep_log:
                self.log.append(req)
        if unit in self.silent:
            return
        reply = self._respond(self._tables[unit], pdu)
        if self.turnaround > 0:
            time.sleep(max(0.0, end + self.gap + self.turnaround - time.monotonic()))
        adu = bytes([unit]) + reply
        adu += crc16(adu)
        now = time.monotonic()
        with contextlib.suppress(BlockingIOError):
            os.write(self._fd, adu)
        req.answered, req.reply_at, req.reply_bytes = True, now, len(adu)
        self.turnarounds.append(now - (end + self.gap + self.turnaround))

    def _respond(self, t: _Unit, pdu: bytes) -> bytes:
        fn = pdu[0]

        def exc(code: int) -> bytes:
            return bytes([fn | 0x80, code])

        if fn not in (1, 2, 3, 4, 5, 6, 15, 16) or len(pdu) < 5:
            return exc(1)
        address = int.from_bytes(pdu[1:3], "big")
        arg = int.from_bytes(pdu[3:5], "big")
        if fn in (1, 2):
            if not 1 <= arg <= 2000:
                return exc(3)
            if address + arg > self.size:
                return exc(2)
            bits = (t.coil if fn == 1 else t.discrete)[address : address + arg]
            packed = bytearray((arg + 7) // 8)
            for i, bit in enumerate(bits):
                if bit:
                    packed[i // 8] |= 1 << (i % 8)
            return bytes([fn, len(packed)]) + bytes(packed)
        if fn in (3, 4):
            if not 1 <= arg <= 125:
                return exc(3)
            if address + arg > self.size:
                return exc(2)
            words = (t.holding if fn == 3 else t.input)[address : address + arg]
            return bytes([fn, 2 * arg]) + b"".join(w.to_bytes(2, "big") for w in words)
        if address >= self.size:
            return exc(2)
        if fn == 5:
            if arg not in (0x0000, 0xFF00):
                return exc(3)
            t.coil[address] = arg == 0xFF00
            return pdu[:5]
        if fn == 6:
            t.holding[address] = arg
            return pdu[:5]
        count, data = arg, pdu[6:]
        if address + count > self.size:
            return exc(2)
        if fn == 15:
            for i in range(count):
                t.coil[address + i] = bool(data[i // 8] >> (i % 8) & 1)
        else:
            for i in range(count):
                t.holding[address + i] = int.from_bytes(data[2 * i : 2 * i + 2], "big")
        return pdu[:5]


# --- checks -------------------------------------------------------------------------------------


def wire_problems(line: SimulatedLine, slaves: RtuSlaves) -> list[str]:
    """Everything that broke "one request at a time, with the spec's silence before every
    frame", seen on the wire (the relay's record) and from the slaves' side. Empty: all good."""
    problems: list[str] = []
    if line.collisions:
        problems.append(f"{line.collisions} character(s) collided on the line")
    frames = list(line.frames)[:-1]  # the last one may be cut short by the end of a test
    if not frames:
        problems.append("nothing went over the line")
    for a, b in itertools.pairwise(frames):
        silence = b.start - a.end
        # every frame is preceded by at least 3.5 characters of silence (1.75 ms above 19200)
        if silence < line.gap * 0.999:
            problems.append(
                f"{silence * 1e3:.3f} ms of silence between a {a.direction} frame "
                f"{bytes(a.data).hex()} and a {b.direction} frame {bytes(b.data).hex()}"
            )
        if b.direction == "slave" and a.direction == "slave":
            problems.append(f"a slave spoke without being asked: {bytes(b.data).hex()}")
    # slaves' side: a request never arrives before the previous answer has left the line
    for prev, nxt in itertools.pairwise(list(slaves.log)):
        if prev.answered and nxt.first <= prev.reply_at + prev.reply_bytes * line.char_time:
            problems.append(f"request {nxt} arrived while the answer to {prev} was on the line")
        if nxt.first <= prev.last:
            problems.append(f"requests {prev} and {nxt} overlap")
    return problems


# --- a line and slaves in a child process -------------------------------------------------------


def _child(
    conn: multiprocessing.connection.Connection,
    line_args: tuple[int, int, str, int],
    units: tuple[int, ...],
    registers: int,
    record: bool,
) -> None:
    line = SimulatedLine(*line_args).start()
    line.record = record
    slaves = RtuSlaves.on(line, units)
    slaves.keep_log = record
    for u in units:
        slaves.set_words("holding", 0, [u * 1000 + i for i in range(registers)], unit=u)
    slaves.start()
    conn.send(line.master_port)
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "silence":
                slaves.silence(*arg)
                conn.send(None)
            elif cmd == "stats":
                conn.send(
                    {
                        "requests": dict(slaves.requests),
                        "turnarounds": list(slaves.turnarounds),
                        "collisions": line.collisions,
                        "crc_errors": slaves.crc_errors,
                        "log": [
                            (r.unit, r.function, r.first, r.last, r.answered)
                            for r in list(slaves.log)
                        ],
                        "problems": wire_problems(line, slaves) if record else [],
                    }
                )
            elif cmd == "reset":
                slaves.requests.clear()
                slaves.turnarounds.clear()
                conn.send(None)
            else:
                break
    except EOFError:
        pass
    finally:
        slaves.stop()
        line.stop()


class LineProcess:
    """A ``SimulatedLine`` with ``RtuSlaves`` (holding registers 0.. filled with unit*1000 + i)
    in a child process, so the master under test shares no interpreter lock with them;
    ``master_port`` is the port to open. Commands: ``silence(unit, on)``, ``stats()`` (request
    counts, turnarounds, and with ``record`` the slaves' log and ``wire_problems``),
    ``reset()``."""

    def __init__(
        self,
        baudrate: int,
        units: Iterable[int],
        *,
        bytesize: int = 8,
        parity: str = "E",
        stopbits: int = 1,
        registers: int = 125,
        record: bool = False,
    ) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child,
            args=(
                child, (baudrate, bytesize, parity, stopbits), tuple(units), registers, record
            ),
            daemon=True,
        )
        self._proc.start()
        self.master_port: str = self._conn.recv()
        self.baudrate, self.bytesize, self.parity, self.stopbits = (
            baudrate, bytesize, parity, stopbits
        )
        self.char_time = char_time(baudrate, bytesize, parity, stopbits)
        self.gap = frame_gap(baudrate, bytesize, parity, stopbits)

    def _ask(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def silence(self, unit: int, silent: bool = True) -> None:
        self._ask("silence", (unit, silent))

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._ask("stats")
        return result

    def reset(self) -> None:
        self._ask("reset")

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(("quit", None))
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


@contextlib.contextmanager
def serve(baudrate: int, units: Iterable[int], **kw: Any) -> Iterator[LineProcess]:
    proc = LineProcess(baudrate, units, **kw)
    try:
        yield proc
    finally:
        proc.close()
