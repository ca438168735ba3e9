"""Serial sources and the serial_write action over real pseudo-terminals.

A simulated device (tests/support/serial_device.py) sits on the master side of a pty; the code
under test opens the slave side with pyserial exactly as it opens a USB adapter. Covered: the
NMEA flow end to end through the compiled nmea0183 plugin, malformed input (bad checksums,
binary garbage, overlong lines) counted without stopping the source, every framing mode,
writes, a port that is missing, unplugged and plugged back, a port in use, a file that is no
serial port, and back-pressure from a slow pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_edge.actions.serial_write_kind import SerialWriteAction
from flux_edge.errors import ActionError, PluginError, SourceError
from flux_edge.model import KIND_BYTES, Command, Measurement, Quality, Reading
from flux_edge.plugins.host import PluginHost, PluginLimits
from flux_edge.plugins.tooling import build_plugin
from flux_edge.sources.serial import SerialReader, explain_open_error
from flux_edge.sources.serial_kind import SerialSource
from tests.support.serial_device import SerialDevice

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WAIT = 10.0  # generous upper bound for anything awaited; tests normally take milliseconds


def sentence(body: str) -> bytes:
    cs = functools.reduce(lambda acc, ch: acc ^ ord(ch), body, 0)
    return f"${body}*{cs:02X}\r\n".encode()


GGA = sentence("GNGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,")
RMC = sentence("GNRMC,092750.000,A,5321.6802,N,00630.3372,W,0.02,31.66,280511,,,A")
VTG = sentence("GNVTG,31.66,T,,M,0.02,N,0.04,K,A")
GSV = sentence("GPGSV,3,1,11,10,63,137,17,07,61,098,15,05,59,290,20,08,54,157,30")


class Sink:
    """The source's ``emit`` and ``on_status``, recorded, with waits instead of sleeps."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.status: list[tuple[str, Quality, str]] = []
        self._changed = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set to an unset Event, emit blocks on it

    async def emit(self, r: Reading) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.readings.append(r)
        self._changed.set()

    def on_status(self, device: str, quality: Quality, error: str) -> None:
        self.status.append((device, quality, error))
        self._changed.set()

    async def until(self, what: Callable[[], bool], within: float = WAIT) -> None:
        """Wait for ``what()``: woken by every reading and status change, and every 10 ms
        for conditions on the reader's own state (health, stats)."""
        async with asyncio.timeout(within):
            while not what():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await self._changed.wait()

    async def frames(self, n: int) -> list[bytes]:
        await self.until(lambda: len(self.readings) >= n)
        return [r.payload for r in self.readings]

    async def state(self, quality: Quality) -> str:
        await self.until(lambda: bool(self.status) and self.status[-1][1] == quality)
        return self.status[-1][2]


def run(coro: Coroutine[Any, Any, None], within: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(within):
            await coro

    asyncio.run(bounded())


class Readers:
    """Starts SerialReaders; cancels and closes them (checking that they stop) at exit."""

    def __init__(self) -> None:
        self.tasks: list[tuple[SerialReader, asyncio.Task[None]]] = []

    async def start(self, cfg: SerialSource, sink: Sink, name: str = "gps",
                    **kw: Any) -> SerialReader:
        kw.setdefault("backoff_min", 0.02)
        kw.setdefault("backoff_max", 0.1)
        reader = SerialReader(name, cfg, sink.emit, on_status=sink.on_status, **kw)
        self.tasks.append((reader, asyncio.create_task(reader.run())))
        return reader

    async def __aenter__(self) -> Readers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for reader, task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.done() and not reader.is_open
            await reader.close()


Body = Callable[[SerialDevice, Readers], Awaitable[None]]


def scenario(body: Body) -> None:
    """Run ``body(device, readers)`` with a plugged-in simulated device."""

    async def go() -> None:
        async with SerialDevice() as device, Readers() as readers:
            await body(device, readers)

    run(go())


async def opened(reader: SerialReader, sink: Sink) -> None:
    await sink.state("good")
    assert reader.is_open


# --- the NMEA flow, end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def nmea_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nmea") / "nmea0183.wasm"
    try:
        return build_plugin(REPO / "plugins" / "nmea0183", out)
    except PluginError as exc:
        if "not found" in str(exc) and not os.environ.get("CI"):
            pytest.skip(f"plugin toolchain missing: {exc}")
        raise


@pytest.fixture(scope="module")
def plugin_host() -> Iterator[PluginHost]:
    with PluginHost(None) as host:
        yield host


def test_nmea_sentences_from_a_device_become_measurements(
    plugin_host: PluginHost, nmea_wasm: Path
) -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        cfg = SerialSource(port=str(device.path), baudrate=9600, delimiter="\r\n", max_frame=128,
                           chain=("nmea0183",))
        reader = await readers.start(cfg, sink)
        await opened(reader, sink)
        # a receiver writes its burst of sentences; the reads cut it anywhere
        await device.send(GGA + RMC + GSV + VTG, chunk=7)
        frames = await sink.frames(4)
        assert frames == [s.rstrip(b"\r\n") for s in (GGA, RMC, GSV, VTG)]
        r0 = sink.readings[0]
        port = str(device.path)
        assert (r0.source, r0.device, r0.kind, r0.topic) == ("gps", "gps", KIND_BYTES, port)

        plugin = plugin_host.load("nmea0183", nmea_wasm, PluginLimits(timeout_s=5.0),
                                  {"source": {"name": "gps", "type": "serial", "device": "gps"}})
        records = plugin.process(sink.readings)
        ms = [r for r in records if isinstance(r, Measurement)]
        assert len(ms) == len(records)  # GSV is skipped, nothing failed
        by_name = {(m.name, m.unit): m.value for m in ms}
        assert by_name[("latitude", "°")] == pytest.approx(53.361336666)
        assert by_name[("longitude", "°")] == pytest.approx(-6.50562)
        assert by_name[("satellites", "")] == 8
        assert by_name[("fix_valid", "")] is True
        assert by_name[("speed_kmh", "km/h")] == 0.04
        assert all(m.device == "gps" and m.quality == "good" for m in ms)
        assert reader.health["gps"].polls == 4 and reader.health["gps"].total_errors == 0

    scenario(body)


def test_malformed_frames_are_counted_and_never_stop_the_source(
    plugin_host: PluginHost, nmea_wasm: Path
) -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        cfg = SerialSource(port=str(device.path), delimiter="\r\n", max_frame=96)
        reader = await readers.start(cfg, sink)
        await opened(reader, sink)
        wrong = b"00" if GGA[-4:-2] != b"00" else b"01"
        bad_checksum = GGA[:-4] + wrong + b"\r\n"
        garbage = bytes(range(256)) * 2  # binary noise (a wrong baud rate looks like this)
        overlong = b"$GPTXT," + b"A" * 300 + b"*00\r\n"
        await device.send(bad_checksum + garbage + b"\r\n" + overlong + GGA + RMC, chunk=13)
        await sink.until(lambda: any(r.payload == RMC.rstrip() for r in sink.readings))
        health = reader.health["gps"]
        # the overlong line, and the binary noise (its 512 bytes hold no CR LF), are framing
        # errors counted by the source; nothing of them reached the pipeline
        assert reader.stats.framing_errors == 2 and health.total_errors == 2
        assert "exceeds max_frame 96" in health.last_error
        assert all(len(r.payload) <= 96 for r in sink.readings)
        assert health.quality == "good" and reader.is_open
        plugin = plugin_host.load("nmea0183", nmea_wasm, PluginLimits(timeout_s=5.0), {})
        records = plugin.process(sink.readings)
        errors = [r.error for r in records if not isinstance(r, Measurement)]
        assert len(errors) == 1 and "checksum mismatch" in errors[0]
        names = [r.name for r in records if isinstance(r, Measurement)]
        assert names.count("latitude") == 2  # the GGA and the RMC after the noise
        # the source carries on
        await device.send(VTG)
        await sink.until(lambda: sink.readings[-1].payload == VTG.rstrip())

    scenario(body)


# --- framing modes over a real pty ----------------------------------------------------------


def test_delimiter_framing() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        reader = await readers.start(SerialSource(port=str(device.path), delimiter="\u0003"), sink)
        await opened(reader, sink)
        await device.send(b"\x02A1\x03\x02B22\x03\x03\x02C333\x03", chunk=2)
        assert await sink.frames(3) == [b"\x02A1", b"\x02B22", b"\x02C333"]

    scenario(body)


def test_fixed_framing() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        cfg = SerialSource(port=str(device.path), framing="fixed", frame_length=5)
        reader = await readers.start(cfg, sink)
        await opened(reader, sink)
        await device.send(bytes(range(17)), chunk=3)
        want = [bytes(range(0, 5)), bytes(range(5, 10)), bytes(range(10, 15))]
        assert await sink.frames(3) == want

    scenario(body)


def test_length_prefix_framing() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        # a sync byte, a 2-byte little-endian length of the payload, the payload, a 1-byte check
        cfg = SerialSource(port=str(device.path), framing="length_prefix", length_offset=1,
                           length_bytes=2, length_order="little", length_adjust=1, max_frame=64)
        reader = await readers.start(cfg, sink)
        await opened(reader, sink)

        def frame(payload: bytes) -> bytes:
            return b"\xaa" + len(payload).to_bytes(2, "little") + payload + b"\x5a"

        frames = [frame(b"hello"), frame(b""), frame(bytes(40))]
        noise = b"\xaa\xff\xff"  # a header claiming 65536 bytes: hunted past, counted
        await device.send(frames[0] + noise + frames[1] + frames[2], chunk=4)
        assert await sink.frames(3) == frames
        assert reader.stats.framing_errors == 1 and reader.health["gps"].total_errors == 1

    scenario(body)


def test_idle_framing() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        cfg = SerialSource(port=str(device.path), framing="idle", idle=0.15)
        reader = await readers.start(cfg, sink)
        await opened(reader, sink)
        # each frame in small pieces 2 ms apart; 0.4 s of silence between frames
        await device.send(b"first frame", chunk=3, gap=0.002)
        assert await sink.frames(1) == [b"first frame"]
        await asyncio.sleep(0.25)
        await device.send(b"second", chunk=2, gap=0.002)
        await asyncio.sleep(0.4)
        await device.send(b"third", chunk=1, gap=0.002)
        assert await sink.frames(3) == [b"first frame", b"second", b"third"]

    scenario(body)


# --- writes ---------------------------------------------------------------------------------


def command() -> Command:
    return Command(rule="r", action="a", ts=1.0)


def test_serial_write_reaches_the_device() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        from flux_edge.actions.serial_write import SerialWriteExecutor

        sink = Sink()
        reader = await readers.start(SerialSource(port=str(device.path)), sink, name="relay")
        await opened(reader, sink)
        text = SerialWriteExecutor(
            "on", SerialWriteAction(source="relay", data="RELAY 1 ON\r\n"), reader, wall=lambda: 5.0
        )
        hexa = SerialWriteExecutor(
            "poll", SerialWriteAction(source="relay", data="01 03 00 0a\t000163C8", encoding="hex"),
            reader,
        )
        out = await text.execute(command())
        assert out.ok and out.error == "" and out.ts == 5.0 and 0 < out.latency_s < WAIT
        assert await device.wait_received(12) == b"RELAY 1 ON\r\n"
        assert (await hexa.execute(command())).ok
        want = b"RELAY 1 ON\r\n" + bytes.fromhex("0103000a000163c8")
        assert await device.wait_received(20) == want
        # concurrent writes are serialised, never interleaved
        big = SerialWriteExecutor("big", SerialWriteAction(source="relay", data="x" * 3000), reader)
        results = await asyncio.gather(big.execute(command()), text.execute(command()),
                                       big.execute(command()))
        assert all(r.ok for r in results)
        received = (await device.wait_received(20 + 6012))[20:]
        assert sorted([received[:3000], received[3000:3012], received[3012:]]) == sorted(
            [b"x" * 3000, b"RELAY 1 ON\r\n", b"x" * 3000])
        assert reader.stats.writes == 5

    scenario(body)


def test_serial_write_to_a_port_that_is_not_open_is_a_failed_outcome(tmp_path: Path) -> None:
    from flux_edge.actions.serial_write import SerialWriteExecutor

    async def go() -> None:
        sink = Sink()
        async with Readers() as readers:
            reader = await readers.start(SerialSource(port=str(tmp_path / "ttyNONE")), sink)
            await sink.state("bad")
            ex = SerialWriteExecutor("ping", SerialWriteAction(source="gps", data="?\r\n"), reader)
            out = await ex.execute(command())
        assert not out.ok and out.latency_s >= 0
        assert "sending 3f 0d 0a failed" in out.error and "is not open" in out.error
        assert "does not exist" in out.error  # why it is not open

    run(go())


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("01 0G", "'G' at character 5"),
        ("01 0", "odd number of hex digits (3)"),
        ("", "data is empty"),
        ("   ", "data is empty"),
    ],
)
def test_serial_write_refuses_bad_hex_when_built(data: str, needle: str) -> None:
    from flux_edge.actions.serial_write import SerialWriteExecutor, parse_write_data

    cfg = SerialWriteAction(source="s", data=data, encoding="hex")
    with pytest.raises(ActionError, match="action 'x'") as info:
        SerialWriteExecutor("x", cfg, None)  # type: ignore[arg-type]
    assert needle in str(info.value)
    with pytest.raises(ValueError, match=needle.split("(", maxsplit=1)[0].strip()):
        parse_write_data(data, "hex")
    assert parse_write_data("0a0B", "hex") == b"\n\x0b"
    assert parse_write_data("é\r\n", "text") == "é\r\n".encode()


def test_a_write_that_cannot_finish_times_out() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        reader = await readers.start(SerialSource(port=str(device.path)), sink)
        await opened(reader, sink)
        # the device stops reading (flow control): the pty's buffer fills up and the write blocks
        asyncio.get_running_loop().remove_reader(device._master)  # type: ignore[arg-type]
        with pytest.raises(SourceError, match=r"took longer than 0.3 s \(\d+ sent"):
            await reader.write(b"z" * 1_000_000, timeout=0.3)

    scenario(body)


# --- the port: missing, unplugged, busy, not a tty -------------------------------------------


def test_missing_port_recovers_when_it_appears_and_after_an_unplug(tmp_path: Path) -> None:
    link = tmp_path / "ttyGPS"  # like /dev/serial/by-id/usb-...

    async def go() -> None:
        dev = SerialDevice(link=link)
        sink = Sink()
        async with Readers() as readers:
            reader = await readers.start(SerialSource(port=str(link), delimiter="\r\n"), sink)
            error = await sink.state("bad")
            assert f"port {link} does not exist: is the device plugged in?" in error
            health = reader.health["gps"]
            await sink.until(lambda: health.consecutive_errors >= 2)  # it keeps trying
            assert health.quality == "bad" and not reader.is_open

            dev.plug()
            try:
                await opened(reader, sink)
                assert health.quality == "good" and health.consecutive_errors == 0
                await dev.send(GGA)
                assert (await sink.frames(1))[-1] == GGA.rstrip()

                dev.unplug()  # the adapter is pulled out
                error = await sink.state("bad")
                assert "hung up" in error or "failed while reading" in error
                assert not reader.is_open

                dev.plug()  # ... and plugged back in: a new pty behind the same name
                await opened(reader, sink)
                await dev.send(RMC)
                assert (await sink.frames(2))[-1] == RMC.rstrip()
                assert [q for _, q, _ in sink.status] == ["bad", "good", "bad", "good"]
                assert reader.stats.opens == 2
            finally:
                dev.unplug()

    run(go())


def test_a_port_in_use_is_reported() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        first, second = Sink(), Sink()
        cfg = SerialSource(port=str(device.path))
        await opened(await readers.start(cfg, first, name="a"), first)
        await readers.start(cfg, second, name="b")
        error = await second.state("bad")
        assert "is in use by another program" in error and str(device.path) in error

    scenario(body)


def test_a_file_that_is_not_a_serial_port(tmp_path: Path) -> None:
    path = tmp_path / "not-a-tty"
    path.write_bytes(b"")

    async def go() -> None:
        sink = Sink()
        async with Readers() as readers:
            await readers.start(SerialSource(port=str(path)), sink)
            assert "is not a serial port" in await sink.state("bad")

    run(go())


def test_open_errors_say_what_to_do() -> None:
    def oserror(code: int) -> OSError:
        return OSError(code, os.strerror(code))

    assert "add the service user to the dialout group" in explain_open_error(
        "/dev/ttyUSB0", oserror(errno.EACCES))
    assert "in use by another program" in explain_open_error("/dev/ttyUSB0", oserror(errno.EBUSY))
    assert "no device behind it" in explain_open_error("/dev/ttyUSB0", oserror(errno.ENXIO))
    assert "does not exist" in explain_open_error("/dev/ttyUSB0", oserror(errno.ENOENT))


def test_bad_framing_settings_are_refused_when_built() -> None:
    async def emit(r: Reading) -> None: ...

    with pytest.raises(SourceError, match="invalid framing settings: frame_length"):
        SerialReader("s", SerialSource(port="/dev/x", framing="fixed"), emit)


# --- back-pressure and shutdown --------------------------------------------------------------


def test_a_slow_pipeline_loses_nothing() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        sink.gate = asyncio.Event()  # the pipeline is stuck
        reader = await readers.start(SerialSource(port=str(device.path), delimiter="\r\n"), sink)
        await opened(reader, sink)
        # 400 KB: more than the reader buffers before it stops reading (256 KiB)
        lines = [f"line {k:06d}".encode() for k in range(30000)]
        data = b"".join(x + b"\r\n" for x in lines)
        sender = asyncio.create_task(device.send(data, chunk=4096))
        await sink.until(lambda: reader._paused)  # reading paused: the kernel holds the rest
        await asyncio.sleep(0.1)
        assert sink.readings == [] and not sender.done()  # the device waits (flow control)
        assert reader._pending < 300 * 1024
        released = time.time()
        sink.gate.set()  # the pipeline catches up
        await sender
        assert await sink.frames(30000) == lines
        # a reading's ts is when its bytes arrived, not when the pipeline took it
        assert sink.readings[5000].ts < released - 0.08  # buffered while the pipeline was stuck
        assert reader.health["gps"].total_errors == 0

    scenario(body)


def test_close_ends_run_and_releases_the_port() -> None:
    async def body(device: SerialDevice, readers: Readers) -> None:
        sink = Sink()
        reader = SerialReader("gps", SerialSource(port=str(device.path)), sink.emit,
                              on_status=sink.on_status)
        task = asyncio.create_task(reader.run())
        await opened(reader, sink)
        await reader.close()
        async with asyncio.timeout(WAIT):
            await task  # returns
        assert not reader.is_open
        # the port is free again: another reader can have it
        other = Sink()
        again = await readers.start(SerialSource(port=str(device.path)), other, name="gps2")
        await opened(again, other)

    scenario(body)


# --- the daemon's pipeline: serial source -> nmea0183 -> rule -> serial_write ------------------

SITE = """
[daemon]
state_dir = "{state}"
plugin_dirs = ["{plugins}"]

[plugins.nmea0183]

[sources.gps]
type = "serial"
port = "{port}"
baudrate = 9600
delimiter = "\\r\\n"
max_frame = 128
chain = ["nmea0183"]

[rules.fix_lost]
when = "fix_valid == false"
inputs = {{ fix_valid = "bool" }}
actions = ["poll"]

[actions.poll]
type = "serial_write"
source = "gps"
data = "$PUBX,00*33\\r\\n"
"""


def test_the_pipeline_reads_a_gps_and_writes_to_it_when_the_fix_is_lost(
    tmp_path: Path, nmea_wasm: Path
) -> None:
    from flux_edge.kinds import load_config_text
    from flux_edge.model import ErrorRecord, Outcome
    from flux_edge.runtime.daemon import run_pipeline
    from flux_edge.runtime.pipeline import Observers

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "nmea0183.wasm").write_bytes(nmea_wasm.read_bytes())
    link = tmp_path / "ttyGPS"
    fix = sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W")
    no_fix = sentence("GPRMC,123520,V,,,,,,,230394,,,N")

    async def go() -> None:
        async with SerialDevice(link=link) as dev:
            text = SITE.format(state=tmp_path / "state", plugins=plugins, port=link)
            config = load_config_text(text, str(tmp_path / "site.toml"))
            measurements: list[Measurement] = []
            errors: list[ErrorRecord] = []
            outcomes: list[Outcome] = []
            changed = asyncio.Event()

            def seen(_: str, ms: list[Measurement]) -> None:
                measurements.extend(ms)
                changed.set()

            def acted(o: Outcome) -> None:
                outcomes.append(o)
                changed.set()

            async def until(what: Callable[[], bool]) -> None:
                async with asyncio.timeout(WAIT):
                    while not what():
                        changed.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.01):
                                await changed.wait()

            stop = asyncio.Event()
            obs = Observers(measurements=[seen], errors=[errors.append], outcomes=[acted])
            holder: list[Any] = []
            runner = asyncio.create_task(
                run_pipeline(config, observers=obs, stop=stop, started=holder.append))
            try:
                await until(lambda: bool(holder) and holder[0].sources["gps"].is_open)
                await dev.send(b"$GPGSV,partial line from before\r\n" + fix)
                await until(lambda: any(m.name == "latitude" for m in measurements))
                assert not outcomes  # the fix is there: the rule stays quiet
                await dev.send(garbage_line() + no_fix)
                await until(lambda: bool(outcomes))
                assert outcomes[0].ok, outcomes[0].error
                assert await dev.wait_received(13) == b"$PUBX,00*33\r\n"
            finally:
                stop.set()
                await runner
            lat = [m for m in measurements if m.name == "latitude"]
            assert lat[0].value == pytest.approx(48.1173) and lat[0].device == "gps"
            valid = [m.value for m in measurements if m.name == "fix_valid"]
            assert valid == [True, False]
            # the partial first line and the noise are dead letters, nothing else
            assert len(errors) == 2 and all(e.source == "gps" for e in errors)
            health = holder[0].health()["gps"]["gps"]
            assert health.quality == "good" and health.polls == 4

    run(go())


def garbage_line() -> bytes:
    return b"\x00\xff\xfe noise \x1b[A\r\n"
