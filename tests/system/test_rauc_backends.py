"""The Raspberry Pi's RAUC boot loader backend (image/rootfs/usr/local/lib/flux-edge-image/
rauc-tryboot-backend) on a directory standing in for the boot partition, with the image's own
config.txt: which file names which slot after each step RAUC and the health gate take.

This checks the backend's side only. That the Pi firmware boots tryboot.txt once after
``reboot "0 tryboot"`` and config.txt otherwise is the firmware's documented behaviour, not
verified here (no board in the tests: docs/provisioning.md).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BACKEND = REPO / "image" / "rootfs" / "usr" / "local" / "lib" / "flux-edge-image" / \
    "rauc-tryboot-backend"
CONFIG = REPO / "image" / "boot" / "config.txt"

pytestmark = pytest.mark.system


class Pi:
    def __init__(self, root: Path) -> None:
        self.fat = root / "firmware"
        self.fat.mkdir()
        (self.fat / "config.txt").write_text(CONFIG.read_text().replace("@SLOT_DIR@", "a/"))
        for slot in "ab":
            (self.fat / slot).mkdir()
            (self.fat / slot / "cmdline.txt").write_text(f"root=... rauc.slot={slot.upper()}\n")
        self.cmdline = root / "cmdline"
        self.boot("A")

    def boot(self, slot: str) -> None:
        self.cmdline.write_text(f"console=ttyS1 rw rauc.slot={slot} rootwait\n")

    def __call__(self, *args: str, ok: bool = True) -> str:
        res = subprocess.run(["bash", str(BACKEND), *args], capture_output=True, text=True,
                             env={"FLUX_EDGE_FAT": str(self.fat),
                                  "FLUX_EDGE_CMDLINE": str(self.cmdline),
                                  "PATH": "/usr/bin:/bin"}, timeout=30, check=False)
        assert (res.returncode == 0) == ok, (args, res.returncode, res.stdout, res.stderr)
        return res.stdout.strip()

    def names(self, name: str) -> str | None:
        path = self.fat / name
        if not path.exists():
            return None
        prefixes = re.findall(r"^os_prefix=([ab])/$", path.read_text(), re.MULTILINE)
        assert len(prefixes) == 1, path.read_text()
        return prefixes[0].upper()


def test_an_update_is_tried_once_and_made_permanent_by_mark_good(tmp_path: Path) -> None:
    pi = Pi(tmp_path)
    assert pi("get-primary") == "A" and pi("get-current") == "A"
    assert pi("get-state", "A") == "good"
    # rauc install: the target marked bad while it is written, then made primary
    pi("set-state", "B", "bad")
    assert pi("get-state", "B") == "bad"
    pi("set-primary", "B")
    assert pi.names("config.txt") == "A", "the normal boot must still be the old slot"
    assert pi.names("tryboot.txt") == "B"
    assert pi("get-primary") == "B" and pi("get-state", "B") == "good"
    # the rest of config.txt is carried into tryboot.txt unchanged
    assert (pi.fat / "tryboot.txt").read_text() == \
        (pi.fat / "config.txt").read_text().replace("os_prefix=a/", "os_prefix=b/")
    # the tryboot boot: the health gate marks the booted slot good
    pi.boot("B")
    pi("set-state", "B", "good")
    assert pi.names("config.txt") == "B" and pi.names("tryboot.txt") is None
    assert pi("get-primary") == "B" and pi("get-current") == "B"


def test_a_failed_trial_leaves_the_old_slot_in_config_txt(tmp_path: Path) -> None:
    pi = Pi(tmp_path)
    pi("set-state", "B", "bad")
    pi("set-primary", "B")
    pi.boot("B")
    # the gate gives up: mark-bad booted, then a plain reboot, which reads config.txt
    pi("set-state", "B", "bad")
    assert pi.names("config.txt") == "A" and pi.names("tryboot.txt") is None
    assert pi("get-primary") == "A" and pi("get-state", "B") == "bad"
    pi.boot("A")
    pi("set-state", "A", "good")  # the old slot's ordinary confirmation changes nothing
    assert pi.names("config.txt") == "A"


def test_a_reboot_that_misses_the_trial_keeps_the_old_slot(tmp_path: Path) -> None:
    pi = Pi(tmp_path)
    pi("set-state", "B", "bad")
    pi("set-primary", "B")
    # power cut, watchdog reset or a plain reboot: the firmware reads config.txt, slot A runs
    pi.boot("A")
    pi("set-state", "A", "good")
    assert pi.names("config.txt") == "A"
    # RAUC's "mark-bad other" from the health gate drops the stale trial
    pi("set-state", "B", "bad")
    assert pi.names("tryboot.txt") is None and pi("get-primary") == "A"


def test_refuses_what_it_cannot_boot(tmp_path: Path) -> None:
    pi = Pi(tmp_path)
    pi("set-primary", "C", ok=False)
    pi("set-state", "A", "maybe", ok=False)
    for f in (pi.fat / "b").iterdir():
        f.unlink()
    pi("set-primary", "B", ok=False)  # no boot files for slot B on the boot partition
    assert pi.names("tryboot.txt") is None
    pi("set-primary", "A")  # the current slot: nothing to try
    assert pi.names("tryboot.txt") is None and pi.names("config.txt") == "A"
