"""The ``serial_write`` action: send fixed bytes on a serial source's port.

The bytes are worked out once, when the action is built (``parse_write_data``): ``text`` is the
configured string as UTF-8 (TOML escapes such as ``"\\r\\n"`` are already applied), ``hex`` is
pairs of hex digits with or without spaces (``"01 03 0A"``, ``"01030A"``). The write goes over
the reader's open port (``SerialReader.write``), serialised with other writes and bounded by the
action's ``timeout``. There is no read-back: a serial write succeeds when every byte has been
handed to the port.

This module does not import pyserial (only ``flux_edge.sources.serial`` does), so the config
checks can use ``parse_write_data`` cheaply.
"""

from __future__ import annotations

import logging
import string
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from flux_edge.errors import ActionError, SourceError
from flux_edge.model import Command, Outcome

if TYPE_CHECKING:
    from flux_edge.actions.serial_write_kind import SerialWriteAction
    from flux_edge.sources.serial import SerialReader

__all__ = ["SerialWriteExecutor", "parse_write_data"]

_SEPARATORS = frozenset(" \t\r\n\v\f")  # what bytes.fromhex skips, anywhere


def parse_write_data(data: str, encoding: Literal["text", "hex"]) -> bytes:
    """The bytes a ``serial_write`` action sends. Raises ValueError saying what is wrong."""
    if encoding == "text":
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"data {data!r} is not valid text: {exc.reason}") from None
    elif encoding == "hex":
        digits: list[str] = []
        for pos, ch in enumerate(data, 1):
            if ch in _SEPARATORS:
                continue
            if ch not in string.hexdigits:
                raise ValueError(
                    f"data {data!r} is not hex: {ch!r} at character {pos} (write bytes as pairs "
                    'of hex digits, with or without spaces: "01 03 0A" or "01030A")'
                )
            digits.append(ch)
        if len(digits) % 2:
            raise ValueError(
                f"data {data!r} has an odd number of hex digits ({len(digits)}): every byte is "
                'two digits ("0A", not "A")'
            )
        raw = bytes.fromhex("".join(digits))
    else:
        raise ValueError(f'encoding must be "text" or "hex", got {encoding!r}')
    if not raw:
        raise ValueError("data is empty: nothing to send")
    return raw


def _preview(data: bytes, limit: int = 24) -> str:
    shown = data[:limit].hex(" ")
    return shown + (f" ... ({len(data)} bytes)" if len(data) > limit else "")


class SerialWriteExecutor:
    """Carries out one configured ``serial_write`` action. ``execute`` never raises (except
    CancelledError): a failure is an ``Outcome`` with ``ok=False`` and the reason.

    Raises ``ActionError`` at construction when ``data`` cannot be encoded (bad hex, empty).
    """

    def __init__(
        self,
        name: str,
        cfg: SerialWriteAction,
        reader: SerialReader,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.reader = reader
        self._wall = wall
        self._log = logging.getLogger(f"flux_edge.action.{name}")
        try:
            self.data = parse_write_data(cfg.data, cfg.encoding)
        except ValueError as exc:
            raise ActionError(name, str(exc)) from None

    async def send(self, data: bytes, cmd: Command, limit: float | None = None) -> None:
        """Write ``data`` (not the configured bytes) on this action's port: what a ``wasm``
        action targeting it sends. ``limit`` (seconds) defaults to its timeout.
        Raises ActionError."""
        try:
            await self.reader.write(data, self.cfg.timeout if limit is None else limit)
        except SourceError as exc:
            raise ActionError(self.name, f"sending {_preview(data)} failed: {exc}") from exc

    async def execute(self, cmd: Command) -> Outcome:
        started = time.perf_counter()
        error = ""
        try:
            await self.reader.write(self.data, self.cfg.timeout)
        except SourceError as exc:
            error = f"action {self.name!r}: sending {_preview(self.data)} failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - an action never takes the pipeline down
            self._log.error("unexpected failure", exc_info=exc)
            error = f"action {self.name!r}: unexpected error: {exc!r}"
        latency = time.perf_counter() - started
        if error:
            self._log.debug("failed in %.1f ms: %s", latency * 1000, error)
        else:
            self._log.debug(
                "sent %s to %s in %.1f ms", _preview(self.data), self.reader.cfg.port,
                latency * 1000,
            )
        return Outcome(
            command=cmd, ok=not error, ts=self._wall(), latency_s=latency, error=error
        )
