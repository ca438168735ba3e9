"""The daemon as systemd runs it: a subprocess with a real AF_UNIX datagram NOTIFY_SOCKET and
WATCHDOG_USEC, real signals, a real Modbus server with an actuator on it, real HTTP metrics."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, bundled_wasm, free_port
from tests.support.daemon import (
    DaemonProcess,
    NotifySocket,
    ThreadedModbus,
    http_get,
    metric,
    wait_until,
)

pytestmark = [pytest.mark.system, pytest.mark.integration]

WATCHDOG_USEC = 600_000  # pings expected every 0.2 s

CONFIG = """
[daemon]
name = "gw-test"
state_dir = "{state}"
stall_timeout = "2s"
shutdown_timeout = "10s"

[metrics]
port = {mport}

[plugins.modbus_decode]

[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "0.1s"
timeout = "0.5s"
chain = ["modbus_decode"]

[[sources.boiler.registers]]
name = "temperature"
function = "holding"
address = 0
type = "int16"
scale = 0.1

[[sources.boiler.registers]]
name = "burner"
function = "coil"
address = 0
type = "bool"

[rules.reheat]
device = "boiler"
when = "temperature < 60"
actions = ["burner_on"]
{extra_rules}
[actions.burner_on]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = true

[actions.burner_off]
type = "modbus_write"
source = "boiler"
function = "coil"
address = 0
value = false

[actuators.burner]
on = "burner_on"
off = "burner_off"
safe = "off"
"""


@pytest.fixture
def modbus() -> Iterator[ThreadedModbus]:
    server = ThreadedModbus()
    yield server
    server.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def write_config(path: Path, port: int, mport: int, extra_rules: str = "") -> None:
    path.write_text(CONFIG.format(state=path.parent / "state", port=port, mport=mport,
                                  extra_rules=extra_rules))


def test_ready_status_watchdog_metrics_then_sigterm_leaves_the_safe_state(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket
) -> None:
    bundled_wasm("modbus_decode")
    mport = free_port()
    cfg = tmp_path / "flux-edge.toml"
    write_config(cfg, modbus.port, mport)
    modbus.do(lambda: modbus.server.set_holding(0, 500))  # 50.0 °C: "reheat" switches it on
    d = DaemonProcess(cfg, notify, watchdog_usec=WATCHDOG_USEC)
    try:
        ready = notify.wait_line("READY=1")
        wait_until(lambda: modbus.do(lambda: modbus.server.get_coil(0)), what="burner on")
        # the watchdog is fed, at about a third of WATCHDOG_USEC, while the stages progress
        t0 = time.monotonic()
        for _ in range(5):
            notify.wait_line("WATCHDOG=1", timeout=5, after=time.monotonic())
        assert time.monotonic() - t0 < 5 * WATCHDOG_USEC / 1e6
        assert all(ts >= ready for ts, _ in notify.fields("WATCHDOG")), "fed before READY"
        notify.wait_for(lambda t: "STATUS=" in t and "1 device(s)" in t, timeout=15)
        status, body = http_get(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200
        assert metric(body, "flux_edge_stage_processed_total", 'stage="plugins"') > 0
        assert metric(body, "flux_edge_device_up", 'device="boiler"') == 1
        assert metric(body, "flux_edge_action_outcomes_total",
                      'action="burner_on",result="ok"') >= 1
        assert metric(body, "flux_edge_plugin_call_seconds_count",
                      'plugin="modbus_decode"') > 0
        status, body = http_get(f"http://127.0.0.1:{mport}/healthz")
        assert status == 200 and '"ok"' in body

        sent = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log_text()
        notify.wait_line("STOPPING=1", after=sent, timeout=1)
        assert modbus.do(lambda: modbus.server.get_coil(0)) is False, "safe state not applied"
        assert "safe state" in d.log_text()
        assert "Traceback" not in d.log_text()
    finally:
        d.stop()


def test_sighup_keeps_running_on_a_bad_file_and_applies_a_good_one(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket
) -> None:
    bundled_wasm("modbus_decode")
    mport = free_port()
    cfg = tmp_path / "flux-edge.toml"
    write_config(cfg, modbus.port, mport)
    good = cfg.read_text()
    d = DaemonProcess(cfg, notify, watchdog_usec=WATCHDOG_USEC)
    base = f"http://127.0.0.1:{mport}/metrics"
    try:
        notify.wait_line("READY=1")
        wait_until(lambda: modbus.do(lambda: modbus.server.get_coil(0)), what="burner on")

        # a broken file: RELOADING, then READY again with the error in STATUS; still serving
        cfg.write_text(good.replace('when = "temperature < 60"', 'when = "temperature <"'))
        sent = time.monotonic()
        d.signal(signal.SIGHUP)
        notify.wait_line("RELOADING=1", after=sent)
        _, text = notify.wait_for(lambda t: "READY=1" in t, after=sent)
        assert "reload failed" in text and "rules.reheat.when" in text, text
        polls = metric(http_get(base)[1], "flux_edge_device_polls_total", 'device="boiler"')
        wait_until(lambda: metric(http_get(base)[1], "flux_edge_device_polls_total",
                                  'device="boiler"') > polls + 3, what="polls continue")
        body = http_get(base)[1]
        assert metric(body, "flux_edge_reloads_total", 'result="failed"') == 1
        assert d.proc.poll() is None
        assert "rules.reheat.when" in d.log_text()

        # a good file with one more rule: applied; the actuator is not touched by the reload
        write_config(cfg, modbus.port, mport, extra_rules=(
            '\n[rules.too_hot]\ndevice = "boiler"\nwhen = "temperature > 90"\n'
            'actions = ["burner_off"]\n'))
        sent = time.monotonic()
        d.signal(signal.SIGHUP)
        notify.wait_line("RELOADING=1", after=sent)
        _, text = notify.wait_for(lambda t: "READY=1" in t, after=sent)
        assert "reload failed" not in text, text
        body = http_get(base)[1]
        assert metric(body, "flux_edge_reloads_total", 'result="ok"') == 1
        assert metric(body, "flux_edge_rule_evaluations_total", 'rule="too_hot"') >= 0
        assert modbus.do(lambda: modbus.server.get_coil(0)) is True  # no safe state on reload
        modbus.do(lambda: modbus.server.set_holding(0, 950))  # 95 °C: the new rule acts
        wait_until(lambda: not modbus.do(lambda: modbus.server.get_coil(0)), what="burner off")

        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log_text()
    finally:
        d.stop()


STUCK_CONFIG = """
[daemon]
state_dir = "{state}"
stall_timeout = "1s"

[metrics]
enabled = false

[plugins.good]
file = "echo.wat"

[plugins.spin]
file = "echo.wat"
timeout = "1h"   # deliberately: a call that never returns

[sources.alive]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "0.1s"
chain = ["good"]

[[sources.alive.registers]]
name = "x"
address = 0

[sources.late]          # nothing listens here until the test starts a server
type = "modbus_tcp"
host = "127.0.0.1"
port = {late_port}
interval = "0.1s"
timeout = "0.2s"
backoff_max = "0.2s"
chain = ["spin"]

[[sources.late.registers]]
name = "y"
address = 1             # echo.wat: a first message with address 1 loops forever
"""


def test_a_stuck_stage_stops_the_watchdog_pings(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket
) -> None:
    shutil.copy(ROOT / "tests" / "fixtures" / "wat" / "echo.wat", tmp_path / "echo.wat")
    late_port = free_port()
    cfg = tmp_path / "flux-edge.toml"
    cfg.write_text(STUCK_CONFIG.format(state=tmp_path / "state", port=modbus.port,
                                       late_port=late_port))
    d = DaemonProcess(cfg, notify, watchdog_usec=WATCHDOG_USEC)
    late: ThreadedModbus | None = None
    try:
        notify.wait_line("READY=1")
        for _ in range(5):
            notify.wait_line("WATCHDOG=1", timeout=5, after=time.monotonic())
        late = ThreadedModbus(late_port)  # the first reading from it sends the plugin spinning
        wait_until(lambda: late is not None and late.server.request_count() > 0,
                   what="the late device polled")
        stuck_at = time.monotonic()
        # the call runs on a plugin worker thread, so the loop (and the feeder) carry on until
        # the chain's stage has been busy for stall_timeout (1 s); from then on, no ping
        stuck_for = 1.0
        time.sleep(stuck_for + 4 * WATCHDOG_USEC / 1e6)  # observing an absence: a bounded wait
        pings = [ts for ts, _ in notify.fields("WATCHDOG") if ts > stuck_at + stuck_for + 0.3]
        assert pings == [], f"{len(pings)} ping(s) while stuck"
        assert d.proc.poll() is None  # alive but stuck: exactly what systemd must restart
    finally:
        d.stop()
        if late is not None:
            late.close()
