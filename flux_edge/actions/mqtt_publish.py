"""The ``mqtt_publish`` action: publish a templated message through an MQTT source's connection.

    [actions.alarm]
    type = "mqtt_publish"
    source = "site_broker"              # an mqtt source: its broker connection is used
    topic = "site/{device}/alarm"
    payload = '{{"rule": {rule:json}, "value": {value:json}, "ts": {ts:json}}}'
    qos = 1
    timeout = "5s"

Templates: ``flux_edge.actions.templates``. The action succeeds when the broker has acknowledged
the message (QoS 1 PUBACK, QoS 2 PUBCOMP) or, for QoS 0, when it is written to the socket; all of
it, waiting for a connection included, is bounded by ``timeout``. On a timeout the outcome is
``ok=False``: the message was *not confirmed*, which is not the same as not delivered. A QoS 1/2
message already handed to the client is resent by it after a reconnect (MQTT's at-least-once),
so a timed-out alarm may still arrive late; consumers must tolerate duplicates anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flux_edge.actions.templates import Template, TemplateError, command_context, compile_template
from flux_edge.errors import ActionError
from flux_edge.model import Command, Outcome
from flux_edge.mqtt import MqttClient, MqttError, check_topic

if TYPE_CHECKING:  # the struct is declared by the kind module, which imports this one
    from flux_edge.actions.mqtt_publish_kind import MqttPublishAction

__all__ = ["MqttPublishExecutor", "check_templates"]


def check_templates(cfg: MqttPublishAction) -> list[tuple[str, str, int]]:
    """Problems of an action's templates for the config checker: (field, message, 1-based
    column within that field's string; 0 when it is about the whole value)."""
    problems: list[tuple[str, str, int]] = []
    for fld in ("topic", "payload"):
        try:
            template = compile_template(getattr(cfg, fld))
        except TemplateError as exc:
            problems.append((fld, exc.message, exc.column))
            continue
        if fld == "topic":  # the literal parts, with each placeholder as one plain character
            problem = check_topic(template.render(dict.fromkeys(template.names, "x")))
            if problem:
                problems.append((fld, problem, 0))
    if cfg.qos not in (0, 1, 2):
        problems.append(("qos", f"QoS must be 0, 1 or 2, got {cfg.qos}", 0))
    if cfg.timeout <= 0:
        problems.append(("timeout", "the timeout must be more than 0", 0))
    return problems


class MqttPublishExecutor:
    """Carries out one configured ``mqtt_publish`` action. ``execute`` never raises (except
    CancelledError). The client is the MQTT source's (``MqttSourceClient.client``), already
    started by that source; this executor does not start or close it."""

    def __init__(
        self,
        name: str,
        cfg: MqttPublishAction,
        client: MqttClient,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.client = client
        self._wall = wall
        self._log = logging.getLogger(f"flux_edge.action.{name}")
        problems = check_templates(cfg)
        if problems:
            fld, message, column = problems[0]
            at = f" (column {column})" if column else ""
            raise ActionError(name, f"{fld}: {message}{at}")
        self._topic: Template = compile_template(cfg.topic)
        self._payload: Template = compile_template(cfg.payload)

    async def send(self, data: bytes, cmd: Command, limit: float | None = None) -> None:
        """Publish ``data`` as the payload (instead of the payload template) to this action's
        topic, with its qos and retain: what a ``wasm`` action targeting it sends.
        ``limit`` (seconds) defaults to this action's timeout. Raises ActionError."""
        await self._publish(cmd, data, self.cfg.timeout if limit is None else limit)

    async def _publish(
        self, cmd: Command, payload: bytes | None = None, limit: float | None = None
    ) -> None:
        cfg = self.cfg
        context = command_context(cmd)
        topic = self._topic.render(context)
        if payload is None:
            payload = self._payload.render(context).encode("utf-8")
        if limit is None:
            limit = cfg.timeout
        problem = check_topic(topic)
        if problem:
            raise ActionError(self.name, f"rendered topic {topic!r} is not publishable: {problem}")
        try:
            async with asyncio.timeout(limit):
                await self.client.publish(topic, payload, cfg.qos, cfg.retain)
        except TimeoutError as exc:
            if self.client.connected:
                why = f"no acknowledgement (QoS {cfg.qos}) from the broker"
            else:
                last = self.client.last_error
                why = "not connected" + (f": {last}" if last else "")
            raise ActionError(
                self.name,
                f"publishing to {topic!r} on {self.client.broker} took longer than "
                f"{limit:g} s (timeout; {why})",
            ) from exc
        except MqttError as exc:
            raise ActionError(self.name, f"publishing to {topic!r} failed: {exc}") from exc
        except ValueError as exc:
            raise ActionError(self.name, f"publishing to {topic!r} failed: {exc}") from exc

    async def execute(self, cmd: Command) -> Outcome:
        started = time.perf_counter()
        error = ""
        try:
            await self._publish(cmd)
        except ActionError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - an action never takes the pipeline down
            self._log.error("unexpected failure", exc_info=exc)
            error = f"action {self.name!r}: unexpected error: {exc!r}"
        latency = time.perf_counter() - started
        if error:
            self._log.debug("failed in %.1f ms: %s", latency * 1000, error)
        else:
            self._log.debug("published in %.1f ms", latency * 1000)
        return Outcome(
            command=cmd, ok=not error, ts=self._wall(), latency_s=latency, error=error
        )
