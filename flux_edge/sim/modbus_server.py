"""A simulated Modbus TCP server for tests, benchmarks and the demo (never imported by
production code).

``SimulatedModbusServer``: a pymodbus TCP server (SimDevice datastore) whose tables Python reads
and writes directly, that counts requests and reports writes (``SimWrite``). (The RTU test slaves
live in tests/support/serial_line.py: they must time their answers on a simulated line, which
pymodbus' server cannot.)
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from flux_edge.errors import SourceError
from flux_edge.sources.modbus.client import os_reason, remember_oserror

__all__ = ["SimWrite", "SimulatedModbusServer", "Table"]

Table = Literal["coil", "discrete", "holding", "input"]
_FC_TABLE: dict[int, Table] = {
    1: "coil", 5: "coil", 15: "coil",
    2: "discrete",
    3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding",
    4: "input",
}


@dataclass(frozen=True, slots=True)
class SimWrite:
    """A write the simulated server received, as applied (an ignored write shows in ``values``
    the unchanged value, in ``requested`` what the client asked for)."""

    device_id: int
    table: Literal["coil", "holding"]
    address: int
    values: tuple[int, ...]
    requested: tuple[int, ...]


@dataclass
class _Tables:
    size: int
    coil: list[bool] = field(init=False)
    discrete: list[bool] = field(init=False)
    holding: list[int] = field(init=False)
    input: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.coil = [False] * self.size
        self.discrete = [False] * self.size
        self.holding = [0] * self.size
        self.input = [0] * self.size


def _pack16(bits: Sequence[bool]) -> int:
    word = 0
    for i, bit in enumerate(bits):
        if bit:
            word |= 1 << i
    return word


class SimulatedModbusServer:
    """A Modbus TCP server on ``host:port`` (port 0: a free port, see ``.port`` after start)
    serving one or more unit ids, each with ``size`` coils, discrete inputs, holding and input
    registers, all 0 at first. Unknown unit ids get exception 0x0B (gateway target failed).

    Python reads and writes the tables directly (``set_holding``, ``get_coil``, ...; the first
    unit id unless ``device_id=`` says otherwise); ``requests``/``request_count`` count what
    clients asked for, ``on_write``/``next_write()`` report writes, ``ignore_writes`` makes an
    address accept writes without changing (a faulty device), ``silence`` makes a unit stop
    answering (a dead device behind a gateway: requests are counted, no response is sent).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        device_id: int | Iterable[int] = 1,
        *,
        size: int = 4096,
    ) -> None:
        self.host = host
        self.port = port
        ids = [device_id] if isinstance(device_id, int) else list(device_id)
        if not ids:
            raise ValueError("SimulatedModbusServer needs at least one device id")
        self.device_ids: tuple[int, ...] = tuple(ids)
        self.size = -(-size // 16) * 16  # bit tables are stored in 16-bit words
        self._tables = {dev: _Tables(self.size) for dev in self.device_ids}
        self._ignored: set[tuple[int, str, int]] = set()
        self._silent: set[int] = set()
        self.requests: collections.Counter[tuple[int, int]] = collections.Counter()
        self.connections = 0
        self.writes: list[SimWrite] = []  # most recent last; bounded
        self.on_write: Callable[[SimWrite], None] | None = None
        self._waiters: list[asyncio.Future[SimWrite]] = []
        self._server: ModbusTcpServer | None = None

    # -- python access to the tables --

    def _t(self, device_id: int | None) -> _Tables:
        return self._tables[self.device_ids[0] if device_id is None else device_id]

    def _check(self, address: int) -> None:
        if not 0 <= address < self.size:
            raise IndexError(f"address {address} outside 0..{self.size - 1}")

    def set_coil(self, address: int, value: bool, *, device_id: int | None = None) -> None:
        self._check(address)
        self._t(device_id).coil[address] = bool(value)

    def get_coil(self, address: int, *, device_id: int | None = None) -> bool:
        self._check(address)
        return self._t(device_id).coil[address]

    def set_discrete(self, address: int, value: bool, *, device_id: int | None = None) -> None:
        self._check(address)
        self._t(device_id).discrete[address] = bool(value)

    def get_discrete(self, address: int, *, device_id: int | None = None) -> bool:
        self._check(address)
        return self._t(device_id).discrete[address]

    @staticmethod
    def _word(value: int) -> int:
        if not -32768 <= value <= 65535:
            raise ValueError(f"{value} does not fit a 16-bit register")
        return value & 0xFFFF

    def set_holding(self, address: int, value: int, *, device_id: int | None = None) -> None:
        """Set a holding register (0..65535, or -32768..-1 stored as two's complement)."""
        self._check(address)
        self._t(device_id).holding[address] = self._word(value)

    def get_holding(self, address: int, *, device_id: int | None = None) -> int:
        self._check(address)
        return self._t(device_id).holding[address]

    def set_input(self, address: int, value: int, *, device_id: int | None = None) -> None:
        self._check(address)
        self._t(device_id).input[address] = self._word(value)

    def get_input(self, address: int, *, device_id: int | None = None) -> int:
        self._check(address)
        return self._t(device_id).input[address]

    def set_words(
        self, table: Table, address: int, words: Iterable[int], *, device_id: int | None = None
    ) -> None:
        """Set consecutive registers (or bits, 0/1) of one table from ``address`` on."""
        for i, word in enumerate(words):
            if table == "coil":
                self.set_coil(address + i, bool(word), device_id=device_id)
            elif table == "discrete":
                self.set_discrete(address + i, bool(word), device_id=device_id)
            elif table == "holding":
                self.set_holding(address + i, word, device_id=device_id)
            else:
                self.set_input(address + i, word, device_id=device_id)

    def silence(self, device_id: int, silent: bool = True) -> None:
        """A silent unit receives requests (they are counted) but never answers."""
        if silent:
            self._silent.add(device_id)
        else:
            self._silent.discard(device_id)

    def ignore_writes(
        self, table: Literal["coil", "holding"], address: int, *, device_id: int | None = None
    ) -> None:
        """Accept writes to this address with a normal response but keep the old value."""
        dev = self.device_ids[0] if device_id is None else device_id
        self._ignored.add((dev, table, address))

    # -- observing clients --

    def request_count(self, function: int | None = None, device_id: int | None = None) -> int:
        """Requests received (every function code, or one), for every unit id or one."""
        return sum(
            n
            for (dev, fn), n in self.requests.items()
            if (function is None or fn == function) and (device_id is None or dev == device_id)
        )

    async def next_write(self) -> SimWrite:
        """Wait for the next write a client makes."""
        fut: asyncio.Future[SimWrite] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[(pdu.dev_id, pdu.function_code)] += 1
        return pdu

    def _trace_packet(self, sending: bool, packet: bytes) -> bytes:
        # A response's MBAP header carries the unit id in byte 6: a silenced unit's is not sent.
        if sending and self._silent and len(packet) > 6 and packet[6] in self._silent:
            return b""
        return packet

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            self.connections += 1

    # -- the pymodbus datastore hook --

    def _sync(
        self,
        *,
        dev: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus for every datastore access: our tables are the truth, so copy the
        accessed range into pymodbus' block before it answers, and apply writes to our tables
        (rewriting ``values`` in place for ignored addresses)."""
        table = _FC_TABLE.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        tables = self._tables[dev]
        if table in ("coil", "discrete"):
            bits = tables.coil if table == "coil" else tables.discrete
            first = address // 16  # bit blocks: pymodbus passes the count of 16-bit words
            for r in range(count):
                base = (first + r) * 16
                registers[first - start_address + r] = _pack16(bits[base : base + 16])
        else:
            words = tables.holding if table == "holding" else tables.input
            off = address - start_address
            registers[off : off + count] = words[address : address + count]
        if values is not None and table in ("coil", "holding"):
            self._apply_write(dev, table, address, values)
        return None

    def _apply_write(
        self,
        dev: int,
        table: Literal["coil", "holding"],
        address: int,
        values: list[int] | list[bool],
    ) -> None:
        tables = self._tables[dev]
        requested = tuple(int(v) for v in values)
        for i, v in enumerate(values):
            addr = address + i
            if (dev, table, addr) in self._ignored:
                old = tables.coil[addr] if table == "coil" else tables.holding[addr]
                values[i] = old  # type: ignore[call-overload]  # list[bool] | list[int]
            elif table == "coil":
                tables.coil[addr] = bool(v)
            else:
                tables.holding[addr] = int(v) & 0xFFFF
        write = SimWrite(dev, table, address, tuple(int(v) for v in values), requested)
        self.writes.append(write)
        del self.writes[:-1000]
        if self.on_write is not None:
            self.on_write(write)
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(write)
        self._waiters.clear()

    def _device(self, dev: int, gateway_reject: bool) -> SimDevice:
        async def action(  # noqa: PLR0917 - the signature pymodbus calls
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if gateway_reject:
                return ExcCodes.GATEWAY_NO_RESPONSE
            return self._sync(
                dev=dev,
                function_code=function_code,
                start_address=start_address,
                address=address,
                count=count,
                registers=registers,
                values=values,
            )

        def bits() -> list[SimData]:
            # One list of values, count=1: pymodbus multiplies a bit block by count twice while
            # checking it (count=4096 with a scalar value builds a 16M-entry list).
            return [SimData(0, count=1, values=[False] * self.size, datatype=DataType.BITS)]

        def words() -> list[SimData]:
            return [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(id=dev, simdata=(bits(), bits(), words(), words()), action=action)

    # -- lifecycle --

    async def start(self) -> None:
        """Listen. Raises SourceError when the address cannot be bound (port in use?)."""
        if self._server is not None:
            return
        devices = [self._device(dev, gateway_reject=False) for dev in self.device_ids]
        if 0 not in self.device_ids:
            # pymodbus routes unknown unit ids to unit 0: make that answer like a gateway would.
            devices.append(self._device(0, gateway_reject=True))
        server = ModbusTcpServer(
            devices,
            address=(self.host, self.port),
            trace_pdu=self._trace_pdu,
            trace_packet=self._trace_packet,
            trace_connect=self._trace_connect,
        )
        errors = remember_oserror(server)
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            reason = os_reason(errors) or str(exc)
            raise SourceError(
                f"simulator {self.host}:{self.port}", f"cannot listen: {reason}"
            ) from exc
        listener = server.transport
        sockets = getattr(listener, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._server = server

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.shutdown()  # type: ignore[no-untyped-call]
        await asyncio.sleep(0)
        for fut in self._waiters:
            fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> SimulatedModbusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
