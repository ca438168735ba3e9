"""Failure counting and the quarantine policy of one plugin (docs/plugin-abi.md, "Limits and
failure"; docs/operations.md, "When a plugin misbehaves").

Every call that fails as a whole (trap, time-out, ABI violation, refusal) is counted; after
``max_failures`` consecutive ones the plugin is quarantined for ``quarantine_s``: its calls fail
at once without entering the guest. When that time is over one trial call is made; since the
count is reset only by a successful call, a failed trial quarantines again at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# upper bounds (seconds, inclusive) of the per-call wall-time histogram in PluginStats.call_counts
CALL_BUCKETS: tuple[float, ...] = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)


# Why an error record (dead letter) was made, the keys of PluginStats.dead_letters; the first
# seven are also the keys of PluginStats.failed_calls (a call that failed as a whole).
REASONS: tuple[str, ...] = (
    "trap",  # the guest trapped (memory bombs end here: memory.grow / table.grow return -1)
    "timeout",  # the call ran to its wall-time limit
    "abi",  # the guest broke the ABI: bad pointers, malformed / non-UTF-8 / too deep output
    "refused",  # flux_process returned a negative number (flux_act: the command was refused)
    "output_bytes",  # the call's output is larger than limits.max_output_bytes
    "host",  # a wasmtime error, a failed host import, or an unexpected host-side exception
    "init",  # a fresh instance (after a fault) could not be made or initialised
    "records",  # one input message produced more than limits.max_records_per_message records
    "guest",  # the guest reported an error line for the message ({"i": ..., "error": ...})
    "quarantined",  # the plugin is quarantined: not called
    "encode",  # the message cannot be put on the wire (host side: register > 65535, ...)
    "unavailable",  # the plugin is closed, or does not export flux_process
)
FAILED_CALL_REASONS: tuple[str, ...] = REASONS[:7]
# Fault kinds (instance.py) -> reason; "error" is a host-side failure.
FAULT_REASONS: dict[str, str] = {
    "trap": "trap",
    "timeout": "timeout",
    "abi": "abi",
    "refused": "refused",
    "output_bytes": "output_bytes",
    "error": "host",
    "init": "init",
}


@dataclass(slots=True)
class PluginStats:
    """Counters for metrics. ``calls`` counts ``flux_process`` calls actually made.

    ``dead_letters`` counts the error records returned, by reason (:data:`REASONS`, every key
    present from the start, so metrics can export zeros); ``failed_calls`` the calls that
    failed as a whole, by reason (:data:`FAILED_CALL_REASONS`). ``errors`` is the sum of
    ``dead_letters`` and ``failures`` the sum of ``failed_calls``; ``traps``, ``timeouts`` and
    ``abi_errors`` are kept as they were (the same numbers as ``failed_calls``' entries).
    """

    calls: int = 0
    messages: int = 0  # messages handed to process()
    errors: int = 0  # error records returned (guest "error" lines, failed calls, quarantine)
    failures: int = 0  # calls that failed as a whole (trap, time-out, ABI, negative return)
    traps: int = 0
    timeouts: int = 0
    abi_errors: int = 0
    recycles: int = 0  # fresh instances made after a failure
    quarantines: int = 0
    last_call_s: float = 0.0  # wall time of the last process() (encode + call + decode)
    total_call_s: float = 0.0
    # calls per CALL_BUCKETS bucket (not cumulative): call_counts[i] counts calls that took at
    # most CALL_BUCKETS[i] and more than the bound before it; the last entry counts the rest
    call_counts: list[int] = field(default_factory=lambda: [0] * (len(CALL_BUCKETS) + 1))
    dead_letters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    failed_calls: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FAILED_CALL_REASONS, 0)
    )
    logs_dropped: int = 0  # guest log messages dropped by the rate limit (total)
    output_bytes: int = 0  # bytes of output copied out of the guest (total)

    def dead(self, reason: str, n: int = 1) -> None:
        """Count ``n`` error records made for ``reason``."""
        self.errors += n
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + n


class Quarantine:
    """The consecutive-failure count and the quarantine deadline of one plugin.

    The hot path reads ``until`` (None: not quarantined, nothing to check) and resets
    ``failures`` itself; the rest happens only after a failure or while quarantined.
    """

    __slots__ = (
        "clock",
        "failures",
        "last_failure",
        "logger",
        "max_failures",
        "name",
        "quarantine_s",
        "stats",
        "until",
    )

    def __init__(
        self,
        name: str,
        *,
        max_failures: int,
        quarantine_s: float,
        clock: Callable[[], float],
        stats: PluginStats,
        logger: logging.Logger,
    ) -> None:
        self.name = name
        self.max_failures = max_failures
        self.quarantine_s = quarantine_s
        self.clock = clock
        self.stats = stats
        self.logger = logger
        self.failures = 0  # consecutive failed calls
        self.last_failure = ""
        self.until: float | None = None  # clock() time the quarantine ends

    @property
    def active(self) -> bool:
        until = self.until
        return until is not None and self.clock() < until

    def text(self, remaining: float) -> str:
        """Why a call is refused while quarantined, ``remaining`` seconds before the end."""
        until = time.strftime("%H:%M:%S", time.gmtime(time.time() + remaining))
        return (
            f"quarantined until {until}Z after {self.failures} consecutive failed call(s) "
            f"(last: {self.last_failure})"
        )

    def record(self, kind: str, msg: str) -> None:
        """Count a call that failed as a whole (``kind``: a key of :data:`FAULT_REASONS`)
        and quarantine the plugin if it was one too many."""
        stats = self.stats
        stats.failures += 1
        reason = FAULT_REASONS.get(kind, "host")
        stats.failed_calls[reason] = stats.failed_calls.get(reason, 0) + 1
        if kind == "trap":
            stats.traps += 1
        elif kind == "timeout":
            stats.timeouts += 1
        elif kind == "abi":
            stats.abi_errors += 1
        self.failures += 1
        self.last_failure = msg
        # failures is reset only by a successful call, so a failed trial after a quarantine
        # quarantines again at once.
        if self.failures >= self.max_failures:
            self.until = self.clock() + self.quarantine_s
            stats.quarantines += 1
            self.logger.error(
                "plugin %r quarantined for %g s after %d consecutive failed call(s); last: %s",
                self.name,
                self.quarantine_s,
                self.failures,
                msg,
            )
        else:
            self.logger.warning("plugin %r: call failed: %s", self.name, msg)

    def end_now(self) -> bool:
        """End the quarantine early (an operator acknowledged it): the next call is its trial
        call, as when it runs out. False if there is no quarantine to end."""
        if not self.active:
            return False
        self.until = self.clock()
        return True

    def recovered(self) -> None:
        """The trial call after a quarantine succeeded."""
        self.until = None
        self.logger.info("plugin %r works again after its quarantine", self.name)
