"""The ``wasm`` action: a plugin decides what to send, another action's transport sends it.

    [actions.boiler_frame]
    type = "wasm"
    plugin = "vendor_frame"        # a [plugins.NAME] exporting flux_act (docs/plugin-abi.md)
    target = "boiler_port"         # a serial_write or mqtt_publish action
    timeout = "1s"                 # for the send; the plugin call has the plugin's own timeout

Each command goes to the plugin's ``flux_act`` as JSON; the bytes it returns are sent with the
target executor's ``send`` (the serial port of a serial_write, the broker/topic/qos/retain of an
mqtt_publish) instead of that action's own data or payload. The plugin call runs on the event
loop's thread, bounded by the plugin's time limit (like the plugin stage).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from flux_edge.errors import ActionError, PluginError
from flux_edge.model import Command, Outcome
from flux_edge.plugins.host import Plugin

if TYPE_CHECKING:  # the struct is declared by the kind module, which imports this one
    from flux_edge.actions.wasm_kind import WasmAction

__all__ = ["Sender", "WasmActionExecutor"]


# runs a plugin call where it cannot block the event loop (the pipeline's plugin workers)
Offload = Callable[[Callable[[], bytes]], Awaitable[bytes]]


class Sender(Protocol):
    """What a target executor offers (SerialWriteExecutor, MqttPublishExecutor)."""

    name: str

    async def send(self, data: bytes, cmd: Command, limit: float | None = None) -> None: ...


def _preview(data: bytes, limit: int = 24) -> str:
    shown = data[:limit].hex(" ")
    return shown + (f" ... ({len(data)} bytes)" if len(data) > limit else "")


class WasmActionExecutor:
    """Carries out one configured ``wasm`` action. ``execute`` never raises (except
    CancelledError): a failure is an ``Outcome`` with ``ok=False`` saying which step failed.

    Raises ``ActionError`` at construction when the plugin does not export ``flux_act``.
    """

    def __init__(
        self,
        name: str,
        cfg: WasmAction,
        plugin: Plugin,
        target: Sender,
        *,
        wall: Callable[[], float] = time.time,
        offload: Offload | None = None,
    ) -> None:
        if not plugin.has_act:
            raise ActionError(
                name,
                f"plugin {plugin.name!r} does not export flux_act, so it cannot answer a wasm "
                "action (see docs/plugin-abi.md, \"Actions\")",
            )
        self.name = name
        self.cfg = cfg
        self.plugin = plugin
        self.target = target
        self._wall = wall
        self._offload = offload
        self._log = logging.getLogger(f"flux_edge.action.{name}")

    async def execute(self, cmd: Command) -> Outcome:
        started = time.perf_counter()
        error = ""
        data = b""
        try:
            try:
                if self._offload is not None:  # on a plugin worker thread, off the loop
                    data = await self._offload(functools.partial(self.plugin.act, cmd))
                else:
                    data = self.plugin.act(cmd)
            except PluginError as exc:
                raise ActionError(self.name, f"the plugin step failed: {exc}") from exc
            if data:
                try:
                    await self.target.send(data, cmd, self.cfg.timeout)
                except ActionError as exc:
                    raise ActionError(
                        self.name, f"the send step (through {self.target.name!r}) failed: {exc}"
                    ) from exc
        except ActionError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - an action never takes the pipeline down
            self._log.error("unexpected failure", exc_info=exc)
            error = f"action {self.name!r}: unexpected error: {exc!r}"
        latency = time.perf_counter() - started
        if error:
            self._log.debug("failed in %.1f ms: %s", latency * 1000, error)
        elif data:
            self._log.debug(
                "sent %s through %r in %.1f ms", _preview(data), self.target.name, latency * 1000
            )
        else:
            self._log.debug("the plugin returned nothing to send (%.1f ms)", latency * 1000)
        return Outcome(
            command=cmd, ok=not error, ts=self._wall(), latency_s=latency, error=error
        )
