"""The arm64 appliance image, built by image/build.sh, boots under QEMU to a READY flux-edge.

(FLUX_EDGE_IMAGE_TEST_ARCHS=arm64,amd64 also builds and boots the amd64 twin, under
qemu-system-x86_64; by default, and in CI, only the arm64 image is tested.)

A real build (mmdebstrap through qemu-user, the Ansible role through a chroot connection,
genimage) with ``--test-initramfs``, then a real boot of a copy of the image with its own kernel
and initrd under ``qemu-system-aarch64 -M virt`` (software emulation). The copy is made 256 MiB
larger than the built image and gets, without loop devices or mounts, a ``flux-edge.toml`` and
an ``authorized_keys`` on its FAT partition (mtools) and a test-only unit in its root filesystem
(``debugfs -w``). The unit, pulled in by ``systemd.wants=`` on the kernel command line, waits for
flux-edge.service to be active (Type=notify: READY was sent), checks the watchdog is armed, that
the first-boot units grew the root filesystem and installed the test's configuration (and that
the daemon runs with it), prints PASS/FAIL lines on the serial console and powers off.

Needs root and the image tools (see image/README.md); skipped without them, except on CI (env
CI set), where a missing tool is a failure. Everything it starts or creates (qemu, the build's
binfmt_misc entry, temp dirs) is gone when it ends, also on failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "image" / "build.sh"
DEFAULT_CONFIG = REPO / "image" / "config" / "flux-edge.toml"
ARCHS = os.environ.get("FLUX_EDGE_IMAGE_TEST_ARCHS", "arm64").split(",")
TOOLS = ("mmdebstrap", "genimage", "mke2fs", "mkfs.vfat", "mcopy", "mdir", "debugfs", "zstd")
# how each image boots in QEMU (software emulation: TCG), and its serial console
QEMU = {
    "arm64": (["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72"], "ttyAMA0"),
    "amd64": (["qemu-system-x86_64", "-M", "q35", "-cpu", "max"], "ttyS0"),
}
GROW = 256 * 1024 * 1024
BUILD_TIMEOUT = 900.0
BOOT_TIMEOUT = 420.0
MARK = "FLUX-EDGE-IMAGE-TEST:"
TEST_UNIT = "flux-edge-image-test.service"
METRICS_PORT = 9191
# a public key (its private half was thrown away): the SSH import must install it for admin
TEST_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILepAJ59ZbkuMvPNUYpDKmxLzV9KC4vgS+YwKwe1X/32 "
            "flux-edge-image-test")


def _require_tools(arch: str) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    tools = [*TOOLS, QEMU[arch][0][0]] + (["update-binfmts"] if arch == "arm64" else [])
    problems += [f"{t} missing" for t in tools if shutil.which(t) is None]
    if not os.access("/proc/sys/fs/binfmt_misc", os.F_OK):
        problems.append("no binfmt_misc")
    if problems:
        msg = "image boot test needs: " + ", ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI: a missing tool is a failure; tools/setup.sh installs them)")
        pytest.skip(msg)


def _partitions(image: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of the MBR's primary partitions, read from the image itself."""
    with image.open("rb") as f:
        mbr = f.read(512)
    assert mbr[510:512] == b"\x55\xaa", f"{image}: no MBR boot signature"
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        ptype = entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if ptype:
            parts.append((start * 512, count * 512))
    return parts


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload, no-any-return]


def _test_config() -> str:
    """The default configuration, renamed and on another metrics port: only a daemon running
    with the imported file answers there."""
    text = DEFAULT_CONFIG.read_text()
    extra = f'\nname = "image-test-gw"\n\n[metrics]\nport = {METRICS_PORT}\n'
    text = text.replace('log_level = "info"', 'log_level = "info"' + extra, 1)
    assert f"port = {METRICS_PORT}" in text
    return "# flux-edge-image-test: installed from the FAT partition\n" + text


def _unit() -> str:
    return """[Unit]
Description=flux-edge image boot test (test-only, injected by tests/system/test_image_boot.py)
After=flux-edge-growroot.service flux-edge-import.service

[Service]
Type=oneshot
ExecStart=/usr/local/lib/flux-edge-image/image-test
StandardOutput=journal
TimeoutStartSec=infinity
"""


WIFI_SSID = "flux test net"
WIFI_PASSPHRASE = "correct horse battery"
HOSTNAME = "fe-test-01"


def _script(root_part_size: int) -> str:
    """The checks, run on the booted image. Every line of its verdict goes to the console."""
    ssid_hex = WIFI_SSID.encode().hex()
    psk = hashlib.pbkdf2_hmac("sha1", WIFI_PASSPHRASE.encode(), WIFI_SSID.encode(), 4096, 32).hex()
    return rf"""#!/bin/bash
out() {{ echo "{MARK} $*" >/dev/console; echo "{MARK} $*"; }}
fails=()
check() {{
    local what=$1; shift
    if "$@" >/dev/null 2>&1; then out "ok   $what"; else out "FAIL $what"; fails+=("$what"); fi
}}
show() {{ systemctl show -p "$2" --value "$1"; }}

out "started at uptime $(cut -d' ' -f1 /proc/uptime)s"
deadline=$((SECONDS + 300))
until [ "$(show flux-edge.service ActiveState)" = active ] || [ $SECONDS -ge $deadline ]; do
    sleep 1
done
out "detail ready_us=$(show flux-edge.service ActiveEnterTimestampMonotonic)" \
    "uptime=$(cut -d' ' -f1 /proc/uptime)"
out "detail flux-edge: $(systemctl show -p ActiveState -p SubState -p Result -p NRestarts \
    -p WatchdogUSec -p StatusText flux-edge.service | tr '\n' ' ')"
check "flux-edge.service active (READY sent)" test "$(show flux-edge.service ActiveState)" = active
check "flux-edge.service running" test "$(show flux-edge.service SubState)" = running
wd=$(show flux-edge.service WatchdogUSec)
check "watchdog armed (WatchdogUSec=$wd)" test -n "$wd" -a "$wd" != 0 -a "$wd" != infinity
check "no restarts" test "$(show flux-edge.service NRestarts)" = 0

# first boot (a): the root partition and filesystem grew to the end of the (larger) disk
part=$(findmnt -n -o SOURCE /)
psize=$(( $(cat /sys/class/block/${{part##*/}}/size) * 512 ))
fsize=$(df -B1 --output=size / | tail -n 1 | tr -d ' ')
out "detail root $part: partition $psize bytes (built {root_part_size}), filesystem $fsize bytes"
check "growroot ran once (stamp)" test -f /var/lib/flux-edge-image/root-grown
check "root partition grown by the added 256 MiB" \
    test "$psize" -ge $(( {root_part_size} + {GROW} - 8388608 ))
check "root filesystem resized to its partition" test "$fsize" -ge $(( psize * 9 / 10 ))

# first boot (b): flux-edge.toml from the FAT partition checked, installed, removed from the FAT
check "flux-edge-import.service succeeded" test "$(show flux-edge-import.service Result)" = success
check "test config installed" grep -q '^# flux-edge-image-test:' /etc/flux-edge/flux-edge.toml
check "default config kept as .previous" test -f /etc/flux-edge/flux-edge.toml.previous
check "flux-edge.toml removed from the FAT" test ! -e /boot/firmware/flux-edge.toml
check "import log on the FAT says valid" grep -q 'is valid' /boot/firmware/flux-edge-import.log
check "the daemon runs with the imported config (metrics on :{METRICS_PORT})" \
    python3 -c 'import urllib.request as u
u.urlopen("http://127.0.0.1:{METRICS_PORT}/healthz", timeout=10)'
# first boot (c): SSH key for admin, sshd enabled; password logins off
check "authorized_keys installed for admin" \
    grep -q 'flux-edge-image-test' /home/admin/.ssh/authorized_keys
check "sshd enabled by the key" systemctl is-enabled ssh.service
# sshd makes its host keys first (RSA takes a while under emulation): give it a minute
for _ in $(seq 60); do [ "$(show ssh.service ActiveState)" = activating ] || break; sleep 1; done
check "sshd started (host keys made on the device)" \
    test "$(show ssh.service ActiveState)" = active -a -s /etc/ssh/ssh_host_ed25519_key
# first boot (c): wifi.txt turned into wpa_supplicant-wlan0.conf (passphrase hashed), enabled
wpa=/etc/wpa_supplicant/wpa_supplicant-wlan0.conf
check "wifi.txt: network with the SSID (hex)" grep -qx "[[:space:]]*ssid={ssid_hex}" $wpa
check "wifi.txt: the PSK derived from the passphrase" grep -qx "[[:space:]]*psk={psk}" $wpa
check "wifi.txt: country DE" grep -qx "country=DE" $wpa
check "wifi.txt: no plain passphrase kept" \
    bash -c "! grep -rq '{WIFI_PASSPHRASE}' $wpa /boot/firmware"
check "wifi.txt: file mode 0600" test "$(stat -c %a $wpa)" = 600
wants=/etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants
check "wpa_supplicant@wlan0 started by wlan0 when it appears" \
    test -L $wants/wpa_supplicant@wlan0.service
check "host name from hostname.txt" \
    test "$(hostname)" = {HOSTNAME} -a "$(cat /etc/hostname)" = {HOSTNAME}

# the image's own settings
check "root mounted noatime" findmnt -n -O noatime /
check "journal persistent" test -d "/var/log/journal/$(cat /etc/machine-id)"
check "journald capped (SystemMaxUse=50M)" \
    grep -q '^SystemMaxUse=50M' /etc/systemd/journald.conf.d/50-flux-edge-image.conf
check "machine id made on this boot" grep -qx '[0-9a-f]\{{32\}}' /etc/machine-id
check "units disabled in the image stay so (no first-boot presets)" \
    test "$(systemctl is-enabled wpa_supplicant.service apt-daily.timer | sort -u)" = disabled
check "no password for admin" test "$(getent shadow admin | cut -d: -f2)" = '*'

out "detail failed units: $(systemctl --failed --no-legend --plain | cut -d' ' -f1 | tr '\n' ' ')"
if [ ${{#fails[@]}} -eq 0 ]; then
    out "PASS"
else
    out "FAIL: ${{fails[*]}}"
    journalctl -b -u flux-edge.service -u flux-edge-import.service \
        -u flux-edge-growroot.service --no-pager 2>&1 \
        | tail -n 60 | sed 's/^/{MARK} journal /' >/dev/console
fi
systemctl poweroff --no-block
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # under /var/tmp, not a tmpfs /tmp: the image and its copy are a few GB
    path = Path(tempfile.mkdtemp(prefix="flux-edge-image-test.", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _debugfs(image: Path, offset: int, commands: str, workdir: Path) -> str:
    cmdfile = workdir / "debugfs.cmds"
    cmdfile.write_text(commands)
    res = _run(["debugfs", "-w", "-f", str(cmdfile), f"{image}?offset={offset}"])
    # debugfs exits 0 even when a command fails: its complaints are on stderr
    errors = [ln for ln in res.stderr.splitlines()
              if ln.strip() and not ln.startswith("debugfs ")]
    assert not errors, f"debugfs: {errors}"
    return res.stdout


def _build(workdir: Path, arch: str) -> tuple[Path, float]:
    """Run image/build.sh; returns its output directory and how long it took."""
    out = workdir / "out"
    t0 = time.monotonic()
    build_log = workdir / "build.log"
    with build_log.open("w") as log:
        proc = subprocess.Popen(
            [str(BUILD_SH), "--arch", arch, "--test-initramfs", "--out", str(out)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        try:
            rc = proc.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            # TERM to the whole group (mmdebstrap waits out a TERM of its own): build.sh's trap
            # then disables the binfmt entry it enabled and removes its work directory
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"build did not finish in {BUILD_TIMEOUT:.0f}s:\n"
                        + build_log.read_text()[-3000:])
    build_out = build_log.read_text()
    assert rc == 0, f"image/build.sh failed (exit {rc}):\n{build_out[-4000:]}"
    return out, time.monotonic() - t0


@pytest.mark.timeout(BUILD_TIMEOUT + BOOT_TIMEOUT + 180)
@pytest.mark.parametrize("arch", ARCHS)
def test_image_boots_to_ready_flux_edge(workdir: Path, arch: str) -> None:
    _require_tools(arch)
    name = f"flux-edge-bookworm-{arch}"
    # FLUX_EDGE_TEST_IMAGE_DIR: boot an image built before (an image/build.sh --test-initramfs
    # output directory, left unchanged) instead of building one; for iterating on the checks
    prebuilt = os.environ.get("FLUX_EDGE_TEST_IMAGE_DIR")
    if prebuilt:
        out, build_s = Path(prebuilt), float("nan")
    else:
        out, build_s = _build(workdir, arch)
    image = out / f"{name}.img"
    assert image.is_file() and (out / f"{name}.img.zst").is_file(), sorted(out.iterdir())
    raw_size = image.stat().st_size
    zst_size = (out / f"{name}.img.zst").stat().st_size

    # --- a larger copy, with the test's files on its FAT and its unit in its root ---------------
    disk = workdir / "disk.img"
    _run(["cp", "--sparse=always", str(image), str(disk)])
    if not prebuilt:
        image.unlink()  # keep the disk usage down: only the copy is booted
    with disk.open("r+b") as f:
        f.truncate(raw_size + GROW)
    parts = _partitions(disk)
    assert len(parts) == 2, parts
    (fat_off, _), (root_off, root_size) = parts
    fat = f"{disk}@@{fat_off}"
    config = workdir / "flux-edge.toml"
    config.write_text(_test_config())
    _run(["mcopy", "-i", fat, str(config), "::flux-edge.toml"])
    # the other settings files, written as a Windows editor would (CRLF)
    settings = {
        "authorized_keys": f"{TEST_KEY}\r\n",
        "wifi.txt": f'# test network\r\nssid="{WIFI_SSID}"\r\npsk={WIFI_PASSPHRASE}\r\n'
                    "country=de\r\n",
        "hostname.txt": f"{HOSTNAME}\r\n",
    }
    for name, content in settings.items():
        (workdir / name).write_bytes(content.encode())
        _run(["mcopy", "-i", fat, str(workdir / name), f"::{name}"])
    listing = _run(["mdir", "-b", "-i", fat, "::"]).stdout.split()
    kernel = next(n for n in listing if re.fullmatch(r"::/vmlinuz-.*", n))
    initrd = next(n for n in listing if re.fullmatch(r"::/initrd\.img-.*", n))
    _run(["mcopy", "-i", fat, kernel, str(workdir / "vmlinuz")])
    _run(["mcopy", "-i", fat, initrd, str(workdir / "initrd.img")])

    unit = workdir / TEST_UNIT
    unit.write_text(_unit())
    script = workdir / "image-test"
    script.write_text(_script(root_size))
    _debugfs(disk, root_off, f"""cd /etc/systemd/system
write {unit} {TEST_UNIT}
cd /usr/local/lib/flux-edge-image
write {script} image-test
sif /usr/local/lib/flux-edge-image/image-test mode 0100755
sif /etc/systemd/system/{TEST_UNIT} mode 0100644
""", workdir)
    stat = _run(["debugfs", "-R", "stat /usr/local/lib/flux-edge-image/image-test",
                 f"{disk}?offset={root_off}"]).stdout
    assert "Mode:  0755" in stat, stat
    # the image carries no SSH host keys (each device makes its own) and no machine id
    etc_ssh = _run(["debugfs", "-R", "ls /etc/ssh", f"{disk}?offset={root_off}"]).stdout
    assert "sshd_config" in etc_ssh and "ssh_host_" not in etc_ssh, etc_ssh
    machine_id = _run(["debugfs", "-R", "cat /etc/machine-id", f"{disk}?offset={root_off}"]).stdout
    assert machine_id.strip() == "", machine_id

    # --- boot ---------------------------------------------------------------------------------
    console = workdir / "console.log"
    # as the image's cmdline.txt, with the console on the emulated board's UART
    machine, tty = QEMU[arch]
    cmdline = (f"root=LABEL=RASPIROOT rw fsck.repair=yes net.ifnames=0 rootwait console={tty} "
               f"panic=-1 systemd.wants={TEST_UNIT}")
    qemu_cmd = [
        *machine, "-smp", "2", "-m", "1024",
        "-accel", "tcg,thread=multi", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot",
        "-kernel", str(workdir / "vmlinuz"), "-initrd", str(workdir / "initrd.img"),
        "-append", cmdline,
        "-drive", f"file={disk},format=raw,if=none,id=hd0,cache=unsafe",
        "-device", "virtio-blk-pci,drive=hd0",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
    ]
    t1 = time.monotonic()
    with console.open("wb") as cons:
        qemu = subprocess.Popen(qemu_cmd, stdout=cons, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            verdict_at = None
            while time.monotonic() - t1 < BOOT_TIMEOUT:
                text = console.read_text(errors="replace")
                if verdict_at is None and re.search(rf"{MARK} (PASS|FAIL)", text):
                    verdict_at = time.monotonic() - t1
                if qemu.poll() is not None:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"no poweroff within {BOOT_TIMEOUT:.0f}s; console:\n"
                            + console.read_text(errors="replace")[-5000:])
        finally:
            if qemu.poll() is None:
                os.killpg(qemu.pid, signal.SIGKILL)
            qemu.wait()
    boot_s = time.monotonic() - t1
    text = console.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if MARK in ln]
    verdict = "\n".join(lines) or text[-5000:]
    assert any(ln.endswith(f"{MARK} PASS") for ln in lines), f"boot test failed:\n{verdict}"

    # after the poweroff, from the host: the FAT holds the import log, not the config any more
    after = _run(["mdir", "-b", "-i", fat, "::"]).stdout.split()
    assert "::/flux-edge-import.log" in after, after
    left = [n for n in ("flux-edge.toml", *settings) if f"::/{n}" in after]
    assert not left, f"imported files left on the FAT: {left}"

    ready = re.search(r"ready_us=(\d+)", verdict)
    print(f"\n{arch} image: build {build_s:.0f}s, "
          f"raw {raw_size} bytes ({raw_size / 2**20:.0f} MiB), "
          f"zstd {zst_size} bytes ({zst_size / 2**20:.0f} MiB); boot: READY at "
          f"{int(ready.group(1)) / 1e6 if ready else float('nan'):.1f}s after kernel start, "
          f"verdict {verdict_at or float('nan'):.0f}s and poweroff {boot_s:.0f}s after qemu start")
    print(verdict)
