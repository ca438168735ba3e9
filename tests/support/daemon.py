"""Real parts for daemon-as-a-subprocess tests: a systemd-style notify socket, the daemon process
itself, a Modbus TCP server on its own thread, and a tiny HTTP getter for /metrics.

The notify socket is what systemd gives a Type=notify service: an AF_UNIX datagram socket named
by $NOTIFY_SOCKET. The listener records every datagram with its arrival time (monotonic).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from flux_edge.sim.modbus_server import SimulatedModbusServer
from tests.conftest import ROOT


class NotifySocket:
    """Bound AF_UNIX SOCK_DGRAM socket; ``messages`` is [(monotonic time, text), ...]."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._recv, name="notify", daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))
                self._cond.notify_all()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def texts(self) -> list[str]:
        with self._cond:
            return [m for _, m in self.messages]

    def fields(self, key: str) -> list[tuple[float, str]]:
        """Every value of ``KEY=value`` lines, with arrival times."""
        out = []
        with self._cond:
            for ts, text in self.messages:
                for line in text.split("\n"):
                    if line.startswith(key + "="):
                        out.append((ts, line[len(key) + 1:]))
        return out

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 60.0,
                 after: float = 0.0) -> tuple[float, str]:
        """The first datagram (arrived after monotonic time ``after``) for which pred holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ts, text in self.messages:
                    if ts >= after and pred(text):
                        return ts, text
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no matching notify message within {timeout} s; got: "
                        f"{[m for _, m in self.messages][-20:]}"
                    )
                self._cond.wait(left)

    def wait_line(self, line: str, timeout: float = 60.0, after: float = 0.0) -> float:
        ts, _ = self.wait_for(lambda t: line in t.split("\n"), timeout, after)
        return ts


class DaemonProcess:
    """``flux-edge run --config PATH`` as systemd would start it (NOTIFY_SOCKET, WATCHDOG_USEC)."""

    def __init__(self, config: Path, notify: NotifySocket | None, *,
                 watchdog_usec: int | None = None, log: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        env.setdefault("FLUX_EDGE_LOG", "info")
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify.path)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        env.update(extra_env or {})
        self.log = log or config.with_suffix(".log")
        self._logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flux_edge", "run", "--config", str(config)],
            env=env, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._logf.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()


class ThreadedModbus:
    """A SimulatedModbusServer running on its own event loop thread."""

    def __init__(self, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="modbus", daemon=True)
        self._thread.start()
        self.server = SimulatedModbusServer("127.0.0.1", port)
        self.call(self.server.start())

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(15)

    def do(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()
        return self.call(run())

    @property
    def port(self) -> int:
        return self.server.port

    def close(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus exposition (labels as written, e.g.
    'result="ok"'); KeyError if absent."""
    pat = re.compile(
        rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.MULTILINE
    )
    for m in pat.finditer(text):
        if labels in (m.group(1) or ""):
            return float(m.group(2))
    raise KeyError(f"{name}{{{labels}}} not in metrics")


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition the test cannot await (another process's state)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


__all__ = ["DaemonProcess", "NotifySocket", "ThreadedModbus", "http_get", "metric", "signal",
           "wait_until"]
