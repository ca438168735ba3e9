"""The ``modbus_write`` action: write one coil or holding register, then read it back.

The write goes to the configured device (``device``; may be left out when the source has one
device) over its source's link (``ModbusBusPoller.write``: the TCP connection or the RTU line),
serialised with the polls. With ``verify`` (the default) the action succeeds only when the
device reads back the value written: a device that accepts a write but keeps its old value is a
failure, never a success. The whole action, read-back included, is bounded by the action's
``timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flux_edge.errors import ActionError, ActionVerifyError, SourceError
from flux_edge.model import Command, Outcome, Value
from flux_edge.sources.modbus.poller import ModbusBusPoller

if TYPE_CHECKING:  # the struct is declared by the kind module, which imports this one
    from flux_edge.actions.modbus_write_kind import ModbusWriteAction


class ModbusWriteExecutor:
    """Carries out one configured ``modbus_write`` action. ``execute`` never raises (except
    CancelledError): every failure is an ``Outcome`` with ``ok=False`` and the reason."""

    def __init__(
        self,
        name: str,
        cfg: ModbusWriteAction,
        poller: ModbusBusPoller,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.poller = poller
        self._wall = wall
        self._log = logging.getLogger(f"flux_edge.action.{name}")
        if cfg.function == "coil":
            self._value: bool | int = bool(cfg.value)
        else:
            self._value = int(cfg.value)

    def _target(self) -> str:
        cfg = self.cfg
        kind = "coil" if cfg.function == "coil" else "holding register"
        try:
            unit = f"unit {self.poller.device_unit(cfg.device)}"
        except SourceError:
            unit = "no such device"
        device = f"device {cfg.device!r}, " if cfg.device else ""
        return f"{kind} {cfg.address} of source {cfg.source!r} ({device}{unit})"

    def _expected(self) -> bool | int:
        """What a correct device reads back: a coil as bool, a register as its 16-bit word."""
        if isinstance(self._value, bool):
            return self._value
        return self._value & 0xFFFF

    def _shown(self, read: bool | int) -> bool | int:
        """The read-back value as the user wrote it in the config (signed if they used a
        negative number)."""
        if isinstance(read, bool) or isinstance(self._value, bool):
            return read
        if self._value < 0 and read >= 0x8000:
            return read - 0x10000
        return read

    async def _attempt(self) -> bool | int:
        """One write (+ read-back). Raises ActionError, ActionVerifyError on a mismatch."""
        cfg = self.cfg
        try:
            read = await self.poller.write(
                cfg.device, cfg.function, cfg.address, self._value, cfg.verify
            )
        except SourceError as exc:
            raise ActionError(
                self.name, f"writing {self._value!r} to {self._target()} failed: {exc}"
            ) from exc
        if cfg.verify and read != self._expected():
            err = ActionVerifyError(
                self.name,
                f"read-back mismatch: wrote {self._value!r}, read {self._shown(read)!r} "
                f"({self._target()} accepted the write but did not take the value)",
            )
            err.read = self._shown(read)
            raise err
        return read

    async def _write(self) -> bool | int:
        """Up to 1 + retries attempts, all within the action's timeout; the last error wins."""
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.timeout):
                for attempt in range(cfg.retries + 1):
                    try:
                        return await self._attempt()
                    except ActionError as exc:
                        if attempt == cfg.retries:
                            raise
                        self._log.debug("attempt %d failed, retrying: %s", attempt + 1, exc)
                raise AssertionError("unreachable")
        except TimeoutError as exc:
            raise ActionError(
                self.name,
                f"writing {self._value!r} to {self._target()} took longer than "
                f"{cfg.timeout:g} s (timeout)",
            ) from exc

    async def execute(self, cmd: Command) -> Outcome:
        started = time.perf_counter()
        verified: Value | None = None
        error = ""
        try:
            read = await self._write()
            if self.cfg.verify:
                verified = self._shown(read)
        except ActionVerifyError as exc:
            error = str(exc)
            verified = exc.read
        except ActionError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - an action never takes the pipeline down
            self._log.error("unexpected failure", exc_info=exc)
            error = f"action {self.name!r}: unexpected error: {exc!r}"
        latency = time.perf_counter() - started
        ok = not error
        if ok:
            self._log.debug(
                "wrote %r to %s%s in %.1f ms",
                self._value,
                self._target(),
                f", read back {verified!r}" if self.cfg.verify else "",
                latency * 1000,
            )
        else:
            self._log.debug("failed in %.1f ms: %s", latency * 1000, error)
        return Outcome(
            command=cmd,
            ok=ok,
            ts=self._wall(),
            latency_s=latency,
            verified=verified,
            error=error,
        )
