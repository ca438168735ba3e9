"""systemd's notify protocol (sd_notify(3)): READY, STATUS, WATCHDOG, RELOADING, STOPPING.

The one module that imports ``sdnotify``. Without ``NOTIFY_SOCKET`` (not started by systemd, or
a unit that is not ``Type=notify``) every method is a no-op. A send that fails is logged,
rate-limited, and never raised: losing a notification must not take the daemon down.

sdnotify's own constructor reads ``NOTIFY_SOCKET`` from ``os.environ``, connects once, and swallows
every error. We want the environment to be injectable (tests) and failures to be visible, so
:class:`_Link` connects to the address we give it and sets ``debug`` so that sdnotify's
``notify()`` raises instead of hiding the error. It relies on the two attributes of sdnotify
0.3.x's ``SystemdNotifier`` that ``notify()`` uses (``socket``, ``debug``); pyproject pins <0.4.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import sdnotify

log = logging.getLogger("flux_edge.systemd")

STATUS_MAX = 200  # characters of one STATUS= line
SEND_TIMEOUT = 0.05  # seconds a send may block when systemd does not read its socket
LOG_EVERY = 60.0  # seconds between two log lines about failing sends


class _Link(sdnotify.SystemdNotifier):  # type: ignore[misc]  # sdnotify has no type hints
    """sdnotify's notifier connected to an address we choose, raising on errors."""

    def __init__(self, address: str) -> None:
        # deliberately not calling SystemdNotifier.__init__: it reads os.environ and hides errors
        self.debug = True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.settimeout(SEND_TIMEOUT)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self.socket = sock

    def send(self, state: str) -> None:
        # sdnotify encodes as latin-1; systemd reads UTF-8. Handing it the UTF-8 bytes spelled as
        # latin-1 characters makes it send exactly those bytes, so any text survives.
        self.notify(state.encode("utf-8", "replace").decode("latin-1"))

    def close(self) -> None:
        self.socket.close()


def _socket_address(value: str) -> str:
    """NOTIFY_SOCKET as an AF_UNIX address: ``@name`` is Linux's abstract namespace."""
    return "\0" + value[1:] if value.startswith("@") else value


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process (e.g. our parent, a wrapper script)
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a whole number of microseconds: watchdog off", usec)
        return None
    return value / 1e6 if value > 0 else None


def one_line(text: str, limit: int = STATUS_MAX) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), at most
    ``limit`` characters (cut with an ellipsis)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Notifier:
    """Tells systemd how the service is doing. Every method is cheap and never raises."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.enabled: bool = bool(raw) and raw != "@"
        self._address = _socket_address(raw) if self.enabled else ""
        # without a notify socket nobody could receive the pings: no watchdog either
        self.watchdog_interval: float | None = _watchdog_interval(env) if self.enabled else None
        self._link: _Link | None = None
        self._failures = 0  # failed sends not yet reported in the log
        self._last_log = -LOG_EVERY - 1.0
        if self.enabled:
            self._connect()

    # --- the messages ---------------------------------------------------------------------------

    def ready(self, status: str = "") -> None:
        """The service is up (after start, or after a reload finished)."""
        self._send("READY=1" + (f"\nSTATUS={one_line(status)}" if status else ""))

    def reloading(self) -> None:
        """A reload starts; follow it with :meth:`ready` when it is done (even if it failed)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1" + (f"\nSTATUS={one_line(status)}" if status else ""))

    def status(self, text: str) -> None:
        """A short live summary, shown by ``systemctl status``."""
        self._send(f"STATUS={one_line(text)}")

    def watchdog(self) -> None:
        """Keep-alive ping; only send it while the service really makes progress."""
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's start/stop timeout kills us (long drain)."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1e6))}")

    def close(self) -> None:
        """Close the socket (later messages reconnect)."""
        if self._link is not None:
            self._link.close()
            self._link = None

    # --- plumbing -------------------------------------------------------------------------------

    def _connect(self) -> _Link | None:
        try:
            self._link = _Link(self._address)
        except OSError as exc:
            self._failed("cannot connect to", exc)
            return None
        return self._link

    def _send(self, state: str) -> None:
        if not self.enabled:
            return
        link = self._link or self._connect()
        if link is None:
            return
        try:
            link.send(state)
        except OSError as exc:
            # reconnect next time: systemd may have re-created its socket
            link.close()
            self._link = None
            self._failed("cannot send to", exc)
            return
        if self._failures:
            log.info(
                "the systemd notify socket works again after %d failed attempts", self._failures
            )
            self._failures = 0
            self._last_log = -LOG_EVERY - 1.0

    def _failed(self, what: str, exc: OSError) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY:
            return
        self._last_log = now
        shown = self._address.replace("\0", "@")
        more = f" ({self._failures} failures so far)" if self._failures > 1 else ""
        log.warning(
            "%s the systemd notify socket %s: %s%s; systemd may consider the service hung",
            what,
            shown,
            exc.strerror or exc,
            more,
        )
