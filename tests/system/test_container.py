"""The container image (packaging/container/Containerfile), built and run with podman.

A Debian trixie slim base made with mmdebstrap (no container registry is reachable here; the
Containerfile's default base is debian:trixie-slim), the image built from the x86_64 cp313
wheelhouse by packaging/container/build.sh, then run as the Containerfile says: non-root, state
in a named volume, a serial port (a pty, fed GPS sentences: bound into the container, as a pty
cannot be passed with --device, see below), no network
(--network none: nothing to clean up on the host). Checks: the HEALTHCHECK reports healthy, the
process runs as the flux-edge user, the serial source reads, the state is in the volume; a
stopped daemon (SIGSTOP: what systemd's watchdog would catch) makes it unhealthy, SIGCONT
healthy again; `podman stop` ends it cleanly (exit 0, within its stop timeout).

podman 4.3 here: `--runtime runc` (crun fails on this host) and
`--ulimit nofile=1024:1024 --ulimit nproc=1000:1000`. Marked slow (root).
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "container" / "build.sh"
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]

pytestmark = [pytest.mark.slow, pytest.mark.system]

CONFIG = """
[daemon]
state_dir = "/var/lib/flux-edge"
name = "container-test"

[plugins.nmea0183]

[sources.gps]
type = "serial"
port = "/dev/ttyUSB0"
delimiter = "\\r\\n"
chain = ["nmea0183"]

[metrics]
host = "127.0.0.1"
port = 9180
"""


def _podman(*args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check:
        assert res.returncode == 0, f"podman {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def _nmea_writer(master: int, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        body = f"GPGGA,1200{i % 60:02d}.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
        check = 0
        for ch in body.encode():
            check ^= ch
        try:
            os.write(master, f"${body}*{check:02X}\r\n".encode())
        except OSError:
            return
        i += 1
        stop.wait(0.2)


def _health(name: str) -> int:
    return _podman("healthcheck", "run", name, check=False, timeout=60).returncode


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(1)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    tag = f"{os.getpid()}"
    n = {"base": f"localhost/flux-edge-test-base:{tag}", "image": f"localhost/flux-edge-test:{tag}",
         "ctr": f"flux-edge-test-{tag}", "volume": f"flux-edge-test-state-{tag}"}
    had_bridge = Path("/sys/class/net/cni-podman0").exists()
    try:
        yield n
    finally:
        _podman("rm", "-f", "-t", "0", n["ctr"], check=False)
        _podman("volume", "rm", "-f", n["volume"], check=False)
        _podman("rmi", "-f", n["image"], n["base"], check=False)
        if not had_bridge and Path("/sys/class/net/cni-podman0").exists():
            subprocess.run(["ip", "link", "delete", "cni-podman0"], check=False)


@pytest.mark.timeout(1500)
def test_container_builds_runs_and_reports_health(names: dict[str, str], tmp_path: Path) -> None:
    problems = [t for t in ("podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    if os.geteuid() != 0:
        problems.append("root")
    if problems:
        msg = "container test needs: " + ", ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    t0 = time.monotonic()
    base_tar = tmp_path / "base.tar"
    subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "--aptopt=APT::Install-Recommends false",
                    "trixie", str(base_tar)], check=True, capture_output=True, timeout=600)
    _podman("import", str(base_tar), names["base"], timeout=300)
    base_tar.unlink()
    t_base = time.monotonic() - t0

    t0 = time.monotonic()
    res = subprocess.run([str(BUILD), "--arch", "amd64", "--base", names["base"], "--tag",
                          names["image"], "--", "--network", "none"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    t_build = time.monotonic() - t0
    inspect = json.loads(_podman("image", "inspect", names["image"]).stdout)[0]
    assert inspect["Config"]["User"] == "flux-edge", inspect["Config"]
    assert "/var/lib/flux-edge" in inspect["Config"]["Volumes"], inspect["Config"]
    # podman puts the docker-format HEALTHCHECK at the top level, docker in Config
    health = (inspect.get("Healthcheck") or inspect.get("HealthCheck")
              or inspect["Config"].get("Healthcheck"))
    assert health, sorted(inspect)
    assert health["Test"][-1] == "/usr/local/bin/flux-edge-healthcheck", health

    master, slave = os.openpty()
    slave_name = os.ttyname(slave)
    os.chown(slave_name, 0, grp.getgrnam("dialout").gr_gid)
    os.chmod(slave_name, 0o660)
    stop = threading.Event()
    writer = threading.Thread(target=_nmea_writer, args=(master, stop), daemon=True)
    writer.start()
    config = tmp_path / "flux-edge.toml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    try:
        t0 = time.monotonic()
        _podman("run", "-d", "--name", names["ctr"], "--network", "none", *ULIMITS,
                "-v", f"{names['volume']}:/var/lib/flux-edge",
                "-v", f"{config}:/etc/flux-edge/flux-edge.toml:ro",
                # a pty lives in its devpts instance: a device node of it (--device) opens with
                # EIO inside the container, so the test binds the pty itself; a real adapter
                # (/dev/ttyUSB0, a plain character device) is passed with --device
                "-v", f"{slave_name}:/dev/ttyUSB0", "--stop-timeout", "35", names["image"])
        _wait(lambda: _health(names["ctr"]) == 0, 120, "the container reports healthy")
        t_healthy = time.monotonic() - t0
        ids = _podman("exec", names["ctr"], "id").stdout
        assert "uid=10001(flux-edge)" in ids and "dialout" in ids, ids
        ps = _podman("top", names["ctr"], "user", "args").stdout
        assert "flux-edge run" in ps and "root" not in ps.split("\n", 1)[1], ps

        def metrics() -> str:
            return _podman("exec", names["ctr"], "python3", "-c",
                           "import urllib.request as u;"
                           "print(u.urlopen('http://127.0.0.1:9180/metrics').read().decode())",
                           check=False).stdout

        try:
            _wait(lambda: any(ln.startswith("flux_edge_device_up{") and 'source="gps"' in ln
                              and ln.endswith(" 1") for ln in metrics().splitlines()),
                  60, "the serial source (a pty as /dev/ttyUSB0) reads GPS sentences")
        except AssertionError as e:
            dev = _podman("exec", names["ctr"], "ls", "-ln", "/dev/ttyUSB0", check=False)
            logs = _podman("logs", "--tail", "20", names["ctr"], check=False)
            up = [ln for ln in metrics().splitlines() if "device_up" in ln]
            raise AssertionError(f"{e}\n{dev.stdout}{dev.stderr}\n{up}\n"
                                 f"{logs.stdout[-2000:]}{logs.stderr[-2000:]}") from None
        state = _podman("exec", names["ctr"], "ls", "-la", "/var/lib/flux-edge").stdout
        mount = json.loads(_podman("inspect", names["ctr"]).stdout)[0]["Mounts"]
        assert any(m.get("Name") == names["volume"] and m["Destination"] == "/var/lib/flux-edge"
                   for m in mount), mount
        assert "flux-edge flux-edge" in state, state

        # a stuck daemon: what the watchdog catches on a host is the container's health here
        _podman("kill", "--signal", "STOP", names["ctr"])
        _wait(lambda: _health(names["ctr"]) != 0, 60, "a stopped daemon makes it unhealthy")
        _podman("kill", "--signal", "CONT", names["ctr"])
        _wait(lambda: _health(names["ctr"]) == 0, 60, "healthy again once it runs")

        t0 = time.monotonic()
        _podman("stop", names["ctr"], timeout=60)
        t_stop = time.monotonic() - t0
        code = _podman("inspect", "--format", "{{.State.ExitCode}}", names["ctr"]).stdout.strip()
        assert code == "0", (code, _podman("logs", "--tail", "30", names["ctr"]).stderr)
        logs = _podman("logs", names["ctr"]).stdout + _podman("logs", names["ctr"]).stderr
        assert "Traceback" not in logs, logs[-3000:]
    finally:
        stop.set()
        os.close(master)
        os.close(slave)
        writer.join(timeout=5)
    print(f"\ncontainer: base {t_base:.0f}s, build {t_build:.0f}s, healthy {t_healthy:.0f}s after"
          f" start, stop {t_stop:.1f}s; image {inspect['Size'] / 2**20:.0f} MiB")
