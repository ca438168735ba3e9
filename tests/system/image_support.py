"""What the image tests share: one build of each image per pytest run, MBR reading, debugfs,
signing keys, and a QEMU machine that keeps running across its own reboots.

The build cache is this module's state: test_image_boot.py and test_ab_update.py both ask
``built_image(arch)`` and the second one gets the first one's build (one pytest process imports
this module once). Everything is removed when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "image" / "build.sh"
BUNDLE_SH = REPO / "image" / "bundle.sh"
KEYS_SH = REPO / "image" / "make-dev-keys.sh"
SUITE = "trixie"
DISK_ID = "464c5845"
BUILD_TIMEOUT = 1500.0  # a build started by the test that needs it
# a build started in the background at collection competes with the other tests for the CPU
BACKGROUND_BUILD_TIMEOUT = 2700.0
TOOLS = ("mmdebstrap", "genimage", "mke2fs", "mkfs.vfat", "mcopy", "mdir", "debugfs", "zstd",
         "rauc", "mksquashfs", "openssl")
QEMU = {
    "arm64": (["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72"], "ttyAMA0"),
    "amd64": (["qemu-system-x86_64", "-M", "q35", "-cpu", "max"], "ttyS0"),
}
COMPATIBLE = {"arm64": "flux-edge-rpi-arm64", "amd64": "flux-edge-pc-amd64"}


def missing(arch: str, extra: tuple[str, ...] = ()) -> list[str]:
    """What this machine lacks to build and boot the ``arch`` image (empty: nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    tools = [*TOOLS, *extra, QEMU[arch][0][0]] + (["update-binfmts"] if arch == "arm64" else [])
    problems += [f"{t} missing" for t in tools if shutil.which(t) is None]
    if arch == "arm64" and not os.access("/proc/sys/fs/binfmt_misc", os.F_OK):
        problems.append("no binfmt_misc")
    return problems


def require_tools(arch: str, extra: tuple[str, ...] = ()) -> None:
    problems = missing(arch, extra)
    if problems:
        msg = "image test needs: " + ", ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI: a missing tool is a failure; tools/setup.sh installs them)")
        pytest.skip(msg)


def run(cmd: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True,  # type: ignore[call-overload, no-any-return]
                          timeout=timeout, **kw)


def partitions(image: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of the MBR's primary partitions, read from the image itself."""
    with image.open("rb") as f:
        mbr = f.read(512)
    assert mbr[510:512] == b"\x55\xaa", f"{image}: no MBR boot signature"
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        start, count = struct.unpack_from("<II", entry, 8)
        if entry[4]:
            parts.append((start * 512, count * 512))
    return parts


def debugfs(target: str, commands: str, workdir: Path) -> str:
    """Run debugfs -w commands on an ext4 filesystem (``file`` or ``file?offset=N``)."""
    cmdfile = workdir / "debugfs.cmds"
    cmdfile.write_text(commands)
    res = run(["debugfs", "-w", "-f", str(cmdfile), target])
    # debugfs exits 0 even when a command fails: its complaints are on stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    assert not errors, f"debugfs: {errors}"
    return res.stdout


@dataclass
class Keys:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.cert.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "signing.cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "signing.key.pem"


def make_keys(path: Path, name: str) -> Keys:
    run(["bash", str(KEYS_SH), str(path), name])
    return Keys(path)


@dataclass
class Build:
    arch: str
    out: Path
    version: str
    keys: Keys
    seconds: float
    workdir: Path

    @property
    def name(self) -> str:
        return f"flux-edge-{SUITE}-{self.arch}"

    @property
    def phases(self) -> str:
        """build.sh's own split of its time ("rootfs 300s, ansible 700s, ..."), for the run's
        phase timings; empty when the build left no record of it."""
        info = self.out / f"{self.name}.build-info"
        found = re.search(r"^time: +\S+ total: (.*)$", info.read_text(), re.MULTILINE) \
            if info.is_file() else None
        return found.group(1).replace("rootfs (and wheelhouse)", "rootfs+wheelhouse") \
            if found else ""

    @property
    def image(self) -> Path:
        return self.out / f"{self.name}.img"

    @property
    def bundle(self) -> Path:
        return self.out / f"{self.name}.raucb"

    @property
    def rootfs(self) -> Path:
        return self.out / f"{self.name}.rootfs.ext4"


_builds: dict[str, Build] = {}
_failed: dict[str, str] = {}
_session_dir: Path | None = None


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    work: Path
    out: Path
    version: str
    keys: Keys
    started: float
    log: Path
    timeout: float


_running: dict[str, _Running] = {}


def _session() -> Path:
    global _session_dir
    if _session_dir is None:
        # under /var/tmp, not a tmpfs /tmp: images and their copies are a few GB
        _session_dir = Path(tempfile.mkdtemp(prefix="flux-edge-image-test.", dir="/var/tmp"))
        atexit.register(shutil.rmtree, _session_dir, True)
    return _session_dir


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM to the whole group (mmdebstrap waits out a TERM of its own): build.sh's trap then
    disables the binfmt entry it enabled and removes its work directory."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_build(arch: str, *, background: bool = False) -> None:
    """Start image/build.sh --test-initramfs --bundle for ``arch`` in the background (once per
    pytest process), signed with a CA made for this run; ``built_image`` waits for it. The
    session starts the arm64 build at collection (conftest.py), so that the longest build of
    the suite runs on the second core while the other tests run on the first."""
    if arch in _builds or arch in _failed or arch in _running or \
            os.environ.get("FLUX_EDGE_TEST_IMAGE_DIR"):
        return
    work = _session() / arch
    work.mkdir()
    keys = make_keys(work / "keys", f"flux-edge test {arch}")
    out = work / "out"
    version = f"1.0.0+test.a.{arch}"
    log_path = work / "build.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BUILD_SH), "--arch", arch, "--test-initramfs", "--bundle", "--out", str(out),
             "--version", version, "--keyring", str(keys.ca), "--signing-cert", str(keys.cert),
             "--signing-key", str(keys.key)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    atexit.register(_stop, proc)  # a session that ends early does not leave a build running
    _running[arch] = _Running(proc, work, out, version, keys, time.monotonic(), log_path,
                              BACKGROUND_BUILD_TIMEOUT if background else BUILD_TIMEOUT)


def settle_background_builds() -> float:
    """Wait until no build started in the background (the arm64 one, at collection) is still
    running, and return how long that took. The A/B test calls this between its own build and
    its QEMU boots: the builds then overlap, and the boots, whose timeouts assume a machine
    doing nothing else, get both cores. A build that fails or runs out of time is reported by
    ``built_image`` in the test that needs it."""
    t0 = time.monotonic()
    for job in list(_running.values()):
        left = job.timeout - (time.monotonic() - job.started)
        with contextlib.suppress(subprocess.TimeoutExpired):  # built_image fails its test
            job.proc.wait(timeout=max(left, 1.0))
    return time.monotonic() - t0


def built_image(arch: str) -> Build:
    """The build of ``arch`` (started now if it was not started before), once it is done.
    FLUX_EDGE_TEST_IMAGE_DIR=DIR reuses a build made before with the keys in DIR/keys (for
    iterating on the checks)."""
    if arch in _builds:
        return _builds[arch]
    if arch in _failed:
        pytest.fail(f"the {arch} image build failed earlier in this run:\n{_failed[arch]}")
    prebuilt = os.environ.get("FLUX_EDGE_TEST_IMAGE_DIR")
    if prebuilt:
        out = Path(prebuilt)
        keys = Keys(out / "keys")
        info = (out / f"flux-edge-{SUITE}-{arch}.build-info").read_text()
        version = re.search(r"^version: +(\S+)", info, re.MULTILINE).group(1)  # type: ignore[union-attr]
        work = _session() / arch
        work.mkdir(exist_ok=True)
        _builds[arch] = Build(arch, out, version, keys, float("nan"), work)
        return _builds[arch]
    start_build(arch)
    job = _running.pop(arch)
    left = job.timeout - (time.monotonic() - job.started)
    try:
        rc = job.proc.wait(timeout=max(left, 1.0))
    except subprocess.TimeoutExpired:
        _stop(job.proc)
        rc = -1
    text = job.log.read_text()
    if rc != 0:
        _failed[arch] = text[-4000:]
        pytest.fail(f"image/build.sh --arch {arch} failed (exit {rc}, build timeout "
                    f"{job.timeout:.0f}s):\n{text[-4000:]}")
    build = Build(arch, job.out, job.version, job.keys, time.monotonic() - job.started, job.work)
    assert build.image.is_file() and build.bundle.is_file() and build.rootfs.is_file(), \
        sorted(p.name for p in job.out.iterdir())
    _builds[arch] = build
    return build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Machine:
    """A QEMU machine (software emulation) booting a disk image by itself (BIOS, GRUB) or with a
    given kernel, its serial console in a file; reboots stay in the same QEMU process."""

    arch: str
    disk: Path
    console: Path
    kernel: tuple[Path, Path, str] | None = None  # (vmlinuz, initrd, cmdline)
    ssh_port: int | None = None
    reboot_exits: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        machine, _tty = QEMU[self.arch]
        nic = "user,id=n0"
        if self.ssh_port:
            nic += f",hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        cmd = [*machine, "-smp", "2", "-m", "1024", "-accel", "tcg,thread=multi",
               "-display", "none", "-monitor", "none", "-serial", "stdio",
               "-drive", f"file={self.disk},format=raw,if=none,id=hd0,cache=unsafe",
               "-device", "virtio-blk-pci,drive=hd0",
               "-netdev", nic, "-device", "virtio-net-pci,netdev=n0"]
        if self.arch == "amd64":
            cmd += ["-device", "i6300esb"]  # the hardware watchdog systemd feeds
        if self.reboot_exits:
            cmd.append("-no-reboot")
        if self.kernel:
            vmlinuz, initrd, cmdline = self.kernel
            cmd += ["-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", cmdline]
        self._log = self.console.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def text(self) -> str:
        return self.console.read_text(errors="replace")

    def wait_console(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until the console (from character ``start`` on) matches ``pattern``."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.text(), start)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"console: no /{pattern}/ within {timeout:.0f}s; last lines:\n"
                             + self.text()[-4000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
            self._log.close()
