"""The shipped systemd unit: hardened (systemd-analyze security exposure <= 2.0) and wired to the
daemon's lifecycle (Type=notify, watchdog, reload by SIGHUP, no restart on a bad config)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.system

UNIT = ROOT / "config" / "systemd" / "flux-edge.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_unit_is_wired_to_the_daemon_lifecycle() -> None:
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]  # flux_edge.cli.EX_CONFIG
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "run --config /etc/flux-edge/flux-edge.toml" in s["ExecStart"][0]
    watchdog = int(s["WatchdogSec"][0].rstrip("s"))
    stop = int(s["TimeoutStopSec"][0].rstrip("s"))
    from flux_edge.config import DaemonConfig

    # the stall check must trip before systemd's own timeout, the drain must end before SIGKILL
    assert DaemonConfig().stall_timeout < watchdog
    assert DaemonConfig().shutdown_timeout < stop
    assert "dialout" in s["SupplementaryGroups"]  # serial ports
    assert s["StateDirectory"] == ["flux-edge"]  # = DaemonConfig().state_dir
    assert DaemonConfig().state_dir == "/var/lib/flux-edge"
    assert "PrivateUsers" not in s  # it would unmap the dialout group: serial ports would fail


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_security_exposure_is_at_most_2() -> None:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.0, m.group(0)
    assert m.group(2) == "OK"
