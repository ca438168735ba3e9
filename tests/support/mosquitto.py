"""A real mosquitto broker for tests, on a free 127.0.0.1 port.

    broker = Mosquitto(tmp_path)          # or the ``mosquitto`` fixture in a test module
    broker.start(); ...; broker.stop(); broker.start()   # same port: for reconnect tests
    broker.close()                        # kills it (the fixture does this at teardown)

The config is written to a temp file: persistence off, and the per-client limits set on purpose:
mosquitto's defaults (max_queued_messages 1000, max_inflight_messages 20) would make the broker
drop messages for a slow QoS 1 subscriber without telling anyone, which would show up in tests as
"the client lost messages". ``users`` turns anonymous access off and writes a password file.
Readiness is an event: ``start()`` returns as soon as the port accepts a TCP connection (probed
every 10 ms, at most ``timeout`` seconds) and fails at once, with mosquitto's own output, if the
process exits.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int = 0,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int = 100,
        users: dict[str, str] | None = None,
        extra_config: str = "",
    ) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip(f"{MOSQUITTO} is not installed (apt-get install mosquitto)")
        self.workdir = workdir
        self.host = HOST
        self.port = port or _free_port()
        self.log_file = workdir / "mosquitto.log"
        self.config_file = workdir / "mosquitto.conf"
        lines = [
            # as root mosquitto drops to user "mosquitto", which cannot read pytest's tmp dirs
            f"user {getpass.getuser()}",
            f"listener {self.port} {HOST}",
            "persistence false",
            f"max_queued_messages {max_queued_messages}",
            f"max_inflight_messages {max_inflight_messages}",
            "max_keepalive 65535",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if users:
            pwfile = workdir / "passwd"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pwfile), user, password],
                    check=True, capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if extra_config:
            lines.append(extra_config)
        self.config_file.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
                log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode} on port {self.port}:\n"
                    f"{out}\n{log[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not accept connections on {self.port} "
                                   f"within {timeout} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s); the port can be reused by start()."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing connections cleanly."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    close = stop


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
