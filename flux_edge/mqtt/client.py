"""The one MQTT client adapter. With paho_internals.py the only modules importing paho-mqtt.

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
- **Flow control for incoming QoS 1/2** (:mod:`flux_edge.mqtt.inbound`): acknowledgements go
  in the order received, each held back until its handler's awaitable (if any) completes, so
  the broker's in-flight window throttles a slow consumer; ``pause_reading()`` stops reading.
- **Reading** (:mod:`flux_edge.mqtt.inbound`) takes up to 64 packets per readiness event while
  they carry messages; socket reads are buffered and complete QoS 0/1 PUBLISH packets decoded
  without paho, unless paho's internals fail their start-up check
  (:mod:`flux_edge.mqtt.paho_internals`: then paho reads alone, after one warning). With a
  ``linger``, a busy socket is read at most once per linger, so one wake-up carries many
  messages; the first message after a quiet spell is read at once.
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
paho is imported on first use of ``MqttClient``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from flux_edge.mqtt.common import (
    ConnectionCallback,
    Handler,
    MqttError,
    MqttStats,
    SubscribeErrorCallback,
    TlsSettings,
    Will,
    connack_reason,
    os_reason,
    tls_context,
)
from flux_edge.mqtt.inbound import InboundMixin, PendingAck
from flux_edge.mqtt.paho_internals import (
    PahoErrors,
    fast_path_usable,
    install_recv_hook,
)
from flux_edge.mqtt.topics import check_filter, check_topic

if TYPE_CHECKING:
    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("flux_edge.mqtt")

_STABLE_AFTER = 10.0  # a connection that lasted this long resets the backoff
_MISC_INTERVAL = 1.0  # loop_misc (keepalive) period


class MqttClient(InboundMixin):
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
        linger: float = 0.0,
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
        self.linger = max(linger, 0.0)  # see inbound.py: reads of a busy socket gather this long
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
        # syscall each. Serve them from one large recv instead, and decode PUBLISH packets
        # without paho (flux_edge.mqtt.inbound), unless paho's internals that this relies on
        # failed their check (once per process, on the first client): then paho reads alone.
        self.fast_path = fast_path_usable()
        self._rbuf = b""
        self._rpos = 0
        if self.fast_path:
            self._recv_raw = install_recv_hook(c, self._buffered_recv)
        c.suppress_exceptions = False
        c.enable_logger(PahoErrors())
        if username:
            c.username_pw_set(username, password or None)
        if tls is not None:
            c.tls_set_context(tls_context(tls))
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
        self._flush_due = False  # a _flush_writes is scheduled
        self._paused = False  # reading paused by the consumer (pause_reading)
        self._misc_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._last_read = -float("inf")
        self._gen = 0  # connection generation: acks never cross to a new connection
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._sub_mids: dict[int, list[str]] = {}
        self._dispatch_cache: dict[str, tuple[Handler, ...]] = {}
        self._acks: collections.deque[PendingAck] = collections.deque()
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
        if self._attached and self._loop is not None and self._linger_timer is None:
            self._loop.add_reader(self._fd, self._on_readable)
            if self._buffered:
                self._loop.call_soon(self._read_now)

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
            raise MqttError(self.host, self.port, os_reason(exc, self.connect_timeout)) from exc
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

    def _paho_errors(self) -> PahoErrors:
        logger = self._paho.logger
        assert isinstance(logger, PahoErrors)
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
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
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
        # paho queued a packet: write it (and whatever else is queued by then) soon, from a
        # callback of its own, rather than after a writability event: the socket nearly always
        # has room, and watching it costs two epoll_ctl calls and a loop iteration per packet.
        # The writer is registered only when a write leaves data behind (flush_writes).
        if self._attached and not self._writer_on and not self._flush_due and self._loop:
            self._flush_due = True
            self._loop.call_soon(self._flush_writes)

    def _flush_writes(self) -> None:
        self._flush_due = False
        if not self._attached or self._writer_on or self._loop is None:
            return
        self._guarded("write", self._paho.loop_write)
        if self._attached and not self._writer_on and self._paho.want_write():
            self._loop.add_writer(self._fd, self._on_writable)  # the socket is full: wait
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
                fut.set_exception(MqttError(self.host, self.port, connack_reason(reason)))
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
