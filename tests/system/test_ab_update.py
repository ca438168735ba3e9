"""A/B updates with RAUC on the amd64 twin of the image, under QEMU, driven by the Ansible update
playbook (ansible/update.yml) over SSH, as a fleet would be.

One build of the trixie amd64 image (``image/build.sh --bundle``, signed with a CA made for this
run) and three more bundles made from its root filesystem with image/bundle.sh:

- *rogue*: signed by a CA the image does not trust;
- *v2*: the same system with another version;
- *never-ready*: a system whose flux-edge.service never sends READY (a drop-in replaces its
  ExecStart with ``sleep infinity``).

One machine boots the image through GRUB (BIOS, the i6300esb watchdog) from slot A, with an SSH
key and a flux-edge.toml on its boot partition and state written by the test, then:

1. the rogue bundle: refused before anything is written; the gateway stays on slot A;
2. v2: installed into slot B, rebooted, confirmed by the health gate: slot B, v2, config and
   state kept;
3. never-ready: installed into slot A, rebooted; the gate gives up after the configured time,
   marks slot A bad and reboots; GRUB falls back to slot B by itself: the playbook reports the
   rollback and fails the host; slot B, v2, config and state still there.

Marked slow (root, runs in CI): about 10 minutes here (build about 2, bundles 1, QEMU the rest).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.system.image_support import (
    BUNDLE_SH,
    COMPATIBLE,
    REPO,
    Build,
    Machine,
    built_image,
    debugfs,
    free_port,
    make_keys,
    partitions,
    require_tools,
    run,
    settle_background_builds,
)

pytestmark = [pytest.mark.slow, pytest.mark.system]

ARCH = "amd64"
ANSIBLE_PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
GROW = 1536 * 1024 * 1024
METRICS_PORT = 9191
# console lines that tell how each boot went, printed when the test fails
KEY_LINES = re.compile(r"flux-edge:|health-gate|growroot|Linux version|watchdog|Watchdog|panic|"
                       r"Oops|BUG|reboot|Reboot|Power-Off|Reached target|Failed|FAILED|"
                       r"emergency|Emergency|rauc|RAUC")
HEALTH_TIMEOUT = 120  # s after the kernel starts: READY came at 48 s here on a trial boot (TCG)
# the never-ready trial waits out its whole timeout, so a shorter one only shortens the wait;
# the boot after it (slot B, no trial pending) is an ordinary one that the gate does not time
NEVER_READY_TIMEOUT = 75
BOOT_TIMEOUT = 420.0


def _bundle(build: Build, work: Path, label: str, edits: str, keys: object = None) -> Path:
    """A copy of the build's root filesystem, changed by debugfs ``edits``, as a bundle."""
    rootfs = work / f"rootfs-{label}.ext4"
    run(["cp", "--sparse=always", str(build.rootfs), str(rootfs)])
    if edits:
        debugfs(str(rootfs), edits, work)
    version = f"1.0.0+test.{label}.{ARCH}"
    k = keys or build.keys
    out = work / f"{label}.raucb"
    run(["bash", str(BUNDLE_SH), "--rootfs", str(rootfs), "--compatible", COMPATIBLE[ARCH],
         "--version", version, "--cert", str(k.cert), "--key", str(k.key),  # type: ignore[attr-defined]
         "--out", str(out)], timeout=600)
    rootfs.unlink()
    return out


def _small_bundle(work: Path, keys: object) -> Path:
    """A well-formed bundle for the image's compatible, signed by ``keys``: a small filesystem
    (the signature is checked before any of it would be written)."""
    src = work / "small-root"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "flux-edge-image-release").write_text(f"VERSION=1.0.0+test.rogue.{ARCH}\n")
    (src / "noise").write_bytes(secrets.token_bytes(1 << 20))  # rauc wants more than 4 KiB
    rootfs = work / "small.ext4"
    run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), str(rootfs), "16M"])
    out = work / "rogue.raucb"
    run(["bash", str(BUNDLE_SH), "--rootfs", str(rootfs), "--compatible", COMPATIBLE[ARCH],
         "--version", f"1.0.0+test.rogue.{ARCH}", "--cert", str(keys.cert),  # type: ignore[attr-defined]
         "--key", str(keys.key), "--out", str(out)])  # type: ignore[attr-defined]
    return out


def _release_edit(work: Path, label: str) -> str:
    release = work / f"release-{label}"
    release.write_text(f"VERSION=1.0.0+test.{label}.{ARCH}\nCOMPATIBLE={COMPATIBLE[ARCH]}\n"
                       f"SUITE=trixie\nARCH={ARCH}\n")
    return f"rm /etc/flux-edge-image-release\nwrite {release} /etc/flux-edge-image-release\n"


class Gateway:
    def __init__(self, port: int, key: Path, work: Path) -> None:
        self.port, self.key, self.work = port, key, work
        self.ssh_opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-o", "BatchMode=yes"]

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> str:
        res = subprocess.run(["ssh", *self.ssh_opts, "-i", str(self.key), "-p", str(self.port),
                              "admin@127.0.0.1", "sudo", "sh", "-c", f"'{command}'"],
                             capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert res.returncode == 0, \
                f"{command}: exit {res.returncode}\n{res.stdout}{res.stderr}"
        return res.stdout

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(["ssh", *self.ssh_opts, "-i", str(self.key), "-p", str(self.port),
                                  "admin@127.0.0.1", "true"], capture_output=True, timeout=60,
                                 check=False)
            if res.returncode == 0:
                return
            time.sleep(2)
        raise AssertionError(f"no SSH within {timeout:.0f}s")

    def wait_active(self, timeout: float = 300) -> str:
        """flux-edge.service active (READY sent): its state once it is, or the last one seen."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl show flux-edge.service -p ActiveState -p WatchdogUSec")
            if "ActiveState=active" in state:
                break
            time.sleep(2)
        return state

    def status(self) -> dict:  # type: ignore[type-arg]
        # `wait` returns once this boot's health gate has finished
        return json.loads(self.sh("/usr/local/sbin/flux-edge-update wait --json", timeout=400))

    def playbook(self, bundle: Path, health_timeout: int = HEALTH_TIMEOUT
                 ) -> subprocess.CompletedProcess[str]:
        inventory = self.work / "inventory.yml"
        inventory.write_text(f"""all:
  children:
    flux_edge_gateways:
      hosts:
        gw-ab:
          ansible_host: 127.0.0.1
          ansible_port: {self.port}
          ansible_user: admin
          ansible_ssh_private_key_file: {self.key}
          ansible_ssh_common_args: {' '.join(self.ssh_opts)}
          ansible_python_interpreter: /usr/bin/python3
""")
        return subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), "update.yml",
             "-e", f"flux_edge_update_bundle={bundle}",
             "-e", f"flux_edge_update_health_timeout={health_timeout}",
             "-e", "flux_edge_update_health_stable=10"], check=False,
            cwd=REPO / "ansible", capture_output=True, text=True, timeout=1800,
            env={"PATH": f"{REPO / '.venv' / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
                 "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False"})


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(subprocess.check_output(
        ["mktemp", "-d", "/var/tmp/flux-edge-ab-test.XXXXXX"], text=True).strip())
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(3600)
def test_ab_update_rollback_and_refusal_under_qemu(workdir: Path,
                                                   summary_note: Callable[[str], None]) -> None:
    require_tools(ARCH, ("ssh", "ssh-keygen"))
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.fail(f"{ANSIBLE_PLAYBOOK} missing: tools/setup.sh installs Ansible into .venv")
    t_start = time.monotonic()
    build = built_image(ARCH)
    t0 = time.monotonic()
    rogue_keys = make_keys(workdir / "rogue-keys", "not the fleet's CA")
    v2 = _bundle(build, workdir, "v2", _release_edit(workdir, "v2"))
    dropin = workdir / "never-ready.conf"
    dropin.write_text("[Service]\nExecStartPre=\nExecStart=\nExecStart=/bin/sleep infinity\n")
    never = _bundle(build, workdir, "never-ready", _release_edit(workdir, "never-ready")
                    + f"write {dropin} "
                    "/etc/systemd/system/flux-edge.service.d/90-never-ready.conf\n")
    rogue = _small_bundle(workdir, rogue_keys)
    bundles_s = time.monotonic() - t0

    # --- the card: a larger copy, an SSH key and a configuration on its boot partition -------
    disk = workdir / "disk.img"
    run(["cp", "--sparse=always", str(build.image), str(disk)])
    with disk.open("r+b") as f:
        f.truncate(build.image.stat().st_size + GROW)
    parts = partitions(disk)
    assert len(parts) == 4, parts
    fat = f"{disk}@@{parts[0][0]}"
    key = workdir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    (workdir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    config = (REPO / "image" / "config" / "flux-edge.toml").read_text().replace(
        'log_level = "info"', f'log_level = "info"\nname = "ab-test-gw"\n\n[metrics]\n'
        f'port = {METRICS_PORT}', 1)
    (workdir / "flux-edge.toml").write_text("# flux-edge-ab-test: the gateway's own config\n"
                                            + config)
    for name in ("authorized_keys", "flux-edge.toml"):
        run(["mcopy", "-i", fat, str(workdir / name), f"::{name}"])

    settled_s = settle_background_builds()  # the arm64 build: not beside the QEMU boots

    port = free_port()
    gw = Gateway(port, key, workdir)
    vm = Machine(ARCH, disk, workdir / "console.log", ssh_port=port)
    timings: dict[str, float] = {}
    vm.start()
    try:
        t0 = time.monotonic()
        vm.wait_console(r"flux-edge: booting slot A", 120)
        gw.wait_ssh(BOOT_TIMEOUT)
        st = gw.status()
        timings["first boot"] = time.monotonic() - t0
        assert st["booted"] == "A" and st["version"] == build.version, st
        assert st["compatible"] == COMPATIBLE[ARCH], st
        assert st["slots"]["A"]["boot_status"] == "good", st
        unit = gw.wait_active()
        assert "ActiveState=active" in unit and "WatchdogUSec=45s" in unit, unit
        assert "# flux-edge-ab-test" in gw.sh("cat /etc/flux-edge/flux-edge.toml")
        assert "/dev/vda4 /data ext4" in gw.sh("cat /proc/mounts")
        # state the daemon keeps, and a marker of the test's own, on the data partition
        token = secrets.token_hex(8)
        gw.sh(f"echo {token} > /var/lib/flux-edge/ab-test-marker")
        state_files = sorted(gw.sh("ls /var/lib/flux-edge").split())
        assert "ab-test-marker" in state_files, state_files

        # --- 1. a bundle signed by another CA is refused, nothing written ------------------
        t0 = time.monotonic()
        res = gw.playbook(rogue)
        timings["rogue bundle"] = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        assert "signature verification failed" in out, out[-3000:]
        assert "gw-ab: slot A, version " + build.version + ": NOT UPDATED" in out, out[-3000:]
        st = gw.status()
        assert st["booted"] == "A" and st["pending"] is None, st
        assert st["slots"]["B"]["version"] is None, st

        # --- 2. v2 into slot B: rebooted, confirmed -----------------------------------------
        t0 = time.monotonic()
        res = gw.playbook(v2)
        timings["update A -> B"] = time.monotonic() - t0
        out = res.stdout + res.stderr
        v2_version = f"1.0.0+test.v2.{ARCH}"
        assert res.returncode == 0, out[-4000:]
        assert f"gw-ab: slot B, version {v2_version}: up to date" in out, out[-3000:]
        st = gw.status()
        assert st["booted"] == "B" and st["version"] == v2_version, st
        assert st["last_result"]["result"] == "good", st
        assert st["slots"]["B"]["boot_status"] == "good", st
        assert st["slots"]["A"]["boot_status"] == "good", st
        assert gw.sh("cat /var/lib/flux-edge/ab-test-marker").strip() == token
        assert "# flux-edge-ab-test" in gw.sh("cat /etc/flux-edge/flux-edge.toml")
        assert sorted(gw.sh("ls /var/lib/flux-edge").split()) >= state_files
        assert "ActiveState=active" in gw.wait_active()
        # the same playbook again: nothing to do
        res = gw.playbook(v2)
        assert res.returncode == 0 and "changed=0" in res.stdout, res.stdout[-3000:]

        # --- 3. a bundle whose flux-edge never becomes READY: back to slot B by itself -------
        t0 = time.monotonic()
        mark = len(vm.text())
        res = gw.playbook(never, NEVER_READY_TIMEOUT)
        timings["never-ready and rollback"] = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-4000:]
        assert f"gw-ab: slot B, version {v2_version}: ROLLED BACK from 1.0.0+test.never-ready" \
            in out, out[-3000:]
        console = vm.text()[mark:]
        assert "flux-edge: booting slot A" in console, console[-3000:]
        assert "FAILED its trial" in console, console[-3000:]
        assert console.rindex("flux-edge: booting slot B") > console.index("booting slot A")
        st = gw.status()
        assert st["booted"] == "B" and st["version"] == v2_version, st
        assert st["last_result"]["result"] == "rolled-back", st
        assert st["last_result"]["failed_slot"] == "A", st
        assert st["slots"]["A"]["boot_status"] == "bad", st
        assert st["pending"] is None, st
        assert gw.sh("cat /var/lib/flux-edge/ab-test-marker").strip() == token
        assert "# flux-edge-ab-test" in gw.sh("cat /etc/flux-edge/flux-edge.toml")
        assert "ActiveState=active" in gw.wait_active()
        gw.sh("systemctl poweroff", check=False)
    except BaseException:
        # what the gateway's console printed is the only record of a boot that went wrong (a
        # slot that reset before the health gate ran leaves nothing in its journal): pytest shows
        # this with the failure
        text = vm.text()
        print("\n--- the gateway's console: every boot, the gate, resets, panics ---")
        print("\n".join(line for line in text.splitlines() if KEY_LINES.search(line)))
        print(f"\n--- the gateway's console, last 12000 characters ---\n{text[-12000:]}")
        raise
    finally:
        vm.stop()
    summary_note(f"A/B under QEMU: build {build.seconds:.0f}s ({build.phases}), three bundles "
                 f"{bundles_s:.0f}s, waited {settled_s:.0f}s for the background build, "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f"; total {time.monotonic() - t_start:.0f}s")
