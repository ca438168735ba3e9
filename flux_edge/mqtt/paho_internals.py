"""Every reliance of flux-edge on paho-mqtt's private internals, and the start-up check of them.

The client adapter (:mod:`flux_edge.mqtt.client`) reads incoming packets faster than paho does
(bench/mqtt_paho.py): it serves paho's 2-3 small socket reads per packet from one large
``recv``, and decodes complete QoS 0/1 PUBLISH packets itself (:mod:`flux_edge.mqtt.codec`).
That needs these parts of paho that are not its public API (all present in paho-mqtt 2.2, the
minor pinned in pyproject.toml because of this module):

- ``Client._sock_recv(bufsize)``: every socket read of paho goes through it; the adapter replaces
  it on its own client instances (:func:`install_recv_hook`).
- ``Client._in_packet["command"]``: 0 while paho is between packets; only then may the adapter
  consume buffered bytes itself (:func:`between_packets`).
- ``Client._last_bytes_received``: paho's keepalive clock (``time.monotonic``); moved on when the
  adapter consumed packets paho never saw (:func:`mark_received`), else paho would think the
  broker silent and drop a busy connection.
- ``Client._out_messages``, ``Client._out_message_mutex`` and ``Client._do_on_publish(mid,
  reason_code, properties)``: what paho's own PUBACK handler (``_handle_pubackcomp``) does once
  it has decoded the packet. The adapter decodes a successful PUBACK of a QoS 1 message itself
  and calls the same (:func:`puback_received`): the message leaves paho's store, its in-flight
  window moves on, and ``on_publish`` runs, with a shared reason code and empty properties
  instead of two new objects per packet (paho builds MQTT 5 Properties with a 30-entry table for
  each: over half of its time per PUBACK in a profile of the daemon).
- ``Client.ack(mid, 1)`` (public, with ``manual_ack=True``) sends a PUBACK for a message id paho
  never decoded, without looking the message up.
- paho's log calls go through ``Logger.log(level, fmt, *args)`` (``Client._easy_log``):
  :class:`PahoErrors` overrides ``log`` to keep the last error text (the OS error of a failed
  receive) for the reason of a lost connection.

:func:`check_paho_internals` verifies all of it on a throw-away client over a local socket pair
(no broker, well under a millisecond) and raises :class:`PahoCompatError`, naming the installed
paho version and what changed. ``MqttClient`` runs it once per process, on first creation,
through :func:`fast_path_usable`.

**When the check fails, the client falls back; it does not fail.** It logs one warning (the
error's text) and then leaves reading entirely to paho: no recv hook, no own decoding, no
private attribute touched. Every message is still delivered, acknowledged and kept alive by
paho's own, supported code, at about 20x the CPU per message (~100 us instead of ~5 us). For
a gateway that runs unattended for years this is the safer choice: the fast path is an
optimisation, and refusing to start would stop every MQTT source, the ``mqtt_publish`` action
and the uplink on a box nobody watches because a distribution or a hand upgrade brought a paho
we do not know. The pin in pyproject.toml keeps a normal install on the tested minor; the
check catches the rest, and the warning (in the journal) says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flux_edge.errors import FluxError

if TYPE_CHECKING:
    from paho.mqtt.client import Client
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("flux_edge.mqtt")

TESTED_PAHO = "2.2"  # the paho-mqtt minor these internals were checked against (pyproject.toml)


class PahoCompatError(FluxError):
    """The installed paho-mqtt's internals are not what the MQTT fast path relies on.

    ``version`` is the installed paho-mqtt version, ``problems`` what changed, one line each.
    """

    def __init__(self, version: str, problems: list[str]) -> None:
        self.version = version
        self.problems = problems
        super().__init__(
            f"paho-mqtt {version} is installed, but flux-edge's MQTT fast path was built "
            f"against paho-mqtt {TESTED_PAHO}.x and its internals changed: "
            + "; ".join(problems)
            + f" (install paho-mqtt {TESTED_PAHO}.x, as pyproject.toml pins it, or update "
            "flux_edge/mqtt/paho_internals.py)"
        )


def paho_version() -> str:
    """The installed paho-mqtt version, as its package metadata (or paho itself) gives it."""
    from importlib import metadata

    try:
        return metadata.version("paho-mqtt")
    except metadata.PackageNotFoundError:
        import paho.mqtt

        return str(getattr(paho.mqtt, "__version__", "unknown"))


# --- the hooks the client uses ---------------------------------------------------------------


def install_recv_hook(client: Client, recv: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """Route every socket read of ``client`` through ``recv(bufsize)``; returns paho's own
    reader (``recv`` calls it for the bytes: it raises BlockingIOError when there are none)."""
    raw: Callable[[int], bytes] = client._sock_recv
    client._sock_recv = recv  # type: ignore[method-assign,assignment]
    return raw


def between_packets(client: Client) -> bool:
    """Whether paho has no partly read packet (so buffered bytes start a new one)."""
    return client._in_packet["command"] == 0


def mark_received(client: Client, when: float) -> None:
    """Tell paho's keepalive that bytes from the broker arrived at ``when`` (time.monotonic)."""
    client._last_bytes_received = when


@functools.cache
def _puback_reason(value: int) -> ReasonCode:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    return ReasonCode(PacketTypes.PUBACK, identifier=value)


@functools.cache
def _no_properties() -> Properties:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    return Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def puback_received(client: Client, mid: int, reason: int = 0) -> None:
    """The broker acknowledged our QoS 1 message ``mid`` with the success code ``reason`` (no
    properties): what paho does with such a PUBACK after decoding it (a mid it does not hold is
    ignored, as paho ignores it). The reason code and properties objects are shared: read them,
    never change them."""
    with client._out_message_mutex:
        if mid in client._out_messages:
            client._do_on_publish(mid, _puback_reason(reason), _no_properties())


class PahoErrors(logging.Logger):
    """Receives paho's own log calls: keeps the last error text (e.g. the OS error of a failed
    receive) for the reason of a lost connection, passes warnings on at debug level, and costs
    one level check for the per-packet debug lines."""

    def __init__(self) -> None:
        super().__init__("flux_edge.mqtt.paho", logging.WARNING)
        self.last = ""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.WARNING:
            return
        text = str(msg) % args if args else str(msg)
        if level >= logging.ERROR:
            self.last = text
        log.debug("paho: %s", text)


# --- the check -------------------------------------------------------------------------------


def check_paho_internals() -> None:
    """Verify that the installed paho has the internals above and that they behave as relied on;
    raise :class:`PahoCompatError` (installed version, what changed) when not."""
    try:
        problems = _probe()
    except Exception as exc:  # noqa: BLE001 - any surprise means: not the paho we know
        problems = [f"probing a client failed: {type(exc).__name__}: {exc}"]
    if problems:
        raise PahoCompatError(paho_version(), problems)


@functools.cache
def fast_path_usable() -> bool:
    """:func:`check_paho_internals`, once per process: False (after one warning) when it fails,
    and the client then leaves reading to paho (see the module docstring)."""
    try:
        check_paho_internals()
    except PahoCompatError as exc:
        log.warning(
            "%s. Falling back to paho's own packet reading: every message is still delivered, "
            "at about 20x the CPU per message", exc,
        )
        return False
    return True


def _probe() -> list[str]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    problems: list[str] = []
    recv = getattr(paho.Client, "_sock_recv", None)
    if not callable(recv):
        problems.append("Client._sock_recv (through which paho reads the socket) is gone")
    elif list(inspect.signature(recv).parameters) != ["self", "bufsize"]:
        problems.append(
            f"Client._sock_recv takes {inspect.signature(recv)} instead of (self, bufsize)"
        )
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="flux-edge-probe",
        protocol=MQTTProtocolVersion.MQTTv311,
        manual_ack=True,
    )
    in_packet = getattr(c, "_in_packet", None)
    if not isinstance(in_packet, dict) or in_packet.get("command") != 0:
        problems.append("Client._in_packet['command'] (0 between packets) is gone")
    if not isinstance(getattr(c, "_last_bytes_received", None), float):
        problems.append("Client._last_bytes_received (paho's keepalive clock) is gone")
    for name in ("_out_messages", "_out_message_mutex", "_do_on_publish", "_inflight_messages"):
        if not hasattr(c, name):
            problems.append(f"Client.{name} (paho's store of unacknowledged messages) is gone")
    if problems:
        return problems  # the behaviour below cannot be probed without them
    errors = PahoErrors()
    c.enable_logger(errors)
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        peer.settimeout(0.5)
        sizes: list[int] = []
        raw = c._sock_recv

        def counting(bufsize: int) -> bytes:
            sizes.append(bufsize)
            return raw(bufsize)

        install_recv_hook(c, counting)
        c._sock = ours  # the probe's only other private: paho's socket, set by connect()
        mark_received(c, 0.0)
        peer.sendall(b"\xd0\x00\xd0")  # a PINGRESP, then the first byte of another
        c.loop_read()
        if not sizes:
            problems.append("paho no longer reads the socket through Client._sock_recv")
        elif not between_packets(c):
            problems.append("Client._in_packet['command'] is not 0 after a whole packet")
        if c._last_bytes_received == 0.0:
            problems.append("reading a packet no longer updates Client._last_bytes_received")
        c.loop_read()
        if sizes and between_packets(c):
            problems.append("Client._in_packet['command'] is 0 in the middle of a packet")
        peer.sendall(b"\x00")
        c.loop_read()
        c.ack(0x1234, 1)  # written at once: no thread, no socket callbacks on this client
        try:
            sent = peer.recv(16)
        except TimeoutError:
            sent = b""
        if sent != b"\x40\x02\x12\x34":
            problems.append(
                f"Client.ack(mid, 1) for a message paho did not decode sent {sent!r}, "
                "not a PUBACK"
            )
        problems += _probe_puback(c, peer)
        peer.sendall(b"\xf0\x00")  # AUTH: unknown to MQTT 3.1.1, paho logs an error
        c.loop_read()
        if not errors.last:
            problems.append("paho's error messages no longer reach Logger.log (enable_logger)")
    finally:
        c._sock = None
        ours.close()
        peer.close()
    return problems


def _probe_puback(c: Client, peer: socket.socket) -> list[str]:
    """A QoS 1 publish on the probe client, then :func:`puback_received` for it: paho must have
    held the message, called on_publish with its mid and success, and let it go."""
    if list(inspect.signature(c._do_on_publish).parameters) != ["mid", "reason_code",
                                                              "properties"]:
        return [f"Client._do_on_publish takes {inspect.signature(c._do_on_publish)} instead of "
                "(mid, reason_code, properties)"]
    seen: list[tuple[int, bool]] = []
    c.on_publish = lambda _c, _u, mid, reason, _p: seen.append((mid, reason.is_failure))
    info = c.publish("flux-edge/probe", b"x", qos=1)
    with contextlib.suppress(TimeoutError):
        peer.recv(64)  # the PUBLISH
    held = info.mid in c._out_messages
    inflight = c._inflight_messages
    puback_received(c, info.mid)
    c.on_publish = None
    if not held:
        return ["a QoS 1 message is not in Client._out_messages until its PUBACK"]
    if seen != [(info.mid, False)]:
        return [f"on_publish after a PUBACK was called as {seen!r}, not once with success"]
    if info.mid in c._out_messages or c._inflight_messages != inflight - 1:
        return ["Client._do_on_publish no longer releases the acknowledged message"]
    return []
