"""The issue's trial, end to end (issue #13, item 2): the daemon subprocess polls a TCP peer that
answers every request wrongly, in turn: another function code, unit id, transaction id, a byte
count that disagrees, a truncated frame, garbage after it. The device is bad, /metrics counts
each reason, the log has one line per reason and no traceback, and a stop is clean."""

from __future__ import annotations

import asyncio
import itertools
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.daemon import DaemonProcess, NotifySocket, http_get, metric, wait_until

pytestmark = [pytest.mark.system, pytest.mark.integration]

KINDS = ["function_code", "unit_id", "transaction_id", "byte_count", "truncated", "garbage"]


def bad_reply(request: bytes, kind: str) -> bytes:
    tid, unit, count = request[0:2], request[6], struct.unpack(">H", request[10:12])[0]
    fn = request[7]
    pdu = bytes([fn, 2 * count]) + b"\x00\x01" * count
    if kind == "function_code":
        pdu = bytes([fn ^ 0x07]) + pdu[1:]
    if kind == "byte_count":
        pdu = bytes([fn, 2 * count + 2]) + pdu[2:]
    if kind == "unit_id":
        unit ^= 0x10
    if kind == "transaction_id":
        tid = bytes([tid[0] ^ 0x40, tid[1]])
    frame = tid + b"\0\0" + struct.pack(">H", len(pdu) + 1) + bytes([unit]) + pdu
    if kind == "truncated":
        frame = frame[:-3]
    if kind == "garbage":
        frame += b"\xde\xad"
    return frame


class RawPeer:
    """A Modbus TCP peer on its own thread that answers each request with the next bad reply."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.kinds = itertools.cycle(KINDS)
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readexactly(7)
                    rest = await reader.readexactly(struct.unpack(">H", head[4:6])[0] - 1)
                    writer.write(bad_reply(head + rest, next(self.kinds)))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                writer.close()

        async def main() -> None:
            self.stop = asyncio.Event()
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await self.stop.wait()
            server.close()
            await server.wait_closed()

        self.loop.run_until_complete(main())
        self.loop.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)


@pytest.fixture
def peer() -> Iterator[RawPeer]:
    p = RawPeer()
    yield p
    p.close()


CONFIG = """
[daemon]
state_dir = "{state}"
[metrics]
port = {mport}
[sources.meter]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "0.1s"
timeout = "0.3s"
retries = 5
backoff_max = "0.2s"

[[sources.meter.registers]]
name = "energy"
function = "holding"
address = 0
"""


def test_a_peer_that_answers_wrongly_is_a_bad_device_never_a_traceback(
    tmp_path: Path, peer: RawPeer
) -> None:
    mport = free_port()
    cfg = tmp_path / "flux-edge.toml"
    cfg.write_text(CONFIG.format(state=tmp_path / "state", mport=mport, port=peer.port))
    notify = NotifySocket(tmp_path / "notify.sock")
    d = DaemonProcess(cfg, notify, extra_env={"FLUX_EDGE_LOG": "debug"})
    try:
        notify.wait_line("READY=1")

        def reasons() -> set[str]:
            _, body = http_get(f"http://127.0.0.1:{mport}/metrics")
            found = set()
            for kind in KINDS:
                try:
                    if metric(body, "flux_edge_device_failures_total", f'reason="{kind}"') > 0:
                        found.add(kind)
                except KeyError:
                    pass
            return found

        wait_until(lambda: reasons() == set(KINDS), timeout=30, what="every reason counted")
        _, body = http_get(f"http://127.0.0.1:{mport}/metrics")
        assert metric(body, "flux_edge_device_up", 'device="meter"') == 0
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        log = d.log_text()
        assert "Traceback" not in log, log[-3000:]
        lines = [ln for ln in log.splitlines() if "bad reply (" in ln]
        assert 1 <= len(lines) <= len(KINDS), lines  # one per reason (a minute apart at most)
        assert all("'meter'" in ln for ln in lines)
    finally:
        d.stop()
        notify.close()
