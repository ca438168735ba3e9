"""The console in a real browser (Debian's headless chromium driven by selenium), against a
running daemon and a real pymodbus boiler over TLS with a self-signed certificate: log in (a
wrong password refused, then rate limited), a value changes on the page within 2 s of the
device changing, an override is written and read back, a denied override shows its reason, a
POST without the CSRF token and a viewer's override are refused. Screenshots go to
``$FLUX_EDGE_SCREENSHOTS`` (default: the test's tmp dir); ``FLUX_EDGE_DOCS_SCREENSHOT=1``
refreshes docs/console.png."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flux_edge.console.auth import add_user
from flux_edge.demo.boiler import BoilerSimulator
from flux_edge.kinds import load_config
from flux_edge.runtime.daemon import Daemon
from tests.conftest import bundled_wasm
from tests.integration.test_console_api import CONFIG, OPERATOR, VIEWER
from tests.support import browser as web

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not web.available(), reason="chromium, chromedriver, selenium")]
DOCS = Path(__file__).resolve().parents[2] / "docs"


class Running:
    """The daemon and the boiler on a loop of their own (selenium is synchronous)."""

    def __init__(self, tmp_path: Path, tls: str = "on") -> None:
        self.tls = tls
        bundled_wasm("modbus_decode")
        self.state = tmp_path / "state"
        users = self.state / "console" / "users.json"
        add_user(users, OPERATOR[0], "operator", OPERATOR[1])
        add_user(users, VIEWER[0], "viewer", VIEWER[1])
        self.path = tmp_path / "site.toml"
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.sim: BoilerSimulator | None = None
        self.daemon: Daemon | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),))
        self.thread.start()
        assert self.ready.wait(30), "the daemon did not start"

    async def _run(self) -> None:
        self.sim = sim = BoilerSimulator(port=0, start_temperature=55.0, burner=False,
                                         tick=3600.0)
        await sim.start()
        self.path.write_text(CONFIG.format(state=self.state, port=sim.port, tls=self.tls))
        self.daemon = daemon = Daemon(load_config(self.path), serve_metrics=True)
        self._stop = asyncio.Event()
        up = asyncio.Event()
        runner = asyncio.create_task(daemon.run(stop=self._stop, started=lambda _p: up.set()))
        await up.wait()
        self.port = daemon.console.server.port  # type: ignore[attr-defined]
        self.ready.set()
        await runner
        await sim.stop()

    def call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def set_temperature(self, value: float) -> None:
        def do() -> None:
            assert self.sim is not None
            self.sim._temperature = value
            self.sim._publish()

        self.call(do)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def running(tmp_path: Path) -> Any:
    r = Running(tmp_path)
    yield r
    r.stop()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("FLUX_EDGE_SCREENSHOTS", tmp_path / "screenshots"))


def test_console_in_a_browser(running: Running, shots: Path) -> None:
    b = web.Browser()
    url = f"https://127.0.0.1:{running.port}/"
    try:
        b.get(url)
        b.wait(lambda: b.visible("#login"))
        # a wrong password: refused; the login limit (3) then refuses even the right one
        def attempt(user: str, password: str) -> str:
            b.driver.execute_script("document.querySelector('#login-error').textContent = ''")
            b.type("#user", user)
            b.type("#password", password)
            b.click("#login-btn")
            return str(b.wait(lambda: b.text("#login-error")))

        for _ in range(3):
            assert "wrong user name or password" in attempt(OPERATOR[0], "not the password")
        b.screenshot(shots / "01-wrong-password.png")
        assert "too many failed logins" in attempt(*OPERATOR)
        b.screenshot(shots / "02-rate-limited.png")
        # the limit holds for the address too; let the window pass (forget the failures)
        running.call(running.daemon.console.auth.limiter._fails.clear)  # type: ignore
        b.type("#user", VIEWER[0])
        b.type("#password", VIEWER[1])
        b.click("#login-btn")
        b.wait(lambda: b.visible("#app"))
        b.wait(lambda: "55" in b.text('[data-value="boiler\u0000temperature"]'))
        csrf = b.driver.execute_script("return csrf")
        r = b.fetch("/api/v1/actuators/burner/override", {"state": "on", "reason": "x"},
                    {"Content-Type": "application/json", "X-CSRF-Token": csrf})
        assert r["status"] == 403 and "viewer" in r["body"]["error"]
        b.click("#logout")
        b.wait(lambda: b.visible("#login"))
        running.call(running.daemon.console.auth.limiter._fails.clear)  # type: ignore
        b.type("#user", OPERATOR[0])
        b.type("#password", OPERATOR[1])
        b.click("#login-btn")
        b.wait(lambda: b.visible("#app"))
        cell = '[data-value="boiler\u0000temperature"]'
        b.wait(lambda: "55" in b.text(cell))
        b.screenshot(shots / "03-values.png")

        # the device changes: the page shows it within 2 s
        t0 = time.monotonic()
        running.set_temperature(63.7)
        b.wait(lambda: "63.7" in b.text(cell), timeout=5)
        took = time.monotonic() - t0
        assert took < 2.0, f"the page showed the new value after {took:.2f} s"

        # a POST without the CSRF token is refused
        r = b.fetch("/api/v1/actuators/burner/override", {"state": "on", "reason": "x"},
                    {"Content-Type": "application/json"})
        assert r["status"] == 403 and "CSRF" in r["body"]["error"]

        # override: switched on, read back (verified)
        b.get(url + "#actuators")
        b.wait(lambda: b.visible('[data-reason="burner"]'))
        b.type('[data-reason="burner"]', "commissioning the burner")
        b.click('[data-ovr="burner"][data-state="on"]')
        b.wait(lambda: "verified" in b.text("#res-burner"))
        assert "read back true" in b.text("#res-burner")
        assert running.call(lambda: running.sim.burner) is True  # type: ignore[union-attr]
        b.wait(lambda: "held on by olga" in b.text("#act-burner"))
        b.screenshot(shots / "04-override-verified.png")
        # denied: min_on is 1 h; the reason is shown
        b.type('[data-reason="burner"]', "try to switch off")
        b.click('[data-ovr="burner"][data-state="off"]')
        b.wait(lambda: "min_on" in b.text("#res-burner"))
        assert "denied by the safety layer" in b.text("#res-burner")
        b.screenshot(shots / "05-override-denied.png")
        # the audit trail names the operator
        b.wait(lambda: "console:olga" in b.text("#audit"))

        # the config: an edit checked, its error shown at its line
        b.get(url + "#config")
        b.wait(lambda: b.visible("#cfg-load"))
        b.click("#cfg-load")
        b.wait(lambda: "min_on" in b.driver.find_element("css selector", "#cfg-text")
               .get_attribute("value"))
        text = running.path.read_text()
        line = text.splitlines().index('min_on = "1h"') + 1
        b.driver.execute_script("document.querySelector('#cfg-text').value = arguments[0]",
                                text.replace('min_on = "1h"', 'min_on = "an hour"'))
        b.click("#cfg-check")
        b.wait(lambda: f"line {line}:" in b.text("#cfg-problems"))
        assert "actuators.burner.min_on" in b.text("#cfg-problems")
        b.screenshot(shots / "06-config-check.png")
        if os.environ.get("FLUX_EDGE_DOCS_SCREENSHOT") == "1":
            shutil.copy(shots / "05-override-denied.png", DOCS / "console.png")
    finally:
        b.close()


def test_plain_http_on_loopback(tmp_path: Path) -> None:
    """The default: loopback without TLS. The browser keeps the Secure cookie there (a
    loopback origin counts as secure), so the login works."""
    running = Running(tmp_path, tls="off")
    b = web.Browser()
    try:
        b.get(f"http://127.0.0.1:{running.port}/")
        b.wait(lambda: b.visible("#login"))
        b.type("#user", OPERATOR[0])
        b.type("#password", OPERATOR[1])
        b.click("#login-btn")
        b.wait(lambda: b.visible("#app"))
        b.wait(lambda: "55" in b.text('[data-value="boiler\u0000temperature"]'))
    finally:
        b.close()
        running.stop()
