"""The uplink: measurements into the durable outbox, and from there to the upstream broker.

    add() -> staged (memory) --commit()--> outbox.sqlite --sender--> MqttClient --PUBACK--> deleted

The sender is one asyncio task. While connected it keeps at most ``max_inflight`` publishes
awaiting the broker's acknowledgement (QoS 1, or 2 if configured), taking rows in ``seq`` order
from the outbox; an acknowledged publish marks its rows for deletion (carried by the next commit,
or by the sync task when no commit comes). A QoS 1/2 message handed to paho is re-sent by paho
after a reconnect, so a dropped link needs nothing from us; a publish that fails (the broker
refused it, or the client closed) leaves its rows in the outbox: once nothing is in flight the
sender reads again from the oldest row, after a pause that doubles up to ``reconnect_max``, and
sends one publish at a time until one succeeds (then the whole window again), so the records
held back arrive in order.
While disconnected it waits for the connection (no polling). Delivery is at-least-once: a record
acknowledged but not yet deleted when the process dies is sent again; consumers de-duplicate on
``id`` (``"<outbox_id>-<seq>"``).

The sync task runs a WAL checkpoint (the fsync) in a worker thread at most every
``sync_interval`` seconds when something was written, so the event loop never waits for the SD
card; that interval is the power-loss window. A crash of the process loses nothing committed.

Status: with a ``status_topic``, the broker holds a retained "offline" as our last will, and we
publish a retained "online" on every (re)connect and a retained "offline" on ``close()`` before
the clean DISCONNECT (which suppresses the will).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from flux_edge.errors import UplinkError
from flux_edge.logs import RateLimitedLog
from flux_edge.model import Measurement
from flux_edge.mqtt import MqttClient, MqttError, TlsSettings, Will, check_topic
from flux_edge.state.faults import StoreHealth
from flux_edge.uplink.commands import (
    Commander,
    CommandResult,
    CommandStats,
    UpstreamCommand,
)
from flux_edge.uplink.encoders.base import EncoderEnv, Message
from flux_edge.uplink.encoders.numbers import declared_precision
from flux_edge.uplink.encoders.records import RecordsEncoder
from flux_edge.uplink.encoders.registry import build, spec_of
from flux_edge.uplink.outbox import Outbox, Unit, UplinkStats
from flux_edge.uplink.topics import TemplateError, compile_topic

if TYPE_CHECKING:
    from flux_edge.config import UplinkConfig

__all__ = ["Uplink"]

log = logging.getLogger("flux_edge.uplink")

_STATUS_TIMEOUT = 2.0  # close(): longest wait for the broker to take the "offline" status
_LOG_EVERY = 30.0  # seconds between two warnings of the same kind
_FILL_BURST = 16  # publishes started before the sender yields to the event loop


class Uplink:
    """Every measurement forwarded to the upstream broker through a durable outbox.

    The outbox is ``cfg.outbox_file`` (relative to ``state_dir`` unless absolute) or
    ``state_dir/outbox.sqlite``. Raises UplinkError when it cannot be written, when another
    process uses it, or when the TLS files or the status topic are unusable.
    """

    def __init__(
        self,
        cfg: UplinkConfig,
        *,
        gateway: str,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        precision: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.gateway = gateway
        if cfg.outbox_file:
            path, where = Path(state_dir) / cfg.outbox_file, "uplink.outbox_file"
        else:
            path, where = Path(state_dir) / "outbox.sqlite", "daemon.state_dir"
        self.status_topic = _render_status(cfg.status_topic, gateway)
        if self.status_topic:
            problem = check_topic(self.status_topic)
            if problem:
                raise UplinkError(f"uplink.status_topic: {problem}")
        self._declared: dict[tuple[str, str], int] = dict(precision or {})
        env = EncoderEnv(
            gateway=gateway, precision=self._declared, status_topic=self.status_topic,
            state_dir=str(state_dir),
        )
        self.encoder_spec = spec_of(cfg.encoder)
        self.encoder = build(self.encoder_spec, env)
        self.commander: Commander | None = None  # bind_commands(); None: commands refused
        self.command_stats = CommandStats()
        self._command_tasks: set[asyncio.Task[None]] = set()
        if isinstance(self.encoder, RecordsEncoder):
            self.encoder.batch = cfg.format == "batch"
            self.encoder.rows_per_publish = cfg.batch_max if self.encoder.batch else 1
        self.stats = UplinkStats()
        self._out = Outbox(
            path, max_size=cfg.outbox_max_size, gateway=gateway, topic=cfg.topic, where=where,
            stats=self.stats, clock=clock, mode=cfg.outbox_mode, spill_after=cfg.spill_after,
        )
        self.outbox_id: str = self._out.outbox_id
        self._oid = self.outbox_id.encode()
        self.client_id = cfg.client_id or f"flux-edge-{gateway}-uplink"
        tls = None
        if cfg.tls is not None:
            tls = TlsSettings(
                ca_file=cfg.tls.ca_file, cert_file=cfg.tls.cert_file, key_file=cfg.tls.key_file,
                verify_hostname=cfg.tls.verify_hostname,
            )
        own_will = self.encoder.will()
        if own_will is not None:
            will: Will | None = Will(own_will.topic, own_will.payload,
                                     qos=1 if own_will.qos is None else own_will.qos,
                                     retain=own_will.retain)
        elif self.status_topic:
            will = Will(self.status_topic, b"offline", qos=1, retain=True)
        else:
            will = None
        try:
            self._client = MqttClient(
                self.client_id, cfg.host, cfg.port,
                username=cfg.username, password=cfg.password, keepalive=cfg.keepalive,
                tls=tls, will=will,
                # + the status messages, so they never wait behind a full window
                max_inflight=cfg.max_inflight + 2, max_queued=cfg.max_inflight + 8,
                reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max,
                protocol=cfg.protocol, on_connection_change=self._on_connection,
            )
        except ValueError as exc:
            self._out.close()
            key = "uplink.tls" if tls is not None and "TLS" in str(exc) else "uplink"
            raise UplinkError(f"{key}: {exc}") from exc
        self._rows_per_publish = self.encoder.rows_per_publish
        for topic_filter in self.encoder.subscriptions():
            self._client.subscribe(topic_filter, 1, self._on_upstream)
        self._command_topic = _render_status(self.encoder_spec.command_topic, gateway)
        if self._command_topic:
            self._client.subscribe(self._command_topic + "/+", 1, self._on_plain_command)
        self._session = asyncio.Event()  # the encoder's session messages went out
        self.rebirths = 0  # session messages sent again on request (Sparkplug NCMD)
        self._session_task: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], Unit] = {}
        self._status_tasks: set[asyncio.Task[None]] = set()
        self._sender: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._ckpt_job: asyncio.Future[bool] | None = None
        self._wake = asyncio.Event()  # something for the sender to do
        self._sync_wake = asyncio.Event()  # something written or acknowledged
        self._progress = asyncio.Event()  # an acknowledgement came (flush waits for these)
        self._failed = False  # a publish failed: rewind once nothing is in flight
        self._failures = 0  # consecutive rounds that ended in a failed publish
        self._connects = 0
        self._started = False
        self._closing = False
        self._closed = False
        self._ratelog = RateLimitedLog(log, _LOG_EVERY)
        # [uplink.extra.NAME]: more upstreams, each its own Uplink (encoder, outbox, client,
        # sender), fed the same measurements; none waits for another
        self.extras: dict[str, Uplink] = {}
        try:
            for name, table in cfg.extra.items():
                self.extras[name] = _extra(name, table, gateway=gateway,
                                           state_dir=Path(state_dir), clock=clock,
                                           precision=self._declared)
        except BaseException:
            for ex in self.extras.values():
                ex._out.close()
            self._out.close()
            raise

    # --- public API -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting and sending in the background; never waits for the broker."""
        if self._started or self._closing:
            return
        self._started = True
        for ex in self.extras.values():
            await ex.start()
        loop = asyncio.get_running_loop()
        self._client.start()
        self._sender = loop.create_task(self._send_loop(), name="uplink:sender")
        self._syncer = loop.create_task(self._sync_loop(), name="uplink:sync")
        log.info(
            "uplink: outbox %s (id %s, %d record(s) waiting), broker %s as %r",
            self._out.path, self.outbox_id, self._out.depth(), self._client.broker,
            self.client_id,
        )

    def add(self, measurements: Sequence[Measurement]) -> None:
        """Stage measurements for the next commit (no I/O), in the encoder's rows."""
        for ex in self.extras.values():
            ex.add(measurements)
        enc = self.encoder
        rows = enc.stage(measurements)
        if rows is None:
            assert isinstance(enc, RecordsEncoder)
            self._out.add(enc.prepare(measurements))
        else:
            self._out.add_rows(rows, len(measurements))

    def commit(self) -> int:
        """Write what is staged (and delete what was acknowledged) in one transaction; returns
        the records committed. Raises UplinkError when the outbox cannot be written (every
        extra uplink's outbox is written first, so a failing one is reported, not hidden)."""
        failed: UplinkError | None = None
        for ex in self.extras.values():  # one failing outbox must not hold back the others
            try:
                ex.commit()
            except UplinkError as exc:
                failed = failed or exc
        n = self._out.commit()
        if n:
            self._wake.set()
        if self._out.dirty:
            self._sync_wake.set()
        if failed is not None:  # the primary's records are written; the failing one retried
            raise failed
        return n

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Commit, then wait until every record is acknowledged or ``timeout`` passes. True if
        the outbox is empty (and every extra uplink's)."""
        if self.extras:
            results = await asyncio.gather(
                self._flush_own(timeout), *(ex.flush(timeout) for ex in self.extras.values()))
            return all(results)
        return await self._flush_own(timeout)

    async def _flush_own(self, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            self.commit()
        except UplinkError as exc:
            log.error("uplink flush: %s", exc)
            return False
        try:
            async with asyncio.timeout(timeout):
                while self._out.depth() > 0:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            pass
        return self._out.depth() == 0

    async def close(self) -> None:
        """Stop sending, publish the retained "offline" status, disconnect cleanly, delete what
        was acknowledged, checkpoint and close the outbox. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self.extras:
            await asyncio.gather(*(ex.close() for ex in self.extras.values()),
                                 return_exceptions=True)
        try:
            await self._stop_sending()
        finally:  # whatever happened above, the file is left consistent and unlocked
            await self._close_outbox()
        log.info("uplink closed: %d record(s) left in the outbox", self._out.depth())

    async def _stop_sending(self) -> None:
        for task in (self._sender, self._syncer):
            if task is not None:
                task.cancel()
        for task in (self._sender, self._syncer):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session_task is not None:
            self._status_tasks.add(self._session_task)
        pending = list(self._inflight) + list(self._status_tasks) + list(self._command_tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client.connected:
            last = self.encoder.on_close()
            if self.status_topic:
                last.append(Message(self.status_topic, b"offline", True, 1))
            try:
                async with asyncio.timeout(_STATUS_TIMEOUT):
                    await self._send_messages(last)
            except (MqttError, TimeoutError) as exc:
                log.debug("uplink: closing messages not sent: %s", exc)
        await self._client.close()

    async def _close_outbox(self) -> None:
        if self._ckpt_job is not None and not self._ckpt_job.done():
            await asyncio.wait({self._ckpt_job})
        try:
            self._out.commit()
            self._out.delete_acked()
        except UplinkError as exc:
            log.error("uplink close: %s", exc)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self._out.checkpoint, "TRUNCATE"
            )
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error; a close must finish
            log.warning("uplink close: final checkpoint of %s failed: %s", self._out.path, exc)
        finally:
            self._out.close()
            self._closed = True

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def store_health(self) -> list[StoreHealth]:
        """Whether each outbox (this one's, then every extra uplink's) can be written."""
        return [self._out.health, *(h for ex in self.extras.values() for h in ex.store_health)]

    def depth(self) -> int:
        """Records waiting: committed, not yet acknowledged."""
        return self._out.depth()

    def depth_bytes(self) -> int:
        return self._out.depth_bytes()

    def oldest_ts(self) -> float | None:
        """Measurement time of the oldest waiting record (the outbox's age), None when empty."""
        if self._closed:
            return None
        return self._out.oldest_ts()

    # --- sending --------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        out = self._out
        window = self.cfg.max_inflight
        rows = self._rows_per_publish
        while True:
            self._wake.clear()
            if self._failed and not self._inflight:
                self._failed = False
                out.rewind()
                self._failures += 1
                delay = min(
                    self.cfg.reconnect_max,
                    self.cfg.reconnect_min * 2.0 ** min(self._failures - 1, 32),
                )
                await asyncio.sleep(delay)
                continue
            if self._client.connected and self._session.is_set() and not self._failed:
                # after a failure one publish goes alone until it succeeds, so what was held
                # back arrives in order
                limit = 1 if self._failures else window
                started = 0
                while len(self._inflight) < limit and self._client.connected:
                    unit = out.take(rows)
                    if unit is None:
                        break
                    self._publish(unit)
                    started += 1
                    if started % _FILL_BURST == 0:
                        # let the loop run those (and any I/O) before starting more
                        await asyncio.sleep(0)
                if started % _FILL_BURST == 0 and started:
                    continue  # the window may have room again: look once more
            await self._wake.wait()

    def _publish(self, unit: Unit) -> None:
        messages = self.encoder.wire(self._oid, unit.rows)
        loop = asyncio.get_running_loop()
        if len(messages) == 1:
            m = messages[0]
            qos = self.cfg.qos if m.qos is None else m.qos
            task = loop.create_task(self._client.publish(m.topic, m.payload, qos, m.retain))
        else:  # every publish started now, so they reach the client in this order
            task = loop.create_task(_all(self._start_publishes(messages)))
        self._inflight[task] = unit
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        unit = self._inflight.pop(task, None)
        if unit is None or task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._out.acked(unit)
            self.stats.published += 1
            self._failures = 0
        elif isinstance(exc, ValueError):  # a topic the broker can never take
            self._out.discard(unit, str(exc))
        elif not self._closing:
            self.stats.publish_errors += 1
            self.stats.last_error = str(exc)
            self._failed = True
            if isinstance(exc, MqttError):
                self._ratelog.warning(
                    "publish", "uplink: publish of %d record(s) failed, they stay in the "
                    "outbox and are sent again: %s", len(unit.rows), exc,
                )
            else:
                log.error("uplink: publish failed unexpectedly: %r", exc, exc_info=exc)
        self._progress.set()
        self._sync_wake.set()
        self._wake.set()

    def _start_publishes(self, messages: Sequence[Message]) -> list[asyncio.Task[None]]:
        loop = asyncio.get_running_loop()
        qos = self.cfg.qos
        return [
            loop.create_task(self._client.publish(
                m.topic, m.payload, qos if m.qos is None else m.qos, m.retain))
            for m in messages
        ]

    async def _send_messages(self, messages: Sequence[Message]) -> None:
        """Publish in order (each handed to the client before the next), wait for them all."""
        await _all(self._start_publishes(messages))

    async def _start_session(self) -> None:
        """The encoder's session messages (births, discovery, connects), then the rows."""
        try:
            await self._send_messages(self.encoder.on_connect())
        except MqttError as exc:  # the connection went: sent again at the next one
            log.debug("uplink: session messages not sent: %s", exc)
            return
        except ValueError as exc:
            log.error("uplink: session messages refused: %s", exc)
        self._session.set()
        self._wake.set()

    def bind(self, pipeline: object) -> None:
        """The pipeline that feeds this uplink: upstream commands run through its guarded
        action path from now on, and measurements are sent at the precision its register maps
        declare (again at each reload: the new pipeline binds itself)."""
        for ex in self.extras.values():
            ex.bind(pipeline)
        commands = {**self.encoder.extra_commands(), **self.encoder_spec.commands}
        self.commander = Commander(pipeline, commands)  # type: ignore[arg-type]
        config = getattr(pipeline, "config", None)
        sources = getattr(config, "sources", None)
        if isinstance(sources, Mapping):
            self._declared.clear()
            self._declared.update(declared_precision(sources))

    def _on_plain_command(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        name = topic.rsplit("/", 1)[1]
        params: dict[str, object] = {}
        bad = ""
        if payload.strip():
            try:
                decoded = msgspec.json.decode(payload)
            except msgspec.DecodeError as exc:
                bad = f"payload is not JSON: {exc}"
            else:
                params = decoded if isinstance(decoded, dict) else {"value": decoded}
        request_id = params.pop("id", None)
        reply_topic = f"{topic}/reply"

        def reply(result: CommandResult) -> list[Message]:
            body: dict[str, object] = {"ok": result.ok, "status": result.status}
            if result.reason:
                body["reason"] = result.reason
            if request_id is not None:
                body["id"] = request_id
            if result.verified is not None:
                body["verified"] = result.verified
            return [Message(reply_topic, msgspec.json.encode(body), False, 1)]

        req = UpstreamCommand("mqtt", name, params=params, reply=reply)
        if bad:
            self._answer(req, CommandResult(False, bad, status="failed"))
            return
        self._start_command(req)

    def _start_command(self, req: UpstreamCommand) -> None:
        task = asyncio.get_running_loop().create_task(self._run_command(req))
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    async def _run_command(self, req: UpstreamCommand) -> None:
        if self.commander is None:
            result = CommandResult(False, "commands are not enabled on this uplink",
                                   status="unavailable")
        else:
            try:
                result = await self.commander.run(req)
            except Exception as exc:
                log.error("uplink: command %r failed: %r", req.name, exc, exc_info=exc)
                result = CommandResult(False, f"internal error: {exc}", status="failed")
        self._answer(req, result)

    def _answer(self, req: UpstreamCommand, result: CommandResult) -> None:
        self.command_stats.count(result)
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "uplink: %s command %r (device %r): %s%s", req.protocol, req.name,
                req.device, result.status, f": {result.reason}" if result.reason else "")
        if req.reply is not None and self._client.connected:
            messages = req.reply(result)
            if messages:
                task = asyncio.get_running_loop().create_task(
                    _quiet(self._send_messages(messages)))
                self._status_tasks.add(task)
                task.add_done_callback(self._status_tasks.discard)

    def _on_upstream(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A message from upstream on the encoder's subscriptions (only this connection's)."""
        asked = self.encoder.on_message(topic, payload)
        if isinstance(asked, UpstreamCommand):
            self._start_command(asked)
        elif asked == "rebirth" and self._client.connected and not self._closing:
            log.info("uplink: rebirth requested on %s", topic)
            self.rebirths += 1
            self._session.clear()
            self._session_task = asyncio.get_running_loop().create_task(
                self._start_session(), name="uplink:session")

    def _on_connection(self, connected: bool, reason: str) -> None:
        if not connected:
            self._session.clear()
            self.encoder.on_disconnect()
        if connected:
            self._connects += 1
            if self._connects > 1:
                self.stats.reconnects += 1
            self._ratelog.reset("down")
            log.info("uplink: connected to %s (%d record(s) waiting)", self._client.broker,
                     self._out.depth())
            if self.status_topic and not self._closing:
                task = asyncio.get_running_loop().create_task(self._publish_status(b"online"))
                self._status_tasks.add(task)
                task.add_done_callback(self._status_tasks.discard)
            if not self._closing:
                self._session.clear()
                self._session_task = asyncio.get_running_loop().create_task(
                    self._start_session(), name="uplink:session")
            self._wake.set()
        elif not self._closing:
            self.stats.last_error = reason
            self._ratelog.warning(
                "down", "uplink: broker %s not reachable: %s; %d record(s) wait in the outbox",
                self._client.broker, reason, self._out.depth(),
            )

    async def _publish_status(self, status: bytes) -> None:
        try:
            await self._client.publish(self.status_topic, status, 1, retain=True)
        except MqttError as exc:  # sent again at the next connection
            log.debug("uplink: status %r not sent: %s", status, exc)

    # --- durability -----------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        """Delete acknowledged rows that no commit carried, and checkpoint (fsync) the WAL in a
        worker thread, at most every ``sync_interval`` seconds."""
        out = self._out
        loop = asyncio.get_running_loop()
        interval = max(self.cfg.sync_interval, 0.01)
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            if out.has_acked:
                try:
                    out.delete_acked()
                except UplinkError as exc:
                    self._ratelog.warning("delete", "%s", exc)
            if out.dirty:
                out.dirty = False
                job: asyncio.Future[bool] = loop.run_in_executor(None, out.checkpoint, "PASSIVE")
                self._ckpt_job = job
                try:
                    complete = await asyncio.shield(job)
                except Exception as exc:  # noqa: BLE001 - sqlite3.Error from the thread
                    complete = False
                    self._ratelog.warning("checkpoint", "uplink: checkpoint of %s failed: %s",
                                          out.path, exc)
                if not complete:  # readers held part of it back: again next round
                    out.dirty = True
                    self._sync_wake.set()
            await asyncio.sleep(interval)


def _extra(name: str, table: dict[str, object], *, gateway: str, state_dir: Path,
           clock: Callable[[], float], precision: Mapping[tuple[str, str], int]) -> Uplink:
    from flux_edge.config.schema import UplinkConfig

    try:
        sub = msgspec.convert(table, UplinkConfig)
    except msgspec.ValidationError as exc:
        raise UplinkError(f"uplink.extra.{name}: {exc}") from exc
    changes: dict[str, str] = {}
    if not sub.outbox_file:
        changes["outbox_file"] = f"outbox-{name}.sqlite"
    if not sub.client_id:
        changes["client_id"] = f"flux-edge-{gateway}-uplink-{name}"
    if changes:
        sub = msgspec.structs.replace(sub, **changes)
    return Uplink(sub, gateway=gateway, state_dir=state_dir, clock=clock, precision=precision)


async def _quiet(coro: Awaitable[None]) -> None:
    try:
        await coro
    except (MqttError, ValueError) as exc:
        log.debug("uplink: reply not sent: %s", exc)


async def _all(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for every task; the first failure is raised once all are done (or cancelled)."""
    if not tasks:
        return
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _render_status(template: str, gateway: str) -> str:
    if not template:
        return ""
    try:
        return compile_topic(template).render(gateway=gateway, source="", device="", name="")
    except TemplateError as exc:
        raise UplinkError(f"uplink.status_topic {template!r}: bad placeholder: {exc}") from exc
