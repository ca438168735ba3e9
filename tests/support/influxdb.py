"""A real InfluxDB 1.x (Debian's ``influxdb`` package) for tests: ``influxd`` on 127.0.0.1 free
ports with its data in a temp dir; ``write(lines)`` and ``query(q)`` over its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class InfluxDB:
    def __init__(self, workdir: Path) -> None:
        if not Path(INFLUXD).exists():
            pytest.skip(f"{INFLUXD} is not installed (apt-get install influxdb)")
        self.dir = workdir
        self.port = _free_port()
        conf = workdir / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "{HOST}:{_free_port()}"\n'
            f'[meta]\n  dir = "{workdir}/meta"\n'
            f'[data]\n  dir = "{workdir}/data"\n  wal-dir = "{workdir}/wal"\n'
            "  query-log-enabled = false\n"
            f'[http]\n  bind-address = "{HOST}:{self.port}"\n  log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
        )
        self._log = (workdir / "influxd.log").open("wb")
        self.proc = subprocess.Popen([INFLUXD, "-config", str(conf)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self._wait_ready(30.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited: {(self.dir / 'influxd.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/ping", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # no readiness event to wait for: influxd gives none

    def _post(self, path: str, params: dict[str, str], body: bytes) -> tuple[int, bytes]:
        url = f"http://{HOST}:{self.port}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def create(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')

    def write(self, db: str, body: bytes) -> None:
        status, text = self._post("/write", {"db": db, "precision": "ns"}, body)
        if status != 204:
            raise AssertionError(f"influxd refused the write ({status}): {text!r}")

    def query(self, q: str, db: str = "") -> Any:
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        status, text = self._post("/query", params, b"")
        assert status == 200, text
        return json.loads(text)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
