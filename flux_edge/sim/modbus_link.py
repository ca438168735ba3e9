"""In-process Modbus devices behind the poller's link seam (``ModbusLink``, see
flux_edge/sources/modbus/link.py): no sockets, no pymodbus, and time only through a ``sleep``
the test gives (pair it with the poller's ``clock``/``sleep`` to run on virtual time).

    bus = SimulatedModbusBus(device_id=(1, 2, 3), sleep=vt.sleep)
    poller = ModbusBusPoller("line", cfg, emit, clock=vt.clock, sleep=vt.sleep,
                             link_factory=bus.link)

``SimulatedModbusBus`` holds the devices (unit id -> coils, discrete inputs, holding and input
registers, ``size`` of each, all 0 at first); ``bus.link`` is a ``LinkFactory`` making
``SimulatedModbusLink``s to it. Like the real links: a silent unit (``silence``) costs the
request's timeout and raises ``SourceError``; an unknown unit id answers exception 0x0B
(gateway target failed), an address outside the tables exception 0x02 (illegal address), as
``ModbusExceptionResponse``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

from flux_edge.errors import SourceError
from flux_edge.model import FN_COIL, FN_DISCRETE, FN_HOLDING, FN_INPUT
from flux_edge.sources.modbus.link import ModbusExceptionResponse, exception_text
from flux_edge.sources.modbus.plan import ReadBlock
from flux_edge.sources.modbus.spec import ModbusRtuSource, ModbusTcpSource

__all__ = ["SimulatedModbusBus", "SimulatedModbusLink", "Table"]

Table = Literal["coil", "discrete", "holding", "input"]
_FN_TABLE: dict[int, Table] = {
    FN_COIL: "coil",
    FN_DISCRETE: "discrete",
    FN_HOLDING: "holding",
    FN_INPUT: "input",
}


class SimulatedModbusBus:
    """Modbus devices in this process, reached through ``SimulatedModbusLink``s (``link``).

    ``requests`` counts (unit id, function code) of every request, answered or not; ``links``
    lists the links made, so a test can see how a poller shares them.
    """

    def __init__(
        self,
        device_id: int | Iterable[int] = 1,
        *,
        size: int = 4096,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        ids = [device_id] if isinstance(device_id, int) else list(device_id)
        if not ids:
            raise ValueError("SimulatedModbusBus needs at least one device id")
        self.device_ids: tuple[int, ...] = tuple(ids)
        self.size = size
        self._tables: dict[int, dict[Table, list[int]]] = {
            dev: {t: [0] * size for t in _FN_TABLE.values()} for dev in self.device_ids
        }
        self._silent: set[int] = set()
        self._sleep = sleep
        self.requests: collections.Counter[tuple[int, int]] = collections.Counter()
        self.links: list[SimulatedModbusLink] = []

    # -- the tables --

    def set_words(
        self, table: Table, address: int, words: Iterable[int], *, device_id: int | None = None
    ) -> None:
        """Set consecutive registers (or bits, 0/1) of one table from ``address`` on."""
        cells = self._tables[self.device_ids[0] if device_id is None else device_id][table]
        for i, word in enumerate(words):
            if not -32768 <= word <= 65535:
                raise ValueError(f"{word} does not fit a 16-bit register")
            bits = table in ("coil", "discrete")
            cells[address + i] = (1 if word else 0) if bits else word & 0xFFFF

    def get_words(
        self, table: Table, address: int, count: int = 1, *, device_id: int | None = None
    ) -> tuple[int, ...]:
        cells = self._tables[self.device_ids[0] if device_id is None else device_id][table]
        return tuple(cells[address : address + count])

    def silence(self, device_id: int, silent: bool = True) -> None:
        """A silent unit receives requests (they are counted) but never answers."""
        if silent:
            self._silent.add(device_id)
        else:
            self._silent.discard(device_id)

    def request_count(self, function: int | None = None, device_id: int | None = None) -> int:
        """Requests received (every function code, or one), for every unit id or one."""
        return sum(
            n
            for (dev, fn), n in self.requests.items()
            if (function is None or fn == function) and (device_id is None or dev == device_id)
        )

    # -- the LinkFactory --

    def link(
        self, source: str, cfg: ModbusTcpSource | ModbusRtuSource, timeout: float
    ) -> SimulatedModbusLink:
        """A ``LinkFactory``: ``ModbusBusPoller(..., link_factory=bus.link)``."""
        link = SimulatedModbusLink(self, source, timeout)
        self.links.append(link)
        return link

    # -- what the links do --

    async def _request(
        self, source: str, what: str, unit_id: int, function: int, limit: float
    ) -> dict[Table, list[int]]:
        self.requests[(unit_id, function)] += 1
        where = f"simulated bus unit {unit_id}"
        if unit_id in self._silent:
            await self._sleep(limit)
            raise SourceError(source, f"{where}: no response to {what} within {limit:g} s")
        await asyncio.sleep(0)  # a request is a suspension point, as on a real link
        tables = self._tables.get(unit_id)
        if tables is None:
            raise ModbusExceptionResponse(
                source, f"{where}: {what}: exception response {exception_text(11)}", 11
            )
        return tables

    def _refuse(self, source: str, unit_id: int, what: str, code: int) -> ModbusExceptionResponse:
        return ModbusExceptionResponse(
            source,
            f"simulated bus unit {unit_id}: {what}: exception response {exception_text(code)}",
            code,
        )


class SimulatedModbusLink:
    """One link to a ``SimulatedModbusBus`` (a ``ModbusLink``). ``closed`` until its next
    request after ``close()``; ``closes`` counts them."""

    def __init__(self, bus: SimulatedModbusBus, source: str, timeout: float) -> None:
        self.bus = bus
        self.source = source
        self.timeout = timeout
        self.closed = False
        self.closes = 0

    async def read(
        self, block: ReadBlock, unit_id: int, *, per_request: float | None = None
    ) -> tuple[int, ...]:
        self.closed = False
        what = block.describe()
        table = _FN_TABLE.get(block.function)
        if table is None:
            raise SourceError(self.source, f"{what}: unknown function code {block.function}")
        tables = await self.bus._request(
            self.source, what, unit_id, block.function, per_request or self.timeout
        )
        end = block.address + block.count
        if block.address < 0 or end > self.bus.size:
            raise self.bus._refuse(self.source, unit_id, what, 2)
        return tuple(tables[table][block.address : end])

    async def _write(
        self,
        table: Literal["coil", "holding"],
        address: int,
        value: int,
        unit_id: int,
        *,
        per_request: float | None,
    ) -> None:
        self.closed = False
        what = f"write {table} {address} := {value}"
        function = 5 if table == "coil" else 6
        tables = await self.bus._request(
            self.source, what, unit_id, function, per_request or self.timeout
        )
        if not 0 <= address < self.bus.size:
            raise self.bus._refuse(self.source, unit_id, what, 2)
        tables[table][address] = value

    async def write_coil(
        self, address: int, value: bool, unit_id: int, *, per_request: float | None = None
    ) -> None:
        await self._write("coil", address, int(bool(value)), unit_id, per_request=per_request)

    async def write_register(
        self, address: int, value: int, unit_id: int, *, per_request: float | None = None
    ) -> None:
        if not -32768 <= value <= 65535:
            raise SourceError(
                self.source,
                f"simulated bus unit {unit_id}: value {value} does not fit holding register "
                f"{address} (16 bits: -32768..65535)",
            )
        await self._write("holding", address, value & 0xFFFF, unit_id, per_request=per_request)

    async def close(self) -> None:
        self.closed = True
        self.closes += 1
