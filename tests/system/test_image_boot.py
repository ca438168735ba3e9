"""The arm64 appliance image (Debian trixie, A/B layout), built by image/build.sh, boots under
QEMU to a READY flux-edge.

(FLUX_EDGE_IMAGE_TEST_ARCHS=arm64,amd64 also boots the amd64 twin this way, under
qemu-system-x86_64; by default, and in CI, the amd64 twin is booted by test_ab_update.py, through
its own boot loader, and this test boots the arm64 image. One build per architecture serves both:
tests/system/image_support.py.)

A real build (mmdebstrap through qemu-user, the Ansible role through a chroot connection,
genimage, the RAUC bundle) with ``--test-initramfs``, then a real boot of a copy of the image with
slot A's kernel and initrd (from the boot partition's a/, where the Pi firmware finds them) under
``qemu-system-aarch64 -M virt`` (software emulation: no Pi firmware, so config.txt and tryboot are
checked as files, not run). The copy is made 256 MiB larger than the built image and gets,
without loop devices or mounts, a ``flux-edge.toml`` and an ``authorized_keys`` on its FAT
partition (mtools) and a test-only unit in slot A's root filesystem (``debugfs -w``). The unit,
pulled in by ``systemd.wants=`` on the kernel command line, waits for flux-edge.service to be
active (Type=notify: READY was sent), checks the watchdog is armed, that the first-boot units grew
the data partition and installed the test's configuration on it (and that the daemon runs with
it), that RAUC sees slot A booted and the health gate confirmed it, prints PASS/FAIL lines on the
serial console and powers off.

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
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.system.image_support import (
    BUILD_TIMEOUT,
    COMPATIBLE,
    DISK_ID,
    QEMU,
    built_image,
    partitions,
    require_tools,
)
from tests.system.image_support import debugfs as _debugfs_at

pytestmark = [pytest.mark.slow, pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "image" / "config" / "flux-edge.toml"
ARCHS = os.environ.get("FLUX_EDGE_IMAGE_TEST_ARCHS", "arm64").split(",")
GROW = 256 * 1024 * 1024
BOOT_TIMEOUT = 420.0
MARK = "FLUX-EDGE-IMAGE-TEST:"
TEST_UNIT = "flux-edge-image-test.service"
METRICS_PORT = 9191
# a public key (its private half was thrown away): the SSH import must install it for admin
TEST_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILepAJ59ZbkuMvPNUYpDKmxLzV9KC4vgS+YwKwe1X/32 "
            "flux-edge-image-test")


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


def _script(data_part_size: int, arch: str) -> str:
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

# first boot (a): the data partition grew to the end of the (larger) disk, the root filesystem
# to its slot partition
part=$(findmnt -n -o SOURCE /data)
psize=$(( $(cat /sys/class/block/${{part##*/}}/size) * 512 ))
fsize=$(df -B1 --output=size /data | tail -n 1 | tr -d ' ')
out "detail data $part: partition $psize bytes (built {data_part_size}), filesystem $fsize bytes"
check "growroot ran once (stamp)" test -f /var/lib/flux-edge-image/root-grown
check "data partition grown by the added 256 MiB" \
    test "$psize" -ge $(( {data_part_size} + {GROW} - 8388608 ))
check "data filesystem resized to its partition" test "$fsize" -ge $(( psize * 9 / 10 ))
root=$(findmnt -n -o SOURCE /)
rpsize=$(( $(cat /sys/class/block/${{root##*/}}/size) * 512 ))
rfsize=$(df -B1 --output=size / | tail -n 1 | tr -d ' ')
check "root filesystem fills its slot partition" test "$rfsize" -ge $(( rpsize * 9 / 10 ))

# A/B: slot A booted (partition 2), config and state on the data partition, RAUC agrees
check "root is slot A (PARTUUID {DISK_ID}-02)" \
    test "$(findmnt -n -o PARTUUID /)" = {DISK_ID}-02
check "kernel command line names slot A" grep -q 'rauc.slot=A' /proc/cmdline
for d in /etc/flux-edge /var/lib/flux-edge /home /var/log/journal; do
    src=$(findmnt -n -o SOURCE "$d")  # a bind mount: /dev/vda4[/flux-edge/etc]
    check "$d on the data partition ($src)" test "${{src%%\[*}}" = "$part"
done
systemctl start flux-edge-health-gate.service
check "health gate confirmed slot A" test "$(show flux-edge-health-gate.service Result)" = success
rauc status --output-format=json >/tmp/rauc.json 2>/tmp/rauc.err
out "detail rauc: $(tr -d '\n' </tmp/rauc.json | cut -c1-400) $(tail -n 2 /tmp/rauc.err)"
check "rauc: booted A, compatible {COMPATIBLE[arch]}" python3 -c 'import json
s = json.load(open("/tmp/rauc.json"))
assert s["booted"] == "A" and s["compatible"] == "{COMPATIBLE[arch]}", s'
check "flux-edge runs on Python 3.13 (trixie)" \
    /opt/flux-edge/venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 13)'
check "flux-edge-update status works" /usr/local/sbin/flux-edge-update status
check "systemd feeds a hardware watchdog (RuntimeWatchdogSec)" \
    test "$(systemctl show -p RuntimeWatchdogUSec --value)" = 30s
check "the manual the unit names is installed" \
    test -s "$(show flux-edge.service Documentation | sed 's|^file://||; s| .*||')"

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
    return _debugfs_at(f"{image}?offset={offset}", commands, workdir)


@pytest.mark.timeout(BUILD_TIMEOUT + BOOT_TIMEOUT + 180)
@pytest.mark.parametrize("arch", ARCHS)
def test_image_boots_to_ready_flux_edge(workdir: Path, arch: str,
                                        summary_note: Callable[[str], None]) -> None:
    require_tools(arch)
    t0 = time.monotonic()
    build = built_image(arch)
    waited_s = time.monotonic() - t0
    out, build_s, name = build.out, build.seconds, build.name
    image = build.image
    assert image.is_file() and (out / f"{name}.img.zst").is_file(), sorted(out.iterdir())
    raw_size = image.stat().st_size
    zst_size = (out / f"{name}.img.zst").stat().st_size

    # --- a larger copy, with the test's files on its FAT and its unit in its root ---------------
    disk = workdir / "disk.img"
    _run(["cp", "--sparse=always", str(image), str(disk)])
    with disk.open("r+b") as f:
        f.truncate(raw_size + GROW)
    parts = partitions(disk)
    assert len(parts) == 4, parts  # boot, slot A, slot B, data
    (fat_off, _), (root_off, _), _, (_, data_size) = parts
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
    if arch == "arm64":
        # what the Pi firmware reads: config.txt boots slot A's directory, which holds the kernel,
        # the initrd, cmdline.txt and the device trees of the Pi 3, 4 and 5
        listing = _run(["mdir", "-b", "-i", fat, "::", "::/a"]).stdout.split()
        for need in ("::/config.txt", "::/bootcode.bin", "::/start4.elf", "::/fixup4.dat",
                     "::/a/vmlinuz", "::/a/initrd.img", "::/a/cmdline.txt",
                     "::/a/bcm2837-rpi-3-b.dtb", "::/a/bcm2711-rpi-4-b.dtb",
                     "::/a/bcm2712-rpi-5-b.dtb"):
            assert need in listing, (need, listing)
        _run(["mcopy", "-i", fat, "::/config.txt", str(workdir / "config.txt")])
        _run(["mcopy", "-i", fat, "::/a/cmdline.txt", str(workdir / "cmdline.txt")])
        assert "\nos_prefix=a/\n" in (workdir / "config.txt").read_text()
        pi_cmdline = (workdir / "cmdline.txt").read_text()
        assert f"root=PARTUUID={DISK_ID}-02 rauc.slot=A" in pi_cmdline, pi_cmdline
        _run(["mcopy", "-i", fat, "::/a/vmlinuz", str(workdir / "vmlinuz")])
        _run(["mcopy", "-i", fat, "::/a/initrd.img", str(workdir / "initrd.img")])
    else:
        shutil.copy(out / f"{name}.vmlinuz", workdir / "vmlinuz")
        shutil.copy(out / f"{name}.initrd.img", workdir / "initrd.img")

    unit = workdir / TEST_UNIT
    unit.write_text(_unit())
    script = workdir / "image-test"
    script.write_text(_script(data_size, arch))
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
    cmdline = (f"root=PARTUUID={DISK_ID}-02 rauc.slot=A rw rootflags=noatime fsck.repair=yes "
               f"net.ifnames=0 rootwait console={tty} "
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
    summary_note(f"{arch} image: build {build_s:.0f}s (this test waited {waited_s:.0f}s of it; "
          f"{build.phases}), "
          f"raw {raw_size} bytes ({raw_size / 2**20:.0f} MiB), "
          f"zstd {zst_size} bytes ({zst_size / 2**20:.0f} MiB); boot: READY at "
          f"{int(ready.group(1)) / 1e6 if ready else float('nan'):.1f}s after kernel start, "
          f"verdict {verdict_at or float('nan'):.0f}s and poweroff {boot_s:.0f}s after qemu start")
    print(verdict)
