"""The two clocks: durations on the monotonic clock, timestamps on the wall clock.

A Raspberry Pi has no RTC: it boots at the last saved time and jumps, often by hours, when NTP
syncs. So every duration (rule ``for`` periods and cooldowns, min on/off times, rate limits,
back-offs) runs on ``time.monotonic`` and is carried across a restart as monotonic time plus the
boot it belongs to (:func:`boot_id`): within one boot (a daemon restart) the downtime counts;
after a reboot the remaining time at shutdown is what is left (the time the gateway was off is
unknowable without a trusted clock). Measurement timestamps come from the wall clock and are
flagged while it is not known to be synchronised (:class:`ClockSync`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["SYNC_FLAG", "SYSTEM_CLOCK", "ClockSync", "boot_id", "carry_offset"]

SYNC_FLAG = Path("/run/systemd/timesync/synchronized")  # systemd-timesyncd touches it
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# a wall clock before this (2025-01-01) cannot be right: the build is newer
PLAUSIBLE_AFTER = 1735689600.0
_RECHECK = 10.0  # seconds between two looks at the flag file


def boot_id() -> str:
    """This boot's id ("" where the kernel does not say)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def carry_offset(saved_boot: str, saved_at: float, now: float) -> float:
    """What to add to duration-clock times saved in boot ``saved_boot`` (at duration-clock time
    ``saved_at``) to use them now: 0 in the same boot, else the shift that keeps the time that
    had elapsed at the save (the time the gateway was off does not count)."""
    if saved_boot and saved_boot == boot_id():
        return 0.0
    return now - saved_at


class ClockSync:
    """Is the wall clock trustworthy? Synchronised when systemd-timesyncd says so (its flag
    file) or, on systems without it (no ``/run/systemd/timesync``), when the year is
    plausible. ``wall`` and ``mono`` are injectable for tests."""

    def __init__(
        self,
        *,
        flag: Path = SYNC_FLAG,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.flag = flag
        self._wall = wall
        self._mono = mono
        self._checked = -float("inf")
        self._synced = False
        self.unsynced_stamps = 0  # measurements stamped while not synchronised (a metric)

    def synced(self) -> bool:
        now = self._mono()
        if now - self._checked >= _RECHECK or not self._synced:
            self._checked = now
            self._synced = self._look()
        return self._synced

    def _look(self) -> bool:
        if self._wall() < PLAUSIBLE_AFTER:
            return False
        if self.flag.exists():
            return True
        # no timesyncd on this system: the plausible year is all we can check
        return not os.path.isdir(self.flag.parent)

    def reason(self) -> str:
        if self._wall() < PLAUSIBLE_AFTER:
            return f"the wall clock says {time.strftime('%Y-%m-%d', time.gmtime(self._wall()))}"
        if not self.synced():
            return f"not synchronised yet ({self.flag} missing)"
        return ""


#: the daemon's view of the system's wall clock (the outbox flags records with it, /metrics
#: and /healthz report it)
SYSTEM_CLOCK = ClockSync()
