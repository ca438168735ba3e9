"""MQTT: topic helpers and the one client adapter. The ONLY module that imports paho-mqtt (2.x).

Three users share :class:`MqttClient`: MQTT sources (subscribe), the MQTT publish action and the
durable uplink (publish and wait for the broker's acknowledgement).

Design (measured in bench/mqtt_paho.py, see the numbers there):

- **No network thread.** paho's external-loop API is driven from asyncio: the socket is watched
  with ``loop.add_reader`` / ``add_writer`` and serviced with ``loop_read`` / ``loop_write``; a
  1 s timer calls ``loop_misc`` (keepalive). Every paho call and every callback runs on the event
  loop thread, so handlers need no locks and no cross-thread hops. The one exception is the
  connection attempt itself (DNS, TCP connect, TLS handshake, queueing CONNECT): paho does it with
  blocking calls, so ``reconnect()`` runs in a worker thread (``run_in_executor``) while nothing
  else touches the client; the socket is registered with the loop when it returns.
- **connect() semantics.** ``start()`` launches a background task that keeps the client connected
  for its whole life: attempts back off exponentially (``reconnect_min`` doubling to
  ``reconnect_max``, with jitter) and never give up; each outcome is reported through
  ``on_connection_change(connected, reason)``. ``await connect(timeout=None)`` starts that task
  if needed and returns once connected; with a timeout it raises :class:`MqttError` carrying the
  reason of the last failed attempt ("connection refused", "bad user name or password", TLS ...)
  while the background attempts go on. A daemon therefore never fails to start because a broker
  is down.
- **Subscriptions** are remembered and sent again after every reconnect (MQTT 5 with "retain
  handling 1", so a session that kept them does not replay retained messages). Handlers are
  called on the loop with ``(topic, payload, qos, retain)``.
- **Flow control for incoming QoS 1/2.** The client acknowledges messages itself (paho's manual
  ack), in the order received. A handler that returns an awaitable delays that message's
  PUBACK/PUBCOMP until it completes, so a slow consumer is throttled by the broker's in-flight
  window (the client sends MQTT 5 Receive Maximum = ``max_inflight``) instead of buffering without
  bound; a handler returning None has its message acknowledged at once. Brokers do not always
  keep to that window (mosquitto 2.0.11 overruns it once acknowledgements flow,
  eclipse-mosquitto/mosquitto#2301), so a consumer can also ``pause_reading()``: the socket is
  not read (TCP back-pressure) until ``resume_reading()``.
- **Reading** takes up to 64 packets per readiness event while they carry messages (paho reads
  one packet per ``loop_read``): about 1.5x the drain rate of one packet per event.
- **publish()** waits for a connection, then completes when the message is written (QoS 0) or
  acknowledged by the broker (QoS 1 PUBACK / QoS 2 PUBCOMP) and raises MqttError when the broker
  refuses it (MQTT 5 reason code). QoS 1/2 messages survive a reconnect: paho resends them and
  the await continues. At most ``max_queued`` publishes are outstanding; more wait (back-pressure)
  rather than grow paho's queue.
- **TCP_NODELAY** is set on every socket (``on_socket_open``) and paho's in-flight window raised
  from 20 to ``max_inflight`` (default 100). Measured (bench/mqtt_paho.py): across a link with a
  20 ms round trip QoS 1 publish throughput is ~500 msg/s with 20 in flight, ~1,500 with 100,
  ~6,000 with 1,000; on loopback 1,000 is slower than 100 (paho scans its in-flight messages on
  every PUBACK), so 100 is the default and the uplink may raise it. Nagle made no measurable
  difference on loopback (publishes one at a time never have unacknowledged data behind them);
  it is set for real links where delayed ACKs would hold back pipelined small packets.

Errors: :class:`MqttError` (host:port and a plain reason). Callers re-raise it in their own terms
(``SourceError`` for sources, ``UplinkError`` for the uplink, ``ActionError`` for actions).

The topic helpers (``check_filter``, ``topic_matches``, ``DevicePattern``, ...) are pure and do
not import paho, so the config checker can use them cheaply; paho is imported on first use of
``MqttClient``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from flux_edge.errors import FluxError

if TYPE_CHECKING:
    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("flux_edge.mqtt")

# =================================================================================================
# Topic helpers (pure; MQTT 3.1.1 section 4.7 and MQTT 5.0 section 4.7)
# =================================================================================================

MAX_TOPIC_BYTES = 65535
_SHARE_PREFIX = "$share/"


def _check_common(text: str, what: str) -> str | None:
    if not text:
        return f"an empty {what} is not allowed"
    if "\x00" in text:
        return f"a {what} must not contain the NUL character"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"a {what} is limited to {MAX_TOPIC_BYTES} bytes of UTF-8"
    return None


def check_topic(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None when it is a valid topic name."""
    problem = _check_common(topic, "topic")
    if problem:
        return problem
    if "+" in topic or "#" in topic:
        return f"topic {topic!r} contains a wildcard (+ or #): wildcards are for subscriptions"
    return None


def check_filter(topic_filter: str) -> str | None:
    """Why ``topic_filter`` cannot be subscribed to, or None when it is a valid filter.

    ``+`` must fill a whole level, ``#`` must be the last level; ``$share/<group>/<filter>``
    (MQTT 5 shared subscriptions) is accepted and its filter part checked.
    """
    problem = _check_common(topic_filter, "topic filter")
    if problem:
        return problem
    body = topic_filter
    if topic_filter.startswith(_SHARE_PREFIX):
        group, sep, body = topic_filter[len(_SHARE_PREFIX):].partition("/")
        if not group or not sep or not body or "+" in group or "#" in group:
            return (
                f"shared subscription {topic_filter!r} must be $share/<group>/<filter> with a "
                "group name without wildcards"
            )
    levels = body.split("/")
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                return (
                    f"in {topic_filter!r}, '#' must fill a whole level (level {i + 1}: {level!r})"
                )
            if i != len(levels) - 1:
                return f"in {topic_filter!r}, '#' is only allowed as the last level"
        elif "+" in level and level != "+":
            return f"in {topic_filter!r}, '+' must fill a whole level (level {i + 1}: {level!r})"
    return None


def _filter_body(topic_filter: str) -> str:
    """The matching part of a filter (without a ``$share/<group>/`` prefix)."""
    if topic_filter.startswith(_SHARE_PREFIX):
        return topic_filter[len(_SHARE_PREFIX):].partition("/")[2]
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a message published on ``topic`` is delivered to a subscription ``topic_filter``.

    ``+`` matches exactly one level (possibly empty), ``#`` the parent level and any number of
    child levels, and a filter starting with a wildcard does not match topics starting with ``$``
    (``$SYS/...``). Raises ValueError for an invalid filter (see :func:`check_filter`).
    """
    problem = check_filter(topic_filter)
    if problem:
        raise ValueError(problem)
    return _matches(_filter_body(topic_filter).split("/"), topic)


def _matches(filter_levels: list[str], topic: str) -> bool:
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(filter_levels):
        if f == "#":
            return True  # "a/#" matches "a" too: len(topic_levels) >= i is guaranteed here
        if i >= len(topic_levels):
            return False
        if f != "+" and f != topic_levels[i]:
            return False
    return len(topic_levels) == len(filter_levels)


class DevicePattern:
    """A topic pattern naming the device: ``"site/{device}/telemetry"``.

    Exactly one level is ``{device}``; the others are literal, ``+``, or a final ``#``.
    ``device(topic)`` returns the ``{device}`` level of a matching topic (never empty), else None.
    ``subscription`` is the pattern as an MQTT filter (``{device}`` -> ``+``).
    Raises ValueError for a malformed pattern, saying what is wrong.
    """

    __slots__ = ("_index", "_levels", "pattern", "subscription")

    def __init__(self, pattern: str) -> None:
        levels = pattern.split("/")
        marks = [i for i, level in enumerate(levels) if "{device}" in level]
        if len(marks) != 1:
            raise ValueError(
                f"device pattern {pattern!r} must contain {{device}} exactly once "
                f"(found {len(marks)}), e.g. \"site/{{device}}/telemetry\""
            )
        index = marks[0]
        if levels[index] != "{device}":
            raise ValueError(
                f"in device pattern {pattern!r}, {{device}} must fill a whole topic level "
                f"(level {index + 1} is {levels[index]!r})"
            )
        subscription = "/".join("+" if i == index else lv for i, lv in enumerate(levels))
        problem = check_filter(subscription)
        if problem or "{" in subscription or "}" in subscription:
            raise ValueError(
                f"device pattern {pattern!r}: "
                + (problem or "only {device} may appear in braces")
            )
        self.pattern = pattern
        self.subscription = subscription
        self._levels = subscription.split("/")
        self._index = index

    def device(self, topic: str) -> str | None:
        if not _matches(self._levels, topic):
            return None
        name = topic.split("/", self._index + 1)[self._index]
        return name or None

    def __repr__(self) -> str:
        return f"DevicePattern({self.pattern!r})"


@functools.lru_cache(maxsize=64)
def _device_pattern(pattern: str) -> DevicePattern:
    return DevicePattern(pattern)


def device_from_topic(pattern: str, topic: str) -> str | None:
    """The ``{device}`` level of ``topic`` under ``pattern`` (see :class:`DevicePattern`), or None
    when the topic does not match. Raises ValueError for a malformed pattern."""
    return _device_pattern(pattern).device(topic)


# =================================================================================================
# Client adapter
# =================================================================================================


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
    unhandled: int = 0  # messages that matched no subscription
    handler_errors: int = 0
    published: int = 0  # publishes completed
    publish_errors: int = 0
    last_error: str = ""
    last_connect_ts: float | None = None  # wall clock


_STABLE_AFTER = 10.0  # a connection that lasted this long resets the backoff
_MISC_INTERVAL = 1.0  # loop_misc (keepalive) period
_DISPATCH_CACHE_MAX = 4096
_READ_BURST = 64  # packets read per readiness event while they keep carrying messages
_RECV_CHUNK = 65536  # bytes taken from the socket per recv (paho asks for 1 byte, then the rest)


class _PahoErrors(logging.Logger):
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


def _os_reason(exc: BaseException, timeout: float) -> str:
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


def _connack_reason(rc: ReasonCode) -> str:
    name = rc.getName()
    return "broker refused the connection: " + _CONNACK_REASONS.get(name, name)


class _PendingAck:
    __slots__ = ("done", "gen", "mid", "qos")

    def __init__(self, gen: int, mid: int, qos: int) -> None:
        self.gen = gen
        self.mid = mid
        self.qos = qos
        self.done = False


class MqttClient:
    """One MQTT connection driven by the asyncio loop (see the module docstring).

    Create it on the loop that will use it (or before; ``start()``/``connect()`` bind it to the
    running loop). ``clean_start``: True, False, or "first_only" (clean on the first connection
    of this object, resume the session on reconnects). ``session_expiry`` (MQTT 5, seconds): how
    long the broker keeps the session after a disconnect, so QoS 1/2 messages published while the
    link was down are delivered after the reconnect; 0 ends it with the connection. With MQTT
    3.1.1 ``clean_start`` True/"first_only" means clean session, False a persistent one.
    """

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int = 1883,
        *,
        username: str = "",
        password: str = "",
        keepalive: float = 30,
        tls: TlsSettings | None = None,
        will: Will | None = None,
        max_inflight: int = 100,
        max_queued: int = 1000,
        reconnect_min: float = 1.0,
        reconnect_max: float = 60.0,
        clean_start: bool | Literal["first_only"] = "first_only",
        session_expiry: float = 0.0,
        protocol: Literal["5", "3.1.1"] = "5",
        connect_timeout: float = 10.0,
        tcp_nodelay: bool = True,
        on_connection_change: ConnectionCallback | None = None,
        on_subscribe_error: SubscribeErrorCallback | None = None,
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        if not client_id:
            raise ValueError("an MQTT client id is required (it names the session at the broker)")
        if max_inflight < 1 or max_queued < 1:
            raise ValueError("max_inflight and max_queued must be >= 1")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = max(round(keepalive), 0)
        self.connect_timeout = connect_timeout
        self.tcp_nodelay = tcp_nodelay  # False only to measure what Nagle costs
        self.reconnect_min = max(reconnect_min, 0.001)
        self.reconnect_max = max(reconnect_max, self.reconnect_min)
        self.max_inflight = min(max_inflight, 65535)
        self.on_connection_change = on_connection_change
        self.on_subscribe_error = on_subscribe_error
        self.stats = MqttStats()
        # filter -> QoS granted / reason refused, by this connection's SUBACKs
        self.granted: dict[str, int] = {}
        self.refused: dict[str, str] = {}

        self._v5 = protocol == "5"
        version = MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {}
        if not self._v5:
            kwargs["clean_session"] = clean_start is not False
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=version,
            reconnect_on_failure=False,
            manual_ack=True,
            **kwargs,
        )
        self._paho: Client = c
        # paho reads each packet with 2-3 recv() calls (command byte, length bytes, body): a
        # syscall each. Serve them from one large recv instead (paho 2.x calls _sock_recv for
        # every socket read; pinned below 3).
        self._recv_raw = c._sock_recv
        self._rbuf = b""
        self._rpos = 0
        c._sock_recv = self._buffered_recv  # type: ignore[method-assign]
        c.suppress_exceptions = False
        c.enable_logger(_PahoErrors())
        if username:
            c.username_pw_set(username, password or None)
        if tls is not None:
            c.tls_set_context(self._tls_context(tls))
        if will is not None:
            problem = check_topic(will.topic)
            if problem:
                raise ValueError(f"last will: {problem}")
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.max_inflight_messages_set(self.max_inflight)
        c.max_queued_messages_set(0)  # bounded by our own publish slots instead (back-pressure)
        c.connect_timeout = connect_timeout
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write

        properties: Properties | None = None
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = self.max_inflight
            if session_expiry > 0:
                properties.SessionExpiryInterval = min(int(session_expiry), 0xFFFFFFFF)
        clean: Any = paho.MQTT_CLEAN_START_FIRST_ONLY
        if self._v5 and clean_start != "first_only":
            clean = clean_start
        c.connect_async(host, port, self.keepalive, clean_start=clean, properties=properties)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._connect_job: asyncio.Future[Any] | None = None
        self._closing = False
        self._connected_ev: asyncio.Event | None = None
        self._connected = False
        self._connack: asyncio.Future[bool] | None = None
        self._lost: asyncio.Future[str] | None = None
        self._sock_closed: asyncio.Event | None = None
        self._suback_ev: asyncio.Event | None = None
        self._fd = -1
        self._attached = False  # reader/writer registered with the loop
        self._writer_on = False
        self._paused = False  # reading paused by the consumer (pause_reading)
        self._misc_timer: asyncio.TimerHandle | None = None
        self._gen = 0  # connection generation: acks never cross to a new connection
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._sub_mids: dict[int, list[str]] = {}
        self._dispatch_cache: dict[str, tuple[Handler, ...]] = {}
        self._acks: collections.deque[_PendingAck] = collections.deque()
        self._handling: set[asyncio.Future[object]] = set()
        self._waiters: dict[int, tuple[asyncio.Future[None], int]] = {}
        self._pub_slots: asyncio.Semaphore | None = None
        self._max_queued = max_queued
        self._failures = 0
        self._rng = random.Random()
        self._abort_reason = ""
        self._handler_log_ts = -float("inf")

    # --- public API ---------------------------------------------------------------------------

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> str:
        return self.stats.last_error

    def socket(self) -> socket.socket | None:
        """The live socket (for diagnostics and tests), or None when not connected."""
        sock = self._paho.socket()
        return sock if isinstance(sock, socket.socket) else None

    def start(self) -> None:
        """Start keeping the connection up in the background (idempotent). Needs a running loop."""
        if self._closing:
            raise MqttError(self.host, self.port, "client is closed")
        self._bind()
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep(), name=f"mqtt:{self.client_id}"
            )

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Start the background connection (if not yet) and return once connected. With a
        timeout, raise MqttError with the last failure's reason when it passes (attempts go
        on in the background until ``close()``)."""
        self.start()
        await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        ev = self._bind_event()
        if self._connected:
            return
        try:
            async with asyncio.timeout(timeout):
                while not self._connected:
                    if self._closing:
                        raise MqttError(self.host, self.port, "client is closed")
                    await ev.wait()  # set while connected, and by close()
        except TimeoutError:
            reason = self.stats.last_error or "still connecting"
            raise MqttError(
                self.host, self.port, f"not connected after {timeout:g} s: {reason}"
            ) from None

    def subscribe(self, topic_filter: str, qos: int, handler: Handler) -> None:
        """Subscribe (now if connected, and again after every reconnect). A second call with the
        same filter replaces its QoS and handler. Raises ValueError for a bad filter or QoS."""
        problem = check_filter(topic_filter)
        if problem:
            raise ValueError(problem)
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, got {qos}")
        self._subs[topic_filter] = (qos, handler)
        self._dispatch_cache.clear()
        self.granted.pop(topic_filter, None)
        self.refused.pop(topic_filter, None)
        if self._connected:
            self._send_subscribe([topic_filter])

    async def wait_subscribed(self, topic_filter: str) -> int:
        """Wait for the broker's answer to a subscription made with ``subscribe()``: the
        granted QoS, or MqttError with the broker's reason. Bound it with asyncio.timeout."""
        self._bind()
        assert self._suback_ev is not None
        while True:
            if topic_filter in self.granted:
                return self.granted[topic_filter]
            if topic_filter in self.refused:
                raise MqttError(self.host, self.port, f"subscription {topic_filter!r} refused: "
                                f"{self.refused[topic_filter]}")
            if topic_filter not in self._subs:
                raise ValueError(f"not subscribed to {topic_filter!r}")
            self._suback_ev.clear()
            await self._suback_ev.wait()

    def unsubscribe(self, topic_filter: str) -> None:
        if self._subs.pop(topic_filter, None) is None:
            return
        self._dispatch_cache.clear()
        self.granted.pop(topic_filter, None)
        self.refused.pop(topic_filter, None)
        if self._connected:
            self._paho.unsubscribe(topic_filter)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and return once the message is written (QoS 0) or acknowledged by the broker
        (QoS 1/2). Waits for a connection first. Raises MqttError when the broker refuses the
        message or the client is closed, ValueError for a bad topic/QoS."""
        problem = check_topic(topic)
        if problem:
            raise ValueError(problem)
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, got {qos}")
        self._bind()
        assert self._pub_slots is not None
        async with self._pub_slots:
            await self.wait_connected()
            info = self._paho.publish(topic, payload, qos, retain)
            rc = info.rc
            if rc and not (qos > 0 and rc == 4):  # 4 = not connected: paho resends QoS 1/2
                self.stats.publish_errors += 1
                raise MqttError(self.host, self.port, f"publish to {topic!r} failed: rc {rc}")
            mid = info.mid
            # No ack can arrive before this point: paho writes only from the loop's callbacks.
            assert self._loop is not None
            fut: asyncio.Future[None] = self._loop.create_future()
            self._waiters[mid] = (fut, qos)
            try:
                await fut
            except MqttError:
                self.stats.publish_errors += 1
                raise
            finally:
                self._waiters.pop(mid, None)
            self.stats.published += 1

    @property
    def reading_paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> None:
        """Stop reading from the socket (TCP back-pressure towards the broker) until
        ``resume_reading()``. For a consumer whose buffer is full. Keepalive checks pause too;
        a pause longer than about 1.5 x keepalive without any acknowledgement going out lets
        the broker drop the connection (the session, and its QoS 1/2 messages, survive)."""
        if self._paused:
            return
        self._paused = True
        if self._attached and self._loop is not None:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._attached and self._loop is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            if self._buffered:
                self._loop.call_soon(self._on_readable)

    def abort_connection(self, reason: str = "connection aborted") -> None:
        """Drop the current connection as a network failure would (no DISCONNECT, so the broker
        publishes the will); the background task reconnects. For tests and stall watchdogs."""
        if self._paho.socket() is None or self._connect_job is not None:
            return
        self._abort_reason = reason
        self._teardown_socket()

    async def close(self) -> None:
        """Disconnect cleanly (DISCONNECT, so no will) and stop reconnecting. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._connected_ev is not None:
            self._connected_ev.set()  # wake wait_connected() so it raises
        was_connected = self._connected
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._connect_job is not None:
            await asyncio.wait({self._connect_job}, timeout=self.connect_timeout + 1.0)
            self._connect_job = None
        if self._paho.socket() is not None:
            if self._connected and self._sock_closed is not None:
                self._sock_closed.clear()
                self._paho.disconnect()
                try:
                    async with asyncio.timeout(1.0):
                        await self._sock_closed.wait()
                except TimeoutError:
                    pass
            if self._paho.socket() is not None:
                self._abort_reason = "client closed"
                self._teardown_socket()
        self._detach()
        self._connected = False
        closed = MqttError(self.host, self.port, "client closed before the broker acknowledged")
        for fut, _qos in list(self._waiters.values()):
            if not fut.done():
                fut.set_exception(closed)
        self._acks.clear()
        if was_connected:
            self._notify(False, "client closed")

    # --- connection keeping -------------------------------------------------------------------

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._connected_ev = asyncio.Event()
            self._sock_closed = asyncio.Event()
            self._suback_ev = asyncio.Event()
            self._pub_slots = asyncio.Semaphore(self._max_queued)
        elif self._loop is not loop:
            raise RuntimeError("MqttClient used from a second event loop")

    def _bind_event(self) -> asyncio.Event:
        self._bind()
        assert self._connected_ev is not None
        return self._connected_ev

    def _delay(self) -> float:
        """Pause before the next attempt: up to reconnect_min after a stable connection was lost,
        then doubling per failure up to reconnect_max, with jitter so that many gateways do not
        reconnect in step after a broker restart."""
        if self._failures == 0:
            return self._rng.uniform(0.0, self.reconnect_min)
        base = min(self.reconnect_max, self.reconnect_min * 2.0 ** min(self._failures - 1, 32))
        return base * self._rng.uniform(0.5, 1.0)

    async def _keep(self) -> None:
        first = True
        while True:
            if not first:
                await asyncio.sleep(self._delay())
            first = False
            try:
                await self._attempt()
            except MqttError as exc:
                self._attempt_failed(exc.reason)
                continue
            except Exception as exc:  # the keeper must outlive any surprise
                log.exception("%s: unexpected error while connecting", self.client_id)
                if self._paho.socket() is not None and self._connect_job is None:
                    self._abort_reason = f"unexpected error: {exc!r}"
                    self._teardown_socket()
                self._attempt_failed(f"unexpected error: {exc!r}")
                continue
            up_since = time.monotonic()
            assert self._lost is not None
            reason = await self._lost
            if time.monotonic() - up_since >= _STABLE_AFTER:
                self._failures = 0
            else:
                self._failures += 1
            self.stats.disconnects += 1
            self.stats.last_error = reason
            self._notify(False, reason)

    def _attempt_failed(self, reason: str) -> None:
        self._failures += 1
        self.stats.connect_failures += 1
        self.stats.last_error = reason
        log.debug("%s: connection attempt failed: %s", self.client_id, reason)
        self._notify(False, reason)

    async def _attempt(self) -> None:
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        self._abort_reason = ""
        errors = self._paho_errors()
        errors.last = ""
        job = loop.run_in_executor(None, self._paho.reconnect)
        self._connect_job = job
        try:
            # shield: cancelling the keeper must not orphan a connect still running in the
            # thread; close() waits for the job and then closes what it opened.
            await asyncio.shield(job)
        except (OSError, ValueError) as exc:  # ssl errors are OSErrors, CertificateError ValueError
            raise MqttError(self.host, self.port, _os_reason(exc, self.connect_timeout)) from exc
        finally:
            if job.done():
                self._connect_job = None
        self._attach()
        try:
            async with asyncio.timeout(self.connect_timeout):
                session_present = await self._connack
        except TimeoutError:
            self._abort_reason = f"no CONNACK within {self.connect_timeout:g} s"
            self._teardown_socket()
            raise MqttError(
                self.host, self.port,
                f"the broker did not answer CONNECT within {self.connect_timeout:g} s "
                "(is this an MQTT port?)",
            ) from None
        self.stats.connects += 1
        self.stats.last_connect_ts = time.time()
        log.debug("%s: connected to %s (session present: %s)", self.client_id, self.broker,
                  session_present)

    def _paho_errors(self) -> _PahoErrors:
        logger = self._paho.logger
        assert isinstance(logger, _PahoErrors)
        return logger

    def _notify(self, connected: bool, reason: str) -> None:
        cb = self.on_connection_change
        if cb is None:
            return
        try:
            cb(connected, reason)
        except Exception:  # a broken observer must not stop reconnecting
            log.exception("%s: on_connection_change raised", self.client_id)

    # --- socket <-> event loop ----------------------------------------------------------------

    def _on_socket_open(self, client: Client, userdata: object, sock: Any) -> None:
        # Runs in the connect worker thread: only touch the socket, not the loop.
        self._rbuf, self._rpos = b"", 0  # nothing of an old connection is read on a new one
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.tcp_nodelay))
        except (OSError, AttributeError) as exc:
            log.debug("%s: cannot set TCP_NODELAY: %s", self.client_id, exc)
        self._fd = sock.fileno()

    def _attach(self) -> None:
        sock = self._paho.socket()
        if sock is None or self._attached or self._loop is None:
            return
        self._gen += 1
        self._attached = True
        self._fd = sock.fileno()
        if self._sock_closed is not None:
            self._sock_closed.clear()
        if not self._paused:
            self._loop.add_reader(self._fd, self._on_readable)
        if self._paho.want_write():
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer_on = True
        self._misc_timer = self._loop.call_later(_MISC_INTERVAL, self._on_misc)

    def _detach(self) -> None:
        if not self._attached or self._loop is None:
            return
        self._attached = False
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        if self._loop.is_closed():
            return
        self._loop.remove_reader(self._fd)
        if self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False

    def _on_socket_close(self, client: Client, userdata: object, sock: Any) -> None:
        self._detach()
        if self._sock_closed is not None:
            self._sock_closed.set()

    def _on_register_write(self, client: Client, userdata: object, sock: Any) -> None:
        if self._attached and not self._writer_on and self._loop is not None:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer_on = True

    def _on_unregister_write(self, client: Client, userdata: object, sock: Any) -> None:
        if self._attached and self._writer_on and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writer_on = False

    def _guarded(self, what: str, fn: Callable[[], object]) -> None:
        """Run a paho entry point; an exception (a handler bug is caught earlier, so this is
        paho or us) is logged and costs the connection, which is then rebuilt."""
        try:
            fn()
        except Exception as exc:  # never leave a broken reader registered
            log.exception("%s: %s failed", self.client_id, what)
            try:
                self.abort_connection(f"internal error in {what}: {exc!r}")
            except Exception:  # noqa: BLE001
                self._detach()

    def _on_readable(self) -> None:
        self._guarded("read", self._read)

    def _buffered_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            buf = self._recv_raw(max(bufsize, _RECV_CHUNK))  # BlockingIOError when none
            if not buf:
                return buf  # end of stream
            pos = 0
        end = pos + bufsize
        self._rbuf, self._rpos = buf, min(end, len(buf))
        return buf[pos:end] if pos or end < len(buf) else buf

    def _fast_publishes(self) -> None:
        """Deliver the complete QoS 0/1 PUBLISH packets at the head of the read buffer without
        paho (its per-packet decoding, MQTT 5 Properties objects included, cost ~100 us of CPU
        per message; this ~5 us). Anything else (QoS 2, another packet type, a partial packet)
        stops here and is left to paho. The broker sends no topic aliases: we announce none."""
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        v5 = self._v5
        n = 0
        while pos < end and not self._paused:
            b0 = buf[pos]
            if b0 & 0xF0 != 0x30 or (b0 >> 1) & 3 == 2 or (b0 >> 1) & 3 == 3:
                break
            # remaining length: 1-4 bytes, 7 bits each
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= end or i - pos > 4:
                    length = -1
                    break
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
            if length < 0 or i + length > end:
                break  # incomplete: paho (or the next read) completes it
            stop = i + length
            qos = (b0 >> 1) & 3
            tlen = (buf[i] << 8) | buf[i + 1]
            t0 = i + 2
            body = t0 + tlen
            mid = 0
            if qos:
                mid = (buf[body] << 8) | buf[body + 1]
                body += 2
            if v5:  # skip the properties
                plen, shift = 0, 0
                while True:
                    byte = buf[body]
                    body += 1
                    plen |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                body += plen
            if body > stop:
                break  # malformed: let paho report it
            try:
                topic = buf[t0:t0 + tlen].decode("utf-8")
            except UnicodeDecodeError:
                topic = ""
            pos = stop
            self._rpos = pos
            n += 1
            self._deliver(topic, buf[body:stop], qos, bool(b0 & 1), mid)
            if self._rbuf is not buf:  # the handler ended the connection
                return
        if n:
            self._paho._last_bytes_received = time.monotonic()  # paho's keepalive clock

    @property
    def _buffered(self) -> bool:
        return self._rpos < len(self._rbuf)

    def _read(self) -> None:
        c = self._paho
        stats = self.stats
        # paho reads one packet per call. While calls keep delivering messages (or bytes wait
        # in our buffer, which the selector cannot see), read on, up to _READ_BURST packets;
        # the first call that delivers none ends the burst.
        for _ in range(_READ_BURST):
            before = stats.received
            if self._buffered and c._in_packet["command"] == 0:  # paho is between packets
                self._fast_publishes()
                if self._paused:
                    break
                if not self._buffered and stats.received != before:
                    continue  # all of it was PUBLISH: read the socket again
            if c.loop_read() != 0 or self._paused:
                break
            if not self._buffered and stats.received == before:
                break
        if self._buffered and not self._paused and self._attached and self._loop is not None:
            self._loop.call_soon(self._on_readable)  # the rest of the buffer, after others ran
        sock = c.socket()
        # TLS: OpenSSL may hold decrypted bytes the fd no longer signals.
        while not self._paused and isinstance(sock, ssl.SSLSocket) and sock.pending():
            if c.loop_read() != 0:
                break
            sock = c.socket()

    def _on_writable(self) -> None:
        self._guarded("write", self._paho.loop_write)

    def _on_misc(self) -> None:
        self._misc_timer = None
        if not self._attached or self._loop is None:
            return
        if not self._paused:
            self._guarded("keepalive", self._paho.loop_misc)
        if self._attached:
            self._misc_timer = self._loop.call_later(_MISC_INTERVAL, self._on_misc)

    def _teardown_socket(self) -> None:
        """Close the socket from the loop thread through paho's own path: shut it down, then let
        loop_read see the end of stream (paho closes it and reports the disconnect)."""
        sock = self._paho.socket()
        if sock is None:
            return
        try:
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for _ in range(1000):  # a pending partial packet is consumed first; EOF follows
            if self._paho.loop_read() != 0 or self._paho.socket() is None:
                break
        self._detach()

    # --- paho callbacks (all on the loop thread) ----------------------------------------------

    def _on_connect(
        self,
        client: Client,
        userdata: object,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._connack
        if reason.is_failure:
            if fut is not None and not fut.done():
                fut.set_exception(MqttError(self.host, self.port, _connack_reason(reason)))
            return
        self._connected = True
        if self._connected_ev is not None:
            self._connected_ev.set()
        if self._subs:
            self._send_subscribe(list(self._subs))
        if fut is not None and not fut.done():
            fut.set_result(bool(flags.session_present))
        self._notify(True, "")

    def _on_disconnect(
        self,
        client: Client,
        userdata: object,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected
        self._connected = False
        self.granted.clear()  # until the next connection's SUBACK
        self.refused.clear()
        if self._connected_ev is not None:
            self._connected_ev.clear()
        if flags.is_disconnect_packet_from_server:
            text = f"the broker closed the connection: {reason.getName()}"
        elif self._abort_reason:
            text = self._abort_reason
        elif reason.getName() == "Keep alive timeout":
            text = f"no answer from the broker within the keepalive ({self.keepalive} s)"
        else:
            err = self._paho_errors().last
            text = f"connection lost ({err})" if err else "connection closed by the broker"
        lost = MqttError(self.host, self.port, text)
        for fut, qos in list(self._waiters.values()):
            if qos == 0 and not fut.done():  # paho drops unsent QoS 0 packets on reconnect
                fut.set_exception(lost)
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(lost)
        if self._lost is not None and not self._lost.done() and was_connected:
            self._lost.set_result(text)

    def _send_subscribe(self, filters: list[str]) -> None:
        if self._v5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            topics: list[Any] = [
                (f, SubscribeOptions(qos=self._subs[f][0], retainHandling=1)) for f in filters
            ]
        else:
            topics = [(f, self._subs[f][0]) for f in filters]
        rc, mid = self._paho.subscribe(topics)
        if rc == 0 and mid is not None:
            self._sub_mids[mid] = filters

    def _on_subscribe(
        self,
        client: Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        filters = self._sub_mids.pop(mid, [])
        for f, rc in zip(filters, reasons, strict=False):
            if f not in self._subs:
                continue  # unsubscribed meanwhile
            if rc.is_failure:
                # MQTT 3.1.1 has one failure code (0x80) that paho names "Unspecified error"
                why = rc.getName() if self._v5 else "failure (MQTT 3.1.1 gives no reason)"
                self.granted.pop(f, None)
                self.refused[f] = why
                text = f"subscription {f!r} refused: {why}"
                self.stats.last_error = text
                log.debug("%s: %s", self.client_id, text)
                if self.on_subscribe_error is not None:
                    self.on_subscribe_error(f, why)
            else:
                self.granted[f] = rc.value
                self.refused.pop(f, None)
        if self._suback_ev is not None:
            self._suback_ev.set()

    def _handlers(self, topic: str) -> tuple[Handler, ...]:
        found = self._dispatch_cache.get(topic)
        if found is None:
            found = tuple(
                h for f, (_q, h) in self._subs.items()
                if _matches(_filter_body(f).split("/"), topic)
            )
            if len(self._dispatch_cache) >= _DISPATCH_CACHE_MAX:
                self._dispatch_cache.clear()
            self._dispatch_cache[topic] = found
        return found

    def _on_message(self, client: Client, userdata: object, msg: MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""
        self._deliver(topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid)

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        handlers = self._handlers(topic) if topic else ()
        if not handlers:
            self.stats.unhandled += 1
        pending: list[Awaitable[object]] = []
        for handler in handlers:
            try:
                result = handler(topic, payload, qos, retain)
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the connection
                self._handler_failed(topic, exc)
                continue
            if result is not None:
                pending.append(result)
        self.stats.received += 1
        if qos == 0:
            return
        ack = _PendingAck(self._gen, mid, qos)
        if not pending:
            if not self._acks:
                self._paho.ack(ack.mid, qos)
                return
            ack.done = True
            self._acks.append(ack)
            self._flush_acks()
            return
        self._acks.append(ack)
        waiting = pending[0] if len(pending) == 1 else asyncio.gather(*pending)
        fut = asyncio.ensure_future(waiting)
        self._handling.add(fut)  # a strong reference while it runs
        fut.add_done_callback(functools.partial(self._handled, ack, topic))

    def _handled(self, ack: _PendingAck, topic: str, fut: asyncio.Future[object]) -> None:
        self._handling.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            exc = fut.exception()
            assert exc is not None
            self._handler_failed(topic, exc)
        ack.done = True
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Send acknowledgements in the order the messages arrived (MQTT 4.6)."""
        acks = self._acks
        while acks and acks[0].done:
            a = acks.popleft()
            if a.gen == self._gen and self._connected:
                self._paho.ack(a.mid, a.qos)

    def _handler_failed(self, topic: str, exc: BaseException) -> None:
        self.stats.handler_errors += 1
        now = time.monotonic()
        if now - self._handler_log_ts >= 10.0:
            self._handler_log_ts = now
            log.error("%s: message handler failed on %r (%d so far): %r",
                      self.client_id, topic, self.stats.handler_errors, exc)

    def _on_publish(
        self,
        client: Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        failure = reason.getName() if reason.is_failure else ""
        entry = self._waiters.get(mid)
        if entry is None:  # its publish() was cancelled while waiting
            return
        fut = entry[0]
        if fut.done():
            return
        if failure:
            fut.set_exception(
                MqttError(self.host, self.port, f"broker refused the message: {failure}")
            )
        else:
            fut.set_result(None)

    @staticmethod
    def _tls_context(tls: TlsSettings) -> ssl.SSLContext:
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
