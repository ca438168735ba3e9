"""MQTT sources: subscriptions on a broker -> ``Reading``s (payload bytes) for the plugin chain.

Follows the source shape of ``flux_edge.sources``. Talks to the broker only through
``flux_edge.mqtt.MqttClient`` (the one paho adapter).

Back-pressure (the handler runs inside paho's read on the event loop and must not block it):
a message is handed to the pipeline at once when its queue has room and nothing of ours is
waiting (``emit_nowait``); otherwise it becomes a ``Reading`` in a local buffer that one task
drains into ``emit`` (awaiting it, in arrival order).

- QoS 1/2: the message is acknowledged to the broker only once ``emit`` has taken it, so the
  broker should never have more than its in-flight window unacknowledged with us (we announce
  ``max_inflight`` as MQTT 5 Receive Maximum; MQTT 3.1.1 brokers use their own limit, mosquitto's
  ``max_inflight_messages``) and a slow pipeline makes the *broker* hold the backlog, within its
  ``max_queued_messages``. QoS 1/2 messages are never dropped here. Brokers do not always keep
  to the window (mosquitto 2.0.11 overruns it once acknowledgements flow, see
  eclipse-mosquitto/mosquitto#2301), so when the buffer reaches ``buffer_size + max_inflight``
  the source stops reading the socket (TCP back-pressure) until it has drained to half of
  ``buffer_size`` (``stats.pauses``).
- QoS 0 has no flow control in MQTT and a backlog would only deliver old values stamped with
  fresh receive times: beyond ``buffer_size`` buffered messages, new QoS 0 messages are dropped
  and counted (``stats.overflow``, ``health.total_errors``), logged at most once per
  ``log_every`` seconds.

Sessions: with any QoS 1/2 subscription the client resumes its broker session, on reconnects and
across daemon restarts (MQTT 5 session expiry ``SESSION_EXPIRY``; MQTT 3.1.1 a persistent
session), so QoS 1/2 messages published while the link or the daemon was down are delivered
afterwards; a broker restart without persistence loses them, as it loses everything else. With
QoS 0 only, every connection starts clean.

Durability (``durable``, given by the pipeline when an uplink is configured): a QoS 1/2 message
is acknowledged only once the pipeline has stored what came of it in the uplink outbox, so a
daemon killed at any moment loses nothing (the broker redelivers the rest; at-least-once).

Health: one entry, keyed by the source name. ``quality`` is "good" while connected with every
subscription granted; ``last_success_ts`` is the last message; ``polls`` counts messages
received; errors count failed connection attempts, lost connections, refused subscriptions,
topics that do not fit ``device_from_topic`` (not emitted: the device is unknown) and overflow.
``on_status(device, "bad"|"good", reason)`` is called for every device this source has produced
when the connection is lost or comes back.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flux_edge.errors import SourceError
from flux_edge.logs import RateLimitedLog
from flux_edge.model import KIND_BYTES, Reading
from flux_edge.mqtt import DevicePattern, MqttClient, TlsSettings
from flux_edge.sources import Emit, SourceHealth, StatusCallback

if TYPE_CHECKING:  # the struct is declared by the kind module, which imports this one
    from flux_edge.sources.mqtt_kind import MqttSource

SESSION_EXPIRY = 3600.0  # seconds the broker keeps our session (and QoS 1/2 messages) offline
MAX_DEVICES_TRACKED = 10_000  # devices remembered for on_status


@dataclass
class MqttSourceStats:
    received: int = 0
    emitted: int = 0
    unmatched: int = 0  # topics that do not fit device_from_topic
    overflow: int = 0  # QoS 0 messages dropped because the local buffer was full
    pauses: int = 0  # times reading was paused because QoS 1/2 messages exceeded the window
    emit_errors: int = 0
    buffered_max: int = 0  # high-water mark of the local buffer


def _pass_on(acked: asyncio.Future[None], durable: asyncio.Future[None]) -> None:
    if acked.done():
        return
    if durable.cancelled():
        acked.cancel()  # the pipeline stopped first: no acknowledgement, the broker redelivers
    else:
        acked.set_result(None)


def default_client_id(gateway_name: str, source: str) -> str:
    return f"flux-edge-{gateway_name or socket.gethostname()}-{source}"


class MqttSourceClient:
    """One MQTT source: a connection, its subscriptions, and a buffer towards ``emit``."""

    def __init__(
        self,
        name: str,
        cfg: MqttSource,
        emit: Emit,
        *,
        on_status: StatusCallback | None = None,
        wall: Callable[[], float] = time.time,
        gateway_name: str = "",
        buffer_size: int | None = None,
        log_every: float = 10.0,
        durable: Callable[[], asyncio.Future[None] | None] | None = None,
        emit_nowait: Callable[[Reading], bool] | None = None,
    ) -> None:
        if not cfg.topics:
            raise SourceError(name, "no topics to subscribe to")
        self.name = name
        self.cfg = cfg
        self.device = cfg.device or name
        try:
            self.pattern = DevicePattern(cfg.device_from_topic) if cfg.device_from_topic else None
        except ValueError as exc:
            raise SourceError(name, f"device_from_topic: {exc}") from exc
        self.health: dict[str, SourceHealth] = {name: SourceHealth()}
        self.stats = MqttSourceStats()
        self._emit = emit
        self._emit_nowait = emit_nowait
        self._durable = durable
        self._on_status = on_status
        self._wall = wall
        self._buffer: collections.deque[tuple[Reading, asyncio.Future[None] | None]] = (
            collections.deque()
        )
        self._buffer_size = max(cfg.buffer_size if buffer_size is None else buffer_size, 1)
        self._hard_limit = self._buffer_size + cfg.max_inflight
        self._resume_at = self._buffer_size // 2
        self._ready = asyncio.Event()
        self._devices: set[str] = set() if self.pattern else {self.device}
        self._refused: set[str] = set()
        self._up = False
        self._closing = False
        self._state: str | None = None  # "good" | "bad" | None before the first outcome
        self._log = logging.getLogger(f"flux_edge.source.{name}")
        self._throttle = RateLimitedLog(self._log, log_every)
        qos1 = any(t.qos > 0 for t in cfg.topics)
        try:
            self.client = MqttClient(
                cfg.client_id or default_client_id(gateway_name, name),
                cfg.host,
                cfg.port,
                username=cfg.username,
                password=cfg.password,
                keepalive=cfg.keepalive,
                max_inflight=cfg.max_inflight,
                reconnect_min=cfg.reconnect_min,
                reconnect_max=cfg.reconnect_max,
                protocol=cfg.protocol,
                linger=cfg.linger,
                tls=None if cfg.tls is None else TlsSettings(
                    ca_file=cfg.tls.ca_file,
                    cert_file=cfg.tls.cert_file,
                    key_file=cfg.tls.key_file,
                    verify_hostname=cfg.tls.verify_hostname,
                ),
                # QoS 1/2: resume the broker session even across daemon restarts, so messages
                # that arrived while the daemon was down (or unacknowledged when it died) come in
                clean_start=not qos1,
                session_expiry=SESSION_EXPIRY if qos1 else 0.0,
                on_connection_change=self._on_connection,
                on_subscribe_error=self._on_refused,
            )
            for sub in cfg.topics:
                self.client.subscribe(sub.topic, sub.qos, self._on_message)
        except ValueError as exc:
            raise SourceError(name, str(exc)) from exc

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect (retrying with backoff) and emit messages until cancelled. Never raises
        anything but CancelledError."""
        try:
            self.client.start()
            buf = self._buffer
            while True:
                if not buf:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                reading, acked = buf[0]
                try:
                    await self._emit(reading)
                    self.stats.emitted += 1
                except Exception as exc:  # noqa: BLE001 - run() must survive a failing emit
                    self.stats.emit_errors += 1
                    self._error(f"emit failed: {exc!r}")
                    self._throttle.warning("emit", "emit failed: %r", exc)
                buf.popleft()
                if acked is not None:
                    self._ack_when_durable(acked)
                if len(buf) <= self._resume_at and self.client.reading_paused:
                    self.client.resume_reading()
        finally:
            await self.close()

    def _ack_when_durable(self, acked: asyncio.Future[None]) -> None:
        if acked.done():
            return
        durable = self._durable() if self._durable is not None else None
        if durable is None:
            acked.set_result(None)
        else:  # acknowledge once the pipeline has it on disk (the uplink outbox)
            durable.add_done_callback(functools.partial(_pass_on, acked))

    async def close(self) -> None:
        self._closing = True  # a closed connection is not news for health or on_status
        await self.client.close()
        for _reading, acked in self._buffer:
            if acked is not None and not acked.done():
                acked.cancel()  # never acknowledged: the broker redelivers within the session
        self._buffer.clear()

    # --- messages -----------------------------------------------------------------------------

    def _on_message(
        self, topic: str, payload: bytes, qos: int, retain: bool
    ) -> asyncio.Future[None] | None:
        h = self.health[self.name]
        self.stats.received += 1
        h.polls += 1
        if self.pattern is None:
            device = self.device
        else:
            found = self.pattern.device(topic)
            if found is None:
                self.stats.unmatched += 1
                self._error(
                    f"topic {topic!r} does not match device_from_topic "
                    f"{self.pattern.pattern!r}: message not delivered"
                )
                self._throttle.warning(
                    "unmatched", "topic %r does not match device_from_topic %r: message dropped",
                    topic, self.pattern.pattern,
                )
                return None
            device = found
            if device not in self._devices and len(self._devices) < MAX_DEVICES_TRACKED:
                self._devices.add(device)
        now = self._wall()
        h.last_success_ts = now
        buf = self._buffer
        n = len(buf)
        if qos == 0 and n >= self._buffer_size:
            self.stats.overflow += 1
            self._error(f"buffer full ({n} messages): QoS 0 message on {topic!r} dropped")
            self._throttle.warning(
                "overflow", "the pipeline is not keeping up: buffer full (%d), QoS 0 message "
                "on %r dropped", n, topic,
            )
            return None
        reading = Reading(
            source=self.name, device=device, ts=now, kind=KIND_BYTES, payload=payload, topic=topic
        )
        if n == 0 and self._emit_nowait is not None and self._emit_nowait(reading):
            # taken at once (nothing of ours waits before it, so the order holds): no hop
            # through run()'s task for each wake-up of the socket; acknowledged when the
            # pipeline's future for it completes (None: already durable, or no durability)
            self.stats.emitted += 1
            if qos > 0 and self._durable is not None:
                return self._durable()
            return None
        acked: asyncio.Future[None] | None = None
        if qos > 0:
            acked = asyncio.get_running_loop().create_future()
        buf.append((reading, acked))
        self.stats.buffered_max = max(self.stats.buffered_max, n + 1)
        if n + 1 >= self._hard_limit and not self.client.reading_paused:
            self.stats.pauses += 1
            self.client.pause_reading()
        if n == 0:
            self._ready.set()
        return acked

    def _error(self, text: str) -> None:
        h = self.health[self.name]
        h.total_errors += 1
        h.last_error = text

    # --- connection state ---------------------------------------------------------------------

    def _on_connection(self, connected: bool, reason: str) -> None:
        if self._closing:
            return
        h = self.health[self.name]
        where = self.client.broker
        if connected:
            self._up = True
            self._refused.clear()
            if self._state == "bad":
                self._log.info("connected to %s again after %d failed attempt(s)", where,
                               h.consecutive_errors)
            elif self._state is None:
                self._log.info(
                    "connected to %s, subscribed to %s", where,
                    ", ".join(f"{t.topic} (QoS {t.qos})" for t in self.cfg.topics),
                )
            h.consecutive_errors = 0
            self._set_quality("good", "")
            return
        self._up = False
        h.total_errors += 1
        h.consecutive_errors += 1
        h.last_error = f"MQTT broker {where}: {reason}"
        if self._state != "bad":
            self._log.warning("MQTT broker %s: %s (retrying with backoff; logged again when it "
                              "recovers)", where, reason)
        else:
            self._log.debug("MQTT broker %s: %s (%d in a row)", where, reason,
                            h.consecutive_errors)
        self._set_quality("bad", h.last_error)

    def _on_refused(self, topic_filter: str, reason: str) -> None:
        self._refused.add(topic_filter)
        text = f"subscription {topic_filter!r} refused by {self.client.broker}: {reason}"
        self._error(text)
        self._log.error("%s (check the broker's ACL for this client)", text)
        self._set_quality("bad", text)

    def _set_quality(self, quality: str, error: str) -> None:
        h = self.health[self.name]
        good = quality == "good" and self._up and not self._refused
        h.quality = "good" if good else "bad"
        state = h.quality
        if state == self._state:
            return
        first = self._state is None
        self._state = state
        if self._on_status is None or (first and good):
            return
        for device in sorted(self._devices):
            self._on_status(device, h.quality, "" if good else error)
