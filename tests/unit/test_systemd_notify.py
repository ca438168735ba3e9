"""The systemd notify adapter against a real AF_UNIX datagram socket, as systemd binds it.

``NotifyReceiver`` stands in for systemd: it binds the socket (a path or an abstract name) and a
thread records every datagram with the monotonic time it arrived. test_health.py uses it too.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flux_edge.runtime import systemd
from flux_edge.runtime.systemd import Notifier


class NotifyReceiver:
    """systemd's end of NOTIFY_SOCKET: records (arrival time, datagram text)."""

    def __init__(self, address: str) -> None:
        self.address = address  # what goes into NOTIFY_SOCKET
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._cursor = 0  # messages already returned by next_text
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode("utf-8")))
                self._cond.notify_all()

    def texts(self) -> list[str]:
        with self._cond:
            return [text for _, text in self.messages]

    def wait(self, done: Callable[[list[str]], bool], timeout: float = 5.0) -> list[str]:
        """Block until ``done(texts)`` holds; fail the test after ``timeout`` seconds."""
        with self._cond:
            ok = self._cond.wait_for(lambda: done([t for _, t in self.messages]), timeout)
            texts = [t for _, t in self.messages]
        assert ok, f"timed out waiting; received so far: {texts}"
        return texts

    def next_text(self, timeout: float = 5.0) -> str:
        """The next datagram not yet returned by next_text (it may have arrived already)."""
        n = self._cursor
        text = self.wait(lambda t: len(t) > n, timeout)[n]
        self._cursor = n + 1
        return text

    def close(self) -> None:
        self._stop = True
        self._thread.join(2.0)
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    r = NotifyReceiver(str(tmp_path / "notify"))
    yield r
    r.close()


def env_for(r: NotifyReceiver, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": r.address, **extra}


def test_every_message_is_sent_exactly(receiver: NotifyReceiver) -> None:
    n = Notifier(env_for(receiver))
    assert n.enabled and n.watchdog_interval is None
    n.ready()
    assert receiver.next_text() == "READY=1"
    n.ready("running: 3 sources")
    assert receiver.next_text() == "READY=1\nSTATUS=running: 3 sources"
    n.watchdog()
    assert receiver.next_text() == "WATCHDOG=1"
    n.status("12 msg/s, outbox 0")
    assert receiver.next_text() == "STATUS=12 msg/s, outbox 0"
    n.extend_timeout(2.5)
    assert receiver.next_text() == "EXTEND_TIMEOUT_USEC=2500000"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    text = receiver.next_text()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", text)
    assert m, text
    assert before <= int(m.group(1)) <= after
    n.stopping()
    assert receiver.next_text() == "STOPPING=1"
    n.stopping("draining 120 queued messages")
    assert receiver.next_text() == "STOPPING=1\nSTATUS=draining 120 queued messages"
    n.close()
    n.watchdog()  # reconnects after close
    assert receiver.next_text() == "WATCHDOG=1"


def test_status_is_one_trimmed_line_of_utf8(receiver: NotifyReceiver) -> None:
    n = Notifier(env_for(receiver))
    n.status("config invalid:\n  line 3:\tbad key  ")
    assert receiver.next_text() == "STATUS=config invalid: line 3: bad key"
    n.status("température 81 °C " + "x" * 500)
    text = receiver.next_text()
    status = text.removeprefix("STATUS=")
    assert status.startswith("température 81 °C x") and status.endswith("…")
    assert len(status) == systemd.STATUS_MAX
    n.ready("a\nREADY=0")  # a status cannot smuggle in a second assignment
    assert receiver.next_text() == "READY=1\nSTATUS=a READY=0"


def test_abstract_socket() -> None:
    r = NotifyReceiver(f"@flux-test-{uuid.uuid4().hex}")
    try:
        n = Notifier({"NOTIFY_SOCKET": r.address})
        n.ready("abstract")
        assert r.next_text() == "READY=1\nSTATUS=abstract"
        n.watchdog()
        assert r.next_text() == "WATCHDOG=1"
    finally:
        r.close()


def test_default_env_is_os_environ_and_left_alone(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    assert n.enabled and n.watchdog_interval == 2.0
    n.ready()
    assert receiver.next_text() == "READY=1"
    assert os.environ["NOTIFY_SOCKET"] == receiver.address
    assert os.environ["WATCHDOG_USEC"] == "2000000"
    assert os.environ["WATCHDOG_PID"] == str(os.getpid())


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for env in ({}, {"WATCHDOG_USEC": "300000"}, {"NOTIFY_SOCKET": ""}, None):
        n = Notifier(env)
        assert not n.enabled
        assert n.watchdog_interval is None  # nobody would receive the pings
        n.ready("x")
        n.reloading()
        n.status("x")
        n.watchdog()
        n.extend_timeout(1)
        n.stopping("x")
        assert n._link is None  # never even opened a socket


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "300000"}, 0.3),
        ({"WATCHDOG_USEC": "300000", "WATCHDOG_PID": "<me>"}, 0.3),
        ({"WATCHDOG_USEC": "300000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "3s"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    receiver: NotifyReceiver, extra: dict[str, str], interval: float | None
) -> None:
    if extra.get("WATCHDOG_PID") == "<me>":
        extra = {**extra, "WATCHDOG_PID": str(os.getpid())}
    assert os.getpid() != 1
    assert Notifier(env_for(receiver, **extra)).watchdog_interval == interval


def test_missing_socket_is_logged_once_never_raised_and_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_edge.systemd")
    path = tmp_path / "later"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert n.enabled
    for _ in range(20):
        n.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert str(path) in warnings[0].getMessage()
    assert "No such file or directory" in warnings[0].getMessage()
    r = NotifyReceiver(str(path))  # systemd's socket appears
    try:
        n.status("back")
        assert r.next_text() == "STATUS=back"
        assert "works again after 21 failed attempts" in caplog.text
    finally:
        r.close()


def test_receiver_gone_after_connect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = NotifyReceiver(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": r.address})
    n.ready()
    assert r.next_text() == "READY=1"
    r.close()
    os.unlink(r.address)
    n.watchdog()
    n.watchdog()
    assert "cannot send to the systemd notify socket" in caplog.text
    assert caplog.text.count("systemd notify socket") == 1


def test_a_systemd_that_does_not_read_cannot_hang_us(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)  # bound, never read: its queue fills (net.unix.max_dgram_qlen)
    try:
        n = Notifier({"NOTIFY_SOCKET": path})
        t0 = time.monotonic()
        for _ in range(40):
            n.watchdog()
        elapsed = time.monotonic() - t0
        assert elapsed < 40 * systemd.SEND_TIMEOUT + 1.0
        assert "cannot send to the systemd notify socket" in caplog.text
        sink.setblocking(False)
        got = 0
        while True:
            try:
                assert sink.recv(100) == b"WATCHDOG=1"
            except BlockingIOError:
                break
            got += 1
        assert 0 < got < 40
    finally:
        sink.close()
