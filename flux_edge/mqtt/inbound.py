"""The receive side of :class:`~flux_edge.mqtt.client.MqttClient`: buffered socket reads, the
PUBLISH fast path, dispatch to the subscriptions' handlers and acknowledgements in order.

- **Reading.** paho reads each packet with 2-3 ``recv()`` calls (command byte, length bytes,
  body): a syscall each. :meth:`InboundMixin._buffered_recv` stands in for paho's socket read
  (see :mod:`flux_edge.mqtt.paho_internals`) and serves them from one ``recv`` of up to 64 KiB.
  While paho is between packets, complete QoS 0/1 PUBLISH packets at the head of that buffer,
  and successful PUBACKs of our own QoS 1 publishes, are decoded here
  (:mod:`flux_edge.mqtt.codec`) instead of by paho. When the start-up check of paho's internals
  fails, neither is used and paho reads alone.
- **Linger** (``linger`` seconds, 0 = none). A socket that was read less than a linger ago is
  not read again at once: the reader is taken off the selector until a linger has passed since
  that read, and then everything that arrived meanwhile is read and handed on together; while
  such reads keep finding messages, the next one is again a linger later, without the selector
  (one timer per linger, not a readiness event, two selector changes and a timer). At 1,000
  msg/s with a 5 ms linger a wake-up carries ~5 messages instead of one, and every stage after
  this one (the source, the plugin lanes, rules, the uplink) runs once for them. A message after
  a quiet spell (no read for a linger) is read at once, so linger adds at most ``linger`` to
  the latency of messages that arrive while others are coming in, and nothing when traffic is
  sparse.
- **Dispatch.** A message goes to every subscription whose filter matches its topic (cached per
  topic). A handler that raises costs nothing but a counted, rate-limited log line.
- **Flow control for incoming QoS 1/2.** The client acknowledges messages itself (paho's
  manual ack), in the order received (MQTT 4.6). A handler that returns an awaitable delays
  that message's PUBACK/PUBCOMP until it completes, so a slow consumer is throttled by the
  broker's in-flight window (the client sends MQTT 5 Receive Maximum = ``max_inflight``)
  instead of buffering without bound; a handler returning None has its message acknowledged at
  once. Brokers do not always keep to that window (mosquitto 2.0.11 overruns it once
  acknowledgements flow, eclipse-mosquitto/mosquitto#2301), so a consumer can also
  ``pause_reading()``: the socket is not read (TCP back-pressure) until ``resume_reading()``.

A mixin, not a class of its own: it shares the client's state (declared below) and runs on
the event loop thread like every other part of the client.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from flux_edge.mqtt.codec import decode_puback, decode_publish
from flux_edge.mqtt.common import Handler, MqttStats
from flux_edge.mqtt.paho_internals import between_packets, mark_received, puback_received
from flux_edge.mqtt.topics import filter_body, match_levels

if TYPE_CHECKING:
    from paho.mqtt.client import Client, MQTTMessage

log = logging.getLogger("flux_edge.mqtt")

_DISPATCH_CACHE_MAX = 4096
RECV_CHUNK = 65536  # bytes taken from the socket per recv (paho asks for 1 byte, then the rest)
READ_BURST = 64  # packets read per readiness event while they keep carrying messages


class PendingAck:
    """A QoS 1/2 message waiting for its turn to be acknowledged."""

    __slots__ = ("done", "gen", "mid", "qos")

    def __init__(self, gen: int, mid: int, qos: int) -> None:
        self.gen = gen
        self.mid = mid
        self.qos = qos
        self.done = False


class InboundMixin:
    """Mixed into MqttClient, whose ``__init__`` sets the state declared here."""

    client_id: str
    stats: MqttStats
    _paho: Client
    _v5: bool
    _connected: bool
    _paused: bool
    _gen: int
    _recv_raw: Callable[[int], bytes]
    _rbuf: bytes
    _rpos: int
    _subs: dict[str, tuple[int, Handler]]
    _dispatch_cache: dict[str, tuple[Handler, ...]]
    _acks: collections.deque[PendingAck]
    _handling: set[asyncio.Future[object]]
    _handler_log_ts: float
    _recv_error: OSError | None = None  # met by _fill, raised to paho's next read
    _drained = False  # the last _fill took less than RECV_CHUNK from a plain socket
    _loop: asyncio.AbstractEventLoop | None
    _fd: int
    _attached: bool
    fast_path: bool
    linger: float
    _linger_timer: asyncio.TimerHandle | None
    _last_read: float

    def _guarded(self, what: str, fn: Callable[[], object]) -> None: ...

    # --- reading ------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        linger = self.linger
        loop = self._loop
        if linger > 0.0 and loop is not None:
            now = loop.time()
            if now - self._last_read < linger:  # busy: let more gather before reading
                loop.remove_reader(self._fd)
                self._linger_timer = loop.call_at(self._last_read + linger, self._lingered)
                return
            self._last_read = now
        self._guarded("read", self._read)

    def _lingered(self) -> None:
        self._linger_timer = None
        loop = self._loop
        if not self._attached or loop is None or self._paused:
            return  # detached: a new connection registers its own reader; paused: resume does
        stats = self.stats
        before = stats.received + stats.fast_acked
        self._last_read = loop.time()
        self._guarded("read", self._read)
        if not self._attached or self._paused:
            return  # detached by the read (a new connection registers its own reader); paused
        if stats.received + stats.fast_acked != before:  # still busy: again a linger from now
            self._linger_timer = loop.call_at(self._last_read + self.linger, self._lingered)
        else:
            loop.add_reader(self._fd, self._on_readable)  # quiet: wait for the selector again

    def _read_now(self) -> None:
        self._guarded("read", self._read)

    def _read(self) -> None:
        c = self._paho
        stats = self.stats
        stats.reads += 1
        # paho reads one packet per call: while calls deliver messages (or bytes wait in our
        # buffer, unseen by the selector), read on, up to READ_BURST; none delivered ends it.
        fast = self.fast_path
        for _ in range(READ_BURST):
            before = stats.received + stats.fast_acked
            if fast and not self._buffered and between_packets(c):
                filled = self._fill()
                if filled is False:
                    break  # nothing waiting: the selector tells us when there is
            if self._buffered and between_packets(c):
                self._fast_packets()
                if self._paused:
                    break
                if not self._buffered and stats.received + stats.fast_acked != before:
                    if self._drained:
                        break  # that recv emptied the socket: the selector says when more comes
                    continue  # all of it was PUBLISH or PUBACK: read the socket again
            if c.loop_read() != 0 or self._paused:
                break
            if not self._buffered and stats.received + stats.fast_acked == before:
                break
        if self._buffered and not self._paused and self._attached and self._loop is not None:
            self._loop.call_soon(self._read_now)  # the rest of the buffer, after others ran
        sock = c.socket()
        # TLS: OpenSSL may hold decrypted bytes the fd no longer signals.
        while not self._paused and isinstance(sock, ssl.SSLSocket) and sock.pending():
            if c.loop_read() != 0:
                break
            sock = c.socket()

    def _buffered_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf) and self._recv_error is not None:
            exc, self._recv_error = self._recv_error, None
            raise exc
        if pos >= len(buf):
            buf = self._recv_raw(max(bufsize, RECV_CHUNK))  # BlockingIOError when none
            if not buf:
                return buf  # end of stream
            pos = 0
        end = pos + bufsize
        self._rbuf, self._rpos = buf, min(end, len(buf))
        return buf[pos:end] if pos or end < len(buf) else buf

    def _fast_packets(self) -> None:
        """Handle the complete QoS 0/1 PUBLISH packets, and the successful PUBACKs of our own
        publishes, at the head of the read buffer without paho (:mod:`flux_edge.mqtt.codec`:
        ~5 us of CPU per message, paho's own decoding ~100 us; a PUBACK goes to paho's store
        through :func:`~flux_edge.mqtt.paho_internals.puback_received`). Anything else (QoS 2,
        another packet type, a PUBACK with a failure reason, a partial packet) stops here and is
        left to paho."""
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        v5 = self._v5
        n = acked = 0
        while pos < end and not self._paused:
            if buf[pos] == 0x40:  # PUBACK
                ack = decode_puback(buf, pos, v5)
                if ack is None:
                    break
                mid, reason, pos = ack
                self._rpos = pos
                acked += 1
                puback_received(self._paho, mid, reason)
                continue
            packet = decode_publish(buf, pos, v5)
            if packet is None:
                break
            topic, payload, qos, retain, mid, pos = packet
            self._rpos = pos
            n += 1
            self._deliver(topic, payload, qos, retain, mid)
            if self._rbuf is not buf:  # the handler ended the connection
                break
        if n or acked:
            self.stats.fast_decoded += n
            self.stats.fast_acked += acked
            mark_received(self._paho, time.monotonic())  # paho's keepalive clock

    def _fill(self) -> bool | None:
        """Read the socket into the empty buffer, so that the PUBLISH packets of this readiness
        event reach the fast path (without this, paho's own first recv would fill the buffer
        and decode its packet itself: with one packet per event, every one of them). True: bytes
        were read; False: none waiting (EAGAIN); None: end of stream or an error, which paho's
        next read meets and handles as it always does."""
        try:
            data = self._recv_raw(RECV_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError as exc:  # handed to paho's next read, which reports it as it always has
            self._recv_error = exc
            return None
        if not data:
            return None
        self._rbuf, self._rpos = data, 0
        # fewer bytes than asked for: the kernel had no more (a TLS read stops at a record, so
        # there it proves nothing); another recv now would only meet EAGAIN
        self._drained = len(data) < RECV_CHUNK and not isinstance(
            self._paho.socket(), ssl.SSLSocket)
        return True

    @property
    def _buffered(self) -> bool:
        return self._rpos < len(self._rbuf)

    def _handlers(self, topic: str) -> tuple[Handler, ...]:
        found = self._dispatch_cache.get(topic)
        if found is None:
            found = tuple(
                h for f, (_q, h) in self._subs.items()
                if match_levels(filter_body(f).split("/"), topic)
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
        ack = PendingAck(self._gen, mid, qos)
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

    def _handled(self, ack: PendingAck, topic: str, fut: asyncio.Future[object]) -> None:
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
