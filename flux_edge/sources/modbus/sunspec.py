"""SunSpec model discovery (``discover = "sunspec"`` on a Modbus device): pure, no pymodbus.

A SunSpec device holds, in its holding registers, the marker 'SunS' (0x5375 0x6E53) at one of
the well-known base addresses (40000, 50000 or 0; the specification's documents number them
1-based, 40001 ...), followed by a chain of models: each model starts with a header of two
registers, its ID and its length L, and its block is the L registers after the header; the model
ID 0xFFFF ends the chain. ``discover`` finds the marker, walks the chain and returns the
``SunSpecMap`` the poller then reads each poll: every kept model's block, split into requests of
at most ``MAX_REGISTERS`` registers, handed to the plugin chain as one ``Reading`` per model with
``topic = "sunspec/<model id>"`` and ``address`` = the block's first register (the register
after the header).

The reads go through the ``read`` callable the poller gives (its own retries, timeouts and
locks); a request that is never answered raises whatever ``read`` raises (the poller backs the
device off). What the device answers but is not a SunSpec map (no marker, a chain that breaks
or runs past the last address) raises ``DiscoveryError`` naming the device's config key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from flux_edge.errors import SourceError
from flux_edge.model import FN_HOLDING
from flux_edge.sources.modbus.link import ModbusExceptionResponse
from flux_edge.sources.modbus.plan import MAX_REGISTERS, ReadBlock

__all__ = [
    "ASSUMED_MODELS",
    "DEFAULT_BASES",
    "END_OF_CHAIN",
    "MARKER",
    "MAX_MODELS",
    "STANDARD_LENGTHS",
    "TOPIC_PREFIX",
    "DiscoveryError",
    "Model",
    "SunSpecMap",
    "discover",
    "model_blocks",
]

MARKER = (0x5375, 0x6E53)  # "SunS"
DEFAULT_BASES = (40000, 50000, 0)
END_OF_CHAIN = 0xFFFF
MAX_MODELS = 256  # a longer chain is taken as broken (a device answering garbage forever)
TOPIC_PREFIX = "sunspec/"  # Reading.topic of a model block: "sunspec/103"
# The fixed block length L of the common models, from the SunSpec model definitions: the bus
# budget counts a configured model's requests by it before any device has answered.
STANDARD_LENGTHS: dict[int, int] = {
    1: 66,  # common
    101: 50, 102: 50, 103: 50,  # inverters, single / split / three phase, integer + SF
    111: 60, 112: 60, 113: 60,  # the same, float
    120: 26, 121: 30, 122: 44, 123: 24,  # nameplate, settings, status, controls
    201: 105, 202: 105, 203: 105, 204: 105,  # meters, integer + SF
    211: 124, 212: 124, 213: 124, 214: 124,  # meters, float
}
# What a device with discover but without models is counted as: the common model and one
# three-phase inverter (its real chain is known only once it answers).
ASSUMED_MODELS = (1, 103)

Read = Callable[[ReadBlock], Awaitable[tuple[int, ...]]]


class DiscoveryError(SourceError):
    """The device answered, but not with a usable SunSpec map: no marker at any base address,
    a broken chain, or a model running past address 65535. ``reason`` is a metric label."""

    reason = "discovery"


@dataclass(frozen=True, slots=True)
class Model:
    """One model of the chain: its ID, the address of its header and its length L."""

    id: int
    header: int  # address of the model's ID register; L follows it
    length: int  # registers of the block after the header

    @property
    def start(self) -> int:
        """The first register of the block (after ID and L)."""
        return self.header + 2

    @property
    def blocks(self) -> tuple[ReadBlock, ...]:
        return model_blocks(self.start, self.length)

    def describe(self) -> str:
        return f"{self.id} at {self.header} ({self.length} registers)"


@dataclass(frozen=True, slots=True)
class SunSpecMap:
    """What discovery found: the marker's address, every model of the chain in order, and the
    models the poller reads (the configured ``models``, or all)."""

    marker: int
    chain: tuple[Model, ...]
    polled: tuple[Model, ...]
    missing: tuple[int, ...] = ()  # configured model ids the chain does not hold

    def describe(self) -> str:
        models = ", ".join(m.describe() for m in self.chain)
        text = f"SunSpec marker at {self.marker}, models {models}"
        if len(self.polled) != len(self.chain):
            text += f"; polling {', '.join(str(m.id) for m in self.polled)}"
        return text


def model_blocks(start: int, length: int) -> tuple[ReadBlock, ...]:
    """The read requests of one block: ``length`` registers from ``start``, at most
    ``MAX_REGISTERS`` per request."""
    return tuple(
        ReadBlock(FN_HOLDING, start + at, min(MAX_REGISTERS, length - at))
        for at in range(0, length, MAX_REGISTERS)
    )


def _marker_at(words: Sequence[int]) -> int:
    """Where the marker starts in the words read at a base: 0, 1 (a device that put it one
    register late, reading the documents' 1-based "40001" as a protocol address), or -1."""
    for at in (0, 1):
        if tuple(words[at : at + 2]) == MARKER:
            return at
    return -1


async def discover(
    read: Read,
    source: str,
    key: str,
    bases: Iterable[int] = (),
    models: Iterable[int] = (),
) -> SunSpecMap:
    """Find the marker at the first of ``bases`` (default ``DEFAULT_BASES``) that holds it, walk
    the model chain and keep ``models`` (default: all). ``key`` is the device's config key path
    (``sources.pv.devices[0]``), named by every error. Raises ``DiscoveryError``, or what
    ``read`` raises for a request that got no answer."""
    where = tuple(bases) or DEFAULT_BASES
    marker = -1
    refused: list[str] = []
    for base in where:
        try:
            words = await read(ReadBlock(FN_HOLDING, base, min(4, 65536 - base)))
        except ModbusExceptionResponse as exc:
            refused.append(f"{base}: exception {exc.code}")
            continue
        at = _marker_at(words)
        if at >= 0:
            marker = base + at
            break
    if marker < 0:
        listed = ", ".join(str(b) for b in where)
        detail = f" (refused: {'; '.join(refused)})" if refused else ""
        raise DiscoveryError(
            source,
            f"{key}.discover: no SunSpec marker 'SunS' (0x5375 0x6E53) in the holding registers "
            f"at {listed}{detail}: not a SunSpec device, or its map starts elsewhere (set bases)",
        )
    chain = await _walk(read, source, key, marker)
    wanted = tuple(dict.fromkeys(models))
    polled = tuple(m for m in chain if not wanted or m.id in wanted)
    found = {m.id for m in chain}
    missing = tuple(i for i in wanted if i not in found)
    if not polled:
        ids = ", ".join(str(m.id) for m in chain)
        raise DiscoveryError(
            source,
            f"{key}.models: none of the models {', '.join(map(str, wanted))} is on the device "
            f"(its chain at {marker} holds {ids})",
        )
    return SunSpecMap(marker, chain, polled, missing)


async def _walk(read: Read, source: str, key: str, marker: int) -> tuple[Model, ...]:
    chain: list[Model] = []
    address = marker + 2

    def broken(what: str) -> DiscoveryError:
        after = f" after models {', '.join(m.describe() for m in chain)}" if chain else ""
        return DiscoveryError(
            source, f"{key}.discover: broken SunSpec chain (marker at {marker}): {what}{after}"
        )

    while True:
        if len(chain) >= MAX_MODELS:
            raise broken(f"more than {MAX_MODELS} models and no end (model ID 0xFFFF)")
        if address > 65534:
            raise broken("the chain runs past address 65535 without its end (model ID 0xFFFF)")
        try:
            words = await read(ReadBlock(FN_HOLDING, address, 2))
        except ModbusExceptionResponse as exc:
            raise broken(
                f"the model header at {address} cannot be read ({exc}): the chain has no end "
                "(model ID 0xFFFF)"
            ) from None
        if len(words) != 2:
            raise broken(f"the model header at {address} came back as {len(words)} registers")
        model_id, length = words
        if model_id == END_OF_CHAIN:
            break
        if model_id == 0:
            raise broken(f"model ID 0 at {address}: not a model (the chain ends with 0xFFFF)")
        if address + 2 + length > 65536:
            raise broken(
                f"model {model_id} at {address} says it is {length} registers long: that runs "
                "past address 65535"
            )
        chain.append(Model(model_id, address, length))
        address += 2 + length
    if not chain:
        raise broken("no model after the marker (the chain ends at once)")
    return tuple(chain)
