"""The console's API on a running daemon against a real pymodbus boiler: TLS with a
self-signed certificate, login, sessions and CSRF, rate limits, roles, tokens, live values by
SSE, an operator override through the safety layer (verified, then denied with its reason),
held actuators, release, config check and apply, every operator action audited by name."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flux_edge.console.auth import add_token, add_user
from flux_edge.demo.boiler import BoilerSimulator
from flux_edge.kinds import load_config
from flux_edge.runtime.daemon import Daemon
from tests.conftest import bundled_wasm
from tests.support.console_client import ApiClient

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[metrics]
port = 0

[console]
enabled = true
port = 0
tls = "{tls}"
login_attempts = 3

[plugins.modbus_decode]

[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "200ms"
chain = ["modbus_decode"]
registers = [
  {{ name = "temperature", address = 0, type = "int16", scale = 0.1, unit = "°C" }},
  {{ name = "burner", function = "coil", address = 0 }},
]

[rules.hot]
device = "boiler"
when = "temperature > 90"
actions = ["burner_off"]

[rules.warm]
device = "boiler"
when = "temperature > 50"
for = "1h"
cooldown = "10m"
actions = ["burner_off"]

[actions.burner_off]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = false
verify = true

[actions.burner_on]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = true
verify = true

[actuators.burner]
on = "burner_on"
off = "burner_off"
safe = "off"
min_on = "1h"

[uplink]
host = "127.0.0.1"
port = 1
password = "hunter2-secret"
"""

RULES_TEXT = (Path(__file__).resolve().parents[2] / "flux_edge/console/alerts/"
              "flux-edge.rules.yml").read_text()
OPERATOR, VIEWER = ("olga", "correct horse battery"), ("vic", "viewer password 1")


def run_console(tmp_path: Path, body: Callable[[Daemon, BoilerSimulator, int], Any],
                tls: str = "on") -> Any:
    bundled_wasm("modbus_decode")
    state = tmp_path / "state"
    users = state / "console" / "users.json"
    add_user(users, OPERATOR[0], "operator", OPERATOR[1])
    add_user(users, VIEWER[0], "viewer", VIEWER[1])

    async def go() -> Any:
        sim = BoilerSimulator(port=0, start_temperature=55.0, burner=False, tick=3600.0)
        await sim.start()
        path = tmp_path / "site.toml"
        path.write_text(CONFIG.format(state=state, port=sim.port, tls=tls))
        daemon = Daemon(load_config(path), serve_metrics=True)
        stop = asyncio.Event()
        runner = asyncio.create_task(daemon.run(stop=stop))
        try:
            for _ in range(200):
                if daemon.console is not None:
                    break
                await asyncio.sleep(0.05)
            console = daemon.console
            assert console is not None
            port = console.server.port  # type: ignore[attr-defined]
            return await body(daemon, sim, port)
        finally:
            stop.set()
            await runner
            await sim.stop()

    return asyncio.run(go())


def test_flux_edge_test_reads_and_writes_nothing(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`flux-edge test`: one poll, the measurements, the rule that would fire and what the
    safety layer would say; the burner coil is not written."""
    from flux_edge.cli import main

    bundled_wasm("modbus_decode")

    async def go() -> int:
        sim = BoilerSimulator(port=0, start_temperature=95.0, burner=True, tick=3600.0)
        await sim.start()
        path = tmp_path / "site.toml"
        path.write_text(CONFIG.format(state=tmp_path / "state", port=sim.port, tls="on"))
        try:
            rc = await asyncio.to_thread(main, ["test", str(path), "--source", "boiler"])
            assert sim.burner is True
            return rc
        finally:
            await sim.stop()

    assert asyncio.run(go()) == 0
    out = capsys.readouterr().out
    assert "temperature = 95.0 °C" in out
    assert "hot would fire: action burner_off" in out and "(not run)" in out
    assert not (tmp_path / "state" / "audit.jsonl").exists()


def audit_lines(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "state" / "audit.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_console_api_end_to_end(tmp_path: Path) -> None:
    async def body(daemon: Daemon, sim: BoilerSimulator, port: int) -> None:
        anon = ApiClient(port, tls=True)
        st, _ = await asyncio.to_thread(anon.get, "summary")
        assert st == 401
        # the page and its assets are served (the login happens in it)
        st, page, headers = await asyncio.to_thread(anon.request, "GET", "/")
        assert st == 200 and "<title>flux-edge console</title>" in page
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "max-age" in headers["strict-transport-security"]

        op = ApiClient(port, tls=True)
        st, who = await asyncio.to_thread(op.login, *OPERATOR)
        assert st == 200 and who["role"] == "operator"
        _, _, h = await asyncio.to_thread(
            ApiClient(port, tls=True).request, "POST", "/api/v1/login",
            {"user": OPERATOR[0], "password": OPERATOR[1]})
        cookie = h["set-cookie"]
        for flag in ("HttpOnly", "Secure", "SameSite=Strict"):
            assert flag in cookie

        # live values: the device changes, the stream tells within 2 s
        for _ in range(100):
            st, devs = await asyncio.to_thread(op.get, "devices")
            if devs and devs[0]["values"]:
                break
            await asyncio.sleep(0.1)
        dev = devs[0]
        assert dev["device"] == "boiler" and dev["state"] == "online"
        temp = next(v for v in dev["values"] if v["name"] == "temperature")
        assert temp["unit"] == "°C" and temp["quality"] == "good" and temp["value"] == 55.0

        def wait_for_value(target: float) -> float:
            resp = op.events()
            t0 = time.monotonic()
            event = ""
            try:
                while time.monotonic() - t0 < 5:
                    line = resp.fp.readline().decode()
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "values":
                        for m in json.loads(line[5:]):
                            if m["name"] == "temperature" and m["value"] == target:
                                return time.monotonic() - t0
            finally:
                resp.close()
            raise AssertionError("no values event with the new temperature")

        async def change() -> None:
            await asyncio.sleep(0.5)
            sim._temperature = 61.5
            sim._publish()

        changer = asyncio.create_task(change())
        took = await asyncio.to_thread(wait_for_value, 61.5)
        await changer
        assert took - 0.5 < 2.0, took

        # rules: a `for` timer pending, with the time left
        st, rules = await asyncio.to_thread(op.get, "rules")
        warm = next(r for r in rules if r["name"] == "warm")
        assert warm["state"] == "pending", warm
        left = warm["devices"][0]["pending_left_s"]
        assert 3500 < left <= 3600 and warm["for_s"] == 3600.0
        assert next(r for r in rules if r["name"] == "hot")["state"] == "armed"

        # a state-changing request without the CSRF token is refused
        st, err = await asyncio.to_thread(op.post, "actuators/burner/override",
                                          {"state": "on", "reason": "test"}, csrf=False)
        assert st == 403 and "CSRF" in err["error"]
        # a viewer cannot act
        viewer = ApiClient(port, tls=True)
        assert (await asyncio.to_thread(viewer.login, *VIEWER))[0] == 200
        st, err = await asyncio.to_thread(viewer.post, "actuators/burner/override",
                                          {"state": "on", "reason": "test"})
        assert st == 403 and "viewer" in err["error"]
        st, _ = await asyncio.to_thread(viewer.get, "config/file")
        assert st == 403

        # an override: through the safety layer, written and read back
        st, out = await asyncio.to_thread(op.post, "actuators/burner/override",
                                          {"state": "on", "reason": "commissioning"})
        assert st == 200, out
        assert out["verified"] is True and sim.burner is True
        # held: a rule's command to the burner is blocked while the override holds
        st, acts = await asyncio.to_thread(op.get, "actuators")
        burner = acts["actuators"][0]
        assert burner["state"] == "on" and burner["override"]["user"] == "olga"
        # denied: min_on is 1 h, so switching off now is refused, and the answer says why
        st, err = await asyncio.to_thread(op.post, "actuators/burner/override",
                                          {"state": "off", "reason": "try"})
        assert st == 409 and "min_on" in err["blocked"], err
        assert sim.burner is True
        sim._temperature = 95.0  # the rule wants the burner off: held, so blocked
        sim._publish()
        for _ in range(50):
            st, acts = await asyncio.to_thread(op.get, "actuators")
            if "manual override" in acts["actuators"][0]["last_block_reason"]:
                break
            await asyncio.sleep(0.1)
        assert "held on by olga" in acts["actuators"][0]["last_block_reason"]

        # the config: secrets redacted; check shows errors at their lines; apply reloads
        st, cfg = await asyncio.to_thread(op.get, "config")
        assert cfg["config"]["uplink"]["password"] == "********"
        st, f = await asyncio.to_thread(op.get, "config/file")
        text = f["text"]
        st, chk = await asyncio.to_thread(op.post, "config/check",
                                          {"text": text.replace('min_on = "1h"', 'min_on = "1x"')})
        assert not chk["ok"]
        line = text.splitlines().index('min_on = "1h"') + 1
        assert any(p["line"] == line and "min_on" in p["path"] for p in chk["problems"])
        st, out = await asyncio.to_thread(op.post, "config/apply",
                                          {"text": text.replace('"1h"', '"2h"'),
                                           "reason": "longer min_on"})
        assert st == 200, out
        assert daemon.config.actuators["burner"].min_on == 7200.0
        assert daemon.reloads_ok == 1
        # the hold survives the reload: the new pipeline's guard holds the burner too
        from flux_edge.console.operate import HoldingGuard

        assert daemon.pipeline is not None and isinstance(daemon.pipeline.guard, HoldingGuard)
        st, acts = await asyncio.to_thread(op.get, "actuators")
        assert acts["actuators"][0]["override"]["user"] == "olga"
        st, out = await asyncio.to_thread(op.post, "actuators/burner/release",
                                          {"reason": "done"})
        assert st == 200
        st, audit = await asyncio.to_thread(op.get, "audit?limit=50")
        assert st == 200 and any(r["rule"] == "console:olga" for r in audit)

        # a token for scripts: no cookie, no CSRF token
        token = add_token(daemon.console.auth.path, "grafana", "viewer")  # type: ignore
        script = ApiClient(port, tls=True, token=token)
        st, summary = await asyncio.to_thread(script.get, "summary")
        assert st == 200 and summary["devices"]["total"] == 1
        bad = ApiClient(port, tls=True, token="fxe_wrong")
        assert (await asyncio.to_thread(bad.get, "summary"))[0] == 401

        # the shipped alert rules name only metrics this daemon really exports
        import re
        import urllib.request

        mport = daemon.metrics.port  # type: ignore[attr-defined]
        scrape = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode())
        exported = set(re.findall(r"^# TYPE (\w+)", scrape, re.M))
        rules = RULES_TEXT
        used = set(re.findall(r"\b(flux_edge_[a-z_]+)\b", rules))
        assert used <= exported, sorted(used - exported)

        # `flux-edge status` reads the API with the daemon's local token
        from flux_edge.cli import main

        rc = await asyncio.to_thread(main, ["status", "-c", daemon.config.path,
                                               "--port", str(port)])
        assert rc == 0

        # wrong passwords: refused, then rate limited (login_attempts = 3)
        mallory = ApiClient(port, tls=True)
        codes = [(await asyncio.to_thread(mallory.login, "olga", "wrong"))[0] for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        # ... the right password is refused too while the limit holds
        assert (await asyncio.to_thread(mallory.login, *OPERATOR))[0] == 429

    run_console(tmp_path, body)
    records = audit_lines(tmp_path)
    mine = [r for r in records if r["rule"] == "console:olga"]
    kinds = [(r["action"], r["decision"]) for r in mine]
    assert ("burner_on", "allowed") in kinds
    assert ("burner_off", "blocked") in kinds
    assert ("console.release", "allowed") in kinds
    assert ("console.config_apply", "allowed") in kinds
    assert all(r["params"]["operator"] == "olga" for r in mine)
    held = [r for r in records if r["rule"] == "hot" and r["decision"] == "blocked"]
    assert held and "manual override" in held[0]["reason"]


def test_applying_a_console_change_restarts_the_console(tmp_path: Path) -> None:
    """A config apply that changes [console] gets its answer, then the console restarts with
    the new settings (sessions end: log in again)."""

    async def body(daemon: Daemon, sim: BoilerSimulator, port: int) -> None:
        op = ApiClient(port, tls=True)
        assert (await asyncio.to_thread(op.login, *OPERATOR))[0] == 200
        st, f = await asyncio.to_thread(op.get, "config/file")
        text = f["text"].replace("login_attempts = 3", "login_attempts = 4")
        first = daemon.console
        st, out = await asyncio.to_thread(op.post, "config/apply",
                                          {"text": text, "reason": "one more attempt"})
        assert st == 200, out
        for _ in range(100):
            if daemon.console is not None and daemon.console is not first:
                break
            await asyncio.sleep(0.05)
        console = daemon.console
        assert console is not None and console is not first
        assert console.cfg.login_attempts == 4  # type: ignore[attr-defined]
        again = ApiClient(console.server.port, tls=True)  # type: ignore[attr-defined]
        assert (await asyncio.to_thread(again.login, *OPERATOR))[0] == 200

    run_console(tmp_path, body)


def test_a_silent_device_shows_back_off_and_its_error(tmp_path: Path) -> None:
    async def body(daemon: Daemon, sim: BoilerSimulator, port: int) -> None:
        op = ApiClient(port, tls=True)
        assert (await asyncio.to_thread(op.login, *OPERATOR))[0] == 200
        await sim.stop()
        dev: dict[str, Any] = {}
        for _ in range(100):
            _, devs = await asyncio.to_thread(op.get, "devices")
            dev = devs[0]
            if dev["state"] == "back-off":
                break
            await asyncio.sleep(0.1)
        assert dev["state"] == "back-off" and dev["quality"] == "bad", dev
        assert dev["last_error"] and dev["consecutive_errors"] >= 1
        assert all(v["quality"] == "bad" for v in dev["values"])  # rules see them unknown
        _, summary = await asyncio.to_thread(op.get, "summary")
        assert summary["devices"] == {"total": 1, "online": 0}

    run_console(tmp_path, body)
