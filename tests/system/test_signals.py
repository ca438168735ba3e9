"""Signals at any moment (issue #13, item 4), sent to the real daemon subprocess: SIGHUP,
SIGTERM and SIGINT from the first instruction on (the moment /proc says they are blocked),
during start-up, during a reload and during the shutdown, where a second SIGTERM cuts the
drain short and actuators still go to their safe state (docs/operations.md, "Signals")."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import bundled_wasm, free_port
from tests.support.daemon import DaemonProcess, NotifySocket, ThreadedModbus, wait_until
from tests.system.test_daemon_lifecycle import CONFIG

pytestmark = [pytest.mark.system, pytest.mark.integration]

HELD = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}


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


def config(tmp_path: Path, port: int, extra: str = "") -> Path:
    bundled_wasm("modbus_decode")
    path = tmp_path / "flux-edge.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state", port=port, mport=free_port(),
                                  extra_rules=extra))
    return path


def blocked(pid: int) -> set[signal.Signals]:
    """The signals ``pid``'s main thread has blocked (/proc/PID/status SigBlk)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return set()
    mask = int(next(line.split()[1] for line in text.splitlines() if line.startswith("SigBlk")),
               16)
    return {s for s in HELD if mask & (1 << (s - 1))}


def wait_held(d: DaemonProcess) -> None:
    """Until the daemon's first instruction has blocked the signals."""
    wait_until(lambda: blocked(d.pid) == HELD or d.proc.poll() is not None, timeout=30,
               what="signals blocked")
    assert d.proc.poll() is None, d.log_text()


def clean(d: DaemonProcess) -> None:
    text = d.log_text()
    assert "Traceback" not in text, text


def stop_ok(d: DaemonProcess, sig: signal.Signals = signal.SIGTERM) -> None:
    d.signal(sig)
    assert d.wait(30) == 0, d.log_text()
    clean(d)


def test_sighup_from_the_first_instruction_reloads_after_the_start(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket
) -> None:
    d = DaemonProcess(config(tmp_path, modbus.port), notify)
    try:
        wait_held(d)
        d.signal(signal.SIGHUP)  # while the interpreter is still importing
        notify.wait_line("READY=1")
        notify.wait_line("RELOADING=1")  # the held SIGHUP, done once started
        wait_until(lambda: "reload: done" in d.log_text(), what="the reload")
        assert d.proc.poll() is None
        stop_ok(d)
    finally:
        d.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_start_up_exits_0_at_once(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket, sig: signal.Signals
) -> None:
    d = DaemonProcess(config(tmp_path, modbus.port), notify)
    try:
        wait_held(d)
        sent = time.monotonic()
        d.signal(sig)
        assert d.wait(30) == 0, d.log_text()
        assert time.monotonic() - sent < 15
        clean(d)
        assert "READY=1" not in "\n".join(notify.texts())  # held, then handled before READY
    finally:
        d.stop()


@pytest.mark.slow
def test_sighup_and_sigterm_at_random_moments_of_the_start(
    tmp_path: Path, modbus: ThreadedModbus
) -> None:
    rng = random.Random(13)
    for trial in range(8):
        notify = NotifySocket(tmp_path / f"n{trial}.sock")
        d = DaemonProcess(config(tmp_path, modbus.port), notify)
        try:
            wait_held(d)
            time.sleep(rng.uniform(0, 1.5))  # a moment of the start, at random
            for _ in range(rng.randint(1, 5)):
                d.signal(signal.SIGHUP)
            notify.wait_line("READY=1")
            assert d.proc.poll() is None, d.log_text()
            if trial % 2:
                d.signal(signal.SIGHUP)
                time.sleep(rng.uniform(0, 0.3))  # a SIGTERM into the reload
            stop_ok(d)
        finally:
            d.stop()
            notify.close()


def test_sighup_storm_during_reloads_and_sighup_during_shutdown(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket
) -> None:
    d = DaemonProcess(config(tmp_path, modbus.port), notify)
    try:
        notify.wait_line("READY=1")
        for _ in range(20):
            d.signal(signal.SIGHUP)
            time.sleep(0.01)
        wait_until(lambda: "reload: done" in d.log_text(), what="a reload")
        assert d.proc.poll() is None
        d.signal(signal.SIGTERM)
        d.signal(signal.SIGHUP)  # during the shutdown: ignored, not the default action (death)
        assert d.wait(30) == 0, d.log_text()
        clean(d)
    finally:
        d.stop()


SLOW_ACTION = """
[rules.too_hot]
device = "boiler"
when = "temperature > 90"
actions = ["slow_write"]

[sources.slowdev]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
unit_id = 2
interval = "10s"
timeout = "4s"
retries = 1

[actions.slow_write]
type = "modbus_write"
source = "slowdev"
function = "coil"
address = 5
value = true
"""


def test_a_second_sigterm_cuts_the_drain_short_and_the_safe_state_still_applies(
    tmp_path: Path, modbus: ThreadedModbus, notify: NotifySocket
) -> None:
    modbus.do(lambda: modbus.server.set_holding(0, 500))  # 50 °C: reheat switches the burner on
    modbus.do(lambda: modbus.server.silence(2))  # slowdev's unit never answers
    cfg = config(tmp_path, modbus.port, SLOW_ACTION.format(port=modbus.port))
    text = cfg.read_text().replace('shutdown_timeout = "10s"', 'shutdown_timeout = "30s"')
    cfg.write_text(text)
    d = DaemonProcess(cfg, notify)
    try:
        notify.wait_line("READY=1")
        wait_until(lambda: modbus.do(lambda: modbus.server.get_coil(0)), what="burner on")
        modbus.do(lambda: modbus.server.set_holding(0, 950))  # too_hot: a write that hangs
        wait_until(lambda: modbus.do(lambda: modbus.server.request_count(5, device_id=2)) > 0,
                   what="the slow write in flight")
        d.signal(signal.SIGTERM)  # the drain waits for the write: 2 x 4 s
        notify.wait_line("STOPPING=1")
        second = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log_text()
        took = time.monotonic() - second
        assert took < 4.0, f"the second SIGTERM did not cut the drain short: {took:.1f} s"
        log = d.log_text()
        assert "again while stopping" in log
        assert modbus.do(lambda: modbus.server.get_coil(0)) is False, "safe state not applied"
        clean(d)
    finally:
        d.stop()
