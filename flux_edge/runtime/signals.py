"""The daemon's signals from the first instruction on (issue #13, item 4).

``flux_edge/__main__.py`` (``python -m flux_edge`` and the ``flux-edge`` command) blocks SIGHUP,
SIGTERM and SIGINT before it imports anything else, so a ``systemctl reload`` or ``stop`` that
comes while the interpreter is still importing or loading the configuration is held, not acted
on by the default action (which, for SIGHUP, is to die). ``cli.main`` lets them through at once
for every command but ``run``; ``Daemon.run`` lets them through once its handlers are on the
event loop, and every signal that came meanwhile is delivered to them then.

What each signal does, at any moment (docs/operations.md, "Signals"):
- SIGTERM / SIGINT: stop (during start-up too: the start is abandoned and what was started is
  shut down); a second one during the shutdown cuts the drain and the outbox flush short, but
  actuators still go to their safe state;
- SIGHUP: reload; one that comes during start-up or a reload is done after it; during the
  shutdown it is ignored (logged).
"""

from __future__ import annotations

import signal

__all__ = ["HANDLED", "block", "unblock"]

HANDLED = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


def block() -> None:
    """Hold SIGHUP, SIGTERM and SIGINT (pending until ``unblock``); threads started meanwhile
    inherit the mask, so only the main thread ever takes them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def unblock() -> None:
    """Let them through: what is pending is delivered now, to whatever handles them."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
