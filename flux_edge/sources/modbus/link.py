"""The link seam: what ``ModbusBusPoller`` needs of a Modbus link, and nothing of pymodbus.

A link is one connection (TCP) or one port (an RTU line) to any unit id behind it. The poller
reads blocks, writes coils and registers and closes the link; it never connects (a link
connects on demand, on its first request and after a failure) and keeps one request on a link
at a time (a lock per link). Three kinds plug in the same way:

- ``ModbusTcpClient`` and ``ModbusRtuClient`` (client.py, the only pymodbus import);
- ``SimulatedModbusLink`` (flux_edge/sim/modbus_link.py): in-process devices, for tests.

The error contract: a request that got no answer, or a link that failed, raises
``SourceError`` (the poller retries, then backs the device off); ``LinkFailure`` says why
(``reason``: ``timeout``, ``link``, ``connect``), and its subclass ``BadReply`` that the device
answered with something that is not the answer (replies.py: a wrong function code, unit id or
transaction id, a byte count that disagrees, a CRC error, a truncated frame, garbage): the
poller treats it like no answer, never as data. A device that answered with a Modbus exception
response raises ``ModbusExceptionResponse`` (the device is alive: no retry, no backoff, except
for the codes that say the device itself failed or is absent behind a gateway: 4, 10, 11).

A ``LinkFactory`` makes the links of one source: ``factory(source_name, source_cfg, timeout)``,
``timeout`` being the response time limit of the device(s) it serves. The poller decides how
many: one per RTU line, one per TCP device, or one per TCP endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from flux_edge.errors import SourceError
from flux_edge.sources.modbus.plan import ReadBlock
from flux_edge.sources.modbus.spec import ModbusRtuSource, ModbusTcpSource

__all__ = [
    "DEVICE_DOWN_CODES",
    "EXCEPTION_CODES",
    "BadReply",
    "LinkFactory",
    "LinkFailure",
    "ModbusExceptionResponse",
    "ModbusLink",
    "exception_text",
]


class ModbusLink(Protocol):
    """One Modbus link (see the module docstring). Every call is bounded by a timeout (the
    link's own, or ``per_request`` seconds when given) and raises ``SourceError``."""

    async def read(
        self, block: ReadBlock, unit_id: int, *, per_request: float | None = None
    ) -> tuple[int, ...]:
        """Read one block. Coils/discrete inputs come back as 0/1 words, exactly ``count``."""
        ...

    async def write_coil(
        self, address: int, value: bool, unit_id: int, *, per_request: float | None = None
    ) -> None: ...

    async def write_register(
        self, address: int, value: int, unit_id: int, *, per_request: float | None = None
    ) -> None:
        """Write one holding register: 0..65535, or -32768..-1 as its two's complement."""
        ...

    async def close(self) -> None: ...


LinkFactory = Callable[[str, ModbusTcpSource | ModbusRtuSource, float], ModbusLink]


class LinkFailure(SourceError):
    """A request got no usable answer; ``reason`` says why in one word (a metric label, one of
    ``replies.REASONS``)."""

    def __init__(self, source: str, message: str, reason: str = "link") -> None:
        self.reason = reason
        super().__init__(source, message)


class BadReply(LinkFailure):
    """The device (or something on the line) answered, but not with the answer to the request:
    a bad reading, never data."""


class ModbusExceptionResponse(SourceError):
    """The device answered, with a Modbus exception response (``code``, e.g. 2 illegal address).

    The link is fine: a poller does not back off for these (the device is alive), it reports
    them in its health.
    """

    reason = "exception"

    def __init__(self, source: str, message: str, code: int) -> None:
        self.code = code
        super().__init__(source, message)


# Exception codes that speak for the device, not for one block: it failed (4), or a gateway has
# no path to it or got no answer from it (10, 11). The poller treats these like no answer.
DEVICE_DOWN_CODES = frozenset({4, 10, 11})


EXCEPTION_CODES: dict[int, tuple[str, str]] = {
    1: ("ILLEGAL_FUNCTION", "the device does not support this function"),
    2: ("ILLEGAL_DATA_ADDRESS", "the device has no such address: check the register map"),
    3: ("ILLEGAL_DATA_VALUE", "the device refused the value or the count"),
    4: ("SERVER_DEVICE_FAILURE", "the device failed while handling the request"),
    5: ("ACKNOWLEDGE", "the device accepted a long-running request"),
    6: ("SERVER_DEVICE_BUSY", "the device is busy: retry later"),
    7: ("NEGATIVE_ACKNOWLEDGE", "the device cannot perform the request"),
    8: ("MEMORY_PARITY_ERROR", "the device detected a memory parity error"),
    10: ("GATEWAY_PATH_UNAVAILABLE", "the gateway has no path to this unit id"),
    11: (
        "GATEWAY_TARGET_FAILED_TO_RESPOND",
        "no device answered behind the gateway: check the unit id",
    ),
}


def exception_text(code: int) -> str:
    """An exception code as every link reports it: '0x02 ILLEGAL_DATA_ADDRESS (the device ...)'."""
    name, hint = EXCEPTION_CODES.get(code, ("UNKNOWN", "unknown exception code"))
    return f"{code:#04x} {name} ({hint})"
