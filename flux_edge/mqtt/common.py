"""What the MQTT client adapter's users see besides the client: :class:`MqttError`, the
connection settings (:class:`TlsSettings`, :class:`Will`), the callback types, the counters
(:class:`MqttStats`), and the plain-language reasons for failed connections. No paho import
(paho's ``ReasonCode`` is only named for type checking).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flux_edge.errors import FluxError

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode


class MqttError(FluxError):
    """The broker could not be reached, refused us, or refused a message.

    ``broker`` is ``host:port``; ``reason`` a short plain-language cause ("connection refused",
    "bad user name or password", "TLS certificate verification failed: ...").
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"MQTT broker {host}:{port}: {reason}")

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS towards the broker. Empty ``ca_file`` = the system's trusted CAs."""

    ca_file: str = ""
    cert_file: str = ""  # client certificate (mutual TLS), PEM
    key_file: str = ""  # its private key, PEM; default: inside cert_file
    key_password: str = ""
    verify_hostname: bool = True  # check the broker's certificate names the host we dial


@dataclass(frozen=True, slots=True)
class Will:
    """Last will: published by the broker when the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = True


Handler = Callable[[str, bytes, int, bool], "Awaitable[object] | None"]
"""Called on the event loop for each message: ``(topic, payload, qos, retain)``. Return an
awaitable to delay the acknowledgement of a QoS 1/2 message until it completes."""

ConnectionCallback = Callable[[bool, str], None]
"""``(connected, reason)``: True once a connection is accepted (reason ""); False when it is
lost or an attempt fails (reason says why). Called on the event loop."""

SubscribeErrorCallback = Callable[[str, str], None]
"""``(filter, reason)``: the broker refused a subscription."""


@dataclass
class MqttStats:
    """Counters, read by health/metrics and tests."""

    connects: int = 0  # connections accepted
    connect_failures: int = 0  # attempts that failed
    disconnects: int = 0  # established connections that were lost
    received: int = 0  # messages delivered to handlers
    fast_decoded: int = 0  # of them, PUBLISH packets decoded by our codec, not by paho
    fast_acked: int = 0  # PUBACKs of our publishes decoded by our codec, not by paho
    reads: int = 0  # read wake-ups: received / reads = messages handed on per wake-up
    unhandled: int = 0  # messages that matched no subscription
    handler_errors: int = 0
    published: int = 0  # publishes completed
    publish_errors: int = 0
    last_error: str = ""
    last_connect_ts: float | None = None  # wall clock


def os_reason(exc: BaseException, timeout: float) -> str:
    """A short, plain cause for a failed connection attempt."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc}"
    if isinstance(exc, ssl.CertificateError):
        return f"TLS certificate does not match the host: {exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s (connect timeout)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


_CONNACK_REASONS = {
    "Bad user name or password": "bad user name or password",
    "Not authorized": "not authorised (the broker refused these credentials)",
    "Client identifier not valid": "client id rejected by the broker",
    "Server unavailable": "broker unavailable",
    "Server busy": "broker busy",
    "Banned": "banned by the broker",
    "Unsupported protocol version": "the broker does not support this MQTT version",
    "Quota exceeded": "quota exceeded",
    "Connection rate exceeded": "connection rate exceeded",
}


def connack_reason(rc: ReasonCode) -> str:
    name = rc.getName()
    return "broker refused the connection: " + _CONNACK_REASONS.get(name, name)


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SSL context for ``tls``; ValueError saying what is wrong when it cannot be built."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file or None)
        if tls.cert_file:
            ctx.load_cert_chain(
                tls.cert_file, tls.key_file or None, tls.key_password or None
            )
    except (OSError, ValueError) as exc:
        raise ValueError(f"TLS settings: {exc}") from exc
    if not tls.verify_hostname:
        ctx.check_hostname = False
    return ctx
