"""A Debian root filesystem booted as a live systemd host with systemd-nspawn, for system tests.

Small on purpose::

    from tests.support.nspawn import Container, build_rootfs, missing_tools

    if missing_tools(): ...                       # ["mmdebstrap", ...] not on this machine
    build_rootfs(tmp / "root", ["python3", "mosquitto"])      # Debian bookworm amd64, minbase
    with Container(tmp / "root") as box:          # boots it; stops it on exit, even on errors
        box.run("systemctl", "is-active", "dbus")            # CompletedProcess, text mode
        box.show("flux-edge.service", "NRestarts")          # {"NRestarts": "0"}
        box.pid                                   # leader PID: ansible_nsenter_pid for Ansible

Needs root, mmdebstrap, systemd-nspawn (systemd-container) and nsenter (util-linux).

What the container is, measured on a Debian 12 host whose init is not systemd (cgroup v1):

* ``systemd-nspawn --boot --register=no --keep-unit``: no machined or host systemd needed.
* ``--private-network`` (default): only a loopback interface, so the container reaches nothing
  (a test proves offline installs that way) and its ports never collide with the host's.
* ``enforce_devices=True`` (default): the container gets a unified cgroup hierarchy
  (``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``) and may call ``bpf()`` (``--system-call-filter=bpf``),
  so the systemd inside can install device-access BPF programs and a unit's ``DevicePolicy=`` /
  ``DeviceAllow=`` are really enforced. Without both, nspawn's defaults leave every device open to
  every unit and a device-policy test would pass for the wrong reason. cgroup v1 controllers
  (memory, pids) stay with the host: ``MemoryMax=`` and ``TasksMax=`` are not enforced inside.
* Don't boot a foreign-architecture rootfs through qemu-user this way (false failures).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REQUIRED_TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter")
BASE_PACKAGES = ("systemd-sysv", "dbus")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def missing_tools() -> list[str]:
    """The tools this module needs that are not on PATH."""
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def debian_mirror() -> str:
    """The Debian mirror to build from: $FLUX_EDGE_DEBIAN_MIRROR, else the first ``.../debian``
    URI this machine's apt sources use, else deb.debian.org."""
    env = os.environ.get("FLUX_EDGE_DEBIAN_MIRROR")
    if env:
        return env
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s+(\S+/debian)/?\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)/?\s+\S+", text, re.M
        )
        if m:
            return m.group(1)
    return DEFAULT_MIRROR


def build_rootfs(
    dest: Path,
    packages: Sequence[str] = (),
    *,
    suite: str = "bookworm",
    arch: str = "amd64",
    mirror: str | None = None,
    timeout: float = 600,
) -> None:
    """A minimal bootable Debian root filesystem in ``dest`` (which must not exist or be empty):
    ``mmdebstrap --variant=minbase`` with systemd-sysv, dbus and ``packages``; no manual pages,
    documentation or translations (a bookworm amd64 rootfs with python3 and mosquitto: ~45 s,
    250 MB). Raises ``RuntimeError`` with mmdebstrap's output tail on failure."""
    include = ",".join(dict.fromkeys([*BASE_PACKAGES, *packages]))
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        f"--architectures={arch}",
        f"--include={include}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        suite,
        str(dest),
        mirror or debian_mirror(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _is_namespace_init(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
    ids = m.group(1).split() if m else []
    return len(ids) > 1 and ids[-1] == "1"


class Container:
    """``root`` booted with ``systemd-nspawn --boot``. ``start()`` (or ``with``) returns once the
    system inside is up (``systemctl is-system-running --wait``: running or degraded); ``stop()``
    powers it off (SIGKILL after ``stop_timeout``). The console goes to ``log`` if given."""

    def __init__(
        self,
        root: Path,
        *,
        name: str = "flux-test",
        private_network: bool = True,
        enforce_devices: bool = True,
        log: Path | None = None,
    ) -> None:
        self.root = root
        self.name = name
        self.private_network = private_network
        self.enforce_devices = enforce_devices
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int:
        """The container's PID 1 as the host sees it (for nsenter, ansible_nsenter_pid)."""
        if self._pid is None:
            raise RuntimeError("the container is not running")
        return self._pid

    def start(self, timeout: float = 60) -> None:
        cmd = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
               "--console=read-only", f"--machine={self.name}", f"--directory={self.root}"]
        env = dict(os.environ)
        if self.private_network:
            cmd.insert(1, "--private-network")
        if self.enforce_devices:
            cmd.insert(1, "--system-call-filter=bpf")
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        try:
            while self._pid is None:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"systemd-nspawn exited with {self._proc.returncode}"
                                       + (f" (console log: {self.log})" if self.log else ""))
                if time.monotonic() > deadline:
                    raise RuntimeError("the container's init did not appear")
                self._pid = next((c for c in _children(self._proc.pid) if _is_namespace_init(c)),
                                 None)
                if self._pid is None:
                    time.sleep(0.05)
            while True:  # the system bus appears a moment after init starts
                left = max(1.0, deadline - time.monotonic())
                r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
                if r.stdout.strip() in ("running", "degraded"):
                    break
                # "offline" or no answer: systemd is not reachable yet
                if r.stdout.strip() in ("maintenance", "stopping") or time.monotonic() > deadline:
                    raise RuntimeError(f"the container did not boot: {r.stdout.strip()} {r.stderr}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def nsenter(self) -> list[str]:
        """The command prefix that runs a program inside the container (as root)."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--net",
                "--pid", "--"]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container; raises ``RuntimeError`` (with its output) if
        ``check`` and it fails."""
        r = subprocess.run([*self.nsenter(), *argv], capture_output=True, text=True,
                           timeout=timeout, input=input, check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"in the container: {' '.join(argv)} exited with {r.returncode}:\n"
                               f"{r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit inside the container."""
        r = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def stop(self, timeout: float = 30) -> None:
        """Power the container off (SIGTERM to nspawn: an orderly shutdown), SIGKILL after
        ``timeout``. Safe to call twice."""
        proc, leader, self._proc, self._pid = self._proc, self._pid, None, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if leader is not None:  # killing a PID namespace's init kills everything in it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, signal.SIGKILL)
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
